//! VAST tracking pixels and the click-through redirect, as players and browsers fire them: GET
//! requests with (sometimes unexpanded) macros, never retried, answered with a GIF or a 302.

use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339, macros::offset};

use adbeacon::store::EventRow;

use crate::support::{ClickHouse, TestApp, fresh_db};

const AD: &str = "11111111-1111-1111-1111-111111111111";
const VAST_EVENTS: [(&str, &str); 14] = [
    ("impression", "impression"),
    ("creativeView", "creative_view"),
    ("start", "start"),
    ("firstQuartile", "first_quartile"),
    ("midpoint", "midpoint"),
    ("thirdQuartile", "third_quartile"),
    ("complete", "complete"),
    ("skip", "skip"),
    ("pause", "pause"),
    ("resume", "resume"),
    ("mute", "mute"),
    ("unmute", "unmute"),
    ("close", "close"),
    ("error", "error"),
];

/// A client that, like a browser following a VAST URL, does not follow redirects by itself.
fn no_redirects() -> reqwest::Client {
    crate::support::browser().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

#[tokio::test]
async fn every_vast_event_is_a_no_store_gif_and_one_row() {
    let app = TestApp::spawn().await;
    for (name, _) in VAST_EVENTS {
        let resp = app.get(&format!("/t/{name}?ad={AD}&cb=8231&code=405")).await;
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(resp.headers()["content-type"], "image/gif");
        assert_eq!(resp.headers()["cache-control"], "no-store");
        let body = resp.bytes().await.unwrap();
        assert!(body.starts_with(b"GIF89a") && body.len() == 43, "{name}");
    }
    let n = VAST_EVENTS.len() as u64;
    assert_eq!(app.wait_flushed(n).await, n);
    let kinds = app.query("SELECT toString(kind) FROM events ORDER BY kind FORMAT TSV").await;
    let want: Vec<&str> = VAST_EVENTS.iter().map(|(_, k)| *k).collect();
    assert_eq!(kinds.lines().collect::<Vec<_>>(), want);
    // The error code is kept for errors only.
    assert_eq!(app.number("SELECT sum(error_code) FROM events").await, 405);
    // And analytics sees them.
    let a: Value = app.get(&format!("/ads/analytics?adId={AD}&timeframe=1h")).await.json().await.unwrap();
    assert_eq!((a["impressions"].as_u64(), a["video"]["thirdQuartile"].as_u64()), (Some(1), Some(1)));
    assert_eq!(a["video"]["errors"], 1);
}

#[tokio::test]
async fn macros_and_garbage_never_lose_the_event() {
    let app = TestApp::spawn().await;
    let ok = |path: String| {
        let app = &app;
        async move {
            let resp = app.get(&path).await;
            assert!(resp.status().is_success(), "{path}: {}", resp.status());
        }
    };
    // Unexpanded macros, as a player that does not support them sends them.
    ok(format!("/t/start?ad={AD}&ts=[TIMESTAMP]&pt=[ADPLAYHEAD]&cb=[CACHEBUSTING]")).await;
    ok(format!("/t/error?ad={AD}&code=[ERRORCODE]")).await;
    // Expanded ones: an hour ago, written in New York's offset as a player there would.
    let an_hour_ago = OffsetDateTime::now_utc().unix_timestamp() - 3600;
    let ts = OffsetDateTime::from_unix_timestamp(an_hour_ago)
        .unwrap()
        .to_offset(offset!(-5))
        .format(&Rfc3339)
        .unwrap();
    ok(format!("/t/midpoint?ad={AD}&ts={ts}&pt=00:00:15.250")).await;
    // f=204.
    let resp = app.get(&format!("/t/complete?ad={AD}&f=204")).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    assert_eq!(app.wait_flushed(4).await, 4);

    let rows = app
        .query(
            "SELECT toString(kind), playback_time, error_code, event_time = received_at FROM events \
             ORDER BY kind FORMAT TSV",
        )
        .await;
    assert_eq!(rows, "start\t\\N\t0\t1\nmidpoint\t15.25\t0\t0\ncomplete\t\\N\t0\t1\nerror\t\\N\t900\t1\n");
    let late = app.number("SELECT toUnixTimestamp(event_time) FROM events WHERE kind = 'midpoint'").await;
    assert_eq!(late as i64, an_hour_ago, "an expanded [TIMESTAMP] is the event time, in UTC");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("adbeacon_event_time_replaced_total 1"), "the unexpanded ts is counted");
}

