//! The ad catalog: ads in ClickHouse (`ads`, versioned rows) behind a moka cache.
//!
//! Every tracking request resolves its ad here, so look-ups must not reach ClickHouse on the hot
//! path. Ads are never deleted (retiring one makes it inactive, and its events still count), so a
//! known id stays cached until the cache is full, and events for it are accepted even through a
//! ClickHouse outage. Unknown ids are cached for `CATALOG_NEGATIVE_TTL` (short, so an ad created on
//! another instance is usable within seconds). A hit is a plain
//! synchronous look-up: moka's async `get` is a 3.4 KB future, and a click's whole future is
//! copied each time poem boxes it. Misses are not coalesced: concurrent first look-ups of one id
//! each query once, until the first answer is cached.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clickhouse::Row;
use moka::{Expiry, future, sync};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    clickhouse::{ClickHouse, StoreError, classify},
    queries,
};
use crate::{
    domain::{Ad, demo_ads},
    metrics::Metrics,
};

/// How long the list of active ads (`GET /ads`) is served from memory.
pub const ACTIVE_LIST_TTL: Duration = Duration::from_secs(2);

/// Ids cached at most (known and unknown); bounds memory under random-id floods.
const MAX_CACHED_IDS: u64 = 1_000_000;

/// A row of `ads`, in column order.
#[derive(Debug, Clone, Row, Serialize, Deserialize)]
struct AdRow {
    #[serde(with = "clickhouse::serde::uuid")]
    id: Uuid,
    name: String,
    video_url: String,
    target_url: String,
    active: u8,
    #[serde(with = "clickhouse::serde::time::datetime")]
    created_at: OffsetDateTime,
    #[serde(with = "clickhouse::serde::time::datetime")]
    updated_at: OffsetDateTime,
    version: u64,
}

impl From<AdRow> for Ad {
    fn from(r: AdRow) -> Self {
        Ad {
            id: r.id,
            name: r.name,
            video_url: r.video_url,
            target_url: r.target_url,
            active: r.active != 0,
            created_at: r.created_at,
            updated_at: r.updated_at,
            version: r.version,
        }
    }
}

impl From<&Ad> for AdRow {
    fn from(a: &Ad) -> Self {
        AdRow {
            id: a.id,
            name: a.name.clone(),
            video_url: a.video_url.clone(),
            target_url: a.target_url.clone(),
            active: u8::from(a.active),
            created_at: a.created_at,
            updated_at: a.updated_at,
            version: a.version,
        }
    }
}

/// Known ads stay (until evicted for room), unknown ids expire.
struct UnknownExpires {
    after: Duration,
}

impl Expiry<Uuid, Option<Arc<Ad>>> for UnknownExpires {
    fn expire_after_create(&self, _: &Uuid, value: &Option<Arc<Ad>>, _: Instant) -> Option<Duration> {
        value.is_none().then_some(self.after)
    }
}

/// Reads and writes the catalog.
#[derive(Clone)]
pub struct Catalog {
    ch: ClickHouse,
    by_id: sync::Cache<Uuid, Option<Arc<Ad>>>,
    active: future::Cache<(), Arc<Vec<Ad>>>,
    metrics: Arc<Metrics>,
}

impl Catalog {
    /// A catalog over `ch`; unknown ids are cached for `unknown_ttl`.
    pub fn new(ch: ClickHouse, metrics: Arc<Metrics>, unknown_ttl: Duration) -> Self {
        Self {
            ch,
            by_id: sync::Cache::builder()
                .max_capacity(MAX_CACHED_IDS)
                .expire_after(UnknownExpires { after: unknown_ttl })
                .build(),
            active: future::Cache::builder().max_capacity(1).time_to_live(ACTIVE_LIST_TTL).build(),
            metrics,
        }
    }

    /// The ad with this id, active or not; `None` if the catalog has never held it.
    pub async fn get(&self, id: Uuid) -> Result<Option<Arc<Ad>>, StoreError> {
        if let Some(hit) = self.by_id.get(&id) {
            self.metrics.catalog_hits.inc();
            return Ok(hit);
        }
        self.metrics.catalog_misses.inc();
        // Boxed so that the query's large future is paid for only by misses.
        Box::pin(self.load(id)).await
    }

    async fn load(&self, id: Uuid) -> Result<Option<Arc<Ad>>, StoreError> {
        let q = self.ch.client().query(queries::AD_BY_ID).bind(id.to_string());
        let rows: Vec<AdRow> = self.ch.fetch_all(q).await?;
        let ad = rows.into_iter().next().map(|r| Arc::new(Ad::from(r)));
        self.by_id.insert(id, ad.clone());
        Ok(ad)
    }

    /// Every active ad, oldest first, at most [`ACTIVE_LIST_TTL`] old.
    pub async fn active(&self) -> Result<Arc<Vec<Ad>>, StoreError> {
        self.active
            .try_get_with((), async {
                let rows: Vec<AdRow> = self.ch.fetch_all(self.ch.client().query(queries::ADS_ACTIVE)).await?;
                Ok::<_, StoreError>(Arc::new(rows.into_iter().map(Ad::from).collect()))
            })
            .await
            .map_err(|e: Arc<StoreError>| (*e).clone())
    }

    /// Writes new versions of ads and drops them from the caches of this instance.
    pub async fn put(&self, ads: &[Ad]) -> Result<(), StoreError> {
        let mut insert = self.ch.client().insert::<AdRow>("ads").await.map_err(classify)?;
        for ad in ads {
            insert.write(&AdRow::from(ad)).await.map_err(classify)?;
        }
        insert.end().await.map_err(classify)?;
        for ad in ads {
            self.by_id.invalidate(&ad.id);
        }
        self.active.invalidate_all();
        Ok(())
    }

    /// Seeds the demo ads when the catalog is empty; returns how many were written.
    pub async fn seed_demo_ads_if_empty(&self) -> Result<usize, StoreError> {
        let count: Vec<u64> = self.ch.fetch_all(self.ch.client().query(queries::ADS_COUNT)).await?;
        if count.first().copied().unwrap_or(0) > 0 {
            return Ok(0);
        }
        let ads = demo_ads(
            OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or_else(|_| OffsetDateTime::now_utc()),
        );
        self.put(&ads).await?;
        tracing::info!(count = ads.len(), "seeded the demo ads into the empty catalog");
        Ok(ads.len())
    }
}
