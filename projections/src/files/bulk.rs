//! The files projection's [`BulkBuild`]: how a rebuild fills `files` and
//! `files_tombstones` aside without a statement per event.
//!
//! **Fold.** Each event of the `file` aggregate is decoded (the same decoder and the
//! same checks as `FilesProjection::apply`) and kept as a small `Op`: the upload's
//! whole row, a new name, a visibility, a time, a delete. `BlobPurged` changes nothing
//! and keeps nothing (it is still decoded: an undecodable one stops the rebuild).
//!
//! **Flush.** The chunk's ops are sorted by file and position, and each file's ops
//! are replayed onto the state the file had before the chunk, by the rules in
//! `FileState::apply` (the table in [`crate::files`]' module docs). Each file's final
//! row goes into one `COPY` as soon as it is known, so the replay and Postgres'
//! inserting overlap; the new tombstones follow in a second `COPY`.
//!
//! Why keep ops and replay them at the flush, rather than fold each event into a map
//! of rows as it comes: the state a file had before a chunk is only known at the
//! flush (from the second chunk on it is read back then), so one way serves every
//! chunk; and sorting the ops then replaying them in one pass took less time than
//! the hash map did (0.5 to 1 s for the benchmark's 1,000,000 events), and leaves
//! nothing but the final rows to write.
//!
//! - Before the first chunk the tables aside are empty, so the state before it needs
//!   no asking. From the second chunk on, the rows and tombstones of the files the
//!   chunk touches are read back first (`WHERE id = ANY(..)`, by primary key), and
//!   those rows deleted: each is written again, whole, after its ops (changed or not).
//!   A tombstone is only ever added, never changed.
//! - Memory is therefore bounded by the chunk (its ops, and the rows read back for
//!   it), not by the number of files in the log: a log of 10,000,000 files rebuilds
//!   in the memory of one of 250,000, at the price of one primary-key lookup per file
//!   and chunk after the first. An op is about 64 bytes, an upload's about 500 more
//!   (its row, with typical names and keys).
//! - Rows go out in id order: the primary key index then grows at its right edge
//!   instead of splitting pages all over.
//! - Each `COPY` and each `DELETE` is a transaction of its own, of at most
//!   `ROWS_PER_STATEMENT` rows (see [`BulkBuild`] on why none may be long).

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use dossier_domain::FileEvent;
use tokio_postgres::Client;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use super::{FILE_AGGREGATE_TYPE, FilesProjection};
use crate::error::ProjectionError;
use crate::projection::{BulkBuild, BulkTarget, RawEvent, decode_raw};

/// Rows per `COPY` or `DELETE` statement of a flush, each its own transaction: about
/// a tenth of a second of work for Postgres.
const ROWS_PER_STATEMENT: usize = 20_000;

/// The columns of `files` a flush writes (all but the generated `protected`), in
/// the order of [`FILE_TYPES`] and of [`CopyRow::values`], and the order a read-back
/// selects them in.
const FILE_COLUMNS: &str = "id, tenant, customer_id, name, file_name, content_type, size, sha256, \
     created_at, visibility, origin, viewed_at, signed_at, contract_id, task_id, blob_key, \
     last_position";

const FILE_TYPES: [Type; 17] = [
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::UUID,
    Type::TEXT,
    Type::INT8,
];

const TOMBSTONE_COLUMNS: &str = "id, tenant, last_position";

const TOMBSTONE_TYPES: [Type; 3] = [Type::UUID, Type::TEXT, Type::INT8];

/// The bulk build of [`FilesProjection`] (see the module docs).
#[derive(Debug, Default)]
pub struct FilesBulkBuild {
    tenants: Tenants,
    ops: Vec<Op>,
    /// Whether an earlier flush may have left rows in the tables aside.
    flushed: bool,
}

/// One folded event: what it does to file `id`, with the log row's tenant (as an
/// index into [`Tenants`]) and position, which the rules compare.
#[derive(Debug)]
struct Op {
    id: Uuid,
    position: i64,
    tenant: u32,
    change: Change,
}

