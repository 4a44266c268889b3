//! The blob worker: a deleted file's bytes leave the blob store (CONTRACT.md rule
//! 7), blobs that no event refers to are swept away, and stored blobs can be
//! checked against their recorded SHA-256.
//!
//! # Purging deleted files
//!
//! The worker consumes `dossier.workers.blob` (`file.deleted` events). For each:
//!
//! 1. it parses the message as the contract's Event; a message that is not one is
//!    rejected and so dead-lettered (`dossier.workers.blob.dead`), never retried;
//! 2. it looks the event up **in the log** by its id and takes the tenant, file and
//!    blob key from there, not from the message: whoever can publish to
//!    `dossier.events` still cannot make it delete a blob the log does not name;
//! 3. it removes the blob, retrying with capped backoff until the store says done
//!    (an absent blob is done: removal is idempotent);
//! 4. it records `FileCommand::RecordBlobPurged` on the file through the
//!    application's command path (which retries lost optimistic-concurrency
//!    races under its one policy). The aggregate records `BlobPurged` once; a
//!    redelivered message records nothing;
//! 5. only then does it ack. A crash anywhere before is a redelivery that repeats
//!    the idempotent steps.
//!
//! Steps 2 to 4 are each tried at most [`BlobWorkerConfig::retry_attempts`]
//! times within one delivery (pausing as [`BlobWorkerConfig::retry`] says);
//! then the message goes back to the queue, and the broker's delivery limit
//! bounds the whole.
//!
//! # Orphans and lost purges
//!
//! An upload streams to the store before its command is recorded; if recording
//! fails, the blob stays with nothing pointing at it. And a `file.deleted`
//! message can be lost for good (dead-lettered after its delivery limit, or
//! dropped with a broker's disk): then the file is deleted in the log, has no
//! `BlobPurged`, and its bytes would stay for ever. [`sweep_orphans`] reconciles
//! both, for blobs older than a grace period (it asks the log, not a read model:
//! one that lags or is being rebuilt cannot make a live blob look orphaned):
//!
//! - a blob whose file has neither a row in the `files` read model nor any
//!   event in the log is removed;
//! - a blob whose file the log says is deleted (for longer than the grace
//!   period, so a purge in flight stays the blob worker's) goes through the
//!   blob worker's own purge path ([`PurgePath`]): the blob is removed and
//!   `BlobPurged` recorded through the application's command path, once.
//!
//! The sweep reads the store's listing as a stream, [`SWEEP_CHUNK`] keys at a
//! time: a store of any size is swept in bounded memory. It judges keys by
//! their whole shape: `{tenant}/{customer}/{file_id}` is a file (whatever the
//! customer id, `_bundles` included), `{tenant}/!bundles/…` and the older
//! `{tenant}/_bundles/{bundle_id}.zip` are bundle archives (the bundle
//! expiry's), and keys of any other shape are not the sweep's to judge. [`run`]
//! sweeps periodically.
//!
//! # Verifying
//!
//! [`verify_blobs`] re-hashes every live file's blob, streaming, and reports
//! mismatches, missing blobs and unreadable ones (`dossier blobs verify`).
//!
//! # Sealing blobs stored before encryption
//!
//! [`encrypt_blobs`] walks the same live files and seals, in place, each blob
//! stored before encryption ([`SealedBlobStore::seal_in_place`]; `dossier
//! blobs encrypt`). Run again, it finds nothing left to do.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dossier_application::{AppError, CommandContext, Commands};
use dossier_blobstore::{BlobError, BlobStore, SealedBlobStore, SealedInPlace};
use dossier_broker::{self, AmqpError, BLOB_QUEUE, Broker, ConsumerOptions, Incoming, Outcome};
use dossier_domain::{Actor, BlobKey, File, FileCommand, FileEvent, FilePolicy, TenantId};
use dossier_eventlog::db::Pool;
use dossier_eventlog::eventstore::PgEventStore;
use dossier_runtime::retry::Backoff;
use dossier_runtime::shutdown::{sleep_or_stop, stopped};
use futures::StreamExt as _;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::PgError;

/// The worker's label in logs and in `dossier_worker_failures_total`.
const WORKER: &str = "blob";

