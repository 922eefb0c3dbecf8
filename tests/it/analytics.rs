//! `GET /ads/analytics` against a recount of raw `events`: randomized windows exact to the minute
//! (edges, midnight, a month boundary, late events, whole days), the rolling timeframes, the
//! every-ad listing with paging, freshness and the 400/404 answers. The test ClickHouse runs in
//! a non-UTC time zone (see `support::servers::TEST_SERVER_TIMEZONE`), so every bucket is proven
//! to be UTC.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339, macros::datetime};
use uuid::Uuid;

use crate::support::{TestApp, servers::TEST_SERVER_TIMEZONE};

const ADS: [&str; 3] = [
    "11111111-1111-1111-1111-111111111111",
    "22222222-2222-2222-2222-222222222222",
    "33333333-3333-3333-3333-333333333333",
];

const KINDS: [&str; 15] = [
    "impression",
    "click",
    "creative_view",
    "start",
    "first_quartile",
    "midpoint",
    "third_quartile",
    "complete",
    "skip",
    "pause",
    "resume",
    "mute",
    "unmute",
    "close",
    "error",
];

/// splitmix64: a seeded generator, so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn rfc(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t).unwrap().format(&Rfc3339).unwrap()
}

fn unix(text: &str) -> i64 {
    OffsetDateTime::parse(text, &Rfc3339).unwrap().unix_timestamp()
}

async fn get_json(app: &TestApp, path: &str) -> (u16, Value) {
    let resp = app.get(path).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

/// The numbers of one ad in `[from, to)`, recounted from raw `events`, keyed by ad id.
async fn recount(app: &TestApp, from: i64, to: i64) -> HashMap<String, Value> {
    let sql = format!(
        "SELECT toString(ad_id), countIf(kind = 'impression'), countIf(kind = 'click'), \
         uniqExactIf(ip_hash, kind = 'click'), countIf(kind = 'start'), countIf(kind = 'first_quartile'), \
         countIf(kind = 'midpoint'), countIf(kind = 'third_quartile'), countIf(kind = 'complete'), \
         countIf(kind = 'skip'), countIf(kind = 'creative_view'), countIf(kind = 'pause'), \
         countIf(kind = 'resume'), countIf(kind = 'mute'), countIf(kind = 'unmute'), \
         countIf(kind = 'close'), countIf(kind = 'error'), \
         ifNull(sumIf(toFloat64(playback_time), kind = 'click' AND isNotNull(playback_time)), 0), \
         countIf(kind = 'click' AND isNotNull(playback_time)) \
         FROM events WHERE event_time >= toDateTime({from}) AND event_time < toDateTime({to}) \
         AND traffic = 'valid' GROUP BY ad_id FORMAT TSV"
    );
    let names = [
        "impressions",
        "totalClicks",
        "uniqueClicks",
        "starts",
        "firstQuartile",
        "midpoint",
        "thirdQuartile",
        "completes",
        "skips",
        "creativeViews",
        "pauses",
        "resumes",
        "mutes",
        "unmutes",
        "closes",
        "errors",
    ];
    let mut out = HashMap::new();
    for line in app.query(&sql).await.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        let mut v = serde_json::Map::new();
        for (name, col) in names.iter().zip(&cols[1..]) {
            v.insert(name.to_string(), json!(col.parse::<u64>().unwrap()));
        }
        let (sum, n): (f64, u64) = (cols[17].parse().unwrap(), cols[18].parse().unwrap());
        v.insert("avgClickPlaybackTime".into(), if n == 0 { Value::Null } else { json!(sum / n as f64) });
        out.insert(cols[0].to_string(), Value::Object(v));
    }
    out
}

fn zero_counts() -> Value {
    json!({"impressions": 0, "totalClicks": 0, "uniqueClicks": 0, "starts": 0, "firstQuartile": 0,
        "midpoint": 0, "thirdQuartile": 0, "completes": 0, "skips": 0, "creativeViews": 0, "pauses": 0,
        "resumes": 0, "mutes": 0, "unmutes": 0, "closes": 0, "errors": 0, "avgClickPlaybackTime": null})
}

