//! The API's OpenAPI description, served at `/openapi.json` and generated
//! from the handlers' own annotations so it cannot drift from the routes.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::bodies::{ErrorBody, ErrorDetail, EstimatedStart, Submitted};

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