/// The actor recorded on `BlobPurged` events.
pub const ACTOR: &str = "blob-worker";

/// The aggregate type of files in the log (`<File as Aggregate>::TYPE`).
const FILE_AGGREGATE: &str = "file";

/// Default age below which the sweep leaves a blob alone: an upload in progress has
/// its blob stored before its event, and a slow one must not lose it.
pub const DEFAULT_SWEEP_GRACE: Duration = Duration::from_secs(60 * 60);

/// How many keys one sweep query checks at once, and so the most keys of the
/// store's listing the sweep holds.
pub const SWEEP_CHUNK: usize = 1000;

/// Tries of each step of a purge the sweep runs; the next sweep tries again.
const SWEEP_PURGE_ATTEMPTS: u32 = 3;
/// Files per page of [`verify_blobs`], and blobs hashed at once.
const VERIFY_PAGE: i64 = 500;
const VERIFY_CONCURRENCY: usize = 4;

/// How the blob worker runs.
#[derive(Debug, Clone)]
pub struct BlobWorkerConfig {
    /// Deliveries handled at once.
    pub prefetch: u16,
    /// Between retries of a blob removal or a Postgres failure.
    pub retry: Backoff,
    /// Tries of one step within one delivery, before the message goes back
    /// to the queue.
    pub retry_attempts: u32,
    /// How long handlers may finish at shutdown before their messages are requeued.
    pub drain_timeout: Duration,
    /// Pause before the first orphan sweep after start-up.
    pub first_sweep_after: Duration,
    /// Pause between orphan sweeps.
    pub sweep_interval: Duration,
    /// Blobs younger than this are never swept.
    pub sweep_grace: Duration,
}

impl Default for BlobWorkerConfig {
    fn default() -> Self {
        Self {
            prefetch: 8,
            retry: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(60),
            },
            retry_attempts: crate::DEFAULT_RETRY_ATTEMPTS,
            drain_timeout: Duration::from_secs(30),
            first_sweep_after: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(60 * 60),
            sweep_grace: DEFAULT_SWEEP_GRACE,
        }
    }
}

