//! The staff file endpoints: upload, list, read, download, edit, sign, delete.
//!
//! Each handler parses its input into domain types, runs one command (or a
//! query on the files read model) and answers the contract's File resource.

use axum::extract::{RawQuery, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use dossier_application::{Recording, StoredUpload, UploadedFile};
use dossier_domain::{
    BlobKey, ContractId, CustomerId, DisplayName, FileCommand, FileId, Origin, Visibility,
};
use dossier_projections::files::{self as read_model, FileFilter, FileView, Page};
use serde::{Deserialize, Serialize};

use crate::auth::Staff;
use crate::error::{ApiError, AppError, ErrorBody};
use crate::http::download::{self, Door};
use crate::http::openapi::schemas::{
    Confirm, ContractIdText, CursorText, CustomerIdText, DeleteStatus, DisplayNameText, OriginText,
    TimeOrDate, VisibilityText,
};
use crate::http::params::{JsonBody, PathText, QueryPairs, json_object};
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
    params(("customer_id" = CustomerIdText, Path, description = "The customer's id")),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "The recorded file", body = FileView,
            headers(("dossier-read-models" = String, description = "`lagging` when the lists may not show the file for a moment (CONTRACT.md rule 15)"))),
        (status = 413, description = "file_too_large: over the size limit (the message names it), or a form over its limits; nothing stored", body = ErrorBody),
        (status = 422, description = "validation_failed: a field is missing or malformed (the message names it); nothing stored", body = ErrorBody)))]
pub async fn upload_file(
    State(app): State<AppState>,
    Staff(caller): Staff,
    PathText(customer_id): PathText,
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

/// The form of `POST /v1/customers/{customer_id}/files`, as [`upload::receive`]
/// and [`upload_recording`] read it. Only describes it for the OpenAPI document.
#[derive(utoipa::ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct UploadForm {
    /// The file's size in bytes. Sent as a part before `file`, it lets the
    /// file stream into storage as it arrives; a file of another size is
    /// refused (`validation_failed`, naming `size`) and nothing is stored.
    /// Sent after `file`, it is only checked.
    #[schema(value_type = u64, required = false)]
    size: String,
    /// The content, with its file name (1 to 255 characters, no control
    /// characters) and content type (`application/octet-stream` if none).
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    #[schema(value_type = DisplayNameText)]
    name: String,
    /// Default `internal`.
    #[schema(value_type = VisibilityText, required = false)]
    visibility: String,
    /// Default `staff_upload`.
    #[schema(value_type = OriginText, required = false)]
    origin: String,
    /// Empty means none.
    #[schema(required = false, pattern = r"^((?!\.\.?$)[A-Za-z0-9._:@-]{1,128})?$")]
    contract_id: String,
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
    params(("customer_id" = CustomerIdText, Path, description = "The customer's id"),
        ("viewed" = Option<bool>, Query, description = "only files the customer has (true) or has not (false) opened in the portal"),
        ("visibility" = Option<Vec<VisibilityText>>, Query, explode, description = "repeatable (or comma-separated); any of them"),
        ("created_from" = Option<TimeOrDate>, Query, description = "inclusive; a date is the start of that day (UTC)"),
        ("created_to" = Option<TimeOrDate>, Query, description = "inclusive; a date is the end of that day (UTC)"),
        ("contract_id" = Option<ContractIdText>, Query), ("origin" = Option<OriginText>, Query),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "page size, default 50"),
        ("cursor" = Option<CursorText>, Query, description = "the `next_cursor` of the previous page")),
    responses(
        (status = 200, description = "One page, newest first", body = Page),
        (status = 422, description = "validation_failed: a malformed customer id, filter, limit or cursor", body = ErrorBody)))]
pub async fn list_files(
    State(app): State<AppState>,
    Staff(caller): Staff,
    PathText(customer_id): PathText,
    RawQuery(query): RawQuery,
) -> Result<Json<Page>, ApiError> {
    let customer = CustomerId::parse(&customer_id)?;
    let filter = file_filter(&QueryPairs::parse(query.as_deref())?)?;
    let page = read_model::list(app.pool(), &caller.tenant, &customer, &filter)
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?;
    Ok(Json(page))
}

pub fn file_filter(query: &QueryPairs) -> Result<FileFilter, ApiError> {
    let visibility = query
        .all("visibility")
        .into_iter()
        .map(Visibility::parse)
        .collect::<Result<Vec<_>, _>>()?;
    let paging = query.paging()?;
    Ok(FileFilter {
        viewed: query.bool("viewed")?,
        visibility,
        created_from: query.time_from("created_from")?,
        created_to: query.time_to("created_to")?,
        contract_id: query
            .one("contract_id")
            .map(ContractId::parse)
            .transpose()?
            .map(|id| id.as_str().to_owned()),
        origin: query.one("origin").map(Origin::parse).transpose()?,
        limit: paging.limit,
        cursor: paging.cursor,
    })
}

/// `GET /v1/files/{id}`
#[utoipa::path(get, path = "/v1/files/{id}", tag = "files",
    params(("id" = String, Path, format = Uuid, description = "The file's id")),
    responses((status = 200, description = "The file", body = FileView),
        (status = 404, description = "not_found: unknown, deleted, or another tenant's", body = ErrorBody)))]
pub async fn get_file(
    State(app): State<AppState>,
    Staff(caller): Staff,
    PathText(id): PathText,
) -> Result<Json<FileView>, ApiError> {
    Ok(Json(
        visible_file(&app, &caller.tenant, file_id(&id)?).await?,
    ))
}

