//! Analytics reads: the per-hour series and totals of one ad, and every ad's totals, over a
//! window cut into days, hours and minutes ([`Cuts`]). Every query reads only the `ad_stats_*`
//! aggregate tables, never raw `events`; the SQL is in `clickhouse/queries/`.

use clickhouse::Row;
use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    clickhouse::{ClickHouse, StoreError},
    queries,
};
use crate::domain::{Cuts, EventKind, Traffic};

/// Every count of one ad (or one hour of it), merged from the aggregate states: the valid
/// (counted) events, from `ad_series.sql`'s counts array.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Impressions.
    pub impressions: u64,
    /// Clicks.
    pub clicks: u64,
    /// Distinct client-IP hashes among the clicks (`uniq`: exact below 65,536).
    pub unique_clicks: u64,
    /// VAST creativeView events.
    pub creative_views: u64,
    /// Video starts.
    pub starts: u64,
    /// First quartiles reached.
    pub first_quartiles: u64,
    /// Midpoints reached.
    pub midpoints: u64,
    /// Third quartiles reached.
    pub third_quartiles: u64,
    /// Completions.
    pub completes: u64,
    /// Skips.
    pub skips: u64,
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
    /// Sum of the playback positions (seconds) of clicks that reported one.
    pub click_playback_sum: f64,
    /// Clicks that reported a playback position.
    pub click_playback_count: u64,
}

impl Stats {
    /// Events of every kind.
    pub fn events(&self) -> u64 {
        self.impressions
            + self.clicks
            + self.creative_views
            + self.starts
            + self.first_quartiles
            + self.midpoints
            + self.third_quartiles
            + self.completes
            + self.skips
            + self.pauses
            + self.resumes
            + self.mutes
            + self.unmutes
            + self.closes
            + self.errors
    }

    /// The valid counts of a merged `ad_counts.counts` array (see [`Counts`]).
    fn of(counts: &Counts, unique_clicks: u64, click_playback_sum: f64) -> Stats {
        let valid = |kind| counts.of(Traffic::Valid, kind);
        Stats {
            impressions: valid(EventKind::Impression),
            clicks: valid(EventKind::Click),
            unique_clicks,
            creative_views: valid(EventKind::CreativeView),
            starts: valid(EventKind::Start),
            first_quartiles: valid(EventKind::FirstQuartile),
            midpoints: valid(EventKind::Midpoint),
            third_quartiles: valid(EventKind::ThirdQuartile),
            completes: valid(EventKind::Complete),
            skips: valid(EventKind::Skip),
            pauses: valid(EventKind::Pause),
            resumes: valid(EventKind::Resume),
            mutes: valid(EventKind::Mute),
            unmutes: valid(EventKind::Unmute),
            closes: valid(EventKind::Close),
            errors: valid(EventKind::Error),
            click_playback_sum,
            click_playback_count: counts.at(0),
        }
    }
}

/// A merged `ad_counts.counts` array, as `0008_ad_counts.sql` lays it out: element 0 (1 in SQL)
/// is the valid clicks that reported a playback position, element `15 * traffic + kind` the
/// events of that traffic and kind (their `Enum8` numbers). Elements past its end are zeros
/// (rows' arrays differ in length, and `sumForEachMerge` stops at the longest).
#[derive(Debug, Clone, Default, PartialEq)]
struct Counts(Vec<u64>);

impl Counts {
    /// Kinds per traffic class: the stride of the layout.
    const KINDS: usize = EventKind::ALL.len();

    fn at(&self, index: usize) -> u64 {
        self.0.get(index).copied().unwrap_or(0)
    }

    fn of(&self, traffic: Traffic, kind: EventKind) -> u64 {
        // Both discriminants are small and non-negative (Valid = 0, kinds from 1).
        self.at(Self::KINDS * traffic as usize + kind as usize)
    }

    /// The filtered events, by reason and kind, that are not zero.
    fn filtered(&self) -> Vec<FilteredCount> {
        let pairs = Traffic::FILTERED.iter().flat_map(|&r| EventKind::ALL.iter().map(move |&k| (r, k)));
        pairs
            .map(|(reason, kind)| FilteredCount { reason, kind, events: self.of(reason, kind) })
            .filter(|f| f.events > 0)
            .collect()
    }
}

/// One UTC hour of an ad's series.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HourStats {
    /// Start of the hour, unix seconds.
    pub hour: u32,
    /// Its counts.
    pub stats: Stats,
}

