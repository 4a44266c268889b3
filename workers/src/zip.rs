//! The zip worker: builds the ZIP archive of a requested bundle, and removes
//! bundles whose time is up.
//!
//! # Building
//!
//! The worker consumes `dossier.workers.zip` (`bundle.requested` events). For each:
//!
//! 1. it parses the message as the contract's Event; a message that is not one is
//!    rejected and so dead-lettered (`dossier.workers.zip.dead`);
//! 2. it looks the event up **in the log** by its id and takes the tenant, bundle
//!    and files from there, not from the message;
//! 3. it loads the bundle from the log: one that is no longer pending (ready,
//!    failed or expired: a redelivery) is acked without doing anything;
//! 4. it reads the files as they are now from the files read model (tenant
//!    checked again). A file deleted since the request fails the bundle, naming the
//!    file: a bundle is complete or it is nothing;
//! 5. it streams the archive ([`archive::build_archive`]: bounded memory, ZIP64
//!    when needed, every entry's size and SHA-256 checked on the way) under
//!    `{tenant}/!bundles/{bundle}.zip` (`BlobKey::for_bundle`), recording `BundleProgress` at most every
//!    [`ZipWorkerConfig::progress_interval`];
//! 6. it records `BundleReady` (or `BundleFailed` when the files cannot make
//!    the archive), and only then acks. A failed bundle's `error` is a stable
//!    sentence for its requester ([`UNREADABLE_FILE`], [`NOT_BUILT`], or the
//!    ids of files deleted since the request); what went wrong inside goes to
//!    the service log, naming files and bundle by id only.
//!
//! A worker killed anywhere before the ack leaves the message unacknowledged: the
//! broker gives it to another worker, which starts over (the `put` of the killed
//! one never completed, so nothing half-written is under the key). A blob store
//! failure is retried: the message goes back to the queue after a backoff, and on
//! its last delivery before the dead-letter queue the bundle is recorded failed
//! instead, so no bundle stays pending for ever. On shutdown a build in progress
//! is abandoned and its message requeued.
//!
//! Entries are named like single downloads (`dossier_domain::naming`: display name
//! plus the original extension, nothing that could leave the archive), numbered
//! ` (2)`, ` (3)`… on collisions, dated with the upload time, and stored or
//! deflated by their content ([`EntryCompression`]).
//!
//! # Expiry
//!
//! Every [`ZipWorkerConfig::expiry_interval`], [`expire_due`] deletes the archives
//! of bundles past their `expires_at` (set to ready or failed time plus
//! `DOSSIER_BUNDLE_TTL_SECS` when they finish) and records `BundleExpired`; bundles
//! still pending long after that (a job that never finished) expire too. Deleting
//! is idempotent, so several workers may sweep at once.

pub mod archive;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cqrs_es::EventStore as _;
use cqrs_es::persist::PersistedEventStore;
use dossier_application::{AppError, CommandContext, Commands};
use dossier_blobstore::BlobStore;
use dossier_broker::{
    self, AmqpError, Broker, ConsumerOptions, DELIVERY_LIMIT, Incoming, Outcome, ZIP_QUEUE,
};
use dossier_domain::naming::{ZipEntryNames, download_name};
use dossier_domain::{
    Actor, BlobKey, Bundle, BundleArchive, BundleCommand, BundleEvent, BundleFile, BundlePolicy,
    BundleStatus, EntryCompression, FileId, FilePolicy, TenantId,
};
use dossier_eventlog::db::Pool;
use dossier_eventlog::eventstore::PgEventStore;
use dossier_projections::bundles;
use dossier_projections::files::{self, FileView};
use dossier_runtime::retry::Backoff;
use dossier_runtime::shutdown::{sleep_or_stop, stopped};
use lapin::types::AMQPValue;
use tokio::sync::watch;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::PgError;

/// The worker's label in logs and in `dossier_worker_failures_total`.
const WORKER: &str = "zip";
pub use archive::{ArchiveEntry, ArchiveError, BuiltArchive, build_archive};

/// The actor recorded on the events the zip worker writes.
pub const ACTOR: &str = "zip-worker";

/// The aggregate type of bundles in the log (`<Bundle as Aggregate>::TYPE`).
const BUNDLE_AGGREGATE: &str = "bundle";

/// Bundles expired per sweep query.
const EXPIRY_BATCH: i64 = 200;

