//! Runtime configuration, read once from environment variables.
//!
//! Every setting is one variable with a default that works on the local stack. The table
//! [`SETTINGS`] is the single source for parsing, for `adbeacon --help` and for the README, so the
//! three never disagree. A bad value stops start-up with a message naming the variable and the
//! accepted form.

use std::{collections::HashMap, net::IpAddr, path::PathBuf, str::FromStr, time::Duration};

/// `1` turns off the check before a re-send (see [`Config::unsafe_skip_insert_check`]): for the
/// negative-control test only; it makes uncertain INSERTs count twice.
pub const UNSAFE_SKIP_INSERT_CHECK: &str = "ADBEACON_UNSAFE_SKIP_INSERT_CHECK";

/// `1` makes the flusher drop every batch instead of inserting it (see
/// [`Config::bench_discard_events`]): the no-op sink of `make bench`; it loses every event.
pub const BENCH_DISCARD_EVENTS: &str = "ADBEACON_BENCH_DISCARD_EVENTS";

/// One documented environment variable.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The variable's name.
    pub name: &'static str,
    /// The value used when the variable is unset or empty.
    pub default: &'static str,
    /// The accepted form, as shown in errors and help.
    pub form: &'static str,
    /// What it controls.
    pub help: &'static str,
    /// Whether the value is a secret that must never be echoed.
    pub secret: bool,
}

const fn s(name: &'static str, default: &'static str, form: &'static str, help: &'static str) -> Setting {
    Setting { name, default, form, help, secret: false }
}

