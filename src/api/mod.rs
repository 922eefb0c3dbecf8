//! The HTTP surface: one poem-openapi struct per tag, the shared [`State`] (which also judges
//! traffic: client IP, rate limit, repeats, user agents), and [`routes`]: every operation behind one
//! front endpoint that tags the request id, rate-limits the tracking paths, sets the body limits,
//! turns errors into JSON and counts requests and refusals for the metrics.

pub mod admin;
pub mod ads;
pub mod analytics;
pub mod auth;
pub mod batch;
pub mod body;
pub mod client_ip;
pub mod cors;
pub mod dedup;
pub mod error;
pub mod event_ids;
pub mod health;
pub mod methods;
pub mod pixel;
pub mod ratelimit;
pub mod recent;
pub mod tracking;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use poem::{Endpoint, IntoEndpoint, IntoResponse, Request, Response, Route, http::StatusCode};
use poem_openapi::{OpenApiService, Tags};
use time::OffsetDateTime;
use uuid::Uuid;

use self::{
    admin::AdminApi, ads::AdsApi, analytics::AnalyticsApi, batch::BatchApi, body::BodyLimit, error::ApiError,
    health::HealthApi, methods::Methods, pixel::PixelApi, tracking::TrackingApi,
};
use crate::{
    domain::{Event, EventReport, Traffic, UserAgentFilter, event_time},
    ingest::{HoldError, Intake, PushError},
    iphash::IpHasher,
    metrics::{Metrics, RejectReason},
    store::{Analytics, Catalog, ClickHouse, EventRow},
};

/// Operation groups in the OpenAPI document.
#[derive(Tags)]
pub enum ApiTags {
    /// Events from players, ad servers and browsers.
    Tracking,
    /// The ad catalog.
    Ads,
    /// Numbers per ad, from pre-aggregated tables.
    Analytics,
    /// Health, readiness and metrics for operators.
    Operations,
    /// Dead letters (events ClickHouse would not take) for operators to list, replay or purge;
    /// admin scope.
    Admin,
}

/// What the handlers share.
pub struct State {
    /// Where accepted events are held until ClickHouse has them (buffer, and log or wait as
    /// `ACK_MODE` says).
    pub intake: Intake,
    /// Ad look-ups.
    pub catalog: Catalog,
    /// The ClickHouse handle (readiness).
    pub clickhouse: ClickHouse,
    /// Reads of the aggregate tables.
    pub analytics: Analytics,
    /// Months raw events are kept: the longest custom analytics window.
    pub raw_retention_months: u32,
    /// Client-IP hashing.
    pub hasher: IpHasher,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Future skew tolerated in client timestamps.
    pub max_clock_skew: Duration,
    /// Age tolerated in client timestamps.
    pub max_event_age: Duration,
    /// Seconds a 503 asks the client to wait.
    pub retry_after: u64,
    /// Largest request body.
    pub body_limit: usize,
    /// Largest body of `POST /ads/events`.
    pub batch_body_limit: usize,
    /// How long reading a request body may take.
    pub body_read_timeout: Duration,
    /// Origins whose pages may call the tracking endpoints.
    pub cors: cors::AllowedOrigins,
    /// API keys; empty means open. Shared: the front endpoint hands them to the operations'
    /// [`auth::admin_first`] and [`auth::read_first`] as request data.
    pub api_keys: Arc<auth::ApiKeys>,
    /// Proxies whose forwarding headers name the client.
    pub trusted_proxies: client_ip::TrustedProxies,
    /// Client event ids claimed by requests storing them, and those whose events this instance
    /// held, so that a repeated one is answered but not stored twice, each with what its repeats
    /// wait for in `committed` mode (`EVENT_IDS_MAX`, `EVENT_ID_TTL`).
    pub event_ids: Arc<event_ids::EventIds>,
    /// Bot and empty user agents.
    pub user_agents: UserAgentFilter,
    /// The repeat rule (same ad, client and kind within DEDUP_WINDOW).
    pub dedup: Arc<dedup::DedupWindow>,
    /// Per-client limits on the tracking endpoints; `None` when RATE_LIMIT is 0.
    pub rate_limiter: Option<ratelimit::RateLimiter>,
    /// The Redis spill (readiness and backlog); `None` when REDIS_URL is none.
    pub spill: Option<Arc<crate::ingest::Spill>>,
    /// The dead letters (admin endpoints).
    pub dead_letters: crate::ingest::DeadLetters,
    /// Whether ClickHouse takes INSERTs, as the flusher and the replayer last found.
    pub insert_health: Arc<crate::ingest::Health>,
}

/// Who sent a tracking request, as far as counting goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The address its events count for (never stored or logged).
    pub ip: std::net::IpAddr,
    /// The keyed hash of `ip`, which is stored.
    pub ip_hash: u64,
    /// Valid, or why its user agent makes its events invalid traffic.
    pub agent: Traffic,
    /// Whether `ip` is one viewer's, so that the repeat rule may judge by it (false for an ad
    /// server that did not say whose events it sends).
    pub per_device: bool,
    /// Whether the caller's key has the ingest scope: it may speak for viewers.
    pub ingest: bool,
}

