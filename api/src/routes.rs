//! The route handlers, one per route, all of the same shape: extract,
//! check, call the job store, answer.

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use image_queue_pipeline::estimate::StartEstimate;
use image_queue_pipeline::jobs::{is_terminal, Cancelled};
use image_queue_pipeline::{NewImage, NewJob, Operation, Source, SubmitError};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Vendor;
use crate::error::ApiError;
use crate::ratelimit::{self, Check, RateState};
use crate::{upload, AppState};

/// A JSON body, refused in the API's own error shape: 415 without a JSON
/// content type, 413 over `max_json_bytes`, 400 if it is not JSON at all,
/// 422 if it is JSON of the wrong shape (unknown fields included).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType("send application/json".into()));
        }
        let body = read_limited(req, state.config.max_json_bytes).await?;
        parse_json(&body).map(JsonBody)
    }
}

/// A body of at most `limit` bytes, refused as soon as it is known to be
/// larger: by its declared length before a byte is read, or at the first
/// chunk that passes the limit, never read whole.
pub(crate) async fn read_limited(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::PayloadTooLarge(format!("bodies here are limited to {limit} bytes"));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = req.into_body().into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the request body failed: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::BadRequest(format!("malformed JSON: {e}"))
        } else {
            ApiError::Unprocessable(format!("invalid body: {e}"))
        }
    })
}

/// Query strings, refused in the API's own error shape.
pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::Unprocessable(format!("invalid query: {}", e.body_text())))
}

/// Counts one read of the caller's jobs against its limit.
pub(crate) async fn limit_reads(state: &AppState, vendor: &Vendor) -> Result<RateState, ApiError> {
    let checks = [Check {
        name: "status-reads",
        subject: vendor.0.clone(),
        limit: state.config.rate_limits.status_reads_per_vendor,
        cost: 1,
    }];
    ratelimit::check(state, &checks).await
}

fn with_rate(mut resp: Response, rs: &RateState) -> Response {
    rs.apply(&mut resp);
    resp
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonImage {
    pub url: String,
    pub record_id: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonJob {
    /// Any of bg-removal, face-crop, resize.
    pub operations: Vec<String>,
    pub images: Vec<JsonImage>,
}

pub(crate) fn parse_operations<'a>(ops: impl IntoIterator<Item = &'a str>) -> Result<Vec<Operation>, ApiError> {
    let mut out = Vec::new();
    for s in ops {
        let s = s.trim();
        if s.is_empty() {
            continue;
        }
        let op = Operation::parse(s).ok_or_else(|| {
            ApiError::Unprocessable(format!("unknown operation {s:?}: use bg-removal, face-crop or resize"))
        })?;
        if !out.contains(&op) {
            out.push(op);
        }
    }
    if out.is_empty() {
        return Err(ApiError::Unprocessable("at least one operation is required".into()));
    }
    Ok(out)
}

pub(crate) fn check_record_id(r: &str) -> Result<(), ApiError> {
    if r.is_empty() || r.len() > 255 {
        return Err(ApiError::Unprocessable(
            "each image needs a record_id of 1–255 characters".into(),
        ));
    }
    // A NUL is refused by PostgreSQL at commit, after the work is done;
    // control characters have no place in an id either.
    if r.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "record_id must not contain NUL or other control characters".into(),
        ));
    }
    Ok(())
}

fn check_url(state: &AppState, u: &str) -> Result<(), ApiError> {
    let ok = (u.starts_with("http://") || u.starts_with("https://")) && u.len() <= 2048;
    if !ok {
        return Err(ApiError::Unprocessable(format!(
            "image URLs must be http(s) and at most 2048 characters: {:.80}",
            u
        )));
    }
    // What is certain without resolving (an IP-literal host in a private
    // network) is refused here; names are checked again when fetched.
    state
        .config
        .url_policy
        .check_url(u)
        .map_err(|why| ApiError::Unprocessable(format!("image URL refused: {why}: {u:.80}")))
}

