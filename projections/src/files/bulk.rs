//! The files projection's [`BulkBuild`]: how a rebuild fills `files` and
//! `files_tombstones` aside without a statement per event.
//!
//! **Fold.** Each event of the `file` aggregate is decoded (the same decoder and the
//! same checks as `FilesProjection::apply`) and kept as a small `Op`: its
//! [`FileChange`] (the upload's columns, a new name, a visibility, a time, a delete)
//! with its file, tenant and position. `BlobPurged` changes nothing and keeps nothing
//! (it is still decoded: an undecodable one stops the rebuild).
//!
//! **Flush.** The chunk's ops are sorted by file and position, and each file's ops
//! are replayed onto the state the file had before the chunk with
//! [`FileState::apply`]: the rules of [`super::fold`], the same the property test
//! holds to `FilesProjection::apply`; this module has none of its own. Each file's
//! final row goes into one `COPY` as soon as it is known, so the replay and
//! Postgres' inserting overlap; the new tombstones follow in a second `COPY`.
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

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use dossier_domain::{BlobKey, FileEvent};
use serde::de::{DeserializeOwned, IntoDeserializer as _};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row};
use uuid::Uuid;

use super::fold::{FileChange, FileRow, FileState, Tombstone};
use super::{FILE_AGGREGATE_TYPE, FilesProjection};
use crate::error::ProjectionError;
use crate::projection::{BulkBuild, BulkTarget, RawEvent, decode_raw};

/// Rows per `COPY` or `DELETE` statement of a flush, each its own transaction: about
/// a tenth of a second of work for Postgres.
const ROWS_PER_STATEMENT: usize = 20_000;

/// The columns of `files` a flush writes (all but the generated `protected`), in
/// the order of [`FILE_TYPES`] and of [`CopyRow::write`], and the order a read-back
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
    change: FileChange,
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
        let change =
            FileChange::from_event(decoded).map_err(|error| ProjectionError::Malformed {
                projection: FilesProjection::NAME,
                position,
                reason: error.to_string(),
            })?;
        let Some(change) = change else {
            return Ok(());
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
    stored: HashMap<Uuid, FileState<u32>>,
    tombstones: Vec<(Uuid, Tombstone<u32>)>,
}

impl Iterator for Replay {
    type Item = (Uuid, FileRow<u32>);

