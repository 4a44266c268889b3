//! Tasks and the portal's uploads: staff create and list a customer's tasks;
//! customers list their own, upload files to them and write in their thread;
//! each tenant switches portal uploads on or off.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::{SubsecRound as _, Utc};
use dossier_application::{Recording, StoredUpload, UploadedFile};
use dossier_domain::{
    BlobKey, CustomerId, DisplayName, FileId, MessageText, Origin, Settings, SettingsCommand, Task,
    TaskCommand, TaskTitle, Visibility,
};
use dossier_eventlog::receipts::{self, Receipt};
use dossier_projections::files::{Audience, FileView};
use dossier_projections::portal::{self, MessageView, TaskPage, TaskView};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::{Caller, PortalCustomer, Staff};
use crate::error::{ApiError, AppError, ErrorBody};
use crate::http::files::{self, created_file};
use crate::http::openapi::schemas::{CursorText, CustomerIdText, MessageTextText, TaskTitleText};
use crate::http::params::{JsonBody, PathText, QueryPairs, path_uuid};
use crate::http::upload::{self, FormBody, FormSpec, ReceivedForm};
use crate::state::AppState;

/// The fields of a portal attachment: the file alone.
const ATTACHMENT_FORM: FormSpec = FormSpec {
    text_fields: &[],
    takes_file: true,
};

/// The fields of a message in a task's thread: its text and an optional file.
const MESSAGE_FORM: FormSpec = FormSpec {
    text_fields: &["text"],
    takes_file: true,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/customers/{customer_id}/tasks",
            post(create_task).get(list_tasks),
        )
        .route("/v1/settings", put(put_settings))
        .route("/v1/portal/tasks", get(list_portal_tasks))
        // The forms' own limits answer (upload.rs), not axum's 2 MB default.
        .route(
            "/v1/portal/tasks/{task_id}/attachments",
            post(upload_attachment),
        )
        .route("/v1/portal/tasks/{task_id}/messages", post(post_message))
        .route("/v1/tasks/{task_id}/messages", post(post_staff_message))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Tasks {
    items: Vec<TaskView>,
}

/// `POST /v1/customers/{customer_id}/tasks` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    #[schema(value_type = TaskTitleText)]
    title: String,
}

/// The form of `POST /v1/portal/tasks/{task_id}/messages` (CONTRACT.md: `text`,
/// optional `file`). Only describes it for the OpenAPI document. The server
/// also takes a file with blank text (the portal's paperclip: "add a message
/// if needed"); the document keeps `text` required so that a form of neither
/// stays outside it.
#[derive(utoipa::ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct MessageForm {
    #[schema(value_type = MessageTextText)]
    text: String,
    /// The file's size in bytes. Sent as a part before `file`, it lets the
    /// file stream into storage as it arrives; a file of another size is
    /// refused (`validation_failed`, naming `size`) and nothing is stored.
    /// Sent after `file`, it is only checked.
    #[schema(value_type = u64, required = false)]
    size: String,
    /// The content, with its file name (1 to 255 characters, no control
    /// characters) and content type (`application/octet-stream` if none).
    #[schema(value_type = String, format = Binary, required = false)]
    file: Vec<u8>,
}

/// The form of `POST /v1/portal/tasks/{task_id}/attachments`. Only describes
/// it for the OpenAPI document.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentForm {
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
}

fn read_model_error(error: impl std::fmt::Display) -> ApiError {
    ApiError(AppError::Unavailable(error.to_string()))
}

/// `POST /v1/customers/{customer_id}/tasks`
#[utoipa::path(post, path = "/v1/customers/{customer_id}/tasks", tag = "tasks",
    params(("customer_id" = CustomerIdText, Path, description = "The customer's id")),
    request_body = NewTask,
    responses(
        (status = 201, description = "The task, with no attachments or messages yet", body = TaskView,
            links(
                ("UploadAttachment" = (operation_id = "upload_attachment", parameters(("task_id" = "$response.body#/id")))),
                ("PostMessage" = (operation_id = "post_message", parameters(("task_id" = "$response.body#/id")))),
                ("ListTasks" = (operation_id = "list_tasks", parameters(("customer_id" = "$response.body#/customer_id")))),
            )),
        (status = 422, description = "validation_failed: a malformed customer id or title", body = ErrorBody)))]
