//! Traffic quality end to end: bots and empty user agents are stored flagged and left out of the
//! net numbers, repeats count once (by event id, and by the DEDUP_WINDOW rule), rate limits answer
//! 429 with Retry-After, and client timestamps outside the accepted window are refused.

use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::support::TestApp;

const AD: &str = "11111111-1111-1111-1111-111111111111";
const INGEST: &str = "ingest-key-0123456789";
const READER: &str = "read-key-0123456789";
const GOOGLEBOT: &str = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";

/// A client from loopback address 127.0.0.`n` with user agent `ua` (`None`: no header at all).
fn client(n: u8, ua: Option<&str>) -> reqwest::Client {
    let b = reqwest::Client::builder().local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)));
    match ua {
        Some(ua) => b.user_agent(ua),
        None => b,
    }
    .build()
    .unwrap()
}

async fn post(http: &reqwest::Client, app: &TestApp, path: &str, body: Value) -> (u16, String) {
    let resp = http.post(format!("{}{path}", app.base)).json(&body).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn analytics(app: &TestApp) -> Value {
    let resp = app.get(&format!("/ads/analytics?adId={AD}&timeframe=1h")).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

fn rfc(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

#[tokio::test]
async fn bot_clicks_are_stored_flagged_and_do_not_move_net_ctr() {
    let app = TestApp::spawn_with(&[("BOT_USER_AGENTS", "EvilScan, PriceWatcher")]).await;
    for _ in 0..10 {
        assert_eq!(app.post("/ads/impression", &json!({"adId": AD})).await.status(), 204);
    }
    assert_eq!(app.post("/ads/click", &json!({"adId": AD})).await.status(), 202);
    // A crawler, a configured pattern, a tool and a request without a user agent: all answered
    // like anyone else (a bot is not told it was spotted), all stored, none counted.
    let (bot, scanner, curl, anonymous) = (
        client(2, Some(GOOGLEBOT)),
        client(3, Some("EvilScan/2.0")),
        client(4, Some("curl/8.5.0")),
        client(5, None),
    );
    for _ in 0..20 {
        assert_eq!(post(&bot, &app, "/ads/click", json!({"adId": AD})).await.0, 202);
    }
    for http in [&scanner, &curl] {
        for _ in 0..5 {
            assert_eq!(post(http, &app, "/ads/click", json!({"adId": AD})).await.0, 202);
        }
    }
    for _ in 0..4 {
        assert_eq!(post(&anonymous, &app, "/ads/click", json!({"adId": AD})).await.0, 202);
        assert_eq!(post(&anonymous, &app, "/ads/impression", json!({"adId": AD})).await.0, 204);
    }
    let pixel = bot.get(format!("{}/t/impression?ad={AD}", app.base)).send().await.unwrap();
    assert_eq!(pixel.status(), 200);
    let total = 10 + 1 + 20 + 10 + 8 + 1;
    assert_eq!(app.wait_flushed(total).await, total);

    let stored =
        app.query("SELECT traffic, count() FROM events GROUP BY traffic ORDER BY traffic FORMAT TSV").await;
    assert_eq!(stored, "valid\t11\nbot\t31\nempty_user_agent\t8\n");

    let got = analytics(&app).await;
    assert_eq!((got["impressions"].as_u64(), got["totalClicks"].as_u64()), (Some(10), Some(1)));
    assert_eq!(got["uniqueClicks"], 1, "bot addresses are not unique clickers");
    assert!((got["ctr"].as_f64().unwrap() - 0.1).abs() < 1e-12, "net CTR unmoved: {}", got["ctr"]);
    let t = &got["traffic"];
    assert_eq!(t["net"], json!({"impressions": 10, "clicks": 1, "events": 11, "ctr": 0.1}));
    assert_eq!(t["filtered"]["bot"], json!({"impressions": 1, "clicks": 30, "events": 31, "ctr": 30.0}));
    assert_eq!(
        t["filtered"]["emptyUserAgent"],
        json!({"impressions": 4, "clicks": 4, "events": 8, "ctr": 1.0})
    );
    assert_eq!(t["filtered"]["duplicate"]["events"], 0);
    assert_eq!(t["gross"], json!({"impressions": 15, "clicks": 35, "events": 50, "ctr": 35.0 / 15.0}));
    assert_eq!(app.metric(r#"adbeacon_events_filtered_total{reason="bot"}"#).await, 31);
    assert_eq!(app.metric(r#"adbeacon_events_filtered_total{reason="empty_user_agent"}"#).await, 8);
}

#[tokio::test]
async fn repeats_within_the_dedup_window_count_once() {
    let app = TestApp::spawn_with(&[("DEDUP_WINDOW", "10s")]).await;
    let first = post(&app.http, &app, "/ads/click", json!({"adId": AD})).await;
    assert_eq!(first, (202, r#"{"message":"Click event queued"}"#.to_string()));
    for _ in 0..2 {
        let again = post(&app.http, &app, "/ads/click", json!({"adId": AD})).await;
        assert_eq!(again, (202, r#"{"message":"Click event queued","duplicate":true}"#.to_string()));
    }
    // Judged by event time: a click that happened a minute ago is another click.
    let earlier = rfc(OffsetDateTime::now_utc() - time::Duration::minutes(1));
    let late = post(&app.http, &app, "/ads/click", json!({"adId": AD, "timestamp": earlier})).await;
    assert_eq!(late.1, r#"{"message":"Click event queued"}"#);
    // Another client is another key; impressions are not covered by default.
    let other = client(2, Some(crate::support::BROWSER_AGENT));
    assert!(!post(&other, &app, "/ads/click", json!({"adId": AD})).await.1.contains("duplicate"));
    for _ in 0..2 {
        assert_eq!(app.post("/ads/impression", &json!({"adId": AD})).await.status(), 204);
    }
    // In a batch, the rule applies item by item.
    let batch = json!([
        {"adId": AD, "kind": "click", "timestamp": earlier},
        {"adId": AD, "kind": "impression"},
    ]);
    let (status, text) = post(&app.http, &app, "/ads/events", batch).await;
    assert_eq!(status, 202, "{text}");
    let result: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((result["accepted"].as_u64(), result["duplicates"].as_u64()), (Some(1), Some(1)), "{result}");
    assert_eq!(result["results"][0]["status"], "duplicate");

    assert_eq!(app.wait_flushed(9).await, 9, "repeats are stored, flagged");
    let got = analytics(&app).await;
    assert_eq!(got["totalClicks"], 3);
    assert_eq!(got["uniqueClicks"], 2);
    assert_eq!(got["impressions"], 3);
    assert_eq!(got["traffic"]["filtered"]["duplicate"]["clicks"], 3);
    assert_eq!(got["traffic"]["gross"]["clicks"], 6);
    assert_eq!(app.metric(r#"adbeacon_events_filtered_total{reason="duplicate"}"#).await, 3);
}

#[tokio::test]
async fn an_event_id_sent_twice_is_stored_once_and_answered_as_a_duplicate() {
    let app = TestApp::spawn().await;
    let id = "5b1d8f52-0a47-4b8e-9f0e-3c1f6f0c2a11";
    let click = json!({"adId": AD, "eventId": id});
    assert_eq!(
        post(&app.http, &app, "/ads/click", click.clone()).await.1,
        r#"{"message":"Click event queued"}"#
    );
    let again = post(&app.http, &app, "/ads/click", click).await;
    assert_eq!(again, (202, r#"{"message":"Click event queued","duplicate":true}"#.to_string()));

    let impression = json!({"ad_id": AD, "event_id": "0d6f4c1e-9a0b-4c55-8f1e-2b7a9c3d4e5f"});
    assert_eq!(post(&app.http, &app, "/ads/impression", impression.clone()).await.0, 204);
    let (status, body) = post(&app.http, &app, "/ads/impression", impression).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["duplicate"], true);

    assert_eq!(app.wait_flushed(2).await, 2);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.number("SELECT count() FROM events").await, 2, "each id stored once");
    assert_eq!(app.metric("adbeacon_events_repeated_total").await, 2);
}

#[tokio::test]
async fn over_the_rate_limit_a_client_gets_429_with_retry_after() {
    let app = TestApp::spawn_with(&[
        ("RATE_LIMIT", "1"),
        ("RATE_LIMIT_BURST", "3"),
        ("API_KEYS", &format!("ingest:{INGEST},read:{READER}")),
    ])
    .await;
    for _ in 0..3 {
        assert_eq!(app.post("/ads/impression", &json!({"adId": AD})).await.status(), 204);
    }
    let refused = app.post("/ads/impression", &json!({"adId": AD})).await;
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("too many requests"), "{body}");
    // Every tracking endpoint shares the client's budget, pixels included.
    assert_eq!(app.get(&format!("/t/impression?ad={AD}")).await.status(), 429);
    assert_eq!(app.post("/ads/click", &json!({"adId": AD})).await.status(), 429);
    // A click-through still takes the viewer to the ad; the click is not recorded.
    let browser = crate::support::browser().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let through = browser.get(format!("{}/c/{AD}", app.base)).send().await.unwrap();
    assert_eq!(through.status(), 302);
    // Other clients, server-side callers with the ingest scope and the other endpoints are not
    // affected.
    let other = client(2, Some(crate::support::BROWSER_AGENT));
    assert_eq!(post(&other, &app, "/ads/impression", json!({"adId": AD})).await.0, 204);
    for _ in 0..5 {
        let resp = app
            .http
            .post(format!("{}/ads/impression", app.base))
            .bearer_auth(INGEST)
            .json(&json!({"adId": AD}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
    }
    let listing =
        app.http.get(format!("{}/ads/analytics", app.base)).bearer_auth(READER).send().await.unwrap();
    assert_eq!(listing.status(), 200);

    assert_eq!(app.wait_flushed(9).await, 9, "only what was answered 2xx");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.number("SELECT count() FROM events").await, 9);
    assert_eq!(app.metric(r#"adbeacon_events_rejected_total{reason="rate_limited"}"#).await, 4);
    assert_eq!(
        app.metric(r#"http_requests_total{method="POST",path="/ads/impression",status="429"}"#).await,
        1
    );
}

#[tokio::test]
async fn server_side_callers_speak_for_the_device_user_agent() {
    let app =
        TestApp::spawn_with(&[("API_KEYS", &format!("ingest:{INGEST}")), ("DEDUP_WINDOW", "10s")]).await;
    let ssai = client(2, Some("Go-http-client/1.1"));
    let send = |device_ua: Option<&'static str>| {
        let mut req = ssai
            .post(format!("{}/ads/impression", app.base))
            .bearer_auth(INGEST)
            .header("X-Device-IP", "198.51.100.7")
            .json(&json!({"adId": AD}));
        if let Some(ua) = device_ua {
            req = req.header("X-Device-User-Agent", ua);
        }
        req.send()
    };
    assert_eq!(send(None).await.unwrap().status(), 204, "its own user agent is a server's: not judged");
    assert_eq!(send(Some("Roku/DVP-14.0 (14.0.4.5040-46)")).await.unwrap().status(), 204);
    assert_eq!(send(Some(GOOGLEBOT)).await.unwrap().status(), 204);
    assert_eq!(send(Some("")).await.unwrap().status(), 204);
    // Without the key, the same request is judged by its own user agent.
    let anonymous =
        ssai.post(format!("{}/ads/impression", app.base)).json(&json!({"adId": AD})).send().await.unwrap();
    assert_eq!(anonymous.status(), 204);
    // An ad server that says nothing about the viewers: not judged by its own user agent, nor by
    // the repeat rule on its own address (every viewer it serves shares it).
    let batch = ssai
        .post(format!("{}/ads/events", app.base))
        .bearer_auth(INGEST)
        .json(&json!([{"adId": AD, "kind": "click"}, {"adId": AD, "kind": "click"}]))
        .send()
        .await
        .unwrap();
    let result: Value = batch.json().await.unwrap();
    assert_eq!((result["accepted"].as_u64(), result["duplicates"].as_u64()), (Some(2), Some(0)), "{result}");
    assert_eq!(app.wait_flushed(7).await, 7);
    let stored =
        app.query("SELECT traffic, count() FROM events GROUP BY traffic ORDER BY traffic FORMAT TSV").await;
    assert_eq!(stored, "valid\t4\nbot\t2\nempty_user_agent\t1\n");
}

#[tokio::test]
async fn client_timestamps_outside_the_accepted_window_are_refused() {
    let app = TestApp::spawn().await;
    let now = OffsetDateTime::now_utc();
    for (offset, says) in [
        (time::Duration::hours(1), "ahead"),
        (time::Duration::days(365 * 100), "ahead"),
        (-time::Duration::days(400), "before"),
        (-time::Duration::days(365 * 100), "before"),
    ] {
        let (status, body) =
            post(&app.http, &app, "/ads/click", json!({"adId": AD, "timestamp": rfc(now + offset)})).await;
        assert_eq!(status, 400, "{body}");
        let error = serde_json::from_str::<Value>(&body).unwrap()["error"].as_str().unwrap().to_string();
        assert!(error.starts_with("timestamp is ") && error.contains(says), "{error}");
    }
    // Inside the window: a late event (hours old) and one a little ahead of the server's clock.
    for offset in [-time::Duration::hours(30), time::Duration::minutes(4)] {
        let (status, _) =
            post(&app.http, &app, "/ads/click", json!({"adId": AD, "timestamp": rfc(now + offset)})).await;
        assert_eq!(status, 202);
    }
    // In a batch, the item is refused and the others are kept.
    let batch = json!([
        {"adId": AD, "kind": "start", "timestamp": "2126-01-01T00:00:00Z"},
        {"adId": AD, "kind": "start"},
    ]);
    let (status, text) = post(&app.http, &app, "/ads/events", batch).await;
    assert_eq!(status, 202);
    let result: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(result["results"][0]["status"], "rejected");
    assert!(result["results"][0]["error"].as_str().unwrap().contains("MAX_CLOCK_SKEW"), "{result}");
    assert_eq!(app.wait_flushed(3).await, 3);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.number("SELECT count() FROM events").await, 3);
    assert_eq!(app.metric(r#"adbeacon_events_rejected_total{reason="bad_timestamp"}"#).await, 5);
}

#[tokio::test]
async fn a_server_side_batch_names_the_viewer_of_each_item() {
    let keys = format!("ingest:{INGEST},read:{READER}");
    let app = TestApp::spawn_with(&[("API_KEYS", &keys), ("DEDUP_WINDOW", "10s")]).await;
    let items = json!([
        {"adId": AD, "kind": "click", "ipAddress": "198.51.100.1", "userAgent": "Roku/DVP-14.0"},
        {"adId": AD, "kind": "click", "ipAddress": "198.51.100.2", "userAgent": "Roku/DVP-14.0"},
        {"adId": AD, "kind": "click", "ipAddress": "198.51.100.2", "userAgent": "Roku/DVP-14.0"},
        {"adId": AD, "kind": "click", "ipAddress": "198.51.100.3", "userAgent": GOOGLEBOT},
    ]);
    let send = |key: Option<&'static str>| {
        let mut req = app.http.post(format!("{}/ads/events", app.base)).json(&items);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send()
    };
    let result: Value = send(Some(INGEST)).await.unwrap().json().await.unwrap();
    assert_eq!((result["accepted"].as_u64(), result["duplicates"].as_u64()), (Some(3), Some(1)), "{result}");
    assert_eq!(result["results"][2]["status"], "duplicate", "the same viewer again within the window");
    assert_eq!(app.wait_flushed(4).await, 4);
    let got: Value = app
        .http
        .get(format!("{}/ads/analytics?adId={AD}&timeframe=1h", app.base))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((got["totalClicks"].as_u64(), got["uniqueClicks"].as_u64()), (Some(2), Some(2)), "{got}");
    assert_eq!(got["traffic"]["filtered"]["bot"]["clicks"], 1);

    // Without the key the viewer fields are ignored: one client (this test), judged as itself.
    let result: Value = send(None).await.unwrap().json().await.unwrap();
    assert_eq!(result["accepted"], 1, "one click counts, three repeat it: {result}");
    assert_eq!(app.wait_flushed(8).await, 8);
    let stored = app
        .query("SELECT uniqExact(ip_hash) FROM events WHERE received_at >= now() - 60 AND traffic != 'bot'")
        .await;
    assert_eq!(stored.trim(), "3", "two viewers and this test's own address");
}
