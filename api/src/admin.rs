//! Operators' routes, behind the admin key: read the dead letters, create
//! vendors' keys.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Admin;
use crate::error::ApiError;
use crate::routes::JsonBody;
use crate::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterQuery {
    /// Entries older than this stream id (the previous page's `next_cursor`).
    pub before: Option<String>,
    pub limit: Option<usize>,
}

/// Stream ids are `<ms>-<seq>`; anything else never reaches Redis.
fn valid_stream_id(id: &str) -> bool {
    let mut parts = id.splitn(2, '-');
    let digits =
        |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()));
    digits(parts.next()) && digits(parts.next())
}

/// `GET /api/admin/dead-letters?before=&limit=`: the dead-letter stream,
/// newest first.
#[utoipa::path(get, path = "/api/admin/dead-letters", tag = "admin",
    params(
        ("before" = Option<String>, Query, description = "The previous page's next_cursor"),
        ("limit" = Option<usize>, Query, description = "1–500, default 50"),
    ),
    responses(
        (status = 200, description = "`{entries, next_cursor}`", body = Object),
        (status = 401, description = "No valid key", body = crate::bodies::ErrorBody),
        (status = 403, description = "A vendor key, not the admin key", body = crate::bodies::ErrorBody),
    ))]
pub async fn dead_letters(
    State(state): State<AppState>,
    _admin: Admin,
    q: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::Unprocessable(format!("invalid query: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    if q.before.as_deref().is_some_and(|b| !valid_stream_id(b)) {
        return Err(ApiError::Unprocessable(
            "before must be a stream id such as 1700000000000-0".into(),
        ));
    }
    let entries = image_queue_pipeline::dlq::raw_page(state.jobs.pipeline(), q.before.as_deref(), limit).await?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|(id, _)| id.clone()))
        .flatten();
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|(id, fields)| {
            let mut o = serde_json::Map::new();
            o.insert("id".into(), Value::String(id));
            for (k, v) in fields {
                let v = match k.as_str() {
                    // The event itself, as JSON when it is JSON (an
                    // unreadable entry is kept as the text it was).
                    "e" => ("event", serde_json::from_str(&v).unwrap_or(Value::String(v))),
                    "image" | "attempts" | "failed_ms" => {
                        let n = v.parse::<u64>().map(Value::from).unwrap_or(Value::String(v));
                        (k.as_str(), n)
                    }
                    other => (other, Value::String(v)),
                };
                o.insert(v.0.to_string(), v.1);
            }
            Value::Object(o)
        })
        .collect();
    Ok(Json(json!({"entries": entries, "next_cursor": next})).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVendor {
    pub vendor_id: String,
    /// Share of dispatch relative to other vendors (1–1000, default 1).
    pub weight: Option<u32>,
}

/// `POST /api/admin/vendors` `{vendor_id, weight?}`: a new key for a
/// vendor, shown once in the answer and kept only as its hash.
#[utoipa::path(post, path = "/api/admin/vendors", tag = "admin",
    request_body(content = NewVendor, content_type = "application/json"),
    responses(
        (status = 201, description = "`{vendor_id, api_key, weight}`: the key is shown only here", body = Object),
        (status = 401, description = "No valid key", body = crate::bodies::ErrorBody),
        (status = 403, description = "A vendor key, not the admin key", body = crate::bodies::ErrorBody),
        (status = 422, description = "Invalid vendor id or weight", body = crate::bodies::ErrorBody),
    ))]
pub async fn add_vendor(
    State(state): State<AppState>,
    _admin: Admin,
    JsonBody(v): JsonBody<NewVendor>,
) -> Result<Response, ApiError> {
    let weight = v.weight.unwrap_or(1);
    if !(1..=1000).contains(&weight) {
        return Err(ApiError::Unprocessable("weight must be 1–1000".into()));
    }
    let key = state.auth.add_vendor(&v.vendor_id).await?;
    if v.weight.is_some() {
        state.jobs.set_weight(&v.vendor_id, weight).await?;
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({"vendor_id": v.vendor_id, "api_key": key, "weight": weight})),
    )
        .into_response())
}
