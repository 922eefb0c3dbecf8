//! The write-ahead log of `ACK_MODE=wal`: accepted events are in a local file under
//! `DATA_DIR/wal/` before their 2xx is sent, so that a crash of the process (or, with fsync on
//! every group, of the machine) loses nothing that was acknowledged.
//!
//! One writer task owns the files. Requests hand it their rows over a channel and wait; it writes
//! whatever has queued up as one group, with one write and one `fdatasync` (group commit), then
//! gives the rows to the buffer in log order and answers every waiter. The write goes to the page
//! cache from the task itself (microseconds); only the sync runs on the blocking pool, and while it
//! runs the next group queues up. (A dedicated writer thread measured about twice the CPU per
//! event with `WAL_FSYNC=10ms`: a thread wake-up for nearly every request.) With
//! `WAL_FSYNC=<interval>` it answers after the write and syncs at most that long later, in the
//! background while later groups are written: a process crash still loses nothing (the kernel
//! holds the written pages), a power loss may lose the last interval.
//!
//! Each record is `[length u32][crc32c u32][type u8, payload]`, little-endian. Types:
//! - *events*: the first sequence number and the rows (fixed 65-byte encoding);
//! - *batch*: a batch token and the sequence numbers it carries, synced before the batch's first
//!   INSERT, so that after a crash the events of an INSERT that may have landed are known by
//!   token and checked in ClickHouse instead of being sent again under a new one;
//! - *done*: a batch is confirmed (not synced on its own: a lost one only costs a check);
//! - *supersedes*: written first in the segment that recovery creates: it replaces every older
//!   segment, so a crash in the middle of recovery never counts an event twice;
//! - *probe*: written while the disk fails, to notice when it works again.
//!
//! Segments (`NNNNNNNNNNNN.wal`) rotate at `WAL_SEGMENT_BYTES` and are deleted oldest first once
//! the buffer's confirmed watermark has passed their last event: every event in them is in
//! ClickHouse or in a dead-letter file.
//!
//! Recovery (at start-up, before serving) reads every segment up to the first record that is torn
//! or fails its checksum; what follows is moved to `wal/corrupt/` and reported. Events of batches
//! marked done are dropped; batches marked but not done come back as *uncertain* batches with
//! their tokens (the flusher asks ClickHouse which of their events it holds before sending the
//! rest); the other events come back as new. All of it is written to one new segment, which
//! supersedes the old ones, before they are deleted.
//!
//! If a write or sync fails (a full or broken disk), the group is cut off the file again, its
//! requests get 503, readiness turns false, and a probe every second notices when the disk
//! works again.
//!
//! If the log's files are deleted while the service runs (`rm -rf` of `DATA_DIR`, a cleaner of
//! old files), the writer still holds them open and would go on writing into files that no
//! longer have a name: events acknowledged as durable that a crash would lose. Once a second,
//! busy or idle, and at shutdown, the writer checks that its files still have a name; when one
//! has not, it writes the directory, the lock and every unconfirmed segment again from the open
//! files. Until it can, requests get 503 as for a broken disk.

use std::{
    collections::{HashSet, VecDeque},
    fs::{self, File, OpenOptions},
    io::{self, Write},
    ops::Range,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::buffer::{Batch, Buffer, Reservation};
use crate::{
    domain::{EventKind, Traffic},
    metrics::Metrics,
    store::EventRow,
};

/// First bytes of every segment: the format and its version.
const MAGIC: &[u8; 8] = b"ADBWAL\x00\x01";
/// Bytes of a record's header: length and checksum.
const HEADER: usize = 8;
/// A record longer than this is corruption, not data (the largest group of one request is far
/// smaller, and events records are cut at [`ROWS_PER_RECORD`]).
const MAX_RECORD: usize = 64 << 20;
/// Rows per events record when recovery rewrites the log.
const ROWS_PER_RECORD: usize = 16_384;
/// Bytes of one encoded row.
pub const ROW_BYTES: usize = 16 + 16 + 1 + 8 + 8 + 8 + 1 + 4 + 2 + 1;
/// Requests gathered into one group at most, so that the first of them does not wait forever
/// under a flood.
const MAX_GROUP: usize = 4096;
/// Groups written and waiting for their sync at once. One: while a sync runs, the next group
/// gathers (group commit). Overlapping syncs (2 or 3) measured slower here, with more and smaller
/// groups whose syncs cost CPU; a disk with a long sync latency but deep queues may prefer more.
const MAX_IN_FLIGHT: usize = 1;
/// The most bytes written but not yet known durable that the writer keeps a copy of
/// (`Writer::pending`); past it, new groups wait for the sync under way.
const MAX_PENDING: usize = 64 << 20;

/// How often a failing log is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long the writer waits before it tries again to begin a segment, or to delete a confirmed
/// one, after it could not: the writer runs once per group, and a try and a warning per group
/// would flood the log (hundreds of lines a second under load: measured 465 a second with the
/// log directory deleted under the batch load).
const FILE_RETRY: Duration = Duration::from_secs(10);

/// How often the writer checks that its files are still in the log's directory (an `fstat` per
/// open segment): events written in between into a deleted file are written again with it, so
/// this bounds how long acknowledged events sit in a file without a name.
const LINK_CHECK: Duration = Duration::from_secs(1);

const EVENTS: u8 = 1;
const BATCH: u8 = 2;
const DONE: u8 = 3;
const SUPERSEDES: u8 = 4;
const PROBE: u8 = 5;

/// When the log is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every group, before its requests are answered.
    EveryGroup,
    /// At most this long after a write; requests are answered after the write.
    Interval(Duration),
}

/// Where the log lives and how it is written.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// The log's directory (`DATA_DIR/wal`).
    pub dir: PathBuf,
    /// A segment is closed and a new one begun once it is this long.
    pub segment_bytes: u64,
    /// When to fsync.
    pub fsync: FsyncPolicy,
}

/// The log could not take a write; nothing of the request was acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the local log cannot be written: {0}")]
pub struct WalError(pub String);

impl WalError {
    fn closed() -> Self {
        WalError("it is closed (shutting down)".into())
    }
}

/// What recovery found in the log at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segments read.
    pub segments: usize,
    /// Events given back to the buffer as new.
    pub fresh_events: usize,
    /// Batches whose INSERT may have landed, given back with their tokens.
    pub uncertain_batches: usize,
    /// Events in those batches.
    pub uncertain_events: usize,
    /// Events dropped because their batch was confirmed.
    pub confirmed_events: usize,
    /// Bytes after a torn or corrupt record, moved to `wal/corrupt/`.
    pub corrupt_bytes: u64,
}

enum Job {
    Events { room: Reservation, rows: Vec<EventRow>, ack: Logged },
    Batch { id: Uuid, seqs: Vec<Range<u64>>, ack: Ack },
    Done { id: Uuid },
    Stop { ack: oneshot::Sender<()> },
}

#[derive(Default)]
struct Health {
    failing: AtomicBool,
    error: Mutex<String>,
}

/// A handle on the log; cheap to clone.
#[derive(Clone)]
pub struct Wal {
    tx: mpsc::UnboundedSender<Job>,
    health: Arc<Health>,
    /// One past the sequence numbers recovery gave back: the events the log held at start-up.
    recovered_end: u64,
    /// False when the log only drains what an earlier run left (another ACK_MODE now).
    takes_appends: bool,
}

impl Wal {
    /// Recovers what the log holds into `buffer` (on the blocking pool), then starts the writer
    /// task.
    pub async fn open(
        config: WalConfig,
        buffer: Arc<Buffer>,
        metrics: Arc<Metrics>,
    ) -> io::Result<(Wal, Recovery)> {
        let (writer, recovery) = tokio::task::spawn_blocking(move || recover(config, buffer, metrics))
            .await
            .map_err(io::Error::other)??;
        let health = writer.health.clone();
        let recovered_end = writer.next_seq;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer.run(rx));
        Ok((Wal { tx, health, recovered_end, takes_appends: true }, recovery))
    }

    /// The same log, used only to drain what an earlier run left in it (the service runs in
    /// another ACK_MODE now): batches of new events are not marked in it.
    pub fn recovery_only(self) -> Wal {
        Wal { takes_appends: false, ..self }
    }

    /// Whether `batch` has events in the log, so that its token must be logged before its
    /// INSERT.
    pub fn holds(&self, batch: &Batch) -> bool {
        self.takes_appends || batch.seqs.iter().any(|r| r.start < self.recovered_end)
    }

    /// Whether every event of `batch` is in the log: true for every batch unless the log only
    /// drains an earlier run's events ([`Wal::recovery_only`]), whose events it holds and no
    /// others.
    pub fn keeps(&self, batch: &Batch) -> bool {
        self.takes_appends || batch.seqs.iter().all(|r| r.end <= self.recovered_end)
    }

    /// Logs `rows` (room for them already reserved) and, once they are durable as `WAL_FSYNC`
    /// says, puts them in the buffer. Ok means the 2xx may be sent; it carries the events'
    /// sequence numbers.
    pub async fn append(&self, room: Reservation, rows: Vec<EventRow>) -> Result<Range<u64>, WalError> {
        let (ack, done) = oneshot::channel();
        // A failed send hands the job back, and dropping it gives the room back.
        self.tx.send(Job::Events { room, rows, ack }).map_err(|_| WalError::closed())?;
        done.await.unwrap_or_else(|_| Err(WalError::closed()))
    }

    /// Logs and syncs a batch's token and sequence numbers; the batch may be sent once this
    /// returns Ok.
    pub async fn mark_batch(&self, batch: &Batch) -> Result<(), WalError> {
        let (ack, done) = oneshot::channel();
        let job = Job::Batch { id: batch.id, seqs: batch.seqs.clone(), ack };
        self.tx.send(job).map_err(|_| WalError::closed())?;
        done.await.unwrap_or_else(|_| Err(WalError::closed()))
    }

    /// Notes that a batch is confirmed (and lets the writer delete segments the confirmed
    /// watermark has passed).
    pub fn confirmed(&self, id: Uuid) {
        let _ = self.tx.send(Job::Done { id });
    }

    /// Syncs, deletes what is confirmed and stops the writer; later calls fail.
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Job::Stop { ack }).is_ok() {
            let _ = done.await;
        }
    }

    /// Why the last write failed, while the log cannot be written.
    pub fn failure(&self) -> Option<String> {
        self.health.failing.load(Ordering::Acquire).then(|| self.health.error.lock().clone())
    }
}

// ------------------------------------------------------------------------------- encoding

/// Rows in the log's encoding ([`ROW_BYTES`] each), as the spill and dead letters store them too.
pub(crate) fn encode_rows(rows: &[EventRow]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * ROW_BYTES);
    for r in rows {
        encode_row(&mut out, r);
    }
    out
}

/// Reads back [`encode_rows`], giving every row `batch_id`; None unless every byte is a valid row.
pub(crate) fn decode_rows(bytes: &[u8], batch_id: Uuid) -> Option<Vec<EventRow>> {
    if !bytes.len().is_multiple_of(ROW_BYTES) {
        return None;
    }
    let mut reader = Reader(bytes);
    (0..bytes.len() / ROW_BYTES)
        .map(|_| decode_row(&mut reader).map(|row| EventRow { batch_id, ..row }))
        .collect()
}

