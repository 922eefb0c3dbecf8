//! What video players and browsers fire without JavaScript: VAST tracking pixels
//! (`GET /t/{event}?ad=…`) and the click-through redirect (`GET /c/{adId}`).
//!
//! Players fire a VAST tracking URL once and never retry it, so a beacon is answered as soon as
//! the event is held, and with a 5xx only when nothing can hold it. Macros the player did not
//! expand (`[TIMESTAMP]`) or garbage in optional parameters never lose the event: the server's
//! time stands in for a timestamp that is unreadable or outside the accepted window (a device
//! whose clock is wrong; counted in `adbeacon_event_time_replaced_total`), a bad playhead is left
//! out, and an event id that is not one (empty, too long, or a macro left as it is) is ignored.
//! The JSON endpoints refuse the same input with a 400: their callers can fix and resend it.

use std::{hash::Hasher, sync::Arc};

use bytes::Bytes;
use poem::{
    Request, Response,
    http::{HeaderValue, header},
};
use poem_openapi::{
    ApiResponse, OpenApi,
    param::{Path, Query},
    payload::Binary,
};
use siphasher::sip128::{Hasher128, SipHasher13};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

use super::{Accepted, ApiTags, State, error::ApiError};
use crate::domain::{EventKind, EventReport, PlaybackTime, is_sent_url};

/// A transparent 1×1 GIF, the smallest image every browser and player accepts.
pub const PIXEL_GIF: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff,
    0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00,
    0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// Beacons and redirects must never be cached: a cached pixel is an event never seen.
const NO_STORE: &str = "no-store";

/// VAST 4's "undefined error", stored for an error beacon whose code is missing or unreadable.
pub const UNDEFINED_VAST_ERROR: u16 = 900;

/// The codes VAST defines (100 to 999); any other stands for [`UNDEFINED_VAST_ERROR`] on a
/// beacon (0 would read as "no error" in the aggregates) and is refused in a batch.
pub const VAST_ERROR_CODES: std::ops::RangeInclusive<u16> = 100..=999;

/// The longest client event id taken as is; ids are usually UUIDs.
const MAX_EVENT_ID_LEN: usize = 200;
/// Why the nil UUID is no event id: it is what an SDK sends when it never filled the id in, the
/// same on every event, and taking it as a key would store the first event and answer every
/// later one as its repeat.
pub(crate) const NIL_EVENT_ID: &str = "must not be the nil UUID 00000000-0000-0000-0000-000000000000 (the \
     same on every event): send a fresh id per event, or leave it out";