/// Per-hour impressions, clicks and unique clicks of one ad inside `[from, to)`, from raw events.
async fn recount_hours(app: &TestApp, ad: &str, from: i64, to: i64) -> HashMap<i64, [u64; 3]> {
    let sql = format!(
        "SELECT toUInt32(toStartOfHour(event_time)) AS h, countIf(kind = 'impression'), countIf(kind = 'click'), \
         uniqExactIf(ip_hash, kind = 'click') FROM events WHERE ad_id = toUUID('{ad}') AND traffic = 'valid' \
         AND event_time >= toDateTime({from}) AND event_time < toDateTime({to}) GROUP BY h FORMAT TSV"
    );
    app.query(&sql)
        .await
        .lines()
        .map(|l| {
            let c: Vec<u64> = l.split('\t').map(|x| x.parse().unwrap()).collect();
            (c[0] as i64, [c[1], c[2], c[3]])
        })
        .collect()
}

/// Checks one ad's answer for `[from, to)` against the raw events, field by field.
async fn check_ad(app: &TestApp, ad: &str, from: i64, to: i64) {
    let path = format!("/ads/analytics?adId={ad}&from={}&to={}", rfc(from), rfc(to));
    let (status, got) = get_json(app, &path).await;
    assert_eq!(status, 200, "{path}: {got}");
    let ctx = format!("{ad} [{}, {})", rfc(from), rfc(to));
    assert_eq!((unix(got["from"].as_str().unwrap()), unix(got["to"].as_str().unwrap())), (from, to), "{ctx}");
    assert_eq!(got["timeframe"], "custom");
    let want = recount(app, from, to).await.remove(ad).unwrap_or_else(zero_counts);
    for key in ["impressions", "totalClicks", "uniqueClicks"] {
        assert_eq!(got[key], want[key], "{ctx}: {key}");
    }
    for (key, value) in want.as_object().unwrap() {
        if ["impressions", "totalClicks", "uniqueClicks"].contains(&key.as_str()) {
            continue;
        }
        match (value.as_f64(), got["video"][key].as_f64()) {
            (Some(w), Some(g)) => assert!((w - g).abs() < 1e-9, "{ctx}: video.{key} {g} != {w}"),
            _ => assert_eq!(got["video"][key], *value, "{ctx}: video.{key}"),
        }
    }
    let clicks = want["totalClicks"].as_u64().unwrap();
    let impressions = want["impressions"].as_u64().unwrap();
    let ctr = if impressions == 0 { 0.0 } else { clicks as f64 / impressions as f64 };
    assert!((got["ctr"].as_f64().unwrap() - ctr).abs() < 1e-12, "{ctx}: ctr");

    // Traffic quality: each reason's impressions, clicks and events, and gross = net + filtered.
    let sql = format!(
        "SELECT toString(traffic), countIf(kind = 'impression'), countIf(kind = 'click'), count() FROM events \
         WHERE ad_id = toUUID('{ad}') AND event_time >= toDateTime({from}) AND event_time < toDateTime({to}) \
         GROUP BY traffic FORMAT TSV"
    );
    let mut by_reason: HashMap<String, [u64; 3]> = HashMap::new();
    for line in app.query(&sql).await.lines() {
        let c: Vec<&str> = line.split('\t').collect();
        by_reason
            .insert(c[0].to_string(), [c[1].parse().unwrap(), c[2].parse().unwrap(), c[3].parse().unwrap()]);
    }
    let counts = |v: &Value| {
        [v["impressions"].as_u64(), v["clicks"].as_u64(), v["events"].as_u64()].map(Option::unwrap)
    };
    let traffic = &got["traffic"];
    let mut gross = [0u64; 3];
    for (reason, key) in
        [("valid", "net"), ("duplicate", "duplicate"), ("bot", "bot"), ("empty_user_agent", "emptyUserAgent")]
    {
        let want = by_reason.get(reason).copied().unwrap_or_default();
        let slot = if key == "net" { &traffic["net"] } else { &traffic["filtered"][key] };
        assert_eq!(counts(slot), want, "{ctx}: traffic {reason}");
        for i in 0..3 {
            gross[i] += want[i];
        }
    }
    assert_eq!(counts(&traffic["gross"]), gross, "{ctx}: gross");

    // VAST errors by code: the valid error events, most frequent first, ties by code.
    let sql = format!(
        "SELECT error_code, count() AS n FROM events WHERE ad_id = toUUID('{ad}') AND kind = 'error' \
         AND traffic = 'valid' AND event_time >= toDateTime({from}) AND event_time < toDateTime({to}) \
         GROUP BY error_code ORDER BY n DESC, error_code FORMAT TSV"
    );
    let want: Vec<Value> = app
        .query(&sql)
        .await
        .lines()
        .map(|line| {
            let (code, n) = line.split_once('\t').unwrap();
            json!({"code": code.parse::<u16>().unwrap(), "count": n.parse::<u64>().unwrap()})
        })
        .collect();
    assert_eq!(got["errorCodes"], json!(want), "{ctx}: errorCodes");

    // The series: every hour the window touches, in order, each equal to its recount.
    let hours = recount_hours(app, ad, from, to).await;
    let series = got["series"].as_array().unwrap();
    let first_hour = from.div_euclid(3600) * 3600;
    let expected_len = ((to - first_hour) + 3599) / 3600;
    assert_eq!(series.len() as i64, expected_len, "{ctx}: series length");
    let mut by_hour_of_day = [0u64; 24];
    for (i, point) in series.iter().enumerate() {
        let start = first_hour + i as i64 * 3600;
        assert_eq!(unix(point["start"].as_str().unwrap()), start, "{ctx}: series[{i}].start");
        let [imp, clk, uniq] = hours.get(&start).copied().unwrap_or_default();
        assert_eq!(
            [&point["impressions"], &point["clicks"], &point["uniqueClicks"]],
            [&json!(imp), &json!(clk), &json!(uniq)],
            "{ctx}: series hour {}",
            rfc(start)
        );
        by_hour_of_day[(start.rem_euclid(86_400) / 3600) as usize] += clk;
    }
    for (h, n) in by_hour_of_day.iter().enumerate() {
        assert_eq!(got["hourlyClicks"][format!("{h:02}")], json!(n), "{ctx}: hourlyClicks {h:02}");
    }
}

