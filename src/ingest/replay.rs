//! The replayer: every instance drains the Redis spill into ClickHouse while ClickHouse takes
//! INSERTs.
//!
//! It reads with the consumer group [`super::spill::GROUP`] under a name of its own, about
//! `BATCH_MAX_ROWS` rows of entries at a time (small spilled batches merged), checks them once and
//! sends them in small, evenly paced INSERTs, and acknowledges (and deletes) entries only after
//! ClickHouse confirmed them: a replayer that dies leaves its entries
//! pending, and once they have been idle for `REPLAY_CLAIM_IDLE` another replayer ends any INSERT
//! the dead one may have left running (its query ids carry its name), claims them and replays
//! them with the check of [`super::insert`]. Every spilled row keeps its batch token, so nothing
//! is counted twice, whichever replayer gets it and however often. A live replayer never looks
//! dead: it renews the entries it works on before its INSERTs (and while it waits out an
//! outage), gives them up if another replayer claimed them anyway, and acknowledges only entries
//! that are still its own.
//!
//! Live ingest keeps priority: a replay INSERT waits while the buffer holds a full batch for the
//! flusher, replay runs at most `REPLAY_RATE` events a second, and the heavy work on entries
//! (converting and decoding megabytes) runs off the threads that serve requests. A damaged entry goes to the
//! dead letters; rows ClickHouse rejects too. Nothing loops forever on a bad entry.
//!
//! While ClickHouse is down the replayer probes it every second; its answer is what ends the
//! flusher's outage mode.
//!
//! The app runs it on a thread and runtime of its own, with its own ClickHouse pool and Redis
//! connection (`App::build`), so that its INSERTs never hold up a worker serving requests.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    Health,
    buffer::Buffer,
    dead_letter::{Source, corrupt_fields, rows_fields},
    insert::{Bad, Refused, Sender, dead_letter_reason, past_retention},
    spill::{Acked, Entry, RedisState, Spill, Spilled},
};
use crate::{
    metrics::Metrics,
    store::{ClickHouse, EventRow},
};

/// Every replay INSERT's query id starts with this, then the replayer's name.
pub const QUERY_PREFIX: &str = "adbeacon-replay-";
/// Entries read at a time at most; fewer when entries are large (see `Replayer::read_count`).
const READ_ENTRIES: usize = 256;
/// Pause when the spill is empty or a dependency is down.
const IDLE_PAUSE: Duration = Duration::from_millis(500);
const PROBE_EVERY: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the backlog gauges are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(1);

/// Drains the spill.
pub struct Replayer {
    /// The spill to drain.
    pub spill: Arc<Spill>,
    /// Where the events go.
    pub clickhouse: ClickHouse,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Whether ClickHouse takes INSERTs (shared with the flusher).
    pub health: Arc<Health>,
    /// The live buffer, which goes first.
    pub buffer: Arc<Buffer>,
    /// This replayer's consumer name, unique to the process.
    pub consumer: String,
    /// Rows per replay INSERT at most.
    pub max_rows: usize,
    /// Events replayed per second at most; 0 = no limit.
    pub rate: u64,
    /// How long an entry stays pending before its consumer counts as dead.
    pub claim_idle: Duration,
    /// How long one INSERT may take (`INSERT_TIMEOUT`): sizes how often the entries being
    /// replayed are renewed (see [`Replayer::renew_every`]).
    pub insert_timeout: Duration,
    /// The negative control: re-sends skip the check (`Config::unsafe_skip_insert_check`).
    pub unsafe_skip_check: bool,
    /// RAW_RETENTION_MONTHS, for the check (see [`Sender::retention_months`]).
    pub retention_months: u32,
}

/// A consumer name for this process: host, process id and a random part (never reused, so that
/// ending a dead replayer's INSERTs can never end a live one's).
pub fn consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(40)
        .collect();
    let random = Uuid::new_v4().simple().to_string();
    format!("{}-{}-{}", if host.is_empty() { "adbeacon" } else { &host }, std::process::id(), &random[..8])
}

async fn pause(d: Duration, stop: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.cancelled() => {}
    }
}