/// Answer of a beacon.
#[derive(Debug, ApiResponse)]
pub enum PixelResponse {
    /// The event is held: a transparent 1×1 GIF.
    #[oai(status = 200, content_type = "image/gif")]
    Gif(Binary<Bytes>, #[oai(header = "Cache-Control")] String),
    /// The event is held (asked for with `f=204`).
    #[oai(status = 204)]
    NoContent(#[oai(header = "Cache-Control")] String),
}

impl PixelResponse {
    fn new(format: Option<&str>) -> Self {
        if format == Some("204") {
            Self::NoContent(NO_STORE.into())
        } else {
            Self::Gif(Binary(Bytes::from_static(PIXEL_GIF)), NO_STORE.into())
        }
    }
}

/// Answer of the click-through.
#[derive(Debug, ApiResponse)]
pub enum RedirectResponse {
    /// The click is recorded; on to the ad's registered target.
    #[oai(status = 302)]
    Found(#[oai(header = "Location")] String, #[oai(header = "Cache-Control")] String),
}

/// The query of a beacon, as sent.
struct Beacon<'a> {
    event: &'a str,
    ad: Option<&'a str>,
    ts: Option<&'a str>,
    pt: Option<&'a str>,
    eid: Option<&'a str>,
    code: Option<&'a str>,
}

impl<'a> Beacon<'a> {
    /// The query as the GET and HEAD operations receive it.
    fn new(
        event: &'a Path<String>,
        ad: &'a Query<Option<String>>,
        ts: &'a Query<Option<String>>,
        pt: &'a Query<Option<String>>,
        eid: &'a Query<Option<String>>,
        code: &'a Query<Option<String>>,
    ) -> Self {
        Beacon {
            event: &event.0,
            ad: ad.0.as_deref(),
            ts: ts.0.as_deref(),
            pt: pt.0.as_deref(),
            eid: eid.0.as_deref(),
            code: code.0.as_deref(),
        }
    }
}

/// A beacon turned into a report, and whether its timestamp had to be dropped.
struct Parsed {
    report: EventReport,
    bad_timestamp: bool,
}

/// A beacon's `eid` as an idempotency key, or `None` when it cannot be one: blank, too long, the
/// nil UUID, or a macro the player left as it is (`[TRANSACTIONID]`, also percent-encoded once
/// more) or filled with VAST's "unknown" (-1) or "not applicable" (-2). Such a value is the same
/// on every viewer's beacon, so taking it as a key would store one event of each kind per ad and
/// hour.
///
/// Every value is taken per ad and event kind, a UUID too (on the JSON endpoints a UUID is the
/// event's own id): VAST 4.1's `[TRANSACTIONID]`, the macro a VAST URL gets its id from, is one
/// value per ad request, the same on the impression, start, quartiles and complete of each ad
/// it plays.
fn beacon_event_id(text: &str, ad: Uuid, kind: EventKind) -> Option<Uuid> {
    let t = text.trim().as_bytes();
    let macro_left = (t.starts_with(b"[") && t.ends_with(b"]"))
        || (t.len() > 6
            && t[..3].eq_ignore_ascii_case(b"%5b")
            && t[t.len() - 3..].eq_ignore_ascii_case(b"%5d"));
    if t.is_empty() || macro_left || t == b"-1" || t == b"-2" {
        return None;
    }
    let text = text.trim();
    match Uuid::try_parse(text) {
        // By its value, so that its spelling (upper or lower case, braces) does not matter.
        Ok(id) if !id.is_nil() => Some(scoped_id(b"uuid", id.as_bytes(), ad, kind)),
        Ok(_) => None,
        // A label of its own namespace: a beacon's `eid` never names the event that a JSON
        // `eventId` with the same text names (README).
        Err(_) => {
            (text.chars().count() <= MAX_EVENT_ID_LEN).then(|| scoped_id(b"eid", text.as_bytes(), ad, kind))
        }
    }
}

/// A beacon's `ts`: RFC 3339, or the looser ISO 8601 that VAST 4 describes for `[TIMESTAMP]`
/// and players write (`2016-01-17T8:15:07.127-05`: a one-digit hour, an offset in whole
/// hours), also with the offset's `+` turned into a space by a URL that did not encode it.
/// `None` when it is none of these (the server's time then stands in). A time without an
/// offset is not taken: whose local time it is cannot be known.
fn vast_time(text: &str) -> Option<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(t);
    }
    let mut r = Digits(text.as_bytes());
    let year = r.number(4, 4)?;
    r.expect(b"-")?;
    let month = r.number(2, 2)?;
    r.expect(b"-")?;
    let day = r.number(2, 2)?;
    r.expect(b"Tt ")?;
    let hour = r.number(1, 2)?;
    r.expect(b":")?;
    let minute = r.number(2, 2)?;
    r.expect(b":")?;
    let second = r.number(2, 2)?;
    let mut nanos = 0;
    if r.expect(b".").is_some() {
        let start = r.0.len();
        let digits = r.number(1, 9)?;
        nanos = digits * 10u32.pow(9 - (start - r.0.len()) as u32);
        // Digits past nanoseconds are dropped, as RFC 3339's parser does.
        while r.expect(b"0123456789").is_some() {}
    }
    let offset_seconds = match r.0 {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-' | b' '), ..] => {
            let negative = *sign == b'-';
            r.0 = &r.0[1..];
            let hours = r.number(2, 2)?;
            r.expect(b":");
            let minutes = if r.0.is_empty() { 0 } else { r.number(2, 2)? };
            if !r.0.is_empty() || hours > 23 || minutes > 59 {
                return None;
            }
            let s = (hours * 3600 + minutes * 60) as i32;
            if negative { -s } else { s }
        }
        _ => return None,
    };
    let date = time::Date::from_calendar_date(
        year as i32,
        time::Month::try_from(u8::try_from(month).ok()?).ok()?,
        u8::try_from(day).ok()?,
    )
    .ok()?;
    let clock =
        time::Time::from_hms_nano(u8::try_from(hour).ok()?, minute as u8, second as u8, nanos).ok()?;
    let offset = time::UtcOffset::from_whole_seconds(offset_seconds).ok()?;
    Some(date.with_time(clock).assume_offset(offset))
}

/// The rest of a text being read by [`vast_time`].
struct Digits<'a>(&'a [u8]);

