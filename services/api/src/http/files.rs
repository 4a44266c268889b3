//! The staff file endpoints: upload, list, read, download, edit, sign, delete.
//!
//! Each handler parses its input into domain types, runs one command (or a
//! query on the files read model) and answers the contract's File resource.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use dossier_application::{Recording, StoredUpload, UploadedFile};
use dossier_domain::{
    BlobKey, ContractId, CustomerId, DisplayName, DownloadChannel, FileCommand, FileId, Origin,
    Visibility,
};
use dossier_projections::files::{self as read_model, Cursor, FileFilter, FileView, Page};
use serde::{Deserialize, Serialize};

use crate::auth::Staff;
use crate::error::{ApiError, AppError};
use crate::http::download;
use crate::http::params::{JsonBody, QueryPairs};
use crate::http::upload::{self, FormBody, FormSpec};
use crate::state::AppState;

/// The fields of a staff upload (CONTRACT.md).
const UPLOAD_FORM: FormSpec = FormSpec {
    text_fields: &["name", "visibility", "origin", "contract_id"],
    takes_file: true,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/customers/{customer_id}/files",
            // The form's own limits answer (upload.rs), not axum's 2 MB default:
            // the form body is read by the upload path, never buffered.
            post(upload_file).get(list_files),
        )
        .route(
            "/v1/files/{id}",
            get(get_file).patch(edit_file).delete(delete_file),
        )
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/files/{id}/signature", post(sign_file))
        .route("/v1/files/delete", post(delete_files))
}

/// An id in a path that is not a UUID names no file: 404, like any unknown id.
pub fn file_id(raw: &str) -> Result<FileId, ApiError> {
    FileId::parse(raw).map_err(|_| ApiError(AppError::NotFound))
}

/// The file as the read model shows it now, or 404 (also for another tenant's).
pub async fn visible_file(
    app: &AppState,
    caller_tenant: &dossier_domain::TenantId,
    id: FileId,
) -> Result<FileView, ApiError> {
    read_model::get(app.pool(), caller_tenant, id)
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?
        .ok_or(ApiError(AppError::NotFound))
}

/// `POST /v1/customers/{customer_id}/files`
#[utoipa::path(post, path = "/v1/customers/{customer_id}/files", tag = "files",
    params(("customer_id" = String, Path, description = "The customer's id")),
    request_body(content_type = "multipart/form-data", description = "`file` (with its file name), `name`, optional `visibility`, `origin`, `contract_id`"),
    responses((status = 201, description = "The recorded file", body = FileView),
              (status = 413, description = "file_too_large"), (status = 422, description = "validation_failed")))]
pub async fn upload_file(
    State(app): State<AppState>,
    Staff(caller): Staff,
    Path(customer_id): Path<String>,
    body: FormBody,
) -> Result<Response, ApiError> {
    let customer = CustomerId::parse(&customer_id)?;
    let file_id = FileId::new();
    let key = BlobKey::for_file(&caller.tenant, &customer, file_id);
    let limit = app.max_file_bytes().0;
    let form = upload::receive(body, &UPLOAD_FORM, app.uploads(), key, limit).await?;

    let (file, recording) = match upload_recording(&form, &caller.tenant, customer, file_id) {
        Ok(parsed) => parsed,
        Err(error) => {
            form.discard(app.uploads()).await;
            return Err(error);
        }
    };
    let recorded = app
        .uploads()
        .record(&caller.context(), file, recording)
        .await?;
    Ok(created_file(app.uploads().resource(&recorded).await))
}

/// The header of a `201` whose read models had not caught up with the upload
/// within the freshness timeout: the body is the recorded file, but lists may
/// not show it for a moment (CONTRACT.md rules 10 and 15).
pub const READ_MODELS_LAG_HEADER: &str = "dossier-read-models";

/// `201 Created` with the recorded file; when the read models lag behind it,
/// says so in [`READ_MODELS_LAG_HEADER`] instead of failing the upload.
pub fn created_file(uploaded: UploadedFile) -> Response {
    let mut response = (StatusCode::CREATED, Json(uploaded.file)).into_response();
    if uploaded.lagging {
        response.headers_mut().insert(
            READ_MODELS_LAG_HEADER,
            axum::http::HeaderValue::from_static("lagging"),
        );
    }
    response
}

fn upload_recording(
    form: &upload::ReceivedForm,
    tenant: &dossier_domain::TenantId,
    customer_id: CustomerId,
    file_id: FileId,
) -> Result<(StoredUpload, Recording), ApiError> {
    let file = form
        .file
        .clone()
        .ok_or_else(|| ApiError::validation("file", "is required"))?;
    let name = DisplayName::parse(
        form.field("name")
            .ok_or_else(|| ApiError::validation("name", "is required"))?,
    )?;
    let visibility = form
        .field("visibility")
        .map(Visibility::parse)
        .transpose()?
        .unwrap_or_default();
    let origin = form
        .field("origin")
        .map(Origin::parse)
        .transpose()?
        .unwrap_or_default();
    let contract_id = form
        .field("contract_id")
        .filter(|raw| !raw.is_empty())
        .map(ContractId::parse)
        .transpose()?;
    Ok((
        file,
        Recording {
            tenant: tenant.clone(),
            file_id,
            customer_id,
            name,
            visibility,
            origin,
            contract_id,
            task_id: None,
        },
    ))
}

