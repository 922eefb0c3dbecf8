//! `App::build` wires the clients, caches, tasks and routes; `run_until` serves until a shutdown
//! signal and then shuts down in order: stop accepting, finish in-flight requests, flush every
//! buffered event, return.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    api::{self, State},
    config::Config,
    ingest::{
        AckMode, Buffer, DeadLetters, Flusher, Health, Intake, Keys, Limits, Replayer, Spill, Wal, WalConfig,
    },
    iphash::IpHasher,
    metrics::Metrics,
    server,
    store::{Analytics, Catalog, ClickHouse, Redis, StoreError, Timeouts, migrate, retention},
};

/// Why the service could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// ClickHouse was unreachable or refused the schema.
    #[error("ClickHouse: {0}")]
    Store(#[from] StoreError),
    /// A socket or file could not be used.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Shutdown could not keep every acknowledged event (or its flusher failed): the exit status
    /// says so, rather than a clean 0.
    #[error("shutdown: {0}")]
    Shutdown(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AppError {
    let context = context.into();
    move |source| AppError::Io { context, source }
}

/// Connections the kernel may queue before they are accepted. tokio's `bind` asks for 1024; a
/// burst of players connecting at once (the old service's test opens 10,000) overflows that, and
/// each dropped SYN costs its client a retransmit 1 s and 3 s later. The kernel caps the request
/// at `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: u32 = 65_535;

/// A listening socket on `addr` with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As tokio's `bind` does: a restart can take the port while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How long in-flight requests may take to finish once shutdown begins.
const REQUEST_GRACE: Duration = Duration::from_secs(10);

/// A built service, bound to its port, not yet serving.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: Arc<State>,
    /// Answers with the events lost once the flusher's thread is done (an error when it
    /// panicked).
    flusher: oneshot::Receiver<u64>,
    wal: Option<Wal>,
    stop_flusher: CancellationToken,
    /// Answers once the replay thread is done (an error when it panicked).
    replayer: Option<oneshot::Receiver<()>>,
    stop_replayer: CancellationToken,
    retention: JoinHandle<()>,
    stop_retention: CancellationToken,
    header_read_timeout: Duration,
    max_connections: usize,
    shutdown_timeout: Duration,
}

/// File descriptors kept for everything but client connections: ClickHouse's and Redis's
/// connections, the log's segments, dead-letter files, the replay thread's pool.
const RESERVED_FDS: usize = 256;

/// MAX_CONNECTIONS, lowered to what the process's open-file limit (its soft limit raised to the
/// hard one first, [`raise_open_files`]) leaves after [`RESERVED_FDS`] (where
/// `/proc/self/limits` says it), so that connections cannot take the descriptors the pipeline
/// needs.
fn connection_limit(configured: usize) -> usize {
    raise_open_files();
    let soft = std::fs::read_to_string("/proc/self/limits").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse::<usize>().ok()
    });
    match soft {
        Some(files) if configured > files.saturating_sub(RESERVED_FDS) => {
            let limit = files.saturating_sub(RESERVED_FDS).max(1);
            tracing::warn!(
                max_connections = configured,
                open_files = files,
                limit,
                "MAX_CONNECTIONS is above what the open-file limit leaves; raise the limit (ulimit -n) to allow more"
            );
            limit
        }
        _ => configured,
    }
}

/// Raises the open-file soft limit to the hard one, as Go's runtime does for the services this
/// one replaces. Container runtimes start processes with a soft limit of 1,024 (containerd 2,
/// Docker 25 and later under systemd) and a far higher hard one: left as it is, it capped
/// connections at 768, and at that cap the kubelet's probes wait behind clients.
fn raise_open_files() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(files) => tracing::debug!(open_files = files, "raised the open-file limit to the hard limit"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit; connections stay capped by it")
        }
    }
}