/// `POST /api/image-queue/jobs`: JSON with URLs, or multipart with files.
#[utoipa::path(post, path = "/api/image-queue/jobs", tag = "jobs",
    description = "Submit a job: JSON with image URLs, or multipart/form-data with `images` files, one `record_id` per image and `operations` (comma-separated). An `Idempotency-Key` header makes retries safe.",
    request_body(content = JsonJob, content_type = "application/json"),
    responses(
        (status = 202, description = "Queued", body = crate::bodies::Submitted),
        (status = 200, description = "An earlier submit with this Idempotency-Key made this job", body = crate::bodies::Submitted),
        (status = 400, description = "Malformed body, or a record_id with control characters", body = crate::bodies::ErrorBody),
        (status = 413, description = "Too many images, or an image too large", body = crate::bodies::ErrorBody),
        (status = 415, description = "Not JSON or multipart, or a file that is not an image", body = crate::bodies::ErrorBody),
        (status = 422, description = "Invalid job (unknown field or operation, bad URL), or an Idempotency-Key reused with a different request", body = crate::bodies::ErrorBody),
        (status = 401, description = "No valid API key", body = crate::bodies::ErrorBody),
        (status = 429, description = "Rate limited; see Retry-After and RateLimit", body = crate::bodies::ErrorBody),
        (status = 503, description = "Redis cannot take the job now (out of memory, loading); see Retry-After", body = crate::bodies::ErrorBody)
    ))]
