//! The flusher: takes due batches from the buffer and inserts each as one RowBinary INSERT.
//!
//! It owns a batch from the moment it is taken until ClickHouse confirms it, or the Redis spill
//! holds it. A retryable failure retries the same batch (same token) with capped exponential
//! backoff; after `SPILL_AFTER` failed attempts the batch moves whole into the spill, which a
//! replayer drains once ClickHouse is back. While ClickHouse stays down (until the replayer's
//! probe finds it back) later batches go to the spill at once, so ingestion keeps its speed.
//! When Redis cannot take a batch either, the flusher keeps it and keeps trying both; the
//! buffer fills and requests get 503, never a 2xx for an event no layer holds.
//!
//! Re-sends follow [`super::insert`]: the INSERT runs with the batch token as query_id, and a
//! retry ends it and sends only the rows not stored. A data error isolates the bad rows, which
//! become dead letters; the rest is stored.
//!
//! With the write-ahead log, a batch's token and sequence numbers are logged (and synced) before
//! its first INSERT, so that after a crash its events come back under that token and get the same
//! check; a batch recovered that way is *uncertain* and starts with the check. On shutdown every
//! buffered event is flushed or spilled; what neither ClickHouse nor Redis takes within
//! `SHUTDOWN_TIMEOUT` stays in the log for the next start (`wal`), or is saved as a dead-letter
//! file rather than lost (other modes).

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    Health,
    buffer::{Batch, Buffer},
    dead_letter::{DeadLetters, Kept, Source},
    insert::{Bad, Refused, Sender, dead_letter_reason, past_retention},
    spill::Spill,
    wal::Wal,
};
use crate::{
    metrics::Metrics,
    store::{ClickHouse, EventRow, StoreError},
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
    /// The Redis spill, unless REDIS_URL is none.
    pub spill: Option<Arc<Spill>>,
    /// Failed INSERT attempts of a batch before it is spilled.
    pub spill_after: u32,
    /// Whether ClickHouse takes INSERTs, shared with the replayer.
    pub health: Arc<Health>,
    /// The negative control: re-sends skip the check (`Config::unsafe_skip_insert_check`).
    pub unsafe_skip_check: bool,
    /// RAW_RETENTION_MONTHS, for the check (see [`Sender::retention_months`]).
    pub retention_months: u32,
}

/// What became of the rows ClickHouse rejected ([`Flusher::keep_bad`]).
enum BadKept {
    /// Kept as dead letters.
    Kept,
    /// Out of shutdown time, kept nowhere else: the batch stays in the log.
    InLog,
    /// Out of shutdown time, kept nowhere: this many events lost.
    Lost(u64),
}

