//! Admin endpoints for the dead letters (`/admin/dead-letters`): list them, move them back to the
//! spill to be inserted again, or delete them. They live in the Redis stream
//! `REDIS_KEY_PREFIX + "dead-letters"` (see [`crate::ingest::dead_letter`]); without Redis an
//! instance keeps them as files, which these endpoints do not manage (409).

use std::sync::Arc;

use poem_openapi::{ApiResponse, Object, OpenApi, param::Query, payload::Json};
use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    ApiTags, State,
    auth::{Credentials, Scope, admin_first},
    body::OptionalJsonBody,
    error::{ApiError, ErrorBody},
};
use crate::{
    ingest::dead_letter::{DeadLetter, Interrupted},
    store::EventRow,
};

/// Dead letters per page when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest page, and the most ids one request may name.
pub const MAX_LIMIT: usize = 1000;

/// One stored row of a dead letter, as it would go into `events` (the client IP's keyed hash is
/// left out: it identifies nothing an operator needs).
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase", example)]
pub struct DeadRow {
    /// The event's id (the client's, or one given on arrival).
    pub event_id: Uuid,
    /// The ad.
    pub ad_id: Uuid,
    /// The event kind as ClickHouse stores it (`impression`, `click`, `first_quartile`…).
    pub kind: String,
    /// When it happened (UTC).
    pub event_time: OffsetDateTime,
    /// When adbeacon accepted it (UTC).
    pub received_at: OffsetDateTime,
    /// Seconds into the video; null when not reported.
    #[oai(nullable)]
    pub playback_time: Option<f32>,
    /// VAST error code (0 for events other than errors).
    pub error_code: u16,
    /// `valid`, or why the event does not count in the net numbers (`duplicate`, `bot`,
    /// `empty_user_agent`).
    pub traffic: String,
}

impl From<&EventRow> for DeadRow {
    fn from(r: &EventRow) -> Self {
        DeadRow {
            event_id: r.event_id,
            ad_id: r.ad_id,
            kind: r.kind.as_str().to_string(),
            event_time: r.event_time,
            received_at: r.received_at,
            playback_time: r.playback_time,
            error_code: r.error_code,
            traffic: r.traffic.name().to_string(),
        }
    }
}

impl poem_openapi::types::Example for DeadRow {
    fn example() -> Self {
        let at = example_time();
        DeadRow {
            event_id: Uuid::from_u128(0x2222_2222_2222_2222_2222_2222_2222_2222),
            ad_id: Uuid::from_u128(0x1111_1111_1111_1111_1111_1111_1111_1111),
            kind: "click".into(),
            event_time: at,
            received_at: at,
            playback_time: Some(12.5),
            error_code: 0,
            traffic: "valid".into(),
        }
    }
}

/// One dead letter: a stream entry holding rows ClickHouse rejected (or a batch shutdown could
/// not store), or a damaged spill entry holding none.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase", example)]
pub struct DeadLetterItem {
    /// The entry's id in the stream (such as `1700000000000-0`): name it to replay or purge it.
    pub id: String,
    /// Why it is here: ClickHouse's error text, or why a spill entry could not be read.
    pub reason: String,
    /// `rejected` (ClickHouse refused the rows as data), `corrupt` (a spill entry that cannot
    /// be read back; it holds no rows) or `shutdown` (shutdown could neither insert nor spill
    /// the batch).
    pub source: String,
    /// When it was kept (UTC).
    pub at: OffsetDateTime,
    /// The token of the batch the rows came in; null for a damaged entry.
    #[oai(nullable)]
    pub batch_id: Option<Uuid>,
    /// Rows it holds (0 for a damaged entry).
    pub events: u64,
    /// The rows.
    pub rows: Vec<DeadRow>,
}