/// A pending bundle (a job that never finished) expires this long after its
/// request at the earliest, even with a shorter TTL: a slow queue must not lose it.
const PENDING_GRACE: Duration = Duration::from_secs(24 * 60 * 60);

/// How the zip worker runs.
#[derive(Debug, Clone)]
pub struct ZipWorkerConfig {
    /// Bundles built at once by this process. Each needs one blocking thread and a
    /// few MiB of memory, whatever its size. More than one tenant may have
    /// pending ([`Self::with_pending_bound`]), so that one tenant's bundles,
    /// however large, never take every slot.
    pub prefetch: u16,
    /// Between retries of a blob store or Postgres failure.
    pub retry: Backoff,
    /// Tries of one step within one delivery, before the message goes back
    /// to the queue.
    pub retry_attempts: u32,
    /// How long a build may finish at shutdown before its message is requeued.
    pub drain_timeout: Duration,
    /// How long a ready or failed bundle is kept (`DOSSIER_BUNDLE_TTL_SECS`).
    pub bundle_ttl: Duration,
    /// Least time between two `BundleProgress` events of one bundle.
    pub progress_interval: Duration,
    /// Pause before the first expiry sweep, and between sweeps.
    pub expiry_interval: Duration,
}

impl ZipWorkerConfig {
    /// The defaults, with bundles kept for `bundle_ttl`; the expiry sweep runs
    /// every quarter of it, between once a second and once a minute.
    pub fn with_ttl(bundle_ttl: Duration) -> Self {
        Self {
            prefetch: 2,
            retry: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(60),
            },
            retry_attempts: crate::DEFAULT_RETRY_ATTEMPTS,
            drain_timeout: Duration::from_secs(30),
            bundle_ttl,
            progress_interval: Duration::from_secs(1),
            expiry_interval: (bundle_ttl / 4)
                .clamp(Duration::from_secs(1), Duration::from_secs(60)),
        }
    }
}

impl ZipWorkerConfig {
    /// Builds one bundle more at once than a tenant may have pending
    /// (`DOSSIER_MAX_PENDING_BUNDLES_PER_TENANT`), and at least the default.
    pub fn with_pending_bound(mut self, max_pending_per_tenant: u32) -> Self {
        let above = u16::try_from(max_pending_per_tenant.saturating_add(1)).unwrap_or(u16::MAX);
        self.prefetch = self.prefetch.max(above);
        self
    }
}

impl Default for ZipWorkerConfig {
    fn default() -> Self {
        Self::with_ttl(Duration::from_secs(
            dossier_runtime::config::DEFAULT_BUNDLE_TTL_SECS,
        ))
    }
}

