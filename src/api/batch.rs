//! `POST /ads/events`: up to [`MAX_BATCH_EVENTS`] typed events in one request, for SDKs and ad
//! servers, with a result per item. Items are judged one by one (a bad item never sinks the
//! others), and the good ones are held all together or not at all: a 202 means every item marked
//! accepted is held, a 503 that none is.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use poem::{Request, RequestBody, http::StatusCode};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ApiResponse, Enum, ExtractParamOptions, Object, OpenApi,
    registry::{MetaRequest, MetaSchemaRef, Registry},
    types::Type,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    ApiTags, Claim, Claims, State,
    body::{BodyLimit, JSON_UTF8, describe_malformed, json_or_text, malformed, read_body},
    error::ApiError,
    event_ids::Seqs,
    pixel::event_id,
    tracking::{ad_id, ip, one_of, rfc3339, uuid},
};
use crate::{
    domain::{EventKind, EventReport, PlaybackTime, Traffic},
    metrics::RejectReason,
};

/// The most events one batch may hold.
pub const MAX_BATCH_EVENTS: usize = 1000;

/// One event of a batch. camelCase as shown, or snake_case (`event_id`, `ad_id`, …).
#[derive(Debug, Object, Deserialize)]
#[oai(rename_all = "camelCase", example, skip_serializing_if_is_none)]
pub struct BatchEvent {
    /// Your id of the event (a UUID other than the nil one, or any string up to 200
    /// characters): a repeat is reported as `duplicate` and stored once (on the same instance,
    /// within an hour and among the last million ids it took, and for as long as the first
    /// still waits to be stored).
    #[serde(rename = "eventId", default)]
    #[oai(nullable)]
    pub event_id: Option<String>,
    /// The ad's id.
    #[serde(rename = "adId", default, deserialize_with = "uuid")]
    #[oai(nullable)]
    pub ad_id: Option<Uuid>,
    /// impression, click, or a VAST event: creativeView, start, firstQuartile, midpoint,
    /// thirdQuartile, complete, skip, pause, resume, mute, unmute, close, error (snake_case
    /// names such as first_quartile work too).
    pub kind: String,
    /// When it happened, RFC 3339. Absent: server time. More than MAX_CLOCK_SKEW ahead or
    /// MAX_EVENT_AGE behind: the item is rejected.
    #[serde(default, deserialize_with = "rfc3339")]
    #[oai(nullable)]
    pub timestamp: Option<OffsetDateTime>,
    /// Seconds into the video.
    #[serde(rename = "playbackTime", default)]
    #[oai(nullable)]
    pub playback_time: Option<f64>,
    /// VAST error code (100 to 999), for `error` (900, undefined, when absent).
    #[serde(rename = "errorCode", default)]
    #[oai(nullable)]
    pub error_code: Option<u16>,
    /// Alternative spelling of `eventId`.
    #[oai(rename = "event_id", nullable)]
    #[serde(rename = "event_id", default)]
    pub event_id_snake: Option<String>,
    /// Alternative spelling of `adId`.
    #[oai(rename = "ad_id", nullable)]
    #[serde(rename = "ad_id", default, deserialize_with = "uuid")]
    pub ad_id_snake: Option<Uuid>,
    /// Alternative spelling of `playbackTime`.
    #[oai(rename = "playback_time", nullable)]
    #[serde(rename = "playback_time", default)]
    pub playback_time_snake: Option<f64>,
    /// Alternative spelling of `errorCode`.
    #[oai(rename = "error_code", nullable)]
    #[serde(rename = "error_code", default)]
    pub error_code_snake: Option<u16>,
    /// The viewer's IP, for a server-side caller sending events of many viewers (server-side ad
    /// insertion). It counts only when the caller's key has the ingest scope, like `X-Device-IP`
    /// for the whole request; from anyone else it is checked and ignored.
    #[oai(nullable)]
    #[serde(rename = "ipAddress", default, deserialize_with = "ip")]
    pub ip_address: Option<IpAddr>,
    /// The viewer's user agent, like `X-Device-User-Agent`: counts only for the ingest scope.
    #[oai(nullable, validator(max_length = 1024))]
    #[serde(rename = "userAgent", default)]
    pub user_agent: Option<String>,
}

/// The longest `userAgent` of an item (the schema's `max_length` says the same).
const MAX_USER_AGENT: usize = 1024;

/// One item after the first pass: ready to be stored (with its event time and viewer), or
/// refused with the reason it is counted under and the message for its result.
type Judged = Result<(EventReport, OffsetDateTime, Device), (RejectReason, String)>;

