//! Storage: ClickHouse (events, the catalog, analytics, migrations) and the SQL the service runs.

pub mod analytics;
pub mod catalog;
pub mod clickhouse;
pub mod migrate;
pub mod queries;
pub mod retention;

pub use self::{
    analytics::Analytics,
    catalog::Catalog,
    clickhouse::{ClickHouse, EventRow, ServerVersion, StoreError, Timeouts},
};