/// Why the blob worker, a sweep or a verification stopped.
#[derive(Debug, thiserror::Error)]
pub enum BlobWorkerError {
    /// The broker configuration is unusable (an invalid URL). Transient broker
    /// trouble is retried inside and never ends up here.
    #[error("the blob worker cannot use RabbitMQ: {0}")]
    Broker(#[source] AmqpError),
    /// The blob store could not be listed or read.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// Postgres failed.
    #[error(transparent)]
    Postgres(#[from] PgError),
}

/// Runs the blob worker until `shutdown` turns `true`: purges deleted files'
/// blobs from [`BLOB_QUEUE`] and sweeps orphans every `sweep_interval`.
#[tracing::instrument(name = "blob_worker", skip_all)]
pub async fn run(
    pool: Pool,
    broker: Broker,
    blobs: Arc<dyn BlobStore>,
    config: BlobWorkerConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), BlobWorkerError> {
    let purger = Arc::new(Purger::new(
        pool.clone(),
        Arc::clone(&blobs),
        crate::Retry {
            backoff: config.retry,
            attempts: config.retry_attempts,
        },
        shutdown.clone(),
    ));
    let options = ConsumerOptions {
        prefetch: config.prefetch,
        drain_timeout: config.drain_timeout,
    };
    let consuming = dossier_broker::consume_with(
        &broker,
        BLOB_QUEUE,
        options,
        move |incoming| {
            let purger = Arc::clone(&purger);
            async move { purger.handle(incoming).await }
        },
        shutdown.clone(),
    );
    let sweeping = sweep_periodically(pool, blobs, config, shutdown);
    tokio::pin!(consuming);
    // The sweep only ends at shutdown; the consumer may end earlier with a
    // permanent error, and then the worker stops (a sweep in progress is dropped:
    // each removal is idempotent and the next sweep picks up the rest).
    tokio::select! {
        consumed = &mut consuming => consumed.map_err(BlobWorkerError::Broker),
        () = sweeping => consuming.await.map_err(BlobWorkerError::Broker),
    }
}

/// Handles `file.deleted` deliveries.
struct Purger {
    pool: Pool,
    blobs: Arc<dyn BlobStore>,
    commands: Commands,
    retry: crate::Retry,
    shutdown: watch::Receiver<bool>,
}

/// What the log says about a deleted file.
#[derive(Debug)]
struct DeletedFile {
    event_id: Uuid,
    tenant: TenantId,
    file_id: String,
    blob_key: BlobKey,
}

impl Purger {
    fn new(
        pool: Pool,
        blobs: Arc<dyn BlobStore>,
        retry: crate::Retry,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            commands: worker_commands(&pool),
            pool,
            blobs,
            retry,
            shutdown,
        }
    }

    /// One delivery: see the module docs.
    async fn handle(&self, incoming: Incoming) -> Outcome {
        let event = match crate::delivered_event(
            WORKER,
            &incoming.body,
            FILE_AGGREGATE,
            FileEvent::DELETED,
        ) {
            Ok(event) => event,
            Err(outcome) => return outcome,
        };
        let span = tracing::info_span!(
            "purge",
            event_id = %event.id,
            tenant = %event.tenant,
            file_id = %event.aggregate_id,
        );
        let path = PurgePath {
            pool: &self.pool,
            blobs: self.blobs.as_ref(),
            commands: &self.commands,
            retry: self.retry,
            shutdown: &self.shutdown,
        };
        path.purge(event.id).instrument(span).await
    }
}

/// The command path of a worker: it answers nobody, so no read model to wait for.
fn worker_commands(pool: &Pool) -> Commands {
    Commands::new(
        PgEventStore::new(pool.clone()),
        FilePolicy::default(),
        vec![],
    )
}

/// The one way a deleted file's blob is purged, by the blob worker for a
/// `file.deleted` message and by the sweep for a deletion whose message was
/// lost: read the FileDeleted event from the log, remove the blob it names,
/// record `BlobPurged` through the command path (the aggregate records it once).
struct PurgePath<'a> {
    pool: &'a Pool,
    blobs: &'a dyn BlobStore,
    commands: &'a Commands,
    retry: crate::Retry,
    shutdown: &'a watch::Receiver<bool>,
}

impl PurgePath<'_> {
    /// Purges the file the FileDeleted event `event_id` deleted. `Ack` once the
    /// blob is gone and the purge recorded; `Retry` when a step kept failing;
    /// `Reject` when the log does not back the event or refuses the record.
    async fn purge(&self, event_id: Uuid) -> Outcome {
        let Some(found) = self
            .until_done("log", "reading the FileDeleted event from the log", || {
                lookup_deleted(self.pool, event_id)
            })
            .await
        else {
            return Outcome::Retry;
        };
        let deleted = match crate::backed_or_reject(WORKER, found) {
            Ok(deleted) => deleted,
            Err(outcome) => return outcome,
        };

        let removed = self
            .until_done("blob_delete", "removing the blob of a deleted file", || {
                self.blobs.delete(&deleted.blob_key)
            })
            .await;
        if removed.is_none() {
            return Outcome::Retry;
        }
        self.record_purged(&deleted).await
    }

    /// Records `RecordBlobPurged`; the aggregate makes it a no-op the second time.
    async fn record_purged(&self, deleted: &DeletedFile) -> Outcome {
        let ctx = CommandContext::new(deleted.tenant.clone(), Actor::new(ACTOR))
            .with_command_id(format!("blob-purge:{}", deleted.event_id))
            .with_correlation_id(deleted.event_id.to_string());
        let (ctx, commands) = (&ctx, self.commands);
        let recorded = self
            .until_done(
                "record",
                "recording the purge (the blob is already gone)",
                || async move {
                    let command = FileCommand::RecordBlobPurged {
                        tenant: deleted.tenant.clone(),
                    };
                    match commands
                        .execute::<File>(ctx, &deleted.file_id, command, FilePolicy::default())
                        .await
                    {
                        Ok(_) => Ok(Ok(())),
                        // Another try may well work: the log was unavailable, the
                        // outcome unknown (the record is idempotent), or the race
                        // was lost past the command path's policy.
                        Err(
                            error @ (AppError::Unavailable(_)
                            | AppError::OutcomeUnknown(_)
                            | AppError::Conflict),
                        ) => Err(error),
                        Err(error) => Ok(Err(error)),
                    }
                },
            )
            .await;
        match recorded {
            None => Outcome::Retry,
            Some(Ok(())) => {
                metrics::counter!("dossier_blob_purges_total").increment(1);
                tracing::info!(
                    file_id = %deleted.file_id,
                    tenant = %deleted.tenant,
                    "blob of a deleted file removed and recorded"
                );
                Outcome::Ack
            }
            Some(Err(AppError::Internal(detail))) => {
                crate::count_failure(WORKER, "undecodable");
                tracing::error!(
                    detail,
                    "the file's stored events cannot be read; dead-lettering the message for an operator"
                );
                Outcome::Reject
            }
            Some(Err(error)) => {
                crate::count_failure(WORKER, "refused");
                tracing::error!(
                    error = %error,
                    "the file refuses the purge record although the log says it was deleted; \
                     the blob is gone, dead-lettering the message for an operator"
                );
                Outcome::Reject
            }
        }
    }

    /// Runs `attempt` until it succeeds, a bounded number of times (see
    /// [`crate::retry_until_done`]).
    async fn until_done<T, E, F, Fut>(
        &self,
        reason: &'static str,
        doing: &'static str,
        attempt: F,
    ) -> Option<T>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        crate::retry_until_done(WORKER, reason, doing, self.retry, self.shutdown, attempt).await
    }
}

