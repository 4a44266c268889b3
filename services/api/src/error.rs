//! The HTTP edge's answer to an [`AppError`]: one status per contract code,
//! mapped here once.
//!
//! Every non-2xx answer has the body `{"error": {"code", "message"}}`. The
//! code and the message come from the application layer's error; messages
//! never carry a database or storage error's text (that is logged instead).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
pub use dossier_application::AppError;
use dossier_domain::{FileError, ValidationError};
use serde::Serialize;

/// An [`AppError`] on its way out through HTTP.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ApiError(pub AppError);

impl ApiError {
    pub fn validation(field: &'static str, reason: impl Into<String>) -> Self {
        Self(AppError::validation(field, reason))
    }

    /// The contract's status for each code.
    pub fn status(&self) -> StatusCode {
        match &self.0 {
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) | AppError::PortalUploadDisabled => StatusCode::FORBIDDEN,
            AppError::NotFound => StatusCode::NOT_FOUND,
            AppError::FileTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Validation(_)
            | AppError::ConfirmationRequired
            | AppError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::FileProtected
            | AppError::BundleNotReady
            | AppError::Conflict
            | AppError::Duplicate
            | AppError::IdempotencyKeyInFlight { .. } => StatusCode::CONFLICT,
            AppError::TooManyPendingBundles { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable(_) | AppError::OutcomeUnknown(_) | AppError::BlobDamaged(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The contract's stable code.
    pub fn code(&self) -> &'static str {
        self.0.code()
    }
}

/// Every non-2xx answer (CONTRACT.md "Errors").
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    /// The contract's stable code, e.g. `not_found`, `validation_failed`.
    #[schema(example = "not_found")]
    code: &'a str,
    /// For people: what went wrong (naming the field or the limit) and what to do.
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self.0 {
            AppError::Unavailable(detail) | AppError::OutcomeUnknown(detail) => {
                tracing::warn!(%detail, "answered {status}: a backing service failed")
            }
            AppError::BlobDamaged(detail) => {
                tracing::error!(%detail, "answered {status}: a stored blob failed its integrity check and was not sent; restore it from a backup")
            }
            AppError::Internal(detail) => tracing::error!(%detail, "answered 500: internal error"),
            _ => {}
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.0.to_string(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(after) = self.0.retry_after() {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(after.as_secs().max(1)),
            );
        }
        response
    }
}

impl From<AppError> for ApiError {
    fn from(error: AppError) -> Self {
        Self(error)
    }
}

/// Each error the edge meets on its own (parsing a path, a body, a stored
/// blob) becomes an [`AppError`] the way the application layer says.
macro_rules! through_app_error {
    ($($source:ty),* $(,)?) => {
        $(impl From<$source> for ApiError {
            fn from(error: $source) -> Self {
                Self(AppError::from(error))
            }
        })*
    };
}

through_app_error!(
    ValidationError,
    FileError,
    dossier_domain::DownloadError,
    dossier_domain::TaskError,
    dossier_domain::BundleError,
    dossier_domain::SettingsError,
    dossier_blobstore::BlobError,
);