/// Why the zip worker, or an expiry sweep, stopped.
#[derive(Debug, thiserror::Error)]
pub enum ZipWorkerError {
    /// The broker configuration is unusable (an invalid URL). Transient broker
    /// trouble is retried inside and never ends up here.
    #[error("the zip worker cannot use RabbitMQ: {0}")]
    Broker(#[source] AmqpError),
    /// The bundles read model could not be read.
    #[error(transparent)]
    ReadModel(#[from] bundles::QueryError),
}

/// Runs the zip worker until `shutdown` turns `true`: builds bundles from
/// [`ZIP_QUEUE`] and expires old ones every `expiry_interval`.
#[tracing::instrument(name = "zip_worker", skip_all)]
pub async fn run(
    pool: Pool,
    broker: Broker,
    blobs: Arc<dyn BlobStore>,
    config: ZipWorkerConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ZipWorkerError> {
    let zipper = Arc::new(Zipper::new(
        pool.clone(),
        Arc::clone(&blobs),
        config.clone(),
        shutdown.clone(),
    ));
    let options = ConsumerOptions {
        prefetch: config.prefetch,
        drain_timeout: config.drain_timeout,
    };
    let building = Arc::clone(&zipper);
    let consuming = dossier_broker::consume_with(
        &broker,
        ZIP_QUEUE,
        options,
        move |incoming| {
            let zipper = Arc::clone(&building);
            async move { zipper.handle(incoming).await }
        },
        shutdown.clone(),
    );
    let expiring = expire_periodically(zipper, config, shutdown);
    tokio::pin!(consuming);
    tokio::select! {
        consumed = &mut consuming => consumed.map_err(ZipWorkerError::Broker),
        () = expiring => consuming.await.map_err(ZipWorkerError::Broker),
    }
}

/// Handles `bundle.requested` deliveries and expires bundles.
struct Zipper {
    pool: Pool,
    blobs: Arc<dyn BlobStore>,
    /// The worker answers nobody: no read model to wait for.
    commands: Commands,
    store: PersistedEventStore<PgEventStore, Bundle>,
    config: ZipWorkerConfig,
    shutdown: watch::Receiver<bool>,
}

/// What the log says about a bundle request.
#[derive(Debug, Clone)]
struct Requested {
    event_id: Uuid,
    tenant: TenantId,
    bundle_id: Uuid,
    files: Vec<BundleFile>,
}

/// How recording a command ended.
enum Recorded {
    Done,
    /// The bundle refused it (it finished otherwise meanwhile).
    Refused(AppError),
    /// Shutdown came first, or every try failed; it may or may not have been
    /// recorded: the message goes back to the queue.
    NotYet,
}

/// Why a bundle failed: what its requester reads, and what the service log gets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    /// Recorded in `BundleFailed` and shown as the bundle's `error`: a stable
    /// sentence with ids at most, never a store's or a database's text.
    public: String,
    /// For the operator: which entry, what the store said (ids only).
    detail: String,
}

/// The `error` of a bundle a file of which could not be read.
pub const UNREADABLE_FILE: &str = "a file of the bundle could not be read; ask again";
/// The `error` of a bundle that could not be built for another reason.
pub const NOT_BUILT: &str = "the bundle could not be built; ask again";

impl Failure {
    fn new(public: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            public: public.into(),
            detail: detail.into(),
        }
    }

    /// Why `error` ended a build, said once for every archive error.
    fn of_archive(error: ArchiveError) -> Result<Self, String> {
        match error {
            ArchiveError::Content(detail) => Ok(Self::new(UNREADABLE_FILE, detail)),
            error @ ArchiveError::TooLarge { .. } => {
                Ok(Self::new(error.to_string(), error.to_string()))
            }
            ArchiveError::Internal(detail) => Ok(Self::new(NOT_BUILT, detail)),
            ArchiveError::Store(detail) => Err(detail),
        }
    }
}

/// Why a build did not produce an archive.
enum BuildEnd {
    /// The bundle cannot be built; record it failed.
    Failed(Failure),
    /// Try again later (blob store or Postgres trouble).
    Transient(String),
    /// Shutdown: hand the message back.
    Stopped,
}

impl Zipper {
    fn new(
        pool: Pool,
        blobs: Arc<dyn BlobStore>,
        config: ZipWorkerConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let store = PgEventStore::new(pool.clone());
        Self {
            commands: Commands::new(store.clone(), FilePolicy::default(), vec![]),
            store: PersistedEventStore::new_event_store(store),
            pool,
            blobs,
            config,
            shutdown,
        }
    }

    /// One delivery: see the module docs.
    async fn handle(&self, incoming: Incoming) -> Outcome {
        let event = match crate::delivered_event(
            WORKER,
            &incoming.body,
            BUNDLE_AGGREGATE,
            BundleEvent::REQUESTED,
        ) {
            Ok(event) => event,
            Err(outcome) => return outcome,
        };
        let span = tracing::info_span!(
            "bundle",
            event_id = %event.id,
            tenant = %event.tenant,
            bundle_id = %event.aggregate_id,
        );
        self.build(event.id, delivery_count(&incoming))
            .instrument(span)
            .await
    }

