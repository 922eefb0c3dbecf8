//! Prometheus metrics: one struct owning the registry and typed handles.
//!
//! Labels are low-cardinality only (route templates, event kinds, reasons), never ad ids or raw
//! paths. The pipeline counters come in pairs (accepted / flushed / spilled / dead-lettered) so
//! that the books can be checked: at rest, accepted = flushed + spilled + dead-lettered on each
//! instance, and across them spilled = replayed + replay dead-lettered + the spill backlog (apart
//! from damaged entries, counted as entries, and dead letters an operator sends back).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::domain::{EventKind, Traffic};

/// Why an event (or, for the other endpoints, a request) was refused before it reached the
/// buffer. The HTTP-level reasons let an operator tell a broken client from an attack: a body that
/// is not JSON, a field that is wrong, a client too slow or too large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// A field or parameter is missing, of the wrong type or out of bounds (400, 422).
    Invalid,
    /// The body is not a JSON object: a syntax error, invalid UTF-8, a NUL byte, NaN or
    /// Infinity, nesting too deep, empty (400).
    MalformedJson,
    /// A Content-Type that is not read as JSON, such as application/xml (415).
    UnsupportedMediaType,
    /// A body over MAX_BODY_BYTES / MAX_BATCH_BODY_BYTES, or a batch of too many events (413).
    TooLarge,
    /// The body did not arrive within BODY_READ_TIMEOUT (408).
    BodyTimeout,
    /// A request's headers did not arrive within HEADER_READ_TIMEOUT: the connection is closed,
    /// no request exists to answer (counted in `adbeacon_requests_rejected_total`).
    HeaderTimeout,
    /// A request HTTP itself refused before any endpoint saw it: a malformed request line or
    /// header, a bad or conflicting Content-Length, a head too large (400, 431, 414: hyper's
    /// own refusal, which the server gives the JSON body of every other refusal; counted in
    /// `adbeacon_requests_rejected_total`).
    MalformedHttp,
    /// A method the endpoint does not serve (405).
    MethodNotAllowed,
    /// A client timestamp outside MAX_CLOCK_SKEW / MAX_EVENT_AGE (400).
    BadTimestamp,
    /// The ad id is not in the catalog.
    UnknownAd,
    /// The buffer was full (503).
    BufferFull,
    /// The write-ahead log could not be written: a full or broken disk (503).
    LogUnavailable,
    /// The catalog could not be read (503).
    CatalogUnavailable,
    /// The service was shutting down (503).
    ShuttingDown,
    /// Sent from a web page whose origin CORS_ALLOWED_ORIGINS does not list (403).
    ForbiddenOrigin,
    /// The client IP went over RATE_LIMIT (429).
    RateLimited,
    /// A repeat of a client event id that another request is storing right now (503: retry to
    /// learn the outcome).
    InFlight,
}

impl RejectReason {
    /// Every reason.
    pub const ALL: [RejectReason; 17] = [
        Self::Invalid,
        Self::MalformedJson,
        Self::UnsupportedMediaType,
        Self::TooLarge,
        Self::BodyTimeout,
        Self::HeaderTimeout,
        Self::MalformedHttp,
        Self::MethodNotAllowed,
        Self::BadTimestamp,
        Self::UnknownAd,
        Self::BufferFull,
        Self::LogUnavailable,
        Self::CatalogUnavailable,
        Self::ShuttingDown,
        Self::ForbiddenOrigin,
        Self::RateLimited,
        Self::InFlight,
    ];

