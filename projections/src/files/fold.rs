//! The rules of the files read model, once, in memory: what one event of the `file`
//! aggregate does to a file's row of `files` and its row of `files_tombstones`.
//!
//! [`FilesProjection::apply`](super::FilesProjection) says the same in SQL, one
//! statement per event; everything else that needs the read model's rows without
//! asking Postgres folds the events with this module and has no rules of its own:
//! the bulk build of a rebuild ([`super::bulk`]) and `dossier replay --as-of`
//! ([`crate::replay::files_as_of`]). A property test
//! (`projections/tests/files_fold.rs`) applies random histories both ways and
//! compares every row and tombstone.
//!
//! Per file id, with the tenant and position of the event's log row (not the
//! payload's tenant):
//!
//! | change | effect |
//! |---|---|
//! | upload | a row, only where neither a row (of any tenant) nor a tombstone exists (`ON CONFLICT`, `NOT EXISTS`); positions are not compared |
//! | rename, visibility, view, signature | only to a row of the same tenant whose `last_position` is lower (`WHERE`); sets `last_position`. A view keeps the first time (`COALESCE`) |
//! | delete | removes a row of the same tenant whose `last_position` is lower; leaves a tombstone of its own tenant and position unless one exists, whether or not a row went |
//! | blob purged | nothing |
//!
//! Times are kept as Postgres keeps them ([`stored_time`]), and an upload whose size
//! does not fit a BIGINT is refused ([`FoldError`]) whatever the file's state, as
//! `apply` refuses it before it sends a statement.
//!
//! Nothing here does IO: [`FileChange::from_event`] and [`FileState::apply`] are
//! pure, so the rules can be checked without a database and reused by any caller.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use dossier_domain::{
    BlobKey, ContentType, ContractId, CustomerId, DisplayName, FileEvent, FileId, FileName, Origin,
    Sha256Hex, Visibility,
};
use uuid::Uuid;

use super::FileView;

/// A row of `files`: every column but the id (the caller's key) and the generated
/// `protected` ([`FileRow::protected`]). `T` is how the caller keeps tenants: a
/// `String`, or an index into its own table of them (the bulk build).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRow<T> {
    /// The tenant of the upload's log row.
    pub tenant: T,
    pub customer_id: CustomerId,
    pub name: DisplayName,
    pub file_name: FileName,
    pub content_type: ContentType,
    /// Never negative: it comes from a `u64` that fits a BIGINT.
    pub size: i64,
    pub sha256: Sha256Hex,
    pub created_at: DateTime<Utc>,
    pub visibility: Visibility,
    pub origin: Origin,
    pub viewed_at: Option<DateTime<Utc>>,
    pub signed_at: Option<DateTime<Utc>>,
    pub contract_id: Option<ContractId>,
    pub task_id: Option<Uuid>,
    pub blob_key: BlobKey,
    /// Position of the last event that changed the row.
    pub last_position: i64,
}

impl<T> FileRow<T> {
    /// The generated column `protected` (migration 0002).
    pub fn protected(&self) -> bool {
        self.origin.is_protected()
    }

    /// The row as the queries show it (file `id`).
    pub fn into_view(self, id: Uuid) -> FileView {
        FileView {
            id: FileId(id),
            customer_id: self.customer_id,
            name: self.name,
            file_name: self.file_name,
            content_type: self.content_type,
            size: u64::try_from(self.size).unwrap_or_default(),
            sha256: self.sha256,
            created_at: self.created_at,
            visibility: self.visibility,
            protected: self.origin.is_protected(),
            origin: self.origin,
            viewed_at: self.viewed_at,
            signed_at: self.signed_at,
            contract_id: self.contract_id,
            task_id: self.task_id,
            blob_key: self.blob_key,
            last_position: self.last_position,
        }
    }
}

/// A row of `files_tombstones`: the file was deleted, and no upload brings it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tombstone<T> {
    /// The tenant of the first `FileDeleted`'s log row.
    pub tenant: T,
    /// Its position.
    pub last_position: i64,
}

/// What the two tables hold for one file id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState<T> {
    pub row: Option<FileRow<T>>,
    pub tombstone: Option<Tombstone<T>>,
}