    async fn build(&self, event_id: Uuid, deliveries: u32) -> Outcome {
        let Some(found) = self
            .until_done(
                "log",
                "reading the BundleRequested event from the log",
                || lookup_request(&self.pool, event_id),
            )
            .await
        else {
            return Outcome::Retry;
        };
        let request = match crate::backed_or_reject(WORKER, found) {
            Ok(request) => request,
            Err(outcome) => return outcome,
        };
        let bundle_id = request.bundle_id.to_string();
        let Some(context) = self
            .until_done("log", "loading the bundle from the log", || {
                self.store.load_aggregate(&bundle_id)
            })
            .await
        else {
            return Outcome::Retry;
        };
        let status = context.aggregate.record().map(|record| record.status);
        if status != Some(BundleStatus::Pending) {
            tracing::info!(
                status = status.map(BundleStatus::as_str),
                "the bundle is no longer pending (a redelivery); nothing to do"
            );
            return Outcome::Ack;
        }

        let started = Instant::now();
        let mut stopping = self.shutdown.clone();
        let built = tokio::select! {
            built = self.make_archive(&request) => built,
            () = stopped(&mut stopping) => Err(BuildEnd::Stopped),
        };
        match built {
            Ok(archive) => self.finish_ready(&request, archive, started).await,
            Err(BuildEnd::Failed(failure)) => self.finish_failed(&request, failure).await,
            Err(BuildEnd::Stopped) => {
                tracing::info!(
                    "shutting down in the middle of a bundle; it goes back to the queue"
                );
                Outcome::Retry
            }
            Err(BuildEnd::Transient(reason)) => {
                failure("transient");
                if deliveries.saturating_add(1) >= DELIVERY_LIMIT.unsigned_abs() {
                    let detail = format!(
                        "the archive could not be built after {} attempts: {reason}",
                        deliveries.saturating_add(1)
                    );
                    return self
                        .finish_failed(&request, Failure::new(NOT_BUILT, detail))
                        .await;
                }
                let delay = self.config.retry.delay(deliveries);
                tracing::warn!(
                    error = %reason,
                    attempt = deliveries + 1,
                    retry_in_ms = delay.as_millis() as u64,
                    "building a bundle failed; it goes back to the queue"
                );
                let _ = sleep_or_stop(delay, &mut self.shutdown.clone()).await;
                Outcome::Retry
            }
        }
    }

    /// Reads the files as they are now, then streams the archive while
    /// recording progress.
    async fn make_archive(&self, request: &Requested) -> Result<BuiltArchive, BuildEnd> {
        let ids: Vec<FileId> = request.files.iter().map(|f| f.file_id).collect();
        let live = files::get_many(&self.pool, &request.tenant, &ids)
            .await
            .map_err(|e| BuildEnd::Transient(e.to_string()))?;
        if live.len() != ids.len() {
            let gone: Vec<String> = ids
                .iter()
                .filter(|id| !live.iter().any(|file| file.id == **id))
                .map(ToString::to_string)
                .collect();
            // Ids only: for the requester as for the log.
            let reason = format!(
                "{} deleted after the bundle was requested: {}",
                if gone.len() == 1 {
                    "a file was"
                } else {
                    "files were"
                },
                gone.join(", ")
            );
            return Err(BuildEnd::Failed(Failure::new(reason.clone(), reason)));
        }
        let entries = plan_entries(&live);
        let key = BlobKey::for_bundle(&request.tenant, request.bundle_id);
        let (progress, mut watching) = watch::channel(0u32);
        let building = build_archive(Arc::clone(&self.blobs), &key, entries, progress);
        let reporting = async {
            let mut last = Instant::now();
            let mut recorded = 0;
            while watching.changed().await.is_ok() {
                let done = *watching.borrow_and_update();
                if done > recorded && last.elapsed() >= self.config.progress_interval {
                    self.record_progress(request, done).await;
                    recorded = done;
                    last = Instant::now();
                }
            }
        };
        let (built, ()) = tokio::join!(building, reporting);
        built.map_err(|error| match Failure::of_archive(error) {
            Ok(failure) => BuildEnd::Failed(failure),
            Err(transient) => BuildEnd::Transient(transient),
        })
    }

    /// Progress is for people watching: a failure to record it is only logged.
    async fn record_progress(&self, request: &Requested, files_done: u32) {
        let command = BundleCommand::RecordProgress {
            tenant: request.tenant.clone(),
            files_done,
        };
        let ctx = context(&request.tenant, Some(request.event_id), "progress");
        if let Err(error) = self.execute(&ctx, request.bundle_id, command).await {
            tracing::debug!(error = %error, files_done, "could not record progress; going on");
        }
    }

    /// Runs a command on a bundle through the application's command path.
    async fn execute(
        &self,
        ctx: &CommandContext,
        bundle_id: Uuid,
        command: BundleCommand,
    ) -> Result<(), AppError> {
        // Policy limits only matter for requests, which the worker never makes.
        self.commands
            .execute::<Bundle>(
                ctx,
                &bundle_id.to_string(),
                command,
                BundlePolicy::default(),
            )
            .await
            .map(drop)
    }

