//! The accounting check of DESIGN.md §9, shared by the crash and outage tests: load with client
//! event ids, and the comparison of what got a 2xx with what ClickHouse holds.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::json;
use uuid::Uuid;

use super::{ClickHouse, browser};

const AD1: &str = "11111111-1111-1111-1111-111111111111";

/// Every event id in `db` with how many times it is stored.
pub async fn stored_ids(ch: &ClickHouse, db: &str) -> HashMap<Uuid, u64> {
    let text =
        ch.query_in(db, "SELECT event_id, count() FROM events GROUP BY event_id FORMAT TabSeparated").await;
    text.lines()
        .map(|l| {
            let (id, n) = l.split_once('\t').expect("two columns");
            (id.parse().expect("a uuid"), n.parse().expect("a count"))
        })
        .collect()
}

/// The accounting check of DESIGN.md §9: every acknowledged event stored, none stored twice.
pub fn assert_books_balance(acked: &HashSet<Uuid>, stored: &HashMap<Uuid, u64>) {
    let lost: Vec<_> = acked.iter().filter(|id| !stored.contains_key(id)).collect();
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "accounting: acknowledged {}, stored {}, lost {}, stored twice {}",
        acked.len(),
        stored.len(),
        lost.len(),
        twice.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        twice.is_empty(),
        "{} events stored more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
}

/// Clicks with fresh event ids from `senders` connections until `stop`; the ids answered 202 go
/// into `acked`. Errors (the service killed mid-request) end nothing: the request is not counted.
pub async fn load(
    base: String,
    senders: usize,
    acked: Arc<Mutex<HashSet<Uuid>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let (base, acked, stop) = (base.clone(), acked.clone(), stop.clone());
        tasks.spawn(async move {
            let http = browser().timeout(Duration::from_secs(5)).build().unwrap();
            while !stop.is_cancelled() {
                let id = Uuid::new_v4();
                let body = json!({"adId": AD1, "eventId": id, "videoPlaybackTime": 3.5});
                match http.post(format!("{base}/ads/click")).json(&body).send().await {
                    Ok(resp) if resp.status() == 202 => {
                        acked.lock().unwrap().insert(id);
                    }
                    Ok(resp) => assert_eq!(resp.status(), 503, "only 202 or 503 under load"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        });
    }
    tasks.join_all().await;
}
