//! The admin endpoints of the dead letters: real rows ClickHouse rejects (its `error_code` column
//! changed under the running service) are listed with their reason and rows, replayed once the
//! schema is fixed and then stored exactly once, or purged; damaged entries are listed and
//! skipped; ids are checked; API keys apply; without Redis the endpoints say why they cannot
//! serve.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{TestApp, servers::Redis, shared_redis};

const AD1: &str = "11111111-1111-1111-1111-111111111111";
const ADMIN: &str = "admin-key-0123456789";
const READER: &str = "read-key-0123456789";

/// The dead-letter stream's key.
fn stream(app: &TestApp) -> String {
    format!("{}dead-letters", app.redis_prefix)
}

/// Makes ClickHouse reject every row from now on, as data (`Code: …`).
async fn break_schema(app: &TestApp) {
    // One event first, so that the service has flushed against the table as it was.
    assert_eq!(app.post("/ads/click", &json!({"adId": AD1})).await.status(), 202);
    assert_eq!(app.wait_flushed(1).await, 1);
    app.query("ALTER TABLE events MODIFY COLUMN error_code UInt64").await;
}

/// Sends a batch of `n` clicks ClickHouse will reject and waits until they are dead letters;
/// returns their event ids.
async fn rejected_batch(app: &TestApp, n: usize) -> Vec<String> {
    let before = app.metric("adbeacon_events_dead_lettered_total").await;
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let batch: Vec<Value> =
        ids.iter().map(|id| json!({"adId": AD1, "kind": "click", "eventId": id})).collect();
    assert_eq!(app.post("/ads/events", &json!(batch)).await.status(), 202);
    let want = before + n as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.metric("adbeacon_events_dead_lettered_total").await < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.metric("adbeacon_events_dead_lettered_total").await, want, "not dead-lettered");
    ids
}

/// A damaged entry, as a spill entry that cannot be read back becomes: fields without rows.
fn damaged_entry(app: &TestApp) -> String {
    shared_redis().command(&["XADD", &stream(app), "*", "reason", "x", "source", "corrupt"])
}

