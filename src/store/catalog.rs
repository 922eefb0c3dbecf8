//! The ad catalog: ads in ClickHouse (`ads`, versioned rows) behind an in-memory cache.
//!
//! Every tracking request resolves its ad here, so look-ups must not reach ClickHouse on the hot
//! path. A hit is a plain synchronous look-up (moka's async `get` is a 3.4 KB future, and a
//! click's whole future is copied each time poem boxes it).
//!
//! - A known ad is served from memory; once it is older than `CATALOG_TTL` it is re-read in the
//!   background while the old copy keeps answering, so a change made on another instance shows
//!   within the TTL and no request waits for it. When ClickHouse is down the old copy stays:
//!   ads are never deleted (retiring one makes it inactive), so events keep flowing through an
//!   outage.
//! - Every active ad is cached at start-up ([`Catalog::warm`]), so that an outage that begins
//!   before an ad's first event does not refuse its events.
//! - An unknown id is cached as unknown for `CATALOG_NEGATIVE_TTL` (short, so an ad created on
//!   another instance is usable within seconds).
//! - Concurrent misses of one id wait for one ClickHouse query (a per-id lock), so a burst of
//!   requests for a new ad costs one look-up.
//! - Writes through this instance replace its copies at once, and a read that started before a
//!   write cannot put the older version back.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clickhouse::Row;
use moka::{
    Expiry, future,
    ops::compute::{CompResult, Op},
    sync,
};
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

/// How long a request for an ad whose copy is over twice the TTL old waits for a fresh read
/// before it is served the copy (the read then goes on in the background).
const FRESH_WAIT: Duration = Duration::from_millis(250);

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

/// A cached answer: the ad, or `None` for an id the catalog does not hold, and when it was read.
#[derive(Debug)]
struct Cached {
    ad: Option<Arc<Ad>>,
    read_at: Instant,
}

/// Known ads stay (until evicted for room; their age decides a re-read, not their removal),
/// unknown ids expire.
struct UnknownExpires {
    after: Duration,
}

impl Expiry<Uuid, Arc<Cached>> for UnknownExpires {
    fn expire_after_create(&self, _: &Uuid, value: &Arc<Cached>, _: Instant) -> Option<Duration> {
        value.ad.is_none().then_some(self.after)
    }

    fn expire_after_update(
        &self,
        key: &Uuid,
        value: &Arc<Cached>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, now)
    }
}

/// The ad's lock held across a read-change-write ([`Catalog::get_for_write`]).
pub type WriteLock = tokio::sync::OwnedMutexGuard<()>;

/// One lock per id being read, so that concurrent misses share one query. Kept a little while
/// after use, so that a request that missed just before the answer was cached still finds it.
type Loading = sync::Cache<Uuid, Arc<tokio::sync::Mutex<()>>>;

/// Locks of the catalog's writes, one per stripe of ids. Never evicted, unlike [`Loading`]'s,
/// whose entry can leave the cache while a slow write still holds it (the next writer would then
/// get a fresh lock and start from the same version). Ads written at once rarely share a stripe,
/// and a write holds one lock only.
const WRITE_STRIPES: usize = 64;

/// Reads and writes the catalog.
#[derive(Clone)]
pub struct Catalog {
    ch: ClickHouse,
    /// Hashed with foldhash (seeded per process), as the request path's other maps
    /// ([`crate::api::recent`]): moka's default SipHash was about 160 of the 860 instructions of
    /// a hit (callgrind).
    by_id: sync::Cache<Uuid, Arc<Cached>, hashbrown::DefaultHashBuilder>,
    loading: Loading,
    writing: Arc<[Arc<tokio::sync::Mutex<()>>]>,
    ttl: Duration,
    active: future::Cache<(), Arc<Vec<Ad>>>,
    metrics: Arc<Metrics>,
}

impl Catalog {
    /// A catalog over `ch`: known ads are re-read after `ttl`, unknown ids cached for `unknown_ttl`.
    pub fn new(ch: ClickHouse, metrics: Arc<Metrics>, ttl: Duration, unknown_ttl: Duration) -> Self {
        Self {
            ch,
            by_id: sync::Cache::builder()
                .max_capacity(MAX_CACHED_IDS)
                .expire_after(UnknownExpires { after: unknown_ttl })
                .build_with_hasher(hashbrown::DefaultHashBuilder::default()),
            loading: sync::Cache::builder()
                .max_capacity(MAX_CACHED_IDS)
                .time_to_idle(Duration::from_secs(10))
                .build(),
            writing: (0..WRITE_STRIPES).map(|_| Arc::new(tokio::sync::Mutex::new(()))).collect(),
            ttl,
            active: future::Cache::builder().max_capacity(1).time_to_live(ACTIVE_LIST_TTL).build(),
            metrics,
        }
    }

    /// The ad with this id, active or not; `None` if the catalog has never held it.
    ///
    /// A copy over the TTL old is served and re-read in the background: an ad in demand is
    /// re-read every TTL without anyone waiting. A copy over twice the TTL old belongs to an ad
    /// nobody asked for since: it may have changed long ago (a new target URL, retired), so the
    /// request waits briefly ([`FRESH_WAIT`]) for a fresh read, and is served the copy only when
    /// ClickHouse is slow or down.
    pub async fn get(&self, id: Uuid) -> Result<Option<Arc<Ad>>, StoreError> {
        if let Some(hit) = self.by_id.get(&id) {
            self.metrics.catalog_hits.inc();
            let ad = hit.ad.clone();
            let age = hit.read_at.elapsed();
            if ad.is_some() && age >= self.ttl {
                if age >= self.ttl * 2
                    && let Ok(Ok(fresh)) = tokio::time::timeout(FRESH_WAIT, Box::pin(self.reload(id))).await
                {
                    return Ok(fresh);
                }
                self.refresh_in_background(id, hit);
            }
            return Ok(ad);
        }
        self.metrics.catalog_misses.inc();
        // Boxed so that the query's large future is paid for only by misses.
        Box::pin(self.load_shared(id)).await
    }

