-- VAST error events per ad, UTC minute of event_time and error code: the `errorCodes` of
-- GET /ads/analytics. Errors are rare, so one table at minute precision answers any window
-- exactly without the day/hour decomposition of ad_stats_*: only minutes that had an error have
-- rows. Fed by the materialized view below on every insert into `events`; read with countMerge:
--   SELECT error_code, countMerge(errors) FROM ad_errors_minutely WHERE ad_id = '…'
--   GROUP BY error_code
--
-- Like every view, it sees only rows inserted after it exists: on a database that already held
-- events, backfill once with the view's SELECT (see docs/analysts.md).
CREATE TABLE IF NOT EXISTS ad_errors_minutely
(
    ad_id      UUID,
    minute     DateTime('UTC'),
    error_code UInt16,
    errors     AggregateFunction(count)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (ad_id, minute, error_code)
SETTINGS index_granularity = 256;

CREATE MATERIALIZED VIEW IF NOT EXISTS ad_errors_minutely_mv TO ad_errors_minutely AS
SELECT
    ad_id,
    toStartOfMinute(event_time) AS minute,
    error_code,
    countState() AS errors
FROM events
WHERE kind = 'error'
GROUP BY ad_id, minute, error_code;