/// One ad over a window: the hours that have events, ascending, and the window's totals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdWindow {
    /// The hours with events.
    pub hours: Vec<HourStats>,
    /// The whole window.
    pub totals: Stats,
    /// The whole window's filtered events by reason and kind (those that are not zero).
    pub filtered: Vec<FilteredCount>,
    /// The whole window's valid VAST errors by code, most frequent first.
    pub errors: Vec<ErrorCount>,
}

/// A reader of one TabSeparated line of `ad_series.sql`'s answer, a byte at a time. A 30-day
/// answer is 721 lines of 61-element arrays. Read with `split` and `parse`, they took about 40 %
/// of the service's CPU for such a request (a `memchr` and a `memcmp` call for every comma, the
/// time crate's format parser for every hour); read this way about 18 %, and the request's CPU
/// went from about 1.4 to 0.9 ms (perf, 10 million events).
struct Fields<'a> {
    /// What is left of the line.
    rest: &'a str,
}

impl<'a> Fields<'a> {
    /// Takes `text` if the line goes on with it.
    fn eat(&mut self, text: &str) -> Option<()> {
        self.rest = self.rest.strip_prefix(text)?;
        Some(())
    }

    /// A decimal number of at least one digit, within `u64`.
    fn uint(&mut self) -> Option<u64> {
        let (value, len) = leading_uint(self.rest.as_bytes())?;
        self.rest = self.rest.get(len..)?;
        Some(value)
    }

    /// `[1,0,3]`'s elements, the `[` already taken: numbers that fit `T`, up to `close`, in a
    /// vector with room for `expected`.
    fn uints<T: TryFrom<u64>>(&mut self, close: u8, expected: usize) -> Option<Vec<T>> {
        let bytes = self.rest.as_bytes();
        let mut values = Vec::with_capacity(expected);
        let mut at = 0;
        if bytes.first() != Some(&close) {
            loop {
                let (value, len) = leading_uint(&bytes[at..])?;
                values.push(T::try_from(value).ok()?);
                at += len;
                match bytes.get(at) {
                    Some(b',') => at += 1,
                    Some(&b) if b == close => break,
                    _ => return None,
                }
            }
        }
        // Past an ASCII byte: a character boundary.
        self.rest = self.rest.get(at + 1..)?;
        Some(values)
    }

    /// The text up to the next tab (taken too) or the end of the line.
    fn field(&mut self) -> &'a str {
        let (field, rest) = self.rest.split_once('\t').unwrap_or((self.rest, ""));
        self.rest = rest;
        field
    }

    /// A tab between two fields.
    fn tab(&mut self) -> Option<()> {
        self.eat("\t")
    }

    /// A `DateTime('UTC')` column's text, `2024-03-31 22:00:00`, as unix seconds.
    fn hour(&mut self) -> Option<u32> {
        let (text, rest) = self.rest.split_at_checked(19)?;
        // Digits at fixed places: `YYYY-MM-DD hh:mm:ss`.
        let number = |range: std::ops::Range<usize>| -> Option<u16> {
            let digits = text.get(range)?.bytes();
            digits
                .map(|d| d.is_ascii_digit().then(|| u16::from(d - b'0')))
                .try_fold(0, |n, d| Some(n * 10 + d?))
        };
        let separators = [(4, b'-'), (7, b'-'), (10, b' '), (13, b':'), (16, b':')];
        if separators.iter().any(|&(at, b)| text.as_bytes()[at] != b) {
            return None;
        }
        let byte = |range| number(range).and_then(|n| u8::try_from(n).ok());
        let month = time::Month::try_from(byte(5..7)?).ok()?;
        let date = time::Date::from_calendar_date(i32::from(number(0..4)?), month, byte(8..10)?).ok()?;
        let t = date.with_hms(byte(11..13)?, byte(14..16)?, byte(17..19)?).ok()?.assume_utc();
        self.rest = rest;
        u32::try_from(t.unix_timestamp()).ok()
    }

    /// An hour line: its hour and its valid numbers.
    fn hour_line(mut self) -> Option<HourStats> {
        let hour = self.hour()?;
        self.tab()?;
        Some(HourStats { hour, stats: self.line()?.stats })
    }

    /// The fields after the hour: the counts array, unique clicks, the clicks' playback sum and the
    /// errors by code, and nothing after them.
    fn line(mut self) -> Option<Line> {
        self.eat("[")?;
        // ad_counts' arrays have up to 61 elements (see Counts).
        let counts = Counts(self.uints(b']', 64)?);
        self.tab()?;
        let unique_clicks = self.uint()?;
        self.tab()?;
        let click_playback_sum = self.field().parse().ok()?;
        let errors = self.errors()?;
        let stats = Stats::of(&counts, unique_clicks, click_playback_sum);
        self.rest.is_empty().then_some(Line { counts, stats, errors })
    }

    /// `([303,400],[2,7])`, the text form of `sumMapIfMerge(error_codes)`: the codes ascending and
    /// their counts; returned most frequent first (then by code), as the answer lists them.
    fn errors(&mut self) -> Option<Vec<ErrorCount>> {
        self.eat("([")?;
        let codes: Vec<u16> = self.uints(b']', 0)?;
        self.eat(",[")?;
        let counts: Vec<u64> = self.uints(b']', codes.len())?;
        self.eat(")")?;
        if codes.len() != counts.len() {
            return None;
        }
        let mut errors: Vec<ErrorCount> = codes
            .into_iter()
            .zip(counts)
            .map(|(error_code, errors)| ErrorCount { error_code, errors })
            .collect();
        errors.sort_by(|a, b| b.errors.cmp(&a.errors).then(a.error_code.cmp(&b.error_code)));
        Some(errors)
    }
}

