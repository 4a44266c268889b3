//! The bundle endpoints: ask for one ZIP of many files, watch it being built,
//! download it (CONTRACT.md rule 4 and `/v1/bundles`).
//!
//! A request checks the tenant and existence of every file and the bundle limits
//! now, records `BundleRequested` and answers 202 at once; the zip worker builds
//! the archive from the log's event (`workers/src/zip.rs`). The status and the
//! content answer 404 for another tenant's bundle and for one whose time is up.
//! The content is streamed from the blob store, after a download of every file in
//! it was recorded (rule 9); it is refused when a file of the bundle was deleted
//! since (rule 7: a deleted file's bytes never leave again).

use std::collections::HashSet;

use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use dossier_domain::{
    Bundle, BundleCommand, BundleFile, BundleStatus, DownloadChannel, DownloadedFile, FileId,
    RequestBundle,
};
use dossier_projections::bundles::{self as read_model, BundleView};
use dossier_projections::files;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::Staff;
use crate::error::{ApiError, AppError, ErrorBody};
use crate::http::download;
use crate::http::openapi::schemas::BundleStatusText;
use crate::http::params::{JsonBody, PathText, path_uuid};
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/bundles", post(request_bundle))
        .route("/v1/bundles/{id}", get(bundle_status))
        .route("/v1/bundles/{id}/content", get(bundle_content))
}

/// `POST /v1/bundles` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BundleRequest {
    /// 1 to 1000 file ids; the archive's entries follow this order. An id given
    /// twice is one entry.
    #[schema(min_items = 1, max_items = 1000, value_type = Vec<uuid::Uuid>)]
    file_ids: Vec<String>,
}

/// `POST /v1/bundles` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BundleAccepted {
    #[schema(value_type = String, format = Uuid)]
    id: Uuid,
    /// Always `pending`.
    #[schema(value_type = String, pattern = "^pending$")]
    status: &'static str,
}

/// `GET /v1/bundles/{id}` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Bundle)]
pub struct BundleResource {
    #[schema(value_type = String, format = Uuid)]
    id: Uuid,
    #[schema(value_type = BundleStatusText)]
    status: &'static str,
    file_count: u32,
    /// Entries written so far (all of them once ready).
    files_done: u32,
    /// Size of the ZIP in bytes, once ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    /// Why there is no archive, when failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// When a finished bundle goes away (404 from then on).
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<DateTime<Utc>>,
}

impl From<&BundleView> for BundleResource {
    fn from(bundle: &BundleView) -> Self {
        Self {
            id: bundle.id,
            status: bundle.status.as_str(),
            file_count: bundle.file_count,
            files_done: bundle.files_done,
            size: bundle.size,
            error: bundle.error.clone(),
            expires_at: bundle.expires_at,
        }
    }
}

/// The ids of a request, parsed and without repeats, in their first order.
fn file_ids(raw: &[String], max_files: usize) -> Result<Vec<FileId>, ApiError> {
    if raw.is_empty() {
        return Err(ApiError::validation(
            "file_ids",
            "must name at least one file",
        ));
    }
    if raw.len() > max_files {
        return Err(ApiError::validation(
            "file_ids",
            format!(
                "a bundle holds at most {max_files} files, and {} were given",
                raw.len()
            ),
        ));
    }
    let mut seen = HashSet::with_capacity(raw.len());
    let mut ids: Vec<FileId> = Vec::with_capacity(raw.len());
    for id in raw {
        let id = FileId::parse(id)
            .map_err(|_| ApiError::validation("file_ids", format!("{id:?} is not a UUID")))?;
        if seen.insert(id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// `POST /v1/bundles`
#[utoipa::path(post, path = "/v1/bundles", tag = "bundles", request_body = BundleRequest,
    responses(
        (status = 202, description = "Recorded; the archive is being built", body = BundleAccepted,
            links(
                ("GetBundle" = (operation_id = "bundle_status", parameters(("id" = "$response.body#/id")))),
                ("GetBundleContent" = (operation_id = "bundle_content", parameters(("id" = "$response.body#/id")))),
            )),
        (status = 404, description = "not_found: a file is unknown, deleted or another tenant's", body = ErrorBody),
        (status = 422, description = "validation_failed: no files, a malformed id, or over a bundle limit (the message names it)", body = ErrorBody),
        (status = 429, description = "too_many_pending_bundles: the tenant has as many bundles being built as it may; try again once one is done", body = ErrorBody)))]
pub async fn request_bundle(
    State(app): State<AppState>,
    Staff(caller): Staff,
    JsonBody(body): JsonBody<BundleRequest>,
) -> Result<(StatusCode, Json<BundleAccepted>), ApiError> {
    let policy = app.bundle_policy();
    let ids = file_ids(&body.file_ids, policy.max_files)?;
    let found = files::get_many(app.pool(), &caller.tenant, &ids)
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?;
    if found.len() != ids.len() {
        // Unknown, deleted and other tenants' files look the same (rule 6).
        tracing::debug!(
            asked = ids.len(),
            found = found.len(),
            "a bundle request names files that do not exist"
        );
        return Err(ApiError(AppError::NotFound));
    }
    let bundle_id = Uuid::now_v7();
    let command = BundleCommand::Request(RequestBundle {
        tenant: caller.tenant.clone(),
        requested_by: caller.actor(),
        files: found
            .iter()
            .map(|file| BundleFile {
                file_id: file.id,
                customer_id: file.customer_id.clone(),
                size: file.size,
            })
            .collect(),
        at: Utc::now(),
    });
    app.commands()
        .run::<Bundle>(&caller.context(), &bundle_id.to_string(), command, policy)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(BundleAccepted {
            id: bundle_id,
            status: BundleStatus::Pending.as_str(),
        }),
    ))
}

