//! `GET /ads` and the demo-ad seed.

use serde_json::json;

use crate::support::{TestApp, fresh_db, shared_clickhouse};

#[tokio::test]
async fn the_three_demo_ads_are_listed() {
    let app = TestApp::spawn().await;
    let resp = app.get("/ads").await;
    assert_eq!(resp.status(), 200);
    let ads: Vec<serde_json::Value> = resp.json().await.unwrap();
    let ids: Vec<&str> = ads.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "11111111-1111-1111-1111-111111111111",
            "22222222-2222-2222-2222-222222222222",
            "33333333-3333-3333-3333-333333333333"
        ]
    );
    for ad in &ads {
        for field in ["name", "video_url", "target_url"] {
            assert!(ad[field].as_str().is_some_and(|s| !s.is_empty()), "{field} in {ad}");
        }
    }
}

#[tokio::test]
async fn an_empty_catalog_lists_an_empty_array() {
    let app = TestApp::spawn_with(&[("SEED_DEMO_ADS", "false")]).await;
    let resp = app.get("/ads").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "[]");
    // And with no catalog, no event is accepted.
    let resp = app.post("/ads/click", &json!({"adId": "11111111-1111-1111-1111-111111111111"})).await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn seeding_happens_only_into_an_empty_catalog() {
    let db = fresh_db();
    let url = shared_clickhouse().url();
    let mut first = TestApp::spawn_on(&url, &db, &[]).await;
    // An ad-ops change to a demo ad must survive a restart.
    first
        .query(
            "INSERT INTO ads SELECT toUUID('11111111-1111-1111-1111-111111111111'), 'Renamed', 'v', \
             'https://t.example', 0, now(), now(), 2",
        )
        .await;
    first.stop().await.unwrap();
    let second = TestApp::spawn_on(&url, &db, &[]).await;
    assert_eq!(second.number("SELECT count() FROM ads").await, 4);
    let ads: Vec<serde_json::Value> = second.get("/ads").await.json().await.unwrap();
    assert_eq!(ads.len(), 2, "the deactivated ad leaves the list: {ads:?}");
}