    async fn finish_ready(
        &self,
        request: &Requested,
        archive: BuiltArchive,
        started: Instant,
    ) -> Outcome {
        let key = BlobKey::for_bundle(&request.tenant, request.bundle_id);
        let now = Utc::now();
        let command = BundleCommand::MarkReady {
            tenant: request.tenant.clone(),
            archive: BundleArchive {
                blob_key: key.clone(),
                size: archive.size,
                sha256: archive.sha256,
            },
            at: now,
            expires_at: now + self.ttl(),
        };
        match self
            .record(
                request,
                command,
                context(&request.tenant, Some(request.event_id), "ready"),
            )
            .await
        {
            Recorded::Done => {
                metrics::counter!("dossier_bundles_built_total").increment(1);
                metrics::histogram!("dossier_bundle_build_seconds")
                    .record(started.elapsed().as_secs_f64());
                tracing::info!(
                    files = request.files.len(),
                    size = archive.size,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "bundle ready"
                );
                Outcome::Ack
            }
            Recorded::Refused(error) => {
                // Expired (or failed by someone else) while we built: the archive
                // must not outlive that.
                tracing::info!(error = %error, "the bundle finished otherwise while it was built; removing the archive");
                match self.blobs.delete(&key).await {
                    Ok(()) => Outcome::Ack,
                    Err(error) => {
                        tracing::warn!(error = %error, "could not remove the archive; the expiry sweep will");
                        Outcome::Ack
                    }
                }
            }
            Recorded::NotYet => Outcome::Retry,
        }
    }

    async fn finish_failed(&self, request: &Requested, failure: Failure) -> Outcome {
        let now = Utc::now();
        // The span names the tenant and bundle; the detail names entries by id.
        tracing::warn!(detail = %failure.detail, error = %failure.public, "bundle failed");
        let command = BundleCommand::MarkFailed {
            tenant: request.tenant.clone(),
            reason: failure.public,
            at: now,
            expires_at: now + self.ttl(),
        };
        match self
            .record(
                request,
                command,
                context(&request.tenant, Some(request.event_id), "failed"),
            )
            .await
        {
            Recorded::Done => {
                metrics::counter!("dossier_bundles_failed_total").increment(1);
                Outcome::Ack
            }
            Recorded::Refused(error) => {
                tracing::info!(error = %error, "the bundle finished otherwise; nothing to record");
                Outcome::Ack
            }
            Recorded::NotYet => Outcome::Retry,
        }
    }

    fn ttl(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.config.bundle_ttl).unwrap_or(chrono::Duration::MAX)
    }

    /// Records `command`, retrying Postgres failures a bounded number of times
    /// (the command path retries lost races itself); a refusal by the
    /// aggregate is an answer, not a failure.
    async fn record(
        &self,
        request: &Requested,
        command: BundleCommand,
        ctx: CommandContext,
    ) -> Recorded {
        let ctx = &ctx;
        let command = &command;
        let outcome = self
            .until_done("record", "recording the bundle's outcome", || async move {
                match self.execute(ctx, request.bundle_id, command.clone()).await {
                    Ok(()) => Ok(Ok(())),
                    Err(error) if error.is_transient() || matches!(error, AppError::Conflict) => {
                        Err(error)
                    }
                    Err(refused) => Ok(Err(refused)),
                }
            })
            .await;
        match outcome {
            Some(Ok(())) => Recorded::Done,
            Some(Err(refused)) => Recorded::Refused(refused),
            None => Recorded::NotYet,
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
        crate::retry_until_done(
            WORKER,
            reason,
            doing,
            crate::Retry {
                backoff: self.config.retry,
                attempts: self.config.retry_attempts,
            },
            &self.shutdown,
            attempt,
        )
        .await
    }
}

fn failure(reason: &'static str) {
    crate::count_failure(WORKER, reason);
}

/// Who the worker's commands come from; `request` (the BundleRequested event's
/// id) ties them to the request they answer.
fn context(tenant: &TenantId, request: Option<Uuid>, step: &str) -> CommandContext {
    let ctx = CommandContext::new(tenant.clone(), Actor::new(ACTOR))
        .with_command_id(format!("zip-{step}:{}", Uuid::now_v7()));
    match request {
        Some(request) => ctx.with_correlation_id(request.to_string()),
        None => ctx,
    }
}

/// How often the broker delivered this message before (quorum queues count it in
/// `x-delivery-count`; 0 on the first delivery).
fn delivery_count(incoming: &Incoming) -> u32 {
    let Some(headers) = incoming.properties.headers().as_ref() else {
        return 0;
    };
    let count = match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortShortInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortShortUInt(n)) => i64::from(*n),
        _ => 0,
    };
    u32::try_from(count.max(0)).unwrap_or(u32::MAX)
}

