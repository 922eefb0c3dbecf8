//! Every error the HTTP surface answers, mapped to a status in this one place.
//!
//! Handlers return [`ApiError`]; everything else that fails before a handler runs (an unknown
//! route, a wrong method, a body that does not parse) is a `poem::Error`, which the front endpoint
//! turns into the same `{"error": "…"}` shape with [`into_json_error`]. Internal causes are
//! logged, never sent.

use poem::{IntoResponse, Response, http::StatusCode};
use poem_openapi::{
    ApiResponse, Object,
    payload::{Json, Payload},
    registry::{MetaSchemaRef, Registry},
    types::Type,
};

use crate::{
    ingest::{HoldError, PushError},
    metrics::RejectReason,
    store::{RedisError, StoreError},
};

/// The body of every error response.
#[derive(Debug, Clone, Object, serde::Serialize)]
#[oai(example)]
pub struct ErrorBody {
    /// What is wrong, in words a caller can act on.
    pub error: String,
}

/// An `{"error": "…"}` body that also tells the front endpoint why the request was refused (a
/// response extension), so that the rejected-by-reason counters are kept in one place without
/// reading messages back.
#[derive(Debug, Clone)]
pub struct Refusal(pub ErrorBody, pub RejectReason);

impl Payload for Refusal {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn schema_ref() -> MetaSchemaRef {
        ErrorBody::schema_ref()
    }

    fn register(registry: &mut Registry) {
        ErrorBody::register(registry);
    }
}

/// The header that carries a [`Refusal`]'s reason from the handler to the front endpoint, which
/// removes it. Not response data: poem-openapi turns an operation's error into a `poem::Error`,
/// whose conversion back into a response replaces the response's data with the error's.
pub const REFUSAL_HEADER: poem::http::HeaderName = poem::http::HeaderName::from_static("x-adbeacon-refusal");

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut resp = error_response(StatusCode::OK, &self.0.error);
        resp.headers_mut().insert(REFUSAL_HEADER, poem::http::HeaderValue::from_static(self.1.as_str()));
        resp
    }
}

impl poem_openapi::types::Example for ErrorBody {
    fn example() -> Self {
        ErrorBody {
            error: "adId must be a UUID such as 11111111-1111-1111-1111-111111111111, got \"abc\"".into(),
        }
    }
}

/// Errors answered by the operations.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// The request is malformed: invalid JSON, a wrong type, a missing or invalid field, a client
    /// timestamp outside the accepted window.
    #[oai(status = 400)]
    BadRequest(Refusal),
    /// No API key, or one that API_KEYS does not hold (only when API_KEYS is set).
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>, #[oai(header = "WWW-Authenticate")] String),
    /// The API key lacks the scope the operation needs, or the page's origin is not allowed.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// The referenced ad (or other resource) does not exist.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The resource exists already (an ad created with an id in use), or the operation needs
    /// something this instance is configured without (the dead-letter endpoints while REDIS_URL
    /// is empty): retrying does not help, the message says what would.
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// Well-formed JSON whose values are not acceptable (an ad's name, URLs, a dead letter's id).
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// The request body is larger than MAX_BODY_BYTES (answered by the body reader; listed here
    /// so that the contract shows it).
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// Tracking endpoints only: the client IP sent more than RATE_LIMIT requests per second
    /// (after a burst of RATE_LIMIT_BURST). Nothing was stored; retry after the given seconds.
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// The body did not arrive within BODY_READ_TIMEOUT (answered by the body reader; the
    /// connection is closed).
    #[oai(status = 408)]
    RequestTimeout(Json<ErrorBody>),
    /// A Content-Type that is not read as JSON. Accepted: none, application/json (and
    /// application/*+json), text/plain, application/x-www-form-urlencoded (answered by the body
    /// reader).
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// The service cannot hold the event right now (buffer full, local log unwritable, storage
    /// unavailable, shutting down), or Redis does not answer (the dead-letter endpoints): nothing
    /// was stored or changed; retry after the given number of seconds.
    /// With `ACK_MODE=committed` it may also mean the event is held but ClickHouse has not
    /// confirmed it in time (the message says so; a retry with the same eventId is not stored
    /// twice).
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
}

