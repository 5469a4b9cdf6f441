//! The pipeline's figures for load balancers and operators: queue stats,
//! worker health and readiness.
//!
//! Anyone may read the per-stage figures a load balancer or an autoscaler
//! needs; vendor names, host names, pids and consumer names need the admin
//! key. Collecting the figures scans the streams, so one collection serves
//! every caller for `stats_cache_ms`: a flood of requests costs Redis one
//! scan per period, whoever sends it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use image_queue_pipeline::stats::{self, PipelineStats};
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use crate::error::ApiError;
use crate::AppState;

/// The last figures collected, shared by the process's requests. The lock
/// is held while collecting, so concurrent callers wait for one collection
/// instead of each starting their own.
#[derive(Clone, Default)]
pub struct StatsCache(Arc<Mutex<Option<Collected>>>);

/// Figures and when they were collected.
type Collected = (Instant, Arc<PipelineStats>);

impl StatsCache {
    async fn get(&self, state: &AppState) -> Result<Arc<PipelineStats>, ApiError> {
        let ttl = Duration::from_millis(state.config.stats_cache_ms);
        let mut slot = self.0.lock().await;
        if let Some((at, s)) = slot.as_ref() {
            if at.elapsed() < ttl {
                return Ok(s.clone());
            }
        }
        let s = Arc::new(stats::collect(state.jobs.pipeline()).await?);
        *slot = Some((Instant::now(), s.clone()));
        Ok(s)
    }
}

/// The per-stage figures anyone may read: nothing in them names a vendor,
/// a host, a process or a consumer.
const PUBLIC_STAGE_FIELDS: [&str; 13] = [
    "stage",
    "length",
    "lag",
    "pending",
    "oldest_pending_ms",
    "live_workers",
    "retrying",
    "throttled",
    "throughput_1m",
    "throughput_5m",
    "failures_5m",
    "totals",
    "advice",
];

/// The stats without what only operators may see. Built from an allow
/// list, so a field added to the stats later stays private until listed.
fn public_view(s: &PipelineStats) -> Result<Value, ApiError> {
    let full = serde_json::to_value(s).map_err(|e| ApiError::Internal(format!("stats: {e}")))?;
    let stages: Vec<Value> = full["stages"]
        .as_array()
        .map(|stages| {
            stages
                .iter()
                .map(|st| {
                    let kept: Map<String, Value> = PUBLIC_STAGE_FIELDS
                        .iter()
                        .filter_map(|k| st.get(*k).map(|v| (k.to_string(), v.clone())))
                        .collect();
                    Value::Object(kept)
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(json!({
        "collected_ms": full["collected_ms"],
        "stages": stages,
        "dead_letters": full["dead_letters"],
    }))
}

/// `GET /api/image-queue/queue-stats`: per-stage stream figures; with the
/// admin key also consumers, workers and per-vendor backlogs.
pub async fn queue_stats(
    State(state): State<AppState>,
    Extension(cache): Extension<StatsCache>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let s = cache.get(&state).await?;
    if state.auth.is_admin_request(&headers) {
        return Ok(Json(&*s).into_response());
    }
    Ok(Json(public_view(&s)?).into_response())
}

/// `GET /api/worker/health`: 503 if a stage has work and no live worker,
/// or Redis refuses writes (then no worker can move anything on).
/// Live workers are counted per stage; who they are (consumer, host, pid)
/// needs the admin key.
pub async fn worker_health(
    State(state): State<AppState>,
    Extension(cache): Extension<StatsCache>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Err(e) = state.jobs.pipeline().probe_writable().await {
        tracing::warn!(error = %e, "workers unhealthy: redis refused the probe");
        return Err(ApiError::Unavailable);
    }
    let s = cache.get(&state).await?;
    let mut live: HashMap<&str, usize> = HashMap::new();
    for w in &s.workers {
        *live.entry(w.stage.as_str()).or_default() += 1;
    }
    let starved: Vec<&str> = s
        .stages
        .iter()
        .filter(|st| (st.lag > 0 || st.pending > 0) && !live.contains_key(st.stage.as_str()))
        .map(|st| st.stage.as_str())
        .collect();
    let status = if starved.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "healthy": starved.is_empty(),
        "stages_without_workers": starved,
        "live_workers": live,
    });
    if state.auth.is_admin_request(&headers) {
        body["workers"] = json!(s.workers);
    }
    Ok((status, Json(body)).into_response())
}

/// `GET /readyz`: ready when Redis answers and takes a write. A Redis out
/// of memory, loading, read-only or refusing our credentials answers PING
/// all the same, and would fail every submit.
pub async fn readyz(State(state): State<AppState>) -> Result<Response, ApiError> {
    if let Err(e) = state.jobs.pipeline().probe_writable().await {
        // Whatever the refusal, this process cannot serve: not ready.
        tracing::warn!(error = %e, "not ready: redis refused the probe");
        return Err(ApiError::Unavailable);
    }
    Ok(Json(json!({"status": "ready"})).into_response())
}
