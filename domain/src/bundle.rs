//! The `Bundle` aggregate: staff pick many files and download them as one ZIP
//! (CONTRACT.md rule 4 and `/v1/bundles`).
//!
//! A bundle's life is told by its own events:
//!
//! ```text
//! BundleRequested ─► BundleProgress* ─┬─► BundleReady ──┬─► BundleExpired
//!                                     └─► BundleFailed ─┘
//! ```
//!
//! - `BundleRequested` says who asked, for which files (id, customer, size as
//!   recorded at the request) and when. The request is refused above the
//!   deployment's limits (number of files, total size), naming the limit, and
//!   while the tenant has as many bundles pending as the deployment allows
//!   ([`BundlePolicy::max_pending_per_tenant`], counted through the
//!   [`PendingBundles`] port), so that one tenant cannot fill the zip
//!   workers' queue for everyone.
//! - `BundleProgress` is written by the zip worker while it builds the archive
//!   (`files_done` only ever grows).
//! - `BundleReady` records where the archive is, its size and SHA-256, and when
//!   it expires; `BundleFailed` says why there is no archive. Neither is ever
//!   followed by the other: a finished bundle stays as it is.
//! - `BundleExpired`: the archive was removed (or there never was one).
//!
//! Another tenant's bundle answers like an unknown one (`NotFound`). Commands
//! that repeat what already happened (a redelivered "ready", a progress that is
//! not ahead) record nothing, so the at-least-once worker can repeat them.
//!
//! Which entries are deflated is decided here too ([`EntryCompression`]):
//! pure rules, tested without IO.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::types::{
    Actor, BlobKey, ContentType, CustomerId, FileId, FileName, Sha256Hex, TenantId,
};

/// How many bundles of a tenant are pending (requested, neither ready, failed
/// nor expired). A port: the application counts them in the log.
pub trait PendingBundles: Send + Sync {
    /// The tenant's pending bundles; `Err` (the reason, for the log) when they
    /// cannot be counted now.
    fn pending<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> Pin<Box<dyn Future<Output = Result<u32, String>> + Send + 'a>>;
}

/// What the deployment allows per bundle, and per tenant.
#[derive(Clone)]
pub struct BundlePolicy {
    /// Most files in one bundle (inclusive).
    pub max_files: usize,
    /// Largest total size of the files of one bundle, in bytes (inclusive).
    pub max_bytes: u64,
    /// Most bundles one tenant may have pending at once
    /// (`DOSSIER_MAX_PENDING_BUNDLES_PER_TENANT`); a request beyond it is
    /// refused with [`BundleError::TooManyPending`].
    pub max_pending_per_tenant: u32,
    /// Where pending bundles are counted; `None` counts none (the workers,
    /// which never request a bundle).
    pub pending: Option<Arc<dyn PendingBundles>>,
}

impl BundlePolicy {
    /// The contract's limit: 1 to 1000 files per bundle.
    pub const MAX_FILES: usize = 1000;
    /// Default total size: 10 GiB (`DOSSIER_BUNDLE_MAX_BYTES`).
    pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024 * 1024;
    /// Default of `DOSSIER_MAX_PENDING_BUNDLES_PER_TENANT`.
    pub const DEFAULT_MAX_PENDING_PER_TENANT: u32 = 3;

    /// Refuses a new bundle of `tenant` while it has
    /// [`Self::max_pending_per_tenant`] pending.
    pub async fn admit(&self, tenant: &TenantId) -> Result<(), BundleError> {
        let Some(pending) = &self.pending else {
            return Ok(());
        };
        let count = pending
            .pending(tenant)
            .await
            .map_err(BundleError::PendingUnknown)?;
        if count >= self.max_pending_per_tenant {
            return Err(BundleError::TooManyPending {
                limit: self.max_pending_per_tenant,
            });
        }
        Ok(())
    }
}

