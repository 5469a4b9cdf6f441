//! A vendor's own webhook, set over HTTP: the route handlers of
//! `/api/image-queue/webhook`, all of the same shape as the job routes.
//!
//! Setting it answers the signing secret, once; reading it never shows the
//! secret again. Where the calls may go is decided when they are made (the
//! same address rules as image fetching), so here a URL only has to be
//! http(s).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use image_queue_pipeline::webhooks::Webhooks;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Vendor;
use crate::error::ApiError;
use crate::routes::JsonBody;
use crate::AppState;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetWebhook {
    /// The http(s) URL to POST each job-ended notice to.
    pub url: String,
}

fn hooks(state: &AppState) -> Webhooks {
    Webhooks::new(state.jobs.pipeline().clone())
}

/// `PUT /api/image-queue/webhook`.
#[utoipa::path(put, path = "/api/image-queue/webhook", tag = "webhooks",
    description = "Set (or replace) the caller's webhook. The answer holds the signing secret, shown this once: each call carries `Image-Queue-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">`.",
    request_body(content = SetWebhook, content_type = "application/json"),
    responses(
        (status = 200, description = "Set; `{url, secret}`", body = Object),
        (status = 422, description = "Not an http(s) URL", body = crate::bodies::ErrorBody),
        (status = 401, description = "No valid API key", body = crate::bodies::ErrorBody)
    ))]
pub async fn set(
    State(state): State<AppState>,
    vendor: Vendor,
    JsonBody(body): JsonBody<SetWebhook>,
) -> Result<Response, ApiError> {
    let ok = url::Url::parse(&body.url)
        .map(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .unwrap_or(false);
    if !ok || body.url.len() > 2048 {
        return Err(ApiError::Unprocessable(
            "a webhook URL must be http(s), with a host, and at most 2048 characters".into(),
        ));
    }
    let secret = hooks(&state).set(&vendor.0, &body.url).await?;
    Ok(Json(json!({ "url": body.url, "secret": secret })).into_response())
}

/// `GET /api/image-queue/webhook`.
#[utoipa::path(get, path = "/api/image-queue/webhook", tag = "webhooks",
    responses(
        (status = 200, description = "`{url}`, null when none is set; never the secret", body = Object),
        (status = 401, description = "No valid API key", body = crate::bodies::ErrorBody)
    ))]
pub async fn get(State(state): State<AppState>, vendor: Vendor) -> Result<Response, ApiError> {
    let hook = hooks(&state).get(&vendor.0).await?;
    Ok(Json(json!({ "url": hook.map(|h| h.url) })).into_response())
}

/// `DELETE /api/image-queue/webhook`.
#[utoipa::path(delete, path = "/api/image-queue/webhook", tag = "webhooks",
    responses(
        (status = 204, description = "Removed (or there was none)"),
        (status = 401, description = "No valid API key", body = crate::bodies::ErrorBody)
    ))]
pub async fn remove(State(state): State<AppState>, vendor: Vendor) -> Result<Response, ApiError> {
    hooks(&state).remove(&vendor.0).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
