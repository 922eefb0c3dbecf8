//! `GET /ads/analytics`: one ad's numbers over a window (totals, an hourly series, the video
//! funnel), or every ad's totals. Answered from the aggregate tables only (see
//! [`crate::store::analytics`]); counts are exact to the minute.

use std::{collections::BTreeMap, sync::Arc};

use poem_openapi::{ApiResponse, Object, OpenApi, Union, param::Query};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    ApiTags, State,
    auth::{Credentials, Scope, read_first},
    body::SerdeJson,
    error::ApiError,
};
use crate::{
    domain::{EventKind, Timeframe, Traffic, Window, WindowKind},
    store::analytics::{AdTotals, FilteredCount, HourStats, Stats},
};

/// Ads per page of the every-ad listing when `limit` is not given.
pub const DEFAULT_LIMIT: u64 = 100;
/// The largest page of the every-ad listing.
pub const MAX_LIMIT: u64 = 1000;

/// Clicks per impression; 0 when there are no impressions.
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

/// One UTC hour of the series.
#[derive(Debug, Object, Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct HourPoint {
    /// Start of the hour (UTC). The first and last hour may be partly outside the window; only
    /// their minutes inside it count.
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// Impressions in the hour.
    pub impressions: u64,
    /// Clicks in the hour.
    pub clicks: u64,
    /// Distinct clicking client IPs in the hour.
    pub unique_clicks: u64,
    /// clicks / impressions (0 without impressions).
    pub ctr: f64,
}

/// The video funnel over the window (VAST linear tracking events).
#[derive(Debug, Object, Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct VideoStats {
    /// Playback starts.
    pub starts: u64,
    /// 25 % reached.
    pub first_quartile: u64,
    /// 50 % reached.
    pub midpoint: u64,
    /// 75 % reached.
    pub third_quartile: u64,
    /// Played to the end.
    pub completes: u64,
    /// Skipped.
    pub skips: u64,
    /// completes / starts (0 without starts).
    pub completion_rate: f64,
    /// skips / starts (0 without starts).
    pub skip_rate: f64,
    /// Average playback position (seconds) of the clicks that reported one; null when none did.
    #[oai(nullable)]
    pub avg_click_playback_time: Option<f64>,
    /// creativeView events.
    pub creative_views: u64,
    /// Pauses.
    pub pauses: u64,
    /// Resumes.
    pub resumes: u64,
    /// Mutes.
    pub mutes: u64,
    /// Unmutes.
    pub unmutes: u64,
    /// Closes.
    pub closes: u64,
    /// VAST errors.
    pub errors: u64,
}

impl From<&Stats> for VideoStats {
    fn from(s: &Stats) -> Self {
        VideoStats {
            starts: s.starts,
            first_quartile: s.first_quartiles,
            midpoint: s.midpoints,
            third_quartile: s.third_quartiles,
            completes: s.completes,
            skips: s.skips,
            completion_rate: ratio(s.completes, s.starts),
            skip_rate: ratio(s.skips, s.starts),
            avg_click_playback_time: (s.click_playback_count > 0)
                .then(|| s.click_playback_sum / s.click_playback_count as f64),
            creative_views: s.creative_views,
            pauses: s.pauses,
            resumes: s.resumes,
            mutes: s.mutes,
            unmutes: s.unmutes,
            closes: s.closes,
            errors: s.errors,
        }
    }
}

/// VAST errors of one code over the window.
#[derive(Debug, Object, Serialize)]
pub struct ErrorCode {
    /// The VAST error code (900, "undefined error", when the player sent none).
    pub code: u16,
    /// Error events with that code.
    pub count: u64,
}

/// Counts of one slice of traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Object, Serialize)]
pub struct TrafficCounts {
    /// Impressions.
    pub impressions: u64,
    /// Clicks.
    pub clicks: u64,
    /// Events of every kind (impressions, clicks and video events).
    pub events: u64,
    /// clicks / impressions (0 without impressions).
    pub ctr: f64,
}

impl TrafficCounts {
    fn new(impressions: u64, clicks: u64, events: u64) -> TrafficCounts {
        TrafficCounts { impressions, clicks, events, ctr: ratio(clicks, impressions) }
    }

