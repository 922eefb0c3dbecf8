//! Tests of the server support itself: if these fail, every other integration test's failure is
//! suspect, so they pin down starting, answering, stopping, killing and restarting with data intact.

use crate::support::servers::{ClickHouse, Redis, shared_clickhouse, shared_redis};

#[tokio::test]
async fn clickhouse_starts_and_answers_queries() {
    let clickhouse = ClickHouse::start();

    assert!(clickhouse.ping());
    assert_eq!(clickhouse.url(), format!("http://127.0.0.1:{}", clickhouse.http_port()));
    let version = clickhouse.query("SELECT version()").await;
    let major: u32 = version
        .trim()
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or_else(|| panic!("unexpected version {version:?}"));
    assert!(major >= 18, "ClickHouse {version} is older than 18.x");
}

#[tokio::test]
async fn clickhouse_keeps_data_across_stop_and_restart() {
    let mut clickhouse = ClickHouse::start();
    clickhouse.query("CREATE DATABASE survivor").await;
    clickhouse
        .query_in("survivor", "CREATE TABLE t (id UInt32, name String) ENGINE = MergeTree ORDER BY id")
        .await;
    clickhouse.query_in("survivor", "INSERT INTO t VALUES (7, 'seven')").await;
    let url = clickhouse.url();

    clickhouse.stop();
    assert!(!clickhouse.is_running());
    assert!(!clickhouse.ping());

    clickhouse.restart();
    assert!(clickhouse.is_running());
    assert_eq!(clickhouse.url(), url, "a restart keeps the ports");
    let rows = clickhouse.query_in("survivor", "SELECT id, name FROM t FORMAT TSV").await;
    assert_eq!(rows, "7\tseven\n");
}

#[tokio::test]
async fn clickhouse_comes_back_after_kill() {
    let mut clickhouse = ClickHouse::start();
    clickhouse.query("CREATE DATABASE crashed").await;
    clickhouse.query_in("crashed", "CREATE TABLE t (id UInt32) ENGINE = MergeTree ORDER BY id").await;
    clickhouse.query_in("crashed", "INSERT INTO t VALUES (1)").await;

    clickhouse.kill();
    assert!(!clickhouse.is_running());
    assert!(!clickhouse.ping());

    clickhouse.restart();
    assert!(clickhouse.ping());
    assert_eq!(clickhouse.query_in("crashed", "SELECT count() FROM t").await, "1\n");
}

#[tokio::test]
async fn shared_clickhouse_is_one_server() {
    assert!(std::ptr::eq(shared_clickhouse(), shared_clickhouse()));
    assert_eq!(shared_clickhouse().query("SELECT 1").await, "1\n");
}

#[tokio::test]
#[should_panic(expected = "Syntax error")]
async fn clickhouse_query_panics_with_the_server_error() {
    shared_clickhouse().query("SELEC 1").await;
}

#[test]
fn redis_starts_and_comes_back_after_kill() {
    let mut redis = Redis::start();
    assert!(redis.ping());
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/0", redis.port()));
    assert_eq!(redis.command(&["RPUSH", "spill", "a", "b"]), "2");

    redis.kill();
    assert!(!redis.is_running());
    assert!(!redis.ping());

    // The append-only file is written before Redis replies, so a SIGKILL loses nothing acknowledged.
    redis.restart();
    assert!(redis.ping());
    assert_eq!(redis.command(&["LRANGE", "spill", "0", "-1"]), "a\nb");
}

#[test]
fn redis_keeps_data_across_stop_and_restart() {
    let mut redis = Redis::start();
    assert_eq!(redis.command(&["SET", "key", "value"]), "OK");

    redis.stop();
    assert!(!redis.is_running());
    assert!(!redis.ping());

    redis.restart();
    assert!(redis.is_running());
    assert_eq!(redis.command(&["GET", "key"]), "value");
    assert_eq!(redis.command(&["GET", "missing"]), "(nil)");
}

#[test]
fn shared_redis_is_one_server() {
    assert!(std::ptr::eq(shared_redis(), shared_redis()));
    assert!(shared_redis().ping());
}
