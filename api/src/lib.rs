//! The HTTP API of image-queue: vendors submit jobs and follow them;
//! operators read the pipeline's stats.
//!
//! [`app`] builds the whole router from its state, so tests drive it without
//! a socket. Every error is an [`ApiError`]: one JSON shape, the right
//! status, and internal details logged, never shown.

pub mod auth;
pub mod dashboard;
pub mod error;
pub mod metrics;
pub mod ops;
pub mod routes;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use image_queue_pipeline::{BlobStore, JobStore};
use serde::{Deserialize, Serialize};

pub use auth::{Auth, Vendor};
pub use error::ApiError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Largest image accepted, in bytes.
    pub max_image_bytes: u64,
    /// Most images in one job.
    pub max_images_per_job: usize,
    /// Largest JSON body, in bytes.
    pub max_json_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_image_bytes: 25 * 1024 * 1024,
            max_images_per_job: 100,
            max_json_bytes: 1024 * 1024,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub jobs: JobStore,
    pub blobs: Arc<dyn BlobStore>,
    pub auth: Auth,
    pub config: ApiConfig,
    /// Where the local upload backend puts results, served under `/media`.
    pub media_dir: Option<PathBuf>,
}

pub fn app(state: AppState) -> Router {
    let body_limit = (state.config.max_image_bytes as usize)
        .saturating_mul(state.config.max_images_per_job)
        .saturating_add(1024 * 1024);
    let mut router = Router::new()
        .route("/api/image-queue/jobs", post(routes::submit).get(routes::list))
        .route("/api/image-queue/job/{id}", get(routes::get_job).delete(routes::cancel))
        .route("/api/image-queue/queue-stats", get(routes::queue_stats))
        .route("/api/worker/health", get(routes::worker_health))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/api/admin/dlq", get(ops::list).delete(ops::purge))
        .route("/api/admin/dlq/{id}", get(ops::show).delete(ops::delete))
        .route("/api/admin/dlq/{id}/replay", post(ops::replay))
        .route("/api/admin/job/{id}", get(ops::job))
        .route("/metrics", get(metrics::scrape))
        .merge(dashboard::routes())
        .fallback(routes::not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(metrics::track));
    if let Some(dir) = &state.media_dir {
        router = router.nest_service("/media", tower_http::services::ServeDir::new(dir));
    }
    router.with_state(state)
}