/// The FileDeleted event `event_id` as the log has it. The outer error is
/// transient (Postgres); the inner one says why the log does not back the message.
async fn lookup_deleted(
    pool: &Pool,
    event_id: Uuid,
) -> Result<Result<DeletedFile, String>, PgError> {
    let backed =
        match crate::backed_event::<FileEvent>(pool, event_id, FILE_AGGREGATE, FileEvent::DELETED)
            .await?
        {
            Ok(backed) => backed,
            Err(reason) => return Ok(Err(reason)),
        };
    let FileEvent::FileDeleted { blob_key, .. } = backed.event else {
        return Ok(Err(format!("event {event_id} decodes to another event")));
    };
    Ok(Ok(DeletedFile {
        event_id,
        tenant: backed.tenant,
        file_id: backed.aggregate_id,
        blob_key,
    }))
}

async fn sweep_periodically(
    pool: Pool,
    blobs: Arc<dyn BlobStore>,
    config: BlobWorkerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pause = config.first_sweep_after;
    loop {
        if sleep_or_stop(pause, &mut shutdown).await {
            return;
        }
        pause = config.sweep_interval;
        sweep_idempotency_keys(&pool).await;
        let sweep = tokio::select! {
            sweep = sweep_orphans(&pool, blobs.as_ref(), config.sweep_grace) => sweep,
            () = stopped(&mut shutdown) => return,
        };
        match sweep {
            Ok(report)
                if !report.removed.is_empty()
                    || !report.purged.is_empty()
                    || !report.failed.is_empty() =>
            {
                tracing::info!(
                    removed = report.removed.len(),
                    purged = report.purged.len(),
                    failed = report.failed.len(),
                    listed = report.listed,
                    "orphan sweep removed blobs no event refers to, and purged deleted files \
                     whose purge was lost"
                );
            }
            Ok(report) => tracing::debug!(
                listed = report.listed,
                "orphan sweep found nothing to remove"
            ),
            Err(error) => {
                crate::count_failure(WORKER, "sweep");
                tracing::warn!(error = %error, "orphan sweep failed; the next one tries again");
            }
        }
    }
}

/// The retention sweep of idempotency keys: HTTP keys past their expiry and
/// command receipts (HTTP and AMQP) older than the retention, so neither
/// table grows with traffic for ever (ADR 0016). Runs with the orphan sweep.
async fn sweep_idempotency_keys(pool: &Pool) {
    use dossier_eventlog::idempotency;
    match idempotency::sweep(pool, idempotency::RETENTION).await {
        Ok(swept) if swept.keys > 0 || swept.receipts > 0 => tracing::info!(
            keys = swept.keys,
            receipts = swept.receipts,
            "retention sweep deleted expired idempotency keys and command receipts"
        ),
        Ok(_) => {}
        Err(error) => {
            crate::count_failure(WORKER, "retention");
            tracing::warn!(%error, "retention sweep of idempotency keys failed; the next one tries again");
        }
    }
}