/// What a request has reserved while it stores events, to be given back if they are not held:
/// claimed client event ids and the repeat rule's marks.
#[derive(Debug, Default)]
pub struct Claims {
    /// Client event ids claimed by this request ([`State::claim`]), in flight until settled.
    ids: Vec<Uuid>,
    /// This request's number in [`State::event_ids`] once it claimed an id (0 before).
    owner: u64,
    /// Events the repeat rule counted, until they are held.
    marks: Vec<dedup::Mark>,
    /// Where `ids` are in flight: a request that ends without settling them (an error on the
    /// way, a task that failed, a client that hung up while the request waited) gives them back
    /// when its claims are dropped.
    in_flight: Option<Arc<event_ids::EventIds>>,
    /// The repeat rule that `marks` are counted in, given back to it the same way.
    dedup: Option<Arc<dedup::DedupWindow>>,
}

impl Claims {
    /// True when nothing is reserved.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.marks.is_empty()
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        if let Some(dedup) = &self.dedup {
            for mark in self.marks.drain(..) {
                dedup.release(mark);
            }
        }
        if let Some(ids) = &self.in_flight
            && !self.ids.is_empty()
        {
            ids.give_back(&self.ids);
            self.ids.clear();
        }
    }
}

/// Tracking paths, and the route template each is counted under when refused before routing.
pub fn tracking_route(path: &str) -> Option<&'static str> {
    match path {
        "/ads/impression" => Some("/ads/impression"),
        "/ads/click" => Some("/ads/click"),
        "/ads/events" => Some("/ads/events"),
        _ if path.starts_with("/t/") => Some("/t/{event}"),
        _ if path.starts_with("/c/") => Some("/c/{adId}"),
        _ => None,
    }
}

/// The outcome of claiming a client event id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// First seen: this request stores it.
    Fresh,
    /// Held already: answer it as a duplicate, once [`State::repeat_confirmed`] says so.
    Held(HeldAs),
    /// Another request is storing it right now and may still fail: the caller must retry, since
    /// answering "duplicate" could acknowledge an event that ends up not stored.
    InFlight,
}

/// How a held client event id was held: the sequence numbers of its request's events, which in
/// `committed` mode a repeat's 2xx waits for as the first request's did (empty: nothing to
/// wait for).
pub type HeldAs = std::ops::Range<u64>;

/// What became of an accepted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Held for storage, valid or flagged as invalid traffic.
    Stored(Traffic),
    /// Its client event id was accepted before (on this instance): answered, not stored again.
    Repeat,
}

impl Accepted {
    /// True when the event does not add to the net numbers because it repeats an earlier one:
    /// its event id was seen, or the repeat rule flagged it. Answers say `"duplicate": true`.
    /// (Bot traffic is not told that it was spotted.)
    pub fn is_duplicate(self) -> bool {
        matches!(self, Accepted::Repeat | Accepted::Stored(Traffic::Duplicate))
    }
}

impl State {
    /// Turns a request DTO into a validated report, or a 400 naming the problem.
    pub fn validate<T: TryInto<EventReport, Error = String>>(&self, dto: T) -> Result<EventReport, ApiError> {
        dto.try_into().map_err(ApiError::bad_request)
    }

    /// Checks the time, resolves the ad, judges the traffic, stamps the event and buffers it.
    /// Ok means the event is held (or, for a repeated client event id, was held before).
    pub async fn accept(&self, report: EventReport, caller: &Caller) -> Result<Accepted, ApiError> {
        let now = OffsetDateTime::now_utc();
        // Counted by the front endpoint, from the reason the refusal carries.
        let at =
            self.event_time(&report, now).map_err(|e| ApiError::refused(e, RejectReason::BadTimestamp))?;
        self.accept_at(report, caller, at, now).await
    }

    /// [`accept`](Self::accept) with the event time already settled (`at`, read at `now`): a
    /// beacon puts the server's time in place of a client time that `accept` would refuse.
    pub async fn accept_at(
        &self,
        report: EventReport,
        caller: &Caller,
        at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Accepted, ApiError> {
        self.known_ad(report.ad_id).await?;
        // A client id is claimed atomically, so that of two concurrent repeats only one is stored;
        // nothing awaits between the claim and the hold.
        let mut claims = Claims::default();
        if let Some(id) = report.event_id {
            match self.claim(id, &mut claims) {
                Claim::Fresh => {}
                Claim::Held(held) => {
                    let unanswered =
                        self.event_ids.until_answered(vec![id], event_ids::Seqs::All(held.clone()));
                    self.repeats_confirmed(&[held]).await?;
                    unanswered.answered();
                    self.metrics.event_id_repeats.inc();
                    return Ok(Accepted::Repeat);
                }
                Claim::InFlight => {
                    self.metrics.rejected(RejectReason::InFlight);
                    return Err(self.in_flight(id));
                }
            }
        }
        let row = self.stamp(&report, at, now, caller, &mut claims);
        let traffic = row.traffic;
        self.hold(vec![row], claims).await?;
        Ok(Accepted::Stored(traffic))
    }

    /// The event time to store for `report`, or why its client timestamp is refused.
    pub fn event_time(&self, report: &EventReport, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
        event_time(report.client_time, now, self.max_clock_skew, self.max_event_age)
    }

    /// Ok when the catalog knows the ad; else the refusal to answer (counted).
    pub async fn known_ad(&self, ad: Uuid) -> Result<(), ApiError> {
        match self.catalog.get(ad).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => {
                self.metrics.rejected(RejectReason::UnknownAd);
                Err(ApiError::not_found(format!("ad {ad} not found")))
            }
            Err(e) => {
                self.metrics.rejected(RejectReason::CatalogUnavailable);
                Err(ApiError::storage(e, self.retry_after))
            }
        }
    }