/// Every variable adbeacon reads, in the order `--help` shows them.
pub const SETTINGS: &[Setting] = &[
    s("HOST", "0.0.0.0", "an IP address", "address the HTTP server binds"),
    s("PORT", "8080", "a port number 0-65535 (0 = any free port)", "HTTP port"),
    s(
        "CLICKHOUSE_URL",
        "http://127.0.0.1:8123",
        "an http:// URL",
        "ClickHouse HTTP endpoint (without a user or password: CLICKHOUSE_USER and CLICKHOUSE_PASSWORD)",
    ),
    s(
        "CLICKHOUSE_DATABASE",
        "adbeacon",
        "a name of letters, digits and _, not starting with a digit",
        "database holding adbeacon's tables (created if missing)",
    ),
    s("CLICKHOUSE_USER", "default", "a user name", "ClickHouse user"),
    Setting {
        name: "CLICKHOUSE_PASSWORD",
        default: "",
        form: "any string",
        help: "ClickHouse password (never logged)",
        secret: true,
    },
    s(
        "DATA_DIR",
        "./.data/adbeacon",
        "a directory path",
        "local state: the IP-hash key, the write-ahead log (wal/), dead letters when Redis cannot take them (dead-letter/); one per instance (with ACK_MODE=wal a second process on the same directory refuses to start)",
    ),
    s(
        "ACK_MODE",
        "wal",
        "buffered, wal or committed",
        "what a 2xx means: the event is in memory (buffered), in the local write-ahead log under DATA_DIR (wal), or in ClickHouse (committed)",
    ),
    s(
        "WAL_FSYNC",
        "10ms",
        "an interval such as 10ms, or always",
        "wal mode: fsync the log at most this long after a write (answers come after the write: a process crash loses nothing, a power loss at most the interval), or before answering each group of requests (always: survives a power loss, costs about half the throughput)",
    ),
    s(
        "WAL_SEGMENT_BYTES",
        "64MiB",
        "a size from 1MiB",
        "wal mode: the log rotates to a new file at this size; files are deleted once ClickHouse holds all their events",
    ),
    s(
        "ACK_TIMEOUT",
        "10s",
        "a duration",
        "committed mode: how long a request waits for ClickHouse to confirm its events before it gets 503 (the events stay held)",
    ),
    Setting {
        name: "REDIS_URL",
        default: "redis://127.0.0.1:6379/0",
        form: "a redis:// URL (redis://:password@host:port/db), or none for no spill",
        help: "Redis holding the spill (batches ClickHouse could not take) and the dead letters; it must run with maxmemory-policy noeviction (never logged)",
        secret: true,
    },
    s(
        "REDIS_KEY_PREFIX",
        "adbeacon:",
        "letters, digits and :_-.",
        "prefix of adbeacon's Redis keys (the streams PREFIXspill and PREFIXdead-letters)",
    ),
    s(
        "SPILL_AFTER",
        "3",
        "a whole number from 1 to 100",
        "failed INSERT attempts of a batch before it moves to the Redis spill (while ClickHouse stays down, later batches move at once)",
    ),
    s(
        "REPLAY_RATE",
        "200000",
        "events per second, a whole number (0 = no limit)",
        "how fast each instance replays the spill into ClickHouse once it is back; replay also waits while live batches are due, so live ingest keeps priority",
    ),
    s(
        "REPLAY_CLAIM_IDLE",
        "2m",
        "a duration longer than INSERT_TIMEOUT",
        "a spill entry read but not acknowledged this long belongs to a replayer that died: another one ends its INSERTs and takes the entry over",
    ),
    Setting {
        name: "IP_HASH_KEY",
        default: "",
        form: "32 hex digits, or empty to generate one under DATA_DIR",
        help: "key of the client-IP hash (never logged)",
        secret: true,
    },
    s(
        "FLUSH_INTERVAL",
        "1s",
        "a duration such as 500ms, 1s, 2m",
        "oldest age of a buffered event before its batch is inserted",
    ),
    s(
        "BATCH_MAX_ROWS",
        "100000",
        "a whole number from 1 to 1000000",
        "rows per INSERT at most (a retry looks up the stored event ids of a batch, so keep batches moderate)",
    ),
    s("BATCH_MAX_BYTES", "16MiB", "a size such as 512KiB, 16MiB", "bytes per INSERT at most"),
    s(
        "BUFFER_MAX_BYTES",
        "256MiB",
        "a size such as 64MiB, 1GiB, at least BATCH_MAX_BYTES",
        "events held in memory until ClickHouse confirms them, with the client event ids kept past EVENT_IDS_MAX for them; beyond it requests get 503",
    ),
    s(
        "INSERT_TIMEOUT",
        "30s",
        "a duration",
        "time an INSERT may take to send each chunk, and to be answered, before it is retried",
    ),
    s(
        "QUERY_TIMEOUT",
        "10s",
        "a duration",
        "time any other ClickHouse call may take (catalog look-ups, readiness, retry checks)",
    ),
    s("STARTUP_TIMEOUT", "60s", "a duration", "how long start-up waits for ClickHouse to answer"),
    s(
        "SHUTDOWN_TIMEOUT",
        "30s",
        "a duration",
        "how long shutdown keeps trying to insert or spill the last batches before leaving them in the log (wal) or saving them under DATA_DIR/dead-letter",
    ),
    s("MAX_BODY_BYTES", "64KiB", "a size", "largest request body accepted"),
    s(
        "MAX_BATCH_BODY_BYTES",
        "1MiB",
        "a size such as 512KiB, 1MiB",
        "largest request body of POST /ads/events (a batch of up to 1000 events)",
    ),
    s(
        "HEADER_READ_TIMEOUT",
        "30s",
        "a duration",
        "time a client may take to send a request's headers, counted from the connection's opening or the last answer written; slower connections are closed, idle keep-alive ones too, and so are clients that stop reading an answer for this long",
    ),
    s(
        "MAX_CONNECTIONS",
        "16384",
        "a whole number from 1",
        "open client connections at most (each holds memory and a file descriptor); more wait in the listen queue until one closes; lowered at start-up to the open-file limit less 256",
    ),
    s(
        "BODY_READ_TIMEOUT",
        "30s",
        "a duration",
        "time a client may take to send a request's body once its headers are in; slower ones get 408 and are closed",
    ),
    s(
        "MAX_CLOCK_SKEW",
        "5m",
        "a duration",
        "an event whose client timestamp is further in the future than this is refused (400; a beacon's `ts` is replaced by the server's time)",
    ),
    s(
        "MAX_EVENT_AGE",
        "",
        "a duration, at most RAW_RETENTION_MONTHS; empty = RAW_RETENTION_MONTHS (28-day months)",
        "an event whose client timestamp is older than this is refused (400; a beacon's `ts` is replaced by the server's time)",
    ),
    s(
        "RAW_RETENTION_MONTHS",
        "13",
        "a whole number of months from 1 to 96",
        "raw events are kept this many months (and a week of grace), then dropped a month at a time (aggregates stay); also the longest analytics window (from/to) of one ad",
    ),
    s(
        "CATALOG_TTL",
        "30s",
        "a duration",
        "how long a known ad is served from memory before it is re-read (in the background; an ad not asked for in twice this is read again before it serves; kept while ClickHouse is down)",
    ),
    s("CATALOG_NEGATIVE_TTL", "5s", "a duration", "how long an unknown ad id stays cached as unknown"),
    Setting {
        name: "API_KEYS",
        default: "",
        form: "empty (open), or scope:key pairs separated by commas; scopes admin, read, ingest; keys of 16+ characters",
        help: "who may manage the catalog (admin) and read ads and analytics (read); never logged",
        secret: true,
    },
    s(
        "TRUSTED_PROXIES",
        "",
        "empty, or CIDR blocks separated by commas such as 10.0.0.0/8,192.168.1.10",
        "proxies (load balancers) whose X-Forwarded-For / X-Real-IP name the client; from anyone else those headers are ignored",
    ),
    s(
        "CORS_ALLOWED_ORIGINS",
        "*",
        "* or a comma-separated list of origins such as https://www.example.com",
        "web pages whose origin may send events (CORS on the tracking endpoints; other origins get 403)",
    ),
    s(
        "RATE_LIMIT",
        "500",
        "requests per second, a whole number up to 1000000000 (0 = no limit)",
        "sustained requests per second one client IP (IPv6: one /64) may make to the tracking endpoints, per instance; more get 429",
    ),
    s(
        "RATE_LIMIT_BURST",
        "1000",
        "a whole number from 1",
        "requests one client IP may make at once before RATE_LIMIT applies",
    ),
    s(
        "DEDUP_WINDOW",
        "10s",
        "a duration from 1s to 1d (0 = off)",
        "a repeat of the same ad, client IP and kind (DEDUP_KINDS) within this is stored flagged duplicate and not counted",
    ),
    s(
        "DEDUP_KINDS",
        "click",
        "event kinds separated by commas, such as click,impression",
        "the kinds DEDUP_WINDOW applies to (to apply it to none, set DEDUP_WINDOW=0)",
    ),
    s(
        "EVENT_IDS_MAX",
        "1000000",
        "a whole number from 1 to 100000000",
        "client event ids remembered at most, so that a retry is answered but stored once (about 55 bytes each); as many again, or as many as BUFFER_MAX_BYTES holds events, are kept for the retries of requests answered without a 2xx, and ids whose events wait to be stored are kept beyond both",
    ),
    s(
        "EVENT_ID_TTL",
        "1h",
        "a duration from 1m to 1d",
        "how long a client event id is remembered after it was taken (one whose request got no 2xx: after its event is stored)",
    ),
    s(
        "BOT_USER_AGENTS",
        "",
        "user-agent fragments separated by commas, matched ignoring case",
        "more bot user agents, besides the built-in list; their events are stored flagged bot and not counted",
    ),
    s(
        "SEED_DEMO_ADS",
        "true",
        "true or false",
        "insert the three demo ads into an empty catalog at start-up",
    ),
    s("LOG_FORMAT", "json", "json or pretty", "log line format on stdout"),
    s("LOG_LEVEL", "info", "a tracing filter such as info or adbeacon=debug,info", "log verbosity"),
];

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (for log shippers).
    Json,
    /// Human-readable, coloured when on a terminal.
    Pretty,
}

