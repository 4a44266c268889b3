//! The bundles read model: one row per bundle in `bundles` (migration 0005), fed by
//! [`BundlesProjection`] from the `bundle` aggregate's events, read by
//! `GET /v1/bundles/{id}`, the bundle content endpoint and the zip worker's expiry.
//!
//! | event | effect |
//! |---|---|
//! | `BundleRequested` | inserts the row, `pending`, with its files in entry order |
//! | `BundleProgress` | `files_done` (never backwards, only while pending) |
//! | `BundleReady` | `ready`, the archive's key, size and SHA-256, `expires_at` |
//! | `BundleFailed` | `failed`, the reason, `expires_at` |
//! | `BundleExpired` | `expired` |
//!
//! Every update carries `last_position < event position` in its WHERE clause and
//! sets `last_position`, so an event applied twice changes nothing.

use chrono::{DateTime, Utc};
use dossier_domain::{BlobKey, BundleEvent, BundleFile, BundleStatus, Sha256Hex, TenantId};
use dossier_eventlog::db::Pool;
use dossier_eventlog::log::LoggedEvent;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::error::{ProjectionError, pg_detail};
use crate::projection::{ApplyTx, Projection, decode_event};

/// The aggregate type of bundles in the log: `<dossier_domain::Bundle as
/// cqrs_es::Aggregate>::TYPE`, spelled out because this crate does not depend on
/// cqrs-es.
pub const BUNDLE_AGGREGATE_TYPE: &str = "bundle";

/// The projection that keeps `bundles` in step with the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct BundlesProjection;

impl BundlesProjection {
    /// Its name in `checkpoints` and in metrics.
    pub const NAME: &'static str = "bundles";
}

type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

const INSERT_REQUESTED: &str = "\
    INSERT INTO bundles (id, tenant, requested_by, status, files, file_count, files_done, \
                         total_size, requested_at, last_position) \
    VALUES ($1, $2, $3, 'pending', $4, $5, 0, $6, $7, $8) \
    ON CONFLICT (id) DO NOTHING";

const UPDATE_PROGRESS: &str = "\
    UPDATE bundles SET files_done = GREATEST(files_done, LEAST($3, file_count)), last_position = $4 \
    WHERE id = $1 AND tenant = $2 AND status = 'pending' AND last_position < $4";

const UPDATE_READY: &str = "\
    UPDATE bundles SET status = 'ready', files_done = file_count, blob_key = $3, size = $4, \
                       sha256 = $5, finished_at = $6, expires_at = $7, last_position = $8 \
    WHERE id = $1 AND tenant = $2 AND last_position < $8";

const UPDATE_FAILED: &str = "\
    UPDATE bundles SET status = 'failed', error = $3, finished_at = $4, expires_at = $5, \
                       last_position = $6 \
    WHERE id = $1 AND tenant = $2 AND last_position < $6";

const UPDATE_EXPIRED: &str = "\
    UPDATE bundles SET status = 'expired', expires_at = LEAST(COALESCE(expires_at, $3), $3), \
                       last_position = $4 \
    WHERE id = $1 AND tenant = $2 AND last_position < $4";

