//! Start-up and the command line: migrations, configuration errors, `--help`, the OpenAPI contract,
//! metrics.

use std::process::Command;

use adbeacon::{
    Config,
    config::SETTINGS,
    store::migrate::{self, MIGRATIONS},
};
use serde_json::json;

use crate::support::{TestApp, fresh_db, shared_clickhouse};

fn adbeacon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_adbeacon"))
}

/// A migration that re-creates views is not applied by `serve` to a database that holds events
/// (other instances may be inserting); `adbeacon migrate` applies it, and `serve` then starts.
#[tokio::test]
async fn serve_leaves_view_recreation_on_a_database_with_events_to_migrate() {
    let db = fresh_db();
    let config = Config::from_vars([
        ("CLICKHOUSE_URL", shared_clickhouse().url()),
        ("CLICKHOUSE_DATABASE", db.clone()),
        ("HOST", "127.0.0.1".into()),
        ("PORT", "0".into()),
        ("SEED_DEMO_ADS", "false".into()),
        ("DATA_DIR", tempfile::tempdir().unwrap().path().display().to_string()),
    ])
    .unwrap();
    let recreating = MIGRATIONS.iter().find(|m| m.needs_quiet.is_some()).expect("0007 re-creates views");
    let (ch, _) = {
        // The schema as an older release left it, with an event in it.
        shared_clickhouse().query(&format!("CREATE DATABASE {db}")).await;
        let timeouts = adbeacon::store::Timeouts {
            insert: std::time::Duration::from_secs(5),
            query: std::time::Duration::from_secs(5),
        };
        let ch = adbeacon::store::ClickHouse::connect(
            &config.clickhouse,
            std::time::Duration::from_secs(10),
            timeouts,
        )
        .await
        .unwrap();
        let applied = migrate::apply_through(&ch, recreating.version - 1, false).await.unwrap();
        (ch, applied)
    };
    shared_clickhouse()
        .query_in(
            &db,
            "INSERT INTO events (event_id, ad_id, kind, event_time, received_at, ip_hash, error_code, batch_id) \
             SELECT generateUUIDv4(), generateUUIDv4(), 'click', now(), now(), 1, 0, generateUUIDv4()",
        )
        .await;
    let err = adbeacon::App::build(config.clone()).await.err().expect("serve refuses").to_string();
    assert!(err.contains(recreating.name) && err.contains("adbeacon migrate"), "{err}");
    // `adbeacon migrate` applies it and every later one (0008 copies aggregates: it too is left
    // to `adbeacon migrate` on such a database).
    let later: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).filter(|&v| v >= recreating.version).collect();
    assert_eq!(migrate::apply(&ch).await.unwrap(), later);
    let app = adbeacon::App::build(config).await.expect("serve starts after `adbeacon migrate`");
    drop(app);
    // A new database takes it at start-up (every other test's app does).
}

/// Instances starting together on a new database (a deployment's pods) migrate one at a time:
/// one applies every migration, the others wait for its lock and find them applied. Without the
/// lock both ran every migration, and one re-creating the views could drop those the other had
/// created while it already inserted. A lock someone holds keeps a migration waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_migrate_one_at_a_time() {
    let db = fresh_db();
    let config = Config::from_vars([
        ("CLICKHOUSE_URL", shared_clickhouse().url()),
        ("CLICKHOUSE_DATABASE", db.clone()),
    ])
    .unwrap();
    let (a, b) = tokio::join!(
        adbeacon::app::connect_and_migrate(&config),
        adbeacon::app::connect_and_migrate(&config)
    );
    let (mut a, mut b) = (a.unwrap().1, b.unwrap().1);
    a.append(&mut b);
    assert_eq!(a, MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>(), "each migration applied once");
    let ledger = shared_clickhouse().query_in(&db, "SELECT count() FROM schema_migrations").await;
    assert_eq!(ledger.trim(), MIGRATIONS.len().to_string());
    let lock = "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = 'schema_migrations_lock'";
    assert_eq!(shared_clickhouse().query_in(&db, lock).await.trim(), "0", "the lock is released");

    // Held by someone else: a migration waits for it.
    shared_clickhouse()
        .query_in(&db, "CREATE TABLE schema_migrations_lock (taken_at DateTime) ENGINE = Memory")
        .await;
    let config2 = config.clone();
    let waiting =
        tokio::spawn(async move { adbeacon::app::connect_and_migrate(&config2).await.map(|(_, v)| v) });
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(!waiting.is_finished(), "the migration went ahead while another instance held the lock");
    shared_clickhouse().query_in(&db, "DROP TABLE schema_migrations_lock").await;
    let applied =
        tokio::time::timeout(std::time::Duration::from_secs(30), waiting).await.unwrap().unwrap().unwrap();
    assert!(applied.is_empty(), "{applied:?}");
}

