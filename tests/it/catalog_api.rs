//! Managing the catalog over HTTP (create, read, change, retire) with validation, and API keys:
//! open when none are configured (and said so), scoped when they are.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::TestApp;

const ADMIN: &str = "admin-key-0123456789";
const READER: &str = "read-key-0123456789";

fn no_redirects() -> reqwest::Client {
    crate::support::browser().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Polls GET /ads (served from memory for up to 2 s) until `pred` holds.
async fn wait_listed(app: &TestApp, pred: impl Fn(&Vec<Value>) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ads: Vec<Value> = app.get("/ads").await.json().await.unwrap();
        if pred(&ads) || Instant::now() > deadline {
            return ads;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn ad_ops_create_change_and_retire_ads_and_players_follow() {
    let app = TestApp::spawn().await;
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["auth"], "open", "an open service says so");

    let ad = json!({"name": "Winter Sale", "video_url": "/videos/winter.mp4", "target_url": "https://shop.example/winter"});
    let resp = app.post("/ads", &ad).await;
    assert_eq!(resp.status(), 201);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let created: Value = resp.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/ads/{id}"));
    assert_eq!((created["active"].as_bool(), created["name"].as_str()), (Some(true), Some("Winter Sale")));
    let (status, got) = app.send(reqwest::Method::GET, &location, None, None).await;
    assert_eq!((status, got["target_url"].as_str()), (200, Some("https://shop.example/winter")));
    let listed = wait_listed(&app, |ads| ads.iter().any(|a| a["id"] == id)).await;
    assert!(listed.iter().any(|a| a["id"] == id), "a new ad reaches GET /ads");
    // Events for it are taken at once (this instance invalidated its cache on the write).
    assert_eq!(app.post("/ads/click", &json!({"adId": id})).await.status(), 202);

    // Changed: the click-through follows the new target.
    let change = json!({"name": "Winter Sale II", "video_url": "https://cdn.example/w2.mp4", "target_url": "https://shop.example/w2"});
    let (status, changed) = app.send(reqwest::Method::PUT, &location, None, Some(change)).await;
    assert_eq!(status, 200, "{changed}");
    assert!(changed["version"].as_u64() > created["version"].as_u64());
    assert_eq!(changed["created_at"], created["created_at"]);
    let resp = no_redirects().get(format!("{}/c/{id}", app.base)).send().await.unwrap();
    assert_eq!(resp.headers()["location"], "https://shop.example/w2");

    // Retired: it leaves GET /ads, clicks get 404, its data stays readable.
    let (status, _) = app.send(reqwest::Method::DELETE, &location, None, None).await;
    assert_eq!(status, 204);
    let listed = wait_listed(&app, |ads| ads.iter().all(|a| a["id"] != id)).await;
    assert!(listed.iter().all(|a| a["id"] != id));
    assert_eq!(no_redirects().get(format!("{}/c/{id}", app.base)).send().await.unwrap().status(), 404);
    let (_, retired) = app.send(reqwest::Method::GET, &location, None, None).await;
    assert_eq!(retired["active"], false);
    let (status, _) = app.send(reqwest::Method::DELETE, &location, None, None).await;
    assert_eq!(status, 204, "retiring twice is fine");
    assert_eq!(app.wait_flushed(2).await, 2);
    let a: Value = app.get(&format!("/ads/analytics?adId={id}&timeframe=1h")).await.json().await.unwrap();
    assert_eq!(a["totalClicks"], 2, "a retired ad's events still count");

    // A change that does not mention `active` (a typo fixed) leaves it retired; saying so
    // brings it back.
    let fix = json!({"name": "Winter Sale 2", "video_url": "https://cdn.example/w2.mp4", "target_url": "https://shop.example/w2"});
    let (status, fixed) = app.send(reqwest::Method::PUT, &location, None, Some(fix.clone())).await;
    assert_eq!((status, fixed["active"].as_bool()), (200, Some(false)), "{fixed}");
    assert_eq!(no_redirects().get(format!("{}/c/{id}", app.base)).send().await.unwrap().status(), 404);
    let mut back = fix;
    back["active"] = json!(true);
    let (status, revived) = app.send(reqwest::Method::PUT, &location, None, Some(back)).await;
    assert_eq!((status, revived["active"].as_bool()), (200, Some(true)), "{revived}");
    assert_eq!(no_redirects().get(format!("{}/c/{id}", app.base)).send().await.unwrap().status(), 302);
}

#[tokio::test]
async fn bad_catalog_requests_get_the_right_status() {
    let app = TestApp::spawn().await;
    let id = "11111111-1111-1111-1111-111111111111";
    let ok = json!({"name": "A", "video_url": "/v.mp4", "target_url": "https://a.example"});
    let cases = [
        (
            reqwest::Method::POST,
            "/ads".to_string(),
            json!({"id": id, "name": "A", "video_url": "/v.mp4", "target_url": "https://a.example"}),
            409,
            "exists already",
        ),
        (
            reqwest::Method::POST,
            "/ads".to_string(),
            json!({"name": "   ", "video_url": "/v.mp4", "target_url": "https://a.example"}),
            422,
            "name must be 1 to 200 characters (leading and trailing spaces do not count), got 0",
        ),
        (
            reqwest::Method::POST,
            "/ads".to_string(),
            json!({"name": "A", "video_url": "/v.mp4", "target_url": "ftp://a.example"}),
            422,
            "target_url must be an absolute http(s) URL",
        ),
        (
            reqwest::Method::POST,
            "/ads".to_string(),
            json!({"name": "A", "video_url": "v.mp4", "target_url": "https://a.example"}),
            422,
            "video_url must be",
        ),
        (
            reqwest::Method::POST,
            "/ads".to_string(),
            json!({"name": "A", "video_url": "/v.mp4", "target_url": "https://www.shop.example@evil.example/"}),
            422,
            "target_url must be an absolute http(s) URL with a host and no user name",
        ),
        (
            reqwest::Method::POST,
            "/ads".to_string(),
            json!({"name": "A", "video_url": "//evil.example/v.mp4", "target_url": "https://a.example"}),
            422,
            "video_url must be",
        ),
        (
            reqwest::Method::POST,
            "/ads".to_string(),
            json!({"name": "A", "video_url": "/v.mp4", "target_url": format!("https://a.example/{}", "x".repeat(2100))}),
            422,
            "at most 2048 characters",
        ),
        (
            reqwest::Method::PUT,
            "/ads/99999999-9999-9999-9999-999999999999".to_string(),
            ok.clone(),
            404,
            "not found",
        ),
        (
            reqwest::Method::PUT,
            format!("/ads/{id}"),
            json!({"id": "22222222-2222-2222-2222-222222222222", "name": "A", "video_url": "/v.mp4", "target_url": "https://a.example"}),
            422,
            "differs",
        ),
        (reqwest::Method::GET, "/ads/not-a-uuid".to_string(), Value::Null, 400, "must be a UUID"),
        (
            reqwest::Method::DELETE,
            "/ads/99999999-9999-9999-9999-999999999999".to_string(),
            Value::Null,
            404,
            "not found",
        ),
    ];
    for (method, path, body, status, says) in cases {
        let body = (!body.is_null()).then_some(body);
        let (got, answer) = app.send(method.clone(), &path, None, body).await;
        assert_eq!(got, status, "{method} {path}: {answer}");
        assert!(answer["error"].as_str().unwrap_or_default().contains(says), "{method} {path}: {answer}");
    }
}

#[tokio::test]
async fn api_keys_guard_the_catalog_and_analytics_but_not_tracking() {
    let keys = format!("admin:{ADMIN},read:{READER}");
    let app = TestApp::spawn_with(&[("API_KEYS", &keys)]).await;
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["auth"], "api_keys");
    let ad = json!({"name": "Keyed", "video_url": "/v.mp4", "target_url": "https://a.example"});

    let resp = app.post("/ads", &ad).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let (status, body) =
        app.send(reqwest::Method::POST, "/ads", Some("wrong-key-0123456789"), Some(ad.clone())).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("this API key is not valid")));
    let (status, body) = app.send(reqwest::Method::POST, "/ads", Some(READER), Some(ad.clone())).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("this API key lacks the admin scope")));
    let (status, created) = app.send(reqwest::Method::POST, "/ads", Some(ADMIN), Some(ad)).await;
    assert_eq!(status, 201);
    let id = created["id"].as_str().unwrap();
    // X-API-Key works as well as a bearer token.
    let resp =
        app.http.get(format!("{}/ads/{id}", app.base)).header("X-API-Key", READER).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    let analytics = format!("/ads/analytics?adId={id}");
    assert_eq!(app.send(reqwest::Method::GET, &analytics, None, None).await.0, 401);
    assert_eq!(app.send(reqwest::Method::GET, &analytics, Some(READER), None).await.0, 200);
    assert_eq!(app.send(reqwest::Method::GET, "/ads/analytics", Some(ADMIN), None).await.0, 200);

    // Players need no key.
    assert_eq!(app.post("/ads/click", &json!({"adId": id})).await.status(), 202);
    assert_eq!(app.get(&format!("/t/start?ad={id}")).await.status(), 200);
    assert_eq!(app.get("/ads").await.status(), 200);

    // The spec shows both ways to send a key.
    let spec: Value = app.get("/openapi.json").await.json().await.unwrap();
    let schemes = spec["components"]["securitySchemes"].as_object().unwrap();
    assert!(schemes.values().any(|s| s["scheme"] == "bearer"), "{schemes:?}");
    assert!(schemes.values().any(|s| s["name"] == "X-API-Key"), "{schemes:?}");
}

