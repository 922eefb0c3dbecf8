-- Traffic quality: every event is stored, and `traffic` says whether it counts.
--
--   valid             counts in the net numbers (every row stored before this migration)
--   duplicate         same ad, client-IP hash and kind as a counted event within DEDUP_WINDOW
--   bot               the user agent declares a bot, spider or crawler, or is an HTTP tool
--   empty_user_agent  the request had no user agent
--
-- The ad_stats_* and ad_errors_minutely views are re-created to count valid events only (the
-- net numbers analytics shows); filtered events are counted per reason and kind in
-- ad_filtered_minutely, so gross = net + filtered. Aggregates written before this migration
-- counted everything, which is the same thing: no event was filtered before it.
--
-- Between dropping a view and re-creating it, an insert from another running instance would
-- miss the aggregates: apply this migration (`adbeacon migrate`) before rolling out, or while
-- no other instance inserts. ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS; the migrator
-- treats "column already exists" as done, so the file is still safe to run twice.
ALTER TABLE events ADD COLUMN traffic Enum8('valid' = 0, 'duplicate' = 1, 'bot' = 2, 'empty_user_agent' = 3) DEFAULT 'valid';

DROP TABLE IF EXISTS ad_stats_hourly_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS ad_stats_hourly_mv TO ad_stats_hourly AS
SELECT
    ad_id,
    toStartOfHour(event_time) AS hour,
    countIfState(kind = 'impression') AS impressions,
    countIfState(kind = 'click') AS clicks,
    uniqIfState(ip_hash, kind = 'click') AS unique_clicks,
    countIfState(kind = 'creative_view') AS creative_views,
    countIfState(kind = 'start') AS starts,
    countIfState(kind = 'first_quartile') AS first_quartiles,
    countIfState(kind = 'midpoint') AS midpoints,
    countIfState(kind = 'third_quartile') AS third_quartiles,
    countIfState(kind = 'complete') AS completes,
    countIfState(kind = 'skip') AS skips,
    countIfState(kind = 'pause') AS pauses,
    countIfState(kind = 'resume') AS resumes,
    countIfState(kind = 'mute') AS mutes,
    countIfState(kind = 'unmute') AS unmutes,
    countIfState(kind = 'close') AS closes,
    countIfState(kind = 'error') AS errors,
    sumIfState(toFloat64(ifNull(playback_time, 0)), kind = 'click' AND isNotNull(playback_time)) AS click_playback_sum,
    countIfState(kind = 'click' AND isNotNull(playback_time)) AS click_playback_count
FROM events
WHERE traffic = 'valid'
GROUP BY ad_id, hour;

DROP TABLE IF EXISTS ad_stats_minutely_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS ad_stats_minutely_mv TO ad_stats_minutely AS
SELECT
    ad_id,
    toStartOfMinute(event_time) AS minute,
    countIfState(kind = 'impression') AS impressions,
    countIfState(kind = 'click') AS clicks,
    uniqIfState(ip_hash, kind = 'click') AS unique_clicks,
    countIfState(kind = 'creative_view') AS creative_views,
    countIfState(kind = 'start') AS starts,
    countIfState(kind = 'first_quartile') AS first_quartiles,
    countIfState(kind = 'midpoint') AS midpoints,
    countIfState(kind = 'third_quartile') AS third_quartiles,
    countIfState(kind = 'complete') AS completes,
    countIfState(kind = 'skip') AS skips,
    countIfState(kind = 'pause') AS pauses,
    countIfState(kind = 'resume') AS resumes,
    countIfState(kind = 'mute') AS mutes,
    countIfState(kind = 'unmute') AS unmutes,
    countIfState(kind = 'close') AS closes,
    countIfState(kind = 'error') AS errors,
    sumIfState(toFloat64(ifNull(playback_time, 0)), kind = 'click' AND isNotNull(playback_time)) AS click_playback_sum,
    countIfState(kind = 'click' AND isNotNull(playback_time)) AS click_playback_count
FROM events
WHERE traffic = 'valid'
GROUP BY ad_id, minute;

DROP TABLE IF EXISTS ad_stats_daily_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS ad_stats_daily_mv TO ad_stats_daily AS
SELECT
    ad_id,
    toStartOfDay(event_time) AS day,
    countIfState(kind = 'impression') AS impressions,
    countIfState(kind = 'click') AS clicks,
    uniqIfState(ip_hash, kind = 'click') AS unique_clicks,
    countIfState(kind = 'creative_view') AS creative_views,
    countIfState(kind = 'start') AS starts,
    countIfState(kind = 'first_quartile') AS first_quartiles,
    countIfState(kind = 'midpoint') AS midpoints,
    countIfState(kind = 'third_quartile') AS third_quartiles,
    countIfState(kind = 'complete') AS completes,
    countIfState(kind = 'skip') AS skips,
    countIfState(kind = 'pause') AS pauses,
    countIfState(kind = 'resume') AS resumes,
    countIfState(kind = 'mute') AS mutes,
    countIfState(kind = 'unmute') AS unmutes,
    countIfState(kind = 'close') AS closes,
    countIfState(kind = 'error') AS errors,
    sumIfState(toFloat64(ifNull(playback_time, 0)), kind = 'click' AND isNotNull(playback_time)) AS click_playback_sum,
    countIfState(kind = 'click' AND isNotNull(playback_time)) AS click_playback_count
FROM events
WHERE traffic = 'valid'
GROUP BY ad_id, day;

DROP TABLE IF EXISTS ad_errors_minutely_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS ad_errors_minutely_mv TO ad_errors_minutely AS
SELECT
    ad_id,
    toStartOfMinute(event_time) AS minute,
    error_code,
    countState() AS errors
FROM events
WHERE kind = 'error' AND traffic = 'valid'
GROUP BY ad_id, minute, error_code;

-- Filtered events per ad, UTC minute of event_time, reason and kind: the `traffic.filtered`
-- of GET /ads/analytics. Most traffic is valid, so one table at minute precision answers any
-- window exactly (only minutes with filtered events have rows). Read with countMerge:
--   SELECT reason, kind, countMerge(events) FROM ad_filtered_minutely WHERE ad_id = '…'
--   GROUP BY reason, kind
CREATE TABLE IF NOT EXISTS ad_filtered_minutely
(
    ad_id  UUID,
    minute DateTime('UTC'),
    reason Enum8('valid' = 0, 'duplicate' = 1, 'bot' = 2, 'empty_user_agent' = 3),
    kind   Enum8(
               'impression' = 1, 'click' = 2, 'creative_view' = 3, 'start' = 4,
               'first_quartile' = 5, 'midpoint' = 6, 'third_quartile' = 7,
               'complete' = 8, 'skip' = 9, 'pause' = 10, 'resume' = 11,
               'mute' = 12, 'unmute' = 13, 'close' = 14, 'error' = 15),
    events AggregateFunction(count)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (ad_id, minute, reason, kind)
SETTINGS index_granularity = 256;

CREATE MATERIALIZED VIEW IF NOT EXISTS ad_filtered_minutely_mv TO ad_filtered_minutely AS
SELECT
    ad_id,
    toStartOfMinute(event_time) AS minute,
    traffic AS reason,
    kind,
    countState() AS events
FROM events
WHERE traffic != 'valid'
GROUP BY ad_id, minute, reason, kind;
