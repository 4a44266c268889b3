//! Queries on the files read model: one file by id, several by id, and a customer's
//! list with filters and a keyset cursor.
//!
//! Every query is one SQL statement with bound parameters (no user value is ever
//! spliced into SQL) and filters by tenant: another tenant's file is not found and
//! never listed (CONTRACT.md rule 6). Deleted files have no row, so they are gone from
//! every answer the moment the projection applied the deletion (rule 7).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use dossier_domain::{
    BlobKey, ContentType, ContractId, CustomerId, DisplayName, FileId, FileName, Origin, Sha256Hex,
    TenantId, Visibility,
};
use dossier_eventlog::db::Pool;
use serde::Serialize;
use serde::de::{DeserializeOwned, IntoDeserializer};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::cursor::{Cursor, Paging};
use crate::error::pg_detail;

/// The contract's File resource, as the read model shows it now. Serializes to
/// exactly the contract's JSON; `blob_key` and `last_position` are for the server's
/// own use (downloads, bundles) and never serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(as = File)]
pub struct FileView {
    /// The file's id.
    #[schema(value_type = String, format = Uuid)]
    pub id: FileId,
    /// The customer the file hangs under.
    #[schema(value_type = String)]
    pub customer_id: CustomerId,
    /// The display name.
    #[schema(value_type = String)]
    pub name: DisplayName,
    /// The original file name.
    #[schema(value_type = String)]
    pub file_name: FileName,
    /// The declared content type.
    #[schema(value_type = String)]
    pub content_type: ContentType,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the stored bytes, hex.
    #[schema(value_type = String)]
    pub sha256: Sha256Hex,
    /// When the upload was recorded.
    pub created_at: DateTime<Utc>,
    /// Who can see it.
    #[schema(value_type = String, example = "internal")]
    pub visibility: Visibility,
    /// Where it came from.
    #[schema(value_type = String, example = "staff_upload")]
    pub origin: Origin,
    /// When its customer first downloaded it in the portal.
    pub viewed_at: Option<DateTime<Utc>>,
    /// When it was signed.
    pub signed_at: Option<DateTime<Utc>>,
    /// The contract it belongs to.
    #[schema(value_type = Option<String>)]
    pub contract_id: Option<ContractId>,
    /// The portal task it is attached to.
    pub task_id: Option<Uuid>,
    /// Origin `system` or `product`: can never be deleted.
    pub protected: bool,
    /// Where the bytes are in the blob store.
    #[serde(skip)]
    #[schema(ignore)]
    pub blob_key: BlobKey,
    /// Log position of the last event applied to this file (a version for ETags and
    /// for read-your-writes checks).
    #[serde(skip)]
    #[schema(ignore)]
    pub last_position: i64,
}

impl FileView {
    /// The cursor that continues a list after this file.
    pub fn cursor(&self) -> Cursor {
        Cursor::after(self.created_at, self.id.0)
    }
}

/// The filters of `GET /v1/customers/{customer_id}/files`; all of them at once are
/// combined with AND.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFilter {
    /// `Some(true)`: only files the customer has viewed; `Some(false)`: only unviewed.
    pub viewed: Option<bool>,
    /// Only these visibilities; empty means all.
    pub visibility: Vec<Visibility>,
    /// Created at or after this instant.
    pub created_from: Option<DateTime<Utc>>,
    /// Created at or before this instant (inclusive: a date-only `created_to` should
    /// arrive here as the last microsecond of that day).
    pub created_to: Option<DateTime<Utc>>,
    /// Only files of this contract.
    pub contract_id: Option<String>,
    /// Only files of this origin.
    pub origin: Option<Origin>,
    /// Page size, 1 to 500; values outside are clamped.
    pub limit: u32,
    /// Continue after this cursor (from a previous page's `next_cursor`).
    pub cursor: Option<Cursor>,
}

impl FileFilter {
    /// The contract's default page size.
    pub const DEFAULT_LIMIT: u32 = Paging::DEFAULT_LIMIT;
    /// The largest page.
    pub const MAX_LIMIT: u32 = Paging::MAX_LIMIT;
}

impl Default for FileFilter {
    /// No filter, first page, 50 files.
    fn default() -> Self {
        Self {
            viewed: None,
            visibility: Vec::new(),
            created_from: None,
            created_to: None,
            contract_id: None,
            origin: None,
            limit: Self::DEFAULT_LIMIT,
            cursor: None,
        }
    }
}

/// One page of a file list: the contract's `{"items": [File], "next_cursor": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(as = FilePage)]
pub struct Page {
    /// Newest first.
    pub items: Vec<FileView>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Why a query failed. None of these is "not found": that is `Ok(None)` or a
/// shorter answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No pooled Postgres connection could be had (Postgres down, pool exhausted).
    #[error("no Postgres connection for the files read model: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The statement failed.
    #[error("files read model query failed: {}", pg_detail(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// A stored row does not read back into a [`FileView`]; the read model needs a
    /// rebuild (or a migration broke it).
    #[error("the files read model holds an unreadable {column}: {detail}")]
    Corrupt {
        /// The column.
        column: &'static str,
        /// Why.
        detail: String,
    },
}

