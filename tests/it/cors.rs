//! Browser beacons: `navigator.sendBeacon` posts text/plain (no preflight), `fetch` with a JSON
//! body is preflighted; only the tracking endpoints speak CORS, for the configured origins.

use crate::support::TestApp;

const AD: &str = "11111111-1111-1111-1111-111111111111";

async fn preflight(app: &TestApp, path: &str, origin: &str) -> reqwest::Response {
    app.http
        .request(reqwest::Method::OPTIONS, format!("{}{path}", app.base))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn any_origin_may_send_events_by_default() {
    let app = TestApp::spawn().await;
    let resp = preflight(&app, "/ads/click", "https://news.example").await;
    assert_eq!(resp.status(), 204);
    // The origin named, with credentials allowed: sendBeacon with a JSON Blob sends in
    // credentials mode, which a `*` answer fails.
    assert_eq!(resp.headers()["access-control-allow-origin"], "https://news.example");
    assert_eq!(resp.headers()["access-control-allow-credentials"], "true");
    assert_eq!(resp.headers()["vary"], "Origin");
    assert!(resp.headers()["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    assert_eq!(resp.headers()["access-control-allow-headers"], "content-type");
    // The request itself, as sendBeacon sends it: text/plain, with an Origin.
    let resp = app
        .http
        .post(format!("{}/ads/click", app.base))
        .header("Origin", "https://news.example")
        .header("Content-Type", "text/plain;charset=UTF-8")
        .body(format!(r#"{{"adId":"{AD}","videoPlaybackTime":3}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(resp.headers()["access-control-allow-origin"], "https://news.example");
    assert_eq!(resp.headers()["access-control-allow-credentials"], "true");
    // A page's script may read when to retry, and the request's id.
    assert_eq!(resp.headers()["access-control-expose-headers"], "Retry-After, X-Request-Id");
    let resp = app.http.get(format!("{}/t/start?ad={AD}", app.base)).header("Origin", "https://x.example");
    let resp = resp.send().await.unwrap();
    assert_eq!(resp.headers()["access-control-allow-origin"], "https://x.example");
    assert_eq!(resp.headers()["vary"], "Origin");
    assert_eq!(app.wait_flushed(2).await, 2);
    // Not the catalog or analytics: those are not for other sites' pages.
    let resp = app.http.get(format!("{}/ads", app.base)).header("Origin", "https://news.example");
    assert!(resp.send().await.unwrap().headers().get("access-control-allow-origin").is_none());
    assert_ne!(preflight(&app, "/ads/analytics", "https://news.example").await.status(), 204);
}

#[tokio::test]
async fn a_configured_list_admits_only_its_origins() {
    let app = TestApp::spawn_with(&[("CORS_ALLOWED_ORIGINS", "https://www.publisher.example")]).await;
    let ok = preflight(&app, "/ads/impression", "https://www.publisher.example").await;
    assert_eq!(ok.status(), 204);
    assert_eq!(ok.headers()["access-control-allow-origin"], "https://www.publisher.example");
    assert_eq!(ok.headers()["vary"], "Origin");
    let refused = preflight(&app, "/ads/impression", "https://evil.example").await;
    assert_eq!(refused.status(), 403);
    assert!(refused.headers().get("access-control-allow-origin").is_none());
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("evil.example"), "{body}");
    // A simple request (sendBeacon) from elsewhere needs no preflight: it is refused outright.
    let resp = app
        .http
        .post(format!("{}/ads/impression", app.base))
        .header("Origin", "https://evil.example")
        .body(format!(r#"{{"adId":"{AD}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    // Players and servers send no Origin, and pages on the list do: both are taken.
    let player = app.post("/ads/impression", &serde_json::json!({"adId": AD})).await;
    assert_eq!(player.status(), 204);
    let page = app
        .http
        .post(format!("{}/ads/impression", app.base))
        .header("Origin", "https://www.publisher.example")
        .body(format!(r#"{{"adId":"{AD}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 204);
    assert_eq!(app.wait_flushed(2).await, 2);
    assert_eq!(app.number("SELECT count() FROM events").await, 2);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    // The refused preflight and the refused simple request: one event refused each.
    assert!(metrics.contains("adbeacon_events_rejected_total{reason=\"forbidden_origin\"} 2"), "{metrics}");
}