/// What a server-side caller says about the viewer of one batch item.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Device {
    /// The viewer's address.
    pub ip: Option<IpAddr>,
    /// The viewer's user agent.
    pub user_agent: Option<String>,
}

impl poem_openapi::types::Example for BatchEvent {
    fn example() -> Self {
        BatchEvent {
            event_id: Some("sess-42-q1".into()),
            ad_id: Some(super::tracking::EXAMPLE_AD),
            kind: "firstQuartile".into(),
            timestamp: None,
            playback_time: Some(7.5),
            error_code: None,
            event_id_snake: None,
            ad_id_snake: None,
            playback_time_snake: None,
            error_code_snake: None,
            ip_address: None,
            user_agent: None,
        }
    }
}

impl TryFrom<BatchEvent> for EventReport {
    type Error = String;

    fn try_from(e: BatchEvent) -> Result<Self, String> {
        let kind = EventKind::from_name(&e.kind).ok_or_else(|| {
            format!(
                "kind {:?} is not an event kind; use impression, click, creativeView, start, firstQuartile, \
                 midpoint, thirdQuartile, complete, skip, pause, resume, mute, unmute, close or error",
                e.kind
            )
        })?;
        let ad_id = ad_id([("adId", e.ad_id), ("ad_id", e.ad_id_snake)])?;
        let event_id = one_of([("eventId", e.event_id), ("event_id", e.event_id_snake)])?
            .map(|(name, id)| event_id(&id, ad_id, kind).map_err(|m| m.replacen("eid", name, 1)))
            .transpose()?;
        let playback_time =
            one_of([("playbackTime", e.playback_time), ("playback_time", e.playback_time_snake)])?
                .map(|(name, s)| PlaybackTime::new(s).map_err(|m| format!("{name} {m}")))
                .transpose()?;
        let code = one_of([("errorCode", e.error_code), ("error_code", e.error_code_snake)])?;
        let error_code = match (kind, code) {
            (EventKind::Error, Some((_, c))) if super::pixel::VAST_ERROR_CODES.contains(&c) => c,
            (EventKind::Error, Some((name, c))) => {
                return Err(format!("{name} must be a VAST error code, 100 to 999, got {c}"));
            }
            (EventKind::Error, None) => super::pixel::UNDEFINED_VAST_ERROR,
            _ => 0,
        };
        Ok(EventReport { event_id, ad_id, kind, client_time: e.timestamp, playback_time, error_code })
    }
}

/// What became of one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Serialize)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ItemStatus {
    /// Held for storage.
    Accepted,
    /// A repeat, not counted: its eventId was accepted before (not stored again), or an event
    /// of the same ad, client and kind was counted within DEDUP_WINDOW (stored, flagged as
    /// filtered traffic).
    Duplicate,
    /// Not stored; `error` says why. Sending it again as it is gets the same answer.
    Rejected,
    /// Not stored now: another request is storing an event with this eventId and may still
    /// fail. Send the item again, with the same eventId, after a moment: it is then stored, or
    /// answered as a duplicate.
    Retry,
}

/// The result of one item, in request order.
#[derive(Debug, Object, Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ItemResult {
    /// The item's position in the request, from 0.
    pub index: u32,
    /// accepted, duplicate, rejected or retry.
    pub status: ItemStatus,
    /// The event's id as stored: your `eventId` when it is a UUID; for any other string, a
    /// UUID derived from it, the ad and the kind (the same for the same three); without one, the
    /// id the server gave it. Absent when rejected.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<Uuid>,
    /// Why it was rejected, or is to be sent again; absent otherwise.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Answer of a batch.
#[derive(Debug, Object, Serialize)]
#[oai(example)]
pub struct BatchResult {
    /// Items held for storage (those from bots and empty user agents too: they are stored,
    /// flagged, and the answer does not tell them apart).
    pub accepted: u32,
    /// Items that repeat earlier ones (see `duplicate` in the results).
    pub duplicates: u32,
    /// Items refused.
    pub rejected: u32,
    /// Items to send again (see `retry` in the results).
    pub retry: u32,
    /// One entry per item, in request order.
    pub results: Vec<ItemResult>,
}

impl poem_openapi::types::Example for BatchResult {
    fn example() -> Self {
        let item = |index, status, event_id: Option<&str>, error: Option<&str>| ItemResult {
            index,
            status,
            event_id: event_id.map(|id| Uuid::parse_str(id).expect("a valid example id")),
            error: error.map(String::from),
        };
        BatchResult {
            accepted: 1,
            duplicates: 1,
            rejected: 1,
            retry: 0,
            results: vec![
                item(0, ItemStatus::Accepted, Some("0d6f4c1e-9a0b-4c55-8f1e-2b7a9c3d4e5f"), None),
                item(1, ItemStatus::Duplicate, Some("5b1d8f52-0a47-4b8e-9f0e-3c1f6f0c2a11"), None),
                item(
                    2,
                    ItemStatus::Rejected,
                    None,
                    Some("events[2]: kind \"quartile\" is not an event kind"),
                ),
            ],
        }
    }
}

