//! The HTTP API: routes, request telemetry and the OpenAPI document.
//!
//! One module per resource; each handler parses, runs one command or query,
//! and answers. Errors leave through [`crate::error::ApiError`] only.

pub mod audit;
pub mod bundles;
pub mod customers;
pub mod download;
pub mod events;
pub mod files;
pub mod health;
pub mod idempotency;
pub mod openapi;
pub mod params;
pub mod portal;
pub mod serve;
pub mod tasks;
pub mod upload;

use std::any::Any;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse as _, Response};
use axum::routing::get;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use crate::error::{ApiError, AppError};
use crate::state::AppState;

/// Every route of the API.
pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .merge(files::routes())
        .merge(bundles::routes())
        .merge(customers::routes())
        .merge(audit::routes())
        .merge(events::routes())
        .merge(portal::routes())
        .merge(tasks::routes())
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::document))
        .merge(crate::pages::routes())
        .fallback(|| async { ApiError(AppError::NotFound) });
    // Inside the edge layers, so a repeated answer is observed like any; on
    // the routes only, so that a method a path does not take is answered 405
    // by the router before any key is claimed.
    let routes = routes.route_layer(middleware::from_fn_with_state(
        state.clone(),
        idempotency::layer,
    ));
    with_edge_layers(routes)
        .layer(middleware::from_fn(crate::pages::security_headers))
        .with_state(state)
}

/// Wraps every route of `router` in what the edge puts around each one,
/// innermost first: a handler that panics answers the contract's `500
/// internal` (and is logged) instead of taking its connection down, then
/// request telemetry, which so counts that 500 too. Public so that a test can
/// put a handler that panics under exactly these layers without the API
/// shipping such a route.
pub fn with_edge_layers<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(observe))
}

/// The answer to a handler that panicked: the contract's error body with the
/// code `internal`. The panic's message is neither answered nor logged (it
/// may quote personal data); the service's panic hook logs where it happened.
pub fn panic_response(_panic: Box<dyn Any + Send + 'static>) -> Response {
    ApiError(AppError::Internal(
        "a request handler panicked (the service log says where)".to_owned(),
    ))
    .into_response()
}

/// Request latency and counts by route, and one span per request.
async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let span = tracing::info_span!("http", %method, route = %route);
    let response = next.run(request).instrument(span).await;
    let status = response.status().as_u16().to_string();
    let elapsed = started.elapsed();
    metrics::histogram!("dossier_http_request_duration_seconds", "method" => method.to_string(), "route" => route.clone(), "status" => status.clone())
        .record(elapsed.as_secs_f64());
    tracing::debug!(%method, %route, %status, elapsed_ms = elapsed.as_millis() as u64, "request answered");
    response
}