fn encode_row(out: &mut Vec<u8>, r: &EventRow) {
    out.extend_from_slice(r.event_id.as_bytes());
    out.extend_from_slice(r.ad_id.as_bytes());
    out.push(r.kind as i8 as u8);
    out.extend_from_slice(&r.event_time.unix_timestamp().to_le_bytes());
    out.extend_from_slice(&r.received_at.unix_timestamp().to_le_bytes());
    out.extend_from_slice(&r.ip_hash.to_le_bytes());
    out.push(u8::from(r.playback_time.is_some()));
    out.extend_from_slice(&r.playback_time.unwrap_or(0.0).to_le_bytes());
    out.extend_from_slice(&r.error_code.to_le_bytes());
    out.push(r.traffic as i8 as u8);
}

/// Reads little-endian fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_le_bytes)
    }
    fn uuid(&mut self) -> Option<Uuid> {
        self.bytes().map(Uuid::from_bytes)
    }
    fn time(&mut self) -> Option<OffsetDateTime> {
        OffsetDateTime::from_unix_timestamp(i64::from_le_bytes(self.bytes()?)).ok()
    }
}

fn decode_row(r: &mut Reader<'_>) -> Option<EventRow> {
    let event_id = r.uuid()?;
    let ad_id = r.uuid()?;
    let kind = r.u8()? as i8;
    let kind = EventKind::ALL.into_iter().find(|k| *k as i8 == kind)?;
    let event_time = r.time()?;
    let received_at = r.time()?;
    let ip_hash = r.u64()?;
    let has_playback = r.u8()?;
    let playback = f32::from_le_bytes(r.bytes()?);
    let error_code = r.u16()?;
    let traffic = r.u8()? as i8;
    let traffic = [Traffic::Valid, Traffic::Duplicate, Traffic::Bot, Traffic::EmptyUserAgent]
        .into_iter()
        .find(|t| *t as i8 == traffic)?;
    Some(EventRow {
        event_id,
        ad_id,
        kind,
        event_time,
        received_at,
        ip_hash,
        playback_time: (has_playback == 1).then_some(playback),
        error_code,
        batch_id: Uuid::nil(),
        traffic,
    })
}

/// Appends one record whose body `body` writes (type byte first).
fn record(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    body(out);
    let len = (out.len() - start - HEADER) as u32;
    let crc = crc32c::crc32c(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn events_record(out: &mut Vec<u8>, first_seq: u64, rows: &[EventRow]) {
    record(out, |o| {
        o.push(EVENTS);
        o.extend_from_slice(&first_seq.to_le_bytes());
        o.extend_from_slice(&(rows.len() as u32).to_le_bytes());
        for r in rows {
            encode_row(o, r);
        }
    });
}

fn batch_record(out: &mut Vec<u8>, id: Uuid, seqs: &[Range<u64>]) {
    record(out, |o| {
        o.push(BATCH);
        o.extend_from_slice(id.as_bytes());
        o.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
        for r in seqs {
            o.extend_from_slice(&r.start.to_le_bytes());
            o.extend_from_slice(&r.end.to_le_bytes());
        }
    });
}

/// A record read back.
#[derive(Debug, PartialEq)]
enum Record {
    Events { first_seq: u64, rows: Vec<EventRow> },
    Batch { id: Uuid, seqs: Vec<Range<u64>> },
    Done { id: Uuid },
    Supersedes { segment: u64 },
    Probe,
}

fn decode_record(body: &[u8]) -> Option<Record> {
    let mut r = Reader(body);
    let record = match r.u8()? {
        EVENTS => {
            let first_seq = r.u64()?;
            let count = r.u32()? as usize;
            if r.0.len() != count * ROW_BYTES {
                return None;
            }
            let rows = (0..count).map(|_| decode_row(&mut r)).collect::<Option<Vec<_>>>()?;
            Record::Events { first_seq, rows }
        }
        BATCH => {
            let id = r.uuid()?;
            let n = r.u32()? as usize;
            if r.0.len() != n * 16 {
                return None;
            }
            let seqs = (0..n).map(|_| Some(r.u64()?..r.u64()?)).collect::<Option<Vec<_>>>()?;
            Record::Batch { id, seqs }
        }
        DONE => Record::Done { id: r.uuid()? },
        SUPERSEDES => Record::Supersedes { segment: r.u64()? },
        PROBE => Record::Probe,
        _ => return None,
    };
    r.0.is_empty().then_some(record)
}

/// What a segment's bytes hold: its records, and the spans that could not be read, each with
/// why (a torn tail, or a corrupt stretch in the middle: a bad sector, pages a failed writeback
/// lost). Reading goes on after a bad span at the next record that checks, so that one bad
/// stretch does not take the rest of the segment with it.
#[cfg(test)]
struct Parsed {
    records: Vec<Record>,
    bad: Vec<(usize, usize, String)>,
}

#[cfg(test)]
fn parse(bytes: &[u8]) -> Parsed {
    let mut records = Vec::new();
    let bad = parse_each(bytes, |record| records.push(record));
    Parsed { records, bad }
}

/// Hands each record of a segment's bytes to `each`, in order, as it is read (recovery keeps
/// only the rows, not a segment's worth of records: see [`recover`]), and returns the spans
/// that could not be read (see [`Parsed`]).
fn parse_each(bytes: &[u8], mut each: impl FnMut(Record)) -> Vec<(usize, usize, String)> {
    let mut bad = Vec::new();
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        bad.push((0, bytes.len(), "not a log segment (bad magic)".into()));
        return bad;
    }
    let mut at = MAGIC.len();
    while at < bytes.len() {
        match read_record(bytes, at) {
            Ok((record, next)) => {
                each(record);
                at = next;
            }
            Err(why) => {
                let resume = (at + 1..bytes.len())
                    .find(|&x| plausible_record(bytes, x) && read_record(bytes, x).is_ok())
                    .unwrap_or(bytes.len());
                bad.push((at, resume, why));
                at = resume;
            }
        }
    }
    bad
}

/// The record at byte `at` and where the next begins, or why it cannot be read.
fn read_record(bytes: &[u8], at: usize) -> Result<(Record, usize), String> {
    let Some(header) = bytes.get(at..at + HEADER) else {
        return Err(format!("torn record header at byte {at}"));
    };
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_RECORD {
        return Err(format!("impossible record length {len} at byte {at}"));
    }
    let Some(body) = bytes.get(at + HEADER..at + HEADER + len) else {
        return Err(format!("torn record at byte {at}"));
    };
    if crc32c::crc32c(body) != crc {
        return Err(format!("checksum mismatch at byte {at}"));
    }
    let record = decode_record(body).ok_or_else(|| format!("undecodable record at byte {at}"))?;
    Ok((record, at + HEADER + len))
}

/// Whether a record could begin at byte `x`: its length fits, and agrees with its type and
/// counts. Cheap, so that looking for where to go on after a bad span checksums only the
/// few offsets that pass.
fn plausible_record(bytes: &[u8], x: usize) -> bool {
    let (Some(header), Some(&kind)) = (bytes.get(x..x + HEADER), bytes.get(x + HEADER)) else { return false };
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > MAX_RECORD || x + HEADER + len > bytes.len() {
        return false;
    }
    let count_at = |offset: usize| {
        bytes
            .get(x + HEADER + offset..x + HEADER + offset + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
    };
    match kind {
        EVENTS => len >= 13 && count_at(9).is_some_and(|n| len == 13 + n * ROW_BYTES),
        BATCH => len >= 21 && count_at(17).is_some_and(|n| len == 21 + n * 16),
        DONE => len == 17,
        SUPERSEDES => len == 9,
        PROBE => len == 1,
        _ => false,
    }
}

// ------------------------------------------------------------------------------- files

/// The extension a confirmed segment is renamed to before it is deleted (see `Writer::collect`).
const CONFIRMED: &str = "confirmed";

/// Deletes confirmed segments that a crash left behind between their rename and their deletion;
/// returns how many.
fn remove_confirmed(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == CONFIRMED) {
            fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:012}.wal"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Takes the log directory for this process, for as long as the returned file stays open: two
/// processes on one log would each replay the other's events (storing them twice), delete the
/// other's segments and write over each other's records. A second adbeacon on the same DATA_DIR
/// refuses to start instead.
fn lock_dir(dir: &Path) -> io::Result<File> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "another adbeacon process uses the log in {} (each instance needs a DATA_DIR of its own)",
                dir.display()
            ),
        )),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The segments in `dir`, by number.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let number = path
            .extension()
            .filter(|e| *e == "wal")
            .and_then(|_| path.file_stem())
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(no) = number {
            found.push((no, path));
        }
    }
    found.sort();
    Ok(found)
}

/// True when `dir` holds log segments (an earlier run's events may be owed).
pub fn has_segments(dir: &Path) -> bool {
    segments(dir).is_ok_and(|s| !s.is_empty())
}

/// Copies the bytes after a segment's valid prefix to `wal/corrupt/` for inspection.
fn move_aside(dir: &Path, no: u64, offset: usize, bytes: &[u8]) -> io::Result<PathBuf> {
    let aside = dir.join("corrupt");
    fs::create_dir_all(&aside)?;
    let path = aside.join(format!("{no:012}.at-{offset}.bad"));
    let mut f = File::create(&path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    sync_dir(&aside)?;
    Ok(path)
}

/// A segment written record by record through a buffer, counting its bytes.
struct SegmentWriter {
    file: io::BufWriter<File>,
    /// The record being encoded, reused.
    record: Vec<u8>,
    len: u64,
    /// The first write that failed; later ones are not tried.
    failed: Option<io::Error>,
}

impl SegmentWriter {
    /// A new file at `path` holding the segment's magic.
    fn create(path: &Path) -> io::Result<Self> {
        let mut out = SegmentWriter {
            file: io::BufWriter::with_capacity(1 << 20, File::create(path)?),
            record: Vec::with_capacity(ROWS_PER_RECORD * ROW_BYTES + 64),
            len: 0,
            failed: None,
        };
        out.put(|o| o.extend_from_slice(MAGIC));
        Ok(out)
    }

    /// Writes what `encode` appends to an empty record buffer.
    fn put(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        self.record.clear();
        encode(&mut self.record);
        if self.failed.is_none() {
            match self.file.write_all(&self.record) {
                Ok(()) => self.len += self.record.len() as u64,
                Err(e) => self.failed = Some(e),
            }
        }
    }

    /// Flushes and syncs the file; its length.
    fn finish(mut self) -> io::Result<u64> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let file = self.file.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        Ok(self.len)
    }
}

/// Rows per piece of an [`Owed`]: pieces rather than one vector, so that the buffer's copy of
/// each, at the end of recovery, frees it at once. (A few in unit tests, whose logs are small,
/// so that they cross pieces.)
const PIECE_ROWS: usize = if cfg!(test) { 4 } else { 1 << 16 };

/// The events, batch marks and confirmations read from the log's segments, in log order.
struct Owed {
    /// Each row's sequence number, in step with the rows.
    seqs: Vec<u64>,
    /// The rows, [`PIECE_ROWS`] to a piece (every piece full but the last).
    pieces: Vec<Vec<EventRow>>,
    marked: Vec<(Uuid, Vec<Range<u64>>)>,
    done: Vec<Uuid>,
}

