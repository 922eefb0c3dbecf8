//! Storage: ClickHouse (events, the catalog, migrations) and the SQL the service runs.

pub mod catalog;
pub mod clickhouse;
pub mod migrate;
pub mod queries;

pub use self::{
    catalog::Catalog,
    clickhouse::{ClickHouse, EventRow, ServerVersion, StoreError, Timeouts},
};