impl Digits<'_> {
    /// The number written by the next `min` to `max` ASCII digits (as many as there are).
    fn number(&mut self, min: usize, max: usize) -> Option<u32> {
        let n = self.0.iter().take(max).take_while(|b| b.is_ascii_digit()).count();
        if n < min {
            return None;
        }
        let value = self.0[..n].iter().fold(0u32, |v, d| v * 10 + u32::from(d - b'0'));
        self.0 = &self.0[n..];
        Some(value)
    }

    /// Skips the next byte when it is one of `any`.
    fn expect(&mut self, any: &[u8]) -> Option<()> {
        let (first, rest) = self.0.split_first()?;
        any.contains(first).then(|| self.0 = rest)
    }
}

/// A client event id: a UUID as is (the client vouches that it names one event), any other
/// string mapped to a stable UUID together with the ad and the kind, so that a label such as a
/// session id reused for another ad or event kind is not taken for a repeat. An error when it is
/// empty, too long to be an id, or the nil UUID ([`NIL_EVENT_ID`]).
pub(crate) fn event_id(text: &str, ad: Uuid, kind: EventKind) -> Result<Uuid, String> {
    // Trimmed as the UUID fields of the click and the impression are: a retry that spaces its
    // id differently is the same event, and a blank id is none.
    let text = text.trim();
    if let Ok(id) = Uuid::try_parse(text) {
        return if id.is_nil() { Err(format!("eid {NIL_EVENT_ID}")) } else { Ok(id) };
    }
    let chars = text.chars().count();
    if text.is_empty() || chars > MAX_EVENT_ID_LEN {
        return Err(format!("eid must be 1 to {MAX_EVENT_ID_LEN} characters, got {chars}"));
    }
    Ok(scoped_id(b"", text.as_bytes(), ad, kind))
}

/// A stable UUID for `value` (of the sort `tag` names: b"" for a JSON label, b"eid" for a
/// beacon's, b"uuid" for a beacon's UUID) with the ad and kind. The tag's and the value's lengths
/// go first, so that no two (tag, value) pairs feed the hash the same bytes.
fn scoped_id(tag: &[u8], value: &[u8], ad: Uuid, kind: EventKind) -> Uuid {
    let mut h = SipHasher13::new_with_keys(0x6164_6265_6163_6f6e, 0x6576_656e_7420_6964);
    h.write(&(tag.len() as u32).to_le_bytes());
    h.write(tag);
    h.write(&(value.len() as u32).to_le_bytes());
    h.write(value);
    h.write(ad.as_bytes());
    h.write(kind.as_str().as_bytes());
    Uuid::from_u128(h.finish128().as_u128())
}

fn parse(b: &Beacon<'_>) -> Result<Parsed, ApiError> {
    let kind = EventKind::from_name(b.event).ok_or_else(|| {
        ApiError::not_found(format!(
            "unknown tracking event {:?}; use one of impression, creativeView, start, firstQuartile, \
             midpoint, thirdQuartile, complete, skip, pause, resume, mute, unmute, close, error, click",
            b.event
        ))
    })?;
    let ad = b.ad.ok_or_else(|| ApiError::bad_request("ad is required: /t/{event}?ad={adId}"))?;
    let ad_id = Uuid::try_parse(ad).map_err(|_| {
        ApiError::bad_request(format!(
            "ad must be a UUID such as 11111111-1111-1111-1111-111111111111, got {ad:?}"
        ))
    })?;
    let client_time = b.ts.map(vast_time);
    let error_code = match kind {
        EventKind::Error => b
            .code
            .and_then(|c| c.trim().parse().ok())
            .filter(|c| VAST_ERROR_CODES.contains(c))
            .unwrap_or(UNDEFINED_VAST_ERROR),
        _ => 0,
    };
    let event_id = b.eid.and_then(|e| beacon_event_id(e, ad_id, kind));
    Ok(Parsed {
        report: EventReport {
            event_id,
            ad_id,
            kind,
            client_time: client_time.flatten(),
            playback_time: b.pt.and_then(PlaybackTime::playhead),
            error_code,
        },
        bad_timestamp: matches!(client_time, Some(None)),
    })
}

/// Pixel and redirect operations.
pub struct PixelApi {
    /// Shared service state.
    pub state: Arc<State>,
}