/// `GET /v1/customers/{customer_id}/files`
#[utoipa::path(get, path = "/v1/customers/{customer_id}/files", tag = "files",
    params(("customer_id" = String, Path),
        ("viewed" = Option<bool>, Query), ("visibility" = Option<Vec<String>>, Query, description = "repeatable"),
        ("created_from" = Option<String>, Query, description = "RFC 3339 or YYYY-MM-DD, inclusive"),
        ("created_to" = Option<String>, Query, description = "RFC 3339 or YYYY-MM-DD, inclusive"),
        ("contract_id" = Option<String>, Query), ("origin" = Option<String>, Query),
        ("limit" = Option<u32>, Query, description = "1–500, default 50"), ("cursor" = Option<String>, Query)),
    responses((status = 200, description = "Newest first", body = Page)))]
pub async fn list_files(
    State(app): State<AppState>,
    Staff(caller): Staff,
    Path(customer_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Page>, ApiError> {
    let customer = CustomerId::parse(&customer_id)?;
    let filter = file_filter(&QueryPairs::parse(query.as_deref())?)?;
    let page = read_model::list(app.pool(), &caller.tenant, &customer, &filter)
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?;
    Ok(Json(page))
}

fn file_filter(query: &QueryPairs) -> Result<FileFilter, ApiError> {
    let visibility = query
        .all("visibility")
        .into_iter()
        .map(Visibility::parse)
        .collect::<Result<Vec<_>, _>>()?;
    let cursor = query
        .one("cursor")
        .map(|raw| {
            Cursor::decode(raw)
                .map_err(|_| ApiError::validation("cursor", "is not a cursor this API gave out"))
        })
        .transpose()?;
    Ok(FileFilter {
        viewed: query.bool("viewed")?,
        visibility,
        created_from: query.time_from("created_from")?,
        created_to: query.time_to("created_to")?,
        contract_id: query.one("contract_id").map(str::to_owned),
        origin: query.one("origin").map(Origin::parse).transpose()?,
        limit: query.int("limit", 1, 500)?.unwrap_or(50) as u32,
        cursor,
    })
}

/// `GET /v1/files/{id}`
#[utoipa::path(get, path = "/v1/files/{id}", tag = "files", params(("id" = String, Path)),
    responses((status = 200, body = FileView), (status = 404, description = "not_found")))]
pub async fn get_file(
    State(app): State<AppState>,
    Staff(caller): Staff,
    Path(id): Path<String>,
) -> Result<Json<FileView>, ApiError> {
    Ok(Json(
        visible_file(&app, &caller.tenant, file_id(&id)?).await?,
    ))
}

/// `GET /v1/files/{id}/content`
#[utoipa::path(get, path = "/v1/files/{id}/content", tag = "files", params(("id" = String, Path)),
    responses((status = 200, description = "The exact bytes uploaded, named by Content-Disposition"), (status = 404)))]
pub async fn file_content(
    State(app): State<AppState>,
    Staff(caller): Staff,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = visible_file(&app, &caller.tenant, file_id(&id)?).await?;
    download::respond(&app, &caller.context(), DownloadChannel::Staff, &view).await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditFile {
    name: Option<String>,
    visibility: Option<String>,
}

/// `PATCH /v1/files/{id}`
#[utoipa::path(patch, path = "/v1/files/{id}", tag = "files", params(("id" = String, Path)),
    request_body = EditFile, responses((status = 200, body = FileView)))]
pub async fn edit_file(
    State(app): State<AppState>,
    Staff(caller): Staff,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<EditFile>,
) -> Result<Json<FileView>, ApiError> {
    let id = file_id(&id)?;
    let command = FileCommand::Edit {
        tenant: caller.tenant.clone(),
        name: body.name.as_deref().map(DisplayName::parse).transpose()?,
        visibility: body
            .visibility
            .as_deref()
            .map(Visibility::parse)
            .transpose()?,
    };
    app.commands().file(&caller.context(), id, command).await?;
    Ok(Json(visible_file(&app, &caller.tenant, id).await?))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignFile {
    /// When it was signed; now if absent.
    signed_at: Option<DateTime<Utc>>,
}

/// `POST /v1/files/{id}/signature`
#[utoipa::path(post, path = "/v1/files/{id}/signature", tag = "files", params(("id" = String, Path)),
    request_body = SignFile, responses((status = 200, body = FileView)))]