impl Default for BundlePolicy {
    fn default() -> Self {
        Self {
            max_files: Self::MAX_FILES,
            max_bytes: Self::DEFAULT_MAX_BYTES,
            max_pending_per_tenant: Self::DEFAULT_MAX_PENDING_PER_TENANT,
            pending: None,
        }
    }
}

impl fmt::Debug for BundlePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BundlePolicy")
            .field("max_files", &self.max_files)
            .field("max_bytes", &self.max_bytes)
            .field("max_pending_per_tenant", &self.max_pending_per_tenant)
            .field("counts_pending", &self.pending.is_some())
            .finish()
    }
}

/// One file of a bundle, as it stood when the bundle was requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    pub file_id: FileId,
    pub customer_id: CustomerId,
    /// Size in bytes recorded at upload.
    pub size: u64,
}

/// Ask for a bundle of `files` (already checked to exist for `tenant`), in
/// the order their entries should have.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestBundle {
    pub tenant: TenantId,
    pub requested_by: Actor,
    pub files: Vec<BundleFile>,
    pub at: DateTime<Utc>,
}

/// The finished archive in the blob store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleArchive {
    pub blob_key: BlobKey,
    /// Size of the ZIP in bytes.
    pub size: u64,
    /// SHA-256 of the ZIP.
    pub sha256: Sha256Hex,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BundleCommand {
    Request(RequestBundle),
    /// The worker finished `files_done` entries of the archive.
    RecordProgress {
        tenant: TenantId,
        files_done: u32,
    },
    /// The worker stored the whole archive.
    MarkReady {
        tenant: TenantId,
        archive: BundleArchive,
        at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    },
    /// The archive cannot be built; `reason` is for people.
    MarkFailed {
        tenant: TenantId,
        reason: String,
        at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    },
    /// The bundle's time is up: its archive was (or is about to be) removed.
    Expire {
        tenant: TenantId,
        at: DateTime<Utc>,
    },
}