/// The buffer `config` describes.
fn buffer(config: &Config, metrics: Arc<Metrics>) -> Arc<Buffer> {
    Arc::new(Buffer::new(
        Limits {
            max_bytes: config.buffer_max_bytes,
            batch_rows: config.batch_max_rows,
            batch_bytes: config.batch_max_bytes,
            // In `committed` mode every buffered event has a request waiting for it: a batch is
            // due at once, and the rows that arrive while one INSERT runs make the next batch.
            max_age: if config.ack_mode == AckMode::Committed {
                Duration::ZERO
            } else {
                config.flush_interval
            },
        },
        metrics,
    ))
}

/// Opens the write-ahead log in `wal` mode, or in another mode when an earlier run left one
/// (its events are owed: they are sent, and the log deleted, but new events bypass it). Its
/// events are back in `buffer` when this returns.
async fn open_wal(
    config: &Config,
    buffer: &Arc<Buffer>,
    metrics: &Arc<Metrics>,
) -> Result<Option<Wal>, AppError> {
    let dir = config.data_dir.join("wal");
    if config.ack_mode != AckMode::Wal && !crate::ingest::wal::has_segments(&dir) {
        return Ok(None);
    }
    let wal_config =
        WalConfig { dir: dir.clone(), segment_bytes: config.wal_segment_bytes, fsync: config.wal_fsync };
    let context = format!("write-ahead log under DATA_DIR ({})", dir.display());
    metrics.wal_segment_max_bytes.set(i64::try_from(config.wal_segment_bytes).unwrap_or(i64::MAX));
    let (wal, recovery) =
        Wal::open(wal_config, buffer.clone(), metrics.clone()).await.map_err(io(context))?;
    if recovery.fresh_events + recovery.uncertain_events > 0 || recovery.corrupt_bytes > 0 {
        tracing::info!(
            segments = recovery.segments,
            fresh = recovery.fresh_events,
            uncertain_batches = recovery.uncertain_batches,
            uncertain = recovery.uncertain_events,
            confirmed = recovery.confirmed_events,
            corrupt_bytes = recovery.corrupt_bytes,
            "recovered events acknowledged before the last stop from the local log"
        );
    }
    if config.ack_mode != AckMode::Wal {
        tracing::warn!(
            mode = config.ack_mode.name(),
            "an earlier run left a write-ahead log: its events are sent, then the log is deleted"
        );
        return Ok(Some(wal.recovery_only()));
    }
    Ok(Some(wal))
}

/// How long one Redis call may take: long enough for a busy Redis, short enough that a frozen
/// one costs the flusher little before it keeps the batch and moves on.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// The spill `config` describes; `None` when REDIS_URL is `none`. Connects lazily.
fn spill(config: &Config) -> Option<Arc<Spill>> {
    let url = config.redis_url.as_ref()?;
    let redis = Redis::new(url, REDIS_TIMEOUT).expect("REDIS_URL was checked with the configuration");
    Some(Arc::new(Spill::new(Arc::new(redis), Keys::new(&config.redis_key_prefix))))
}

/// The flusher thread's nice value. Its INSERTs come in bursts (encoding and compressing a
/// second's rows, in pieces of about half a millisecond); at the workers' nice value, a worker
/// woken by a request while such a piece runs could wait for the piece to end, which put the
/// click's p99 at half of saturation up (pinned to one core as in `make bench`, 10 alternating
/// rounds against the same build at nice 0: median 0.94 against 1.15 ms, ahead in 7). At 5 it
/// still gets a quarter of a busy core, several times what it needs: the batch endpoint into
/// ClickHouse stored as much. At 10 the p99 gained more (0.76 against 1.12 ms, set from
/// outside), but the flusher fell behind at that saturation (13 % fewer events stored).
const FLUSH_NICE: i32 = 5;

/// The replayer's nice value: replaying a backlog can wait for live requests, and the replay
/// rate falls only while the workers keep every core busy.
const REPLAY_NICE: i32 = 10;

