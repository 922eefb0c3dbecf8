//! Batches that ClickHouse cannot take, saved as files under `DATA_DIR/dead-letter/`.
//!
//! Two cases end here: ClickHouse rejected the data itself (retrying cannot help), or shutdown ran
//! out of time while ClickHouse was down. Either way the events were acknowledged, so they are
//! written out rather than dropped. Each file is `JSONEachRow` with the `events` columns, so an
//! operator can load it back as it is:
//! `clickhouse-client -d adbeacon -q 'INSERT INTO events FORMAT JSONEachRow' < FILE`.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use serde::Serialize;
use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};

use super::buffer::Batch;

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

/// The dead-letter directory.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    dir: PathBuf,
}

impl DeadLetters {
    /// Dead letters under `data_dir/dead-letter`.
    pub fn new(data_dir: &Path) -> Self {
        Self { dir: data_dir.join("dead-letter") }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `batch` durably (file and directory fsynced) and returns the file's path.
    pub fn save(&self, batch: &Batch, reason: &str) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let stamp = OffsetDateTime::now_utc().unix_timestamp();
        let path = self.dir.join(format!("{stamp}-{}.jsonl", batch.id));
        let tmp = path.with_extension("tmp");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for r in &batch.rows {
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
}