impl<T> Default for FileState<T> {
    fn default() -> Self {
        Self {
            row: None,
            tombstone: None,
        }
    }
}

/// The columns an upload sets (with the log row's tenant and position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedFile {
    pub customer_id: CustomerId,
    pub name: DisplayName,
    pub file_name: FileName,
    pub content_type: ContentType,
    pub size: i64,
    pub sha256: Sha256Hex,
    pub created_at: DateTime<Utc>,
    pub visibility: Visibility,
    pub origin: Origin,
    pub contract_id: Option<ContractId>,
    pub task_id: Option<Uuid>,
    pub blob_key: BlobKey,
}

/// What one event may do to a file, checked and with its times as stored: the form
/// [`FileState::apply`] takes. Small (an upload is boxed), so that a bulk build can
/// keep a million of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileChange {
    Uploaded(Box<UploadedFile>),
    Renamed(DisplayName),
    VisibilityChanged(Visibility),
    Viewed(DateTime<Utc>),
    Signed(DateTime<Utc>),
    Deleted,
}

/// An event the files read model refuses (the projection stops on it as
/// `ProjectionError::Malformed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    /// `files.size` is a BIGINT.
    #[error("size {0} does not fit a BIGINT")]
    SizeBeyondBigint(u64),
}

impl FileChange {
    /// What `event` may change; `None` for an event that changes nothing
    /// (`BlobPurged`: the row of a deleted file is already gone).
    pub fn from_event(event: FileEvent) -> Result<Option<Self>, FoldError> {
        Ok(Some(match event {
            FileEvent::FileUploaded {
                customer_id,
                name,
                file_name,
                content_type,
                size,
                sha256,
                blob_key,
                visibility,
                origin,
                contract_id,
                task_id,
                uploaded_at,
                // The log row's tenant is the one that counts (see the module docs).
                tenant: _,
            } => Self::Uploaded(Box::new(UploadedFile {
                customer_id,
                name,
                file_name,
                content_type,
                size: i64::try_from(size).map_err(|_| FoldError::SizeBeyondBigint(size))?,
                sha256,
                created_at: stored_time(uploaded_at),
                visibility,
                origin,
                contract_id,
                task_id,
                blob_key,
            })),
            FileEvent::FileRenamed { name, .. } => Self::Renamed(name),
            FileEvent::FileVisibilityChanged { visibility, .. } => {
                Self::VisibilityChanged(visibility)
            }
            FileEvent::FileViewed { viewed_at, .. } => Self::Viewed(stored_time(viewed_at)),
            FileEvent::FileSigned { signed_at } => Self::Signed(stored_time(signed_at)),
            FileEvent::FileDeleted { .. } => Self::Deleted,
            FileEvent::BlobPurged { .. } => return Ok(None),
        }))
    }
}

impl<T: PartialEq> FileState<T> {
    /// Applies one change, logged at `position` under `tenant`, by the rules in the
    /// module docs.
    pub fn apply(&mut self, tenant: T, position: i64, change: FileChange) {
        // The WHERE clause of every statement but the upload's.
        let own_older_row = self
            .row
            .as_ref()
            .is_some_and(|row| row.tenant == tenant && row.last_position < position);
        match change {
            FileChange::Uploaded(file) => {
                if self.row.is_none() && self.tombstone.is_none() {
                    let file = *file;
                    self.row = Some(FileRow {
                        tenant,
                        customer_id: file.customer_id,
                        name: file.name,
                        file_name: file.file_name,
                        content_type: file.content_type,
                        size: file.size,
                        sha256: file.sha256,
                        created_at: file.created_at,
                        visibility: file.visibility,
                        origin: file.origin,
                        viewed_at: None,
                        signed_at: None,
                        contract_id: file.contract_id,
                        task_id: file.task_id,
                        blob_key: file.blob_key,
                        last_position: position,
                    });
                }
            }
            FileChange::Deleted => {
                if own_older_row {
                    self.row = None;
                }
                if self.tombstone.is_none() {
                    self.tombstone = Some(Tombstone {
                        tenant,
                        last_position: position,
                    });
                }
            }
            change => {
                let Some(row) = self.row.as_mut().filter(|_| own_older_row) else {
                    return;
                };
                match change {
                    FileChange::Renamed(name) => row.name = name,
                    FileChange::VisibilityChanged(visibility) => row.visibility = visibility,
                    FileChange::Viewed(at) => {
                        row.viewed_at.get_or_insert(at);
                    }
                    FileChange::Signed(at) => row.signed_at = Some(at),
                    FileChange::Uploaded(_) | FileChange::Deleted => {}
                }
                row.last_position = position;
            }
        }
    }

