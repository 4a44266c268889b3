//! What runs behind the event log, driven by RabbitMQ:
//!
//! - [`relay`]: the outbox relay. The event log is the outbox; the relay follows it
//!   by position (on the runner every log follower uses,
//!   `dossier_eventlog::follow`) and publishes every event to `dossier.events`
//!   with publisher confirms, moving its checkpoint only past what the broker
//!   confirmed.
//! - [`blob`]: the blob worker. Removes the bytes of deleted files and records that
//!   it did, sweeps blobs no event refers to, and verifies stored blobs against
//!   their recorded SHA-256.
//! - [`audit`]: the audit worker. Writes the audit trail from every event, a
//!   window of deliveries per transaction, seals the log into per-tenant hash
//!   chains and signs their heads.
//! - [`zip`]: the zip worker. Streams a requested bundle's files into one ZIP in the
//!   blob store (bounded memory, ZIP64 when needed) and expires old bundles.
//!
//! Everything here is at least once (DESIGN.md): a message may arrive twice, an
//! event may be published twice, and every effect is idempotent. Nothing is acked
//! before its effect is durable, and a message that can never be handled goes to
//! its queue's dead-letter queue instead of looping.
//!
//! Each role is an `async fn` that runs until its shutdown signal turns `true` and
//! is spawned by the start-up code: [`relay::run`] and [`run_blob_worker`].

pub mod audit;
pub mod blob;
pub mod relay;
pub mod zip;

use std::sync::Arc;

use dossier_blobstore::BlobStore;
use dossier_broker::{Broker, Outcome};
use dossier_eventlog::db::Pool;
use dossier_eventlog::log::LoggedEvent;
use tokio::sync::watch;

pub use blob::{
    BlobWorkerConfig, BlobWorkerError, EncryptReport, SweepReport, VerifyReport, encrypt_blobs,
    sweep_orphans, verify_blobs,
};
pub use relay::{RelayConfig, RelayError};

/// Runs the blob worker with its default configuration until `shutdown` turns
/// `true`: purges the blobs of deleted files from `dossier.workers.blob` and sweeps
/// orphans every hour. See [`blob::run`].
pub async fn run_blob_worker(
    pool: Pool,
    broker: Broker,
    blobs: Arc<dyn BlobStore>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), BlobWorkerError> {
    blob::run(pool, broker, blobs, BlobWorkerConfig::default(), shutdown).await
}

