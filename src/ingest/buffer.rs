//! The in-memory buffer between the HTTP handlers and the flusher.
//!
//! Bounded by bytes, counting every event from the moment it is accepted until ClickHouse confirms
//! it (or it is saved as a dead letter): while ClickHouse is down, failed batches stay accounted
//! for, the buffer fills, and new requests get an immediate 503 instead of a 2xx for an event
//! that no layer could hold. Pushing never waits.
//!
//! Every event gets a sequence number when it enters the buffer (in `wal` mode the write-ahead
//! log assigns it, so that the log's records and the buffer agree). A batch carries the numbers
//! of its events; when the batch is released, the numbers below the lowest unconfirmed one form
//! the *confirmed watermark*: `committed` acknowledgements wait for it, and the log deletes the
//! segments it has passed.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    ops::Range,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use crate::{
    domain::{EventKind, Traffic},
    metrics::Metrics,
    store::EventRow,
};

/// How long [`Buffer::release_elsewhere`] remembers a range.
const ELSEWHERE_KEPT: Duration = Duration::from_secs(600);

/// Why an event could not be buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The byte cap is reached; the caller should answer 503 with Retry-After.
    #[error("the event buffer is full")]
    Full,
    /// The service is shutting down.
    #[error("the service is shutting down")]
    Closed,
}

/// Size and age limits of the buffer and its batches.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes held (buffered plus in flight) at most.
    pub max_bytes: usize,
    /// Rows per batch at most.
    pub batch_rows: usize,
    /// Bytes per batch at most.
    pub batch_bytes: usize,
    /// Oldest age of a buffered event before its batch is due.
    pub max_age: Duration,
}

/// The memory of one client event id remembered for a buffered event, about: its 40-byte slot in
/// the id store and its place in the store's index (8 bytes, at most 3/4 full); 2.4 million ids
/// measured 127 MiB, 55 bytes each.
pub const ID_BYTES: usize = 56;

/// Rows taken from the buffer to be inserted together, under one token.
#[derive(Debug)]
pub struct Batch {
    /// The batch token, also stored in every row's `batch_id`.
    pub id: Uuid,
    /// The rows.
    pub rows: Vec<EventRow>,
    /// The sequence numbers of the rows, as ascending ranges (usually one).
    pub seqs: Vec<Range<u64>>,
    /// Recovered from the write-ahead log after a crash, when an INSERT of it may have been
    /// sent: the first attempt checks what ClickHouse holds before sending anything.
    pub uncertain: bool,
}

struct Pending {
    /// The rows, cut into chunks of one batch each (every chunk but the last is full), so that
    /// taking a batch moves no row. One growing `Vec` cost, with ClickHouse slow and the buffer
    /// full, four times BUFFER_MAX_BYTES of memory: its doubling slack, and a copy of all the
    /// rest at every batch taken.
    chunks: VecDeque<Vec<EventRow>>,
    /// Rows in `chunks`.
    len: usize,
    /// Sequence numbers of the rows in `chunks`, in order.
    runs: VecDeque<Range<u64>>,
    /// The number the next row pushed without one gets (buffered and committed modes).
    next_seq: u64,
    /// When the oldest buffered row arrived.
    since: Option<Instant>,
    /// Whole batches recovered from the log, sent before anything else.
    ready: VecDeque<Batch>,
}

/// Which sequence numbers are confirmed: everything below `below`, and the ranges in `ahead`
/// (start → end) that were confirmed out of order.
struct Confirmed {
    below: u64,
    ahead: BTreeMap<u64, u64>,
}

