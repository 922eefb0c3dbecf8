//! Sending rows to ClickHouse exactly once, shared by the flusher and the replayer.
//!
//! Every row carries the token of the batch it was formed in (`batch_id`), through retries, the
//! spill and replay. An INSERT that failed may still have been stored, or still be running (the
//! answer was lost, the client gave up waiting, the server was frozen), so a re-send first ends
//! such INSERTs (`KILL QUERY … SYNC` by query id), then asks which of the rows' events are
//! stored under their tokens, and sends only the rest. This works on every ClickHouse version,
//! 18.16 included, and also when a batch spanning two monthly partitions was stored in part.
//!
//! A data error (ClickHouse rejects the rows themselves) is not retried: the rows are split in
//! halves until the bad ones are isolated; the good ones are stored and the bad ones returned,
//! with the error text, for the dead letters.
//!
//! The look-up needs the rows' month of raw events. Once raw retention may have dropped it
//! (`store::retention::first_month_kept`), finding nothing proves nothing: such rows are not sent
//! again (if the earlier INSERT had landed, the aggregates, which keep every month, would count
//! them twice) but returned as bad, for the dead letters, with the reason.

use std::{collections::HashSet, future::Future, pin::Pin, time::Instant};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::Health;
use crate::{
    metrics::Metrics,
    store::{
        ClickHouse, EventRow, LAYOUT_CHANGED, StoreError,
        retention::{MAX_CLOCK_DIFFERENCE, first_month_kept, yyyymm},
    },
};

/// Rejected INSERTs one send may split further (see [`Sender::isolate`]): enough to isolate a
/// few bad rows among a hundred thousand exactly (one costs a split per halving, 17), and a
/// bound on a batch that ClickHouse rejects whole (every row's time out of its range, say):
/// split down to single rows, 100,000 rows cost two INSERTs and a look-up each, minutes with
/// the flusher stalled.
pub const MAX_SPLITS: u32 = 128;

/// Rows ClickHouse rejected, each with the error text (or, for rows that cannot be checked any
/// more, the reason that starts with [`PAST_RETENTION`]).
pub type Bad = Vec<(EventRow, String)>;

/// How the reason of a row past raw retention starts (see [`Sender::missing`]): such rows are
/// kept apart from rows ClickHouse rejected, each kind in dead letters of its own.
pub const PAST_RETENTION: &str = "its month (";

/// Whether a [`Bad`] row's reason is that it is past raw retention, not a ClickHouse error.
pub fn past_retention(reason: &str) -> bool {
    reason.starts_with(PAST_RETENTION)
}

/// How the reason of rows kept together, not split further, starts (see [`MAX_SPLITS`]).
pub const NOT_SPLIT: &str = "not split further";

/// The reason a dead letter of `rows` gives: a rejected INSERT's rows kept together unsplit
/// ([`NOT_SPLIT`]) say so, since good rows may be among them, else the first row's.
pub fn dead_letter_reason<'r>(rows: impl IntoIterator<Item = &'r (EventRow, String)>) -> String {
    let mut first = None;
    for (_, reason) in rows {
        if reason.starts_with(NOT_SPLIT) {
            return reason.clone();
        }
        first.get_or_insert(reason);
    }
    first.cloned().unwrap_or_default()
}

/// Inserts rows with the exactly-once rules above.
pub struct Sender<'a> {
    /// Where rows go.
    pub clickhouse: &'a ClickHouse,
    /// Counters.
    pub metrics: &'a Metrics,
    /// Told when an INSERT succeeds, which ends an outage for the flusher and the replayer
    /// (each of them decides itself when failures amount to one).
    pub health: &'a Health,
    /// False only in the negative-control test: re-sends skip the check.
    pub check: bool,
    /// No INSERT starts at or after this instant: the replayer renews its claim on the spill
    /// entries then. Splitting a rejected INSERT can take many INSERTs; past it, the split
    /// stops with a retryable error, and the replayer renews and checks before it goes on.
    pub renew_by: Option<Instant>,
    /// The replayer's stop: once cancelled, a split stops as at `renew_by` (the entries stay
    /// pending, and whoever replays them next checks what the split stored), so that shutdown
    /// waits for one INSERT at most, not for a split of many.
    pub stop: Option<&'a CancellationToken>,
    /// RAW_RETENTION_MONTHS: rows of months it may have dropped cannot be looked up.
    pub retention_months: u32,
    /// The event ids of INSERTs that ended with an error ClickHouse itself answered (an
    /// exception after the INSERT began, not a lost answer), until a look-up checks them. Those
    /// the look-up finds stored were written to `events` by an INSERT that failed afterwards, in
    /// a materialized view or in a later part: the aggregates may lack them (see
    /// [`Sender::look_up`]). Kept by the caller across its attempts ([`Refused`]).
    pub refused: &'a Refused,
}