/// Where and how to reach ClickHouse.
#[derive(Debug, Clone)]
pub struct ClickHouseConfig {
    /// HTTP endpoint, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    /// Database holding adbeacon's tables.
    pub database: String,
    /// User name.
    pub user: String,
    /// Password; never logged (see the `Debug` impl of [`Config`]).
    pub password: String,
}

/// The validated configuration of one adbeacon process.
#[derive(Clone)]
pub struct Config {
    /// Address the HTTP server binds.
    pub host: IpAddr,
    /// HTTP port; 0 picks a free one (tests).
    pub port: u16,
    /// ClickHouse connection.
    pub clickhouse: ClickHouseConfig,
    /// Local state directory.
    pub data_dir: PathBuf,
    /// Configured IP-hash key; `None` means load or generate one under `data_dir`.
    pub ip_hash_key: Option<[u8; 16]>,
    /// What a 2xx means.
    pub ack_mode: crate::ingest::AckMode,
    /// When the write-ahead log is fsynced.
    pub wal_fsync: crate::ingest::FsyncPolicy,
    /// Size at which the write-ahead log begins a new segment.
    pub wal_segment_bytes: u64,
    /// `committed` mode: how long a request waits for ClickHouse.
    pub ack_timeout: Duration,
    /// Redis for the spill and the dead letters; `None` (`REDIS_URL=none`) = no spill.
    pub redis_url: Option<String>,
    /// Prefix of adbeacon's Redis keys.
    pub redis_key_prefix: String,
    /// Failed INSERT attempts before a batch is spilled.
    pub spill_after: u32,
    /// Events replayed per second per instance at most (0 = no limit).
    pub replay_rate: u64,
    /// Idle time after which a pending spill entry is claimed.
    pub replay_claim_idle: Duration,
    /// The negative control of the exactly-once tests: re-sends skip the check of what is
    /// stored, so that a test can show it sees the duplicates this causes. Read from
    /// [`UNSAFE_SKIP_INSERT_CHECK`], deliberately not a documented setting.
    pub unsafe_skip_insert_check: bool,
    /// The no-op sink of `make bench`: batches are confirmed without being sent anywhere, so
    /// that the benchmark can put the cost of storing events next to the rest of the service.
    /// Read from [`BENCH_DISCARD_EVENTS`], deliberately not a documented setting.
    pub bench_discard_events: bool,
    /// Oldest age of a buffered event before its batch is flushed.
    pub flush_interval: Duration,
    /// Rows per INSERT at most.
    pub batch_max_rows: usize,
    /// Bytes per INSERT at most.
    pub batch_max_bytes: usize,
    /// Bytes of events held in memory (buffered or in flight) before requests get 503.
    pub buffer_max_bytes: usize,
    /// Time an INSERT may take (per chunk sent, and for the answer).
    pub insert_timeout: Duration,
    /// Time any other ClickHouse call may take.
    pub query_timeout: Duration,
    /// How long start-up waits for ClickHouse.
    pub startup_timeout: Duration,
    /// How long shutdown retries the last batches.
    pub shutdown_timeout: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest body of a batch.
    pub max_batch_body_bytes: usize,
    /// Time a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// MAX_CONNECTIONS: open client connections at most.
    pub max_connections: usize,
    /// Time a client may take to send a request's body (slow-body clients hold a connection and
    /// a handler otherwise).
    pub body_read_timeout: Duration,
    /// Future skew tolerated in client timestamps.
    pub max_clock_skew: Duration,
    /// Age tolerated in client timestamps.
    pub max_event_age: Duration,
    /// Sustained tracking requests per second per client IP; 0 means no limit.
    pub rate_limit: u32,
    /// Tracking requests per client IP at once.
    pub rate_limit_burst: u32,
    /// Window of the repeat rule; zero turns it off.
    pub dedup_window: Duration,
    /// Kinds the repeat rule applies to.
    pub dedup_kinds: Vec<crate::domain::EventKind>,
    /// EVENT_IDS_MAX: client event ids remembered at most, and as many again (or a buffer's
    /// worth) kept for retries; beyond both only ids whose events wait to be stored.
    pub event_ids_max: usize,
    /// EVENT_ID_TTL: how long a client event id is remembered.
    pub event_id_ttl: Duration,
    /// User-agent fragments flagged as bots besides the built-in ones.
    pub bot_user_agents: Vec<String>,
    /// Months raw events are kept; the longest custom analytics window.
    pub raw_retention_months: u32,
    /// How long a known ad is served before it is re-read.
    pub catalog_ttl: Duration,
    /// TTL of an unknown ad id in the catalog cache.
    pub catalog_negative_ttl: Duration,
    /// API keys and their scopes; empty means open.
    pub api_keys: crate::api::auth::ApiKeys,
    /// Proxies whose forwarding headers name the client.
    pub trusted_proxies: crate::api::client_ip::TrustedProxies,
    /// Origins whose pages may call the tracking endpoints.
    pub cors_allowed_origins: crate::api::cors::AllowedOrigins,
    /// Seed the demo ads into an empty catalog.
    pub seed_demo_ads: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
}