pub async fn create_task(
    State(app): State<AppState>,
    Staff(caller): Staff,
    PathText(customer_id): PathText,
    JsonBody(body): JsonBody<NewTask>,
) -> Result<(StatusCode, Json<TaskView>), ApiError> {
    let customer = CustomerId::parse(&customer_id)?;
    let title = TaskTitle::parse(&body.title)?;
    let task_id = Uuid::now_v7();
    let command = TaskCommand::Create {
        tenant: caller.tenant.clone(),
        customer_id: customer.clone(),
        title,
        at: Utc::now(),
    };
    app.commands()
        .run::<Task>(&caller.context(), &task_id.to_string(), command, ())
        .await?;
    let task = portal::task(app.pool(), &caller.tenant, task_id, Audience::Staff)
        .await
        .map_err(read_model_error)?
        .ok_or_else(|| {
            ApiError(AppError::Internal(
                "a created task is missing from the read model".into(),
            ))
        })?;
    Ok((StatusCode::CREATED, Json(task)))
}

/// `GET /v1/customers/{customer_id}/tasks`
#[utoipa::path(get, path = "/v1/customers/{customer_id}/tasks", tag = "tasks",
    params(("customer_id" = CustomerIdText, Path, description = "The customer's id")),
    responses((status = 200, description = "The customer's tasks, oldest first, with every attachment and message", body = Tasks),
        (status = 422, description = "validation_failed: a malformed customer id", body = ErrorBody)))]
pub async fn list_tasks(
    State(app): State<AppState>,
    Staff(caller): Staff,
    PathText(customer_id): PathText,
) -> Result<Json<Tasks>, ApiError> {
    let customer = CustomerId::parse(&customer_id)?;
    let items = portal::tasks_of(app.pool(), &caller.tenant, &customer)
        .await
        .map_err(read_model_error)?;
    Ok(Json(Tasks { items }))
}

/// `GET /v1/portal/tasks`
#[utoipa::path(get, path = "/v1/portal/tasks", tag = "portal",
    params(("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "page size, default 50"),
        ("cursor" = Option<CursorText>, Query, description = "the `next_cursor` of the previous page")),
    responses(
        (status = 200, description = "One page of the customer's own tasks, newest first, with their published attachments and their messages", body = TaskPage),
        (status = 422, description = "validation_failed: a malformed limit or cursor", body = ErrorBody)))]
pub async fn list_portal_tasks(
    State(app): State<AppState>,
    customer: PortalCustomer,
    RawQuery(query): RawQuery,
) -> Result<Json<TaskPage>, ApiError> {
    let paging = QueryPairs::parse(query.as_deref())?.paging()?;
    let page = portal::tasks_page(
        app.pool(),
        &customer.caller.tenant,
        &customer.customer,
        Audience::Customer(&customer.customer),
        paging,
    )
    .await
    .map_err(read_model_error)?;
    Ok(Json(page))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortalSettings {
    portal_uploads_enabled: bool,
}

/// `PUT /v1/settings`
#[utoipa::path(put, path = "/v1/settings", tag = "settings", request_body = PortalSettings,
    responses((status = 200, description = "The tenant's settings as they are now", body = PortalSettings),
        (status = 422, description = "validation_failed: a malformed body", body = ErrorBody)))]
pub async fn put_settings(
    State(app): State<AppState>,
    Staff(caller): Staff,
    JsonBody(body): JsonBody<PortalSettings>,
) -> Result<Json<PortalSettings>, ApiError> {
    let command = SettingsCommand::SetPortalUploads {
        tenant: caller.tenant.clone(),
        enabled: body.portal_uploads_enabled,
    };
    // One Settings aggregate per tenant: its id is the tenant.
    app.commands()
        .run::<Settings>(&caller.context(), caller.tenant.as_str(), command, ())
        .await?;
    let portal_uploads_enabled = portal::portal_uploads_enabled(app.pool(), &caller.tenant)
        .await
        .map_err(read_model_error)?;
    Ok(Json(PortalSettings {
        portal_uploads_enabled,
    }))
}

