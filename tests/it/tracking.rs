//! The seed-compatible tracking endpoints, end to end: HTTP request → ClickHouse row → hourly aggregate.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::json;
use time::{Duration, OffsetDateTime, format_description::well_known::Rfc3339};

use crate::support::TestApp;

const AD1: &str = "11111111-1111-1111-1111-111111111111";
const AD2: &str = "22222222-2222-2222-2222-222222222222";
const AD3: &str = "33333333-3333-3333-3333-333333333333";

#[tokio::test]
async fn impression_accepts_both_spellings_with_204() {
    let app = TestApp::spawn().await;
    for body in [json!({"ad_id": AD1}), json!({"adId": AD2})] {
        let resp = app.post("/ads/impression", &body).await;
        assert_eq!(resp.status(), 204, "{body}");
        assert!(resp.text().await.unwrap().is_empty());
    }
    assert_eq!(app.wait_for("SELECT count() FROM events WHERE kind = 'impression'", 2).await, 2);
    let ads = app.query("SELECT toString(ad_id) FROM events ORDER BY ad_id").await;
    assert_eq!(ads, format!("{AD1}\n{AD2}\n"));
}

#[tokio::test]
async fn click_accepts_the_old_body_and_snake_case_with_202() {
    let app = TestApp::spawn().await;
    let old = json!({"adId": AD1, "timestamp": rfc3339(now() - Duration::minutes(30)),
                     "ipAddress": "192.168.1.1", "videoPlaybackTime": 30});
    let snake = json!({"ad_id": AD2, "ip_address": "10.0.0.1", "video_playback_time": 12.5});
    let other = json!({"ad_id": AD3, "ip": "::1", "playback_time": 0});
    let bare = json!({"adId": AD1});
    for body in [&old, &snake, &other, &bare] {
        let resp = app.post("/ads/click", body).await;
        assert_eq!(resp.status(), 202, "{body}");
        assert_eq!(resp.json::<serde_json::Value>().await.unwrap(), json!({"message": "Click event queued"}));
    }
    assert_eq!(app.wait_for("SELECT count() FROM events WHERE kind = 'click'", 4).await, 4);
    let rows = app
        .query(
            "SELECT toString(ad_id), playback_time, dateDiff('second', event_time, received_at) > 1700 \
                FROM events ORDER BY ad_id, playback_time",
        )
        .await;
    // The old body's timestamp (30 min ago) is kept; absent timestamps mean server time.
    assert_eq!(rows, format!("{AD1}\t30\t1\n{AD1}\t\\N\t0\n{AD2}\t12.5\t0\n{AD3}\t0\t0\n"));
}

