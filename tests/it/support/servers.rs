//! Real `clickhouse-server` and `redis-server` processes for the integration tests.
//!
//! Each server runs on free loopback ports with its own temporary directory, so tests never touch a
//! server they did not start (a developer's ClickHouse on 8123 or 18123 stays alone). Ordinary tests
//! share one instance per test binary through [`shared_clickhouse`] and [`shared_redis`] and isolate
//! themselves by database or key prefix; fault tests start their own and stop, kill and restart them.
//!
//! libtest never drops statics and a test process can die without unwinding, so every server gets a
//! watchdog `sh` process that kills it (and removes its directory) once the test process is gone.
//!
//! Starting, stopping and restarting block the calling thread (ClickHouse takes 1 to 3 s to stop on
//! SIGTERM). A test that drives the app on its own runtime while it injects faults should use
//! `#[tokio::test(flavor = "multi_thread")]`, so the app keeps running while the test thread waits.

use std::env;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Embedded so the tests run the exact configuration `make run` uses.
const CONFIG_TEMPLATE: &str = include_str!("../../../clickhouse/local/config.xml");
const USERS_TEMPLATE: &str = include_str!("../../../clickhouse/local/users.xml");

/// Generous: ClickHouse 18.16 is ready in well under a second, but CI machines can be slow and busy.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERM gets before SIGKILL; ClickHouse 18.16 needs about 1 s plus, when a client holds
/// an idle keep-alive connection, up to [`TEST_KEEP_ALIVE_TIMEOUT`].
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Fresh ports are tried this often when another process grabs ours between probe and bind.
const START_ATTEMPTS: usize = 3;
/// Seconds ClickHouse keeps an idle HTTP connection open, overriding the template's value in tests.
/// After SIGTERM, ClickHouse 18.16 refuses new connections but keeps serving open keep-alive ones and
/// only exits once they have idled this long; the template's 10 s would make every `stop()` take 10 s
/// while the app holds a pooled connection (the clickhouse crate never closes idle ones itself).
/// 3 s is ClickHouse's own default and stays above the crate's 2 s pool idle timeout, so the app
/// never reuses a connection the server is about to close.
const TEST_KEEP_ALIVE_TIMEOUT: &str = "3";
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Lines of each log file shown when a server fails to start.
const LOG_TAIL_LINES: usize = 40;

/// Polls every 0.5 s whether the test process ($1) is alive; when it is gone, SIGKILLs the server ($2),
/// waits for it to die and removes its directory ($3). Exits as soon as the server is gone.
/// `alive` treats a zombie as dead: orphans go to an init that may reap them late, and `kill -0`
/// alone would still see them. Builtins apart from `sleep`, so a poll costs one fork.
const WATCHDOG_SCRIPT: &str = r#"p=$1 s=$2 d=$3
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [ -r "/proc/$1/status" ] || return 0
  while IFS= read -r line; do
    case $line in State:*Z*) return 1 ;; State:*) return 0 ;; esac
  done < "/proc/$1/status"
  return 0
}
while kill -0 "$s" 2>/dev/null; do
  if ! alive "$p"; then
    kill -KILL "$s" 2>/dev/null
    i=0
    while alive "$s" && [ "$i" -lt 20 ]; do sleep 0.5; i=$((i + 1)); done
    [ -n "$d" ] && rm -rf -- "$d"
    exit 0
  fi
  sleep 0.5
done"#;

/// A watchdog that SIGKILLs `pid` once this test process is gone (a test killed mid-run never
/// drops its handles): for the adbeacon processes tests start. Kill it when the process is
/// stopped another way.
pub fn watchdog(pid: u32) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg("adbeacon-test-watchdog")
        .arg(std::process::id().to_string())
        .arg(pid.to_string())
        .arg("")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("spawning the watchdog shell `sh`: {err}"))
}

/// The ClickHouse every ordinary test shares; tests isolate themselves with their own database.
pub fn shared_clickhouse() -> &'static ClickHouse {
    static SHARED: OnceLock<ClickHouse> = OnceLock::new();
    SHARED.get_or_init(ClickHouse::start)
}

/// The Redis every ordinary test shares; tests isolate themselves with their own key prefix.
pub fn shared_redis() -> &'static Redis {
    static SHARED: OnceLock<Redis> = OnceLock::new();
    SHARED.get_or_init(Redis::start)
}

