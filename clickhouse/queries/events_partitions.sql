-- The monthly partitions of raw `events` that hold data, as YYYYMM numbers, oldest first. Raw
-- retention (RAW_RETENTION_MONTHS) drops the ones entirely older than the retention with
-- drop_events_partition.sql; the aggregate tables keep every month.
SELECT DISTINCT toUInt32(partition) AS month
FROM system.parts
WHERE database = currentDatabase() AND table = 'events' AND active
ORDER BY month
