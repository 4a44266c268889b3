//! The customer portal: a customer's own published files, opened in the
//! portal. The customer id comes from the token, never from the URL.

use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use dossier_domain::{DownloadChannel, FileCommand, Visibility};
use dossier_projections::files::{self as read_model, FileFilter, FileView};
use serde::Serialize;

use crate::auth::PortalCustomer;
use crate::error::{ApiError, AppError};
use crate::http::download;
use crate::http::files::file_id;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/portal/files", get(list_portal_files))
        .route("/v1/portal/files/{id}/content", get(portal_file_content))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PortalFiles {
    items: Vec<FileView>,
}

/// The visibilities a customer sees.
const PUBLISHED: [Visibility; 2] = [Visibility::Portal, Visibility::PortalAndMoving];

/// `GET /v1/portal/files`
#[utoipa::path(get, path = "/v1/portal/files", tag = "portal",
    responses((status = 200, description = "The customer's own published files, newest first", body = PortalFiles)))]
pub async fn list_portal_files(
    State(app): State<AppState>,
    customer: PortalCustomer,
) -> Result<Json<PortalFiles>, ApiError> {
    let mut filter = FileFilter {
        visibility: PUBLISHED.to_vec(),
        limit: 500,
        ..FileFilter::default()
    };
    let mut items = Vec::new();
    loop {
        let page = read_model::list(
            app.pool(),
            &customer.caller.tenant,
            &customer.customer,
            &filter,
        )
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?;
        items.extend(page.items);
        match page.next_cursor {
            Some(next) => {
                filter.cursor = Some(read_model::Cursor::decode(&next).map_err(|_| {
                    ApiError(AppError::Internal(
                        "the read model gave out a bad cursor".into(),
                    ))
                })?);
            }
            None => break,
        }
    }
    Ok(Json(PortalFiles { items }))
}

/// `GET /v1/portal/files/{id}/content`: streams the file and, on the
/// customer's first download, records that it was viewed.
#[utoipa::path(get, path = "/v1/portal/files/{id}/content", tag = "portal", params(("id" = String, Path)),
    responses((status = 200, description = "The file's bytes; sets viewed_at on the first download"), (status = 404)))]
pub async fn portal_file_content(
    State(app): State<AppState>,
    customer: PortalCustomer,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = file_id(&id)?;
    let file = read_model::get(app.pool(), &customer.caller.tenant, id)
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?
        .filter(|file| file.customer_id == customer.customer && file.visibility.in_portal())
        .ok_or(ApiError(AppError::NotFound))?;
    if file.viewed_at.is_none() {
        let command = FileCommand::MarkViewed {
            tenant: customer.caller.tenant.clone(),
            viewer: customer.customer.clone(),
            at: Utc::now(),
        };
        app.commands()
            .file(&customer.caller.context(), id, command)
            .await?;
    }
    download::respond(
        &app,
        &customer.caller.context(),
        DownloadChannel::Portal,
        &file,
    )
    .await
}
