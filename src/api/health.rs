//! Operations endpoints: liveness, readiness and Prometheus metrics.

use std::sync::Arc;

use poem_openapi::{ApiResponse, Object, OpenApi, payload::Json, payload::PlainText};

use super::{ApiTags, State};

/// Liveness: the process answers.
#[derive(Debug, Object)]
#[oai(example)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// Readiness with the state of each dependency.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase", example)]
pub struct Readiness {
    /// `ready`; `degraded` (still taking events) when ClickHouse does not answer; `not_ready`
    /// when the buffer is full or the write-ahead log cannot be written.
    pub status: String,
    /// `ok` or `unavailable` (the cause is logged).
    pub clickhouse: String,
    /// `ok`, or `full` when new events would get 503.
    pub buffer: String,
    /// The write-ahead log (`ACK_MODE=wal`): `ok`, `failing` when it cannot be written (a full
    /// or broken disk: events get 503; the cause is logged), or `off` in the other modes.
    pub log: String,
    /// `ACK_MODE`: what a 2xx means (`buffered`, `wal`, `committed`).
    pub ack_mode: String,
    /// `api_keys`, or `open` when API_KEYS is empty and anyone may manage the catalog and read
    /// analytics.
    pub auth: String,
}

impl poem_openapi::types::Example for Health {
    fn example() -> Self {
        Health { status: "ok".into() }
    }
}

impl poem_openapi::types::Example for Readiness {
    fn example() -> Self {
        Readiness {
            status: "degraded".into(),
            clickhouse: "unavailable".into(),
            buffer: "ok".into(),
            log: "ok".into(),
            ack_mode: "wal".into(),
            auth: "api_keys".into(),
        }
    }
}

/// Answer of `GET /readyz`.
#[derive(Debug, ApiResponse)]
pub enum ReadyResponse {
    /// Ready to take traffic.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// Not ready; the body says which dependency fails.
    #[oai(status = 503)]
    NotReady(Json<Readiness>),
}

/// Answer of `GET /metrics`.
#[derive(Debug, ApiResponse)]
pub enum MetricsResponse {
    /// Prometheus text exposition format 0.0.4.
    #[oai(status = 200, content_type = "text/plain; version=0.0.4; charset=utf-8")]
    Ok(PlainText<String>),
}

/// Health and metrics operations.
pub struct HealthApi {
    /// Shared service state.
    pub state: Arc<State>,
}

#[OpenApi(tag = "ApiTags::Operations")]
impl HealthApi {
    /// Liveness.
    ///
    /// 200 while the process serves HTTP; it checks no dependency, so orchestrators do not restart
    /// a healthy process because ClickHouse is down.
    #[oai(path = "/healthz", method = "get", operation_id = "healthz")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health { status: "ok".into() })
    }

    /// Readiness.
    ///
    /// 200 while events can be taken: `"status": "ready"`, or `"degraded"` when ClickHouse does
    /// not answer (events wait in the buffer, analytics and catalog changes fail). 503
    /// `"not_ready"` once the buffer is full or the write-ahead log cannot be written. ClickHouse alone does not
    /// make an instance unready: every instance shares it, so an outage would take them all out
    /// of the load balancer together, refusing traffic their buffers could have held.
    #[oai(path = "/readyz", method = "get", operation_id = "readyz")]
    async fn readyz(&self) -> ReadyResponse {
        let clickhouse = match self.state.clickhouse.ping().await {
            Ok(()) => "ok".to_string(),
            Err(e) => {
                tracing::debug!(error = %e, "readiness: ClickHouse unavailable");
                "unavailable".to_string()
            }
        };
        let intake = &self.state.intake;
        let buffer = if intake.buffer.is_full() { "full" } else { "ok" }.to_string();
        let log = match (&intake.wal, intake.wal.as_ref().and_then(|w| w.failure())) {
            (None, _) => "off",
            (Some(_), None) => "ok",
            (Some(_), Some(_)) => "failing",
        }
        .to_string();
        let ready = buffer == "ok" && log != "failing";
        let status = match (ready, clickhouse == "ok") {
            (false, _) => "not_ready",
            (true, true) => "ready",
            (true, false) => "degraded",
        };
        let auth = if self.state.api_keys.is_open() { "open" } else { "api_keys" }.to_string();
        let ack_mode = intake.mode().name().to_string();
        let body = Readiness { status: status.into(), clickhouse, buffer, log, ack_mode, auth };
        if ready { ReadyResponse::Ready(Json(body)) } else { ReadyResponse::NotReady(Json(body)) }
    }

    /// Prometheus metrics.
    ///
    /// `http_requests_total{method,path,status}`, `http_request_duration_seconds{path}` and the
    /// `adbeacon_*` pipeline metrics.
    #[oai(path = "/metrics", method = "get", operation_id = "metrics")]
    async fn metrics(&self) -> MetricsResponse {
        MetricsResponse::Ok(PlainText(self.state.metrics.render()))
    }
}