/// The event ids of a delivery's INSERTs that ClickHouse refused and no look-up has checked
/// since (see [`Sender::refused`]). Dropped with ids still in it (the delivery ended otherwise:
/// spilled, left in the log, kept as dead letters), it says so: whoever sends those events
/// next does not know that an INSERT of them failed after writing.
pub struct Refused {
    ids: parking_lot::Mutex<HashSet<Uuid>>,
    /// The delivery's batch (or the replayer's entries), for the warning.
    what: String,
}

impl Refused {
    /// An empty set for the delivery of `what`.
    pub fn new(what: impl Into<String>) -> Self {
        Refused { ids: parking_lot::Mutex::new(HashSet::new()), what: what.into() }
    }

    fn note(&self, rows: &[EventRow]) {
        self.ids.lock().extend(rows.iter().map(|r| r.event_id));
    }

    /// Of `rows` (just looked up), how many an INSERT refused since the last look-up and
    /// `stored` holds; the rows are checked now.
    fn checked(&self, rows: &[&EventRow], stored: &HashSet<Uuid>) -> usize {
        let mut ids = self.ids.lock();
        if ids.is_empty() {
            return 0;
        }
        rows.iter().filter(|r| ids.remove(&r.event_id) && stored.contains(&r.event_id)).count()
    }
}

impl Drop for Refused {
    fn drop(&mut self) {
        let unchecked = self.ids.get_mut().len();
        if unchecked > 0 {
            tracing::warn!(delivery = %self.what, rows = unchecked,
                "an INSERT that ClickHouse refused may have stored some of these rows in events before it failed, and they left this delivery unchecked (spilled, kept in the log or as dead letters): if they are found stored later, compare the aggregates of their times with a recount from events (README, Delivery)");
        }
    }
}

/// Whether `error` is an exception ClickHouse answered (its text carries ClickHouse's
/// `Code: N`), rather than a timeout, a lost connection or a refusal of the client's own.
fn answered_by_clickhouse(error: &StoreError) -> bool {
    let (StoreError::Retryable(text) | StoreError::Rejected(text)) = error;
    crate::store::clickhouse::error_code(text).is_some()
}

