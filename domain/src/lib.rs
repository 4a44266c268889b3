//! Dossier's domain: aggregates, commands, events and the rules they enforce.
//!
//! Pure: no IO, no async runtime, no clock. Commands arrive with parsed value
//! types ([`types`]) and the time they happen at; aggregates answer events or
//! an error with meaning. Everything here is tested without Postgres, RabbitMQ
//! or S3.

pub mod bundle;
pub mod codec;
pub mod customer;
pub mod download;
pub mod file;
pub mod naming;
pub mod personal;
pub mod settings;
pub mod task;
pub mod types;
pub mod upcast;

pub use bundle::{
    Bundle, BundleArchive, BundleCommand, BundleError, BundleEvent, BundleFile, BundlePolicy,
    BundleRecord, BundleStatus, EntryCompression, PendingBundles, RequestBundle,
};
pub use customer::{
    Customer, CustomerCommand, CustomerError, CustomerEvent, EraseCustomer,
    confirmed as erasure_confirmed,
};
pub use download::{
    Download, DownloadChannel, DownloadError, DownloadEvent, DownloadedFile, RecordDownload,
};
pub use file::{File, FileCommand, FileError, FileEvent, FilePolicy, FileRecord, UploadFile};
pub use settings::{Settings, SettingsCommand, SettingsError, SettingsEvent};
pub use task::{MessageText, Task, TaskCommand, TaskError, TaskEvent, TaskTitle};
pub use types::{
    Actor, BlobKey, ContentType, ContractId, CustomerId, CustomerIdPrefix, DisplayName, FileId,
    FileName, MaxFileBytes, Origin, Sha256Hex, TenantId, ValidationError, Visibility,
};