impl ItemStatus {
    /// The status as the answer spells it (serde's name).
    fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Accepted => "accepted",
            ItemStatus::Duplicate => "duplicate",
            ItemStatus::Rejected => "rejected",
            ItemStatus::Retry => "retry",
        }
    }
}

impl BatchResult {
    /// The answer's JSON text, byte for byte what serde_json writes for it (a test holds the two
    /// equal), written directly: the names, statuses and ids need no escaping, and serde_json
    /// checked each of their characters. An item's result took about 1,400 instructions that
    /// way, a seventh of a batch's instructions per event (callgrind, 100 events with ids).
    fn json_text(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(80 + 72 * self.results.len());
        let mut number = itoa::Buffer::new();
        for (name, n) in [
            (&b"{\"accepted\":"[..], self.accepted),
            (b",\"duplicates\":", self.duplicates),
            (b",\"rejected\":", self.rejected),
            (b",\"retry\":", self.retry),
        ] {
            out.extend_from_slice(name);
            out.extend_from_slice(number.format(n).as_bytes());
        }
        out.extend_from_slice(b",\"results\":[");
        for (k, item) in self.results.iter().enumerate() {
            if k > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"index\":");
            out.extend_from_slice(number.format(item.index).as_bytes());
            out.extend_from_slice(b",\"status\":\"");
            out.extend_from_slice(item.status.as_str().as_bytes());
            out.push(b'"');
            if let Some(id) = item.event_id {
                out.extend_from_slice(b",\"eventId\":\"");
                out.extend_from_slice(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()).as_bytes());
                out.push(b'"');
            }
            if let Some(error) = &item.error {
                out.extend_from_slice(b",\"error\":");
                // Free text: serde_json escapes it. Writing a string into a Vec cannot fail.
                serde_json::to_writer(&mut out, error).expect("a string written into memory");
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// A batch's answer as a payload: documented as [`BatchResult`]'s JSON, written by
/// [`BatchResult::json_text`].
#[derive(Debug)]
pub struct BatchJson(pub BatchResult);

impl poem_openapi::payload::Payload for BatchJson {
    const CONTENT_TYPE: &'static str = JSON_UTF8;

    fn schema_ref() -> MetaSchemaRef {
        BatchResult::schema_ref()
    }

    fn register(registry: &mut Registry) {
        BatchResult::register(registry);
    }
}

impl poem::IntoResponse for BatchJson {
    fn into_response(self) -> poem::Response {
        poem::Response::builder()
            .header(poem::http::header::CONTENT_TYPE, poem::http::HeaderValue::from_static(JSON_UTF8))
            .body(self.0.json_text())
    }
}

/// Answer of `POST /ads/events`.
#[derive(Debug, ApiResponse)]
pub enum BatchResponse {
    /// Every item judged; those marked accepted are held.
    #[oai(status = 202)]
    Accepted(BatchJson),
}

/// The body of a batch: a JSON array of events, each parsed on its own from its raw JSON text so
/// that a bad one is reported on its own instead of failing the whole request. Parsed straight
/// into a [`BatchEvent`]: through `serde_json::Value` it cost about a third of the endpoint's CPU.
pub struct EventBatch(pub Vec<Result<(EventReport, Device), String>>);

impl<'a> ApiExtractor<'a> for EventBatch {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        Vec::<BatchEvent>::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(json_or_text(
            "A JSON array of at most 1000 events; also accepted as text/plain",
            Vec::<BatchEvent>::schema_ref,
        ))
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let bytes = read_body(request, body, BodyLimit::of(request, 1 << 20)).await?;
        parse_batch(&bytes).map(EventBatch)
    }
}

/// A batch's body, item by item: each parsed, or why not. The whole body is refused when it is
/// not a JSON array (400) or holds too many items (413).
fn parse_batch(bytes: &[u8]) -> poem::Result<Vec<Result<(EventReport, Device), String>>> {
    // The items' texts: split by a scan that checks only the array's own commas and
    // brackets, then each item parsed by serde as before. Any doubt (not UTF-8, not shaped
    // like an array, too many items) goes to serde's reading of the whole body, as does any
    // item that fails below, so every refusal reads as it did. When every item parses, the
    // body is a valid array of exactly those items: JSON's grammar composes.
    let fast =
        std::str::from_utf8(bytes).ok().and_then(split_items).filter(|items| items.len() <= MAX_BATCH_EVENTS);
    let items = match fast {
        Some(items) => items,
        None => raw_items(bytes)?,
    };
    if items.len() > MAX_BATCH_EVENTS {
        return Err(poem::Error::from_string(
            format!("a batch holds at most {MAX_BATCH_EVENTS} events; this one has {}", items.len()),
            StatusCode::PAYLOAD_TOO_LARGE,
        ));
    }
    let parsed: Vec<_> = items.iter().map(|text| parse_item(text)).collect();
    // Reading the raw items checks the syntax, not the depth or the range of numbers: when
    // an item failed, the whole body is read once more as JSON, so that a body nested too
    // deeply or holding 1e999 is refused as a whole, like any body that is not JSON. This
    // also refuses a body the scan split wrongly: only a body that is not JSON can be split
    // wrongly, and serde's error for it is the one serde's own split would have led to.
    if parsed.iter().any(Result::is_err)
        && let Err(e) = serde_json::from_slice::<serde_json::Value>(bytes)
    {
        return Err(malformed(describe_malformed(bytes, &e)));
    }
    Ok(parsed)
}

/// The items of a body that is a JSON array, each as its raw text, read by serde; a body of
/// another shape, or not JSON at all, is refused with a message that says which.
fn raw_items(bytes: &[u8]) -> poem::Result<Vec<&str>> {
    match serde_json::from_slice::<Vec<&RawValue>>(bytes) {
        Ok(items) => Ok(items.into_iter().map(RawValue::get).collect()),
        Err(_) => Err(malformed(match serde_json::from_slice::<serde_json::Value>(bytes) {
            Ok(_) => "request body must be a JSON array of events".into(),
            Err(e) => describe_malformed(bytes, &e),
        })),
    }
}

/// Splits text shaped like a JSON array into its items' texts, without their surrounding
/// whitespace, as serde's raw values give them; `None` when the text is not shaped so. Only
/// the array's structure is checked: the commas and brackets outside strings, and that nothing
/// follows the array. The items themselves are left to serde. For a valid array the split is
/// serde's; for anything else, at least one item's text is not valid JSON.
///
/// serde's reading of the raw items took about a fifth of a batch's instructions (callgrind, 100 events
/// with ids: 1,890 instructions an event), reading every string and value through its parser.
fn split_items(text: &str) -> Option<Vec<&str>> {
    let b = text.as_bytes();
    // JSON's whitespace, not Rust's: serde refuses a form feed, so an item holding one fails.
    let skip_ws = |mut i: usize| {
        while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            i += 1;
        }
        i
    };
    let mut i = skip_ws(0);
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let mut items = Vec::new();
    i = skip_ws(i + 1);
    if b.get(i) == Some(&b']') {
        return (skip_ws(i + 1) == b.len()).then_some(items);
    }
    loop {
        let start = i;
        let mut depth = 0usize;
        // To the item's end: a comma or a closing bracket outside strings and nested values.
        loop {
            match *b.get(i)? {
                b'"' => {
                    // To the closing quote, past escaped characters (an escaped quote too).
                    i += 1;
                    loop {
                        let at = i + memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
                        if b[at] == b'"' {
                            i = at + 1;
                            break;
                        }
                        i = at + 2;
                    }
                }
                b'[' | b'{' => {
                    depth += 1;
                    i += 1;
                }
                b']' | b'}' if depth > 0 => {
                    depth -= 1;
                    i += 1;
                }
                b']' | b'}' | b',' if depth == 0 => break,
                _ => i += 1,
            }
        }
        let mut end = i;
        while end > start && matches!(b[end - 1], b' ' | b'\t' | b'\n' | b'\r') {
            end -= 1;
        }
        if end == start {
            return None; // `[,` or `[1,]`: no item where one must be
        }
        items.push(text.get(start..end)?);
        match b[i] {
            b',' => i = skip_ws(i + 1),
            b']' => return (skip_ws(i + 1) == b.len()).then_some(items),
            _ => return None, // a `}` closing the array
        }
    }
}