    /// Who sent `req` (see [`client_ip`]); `stated` is an address the body claims. A caller
    /// with the ingest scope (an ad server) speaks for devices: its `X-Device-IP` / `stated`
    /// address and its `X-Device-User-Agent` are the device's. Without the user agent its events
    /// are not judged by user agent (its own is a server's); without the address they are not
    /// judged by the repeat rule either (its own address is shared by every viewer it serves).
    pub fn caller(&self, req: &Request, stated: Option<std::net::IpAddr>) -> Caller {
        let headers = req.headers();
        // A placeholder (0.0.0.0 for "unknown") names no viewer: as if none was stated.
        let stated = stated.filter(|ip| !client_ip::is_placeholder(*ip));
        // The key check costs a hash, so only requests that carry a key pay it.
        let ingest = auth::carries_key(headers) && self.api_keys.grants(headers, auth::Scope::Ingest);
        let ip = client_ip::resolve(req, &self.trusted_proxies, ingest, stated);
        let (agent, per_device) = if ingest {
            let device_agent = headers.get(client_ip::X_DEVICE_USER_AGENT);
            let agent =
                device_agent.map_or(Traffic::Valid, |ua| self.user_agents.classify(Some(ua.as_bytes())));
            // Only an address that parses, and is no placeholder, names the viewer; else the
            // server's stands.
            (agent, stated.is_some() || client_ip::device_ip(headers).is_some())
        } else {
            (
                self.user_agents.classify(headers.get(poem::http::header::USER_AGENT).map(|v| v.as_bytes())),
                true,
            )
        };
        Caller { ip, ip_hash: self.hasher.hash(ip), agent, per_device, ingest }
    }

    /// The caller of one batch item: the viewer a server-side caller (ingest scope) names in the
    /// item, else the request's caller. From anyone else the item's viewer fields are ignored.
    pub fn for_device(&self, caller: &Caller, device: &batch::Device) -> Caller {
        // A placeholder address (0.0.0.0 for "unknown") names no viewer: as if absent.
        let device_ip = device.ip.filter(|ip| !client_ip::is_placeholder(*ip));
        if !caller.ingest || (device_ip.is_none() && device.user_agent.is_none()) {
            return *caller;
        }
        let (ip, ip_hash) = match device_ip {
            Some(ip) => (ip, self.hasher.hash(ip)),
            None => (caller.ip, caller.ip_hash),
        };
        let agent = match &device.user_agent {
            Some(ua) => self.user_agents.classify(Some(ua.as_bytes())),
            None => caller.agent,
        };
        Caller { ip, ip_hash, agent, per_device: device_ip.is_some() || caller.per_device, ingest: true }
    }

    /// How long the sender of `req` must wait when it is over its rate limit on a tracking
    /// endpoint; `None` when it may go on. Callers with the ingest scope (ad servers sending
    /// for many viewers from few addresses) are not limited per address.
    pub fn rate_limited(&self, req: &Request) -> Option<Duration> {
        let limiter = self.rate_limiter.as_ref()?;
        tracking_route(req.uri().path())?;
        if auth::carries_key(req.headers()) && self.api_keys.grants(req.headers(), auth::Scope::Ingest) {
            return None;
        }
        limiter.check(client_ip::resolve(req, &self.trusted_proxies, false, None)).err()
    }

    /// Claims a client event id for this instance: [`Claim::Fresh`] (then it is in `claims`,
    /// in flight until the request settles it) for exactly one of any number of concurrent
    /// requests, under one lock ([`event_ids::EventIds::claim`]).
    pub fn claim(&self, id: Uuid, claims: &mut Claims) -> Claim {
        let claimed = self.event_ids.claim(id, self.owner(claims));
        self.claimed(id, claimed, claims)
    }

    /// [`State::claim`] for each of `ids` in turn, under one lock of the store.
    pub fn claim_all(&self, ids: &[Uuid], claims: &mut Claims) -> Vec<Claim> {
        // A batch without ids takes neither a number nor the store's lock.
        if ids.is_empty() {
            return Vec::new();
        }
        let all = self.event_ids.claim_all(ids, self.owner(claims));
        ids.iter().zip(all).map(|(&id, claimed)| self.claimed(id, claimed, claims)).collect()
    }

    /// The request's number in the id store, taken at its first claim.
    fn owner(&self, claims: &mut Claims) -> u64 {
        if claims.owner == 0 {
            claims.owner = self.event_ids.owner();
        }
        claims.owner
    }

    /// What a claim of `id` means for the request, noting a fresh one in `claims`.
    fn claimed(&self, id: Uuid, claimed: event_ids::Claimed, claims: &mut Claims) -> Claim {
        match claimed {
            event_ids::Claimed::Fresh => {
                claims.ids.push(id);
                claims.in_flight.get_or_insert_with(|| self.event_ids.clone());
                Claim::Fresh
            }
            event_ids::Claimed::Held(seqs) => Claim::Held(seqs),
            event_ids::Claimed::InFlight => Claim::InFlight,
            // A repeat within the request: the request's own answer covers it.
            event_ids::Claimed::Mine => Claim::Held(0..0),
        }
    }

