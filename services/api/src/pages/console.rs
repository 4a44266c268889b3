//! The staff console (`/app`): the tenant's customers, a customer's Files
//! tab and Tasks, the portal settings and the audit trail. Each page reads
//! the read model the matching API endpoint reads, parses its query with the
//! same parser, and so shows exactly what that endpoint would answer.
//! Auditors see the audit trail only.

use askama::Template;
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use dossier_domain::{CustomerId, Visibility};
use dossier_projections::files as read_model;
use dossier_projections::portal;

use super::view::{self, Chrome, FileRow};
use super::{PageError, Viewer, render};
use crate::auth::jwt::Role;
use crate::error::{ApiError, AppError};
use crate::http::audit::{audit_filter, fresh_page};
use crate::http::files::file_filter;
use crate::http::params::{PathText, QueryPairs};
use crate::state::AppState;

const STAFF: &[Role] = &[Role::Staff, Role::System];
const AUDIT_READERS: &[Role] = &[Role::Staff, Role::System, Role::Auditor];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/app", get(customers))
        .route("/app/customers/open", get(open_customer))
        .route("/app/customers/{customer_id}", get(customer))
        .route("/app/customers/{customer_id}/files", get(files_tab))
        .route("/app/customers/{customer_id}/tasks", get(tasks_tab))
        .route("/app/settings", get(settings))
        .route("/app/audit", get(audit))
}

/// A page's query: what the API would parse, with the blank fields of a
/// filter form left out.
fn page_query(raw: Option<&str>) -> Result<QueryPairs, PageError> {
    Ok(QueryPairs::parse(raw)?.without_blanks())
}

fn unavailable(error: impl std::fmt::Display) -> PageError {
    PageError::Api(ApiError(AppError::Unavailable(error.to_string())))
}

// ------------------------------------------------------------ customers

#[derive(Template)]
#[template(path = "console/customers.html")]
struct CustomersPage {
    chrome: Chrome,
    q: String,
    rows: Vec<CustomerRow>,
    next_href: Option<String>,
}

struct CustomerRow {
    id: String,
    files: u64,
    open_tasks: u64,
    last_activity: String,
    last_activity_iso: String,
}

/// `GET /app`: the tenant's customers, most recently active first,
/// searchable by the start of their id (`GET /v1/customers`).
async fn customers(
    State(app): State<AppState>,
    viewer: Viewer,
    RawQuery(raw): RawQuery,
) -> Result<Response, PageError> {
    let caller = viewer.only(STAFF)?;
    let query = page_query(raw.as_deref())?;
    let filter = crate::http::customers::customer_filter(&query)?;
    let page = dossier_projections::customers::list(app.pool(), &caller.tenant, &filter)
        .await
        .map_err(unavailable)?;
    Ok(render(CustomersPage {
        chrome: Chrome::of(&caller, "/app"),
        q: query.one("q").unwrap_or_default().to_owned(),
        rows: page
            .items
            .iter()
            .map(|c| CustomerRow {
                id: c.customer_id.as_str().to_owned(),
                files: c.files,
                open_tasks: c.open_tasks,
                last_activity: view::when(c.last_activity_at),
                last_activity_iso: view::iso(c.last_activity_at),
            })
            .collect(),
        next_href: page
            .next_cursor
            .map(|cursor| format!("/app?{}", query.with("cursor", Some(&cursor)))),
    }))
}

/// `GET /app/customers/open?customer_id=…`: "open customer by id", also one
/// with no files yet.
async fn open_customer(viewer: Viewer, RawQuery(raw): RawQuery) -> Result<Response, PageError> {
    viewer.only(STAFF)?;
    let query = page_query(raw.as_deref())?;
    let id = query
        .one("customer_id")
        .ok_or_else(|| ApiError::validation("customer_id", "is required"))?;
    let customer = CustomerId::parse(id.trim())?;
    Ok(Redirect::to(&format!("/app/customers/{}/files", customer.as_str())).into_response())
}

/// `GET /app/customers/{id}`: the customer opens on its Files tab.
async fn customer(viewer: Viewer, PathText(id): PathText) -> Result<Response, PageError> {
    viewer.only(STAFF)?;
    let customer = CustomerId::parse(&id)?;
    Ok(Redirect::to(&format!("/app/customers/{}/files", customer.as_str())).into_response())
}