/// The decimal number `bytes` start with, within `u64`, and its length; None without a digit.
fn leading_uint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    let mut len = 0;
    while let Some(&d) = bytes.get(len).filter(|d| d.is_ascii_digit()) {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        len += 1;
    }
    (len > 0).then_some((value, len))
}

/// One TabSeparated line of `ad_series.sql` after its hour, read: its counts, the valid numbers
/// they make and the errors by code.
struct Line {
    counts: Counts,
    stats: Stats,
    errors: Vec<ErrorCount>,
}

/// The TabSeparated answer of `ad_series.sql`: a line per hour, a blank line, the totals line.
/// TabSeparated because it is the one form that carries the totals of `WITH TOTALS` alike on
/// 18.16 and current servers: RowBinary leaves them out, and current servers' JSON formats put
/// them before the header when there are no rows.
fn parse_series(body: &str) -> Result<AdWindow, String> {
    let mut lines = body.split('\n');
    // One per line but the blank one and the totals: sized once, not grown a page at a time.
    let mut hours = Vec::with_capacity(body.bytes().filter(|&b| b == b'\n').count().saturating_sub(2));
    loop {
        let line = lines.next().ok_or("no blank line before the totals")?;
        if line.is_empty() {
            break;
        }
        let hour = Fields { rest: line }.hour_line();
        hours.push(hour.ok_or_else(|| format!("unreadable hour line {line:?}"))?);
    }
    let totals_line = lines.next().unwrap_or_default();
    let mut fields = Fields { rest: totals_line };
    // The totals' hour is a zero time, different on every server version: skipped.
    fields.field();
    let totals = fields.line().filter(|_| lines.all(str::is_empty));
    let totals = totals.ok_or_else(|| format!("unreadable totals line {totals_line:?}"))?;
    Ok(AdWindow { hours, totals: totals.stats, filtered: totals.counts.filtered(), errors: totals.errors })
}

/// VAST errors of one code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCount {
    /// The VAST error code (900 when the player sent none).
    pub error_code: u16,
    /// Error events with that code.
    pub errors: u64,
}

/// Filtered events of one reason and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilteredCount {
    /// Why they do not count.
    pub reason: Traffic,
    /// What they were.
    pub kind: EventKind,
    /// How many.
    pub events: u64,
}

/// One ad of the every-ad listing.
#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct AdTotals {
    /// The ad.
    #[serde(with = "clickhouse::serde::uuid")]
    pub ad_id: Uuid,
    /// Its current name.
    pub name: String,
    /// Whether it is active (1) or retired (0).
    pub active: u8,
    /// Impressions in the window.
    pub impressions: u64,
    /// Clicks in the window.
    pub clicks: u64,
    /// Distinct clicking IP hashes in the window.
    pub unique_clicks: u64,
}

/// Reads the aggregate tables.
#[derive(Clone)]
pub struct Analytics {
    ch: ClickHouse,
}

impl Analytics {
    /// Analytics over `ch`.
    pub fn new(ch: ClickHouse) -> Self {
        Self { ch }
    }