impl From<&DeadLetter> for DeadLetterItem {
    fn from(d: &DeadLetter) -> Self {
        DeadLetterItem {
            id: d.id.clone(),
            reason: d.reason.clone(),
            source: d.source.clone(),
            at: kept_at(d),
            batch_id: d.token,
            events: d.rows.len() as u64,
            rows: d.rows.iter().map(DeadRow::from).collect(),
        }
    }
}

/// When a dead letter was kept: its `at` field, else the time in its stream id (a damaged or
/// hand-written entry may lack the field).
fn kept_at(d: &DeadLetter) -> OffsetDateTime {
    let from_id = || {
        let ms: i64 = d.id.split('-').next()?.parse().ok()?;
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
    };
    let from_field = (d.at > 0).then(|| OffsetDateTime::from_unix_timestamp(d.at).ok()).flatten();
    from_field.or_else(from_id).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl poem_openapi::types::Example for DeadLetterItem {
    fn example() -> Self {
        let row = <DeadRow as poem_openapi::types::Example>::example();
        DeadLetterItem {
            id: "1763733600000-0".into(),
            reason: "bad response: Code: 33, e.displayText() = DB::Exception: Cannot read all data. \
                     Bytes read: 11. Bytes expected: 16.: (at row 1)"
                .into(),
            source: "rejected".into(),
            at: example_time(),
            batch_id: Some(Uuid::from_u128(0x3333_3333_3333_3333_3333_3333_3333_3333)),
            events: 1,
            rows: vec![row],
        }
    }
}

/// 14:00 UTC on 21 November 2025, the examples' time.
fn example_time() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_763_733_600).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A page of dead letters.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase", example)]
pub struct DeadLetterPage {
    /// Entries in the dead-letter stream (all pages).
    pub count: u64,
    /// This page, oldest first.
    pub dead_letters: Vec<DeadLetterItem>,
    /// The `after` of the next page; null on the last page.
    #[oai(nullable)]
    pub next: Option<String>,
}

impl poem_openapi::types::Example for DeadLetterPage {
    fn example() -> Self {
        let item = <DeadLetterItem as poem_openapi::types::Example>::example();
        DeadLetterPage { count: 1, dead_letters: vec![item], next: None }
    }
}

/// Which dead letters to replay or purge.
#[derive(Debug, Object, Deserialize)]
#[oai(example, deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSelection {
    /// Stream ids (such as `1700000000000-0`), at most 1000. An empty list selects none.
    #[oai(nullable, validator(max_items = 1000, pattern = r"^(0|[1-9][0-9]{0,18})-(0|[1-9][0-9]{0,18})$"))]
    #[serde(default)]
    pub ids: Option<Vec<String>>,
    /// `true` selects every dead letter (not together with `ids`). A purge needs `ids` or this:
    /// a purge deletes for good, so an empty `DELETE` deletes nothing. A replay without either
    /// takes every dead letter.
    #[oai(nullable)]
    #[serde(default)]
    pub all: Option<bool>,
}

impl poem_openapi::types::Example for DeadLetterSelection {
    fn example() -> Self {
        DeadLetterSelection { ids: Some(vec!["1763733600000-0".into()]), all: None }
    }
}

/// Which dead letters a request acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selected {
    /// Every one there is.
    All,
    /// These, checked, each once.
    Ids(Vec<String>),
}

impl Selected {
    /// The ids, or `None` for all, as [`crate::ingest::dead_letter::DeadLetters`] takes them.
    fn ids(&self) -> Option<&[String]> {
        match self {
            Selected::All => None,
            Selected::Ids(ids) => Some(ids),
        }
    }
}

/// What a request without a selection means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unnamed {
    /// Every dead letter (a replay: it only moves them back to the spill).
    All,
    /// An error (a purge, which cannot be undone).
    Refused,
}

