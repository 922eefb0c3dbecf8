//! The ClickHouse client: connection, server-version detection, the `events` row, batch inserts
//! and the classification of failures into retryable and rejected.

use std::time::{Duration, Instant};

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    config::ClickHouseConfig,
    domain::{Event, EventKind, Traffic},
};

/// A ClickHouse failure, classified by what the caller should do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The server is down, slow or refusing for a reason that may pass: retry the same batch.
    #[error("ClickHouse unavailable: {0}")]
    Retryable(String),
    /// The server refused the data itself: retrying the same rows cannot succeed.
    #[error("ClickHouse rejected the data: {0}")]
    Rejected(String),
}

impl StoreError {
    /// True for failures worth retrying.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
}

/// ClickHouse error codes that mean "this data is wrong", as opposed to "the server is unwell".
/// A batch failing with one of these is not retried.
const DATA_ERROR_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,  // ATTEMPT_TO_READ_AFTER_EOF
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
];
// Not here on purpose: 252 TOO_MANY_PARTS passes once merges catch up; 60/81 (unknown table or
// database) need an operator, and dropping data meanwhile would be worse than waiting.
// 27/32/33 (a RowBinary stream short or misaligned) are here although with rows this service
// encodes they mostly mean a table whose columns differ from the service's: retried, every batch
// would wait in the buffer until it filled and tracking requests got 503; as data errors, the
// rows are kept as dead letters (replayable once the table is fixed) and intake goes on.

/// The `Code: N` of a ClickHouse error text, if it has one.
pub fn error_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Sorts a client error into retryable or rejected.
pub(crate) fn classify(err: clickhouse::error::Error) -> StoreError {
    use clickhouse::error::Error as E;
    let text = err.to_string();
    match &err {
        E::BadResponse(body) => match error_code(body) {
            Some(code) if DATA_ERROR_CODES.contains(&code) => StoreError::Rejected(text),
            _ => StoreError::Retryable(text),
        },
        E::Custom(_) | E::SequenceMustHaveLength | E::InvalidUtf8Encoding(_) => StoreError::Rejected(text),
        _ => StoreError::Retryable(text),
    }
}

/// A ClickHouse server version, as `SELECT version()` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    /// e.g. 18 or 24.
    pub major: u32,
    /// e.g. 16 or 8.
    pub minor: u32,
}

impl ServerVersion {
    /// Parses `18.16.1` or `24.8.4.13`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('.');
        Some(Self { major: parts.next()?.parse().ok()?, minor: parts.next()?.parse().ok()? })
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One row of `events`, in column order, encoded as RowBinary.
#[derive(Debug, Clone, Row, Serialize, Deserialize, PartialEq)]
pub struct EventRow {
    /// Unique event id.
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    /// The ad.
    #[serde(with = "clickhouse::serde::uuid")]
    pub ad_id: Uuid,
    /// `Enum8` value.
    pub kind: EventKind,
    /// When it happened (UTC seconds).
    #[serde(with = "clickhouse::serde::time::datetime")]
    pub event_time: OffsetDateTime,
    /// When adbeacon accepted it.
    #[serde(with = "clickhouse::serde::time::datetime")]
    pub received_at: OffsetDateTime,
    /// Keyed hash of the client IP.
    pub ip_hash: u64,
    /// Seconds into the video.
    pub playback_time: Option<f32>,
    /// VAST error code.
    pub error_code: u16,
    /// Token of the batch that carries the row, set when the batch is formed.
    #[serde(with = "clickhouse::serde::uuid")]
    pub batch_id: Uuid,
    /// `Enum8` value: valid, or why the event does not count in the net numbers.
    pub traffic: Traffic,
}

impl EventRow {
    /// Memory one buffered row accounts for.
    pub const SIZE: usize = std::mem::size_of::<EventRow>();