impl Sender<'_> {
    /// Inserts `rows` under `query_id`; first, when `check` names earlier query ids (an
    /// earlier attempt may have landed), ends those and drops the rows already stored. Returns
    /// the rows ClickHouse rejected as data; Err only for failures worth retrying.
    pub async fn send(
        &self,
        query_id: &str,
        rows: &[EventRow],
        check: Option<&[String]>,
    ) -> Result<Bad, StoreError> {
        let mut bad = Vec::new();
        self.send_into(query_id, rows, check, &mut bad).await.map(|()| bad)
    }

    /// As [`send`](Self::send), adding the rejected rows to `bad` as they are found: when the
    /// send stops for a retry, those found so far stay known, and are not split out again.
    pub async fn send_into(
        &self,
        query_id: &str,
        rows: &[EventRow],
        check: Option<&[String]>,
        bad: &mut Bad,
    ) -> Result<(), StoreError> {
        let mut splits = MAX_SPLITS;
        let result = match check {
            Some(kill) => match self.unsent(kill, rows, bad).await {
                Ok(rest) => self.isolate(query_id, &rest, bad, &mut splits).await,
                Err(e) => Err(e),
            },
            None => self.isolate(query_id, rows, bad, &mut splits).await,
        };
        if result.is_ok() {
            self.health.succeeded();
        }
        result
    }

    /// Ends the INSERTs named by `kill` (they may still run) and returns the rows of `rows`
    /// not stored under their batch tokens: what is left to send. Rows that cannot be looked up
    /// any more go to `bad` (see the module's comment).
    pub async fn unsent(
        &self,
        kill: &[String],
        rows: &[EventRow],
        bad: &mut Bad,
    ) -> Result<Vec<EventRow>, StoreError> {
        if !self.check {
            return Ok(rows.to_vec());
        }
        self.clickhouse.kill_inserts(kill).await.map_err(retryable)?;
        self.missing(rows, bad).await
    }

    /// The rows whose events are not stored under their batch tokens; those of months raw
    /// retention may have dropped go to `bad` instead (once: a row already there is not added
    /// again by a later look-up of the same rows, and nothing is added when the look-up fails).
    pub async fn missing(&self, rows: &[EventRow], bad: &mut Bad) -> Result<Vec<EventRow>, StoreError> {
        // Retention judges by ClickHouse's clock, and drops nothing while this instance's is
        // further off than MAX_CLOCK_DIFFERENCE: a month it may have dropped is one that has
        // expired by this clock that much later.
        let keep_from =
            first_month_kept(OffsetDateTime::now_utc() + MAX_CLOCK_DIFFERENCE, self.retention_months);
        let (rows, expired): (Vec<&EventRow>, Vec<&EventRow>) =
            rows.iter().partition(|r| yyyymm(r.event_time) >= keep_from);
        let missing = self.look_up(&rows).await?;
        if !expired.is_empty() {
            let known: HashSet<Uuid> = bad.iter().map(|(r, _)| r.event_id).collect();
            let new: Vec<&EventRow> = expired.into_iter().filter(|r| !known.contains(&r.event_id)).collect();
            if !new.is_empty() {
                self.metrics.insert_unverifiable.inc_by(new.len() as u64);
                tracing::warn!(
                    rows = new.len(),
                    keep_from,
                    "rows to re-send are older than raw retention keeps: whether they were stored cannot be checked; keeping them as dead letters"
                );
            }
            bad.extend(new.into_iter().map(|r| {
                let reason = format!(
                    "{PAST_RETENTION}{}) is past raw retention (RAW_RETENTION_MONTHS={}): whether an earlier \
                     INSERT stored it cannot be checked any more, so it was not sent again (had it been \
                     stored, the aggregates would count it twice); compare the aggregates with what you \
                     expect before loading it by hand",
                    yyyymm(r.event_time),
                    self.retention_months
                );
                (r.clone(), reason)
            }));
        }
        Ok(missing)
    }

    /// Of `rows` (all in months raw retention keeps), those not stored under their batch tokens.
    async fn look_up(&self, rows: &[&EventRow]) -> Result<Vec<EventRow>, StoreError> {
        let first = rows.iter().map(|r| r.event_time).min();
        let last = rows.iter().map(|r| r.event_time).max();
        let (Some(first), Some(last)) = (first, last) else { return Ok(Vec::new()) };
        let tokens: Vec<Uuid> = rows.iter().map(|r| r.batch_id).collect::<HashSet<_>>().into_iter().collect();
        let stored: HashSet<Uuid> = self
            .clickhouse
            .batch_event_ids(&tokens, first, last)
            .await
            .map_err(retryable)?
            .into_iter()
            .collect();
        let short = self.refused.checked(rows, &stored);
        if stored.is_empty() {
            return Ok(rows.iter().map(|r| (*r).clone()).collect());
        }
        self.metrics.insert_found_stored.inc();
        let missing: Vec<EventRow> =
            rows.iter().filter(|r| !stored.contains(&r.event_id)).map(|r| (*r).clone()).collect();
        let found = rows.len() - missing.len();
        if short > 0 {
            // ClickHouse answered their INSERT with an error, yet `events` holds these rows: it
            // failed after the table's write, and the views that had not run by then never saw
            // them. They are not sent again (events would count them twice); the operator
            // compares and rebuilds the aggregates of these times (README, Delivery).
            self.metrics.insert_views_short.inc_by(short as u64);
            tracing::error!(
                batches = ?tokens,
                rows = short,
                first_event = %first.format(&Rfc3339).unwrap_or_default(),
                last_event = %last.format(&Rfc3339).unwrap_or_default(),
                "an INSERT that ClickHouse refused had stored these rows in events; its materialized views may lack them: compare the aggregates of these times with a recount from events and rebuild them if they differ (README, Delivery)"
            );
        } else {
            tracing::info!(
                batches = tokens.len(),
                rows = rows.len(),
                stored = found,
                "an earlier INSERT had been stored (wholly or in part); sending only the missing rows"
            );
        }
        Ok(missing)
    }

    /// Inserts rows; on a data error splits them until the rejected rows are isolated, adding
    /// them to `bad`, as long as `splits` lasts: past it, a rejected INSERT's rows go to `bad`
    /// together, good ones included (kept as a dead letter, replayed once the cause is fixed).
    /// Borrows the rows: the hot path sends a batch without copying it.
    fn isolate<'s>(
        &'s self,
        query_id: &'s str,
        rows: &'s [EventRow],
        bad: &'s mut Bad,
        splits: &'s mut u32,
    ) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 's>> {
        Box::pin(async move {
            if rows.is_empty() {
                return Ok(());
            }
            if self.renew_by.is_some_and(|t| Instant::now() >= t) {
                return Err(StoreError::Retryable(
                    "the replayer's claim on its entries is due for renewal".into(),
                ));
            }
            if self.stop.is_some_and(CancellationToken::is_cancelled) {
                return Err(StoreError::Retryable("the replayer is stopping".into()));
            }
            let reason = match self.clickhouse.insert_events(query_id, rows).await {
                Ok(()) => return Ok(()),
                Err(e @ StoreError::Retryable(_)) => {
                    self.metrics.insert_failed(true);
                    if answered_by_clickhouse(&e) {
                        self.refused.note(rows);
                    }
                    return Err(e);
                }
                // Refused before it was sent: the table no longer lays out its columns as the
                // rows are written. Every row of any part would be refused alike (and a part
                // sent anyway could be read as shifted bytes): all of them, unsplit.
                Err(StoreError::Rejected(reason)) if reason.starts_with(LAYOUT_CHANGED) => {
                    self.metrics.insert_failed(false);
                    tracing::warn!(rows = rows.len(), error = %reason, "not sending rows the events table would misread");
                    bad.extend(rows.iter().map(|row| (row.clone(), reason.clone())));
                    return Ok(());
                }
                Err(StoreError::Rejected(reason)) => reason,
            };
            self.metrics.insert_failed(false);
            // A rejected INSERT can have stored part of its rows (a view failing after the
            // table's part was written): only what is missing is split and tried again.
            self.refused.note(rows);
            let rest = self.missing(rows, bad).await?;
            match rest.len() {
                0 => Ok(()),
                1 => {
                    let row = rest.into_iter().next().expect("one row");
                    tracing::warn!(batch = %row.batch_id, event = %row.event_id, error = %reason,
                        "ClickHouse rejects this event as data");
                    bad.push((row, reason));
                    Ok(())
                }
                n if *splits == 0 => {
                    tracing::warn!(rows = n, error = %reason,
                        "ClickHouse rejects more rows of this batch than can be isolated one by one; keeping these together as a dead letter");
                    let reason = format!(
                        "{NOT_SPLIT}: kept with the other rows of a rejected INSERT of {n}, its batch's \
                         {MAX_SPLITS} splits into smaller INSERTs used up (as when every row is \
                         rejected); rows ClickHouse takes may be among them: replay the dead letter once \
                         the cause is fixed. ClickHouse said: {reason}"
                    );
                    bad.extend(rest.into_iter().map(|row| (row, reason.clone())));
                    Ok(())
                }
                n => {
                    *splits -= 1;
                    let (left, right) = rest.split_at(n / 2);
                    self.isolate(query_id, left, bad, splits).await?;
                    self.isolate(query_id, right, bad, splits).await
                }
            }
        })
    }
}