const COLUMNS: &str = "id, customer_id, name, file_name, content_type, size, sha256, created_at, \
     visibility, origin, viewed_at, signed_at, contract_id, task_id, protected, blob_key, \
     last_position";

/// One file of `tenant`; `None` when it does not exist, was deleted, or belongs to
/// another tenant (all three look the same, rule 6).
pub async fn get(
    pool: &Pool,
    tenant: &TenantId,
    id: FileId,
) -> Result<Option<FileView>, QueryError> {
    let client = pool.get().await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM files WHERE id = $1 AND tenant = $2"
        ))
        .await?;
    let row = client
        .query_opt(&statement, &[&id.0, &tenant.as_str()])
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// The files of `tenant` among `ids`, in the order of `ids` (each once); unknown,
/// deleted and other tenants' ids are left out. For bundles and bulk deletes.
pub async fn get_many(
    pool: &Pool,
    tenant: &TenantId,
    ids: &[FileId],
) -> Result<Vec<FileView>, QueryError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
    let client = pool.get().await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM files WHERE tenant = $1 AND id = ANY($2::uuid[])"
        ))
        .await?;
    let rows = client
        .query(&statement, &[&tenant.as_str(), &wanted])
        .await?;
    let mut found: HashMap<Uuid, FileView> = rows
        .iter()
        .map(|row| from_row(row).map(|view| (view.id.0, view)))
        .collect::<Result<_, _>>()?;
    // `remove` hands out each file once, also when `ids` repeats it.
    Ok(wanted.iter().filter_map(|id| found.remove(id)).collect())
}

/// One live file of a customer as an erasure sees it: its id, and whether it
/// is protected (origin `system` or `product`, the read model's generated
/// `protected` column, CONTRACT.md "protected").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CustomerFile {
    pub id: FileId,
    pub protected: bool,
}

/// Every live file of `customer` of `tenant`, oldest first (ids break ties),
/// without paging: what an erasure deletes or keeps. Reads the list's index
/// (`files_customer_newest_first`) for the tenant and customer.
pub async fn of_customer(
    pool: &Pool,
    tenant: &TenantId,
    customer: &CustomerId,
) -> Result<Vec<CustomerFile>, QueryError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT id, protected FROM files WHERE tenant = $1 AND customer_id = $2 \
             ORDER BY created_at, id",
            &[&tenant.as_str(), &customer.as_str()],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(CustomerFile {
                id: FileId(row.try_get(0)?),
                protected: row.try_get(1)?,
            })
        })
        .collect()
}

/// Whom a query answers (CONTRACT.md rule 8): staff see every file of their
/// tenant; a customer sees only their own files, and only while the visibility
/// is one the portal shows ([`Visibility::in_portal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience<'a> {
    Staff,
    Customer(&'a CustomerId),
}

impl Audience<'_> {
    /// Whether this audience may see `file` (its tenant already checked).
    pub fn sees(&self, file: &FileView) -> bool {
        match self {
            Self::Staff => true,
            Self::Customer(customer) => {
                file.customer_id == **customer && file.visibility.in_portal()
            }
        }
    }

    /// The audience's customer, `None` for staff; with [`published`], the SQL
    /// form of [`Self::sees`].
    fn customer(&self) -> Option<&str> {
        match self {
            Self::Staff => None,
            Self::Customer(customer) => Some(customer.as_str()),
        }
    }
}

/// The visibilities the portal shows, as stored.
fn published() -> Vec<&'static str> {
    Visibility::ALL
        .iter()
        .filter(|v| v.in_portal())
        .map(|v| v.as_str())
        .collect()
}

/// The live files attached to any of `task_ids` (of `tenant`) that `audience`
/// may see, oldest first: a task's attachments.
pub async fn by_tasks(
    pool: &Pool,
    tenant: &TenantId,
    task_ids: &[Uuid],
    audience: Audience<'_>,
) -> Result<Vec<FileView>, QueryError> {
    if task_ids.is_empty() {
        return Ok(Vec::new());
    }
    let client = pool.get().await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM files WHERE tenant = $1 AND task_id = ANY($2::uuid[]) \
               AND ($3::text IS NULL OR (customer_id = $3::text AND visibility = ANY($4::text[]))) \
             ORDER BY created_at, id"
        ))
        .await?;
    let rows = client
        .query(
            &statement,
            &[
                &tenant.as_str(),
                &task_ids,
                &audience.customer(),
                &published(),
            ],
        )
        .await?;
    rows.iter().map(from_row).collect()
}

