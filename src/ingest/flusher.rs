//! The flusher: takes due batches from the buffer and inserts each as one RowBinary INSERT.
//!
//! It owns a batch from the moment it is taken until ClickHouse confirms it. A retryable failure
//! retries the same batch (same token) with capped exponential backoff, for as long as it takes;
//! meanwhile the buffer fills and requests get 503. A failed INSERT may still have been stored, or
//! still be running (the answer was lost, or the client gave up waiting), so every INSERT runs with
//! the batch id as its query_id, and before each retry the flusher ends any such INSERT
//! (`KILL QUERY … SYNC`), looks up which of the batch's events are stored, and sends only the rest:
//! no double counting, also when a batch spanning two monthly partitions was stored in part. A
//! data error is not retried: the batch is saved as a dead letter.
//!
//! With the write-ahead log, a batch's token and sequence numbers are logged (and synced) before
//! its first INSERT, so that after a crash its events come back under that token and get the same
//! check; a batch recovered that way is *uncertain* and starts with the check. On shutdown every
//! buffered event is flushed; what ClickHouse still refuses after `SHUTDOWN_TIMEOUT` stays in the
//! log for the next start (`wal`), or is saved as a dead letter rather than lost (other modes).

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use uuid::Uuid;

use tokio_util::sync::CancellationToken;

use super::{
    buffer::{Batch, Buffer},
    dead_letter::DeadLetters,
    wal::Wal,
};
use crate::{
    metrics::Metrics,
    store::{ClickHouse, StoreError},
};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Moves batches from the buffer into ClickHouse.
pub struct Flusher {
    /// The buffer to drain.
    pub buffer: Arc<Buffer>,
    /// Where batches go.
    pub clickhouse: ClickHouse,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Where undeliverable batches go.
    pub dead_letters: DeadLetters,
    /// How long shutdown keeps retrying.
    pub shutdown_timeout: Duration,
    /// The write-ahead log (`ACK_MODE=wal`): batch tokens are logged before their INSERT.
    pub wal: Option<Wal>,
}

