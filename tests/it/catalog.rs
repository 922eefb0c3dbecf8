//! The ad catalog cache: a burst of first look-ups of one ad costs one ClickHouse query, a known
//! ad is re-read after CATALOG_TTL (a change made elsewhere shows), and a stale copy keeps
//! answering while ClickHouse is down.

use std::{sync::Arc, time::Duration};

use adbeacon::{Config, metrics::Metrics, store::Catalog};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::support::{ClickHouse, TestApp, fresh_db, shared_clickhouse};

fn insert_ad(id: Uuid, active: u8, version: u64, target: &str) -> String {
    format!(
        "INSERT INTO ads (id, name, video_url, target_url, active, created_at, updated_at, version) \
         VALUES ('{id}', 'Ad', '/v.mp4', '{target}', {active}, now(), now(), {version})"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_first_lookups_cost_one_query() {
    let db = fresh_db();
    let config = Config::from_vars([
        ("CLICKHOUSE_URL", shared_clickhouse().url()),
        ("CLICKHOUSE_DATABASE", db.clone()),
    ])
    .unwrap();
    let (ch, _) = adbeacon::app::connect_and_migrate(&config).await.unwrap();
    let id = Uuid::new_v4();
    shared_clickhouse().query_in(&db, &insert_ad(id, 1, 1, "https://example.com")).await;
    let metrics = Arc::new(Metrics::new());
    let catalog = Catalog::new(ch, metrics.clone(), Duration::from_secs(30), Duration::from_secs(5));
    let mut tasks = JoinSet::new();
    for _ in 0..1000 {
        let catalog = catalog.clone();
        tasks.spawn(async move { catalog.get(id).await });
    }
    while let Some(found) = tasks.join_next().await {
        assert_eq!(found.unwrap().unwrap().unwrap().id, id);
    }
    assert_eq!(metrics.catalog_lookups.get(), 1, "one ClickHouse query for 1000 concurrent look-ups");
    assert_eq!(metrics.catalog_hits.get() + metrics.catalog_misses.get(), 1000);
}

#[tokio::test]
async fn a_burst_of_requests_for_a_new_ad_costs_one_lookup() {
    let app = TestApp::spawn().await;
    let id = Uuid::new_v4();
    app.query(&insert_ad(id, 1, 1, "https://example.com")).await;
    let before = app.metric("adbeacon_catalog_lookups_total").await;
    let mut tasks = JoinSet::new();
    for _ in 0..100 {
        let (http, url) = (app.http.clone(), format!("{}/t/impression?ad={id}", app.base));
        tasks.spawn(async move { http.get(url).send().await.unwrap().status().as_u16() });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let after = app.metric("adbeacon_catalog_lookups_total").await;
    assert_eq!(after - before, 1);
}

#[tokio::test]
async fn a_change_made_elsewhere_shows_after_the_ttl_and_an_outage_keeps_the_copy() {
    let mut ch = ClickHouse::start();
    let app =
        TestApp::spawn_on(&ch.url(), &fresh_db(), &[("CATALOG_TTL", "300ms"), ("QUERY_TIMEOUT", "1s")]).await;
    let id = Uuid::new_v4();
    app.query(&insert_ad(id, 1, 1, "https://example.com/a")).await;
    let client = crate::support::browser().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let click = || client.get(format!("{}/c/{id}", app.base)).send();
    assert_eq!(click().await.unwrap().headers()["location"], "https://example.com/a");
    // Another instance retires the ad: within a TTL (plus the background re-read) this one knows.
    app.query(&insert_ad(id, 0, 2, "https://example.com/a")).await;
    let mut status = 302;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = click().await.unwrap().status().as_u16();
        if status == 404 {
            break;
        }
    }
    assert_eq!(status, 404, "the retirement never showed");
    // Reactivated, then ClickHouse goes away: the copy keeps serving well past the TTL.
    app.query(&insert_ad(id, 1, 3, "https://example.com/b")).await;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if click().await.unwrap().status() == 302 {
            break;
        }
    }
    ch.kill();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let resp = click().await.unwrap();
        assert_eq!(resp.status(), 302);
        assert_eq!(resp.headers()["location"], "https://example.com/b");
    }
}

/// An ad nobody asked for over twice the TTL may have changed long ago: the first request after
/// that waits for a fresh read instead of being served the old copy (a click-through to a target
/// the advertiser replaced, or to a retired ad).
#[tokio::test]
async fn a_copy_past_twice_the_ttl_is_read_again_before_it_serves() {
    let app = TestApp::spawn_with(&[("CATALOG_TTL", "1s")]).await;
    let id = Uuid::new_v4();
    app.query(&insert_ad(id, 1, 1, "https://example.com/old")).await;
    let client = crate::support::browser().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let click = || client.get(format!("{}/c/{id}", app.base)).send();
    assert_eq!(click().await.unwrap().headers()["location"], "https://example.com/old");
    // Another instance changes the ad; nobody asks for it for 2.5 TTLs. The read may take longer
    // than the 250 ms a request waits for it on a busy machine (the copy then serves, as it
    // should): up to three tries, each with a new target. Without the fresh read none would see
    // its new target at the first click.
    let mut seen = Vec::new();
    for version in 2..5 {
        let target = format!("https://example.com/new{version}");
        app.query(&insert_ad(id, 1, version, &target)).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let location = click().await.unwrap().headers()["location"].to_str().unwrap().to_string();
        if location == target {
            seen.clear();
            break;
        }
        seen.push(location);
        // The stale click started a background read: let it finish before the next change, so
        // that only a fresh read at the next click can see that change.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(seen.is_empty(), "the first click after a quiet spell got the old copy every time: {seen:?}");
    // Retired elsewhere: the first click after as long a quiet spell finds it retired.
    let mut statuses = Vec::new();
    for version in [10, 12, 14] {
        app.query(&insert_ad(id, 0, version, "https://example.com/retired")).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let status = click().await.unwrap().status().as_u16();
        if status == 404 {
            statuses.clear();
            break;
        }
        statuses.push(status);
        // Active again for the next try.
        app.query(&insert_ad(id, 1, version + 1, "https://example.com/again")).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        click().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(statuses.is_empty(), "the first click after retirement was served every time: {statuses:?}");
}