pub async fn submit(
    State(state): State<AppState>,
    vendor: Vendor,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let idempotency_key = match headers.get("idempotency-key") {
        Some(v) => {
            let k = v
                .to_str()
                .map_err(|_| ApiError::BadRequest("Idempotency-Key must be text".into()))?;
            if k.is_empty() || k.len() > 200 {
                return Err(ApiError::BadRequest("Idempotency-Key must be 1–200 characters".into()));
            }
            Some(hex_of(k))
        }
        None => None,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let job_id = NewJob::new_id();
    let (operations, images) = if content_type.starts_with("application/json") {
        let JsonBody(job) = JsonBody::<JsonJob>::from_request(req, &state).await?;
        let ops = parse_operations(job.operations.iter().map(String::as_str))?;
        let mut images = Vec::new();
        for img in job.images {
            check_record_id(&img.record_id)?;
            check_url(&state, &img.url)?;
            images.push(NewImage {
                source: Source::Url(img.url),
                record_id: img.record_id,
            });
        }
        (ops, images)
    } else if content_type.starts_with("multipart/form-data") {
        upload::read_multipart(&state, &vendor, &job_id, req).await?
    } else {
        return Err(ApiError::UnsupportedMediaType(
            "send application/json (image URLs) or multipart/form-data (image files)".into(),
        ));
    };
    // From here on, a refusal removes what the upload stored.
    let drop_blobs = || async { state.blobs.delete_job(&job_id).await.ok() };
    if images.is_empty() {
        return Err(ApiError::Unprocessable("a job needs at least one image".into()));
    }
    if images.len() > state.config.max_images_per_job {
        drop_blobs().await;
        return Err(ApiError::PayloadTooLarge(format!(
            "a job holds at most {} images",
            state.config.max_images_per_job
        )));
    }
    let n = images.len();
    let fingerprint = request_fingerprint(&operations, &images);
    // A retry of a submit that already made its job is answered without
    // spending quota on it again (submit.lua settles races between retries).
    if let Some(key) = &idempotency_key {
        let existing = match state.jobs.idempotent_submit(&vendor.0, key).await {
            Ok(e) => e,
            Err(e) => {
                drop_blobs().await;
                return Err(e.into());
            }
        };
        if let Some(existing) = existing {
            drop_blobs().await;
            if existing.conflicts_with(Some(&fingerprint)) {
                return Err(reused_key());
            }
            return Ok(submitted_response(StatusCode::OK, &existing.job_id, n, None));
        }
    }
    let limits = &state.config.rate_limits;
    let mut checks = vec![Check {
        name: "submits",
        subject: vendor.0.clone(),
        limit: limits.submits_per_vendor,
        cost: 1,
    }];
    if operations.contains(&Operation::BgRemoval) {
        checks.push(Check {
            name: "bg-removal-images",
            subject: vendor.0.clone(),
            limit: limits.bg_removal_images_per_vendor,
            cost: n as u64,
        });
    }
    if n > limits.bulk_min_images {
        checks.push(Check {
            name: "bulk-jobs",
            subject: vendor.0.clone(),
            limit: limits.bulk_jobs_per_vendor,
            cost: 1,
        });
    }
    let rate = match ratelimit::check(&state, &checks).await {
        Ok(rs) => rs,
        Err(e) => {
            drop_blobs().await;
            return Err(e);
        }
    };
    let op_names: Vec<String> = operations.iter().map(|o| o.as_str().to_string()).collect();
    // Read before the job is queued: the images ahead of it are the
    // vendor's, whatever other vendors have queued.
    let estimate = match state.jobs.estimate_start(&vendor.0, &op_names).await {
        Ok(e) => e,
        Err(e) => {
            // An estimate is a courtesy; it never fails a submit.
            tracing::warn!(error = %e, "estimating a start time failed");
            None
        }
    };
    let submitted = state
        .jobs
        .submit(NewJob {
            id: job_id.clone(),
            vendor: vendor.0,
            operations,
            images,
            idempotency_key,
            fingerprint: Some(fingerprint),
            traceparent: headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(String::from),
        })
        .await;
    let submitted = match submitted {
        Ok(s) => s,
        Err(SubmitError::Redis(e)) => {
            // Refused by Redis (out of memory, loading, ...): no job was
            // made. A lost connection may have made it after all; then its
            // blobs stay, for the job or for the sweep.
            if !(e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) {
                drop_blobs().await;
            }
            return Err(e.into());
        }
        Err(e @ SubmitError::NotReplicated { .. }) => {
            // The primary has the job, a failover could lose it: not
            // accepted. Its blobs stay for it; the client's retry with the
            // same Idempotency-Key answers with this job once replicated.
            tracing::warn!(error = %e, "a submit was not confirmed by enough replicas");
            return Err(ApiError::Unavailable);
        }
    };
    if !submitted.created {
        // An earlier submit with the same key made the job; drop our blobs.
        drop_blobs().await;
        if submitted.conflicting {
            return Err(reused_key());
        }
    }
    let status = if submitted.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let estimate = estimate.filter(|_| submitted.created);
    Ok(with_rate(
        submitted_response(status, &submitted.job_id, n, estimate),
        &rate,
    ))
}

/// What a submit asked for, as the idempotency key's record keeps it: the
/// operations, and each image's record id and URL (an uploaded file counts
/// as a file, not by its bytes).
fn request_fingerprint(operations: &[Operation], images: &[NewImage]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for op in operations {
        h.update(op.as_str().as_bytes());
        h.update(b",");
    }
    for img in images {
        h.update(b"\n");
        h.update(img.record_id.as_bytes());
        h.update(b"\t");
        match &img.source {
            Source::Url(url) => h.update(url.as_bytes()),
            Source::Blob(_) => h.update(b"(a file)"),
        }
    }
    hex::encode(h.finalize())
}

/// An Idempotency-Key sent again with another request: Stripe's answer.
fn reused_key() -> ApiError {
    ApiError::Unprocessable(
        "this Idempotency-Key was used with a different request (operations, record ids or image URLs); use a new key for a new job".into(),
    )
}

fn submitted_response(status: StatusCode, job_id: &str, images: usize, estimate: Option<StartEstimate>) -> Response {
    let mut body = json!({
        "job_id": job_id,
        "status": "queued",
        "images": images,
        "status_url": format!("/api/image-queue/job/{job_id}"),
    });
    if let Some(e) = estimate {
        body["estimated_start"] = json!(e);
    }
    (status, Json(body)).into_response()
}

fn hex_of(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// `GET /api/image-queue/job/{id}`.
#[utoipa::path(get, path = "/api/image-queue/job/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job and its images", body = Object),
        (status = 404, description = "No such job of the caller's", body = crate::bodies::ErrorBody),
        (status = 401, description = "No valid API key", body = crate::bodies::ErrorBody),
        (status = 429, description = "Rate limited; see Retry-After and RateLimit", body = crate::bodies::ErrorBody)
    ))]
