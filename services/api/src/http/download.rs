//! Sending a file's bytes: streamed from the blob store, never held whole,
//! named by the contract's rule 3, and recorded in the log first (rule 9:
//! every download, by anyone, is in the audit trail).

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use chrono::Utc;
use dossier_domain::naming::{content_disposition, download_name};
use dossier_domain::{Download, DownloadChannel, DownloadedFile, RecordDownload};
use dossier_projections::files::FileView;
use uuid::Uuid;

use crate::commands::CommandContext;
use crate::error::{ApiError, AppError};
use crate::state::AppState;

/// Records that `files` are being downloaded through `channel`, before any
/// byte leaves: a download that cannot be recorded does not happen.
pub async fn record(
    app: &AppState,
    ctx: &CommandContext,
    channel: DownloadChannel,
    bundle_id: Option<Uuid>,
    files: Vec<DownloadedFile>,
) -> Result<(), ApiError> {
    let command = RecordDownload {
        tenant: ctx.tenant.clone(),
        channel,
        bundle_id,
        files,
        at: Utc::now(),
    };
    let download_id = Uuid::now_v7().to_string();
    app.commands()
        .execute::<Download>(ctx, &download_id, command, ())
        .await?;
    Ok(())
}

/// The response for one file: exact bytes, recorded type, length and name.
pub async fn respond(
    app: &AppState,
    ctx: &CommandContext,
    channel: DownloadChannel,
    file: &FileView,
) -> Result<Response, ApiError> {
    let blob = app.blobs().get(&file.blob_key).await?;
    let downloaded = DownloadedFile {
        file_id: file.id,
        customer_id: file.customer_id.clone(),
    };
    record(app, ctx, channel, None, vec![downloaded]).await?;
    let name = download_name(&file.name, &file.file_name);
    let disposition = HeaderValue::from_str(&content_disposition(&name)).map_err(|_| {
        ApiError(AppError::Internal(
            "a download name could not be encoded".into(),
        ))
    })?;
    let content_type = HeaderValue::from_str(file.content_type.as_str())
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    let etag = HeaderValue::from_str(&format!("\"{}\"", file.sha256))
        .map_err(|_| ApiError(AppError::Internal("a digest could not be encoded".into())))?;
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, blob.size)
        .header(header::CONTENT_DISPOSITION, disposition)
        .header(header::ETAG, etag)
        // The declared type is the uploader's word: never let a browser guess another.
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CACHE_CONTROL, "private, no-store")
        .body(Body::from_stream(blob.body))
        .map_err(|e| ApiError(AppError::Internal(e.to_string())))
}
