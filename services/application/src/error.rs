//! The one error type of the application layer, carrying the contract's codes.
//!
//! Every edge maps it once: the HTTP API to a status and the contract's error
//! body (`dossier_api::error`), the AMQP intake to a rejected receipt or a
//! retry (`dossier_api::intake`). Each variant has one stable code
//! ([`AppError::code`], CONTRACT.md "Errors") and a message for people;
//! messages never carry a database or storage error's text (the detail is for
//! the log, see [`AppError::detail`]).

use dossier_blobstore::BlobError;
use dossier_domain::{
    BundleError, CustomerError, DownloadError, FileError, SettingsError, TaskError, ValidationError,
};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No credentials, or credentials that do not check out.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    Forbidden(String),
    #[error("your service provider has turned off uploads in the portal")]
    PortalUploadDisabled,
    /// Unknown, deleted or another tenant's: all look the same (rule 6).
    #[error("not found")]
    NotFound,
    #[error("the file is larger than the limit of {limit} bytes ({})", human_bytes(*.limit))]
    FileTooLarge { limit: u64 },
    /// A field is missing or malformed; the message names the field.
    #[error("{0}")]
    Validation(ValidationError),
    #[error("deleting needs explicit confirmation: send confirm=true")]
    ConfirmationRequired,
    #[error("files of origin system or product can never be deleted")]
    FileProtected,
    #[error("the bundle is not ready: it is still being built, or it failed (see its status)")]
    BundleNotReady,
    /// The tenant has as many bundles pending as the deployment allows; a
    /// request may succeed once one of them is ready (see
    /// [`Self::retry_after`]).
    #[error(
        "{limit} bundles of your organization are already being built; ask again once one is ready"
    )]
    TooManyPendingBundles { limit: u32 },
    /// A concurrent change kept winning the race for the aggregate, past the
    /// retry policy's attempts; or the aggregate is in a state that excludes
    /// the command (it exists already, it is finished). Nothing was recorded.
    #[error("a concurrent change won the race and this one could not be retried; try again")]
    Conflict,
    /// The command's idempotency key was used before: it had its effect then,
    /// and this run recorded nothing. The caller answers with the receipt
    /// that stands.
    #[error("this command was already handled")]
    Duplicate,
    /// An `Idempotency-Key` this user sent before with another request
    /// (another method, path, body or file). Nothing was recorded.
    #[error(
        "this Idempotency-Key was already used for a different request; send a new key for a new request"
    )]
    IdempotencyKeyReused,
    /// The first request with this `Idempotency-Key` is still running; its
    /// answer will be repeated once it has one (see [`Self::retry_after`]).
    #[error("a request with this Idempotency-Key is still being handled; ask again in a moment")]
    IdempotencyKeyInFlight { retry_after: std::time::Duration },
    /// A backing service is down and the command was refused before anything
    /// could be recorded. The detail goes to the log only.
    #[error("a backing service is unavailable; nothing was recorded, try again later")]
    Unavailable(String),
    /// The event log failed while the command's events were being appended
    /// (for example the connection was lost after COMMIT was sent): they may
    /// or may not be in the log. Nothing that the command refers to may be
    /// undone (CONTRACT.md rule 15). The detail goes to the log only.
    #[error(
        "a backing service failed while the command was being recorded; it may have taken effect, check before trying again"
    )]
    OutcomeUnknown(String),
    /// A stored file failed its integrity check (a sealed blob altered, cut
    /// short or reordered) and was not sent; nothing was recorded. Retrying
    /// does not help: an operator must restore the blob. The detail goes to
    /// the log only.
    #[error(
        "the stored content failed its integrity check and was not sent; nothing was recorded; an operator must restore it, trying again will not help"
    )]
    BlobDamaged(String),
    /// A bug or an inconsistency; the detail goes to the log only.
    #[error("internal error")]
    Internal(String),
}

impl AppError {
    pub fn validation(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Validation(ValidationError::new(field, reason))
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
            Self::TooManyPendingBundles { .. } => "too_many_pending_bundles",
            Self::Conflict | Self::Duplicate | Self::IdempotencyKeyInFlight { .. } => "conflict",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            // The contract's one code for a 5xx: the content is unavailable.
            Self::Unavailable(_) | Self::OutcomeUnknown(_) | Self::BlobDamaged(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// How long a client should wait before it asks again, when that is
    /// known: a pending bundle usually finishes within seconds.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::TooManyPendingBundles { .. } => Some(PENDING_BUNDLES_RETRY_AFTER),
            Self::IdempotencyKeyInFlight { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// What only an operator should read (a driver's or a store's error text).
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Unavailable(detail)
            | Self::OutcomeUnknown(detail)
            | Self::BlobDamaged(detail)
            | Self::Internal(detail) => Some(detail),
            _ => None,
        }
    }

    /// Whether the same request may succeed later without any change: a
    /// backing service failed (or a bug), not the request. The AMQP intake
    /// hands such a message back to the queue instead of answering it.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_) | Self::OutcomeUnknown(_) | Self::Internal(_)
        )
    }
}

/// The `Retry-After` of [`AppError::TooManyPendingBundles`].
pub const PENDING_BUNDLES_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

