//! The customers read model: one row per customer of a tenant in `customers`
//! (migration 0009), fed by [`CustomersProjection`], read by [`list`] for
//! `GET /v1/customers` (the staff console's customer list and its search box).
//!
//! What a row says, exactly:
//!
//! - A customer **appears** with the first event that concerns it (below), and
//!   then stays: a customer whose files were all deleted is still listed, with
//!   `files` 0.
//! - `files`: the customer's files that are not deleted: uploads (staff,
//!   upstream, portal attachments, files of thread messages) minus deletions.
//! - `open_tasks`: the customer's tasks. The domain has no way to close or
//!   complete a task yet, so every task is open; once it has, its event lowers
//!   the count here.
//! - `last_activity_at`: the newest time (the log's `at`, when the event was
//!   recorded, never a time the client chose such as a `signed_at`) of the
//!   events that concern the customer:
//!
//! | aggregate | events | the customer |
//! |---|---|---|
//! | `file` | `FileUploaded` | the upload's `customer_id` (also counts the file) |
//! | `file` | `FileRenamed`, `FileVisibilityChanged`, `FileViewed`, `FileSigned` | the file's |
//! | `file` | `FileDeleted` | the file's (also uncounts it) |
//! | `download` | `FileDownloaded` (staff, portal and bundle downloads) | the file's |
//! | `task` | `TaskCreated` | the task's `customer_id` (also counts the task) |
//! | `task` | `TaskMessagePosted` (staff or customer; its file is a `FileUploaded`) | the task's |
//! | `customer` | `CustomerErased` | the erased customer (see below) |
//!
//! - **Erasure** (`CustomerErased`, CONTRACT.md "Data protection"): the
//!   erasure's `FileDeleted` events came first and uncounted the erased files.
//!   The customer's tasks are forgotten (`customer_tasks`), and so are its
//!   deleted files (`customer_files` rows no longer live). If protected files
//!   are kept, the row stays with `files` the kept ones, `open_tasks` 0 and
//!   the erasure as its last activity; otherwise the row is removed and the
//!   customer is listed no more, until an event names it again (a later
//!   upload starts a new row). Because the rows that made the counts
//!   idempotent are gone, an event from before the erasure applied again
//!   would count anew: the checkpoint, committed with every batch, is what
//!   keeps that from happening, and a rebuild restores the rows.
//!
//!   `BlobPurged` is not activity (the worker's housekeeping after a delete,
//!   which was the activity); bundle and settings events concern no one
//!   customer. A download is recorded by a `GET`, not a command, so the list
//!   shows it once the projection applied it (within its lag), not before the
//!   download's answer (CONTRACT.md rule 10 is about commands); every command
//!   above is read-your-writes like any other.
//!
//! Which customer a file or a task belongs to is kept in `customer_files` and
//! `customer_tasks` (the events after an upload or a task's creation do not
//! repeat it); the projection reads only its own tables, so that a rebuild builds
//! them aside like any other.
//!
//! Idempotent by log position: every change of a `customers` row carries
//! `last_position < event position`; the counts change only when the file's or
//! task's own row was inserted (`ON CONFLICT DO NOTHING`) or its file went from
//! live to deleted, in the same statement, so an event applied twice changes
//! nothing. Every row is keyed by tenant and customer, and every lookup of a
//! file or task is by id *and* the event's tenant (CONTRACT.md rule 6).

use chrono::{DateTime, Utc};
use dossier_domain::{
    CustomerEvent, CustomerId, CustomerIdPrefix, DownloadEvent, FileEvent, TaskEvent, TenantId,
};
use dossier_eventlog::db::Pool;
use dossier_eventlog::log::LoggedEvent;
use serde::Serialize;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::cursor::{ActivityCursor, Paging};
use crate::error::ProjectionError;
use crate::files::{FILE_AGGREGATE_TYPE, QueryError};
use crate::projection::{ApplyTx, Projection, decode_event, decode_payload};

/// The aggregate type of tasks in the log (`<dossier_domain::Task as
/// cqrs_es::Aggregate>::TYPE`).
pub const TASK_AGGREGATE_TYPE: &str = "task";
/// The aggregate type of downloads in the log (`<dossier_domain::Download as
/// cqrs_es::Aggregate>::TYPE`).
pub const DOWNLOAD_AGGREGATE_TYPE: &str = "download";

/// The aggregate type of customers in the log (`<dossier_domain::Customer as
/// cqrs_es::Aggregate>::TYPE`); its id is `{tenant}/{customer_id}`, not a UUID.
pub const CUSTOMER_AGGREGATE_TYPE: &str = "customer";

