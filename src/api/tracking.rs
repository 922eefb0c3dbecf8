//! Tracking endpoints with the old services' contracts: `POST /ads/impression` and `POST /ads/click`.

use std::{fmt, marker::PhantomData, net::IpAddr, sync::Arc};

use poem::{IntoResponse, Request, Response, error::IntoResult};
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    payload::{Json, Payload},
    registry::{MetaSchemaRef, Registry},
    types::Type,
};
use serde::{Deserialize, Deserializer, de};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

use super::{
    ApiTags, State,
    body::{BodyLimit, JsonBody},
    error::ApiError,
    pixel::NIL_EVENT_ID,
};
use crate::domain::{EventKind, EventReport, PlaybackTime};

/// Reads a string field (borrowed from the body when it has no escapes) and parses it with
/// `parse`, whose error reads "must …" so that the field name can stand before it.
fn parsed<'de, D, T>(d: D, parse: fn(&str) -> Result<T, String>) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<T>(fn(&str) -> Result<T, String>, PhantomData<T>);
    impl<'de, T> de::Visitor<'de> for V<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            (self.0)(v.trim()).map(Some).map_err(E::custom)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_str(self)
        }
    }
    d.deserialize_option(V(parse, PhantomData))
}

fn shown(text: &str) -> String {
    let cut: String = text.chars().take(64).collect();
    format!("{cut:?}")
}

pub(crate) fn uuid<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
    parsed(d, |s| {
        Uuid::parse_str(s).map_err(|_| {
            format!("must be a UUID such as 11111111-1111-1111-1111-111111111111, got {}", shown(s))
        })
    })
}

/// An `eventId`: a UUID other than the nil one ([`NIL_EVENT_ID`]).
pub(crate) fn event_uuid<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
    parsed(d, |s| {
        let id = Uuid::parse_str(s).map_err(|_| {
            format!("must be a UUID such as 11111111-1111-1111-1111-111111111111, got {}", shown(s))
        })?;
        if id.is_nil() { Err(NIL_EVENT_ID.to_string()) } else { Ok(id) }
    })
}

pub(crate) fn rfc3339<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OffsetDateTime>, D::Error> {
    parsed(d, |s| {
        OffsetDateTime::parse(s, &Rfc3339)
            .map_err(|_| format!("must be an RFC 3339 time such as 2024-05-01T12:00:00Z, got {}", shown(s)))
    })
}

pub(crate) fn ip<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    parsed(d, |s| s.parse().map_err(|_| format!("must be an IPv4 or IPv6 address, got {}", shown(s))))
}

/// Body of `POST /ads/impression`. Send `adId` or `ad_id`.
#[derive(Debug, Object, Deserialize)]
// Every field may also be sent as null, which means absent.
#[oai(example, skip_serializing_if_is_none, nullable_all)]
pub struct ImpressionRequest {
    /// The ad's id.
    #[oai(rename = "adId")]
    #[serde(rename = "adId", default, deserialize_with = "uuid")]
    pub ad_id_camel: Option<Uuid>,
    /// The ad's id; alternative spelling of `adId`.
    #[oai(rename = "ad_id")]
    #[serde(rename = "ad_id", default, deserialize_with = "uuid")]
    pub ad_id: Option<Uuid>,
    /// The client's id of this impression (a UUID), for idempotency: a repeat is answered
    /// `{"duplicate": true}` and stored once (per instance, within an hour and among the last
    /// million ids it took, and for as long as the first still waits to be stored). Not the
    /// nil UUID.
    #[oai(rename = "eventId")]
    #[serde(rename = "eventId", default, deserialize_with = "event_uuid")]
    pub event_id_camel: Option<Uuid>,
    /// Alternative spelling of `eventId`.
    #[oai(rename = "event_id")]
    #[serde(rename = "event_id", default, deserialize_with = "event_uuid")]
    pub event_id: Option<Uuid>,
}