#[derive(Debug)]
enum Change {
    Uploaded(Box<FileRow>),
    Renamed(String),
    VisibilityChanged(&'static str),
    Viewed(DateTime<Utc>),
    Signed(DateTime<Utc>),
    Deleted,
}

/// A row of `files`, all columns but the generated `protected`.
#[derive(Debug, Clone, PartialEq)]
struct FileRow {
    tenant: u32,
    customer_id: String,
    name: String,
    file_name: String,
    content_type: String,
    size: i64,
    sha256: String,
    created_at: DateTime<Utc>,
    /// `Borrowed` when it comes from an event, `Owned` when read back from a table.
    visibility: Cow<'static, str>,
    origin: Cow<'static, str>,
    viewed_at: Option<DateTime<Utc>>,
    signed_at: Option<DateTime<Utc>>,
    contract_id: Option<String>,
    task_id: Option<Uuid>,
    blob_key: String,
    last_position: i64,
}

/// A row of `files_tombstones`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tombstone {
    tenant: u32,
    last_position: i64,
}

/// What the tables hold for one file: before a chunk, then after each of its ops.
#[derive(Debug, Default)]
struct FileState {
    row: Option<FileRow>,
    tombstone: Option<Tombstone>,
    /// Whether the tombstone was in the table before the chunk.
    tombstone_stored: bool,
}

impl FileState {
    /// Applies one op by the rules of [`FilesProjection::apply`], whose statements
    /// say the same in SQL: the upload only where neither a row nor a tombstone
    /// exists (`ON CONFLICT`, `NOT EXISTS`); every other change, and the delete, only
    /// to a row of the same tenant whose last position is lower (`WHERE`); the
    /// delete's tombstone whether or not a row went, unless one exists.
    fn apply(&mut self, op: Op) {
        let row_matches = self
            .row
            .as_ref()
            .is_some_and(|row| row.tenant == op.tenant && row.last_position < op.position);
        match op.change {
            Change::Uploaded(new) => {
                if self.row.is_none() && self.tombstone.is_none() {
                    self.row = Some(*new);
                }
            }
            Change::Deleted => {
                if row_matches {
                    self.row = None;
                }
                self.tombstone.get_or_insert(Tombstone {
                    tenant: op.tenant,
                    last_position: op.position,
                });
            }
            change => {
                let Some(row) = self.row.as_mut().filter(|_| row_matches) else {
                    return;
                };
                match change {
                    Change::Renamed(name) => row.name = name,
                    Change::VisibilityChanged(visibility) => {
                        row.visibility = Cow::Borrowed(visibility);
                    }
                    // COALESCE(viewed_at, $3): the first view stays.
                    Change::Viewed(at) => {
                        row.viewed_at.get_or_insert(at);
                    }
                    Change::Signed(at) => row.signed_at = Some(at),
                    Change::Uploaded(_) | Change::Deleted => {}
                }
                row.last_position = op.position;
            }
        }
    }
}

/// The tenants of the folded events, each kept once: ops and rows carry an index.
#[derive(Debug, Default)]
struct Tenants {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Tenants {
    fn intern(&mut self, tenant: &str) -> Result<u32, ProjectionError> {
        if let Some(&i) = self.index.get(tenant) {
            return Ok(i);
        }
        let i = u32::try_from(self.names.len()).map_err(|_| {
            ProjectionError::InvalidDefinition("more than 2^32 tenants in one rebuild".to_owned())
        })?;
        self.names.push(tenant.to_owned());
        self.index.insert(tenant.to_owned(), i);
        Ok(i)
    }

    fn name(&self, i: u32) -> &String {
        static UNKNOWN: String = String::new();
        // Every index was handed out by `intern` of this value.
        self.names.get(i as usize).unwrap_or(&UNKNOWN)
    }
}

impl BulkBuild for FilesBulkBuild {
    fn aggregate_types(&self) -> &'static [&'static str] {
        &[FILE_AGGREGATE_TYPE]
    }