/// With API keys configured, a request without a valid key is answered 401 (or 403 for a key
/// without the scope) before its parameters and body are looked at: a malformed, oversized or
/// invalid request tells a caller who may not make it nothing about what would be accepted.
/// With the right key, the same requests get the answers about their bodies.
#[tokio::test]
async fn the_key_is_checked_before_the_request_is_read() {
    let keys = format!("admin:{ADMIN},read:{READER}");
    let app = TestApp::spawn_with(&[("API_KEYS", &keys), ("MAX_BODY_BYTES", "1KiB")]).await;
    let ad = "/ads/00000000-0000-4000-8000-00000000abcd";
    let big = format!(r#"{{"name": "{}"}}"#, "x".repeat(4096));
    let cases: [(reqwest::Method, &str, &str, String, u16); 6] = [
        (reqwest::Method::POST, "/ads", "application/json", "{not json".into(), 400),
        (reqwest::Method::POST, "/ads", "application/json", big, 413),
        (
            reqwest::Method::POST,
            "/ads",
            "application/json",
            r#"{"name": "", "video_url": "/v.mp4", "target_url": "https://a.example"}"#.into(),
            422,
        ),
        (reqwest::Method::PUT, ad, "application/json", "[1, 2".into(), 400),
        (reqwest::Method::POST, "/admin/dead-letters/replay", "application/json", "{\"ids\": 7".into(), 400),
        (reqwest::Method::GET, "/admin/dead-letters?limit=lots", "application/json", String::new(), 400),
    ];
    for (method, path, content_type, body, with_admin) in cases {
        let send = |key: Option<&str>| {
            let mut req = app.http.request(method.clone(), format!("{}{path}", app.base));
            req = req.header("content-type", content_type).body(body.clone());
            if let Some(key) = key {
                req = req.bearer_auth(key);
            }
            async move {
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                (status, resp.json::<Value>().await.unwrap_or_default())
            }
        };
        let (status, answer) = send(None).await;
        assert_eq!(status, 401, "{method} {path} without a key: {answer}");
        assert!(answer["error"].as_str().unwrap_or_default().contains("API key"), "{answer}");
        let (status, answer) = send(Some("wrong-key-0123456789")).await;
        assert_eq!((status, answer["error"].as_str()), (401, Some("this API key is not valid")), "{path}");
        let (status, answer) = send(Some(READER)).await;
        assert_eq!(status, 403, "{method} {path} with the read key: {answer}");
        let (status, answer) = send(Some(ADMIN)).await;
        assert_eq!(status, with_admin, "{method} {path} with the admin key: {answer}");
        assert!(answer["error"].is_string(), "{method} {path}: a JSON error: {answer}");
    }
    // Analytics needs the read scope: a bad timeframe is a 400 only for a caller who may read.
    let analytics = "/ads/analytics?timeframe=fortnight";
    assert_eq!(app.send(reqwest::Method::GET, analytics, None, None).await.0, 401);
    assert_eq!(app.send(reqwest::Method::GET, analytics, Some(READER), None).await.0, 400);
    // The tracking endpoints stay open: their bad input is a 400 for anyone.
    let (status, _) = app.send(reqwest::Method::POST, "/ads/click", None, Some(json!({"adId": 7}))).await;
    assert_eq!(status, 400);
}

/// A change and a retirement of one ad at the same moment (two ad-ops people, a script and a
/// person): both are answered 2xx and neither undoes the other. The change's name stays, whichever
/// write came last; before, the retirement could write back the name it had read before the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_and_a_retirement_at_once_both_hold() {
    let app = TestApp::spawn().await;
    for round in 0..20 {
        let ad = json!({"name": "Before", "video_url": "/v.mp4", "target_url": "https://shop.example/a"});
        let (status, created) = app.send(reqwest::Method::POST, "/ads", None, Some(ad)).await;
        assert_eq!(status, 201, "{created}");
        let path = format!("/ads/{}", created["id"].as_str().unwrap());
        let change = json!({"name": "After", "video_url": "/v.mp4", "target_url": "https://shop.example/a"});
        let ((changed, _), (retired, _)) = tokio::join!(
            app.send(reqwest::Method::PUT, &path, None, Some(change)),
            app.send(reqwest::Method::DELETE, &path, None, None)
        );
        assert_eq!((changed, retired), (200, 204), "round {round}");
        let (_, now) = app.send(reqwest::Method::GET, &path, None, None).await;
        assert_eq!(now["name"], "After", "round {round}: the change was undone: {now}");
    }
}

