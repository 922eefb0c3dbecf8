//! Raw retention: whole months of raw `events` older than `RAW_RETENTION_MONTHS` (and a week of
//! grace, [`RESEND_GRACE`]) are dropped by partition (cheap on every ClickHouse version, unlike a
//! TTL or a DELETE), hourly. The aggregate
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

/// How much longer than `RAW_RETENTION_MONTHS` a month of raw events stays. An event may be
/// accepted as old as the retention allows (`MAX_EVENT_AGE`), and a batch whose INSERT may have
/// landed is re-sent only after a look-up of its stored rows: were its month dropped before the
/// re-send (a retry, the spill, the log after a restart), the look-up would find nothing and the
/// aggregates would count the batch twice. With `RAW_RETENTION_MONTHS=1` there was no time at
/// all between the last accepted event of a month and the drop of that month.
pub const RESEND_GRACE: time::Duration = time::Duration::days(7);

/// `t`'s month as the `toYYYYMM` partition number.
pub fn yyyymm(t: OffsetDateTime) -> u32 {
    t.year().unsigned_abs() * 100 + u32::from(u8::from(t.month()))
}

/// The oldest month that retention keeps at `now`: the month `months` calendar months back. Every
/// month before it ended more than `months` months ago.
pub fn oldest_kept_month(now: OffsetDateTime, months: u32) -> u32 {
    yyyymm(months_before(now, months))
}

/// The oldest month retention keeps at `now`, [`RESEND_GRACE`] included: a month goes once it
/// ended more than `months` months and the grace ago.
pub fn first_month_kept(now: OffsetDateTime, months: u32) -> u32 {
    oldest_kept_month(now - RESEND_GRACE, months)
}

/// Drops every month of raw events older than the oldest kept one; returns the months dropped.
pub async fn drop_expired(ch: &ClickHouse, months: u32, now: OffsetDateTime) -> Result<Vec<u32>, StoreError> {
    let keep_from = first_month_kept(now, months);
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

    #[test]
    fn a_month_stays_for_the_grace_after_its_retention() {
        // RAW_RETENTION_MONTHS=1: an event of 31 January may be accepted until 28 February;
        // January stays until 8 March, so a re-send in March's first week still finds its rows.
        assert_eq!(first_month_kept(datetime!(2026-03-01 00:30 UTC), 1), 202601);
        assert_eq!(first_month_kept(datetime!(2026-03-07 23:59 UTC), 1), 202601);
        assert_eq!(first_month_kept(datetime!(2026-03-08 00:00 UTC), 1), 202602);
        assert_eq!(first_month_kept(datetime!(2026-11-22 02:00 UTC), 13), 202510);
    }
}
