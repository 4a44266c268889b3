//! The Postgres event store behind cqrs-es: [`PgEventStore`] implements
//! [`PersistedEventRepository`] on the `events` table (migration 0001).
//!
//! It is used in event-store mode only (`PersistedEventStore::new_event_store`):
//! aggregates are rebuilt from their events on every command. Snapshots are not
//! supported ([`PersistedEventRepository::get_snapshot`] answers `None` and a snapshot
//! update passed to `persist` is ignored) because cqrs-es 0.5's aggregate and snapshot
//! modes apply each event twice (once in `EventSink::write`, again when they build the
//! snapshot). Why this store exists instead of postgres-es:
//! `docs/adr/0001-own-event-store-on-tokio-postgres.md`.
//!
//! Every event carries the cqrs-es metadata map; [`META_TENANT`] is required (an event
//! without a tenant is refused, nothing is written), [`META_ACTOR`] defaults to
//! [`DEFAULT_ACTOR`]. The whole map is stored in `metadata`, tenant and actor also in
//! their own columns.
//!
//! Aggregate ids are global per aggregate type (the optimistic-concurrency key is
//! `(aggregate_type, aggregate_id, sequence)`, without the tenant): use ids that
//! cannot collide across tenants, such as UUIDs.

use std::time::Duration;

use cqrs_es::Aggregate;
use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use dossier_domain::{codec, upcast};
use futures::TryStreamExt;
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::db::{Pool, pg_detail};
use crate::log::{EVENT_COLUMNS, LogError, LoggedEvent};
use crate::receipts;

/// Metadata key of the tenant an event belongs to. Required.
pub const META_TENANT: &str = "tenant";
/// Metadata key of who caused the event (a user id, `upstream`, ...).
pub const META_ACTOR: &str = "actor";
/// Metadata key of the command's idempotency key (the AMQP `message_id`, ...).
pub const META_COMMAND_ID: &str = "command_id";
/// Metadata key of the correlation id that ties a command to its effects.
pub const META_CORRELATION_ID: &str = "correlation_id";
/// The actor recorded when the metadata names none.
pub const DEFAULT_ACTOR: &str = "system";
/// Metadata key of a command's idempotency key (an AMQP `message_id`): when
/// present, the append also writes the command's receipt in the same
/// transaction (see [`crate::receipts`]).
pub const META_IDEMPOTENCY_KEY: &str = "idempotency_key";

/// Buffer of the channels behind [`ReplayStream`]s.
const STREAM_CHANNEL_SIZE: usize = 256;

/// The name of the unique constraint whose violation means "someone else appended
/// this aggregate's next event first" (see migration 0001).
const SEQUENCE_CONSTRAINT: &str = "events_aggregate_sequence_key";

const INSERT_EVENT: &str = "INSERT INTO events \
     (id, tenant, aggregate_type, aggregate_id, sequence, event_type, event_version, \
      payload, metadata, actor) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     RETURNING position";

/// Why the event store refused or failed an operation. cqrs-es only knows
/// [`PersistenceError`]; these travel boxed inside it, so callers can downcast.
#[derive(Debug, thiserror::Error)]
pub enum EventStoreError {
    /// An event's metadata has no [`META_TENANT`]; nothing was written.
    #[error("refusing to append {aggregate_type}/{aggregate_id} without a tenant in its metadata")]
    MissingTenant {
        /// The aggregate's type.
        aggregate_type: String,
        /// The aggregate instance.
        aggregate_id: String,
    },
    /// An event's metadata is not a JSON object of strings; nothing was written.
    #[error("refusing to append {aggregate_type}/{aggregate_id}: {reason}")]
    BadMetadata {
        /// The aggregate's type.
        aggregate_type: String,
        /// The aggregate instance.
        aggregate_id: String,
        /// What is wrong.
        reason: String,
    },
    /// An event's payload is not tagged with its own event type, so the log
    /// could not give it back (see `dossier_domain::codec`); nothing was written.
    #[error(
        "refusing to append {aggregate_type} event {event_type}: its payload is not tagged {event_type:?}"
    )]
    PayloadTag {
        /// The aggregate's type.
        aggregate_type: String,
        /// The event type the payload should be tagged with.
        event_type: String,
    },
    /// The command's idempotency key was used before; nothing was written.
    /// The caller answers with the receipt that stands ([`crate::receipts::find`]).
    #[error("the command {key:?} of tenant {tenant} was already handled")]
    DuplicateCommand {
        /// The tenant.
        tenant: String,
        /// The idempotency key.
        key: String,
    },
    /// A sequence number does not fit the table's BIGINT.
    #[error("sequence number {0} is out of range")]
    SequenceOutOfRange(u128),
    /// No pooled connection could be had.
    #[error("no Postgres connection for the event store: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("event store: {action} failed: {}", pg_detail(.source))]
    Database {
        /// What the store was doing.
        action: &'static str,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// A stored event could not be read back.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// The event store. Cheap to clone: it is a pool handle.
#[derive(Clone)]
pub struct PgEventStore {
    pool: Pool,
}

impl std::fmt::Debug for PgEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEventStore").finish_non_exhaustive()
    }
}

