//! adbeacon's integration tests: one binary, real `clickhouse-server` and `redis-server` processes
//! (started by `support` on free ports), the app built in-process on port 0.

mod support;

mod ads;
mod analytics;
mod batch;
mod catalog;
mod catalog_api;
mod client_ip;
mod cors;
mod dead_letters;
mod deploy;
mod hostile;
mod integration_doc;
mod lifecycle;
mod outage;
mod pipeline;
mod pixels;
mod retention;
mod servers;
mod tracking;
mod traffic;
mod wal;