impl Flusher {
    /// Runs until `stop` is cancelled, then drains the buffer and returns.
    pub async fn run(self, stop: CancellationToken) {
        let mut give_up_at = None;
        loop {
            let deadline = self.buffer.next_deadline();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = self.buffer.woken() => {}
                _ = sleep_until(deadline) => {}
            }
            while let Some(batch) = self.buffer.take(Instant::now(), false) {
                self.deliver(batch, &stop, &mut give_up_at).await;
            }
        }
        // The shutdown budget starts now, not at the first failure.
        give_up_at.get_or_insert_with(|| Instant::now() + self.shutdown_timeout);
        let mut drained = 0usize;
        while let Some(batch) = self.buffer.take(Instant::now(), true) {
            drained += batch.rows.len();
            self.deliver(batch, &stop, &mut give_up_at).await;
        }
        tracing::info!(events = drained, "flushed the buffer at shutdown");
    }

    /// Inserts `batch`, retrying while that can help; ends with the batch in ClickHouse or saved
    /// (or, in `wal` mode at the end of the shutdown budget, left in the log).
    async fn deliver(&self, batch: Batch, stop: &CancellationToken, give_up_at: &mut Option<Instant>) {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1u32;
        // Whether an INSERT of this batch may have been sent (by this run or, for a batch
        // recovered from the log, by the one before): then every attempt checks first.
        let mut sent = batch.uncertain;
        let mut marked = !self.wal.as_ref().is_some_and(|w| w.holds(&batch));
        loop {
            if let Some(limit) = *give_up_at
                && Instant::now() >= limit
            {
                if self.wal.is_some() {
                    // Out of shutdown time with the log on: the batch stays in it and is sent,
                    // with the check, at the next start.
                    tracing::warn!(batch = %batch.id, rows = batch.rows.len(),
                        "ClickHouse unavailable at shutdown; the batch stays in the local log");
                    return;
                }
                // No further attempt (one that landed after all would be stored twice once the
                // file is loaded), straight to disk.
                if self.save(&batch, "ClickHouse unavailable at shutdown") {
                    return;
                }
            }
            let started = Instant::now();
            let attempt_future = async {
                if !marked {
                    // Synced before the INSERT: after a crash the events come back under this
                    // token, and the INSERT that may have landed is checked, not repeated.
                    let wal = self.wal.as_ref().expect("unmarked only with a log");
                    wal.mark_batch(&batch).await.map_err(|e| StoreError::Retryable(e.to_string()))?;
                    marked = true;
                }
                let outcome = if sent {
                    self.retry(&batch).await
                } else {
                    self.clickhouse.insert_events(batch.id, &batch.rows).await
                };
                sent = true;
                outcome
            };
            // During shutdown an attempt gets only what is left of the budget.
            let outcome = match *give_up_at {
                Some(limit) => {
                    let left =
                        limit.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
                    tokio::time::timeout(left, attempt_future)
                        .await
                        .unwrap_or_else(|_| Err(StoreError::Retryable("shutdown time ran out".into())))
                }
                None => attempt_future.await,
            };
            match outcome {
                Ok(()) => {
                    let rows = batch.rows.len();
                    self.metrics.insert_duration.observe(started.elapsed().as_secs_f64());
                    self.metrics.batch_rows.observe(rows as f64);
                    self.metrics.batches_flushed.inc();
                    self.metrics.events_flushed.inc_by(rows as u64);
                    self.confirm(&batch);
                    tracing::debug!(batch = %batch.id, rows, attempt, "batch inserted");
                    return;
                }
                Err(StoreError::Rejected(reason)) => {
                    self.metrics.insert_failed(false);
                    tracing::error!(batch = %batch.id, rows = batch.rows.len(), error = %reason,
                        "ClickHouse rejected a batch; saving it as a dead letter");
                    if self.save(&batch, &reason) {
                        return;
                    }
                }
                Err(StoreError::Retryable(reason)) => {
                    self.metrics.insert_failed(true);
                    tracing::warn!(batch = %batch.id, rows = batch.rows.len(), attempt, error = %reason,
                        "insert failed; retrying the same batch");
                    if stop.is_cancelled() {
                        give_up_at.get_or_insert_with(|| Instant::now() + self.shutdown_timeout);
                    }
                }
            }
            // Wake early on shutdown, so the drain starts counting its deadline at once, and never
            // sleep past the shutdown budget.
            let pause =
                give_up_at.map_or(backoff, |l| backoff.min(l.saturating_duration_since(Instant::now())));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled(), if !stop.is_cancelled() => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }

    /// The batch is safe (in ClickHouse or a dead-letter file): the buffer forgets it and the
    /// log may delete what only it held.
    fn confirm(&self, batch: &Batch) {
        self.buffer.release(batch);
        if let Some(wal) = &self.wal {
            wal.confirmed(batch.id);
        }
    }

    /// Re-sends what of a batch is not stored, after making sure no earlier INSERT of it can
    /// still be running (otherwise the look-up could miss rows that land a moment later).
    async fn retry(&self, batch: &Batch) -> Result<(), StoreError> {
        let first = batch.rows.iter().map(|r| r.event_time).min();
        let last = batch.rows.iter().map(|r| r.event_time).max();
        let (Some(first), Some(last)) = (first, last) else { return Ok(()) };
        self.clickhouse.kill_batch_insert(batch.id).await?;
        let stored: HashSet<Uuid> =
            self.clickhouse.batch_event_ids(batch.id, first, last).await?.into_iter().collect();
        if stored.is_empty() {
            return self.clickhouse.insert_events(batch.id, &batch.rows).await;
        }
        self.metrics.insert_found_stored.inc();
        let missing: Vec<_> = batch.rows.iter().filter(|r| !stored.contains(&r.event_id)).cloned().collect();
        if missing.is_empty() {
            tracing::info!(batch = %batch.id, rows = batch.rows.len(),
                "the failed INSERT had been stored after all; not re-sending");
            return Ok(());
        }
        tracing::warn!(batch = %batch.id, stored = stored.len(), missing = missing.len(),
            "the failed INSERT was stored in part; sending the missing rows");
        self.clickhouse.insert_events(batch.id, &missing).await
    }

    /// Saves a batch as a dead letter; false when even that failed (the caller keeps retrying).
    fn save(&self, batch: &Batch, reason: &str) -> bool {
        match self.dead_letters.save(batch, reason) {
            Ok(path) => {
                let rows = batch.rows.len();
                self.metrics.events_dead_lettered.inc_by(rows as u64);
                self.confirm(batch);
                tracing::error!(batch = %batch.id, rows, path = %path.display(),
                    "batch saved as a dead letter; load it with: clickhouse-client -q 'INSERT INTO events FORMAT JSONEachRow' < FILE");
                true
            }
            Err(e) => {
                tracing::error!(batch = %batch.id, error = %e, dir = %self.dead_letters.dir().display(),
                    "cannot write a dead letter; keeping the batch in memory");
                false
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