    /// A query of an aggregate table. The aggregate tables are small and read on every
    /// analytics request, so their decompressed blocks are worth keeping in ClickHouse's
    /// uncompressed cache (measured: a 24-hour series went from 5.8 to 3.3 ms).
    fn query(&self, sql: &str) -> clickhouse::query::Query {
        self.ch.client().query(sql).with_setting("use_uncompressed_cache", "1")
    }

    /// A query in one ClickHouse thread. The listing's small queries run beside its main one, and
    /// a second thread (started per query on 18.16) and the merge of the two threads' results cost
    /// more than they save: with the small queries of a one-ad answer (as it was then) in one
    /// thread, ClickHouse spent 17 to 18 ms of CPU per answer instead of 23 to 26, and its three
    /// queries together answered in 11.6 to 13.1 ms instead of 14.8 to 16.2 (p50; 30 days, 10
    /// million events, 200 alternating runs).
    fn small_query(&self, sql: &str) -> clickhouse::query::Query {
        self.query(sql).with_setting("max_threads", "1")
    }

    /// One ad's hours that have events, ascending, its totals, its filtered traffic and its
    /// errors by code; parameters as `ad_series.sql` documents.
    pub async fn ad_window(&self, ad: Uuid, c: &Cuts) -> Result<AdWindow, StoreError> {
        let ad = ad.to_string();
        let q = self.query(queries::AD_SERIES);
        let q = q.bind(&ad).bind(c.h_from).bind(c.h_to);
        let q = q.bind(c.from).bind(c.to).bind(c.h_from).bind(c.h_to);
        let body = self.ch.fetch_text(q, "TabSeparated").await?;
        let body = std::str::from_utf8(&body).map_err(|e| e.to_string());
        body.and_then(parse_series)
            .map_err(|e| StoreError::Rejected(format!("unexpected answer to ad_series.sql: {e}")))
    }

    /// A page of every ad with its totals, busiest first; parameters as `ads_totals.sql` documents.
    pub async fn ads_totals(&self, c: &Cuts, offset: u64, limit: u64) -> Result<Vec<AdTotals>, StoreError> {
        // One thread too, though it reads many rows: merging every ad's uniq states in two
        // threads and then merging the two results measured 55 ms of server CPU for a 35-day
        // listing against 40 ms in one (18.16).
        let q = self.small_query(queries::ADS_TOTALS);
        let q = q.bind(c.d_from).bind(c.d_to);
        let q = q.bind(c.h_from).bind(c.h_to).bind(c.d_from).bind(c.d_to);
        let q = q.bind(c.from).bind(c.to).bind(c.h_from).bind(c.h_to);
        self.ch.fetch_all(q.bind(offset).bind(limit)).await
    }

    /// How many ads the catalog holds (the length of the every-ad listing).
    pub async fn ads_count(&self) -> Result<u64, StoreError> {
        let rows: Vec<u64> = self.ch.fetch_all(self.small_query(queries::ADS_COUNT)).await?;
        Ok(rows.into_iter().next().unwrap_or(0))
    }

