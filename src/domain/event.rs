//! A tracking event and its parts.

use std::time::Duration;

use serde_repr::{Deserialize_repr, Serialize_repr};
use time::OffsetDateTime;
use uuid::Uuid;

use super::Traffic;

/// What happened. The discriminants are the `Enum8` values of `events.kind`; never renumber them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize_repr, Deserialize_repr)]
#[repr(i8)]
pub enum EventKind {
    /// The ad was shown.
    Impression = 1,
    /// The viewer clicked through.
    Click = 2,
    /// VAST creativeView.
    CreativeView = 3,
    /// VAST start.
    Start = 4,
    /// VAST firstQuartile.
    FirstQuartile = 5,
    /// VAST midpoint.
    Midpoint = 6,
    /// VAST thirdQuartile.
    ThirdQuartile = 7,
    /// VAST complete.
    Complete = 8,
    /// VAST skip.
    Skip = 9,
    /// VAST pause.
    Pause = 10,
    /// VAST resume.
    Resume = 11,
    /// VAST mute.
    Mute = 12,
    /// VAST unmute.
    Unmute = 13,
    /// VAST close.
    Close = 14,
    /// VAST error (with an error code).
    Error = 15,
}

impl EventKind {
    /// Every kind, in discriminant order.
    pub const ALL: [EventKind; 15] = [
        Self::Impression,
        Self::Click,
        Self::CreativeView,
        Self::Start,
        Self::FirstQuartile,
        Self::Midpoint,
        Self::ThirdQuartile,
        Self::Complete,
        Self::Skip,
        Self::Pause,
        Self::Resume,
        Self::Mute,
        Self::Unmute,
        Self::Close,
        Self::Error,
    ];

    /// The name stored in ClickHouse (snake_case).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Impression => "impression",
            Self::Click => "click",
            Self::CreativeView => "creative_view",
            Self::Start => "start",
            Self::FirstQuartile => "first_quartile",
            Self::Midpoint => "midpoint",
            Self::ThirdQuartile => "third_quartile",
            Self::Complete => "complete",
            Self::Skip => "skip",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Mute => "mute",
            Self::Unmute => "unmute",
            Self::Close => "close",
            Self::Error => "error",
        }
    }

    /// Position in [`EventKind::ALL`], for per-kind arrays.
    pub fn index(self) -> usize {
        self as usize - 1
    }

    /// The name of the event in VAST 4 tracking (`creativeView`, `firstQuartile`, …).
    pub fn vast_name(self) -> &'static str {
        match self {
            Self::CreativeView => "creativeView",
            Self::FirstQuartile => "firstQuartile",
            Self::ThirdQuartile => "thirdQuartile",
            other => other.as_str(),
        }
    }

    /// The kind named `name` in VAST's spelling or in ClickHouse's (`first_quartile`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.vast_name() == name || k.as_str() == name)
    }
}

/// Seconds into the video: finite and not negative.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlaybackTime(f32);

impl PlaybackTime {
    /// Longest playback position accepted (a day); anything beyond is a client bug.
    pub const MAX_SECONDS: f64 = 86_400.0;

    /// Reads VAST's `[ADPLAYHEAD]` form, `HH:MM:SS` or `HH:MM:SS.mmm`; `None` for any other text
    /// or a position out of range. A beacon keeps no playhead then (no error is built to drop).
    pub fn playhead(text: &str) -> Option<Self> {
        Self::new(Self::playhead_seconds(text)?).ok()
    }