/// One event ready for the INSERT: validated and converted before any connection is
/// taken, so a refused event never opens a transaction.
struct NewEvent<'a> {
    tenant: String,
    actor: String,
    sequence: i64,
    /// The payload as the log keeps it: without cqrs-es's type tag.
    payload: Value,
    event: &'a SerializedEvent,
}

impl<'a> NewEvent<'a> {
    fn prepare(event: &'a SerializedEvent) -> Result<Self, EventStoreError> {
        let bad = |reason: String| EventStoreError::BadMetadata {
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            reason,
        };
        let metadata = match &event.metadata {
            Value::Object(map) => map,
            // cqrs-es serializes an empty HashMap as {}; null means "no metadata".
            Value::Null => {
                return Err(EventStoreError::MissingTenant {
                    aggregate_type: event.aggregate_type.clone(),
                    aggregate_id: event.aggregate_id.clone(),
                });
            }
            other => return Err(bad(format!("metadata must be a JSON object, not {other}"))),
        };
        let text = |key: &str| -> Result<Option<String>, EventStoreError> {
            match metadata.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(bad(format!(
                    "metadata {key:?} must be a string, not {other}"
                ))),
            }
        };
        let tenant = text(META_TENANT)?.ok_or_else(|| EventStoreError::MissingTenant {
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
        })?;
        let actor = text(META_ACTOR)?.unwrap_or_else(|| DEFAULT_ACTOR.to_owned());
        let sequence = i64::try_from(event.sequence)
            .map_err(|_| EventStoreError::SequenceOutOfRange(event.sequence as u128))?;
        // The `event_type` column names the event, so the payload is stored
        // without cqrs-es's tag; that only reads back if the tag *is* the type.
        let tagged = matches!(&event.payload, Value::Object(map) if map.len() == 1 && map.contains_key(&event.event_type));
        if !tagged {
            return Err(EventStoreError::PayloadTag {
                aggregate_type: event.aggregate_type.clone(),
                event_type: event.event_type.clone(),
            });
        }
        let payload = codec::unwrap_payload(&event.event_type, event.payload.clone());
        Ok(Self {
            tenant,
            actor,
            sequence,
            payload,
            event,
        })
    }
}

impl PgEventStore {
    /// An event store on `pool` (a database migrated with [`crate::db::migrate`]).
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// The pool, for callers that need their own queries next to the store.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Appends `events` in one transaction and returns their positions, in order.
    /// This is what the cqrs-es `persist` does; use it directly when the caller needs
    /// the positions (read-your-writes, the AMQP reply's `position`).
    ///
    /// Errors: [`PersistenceError::OptimisticLockError`] when another writer appended
    /// one of these sequence numbers first; `ConnectionError` when Postgres cannot be
    /// reached; `UnknownError` wrapping an [`EventStoreError`] otherwise (for example
    /// [`EventStoreError::MissingTenant`]). On any error nothing was written.
    pub async fn persist_returning_positions(
        &self,
        events: &[SerializedEvent],
    ) -> Result<Vec<i64>, PersistenceError> {
        self.append(events, None).await
    }

    /// [`Self::persist_returning_positions`], holding the transaction open for `delay`
    /// after the inserts and before COMMIT. Only for tests that need appends to commit
    /// out of position order through the real append path.
    #[doc(hidden)]
    pub async fn persist_with_commit_delay(
        &self,
        events: &[SerializedEvent],
        delay: Duration,
    ) -> Result<Vec<i64>, PersistenceError> {
        self.append(events, Some(delay)).await
    }

