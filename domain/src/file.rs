//! The `File` aggregate: one uploaded document, its metadata and its life.
//!
//! Rules it enforces (CONTRACT.md "Rules the system enforces"):
//! - the size limit is inclusive, and nothing is recorded above it;
//! - files of a protected origin (`system`, `product`) are never deleted;
//! - deleting needs explicit confirmation;
//! - nothing happens to a deleted file: every command answers `NotFound`;
//! - another tenant's file answers exactly like an unknown one (`NotFound`);
//! - `viewed_at` is set once, by the file's own customer, on a portal file.
//!
//! Commands carry the time they happen at (`at`), taken by the edge, so the
//! aggregate stays pure and its tests need no clock.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::types::{
    BlobKey, ContentType, ContractId, CustomerId, DisplayName, FileId, FileName, MaxFileBytes,
    Origin, Sha256Hex, TenantId, Visibility,
};

/// What the deployment decides for every file.
#[derive(Debug, Clone, Copy, Default)]
pub struct FilePolicy {
    pub max_file_bytes: MaxFileBytes,
}

/// Record a file whose bytes are already in the blob store under `blob_key`.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadFile {
    pub tenant: TenantId,
    pub file_id: FileId,
    pub customer_id: CustomerId,
    pub name: DisplayName,
    pub file_name: FileName,
    pub content_type: ContentType,
    pub size: u64,
    pub sha256: Sha256Hex,
    pub blob_key: BlobKey,
    pub visibility: Visibility,
    pub origin: Origin,
    pub contract_id: Option<ContractId>,
    pub task_id: Option<Uuid>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FileCommand {
    Upload(Box<UploadFile>),
    Rename {
        tenant: TenantId,
        name: DisplayName,
    },
    ChangeVisibility {
        tenant: TenantId,
        visibility: Visibility,
    },
    /// A rename and a visibility change in one step (HTTP `PATCH`); either may be absent.
    Edit {
        tenant: TenantId,
        name: Option<DisplayName>,
        visibility: Option<Visibility>,
    },
    /// The customer opened the file in the portal.
    MarkViewed {
        tenant: TenantId,
        viewer: CustomerId,
        at: DateTime<Utc>,
    },
    MarkSigned {
        tenant: TenantId,
        signed_at: DateTime<Utc>,
    },
    Delete {
        tenant: TenantId,
        confirmed: bool,
        at: DateTime<Utc>,
    },
    /// The blob worker removed the bytes of a deleted file.
    RecordBlobPurged {
        tenant: TenantId,
    },
}

