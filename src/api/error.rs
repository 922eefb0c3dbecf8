//! Every error the HTTP surface answers, mapped to a status in this one place.
//!
//! Handlers return [`ApiError`]; everything else that fails before a handler runs (an unknown
//! route, a wrong method, a body that does not parse) is a `poem::Error`, which the front endpoint
//! turns into the same `{"error": "…"}` shape with [`into_json_error`]. Internal causes are
//! logged, never sent.

use poem::{Response, http::StatusCode};
use poem_openapi::{ApiResponse, Object, payload::Json};

use crate::{ingest::PushError, store::StoreError};

/// The body of every error response.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct ErrorBody {
    /// What is wrong, in words a caller can act on.
    pub error: String,
}

/// Errors answered by the operations.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// The request is malformed: invalid JSON, a wrong type, a missing or invalid field.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No API key, or one that API_KEYS does not hold (only when API_KEYS is set).
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>, #[oai(header = "WWW-Authenticate")] String),
    /// The API key lacks the scope the operation needs, or the page's origin is not allowed.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// The referenced ad (or other resource) does not exist.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The resource exists already (an ad created with an id in use).
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// Well-formed JSON whose values are not acceptable (an ad's name, URLs).
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// The request body is larger than MAX_BODY_BYTES (answered by the body reader; listed here
    /// so that the contract shows it).
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The body's Content-Type is one the operation does not read (the catalog's writes take
    /// `application/json`; answered before the handler runs, listed so that the contract shows it).
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// The service cannot hold the event right now (buffer full, storage unavailable, shutting
    /// down). Nothing was stored; retry after the given number of seconds.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
}

fn body(msg: impl Into<String>) -> Json<ErrorBody> {
    Json(ErrorBody { error: msg.into() })
}

impl ApiError {
    /// 400 with `msg`.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::BadRequest(body(msg))
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

    /// 503 for an event the buffer could not take.
    pub fn push(err: PushError, retry_after: u64) -> Self {
        let msg = match err {
            PushError::Full => "the event buffer is full; nothing was stored, retry later",
            PushError::Closed => "the service is shutting down; nothing was stored, retry later",
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
    let text = resp.into_body().into_string().await.unwrap_or_default();
    let mut out = error_response(status, &describe(status, &text));
    if let Some(op) = op {
        out.set_data(op);
    }
    out
}

/// A `poem::Error` as a response, keeping its operation id.
pub fn error_into_response(e: poem::Error) -> Response {
    let op = e.data::<poem_openapi::OperationId>().copied();
    let mut resp = e.into_response();
    if let Some(op) = op {
        resp.set_data(op);
    }
    resp
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
        _ => text.strip_prefix("parse request payload error: ").unwrap_or(text).to_string(),
    }
}

/// The methods each path of the OpenAPI document answers, for the `Allow` header that RFC 9110
/// requires on a 405 (poem sends none, so a client could not learn what the path takes).
#[derive(Debug, Default)]
pub struct AllowedMethods {
    /// Path templates split at `/` (`{name}` matches any one segment), with their `Allow` value.
    paths: Vec<(Vec<String>, poem::http::HeaderValue)>,
}

impl AllowedMethods {
    /// Reads the paths and methods of the OpenAPI document `spec_json`.
    pub fn from_spec(spec_json: &str) -> Self {
        const METHODS: [&str; 8] = ["get", "head", "post", "put", "patch", "delete", "options", "trace"];
        let spec: serde_json::Value = serde_json::from_str(spec_json).unwrap_or_default();
        let mut paths = Vec::new();
        for (path, ops) in spec.get("paths").and_then(|p| p.as_object()).into_iter().flatten() {
            let ops = ops.as_object();
            let has = |m: &str| ops.is_some_and(|o| o.contains_key(m));
            // poem answers HEAD wherever it answers GET.
            let allow: Vec<String> = METHODS
                .iter()
                .filter(|m| has(m) || (**m == "head" && has("get")))
                .map(|m| m.to_uppercase())
                .collect();
            if let Ok(value) = poem::http::HeaderValue::from_str(&allow.join(", ")) {
                paths.push((path.split('/').map(str::to_string).collect(), value));
            }
        }
        Self { paths }
    }

    /// The `Allow` value of the path that `path` matches; a literal segment beats a `{name}`
    /// (`/ads/click` is not `/ads/{id}`), as in the router.
    pub fn allow(&self, path: &str) -> Option<&poem::http::HeaderValue> {
        let segments: Vec<&str> = path.split('/').collect();
        self.paths
            .iter()
            .filter(|(template, _)| {
                template.len() == segments.len()
                    && template
                        .iter()
                        .zip(&segments)
                        .all(|(t, s)| if t.starts_with('{') { !s.is_empty() } else { t == s })
            })
            .max_by_key(|(template, _)| template.iter().filter(|t| !t.starts_with('{')).count())
            .map(|(_, allow)| allow)
    }

    /// Adds `Allow` to a 405 answered for `path`.
    pub fn decorate(&self, path: &str, resp: &mut Response) {
        if resp.status() == StatusCode::METHOD_NOT_ALLOWED
            && let Some(allow) = self.allow(path)
        {
            resp.headers_mut().insert(poem::http::header::ALLOW, allow.clone());
        }
    }
}

/// A JSON error response with `status` and `msg`.
pub fn error_response(status: StatusCode, msg: &str) -> Response {
    let json = serde_json::to_vec(&ErrorBody { error: msg.to_string() }).unwrap_or_default();
    Response::builder().status(status).content_type("application/json; charset=utf-8").body(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_the_methods_of_the_matching_path() {
        let spec = r#"{"paths": {"/ads": {"get": {}, "post": {}}, "/ads/{id}": {"get": {}, "put": {}, "delete": {}},
            "/t/{event}": {"get": {}, "head": {}}, "/ads/click": {"post": {}}}}"#;
        let allowed = AllowedMethods::from_spec(spec);
        let allow = |p: &str| allowed.allow(p).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(allow("/ads").as_deref(), Some("GET, HEAD, POST"));
        assert_eq!(allow("/ads/click").as_deref(), Some("POST"));
        assert_eq!(allow("/ads/0").as_deref(), Some("GET, HEAD, PUT, DELETE"));
        assert_eq!(allow("/t/start").as_deref(), Some("GET, HEAD"));
        assert_eq!(allow("/nope"), None);
        assert_eq!(allow("/ads/a/b"), None);
        let mut resp = error_response(StatusCode::METHOD_NOT_ALLOWED, "no");
        allowed.decorate("/ads/click", &mut resp);
        assert_eq!(resp.headers()[poem::http::header::ALLOW], "POST");
    }
}