/// Runs `work` to its end on a new thread named `name` at nice value `nice` (lower priority than
/// the workers, which serve requests), with a runtime of its own; the receiver answers with its
/// output (an error when the thread panicked). The thread is never joined: a shutdown waits on
/// the receiver within its budget, and a thread still in an INSERT past it does not hold the
/// process up.
fn on_own_thread<T: Send + 'static>(
    name: &str,
    nice: i32,
    work: impl Future<Output = T> + Send + 'static,
) -> std::io::Result<oneshot::Receiver<T>> {
    let (done, finished) = oneshot::channel();
    let thread = name.to_string();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        // On Linux the nice value is the thread's own, and a thread may always lower its own
        // priority. Failing that (a sandbox that forbids it), the thread runs at the workers'.
        if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice) {
            tracing::warn!(thread, nice, error = %e, "cannot lower the thread's priority");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for a pipeline thread");
        let _ = done.send(runtime.block_on(work));
    })?;
    Ok(finished)
}

/// Builds the shared state from parts that need no I/O beyond what the caller already did.
fn state(
    config: &Config,
    clickhouse: ClickHouse,
    hasher: IpHasher,
    metrics: Arc<Metrics>,
    intake: Intake,
    spill: Option<Arc<Spill>>,
) -> Arc<State> {
    let catalog =
        Catalog::new(clickhouse.clone(), metrics.clone(), config.catalog_ttl, config.catalog_negative_ttl);
    let (buffer, charged) = (intake.buffer.clone(), intake.buffer.clone());
    let event_ids = Arc::new(
        api::event_ids::EventIds::new(
            config.event_ids_max,
            config.event_id_ttl,
            move || buffer.confirmed_below(),
            metrics.event_ids(),
        )
        .keeping(config.buffer_max_bytes / crate::store::EventRow::SIZE)
        // The ids kept past EVENT_IDS_MAX are there for the buffer's events: their memory
        // counts against BUFFER_MAX_BYTES.
        .charging(move |bytes| charged.set_ids_bytes(bytes)),
    );
    Arc::new(State {
        intake,
        catalog,
        analytics: Analytics::new(clickhouse.clone()),
        clickhouse,
        hasher,
        metrics,
        raw_retention_months: config.raw_retention_months,
        max_clock_skew: config.max_clock_skew,
        max_event_age: config.max_event_age,
        retry_after: config.flush_interval.as_secs().max(1),
        body_limit: config.max_body_bytes,
        batch_body_limit: config.max_batch_body_bytes,
        body_read_timeout: config.body_read_timeout,
        cors: config.cors_allowed_origins.clone(),
        api_keys: Arc::new(config.api_keys.clone()),
        trusted_proxies: config.trusted_proxies.clone(),
        event_ids,
        user_agents: crate::domain::UserAgentFilter::new(&config.bot_user_agents),
        dedup: Arc::new(api::dedup::DedupWindow::new(config.dedup_window, &config.dedup_kinds)),
        rate_limiter: api::ratelimit::RateLimiter::new(config.rate_limit, config.rate_limit_burst),
        dead_letters: DeadLetters::new(&config.data_dir, spill.clone()),
        spill,
        insert_health: Arc::new(Health::default()),
    })
}

/// The OpenAPI document as YAML, built without touching the network or the disk.
pub fn openapi_yaml(config: &Config) -> String {
    let ch = ClickHouse::detached(&config.clickhouse);
    let metrics = Arc::new(Metrics::new());
    let intake = Intake::buffered(buffer(config, metrics.clone()));
    let st = state(config, ch, IpHasher::new([0; 16]), metrics, intake, None);
    api::openapi(st).spec_yaml()
}

/// Connects to ClickHouse (waiting up to STARTUP_TIMEOUT) and applies every pending migration
/// (`adbeacon migrate`).
pub async fn connect_and_migrate(config: &Config) -> Result<(ClickHouse, Vec<u32>), AppError> {
    let ch = connect(config).await?;
    let applied = migrate::apply(&ch).await?;
    ch.enable_dedup().await?;
    Ok((ch, applied))
}