impl std::fmt::Debug for Config {
    // Written by hand so that secrets can never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("clickhouse_url", &self.clickhouse.url)
            .field("clickhouse_database", &self.clickhouse.database)
            .field("clickhouse_user", &self.clickhouse.user)
            .field("data_dir", &self.data_dir)
            .field("ack_mode", &self.ack_mode)
            .field("redis", &self.redis_url.as_ref().map(|_| "<set>"))
            .field("redis_key_prefix", &self.redis_key_prefix)
            .field("spill_after", &self.spill_after)
            .field("replay_rate", &self.replay_rate)
            .field("replay_claim_idle", &self.replay_claim_idle)
            .field("flush_interval", &self.flush_interval)
            .field("batch_max_rows", &self.batch_max_rows)
            .field("batch_max_bytes", &self.batch_max_bytes)
            .field("buffer_max_bytes", &self.buffer_max_bytes)
            .field("seed_demo_ads", &self.seed_demo_ads)
            .finish_non_exhaustive()
    }
}

/// A variable whose value cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid {name}{shown}: expected {form} ({reason})")]
pub struct ConfigError {
    /// The variable.
    pub name: &'static str,
    shown: String,
    form: &'static str,
    reason: String,
}

/// Reads variables through a lookup function, so tests can pass a map instead of the process environment.
struct Reader<F> {
    lookup: F,
}

impl<F: Fn(&str) -> Option<String>> Reader<F> {
    fn get<T>(
        &self,
        name: &'static str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let setting =
            SETTINGS.iter().find(|s| s.name == name).expect("every variable read is listed in SETTINGS");
        let raw = (self.lookup)(name).filter(|v| !v.trim().is_empty());
        let value = raw.as_deref().unwrap_or(setting.default).trim();
        parse(value).map_err(|reason| ConfigError {
            name,
            shown: if setting.secret { String::new() } else { format!("={:?}", without_credentials(value)) },
            form: setting.form,
            reason,
        })
    }
}

/// `value` with a URL's user name and password (`scheme://user:password@host…`) left out: a refused
/// value is echoed in the error.
fn without_credentials(value: &str) -> std::borrow::Cow<'_, str> {
    if let Some((scheme, rest)) = value.split_once("://") {
        let authority = rest.split('/').next().unwrap_or(rest);
        if let Some(at) = authority.rfind('@') {
            return format!("{scheme}://…@{}", &rest[at + 1..]).into();
        }
    }
    value.into()
}

fn parse_from_str<T: FromStr>(v: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.parse::<T>().map_err(|e| e.to_string())
}

/// Parses a duration like `500ms`, `1s`, `2m`, `7d`.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(v).map_err(|e| e.to_string())?;
    if d > MAX_DURATION {
        // Deadlines are the clock plus a setting: a value meant as "never" overflowed there and
        // panicked every connection (HEADER_READ_TIMEOUT), the flusher (FLUSH_INTERVAL) or the
        // shutdown's drain (SHUTDOWN_TIMEOUT).
        return Err("longer than 100 years".to_string());
    }
    Ok(d)
}

/// The longest duration a setting takes.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A duration as a setting is written (`364d`, `90m`, `30s`, `500ms`): in the largest unit that
/// holds it whole. humantime's own formatting counts in months of 30.44 days, so MAX_EVENT_AGE's
/// default of 13 28-day months read `11months 29days 3h 50m 24s`.
pub fn format_duration(d: Duration) -> String {
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    if nanos != 0 {
        return if nanos % 1_000_000 == 0 && secs < 1_000_000 {
            format!("{}ms", d.as_millis())
        } else {
            humantime::format_duration(d).to_string()
        };
    }
    match secs {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Parses a byte size like `64KiB`, `16MiB`, `1GiB`, `512KB` or a plain number of bytes.
pub fn parse_size(v: &str) -> Result<usize, String> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let n: usize = digits.parse().map_err(|_| "no leading number".to_string())?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown unit {other:?}")),
    };
    n.checked_mul(mult).ok_or_else(|| "too large".to_string())
}