/// A lock left by an instance that died while migrating, found by three instances starting
/// together once it is stale: one of them takes it over, and they still migrate one at a time.
/// (When each moved the lock aside and put back what was not the dead one's, a third could
/// create a lock while a second had the first's moved aside: two instances migrated at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_finding_a_stale_lock_migrate_one_at_a_time() {
    for _ in 0..3 {
        let db = fresh_db();
        let server = shared_clickhouse();
        server.query(&format!("CREATE DATABASE {db}")).await;
        stale_lock(&db, "died").await;
        let config =
            Config::from_vars([("CLICKHOUSE_URL", server.url()), ("CLICKHOUSE_DATABASE", db.clone())])
                .unwrap();
        let (a, b, c) = tokio::join!(
            adbeacon::app::connect_and_migrate(&config),
            adbeacon::app::connect_and_migrate(&config),
            adbeacon::app::connect_and_migrate(&config)
        );
        let mut applied: Vec<u32> = [a, b, c].into_iter().flat_map(|r| r.unwrap().1).collect();
        applied.sort();
        assert_eq!(applied, MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>(), "each applied once");
        let locks = "SELECT count() FROM system.tables WHERE database = currentDatabase() \
                     AND name = 'schema_migrations_lock'";
        assert_eq!(server.query_in(&db, locks).await.trim(), "0", "the lock is released");
        // One took it over, and its marker stays until it is as old as a stale lock.
        let markers = "SELECT name FROM system.tables WHERE database = currentDatabase() \
                       AND name LIKE 'schema_migrations_lock_taken_over_%'";
        let marker = server.query_in(&db, markers).await.trim().to_string();
        assert_eq!(marker.lines().count(), 1, "{marker}");
        // Then the next run drops it, here one that takes over another stale lock itself.
        server.backdate_table(&db, &marker, migrate::LOCK_STALE_AFTER * 2);
        stale_lock(&db, "died too").await;
        assert!(adbeacon::app::connect_and_migrate(&config).await.unwrap().1.is_empty());
        let now = server.query_in(&db, markers).await.trim().to_string();
        assert!(now.lines().count() == 1 && now != marker, "{marker} then {now}");
        assert_eq!(server.query_in(&db, locks).await.trim(), "0", "the lock is released");
    }
}

/// A migration lock in `db` held by `holder`, made twice as long ago as a lock goes stale: the
/// lock of an instance that died while migrating.
async fn stale_lock(db: &str, holder: &str) {
    let create =
        format!("CREATE TABLE schema_migrations_lock (holder String DEFAULT '{holder}') ENGINE = Memory");
    shared_clickhouse().query_in(db, &create).await;
    shared_clickhouse().backdate_table(db, "schema_migrations_lock", migrate::LOCK_STALE_AFTER * 2);
}

/// A migration statement of an earlier run that still runs on the server (its `adbeacon migrate`
/// stopped waiting, or died): a new run waits for it to end before it runs its own statements, so
/// that a copy of migration 0008 never runs twice at once. One of another database does not hold
/// it up.
#[tokio::test]
async fn a_run_waits_for_the_statements_of_an_earlier_one() {
    let db = fresh_db();
    let server = shared_clickhouse();
    server.query(&format!("CREATE DATABASE {db}")).await;
    // Three seconds of work under the query id an earlier run's statement had (18.16's sleep()
    // stops at 3 s), and twelve (four blocks of one row) under another database's.
    let earlier = format!("{}{db}-earlier", migrate::STATEMENT_ID_PREFIX);
    let elsewhere = format!("{}other_db-earlier", migrate::STATEMENT_ID_PREFIX);
    let running = |query_id: String, blocks: u32| {
        let url = server.url();
        tokio::spawn(async move {
            let url = format!("{url}?query_id={query_id}&max_block_size=1");
            let sql = format!("SELECT sleep(3) FROM system.numbers LIMIT {blocks}");
            let resp = reqwest::Client::new().post(url).body(sql).send().await.unwrap();
            assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
        })
    };
    let (earlier_task, elsewhere_task) = (running(earlier.clone(), 1), running(elsewhere.clone(), 4));
    let listed = |id: &str| format!("SELECT count() FROM system.processes WHERE query_id = '{id}'");
    while server.query(&listed(&earlier)).await.trim() == "0"
        || server.query(&listed(&elsewhere)).await.trim() == "0"
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let config =
        Config::from_vars([("CLICKHOUSE_URL", server.url()), ("CLICKHOUSE_DATABASE", db.clone())]).unwrap();
    let (_, applied) = adbeacon::app::connect_and_migrate(&config).await.unwrap();
    assert_eq!(applied, MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>());
    // Applying takes well under the three seconds: had it not waited, the earlier statement
    // would still be running now.
    assert!(earlier_task.is_finished(), "migrations ran beside an earlier run's statement");
    assert_eq!(server.query(&listed(&earlier)).await.trim(), "0");
    earlier_task.await.unwrap();
    assert!(!elsewhere_task.is_finished(), "the run waited for another database's statement");
    elsewhere_task.abort();
}

