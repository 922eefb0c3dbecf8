-- One ad's VAST error events over the window [from, to), both on whole minutes, by error code,
-- most frequent first: the `errorCodes` of GET /ads/analytics for one ad. Exact: every minute of
-- the window is read from ad_errors_minutely, which holds a row only for minutes with errors.
-- Parameters (times as unix seconds): ad id, from, to. The sample is 21:17 on 31 March to 02:43
-- on 1 April 2024 UTC.
-- sample-params: '11111111-1111-1111-1111-111111111111', 1711919820, 1711939380
SELECT error_code, countMerge(errors) AS errors
FROM ad_errors_minutely
WHERE ad_id = ? AND minute >= ? AND minute < ?
GROUP BY error_code
ORDER BY errors DESC, error_code
