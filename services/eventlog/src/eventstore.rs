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

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
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
use crate::personal::{Erased, FieldCipher, NewPayload, OwnerId, PersonalError};
use crate::receipts;
use dossier_keys::Owner;

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

/// The whole append as one statement, so that it is one round trip and, outside
/// an explicit transaction, one implicit transaction: the events (one array element
/// per event, inserted in array order), then the command's receipt when `$10` (the
/// idempotency key) is not null, naming the last position. The table's insert
/// trigger takes the transaction's xid before it draws each position, which is
/// what the log readers' safe watermark relies on (`crate::log`).
///
/// Positions follow array order because `INSERT ... SELECT ... ORDER BY` hands the
/// rows to the insert, and so to the position trigger, in that order (a test checks
/// it). The events may belong to several aggregates (the benchmark seeds in
/// batches); the receipt names the first event's aggregate.
const APPEND: &str = "\
    WITH appended AS ( \
        INSERT INTO events (id, tenant, aggregate_type, aggregate_id, sequence, event_type, \
                            event_version, payload, metadata, actor) \
        SELECT e.id, e.tenant, e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, \
               e.event_version, e.payload, e.metadata, e.actor \
        FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
                    $6::text[], $7::text[], $8::jsonb[], $9::jsonb[], $10::text[]) \
             WITH ORDINALITY AS e(id, tenant, aggregate_type, aggregate_id, sequence, \
                                  event_type, event_version, payload, metadata, actor, n) \
        ORDER BY e.n \
        RETURNING position \
    ), receipt AS ( \
        INSERT INTO command_receipts \
            (tenant, idempotency_key, status, aggregate_type, aggregate_id, position) \
        SELECT $2[1], $11, 'accepted', $3[1], $4[1], last.position \
        FROM (SELECT max(position) AS position FROM appended) AS last \
        WHERE $11::text IS NOT NULL \
    ) \
    SELECT position FROM appended ORDER BY position";

/// [`APPEND`] with one more data-modifying CTE: the destruction of the data
/// keys its events call for (`FileDeleted`, `CustomerErased`; `$12` owner
/// kinds, `$13` owner ids), in the same statement and so the same
/// transaction: a delete that commits has shredded its file, one that fails
/// has destroyed nothing. Used only when the key table is in this database.
static APPEND_DESTROYING_KEYS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    const LAST_SELECT: &str = " SELECT position FROM appended ORDER BY position";
    let (ctes, select) = APPEND.split_at(
        APPEND
            .rfind(LAST_SELECT)
            .expect("APPEND ends with its SELECT"),
    );
    format!(
        "{ctes}, destroyed AS ( \
            UPDATE data_keys SET wrapped = NULL, master_key_id = NULL, destroyed_at = now() \
            FROM unnest($12::text[], $13::text[]) AS d(owner_kind, owner_id) \
            WHERE data_keys.tenant = $2[1] AND data_keys.owner_kind = d.owner_kind \
              AND data_keys.owner_id = d.owner_id AND data_keys.destroyed_at IS NULL \
        ){select}"
    )
});

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
    /// Personal fields could not be sealed or opened (the key table failed,
    /// or an event does not say whose it is); nothing was written.
    #[error("personal fields: {0}")]
    Personal(#[from] PersonalError),
}

/// The event store. Cheap to clone: it is a pool handle.
#[derive(Clone)]
pub struct PgEventStore {
    pool: Pool,
    /// Where [`Self::noting_positions`] wants the last appended position.
    noted: Option<LastAppended>,
    /// Seals personal fields on append and opens them on load; `None` keeps
    /// payloads as they are (tools that copy the log, some tests).
    cipher: Option<Arc<FieldCipher>>,
}

/// The log position of the last event a [`PgEventStore::noting_positions`] handle
/// appended. cqrs-es's `execute` answers `()`, so this is how the command path
/// learns where its events went without asking the database again.
#[derive(Debug, Clone, Default)]
pub struct LastAppended(Arc<AtomicI64>);

impl LastAppended {
    /// The position, `None` while nothing was appended through the handle.
    pub fn get(&self) -> Option<i64> {
        Some(self.0.load(Ordering::Acquire)).filter(|position| *position > 0)
    }

    fn note(&self, position: i64) {
        self.0.fetch_max(position, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for PgEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEventStore").finish_non_exhaustive()
    }
}

/// One event ready for the INSERT: validated and converted before any connection is
/// taken, so a refused event never opens a transaction.
struct NewEvent {
    tenant: String,
    actor: String,
    sequence: i64,
    /// The payload as the log keeps it: without cqrs-es's type tag.
    payload: Value,
}

impl NewEvent {
    fn prepare(event: &SerializedEvent) -> Result<Self, EventStoreError> {
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
        })
    }
}

