//! Dead letters: events ClickHouse will not take, kept for an operator to inspect, replay or
//! purge, never dropped.
//!
//! Three things end here: rows ClickHouse rejects as data (a batch that fails that way is split
//! until the bad rows are isolated, within `insert::MAX_SPLITS`; the good ones are stored), spill
//! entries that cannot be read back, and (in `buffered` and `committed` modes) batches shutdown
//! could neither insert nor spill. They go to the Redis stream `REDIS_KEY_PREFIX + "dead-letters"`
//! (one entry per batch's bad rows, or per damaged entry, with the error text), which the admin
//! endpoints list, replay and purge. When Redis cannot take them they are written as files under
//! `DATA_DIR/dead-letter/`, in
//! `JSONEachRow` with the `events` columns. Part of a file may be in ClickHouse already (an
//! INSERT under way when shutdown's time ran out; a stream write that landed without an answer is
//! in the stream as well), so the README has the operator load it through a staging table that
//! skips the event ids of its batches that ClickHouse holds.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;
use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};
use uuid::Uuid;

use super::spill::{Corrupt, Fields, Moved, Spill, batch_fields, field, fields_bytes, parse_batch, xadd};
use crate::store::{EventRow, RedisError};

const DATETIME: &[FormatItem<'static>] = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");

#[derive(Serialize)]
struct JsonRow<'a> {
    event_id: String,
    ad_id: String,
    kind: &'a str,
    event_time: String,
    received_at: String,
    ip_hash: u64,
    playback_time: Option<f32>,
    error_code: u16,
    batch_id: String,
    traffic: &'a str,
}

fn datetime(t: OffsetDateTime) -> String {
    t.format(DATETIME).unwrap_or_default()
}

/// Where dead letters come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// ClickHouse rejected the rows as data.
    Rejected,
    /// A spill entry could not be read back.
    Corrupt,
    /// Shutdown could neither insert nor spill the batch.
    Shutdown,
}

impl Source {
    /// The `source` field and metric label.
    pub fn name(self) -> &'static str {
        match self {
            Source::Rejected => "rejected",
            Source::Corrupt => "corrupt",
            Source::Shutdown => "shutdown",
        }
    }
}

/// Where a dead letter was kept.
#[derive(Debug)]
pub enum Kept {
    /// The Redis stream, under this entry id.
    Redis(String),
    /// A file (Redis could not take it).
    File(PathBuf),
}

/// The fields of a dead letter holding rows.
pub fn rows_fields(token: Uuid, rows: &[EventRow], reason: &str, source: Source) -> Fields {
    let mut fields = batch_fields(token, rows, 0, true);
    fields.push(field("reason", reason));
    fields.push(field("source", source.name()));
    fields.push(field("at", OffsetDateTime::now_utc().unix_timestamp()));
    fields
}

/// The fields of a dead letter keeping a damaged spill entry as it was (its fields renamed
/// `entry.NAME`).
pub fn corrupt_fields(c: &Corrupt) -> Fields {
    let mut fields = vec![
        field("reason", format!("spill entry {} cannot be read: {}", c.entry, c.why)),
        field("source", Source::Corrupt.name()),
        field("at", OffsetDateTime::now_utc().unix_timestamp()),
    ];
    fields.extend(c.fields.iter().map(|(k, v)| (format!("entry.{k}"), v.clone())));
    fields
}

/// One dead letter as the admin endpoints show it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The stream entry id.
    pub id: String,
    /// Why it is here.
    pub reason: String,
    /// `rejected`, `corrupt` or `shutdown`.
    pub source: String,
    /// When it was kept (unix seconds).
    pub at: i64,
    /// The batch token, when readable.
    pub token: Option<Uuid>,
    /// The rows, when readable (a damaged spill entry has none).
    pub rows: Vec<EventRow>,
}

/// What a replay of dead letters did.
#[derive(Debug, Clone, Default)]
pub struct Replayed {
    /// Dead letters moved back to the spill.
    pub entries: u64,
    /// Events in them.
    pub events: u64,
    /// Bytes of the spill entries written for them ([`super::spill::fields_bytes`]).
    pub bytes: u64,
    /// Ids left in place: damaged entries, which hold no rows to replay.
    pub skipped: Vec<String>,
    /// Ids left in place while the spill holds an entry of their batch (replayed again once it
    /// is stored, what it stored is not stored twice).
    pub waiting: Vec<String>,
}

/// A replay that Redis cut short: what moved before it stopped answering, and why.
#[derive(Debug)]
pub struct Interrupted {
    /// The dead letters moved back before the error (they are in the spill).
    pub done: Replayed,
    /// Redis's error.
    pub error: RedisError,
}

