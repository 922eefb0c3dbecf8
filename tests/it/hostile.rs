//! Hostile input (issue 5, item 6): every tracking and admin endpoint against malformed JSON,
//! wrong types, missing and unknown fields, an empty body, a wrong Content-Type, invalid UTF-8,
//! NUL bytes, JSON nested 10,000 deep, NaN and Infinity, oversized bodies (declared, actual and
//! chunked without end), slow headers and bodies, HEAD and OPTIONS.
//!
//! For every refused case: the status, a JSON `{"error": …}` naming the problem, the
//! rejected-by-reason counter (`adbeacon_events_rejected_total` for tracking endpoints,
//! `adbeacon_requests_rejected_total` for the catalog) moved by one, and nothing stored: no event
//! once valid traffic sent afterwards has been flushed, the ads table unchanged.
//!
//! Decided behaviour, checked here too:
//! - Bodies are read as JSON with no Content-Type, `application/json` (and `+json`), `text/plain`
//!   (sendBeacon) and `application/x-www-form-urlencoded` (curl -d); anything else is 415.
//! - Unknown fields are ignored, on tracking bodies (old clients send `timestamp` with
//!   impressions, and more) and on ad bodies (an ad read with GET can be PUT back as it is).
//! - In a batch, an item with a wrong or missing field is rejected on its own (202 with the item
//!   marked rejected); only a body that is not a JSON array is refused whole.
//! - A value an ad cannot hold (a NUL in its name or URL) is 422, as every ad field out of
//!   bounds; the tracking endpoints answer 400 for a bad field.
//! - A method a path does not serve is 405 with `Allow`; a plain OPTIONS (no CORS preflight
//!   headers) is 204 with `Allow`; HEAD is served wherever GET is.
//!
//! "Quickly" is not timed: every raw request fails the test only if no answer comes within 10 s,
//! while the timeouts under test are a fraction of a second.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::TestApp;

const AD1: &str = "11111111-1111-1111-1111-111111111111";
const LIMIT: &str = "32KiB";
const LIMIT_BYTES: usize = 32 * 1024;
const PATIENCE: Duration = Duration::from_secs(10);

/// One request and what it must get.
struct Case {
    name: String,
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    /// Words the `error` must contain.
    needle: &'static str,
    /// The `reason` label that must move by one.
    reason: &'static str,
}

fn case(
    name: impl Into<String>,
    method: &'static str,
    path: impl Into<String>,
    body: impl Into<Vec<u8>>,
    status: u16,
    needle: &'static str,
    reason: &'static str,
) -> Case {
    Case {
        name: name.into(),
        method,
        path: path.into(),
        content_type: Some("application/json"),
        body: body.into(),
        status,
        needle,
        reason,
    }
}

fn is_tracking(path: &str) -> bool {
    ["/ads/impression", "/ads/click", "/ads/events", "/t/", "/c/"].iter().any(|p| path.starts_with(p))
}

/// The counter a refusal of `path` moves.
fn counter(path: &str, reason: &str) -> String {
    let name =
        if is_tracking(path) { "adbeacon_events_rejected_total" } else { "adbeacon_requests_rejected_total" };
    format!("{name}{{reason=\"{reason}\"}}")
}

/// A valid body of each JSON endpoint with `field` set to the raw JSON `value` (replacing the
/// valid value, or added), so that a case breaks exactly one thing.
fn with_field(path: &str, field: &str, value: &str) -> Vec<u8> {
    let ad = format!("\"{AD1}\"");
    let mut fields: Vec<(&str, String)> = match path {
        "/ads/events" => vec![("adId", ad), ("kind", "\"start\"".into())],
        "/ads" | "/ads/{id}" => vec![
            ("name", "\"Sale\"".into()),
            ("video_url", "\"/v/sale.mp4\"".into()),
            ("target_url", "\"https://shop.example/sale\"".into()),
        ],
        _ => vec![("adId", ad)],
    };
    match fields.iter_mut().find(|(name, _)| *name == field) {
        Some(slot) => slot.1 = value.to_string(),
        None => fields.push((field, value.to_string())),
    }
    let object = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(",");
    let object = format!("{{{object}}}");
    if path == "/ads/events" { format!("[{object}]") } else { object }.into_bytes()
}

/// The JSON-body endpoints: (method, template, concrete path, a string field, a number field).
fn body_endpoints() -> Vec<(&'static str, &'static str, String, &'static str, &'static str)> {
    vec![
        ("POST", "/ads/impression", "/ads/impression".into(), "adId", "ad_id"),
        ("POST", "/ads/click", "/ads/click".into(), "adId", "videoPlaybackTime"),
        ("POST", "/ads/events", "/ads/events".into(), "eventId", "playbackTime"),
        ("POST", "/ads", "/ads".into(), "name", "active"),
        ("PUT", "/ads/{id}", format!("/ads/{AD1}"), "name", "active"),
    ]
}