    /// The reason with label `label`.
    pub fn from_label(label: &str) -> Option<RejectReason> {
        Self::ALL.into_iter().find(|r| r.as_str() == label)
    }

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid_field",
            Self::MalformedJson => "malformed_json",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::TooLarge => "too_large",
            Self::BodyTimeout => "body_timeout",
            Self::HeaderTimeout => "header_timeout",
            Self::MalformedHttp => "malformed_http",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BadTimestamp => "bad_timestamp",
            Self::UnknownAd => "unknown_ad",
            Self::BufferFull => "buffer_full",
            Self::LogUnavailable => "log_unavailable",
            Self::CatalogUnavailable => "catalog_unavailable",
            Self::ShuttingDown => "shutting_down",
            Self::ForbiddenOrigin => "forbidden_origin",
            Self::RateLimited => "rate_limited",
            Self::InFlight => "in_flight",
        }
    }
}

/// Every metric adbeacon exports.
pub struct Metrics {
    registry: Registry,
    /// `http_requests_total{method,path,status}`, as the old services named it.
    pub http_requests: IntCounterVec,
    /// `http_request_duration_seconds{path}`.
    pub http_duration: HistogramVec,
    accepted: Vec<IntCounter>,
    rejected: IntCounterVec,
    /// Per filtered [`Traffic`], at its discriminant − 1.
    filtered: Vec<IntCounter>,
    /// Events whose client event id was accepted before: answered, not stored again.
    pub event_id_repeats: IntCounter,
    requests_rejected: IntCounterVec,
    /// Events confirmed by ClickHouse.
    pub events_flushed: IntCounter,
    /// Events written to the local dead-letter directory.
    pub events_dead_lettered: IntCounter,
    /// Batches moved to the Redis spill.
    pub batches_spilled: IntCounter,
    /// Events moved to the Redis spill.
    pub events_spilled: IntCounter,
    /// Bytes of the spill entries this instance pushed (field names and values): spilled
    /// batches, and dead letters an operator sent back.
    pub spill_bytes_pushed: IntCounter,
    /// Batches Redis could not take when they were to be spilled.
    pub spill_failures: IntCounter,
    /// Spill entries this instance replayed (acknowledged).
    pub spill_entries_replayed: IntCounter,
    /// Events this instance replayed from the spill into ClickHouse.
    pub events_replayed: IntCounter,
    /// Bytes of the spill entries this instance replayed and acknowledged.
    pub spill_bytes_replayed: IntCounter,
    /// Replayed events ClickHouse rejected as data (kept as dead letters).
    pub replay_events_dead_lettered: IntCounter,
    /// Spill entries claimed from replayers that went quiet.
    pub spill_entries_claimed: IntCounter,
    /// Spill entries that could not be read back (kept as dead letters).
    pub spill_entries_corrupt: IntCounter,
    /// Entries in the spill stream (batches waiting for replay), across instances.
    pub spill_backlog_entries: IntGauge,
    /// Events in the spill stream, across instances.
    pub spill_backlog_events: IntGauge,
    /// Memory the spill stream takes in Redis (`MEMORY USAGE`, Redis's estimate).
    pub spill_backlog_bytes: IntGauge,
    /// Entries in the dead-letter stream.
    pub dead_letters: IntGauge,
    /// `adbeacon_clickhouse_up`: set from the ingest health when scraped.
    pub clickhouse_up: IntGauge,
    /// `adbeacon_dead_letter_files`: counted when scraped.
    pub dead_letter_files: IntGauge,
    /// Dead letters moved back to the spill by an operator.
    pub dead_letters_replayed: IntCounter,
    /// Dead letters deleted by an operator.
    pub dead_letters_purged: IntCounter,
    /// Unreadable pixel timestamps replaced by server time.
    pub event_time_replaced: IntCounter,
    /// Months of raw events dropped by raw retention.
    pub retention_months_dropped: IntCounter,
    /// Events held in memory (buffered or in flight).
    pub buffer_events: IntGauge,
    /// [`Metrics::unaccounted`], set at every scrape.
    books_balance: IntGauge,
    /// Bytes of events held in memory.
    pub buffer_bytes: IntGauge,
    /// BUFFER_MAX_BYTES: beyond it tracking requests get 503 (set once at start-up).
    pub buffer_max_bytes: IntGauge,
    /// Bytes of the client event ids remembered past EVENT_IDS_MAX counted against
    /// BUFFER_MAX_BYTES: at most [`crate::ingest::buffer::ID_BYTES`] per event held.
    pub buffer_ids_bytes: IntGauge,
    /// Batches confirmed by ClickHouse.
    pub batches_flushed: IntCounter,
    /// Rows per confirmed batch.
    pub batch_rows: Histogram,
    /// Duration of successful inserts.
    pub insert_duration: Histogram,
    insert_failures: IntCounterVec,
    /// Failed INSERTs found stored, wholly or in part, when checked before a retry.
    pub insert_found_stored: IntCounter,
    /// Rows to re-send whose month raw retention may have dropped: kept as dead letters.
    pub insert_unverifiable: IntCounter,
    /// Rows found stored in `events` after ClickHouse answered their INSERT with an error: the
    /// views that had not run by then may lack them.
    pub insert_views_short: IntCounter,
    /// Catalog look-ups answered from the cache.
    pub catalog_hits: IntCounter,
    /// Catalog look-ups that had to wait for ClickHouse.
    pub catalog_misses: IntCounter,
    /// Queries for single ads sent to ClickHouse (concurrent misses of one id share one).
    pub catalog_lookups: IntCounter,
    /// Events a previous run acknowledged, found in the write-ahead log at start-up and owed
    /// to ClickHouse by this run.
    pub events_recovered: IntCounter,
    /// Requests answered 503 in `committed` mode because ClickHouse did not confirm in time
    /// (their events are held and counted as accepted).
    pub commit_timeouts: IntCounter,
    /// Bytes of the write-ahead log on disk.
    pub wal_bytes: IntGauge,
    /// Segments of the write-ahead log on disk.
    pub wal_segments: IntGauge,
    /// WAL_SEGMENT_BYTES: how long a segment grows before the log rotates (for alert rules).
    pub wal_segment_max_bytes: IntGauge,
    /// Duration of the log's fdatasync calls.
    pub wal_fsync_duration: Histogram,
    /// Failed writes or syncs of the log (each answered 503).
    pub wal_write_errors: IntCounter,
    /// Requests whose events were written to the log (many share one write and one sync).
    pub wal_appends: IntCounter,
    /// Bytes after a torn or corrupt record, moved aside at start-up.
    pub wal_corrupt_bytes: IntCounter,
    /// Times the log's files were found deleted while the service ran and written again.
    pub wal_restores: IntCounter,
    /// Client event ids remembered (for repeats).
    event_ids_remembered: IntGauge,
    /// Client event ids forgotten for `EVENT_IDS_MAX` before `EVENT_ID_TTL` was up.
    event_ids_forgotten_early: IntCounter,
    wal_recovered: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("metric names are unique");
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            reg(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            reg(Box::new(g.clone()));
            g
        };
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by method, route template and status"),
            &["method", "path", "status"],
        )
        .expect("valid metric");
        reg(Box::new(http_requests.clone()));
        let http_duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request duration by route template")
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0,
                ]),
            &["path"],
        )
        .expect("valid metric");
        reg(Box::new(http_duration.clone()));
        let accepted_vec = IntCounterVec::new(
            Opts::new("adbeacon_events_accepted_total", "Events accepted into the buffer (answered 2xx)"),
            &["kind"],
        )
        .expect("valid metric");
        reg(Box::new(accepted_vec.clone()));
        let accepted = EventKind::ALL.iter().map(|k| accepted_vec.with_label_values(&[k.as_str()])).collect();
        let rejected = IntCounterVec::new(
            Opts::new("adbeacon_events_rejected_total", "Events refused before the buffer, by reason; a tracking request refused as a whole (malformed, too large, too slow) counts once"),
            &["reason"],
        )
        .expect("valid metric");
        reg(Box::new(rejected.clone()));
        let requests_rejected = IntCounterVec::new(
            Opts::new(
                "adbeacon_requests_rejected_total",
                "Requests to the catalog, analytics and operations endpoints refused as malformed (400, 405, 408, 413, 415, 422), by reason; refused tracking requests count in adbeacon_events_rejected_total",
            ),
            &["reason"],
        )
        .expect("valid metric");
        reg(Box::new(requests_rejected.clone()));
        // Every reason exists from the start at 0, as the insert failures below, so that the first
        // refusals show in `rate()` (a series born at its full count shows no increase).
        for reason in RejectReason::ALL {
            rejected.with_label_values(&[reason.as_str()]);
            requests_rejected.with_label_values(&[reason.as_str()]);
        }
        let insert_failures = IntCounterVec::new(
            Opts::new("adbeacon_insert_failures_total", "Failed INSERTs by class (retryable, rejected)"),
            &["class"],
        )
        .expect("valid metric");
        reg(Box::new(insert_failures.clone()));
        // Both classes exist from the start at 0, so that `rate()` and `increase()` see the first
        // failure (a series born at 1 shows no increase) and the alert rules always have a series.
        for class in ["retryable", "rejected"] {
            insert_failures.with_label_values(&[class]);
        }
        let batch_rows = Histogram::with_opts(
            HistogramOpts::new("adbeacon_batch_rows", "Rows per batch confirmed by ClickHouse").buckets(
                vec![1.0, 10.0, 100.0, 1_000.0, 10_000.0, 50_000.0, 100_000.0, 500_000.0, 1_000_000.0],
            ),
        )
        .expect("valid metric");
        reg(Box::new(batch_rows.clone()));
        let insert_duration = Histogram::with_opts(
            HistogramOpts::new("adbeacon_insert_duration_seconds", "Duration of successful INSERTs")
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets")),
        )
        .expect("valid metric");
        reg(Box::new(insert_duration.clone()));

        let wal_fsync_duration = Histogram::with_opts(
            HistogramOpts::new(
                "adbeacon_wal_fsync_duration_seconds",
                "Duration of the write-ahead log's fdatasync calls",
            )
            .buckets(prometheus::exponential_buckets(0.00005, 2.0, 16).expect("valid buckets")),
        )
        .expect("valid metric");
        reg(Box::new(wal_fsync_duration.clone()));
        let wal_recovered = IntCounterVec::new(
            Opts::new(
                "adbeacon_wal_recovered_events_total",
                "Events found in the write-ahead log at start-up, by state: fresh (never sent), uncertain (in a batch whose INSERT may have landed: checked before sending), confirmed (dropped)",
            ),
            &["state"],
        )
        .expect("valid metric");
        reg(Box::new(wal_recovered.clone()));
        for state in ["fresh", "uncertain", "confirmed"] {
            wal_recovered.with_label_values(&[state]);
        }

        let filtered_vec = IntCounterVec::new(
            Opts::new(
                "adbeacon_events_filtered_total",
                "Accepted events stored flagged as invalid traffic, by reason; a subset of adbeacon_events_accepted_total, left out of the net numbers",
            ),
            &["reason"],
        )
        .expect("valid metric");
        reg(Box::new(filtered_vec.clone()));
        let filtered =
            Traffic::FILTERED.iter().map(|t| filtered_vec.with_label_values(&[t.name()])).collect();

        let build_info = IntGaugeVec::new(
            Opts::new(
                "adbeacon_build_info",
                "Always 1, labelled with the running adbeacon's version: instances of different versions share one spill",
            ),
            &["version"],
        )
        .expect("valid metric");
        reg(Box::new(build_info.clone()));
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        Metrics {
            filtered,
            clickhouse_up: gauge(
                "adbeacon_clickhouse_up",
                "1 while ClickHouse takes INSERTs, 0 while the last INSERT (or the replayer's probe, every second while it is down) failed: batches then go to the Redis spill or wait in the buffer",
            ),
            dead_letter_files: gauge(
                "adbeacon_dead_letter_files",
                "Dead-letter files in DATA_DIR/dead-letter (written when Redis could not take dead letters): their events are counted nowhere until loaded",
            ),
            event_id_repeats: counter(
                "adbeacon_events_repeated_total",
                "Events whose client event id was accepted before: answered as duplicates, not stored again",
            ),
            http_requests,
            http_duration,
            accepted,
            rejected,
            requests_rejected,
            events_flushed: counter("adbeacon_events_flushed_total", "Events confirmed by ClickHouse"),
            events_dead_lettered: counter(
                "adbeacon_events_dead_lettered_total",
                "Events of live batches kept as dead letters: rejected by ClickHouse as data, or neither inserted nor spilled at shutdown",
            ),
            batches_spilled: counter(
                "adbeacon_batches_spilled_total",
                "Batches ClickHouse did not take, moved whole to the Redis spill",
            ),
            events_spilled: counter("adbeacon_events_spilled_total", "Events moved to the Redis spill"),
            spill_bytes_pushed: counter(
                "adbeacon_spill_bytes_pushed_total",
                "Bytes of the spill entries this instance pushed to Redis (field names and values): spilled batches, and dead letters sent back with POST /admin/dead-letters/replay",
            ),
            spill_failures: counter(
                "adbeacon_spill_failures_total",
                "Batches Redis could not take when they were to be spilled (they stay in memory and the local log)",
            ),
            spill_entries_replayed: counter(
                "adbeacon_spill_entries_replayed_total",
                "Spill entries (batches) this instance replayed and acknowledged",
            ),
            events_replayed: counter(
                "adbeacon_events_replayed_total",
                "Events this instance replayed from the spill into ClickHouse",
            ),
            spill_bytes_replayed: counter(
                "adbeacon_spill_bytes_replayed_total",
                "Bytes of the spill entries this instance replayed and acknowledged (field names and values)",
            ),
            replay_events_dead_lettered: counter(
                "adbeacon_replay_events_dead_lettered_total",
                "Replayed events ClickHouse rejected as data, kept as dead letters",
            ),
            spill_entries_claimed: counter(
                "adbeacon_spill_entries_claimed_total",
                "Spill entries claimed from a replayer that left them unacknowledged for REPLAY_CLAIM_IDLE",
            ),
            spill_entries_corrupt: counter(
                "adbeacon_spill_entries_corrupt_total",
                "Spill entries that could not be read back, kept as dead letters",
            ),
            spill_backlog_entries: gauge(
                "adbeacon_spill_backlog_entries",
                "Batches in the Redis spill waiting for replay (all instances)",
            ),
            spill_backlog_events: gauge(
                "adbeacon_spill_backlog_events",
                "Events in the Redis spill waiting for replay (all instances)",
            ),
            spill_backlog_bytes: gauge(
                "adbeacon_spill_backlog_bytes",
                "Memory the Redis spill stream takes (Redis's MEMORY USAGE estimate; all instances): compare with Redis's maxmemory",
            ),
            dead_letters: gauge("adbeacon_dead_letters", "Entries in the Redis dead-letter stream"),
            dead_letters_replayed: counter(
                "adbeacon_dead_letters_replayed_total",
                "Dead letters an operator moved back to the spill (POST /admin/dead-letters/replay)",
            ),
            dead_letters_purged: counter(
                "adbeacon_dead_letters_purged_total",
                "Dead letters an operator deleted (DELETE /admin/dead-letters)",
            ),
            event_time_replaced: counter(
                "adbeacon_event_time_replaced_total",
                "Pixel timestamps replaced by server time: unreadable (such as an unexpanded [TIMESTAMP] macro) or outside MAX_CLOCK_SKEW / MAX_EVENT_AGE (a device's wrong clock)",
            ),
            retention_months_dropped: counter(
                "adbeacon_retention_months_dropped_total",
                "Monthly partitions of raw events dropped because they are older than RAW_RETENTION_MONTHS",
            ),
            buffer_events: gauge(
                "adbeacon_buffer_events",
                "Events held in memory until ClickHouse confirms them",
            ),
            buffer_bytes: gauge("adbeacon_buffer_bytes", "Bytes of events held in memory"),
            buffer_max_bytes: gauge(
                "adbeacon_buffer_max_bytes",
                "BUFFER_MAX_BYTES: once adbeacon_buffer_bytes plus adbeacon_buffer_ids_bytes reach it, tracking requests get 503",
            ),
            buffer_ids_bytes: gauge(
                "adbeacon_buffer_ids_bytes",
                "Bytes of the client event ids remembered past EVENT_IDS_MAX counted against BUFFER_MAX_BYTES: about 56 each, at most 56 per event held",
            ),
            books_balance: gauge(
                "adbeacon_books_balance",
                "Events accepted minus those flushed to ClickHouse, spilled to Redis, held in memory or dead-lettered: 0 at rest, else events are missing",
            ),
            batches_flushed: counter("adbeacon_batches_flushed_total", "Batches confirmed by ClickHouse"),
            batch_rows,
            insert_duration,
            insert_failures,
            insert_found_stored: counter(
                "adbeacon_insert_found_stored_total",
                "Failed INSERTs that the check before a retry found stored (wholly or in part); only missing rows were sent again",
            ),
            insert_views_short: counter(
                "adbeacon_insert_views_short_total",
                "Rows found stored in events after ClickHouse answered their INSERT with an error: the materialized views may lack them; compare and rebuild the aggregates of their times (README, Delivery)",
            ),
            insert_unverifiable: counter(
                "adbeacon_insert_unverifiable_total",
                "Rows to re-send (an earlier INSERT may have landed) whose month raw retention may have dropped, so that the check cannot tell whether they are stored: kept as dead letters, not sent again",
            ),
            catalog_hits: counter("adbeacon_catalog_cache_hits_total", "Ad look-ups answered from the cache"),
            catalog_misses: counter(
                "adbeacon_catalog_cache_misses_total",
                "Ad look-ups that waited for ClickHouse (not in memory)",
            ),
            catalog_lookups: counter(
                "adbeacon_catalog_lookups_total",
                "Queries for one ad sent to ClickHouse; concurrent misses of one id share one, and known ads are re-read in the background every CATALOG_TTL",
            ),
            events_recovered: counter(
                "adbeacon_events_recovered_total",
                "Events acknowledged by an earlier run, found in the write-ahead log at start-up and sent by this run",
            ),
            commit_timeouts: counter(
                "adbeacon_commit_timeouts_total",
                "ACK_MODE=committed requests answered 503 because ClickHouse did not confirm within ACK_TIMEOUT (their events are held and will be stored)",
            ),
            wal_bytes: gauge("adbeacon_wal_bytes", "Bytes of the write-ahead log on disk"),
            wal_segments: gauge("adbeacon_wal_segments", "Segments of the write-ahead log on disk"),
            wal_segment_max_bytes: gauge(
                "adbeacon_wal_segment_max_bytes",
                "WAL_SEGMENT_BYTES: a segment of the write-ahead log grows to this size before the log rotates",
            ),
            wal_fsync_duration,
            wal_write_errors: counter(
                "adbeacon_wal_write_errors_total",
                "Failed writes or syncs of the write-ahead log; their requests got 503",
            ),
            wal_appends: counter(
                "adbeacon_wal_appends_total",
                "Requests whose events were written to the write-ahead log (group commit: many per sync)",
            ),
            wal_corrupt_bytes: counter(
                "adbeacon_wal_corrupt_bytes_total",
                "Bytes after a torn or corrupt write-ahead log record, moved to DATA_DIR/wal/corrupt at start-up",
            ),
            event_ids_remembered: gauge(
                "adbeacon_event_ids_remembered",
                "Client event ids remembered so that a retry is answered but stored once",
            ),
            event_ids_forgotten_early: counter(
                "adbeacon_event_ids_forgotten_early_total",
                "Client event ids forgotten before EVENT_ID_TTL was up because EVENT_IDS_MAX were remembered: a retry of one is stored again",
            ),
            wal_restores: counter(
                "adbeacon_wal_restores_total",
                "Times the write-ahead log's files were found deleted while the service ran and were written again from the open files",
            ),
            wal_recovered,
            registry,
        }
    }

    /// Counts events found in the write-ahead log at start-up in `state`.
    pub fn wal_recovered(&self, state: &str, n: u64) {
        self.wal_recovered.with_label_values(&[state]).inc_by(n);
    }

    /// The metrics the client event ids keep up to date.
    pub fn event_ids(&self) -> crate::api::event_ids::IdMetrics {
        crate::api::event_ids::IdMetrics {
            remembered: self.event_ids_remembered.clone(),
            forgotten_early: self.event_ids_forgotten_early.clone(),
        }
    }

    /// Counts accepted events of one kind.
    pub fn accepted(&self, kind: EventKind, n: u64) {
        self.accepted[kind.index()].inc_by(n);
    }

    /// Counts one refused event.
    pub fn rejected(&self, reason: RejectReason) {
        self.rejected.with_label_values(&[reason.as_str()]).inc();
    }

    /// Counts accepted events stored flagged as `traffic` (valid ones are not counted here).
    pub fn filtered(&self, traffic: Traffic, n: u64) {
        if traffic != Traffic::Valid {
            self.filtered[traffic as usize - 1].inc_by(n);
        }
    }

    /// Counts one refused request to an endpoint other than tracking (the catalog, analytics).
    pub fn request_rejected(&self, reason: RejectReason) {
        self.requests_rejected.with_label_values(&[reason.as_str()]).inc();
    }

    /// Counts one failed INSERT.
    pub fn insert_failed(&self, retryable: bool) {
        let class = if retryable { "retryable" } else { "rejected" };
        self.insert_failures.with_label_values(&[class]).inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        self.books_balance.set(self.unaccounted());
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Metrics {
    /// Events accepted (answered 2xx, or recovered from the write-ahead log at start-up) minus
    /// those confirmed by ClickHouse, spilled to Redis, still held in memory or kept as dead
    /// letters: 0 at rest; anything else means events went missing (or, while
    /// events flow, are between two of these counters).
    pub fn unaccounted(&self) -> i64 {
        let accepted: u64 =
            self.accepted.iter().map(IntCounter::get).sum::<u64>() + self.events_recovered.get();
        let held = u64::try_from(self.buffer_events.get()).unwrap_or(0);
        let out = self.events_flushed.get() + self.events_dead_lettered.get() + self.events_spilled.get();
        accepted as i64 - (out + held) as i64
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_labels_are_distinct_and_read_back() {
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::from_label(r.as_str()), Some(r));
        }
        let mut labels: Vec<_> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), RejectReason::ALL.len());
    }

    #[test]
    fn every_reason_and_the_build_are_exported_from_the_start() {
        let text = Metrics::new().render();
        for family in ["adbeacon_events_rejected_total", "adbeacon_requests_rejected_total"] {
            for r in RejectReason::ALL {
                let sample = format!("{family}{{reason=\"{}\"}} 0", r.as_str());
                assert!(text.lines().any(|l| l == sample), "{sample} missing");
            }
        }
        let build = format!("adbeacon_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert!(text.lines().any(|l| l == build), "{build} missing");
        assert!(text.lines().any(|l| l == "adbeacon_clickhouse_up 0"), "the gauge is set when scraped");
    }
}
