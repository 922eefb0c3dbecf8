//! Analytics windows: which span of event times a question is about.
//!
//! A window is `[from, to)` on whole UTC minutes, because the finest aggregate table
//! (`ad_stats_minutely`) is per minute: every count is then exact, not rounded to hours. A rolling
//! timeframe ends at the end of the current minute, so an event accepted a moment ago is inside.
//! [`Cuts`] splits a window into the whole days, whole hours and loose minutes that the queries
//! in `clickhouse/queries/` read from the daily, hourly and minute tables.

use std::fmt;

use time::{Duration, OffsetDateTime, format_description::well_known::Rfc3339};

/// A named rolling window ending now, or all time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeframe {
    /// The last hour.
    Hour,
    /// The last 24 hours.
    Day,
    /// The last 7 days.
    Week,
    /// The last 30 days.
    Month,
    /// Everything ever recorded.
    All,
}

impl Timeframe {
    /// The accepted names, as the API spells them.
    pub const NAMES: &'static str = "1h, 24h, 7d, 30d, all";

    /// Parses `1h`, `24h`, `7d`, `30d` or `all`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "1h" => Ok(Self::Hour),
            "24h" => Ok(Self::Day),
            "7d" => Ok(Self::Week),
            "30d" => Ok(Self::Month),
            "all" => Ok(Self::All),
            other => Err(format!("timeframe must be one of {}; got {other:?}", Self::NAMES)),
        }
    }

    /// The name, as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hour => "1h",
            Self::Day => "24h",
            Self::Week => "7d",
            Self::Month => "30d",
            Self::All => "all",
        }
    }

    /// How far back the window reaches; `None` for all time.
    pub fn length(self) -> Option<Duration> {
        match self {
            Self::Hour => Some(Duration::hours(1)),
            Self::Day => Some(Duration::days(1)),
            Self::Week => Some(Duration::days(7)),
            Self::Month => Some(Duration::days(30)),
            Self::All => None,
        }
    }
}

/// What the caller asked for: a timeframe, or explicit bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// A named timeframe.
    Timeframe(Timeframe),
    /// Explicit `from`/`to`.
    Custom,
}

impl fmt::Display for WindowKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Timeframe(t) => t.as_str(),
            Self::Custom => "custom",
        })
    }
}

/// `[from, to)` on whole UTC minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// What the caller asked for.
    pub kind: WindowKind,
    /// First minute inside the window. For [`Timeframe::All`] this is the Unix epoch until the
    /// caller narrows it to the first event.
    pub from: OffsetDateTime,
    /// First minute after the window.
    pub to: OffsetDateTime,
}

/// Windows longer than this read whole days from `ad_stats_daily`; shorter ones read hours.
pub const WHOLE_DAYS_BEYOND: Duration = Duration::days(31);

/// The earliest and latest instants a ClickHouse `DateTime` holds.
const FIRST: i64 = 0;
const LAST: i64 = u32::MAX as i64 - 59;

/// `t` rounded down to `step` seconds (UTC).
fn floor(t: i64, step: i64) -> i64 {
    t.div_euclid(step) * step
}

/// `t` rounded up to `step` seconds (UTC).
fn ceil(t: i64, step: i64) -> i64 {
    -floor(-t, step)
}

