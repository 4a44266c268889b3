//! The audit worker: the audit trail (CONTRACT.md `GET /v1/audit`, rule 9) and
//! the sealing of the log (tamper evidence, `dossier_eventlog::chain`).
//!
//! # The trail
//!
//! The worker consumes `dossier.workers.audit`, which receives every event the
//! relay publishes, a window at a time ([`dossier_broker::consume_batches`]: up
//! to the prefetch, or what has arrived within [`AuditConfig::window`] of the
//! first). For each window it:
//!
//! 1. reads the event id from each message (the Event JSON's `id`, else the
//!    `message_id`); a message with neither is dead-lettered on its own, with
//!    the reason in a header, and the rest of the window goes on;
//! 2. looks the events up **in the log** and builds each entry from the log row,
//!    never from the message: whoever can publish to `dossier.events` still
//!    cannot write the audit trail. An id the log does not have is dead-lettered;
//! 3. inserts the window's `audit_trail` rows in ONE transaction, `ON CONFLICT
//!    (event_id) DO NOTHING`, so a redelivery changes nothing, and acks the
//!    window together only after that commit. Postgres trouble is retried with
//!    backoff; at shutdown the messages go back. Should the database refuse a
//!    row for good, the window is written entry by entry so that only the
//!    culprit is dead-lettered.
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
//! Next to the consumer, the worker runs the [`Sealer`] (a follower of the log
//! on the runner every follower uses, so appends are never serialized for it)
//! and signs the chain heads every [`AuditConfig::checkpoint_interval`]; each new
//! checkpoint is also written to the service log, which is one copy outside the
//! database.
//!
//! `GET /v1/audit` reads the trail through `dossier_projections::audit`, where
//! the other queries live.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dossier_broker::{self, AUDIT_QUEUE, AmqpError, BatchOptions, BatchOutcome, Broker, Incoming};
use dossier_domain::upcast;
use dossier_eventlog::chain::{self, Sealer};
use dossier_eventlog::db::Pool;
use dossier_eventlog::follow::RunnerConfig;
use dossier_eventlog::log::LogReader;
use dossier_runtime::config::Secret;
use dossier_runtime::retry::Backoff;
use dossier_runtime::shutdown::sleep_or_stop;
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
    // `details` lists the erased files and counts the kept ones; each erased
    // file has its own `file.deleted` entry before it.
    ("customer", "CustomerErased", "customer.erased"),
];

/// Payload keys that are not repeated in `details`: columns of the entry
/// already, or internal to the service.
const NOT_DETAILS: &[&str] = &["tenant", "customer_id", "file_id", "blob_key"];

/// The aggregate type of files in the log.
const FILE_AGGREGATE: &str = "file";

/// The events of a window's audit entries, by id, and for each the customer
/// named by the upload of the file it concerns (a rename does not name it; the
/// upload is the file's first event). The file is the aggregate of a file event,
/// else the payload's `file_id` (a download).
const READ_EVENTS: &str = "\
    SELECT e.id, e.position, e.tenant, e.aggregate_type, e.aggregate_id, e.event_type, \
           e.event_version, e.recorded_at, e.actor, e.payload, \
           (SELECT upload.payload->>'customer_id' FROM events AS upload \
            WHERE upload.aggregate_type = 'file' \
              AND upload.aggregate_id = CASE WHEN e.aggregate_type = 'file' \
                                             THEN e.aggregate_id \
                                             ELSE e.payload->>'file_id' END \
              AND upload.sequence = 1 AND upload.tenant = e.tenant) AS upload_customer \
    FROM events AS e WHERE e.id = ANY($1)";

/// A window's entries in one statement; a redelivered event finds its entry
/// there and writes nothing. Answers the ids it wrote.
const INSERT_ENTRIES: &str = "\
    INSERT INTO audit_trail (event_id, position, tenant, at, actor, action, aggregate_type, \
                             aggregate_id, event_type, file_id, customer_id, details) \
    SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::timestamptz[], $5::text[], \
                         $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
                         $11::text[], $12::jsonb[]) \
    ON CONFLICT (event_id) DO NOTHING \
    RETURNING event_id";

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

