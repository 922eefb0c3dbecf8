//! Operations endpoints: liveness, readiness and Prometheus metrics.

use std::{sync::Arc, time::Duration};

use poem_openapi::{ApiResponse, Object, OpenApi, payload::Json, payload::PlainText};

use super::{ApiTags, State};
use crate::ingest::RedisState;

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
    /// `ready`; `degraded` (still taking events) when ClickHouse or Redis does not answer;
    /// `not_ready` when the buffer is full, the write-ahead log cannot be written or Redis may
    /// evict keys.
    pub status: String,
    /// `ok` or `unavailable` (the cause is logged).
    pub clickhouse: String,
    /// The Redis spill: `ok`, `unavailable` (batches ClickHouse cannot take stay in memory and
    /// the log), `evicting` (its maxmemory-policy is not noeviction: refused), or `off`
    /// (REDIS_URL is none).
    pub redis: String,
    /// Events in the Redis spill waiting for replay (all instances); null when Redis
    /// does not answer.
    #[oai(nullable)]
    pub spill_backlog: Option<u64>,
    /// Entries in the dead-letter stream; null when Redis does not answer.
    #[oai(nullable)]
    pub dead_letters: Option<u64>,
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
            redis: "ok".into(),
            spill_backlog: Some(120_000),
            dead_letters: Some(0),
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

/// How long `/readyz` waits for each dependency: well inside a readiness probe's timeout.
const READY_CHECK: Duration = Duration::from_secs(1);

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
    /// 200 while events can be taken: `"status": "ready"`, or `"degraded"` when ClickHouse or
    /// Redis does not answer (events go to the spill, or wait in the buffer; analytics and
    /// catalog changes fail). 503 `"not_ready"` once the buffer is full, the write-ahead log
    /// cannot be written, or Redis may evict keys. ClickHouse alone does not make an instance
    /// unready: every instance shares it, so an outage would take them all out of the load
    /// balancer together, refusing traffic their spill could have held. The body also carries
    /// the spill backlog (events waiting for replay) and the dead letters.
    #[oai(path = "/readyz", method = "get", operation_id = "readyz")]
    async fn readyz(&self) -> ReadyResponse {
        // Both dependencies at once, each within READY_CHECK: a ClickHouse or Redis that drops
        // packets instead of refusing them would otherwise hold the answer for their query
        // timeouts, past an orchestrator's probe timeout (3 s in deploy/k8s), and every instance
        // would leave the load balancer together.
        let clickhouse = async {
            match tokio::time::timeout(READY_CHECK, self.state.clickhouse.ping()).await {
                Ok(Ok(())) => "ok".to_string(),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "readiness: ClickHouse unavailable");
                    "unavailable".to_string()
                }
                Err(_) => {
                    tracing::debug!("readiness: ClickHouse did not answer within {READY_CHECK:?}");
                    "unavailable".to_string()
                }
            }
        };
        let redis = async {
            let Some(spill) = &self.state.spill else { return (RedisState::Unavailable, None, None) };
            let checked = async {
                let state = spill.check().await;
                let backlog = match state {
                    RedisState::Ok => spill.backlog().await.ok().map(|(_, events)| events),
                    _ => None,
                };
                let dead = match state {
                    RedisState::Ok => self.state.dead_letters.count().await.ok(),
                    _ => None,
                };
                (state, backlog, dead)
            };
            tokio::time::timeout(READY_CHECK, checked).await.unwrap_or((RedisState::Unavailable, None, None))
        };
        let (clickhouse, (redis, spill_backlog, dead_letters)) = tokio::join!(clickhouse, redis);
        let intake = &self.state.intake;
        let buffer = if intake.buffer.is_full() { "full" } else { "ok" }.to_string();
        let log = match (&intake.wal, intake.wal.as_ref().and_then(|w| w.failure())) {
            (None, _) => "off",
            (Some(_), None) => "ok",
            (Some(_), Some(_)) => "failing",
        }
        .to_string();
        let redis_word = if self.state.spill.is_none() { "off" } else { redis.name() };
        let ready = buffer == "ok" && log != "failing" && !matches!(redis, RedisState::Evicting(_));
        let healthy = clickhouse == "ok" && matches!(redis_word, "ok" | "off");
        let status = match (ready, healthy) {
            (false, _) => "not_ready",
            (true, true) => "ready",
            (true, false) => "degraded",
        };
        let auth = if self.state.api_keys.is_open() { "open" } else { "api_keys" }.to_string();
        let ack_mode = intake.mode().name().to_string();
        let body = Readiness {
            status: status.into(),
            clickhouse,
            redis: redis_word.into(),
            spill_backlog,
            dead_letters,
            buffer,
            log,
            ack_mode,
            auth,
        };
        if ready { ReadyResponse::Ready(Json(body)) } else { ReadyResponse::NotReady(Json(body)) }
    }

    /// Prometheus metrics.
    ///
    /// `http_requests_total{method,path,status}`, `http_request_duration_seconds{path}` and the
    /// `adbeacon_*` pipeline metrics.
    #[oai(path = "/metrics", method = "get", operation_id = "metrics")]
    async fn metrics(&self) -> MetricsResponse {
        let metrics = &self.state.metrics;
        metrics.clickhouse_up.set(i64::from(self.state.insert_health.ok()));
        // Off the request threads and bounded: a failing disk can make even a directory listing
        // hang (the gauge then keeps its last value).
        if let Some(files) = self.state.dead_letters.count_files(Duration::from_secs(1)).await {
            metrics.dead_letter_files.set(i64::try_from(files).unwrap_or(i64::MAX));
        }
        MetricsResponse::Ok(PlainText(metrics.render()))
    }
}