    fn plus(self, other: TrafficCounts) -> TrafficCounts {
        TrafficCounts::new(
            self.impressions + other.impressions,
            self.clicks + other.clicks,
            self.events + other.events,
        )
    }
}

/// Filtered traffic by reason.
#[derive(Debug, Default, Object, Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct FilteredTraffic {
    /// Repeats of a counted event of the same ad, client IP and kind within DEDUP_WINDOW.
    pub duplicate: TrafficCounts,
    /// User agents of declared bots, spiders and crawlers, and of non-browser HTTP tools.
    pub bot: TrafficCounts,
    /// Requests without a user agent.
    pub empty_user_agent: TrafficCounts,
}

/// Traffic quality over the window: what was accepted (gross), what counts (net: the numbers
/// everywhere else in this answer) and what was filtered out, by reason (general invalid
/// traffic and repeats). gross = net + every filtered reason.
#[derive(Debug, Object, Serialize)]
pub struct TrafficQuality {
    /// Every accepted event.
    pub gross: TrafficCounts,
    /// The events that count.
    pub net: TrafficCounts,
    /// The events that do not count, by reason.
    pub filtered: FilteredTraffic,
}

impl TrafficQuality {
    fn new(net: &Stats, filtered_rows: &[FilteredCount]) -> TrafficQuality {
        let mut filtered = FilteredTraffic::default();
        for row in filtered_rows {
            let slot = match row.reason {
                Traffic::Duplicate => &mut filtered.duplicate,
                Traffic::Bot => &mut filtered.bot,
                Traffic::EmptyUserAgent => &mut filtered.empty_user_agent,
                Traffic::Valid => continue,
            };
            let (impressions, clicks) = match row.kind {
                EventKind::Impression => (row.events, 0),
                EventKind::Click => (0, row.events),
                _ => (0, 0),
            };
            *slot = slot.plus(TrafficCounts::new(impressions, clicks, row.events));
        }
        let net = TrafficCounts::new(net.impressions, net.clicks, net.events());
        let gross = net.plus(filtered.duplicate).plus(filtered.bot).plus(filtered.empty_user_agent);
        TrafficQuality { gross, net, filtered }
    }
}

/// One ad's analytics over a window.
#[derive(Debug, Object, Serialize)]
#[oai(rename_all = "camelCase", example)]
#[serde(rename_all = "camelCase")]
pub struct AdAnalytics {
    /// The ad.
    pub ad_id: Uuid,
    /// `1h`, `24h`, `7d`, `30d`, `all`, or `custom` for from/to.
    pub timeframe: String,
    /// Start of the window (UTC, whole minute, inclusive). For `all`, the first hour with events.
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    /// End of the window (UTC, whole minute, exclusive).
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    /// Clicks.
    pub total_clicks: u64,
    /// Distinct clicking client IPs (keyed hashes). Exact below 65,536 distinct values apart
    /// from rare 32-bit hash collisions; above, an estimate within about 1 %.
    pub unique_clicks: u64,
    /// Impressions.
    pub impressions: u64,
    /// totalClicks / impressions as a fraction (0 without impressions).
    pub ctr: f64,
    /// Clicks per UTC hour of the day, "00" to "23", summed over the window (all 24 keys).
    pub hourly_clicks: BTreeMap<String, u64>,
    /// One entry per UTC hour of the window, in order; hours without events have zeros.
    pub series: Vec<HourPoint>,
    /// The video funnel.
    pub video: VideoStats,
    /// VAST error events by error code, most frequent first (their total is `video.errors`).
    pub error_codes: Vec<ErrorCode>,
    /// Gross, net and filtered counts: every other number here is net (valid traffic only).
    pub traffic: TrafficQuality,
}

/// One ad in the every-ad listing.
#[derive(Debug, Object, Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct AdTotalsItem {
    /// The ad.
    pub ad_id: Uuid,
    /// Its current name.
    pub name: String,
    /// False once the ad is retired; its events still count.
    pub active: bool,
    /// Impressions.
    pub impressions: u64,
    /// Clicks.
    pub clicks: u64,
    /// Distinct clicking client IPs.
    pub unique_clicks: u64,
    /// clicks / impressions (0 without impressions).
    pub ctr: f64,
}

