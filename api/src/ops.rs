//! Operator routes under `/api/admin/`: dead letters (list, show, replay,
//! delete, purge) and looking up any vendor's job. All need the admin key;
//! a vendor key is refused with 403.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use image_queue_pipeline::dlq::{self, Filter, ReplayError};
use image_queue_pipeline::StageName;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Admin;
use crate::error::ApiError;
use crate::routes::{parse_json, read_limited};
use crate::AppState;

/// The filters of the dead-letter routes, as query parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqQuery {
    pub stage: Option<String>,
    pub vendor: Option<String>,
    pub job: Option<String>,
    /// Text the error must contain (case-insensitive).
    pub error: Option<String>,
    /// Failed at least this many seconds ago.
    pub older_than_s: Option<u64>,
    /// Failed at most this many seconds ago.
    pub newer_than_s: Option<u64>,
    pub limit: Option<usize>,
    /// Purging with no filter at all needs `all=true`.
    pub all: Option<bool>,
}

fn parse_stage(s: &str) -> Result<StageName, ApiError> {
    StageName::parse(s).ok_or_else(|| {
        ApiError::Unprocessable(format!(
            "no stage {s:?}: rate-check, bg-removal, face-crop, resize, upload or db-commit"
        ))
    })
}

impl DlqQuery {
    fn filter(&self) -> Result<Filter, ApiError> {
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        Ok(Filter {
            stage: nonempty(&self.stage).as_deref().map(parse_stage).transpose()?,
            vendor: nonempty(&self.vendor),
            job: nonempty(&self.job),
            error: nonempty(&self.error),
            older_than_ms: self.older_than_s.map(|s| s.saturating_mul(1000)),
            newer_than_ms: self.newer_than_s.map(|s| s.saturating_mul(1000)),
        })
    }
}

/// A query that does not parse (a number that is not one, an unknown
/// parameter) is the client's error, answered in the API's error shape.
fn bad_query(q: Result<Query<DlqQuery>, QueryRejection>) -> Result<DlqQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))
}

fn no_such_dead_letter() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"code": "not_found", "message": "no such dead letter"}})),
    )
        .into_response()
}

/// `GET /api/admin/dlq?stage=&vendor=&job=&error=&older_than_s=&newer_than_s=&limit=`:
/// newest first.
pub async fn list(
    _: Admin,
    State(state): State<AppState>,
    q: Result<Query<DlqQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = bad_query(q)?;
    let filter = q.filter()?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let p = state.jobs.pipeline();
    let items = dlq::list(p, &filter, limit).await?;
    let total = dlq::count(p).await?;
    Ok(Json(json!({"dead_letters": items, "total": total})).into_response())
}

/// `GET /api/admin/dlq/{id}`.
pub async fn show(_: Admin, State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match dlq::get(state.jobs.pipeline(), &id).await? {
        Some(d) => Ok(Json(d).into_response()),
        None => Ok(no_such_dead_letter()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// The stage to replay into; default: the one it failed in.
    pub stage: Option<String>,
}

/// `POST /api/admin/dlq/{id}/replay`, optionally `{"stage": "..."}`.
pub async fn replay(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    // The body is optional: empty, or JSON in the API's error shape.
    let bytes = read_limited(req, state.config.max_json_bytes).await?;
    let body: Option<ReplayBody> = if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(parse_json(&bytes)?)
    };
    let to = body
        .and_then(|b| b.stage)
        .filter(|s| !s.is_empty())
        .map(|s| parse_stage(&s))
        .transpose()?;
    match dlq::replay(state.jobs.pipeline(), &id, to).await {
        Ok(r) => {
            tracing::info!(dead_letter = %r.id, job = %r.job, image = r.image, to = %r.to, "replayed a dead letter");
            Ok(Json(r).into_response())
        }
        Err(ReplayError::NotFound) => Ok(no_such_dead_letter()),
        Err(ReplayError::Redis(e)) => Err(e.into()),
        Err(e) => Err(ApiError::Conflict(format!("cannot replay this dead letter: {e}"))),
    }
}

/// `DELETE /api/admin/dlq/{id}`.
pub async fn delete(_: Admin, State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if dlq::delete(state.jobs.pipeline(), &id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Ok(no_such_dead_letter())
    }
}

/// `DELETE /api/admin/dlq?<filters>`: purge every match; no filter at all
/// needs `all=true`, so a stray request cannot empty the stream.
pub async fn purge(
    _: Admin,
    State(state): State<AppState>,
    q: Result<Query<DlqQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = bad_query(q)?;
    let filter = q.filter()?;
    if filter.is_empty() && q.all != Some(true) {
        return Err(ApiError::Unprocessable(
            "give a filter (stage, vendor, job, error, older_than_s, newer_than_s) or all=true".into(),
        ));
    }
    let purged = dlq::purge(state.jobs.pipeline(), &filter).await?;
    tracing::info!(purged, "purged dead letters");
    Ok(Json(json!({"purged": purged})).into_response())
}

/// `GET /api/admin/job/{id}`: any vendor's job, for the dashboard's lookup.
pub async fn job(_: Admin, State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let job = state.jobs.get(None, &id).await?.ok_or(ApiError::NotFound)?;
    let mut v = serde_json::to_value(&job).map_err(|e| ApiError::Internal(e.to_string()))?;
    v["vendor"] = json!(job.vendor);
    Ok(Json(v).into_response())
}