    /// For tests: a valid click of the nil ad at the epoch, its event id `[n; 16]`.
    #[cfg(test)]
    pub fn test_click(n: u8) -> EventRow {
        EventRow {
            event_id: Uuid::from_bytes([n; 16]),
            ad_id: Uuid::nil(),
            kind: EventKind::Click,
            event_time: OffsetDateTime::UNIX_EPOCH,
            received_at: OffsetDateTime::UNIX_EPOCH,
            ip_hash: 0,
            playback_time: None,
            error_code: 0,
            batch_id: Uuid::nil(),
            traffic: Traffic::Valid,
        }
    }
}

impl From<Event> for EventRow {
    fn from(e: Event) -> Self {
        EventRow {
            event_id: e.event_id,
            ad_id: e.ad_id,
            kind: e.kind,
            event_time: e.event_time,
            received_at: e.received_at,
            ip_hash: e.ip_hash,
            playback_time: e.playback_time.map(|p| p.seconds()),
            error_code: e.error_code,
            batch_id: Uuid::nil(),
            traffic: e.traffic,
        }
    }
}

/// The first version whose plain MergeTree deduplicates INSERTs by a token of the client's
/// choosing, views included (`clickhouse/dedup/enable.sql`).
pub const DEDUP_SINCE: ServerVersion = ServerVersion { major: 22, minor: 8 };

/// Turns on server-side insert deduplication (on [`DEDUP_SINCE`] and later).
pub const ENABLE_DEDUP: &str = include_str!("../../clickhouse/dedup/enable.sql");

/// The deduplication token of an INSERT of `rows`: a hash of their event ids in order. A retry of
/// the same rows repeats it; a re-send of some of them does not.
pub fn dedup_token(rows: &[EventRow]) -> String {
    use std::hash::Hasher;
    let mut h = siphasher::sip128::SipHasher13::new_with_keys(0, 0);
    for r in rows {
        h.write(r.event_id.as_bytes());
    }
    format!("adbeacon-{:032x}", siphasher::sip128::Hasher128::finish128(&h).as_u128())
}

/// A connected ClickHouse: the client bound to adbeacon's database, and the time each call may
/// take (so that a hung server holds up neither a request nor the shutdown).
#[derive(Clone)]
pub struct ClickHouse {
    client: clickhouse::Client,
    timeouts: Timeouts,
    /// Whether INSERTs carry a deduplication token (the server is [`DEDUP_SINCE`] or later).
    dedup: bool,
    /// The benchmark's no-op sink: [`ClickHouse::insert_events`] confirms without sending.
    discard: bool,
}

/// How the reason of rows refused before their INSERT starts: `events` no longer lays its
/// columns out as adbeacon writes them.
pub const LAYOUT_CHANGED: &str = "the events table no longer takes adbeacon's rows";

/// The columns adbeacon writes into `events`, in [`EventRow`]'s order, each with the type that
/// lays its bytes out as RowBinary sends them ([`layout_of`]).
const EVENTS_LAYOUT: [(&str, &str); 10] = [
    ("event_id", "UUID"),
    ("ad_id", "UUID"),
    ("kind", "Enum8"),
    ("event_time", "DateTime"),
    ("received_at", "DateTime"),
    ("ip_hash", "UInt64"),
    ("playback_time", "Nullable(Float32)"),
    ("error_code", "UInt16"),
    ("batch_id", "UUID"),
    ("traffic", "Enum8"),
];

/// A type as RowBinary lays it out: an Enum8's values and a DateTime's time zone change nothing
/// in the bytes (an Enum8 that gained a kind still takes the rows), a width does.
fn layout_of(column_type: &str) -> String {
    let t: String = column_type.chars().filter(|c| !c.is_whitespace()).collect();
    if let Some(inner) = t.strip_prefix("Nullable(").and_then(|r| r.strip_suffix(')')) {
        return format!("Nullable({})", layout_of(inner));
    }
    for family in ["Enum8(", "Enum16(", "DateTime("] {
        if t.starts_with(family) {
            return family.trim_end_matches('(').to_string();
        }
    }
    t
}

/// What is wrong with `events`' `columns` (name and type) for adbeacon's rows, if anything.
fn layout_changed(columns: &[(String, String)]) -> Option<String> {
    for (name, expected) in EVENTS_LAYOUT {
        match columns.iter().find(|(n, _)| n == name) {
            None => return Some(format!("{LAYOUT_CHANGED}: its column {name} is gone")),
            Some((_, found)) if layout_of(found) != expected => {
                return Some(format!(
                    "{LAYOUT_CHANGED}: its column {name} is {found}, adbeacon writes {expected} (in \
                     RowBinary, which carries no types: the server would read shifted bytes as rows); \
                     change the column back, then replay these dead letters (or load their file)"
                ));
            }
            Some(_) => {}
        }
    }
    None
}

/// How long ClickHouse calls may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// An INSERT: each chunk sent, and the wait for the answer.
    pub insert: Duration,
    /// Any other call.
    pub query: Duration,
}

