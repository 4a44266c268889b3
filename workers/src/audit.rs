//! The audit worker: the audit trail (CONTRACT.md `GET /v1/audit`, rule 9) and
//! the sealing of the log (tamper evidence, `dossier_eventlog::chain`).
//!
//! # The trail
//!
//! The worker consumes `dossier.workers.audit`, which receives every event the
//! relay publishes. For each delivery it:
//!
//! 1. reads the event id from the message (the Event JSON's `id`, else the
//!    `message_id`); a message with neither is rejected and dead-lettered;
//! 2. looks the event up **in the log** and builds the entry from the log row,
//!    never from the message: whoever can publish to `dossier.events` still
//!    cannot write the audit trail. An id the log does not have is dead-lettered;
//! 3. inserts one `audit_trail` row, `ON CONFLICT (event_id) DO NOTHING`, so a
//!    redelivery changes nothing, and acks only after that commit. Postgres
//!    trouble is retried with backoff; at shutdown the message goes back.
//!
//! Every event becomes one entry: every accepted command and every download
//! (staff, portal, and each file of a bundle, since a download records one event
//! per file). Who (`actor`), when (`at`), tenant, customer and file come from
//! the log; the customer of a file event that does not name it (a rename) is
//! the one its upload recorded. The readable `action` comes from [`ACTIONS`];
//! an event type that is not listed gets its routing key (`task.created`), so
//! new aggregates are audited from their first event and a later line there
//! refines the wording. `details` is the payload, upcast to the current
//! version, without keys that are already columns or internal (`blob_key`).
//!
//! # Sealing
//!
//! Next to the consumer, the worker runs the [`Sealer`] (following the log by
//! position, so appends are never serialized for it) and signs the chain heads
//! every [`AuditConfig::checkpoint_interval`]; each new checkpoint is also
//! written to the service log, which is one copy outside the database.
//!
//! # Reading
//!
//! [`query`] answers `GET /v1/audit` (one tenant, newest first, keyset cursor);
//! [`wait_until_complete`] gives that endpoint read-your-writes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use dossier_broker::{self, AUDIT_QUEUE, AmqpError, Broker, ConsumerOptions, Incoming, Outcome};
use dossier_domain::upcast;
use dossier_eventlog::chain::{self, Sealer};
use dossier_eventlog::db::Pool;
use dossier_eventlog::log::LogReader;
use dossier_runtime::config::Secret;
use dossier_runtime::retry::Backoff;
use dossier_runtime::shutdown::sleep_or_stop;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::PgError;

/// `(aggregate type, event type, action)`: the readable action of each known
/// event. Anything not listed gets its routing key (`<aggregate>.<event>`, see
/// [`dossier_broker::routing_key`]); add a line here to give it better words.
pub const ACTIONS: &[(&str, &str, &str)] = &[
    ("file", "FileUploaded", "file.uploaded"),
    ("file", "FileRenamed", "file.renamed"),
    ("file", "FileVisibilityChanged", "file.visibility_changed"),
    ("file", "FileViewed", "file.viewed"),
    ("file", "FileSigned", "file.signed"),
    ("file", "FileDeleted", "file.deleted"),
    ("file", "BlobPurged", "file.content_purged"),
    // One event per downloaded file, whatever the door (staff, portal, bundle);
    // `details.channel` says which.
    ("download", "FileDownloaded", "file.downloaded"),
];

/// Payload keys that are not repeated in `details`: columns of the entry
/// already, or internal to the service.
const NOT_DETAILS: &[&str] = &["tenant", "customer_id", "file_id", "blob_key"];

/// The aggregate type of files in the log.
const FILE_AGGREGATE: &str = "file";

/// The event of an audit entry, by id, and the customer named by the upload of
/// the file it concerns (a rename does not name it; the upload is the file's
/// first event). The file is the aggregate of a file event, else the payload's
/// `file_id` (a download).
const READ_EVENT: &str = "\
    SELECT e.position, e.tenant, e.aggregate_type, e.aggregate_id, e.event_type, \
           e.event_version, e.recorded_at, e.actor, e.payload, \
           (SELECT upload.payload->>'customer_id' FROM events AS upload \
            WHERE upload.aggregate_type = 'file' \
              AND upload.aggregate_id = CASE WHEN e.aggregate_type = 'file' \
                                             THEN e.aggregate_id \
                                             ELSE e.payload->>'file_id' END \
              AND upload.sequence = 1 AND upload.tenant = e.tenant) AS upload_customer \
    FROM events AS e WHERE e.id = $1";

