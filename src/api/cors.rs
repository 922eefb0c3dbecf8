//! CORS for the tracking endpoints, so that web pages can send events with `fetch` (JSON bodies
//! trigger a preflight) as well as with `navigator.sendBeacon` (text/plain, no preflight). Only
//! tracking paths answer preflights and carry `Access-Control-Allow-Origin`; the catalog and
//! analytics are not meant to be called from other sites' pages.
//!
//! Answers name the page's origin and allow credentials, never `*`: `sendBeacon` with a JSON
//! `Blob` always sends in credentials mode (so does `fetch` with `credentials: "include"`), and
//! a browser drops such a request when its preflight answers `*`. The tracking endpoints read no
//! cookies, so allowing credentials gives a page nothing.

use std::collections::HashSet;

use poem::{
    Request, Response,
    http::{HeaderValue, Method, StatusCode, header},
};

use super::error;

/// Which origins may call the tracking endpoints (`CORS_ALLOWED_ORIGINS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// Any origin (`*`, the default): the tracking endpoints read no cookies, so nothing leaks.
    Any,
    /// Only these, as browsers send them (`https://www.example.com`, lower case, no path).
    Only(HashSet<String>),
}

impl AllowedOrigins {
    /// Parses `*` or a comma-separated list of origins.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim() == "*" {
            return Ok(Self::Any);
        }
        let mut set = HashSet::new();
        for origin in text.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let rest = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
            match rest {
                Some(host) if !host.is_empty() && !host.contains(['/', '?', '#', ' ']) => {
                    set.insert(origin.to_ascii_lowercase());
                }
                _ => return Err(format!("{origin:?} is not an origin such as https://www.example.com")),
            }
        }
        if set.is_empty() { Err("no origin given".into()) } else { Ok(Self::Only(set)) }
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if it is allowed:
    /// the origin itself (see the module's note on credentials).
    fn allow(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        match self {
            Self::Any => Some(origin.clone()),
            Self::Only(set) => {
                let text = origin.to_str().ok()?;
                set.contains(&text.to_ascii_lowercase()).then(|| origin.clone())
            }
        }
    }
}

/// The headers of an answer a page's script may read besides the simple ones: when to retry a
/// 429 or 503, and the id to quote in a report.
const EXPOSED: &str = "Retry-After, X-Request-Id";

/// Adds what every CORS answer carries: the allowed origin (which varies, hence
/// `Vary: Origin`, for caches on the way) and credentials allowed.
fn allow_origin(resp: &mut Response, allow: HeaderValue) {
    let headers = resp.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// Paths of the tracking endpoints, the only ones with CORS.
pub fn is_tracking_path(path: &str) -> bool {
    super::tracking_route(path).is_some()
}

/// True for a CORS preflight of a tracking endpoint.
pub fn is_preflight(req: &Request) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        && is_tracking_path(req.uri().path())
}

/// The answer to a preflight: 204 with what may be sent, cached by the browser for a day, or 403
/// for an origin that is not allowed.
pub fn preflight(allowed: &AllowedOrigins, req: &Request) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned().unwrap_or(HeaderValue::from_static(""));
    let Some(allow) = allowed.allow(&origin) else {
        let shown = origin.to_str().unwrap_or("?");
        return error::error_response(
            StatusCode::FORBIDDEN,
            &format!("origin {shown:?} may not send events here (CORS_ALLOWED_ORIGINS)"),
        );
    };
    let headers = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or(HeaderValue::from_static("content-type"));
    let mut resp = Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header(header::ACCESS_CONTROL_ALLOW_METHODS, "GET, HEAD, POST, OPTIONS")
        .header(header::ACCESS_CONTROL_ALLOW_HEADERS, headers)
        .header(header::ACCESS_CONTROL_MAX_AGE, "86400")
        .finish();
    allow_origin(&mut resp, allow);
    resp
}

/// A tracking request from a page whose origin is not allowed: refused outright, not only hidden
/// from the page by the browser, so that an allowlist really limits who can send events. (A
/// request without an `Origin` header, from a player or a server, is not a page's.) `origin` is
/// the request's `Origin`, looked up once by the caller, which needs it again.
pub fn refuse(allowed: &AllowedOrigins, origin: Option<&HeaderValue>, path: &str) -> Option<Response> {
    let origin = origin?;
    if !is_tracking_path(path) || allowed.allow(origin).is_some() {
        return None;
    }
    let shown = origin.to_str().unwrap_or("?");
    Some(error::error_response(
        StatusCode::FORBIDDEN,
        &format!("origin {shown:?} may not send events here (CORS_ALLOWED_ORIGINS)"),
    ))
}

/// Adds `Access-Control-Allow-Origin` (and the rest) to a tracking answer for an allowed
/// `origin`.
pub fn decorate(allowed: &AllowedOrigins, origin: Option<&HeaderValue>, resp: &mut Response) {
    if let Some(allow) = origin.and_then(|o| allowed.allow(o)) {
        allow_origin(resp, allow);
        resp.headers_mut().insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse() {
        assert_eq!(AllowedOrigins::parse("*").unwrap(), AllowedOrigins::Any);
        let only = AllowedOrigins::parse("https://www.Example.com, http://localhost:3000").unwrap();
        assert!(only.allow(&HeaderValue::from_static("https://www.example.com")).is_some());
        assert!(only.allow(&HeaderValue::from_static("http://localhost:3000")).is_some());
        assert!(only.allow(&HeaderValue::from_static("https://evil.example")).is_none());
        for bad in ["www.example.com", "https://example.com/path", "", "ftp://x"] {
            assert!(AllowedOrigins::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_tracking_paths_have_cors() {
        for p in ["/ads/impression", "/ads/click", "/ads/events", "/t/start", "/c/1111"] {
            assert!(is_tracking_path(p), "{p}");
        }
        for p in ["/ads", "/ads/analytics", "/metrics", "/ads/1111"] {
            assert!(!is_tracking_path(p), "{p}");
        }
    }
}