impl From<AdTotals> for AdTotalsItem {
    fn from(a: AdTotals) -> Self {
        AdTotalsItem {
            ad_id: a.ad_id,
            name: a.name,
            active: a.active != 0,
            impressions: a.impressions,
            clicks: a.clicks,
            unique_clicks: a.unique_clicks,
            ctr: ratio(a.clicks, a.impressions),
        }
    }
}

/// Every ad's totals over a window, busiest first.
#[derive(Debug, Object, Serialize)]
#[oai(rename_all = "camelCase", example)]
#[serde(rename_all = "camelCase")]
pub struct AdsAnalytics {
    /// `1h`, `24h`, `7d`, `30d`, `all`, or `custom` for from/to.
    pub timeframe: String,
    /// Start of the window (UTC, whole minute, inclusive). For `all`, the first day with events.
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    /// End of the window (UTC, whole minute, exclusive).
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    /// Ads in the catalog (all pages).
    pub total: u64,
    /// Page size asked for.
    pub limit: u64,
    /// Ads skipped before this page.
    pub offset: u64,
    /// This page: by clicks, then impressions, descending, then by id. Ads without events in the
    /// window are listed with zeros.
    pub ads: Vec<AdTotalsItem>,
}

/// 14:00 to 16:00 UTC on 21 November 2025, the example window.
fn example_window() -> (OffsetDateTime, OffsetDateTime) {
    let from = OffsetDateTime::from_unix_timestamp(1_763_733_600).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    (from, from + time::Duration::hours(2))
}

impl poem_openapi::types::Example for AdAnalytics {
    fn example() -> Self {
        let (from, to) = example_window();
        let hour = |start, impressions, clicks, unique_clicks| HourPoint {
            start,
            impressions,
            clicks,
            unique_clicks,
            ctr: ratio(clicks, impressions),
        };
        let totals = Stats {
            impressions: 2000,
            clicks: 50,
            unique_clicks: 47,
            creative_views: 1990,
            starts: 1950,
            first_quartiles: 1700,
            midpoints: 1400,
            third_quartiles: 1200,
            completes: 1000,
            skips: 600,
            pauses: 120,
            resumes: 110,
            mutes: 80,
            unmutes: 30,
            closes: 40,
            errors: 12,
            click_playback_sum: 620.0,
            click_playback_count: 40,
        };
        let mut hourly_clicks: BTreeMap<String, u64> = (0..24).map(|h| (format!("{h:02}"), 0)).collect();
        hourly_clicks.insert("14".into(), 30);
        hourly_clicks.insert("15".into(), 20);
        let filtered = [FilteredCount { reason: Traffic::Bot, kind: EventKind::Impression, events: 35 }];
        AdAnalytics {
            ad_id: Uuid::from_u128(0x1111_1111_1111_1111_1111_1111_1111_1111),
            timeframe: "custom".into(),
            from,
            to,
            total_clicks: totals.clicks,
            unique_clicks: totals.unique_clicks,
            impressions: totals.impressions,
            ctr: ratio(totals.clicks, totals.impressions),
            hourly_clicks,
            series: vec![hour(from, 1200, 30, 29), hour(from + time::Duration::hours(1), 800, 20, 19)],
            video: VideoStats::from(&totals),
            error_codes: vec![ErrorCode { code: 402, count: 9 }, ErrorCode { code: 900, count: 3 }],
            traffic: TrafficQuality::new(&totals, &filtered),
        }
    }
}

impl poem_openapi::types::Example for AdsAnalytics {
    fn example() -> Self {
        let (from, to) = example_window();
        let ad = |n: u128, name: &str, impressions, clicks, unique_clicks| AdTotalsItem {
            ad_id: Uuid::from_u128(n * 0x1111_1111_1111_1111_1111_1111_1111_1111),
            name: name.into(),
            active: true,
            impressions,
            clicks,
            unique_clicks,
            ctr: ratio(clicks, impressions),
        };
        AdsAnalytics {
            timeframe: "custom".into(),
            from,
            to,
            total: 3,
            limit: 20,
            offset: 0,
            ads: vec![
                ad(1, "Winter Sale", 2000, 50, 47),
                ad(2, "Spring Collection", 900, 12, 12),
                ad(3, "Summer Deals", 0, 0, 0),
            ],
        }
    }
}