// ------------------------------------------------------------ Files tab

#[derive(Template)]
#[template(path = "console/files.html")]
struct FilesTab {
    chrome: Chrome,
    customer: String,
    rows: Vec<FileRow>,
    filters: FilesFilterForm,
    filtered: bool,
    next_href: Option<String>,
    first_href: Option<String>,
    limit: view::UploadLimit,
}

/// The filter form as the person left it.
struct FilesFilterForm {
    viewed: String,
    visibility: Vec<VisibilityChoice>,
    created_from: String,
    created_to: String,
    contract_id: String,
}

struct VisibilityChoice {
    value: &'static str,
    label: &'static str,
    checked: bool,
}

/// `GET /app/customers/{id}/files`: the seed's Files table with its filters,
/// 50 files a page, newest first (`GET /v1/customers/{id}/files`).
async fn files_tab(
    State(app): State<AppState>,
    viewer: Viewer,
    PathText(id): PathText,
    RawQuery(raw): RawQuery,
) -> Result<Response, PageError> {
    let caller = viewer.only(STAFF)?;
    let customer = CustomerId::parse(&id)?;
    let query = page_query(raw.as_deref())?;
    let filter = file_filter(&query)?;
    let page = read_model::list(app.pool(), &caller.tenant, &customer, &filter).await?;
    let chosen = query.all("visibility");
    let filters = FilesFilterForm {
        viewed: query.one("viewed").unwrap_or_default().to_owned(),
        visibility: Visibility::ALL
            .into_iter()
            .map(|v| VisibilityChoice {
                value: v.as_str(),
                label: view::visibility_label(v),
                checked: chosen.contains(&v.as_str()),
            })
            .collect(),
        created_from: query.one("created_from").unwrap_or_default().to_owned(),
        created_to: query.one("created_to").unwrap_or_default().to_owned(),
        contract_id: query.one("contract_id").unwrap_or_default().to_owned(),
    };
    let base = format!("/app/customers/{}/files", customer.as_str());
    let filtered = [
        "viewed",
        "visibility",
        "created_from",
        "created_to",
        "contract_id",
    ]
    .iter()
    .any(|key| query.one(key).is_some());
    Ok(render(FilesTab {
        chrome: Chrome::of(&caller, "/app"),
        customer: customer.as_str().to_owned(),
        rows: page.items.iter().map(FileRow::from).collect(),
        filters,
        filtered,
        next_href: page
            .next_cursor
            .map(|cursor| format!("{base}?{}", query.with("cursor", Some(&cursor)))),
        first_href: query
            .one("cursor")
            .map(|_| format!("{base}?{}", query.with("cursor", None))),
        limit: view::UploadLimit::of(app.max_file_bytes().0),
    }))
}

// ------------------------------------------------------------ Tasks tab

#[derive(Template)]
#[template(path = "console/tasks.html")]
struct TasksTab {
    chrome: Chrome,
    customer: String,
    tasks: Vec<TaskBlock>,
    limit: view::UploadLimit,
}

/// A task as a page shows it: its attachments and its thread.
pub struct TaskBlock {
    pub id: String,
    pub title: String,
    pub created: String,
    pub created_iso: String,
    pub attachments: Vec<FileRow>,
    pub messages: Vec<MessageRow>,
}

pub struct MessageRow {
    pub author: String,
    pub mine: bool,
    pub text: String,
    pub at: String,
    pub at_iso: String,
    /// The attached file's display and file name, and its download link.
    pub file: Option<(String, String, String)>,
}

impl TaskBlock {
    /// `task` for a page whose reader is `me` (a user id, or the customer's
    /// id in the portal), with file links through `content` (the staff or the
    /// portal download path, before `/{id}/content`).
    pub fn new(task: &portal::TaskView, me: &str, content: &str) -> Self {
        let messages = task
            .messages
            .iter()
            .map(|m| MessageRow {
                author: m.author.clone(),
                mine: m.author == me,
                text: m.text.clone(),
                at: view::when(m.at),
                at_iso: view::iso(m.at),
                file: m.file_id.and_then(|id| {
                    task.attachments.iter().find(|f| f.id.0 == id).map(|f| {
                        (
                            f.name.as_str().to_owned(),
                            f.file_name.as_str().to_owned(),
                            format!("{content}/{id}/content"),
                        )
                    })
                }),
            })
            .collect();
        Self {
            id: task.id.to_string(),
            title: task.title.clone(),
            created: view::when(task.created_at),
            created_iso: view::iso(task.created_at),
            attachments: task.attachments.iter().map(FileRow::from).collect(),
            messages,
        }
    }
}

