//! `Idempotency-Key` on every HTTP command (CONTRACT.md "Idempotent
//! requests", ADR 0017): one layer around every route, so no handler has a
//! mechanism of its own.
//!
//! A POST, PUT, PATCH or DELETE with the header claims the key for the
//! caller's tenant and user (`dossier_eventlog::idempotency`) before its
//! handler runs, under a fingerprint of method, path, query and body:
//!
//! - a key never seen (or expired) runs the handler; the command's events
//!   carry the key ([`crate::auth::Caller::context`]), so its receipt is
//!   written with them; the answer is then stored (2xx and 4xx that say
//!   something about the request; a 5xx, `409` or `429` releases the claim:
//!   asking again may succeed);
//! - a key answered before repeats that answer, status, headers and body;
//! - a key whose command was recorded but not answered (the process died)
//!   answers from the receipt, rebuilt from the read models
//!   ([`answer_from_receipt`]);
//! - a key still in flight answers `409 conflict` with `Retry-After`;
//! - a key of another request answers `422 idempotency_key_reused`.
//!
//! A form's file is too large to hash before it is stored, and its boundary
//! differs on every send: its fingerprint covers method and path only, and
//! the first request records the form's content (fields and the file's
//! SHA-256) once [`crate::http::upload::receive`] has it
//! ([`IdempotencyHandle::content`]), before its command runs. A repeat of a
//! form streams its bytes once more through a hash
//! ([`crate::http::upload::form_fingerprint`], nothing stored) and gets the
//! first answer only if they match.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts as _, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use dossier_application::StoredUpload;
use dossier_eventlog::db::Pool;
use dossier_eventlog::idempotency::{self, Claimed, KeyClaim, StoredAnswer};
use dossier_eventlog::receipts::Receipt;
use dossier_projections::files::Audience;
use dossier_projections::portal;
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, AppError};
use crate::http::files;
use crate::state::AppState;

/// The header (case-insensitive, as every header).
pub const HEADER: &str = "idempotency-key";

/// The largest body (not a form) a keyed request is fingerprinted with; the
/// JSON bodies of the API are far smaller.
const MAX_FINGERPRINTED_BODY: usize = 2 * 1024 * 1024;

/// The headers of an answer worth repeating with it.
const REPEATED_HEADERS: &[&str] = &[
    "content-type",
    "location",
    crate::http::files::READ_MODELS_LAG_HEADER,
];

/// Parses a key: 1 to 255 visible ASCII characters.
pub fn parse_key(value: &HeaderValue) -> Result<String, ApiError> {
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(ApiError::validation(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters (no spaces)",
        ));
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// What the handler of a request that holds its key can ask of it (a
/// request extension, set by [`layer`]).
#[derive(Clone)]
pub struct IdempotencyHandle(Arc<HandleInner>);

struct HandleInner {
    pool: Pool,
    claim: KeyClaim,
}

impl IdempotencyHandle {
    /// The key the command's events carry.
    pub fn receipt_key(&self) -> Option<String> {
        Some(self.0.claim.receipt_key())
    }

    /// Records a received form's content with the claim (a repeat must send
    /// the same: [`crate::http::upload::form_fingerprint`]). `Err` means the
    /// handler must stop and discard what it stored.
    pub async fn content(
        &self,
        fields: &HashMap<&'static str, String>,
        file: Option<&StoredUpload>,
    ) -> Result<(), ApiError> {
        let fingerprint = content_fingerprint(
            fields.iter().map(|(name, value)| (*name, value.as_str())),
            file.map(|file| {
                (
                    file.file_name.as_str(),
                    file.content_type.as_str(),
                    file.sha256.as_str(),
                )
            }),
        );
        idempotency::set_content(&self.0.pool, &self.0.claim, &fingerprint)
            .await
            .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))
    }
}

/// The fingerprint of a form's content: its text fields (sorted by name)
/// and its file's name, content type and SHA-256 (hex); the boundary and the
/// order of the parts do not count.
pub fn content_fingerprint<'a>(
    fields: impl Iterator<Item = (&'a str, &'a str)>,
    file: Option<(&str, &str, &str)>,
) -> String {
    let mut hasher = Sha256::new();
    let mut fields: Vec<(&str, &str)> = fields.collect();
    fields.sort();
    for (name, value) in fields {
        hash_part(&mut hasher, name.as_bytes());
        hash_part(&mut hasher, value.as_bytes());
    }
    if let Some((file_name, content_type, sha256)) = file {
        hash_part(&mut hasher, b"\0file");
        hash_part(&mut hasher, file_name.as_bytes());
        hash_part(&mut hasher, content_type.as_bytes());
        hash_part(&mut hasher, sha256.to_ascii_lowercase().as_bytes());
    }
    hex(&hasher.finalize())
}

