//! docs/integration.md, taken at its word: every tracking URL of its VAST snippet is fired the way
//! a player fires it (macros expanded), its click-through followed the way a browser does, its
//! sendBeacon call and its batch sent as written, and every event is found in ClickHouse and in
//! analytics.

use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::support::TestApp;

const DOC: &str = include_str!("../../docs/integration.md");
const DOC_HOST: &str = "http://localhost:8080";

/// The body of the first fenced block whose info string is `lang`.
fn block(lang: &str) -> &'static str {
    let start =
        DOC.find(&format!("```{lang}\n")).unwrap_or_else(|| panic!("no ```{lang} block")) + lang.len() + 4;
    let len = DOC[start..].find("\n```").expect("closed block");
    &DOC[start..start + len]
}

/// Every CDATA URL of the VAST snippet that points at adbeacon.
fn vast_urls() -> Vec<&'static str> {
    block("xml")
        .split("<![CDATA[")
        .skip(1)
        .filter_map(|s| s.split("]]>").next())
        .filter(|u| u.starts_with(DOC_HOST))
        .collect()
}

#[tokio::test]
async fn the_integration_guide_works_as_written() {
    let app = TestApp::spawn().await;
    let urls = vast_urls();
    assert_eq!(urls.len(), 15, "error, impression, 12 tracking events and the click-through: {urls:?}");
    let ts = (OffsetDateTime::now_utc() - time::Duration::minutes(1))
        .replace_nanosecond(0)
        .unwrap()
        .format(&Rfc3339)
        .unwrap();
    let no_redirects = crate::support::browser().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    // One ad play: its transaction id (VAST 4.1) on every beacon that carries one.
    let transaction = uuid::Uuid::new_v4().to_string();
    for (i, url) in urls.iter().enumerate() {
        // What a VAST player does with the macros.
        let fired = url
            .replace(DOC_HOST, &app.base)
            .replace("[TRANSACTIONID]", &transaction)
            .replace("[TIMESTAMP]", &ts)
            .replace("[ADPLAYHEAD]", "00:00:07.500")
            .replace("[ERRORCODE]", "405")
            .replace("[CACHEBUSTING]", &format!("{}", 10_000_000 + i));
        let resp = no_redirects.get(&fired).send().await.unwrap();
        if fired.contains("/c/") {
            assert_eq!(resp.status(), 302, "{fired}");
            assert_eq!(resp.headers()["location"], "https://www.example.com/summer-sale");
        } else {
            assert_eq!(resp.status(), 200, "{fired}");
            assert_eq!(resp.headers()["content-type"], "image/gif");
        }
    }

    // A retry layer fires the start again, with the play's transaction id: a repeat, answered
    // and not stored (each beacon of the play, under the same id, was stored above).
    let start = urls.iter().find(|u| u.contains("/t/start?")).unwrap();
    let again = start.replace(DOC_HOST, &app.base).replace("[TRANSACTIONID]", &transaction);
    assert_eq!(no_redirects.get(&again).send().await.unwrap().status(), 200);
    assert_eq!(app.metric("adbeacon_events_repeated_total").await, 1, "{again}");

    // The sendBeacon line: its URL and its JSON, sent as the browser sends them (text/plain).
    let js = block("js");
    let (url, rest) = js.split_once("sendBeacon(\"").unwrap().1.split_once("\", JSON.stringify(").unwrap();
    let body = rest.rsplit_once("));").unwrap().0;
    serde_json::from_str::<Value>(body).expect("the sendBeacon payload is JSON");
    let resp = app
        .http
        .post(url.replace(DOC_HOST, &app.base))
        .header("Content-Type", "text/plain;charset=UTF-8")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);

    // The batch of the curl example.
    let sh = block("sh");
    let batch = sh.split_once("-d '").unwrap().1.rsplit_once('\'').unwrap().0;
    let resp = app.post_raw("/ads/events", "application/json", batch).await;
    assert_eq!(resp.status(), 202);
    let result: Value = resp.json().await.unwrap();
    assert_eq!(result["accepted"], 2, "{result}");

    let expected = 14 + 1 + 1 + 2; // 14 pixels, the click-through, the beacon, the batch
    assert_eq!(app.wait_flushed(expected).await, expected);
    let kinds =
        app.query("SELECT toString(kind), count() FROM events GROUP BY kind ORDER BY kind FORMAT TSV").await;
    assert_eq!(
        kinds,
        "impression\t1\nclick\t2\ncreative_view\t1\nstart\t2\nfirst_quartile\t2\nmidpoint\t1\n\
         third_quartile\t1\ncomplete\t1\nskip\t1\npause\t1\nresume\t1\nmute\t1\nunmute\t1\nclose\t1\nerror\t1\n"
    );
    // The expanded macros were used: the player's time and playhead.
    let start = app
        .query("SELECT toUnixTimestamp(event_time), playback_time FROM events WHERE kind = 'midpoint' FORMAT TSV")
        .await;
    let want_ts = OffsetDateTime::parse(&ts, &Rfc3339).unwrap().unix_timestamp();
    assert_eq!(start, format!("{want_ts}\t7.5\n"));

    let a: Value = app
        .get("/ads/analytics?adId=11111111-1111-1111-1111-111111111111&timeframe=1h")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!((a["impressions"].as_u64(), a["totalClicks"].as_u64()), (Some(1), Some(2)));
    assert_eq!((a["video"]["starts"].as_u64(), a["video"]["completes"].as_u64()), (Some(2), Some(1)));
    assert_eq!(a["errorCodes"], serde_json::json!([{"code": 405, "count": 1}]));
}