/// What one orphan sweep saw and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Blobs in the store.
    pub listed: usize,
    /// Keys of orphans removed.
    pub removed: Vec<String>,
    /// Files deleted in the log whose blob was still there (their purge was
    /// lost): purged through the blob worker's path, `BlobPurged` recorded.
    pub purged: Vec<Uuid>,
    /// Keys whose removal or purge failed (the reason is in the log); the next
    /// sweep retries.
    pub failed: Vec<String>,
    /// Blobs kept because a live file refers to them, or a file deleted too
    /// recently (its purge is the blob worker's).
    pub referenced: usize,
    /// Blobs kept because they are younger than the grace period (or the store
    /// does not say how old they are).
    pub fresh: usize,
    /// Bundle archives, left to the bundle expiry.
    pub bundles: usize,
    /// Keys that are not `{tenant}/{customer}/{file_id}`: not the sweep's to judge.
    pub unknown: usize,
}

/// What a key in the blob store is, by its whole shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    /// `{tenant}/{customer}/{file_id}`, whatever the customer id.
    File(Uuid),
    /// `{tenant}/!bundles/...`, or `{tenant}/_bundles/{bundle_id}.zip` as
    /// bundle archives were written before.
    Bundle,
    Unknown,
}

/// The exact text of a UUID as `BlobKey` writes it.
fn canonical_uuid(text: &str) -> Option<Uuid> {
    Uuid::parse_str(text)
        .ok()
        .filter(|id| id.to_string() == text)
}

fn classify(key: &str) -> KeyKind {
    let segments: Vec<&str> = key.split('/').collect();
    match segments.as_slice() {
        [tenant, folder, ..] if !tenant.is_empty() && *folder == BlobKey::BUNDLES_SEGMENT => {
            KeyKind::Bundle
        }
        // A file's key ends in a bare UUID, an archive's in `.zip`: a customer
        // called `_bundles` keeps its files.
        [tenant, folder, archive]
            if !tenant.is_empty()
                && *folder == BlobKey::LEGACY_BUNDLES_SEGMENT
                && archive
                    .strip_suffix(".zip")
                    .and_then(canonical_uuid)
                    .is_some() =>
        {
            KeyKind::Bundle
        }
        [tenant, customer, id] if !tenant.is_empty() && !customer.is_empty() => {
            // Only the exact form BlobKey::for_file writes; anything else is not ours.
            canonical_uuid(id).map_or(KeyKind::Unknown, KeyKind::File)
        }
        _ => KeyKind::Unknown,
    }
}

/// What the log says about the files of one chunk of keys.
const JUDGE_QUERY: &str = "\
    SELECT k.id, \
           EXISTS (SELECT 1 FROM files f WHERE f.id = k.id::uuid) \
             OR EXISTS (SELECT 1 FROM events e \
                        WHERE e.aggregate_type = 'file' AND e.aggregate_id = k.id) AS referenced, \
           d.id AS deletion, \
           d.recorded_at <= now() - make_interval(secs => $2) AS deletion_settled \
    FROM unnest($1::text[]) WITH ORDINALITY AS k(id, n) \
    LEFT JOIN LATERAL ( \
        SELECT e.id, e.recorded_at FROM events e \
        WHERE e.aggregate_type = 'file' AND e.aggregate_id = k.id \
          AND e.event_type = 'FileDeleted' \
        ORDER BY e.sequence LIMIT 1) d ON true \
    ORDER BY k.n";

