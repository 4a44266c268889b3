//! The customers list (`GET /v1/customers`): the staff console's customer list
//! and its search box, from the customers read model; and the erasure of a
//! customer (`POST /v1/customers/{customer_id}/erasure`, CONTRACT.md "Data
//! protection").

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use dossier_domain::{CustomerId, CustomerIdPrefix};
use dossier_projections::cursor::ActivityCursor;
use dossier_projections::customers::{self, CustomerFilter, CustomerPage};
use serde::{Deserialize, Serialize};

use crate::auth::Staff;
use crate::error::{ApiError, AppError, ErrorBody};
use crate::http::openapi::schemas::{
    Confirm, CustomerCursorText, CustomerIdText, CustomerPrefixText,
};
use crate::http::params::{JsonBody, PathText, QueryPairs};
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/customers", get(list_customers))
        .route("/v1/customers/{customer_id}/erasure", post(erase_customer))
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

/// `POST /v1/customers/{customer_id}/erasure` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EraseCustomer {
    /// Must be true: an erasure is permanent (`confirmation_required` otherwise).
    #[serde(default)]
    #[schema(value_type = Confirm, required = true)]
    confirm: bool,
}

/// What an erasure did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Erasure)]
pub struct ErasureView {
    /// The customer's files this erasure deleted, their keys destroyed and
    /// their bytes removed from storage (by a worker, right after).
    pub erased_files: u64,
    /// The customer's protected files (origin `system` or `product`), kept.
    pub kept_protected_files: u64,
}

/// `POST /v1/customers/{customer_id}/erasure`
#[utoipa::path(post, path = "/v1/customers/{customer_id}/erasure", tag = "customers",
    params(("customer_id" = CustomerIdText, Path, description = "The customer's id")),
    request_body = EraseCustomer,
    responses(
        (status = 202, description = "Erased: every file of the customer that is not protected is deleted \
            and its key destroyed, the customer's key is destroyed, and no read model shows the customer \
            any more except for its kept files. An erasure of a customer nothing is known of, or a \
            second one, is recorded too and answers what it erased (files recorded since the last one).", body = ErasureView),
        (status = 422, description = "confirmation_required: no `\"confirm\": true`; or validation_failed: a malformed customer id or body", body = ErrorBody)))]
pub async fn erase_customer(
    State(app): State<AppState>,
    Staff(caller): Staff,
    PathText(customer_id): PathText,
    JsonBody(body): JsonBody<EraseCustomer>,
) -> Result<(StatusCode, Json<ErasureView>), ApiError> {
    let customer = CustomerId::parse(&customer_id)?;
    let erasure = app
        .commands()
        .erase_customer(&caller.context(), &customer, body.confirm)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ErasureView {
            erased_files: erasure.erased_files.len() as u64,
            kept_protected_files: erasure.kept_protected_files,
        }),
    ))
}