/// A Postgres failure of a worker: transient (the database is down or busy)
/// unless the schema is wrong.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// No pooled connection could be had.
    #[error("no Postgres connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("Postgres statement failed: {}", pg_detail(.0))]
    Query(#[from] tokio_postgres::Error),
    /// The log could not be read.
    #[error(transparent)]
    Log(#[from] dossier_eventlog::log::LogError),
    /// An answer of the database that cannot be (a bug).
    #[error("inconsistent answer from Postgres: {0}")]
    Inconsistent(String),
}

impl PgError {
    /// Whether waiting and trying again may help (Postgres down or busy), as
    /// opposed to a statement the database refuses every time.
    pub fn is_transient(&self) -> bool {
        use dossier_eventlog::log::LogError;
        match self {
            Self::Pool(_) | Self::Log(LogError::Pool(_)) => true,
            Self::Query(error) | Self::Log(LogError::Query(error)) => {
                dossier_eventlog::db::is_transient(error)
            }
            Self::Log(_) | Self::Inconsistent(_) => false,
        }
    }
}

/// An event that a message on `dossier.events` names, as the log has it.
pub(crate) struct Backed<E> {
    pub tenant: dossier_domain::TenantId,
    pub aggregate_id: String,
    pub event: E,
}

/// Reads the event `event_id` from the log and decodes it, checking that it is
/// a `event_type` of `aggregate_type`: workers act on what the log says, not on
/// what a message claims. The outer error is transient (Postgres); the inner
/// one says why the log does not back the message (dead-letter it).
pub(crate) async fn backed_event<E: serde::de::DeserializeOwned>(
    pool: &Pool,
    event_id: uuid::Uuid,
    aggregate_type: &str,
    event_type: &str,
) -> Result<Result<Backed<E>, String>, PgError> {
    let Some(logged) = dossier_eventlog::log::find_event(pool, event_id).await? else {
        return Ok(Err(format!("no event {event_id} in the log")));
    };
    if logged.aggregate_type != aggregate_type || logged.event_type != event_type {
        return Ok(Err(format!(
            "event {event_id} is a {} {} in the log, not a {aggregate_type} {event_type}",
            logged.aggregate_type, logged.event_type
        )));
    }
    let event = match dossier_domain::codec::decode::<E>(
        &logged.event_type,
        &logged.event_version,
        &logged.payload,
    ) {
        Ok(event) => event,
        Err(error) => return Ok(Err(error.to_string())),
    };
    let Ok(tenant) = dossier_domain::TenantId::parse(&logged.tenant) else {
        return Ok(Err(format!("the tenant of event {event_id} is malformed")));
    };
    Ok(Ok(Backed {
        tenant,
        aggregate_id: logged.aggregate_id,
        event,
    }))
}

/// The event a delivery on `dossier.events` carries, when it is a `event_type`
/// of `aggregate_type`, the one `worker` acts on. Otherwise what to do with the
/// delivery: dead-letter a body that is not an Event, ack an event of another
/// kind (someone bound more keys to the worker's queue).
pub(crate) fn delivered_event(
    worker: &'static str,
    body: &[u8],
    aggregate_type: &str,
    event_type: &str,
) -> Result<LoggedEvent, Outcome> {
    let event: LoggedEvent = match serde_json::from_slice(body) {
        Ok(event) => event,
        Err(error) => {
            count_failure(worker, "unparseable");
            tracing::warn!(
                worker,
                error = %error,
                "a message on the worker's queue is not an Event; dead-lettering it"
            );
            return Err(Outcome::Reject);
        }
    };
    if event.aggregate_type != aggregate_type || event.event_type != event_type {
        tracing::debug!(
            worker,
            event_type = %event.event_type,
            "ignoring an event that is not a {aggregate_type} {event_type}"
        );
        return Err(Outcome::Ack);
    }
    Ok(event)
}

/// What the log said of the event a message names ([`backed_event`]): what the
/// worker acts on, or, when the log does not back the message, the delivery
/// dead-lettered (counted and logged).
pub(crate) fn backed_or_reject<T>(
    worker: &'static str,
    found: Result<T, String>,
) -> Result<T, Outcome> {
    found.map_err(|reason| {
        count_failure(worker, "not_in_log");
        tracing::warn!(
            worker,
            reason,
            "the message does not match the log; dead-lettering it"
        );
        Outcome::Reject
    })
}

/// Counts a failure of `worker` in `dossier_worker_failures_total{worker, reason}`.
pub(crate) fn count_failure(worker: &'static str, reason: &'static str) {
    metrics::counter!("dossier_worker_failures_total", "worker" => worker, "reason" => reason)
        .increment(1);
}

/// One helper for every crate: see [`dossier_eventlog::db::pg_detail`].
pub(crate) use dossier_eventlog::db::pg_detail;

/// Tries of one step of a worker (a blob removal, reading the log, a recorded
/// outcome) within one delivery. With the workers' default backoff (0.5 s
/// doubling to 60 s) that is about four minutes; then the message goes back to
/// the queue, and the broker's delivery limit bounds the whole.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 10;

/// How a worker retries a step that failed for a reason outside it (Postgres,
/// the blob store): pauses from the one backoff policy, a bounded number of tries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retry {
    pub backoff: dossier_runtime::retry::Backoff,
    /// Tries in all, the first included.
    pub attempts: u32,
}

/// Runs `attempt` until it succeeds, at most `retry.attempts` times, waiting
/// `retry.backoff` between failures and counting each in
/// `dossier_worker_failures_total{worker, reason}`. `None` when shutdown came
/// first or every try failed: the worker then hands its message back to the
/// queue, and a later delivery tries again. For effects that must happen
/// eventually: a purge, a recorded outcome.
pub(crate) async fn retry_until_done<T, E, F, Fut>(
    worker: &'static str,
    reason: &'static str,
    doing: &'static str,
    retry: Retry,
    shutdown: &watch::Receiver<bool>,
    mut attempt: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut stopping = shutdown.clone();
    let attempts = retry.attempts.max(1);
    for failures in 0..attempts {
        let error = match attempt().await {
            Ok(value) => return Some(value),
            Err(error) => error,
        };
        count_failure(worker, reason);
        if failures + 1 == attempts {
            tracing::warn!(
                worker,
                error = %error,
                attempts,
                "{doing} failed every time; the message goes back to the queue"
            );
            return None;
        }
        let delay = retry.backoff.delay(failures);
        tracing::warn!(
            worker,
            error = %error,
            attempt = failures + 1,
            retry_in_ms = delay.as_millis() as u64,
            "{doing} failed; retrying"
        );
        if dossier_runtime::shutdown::sleep_or_stop(delay, &mut stopping).await {
            return None;
        }
    }
    None
}