/// Body of `POST /ads/click`, camelCase as the old service documented or snake_case.
#[derive(Debug, Object, Deserialize)]
// Every field may also be sent as null, which means absent.
#[oai(example, skip_serializing_if_is_none, nullable_all)]
pub struct ClickRequest {
    /// The ad's id.
    #[oai(rename = "adId")]
    #[serde(rename = "adId", default, deserialize_with = "uuid")]
    pub ad_id_camel: Option<Uuid>,
    /// Alternative spelling of `adId`.
    #[oai(rename = "ad_id")]
    #[serde(rename = "ad_id", default, deserialize_with = "uuid")]
    pub ad_id: Option<Uuid>,
    /// The client's id of this click (a UUID), for idempotency: a repeat is answered with
    /// `"duplicate": true` and stored once (per instance, within an hour and among the last
    /// million ids it took, and for as long as the first still waits to be stored). Not the
    /// nil UUID.
    #[oai(rename = "eventId")]
    #[serde(rename = "eventId", default, deserialize_with = "event_uuid")]
    pub event_id_camel: Option<Uuid>,
    /// Alternative spelling of `eventId`.
    #[oai(rename = "event_id")]
    #[serde(rename = "event_id", default, deserialize_with = "event_uuid")]
    pub event_id: Option<Uuid>,
    /// When the click happened, RFC 3339 (e.g. `2024-05-01T12:00:00Z`). Absent: server time. A
    /// time more than MAX_CLOCK_SKEW ahead or MAX_EVENT_AGE behind is refused (400).
    #[serde(default, deserialize_with = "rfc3339")]
    pub timestamp: Option<OffsetDateTime>,
    /// The viewer's IP, as server-side callers state it. It counts only for a caller whose API
    /// key has the ingest scope; from anyone else unique clicks use the address of the
    /// connection (or of a trusted proxy's client), so that they cannot be forged.
    #[oai(rename = "ipAddress")]
    #[serde(rename = "ipAddress", default, deserialize_with = "ip")]
    pub ip_address_camel: Option<IpAddr>,
    /// Alternative spelling of `ipAddress`.
    #[oai(rename = "ip_address")]
    #[serde(rename = "ip_address", default, deserialize_with = "ip")]
    pub ip_address: Option<IpAddr>,
    /// Alternative spelling of `ipAddress`.
    #[serde(default, deserialize_with = "ip")]
    pub ip: Option<IpAddr>,
    /// Seconds into the video when the viewer clicked (0 or more).
    #[oai(rename = "videoPlaybackTime")]
    #[serde(rename = "videoPlaybackTime")]
    pub video_playback_time_camel: Option<f64>,
    /// Alternative spelling of `videoPlaybackTime`.
    #[oai(rename = "video_playback_time")]
    #[serde(rename = "video_playback_time")]
    pub video_playback_time: Option<f64>,
    /// Alternative spelling of `videoPlaybackTime`.
    #[oai(rename = "playback_time")]
    #[serde(rename = "playback_time")]
    pub playback_time: Option<f64>,
}

/// An acknowledgement (the schema of [`ClickQueued`] and of a repeated impression).
#[derive(Debug, Object)]
#[oai(example, skip_serializing_if_is_none)]
pub struct MessageBody {
    /// What happened.
    pub message: String,
    /// Present and true when the event repeats one already accepted (the same `eventId`, or
    /// the same ad, client and kind within DEDUP_WINDOW): acknowledged, not counted again.
    pub duplicate: Option<bool>,
}

impl poem_openapi::types::Example for ImpressionRequest {
    fn example() -> Self {
        ImpressionRequest { ad_id_camel: Some(EXAMPLE_AD), ad_id: None, event_id_camel: None, event_id: None }
    }
}

impl poem_openapi::types::Example for ClickRequest {
    fn example() -> Self {
        ClickRequest {
            ad_id_camel: Some(EXAMPLE_AD),
            ad_id: None,
            event_id_camel: Some(uuid::uuid!("5b1d8f52-0a47-4b8e-9f0e-3c1f6f0c2a11")),
            event_id: None,
            timestamp: None,
            ip_address_camel: None,
            ip_address: None,
            ip: None,
            video_playback_time_camel: Some(30.0),
            video_playback_time: None,
            playback_time: None,
        }
    }
}

impl poem_openapi::types::Example for MessageBody {
    fn example() -> Self {
        MessageBody { message: "Click event queued".into(), duplicate: None }
    }
}

/// The ad id the OpenAPI examples use (a demo ad that `SEED_DEMO_ADS` creates).
pub(crate) const EXAMPLE_AD: Uuid = uuid::uuid!("11111111-1111-1111-1111-111111111111");

/// Answer of `POST /ads/impression`.
#[derive(Debug, ApiResponse)]
pub enum ImpressionResponse {
    /// The impression is accepted (no body).
    #[oai(status = 204)]
    Accepted,
    /// The impression repeats one already accepted: `{"message": …, "duplicate": true}`.
    #[oai(status = 200)]
    Duplicate(Json<MessageBody>),
}

