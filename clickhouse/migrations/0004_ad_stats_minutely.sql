-- Per ad and UTC minute of event_time: the same columns as ad_stats_hourly (every kind's count,
-- unique clicking IP hashes, the playback position of clicks), one minute finer. Analytics
-- windows are exact to the minute: whole hours (and days) come from the coarser tables, and
-- only the minutes at the two ends of a window are read from here. Fed by the materialized
-- view below on every insert into `events`; read with the -Merge combinators.
--
-- Small granules (256 rows): a query reads a few edge minutes of one ad, and decoding aggregate states
-- of rows it does not need is most of what a large granule would cost.
--
-- Like every view, it sees only rows inserted after it exists: on a database that already
-- held events, backfill once with the view's SELECT (see docs/analysts.md).
CREATE TABLE IF NOT EXISTS ad_stats_minutely
(
    ad_id          UUID,
    minute         DateTime('UTC'),
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
PARTITION BY toYYYYMM(minute)
ORDER BY (ad_id, minute)
SETTINGS index_granularity = 256;

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
GROUP BY ad_id, minute;