    /// The highest position of an aggregate's events, `None` if it has none. A
    /// read-your-writes wait uses it: once a projection's checkpoint is at or past it,
    /// the projection reflects the aggregate's last command.
    pub async fn last_position(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<i64>, PersistenceError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT max(position) FROM events WHERE aggregate_type = $1 AND aggregate_id = $2",
                &[&aggregate_type, &aggregate_id],
            )
            .await
            .map_err(|e| database_error("reading an aggregate's last position", e))?;
        row.try_get(0)
            .map_err(|e| database_error("reading an aggregate's last position", e))
    }

    #[tracing::instrument(
        name = "append_events",
        skip_all,
        fields(
            aggregate_type = events.first().map(|e| e.aggregate_type.as_str()),
            aggregate_id = events.first().map(|e| e.aggregate_id.as_str()),
            count = events.len(),
        )
    )]
    async fn append(
        &self,
        events: &[SerializedEvent],
        commit_delay: Option<Duration>,
    ) -> Result<Vec<i64>, PersistenceError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let prepared = events
            .iter()
            .map(NewEvent::prepare)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PersistenceError::UnknownError(Box::new(e)))?;

        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| database_error("starting the append transaction", e))?;
        // Take this transaction's xid BEFORE drawing any position. The log readers'
        // safe watermark (crate::log) relies on "every transaction that holds a
        // position <= L got its xid before L was read". Without this statement the xid
        // would be assigned lazily when the first row is written, which is after
        // nextval() has run. (The table's insert trigger enforces the same order for
        // every writer; doing it here too keeps the rule visible where appends happen.)
        tx.execute("SELECT pg_current_xact_id()", &[])
            .await
            .map_err(|e| database_error("taking a transaction id", e))?;
        let insert = tx
            .prepare_cached(INSERT_EVENT)
            .await
            .map_err(|e| database_error("preparing the insert", e))?;

        let mut positions = Vec::with_capacity(prepared.len());
        for new in &prepared {
            let event = new.event;
            let id = Uuid::now_v7();
            let params: [&(dyn ToSql + Sync); 10] = [
                &id,
                &new.tenant,
                &event.aggregate_type,
                &event.aggregate_id,
                &new.sequence,
                &event.event_type,
                &event.event_version,
                &new.payload,
                &event.metadata,
                &new.actor,
            ];
            let row = tx
                .query_one(&insert, &params)
                .await
                .map_err(|e| insert_error(event, e))?;
            positions.push(
                row.try_get::<_, i64>(0)
                    .map_err(|e| database_error("reading the new position", e))?,
            );
        }

        // A command with an idempotency key leaves its receipt in the same
        // transaction: the key then has its effect at most once, crashes included.
        let first = &prepared[0];
        let key = first
            .event
            .metadata
            .get(META_IDEMPOTENCY_KEY)
            .and_then(Value::as_str);
        if let (Some(key), Some(position)) = (key, positions.last()) {
            let receipt: [&(dyn ToSql + Sync); 5] = [
                &first.tenant,
                &key,
                &first.event.aggregate_type,
                &first.event.aggregate_id,
                position,
            ];
            tx.execute(receipts::INSERT_ACCEPTED, &receipt)
                .await
                .map_err(|e| match e.as_db_error().and_then(|db| db.constraint()) {
                    Some(receipts::PRIMARY_KEY) => PersistenceError::UnknownError(Box::new(
                        EventStoreError::DuplicateCommand {
                            tenant: first.tenant.clone(),
                            key: key.to_owned(),
                        },
                    )),
                    _ => database_error("recording the command receipt", e),
                })?;
        }

        if let Some(delay) = commit_delay {
            tokio::time::sleep(delay).await;
        }
        tx.commit()
            .await
            .map_err(|e| database_error("committing the append", e))?;
        tracing::debug!(?positions, "appended events");
        Ok(positions)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, PersistenceError> {
        self.pool
            .get()
            .await
            .map_err(|e| PersistenceError::ConnectionError(Box::new(EventStoreError::Pool(e))))
    }

    /// `SELECT`s `EVENT_COLUMNS` of one aggregate, in sequence order.
    async fn select_events(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: i64,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 \
             ORDER BY sequence"
        );
        let rows = client
            .query(&sql, &[&aggregate_type, &aggregate_id, &after_sequence])
            .await
            .map_err(|e| database_error("loading an aggregate's events", e))?;
        rows.iter().map(serialized_event_from_row).collect()
    }

    /// Feeds the rows of `sql` (bound to `params`) into a [`ReplayStream`] from a
    /// background task; a failure is sent down the stream as an error, never a panic.
    fn stream(&self, sql: String, params: Vec<String>) -> ReplayStream {
        let (mut feed, stream) = ReplayStream::new(STREAM_CHANNEL_SIZE);
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let result: Result<(), PersistenceError> = async {
                let client = pool.get().await.map_err(|e| {
                    PersistenceError::ConnectionError(Box::new(EventStoreError::Pool(e)))
                })?;
                let rows = client
                    .query_raw(&sql, params.iter())
                    .await
                    .map_err(|e| database_error("streaming events", e))?;
                futures::pin_mut!(rows);
                while let Some(row) = rows
                    .try_next()
                    .await
                    .map_err(|e| database_error("streaming events", e))?
                {
                    let event = serialized_event_from_row(&row);
                    let failed = event.is_err();
                    if feed.push(event).await.is_err() || failed {
                        // The consumer went away, or was told about the bad row.
                        return Ok(());
                    }
                }
                Ok(())
            }
            .await;
            if let Err(error) = result {
                // If the consumer has gone away there is nobody left to tell.
                let _ = feed.push(Err(error)).await;
            }
        });
        stream
    }
}

