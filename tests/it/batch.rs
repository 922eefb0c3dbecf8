//! `POST /ads/events`: a result per item, good items held together, bad ones named, repeats of an
//! eventId stored once, and the limits.

use adbeacon::{api::event_ids::ID_BYTES, store::EventRow};
use serde_json::{Value, json};

use crate::support::{ClickHouse, TestApp, fresh_db};

const AD: &str = "11111111-1111-1111-1111-111111111111";
const AD2: &str = "22222222-2222-2222-2222-222222222222";

#[tokio::test]
async fn each_item_gets_its_result_and_only_good_ones_are_stored() {
    let app = TestApp::spawn().await;
    let batch = json!([
        {"adId": AD, "kind": "impression", "eventId": "imp-1"},
        {"adId": AD, "kind": "firstQuartile", "playbackTime": 7.5, "timestamp": "2026-11-22T00:00:00Z"},
        {"ad_id": AD2, "kind": "error", "error_code": 402},
        {"adId": "nope", "kind": "start"},
        {"adId": "99999999-9999-9999-9999-999999999999", "kind": "start"},
        {"adId": AD, "kind": "view"},
        {"adId": AD, "kind": "impression", "eventId": "imp-1"},
        {"adId": AD, "kind": "click", "playbackTime": -1},
        "not an object",
        {"adId": AD, "kind": "start", "eventId": "00000000-0000-0000-0000-000000000000"},
        // 150 characters, 300 bytes: the limit is 200 characters.
        {"adId": AD, "kind": "start", "eventId": "é".repeat(150)}
    ]);
    let resp = app.post("/ads/events", &batch).await;
    assert_eq!(resp.status(), 202);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64(), body["rejected"].as_u64()),
        (Some(4), Some(1), Some(6))
    );
    let statuses: Vec<&str> =
        body["results"].as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        [
            "accepted",
            "accepted",
            "accepted",
            "rejected",
            "rejected",
            "rejected",
            "duplicate",
            "rejected",
            "rejected",
            "rejected",
            "accepted"
        ]
    );
    let error = |i: usize| body["results"][i]["error"].as_str().unwrap().to_string();
    assert!(error(3).contains("adId must be a UUID"), "{}", error(3));
    assert!(error(4).contains("not found"), "{}", error(4));
    assert!(error(5).contains("kind \"view\""), "{}", error(5));
    assert!(error(7).contains("playbackTime must be 0 or more"), "{}", error(7));
    assert!(error(8).contains("JSON object"), "{}", error(8));
    assert!(error(9).contains("eventId must not be the nil UUID"), "{}", error(9));
    assert_eq!(
        body["results"][6]["eventId"], body["results"][0]["eventId"],
        "the duplicate names the stored id"
    );

    assert_eq!(app.wait_flushed(4).await, 4);
    let rows = app
        .query("SELECT toString(kind), playback_time, error_code FROM events ORDER BY kind FORMAT TSV")
        .await;
    assert_eq!(rows, "impression\t\\N\t0\nstart\t\\N\t0\nfirst_quartile\t7.5\t0\nerror\t\\N\t402\n");
    let stored_ids = app.query("SELECT toString(event_id) FROM events ORDER BY kind FORMAT TSV").await;
    // In the order of their kinds: impression, start, firstQuartile, error.
    let answered: Vec<&str> = [0, 10, 1, 2].map(|i| body["results"][i]["eventId"].as_str().unwrap()).into();
    assert_eq!(stored_ids.lines().collect::<Vec<_>>(), answered);

    // The same eventId in a later batch is a duplicate too.
    let again: Value = app
        .post("/ads/events", &json!([{"adId": AD, "kind": "impression", "eventId": "imp-1"}]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["results"][0]["status"], "duplicate");
    assert_eq!(app.number("SELECT count() FROM events").await, 4);
}

#[tokio::test]
async fn the_limits_are_413_and_a_batch_that_cannot_be_held_is_503_with_nothing_stored() {
    let room = (4 * EventRow::SIZE).to_string();
    let app = TestApp::spawn_with(&[
        ("MAX_BATCH_BODY_BYTES", "64KiB"),
        ("BUFFER_MAX_BYTES", &room),
        ("BATCH_MAX_BYTES", &room),
    ])
    .await;
    let item = json!({"adId": AD, "kind": "start"});
    let too_many = Value::Array(vec![item.clone(); 1001]);
    let resp = app.post("/ads/events", &too_many).await;
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("at most 1000 events; this one has 1001"), "{body}");
    let padded = json!([{"adId": AD, "kind": "start", "eventId": "x".repeat(200)}]);
    let big = Value::Array(vec![padded[0].clone(); 400]);
    assert_eq!(app.post("/ads/events", &big).await.status(), 413);
    assert_eq!(app.post("/ads/events", &json!({"adId": AD})).await.status(), 400);
    // More than the buffer can take at once: all or nothing, and the event ids are free again,
    // so that the retry of the same items is stored, not answered as duplicates.
    let with_ids: Vec<Value> =
        (0..10).map(|i| json!({"adId": AD, "kind": "start", "eventId": format!("big-{i}")})).collect();
    let resp = app.post("/ads/events", &Value::Array(with_ids.clone())).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let retry: Value =
        app.post("/ads/events", &Value::Array(with_ids[..2].to_vec())).await.json().await.unwrap();
    assert_eq!((retry["accepted"].as_u64(), retry["duplicates"].as_u64()), (Some(2), Some(0)), "{retry}");
    assert_eq!(app.wait_flushed(2).await, 2);
    let fits = app.post("/ads/events", &Value::Array(vec![item; 2])).await;
    assert_eq!(fits.status(), 202);
    assert_eq!(app.wait_flushed(4).await, 4);
    assert_eq!(app.number("SELECT count() FROM events").await, 4);
}

