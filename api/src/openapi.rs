//! The API's OpenAPI description, served at `/openapi.json` and generated
//! from the handlers' own annotations so it cannot drift from the routes.

use axum::Json;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Every error: `{"error": {"code": ..., "message": ...}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable, e.g. `not_found`, `rate_limited`.
    pub code: String,
    pub message: String,
}

/// The answer to a submit.
#[derive(Serialize, ToSchema)]
pub struct Submitted {
    pub job_id: String,
    pub status: String,
    pub images: usize,
    pub status_url: String,
    /// When the job's first image is expected to start; absent when the
    /// pipeline has not measured its throughput yet. The job's status
    /// carries the same while the job waits.
    pub estimated_start: Option<EstimatedStart>,
}

/// A start estimate: the vendor's own queue ahead, drained at the vendor's
/// fair share of the measured throughput, or a used-up quota's refill.
#[derive(Serialize, ToSchema)]
pub struct EstimatedStart {
    /// Milliseconds since the epoch.
    pub start_ms: u64,
    /// The vendor's images queued ahead.
    pub queued_ahead: u64,
    /// The vendor's share of the pipeline (weight over the weights of
    /// vendors with images waiting).
    pub share: f64,
    /// Images per second the pipeline finished lately.
    pub throughput: f64,
    /// Present when a used-up processing quota decides the start.
    pub quota_resumes_ms: Option<u64>,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "image-queue", description = "Image processing jobs for marketplace vendors"),
    paths(
        crate::routes::submit,
        crate::routes::list,
        crate::routes::get_job,
        crate::routes::cancel,
        crate::events::job_events,
        crate::admin::dead_letters,
        crate::admin::add_vendor,
        crate::webhook::set,
        crate::webhook::get,
        crate::webhook::remove,
    ),
    components(schemas(ErrorBody, ErrorDetail, Submitted, EstimatedStart, crate::routes::JsonJob, crate::routes::JsonImage, crate::admin::NewVendor, crate::webhook::SetWebhook)),
    modifiers(&BearerAuth),
    security(("api_key" = [])),
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn spec() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