/// The two answers of `GET /ads/analytics`.
#[derive(Debug, Union, Serialize)]
#[oai(one_of)]
#[serde(untagged)]
pub enum AnalyticsBody {
    /// With `adId`.
    Ad(Box<AdAnalytics>),
    /// Without `adId`.
    Ads(AdsAnalytics),
}

/// Answer of `GET /ads/analytics`.
#[derive(Debug, ApiResponse)]
pub enum AnalyticsResponse {
    /// The numbers.
    #[oai(status = 200)]
    Ok(SerdeJson<AnalyticsBody>),
}

/// Analytics operations.
pub struct AnalyticsApi {
    /// Shared service state.
    pub state: Arc<State>,
}

fn parse_page(name: &str, text: Option<&str>, default: u64, (min, max): (u64, u64)) -> Result<u64, ApiError> {
    let Some(text) = text else { return Ok(default) };
    match text.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "{name} must be a whole number from {min} to {max}; got {text:?}"
        ))),
    }
}

fn parse_ad_id(camel: Option<&str>, snake: Option<&str>) -> Result<Option<Uuid>, ApiError> {
    let (name, text) = match (camel, snake) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give adId or ad_id, not both")),
        (Some(t), None) => ("adId", t),
        (None, Some(t)) => ("ad_id", t),
        (None, None) => return Ok(None),
    };
    Uuid::try_parse(text).map(Some).map_err(|_| {
        ApiError::bad_request(format!(
            "{name} must be a UUID such as 11111111-1111-1111-1111-111111111111; got {text:?}"
        ))
    })
}

/// The series with every hour of the window, zeros where the table has no row, and the
/// clicks per hour of the day.
fn fill_hours(window: &Window, rows: &[HourStats]) -> (Vec<HourPoint>, BTreeMap<String, u64>) {
    let mut by_hour = rows.iter().map(|r| (i64::from(r.hour), r)).peekable();
    // Summed by hour of the day first: the map's keys are made once, not once per hour.
    let mut clicks_by_hour_of_day = [0u64; 24];
    let mut series = Vec::with_capacity(window.hours().count());
    for start in window.hours() {
        let t = start.unix_timestamp();
        // Rows are ascending and inside the window, so one pass pairs them with the hours.
        while by_hour.next_if(|(h, _)| *h < t).is_some() {}
        let s = by_hour.next_if(|(h, _)| *h == t).map(|(_, s)| s.stats).unwrap_or_default();
        clicks_by_hour_of_day[usize::from(start.hour())] += s.clicks;
        series.push(HourPoint {
            start,
            impressions: s.impressions,
            clicks: s.clicks,
            unique_clicks: s.unique_clicks,
            ctr: ratio(s.clicks, s.impressions),
        });
    }
    let hourly_clicks =
        clicks_by_hour_of_day.iter().enumerate().map(|(h, &c)| (format!("{h:02}"), c)).collect();
    (series, hourly_clicks)
}