/// Parses one item, naming the field that is wrong.
fn parse_item(text: &str) -> Result<(EventReport, Device), String> {
    if !text.starts_with('{') {
        return Err("must be a JSON object".into());
    }
    // The fast path: plain serde. Only a failure pays for a second, path-tracking parse that
    // names the offending field.
    let item: BatchEvent = match serde_json::from_str(text) {
        Ok(item) => item,
        Err(_) => {
            let mut de = serde_json::Deserializer::from_str(text);
            let item = serde_path_to_error::deserialize(&mut de).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                if path == "." {
                    inner
                } else if inner.starts_with("must ") {
                    format!("{path} {inner}")
                } else {
                    format!("{path}: {inner}")
                }
            })?;
            // What follows the object: nothing in an item serde's raw values gave, but the split
            // of `split_items` leaves it to this check (and the body is then refused whole).
            de.end().map_err(|e| e.to_string())?;
            item
        }
    };
    // The schema's max_length documents the limit; parsing with serde does not apply it.
    if let Some(ua) = &item.user_agent
        && ua.chars().count() > MAX_USER_AGENT
    {
        return Err(format!(
            "userAgent must be at most {MAX_USER_AGENT} characters, got {}",
            ua.chars().count()
        ));
    }
    let device = Device { ip: item.ip_address, user_agent: item.user_agent.clone() };
    Ok((EventReport::try_from(item)?, device))
}

