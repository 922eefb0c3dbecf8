//! Storage: ClickHouse (events, the catalog, analytics, migrations), the SQL the service runs, and
//! the Redis client (the spill and the dead letters).

pub mod analytics;
pub mod catalog;
pub mod clickhouse;
pub mod migrate;
pub mod queries;
pub mod redis;
pub mod retention;

pub use self::{
    analytics::Analytics,
    catalog::Catalog,
    clickhouse::{ClickHouse, EventRow, LAYOUT_CHANGED, ServerVersion, StoreError, Timeouts},
    redis::{PolicyError, Redis, RedisError},
};