/// The constant body of an accepted click, `{"message":"Click event queued"}` (with
/// `"duplicate":true` for a repeat), sent as static bytes: building it through
/// `serde_json::Value` on every click was measurable.
#[derive(Debug)]
pub struct ClickQueued {
    /// Whether the click repeats one already accepted.
    pub duplicate: bool,
}

impl ClickQueued {
    const BODY: &'static [u8] = br#"{"message":"Click event queued"}"#;
    const DUPLICATE: &'static [u8] = br#"{"message":"Click event queued","duplicate":true}"#;
}

impl Payload for ClickQueued {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn schema_ref() -> MetaSchemaRef {
        MessageBody::schema_ref()
    }

    fn register(registry: &mut Registry) {
        MessageBody::register(registry);
    }
}

impl IntoResponse for ClickQueued {
    fn into_response(self) -> Response {
        Response::builder()
            .header(
                poem::http::header::CONTENT_TYPE,
                poem::http::HeaderValue::from_static(Self::CONTENT_TYPE),
            )
            .body(if self.duplicate { Self::DUPLICATE } else { Self::BODY })
    }
}

/// Answer of `POST /ads/click`.
#[derive(Debug, ApiResponse)]
pub enum ClickResponse {
    /// The click is accepted: `{"message": "Click event queued"}`, plus `"duplicate": true`
    /// when it repeats one already accepted.
    #[oai(status = 202)]
    Accepted(ClickQueued),
}

/// Resolves fields that are spellings of one value: absent, or all present ones equal. Returns
/// the value with the name the client used, so errors speak the client's spelling. (An array, not
/// a Vec: this runs on every event.)
pub(crate) fn one_of<T: PartialEq, const N: usize>(
    fields: [(&str, Option<T>); N],
) -> Result<Option<(&str, T)>, String> {
    let mut found: Option<(&str, T)> = None;
    for (name, value) in fields {
        match (&found, value) {
            (_, None) => {}
            (None, Some(v)) => found = Some((name, v)),
            (Some((first, seen)), Some(v)) if *seen != v => {
                return Err(format!("{first} and {name} disagree; send only one of them"));
            }
            (Some(_), Some(_)) => {}
        }
    }
    Ok(found)
}

pub(crate) fn ad_id(fields: [(&str, Option<Uuid>); 2]) -> Result<Uuid, String> {
    let required = fields[0].0;
    one_of(fields)?.map(|(_, id)| id).ok_or_else(|| format!("{required} is required"))
}

impl TryFrom<ImpressionRequest> for EventReport {
    type Error = String;

    fn try_from(r: ImpressionRequest) -> Result<Self, String> {
        Ok(EventReport {
            event_id: one_of([("eventId", r.event_id_camel), ("event_id", r.event_id)])?.map(|(_, id)| id),
            ad_id: ad_id([("adId", r.ad_id_camel), ("ad_id", r.ad_id)])?,
            kind: EventKind::Impression,
            client_time: None,
            playback_time: None,
            error_code: 0,
        })
    }
}

impl TryFrom<ClickRequest> for EventReport {
    type Error = String;

    fn try_from(r: ClickRequest) -> Result<Self, String> {
        let ad_id = ad_id([("adId", r.ad_id_camel), ("ad_id", r.ad_id)])?;
        // Validated while parsing; here only checked for disagreeing spellings.
        one_of([("ipAddress", r.ip_address_camel), ("ip_address", r.ip_address), ("ip", r.ip)])?;
        let playback = one_of([
            ("videoPlaybackTime", r.video_playback_time_camel),
            ("video_playback_time", r.video_playback_time),
            ("playback_time", r.playback_time),
        ])?
        .map(|(name, s)| PlaybackTime::new(s).map_err(|e| format!("{name} {e}")))
        .transpose()?;
        Ok(EventReport {
            event_id: one_of([("eventId", r.event_id_camel), ("event_id", r.event_id)])?.map(|(_, id)| id),
            ad_id,
            kind: EventKind::Click,
            client_time: r.timestamp,
            playback_time: playback,
            error_code: 0,
        })
    }
}