impl FileCommand {
    pub fn tenant(&self) -> &TenantId {
        match self {
            Self::Upload(upload) => &upload.tenant,
            Self::Rename { tenant, .. }
            | Self::ChangeVisibility { tenant, .. }
            | Self::Edit { tenant, .. }
            | Self::MarkViewed { tenant, .. }
            | Self::MarkSigned { tenant, .. }
            | Self::Delete { tenant, .. }
            | Self::RecordBlobPurged { tenant } => tenant,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FileEvent {
    FileUploaded {
        /// Repeated from the log row so that the aggregate rebuilds from its events alone.
        tenant: TenantId,
        customer_id: CustomerId,
        name: DisplayName,
        file_name: FileName,
        content_type: ContentType,
        size: u64,
        sha256: Sha256Hex,
        blob_key: BlobKey,
        visibility: Visibility,
        origin: Origin,
        #[serde(default)]
        contract_id: Option<ContractId>,
        #[serde(default)]
        task_id: Option<Uuid>,
        uploaded_at: DateTime<Utc>,
    },
    FileRenamed {
        from: DisplayName,
        name: DisplayName,
    },
    FileVisibilityChanged {
        from: Visibility,
        visibility: Visibility,
    },
    FileViewed {
        viewer: CustomerId,
        viewed_at: DateTime<Utc>,
    },
    FileSigned {
        signed_at: DateTime<Utc>,
    },
    FileDeleted {
        customer_id: CustomerId,
        blob_key: BlobKey,
        deleted_at: DateTime<Utc>,
    },
    BlobPurged {
        blob_key: BlobKey,
    },
}

impl FileEvent {
    pub const UPLOADED: &'static str = "FileUploaded";
    pub const RENAMED: &'static str = "FileRenamed";
    pub const VISIBILITY_CHANGED: &'static str = "FileVisibilityChanged";
    pub const VIEWED: &'static str = "FileViewed";
    pub const SIGNED: &'static str = "FileSigned";
    pub const DELETED: &'static str = "FileDeleted";
    pub const BLOB_PURGED: &'static str = "BlobPurged";
}

impl DomainEvent for FileEvent {
    fn event_type(&self) -> String {
        match self {
            Self::FileUploaded { .. } => Self::UPLOADED,
            Self::FileRenamed { .. } => Self::RENAMED,
            Self::FileVisibilityChanged { .. } => Self::VISIBILITY_CHANGED,
            Self::FileViewed { .. } => Self::VIEWED,
            Self::FileSigned { .. } => Self::SIGNED,
            Self::FileDeleted { .. } => Self::DELETED,
            Self::BlobPurged { .. } => Self::BLOB_PURGED,
        }
        .to_owned()
    }

    /// `FileUploaded` is at version 2 (it always states `contract_id` and
    /// `task_id`); older versions are lifted by `crate::upcast`. Everything else is 1.
    fn event_version(&self) -> String {
        match self {
            Self::FileUploaded { .. } => crate::upcast::FILE_UPLOADED_VERSION,
            _ => "1",
        }
        .to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// Unknown, deleted, or another tenant's file: all look the same.
    #[error("file not found")]
    NotFound,
    #[error("a file with this id already exists")]
    AlreadyExists,
    #[error("the file is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("files of origin system or product can never be deleted")]
    Protected,
    #[error("deleting a file needs explicit confirmation (confirm=true)")]
    ConfirmationRequired,
    #[error("the blob of a file can only be purged after the file was deleted")]
    NotDeleted,
}

/// The state of one file, as rebuilt from its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub tenant: TenantId,
    pub customer_id: CustomerId,
    pub name: DisplayName,
    pub visibility: Visibility,
    pub origin: Origin,
    pub blob_key: BlobKey,
    pub viewed_at: Option<DateTime<Utc>>,
    pub signed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct File {
    /// Kept after deletion, so that the purge of its blob can still be checked.
    record: Option<FileRecord>,
    deleted: bool,
    blob_purged: bool,
}

impl File {
    /// The file while it is live, to anyone; `None` before upload and after delete.
    pub fn record(&self) -> Option<&FileRecord> {
        self.record.as_ref().filter(|_| !self.deleted)
    }

    /// The live file if it belongs to `tenant`; otherwise `NotFound`.
    fn live_for(&self, tenant: &TenantId) -> Result<&FileRecord, FileError> {
        self.record()
            .filter(|record| &record.tenant == tenant)
            .ok_or(FileError::NotFound)
    }

    fn decide(
        &self,
        command: FileCommand,
        policy: &FilePolicy,
    ) -> Result<Vec<FileEvent>, FileError> {
        let events = match command {
            FileCommand::Upload(upload) => self.decide_upload(*upload, policy)?,
            FileCommand::RecordBlobPurged { tenant } => self.decide_purge(&tenant)?,
            FileCommand::Rename { tenant, name } => Self::rename(self.live_for(&tenant)?, name)
                .into_iter()
                .collect(),
            FileCommand::ChangeVisibility { tenant, visibility } => {
                Self::change_visibility(self.live_for(&tenant)?, visibility)
                    .into_iter()
                    .collect()
            }
            FileCommand::Edit {
                tenant,
                name,
                visibility,
            } => {
                let record = self.live_for(&tenant)?;
                name.and_then(|name| Self::rename(record, name))
                    .into_iter()
                    .chain(visibility.and_then(|v| Self::change_visibility(record, v)))
                    .collect()
            }
            FileCommand::MarkViewed { tenant, viewer, at } => {
                let record = self.live_for(&tenant)?;
                // A customer only ever sees its own published files.
                if viewer != record.customer_id || !record.visibility.in_portal() {
                    return Err(FileError::NotFound);
                }
                match record.viewed_at {
                    Some(_) => vec![],
                    None => vec![FileEvent::FileViewed {
                        viewer,
                        viewed_at: at,
                    }],
                }
            }
            FileCommand::MarkSigned { tenant, signed_at } => {
                match self.live_for(&tenant)?.signed_at {
                    Some(previous) if previous == signed_at => vec![],
                    _ => vec![FileEvent::FileSigned { signed_at }],
                }
            }
            FileCommand::Delete {
                tenant,
                confirmed,
                at,
            } => {
                let record = self.live_for(&tenant)?;
                if record.origin.is_protected() {
                    return Err(FileError::Protected);
                }
                if !confirmed {
                    return Err(FileError::ConfirmationRequired);
                }
                vec![FileEvent::FileDeleted {
                    customer_id: record.customer_id.clone(),
                    blob_key: record.blob_key.clone(),
                    deleted_at: at,
                }]
            }
        };
        Ok(events)
    }

    fn decide_upload(
        &self,
        upload: UploadFile,
        policy: &FilePolicy,
    ) -> Result<Vec<FileEvent>, FileError> {
        if self.record.is_some() {
            return Err(FileError::AlreadyExists);
        }
        if !policy.max_file_bytes.allows(upload.size) {
            return Err(FileError::TooLarge {
                limit: policy.max_file_bytes.0,
            });
        }
        Ok(vec![FileEvent::FileUploaded {
            tenant: upload.tenant,
            customer_id: upload.customer_id,
            name: upload.name,
            file_name: upload.file_name,
            content_type: upload.content_type,
            size: upload.size,
            sha256: upload.sha256,
            blob_key: upload.blob_key,
            visibility: upload.visibility,
            origin: upload.origin,
            contract_id: upload.contract_id,
            task_id: upload.task_id,
            uploaded_at: upload.at,
        }])
    }

    fn decide_purge(&self, tenant: &TenantId) -> Result<Vec<FileEvent>, FileError> {
        let record = self
            .record
            .as_ref()
            .filter(|record| &record.tenant == tenant)
            .ok_or(FileError::NotFound)?;
        match (self.deleted, self.blob_purged) {
            (false, _) => Err(FileError::NotDeleted),
            (true, true) => Ok(vec![]),
            (true, false) => Ok(vec![FileEvent::BlobPurged {
                blob_key: record.blob_key.clone(),
            }]),
        }
    }

    /// No event when nothing changes: a repeated rename is a no-op.
    fn rename(record: &FileRecord, name: DisplayName) -> Option<FileEvent> {
        (record.name != name).then(|| FileEvent::FileRenamed {
            from: record.name.clone(),
            name,
        })
    }

    fn change_visibility(record: &FileRecord, visibility: Visibility) -> Option<FileEvent> {
        (record.visibility != visibility).then_some(FileEvent::FileVisibilityChanged {
            from: record.visibility,
            visibility,
        })
    }
}

impl Aggregate for File {
    const TYPE: &'static str = "file";
    type Command = FileCommand;
    type Event = FileEvent;
    type Error = FileError;
    type Services = FilePolicy;

    async fn handle(
        &mut self,
        command: Self::Command,
        policy: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command, policy)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            FileEvent::FileUploaded {
                tenant,
                customer_id,
                name,
                visibility,
                origin,
                blob_key,
                ..
            } => {
                self.record = Some(FileRecord {
                    tenant,
                    customer_id,
                    name,
                    visibility,
                    origin,
                    blob_key,
                    viewed_at: None,
                    signed_at: None,
                });
            }
            FileEvent::FileRenamed { name, .. } => {
                if let Some(record) = &mut self.record {
                    record.name = name;
                }
            }
            FileEvent::FileVisibilityChanged { visibility, .. } => {
                if let Some(record) = &mut self.record {
                    record.visibility = visibility;
                }
            }
            FileEvent::FileViewed { viewed_at, .. } => {
                if let Some(record) = &mut self.record {
                    record.viewed_at.get_or_insert(viewed_at);
                }
            }
            FileEvent::FileSigned { signed_at } => {
                if let Some(record) = &mut self.record {
                    record.signed_at = Some(signed_at);
                }
            }
            FileEvent::FileDeleted { .. } => self.deleted = true,
            FileEvent::BlobPurged { .. } => self.blob_purged = true,
        }
    }
}