/// A device whose clock is wrong, or a player that writes `[TIMESTAMP]` as VAST 4's own example
/// does, still gets its beacons stored: a beacon is fired once, so a time the JSON endpoints
/// would refuse is replaced by the server's (and counted), and HEAD answers as GET does.
#[tokio::test]
async fn a_beacon_from_a_wrong_clock_is_stored_at_the_servers_time() {
    let app = TestApp::spawn().await;
    let client = crate::support::browser().build().unwrap();
    let url = |q: &str| format!("{}/t/start?ad={AD}&{q}", app.base);
    // 1970, a day ahead (past MAX_CLOCK_SKEW), years back (past MAX_EVENT_AGE).
    let ahead = (OffsetDateTime::now_utc() + time::Duration::days(1)).format(&Rfc3339).unwrap();
    let wrong =
        ["ts=1970-01-01T00:00:12Z".to_string(), format!("ts={ahead}"), "ts=2001-01-01T00:00:00Z".into()];
    for q in &wrong {
        assert_eq!(client.head(url(q)).send().await.unwrap().status(), 200, "HEAD {q}");
        assert_eq!(client.get(url(q)).send().await.unwrap().status(), 200, "GET {q}");
    }
    // VAST 4's form: a one-digit hour (when it has one), milliseconds, the offset in whole hours.
    let at = OffsetDateTime::now_utc().to_offset(offset!(-5)) - time::Duration::hours(2);
    let vast = format!(
        "{}-{:02}-{:02}T{}:{:02}:{:02}.127-05",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    );
    assert_eq!(client.get(url(&format!("ts={vast}"))).send().await.unwrap().status(), 200);
    // An offset's `+` left unencoded arrives as a space: still read.
    let plus = (OffsetDateTime::now_utc() - time::Duration::hours(3)).to_offset(offset!(+2));
    let plus = plus.replace_nanosecond(0).unwrap().format(&Rfc3339).unwrap();
    assert_eq!(client.get(url(&format!("ts={plus}"))).send().await.unwrap().status(), 200);
    assert_eq!(app.wait_flushed(5).await, 5);
    let replaced =
        app.number("SELECT countIf(abs(toInt64(event_time) - toInt64(received_at)) <= 5) FROM events").await;
    assert_eq!(replaced, 3, "the three wrong clocks are stored at the server's time");
    let two_hours = app
        .number(
            "SELECT countIf(toInt64(received_at) - toInt64(event_time) BETWEEN 7190 AND 7210) FROM events",
        )
        .await;
    assert_eq!(two_hours, 1, "VAST 4's [TIMESTAMP] form is the event time");
    let three_hours = app
        .number(
            "SELECT countIf(toInt64(received_at) - toInt64(event_time) BETWEEN 10790 AND 10810) FROM events",
        )
        .await;
    assert_eq!(three_hours, 1, "the offset with its + turned into a space is read");
    assert_eq!(app.metric("adbeacon_event_time_replaced_total").await, 3);
}

/// An `eid` that cannot tell one firing from another (a macro the player left as it is, VAST's
/// -1, an empty one, the nil UUID an SDK sends when it never filled the id in) is no idempotency
/// key: every such beacon is stored.
#[tokio::test]
async fn an_eid_that_is_no_id_is_ignored() {
    let app = TestApp::spawn().await;
    let nil = "00000000-0000-0000-0000-000000000000";
    for eid in ["[TRANSACTIONID]", "%5BTRANSACTIONID%5D", "-1", "", "[TRANSACTIONID]", nil, nil] {
        let path = format!("/t/start?ad={AD}&eid={eid}");
        assert_eq!(app.get(&path).await.status(), 200, "{path}");
    }
    assert_eq!(app.wait_flushed(7).await, 7);
    assert_eq!(app.number("SELECT count() FROM events").await, 7, "no beacon was taken for a repeat");
}