/// What a replay did.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase", example)]
pub struct ReplayResult {
    /// Dead letters moved back to the spill.
    pub entries: u64,
    /// Events in them.
    pub events: u64,
    /// Ids of selected damaged entries, left in place: they hold no rows to replay (purge them
    /// once looked at).
    pub skipped: Vec<String>,
    /// Ids left in place because the spill also holds their batch (the service keeps no batch
    /// in both places itself; a stream restored from a backup could). The spill stores the
    /// batch; replay these again once it has drained, and only what it did not store is stored.
    pub waiting: Vec<String>,
}

impl poem_openapi::types::Example for ReplayResult {
    fn example() -> Self {
        ReplayResult { entries: 2, events: 3, skipped: vec!["1763733600000-1".into()], waiting: vec![] }
    }
}

/// What a purge did.
#[derive(Debug, Object)]
#[oai(example)]
pub struct PurgeResult {
    /// Dead letters deleted.
    pub purged: u64,
}

impl poem_openapi::types::Example for PurgeResult {
    fn example() -> Self {
        PurgeResult { purged: 3 }
    }
}

/// Answer of `GET /admin/dead-letters`.
#[derive(Debug, ApiResponse)]
pub enum DeadLettersResponse {
    /// A page of dead letters, oldest first.
    #[oai(status = 200)]
    Ok(Json<DeadLetterPage>),
}

/// Answer of `POST /admin/dead-letters/replay`.
#[derive(Debug, ApiResponse)]
pub enum ReplayResponse {
    /// Moved back to the spill; the replayers insert them (checked first by batch token, so an
    /// insert that had in fact succeeded is not counted twice).
    #[oai(status = 200)]
    Ok(Json<ReplayResult>),
}

/// Answer of `DELETE /admin/dead-letters`.
#[derive(Debug, ApiResponse)]
pub enum PurgeResponse {
    /// Deleted.
    #[oai(status = 200)]
    Ok(Json<PurgeResult>),
}

/// Whether `text` is a stream id as Redis writes them: `<milliseconds>-<sequence>`, decimal,
/// without leading zeros (an id written another way would not match its entry). The schema's
/// pattern allows 19 digits a part, every one of them a u64; this also takes the 20-digit ones up
/// to u64::MAX, which no real id reaches (milliseconds since 1970 have 13 digits).
fn is_stream_id(text: &str) -> bool {
    let Some((ms, seq)) = text.split_once('-') else { return false };
    let canonical = |part: &str| part.parse::<u64>().is_ok_and(|n| n.to_string() == part);
    canonical(ms) && canonical(seq)
}

/// The `limit` query parameter: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
fn parse_limit(text: Option<&str>) -> Result<usize, ApiError> {
    let Some(text) = text else { return Ok(DEFAULT_LIMIT) };
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "limit must be a whole number from 1 to {MAX_LIMIT}; got {text:?}"
        ))),
    }
}

/// The `after` query parameter: a stream id, or none for the first page.
fn parse_after(text: Option<&str>) -> Result<Option<&str>, ApiError> {
    match text {
        None => Ok(None),
        Some(id) if is_stream_id(id) => Ok(Some(id)),
        Some(id) => Err(ApiError::bad_request(format!(
            "after must be a dead letter's id such as 1700000000000-0 (the next of the previous \
             page); got {id:?}"
        ))),
    }
}