/// Failures of the check itself are worth retrying, whatever ClickHouse called them.
fn retryable(e: StoreError) -> StoreError {
    match e {
        StoreError::Rejected(text) => StoreError::Retryable(text),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: u8) -> EventRow {
        EventRow::test_click(n)
    }

    /// A batch split in halves: the left half stored whole, the right one refused by ClickHouse
    /// with nothing written. The next look-up of the whole batch finds the left half stored,
    /// which no refused INSERT wrote: nothing to report. Then the right half is found stored
    /// (its INSERT failed after writing): those rows, once.
    #[test]
    fn only_rows_of_refused_inserts_found_stored_count() {
        let rows: Vec<EventRow> = (0..4).map(row).collect();
        let all: Vec<&EventRow> = rows.iter().collect();
        let refused = Refused::new("a test batch");
        refused.note(&rows[2..]);
        let left: HashSet<Uuid> = rows[..2].iter().map(|r| r.event_id).collect();
        assert_eq!(refused.checked(&all, &left), 0);
        refused.note(&rows[2..]);
        let both: HashSet<Uuid> = rows.iter().map(|r| r.event_id).collect();
        assert_eq!(refused.checked(&all, &both), 2);
        // Checked: a later look-up finds nothing more to report.
        assert_eq!(refused.checked(&all, &both), 0);
        assert!(refused.ids.lock().is_empty());
    }
}
