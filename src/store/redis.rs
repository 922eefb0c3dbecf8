//! The Redis client: one multiplexed connection, opened on first use and again after it broke,
//! with every call bounded in time.
//!
//! Redis is optional at start-up (it only matters once ClickHouse fails), so nothing here waits for
//! it: a call made while Redis is down fails at once with [`RedisError`], and the next call tries
//! to connect again. A Redis that hangs (SIGSTOP, a full network buffer) costs a call at most
//! `timeout`, never a stuck flusher.

use std::time::Duration;

use redis::{FromRedisValue, aio::MultiplexedConnection};

/// A failed Redis call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("Redis: {0}")]
pub struct RedisError(pub String);

impl From<redis::RedisError> for RedisError {
    fn from(e: redis::RedisError) -> Self {
        RedisError(e.to_string())
    }
}

/// A Redis server, reached lazily.
pub struct Redis {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
}

impl Redis {
    /// A client for `url` (`redis://[:password@]host:port/db`); connects on first use. Errors
    /// name what is wrong with the URL, never the password.
    pub fn new(url: &str, timeout: Duration) -> Result<Redis, String> {
        let client = redis::Client::open(url).map_err(|e| format!("not a Redis URL ({:?})", e.kind()))?;
        Ok(Redis { client, conn: tokio::sync::Mutex::new(None), timeout })
    }

    /// The same server through a connection of its own, opened on first use: for a thread with
    /// a runtime of its own (a connection's driver lives on the runtime that opened it).
    pub fn separate(&self) -> Redis {
        Redis { client: self.client.clone(), conn: tokio::sync::Mutex::new(None), timeout: self.timeout }
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = &*slot {
            return Ok(conn.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        let conn = self.client.get_multiplexed_async_connection_with_config(&config).await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets a connection that failed, so that the next call opens a new one.
    async fn broken(&self, e: &redis::RedisError) {
        if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error() {
            *self.conn.lock().await = None;
        }
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        self.bounded(async |conn: &mut MultiplexedConnection| cmd.query_async::<T>(conn).await).await
    }

    /// Runs a pipeline (a `MULTI`/`EXEC` transaction when built with `.atomic()`).
    pub async fn pipe<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, RedisError> {
        self.bounded(async |conn: &mut MultiplexedConnection| pipe.query_async::<T>(conn).await).await
    }

    /// Runs `call` on the connection, the wait for it and its opening included, within one
    /// `timeout`: while Redis does not answer, callers queued for the connection would each
    /// wait a connect timeout in turn otherwise.
    async fn bounded<T>(
        &self,
        call: impl AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    ) -> Result<T, RedisError> {
        let attempt = async {
            let mut conn = self.connection().await?;
            Ok::<_, RedisError>(call(&mut conn).await)
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            // Could not connect.
            Ok(Err(e)) => Err(e),
            Ok(Ok(result)) => self.settle(Ok(result)).await,
            Err(elapsed) => self.settle(Err(elapsed)).await,
        }
    }

    async fn settle<T>(
        &self,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, RedisError> {
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.broken(&e).await;
                Err(e.into())
            }
            Err(_) => {
                // Not waited for: another caller holding the slot is connecting or about to
                // fail on the same connection, and it resets the slot then.
                if let Ok(mut slot) = self.conn.try_lock() {
                    *slot = None;
                }
                Err(RedisError(format!("no answer within {:?}", self.timeout)))
            }
        }
    }

    /// Ok when Redis may hold the spill: it answers, and it never evicts keys
    /// (`maxmemory-policy noeviction`); otherwise why not.
    pub async fn check_policy(&self) -> Result<(), PolicyError> {
        // CONFIG may be renamed away on managed Redis; INFO always says it.
        let info: String =
            self.query(redis::cmd("INFO").arg("memory")).await.map_err(PolicyError::Unavailable)?;
        let policy = info
            .lines()
            .find_map(|l| l.strip_prefix("maxmemory_policy:"))
            .map(str::trim)
            .unwrap_or("noeviction");
        if policy == "noeviction" { Ok(()) } else { Err(PolicyError::Evicts(policy.to_string())) }
    }
}

/// Why Redis cannot hold the spill.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyError {
    /// It does not answer.
    #[error(transparent)]
    Unavailable(RedisError),
    /// It may evict keys: a spilled batch could vanish.
    #[error(
        "Redis runs with maxmemory-policy {0}: it may evict spilled events; set maxmemory-policy noeviction"
    )]
    Evicts(String),
}
