//! Which address an event counts for: the TCP peer; a trusted proxy's client from
//! X-Forwarded-For or X-Real-IP; a stated address (body `ipAddress`, `X-Device-IP`) only from a
//! caller with the ingest scope. The IP-hash key is fixed here so the stored hash can be checked.

use std::net::IpAddr;

use adbeacon::iphash::IpHasher;
use serde_json::json;

use crate::support::TestApp;

const AD: &str = "11111111-1111-1111-1111-111111111111";
const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f";
const INGEST: &str = "ingest-key-0123456789";
const READER: &str = "read-key-0123456789";

fn hash(ip: &str) -> u64 {
    let key: [u8; 16] = std::array::from_fn(|i| i as u8);
    IpHasher::new(key).hash(ip.parse::<IpAddr>().unwrap())
}

/// Sends click number `n` (marked by its playback time) and returns the ip_hash stored for it.
async fn stored_hash(app: &TestApp, n: u64, headers: &[(&str, &str)], body_ip: Option<&str>) -> u64 {
    let mut body = json!({"adId": AD, "videoPlaybackTime": n});
    if let Some(ip) = body_ip {
        body["ipAddress"] = json!(ip);
    }
    let mut req = app.http.post(format!("{}/ads/click", app.base)).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    assert_eq!(req.send().await.unwrap().status(), 202);
    assert_eq!(app.wait_flushed(n).await, n);
    app.number(&format!("SELECT ip_hash FROM events WHERE playback_time = {n}")).await
}

#[tokio::test]
async fn forwarding_headers_count_only_from_trusted_proxies() {
    // Untrusted (the default): the peer, whatever the headers say.
    let app = TestApp::spawn_with(&[("IP_HASH_KEY", KEY_HEX)]).await;
    assert_eq!(stored_hash(&app, 1, &[], None).await, hash("127.0.0.1"));
    assert_eq!(
        stored_hash(&app, 2, &[("X-Forwarded-For", "203.0.113.7")], None).await,
        hash("127.0.0.1"),
        "forged XFF"
    );
    assert_eq!(stored_hash(&app, 3, &[("X-Real-IP", "203.0.113.8")], None).await, hash("127.0.0.1"));
    // Open service: a stated address is ignored too.
    assert_eq!(
        stored_hash(&app, 4, &[("X-Device-IP", "203.0.113.9")], Some("198.51.100.1")).await,
        hash("127.0.0.1")
    );

    // Behind a trusted proxy (this test's loopback peer).
    let app =
        TestApp::spawn_with(&[("IP_HASH_KEY", KEY_HEX), ("TRUSTED_PROXIES", "127.0.0.0/8, 10.0.0.0/8")])
            .await;
    assert_eq!(stored_hash(&app, 1, &[("X-Forwarded-For", "203.0.113.7")], None).await, hash("203.0.113.7"));
    // A client cannot slip an address in front: the rightmost address no trusted proxy vouches for.
    let chain = [("X-Forwarded-For", "6.6.6.6, 198.51.100.9, 10.1.2.3")];
    assert_eq!(stored_hash(&app, 2, &chain, None).await, hash("198.51.100.9"));
    assert_eq!(stored_hash(&app, 3, &[("X-Real-IP", "192.0.2.44")], None).await, hash("192.0.2.44"));
    assert_eq!(stored_hash(&app, 4, &[], None).await, hash("127.0.0.1"), "no header: the proxy itself");
}

#[tokio::test]
async fn stated_addresses_count_only_for_the_ingest_scope() {
    let keys = format!("ingest:{INGEST},read:{READER}");
    let app = TestApp::spawn_with(&[("IP_HASH_KEY", KEY_HEX), ("API_KEYS", &keys)]).await;
    let bearer = format!("Bearer {INGEST}");
    assert_eq!(
        stored_hash(&app, 1, &[("Authorization", &bearer)], Some("198.51.100.1")).await,
        hash("198.51.100.1")
    );
    let device = [("X-API-Key", INGEST), ("X-Device-IP", "203.0.113.9")];
    assert_eq!(stored_hash(&app, 2, &device, None).await, hash("203.0.113.9"), "server-side ad insertion");
    // No key, or a key without the scope: the connection's address.
    assert_eq!(stored_hash(&app, 3, &[], Some("198.51.100.1")).await, hash("127.0.0.1"));
    let reader = format!("Bearer {READER}");
    assert_eq!(
        stored_hash(&app, 4, &[("Authorization", &reader), ("X-Device-IP", "203.0.113.9")], None).await,
        hash("127.0.0.1")
    );
    // A placeholder for "viewer unknown" names no viewer: the caller's own address counts, and
    // the repeat rule does not lump every such viewer together.
    let unknown = [("X-API-Key", INGEST), ("X-Device-IP", "0.0.0.0")];
    assert_eq!(stored_hash(&app, 5, &unknown, None).await, hash("127.0.0.1"));
    assert_eq!(stored_hash(&app, 6, &unknown, Some("0.0.0.0")).await, hash("127.0.0.1"));
    let traffic =
        app.query("SELECT toString(traffic) FROM events WHERE playback_time IN (5, 6) FORMAT TSV").await;
    assert_eq!(traffic, "valid\nvalid\n", "two viewers behind a placeholder are not each other's repeats");
    // An IPv6 viewer counts by its /64.
    let v6 = [("X-API-Key", INGEST), ("X-Device-IP", "2001:db8:1:2:aaaa::1")];
    assert_eq!(stored_hash(&app, 7, &v6, None).await, hash("2001:db8:1:2::"));
}