#[OpenApi(tag = "ApiTags::Analytics")]
impl AnalyticsApi {
    /// Analytics of one ad, or of every ad.
    ///
    /// The window is `timeframe` (a rolling 1h, 24h, 7d or 30d ending at the end of the current
    /// minute, or all), or `from` (and optionally `to`), RFC 3339 times on whole minutes; the
    /// default is 24h. Every count is exact for events with event_time in [from, to). With
    /// `adId`: totals, an hourly series and the video funnel. Without: every ad's totals,
    /// busiest first, paged with `limit` and `offset`. Needs the read scope when API keys are
    /// configured. Answered from pre-aggregated tables,
    /// typically in milliseconds; an event shows here within FLUSH_INTERVAL + 1 s.
    #[oai(path = "/ads/analytics", method = "get", operation_id = "getAnalytics", transform = "read_first")]
    #[allow(clippy::too_many_arguments)]
    async fn analytics(
        &self,
        auth: Credentials,
        /// The ad; omit for every ad.
        #[oai(name = "adId")]
        ad_id: Query<Option<String>>,
        /// Alternative spelling of `adId`.
        #[oai(name = "ad_id")]
        ad_id_snake: Query<Option<String>>,
        /// `1h`, `24h` (default), `7d`, `30d` or `all`.
        timeframe: Query<Option<String>>,
        /// Window start, RFC 3339 on a whole minute (e.g. 2026-11-21T10:15:00Z); instead of timeframe.
        from: Query<Option<String>>,
        /// Window end (exclusive), RFC 3339 on a whole minute; default: the end of the current minute.
        to: Query<Option<String>>,
        /// Listing page size, 1 to 1000 (default 100); only without adId.
        limit: Query<Option<String>>,
        /// Ads to skip in the listing (default 0); only without adId.
        offset: Query<Option<String>>,
    ) -> Result<AnalyticsResponse, ApiError> {
        let st = &self.state;
        st.api_keys.require(&auth, Scope::Read)?;
        let ad = parse_ad_id(ad_id.0.as_deref(), ad_id_snake.0.as_deref())?;
        let window = Window::resolve(
            timeframe.0.as_deref(),
            from.0.as_deref(),
            to.0.as_deref(),
            OffsetDateTime::now_utc(),
            ad.is_some().then_some(st.raw_retention_months),
        )
        .map_err(ApiError::bad_request)?;
        let unavailable = |e| ApiError::storage(e, st.retry_after);
        let body = match ad {
            Some(ad) => {
                if limit.0.is_some() || offset.0.is_some() {
                    return Err(ApiError::bad_request(
                        "limit and offset page the listing of every ad; leave them out with adId",
                    ));
                }
                match st.catalog.get(ad).await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(ApiError::not_found(format!("ad {ad} not found"))),
                    Err(e) => return Err(unavailable(e)),
                }
                AnalyticsBody::Ad(Box::new(self.one_ad(ad, window).await.map_err(unavailable)?))
            }
            None => {
                let limit = parse_page("limit", limit.0.as_deref(), DEFAULT_LIMIT, (1, MAX_LIMIT))?;
                let offset = parse_page("offset", offset.0.as_deref(), 0, (0, u64::from(u32::MAX)))?;
                AnalyticsBody::Ads(self.every_ad(window, limit, offset).await.map_err(unavailable)?)
            }
        };
        Ok(AnalyticsResponse::Ok(SerdeJson(body)))
    }
}

impl AnalyticsApi {
    async fn one_ad(&self, ad: Uuid, mut window: Window) -> Result<AdAnalytics, crate::store::StoreError> {
        let cuts = window.cuts();
        let analytics = &self.state.analytics;
        // Series, totals, filtered traffic and errors come from one query (see ad_series.sql).
        let found = analytics.ad_window(ad, &cuts).await?;
        let (rows, totals, filtered, errors) = (found.hours, found.totals, found.filtered, found.errors);
        if window.kind == WindowKind::Timeframe(Timeframe::All) {
            // All time starts at the first hour with counted (valid) events (or is empty without
            // any); ad_counts also has hours with filtered traffic only.
            window.from = rows
                .iter()
                .find(|r| r.stats.events() > 0)
                .and_then(|r| OffsetDateTime::from_unix_timestamp(i64::from(r.hour)).ok())
                .unwrap_or(window.to);
        }
        let (series, hourly_clicks) = fill_hours(&window, &rows);
        Ok(AdAnalytics {
            ad_id: ad,
            timeframe: window.kind.to_string(),
            from: window.from,
            to: window.to,
            total_clicks: totals.clicks,
            unique_clicks: totals.unique_clicks,
            impressions: totals.impressions,
            ctr: ratio(totals.clicks, totals.impressions),
            hourly_clicks,
            series,
            video: VideoStats::from(&totals),
            error_codes: errors
                .into_iter()
                .map(|e| ErrorCode { code: e.error_code, count: e.errors })
                .collect(),
            traffic: TrafficQuality::new(&totals, &filtered),
        })
    }

