//! `JsonBody<T>`: a JSON request body parsed in one pass with serde (and `OptionalJsonBody<T>`, one
//! that may be left out), and [`read_body`], the one way every body is read: its Content-Type
//! checked, its size capped, its arrival timed.
//!
//! The old services parsed any body as JSON (so `curl -d '{…}'`, which sends a form content type,
//! worked) and browsers' `navigator.sendBeacon` sends JSON as `text/plain`; both keep working.
//! Any other declared type (XML, multipart, an image) is a 415: such a client is not speaking
//! this API. Parse errors name the field that is wrong (`adId: invalid type: …`), or what makes
//! the body unreadable (not UTF-8, a NUL byte, nested too deeply). The schema in the OpenAPI
//! document is `T`'s, listed under `application/json` and `text/plain`.
//!
//! [`SerdeJson<T>`] is the answering side: a JSON response written by serde straight into bytes,
//! with the same schema as poem-openapi's `Json<T>` (which builds a `serde_json::Value` first).

use std::time::Duration;

use poem::{
    Request, RequestBody,
    http::{StatusCode, header},
};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ExtractParamOptions,
    registry::{MetaMediaType, MetaRequest, MetaSchemaRef, Registry},
    types::Type,
};
use serde::de::DeserializeOwned;

use super::error::refusal;
use crate::metrics::RejectReason;

/// How much of a body is read and for how long; the front endpoint puts it into every request
/// (one value, not two: each request data insert costs a hash-map insert on the hot path).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit {
    /// The largest body read (MAX_BODY_BYTES, or MAX_BATCH_BODY_BYTES for a batch).
    pub bytes: usize,
    /// How long reading a whole body may take (BODY_READ_TIMEOUT).
    pub timeout: Duration,
}

impl BodyLimit {
    /// The limit the front endpoint put into `request`; else (a request that did not pass it,
    /// as in unit tests) `bytes` and 30 seconds.
    pub(crate) fn of(request: &Request, bytes: usize) -> Self {
        request.data::<BodyLimit>().copied().unwrap_or(BodyLimit { bytes, timeout: Duration::from_secs(30) })
    }
}

/// A JSON request body of type `T`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> JsonBody<T> {
    /// Reads and parses the body under `rules`: what the extractor does with the limit in the
    /// request. The front endpoint's own routes ([`super::tracking::Hot`]) pass it here
    /// directly, since putting it into the request costs a hash-map allocation per request.
    pub(crate) async fn read(
        request: &Request,
        body: &mut RequestBody,
        rules: BodyLimit,
    ) -> poem::Result<Self> {
        let bytes = read_body(request, body, rules).await?;
        parse_classified(&bytes)
            .map(JsonBody)
            .map_err(|(reason, msg)| refusal(StatusCode::BAD_REQUEST, msg, reason))
    }

    /// [`JsonBody::read`] of `req`'s own body, taken out of it in place: `Request::split` would
    /// move the request (see [`super::tracking::TrackingApi::call_click`]).
    pub(crate) async fn take(req: &mut Request, rules: BodyLimit) -> poem::Result<Self> {
        let mut body = RequestBody::new(req.take_body());
        Self::read(req, &mut body, rules).await
    }
}

/// Content types whose bodies are read as JSON, as the 415 names them.
const ACCEPTED_TYPES: &str =
    "application/json (also application/*+json, text/plain and application/x-www-form-urlencoded, or none)";

