//! The route handlers, one per route, all of the same shape: extract,
//! check, call the job store, answer.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use image_queue_pipeline::blob::blob_key;
use image_queue_pipeline::estimate::StartEstimate;
use image_queue_pipeline::jobs::{is_terminal, Cancelled};
use image_queue_pipeline::{stats, NewImage, NewJob, Operation, Source};
use image_queue_stages::decode::{screen, sniff, ScreenError};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Vendor;
use crate::error::ApiError;
use crate::ratelimit::{self, Check, RateState};
use crate::AppState;

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
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::PayloadTooLarge(e.body_text()))?;
        parse_json(state, &body).map(JsonBody)
    }
}

fn parse_json<T: DeserializeOwned>(state: &AppState, body: &[u8]) -> Result<T, ApiError> {
    if body.len() > state.config.max_json_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "JSON bodies are limited to {} bytes",
            state.config.max_json_bytes
        )));
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::BadRequest(format!("malformed JSON: {e}"))
        } else {
            ApiError::Unprocessable(format!("invalid body: {e}"))
        }
    })
}

/// Query strings, refused in the API's own error shape.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
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

fn parse_operations<'a>(ops: impl IntoIterator<Item = &'a str>) -> Result<Vec<Operation>, ApiError> {
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

fn check_record_id(r: &str) -> Result<(), ApiError> {
    if r.is_empty() || r.len() > 255 {
        return Err(ApiError::Unprocessable(
            "each image needs a record_id of 1–255 characters".into(),
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

/// How much of each upload's start is kept for screening: enough for any
/// header we accept but the rare JPEG with huge metadata (left to the
/// pipeline's decoder).
const SCREEN_HEAD_BYTES: usize = 64 * 1024;

/// `POST /api/image-queue/jobs`: JSON with URLs, or multipart with files.
#[utoipa::path(post, path = "/api/image-queue/jobs", tag = "jobs",
    description = "Submit a job: JSON with image URLs, or multipart/form-data with `images` files, one `record_id` per image and `operations` (comma-separated). An `Idempotency-Key` header makes retries safe.",
    request_body(content = JsonJob, content_type = "application/json"),
    responses(
        (status = 202, description = "Queued", body = crate::openapi::Submitted),
        (status = 200, description = "An earlier submit with this Idempotency-Key made this job", body = crate::openapi::Submitted),
        (status = 400, description = "Malformed body", body = crate::openapi::ErrorBody),
        (status = 413, description = "Too many images, or an image too large", body = crate::openapi::ErrorBody),
        (status = 415, description = "Not JSON or multipart, or a file that is not an image", body = crate::openapi::ErrorBody),
        (status = 422, description = "Invalid job (unknown field or operation, bad URL)", body = crate::openapi::ErrorBody),
        (status = 401, description = "No valid API key", body = crate::openapi::ErrorBody),
        (status = 429, description = "Rate limited; see Retry-After and RateLimit", body = crate::openapi::ErrorBody)
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
        let mut multipart = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        read_multipart(&state, &job_id, &mut multipart).await?
    } else {
        return Err(ApiError::UnsupportedMediaType(
            "send application/json (image URLs) or multipart/form-data (image files)".into(),
        ));
    };
    if images.is_empty() {
        return Err(ApiError::Unprocessable("a job needs at least one image".into()));
    }
    if images.len() > state.config.max_images_per_job {
        return Err(ApiError::PayloadTooLarge(format!(
            "a job holds at most {} images",
            state.config.max_images_per_job
        )));
    }
    let n = images.len();
    // A retry of a submit that already made its job is answered without
    // spending quota on it again (submit.lua settles races between retries).
    if let Some(key) = &idempotency_key {
        if let Some(existing) = state.jobs.idempotent_job(&vendor.0, key).await? {
            state.blobs.delete_job(&job_id).await.ok();
            return Ok(submitted_response(StatusCode::OK, &existing, n, None));
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
            state.blobs.delete_job(&job_id).await.ok();
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
            fingerprint: None,
            traceparent: headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(String::from),
        })
        .await?;
    if !submitted.created {
        // An earlier submit with the same key made the job; drop our blobs.
        state.blobs.delete_job(&job_id).await.ok();
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

fn not_an_image(index: usize, why: &str) -> ApiError {
    ApiError::UnsupportedMediaType(format!("file {}: {why}", index + 1))
}

async fn read_multipart(
    state: &AppState,
    job_id: &str,
    multipart: &mut Multipart,
) -> Result<(Vec<Operation>, Vec<NewImage>), ApiError> {
    let mut ops_field = None;
    let mut record_ids = Vec::new();
    let mut blobs = Vec::new();
    let max = state.config.max_image_bytes;
    let bad = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("images are limited to {max} bytes each"))
        } else {
            ApiError::BadRequest(format!("malformed multipart body: {}", e.body_text()))
        }
    };
    let result = async {
        while let Some(mut field) = multipart.next_field().await.map_err(bad)? {
            match field.name().unwrap_or("") {
                "operations" => ops_field = Some(field.text().await.map_err(bad)?),
                "record_id" => record_ids.push(field.text().await.map_err(bad)?),
                "images" => {
                    if blobs.len() >= state.config.max_images_per_job {
                        return Err(ApiError::PayloadTooLarge(format!(
                            "a job holds at most {} images",
                            state.config.max_images_per_job
                        )));
                    }
                    // Streamed to the blob store as it arrives: a job of
                    // 100 images of 25 MB never sits in memory. The first
                    // bytes decide whether it is an image at all.
                    let index = blobs.len();
                    let key = blob_key(job_id, index as u32, "original");
                    let stored = |e: std::io::Error| ApiError::Internal(format!("storing an upload: {e}"));
                    let mut writer = state.blobs.writer(&key).await.map_err(stored)?;
                    let mut head = Vec::with_capacity(4096);
                    let mut tail: Vec<u8> = Vec::with_capacity(32);
                    let mut size = 0u64;
                    while let Some(chunk) = field.chunk().await.map_err(bad)? {
                        size += chunk.len() as u64;
                        if size > max {
                            return Err(ApiError::PayloadTooLarge(format!(
                                "images are limited to {max} bytes each"
                            )));
                        }
                        if head.len() < SCREEN_HEAD_BYTES {
                            let was = head.len();
                            head.extend_from_slice(&chunk[..chunk.len().min(SCREEN_HEAD_BYTES - was)]);
                            // Refuse a non-image at its first bytes, not at its end.
                            if was < 16 && head.len() >= 16 && sniff(&head).is_none() {
                                return Err(not_an_image(index, "not a JPEG, PNG, WebP or GIF image"));
                            }
                        }
                        tail.extend_from_slice(&chunk[chunk.len().saturating_sub(16)..]);
                        tail.drain(..tail.len().saturating_sub(16));
                        writer.write(&chunk).await.map_err(stored)?;
                    }
                    screen(&head, &tail, size, &state.config.decode).map_err(|e| match e {
                        ScreenError::Unsupported(why) => not_an_image(index, &why),
                        ScreenError::Invalid(why) => ApiError::Unprocessable(format!("file {}: {why}", index + 1)),
                    })?;
                    writer.commit().await.map_err(stored)?;
                    blobs.push(key);
                }
                other => {
                    return Err(ApiError::Unprocessable(format!(
                        "unknown field {other:?}: send images, record_id and operations"
                    )))
                }
            }
        }
        Ok(())
    }
    .await;
    let fail = |e| async {
        state.blobs.delete_job(job_id).await.ok();
        Err(e)
    };
    if let Err(e) = result {
        return fail(e).await;
    }
    let ops = match parse_operations(ops_field.as_deref().unwrap_or("").split(',')) {
        Ok(o) => o,
        Err(e) => return fail(e).await,
    };
    if record_ids.len() != blobs.len() {
        return fail(ApiError::Unprocessable(format!(
            "{} images but {} record_id fields: send one record_id per image, in order",
            blobs.len(),
            record_ids.len()
        )))
        .await;
    }
    for r in &record_ids {
        if let Err(e) = check_record_id(r) {
            return fail(e).await;
        }
    }
    let images = blobs
        .into_iter()
        .zip(record_ids)
        .map(|(key, record_id)| NewImage {
            source: Source::Blob(key),
            record_id,
        })
        .collect();
    Ok((ops, images))
}

/// `GET /api/image-queue/job/{id}`.
#[utoipa::path(get, path = "/api/image-queue/job/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job and its images", body = Object),
        (status = 404, description = "No such job of the caller's", body = crate::openapi::ErrorBody),
        (status = 401, description = "No valid API key", body = crate::openapi::ErrorBody),
        (status = 429, description = "Rate limited; see Retry-After and RateLimit", body = crate::openapi::ErrorBody)
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
        (status = 404, description = "No such job of the caller's", body = crate::openapi::ErrorBody),
        (status = 409, description = "The job has already ended", body = crate::openapi::ErrorBody),
        (status = 401, description = "No valid API key", body = crate::openapi::ErrorBody),
        (status = 429, description = "Rate limited; see Retry-After and RateLimit", body = crate::openapi::ErrorBody)
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

/// What `GET /api/image-queue/jobs?status=` accepts.
const JOB_STATUSES: [&str; 7] = [
    "active",
    "queued",
    "processing",
    "completed",
    "failed",
    "partially_failed",
    "cancelled",
];

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
        (status = 400, description = "An unknown status", body = crate::openapi::ErrorBody),
        (status = 401, description = "No valid API key", body = crate::openapi::ErrorBody),
        (status = 429, description = "Rate limited; see Retry-After and RateLimit", body = crate::openapi::ErrorBody)
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
        if !JOB_STATUSES.contains(&s) {
            return Err(ApiError::BadRequest(format!(
                "unknown status {s:?}: one of {}",
                JOB_STATUSES.join(", ")
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
                    Some("active") => !is_terminal(&job.status),
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

/// `GET /api/image-queue/queue-stats`: per-stage stream figures.
pub async fn queue_stats(State(state): State<AppState>) -> Result<Response, ApiError> {
    let s = stats::collect(state.jobs.pipeline()).await?;
    Ok(Json(s).into_response())
}

/// `GET /api/worker/health`: live workers; 503 if a stage has work and no
/// live worker.
pub async fn worker_health(State(state): State<AppState>) -> Result<Response, ApiError> {
    let s = stats::collect(state.jobs.pipeline()).await?;
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
    Ok((
        status,
        Json(json!({"healthy": starved.is_empty(), "stages_without_workers": starved, "workers": s.workers})),
    )
        .into_response())
}

pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready when Redis answers.
pub async fn readyz(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut conn = state.jobs.pipeline().conn.clone();
    let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    Ok(Json(json!({"status": "ready"})).into_response())
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
