//! The HTTP surface: one poem-openapi struct per tag, the shared [`State`], and [`routes`]: every
//! operation behind one front endpoint that sets the body limit, turns errors into JSON and counts
//! requests for the metrics.

pub mod ads;
pub mod analytics;
pub mod auth;
pub mod batch;
pub mod body;
pub mod client_ip;
pub mod cors;
pub mod error;
pub mod health;
pub mod pixel;
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
    ads::AdsApi, analytics::AnalyticsApi, batch::BatchApi, body::BodyLimit, error::ApiError,
    health::HealthApi, pixel::PixelApi, tracking::TrackingApi,
};
use crate::{
    domain::{Event, EventKind, EventReport, EventTime},
    ingest::{Buffer, PushError},
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
}

/// What the handlers share.
pub struct State {
    /// Where accepted events wait for the flusher.
    pub buffer: Arc<Buffer>,
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
    /// Origins whose pages may call the tracking endpoints.
    pub cors: cors::AllowedOrigins,
    /// API keys; empty means open.
    pub api_keys: auth::ApiKeys,
    /// Proxies whose forwarding headers name the client.
    pub trusted_proxies: client_ip::TrustedProxies,
    /// Client event ids claimed recently on this instance, so that a repeated one is answered
    /// but not stored twice (see [`RECENT_EVENT_IDS`]); the flag turns true once the event is
    /// held.
    pub recent_event_ids: moka::sync::Cache<Uuid, Arc<std::sync::atomic::AtomicBool>>,
}

/// How many client event ids, and for how long, an instance remembers. A player that re-fires a
/// beacon does so within seconds; the bound keeps a flood of fresh ids from growing memory (past
/// it the oldest ids go first: least-recently-used, so a new id is always remembered).
pub const RECENT_EVENT_IDS: (u64, Duration) = (1_000_000, Duration::from_secs(3600));

/// The outcome of claiming a client event id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First seen: this request stores it.
    Fresh,
    /// Held already: answer it as a duplicate.
    Held,
    /// Another request is storing it right now and may still fail: the caller must retry, since
    /// answering "duplicate" could acknowledge an event that ends up not stored.
    InFlight,
}

/// What became of an accepted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Held for storage.
    Stored,
    /// Its client event id was accepted before (on this instance): answered, not stored again.
    Duplicate,
}

impl State {
    /// Turns a request DTO into a validated report, or a 400 naming the problem.
    pub fn validate<T: TryInto<EventReport, Error = String>>(&self, dto: T) -> Result<EventReport, ApiError> {
        dto.try_into().map_err(ApiError::bad_request)
    }