/// One entry; a redelivered event finds its entry there and writes nothing.
const INSERT_ENTRY: &str = "\
    INSERT INTO audit_trail (event_id, position, tenant, at, actor, action, aggregate_type, \
                             aggregate_id, event_type, file_id, customer_id, details) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
    ON CONFLICT (event_id) DO NOTHING";

/// How many of a tenant's newest events [`wait_until_complete`] checks.
const COMPLETENESS_WINDOW: i64 = 200;

/// The readable action of an event (see [`ACTIONS`]).
pub fn action_for(aggregate_type: &str, event_type: &str) -> String {
    ACTIONS
        .iter()
        .find(|(aggregate, event, _)| *aggregate == aggregate_type && *event == event_type)
        .map_or_else(
            || dossier_broker::routing_key(aggregate_type, event_type),
            |(_, _, action)| (*action).to_owned(),
        )
}

/// One entry of the audit trail, as `GET /v1/audit` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// The event's log position (the cross-reference to `GET /v1/events`).
    pub position: i64,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Who did it.
    pub actor: String,
    /// What, e.g. `file.downloaded`.
    pub action: String,
    /// The file concerned, if any.
    pub file_id: Option<String>,
    /// The customer concerned, if any.
    pub customer_id: Option<String>,
    /// Everything else the event says.
    pub details: Value,
}

/// How the audit worker runs.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Deliveries handled at once.
    pub prefetch: u16,
    /// Between retries of a Postgres failure.
    pub retry: Backoff,
    /// How long handlers may finish at shutdown.
    pub drain_timeout: Duration,
    /// Pause of the sealer when the log has nothing new.
    pub seal_poll: Duration,
    /// How often the chain heads are signed.
    pub checkpoint_interval: Duration,
    /// The key checkpoints are signed with (`DOSSIER_CHECKPOINT_KEY`).
    pub checkpoint_key: Secret,
}

impl AuditConfig {
    /// The defaults, signing with `checkpoint_key`.
    pub fn new(checkpoint_key: Secret) -> Self {
        Self {
            prefetch: 16,
            retry: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(30),
            },
            drain_timeout: Duration::from_secs(30),
            seal_poll: Duration::from_millis(100),
            checkpoint_interval: Duration::from_secs(60),
            checkpoint_key,
        }
    }
}

/// Runs the audit worker until `shutdown` turns `true`: the trail consumer, the
/// sealer (reading the log through `log`, a clone of the process's one reader)
/// and the periodic checkpoints (see the module docs).
#[tracing::instrument(name = "audit_worker", skip_all)]
pub async fn run(
    pool: Pool,
    log: LogReader,
    broker: Broker,
    config: AuditConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), AmqpError> {
    let options = ConsumerOptions {
        prefetch: config.prefetch,
        drain_timeout: config.drain_timeout,
    };
    let handler_pool = pool.clone();
    let retry = config.retry;
    let handler_shutdown = shutdown.clone();
    let consuming = dossier_broker::consume_with(
        &broker,
        AUDIT_QUEUE,
        options,
        move |incoming| {
            let pool = handler_pool.clone();
            let stopping = handler_shutdown.clone();
            async move { handle(&pool, &incoming, retry, stopping).await }
        },
        shutdown.clone(),
    );
    let sealing = seal_continuously(
        Sealer::reading_from(pool.clone(), log),
        config.clone(),
        shutdown.clone(),
    );
    let signing = sign_periodically(pool, config, shutdown);
    let background = async {
        tokio::join!(sealing, signing);
    };
    tokio::pin!(consuming, background);
    // The sealer and the signer only end at shutdown. The consumer ends then too,
    // or earlier with a permanent error, which stops the worker (a sealing batch
    // in flight is rolled back, and the next sealer repeats it).
    tokio::select! {
        consumed = &mut consuming => {
            if consumed.is_ok() {
                background.await;
            }
            consumed
        }
        () = &mut background => consuming.await,
    }
}