    async fn every_ad(
        &self,
        mut window: Window,
        limit: u64,
        offset: u64,
    ) -> Result<AdsAnalytics, crate::store::StoreError> {
        let cuts = window.cuts();
        let analytics = &self.state.analytics;
        let all = window.kind == WindowKind::Timeframe(Timeframe::All);
        let first_day = async { if all { analytics.first_event_day().await } else { Ok(None) } };
        let (ads, total, first_day) =
            tokio::try_join!(analytics.ads_totals(&cuts, offset, limit), analytics.ads_count(), first_day)?;
        if all {
            // Not after `to`: the first day can be tomorrow's when its only events so far carry
            // client times a few minutes ahead (at most MAX_CLOCK_SKEW).
            window.from = first_day.unwrap_or(window.to).min(window.to);
        }
        Ok(AdsAnalytics {
            timeframe: window.kind.to_string(),
            from: window.from,
            to: window.to,
            total,
            limit,
            offset,
            ads: ads.into_iter().map(AdTotalsItem::from).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    /// The answer is written by serde ([`SerdeJson`]) but documented by poem-openapi's schema:
    /// both must give the same JSON, nulls, rates and times included.
    #[test]
    fn serde_writes_what_the_openapi_schema_describes() {
        use poem_openapi::types::{Example, ToJSON};
        let mut ad = AdAnalytics::example();
        let mut quiet = AdAnalytics::example();
        quiet.video = VideoStats::from(&Stats::default());
        quiet.series.clear();
        quiet.error_codes.clear();
        ad.from += time::Duration::nanoseconds(1_500);
        let answers = [
            AnalyticsBody::Ad(Box::new(ad)),
            AnalyticsBody::Ad(Box::new(quiet)),
            AnalyticsBody::Ads(AdsAnalytics::example()),
        ];
        let written: Vec<serde_json::Value> = answers
            .iter()
            .map(|answer| {
                let by_serde = serde_json::to_value(answer).unwrap();
                assert_eq!(Some(&by_serde), answer.to_json().as_ref());
                by_serde
            })
            .collect();
        // The cases the comparison must cover: a null, a number, sub-second times.
        assert_eq!(written[1]["video"]["avgClickPlaybackTime"], serde_json::Value::Null);
        assert!(written[0]["video"]["avgClickPlaybackTime"].is_f64());
        assert!(written[0]["from"].as_str().unwrap().contains(".0000015"), "{}", written[0]["from"]);
    }

    #[test]
    fn hours_without_rows_are_zeros_and_hour_of_day_sums_across_days() {
        let window = Window {
            kind: WindowKind::Custom,
            from: datetime!(2026-10-31 22:30 UTC),
            to: datetime!(2026-11-01 23:15 UTC),
        };
        let row = |t: OffsetDateTime, clicks| HourStats {
            hour: t.unix_timestamp() as u32,
            stats: Stats { clicks, impressions: 4, ..Stats::default() },
        };
        let rows = [row(datetime!(2026-10-31 22:00 UTC), 1), row(datetime!(2026-11-01 22:00 UTC), 2)];
        let (series, by_hour) = fill_hours(&window, &rows);
        assert_eq!(series.len(), 26);
        assert_eq!(series[0].start, datetime!(2026-10-31 22:00 UTC));
        assert_eq!((series[0].clicks, series[0].ctr), (1, 0.25));
        assert_eq!((series[1].clicks, series[1].impressions, series[1].ctr), (0, 0, 0.0));
        assert_eq!(series[24].clicks, 2);
        assert_eq!(by_hour.len(), 24);
        assert_eq!(by_hour["22"], 3);
        assert_eq!(by_hour["00"], 0);
    }

    #[test]
    fn query_parameters_are_checked() {
        assert!(parse_ad_id(Some("x"), None).is_err());
        assert!(parse_ad_id(Some("11111111-1111-1111-1111-111111111111"), Some("x")).is_err());
        assert_eq!(parse_ad_id(None, None).ok(), Some(None));
        assert!(parse_page("limit", Some("-1"), 100, (1, 1000)).is_err());
        assert!(parse_page("limit", Some("0"), 100, (1, 1000)).is_err());
        let Err(ApiError::BadRequest(e)) = parse_page("limit", Some("1001"), 100, (1, 1000)) else {
            panic!()
        };
        assert!(e.0.error.contains("from 1 to 1000"), "{}", e.0.error);
        assert_eq!(parse_page("limit", None, 100, (1, 1000)).ok(), Some(100));
    }
}