fn human_bytes(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

impl From<ValidationError> for AppError {
    fn from(error: ValidationError) -> Self {
        Self::Validation(error)
    }
}

impl From<FileError> for AppError {
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

impl From<CustomerError> for AppError {
    fn from(error: CustomerError) -> Self {
        match error {
            CustomerError::ConfirmationRequired => Self::ConfirmationRequired,
            CustomerError::WrongCustomer => Self::Internal(error.to_string()),
        }
    }
}

impl From<DownloadError> for AppError {
    fn from(error: DownloadError) -> Self {
        Self::Internal(error.to_string())
    }
}

impl From<TaskError> for AppError {
    fn from(error: TaskError) -> Self {
        match error {
            TaskError::NotFound => Self::NotFound,
            TaskError::AlreadyExists => Self::Conflict,
            TaskError::EmptyMessage => Self::validation("text", "a message needs text or a file"),
        }
    }
}

impl From<BundleError> for AppError {
    fn from(error: BundleError) -> Self {
        match error {
            BundleError::NotFound | BundleError::Expired => Self::NotFound,
            BundleError::AlreadyExists | BundleError::Finished => Self::Conflict,
            // The message names the limit (CONTRACT.md: validation_failed).
            BundleError::NoFiles
            | BundleError::DuplicateFile(_)
            | BundleError::TooManyFiles { .. }
            | BundleError::TooLarge { .. } => Self::validation("file_ids", error.to_string()),
            BundleError::TooManyPending { limit } => Self::TooManyPendingBundles { limit },
            BundleError::PendingUnknown(detail) => Self::Unavailable(detail),
        }
    }
}

impl From<SettingsError> for AppError {
    fn from(error: SettingsError) -> Self {
        Self::Internal(error.to_string())
    }
}

impl From<BlobError> for AppError {
    fn from(error: BlobError) -> Self {
        match error {
            BlobError::TooLarge { limit } => Self::FileTooLarge { limit },
            BlobError::NotFound => {
                Self::Internal("a recorded blob is missing from the store".into())
            }
            BlobError::Body(io) => {
                Self::validation("file", format!("the upload was interrupted: {io}"))
            }
            BlobError::LengthMismatch { declared } => Self::validation(
                "size",
                format!("the file sent is not the {declared} bytes declared"),
            ),
            // Its file was deleted or its bundle expired: gone, like the file (rule 6).
            BlobError::Shredded => Self::NotFound,
            BlobError::Damaged(detail) => Self::BlobDamaged(detail),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_outcomes_of_a_failed_backing_service_answer_unavailable() {
        assert_eq!(
            AppError::Unavailable("db down".into()).code(),
            "unavailable"
        );
        assert_eq!(
            AppError::OutcomeUnknown("lost".into()).code(),
            "unavailable"
        );
        assert!(AppError::OutcomeUnknown("lost".into()).is_transient());
        assert!(!AppError::NotFound.is_transient());
    }

    #[test]
    fn messages_never_carry_the_detail() {
        let error = AppError::Unavailable("password=hunter2".into());
        assert!(!error.to_string().contains("hunter2"));
        assert_eq!(error.detail(), Some("password=hunter2"));
    }

    #[test]
    fn a_lost_race_and_a_used_key_share_the_contracts_conflict_code() {
        assert_eq!(AppError::Conflict.code(), "conflict");
        assert_eq!(AppError::Duplicate.code(), "conflict");
        assert_eq!(
            AppError::from(FileError::Protected).code(),
            "file_protected"
        );
        assert_eq!(
            AppError::from(BundleError::NoFiles).code(),
            "validation_failed"
        );
    }

    #[test]
    fn idempotency_keys_have_their_codes_and_a_key_in_flight_says_when_to_ask_again() {
        assert_eq!(
            AppError::IdempotencyKeyReused.code(),
            "idempotency_key_reused"
        );
        let in_flight = AppError::IdempotencyKeyInFlight {
            retry_after: std::time::Duration::from_secs(2),
        };
        assert_eq!(in_flight.code(), "conflict");
        assert_eq!(
            in_flight.retry_after(),
            Some(std::time::Duration::from_secs(2))
        );
        assert!(!in_flight.is_transient());
    }

    #[test]
    fn a_shredded_blob_is_not_found_and_a_damaged_one_is_unavailable_for_good() {
        assert_eq!(AppError::from(BlobError::Shredded).code(), "not_found");
        let damaged = AppError::from(BlobError::Damaged("acme/…/f: segment 3".into()));
        assert_eq!(damaged.code(), "unavailable");
        assert!(!damaged.is_transient());
        assert!(!damaged.to_string().contains("segment"), "{damaged}");
        assert_eq!(damaged.detail(), Some("acme/…/f: segment 3"));
    }

    #[test]
    fn too_many_pending_bundles_is_its_own_code_with_a_retry_after() {
        let error = AppError::from(BundleError::TooManyPending { limit: 3 });
        assert_eq!(error.code(), "too_many_pending_bundles");
        assert!(error.retry_after().is_some());
        assert!(!error.is_transient());
        assert!(error.to_string().contains('3'), "{error}");
        assert!(AppError::NotFound.retry_after().is_none());
        assert!(
            AppError::from(BundleError::PendingUnknown("pool timed out".into())).is_transient()
        );
    }
}