/// One delivery: see the module docs.
async fn handle(
    pool: &Pool,
    incoming: &Incoming,
    retry: Backoff,
    mut stopping: watch::Receiver<bool>,
) -> Outcome {
    let from_body = serde_json::from_slice::<Value>(&incoming.body)
        .ok()
        .and_then(|body| body.get("id")?.as_str().map(str::to_owned));
    let Some(event_id) = from_body
        .or_else(|| incoming.message_id().map(str::to_owned))
        .and_then(|id| Uuid::parse_str(&id).ok())
    else {
        metrics::counter!("dossier_worker_failures_total", "worker" => "audit", "reason" => "unparseable")
            .increment(1);
        tracing::warn!("a message on the audit queue names no event id; dead-lettering it");
        return Outcome::Reject;
    };
    let mut failures = 0u32;
    loop {
        match record(pool, event_id).await {
            Ok(Recorded::Written | Recorded::AlreadyThere) => return Outcome::Ack,
            Ok(Recorded::NotInLog) => {
                metrics::counter!("dossier_worker_failures_total", "worker" => "audit", "reason" => "not_in_log")
                    .increment(1);
                tracing::warn!(%event_id, "the audit queue names an event the log does not have; dead-lettering it");
                return Outcome::Reject;
            }
            Err(error) => {
                let delay = retry.delay(failures);
                failures = failures.saturating_add(1);
                metrics::counter!("dossier_worker_failures_total", "worker" => "audit", "reason" => "postgres")
                    .increment(1);
                tracing::warn!(
                    %event_id,
                    error = %error,
                    attempt = failures,
                    retry_in_ms = delay.as_millis() as u64,
                    "writing an audit entry failed; retrying until it works"
                );
                if sleep_or_stop(delay, &mut stopping).await {
                    return Outcome::Retry;
                }
            }
        }
    }
}

/// What [`record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new entry.
    Written,
    /// The entry was there already (a redelivery).
    AlreadyThere,
    /// The log has no event with that id.
    NotInLog,
}

/// Writes the audit entry of the event `event_id`, built from the log.
/// Idempotent: a second call finds the entry and writes nothing.
pub async fn record(pool: &Pool, event_id: Uuid) -> Result<Recorded, PgError> {
    let client = pool.get().await?;
    // The event, and the customer its file's upload named: one round trip.
    let statement = client.prepare_cached(READ_EVENT).await?;
    let row = client.query_opt(&statement, &[&event_id]).await?;
    let Some(row) = row else {
        return Ok(Recorded::NotInLog);
    };
    let position: i64 = row.try_get("position")?;
    let tenant: String = row.try_get("tenant")?;
    let aggregate_type: String = row.try_get("aggregate_type")?;
    let aggregate_id: String = row.try_get("aggregate_id")?;
    let event_type: String = row.try_get("event_type")?;
    let event_version: String = row.try_get("event_version")?;
    let at: DateTime<Utc> = row.try_get("recorded_at")?;
    let actor: String = row.try_get("actor")?;
    let payload: Value = row.try_get("payload")?;
    let upload_customer: Option<String> = row.try_get("upload_customer")?;

    let payload = upcast::upcast(&event_type, &event_version, payload);
    let text = |key: &str| payload.get(key).and_then(Value::as_str).map(str::to_owned);
    let file_id = if aggregate_type == FILE_AGGREGATE {
        Some(aggregate_id.clone())
    } else {
        text("file_id")
    };
    let customer_id = text("customer_id").or(upload_customer);
    let details = match payload {
        Value::Object(mut map) => {
            for key in NOT_DETAILS {
                map.remove(*key);
            }
            Value::Object(map)
        }
        Value::Null => Value::Object(serde_json::Map::new()),
        other => other,
    };
    let action = action_for(&aggregate_type, &event_type);
    let statement = client.prepare_cached(INSERT_ENTRY).await?;
    let written = client
        .execute(
            &statement,
            &[
                &event_id,
                &position,
                &tenant,
                &at,
                &actor,
                &action,
                &aggregate_type,
                &aggregate_id,
                &event_type,
                &file_id,
                &customer_id,
                &details,
            ],
        )
        .await?;
    if written == 1 {
        metrics::counter!("dossier_audit_entries_total").increment(1);
        tracing::debug!(%event_id, position, %tenant, %action, "audit entry written");
        Ok(Recorded::Written)
    } else {
        Ok(Recorded::AlreadyThere)
    }
}

