-- Drops one month of raw `events` (its partition, a YYYYMM number). Run by the raw-retention task
-- for months entirely older than RAW_RETENTION_MONTHS; the aggregates (ad_stats_*) keep their
-- counts. Dropping a month that holds nothing is harmless, so instances may race on it.
-- Parameter: the month as YYYYMM.
-- sample-params: 190001
ALTER TABLE events DROP PARTITION ?