/// Room for rows in the buffer, taken before they are logged so that a full buffer refuses
/// an event before it is written anywhere. Dropping it gives the room back.
#[must_use = "a reservation is given back when dropped"]
pub struct Reservation {
    buffer: Arc<Buffer>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.buffer.held_bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

/// The buffer. Shared by handlers (push), the write-ahead log (fill) and the flusher (take,
/// release).
pub struct Buffer {
    pending: Mutex<Pending>,
    wake: Notify,
    held_bytes: AtomicUsize,
    /// The memory of the client event ids remembered past their bound
    /// ([`Buffer::set_ids_bytes`]); counted against the cap up to [`ID_BYTES`] per held event.
    ids_bytes: AtomicUsize,
    closed: AtomicBool,
    confirmed: Mutex<Confirmed>,
    watermark: watch::Sender<u64>,
    /// Ranges released to the spill or the dead letters rather than ClickHouse, recently: a
    /// `committed` request whose events are among them gets no 2xx.
    elsewhere: Mutex<BTreeMap<u64, (u64, Instant)>>,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl Buffer {
    /// An empty buffer.
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        metrics.buffer_max_bytes.set(i64::try_from(limits.max_bytes).unwrap_or(i64::MAX));
        Self {
            pending: Mutex::new(Pending {
                chunks: VecDeque::new(),
                len: 0,
                runs: VecDeque::new(),
                next_seq: 0,
                since: None,
                ready: VecDeque::new(),
            }),
            wake: Notify::new(),
            held_bytes: AtomicUsize::new(0),
            ids_bytes: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            confirmed: Mutex::new(Confirmed { below: 0, ahead: BTreeMap::new() }),
            watermark: watch::Sender::new(0),
            elsewhere: Mutex::new(BTreeMap::new()),
            limits,
            metrics,
        }
    }

    /// Rows per batch that fit both batch limits.
    fn rows_per_batch(&self) -> usize {
        self.limits.batch_rows.min((self.limits.batch_bytes / EventRow::SIZE).max(1))
    }

    /// Whether a full batch waits for the flusher: the replayer then lets it go first.
    pub fn has_full_batch(&self) -> bool {
        let p = self.pending.lock();
        !p.ready.is_empty() || p.len >= self.rows_per_batch()
    }

    /// Takes room for `rows` events, or refuses at once. Never waits.
    pub fn reserve(self: &Arc<Self>, rows: usize) -> Result<Reservation, PushError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        let bytes = rows * EventRow::SIZE;
        // Reserve first, so that concurrent pushes can never overshoot the cap together.
        let before = self.held_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes + self.ids_charge() > self.limits.max_bytes {
            self.held_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(PushError::Full);
        }
        Ok(Reservation { buffer: self.clone(), bytes })
    }

    /// Accepts rows into room reserved for them, numbering them from `first_seq` (the log's
    /// numbers) or from the buffer's own counter. Returns their numbers.
    pub fn fill(
        &self,
        mut room: Reservation,
        first_seq: Option<u64>,
        rows: Vec<EventRow>,
    ) -> Result<Range<u64>, PushError> {
        debug_assert_eq!(room.bytes, rows.len() * EventRow::SIZE, "the room reserved is the room filled");
        let seqs = {
            let mut p = self.pending.lock();
            // Checked under the lock that `close` takes: a push either lands before the close (and
            // the final drain takes it) or sees the close. Never a 2xx for an event left behind.
            if self.closed.load(Ordering::Acquire) {
                return Err(PushError::Closed);
            }
            self.count_accepted(&rows);
            self.append(&mut p, first_seq, rows)
        };
        // The room is now held by the rows; `release` gives it back.
        room.bytes = 0;
        if self.ids_bytes.load(Ordering::Relaxed) > 0 {
            self.show_ids_bytes();
        }
        Ok(seqs)
    }

    /// Accepts rows, or refuses all of them at once. Never waits. Returns their numbers.
    pub fn push(self: &Arc<Self>, rows: Vec<EventRow>) -> Result<Range<u64>, PushError> {
        let room = self.reserve(rows.len())?;
        self.fill(room, None, rows)
    }

