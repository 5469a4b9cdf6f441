//! `GET /metrics` in Prometheus' text format, and the HTTP request metrics.
//!
//! The recorder is process-wide (the `metrics` facade has one), so it is
//! installed once, by [`install`], and everything in the process records
//! into it: the runner's event counters and handling times when stages run
//! in this process, and the request metrics below. Stream gauges (lag,
//! pending, consumers, retries, dead letters) describe Redis, not this
//! process, so they are refreshed from the stats on each scrape.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use image_queue_pipeline::stats;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::ApiError;
use crate::AppState;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder, once per process; later calls return
/// the same handle. Call it before starting stages so that no count is
/// recorded into the void.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let buckets = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
            .expect("the bucket list is not empty")
            .install_recorder()
            .expect("no other metrics recorder is installed");
        // Without the exporter's own HTTP listener nothing drains recorded
        // histogram samples into their buckets unless asked to.
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                upkeep.run_upkeep();
            })
            .expect("spawning a thread");
        image_queue_pipeline::metrics::describe();
        metrics::describe_counter!("image_queue_http_requests_total", "HTTP requests answered");
        for (name, help) in [
            (
                "image_queue_stage_lag",
                "Entries on a stage's stream not yet delivered to any worker",
            ),
            (
                "image_queue_stage_pending",
                "Entries delivered to a stage's workers and not yet finished",
            ),
            (
                "image_queue_stage_stream_length",
                "Entries on a stage's stream, finished ones not yet trimmed included",
            ),
            (
                "image_queue_stage_retrying",
                "Events waiting at a stage for a retry after a failed attempt",
            ),
            (
                "image_queue_stage_throttled",
                "Events waiting at a stage for their vendor's quota",
            ),
            (
                "image_queue_stage_live_workers",
                "Workers of a stage with a fresh heartbeat",
            ),
            (
                "image_queue_stage_oldest_pending_seconds",
                "Age of the oldest unfinished delivered entry",
            ),
            ("image_queue_dead_letters", "Entries in the dead-letter stream"),
            (
                "image_queue_worker_inference_ms",
                "A bg-removal worker's recent model run time per image, in milliseconds",
            ),
            (
                "image_queue_worker_images_per_second",
                "A bg-removal worker's recent images per second",
            ),
        ] {
            metrics::describe_gauge!(name, help);
        }
        metrics::describe_histogram!(
            "image_queue_http_request_seconds",
            metrics::Unit::Seconds,
            "Time to answer an HTTP request"
        );
        handle
    })
}

/// Counts and times every request, by method, route pattern and status.
/// The route is the pattern (`/api/image-queue/job/{id}`), never the raw
/// path, so job ids do not become label values.
pub async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("image_queue_http_requests_total",
        "method" => method.clone(), "route" => route.clone(), "status" => status)
    .increment(1);
    metrics::histogram!("image_queue_http_request_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// `GET /metrics`.
pub async fn scrape(State(state): State<AppState>) -> Result<Response, ApiError> {
    let handle = install();
    let s = stats::collect(state.jobs.pipeline()).await?;
    for st in &s.stages {
        let stage = st.stage.clone();
        metrics::gauge!("image_queue_stage_lag", "stage" => stage.clone()).set(st.lag as f64);
        metrics::gauge!("image_queue_stage_pending", "stage" => stage.clone()).set(st.pending as f64);
        metrics::gauge!("image_queue_stage_stream_length", "stage" => stage.clone()).set(st.length as f64);
        metrics::gauge!("image_queue_stage_retrying", "stage" => stage.clone()).set(st.retrying as f64);
        metrics::gauge!("image_queue_stage_throttled", "stage" => stage.clone()).set(st.throttled as f64);
        metrics::gauge!("image_queue_stage_live_workers", "stage" => stage.clone()).set(st.live_workers as f64);
        metrics::gauge!("image_queue_stage_oldest_pending_seconds", "stage" => stage)
            .set(st.oldest_pending_ms.unwrap_or(0) as f64 / 1000.0);
    }
    // What a worker measures of its own work (bg-removal: inference time
    // and rate, to size its pool by), per worker. The label is an opaque
    // tag of the consumer: who and where it runs needs the admin key.
    for w in &s.workers {
        let worker = worker_tag(&w.consumer);
        if let Some(ms) = w.measures.get("inference_ms") {
            metrics::gauge!("image_queue_worker_inference_ms", "stage" => w.stage.clone(), "worker" => worker.clone())
                .set(*ms);
        }
        if let Some(rate) = w.measures.get("images_per_s") {
            metrics::gauge!("image_queue_worker_images_per_second", "stage" => w.stage.clone(), "worker" => worker)
                .set(*rate);
        }
    }
    metrics::gauge!("image_queue_dead_letters").set(s.dead_letters as f64);
    if let Some(a) = &s.admission {
        metrics::gauge!("image_queue_admission_window").set(a.window as f64);
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        handle.render(),
    )
        .into_response())
}

/// A short opaque tag for a consumer name (FNV-1a), stable across API
/// processes, so one worker is one series without naming its host.
fn worker_tag(consumer: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in consumer.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}