/// The bundle as the read model shows it now, or 404: unknown, another tenant's,
/// expired (also when the expiry sweep has not run yet), or not a UUID.
async fn visible_bundle(
    app: &AppState,
    tenant: &dossier_domain::TenantId,
    raw_id: &str,
) -> Result<BundleView, ApiError> {
    let id = path_uuid(raw_id)?;
    read_model::get(app.pool(), tenant, id)
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?
        .filter(|bundle| !bundle.has_expired(Utc::now()))
        .ok_or(ApiError(AppError::NotFound))
}

/// `GET /v1/bundles/{id}`
#[utoipa::path(get, path = "/v1/bundles/{id}", tag = "bundles",
    params(("id" = String, Path, format = Uuid, description = "The bundle's id")),
    responses(
        (status = 200, description = "Where the bundle stands", body = BundleResource,
            links(("GetBundleContent" = (operation_id = "bundle_content", parameters(("id" = "$response.body#/id")))))),
        (status = 404, description = "not_found: unknown, another tenant's, or expired", body = ErrorBody)))]
pub async fn bundle_status(
    State(app): State<AppState>,
    Staff(caller): Staff,
    PathText(id): PathText,
) -> Result<Json<BundleResource>, ApiError> {
    let bundle = visible_bundle(&app, &caller.tenant, &id).await?;
    Ok(Json(BundleResource::from(&bundle)))
}

/// `GET /v1/bundles/{id}/content`
#[utoipa::path(get, path = "/v1/bundles/{id}/content", tag = "bundles",
    params(("id" = String, Path, format = Uuid, description = "The bundle's id")),
    responses(
        (status = 200, description = "The ZIP; a download of every file in it is recorded (HEAD records nothing)",
            content(("application/zip")),
            headers(("content-disposition" = String, description = "`attachment` with the bundle's file name"),
                ("etag" = String, description = "the SHA-256 of the archive, quoted"))),
        (status = 404, description = "not_found: unknown, another tenant's, expired, or a file of it was deleted since", body = ErrorBody),
        (status = 409, description = "bundle_not_ready: still pending, or failed (see its status)", body = ErrorBody),
        (status = 503, description = "unavailable: a backing service is down, or the stored content failed its integrity check (then it is never sent, nothing is recorded, and trying again does not help)", body = ErrorBody)))]
pub async fn bundle_content(
    State(app): State<AppState>,
    method: Method,
    Staff(caller): Staff,
    PathText(id): PathText,
) -> Result<Response, ApiError> {
    let bundle = visible_bundle(&app, &caller.tenant, &id).await?;
    if bundle.status != BundleStatus::Ready {
        return Err(ApiError(AppError::BundleNotReady));
    }
    let key = bundle.blob_key.clone().ok_or_else(|| {
        ApiError(AppError::Internal(format!(
            "ready bundle {} has no archive",
            bundle.id
        )))
    })?;

    // Rule 7: a file deleted after the archive was built must not leave through it.
    let ids: Vec<FileId> = bundle.files.iter().map(|file| file.file_id).collect();
    let live = files::get_many(app.pool(), &caller.tenant, &ids)
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?;
    if live.len() != ids.len() {
        tracing::info!(bundle_id = %bundle.id, "refusing a bundle download: a file of it was deleted since it was built");
        return Err(ApiError(AppError::NotFound));
    }

    let opened = match download::open(&app, &method, &key).await {
        Ok(opened) => opened,
        // Expired and removed between the two reads.
        Err(dossier_blobstore::BlobError::NotFound) => return Err(ApiError(AppError::NotFound)),
        Err(error) => return Err(error.into()),
    };
    if opened.sends_bytes() {
        let downloaded = bundle
            .files
            .iter()
            .map(|file| DownloadedFile {
                file_id: file.file_id,
                customer_id: file.customer_id.clone(),
            })
            .collect();
        download::record(
            &app,
            &caller.context(),
            DownloadChannel::Bundle,
            Some(bundle.id),
            downloaded,
        )
        .await?;
    }
    let content = download::Content {
        content_type: HeaderValue::from_static("application/zip"),
        size: bundle.size,
        name: format!(
            "bundle-{}.zip",
            bundle.requested_at.format("%Y-%m-%d-%H%M%S")
        ),
        etag: bundle.sha256.as_ref().map(ToString::to_string),
    };
    download::send(opened, content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_parsed_deduplicated_and_limited() {
        let a = Uuid::now_v7().to_string();
        let b = Uuid::now_v7().to_string();
        let ids = file_ids(&[a.clone(), b.clone(), a.clone()], 1000).unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0].to_string(), a);
        assert!(file_ids(&[], 1000).is_err());
        assert!(file_ids(&["nope".into()], 1000).is_err());
        let error = file_ids(&[a.clone(), b], 1).unwrap_err();
        assert_eq!(error.code(), "validation_failed");
        assert!(error.to_string().contains("at most 1 files"), "{error}");
    }
}