    /// Appends rows under the lock; counts and wakes the flusher when due.
    fn append(&self, p: &mut Pending, first_seq: Option<u64>, rows: Vec<EventRow>) -> Range<u64> {
        let count = rows.len();
        let start = first_seq.unwrap_or(p.next_seq);
        let seqs = start..start + count as u64;
        p.next_seq = p.next_seq.max(seqs.end);
        match p.runs.back_mut() {
            Some(last) if last.end == seqs.start => last.end = seqs.end,
            _ if count > 0 => p.runs.push_back(seqs.clone()),
            _ => {}
        }
        let was_empty = p.len == 0;
        if was_empty {
            p.since = Some(Instant::now());
        }
        let per_batch = self.rows_per_batch();
        let mut rows = rows.into_iter();
        while rows.len() > 0 {
            // A new chunk has room for a whole batch at once. Growing it by doubling copied
            // each batch's rows again and again, on the request that happened to fill it: at half
            // of saturation a copy of megabytes, with the page faults of the new block, now and
            // then in the middle of a request (on an A/B rig the click's p99 at half load and
            // the process's RSS both went down without it, docs/PERFORMANCE.md). The room is only
            // address space until rows fill it, and only the last chunk, or a batch taken by age,
            // is partly empty.
            if p.chunks.back().is_none_or(|last| last.len() >= per_batch) {
                p.chunks.push_back(Vec::with_capacity(per_batch));
            }
            let chunk = p.chunks.back_mut().expect("just ensured");
            let take = (per_batch - chunk.len()).min(rows.len());
            chunk.extend(rows.by_ref().take(take));
        }
        p.len += count;
        self.metrics.buffer_events.add(count as i64);
        self.metrics.buffer_bytes.add((count * EventRow::SIZE) as i64);
        // Wake the flusher to arm its age timer, or because a batch is full.
        if was_empty || p.len >= per_batch {
            self.wake.notify_one();
        }
        seqs
    }

    /// Counts rows entering the buffer as accepted, by kind and traffic verdict: here, where
    /// they become held, so that the books balance even when a request is dropped while it
    /// waits (for the log) after its events are held.
    fn count_accepted(&self, rows: &[EventRow]) {
        let mut per_kind = [0u64; EventKind::ALL.len()];
        let mut per_traffic = [0u64; Traffic::FILTERED.len() + 1];
        for r in rows {
            per_kind[r.kind.index()] += 1;
            per_traffic[r.traffic as usize] += 1;
        }
        for (kind, n) in EventKind::ALL.into_iter().zip(per_kind) {
            if n > 0 {
                self.metrics.accepted(kind, n);
            }
        }
        for traffic in Traffic::FILTERED {
            let n = per_traffic[traffic as usize];
            if n > 0 {
                self.metrics.filtered(traffic, n);
            }
        }
    }

    /// Puts back rows recovered from the write-ahead log: neither the cap nor a close refuses
    /// them, since they were acknowledged before the restart (and counted as recovered, not
    /// accepted).
    pub fn restore_rows(&self, first_seq: u64, rows: Vec<EventRow>) {
        self.held_bytes.fetch_add(rows.len() * EventRow::SIZE, Ordering::AcqRel);
        let mut p = self.pending.lock();
        self.append(&mut p, Some(first_seq), rows);
    }

    /// Puts back a batch recovered from the write-ahead log, to be sent (and checked) first.
    pub fn restore_batch(&self, batch: Batch) {
        let count = batch.rows.len();
        self.held_bytes.fetch_add(count * EventRow::SIZE, Ordering::AcqRel);
        self.metrics.buffer_events.add(count as i64);
        self.metrics.buffer_bytes.add((count * EventRow::SIZE) as i64);
        let mut p = self.pending.lock();
        if let Some(end) = batch.seqs.iter().map(|r| r.end).max() {
            p.next_seq = p.next_seq.max(end);
        }
        p.ready.push_back(batch);
        drop(p);
        self.wake.notify_one();
    }