/// Connects to ClickHouse, waiting up to STARTUP_TIMEOUT.
async fn connect(config: &Config) -> Result<ClickHouse, AppError> {
    let timeouts = Timeouts { insert: config.insert_timeout, query: config.query_timeout };
    Ok(ClickHouse::connect(&config.clickhouse, config.startup_timeout, timeouts).await?)
}

impl App {
    /// Connects, migrates, seeds, starts the flusher and binds `HOST:PORT`.
    pub async fn build(config: Config) -> Result<App, AppError> {
        let mut clickhouse = connect(&config).await?;
        migrate::apply_at_startup(&clickhouse).await?;
        clickhouse.enable_dedup().await?;
        if config.bench_discard_events {
            tracing::error!(
                "{} is set: events are acknowledged and then discarded, never stored (the no-op sink of `make bench`; never in production)",
                crate::config::BENCH_DISCARD_EVENTS
            );
            clickhouse = clickhouse.discarding();
        }
        let metrics = Arc::new(Metrics::new());
        let hasher = IpHasher::load_or_create(&config.data_dir, config.ip_hash_key)
            .map_err(io(format!("IP-hash key under DATA_DIR {}", config.data_dir.display())))?;
        let buffer = buffer(&config, metrics.clone());
        let wal = open_wal(&config, &buffer, &metrics).await?;
        let intake = Intake {
            buffer,
            wal: wal.clone().filter(|_| config.ack_mode == AckMode::Wal),
            commit_timeout: (config.ack_mode == AckMode::Committed).then_some(config.ack_timeout),
        };
        if config.unsafe_skip_insert_check {
            tracing::error!(
                "{} is set: re-sent batches are not checked and may be stored twice (a test's negative control; never in production)",
                crate::config::UNSAFE_SKIP_INSERT_CHECK
            );
        }
        let spill = spill(&config);
        if let Some(spill) = &spill {
            // Not required at start-up (it matters only once ClickHouse fails), but an operator
            // should learn at once that it is missing or may evict.
            let _ = spill.check().await;
        } else {
            tracing::warn!(
                "REDIS_URL is none: no spill; while ClickHouse is down events wait in memory (and the local log) until the buffer is full"
            );
        }
        let state = state(&config, clickhouse.clone(), hasher, metrics.clone(), intake, spill.clone());
        // Events the log brought back are held: a client retrying one (most likely after the
        // crash that left it there, its 2xx lost) gets the duplicate answer, as it would have from
        // the instance before, not a second copy under another batch token. In `committed` mode
        // the answer waits until they are in ClickHouse, as a repeat's does.
        let (ids, seqs) = state.intake.buffer.held_event_ids();
        state.event_ids.remember(ids, &seqs);
        if config.api_keys.is_open() {
            tracing::warn!(
                "API_KEYS is empty: anyone who can reach this service may create, change and retire ads and \
                 read analytics; set API_KEYS (scope:key pairs) in production"
            );
        }
        if config.seed_demo_ads {
            state.catalog.seed_demo_ads_if_empty().await?;
        }
        match state.catalog.warm().await {
            Ok(n) => tracing::info!(ads = n, "cached the active ads"),
            Err(e) => tracing::warn!(error = %e, "cannot cache the active ads; they are read on first use"),
        }
        let stop_flusher = CancellationToken::new();
        // The flusher runs on a thread and runtime of its own, with its own ClickHouse pool and
        // Redis connection (a connection's driver lives on the runtime that opened it, and this
        // one ends before the process does). Encoding and compressing an INSERT, a chunk of
        // about 2,500 rows at a time, then never holds up a worker that serves requests: the OS
        // interleaves the threads (the click's p99 at half of saturation: docs/PERFORMANCE.md).
        let flusher_spill = spill.as_ref().map(|spill| Arc::new(spill.separate()));
        let flusher = Flusher {
            buffer: state.intake.buffer.clone(),
            clickhouse: clickhouse.separate(&config.clickhouse),
            metrics: metrics.clone(),
            dead_letters: DeadLetters::new(&config.data_dir, flusher_spill.clone()),
            shutdown_timeout: config.shutdown_timeout,
            wal: wal.clone(),
            spill: flusher_spill,
            spill_after: config.spill_after,
            health: state.insert_health.clone(),
            unsafe_skip_check: config.unsafe_skip_insert_check,
            retention_months: config.raw_retention_months,
        };
        let flusher = on_own_thread("adbeacon-flush", FLUSH_NICE, flusher.run(stop_flusher.clone()))
            .map_err(io("starting the flusher thread"))?;
        let stop_replayer = CancellationToken::new();
        // The replayer likewise, for its INSERTs (measured in make bench-replay).
        let replayer = spill.map(|spill| {
            let replayer = Replayer {
                spill: Arc::new(spill.separate()),
                clickhouse: clickhouse.separate(&config.clickhouse),
                metrics,
                health: state.insert_health.clone(),
                buffer: state.intake.buffer.clone(),
                consumer: crate::ingest::replay::consumer_name(),
                max_rows: config.batch_max_rows,
                rate: config.replay_rate,
                claim_idle: config.replay_claim_idle,
                insert_timeout: config.insert_timeout,
                unsafe_skip_check: config.unsafe_skip_insert_check,
                retention_months: config.raw_retention_months,
            };
            on_own_thread("adbeacon-replay", REPLAY_NICE, replayer.run(stop_replayer.clone()))
        });
        let replayer = replayer.transpose().map_err(io("starting the replay thread"))?;
        let stop_retention = CancellationToken::new();
        let retention = tokio::spawn(retention::run(
            state.clickhouse.clone(),
            config.raw_retention_months,
            state.metrics.clone(),
            stop_retention.clone(),
        ));
        // Ends with the retention task (the same token): it holds nothing to finish.
        tokio::spawn(state.event_ids.clone().tidy_every(stop_retention.child_token()));
        let addr = SocketAddr::new(config.host, config.port);
        let listener = listen(addr).map_err(io(format!("cannot listen on {addr} (set HOST/PORT)")))?;
        let local_addr = listener.local_addr().map_err(io("listening socket"))?;
        let header_read_timeout = config.header_read_timeout;
        let max_connections = connection_limit(config.max_connections);
        let shutdown_timeout = config.shutdown_timeout;
        Ok(App {
            listener,
            local_addr,
            state,
            flusher,
            wal,
            stop_flusher,
            replayer,
            stop_replayer,
            retention,
            stop_retention,
            header_read_timeout,
            max_connections,
            shutdown_timeout,
        })
    }