    fn fold(&mut self, event: &RawEvent<'_>) -> Result<(), ProjectionError> {
        if event.aggregate_type != FILE_AGGREGATE_TYPE {
            return Ok(());
        }
        let (id, decoded): (Uuid, FileEvent) = decode_raw(FilesProjection::NAME, event)?;
        let tenant = self.tenants.intern(event.tenant)?;
        let position = event.position;
        let change = match decoded {
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
                tenant: _,
            } => {
                let size = i64::try_from(size).map_err(|_| ProjectionError::Malformed {
                    projection: FilesProjection::NAME,
                    position,
                    reason: format!("size {size} does not fit a BIGINT"),
                })?;
                Change::Uploaded(Box::new(FileRow {
                    tenant,
                    customer_id: customer_id.as_str().to_owned(),
                    name: name.as_str().to_owned(),
                    file_name: file_name.as_str().to_owned(),
                    content_type: content_type.as_str().to_owned(),
                    size,
                    sha256: sha256.as_str().to_owned(),
                    created_at: uploaded_at,
                    visibility: Cow::Borrowed(visibility.as_str()),
                    origin: Cow::Borrowed(origin.as_str()),
                    viewed_at: None,
                    signed_at: None,
                    contract_id: contract_id.map(|c| c.as_str().to_owned()),
                    task_id,
                    blob_key: blob_key.as_str().to_owned(),
                    last_position: position,
                }))
            }
            FileEvent::FileRenamed { name, .. } => Change::Renamed(name.as_str().to_owned()),
            FileEvent::FileVisibilityChanged { visibility, .. } => {
                Change::VisibilityChanged(visibility.as_str())
            }
            FileEvent::FileViewed { viewed_at, .. } => Change::Viewed(viewed_at),
            FileEvent::FileSigned { signed_at } => Change::Signed(signed_at),
            FileEvent::FileDeleted { .. } => Change::Deleted,
            FileEvent::BlobPurged { .. } => return Ok(()),
        };
        self.ops.push(Op {
            id,
            position,
            tenant,
            change,
        });
        Ok(())
    }

    async fn flush(
        &mut self,
        client: &mut Client,
        target: &BulkTarget,
    ) -> Result<(), ProjectionError> {
        let mut ops = std::mem::take(&mut self.ops);
        if ops.is_empty() {
            return Ok(());
        }
        // Positions are unique: this order is total, the unstable sort exact.
        ops.sort_unstable_by_key(|op| (op.id, op.position));
        let files_table = target.table("files");
        let stored = if self.flushed {
            let mut ids: Vec<Uuid> = ops.iter().map(|op| op.id).collect();
            ids.dedup();
            let stored = self.read_back(client, target, &ids).await?;
            let rows: Vec<Uuid> = ids
                .into_iter()
                .filter(|id| stored.get(id).is_some_and(|file| file.row.is_some()))
                .collect();
            for ids in rows.chunks(ROWS_PER_STATEMENT) {
                client
                    .execute_typed(
                        &format!("DELETE FROM {files_table} WHERE id = ANY($1)"),
                        &[(&ids, Type::UUID_ARRAY)],
                    )
                    .await?;
            }
            stored
        } else {
            HashMap::new()
        };
        self.flushed = true;

        let mut replay = Replay {
            ops: ops.into_iter().peekable(),
            stored,
            tombstones: Vec::new(),
        };
        copy_in(
            client,
            &format!("COPY {files_table} ({FILE_COLUMNS}) FROM STDIN (FORMAT binary)"),
            &FILE_TYPES,
            &mut replay,
            &self.tenants,
        )
        .await?;
        copy_in(
            client,
            &format!(
                "COPY {} ({TOMBSTONE_COLUMNS}) FROM STDIN (FORMAT binary)",
                target.table("files_tombstones")
            ),
            &TOMBSTONE_TYPES,
            &mut replay.tombstones.into_iter(),
            &self.tenants,
        )
        .await?;
        Ok(())
    }
}

/// The final rows of a chunk's files, in id order, one file replayed per row asked
/// for; the new tombstones pile up in `tombstones` on the way.
struct Replay {
    /// The chunk's ops, sorted by id and position.
    ops: std::iter::Peekable<std::vec::IntoIter<Op>>,
    /// What earlier flushes left for these files.
    stored: HashMap<Uuid, FileState>,
    tombstones: Vec<(Uuid, Tombstone)>,
}

impl Iterator for Replay {
    type Item = (Uuid, FileRow);

    fn next(&mut self) -> Option<Self::Item> {
        while let Some(first) = self.ops.next() {
            let id = first.id;
            let mut file = self.stored.remove(&id).unwrap_or_default();
            file.apply(first);
            while let Some(op) = self.ops.next_if(|op| op.id == id) {
                file.apply(op);
            }
            if let (false, Some(tombstone)) = (file.tombstone_stored, file.tombstone) {
                self.tombstones.push((id, tombstone));
            }
            if let Some(row) = file.row {
                return Some((id, row));
            }
        }
        None
    }
}