/// `GET /app/customers/{id}/tasks`: the customer's tasks, oldest first, with
/// attachments and threads (`GET /v1/customers/{id}/tasks`).
async fn tasks_tab(
    State(app): State<AppState>,
    viewer: Viewer,
    PathText(id): PathText,
) -> Result<Response, PageError> {
    let caller = viewer.only(STAFF)?;
    let customer = CustomerId::parse(&id)?;
    let tasks = portal::tasks_of(app.pool(), &caller.tenant, &customer).await?;
    Ok(render(TasksTab {
        chrome: Chrome::of(&caller, "/app"),
        customer: customer.as_str().to_owned(),
        tasks: tasks
            .iter()
            .map(|t| TaskBlock::new(t, &caller.sub, "/v1/files"))
            .collect(),
        limit: view::UploadLimit::of(app.max_file_bytes().0),
    }))
}

// ------------------------------------------------------------ settings

#[derive(Template)]
#[template(path = "console/settings.html")]
struct SettingsPage {
    chrome: Chrome,
    portal_uploads_enabled: bool,
}

/// `GET /app/settings`: the portal upload switch (`PUT /v1/settings`).
async fn settings(State(app): State<AppState>, viewer: Viewer) -> Result<Response, PageError> {
    let caller = viewer.only(STAFF)?;
    let enabled = portal::portal_uploads_enabled(app.pool(), &caller.tenant).await?;
    Ok(render(SettingsPage {
        chrome: Chrome::of(&caller, "/app/settings"),
        portal_uploads_enabled: enabled,
    }))
}

// ------------------------------------------------------------ audit

#[derive(Template)]
#[template(path = "console/audit.html")]
struct AuditPage {
    chrome: Chrome,
    customer_id: String,
    file_id: String,
    from: String,
    to: String,
    rows: Vec<AuditRow>,
    next_href: Option<String>,
}

struct AuditRow {
    at: String,
    at_iso: String,
    actor: String,
    action: String,
    customer_id: String,
    file_id: String,
    details: String,
}

/// `GET /app/audit`: the trail, newest first, filtered by customer, file
/// and period (`GET /v1/audit`).
async fn audit(
    State(app): State<AppState>,
    viewer: Viewer,
    RawQuery(raw): RawQuery,
) -> Result<Response, PageError> {
    let caller = viewer.only(AUDIT_READERS)?;
    let query = page_query(raw.as_deref())?;
    let page = fresh_page(&app, &caller.tenant, &audit_filter(&query)?).await?;
    let text = |key| query.one(key).unwrap_or_default().to_owned();
    Ok(render(AuditPage {
        chrome: Chrome::of(&caller, "/app/audit"),
        customer_id: text("customer_id"),
        file_id: text("file_id"),
        from: text("from"),
        to: text("to"),
        rows: page
            .items
            .iter()
            .map(|entry| AuditRow {
                at: view::when(entry.at),
                at_iso: view::iso(entry.at),
                actor: entry.actor.clone(),
                action: entry.action.clone(),
                customer_id: entry.customer_id.clone().unwrap_or_default(),
                file_id: entry.file_id.clone().unwrap_or_default(),
                details: details_text(&entry.details),
            })
            .collect(),
        next_href: page
            .next_cursor
            .map(|cursor| format!("/app/audit?{}", query.with("cursor", Some(&cursor)))),
    }))
}

/// An entry's details as `key: value` pairs, in the order the event has them.
fn details_text(details: &serde_json::Value) -> String {
    match details {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(key, value)| match value {
                serde_json::Value::String(s) => format!("{key}: {s}"),
                other => format!("{key}: {other}"),
            })
            .collect::<Vec<_>>()
            .join(" · "),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}