/// Removes orphaned blobs older than `grace`, and purges the blobs of files
/// deleted (longer than `grace` ago) whose purge was lost (see the module docs).
/// The listing is read as a stream, [`SWEEP_CHUNK`] keys at a time.
#[tracing::instrument(skip_all, fields(store = %blobs.describe()))]
pub async fn sweep_orphans(
    pool: &Pool,
    blobs: &dyn BlobStore,
    grace: Duration,
) -> Result<SweepReport, BlobWorkerError> {
    // Never asked to stop: a sweep runs to its end (the periodic one is dropped
    // at shutdown), and the sender must live for the purge's retries to wait.
    let (_running, shutdown) = watch::channel(false);
    let commands = worker_commands(pool);
    let sweep = Sweep {
        pool,
        purge: PurgePath {
            pool,
            blobs,
            commands: &commands,
            retry: crate::Retry {
                backoff: BlobWorkerConfig::default().retry,
                attempts: SWEEP_PURGE_ATTEMPTS,
            },
            shutdown: &shutdown,
        },
        grace,
    };
    let now = SystemTime::now();
    let mut report = SweepReport::default();
    let mut chunk: Vec<(String, Uuid)> = Vec::with_capacity(SWEEP_CHUNK);
    let mut listing = blobs.list("");
    while let Some(blob) = listing.next().await {
        let blob = blob?;
        report.listed += 1;
        let file_id = match classify(&blob.key) {
            KeyKind::Bundle => {
                report.bundles += 1;
                continue;
            }
            KeyKind::Unknown => {
                report.unknown += 1;
                continue;
            }
            KeyKind::File(file_id) => file_id,
        };
        let old_enough = blob
            .last_modified
            .and_then(|modified| now.duration_since(modified).ok())
            .is_some_and(|age| age >= grace);
        if !old_enough {
            report.fresh += 1;
            continue;
        }
        chunk.push((blob.key, file_id));
        if chunk.len() == SWEEP_CHUNK {
            sweep.judge(&mut chunk, &mut report).await?;
        }
    }
    sweep.judge(&mut chunk, &mut report).await?;
    metrics::counter!("dossier_blob_orphans_removed_total").increment(report.removed.len() as u64);
    metrics::counter!("dossier_blob_lost_purges_total").increment(report.purged.len() as u64);
    Ok(report)
}

/// One sweep: how it asks the log and purges.
struct Sweep<'a> {
    pool: &'a Pool,
    purge: PurgePath<'a>,
    grace: Duration,
}

impl Sweep<'_> {
    /// Asks the log about the files of `chunk` and acts on each; empties it.
    async fn judge(
        &self,
        chunk: &mut Vec<(String, Uuid)>,
        report: &mut SweepReport,
    ) -> Result<(), BlobWorkerError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = chunk.iter().map(|(_, id)| id.to_string()).collect();
        let rows = {
            let client = self.pool.get().await.map_err(PgError::from)?;
            client
                .query(JUDGE_QUERY, &[&ids, &self.grace.as_secs_f64()])
                .await
                .map_err(PgError::from)?
        };
        if rows.len() != chunk.len() {
            return Err(BlobWorkerError::Postgres(PgError::Inconsistent(format!(
                "the sweep asked about {} files and got {} answers",
                chunk.len(),
                rows.len()
            ))));
        }
        for ((key, file_id), row) in chunk.drain(..).zip(rows) {
            let referenced: bool = row.try_get("referenced").map_err(PgError::from)?;
            let deletion: Option<Uuid> = row.try_get("deletion").map_err(PgError::from)?;
            let settled: Option<bool> = row.try_get("deletion_settled").map_err(PgError::from)?;
            let tenant = key.split('/').next().unwrap_or_default().to_owned();
            match (referenced, deletion, settled) {
                (false, _, _) => match self
                    .purge
                    .blobs
                    .delete(&BlobKey::from_recorded(key.clone()))
                    .await
                {
                    Ok(()) => {
                        tracing::info!(%tenant, %file_id, "removed an orphaned blob no event refers to");
                        report.removed.push(key);
                    }
                    Err(error) => {
                        tracing::warn!(%tenant, %file_id, error = %error, "could not remove an orphaned blob");
                        report.failed.push(key);
                    }
                },
                (true, Some(event_id), Some(true)) => {
                    let span = tracing::info_span!(
                        "lost_purge",
                        event_id = %event_id,
                        %tenant,
                        file_id = %file_id,
                    );
                    tracing::warn!(parent: &span, "a deleted file still has its blob (its purge was lost); purging it");
                    match self.purge.purge(event_id).instrument(span).await {
                        Outcome::Ack => report.purged.push(file_id),
                        Outcome::Retry | Outcome::Reject | Outcome::DeadLetter { .. } => {
                            report.failed.push(key)
                        }
                    }
                }
                _ => report.referenced += 1,
            }
        }
        Ok(())
    }
}

