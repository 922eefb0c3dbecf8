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

/// Drops every month of raw events older than the oldest kept one, stopping between two DROPs
/// once `stop` is cancelled (after RAW_RETENTION_MONTHS was lowered a lot, there are many, and
/// shutdown must not wait for them all); returns the months dropped.
pub async fn drop_expired(
    ch: &ClickHouse,
    months: u32,
    now: OffsetDateTime,
    stop: &CancellationToken,
) -> Result<Vec<u32>, StoreError> {
    let keep_from = first_month_kept(now, months);
    let stored: Vec<u32> = ch.fetch_all(ch.client().query(queries::EVENTS_PARTITIONS)).await?;
    let mut dropped = Vec::new();
    for month in stored.into_iter().filter(|&m| m < keep_from) {
        if stop.is_cancelled() {
            break;
        }
        ch.execute_query(ch.client().query(queries::DROP_EVENTS_PARTITION).bind(month)).await?;
        tracing::info!(month, keep_from, "raw retention: dropped a month of raw events");
        dropped.push(month);
    }
    Ok(dropped)
}

/// How far this instance's clock may be from ClickHouse's before retention waits: a month is
/// dropped for good, so one instance whose clock jumped months ahead must not drop what the
/// others still take events for.
pub const MAX_CLOCK_DIFFERENCE: time::Duration = time::Duration::minutes(10);

/// The time to judge expiry by: ClickHouse's clock, which every instance shares, and only while
/// this instance's agrees with it within [`MAX_CLOCK_DIFFERENCE`] (else an error saying so).
async fn shared_now(ch: &ClickHouse) -> Result<OffsetDateTime, StoreError> {
    let server: Vec<i64> = ch.fetch_all(ch.client().query("SELECT toInt64(toUnixTimestamp(now()))")).await?;
    let server = server
        .first()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(*s).ok())
        .ok_or_else(|| StoreError::Retryable("ClickHouse did not say its time".into()))?;
    agreed_now(OffsetDateTime::now_utc(), server).map_err(StoreError::Rejected)
}

/// ClickHouse's time `server`, when this instance's `local` agrees with it.
fn agreed_now(local: OffsetDateTime, server: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if (local - server).abs() > MAX_CLOCK_DIFFERENCE {
        return Err(format!(
            "this instance's clock ({local}) and ClickHouse's ({server}) differ by more than \
             {MAX_CLOCK_DIFFERENCE}: no month is dropped until they agree (fix the clock)"
        ));
    }
    Ok(server)
}

/// Drops expired months now and then every [`CHECK_EVERY`] until `stop` is cancelled, judging
/// by ClickHouse's clock ([`shared_now`]). A failure (ClickHouse down, clocks apart) is logged and
/// tried again at the next check; nothing is lost by waiting.
pub async fn run(ch: ClickHouse, months: u32, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        let dropped = match shared_now(&ch).await {
            Ok(now) => drop_expired(&ch, months, now, &stop).await,
            Err(e) => Err(e),
        };
        match dropped {
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
    fn expiry_waits_while_the_clocks_disagree() {
        let server = datetime!(2026-11-22 02:00 UTC);
        assert_eq!(agreed_now(server + time::Duration::minutes(9), server), Ok(server));
        assert_eq!(agreed_now(server - time::Duration::minutes(9), server), Ok(server));
        let ahead = agreed_now(server + time::Duration::days(62), server).unwrap_err();
        assert!(ahead.contains("no month is dropped"), "{ahead}");
        assert!(agreed_now(server - time::Duration::minutes(11), server).is_err());
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