/// True for a Content-Type read as JSON: none, JSON, or what `sendBeacon` and `curl -d` send.
pub fn is_json_content_type(value: Option<&[u8]>) -> bool {
    const READ: [&[u8]; 4] = [b"", b"application/json", b"text/plain", b"application/x-www-form-urlencoded"];
    let Some(value) = value else { return true };
    // What nearly every tracking request sends, exactly: the general check below costs about
    // 200 instructions of a click (callgrind).
    if value == b"application/json" {
        return true;
    }
    // Compared in place, case-insensitively: every tracking request passes here, and a lower-cased
    // copy was most of this check's cost. Whitespace around the type is HTTP's (spaces and tabs).
    if !value.is_ascii() && std::str::from_utf8(value).is_err() {
        return false;
    }
    let essence = value.split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
    let (prefix, suffix) = (b"application/".as_slice(), b"+json".as_slice());
    READ.iter().any(|t| essence.eq_ignore_ascii_case(t))
        || (essence.len() >= prefix.len() + suffix.len()
            && essence[..prefix.len()].eq_ignore_ascii_case(prefix)
            && essence[essence.len() - suffix.len()..].eq_ignore_ascii_case(suffix))
}

/// Reads the body of `request` for a JSON extractor: 415 for a content type that is not read as
/// JSON, 413 for a declared or actual length over the [`BodyLimit`] (the bytes read are capped,
/// chunked bodies too, and a declared length over it is refused before anything is read), 408
/// when it has not all arrived within the limit's timeout.
pub(crate) async fn read_body(
    request: &Request,
    body: &mut RequestBody,
    rules: BodyLimit,
) -> poem::Result<bytes::Bytes> {
    let content_type = request.headers().get(header::CONTENT_TYPE);
    if !is_json_content_type(content_type.map(|v| v.as_bytes())) {
        let shown =
            content_type.map(|v| String::from_utf8_lossy(v.as_bytes()).chars().take(64).collect::<String>());
        return Err(refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type {:?} is not accepted; send {ACCEPTED_TYPES}", shown.unwrap_or_default()),
            RejectReason::UnsupportedMediaType,
        ));
    }
    let limit = rules.bytes;
    let declared =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let mut read = std::pin::pin!(read_limited(body.take()?, limit));
    // A tracking body nearly always arrives with its headers: read it at once without setting up
    // the timer (a clock read and the runtime's handle: about 325 instructions a click).
    let at_once = std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(done) = at_once {
        return done;
    }
    let timeout = rules.timeout;
    match tokio::time::timeout(timeout, read).await {
        Ok(read) => read,
        Err(_) => Err(refusal(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} (BODY_READ_TIMEOUT)",
                crate::config::format_duration(timeout)
            ),
            RejectReason::BodyTimeout,
        )),
    }
}

fn too_large(limit: usize) -> poem::Error {
    refusal(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than the {limit}-byte limit"),
        RejectReason::TooLarge,
    )
}

/// A 400 for a body that is not JSON, or not the JSON the endpoint takes.
pub(crate) fn malformed(msg: String) -> poem::Error {
    refusal(StatusCode::BAD_REQUEST, msg, RejectReason::MalformedJson)
}

/// Why `bytes` did not parse (`e`), in words that name the cause: checked only once parsing has
/// failed, so that valid bodies pay nothing for it.
pub(crate) fn describe_malformed(bytes: &[u8], e: &serde_json::Error) -> String {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return "request body is empty; send JSON".into();
    }
    if let Err(u) = std::str::from_utf8(bytes) {
        return format!("request body is not valid UTF-8 (byte {})", u.valid_up_to());
    }
    if let Some(at) = bytes.iter().position(|b| *b == 0) {
        return format!("request body contains a NUL byte (byte {at}); JSON escapes control characters");
    }
    let text = e.to_string();
    if text.starts_with("trailing characters") {
        return format!("request body has data after the JSON value: {text}");
    }
    if text.starts_with("recursion limit exceeded") {
        return format!("request body is nested too deeply (at most 128 levels): {text}");
    }
    if e.is_syntax() && near_error(bytes, e).is_some_and(|w| w.contains("NaN") || w.contains("Infinity")) {
        return format!("request body is not valid JSON: NaN and Infinity are not JSON numbers ({text})");
    }
    format!("request body is not valid JSON: {text}")
}