impl FilesBulkBuild {
    /// What the tables aside hold for the files `ids` (what earlier flushes left).
    async fn read_back(
        &mut self,
        client: &Client,
        target: &BulkTarget,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, FileState>, ProjectionError> {
        let rows_sql = format!(
            "SELECT {FILE_COLUMNS} FROM {} WHERE id = ANY($1)",
            target.table("files")
        );
        let tombstones_sql = format!(
            "SELECT {TOMBSTONE_COLUMNS} FROM {} WHERE id = ANY($1)",
            target.table("files_tombstones")
        );
        let mut stored: HashMap<Uuid, FileState> = HashMap::new();
        for ids in ids.chunks(ROWS_PER_STATEMENT) {
            for row in client
                .query_typed(&rows_sql, &[(&ids, Type::UUID_ARRAY)])
                .await?
            {
                let tenant = self.tenants.intern(row.try_get(1)?)?;
                stored.entry(row.try_get(0)?).or_default().row = Some(FileRow {
                    tenant,
                    customer_id: row.try_get(2)?,
                    name: row.try_get(3)?,
                    file_name: row.try_get(4)?,
                    content_type: row.try_get(5)?,
                    size: row.try_get(6)?,
                    sha256: row.try_get(7)?,
                    created_at: row.try_get(8)?,
                    visibility: Cow::Owned(row.try_get(9)?),
                    origin: Cow::Owned(row.try_get(10)?),
                    viewed_at: row.try_get(11)?,
                    signed_at: row.try_get(12)?,
                    contract_id: row.try_get(13)?,
                    task_id: row.try_get(14)?,
                    blob_key: row.try_get(15)?,
                    last_position: row.try_get(16)?,
                });
            }
            for row in client
                .query_typed(&tombstones_sql, &[(&ids, Type::UUID_ARRAY)])
                .await?
            {
                let tenant = self.tenants.intern(row.try_get(1)?)?;
                let file = stored.entry(row.try_get(0)?).or_default();
                file.tombstone = Some(Tombstone {
                    tenant,
                    last_position: row.try_get(2)?,
                });
                file.tombstone_stored = true;
            }
        }
        Ok(stored)
    }
}

/// A row a flush writes with `COPY`: its `N` values, in the order of the statement's
/// columns and types.
trait CopyRow<const N: usize> {
    fn values<'a>(&'a self, tenants: &'a Tenants) -> [&'a (dyn ToSql + Sync); N];
}

impl CopyRow<17> for (Uuid, FileRow) {
    fn values<'a>(&'a self, tenants: &'a Tenants) -> [&'a (dyn ToSql + Sync); 17] {
        let (id, row) = self;
        [
            id,
            tenants.name(row.tenant),
            &row.customer_id,
            &row.name,
            &row.file_name,
            &row.content_type,
            &row.size,
            &row.sha256,
            &row.created_at,
            &row.visibility,
            &row.origin,
            &row.viewed_at,
            &row.signed_at,
            &row.contract_id,
            &row.task_id,
            &row.blob_key,
            &row.last_position,
        ]
    }
}

impl CopyRow<3> for (Uuid, Tombstone) {
    fn values<'a>(&'a self, tenants: &'a Tenants) -> [&'a (dyn ToSql + Sync); 3] {
        let (id, tombstone) = self;
        [id, tenants.name(tombstone.tenant), &tombstone.last_position]
    }
}

/// Writes `rows` with `COPY ... FROM STDIN (FORMAT binary)` (`sql`), at most
/// [`ROWS_PER_STATEMENT`] per statement.
async fn copy_in<R: CopyRow<N> + Send, const N: usize>(
    client: &Client,
    sql: &str,
    types: &[Type; N],
    rows: &mut (impl Iterator<Item = R> + Send),
    tenants: &Tenants,
) -> Result<(), ProjectionError> {
    let mut rows = rows.peekable();
    while rows.peek().is_some() {
        let mut writer = std::pin::pin!(BinaryCopyInWriter::new(client.copy_in(sql).await?, types));
        for row in rows.by_ref().take(ROWS_PER_STATEMENT) {
            // `N` values for `N` types: the length check inside `write` cannot fail.
            writer.as_mut().write(&row.values(tenants)).await?;
        }
        writer.finish().await?;
    }
    Ok(())
}