/// Checks the every-ad listing for `[from, to)` against the raw events.
async fn check_listing(app: &TestApp, from: i64, to: i64) {
    let path = format!("/ads/analytics?from={}&to={}", rfc(from), rfc(to));
    let (status, got) = get_json(app, &path).await;
    assert_eq!(status, 200, "{path}: {got}");
    let want = recount(app, from, to).await;
    let ads = got["ads"].as_array().unwrap();
    assert_eq!(ads.len(), ADS.len(), "{path}: {got}");
    for item in ads {
        let id = item["adId"].as_str().unwrap();
        let w = want.get(id).cloned().unwrap_or_else(zero_counts);
        assert_eq!(
            [&item["impressions"], &item["clicks"], &item["uniqueClicks"]],
            [&w["impressions"], &w["totalClicks"], &w["uniqueClicks"]],
            "{path}: {id}"
        );
    }
    let keys: Vec<(u64, u64)> =
        ads.iter().map(|a| (a["clicks"].as_u64().unwrap(), a["impressions"].as_u64().unwrap())).collect();
    assert!(keys.windows(2).all(|w| w[0] >= w[1]), "{path}: not busiest first: {keys:?}");
}

/// Inserts one impression of `ad` straight into `events`, at unix second `at` (received then
/// too), with the `traffic` class given: history the service's clock would not take.
async fn insert_impression(app: &TestApp, ad: &str, at: i64, traffic: &str) {
    app.query(&format!(
        "INSERT INTO events VALUES ('{}', '{ad}', 'impression', {at}, {at}, 7, NULL, 0, '{}', '{traffic}')",
        Uuid::new_v4(),
        Uuid::new_v4()
    ))
    .await;
}

/// POSTs clicks from distinct loopback addresses (127.0.0.2, …): uniques come from the TCP peer.
async fn click_from(app: &TestApp, ip: u8, body: Value) {
    let client =
        crate::support::browser().local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, ip))).build().unwrap();
    let resp = client.post(format!("{}/ads/click", app.base)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap_or_default());
}

/// An event time in `[base, base + span)` that often sits on a minute edge, the last second of a
/// minute, or an hour/day edge.
fn edgy_time(rng: &mut Rng, base: i64, span: i64) -> i64 {
    let t = base + rng.below(span as u64) as i64;
    match rng.below(6) {
        0 => t - t % 60,
        1 => t - t % 60 + 59,
        2 => t - t % 3600,
        3 => t - t % 86_400 + rng.below(2) as i64 * 86_400 - 1,
        _ => t,
    }
}

/// One INSERT of random events straight into `events`.
struct RandomInsert {
    sql: String,
    rows: usize,
}

