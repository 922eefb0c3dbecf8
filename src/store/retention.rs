//! Raw retention: whole months of raw `events` older than `RAW_RETENTION_MONTHS` are dropped by
//! partition (cheap on every ClickHouse version, unlike a TTL or a DELETE), hourly. The aggregate
//! tables keep every month, so analytics of old windows stay answerable.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{
    clickhouse::{ClickHouse, StoreError},
    queries,
};
use crate::{domain::months_before, metrics::Metrics};

/// How often retention looks for months to drop. Months end at most once a month, so an hour
/// only bounds how late after midnight of the 1st a month goes.
pub const CHECK_EVERY: Duration = Duration::from_secs(3600);

/// `t`'s month as the `toYYYYMM` partition number.
fn yyyymm(t: OffsetDateTime) -> u32 {
    t.year().unsigned_abs() * 100 + u32::from(u8::from(t.month()))
}

/// The oldest month that retention keeps at `now`: the month `months` calendar months back. Every
/// month before it ended more than `months` months ago.
pub fn oldest_kept_month(now: OffsetDateTime, months: u32) -> u32 {
    yyyymm(months_before(now, months))
}

/// Drops every month of raw events older than the oldest kept one; returns the months dropped.
pub async fn drop_expired(ch: &ClickHouse, months: u32, now: OffsetDateTime) -> Result<Vec<u32>, StoreError> {
    let keep_from = oldest_kept_month(now, months);
    let stored: Vec<u32> = ch.fetch_all(ch.client().query(queries::EVENTS_PARTITIONS)).await?;
    let mut dropped = Vec::new();
    for month in stored.into_iter().filter(|&m| m < keep_from) {
        ch.execute_query(ch.client().query(queries::DROP_EVENTS_PARTITION).bind(month)).await?;
        tracing::info!(month, keep_from, "raw retention: dropped a month of raw events");
        dropped.push(month);
    }
    Ok(dropped)
}

/// Drops expired months now and then every [`CHECK_EVERY`] until `stop` is cancelled. A failure
/// (ClickHouse down) is logged and tried again at the next check; nothing is lost by waiting.
pub async fn run(ch: ClickHouse, months: u32, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        match drop_expired(&ch, months, OffsetDateTime::now_utc()).await {
            Ok(dropped) => metrics.retention_months_dropped.inc_by(dropped.len() as u64),
            Err(e) => {
                tracing::warn!(error = %e, "raw retention: could not drop expired months; will try again")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn the_oldest_kept_month_is_the_retention_back() {
        assert_eq!(oldest_kept_month(datetime!(2026-11-22 02:00 UTC), 13), 202510);
        assert_eq!(oldest_kept_month(datetime!(2026-01-31 00:00 UTC), 1), 202512);
        assert_eq!(oldest_kept_month(datetime!(2026-03-31 00:00 UTC), 1), 202602);
    }
}
