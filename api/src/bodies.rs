//! The shapes of the API's answers as its OpenAPI description documents
//! them (the handlers build the same JSON). Only types: no handler and no
//! route here, so the handlers' annotations and `openapi.rs` both name
//! them without naming each other.

use serde::Serialize;
use utoipa::ToSchema;

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