/// `inserts` INSERTs of 400 events each (several parts for the views to merge): every kind, the
/// three ads, playback positions or none, one in five filtered, received now but timed by `time`
/// (late events: days before they arrive).
fn random_inserts(rng: &mut Rng, time: impl Fn(&mut Rng) -> i64, inserts: usize) -> Vec<RandomInsert> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    (0..inserts)
        .map(|_| {
            let batch = Uuid::new_v4();
            let rows: Vec<String> = (0..400)
                .map(|_| {
                    let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
                    let ad = ADS[rng.below(3) as usize];
                    let playback = if rng.below(5) == 0 {
                        "NULL".to_string()
                    } else {
                        format!("{}", rng.below(480) as f64 / 4.0)
                    };
                    // One row in five is filtered traffic, which must stay out of the net numbers.
                    let traffic = match rng.below(10) {
                        0 => "duplicate",
                        1 => "bot",
                        _ if rng.below(8) == 0 => "empty_user_agent",
                        _ => "valid",
                    };
                    // Errors carry one of a few VAST codes, so that the answer sorts several.
                    let code = if kind == "error" { [100, 303, 400, 901][rng.below(4) as usize] } else { 0 };
                    format!(
                        "('{}', '{ad}', '{kind}', {}, {now}, {}, {playback}, {code}, '{batch}', '{traffic}')",
                        Uuid::new_v4(),
                        time(rng),
                        1 + rng.below(150)
                    )
                })
                .collect();
            RandomInsert { sql: format!("INSERT INTO events VALUES {}", rows.join(", ")), rows: rows.len() }
        })
        .collect()
}

#[tokio::test]
async fn randomized_windows_equal_a_recount_of_raw_events() {
    let app = TestApp::spawn_with(&[("MAX_EVENT_AGE", "60d")]).await;
    let tz = app.query("SELECT timezone()").await;
    assert_eq!(tz.trim(), TEST_SERVER_TIMEZONE, "the server must not run in UTC for this test to mean much");

    // Five days around midnight of 31 October / 1 November 2026 (a month and partition boundary).
    let base = datetime!(2026-10-29 00:00 UTC).unix_timestamp();
    let span = 5 * 86_400;
    let mut rng = Rng(0xADBE_AC0F);
    let time = |rng: &mut Rng| edgy_time(rng, base, span);

    // Clicks through the API, with client timestamps (late events: days before they arrive).
    let mut api_clicks = 0;
    for i in 0..80u64 {
        let ad = ADS[(i % 3) as usize];
        let body =
            json!({"adId": ad, "timestamp": rfc(time(&mut rng)), "videoPlaybackTime": (i % 40) as f64 / 4.0});
        click_from(&app, 2 + (i % 13) as u8, body).await;
        api_clicks += 1;
    }
    // Every other kind straight into `events`, in several INSERTs (several parts for the views to
    // merge), received now but happened days ago.
    let mut direct = 0;
    for insert in random_inserts(&mut rng, time, 6) {
        app.query(&insert.sql).await;
        direct += insert.rows;
    }
    assert_eq!(app.wait_flushed(api_clicks).await, api_clicks);
    assert_eq!(app.number("SELECT count() FROM events").await, (api_clicks + direct as u64));

    // Hand-picked windows, then random ones: inside an hour, one whole hour, across midnight and the
    // month, whole days, starting and ending on edges.
    let m = |d: i64, h: i64, min: i64| {
        datetime!(2026-10-31 00:00 UTC).unix_timestamp() + d * 86_400 + h * 3600 + min * 60
    };
    let mut windows = vec![
        (m(0, 23, 15), m(0, 23, 45)),
        (m(0, 23, 0), m(1, 0, 0)),
        (m(0, 23, 59), m(1, 0, 1)),
        (m(0, 22, 30), m(1, 1, 30)),
        (m(1, 0, 0), m(2, 0, 0)),
        (m(-2, 0, 0), m(3, 0, 0)),
        (m(-1, 13, 7), m(1, 21, 53)),
        (m(-1, 0, 0), m(1, 0, 1)),
        // Longer than 31 days: whole days come from ad_stats_daily, with hour and minute edges.
        (m(-20, 13, 17), m(15, 2, 43)),
        (m(-31, 23, 59), m(1, 0, 1)),
        (m(-2, 0, 0), m(38, 0, 0)),
    ];
    for _ in 0..40 {
        let from = base + rng.below(span as u64 / 60) as i64 * 60;
        let len = match rng.below(3) {
            0 => 1 + rng.below(59),
            1 => 60 + rng.below(600),
            _ => 1440 + rng.below(3 * 1440),
        } as i64;
        windows.push((from, from + len * 60));
    }
    for (i, &(from, to)) in windows.iter().enumerate() {
        check_ad(&app, ADS[i % 3], from, to).await;
        check_listing(&app, from, to).await;
    }

    // The same after ClickHouse merged every part: states merge to the same numbers.
    for table in
        ["ad_stats_minutely", "ad_stats_hourly", "ad_stats_daily", "ad_filtered_minutely", "ad_counts"]
    {
        app.query(&format!("OPTIMIZE TABLE {table} FINAL")).await;
    }
    for &(from, to) in windows.iter().take(12) {
        check_ad(&app, ADS[0], from, to).await;
    }

    // All time: every event, and the series starts at the first hour with a counted (valid)
    // event; bot traffic two days before it does not move the start.
    let first = app
        .number(&format!(
            "SELECT toUInt32(toStartOfHour(min(event_time))) FROM events WHERE ad_id = '{}' AND traffic = 'valid'",
            ADS[1]
        ))
        .await as i64;
    let early = first - 2 * 86_400;
    insert_impression(&app, ADS[1], early, "bot").await;
    let (status, all) = get_json(&app, &format!("/ads/analytics?adId={}&timeframe=all", ADS[1])).await;
    assert_eq!(status, 200);
    assert_eq!(unix(all["from"].as_str().unwrap()), first);
    let total = app
        .number(&format!(
            "SELECT countIf(kind = 'click' AND traffic = 'valid') FROM events WHERE ad_id = '{}'",
            ADS[1]
        ))
        .await;
    assert_eq!(all["totalClicks"], json!(total));
}