/// A live file whose blob does not match what the log recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlobProblem {
    /// The file.
    pub file_id: Uuid,
    /// Its tenant.
    pub tenant: String,
    /// Where its bytes should be.
    pub blob_key: String,
    /// The SHA-256 recorded at upload.
    pub expected_sha256: String,
    /// The size recorded at upload.
    pub expected_size: u64,
    /// The SHA-256 of what is stored, when it could be read.
    pub actual_sha256: Option<String>,
    /// The size of what is stored, when it could be read.
    pub actual_size: Option<u64>,
    /// Why it could not be read, for unreadable blobs.
    pub detail: Option<String>,
}

/// What [`verify_blobs`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Live files checked.
    pub checked: u64,
    /// Files whose blob has the recorded hash and size.
    pub ok: u64,
    /// Blobs whose hash or size differs from the record.
    pub mismatched: Vec<BlobProblem>,
    /// Files without a blob.
    pub missing: Vec<BlobProblem>,
    /// Blobs that could not be read (the store failed): unknown, check again.
    pub unreadable: Vec<BlobProblem>,
}

impl VerifyReport {
    /// Whether every blob matched.
    pub fn is_clean(&self) -> bool {
        self.mismatched.is_empty() && self.missing.is_empty() && self.unreadable.is_empty()
    }
}

/// One row of the `files` read model, as far as verification needs it.
struct LiveFile {
    id: Uuid,
    tenant: String,
    blob_key: String,
    sha256: String,
    size: i64,
}

/// Re-hashes every live file's blob (streaming, a few at a time) and compares it
/// with the recorded SHA-256 and size.
#[tracing::instrument(skip_all, fields(store = %blobs.describe()))]
pub async fn verify_blobs(
    pool: &Pool,
    blobs: &dyn BlobStore,
) -> Result<VerifyReport, BlobWorkerError> {
    let mut report = VerifyReport::default();
    let mut after = Uuid::nil();
    loop {
        let page = files_page(pool, after).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.id;
        let checks = futures::stream::iter(page)
            .map(|file| async move {
                let rehashed = rehash(blobs, &BlobKey::from_recorded(file.blob_key.clone())).await;
                (file, rehashed)
            })
            .buffer_unordered(VERIFY_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for (file, rehashed) in checks {
            report.checked += 1;
            let mut problem = BlobProblem {
                file_id: file.id,
                tenant: file.tenant,
                blob_key: file.blob_key,
                expected_sha256: file.sha256,
                expected_size: u64::try_from(file.size).unwrap_or_default(),
                actual_sha256: None,
                actual_size: None,
                detail: None,
            };
            match rehashed {
                Ok((sha256, size)) => {
                    if sha256 == problem.expected_sha256 && size == problem.expected_size {
                        report.ok += 1;
                        continue;
                    }
                    problem.actual_sha256 = Some(sha256);
                    problem.actual_size = Some(size);
                    tracing::warn!(file_id = %problem.file_id, tenant = %problem.tenant, "blob does not match its recorded SHA-256 or size");
                    report.mismatched.push(problem);
                }
                Err(BlobError::NotFound) => {
                    tracing::warn!(file_id = %problem.file_id, tenant = %problem.tenant, "a live file's blob is missing");
                    report.missing.push(problem);
                }
                Err(error) => {
                    problem.detail = Some(error.to_string());
                    report.unreadable.push(problem);
                }
            }
        }
    }
    Ok(report)
}

/// What [`encrypt_blobs`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EncryptReport {
    /// Live files looked at.
    pub checked: u64,
    /// Blobs stored before encryption, now sealed.
    pub sealed: u64,
    /// Blobs that were sealed already.
    pub already_sealed: u64,
    /// Files whose data key is destroyed (their bytes are gone).
    pub shredded: u64,
    /// Files without a blob.
    pub missing: Vec<Uuid>,
    /// Blobs that could not be sealed, and why: try again.
    pub failed: Vec<BlobProblem>,
}