#[tokio::test]
async fn a_repeated_event_id_is_answered_but_stored_once() {
    let app = TestApp::spawn().await;
    for _ in 0..3 {
        assert_eq!(app.get(&format!("/t/impression?ad={AD}&eid=player-7-imp-1")).await.status(), 200);
    }
    let uuid = "5b0c1a52-8a35-4c8b-9a4d-2f0e6b3c9d11";
    for _ in 0..2 {
        assert_eq!(app.get(&format!("/t/start?ad={AD}&eid={uuid}")).await.status(), 200);
    }
    assert_eq!(app.wait_flushed(2).await, 2);
    assert_eq!(app.number("SELECT count() FROM events").await, 2);
    assert_eq!(app.metric("adbeacon_events_repeated_total").await, 3);
}

/// A VAST URL gets its `eid` from `[TRANSACTIONID]` (VAST 4.1), one UUID for the ad request:
/// the same value on the impression, the start, the quartiles and the complete. Each beacon is
/// its own event; only the same beacon fired again is a repeat.
#[tokio::test]
async fn one_transaction_id_on_every_beacon_of_a_play_stores_each_beacon() {
    let app = TestApp::spawn().await;
    let tx = uuid::Uuid::new_v4();
    let beacons =
        ["impression", "creativeView", "start", "firstQuartile", "midpoint", "thirdQuartile", "complete"];
    for event in beacons {
        assert_eq!(app.get(&format!("/t/{event}?ad={AD}&eid={tx}")).await.status(), 200, "{event}");
    }
    // A retry layer fires the start again: a repeat.
    assert_eq!(app.get(&format!("/t/start?ad={AD}&eid={tx}")).await.status(), 200);
    let n = beacons.len() as u64;
    assert_eq!(app.wait_flushed(n).await, n);
    assert_eq!(app.number("SELECT count() FROM events").await, n);
    assert_eq!(app.number("SELECT uniqExact(kind) FROM events").await, n);
    assert_eq!(app.metric("adbeacon_events_repeated_total").await, 1);
}

#[tokio::test]
async fn an_event_id_label_is_per_ad_and_kind() {
    let app = TestApp::spawn().await;
    let other = "22222222-2222-2222-2222-222222222222";
    for path in [
        format!("/t/start?ad={AD}&eid=session-9"),
        format!("/t/start?ad={other}&eid=session-9"),
        format!("/t/complete?ad={AD}&eid=session-9"),
        format!("/t/start?ad={AD}&eid=session-9"),
    ] {
        assert_eq!(app.get(&path).await.status(), 200, "{path}");
    }
    assert_eq!(app.wait_flushed(3).await, 3);
    assert_eq!(app.number("SELECT count() FROM events").await, 3, "only the last is a repeat");
}

#[tokio::test]
async fn head_answers_like_get_and_records_nothing() {
    let app = TestApp::spawn().await;
    let resp = app.http.head(format!("{}/t/start?ad={AD}", app.base)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/gif");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    assert!(resp.bytes().await.unwrap().is_empty());
    let unknown = app.http.head(format!("{}/t/start?ad=99999999-9999-9999-9999-999999999999", app.base));
    assert_eq!(unknown.send().await.unwrap().status(), 404);
    // The click-through too: the redirect, and no click.
    let resp = no_redirects().head(format!("{}/c/{AD}", app.base)).send().await.unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["location"], "https://www.example.com/summer-sale");
    // A GET after them is the only event.
    assert_eq!(app.get(&format!("/t/start?ad={AD}")).await.status(), 200);
    assert_eq!(app.wait_flushed(1).await, 1);
    assert_eq!(app.number("SELECT count() FROM events").await, 1);
}