/// How the audit worker runs.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Deliveries prefetched, and the most written in one transaction.
    pub prefetch: u16,
    /// How long after the first delivery of a window to wait for more before
    /// writing what has arrived.
    pub window: Duration,
    /// Between retries of a Postgres failure.
    pub retry: Backoff,
    /// How long a window in flight may finish at shutdown.
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
            window: Duration::from_millis(25),
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
    let options = BatchOptions {
        prefetch: config.prefetch,
        window: config.window,
        drain_timeout: config.drain_timeout,
    };
    let handler_pool = pool.clone();
    let retry = config.retry;
    let handler_shutdown = shutdown.clone();
    let consuming = dossier_broker::consume_batches(
        &broker,
        AUDIT_QUEUE,
        options,
        move |batch| {
            let pool = handler_pool.clone();
            let stopping = handler_shutdown.clone();
            async move { handle_window(&pool, &batch, retry, stopping).await }
        },
        shutdown.clone(),
    );
    let sealer = Sealer::reading_from(pool.clone(), log).with_config(RunnerConfig {
        idle_poll: config.seal_poll,
        backoff: config.retry,
        ..RunnerConfig::default()
    });
    let seal_shutdown = shutdown.clone();
    let sealing = async move {
        if let Err(error) = sealer.run(seal_shutdown).await {
            tracing::error!(
                error = %error,
                "the sealer stopped; new events stay unsealed until the cause is fixed and the \
                 process restarted (the audit trail is still written)"
            );
        }
    };
    let signing = sign_periodically(pool, config, shutdown);
    let background = async {
        tokio::join!(sealing, signing);
    };
    tokio::pin!(consuming, background);
    // The sealer and the signer only end at shutdown (the sealer earlier on a
    // failure it cannot retry). The consumer ends then too, or earlier with a
    // permanent error, which stops the worker (a sealing batch in flight is
    // rolled back, and the next sealer repeats it).
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

/// The event id a message names: the Event JSON's `id`, else its `message_id`.
fn event_id_of(message: &Incoming) -> Option<Uuid> {
    let from_body = serde_json::from_slice::<Value>(&message.body)
        .ok()
        .and_then(|body| body.get("id")?.as_str().map(str::to_owned));
    from_body
        .or_else(|| message.message_id().map(str::to_owned))
        .and_then(|id| Uuid::parse_str(&id).ok())
}

/// One window: see the module docs. One outcome per message, in order.
async fn handle_window(
    pool: &Pool,
    batch: &[Incoming],
    retry: Backoff,
    mut stopping: watch::Receiver<bool>,
) -> Vec<BatchOutcome> {
    let mut outcomes = vec![BatchOutcome::Retry; batch.len()];
    let mut named: Vec<(usize, Uuid)> = Vec::with_capacity(batch.len());
    for (i, message) in batch.iter().enumerate() {
        match event_id_of(message) {
            Some(id) => named.push((i, id)),
            None => {
                failure("unparseable");
                outcomes[i] = BatchOutcome::DeadLetter {
                    reason: "the message names no event: its body has no Event `id` and its \
                             message_id is not an event id"
                        .to_owned(),
                };
            }
        }
    }
    if named.is_empty() {
        return outcomes;
    }
    let mut ids: Vec<Uuid> = named.iter().map(|(_, id)| *id).collect();
    ids.sort_unstable();
    ids.dedup();

    let mut failures = 0u32;
    loop {
        match record_window(pool, &ids).await {
            Ok(recorded) => {
                for (i, id) in named {
                    outcomes[i] = outcome_of(id, recorded.get(&id).copied());
                }
                return outcomes;
            }
            Err(error) if error.is_transient() => {
                let delay = retry.delay(failures);
                failures = failures.saturating_add(1);
                failure("postgres");
                tracing::warn!(
                    events = ids.len(),
                    error = %error,
                    attempt = failures,
                    retry_in_ms = delay.as_millis() as u64,
                    "writing a window of audit entries failed; retrying until it works"
                );
                if sleep_or_stop(delay, &mut stopping).await {
                    // Retry: the messages go back to the queue.
                    return outcomes;
                }
            }
            Err(error) => {
                // The database refuses something of this window for good: write
                // each entry on its own, so that only the culprit is dead-lettered.
                tracing::warn!(
                    events = ids.len(),
                    error = %error,
                    "the database refused a window of audit entries; writing them one by one"
                );
                for (i, id) in named {
                    outcomes[i] = match record_window(pool, &[id]).await {
                        Ok(recorded) => outcome_of(id, recorded.get(&id).copied()),
                        Err(error) if error.is_transient() => BatchOutcome::Retry,
                        Err(error) => {
                            failure("refused");
                            BatchOutcome::DeadLetter {
                                reason: format!(
                                    "the database refuses the audit entry of event {id}: {error}"
                                ),
                            }
                        }
                    };
                }
                return outcomes;
            }
        }
    }
}

