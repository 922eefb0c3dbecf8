-- One ad's impressions, clicks and unique clicks per UTC hour over the window [from, to), both
-- on whole minutes: the `series` of GET /ads/analytics for one ad (its totals and the video
-- funnel come from ad_totals.sql). Only the three columns the series shows are read: decoding
-- aggregate states is what such a query spends its time on.
--
-- Exact to the minute without reading raw events: the whole hours of the window come from
-- ad_stats_hourly, the minutes before the first whole hour and after the last one from
-- ad_stats_minutely, and each hour is read from one table only. With
--   h_from = from rounded up to the hour, h_to = to rounded down to the hour,
-- the hourly branch takes [h_from, h_to) and the minute branch takes the minutes of [from, to)
-- outside it (when the window holds no whole hour, h_from >= h_to and every minute qualifies).
-- Hours without events are absent; the service fills them with zeros.
--
-- Parameters (times as unix seconds): ad id, h_from, h_to, ad id, from, to, h_from, h_to.
-- The sample is 21:17 on 31 March 2024 to 02:43 on 1 April 2024 UTC.
-- sample-params: '11111111-1111-1111-1111-111111111111', 1711922400, 1711936800, '11111111-1111-1111-1111-111111111111', 1711919820, 1711939380, 1711922400, 1711936800
SELECT
    hour,
    countIfMerge(impressions) AS impressions,
    countIfMerge(clicks) AS clicks,
    uniqIfMerge(unique_clicks) AS unique_clicks
FROM
(
    SELECT hour, impressions, clicks, unique_clicks
    FROM ad_stats_hourly
    WHERE ad_id = toUUID(?) AND hour >= toDateTime(?) AND hour < toDateTime(?)
    UNION ALL
    SELECT toStartOfHour(minute) AS hour, impressions, clicks, unique_clicks
    FROM ad_stats_minutely
    WHERE ad_id = toUUID(?) AND minute >= toDateTime(?) AND minute < toDateTime(?)
      AND (minute < toDateTime(?) OR minute >= toDateTime(?))
)
GROUP BY hour
ORDER BY hour
