//! The in-memory buffer between the HTTP handlers and the flusher.
//!
//! Bounded by bytes, counting every event from the moment it is accepted until ClickHouse confirms
//! it (or it is saved as a dead letter): while ClickHouse is down, failed batches stay accounted
//! for, the buffer fills, and new requests get an immediate 503 instead of a 2xx for an event
//! that no layer could hold. Pushing never waits.

use std::{
    mem,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::{metrics::Metrics, store::EventRow};

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

/// Rows taken from the buffer to be inserted together, under one token.
#[derive(Debug)]
pub struct Batch {
    /// The batch token, also stored in every row's `batch_id`.
    pub id: Uuid,
    /// The rows.
    pub rows: Vec<EventRow>,
}

struct Pending {
    rows: Vec<EventRow>,
    /// When the oldest buffered row arrived.
    since: Option<Instant>,
}

/// The buffer. Shared by handlers (push) and the flusher (take, release).
pub struct Buffer {
    pending: Mutex<Pending>,
    wake: Notify,
    held_bytes: AtomicUsize,
    closed: AtomicBool,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl Buffer {
    /// An empty buffer.
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            pending: Mutex::new(Pending { rows: Vec::new(), since: None }),
            wake: Notify::new(),
            held_bytes: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            limits,
            metrics,
        }
    }

    /// Rows per batch that fit both batch limits.
    fn rows_per_batch(&self) -> usize {
        self.limits.batch_rows.min((self.limits.batch_bytes / EventRow::SIZE).max(1))
    }

    /// Accepts rows, or refuses all of them at once. Never waits.
    pub fn push(&self, rows: impl ExactSizeIterator<Item = EventRow>) -> Result<(), PushError> {
        let count = rows.len();
        let bytes = count * EventRow::SIZE;
        // Reserve first, so that concurrent pushes can never overshoot the cap together.
        let before = self.held_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.limits.max_bytes {
            self.held_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(PushError::Full);
        }
        let wake = {
            let mut p = self.pending.lock();
            // Checked under the lock that `close` takes: a push either lands before the close (and
            // the final drain takes it) or sees the close. Never a 2xx for an event left behind.
            if self.closed.load(Ordering::Acquire) {
                drop(p);
                self.held_bytes.fetch_sub(bytes, Ordering::AcqRel);
                return Err(PushError::Closed);
            }
            let was_empty = p.rows.is_empty();
            if was_empty {
                p.since = Some(Instant::now());
            }
            p.rows.extend(rows);
            // Wake the flusher to arm its age timer, or because a batch is full.
            was_empty || p.rows.len() >= self.rows_per_batch()
        };
        self.metrics.buffer_events.add(count as i64);
        self.metrics.buffer_bytes.add(bytes as i64);
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Takes the next batch if one is due (full or old enough), or any rows at all with `force`.
    pub fn take(&self, now: Instant, force: bool) -> Option<Batch> {
        let per_batch = self.rows_per_batch();
        let mut p = self.pending.lock();
        let due = !p.rows.is_empty()
            && (force
                || p.rows.len() >= per_batch
                || p.since.is_some_and(|s| now.duration_since(s) >= self.limits.max_age));
        if !due {
            return None;
        }
        let rows = if p.rows.len() <= per_batch {
            p.since = None;
            mem::take(&mut p.rows)
        } else {
            // The rest keeps the old `since`: it is at least that old, so it goes out promptly.
            let rest = p.rows.split_off(per_batch);
            mem::replace(&mut p.rows, rest)
        };
        drop(p);
        let id = Uuid::new_v4();
        let mut rows = rows;
        for r in &mut rows {
            r.batch_id = id;
        }
        Some(Batch { id, rows })
    }

    /// When the oldest buffered event becomes due, if any is buffered.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.lock().since.map(|s| s + self.limits.max_age)
    }

    /// Waits until a push wakes the flusher.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Forgets `rows` events that are now safe elsewhere (in ClickHouse or a dead-letter file).
    pub fn release(&self, rows: usize) {
        let bytes = rows * EventRow::SIZE;
        self.held_bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.metrics.buffer_events.sub(rows as i64);
        self.metrics.buffer_bytes.sub(bytes as i64);
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
        self.held_bytes() + EventRow::SIZE > self.limits.max_bytes
    }
}

#[cfg(test)]
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

    fn buffer(max_rows_held: usize, batch_rows: usize) -> Buffer {
        Buffer::new(
            Limits {
                max_bytes: max_rows_held * EventRow::SIZE,
                batch_rows,
                batch_bytes: usize::MAX / 2,
                max_age: Duration::from_secs(1),
            },
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn full_until_released_not_until_taken() {
        let b = buffer(3, 10);
        b.push(std::iter::repeat_with(row).take(3)).unwrap();
        assert_eq!(b.push(std::iter::once(row())), Err(PushError::Full));
        let batch = b.take(Instant::now(), true).unwrap();
        assert_eq!(batch.rows.len(), 3);
        // Taken but not confirmed: still held.
        assert_eq!(b.push(std::iter::once(row())), Err(PushError::Full));
        b.release(batch.rows.len());
        b.push(std::iter::once(row())).unwrap();
    }

    #[test]
    fn batches_are_due_by_size_or_age_and_carry_their_token() {
        let b = buffer(100, 4);
        let t0 = Instant::now();
        b.push(std::iter::repeat_with(row).take(2)).unwrap();
        assert!(b.take(t0, false).is_none(), "neither full nor old");
        let later = t0 + Duration::from_secs(2);
        let batch = b.take(later, false).expect("old enough");
        assert!(batch.rows.iter().all(|r| r.batch_id == batch.id));
        b.push(std::iter::repeat_with(row).take(9)).unwrap();
        assert_eq!(b.take(Instant::now(), false).unwrap().rows.len(), 4);
        assert_eq!(b.take(Instant::now(), false).unwrap().rows.len(), 4);
        assert!(b.take(Instant::now(), false).is_none());
        assert_eq!(b.take(Instant::now(), true).unwrap().rows.len(), 1);
    }

    #[test]
    fn closed_refuses() {
        let b = buffer(10, 10);
        b.close();
        assert_eq!(b.push(std::iter::once(row())), Err(PushError::Closed));
    }
}