/// The archive's entries for `files` (live, in bundle order): named like single
/// downloads, collisions numbered, dated with the upload time, stored or deflated
/// by content, checked against the recorded size and SHA-256.
pub fn plan_entries(files: &[FileView]) -> Vec<ArchiveEntry> {
    let mut names = ZipEntryNames::new();
    files
        .iter()
        .map(|file| {
            let name = names.claim(&download_name(&file.name, &file.file_name));
            ArchiveEntry {
                // Ids only: the label ends up in the service log.
                label: format!("file {}", file.id),
                name,
                blob_key: file.blob_key.clone(),
                size: file.size,
                sha256: Some(file.sha256.clone()),
                modified: file.created_at,
                compression: EntryCompression::for_file(&file.content_type, &file.file_name),
            }
        })
        .collect()
}

/// The BundleRequested event `event_id` as the log has it. The outer error is
/// transient (Postgres); the inner one says why the log does not back the message.
async fn lookup_request(pool: &Pool, event_id: Uuid) -> Result<Result<Requested, String>, PgError> {
    let backed = match crate::backed_event::<BundleEvent>(
        pool,
        event_id,
        BUNDLE_AGGREGATE,
        BundleEvent::REQUESTED,
    )
    .await?
    {
        Ok(backed) => backed,
        Err(reason) => return Ok(Err(reason)),
    };
    let BundleEvent::BundleRequested { files, .. } = backed.event else {
        return Ok(Err(format!("event {event_id} decodes to another event")));
    };
    let (tenant, aggregate_id) = (backed.tenant, backed.aggregate_id);
    let Ok(bundle_id) = Uuid::parse_str(&aggregate_id) else {
        return Ok(Err(format!("bundle id {aggregate_id:?} is not a UUID")));
    };
    Ok(Ok(Requested {
        event_id,
        tenant,
        bundle_id,
        files,
    }))
}

async fn expire_periodically(
    zipper: Arc<Zipper>,
    config: ZipWorkerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if sleep_or_stop(config.expiry_interval, &mut shutdown).await {
            return;
        }
        let swept = tokio::select! {
            swept = zipper.expire_due(Utc::now()) => swept,
            () = stopped(&mut shutdown) => return,
        };
        match swept {
            Ok(report) if report.expired > 0 || report.failed > 0 => tracing::info!(
                expired = report.expired,
                failed = report.failed,
                "expired bundles whose time was up"
            ),
            Ok(_) => {}
            Err(error) => {
                failure("expiry");
                tracing::warn!(error = %error, "the bundle expiry sweep failed; the next one tries again");
            }
        }
    }
}

/// What one expiry sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpiryReport {
    /// Bundles whose archive is gone and whose expiry is recorded.
    pub expired: usize,
    /// Bundles that could not be expired this time (the reason is in the log).
    pub failed: usize,
}

/// Expires every bundle whose time is up at `now` (see the module docs): deletes
/// its archive, then records `BundleExpired`. For the periodic sweep and for tests.
pub async fn expire_due(
    pool: &Pool,
    blobs: Arc<dyn BlobStore>,
    bundle_ttl: Duration,
    now: DateTime<Utc>,
) -> Result<ExpiryReport, ZipWorkerError> {
    let (_, shutdown) = watch::channel(false);
    let config = ZipWorkerConfig::with_ttl(bundle_ttl);
    Zipper::new(pool.clone(), blobs, config, shutdown)
        .expire_due(now)
        .await
}

