//! The API's one error shape: `{"error": {"code": ..., "message": ...}}`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("a valid API key is required (Authorization: Bearer <key>)")]
    Unauthorized,
    #[error("this route needs the admin key")]
    Forbidden,
    #[error("no such job")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("this method is not allowed here")]
    MethodNotAllowed,
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after_s: u64,
        /// The rate-limit fields to send with the refusal.
        headers: Vec<(&'static str, String)>,
    },
    #[error("the service is unavailable; try again shortly")]
    Unavailable,
    /// Logged with its cause; the client sees only that it happened.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unprocessable(_) => "unprocessable",
            ApiError::TooManyRequests { .. } => "rate_limited",
            ApiError::Unavailable => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

/// How long a client is told to wait when Redis cannot serve: long enough
/// not to hammer a Redis that is loading or out of memory.
pub const UNAVAILABLE_RETRY_AFTER_S: u64 = 5;

/// Whether Redis refused for a state it will leave (out of memory, busy
/// with a script, loading its data, a read-only replica, not yet
/// authenticated, unable to persist), not for anything in the request.
pub fn redis_unavailable(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_connection_refusal()
        || matches!(
            e.code(),
            Some(
                "OOM"
                    | "BUSY"
                    | "LOADING"
                    | "READONLY"
                    | "NOAUTH"
                    | "MISCONF"
                    | "MASTERDOWN"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
            )
        )
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        if redis_unavailable(&e) {
            tracing::warn!(error = %e, "redis unavailable");
            ApiError::Unavailable
        } else {
            ApiError::Internal(format!("redis: {e}"))
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self {
            tracing::error!(cause, "internal error");
        }
        let status = self.status();
        let body = Json(json!({"error": {"code": self.code(), "message": self.to_string()}}));
        let mut resp = (status, body).into_response();
        if let ApiError::TooManyRequests {
            retry_after_s, headers, ..
        } = &self
        {
            let all = std::iter::once(("retry-after", retry_after_s.to_string())).chain(headers.iter().cloned());
            for (name, value) in all {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    resp.headers_mut().insert(name, v);
                }
            }
        }
        if let ApiError::Unavailable = &self {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from(UNAVAILABLE_RETRY_AFTER_S));
        }
        resp
    }
}