    /// The seconds a playhead in `HH:MM:SS` or `HH:MM:SS.mmm` names (minutes and seconds two
    /// digits each, below 60; hours and the fraction any number of digits), or `None` for any
    /// other text. The digits are read as integers, not through float parsing and a formatted
    /// `0.mmm`: a beacon's playhead cost about 580 instructions that way (callgrind). The value
    /// is the same: the fraction, up to 15 digits, is an exact integer divided by an exact power
    /// of ten, which IEEE division rounds as parsing `0.mmm` does; longer ones are parsed.
    fn playhead_seconds(text: &str) -> Option<f64> {
        let mut parts = text.split(':');
        let (Some(h), Some(m), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let (whole, frac) = match s.split_once('.') {
            Some((whole, frac)) => (whole, Some(frac)),
            None => (s, None),
        };
        let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
        if !(digits(h) && digits(m) && m.len() == 2 && digits(whole) && whole.len() == 2)
            || frac.is_some_and(|f| !digits(f))
        {
            return None;
        }
        // Saturating: an hour count too large for u64 is out of range either way.
        let int =
            |x: &str| x.bytes().fold(0u64, |n, b| n.saturating_mul(10).saturating_add(u64::from(b - b'0')));
        let (h, m, whole) = (int(h), int(m), int(whole));
        if m >= 60 || whole >= 60 {
            return None;
        }
        let frac = match frac {
            None => 0.0,
            Some(f) if f.len() <= 15 => int(f) as f64 / 10f64.powi(f.len() as i32),
            Some(f) => format!("0.{f}").parse().ok()?,
        };
        Some(h as f64 * 3600.0 + (m * 60 + whole) as f64 + frac)
    }

    /// Validates a position in seconds.
    pub fn new(seconds: f64) -> Result<Self, String> {
        if !seconds.is_finite() {
            return Err("must be a finite number of seconds".into());
        }
        if seconds < 0.0 {
            return Err(format!("must be 0 or more seconds, got {seconds}"));
        }
        if seconds > Self::MAX_SECONDS {
            return Err(format!("must be at most {} seconds, got {seconds}", Self::MAX_SECONDS));
        }
        Ok(Self(seconds as f32))
    }

    /// The position in seconds.
    pub fn seconds(self) -> f32 {
        self.0
    }
}

/// The time to store as `event_time`: `client` in whole UTC seconds, or `now` without one.
/// A client time more than `max_skew` ahead of `now` or more than `max_age` behind it is
/// refused with the reason: a clock that far off is a broken device or a forgery, and
/// storing either time would put the event where it did not happen.
pub fn event_time(
    client: Option<OffsetDateTime>,
    now: OffsetDateTime,
    max_skew: Duration,
    max_age: Duration,
) -> Result<OffsetDateTime, String> {
    let Some(t) = client else { return Ok(now) };
    // Whole seconds, like the DateTime column; integer bounds are cheaper than date arithmetic
    // on every click. The window never leaves what DateTime holds (1970 to 2106), so no
    // configured age or skew can let through a time that would fail the whole batch.
    let secs = now.unix_timestamp();
    let earliest = secs.saturating_sub(i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX)).max(0);
    let latest =
        secs.saturating_add(i64::try_from(max_skew.as_secs()).unwrap_or(i64::MAX)).min(i64::from(u32::MAX));
    let at = t.unix_timestamp();
    if at > latest {
        return Err(format!(
            "timestamp is {} ahead of the server's clock; at most {} ahead is accepted (MAX_CLOCK_SKEW)",
            roughly(at - secs),
            crate::config::format_duration(max_skew)
        ));
    }
    if at < earliest {
        return Err(format!(
            "timestamp is {} before the server's clock; at most {} before is accepted (MAX_EVENT_AGE)",
            roughly(secs - at),
            crate::config::format_duration(max_age)
        ));
    }
    // Stored in UTC: the offset the client wrote is not part of the event.
    let utc = t.to_offset(time::UtcOffset::UTC);
    Ok(utc.replace_nanosecond(0).unwrap_or(utc))
}