impl PgEventStore {
    /// An event store on `pool` (a database migrated with [`crate::db::migrate`]).
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            noted: None,
            cipher: None,
        }
    }

    /// This store, sealing personal fields as it appends, destroying the keys
    /// that deletes and erasures call for, and opening fields as aggregates
    /// load (CONTRACT.md, "Data protection").
    pub fn with_cipher(mut self, cipher: Arc<FieldCipher>) -> Self {
        self.cipher = Some(cipher);
        self
    }

    /// A handle on the same store that notes the position of every event it
    /// appends in the returned [`LastAppended`]. One per command: the framework
    /// cqrs-es builds per command gets this handle.
    pub fn noting_positions(&self) -> (Self, LastAppended) {
        let noted = LastAppended::default();
        let store = Self {
            pool: self.pool.clone(),
            noted: Some(noted.clone()),
            cipher: self.cipher.clone(),
        };
        (store, noted)
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

    /// The highest position of `tenant`'s events, `None` if it has none: once
    /// a projection's checkpoint is there, it reflects every command of the
    /// tenant recorded so far (an erasure lists a customer's files only then).
    pub async fn tenant_head(&self, tenant: &str) -> Result<Option<i64>, PersistenceError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT max(position) FROM events WHERE tenant = $1",
                &[&tenant],
            )
            .await
            .map_err(|e| database_error("reading a tenant's last position", e))?;
        row.try_get(0)
            .map_err(|e| database_error("reading a tenant's last position", e))
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
        let Some(first) = events.first() else {
            return Ok(Vec::new());
        };
        let mut prepared = events
            .iter()
            .map(NewEvent::prepare)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PersistenceError::UnknownError(Box::new(e)))?;
        if let Some(cipher) = &self.cipher {
            let mut payloads: Vec<NewPayload<'_>> = events
                .iter()
                .zip(prepared.iter_mut())
                .map(|(event, new)| NewPayload {
                    tenant: &new.tenant,
                    aggregate_type: &event.aggregate_type,
                    aggregate_id: &event.aggregate_id,
                    event_type: &event.event_type,
                    payload: &mut new.payload,
                })
                .collect();
            cipher.seal(&mut payloads).await.map_err(personal_error)?;
        }
        // The keys these events destroy, and the same as (kind, id) columns.
        let destroyed: Vec<OwnerId> = events
            .iter()
            .zip(&prepared)
            .filter_map(|(event, new)| {
                FieldCipher::destroyed_by(
                    &event.aggregate_type,
                    &event.aggregate_id,
                    &event.event_type,
                    &new.payload,
                )
            })
            .collect();
        let (destroy_kinds, destroy_ids): (Vec<&'static str>, Vec<String>) =
            destroyed.iter().map(OwnerId::columns).unzip();
        let destroys_in_append =
            !destroy_ids.is_empty() && self.cipher.as_ref().is_some_and(|c| c.keys_beside_log());
        // One array per column, element i being event i.
        let ids: Vec<Uuid> = prepared.iter().map(|_| Uuid::now_v7()).collect();
        let tenants: Vec<&str> = prepared.iter().map(|n| n.tenant.as_str()).collect();
        let aggregate_types: Vec<&str> = events.iter().map(|e| e.aggregate_type.as_str()).collect();
        let aggregate_ids: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
        let sequences: Vec<i64> = prepared.iter().map(|n| n.sequence).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let versions: Vec<&str> = events.iter().map(|e| e.event_version.as_str()).collect();
        let payloads: Vec<&Value> = prepared.iter().map(|n| &n.payload).collect();
        let metadata: Vec<&Value> = events.iter().map(|e| &e.metadata).collect();
        let actors: Vec<&str> = prepared.iter().map(|n| n.actor.as_str()).collect();
        // A command with an idempotency key leaves its receipt in the same
        // statement: the key then has its effect at most once, crashes included.
        let key = first
            .metadata
            .get(META_IDEMPOTENCY_KEY)
            .and_then(Value::as_str);
        let params: [&(dyn ToSql + Sync); 13] = [
            &ids,
            &tenants,
            &aggregate_types,
            &aggregate_ids,
            &sequences,
            &types,
            &versions,
            &payloads,
            &metadata,
            &actors,
            &key,
            &destroy_kinds,
            &destroy_ids,
        ];
        let (sql, params): (&str, &[&(dyn ToSql + Sync)]) = if destroys_in_append {
            (&APPEND_DESTROYING_KEYS, &params)
        } else {
            (APPEND, &params[..11])
        };

        let mut client = self.client().await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| database_error("preparing the append", e))?;
        let rows = match commit_delay {
            None => client.query(&statement, params).await,
            Some(delay) => {
                let tx = client
                    .transaction()
                    .await
                    .map_err(|e| database_error("starting the append transaction", e))?;
                let rows = tx.query(&statement, params).await;
                if rows.is_ok() {
                    tokio::time::sleep(delay).await;
                    tx.commit()
                        .await
                        .map_err(|e| database_error("committing the append", e))?;
                }
                rows
            }
        }
        .map_err(|e| append_error(first, &prepared[0].tenant, key, e));
        // Committed or not, the append's transaction is over: a log reader whose
        // pending watermark waits for it can look again now.
        crate::log::append_ended();
        let rows = rows?;

        let positions = rows
            .iter()
            .map(|row| row.try_get::<_, i64>("position"))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|e| database_error("reading the new positions", e))?;
        if let (Some(noted), Some(last)) = (&self.noted, positions.last()) {
            noted.note(*last);
        }
        if let Some(cipher) = &self.cipher {
            for owner in &destroyed {
                cipher.forget(&prepared[0].tenant, owner);
            }
        }
        if !destroy_ids.is_empty()
            && !destroys_in_append
            && let Some(cipher) = &self.cipher
        {
            // The key table is in a database of its own: destroy right after
            // the commit. Should this fail, the blob worker's purge of the
            // deleted file destroys the file's key again (ADR 0014).
            let owners: Vec<Owner<'_>> = destroyed.iter().map(OwnerId::as_owner).collect();
            if let Err(err) = cipher
                .keys()
                .destroy_now(&prepared[0].tenant, &owners)
                .await
            {
                tracing::error!(%err, "destroying data keys after their events committed failed");
            }
        }
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
        let statement = client
            .prepare_cached(&sql)
            .await
            .map_err(|e| database_error("preparing the aggregate's load", e))?;
        let rows = client
            .query(
                &statement,
                &[&aggregate_type, &aggregate_id, &after_sequence],
            )
            .await
            .map_err(|e| database_error("loading an aggregate's events", e))?;
        drop(client);
        let mut logged = rows
            .iter()
            .map(|row| LoggedEvent::from_row(row).map_err(log_error))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(cipher) = &self.cipher {
            cipher
                .open(&mut logged, Erased::Placeholder)
                .await
                .map_err(|e| personal_error(PersonalError::Keys(e)))?;
        }
        logged.into_iter().map(serialized_event).collect()
    }

    /// Feeds the rows of `sql` (bound to `params`) into a [`ReplayStream`] from a
    /// background task; a failure is sent down the stream as an error, never a panic.
    fn stream(&self, sql: String, params: Vec<String>) -> ReplayStream {
        let (mut feed, stream) = ReplayStream::new(STREAM_CHANNEL_SIZE);
        let pool = self.pool.clone();
        let cipher = self.cipher.clone();
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
                    let event = match LoggedEvent::from_row(&row).map_err(log_error) {
                        Ok(mut logged) => match &cipher {
                            Some(cipher) => cipher
                                .open_one(&mut logged)
                                .await
                                .map_err(|e| personal_error(PersonalError::Keys(e)))
                                .and_then(|()| serialized_event(logged)),
                            None => serialized_event(logged),
                        },
                        Err(err) => Err(err),
                    };
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

fn log_error(error: LogError) -> PersistenceError {
    PersistenceError::DeserializationError(Box::new(EventStoreError::Log(error)))
}

/// A failure of the key table is one of connection (the caller may retry
/// later); an event without an owner is refused.
fn personal_error(error: PersonalError) -> PersistenceError {
    let error = EventStoreError::Personal(error);
    match &error {
        EventStoreError::Personal(PersonalError::Keys(dossier_keys::KeyError::Store(_))) => {
            PersistenceError::ConnectionError(Box::new(error))
        }
        _ => PersistenceError::UnknownError(Box::new(error)),
    }
}

/// Maps an event of the log (selected with `EVENT_COLUMNS`, through the one row
/// mapping of the log, its fields opened) to what cqrs-es wants.
fn serialized_event(event: LoggedEvent) -> Result<SerializedEvent, PersistenceError> {
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

/// Maps an append failure: losing the race for a sequence number is the optimistic
/// lock error cqrs-es expects, a used idempotency key is
/// [`EventStoreError::DuplicateCommand`]; anything else keeps its meaning.
fn append_error(
    first: &SerializedEvent,
    tenant: &str,
    key: Option<&str>,
    error: tokio_postgres::Error,
) -> PersistenceError {
    let constraint = (error.code() == Some(&SqlState::UNIQUE_VIOLATION))
        .then(|| error.as_db_error().and_then(|db| db.constraint()))
        .flatten();
    match (constraint, key) {
        (Some(SEQUENCE_CONSTRAINT), _) => {
            tracing::debug!(
                aggregate_type = %first.aggregate_type,
                aggregate_id = %first.aggregate_id,
                sequence = first.sequence,
                "another writer appended this sequence number first"
            );
            PersistenceError::OptimisticLockError
        }
        (Some(receipts::PRIMARY_KEY), Some(key)) => {
            PersistenceError::UnknownError(Box::new(EventStoreError::DuplicateCommand {
                tenant: tenant.to_owned(),
                key: key.to_owned(),
            }))
        }
        _ => database_error("appending events", error),
    }
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
