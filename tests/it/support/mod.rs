//! Test support: real servers (see [`servers`]) and [`TestApp`], the service built in-process on
//! port 0 with its own ClickHouse database and data directory, exactly as `main` builds it.

pub mod accounting;
pub mod servers;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use adbeacon::{App, AppError, Config};
use tempfile::TempDir;
use tokio::{sync::oneshot, task::JoinHandle};

pub use servers::{ClickHouse, shared_clickhouse, shared_redis, spill_on_shared_redis};

/// One running adbeacon with its own database.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The database this app writes.
    pub db: String,
    /// The prefix of this app's Redis keys (the spill is `{prefix}spill`).
    pub redis_prefix: String,
    /// A client for requests to the app.
    pub http: reqwest::Client,
    /// DATA_DIR of the app; kept alive as long as the app.
    pub data_dir: TempDir,
    clickhouse_url: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), AppError>>>,
}

/// A user agent like a browser's: requests without one are stored as invalid traffic.
pub const BROWSER_AGENT: &str =
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

/// A client builder that sends [`BROWSER_AGENT`], as players and browsers do.
pub fn browser() -> reqwest::ClientBuilder {
    reqwest::Client::builder().user_agent(BROWSER_AGENT)
}

/// A fresh database name, so tests sharing one ClickHouse never see each other's rows.
pub fn fresh_db() -> String {
    format!("t_{}", uuid::Uuid::new_v4().simple())
}

impl TestApp {
    /// An app on the shared ClickHouse with test defaults (fast flushes).
    pub async fn spawn() -> TestApp {
        Self::spawn_with(&[]).await
    }

    /// An app on the shared ClickHouse; `vars` override the defaults.
    pub async fn spawn_with(vars: &[(&str, &str)]) -> TestApp {
        Self::spawn_on(&shared_clickhouse().url(), &fresh_db(), vars).await
    }

    /// An app on the ClickHouse at `url`, writing database `db`.
    pub async fn spawn_on(url: &str, db: &str, vars: &[(&str, &str)]) -> TestApp {
        Self::spawn_in(url, db, tempfile::tempdir().expect("temp dir"), vars).await
    }