/// Seals the log as it grows, until shutdown. Failures are logged and retried
/// with backoff: an unsealed tail is only a delay, never a loss.
async fn seal_continuously(
    mut sealer: Sealer,
    config: AuditConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let pause = match sealer.step().await {
            Ok(progress) if progress.more => continue,
            Ok(_) => {
                failures = 0;
                config.seal_poll
            }
            Err(error) => {
                let delay = config.retry.delay(failures);
                failures = failures.saturating_add(1);
                metrics::counter!("dossier_worker_failures_total", "worker" => "audit", "reason" => "seal")
                    .increment(1);
                tracing::warn!(
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "sealing the log failed; new events stay unsealed until it works"
                );
                delay
            }
        };
        if sleep_or_stop(pause, &mut shutdown).await {
            return;
        }
    }
}

/// Signs the chain heads every `checkpoint_interval` (and once at start-up),
/// logging each checkpoint so that a copy lives outside the database.
async fn sign_periodically(pool: Pool, config: AuditConfig, mut shutdown: watch::Receiver<bool>) {
    loop {
        match chain::write_checkpoints(&pool, config.checkpoint_key.expose_bytes()).await {
            Ok(checkpoints) => {
                for checkpoint in checkpoints {
                    tracing::info!(
                        tenant = %checkpoint.tenant,
                        position = checkpoint.position,
                        seq = checkpoint.seq,
                        checkpoint = %serde_json::to_string(&checkpoint).unwrap_or_default(),
                        "signed the head of a tenant's event chain; keep this line to prove later \
                         that the log was not cut short"
                    );
                }
            }
            Err(error) => {
                metrics::counter!("dossier_worker_failures_total", "worker" => "audit", "reason" => "checkpoint")
                    .increment(1);
                tracing::warn!(error = %error, "signing the chain heads failed; the next round tries again");
            }
        }
        if sleep_or_stop(config.checkpoint_interval, &mut shutdown).await {
            return;
        }
    }
}

/// Which entries [`query`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only entries about this customer.
    pub customer_id: Option<String>,
    /// Only entries about this file.
    pub file_id: Option<String>,
    /// Only entries at or after this time.
    pub from: Option<DateTime<Utc>>,
    /// Only entries at or before this time.
    pub to: Option<DateTime<Utc>>,
    /// At most this many (the caller bounds it).
    pub limit: i64,
    /// Only entries before this position (the cursor).
    pub before: Option<i64>,
}

/// One page of the trail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditPage {
    /// Newest first.
    pub items: Vec<AuditEntry>,
    /// The cursor of the next page, `None` on the last.
    pub next_cursor: Option<String>,
}

/// The cursor that continues after `position` (opaque to clients).
pub fn encode_cursor(position: i64) -> String {
    format!("p{position}")
}

/// The position a cursor continues before; `None` for a cursor this service did
/// not give out.
pub fn decode_cursor(cursor: &str) -> Option<i64> {
    cursor
        .strip_prefix('p')?
        .parse::<i64>()
        .ok()
        .filter(|p| *p > 0)
}