/// The tracking operations that the front endpoint calls directly, without poem-openapi's
/// router: the busiest requests of all (the VAST beacon above all: a viewed ad fires several).
/// Through the router each one passes a radix-tree lookup (about 500 instructions) and eight
/// boxed endpoint layers (the route table, the method table, response mapping and the
/// operation's wrappers), each moving the request and its future into a new box. Measured with
/// callgrind: a click took 43,700 instructions through the router and 35,000 without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hot {
    /// `POST /ads/click` (`recordClick`).
    Click,
    /// `POST /ads/impression` (`recordImpression`).
    Impression,
    /// `GET /t/{event}` (`trackBeacon`; see `PixelApi::call_beacon`).
    Beacon,
}

impl Hot {
    /// Every one of them, in [`Hot::index`] order.
    pub const ALL: [Hot; 3] = [Hot::Click, Hot::Impression, Hot::Beacon];

    /// Its place in [`Hot::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The operation that serves `method` on exactly `path`, if it is one of these.
    pub fn find(method: &poem::http::Method, path: &str) -> Option<Hot> {
        if method == poem::http::Method::GET {
            // One segment of letters and digits after `/t/`, as every VAST event name is: the
            // router's `/t/:event` would match it and percent-decode it to itself. Any other shape
            // (escapes, more segments) goes to the router and gets its answer.
            let event = path.strip_prefix("/t/")?;
            let plain = !event.is_empty() && event.bytes().all(|b| b.is_ascii_alphanumeric());
            return plain.then_some(Hot::Beacon);
        }
        if method != poem::http::Method::POST {
            return None;
        }
        match path {
            "/ads/click" => Some(Hot::Click),
            "/ads/impression" => Some(Hot::Impression),
            _ => None,
        }
    }

    /// The method it is served on ([`Hot::find`]).
    pub fn method(self) -> poem::http::Method {
        match self {
            Hot::Click | Hot::Impression => poem::http::Method::POST,
            Hot::Beacon => poem::http::Method::GET,
        }
    }

    /// The status of its usual answer: an accepted click, impression or beacon.
    pub fn usual_status(self) -> poem::http::StatusCode {
        match self {
            Hot::Click => poem::http::StatusCode::ACCEPTED,
            Hot::Impression => poem::http::StatusCode::NO_CONTENT,
            Hot::Beacon => poem::http::StatusCode::OK,
        }
    }

    /// The operation id, as the spec names it.
    pub fn operation_id(self) -> &'static str {
        match self {
            Hot::Click => "recordClick",
            Hot::Impression => "recordImpression",
            Hot::Beacon => "trackBeacon",
        }
    }
}

/// The seed-compatible tracking operations.
pub struct TrackingApi {
    /// Shared service state.
    pub state: Arc<State>,
}

#[OpenApi(tag = "ApiTags::Tracking")]
impl TrackingApi {
    /// Record an impression.
    ///
    /// Accepts `{"ad_id": "…"}` or `{"adId": "…"}`, optionally with an `eventId`. The event is
    /// stored in ClickHouse within FLUSH_INTERVAL. Answers 204, or 200 `{"duplicate": true}` for
    /// a repeat of an accepted `eventId`; 404 for an ad the catalog does not know, 429 over the
    /// rate limit, 503 (with Retry-After) when the service cannot hold the event; nothing is
    /// stored for any non-2xx answer.
    #[oai(path = "/ads/impression", method = "post", operation_id = "recordImpression")]
    async fn impression(
        &self,
        req: &Request,
        body: JsonBody<ImpressionRequest>,
    ) -> Result<ImpressionResponse, ApiError> {
        let report = self.state.validate(body.0)?;
        if self.state.accept(report, &self.state.caller(req, None)).await?.is_duplicate() {
            return Ok(ImpressionResponse::Duplicate(Json(MessageBody {
                message: "Impression already recorded".into(),
                duplicate: Some(true),
            })));
        }
        Ok(ImpressionResponse::Accepted)
    }

    /// Record a click.
    ///
    /// Accepts the old service's body `{"adId","timestamp","ipAddress","videoPlaybackTime"}` or its
    /// snake_case form (`ad_id`, `ip_address` or `ip`, `video_playback_time` or `playback_time`).
    /// Only the ad id is required. Answers 202 `{"message": "Click event queued"}`.
    #[oai(path = "/ads/click", method = "post", operation_id = "recordClick")]
    async fn click(&self, req: &Request, body: JsonBody<ClickRequest>) -> Result<ClickResponse, ApiError> {
        // Counts only for a caller with the ingest scope (see client_ip.rs).
        let stated = body.0.ip_address_camel.or(body.0.ip_address).or(body.0.ip);
        let report = self.state.validate(body.0)?;
        let accepted = self.state.accept(report, &self.state.caller(req, stated)).await?;
        Ok(ClickResponse::Accepted(ClickQueued { duplicate: accepted.is_duplicate() }))
    }
}