impl Zipper {
    async fn expire_due(&self, now: DateTime<Utc>) -> Result<ExpiryReport, ZipWorkerError> {
        let pending_grace = self.config.bundle_ttl.max(PENDING_GRACE);
        let pending_before =
            now - chrono::Duration::from_std(pending_grace).unwrap_or(chrono::Duration::MAX);
        let mut report = ExpiryReport::default();
        loop {
            let due =
                bundles::due_for_expiry(&self.pool, now, pending_before, EXPIRY_BATCH).await?;
            let batch = due.len();
            let mut progressed = false;
            for bundle in due {
                if self.expire_one(&bundle, now).await {
                    report.expired += 1;
                    progressed = true;
                } else {
                    report.failed += 1;
                }
            }
            // A short batch was the last; a batch with no success would only
            // come back the same (the next sweep tries again).
            if batch < EXPIRY_BATCH as usize || !progressed {
                return Ok(report);
            }
            // The read model shows the expiries once projected; wait for that
            // rather than reading the same rows again.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn expire_one(&self, bundle: &bundles::BundleView, now: DateTime<Utc>) -> bool {
        // The recorded archive; without one, wherever a build that was never
        // recorded may have left one (under today's key or the older one).
        let keys = match &bundle.blob_key {
            Some(key) => vec![key.clone()],
            None => vec![
                BlobKey::for_bundle(&bundle.tenant, bundle.id),
                BlobKey::legacy_bundle(&bundle.tenant, bundle.id),
            ],
        };
        // The archive first: a recorded expiry with the archive still there would
        // never be looked at again.
        for key in &keys {
            if let Err(error) = self.blobs.delete(key).await {
                tracing::warn!(bundle_id = %bundle.id, error = %error, "could not remove an expired bundle's archive");
                return false;
            }
        }
        let command = BundleCommand::Expire {
            tenant: bundle.tenant.clone(),
            at: now,
        };
        let ctx = context(&bundle.tenant, None, "expire");
        match self.execute(&ctx, bundle.id, command).await {
            Ok(()) => {
                tracing::info!(bundle_id = %bundle.id, tenant = %bundle.tenant, "bundle expired; its archive is removed");
                true
            }
            // The next sweep tries again.
            Err(error) => {
                tracing::warn!(bundle_id = %bundle.id, error = %error, "could not record a bundle's expiry");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dossier_domain::{
        ContentType, CustomerId, DisplayName, FileName, Origin, Sha256Hex, Visibility,
    };

    fn view(name: &str, file_name: &str, content_type: &str) -> FileView {
        FileView {
            id: FileId::new(),
            customer_id: CustomerId::parse("cust-1").unwrap(),
            name: DisplayName::parse(name).unwrap(),
            file_name: FileName::parse(file_name).unwrap(),
            content_type: ContentType::parse(Some(content_type)).unwrap(),
            size: 3,
            sha256: Sha256Hex::parse(&"0".repeat(64)).unwrap(),
            created_at: Utc::now(),
            visibility: Visibility::Internal,
            origin: Origin::StaffUpload,
            viewed_at: None,
            signed_at: None,
            contract_id: None,
            task_id: None,
            protected: false,
            blob_key: BlobKey::from_recorded("acme/cust-1/x"),
            last_position: 1,
        }
    }

    #[test]
    fn entries_are_named_like_downloads_numbered_on_collision_and_compressed_by_content() {
        let entries = plan_entries(&[
            view("Invoice", "a.pdf", "application/pdf"),
            view("invoice", "b.PDF", "application/pdf"),
            view("../../etc/passwd", "notes.txt", "text/plain"),
        ]);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["Invoice.pdf", "invoice (2).PDF", "_.._etc_passwd.txt"]
        );
        assert_eq!(entries[0].compression, EntryCompression::Stored);
        assert_eq!(entries[2].compression, EntryCompression::Deflated);
        // Labels end up in the service log: ids, never display names.
        assert!(entries.iter().all(|e| !e.label.contains("nvoice")));
    }

    #[test]
    fn the_worker_builds_more_bundles_at_once_than_one_tenant_may_have_pending() {
        for bound in [1, 2, 3, 10, u32::MAX] {
            let config = ZipWorkerConfig::default().with_pending_bound(bound);
            assert!(
                u32::from(config.prefetch) > bound || config.prefetch == u16::MAX,
                "{bound}: {config:?}"
            );
            assert!(config.prefetch >= ZipWorkerConfig::default().prefetch);
        }
    }

    #[test]
    fn a_failed_bundle_says_a_stable_sentence_and_keeps_the_detail_for_the_log() {
        let detail = "the content of file 0193 is missing from the blob store";
        let failure = Failure::of_archive(ArchiveError::Content(detail.into())).unwrap();
        assert_eq!(failure.public, UNREADABLE_FILE);
        assert_eq!(failure.detail, detail);
        let internal = Failure::of_archive(ArchiveError::Internal("thread died".into())).unwrap();
        assert_eq!(internal.public, NOT_BUILT);
        assert!(Failure::of_archive(ArchiveError::Store("down".into())).is_err());
    }
}
