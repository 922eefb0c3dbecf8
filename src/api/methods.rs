//! Which methods each path serves, read from the OpenAPI document: the `Allow` header of a 405
//! and the answer to a plain `OPTIONS` (one without CORS preflight headers, which [`super::cors`]
//! answers): 204 with `Allow`, as RFC 9110 describes it. Only those two rare answers match paths
//! here; ordinary requests never do.

use poem::{
    Response,
    http::{HeaderValue, StatusCode, header},
};

/// The order methods are listed in `Allow`.
const ORDER: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"];

/// Path templates and the methods they serve.
#[derive(Debug, Default)]
pub struct Methods {
    routes: Vec<(Vec<String>, String, HeaderValue)>,
}

impl Methods {
    /// Reads every path of the spec (JSON); `extra` adds routes outside it (`/openapi.json`).
    pub fn from_spec(spec_json: &str, extra: &[(&str, &[&str])]) -> Self {
        let spec: serde_json::Value = serde_json::from_str(spec_json).unwrap_or_default();
        let mut found: Vec<(String, Vec<String>)> = Vec::new();
        if let Some(paths) = spec.get("paths").and_then(|p| p.as_object()) {
            for (path, ops) in paths {
                let methods = ops.as_object().into_iter().flat_map(|o| o.keys()).map(|m| m.to_uppercase());
                found.push((path.clone(), methods.collect()));
            }
        }
        found.extend(extra.iter().map(|(p, m)| (p.to_string(), m.iter().map(|m| m.to_string()).collect())));
        let routes = found
            .into_iter()
            .filter_map(|(path, mut methods)| {
                // poem answers HEAD wherever GET is served; OPTIONS is answered here.
                if methods.iter().any(|m| m == "GET") {
                    methods.push("HEAD".into());
                }
                methods.push("OPTIONS".into());
                let allow: Vec<&str> = ORDER.into_iter().filter(|o| methods.iter().any(|m| m == o)).collect();
                let value = HeaderValue::from_str(&allow.join(", ")).ok()?;
                Some((segments(&path).map(str::to_string).collect(), path, value))
            })
            .collect();
        Methods { routes }
    }

    /// The template of the route serving `path`, and its `Allow` value. A literal segment wins
    /// over a parameter (`/ads/click` is not `/ads/{id}`), as in the router.
    pub fn find(&self, path: &str) -> Option<(&str, &HeaderValue)> {
        self.routes
            .iter()
            .filter(|(template, _, _)| {
                let mut parts = segments(path);
                template.iter().all(|t| parts.next().is_some_and(|p| t == p || t.starts_with('{')))
                    && parts.next().is_none()
            })
            .min_by_key(|(template, _, _)| template.iter().filter(|t| t.starts_with('{')).count())
            .map(|(_, path, allow)| (path.as_str(), allow))
    }
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// The answer to a plain `OPTIONS`: 204 with `Allow`.
pub fn options(allow: &HeaderValue) -> Response {
    Response::builder().status(StatusCode::NO_CONTENT).header(header::ALLOW, allow.clone()).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_templates() {
        let spec = r#"{"paths": {"/ads": {"get": {}, "post": {}}, "/ads/{id}": {"get": {}, "put": {}, "delete": {}},
            "/ads/click": {"post": {}}, "/t/{event}": {"get": {}, "head": {}}}}"#;
        let m = Methods::from_spec(spec, &[("/openapi.json", &["GET"])]);
        let allow = |p: &str| m.find(p).map(|(t, a)| (t.to_string(), a.to_str().unwrap().to_string()));
        assert_eq!(allow("/ads").unwrap().1, "GET, HEAD, POST, OPTIONS");
        assert_eq!(
            allow("/ads/123").unwrap(),
            ("/ads/{id}".into(), "GET, HEAD, PUT, DELETE, OPTIONS".into())
        );
        assert_eq!(allow("/ads/click").unwrap().1, "POST, OPTIONS");
        assert_eq!(allow("/t/start").unwrap().1, "GET, HEAD, OPTIONS");
        assert_eq!(allow("/openapi.json").unwrap().1, "GET, HEAD, OPTIONS");
        assert!(allow("/ads/1/2").is_none() && allow("/nowhere").is_none());
    }
}
