-- One ad's totals over the window [from, to), both on whole minutes: the numbers of
-- GET /ads/analytics for one ad (every kind's count, unique clicks, click playback positions).
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
-- Parameters (times as unix seconds): ad id, d_from, d_to, ad id, h_from, h_to, d_from, d_to,
-- ad id, from, to, h_from, h_to. The sample is 21:17 on 31 March to 02:43 on 1 April 2024 UTC.
-- sample-params: '11111111-1111-1111-1111-111111111111', 1711922400, 1711922400, '11111111-1111-1111-1111-111111111111', 1711922400, 1711936800, 1711922400, 1711922400, '11111111-1111-1111-1111-111111111111', 1711919820, 1711939380, 1711922400, 1711936800
SELECT
    countIfMerge(impressions) AS impressions,
    countIfMerge(clicks) AS clicks,
    uniqIfMerge(unique_clicks) AS unique_clicks,
    countIfMerge(creative_views) AS creative_views,
    countIfMerge(starts) AS starts,
    countIfMerge(first_quartiles) AS first_quartiles,
    countIfMerge(midpoints) AS midpoints,
    countIfMerge(third_quartiles) AS third_quartiles,
    countIfMerge(completes) AS completes,
    countIfMerge(skips) AS skips,
    countIfMerge(pauses) AS pauses,
    countIfMerge(resumes) AS resumes,
    countIfMerge(mutes) AS mutes,
    countIfMerge(unmutes) AS unmutes,
    countIfMerge(closes) AS closes,
    countIfMerge(errors) AS errors,
    sumIfMerge(click_playback_sum) AS click_playback_sum,
    countIfMerge(click_playback_count) AS click_playback_count
FROM
(
    SELECT ad_id,
           impressions, clicks, unique_clicks, creative_views, starts, first_quartiles, midpoints,
           third_quartiles, completes, skips, pauses, resumes, mutes, unmutes, closes, errors,
           click_playback_sum, click_playback_count
    FROM ad_stats_daily
    WHERE ad_id = toUUID(?) AND day >= toDateTime(?) AND day < toDateTime(?)
    UNION ALL
    SELECT ad_id,
           impressions, clicks, unique_clicks, creative_views, starts, first_quartiles, midpoints,
           third_quartiles, completes, skips, pauses, resumes, mutes, unmutes, closes, errors,
           click_playback_sum, click_playback_count
    FROM ad_stats_hourly
    WHERE ad_id = toUUID(?) AND hour >= toDateTime(?) AND hour < toDateTime(?)
      AND (hour < toDateTime(?) OR hour >= toDateTime(?))
    UNION ALL
    SELECT ad_id,
           impressions, clicks, unique_clicks, creative_views, starts, first_quartiles, midpoints,
           third_quartiles, completes, skips, pauses, resumes, mutes, unmutes, closes, errors,
           click_playback_sum, click_playback_count
    FROM ad_stats_minutely
    WHERE ad_id = toUUID(?) AND minute >= toDateTime(?) AND minute < toDateTime(?)
      AND (minute < toDateTime(?) OR minute >= toDateTime(?))
)