pub async fn sign_file(
    State(app): State<AppState>,
    Staff(caller): Staff,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<FileView>, ApiError> {
    let id = file_id(&id)?;
    // The body is optional: none, or `{}`, means "signed now".
    let body: SignFile = if body.iter().all(u8::is_ascii_whitespace) {
        SignFile::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::validation("body", e.to_string()))?
    };
    let signed_at = body.signed_at.unwrap_or_else(Utc::now);
    let command = FileCommand::MarkSigned {
        tenant: caller.tenant.clone(),
        signed_at,
    };
    app.commands().file(&caller.context(), id, command).await?;
    Ok(Json(visible_file(&app, &caller.tenant, id).await?))
}

/// `DELETE /v1/files/{id}?confirm=true`
#[utoipa::path(delete, path = "/v1/files/{id}", tag = "files",
    params(("id" = String, Path), ("confirm" = bool, Query, description = "must be true")),
    responses((status = 204, description = "Deleted"), (status = 409, description = "file_protected"),
              (status = 422, description = "confirmation_required")))]
pub async fn delete_file(
    State(app): State<AppState>,
    Staff(caller): Staff,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<StatusCode, ApiError> {
    let id = file_id(&id)?;
    let confirmed = QueryPairs::parse(query.as_deref())?
        .bool("confirm")?
        .unwrap_or(false);
    let command = FileCommand::Delete {
        tenant: caller.tenant.clone(),
        confirmed,
        at: Utc::now(),
    };
    app.commands().file(&caller.context(), id, command).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteFiles {
    file_ids: Vec<String>,
    #[serde(default)]
    confirm: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeleteResults {
    results: Vec<DeleteResult>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeleteResult {
    id: String,
    /// `deleted`, `protected`, `not_found`, or, retryable with the same id:
    /// `conflict` (a concurrent change kept winning the race) and
    /// `unavailable` (a backing service failed for this file; it may or may
    /// not be deleted: a retry answers `deleted`, or `not_found` if it was)
    status: &'static str,
}

/// What became of one file of a bulk delete. Every file gets its own: a
/// failure of one never hides what became of the others.
fn delete_status(outcome: &Result<dossier_application::Accepted, AppError>) -> &'static str {
    match outcome {
        Ok(_) => "deleted",
        Err(AppError::NotFound) => "not_found",
        Err(AppError::FileProtected) => "protected",
        Err(AppError::Conflict | AppError::Duplicate) => "conflict",
        // A backing service failed (or a bug): the id may be sent again.
        Err(
            AppError::Unavailable(_)
            | AppError::OutcomeUnknown(_)
            | AppError::Internal(_)
            // None of these can answer a confirmed delete by staff; should
            // one ever, the file is not known to be deleted either.
            | AppError::Unauthorized(_)
            | AppError::Forbidden(_)
            | AppError::PortalUploadDisabled
            | AppError::FileTooLarge { .. }
            | AppError::Validation(_)
            | AppError::ConfirmationRequired
            | AppError::BundleNotReady
            | AppError::TooManyPendingBundles { .. },
        ) => "unavailable",
    }
}

/// At most this many ids in one bulk delete.
const MAX_BULK_DELETE: usize = 1000;

/// `POST /v1/files/delete`
#[utoipa::path(post, path = "/v1/files/delete", tag = "files", request_body = DeleteFiles,
    responses((status = 200, body = DeleteResults), (status = 422, description = "confirmation_required")))]
pub async fn delete_files(
    State(app): State<AppState>,
    Staff(caller): Staff,
    JsonBody(body): JsonBody<DeleteFiles>,
) -> Result<Json<DeleteResults>, ApiError> {
    if body.file_ids.is_empty() || body.file_ids.len() > MAX_BULK_DELETE {
        return Err(ApiError::validation(
            "file_ids",
            format!("must hold 1 to {MAX_BULK_DELETE} ids"),
        ));
    }
    if !body.confirm {
        return Err(ApiError(AppError::ConfirmationRequired));
    }
    let ctx = caller.context();
    let mut results = Vec::with_capacity(body.file_ids.len());
    let mut last_position = 0;
    for raw in body.file_ids {
        let Ok(id) = FileId::parse(&raw) else {
            results.push(DeleteResult {
                id: raw,
                status: "not_found",
            });
            continue;
        };
        let command = FileCommand::Delete {
            tenant: caller.tenant.clone(),
            confirmed: true,
            at: Utc::now(),
        };
        let outcome = app.commands().file_no_wait(&ctx, id, command).await;
        let status = delete_status(&outcome);
        match &outcome {
            Ok(accepted) => last_position = last_position.max(accepted.position),
            Err(error) if matches!(status, "unavailable" | "conflict") => tracing::warn!(
                tenant = %caller.tenant,
                file_id = %id,
                status,
                error = %error,
                detail = error.detail().unwrap_or_default(),
                "a file of a bulk delete could not be deleted now; the others go on"
            ),
            Err(_) => {}
        }
        results.push(DeleteResult { id: raw, status });
    }
    app.commands().await_read_models(last_position).await;
    Ok(Json(DeleteResults { results }))
}