/// Length-prefixed, so that no two lists of parts hash alike.
fn hash_part(hasher: &mut Sha256, part: &[u8]) {
    hasher.update((part.len() as u64).to_be_bytes());
    hasher.update(part);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_command(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        })
}

/// The layer around every route (see the module header).
pub async fn layer(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if !is_command(request.method()) {
        return next.run(request).await;
    }
    let Some(value) = request.headers().get(HEADER) else {
        return next.run(request).await;
    };
    let key = match parse_key(value) {
        Ok(key) => key,
        Err(error) => return error.into_response(),
    };
    let (mut parts, body) = request.into_parts();
    // Without a caller there is no key's owner: the handler answers 401/403.
    let caller = match Caller::from_request_parts(&mut parts, &app).await {
        Ok(caller) => caller,
        Err(_) => return next.run(Request::from_parts(parts, body)).await,
    };
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let mut hasher = Sha256::new();
    hash_part(&mut hasher, parts.method.as_str().as_bytes());
    hash_part(
        &mut hasher,
        parts
            .uri
            .path_and_query()
            .map_or("", |p| p.as_str())
            .as_bytes(),
    );
    let body = if is_form(&parts.headers) {
        // The form's content is checked once received (module header).
        hash_part(&mut hasher, b"multipart/form-data");
        body
    } else {
        let bytes = match axum::body::to_bytes(body, MAX_FINGERPRINTED_BODY).await {
            Ok(bytes) => bytes,
            Err(_) => {
                return ApiError::validation(
                    "body",
                    "is too large or was cut off (a request with an Idempotency-Key has a body of at most 2 MiB, forms aside)",
                )
                .into_response();
            }
        };
        hash_part(&mut hasher, &Sha256::digest(&bytes));
        Body::from(bytes)
    };
    let claim = KeyClaim {
        tenant: caller.tenant.to_string(),
        subject: caller.sub.clone(),
        key,
        fingerprint: hex(&hasher.finalize()),
        owner: Uuid::now_v7(),
    };
    let claimed = match idempotency::claim(app.pool(), &claim).await {
        Ok(claimed) => claimed,
        Err(error) => return ApiError(AppError::Unavailable(error.to_string())).into_response(),
    };
    let request = Request::from_parts(parts, body);
    match claimed {
        Claimed::Run => run(&app, claim, request, next).await,
        Claimed::Reused => ApiError(AppError::IdempotencyKeyReused).into_response(),
        Claimed::InFlight { retry_after } => {
            ApiError(AppError::IdempotencyKeyInFlight { retry_after }).into_response()
        }
        Claimed::Done {
            answer,
            content_fingerprint,
        } => {
            if let Some(expected) = content_fingerprint
                && let Some(refused) = verify(&app, &expected, request).await
            {
                return refused;
            }
            metrics::counter!("dossier_http_idempotent_repeats_total", "from" => "answer")
                .increment(1);
            stored_response(answer)
        }
        Claimed::Recorded {
            receipt,
            content_fingerprint,
        } => {
            if let Some(expected) = content_fingerprint
                && let Some(refused) = verify(&app, &expected, request).await
            {
                return refused;
            }
            metrics::counter!("dossier_http_idempotent_repeats_total", "from" => "receipt")
                .increment(1);
            tracing::info!(
                tenant = %caller.tenant,
                route = route.as_deref().unwrap_or("-"),
                "answering a repeated request from its receipt: its command was recorded, \
                 its answer was not"
            );
            answer_from_receipt(&app, &caller, route.as_deref(), &receipt).await
        }
    }
}

/// Reads a repeated form only to compare its content with the first
/// request's; `None` when it matched (the caller repeats the first answer),
/// otherwise the answer to give. Nothing of it is stored.
async fn verify(app: &AppState, expected: &str, request: Request) -> Option<Response> {
    let Some(boundary) = crate::http::upload::boundary(request.headers()) else {
        return Some(ApiError(AppError::IdempotencyKeyReused).into_response());
    };
    let max_bytes = app.max_file_bytes().0;
    match crate::http::upload::form_fingerprint(boundary, request.into_body(), max_bytes).await {
        Ok(content) if content == expected => None,
        Ok(_) => Some(ApiError(AppError::IdempotencyKeyReused).into_response()),
        Err(error) => Some(error.into_response()),
    }
}