/// The projection that keeps `customers`, `customer_files` and `customer_tasks`
/// in step with the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct CustomersProjection;

impl CustomersProjection {
    /// Its name in `checkpoints` and in metrics.
    pub const NAME: &'static str = "customers";
}

/// One statement's parameters with their types (one round trip each).
type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

/// The end of every statement that changes a customer's row: the row the
/// statement's `SELECT` gives is the change (count deltas, the event's time and
/// position), added to the row there is, once per position.
macro_rules! touch_customer {
    ($select:literal) => {
        concat!(
            "INSERT INTO customers AS c \
                 (tenant, customer_id, files, open_tasks, last_activity_at, last_position) ",
            $select,
            " ON CONFLICT (tenant, customer_id) DO UPDATE SET \
                 files = c.files + EXCLUDED.files, \
                 open_tasks = c.open_tasks + EXCLUDED.open_tasks, \
                 last_activity_at = GREATEST(c.last_activity_at, EXCLUDED.last_activity_at), \
                 last_position = EXCLUDED.last_position \
             WHERE c.last_position < EXCLUDED.last_position"
        )
    };
}

/// `$1` file, `$2` tenant, `$3` customer, `$4` at, `$5` position.
const FILE_UPLOADED: &str = concat!(
    "WITH added AS ( \
         INSERT INTO customer_files (id, tenant, customer_id, live) VALUES ($1, $2, $3, true) \
         ON CONFLICT (id) DO NOTHING RETURNING 1) ",
    touch_customer!("SELECT $2, $3, (SELECT count(*) FROM added), 0, $4, $5")
);

/// `$1` file, `$2` tenant, `$3` at, `$4` position.
const FILE_DELETED: &str = concat!(
    "WITH removed AS ( \
         UPDATE customer_files SET live = false WHERE id = $1 AND tenant = $2 AND live \
         RETURNING tenant, customer_id) ",
    touch_customer!("SELECT tenant, customer_id, -1, 0, $3, $4 FROM removed")
);

/// Any other event of a file: `$1` file, `$2` tenant, `$3` at, `$4` position.
const FILE_TOUCHED: &str = touch_customer!(
    "SELECT tenant, customer_id, 0, 0, $3, $4 FROM customer_files WHERE id = $1 AND tenant = $2"
);

/// `$1` task, `$2` tenant, `$3` customer, `$4` at, `$5` position.
const TASK_CREATED: &str = concat!(
    "WITH added AS ( \
         INSERT INTO customer_tasks (id, tenant, customer_id) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO NOTHING RETURNING 1) ",
    touch_customer!("SELECT $2, $3, 0, (SELECT count(*) FROM added), $4, $5")
);

/// Any other event of a task: `$1` task, `$2` tenant, `$3` at, `$4` position.
const TASK_TOUCHED: &str = touch_customer!(
    "SELECT tenant, customer_id, 0, 0, $3, $4 FROM customer_tasks WHERE id = $1 AND tenant = $2"
);

/// An erasure forgets the customer's tasks: `$1` tenant, `$2` customer.
const ERASE_TASKS: &str = "DELETE FROM customer_tasks WHERE tenant = $1 AND customer_id = $2";

/// An erasure forgets the customer's deleted files: `$1` tenant, `$2` customer.
const ERASE_DELETED_FILES: &str =
    "DELETE FROM customer_files WHERE tenant = $1 AND customer_id = $2 AND NOT live";

/// An erasure keeps the customer's row only for its kept (live, protected)
/// files, with no tasks; without any, the row goes. `$1` tenant, `$2`
/// customer, `$3` at, `$4` position. The two branches exclude each other, so
/// the row is changed by one of them at most.
const ERASE_CUSTOMER: &str = "\
    WITH kept AS ( \
         SELECT count(*) AS files FROM customer_files \
         WHERE tenant = $1 AND customer_id = $2 AND live), \
     dropped AS ( \
         DELETE FROM customers \
         WHERE tenant = $1 AND customer_id = $2 AND last_position < $4 \
           AND (SELECT files FROM kept) = 0) \
    UPDATE customers SET files = (SELECT files FROM kept), open_tasks = 0, \
        last_activity_at = GREATEST(last_activity_at, $3), last_position = $4 \
    WHERE tenant = $1 AND customer_id = $2 AND last_position < $4 \
      AND (SELECT files FROM kept) > 0";