impl Projection for BundlesProjection {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &["bundles"]
    }

    async fn apply(&self, tx: &ApplyTx<'_>, event: &LoggedEvent) -> Result<(), ProjectionError> {
        if event.aggregate_type != BUNDLE_AGGREGATE_TYPE {
            return Ok(());
        }
        let malformed = |reason: String| ProjectionError::Malformed {
            projection: Self::NAME,
            position: event.position,
            reason,
        };
        let (id, decoded): (Uuid, BundleEvent) = decode_event(Self::NAME, event)?;
        let tenant = event.tenant.as_str();
        let position = event.position;
        let bigint = |what: &str, value: u64| {
            i64::try_from(value)
                .map_err(|_| malformed(format!("{what} {value} does not fit a BIGINT")))
        };

        match decoded {
            BundleEvent::BundleRequested {
                requested_by,
                files,
                total_size,
                requested_at,
                tenant: _,
            } => {
                let file_count = i32::try_from(files.len())
                    .map_err(|_| malformed(format!("{} files do not fit", files.len())))?;
                let total_size = bigint("total_size", total_size)?;
                let files = serde_json::to_value(&files)
                    .map_err(|e| malformed(format!("files do not serialize: {e}")))?;
                let params: &Params<'_> = &[
                    (&id, Type::UUID),
                    (&tenant, Type::TEXT),
                    (&requested_by.as_str(), Type::TEXT),
                    (&files, Type::JSONB),
                    (&file_count, Type::INT4),
                    (&total_size, Type::INT8),
                    (&requested_at, Type::TIMESTAMPTZ),
                    (&position, Type::INT8),
                ];
                tx.write(INSERT_REQUESTED, params).await?;
            }
            BundleEvent::BundleProgress { files_done } => {
                let files_done = i32::try_from(files_done).unwrap_or(i32::MAX);
                let params: &Params<'_> = &[
                    (&id, Type::UUID),
                    (&tenant, Type::TEXT),
                    (&files_done, Type::INT4),
                    (&position, Type::INT8),
                ];
                tx.write(UPDATE_PROGRESS, params).await?;
            }
            BundleEvent::BundleReady {
                blob_key,
                size,
                sha256,
                ready_at,
                expires_at,
            } => {
                let size = bigint("size", size)?;
                let params: &Params<'_> = &[
                    (&id, Type::UUID),
                    (&tenant, Type::TEXT),
                    (&blob_key.as_str(), Type::TEXT),
                    (&size, Type::INT8),
                    (&sha256.as_str(), Type::TEXT),
                    (&ready_at, Type::TIMESTAMPTZ),
                    (&expires_at, Type::TIMESTAMPTZ),
                    (&position, Type::INT8),
                ];
                tx.write(UPDATE_READY, params).await?;
            }
            BundleEvent::BundleFailed {
                reason,
                failed_at,
                expires_at,
            } => {
                let params: &Params<'_> = &[
                    (&id, Type::UUID),
                    (&tenant, Type::TEXT),
                    (&reason.as_str(), Type::TEXT),
                    (&failed_at, Type::TIMESTAMPTZ),
                    (&expires_at, Type::TIMESTAMPTZ),
                    (&position, Type::INT8),
                ];
                tx.write(UPDATE_FAILED, params).await?;
            }
            BundleEvent::BundleExpired { expired_at, .. } => {
                let params: &Params<'_> = &[
                    (&id, Type::UUID),
                    (&tenant, Type::TEXT),
                    (&expired_at, Type::TIMESTAMPTZ),
                    (&position, Type::INT8),
                ];
                tx.write(UPDATE_EXPIRED, params).await?;
            }
        }
        Ok(())
    }
}

/// One bundle as the read model shows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleView {
    pub id: Uuid,
    pub tenant: TenantId,
    /// Who asked for it (the actor of its request).
    pub requested_by: String,
    pub status: BundleStatus,
    /// The files in entry order, as the request recorded them.
    pub files: Vec<BundleFile>,
    pub file_count: u32,
    pub files_done: u32,
    /// Sum of the files' sizes at the request.
    pub total_size: u64,
    pub requested_at: DateTime<Utc>,
    /// When it became ready or failed.
    pub finished_at: Option<DateTime<Utc>>,
    /// When it goes away (ready and failed bundles).
    pub expires_at: Option<DateTime<Utc>>,
    /// Where the archive is (ready bundles).
    pub blob_key: Option<BlobKey>,
    /// Size of the archive in bytes (ready bundles).
    pub size: Option<u64>,
    /// SHA-256 of the archive (ready bundles).
    pub sha256: Option<Sha256Hex>,
    /// Why there is no archive (failed bundles).
    pub error: Option<String>,
    /// Log position of the last event applied to this bundle.
    pub last_position: i64,
}