/// The customer's own task, or 404 (unknown, another customer's or tenant's).
async fn own_task(app: &AppState, customer: &PortalCustomer, raw: &str) -> Result<Uuid, ApiError> {
    let task_id = path_uuid(raw)?;
    let owner = portal::task_customer(app.pool(), &customer.caller.tenant, task_id)
        .await
        .map_err(read_model_error)?;
    match owner {
        Some(owner) if owner == customer.customer => Ok(task_id),
        _ => Err(ApiError(AppError::NotFound)),
    }
}

async fn uploads_enabled(app: &AppState, customer: &PortalCustomer) -> Result<bool, ApiError> {
    portal::portal_uploads_enabled(app.pool(), &customer.caller.tenant)
        .await
        .map_err(read_model_error)
}

/// Who writes in a task's thread or adds to its attachments: the task's
/// customer in the portal, or staff of the tenant in the console.
struct TaskAuthor<'a> {
    caller: &'a Caller,
    /// The task's customer (the files belong to them).
    customer: CustomerId,
    /// Set when the customer writes: the aggregate checks the task is theirs.
    as_customer: Option<CustomerId>,
    /// `customer_upload` from the portal, `staff_upload` from staff.
    origin: Origin,
}

/// Records the stored `file` part of a form as a task attachment the
/// customer sees (visibility `portal`). Refused before the command (no file),
/// the blob is removed here; after that, the upload path decides
/// ([`dossier_application::BlobFate`]).
async fn record_task_upload(
    app: &AppState,
    author: &TaskAuthor<'_>,
    task_id: Uuid,
    file_id: FileId,
    form: &ReceivedForm,
    with_key: bool,
) -> Result<UploadedFile, ApiError> {
    let Some(file) = form.file.clone() else {
        return Err(ApiError::validation("file", "is required"));
    };
    // The seeds: the attachment is named after the file, without its extension.
    let name = match DisplayName::parse(file.file_name.stem())
        .or_else(|_| DisplayName::parse(file.file_name.as_str()))
    {
        Ok(name) => name,
        Err(error) => {
            form.discard(app.uploads()).await;
            return Err(error.into());
        }
    };
    let recording = Recording {
        tenant: author.caller.tenant.clone(),
        file_id,
        customer_id: author.customer.clone(),
        name,
        visibility: Visibility::Portal,
        origin: author.origin,
        contract_id: None,
        task_id: Some(task_id),
    };
    // A message's file is the first of two commands: the request's key goes
    // with the last, the message, and a key derived from it with the file
    // (ADR 0017).
    let ctx = if with_key {
        author.caller.context()
    } else {
        author.caller.part_context(MESSAGE_FILE)
    };
    let recorded = app.uploads().record(&ctx, file, recording).await?;
    Ok(app.uploads().resource(&recorded).await)
}

/// The part of a message request that records its file (see
/// [`Caller::part_key`]).
const MESSAGE_FILE: &str = "file";

/// The file an earlier run of this message request recorded, if one did and
/// then ended before the message (a crash between the two commands): the
/// retry gives that file to the message instead of recording the bytes a
/// second time. Other bytes under the same key are another request.
async fn file_recorded_before(
    app: &AppState,
    author: &TaskAuthor<'_>,
    file: &StoredUpload,
) -> Result<Option<FileId>, ApiError> {
    let Some(key) = author.caller.part_key(MESSAGE_FILE) else {
        return Ok(None);
    };
    let tenant = &author.caller.tenant;
    let Some(Receipt::Accepted {
        aggregate_id,
        position,
        ..
    }) = receipts::find(app.pool(), tenant.as_str(), &key)
        .await
        .map_err(read_model_error)?
    else {
        return Ok(None);
    };
    app.commands().await_read_models(position).await;
    let id = files::file_id(&aggregate_id)?;
    let recorded = files::visible_file(app, tenant, id).await?;
    if recorded.sha256 != file.sha256 {
        return Err(ApiError(AppError::IdempotencyKeyReused));
    }
    Ok(Some(id))
}