/// How much of an [`Owed`] there was at some point (where a segment's data begins).
#[derive(Debug, Clone, Copy)]
struct Mark {
    rows: usize,
    marked: usize,
    done: usize,
}

impl Mark {
    /// This mark once the data before `front` is gone.
    fn after(self, front: Mark) -> Mark {
        Mark {
            rows: self.rows - front.rows,
            marked: self.marked - front.marked,
            done: self.done - front.done,
        }
    }
}

impl Owed {
    fn with_capacity(rows: usize) -> Self {
        Owed { seqs: Vec::with_capacity(rows), pieces: Vec::new(), marked: Vec::new(), done: Vec::new() }
    }

    fn mark(&self) -> Mark {
        Mark { rows: self.seqs.len(), marked: self.marked.len(), done: self.done.len() }
    }

    fn row(&self, i: usize) -> &EventRow {
        &self.pieces[i / PIECE_ROWS][i % PIECE_ROWS]
    }

    fn push(&mut self, first_seq: u64, rows: Vec<EventRow>) {
        // As the map's `(first_seq..).zip(rows)` numbered them, in step with the rows.
        self.seqs.extend((first_seq..).take(rows.len()));
        let mut rows = rows.into_iter();
        while rows.len() > 0 {
            if self.pieces.last().is_none_or(|p| p.len() == PIECE_ROWS) {
                self.pieces.push(Vec::with_capacity(PIECE_ROWS));
            }
            let piece = self.pieces.last_mut().expect("just ensured");
            let room = PIECE_ROWS - piece.len();
            piece.extend(rows.by_ref().take(room));
        }
    }

    /// The rows at `keep`, in that order, in pieces again.
    fn repiece(&self, keep: impl Iterator<Item = usize>) -> Vec<Vec<EventRow>> {
        let mut again = Owed::with_capacity(0);
        again.push(0, keep.map(|i| self.row(i).clone()).collect());
        again.pieces
    }

    /// Drops what was read before `until` (the segments a later one supersedes).
    fn drop_front(&mut self, until: Mark) {
        self.pieces = self.repiece(until.rows..self.seqs.len());
        self.seqs.drain(..until.rows);
        self.marked.drain(..until.marked);
        self.done.drain(..until.done);
    }

    /// Sorts what was read out: the batches whose INSERT may have landed (marked, not done) with
    /// their rows, the rows of no batch (fresh), in log order, and how many rows confirmed
    /// batches held. A row goes to the first batch marked with its number; a number read twice
    /// keeps its last row, as a map filled in log order would.
    fn settle(mut self) -> Settled {
        if !self.seqs.windows(2).all(|w| w[0] < w[1]) {
            // Not seen in practice (numbers only grow within the segments one recovery reads);
            // this copy is the slow way, kept for a log that says otherwise.
            let mut order: Vec<usize> = (0..self.seqs.len()).collect();
            order.sort_by_key(|&i| self.seqs[i]);
            let mut keep: Vec<usize> = Vec::with_capacity(order.len());
            for i in order {
                match keep.last_mut() {
                    Some(last) if self.seqs[*last] == self.seqs[i] => *last = i,
                    _ => keep.push(i),
                }
            }
            self.pieces = self.repiece(keep.iter().copied());
            self.seqs = keep.iter().map(|&i| self.seqs[i]).collect();
        }
        let done: HashSet<Uuid> = std::mem::take(&mut self.done).into_iter().collect();
        let mut taken = vec![false; self.seqs.len()];
        let mut seen: HashSet<Uuid> = HashSet::new();
        let (mut uncertain, mut confirmed) = (Vec::new(), 0);
        // A batch may be marked twice (recovered, then marked again before its INSERT): once
        // is enough, and its rows are taken by the first.
        for (id, ranges) in std::mem::take(&mut self.marked) {
            if !seen.insert(id) {
                continue;
            }
            let is_done = done.contains(&id);
            let mut rows = Vec::new();
            for seq in ranges.iter().flat_map(|r| r.clone()) {
                if let Ok(i) = self.seqs.binary_search(&seq)
                    && !std::mem::replace(&mut taken[i], true)
                {
                    if is_done {
                        confirmed += 1;
                    } else {
                        rows.push(self.row(i).clone());
                    }
                }
            }
            if !rows.is_empty() {
                uncertain.push((id, rows));
            }
        }
        drop(self.seqs);
        let mut at = 0;
        for piece in &mut self.pieces {
            piece.retain(|_| {
                at += 1;
                !taken[at - 1]
            });
        }
        self.pieces.retain(|p| !p.is_empty());
        Settled { uncertain, fresh: self.pieces, confirmed }
    }
}

/// What [`Owed::settle`] sorts the log's events into.
struct Settled {
    /// Batches whose INSERT may have landed, with their rows.
    uncertain: Vec<(Uuid, Vec<EventRow>)>,
    /// Rows of no batch, in log order, in pieces.
    fresh: Vec<Vec<EventRow>>,
    /// Rows of confirmed batches (dropped).
    confirmed: usize,
}

