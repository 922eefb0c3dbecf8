//! The pipeline under stress: shutdown flushes, a full buffer answers 503 and recovers, and the
//! books balance (every 2xx is one row).

use std::time::{Duration, Instant};

use adbeacon::store::EventRow;
use serde_json::json;

use crate::support::{ClickHouse, TestApp, fresh_db, servers::Redis};

const AD1: &str = "11111111-1111-1111-1111-111111111111";
const AD2: &str = "22222222-2222-2222-2222-222222222222";

#[tokio::test]
async fn shutdown_flushes_everything_buffered() {
    // A flush interval far beyond the test: only the shutdown can move these rows.
    let mut app = TestApp::spawn_with(&[("FLUSH_INTERVAL", "1h")]).await;
    for i in 0..50 {
        let path = if i % 2 == 0 { "/ads/click" } else { "/ads/impression" };
        assert!(app.post(path, &json!({"adId": AD1})).await.status().is_success());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.number("SELECT count() FROM events").await, 0, "still buffered");
    app.stop().await.expect("clean shutdown");
    assert_eq!(app.number("SELECT count() FROM events").await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_answers_503_and_recovers_without_losing_a_2xx() {
    let mut ch = ClickHouse::start();
    let room = 40 * EventRow::SIZE;
    let mut app = TestApp::spawn_on(
        &ch.url(),
        &fresh_db(),
        // No Redis to spill into (with it the buffer never fills: tests/it/outage.rs).
        &[
            ("REDIS_URL", "none"),
            ("BUFFER_MAX_BYTES", &room.to_string()),
            ("BATCH_MAX_BYTES", &room.to_string()),
            ("FLUSH_INTERVAL", "50ms"),
            ("INSERT_TIMEOUT", "2s"),
        ],
    )
    .await;
    let click = json!({"adId": AD1});
    // Warm the catalog cache and prove the path works. The kill below may land while this
    // INSERT is still being answered; the flusher's check before a retry keeps it single.
    assert_eq!(app.post("/ads/click", &click).await.status(), 202);
    assert_eq!(app.wait_for("SELECT count() FROM events", 1).await, 1);
    let mut accepted = 1u64;

    ch.kill();
    // ClickHouse down, buffer not full: still ready (degraded), events are taken.
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(
        (body["status"].as_str(), body["clickhouse"].as_str()),
        (Some("degraded"), Some("unavailable"))
    );
    let mut saw_503 = false;
    for _ in 0..1000 {
        let resp = app.post("/ads/click", &click).await;
        match resp.status().as_u16() {
            202 => accepted += 1,
            503 => {
                let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                assert!(retry >= 1);
                let err = resp.json::<serde_json::Value>().await.unwrap();
                assert!(err["error"].as_str().unwrap().contains("buffer is full"), "{err}");
                saw_503 = true;
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(saw_503, "the buffer never filled");
    assert!(accepted <= 41, "more accepted than the buffer holds: {accepted}");
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 503);

    ch.restart();
    // The flusher retries with backoff (at most 5 s apart); the buffer drains and 2xx return.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = app.post("/ads/click", &click).await.status().as_u16();
        if status == 202 {
            accepted += 1;
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Readiness follows within moments: the first ping may meet a pooled connection to the
    // killed server.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = app.get("/readyz").await;
        if resp.status() == 200 {
            break;
        }
        let body = resp.text().await.unwrap();
        eprintln!("readyz after recovery: {body}");
        assert!(Instant::now() < deadline, "not ready after recovery: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Accounting: every 2xx is in ClickHouse exactly once.
    assert_eq!(app.wait_for("SELECT count() FROM events", accepted).await, accepted, "lost events");
    assert_eq!(app.number("SELECT uniqExact(event_id) FROM events").await, accepted, "duplicates");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_clickhouse_down_saves_the_buffer_as_loadable_dead_letters() {
    let mut ch = ClickHouse::start();
    let db = fresh_db();
    // Without the log (with it, the events stay in the log: tests/it/wal.rs) and without Redis
    // (with it, they are spilled: tests/it/outage.rs), files are the last resort.
    let mut app = TestApp::spawn_on(
        &ch.url(),
        &db,
        &[
            ("REDIS_URL", "none"),
            ("ACK_MODE", "buffered"),
            ("FLUSH_INTERVAL", "1h"),
            ("SHUTDOWN_TIMEOUT", "1s"),
            ("INSERT_TIMEOUT", "1s"),
        ],
    )
    .await;
    for _ in 0..25 {
        assert_eq!(app.post("/ads/click", &json!({"adId": AD1})).await.status(), 202);
    }
    ch.kill();
    let dir = app.data_dir.path().join("dead-letter");
    app.stop().await.expect("shutdown completes even with ClickHouse down");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert_eq!(text.lines().count(), 25);

    // The operator's recovery, as the README shows it, with part of the batch already stored (as
    // when its INSERT was under way when shutdown's time ran out): the staging table skips what
    // ClickHouse holds.
    ch.restart();
    let http = reqwest::Client::new();
    // A statement with data goes in the URL, one without as the body (18.16 wants a body).
    let run = |sql: &str, data: String| {
        let url = format!("{}/?database={db}", ch.url());
        let request = match data.is_empty() {
            true => http.post(url).body(sql.to_owned()),
            false => http.post(url).query(&[("query", sql)]).body(data),
        };
        async move {
            let resp = request.send().await.unwrap();
            assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
        }
    };
    let landed: String = text.lines().take(10).map(|l| format!("{l}\n")).collect();
    run("INSERT INTO events FORMAT JSONEachRow", landed).await;
    run("CREATE TABLE dead_letter_load AS events ENGINE = Memory", String::new()).await;
    run("INSERT INTO dead_letter_load FORMAT JSONEachRow", text).await;
    run(
        "INSERT INTO events SELECT * FROM dead_letter_load WHERE event_id NOT IN \
         (SELECT event_id FROM events WHERE batch_id IN (SELECT batch_id FROM dead_letter_load))",
        String::new(),
    )
    .await;
    run("DROP TABLE dead_letter_load", String::new()).await;
    assert_eq!(ch.query_in(&db, "SELECT count(), uniqExact(event_id) FROM events").await.trim(), "25\t25");
    assert_eq!(ch.query_in(&db, "SELECT countIfMerge(clicks) FROM ad_stats_hourly").await.trim(), "25");
}

/// An INSERT under way when shutdown begins gets only the shutdown budget, not INSERT_TIMEOUT
/// on top of it: else a ClickHouse that hangs keeps the process past the orchestrator's kill
/// (the deploy files size the grace period by SHUTDOWN_TIMEOUT). Here INSERT_TIMEOUT is an hour
/// and ClickHouse is frozen with the INSERT sent: shutdown still ends, with the batch saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_hanging_at_shutdown_gets_only_the_shutdown_budget() {
    let ch = ClickHouse::start();
    let db = fresh_db();
    let mut app = TestApp::spawn_on(
        &ch.url(),
        &db,
        &[
            ("REDIS_URL", "none"),
            ("ACK_MODE", "buffered"),
            ("FLUSH_INTERVAL", "100ms"),
            ("SHUTDOWN_TIMEOUT", "1s"),
            ("INSERT_TIMEOUT", "1h"),
            ("REPLAY_CLAIM_IDLE", "2h"),
        ],
    )
    .await;
    ch.freeze();
    for _ in 0..10 {
        assert_eq!(app.post("/ads/click", &json!({"adId": AD1})).await.status(), 202);
    }
    // The flusher sends the batch within FLUSH_INTERVAL; ClickHouse never answers.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dir = app.data_dir.path().join("dead-letter");
    // Not a timing assertion: a bound far above the budget and far below INSERT_TIMEOUT.
    let stopped = tokio::time::timeout(Duration::from_secs(60), app.stop()).await;
    ch.thaw();
    stopped.expect("shutdown waited for the hanging INSERT").expect("shutdown completes");
    let rows: usize = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
        .sum();
    assert_eq!(rows, 10, "the batch is saved as dead letters");
}

/// Shutdown with ClickHouse gone, Redis not answering at all (a network that drops packets) and
/// the dead-letter directory unusable, in `buffered` mode: nothing can keep the acknowledged
/// events. Shutdown ends at its budget (it asked a silent Redis about every batch, 2 s each, and
/// retried the rest for ever), and says that events were lost instead of exiting cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_that_can_keep_events_nowhere_ends_and_says_so() {
    let mut ch = ClickHouse::start();
    let redis = Redis::start();
    let db = fresh_db();
    let mut app = TestApp::spawn_on(
        &ch.url(),
        &db,
        &[
            ("REDIS_URL", &redis.url()),
            ("ACK_MODE", "buffered"),
            ("BATCH_MAX_ROWS", "5"),
            ("FLUSH_INTERVAL", "100ms"),
            ("SPILL_AFTER", "1"),
            ("SHUTDOWN_TIMEOUT", "2s"),
            ("INSERT_TIMEOUT", "1s"),
        ],
    )
    .await;
    // The ad is cached while ClickHouse is up, so that clicks are taken once it is gone.
    assert_eq!(app.post("/ads/click", &json!({"adId": AD1})).await.status(), 202);
    assert_eq!(app.wait_flushed(1).await, 1);
    std::fs::write(app.data_dir.path().join("dead-letter"), "not a directory").unwrap();
    ch.kill();
    redis.freeze();
    for _ in 0..60 {
        assert_eq!(app.post("/ads/click", &json!({"adId": AD1})).await.status(), 202);
    }
    // Not a timing assertion: a bound far above the budget, and far below what asking a silent
    // Redis about each of the 12 batches, then retrying without end, took before.
    let stopped = tokio::time::timeout(Duration::from_secs(40), app.stop()).await;
    redis.thaw();
    let error =
        stopped.expect("shutdown ends at its budget").expect_err("events were lost: not a clean exit");
    assert!(
        error
            .to_string()
            .contains("acknowledged events could be kept nowhere before SHUTDOWN_TIMEOUT ran out"),
        "{error}"
    );
}

/// An INSERT whose answer never arrives (the client gives up after 1 ms while ClickHouse goes on
/// storing the batch, or is still storing it when the retry comes) is ended and looked up by its
/// token before any retry: every 2xx is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_stored_despite_a_timeout_is_not_sent_twice() {
    // No spill: this is the flusher's own check (the replay's is in tests/it/outage.rs).
    let app =
        TestApp::spawn_with(&[("INSERT_TIMEOUT", "1ms"), ("FLUSH_INTERVAL", "200ms"), ("REDIS_URL", "none")])
            .await;
    let mut senders = tokio::task::JoinSet::new();
    for client in 0..8 {
        let (http, base) = (app.http.clone(), app.base.clone());
        senders.spawn(async move {
            for i in 0..250 {
                let body = json!({"adId": AD1, "videoPlaybackTime": (client * 250 + i) % 600});
                let resp = http.post(format!("{base}/ads/click")).json(&body).send().await.unwrap();
                assert_eq!(resp.status(), 202);
            }
        });
    }
    senders.join_all().await;
    let accepted = 2000;
    assert_eq!(app.wait_flushed(accepted).await, accepted);
    assert_eq!(app.number("SELECT count() FROM events").await, accepted, "lost or duplicated");
    assert_eq!(app.number("SELECT uniqExact(event_id) FROM events").await, accepted, "duplicates");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let found: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("adbeacon_insert_found_stored_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(found > 0, "no INSERT was stored behind a timeout; the test did not exercise the check");
    // Behind a lost answer the INSERT completed, its views too: nothing to report.
    assert_eq!(app.metric("adbeacon_insert_views_short_total").await, 0);
}

/// A materialized view that fails after `events` took the rows (created last here, so every
/// view of the migrations ran; one that fails earlier leaves them short): ClickHouse answers the
/// INSERT with an error. The retry finds the rows stored and does not send them again (`events`
/// would count them twice), and says that the aggregates may lack them:
/// `adbeacon_insert_views_short_total` and an ERROR line. A lost answer is no such case (the
/// timeout test checks that it leaves the counter at 0).
#[tokio::test]
async fn rows_that_an_insert_stored_before_a_view_failed_are_reported() {
    let app = TestApp::spawn_with(&[("FLUSH_INTERVAL", "100ms"), ("REDIS_URL", "none")]).await;
    app.query(&format!(
        "CREATE MATERIALIZED VIEW zz_fails ENGINE = Null AS SELECT throwIf(ad_id = toUUID('{AD2}')) AS failed FROM events"
    ))
    .await;
    for _ in 0..5 {
        assert_eq!(app.post("/ads/click", &json!({"adId": AD2})).await.status(), 202);
    }
    assert_eq!(app.wait_flushed(5).await, 5);
    assert_eq!(app.metric("adbeacon_insert_views_short_total").await, 5);
    assert!(app.metric("adbeacon_insert_found_stored_total").await >= 1);
    app.query("DROP TABLE zz_fails").await;
    assert_eq!(app.post("/ads/click", &json!({"adId": AD1})).await.status(), 202);
    assert_eq!(app.wait_flushed(6).await, 6);
    assert_eq!(app.number("SELECT count() FROM events").await, 6, "lost or duplicated");
    assert_eq!(app.number("SELECT uniqExact(event_id) FROM events").await, 6, "duplicates");
    assert_eq!(app.metric("adbeacon_insert_views_short_total").await, 5, "a later batch counted");
}

/// One click stored, then `events.error_code` widened from UInt16 to UInt64 under the running
/// service: what adbeacon writes no longer fits the table.
async fn widen_error_code(app: &TestApp) {
    assert_eq!(app.post("/ads/click", &json!({"adId": AD1})).await.status(), 202);
    assert_eq!(app.wait_flushed(1).await, 1);
    app.query("ALTER TABLE events MODIFY COLUMN error_code UInt64").await;
}

/// A column whose width changed under the running service (`error_code` UInt16 to UInt64): RowBinary
/// carries no types, and without a look at the table first some INSERTs of a batch parsed as rows
/// of shifted bytes (measured: hundreds of rows for a batch of 1,000, its event ids among them).
/// Now nothing is sent: the batch goes to the dead letters whole, naming the column, and once the
/// column is back, its replay stores each event once.
#[tokio::test]
async fn a_column_whose_width_changed_gets_no_row_of_shifted_bytes() {
    let app = TestApp::spawn().await;
    widen_error_code(&app).await;
    let ids: Vec<String> = (0..1000).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let batch: Vec<_> = ids.iter().map(|id| json!({"adId": AD1, "kind": "start", "eventId": id})).collect();
    assert_eq!(app.post("/ads/events", &json!(batch)).await.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.metric("adbeacon_events_dead_lettered_total").await < 1000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.metric("adbeacon_events_dead_lettered_total").await, 1000);
    assert_eq!(app.number("SELECT count() FROM events").await, 1, "a row of shifted bytes was stored");

    app.query("ALTER TABLE events MODIFY COLUMN error_code UInt16").await;
    let (status, done) = app.send(reqwest::Method::POST, "/admin/dead-letters/replay", None, None).await;
    assert_eq!((status, done["events"].as_u64()), (200, Some(1000)), "{done}");
    assert_eq!(app.wait_for("SELECT count() FROM events", 1001).await, 1001);
    let quoted: Vec<String> = ids.iter().map(|id| format!("'{id}'")).collect();
    let distinct =
        format!("SELECT uniqExact(event_id) FROM events WHERE toString(event_id) IN ({})", quoted.join(","));
    assert_eq!(app.number(&distinct).await, 1000);
}

/// Rows ClickHouse refuses as data (here: the table's `error_code` column changed under the running
/// service) are not retried forever: they become one dead letter in Redis with the reason,
/// counted, and the service goes on accepting events.
#[tokio::test]
async fn rows_clickhouse_rejects_become_a_dead_letter() {
    let app = TestApp::spawn().await;
    widen_error_code(&app).await;
    let batch = json!([{"adId": AD1, "kind": "click"}, {"adId": AD1, "kind": "click"}, {"adId": AD1, "kind": "click"}]);
    assert_eq!(app.post("/ads/events", &batch).await.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.metric("adbeacon_events_dead_lettered_total").await < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.metric("adbeacon_events_dead_lettered_total").await, 3);
    assert!(app.metric(r#"adbeacon_insert_failures_total{class="rejected"}"#).await >= 1);
    let redis = crate::support::shared_redis();
    let key = format!("{}dead-letters", app.redis_prefix);
    assert_eq!(redis.command(&["XLEN", &key]), "1", "one dead letter for the batch");
    let entry = redis.command(&["XRANGE", &key, "-", "+"]);
    assert!(entry.contains("error_code is UInt64") && entry.contains("rejected"), "{entry}");
    assert_eq!(app.number("SELECT count() FROM events").await, 1);
    assert!(!app.data_dir.path().join("dead-letter").exists(), "Redis took it: no file");
    assert_eq!(app.get("/readyz").await.status(), 200);
}

/// Without Redis, rejected rows become a dead-letter file that loads as it is.
#[tokio::test]
async fn without_redis_rejected_rows_become_a_dead_letter_file() {
    let app = TestApp::spawn_with(&[("REDIS_URL", "none")]).await;
    widen_error_code(&app).await;
    let batch = json!([{"adId": AD1, "kind": "click"}, {"adId": AD1, "kind": "click"}]);
    assert_eq!(app.post("/ads/events", &batch).await.status(), 202);
    let dir = app.data_dir.path().join("dead-letter");
    let deadline = Instant::now() + Duration::from_secs(10);
    let files = loop {
        let files: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| {
                d.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "jsonl")).collect()
            })
            .unwrap_or_default();
        if !files.is_empty() || Instant::now() > deadline {
            break files;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(files.len(), 1, "no dead letter written");
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap().lines().count(), 2);
    let reason = std::fs::read_to_string(files[0].with_extension("reason")).unwrap();
    assert!(reason.contains("error_code is UInt64"), "{reason}");
    assert_eq!(app.metric("adbeacon_events_dead_lettered_total").await, 2);
    // Counted at each scrape, for the alert on files left unloaded.
    assert_eq!(app.metric("adbeacon_dead_letter_files").await, 1);
    assert_eq!(app.number("SELECT count() FROM events").await, 1);
    assert_eq!(app.get("/readyz").await.status(), 200);
}