/// The non-empty items of a comma-separated list.
fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|i| !i.is_empty())
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("not a boolean".into()),
    }
}

fn positive<T: PartialOrd + Default>(v: T) -> Result<T, String> {
    if v > T::default() { Ok(v) } else { Err("must be greater than zero".into()) }
}

fn parse_key(v: &str) -> Result<Option<[u8; 16]>, String> {
    if v.is_empty() {
        return Ok(None);
    }
    crate::iphash::decode_key(v).map(Some).ok_or_else(|| format!("{} characters, not 32 hex digits", v.len()))
}

fn parse_url(v: &str) -> Result<String, String> {
    // The clickhouse client is built without TLS: reach a TLS-only ClickHouse through a local
    // proxy, or add the crate's rustls feature.
    let rest = v.strip_prefix("http://").ok_or("scheme must be http (TLS is not built in)")?;
    if rest.trim_end_matches('/').is_empty() {
        return Err("no host".into());
    }
    // The HTTP client would not send them (it logs in with CLICKHOUSE_USER), and the URL is
    // logged: a password there would be ignored and printed.
    if rest.split('/').next().is_some_and(|authority| authority.contains('@')) {
        return Err(
            "a user name or password in the URL is not used; set CLICKHOUSE_USER and CLICKHOUSE_PASSWORD"
                .into(),
        );
    }
    Ok(v.trim_end_matches('/').to_string())
}