impl BundleCommand {
    pub fn tenant(&self) -> &TenantId {
        match self {
            Self::Request(request) => &request.tenant,
            Self::RecordProgress { tenant, .. }
            | Self::MarkReady { tenant, .. }
            | Self::MarkFailed { tenant, .. }
            | Self::Expire { tenant, .. } => tenant,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BundleEvent {
    BundleRequested {
        /// Repeated from the log row so that the aggregate rebuilds from its events alone.
        tenant: TenantId,
        requested_by: Actor,
        files: Vec<BundleFile>,
        /// Sum of the files' sizes.
        total_size: u64,
        requested_at: DateTime<Utc>,
    },
    BundleProgress {
        files_done: u32,
    },
    BundleReady {
        blob_key: BlobKey,
        size: u64,
        sha256: Sha256Hex,
        ready_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    },
    BundleFailed {
        reason: String,
        failed_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    },
    BundleExpired {
        /// The archive that was removed; `None` when there never was one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blob_key: Option<BlobKey>,
        expired_at: DateTime<Utc>,
    },
}

impl BundleEvent {
    pub const REQUESTED: &'static str = "BundleRequested";
    pub const PROGRESS: &'static str = "BundleProgress";
    pub const READY: &'static str = "BundleReady";
    pub const FAILED: &'static str = "BundleFailed";
    pub const EXPIRED: &'static str = "BundleExpired";
}

impl DomainEvent for BundleEvent {
    fn event_type(&self) -> String {
        match self {
            Self::BundleRequested { .. } => Self::REQUESTED,
            Self::BundleProgress { .. } => Self::PROGRESS,
            Self::BundleReady { .. } => Self::READY,
            Self::BundleFailed { .. } => Self::FAILED,
            Self::BundleExpired { .. } => Self::EXPIRED,
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Unknown, or another tenant's: both look the same.
    #[error("bundle not found")]
    NotFound,
    #[error("a bundle with this id already exists")]
    AlreadyExists,
    #[error("a bundle needs at least one file")]
    NoFiles,
    #[error("a bundle holds at most {limit} files")]
    TooManyFiles { limit: usize },
    #[error("the files add up to {total} bytes, more than the bundle limit of {limit} bytes")]
    TooLarge { limit: u64, total: u64 },
    #[error("file {0} is named twice")]
    DuplicateFile(FileId),
    /// Ready stays ready and failed stays failed.
    #[error("the bundle is already finished")]
    Finished,
    #[error("the bundle has expired")]
    Expired,
    /// The tenant has as many bundles pending as the deployment allows.
    #[error("{limit} bundles are already being built; ask again once one is ready")]
    TooManyPending { limit: u32 },
    /// The pending bundles could not be counted (the log is unavailable);
    /// the detail is for the log.
    #[error("the pending bundles could not be counted: {0}")]
    PendingUnknown(String),
}

/// Where a bundle stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleStatus {
    /// Requested; the archive is being (or waits to be) built.
    Pending,
    /// The archive can be downloaded.
    Ready,
    /// No archive: see the reason.
    Failed,
    /// Gone.
    Expired,
}

impl BundleStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ready => "ready",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "pending" => Some(Self::Pending),
            "ready" => Some(Self::Ready),
            "failed" => Some(Self::Failed),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// The state of one bundle, as rebuilt from its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleRecord {
    pub tenant: TenantId,
    pub requested_by: Actor,
    pub files: Vec<BundleFile>,
    pub status: BundleStatus,
    pub files_done: u32,
    pub archive: Option<BundleArchive>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    record: Option<BundleRecord>,
}

impl Bundle {
    /// The bundle, in any state; `None` before it was requested.
    pub fn record(&self) -> Option<&BundleRecord> {
        self.record.as_ref()
    }

    fn of(&self, tenant: &TenantId) -> Result<&BundleRecord, BundleError> {
        self.record
            .as_ref()
            .filter(|record| &record.tenant == tenant)
            .ok_or(BundleError::NotFound)
    }

    fn decide(
        &self,
        command: BundleCommand,
        policy: &BundlePolicy,
    ) -> Result<Vec<BundleEvent>, BundleError> {
        let events = match command {
            BundleCommand::Request(request) => self.decide_request(request, policy)?,
            BundleCommand::RecordProgress { tenant, files_done } => {
                let record = self.of(&tenant)?;
                let count = u32::try_from(record.files.len()).unwrap_or(u32::MAX);
                let files_done = files_done.min(count);
                if record.status == BundleStatus::Pending && files_done > record.files_done {
                    vec![BundleEvent::BundleProgress { files_done }]
                } else {
                    vec![]
                }
            }
            BundleCommand::MarkReady {
                tenant,
                archive,
                at,
                expires_at,
            } => match self.of(&tenant)?.status {
                BundleStatus::Pending => vec![BundleEvent::BundleReady {
                    blob_key: archive.blob_key,
                    size: archive.size,
                    sha256: archive.sha256,
                    ready_at: at,
                    expires_at,
                }],
                BundleStatus::Ready => vec![],
                BundleStatus::Failed => return Err(BundleError::Finished),
                BundleStatus::Expired => return Err(BundleError::Expired),
            },
            BundleCommand::MarkFailed {
                tenant,
                reason,
                at,
                expires_at,
            } => match self.of(&tenant)?.status {
                BundleStatus::Pending => vec![BundleEvent::BundleFailed {
                    reason,
                    failed_at: at,
                    expires_at,
                }],
                BundleStatus::Failed => vec![],
                BundleStatus::Ready => return Err(BundleError::Finished),
                BundleStatus::Expired => return Err(BundleError::Expired),
            },
            BundleCommand::Expire { tenant, at } => {
                let record = self.of(&tenant)?;
                match record.status {
                    BundleStatus::Expired => vec![],
                    _ => vec![BundleEvent::BundleExpired {
                        blob_key: record.archive.as_ref().map(|a| a.blob_key.clone()),
                        expired_at: at,
                    }],
                }
            }
        };
        Ok(events)
    }

    fn decide_request(
        &self,
        request: RequestBundle,
        policy: &BundlePolicy,
    ) -> Result<Vec<BundleEvent>, BundleError> {
        if self.record.is_some() {
            return Err(BundleError::AlreadyExists);
        }
        if request.files.is_empty() {
            return Err(BundleError::NoFiles);
        }
        if request.files.len() > policy.max_files {
            return Err(BundleError::TooManyFiles {
                limit: policy.max_files,
            });
        }
        let mut seen = HashSet::with_capacity(request.files.len());
        if let Some(twice) = request.files.iter().find(|f| !seen.insert(f.file_id)) {
            return Err(BundleError::DuplicateFile(twice.file_id));
        }
        // Saturating: a sum beyond u64 is over any limit all the same.
        let total_size = request
            .files
            .iter()
            .fold(0u64, |sum, file| sum.saturating_add(file.size));
        if total_size > policy.max_bytes {
            return Err(BundleError::TooLarge {
                limit: policy.max_bytes,
                total: total_size,
            });
        }
        Ok(vec![BundleEvent::BundleRequested {
            tenant: request.tenant,
            requested_by: request.requested_by,
            files: request.files,
            total_size,
            requested_at: request.at,
        }])
    }
}

impl Aggregate for Bundle {
    const TYPE: &'static str = "bundle";
    type Command = BundleCommand;
    type Event = BundleEvent;
    type Error = BundleError;
    type Services = BundlePolicy;

    async fn handle(
        &mut self,
        command: Self::Command,
        policy: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let events = self.decide(command, policy)?;
        // Only a request that passed every other rule counts the pending ones.
        if let Some(BundleEvent::BundleRequested { tenant, .. }) = events.first() {
            policy.admit(tenant).await?;
        }
        for event in events {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            BundleEvent::BundleRequested {
                tenant,
                requested_by,
                files,
                ..
            } => {
                self.record = Some(BundleRecord {
                    tenant,
                    requested_by,
                    files,
                    status: BundleStatus::Pending,
                    files_done: 0,
                    archive: None,
                });
            }
            BundleEvent::BundleProgress { files_done } => {
                if let Some(record) = &mut self.record {
                    record.files_done = record.files_done.max(files_done);
                }
            }
            BundleEvent::BundleReady {
                blob_key,
                size,
                sha256,
                ..
            } => {
                if let Some(record) = &mut self.record {
                    record.status = BundleStatus::Ready;
                    record.files_done = u32::try_from(record.files.len()).unwrap_or(u32::MAX);
                    record.archive = Some(BundleArchive {
                        blob_key,
                        size,
                        sha256,
                    });
                }
            }
            BundleEvent::BundleFailed { .. } => {
                if let Some(record) = &mut self.record {
                    record.status = BundleStatus::Failed;
                }
            }
            BundleEvent::BundleExpired { .. } => {
                if let Some(record) = &mut self.record {
                    record.status = BundleStatus::Expired;
                }
            }
        }
    }
}

/// How one entry's bytes go into the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryCompression {
    /// As they are: content that is already compressed (PDF, images, Office
    /// files, archives, media) would only cost time to deflate again, and
    /// unknown binary content is treated the same way.
    Stored,
    /// Deflated: text-like content, which shrinks a lot.
    Deflated,
}

/// Extensions of formats that compress their content themselves: stored even
/// when the declared type claims text (a mislabelled upload).
const COMPRESSED_EXTENSIONS: &[&str] = &[
    "pdf", "jpg", "jpeg", "png", "gif", "webp", "heic", "heif", "avif", "jp2", "docx", "docm",
    "xlsx", "xlsm", "pptx", "pptm", "odt", "ods", "odp", "odg", "epub", "zip", "gz", "tgz", "bz2",
    "xz", "zst", "7z", "rar", "jar", "apk", "mp3", "m4a", "aac", "ogg", "opus", "flac", "mp4",
    "m4v", "mov", "avi", "mkv", "webm", "woff", "woff2",
];

/// Extensions of text formats: deflated even when the declared type is
/// generic or wrong (Windows browsers send CSV as `application/vnd.ms-excel`).
const TEXT_EXTENSIONS: &[&str] = &[
    "txt", "text", "csv", "tsv", "json", "ndjson", "xml", "html", "htm", "xhtml", "md", "markdown",
    "log", "svg", "rtf", "yaml", "yml", "toml", "ini", "cfg", "conf", "ics", "vcf", "eml", "sql",
    "js", "mjs", "css", "tex", "sh", "ps", "eps",
];

/// Declared types that are text, beyond `text/*`, `*+xml` and `*+json`.
const TEXT_TYPES: &[&str] = &[
    "application/json",
    "application/ld+json",
    "application/x-ndjson",
    "application/xml",
    "application/xhtml+xml",
    "application/javascript",
    "application/ecmascript",
    "application/x-javascript",
    "application/x-yaml",
    "application/yaml",
    "application/toml",
    "application/sql",
    "application/rtf",
    "application/x-sh",
    "application/x-tex",
    "application/x-latex",
    "application/csv",
    "application/x-csv",
    "application/postscript",
    "application/x-www-form-urlencoded",
    "message/rfc822",
    "image/svg+xml",
];

impl EntryCompression {
    /// Decides by the declared content type and the original file name's
    /// extension: a known compressed format is stored, text-like content (by
    /// type or by extension) is deflated, and everything else is stored.
    pub fn for_file(content_type: &ContentType, file_name: &FileName) -> Self {
        let extension = file_name
            .extension()
            .map(|ext| ext.trim_start_matches('.').to_ascii_lowercase());
        let extension = extension.as_deref();
        if extension.is_some_and(|ext| COMPRESSED_EXTENSIONS.contains(&ext)) {
            return Self::Stored;
        }
        let essence = content_type.essence();
        let text_type = essence.starts_with("text/")
            || TEXT_TYPES.contains(&essence.as_str())
            || essence.ends_with("+xml")
            || essence.ends_with("+json");
        let text_extension = extension.is_some_and(|ext| TEXT_EXTENSIONS.contains(&ext));
        if text_type || text_extension {
            Self::Deflated
        } else {
            Self::Stored
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compression(content_type: &str, file_name: &str) -> EntryCompression {
        EntryCompression::for_file(
            &ContentType::parse(Some(content_type)).unwrap(),
            &FileName::parse(file_name).unwrap(),
        )
    }

    #[test]
    fn already_compressed_content_is_stored() {
        for (content_type, file_name) in [
            ("application/pdf", "invoice.pdf"),
            ("image/jpeg", "photo.jpg"),
            ("image/png", "scan.PNG"),
            (
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                "letter.docx",
            ),
            ("application/zip", "archive.zip"),
            ("application/octet-stream", "blob.bin"),
            ("application/octet-stream", "README"),
            // A PDF declared as text is still a PDF.
            ("text/plain", "mislabelled.pdf"),
            ("application/epub+zip", "book.epub"),
        ] {
            assert_eq!(
                compression(content_type, file_name),
                EntryCompression::Stored,
                "{content_type} {file_name}"
            );
        }
    }

    #[test]
    fn text_like_content_is_deflated() {
        for (content_type, file_name) in [
            ("text/plain", "notes.txt"),
            ("text/csv; charset=utf-8", "export.csv"),
            ("application/json", "data"),
            ("application/vnd.api+json", "data.bin"),
            ("image/svg+xml", "logo"),
            ("application/octet-stream", "report.CSV"),
            ("application/vnd.ms-excel", "export.csv"),
            ("text/html", "page.htm"),
        ] {
            assert_eq!(
                compression(content_type, file_name),
                EntryCompression::Deflated,
                "{content_type} {file_name}"
            );
        }
    }
}