/// What a body selects: every dead letter (`"all": true`, or for a replay nothing named) or the
/// ids, each checked (422 naming the first wrong one) and repeats dropped, so that no entry is
/// replayed twice. 422 for `ids` with `"all": true`, and for a purge that names nothing.
fn selection(body: Option<DeadLetterSelection>, unnamed: Unnamed) -> Result<Selected, ApiError> {
    let (ids, all) = body.map_or((None, None), |b| (b.ids, b.all));
    let ids = match (ids, all) {
        (Some(_), Some(true)) => {
            return Err(ApiError::unprocessable(
                "ids and \"all\": true select twice; send one of them".to_string(),
            ));
        }
        (None, Some(true)) => return Ok(Selected::All),
        (None, None) if unnamed == Unnamed::All => return Ok(Selected::All),
        (None, _) => {
            return Err(ApiError::unprocessable(
                "name the dead letters in ids, or send {\"all\": true} for every one".to_string(),
            ));
        }
        (Some(ids), _) => ids,
    };
    if ids.len() > MAX_LIMIT {
        return Err(ApiError::unprocessable(format!(
            "ids names {} dead letters; at most {MAX_LIMIT} per request (send {{\"all\": true}} for all)",
            ids.len()
        )));
    }
    let mut unique: Vec<String> = Vec::with_capacity(ids.len());
    for (i, id) in ids.into_iter().enumerate() {
        if !is_stream_id(&id) {
            return Err(ApiError::unprocessable(format!(
                "ids[{i}] must be a dead letter's id such as 1700000000000-0; got {id:?}"
            )));
        }
        if !unique.contains(&id) {
            unique.push(id);
        }
    }
    Ok(Selected::Ids(unique))
}

/// Rows a page of dead letters holds before it ends (see
/// [`crate::ingest::dead_letter::DeadLetters::list`]).
pub const PAGE_ROWS: usize = 10_000;

/// Dead-letter operations.
pub struct AdminApi {
    /// Shared service state.
    pub state: Arc<State>,
}

