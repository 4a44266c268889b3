//! `GET /v1/events`: the raw log of the caller's tenant, for auditors, in log
//! order and paged by position. Read through the process's one log reader
//! (shared with every follower, so its safe watermark is worked out once for
//! all of them), so a page never skips an event that commits late; never
//! another tenant's events.

use axum::extract::{RawQuery, State};
use axum::routing::get;
use axum::{Json, Router};
use dossier_eventlog::log::{LogFilter, LoggedEvent};
use dossier_eventlog::personal::Erased;
use serde::Serialize;

use crate::auth::Auditor;
use crate::error::{ApiError, AppError, ErrorBody};
use crate::http::params::QueryPairs;
use crate::state::AppState;

/// The largest page.
const MAX_LIMIT: i64 = 1000;
/// The page size when none is asked for.
const DEFAULT_LIMIT: i64 = 100;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/events", get(list_events))
}

/// A page of the log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventPage {
    /// Events of the caller's tenant, ascending by position; each is the
    /// contract's Event.
    #[schema(value_type = Vec<Object>)]
    items: Vec<LoggedEvent>,
    /// Pass as `after` for the next page: the last item's position, or the
    /// `after` asked for when the page is empty (nothing newer yet).
    next_after: i64,
}

/// `GET /v1/events`
#[utoipa::path(get, path = "/v1/events", tag = "audit",
    params(("after" = Option<i64>, Query, minimum = 0, description = "a position; default 0 (the start)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "page size, default 100"),
        ("decrypt" = Option<bool>, Query, description = "default false: events as stored, personal fields as `enc:v1:<key id>:<base64>` strings (what the hash chain covers). true: personal fields readable; a field whose key is destroyed is null and named in the event's `erased` list")),
    responses((status = 200, description = "The raw log of the caller's tenant, in log order", body = EventPage),
        (status = 422, description = "validation_failed: a malformed after or limit", body = ErrorBody)))]
pub async fn list_events(
    State(app): State<AppState>,
    Auditor(caller): Auditor,
    RawQuery(query): RawQuery,
) -> Result<Json<EventPage>, ApiError> {
    let query = QueryPairs::parse(query.as_deref())?;
    let after = query.int("after", 0, i64::MAX)?.unwrap_or(0);
    let limit = query.int("limit", 1, MAX_LIMIT)?.unwrap_or(DEFAULT_LIMIT);
    let decrypt = query.bool("decrypt")?.unwrap_or(false);
    let filter = LogFilter {
        tenant: Some(caller.tenant.to_string()),
        ..LogFilter::default()
    };
    // A clone is a handle on the same reader: it shares the safe watermark.
    let mut items = app
        .log()
        .clone()
        .read(after, limit, &filter)
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?;
    if decrypt {
        app.cipher()
            .open(&mut items, Erased::Null)
            .await
            .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?;
    }
    let next_after = items.last().map_or(after, |event| event.position);
    Ok(Json(EventPage { items, next_after }))
}