/// Reads the log, rewrites what is still owed into one new segment that supersedes the old ones,
/// deletes those, and gives the events back to the buffer.
fn recover(config: WalConfig, buffer: Arc<Buffer>, metrics: Arc<Metrics>) -> io::Result<(Writer, Recovery)> {
    let dir = config.dir.clone();
    fs::create_dir_all(&dir)?;
    // The new directory's own entry, so that a power cut right after the first start does not
    // take the directory (and what is then written into it) away.
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    let lock = lock_dir(&dir)?;
    let mut report = Recovery::default();
    let leftovers = remove_confirmed(&dir)?;
    if leftovers > 0 {
        tracing::info!(files = leftovers, "deleted confirmed log segments left by the last run");
    }
    let found = segments(&dir)?;
    // Read one segment at a time, its rows moved into one vector in log order: a full buffer's
    // log (1.29 million events at BUFFER_MAX_BYTES=128MiB) took 549 MiB at its peak when every
    // segment was parsed first and the events went into a BTreeMap, over the 512 Mi limit of
    // the StatefulSet, so a pod killed with a full buffer could not start again. Room for every
    // row the files can hold, reserved once (only address space until rows fill it).
    let total_bytes: u64 = found.iter().filter_map(|(_, p)| fs::metadata(p).ok()).map(|m| m.len()).sum();
    let mut owed = Owed::with_capacity(usize::try_from(total_bytes).unwrap_or(0) / ROW_BYTES);
    // Where each segment's data begins in `owed`, to drop it when a later segment supersedes it.
    let mut starts: Vec<(u64, Mark)> = Vec::new();
    // The newest recovery segment replaces everything numbered up to what it names.
    let mut superseded = 0;
    for (no, path) in &found {
        let bytes = fs::read(path)?;
        // Whether this segment's first record is read yet, and whether its records are kept.
        let (mut first, mut keep) = (true, false);
        let bad = parse_each(&bytes, |record| {
            if std::mem::take(&mut first) {
                if let Record::Supersedes { segment } = record {
                    superseded = superseded.max(segment);
                    // Segments are read in ascending order: those read before and now
                    // superseded go.
                    let gone = starts.iter().take_while(|(n, _)| *n <= superseded).count();
                    if gone > 0 {
                        let until = starts.get(gone).map_or_else(|| owed.mark(), |(_, m)| *m);
                        owed.drop_front(until);
                        starts.drain(..gone);
                        for (_, m) in &mut starts {
                            *m = m.after(until);
                        }
                    }
                }
                keep = *no > superseded;
                if keep {
                    starts.push((*no, owed.mark()));
                }
            }
            if keep {
                match record {
                    Record::Events { first_seq, rows } => owed.push(first_seq, rows),
                    Record::Batch { id, seqs } => owed.marked.push((id, seqs)),
                    Record::Done { id } => owed.done.push(id),
                    Record::Supersedes { .. } | Record::Probe => {}
                }
            }
        });
        // A segment with no record to read still counts as one read.
        if first && *no > superseded {
            starts.push((*no, owed.mark()));
        }
        for (start, end, why) in bad {
            let span = &bytes[start..end];
            report.corrupt_bytes += span.len() as u64;
            metrics.wal_corrupt_bytes.inc_by(span.len() as u64);
            let aside = move_aside(&dir, *no, start, span)?;
            tracing::error!(segment = %path.display(), at_byte = start, moved_bytes = span.len(),
                moved_to = %aside.display(), reason = %why,
                "the local log has a torn or corrupt stretch; moved it aside and read on after it");
        }
    }
    report.segments = starts.len();
    let Settled { uncertain, fresh, confirmed } = owed.settle();
    report.confirmed_events = confirmed;
    report.uncertain_batches = uncertain.len();
    report.uncertain_events = uncertain.iter().map(|(_, rows)| rows.len()).sum();
    report.fresh_events = fresh.iter().map(Vec::len).sum();

    // The new segment, complete and synced under a temporary name before it replaces anything.
    // Written as it is encoded: a copy of it in memory was a third of a full buffer's size.
    let no = found.last().map_or(1, |(n, _)| n + 1);
    let path = segment_path(&dir, no);
    let tmp = path.with_extension("tmp");
    let mut out = SegmentWriter::create(&tmp)?;
    out.put(|o| {
        record(o, |o| {
            o.push(SUPERSEDES);
            o.extend_from_slice(&(no - 1).to_le_bytes());
        })
    });
    let mut next_seq = 0u64;
    let mut batches = Vec::new();
    for (id, mut rows) in uncertain {
        let seqs = next_seq..next_seq + rows.len() as u64;
        for chunk in rows.chunks(ROWS_PER_RECORD) {
            out.put(|o| events_record(o, next_seq, chunk));
            next_seq += chunk.len() as u64;
        }
        out.put(|o| batch_record(o, id, std::slice::from_ref(&seqs)));
        for r in &mut rows {
            r.batch_id = id;
        }
        batches.push(Batch { id, rows, seqs: vec![seqs], uncertain: true });
    }
    let fresh_first = next_seq;
    for piece in &fresh {
        for chunk in piece.chunks(ROWS_PER_RECORD) {
            out.put(|o| events_record(o, next_seq, chunk));
            next_seq += chunk.len() as u64;
        }
    }
    let len = match out.finish() {
        Ok(len) => len,
        Err(e) => {
            // A full disk: the old segments stay as they are (read again at the next start); a
            // partial copy left behind would only take more room.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, &path)?;
    sync_dir(&dir)?;
    for (old, old_path) in &found {
        if *old < no {
            fs::remove_file(old_path)?;
        }
    }
    sync_dir(&dir)?;

    let recovered = (report.fresh_events + report.uncertain_events) as u64;
    metrics.wal_recovered("fresh", report.fresh_events as u64);
    metrics.wal_recovered("uncertain", report.uncertain_events as u64);
    metrics.wal_recovered("confirmed", report.confirmed_events as u64);
    metrics.events_recovered.inc_by(recovered);
    for batch in batches {
        buffer.restore_batch(batch);
    }
    // Piece by piece: each is freed once the buffer holds its copy, so that the two copies
    // of every row are never in memory at once.
    let mut first = fresh_first;
    for piece in fresh {
        let count = piece.len() as u64;
        if count > 0 {
            buffer.restore_rows(first, piece);
        }
        first += count;
    }
    let file = Arc::new(OpenOptions::new().read(true).write(true).open(&path)?);
    metrics.wal_bytes.set(len as i64);
    metrics.wal_segments.set(1);
    let writer = Writer {
        _lock: lock,
        dir,
        config,
        file,
        no,
        len,
        sealed: VecDeque::new(),
        next_seq,
        dirty: false,
        synced_len: len,
        pending: Vec::new(),
        sync_failed: false,
        last_sync: Instant::now(),
        writes: 0,
        buffer,
        metrics,
        health: Arc::new(Health::default()),
        out: Vec::with_capacity(1 << 20),
        collect_after: None,
        rotate_after: None,
        checked_links: Instant::now(),
        relink: false,
    };
    Ok((writer, report))
}

// ------------------------------------------------------------------------------- the writer

/// A request waiting for the log.
type Ack = oneshot::Sender<Result<(), WalError>>;

/// Answers a request whose events were logged with their sequence numbers.
type Logged = oneshot::Sender<Result<Range<u64>, WalError>>;

/// A group written to the log, waiting for its sync (if it needs one) before it is answered.
struct Written {
    start_len: u64,
    /// The segment's length after the group: its sync covers everything before.
    end_len: u64,
    start_seq: u64,
    appended: Vec<(u64, Reservation, Vec<EventRow>, Logged)>,
    marked: Vec<Ack>,
    sync: Option<(Instant, tokio::task::JoinHandle<io::Result<()>>)>,
    /// Its sync first wrote the bytes of a failed sync again (`Writer::sync_failed`): when it
    /// succeeds, those are durable too.
    rewrote: bool,
}

impl Written {
    /// The group is not in the log: its requests get the error (and 503), its room is given back.
    fn fail(self, err: &WalError) {
        for (_, room, _, ack) in self.appended {
            drop(room);
            let _ = ack.send(Err(err.clone()));
        }
        for ack in self.marked {
            let _ = ack.send(Err(err.clone()));
        }
    }
}

/// Answers a group's requests with an error (503) without writing it: the log's files are gone
/// and not written again yet. Its room is given back; a batch's *done* is lost, which only
/// costs a check in ClickHouse after a crash.
fn refuse(jobs: Vec<Job>, stop: &mut Option<oneshot::Sender<()>>) {
    let err = WalError("its files were deleted and cannot be written again yet".into());
    for job in jobs {
        match job {
            Job::Events { room, ack, .. } => {
                drop(room);
                let _ = ack.send(Err(err.clone()));
            }
            Job::Batch { ack, .. } => {
                let _ = ack.send(Err(err.clone()));
            }
            Job::Done { .. } => {}
            Job::Stop { ack } => *stop = Some(ack),
        }
    }
}

/// Whether the writer's files are in the log's directory (as far as its last check knows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linked {
    Yes,
    /// Deleted, and not written again yet.
    No,
}

/// A closed segment, waiting for the watermark to pass its last event.
struct Sealed {
    no: u64,
    /// One past the last sequence number it holds.
    end_seq: u64,
    bytes: u64,
    /// Kept open until it is deleted, so that it can be written again if someone else deletes it
    /// first ([`Writer::keep_linked`]). As many as `BUFFER_MAX_BYTES` of unconfirmed events
    /// span, plus one.
    file: Arc<File>,
}

/// An interval sync running in the background: when it began, `Writer::writes` and the
/// segment's length then (what it covers), and its task.
type Background = (Instant, (u64, u64), tokio::task::JoinHandle<io::Result<()>>);

/// The writer task's state.
struct Writer {
    /// The directory's lock ([`lock_dir`]), held while the writer lives.
    _lock: File,
    dir: PathBuf,
    config: WalConfig,
    /// The active segment; shared with the blocking pool while it is synced.
    file: Arc<File>,
    no: u64,
    len: u64,
    sealed: VecDeque<Sealed>,
    next_seq: u64,
    /// Written since the last fsync.
    dirty: bool,
    /// The active segment is known durable up to here: a sync that began after these bytes
    /// were written succeeded.
    synced_len: u64,
    /// A copy of the bytes after `synced_len` (groups answered before their sync, in
    /// `WAL_FSYNC=<interval>` mode). When a sync fails, Linux may have dropped those pages from
    /// the page cache and reports the error once: they are written again from here and synced,
    /// or events already acknowledged would be missing from the file after a crash.
    pending: Vec<u8>,
    /// A sync failed and its bytes could not be written again yet: the log stays `failing`
    /// (however many later writes succeed) until they are, and every group, in any fsync mode,
    /// is synced with them before it is answered.
    sync_failed: bool,
    last_sync: Instant,
    /// Groups written so far: an interval sync running in the background clears `dirty` only
    /// if nothing was written after it began.
    writes: u64,
    buffer: Arc<Buffer>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    out: Vec<u8>,
    /// A confirmed segment could not be renamed: no new try before then.
    collect_after: Option<Instant>,
    /// A new segment could not be begun: no new try before then.
    rotate_after: Option<Instant>,
    /// When the files were last checked to still be in the directory ([`LINK_CHECK`]).
    checked_links: Instant,
    /// The files were found deleted and are not written again yet: groups are refused (503).
    relink: bool,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        // Groups written and waiting for their sync, oldest first (at most MAX_IN_FLIGHT);
        // groups are answered strictly in log order.
        let mut in_flight: VecDeque<Written> = VecDeque::new();
        let mut stop: Option<oneshot::Sender<()>> = None;
        let mut closed = false;
        // The interval sync of `WAL_FSYNC=<interval>` runs in the background while groups keep
        // being written and answered (when this task waited for it, every request arriving
        // during an fdatasync waited too: with the no-op sink, p99 at half of saturation 1.6 to
        // 2.9 ms, now 1.35 to 1.64; 0.6 to 1.0 without the log). When it began, and `writes` then.
        let mut background: Option<Background> = None;
        // The timer of `due`, and the instant it is set to.
        let timer = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        loop {
            if closed && in_flight.is_empty() {
                // The interval sync under way first: never two syncs of one file at once.
                if let Some((_, _, sync)) = background.take()
                    && let Err(e) = sync.await.map_err(io::Error::other).and_then(|r| r)
                {
                    self.failed(&e);
                    self.resync(&e).await;
                }
                self.finish().await;
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                return;
            }
            // A full segment is rotated once nothing is in flight in it; until then no new group.
            let rotating = self.len >= self.config.segment_bytes && !in_flight.is_empty();
            // Nor while the bytes not yet known durable fill their copy: a sync that stalls holds
            // new groups back (their requests wait, and the buffer's bound refuses more) instead
            // of growing the copy without end.
            let accepting =
                !closed && in_flight.len() < MAX_IN_FLIGHT && !rotating && self.pending.len() < MAX_PENDING;
            let due = if in_flight.is_empty() && background.is_none() { Some(self.due()) } else { None };
            if let Some(at) = due
                && armed != Some(at)
            {
                timer.as_mut().reset(tokio::time::Instant::from_std(at));
                armed = Some(at);
            }
            let oldest_sync = in_flight.front_mut().and_then(|g| g.sync.as_mut());
            let syncing = oldest_sync.is_some();
            tokio::select! {
                biased;
                synced = async { (&mut oldest_sync.expect("guarded").1).await }, if syncing => {
                    let group = in_flight.pop_front().expect("guarded");
                    let started = group.sync.as_ref().map_or_else(Instant::now, |s| s.0);
                    match synced.map_err(io::Error::other).and_then(|r| r) {
                        Ok(()) => {
                            self.metrics.wal_fsync_duration.observe(started.elapsed().as_secs_f64());
                            self.synced(group.end_len);
                            self.sync_failed &= !group.rewrote;
                            self.complete(group);
                        }
                        Err(e) => {
                            // Everything written since is after it in the file: cut it all.
                            self.cut(group.start_len, group.start_seq);
                            self.failed(&e);
                            let err = WalError(e.to_string());
                            group.fail(&err);
                            for later in in_flight.drain(..) {
                                later.fail(&err);
                            }
                            // What earlier groups, answered already, wrote before it.
                            self.resync(&e).await;
                        }
                    }
                }
                synced = async { (&mut background.as_mut().expect("guarded").2).await }, if background.is_some() => {
                    let (started, (writes, covered), _) = background.take().expect("guarded");
                    match synced.map_err(io::Error::other).and_then(|r| r) {
                        Ok(()) => {
                            self.metrics.wal_fsync_duration.observe(started.elapsed().as_secs_f64());
                            self.dirty &= self.writes != writes;
                            self.last_sync = started;
                            self.synced(covered);
                        }
                        // The written groups were answered already: their bytes are written
                        // again and synced.
                        Err(e) => {
                            self.failed(&e);
                            self.resync(&e).await;
                        }
                    }
                }
                _ = &mut timer, if due.is_some() => {
                    if self.health.failing.load(Ordering::Acquire) {
                        self.probe().await;
                    } else if self.keep_linked().await == Linked::Yes && self.interval_sync_due() {
                        let file = self.file.clone();
                        let sync = tokio::task::spawn_blocking(move || file.sync_data());
                        background = Some((Instant::now(), (self.writes, self.len), sync));
                    }
                }
                job = rx.recv(), if accepting => match job {
                    None => closed = true,
                    Some(job) => {
                        // The first request of a group wakes this task at once (tokio runs a
                        // task woken by another next); one yield lets the requests that are
                        // ready at this moment join the group first. When idle it returns at once.
                        tokio::task::yield_now().await;
                        let mut jobs = vec![job];
                        while jobs.len() < MAX_GROUP {
                            match rx.try_recv() {
                                Ok(job) => jobs.push(job),
                                Err(_) => break,
                            }
                        }
                        // Before the write, so that no group is answered from a file without a
                        // name after an idle spell.
                        if self.keep_linked().await == Linked::No {
                            refuse(jobs, &mut stop);
                        } else if let Some(written) = self.write_group(jobs, &mut stop, &mut background) {
                            in_flight.push_back(written);
                        }
                        closed |= stop.is_some();
                    }
                },
            }
            // Groups that need no sync are answered as soon as those before them are.
            while in_flight.front().is_some_and(|g| g.sync.is_none()) {
                let group = in_flight.pop_front().expect("checked");
                self.complete(group);
            }
            self.collect();
            // Not while an interval sync runs: never two syncs of one file at once.
            if in_flight.is_empty() && background.is_none() {
                self.rotate_if_full().await;
            }
        }
    }

    /// When a probe, an interval sync or the check of the files is due, if no work comes first.
    /// (Checked while idle too: the events of the last requests before an idle spell sit in
    /// the files until ClickHouse confirms them.) An instant rather than a span, so that the
    /// timer stays armed from one turn of the loop to the next: armed anew on every turn, it
    /// woke the runtime's driver through its eventfd on every group, about 2,400 writes and as
    /// many extra `epoll_wait`s a second at saturation (perf trace).
    fn due(&self) -> Instant {
        if self.health.failing.load(Ordering::Acquire) {
            return Instant::now() + PROBE_INTERVAL;
        }
        let check = self.checked_links + LINK_CHECK;
        match self.config.fsync {
            FsyncPolicy::Interval(every) if self.dirty => (self.last_sync + every).min(check),
            _ => check,
        }
    }

    /// An interval sync is owed (`WAL_FSYNC=<interval>`, written since the last one, and the
    /// interval is over).
    fn interval_sync_due(&self) -> bool {
        matches!(self.config.fsync, FsyncPolicy::Interval(every)
            if self.dirty && self.last_sync.elapsed() >= every)
    }

    /// Nothing in flight and the probe of a failing disk is due: writes and syncs a probe record.
    async fn probe(&mut self) {
        if self.relink {
            // The probe record would go into a file without a name.
            self.keep_linked().await;
            return;
        }
        if self.sync_failed && !self.rewrite().await {
            return;
        }
        self.out.clear();
        record(&mut self.out, |o| o.push(PROBE));
        let at = self.len;
        let probed = match self.file.write_all_at(&self.out, at) {
            Ok(()) => self.sync().await,
            Err(e) => Err(e),
        };
        match probed {
            Ok(()) => {
                self.len += self.out.len() as u64;
                self.synced_len = self.len;
                self.metrics.wal_bytes.add(self.out.len() as i64);
                self.recovered();
            }
            Err(e) => {
                self.cut(at, self.next_seq);
                self.failed(&e);
            }
        }
    }

    /// Encodes and writes one group of jobs (into the page cache: as quick as a log line, so on
    /// the task itself) and starts its sync if it needs one. A stop request goes into `stop`.
    fn write_group(
        &mut self,
        jobs: Vec<Job>,
        stop: &mut Option<oneshot::Sender<()>>,
        background: &mut Option<Background>,
    ) -> Option<Written> {
        let start_seq = self.next_seq;
        // After a failed sync nothing is answered before a sync, in `WAL_FSYNC=<interval>` mode
        // too: its earlier groups' bytes may be gone from the page cache, and answering 2xx for
        // writes that cannot be synced would acknowledge events a power cut loses. The group's
        // sync writes those bytes again first; while the disk keeps failing, requests get 503.
        let rewrote = self.sync_failed;
        let mut must_sync = self.config.fsync == FsyncPolicy::EveryGroup || rewrote;
        let mut appended = Vec::new();
        let mut marked = Vec::new();
        self.out.clear();
        for job in jobs {
            match job {
                Job::Events { room, rows, ack } => {
                    if rows.is_empty() {
                        let _ = ack.send(Ok(0..0));
                        continue;
                    }
                    let first = self.next_seq;
                    events_record(&mut self.out, first, &rows);
                    self.next_seq += rows.len() as u64;
                    appended.push((first, room, rows, ack));
                }
                Job::Batch { id, seqs, ack } => {
                    batch_record(&mut self.out, id, &seqs);
                    must_sync = true;
                    marked.push(ack);
                }
                Job::Done { id } => record(&mut self.out, |o| {
                    o.push(DONE);
                    o.extend_from_slice(id.as_bytes());
                }),
                Job::Stop { ack } => *stop = Some(ack),
            }
        }
        if self.out.is_empty() {
            return None;
        }
        let start_len = self.len;
        let end_len = start_len + self.out.len() as u64;
        let group = Written { start_len, end_len, start_seq, appended, marked, sync: None, rewrote };
        if let Err(e) = self.file.write_all_at(&self.out, start_len) {
            self.cut(start_len, start_seq);
            self.failed(&e);
            group.fail(&WalError(e.to_string()));
            return None;
        }
        self.len += self.out.len() as u64;
        self.pending.extend_from_slice(&self.out);
        self.metrics.wal_bytes.add(self.out.len() as i64);
        self.dirty = true;
        self.writes += 1;
        // `pending` starts at `synced_len` and now ends with this group.
        let again = rewrote.then(|| (self.pending.clone(), self.synced_len));
        let sync = must_sync.then(|| {
            let file = self.file.clone();
            // Never two syncs of the file at once: the kernel reports a writeback error to one
            // of them only, and the other would say the group is durable when it may not be.
            // After an interval sync under way, and failing with it.
            let before = background.take().map(|(_, _, sync)| sync);
            let task = tokio::spawn(async move {
                if let Some(before) = before {
                    before.await.map_err(io::Error::other)??;
                }
                tokio::task::spawn_blocking(move || {
                    if let Some((bytes, at)) = again {
                        file.write_all_at(&bytes, at)?;
                    }
                    file.sync_data()
                })
                .await
                .map_err(io::Error::other)?
            });
            (Instant::now(), task)
        });
        Some(Written { sync, ..group })
    }

    /// A group is durable (or needs no sync): its rows go to the buffer in log order and its
    /// requests are answered.
    fn complete(&mut self, group: Written) {
        if !self.sync_failed {
            self.recovered();
        }
        self.metrics.wal_appends.inc_by(group.appended.len() as u64);
        for (first, room, rows, ack) in group.appended {
            // Refused only during shutdown; the rows are in the log, so they are acknowledged all
            // the same and sent at the next start.
            let seqs = first..first + rows.len() as u64;
            let _ = self.buffer.fill(room, Some(first), rows);
            let _ = ack.send(Ok(seqs));
        }
        for ack in group.marked {
            let _ = ack.send(Ok(()));
        }
    }

    /// Cuts the active segment back to `len` after a failed write or sync (so that later records
    /// follow valid ones) and numbers events from `seq` again.
    fn cut(&mut self, len: u64, seq: u64) {
        if let Err(e) = self.file.set_len(len) {
            // Zeros over it instead: recovery reads on after a bad stretch, so a whole record of
            // the failed write left behind a shorter later one would come back (an event its
            // client was told 503 for).
            let zeros = vec![0u8; self.len.saturating_sub(len) as usize];
            let zeroed = self.file.write_all_at(&zeros, len);
            tracing::error!(error = %e, segment = self.no, zeroed = zeroed.is_ok(),
                "cannot cut a failed write off the local log; wrote zeros over it");
        }
        self.metrics.wal_bytes.sub(self.len.saturating_sub(len) as i64);
        self.len = len;
        self.next_seq = seq;
        self.synced_len = self.synced_len.min(len);
        self.pending.truncate((len - self.synced_len) as usize);
    }

    /// A sync that began with the segment `covered` bytes long succeeded: those are durable.
    fn synced(&mut self, covered: u64) {
        let n = covered.saturating_sub(self.synced_len).min(self.pending.len() as u64);
        self.pending.drain(..n as usize);
        self.synced_len += n;
    }

    /// After a failed sync (`e`): writes the bytes not known durable again, at their place, and
    /// syncs. Until that works the log stays failing, and the probe tries again.
    async fn resync(&mut self, e: &io::Error) {
        self.sync_failed = true;
        if self.rewrite().await {
            tracing::warn!(error = %e, "a sync of the local log failed; its bytes were written again and synced");
        }
    }

    /// Writes `pending` again at `synced_len` and syncs; true when that worked (the log is then
    /// no longer failing for it).
    async fn rewrite(&mut self) -> bool {
        let (file, bytes, at) = (self.file.clone(), self.pending.clone(), self.synced_len);
        let done = tokio::task::spawn_blocking(move || {
            file.write_all_at(&bytes, at)?;
            file.sync_data()
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        match done {
            Ok(()) => {
                self.synced_len += self.pending.len() as u64;
                self.pending.clear();
                self.sync_failed = false;
                self.recovered();
                true
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    /// fdatasync on the blocking pool, with nothing in flight (rotation, interval, shutdown).
    async fn sync(&mut self) -> io::Result<()> {
        let started = Instant::now();
        let file = self.file.clone();
        let covered = self.len;
        tokio::task::spawn_blocking(move || file.sync_data()).await.map_err(io::Error::other)??;
        self.metrics.wal_fsync_duration.observe(started.elapsed().as_secs_f64());
        self.dirty = false;
        self.last_sync = Instant::now();
        self.synced(covered);
        Ok(())
    }

    fn failed(&self, e: &io::Error) {
        self.metrics.wal_write_errors.inc();
        *self.health.error.lock() = e.to_string();
        if !self.health.failing.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %e, dir = %self.dir.display(),
                "cannot write the local log: tracking requests get 503 until it works again");
        }
    }

    fn recovered(&self) {
        if self.relink {
            // Writes into the old files succeed, but those files are gone.
            return;
        }
        if self.health.failing.swap(false, Ordering::AcqRel) {
            tracing::info!(dir = %self.dir.display(), "the local log can be written again");
        }
    }

    /// Deletes the oldest closed segments whose every event is confirmed.
    fn collect(&mut self) {
        if self.collect_after.is_some_and(|at| Instant::now() < at) {
            return;
        }
        self.collect_after = None;
        let below = self.buffer.confirmed_below();
        while let Some(oldest) = self.sealed.front()
            && oldest.end_seq <= below
        {
            // Renamed here, deleted on the blocking pool: deleting a synced 64 MiB segment
            // takes the kernel about 11 ms (freeing its cached pages and blocks), and every
            // request waiting for the log would wait through it. A renamed segment is no longer
            // a segment: recovery never reads it, and deletes what a crash left of it.
            let path = segment_path(&self.dir, oldest.no);
            let gone = path.with_extension(CONFIRMED);
            match fs::rename(&path, &gone) {
                Ok(()) => {
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = fs::remove_file(&gone) {
                            tracing::warn!(error = %e, file = %gone.display(), "cannot delete a confirmed log segment");
                        }
                    });
                }
                // Deleted by someone else: gone, as it was to be. Its events are in ClickHouse.
                Err(e) if e.kind() == io::ErrorKind::NotFound => tracing::warn!(
                    segment = %path.display(),
                    "a confirmed log segment was gone already: files under DATA_DIR were deleted while the service ran"
                ),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        segment = %path.display(),
                        retry_in_secs = FILE_RETRY.as_secs(),
                        "cannot delete a confirmed log segment"
                    );
                    self.collect_after = Some(Instant::now() + FILE_RETRY);
                    break;
                }
            }
            self.metrics.wal_bytes.sub(oldest.bytes as i64);
            self.metrics.wal_segments.dec();
            self.sealed.pop_front();
        }
    }

    /// Begins a new segment once the active one is full.
    async fn rotate_if_full(&mut self) {
        if self.len < self.config.segment_bytes
            || self.health.failing.load(Ordering::Acquire)
            || self.rotate_after.is_some_and(|at| Instant::now() < at)
        {
            return;
        }
        if self.dirty
            && let Err(e) = self.sync().await
        {
            self.failed(&e);
            self.resync(&e).await;
            return;
        }
        let (dir, next) = (self.dir.clone(), self.no + 1);
        let opened = tokio::task::spawn_blocking(move || {
            let path = segment_path(&dir, next);
            let mut f = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
            f.write_all(MAGIC)?;
            f.sync_all()?;
            sync_dir(&dir)?;
            Ok(f)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        match opened {
            Ok(file) => {
                self.rotate_after = None;
                let full = std::mem::replace(&mut self.file, Arc::new(file));
                self.sealed.push_back(Sealed {
                    no: self.no,
                    end_seq: self.next_seq,
                    bytes: self.len,
                    file: full,
                });
                self.no += 1;
                self.len = MAGIC.len() as u64;
                self.synced_len = self.len;
                self.pending.clear();
                self.metrics.wal_bytes.add(self.len as i64);
                self.metrics.wal_segments.inc();
            }
            Err(e) => {
                // Keep writing to the full one, and try again later.
                let _ = fs::remove_file(segment_path(&self.dir, self.no + 1));
                tracing::warn!(
                    error = %e,
                    retry_in_secs = FILE_RETRY.as_secs(),
                    "cannot begin a new log segment; the current one grows"
                );
                self.rotate_after = Some(Instant::now() + FILE_RETRY);
            }
        }
    }

    /// Checks (once per [`LINK_CHECK`]) that the log's files are still in its directory, and
    /// writes them again from the open files when they are not. Until that works the log is
    /// failing, groups are refused, and it is tried again once per [`PROBE_INTERVAL`].
    async fn keep_linked(&mut self) -> Linked {
        if !self.relink {
            if self.checked_links.elapsed() < LINK_CHECK {
                return Linked::Yes;
            }
            self.checked_links = Instant::now();
            if !self.notice_deleted() {
                return Linked::Yes;
            }
        } else if self.checked_links.elapsed() < PROBE_INTERVAL {
            return Linked::No;
        }
        self.checked_links = Instant::now();
        self.relink_now().await
    }

    /// Whether a file of the log lost its name since the last check; sets `relink` and says so.
    fn notice_deleted(&mut self) -> bool {
        let unlinked = |f: &File| f.metadata().is_ok_and(|m| std::os::unix::fs::MetadataExt::nlink(&m) == 0);
        // The lock too: a cleaner of old files deletes it first (it is never written), and a
        // second process could then take the directory.
        if !unlinked(&self.file) && !unlinked(&self._lock) && !self.sealed.iter().any(|s| unlinked(&s.file)) {
            return false;
        }
        tracing::error!(dir = %self.dir.display(),
            "the local log's files were deleted while the service ran (by hand, or by a cleaner of DATA_DIR); writing them again from the files still open");
        self.relink = true;
        true
    }

    /// Writes the deleted files again ([`Writer::restore`]); on failure the log is failing.
    async fn relink_now(&mut self) -> Linked {
        match self.restore().await {
            Ok(segments) => {
                self.relink = false;
                self.metrics.wal_restores.inc();
                tracing::warn!(dir = %self.dir.display(), segments,
                    "wrote the local log's deleted files again; every acknowledged event in them is on disk again");
                // Still failing if a failed sync's bytes are owed to a file that kept its name.
                if !self.sync_failed {
                    self.recovered();
                }
                Linked::Yes
            }
            Err(e) => {
                let why = format!("its deleted files cannot be written again ({e})");
                self.failed(&io::Error::new(e.kind(), why));
                Linked::No
            }
        }
    }

    /// Writes the directory, the lock and every segment without a name again, each under its
    /// own number, from the open files; the active segment's bytes not yet known durable are
    /// written over its copy from `pending`. All of it synced. Returns how many segments were
    /// written.
    async fn restore(&mut self) -> io::Result<usize> {
        let dir = self.dir.clone();
        let relock = self._lock.metadata().map_or(true, |m| std::os::unix::fs::MetadataExt::nlink(&m) == 0);
        let mut files: Vec<(u64, u64, Arc<File>)> =
            self.sealed.iter().map(|s| (s.no, s.bytes, s.file.clone())).collect();
        files.push((self.no, self.len, self.file.clone()));
        // The bytes not yet known durable, from memory: the page cache may have lost them to a
        // writeback error that no sync has reported yet.
        let (pending, synced_len, active) = (self.pending.clone(), self.synced_len as usize, self.no);
        let (lock, copied) = tokio::task::spawn_blocking(move || {
            let mut lock = None;
            let copied = (|| -> io::Result<Vec<(u64, File)>> {
                fs::create_dir_all(&dir)?;
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    sync_dir(parent)?;
                }
                // Another process may have taken the directory since: then this one must not
                // write into it (see `lock_dir`), and stays failing.
                if relock {
                    lock = Some(lock_dir(&dir)?);
                }
                let mut copies = Vec::new();
                for (no, len, file) in files {
                    if std::os::unix::fs::MetadataExt::nlink(&file.metadata()?) > 0 {
                        continue;
                    }
                    let mut bytes = vec![0; len as usize];
                    file.read_exact_at(&mut bytes, 0)?;
                    if no == active
                        && let Some(stretch) = bytes.get_mut(synced_len..synced_len + pending.len())
                    {
                        stretch.copy_from_slice(&pending);
                    }
                    let path = segment_path(&dir, no);
                    let tmp = path.with_extension("tmp");
                    let mut copy =
                        OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
                    copy.write_all(&bytes)?;
                    copy.sync_all()?;
                    fs::rename(&tmp, &path)?;
                    copies.push((no, copy));
                }
                sync_dir(&dir)?;
                Ok(copies)
            })();
            // Kept even when a copy failed: the directory stays this process's meanwhile.
            (lock, copied)
        })
        .await
        .map_err(io::Error::other)?;
        if let Some(lock) = lock {
            self._lock = lock;
        }
        let copies = copied?;
        let restored = copies.len();
        for (no, copy) in copies {
            let copy = Arc::new(copy);
            if no == self.no {
                self.file = copy;
                self.synced_len = self.len;
                self.pending.clear();
                self.dirty = false;
                self.sync_failed = false;
            } else if let Some(sealed) = self.sealed.iter_mut().find(|s| s.no == no) {
                sealed.file = copy;
            }
        }
        Ok(restored)
    }

    /// At shutdown: sync, and delete the whole log when every event in it is confirmed.
    async fn finish(&mut self) {
        // Deleted since the last check (`rm -rf DATA_DIR`, then a restart): what is owed is
        // written again first, or the next start would not find it.
        let owed = self.next_seq.saturating_sub(self.buffer.confirmed_below());
        if owed > 0 && (self.relink || self.notice_deleted()) {
            self.relink_now().await;
        }
        if self.sync_failed {
            // A plain sync could succeed with a failed one's pages gone from the page cache: the
            // bytes owed are written again first.
            self.rewrite().await;
        } else if self.dirty
            && let Err(e) = self.sync().await
        {
            self.failed(&e);
            self.resync(&e).await;
        }
        self.collect();
        let owed = self.next_seq.saturating_sub(self.buffer.confirmed_below());
        if owed == 0 && self.sealed.is_empty() {
            match fs::remove_file(segment_path(&self.dir, self.no)) {
                Ok(()) => {
                    self.metrics.wal_bytes.set(0);
                    self.metrics.wal_segments.set(0);
                }
                // Deleted by someone else: gone, as it was to be.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.metrics.wal_bytes.set(0);
                    self.metrics.wal_segments.set(0);
                }
                Err(e) => tracing::warn!(error = %e, "cannot delete the confirmed local log"),
            }
        } else if self.relink {
            tracing::error!(events = owed, dir = %self.dir.display(),
                "the local log's files were deleted and cannot be written again: events not yet confirmed by ClickHouse are lost");
        } else {
            tracing::warn!(events = owed, dir = %self.dir.display(),
                "events not yet confirmed by ClickHouse stay in the local log; they are sent at the next start");
        }
    }
}