    /// Ok when repeats (of events held as `held`) may be answered 2xx, in one wait: at once,
    /// except in `committed` mode, where a 2xx means ClickHouse holds the events: the repeat
    /// waits for the first request's events as that request did (a client retrying after a 503
    /// gets its 2xx only once they are confirmed), else the same 503 (the caller's
    /// [`event_ids::Unanswered`] keeps the ids remembered after the events are stored). Events
    /// that went to the spill or the dead letters are known as such for as long as the buffer
    /// remembers it (ten minutes); a repeat after that is answered 2xx.
    pub async fn repeats_confirmed(&self, held: &[HeldAs]) -> Result<(), ApiError> {
        self.intake.all_confirmed(held).await.map_err(|e| {
            self.metrics.commit_timeouts.inc();
            ApiError::hold(&e, self.retry_after)
        })
    }

    /// The 503 for a repeat of an event another request is storing right now.
    pub fn in_flight(&self, id: Uuid) -> ApiError {
        ApiError::Unavailable(
            poem_openapi::payload::Json(error::ErrorBody {
                error: format!("event {id} is being stored by another request; retry to learn the outcome"),
            }),
            1,
        )
    }

    /// The row of an accepted report at event time `at`: the server's clock, the event id, the
    /// client-IP hash and the traffic verdict (the caller's user agent, else the repeat rule,
    /// whose mark goes into `claims`).
    pub fn stamp(
        &self,
        report: &EventReport,
        at: OffsetDateTime,
        now: OffsetDateTime,
        caller: &Caller,
        claims: &mut Claims,
    ) -> EventRow {
        let traffic = match caller.agent {
            Traffic::Valid if caller.per_device => {
                match self.dedup.judge(
                    report.ad_id,
                    caller.ip_hash,
                    report.kind,
                    at.unix_timestamp(),
                    now.unix_timestamp(),
                ) {
                    dedup::Verdict::Counts(mark) => {
                        if let Some(mark) = mark {
                            claims.marks.push(mark);
                            claims.dedup.get_or_insert_with(|| self.dedup.clone());
                        }
                        Traffic::Valid
                    }
                    dedup::Verdict::Repeat => Traffic::Duplicate,
                }
            }
            flagged => flagged,
        };
        EventRow::from(Event {
            event_id: report.event_id.unwrap_or_else(Uuid::new_v4),
            ad_id: report.ad_id,
            kind: report.kind,
            event_time: at,
            received_at: now,
            ip_hash: caller.ip_hash,
            playback_time: report.playback_time,
            error_code: report.error_code,
            traffic,
        })
    }

    /// Holds rows, all or none, as `ACK_MODE` says (the buffer counts them as accepted the
    /// moment they are held). When none, `claims` are given back, so that a retry with the same
    /// ids counts as it would have.
    pub async fn hold(&self, rows: Vec<EventRow>, claims: Claims) -> Result<(), ApiError> {
        let count = rows.len() as u64;
        // Besides the outcome, the request's ids until its 2xx (see `Unanswered`).
        let (outcome, unanswered) = if self.intake.wal.is_some() && !claims.is_empty() {
            // The request waits for the log. If it goes away meanwhile (the client hangs up),
            // its claims must still be settled by what became of the events, or a retry with the
            // same event id would be told "in flight" until the id is forgotten: so the wait and
            // the settling run in a task of their own, which a dropped request does not cancel.
            // Its output is then dropped when it ends, and the ids count as unanswered.
            let intake = self.intake.clone();
            let metrics = self.metrics.clone();
            let mut claims = claims;
            tokio::spawn(async move {
                let outcome = intake.hold(rows).await;
                let unanswered = Settle { metrics: &metrics }.apply(&outcome, &mut claims, count);
                (outcome, unanswered)
            })
            .await
            .unwrap_or_else(|e| {
                (Err(HoldError::Log(crate::ingest::WalError(format!("the hold failed: {e}")))), None)
            })
        } else {
            let mut claims = claims;
            let outcome = self.intake.hold(rows).await;
            let unanswered = Settle { metrics: &self.metrics }.apply(&outcome, &mut claims, count);
            (outcome, unanswered)
        };
        let held = outcome.map_err(|e| ApiError::hold(&e, self.retry_after))?;
        self.intake.confirmed(held).await.map_err(|e| {
            self.metrics.commit_timeouts.inc();
            ApiError::hold(&e, self.retry_after)
        })?;
        if let Some(unanswered) = unanswered {
            unanswered.answered();
        }
        Ok(())
    }
}

/// Settles a request's claims once its events are held or refused.
struct Settle<'a> {
    metrics: &'a Metrics,
}

impl Settle<'_> {
    /// Held: a repeat of the claimed ids is a duplicate from now on, never stored again (in
    /// `committed` mode answered 2xx once these events are confirmed); returned, the guard that
    /// counts them as unanswered until the request's 2xx. Refused: the ids and the repeat rule's
    /// marks are given back, and each event is counted as rejected.
    fn apply(
        &self,
        outcome: &Result<crate::ingest::Held, HoldError>,
        claims: &mut Claims,
        count: u64,
    ) -> Option<event_ids::Unanswered> {
        match outcome {
            Ok(held) => {
                // Counted for good: dropping the claims no longer gives the marks back.
                claims.marks.clear();
                // Remembered as held as they leave the in-flight set (under the lock that
                // `State::claim` takes too), so that no repeat finds them in neither.
                let ids = claims.in_flight.as_ref()?;
                ids.remember(claims.ids.iter().copied(), &held.seqs());
                Some(ids.until_answered(std::mem::take(&mut claims.ids), event_ids::Seqs::All(held.seqs())))
            }
            Err(e) => {
                // Given back when the claims are dropped: the ids leave the in-flight set and
                // the repeat rule forgets the marks.
                let reason = match e {
                    HoldError::Push(PushError::Full) => RejectReason::BufferFull,
                    HoldError::Push(PushError::Closed) => RejectReason::ShuttingDown,
                    _ => RejectReason::LogUnavailable,
                };
                for _ in 0..count {
                    self.metrics.rejected(reason);
                }
                None
            }
        }
    }
}

