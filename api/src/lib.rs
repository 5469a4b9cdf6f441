//! The HTTP API of image-queue: vendors submit jobs and follow them;
//! operators read the pipeline's stats.
//!
//! [`app`] builds the whole router from its state, so tests drive it without
//! a socket. Every error is an [`ApiError`]: one JSON shape, the right
//! status, and internal details logged, never shown.

pub mod admin;
pub mod auth;
pub mod bodies;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod ops;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod upload;
pub mod webhook;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::{Extension, Router};
use image_queue_pipeline::{BlobStore, JobStore};
use image_queue_stages::decode::DecodeLimits;
use image_queue_stages::fetch::AddressPolicy;
use serde::{Deserialize, Serialize};

pub use auth::{Auth, Vendor};
pub use error::ApiError;
pub use events::ProgressHub;
pub use ratelimit::{Limit, RateLimitConfig};
pub use server::{serve, ServerConfig};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Largest image accepted, in bytes.
    pub max_image_bytes: u64,
    /// Most images in one job.
    pub max_images_per_job: usize,
    /// Largest JSON body, in bytes; every route but a multipart submit is
    /// held to it while the body streams in.
    pub max_json_bytes: usize,
    /// Event streams one vendor may hold open at once, per API process.
    pub max_event_streams_per_vendor: usize,
    /// How long one collection of queue stats serves every caller.
    pub stats_cache_ms: u64,
    pub rate_limits: RateLimitConfig,
    /// Connection limits and timeouts of the HTTP server.
    pub server: ServerConfig,
    /// The limits uploads are screened against at the door (the binary
    /// sets them from its `decode` section).
    #[serde(skip)]
    pub decode: DecodeLimits,
    /// Which image URLs are refused at the door (the binary sets it from
    /// its `fetch` section; the default admits no private address).
    #[serde(skip)]
    pub url_policy: AddressPolicy,
}

/// What can be wrong with the API's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ApiConfigError {
    #[error("api.rate_limits.trusted_proxies: {entry:?} is neither an address nor a network")]
    TrustedProxy {
        entry: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("api.server: timeouts must be at least 1 ms")]
    ZeroTimeout,
    #[error("api.server.max_connections must be at least 1")]
    NoConnections,
}

impl ApiConfig {
    /// Refuses a configuration that could only fail later, per request.
    pub fn validate(&self) -> Result<(), ApiConfigError> {
        self.rate_limits.trusted()?;
        self.server.validate()?;
        Ok(())
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_image_bytes: 25 * 1024 * 1024,
            max_images_per_job: 100,
            max_json_bytes: 1024 * 1024,
            max_event_streams_per_vendor: 10,
            stats_cache_ms: 1_000,
            rate_limits: RateLimitConfig::default(),
            server: ServerConfig::default(),
            decode: DecodeLimits::default(),
            url_policy: AddressPolicy::default(),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub jobs: JobStore,
    pub blobs: Arc<dyn BlobStore>,
    pub auth: Auth,
    pub config: ApiConfig,
    /// This process's subscriber to job progress, for live event streams.
    pub progress: ProgressHub,
    /// Where the local upload backend puts results, served under `/media`.
    pub media_dir: Option<PathBuf>,
}

pub fn app(state: AppState) -> Router {
    // Only a multipart submit may be large, and its files go to the blob
    // store as they arrive; every other body is held to `max_json_bytes`.
    let upload_limit = (state.config.max_image_bytes as usize)
        .saturating_mul(state.config.max_images_per_job)
        .saturating_add(1024 * 1024);
    let submit = routes::submit.layer(DefaultBodyLimit::max(upload_limit));
    let mut router = Router::new()
        .route("/api/image-queue/jobs", post(submit).get(routes::list))
        .route("/api/image-queue/job/{id}", get(routes::get_job).delete(routes::cancel))
        .route("/api/image-queue/job/{id}/events", get(events::job_events))
        .route(
            "/api/image-queue/webhook",
            get(webhook::get).put(webhook::set).delete(webhook::remove),
        )
        .route("/api/image-queue/queue-stats", get(health::queue_stats))
        .route("/api/worker/health", get(health::worker_health))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(openapi::spec))
        .route("/api/admin/dead-letters", get(admin::dead_letters))
        .route("/api/admin/vendors", post(admin::add_vendor))
        .route("/api/admin/dlq", get(ops::list).delete(ops::purge))
        .route("/api/admin/dlq/{id}", get(ops::show).delete(ops::delete))
        .route("/api/admin/dlq/{id}/replay", post(ops::replay))
        .route("/api/admin/job/{id}", get(ops::job))
        .route("/metrics", get(metrics::scrape))
        .merge(dashboard::routes())
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_json_bytes))
        // Per process: one router is one API process's.
        .layer(Extension(events::OpenStreams::default()))
        .layer(Extension(health::StatsCache::default()))
        .layer(from_fn_with_state(state.clone(), ratelimit::limit_writes))
        .layer(axum::middleware::from_fn(metrics::track));
    if let Some(dir) = &state.media_dir {
        router = router.nest_service("/media", tower_http::services::ServeDir::new(dir));
    }
    router.with_state(state)
}