fn body(msg: impl Into<String>) -> Json<ErrorBody> {
    Json(ErrorBody { error: msg.into() })
}

impl ApiError {
    /// 400 with `msg`: a field or parameter is wrong.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::refused(msg, RejectReason::Invalid)
    }

    /// 400 with `msg`, counted under `reason` (e.g. [`RejectReason::BadTimestamp`]).
    pub fn refused(msg: impl Into<String>, reason: RejectReason) -> Self {
        Self::BadRequest(Refusal(ErrorBody { error: msg.into() }, reason))
    }

    /// 404 with `msg`.
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(body(msg))
    }

    /// 401 with `msg`, asking for a bearer token.
    pub fn unauthorized(msg: impl Into<String>) -> Self {
        Self::Unauthorized(body(msg), "Bearer".into())
    }

    /// 403 with `msg`.
    pub fn forbidden(msg: impl Into<String>) -> Self {
        Self::Forbidden(body(msg))
    }

    /// 409 with `msg`.
    pub fn conflict(msg: impl Into<String>) -> Self {
        Self::Conflict(body(msg))
    }

    /// 422 with `msg`.
    pub fn unprocessable(msg: impl Into<String>) -> Self {
        Self::Unprocessable(body(msg))
    }

    /// 503 for a storage failure; the cause is logged, not sent. At debug level: during an outage
    /// this runs per request, and the flusher already reports the outage at WARN.
    pub fn storage(err: StoreError, retry_after: u64) -> Self {
        tracing::debug!(error = %err, "storage unavailable while answering a request");
        Self::Unavailable(body("storage is unavailable; retry later"), retry_after)
    }

    /// 503 for a Redis failure while reading (the dead-letter list); the cause is logged, not
    /// sent.
    pub fn redis(err: &RedisError, retry_after: u64) -> Self {
        tracing::warn!(error = %err, "Redis unavailable while answering a request");
        Self::Unavailable(body("Redis is unavailable; retry later"), retry_after)
    }

    /// 503 for a Redis failure during a change (a purge or replay of dead letters). Whether Redis
    /// made it is not known: a command sent before Redis stalled is carried out once it answers
    /// again, its answer lost. A retry is safe (ids no longer there are ignored).
    pub fn redis_change(err: &RedisError, retry_after: u64) -> Self {
        tracing::warn!(error = %err, "Redis unavailable while changing dead letters");
        Self::Unavailable(
            body(
                "Redis did not answer; the change may have been made all the same (Redis carries out a \
                 command whose answer was lost): list the dead letters to see, or retry (ids no longer \
                 there are ignored)",
            ),
            retry_after,
        )
    }

    /// 409 for an operation on the dead letters of an instance without Redis (REDIS_URL=none),
    /// which keeps them as files instead.
    pub fn no_redis() -> Self {
        Self::conflict(
            "dead letters are kept in Redis and REDIS_URL is none: this instance writes them as \
             files under DATA_DIR/dead-letter/ instead (load each one through the staging table \
             of the README, Delivery, which skips events ClickHouse holds already: a plain INSERT \
             of the file could store some twice); set REDIS_URL to manage them here",
        )
    }

    /// 503 for events that could not be held, or (`committed` mode) were held but not
    /// confirmed in time.
    pub fn hold(err: &HoldError, retry_after: u64) -> Self {
        let msg = match err {
            HoldError::Push(PushError::Full) => "the event buffer is full; nothing was stored, retry later",
            HoldError::Push(PushError::Closed) => {
                "the service is shutting down; nothing was stored, retry later"
            }
            HoldError::Log(e) => {
                // The disk is the operator's problem; the caller learns only that nothing was kept.
                tracing::debug!(error = %e, "refusing events: the local log cannot be written");
                "the local log cannot be written; nothing was stored, retry later"
            }
            HoldError::Unconfirmed => {
                "the event is held but ClickHouse has not confirmed it within ACK_TIMEOUT (it may be \
                 waiting in the spill for ClickHouse to come back); it will be stored, and a retry \
                 with the same eventId is not stored twice"
            }
        };
        Self::Unavailable(body(msg), retry_after)
    }
}