/// Every Api struct, in the order the OpenAPI document lists their operations.
pub type Apis = (TrackingApi, BatchApi, PixelApi, AdsApi, AnalyticsApi, HealthApi, AdminApi);

/// The OpenAPI service over every operation.
pub fn openapi(state: Arc<State>) -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            TrackingApi { state: state.clone() },
            BatchApi { state: state.clone() },
            PixelApi { state: state.clone() },
            AdsApi { state: state.clone() },
            AnalyticsApi { state: state.clone() },
            HealthApi { state: state.clone() },
            AdminApi { state },
        ),
        "adbeacon",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Video-ad tracking and analytics. Players, ad servers and web pages send impressions, \
         clicks and video events; adbeacon acknowledges them at once and stores every one in \
         ClickHouse. Errors are JSON: {\"error\": \"what is wrong\"}.",
    )
}

/// Every route behind the [`Front`] endpoint.
pub fn routes(state: Arc<State>) -> impl Endpoint<Output = Response> {
    let metrics = state.metrics.clone();
    let body_limit = state.body_limit;
    let batch_body_limit = state.batch_body_limit;
    let body_timeout = state.body_read_timeout;
    let cors = state.cors.clone();
    let limits = state.clone();
    let tracking = tracking::TrackingApi { state: state.clone() };
    let pixel = pixel::PixelApi { state: state.clone() };
    let api = openapi(state);
    let spec = api.spec();
    let routes = operation_routes(&spec);
    let hot_routes = tracking::Hot::ALL.map(|hot| routes.get(hot.operation_id()).cloned());
    let hot_series = tracking::Hot::ALL.map(|hot| {
        hot_routes[hot.index()].as_ref().map(|route| HotSeries {
            usual_status: hot.usual_status(),
            usual: metrics.http_requests.with_label_values(&[
                hot.method().as_str(),
                &route.template,
                hot.usual_status().as_str(),
            ]),
            duration: metrics.http_duration.with_label_values(&[&route.template]),
        })
    });
    let methods = Methods::from_spec(&spec, &[("/openapi.json", &["GET"])]);
    let other = Route::new().nest("/docs", api.swagger_ui()).at("/openapi.json", api.spec_endpoint());
    Front {
        api: api.into_endpoint(),
        tracking,
        pixel,
        other,
        metrics,
        routes,
        hot_routes,
        hot_series,
        methods,
        body_limit,
        batch_body_limit,
        body_timeout,
        cors,
        limits,
    }
}

/// What the front endpoint needs to know of an operation, read from the spec itself.
#[derive(Clone)]
struct OperationRoute {
    /// The path template, the `path` label of the HTTP metrics.
    template: String,
    /// Tagged Tracking: its 400 and 413 answers are refused events.
    tracking: bool,
}

/// Maps operation ids to their routes.
fn operation_routes(spec_json: &str) -> HashMap<String, OperationRoute> {
    let spec: serde_json::Value = serde_json::from_str(spec_json).unwrap_or_default();
    let mut out = HashMap::new();
    if let Some(paths) = spec.get("paths").and_then(|p| p.as_object()) {
        for (path, ops) in paths {
            for op in ops.as_object().into_iter().flat_map(|o| o.values()) {
                if let Some(id) = op.get("operationId").and_then(|v| v.as_str()) {
                    let tracking = op["tags"].as_array().is_some_and(|t| t.iter().any(|t| t == "Tracking"));
                    out.insert(id.to_string(), OperationRoute { template: path.clone(), tracking });
                }
            }
        }
    }
    out
}

/// The one endpoint in front of everything: sets the body limit, dispatches to the API or to
/// the documentation, turns errors into JSON and counts the request. One layer instead of a
/// middleware stack, because poem boxes every layer's future and a tracking request is small
/// enough for those copies to show in `make bench`.
struct Front<A, O> {
    api: A,
    /// Serves the click and the impression without the API's router ([`tracking::Hot`]).
    tracking: tracking::TrackingApi,
    /// Serves the VAST beacon without the API's router.
    pixel: pixel::PixelApi,
    other: O,
    metrics: Arc<Metrics>,
    routes: HashMap<String, OperationRoute>,
    /// The routes of [`tracking::Hot`], by [`tracking::Hot::index`]: the front endpoint knows
    /// which of them it called, so their answers need no operation id to be looked up by.
    hot_routes: [Option<OperationRoute>; 3],
    /// The HTTP metrics' series of the hot routes, by [`tracking::Hot::index`], looked up once:
    /// a look-up by label values hashes them, twice per request (about 400 instructions of a
    /// click; callgrind).
    hot_series: [Option<HotSeries>; 3],
    methods: Methods,
    body_limit: usize,
    batch_body_limit: usize,
    body_timeout: Duration,
    cors: cors::AllowedOrigins,
    /// Rate limits, checked before a body is read.
    limits: Arc<State>,
}