/// A database that held events before `0008_ad_counts.sql`: the migration copies the named
/// aggregate tables into `ad_counts` (which the one-ad answer reads), so its answers, over events
/// from before and after the migration, still equal a recount of raw events. Copying the
/// aggregates (not re-reading raw events) keeps what retention has already dropped from `events`.
#[tokio::test]
async fn a_database_from_before_ad_counts_keeps_its_numbers() {
    migrate_to_ad_counts(false).await;
}

/// The same, after a run of the migration that stopped in the middle of its hour copy (one ad's
/// hours copied): the next run drops the partial copy and copies again. Each copy runs only into
/// an empty grain, so without that the other ads' hours stayed missing.
#[tokio::test]
async fn an_interrupted_ad_counts_copy_is_made_again() {
    migrate_to_ad_counts(true).await;
}

async fn migrate_to_ad_counts(interrupted: bool) {
    use adbeacon::store::migrate;

    use crate::support::{fresh_db, servers::shared_clickhouse};

    let db = fresh_db();
    let ch = shared_clickhouse();
    ch.query(&format!("CREATE DATABASE {db}")).await;
    let config = adbeacon::config::Config::from_vars([
        ("CLICKHOUSE_URL", ch.url()),
        ("CLICKHOUSE_DATABASE", db.clone()),
    ])
    .unwrap();
    let timeouts =
        adbeacon::store::Timeouts { insert: Duration::from_secs(5), query: Duration::from_secs(5) };
    let client = adbeacon::store::ClickHouse::connect(&config.clickhouse, Duration::from_secs(10), timeouts)
        .await
        .unwrap();
    let before: Vec<u32> = migrate::MIGRATIONS.iter().map(|m| m.version).filter(|&v| v < 8).collect();
    assert_eq!(migrate::apply_through(&client, 7, false).await.unwrap(), before);

    let base = datetime!(2026-10-30 00:00 UTC).unix_timestamp();
    let span = 3 * 86_400;
    let mut rng = Rng(0x0008_C0DE);
    let time = |rng: &mut Rng| edgy_time(rng, base, span);
    let inserts = random_inserts(&mut rng, time, 4);
    let (old, new) = inserts.split_at(3);
    for insert in old {
        ch.query_in(&db, &insert.sql).await;
    }
    if interrupted {
        let statements = migrate::MIGRATIONS.iter().find(|m| m.version == 8).unwrap().statements();
        let (create, hours) = (&statements[0], &statements[1]);
        let guard = "WHERE (SELECT count() FROM ad_counts WHERE grain = 'hour') = 0";
        assert!(hours.contains(guard), "{hours}");
        migrate::run(&client, create).await.unwrap();
        migrate::run(&client, &hours.replace(guard, &format!("WHERE ad_id = '{}'", ADS[0]))).await.unwrap();
        assert!(ch.query_in(&db, "SELECT count() FROM ad_counts").await.trim() != "0");
    }
    assert_eq!(migrate::apply(&client).await.unwrap(), vec![8]);
    let app = TestApp::spawn_on(&ch.url(), &db, &[("MAX_EVENT_AGE", "60d")]).await;
    let copied = app.number("SELECT count() FROM ad_counts").await;
    assert!(copied > 0, "the migration copied nothing");
    for insert in new {
        app.query(&insert.sql).await;
    }
    // A second run of its statements (an interrupted migration run again) copies nothing twice.
    for statement in migrate::MIGRATIONS.iter().find(|m| m.version == 8).unwrap().statements() {
        migrate::run(&client, &statement).await.unwrap();
    }

    let m = |d: i64, h: i64, min: i64| {
        datetime!(2026-10-31 00:00 UTC).unix_timestamp() + d * 86_400 + h * 3600 + min * 60
    };
    let mut windows =
        vec![(m(-1, 0, 0), m(2, 0, 0)), (m(0, 23, 59), m(1, 0, 1)), (m(0, 22, 30), m(1, 1, 30))];
    for _ in 0..12 {
        let from = base + rng.below(span as u64 / 60) as i64 * 60;
        windows.push((from, from + (1 + rng.below(2 * 1440)) as i64 * 60));
    }
    for (i, &(from, to)) in windows.iter().enumerate() {
        check_ad(&app, ADS[i % 3], from, to).await;
    }
}