    /// The address the server is bound to (useful with PORT=0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then flushes every buffered event and returns.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AppError> {
        tracing::info!(addr = %self.local_addr, "serving HTTP");
        let metrics = self.state.metrics.clone();
        let limits = server::Limits {
            header_read_timeout: self.header_read_timeout,
            max_connections: self.max_connections,
            shutdown_grace: REQUEST_GRACE,
            on_slow_headers: {
                let metrics = metrics.clone();
                Arc::new(move || metrics.request_rejected(crate::metrics::RejectReason::HeaderTimeout))
            },
            on_malformed: Arc::new(move || {
                metrics.request_rejected(crate::metrics::RejectReason::MalformedHttp)
            }),
        };
        let served = server::serve(self.listener, api::routes(self.state.clone()), shutdown, limits).await;
        tracing::info!("stopped accepting requests; flushing buffered events");
        // The budget the flusher keeps to; the replayer's thread is waited for no longer.
        let budget_ends = std::time::Instant::now() + self.shutdown_timeout;
        self.stop_retention.cancel();
        // The replayer finishes the INSERT it is in; what it has not acknowledged stays pending
        // for another replayer (or this one after a restart) to claim.
        self.stop_replayer.cancel();
        self.state.intake.buffer.close();
        self.stop_flusher.cancel();
        let flushed = match self.flusher.await {
            Ok(0) => Ok(()),
            Ok(lost) => Err(AppError::Shutdown(format!(
                "{lost} acknowledged events could be kept nowhere before SHUTDOWN_TIMEOUT ran out"
            ))),
            // The sender went away without a word: the thread panicked (and said why on stderr).
            Err(_) => {
                tracing::error!("the flusher thread failed during shutdown");
                Err(AppError::Shutdown("the flusher thread failed".into()))
            }
        };
        if let Some(replayer) = self.replayer {
            // A replay INSERT under way may take up to INSERT_TIMEOUT: past the budget the process
            // ends without it. Its entries stay pending; the replayer that claims them ends the
            // INSERT and checks what it stored, as for a replayer that died.
            let left =
                budget_ends.saturating_duration_since(std::time::Instant::now()).max(Duration::from_secs(1));
            match tokio::time::timeout(left, replayer).await {
                Ok(Ok(())) => {}
                // The sender went away without a word: the thread panicked.
                Ok(Err(_)) => tracing::error!("the replayer thread failed during shutdown"),
                Err(_) => tracing::warn!(
                    "the replayer is still in an INSERT at the end of the shutdown budget; leaving it (its spill entries stay pending for another replayer)"
                ),
            }
        }
        // Last: the flusher logs batch tokens and confirmations until it is done.
        if let Some(wal) = &self.wal {
            wal.close().await;
        }
        // It stops between two DROPs (see `retention::drop_expired`); one in flight is bounded by
        // QUERY_TIMEOUT.
        if let Err(e) = self.retention.await {
            tracing::error!(error = %e, "the raw-retention task failed");
        }
        served.map_err(io("HTTP server"))?;
        flushed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tracking::Hot;

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
        // As a container runtime starts a process (nextest runs each test in its own).
        rlimit::Resource::NOFILE.set(hard.min(1024), hard).unwrap();
        let configured = usize::try_from(hard).unwrap_or(usize::MAX).min(1 << 20);
        let limit = connection_limit(configured);
        assert_eq!(rlimit::Resource::NOFILE.get().unwrap(), (hard, hard));
        assert_eq!(limit, configured.min(usize::try_from(hard).unwrap_or(usize::MAX) - RESERVED_FDS));
    }

    /// The front endpoint serves the hot routes by itself and names each by its operation id,
    /// which labels its metrics: each id must be the operation that the spec serves on that
    /// method and path, and the path must be one the front endpoint takes as hot.
    #[test]
    fn every_hot_route_is_the_operation_the_spec_serves_there() {
        let config = Config::from_lookup(|_| None).expect("the defaults make a config");
        let ch = ClickHouse::detached(&config.clickhouse);
        let metrics = Arc::new(Metrics::new());
        let intake = Intake::buffered(buffer(&config, metrics.clone()));
        let st = state(&config, ch, IpHasher::new([0; 16]), metrics, intake, None);
        let spec: serde_json::Value = serde_json::from_str(&api::openapi(st).spec()).unwrap();
        for (hot, method, template, sample) in [
            (Hot::Click, "POST", "/ads/click", "/ads/click"),
            (Hot::Impression, "POST", "/ads/impression", "/ads/impression"),
            (Hot::Beacon, "GET", "/t/{event}", "/t/firstQuartile"),
        ] {
            let op = &spec["paths"][template][method.to_lowercase()]["operationId"];
            assert_eq!(op, hot.operation_id(), "{method} {template}");
            assert_eq!(Hot::find(&method.parse().unwrap(), sample), Some(hot), "{method} {sample}");
        }
        assert_eq!(Hot::find(&poem::http::Method::HEAD, "/t/start"), None);
        assert_eq!(Hot::find(&poem::http::Method::GET, "/t/st%61rt"), None);
    }

    #[tokio::test]
    async fn a_pipeline_thread_runs_at_its_nice_value_under_its_name() {
        let own = || rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let before = own();
        let seen = on_own_thread("adbeacon-test", 19, async move {
            (std::thread::current().name().map(str::to_string), own())
        })
        .unwrap();
        assert_eq!(seen.await.unwrap(), (Some("adbeacon-test".to_string()), 19));
        assert_eq!(own(), before, "the calling thread keeps its own");
    }
}