/// Optimistic locking for ad-ops: every answer with an ad carries its version as `ETag`; a change
/// or a retirement sent with `If-Match` goes ahead only if the ad is still at that version, else
/// 412 and nothing changes (two people editing from the same read: the second learns of the
/// first instead of undoing it). Without `If-Match` a change is unconditional, as before.
#[tokio::test]
async fn if_match_guards_changes_with_the_etag_read() {
    let app = TestApp::spawn().await;
    let url = |path: &str| format!("{}{path}", app.base);
    let ad =
        |name: &str| json!({"name": name, "video_url": "/v.mp4", "target_url": "https://shop.example/a"});
    let etag_of = |resp: &reqwest::Response| resp.headers()["etag"].to_str().unwrap().to_string();

    let created = app.http.post(url("/ads")).json(&ad("First")).send().await.unwrap();
    assert_eq!(created.status(), 201);
    let first = etag_of(&created);
    let body: Value = created.json().await.unwrap();
    assert_eq!(first, format!("\"{}\"", body["version"]), "the ETag is the version, quoted");
    let path = format!("/ads/{}", body["id"].as_str().unwrap());
    let read = app.http.get(url(&path)).send().await.unwrap();
    assert_eq!(etag_of(&read), first);

    // Two people read version `first`; one changes the ad with it.
    let put = |name: &str, if_match: Option<&str>| {
        let mut req = app.http.put(url(&path)).json(&ad(name));
        if let Some(tag) = if_match {
            req = req.header("If-Match", tag);
        }
        req.send()
    };
    let changed = put("Second", Some(&first)).await.unwrap();
    assert_eq!(changed.status(), 200);
    let second = etag_of(&changed);
    assert_ne!(second, first);

    // The other's change and retirement, from the same read, are refused and change nothing.
    let stale = put("Lost update", Some(&first)).await.unwrap();
    assert_eq!(stale.status(), 412);
    let error: Value = stale.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains(&second), "names the current ETag: {error}");
    let retire = app.http.delete(url(&path)).header("If-Match", &first).send().await.unwrap();
    assert_eq!(retire.status(), 412);
    for junk in
        ["W/".to_string() + &second, "garbage".into(), format!("\"{}0\"", &second[1..second.len() - 1])]
    {
        assert_eq!(put("Junk", Some(&junk)).await.unwrap().status(), 412, "If-Match: {junk}");
    }
    let (_, now) = app.send(reqwest::Method::GET, &path, None, None).await;
    assert_eq!((now["name"].as_str(), now["active"].as_bool()), (Some("Second"), Some(true)));

    // A list that holds the current tag, and `*`, let the change through; no If-Match too.
    let listed = put("Third", Some(&format!("\"1\", {second}"))).await.unwrap();
    assert_eq!(listed.status(), 200);
    let third = etag_of(&listed);
    assert_eq!(put("Fourth", Some("*")).await.unwrap().status(), 200);
    assert_eq!(put("Fifth", None).await.unwrap().status(), 200);
    let retire = app.http.delete(url(&path)).header("If-Match", &third).send().await.unwrap();
    assert_eq!(retire.status(), 412, "Fourth and Fifth came after {third}");
    let current = etag_of(&app.http.get(url(&path)).send().await.unwrap());
    let retire = app.http.delete(url(&path)).header("If-Match", &current).send().await.unwrap();
    assert_eq!(retire.status(), 204);
    let (_, now) = app.send(reqwest::Method::GET, &path, None, None).await;
    assert_eq!((now["name"].as_str(), now["active"].as_bool()), (Some("Fifth"), Some(false)));
}