/// Turns a non-JSON error response into `{"error": "…"}` with the same status; everything else
/// passes through. Keeps the operation id, which the HTTP metrics label by.
pub async fn into_json_error(resp: Response) -> Response {
    if resp.status().as_u16() < 400 || is_json(&resp) {
        return resp;
    }
    let status = resp.status();
    let op = resp.data::<poem_openapi::OperationId>().copied();
    let reason = resp.data::<RejectReason>().copied();
    let text = resp.into_body().into_string().await.unwrap_or_default();
    let mut out = error_response(status, &describe(status, &text));
    if let Some(op) = op {
        out.set_data(op);
    }
    if let Some(reason) = reason {
        out.set_data(reason);
    }
    out
}

/// A `poem::Error` as a response, keeping its operation id and its [`RejectReason`].
pub fn error_into_response(e: poem::Error) -> Response {
    let op = e.data::<poem_openapi::OperationId>().copied();
    let reason = e.data::<RejectReason>().copied();
    let mut resp = e.into_response();
    if let Some(op) = op {
        resp.set_data(op);
    }
    if let Some(reason) = reason {
        resp.set_data(reason);
    }
    resp
}

/// A `poem::Error` with `status` and `msg`, counted under `reason` by the front endpoint.
pub fn refusal(status: StatusCode, msg: impl Into<String>, reason: RejectReason) -> poem::Error {
    let mut e = poem::Error::from_string(msg, status);
    e.set_data(reason);
    e
}

fn is_json(resp: &Response) -> bool {
    resp.content_type().is_some_and(|ct| ct.starts_with("application/json"))
}

/// Words for errors raised outside the handlers; poem's own texts are kept where they help.
fn describe(status: StatusCode, text: &str) -> String {
    let text = text.trim();
    match status {
        StatusCode::NOT_FOUND if text.is_empty() || text == "not found" => {
            "no such endpoint; see /docs for the API".into()
        }
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this endpoint; see /docs".into(),
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_lowercase(),
        _ => {
            if let Some(param) = parameter_error(text) {
                return param;
            }
            text.strip_prefix("parse request payload error: ").unwrap_or(text).to_string()
        }
    }
}

/// poem's "failed to parse parameter `limit`: verification failed. pattern(\"^…$\")" as
/// "limit is not valid: it must match ^…$", naming the parameter first as the handlers do.
fn parameter_error(text: &str) -> Option<String> {
    let rest = text.strip_prefix("failed to parse parameter `")?;
    let (name, why) = rest.split_once("`: ")?;
    let pattern = why.strip_prefix("verification failed. pattern(\"").and_then(|p| p.strip_suffix("\")"));
    Some(match pattern {
        Some(p) => format!("{name} is not valid: it must match {p} (see /docs)"),
        None => format!("{name} is not valid: {why}"),
    })
}

/// The 429 of a client over its rate limit that may try again after `wait` (rounded up to
/// whole seconds, as Retry-After counts).
pub fn too_many_requests(wait: std::time::Duration) -> Response {
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    // The declared variant, so the answer is the one the OpenAPI document describes.
    ApiError::TooManyRequests(
        body(format!("too many requests from this address; retry in {secs} s (RATE_LIMIT per client IP)")),
        secs,
    )
    .into_response()
}

/// A JSON error response with `status` and `msg`.
pub fn error_response(status: StatusCode, msg: &str) -> Response {
    let json = serde_json::to_vec(&ErrorBody { error: msg.to_string() }).unwrap_or_default();
    Response::builder().status(status).content_type("application/json; charset=utf-8").body(json)
}