/// The spill under `prefix` on the shared Redis, as the service's flusher and replayer reach it.
pub fn spill_on_shared_redis(prefix: &str) -> adbeacon::ingest::spill::Spill {
    let client =
        adbeacon::store::redis::Redis::new(&shared_redis().url(), std::time::Duration::from_secs(2)).unwrap();
    adbeacon::ingest::spill::Spill::new(
        std::sync::Arc::new(client),
        adbeacon::ingest::spill::Keys::new(prefix),
    )
}

/// A `clickhouse-server` owned by the test: killed on drop, its data directory removed with it.
pub struct ClickHouse {
    binary: PathBuf,
    http_port: u16,
    tcp_port: u16,
    /// Sent back in the `X-ClickHouse-Server-Display-Name` header, so readiness checks cannot
    /// mistake another server that grabbed our port for ours.
    display_name: Option<String>,
    // Declared before `dir`: fields drop in order, so the server is dead before its directory goes.
    process: Supervised,
    dir: TempDir,
}

impl ClickHouse {
    /// Starts a server on free loopback ports with a fresh data directory and waits until it answers.
    ///
    /// Panics with the tail of the server's logs when it does not come up, and with install
    /// instructions when `clickhouse-server` is not installed.
    pub fn start() -> ClickHouse {
        let binary = find_binary("clickhouse-server");
        let dir = tempfile::Builder::new()
            .prefix("adbeacon-clickhouse-")
            .tempdir()
            .expect("create a temporary directory for clickhouse-server");
        let mut server = ClickHouse {
            binary,
            http_port: 0,
            tcp_port: 0,
            display_name: None,
            process: Supervised::default(),
            dir,
        };
        let mut failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let [http_port, tcp_port] = free_ports();
            server.http_port = http_port;
            server.tcp_port = tcp_port;
            match server.launch() {
                Ok(()) => return server,
                Err(StartError::PortTaken(why)) => failure = why,
                Err(StartError::Failed(why)) => panic!("{why}"),
            }
        }
        panic!("clickhouse-server lost its ports to other processes {START_ATTEMPTS} times; last: {failure}")
    }

    /// The HTTP port, which is what the app and [`ClickHouse::query`] use.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The HTTP endpoint, e.g. `http://127.0.0.1:34567`, as the app's ClickHouse URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Makes table `db.table` look created `by` ago in `system.tables` (its
    /// `metadata_modification_time` is its metadata file's mtime): a lock left that long ago.
    pub fn backdate_table(&self, db: &str, table: &str, by: Duration) {
        let file = self.dir.path().join("data/metadata").join(db).join(format!("{table}.sql"));
        let then = std::time::SystemTime::now() - by;
        File::options()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_modified(then))
            .unwrap_or_else(|e| panic!("backdate {}: {e}", file.display()));
    }

    /// Whether the server answers `GET /ping` right now.
    pub fn ping(&self) -> bool {
        matches!(http_get(self.http_port, "/ping"), Ok((200, _, body)) if body.trim() == "Ok.")
    }

    /// Whether the server process is still alive (it may not answer yet, or any more).
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Stops the server as an operator would: SIGTERM, then SIGKILL if it is not gone within 10 s.
    ///
    /// Between the signal and the exit, ClickHouse 18.16 resets new connections but still answers
    /// queries on open keep-alive ones, and exits only once those have idled 3 s: a client that keeps
    /// querying on one connection keeps it alive until the SIGKILL.
    pub fn stop(&mut self) {
        self.process.terminate();
    }

    /// Kills the server with SIGKILL, like a crash or the OOM killer, and waits until it is gone.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel and requests are
    /// buffered, but nothing answers until [`ClickHouse::thaw`] (a hung server, a long GC pause).
    pub fn freeze(&self) {
        self.process.signal("STOP");
    }

    /// Lets a frozen server run on (SIGCONT): it then processes what it received meanwhile.
    pub fn thaw(&self) {
        self.process.signal("CONT");
    }

    /// Starts the server again on the same ports and data directory (stopping it first if it still
    /// runs) and waits until it answers, so data written before survives.
    pub fn restart(&mut self) {
        self.process.terminate();
        match self.launch() {
            Ok(()) => {}
            Err(StartError::PortTaken(why) | StartError::Failed(why)) => {
                panic!("restarting clickhouse-server: {why}")
            }
        }
    }

    /// Runs `sql` over HTTP in the `default` database and returns the response body.
    ///
    /// Panics with ClickHouse's error text when the query fails.
    pub async fn query(&self, sql: &str) -> String {
        self.post(None, sql).await
    }

    /// Runs `sql` over HTTP in `database` and returns the response body.
    ///
    /// Panics with ClickHouse's error text when the query fails.
    pub async fn query_in(&self, database: &str, sql: &str) -> String {
        self.post(Some(database), sql).await
    }

    async fn post(&self, database: Option<&str>, sql: &str) -> String {
        let mut url = reqwest::Url::parse(&self.url()).expect("a valid ClickHouse URL");
        if let Some(database) = database {
            url.query_pairs_mut().append_pair("database", database);
        }
        // A fresh client per call: pooled connections are driven by tasks on the runtime that opened
        // them, and every #[tokio::test] has its own runtime, so a client kept in the shared server
        // would hand later tests connections whose runtime is gone. No idle connections either: an
        // open one delays a SIGTERMed ClickHouse's exit (see TEST_KEEP_ALIVE_TIMEOUT).
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("build an HTTP client");
        let response = client
            .post(url)
            .body(sql.to_owned())
            .send()
            .await
            .unwrap_or_else(|err| panic!("ClickHouse at {} unreachable for `{sql}`: {err}", self.url()));
        let status = response.status();
        let body = response
            .text()
            .await
            .unwrap_or_else(|err| panic!("reading ClickHouse's answer to `{sql}`: {err}"));
        if status != reqwest::StatusCode::OK {
            panic!("ClickHouse answered {status} to `{sql}`: {}", body.trim_end());
        }
        body
    }

    /// Writes the configuration for the current ports, spawns the server and waits until it is ours
    /// and ready.
    fn launch(&mut self) -> Result<(), StartError> {
        let dir = self.dir.path();
        let (config, display_name) = render_clickhouse_config(dir, self.http_port, self.tcp_port);
        self.display_name = display_name;
        fs::create_dir_all(dir.join("log")).expect("create the clickhouse log directory");
        fs::write(dir.join("config.xml"), config).expect("write clickhouse config.xml");
        fs::write(dir.join("users.xml"), USERS_TEMPLATE).expect("write clickhouse users.xml");

        let mut command = Command::new(&self.binary);
        command
            .arg(format!("--config-file={}", dir.join("config.xml").display()))
            .current_dir(dir)
            // Newer releases fork a watchdog parent; a single process is what we can signal and reap.
            .env("CLICKHOUSE_WATCHDOG_ENABLE", "0");
        self.process = Supervised::spawn(command, dir, "clickhouse-server.out");

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.process.exited() {
                let logs = self.log_tail();
                let why = format!(
                    "clickhouse-server on 127.0.0.1:{} exited during startup ({status}); logs:\n{logs}",
                    self.http_port
                );
                return Err(if logs.contains("Address already in use") {
                    StartError::PortTaken(why)
                } else {
                    StartError::Failed(why)
                });
            }
            if self.ping() {
                if self.answers_as_ours() {
                    return Ok(());
                }
                self.process.kill();
                return Err(StartError::PortTaken(format!(
                    "another server answers on 127.0.0.1:{}",
                    self.http_port
                )));
            }
            if Instant::now() >= deadline {
                self.process.kill();
                return Err(StartError::Failed(format!(
                    "clickhouse-server on 127.0.0.1:{} was not ready within {READY_TIMEOUT:?}; logs:\n{}",
                    self.http_port,
                    self.log_tail()
                )));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn answers_as_ours(&self) -> bool {
        let Some(expected) = &self.display_name else {
            return true;
        };
        let header = format!("x-clickhouse-server-display-name: {}", expected.to_ascii_lowercase());
        matches!(
            http_get(self.http_port, "/?query=SELECT%201"),
            Ok((200, head, _)) if head.to_ascii_lowercase().lines().any(|line| line.trim() == header)
        )
    }

    fn log_tail(&self) -> String {
        let dir = self.dir.path();
        [
            dir.join("clickhouse-server.out"),
            dir.join("log/clickhouse-server.err.log"),
            dir.join("log/clickhouse-server.log"),
        ]
        .iter()
        .map(|path| tail(path))
        .collect()
    }
}

/// The server time zone of the test ClickHouse (the local stack uses UTC).
pub const TEST_SERVER_TIMEZONE: &str = "Asia/Kolkata";

/// Fills in the template's placeholders, sets [`TEST_SERVER_TIMEZONE`], shortens the keep-alive timeout (see
/// [`TEST_KEEP_ALIVE_TIMEOUT`]) and, when the template names no server, adds a display name unique to
/// this test process and port.
fn render_clickhouse_config(dir: &Path, http_port: u16, tcp_port: u16) -> (String, Option<String>) {
    let mut config = CONFIG_TEMPLATE
        .replace("@HTTP_PORT@", &http_port.to_string())
        .replace("@TCP_PORT@", &tcp_port.to_string())
        .replace("@DIR@", &dir.display().to_string());
    const OPEN: &str = "<keep_alive_timeout>";
    if let Some(start) = config.find(OPEN).map(|at| at + OPEN.len())
        && let Some(len) = config[start..].find("</keep_alive_timeout>")
    {
        config.replace_range(start..start + len, TEST_KEEP_ALIVE_TIMEOUT);
    }
    // A server time zone with a half-hour offset: every hour and day bucket must still be UTC,
    // because the columns say DateTime('UTC') and the SQL binds unix seconds, never local text.
    let config =
        config.replace("<timezone>UTC</timezone>", &format!("<timezone>{TEST_SERVER_TIMEZONE}</timezone>"));
    if config.contains("<display_name>") {
        return (config, None);
    }
    let name = format!("adbeacon-it-{}-{http_port}", std::process::id());
    let config = config.replace("</yandex>", &format!("    <display_name>{name}</display_name>\n</yandex>"));
    (config, Some(name))
}

/// A `redis-server` owned by the test, with append-only persistence so data survives restarts.
pub struct Redis {
    binary: PathBuf,
    port: u16,
    // Declared before `dir`: fields drop in order, so the server is dead before its directory goes.
    process: Supervised,
    dir: TempDir,
}

impl Redis {
    /// Starts a server on a free loopback port with a fresh directory and waits until it answers.
    ///
    /// Panics with the tail of the server's log when it does not come up, and with install
    /// instructions when `redis-server` is not installed.
    pub fn start() -> Redis {
        let binary = find_binary("redis-server");
        let dir = tempfile::Builder::new()
            .prefix("adbeacon-redis-")
            .tempdir()
            .expect("create a temporary directory for redis-server");
        let mut server = Redis { binary, port: 0, process: Supervised::default(), dir };
        let mut failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let [port] = free_ports();
            server.port = port;
            match server.launch() {
                Ok(()) => return server,
                Err(StartError::PortTaken(why)) => failure = why,
                Err(StartError::Failed(why)) => panic!("{why}"),
            }
        }
        panic!("redis-server lost its port to other processes {START_ATTEMPTS} times; last: {failure}")
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection URL, e.g. `redis://127.0.0.1:34567/0`, as the app's Redis URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Whether the server answers `PING` with `PONG` right now.
    pub fn ping(&self) -> bool {
        matches!(resp_command(self.port, &["PING"]), Ok(Reply::Simple(pong)) if pong == "PONG")
    }

    /// Runs one command and renders the reply as `redis-cli` would print it raw: bulk strings as they
    /// are, integers in decimal, nil as `(nil)`, array elements one per line.
    ///
    /// Panics when the server is unreachable or answers with an error.
    pub fn command(&self, args: &[&str]) -> String {
        match resp_command(self.port, args) {
            Ok(reply) => reply.render(),
            Err(err) => panic!("Redis on port {} failed `{}`: {err}", self.port, args.join(" ")),
        }
    }

    /// Whether the server process is still alive (it may not answer yet, or any more).
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Stops the server as an operator would: SIGTERM, then SIGKILL if it is not gone within 10 s.
    pub fn stop(&mut self) {
        self.process.terminate();
    }

    /// Kills the server with SIGKILL, like a crash or the OOM killer, and waits until it is gone.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel, nothing answers
    /// until [`Redis::thaw`] (a Redis behind a network that drops packets).
    pub fn freeze(&self) {
        self.process.signal("STOP");
    }

    /// Lets a frozen server run on (SIGCONT).
    pub fn thaw(&self) {
        self.process.signal("CONT");
    }

    /// Starts the server again on the same port and directory (stopping it first if it still runs)
    /// and waits until it has loaded its append-only file and answers.
    pub fn restart(&mut self) {
        self.process.terminate();
        match self.launch() {
            Ok(()) => {}
            Err(StartError::PortTaken(why) | StartError::Failed(why)) => {
                panic!("restarting redis-server: {why}")
            }
        }
    }

    fn launch(&mut self) -> Result<(), StartError> {
        let dir = self.dir.path();
        let mut command = Command::new(&self.binary);
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args(["--save", "", "--appendonly", "yes"])
            .args(["--maxmemory-policy", "noeviction", "--daemonize", "no"])
            .current_dir(dir);
        self.process = Supervised::spawn(command, dir, "redis.log");
        let pid = self.process.pid().expect("redis-server was just spawned");

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.process.exited() {
                let logs = tail(&dir.join("redis.log"));
                let why = format!(
                    "redis-server on 127.0.0.1:{} exited during startup ({status}); log:\n{logs}",
                    self.port
                );
                return Err(if logs.contains("Address already in use") {
                    StartError::PortTaken(why)
                } else {
                    StartError::Failed(why)
                });
            }
            // INFO rather than PING: PING answers while the append-only file is still loading, and
            // the process id tells our server from another one that grabbed the port.
            if let Ok(Reply::Bulk(Some(info))) = resp_command(self.port, &["INFO"]) {
                let field = |name: &str| {
                    info.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
                };
                if field("process_id") != Some(pid.to_string().as_str()) {
                    self.process.kill();
                    return Err(StartError::PortTaken(format!(
                        "another server answers on 127.0.0.1:{}",
                        self.port
                    )));
                }
                if field("loading") == Some("0") {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                self.process.kill();
                return Err(StartError::Failed(format!(
                    "redis-server on 127.0.0.1:{} was not ready within {READY_TIMEOUT:?}; log:\n{}",
                    self.port,
                    tail(&dir.join("redis.log"))
                )));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

/// Why a start attempt failed: a lost port race is worth another try on fresh ports, anything else
/// is not.
enum StartError {
    PortTaken(String),
    Failed(String),
}

/// A server process and the watchdog that kills it if the test process dies first.
#[derive(Default)]
struct Supervised {
    server: Option<Child>,
    watchdog: Option<Child>,
}

impl Supervised {
    /// Spawns `command` with its output appended to `log_name` in `dir` (appended, so a restart
    /// keeps the earlier run's lines), plus its watchdog.
    fn spawn(mut command: Command, dir: &Path, log_name: &str) -> Supervised {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(log_name))
            .expect("open the server's output file");
        let log_err = log.try_clone().expect("clone the server's output file handle");
        let server = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|err| panic!("spawning {command:?}: {err}"));
        // The watchdog holds none of our pipes, so an orphaned one never keeps a reader waiting.
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("adbeacon-test-watchdog")
            .arg(std::process::id().to_string())
            .arg(server.id().to_string())
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let watchdog = match watchdog {
            Ok(watchdog) => watchdog,
            Err(err) => {
                let mut server = server;
                let _ = server.kill();
                let _ = server.wait();
                panic!("spawning the watchdog shell `sh`: {err}");
            }
        };
        Supervised { server: Some(server), watchdog: Some(watchdog) }
    }

    fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// Sends `signal` (such as `STOP` or `CONT`) to the server.
    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the server runs");
        let sent = Command::new("sh")
            .args(["-c", "kill -s \"$1\" \"$2\"", "sh", signal, &pid.to_string()])
            .status()
            .expect("sh runs");
        assert!(sent.success(), "kill -s {signal} {pid} failed");
    }

    fn is_running(&mut self) -> bool {
        self.server.as_mut().is_some_and(|server| matches!(server.try_wait(), Ok(None)))
    }

    /// The exit status if the server has exited (reaping it), `None` while it runs.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.server.as_mut()?.try_wait().ok().flatten()
    }

    /// SIGTERM through `kill`, as an init system would send it; SIGKILL after [`STOP_TIMEOUT`].
    fn terminate(&mut self) {
        // The watchdog goes first, so it can never signal a reused pid after the server is reaped.
        self.stop_watchdog();
        let Some(mut server) = self.server.take() else {
            return;
        };
        if matches!(server.try_wait(), Ok(None)) {
            // The shell's builtin `kill`: present wherever `sh` is, unlike procps' /usr/bin/kill.
            let _ = Command::new("sh")
                .args(["-c", "kill -TERM \"$1\"", "sh"])
                .arg(server.id().to_string())
                .status();
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(server.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(POLL_INTERVAL);
            }
        }
        let _ = server.kill();
        let _ = server.wait();
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        self.stop_watchdog();
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    fn stop_watchdog(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Looks for `name` on PATH, then in /usr/sbin and /usr/bin, where Debian puts server binaries even
/// when a user's PATH lacks them.
fn find_binary(name: &str) -> PathBuf {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        // Absolute, because the server is spawned in its own directory and a relative PATH entry
        // would then point elsewhere.
        .filter_map(|dir| std::path::absolute(dir.join(name)).ok())
        .find(|candidate| {
            fs::metadata(candidate).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} not found (looked on PATH, /usr/sbin, /usr/bin). Install it with \
                 `apt-get update && apt-get install -y {name}`, or run `make test`, which installs it."
            )
        })
}

/// `N` distinct free loopback ports: all listeners are held at once so the kernel cannot hand out
/// the same port twice. Another process may still take one before the server binds it; callers
/// retry on that.
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [TcpListener; N] =
        std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"));
    listeners.map(|listener| listener.local_addr().expect("a bound port").port())
}

/// The last lines of a log file, headed by its name; a note if it cannot be read.
fn tail(path: &Path) -> String {
    let text = match File::open(path) {
        Ok(mut file) => {
            let mut bytes = Vec::new();
            match file.read_to_end(&mut bytes) {
                Ok(_) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(err) => format!("(unreadable: {err})"),
            }
        }
        Err(err) => format!("(unreadable: {err})"),
    };
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    format!("--- {} ---\n{}\n", path.display(), lines[start..].join("\n"))
}

/// A blocking HTTP/1.0 GET on loopback, for readiness checks that must not need a runtime.
/// Returns the status, the head and the body.
fn http_get(port: u16, target: &str) -> io::Result<(u16, String, String)> {
    let mut stream = connect(port)?;
    write!(stream, "GET {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no end of HTTP head"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status"))?;
    Ok((status, head.to_owned(), body.to_owned()))
}

fn connect(port: u16) -> io::Result<TcpStream> {
    let stream =
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// A RESP reply; errors are returned as `Err` by [`resp_command`].
enum Reply {
    Simple(String),
    Integer(i64),
    Bulk(Option<String>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    fn render(&self) -> String {
        match self {
            Reply::Simple(text) | Reply::Bulk(Some(text)) => text.clone(),
            Reply::Integer(value) => value.to_string(),
            Reply::Bulk(None) | Reply::Array(None) => "(nil)".to_owned(),
            Reply::Array(Some(items)) => items.iter().map(Reply::render).collect::<Vec<_>>().join("\n"),
        }
    }
}

/// Sends one command over a fresh connection and reads its reply. The dev-dependencies have no Redis
/// client, and the few commands the support needs do not warrant one.
fn resp_command(port: u16, args: &[&str]) -> io::Result<Reply> {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    let mut stream = connect(port)?;
    stream.write_all(request.as_bytes())?;
    read_reply(&mut BufReader::new(stream))
}

fn read_reply(reader: &mut impl BufRead) -> io::Result<Reply> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at_checked(1).ok_or_else(|| invalid("empty reply".into()))?;
    let number = || rest.parse::<i64>().map_err(|_| invalid(format!("bad RESP line {line:?}")));
    match kind {
        "+" => Ok(Reply::Simple(rest.to_owned())),
        "-" => Err(io::Error::other(format!("Redis error: {rest}"))),
        ":" => Ok(Reply::Integer(number()?)),
        "$" => match usize::try_from(number()?) {
            Err(_) => Ok(Reply::Bulk(None)),
            Ok(len) => {
                let mut bytes = vec![0; len + 2];
                reader.read_exact(&mut bytes)?;
                bytes.truncate(len);
                Ok(Reply::Bulk(Some(String::from_utf8_lossy(&bytes).into_owned())))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Ok(Reply::Array(None)),
            Ok(len) => (0..len)
                .map(|_| read_reply(reader))
                .collect::<io::Result<Vec<_>>>()
                .map(|items| Reply::Array(Some(items))),
        },
        _ => Err(invalid(format!("unknown RESP reply {line:?}"))),
    }
}
