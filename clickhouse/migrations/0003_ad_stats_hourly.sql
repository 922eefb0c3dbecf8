-- Per ad and UTC hour of event_time: counts of every event kind, unique
-- clicking IP hashes, and the playback position of clicks. Fed by the
-- materialized view below on every insert into `events`; read with the
-- -Merge combinators, e.g.
--   SELECT hour, countIfMerge(clicks) AS clicks, uniqIfMerge(unique_clicks) AS unique_clicks
--   FROM ad_stats_hourly WHERE ad_id = '…' GROUP BY hour ORDER BY hour
--
-- Small granules (128 rows, not the default 8192): a read of one ad's hours then decodes the
-- states of little more than those rows, not of thousands of other ads' rows around them, and
-- decoding uniq states is most of the cost of an analytics query. (This is a revision of the
-- file; a database created with the first text keeps 8192-row granules: correct, only slower.)
CREATE TABLE IF NOT EXISTS ad_stats_hourly
(
    ad_id          UUID,
    hour           DateTime('UTC'),
    impressions    AggregateFunction(countIf, UInt8),
    clicks         AggregateFunction(countIf, UInt8),
    unique_clicks  AggregateFunction(uniqIf, UInt64, UInt8),
    creative_views AggregateFunction(countIf, UInt8),
    starts         AggregateFunction(countIf, UInt8),
    first_quartiles AggregateFunction(countIf, UInt8),
    midpoints      AggregateFunction(countIf, UInt8),
    third_quartiles AggregateFunction(countIf, UInt8),
    completes      AggregateFunction(countIf, UInt8),
    skips          AggregateFunction(countIf, UInt8),
    pauses         AggregateFunction(countIf, UInt8),
    resumes        AggregateFunction(countIf, UInt8),
    mutes          AggregateFunction(countIf, UInt8),
    unmutes        AggregateFunction(countIf, UInt8),
    closes         AggregateFunction(countIf, UInt8),
    errors         AggregateFunction(countIf, UInt8),
    click_playback_sum   AggregateFunction(sumIf, Float64, UInt8),
    click_playback_count AggregateFunction(countIf, UInt8)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (ad_id, hour)
SETTINGS index_granularity = 128;

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
GROUP BY ad_id, hour;