impl Projection for CustomersProjection {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &["customers", "customer_files", "customer_tasks"]
    }

    async fn apply(&self, tx: &ApplyTx<'_>, event: &LoggedEvent) -> Result<(), ProjectionError> {
        let tenant = event.tenant.as_str();
        let at = event.at;
        let position = event.position;
        match event.aggregate_type.as_str() {
            FILE_AGGREGATE_TYPE => {
                let (id, decoded): (Uuid, FileEvent) = decode_event(Self::NAME, event)?;
                match decoded {
                    FileEvent::FileUploaded { customer_id, .. } => {
                        created(tx, FILE_UPLOADED, id, tenant, &customer_id, at, position).await
                    }
                    FileEvent::FileDeleted { .. } => {
                        touched(tx, FILE_DELETED, id, tenant, at, position).await
                    }
                    FileEvent::FileRenamed { .. }
                    | FileEvent::FileVisibilityChanged { .. }
                    | FileEvent::FileViewed { .. }
                    | FileEvent::FileSigned { .. } => {
                        touched(tx, FILE_TOUCHED, id, tenant, at, position).await
                    }
                    FileEvent::BlobPurged { .. } => Ok(()),
                }
            }
            DOWNLOAD_AGGREGATE_TYPE => {
                let (_, DownloadEvent::FileDownloaded { file_id, .. }) =
                    decode_event(Self::NAME, event)?;
                touched(tx, FILE_TOUCHED, file_id.0, tenant, at, position).await
            }
            TASK_AGGREGATE_TYPE => {
                let (id, decoded): (Uuid, TaskEvent) = decode_event(Self::NAME, event)?;
                match decoded {
                    TaskEvent::TaskCreated { customer_id, .. } => {
                        created(tx, TASK_CREATED, id, tenant, &customer_id, at, position).await
                    }
                    TaskEvent::TaskMessagePosted { .. } => {
                        touched(tx, TASK_TOUCHED, id, tenant, at, position).await
                    }
                }
            }
            CUSTOMER_AGGREGATE_TYPE => {
                let CustomerEvent::CustomerErased { customer_id, .. } =
                    decode_payload(Self::NAME, event)?;
                let customer = customer_id.as_str();
                let who: &Params<'_> = &[(&tenant, Type::TEXT), (&customer, Type::TEXT)];
                tx.write(ERASE_TASKS, who).await?;
                tx.write(ERASE_DELETED_FILES, who).await?;
                let params: &Params<'_> = &[
                    (&tenant, Type::TEXT),
                    (&customer, Type::TEXT),
                    (&at, Type::TIMESTAMPTZ),
                    (&position, Type::INT8),
                ];
                tx.write(ERASE_CUSTOMER, params).await?;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A file or task that names its customer: [`FILE_UPLOADED`], [`TASK_CREATED`].
async fn created(
    tx: &ApplyTx<'_>,
    sql: &str,
    id: Uuid,
    tenant: &str,
    customer: &CustomerId,
    at: DateTime<Utc>,
    position: i64,
) -> Result<(), ProjectionError> {
    let params: &Params<'_> = &[
        (&id, Type::UUID),
        (&tenant, Type::TEXT),
        (&customer.as_str(), Type::TEXT),
        (&at, Type::TIMESTAMPTZ),
        (&position, Type::INT8),
    ];
    tx.write(sql, params).await?;
    Ok(())
}

/// An event of a file or task whose customer the tables know.
async fn touched(
    tx: &ApplyTx<'_>,
    sql: &str,
    id: Uuid,
    tenant: &str,
    at: DateTime<Utc>,
    position: i64,
) -> Result<(), ProjectionError> {
    let params: &Params<'_> = &[
        (&id, Type::UUID),
        (&tenant, Type::TEXT),
        (&at, Type::TIMESTAMPTZ),
        (&position, Type::INT8),
    ];
    tx.write(sql, params).await?;
    Ok(())
}

/// One customer of the list (CONTRACT.md `GET /v1/customers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(as = Customer)]
pub struct CustomerView {
    /// The customer's id.
    #[schema(value_type = String, example = "cust-42")]
    pub customer_id: CustomerId,
    /// Its files that are not deleted.
    pub files: u64,
    /// Its open tasks (every task, until tasks can be closed).
    pub open_tasks: u64,
    /// When the newest event that concerns it was recorded.
    pub last_activity_at: DateTime<Utc>,
}

impl CustomerView {
    /// The cursor that continues the list after this customer.
    pub fn cursor(&self) -> ActivityCursor {
        ActivityCursor::after(self.last_activity_at, self.customer_id.clone())
    }
}