/// Batch operations.
pub struct BatchApi {
    /// Shared service state.
    pub state: Arc<State>,
}

#[OpenApi(tag = "ApiTags::Tracking")]
impl BatchApi {
    /// Record a batch of events.
    ///
    /// Up to 1000 typed events; answers 202 with a result per item: accepted, duplicate (its
    /// eventId was accepted before, or it repeats a counted event within DEDUP_WINDOW),
    /// rejected with the reason, or retry (another request is storing an event with its eventId
    /// right now: send the item again). The accepted ones are held all
    /// together: when the service cannot hold them, the answer is 503 and none is stored. More
    /// than 1000 items, or a body over MAX_BATCH_BODY_BYTES, is a 413.
    #[oai(path = "/ads/events", method = "post", operation_id = "recordEvents")]
    async fn record(&self, req: &Request, body: EventBatch) -> Result<BatchResponse, ApiError> {
        let st = &self.state;
        let n = body.0.len();
        // First everything that waits: parse every item and resolve every distinct ad once.
        let mut judged: Vec<Judged> = Vec::with_capacity(n);
        let mut known: HashMap<Uuid, bool> = HashMap::new();
        let now = OffsetDateTime::now_utc();
        for (index, parsed) in body.0.into_iter().enumerate() {
            let (report, device) = match parsed {
                Ok(parsed) => parsed,
                Err(e) => {
                    judged.push(Err((RejectReason::Invalid, format!("events[{index}]: {e}"))));
                    continue;
                }
            };
            let at = match st.event_time(&report, now) {
                Ok(at) => at,
                Err(e) => {
                    judged.push(Err((RejectReason::BadTimestamp, format!("events[{index}]: {e}"))));
                    continue;
                }
            };
            let exists = match known.get(&report.ad_id) {
                Some(exists) => *exists,
                None => match st.catalog.get(report.ad_id).await {
                    Ok(ad) => *known.entry(report.ad_id).or_insert(ad.is_some()),
                    Err(e) => {
                        st.metrics.rejected(RejectReason::CatalogUnavailable);
                        return Err(ApiError::storage(e, st.retry_after));
                    }
                },
            };
            judged.push(if exists {
                Ok((report, at, device))
            } else {
                Err((RejectReason::UnknownAd, format!("events[{index}]: ad {} not found", report.ad_id)))
            });
        }
        // Then, without waiting, claim the event ids and hold the rows: a claim never outlives a
        // request that could still fail after it.
        let caller = st.caller(req, None);
        let mut results = Vec::with_capacity(n);
        let mut rows = Vec::with_capacity(n);
        let mut claims = Claims::default();
        let ids: Vec<Uuid> = judged.iter().filter_map(|j| j.as_ref().ok()?.0.event_id).collect();
        let mut claimed = st.claim_all(&ids, &mut claims).into_iter();
        // The repeated ids, and what their first requests wait for (`committed` mode).
        let (mut repeated_ids, mut repeated) = (Vec::new(), Vec::new());
        let (mut duplicates, mut rejected, mut retry, mut repeats) = (0, 0, 0, 0);
        for (index, item) in judged.into_iter().enumerate() {
            let index = index as u32;
            let (report, at, device) = match item {
                Ok(item) => item,
                Err((reason, error)) => {
                    st.metrics.rejected(reason);
                    rejected += 1;
                    results.push(ItemResult {
                        index,
                        status: ItemStatus::Rejected,
                        event_id: None,
                        error: Some(error),
                    });
                    continue;
                }
            };
            if let Some(id) = report.event_id {
                match claimed.next().expect("a claim per id") {
                    Claim::Fresh => {}
                    Claim::Held(held) => {
                        if !held.is_empty() {
                            repeated_ids.push(id);
                            repeated.push(held);
                        }
                        repeats += 1;
                        duplicates += 1;
                        results.push(ItemResult {
                            index,
                            status: ItemStatus::Duplicate,
                            event_id: Some(id),
                            error: None,
                        });
                        continue;
                    }
                    Claim::InFlight => {
                        st.metrics.rejected(RejectReason::InFlight);
                        retry += 1;
                        let error =
                            format!("event {id} is being stored by another request; send this item again");
                        results.push(ItemResult {
                            index,
                            status: ItemStatus::Retry,
                            event_id: Some(id),
                            error: Some(error),
                        });
                        continue;
                    }
                }
            }
            let row = st.stamp(&report, at, now, &st.for_device(&caller, &device), &mut claims);
            let status = if row.traffic == Traffic::Duplicate {
                duplicates += 1;
                ItemStatus::Duplicate
            } else {
                ItemStatus::Accepted
            };
            results.push(ItemResult { index, status, event_id: Some(row.event_id), error: None });
            rows.push(row);
        }
        let accepted = results.iter().filter(|r| r.status == ItemStatus::Accepted).count() as u32;
        // A 2xx acknowledges the duplicates too: in `committed` mode their events must be
        // confirmed as well (one wait, for the last of them). Before this batch's new items are
        // held: a 503 for the repeats then holds none of them, and the batch sent again stores
        // them once, with or without event ids (held first, they were stored, and stored again
        // by each retry of a batch whose repeat went to the spill).
        // Returning (or the client hanging up meanwhile) drops the claims, which gives the new
        // items' event ids and repeat-rule marks back. Until the batch's 2xx the repeated ids
        // count as unanswered: a 503 for its new items, or a client that hangs up, leaves them
        // to be retried as well.
        let unanswered = st.event_ids.until_answered(repeated_ids, Seqs::Each(repeated.clone()));
        repeated.dedup();
        st.repeats_confirmed(&repeated).await?;
        if !rows.is_empty() {
            st.hold(rows, claims).await?;
        }
        unanswered.answered();
        // Counted once the batch is answered 2xx: after a 503 the client sends them again.
        st.metrics.event_id_repeats.inc_by(repeats);
        Ok(BatchResponse::Accepted(BatchJson(BatchResult { accepted, duplicates, rejected, retry, results })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `parse_item` of a JSON value, as the body's array hands it over.
    fn parse(v: serde_json::Value) -> Result<(EventReport, Device), String> {
        parse_item(serde_json::value::to_raw_value(&v).unwrap().get())
    }

    #[test]
    fn items_parse_or_say_why_not() {
        let ok = serde_json::json!({"adId": "11111111-1111-1111-1111-111111111111", "kind": "firstQuartile",
            "eventId": "abc", "playbackTime": 7.5});
        let (r, _) = parse(ok).unwrap();
        assert_eq!((r.kind, r.playback_time.unwrap().seconds()), (EventKind::FirstQuartile, 7.5));
        assert_eq!(r.event_id, Some(event_id("abc", r.ad_id, r.kind).unwrap()));
        let e = parse(serde_json::json!({"adId": "x", "kind": "start"})).unwrap_err();
        assert!(e.starts_with("adId must be a UUID"), "{e}");
        let e = parse(serde_json::json!({"adId": "11111111-1111-1111-1111-111111111111", "kind": "view"}))
            .unwrap_err();
        assert!(e.starts_with("kind \"view\" is not an event kind"), "{e}");
        let e = parse(serde_json::json!({"kind": "start"})).unwrap_err();
        assert!(e.contains("adId is required"), "{e}");
        assert!(parse(serde_json::json!(5)).unwrap_err().contains("JSON object"));
        let err = serde_json::json!({"adId": "11111111-1111-1111-1111-111111111111", "kind": "error"});
        assert_eq!(parse(err).unwrap().0.error_code, 900);
        let coded = |code: u32, name: &str| {
            let mut v = serde_json::json!({"adId": "11111111-1111-1111-1111-111111111111", "kind": "error"});
            v[name] = code.into();
            parse(v).map(|(r, _)| r.error_code)
        };
        assert_eq!(coded(405, "errorCode"), Ok(405));
        assert_eq!(coded(100, "error_code"), Ok(100));
        assert_eq!(
            coded(0, "errorCode"),
            Err("errorCode must be a VAST error code, 100 to 999, got 0".into())
        );
        assert_eq!(
            coded(1000, "error_code"),
            Err("error_code must be a VAST error code, 100 to 999, got 1000".into())
        );
        // Not an error event: its code is not looked at.
        let start = serde_json::json!({"adId": "11111111-1111-1111-1111-111111111111", "kind": "start",
            "errorCode": 0});
        assert_eq!(parse(start).unwrap().0.error_code, 0);
        // A blank eventId is none of an event's: refused, not taken as a label.
        let blank = serde_json::json!({"adId": "11111111-1111-1111-1111-111111111111", "kind": "start",
            "eventId": "   "});
        assert_eq!(parse(blank).unwrap_err(), "eventId must be 1 to 200 characters, got 0");
        let ua = |n: usize| {
            serde_json::json!({"adId": "11111111-1111-1111-1111-111111111111", "kind": "start",
                "userAgent": "é".repeat(n)})
        };
        assert_eq!(parse(ua(1024)).unwrap().1.user_agent.map(|u| u.chars().count()), Some(1024));
        let e = parse(ua(1025)).unwrap_err();
        assert_eq!(e, "userAgent must be at most 1024 characters, got 1025");
    }

    #[test]
    fn the_answer_is_written_as_the_spec_says() {
        use poem_openapi::types::{Example, ToJSON};
        let answer = BatchResult::example();
        assert_eq!(serde_json::to_value(&answer).unwrap(), answer.to_json().unwrap());
    }

    #[test]
    fn items_are_judged_one_by_one_from_the_raw_body() {
        let body = " [ {\"kind\" : \"start\"} ,\n 5, [], {\"adId\":\"11111111-1111-1111-1111-111111111111\",\"kind\":\"start\",\"playbackTime\":\"x\"} ] ";
        let items: Vec<Box<RawValue>> = serde_json::from_str(body).unwrap();
        let results: Vec<_> = items.iter().map(|raw| parse_item(raw.get()).map(|_| ())).collect();
        assert!(results[0].as_ref().unwrap_err().contains("adId is required"), "{results:?}");
        assert!(results[1].as_ref().unwrap_err().contains("JSON object"), "{results:?}");
        assert!(results[2].as_ref().unwrap_err().contains("JSON object"), "{results:?}");
        assert!(results[3].as_ref().unwrap_err().starts_with("playbackTime: "), "{results:?}");
    }

    /// A small deterministic generator (xorshift), so that a failure comes back on every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len())]
        }
    }

    /// The body's reading before the split of [`split_items`]: serde's raw values, then each item.
    fn read_as_before(bytes: &[u8]) -> poem::Result<Vec<Result<(EventReport, Device), String>>> {
        let items = raw_items(bytes)?;
        if items.len() > MAX_BATCH_EVENTS {
            return Err(poem::Error::from_string("too many", StatusCode::PAYLOAD_TOO_LARGE));
        }
        let parsed: Vec<_> = items.iter().map(|text| parse_item(text)).collect();
        if parsed.iter().any(Result::is_err)
            && let Err(e) = serde_json::from_slice::<serde_json::Value>(bytes)
        {
            return Err(malformed(describe_malformed(bytes, &e)));
        }
        Ok(parsed)
    }

    /// What a client would see of a reading: each item's outcome, or the status and message.
    fn seen(read: poem::Result<Vec<Result<(EventReport, Device), String>>>) -> String {
        match read {
            Ok(items) => format!("{items:?}"),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => "413".into(),
            Err(e) => format!("{} {e}", e.status()),
        }
    }

    #[test]
    fn the_split_is_serdes_and_every_body_reads_as_before() {
        let items = [
            r#"{"adId":"11111111-1111-1111-1111-111111111111","kind":"start","eventId":"0e5c3c1e-2bd4-4c5e-9a0f-000000000001"}"#,
            r#"{"adId":"11111111-1111-1111-1111-111111111111","kind":"click","playbackTime":12.5,"timestamp":"2026-11-25T00:00:00Z"}"#,
            r#"{ "ad_id" : "22222222-2222-2222-2222-222222222222" , "kind" : "complete", "userAgent": "Mozilla/5.0 \"quoted\" é ] } [ {" }"#,
            r#"{"adId":"11111111-1111-1111-1111-111111111111","kind":"impression","extra":[1,{"a":"]}\\\",["},[[]],"x\\\\"]}"#,
            r#"{"adId":"11111111-1111-1111-1111-111111111111","kind":"midpoint","n":1e999}"#,
            r#"{"adId":"x","kind":"start"}"#,
            r#"{"kind":"quartile"}"#,
            r#"{"adId":"11111111-1111-1111-1111-111111111111","kind":"start","adId":"11111111-1111-1111-1111-111111111111"}"#,
            "5",
            "[]",
            "\"text, with ] and }\"",
            "null",
            "{}",
            "[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]",
        ];
        // Mostly JSON's whitespace; now and then a form feed or a no-break space, which are not.
        let mut gaps = vec![""; 8];
        gaps.extend([" ", "\n", "\t \r\n", "  ", " \n", "\r", "\u{c}", "\u{a0}"]);
        let noise = ["[", "]", "{", "}", ",", "\"", "\\", ":", "\u{c}", "é", "1", " "];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut cases, mut fast, mut valid) = (0, 0, 0);
        for round in 0..20_000 {
            let mut body = String::from(rng.pick(&gaps));
            body.push('[');
            for k in 0..rng.below(6) {
                if k > 0 {
                    body.push_str(rng.pick(&gaps));
                    body.push(',');
                }
                body.push_str(rng.pick(&gaps));
                body.push_str(rng.pick(&items));
            }
            body.push_str(rng.pick(&gaps));
            body.push(']');
            body.push_str(rng.pick(&gaps));
            // Most bodies damaged: a character inserted, one removed, or the end cut off.
            let mut bytes = body.into_bytes();
            match round % 4 {
                0 => {}
                1 => {
                    let at = rng.below(bytes.len() + 1);
                    let bit = rng.pick(&noise).as_bytes().to_vec();
                    bytes.splice(at..at, bit);
                }
                2 => {
                    bytes.remove(rng.below(bytes.len()));
                }
                _ => bytes.truncate(rng.below(bytes.len())),
            }
            let before = raw_items(&bytes);
            let split = std::str::from_utf8(&bytes).ok().and_then(split_items);
            if let Ok(items) = &before {
                valid += 1;
                assert_eq!(split.as_ref(), Some(items), "{:?}", String::from_utf8_lossy(&bytes));
            }
            fast += usize::from(split.is_some());
            assert_eq!(
                seen(parse_batch(&bytes)),
                seen(read_as_before(&bytes)),
                "{:?}",
                String::from_utf8_lossy(&bytes)
            );
            cases += 1;
        }
        // The cases cover both sides: bodies that read, and bodies split but refused.
        assert!(valid > 3_000 && fast > valid + 1_000, "{cases} cases, {valid} valid, {fast} split");
    }