    /// An app with DATA_DIR `data_dir` (say, one an earlier app left its log in).
    pub async fn spawn_in(url: &str, db: &str, data_dir: TempDir, vars: &[(&str, &str)]) -> TestApp {
        // Tests that bring their own Redis pass REDIS_URL; the rest share one, each under its
        // own key prefix (never a developer's Redis on 6379).
        let redis_url = match vars.iter().find(|(k, _)| *k == "REDIS_URL") {
            Some(_) => String::new(),
            None => shared_redis().url(),
        };
        let redis_prefix = vars
            .iter()
            .find(|(k, _)| *k == "REDIS_KEY_PREFIX")
            .map(|(_, v)| v.to_string())
            .unwrap_or_else(|| format!("{db}:"));
        let mut all: Vec<(String, String)> = vec![
            ("REDIS_URL".into(), redis_url),
            ("REDIS_KEY_PREFIX".into(), redis_prefix.clone()),
            ("HOST".into(), "127.0.0.1".into()),
            ("PORT".into(), "0".into()),
            ("CLICKHOUSE_URL".into(), url.into()),
            ("CLICKHOUSE_DATABASE".into(), db.into()),
            ("DATA_DIR".into(), data_dir.path().display().to_string()),
            ("FLUSH_INTERVAL".into(), "100ms".into()),
            ("STARTUP_TIMEOUT".into(), "10s".into()),
            ("INSERT_TIMEOUT".into(), "5s".into()),
            ("SHUTDOWN_TIMEOUT".into(), "5s".into()),
            // Tests send many clicks from one address on purpose; the repeat rule and the rate
            // limit have their own tests.
            ("DEDUP_WINDOW".into(), "0s".into()),
            ("RATE_LIMIT".into(), "0".into()),
        ];
        all.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Config::from_vars(all).expect("valid test config");
        adbeacon::telemetry::init(config.log_format, "warn");
        let app = App::build(config).await.expect("the app builds");
        let addr: SocketAddr = app.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = rx.await;
        }));
        TestApp {
            base: format!("http://{addr}"),
            db: db.to_string(),
            redis_prefix,
            http: browser().build().unwrap(),
            data_dir,
            clickhouse_url: url.to_string(),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A flusher of its own into this app's database, as the service builds one (no log), with
    /// an empty buffer of small batches taken after `max_age`, and dead letters in `dead_dir`
    /// (and in `spill`, if any). The app's own flusher has nothing to send meanwhile.
    pub async fn flusher(
        &self,
        spill: Option<std::sync::Arc<adbeacon::ingest::spill::Spill>>,
        max_age: Duration,
        dead_dir: &std::path::Path,
    ) -> adbeacon::ingest::flusher::Flusher {
        use std::sync::Arc;

        use adbeacon::ingest::buffer::{Buffer, Limits};
        let config = Config::from_vars([
            ("CLICKHOUSE_URL", self.clickhouse_url.clone()),
            ("CLICKHOUSE_DATABASE", self.db.clone()),
        ])
        .unwrap();
        let timeouts =
            adbeacon::store::Timeouts { insert: Duration::from_secs(5), query: Duration::from_secs(5) };
        let clickhouse =
            adbeacon::store::ClickHouse::connect(&config.clickhouse, Duration::from_secs(10), timeouts)
                .await
                .unwrap();
        let metrics = Arc::new(adbeacon::metrics::Metrics::new());
        let limits = Limits { max_bytes: 1 << 20, batch_rows: 100, batch_bytes: 1 << 20, max_age };
        adbeacon::ingest::flusher::Flusher {
            buffer: Arc::new(Buffer::new(limits, metrics.clone())),
            clickhouse,
            metrics,
            dead_letters: adbeacon::ingest::dead_letter::DeadLetters::new(dead_dir, spill.clone()),
            shutdown_timeout: Duration::from_secs(5),
            wal: None,
            spill,
            spill_after: 3,
            health: Default::default(),
            unsafe_skip_check: false,
            retention_months: 13,
        }
    }

    /// POSTs a JSON body.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.http.post(format!("{}{path}", self.base)).json(body).send().await.expect("request sent")
    }

    /// POSTs a raw body with a content type.
    pub async fn post_raw(&self, path: &str, content_type: &str, body: &str) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body.to_string())
            .send()
            .await
            .expect("request sent")
    }

    /// Sends a request with an optional bearer key and JSON body; the status and the JSON
    /// answer (null when the body is not JSON).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// GETs a path.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.base)).send().await.expect("request sent")
    }

    /// Runs SQL in this app's database over HTTP; panics on a ClickHouse error.
    pub async fn query(&self, sql: &str) -> String {
        let resp = reqwest::Client::new()
            .post(format!("{}/?database={}", self.clickhouse_url, self.db))
            .body(sql.to_string())
            .send()
            .await
            .expect("ClickHouse reachable");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert!(status.is_success(), "ClickHouse error for {sql}: {text}");
        text
    }

    /// A single number from SQL.
    pub async fn number(&self, sql: &str) -> u64 {
        let text = self.query(sql).await;
        text.trim().parse().unwrap_or_else(|_| panic!("not a number from {sql}: {text:?}"))
    }

    /// Polls `sql` until it returns `expected` or 10 s pass; returns the last value.
    pub async fn wait_for(&self, sql: &str, expected: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.number(sql).await;
            if n == expected || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the flusher has confirmed `n` events (`adbeacon_events_flushed_total`). Unlike a
    /// `count()` on `events`, this also covers the materialized views: ClickHouse writes the
    /// table's part before the views' parts, and the INSERT returns only after both.
    pub async fn wait_flushed(&self, n: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let flushed = self.metric("adbeacon_events_flushed_total").await;
            if flushed >= n || Instant::now() > deadline {
                return flushed;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of one sample on `/metrics`, named with its labels as exposed
    /// (`adbeacon_events_rejected_total{reason="buffer_full"}`); 0 when absent.
    pub async fn metric(&self, sample: &str) -> u64 {
        let text = self.get("/metrics").await.text().await.unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Takes the app's DATA_DIR (after `stop`), to start another app on it.
    pub fn take_data_dir(&mut self) -> TempDir {
        std::mem::replace(&mut self.data_dir, tempfile::tempdir().expect("temp dir"))
    }

    /// Shuts the app down as SIGTERM would and returns how `run_until` ended. The database and
    /// DATA_DIR stay, for inspection.
    pub async fn stop(&mut self) -> Result<(), AppError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("running").await.expect("the app task does not panic")
    }
}

/// The `adbeacon serve` binary as a child process, for tests that kill it.
pub struct Service {
    /// `http://ADDR`.
    pub base: String,
    child: std::process::Child,
    /// Kills the service if the test process dies first (no orphan replaying from a shared
    /// Redis long after its test).
    watchdog: std::process::Child,
}

impl Service {
    /// Starts `adbeacon serve` on a free port with `vars` and waits until it serves.
    pub fn start(vars: &[(&str, &str)]) -> Service {
        use std::io::{BufRead, BufReader};
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adbeacon"));
        cmd.arg("serve").env("HOST", "127.0.0.1").env("PORT", "0").env("LOG_FORMAT", "json");
        // No spill unless the test gives a Redis: never a developer's Redis on 6379.
        cmd.env("DEDUP_WINDOW", "0s").env("RATE_LIMIT", "0").env("REDIS_URL", "none");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("the adbeacon binary starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            // Reads to the end, so that the service never blocks on a full pipe; WARN and ERROR
            // lines are passed on to the test's output.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let log: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if !sent && log["message"] == "serving HTTP" {
                    let _ = tx.send(log["addr"].as_str().unwrap_or_default().to_string());
                    sent = true;
                }
                if log["level"] == "WARN" || log["level"] == "ERROR" {
                    eprintln!("service: {line}");
                }
            }
        });
        let watchdog = servers::watchdog(child.id());
        let addr = rx.recv_timeout(Duration::from_secs(60)).expect("the service starts serving");
        Service { base: format!("http://{addr}"), child, watchdog }
    }

    /// The process id (to read its memory in /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown, no flush, nothing in memory survives.
    pub fn kill(mut self) {
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
        assert!(sent.success());
        self.child.wait().expect("the service exits").code()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
