//! The one upload path: store the bytes, then record them with `UploadFile`.
//!
//! Staff uploads, portal uploads and the AMQP intake all come through here;
//! only how the bytes arrive differs (a multipart part, a message body), and
//! that stays at the edge. The bytes go to the blob store before the command,
//! so the blob exists before any event names it. What becomes of that blob
//! when the command does not succeed is decided in one place,
//! [`BlobFate::after`]:
//!
//! - the command was refused before anything was appended (the aggregate or
//!   a validation said no, the log refused the append as a lost race or a
//!   used idempotency key): no event names the blob, and it is removed now;
//! - any other failure (the log unavailable, the outcome unknown because the
//!   connection was lost after COMMIT was sent, a bug): the event may be in
//!   the log. The blob stays, and the orphan sweep, which asks the log,
//!   removes it later if no event names it (CONTRACT.md rule 15: never a
//!   lost blob).
//!
//! Once the command succeeded the blob is never touched again by this path,
//! whatever happens next: a read-your-writes wait that times out or a read
//! model that cannot be read still answers the recorded file, built from the
//! command's own fields ([`Uploads::resource`]).

use std::sync::Arc;

use chrono::SubsecRound as _;
use dossier_blobstore::{BlobStore, BodyLength, ByteStream};
use dossier_domain::{
    BlobKey, ContentType, ContractId, CustomerId, DisplayName, FileCommand, FileId, FileName,
    Origin, Sha256Hex, TenantId, UploadFile, Visibility,
};
use dossier_eventlog::db::Pool;
use dossier_projections::files::{self as read_model, FileView};
use uuid::Uuid;

use crate::commands::{CommandContext, Commands};
use crate::error::AppError;

/// Bytes that are in the blob store and not yet recorded.
#[derive(Debug, Clone)]
pub struct StoredUpload {
    pub key: BlobKey,
    pub file_name: FileName,
    pub content_type: ContentType,
    pub size: u64,
    pub sha256: Sha256Hex,
}

/// How a stored upload is to be recorded: everything the form, the message
/// or the route decides besides the bytes.
#[derive(Debug, Clone)]
pub struct Recording {
    pub tenant: TenantId,
    pub file_id: FileId,
    pub customer_id: CustomerId,
    pub name: DisplayName,
    pub visibility: Visibility,
    pub origin: Origin,
    pub contract_id: Option<ContractId>,
    pub task_id: Option<Uuid>,
}

impl StoredUpload {
    /// The command that records these bytes as a file, now.
    pub fn into_command(self, recording: Recording) -> FileCommand {
        FileCommand::Upload(Box::new(self.into_upload(recording)))
    }

    fn into_upload(self, recording: Recording) -> UploadFile {
        UploadFile {
            tenant: recording.tenant,
            file_id: recording.file_id,
            customer_id: recording.customer_id,
            name: recording.name,
            file_name: self.file_name,
            content_type: self.content_type,
            size: self.size,
            sha256: self.sha256,
            blob_key: self.key,
            visibility: recording.visibility,
            origin: recording.origin,
            contract_id: recording.contract_id,
            task_id: recording.task_id,
            // The log keeps microseconds; the answer built from the command
            // (see `Uploads::resource`) must say what a later read says.
            at: chrono::Utc::now().trunc_subsecs(6),
        }
    }
}

/// What may become of an upload's blob once its command did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobFate {
    /// The command was refused before anything was appended: no event can
    /// name the blob, so it is removed now.
    Remove,
    /// The command's events may be in the log: the blob stays, and the
    /// orphan sweep (which asks the log) decides later.
    Keep,
}

impl BlobFate {
    /// The rule for every upload path (see the module docs).
    pub fn after(error: &AppError) -> Self {
        match error {
            AppError::Unauthorized(_)
            | AppError::Forbidden(_)
            | AppError::PortalUploadDisabled
            | AppError::NotFound
            | AppError::FileTooLarge { .. }
            | AppError::Validation(_)
            | AppError::ConfirmationRequired
            | AppError::FileProtected
            | AppError::BundleNotReady
            | AppError::TooManyPendingBundles { .. }
            // The log refused the append itself (a unique constraint): atomic,
            // so nothing of it is there.
            | AppError::Conflict
            | AppError::Duplicate
            // Refused at the edge before the command was sent.
            | AppError::IdempotencyKeyReused
            | AppError::IdempotencyKeyInFlight { .. } => Self::Remove,
            AppError::Unavailable(_)
            | AppError::OutcomeUnknown(_)
            | AppError::BlobDamaged(_)
            | AppError::Internal(_) => Self::Keep,
        }
    }
}

/// A recorded upload: its events are in the log.
#[derive(Debug, Clone)]
pub struct RecordedUpload {
    pub file_id: FileId,
    /// The log position of its event.
    pub position: i64,
    /// Whether every read model showed it within the freshness timeout.
    pub read_models_current: bool,
    upload: UploadFile,
}

/// The answer to a recorded upload: the file resource, and whether it had to
/// be built from the command because the read models do not show it yet.
#[derive(Debug, Clone)]
pub struct UploadedFile {
    pub file: FileView,
    /// The read models lag behind this upload: lists may not show it yet.
    pub lagging: bool,
}

/// The upload path: the blob store and the command path.
pub struct Uploads {
    pool: Pool,
    blobs: Arc<dyn BlobStore>,
    commands: Arc<Commands>,
}