/// A LIKE pattern for the strings starting with `prefix`, its `%`, `_` and `\` taken literally.
pub fn starting_with(prefix: &str) -> String {
    format!("{}%", prefix.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"))
}

fn base_client(cfg: &ClickHouseConfig) -> clickhouse::Client {
    let mut client = clickhouse::Client::default().with_url(&cfg.url).with_user(&cfg.user);
    if !cfg.password.is_empty() {
        client = client.with_password(&cfg.password);
    }
    client
}

impl ClickHouse {
    /// Connects, waiting up to `wait` for the server to answer, then creates the database if
    /// missing. Logs once per attempt so that an operator sees what start-up waits for.
    pub async fn connect(
        cfg: &ClickHouseConfig,
        wait: Duration,
        timeouts: Timeouts,
    ) -> Result<Self, StoreError> {
        let bootstrap = base_client(cfg).with_validation(false);
        let deadline = Instant::now() + wait;
        let version_text = loop {
            let attempt = tokio::time::timeout(
                timeouts.query,
                bootstrap.query("SELECT version()").fetch_one::<String>(),
            );
            match attempt.await.unwrap_or(Err(clickhouse::error::Error::TimedOut)) {
                Ok(v) => break v,
                Err(e) => {
                    let e = classify(e);
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    tracing::warn!(url = %cfg.url, error = %e, "waiting for ClickHouse");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let version = ServerVersion::parse(&version_text).ok_or_else(|| {
            StoreError::Rejected(format!("unrecognised ClickHouse version {version_text:?}"))
        })?;
        bootstrap
            .query(&format!("CREATE DATABASE IF NOT EXISTS {}", cfg.database))
            .execute()
            .await
            .map_err(classify)?;
        // Plain RowBinary on every server: validation would switch to RowBinaryWithNamesAndTypes
        // (which DESIGN rules out) and match result columns to fields by name, while the queries
        // in clickhouse/queries name their columns for analysts, not for our structs.
        let client = base_client(cfg).with_database(&cfg.database).with_validation(false);
        let dedup = version >= DEDUP_SINCE;
        tracing::info!(url = %cfg.url, database = %cfg.database, %version, dedup, "connected to ClickHouse");
        Ok(Self { client, timeouts, dedup, discard: false })
    }

    /// A handle with a connection pool of its own (same server, settings and timeouts), for a
    /// task on another runtime: pooled connections are driven by the runtime that opened them.
    pub fn separate(&self, cfg: &ClickHouseConfig) -> Self {
        let client = base_client(cfg).with_database(&cfg.database).with_validation(false);
        Self { client, timeouts: self.timeouts, dedup: self.dedup, discard: self.discard }
    }

    /// The same handle, except that event INSERTs are confirmed at once and their rows dropped:
    /// the no-op sink that `make bench` compares the real pipeline with
    /// (`Config::bench_discard_events`). Every other call still reaches the server.
    pub fn discarding(self) -> Self {
        Self { discard: true, ..self }
    }

    /// A handle that never connected, for generating the OpenAPI spec offline.
    pub fn detached(cfg: &ClickHouseConfig) -> Self {
        Self {
            client: base_client(cfg).with_database(&cfg.database).with_validation(false),
            timeouts: Timeouts { insert: Duration::from_secs(30), query: Duration::from_secs(10) },
            dedup: false,
            discard: false,
        }
    }

    /// Whether `events` still lays out its columns as adbeacon writes them: the reason, starting
    /// with [`LAYOUT_CHANGED`], when it does not. Asked before every INSERT (a small query; an
    /// INSERT carries thousands of rows, a handful a second at most), since an ALTER can come at
    /// any moment. Measured on 18.16 without it: after `MODIFY COLUMN error_code UInt64` a batch
    /// of 1,000 rows left hundreds of rows of shifted bytes in `events` (kinds out of the enum,
    /// on which a raw SELECT fails, and the batch's own event ids under wrong tokens, counted
    /// twice once its dead letter was replayed), from the INSERTs whose bytes happened to parse.
    async fn layout_changed(&self) -> Result<Option<String>, StoreError> {
        let columns: Vec<(String, String)> =
            self.fetch_all(self.client.query(super::queries::EVENTS_COLUMNS)).await?;
        Ok(layout_changed(&columns))
    }

    /// Runs `call` for at most the query timeout; running out is a retryable failure.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = clickhouse::error::Result<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeouts.query, call).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(StoreError::Retryable(format!("no answer within {:?}", self.timeouts.query))),
        }
    }

    /// The underlying client, for queries.
    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// Runs one statement that returns nothing (DDL, small inserts).
    pub async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        self.execute_query(self.client.query(sql)).await
    }

    /// Runs one statement that may take long (a migration copying existing aggregates) under
    /// `query_id`, waiting up to `bound` for it instead of QUERY_TIMEOUT.
    pub async fn execute_long(&self, sql: &str, query_id: &str, bound: Duration) -> Result<(), StoreError> {
        let call = self.client.query(sql).with_setting("query_id", query_id).execute();
        match tokio::time::timeout(bound, call).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(StoreError::Retryable(format!(
                "no answer within {bound:?}; the statement may still run on the server (query id {query_id})"
            ))),
        }
    }

    /// Runs one built query (with bound parameters) that returns nothing.
    pub async fn execute_query(&self, query: clickhouse::query::Query) -> Result<(), StoreError> {
        self.bounded(query.execute()).await
    }

    /// Fetches every row of a query.
    pub async fn fetch_all<T>(&self, query: clickhouse::query::Query) -> Result<Vec<T>, StoreError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.bounded(query.fetch_all::<T>()).await
    }

    /// Fetches the whole answer of a query in a text `format` (for what RowBinary cannot carry,
    /// such as the totals row of `WITH TOTALS`).
    pub async fn fetch_text(
        &self,
        query: clickhouse::query::Query,
        format: &str,
    ) -> Result<bytes::Bytes, StoreError> {
        self.bounded(async move { query.fetch_bytes(format)?.collect().await }).await
    }

    /// On [`DEDUP_SINCE`] and later, sets the deduplication window on `events` and its views'
    /// tables (safe to run again); elsewhere nothing.
    pub async fn enable_dedup(&self) -> Result<(), StoreError> {
        if !self.dedup {
            return Ok(());
        }
        let sql =
            ENABLE_DEDUP.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
        for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            self.execute(statement).await?;
        }
        Ok(())
    }

    /// Answers whether the server takes queries now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(self.client.query("SELECT 1").fetch_one::<u8>()).await.map(|_| ())
    }

    /// Ends the INSERTs with these query ids still running on the server, and waits until they
    /// have: Retryable while one still runs after QUERY_TIMEOUT.
    pub async fn kill_inserts(&self, query_ids: &[String]) -> Result<(), StoreError> {
        let q = self.client.query(super::queries::KILL_BATCH_INSERT).bind(query_ids);
        self.bounded(q.execute()).await?;
        self.until_ended(|| self.client.query(super::queries::RUNNING_BATCH_INSERTS).bind(query_ids)).await
    }

    /// Ends every replay INSERT of a replayer (query ids starting `prefix`), and waits.
    pub async fn kill_inserts_starting(&self, prefix: &str) -> Result<(), StoreError> {
        let pattern = starting_with(prefix);
        let q = self.client.query(super::queries::KILL_REPLAY_INSERTS).bind(&pattern);
        self.bounded(q.execute()).await?;
        self.until_ended(|| self.client.query(super::queries::RUNNING_QUERIES).bind(&pattern)).await
    }

    /// Waits until `running` (a count of INSERTs in `system.processes`) is 0. `KILL QUERY …
    /// SYNC` does not wait for an INSERT whose rows come in the HTTP body on ClickHouse 18.16:
    /// it cannot cancel one, answers 'cant_cancel', and the INSERT runs on and may still store
    /// its rows; looking up what is stored before it ended would send them a second time.
    async fn until_ended(&self, running: impl Fn() -> clickhouse::query::Query) -> Result<(), StoreError> {
        let give_up = tokio::time::Instant::now() + self.timeouts.query;
        loop {
            let n: u64 = self.bounded(running().fetch_one::<u64>()).await?;
            if n == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(StoreError::Retryable(format!(
                    "{n} earlier INSERT(s) of these rows still run on the server and cannot be cancelled; \
                     checking again once they end"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The stored event ids of these batches, looking only at `[first, last]` event times.
    pub async fn batch_event_ids(
        &self,
        batches: &[Uuid],
        first: OffsetDateTime,
        last: OffsetDateTime,
    ) -> Result<Vec<Uuid>, StoreError> {
        #[derive(Row, Deserialize)]
        struct Id {
            #[serde(with = "clickhouse::serde::uuid")]
            event_id: Uuid,
        }
        let batches: Vec<String> = batches.iter().map(Uuid::to_string).collect();
        let q = self
            .client
            .query(super::queries::BATCH_EVENT_IDS)
            .bind(first.unix_timestamp())
            .bind(last.unix_timestamp())
            .bind(batches)
            // The whole answer before any of it is sent: an error part way through a long
            // answer reaches the client as an error, not as text read as more ids (18.16's
            // error trailer is not recognised by the client), which would shorten the list and
            // make stored rows look missing.
            .with_setting("wait_end_of_query", "1");
        let ids: Vec<Id> = self.bounded(q.fetch_all()).await?;
        Ok(ids.into_iter().map(|i| i.event_id).collect())
    }

    /// Inserts rows as a single `INSERT … FORMAT RowBinary` with `query_id` (so that a later
    /// attempt can end it). Either every row is in ClickHouse (Ok) or the caller still owns the
    /// rows and decides what to do with them.
    pub async fn insert_events(&self, query_id: &str, rows: &[EventRow]) -> Result<(), StoreError> {
        if self.discard {
            return Ok(());
        }
        if let Some(why) = self.layout_changed().await? {
            return Err(StoreError::Rejected(why));
        }
        let timeout = self.timeouts.insert;
        let mut insert = self
            .client
            .insert::<EventRow>("events")
            .await
            .map_err(classify)?
            .with_setting("query_id", query_id)
            .with_timeouts(Some(timeout), Some(timeout));
        if self.dedup {
            insert = insert
                .with_setting("insert_deduplicate", "1")
                .with_setting("insert_deduplication_token", dedup_token(rows))
                .with_setting("deduplicate_blocks_in_dependent_materialized_views", "1");
        }
        for row in rows {
            insert.write(row).await.map_err(classify)?;
        }
        insert.end().await.map_err(classify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_width_is_a_changed_layout_and_enum_values_or_a_zone_are_not() {
        let ours = || -> Vec<(String, String)> {
            [
                ("event_id", "UUID"),
                ("ad_id", "UUID"),
                ("kind", "Enum8('impression' = 1, 'click' = 2)"),
                ("event_time", "DateTime('UTC')"),
                ("received_at", "DateTime"),
                ("ip_hash", "UInt64"),
                ("playback_time", "Nullable(Float32)"),
                ("error_code", "UInt16"),
                ("batch_id", "UUID"),
                ("traffic", "Enum8('valid' = 0, 'duplicate' = 1)"),
                ("added_by_an_analyst", "String"),
            ]
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
        };
        assert_eq!(layout_changed(&ours()), None);
        let with = |name: &str, t: &str| {
            let mut c = ours();
            c.iter_mut().find(|(n, _)| n == name).unwrap().1 = t.to_string();
            layout_changed(&c)
        };
        let why = with("error_code", "UInt64").unwrap();
        assert!(why.starts_with(LAYOUT_CHANGED) && why.contains("error_code is UInt64"), "{why}");
        assert!(with("playback_time", "Float32").is_some());
        assert!(with("event_time", "DateTime64(3)").is_some());
        assert!(with("kind", "Enum16('impression' = 1)").is_some());
        assert_eq!(with("kind", "Enum8('impression' = 1, 'click' = 2, 'new_kind' = 16)"), None);
        let mut gone = ours();
        gone.retain(|(n, _)| n != "traffic");
        assert!(layout_changed(&gone).unwrap().contains("traffic is gone"));
    }

    #[test]
    fn versions_parse() {
        assert_eq!(ServerVersion::parse("18.16.1"), Some(ServerVersion { major: 18, minor: 16 }));
        assert_eq!(ServerVersion::parse("24.8.4.13"), Some(ServerVersion { major: 24, minor: 8 }));
        assert!(ServerVersion::parse("garbage").is_none());
    }

    #[test]
    fn dedup_is_for_current_servers_and_tokens_follow_the_rows() {
        assert!(ServerVersion { major: 18, minor: 16 } < DEDUP_SINCE);
        assert!(ServerVersion { major: 24, minor: 8 } >= DEDUP_SINCE);
        let row = EventRow::test_click;
        let all = [row(1), row(2), row(3)];
        assert_eq!(dedup_token(&all), dedup_token(&all.clone()));
        assert_ne!(dedup_token(&all), dedup_token(&all[1..]), "a re-send of the missing rows is new");
        // Every table the views write is in the file.
        let sql = ENABLE_DEDUP;
        for m in crate::store::migrate::MIGRATIONS {
            for target in m.sql.split("MATERIALIZED VIEW IF NOT EXISTS ").skip(1) {
                let table = target.split_whitespace().nth(2).expect("… _mv TO table");
                assert!(sql.contains(&format!("ALTER TABLE {table} ")), "{table} lacks its window");
            }
        }
    }

    #[test]
    fn error_codes_are_found_in_server_texts() {
        assert_eq!(error_code("Code: 53, e.displayText() = DB::Exception: Type mismatch"), Some(53));
        assert_eq!(error_code("Code: 117. DB::Exception: bad"), Some(117));
        assert_eq!(error_code("connection refused"), None);
    }

    #[test]
    fn data_errors_are_not_retryable() {
        let bad = clickhouse::error::Error::BadResponse("Code: 53, e.displayText() = x".into());
        assert!(!classify(bad).is_retryable());
        let busy = clickhouse::error::Error::BadResponse("Code: 252, too many parts".into());
        assert!(classify(busy).is_retryable());
        let gone = clickhouse::error::Error::BadResponse("Code: 60, table doesn't exist".into());
        assert!(classify(gone).is_retryable());
        assert!(classify(clickhouse::error::Error::TimedOut).is_retryable());
    }
}