impl Replayer {
    /// Runs until `stop` is cancelled. An INSERT in progress is finished (or fails) first; what
    /// is not acknowledged stays pending for a replayer to claim.
    pub async fn run(self, stop: CancellationToken) {
        let mut group_ready = false;
        let mut next_claim = Instant::now();
        let mut next_gauges = Instant::now();
        // Rows per entry in the last read: sizes the next one, so that memory stays near one
        // INSERT's worth of rows whatever the entries hold.
        let mut rows_per_entry = self.max_rows;
        // When the next replay INSERT may start (REPLAY_RATE).
        let mut not_before = Instant::now();
        while !stop.is_cancelled() {
            if Instant::now() >= next_gauges {
                next_gauges = Instant::now() + GAUGES_EVERY;
                self.refresh_gauges().await;
            }
            if !self.health.ok() {
                self.probe(&stop).await;
                continue;
            }
            if self.spill.check().await != RedisState::Ok {
                pause(IDLE_PAUSE, &stop).await;
                continue;
            }
            if !group_ready {
                match self.spill.ensure_group().await {
                    Ok(()) => group_ready = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create the spill's consumer group");
                        pause(IDLE_PAUSE, &stop).await;
                        continue;
                    }
                }
            }
            let mut entries = Vec::new();
            let mut claimed = false;
            // Before the read: the entries' idle time in Redis starts no earlier.
            let read_at = Instant::now();
            if Instant::now() >= next_claim {
                next_claim = Instant::now() + (self.claim_idle / 4).max(Duration::from_secs(1));
                match self.claim(read_count(rows_per_entry, self.max_rows)).await {
                    Ok(found) => {
                        claimed = !found.is_empty();
                        // More may be idle: look again at once.
                        if claimed {
                            next_claim = Instant::now();
                        }
                        entries = found;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot claim idle spill entries"),
                }
            }
            if entries.is_empty() {
                match self.spill.read_new(&self.consumer, read_count(rows_per_entry, self.max_rows)).await {
                    Ok(found) => {
                        let rows: usize = found.iter().map(Entry::rows).sum();
                        if !found.is_empty() {
                            rows_per_entry = rows.div_ceil(found.len()).max(1);
                        }
                        entries = found;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the spill");
                        // The group may be gone (the stream deleted by hand): create it again.
                        group_ready = false;
                        pause(IDLE_PAUSE, &stop).await;
                        continue;
                    }
                }
            }
            if entries.is_empty() {
                pause(IDLE_PAUSE, &stop).await;
                continue;
            }
            for group in groups(entries, self.max_rows) {
                if !self.replay(group, claimed, read_at, &mut not_before, &stop).await {
                    break;
                }
            }
            self.refresh_gauges().await;
        }
    }

    /// While ClickHouse is down: one ping a second; success ends the outage for the flusher too.
    async fn probe(&self, stop: &CancellationToken) {
        match self.clickhouse.ping().await {
            Ok(()) => self.health.succeeded(),
            Err(e) => {
                tracing::debug!(error = %e, "ClickHouse still down");
                pause(PROBE_EVERY, stop).await;
            }
        }
    }