/// A span of seconds in a large unit ("51 days", "3 hours"), rounded up, so that a span just
/// over a bound never reads as the bound itself ("6 minutes" for 301 s against 5m).
fn roughly(secs: i64) -> String {
    let s = secs.unsigned_abs();
    let (n, unit) = match s {
        0..120 => (s, "second"),
        120..7200 => (s.div_ceil(60), "minute"),
        7200..172_800 => (s.div_ceil(3600), "hour"),
        _ => (s.div_ceil(86_400), "day"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// What a client reports about one event, validated. The server adds its own clock and the
/// client-IP hash (and an event id, unless the client sent one) to make an [`Event`].
#[derive(Debug, Clone, PartialEq)]
pub struct EventReport {
    /// The client's id of the event, when it sent one: the idempotency key.
    pub event_id: Option<Uuid>,
    /// The ad (not yet checked against the catalog).
    pub ad_id: Uuid,
    /// What happened.
    pub kind: EventKind,
    /// The client's time of the event, if it sent one.
    pub client_time: Option<OffsetDateTime>,
    /// Playback position, if it sent one.
    pub playback_time: Option<PlaybackTime>,
    /// VAST error code for [`EventKind::Error`], else 0.
    pub error_code: u16,
}

/// One accepted tracking event, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique per event; the idempotency key.
    pub event_id: Uuid,
    /// The ad it belongs to (known to the catalog).
    pub ad_id: Uuid,
    /// What happened.
    pub kind: EventKind,
    /// When it happened.
    pub event_time: OffsetDateTime,
    /// When adbeacon accepted it.
    pub received_at: OffsetDateTime,
    /// Keyed hash of the client IP.
    pub ip_hash: u64,
    /// Playback position, if the client said.
    pub playback_time: Option<PlaybackTime>,
    /// VAST error code for [`EventKind::Error`], else 0.
    pub error_code: u16,
    /// Whether it counts in the net numbers, and if not, why.
    pub traffic: Traffic,
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn kinds_round_trip_their_discriminants() {
        for (i, k) in EventKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_eq!(*k as i8, i as i8 + 1);
        }
    }

    #[test]
    fn vast_names_map_to_kinds() {
        assert_eq!(EventKind::from_name("firstQuartile"), Some(EventKind::FirstQuartile));
        assert_eq!(EventKind::from_name("first_quartile"), Some(EventKind::FirstQuartile));
        assert_eq!(EventKind::from_name("creativeView"), Some(EventKind::CreativeView));
        assert_eq!(EventKind::from_name("error"), Some(EventKind::Error));
        assert_eq!(EventKind::from_name("FirstQuartile"), None);
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_name(k.vast_name()), Some(k));
        }
    }

    /// The playhead's integer reading gives what parsing its parts as floats gave.
    #[test]
    fn playheads_read_as_float_parsing_reads_them() {
        let by_floats = |text: &str| -> Option<f64> {
            let mut parts = text.split(':');
            let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
            let (whole, frac) = s.split_once('.').unwrap_or((s, "0"));
            let frac: f64 = format!("0.{frac}").parse().ok()?;
            Some(
                h.parse::<f64>().ok()? * 3600.0
                    + m.parse::<f64>().ok()? * 60.0
                    + whole.parse::<f64>().ok()?
                    + frac,
            )
        };
        let mut texts = vec![
            "00:00:12.5".to_string(),
            "00:00:00.1".into(),
            "23:59:59.999".into(),
            "0:00:00.3".into(),
            "24:00:00".into(),
            "00:00:01.123456789012345".into(),
            "00:00:01.1234567890123456789".into(),
            "99999999999999999999999:00:00".into(),
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let digits: String =
                (0..1 + seed % 17).map(|i| char::from(b'0' + ((seed >> (i * 3)) % 10) as u8)).collect();
            texts.push(format!("{:02}:{:02}:{:02}.{digits}", seed % 30, (seed >> 8) % 60, (seed >> 16) % 60));
        }
        // Beyond the range, where both are refused, saturation may give another number.
        let in_range = |v: Option<f64>| v.map(|s| Some(s).filter(|s| *s <= PlaybackTime::MAX_SECONDS));
        for text in &texts {
            assert_eq!(in_range(PlaybackTime::playhead_seconds(text)), in_range(by_floats(text)), "{text}");
        }
    }

    #[test]
    fn playheads_parse() {
        assert_eq!(PlaybackTime::playhead("00:00:12.500").unwrap().seconds(), 12.5);
        assert_eq!(PlaybackTime::playhead("01:02:03").unwrap().seconds(), 3723.0);
        for bad in
            ["[ADPLAYHEAD]", "12.5", "00:60:00", "00:00:7", "-1:00:00", "00:00:00.x", "::", "", "25:00:00"]
        {
            assert!(PlaybackTime::playhead(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn playback_time_rejects_negative_and_nan() {
        assert!(PlaybackTime::new(-1.0).unwrap_err().contains("0 or more"));
        assert!(PlaybackTime::new(f64::NAN).is_err());
        assert!(PlaybackTime::new(1e9).is_err());
        assert_eq!(PlaybackTime::new(12.5).unwrap().seconds(), 12.5);
    }

    #[test]
    fn event_time_keeps_sane_client_times_and_refuses_the_rest() {
        let now = datetime!(2026-11-21 12:00:00 UTC);
        let skew = Duration::from_secs(300);
        let age = Duration::from_secs(7 * 86400);
        let at = |t| event_time(Some(t), now, skew, age);
        assert_eq!(at(datetime!(2026-11-21 09:30:15.5 UTC)), Ok(datetime!(2026-11-21 09:30:15 UTC)));
        assert_eq!(at(datetime!(2026-11-21 12:05:00 UTC)), Ok(datetime!(2026-11-21 12:05:00 UTC)));
        let e = at(datetime!(2026-11-21 12:10:00 UTC)).unwrap_err();
        assert!(e.starts_with("timestamp is 10 minutes ahead") && e.contains("MAX_CLOCK_SKEW"), "{e}");
        let e = at(datetime!(2026-10-01 00:00:00 UTC)).unwrap_err();
        assert!(e.starts_with("timestamp is 52 days before") && e.contains("MAX_EVENT_AGE"), "{e}");
        // A client offset is converted, not kept.
        let t = at(datetime!(2026-11-21 14:00:00 +02:00)).unwrap();
        assert_eq!(t.offset(), time::UtcOffset::UTC);
        assert_eq!(t, datetime!(2026-11-21 12:00:00 UTC));
        // Whatever the configured window, times DateTime cannot hold are refused.
        let forever = Duration::from_secs(u64::MAX);
        assert!(event_time(Some(datetime!(1950-01-01 00:00:00 UTC)), now, forever, forever).is_err());
        assert!(event_time(Some(datetime!(2200-01-01 00:00:00 UTC)), now, forever, forever).is_err());
        assert_eq!(event_time(None, now, skew, age), Ok(now));
    }
}