fn at(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The end of the minute `now` is in (or `now` itself on a whole minute).
pub fn end_of_minute(now: OffsetDateTime) -> OffsetDateTime {
    let t = now.unix_timestamp() + i64::from(now.nanosecond() > 0);
    at(ceil(t, 60))
}

/// `t` moved back by `months` calendar months, the day clamped to the target month's length.
pub fn months_before(t: OffsetDateTime, months: u32) -> OffsetDateTime {
    let total = i64::from(t.year()) * 12 + i64::from(u8::from(t.month()) - 1) - i64::from(months);
    let year = total.div_euclid(12) as i32;
    let month = time::Month::try_from((total.rem_euclid(12) + 1) as u8).unwrap_or(time::Month::January);
    let day = t.day().min(month.length(year));
    time::Date::from_calendar_date(year, month, day)
        .map(|d| d.with_time(t.time()).assume_utc())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn parse_bound(name: &str, text: &str) -> Result<OffsetDateTime, String> {
    // An offset's `+` that the URL did not encode arrives as a space (`…T10:15:00 01:00`).
    let plus = match (text.get(..19), text.get(19..)) {
        (Some(head), Some(tail)) if tail.contains(' ') => {
            Some(format!("{head}{}", tail.replacen(' ', "+", 1)))
        }
        _ => None,
    };
    let t = OffsetDateTime::parse(plus.as_deref().unwrap_or(text), &Rfc3339).map_err(|_| {
        format!(
            "{name} must be an RFC 3339 time such as 2026-11-21T10:15:00Z (encode an offset's + as \
             %2B); got {text:?}"
        )
    })?;
    if t.second() != 0 || t.nanosecond() != 0 {
        return Err(format!(
            "{name} must be on a whole minute (analytics are exact to the minute), such as \
             2026-11-21T10:15:00Z; got {text:?}"
        ));
    }
    let unix = t.unix_timestamp();
    if !(FIRST..=LAST).contains(&unix) {
        return Err(format!("{name} must lie between 1970-01-01 and 2106-02-07; got {text:?}"));
    }
    Ok(t.to_offset(time::UtcOffset::UTC))
}

impl Window {
    /// Resolves the query parameters at `now`. Without a timeframe or `from`, the last 24 hours;
    /// `from` without `to` runs to the end of the current minute. With `max_months` (one ad's
    /// analytics, whose series has an entry per hour), a custom window may not be longer than
    /// that many months (`RAW_RETENTION_MONTHS`); without it (the listing of every ad, a page of
    /// totals whatever the window), any window goes, so that the `from` and `to` of `all`,
    /// which the aggregates keep past the raw retention, can page one ranking.
    pub fn resolve(
        timeframe: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
        now: OffsetDateTime,
        max_months: Option<u32>,
    ) -> Result<Window, String> {
        let end = end_of_minute(now);
        if timeframe.is_some() && (from.is_some() || to.is_some()) {
            return Err("give either timeframe or from/to, not both".into());
        }
        let Some(from) = from else {
            if to.is_some() {
                return Err("to needs from: give from (and optionally to), or a timeframe".into());
            }
            let tf = timeframe.map(Timeframe::parse).transpose()?.unwrap_or(Timeframe::Day);
            let from = tf.length().map_or(OffsetDateTime::UNIX_EPOCH, |len| end - len);
            return Ok(Window { kind: WindowKind::Timeframe(tf), from, to: end });
        };
        let from = parse_bound("from", from)?;
        let to = to.map(|t| parse_bound("to", t)).transpose()?.unwrap_or(end);
        if from >= to {
            return Err(format!("from ({}) must be before to ({})", rfc3339(from), rfc3339(to)));
        }
        if let Some(months) = max_months
            && from < months_before(to, months)
        {
            return Err(format!(
                "the window from {} to {} is longer than the raw-event retention of {months} months, \
                 the longest of one ad's hourly series; ask for a shorter window, or timeframe=all \
                 for the ad's whole life",
                rfc3339(from),
                rfc3339(to)
            ));
        }
        Ok(Window { kind: WindowKind::Custom, from, to })
    }

    /// Where the window splits into days, hours and minutes. Windows of up to
    /// [`WHOLE_DAYS_BEYOND`] read no days (`d_from = d_to`): a month of hourly uniq states
    /// measured faster to merge than a month of daily ones, whose larger states cost more to
    /// decode; longer windows read days so that a year stays 365 rows per ad.
    pub fn cuts(&self) -> Cuts {
        let (from, to) = (self.from.unix_timestamp(), self.to.unix_timestamp());
        // Rounded up no further than `to`: past it the window holds no whole hour (day) either
        // way, and near the end of what ClickHouse's DateTime holds (2106-02-07 06:28:15) a
        // bound rounded past it would wrap around to 1970 in 18.16's toDateTime and select
        // every hour before the window.
        let (h_from, h_to) = (ceil(from, 3600).min(to), floor(to, 3600));
        let (d_from, d_to) = if to - from <= WHOLE_DAYS_BEYOND.whole_seconds() {
            (h_from, h_from)
        } else {
            (ceil(from, 86_400).min(to), floor(to, 86_400))
        };
        Cuts { from, to, h_from, h_to, d_from, d_to }
    }

    /// The start of every UTC hour the window touches, in order.
    pub fn hours(&self) -> impl Iterator<Item = OffsetDateTime> + use<> {
        let end = self.to.unix_timestamp();
        // An empty window (`all` before any event: from = to) touches no hour, even when `to`
        // is inside one.
        let first = if self.from < self.to { floor(self.from.unix_timestamp(), 3600) } else { end };
        (0..).map(move |i| first + i * 3600).take_while(move |&h| h < end).map(at)
    }
}

/// RFC 3339 text of a UTC time, for messages.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// A window cut for the aggregate tables, as unix seconds: whole days `[d_from, d_to)`, whole
/// hours `[h_from, h_to)` outside them, and the minutes of `[from, to)` outside those. When the
/// window holds no whole day (or hour), `d_from >= d_to` (or `h_from >= h_to`): that table then
/// contributes nothing and the finer one everything, with the same conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cuts {
    /// Window start.
    pub from: i64,
    /// Window end (exclusive).
    pub to: i64,
    /// `from` rounded up to the hour.
    pub h_from: i64,
    /// `to` rounded down to the hour.
    pub h_to: i64,
    /// `from` rounded up to the UTC day.
    pub d_from: i64,
    /// `to` rounded down to the UTC day.
    pub d_to: i64,
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    // The listing's and the one-ad query's WHERE clauses, mirrored for the test of their decomposition.
    impl Cuts {
        /// The tables the listing (`ads_totals.sql`) reads the minute starting at `minute` from:
        /// the same conditions as its `WHERE` clauses, so that the test below can check that
        /// every minute of a window is read exactly once and no other minute at all.
        fn totals_sources(&self, minute: i64) -> Vec<Grain> {
            let (day, hour) = (floor(minute, 86_400), floor(minute, 3600));
            let by_day = day >= self.d_from && day < self.d_to;
            let by_hour =
                hour >= self.h_from && hour < self.h_to && (hour < self.d_from || hour >= self.d_to);
            [(by_day, Grain::Day), (by_hour, Grain::Hour), (self.by_minute(minute), Grain::Minute)]
                .into_iter()
                .filter_map(|(read, grain)| read.then_some(grain))
                .collect()
        }

        /// The same for `ad_series.sql` (series and totals of one ad), which reads hours and minutes only.
        fn series_sources(&self, minute: i64) -> Vec<Grain> {
            let hour = floor(minute, 3600);
            let by_hour = hour >= self.h_from && hour < self.h_to;
            [(by_hour, Grain::Hour), (self.by_minute(minute), Grain::Minute)]
                .into_iter()
                .filter_map(|(read, grain)| read.then_some(grain))
                .collect()
        }

        fn by_minute(&self, minute: i64) -> bool {
            minute >= self.from && minute < self.to && (minute < self.h_from || minute >= self.h_to)
        }
    }

    /// The aggregate table a bucket comes from.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Grain {
        /// `ad_stats_daily`.
        Day,
        /// `ad_stats_hourly`.
        Hour,
        /// `ad_stats_minutely`.
        Minute,
    }

    const NOW: OffsetDateTime = datetime!(2026-11-22 01:37:12.5 UTC);

    fn resolve(tf: Option<&str>, from: Option<&str>, to: Option<&str>) -> Result<Window, String> {
        Window::resolve(tf, from, to, NOW, Some(13))
    }

    #[test]
    fn timeframes_roll_back_from_the_end_of_the_current_minute() {
        let w = resolve(Some("1h"), None, None).unwrap();
        assert_eq!((w.from, w.to), (datetime!(2026-11-22 00:38 UTC), datetime!(2026-11-22 01:38 UTC)));
        let w = resolve(Some("30d"), None, None).unwrap();
        assert_eq!(w.from, datetime!(2026-10-23 01:38 UTC));
        let w = resolve(None, None, None).unwrap();
        assert_eq!(w.kind, WindowKind::Timeframe(Timeframe::Day));
        assert_eq!(w.from, datetime!(2026-11-21 01:38 UTC));
        let w = resolve(Some("all"), None, None).unwrap();
        assert_eq!(w.from, OffsetDateTime::UNIX_EPOCH);
        assert_eq!(end_of_minute(datetime!(2026-11-22 01:37 UTC)), datetime!(2026-11-22 01:37 UTC));
    }

    #[test]
    fn custom_windows_are_checked() {
        let w = resolve(None, Some("2026-10-31T23:15:00+01:00"), Some("2026-11-01T01:00:00Z")).unwrap();
        assert_eq!((w.from, w.to), (datetime!(2026-10-31 22:15 UTC), datetime!(2026-11-01 01:00 UTC)));
        assert_eq!(w.kind.to_string(), "custom");
        // The same offset with its `+` decoded to a space by a URL that did not encode it.
        let spaced = resolve(None, Some("2026-10-31T23:15:00 01:00"), Some("2026-11-01T01:00:00Z")).unwrap();
        assert_eq!(spaced.from, w.from);
        assert!(resolve(None, Some("2026-10-31T23:15:00é01:00"), None).is_err());
        assert_eq!(
            resolve(None, Some("2026-11-22T01:00:00Z"), None).unwrap().to,
            datetime!(2026-11-22 01:38 UTC)
        );
        let err = |tf, f, t| resolve(tf, f, t).unwrap_err();
        assert!(err(Some("2h"), None, None).contains("one of 1h, 24h, 7d, 30d, all"));
        assert!(err(Some("1h"), Some("2026-11-01T00:00:00Z"), None).contains("not both"));
        assert!(err(None, None, Some("2026-11-01T00:00:00Z")).starts_with("to needs from"));
        assert!(err(None, Some("yesterday"), None).starts_with("from must be an RFC 3339"));
        assert!(err(None, Some("2026-11-01T00:00:30Z"), None).starts_with("from must be on a whole minute"));
        assert!(
            err(None, Some("2026-11-02T00:00:00Z"), Some("2026-11-01T00:00:00Z")).contains("must be before")
        );
        assert!(
            err(None, Some("2026-11-01T00:00:00Z"), Some("2026-11-01T00:00:00Z")).contains("must be before")
        );
        assert!(err(None, Some("1960-01-01T00:00:00Z"), Some("1960-02-01T00:00:00Z")).contains("1970"));
        // 13 calendar months is the longest.
        assert!(resolve(None, Some("2025-10-22T00:00:00Z"), Some("2026-11-22T00:00:00Z")).is_ok());
        assert!(err(None, Some("2025-10-21T23:59:00Z"), Some("2026-11-22T00:00:00Z")).contains("retention"));
        // No bound for the listing of every ad.
        let long =
            Window::resolve(None, Some("1970-01-01T00:00:00Z"), Some("2026-11-22T00:00:00Z"), NOW, None);
        assert_eq!(long.map(|w| w.from), Ok(OffsetDateTime::UNIX_EPOCH));
    }

    #[test]
    fn months_before_clamps_the_day() {
        assert_eq!(months_before(datetime!(2026-03-31 12:00 UTC), 1), datetime!(2026-02-28 12:00 UTC));
        assert_eq!(months_before(datetime!(2026-01-15 00:00 UTC), 13), datetime!(2024-12-15 00:00 UTC));
    }

    #[test]
    fn no_cut_passes_the_end_of_a_window_near_the_last_datetime() {
        // The latest window a request can name ends at 2106-02-07 06:27 (parse_bound); its
        // hour and day would round up past u32::MAX seconds.
        for len in [1, 26, 60, 2 * 1440, 40 * 1440] {
            let to = datetime!(2106-02-07 06:27 UTC).unix_timestamp();
            let cuts = Window { kind: WindowKind::Custom, from: at(to - len * 60), to: at(to) }.cuts();
            for cut in [cuts.h_from, cuts.h_to, cuts.d_from, cuts.d_to] {
                assert!(cut <= to && cut <= i64::from(u32::MAX), "{cuts:?}");
            }
        }
    }

    #[test]
    fn every_minute_of_a_window_is_read_from_exactly_one_table() {
        // Windows around midnight and a month boundary, with and without whole hours and days.
        let base = datetime!(2026-10-30 22:00 UTC).unix_timestamp();
        let starts = [0, 1, 17, 59, 60, 61, 120, 1439, 1440, 1441, 2000];
        let lengths = [1, 2, 43, 59, 60, 61, 119, 1439, 1440, 1441, 2880, 4321, 44_640, 44_641, 50_000];
        for s in starts {
            for len in lengths {
                let (from, to) = (base + s * 60, base + (s + len) * 60);
                let cuts = Window { kind: WindowKind::Custom, from: at(from), to: at(to) }.cuts();
                for m in (from - 86_400..to + 86_400).step_by(60) {
                    let want = usize::from(m >= from && m < to);
                    assert_eq!(cuts.totals_sources(m).len(), want, "totals, minute {m} of [{from}, {to})");
                    assert_eq!(cuts.series_sources(m).len(), want, "series, minute {m} of [{from}, {to})");
                }
                // A day or hour is read whole, so it must lie wholly inside the window.
                for m in (from..to).step_by(60) {
                    for grain in cuts.totals_sources(m).into_iter().chain(cuts.series_sources(m)) {
                        let step = match grain {
                            Grain::Day => 86_400,
                            Grain::Hour => 3600,
                            Grain::Minute => 60,
                        };
                        let bucket = floor(m, step);
                        assert!(bucket >= from && bucket + step <= to, "{grain:?} of minute {m}");
                    }
                }
            }
        }
    }

    #[test]
    fn hours_cover_the_window() {
        let w = resolve(None, Some("2026-10-31T22:15:00Z"), Some("2026-11-01T01:00:00Z")).unwrap();
        let hours: Vec<_> = w.hours().collect();
        assert_eq!(
            hours,
            [
                datetime!(2026-10-31 22:00 UTC),
                datetime!(2026-10-31 23:00 UTC),
                datetime!(2026-11-01 00:00 UTC)
            ]
        );
        // `all` before any event: the window is empty and so is the series.
        let at = datetime!(2026-11-01 01:38 UTC);
        let empty = Window { from: at, to: at, ..w };
        assert_eq!(empty.hours().count(), 0);
    }
}