/// `POST /v1/portal/tasks/{task_id}/attachments`
#[utoipa::path(post, path = "/v1/portal/tasks/{task_id}/attachments", tag = "portal",
    params(("task_id" = String, Path, format = Uuid, description = "The task's id")),
    request_body(content = AttachmentForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "The recorded file: origin customer_upload, visibility portal, named after the file", body = FileView,
            headers(("dossier-read-models" = String, description = "`lagging` when the lists may not show the file for a moment (CONTRACT.md rule 15)"))),
        (status = 403, description = "portal_upload_disabled: the tenant has turned portal uploads off; or forbidden", body = ErrorBody),
        (status = 404, description = "not_found: unknown task, or another customer's or tenant's", body = ErrorBody),
        (status = 413, description = "file_too_large: over the size limit (the message names it), or a form over its limits; nothing stored", body = ErrorBody),
        (status = 422, description = "validation_failed: no file, or a malformed form; nothing stored", body = ErrorBody)))]
pub async fn upload_attachment(
    State(app): State<AppState>,
    customer: PortalCustomer,
    PathText(task_id): PathText,
    body: FormBody,
) -> Result<Response, ApiError> {
    let task_id = own_task(&app, &customer, &task_id).await?;
    if !uploads_enabled(&app, &customer).await? {
        return Err(ApiError(AppError::PortalUploadDisabled));
    }
    let file_id = FileId::new();
    let key = BlobKey::for_file(&customer.caller.tenant, &customer.customer, file_id);
    let limit = app.max_file_bytes().0;
    let form = upload::receive(body, &ATTACHMENT_FORM, app.uploads(), key, limit).await?;
    let author = TaskAuthor {
        caller: &customer.caller,
        customer: customer.customer.clone(),
        as_customer: Some(customer.customer.clone()),
        origin: Origin::CustomerUpload,
    };
    let uploaded = record_task_upload(&app, &author, task_id, file_id, &form, true).await?;
    Ok(created_file(uploaded))
}

/// `POST /v1/portal/tasks/{task_id}/messages`
#[utoipa::path(post, path = "/v1/portal/tasks/{task_id}/messages", tag = "portal",
    params(("task_id" = String, Path, format = Uuid, description = "The task's id")),
    request_body(content = MessageForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "The message, in the task's thread; its file is also a task attachment", body = MessageView),
        (status = 403, description = "portal_upload_disabled: a file while the tenant has turned portal uploads off; or forbidden", body = ErrorBody),
        (status = 404, description = "not_found: unknown task, or another customer's or tenant's", body = ErrorBody),
        (status = 413, description = "file_too_large: over the size limit (the message names it), or a form over its limits; nothing stored", body = ErrorBody),
        (status = 422, description = "validation_failed: neither text nor a file, or a malformed form; nothing stored", body = ErrorBody)))]
pub async fn post_message(
    State(app): State<AppState>,
    customer: PortalCustomer,
    PathText(task_id): PathText,
    body: FormBody,
) -> Result<(StatusCode, Json<MessageView>), ApiError> {
    let task_id = own_task(&app, &customer, &task_id).await?;
    // Text alone is always welcome; a file only when the tenant allows uploads.
    let refuse_file = (!uploads_enabled(&app, &customer).await?)
        .then_some(ApiError(AppError::PortalUploadDisabled));
    let author = TaskAuthor {
        caller: &customer.caller,
        customer: customer.customer.clone(),
        as_customer: Some(customer.customer.clone()),
        origin: Origin::CustomerUpload,
    };
    post_in_thread(&app, &author, task_id, body, refuse_file).await
}