/// Runs a request that holds the key: its lease is renewed while it runs,
/// and its answer stored (or the claim released) when it has one. A request
/// dropped before it answered (the client went away) releases its claim.
async fn run(app: &AppState, claim: KeyClaim, mut request: Request, next: Next) -> Response {
    let handle = IdempotencyHandle(Arc::new(HandleInner {
        pool: app.pool().clone(),
        claim: claim.clone(),
    }));
    request.extensions_mut().insert(handle);
    let mut guard = ReleaseOnDrop {
        pool: app.pool().clone(),
        claim: Some(claim.clone()),
    };
    let response = {
        let handler = next.run(request);
        tokio::pin!(handler);
        let mut renewal = tokio::time::interval(idempotency::LEASE / 3);
        renewal.tick().await;
        loop {
            tokio::select! {
                response = &mut handler => break response,
                _ = renewal.tick() => {
                    if let Err(error) = idempotency::renew(app.pool(), &claim).await {
                        tracing::warn!(%error, "could not renew an idempotency key's lease; another request may take it over");
                    }
                }
            }
        }
    };
    guard.claim = None;
    let status = response.status();
    let (parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::warn!(%error, "an answer's body could not be read; its key is released");
            let _ = idempotency::release(app.pool(), &claim).await;
            return ApiError(AppError::Internal(error.to_string())).into_response();
        }
    };
    let repeatable = !(status.is_server_error()
        || status == StatusCode::CONFLICT
        || status == StatusCode::TOO_MANY_REQUESTS);
    let stored = if repeatable {
        let answer = StoredAnswer {
            status: status.as_u16(),
            headers: REPEATED_HEADERS
                .iter()
                .filter_map(|name| {
                    parts
                        .headers
                        .get(*name)
                        .and_then(|v| v.to_str().ok())
                        .map(|v| ((*name).to_owned(), v.to_owned()))
                })
                .collect(),
            body: bytes.to_vec(),
        };
        idempotency::complete(app.pool(), &claim, &answer).await
    } else {
        idempotency::release(app.pool(), &claim).await
    };
    if let Err(error) = stored {
        // The answer still goes out; a retry answers from the receipt (if
        // recorded) or runs once the lease ran out (if not).
        tracing::warn!(%error, "could not store the answer of an idempotency key");
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Releases a claim whose request was dropped before it answered.
struct ReleaseOnDrop {
    pool: Pool,
    claim: Option<KeyClaim>,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            let pool = self.pool.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = idempotency::release(&pool, &claim).await;
                });
            }
        }
    }
}