    /// [`FileChange::from_event`], then [`FileState::apply`].
    pub fn fold(&mut self, tenant: T, position: i64, event: FileEvent) -> Result<(), FoldError> {
        if let Some(change) = FileChange::from_event(event)? {
            self.apply(tenant, position, change);
        }
        Ok(())
    }
}

/// The state of many files, by id: both tables in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files<T> {
    files: BTreeMap<Uuid, FileState<T>>,
}

impl<T> Default for Files<T> {
    fn default() -> Self {
        Self {
            files: BTreeMap::new(),
        }
    }
}

impl<T: PartialEq> Files<T> {
    /// No files.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds `event` of file `id`, logged at `position` under `tenant`.
    pub fn fold(
        &mut self,
        id: Uuid,
        tenant: T,
        position: i64,
        event: FileEvent,
    ) -> Result<(), FoldError> {
        let Some(change) = FileChange::from_event(event)? else {
            return Ok(());
        };
        self.files
            .entry(id)
            .or_default()
            .apply(tenant, position, change);
        Ok(())
    }

    /// What the tables hold for file `id`.
    pub fn get(&self, id: Uuid) -> Option<&FileState<T>> {
        self.files.get(&id)
    }

    /// The rows of `files`, in id order.
    pub fn rows(&self) -> impl Iterator<Item = (Uuid, &FileRow<T>)> {
        self.files
            .iter()
            .filter_map(|(id, file)| file.row.as_ref().map(|row| (*id, row)))
    }

    /// The rows of `files_tombstones`, in id order.
    pub fn tombstones(&self) -> impl Iterator<Item = (Uuid, &Tombstone<T>)> {
        self.files
            .iter()
            .filter_map(|(id, file)| file.tombstone.as_ref().map(|t| (*id, t)))
    }

    /// The rows of `files`, in id order, by value.
    pub fn into_rows(self) -> impl Iterator<Item = (Uuid, FileRow<T>)> {
        self.files
            .into_iter()
            .filter_map(|(id, file)| file.row.map(|row| (id, row)))
    }
}

