//! The customer portal: a customer's own published files, opened in the
//! portal. The customer id comes from the token, never from the URL.

use axum::extract::{RawQuery, State};
use axum::http::Method;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use dossier_domain::Visibility;
use dossier_projections::files::{self as read_model, Audience, FileFilter, Page};

use crate::auth::PortalCustomer;
use crate::error::{ApiError, AppError, ErrorBody};
use crate::http::download::{self, Door};
use crate::http::files::file_id;
use crate::http::openapi::schemas::CursorText;
use crate::http::params::{PathText, QueryPairs};
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/portal/files", get(list_portal_files))
        .route("/v1/portal/files/{id}/content", get(portal_file_content))
}

/// `GET /v1/portal/files`: one page of the customer's own published files,
/// newest first.
#[utoipa::path(get, path = "/v1/portal/files", tag = "portal",
    params(("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "page size, default 50"),
        ("cursor" = Option<CursorText>, Query, description = "the `next_cursor` of the previous page")),
    responses(
        (status = 200, description = "One page of the customer's own files with visibility portal or portal_and_moving, newest first", body = Page),
        (status = 422, description = "validation_failed: a malformed limit or cursor", body = ErrorBody)))]
pub async fn list_portal_files(
    State(app): State<AppState>,
    customer: PortalCustomer,
    RawQuery(query): RawQuery,
) -> Result<Json<Page>, ApiError> {
    let paging = QueryPairs::parse(query.as_deref())?.paging()?;
    let filter = FileFilter {
        // Rule 8: the visibilities the portal shows, and nothing else.
        visibility: Visibility::ALL
            .into_iter()
            .filter(|v| v.in_portal())
            .collect(),
        limit: paging.limit,
        cursor: paging.cursor,
        ..FileFilter::default()
    };
    let page = read_model::list(
        app.pool(),
        &customer.caller.tenant,
        &customer.customer,
        &filter,
    )
    .await
    .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?;
    Ok(Json(page))
}

/// `GET /v1/portal/files/{id}/content`: streams the file and, on the
/// customer's first download, records that it was viewed (HEAD: neither).
#[utoipa::path(get, path = "/v1/portal/files/{id}/content", tag = "portal",
    params(("id" = String, Path, format = Uuid, description = "The file's id")),
    responses((status = 200, description = "The file's bytes; the download is recorded and the first one sets viewed_at (HEAD records nothing)",
            content(("*/*")),
            headers(("content-disposition" = String, description = "`attachment` with `filename` (ASCII) and `filename*` (UTF-8)"),
                ("etag" = String, description = "the SHA-256 of the bytes, quoted"))),
        (status = 404, description = "not_found: unknown, not published, another customer's or tenant's", body = ErrorBody),
        (status = 503, description = "unavailable: a backing service is down, or the stored content failed its integrity check (then it is never sent, nothing is recorded, and trying again does not help)", body = ErrorBody)))]
pub async fn portal_file_content(
    State(app): State<AppState>,
    method: Method,
    customer: PortalCustomer,
    PathText(id): PathText,
) -> Result<Response, ApiError> {
    let id = file_id(&id)?;
    let file = read_model::get(app.pool(), &customer.caller.tenant, id)
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?
        .filter(|file| Audience::Customer(&customer.customer).sees(file))
        .ok_or(ApiError(AppError::NotFound))?;
    let door = Door::Portal {
        viewer: &customer.customer,
    };
    download::respond(&app, &customer.caller.context(), &method, door, &file).await
}