/// The dead letters: the Redis stream, with files as the fallback.
#[derive(Clone)]
pub struct DeadLetters {
    dir: PathBuf,
    spill: Option<Arc<Spill>>,
    /// Whether a count of the files is under way ([`DeadLetters::count_files`]).
    counting: Arc<std::sync::atomic::AtomicBool>,
}

impl DeadLetters {
    /// Dead letters in the stream next to `spill` (when Redis is configured), else or when
    /// Redis fails under `data_dir/dead-letter`.
    pub fn new(data_dir: &Path, spill: Option<Arc<Spill>>) -> Self {
        Self { dir: data_dir.join("dead-letter"), spill, counting: Arc::default() }
    }

    /// The fallback directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Dead-letter files in the fallback directory (complete ones: a file being written is
    /// named `.tmp` until it is synced); 0 when the directory does not exist or cannot be read.
    pub fn files(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return 0 };
        entries.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "jsonl")).count()
    }

    /// [`DeadLetters::files`] off the request threads, within `within`; `None` when it takes
    /// longer (a disk that hangs: the count goes on, and no second one starts while it does).
    pub async fn count_files(&self, within: std::time::Duration) -> Option<usize> {
        use std::sync::atomic::Ordering;
        if self.counting.swap(true, Ordering::AcqRel) {
            return None;
        }
        let this = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let n = this.files();
            this.counting.store(false, Ordering::Release);
            n
        });
        tokio::time::timeout(within, task).await.ok()?.ok()
    }

    /// Keeps `rows` with the reason: in Redis (unless `redis` is false: past the shutdown
    /// budget, where a Redis that drops packets would cost its timeout), or in a file when Redis
    /// fails.
    pub async fn save(
        &self,
        token: Uuid,
        rows: &[EventRow],
        reason: &str,
        source: Source,
        redis: bool,
    ) -> std::io::Result<Kept> {
        // Never into a Redis that may evict it (nor one that is down): a file instead.
        if redis
            && let Some(spill) = &self.spill
            && spill.check().await == super::spill::RedisState::Ok
        {
            let mut pipe = redis::pipe();
            xadd(&mut pipe, &spill.keys.dead_letters, &rows_fields(token, rows, reason, source));
            match spill.redis.pipe::<(String,)>(&pipe).await {
                Ok((id,)) => return Ok(Kept::Redis(id)),
                Err(e) => tracing::warn!(error = %e, "Redis cannot take a dead letter; writing it to a file"),
            }
        }
        self.save_file(token, rows, reason).map(Kept::File)
    }

    /// Writes rows durably (file and directory fsynced) and returns the file's path.
    fn save_file(&self, token: Uuid, rows: &[EventRow], reason: &str) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let stamp = OffsetDateTime::now_utc().unix_timestamp();
        let path = self.dir.join(format!("{stamp}-{token}-{}.jsonl", Uuid::new_v4().simple()));
        let tmp = path.with_extension("tmp");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for r in rows {
            let row = JsonRow {
                event_id: r.event_id.to_string(),
                ad_id: r.ad_id.to_string(),
                kind: r.kind.as_str(),
                event_time: datetime(r.event_time),
                received_at: datetime(r.received_at),
                ip_hash: r.ip_hash,
                playback_time: r.playback_time,
                error_code: r.error_code,
                batch_id: r.batch_id.to_string(),
                traffic: r.traffic.name(),
            };
            serde_json::to_writer(&mut out, &row)?;
            out.write_all(b"\n")?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::write(path.with_extension("reason"), reason)?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }

    fn stream(&self) -> Result<&Arc<Spill>, RedisError> {
        self.spill.as_ref().ok_or_else(|| RedisError("no Redis configured".into()))
    }

    /// Dead letters after `after` (exclusive; None = from the first), oldest first: at most
    /// `limit`, and no more once they hold `max_rows` rows (at least one dead letter); with
    /// whether more follow. A dead letter holds a whole batch's rejected rows (up to
    /// BATCH_MAX_ROWS: a schema change rejects every row), so a page of a hundred could hold
    /// millions of rows; read one at a time, a page holds at most one dead letter beyond the
    /// budget.
    pub async fn list(
        &self,
        after: Option<&str>,
        limit: usize,
        max_rows: usize,
    ) -> Result<(Vec<DeadLetter>, bool), RedisError> {
        let spill = self.stream()?;
        let mut start = after.map_or_else(|| "-".to_string(), |id| format!("({id}"));
        let (mut page, mut rows) = (Vec::new(), 0);
        loop {
            let full = page.len() >= limit || rows >= max_rows;
            let Some((id, fields)) = spill.range(&spill.keys.dead_letters, &start, 1).await?.pop() else {
                return Ok((page, false));
            };
            if full {
                return Ok((page, true));
            }
            start = format!("({id}");
            let dead = read(id, fields);
            rows += dead.rows.len();
            page.push(dead);
        }
    }

    /// Dead letters in the stream.
    pub async fn count(&self) -> Result<u64, RedisError> {
        let spill = self.stream()?;
        spill.redis.query(redis::cmd("XLEN").arg(&spill.keys.dead_letters)).await
    }

    /// Moves dead letters (`ids`, or every one) back to the spill, where the replayers insert
    /// them again (checked first, as any spilled batch). Damaged entries stay, and so do those
    /// whose batch the spill also holds (the service keeps no batch in both places itself; a
    /// stream restored from a backup could). Each one moves in one step
    /// that deletes it first, so that two replays at once move it once.
    /// When Redis fails on the way, the error carries what moved before it.
    pub async fn replay(&self, ids: Option<&[String]>) -> Result<Replayed, Interrupted> {
        let mut done = Replayed::default();
        match self.replay_into(ids, &mut done).await {
            Ok(()) => Ok(done),
            Err(error) => Err(Interrupted { done, error }),
        }
    }

    async fn replay_into(&self, ids: Option<&[String]>, done: &mut Replayed) -> Result<(), RedisError> {
        let spill = self.stream()?;
        let mut after: Option<String> = None;
        // Every dead letter there is now, not those the replay adds meanwhile (rows rejected
        // again), which would otherwise go round as long as this call runs.
        let newest = match ids {
            Some(_) => None,
            None => match spill.newest(&spill.keys.dead_letters).await? {
                Some(id) => Some(id),
                None => return Ok(()),
            },
        };
        loop {
            let page = match ids {
                Some(ids) => {
                    let mut found = Vec::new();
                    for id in ids {
                        found.extend(
                            spill
                                .range(&spill.keys.dead_letters, id, 1)
                                .await?
                                .into_iter()
                                .filter(|(i, _)| i == id),
                        );
                    }
                    found
                }
                // One at a time: a dead letter can hold a whole batch (see `list`).
                None => {
                    let start = after.as_ref().map_or_else(|| "-".to_string(), |id| format!("({id}"));
                    let end = newest.as_deref().unwrap_or("+");
                    spill.range_to(&spill.keys.dead_letters, &start, end, 1).await?
                }
            };
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (id, fields) in page {
                let map: HashMap<String, Vec<u8>> = fields.into_iter().collect();
                let Ok((token, rows, _, _)) = parse_batch(&map) else {
                    done.skipped.push(id);
                    continue;
                };
                let entry = batch_fields(token, &rows, 0, true);
                match spill.move_dead_letter(&id, token, &entry, rows.len()).await? {
                    Moved::Done => {}
                    // Another replay (or a purge) took it since it was read: moved once only.
                    Moved::Gone => continue,
                    Moved::BatchInSpill => {
                        done.waiting.push(id);
                        continue;
                    }
                }
                let bytes = fields_bytes(&entry) as u64;
                done.entries += 1;
                done.events += rows.len() as u64;
                done.bytes += bytes;
            }
            if ids.is_some() {
                break;
            }
        }
        Ok(())
    }

    /// Deletes dead letters (`ids`, or every one there is, in one step); returns how many.
    pub async fn purge(&self, ids: Option<&[String]>) -> Result<u64, RedisError> {
        let spill = self.stream()?;
        match ids {
            Some([]) => Ok(0),
            Some(ids) => spill.redis.query(redis::cmd("XDEL").arg(&spill.keys.dead_letters).arg(ids)).await,
            None => {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("XLEN")
                    .arg(&spill.keys.dead_letters)
                    .cmd("DEL")
                    .arg(&spill.keys.dead_letters)
                    .ignore();
                let (n,): (u64,) = spill.redis.pipe(&pipe).await?;
                Ok(n)
            }
        }
    }
}

/// A dead letter from its fields.
fn read(id: String, fields: Fields) -> DeadLetter {
    let map: HashMap<String, Vec<u8>> = fields.into_iter().collect();
    let text =
        |name: &str| map.get(name).map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
    let (token, rows) = match parse_batch(&map) {
        Ok((token, rows, _, _)) => (Some(token), rows),
        Err(_) => (None, Vec::new()),
    };
    DeadLetter {
        reason: text("reason"),
        source: text("source"),
        at: text("at").parse().unwrap_or(0),
        token,
        rows,
        id,
    }
}