#[cfg(test)]
// A batch of one range of sequence numbers is the common case, not a mistaken range of ranges.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::ingest::buffer::Limits;

    fn row(n: u8) -> EventRow {
        EventRow {
            event_id: Uuid::from_bytes([n; 16]),
            ad_id: Uuid::from_bytes([7; 16]),
            kind: EventKind::Midpoint,
            event_time: OffsetDateTime::from_unix_timestamp(1_700_000_000 + i64::from(n)).unwrap(),
            received_at: OffsetDateTime::from_unix_timestamp(1_700_000_100).unwrap(),
            ip_hash: 0xdead_beef_0000_0000 | u64::from(n),
            playback_time: n.is_multiple_of(2).then_some(f32::from(n) + 0.25),
            error_code: u16::from(n) * 3,
            batch_id: Uuid::nil(),
            traffic: if n.is_multiple_of(3) { Traffic::Bot } else { Traffic::Valid },
        }
    }

    /// What recovery made of the log's records before [`Owed`]: a map by sequence number (a
    /// later row for a number replacing an earlier one), then each marked batch's rows taken
    /// out of it, the first mark of a batch only.
    fn settle_as_before(
        events: &[(u64, Vec<EventRow>)],
        marked: &[(Uuid, Vec<Range<u64>>)],
        done: &[Uuid],
    ) -> Settled {
        let mut map = std::collections::BTreeMap::new();
        for (first, rows) in events {
            map.extend((*first..).zip(rows.iter().cloned()));
        }
        let done: HashSet<&Uuid> = done.iter().collect();
        let (mut seen, mut uncertain, mut confirmed) = (HashSet::new(), Vec::new(), 0);
        for (id, seqs) in marked {
            if !seen.insert(*id) {
                continue;
            }
            let rows: Vec<EventRow> =
                seqs.iter().flat_map(|r| r.clone()).filter_map(|seq| map.remove(&seq)).collect();
            if done.contains(id) {
                confirmed += rows.len();
            } else if !rows.is_empty() {
                uncertain.push((*id, rows));
            }
        }
        Settled { uncertain, fresh: vec![map.into_values().collect()], confirmed }
    }

    #[test]
    fn the_log_settles_as_the_map_settled_it() {
        // xorshift, so that a failure comes back on every run.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut below = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let ids: Vec<Uuid> = (0..6u8).map(|n| Uuid::from_bytes([n + 100; 16])).collect();
        let (mut reordered, mut marked_some) = (0, 0);
        for round in 0..3_000 {
            let mut owed = Owed::with_capacity(0);
            let (mut events, mut marked, mut done) = (Vec::new(), Vec::new(), Vec::new());
            let mut next = 0u64;
            for _ in 0..below(8) {
                // Mostly the next numbers, as the log writes them; now and then numbers read
                // before (as a log would hold only if it were damaged), to check the slow way.
                let first = if round % 5 == 0 && below(3) == 0 { below(next + 1) } else { next };
                let rows: Vec<EventRow> = (0..below(6)).map(|_| row(below(250) as u8)).collect();
                next = next.max(first + rows.len() as u64);
                match below(3) {
                    0 if next > 0 => {
                        let from = below(next);
                        let seqs = vec![from..from + below(next - from + 2)];
                        let id = ids[below(ids.len() as u64) as usize];
                        marked.push((id, seqs.clone()));
                        owed.marked.push((id, seqs));
                    }
                    1 => {
                        let id = ids[below(ids.len() as u64) as usize];
                        done.push(id);
                        owed.done.push(id);
                    }
                    _ => {}
                }
                owed.push(first, rows.clone());
                events.push((first, rows));
            }
            reordered += usize::from(!owed.seqs.windows(2).all(|w| w[0] < w[1]));
            let before = settle_as_before(&events, &marked, &done);
            marked_some += usize::from(!before.uncertain.is_empty() || before.confirmed > 0);
            let settled = owed.settle();
            assert_eq!(settled.uncertain, before.uncertain, "round {round}");
            assert_eq!(settled.fresh.concat(), before.fresh.concat(), "round {round}");
            assert_eq!(settled.confirmed, before.confirmed, "round {round}");
        }
        assert!(reordered > 100 && marked_some > 500, "{reordered} reordered, {marked_some} with marks");
    }

    #[test]
    fn a_superseded_front_is_dropped() {
        let mut owed = Owed::with_capacity(4);
        owed.push(0, vec![row(1), row(2)]);
        owed.done.push(Uuid::from_bytes([1; 16]));
        let second = owed.mark();
        owed.push(0, vec![row(3)]);
        owed.marked.push((Uuid::from_bytes([2; 16]), vec![0..1]));
        let later = Mark { rows: 1, marked: 1, done: 0 };
        assert_eq!(format!("{:?}", owed.mark().after(second)), format!("{later:?}"));
        owed.drop_front(second);
        let settled = owed.settle();
        assert_eq!(settled.uncertain, vec![(Uuid::from_bytes([2; 16]), vec![row(3)])]);
        assert!(settled.fresh.concat().is_empty());
        assert_eq!(settled.confirmed, 0);
    }

    fn buffer() -> Arc<Buffer> {
        Arc::new(Buffer::new(
            Limits {
                max_bytes: 1 << 20,
                batch_rows: 1000,
                batch_bytes: 1 << 20,
                max_age: Duration::from_secs(1),
            },
            Arc::new(Metrics::new()),
        ))
    }

    fn config(dir: &Path) -> WalConfig {
        WalConfig { dir: dir.join("wal"), segment_bytes: 1 << 20, fsync: FsyncPolicy::EveryGroup }
    }

    #[test]
    fn rows_and_records_round_trip() {
        let rows: Vec<EventRow> = (0..5).map(row).collect();
        let mut out = MAGIC.to_vec();
        events_record(&mut out, 42, &rows);
        batch_record(&mut out, Uuid::from_bytes([9; 16]), &[1..3, 5..8]);
        let Parsed { records, bad } = parse(&out);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(records[0], Record::Events { first_seq: 42, rows });
        assert_eq!(records[1], Record::Batch { id: Uuid::from_bytes([9; 16]), seqs: vec![1..3, 5..8] });
        assert_eq!(MAGIC.len() + HEADER + 1 + 8 + 4 + 5 * ROW_BYTES, {
            let mut one = MAGIC.to_vec();
            events_record(&mut one, 0, &(0..5).map(row).collect::<Vec<_>>());
            one.len()
        });
    }

    #[test]
    fn a_torn_or_flipped_record_is_set_aside_and_reading_goes_on() {
        let mut out = MAGIC.to_vec();
        events_record(&mut out, 0, &[row(1)]);
        let first_end = out.len();
        events_record(&mut out, 1, &[row(2)]);
        let second_end = out.len();
        // Torn: the second record cut short.
        let Parsed { records, bad } = parse(&out[..out.len() - 3]);
        assert_eq!(records.len(), 1);
        assert_eq!((bad[0].0, bad[0].1), (first_end, second_end - 3));
        assert!(bad[0].2.contains("torn"));
        // Flipped: one bit of the second record's body, with a third record after it: the
        // third is still read.
        let mut flipped = out.clone();
        batch_record(&mut flipped, Uuid::from_bytes([9; 16]), &[0..2]);
        flipped[first_end + HEADER + 20] ^= 0x10;
        let Parsed { records, bad } = parse(&flipped);
        assert_eq!(records.len(), 2);
        assert!(matches!(records[1], Record::Batch { .. }));
        assert_eq!(bad.len(), 1);
        assert_eq!((bad[0].0, bad[0].1), (first_end, second_end));
        assert!(bad[0].2.contains("checksum"));
        // Zeros in the middle (pages a failed writeback lost), then a good record.
        let mut holes = out[..first_end].to_vec();
        holes.extend_from_slice(&[0; 4096]);
        events_record(&mut holes, 9, &[row(9)]);
        let Parsed { records, bad } = parse(&holes);
        assert_eq!(records.len(), 2);
        assert_eq!(records[1], Record::Events { first_seq: 9, rows: vec![row(9)] });
        assert_eq!((bad[0].0, bad[0].1), (first_end, first_end + 4096));
        // Garbage length.
        let mut garbage = out[..first_end].to_vec();
        garbage.extend_from_slice(&[0xff; 12]);
        let Parsed { records, bad } = parse(&garbage);
        assert_eq!(records.len(), 1);
        assert_eq!((bad[0].0, bad[0].1), (first_end, first_end + 12));
    }

    /// Writes a segment as a crashed process would have left it.
    fn write_segment(dir: &Path, no: u64, body: impl FnOnce(&mut Vec<u8>)) {
        let mut out = MAGIC.to_vec();
        body(&mut out);
        fs::create_dir_all(dir.join("wal")).unwrap();
        fs::write(segment_path(&dir.join("wal"), no), out).unwrap();
    }

    #[tokio::test]
    async fn recovery_drops_done_batches_keeps_uncertain_tokens_and_supersedes_the_old_log() {
        let tmp = tempfile::tempdir().unwrap();
        let (done_id, open_id) = (Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16]));
        write_segment(tmp.path(), 3, |o| {
            events_record(o, 0, &(0..4).map(row).collect::<Vec<_>>());
            batch_record(o, done_id, &[0..2]);
            batch_record(o, open_id, &[2..3]);
        });
        write_segment(tmp.path(), 4, |o| {
            events_record(o, 4, &[row(4), row(5)]);
            record(o, |o| {
                o.push(DONE);
                o.extend_from_slice(done_id.as_bytes());
            });
            // A torn tail: half of a record.
            let mut torn = Vec::new();
            events_record(&mut torn, 6, &[row(6)]);
            o.extend_from_slice(&torn[..torn.len() / 2]);
        });
        let b = buffer();
        let (wal, report) = Wal::open(config(tmp.path()), b.clone(), Arc::new(Metrics::new())).await.unwrap();
        assert_eq!(report.segments, 2);
        assert_eq!(report.confirmed_events, 2);
        assert_eq!((report.uncertain_batches, report.uncertain_events), (1, 1));
        assert_eq!(report.fresh_events, 3, "rows 3, 4 and 5");
        assert!(report.corrupt_bytes > 0);
        assert_eq!(fs::read_dir(tmp.path().join("wal/corrupt")).unwrap().count(), 1);
        let left: Vec<u64> = segments(&tmp.path().join("wal")).unwrap().into_iter().map(|s| s.0).collect();
        assert_eq!(left, vec![5], "one new segment replaces the old ones");

        let first = b.take(Instant::now(), false).unwrap();
        assert!(first.uncertain);
        assert_eq!(first.id, open_id);
        assert_eq!(first.rows[0].event_id, row(2).event_id);
        assert!(first.rows.iter().all(|r| r.batch_id == open_id));
        let rest = b.take(Instant::now(), true).unwrap();
        let ids: Vec<Uuid> = rest.rows.iter().map(|r| r.event_id).collect();
        assert_eq!(ids, vec![row(3).event_id, row(4).event_id, row(5).event_id]);
        // Closed without confirming anything (and its lock on the directory let go).
        wal.close().await;

        // Recovering again (nothing confirmed meanwhile) finds the same events, none twice.
        let b = buffer();
        let (_wal, again) = Wal::open(config(tmp.path()), b, Arc::new(Metrics::new())).await.unwrap();
        assert_eq!((again.uncertain_events, again.fresh_events, again.corrupt_bytes), (1, 3, 0));
    }

    #[tokio::test]
    async fn an_interrupted_recovery_is_superseded_not_double_counted() {
        let tmp = tempfile::tempdir().unwrap();
        write_segment(tmp.path(), 1, |o| events_record(o, 0, &[row(1), row(2)]));
        // A recovery segment that was renamed into place before the old one was deleted.
        write_segment(tmp.path(), 2, |o| {
            record(o, |o| {
                o.push(SUPERSEDES);
                o.extend_from_slice(&1u64.to_le_bytes());
            });
            events_record(o, 0, &[row(1), row(2)]);
        });
        let (_wal, report) = Wal::open(config(tmp.path()), buffer(), Arc::new(Metrics::new())).await.unwrap();
        assert_eq!((report.segments, report.fresh_events), (1, 2));
    }

    #[tokio::test]
    async fn appends_reach_the_buffer_and_confirmed_segments_are_deleted() {
        let (tmp, b, metrics, wal) = tiny_segments().await;
        for n in 0..3 {
            let room = b.reserve(2).unwrap();
            wal.append(room, vec![row(n), row(n + 10)]).await.unwrap();
        }
        assert!(segments(&tmp.path().join("wal")).unwrap().len() >= 3);
        let batch = store(&wal, &b).await;
        assert_eq!(batch.seqs, vec![0..6]);
        wal.close().await;
        // Everything was confirmed: the log is gone, the renamed files too once the blocking
        // pool has deleted them.
        assert!(segments(&tmp.path().join("wal")).unwrap().is_empty());
        assert_eq!(metrics.wal_bytes.get(), 0);
        let dir = tmp.path().join("wal");
        for _ in 0..200 {
            if renamed_files(&dir) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(renamed_files(&dir), 0);
        assert!(wal.append(b.reserve(1).unwrap(), vec![row(1)]).await.is_err(), "closed");
    }

    #[tokio::test]
    async fn a_batch_marked_but_not_confirmed_comes_back_uncertain() {
        let tmp = tempfile::tempdir().unwrap();
        let b = buffer();
        let (wal, _) = Wal::open(config(tmp.path()), b.clone(), Arc::new(Metrics::new())).await.unwrap();
        wal.append(b.reserve(2).unwrap(), vec![row(1), row(2)]).await.unwrap();
        let batch = b.take(Instant::now(), true).unwrap();
        wal.mark_batch(&batch).await.unwrap();
        wal.append(b.reserve(1).unwrap(), vec![row(3)]).await.unwrap();
        // A second process on the same directory is refused: it would replay this one's events.
        let refused = Wal::open(config(tmp.path()), buffer(), Arc::new(Metrics::new())).await;
        assert_eq!(refused.err().map(|e| e.kind()), Some(io::ErrorKind::ResourceBusy));
        // A crash: no close, nothing confirmed.
        let after = copy_segments(tmp.path(), "wal");
        let b2 = buffer();
        let (_wal2, report) =
            Wal::open(config(after.path()), b2.clone(), Arc::new(Metrics::new())).await.unwrap();
        assert_eq!((report.uncertain_batches, report.uncertain_events, report.fresh_events), (1, 2, 1));
        let first = b2.take(Instant::now(), false).unwrap();
        assert_eq!((first.id, first.uncertain), (batch.id, true));
    }

    #[tokio::test]
    async fn a_confirmed_segment_left_by_a_crash_is_deleted_not_read() {
        let tmp = tempfile::tempdir().unwrap();
        let b = buffer();
        let (wal, _) = Wal::open(config(tmp.path()), b.clone(), Arc::new(Metrics::new())).await.unwrap();
        wal.append(b.reserve(2).unwrap(), vec![row(1), row(2)]).await.unwrap();
        // A crash between the rename of a confirmed segment and its deletion: its events are in
        // ClickHouse, and must not be sent again.
        let after = copy_segments(tmp.path(), CONFIRMED);
        assert!(renamed_files(&after.path().join("wal")) > 0);
        let b2 = buffer();
        let (_wal2, report) =
            Wal::open(config(after.path()), b2.clone(), Arc::new(Metrics::new())).await.unwrap();
        assert_eq!(report.fresh_events, 0);
        assert!(b2.take(Instant::now(), true).is_none());
        assert_eq!(renamed_files(&after.path().join("wal")), 0);
        drop(wal);
    }

    #[tokio::test]
    async fn confirmed_segments_deleted_by_hand_are_counted_gone() {
        let (tmp, b, metrics, wal) = tiny_segments().await;
        for n in 0..3 {
            wal.append(b.reserve(1).unwrap(), vec![row(n)]).await.unwrap();
        }
        // Someone deletes the closed segments while the service runs.
        let dir = tmp.path().join("wal");
        let closed = segments(&dir).unwrap();
        for (_, path) in &closed[..closed.len() - 1] {
            fs::remove_file(path).unwrap();
        }
        store(&wal, &b).await;
        wal.close().await;
        assert!(segments(&dir).unwrap().is_empty());
        assert_eq!(metrics.wal_bytes.get(), 0, "the deleted segments still counted");
    }

    #[tokio::test]
    async fn a_segment_that_cannot_be_deleted_is_tried_again_later_not_at_every_group() {
        let logged = crate::telemetry::captured::Captured::default();
        let _guard = logged.install();
        let (tmp, b, _, wal) = tiny_segments().await;
        wal.append(b.reserve(1).unwrap(), vec![row(1)]).await.unwrap();
        // A directory where the first segment is to be renamed: the rename fails.
        let dir = tmp.path().join("wal");
        let (first, path) = segments(&dir).unwrap()[0].clone();
        fs::create_dir(path.with_extension(CONFIRMED)).unwrap();
        store(&wal, &b).await;
        for n in 0..30 {
            wal.append(b.reserve(1).unwrap(), vec![row(n)]).await.unwrap();
        }
        assert!(segment_path(&dir, first).exists(), "kept until it can be deleted");
        assert_eq!(
            logged.text().matches("cannot delete a confirmed log segment").count(),
            1,
            "{}",
            logged.text()
        );
        drop(wal);
    }

    #[tokio::test]
    async fn a_segment_that_cannot_be_begun_is_tried_again_later_not_at_every_group() {
        let logged = crate::telemetry::captured::Captured::default();
        let _guard = logged.install();
        let (tmp, b, _, wal) = tiny_segments().await;
        // A directory where the next segment is to be created: it cannot be.
        let dir = tmp.path().join("wal");
        let (active, _) = segments(&dir).unwrap()[0];
        fs::create_dir(segment_path(&dir, active + 1)).unwrap();
        for n in 0..30 {
            wal.append(b.reserve(1).unwrap(), vec![row(n)]).await.unwrap();
        }
        let text = logged.text();
        assert_eq!(text.matches("cannot begin a new log segment").count(), 1, "{text}");
        drop(wal);
    }

    #[tokio::test]
    async fn a_log_deleted_under_the_service_is_written_again_from_its_open_files() {
        let (tmp, b, metrics, wal) = tiny_segments().await;
        for n in 0..3 {
            wal.append(b.reserve(1).unwrap(), vec![row(n)]).await.unwrap();
        }
        // `rm -rf DATA_DIR/wal` while the service runs, with nothing confirmed yet.
        let dir = tmp.path().join("wal");
        fs::remove_dir_all(&dir).unwrap();
        // Noticed while idle, too: the three events wait in the files for ClickHouse.
        tokio::time::sleep(LINK_CHECK + Duration::from_millis(300)).await;
        assert_eq!(metrics.wal_restores.get(), 1);
        assert!(dir.join("LOCK").exists());
        wal.append(b.reserve(1).unwrap(), vec![row(3)]).await.unwrap();
        assert_eq!(wal.failure(), None);
        // The lock is taken again: a second process on the directory still refuses to start.
        let second = Wal::open(config(tmp.path()), buffer(), Arc::new(Metrics::new())).await;
        assert_eq!(second.err().map(|e| e.kind()), Some(io::ErrorKind::ResourceBusy));
        // A crash now loses nothing: the directory as it stands gives back all four events.
        let recovery = recovered_after_a_crash(tmp.path()).await;
        assert_eq!(recovery.fresh_events, 4, "{recovery:?}");
        drop(wal);
    }

    #[tokio::test]
    async fn a_deleted_lock_is_taken_again_so_a_second_process_still_cannot_start() {
        let (tmp, b, metrics, wal) = tiny_segments().await;
        wal.append(b.reserve(1).unwrap(), vec![row(0)]).await.unwrap();
        // A cleaner of old files deletes the lock first: it is never written.
        fs::remove_file(tmp.path().join("wal/LOCK")).unwrap();
        tokio::time::sleep(LINK_CHECK + Duration::from_millis(300)).await;
        assert_eq!(metrics.wal_restores.get(), 1);
        let second = Wal::open(config(tmp.path()), buffer(), Arc::new(Metrics::new())).await;
        assert_eq!(second.err().map(|e| e.kind()), Some(io::ErrorKind::ResourceBusy));
        drop(wal);
    }

    #[tokio::test]
    async fn a_log_deleted_just_before_shutdown_is_written_again_for_the_next_start() {
        let (tmp, b, _, wal) = tiny_segments().await;
        for n in 0..2 {
            wal.append(b.reserve(1).unwrap(), vec![row(n)]).await.unwrap();
        }
        // `rm -rf DATA_DIR`, then a restart, within the second between two checks.
        fs::remove_dir_all(tmp.path().join("wal")).unwrap();
        wal.close().await;
        let (_, recovery) = Wal::open(config(tmp.path()), buffer(), Arc::new(Metrics::new())).await.unwrap();
        assert_eq!(recovery.fresh_events, 2, "{recovery:?}");
    }

    #[tokio::test]
    async fn a_deleted_log_that_cannot_be_written_again_refuses_requests_until_it_can() {
        let (tmp, b, metrics, wal) = tiny_segments().await;
        wal.append(b.reserve(1).unwrap(), vec![row(0)]).await.unwrap();
        // Deleted, and a file where the directory is to be made again.
        let dir = tmp.path().join("wal");
        fs::remove_dir_all(&dir).unwrap();
        fs::write(&dir, b"in the way").unwrap();
        tokio::time::sleep(LINK_CHECK + Duration::from_millis(100)).await;
        let held = b.held_bytes();
        assert!(
            wal.append(b.reserve(1).unwrap(), vec![row(1)]).await.is_err(),
            "acknowledged into a deleted file"
        );
        assert!(wal.failure().is_some());
        assert_eq!(b.held_bytes(), held, "the refused event's room was not given back");
        // Out of the way: the probe writes the log again, and requests are taken again.
        fs::remove_file(&dir).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while wal.failure().is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(wal.failure(), None);
        wal.append(b.reserve(1).unwrap(), vec![row(2)]).await.unwrap();
        assert_eq!(metrics.wal_restores.get(), 1);
        let recovery = recovered_after_a_crash(tmp.path()).await;
        assert_eq!(recovery.fresh_events, 2, "{recovery:?}");
        drop(wal);
    }

    /// `WAL_FSYNC=<interval>` promises that a power loss costs at most the interval. With groups
    /// coming back to back, as at saturation, the writer armed a new timer on every turn of its
    /// loop, and a timer whose time had come lost to the next group every time: in the service
    /// the log was synced 3 to 6 times a second at 10 ms.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_interval_sync_keeps_its_time_while_groups_keep_coming() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.fsync = FsyncPolicy::Interval(Duration::from_millis(10));
        let limits = Limits {
            max_bytes: 1 << 30,
            batch_rows: 1 << 20,
            batch_bytes: 1 << 30,
            max_age: Duration::from_secs(60),
        };
        let b = Arc::new(Buffer::new(limits, Arc::new(Metrics::new())));
        let metrics = Arc::new(Metrics::new());
        let (wal, _) = Wal::open(cfg, b.clone(), metrics.clone()).await.unwrap();
        let started = Instant::now();
        let writers: Vec<_> = (0..16u8)
            .map(|w| {
                let (wal, b) = (wal.clone(), b.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while started.elapsed() < Duration::from_millis(500) {
                        wal.append(b.reserve(1).unwrap(), vec![row(w)]).await.unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut appended = 0;
        for writer in writers {
            appended += writer.await.unwrap();
        }
        let elapsed = started.elapsed();
        let (syncs, syncing) =
            (metrics.wal_fsync_duration.get_sample_count(), metrics.wal_fsync_duration.get_sample_sum());
        wal.close().await;
        // One sync begins 10 ms after the last one began, once that one is over: about
        // elapsed / (10 ms + a sync's own time): 55 syncs against 48 here, and 10 against 43
        // with the timer armed anew on every turn.
        let each = 0.010 + syncing / syncs.max(1) as f64;
        let expected = elapsed.as_secs_f64() / each;
        assert!(
            syncs as f64 * 2.0 >= expected,
            "{syncs} syncs in {elapsed:?}, {expected:.0} expected ({appended} appends, {syncing:.3} s syncing)"
        );
    }

    /// A log of tiny segments (every group rotates) in a new data directory, with its buffer and
    /// metrics.
    async fn tiny_segments() -> (tempfile::TempDir, Arc<Buffer>, Arc<Metrics>, Wal) {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.segment_bytes = 64;
        let b = buffer();
        let metrics = Arc::new(Metrics::new());
        let (wal, _) = Wal::open(cfg, b.clone(), metrics.clone()).await.unwrap();
        (tmp, b, metrics, wal)
    }

    /// What a crash now would give back: the segments under `data_dir` as they stand, recovered
    /// in a new data directory.
    async fn recovered_after_a_crash(data_dir: &Path) -> Recovery {
        let after = copy_segments(data_dir, "wal");
        let (wal, recovery) =
            Wal::open(config(after.path()), buffer(), Arc::new(Metrics::new())).await.unwrap();
        wal.close().await;
        recovery
    }

    /// Takes everything the buffer holds as one batch and goes through its INSERT as the flusher
    /// does: marked in the log, released, confirmed.
    async fn store(wal: &Wal, b: &Buffer) -> Batch {
        let batch = b.take(Instant::now(), true).unwrap();
        wal.mark_batch(&batch).await.unwrap();
        b.release(&batch);
        wal.confirmed(batch.id);
        batch
    }

    /// The segments under `data_dir` as a crash leaves them, copied into a new data directory
    /// (the writer task lives on and holds the first), each under its number and `extension`.
    fn copy_segments(data_dir: &Path, extension: &str) -> tempfile::TempDir {
        let after = tempfile::tempdir().unwrap();
        fs::create_dir(after.path().join("wal")).unwrap();
        for (_, path) in segments(&data_dir.join("wal")).unwrap() {
            let name = path.with_extension(extension);
            fs::copy(&path, after.path().join("wal").join(name.file_name().unwrap())).unwrap();
        }
        after
    }

    /// Confirmed segments renamed and not deleted yet, in the log directory `dir`.
    fn renamed_files(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == CONFIRMED))
            .count()
    }
}
