-- One ad's numbers over the window [from, to), both on whole minutes, per UTC hour and in total:
-- GET /ads/analytics for one ad: its series, totals, video funnel, filtered traffic and VAST
-- errors by code. One row per hour that has events, in order, with the counts array of ad_counts
-- (see 0008_ad_counts.sql: counts[1] is valid clicks with a playback position,
-- counts[1 + 15 * traffic + kind] the events of that traffic and kind), unique clicks, the sum of
-- click playback positions and the errors as (codes, counts); WITH TOTALS adds the window's
-- totals (ClickHouse's text and JSON formats print them after the rows, TSV after a blank line;
-- RowBinary does not print them).
-- Hours without events are absent; the service fills them with zeros.
--
-- Exact to the minute without reading raw events: the whole hours of the window come from the
-- table's 'hour' rows, the minutes before the first whole hour and after the last one from its
-- 'minute' rows, and each hour is read from one grain only. With
--   h_from = from rounded up to the hour, h_to = to rounded down to the hour,
-- the hour rows taken are [h_from, h_to) and the minute rows the minutes of [from, to) outside
-- it (when the window holds no whole hour, h_from >= h_to and every minute qualifies).
-- Unique clicks: each hour merges its uniq states; the totals row merges the hours' merged
-- states, so every state is decoded from disk once for both. That is why this one query gives
-- both: decoding aggregate states is what such a query spends its time on, and a separate totals
-- query (even one reading whole days) decoded as many states again.
--
-- Analysts get the same numbers with named columns from ad_stats_hourly, ad_stats_minutely,
-- ad_filtered_minutely and ad_errors_minutely (docs/analysts.md); this query reads ad_counts because on ClickHouse 18.16
-- the fixed cost per table and per column read outweighs the rows (see the migration).
--
-- Parameters (times as unix seconds): ad id, h_from, h_to, from, to, h_from, h_to. They are bare
-- literals, compared with the columns as they are (no toUUID/toDateTime around them): on
-- ClickHouse 18.16 every such call is evaluated again while the key condition is analysed, and the
-- bare form measured 7 % faster (6.9 against 7.5 ms, 300 alternating runs, 10 million events).
-- The sample is 21:17 on 31 March 2024 to 02:43 on 1 April 2024 UTC.
-- sample-params: '11111111-1111-1111-1111-111111111111', 1711922400, 1711936800, 1711919820, 1711939380, 1711922400, 1711936800
SELECT
    toStartOfHour(t) AS hour,
    sumForEachMerge(counts) AS counts,
    uniqIfMerge(unique_clicks) AS unique_clicks,
    sumIfMerge(click_playback_sum) AS click_playback_sum,
    sumMapIfMerge(error_codes) AS error_codes
FROM ad_counts
WHERE ad_id = ?
  AND ((grain = 'hour' AND t >= ? AND t < ?)
    OR (grain = 'minute' AND t >= ? AND t < ? AND (t < ? OR t >= ?)))
GROUP BY hour WITH TOTALS
ORDER BY hour