#[tokio::test]
async fn rolling_timeframes_end_at_the_current_minute_and_count_exactly() {
    let app = TestApp::spawn().await;
    // Events at the edges of each rolling window: just inside and just outside, at whole minutes
    // and a second before them. Inserted directly so that the times are exact.
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let end = now - now % 60 + 60;
    let mut rows = Vec::new();
    for len in [3600i64, 86_400, 7 * 86_400, 30 * 86_400] {
        for t in [end - len, end - len - 1, end - len + 60, end - len - 60, end - len + 1] {
            for (kind, ip) in [("click", t as u64 % 7), ("impression", 0)] {
                rows.push(format!(
                    "('{}', '{}', '{kind}', {t}, {now}, {ip}, NULL, 0, '{}', 'valid')",
                    Uuid::new_v4(),
                    ADS[0],
                    Uuid::nil()
                ));
            }
        }
    }
    app.query(&format!("INSERT INTO events VALUES {}", rows.join(", "))).await;
    app.post("/ads/impression", &json!({"adId": ADS[0]})).await;
    app.post("/ads/click", &json!({"adId": ADS[0]})).await;
    assert_eq!(app.wait_flushed(2).await, 2);

    for (tf, len) in [("1h", 3600i64), ("24h", 86_400), ("7d", 7 * 86_400), ("30d", 30 * 86_400)] {
        let before = OffsetDateTime::now_utc().unix_timestamp();
        let (status, got) = get_json(&app, &format!("/ads/analytics?adId={}&timeframe={tf}", ADS[0])).await;
        let after = OffsetDateTime::now_utc().unix_timestamp();
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["timeframe"], tf);
        let (from, to) = (unix(got["from"].as_str().unwrap()), unix(got["to"].as_str().unwrap()));
        assert_eq!(to % 60, 0, "{tf}: to on a whole minute");
        assert!(
            to > before - 60 && to >= before && to <= after + 60,
            "{tf}: to {to} is not the end of this minute"
        );
        assert_eq!(to - from, len, "{tf}");
        let want = recount(&app, from, to).await.remove(ADS[0]).unwrap_or_else(zero_counts);
        for key in ["impressions", "totalClicks", "uniqueClicks"] {
            assert_eq!(got[key], want[key], "{tf}: {key}");
        }
        assert_eq!(
            got["series"].as_array().unwrap().len() as i64,
            (to - from.div_euclid(3600) * 3600 + 3599) / 3600
        );
    }
    // Without a timeframe: the last 24 hours.
    let (_, got) = get_json(&app, &format!("/ads/analytics?adId={}", ADS[0])).await;
    assert_eq!(got["timeframe"], "24h");
}

