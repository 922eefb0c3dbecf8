-- Every ad in the catalog with its totals over the window [from, to), both on whole minutes,
-- busiest first: GET /ads/analytics without adId. Ads without events in the window are listed
-- with zeros; retired (inactive) ads are listed too, since their events still count.
--
-- Exact to the minute without reading raw events: the window is cut into whole UTC days (from
-- ad_stats_daily), the whole hours around them (ad_stats_hourly) and the minutes at its two
-- ends (ad_stats_minutely); every minute of the window is read from exactly one table. With
--   d_from/d_to = from rounded up / to rounded down to the day,
--   h_from/h_to = from rounded up / to rounded down to the hour,
-- days come from [d_from, d_to), hours from [h_from, h_to) outside the days, minutes from
-- [from, to) outside the hours. (A window without a whole day or hour has d_from >= d_to or
-- h_from >= h_to; the conditions then select nothing from that table and everything from the
-- finer one.) Unique clicks merge the uniq states of all three tables.
--
-- The service skips the days for windows of up to 31 days by passing d_from = d_to (both the
-- start of the window's first whole hour): merging a month of hourly uniq states measured
-- faster than a month of daily ones, whose larger states cost more to decode. Longer windows
-- read whole days, so that a year is 365 rows per ad, not 8,760.
--
-- Parameters (times as unix seconds): d_from, d_to, h_from, h_to, d_from, d_to, from, to,
-- h_from, h_to, then the paging offset and limit. The sample is 21:17 on 31 March to 02:43 on
-- 1 April 2024 UTC, first page of 100.
-- sample-params: 1711922400, 1711922400, 1711922400, 1711936800, 1711922400, 1711922400, 1711919820, 1711939380, 1711922400, 1711936800, 0, 100
SELECT
    id AS ad_id,
    latest_name AS name,
    latest_active AS active,
    impressions,
    clicks,
    unique_clicks
FROM
(
    SELECT id, argMax(name, version) AS latest_name, argMax(active, version) AS latest_active
    FROM ads
    GROUP BY id
) AS catalog
ANY LEFT JOIN
(
    SELECT
        ad_id AS id,
        countIfMerge(impressions) AS impressions,
        countIfMerge(clicks) AS clicks,
        uniqIfMerge(unique_clicks) AS unique_clicks
    FROM
    (
        SELECT ad_id, impressions, clicks, unique_clicks
        FROM ad_stats_daily
        WHERE day >= ? AND day < ?
        UNION ALL
        SELECT ad_id, impressions, clicks, unique_clicks
        FROM ad_stats_hourly
        WHERE hour >= ? AND hour < ?
          AND (hour < ? OR hour >= ?)
        UNION ALL
        SELECT ad_id, impressions, clicks, unique_clicks
        FROM ad_stats_minutely
        WHERE minute >= ? AND minute < ?
          AND (minute < ? OR minute >= ?)
    )
    GROUP BY ad_id
) AS stats USING id
ORDER BY clicks DESC, impressions DESC, id
LIMIT ?, ?
