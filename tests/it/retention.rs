//! Raw retention: months of raw events older than RAW_RETENTION_MONTHS are dropped at start-up
//! (and hourly after), the aggregates keep their counts, and younger months stay whole.

use std::time::{Duration, Instant};

use adbeacon::Config;
use time::{Date, Month, OffsetDateTime};
use uuid::Uuid;

use crate::support::{TestApp, fresh_db, shared_clickhouse};

const AD: &str = "11111111-1111-1111-1111-111111111111";

/// `months` calendar months before the current month, on its 15th at noon, as unix seconds.
fn mid_month(months_back: i32) -> i64 {
    let now = OffsetDateTime::now_utc();
    let total = now.year() * 12 + i32::from(u8::from(now.month())) - 1 - months_back;
    let month = Month::try_from((total.rem_euclid(12) + 1) as u8).unwrap();
    Date::from_calendar_date(total.div_euclid(12), month, 15)
        .unwrap()
        .midnight()
        .assume_utc()
        .unix_timestamp()
        + 12 * 3600
}

#[tokio::test]
async fn months_older_than_the_retention_are_dropped_and_aggregates_stay() {
    let db = fresh_db();
    let url = shared_clickhouse().url();
    let config =
        Config::from_vars([("CLICKHOUSE_URL", url.clone()), ("CLICKHOUSE_DATABASE", db.clone())]).unwrap();
    adbeacon::app::connect_and_migrate(&config).await.unwrap();
    // Events 20, 15, 13 and 0 months back: with 13 months of retention the first two go (their
    // months ended more than 13 months and the week of grace ago), 13 months back is the oldest
    // month kept. (14 months back goes only once the grace is over: not in a month's first week.)
    let backs = [20, 15, 13, 0];
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let rows: Vec<String> = backs
        .iter()
        .flat_map(|&b| {
            (0..3).map(move |i| {
                format!(
                    "('{}', '{AD}', 'click', {}, {now}, {i}, NULL, 0, '{}', 'valid')",
                    Uuid::new_v4(),
                    mid_month(b) + i,
                    Uuid::nil()
                )
            })
        })
        .collect();
    shared_clickhouse().query_in(&db, &format!("INSERT INTO events VALUES {}", rows.join(", "))).await;
    let months = |sql: &'static str| {
        let db = db.clone();
        async move { shared_clickhouse().query_in(&db, sql).await }
    };
    let clicks_in_aggregates = "SELECT countIfMerge(clicks) FROM ad_stats_hourly";
    assert_eq!(months(clicks_in_aggregates).await.trim(), "12");

    let app = TestApp::spawn_on(&url, &db, &[("RAW_RETENTION_MONTHS", "13")]).await;
    let partitions = "SELECT count(DISTINCT partition) FROM system.parts \
                      WHERE database = currentDatabase() AND table = 'events' AND active";
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.number(partitions).await != 2 {
        assert!(Instant::now() < deadline, "old months were not dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.number("SELECT count() FROM events").await, 6, "the kept months are whole");
    let oldest = app.number("SELECT toUnixTimestamp(min(event_time)) FROM events").await as i64;
    assert_eq!(oldest, mid_month(13));
    assert_eq!(months(clicks_in_aggregates).await.trim(), "12", "aggregates keep every month");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("adbeacon_retention_months_dropped_total 2"), "{metrics}");
}