impl Flusher {
    /// Runs until `stop` is cancelled, then drains the buffer and returns the number of events
    /// it could keep nowhere before the shutdown budget ran out (see [`Flusher::deliver`]).
    pub async fn run(self, stop: CancellationToken) -> u64 {
        let mut give_up_at = None;
        let mut lost = 0;
        loop {
            let deadline = self.buffer.next_deadline();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = self.buffer.woken() => {}
                _ = sleep_until(deadline) => {}
            }
            while let Some(batch) = self.buffer.take(Instant::now(), false) {
                // Lost only past the shutdown budget: shutdown began while it was under way.
                lost += self.deliver(batch, &stop, &mut give_up_at).await;
            }
        }
        lost + self.drain(&stop, &mut give_up_at).await
    }

    /// Delivers what the buffer holds at shutdown; returns the events lost.
    async fn drain(&self, stop: &CancellationToken, give_up_at: &mut Option<Instant>) -> u64 {
        // The shutdown budget starts now, not at the first failure.
        give_up_at.get_or_insert_with(|| Instant::now() + self.shutdown_timeout);
        let (mut drained, mut lost) = (0usize, 0u64);
        while let Some(batch) = self.buffer.take(Instant::now(), true) {
            drained += batch.rows.len();
            lost += self.deliver(batch, stop, give_up_at).await;
        }
        tracing::info!(events = drained, "flushed the buffer at shutdown");
        lost
    }

    /// Inserts `batch`, retrying while that can help; ends with the batch in ClickHouse,
    /// spilled or saved (or, at the end of the shutdown budget, left in the log when the log holds
    /// every event of it). Returns the events lost: only past the shutdown budget, when
    /// ClickHouse, Redis and the dead-letter directory all failed a last time and no log holds
    /// them (`buffered` and `committed` modes), rather than retrying until the orchestrator's kill.
    async fn deliver(&self, batch: Batch, stop: &CancellationToken, give_up_at: &mut Option<Instant>) -> u64 {
        let mut backoff = FIRST_BACKOFF;
        let mut failures = 0u32;
        // Whether an INSERT of this batch may have been sent (by this run or, for a batch
        // recovered from the log, by the one before): then every attempt checks first.
        let mut sent = batch.uncertain;
        let mut marked = !self.wal.as_ref().is_some_and(|w| w.holds(&batch));
        // Whether the spill may hold the batch: recovered from the log after a crash that
        // followed its spill. The replayer then stores it, and an INSERT here could run
        // alongside the replayer's (each checking before the other stored), so the spill is
        // asked first.
        let mut maybe_spilled = batch.uncertain;
        // A push failed in the pass before (its answer may be lost while it landed).
        let mut push_failed = false;
        // A push of this batch was sent and its answer lost: it may still be on its way into
        // Redis (a command on a connection given up for its timeout can still run). Asking the
        // spill could then answer "no" before it lands, and an INSERT here would race the
        // replayer's. The push is idempotent by token, so it is sent again instead: its answer
        // (pushed, or held already) settles it.
        let mut push_in_doubt = false;
        // Redis did not answer whether the spill holds the batch (warned once per batch).
        let mut holds_unknown = false;
        let query_id = batch.id.to_string();
        let check = [query_id.clone()];
        // Rows of INSERTs of this batch that ClickHouse answered with an error (`Sender::refused`).
        let refused = Refused::new(format!("batch {}", batch.id));
        // Past the shutdown budget, an INSERT gets one last try before the batch counts as lost.
        let mut last_try_made = false;
        loop {
            // Past the shutdown budget Redis is not asked again: a Redis that drops packets would
            // hold each batch for REDIS_TIMEOUT, past the orchestrator's kill.
            let out_of_time = Self::out_of_time(*give_up_at);
            if push_in_doubt && !out_of_time && self.spill.is_some() {
                if self.spill(&batch, failures, &mut marked, &mut push_in_doubt).await {
                    return 0;
                }
                if stop.is_cancelled() {
                    give_up_at.get_or_insert_with(|| Instant::now() + self.shutdown_timeout);
                }
                Self::pause(&mut backoff, *give_up_at, stop).await;
                continue;
            }
            if maybe_spilled
                && !out_of_time
                && let Some(spill) = &self.spill
            {
                match spill.holds(batch.id).await {
                    Ok(true) => {
                        tracing::info!(batch = %batch.id, rows = batch.rows.len(),
                            "the Redis spill already holds the batch; the replayer stores it");
                        self.spilled(&batch, 0);
                        return 0;
                    }
                    Ok(false) => maybe_spilled = false,
                    // Redis does not answer this instance. The spill may hold the batch all the
                    // same, and a replayer elsewhere may be storing it: an INSERT now would run
                    // alongside the replayer's, each checking ClickHouse before the other stored,
                    // and store the events twice. The batch waits (in the log, or in memory
                    // behind the 2xx that said so) until the spill can be asked; past the
                    // shutdown budget it stays in the log or goes to a file, as below.
                    Err(e) => {
                        if !std::mem::replace(&mut holds_unknown, true) {
                            tracing::warn!(batch = %batch.id, rows = batch.rows.len(), error = %e,
                                "cannot ask the Redis spill whether it holds the batch; it waits for Redis \
                                 (an INSERT now could store it twice)");
                        } else {
                            tracing::debug!(batch = %batch.id, error = %e, "cannot ask the spill for the batch");
                        }
                        if stop.is_cancelled() {
                            give_up_at.get_or_insert_with(|| Instant::now() + self.shutdown_timeout);
                        }
                        Self::pause(&mut backoff, *give_up_at, stop).await;
                        continue;
                    }
                }
            }
            // To the spill: after SPILL_AFTER failures; at once while ClickHouse is known to be
            // down; after one failure once shutdown began. Not again right after a failed push:
            // ClickHouse gets its turn, so that a Redis that fails or refuses every push does
            // not keep a batch from ClickHouse.
            let spill_now = (failures >= self.spill_after
                || (failures == 0 && !self.health.ok())
                || (failures > 0 && stop.is_cancelled()))
                && !std::mem::take(&mut push_failed)
                && !out_of_time;
            if spill_now {
                if self.spill(&batch, failures, &mut marked, &mut push_in_doubt).await {
                    return 0;
                }
                if push_in_doubt {
                    // The push failed, and may have landed all the same: a replayer may be
                    // storing the batch already. No INSERT (it would race the replayer's, each
                    // checking before the other stored) until a push is answered; an INSERT
                    // after that checks ClickHouse first.
                    push_failed = true;
                    sent = true;
                    Self::pause(&mut backoff, *give_up_at, stop).await;
                    continue;
                }
            }
            if let Some(limit) = *give_up_at
                && Instant::now() >= limit
            {
                if self.kept_by_log(&batch) {
                    // Out of shutdown time and every event of the batch is in the log: it stays
                    // there and is sent, with the check, at the next start.
                    tracing::warn!(batch = %batch.id, rows = batch.rows.len(),
                        "neither ClickHouse nor Redis takes the batch at shutdown; it stays in the local log");
                    return 0;
                }
                // No further attempt (one that landed after all would be stored twice once the
                // file is loaded), straight to disk.
                if self
                    .save(&batch, &batch.rows, "ClickHouse unavailable at shutdown", Source::Shutdown, false)
                    .await
                {
                    self.metrics.events_dead_lettered.inc_by(batch.rows.len() as u64);
                    self.confirm_elsewhere(&batch);
                    return 0;
                }
                if std::mem::replace(&mut last_try_made, true) {
                    return self.lost(&batch, &batch.rows);
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
                let sender = Sender {
                    clickhouse: &self.clickhouse,
                    metrics: &self.metrics,
                    health: &self.health,
                    check: !self.unsafe_skip_check,
                    renew_by: None,
                    stop: None,
                    retention_months: self.retention_months,
                    refused: &refused,
                };
                // Counted as sent before the send starts: during shutdown the timeout below can
                // drop this future after the INSERT went out, and the next attempt must check.
                let check_first = std::mem::replace(&mut sent, true);
                sender.send(&query_id, &batch.rows, check_first.then_some(&check[..])).await
            };
            // During shutdown an attempt gets only what is left of the budget, an attempt under
            // way when shutdown begins too: the budget starts then (else an INSERT that hangs
            // would add INSERT_TIMEOUT to it, past the orchestrator's kill).
            let mut attempt_future = std::pin::pin!(attempt_future);
            let ended = match *give_up_at {
                Some(_) => None,
                None => tokio::select! {
                    biased;
                    done = &mut attempt_future => Some(done),
                    _ = stop.cancelled() => None,
                },
            };
            let outcome = match ended {
                Some(done) => done,
                None => {
                    let limit = *give_up_at.get_or_insert_with(|| Instant::now() + self.shutdown_timeout);
                    let left =
                        limit.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
                    tokio::time::timeout(left, attempt_future)
                        .await
                        .unwrap_or_else(|_| Err(StoreError::Retryable("shutdown time ran out".into())))
                }
            };
            match outcome {
                Ok(bad) => {
                    let rows = batch.rows.len();
                    let dead: HashSet<Uuid> = bad.iter().map(|(row, _)| row.event_id).collect();
                    if dead.is_empty() {
                        self.metrics.events_flushed.inc_by(rows as u64);
                    } else {
                        match self.keep_bad(&batch, bad, stop, give_up_at).await {
                            BadKept::Kept => {}
                            BadKept::InLog => return 0,
                            BadKept::Lost(n) => return n,
                        }
                    }
                    self.metrics.insert_duration.observe(started.elapsed().as_secs_f64());
                    self.metrics.batch_rows.observe(rows as f64);
                    self.metrics.batches_flushed.inc();
                    if dead.is_empty() {
                        self.confirm(&batch)
                    } else {
                        self.confirm_partly(&batch, &dead)
                    }
                    tracing::debug!(batch = %batch.id, rows, failures, "batch inserted");
                    return 0;
                }
                Err(e) => {
                    failures += 1;
                    if failures >= self.spill_after {
                        // An outage, not a blip: later batches go to the spill at once until an
                        // INSERT, or the replayer's probe, succeeds.
                        self.health.failed();
                    }
                    tracing::warn!(batch = %batch.id, rows = batch.rows.len(), attempt = failures, error = %e,
                        "insert failed; retrying the same batch");
                    if stop.is_cancelled() {
                        give_up_at.get_or_insert_with(|| Instant::now() + self.shutdown_timeout);
                    }
                }
            }
            Self::pause(&mut backoff, *give_up_at, stop).await;
        }
    }

    /// Whether the shutdown budget (if shutdown began) has run out.
    fn out_of_time(give_up_at: Option<Instant>) -> bool {
        give_up_at.is_some_and(|limit| Instant::now() >= limit)
    }

    /// Waits `backoff` before the next attempt and doubles it (up to [`MAX_BACKOFF`]). Wakes early
    /// on shutdown, so that the drain starts counting its deadline at once, and never sleeps past
    /// the shutdown budget.
    async fn pause(backoff: &mut Duration, give_up_at: Option<Instant>, stop: &CancellationToken) {
        let pause =
            give_up_at.map_or(*backoff, |l| (*backoff).min(l.saturating_duration_since(Instant::now())));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled(), if !stop.is_cancelled() => {}
        }
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
    }

    /// Keeps the rows ClickHouse rejected as dead letters and counts the batch's events: the
    /// rejected ones as dead-lettered, the rest as flushed. When they could be kept nowhere before
    /// the shutdown budget ran out: the batch stays in the log if the log holds it, else the
    /// rejected rows are lost (the rest is stored).
    async fn keep_bad(
        &self,
        batch: &Batch,
        bad: Bad,
        stop: &CancellationToken,
        give_up_at: &mut Option<Instant>,
    ) -> BadKept {
        // Rows ClickHouse rejected and rows past raw retention, each kind in a dead letter of its
        // own with a reason that fits it.
        let (expired, rejected): (Bad, Bad) = bad.into_iter().partition(|(_, reason)| past_retention(reason));
        let groups: Vec<(Vec<EventRow>, String)> = [rejected, expired]
            .into_iter()
            .filter(|g| !g.is_empty())
            .map(|g| {
                let reason = dead_letter_reason(&g);
                (g.into_iter().map(|(row, _)| row).collect(), reason)
            })
            .collect();
        let rows: usize = groups.iter().map(|(g, _)| g.len()).sum();
        // Rows past retention were logged by the check that set them aside.
        for (group, reason) in groups.iter().filter(|(_, reason)| !past_retention(reason)) {
            tracing::error!(batch = %batch.id, rejected = group.len(), stored = batch.rows.len() - rows,
                error = %reason, "ClickHouse rejected events as data; keeping them as dead letters");
        }
        let mut kept = 0;
        let mut pause = FIRST_BACKOFF;
        loop {
            while kept < groups.len() {
                let (group, reason) = &groups[kept];
                if !self.save(batch, group, reason, Source::Rejected, !Self::out_of_time(*give_up_at)).await {
                    break;
                }
                self.metrics.events_dead_lettered.inc_by(group.len() as u64);
                kept += 1;
            }
            if kept == groups.len() {
                self.metrics.events_flushed.inc_by((batch.rows.len() - rows) as u64);
                return BadKept::Kept;
            }
            if stop.is_cancelled() {
                let limit = *give_up_at.get_or_insert_with(|| Instant::now() + self.shutdown_timeout);
                if Instant::now() >= limit {
                    if self.kept_by_log(batch) {
                        return BadKept::InLog;
                    }
                    let left: Vec<EventRow> =
                        groups[kept..].iter().flat_map(|(g, _)| g.iter().cloned()).collect();
                    self.metrics.events_flushed.inc_by((batch.rows.len() - rows) as u64);
                    return BadKept::Lost(self.lost(batch, &left));
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_BACKOFF);
        }
    }

    /// Moves the batch into the Redis spill; false when there is none or Redis refused.
    ///
    /// With the log, the batch is marked first (as before an INSERT): after a crash between the
    /// spill and the log's note that it is done, its events come back under this token, and
    /// [`Flusher::deliver`] finds the token in the spill and leaves the batch to the replayer.
    /// The spill takes a token once ([`Spill::push`]), and the entry is spilled as uncertain, so
    /// that a copy stored by other means is checked against. A push that failed may have landed
    /// all the same, or still land (its answer lost): then `in_doubt` is set, and the caller
    /// pushes again rather than ask the spill.
    async fn spill(&self, batch: &Batch, failures: u32, marked: &mut bool, in_doubt: &mut bool) -> bool {
        let Some(spill) = &self.spill else { return false };
        if !*marked {
            let wal = self.wal.as_ref().expect("unmarked only with a log");
            if let Err(e) = wal.mark_batch(batch).await {
                tracing::warn!(batch = %batch.id, error = %e, "cannot log the batch before spilling it");
                return false;
            }
            *marked = true;
        }
        // Always uncertain: an INSERT of it may have landed (a timeout), or a copy recovered
        // from the log may be stored first; the replay checks by token, a look-up per INSERT.
        match spill.push(batch.id, &batch.rows, failures, true).await {
            Ok(None) => {
                tracing::info!(batch = %batch.id, rows = batch.rows.len(),
                    "the Redis spill already holds the batch (an earlier push whose answer was lost)");
                self.spilled(batch, 0);
                true
            }
            Ok(Some(bytes)) => {
                self.spilled(batch, bytes);
                tracing::warn!(batch = %batch.id, rows = batch.rows.len(), failures,
                    "ClickHouse does not take the batch; moved it to the Redis spill for replay");
                true
            }
            Err(e) => {
                self.metrics.spill_failures.inc();
                if *in_doubt {
                    tracing::warn!(batch = %batch.id, rows = batch.rows.len(), error = %e,
                        "cannot push the batch again; it waits until Redis answers a push of it \
                         (an earlier push whose answer was lost may still land)");
                } else {
                    tracing::warn!(batch = %batch.id, rows = batch.rows.len(), error = %e,
                        "cannot spill the batch; keeping it and retrying ClickHouse");
                }
                // Sent and failed: it may have landed, or still land. Refused before sending
                // (Redis known to be down, or evicting): it did not.
                *in_doubt |= e.sent();
                false
            }
        }
    }

    /// The spill holds `batch` (pushed now with `bytes`, or found there: pushed by an attempt
    /// whose answer was lost, or by the run before a crash): its events count as spilled, once,
    /// so that the books balance, and the buffer and the log let it go.
    fn spilled(&self, batch: &Batch, bytes: usize) {
        self.metrics.batches_spilled.inc();
        self.metrics.events_spilled.inc_by(batch.rows.len() as u64);
        self.metrics.spill_bytes_pushed.inc_by(bytes as u64);
        self.confirm_elsewhere(batch);
    }

    /// The batch is safe (in ClickHouse, the spill or the dead letters): the buffer forgets it
    /// and the log may delete what only it held.
    fn confirm(&self, batch: &Batch) {
        self.buffer.release(batch);
        self.forget(batch);
    }

    /// As [`Flusher::confirm`], for a batch that is safe but not in ClickHouse: a `committed`
    /// request for its events gets no 2xx.
    fn confirm_elsewhere(&self, batch: &Batch) {
        self.buffer.release_elsewhere(batch);
        self.forget(batch);
    }

    /// As [`Flusher::confirm`], for a batch in ClickHouse but for the rows of `dead` (kept as
    /// dead letters): only a `committed` request for those gets no 2xx.
    fn confirm_partly(&self, batch: &Batch, dead: &HashSet<Uuid>) {
        self.buffer.release_partly(batch, dead);
        self.forget(batch);
    }

    /// Lets `batch` go with `rows` of it kept nowhere, past the shutdown budget: says so, and
    /// returns how many.
    fn lost(&self, batch: &Batch, rows: &[EventRow]) -> u64 {
        tracing::error!(batch = %batch.id, events = rows.len(), dir = %self.dead_letters.dir().display(),
            "out of shutdown time, and ClickHouse, Redis and the dead-letter directory all failed: acknowledged events are lost");
        self.confirm_elsewhere(batch);
        rows.len() as u64
    }

    /// Whether every event of `batch` is in the local log, so that a batch nothing else takes at
    /// shutdown may stay there. Not so for events taken in `buffered` or `committed` mode by a
    /// process that only drains a log an earlier `wal` run left ([`Wal::recovery_only`]).
    fn kept_by_log(&self, batch: &Batch) -> bool {
        self.wal.as_ref().is_some_and(|w| w.keeps(batch))
    }

    fn forget(&self, batch: &Batch) {
        if let Some(wal) = &self.wal {
            wal.confirmed(batch.id);
        }
    }

    /// Keeps rows of a batch as dead letters (in a file without asking Redis when `redis` is
    /// false: past the shutdown budget); false when even that failed (the caller keeps the batch).
    async fn save(
        &self,
        batch: &Batch,
        rows: &[EventRow],
        reason: &str,
        source: Source,
        redis: bool,
    ) -> bool {
        match self.dead_letters.save(batch.id, rows, reason, source, redis).await {
            Ok(kept) => {
                match kept {
                    Kept::Redis(id) => tracing::error!(batch = %batch.id, rows = rows.len(), entry = %id,
                        "events kept as a dead letter in Redis; list, replay or purge them with /admin/dead-letters"),
                    Kept::File(path) => {
                        tracing::error!(batch = %batch.id, rows = rows.len(), path = %path.display(),
                        "events kept as a dead-letter file; load it as the README's Delivery section shows (it skips events ClickHouse already holds)")
                    }
                }
                true
            }
            Err(e) => {
                tracing::error!(batch = %batch.id, error = %e, dir = %self.dead_letters.dir().display(),
                    "cannot keep a dead letter in Redis or on disk; keeping the batch in memory");
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