    /// The per-id lock.
    fn lock_of(&self, id: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        self.loading.get_with(id, || Arc::new(tokio::sync::Mutex::new(())))
    }

    /// Reads the ad unless a concurrent caller already did while this one waited for the lock.
    async fn load_shared(&self, id: Uuid) -> Result<Option<Arc<Ad>>, StoreError> {
        let lock = self.lock_of(id);
        let _guard = lock.lock().await;
        if let Some(cached) = self.by_id.get(&id) {
            return Ok(cached.ad.clone());
        }
        self.load(id).await
    }

    /// Re-reads a known ad for a request that waits (see [`Catalog::get`]), unless a read under
    /// way meanwhile brought a copy fresher than the TTL.
    async fn reload(&self, id: Uuid) -> Result<Option<Arc<Ad>>, StoreError> {
        let lock = self.lock_of(id);
        let _guard = lock.lock().await;
        if let Some(cached) = self.by_id.get(&id)
            && cached.read_at.elapsed() < self.ttl
        {
            return Ok(cached.ad.clone());
        }
        self.load(id).await
    }

    /// Re-reads a known ad without making anyone wait; skipped when a read of it is under way.
    /// On failure the old copy stays for another TTL, so that an outage costs one failed query
    /// per ad and TTL, not one per request.
    fn refresh_in_background(&self, id: Uuid, stale: Arc<Cached>) {
        let Ok(guard) = self.lock_of(id).try_lock_owned() else { return };
        let this = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = this.load(id).await {
                tracing::debug!(ad = %id, error = %e, "re-reading a cached ad failed; keeping the copy");
                // Only over the copy it re-read: a write through this instance may have put a
                // newer one there meanwhile.
                this.by_id.entry(id).and_compute_with(|current| match current {
                    Some(c) if Arc::ptr_eq(c.value(), &stale) => {
                        Op::Put(Arc::new(Cached { ad: stale.ad.clone(), read_at: Instant::now() }))
                    }
                    _ => Op::Nop,
                });
            }
        });
    }

    /// The ad as ClickHouse holds it now, bypassing the cache (the catalog's own writes must not
    /// act on a copy up to a TTL old), with the ad's lock: held until the caller has written,
    /// so that two changes of one ad through this instance do not both start from the same
    /// version (the later write would silently undo the earlier one's change). Across
    /// instances ClickHouse offers no compare-and-set; the newer version wins there.
    pub async fn get_for_write(&self, id: Uuid) -> Result<(WriteLock, Option<Arc<Ad>>), StoreError> {
        let stripe = self.writing[(id.as_u64_pair().1 % WRITE_STRIPES as u64) as usize].clone();
        let guard = stripe.lock_owned().await;
        let ad = self.load(id).await?;
        Ok((guard, ad))
    }

    async fn load(&self, id: Uuid) -> Result<Option<Arc<Ad>>, StoreError> {
        self.metrics.catalog_lookups.inc();
        let q = self.ch.client().query(queries::AD_BY_ID).bind(id.to_string());
        let rows: Vec<AdRow> = self.ch.fetch_all(q).await?;
        let ad = rows.into_iter().next().map(|r| Arc::new(Ad::from(r)));
        Ok(self.offer(id, ad))
    }

    /// Caches what a read or a write found for `id`, unless the cache holds something newer, in
    /// one step per id (moka serializes `and_compute_with` per key, and every change of `by_id`
    /// goes through it or [`Catalog::refresh_in_background`]'s own); returns what the cache
    /// holds afterwards. A read that started before a write through this instance must not put
    /// the older version back, nor put "unknown" over a known ad: ads are never deleted, so an
    /// empty read of one began before its creation.
    fn offer(&self, id: Uuid, ad: Option<Arc<Ad>>) -> Option<Arc<Ad>> {
        let result = self.by_id.entry(id).and_compute_with(|current| {
            let held = current.and_then(|c| c.value().ad.clone());
            match (&ad, &held) {
                (Some(found), Some(newer)) if newer.version > found.version => Op::Nop,
                (None, Some(_)) => Op::Nop,
                _ => Op::Put(Arc::new(Cached { ad: ad.clone(), read_at: Instant::now() })),
            }
        });
        match result {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) | CompResult::Unchanged(e) => {
                e.value().ad.clone()
            }
            CompResult::Removed(_) | CompResult::StillNone(_) => ad,
        }
    }

    /// Caches every active ad (at start-up), so that events for them are taken even when
    /// ClickHouse goes down before this instance has looked them up. Returns how many.
    pub async fn warm(&self) -> Result<usize, StoreError> {
        let rows: Vec<AdRow> = self.ch.fetch_all(self.ch.client().query(queries::ADS_ACTIVE)).await?;
        let n = rows.len();
        for row in rows {
            let ad = Ad::from(row);
            // Never over a newer copy a write through this instance put there meanwhile.
            self.offer(ad.id, Some(Arc::new(ad)));
        }
        Ok(n)
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
        // The written versions, at once: a later stale read cannot replace them (see `offer`).
        for ad in ads {
            self.offer(ad.id, Some(Arc::new(ad.clone())));
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
