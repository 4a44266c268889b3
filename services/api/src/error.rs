//! The one error type of the HTTP API, mapped once to the contract's codes.
//!
//! Every non-2xx answer has the body `{"error": {"code", "message"}}`. Each
//! variant has one status and one stable code; messages are for people and
//! never carry a database or storage error's text (those are logged instead).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use dossier_domain::{FileError, ValidationError};
use serde::Serialize;

use crate::commands::CommandError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("your service provider has turned off uploads in the portal")]
    PortalUploadDisabled,
    #[error("not found")]
    NotFound,
    #[error("the file is larger than the limit of {limit} bytes ({})", human_bytes(*.limit))]
    FileTooLarge { limit: u64 },
    #[error("{0}")]
    Validation(ValidationError),
    #[error("deleting needs explicit confirmation: send confirm=true")]
    ConfirmationRequired,
    #[error("files of origin system or product can never be deleted")]
    FileProtected,
    #[error("the bundle is not ready: it is still being built, or it failed (see its status)")]
    BundleNotReady,
    #[error("a concurrent change won the race and this one could not be retried; try again")]
    Conflict,
    /// A backing service is down; nothing was recorded. The detail goes to the log only.
    #[error("a backing service is unavailable; nothing was recorded, try again later")]
    Unavailable(String),
    /// A bug or an inconsistency; the detail goes to the log only.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn validation(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Validation(ValidationError::new(field, reason))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::PortalUploadDisabled => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::FileTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Validation(_) | Self::ConfirmationRequired => StatusCode::UNPROCESSABLE_ENTITY,
            Self::FileProtected | Self::BundleNotReady | Self::Conflict => StatusCode::CONFLICT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The contract's stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::PortalUploadDisabled => "portal_upload_disabled",
            Self::NotFound => "not_found",
            Self::FileTooLarge { .. } => "file_too_large",
            Self::Validation(_) => "validation_failed",
            Self::ConfirmationRequired => "confirmation_required",
            Self::FileProtected => "file_protected",
            Self::BundleNotReady => "bundle_not_ready",
            Self::Conflict => "conflict",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

fn human_bytes(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Unavailable(detail) => {
                tracing::warn!(%detail, "answered 503: a backing service is unavailable")
            }
            Self::Internal(detail) => tracing::error!(%detail, "answered 500: internal error"),
            _ => {}
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        };
        (self.status(), Json(body)).into_response()
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        Self::Validation(error)
    }
}

impl From<FileError> for ApiError {
    fn from(error: FileError) -> Self {
        match error {
            FileError::NotFound => Self::NotFound,
            FileError::AlreadyExists | FileError::NotDeleted => Self::Conflict,
            FileError::TooLarge { limit } => Self::FileTooLarge { limit },
            FileError::Protected => Self::FileProtected,
            FileError::ConfirmationRequired => Self::ConfirmationRequired,
        }
    }
}

impl From<dossier_domain::DownloadError> for ApiError {
    fn from(error: dossier_domain::DownloadError) -> Self {
        Self::Internal(error.to_string())
    }
}

impl From<dossier_domain::TaskError> for ApiError {
    fn from(error: dossier_domain::TaskError) -> Self {
        use dossier_domain::TaskError;
        match error {
            TaskError::NotFound => Self::NotFound,
            TaskError::AlreadyExists => Self::Conflict,
            TaskError::EmptyMessage => Self::validation("text", "a message needs text or a file"),
        }
    }
}

impl From<dossier_domain::BundleError> for ApiError {
    fn from(error: dossier_domain::BundleError) -> Self {
        use dossier_domain::BundleError;
        match error {
            BundleError::NotFound | BundleError::Expired => Self::NotFound,
            BundleError::AlreadyExists | BundleError::Finished => Self::Conflict,
            // The message names the limit (CONTRACT.md: validation_failed).
            BundleError::NoFiles
            | BundleError::DuplicateFile(_)
            | BundleError::TooManyFiles { .. }
            | BundleError::TooLarge { .. } => Self::validation("file_ids", error.to_string()),
        }
    }
}

impl From<dossier_domain::SettingsError> for ApiError {
    fn from(error: dossier_domain::SettingsError) -> Self {
        Self::Internal(error.to_string())
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Rejected(error) => error,
            CommandError::Conflict | CommandError::Duplicate => Self::Conflict,
            CommandError::Unavailable(detail) => Self::Unavailable(detail),
            CommandError::Internal(detail) => Self::Internal(detail),
        }
    }
}

impl From<dossier_blobstore::BlobError> for ApiError {
    fn from(error: dossier_blobstore::BlobError) -> Self {
        use dossier_blobstore::BlobError;
        match error {
            BlobError::TooLarge { limit } => Self::FileTooLarge { limit },
            BlobError::NotFound => {
                Self::Internal("a recorded blob is missing from the store".into())
            }
            BlobError::Body(io) => {
                Self::validation("file", format!("the upload was interrupted: {io}"))
            }
            other => Self::Unavailable(other.to_string()),
        }
    }
}