#[OpenApi(tag = "ApiTags::Admin")]
impl AdminApi {
    /// List dead letters.
    ///
    /// Oldest first, `limit` per page (1 to 1000, default 100) with every row they hold; pass a
    /// page's `next` as `after` for the next page. A page ends early once it holds 10,000 rows (a
    /// dead letter holds up to a whole batch's rows, BATCH_MAX_ROWS; every page has at least one,
    /// so a page holds at most 9,999 rows and one dead letter's). Needs the admin scope when API
    /// keys are configured. 409 when REDIS_URL is none (dead letters are then files under
    /// DATA_DIR/dead-letter/); 503 when Redis does not answer.
    #[oai(
        path = "/admin/dead-letters",
        method = "get",
        operation_id = "listDeadLetters",
        transform = "admin_first"
    )]
    async fn list(
        &self,
        auth: Credentials,
        /// The id after which the page starts (exclusive): the previous page's `next`.
        #[oai(validator(pattern = r"^(0|[1-9][0-9]{0,18})-(0|[1-9][0-9]{0,18})$"))]
        after: Query<Option<String>>,
        /// Dead letters per page, 1 to 1000 (default 100).
        #[oai(validator(pattern = r"^([1-9][0-9]{0,2}|1000)$"))]
        limit: Query<Option<String>>,
    ) -> Result<DeadLettersResponse, ApiError> {
        self.state.api_keys.require(&auth, Scope::Admin)?;
        let limit = parse_limit(limit.0.as_deref())?;
        let after = parse_after(after.0.as_deref())?;
        self.redis()?;
        let dead = &self.state.dead_letters;
        let ((page, more), count) = tokio::try_join!(dead.list(after, limit, PAGE_ROWS), dead.count())
            .map_err(|e| ApiError::redis(&e, self.state.retry_after))?;
        let next = if more { page.last().map(|d| d.id.clone()) } else { None };
        self.state.metrics.dead_letters.set(count as i64);
        Ok(DeadLettersResponse::Ok(Json(DeadLetterPage {
            count,
            dead_letters: page.iter().map(DeadLetterItem::from).collect(),
            next,
        })))
    }

    /// Replay dead letters.
    ///
    /// Moves the selected dead letters (`{"ids": [...]}`; `{"all": true}`, or no body, for all) back to
    /// the Redis spill, from which the replayers insert them into ClickHouse; rows ClickHouse
    /// still rejects come back as new dead letters. Damaged entries hold no rows: they stay and
    /// are listed in `skipped`; those whose batch the spill still holds stay until it is stored,
    /// listed in `waiting`. Ids that name no dead letter are ignored. Needs the admin scope
    /// when API keys are configured. 422 naming a malformed id; 409 when REDIS_URL is none; 503
    /// when Redis does not answer (saying how many moved, when it failed part way: those are in
    /// the spill, and a retry moves the rest; the one being moved when it failed may have moved
    /// too).
    #[oai(
        path = "/admin/dead-letters/replay",
        method = "post",
        operation_id = "replayDeadLetters",
        transform = "admin_first"
    )]
    async fn replay(
        &self,
        auth: Credentials,
        body: OptionalJsonBody<DeadLetterSelection>,
    ) -> Result<ReplayResponse, ApiError> {
        self.state.api_keys.require(&auth, Scope::Admin)?;
        let selected = selection(body.0, Unnamed::All)?;
        self.redis()?;
        let done = match self.state.dead_letters.replay(selected.ids()).await {
            Ok(done) => done,
            Err(Interrupted { done, error }) if done.entries == 0 => {
                return Err(ApiError::redis_change(&error, self.state.retry_after));
            }
            // Some moved before Redis failed: they are in the spill, counted, and the answer
            // says so (retrying moves the rest; the moved ones are no dead letters any more).
            Err(Interrupted { done, error }) => {
                self.state.metrics.dead_letters_replayed.inc_by(done.entries);
                self.state.metrics.spill_bytes_pushed.inc_by(done.bytes);
                tracing::warn!(entries = done.entries, events = done.events, error = %error,
                    "Redis failed part way through a replay of dead letters");
                return Err(ApiError::Unavailable(
                    Json(ErrorBody {
                        error: format!(
                            "Redis stopped answering after {} dead letters ({} events) were moved back \
                             to the spill, where they will be replayed (the one it was moving when it \
                             stopped may have moved too); retry to move the rest",
                            done.entries, done.events
                        ),
                    }),
                    self.state.retry_after,
                ));
            }
        };
        self.state.metrics.dead_letters_replayed.inc_by(done.entries);
        self.state.metrics.spill_bytes_pushed.inc_by(done.bytes);
        self.refresh_gauge().await;
        tracing::info!(
            entries = done.entries,
            events = done.events,
            skipped = done.skipped.len(),
            waiting = done.waiting.len(),
            "dead letters moved back to the spill"
        );
        Ok(ReplayResponse::Ok(Json(ReplayResult {
            entries: done.entries,
            events: done.events,
            skipped: done.skipped,
            waiting: done.waiting,
        })))
    }

    /// Purge dead letters.
    ///
    /// Deletes the selected dead letters (`{"ids": [...]}`, or `{"all": true}` for every one
    /// there is) for good. A request that names none (no body, no `ids`) is refused: a purge
    /// cannot be undone. Ids that name no dead letter are ignored. Needs the admin scope when API
    /// keys are configured. 422 naming a malformed id, or when nothing is named; 409 when
    /// REDIS_URL is none; 503 when Redis does not answer (it may have purged them all the same:
    /// a command whose answer was lost is carried out; list them to see, a retry is safe).
    #[oai(
        path = "/admin/dead-letters",
        method = "delete",
        operation_id = "purgeDeadLetters",
        transform = "admin_first"
    )]
    async fn purge(
        &self,
        auth: Credentials,
        body: OptionalJsonBody<DeadLetterSelection>,
    ) -> Result<PurgeResponse, ApiError> {
        self.state.api_keys.require(&auth, Scope::Admin)?;
        let selected = selection(body.0, Unnamed::Refused)?;
        self.redis()?;
        let purged = self
            .state
            .dead_letters
            .purge(selected.ids())
            .await
            .map_err(|e| ApiError::redis_change(&e, self.state.retry_after))?;
        self.state.metrics.dead_letters_purged.inc_by(purged);
        self.refresh_gauge().await;
        tracing::info!(purged, "dead letters purged");
        Ok(PurgeResponse::Ok(Json(PurgeResult { purged })))
    }
}

