//! Operations endpoints: liveness, readiness, metrics and the OpenAPI document.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;

use crate::state::AppState;

/// `GET /healthz`: the process is up.
pub async fn healthz() -> &'static str {
    "ok"
}

/// The answer of `/readyz`: whether every backing service is reachable, and
/// each check by its stable name. It is unauthenticated, so it never carries
/// a backend's error text (bucket, endpoint, directory, broker host): that
/// goes to the log.
#[derive(Serialize)]
struct Readiness {
    ready: bool,
    checks: Vec<Check>,
}

#[derive(Serialize)]
struct Check {
    /// `postgres`, `rabbitmq` or `blob_store`.
    name: &'static str,
    ok: bool,
}

impl Check {
    /// The check's answer; a failure's detail is logged, never answered.
    fn logged(name: &'static str, result: Result<(), String>) -> Self {
        if let Err(detail) = &result {
            tracing::warn!(check = name, %detail, "readiness check failed: /readyz answers 503");
        }
        Self {
            name,
            ok: result.is_ok(),
        }
    }
}

/// `GET /readyz`: Postgres, RabbitMQ (when this process talks to it) and the
/// blob store are reachable. Every check only reads.
pub async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    let postgres = async {
        let client = app.pool().get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let blobs = async { app.blobs().check().await.map_err(|e| e.to_string()) };
    let broker = async {
        match app.broker() {
            Some(broker) => Some(broker.check().await.map_err(|e| e.to_string())),
            None => None,
        }
    };
    let (postgres, blobs, broker) = tokio::join!(postgres, blobs, broker);
    let mut checks = vec![
        Check::logged("postgres", postgres),
        Check::logged("blob_store", blobs),
    ];
    if let Some(broker) = broker {
        checks.push(Check::logged("rabbitmq", broker));
    }
    let ready = checks.iter().all(|c| c.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { ready, checks }))
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics().render(),
    )
}