impl EncryptReport {
    /// Whether every live file's blob is sealed now.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.failed.is_empty()
    }
}

/// Seals every live file's blob that was stored before encryption (a few at
/// a time), in place; see the module docs.
#[tracing::instrument(skip_all, fields(store = %blobs.describe()))]
pub async fn encrypt_blobs(
    pool: &Pool,
    blobs: &SealedBlobStore,
) -> Result<EncryptReport, BlobWorkerError> {
    let mut report = EncryptReport::default();
    let mut after = Uuid::nil();
    loop {
        let page = files_page(pool, after).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.id;
        let done = futures::stream::iter(page)
            .map(|file| async move {
                let key = BlobKey::from_recorded(file.blob_key.clone());
                let sealed = blobs.seal_in_place(&key).await;
                (file, sealed)
            })
            .buffer_unordered(VERIFY_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for (file, sealed) in done {
            report.checked += 1;
            match sealed {
                Ok(SealedInPlace::Sealed) => {
                    tracing::info!(file_id = %file.id, tenant = %file.tenant, "sealed a blob stored before encryption");
                    report.sealed += 1;
                }
                Ok(SealedInPlace::AlreadySealed) => report.already_sealed += 1,
                Ok(SealedInPlace::Shredded) => report.shredded += 1,
                Err(BlobError::NotFound) => report.missing.push(file.id),
                Err(error) => {
                    tracing::warn!(file_id = %file.id, tenant = %file.tenant, %error, "could not seal a blob; run the command again");
                    report.failed.push(BlobProblem {
                        file_id: file.id,
                        tenant: file.tenant,
                        blob_key: file.blob_key,
                        expected_sha256: file.sha256,
                        expected_size: u64::try_from(file.size).unwrap_or_default(),
                        actual_sha256: None,
                        actual_size: None,
                        detail: Some(error.to_string()),
                    });
                }
            }
        }
    }
    Ok(report)
}

async fn files_page(pool: &Pool, after: Uuid) -> Result<Vec<LiveFile>, PgError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT id, tenant, blob_key, sha256, size FROM files WHERE id > $1 ORDER BY id LIMIT $2",
            &[&after, &VERIFY_PAGE],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(LiveFile {
                id: row.try_get("id")?,
                tenant: row.try_get("tenant")?,
                blob_key: row.try_get("blob_key")?,
                sha256: row.try_get("sha256")?,
                size: row.try_get("size")?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(PgError::from)
}

/// SHA-256 (lower-case hex) and size of a stored blob, read as a stream.
async fn rehash(blobs: &dyn BlobStore, key: &BlobKey) -> Result<(String, u64), BlobError> {
    let object = blobs.get(key).await?;
    let mut body = object.body;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|error| BlobError::Backend(format!("reading blob {key}: {error}")))?;
        hasher.update(&chunk);
        size = size.saturating_add(chunk.len() as u64);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_classified_by_shape() {
        let id = Uuid::now_v7();
        assert_eq!(classify(&format!("acme/cust-1/{id}")), KeyKind::File(id));
        assert_eq!(
            classify(&format!("acme/_bundles/{id}.zip")),
            KeyKind::Bundle,
            "archives written before the bundles had their own folder"
        );
        assert_eq!(
            classify(BlobKey::for_bundle(&TenantId::parse("acme").unwrap(), id).as_str()),
            KeyKind::Bundle
        );
        assert_eq!(
            classify(&format!("acme/_bundles/{id}")),
            KeyKind::File(id),
            "a customer called _bundles has files like any other"
        );
        assert_eq!(classify("acme/cust-1/not-a-uuid"), KeyKind::Unknown);
        assert_eq!(
            classify(&format!("acme/cust-1/{}", id.simple())),
            KeyKind::Unknown
        );
        assert_eq!(classify(&format!("acme/{id}")), KeyKind::Unknown);
        assert_eq!(classify(&format!("a/b/c/{id}")), KeyKind::Unknown);
    }
}
