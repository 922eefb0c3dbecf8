//! adbeacon: video-ad tracking and analytics on ClickHouse.
//!
//! The data flow, in five lines:
//! 1. `api` validates a request into a domain `Event` (ad resolved through the cached `Catalog`;
//!    client IP trusted, rate limited, judged as valid or filtered traffic).
//! 2. `ingest::Intake` holds it as `ACK_MODE` says: in the write-ahead log (`ingest::Wal`, group
//!    commit) and then the byte-capped `ingest::Buffer` (full → 503, never a lost 2xx), or in the
//!    buffer alone, or until ClickHouse confirms it.
//! 3. `ingest::Flusher` inserts due batches into ClickHouse `events` as RowBinary, retrying.
//! 4. Materialized views roll the valid `events` up into `ad_stats_*` aggregates (filtered ones
//!    into `ad_filtered_minutely`), and all of them into `ad_counts`, which one ad's answer reads.
//! 5. Analytics read only the aggregates.
//!
//! Modules: [`config`] (environment), [`app`] (wiring and shutdown), [`server`] (the HTTP/1.1
//! accept loop), [`api`] (routes and handlers), [`domain`]
//! (validated types), [`ingest`] (intake, write-ahead log, buffer, flusher, dead letters), [`store`] (ClickHouse, migrations,
//! catalog), [`metrics`], [`telemetry`], [`iphash`].

pub mod api;
pub mod app;
pub mod config;
pub mod domain;
pub mod ingest;
pub mod iphash;
pub mod metrics;
pub mod server;
pub mod store;
pub mod telemetry;

pub use app::{App, AppError};
pub use config::Config;