/// The text around the position serde reports an error at.
fn near_error<'a>(bytes: &'a [u8], e: &serde_json::Error) -> Option<&'a str> {
    let line_start: usize =
        bytes.split(|b| *b == b'\n').take(e.line().saturating_sub(1)).map(|l| l.len() + 1).sum();
    let at = line_start + e.column().saturating_sub(1);
    let from = at.saturating_sub(10).min(bytes.len());
    let to = (at + 10).min(bytes.len());
    std::str::from_utf8(bytes.get(from..to)?).ok()
}

/// Reads a whole body of at most `limit` bytes. poem's own `into_bytes_limit` zeroes a 4 KiB
/// buffer on every call and was a tenth of a tracking request's instructions; this takes the
/// body's frames as they come. A body in one frame (nearly every tracking body) is kept as it
/// is; only a body in several frames is copied, into one buffer.
pub(crate) async fn read_limited(body: poem::Body, limit: usize) -> poem::Result<bytes::Bytes> {
    use http_body_util::BodyExt;
    let mut inner: http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error> = body.into();
    let mut first = bytes::Bytes::new();
    let mut joined: Option<bytes::BytesMut> = None;
    while let Some(frame) = inner.frame().await {
        let frame = frame.map_err(|e| malformed(format!("cannot read the request body: {e}")))?;
        // Trailers carry nothing a JSON body needs.
        let Ok(data) = frame.into_data() else { continue };
        let read = joined.as_ref().map_or(first.len(), bytes::BytesMut::len);
        if data.len() > limit.saturating_sub(read) {
            return Err(too_large(limit));
        }
        match &mut joined {
            Some(buf) => buf.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut buf = bytes::BytesMut::with_capacity(first.len() + data.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map_or(first, bytes::BytesMut::freeze))
}

/// The OpenAPI request of a JSON body that is read whatever its Content-Type: listed under
/// `application/json` and `text/plain` (what `navigator.sendBeacon` sends).
pub(crate) fn json_or_text(description: &'static str, schema: fn() -> MetaSchemaRef) -> MetaRequest {
    MetaRequest {
        description: Some(description),
        content: vec![
            MetaMediaType { content_type: "application/json", schema: schema() },
            MetaMediaType { content_type: "text/plain", schema: schema() },
        ],
        required: true,
    }
}

/// Parses `bytes` as `T`, naming the offending field on error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    parse_classified(bytes).map_err(|(_, msg)| msg)
}

/// [`parse_json`], with the reason a refusal is counted under: the body is not a JSON object
/// ([`RejectReason::MalformedJson`]) or a field is wrong ([`RejectReason::Invalid`]).
pub fn parse_classified<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, (RejectReason, String)> {
    let malformed = |msg: String| (RejectReason::MalformedJson, msg);
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err(malformed("request body is empty; send a JSON object".into())),
        // serde would read a struct from an array too; the API takes objects only.
        Some(b) if *b != b'{' => {
            return Err(malformed(match serde_json::from_slice::<serde_json::Value>(bytes) {
                Ok(_) => "request body must be a JSON object".into(),
                Err(e) => describe_malformed(bytes, &e),
            }));
        }
        Some(_) => {}
    }
    // The fast path: plain serde. Only a failure pays for a second, path-tracking parse that
    // names the offending field. Text that is UTF-8 as a whole is parsed as text: from bytes,
    // serde_json checks each string on its own, about 90 instructions a string, five strings in
    // a click (callgrind). Other bytes take the byte parser, whose errors say where they fail.
    let fast = match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    };
    if let Ok(value) = fast {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let text = inner.to_string();
        if inner.is_syntax() || inner.is_eof() {
            malformed(describe_malformed(bytes, &inner))
        } else if path == "." && text.starts_with("missing field") {
            (RejectReason::Invalid, text)
        } else if path == "." && text.starts_with("duplicate field") {
            (RejectReason::Invalid, format!("request body gives a field twice: {text}"))
        } else if path == "." {
            malformed(format!("request body must be a JSON object: {inner}"))
        } else if text.starts_with("must ") {
            // Our field parsers word their errors to follow the field's name.
            (RejectReason::Invalid, format!("{path} {inner}"))
        } else {
            (RejectReason::Invalid, format!("{path}: {inner}"))
        }
    })?;
    de.end().map_err(|e| malformed(format!("request body has data after the JSON value: {e}")))?;
    Ok(value)
}