#[tokio::test]
async fn bad_beacons_say_what_is_wrong() {
    let app = TestApp::spawn().await;
    for (path, status, says) in [
        (format!("/t/firstquartile?ad={AD}"), 404, "unknown tracking event \"firstquartile\""),
        ("/t/start".to_string(), 400, "ad is required"),
        ("/t/start?ad=[AD_ID]".to_string(), 400, "ad must be a UUID"),
        ("/t/start?ad=99999999-9999-9999-9999-999999999999".to_string(), 404, "not found"),
    ] {
        let resp = app.get(&path).await;
        assert_eq!(resp.status(), status, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains(says), "{path}: {body}");
    }
    assert_eq!(app.number("SELECT count() FROM events").await, 0);
}

#[tokio::test]
async fn the_click_through_records_a_click_and_goes_only_to_the_ads_target() {
    let app = TestApp::spawn().await;
    let client = no_redirects();
    // A `url` parameter is not a destination: no open redirect.
    let resp = client.get(format!("{}/c/{AD}?url=https://evil.example/", app.base)).send().await.unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["location"], "https://www.example.com/summer-sale");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    assert_eq!(app.wait_flushed(1).await, 1);
    assert_eq!(app.number("SELECT countIf(kind = 'click') FROM events").await, 1);

    // Unknown, malformed and retired ads get 404/400, and nothing is recorded.
    let retired = "44444444-4444-4444-4444-444444444444";
    app.query(&format!(
        "INSERT INTO ads (id, name, video_url, target_url, active, created_at, updated_at, version) \
         VALUES ('{retired}', 'Old', '/v.mp4', 'https://example.com/old', 0, now(), now(), 1)"
    ))
    .await;
    for (id, status) in [("99999999-9999-9999-9999-999999999999", 404), ("nope", 400), (retired, 404)] {
        let resp = client.get(format!("{}/c/{id}", app.base)).send().await.unwrap();
        assert_eq!(resp.status(), status, "{id}");
        assert!(resp.headers().get("location").is_none());
    }
    assert_eq!(app.number("SELECT count() FROM events").await, 1);
}

#[tokio::test]
async fn with_no_room_a_beacon_gets_503_and_a_click_through_still_redirects() {
    let mut ch = ClickHouse::start();
    let room = 4 * EventRow::SIZE;
    let (room, batch) = (room.to_string(), room.to_string());
    let app = TestApp::spawn_on(
        &ch.url(),
        &fresh_db(),
        &[("BUFFER_MAX_BYTES", &room), ("BATCH_MAX_BYTES", &batch), ("INSERT_TIMEOUT", "1s")],
    )
    .await;
    // Warm the catalog, then take ClickHouse away so the buffer fills and stays full.
    assert_eq!(app.get(&format!("/t/impression?ad={AD}")).await.status(), 200);
    assert_eq!(app.wait_flushed(1).await, 1);
    ch.kill();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(app.get(&format!("/t/start?ad={AD}")).await.status().as_u16());
    }
    assert!(statuses.iter().take_while(|s| **s == 200).count() <= 4, "{statuses:?}");
    assert_eq!(statuses.last(), Some(&503), "a beacon nothing can hold is a 5xx: {statuses:?}");
    // The viewer still reaches the advertiser; the click that could not be held is counted.
    let before = app.metric("adbeacon_events_rejected_total{reason=\"buffer_full\"}").await;
    let resp = no_redirects().get(format!("{}/c/{AD}", app.base)).send().await.unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["location"], "https://www.example.com/summer-sale");
    assert_eq!(app.metric("adbeacon_events_rejected_total{reason=\"buffer_full\"}").await, before + 1);
}