    fn next(&mut self) -> Option<Self::Item> {
        while let Some(first) = self.ops.next() {
            let id = first.id;
            let mut file = self.stored.remove(&id).unwrap_or_default();
            // A tombstone, once there, never changes: a new one is one that was not.
            let tombstone_stored = file.tombstone.is_some();
            file.apply(first.tenant, first.position, first.change);
            while let Some(op) = self.ops.next_if(|op| op.id == id) {
                file.apply(op.tenant, op.position, op.change);
            }
            if let (false, Some(tombstone)) = (tombstone_stored, file.tombstone) {
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
    ) -> Result<HashMap<Uuid, FileState<u32>>, ProjectionError> {
        let rows_sql = format!(
            "SELECT {FILE_COLUMNS} FROM {} WHERE id = ANY($1)",
            target.table("files")
        );
        let tombstones_sql = format!(
            "SELECT {TOMBSTONE_COLUMNS} FROM {} WHERE id = ANY($1)",
            target.table("files_tombstones")
        );
        let mut stored: HashMap<Uuid, FileState<u32>> = HashMap::new();
        for ids in ids.chunks(ROWS_PER_STATEMENT) {
            for row in client
                .query_typed(&rows_sql, &[(&ids, Type::UUID_ARRAY)])
                .await?
            {
                let tenant = self.tenants.intern(row.try_get(1)?)?;
                stored.entry(row.try_get(0)?).or_default().row = Some(FileRow {
                    tenant,
                    customer_id: recorded(&row, 2)?,
                    name: recorded(&row, 3)?,
                    file_name: recorded(&row, 4)?,
                    content_type: recorded(&row, 5)?,
                    size: row.try_get(6)?,
                    sha256: recorded(&row, 7)?,
                    created_at: row.try_get(8)?,
                    visibility: recorded(&row, 9)?,
                    origin: recorded(&row, 10)?,
                    viewed_at: row.try_get(11)?,
                    signed_at: row.try_get(12)?,
                    contract_id: recorded_opt(&row, 13)?,
                    task_id: row.try_get(14)?,
                    blob_key: BlobKey::from_recorded(row.try_get::<_, String>(15)?),
                    last_position: row.try_get(16)?,
                });
            }
            for row in client
                .query_typed(&tombstones_sql, &[(&ids, Type::UUID_ARRAY)])
                .await?
            {
                let tenant = self.tenants.intern(row.try_get(1)?)?;
                stored.entry(row.try_get(0)?).or_default().tombstone = Some(Tombstone {
                    tenant,
                    last_position: row.try_get(2)?,
                });
            }
        }
        Ok(stored)
    }
}

/// A value of a domain type from the text a flush wrote, the way the queries read it
/// back (`query::from_recorded`): through serde, without the parsers of the edge.
fn recorded<T: DeserializeOwned>(row: &Row, column: usize) -> Result<T, ProjectionError> {
    from_text(column, row.try_get(column)?)
}

/// [`recorded`] of a nullable column.
fn recorded_opt<T: DeserializeOwned>(
    row: &Row,
    column: usize,
) -> Result<Option<T>, ProjectionError> {
    row.try_get::<_, Option<String>>(column)?
        .map(|raw| from_text(column, raw))
        .transpose()
}

fn from_text<T: DeserializeOwned>(column: usize, raw: String) -> Result<T, ProjectionError> {
    T::deserialize(raw.into_deserializer()).map_err(|error: serde::de::value::Error| {
        ProjectionError::InvalidDefinition(format!(
            "column {column} of a row the rebuild wrote does not read back: {error}"
        ))
    })
}

/// A row a flush writes with `COPY`: its `N` values, in the order of the statement's
/// columns and types.
trait CopyRow<const N: usize> {
    /// Writes the row's values to `writer`.
    fn write<'a>(
        &'a self,
        tenants: &'a Tenants,
        writer: Pin<&'a mut BinaryCopyInWriter>,
    ) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a;
}

impl CopyRow<17> for (Uuid, FileRow<u32>) {
    fn write<'a>(
        &'a self,
        tenants: &'a Tenants,
        writer: Pin<&'a mut BinaryCopyInWriter>,
    ) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a {
        let (id, row) = self;
        async move {
            let values: [&(dyn ToSql + Sync); 17] = [
                id,
                tenants.name(row.tenant),
                &row.customer_id.as_str(),
                &row.name.as_str(),
                &row.file_name.as_str(),
                &row.content_type.as_str(),
                &row.size,
                &row.sha256.as_str(),
                &row.created_at,
                &row.visibility.as_str(),
                &row.origin.as_str(),
                &row.viewed_at,
                &row.signed_at,
                &row.contract_id.as_ref().map(|c| c.as_str()),
                &row.task_id,
                &row.blob_key.as_str(),
                &row.last_position,
            ];
            writer.write(&values).await
        }
    }
}

impl CopyRow<3> for (Uuid, Tombstone<u32>) {
    fn write<'a>(
        &'a self,
        tenants: &'a Tenants,
        writer: Pin<&'a mut BinaryCopyInWriter>,
    ) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a {
        let (id, tombstone) = self;
        async move {
            let values: [&(dyn ToSql + Sync); 3] =
                [id, tenants.name(tombstone.tenant), &tombstone.last_position];
            writer.write(&values).await
        }
    }
}

/// Writes `rows` with `COPY ... FROM STDIN (FORMAT binary)` (`sql`), at most
/// [`ROWS_PER_STATEMENT`] per statement.
async fn copy_in<R: CopyRow<N> + Send + Sync, const N: usize>(
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
            row.write(tenants, writer.as_mut()).await?;
        }
        writer.finish().await?;
    }
    Ok(())
}