/// The list query. The WHERE clause is written so that one plan serves every
/// combination of filters and uses `files_customer_newest_first` for all of
/// `(tenant, customer_id)`, the created range and the cursor as index bounds:
/// absent bounds become ±infinity instead of `$n IS NULL OR ...`, which would hide
/// them from the index in a generic plan. The remaining filters are checked on the
/// rows the index scan meets, in order, until the page is full.
const LIST: &str = "\
    SELECT {COLUMNS} FROM files \
    WHERE tenant = $1 AND customer_id = $2 \
      AND created_at >= COALESCE($3::timestamptz, '-infinity'::timestamptz) \
      AND created_at <= LEAST(COALESCE($4::timestamptz, 'infinity'::timestamptz), \
                              COALESCE($5::timestamptz, 'infinity'::timestamptz)) \
      AND ($5::timestamptz IS NULL OR created_at < $5::timestamptz OR id < $6::uuid) \
      AND ($7::boolean IS NULL OR (viewed_at IS NOT NULL) = $7::boolean) \
      AND visibility = ANY($8::text[]) \
      AND ($9::text IS NULL OR contract_id = $9::text) \
      AND ($10::text IS NULL OR origin = $10::text) \
    ORDER BY created_at DESC, id DESC \
    LIMIT $11";

/// One page of the files of `tenant`'s customer `customer_id`, newest first (by
/// `created_at`, then id), filtered by `filter`.
pub async fn list(
    pool: &Pool,
    tenant: &TenantId,
    customer_id: &CustomerId,
    filter: &FileFilter,
) -> Result<Page, QueryError> {
    let limit = filter.limit.clamp(1, FileFilter::MAX_LIMIT);
    // One more than the page, to know whether there is a next page.
    let fetch = i64::from(limit) + 1;
    let visibility: Vec<&str> = if filter.visibility.is_empty() {
        Visibility::ALL.iter().map(|v| v.as_str()).collect()
    } else {
        filter.visibility.iter().map(|v| v.as_str()).collect()
    };
    let cursor_at = filter.cursor.map(|c| c.created_at);
    let cursor_id = filter.cursor.map(|c| c.id);
    let origin = filter.origin.map(Origin::as_str);

    let client = pool.get().await?;
    let statement = client
        .prepare_cached(&LIST.replace("{COLUMNS}", COLUMNS))
        .await?;
    let rows = client
        .query(
            &statement,
            &[
                &tenant.as_str(),
                &customer_id.as_str(),
                &filter.created_from,
                &filter.created_to,
                &cursor_at,
                &cursor_id,
                &filter.viewed,
                &visibility,
                &filter.contract_id,
                &origin,
                &fetch,
            ],
        )
        .await?;

    let mut items = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|last| last.cursor().encode())
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

/// Maps a row selected with [`COLUMNS`].
fn from_row(row: &Row) -> Result<FileView, QueryError> {
    let size: i64 = column(row, "size")?;
    Ok(FileView {
        id: FileId(column(row, "id")?),
        customer_id: recorded(row, "customer_id")?,
        name: recorded(row, "name")?,
        file_name: recorded(row, "file_name")?,
        content_type: recorded(row, "content_type")?,
        size: u64::try_from(size).map_err(|_| QueryError::Corrupt {
            column: "size",
            detail: format!("{size} is negative"),
        })?,
        sha256: recorded(row, "sha256")?,
        created_at: column(row, "created_at")?,
        visibility: Visibility::parse(&column::<String>(row, "visibility")?).map_err(|e| {
            QueryError::Corrupt {
                column: "visibility",
                detail: e.to_string(),
            }
        })?,
        origin: Origin::parse(&column::<String>(row, "origin")?).map_err(|e| {
            QueryError::Corrupt {
                column: "origin",
                detail: e.to_string(),
            }
        })?,
        viewed_at: column(row, "viewed_at")?,
        signed_at: column(row, "signed_at")?,
        contract_id: column::<Option<String>>(row, "contract_id")?
            .map(|raw| from_recorded("contract_id", raw))
            .transpose()?,
        task_id: column(row, "task_id")?,
        protected: column(row, "protected")?,
        blob_key: BlobKey::from_recorded(column::<String>(row, "blob_key")?),
        last_position: column(row, "last_position")?,
    })
}

fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    name: &'static str,
) -> Result<T, QueryError> {
    row.try_get(name).map_err(|e| QueryError::Corrupt {
        column: name,
        detail: pg_detail(&e),
    })
}

fn recorded<T: DeserializeOwned>(row: &Row, name: &'static str) -> Result<T, QueryError> {
    from_recorded(name, column::<String>(row, name)?)
}

/// A value type from a string the projection stored, the way the domain reads
/// recorded events back: through serde, without re-running the parser of the edge.
/// The value was parsed when the command came in; re-parsing here would make old
/// files unreadable the day a rule gets stricter.
fn from_recorded<T: DeserializeOwned>(name: &'static str, raw: String) -> Result<T, QueryError> {
    T::deserialize(raw.into_deserializer()).map_err(|e: serde::de::value::Error| {
        QueryError::Corrupt {
            column: name,
            detail: e.to_string(),
        }
    })
}
