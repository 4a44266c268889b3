//! `GET /v1/audit`: the audit trail of the caller's tenant, for staff and
//! auditors (customers get 403). Written by the audit worker
//! (`dossier_workers::audit`) from every event of the log; read through
//! `dossier_projections::audit`.

use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use dossier_domain::{CustomerId, FileId, TenantId};
use dossier_projections::audit::{self, AuditEntry, AuditFilter};
use serde::Serialize;

use crate::auth::StaffOrAuditor;
use crate::error::{ApiError, AppError, ErrorBody};
use crate::http::openapi::schemas::{AuditCursorText, CustomerIdText, TimeOrDate};
use crate::http::params::QueryPairs;
use crate::state::AppState;

/// How long an answer waits for the audit worker to catch up with the log
/// (read-your-writes, CONTRACT.md rule 10). After that it answers what there is.
const FRESHNESS_TIMEOUT: Duration = Duration::from_secs(5);

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/audit", get(list_audit))
}

/// One entry of the trail.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditItem {
    /// The event's log position (see `GET /v1/events`).
    position: i64,
    at: DateTime<Utc>,
    /// Who: a user id, `upstream`, a worker.
    actor: String,
    /// What, e.g. `file.uploaded`, `file.downloaded`, `file.renamed`, `task.created`.
    action: String,
    file_id: Option<String>,
    customer_id: Option<String>,
    /// Everything else the event says (`channel` of a download, `from` and `name`
    /// of a rename, ...).
    #[schema(value_type = Object)]
    details: serde_json::Value,
    /// Personal fields of `details` whose key is destroyed (a deleted file,
    /// an erased customer): each is null in `details`. Absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    erased: Vec<String>,
}

impl From<AuditEntry> for AuditItem {
    fn from(entry: AuditEntry) -> Self {
        Self {
            position: entry.position,
            at: entry.at,
            actor: entry.actor,
            action: entry.action,
            file_id: entry.file_id,
            customer_id: entry.customer_id,
            details: entry.details,
            erased: entry.erased,
        }
    }
}

/// One page of the trail.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    items: Vec<AuditItem>,
    next_cursor: Option<String>,
}

/// `GET /v1/audit`
#[utoipa::path(get, path = "/v1/audit", tag = "audit",
    params(("customer_id" = Option<CustomerIdText>, Query, description = "only this customer's entries"),
        ("file_id" = Option<String>, Query, format = Uuid, description = "only this file's entries"),
        ("from" = Option<TimeOrDate>, Query, description = "inclusive; a date is the start of that day (UTC)"),
        ("to" = Option<TimeOrDate>, Query, description = "inclusive; a date is the end of that day (UTC)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "page size, default 50"),
        ("cursor" = Option<AuditCursorText>, Query, description = "the `next_cursor` of the previous page")),
    responses((status = 200, description = "The caller's tenant's audit trail, newest first", body = AuditPage),
        (status = 422, description = "validation_failed: a malformed filter, limit or cursor", body = ErrorBody)))]
pub async fn list_audit(
    State(app): State<AppState>,
    StaffOrAuditor(caller): StaffOrAuditor,
    RawQuery(query): RawQuery,
) -> Result<Json<AuditPage>, ApiError> {
    let query = QueryPairs::parse(query.as_deref())?;
    let page = fresh_page(&app, &caller.tenant, &audit_filter(&query)?).await?;
    Ok(Json(AuditPage {
        items: page.items.into_iter().map(AuditItem::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// The trail's filter from a query string (`customer_id`, `file_id`, `from`,
/// `to`, `limit`, `cursor`): the API's and the audit page's.
pub fn audit_filter(query: &QueryPairs) -> Result<AuditFilter, ApiError> {
    let before = query
        .one("cursor")
        .map(|raw| {
            audit::decode_cursor(raw)
                .ok_or_else(|| ApiError::validation("cursor", "is not a cursor this API gave out"))
        })
        .transpose()?;
    Ok(AuditFilter {
        customer_id: query
            .one("customer_id")
            .map(CustomerId::parse)
            .transpose()?
            .map(|id| id.as_str().to_owned()),
        file_id: query
            .one("file_id")
            .map(FileId::parse)
            .transpose()?
            .map(|id| id.to_string()),
        from: query.time_from("from")?,
        to: query.time_to("to")?,
        limit: query.int("limit", 1, 500)?.unwrap_or(50),
        before,
    })
}

/// One page of `tenant`'s trail, once the audit worker has caught up with
/// the log (read-your-writes, rule 10) or the freshness timeout has passed.
pub async fn fresh_page(
    app: &AppState,
    tenant: &TenantId,
    filter: &AuditFilter,
) -> Result<audit::AuditPage, ApiError> {
    let unavailable =
        |e: dossier_projections::ProjectionError| ApiError(AppError::Unavailable(e.to_string()));
    audit::wait_until_complete(app.pool(), tenant.as_str(), FRESHNESS_TIMEOUT)
        .await
        .map_err(unavailable)?;
    audit::query(app.pool(), Some(app.cipher()), tenant.as_str(), filter)
        .await
        .map_err(unavailable)
}