/// With ClickHouse frozen, a buffer filling with events that carry client ids: the ids kept past
/// `EVENT_IDS_MAX` (their events wait) count against `BUFFER_MAX_BYTES` with the events, so the
/// buffer takes fewer events than without ids, exactly as many as the two fit in, and the
/// service's memory stays within the cap (a full 256 MiB buffer of such events took 2.17 times
/// the cap before). Everything accepted is stored once after the thaw; then the ids kept past the
/// bound go (every request got its 2xx), nothing is charged, and a second outage takes as many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ids_kept_for_waiting_events_count_against_the_buffer() {
    let ch = ClickHouse::start();
    let cap_rows = 200;
    let room = (cap_rows * EventRow::SIZE).to_string();
    let app = TestApp::spawn_on(
        &ch.url(),
        &fresh_db(),
        &[
            ("REDIS_URL", "none"),
            ("ACK_MODE", "buffered"),
            ("EVENT_IDS_MAX", "10"),
            ("BUFFER_MAX_BYTES", &room),
            ("BATCH_MAX_BYTES", &room),
            ("FLUSH_INTERVAL", "100ms"),
            ("INSERT_TIMEOUT", "1h"),
            ("REPLAY_CLAIM_IDLE", "2h"),
        ],
    )
    .await;
    // Batches of 10 fresh ids until one is refused: how many were accepted.
    let fill = || async {
        let mut accepted = 0;
        loop {
            let items: Vec<Value> = (0..10)
                .map(|_| json!({"adId": AD, "kind": "start", "eventId": uuid::Uuid::new_v4().to_string()}))
                .collect();
            let resp = app.post("/ads/events", &Value::Array(items)).await;
            if resp.status() != 202 {
                assert_eq!(resp.status(), 503);
                return accepted;
            }
            accepted += 10;
            assert!(accepted <= cap_rows, "more events than the buffer holds without ids");
        }
    };
    ch.freeze();
    let accepted = fill().await;
    // The batch that fit: its events and the ids past the bound before it; the one refused:
    // its events, and the ids past the bound with the last one held.
    let (size, past) = (EventRow::SIZE, |n: usize| n.saturating_sub(10) * ID_BYTES);
    assert!(accepted >= 10, "the first batch was refused");
    assert!(accepted * size + past(accepted - 10) <= cap_rows * size, "{accepted} accepted");
    assert!((accepted + 10) * size + past(accepted) > cap_rows * size, "{accepted} accepted");
    assert!(accepted < cap_rows, "{accepted} accepted: the ids were not counted");
    assert_eq!(app.metric("adbeacon_buffer_ids_bytes").await, past(accepted) as u64);
    assert_eq!(app.metric("adbeacon_event_ids_remembered").await, accepted as u64);
    ch.thaw();
    assert_eq!(app.wait_flushed(accepted as u64).await, accepted as u64);
    assert_eq!(app.metric("adbeacon_buffer_ids_bytes").await, 0, "stored: nothing held, nothing charged");
    // The store's tidy (every 20 ms) gives the kept ids their turns without new ids.
    let mut remembered = 0;
    for _ in 0..100 {
        remembered = app.metric("adbeacon_event_ids_remembered").await;
        if remembered == 10 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(remembered, 10, "the bound's ids; those kept while their events waited are gone");
    ch.freeze();
    let again = fill().await;
    assert_eq!(again, accepted, "the second outage takes as many");
    ch.thaw();
    let total = (accepted + again) as u64;
    assert_eq!(app.wait_flushed(total).await, total);
    assert_eq!(app.number("SELECT count() FROM events").await, total);
    assert_eq!(app.number("SELECT uniqExact(event_id) FROM events").await, total);
}

/// An item whose eventId another request is storing right now (its log write under way) is
/// marked `retry`, not `rejected`: that other request may still fail, and a client that took
/// `rejected` as final would lose the event. Concurrent batches with one eventId: exactly one
/// accepts it (two did when the claim was a look-up and then an insert), the others answer
/// duplicate or retry; sent again, a retried item is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_items_with_one_event_id_store_it_once() {
    let app = TestApp::spawn_with(&[("ACK_MODE", "wal"), ("WAL_FSYNC", "always")]).await;
    const ROUNDS: u64 = 30;
    let mut retried = None;
    for round in 0..ROUNDS {
        let item = json!([{"adId": AD, "kind": "start", "eventId": format!("player-{round}-start")}]);
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (http, url, item) = (app.http.clone(), format!("{}/ads/events", app.base), item.clone());
            requests.spawn(async move {
                http.post(url).json(&item).send().await.unwrap().json::<Value>().await.unwrap()
            });
        }
        let mut statuses = Vec::new();
        for body in requests.join_all().await {
            statuses.push(body["results"][0]["status"].as_str().unwrap().to_string());
            if body["retry"] == 1 {
                assert!(
                    body["results"][0]["error"].as_str().unwrap().contains("send this item again"),
                    "{body}"
                );
                retried.get_or_insert(item.clone());
            }
        }
        assert_eq!(statuses.iter().filter(|s| *s == "accepted").count(), 1, "round {round}: {statuses:?}");
        assert!(
            statuses.iter().all(|s| ["accepted", "duplicate", "retry"].contains(&s.as_str())),
            "{statuses:?}"
        );
    }
    assert_eq!(app.wait_flushed(ROUNDS).await, ROUNDS);
    assert_eq!(app.number("SELECT count() FROM events").await, ROUNDS, "each event id stored once");
    let item = retried.expect("no request ever found an eventId in flight");
    let again: Value = app.post("/ads/events", &item).await.json().await.unwrap();
    assert_eq!(again["results"][0]["status"], "duplicate", "{again}");
}