    /// Resolves the ad, stamps the event and buffers it. Ok means the event is held (or, for a
    /// repeated client event id, was held before).
    pub async fn accept(&self, report: EventReport, ip: std::net::IpAddr) -> Result<Accepted, ApiError> {
        self.known_ad(report.ad_id).await?;
        // A client id is claimed atomically, so that of two concurrent repeats only one is stored;
        // nothing awaits between the claim and the hold.
        if let Some(id) = report.event_id {
            match self.claim(id) {
                Claim::Fresh => {}
                Claim::Held => return Ok(Accepted::Duplicate),
                Claim::InFlight => return Err(self.in_flight(id)),
            }
        }
        let row = self.stamp(&report, OffsetDateTime::now_utc(), self.hasher.hash(ip));
        self.hold(vec![row], report.event_id.as_slice())?;
        Ok(Accepted::Stored)
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

    /// The address an event from `req` counts for (see [`client_ip`]); `stated` is an address
    /// the body claims.
    pub fn client_ip(&self, req: &Request, stated: Option<std::net::IpAddr>) -> std::net::IpAddr {
        client_ip::resolve(req, &self.trusted_proxies, &self.api_keys, stated)
    }

    /// Claims a client event id for this instance.
    pub fn claim(&self, id: Uuid) -> Claim {
        let entry = self.recent_event_ids.entry(id).or_default();
        if entry.is_fresh() {
            Claim::Fresh
        } else if entry.value().load(std::sync::atomic::Ordering::Acquire) {
            Claim::Held
        } else {
            Claim::InFlight
        }
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

    /// The row of an accepted report: the server's clock, the event id and the client-IP hash.
    pub fn stamp(&self, report: &EventReport, now: OffsetDateTime, ip_hash: u64) -> EventRow {
        let time = EventTime::resolve(report.client_time, now, self.max_clock_skew, self.max_event_age);
        if time.replaced {
            self.metrics.event_time_replaced.inc();
        }
        EventRow::from(Event {
            event_id: report.event_id.unwrap_or_else(Uuid::new_v4),
            ad_id: report.ad_id,
            kind: report.kind,
            event_time: time.at,
            received_at: now,
            ip_hash,
            playback_time: report.playback_time,
            error_code: report.error_code,
        })
    }

    /// Buffers rows, all or none. When none, the client ids in `claimed` are released, so that a
    /// retry with the same ids can store them.
    pub fn hold(&self, rows: Vec<EventRow>, claimed: &[Uuid]) -> Result<(), ApiError> {
        let count = rows.len() as u64;
        let mut per_kind = [0u64; EventKind::ALL.len()];
        for r in &rows {
            per_kind[r.kind.index()] += 1;
        }
        self.buffer.push(rows.into_iter()).map_err(|e| {
            for id in claimed {
                self.recent_event_ids.invalidate(id);
            }
            let reason = match e {
                PushError::Full => RejectReason::BufferFull,
                PushError::Closed => RejectReason::ShuttingDown,
            };
            for _ in 0..count {
                self.metrics.rejected(reason);
            }
            ApiError::push(e, self.retry_after)
        })?;
        for id in claimed {
            if let Some(flag) = self.recent_event_ids.get(id) {
                flag.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        for (kind, n) in EventKind::ALL.into_iter().zip(per_kind) {
            if n > 0 {
                self.metrics.accepted(kind, n);
            }
        }
        Ok(())
    }
}

/// The OpenAPI service over every operation.
pub fn openapi(
    state: Arc<State>,
) -> OpenApiService<(TrackingApi, BatchApi, PixelApi, AdsApi, AnalyticsApi, HealthApi), ()> {
    OpenApiService::new(
        (
            TrackingApi { state: state.clone() },
            BatchApi { state: state.clone() },
            PixelApi { state: state.clone() },
            AdsApi { state: state.clone() },
            AnalyticsApi { state: state.clone() },
            HealthApi { state },
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
    let cors = state.cors.clone();
    let api = openapi(state);
    let spec = api.spec();
    let routes = operation_routes(&spec);
    let allowed = error::AllowedMethods::from_spec(&spec);
    let other = Route::new().nest("/docs", api.swagger_ui()).at("/openapi.json", api.spec_endpoint());
    Front { api: api.into_endpoint(), other, metrics, routes, allowed, body_limit, batch_body_limit, cors }
}

/// What the front endpoint needs to know of an operation, read from the spec itself.
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
    other: O,
    metrics: Arc<Metrics>,
    routes: HashMap<String, OperationRoute>,
    allowed: error::AllowedMethods,
    body_limit: usize,
    batch_body_limit: usize,
    cors: cors::AllowedOrigins,
}

impl<A: Endpoint, O: Endpoint> Endpoint for Front<A, O> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> poem::Result<Response> {
        let started = Instant::now();
        let method = req.method().clone();
        if cors::is_preflight(&req) {
            let resp = cors::preflight(&self.cors, &req);
            let status = resp.status();
            self.metrics
                .http_requests
                .with_label_values(&[method.as_str(), "preflight", status.as_str()])
                .inc();
            return Ok(resp);
        }
        if let Some(resp) = cors::refuse(&self.cors, &req) {
            self.metrics.rejected(RejectReason::ForbiddenOrigin);
            self.metrics.http_requests.with_label_values(&[method.as_str(), "forbidden_origin", "403"]).inc();
            return Ok(resp);
        }
        let origin = req.headers().get(poem::http::header::ORIGIN).cloned();
        // For the Allow header of a 405; a Uri clone shares its bytes.
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
        req.set_data(BodyLimit(limit));
        let result = if docs {
            self.other.call(req).await.map(IntoResponse::into_response)
        } else {
            self.api.call(req).await.map(IntoResponse::into_response)
        };
        let mut resp = match result {
            Ok(resp) => error::into_json_error(resp).await,
            Err(e) => error::into_json_error(error::error_into_response(e)).await,
        };
        self.allowed.decorate(uri.path(), &mut resp);
        let route = resp.data::<poem_openapi::OperationId>().and_then(|op| self.routes.get(op.0));
        let tracking = route.is_some_and(|r| r.tracking);
        if tracking && origin.is_some() {
            cors::decorate(&self.cors, origin.as_ref(), &mut resp);
        }
        let path = route.map_or(fallback, |r| r.template.as_str());
        let status = resp.status();
        // Counted here, not in the handlers, so that bodies refused before a handler runs
        // (malformed JSON, too large) count too.
        if route.is_some_and(|r| r.tracking)
            && (status == StatusCode::BAD_REQUEST || status == StatusCode::PAYLOAD_TOO_LARGE)
        {
            self.metrics.rejected(RejectReason::Invalid);
        }
        self.metrics.http_requests.with_label_values(&[method.as_str(), path, status.as_str()]).inc();
        self.metrics.http_duration.with_label_values(&[path]).observe(started.elapsed().as_secs_f64());
        // 503 is back-pressure, expected under overload and counted above; logging each one would
        // flood the logs exactly when the machine has no time to spare.
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(method = %method, path, status = status.as_u16(), "request failed");
        }
        Ok(resp)
    }
}