/// One page of `tenant`'s audit trail, newest first. Every query filters by
/// tenant: another tenant's entries are never seen.
pub async fn query(pool: &Pool, tenant: &str, filter: &AuditFilter) -> Result<AuditPage, PgError> {
    let limit = filter.limit.max(1);
    let fetch = limit + 1;
    let mut sql = String::from(
        "SELECT position, at, actor, action, file_id, customer_id, details \
         FROM audit_trail WHERE tenant = $1",
    );
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&tenant];
    if let Some(customer_id) = &filter.customer_id {
        params.push(customer_id);
        sql.push_str(&format!(" AND customer_id = ${}", params.len()));
    }
    if let Some(file_id) = &filter.file_id {
        params.push(file_id);
        sql.push_str(&format!(" AND file_id = ${}", params.len()));
    }
    if let Some(from) = &filter.from {
        params.push(from);
        sql.push_str(&format!(" AND at >= ${}", params.len()));
    }
    if let Some(to) = &filter.to {
        params.push(to);
        sql.push_str(&format!(" AND at <= ${}", params.len()));
    }
    if let Some(before) = &filter.before {
        params.push(before);
        sql.push_str(&format!(" AND position < ${}", params.len()));
    }
    params.push(&fetch);
    sql.push_str(&format!(" ORDER BY position DESC LIMIT ${}", params.len()));

    let client = pool.get().await?;
    let rows = client.query(&sql, &params).await?;
    let mut items = rows
        .iter()
        .map(|row| {
            Ok(AuditEntry {
                position: row.try_get("position")?,
                at: row.try_get("at")?,
                actor: row.try_get("actor")?,
                action: row.try_get("action")?,
                file_id: row.try_get("file_id")?,
                customer_id: row.try_get("customer_id")?,
                details: row.try_get("details")?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        items.last().map(|entry| encode_cursor(entry.position))
    } else {
        None
    };
    Ok(AuditPage { items, next_cursor })
}

/// Read-your-writes for the trail: waits (at most `timeout`) until each of the
/// tenant's newest events that were in the log when the call began has its
/// entry. Answers whether it got there; on `false` the caller answers with what
/// there is (the worker lags or is not running anywhere).
///
/// Only the newest [`COMPLETENESS_WINDOW`] events are checked, so the cost is
/// bounded and an old entry that never came (a dead-lettered message) does not
/// slow every request down.
pub async fn wait_until_complete(
    pool: &Pool,
    tenant: &str,
    timeout: Duration,
) -> Result<bool, PgError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let head: Option<i64> = pool
        .get()
        .await?
        .query_one(
            "SELECT max(position) FROM events WHERE tenant = $1",
            &[&tenant],
        )
        .await?
        .try_get(0)?;
    let Some(head) = head else {
        return Ok(true);
    };
    let mut pause = Duration::from_millis(5);
    loop {
        // A connection per look, so that waiting requests do not hold the pool.
        let client = pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT count(*) FROM ( \
                     SELECT position FROM events WHERE tenant = $1 AND position <= $2 \
                     ORDER BY position DESC LIMIT $3) newest \
                 WHERE NOT EXISTS (SELECT 1 FROM audit_trail a WHERE a.position = newest.position)",
            )
            .await?;
        let missing: i64 = client
            .query_one(&statement, &[&tenant, &head, &COMPLETENESS_WINDOW])
            .await?
            .try_get(0)?;
        drop(client);
        if missing == 0 {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                tenant,
                missing,
                head,
                "the audit trail lags behind the log; answering with what it has (is the \
                 workers role running?)"
            );
            return Ok(false);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_events_have_their_own_action_and_unknown_ones_their_routing_key() {
        assert_eq!(action_for("file", "FileUploaded"), "file.uploaded");
        assert_eq!(action_for("download", "FileDownloaded"), "file.downloaded");
        assert_eq!(action_for("task", "TaskCreated"), "task.created");
        assert_eq!(
            action_for("settings", "SettingsChanged"),
            "settings.changed"
        );
        assert_eq!(action_for("bundle", "BundleRequested"), "bundle.requested");
    }

    #[test]
    fn every_listed_action_is_unique_per_event() {
        for (i, (aggregate, event, _)) in ACTIONS.iter().enumerate() {
            assert!(
                ACTIONS[i + 1..]
                    .iter()
                    .all(|(a, e, _)| (a, e) != (aggregate, event)),
                "{aggregate}/{event} is listed twice"
            );
        }
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        assert_eq!(decode_cursor(&encode_cursor(42)), Some(42));
        assert_eq!(decode_cursor("42"), None);
        assert_eq!(decode_cursor("p0"), None);
        assert_eq!(decode_cursor("p-1"), None);
        assert_eq!(decode_cursor("px"), None);
    }
}