#[tokio::test]
async fn migrations_apply_once_and_are_safe_to_run_again() {
    let db = fresh_db();
    let config = Config::from_vars([
        ("CLICKHOUSE_URL", shared_clickhouse().url()),
        ("CLICKHOUSE_DATABASE", db.clone()),
    ])
    .unwrap();
    let (_, first) = adbeacon::app::connect_and_migrate(&config).await.unwrap();
    assert_eq!(first, MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>());
    let (ch, second) = adbeacon::app::connect_and_migrate(&config).await.unwrap();
    assert!(second.is_empty(), "{second:?}");
    // Re-running every statement by hand (as after an interrupted migration) is harmless too.
    for m in MIGRATIONS {
        for statement in m.statements() {
            adbeacon::store::migrate::run(&ch, &statement).await.unwrap();
        }
    }
    let ledger = shared_clickhouse()
        .query_in(&db, "SELECT version, name FROM schema_migrations ORDER BY version")
        .await;
    let expected: String = MIGRATIONS.iter().map(|m| format!("{}\t{}\n", m.version, m.name)).collect();
    assert_eq!(ledger, expected);
    let tables = shared_clickhouse()
        .query_in(&db, "SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name")
        .await;
    assert_eq!(
        tables,
        "ad_counts\nad_counts_mv\nad_errors_minutely\nad_errors_minutely_mv\nad_filtered_minutely\nad_filtered_minutely_mv\nad_stats_daily\nad_stats_daily_mv\nad_stats_hourly\n\
         ad_stats_hourly_mv\nad_stats_minutely\nad_stats_minutely_mv\nads\nevents\nschema_migrations\n"
    );
    assert!(migrate::apply(&ch).await.unwrap().is_empty());

    // A database that applied an earlier revision of a revised migration still starts; one whose
    // recorded text matches no revision does not.
    let revised = MIGRATIONS.iter().find(|m| !m.superseded.is_empty()).expect("a revised migration");
    let record = |checksum: u64| {
        format!(
            "INSERT INTO schema_migrations (version, name, checksum, applied_at) \
             SELECT {}, '{}', {checksum}, now() + 1",
            revised.version, revised.name
        )
    };
    ch.execute(&record(revised.superseded[0])).await.unwrap();
    assert!(migrate::apply(&ch).await.unwrap().is_empty());
    ch.execute(&record(42).replace("now() + 1", "now() + 2")).await.unwrap();
    let err = migrate::apply(&ch).await.unwrap_err().to_string();
    assert!(err.contains("changed after it was applied"), "{err}");
}

