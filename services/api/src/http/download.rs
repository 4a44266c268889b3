//! Sending a file's bytes: streamed from the blob store, never held whole,
//! named by the contract's rule 3, and recorded in the log (rule 9: every
//! download, by anyone, is in the audit trail).
//!
//! Rule 13: a download is recorded (and `viewed_at` set) only for a GET whose
//! bytes are about to leave. So every content route goes the same way:
//! [`open`] the blob first (a store that fails answers 503 with nothing
//! recorded), record only when [`Opened::sends_bytes`] (never for HEAD, which
//! axum routes to the GET handler), then [`send`].

use axum::body::Body;
use axum::http::{HeaderValue, Method, header};
use axum::response::Response;
use chrono::Utc;
use dossier_blobstore::{BlobError, BlobObject};
use dossier_domain::naming::{content_disposition, download_name};
use dossier_domain::{
    BlobKey, CustomerId, Download, DownloadChannel, DownloadedFile, FileCommand, RecordDownload,
};
use dossier_projections::files::FileView;
use uuid::Uuid;

use crate::commands::CommandContext;
use crate::error::{ApiError, AppError};
use crate::state::AppState;

/// The door a single file leaves through, and so what its download records.
#[derive(Debug, Clone, Copy)]
pub enum Door<'a> {
    /// Staff: the download is recorded; `viewed_at` is left alone.
    Staff,
    /// The customer's portal: the download is recorded and, the first time,
    /// the file is marked viewed by `viewer` (rule 9).
    Portal { viewer: &'a CustomerId },
}

impl Door<'_> {
    fn channel(self) -> DownloadChannel {
        match self {
            Self::Staff => DownloadChannel::Staff,
            Self::Portal { .. } => DownloadChannel::Portal,
        }
    }
}

/// The blob of a content request, opened.
pub enum Opened {
    /// GET: the bytes, ready to stream.
    Get(BlobObject),
    /// HEAD: the blob is known to be there; nothing was read.
    Head,
}

impl Opened {
    /// Whether bytes leave with this answer: only then is a download recorded.
    pub fn sends_bytes(&self) -> bool {
        matches!(self, Self::Get(_))
    }
}

/// Opens the blob under `key` for a content request: for GET the bytes
/// (the store is asked now, so a failure comes before anything is recorded);
/// for HEAD only whether it is there, with nothing read.
pub async fn open(app: &AppState, method: &Method, key: &BlobKey) -> Result<Opened, BlobError> {
    if method == Method::HEAD {
        return match app.blobs().exists(key).await? {
            true => Ok(Opened::Head),
            false => Err(BlobError::NotFound),
        };
    }
    Ok(Opened::Get(app.blobs().get(key).await?))
}

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

/// The answer for one file through `door`: its exact bytes (for GET, after
/// the download was recorded), its recorded type, length and name.
pub async fn respond(
    app: &AppState,
    ctx: &CommandContext,
    method: &Method,
    door: Door<'_>,
    file: &FileView,
) -> Result<Response, ApiError> {
    let opened = open(app, method, &file.blob_key).await?;
    if opened.sends_bytes() {
        // Viewed first, then the download: the trail reads "viewed" before
        // "downloaded" for the customer's first download, as it always has.
        if let Door::Portal { viewer } = door
            && file.viewed_at.is_none()
        {
            let command = FileCommand::MarkViewed {
                tenant: ctx.tenant.clone(),
                viewer: viewer.clone(),
                at: Utc::now(),
            };
            app.commands().file(ctx, file.id, command).await?;
        }
        let downloaded = DownloadedFile {
            file_id: file.id,
            customer_id: file.customer_id.clone(),
        };
        record(app, ctx, door.channel(), None, vec![downloaded]).await?;
    }
    let content_type = HeaderValue::from_str(file.content_type.as_str())
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    let content = Content {
        content_type,
        size: Some(file.size),
        name: download_name(&file.name, &file.file_name),
        etag: Some(file.sha256.to_string()),
    };
    send(opened, content)
}

/// What the headers of a content answer say.
pub struct Content {
    pub content_type: HeaderValue,
    /// The recorded size, for HEAD (a GET says the size of what it streams).
    pub size: Option<u64>,
    /// The offered file name (rule 3).
    pub name: String,
    /// The SHA-256 of the bytes, for the `ETag`.
    pub etag: Option<String>,
}

/// The answer: headers from `content`, and for GET the opened bytes.
pub fn send(opened: Opened, content: Content) -> Result<Response, ApiError> {
    let disposition = HeaderValue::from_str(&content_disposition(&content.name)).map_err(|_| {
        ApiError(AppError::Internal(
            "a download name could not be encoded".into(),
        ))
    })?;
    let (size, body) = match opened {
        Opened::Get(blob) => (Some(blob.size), Body::from_stream(blob.body)),
        Opened::Head => (content.size, Body::empty()),
    };
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, content.content_type)
        .header(header::CONTENT_DISPOSITION, disposition)
        // The declared type is the uploader's word: never let a browser guess another.
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CACHE_CONTROL, "private, no-store");
    if let Some(size) = size {
        response = response.header(header::CONTENT_LENGTH, size);
    }
    if let Some(etag) = content
        .etag
        .and_then(|etag| HeaderValue::from_str(&format!("\"{etag}\"")).ok())
    {
        response = response.header(header::ETAG, etag);
    }
    response
        .body(body)
        .map_err(|e| ApiError(AppError::Internal(e.to_string())))
}