    /// The event ids of every row the buffer holds, in no particular order, and the sequence
    /// numbers below which all of them lie. Read at start-up, after the write-ahead log put back
    /// what it held, so that a client's retry of a recovered event is known as a repeat.
    pub fn held_event_ids(&self) -> (Vec<Uuid>, Range<u64>) {
        let p = self.pending.lock();
        let batches = p.ready.iter().flat_map(|b| b.rows.iter());
        let ids = batches.chain(p.chunks.iter().flatten()).map(|r| r.event_id).collect();
        (ids, 0..p.next_seq)
    }

    /// Takes the next batch if one is due (full or old enough, or recovered), or any rows at all
    /// with `force`.
    pub fn take(&self, now: Instant, force: bool) -> Option<Batch> {
        let per_batch = self.rows_per_batch();
        let mut p = self.pending.lock();
        if let Some(batch) = p.ready.pop_front() {
            return Some(batch);
        }
        let due = p.len > 0
            && (force
                || p.len >= per_batch
                || p.since.is_some_and(|s| now.duration_since(s) >= self.limits.max_age));
        if !due {
            return None;
        }
        // The first chunk: full, or the only one. The rest keeps the old `since`: it is at least
        // that old, so it goes out promptly.
        let rows = p.chunks.pop_front().expect("rows are held");
        p.len -= rows.len();
        if p.len == 0 {
            p.since = None;
        }
        let seqs = take_runs(&mut p.runs, rows.len());
        drop(p);
        let id = Uuid::new_v4();
        let mut rows = rows;
        for r in &mut rows {
            r.batch_id = id;
        }
        Some(Batch { id, rows, seqs, uncertain: false })
    }

    /// When the next batch becomes due, if any event is buffered.
    pub fn next_deadline(&self) -> Option<Instant> {
        let p = self.pending.lock();
        if !p.ready.is_empty() {
            return Some(Instant::now());
        }
        p.since.map(|s| s + self.limits.max_age)
    }

    /// Waits until a push wakes the flusher.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Releases a batch that went to the spill or the dead letters: safe, but not in
    /// ClickHouse, which is what a `committed` request waits for ([`Buffer::went_elsewhere`]).
    pub fn release_elsewhere(&self, batch: &Batch) {
        self.went(&batch.seqs);
        self.release(batch);
    }

    /// As [`Buffer::release_elsewhere`], for a batch ClickHouse stored but for the rows whose
    /// event ids are in `elsewhere` (kept as dead letters): only their sequence numbers count as
    /// gone elsewhere, so that `committed` requests for the other rows get their 2xx (a 503 for
    /// events already stored would have their clients send them again).
    pub fn release_partly(&self, batch: &Batch, elsewhere: &HashSet<Uuid>) {
        let numbered: u64 = batch.seqs.iter().map(|r| r.end - r.start).sum();
        if numbered != batch.rows.len() as u64 {
            // Rows and numbers do not pair up (a recovered batch missing events): all of it.
            return self.release_elsewhere(batch);
        }
        let mut gone: Vec<Range<u64>> = Vec::new();
        let seqs = batch.seqs.iter().flat_map(|r| r.clone());
        for (row, seq) in batch.rows.iter().zip(seqs) {
            if elsewhere.contains(&row.event_id) {
                match gone.last_mut() {
                    Some(last) if last.end == seq => last.end += 1,
                    _ => gone.push(seq..seq + 1),
                }
            }
        }
        self.went(&gone);
        self.release(batch);
    }

    /// Notes `seqs` as gone elsewhere, for [`Buffer::went_elsewhere`]. The ranges are kept by
    /// where they start (they never overlap), so that a look-up is one step however many there
    /// are: rows ClickHouse rejected here and there in a batch make one range each.
    fn went(&self, seqs: &[Range<u64>]) {
        let mut elsewhere = self.elsewhere.lock();
        // A committed request waits ACK_TIMEOUT at most; ten minutes covers any setting
        // anyone would use.
        elsewhere.retain(|_, (_, at)| at.elapsed() <= ELSEWHERE_KEPT);
        let now = Instant::now();
        for r in seqs.iter().filter(|r| !r.is_empty()) {
            // During an outage every batch goes elsewhere, one after the other: their ranges
            // join into one entry (kept from the last).
            match elsewhere.range_mut(..r.start).next_back() {
                Some((_, (end, at))) if *end == r.start => {
                    *end = r.end;
                    *at = now;
                }
                _ => {
                    elsewhere.insert(r.start, (r.end, now));
                }
            }
        }
    }