#[test]
fn migrate_subcommand_applies_the_schema() {
    let db = fresh_db();
    let out = adbeacon()
        .arg("migrate")
        .env("CLICKHOUSE_URL", shared_clickhouse().url())
        .env("CLICKHOUSE_DATABASE", &db)
        .env("LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let versions = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(shared_clickhouse().query_in(&db, "SELECT count() FROM schema_migrations"));
    assert_eq!(versions.trim(), MIGRATIONS.len().to_string());
}

#[test]
fn help_lists_the_commands_and_every_variable_with_its_default() {
    let out = adbeacon().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for command in ["serve", "migrate", "openapi"] {
        assert!(help.contains(command), "{command}");
    }
    for s in SETTINGS {
        let line =
            help.lines().find(|l| l.trim_start().starts_with(s.name)).unwrap_or_else(|| panic!("{}", s.name));
        if !s.default.is_empty() {
            assert!(line.contains(s.default), "{line}");
        }
    }
}

#[test]
fn a_bad_value_stops_start_up_naming_the_variable_and_form() {
    for (var, value, needle) in [
        ("PORT", "http", "PORT=\"http\": expected a port number"),
        ("FLUSH_INTERVAL", "fast", "FLUSH_INTERVAL=\"fast\": expected a duration"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT=\"xml\": expected json or pretty"),
    ] {
        let out = adbeacon().arg("serve").env(var, value).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{var}: {err}");
    }
    let out = adbeacon().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Every JSON body an operation takes or answers has an example in the spec (on the media type
/// or on its schema, through `$ref`, arrays and `oneOf`), so integrators see a real payload for
/// each; the GIF of the pixel and the Prometheus text are the exceptions.
#[tokio::test]
async fn every_json_body_in_the_spec_has_an_example() {
    let app = TestApp::spawn().await;
    let spec: serde_json::Value = app.get("/openapi.json").await.json().await.unwrap();
    let schemas = &spec["components"]["schemas"];
    fn has_example(schema: &serde_json::Value, schemas: &serde_json::Value) -> bool {
        if schema.get("example").is_some() {
            return true;
        }
        if let Some(name) = schema["$ref"].as_str().and_then(|r| r.rsplit('/').next()) {
            return has_example(&schemas[name], schemas);
        }
        if let Some(items) = schema.get("items") {
            return has_example(items, schemas);
        }
        schema["oneOf"].as_array().is_some_and(|all| all.iter().all(|s| has_example(s, schemas)))
    }
    let mut missing = Vec::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let bodies =
                op["requestBody"]["content"].as_object().into_iter().flatten().map(|b| ("request", b));
            let answers = op["responses"].as_object().into_iter().flatten().flat_map(|(status, r)| {
                r["content"].as_object().into_iter().flatten().map(move |b| (status.as_str(), b))
            });
            for (which, (content_type, media)) in bodies.chain(answers) {
                if content_type.contains("json")
                    && media.get("example").is_none()
                    && !has_example(&media["schema"], schemas)
                {
                    missing.push(format!("{method} {path} {which} {content_type}"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "JSON bodies without an example: {missing:#?}");
}

#[test]
fn the_committed_openapi_spec_matches_the_code() {
    let out = adbeacon().arg("openapi").output().unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.yaml"))
        .expect("openapi/openapi.yaml exists (make openapi)");
    assert!(generated == committed, "openapi/openapi.yaml is stale: run `make openapi` and commit it");
    for op in ["recordImpression", "recordClick", "listAds", "healthz", "readyz", "metrics"] {
        assert!(generated.contains(&format!("operationId: {op}")), "{op}");
    }
}

/// `adbeacon openapi | head` is a normal use: a reader that stops early ends the command
/// quietly and successfully, without a panic about the broken pipe.
#[test]
fn openapi_into_a_reader_that_stops_early_exits_cleanly() {
    use std::{io::Read, process::Stdio};
    let mut child = adbeacon().arg("openapi").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The spec must be larger than a pipe's buffer (64 KiB), or the command would finish writing
    // before the reader goes and the test would prove nothing.
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.yaml")).unwrap();
    assert!(spec.len() > 2 * 65_536, "the spec is {} bytes", spec.len());
    let mut first = [0u8; 9];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The pipe's reader is dropped here, as `head` closes it, before the spec is all written.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("panicked"), "{:?}: {stderr}", out.status);
    assert_eq!(&first, b"openapi: ");
}

#[tokio::test]
async fn metrics_label_routes_by_template_and_count_the_pipeline() {
    let app = TestApp::spawn().await;
    let ad = "11111111-1111-1111-1111-111111111111";
    assert_eq!(app.post("/ads/click", &json!({"adId": ad})).await.status(), 202);
    assert_eq!(
        app.post("/ads/click", &json!({"adId": "99999999-1111-1111-1111-111111111111"})).await.status(),
        404
    );
    assert_eq!(app.get("/nowhere/11111111").await.status(), 404);
    assert_eq!(app.post_raw("/ads/click", "application/json", "{not json").await.status(), 400);
    assert_eq!(app.post("/ads/click", &json!({"adId": "x"})).await.status(), 400);
    assert_eq!(app.wait_for("SELECT count() FROM events", 1).await, 1);
    // The flusher counts after the insert returns: wait for it.
    let mut text = String::new();
    for _ in 0..100 {
        text = app.get("/metrics").await.text().await.unwrap();
        if text.lines().any(|l| l == "adbeacon_events_flushed_total 1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for line in [
        r#"http_requests_total{method="POST",path="/ads/click",status="202"} 1"#,
        r#"http_requests_total{method="POST",path="/ads/click",status="404"} 1"#,
        r#"http_requests_total{method="GET",path="unmatched",status="404"} 1"#,
        r#"adbeacon_events_accepted_total{kind="click"} 1"#,
        r#"adbeacon_events_rejected_total{reason="unknown_ad"} 1"#,
        r#"adbeacon_events_rejected_total{reason="malformed_json"} 1"#,
        r#"adbeacon_events_rejected_total{reason="invalid_field"} 1"#,
        r#"http_requests_total{method="POST",path="/ads/click",status="400"} 2"#,
        "adbeacon_events_flushed_total 1",
        "adbeacon_buffer_events 0",
        "adbeacon_books_balance 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}");
    }
    assert!(text.contains("http_request_duration_seconds_bucket{path=\"/ads/click\""));
    assert!(!text.contains("11111111"), "an id leaked into a label");
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/healthz").await.json::<serde_json::Value>().await.unwrap(), json!({"status": "ok"}));
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap(),
        json!({
            "status": "ready", "clickhouse": "ok", "redis": "ok", "spillBacklog": 0, "deadLetters": 0,
            "buffer": "ok", "log": "ok", "ackMode": "wal", "auth": "open"
        })
    );
    assert_eq!(app.get("/openapi.json").await.status(), 200);
    assert_eq!(app.get("/docs").await.status(), 200);
}

/// The real binary: SIGTERM stops accepting, flushes every buffered event, and exits 0, even when
/// its stdout and stderr are closed pipes (as under `make run | tee` after Ctrl-C).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_everything_and_exits_zero() {
    use std::io::{BufRead, BufReader};

    let db = fresh_db();
    let data = tempfile::tempdir().unwrap();
    let mut child = adbeacon()
        .arg("serve")
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("CLICKHOUSE_URL", shared_clickhouse().url())
        .env("CLICKHOUSE_DATABASE", &db)
        .env("DATA_DIR", data.path())
        .env("REDIS_URL", "none")
        .env("FLUSH_INTERVAL", "1h")
        .env("LOG_FORMAT", "json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    drop(child.stderr.take());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Stops reading (and closes the pipe) once the address is known.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let log: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if log["message"] == "serving HTTP" {
                let _ = tx.send(log["addr"].as_str().unwrap_or_default().to_string());
                return;
            }
        }
    });
    let addr = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the service starts");
    let http = crate::support::browser().build().unwrap();
    for _ in 0..30 {
        let resp = http
            .post(format!("http://{addr}/ads/click"))
            .json(&json!({"adId": "22222222-2222-2222-2222-222222222222"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
    }
    let count = || shared_clickhouse().query_in(&db, "SELECT count() FROM events");
    assert_eq!(count().await.trim(), "0", "buffered, not yet flushed");
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(count().await.trim(), "30");
}

#[test]
fn the_readme_documents_every_setting_with_its_default() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for s in SETTINGS {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", s.name)))
            .unwrap_or_else(|| panic!("README lacks a row for {}", s.name));
        let default = if s.default.is_empty() { "(empty)".to_string() } else { format!("`{}`", s.default) };
        assert!(row.contains(&default), "README row of {} lacks its default {default}: {row}", s.name);
    }
}

/// A client that never finishes its headers (a slow-header attack) is disconnected after
/// HEADER_READ_TIMEOUT; a normal client on another connection is served meanwhile.
#[tokio::test]
async fn slow_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = TestApp::spawn_with(&[("HEADER_READ_TIMEOUT", "300ms")]).await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /ads/click HTTP/1.1\r\nHost: adbeacon\r\n").await.unwrap();
    assert_eq!(app.get("/healthz").await.status(), 200);
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), slow.read(&mut buf)).await;
    match read {
        Ok(Ok(n)) => {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "expected a close, got {text:?}");
        }
        Ok(Err(_)) => {} // reset: closed too
        Err(_) => panic!("the slow connection was still open after 5 s"),
    }
}

/// Every answer carries an `x-request-id`: the caller's own when it sent a sane one, else a new
/// one (the same id is on every log line of the request; see telemetry.rs).
#[tokio::test]
async fn request_ids_are_taken_or_generated_and_echoed() {
    let app = TestApp::spawn().await;
    let resp = app
        .http
        .get(format!("{}/healthz", app.base))
        .header("x-request-id", "lb-7f3a.42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "lb-7f3a.42");
    let ids: Vec<String> = ids_of_two_refused_clicks(&app).await;
    assert!(ids.iter().all(|id| !id.is_empty() && id != "bad id\"x"), "{ids:?}");
    assert_ne!(ids[0], ids[1], "generated ids are unique");
}

async fn ids_of_two_refused_clicks(app: &TestApp) -> Vec<String> {
    let mut ids = Vec::new();
    for header in [None, Some("bad id\"x")] {
        let mut req = app.http.post(format!("{}/ads/click", app.base)).json(&json!({"adId": "nope"}));
        if let Some(h) = header {
            req = req.header("x-request-id", h);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 400);
        ids.push(resp.headers()["x-request-id"].to_str().unwrap().to_string());
    }
    ids
}
