-- The table GET /ads/analytics reads for one ad: per ad, per UTC hour and per UTC minute of
-- event_time, the counts of every (traffic, kind) in one array, unique clicking IP hashes, the
-- playback positions of clicks and the VAST errors by code. It holds the same numbers as
-- ad_stats_hourly, ad_stats_minutely, ad_filtered_minutely and ad_errors_minutely together;
-- analysts should read those (named columns); this one is shaped for the service's one query
-- (clickhouse/queries/ad_series.sql).
--
-- Why a second copy: on ClickHouse 18.16 a query's cost is dominated by fixed work per table,
-- per column and per part read (analysing the query, a stat() of every column file of every
-- part, a reader per column), not by the few thousand rows a one-ad answer needs. The named
-- tables made an answer read 20 columns from each of two tables, a third table for the
-- filtered traffic and a fourth for the errors; this one answers all of it from 5 columns of one
-- table: the three queries of a 30-day answer took 15.9 ms (p50), the series and errors queries
-- that followed 11.1 ms (150 alternating runs, 10 million events); with the errors read from
-- here too, one query took 5.0 ms against 5.3 for those two sent concurrently, 7.2 against
-- 8.0 ms at p99 (300 alternating runs on another day), and one query less of ClickHouse's CPU.
--
--   grain   'hour' rows cover whole UTC hours, 'minute' rows single minutes. Every event is
--           counted once in each grain; a window is read as its whole hours from 'hour' rows and
--           its remaining minutes at the two ends from 'minute' rows.
--   counts  AggregateFunction(sumForEach, Array(UInt64)), read with sumForEachMerge(counts):
--             counts[1]                          valid clicks that reported a playback position
--             counts[1 + 15 * traffic + kind]    events of that traffic and kind
--           with traffic and kind the Enum8 numbers of `events` (traffic: valid 0, duplicate 1,
--           bot 2, empty_user_agent 3; kind: impression 1 … error 15). So counts[2] is valid
--           impressions, counts[3] valid clicks, counts[16] valid errors, counts[17] duplicate
--           impressions, counts[61] empty-user-agent errors. Each row's array is as long as its
--           highest non-zero position; sumForEachMerge pads the shorter ones with zeros.
--   unique_clicks       distinct ip_hash among the valid clicks (uniqIfMerge).
--   click_playback_sum  sum of playback_time over the valid clicks that had one (sumIfMerge).
--   error_codes         valid VAST error events by error_code: sumMapIfMerge(error_codes) gives
--                       the tuple (codes ascending, their counts).
--
-- On a database that already holds aggregates, the two INSERTs below copy them in from the
-- named tables (every hour and minute the named tables hold, also those whose raw events
-- retention has dropped). Each copies only while its grain is still empty, so a re-run after an
-- interruption does not count anything twice (one interrupted in the middle of its INSERT would
-- leave that grain short: run it on a quiet database, as below). The view comes last, so the copy
-- and the view never both count an event. An event inserted by another running instance between
-- the copy and the view would be missing: the service applies this migration by itself only to a
-- database without events, and otherwise asks for `adbeacon migrate` while no instance inserts.
CREATE TABLE IF NOT EXISTS ad_counts
(
    ad_id              UUID,
    grain              Enum8('minute' = 1, 'hour' = 2),
    t                  DateTime('UTC'),
    counts             AggregateFunction(sumForEach, Array(UInt64)),
    unique_clicks      AggregateFunction(uniqIf, UInt64, UInt8),
    click_playback_sum AggregateFunction(sumIf, Float64, UInt8),
    error_codes        AggregateFunction(sumMapIf, Array(UInt16), Array(UInt64), UInt8)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(t)
ORDER BY (ad_id, grain, t)
SETTINGS index_granularity = 256;

INSERT INTO ad_counts
SELECT ad_id, CAST('hour' AS Enum8('minute' = 1, 'hour' = 2)) AS grain, t,
       sumForEachState(counts), uniqIfMergeState(unique_clicks), sumIfMergeState(click_playback_sum),
       sumMapIfMergeState(error_codes)
FROM
(
    SELECT ad_id, hour AS t,
           [countIfMerge(click_playback_count), countIfMerge(impressions), countIfMerge(clicks),
            countIfMerge(creative_views), countIfMerge(starts), countIfMerge(first_quartiles),
            countIfMerge(midpoints), countIfMerge(third_quartiles), countIfMerge(completes),
            countIfMerge(skips), countIfMerge(pauses), countIfMerge(resumes), countIfMerge(mutes),
            countIfMerge(unmutes), countIfMerge(closes), countIfMerge(errors)] AS counts,
           uniqIfMergeState(unique_clicks) AS unique_clicks,
           sumIfMergeState(click_playback_sum) AS click_playback_sum,
           sumMapIfState(emptyArrayUInt16(), emptyArrayUInt64(), toUInt8(0)) AS error_codes
    FROM ad_stats_hourly
    GROUP BY ad_id, hour
    UNION ALL
    SELECT ad_id, toStartOfHour(minute) AS t,
           arrayPushBack(arrayResize([toUInt64(0)], 15 * toInt8(reason) + toInt8(kind)), countMerge(events)) AS counts,
           uniqIfState(toUInt64(0), toUInt8(0)) AS unique_clicks,
           sumIfState(toFloat64(0), toUInt8(0)) AS click_playback_sum,
           sumMapIfState(emptyArrayUInt16(), emptyArrayUInt64(), toUInt8(0)) AS error_codes
    FROM ad_filtered_minutely
    GROUP BY ad_id, t, reason, kind
    UNION ALL
    SELECT ad_id, toStartOfHour(minute) AS t, emptyArrayUInt64() AS counts,
           uniqIfState(toUInt64(0), toUInt8(0)) AS unique_clicks,
           sumIfState(toFloat64(0), toUInt8(0)) AS click_playback_sum,
           sumMapIfState([error_code], [n], toUInt8(1)) AS error_codes
    FROM
    (
        SELECT ad_id, minute, error_code, countMerge(errors) AS n
        FROM ad_errors_minutely
        GROUP BY ad_id, minute, error_code
    )
    GROUP BY ad_id, t
)
WHERE (SELECT count() FROM ad_counts WHERE grain = 'hour') = 0
GROUP BY ad_id, t;

INSERT INTO ad_counts
SELECT ad_id, CAST('minute' AS Enum8('minute' = 1, 'hour' = 2)) AS grain, t,
       sumForEachState(counts), uniqIfMergeState(unique_clicks), sumIfMergeState(click_playback_sum),
       sumMapIfMergeState(error_codes)
FROM
(
    SELECT ad_id, minute AS t,
           [countIfMerge(click_playback_count), countIfMerge(impressions), countIfMerge(clicks),
            countIfMerge(creative_views), countIfMerge(starts), countIfMerge(first_quartiles),
            countIfMerge(midpoints), countIfMerge(third_quartiles), countIfMerge(completes),
            countIfMerge(skips), countIfMerge(pauses), countIfMerge(resumes), countIfMerge(mutes),
            countIfMerge(unmutes), countIfMerge(closes), countIfMerge(errors)] AS counts,
           uniqIfMergeState(unique_clicks) AS unique_clicks,
           sumIfMergeState(click_playback_sum) AS click_playback_sum,
           sumMapIfState(emptyArrayUInt16(), emptyArrayUInt64(), toUInt8(0)) AS error_codes
    FROM ad_stats_minutely
    GROUP BY ad_id, minute
    UNION ALL
    SELECT ad_id, minute AS t,
           arrayPushBack(arrayResize([toUInt64(0)], 15 * toInt8(reason) + toInt8(kind)), countMerge(events)) AS counts,
           uniqIfState(toUInt64(0), toUInt8(0)) AS unique_clicks,
           sumIfState(toFloat64(0), toUInt8(0)) AS click_playback_sum,
           sumMapIfState(emptyArrayUInt16(), emptyArrayUInt64(), toUInt8(0)) AS error_codes
    FROM ad_filtered_minutely
    GROUP BY ad_id, minute, reason, kind
    UNION ALL
    SELECT ad_id, minute AS t, emptyArrayUInt64() AS counts,
           uniqIfState(toUInt64(0), toUInt8(0)) AS unique_clicks,
           sumIfState(toFloat64(0), toUInt8(0)) AS click_playback_sum,
           sumMapIfState([error_code], [n], toUInt8(1)) AS error_codes
    FROM
    (
        SELECT ad_id, minute, error_code, countMerge(errors) AS n
        FROM ad_errors_minutely
        GROUP BY ad_id, minute, error_code
    )
    GROUP BY ad_id, t
)
WHERE (SELECT count() FROM ad_counts WHERE grain = 'minute') = 0
GROUP BY ad_id, t;

-- One view fills both grains: each event is counted once as its minute and once as its hour
-- (arrayJoin makes the two rows). One view, not one per grain, because on current servers the
-- insert deduplication token (clickhouse/dedup/enable.sql) also names the blocks a view writes,
-- and before ClickHouse 24.7 two views writing the same table under one token could have their
-- blocks taken for repeats of each other. It also costs less: 2.6 to 3.7 s per 4 million events
-- against 3.1 to 3.6 s for two views (and 7.4 once, cold).
--
-- Each event's array: arrayResize pads [playback flag] with zeros up to 15 * traffic + kind
-- elements and arrayPushBack appends its 1, so the 1 lands at 1 + 15 * traffic + kind. Short
-- arrays built this way made a grain's SELECT cost 1.6 s per 10 million events, less than the
-- 2.5 s of ad_stats_minutely's (a 61-element array per event cost 8.2 s). The errors by code
-- (sumMapIf, which skips the other events) added 0.1 to 0.2 s per 10 million events to the
-- SELECT of both grains (1.43 to 1.47 s without, 1.55 to 1.70 s with; FORMAT Null on 18.16).
CREATE MATERIALIZED VIEW IF NOT EXISTS ad_counts_mv TO ad_counts AS
SELECT
    ad_id,
    arrayJoin([CAST('minute' AS Enum8('minute' = 1, 'hour' = 2)), CAST('hour' AS Enum8('minute' = 1, 'hour' = 2))]) AS grain,
    if(grain = 'hour', toStartOfHour(event_time), toStartOfMinute(event_time)) AS t,
    sumForEachState(arrayPushBack(
        arrayResize([toUInt64(traffic = 'valid' AND kind = 'click' AND isNotNull(playback_time))],
                    15 * toInt8(traffic) + toInt8(kind)),
        toUInt64(1))) AS counts,
    uniqIfState(ip_hash, traffic = 'valid' AND kind = 'click') AS unique_clicks,
    sumIfState(toFloat64(ifNull(playback_time, 0)), traffic = 'valid' AND kind = 'click' AND isNotNull(playback_time)) AS click_playback_sum,
    sumMapIfState([error_code], [toUInt64(1)], traffic = 'valid' AND kind = 'error') AS error_codes
FROM events
GROUP BY ad_id, grain, t;
