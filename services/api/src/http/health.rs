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

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    checks: Vec<Check>,
}

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Check {
    fn from_result(name: &'static str, result: Result<(), String>) -> Self {
        Self {
            name,
            ok: result.is_ok(),
            error: result.err(),
        }
    }
}

/// `GET /readyz`: Postgres, RabbitMQ and the blob store are reachable.
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
        Check::from_result("postgres", postgres),
        Check::from_result("blob_store", blobs),
    ];
    if let Some(broker) = broker {
        checks.push(Check::from_result("rabbitmq", broker));
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