impl AdminApi {
    /// Ok when dead letters are kept in Redis; 409 when REDIS_URL is none.
    fn redis(&self) -> Result<(), ApiError> {
        if self.state.spill.is_none() { Err(ApiError::no_redis()) } else { Ok(()) }
    }

    /// Sets the dead-letter gauge at once rather than at the replayer's next refresh.
    async fn refresh_gauge(&self) {
        if let Ok(n) = self.state.dead_letters.count().await {
            self.state.metrics.dead_letters.set(n as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_are_checked() {
        for ok in ["1700000000000-0", "0-1", "1-18446744073709551615"] {
            assert!(is_stream_id(ok), "{ok}");
        }
        for bad in
            ["", "1700000000000", "-0", "1-", "01-0", "1-01", "a-0", "1-0-0", "+1-0", "1 -0", "$", "(1-0"]
        {
            assert!(!is_stream_id(bad), "{bad}");
        }
    }

    #[test]
    fn selections_are_checked_and_repeats_dropped() {
        let body = |ids: Option<&[&str]>, all| {
            Some(DeadLetterSelection { ids: ids.map(|v| v.iter().map(|s| s.to_string()).collect()), all })
        };
        let refused = |r: Result<Selected, ApiError>| match r {
            Err(ApiError::Unprocessable(b)) => b.0.error,
            other => panic!("{other:?}"),
        };
        // A replay that names nothing takes every dead letter; a purge is refused.
        assert_eq!(selection(None, Unnamed::All).ok(), Some(Selected::All));
        assert_eq!(selection(body(None, None), Unnamed::All).ok(), Some(Selected::All));
        assert!(refused(selection(None, Unnamed::Refused)).contains("\"all\": true"));
        refused(selection(body(None, None), Unnamed::Refused));
        refused(selection(body(None, Some(false)), Unnamed::Refused));
        refused(selection(body(None, Some(false)), Unnamed::All));
        for unnamed in [Unnamed::All, Unnamed::Refused] {
            assert_eq!(selection(body(None, Some(true)), unnamed).ok(), Some(Selected::All));
            assert!(refused(selection(body(Some(&["1-0"]), Some(true)), unnamed)).starts_with("ids and"));
            assert_eq!(selection(body(Some(&[]), None), unnamed).ok(), Some(Selected::Ids(vec![])));
            assert_eq!(
                selection(body(Some(&["1-0", "2-0", "1-0"]), Some(false)), unnamed).ok(),
                Some(Selected::Ids(vec!["1-0".into(), "2-0".into()]))
            );
            assert!(refused(selection(body(Some(&["1-0", "x"]), None), unnamed)).starts_with("ids[1]"));
            let many: Vec<String> = (0..=MAX_LIMIT).map(|i| format!("{i}-0")).collect();
            refused(selection(Some(DeadLetterSelection { ids: Some(many), all: None }), unnamed));
        }
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(parse_limit(None).ok(), Some(DEFAULT_LIMIT));
        assert_eq!(parse_limit(Some("1000")).ok(), Some(1000));
        for bad in ["0", "1001", "-1", "x", ""] {
            assert!(matches!(parse_limit(Some(bad)), Err(ApiError::BadRequest(_))), "{bad}");
        }
        assert!(parse_after(Some("1-0")).is_ok());
        assert!(matches!(parse_after(Some("nope")), Err(ApiError::BadRequest(_))));
    }

    #[test]
    fn kept_at_falls_back_to_the_stream_id() {
        let dead = |id: &str, at| DeadLetter {
            id: id.into(),
            reason: String::new(),
            source: String::new(),
            at,
            token: None,
            rows: Vec::new(),
        };
        assert_eq!(kept_at(&dead("1-0", 1_763_733_600)), example_time());
        assert_eq!(kept_at(&dead("1763733600000-0", 0)), example_time());
    }
}