    /// The first UTC day with any event, if there is one.
    pub async fn first_event_day(&self) -> Result<Option<OffsetDateTime>, StoreError> {
        let rows: Vec<u32> = self.ch.fetch_all(self.small_query(queries::FIRST_EVENT_DAY)).await?;
        Ok(rows
            .into_iter()
            .next()
            .filter(|&d| d > 0)
            .and_then(|d| OffsetDateTime::from_unix_timestamp(i64::from(d)).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 valid impressions, 2 valid clicks (1 with a playback position),
    /// one of each quartile and a start, 4 bot impressions and 1 empty-user-agent error; valid
    /// errors by code as `sumMapIfMerge` prints them (codes ascending).
    fn counts() -> String {
        let mut c = vec![0u64; 61];
        c[0] = 1;
        c[1] = 3;
        c[2] = 2;
        c[4..=8].fill(1);
        c[15 * 2 + 1] = 4;
        c[15 * 3 + 15] = 1;
        let text: Vec<String> = c.iter().map(u64::to_string).collect();
        format!("[{}]\t2\t12.5\t([303,400,901],[2,7,2])", text.join(","))
    }

    #[test]
    fn series_lines_and_totals_are_read() {
        let counts = counts();
        let body = format!(
            "2024-03-31 22:00:00\t{counts}\n2024-03-31 23:00:00\t{counts}\n\n0000-00-00 00:00:00\t{counts}\n"
        );
        let w = parse_series(&body).unwrap();
        assert_eq!(w.hours.iter().map(|h| h.hour).collect::<Vec<_>>(), [1711922400, 1711926000]);
        let t = w.totals;
        assert_eq!((t.impressions, t.clicks, t.unique_clicks, t.click_playback_sum), (3, 2, 2, 12.5));
        assert_eq!((t.creative_views, t.starts, t.completes, t.skips, t.errors), (0, 1, 1, 0, 0));
        assert_eq!((t.click_playback_count, t.events()), (1, 10));
        assert_eq!(w.hours[1].stats, w.totals);
        // Most frequent first, ties by code.
        let codes: Vec<(u16, u64)> = w.errors.iter().map(|e| (e.error_code, e.errors)).collect();
        assert_eq!(codes, [(400, 7), (303, 2), (901, 2)]);
        assert_eq!(
            w.filtered,
            [
                FilteredCount { reason: Traffic::Bot, kind: EventKind::Impression, events: 4 },
                FilteredCount { reason: Traffic::EmptyUserAgent, kind: EventKind::Error, events: 1 },
            ]
        );
        // Arrays stop at their last non-zero element: the rest are zeros.
        let short = parse_series("\n0000-00-00 00:00:00\t[0,5]\t0\t0\t([],[])\n").unwrap();
        assert_eq!((short.totals.impressions, short.totals.clicks, short.filtered.len()), (5, 0, 0));
        // No hour with events: only the blank line and empty totals (current servers print 1970).
        let empty = parse_series("\n1970-01-01 00:00:00\t[]\t0\t0\t([],[])\n").unwrap();
        assert_eq!(empty, AdWindow::default());
        assert!(parse_series(&format!("2024-03-31 22:00:00\t{counts}\n")).is_err());
        assert!(parse_series(&format!("\n0000-00-00 00:00:00\t{counts}\t7\n")).is_err());
        assert!(parse_series("\n0000-00-00 00:00:00\t[1,x]\t0\t0\t([],[])\n").is_err());
        // The errors are part of the line: missing, unpaired or out of range, it is unreadable.
        assert!(parse_series("\n0000-00-00 00:00:00\t[0,5]\t0\t0\n").is_err());
        assert!(parse_series("\n0000-00-00 00:00:00\t[0,5]\t0\t0\t([303],[1,2])\n").is_err());
        assert!(parse_series("\n0000-00-00 00:00:00\t[0,5]\t0\t0\t([70000],[1])\n").is_err());
        assert!(parse_series("\n0000-00-00 00:00:00\t[0,5]\t0\t0\t[303],[1]\n").is_err());
        // Numbers past u64, spaces, signs and trailing lines make it unreadable too.
        assert!(parse_series("\n0000-00-00 00:00:00\t[18446744073709551616]\t0\t0\t([],[])\n").is_err());
        assert!(parse_series("\n0000-00-00 00:00:00\t[0, 5]\t0\t0\t([],[])\n").is_err());
        assert!(parse_series("\n0000-00-00 00:00:00\t[0,-5]\t0\t0\t([],[])\n").is_err());
        assert!(parse_series("\n0000-00-00 00:00:00\t[0,5]\t0\t0\t([],[])\nmore\n").is_err());
        assert!(
            parse_series(&format!("2024-03-31 22:00:00\t{counts}\t\n\n0000-00-00 00:00:00\t{counts}\n"))
                .is_err()
        );
    }

    #[test]
    fn hours_are_read_as_the_time_crate_reads_them() {
        let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
        // Every 7 hours and 13 minutes from 1970 to 2106 (u32's end): leap days, month and year ends.
        for t in (0..u32::MAX as i64).step_by(7 * 3600 + 13 * 60 + 1) {
            let text = OffsetDateTime::from_unix_timestamp(t).unwrap().format(format).unwrap();
            let mut fields = Fields { rest: &text };
            assert_eq!(fields.hour(), Some(t as u32), "{text}");
            assert!(fields.rest.is_empty());
        }
        let hour = |text: &str| Fields { rest: text }.hour();
        assert_eq!(hour("2024-02-29 23:59:59"), Some(1709251199));
        for bad in [
            "2023-02-29 00:00:00",
            "2024-13-01 00:00:00",
            "2024-04-31 00:00:00",
            "2024-01-01 24:00:00",
            "2024-01-01T00:00:00",
            "2024-01-01 00:00",
            "2024-1-01 00:00:000",
            "1969-12-31 23:59:59",
            "2024-01-01 0a:00:00",
        ] {
            assert_eq!(hour(bad), None, "{bad}");
        }
    }
}