impl<'a, T: DeserializeOwned + Type + Send> ApiExtractor<'a> for JsonBody<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(json_or_text(
            "JSON; also read as JSON when sent as text/plain (navigator.sendBeacon) or \
             application/x-www-form-urlencoded (curl -d); other content types get 415",
            T::schema_ref,
        ))
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        Self::read(request, body, BodyLimit::of(request, 64 * 1024)).await
    }
}

/// A JSON request body of type `T` that may be left out: no body (or only whitespace) is
/// `None`. Read like [`JsonBody`] otherwise.
#[derive(Debug)]
pub struct OptionalJsonBody<T>(pub Option<T>);

impl<'a, T: DeserializeOwned + Type + Send> ApiExtractor<'a> for OptionalJsonBody<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        let mut meta = json_or_text(
            "JSON, optional; also read as JSON when sent as text/plain or \
             application/x-www-form-urlencoded; other content types get 415",
            T::schema_ref,
        );
        meta.required = false;
        Some(meta)
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let bytes = read_body(request, body, BodyLimit::of(request, 64 * 1024)).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(None));
        }
        parse_classified(&bytes)
            .map(|v| OptionalJsonBody(Some(v)))
            .map_err(|(reason, msg)| refusal(StatusCode::BAD_REQUEST, msg, reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Probe {
        #[serde(rename = "adId")]
        _ad_id: Option<String>,
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_json::<Probe>(br#"{"adId": 5}"#).unwrap_err();
        assert!(e.starts_with("adId: invalid type: integer"), "{e}");
        let e = parse_json::<Probe>(b"{\"adId\": ").unwrap_err();
        assert!(e.starts_with("request body is not valid JSON"), "{e}");
        let e = parse_json::<Probe>(b"[1]").unwrap_err();
        assert!(e.starts_with("request body must be a JSON object"), "{e}");
        let e = parse_json::<Probe>(b"  ").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = parse_json::<Probe>(b"{} {}").unwrap_err();
        assert!(e.contains("after the JSON value"), "{e}");
    }

    /// The fast path parses UTF-8 bodies as text: the same values as from bytes.
    #[test]
    fn text_and_bytes_parse_alike() {
        for body in [
            r#"{"a":"x\u00e9\ud83d\ude00","b":[1,2.5e3,-0.0],"c":null,"d":{"e":true}}"#,
            "{\"\u{e9}\": \"\u{1f600}\", \"\u{e9}\u{e9}\": 1}",
            r#"{"a":"\"\\\/\b\f\n\r\t"}"#,
        ] {
            let v: serde_json::Value = parse_classified(body.as_bytes()).unwrap();
            assert_eq!(v, serde_json::from_slice::<serde_json::Value>(body.as_bytes()).unwrap(), "{body}");
        }
    }

    #[test]
    fn unreadable_bodies_say_why() {
        let e = parse_json::<Probe>(b"{\"adId\": \"\xff\"}").unwrap_err();
        assert!(e.contains("not valid UTF-8 (byte 10)"), "{e}");
        let e = parse_json::<Probe>(b"{\"adId\": \"a\0\"}").unwrap_err();
        assert!(e.contains("NUL byte (byte 11)"), "{e}");
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let e = parse_json::<Probe>(deep.as_bytes()).unwrap_err();
        assert!(e.contains("nested too deeply"), "{e}");
        for bad in [&b"{\"adId\": NaN}"[..], b"{\"adId\": -Infinity}", b"{\"adId\":\n Infinity}"] {
            let e = parse_json::<Probe>(bad).unwrap_err();
            assert!(e.contains("NaN and Infinity"), "{e}");
        }
        let e = parse_json::<Probe>(b"{\"adId\": 1e999}").unwrap_err();
        assert!(e.contains("number out of range"), "{e}");
    }

    /// A body in one frame is taken as it is, one in several is joined, and either is held to
    /// the limit, to the byte.
    #[tokio::test]
    async fn bodies_are_read_whole_and_held_to_the_limit() {
        use tokio::io::AsyncReadExt;
        // Three frames: each slice is one read of the chain.
        let frames = || poem::Body::from_async_read((&b"{\"a\""[..]).chain(&b":"[..]).chain(&b"1}"[..]));
        assert_eq!(&read_limited(frames(), 7).await.unwrap()[..], b"{\"a\":1}");
        assert_eq!(read_limited(frames(), 6).await.unwrap_err().status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(read_limited(frames(), 3).await.unwrap_err().status(), StatusCode::PAYLOAD_TOO_LARGE);
        let one = || poem::Body::from(&b"{\"a\":1}"[..]);
        assert_eq!(&read_limited(one(), 7).await.unwrap()[..], b"{\"a\":1}");
        assert_eq!(read_limited(one(), 6).await.unwrap_err().status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(read_limited(poem::Body::empty(), 0).await.unwrap().is_empty());
    }

    #[test]
    fn content_types_read_as_json() {
        for ok in [
            None,
            Some("application/json"),
            Some("Application/JSON; charset=utf-8"),
            Some("text/plain;charset=UTF-8"),
            Some("application/x-www-form-urlencoded"),
            Some("application/vnd.api+json"),
            Some("APPLICATION/VND.X+JSON"),
            Some(" \tapplication/json \t; q=1"),
            Some("application/json; name=\u{e9}"),
            Some(""),
        ] {
            assert!(is_json_content_type(ok.map(str::as_bytes)), "{ok:?}");
        }
        for bad in [
            "application/xml",
            "multipart/form-data; boundary=x",
            "image/png",
            "text/html",
            "application/jsonx",
            "application/",
            "+json",
            "text/plain+json",
        ] {
            assert!(!is_json_content_type(Some(bad.as_bytes())), "{bad}");
        }
        // Not UTF-8 at all: refused, as an unreadable type.
        assert!(!is_json_content_type(Some(b"application/json; name=\xff")));
    }
}

/// A JSON answer serialized by serde in one pass; documented exactly like `Json<T>`. For answers
/// on hot paths (a batch's result per item), where `Json<T>`'s detour through
/// `serde_json::Value` showed in profiles, and for large ones: a 30-day analytics answer holds
/// 720 hour objects, and writing it this way took the service's CPU per answer from 1.57 to
/// 1.47–1.50 ms (10 million events, 300 requests each). `T`'s serde names must match its
/// OpenAPI names; the type's tests check that both give the same document.
#[derive(Debug)]
pub struct SerdeJson<T>(pub T);

/// What [`SerdeJson`] answers with, as `Json<T>` does.
pub(crate) const JSON_UTF8: &str = "application/json; charset=utf-8";

impl<T: Type + serde::Serialize + Send> poem_openapi::payload::Payload for SerdeJson<T> {
    const CONTENT_TYPE: &'static str = JSON_UTF8;

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: serde::Serialize + Send> poem::IntoResponse for SerdeJson<T> {
    fn into_response(self) -> poem::Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => poem::Response::builder()
                .header(poem::http::header::CONTENT_TYPE, poem::http::HeaderValue::from_static(JSON_UTF8))
                .body(body),
            // Only a type that cannot be JSON fails here (a map with non-string keys): a bug.
            Err(e) => {
                tracing::error!(error = %e, "an answer could not be written as JSON");
                poem::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}
