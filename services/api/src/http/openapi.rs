//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the handlers'
//! annotations and the response types, so it cannot drift from the code.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::http::bundles;
use crate::http::{audit, events, files, portal, tasks};

#[derive(OpenApi)]
#[openapi(
    info(title = "Dossier", description = "Every customer's documents, event sourced. See CONTRACT.md."),
    paths(
        files::upload_file,
        files::list_files,
        files::get_file,
        files::file_content,
        files::edit_file,
        files::sign_file,
        files::delete_file,
        files::delete_files,
        bundles::request_bundle,
        bundles::bundle_status,
        bundles::bundle_content,
        audit::list_audit,
        events::list_events,
        portal::list_portal_files,
        portal::portal_file_content,
        tasks::create_task,
        tasks::list_tasks,
        tasks::list_portal_tasks,
        tasks::put_settings,
        tasks::upload_attachment,
        tasks::post_message,
    ),
    components(schemas(files::EditFile, files::SignFile, files::DeleteFiles, files::DeleteResults, files::DeleteResult)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags((name = "files", description = "Staff file endpoints"), (name = "portal", description = "The customer portal"),
        (name = "audit", description = "Audit trail and the raw event log"),
        (name = "bundles", description = "Many files as one ZIP download"),
        (name = "tasks", description = "Tasks of a customer"), (name = "settings", description = "Tenant settings"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
