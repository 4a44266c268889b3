//! The customer portal (`/portal`): the dashboard of a customer's open
//! tasks and the documents published to them, and a task's window with its
//! Details panel, Attachments and message thread. The customer id comes from
//! the session's token, never from the URL; a customer sees only what the
//! portal's API endpoints would show them (rule 8), and nothing here can
//! delete.

use askama::Template;
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use axum::routing::get;
use dossier_domain::{CustomerId, Visibility};
use dossier_projections::cursor::{Cursor, Paging};
use dossier_projections::files::{self as read_model, Audience, FileFilter};
use dossier_projections::portal;

use super::console::TaskBlock;
use super::view::{self, Chrome, FileRow};
use super::{PageError, Viewer, render};
use crate::auth::Caller;
use crate::auth::jwt::Role;
use crate::error::{ApiError, AppError};
use crate::http::params::{PathText, QueryPairs, path_uuid};
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/portal", get(dashboard))
        .route("/portal/tasks/{task_id}", get(task_window))
}

/// The portal's reader: a customer, with their own customer id.
fn customer_of(viewer: Viewer) -> Result<(Caller, CustomerId), PageError> {
    let caller = viewer.only(&[Role::Customer])?;
    let customer = caller.customer.clone().ok_or_else(|| {
        ApiError(AppError::Unauthorized(
            "a customer token needs a customer claim".into(),
        ))
    })?;
    Ok((caller, customer))
}

/// The task as the dashboard lists it.
struct TaskLink {
    id: String,
    title: String,
    created: String,
    created_iso: String,
    attachments: usize,
    messages: usize,
}

#[derive(Template)]
#[template(path = "portal/dashboard.html")]
struct Dashboard {
    chrome: Chrome,
    tasks: Vec<TaskLink>,
    more_tasks_href: Option<String>,
    documents: Vec<FileRow>,
    more_documents_href: Option<String>,
}

/// `GET /portal`: open tasks, newest first, and the published documents
/// (`GET /v1/portal/tasks`, `GET /v1/portal/files`), each paged on its own.
async fn dashboard(
    State(app): State<AppState>,
    viewer: Viewer,
    RawQuery(raw): RawQuery,
) -> Result<Response, PageError> {
    let (caller, customer) = customer_of(viewer)?;
    let query = QueryPairs::parse(raw.as_deref())?.without_blanks();
    let task_paging = paging_of(&query, "tasks_cursor")?;
    let document_paging = paging_of(&query, "documents_cursor")?;
    let tasks = portal::tasks_page(
        app.pool(),
        &caller.tenant,
        &customer,
        Audience::Customer(&customer),
        task_paging,
    )
    .await?;
    let documents = read_model::list(
        app.pool(),
        &caller.tenant,
        &customer,
        &FileFilter {
            // Rule 8: the visibilities the portal shows, and nothing else.
            visibility: Visibility::ALL
                .into_iter()
                .filter(|v| v.in_portal())
                .collect(),
            limit: document_paging.limit,
            cursor: document_paging.cursor,
            ..FileFilter::default()
        },
    )
    .await?;
    Ok(render(Dashboard {
        chrome: Chrome::of(&caller, "/portal"),
        tasks: tasks
            .items
            .iter()
            .map(|t| TaskLink {
                id: t.id.to_string(),
                title: t.title.clone(),
                created: view::when(t.created_at),
                created_iso: view::iso(t.created_at),
                attachments: t.attachments.len(),
                messages: t.messages.len(),
            })
            .collect(),
        more_tasks_href: tasks
            .next_cursor
            .map(|c| format!("/portal?{}", query.with("tasks_cursor", Some(&c)))),
        documents: documents.items.iter().map(FileRow::from).collect(),
        more_documents_href: documents
            .next_cursor
            .map(|c| format!("/portal?{}", query.with("documents_cursor", Some(&c)))),
    }))
}

/// The paging of one of the dashboard's two lists: a page of the default
/// size from its own cursor parameter, read like the API's `cursor`.
fn paging_of(query: &QueryPairs, key: &'static str) -> Result<Paging, PageError> {
    Ok(Paging {
        limit: Paging::DEFAULT_LIMIT,
        cursor: query.cursor_in(key, Cursor::decode)?,
    })
}

#[derive(Template)]
#[template(path = "portal/task.html")]
struct TaskWindow {
    chrome: Chrome,
    task: TaskBlock,
    uploads_enabled: bool,
    limit: view::UploadLimit,
}

/// `GET /portal/tasks/{id}`: one of the customer's own tasks; another
/// customer's or tenant's answers like an unknown one.
async fn task_window(
    State(app): State<AppState>,
    viewer: Viewer,
    PathText(raw): PathText,
) -> Result<Response, PageError> {
    let (caller, customer) = customer_of(viewer)?;
    let id = path_uuid(&raw)?;
    let task = portal::task(
        app.pool(),
        &caller.tenant,
        id,
        Audience::Customer(&customer),
    )
    .await?
    .filter(|task| task.customer_id == customer)
    .ok_or(ApiError(AppError::NotFound))?;
    let uploads_enabled = portal::portal_uploads_enabled(app.pool(), &caller.tenant).await?;
    Ok(render(TaskWindow {
        chrome: Chrome::of(&caller, "/portal"),
        task: TaskBlock::new(&task, &caller.sub, "/v1/portal/files"),
        uploads_enabled,
        limit: view::UploadLimit::of(app.max_file_bytes().0),
    }))
}