/// `at` as a `TIMESTAMPTZ` column keeps it when `apply` binds it: the driver
/// (`postgres-types`) sends whole microseconds since 2000-01-01, cut toward that
/// moment (`TimeDelta::num_microseconds`), so a time before 2000 with a fraction of
/// a microsecond moves *up*, one after it down. (`timestamp_micros`, which always
/// cuts down, differs for times before 2000.)
pub fn stored_time(at: DateTime<Utc>) -> DateTime<Utc> {
    const POSTGRES_EPOCH: i64 = 946_684_800;
    let Some(epoch) = DateTime::from_timestamp(POSTGRES_EPOCH, 0) else {
        return at;
    };
    match (at - epoch).num_microseconds() {
        Some(micros) => epoch + TimeDelta::microseconds(micros),
        // Beyond ±292,000 years: the driver refuses it, `apply` fails.
        None => at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(secs: i64, nanos: u32) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, nanos).unwrap()
    }

    #[test]
    fn times_are_cut_to_microseconds_toward_2000_as_the_driver_sends_them() {
        // 2026: down.
        assert_eq!(
            stored_time(time(1_767_225_600, 123_456_789)),
            time(1_767_225_600, 123_456_000)
        );
        // 1999: up, toward 2000-01-01.
        assert_eq!(
            stored_time(time(915_148_800, 123_456_789)),
            time(915_148_800, 123_457_000)
        );
        // Before 1970 too.
        assert_eq!(stored_time(time(-1, 999_999_999)), time(0, 0));
        // Whole microseconds stay.
        assert_eq!(
            stored_time(time(915_148_800, 5_000)),
            time(915_148_800, 5_000)
        );
    }

    #[test]
    fn a_change_stays_small_for_the_bulk_build() {
        // The bulk build keeps one per event, a million per chunk (`bulk.rs`).
        assert!(std::mem::size_of::<FileChange>() <= 32);
    }

    fn upload(name: &str) -> FileChange {
        FileChange::Uploaded(Box::new(UploadedFile {
            customer_id: CustomerId::parse("cust-1").unwrap(),
            name: DisplayName::parse(name).unwrap(),
            file_name: FileName::parse("a.pdf").unwrap(),
            content_type: ContentType::parse(Some("application/pdf")).unwrap(),
            size: 1,
            sha256: Sha256Hex::parse(&"ab".repeat(32)).unwrap(),
            created_at: time(1_767_225_600, 0),
            visibility: Visibility::Internal,
            origin: Origin::System,
            contract_id: None,
            task_id: None,
            blob_key: BlobKey::from_recorded("acme/cust-1/x"),
        }))
    }

    fn rename(name: &str) -> FileChange {
        FileChange::Renamed(DisplayName::parse(name).unwrap())
    }

    #[test]
    fn the_rules_of_the_sql_statements() {
        let mut file = FileState::default();
        file.apply("acme", 5, upload("a"));
        // A second upload of a live file, even a later one, changes nothing.
        file.apply("acme", 6, upload("b"));
        assert_eq!(file.row.as_ref().unwrap().name.as_str(), "a");
        // Another tenant's rename, and a replayed one, change nothing.
        file.apply("globex", 7, rename("theirs"));
        file.apply("acme", 5, rename("replayed"));
        assert_eq!(file.row.as_ref().unwrap().last_position, 5);
        file.apply("acme", 8, rename("c"));
        file.apply("acme", 9, FileChange::Viewed(time(1, 0)));
        file.apply("acme", 10, FileChange::Viewed(time(2, 0)));
        let row = file.row.as_ref().unwrap();
        assert_eq!(
            (row.name.as_str(), row.viewed_at, row.last_position),
            ("c", Some(time(1, 0)), 10)
        );
        // Another tenant's delete leaves the row, and its own tombstone.
        file.apply("globex", 11, FileChange::Deleted);
        assert!(file.row.is_some());
        assert_eq!(
            file.tombstone,
            Some(Tombstone {
                tenant: "globex",
                last_position: 11
            })
        );
        // The owner's delete removes the row; the first tombstone stays.
        file.apply("acme", 12, FileChange::Deleted);
        assert!(file.row.is_none());
        assert_eq!(file.tombstone.unwrap().last_position, 11);
        // Nothing brings it back.
        file.apply("acme", 13, upload("again"));
        assert!(file.row.is_none());
    }

    #[test]
    fn a_size_beyond_bigint_is_refused_and_a_purge_changes_nothing() {
        let mut files = Files::new();
        let id = Uuid::from_u128(1);
        let event = FileEvent::BlobPurged {
            blob_key: BlobKey::from_recorded("acme/cust-1/x"),
        };
        files.fold(id, "acme", 1, event).unwrap();
        assert_eq!(files.get(id), None);
        let FileChange::Uploaded(file) = upload("a") else {
            unreachable!()
        };
        let event = FileEvent::FileUploaded {
            tenant: dossier_domain::TenantId::parse("acme").unwrap(),
            customer_id: file.customer_id,
            name: file.name,
            file_name: file.file_name,
            content_type: file.content_type,
            size: u64::MAX,
            sha256: file.sha256,
            blob_key: file.blob_key,
            visibility: file.visibility,
            origin: file.origin,
            contract_id: None,
            task_id: None,
            uploaded_at: file.created_at,
        };
        assert_eq!(
            files.fold(id, "acme", 2, event),
            Err(FoldError::SizeBeyondBigint(u64::MAX))
        );
        assert_eq!(files.rows().count(), 0);
    }
}
