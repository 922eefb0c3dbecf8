-- One ad's filtered traffic over the window [from, to), both on whole minutes, by reason
-- (duplicate, bot, empty_user_agent) and kind: the `traffic.filtered` of GET /ads/analytics for
-- one ad. Exact: every minute of the window is read from ad_filtered_minutely, which holds a row
-- only for minutes with filtered events. Parameters (times as unix seconds): ad id, from, to.
-- The sample is 21:17 on 31 March to 02:43 on 1 April 2024 UTC.
-- sample-params: '11111111-1111-1111-1111-111111111111', 1711919820, 1711939380
SELECT reason, kind, countMerge(events) AS events
FROM ad_filtered_minutely
WHERE ad_id = ? AND minute >= ? AND minute < ?
GROUP BY reason, kind
ORDER BY reason, kind