pub async fn get_job(
    State(state): State<AppState>,
    vendor: Vendor,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let rate = limit_reads(&state, &vendor).await?;
    let job = state.jobs.get(Some(&vendor.0), &id).await?.ok_or(ApiError::NotFound)?;
    Ok(with_rate(Json(job).into_response(), &rate))
}

/// `DELETE /api/image-queue/job/{id}`: cancel.
#[utoipa::path(delete, path = "/api/image-queue/job/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "Cancelled; the job as it now is", body = Object),
        (status = 404, description = "No such job of the caller's", body = crate::bodies::ErrorBody),
        (status = 409, description = "The job has already ended", body = crate::bodies::ErrorBody),
        (status = 401, description = "No valid API key", body = crate::bodies::ErrorBody),
        (status = 429, description = "Rate limited; see Retry-After and RateLimit", body = crate::bodies::ErrorBody)
    ))]
pub async fn cancel(
    State(state): State<AppState>,
    vendor: Vendor,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.jobs.cancel(&vendor.0, &id).await? {
        Cancelled::Yes => {}
        Cancelled::NotFound => return Err(ApiError::NotFound),
        Cancelled::AlreadyEnded => return Err(ApiError::Conflict("the job has already ended".into())),
    }
    let job = state.jobs.get(Some(&vendor.0), &id).await?.ok_or(ApiError::NotFound)?;
    Ok(Json(job).into_response())
}

/// `GET /api/image-queue/jobs?status=` accepts a job status or `active`
/// (any unfinished job).
const ACTIVE: &str = "active";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub status: Option<String>,
    pub cursor: Option<u64>,
    pub limit: Option<usize>,
}

/// `GET /api/image-queue/jobs?status=&cursor=`: the caller's own jobs,
/// newest first.
#[utoipa::path(get, path = "/api/image-queue/jobs", tag = "jobs",
    params(
        ("status" = Option<String>, Query, description = "A job status, or `active` for unfinished jobs"),
        ("cursor" = Option<u64>, Query, description = "The previous page's next_cursor"),
        ("limit" = Option<usize>, Query, description = "1–100, default 20"),
    ),
    responses(
        (status = 200, description = "`{jobs, next_cursor}`", body = Object),
        (status = 400, description = "An unknown status", body = crate::bodies::ErrorBody),
        (status = 401, description = "No valid API key", body = crate::bodies::ErrorBody),
        (status = 429, description = "Rate limited; see Retry-After and RateLimit", body = crate::bodies::ErrorBody)
    ))]
pub async fn list(
    State(state): State<AppState>,
    vendor: Vendor,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    // `status=` (empty) is no filter; an unknown status is a mistake to
    // report, not a filter that silently matches nothing.
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    if let Some(s) = status {
        if s != ACTIVE && image_queue_pipeline::JobStatus::parse(s).is_none() {
            let names: Vec<&str> = std::iter::once(ACTIVE)
                .chain(image_queue_pipeline::JobStatus::ALL.iter().map(|j| j.as_str()))
                .collect();
            return Err(ApiError::BadRequest(format!(
                "unknown status {s:?}: one of {}",
                names.join(", ")
            )));
        }
    }
    let rate = limit_reads(&state, &vendor).await?;
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let mut jobs = Vec::new();
    let mut cursor = q.cursor;
    let mut next = None;
    // Filtering by status may skip jobs: read pages until one is full.
    'pages: for _ in 0..10 {
        let ids = state.jobs.list_ids(&vendor.0, cursor, limit * 2).await?;
        if ids.is_empty() {
            break;
        }
        for (id, score) in &ids {
            cursor = Some(*score);
            if let Some(job) = state.jobs.get(Some(&vendor.0), id).await? {
                let wanted = match status {
                    None => true,
                    Some(ACTIVE) => !is_terminal(&job.status),
                    Some(s) => job.status == s,
                };
                if wanted {
                    jobs.push(job);
                    if jobs.len() == limit {
                        next = Some(*score);
                        break 'pages;
                    }
                }
            }
        }
        next = cursor;
    }
    let body = json!({"jobs": jobs, "next_cursor": if jobs.len() == limit { next } else { None }});
    Ok(with_rate(Json(body).into_response(), &rate))
}

pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
