-- Every tracking event, raw, one row each: impressions, clicks and the VAST 4
-- linear tracking events. Analysts may read it; the service's analytics never
-- scan it (they read the ad_stats_* aggregates).
--
-- event_time  when it happened (client clock when sane, else server clock), UTC
-- received_at when adbeacon accepted it, UTC
-- ip_hash     keyed SipHash of the client IP; the raw IP is never stored
-- playback_time  seconds into the video, NULL when the client did not say
-- error_code  VAST error code for kind = 'error', 0 otherwise
-- batch_id    the token of the insert batch that carried the row (replays keep it)
--
-- Raw retention is by dropping monthly partitions: ALTER TABLE events DROP PARTITION 202401.
CREATE TABLE IF NOT EXISTS events
(
    event_id      UUID,
    ad_id         UUID,
    kind          Enum8(
                      'impression' = 1, 'click' = 2, 'creative_view' = 3, 'start' = 4,
                      'first_quartile' = 5, 'midpoint' = 6, 'third_quartile' = 7,
                      'complete' = 8, 'skip' = 9, 'pause' = 10, 'resume' = 11,
                      'mute' = 12, 'unmute' = 13, 'close' = 14, 'error' = 15),
    event_time    DateTime('UTC'),
    received_at   DateTime('UTC'),
    ip_hash       UInt64,
    playback_time Nullable(Float32),
    error_code    UInt16,
    batch_id      UUID
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (ad_id, event_time, kind);