/// What the hot routes' methods answer.
type Answer = poem::Result<Response>;

#[expect(clippy::manual_async_fn, reason = "an `async fn` keeps a second copy of the request in its future")]
impl TrackingApi {
    /// Serves `POST /ads/click` as poem-openapi's generated endpoint for it does, without the
    /// router (see [`Hot`]): reads the body as the operation's extractor does, under `rules` (its
    /// error goes out as the router's would), calls the operation's own method, turns the result
    /// into a response. The front endpoint, which knows what it called, labels it by the
    /// operation's route. The spec still comes from the operation, and every request that is not
    /// [`Hot`] still goes through the router.
    ///
    /// A plain function returning an `async move` block, as [`crate::api`]'s front endpoint's
    /// `handle` is, and the body taken out of the request in place (`Request::split` moves it):
    /// each keeps the request's future from holding a second copy of the 472-byte request.
    pub fn call_click(&self, mut req: Request, rules: BodyLimit) -> impl Future<Output = Answer> + Send + '_ {
        async move {
            let b = JsonBody::<ClickRequest>::take(&mut req, rules).await?;
            self.click(&req, b).await.into_result().map(IntoResponse::into_response)
        }
    }

    /// Serves `POST /ads/impression` as [`TrackingApi::call_click`] serves the click.
    pub fn call_impression(
        &self,
        mut req: Request,
        rules: BodyLimit,
    ) -> impl Future<Output = Answer> + Send + '_ {
        async move {
            let b = JsonBody::<ImpressionRequest>::take(&mut req, rules).await?;
            self.impression(&req, b).await.into_result().map(IntoResponse::into_response)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn click(json: &str) -> Result<EventReport, String> {
        EventReport::try_from(super::super::body::parse_json::<ClickRequest>(json.as_bytes())?)
    }

    const AD: &str = "11111111-1111-1111-1111-111111111111";

    #[test]
    fn both_spellings_are_accepted() {
        let a =
            click(&format!(r#"{{"adId":"{AD}","videoPlaybackTime":12.5,"ipAddress":"192.0.2.1"}}"#)).unwrap();
        let b = click(&format!(r#"{{"ad_id":"{AD}","playback_time":12.5,"ip":"192.0.2.1"}}"#)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.playback_time.unwrap().seconds(), 12.5);
        assert!(a.client_time.is_none());
    }

    #[test]
    fn rejections_name_the_problem() {
        assert_eq!(click("{}").unwrap_err(), "adId is required");
        assert!(click(r#"{"adId":"nope"}"#).unwrap_err().starts_with("adId must be a UUID"));
        let e = click(&format!(r#"{{"adId":"{AD}","ad_id":"22222222-2222-2222-2222-222222222222"}}"#))
            .unwrap_err();
        assert!(e.contains("disagree"), "{e}");
        let e = click(&format!(r#"{{"adId":"{AD}","videoPlaybackTime":-3}}"#)).unwrap_err();
        assert!(e.starts_with("videoPlaybackTime must be 0 or more"), "{e}");
        let e = click(&format!(r#"{{"adId":"{AD}","timestamp":"yesterday"}}"#)).unwrap_err();
        assert!(e.starts_with("timestamp must be an RFC 3339"), "{e}");
        let e = click(&format!(r#"{{"adId":"{AD}","ipAddress":"999.1.1.1"}}"#)).unwrap_err();
        assert!(e.starts_with("ipAddress must be"), "{e}");
        let e = click(&format!(r#"{{"ad_id":"{AD}","playback_time":-1}}"#)).unwrap_err();
        assert!(e.starts_with("playback_time must be 0 or more"), "{e}");
        assert!(click(r#"{"ad_id":"x"}"#).unwrap_err().starts_with("ad_id must be a UUID"));
        let e = click(r#"{"adId":42}"#).unwrap_err();
        assert!(e.starts_with("adId: invalid type"), "{e}");
    }

    #[test]
    fn timestamps_parse_as_rfc3339() {
        let r = click(&format!(r#"{{"adId":"{AD}","timestamp":"2024-05-01T12:00:00+02:00"}}"#)).unwrap();
        assert_eq!(r.client_time.unwrap().unix_timestamp(), 1_714_557_600);
    }
}