fn stored_response(answer: StoredAnswer) -> Response {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in answer.headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::try_from(name),
            HeaderValue::try_from(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    (status, axum::Json(body)).into_response()
}

/// The answer to a request whose command was recorded and whose answer was
/// not stored, rebuilt from the read models as they show the command now
/// (each route answers as its handler would have).
async fn answer_from_receipt(
    app: &AppState,
    caller: &Caller,
    route: Option<&str>,
    receipt: &Receipt,
) -> Response {
    match rebuild(app, caller, route, receipt).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn rebuild(
    app: &AppState,
    caller: &Caller,
    route: Option<&str>,
    receipt: &Receipt,
) -> Result<Response, ApiError> {
    let Receipt::Accepted {
        aggregate_id,
        position,
        ..
    } = receipt
    else {
        return Err(ApiError(AppError::Internal(
            "a refused command has no events to answer from".into(),
        )));
    };
    app.commands().await_read_models(*position).await;
    let unavailable = |e: &dyn std::fmt::Display| ApiError(AppError::Unavailable(e.to_string()));
    let tenant = &caller.tenant;
    let file = async || files::visible_file(app, tenant, files::file_id(aggregate_id)?).await;
    let task_id = || Uuid::parse_str(aggregate_id).map_err(|_| ApiError(AppError::NotFound));
    let response = match route.unwrap_or_default() {
        "/v1/customers/{customer_id}/files" | "/v1/portal/tasks/{task_id}/attachments" => {
            json_response(StatusCode::CREATED, &file().await?)
        }
        "/v1/files/{id}/signature" => json_response(StatusCode::OK, &file().await?),
        "/v1/files/{id}" if receipt_is_delete(app, *position).await => {
            StatusCode::NO_CONTENT.into_response()
        }
        "/v1/files/{id}" => json_response(StatusCode::OK, &file().await?),
        "/v1/customers/{customer_id}/tasks" => {
            let task = portal::task(app.pool(), tenant, task_id()?, Audience::Staff)
                .await
                .map_err(|e| unavailable(&e))?
                .ok_or(ApiError(AppError::NotFound))?;
            json_response(StatusCode::CREATED, &task)
        }
        "/v1/portal/tasks/{task_id}/messages" | "/v1/tasks/{task_id}/messages" => {
            let payload = event_payload(app, *position).await?;
            let message_id = payload["message_id"]
                .as_str()
                .and_then(|id| Uuid::parse_str(id).ok())
                .ok_or(ApiError(AppError::NotFound))?;
            let task = portal::task(app.pool(), tenant, task_id()?, Audience::Staff)
                .await
                .map_err(|e| unavailable(&e))?
                .ok_or(ApiError(AppError::NotFound))?;
            let message = task
                .messages
                .into_iter()
                .find(|m| m.id == message_id)
                .ok_or(ApiError(AppError::NotFound))?;
            json_response(StatusCode::CREATED, &message)
        }
        "/v1/settings" => {
            let enabled = portal::portal_uploads_enabled(app.pool(), tenant)
                .await
                .map_err(|e| unavailable(&e))?;
            json_response(
                StatusCode::OK,
                &serde_json::json!({"portal_uploads_enabled": enabled}),
            )
        }
        "/v1/bundles" => json_response(
            StatusCode::ACCEPTED,
            &serde_json::json!({"id": aggregate_id, "status": "pending"}),
        ),
        "/v1/customers/{customer_id}/erasure" => {
            let payload = event_payload(app, *position).await?;
            json_response(
                StatusCode::ACCEPTED,
                &serde_json::json!({
                    "erased_files": payload["erased_files"].as_array().map_or(0, Vec::len),
                    "kept_protected_files": payload["kept_protected_files"].as_u64().unwrap_or(0),
                }),
            )
        }
        other => {
            return Err(ApiError(AppError::Internal(format!(
                "no answer can be rebuilt from a receipt for the route {other:?}"
            ))));
        }
    };
    Ok(response)
}

/// The stored payload of the event at `position` (ids and counts are clear).
async fn event_payload(app: &AppState, position: i64) -> Result<serde_json::Value, ApiError> {
    let client = app
        .pool()
        .get()
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?;
    let row = client
        .query_opt(
            "SELECT payload FROM events WHERE position = $1",
            &[&position],
        )
        .await
        .map_err(|e| ApiError(AppError::Unavailable(e.to_string())))?
        .ok_or(ApiError(AppError::NotFound))?;
    Ok(row.get(0))
}

async fn receipt_is_delete(app: &AppState, position: i64) -> bool {
    let Ok(client) = app.pool().get().await else {
        return false;
    };
    client
        .query_opt(
            "SELECT 1 FROM events WHERE position = $1 AND event_type = 'FileDeleted'",
            &[&position],
        )
        .await
        .ok()
        .flatten()
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forms_content_fingerprint_ignores_the_order_of_its_fields_only() {
        let file = Some(("a.pdf", "application/pdf", "ab12"));
        let one = content_fingerprint([("name", "A"), ("visibility", "portal")].into_iter(), file);
        let two = content_fingerprint([("visibility", "portal"), ("name", "A")].into_iter(), file);
        assert_eq!(one, two);
        let other_file = Some(("a.pdf", "application/pdf", "ab13"));
        let three = content_fingerprint(
            [("name", "A"), ("visibility", "portal")].into_iter(),
            other_file,
        );
        assert_ne!(one, three);
        // Length-prefixed parts: moving a character between fields counts.
        let four = content_fingerprint([("name", "Av"), ("isibility", "portal")].into_iter(), file);
        assert_ne!(one, four);
    }

    #[test]
    fn keys_are_visible_ascii_of_at_most_255() {
        assert!(parse_key(&HeaderValue::from_static("k-1")).is_ok());
        assert!(parse_key(&HeaderValue::from_static("")).is_err());
        assert!(parse_key(&HeaderValue::from_static("a b")).is_err());
        let long = "x".repeat(256);
        assert!(parse_key(&HeaderValue::from_str(&long).unwrap()).is_err());
        assert!(parse_key(&HeaderValue::from_str(&long[..255]).unwrap()).is_ok());
    }
}
