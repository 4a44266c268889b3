//! Sending a file's bytes: streamed from the blob store, never held whole,
//! named by the contract's rule 3.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use dossier_domain::naming::{content_disposition, download_name};
use dossier_projections::files::FileView;

use crate::error::ApiError;
use crate::state::AppState;

/// The response for one file: exact bytes, recorded type, length and name.
pub async fn respond(app: &AppState, file: &FileView) -> Result<Response, ApiError> {
    let blob = app.blobs().get(&file.blob_key).await?;
    let name = download_name(&file.name, &file.file_name);
    let disposition = HeaderValue::from_str(&content_disposition(&name))
        .map_err(|_| ApiError::Internal("a download name could not be encoded".into()))?;
    let content_type = HeaderValue::from_str(file.content_type.as_str())
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    let etag = HeaderValue::from_str(&format!("\"{}\"", file.sha256))
        .map_err(|_| ApiError::Internal("a digest could not be encoded".into()))?;
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, blob.size)
        .header(header::CONTENT_DISPOSITION, disposition)
        .header(header::ETAG, etag)
        // The declared type is the uploader's word: never let a browser guess another.
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CACHE_CONTROL, "private, no-store")
        .body(Body::from_stream(blob.body))
        .map_err(|e| ApiError::Internal(e.to_string()))
}
