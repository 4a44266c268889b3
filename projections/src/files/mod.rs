//! The files read model: one row per live file in `files` (migration 0002), fed by
//! [`FilesProjection`] from the `file` aggregate's events, read by the queries in
//! [`query`] (re-exported here).
//!
//! | event | effect |
//! |---|---|
//! | `FileUploaded` | inserts the row (unless a tombstone says the file was deleted) |
//! | `FileRenamed` | `name` |
//! | `FileVisibilityChanged` | `visibility` |
//! | `FileViewed` | `viewed_at`, first time only |
//! | `FileSigned` | `signed_at` |
//! | `FileDeleted` | deletes the row, leaves a tombstone |
//! | `BlobPurged` | nothing (the row is already gone) |
//!
//! Every row update carries `last_position < event position` in its WHERE clause and
//! sets `last_position`, so an event applied twice changes nothing; the tombstone
//! does the same for a file whose row is gone.
//!
//! The same rules, in memory and without IO, are [`fold`]: a rebuild fills the tables
//! aside with [`bulk::FilesBulkBuild`], which folds the events with it and writes the
//! rows with `COPY`, and `dossier replay --as-of` folds a customer's files with it. A
//! property test holds this SQL and the fold to the same rows.

pub mod bulk;
pub mod fold;
pub mod query;

use chrono::{DateTime, Utc};
use dossier_domain::FileEvent;
use dossier_eventlog::log::LoggedEvent;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

pub use crate::cursor::{Cursor, CursorError};
pub use query::{
    Audience, CustomerFile, FileFilter, FileView, Page, QueryError, by_tasks, get, get_many, list,
    of_customer,
};

use crate::error::ProjectionError;
use crate::projection::{ApplyTx, BulkBuild, Projection, decode_event};

/// The aggregate type of files in the log: `<dossier_domain::File as
/// cqrs_es::Aggregate>::TYPE`, spelled out because this crate does not depend on
/// cqrs-es. A test checks that uploads through the event store carry it.
pub const FILE_AGGREGATE_TYPE: &str = "file";

/// The projection that keeps `files` and `files_tombstones` in step with the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct FilesProjection;

impl FilesProjection {
    /// Its name in `checkpoints` and in metrics.
    pub const NAME: &'static str = "files";
}

/// One statement's parameters with their types, so each statement is one round trip
/// ([`ApplyTx::write`]: bind and execute of a statement prepared once per connection,
/// or parse, bind and execute together in a rebuild).
type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

const INSERT_UPLOADED: &str = "\
    INSERT INTO files (id, tenant, customer_id, name, file_name, content_type, size, sha256, \
                       created_at, visibility, origin, contract_id, task_id, blob_key, last_position) \
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15 \
    WHERE NOT EXISTS (SELECT 1 FROM files_tombstones WHERE id = $1) \
    ON CONFLICT (id) DO NOTHING";

const UPDATE_NAME: &str = "\
    UPDATE files SET name = $3, last_position = $4 \
    WHERE id = $1 AND tenant = $2 AND last_position < $4";

const UPDATE_VISIBILITY: &str = "\
    UPDATE files SET visibility = $3, last_position = $4 \
    WHERE id = $1 AND tenant = $2 AND last_position < $4";

// The aggregate records a view once; COALESCE keeps the first one all the same.
const UPDATE_VIEWED: &str = "\
    UPDATE files SET viewed_at = COALESCE(viewed_at, $3), last_position = $4 \
    WHERE id = $1 AND tenant = $2 AND last_position < $4";

const UPDATE_SIGNED: &str = "\
    UPDATE files SET signed_at = $3, last_position = $4 \
    WHERE id = $1 AND tenant = $2 AND last_position < $4";

const DELETE_FILE: &str = "\
    WITH removed AS ( \
        DELETE FROM files WHERE id = $1 AND tenant = $2 AND last_position < $3 \
    ) \
    INSERT INTO files_tombstones (id, tenant, last_position) VALUES ($1, $2, $3) \
    ON CONFLICT (id) DO NOTHING";