fn matrix() -> Vec<Case> {
    let mut cases = Vec::new();
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    for (method, template, path, field, number) in body_endpoints() {
        let c = |name: &str, body: Vec<u8>, status, needle, reason| {
            case(format!("{method} {template}: {name}"), method, path.clone(), body, status, needle, reason)
        };
        // The whole body is unreadable.
        cases.push(c("malformed JSON", br#"{"adId": "#.to_vec(), 400, "not valid JSON", "malformed_json"));
        cases.push(c("empty body", Vec::new(), 400, "empty", "malformed_json"));
        cases.push(c("whitespace body", b"  \r\n ".to_vec(), 400, "empty", "malformed_json"));
        cases.push(c(
            "invalid UTF-8",
            with_field(template, field, "\"caf\u{e9}\"")
                .iter()
                .map(|b| if *b == 0xc3 { 0xff } else { *b })
                .collect(),
            400,
            "not valid UTF-8",
            "malformed_json",
        ));
        cases.push(c(
            "raw NUL in a string",
            with_field(template, field, "\"a\0b\""),
            400,
            "NUL byte",
            "malformed_json",
        ));
        cases.push(c(
            "raw NUL between tokens",
            with_field(template, field, "\0\"a\""),
            400,
            "NUL byte",
            "malformed_json",
        ));
        cases.push(c(
            "nested 10,000 deep",
            deep.clone().into_bytes(),
            400,
            "nested too deeply",
            "malformed_json",
        ));
        cases.push(c("NaN", with_field(template, number, "NaN"), 400, "NaN and Infinity", "malformed_json"));
        cases.push(c(
            "Infinity",
            with_field(template, number, "Infinity"),
            400,
            "NaN and Infinity",
            "malformed_json",
        ));
        cases.push(c(
            "-Infinity",
            with_field(template, number, "-Infinity"),
            400,
            "NaN and Infinity",
            "malformed_json",
        ));
        cases.push(c(
            "1e999",
            with_field(template, number, "1e999"),
            400,
            "number out of range",
            "malformed_json",
        ));
        cases.push(c(
            "data after the JSON value",
            [with_field(template, "x", "1"), b" {}".to_vec()].concat(),
            400,
            "after the JSON value",
            "malformed_json",
        ));
        cases.push(c(
            "oversized, Content-Length",
            with_field(template, "pad", &format!("\"{}\"", "x".repeat(LIMIT_BYTES))),
            413,
            "larger than the 32768-byte limit",
            "too_large",
        ));
        for ct in ["application/xml", "multipart/form-data; boundary=x", "image/png"] {
            let mut bad = c(
                &format!("Content-Type {ct}"),
                with_field(template, "x", "1"),
                415,
                "is not accepted; send application/json",
                "unsupported_media_type",
            );
            bad.content_type = Some(ct);
            cases.push(bad);
        }
    }
    // Shapes and fields, per endpoint.
    let imp = "/ads/impression";
    let click = "/ads/click";
    let put = format!("/ads/{AD1}");
    let ad = |extra: &str| {
        format!(
            r#"{{"name":"Sale","video_url":"/v/sale.mp4","target_url":"https://shop.example/sale"{extra}}}"#
        )
    };
    cases.extend([
        case("impression: an array", "POST", imp, "[1, 2]", 400, "must be a JSON object", "malformed_json"),
        case(
            "impression: a string",
            "POST",
            imp,
            r#""adId""#,
            400,
            "must be a JSON object",
            "malformed_json",
        ),
        case("impression: null", "POST", imp, "null", 400, "must be a JSON object", "malformed_json"),
        case(
            "impression: wrong type",
            "POST",
            imp,
            r#"{"adId": 42}"#,
            400,
            "adId: invalid type: integer",
            "invalid_field",
        ),
        case(
            "impression: an object for the id",
            "POST",
            imp,
            r#"{"adId": {"a": {"a": {}}}}"#,
            400,
            "adId: invalid type: map",
            "invalid_field",
        ),
        case("impression: missing id", "POST", imp, "{}", 400, "adId is required", "invalid_field"),
        case(
            "impression: \\u0000 in the id",
            "POST",
            imp,
            r#"{"adId": "\u0000"}"#,
            400,
            "adId must be a UUID",
            "invalid_field",
        ),
        case(
            "click: wrong type",
            "POST",
            click,
            format!(r#"{{"adId":"{AD1}","videoPlaybackTime":"30"}}"#),
            400,
            "videoPlaybackTime: invalid type: string",
            "invalid_field",
        ),
        case(
            "click: missing id",
            "POST",
            click,
            r#"{"timestamp":"2024-01-01T00:00:00Z"}"#,
            400,
            "adId is required",
            "invalid_field",
        ),
        case(
            "click: \\u0000 in the timestamp",
            "POST",
            click,
            format!(r#"{{"adId":"{AD1}","timestamp":"\u0000"}}"#),
            400,
            "timestamp must be an RFC 3339 time",
            "invalid_field",
        ),
        case(
            "click: \\u0000 in the ip",
            "POST",
            click,
            format!(r#"{{"adId":"{AD1}","ipAddress":"1.2.3.4\u0000"}}"#),
            400,
            "ipAddress must be an IPv4 or IPv6 address",
            "invalid_field",
        ),
        case(
            "events: an object",
            "POST",
            "/ads/events",
            format!(r#"{{"adId":"{AD1}","kind":"start"}}"#),
            400,
            "must be a JSON array",
            "malformed_json",
        ),
        case(
            "events: 1001 items",
            "POST",
            "/ads/events",
            format!("[{}{{}}]", "{},".repeat(1000)),
            413,
            "at most 1000 events",
            "too_large",
        ),
        case("create: an array", "POST", "/ads", "[]", 400, "must be a JSON object", "malformed_json"),
        case(
            "create: wrong type",
            "POST",
            "/ads",
            r#"{"name":5,"video_url":"/v.mp4","target_url":"https://a.example"}"#,
            400,
            "name: invalid type: integer",
            "invalid_field",
        ),
        case(
            "create: wrong type of active",
            "POST",
            "/ads",
            ad(r#","active":"yes""#),
            400,
            "active: invalid type: string",
            "invalid_field",
        ),
        case("create: bad id", "POST", "/ads", ad(r#","id":"x""#), 400, "id must be a UUID", "invalid_field"),
        case(
            "create: missing field",
            "POST",
            "/ads",
            r#"{"name":"Sale"}"#,
            400,
            "missing field `video_url`",
            "invalid_field",
        ),
        case(
            "create: \\u0000 in the name",
            "POST",
            "/ads",
            r#"{"name":"Sa\u0000le","video_url":"/v.mp4","target_url":"https://a.example"}"#,
            422,
            "name must not contain control characters",
            "invalid_field",
        ),
        case(
            "create: \\u0000 in target_url",
            "POST",
            "/ads",
            r#"{"name":"Sale","video_url":"/v.mp4","target_url":"https://a.example/\u0000"}"#,
            422,
            "target_url must be",
            "invalid_field",
        ),
        case(
            "create: \\u0000 in video_url",
            "POST",
            "/ads",
            r#"{"name":"Sale","video_url":"/v\u0000.mp4","target_url":"https://a.example"}"#,
            422,
            "video_url must be",
            "invalid_field",
        ),
        case(
            "update: wrong type",
            "PUT",
            put.clone(),
            r#"{"name":"Sale","video_url":[],"target_url":"https://a.example"}"#,
            400,
            "video_url: invalid type: sequence",
            "invalid_field",
        ),
        case("update: missing field", "PUT", put.clone(), "{}", 400, "missing field `name`", "invalid_field"),
        case(
            "update: \\u0000 in the name",
            "PUT",
            put.clone(),
            ad("").replace("Sale", "Sa\\u0000le"),
            422,
            "name must not contain control characters",
            "invalid_field",
        ),
        case(
            "update: bad id in the path",
            "PUT",
            "/ads/not-a-uuid",
            ad(""),
            400,
            "the ad id must be a UUID",
            "invalid_field",
        ),
        case(
            "retire: bad id in the path",
            "DELETE",
            "/ads/not-a-uuid",
            "",
            400,
            "the ad id must be a UUID",
            "invalid_field",
        ),
        // Pixels and the click-through: query and path parameters.
        case("beacon: no ad", "GET", "/t/start", "", 400, "ad is required", "invalid_field"),
        case("beacon: bad ad", "GET", "/t/start?ad=%00", "", 400, "ad must be a UUID", "invalid_field"),
        case(
            "beacon: invalid UTF-8 in the query",
            "GET",
            "/t/start?ad=%FF%FE",
            "",
            400,
            "ad",
            "invalid_field",
        ),
        case("beacon HEAD: bad ad", "HEAD", "/t/start?ad=nope", "", 400, "", "invalid_field"),
        case(
            "click-through: bad id",
            "GET",
            "/c/not-a-uuid",
            "",
            400,
            "the ad id must be a UUID",
            "invalid_field",
        ),
        case("click-through HEAD: bad id", "HEAD", "/c/%00", "", 400, "", "invalid_field"),
        // Methods an endpoint does not serve.
        case(
            "impression: GET",
            "GET",
            imp,
            "",
            405,
            "GET is not served on /ads/impression; it serves POST, OPTIONS",
            "method_not_allowed",
        ),
        case("impression: HEAD", "HEAD", imp, "", 405, "", "method_not_allowed"),
        case("click: HEAD", "HEAD", click, "", 405, "", "method_not_allowed"),
        case("click: PUT", "PUT", click, "{}", 405, "PUT is not served on /ads/click", "method_not_allowed"),
        case("events: HEAD", "HEAD", "/ads/events", "", 405, "", "method_not_allowed"),
        case(
            "events: DELETE",
            "DELETE",
            "/ads/events",
            "",
            405,
            "DELETE is not served on /ads/events",
            "method_not_allowed",
        ),
        case(
            "beacon: POST",
            "POST",
            format!("/t/start?ad={AD1}"),
            "{}",
            405,
            "POST is not served on /t/{event}; it serves GET, HEAD, OPTIONS",
            "method_not_allowed",
        ),
        case(
            "click-through: POST",
            "POST",
            format!("/c/{AD1}"),
            "",
            405,
            "POST is not served on /c/{adId}",
            "method_not_allowed",
        ),
        case(
            "ads: DELETE",
            "DELETE",
            "/ads",
            "",
            405,
            "DELETE is not served on /ads; it serves GET, HEAD, POST, OPTIONS",
            "method_not_allowed",
        ),
        case(
            "ad: PATCH",
            "PATCH",
            put.clone(),
            ad(""),
            405,
            "PATCH is not served on /ads/{id}; it serves GET, HEAD, PUT, DELETE, OPTIONS",
            "method_not_allowed",
        ),
        case("ad: POST", "POST", put, ad(""), 405, "POST is not served on /ads/{id}", "method_not_allowed"),
    ]);
    // Without a Content-Type the body is still read as JSON, and refused for what it is.
    let mut bare = case(
        "impression: no Content-Type, malformed",
        "POST",
        imp,
        "{",
        400,
        "not valid JSON",
        "malformed_json",
    );
    bare.content_type = None;
    cases.push(bare);
    cases
}

async fn error_of(resp: reqwest::Response, head: bool) -> String {
    let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content type {ct:?}");
    if head {
        return String::new();
    }
    let body: Value = resp.json().await.expect("a JSON body");
    body["error"].as_str().unwrap_or_else(|| panic!("no error string in {body}")).to_string()
}

/// The ads table as a value to compare.
async fn ads_snapshot(app: &TestApp) -> String {
    app.query("SELECT count(), sum(version), groupArray(name) FROM (SELECT * FROM ads ORDER BY id, version)")
        .await
}

/// Sends valid traffic after the hostile cases and checks that only it was stored.
async fn only_valid_traffic_is_stored(app: &TestApp, already: u64) {
    assert_eq!(app.post("/ads/impression", &json!({"adId": AD1})).await.status(), 204);
    assert_eq!(app.post("/ads/click", &json!({"adId": AD1})).await.status(), 202);
    let batch = json!([{"adId": AD1, "kind": "start"}]);
    assert_eq!(app.post("/ads/events", &batch).await.status(), 202);
    assert_eq!(app.get(&format!("/t/midpoint?ad={AD1}")).await.status(), 200);
    let n = already + 4;
    assert_eq!(app.wait_flushed(n).await, n);
    assert_eq!(app.number("SELECT count() FROM events").await, n, "a refused request stored an event");
}

/// Sends one case and checks its answer and its counter.
async fn run(app: &TestApp, c: &Case) -> Result<(), String> {
    let sample = counter(&c.path, c.reason);
    let before = app.metric(&sample).await;
    let mut req = app
        .http
        .request(c.method.parse().unwrap(), format!("{}{}", app.base, c.path))
        .timeout(PATIENCE)
        .body(c.body.clone());
    if let Some(ct) = c.content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.map_err(|e| format!("no answer: {e}"))?;
    let status = resp.status().as_u16();
    if status != c.status {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("status {status}, expected {}: {text}", c.status));
    }
    if c.status == 405 && !resp.headers().contains_key("allow") {
        return Err("no Allow header".into());
    }
    // The reason travels from the handler to the front endpoint in a header of its own, which
    // must not reach the client.
    if let Some(name) = resp.headers().keys().find(|k| k.as_str().starts_with("x-adbeacon")) {
        return Err(format!("the internal header {name} reached the client"));
    }
    let error = error_of(resp, c.method == "HEAD").await;
    if !error.contains(c.needle) {
        return Err(format!("{error:?} lacks {:?}", c.needle));
    }
    let after = app.metric(&sample).await;
    if after != before + 1 {
        return Err(format!("{sample} went from {before} to {after}"));
    }
    Ok(())
}

#[tokio::test]
async fn hostile_requests_get_the_right_4xx_and_store_nothing() {
    let app = TestApp::spawn_with(&[("MAX_BODY_BYTES", LIMIT), ("MAX_BATCH_BODY_BYTES", LIMIT)]).await;
    let ads_before = ads_snapshot(&app).await;
    let cases = matrix();
    let mut failures = Vec::new();
    for c in &cases {
        if let Err(e) = run(&app, c).await {
            failures.push(format!("{}: {e}", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(ads_snapshot(&app).await, ads_before, "a refused request changed the catalog");
    only_valid_traffic_is_stored(&app, 0).await;
}

/// What is tolerated, and stored: unknown fields, and every content type read as JSON.
#[tokio::test]
async fn hostile_unknown_fields_and_json_content_types_are_accepted() {
    let app = TestApp::spawn().await;
    let extra = json!({"adId": AD1, "timestamp": "2024-01-01T00:00:00Z", "sdk": {"v": [1, 2]}, "x": null});
    assert_eq!(app.post("/ads/impression", &extra).await.status(), 204);
    let click = json!({"adId": AD1, "campaign": "spring", "nested": {"deep": [[[]]]}});
    assert_eq!(app.post("/ads/click", &click).await.status(), 202);
    let batch = json!([{"adId": AD1, "kind": "start", "sessionId": "s-1"}]);
    let resp = app.post("/ads/events", &batch).await;
    assert_eq!(resp.json::<Value>().await.unwrap()["accepted"], 1);
    let body = format!(r#"{{"adId":"{AD1}"}}"#);
    for ct in [
        "application/json; charset=utf-8",
        "application/vnd.adbeacon+json",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
    ] {
        assert_eq!(app.post_raw("/ads/impression", ct, &body).await.status(), 204, "{ct}");
    }
    let bare = app.http.post(format!("{}/ads/impression", app.base)).body(body.clone()).send().await.unwrap();
    assert_eq!(bare.status(), 204, "no Content-Type");
    // An ad read with GET can be sent back with PUT as it is, read-only fields and all.
    let got: Value = app.get(&format!("/ads/{AD1}")).await.json().await.unwrap();
    let put = app.http.put(format!("{}/ads/{AD1}", app.base)).json(&got).send().await.unwrap();
    assert_eq!(put.status(), 200);
    let created = app
        .post_raw(
            "/ads",
            "text/plain",
            r#"{"name":"Plain","video_url":"/v.mp4","target_url":"https://a.example","note":"x"}"#,
        )
        .await;
    assert_eq!(created.status(), 201);
    assert_eq!(app.wait_flushed(8).await, 8);
    assert_eq!(app.number("SELECT count() FROM events").await, 8);
}

/// In a batch a bad item is refused alone, counted by reason; the others are stored.
#[tokio::test]
async fn hostile_batch_items_are_refused_one_by_one() {
    let app = TestApp::spawn().await;
    let before = app.metric(r#"adbeacon_events_rejected_total{reason="invalid_field"}"#).await;
    let batch = json!([
        {"adId": AD1, "kind": "start"},
        {"adId": 42, "kind": "start"},
        {"kind": "start"},
        {"adId": AD1, "kind": "st\u{0}art"},
        {"adId": AD1, "kind": "start", "playbackTime": "7"},
        [1],
    ]);
    let resp: Value = app.post("/ads/events", &batch).await.json().await.unwrap();
    assert_eq!((resp["accepted"].as_u64(), resp["rejected"].as_u64()), (Some(1), Some(5)), "{resp}");
    let errors: Vec<&str> =
        resp["results"].as_array().unwrap()[1..].iter().map(|r| r["error"].as_str().unwrap()).collect();
    for (error, needle) in errors.iter().zip([
        "adId: invalid type",
        "adId is required",
        "is not an event kind",
        "playbackTime: invalid type",
        "must be a JSON object",
    ]) {
        assert!(error.contains(needle), "{error:?} lacks {needle:?}");
    }
    assert_eq!(app.metric(r#"adbeacon_events_rejected_total{reason="invalid_field"}"#).await, before + 5);
    assert_eq!(app.wait_flushed(1).await, 1);
    assert_eq!(app.number("SELECT count() FROM events").await, 1);
}

/// Plain OPTIONS (no CORS preflight headers) answers what a path serves; HEAD is served where
/// GET is; neither counts as a refusal or stores anything.
#[tokio::test]
async fn hostile_options_and_head() {
    let app = TestApp::spawn().await;
    let paths = [
        ("/ads/impression", "POST, OPTIONS"),
        ("/ads/click", "POST, OPTIONS"),
        ("/ads/events", "POST, OPTIONS"),
        ("/t/start", "GET, HEAD, OPTIONS"),
        ("/c/11111111-1111-1111-1111-111111111111", "GET, HEAD, OPTIONS"),
        ("/ads", "GET, HEAD, POST, OPTIONS"),
        ("/ads/11111111-1111-1111-1111-111111111111", "GET, HEAD, PUT, DELETE, OPTIONS"),
    ];
    for (path, allow) in paths {
        let resp =
            app.http.request(reqwest::Method::OPTIONS, format!("{}{path}", app.base)).send().await.unwrap();
        assert_eq!(resp.status(), 204, "OPTIONS {path}");
        assert_eq!(resp.headers()["allow"], allow, "OPTIONS {path}");
    }
    let none = app
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/no/such/path", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 404);
    // A real preflight is still answered as CORS.
    let preflight = app
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/ads/click", app.base))
        .header("origin", "https://www.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    assert!(preflight.headers().contains_key("access-control-allow-origin"));
    // A preflight of a path without CORS is not granted.
    let refused = app
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/ads/analytics", app.base))
        .header("origin", "https://www.example.com")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 405);
    assert_eq!(refused.headers()["allow"], "GET, HEAD, OPTIONS");
    assert!(refused.headers().get("access-control-allow-origin").is_none());
    // Without an Origin it is no browser's preflight: a plain OPTIONS.
    let plain = app
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/ads/analytics", app.base))
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (plain.status().as_u16(), &plain.headers()["allow"]),
        (204, &"GET, HEAD, OPTIONS".parse().unwrap())
    );
    let error: Value = refused.json().await.unwrap();
    assert_eq!(
        error["error"],
        "cross-origin requests are not served on /ads/analytics (only the tracking endpoints answer \
         CORS preflights); it serves GET, HEAD, OPTIONS to same-origin and server-side callers"
    );
    let no_redirects =
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for path in [
        format!("/t/start?ad={AD1}"),
        format!("/c/{AD1}"),
        "/ads".into(),
        format!("/ads/{AD1}"),
        "/healthz".into(),
    ] {
        let resp = no_redirects.head(format!("{}{path}", app.base)).send().await.unwrap();
        assert!(resp.status().is_success() || resp.status() == 302, "HEAD {path}: {}", resp.status());
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    // Every reason's series exists from the start at 0: those above 0 are the refusals.
    let refusals: Vec<&str> =
        metrics.lines().filter(|l| l.contains("rejected_total{reason=") && !l.ends_with(" 0")).collect();
    assert_eq!(
        refusals,
        [r#"adbeacon_requests_rejected_total{reason="method_not_allowed"} 1"#],
        "only the preflight"
    );
    assert_eq!(app.post("/ads/impression", &json!({"adId": AD1})).await.status(), 204);
    assert_eq!(app.wait_flushed(1).await, 1);
    assert_eq!(app.number("SELECT count() FROM events").await, 1);
}

/// A response read off a raw connection.
struct Raw {
    status: u16,
    headers: String,
    body: String,
}

/// Reads one response (status line, headers, Content-Length body) within [`PATIENCE`].
async fn read_response(stream: &mut (impl AsyncRead + Unpin)) -> Raw {
    tokio::time::timeout(PATIENCE, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).to_string();
                    return Raw { status, headers: head.to_ascii_lowercase(), body };
                }
            }
            let n = stream.read(&mut chunk).await.expect("the response, not a reset");
            assert!(n > 0, "closed without a response; read so far: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("an answer within 10 s")
}

fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_string()
}

fn head(method: &str, path: &str, extra: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: adbeacon\r\nContent-Type: application/json\r\n{extra}\r\n")
}

fn assert_refused(raw: &Raw, status: u16, needle: &str) {
    assert_eq!(raw.status, status, "{} {}", raw.headers, raw.body);
    assert!(raw.headers.contains("content-type: application/json"), "{}", raw.headers);
    let error: Value = serde_json::from_str(&raw.body).unwrap();
    assert!(error["error"].as_str().unwrap().contains(needle), "{error} lacks {needle:?}");
    assert!(raw.headers.contains("connection: close"), "{}", raw.headers);
}

/// Waits until the server has closed the connection (EOF or reset), within [`PATIENCE`].
async fn assert_closed(stream: &mut (impl AsyncRead + Unpin)) {
    let mut rest = [0u8; 64];
    let read = tokio::time::timeout(PATIENCE, stream.read(&mut rest)).await.expect("closed within 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "still open: {read:?}");
}

/// Oversized bodies are refused by their declared length before anything is read, and a chunked
/// body is cut at the limit: a body that never ends gets its 413 without the server waiting for
/// the end.
#[tokio::test]
async fn hostile_oversized_streams_are_cut_at_the_limit() {
    let app = TestApp::spawn_with(&[("MAX_BODY_BYTES", LIMIT), ("MAX_BATCH_BODY_BYTES", LIMIT)]).await;
    let ads_before = ads_snapshot(&app).await;
    for (method, _, path, _, _) in body_endpoints() {
        let sample = counter(&path, "too_large");
        let before = app.metric(&sample).await;
        // Declared: 1 GB is announced and nothing sent.
        let mut s = TcpStream::connect(addr(&app)).await.unwrap();
        s.write_all(head(method, &path, "Content-Length: 1000000000\r\n").as_bytes()).await.unwrap();
        assert_refused(&read_response(&mut s).await, 413, "larger than the 32768-byte limit");
        assert_closed(&mut s).await;

        // Chunked without end: 4 KiB chunks until the server stops taking them.
        let s = TcpStream::connect(addr(&app)).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        wr.write_all(head(method, &path, "Transfer-Encoding: chunked\r\n").as_bytes()).await.unwrap();
        let writer = tokio::spawn(async move {
            // Whitespace: a valid start of JSON that never becomes a value.
            let chunk = format!("1000\r\n{}\r\n", " ".repeat(4096));
            while wr.write_all(chunk.as_bytes()).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let raw = read_response(&mut rd).await;
        writer.abort();
        assert_refused(&raw, 413, "larger than the 32768-byte limit");
        assert_eq!(app.metric(&sample).await, before + 2, "{method} {path}: {sample}");
    }
    assert_eq!(ads_snapshot(&app).await, ads_before);
    only_valid_traffic_is_stored(&app, 0).await;
}

/// An answer that comes before the body (a 401 for an unknown key, a 413 for a declared length
/// over the limit) reaches a client that sends its whole body before it reads, as Python's
/// `http.client` does: the server reads and throws away the rest of the body before it closes,
/// where closing with it unread would reset the connection and fail the client's sending.
#[tokio::test]
async fn early_answers_reach_clients_that_send_the_whole_body_first() {
    let admin = "a".repeat(24);
    let app = TestApp::spawn_with(&[("API_KEYS", &format!("admin:{admin}"))]).await;
    // Far more than the two sockets' buffers hold, so that the client is still sending when
    // the answer is written.
    let body = vec![b' '; 12 * 1024 * 1024];
    let cases = [
        ("/ads", format!("X-API-Key: {}\r\n", "w".repeat(24)), 401, "not valid"),
        ("/ads", format!("X-API-Key: {admin}\r\n"), 413, "larger than the 65536-byte limit"),
        ("/ads/click", String::new(), 413, "larger than the 65536-byte limit"),
    ];
    for (path, key, status, needle) in cases {
        let mut s = TcpStream::connect(addr(&app)).await.unwrap();
        let head = head("POST", path, &format!("{key}Content-Length: {}\r\n", body.len()));
        let sent = tokio::time::timeout(PATIENCE, async {
            s.write_all(head.as_bytes()).await?;
            s.write_all(&body).await
        })
        .await
        .expect("the body taken within 10 s");
        sent.unwrap_or_else(|e| panic!("{path}: sending the whole body failed: {e}"));
        let raw = read_response(&mut s).await;
        assert_eq!(raw.status, status, "{path}: {} {}", raw.headers, raw.body);
        let error: Value = serde_json::from_str(&raw.body).unwrap();
        assert!(error["error"].as_str().unwrap().contains(needle), "{path}: {error}");
        assert_closed(&mut s).await;
    }
}

/// Slow clients: headers that never end are cut off after HEADER_READ_TIMEOUT (by the HTTP
/// layer, which closes the connection: no request exists yet to answer, so it is counted, not
/// answered); a body that does not
/// arrive within BODY_READ_TIMEOUT, stalled or trickling, gets 408 and the connection is closed.
#[tokio::test]
async fn hostile_slow_clients_are_cut_off() {
    let app = TestApp::spawn_with(&[("HEADER_READ_TIMEOUT", "300ms"), ("BODY_READ_TIMEOUT", "500ms")]).await;
    let ads_before = ads_snapshot(&app).await;

    let mut slow_headers = TcpStream::connect(addr(&app)).await.unwrap();
    slow_headers.write_all(b"POST /ads/click HTTP/1.1\r\nHost: adbeacon\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    // A reset counts as closed too.
    let read =
        tokio::time::timeout(PATIENCE, slow_headers.read(&mut buf)).await.expect("cut off within 10 s");
    if let Ok(n) = read {
        assert!(n == 0 || buf.starts_with(b"HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    }
    // Counted once, as a refused request; the test client's idle keep-alive connections, closed
    // by the same timeout, are not slow clients and are not counted.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(app.metric(r#"adbeacon_requests_rejected_total{reason="header_timeout"}"#).await, 1);

    let body = format!(r#"{{"adId":"{AD1}"}}"#);
    for (method, _, path, _, _) in body_endpoints() {
        let sample = counter(&path, "body_timeout");
        let before = app.metric(&sample).await;
        // Stalled: 10 of 100 announced bytes, then nothing.
        let mut s = TcpStream::connect(addr(&app)).await.unwrap();
        s.write_all(head(method, &path, "Content-Length: 100\r\n").as_bytes()).await.unwrap();
        s.write_all(&body.as_bytes()[..10]).await.unwrap();
        assert_refused(&read_response(&mut s).await, 408, "did not arrive within 500ms");
        assert_closed(&mut s).await;

        // Trickling: a byte every 50 ms keeps arriving, but the whole body is late.
        let s = TcpStream::connect(addr(&app)).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        wr.write_all(head(method, &path, &format!("Content-Length: {}\r\n", body.len())).as_bytes())
            .await
            .unwrap();
        let bytes = body.clone().into_bytes();
        let writer = tokio::spawn(async move {
            for b in bytes {
                if wr.write_all(&[b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        assert_refused(&read_response(&mut rd).await, 408, "did not arrive within 500ms");
        writer.abort();
        assert_eq!(app.metric(&sample).await, before + 2, "{method} {path}: {sample}");
    }
    assert_eq!(ads_snapshot(&app).await, ads_before);
    only_valid_traffic_is_stored(&app, 0).await;
}

/// The header read timeout runs only while a connection waits for a request's head: from its
/// opening and from each answer. A head trickled a byte at a time is cut off all the same; a
/// keep-alive connection whose requests come in time is served for longer than the timeout; a
/// request being served (a slow body, a body sent late after `100 Continue`) is not cut off by
/// it; an idle keep-alive connection, and one whose client stops reading its answers, is closed
/// after it and not counted as a slow client.
#[tokio::test]
async fn hostile_header_timeout_runs_only_while_a_head_is_awaited() {
    let app = TestApp::spawn_with(&[("HEADER_READ_TIMEOUT", "300ms"), ("BODY_READ_TIMEOUT", "5s")]).await;
    let slow = r#"adbeacon_requests_rejected_total{reason="header_timeout"}"#;
    let body = format!(r#"{{"adId":"{AD1}"}}"#);
    let click =
        |extra: &str| head("POST", "/ads/click", &format!("Content-Length: {}\r\n{extra}", body.len()));

    // Trickled: a byte every 50 ms keeps arriving, but the head is not complete in 300 ms.
    let before = app.metric(slow).await;
    let (mut rd, mut wr) = TcpStream::connect(addr(&app)).await.unwrap().into_split();
    let trickle = tokio::spawn(async move {
        for b in
            format!("POST /ads/click HTTP/1.1\r\nHost: adbeacon\r\nX-Padding: {}", "a".repeat(200)).bytes()
        {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert_closed(&mut rd).await;
    assert!(!trickle.is_finished(), "closed only after the whole head was sent");
    trickle.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.metric(slow).await, before + 1, "the trickled head is counted");

    // In time: 8 requests 100 ms apart on one connection, 800 ms in all.
    let mut s = TcpStream::connect(addr(&app)).await.unwrap();
    for i in 0..8 {
        s.write_all(format!("{}{body}", click("")).as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut s).await.status, 202, "request {i}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A slow body on the same connection: the head at once, the body over about a second.
    s.write_all(click("").as_bytes()).await.unwrap();
    for piece in body.as_bytes().chunks(10) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(piece).await.unwrap();
    }
    assert_eq!(read_response(&mut s).await.status, 202, "slow body");

    // `Expect: 100-continue`: the body sent 800 ms after the `100 Continue`.
    s.write_all(click("Expect: 100-continue\r\n").as_bytes()).await.unwrap();
    let mut interim = Vec::new();
    while !interim.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut byte)).await.expect("100 Continue").unwrap();
        interim.push(byte[0]);
    }
    assert!(interim.starts_with(b"HTTP/1.1 100"), "{:?}", String::from_utf8_lossy(&interim));
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.write_all(body.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s).await.status, 202, "body after 100 Continue");

    // Idle: closed after the timeout, and not counted.
    let counted = app.metric(slow).await;
    assert_closed(&mut s).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.metric(slow).await, counted, "an idle keep-alive connection is not a slow client");

    // A client that asks for 200 copies of the 130 KB spec (26 MB, more than the sockets' buffers
    // hold) and reads none: closed once no answer byte could be written for the timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    let mut s = socket.connect(addr(&app).parse().unwrap()).await.unwrap();
    let spec = "GET /openapi.json HTTP/1.1\r\nHost: adbeacon\r\n\r\n".repeat(200);
    s.write_all(spec.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut got)).await.expect("closed within 10 s");
    let answers = got.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
    assert!(
        read.is_err() || answers < 200,
        "all {answers} answers written: the stalled writer was not closed"
    );
    assert_eq!(app.metric(slow).await, counted, "a client that stops reading is not a slow sender");
}

/// Client timestamps 100 years away are refused, naming `timestamp` (the accepted window is
/// MAX_CLOCK_SKEW ahead and MAX_EVENT_AGE behind, by default 5 minutes and the raw retention).
#[tokio::test]
async fn hostile_timestamps_100_years_away_are_refused() {
    let app = TestApp::spawn().await;
    for ts in ["2126-01-01T00:00:00Z", "1926-01-01T00:00:00Z"] {
        let before = app.metric(r#"adbeacon_events_rejected_total{reason="bad_timestamp"}"#).await;
        let resp = app.post("/ads/click", &json!({"adId": AD1, "timestamp": ts})).await;
        assert_eq!(resp.status(), 400, "{ts}");
        assert!(error_of(resp, false).await.contains("timestamp"), "{ts}");
        assert_eq!(app.metric(r#"adbeacon_events_rejected_total{reason="bad_timestamp"}"#).await, before + 1);
    }
    only_valid_traffic_is_stored(&app, 0).await;
}

/// MAX_CONNECTIONS bounds the open connections: past it the next one waits (in the kernel's
/// listen queue, unanswered) until one closes, so idle or slow sockets cannot exhaust memory
/// or the file descriptors ClickHouse, Redis and the log need.
#[tokio::test]
async fn connections_past_the_limit_wait_for_one_to_close() {
    let app = TestApp::spawn_with(&[
        ("MAX_CONNECTIONS", "2"),
        ("HEADER_READ_TIMEOUT", "500ms"),
        ("BODY_READ_TIMEOUT", "30s"),
    ])
    .await;
    // The test client's idle keep-alive connections close after the header timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Two requests in progress (a body that is slow to come) hold both places.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr(&app)).await.unwrap();
        s.write_all(head("POST", "/ads/click", "Content-Length: 100\r\n").as_bytes()).await.unwrap();
        s.write_all(b"{\"adId\"").await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = || reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let url = format!("{}/healthz", app.base);
    // Not a timing assertion: a served /healthz answers in milliseconds; this one is not served.
    let waiting = tokio::time::timeout(Duration::from_secs(1), fresh().get(&url).send()).await;
    assert!(waiting.is_err(), "a third connection was served: {waiting:?}");
    drop(held.pop());
    let served =
        tokio::time::timeout(PATIENCE, fresh().get(&url).send()).await.expect("served once one closed");
    assert_eq!(served.unwrap().status(), 200);
}

/// Requests the HTTP layer refuses itself (a malformed head, conflicting Content-Lengths, a URI
/// or a head over the limits) never reach an endpoint. They get the same `{"error": …}` answer
/// as every other refusal, and are counted all the same; one after a valid request on the same
/// connection too, after that request's own answer.
#[tokio::test]
async fn requests_hyper_refuses_are_answered_in_json_and_counted() {
    let app = TestApp::spawn().await;
    let sample = r#"adbeacon_requests_rejected_total{reason="malformed_http"}"#;
    // hyper reads a head in growing steps up to the connection's 64 KiB buffer, so an
    // oversized URI is refused as too long or, where the buffer fills first, as too large.
    let cases: [(String, &[u16], &str); 5] = [
        ("GARBAGE\r\n\r\n".to_string(), &[400], "not valid HTTP/1.1"),
        (
            "POST /ads/click HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
                .to_string(),
            &[400],
            "Content-Length",
        ),
        (
            format!("GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "x".repeat(256 * 1024)),
            &[431],
            "too large",
        ),
        (format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(70_000)), &[414, 431], "too l"),
        (
            "GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/9.9\r\n\r\n".to_string(),
            &[400],
            "not valid HTTP/1.1",
        ),
    ];
    for (i, (head, statuses, needle)) in cases.iter().enumerate() {
        let mut s = TcpStream::connect(addr(&app)).await.unwrap();
        let _ = s.write_all(head.as_bytes()).await;
        // Everything up to the close: the connection must end after the refusal.
        let mut all = Vec::new();
        let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut all)).await.expect("closed within 10 s");
        assert!(read.is_ok() || !all.is_empty(), "{i}: {read:?}");
        let mut answers = &all[..];
        if i == 4 {
            let second = all.windows(9).skip(1).position(|w| w == b"HTTP/1.1 ").expect("two answers") + 1;
            let first = read_response(&mut &all[..second]).await;
            assert_eq!(first.status, 200, "the valid request first: {} {}", first.headers, first.body);
            answers = &all[second..];
        }
        let raw = read_response(&mut answers).await;
        assert!(statuses.contains(&raw.status), "{i}: {} {}", raw.headers, raw.body);
        assert_refused(&raw, raw.status, needle);
        assert!(raw.headers.contains("x-request-id: "), "{i}: {}", raw.headers);
        // As every error answer of the service: no cache keeps a refusal.
        assert!(raw.headers.contains("cache-control: no-store"), "{i}: {}", raw.headers);
    }
    assert_eq!(app.metric(sample).await, cases.len() as u64);
}