impl PixelApi {
    /// Serves `GET /t/{event}` as poem-openapi's generated endpoint for it does, without the
    /// router (see [`Hot`](super::tracking::Hot)): the event taken from the path's one segment
    /// (plain letters and digits, see [`Hot::find`](super::tracking::Hot::find), so the router's
    /// percent-decoding would not change it), each query parameter read as the `Query` extractor
    /// reads it (see [`beacon_query`]), then the operation's own method and its result turned
    /// into a response.
    ///
    /// A plain function returning an `async move` block, as
    /// [`TrackingApi::call_click`](super::tracking::TrackingApi::call_click) is.
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` keeps a second copy of the request in its future"
    )]
    pub fn call_beacon(&self, req: Request) -> impl Future<Output = poem::Result<Response>> + Send + '_ {
        async move {
            use poem::error::IntoResult;
            let event = req.uri().path().strip_prefix("/t/").unwrap_or_default().to_owned();
            let [ad, ts, pt, eid, code, f] = beacon_query(req.uri().query().unwrap_or_default()).map(Query);
            // `cb` is ignored by the operation; not copying it saves an allocation on most beacons.
            match self.beacon(&req, Path(event), ad, ts, pt, Query(None), eid, code, f).await {
                Ok(PixelResponse::Gif(..)) => Ok(gif_response()),
                other => other.into_result().map(poem::IntoResponse::into_response),
            }
        }
    }
}

/// What `PixelResponse::Gif` turns into (a unit test holds them equal), built from static parts:
/// the generated conversion parses the content type and the header's text on every beacon.
fn gif_response() -> Response {
    Response::builder()
        .status(poem::http::StatusCode::OK)
        .header(header::CONTENT_TYPE, HeaderValue::from_static("image/gif"))
        .header(header::CACHE_CONTROL, HeaderValue::from_static(NO_STORE))
        .body(Bytes::from_static(PIXEL_GIF))
}

/// The beacon's query parameters but `cb`, in the order of [`BEACON_PARAMS`], as the `Query`
/// extractor of an optional string reads each: pairs split as `form_urlencoded::parse` splits
/// them, names and values decoded as it decodes them (see [`form_decode`]), names matched
/// exactly, the first occurrence taken. The extractor first decodes every pair into owned
/// strings and scans them once per parameter; this decodes only what it compares or keeps, and
/// copies only the values it keeps: about 4,600 of a beacon's 31,100 instructions (callgrind).
fn beacon_query(query: &str) -> [Option<String>; 6] {
    let mut found: [Option<String>; 6] = Default::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = form_decode(name);
        if let Some(i) = BEACON_PARAMS.iter().position(|p| *p == name) {
            found[i].get_or_insert_with(|| form_decode(value).into_owned());
        }
    }
    found
}

/// A name or value of a form-encoded query, decoded by `form_urlencoded`'s rules: `+` is a
/// space, percent escapes are decoded (malformed ones kept as they are), and bytes that are not
/// UTF-8 are replaced. Borrowed when there is nothing to decode, as in most beacon parameters.
fn form_decode(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.bytes().any(|b| b == b'%' || b == b'+') {
        return text.into();
    }
    let spaced: Vec<u8> = text.bytes().map(|b| if b == b'+' { b' ' } else { b }).collect();
    let decoded: Vec<u8> = percent_encoding::percent_decode(&spaced).collect();
    String::from_utf8_lossy(&decoded).into_owned().into()
}

/// The query parameters of `GET /t/{event}` that [`beacon_query`] reads.
const BEACON_PARAMS: [&str; 6] = ["ad", "ts", "pt", "eid", "code", "f"];

#[OpenApi(tag = "ApiTags::Tracking")]
impl PixelApi {
    /// VAST tracking beacon.
    ///
    /// The tracking URL to write into VAST: `/t/{event}?ad={adId}` with `event` one of
    /// impression, creativeView, start, firstQuartile, midpoint, thirdQuartile, complete, skip,
    /// pause, resume, mute, unmute, close, error (with `code=[ERRORCODE]`) or click. Answers a
    /// transparent 1×1 GIF, or 204 with `f=204`, never cached. A `ts` that is unreadable,
    /// unexpanded, or outside MAX_CLOCK_SKEW / MAX_EVENT_AGE (a device's wrong clock) is
    /// replaced by the server's time, a bad `pt` is left out, an `eid` that cannot be an id
    /// (empty, over 200 characters, an unexpanded macro, -1 or -2) is ignored: none of them loses
    /// the event. With `eid`, a repeated beacon is answered but stored once (per instance, within
    /// an hour and among the last million ids, and for as long as the first still waits to be
    /// stored). 5xx only when the service cannot hold the event.
    #[oai(path = "/t/:event", method = "get", operation_id = "trackBeacon")]
    #[allow(clippy::too_many_arguments)]
    async fn beacon(
        &self,
        req: &Request,
        /// The VAST event name.
        event: Path<String>,
        /// The ad's id.
        ad: Query<Option<String>>,
        /// When it happened: `[TIMESTAMP]`, ISO 8601 with an offset.
        ts: Query<Option<String>>,
        /// Playback position: `[ADPLAYHEAD]`, HH:MM:SS.mmm.
        pt: Query<Option<String>>,
        /// `[CACHEBUSTING]`: ignored; it only defeats caches on the way.
        cb: Query<Option<String>>,
        /// The client's event id, for idempotency: unique to the ad play (`[TRANSACTIONID]`),
        /// taken per ad and event kind.
        eid: Query<Option<String>>,
        /// VAST error code for `error`: `[ERRORCODE]` (900, undefined, when missing, unreadable
        /// or outside VAST's 100 to 999).
        code: Query<Option<String>>,
        /// `204` for an empty answer instead of the GIF.
        f: Query<Option<String>>,
    ) -> Result<PixelResponse, ApiError> {
        let _ = cb;
        let beacon = Beacon::new(&event, &ad, &ts, &pt, &eid, &code);
        let Parsed { report, bad_timestamp } = parse(&beacon)?;
        let caller = self.state.caller(req, None);
        // A time the other endpoints refuse is a device's wrong clock here: the beacon is not
        // fired again, so the server's time stands in, as for an unreadable one.
        let now = OffsetDateTime::now_utc();
        let (at, replaced) = match self.state.event_time(&report, now) {
            Ok(at) => (at, bad_timestamp),
            Err(_) => (now, true),
        };
        if matches!(self.state.accept_at(report, &caller, at, now).await?, Accepted::Stored(_)) && replaced {
            self.state.metrics.event_time_replaced.inc();
        }
        Ok(PixelResponse::new(f.0.as_deref()))
    }

    /// VAST tracking beacon, checked but not recorded.
    ///
    /// Answers what `GET` would (status and headers, no body) without recording anything: link
    /// checkers and prefetchers send HEAD, players fire GET.
    #[oai(path = "/t/:event", method = "head", operation_id = "checkBeacon")]
    #[allow(clippy::too_many_arguments)]
    async fn check_beacon(
        &self,
        /// The VAST event name.
        event: Path<String>,
        /// The ad's id.
        ad: Query<Option<String>>,
        /// As for GET.
        ts: Query<Option<String>>,
        /// As for GET.
        pt: Query<Option<String>>,
        /// As for GET.
        cb: Query<Option<String>>,
        /// As for GET.
        eid: Query<Option<String>>,
        /// As for GET.
        code: Query<Option<String>>,
        /// As for GET.
        f: Query<Option<String>>,
    ) -> Result<PixelResponse, ApiError> {
        let _ = cb;
        let beacon = Beacon::new(&event, &ad, &ts, &pt, &eid, &code);
        // As GET, no timestamp is refused: GET stores the server's time in place of one it
        // cannot use.
        let Parsed { report, .. } = parse(&beacon)?;
        match self.state.catalog.get(report.ad_id).await {
            Ok(Some(_)) => Ok(PixelResponse::new(f.0.as_deref())),
            Ok(None) => Err(ApiError::not_found(format!("ad {} not found", report.ad_id))),
            Err(e) => Err(ApiError::storage(e, self.state.retry_after)),
        }
    }

    /// Click-through, checked but not recorded.
    ///
    /// Answers what `GET` would (the redirect, or 404) without recording a click: link checkers
    /// and prefetchers send HEAD, browsers following a click send GET.
    #[oai(path = "/c/:adId", method = "head", operation_id = "checkClickThrough")]
    async fn check_click_through(
        &self,
        /// The ad's id.
        #[oai(name = "adId")]
        ad_id: Path<super::ads::UuidText>,
    ) -> Result<RedirectResponse, ApiError> {
        let (_, target) = self.click_target(&ad_id.0.0).await?;
        Ok(RedirectResponse::Found(target, NO_STORE.into()))
    }

    /// Click-through.
    ///
    /// The click URL to give browsers and players: records a click and redirects (302) to the
    /// ad's registered target_url, and only there: no parameter can choose the destination.
    /// 404 for an unknown or inactive ad. When the service cannot hold the click, or the client
    /// is over its rate limit, the viewer is still sent on (the click that was not recorded is
    /// counted in `adbeacon_events_rejected_total`).
    #[oai(path = "/c/:adId", method = "get", operation_id = "clickThrough")]
    async fn click_through(
        &self,
        req: &Request,
        /// The ad's id.
        #[oai(name = "adId")]
        ad_id: Path<super::ads::UuidText>,
    ) -> Result<RedirectResponse, ApiError> {
        let (id, target) = self.click_target(&ad_id.0.0).await?;
        if req.data::<super::ratelimit::OverLimit>().is_some() {
            // Over the rate limit: the click is not recorded (counted by the front endpoint),
            // but the viewer still reaches the advertiser.
            return Ok(RedirectResponse::Found(target, NO_STORE.into()));
        }
        let report = EventReport {
            event_id: None,
            ad_id: id,
            kind: EventKind::Click,
            client_time: None,
            playback_time: None,
            error_code: 0,
        };
        match self.state.accept(report, &self.state.caller(req, None)).await {
            Ok(_) | Err(ApiError::Unavailable(..)) => Ok(RedirectResponse::Found(target, NO_STORE.into())),
            Err(e) => Err(e),
        }
    }
}

impl PixelApi {
    /// The ad behind a click-through and where it sends the viewer; 400 for a malformed id, 404
    /// for an unknown or retired ad or one without an http(s) target.
    async fn click_target(&self, text: &str) -> Result<(Uuid, String), ApiError> {
        let id = Uuid::try_parse(text).map_err(|_| {
            ApiError::bad_request(format!(
                "the ad id must be a UUID such as 11111111-1111-1111-1111-111111111111, got {text:?}"
            ))
        })?;
        let ad = match self.state.catalog.get(id).await {
            Ok(Some(ad)) if ad.active => ad,
            Ok(Some(_)) => return Err(ApiError::not_found(format!("ad {id} is not active"))),
            Ok(None) => return Err(ApiError::not_found(format!("ad {id} not found"))),
            Err(e) => return Err(ApiError::storage(e, self.state.retry_after)),
        };
        if !is_sent_url(&ad.target_url) {
            return Err(ApiError::not_found(format!("ad {id} has no http(s) target_url to send clicks to")));
        }
        Ok((id, ad.target_url.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beacon<'a>(event: &'a str, ad: Option<&'a str>) -> Beacon<'a> {
        Beacon { event, ad, ts: None, pt: None, eid: None, code: None }
    }

    const AD: &str = "11111111-1111-1111-1111-111111111111";

    /// `beacon_query` against poem-openapi's own `Query` extractor, fed as its generated endpoint
    /// feeds it, on queries with repeats, empty and bare names, escaped names, `+`, `=` in values,
    /// bad escapes and bytes that are not UTF-8.
    #[tokio::test]
    async fn beacon_query_reads_what_the_query_extractor_reads() {
        use poem_openapi::ApiExtractor;
        let queries = [
            "",
            "ad=11111111-1111-1111-1111-111111111111&ts=2026-11-21T10%3A00%3A00Z&pt=00:00:07.5",
            "ad=first&ad=second&pt=1&pt=2&cb=123&f=204",
            "ad=&ts&pt=a+b%20c&eid=%E2%82%AC&code=%FF%FE&f=%zz",
            "AD=upper&Ad=mixed&ad%3D=x&a=d&=ad&ad",
            "f=204;ad=semicolon&&&eid=e%2Bf+g",
            "a%64=escaped-name&+ad=plus-name&pt=a=b=c&ts=%&code=%4&eid=%C3%A9%e2%82%ac+%2B",
        ];
        for query in queries {
            let mut req = Request::builder().uri(format!("/t/start?{query}").parse().unwrap()).finish();
            let pairs: Vec<(String, String)> = req.params().unwrap_or_default();
            req.extensions_mut().insert(poem_openapi::__private::UrlQuery(pairs));
            let (req, mut body) = req.split();
            let mut expected = Vec::new();
            for name in BEACON_PARAMS {
                let opts = poem_openapi::ExtractParamOptions {
                    name,
                    ignore_case: false,
                    default_value: None,
                    example_value: None,
                    explode: true,
                    style: None,
                };
                expected.push(Query::<Option<String>>::from_request(&req, &mut body, opts).await.unwrap().0);
            }
            assert_eq!(beacon_query(req.uri().query().unwrap_or_default()).to_vec(), expected, "{query}");
        }
    }

    /// The GIF answer built from static parts is the one the operation's generated code builds.
    #[tokio::test]
    async fn the_gif_answer_is_the_generated_one() {
        use poem::IntoResponse;
        let generated = PixelResponse::new(None).into_response();
        let fast = gif_response();
        assert_eq!(fast.status(), generated.status());
        assert_eq!(fast.version(), generated.version());
        let headers = |r: &Response| {
            let mut h: Vec<_> = r.headers().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            h.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
            h
        };
        assert_eq!(headers(&fast), headers(&generated));
        assert_eq!(
            fast.into_body().into_vec().await.unwrap(),
            generated.into_body().into_vec().await.unwrap()
        );
    }

    #[test]
    fn the_gif_is_a_1x1_gif() {
        assert_eq!(PIXEL_GIF.len(), 43);
        assert!(PIXEL_GIF.starts_with(b"GIF89a\x01\x00\x01\x00"));
        assert_eq!(PIXEL_GIF.last(), Some(&0x3b));
    }

    #[test]
    fn beacons_parse_and_tolerate_unexpanded_macros() {
        let mut b = beacon("firstQuartile", Some(AD));
        b.ts = Some("[TIMESTAMP]");
        b.pt = Some("[ADPLAYHEAD]");
        let p = parse(&b).unwrap();
        assert_eq!(p.report.kind, EventKind::FirstQuartile);
        assert!(p.bad_timestamp && p.report.client_time.is_none() && p.report.playback_time.is_none());
        b.ts = Some("2026-11-21T10:00:00.250-05:00");
        b.pt = Some("00:00:07.250");
        let p = parse(&b).unwrap();
        assert!(!p.bad_timestamp);
        assert_eq!(p.report.client_time.unwrap().unix_timestamp(), 1_795_273_200);
        assert_eq!(p.report.playback_time.unwrap().seconds(), 7.25);
        let mut e = beacon("error", Some(AD));
        e.code = Some("[ERRORCODE]");
        assert_eq!(parse(&e).unwrap().report.error_code, 900);
        e.code = Some("405");
        assert_eq!(parse(&e).unwrap().report.error_code, 405);
        assert_eq!(parse(&beacon("start", Some(AD))).unwrap().report.error_code, 0);
    }

    #[test]
    fn bad_beacons_are_refused_with_the_reason() {
        assert!(matches!(parse(&beacon("firstquartile", Some(AD))), Err(ApiError::NotFound(_))));
        assert!(matches!(parse(&beacon("start", None)), Err(ApiError::BadRequest(_))));
        assert!(matches!(parse(&beacon("start", Some("x"))), Err(ApiError::BadRequest(_))));
    }

    #[test]
    fn a_uuid_eid_on_a_beacon_is_taken_per_ad_and_kind() {
        // VAST 4.1's [TRANSACTIONID]: one value on every beacon of an ad request.
        let tx = "5b0c1a52-8a35-4c8b-9a4d-2f0e6b3c9d11";
        let id = |event, ad, eid| {
            let mut b = beacon(event, Some(ad));
            b.eid = Some(eid);
            parse(&b).unwrap().report.event_id.unwrap()
        };
        let start = id("start", AD, tx);
        assert_ne!(start, Uuid::parse_str(tx).unwrap(), "not the event's own id, as in JSON");
        assert_ne!(start, id("impression", AD, tx));
        assert_ne!(start, id("start", "22222222-2222-2222-2222-222222222222", tx));
        assert_eq!(start, id("start", AD, tx), "the same beacon again is a repeat");
        let upper = tx.to_uppercase();
        assert_eq!(start, id("start", AD, &upper), "whatever its spelling");
        assert_ne!(start, id("start", AD, "sess-42-7"));
    }

    #[test]
    fn an_eid_that_cannot_be_an_id_is_ignored_not_refused() {
        let long = "x".repeat(201);
        for eid in [
            "",
            "  ",
            &long,
            "[TRANSACTIONID]",
            "[CACHEBUSTING]",
            "%5BTRANSACTIONID%5D",
            "%5bx%5d",
            "-1",
            "-2",
        ] {
            let mut b = beacon("start", Some(AD));
            b.eid = Some(eid);
            assert_eq!(parse(&b).unwrap().report.event_id, None, "{eid:?}");
        }
        let ad = Uuid::parse_str(AD).unwrap();
        let beacon_id = |eid| {
            let mut b = beacon("start", Some(AD));
            b.eid = Some(eid);
            parse(&b).unwrap().report.event_id
        };
        for eid in ["sess-42-7", "[half", "-3", "%5B"] {
            let id = beacon_id(eid).unwrap_or_else(|| panic!("{eid:?} is an id"));
            assert_eq!(beacon_id(eid), Some(id), "{eid:?}");
            // Its own namespace: a JSON eventId with the same text names another event.
            assert_ne!(Some(id), event_id(eid, ad, EventKind::Start).ok(), "{eid:?}");
        }
        // Spaces around it do not make another id; the nil UUID is none, spaced or not (a `+`
        // in a query is a space).
        assert_eq!(beacon_id(" sess-42-7 "), beacon_id("sess-42-7"));
        assert_eq!(beacon_id(" 00000000-0000-0000-0000-000000000000"), None);
        // The JSON endpoints still refuse these (their callers can fix and resend).
        for bad in ["", "  ", &long, " 00000000-0000-0000-0000-000000000000 "] {
            assert!(event_id(bad, ad, EventKind::Start).is_err(), "{bad:?}");
        }
        assert_eq!(
            event_id(" 5b0c1a52-8a35-4c8b-9a4d-2f0e6b3c9d11\t", ad, EventKind::Start).unwrap().to_string(),
            "5b0c1a52-8a35-4c8b-9a4d-2f0e6b3c9d11"
        );
    }

    #[test]
    fn no_two_sorts_of_id_feed_the_hash_the_same_bytes() {
        let ad = Uuid::parse_str(AD).unwrap();
        // Without the lengths, the tag "uuid" and a UUID's 16 bytes read as a label's text.
        let uuid = Uuid::from_bytes([0x41; 16]);
        assert_ne!(
            scoped_id(b"uuid", uuid.as_bytes(), ad, EventKind::Start),
            scoped_id(b"", b"uuidAAAAAAAAAAAAAAAA", ad, EventKind::Start)
        );
        assert_ne!(scoped_id(b"", b"ab", ad, EventKind::Start), scoped_id(b"a", b"b", ad, EventKind::Start));
    }

    #[test]
    fn an_error_code_outside_vasts_range_is_undefined() {
        for (code, want) in [
            (None, 900),
            (Some("405"), 405),
            (Some(" 100 "), 100),
            (Some("999"), 999),
            (Some("0"), 900),
            (Some("42"), 900),
            (Some("1000"), 900),
            (Some("70000"), 900),
            (Some("[ERRORCODE]"), 900),
        ] {
            let mut b = beacon("error", Some(AD));
            b.code = code;
            assert_eq!(parse(&b).unwrap().report.error_code, want, "{code:?}");
        }
    }

    #[test]
    fn timestamps_are_read_as_players_write_them() {
        use time::macros::datetime;
        let cases = [
            ("2026-11-21T10:00:00Z", datetime!(2026-11-21 10:00:00 UTC)),
            ("2026-11-21T10:00:00.250+02:00", datetime!(2026-11-21 10:00:00.25 +02:00)),
            // VAST 4's own example of [TIMESTAMP]: a one-digit hour, an offset in whole hours.
            ("2016-01-17T8:15:07.127-05", datetime!(2016-01-17 08:15:07.127 -05:00)),
            ("2016-01-17T08:15:07-0500", datetime!(2016-01-17 08:15:07 -05:00)),
            // An offset's `+` that the URL did not encode arrives as a space.
            ("2026-11-21T10:00:00 02:00", datetime!(2026-11-21 10:00:00 +02:00)),
            ("2026-11-21T10:00:00.123 0530", datetime!(2026-11-21 10:00:00.123 +05:30)),
            ("2026-11-21 10:00:00z", datetime!(2026-11-21 10:00:00 UTC)),
            ("2026-11-21T10:00:00.1234567891Z", datetime!(2026-11-21 10:00:00.123456789 UTC)),
        ];
        for (text, want) in cases {
            assert_eq!(vast_time(text), Some(want), "{text}");
        }
        for text in [
            "[TIMESTAMP]",
            "-1",
            "",
            "2026-11-21T10:00:00",
            "2026-11-21T10:00Z",
            "2026-11-21T24:00:00Z",
            "2026-02-30T10:00:00Z",
            "2026-11-21T10:00:00+2",
            "2026-11-21T10:00:00+24",
            "2026-11-21T10:00:00Zjunk",
            "2026-11-21T10:00:00.Z",
            "2026-11-21T123:00:00Z",
        ] {
            assert_eq!(vast_time(text), None, "{text}");
        }
    }

    #[test]
    fn event_ids_are_stable_per_ad_and_kind() {
        let ad = Uuid::parse_str(AD).unwrap();
        let other = Uuid::nil();
        let u = "5b0c1a52-8a35-4c8b-9a4d-2f0e6b3c9d11";
        assert_eq!(event_id(u, ad, EventKind::Start).unwrap().to_string(), u);
        let id = |e: &str, ad, k| event_id(e, ad, k).unwrap();
        assert_eq!(id("sess-42", ad, EventKind::Start), id("sess-42", ad, EventKind::Start));
        assert_ne!(id("sess-42", ad, EventKind::Start), id("sess-43", ad, EventKind::Start));
        assert_ne!(id("sess-42", ad, EventKind::Start), id("sess-42", other, EventKind::Start));
        assert_ne!(id("sess-42", ad, EventKind::Start), id("sess-42", ad, EventKind::Complete));
    }
}
