-- The first UTC day with any event of any ad (0, i.e. 1970-01-01, when there is none): where
-- the window of GET /ads/analytics with timeframe=all and no adId starts.
SELECT toUInt32(min(day)) AS first_day FROM ad_stats_daily