    /// Claims entries whose consumer went quiet for `claim_idle`, after ending any replay
    /// INSERT that consumer may have left running.
    async fn claim(&self, count: usize) -> Result<Vec<Entry>, String> {
        match self.spill.forget_idle_consumers(&self.consumer, self.claim_idle).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(consumers = n, "forgot replayers that went quiet holding nothing"),
            Err(e) => tracing::debug!(error = %e, "cannot list the spill's consumers"),
        }
        let idle = self.spill.idle(self.claim_idle, count).await.map_err(|e| e.to_string())?;
        if idle.is_empty() {
            return Ok(Vec::new());
        }
        let mut by_consumer: HashMap<String, Vec<String>> = HashMap::new();
        for (id, consumer) in idle {
            by_consumer.entry(consumer).or_default().push(id);
        }
        let mut claimed = Vec::new();
        let mut failed = None;
        for (consumer, ids) in by_consumer {
            // A failure leaves this consumer's entries where they are, for the next pass; the
            // entries already claimed from others are replayed now. (Returning the error dropped
            // them, and they waited in this replayer's name for another REPLAY_CLAIM_IDLE.)
            let entries = match self.claim_from(&consumer, &ids).await {
                Ok(entries) => entries,
                Err(e) => {
                    failed.get_or_insert((consumer, e));
                    continue;
                }
            };
            tracing::warn!(from = %consumer, entries = entries.len(),
                "claimed spill entries a replayer left unacknowledged; replaying them with the check");
            self.metrics.spill_entries_claimed.inc_by(entries.len() as u64);
            claimed.extend(entries);
        }
        match failed {
            Some((_, e)) if claimed.is_empty() => Err(e),
            Some((from, e)) => {
                tracing::warn!(%from, error = %e, "cannot claim the entries of a quiet replayer yet; next pass");
                Ok(claimed)
            }
            None => Ok(claimed),
        }
    }

    /// Ends the replay INSERTs `consumer` may have left running, then claims `ids` from it.
    async fn claim_from(&self, consumer: &str, ids: &[String]) -> Result<Vec<Entry>, String> {
        self.clickhouse
            .kill_inserts_starting(&format!("{QUERY_PREFIX}{consumer}-"))
            .await
            .map_err(|e| e.to_string())?;
        self.spill.claim(&self.consumer, self.claim_idle, ids).await.map_err(|e| e.to_string())
    }

    /// Replays one group of entries (read or claimed at `read_at`) until ClickHouse confirmed it
    /// and Redis acknowledged it, starting no earlier than `not_before` (which it moves on as
    /// REPLAY_RATE says). False when `stop` came first (the entries stay pending). True also
    /// when another replayer claimed the entries meanwhile: they are its to finish.
    async fn replay(
        &self,
        group: Vec<Entry>,
        claimed: bool,
        read_at: Instant,
        not_before: &mut Instant,
        stop: &CancellationToken,
    ) -> bool {
        let ids: Vec<String> = group.iter().map(|e| e.id().to_string()).collect();
        let bytes: usize = group.iter().map(Entry::bytes).sum();
        let mut dead = Vec::new();
        let mut dead_events = 0;
        let mut corrupt_tokens = Vec::new();
        let mut batches: Vec<Spilled> = Vec::new();
        for entry in group {
            match entry {
                Entry::Batch(b) => batches.push(b),
                Entry::Corrupt(c) => {
                    tracing::error!(entry = %c.entry, why = %c.why,
                        "a spill entry cannot be read; keeping it as a dead letter");
                    dead_events += c.events;
                    self.metrics.spill_entries_corrupt.inc();
                    corrupt_tokens.extend(c.token());
                    dead.push(corrupt_fields(&c));
                }
            }
        }
        let events: usize = batches.iter().map(|b| b.rows.len()).sum();
        // What the backlog counter counted for these entries, damaged ones included.
        let counted = events + dead_events;
        let tokens: Vec<String> = batches.iter().map(|b| b.token.to_string()).collect();
        let by_token: HashMap<Uuid, usize> = batches.iter().enumerate().map(|(i, b)| (b.token, i)).collect();
        // What leaves the spill's token set with these entries: a damaged entry's readable
        // token too (else a batch the log brings back under it would be taken for spilled).
        let batch_tokens: Vec<Uuid> = by_token.keys().copied().chain(corrupt_tokens).collect();
        let uncertain = claimed || batches.iter().any(|b| b.uncertain);
        let mut pending: Vec<EventRow> =
            batches.iter_mut().flat_map(|b| std::mem::take(&mut b.rows)).collect();
        let copies = drop_copies(&mut pending);
        if copies > 0 {
            tracing::warn!(entries = ids.len(), copies, "the spill holds a batch twice; replaying it once");
        }
        let query_id = format!("{QUERY_PREFIX}{}-{}", self.consumer, Uuid::new_v4().simple());
        let mut check: Option<Vec<String>> = uncertain.then(|| tokens.clone());
        let mut backoff = FIRST_BACKOFF;
        let refused = Refused::new(format!("spill entries replayed by {}", self.consumer));
        let mut sender = Sender {
            clickhouse: &self.clickhouse,
            metrics: &self.metrics,
            health: &self.health,
            check: !self.unsafe_skip_check,
            renew_by: None,
            stop: Some(stop),
            retention_months: self.retention_months,
            refused: &refused,
        };
        let chunk_rows = self.chunk_rows();
        let mut bad: Bad = Vec::new();
        // One check for the group, then INSERTs of at most `chunk_rows` rows: small, evenly
        // paced INSERTs keep the live path's latency (a 100,000-row INSERT is a burst of work
        // for adbeacon and ClickHouse alike). After a failure the check runs again.
        // Rows before `done` are sent; the slice after it is what is left (no shifting of a
        // 100,000-row vector after every INSERT).
        let mut done = 0;
        // When the entries' idle time in Redis was last reset (read, claimed or renewed).
        let mut held_since = read_at;
        while done < pending.len() {
            if stop.is_cancelled() {
                return false;
            }
            // Paced before each INSERT, not after: the entries are read (pending) meanwhile,
            // so a replayer that dies while it waits leaves them to be claimed, as during one.
            pause(not_before.saturating_duration_since(Instant::now()), stop).await;
            self.live_first(stop).await;
            // A live replayer's entries must never look like a dead one's: renewed before an
            // INSERT (and during an outage) whenever they may have been idle for long, and
            // given up if another replayer claimed them meanwhile (it replays them with the
            // check; sending them here too would store them twice).
            if held_since.elapsed() >= self.renew_every() {
                let asked = Instant::now();
                match self.spill.renew(&self.consumer, &ids).await {
                    Ok(true) => held_since = asked,
                    Ok(false) => {
                        self.gave_up(ids.len(), events);
                        return true;
                    }
                    Err(e) => {
                        tracing::warn!(entries = ids.len(), error = %e,
                            "cannot renew the spill entries being replayed; waiting before the next INSERT");
                        pause(backoff, stop).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            if !self.health.ok() {
                self.probe(stop).await;
                continue;
            }
            // A step that splits a rejected INSERT stops sending when the renewal falls due.
            let renew_by = held_since + self.renew_every();
            sender.renew_by = Some(renew_by);
            let step = match check.take() {
                Some(kill) => match sender.unsent(&kill, &pending[done..], &mut bad).await {
                    Ok(mut rest) => {
                        // Rows already found bad (by a split that stopped) are not split out
                        // again.
                        if !bad.is_empty() {
                            let known: HashSet<Uuid> = bad.iter().map(|(r, _)| r.event_id).collect();
                            rest.retain(|r| !known.contains(&r.event_id));
                        }
                        pending = rest;
                        done = 0;
                        Ok(())
                    }
                    Err(e) => {
                        check = Some(kill);
                        Err(e)
                    }
                },
                None => {
                    let n = (pending.len() - done).min(chunk_rows);
                    let started = Instant::now();
                    match sender.send_into(&query_id, &pending[done..done + n], None, &mut bad).await {
                        Ok(()) => {
                            done += n;
                            if self.rate > 0 {
                                *not_before = started + Duration::from_secs_f64(n as f64 / self.rate as f64);
                            }
                            Ok(())
                        }
                        Err(e) => {
                            // This INSERT may have landed, or still run: end it and check.
                            let mut kill = tokens.clone();
                            kill.push(query_id.clone());
                            check = Some(kill);
                            Err(e)
                        }
                    }
                }
            };
            match step {
                Ok(()) => backoff = FIRST_BACKOFF,
                // Stopped for the renewal (or failed after it fell due): renewed at the top of
                // the loop, then the check finds what the split stored. Or stopped for
                // shutdown: the loop ends at its top (ClickHouse is not to be taken for down).
                Err(e) if Instant::now() >= renew_by || stop.is_cancelled() => {
                    tracing::debug!(entries = ids.len(), error = %e, "renewing the entries before sending more")
                }
                Err(e) => {
                    tracing::warn!(entries = ids.len(), events, error = %e, "replay INSERT failed; retrying");
                    // Probe before the next try (and let the flusher spill meanwhile).
                    self.health.failed();
                    pause(backoff, stop).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        let rejected = bad.len();
        // One dead letter per batch and kind of reason: rows ClickHouse rejected, and rows past
        // raw retention, each with a reason that fits them.
        let mut rows_by_batch: HashMap<(usize, bool), Bad> = HashMap::new();
        for (row, reason) in bad {
            let at = by_token.get(&row.batch_id).copied().unwrap_or(0);
            rows_by_batch.entry((at, past_retention(&reason))).or_default().push((row, reason));
        }
        for ((at, _), group) in rows_by_batch {
            let token = batches.get(at).map_or(Uuid::nil(), |b| b.token);
            let reason = dead_letter_reason(&group);
            let rows: Vec<EventRow> = group.into_iter().map(|(row, _)| row).collect();
            dead.push(rows_fields(token, &rows, &reason, Source::Rejected));
        }
        // Acknowledged only now, with the dead letters in the same transaction. Until Redis takes
        // it the entries stay pending: a replayer that gets them later finds the rows stored.
        let mut backoff = FIRST_BACKOFF;
        // Whether an earlier call may have acknowledged them with its answer lost.
        let mut maybe_acked = false;
        loop {
            match self.spill.ack(&self.consumer, &ids, &batch_tokens, counted, &dead).await {
                Ok(Acked::Done) => break,
                // Acknowledged by this replayer's own earlier call: counted here, once.
                Ok(Acked::NonePending) if maybe_acked => break,
                Ok(Acked::Claimed | Acked::NonePending) => {
                    // Claimed while the acknowledgement waited: the rows are stored, and the
                    // new owner's check finds them so (and counts them).
                    self.gave_up(ids.len(), events);
                    return true;
                }
                Err(e) => {
                    maybe_acked = true;
                    tracing::warn!(entries = ids.len(), error = %e,
                        "replayed events are in ClickHouse but Redis cannot acknowledge them yet; retrying")
                }
            }
            if stop.is_cancelled() {
                return false;
            }
            pause(backoff, stop).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        self.metrics.spill_entries_replayed.inc_by(ids.len() as u64);
        self.metrics.spill_bytes_replayed.inc_by(bytes as u64);
        self.metrics.events_replayed.inc_by(events.saturating_sub(copies + rejected) as u64);
        self.metrics.replay_events_dead_lettered.inc_by(rejected as u64);
        tracing::info!(entries = ids.len(), events, rejected, "replayed spilled batches");
        true
    }

    /// How often entries being replayed are renewed: often enough that an INSERT started right
    /// before the renewal is due (it takes at most INSERT_TIMEOUT) ends before they could have
    /// been idle for REPLAY_CLAIM_IDLE, so no replayer claims them while it may still land.
    fn renew_every(&self) -> Duration {
        (self.claim_idle.saturating_sub(self.insert_timeout) / 2).max(Duration::from_millis(100))
    }

    /// Logs that another replayer took over entries this one was replaying.
    fn gave_up(&self, entries: usize, events: usize) {
        tracing::warn!(
            entries,
            events,
            "another replayer claimed these spill entries (this one held them past REPLAY_CLAIM_IDLE); leaving them to it"
        );
    }

    /// Rows per replay INSERT: a fiftieth of a second's worth at REPLAY_RATE (at least 1,000),
    /// never more than BATCH_MAX_ROWS.
    fn chunk_rows(&self) -> usize {
        if self.rate == 0 {
            return self.max_rows.max(1);
        }
        (self.rate as usize / 50).max(1000).min(self.max_rows).max(1)
    }

    /// Waits while the live buffer holds a full batch: the flusher's INSERTs go first.
    async fn live_first(&self, stop: &CancellationToken) {
        while self.buffer.has_full_batch() && !stop.is_cancelled() {
            pause(Duration::from_millis(20), stop).await;
        }
    }

    async fn refresh_gauges(&self) {
        let backlog = self.spill.backlog().await;
        if let Ok((entries, events)) = backlog {
            self.metrics.spill_backlog_entries.set(entries as i64);
            self.metrics.spill_backlog_events.set(events as i64);
        }
        match self.spill.memory().await {
            Ok(bytes) => self.metrics.spill_backlog_bytes.set(bytes as i64),
            // Redis answers, but not MEMORY USAGE (a hosted Redis may refuse it): the gauge then
            // stays 0, which must not pass for an empty spill unnoticed. Said once per process.
            Err(e) if backlog.is_ok() => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(error = %e,
                        "Redis refuses MEMORY USAGE: adbeacon_spill_backlog_bytes stays 0; watch Redis's own memory");
                });
            }
            // Redis does not answer at all: logged where that matters (spilling, replaying).
            Err(_) => {}
        }
        if let Ok(n) =
            self.spill.redis.query::<u64>(redis::cmd("XLEN").arg(&self.spill.keys.dead_letters)).await
        {
            self.metrics.dead_letters.set(n as i64);
        }
    }
}

/// Entries to read next: about one INSERT's worth (`max_rows`) at `rows_per_entry`.
fn read_count(rows_per_entry: usize, max_rows: usize) -> usize {
    (max_rows / rows_per_entry.max(1)).clamp(1, READ_ENTRIES)
}

/// Drops the second and later copies of a row (same batch token, same event id), keeping the
/// order; returns how many it dropped. The spill takes a token once ([`Spill::push`]), but it can
/// still hold a batch twice: entries spilled before it kept its token set (a push whose answer
/// was lost was pushed again), or a dead letter moved back while its batch was spilled too. Both
/// copies are uncertain, so a copy replayed after the other was stored is checked against it;
/// but in one group neither is stored yet when the group is checked, and both would be sent.
fn drop_copies(rows: &mut Vec<EventRow>) -> usize {
    let before = rows.len();
    let mut seen = std::collections::HashSet::with_capacity(before);
    rows.retain(|r| seen.insert((r.batch_id, r.event_id)));
    before - rows.len()
}

/// Splits entries into groups of at most `max_rows` rows (an entry is never split).
fn groups(entries: Vec<Entry>, max_rows: usize) -> Vec<Vec<Entry>> {
    let mut out: Vec<Vec<Entry>> = Vec::new();
    let mut rows = 0;
    for e in entries {
        let n = e.rows();
        match out.last_mut() {
            Some(group) if rows + n <= max_rows => {
                group.push(e);
                rows += n;
            }
            _ => {
                out.push(vec![e]);
                rows = n;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventKind, Traffic};
    use time::OffsetDateTime;

    fn row(batch: Uuid) -> EventRow {
        EventRow {
            event_id: Uuid::new_v4(),
            ad_id: Uuid::new_v4(),
            kind: EventKind::Impression,
            event_time: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            received_at: OffsetDateTime::from_unix_timestamp(1_700_000_001).unwrap(),
            ip_hash: 7,
            playback_time: None,
            error_code: 0,
            batch_id: batch,
            traffic: Traffic::Valid,
        }
    }

    #[test]
    fn a_batch_spilled_twice_is_replayed_once() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first: Vec<EventRow> = (0..3).map(|_| row(a)).collect();
        let other: Vec<EventRow> = (0..2).map(|_| row(b)).collect();
        // The group as replay() builds it: the entries' rows one after another, the batch
        // `a` in two entries.
        let mut group: Vec<EventRow> = first.iter().chain(&other).chain(&first).cloned().collect();
        assert_eq!(drop_copies(&mut group), 3);
        let kept: Vec<EventRow> = first.iter().chain(&other).cloned().collect();
        assert_eq!(group, kept, "the first copy stays, in order");
        // The same event id under another token is another batch's row, not a copy.
        let mut moved = row(a);
        moved.batch_id = b;
        let mut group = vec![first[0].clone(), EventRow { event_id: first[0].event_id, ..moved }];
        assert_eq!(drop_copies(&mut group), 0);
    }
}