#[tokio::test]
async fn sendbeacon_text_plain_and_curl_form_bodies_are_read_as_json() {
    let app = TestApp::spawn().await;
    let body = format!(r#"{{"adId":"{AD1}"}}"#);
    assert_eq!(app.post_raw("/ads/click", "text/plain;charset=UTF-8", &body).await.status(), 202);
    assert_eq!(
        app.post_raw("/ads/impression", "application/x-www-form-urlencoded", &body).await.status(),
        204
    );
    assert_eq!(app.wait_for("SELECT count() FROM events", 2).await, 2);
}

#[tokio::test]
async fn rejections_name_the_problem_and_store_nothing() {
    let app = TestApp::spawn_with(&[("MAX_BODY_BYTES", "1KiB")]).await;
    let unknown = "99999999-9999-9999-9999-999999999999";
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "/ads/click",
            json!({"adId": unknown}).to_string(),
            404,
            "ad 99999999-9999-9999-9999-999999999999 not found",
        ),
        ("/ads/impression", json!({"ad_id": unknown}).to_string(), 404, "not found"),
        ("/ads/click", json!({"adId": "not-a-uuid"}).to_string(), 400, "adId must be a UUID"),
        ("/ads/impression", json!({"ad_id": "1234"}).to_string(), 400, "ad_id must be a UUID"),
        ("/ads/click", r#"{"adId": "#.to_string(), 400, "not valid JSON"),
        ("/ads/impression", "not json".to_string(), 400, "not valid JSON"),
        ("/ads/click", json!({"adId": 42}).to_string(), 400, "adId: invalid type: integer"),
        (
            "/ads/click",
            json!({"adId": AD1, "videoPlaybackTime": "30"}).to_string(),
            400,
            "videoPlaybackTime: invalid type",
        ),
        (
            "/ads/click",
            json!({"adId": AD1, "videoPlaybackTime": -1.5}).to_string(),
            400,
            "videoPlaybackTime must be 0 or more",
        ),
        (
            "/ads/click",
            json!({"adId": AD1, "timestamp": "yesterday"}).to_string(),
            400,
            "timestamp must be an RFC 3339",
        ),
        ("/ads/click", json!({"adId": AD1, "ipAddress": "300.1.1.1"}).to_string(), 400, "ipAddress must be"),
        ("/ads/click", json!({"adId": AD1, "ad_id": AD2}).to_string(), 400, "disagree"),
        (
            "/ads/click",
            json!({"adId": AD1, "eventId": "00000000-0000-0000-0000-000000000000"}).to_string(),
            400,
            "eventId must not be the nil UUID",
        ),
        (
            "/ads/impression",
            json!({"adId": AD1, "event_id": "00000000-0000-0000-0000-000000000000"}).to_string(),
            400,
            "event_id must not be the nil UUID",
        ),
        ("/ads/click", json!({"timestamp": "2024-01-01T00:00:00Z"}).to_string(), 400, "adId is required"),
        ("/ads/impression", "{}".to_string(), 400, "adId is required"),
        ("/ads/impression", "".to_string(), 400, "empty"),
        ("/ads/click", "[1, 2]".to_string(), 400, "must be a JSON object"),
        (
            "/ads/click",
            format!(r#"{{"adId":"{AD1}","adId":"{AD2}"}}"#),
            400,
            "request body gives a field twice: duplicate field `adId`",
        ),
        (
            "/ads/click",
            format!(r#"{{"adId":"{AD1}","pad":"{}"}}"#, "x".repeat(2000)),
            413,
            "larger than the 1024-byte limit",
        ),
    ];
    for (path, body, status, needle) in &cases {
        let resp = app.post_raw(path, "application/json", body).await;
        assert_eq!(resp.status().as_u16(), *status, "{path} {body}");
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
        let err = resp.json::<serde_json::Value>().await.unwrap();
        let text = err["error"].as_str().unwrap_or_else(|| panic!("no error field in {err}"));
        assert!(text.contains(needle), "{path} {body}: {text:?} lacks {needle:?}");
    }
    // One accepted event as a marker: once it is stored, nothing rejected was.
    assert_eq!(app.post("/ads/click", &json!({"adId": AD1})).await.status(), 202);
    assert_eq!(app.wait_for("SELECT count() FROM events", 1).await, 1);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.number("SELECT count() FROM events").await, 1);
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = TestApp::spawn().await;
    let resp = app.get("/no/such/thing").await;
    assert_eq!(resp.status(), 404);
    assert!(resp.json::<serde_json::Value>().await.unwrap()["error"].as_str().unwrap().contains("/docs"));
    let resp = app.get("/ads/click").await;
    assert_eq!(resp.status(), 405);
    // RFC 9110: a 405 says which methods the path takes.
    assert_eq!(resp.headers()["allow"], "POST, OPTIONS");
    assert!(resp.json::<serde_json::Value>().await.unwrap()["error"].is_string());
}

/// N events over three ads, five hours of event_time and four client IPs arrive as exactly N rows,
/// and the hourly aggregate equals both a recount of the raw rows and the test's own model.
#[tokio::test]
async fn n_events_are_n_rows_and_the_hourly_aggregate_matches() {
    let app = TestApp::spawn().await;
    let ips: Vec<IpAddr> = (1..=4).map(|i| format!("127.0.0.{i}").parse().unwrap()).collect();
    let clients: Vec<reqwest::Client> =
        ips.iter().map(|ip| crate::support::browser().local_address(*ip).build().unwrap()).collect();
    let ads = [AD1, AD2, AD3];
    let base = now();
    // (ad, hour start) -> (impressions, clicks, distinct ips)
    let mut model: BTreeMap<(String, i64), (u64, u64, Vec<usize>)> = BTreeMap::new();
    let n = 360;
    for i in 0..n {
        let ad = ads[i % 3];
        let ip = (i / 3) % 4;
        let client = &clients[ip];
        let (path, body, at) = if i % 4 == 0 {
            ("/ads/impression", json!({"adId": ad}), None)
        } else {
            let at = base - Duration::minutes(60 * (i as i64 % 5) + 7);
            (
                "/ads/click",
                json!({"adId": ad, "timestamp": rfc3339(at), "videoPlaybackTime": i % 30}),
                Some(at),
            )
        };
        let resp = client.post(format!("{}{path}", app.base)).json(&body).send().await.unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        // Impressions are stamped with server time; the model takes the hour of `base`, and the
        // test avoids the minute before an hour boundary (below) so the two agree.
        let hour = hour_start(at.unwrap_or(base));
        let entry = model.entry((ad.to_string(), hour)).or_default();
        if at.is_some() {
            entry.1 += 1;
            if !entry.2.contains(&ip) {
                entry.2.push(ip);
            }
        } else {
            entry.0 += 1;
        }
    }
    assert_eq!(app.wait_flushed(n as u64).await, n as u64);
    assert_eq!(app.number("SELECT count() FROM events").await, n as u64);
    assert_eq!(app.number("SELECT uniqExact(event_id) FROM events").await, n as u64);

    let aggregate = app
        .query(
            "SELECT toString(ad_id), toUnixTimestamp(hour), countIfMerge(impressions), countIfMerge(clicks), \
                uniqIfMerge(unique_clicks) FROM ad_stats_hourly GROUP BY ad_id, hour ORDER BY ad_id, hour",
        )
        .await;
    let recount = app
        .query("SELECT toString(ad_id), toUnixTimestamp(toStartOfHour(event_time)) AS h, countIf(kind = 'impression'), \
                countIf(kind = 'click'), uniqExactIf(ip_hash, kind = 'click') FROM events GROUP BY ad_id, h ORDER BY ad_id, h")
        .await;
    assert_eq!(aggregate, recount);
    if minute_of_hour(base) < 59 {
        let expected: String = model
            .iter()
            .map(|((ad, h), (imp, clk, ips))| format!("{ad}\t{h}\t{imp}\t{clk}\t{}\n", ips.len()))
            .collect();
        assert_eq!(aggregate, expected);
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

fn hour_start(t: OffsetDateTime) -> i64 {
    t.unix_timestamp() - t.unix_timestamp().rem_euclid(3600)
}

fn minute_of_hour(t: OffsetDateTime) -> u8 {
    t.minute()
}