/// A tracing filter whose every directive names a level: `info`, `adbeacon=debug,info`. The
/// filter's own parser takes a word that is no level (`warning`) for a target, and would then log
/// nothing else, errors included.
fn parse_log_level(v: &str) -> Result<String, String> {
    for directive in v.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, level)| level).trim();
        if level.is_empty() || level.parse::<tracing::level_filters::LevelFilter>().is_err() {
            return Err(format!(
                "{directive:?} names no level; use trace, debug, info, warn, error or off (or 5 to 0)"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(v).map(|_| v.to_string()).map_err(|e| e.to_string())
}

fn parse_identifier(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !v.as_bytes()[0].is_ascii_digit();
    if ok { Ok(v.to_string()) } else { Err("not a plain identifier".into()) }
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration from explicit pairs; unset variables take their defaults.
    pub fn from_vars<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        Self::from_lookup(|name| map.get(name).cloned())
    }

    /// Reads the configuration through `lookup`, which returns a variable's value if it is set.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let r = Reader { lookup };
        let dur = parse_duration;
        let pos_dur = |v: &str| parse_duration(v).and_then(positive);
        let pos_size = |v: &str| parse_size(v).and_then(positive);
        let mut config = Config {
            host: r.get("HOST", parse_from_str)?,
            port: r.get("PORT", parse_from_str)?,
            clickhouse: ClickHouseConfig {
                url: r.get("CLICKHOUSE_URL", parse_url)?,
                database: r.get("CLICKHOUSE_DATABASE", parse_identifier)?,
                user: r.get("CLICKHOUSE_USER", |v| Ok(v.to_string()))?,
                password: r.get("CLICKHOUSE_PASSWORD", |v| Ok(v.to_string()))?,
            },
            data_dir: r.get("DATA_DIR", |v| Ok(PathBuf::from(v)))?,
            ip_hash_key: r.get("IP_HASH_KEY", parse_key)?,
            ack_mode: r.get("ACK_MODE", |v| {
                crate::ingest::AckMode::from_name(&v.to_ascii_lowercase())
                    .ok_or_else(|| "unknown mode".into())
            })?,
            wal_fsync: r.get("WAL_FSYNC", |v| {
                if v.eq_ignore_ascii_case("always") {
                    Ok(crate::ingest::FsyncPolicy::EveryGroup)
                } else {
                    pos_dur(v).map(crate::ingest::FsyncPolicy::Interval)
                }
            })?,
            wal_segment_bytes: r.get("WAL_SEGMENT_BYTES", |v| {
                parse_size(v)
                    .and_then(|n| if n >= 1 << 20 { Ok(n as u64) } else { Err("less than 1MiB".into()) })
            })?,
            ack_timeout: r.get("ACK_TIMEOUT", pos_dur)?,
            redis_url: r.get("REDIS_URL", |v| {
                if v.eq_ignore_ascii_case("none") {
                    return Ok(None);
                }
                crate::store::Redis::new(v, Duration::from_secs(1)).map(|_| Some(v.to_string()))
            })?,
            redis_key_prefix: r.get("REDIS_KEY_PREFIX", |v| {
                if !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || ":_-.".contains(c)) {
                    Ok(v.to_string())
                } else {
                    Err("use letters, digits and :_-.".into())
                }
            })?,
            spill_after: r.get("SPILL_AFTER", |v| {
                parse_from_str(v)
                    .and_then(positive)
                    .and_then(|n: u32| if n <= 100 { Ok(n) } else { Err("more than 100".into()) })
            })?,
            replay_rate: r.get("REPLAY_RATE", parse_from_str)?,
            replay_claim_idle: r.get("REPLAY_CLAIM_IDLE", pos_dur)?,
            unsafe_skip_insert_check: (r.lookup)(UNSAFE_SKIP_INSERT_CHECK).is_some_and(|v| v == "1"),
            bench_discard_events: (r.lookup)(BENCH_DISCARD_EVENTS).is_some_and(|v| v == "1"),
            flush_interval: r.get("FLUSH_INTERVAL", pos_dur)?,
            // A retry fetches the stored event ids of the batch; a million of them is 16 MB.
            batch_max_rows: r.get("BATCH_MAX_ROWS", |v| {
                parse_from_str(v)
                    .and_then(positive)
                    .and_then(|n: usize| if n <= 1_000_000 { Ok(n) } else { Err("more than 1000000".into()) })
            })?,
            batch_max_bytes: r.get("BATCH_MAX_BYTES", pos_size)?,
            buffer_max_bytes: r.get("BUFFER_MAX_BYTES", pos_size)?,
            insert_timeout: r.get("INSERT_TIMEOUT", pos_dur)?,
            query_timeout: r.get("QUERY_TIMEOUT", pos_dur)?,
            startup_timeout: r.get("STARTUP_TIMEOUT", pos_dur)?,
            // Zero would send every buffered batch of `buffered` and `committed` mode straight to
            // a dead-letter file at each shutdown, without trying ClickHouse or the spill.
            shutdown_timeout: r.get("SHUTDOWN_TIMEOUT", pos_dur)?,
            max_body_bytes: r.get("MAX_BODY_BYTES", pos_size)?,
            max_batch_body_bytes: r.get("MAX_BATCH_BODY_BYTES", pos_size)?,
            header_read_timeout: r.get("HEADER_READ_TIMEOUT", pos_dur)?,
            max_connections: r.get("MAX_CONNECTIONS", |v| parse_from_str::<usize>(v).and_then(positive))?,
            body_read_timeout: r.get("BODY_READ_TIMEOUT", pos_dur)?,
            max_clock_skew: r.get("MAX_CLOCK_SKEW", dur)?,
            max_event_age: r
                .get("MAX_EVENT_AGE", |v| if v.is_empty() { Ok(Duration::ZERO) } else { pos_dur(v) })?,
            rate_limit: r.get("RATE_LIMIT", |v| {
                parse_from_str(v).and_then(|n: u32| {
                    if n <= 1_000_000_000 { Ok(n) } else { Err("more than 1000000000".into()) }
                })
            })?,
            rate_limit_burst: r.get("RATE_LIMIT_BURST", |v| parse_from_str(v).and_then(positive))?,
            dedup_window: r.get("DEDUP_WINDOW", |v| {
                let d = dur(v)?;
                if d.is_zero() || (Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&d) {
                    Ok(d)
                } else {
                    Err("must be 0 (off) or from 1s to 1d".into())
                }
            })?,
            dedup_kinds: r.get("DEDUP_KINDS", |v| {
                list(v)
                    .map(|k| {
                        crate::domain::EventKind::from_name(k).ok_or_else(|| format!("unknown kind {k:?}"))
                    })
                    .collect()
            })?,
            event_ids_max: r.get("EVENT_IDS_MAX", |v| {
                parse_from_str(v).and_then(positive).and_then(|n: usize| {
                    if n <= 100_000_000 { Ok(n) } else { Err("more than 100000000".into()) }
                })
            })?,
            event_id_ttl: r.get("EVENT_ID_TTL", |v| {
                let d = dur(v)?;
                if (Duration::from_secs(60)..=Duration::from_secs(86_400)).contains(&d) {
                    Ok(d)
                } else {
                    Err("must be from 1m to 1d".into())
                }
            })?,
            bot_user_agents: r.get("BOT_USER_AGENTS", |v| Ok(list(v).map(String::from).collect()))?,
            raw_retention_months: r.get("RAW_RETENTION_MONTHS", |v| {
                parse_from_str(v)
                    .and_then(positive)
                    // ClickHouse refuses an INSERT whose rows fall in more than 100 monthly
                    // partitions (max_partitions_per_insert_block): with a longer window a batch
                    // of clients' late events could reach that and be retried for ever.
                    .and_then(|n: u32| if n <= 96 { Ok(n) } else { Err("more than 96".into()) })
            })?,
            catalog_ttl: r.get("CATALOG_TTL", pos_dur)?,
            catalog_negative_ttl: r.get("CATALOG_NEGATIVE_TTL", dur)?,
            api_keys: r.get("API_KEYS", crate::api::auth::ApiKeys::parse)?,
            trusted_proxies: r.get("TRUSTED_PROXIES", crate::api::client_ip::TrustedProxies::parse)?,
            cors_allowed_origins: r.get("CORS_ALLOWED_ORIGINS", crate::api::cors::AllowedOrigins::parse)?,
            seed_demo_ads: r.get("SEED_DEMO_ADS", parse_bool)?,
            log_format: r.get("LOG_FORMAT", |v| match v.to_ascii_lowercase().as_str() {
                "json" => Ok(LogFormat::Json),
                "pretty" | "text" => Ok(LogFormat::Pretty),
                _ => Err("unknown format".into()),
            })?,
            log_level: r.get("LOG_LEVEL", parse_log_level)?,
        };
        if config.buffer_max_bytes < config.batch_max_bytes {
            return Err(ConfigError {
                name: "BUFFER_MAX_BYTES",
                shown: format!("={}", config.buffer_max_bytes),
                form: "a size at least BATCH_MAX_BYTES",
                reason: "the buffer must hold at least one full batch".into(),
            });
        }
        // A replayer whose INSERT is merely slow must not count as dead: its entries are claimed
        // only once every INSERT it may have sent has timed out.
        if config.replay_claim_idle <= config.insert_timeout {
            return Err(ConfigError {
                name: "REPLAY_CLAIM_IDLE",
                shown: format!("={}", format_duration(config.replay_claim_idle)),
                form: "a duration longer than INSERT_TIMEOUT",
                reason: "a replayer still waiting for its INSERT would be taken for dead".into(),
            });
        }
        // Raw retention drops whole months older than RAW_RETENTION_MONTHS; an event accepted with
        // an older time would land in a month that is (or soon is) dropped.
        let retained = Duration::from_secs(u64::from(config.raw_retention_months) * 28 * 86_400);
        if config.max_event_age.is_zero() {
            config.max_event_age = retained;
        }
        if config.max_event_age > retained {
            return Err(ConfigError {
                name: "MAX_EVENT_AGE",
                shown: format!("={}", format_duration(config.max_event_age)),
                form: "a duration no longer than RAW_RETENTION_MONTHS (counted as 28-day months)",
                reason: format!(
                    "events that old would be dropped by raw retention ({} months)",
                    config.raw_retention_months
                ),
            });
        }
        Ok(config)
    }

    /// The text of `adbeacon --help`: subcommands and every variable with its default.
    pub fn help_text() -> String {
        let mut out = String::from(
            "adbeacon: video-ad tracking and analytics on ClickHouse\n\n\
             USAGE:\n    adbeacon [serve|migrate|openapi]\n\n\
             COMMANDS:\n\
             \x20   serve     apply migrations, then serve HTTP until SIGINT/SIGTERM (the default)\n\
             \x20   migrate   apply pending ClickHouse migrations and exit\n\
             \x20   openapi   print the OpenAPI specification (YAML) and exit\n\n\
             ENVIRONMENT (name, default, meaning):\n",
        );
        let width = SETTINGS.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for s in SETTINGS {
            let default = if s.default.is_empty() { "(empty)" } else { s.default };
            out.push_str(&format!("    {:width$}  {:22}  {}\n", s.name, default, s.help, width = width));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_shown_as_settings_are_written() {
        let ms = Duration::from_millis;
        for (d, text) in [
            (Duration::from_secs(13 * 28 * 86_400), "364d"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(7_200), "2h"),
            (Duration::from_secs(90), "90s"),
            (Duration::ZERO, "0s"),
            (ms(500), "500ms"),
            (ms(1_500), "1500ms"),
        ] {
            assert_eq!(format_duration(d), text);
            // What is shown reads back as the same setting.
            assert_eq!(parse_duration(text), Ok(d), "{text}");
        }
        assert_eq!(format_duration(Duration::from_nanos(1_500)), "1us 500ns");
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_vars(Vec::<(String, String)>::new()).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.clickhouse.url, "http://127.0.0.1:8123");
        assert_eq!(c.flush_interval, Duration::from_secs(1));
        assert_eq!(c.batch_max_bytes, 16 << 20);
        assert!(c.seed_demo_ads);
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn redis_url_none_turns_the_spill_off() {
        // Empty means the default, as for every variable; `none` is the explicit off.
        for unset in ["", "  "] {
            let c = Config::from_vars([("REDIS_URL", unset)]).unwrap();
            assert_eq!(c.redis_url.as_deref(), Some("redis://127.0.0.1:6379/0"));
        }
        for off in ["none", "NONE"] {
            assert_eq!(Config::from_vars([("REDIS_URL", off)]).unwrap().redis_url, None, "{off:?}");
        }
        assert!(Config::from_vars([("REDIS_URL", "http://x")]).is_err());
        let c = Config::from_vars([("REDIS_URL", "redis://10.0.0.5:6380/1")]).unwrap();
        assert_eq!(c.redis_url.as_deref(), Some("redis://10.0.0.5:6380/1"));
    }

    #[test]
    fn bad_values_name_the_variable_and_form() {
        let e = Config::from_vars([("PORT", "eighty")]).unwrap_err().to_string();
        assert!(e.contains("PORT=\"eighty\"") && e.contains("port number"), "{e}");
        let e = Config::from_vars([("FLUSH_INTERVAL", "soon")]).unwrap_err().to_string();
        assert!(e.contains("FLUSH_INTERVAL") && e.contains("duration"), "{e}");
        for name in ["HEADER_READ_TIMEOUT", "FLUSH_INTERVAL", "SHUTDOWN_TIMEOUT", "CATALOG_TTL"] {
            let e = Config::from_vars([(name, "18446744073709551615s")]).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("100 years"), "{e}");
        }
        let e = Config::from_vars([("BUFFER_MAX_BYTES", "12 parsecs")]).unwrap_err().to_string();
        assert!(e.contains("BUFFER_MAX_BYTES") && e.contains("unknown unit"), "{e}");
        let e = Config::from_vars([("CLICKHOUSE_URL", "tcp://x")]).unwrap_err().to_string();
        assert!(e.contains("CLICKHOUSE_URL"), "{e}");
        let e = Config::from_vars([("CLICKHOUSE_URL", "http://adbeacon:s3cret@ch:8123")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CLICKHOUSE_PASSWORD") && e.contains("http://…@ch:8123") && !e.contains("s3cret"),
            "{e}"
        );
        for zero in ["SHUTDOWN_TIMEOUT", "STARTUP_TIMEOUT"] {
            let e = Config::from_vars([(zero, "0s")]).unwrap_err().to_string();
            assert!(e.contains(zero) && e.contains("greater than zero"), "{e}");
        }
        for level in ["warning", "adbeacon=verbose", "info,err"] {
            let e = Config::from_vars([("LOG_LEVEL", level)]).unwrap_err().to_string();
            assert!(e.contains("LOG_LEVEL") && e.contains("names no level"), "{e}");
        }
        for level in ["WARN", "adbeacon=debug,info", "hyper=off, info", "3", "adbeacon=4"] {
            assert_eq!(Config::from_vars([("LOG_LEVEL", level)]).unwrap().log_level, level);
        }
        let e = Config::from_vars([("SEED_DEMO_ADS", "maybe")]).unwrap_err().to_string();
        assert!(e.contains("SEED_DEMO_ADS") && e.contains("true or false"), "{e}");
        let e = Config::from_vars([("BATCH_MAX_ROWS", "0")]).unwrap_err().to_string();
        assert!(e.contains("greater than zero"), "{e}");
        let e = Config::from_vars([("RAW_RETENTION_MONTHS", "0")]).unwrap_err().to_string();
        assert!(e.contains("RAW_RETENTION_MONTHS"), "{e}");
        let e = Config::from_vars([("RAW_RETENTION_MONTHS", "2"), ("MAX_EVENT_AGE", "60d")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MAX_EVENT_AGE") && e.contains("raw retention"), "{e}");
        assert!(Config::from_vars([("RAW_RETENTION_MONTHS", "3"), ("MAX_EVENT_AGE", "60d")]).is_ok());
        assert!(Config::from_vars([("RAW_RETENTION_MONTHS", "96")]).is_ok());
        let e = Config::from_vars([("RAW_RETENTION_MONTHS", "97")]).unwrap_err().to_string();
        assert!(e.contains("more than 96"), "{e}");
    }

    #[test]
    fn secrets_are_not_echoed() {
        let e = Config::from_vars([("IP_HASH_KEY", "hunter2")]).unwrap_err().to_string();
        assert!(e.contains("IP_HASH_KEY") && !e.contains("hunter2"), "{e}");
        let c = Config::from_vars([("CLICKHOUSE_PASSWORD", "s3cret")]).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn traffic_settings_parse_and_refuse_nonsense() {
        let c = Config::from_vars::<&str, &str>([]).unwrap();
        assert_eq!((c.rate_limit, c.rate_limit_burst, c.dedup_window), (500, 1000, Duration::from_secs(10)));
        assert_eq!(c.dedup_kinds, vec![crate::domain::EventKind::Click]);
        assert_eq!(c.max_event_age, Duration::from_secs(13 * 28 * 86_400), "the raw retention");
        let c =
            Config::from_vars([("DEDUP_KINDS", "click, firstQuartile"), ("BOT_USER_AGENTS", "Foo ,bar,")])
                .unwrap();
        assert_eq!(c.dedup_kinds.len(), 2);
        assert_eq!(c.bot_user_agents, vec!["Foo".to_string(), "bar".to_string()]);
        for (name, value) in [
            ("DEDUP_KINDS", "clicks"),
            ("DEDUP_WINDOW", "500ms"),
            ("DEDUP_WINDOW", "2d"),
            ("RATE_LIMIT", "2000000000"),
            ("RATE_LIMIT_BURST", "0"),
            ("EVENT_IDS_MAX", "0"),
            ("EVENT_IDS_MAX", "200000000"),
            ("EVENT_ID_TTL", "30s"),
            ("EVENT_ID_TTL", "2d"),
        ] {
            let e = Config::from_vars([(name, value)]).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        assert!(Config::from_vars([("DEDUP_WINDOW", "0")]).unwrap().dedup_window.is_zero());
        let c = Config::from_vars([("EVENT_IDS_MAX", "5000"), ("EVENT_ID_TTL", "10m")]).unwrap();
        assert_eq!((c.event_ids_max, c.event_id_ttl), (5000, Duration::from_secs(600)));
    }

    #[test]
    fn sizes_and_keys_parse() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("2MB").unwrap(), 2_000_000);
        assert_eq!(parse_size("100").unwrap(), 100);
        let key = parse_key("000102030405060708090a0b0c0d0e0f").unwrap().unwrap();
        assert_eq!(key[15], 15);
    }

    #[test]
    fn help_lists_every_variable_with_its_default() {
        let help = Config::help_text();
        for s in SETTINGS {
            assert!(help.contains(s.name), "{} missing", s.name);
        }
        assert!(help.contains("serve") && help.contains("migrate") && help.contains("openapi"));
    }
}