/// The event ids of a listed dead letter's rows, sorted.
fn row_ids(dead: &Value) -> Vec<String> {
    let mut ids: Vec<String> =
        dead["rows"].as_array().unwrap().iter().map(|r| r["eventId"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// `n` valid clicks on AD1 at `at` in batch `token`, from client-IP hash `ip_hash`.
fn clicks(
    n: usize,
    token: uuid::Uuid,
    at: time::OffsetDateTime,
    ip_hash: u64,
) -> Vec<adbeacon::store::EventRow> {
    (0..n)
        .map(|_| adbeacon::store::EventRow {
            event_id: uuid::Uuid::new_v4(),
            ad_id: AD1.parse().unwrap(),
            kind: adbeacon::domain::EventKind::Click,
            event_time: at,
            received_at: at,
            ip_hash,
            playback_time: None,
            error_code: 0,
            batch_id: token,
            traffic: adbeacon::domain::Traffic::Valid,
        })
        .collect()
}

#[tokio::test]
async fn dead_letters_are_listed_then_replayed_and_stored_exactly_once() {
    let app = TestApp::spawn_with(&[("API_KEYS", &format!("admin:{ADMIN},read:{READER}"))]).await;
    break_schema(&app).await;
    let first = rejected_batch(&app, 3).await;
    let second = rejected_batch(&app, 2).await;
    let damaged = damaged_entry(&app);

    // Admin scope only.
    let get = reqwest::Method::GET;
    let (post, delete) = (reqwest::Method::POST, reqwest::Method::DELETE);
    for (method, path) in [
        (&get, "/admin/dead-letters"),
        (&post, "/admin/dead-letters/replay"),
        (&delete, "/admin/dead-letters"),
    ] {
        let (status, body) = app.send(method.clone(), path, None, None).await;
        assert_eq!(status, 401, "{method} {path} without a key: {body}");
        let (status, body) = app.send(method.clone(), path, Some(READER), None).await;
        assert_eq!(status, 403, "{method} {path} with a read key: {body}");
        assert_eq!(body["error"], "this API key lacks the admin scope");
    }

    // Listed oldest first, a page at a time, with their reason and rows.
    let (status, page) = app.send(get.clone(), "/admin/dead-letters?limit=1", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["count"], 3);
    let listed = page["deadLetters"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    let one = &listed[0];
    assert_eq!(page["next"], one["id"]);
    assert!(one["reason"].as_str().unwrap().contains("error_code is UInt64"), "{one}");
    assert_eq!(one["source"], "rejected");
    assert_eq!(one["events"], 3);
    assert!(one["batchId"].is_string(), "{one}");
    assert_eq!(row_ids(one), sorted(first.clone()));
    let row = &one["rows"][0];
    assert_eq!((row["adId"].as_str(), row["kind"].as_str()), (Some(AD1), Some("click")));
    assert_eq!((row["errorCode"].as_u64(), row["traffic"].as_str()), (Some(0), Some("valid")));
    assert!(row["playbackTime"].is_null() && row.get("ipHash").is_none(), "{row}");
    let at = time::OffsetDateTime::parse(
        one["at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("at is RFC 3339");
    assert!((time::OffsetDateTime::now_utc() - at).whole_seconds().abs() < 60, "{at}");

    let path = format!("/admin/dead-letters?after={}", one["id"].as_str().unwrap());
    let (status, rest) = app.send(get.clone(), &path, Some(ADMIN), None).await;
    assert_eq!(status, 200, "{rest}");
    assert_eq!(rest["next"], Value::Null);
    let rest = rest["deadLetters"].as_array().unwrap().clone();
    assert_eq!(rest.len(), 2);
    assert_eq!(row_ids(&rest[0]), sorted(second.clone()));
    assert_eq!((rest[1]["id"].as_str(), rest[1]["reason"].as_str()), (Some(damaged.as_str()), Some("x")));
    assert_eq!((rest[1]["source"].as_str(), rest[1]["events"].as_u64()), (Some("corrupt"), Some(0)));
    assert!(rest[1]["batchId"].is_null() && rest[1]["rows"] == json!([]), "{}", rest[1]);

    // The schema fixed, a replay moves the rows back to the spill; the damaged entry stays.
    app.query("ALTER TABLE events MODIFY COLUMN error_code UInt16").await;
    let (status, done) = app.send(post.clone(), "/admin/dead-letters/replay", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done, json!({"entries": 2, "events": 5, "skipped": [damaged], "waiting": []}));
    let all: Vec<String> = first.iter().chain(&second).map(|id| format!("'{id}'")).collect();
    let stored = format!("SELECT count() FROM events WHERE toString(event_id) IN ({})", all.join(","));
    assert_eq!(app.wait_for(&stored, 5).await, 5, "the replayers insert them");
    // Exactly once: the spill drained, nothing was inserted twice.
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.metric("adbeacon_events_replayed_total").await < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["spillBacklog"], 0, "{ready}");
    let distinct = stored.replace("count()", "uniqExact(event_id)");
    assert_eq!((app.number(&stored).await, app.number(&distinct).await), (5, 5));
    assert_eq!(app.metric("adbeacon_dead_letters_replayed_total").await, 2);
    // The two entries sent back count as bytes pushed to the spill, and were replayed byte for byte.
    let pushed = app.metric("adbeacon_spill_bytes_pushed_total").await;
    let mut replayed = 0;
    for _ in 0..20 {
        replayed = app.metric("adbeacon_spill_bytes_replayed_total").await;
        if replayed == pushed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pushed >= 5 * 65 && replayed == pushed, "{pushed} bytes pushed, {replayed} replayed");

    // Only the damaged entry is left; a purge removes it.
    let (_, page) = app.send(get.clone(), "/admin/dead-letters", Some(ADMIN), None).await;
    assert_eq!(page["count"], 1, "{page}");
    assert_eq!(page["deadLetters"][0]["id"], damaged.as_str());
    // A purge cannot be undone: one that names nothing deletes nothing.
    for body in [None, Some(json!({})), Some(json!({"ids": null})), Some(json!({"all": false}))] {
        let (status, answer) =
            app.send(delete.clone(), "/admin/dead-letters", Some(ADMIN), body.clone()).await;
        assert_eq!(status, 422, "{body:?}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains(r#"{"all": true}"#), "{answer}");
    }
    let (_, page) = app.send(get.clone(), "/admin/dead-letters", Some(ADMIN), None).await;
    assert_eq!(page["count"], 1, "{page}");
    let all = Some(json!({"all": true}));
    let (status, purged) = app.send(delete.clone(), "/admin/dead-letters", Some(ADMIN), all).await;
    assert_eq!((status, purged), (200, json!({"purged": 1})));
    let (_, page) = app.send(get, "/admin/dead-letters", Some(ADMIN), None).await;
    assert_eq!(page, json!({"count": 0, "deadLetters": [], "next": null}));
    assert_eq!(app.metric("adbeacon_dead_letters_purged_total").await, 1);
    assert_eq!(app.metric("adbeacon_dead_letters").await, 0);
}

/// Two replays of every dead letter at once (an operator's retry after a slow answer, two
/// scripts): each dead letter goes back to the spill once, whichever call moves it, and its
/// events are stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replays_at_once_move_each_dead_letter_once() {
    use adbeacon::ingest::dead_letter::{Source, rows_fields};
    let app = TestApp::spawn().await;
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let mut all = Vec::new();
    let client = redis::Client::open(shared_redis().url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..300 {
        let token = uuid::Uuid::new_v4();
        let rows = clicks(2, token, now, 3);
        all.extend(rows.iter().map(|r| format!("'{}'", r.event_id)));
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream(&app)).arg("*");
        for (k, v) in rows_fields(token, &rows, "rejected for the test", Source::Rejected) {
            cmd.arg(k).arg(v);
        }
        let _: String = cmd.query_async(&mut conn).await.unwrap();
    }
    let replay = || app.send(reqwest::Method::POST, "/admin/dead-letters/replay", None, None);
    let ((s1, a), (s2, b)) = tokio::join!(replay(), replay());
    assert_eq!((s1, s2), (200, 200), "{a} {b}");
    let moved = a["entries"].as_u64().unwrap() + b["entries"].as_u64().unwrap();
    let events = a["events"].as_u64().unwrap() + b["events"].as_u64().unwrap();
    assert_eq!((moved, events), (300, 600), "each dead letter moved once: {a} {b}");
    let stored = format!("SELECT count() FROM events WHERE toString(event_id) IN ({})", all.join(","));
    assert_eq!(app.wait_for(&stored, 600).await, 600);
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.metric("adbeacon_events_replayed_total").await < 600 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.metric("adbeacon_events_replayed_total").await, 600);
    let distinct = stored.replace("count()", "uniqExact(event_id)");
    assert_eq!((app.number(&stored).await, app.number(&distinct).await), (600, 600));
}

/// A dead letter whose batch the spill still holds (a shutdown that could not learn whether its
/// push had landed keeps the batch as a dead letter too) stays where it is until the spill has
/// stored the batch: two entries with the same rows could go to two replayers at once, each
/// checking ClickHouse before the other stored them. Then it moves, and only what the spill did
/// not store is stored.
#[tokio::test]
async fn a_dead_letter_waits_while_the_spill_holds_its_batch() {
    use adbeacon::{
        ingest::{
            dead_letter::{Source, rows_fields},
            spill::{GROUP, batch_fields},
        },
        store::EventRow,
    };
    let app = TestApp::spawn_with(&[("REPLAY_CLAIM_IDLE", "1h")]).await;
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let token = uuid::Uuid::new_v4();
    let rows = clicks(3, token, now, 5);
    let redis = shared_redis();
    let mut conn =
        redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let mut add = redis::cmd("XADD");
    add.arg(stream(&app)).arg("*");
    for (k, v) in rows_fields(token, &rows, "ClickHouse unavailable at shutdown", Source::Shutdown) {
        add.arg(k).arg(v);
    }
    let id: String = add.query_async(&mut conn).await.unwrap();
    // The spill holds the batch too, pending for a replayer that is gone (this app's replayer
    // claims it only after REPLAY_CLAIM_IDLE, an hour here): its token is in the spill's set.
    let spill = format!("{}spill", app.redis_prefix);
    let tokens = format!("{}spill:tokens", app.redis_prefix);
    let mut push = redis::cmd("XADD");
    push.arg(&spill).arg("*");
    for (k, v) in batch_fields(token, &rows, 0, false) {
        push.arg(k).arg(v);
    }
    let entry: String = push.query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("SADD").arg(&tokens).arg(token.to_string()).query_async(&mut conn).await.unwrap();
    let _: redis::Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&spill)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap_or(redis::Value::Nil);
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("a-replayer-that-died")
        .arg("STREAMS")
        .arg(&spill)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let replay = || app.send(reqwest::Method::POST, "/admin/dead-letters/replay", None, None);
    let (status, done) = replay().await;
    assert_eq!((status, done), (200, json!({"entries": 0, "events": 0, "skipped": [], "waiting": [id]})));
    assert_eq!(redis.command(&["XLEN", &stream(&app)]), "1", "the dead letter stays");

    // The spill stored the batch (one of its rows: the others were rejected, say) and its entry
    // left, as a replayer's acknowledgement does it.
    // With its own event time: the check looks a batch's rows up within their times.
    app.query(&format!(
        "INSERT INTO events (event_id, ad_id, kind, event_time, received_at, ip_hash, error_code, batch_id) \
         VALUES ('{}', '{AD1}', 'click', toDateTime({at}), toDateTime({at}), 5, 0, '{token}')",
        rows[0].event_id,
        at = rows[0].event_time.unix_timestamp()
    ))
    .await;
    redis.command(&["XACK", &spill, GROUP, &entry]);
    redis.command(&["XDEL", &spill, &entry]);
    redis.command(&["SREM", &tokens, &token.to_string()]);
    let (status, done) = replay().await;
    assert_eq!((status, done), (200, json!({"entries": 1, "events": 3, "skipped": [], "waiting": []})));
    let ids: Vec<String> = rows.iter().map(|r| format!("'{}'", r.event_id)).collect();
    let stored = format!("SELECT count() FROM events WHERE toString(event_id) IN ({})", ids.join(","));
    assert_eq!(app.wait_for(&stored, 3).await, 3);
    // The moved entry's token is in the set while it is in the spill, and leaves with it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis.command(&["SISMEMBER", &tokens, &token.to_string()]) != "0" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(redis.command(&["SISMEMBER", &tokens, &token.to_string()]), "0");
    let distinct = stored.replace("count()", "uniqExact(event_id)");
    assert_eq!((app.number(&stored).await, app.number(&distinct).await), (3, 3), "stored once each");

    // An empty spill holds no batch, whatever its token set says (a token left behind by a
    // stream deleted by hand): such a dead letter moves.
    let stale = uuid::Uuid::new_v4();
    let mut add = redis::cmd("XADD");
    add.arg(stream(&app)).arg("*");
    let row = EventRow { event_id: uuid::Uuid::new_v4(), batch_id: stale, ..rows[0].clone() };
    for (k, v) in rows_fields(stale, std::slice::from_ref(&row), "rejected for the test", Source::Rejected) {
        add.arg(k).arg(v);
    }
    let _: String = add.query_async(&mut conn).await.unwrap();
    redis.command(&["SADD", &tokens, &stale.to_string()]);
    assert_eq!(redis.command(&["XLEN", &spill]), "0");
    let (status, done) = replay().await;
    assert_eq!((status, done), (200, json!({"entries": 1, "events": 1, "skipped": [], "waiting": []})));
    let one = format!("SELECT count() FROM events WHERE event_id = toUUID('{}')", row.event_id);
    assert_eq!(app.wait_for(&one, 1).await, 1);
}

#[tokio::test]
async fn purge_deletes_the_selected_dead_letters_or_all() {
    let app = TestApp::spawn().await;
    break_schema(&app).await;
    rejected_batch(&app, 2).await;
    let kept = rejected_batch(&app, 1).await;
    let damaged = damaged_entry(&app);
    let (status, page) = app.send(reqwest::Method::GET, "/admin/dead-letters", None, None).await;
    assert_eq!(status, 200, "{page}");
    let ids: Vec<String> = page["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[2], damaged);

    // A damaged entry named for replay is skipped; nothing moves.
    let replay = json!({"ids": [damaged]});
    let (status, done) =
        app.send(reqwest::Method::POST, "/admin/dead-letters/replay", None, Some(replay)).await;
    assert_eq!(
        (status, done),
        (200, json!({"entries": 0, "events": 0, "skipped": [damaged], "waiting": []}))
    );

    // An empty list selects none; unknown ids are ignored; repeats count once.
    let purge = |body: Value| app.send(reqwest::Method::DELETE, "/admin/dead-letters", None, Some(body));
    assert_eq!(purge(json!({"ids": []})).await, (200, json!({"purged": 0})));
    let (status, done) = purge(json!({"ids": [ids[0], damaged, damaged, "1-0"]})).await;
    assert_eq!((status, done), (200, json!({"purged": 2})));
    let (_, page) = app.send(reqwest::Method::GET, "/admin/dead-letters", None, None).await;
    assert_eq!(page["count"], 1, "{page}");
    assert_eq!(page["deadLetters"][0]["id"], ids[1].as_str());
    assert_eq!(row_ids(&page["deadLetters"][0]), kept);

    // All, said so.
    assert_eq!(purge(json!({"ids": [ids[1]], "all": true})).await.0, 422);
    assert_eq!(purge(json!({"all": true})).await, (200, json!({"purged": 1})));
    assert_eq!(shared_redis().command(&["XLEN", &stream(&app)]), "0");
    assert_eq!(app.metric("adbeacon_dead_letters_purged_total").await, 3);
}

/// ClickHouse rejects every row of a batch (each an event time its DateTime cannot hold): the
/// batch is kept as dead letters after a bounded number of rejected INSERTs (split down to
/// single rows, 100,000 rows stalled the flusher for minutes while the buffer filled), and the
/// dead letter's reason says that rows were kept together unsplit.
#[tokio::test]
async fn a_batch_rejected_whole_costs_a_bounded_number_of_inserts() {
    use adbeacon::ingest::{
        buffer::{Buffer, Limits},
        insert::MAX_SPLITS,
    };
    // The app made the database; its own flusher has nothing to send.
    let app = TestApp::spawn().await;
    let dead = tempfile::tempdir().unwrap();
    let mut flusher = app.flusher(None, Duration::from_millis(50), dead.path()).await;
    // One batch of all thousand rows (the helper's batches hold 100, too few to run out).
    let limits = Limits {
        max_bytes: 1 << 20,
        batch_rows: 1000,
        batch_bytes: 1 << 20,
        max_age: Duration::from_millis(50),
    };
    flusher.buffer = std::sync::Arc::new(Buffer::new(limits, flusher.metrics.clone()));
    let (buffer, metrics) = (flusher.buffer.clone(), flusher.metrics.clone());
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let mut rows = clicks(1000, uuid::Uuid::nil(), now, 1);
    for row in &mut rows {
        row.event_time = time::OffsetDateTime::from_unix_timestamp(7_258_118_400).unwrap(); // year 2200
    }
    let held = buffer.push(rows).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(flusher.run(stop.clone()));
    tokio::time::timeout(Duration::from_secs(60), buffer.confirmed(held.end)).await.expect("confirmed");
    assert_eq!(metrics.events_dead_lettered.get(), 1000);
    assert_eq!(app.number("SELECT count() FROM events").await, 0);
    let text = metrics.render();
    let sample = "adbeacon_insert_failures_total{class=\"rejected\"} ";
    let line = text.lines().find(|l| l.starts_with(sample)).expect("the rejected INSERTs' counter");
    let inserts: u64 = line[sample.len()..].trim().parse().unwrap();
    // MAX_SPLITS splits, each after a rejected INSERT, and the INSERTs of the halves not split.
    assert!(inserts <= 2 * u64::from(MAX_SPLITS) + 1, "{inserts} rejected INSERTs for one batch");
    let reasons: Vec<String> = std::fs::read_dir(dead.path().join("dead-letter"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "reason"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(reasons.len(), 1, "one dead letter for the batch");
    assert!(reasons[0].starts_with("not split further"), "{}", reasons[0]);
    stop.cancel();
    assert_eq!(run.await.unwrap(), 0);
}

/// A dead letter holds a whole batch's rejected rows (a schema change rejects every one): a page
/// ends once it holds PAGE_ROWS rows, with at least one dead letter, and `next` goes on from it.
#[tokio::test]
async fn a_page_of_dead_letters_ends_at_its_rows_budget() {
    use adbeacon::{
        api::admin::PAGE_ROWS,
        ingest::dead_letter::{Source, rows_fields},
    };
    let app = TestApp::spawn().await;
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let client = redis::Client::open(shared_redis().url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Three big dead letters, then two small ones: 0.6, 0.6, 1.2, a row, a row of the budget.
    let sizes = [PAGE_ROWS * 3 / 5, PAGE_ROWS * 3 / 5, PAGE_ROWS * 6 / 5, 1, 1];
    for n in sizes {
        let token = uuid::Uuid::new_v4();
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream(&app)).arg("*");
        for (k, v) in rows_fields(token, &clicks(n, token, now, 3), "rejected for the test", Source::Rejected)
        {
            cmd.arg(k).arg(v);
        }
        let _: String = cmd.query_async(&mut conn).await.unwrap();
    }
    let mut pages = Vec::new();
    let mut after = String::new();
    loop {
        let (status, page) =
            app.send(reqwest::Method::GET, &format!("/admin/dead-letters?{after}"), None, None).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["count"], 5);
        pages.push(
            page["deadLetters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["events"].as_u64().unwrap())
                .collect::<Vec<_>>(),
        );
        match page["next"].as_str() {
            Some(next) => after = format!("after={next}"),
            None => break,
        }
        assert!(pages.len() < 10, "{pages:?}");
    }
    let (big, one) = ((PAGE_ROWS * 3 / 5) as u64, 1);
    // The second dead letter takes the first page past the budget; the third alone is over it.
    assert_eq!(pages, [vec![big, big], vec![2 * big], vec![one, one]]);
}

#[tokio::test]
async fn malformed_ids_and_limits_are_refused_naming_them() {
    let app = TestApp::spawn().await;
    let damaged = damaged_entry(&app);
    for (query, names) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("after=abc", "after"),
        ("after=1700000000000", "after"),
    ] {
        let path = format!("/admin/dead-letters?{query}");
        let (status, body) = app.send(reqwest::Method::GET, &path, None, None).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body["error"].as_str().unwrap().starts_with(names), "{query}: {body}");
    }
    let (status, body) = app.send(reqwest::Method::GET, "/admin/dead-letters?limit=1000", None, None).await;
    assert_eq!((status, body["count"].as_u64()), (200, Some(1)));

    for method in [reqwest::Method::POST, reqwest::Method::DELETE] {
        let path = if method == reqwest::Method::POST {
            "/admin/dead-letters/replay"
        } else {
            "/admin/dead-letters"
        };
        let (status, body) = app.send(method.clone(), path, None, Some(json!({"ids": ["abc"]}))).await;
        assert_eq!(status, 422, "{method}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("ids[0]")
                && body["error"].as_str().unwrap().contains("\"abc\"")
        );
        let (status, body) =
            app.send(method.clone(), path, None, Some(json!({"ids": [damaged, "1700000000000-01"]}))).await;
        assert_eq!(status, 422, "{method}: {body}");
        assert!(body["error"].as_str().unwrap().contains("ids[1]"), "{body}");
        let many: Vec<String> = (0..1001).map(|i| format!("{i}-0")).collect();
        let (status, body) = app.send(method.clone(), path, None, Some(json!({"ids": many}))).await;
        assert_eq!(status, 422, "{method}: {body}");
        // A misspelt field is not read as "no ids", which would select every dead letter.
        let (status, body) = app.send(method.clone(), path, None, Some(json!({"id": [damaged]}))).await;
        assert_eq!(status, 400, "{method}: {body}");
        assert!(body["error"].as_str().unwrap().contains("unknown field"), "{body}");
        let (status, body) = app.send(method.clone(), path, None, Some(json!({"ids": "all"}))).await;
        assert_eq!(status, 400, "{method}: {body}");
    }
    assert_eq!(shared_redis().command(&["XLEN", &stream(&app)]), "1", "nothing was touched");
}

#[tokio::test]
async fn without_redis_the_endpoints_answer_409_and_with_redis_down_503() {
    let app = TestApp::spawn_with(&[("REDIS_URL", "none")]).await;
    let cases = [
        (reqwest::Method::GET, "/admin/dead-letters"),
        (reqwest::Method::POST, "/admin/dead-letters/replay"),
        (reqwest::Method::DELETE, "/admin/dead-letters"),
    ];
    // A purge must name what it deletes (422 otherwise, with Redis or without).
    let select = |method: &reqwest::Method| (method == reqwest::Method::DELETE).then(|| json!({"all": true}));
    for (method, path) in &cases {
        let (status, body) = app.send(method.clone(), path, None, select(method)).await;
        assert_eq!(status, 409, "{method} {path}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("REDIS_URL is none") && error.contains("DATA_DIR/dead-letter/"), "{error}");
    }

    let mut redis = Redis::start();
    let app = TestApp::spawn_with(&[("REDIS_URL", &redis.url())]).await;
    let (status, _) = app.send(reqwest::Method::GET, "/admin/dead-letters", None, None).await;
    assert_eq!(status, 200);
    redis.stop();
    for (method, path) in &cases {
        let mut request = app.http.request(method.clone(), format!("{}{path}", app.base));
        if let Some(body) = select(method) {
            request = request.json(&body);
        }
        let resp = request.send().await.unwrap();
        assert_eq!(resp.status(), 503, "{method} {path}");
        assert!(resp.headers().contains_key("retry-after"));
        let body: Value = resp.json().await.unwrap();
        // A change may have been made by a Redis that stalled after taking it: not "nothing".
        let says =
            if *method == reqwest::Method::GET { "Redis is unavailable" } else { "Redis did not answer" };
        assert!(body["error"].as_str().unwrap().starts_with(says), "{method} {path}: {body}");
    }
}

/// `committed`: when ClickHouse takes a batch but for some of its rows (kept as dead letters),
/// only the requests those rows came from count as not committed (503); the other requests'
/// events are stored and get their 2xx (a 503 would have their clients send them again). A batch
/// of two requests through the flusher into ClickHouse, one row an event time ClickHouse's
/// DateTime cannot hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stored_but_for_a_rejected_row_commits_the_other_requests() {
    // The app made the database; its own flusher has nothing to send.
    let app = TestApp::spawn().await;
    let dead = tempfile::tempdir().unwrap();
    let flusher = app.flusher(None, Duration::from_millis(50), dead.path()).await;
    let (buffer, metrics) = (flusher.buffer.clone(), flusher.metrics.clone());
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let stored = buffer.push(clicks(2, uuid::Uuid::nil(), now, 1)).unwrap();
    let mut poisoned = clicks(2, uuid::Uuid::nil(), now, 2);
    poisoned[1].event_time = time::OffsetDateTime::from_unix_timestamp(7_258_118_400).unwrap(); // year 2200
    let rejected = buffer.push(poisoned).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(flusher.run(stop.clone()));
    tokio::time::timeout(Duration::from_secs(20), buffer.confirmed(rejected.end)).await.expect("confirmed");
    assert_eq!(metrics.batches_flushed.get(), 1, "one batch");
    assert_eq!(metrics.events_dead_lettered.get(), 1);
    assert_eq!(app.number("SELECT count() FROM events").await, 3);
    assert!(!buffer.went_elsewhere(&stored), "a request whose events are stored would get 503");
    assert!(buffer.went_elsewhere(&rejected));
    stop.cancel();
    assert_eq!(run.await.unwrap(), 0);
}