/// The series a hot route's requests count under.
struct HotSeries {
    /// The status of the route's usual answer ([`tracking::Hot::usual_status`]).
    usual_status: StatusCode,
    /// `http_requests_total` for the route, its method and that status.
    usual: prometheus::IntCounter,
    /// `http_request_duration_seconds` for the route.
    duration: prometheus::Histogram,
}

/// The `method` label of a request's metrics: one of the methods HTTP defines, else `other`. A
/// client may send any token as a method, and each new label value is a new series kept for the
/// life of the process.
fn method_label(method: &poem::http::Method) -> &'static str {
    use poem::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// The reason a refused request counts under, for the statuses that mean "this request is
/// hostile or broken": the one its error carries, else the status's own.
fn refusal_reason(resp: &mut Response) -> Option<RejectReason> {
    let by_status = match resp.status() {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => RejectReason::Invalid,
        StatusCode::METHOD_NOT_ALLOWED => RejectReason::MethodNotAllowed,
        StatusCode::REQUEST_TIMEOUT => RejectReason::BodyTimeout,
        StatusCode::PAYLOAD_TOO_LARGE => RejectReason::TooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => RejectReason::UnsupportedMediaType,
        _ => return None,
    };
    // Only a 400 carries the header (`error::Refusal`, the operations' `BadRequest`), so other
    // answers skip the look-up: a hashed probe, about 200 instructions of a click (callgrind).
    let carried = resp.headers_mut().remove(error::REFUSAL_HEADER);
    let carried = carried.and_then(|v| v.to_str().ok().and_then(RejectReason::from_label));
    Some(carried.or_else(|| resp.data::<RejectReason>().copied()).unwrap_or(by_status))
}

/// The request id header: taken from the request when it holds a sane id (so that a caller's or a
/// proxy's id follows the request through), else generated; echoed on the response and a field
/// of every log line of the request.
pub const REQUEST_ID: poem::http::HeaderName = poem::http::HeaderName::from_static("x-request-id");

/// The request's own id if it is 1 to 128 characters of letters, digits and `-_.:/+=` (nothing a
/// JSON string or a log line would have to escape), else a new one ([`new_request_id`]).
fn request_id(headers: &poem::http::HeaderMap) -> poem::http::HeaderValue {
    let sane = |v: &&poem::http::HeaderValue| {
        let b = v.as_bytes();
        (1..=128).contains(&b.len()) && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:/+=".contains(c))
    };
    match headers.get(REQUEST_ID).filter(sane) {
        Some(v) => v.clone(),
        None => new_request_id(),
    }
}

/// A new request id: this process's random prefix and a counter (16 hex digits each), unique
/// without a random draw per request.
pub(crate) fn new_request_id() -> poem::http::HeaderValue {
    static PREFIX: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| Uuid::new_v4().as_u64_pair().0);
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // Hex digits written by hand: `format!` was a third of the request id's cost.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut text = [b'-'; 33];
    for (i, word) in [*PREFIX, n].into_iter().enumerate() {
        for j in 0..16 {
            text[i * 17 + j] = HEX[((word >> (60 - 4 * j)) & 0xf) as usize];
        }
    }
    poem::http::HeaderValue::from_bytes(&text).expect("hex digits are a valid header value")
}

impl<A: Endpoint, O: Endpoint> Endpoint for Front<A, O> {
    type Output = Response;

    fn call(&self, req: Request) -> impl Future<Output = poem::Result<Response>> + Send {
        let served = self.get_response(req);
        async move { Ok(served.await) }
    }

    /// What the server calls: every answer is already a response, and each async layer between
    /// the connection and the handler would keep its own copy of the 472-byte request in the
    /// request's future (see [`Front::handle`]).
    fn get_response(&self, req: Request) -> impl Future<Output = Response> + Send {
        Tagged { id: Some(request_id(req.headers())), inner: self.handle(req) }
    }
}

pin_project_lite::pin_project! {
    /// A request's future, polled with its id set for the log lines
    /// ([`crate::telemetry::RequestScope`]; not a tracing span, which cost about 6,000
    /// instructions of a click), whose answer carries the id in `x-request-id`.
    struct Tagged<F> {
        // Taken out while the future is polled, and into the answer at the end.
        id: Option<poem::http::HeaderValue>,
        #[pin]
        inner: F,
    }
}

impl<F: Future<Output = Response>> Future for Tagged<F> {
    type Output = Response;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Response> {
        let this = self.project();
        let polled = {
            let _scope = crate::telemetry::RequestScope::enter(this.id);
            this.inner.poll(cx)
        };
        polled.map(|mut resp| {
            if let Some(id) = this.id.take() {
                resp.headers_mut().insert(REQUEST_ID, id);
            }
            // An error is never to be cached: a 404 for an ad not created yet (or retired and
            // brought back) or a 429, kept by a browser or a CDN, would answer a player's later
            // pixel or click-through without it reaching the service. 4xx are cacheable by
            // default (RFC 9110, 15.1), and some CDNs do cache them.
            if resp.status().is_client_error() || resp.status().is_server_error() {
                resp.headers_mut().insert(
                    poem::http::header::CACHE_CONTROL,
                    poem::http::HeaderValue::from_static("no-store"),
                );
            }
            resp
        })
    }
}