/// One page of the customers list: `{"items": [Customer], "next_cursor": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(as = CustomerPage)]
pub struct CustomerPage {
    /// Most recently active first; ties by customer id (byte order).
    pub items: Vec<CustomerView>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Which customers, and which page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerFilter {
    /// Only customers whose id starts with this.
    pub prefix: Option<CustomerIdPrefix>,
    /// Page size, clamped to 1..=[`Paging::MAX_LIMIT`].
    pub limit: u32,
    /// Continue after this cursor (a previous page's `next_cursor`).
    pub cursor: Option<ActivityCursor>,
}

impl Default for CustomerFilter {
    /// Every customer, first page, 50 of them.
    fn default() -> Self {
        Self {
            prefix: None,
            limit: Paging::DEFAULT_LIMIT,
            cursor: None,
        }
    }
}

/// The list without a prefix: `customers_most_recently_active` gives the tenant's
/// rows in the list's order from the cursor on (`last_activity_at <= $2` bounds
/// the scan; the tie-break is checked on the rows at that time), so a page reads
/// about `limit` index entries whatever the number of customers.
const LIST: &str = "\
    SELECT customer_id, files, open_tasks, last_activity_at FROM customers \
    WHERE tenant = $1 \
      AND last_activity_at <= COALESCE($2::timestamptz, 'infinity'::timestamptz) \
      AND ($2::timestamptz IS NULL OR last_activity_at < $2::timestamptz \
           OR customer_id > $3::text) \
    ORDER BY last_activity_at DESC, customer_id \
    LIMIT $4";

/// The list of the customers whose id starts with `$5`: the ids from `$5` up to
/// `$6` (`$5` followed by a character above every customer id's characters) are
/// a range of the primary key, compared byte by byte (`COLLATE "C"`), and
/// `starts_with` keeps it exact. No pattern (`LIKE`) is ever built from the
/// prefix. Planned afresh for each prefix (not a cached statement): whether the
/// range (a rare prefix) or the activity index (a common one) is cheaper
/// depends on the prefix.
const LIST_PREFIXED: &str = "\
    SELECT customer_id, files, open_tasks, last_activity_at FROM customers \
    WHERE tenant = $1 \
      AND customer_id >= $5::text AND customer_id < $6::text \
      AND starts_with(customer_id, $5::text) \
      AND last_activity_at <= COALESCE($2::timestamptz, 'infinity'::timestamptz) \
      AND ($2::timestamptz IS NULL OR last_activity_at < $2::timestamptz \
           OR customer_id > $3::text) \
    ORDER BY last_activity_at DESC, customer_id \
    LIMIT $4";

/// One page of `tenant`'s customers, most recently active first, ties by customer
/// id; only those whose id starts with `filter.prefix`, if given.
pub async fn list(
    pool: &Pool,
    tenant: &TenantId,
    filter: &CustomerFilter,
) -> Result<CustomerPage, QueryError> {
    let limit = filter.limit.clamp(1, Paging::MAX_LIMIT);
    // One more than the page, to know whether there is a next page.
    let fetch = i64::from(limit) + 1;
    let cursor_at = filter.cursor.as_ref().map(|c| c.at);
    let cursor_id = filter.cursor.as_ref().map(|c| c.customer_id.as_str());
    let client = pool.get().await?;
    let rows = match &filter.prefix {
        None => {
            let statement = client.prepare_cached(LIST).await?;
            client
                .query(
                    &statement,
                    &[&tenant.as_str(), &cursor_at, &cursor_id, &fetch],
                )
                .await?
        }
        Some(prefix) => {
            // DEL (0x7F) is above every character a customer id may hold.
            let upper = format!("{}\u{7f}", prefix.as_str());
            client
                .query(
                    LIST_PREFIXED,
                    &[
                        &tenant.as_str(),
                        &cursor_at,
                        &cursor_id,
                        &fetch,
                        &prefix.as_str(),
                        &upper,
                    ],
                )
                .await?
        }
    };
    let mut items = rows
        .iter()
        .map(|row| {
            let raw: String = row.try_get(0)?;
            let count = |index: usize, column: &'static str| -> Result<u64, QueryError> {
                let n: i64 = row.try_get(index)?;
                u64::try_from(n).map_err(|_| QueryError::Corrupt {
                    column,
                    detail: format!("{n} is negative"),
                })
            };
            Ok(CustomerView {
                customer_id: CustomerId::parse(&raw).map_err(|e| QueryError::Corrupt {
                    column: "customer_id",
                    detail: e.to_string(),
                })?,
                files: count(1, "files")?,
                open_tasks: count(2, "open_tasks")?,
                last_activity_at: row.try_get(3)?,
            })
        })
        .collect::<Result<Vec<_>, QueryError>>()?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|last| last.cursor().encode())
    } else {
        None
    };
    Ok(CustomerPage { items, next_cursor })
}