#[tokio::test]
async fn the_listing_pages_every_ad_busiest_first() {
    let app = TestApp::spawn().await;
    // Three more ads next to the three demo ads; one retired.
    let extra = [
        ("44444444-4444-4444-4444-444444444444", "Four", 1),
        ("55555555-5555-5555-5555-555555555555", "Five", 0),
        ("66666666-6666-6666-6666-666666666666", "Six", 1),
    ];
    for (id, name, active) in extra {
        app.query(&format!(
            "INSERT INTO ads (id, name, video_url, target_url, active, created_at, updated_at, version) \
             VALUES ('{id}', '{name}', '/v.mp4', 'https://example.com', {active}, now(), now(), 1)"
        ))
        .await;
    }
    // Clicks: Five 3, Two 2, Four 2 (but more impressions), One 1; Three and Six none.
    let clicks = [(extra[1].0, 3), (ADS[1], 2), (extra[0].0, 2), (ADS[0], 1)];
    let mut sent = 0;
    for (id, n) in clicks {
        for _ in 0..n {
            assert_eq!(app.post("/ads/click", &json!({"adId": id})).await.status(), 202);
            sent += 1;
        }
    }
    assert_eq!(app.post("/ads/impression", &json!({"adId": extra[0].0})).await.status(), 204);
    assert_eq!(app.wait_flushed(sent + 1).await, sent + 1);

    let mut seen = Vec::new();
    for offset in [0, 2, 4, 6] {
        let (status, page) =
            get_json(&app, &format!("/ads/analytics?timeframe=1h&limit=2&offset={offset}")).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            (page["total"].as_u64(), page["limit"].as_u64(), page["offset"].as_u64()),
            (Some(6), Some(2), Some(offset))
        );
        seen.extend(page["ads"].as_array().unwrap().iter().cloned());
    }
    let order: Vec<&str> = seen.iter().map(|a| a["name"].as_str().unwrap()).collect();
    // Ties at zero clicks and impressions go by id: Three (3333…) before Six (6666…).
    assert_eq!(order, ["Five", "Four", "New Phone Launch", "Summer Sale", "Travel Deals", "Six"]);
    assert_eq!(seen[0]["active"], false, "retired ads are listed; their events count");
    assert_eq!((seen[1]["impressions"].as_u64(), seen[1]["ctr"].as_f64()), (Some(1), Some(2.0)));
    assert_eq!(seen[4]["clicks"], 0);
    assert_eq!(seen[4]["ctr"], 0.0);

    let (_, all) = get_json(&app, "/ads/analytics?timeframe=all").await;
    let today = OffsetDateTime::now_utc().unix_timestamp().div_euclid(86_400) * 86_400;
    assert_eq!(unix(all["from"].as_str().unwrap()), today, "all time starts at the first day with events");

    // All time of an ad without events is an empty window: no hour in its series.
    let (status, six) = get_json(&app, &format!("/ads/analytics?adId={}&timeframe=all", extra[2].0)).await;
    assert_eq!(status, 200, "{six}");
    assert_eq!((&six["from"], six["series"].as_array().map(Vec::len)), (&six["to"], Some(0)), "{six}");
    assert_eq!(six["totalClicks"], 0);
}

#[tokio::test]
async fn an_all_time_ranking_longer_than_the_raw_retention_pages_by_its_from_and_to() {
    let app = TestApp::spawn().await;
    // Two years of history: the aggregates keep every month, so `all` starts two years back,
    // longer than RAW_RETENTION_MONTHS (13). Inserted directly, at the time it happened.
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let old = now - 2 * 365 * 86_400;
    insert_impression(&app, ADS[2], old, "valid").await;
    for (ad, clicks) in [(ADS[0], 2), (ADS[1], 1)] {
        for ip in 0..clicks {
            click_from(&app, 2 + ip, json!({"adId": ad})).await;
        }
    }
    assert_eq!(app.wait_flushed(3).await, 3);

    let (status, first) = get_json(&app, "/ads/analytics?timeframe=all&limit=1").await;
    assert_eq!(status, 200, "{first}");
    let (from, to) = (first["from"].as_str().unwrap(), first["to"].as_str().unwrap());
    assert_eq!(unix(from), old.div_euclid(86_400) * 86_400, "all time starts at the first day with events");
    let mut names = vec![first["ads"][0]["adId"].clone()];
    for offset in [1, 2] {
        let (status, page) =
            get_json(&app, &format!("/ads/analytics?from={from}&to={to}&limit=1&offset={offset}")).await;
        assert_eq!(status, 200, "page {offset}: {page}");
        assert_eq!(page["total"], 3);
        names.push(page["ads"][0]["adId"].clone());
    }
    assert_eq!(names, [json!(ADS[0]), json!(ADS[1]), json!(ADS[2])], "one ranking, page by page");
    // One ad's window keeps the bound: its series has an entry per hour.
    let (status, one) = get_json(&app, &format!("/ads/analytics?adId={}&from={from}&to={to}", ADS[2])).await;
    assert_eq!(status, 400, "{one}");
    assert!(one["error"].as_str().unwrap().contains("longer than the raw-event retention"), "{one}");
    let (status, all) = get_json(&app, &format!("/ads/analytics?adId={}&timeframe=all", ADS[2])).await;
    assert_eq!((status, &all["impressions"]), (200, &json!(1)), "{all}");
}

