//! The two pages served by the API itself: the vendor page at `/` (submit
//! images, watch them move through the stages) and the operators'
//! dashboard at `/dashboard` (the pipeline live, dead letters, job lookup).
//!
//! Plain HTML, CSS and JavaScript compiled into the binary: no build step,
//! no CDN, so they work offline and always match the API they talk to. They
//! use only the public routes and keep keys in the page (and the browser's
//! session storage), never in a cookie the server would have to trust.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::error::ApiError;
use crate::AppState;

const VENDOR_HTML: &str = include_str!("../static/vendor.html");
const DASHBOARD_HTML: &str = include_str!("../static/dashboard.html");

/// Assets by name, with their content types.
const ASSETS: &[(&str, &str, &str)] = &[
    ("app.css", "text/css; charset=utf-8", include_str!("../static/app.css")),
    (
        "common.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/common.js"),
    ),
    (
        "vendor.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/vendor.js"),
    ),
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/dashboard.js"),
    ),
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { html(VENDOR_HTML) }))
        .route("/dashboard", get(|| async { html(DASHBOARD_HTML) }))
        .route("/assets/{name}", get(asset))
}

fn html(body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything the pages load comes from here; nothing else may run.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data: blob: https: http:; style-src 'self'; script-src 'self'",
            ),
        ],
        body,
    )
        .into_response()
}

async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    let (_, ctype, body) = ASSETS.iter().find(|(n, _, _)| *n == name).ok_or(ApiError::NotFound)?;
    Ok((
        [(header::CONTENT_TYPE, *ctype), (header::CACHE_CONTROL, "no-cache")],
        *body,
    )
        .into_response())
}