    /// Whether any of `seqs` went elsewhere ([`Buffer::release_elsewhere`],
    /// [`Buffer::release_partly`]).
    pub fn went_elsewhere(&self, seqs: &Range<u64>) -> bool {
        // The last range starting before `seqs` ends is the only one that can reach into it.
        self.elsewhere.lock().range(..seqs.end).next_back().is_some_and(|(_, (end, _))| *end > seqs.start)
    }

    /// Releases a batch ClickHouse confirmed (or that is otherwise safe): its room goes back
    /// and the confirmed watermark moves.
    pub fn release(&self, batch: &Batch) {
        let rows = batch.rows.len();
        let bytes = rows * EventRow::SIZE;
        self.held_bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.metrics.buffer_events.sub(rows as i64);
        self.metrics.buffer_bytes.sub(bytes as i64);
        self.show_ids_bytes();
        let mut c = self.confirmed.lock();
        for r in batch.seqs.iter().filter(|r| !r.is_empty()) {
            if r.start <= c.below {
                c.below = c.below.max(r.end);
            } else {
                c.ahead.insert(r.start, r.end);
            }
        }
        while let Some((&start, &end)) = c.ahead.first_key_value()
            && start <= c.below
        {
            c.below = c.below.max(end);
            c.ahead.pop_first();
        }
        let below = c.below;
        drop(c);
        self.watermark.send_if_modified(|w| {
            let moved = *w != below;
            *w = below;
            moved
        });
    }

    /// Every sequence number below this one is confirmed.
    pub fn confirmed_below(&self) -> u64 {
        *self.watermark.borrow()
    }

    /// Waits until every sequence number below `end` is confirmed.
    pub async fn confirmed(&self, end: u64) {
        let mut rx = self.watermark.subscribe();
        // The sender lives as long as `self`, so the wait cannot fail.
        let _ = rx.wait_for(|&below| below >= end).await;
    }

    /// Refuses further pushes (shutdown).
    pub fn close(&self) {
        let _pending = self.pending.lock();
        self.closed.store(true, Ordering::Release);
        drop(_pending);
        self.wake.notify_one();
    }

    /// Bytes held: buffered plus in flight.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes.load(Ordering::Acquire)
    }

    /// True when a push of one event would be refused for lack of room.
    pub fn is_full(&self) -> bool {
        self.held_bytes() + self.ids_charge() + EventRow::SIZE > self.limits.max_bytes
    }

    /// Counts the memory of the client event ids remembered past `EVENT_IDS_MAX` (`bytes`, as the
    /// id store reports it) against `BUFFER_MAX_BYTES`, up to [`ID_BYTES`] per event held: while
    /// events wait, those ids are theirs (each waiting id has an event here), and without the
    /// charge a buffer full of events with ids took twice its cap and more (docs/PERFORMANCE.md,
    /// "Ids kept for a full buffer"). Once the events are stored the ids stay a while for late
    /// retries, and count at most one per event held: an empty buffer charges nothing, and the
    /// buffer always has room for `BUFFER_MAX_BYTES / (EventRow::SIZE + ID_BYTES)` events (whole
    /// ids kept against the cap left a buffer no room at all after repeated outages).
    pub fn set_ids_bytes(&self, bytes: usize) {
        self.ids_bytes.store(bytes, Ordering::Release);
        self.show_ids_bytes();
    }

    /// What the ids take of the cap now (see [`Buffer::set_ids_bytes`]).
    fn ids_charge(&self) -> usize {
        let held_rows = self.held_bytes() / EventRow::SIZE;
        self.ids_bytes.load(Ordering::Acquire).min(held_rows * ID_BYTES)
    }

    /// Sets `adbeacon_buffer_ids_bytes` to the charge: when the ids' memory or the events held
    /// change (a reservation's room counts only for the moment it is reserved).
    fn show_ids_bytes(&self) {
        self.metrics.buffer_ids_bytes.set(i64::try_from(self.ids_charge()).unwrap_or(i64::MAX));
    }
}

