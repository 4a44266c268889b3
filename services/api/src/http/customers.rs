//! The customers list (`GET /v1/customers`): the staff console's customer list
//! and its search box, from the customers read model.

use axum::extract::{RawQuery, State};
use axum::routing::get;
use axum::{Json, Router};
use dossier_domain::CustomerIdPrefix;
use dossier_projections::cursor::ActivityCursor;
use dossier_projections::customers::{self, CustomerFilter, CustomerPage};

use crate::auth::Staff;
use crate::error::{ApiError, AppError, ErrorBody};
use crate::http::openapi::schemas::{CustomerCursorText, CustomerPrefixText};
use crate::http::params::QueryPairs;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/customers", get(list_customers))
}

/// `GET /v1/customers`
#[utoipa::path(get, path = "/v1/customers", tag = "customers",
    params(("q" = Option<CustomerPrefixText>, Query, description = "only customers whose id starts with this (case-sensitive; every character stands for itself)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "page size, default 50"),
        ("cursor" = Option<CustomerCursorText>, Query, description = "the `next_cursor` of the previous page")),
    responses(
        (status = 200, description = "One page of the caller's tenant's customers, most recently active first (ties by customer id)", body = CustomerPage),
        (status = 422, description = "validation_failed: a malformed q, limit or cursor (the message names it)", body = ErrorBody)))]
pub async fn list_customers(
    State(app): State<AppState>,
    Staff(caller): Staff,
    RawQuery(query): RawQuery,
) -> Result<Json<CustomerPage>, ApiError> {
    let filter = customer_filter(&QueryPairs::parse(query.as_deref())?)?;
    let page = customers::list(app.pool(), &caller.tenant, &filter)
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?;
    Ok(Json(page))
}

/// `q`, `limit` and `cursor` of the customers list, as the endpoint and the
/// console's customer list take them.
pub fn customer_filter(query: &QueryPairs) -> Result<CustomerFilter, ApiError> {
    Ok(CustomerFilter {
        prefix: query.one("q").map(CustomerIdPrefix::parse).transpose()?,
        limit: query.limit()?,
        cursor: query.cursor(ActivityCursor::decode)?,
    })
}