/// `GET /v1/files/{id}/content`
#[utoipa::path(get, path = "/v1/files/{id}/content", tag = "files",
    params(("id" = String, Path, format = Uuid, description = "The file's id")),
    responses((status = 200, description = "The exact bytes uploaded, of the recorded content type, named by Content-Disposition; the download is recorded (HEAD records nothing)",
            content(("*/*")),
            headers(("content-disposition" = String, description = "`attachment` with `filename` (ASCII) and `filename*` (UTF-8)"),
                ("etag" = String, description = "the SHA-256 of the bytes, quoted"))),
        (status = 404, description = "not_found: unknown, deleted, or another tenant's", body = ErrorBody),
        (status = 503, description = "unavailable: a backing service is down, or the stored content failed its integrity check (then it is never sent, nothing is recorded, and trying again does not help)", body = ErrorBody)))]
pub async fn file_content(
    State(app): State<AppState>,
    method: Method,
    Staff(caller): Staff,
    PathText(id): PathText,
) -> Result<Response, ApiError> {
    let view = visible_file(&app, &caller.tenant, file_id(&id)?).await?;
    download::respond(&app, &caller.context(), &method, Door::Staff, &view).await
}

/// `PATCH /v1/files/{id}` body: what to change; an absent field stays.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditFile {
    #[schema(value_type = Option<DisplayNameText>)]
    name: Option<String>,
    #[schema(value_type = Option<VisibilityText>)]
    visibility: Option<String>,
}

/// `PATCH /v1/files/{id}`
#[utoipa::path(patch, path = "/v1/files/{id}", tag = "files",
    params(("id" = String, Path, format = Uuid, description = "The file's id")),
    request_body = EditFile,
    responses((status = 200, description = "The file as it is now", body = FileView),
        (status = 404, description = "not_found: unknown, deleted, or another tenant's", body = ErrorBody),
        (status = 422, description = "validation_failed: a malformed name or visibility", body = ErrorBody)))]
pub async fn edit_file(
    State(app): State<AppState>,
    Staff(caller): Staff,
    PathText(id): PathText,
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

/// `POST /v1/files/{id}/signature` body (optional).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignFile {
    /// When it was signed; now if absent.
    signed_at: Option<DateTime<Utc>>,
}

/// `POST /v1/files/{id}/signature`
#[utoipa::path(post, path = "/v1/files/{id}/signature", tag = "files",
    params(("id" = String, Path, format = Uuid, description = "The file's id")),
    request_body(content = Option<SignFile>, description = "optional: none, or `{}`, means signed now"),
    responses((status = 200, description = "The file as it is now", body = FileView),
        (status = 404, description = "not_found: unknown, deleted, or another tenant's", body = ErrorBody),
        (status = 422, description = "validation_failed: a malformed body", body = ErrorBody)))]
pub async fn sign_file(
    State(app): State<AppState>,
    Staff(caller): Staff,
    PathText(id): PathText,
    body: Bytes,
) -> Result<Json<FileView>, ApiError> {
    let id = file_id(&id)?;
    // The body is optional: none, `null` or `{}` means "signed now".
    let body: SignFile = if body.iter().all(u8::is_ascii_whitespace) {
        SignFile::default()
    } else {
        match serde_json::from_slice(&body)
            .map_err(|e| ApiError::validation("body", e.to_string()))?
        {
            serde_json::Value::Null => SignFile::default(),
            value => json_object(value)?,
        }
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
    params(("id" = String, Path, format = Uuid, description = "The file's id"),
        ("confirm" = inline(Confirm), Query, description = "must be true: deleting is permanent")),
    responses((status = 204, description = "Deleted, from every list at once; its bytes are removed"),
        (status = 404, description = "not_found: unknown, already deleted, or another tenant's", body = ErrorBody),
        (status = 409, description = "file_protected: a system or product file, never deleted; or conflict", body = ErrorBody),
        (status = 422, description = "confirmation_required: no `confirm=true`", body = ErrorBody)))]
pub async fn delete_file(
    State(app): State<AppState>,
    Staff(caller): Staff,
    PathText(id): PathText,
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

/// `POST /v1/files/delete` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteFiles {
    /// 1 to 1000 ids; one that is not a UUID is `not_found`.
    #[schema(min_items = 1, max_items = 1000)]
    file_ids: Vec<String>,
    /// Must be true: deleting is permanent (`confirmation_required` otherwise).
    #[serde(default)]
    #[schema(value_type = Confirm, required = true)]
    confirm: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeleteResults {
    results: Vec<DeleteResult>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeleteResult {
    /// The id as given.
    id: String,
    /// `deleted`, `protected`, `not_found`, or, retryable with the same id:
    /// `conflict` (a concurrent change kept winning the race) and
    /// `unavailable` (a backing service failed for this file; it may or may
    /// not be deleted: a retry answers `deleted`, or `not_found` if it was)
    #[schema(value_type = DeleteStatus)]
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
            | AppError::BlobDamaged(_)
            | AppError::TooManyPendingBundles { .. }
            | AppError::IdempotencyKeyReused
            | AppError::IdempotencyKeyInFlight { .. },
        ) => "unavailable",
    }
}

/// At most this many ids in one bulk delete.
const MAX_BULK_DELETE: usize = 1000;

/// `POST /v1/files/delete`
#[utoipa::path(post, path = "/v1/files/delete", tag = "files", request_body = DeleteFiles,
    responses((status = 200, description = "What became of each id, in the order given", body = DeleteResults),
        (status = 422, description = "confirmation_required, or validation_failed: no ids or more than 1000", body = ErrorBody)))]
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
    // Each file's delete is its own command: none carries the request's
    // key (a receipt names one command). A run cut short is safe to run
    // again: a file deleted before answers `not_found` (ADR 0017).
    let ctx = caller.context_without_key();
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