fn outcome_of(event_id: Uuid, recorded: Option<Recorded>) -> BatchOutcome {
    match recorded {
        Some(Recorded::Written | Recorded::AlreadyThere) => BatchOutcome::Ack,
        Some(Recorded::NotInLog) | None => {
            failure("not_in_log");
            BatchOutcome::DeadLetter {
                reason: format!("the log has no event {event_id}"),
            }
        }
    }
}

fn failure(reason: &'static str) {
    crate::count_failure("audit", reason);
}

/// What [`record_window`] did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new entry.
    Written,
    /// The entry was there already (a redelivery).
    AlreadyThere,
    /// The log has no event with that id.
    NotInLog,
}

/// One entry, as built from the log.
struct Entry {
    event_id: Uuid,
    position: i64,
    tenant: String,
    at: DateTime<Utc>,
    actor: String,
    action: String,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    file_id: Option<String>,
    customer_id: Option<String>,
    details: Value,
}

impl Entry {
    fn from_row(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        let aggregate_type: String = row.try_get("aggregate_type")?;
        let aggregate_id: String = row.try_get("aggregate_id")?;
        let event_type: String = row.try_get("event_type")?;
        let event_version: String = row.try_get("event_version")?;
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
        Ok(Self {
            event_id: row.try_get("id")?,
            position: row.try_get("position")?,
            tenant: row.try_get("tenant")?,
            at: row.try_get("recorded_at")?,
            actor: row.try_get("actor")?,
            action: action_for(&aggregate_type, &event_type),
            aggregate_type,
            aggregate_id,
            event_type,
            file_id,
            customer_id,
            details,
        })
    }
}

/// Writes the audit entries of the events `event_ids`, built from the log, in
/// one transaction (one read, one insert). Idempotent: an entry that is there
/// already is left alone.
pub async fn record_window(
    pool: &Pool,
    event_ids: &[Uuid],
) -> Result<HashMap<Uuid, Recorded>, PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let statement = tx.prepare_cached(READ_EVENTS).await?;
    let rows = tx.query(&statement, &[&event_ids]).await?;
    let entries = rows
        .iter()
        .map(Entry::from_row)
        .collect::<Result<Vec<_>, _>>()?;

    let column = |f: &dyn Fn(&Entry) -> String| entries.iter().map(f).collect::<Vec<_>>();
    let ids: Vec<Uuid> = entries.iter().map(|e| e.event_id).collect();
    let positions: Vec<i64> = entries.iter().map(|e| e.position).collect();
    let ats: Vec<DateTime<Utc>> = entries.iter().map(|e| e.at).collect();
    let tenants = column(&|e| e.tenant.clone());
    let actors = column(&|e| e.actor.clone());
    let actions = column(&|e| e.action.clone());
    let aggregate_types = column(&|e| e.aggregate_type.clone());
    let aggregate_ids = column(&|e| e.aggregate_id.clone());
    let event_types = column(&|e| e.event_type.clone());
    let file_ids: Vec<Option<String>> = entries.iter().map(|e| e.file_id.clone()).collect();
    let customer_ids: Vec<Option<String>> = entries.iter().map(|e| e.customer_id.clone()).collect();
    let details: Vec<Value> = entries.iter().map(|e| e.details.clone()).collect();
    let params: [&(dyn ToSql + Sync); 12] = [
        &ids,
        &positions,
        &tenants,
        &ats,
        &actors,
        &actions,
        &aggregate_types,
        &aggregate_ids,
        &event_types,
        &file_ids,
        &customer_ids,
        &details,
    ];
    let statement = tx.prepare_cached(INSERT_ENTRIES).await?;
    let written: Vec<Uuid> = tx
        .query(&statement, &params)
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    tx.commit().await?;

    metrics::counter!("dossier_audit_entries_total").increment(written.len() as u64);
    let mut recorded: HashMap<Uuid, Recorded> = event_ids
        .iter()
        .map(|id| (*id, Recorded::NotInLog))
        .collect();
    for entry in &entries {
        recorded.insert(entry.event_id, Recorded::AlreadyThere);
    }
    for id in &written {
        recorded.insert(*id, Recorded::Written);
    }
    tracing::debug!(
        events = event_ids.len(),
        written = written.len(),
        "audit entries written"
    );
    Ok(recorded)
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
                failure("checkpoint");
                tracing::warn!(error = %error, "signing the chain heads failed; the next round tries again");
            }
        }
        if sleep_or_stop(config.checkpoint_interval, &mut shutdown).await {
            return;
        }
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
        assert_eq!(action_for("customer", "CustomerErased"), "customer.erased");
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
}