#[tokio::test]
async fn an_accepted_click_shows_within_the_flush_interval_plus_a_second() {
    let flush = Duration::from_millis(500);
    let app = TestApp::spawn_with(&[("FLUSH_INTERVAL", "500ms")]).await;
    let path = format!("/ads/analytics?adId={}&timeframe=1h", ADS[2]);
    assert_eq!(get_json(&app, &path).await.1["totalClicks"], 0);
    let sent = Instant::now();
    assert_eq!(app.post("/ads/click", &json!({"adId": ADS[2]})).await.status(), 202);
    let seen = loop {
        if get_json(&app, &path).await.1["totalClicks"] == 1 {
            break sent.elapsed();
        }
        assert!(sent.elapsed() < Duration::from_secs(10), "the click never showed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(seen <= flush + Duration::from_secs(1), "showed after {seen:?}");
}

#[tokio::test]
async fn bad_questions_get_400_or_404_naming_the_problem() {
    let app = TestApp::spawn().await;
    let ad = ADS[0];
    let cases = [
        (format!("adId={ad}&timeframe=2h"), 400, "timeframe must be one of 1h, 24h, 7d, 30d, all"),
        (format!("adId={ad}&from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z"), 400, "must be before to"),
        (format!("adId={ad}&from=2026-11-01T00:00:00Z&to=2026-11-01T00:00:00Z"), 400, "must be before to"),
        (format!("adId={ad}&from=yesterday"), 400, "from must be an RFC 3339 time"),
        (format!("adId={ad}&from=2026-11-01T00:00:00Z&to=2026-11-01"), 400, "to must be an RFC 3339 time"),
        (format!("adId={ad}&from=2026-11-01T00:00:30Z"), 400, "from must be on a whole minute"),
        (
            format!("adId={ad}&from=2024-01-01T00:00:00Z&to=2026-11-01T00:00:00Z"),
            400,
            "longer than the raw-event retention of 13 months",
        ),
        (format!("adId={ad}&to=2026-11-01T00:00:00Z"), 400, "to needs from"),
        (format!("adId={ad}&timeframe=1h&from=2026-11-01T00:00:00Z"), 400, "either timeframe or from/to"),
        (format!("adId={ad}&limit=5"), 400, "leave them out with adId"),
        ("adId=nope".to_string(), 400, "adId must be a UUID"),
        ("limit=0".to_string(), 400, "limit must be a whole number from 1 to 1000"),
        ("limit=5000".to_string(), 400, "limit must be a whole number"),
        ("offset=-1".to_string(), 400, "offset must be a whole number"),
        (
            "adId=99999999-9999-9999-9999-999999999999".to_string(),
            404,
            "ad 99999999-9999-9999-9999-999999999999 not found",
        ),
    ];
    for (query, status, message) in cases {
        let (got_status, body) = get_json(&app, &format!("/ads/analytics?{query}")).await;
        assert_eq!(got_status, status, "{query}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{query}: {error:?} does not say {message:?}");
    }
    // Inside the retention, a window may reach back as far as it likes; snake_case works too.
    let (status, body) = get_json(
        &app,
        &format!("/ads/analytics?ad_id={ad}&from=2026-01-01T00:00:00Z&to=2026-11-01T00:00:00Z"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["series"].as_array().unwrap().len(), 304 * 24);
}