/// Maps a row selected with `EVENT_COLUMNS` to what cqrs-es wants, through the one
/// row mapping of the log.
fn serialized_event_from_row(
    row: &tokio_postgres::Row,
) -> Result<SerializedEvent, PersistenceError> {
    let event = LoggedEvent::from_row(row)
        .map_err(|e| PersistenceError::DeserializationError(Box::new(EventStoreError::Log(e))))?;
    let sequence = usize::try_from(event.sequence).map_err(|_| {
        PersistenceError::DeserializationError(Box::new(EventStoreError::SequenceOutOfRange(
            // Only negative values fail here, which the table's CHECK forbids.
            event.sequence.unsigned_abs() as u128,
        )))
    })?;
    // Old versions are lifted to the current one here, so aggregates only ever
    // see current events; then the type tag cqrs-es expects is put back.
    let current = upcast::upcast(&event.event_type, &event.event_version, event.payload);
    let payload = codec::wrap_payload(&event.event_type, current);
    Ok(SerializedEvent {
        aggregate_id: event.aggregate_id,
        sequence,
        aggregate_type: event.aggregate_type,
        event_type: event.event_type,
        event_version: event.event_version,
        payload,
        metadata: event.metadata,
    })
}

/// Maps an INSERT failure: losing the race for a sequence number is the optimistic
/// lock error cqrs-es expects; anything else keeps its meaning.
fn insert_error(event: &SerializedEvent, error: tokio_postgres::Error) -> PersistenceError {
    let lost_race = error.code() == Some(&SqlState::UNIQUE_VIOLATION)
        && error
            .as_db_error()
            .and_then(|db| db.constraint())
            .is_some_and(|constraint| constraint == SEQUENCE_CONSTRAINT);
    if lost_race {
        tracing::debug!(
            aggregate_type = %event.aggregate_type,
            aggregate_id = %event.aggregate_id,
            sequence = event.sequence,
            "another writer appended this sequence number first"
        );
        return PersistenceError::OptimisticLockError;
    }
    database_error("inserting an event", error)
}

/// Wraps a driver error: a lost or unreachable server is a `ConnectionError` (the
/// caller may retry later), everything else `UnknownError`.
fn database_error(action: &'static str, source: tokio_postgres::Error) -> PersistenceError {
    let connection_problem = source.is_closed()
        || source.code().is_some_and(|code| {
            let class = &code.code()[..2];
            // 08: connection exception; 53: insufficient resources (too many
            // connections, ...); 57P: operator intervention (server shutting down).
            class == "08" || class == "53" || code.code().starts_with("57P")
        })
        || (source.code().is_none()
            && std::error::Error::source(&source)
                .is_some_and(|cause| cause.is::<std::io::Error>()));
    let error = Box::new(EventStoreError::Database { action, source });
    if connection_problem {
        PersistenceError::ConnectionError(error)
    } else {
        PersistenceError::UnknownError(error)
    }
}

impl PersistedEventRepository for PgEventStore {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.select_events(A::TYPE, aggregate_id, 0).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let after = i64::try_from(last_sequence).map_err(|_| {
            PersistenceError::UnknownError(Box::new(EventStoreError::SequenceOutOfRange(
                last_sequence as u128,
            )))
        })?;
        self.select_events(A::TYPE, aggregate_id, after).await
    }

    /// Always `None`: this store runs in event-store mode only (see the module docs).
    async fn get_snapshot<A: Aggregate>(
        &self,
        _aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        Ok(None)
    }

    /// Appends `events` in one transaction. A `snapshot_update` is ignored: snapshots
    /// are not supported (see the module docs).
    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        if snapshot_update.is_some() {
            tracing::warn!(
                aggregate_type = A::TYPE,
                "ignoring a snapshot update: PgEventStore supports event-store mode only"
            );
        }
        self.append(events, None).await.map(drop)
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence"
        );
        Ok(self.stream(sql, vec![A::TYPE.to_owned(), aggregate_id.to_owned()]))
    }

    /// Every committed event of the aggregate type, in log order. A one-shot replay,
    /// not a tail: followers of the log use [`crate::log::LogReader`].
    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_type = $1 ORDER BY position"
        );
        Ok(self.stream(sql, vec![A::TYPE.to_owned()]))
    }
}