impl Uploads {
    pub fn new(pool: Pool, blobs: Arc<dyn BlobStore>, commands: Arc<Commands>) -> Self {
        Self {
            pool,
            blobs,
            commands,
        }
    }

    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    /// Streams `body` to the blob store under `key`, hashed on the way and
    /// stopped past `max_bytes` (then nothing is stored). A body whose
    /// length its sender `declared` must be that long, and streams into the
    /// store as one request; a declared length past `max_bytes` is refused
    /// before a byte is read.
    pub async fn store(
        &self,
        key: BlobKey,
        file_name: FileName,
        content_type: ContentType,
        body: ByteStream,
        max_bytes: u64,
        declared: Option<u64>,
    ) -> Result<StoredUpload, AppError> {
        let length = match declared {
            Some(size) if size > max_bytes => {
                return Err(AppError::FileTooLarge { limit: max_bytes });
            }
            Some(size) => BodyLength::Exactly(size),
            None => BodyLength::AtMost(max_bytes),
        };
        let stored = self.blobs.put_sized(&key, body, length).await?;
        let sha256 = match Sha256Hex::parse(&stored.sha256) {
            Ok(sha256) => sha256,
            Err(_) => {
                // Never recorded: it must not stay.
                self.remove(&key).await;
                return Err(AppError::Internal(
                    "the blob store returned a malformed digest".into(),
                ));
            }
        };
        Ok(StoredUpload {
            key,
            file_name,
            content_type,
            size: stored.size,
            sha256,
        })
    }

    /// Removes the blob of an upload that was refused before its command was
    /// sent (a form that does not validate). A failure here leaves an orphan
    /// that the sweep removes later.
    pub async fn discard(&self, upload: &StoredUpload) {
        self.remove(&upload.key).await;
    }

    /// Records `upload` as the file `recording` describes and waits until the
    /// read models show it. On failure, the blob is removed or kept as
    /// [`BlobFate::after`] says.
    #[tracing::instrument(skip_all, fields(tenant = %ctx.tenant, file_id = %recording.file_id))]
    pub async fn record(
        &self,
        ctx: &CommandContext,
        upload: StoredUpload,
        recording: Recording,
    ) -> Result<RecordedUpload, AppError> {
        let file_id = recording.file_id;
        let upload = upload.into_upload(recording);
        let command = FileCommand::Upload(Box::new(upload.clone()));
        match self.commands.file_no_wait(ctx, file_id, command).await {
            Ok(accepted) => {
                let read_models_current = self.commands.await_read_models(accepted.position).await;
                Ok(RecordedUpload {
                    file_id,
                    position: accepted.position,
                    read_models_current,
                    upload,
                })
            }
            Err(error) => {
                match BlobFate::after(&error) {
                    BlobFate::Remove => self.remove(&upload.blob_key).await,
                    BlobFate::Keep => {
                        metrics::counter!("dossier_upload_blobs_kept_total").increment(1);
                        tracing::warn!(
                            key = %upload.blob_key,
                            error = %error,
                            detail = error.detail().unwrap_or_default(),
                            "an upload's command may have been recorded; its blob stays (the orphan sweep checks the log)"
                        );
                    }
                }
                Err(error)
            }
        }
    }

    /// The file resource of a recorded upload: as the files read model shows
    /// it when it does, otherwise built from the command's own fields (the
    /// event says exactly these), marked as lagging. Never an error: the
    /// upload is recorded, and the client must not upload it again.
    pub async fn resource(&self, recorded: &RecordedUpload) -> UploadedFile {
        if recorded.read_models_current {
            match read_model::get(&self.pool, &recorded.upload.tenant, recorded.file_id).await {
                Ok(Some(file)) => {
                    return UploadedFile {
                        file,
                        lagging: false,
                    };
                }
                // Deleted at once by someone else: the upload still happened.
                Ok(None) => {}
                Err(error) => tracing::warn!(
                    file_id = %recorded.file_id,
                    %error,
                    "a recorded upload could not be read back; answering it from its command"
                ),
            }
        }
        UploadedFile {
            file: recorded_view(&recorded.upload, recorded.position),
            lagging: true,
        }
    }

    async fn remove(&self, key: &BlobKey) {
        if let Err(error) = self.blobs.delete(key).await {
            tracing::warn!(%key, %error, "could not remove the blob of a refused upload; the orphan sweep will");
        }
    }
}

/// The file as its `FileUploaded` event describes it.
fn recorded_view(upload: &UploadFile, position: i64) -> FileView {
    FileView {
        id: upload.file_id,
        customer_id: upload.customer_id.clone(),
        name: upload.name.clone(),
        file_name: upload.file_name.clone(),
        content_type: upload.content_type.clone(),
        size: upload.size,
        sha256: upload.sha256.clone(),
        created_at: upload.at,
        visibility: upload.visibility,
        origin: upload.origin,
        viewed_at: None,
        signed_at: None,
        contract_id: upload.contract_id.clone(),
        task_id: upload.task_id,
        protected: upload.origin.is_protected(),
        blob_key: upload.blob_key.clone(),
        last_position: position,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_before_the_append_removes_the_blob() {
        for refused in [
            AppError::NotFound,
            AppError::FileTooLarge { limit: 1 },
            AppError::validation("name", "is required"),
            AppError::PortalUploadDisabled,
            AppError::Conflict,
            AppError::Duplicate,
        ] {
            assert_eq!(BlobFate::after(&refused), BlobFate::Remove, "{refused:?}");
        }
        for maybe_recorded in [
            AppError::Unavailable("pool timed out".into()),
            AppError::OutcomeUnknown("connection lost after COMMIT".into()),
            AppError::Internal("bug".into()),
        ] {
            assert_eq!(
                BlobFate::after(&maybe_recorded),
                BlobFate::Keep,
                "{maybe_recorded:?}"
            );
        }
    }
}