/// `POST /v1/tasks/{task_id}/messages`: staff write in a task's thread (the
/// thread is two-way); a file with the message is a task attachment the
/// customer sees. The portal upload switch is the customer's, not staff's.
#[utoipa::path(post, path = "/v1/tasks/{task_id}/messages", tag = "tasks",
    params(("task_id" = String, Path, format = Uuid, description = "The task's id")),
    request_body(content = MessageForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "The message, in the task's thread; its file is also a task attachment, shown in the portal", body = MessageView),
        (status = 404, description = "not_found: unknown task, or another tenant's", body = ErrorBody),
        (status = 413, description = "file_too_large: over the size limit (the message names it), or a form over its limits; nothing stored", body = ErrorBody),
        (status = 422, description = "validation_failed: neither text nor a file, or a malformed form; nothing stored", body = ErrorBody)))]
pub async fn post_staff_message(
    State(app): State<AppState>,
    Staff(caller): Staff,
    PathText(task_id): PathText,
    body: FormBody,
) -> Result<(StatusCode, Json<MessageView>), ApiError> {
    let task_id = path_uuid(&task_id)?;
    let customer = portal::task_customer(app.pool(), &caller.tenant, task_id)
        .await
        .map_err(read_model_error)?
        .ok_or(ApiError(AppError::NotFound))?;
    let author = TaskAuthor {
        caller: &caller,
        customer,
        as_customer: None,
        origin: Origin::StaffUpload,
    };
    post_in_thread(&app, &author, task_id, body, None).await
}

/// Writes `author`'s message, with the form's file as a task attachment
/// (recorded first: it is an attachment in its own right), in the thread of
/// `task_id`. A form with a file is refused with `refuse_file` when given.
async fn post_in_thread(
    app: &AppState,
    author: &TaskAuthor<'_>,
    task_id: Uuid,
    body: FormBody,
    refuse_file: Option<ApiError>,
) -> Result<(StatusCode, Json<MessageView>), ApiError> {
    let file_id = FileId::new();
    let key = BlobKey::for_file(&author.caller.tenant, &author.customer, file_id);
    let form = upload::receive_unless(
        body,
        &MESSAGE_FORM,
        app.uploads(),
        key,
        app.max_file_bytes().0,
        refuse_file,
    )
    .await?;
    let text = match MessageText::parse(form.field("text").unwrap_or_default()) {
        Ok(text) => text,
        Err(error) => {
            form.discard(app.uploads()).await;
            return Err(error.into());
        }
    };
    // CONTRACT.md: `text`, optional `file`. The portal guide says to "add a
    // message if needed" to a file: a message is some text, a file, or both.
    if text.is_empty() && form.file.is_none() {
        form.discard(app.uploads()).await;
        return Err(ApiError::validation("text", "is required"));
    }
    let file_id = match &form.file {
        None => None,
        Some(file) => {
            let before = file_recorded_before(app, author, file).await;
            // Bytes received again for a file already recorded, or refused:
            // nothing keeps them.
            if !matches!(before, Ok(None)) {
                form.discard(app.uploads()).await;
            }
            Some(match before? {
                Some(recorded) => recorded,
                None => {
                    record_task_upload(app, author, task_id, file_id, &form, false)
                        .await?
                        .file
                        .id
                }
            })
        }
    };
    let message_id = Uuid::now_v7();
    // The log keeps microseconds: the answer says what a later read says
    // (an answer rebuilt from the log after a crash, ADR 0017).
    let at = Utc::now().trunc_subsecs(6);
    let command = TaskCommand::PostMessage {
        tenant: author.caller.tenant.clone(),
        as_customer: author.as_customer.clone(),
        message_id,
        author: author.caller.actor(),
        text: text.clone(),
        file_id,
        at,
    };
    app.commands()
        .run::<Task>(&author.caller.context(), &task_id.to_string(), command, ())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(MessageView {
            id: message_id,
            author: author.caller.sub.clone(),
            text: text.as_str().to_owned(),
            at,
            file_id: file_id.map(|id| id.0),
        }),
    ))
}