    #[test]
    fn a_batch_over_the_limit_is_refused_as_before() {
        let item = r#"{"adId":"11111111-1111-1111-1111-111111111111","kind":"start"}"#;
        let body = |n: usize, tail: &str| format!("[{}]{tail}", vec![item; n].join(","));
        for (n, tail) in [(MAX_BATCH_EVENTS, ""), (MAX_BATCH_EVENTS + 1, ""), (MAX_BATCH_EVENTS + 1, "x")] {
            let bytes = body(n, tail).into_bytes();
            assert_eq!(seen(parse_batch(&bytes)), seen(read_as_before(&bytes)), "{n} items, tail {tail:?}");
        }
        let over = parse_batch(body(MAX_BATCH_EVENTS + 1, "").as_bytes()).unwrap_err();
        assert_eq!(over.to_string(), "a batch holds at most 1000 events; this one has 1001");
        let bad = parse_batch(body(MAX_BATCH_EVENTS + 1, "x").as_bytes()).unwrap_err();
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST, "{bad}");
    }

    #[test]
    fn the_answer_is_written_as_serde_writes_it() {
        let ids = [None, Some(Uuid::nil()), Some(Uuid::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210))];
        let errors = [
            None,
            Some(String::new()),
            Some("events[3]: kind \"view\" is not an event kind".to_string()),
            Some("tab\t, newline\n, nul \u{0}, back\\slash, é, \u{2028}, 😀, \u{7f}".to_string()),
        ];
        let statuses = [ItemStatus::Accepted, ItemStatus::Duplicate, ItemStatus::Rejected, ItemStatus::Retry];
        let mut rng = Rng(7);
        for n in [0, 1, 2, 5, 40] {
            let results: Vec<_> = (0..n)
                .map(|k| ItemResult {
                    index: [k, u32::MAX][rng.below(2)],
                    status: statuses[rng.below(4)],
                    event_id: ids[rng.below(3)],
                    error: errors[rng.below(4)].clone(),
                })
                .collect();
            let answer = BatchResult { accepted: n, duplicates: 0, rejected: u32::MAX, retry: 7, results };
            let written = String::from_utf8(answer.json_text()).unwrap();
            assert_eq!(written, serde_json::to_string(&answer).unwrap());
        }
        let example = <BatchResult as poem_openapi::types::Example>::example();
        assert_eq!(example.json_text(), serde_json::to_vec(&example).unwrap());
    }
}
