//! The HTTP API: routes, request telemetry and the OpenAPI document.
//!
//! One module per resource; each handler parses, runs one command or query,
//! and answers. Errors leave through [`crate::error::ApiError`] only.

pub mod audit;
pub mod bundles;
pub mod download;
pub mod events;
pub mod files;
pub mod health;
pub mod openapi;
pub mod params;
pub mod portal;
pub mod tasks;
pub mod upload;

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use tracing::Instrument;

use crate::state::AppState;

/// Every route of the API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(files::routes())
        .merge(bundles::routes())
        .merge(audit::routes())
        .merge(events::routes())
        .merge(portal::routes())
        .merge(tasks::routes())
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::document))
        .fallback(|| async { crate::error::ApiError(crate::error::AppError::NotFound) })
        .layer(middleware::from_fn(observe))
        .with_state(state)
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