/// Removes the first `n` numbers from `runs` and returns them as ranges.
fn take_runs(runs: &mut VecDeque<Range<u64>>, mut n: usize) -> Vec<Range<u64>> {
    let mut taken = Vec::new();
    while n > 0 {
        let Some(front) = runs.front_mut() else { break };
        let len = (front.end - front.start) as usize;
        if len <= n {
            n -= len;
            taken.extend(runs.pop_front());
        } else {
            let cut = front.start + n as u64;
            taken.push(front.start..cut);
            front.start = cut;
            n = 0;
        }
    }
    taken
}

#[cfg(test)]
// A batch of one range of sequence numbers is the common case, not a mistaken range of ranges.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::domain::EventKind;
    use time::OffsetDateTime;

    fn row() -> EventRow {
        EventRow {
            event_id: Uuid::new_v4(),
            ad_id: Uuid::nil(),
            kind: EventKind::Click,
            event_time: OffsetDateTime::UNIX_EPOCH,
            received_at: OffsetDateTime::UNIX_EPOCH,
            ip_hash: 1,
            playback_time: None,
            error_code: 0,
            batch_id: Uuid::nil(),
            traffic: crate::domain::Traffic::Valid,
        }
    }

    fn rows(n: usize) -> Vec<EventRow> {
        std::iter::repeat_with(row).take(n).collect()
    }

    fn buffer(max_rows_held: usize, batch_rows: usize) -> Arc<Buffer> {
        Arc::new(Buffer::new(
            Limits {
                max_bytes: max_rows_held * EventRow::SIZE,
                batch_rows,
                batch_bytes: usize::MAX / 2,
                max_age: Duration::from_secs(1),
            },
            Arc::new(Metrics::new()),
        ))
    }

    #[test]
    fn batches_are_cut_in_order_and_hold_no_more_room_than_a_batch() {
        let b = buffer(1_000_000, 5000);
        for _ in 0..7 {
            b.push(rows(3000)).unwrap();
        }
        let mut seen = 0;
        while let Some(batch) = b.take(Instant::now(), true) {
            // Room for a whole batch from the start, and no more: never grown, so never copied.
            assert!(batch.rows.len() <= 5000);
            assert_eq!(batch.rows.capacity(), 5000);
            let runs: Vec<_> = batch.seqs.clone();
            assert_eq!(runs, vec![seen..seen + batch.rows.len() as u64]);
            seen += batch.rows.len() as u64;
        }
        assert_eq!(seen, 21_000);
    }

    #[test]
    fn full_until_released_not_until_taken() {
        let b = buffer(3, 10);
        b.push(rows(3)).unwrap();
        assert_eq!(b.push(rows(1)), Err(PushError::Full));
        let batch = b.take(Instant::now(), true).unwrap();
        assert_eq!(batch.rows.len(), 3);
        // Taken but not confirmed: still held.
        assert_eq!(b.push(rows(1)), Err(PushError::Full));
        b.release(&batch);
        b.push(rows(1)).unwrap();
    }

    #[test]
    fn the_ids_kept_for_the_events_count_against_the_cap_while_events_are_held() {
        let b = buffer(10, 10);
        b.push(rows(4)).unwrap();
        // More ids past the bound than events held: each held event counts with one id at most
        // (a waiting id has an event here), so 6 rows fit with theirs, not 7.
        b.set_ids_bytes(1_000_000);
        assert_eq!(b.push(rows(3)), Err(PushError::Full));
        b.push(rows(2)).unwrap();
        assert_eq!(b.push(rows(1)), Err(PushError::Full));
        assert!(b.is_full());
        assert_eq!(b.metrics.buffer_ids_bytes.get(), (6 * ID_BYTES) as i64);
        // Stored: whatever ids the store still reports (those kept for late retries), nothing
        // is held, so nothing is charged, and new events count one id each at most.
        let batch = b.take(Instant::now(), true).unwrap();
        b.release(&batch);
        assert_eq!(b.metrics.buffer_ids_bytes.get(), 0);
        assert!(!b.is_full());
        b.push(rows(5)).unwrap();
        assert_eq!(b.push(rows(2)), Err(PushError::Full));
        // Fewer ids than events: the ids count as they are.
        b.set_ids_bytes(ID_BYTES);
        b.push(rows(4)).unwrap();
        assert_eq!(b.metrics.buffer_ids_bytes.get(), ID_BYTES as i64);
    }

    #[test]
    fn batches_are_due_by_size_or_age_and_carry_their_token() {
        let b = buffer(100, 4);
        let t0 = Instant::now();
        b.push(rows(2)).unwrap();
        assert!(b.take(t0, false).is_none(), "neither full nor old");
        let later = t0 + Duration::from_secs(2);
        let batch = b.take(later, false).expect("old enough");
        assert!(batch.rows.iter().all(|r| r.batch_id == batch.id));
        b.push(rows(9)).unwrap();
        assert_eq!(b.take(Instant::now(), false).unwrap().rows.len(), 4);
        assert_eq!(b.take(Instant::now(), false).unwrap().rows.len(), 4);
        assert!(b.take(Instant::now(), false).is_none());
        assert_eq!(b.take(Instant::now(), true).unwrap().rows.len(), 1);
    }

    #[test]
    fn batches_gone_elsewhere_one_after_the_other_are_one_entry() {
        let b = buffer(1_000, 10);
        b.push(rows(45)).unwrap();
        let batches: Vec<Batch> = std::iter::from_fn(|| b.take(Instant::now(), true)).collect();
        assert_eq!(batches.len(), 5);
        // 0..10 into ClickHouse; 10..40 elsewhere, one after the other; 40..45 elsewhere too.
        b.release(&batches[0]);
        for batch in &batches[1..4] {
            b.release_elsewhere(batch);
        }
        assert_eq!(b.elsewhere.lock().len(), 1, "joined");
        b.release_elsewhere(&batches[4]);
        assert_eq!(b.elsewhere.lock().len(), 1);
        assert!(!b.went_elsewhere(&(0..10)));
        assert!(b.went_elsewhere(&(9..11)));
        assert!(b.went_elsewhere(&(25..26)));
        assert!(b.went_elsewhere(&(44..45)));
        assert!(!b.went_elsewhere(&(45..50)));
    }

    #[test]
    fn a_batch_stored_but_for_some_rows_marks_only_those_gone_elsewhere() {
        let b = buffer(1_000, 100);
        // Three requests: 0..2, 2..5 and 5..6.
        let firsts: Vec<Range<u64>> = [2, 3, 1].into_iter().map(|n| b.push(rows(n)).unwrap()).collect();
        let batch = b.take(Instant::now(), true).unwrap();
        // ClickHouse rejected the second request's middle row and the third's only one.
        let dead: HashSet<Uuid> = [batch.rows[3].event_id, batch.rows[5].event_id].into();
        b.release_partly(&batch, &dead);
        assert_eq!(b.confirmed_below(), 6, "released all the same");
        let gone: Vec<bool> = firsts.iter().map(|seqs| b.went_elsewhere(seqs)).collect();
        assert_eq!(gone, [false, true, true]);
        let ranges: Vec<Range<u64>> =
            b.elsewhere.lock().iter().map(|(start, (end, _))| *start..*end).collect();
        assert_eq!(ranges, [3..4, 5..6]);

        // A batch whose rows and numbers do not pair up counts as gone elsewhere whole.
        let seqs = b.push(rows(2)).unwrap();
        let mut odd = b.take(Instant::now(), true).unwrap();
        odd.rows.pop();
        let dead: HashSet<Uuid> = [odd.rows[0].event_id].into();
        b.release_partly(&odd, &dead);
        assert!(b.went_elsewhere(&(seqs.end - 1..seqs.end)));
    }

    #[test]
    fn scattered_ranges_gone_elsewhere_are_found_as_a_scan_finds_them() {
        let b = buffer(10, 10);
        // Every third number of 0..3000 gone elsewhere, some of them joined in runs of two.
        let gone: Vec<Range<u64>> =
            (0..1000u64).map(|i| if i % 7 == 0 { i * 3..i * 3 + 2 } else { i * 3..i * 3 + 1 }).collect();
        b.went(&gone);
        let mut x = 12345u64;
        for _ in 0..5000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let start = (x >> 33) % 3100;
            let seqs = start..start + 1 + (x >> 20) % 5;
            let scanned = gone.iter().any(|r| r.start < seqs.end && seqs.start < r.end);
            assert_eq!(b.went_elsewhere(&seqs), scanned, "{seqs:?}");
        }
    }

    #[test]
    fn closed_refuses() {
        let b = buffer(10, 10);
        b.close();
        assert_eq!(b.push(rows(1)), Err(PushError::Closed));
    }

    #[test]
    fn a_dropped_reservation_gives_its_room_back() {
        let b = buffer(2, 10);
        let room = b.reserve(2).unwrap();
        assert!(b.is_full());
        assert_eq!(b.reserve(1).err(), Some(PushError::Full));
        drop(room);
        assert_eq!(b.held_bytes(), 0);
        let room = b.reserve(2).unwrap();
        b.close();
        // A fill after the close is refused, and its room is not kept.
        assert_eq!(b.fill(room, None, rows(2)), Err(PushError::Closed));
        assert_eq!(b.held_bytes(), 0);
    }

    #[test]
    fn batches_carry_their_sequence_numbers_and_the_watermark_waits_for_gaps() {
        let b = buffer(100, 4);
        assert_eq!(b.push(rows(3)).unwrap(), 0..3);
        // Numbers given by the log continue the run.
        let room = b.reserve(3).unwrap();
        assert_eq!(b.fill(room, Some(3), rows(3)).unwrap(), 3..6);
        let first = b.take(Instant::now(), true).unwrap();
        assert_eq!(first.seqs, vec![0..4]);
        let second = b.take(Instant::now(), true).unwrap();
        assert_eq!(second.seqs, vec![4..6]);
        // Confirmed out of order: the watermark stays below the first until it is confirmed.
        b.release(&second);
        assert_eq!(b.confirmed_below(), 0);
        b.release(&first);
        assert_eq!(b.confirmed_below(), 6);
    }

    #[test]
    fn recovered_batches_go_first_and_recovered_rows_ignore_the_cap() {
        let b = buffer(2, 10);
        b.restore_batch(Batch { id: Uuid::new_v4(), rows: rows(2), seqs: vec![0..2], uncertain: true });
        b.restore_rows(2, rows(2));
        assert!(b.is_full());
        assert!(b.next_deadline().is_some_and(|d| d <= Instant::now()));
        let first = b.take(Instant::now(), false).unwrap();
        assert!(first.uncertain);
        let rest = b.take(Instant::now(), true).unwrap();
        assert_eq!(rest.seqs, vec![2..4]);
        b.release(&first);
        b.release(&rest);
        assert_eq!(b.confirmed_below(), 4);
        assert_eq!(b.held_bytes(), 0);
        // Numbering goes on after the recovered rows.
        assert_eq!(b.push(rows(1)).unwrap(), 4..5);
    }

    #[tokio::test]
    async fn confirmed_wakes_when_the_watermark_passes() {
        let b = buffer(10, 10);
        let seqs = b.push(rows(2)).unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.confirmed(seqs.end).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let batch = b.take(Instant::now(), true).unwrap();
        b.release(&batch);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
}