#[tokio::test]
async fn analytics_count_vast_errors_by_code() {
    let app = TestApp::spawn().await;
    // 0 is no VAST code (it would read as "no error"): undefined, as an unexpanded macro.
    for code in ["402", "402", "405", "[ERRORCODE]", "0"] {
        assert_eq!(app.get(&format!("/t/error?ad={AD}&code={code}")).await.status(), 200);
    }
    assert_eq!(app.get(&format!("/t/start?ad={AD}&code=402")).await.status(), 200);
    assert_eq!(app.wait_flushed(6).await, 6);
    let a: Value = app.get(&format!("/ads/analytics?adId={AD}&timeframe=1h")).await.json().await.unwrap();
    assert_eq!(
        a["errorCodes"],
        serde_json::json!([{"code": 402, "count": 2}, {"code": 900, "count": 2}, {"code": 405, "count": 1}])
    );
    assert_eq!(a["video"]["errors"], 5);
    // Outside the window, nothing.
    let old: Value = app
        .get(&format!("/ads/analytics?adId={AD}&from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(old["errorCodes"], serde_json::json!([]));
}

/// `GET /t/{event}` is served by the front endpoint without poem-openapi's router when the event
/// is plain letters (every real beacon), and by the router otherwise. An escaped event name
/// (`st%61rt` is `start`) takes the router: both ways must give the same answers and rows.
#[tokio::test]
async fn a_beacon_answers_alike_with_and_without_the_router() {
    let app = TestApp::spawn().await;
    let queries = [
        format!("ad={AD}&pt=00:00:07.500&cb=1"),
        format!("ad={AD}&f=204"),
        format!("ad={AD}&ts=%5BTIMESTAMP%5D&pt=bad"),
        format!("ad={AD}&ts=2001-01-01T00:00:00Z"),
        "ad=nope".to_string(),
        "ad=99999999-9999-9999-9999-999999999999".to_string(),
        String::new(),
    ];
    let answer = |resp: reqwest::Response| async move {
        let status = resp.status();
        let mut headers: Vec<(String, String)> = resp
            .headers()
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "date" | "x-request-id"))
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
            .collect();
        headers.sort();
        (status, headers, resp.bytes().await.unwrap())
    };
    for q in &queries {
        let fast = answer(app.get(&format!("/t/start?{q}")).await).await;
        let routed = answer(app.get(&format!("/t/st%61rt?{q}")).await).await;
        assert_eq!(fast, routed, "?{q}");
    }
    // Four queries store an event each way (the GIF, the 204, the unreadable macros, the
    // timestamp out of the window).
    assert_eq!(app.wait_flushed(8).await, 8);
    assert_eq!(app.number("SELECT count() FROM events WHERE kind = 'start'").await, 8);
    // Both ways count under the operation's route.
    let ok = r#"http_requests_total{method="GET",path="/t/{event}",status="200"}"#;
    assert_eq!(app.metric(ok).await, 6);
    let bad = r#"http_requests_total{method="GET",path="/t/{event}",status="400"}"#;
    assert_eq!(app.metric(bad).await, 4);
}

/// An error on a pixel or a click-through is never cacheable: a 404 for an ad created (or
/// brought back) later, kept by a browser or a CDN, would answer the player's next firing
/// without it reaching the service. And a client's made-up HTTP method does not become a metric
/// label of its own (each would be a new series for the life of the process).
#[tokio::test]
async fn errors_are_not_cached_and_odd_methods_make_no_series() {
    let app = TestApp::spawn().await;
    let unknown = uuid::Uuid::new_v4();
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for path in [format!("/t/start?ad={unknown}"), format!("/c/{unknown}"), "/t/nonsense?ad=x".to_string()] {
        let resp = client.get(format!("{}{path}", app.base)).send().await.unwrap();
        assert!(resp.status().is_client_error(), "{path}: {}", resp.status());
        assert_eq!(
            resp.headers().get("cache-control").map(|v| v.to_str().unwrap()),
            Some("no-store"),
            "{path}"
        );
    }
    for i in 0..3 {
        let method = reqwest::Method::from_bytes(format!("BREW{i}").as_bytes()).unwrap();
        let resp = client.request(method, format!("{}/ads/click", app.base)).send().await.unwrap();
        assert!(resp.status().is_client_error(), "{}", resp.status());
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(!metrics.contains("BREW"), "a client's method became a label");
    assert!(metrics.contains("method=\"other\""), "odd methods count as other");
}
