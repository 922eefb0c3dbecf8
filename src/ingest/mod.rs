//! The ingest pipeline: accepted events are held ([`Intake`]: in the write-ahead log and the
//! bounded buffer, as `ACK_MODE` says), the flusher inserts them into ClickHouse in batches,
//! batches ClickHouse cannot take move to the Redis spill, replayers drain the spill once
//! ClickHouse is back, and rows ClickHouse rejects as data become dead letters.

pub mod buffer;
pub mod dead_letter;
pub mod flusher;
pub mod insert;
pub mod replay;
pub mod spill;
pub mod wal;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

pub use self::{
    buffer::{Batch, Buffer, Limits, PushError},
    dead_letter::DeadLetters,
    flusher::Flusher,
    replay::Replayer,
    spill::{Keys, RedisState, Spill},
    wal::{FsyncPolicy, Wal, WalConfig, WalError},
};
use crate::store::EventRow;

/// What a 2xx for an event means (`ACK_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// The event is in the in-memory buffer; a crash loses the buffer.
    Buffered,
    /// The event is in the local write-ahead log; a process crash loses nothing.
    Wal,
    /// ClickHouse confirmed the batch holding the event.
    Committed,
}

impl AckMode {
    /// The value of `ACK_MODE`.
    pub fn name(self) -> &'static str {
        match self {
            AckMode::Buffered => "buffered",
            AckMode::Wal => "wal",
            AckMode::Committed => "committed",
        }
    }

    /// Parses [`AckMode::name`].
    pub fn from_name(name: &str) -> Option<AckMode> {
        [AckMode::Buffered, AckMode::Wal, AckMode::Committed].into_iter().find(|m| m.name() == name)
    }
}

/// Why events could not be held.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HoldError {
    /// The buffer is full or closed; nothing was held.
    #[error(transparent)]
    Push(#[from] PushError),
    /// The write-ahead log cannot be written; nothing was held.
    #[error(transparent)]
    Log(#[from] WalError),
    /// `committed` mode: the events are held (in the buffer, or in the Redis spill), but
    /// ClickHouse did not confirm them in time.
    #[error("ClickHouse did not confirm the events in time")]
    Unconfirmed,
}

/// Where accepted events go, and when they count as held.
#[derive(Clone)]
pub struct Intake {
    /// The buffer the flusher drains.
    pub buffer: Arc<Buffer>,
    /// The write-ahead log, in `wal` mode.
    pub wal: Option<Wal>,
    /// `committed` mode: how long to wait for ClickHouse.
    pub commit_timeout: Option<Duration>,
}

impl Intake {
    /// Events go to the buffer only (`buffered`).
    pub fn buffered(buffer: Arc<Buffer>) -> Self {
        Intake { buffer, wal: None, commit_timeout: None }
    }

    /// The acknowledgement mode this intake implements.
    pub fn mode(&self) -> AckMode {
        match (&self.wal, self.commit_timeout) {
            (Some(_), _) => AckMode::Wal,
            (None, Some(_)) => AckMode::Committed,
            (None, None) => AckMode::Buffered,
        }
    }

    /// Holds `rows`, all or none: in the buffer, after the log in `wal` mode. Ok means the 2xx
    /// may be sent, except in `committed` mode, which must first wait for [`Intake::confirmed`]
    /// with what this returns.
    pub async fn hold(&self, rows: Vec<EventRow>) -> Result<Held, HoldError> {
        if rows.is_empty() {
            return Ok(Held(0..0));
        }
        if let Some(wal) = &self.wal {
            let room = self.buffer.reserve(rows.len())?;
            return Ok(Held(wal.append(room, rows).await?));
        }
        Ok(Held(self.buffer.push(rows)?))
    }

    /// `committed` mode: waits until ClickHouse holds the events `held` names, or ACK_TIMEOUT
    /// passes (then the events stay held, but the answer is 503). Events that went to the Redis
    /// spill instead are held too, but not in ClickHouse: also 503. Other modes: at once.
    pub async fn confirmed(&self, held: Held) -> Result<(), HoldError> {
        self.all_confirmed(std::slice::from_ref(&held.0)).await
    }

    /// [`Intake::confirmed`] for events held by several requests (repeats answered together):
    /// one wait, for the last of them, within ACK_TIMEOUT. Empty ranges name nothing to wait for.
    pub async fn all_confirmed(&self, held: &[std::ops::Range<u64>]) -> Result<(), HoldError> {
        let Some(limit) = self.commit_timeout else { return Ok(()) };
        let Some(end) = held.iter().filter(|seqs| !seqs.is_empty()).map(|seqs| seqs.end).max() else {
            return Ok(());
        };
        tokio::time::timeout(limit, self.buffer.confirmed(end)).await.map_err(|_| HoldError::Unconfirmed)?;
        if held.iter().any(|seqs| !seqs.is_empty() && self.buffer.went_elsewhere(seqs)) {
            return Err(HoldError::Unconfirmed);
        }
        Ok(())
    }
}

/// Events just held, by their sequence numbers: in `committed` mode the confirmation must pass
/// them; in every mode they say until when the events wait unconfirmed.
#[derive(Debug, Clone)]
#[must_use = "committed mode must wait for the confirmation"]
pub struct Held(std::ops::Range<u64>);

impl Held {
    /// The sequence numbers of the events: what a repeat of them must wait for too in
    /// `committed` mode ([`Intake::all_confirmed`]), and what keeps their event ids remembered
    /// while they wait.
    pub fn seqs(&self) -> std::ops::Range<u64> {
        self.0.clone()
    }
}

/// Whether ClickHouse takes INSERTs, as the last attempt found it. The flusher spills at once
/// while it does not; the replayer waits, probing, and says when it is back.
#[derive(Debug, Default)]
pub struct Health {
    down: AtomicBool,
    back: Notify,
}

impl Health {
    /// True unless the last INSERT (or probe) failed.
    pub fn ok(&self) -> bool {
        !self.down.load(Ordering::Acquire)
    }

    /// An INSERT failed for a reason that may pass.
    pub fn failed(&self) {
        self.down.store(true, Ordering::Release);
    }

    /// An INSERT (or probe) succeeded.
    pub fn succeeded(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            self.back.notify_waiters();
            tracing::info!("ClickHouse takes INSERTs again");
        }
    }

    /// Waits until ClickHouse is back (at once when it is not down).
    pub async fn back(&self) {
        let notified = self.back.notified();
        if self.ok() {
            return;
        }
        notified.await;
    }
}