impl BundleView {
    /// Whether its time is up at `now` (the expiry sweep may not have run yet).
    pub fn has_expired(&self, now: DateTime<Utc>) -> bool {
        self.status == BundleStatus::Expired || self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Why a bundles query failed. "Not found" is `Ok(None)`, not an error.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No pooled Postgres connection could be had.
    #[error("no Postgres connection for the bundles read model: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The statement failed.
    #[error("bundles read model query failed: {}", pg_detail(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// A stored row does not read back; the read model needs a rebuild.
    #[error("the bundles read model holds an unreadable {column}: {detail}")]
    Corrupt {
        /// The column.
        column: &'static str,
        /// Why.
        detail: String,
    },
}

const COLUMNS: &str = "id, tenant, requested_by, status, files, file_count, files_done, \
     total_size, requested_at, finished_at, expires_at, blob_key, size, sha256, error, \
     last_position";

/// One bundle of `tenant`, in any state; `None` when unknown or another tenant's
/// (both look the same, rule 6).
pub async fn get(
    pool: &Pool,
    tenant: &TenantId,
    id: Uuid,
) -> Result<Option<BundleView>, QueryError> {
    let client = pool.get().await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM bundles WHERE id = $1 AND tenant = $2"
        ))
        .await?;
    let row = client
        .query_opt(&statement, &[&id, &tenant.as_str()])
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// Bundles of every tenant whose time is up at `now`: ready or failed ones past
/// their `expires_at`, and pending ones requested before `pending_before` (a job
/// that never finished). At most `limit`, oldest deadline first.
pub async fn due_for_expiry(
    pool: &Pool,
    now: DateTime<Utc>,
    pending_before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<BundleView>, QueryError> {
    let client = pool.get().await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM bundles \
             WHERE status <> 'expired' \
               AND (expires_at <= $1 OR (status = 'pending' AND requested_at <= $2)) \
             ORDER BY COALESCE(expires_at, requested_at), id LIMIT $3"
        ))
        .await?;
    let rows = client
        .query(&statement, &[&now, &pending_before, &limit])
        .await?;
    rows.iter().map(from_row).collect()
}

fn from_row(row: &Row) -> Result<BundleView, QueryError> {
    let corrupt = |column: &'static str, detail: String| QueryError::Corrupt { column, detail };
    let status: String = column(row, "status")?;
    let files: serde_json::Value = column(row, "files")?;
    let unsigned = |name: &'static str, value: i64| {
        u64::try_from(value).map_err(|_| corrupt(name, format!("{value} is negative")))
    };
    let count = |name: &'static str, value: i32| {
        u32::try_from(value).map_err(|_| corrupt(name, format!("{value} is negative")))
    };
    Ok(BundleView {
        id: column(row, "id")?,
        tenant: TenantId::parse(&column::<String>(row, "tenant")?)
            .map_err(|e| corrupt("tenant", e.to_string()))?,
        requested_by: column(row, "requested_by")?,
        status: BundleStatus::parse(&status)
            .ok_or_else(|| corrupt("status", format!("unknown status {status:?}")))?,
        files: serde_json::from_value(files).map_err(|e| corrupt("files", e.to_string()))?,
        file_count: count("file_count", column(row, "file_count")?)?,
        files_done: count("files_done", column(row, "files_done")?)?,
        total_size: unsigned("total_size", column(row, "total_size")?)?,
        requested_at: column(row, "requested_at")?,
        finished_at: column(row, "finished_at")?,
        expires_at: column(row, "expires_at")?,
        blob_key: column::<Option<String>>(row, "blob_key")?.map(BlobKey::from_recorded),
        size: column::<Option<i64>>(row, "size")?
            .map(|size| unsigned("size", size))
            .transpose()?,
        sha256: column::<Option<String>>(row, "sha256")?
            .map(|raw| Sha256Hex::parse(&raw).map_err(|e| corrupt("sha256", e.to_string())))
            .transpose()?,
        error: column(row, "error")?,
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