impl<A: Endpoint, O: Endpoint> Front<A, O> {
    /// Serves one request. A plain function returning an `async move` block, not an `async fn`:
    /// an `async fn` moves each argument into a local of its own, so its future holds the request
    /// twice; the block uses the captured request in place.
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` keeps a second copy of the request in its future"
    )]
    fn handle(&self, mut req: Request) -> impl Future<Output = Response> + Send + '_ {
        async move {
            let started = Instant::now();
            let method = req.method().clone();
            let method_label = method_label(&method);
            if cors::is_preflight(&req) {
                let resp = cors::preflight(&self.cors, &req);
                let status = resp.status();
                // A refused preflight is a refused event: the browser never sends the request
                // (and does not keep a refusal), so this is the one place it can be counted.
                if status == StatusCode::FORBIDDEN {
                    self.metrics.rejected(RejectReason::ForbiddenOrigin);
                }
                self.metrics
                    .http_requests
                    .with_label_values(&[method_label, "preflight", status.as_str()])
                    .inc();
                return resp;
            }
            let origin = req.headers().get(poem::http::header::ORIGIN).cloned();
            if let Some(resp) = cors::refuse(&self.cors, origin.as_ref(), req.uri().path()) {
                self.metrics.rejected(RejectReason::ForbiddenOrigin);
                self.metrics
                    .http_requests
                    .with_label_values(&[method_label, "forbidden_origin", "403"])
                    .inc();
                return resp;
            }
            if let Some(wait) = self.limits.rate_limited(&req) {
                self.metrics.rejected(RejectReason::RateLimited);
                if method == poem::http::Method::GET && req.uri().path().starts_with("/c/") {
                    // A click-through still takes the viewer to the ad (see PixelApi::click_through).
                    req.set_data(ratelimit::OverLimit);
                } else {
                    let route = tracking_route(req.uri().path()).unwrap_or("unmatched");
                    self.metrics.http_requests.with_label_values(&[method_label, route, "429"]).inc();
                    let mut resp = error::too_many_requests(wait);
                    cors::decorate(&self.cors, origin.as_ref(), &mut resp);
                    return resp;
                }
            }
            // A plain OPTIONS learns what the path serves (one with Access-Control-Request-Method
            // but no Origin is no browser's preflight). A preflight of a path without CORS (the
            // catalog, analytics) is not granted: it falls through to the router's 405.
            if method == poem::http::Method::OPTIONS
                && !(req.headers().contains_key(poem::http::header::ORIGIN)
                    && req.headers().contains_key(poem::http::header::ACCESS_CONTROL_REQUEST_METHOD))
                && let Some((template, allow)) = self.methods.find(req.uri().path())
            {
                let mut resp = methods::options(allow);
                if cors::is_tracking_path(req.uri().path()) {
                    cors::decorate(&self.cors, origin.as_ref(), &mut resp);
                }
                self.metrics.http_requests.with_label_values(&[method_label, template, "204"]).inc();
                return resp;
            }
            // A CORS preflight of a path without CORS (the tracking paths answered theirs above).
            let preflight_refused = method == poem::http::Method::OPTIONS
                && req.headers().contains_key(poem::http::header::ORIGIN)
                && req.headers().contains_key(poem::http::header::ACCESS_CONTROL_REQUEST_METHOD)
                && !cors::is_tracking_path(req.uri().path());
            let uri = req.uri().clone();
            let path = req.uri().path();
            let (docs, fallback) = if path.starts_with("/docs") {
                (true, "/docs")
            } else if path == "/openapi.json" {
                (true, "/openapi.json")
            } else {
                (false, "unmatched")
            };
            let limit = if path == "/ads/events" { self.batch_body_limit } else { self.body_limit };
            let hot = tracking::Hot::find(&method, path);
            let rules = BodyLimit { bytes: limit, timeout: self.body_timeout };
            if hot.is_none() {
                // The hot routes take it as an argument: an insert here allocates the request's
                // extension map, which they do not need otherwise. The keys are for the
                // operations that check them before reading their parameters and body (an open
                // service has none to check).
                req.set_data(rules);
                if !self.limits.api_keys.is_open() {
                    req.set_data(self.limits.api_keys.clone());
                }
            }
            let result = if docs {
                // Boxed: the documentation's router future is the largest of these, and
                // unboxed it would size every request's future.
                Box::pin(self.other.call(req)).await.map(IntoResponse::into_response)
            } else if let Some(hot) = hot {
                match hot {
                    tracking::Hot::Click => self.tracking.call_click(req, rules).await,
                    tracking::Hot::Impression => self.tracking.call_impression(req, rules).await,
                    tracking::Hot::Beacon => self.pixel.call_beacon(req).await,
                }
            } else {
                self.api.call(req).await.map(IntoResponse::into_response)
            };
            let mut resp = match result {
                Ok(resp) => error::into_json_error(resp).await,
                Err(e) => error::into_json_error(error::error_into_response(e)).await,
            };
            let route = match hot {
                Some(hot) => self.hot_routes[hot.index()].as_ref(),
                None => resp.data::<poem_openapi::OperationId>().and_then(|op| self.routes.get(op.0)),
            };
            let mut path = route.map_or(fallback, |r| r.template.as_str());
            let status = resp.status();
            if status == StatusCode::METHOD_NOT_ALLOWED
                && let Some((template, allow)) = self.methods.find(uri.path())
            {
                let serves = allow.to_str().unwrap_or("");
                // A preflight of a path without CORS: OPTIONS itself is served there (plain).
                let text = if preflight_refused {
                    format!(
                        "cross-origin requests are not served on {template} (only the tracking endpoints \
                         answer CORS preflights); it serves {serves} to same-origin and server-side callers"
                    )
                } else {
                    format!("{method} is not served on {template}; it serves {serves}")
                };
                resp = error::error_response(status, &text);
                resp.headers_mut().insert(poem::http::header::ALLOW, allow.clone());
                path = template;
            }
            // The body was not read to its end (too large, too slow, of a type not read): what the
            // client sends next on this connection cannot be told from the rest of it.
            if matches!(
                status,
                StatusCode::PAYLOAD_TOO_LARGE
                    | StatusCode::REQUEST_TIMEOUT
                    | StatusCode::UNSUPPORTED_MEDIA_TYPE
            ) {
                resp.headers_mut()
                    .insert(poem::http::header::CONNECTION, poem::http::HeaderValue::from_static("close"));
            }
            let tracking = route.map_or_else(|| cors::is_tracking_path(uri.path()), |r| r.tracking);
            if tracking && origin.is_some() {
                cors::decorate(&self.cors, origin.as_ref(), &mut resp);
            }
            // Counted here, not in the handlers, so that requests refused before a handler runs
            // (malformed JSON, too large, too slow, a wrong method) count too; the reason travels on
            // the response (see error::Refusal).
            if let Some(reason) = refusal_reason(&mut resp) {
                if tracking {
                    self.metrics.rejected(reason);
                } else if route.is_some() || path != "unmatched" {
                    self.metrics.request_rejected(reason);
                }
            }
            let elapsed = started.elapsed().as_secs_f64();
            // A hot route's path is its template (see `route` above): its series are those.
            match hot.and_then(|hot| self.hot_series[hot.index()].as_ref()) {
                Some(series) => {
                    if series.usual_status == status {
                        series.usual.inc();
                    } else {
                        self.metrics
                            .http_requests
                            .with_label_values(&[method_label, path, status.as_str()])
                            .inc();
                    }
                    series.duration.observe(elapsed);
                }
                None => {
                    self.metrics
                        .http_requests
                        .with_label_values(&[method_label, path, status.as_str()])
                        .inc();
                    self.metrics.http_duration.with_label_values(&[path]).observe(elapsed);
                }
            }
            // 503 is back-pressure, expected under overload and counted above; logging each one would
            // flood the logs exactly when the machine has no time to spare.
            if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
                tracing::warn!(method = %method, path, status = status.as_u16(), "request failed");
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request that ends before its events are held (an error, a client hanging up while a
    /// batch waits) gives its repeat-rule marks back with its claims; held ones stay counted.
    #[test]
    fn unsettled_marks_go_back_when_the_claims_are_dropped() {
        use crate::domain::EventKind;
        let dedup = Arc::new(dedup::DedupWindow::new(Duration::from_secs(10), &[EventKind::Click]));
        let ad = Uuid::from_u128(1);
        let judge = || dedup.judge(ad, 7, EventKind::Click, 1000, 1000);
        let claims_of = |verdict| {
            let dedup::Verdict::Counts(Some(mark)) = verdict else { panic!("{verdict:?}") };
            let mut claims = Claims::default();
            claims.marks.push(mark);
            claims.dedup = Some(dedup.clone());
            claims
        };
        drop(claims_of(judge()));
        let mut held = claims_of(judge());
        // What `Settle` does for held events.
        held.marks.clear();
        drop(held);
        assert_eq!(judge(), dedup::Verdict::Repeat);
    }

    /// The id is set for log lines while the request's future is polled, on every poll, and only
    /// then; the answer carries it.
    #[tokio::test]
    async fn a_request_id_is_current_only_while_its_request_is_polled() {
        use crate::telemetry::current_request_id;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let inner = async move {
            log.lock().unwrap().push(current_request_id());
            tokio::task::yield_now().await;
            log.lock().unwrap().push(current_request_id());
            Response::default()
        };
        let id = poem::http::HeaderValue::from_static("abc-1");
        let tagged = Tagged { id: Some(id.clone()), inner };
        assert_eq!(current_request_id(), None);
        let resp = tokio::spawn(tagged).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![Some(id.clone()), Some(id.clone())]);
        assert_eq!(resp.headers().get(REQUEST_ID), Some(&id));
        assert_eq!(current_request_id(), None);
    }

    /// A request polled inside another's poll (not done here, but possible) leaves the outer
    /// request's id in place when it returns.
    #[test]
    fn an_inner_scope_restores_the_outer_id() {
        use crate::telemetry::{RequestScope, current_request_id};
        let (a, b) = (poem::http::HeaderValue::from_static("a"), poem::http::HeaderValue::from_static("b"));
        let (mut outer, mut inner) = (Some(a.clone()), Some(b.clone()));
        {
            let _outer = RequestScope::enter(&mut outer);
            {
                let _inner = RequestScope::enter(&mut inner);
                assert_eq!(current_request_id(), Some(b.clone()));
            }
            assert_eq!(current_request_id(), Some(a.clone()));
        }
        assert_eq!(current_request_id(), None);
        assert_eq!((outer, inner), (Some(a), Some(b)));
    }
}