impl Projection for FilesProjection {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &["files", "files_tombstones"]
    }

    fn bulk_build(&self) -> Option<impl BulkBuild> {
        Some(bulk::FilesBulkBuild::default())
    }

    async fn apply(&self, tx: &ApplyTx<'_>, event: &LoggedEvent) -> Result<(), ProjectionError> {
        if event.aggregate_type != FILE_AGGREGATE_TYPE {
            return Ok(());
        }
        let malformed = |reason: String| ProjectionError::Malformed {
            projection: Self::NAME,
            position: event.position,
            reason,
        };
        let (id, decoded): (Uuid, FileEvent) = decode_event(Self::NAME, event)?;
        let tenant = event.tenant.as_str();
        let position = event.position;

        match decoded {
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
                // The log row's tenant is the one every query filters by; the
                // payload repeats it for the aggregate's sake.
                tenant: _,
            } => {
                let size = i64::try_from(size)
                    .map_err(|_| malformed(format!("size {size} does not fit a BIGINT")))?;
                let contract_id = contract_id.as_ref().map(|c| c.as_str());
                let params: &Params<'_> = &[
                    (&id, Type::UUID),
                    (&tenant, Type::TEXT),
                    (&customer_id.as_str(), Type::TEXT),
                    (&name.as_str(), Type::TEXT),
                    (&file_name.as_str(), Type::TEXT),
                    (&content_type.as_str(), Type::TEXT),
                    (&size, Type::INT8),
                    (&sha256.as_str(), Type::TEXT),
                    (&uploaded_at, Type::TIMESTAMPTZ),
                    (&visibility.as_str(), Type::TEXT),
                    (&origin.as_str(), Type::TEXT),
                    (&contract_id, Type::TEXT),
                    (&task_id, Type::UUID),
                    (&blob_key.as_str(), Type::TEXT),
                    (&position, Type::INT8),
                ];
                tx.write(INSERT_UPLOADED, params).await?;
            }
            FileEvent::FileRenamed { name, .. } => {
                update_text(tx, UPDATE_NAME, id, tenant, name.as_str(), position).await?;
            }
            FileEvent::FileVisibilityChanged { visibility, .. } => {
                update_text(
                    tx,
                    UPDATE_VISIBILITY,
                    id,
                    tenant,
                    visibility.as_str(),
                    position,
                )
                .await?;
            }
            FileEvent::FileViewed { viewed_at, .. } => {
                update_time(tx, UPDATE_VIEWED, id, tenant, viewed_at, position).await?;
            }
            FileEvent::FileSigned { signed_at } => {
                update_time(tx, UPDATE_SIGNED, id, tenant, signed_at, position).await?;
            }
            FileEvent::FileDeleted { .. } => {
                let params: &Params<'_> = &[
                    (&id, Type::UUID),
                    (&tenant, Type::TEXT),
                    (&position, Type::INT8),
                ];
                tx.write(DELETE_FILE, params).await?;
            }
            // The blob of a deleted file is gone: nothing the read model shows.
            FileEvent::BlobPurged { .. } => {}
        }
        Ok(())
    }
}

async fn update_text(
    tx: &ApplyTx<'_>,
    sql: &str,
    id: Uuid,
    tenant: &str,
    value: &str,
    position: i64,
) -> Result<(), ProjectionError> {
    let params: &Params<'_> = &[
        (&id, Type::UUID),
        (&tenant, Type::TEXT),
        (&value, Type::TEXT),
        (&position, Type::INT8),
    ];
    tx.write(sql, params).await?;
    Ok(())
}

async fn update_time(
    tx: &ApplyTx<'_>,
    sql: &str,
    id: Uuid,
    tenant: &str,
    value: DateTime<Utc>,
    position: i64,
) -> Result<(), ProjectionError> {
    let params: &Params<'_> = &[
        (&id, Type::UUID),
        (&tenant, Type::TEXT),
        (&value, Type::TIMESTAMPTZ),
        (&position, Type::INT8),
    ];
    tx.write(sql, params).await?;
    Ok(())
}
