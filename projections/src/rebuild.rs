//! Rebuilding a read model from the log while the service keeps running
//! (`dossier projections rebuild`).
//!
//! 1. **Build aside.** A schema `rebuild_<projection>` gets an empty copy of each of
//!    the projection's tables (`LIKE ... INCLUDING ALL`: columns, generated columns,
//!    constraints, indexes), filled from position 0 up to the log's safe watermark at
//!    the start (the *head*). Queries and the live runner go on using the live tables
//!    meanwhile. Two ways to fill them:
//!    - **In bulk**, when the projection has a [`BulkBuild`] (files has): one
//!      `COPY (SELECT ... ORDER BY position) TO STDOUT (FORMAT binary)` streams the
//!      log up to the head, with payloads only for the projection's aggregate types;
//!      the projection folds each event into memory and, every
//!      [`RebuildOptions::bulk_chunk`] events and at the end, flushes the rows with
//!      `COPY ... FROM STDIN`, into tables without their query indexes, which are
//!      built afterwards (`CREATE INDEX CONCURRENTLY`, see `drop_query_indexes`).
//!      One pass over the log, about one row written per row that exists at the end,
//!      no statement per event. A one-by-one build (a statement per event, 500
//!      events per transaction) came to 1 % of the speed of reading the log with
//!      `COPY`; the bulk build reaches 0.4 to 0.7 of it (README, "Performance").
//!    - **One by one** otherwise: the projection's own `apply`, in batches of
//!      `BATCH` events per transaction, with that schema first on the
//!      `search_path`, which is why projections use unqualified table names.
//! 2. **Swap, in one short transaction.** Lock the projection's checkpoint row (waits
//!    for a batch of the live runner in flight, then keeps it out), lock the live
//!    tables, apply the few events that arrived since step 1 to the copies, drop the
//!    live tables, move the copies into their schema, give their indexes the live
//!    names back, set the checkpoint to the copies' position, commit. Readers wait for
//!    the swap's locks for a moment and then see the new tables; the live runner
//!    continues from the new checkpoint.
//!
//! An advisory lock keeps two rebuilds of the same projection apart. A rebuild that
//! fails or is interrupted changes nothing live; its leftover schema is dropped by
//! the next rebuild.

use std::collections::HashMap;
use std::sync::Arc;

use dossier_eventlog::db::Pool;
use dossier_eventlog::follow::checkpoint;
use dossier_eventlog::log::{LogFilter, LogReader, LoggedEvent};
use dossier_eventlog::personal::{self, Erased, FieldCipher, OpenTextsError};
use futures::StreamExt as _;
use tokio_postgres::Transaction;
use tokio_postgres::binary_copy::BinaryCopyOutStream;
use tokio_postgres::types::{FromSql, Type};

use crate::error::ProjectionError;
use crate::projection::{
    ApplyTx, BulkBuild, BulkTarget, Projection, RawEvent, quote_identifier as quote, validate,
};

/// Events per transaction while building aside one by one, and per read while
/// catching up in the swap.
const BATCH: i64 = 500;

/// Events between two progress reports of a bulk build.
const PROGRESS_EVERY: u64 = 1 << 16;

/// First key of the rebuild advisory locks ("rebuild" in ASCII); the second is a hash
/// of the projection's name.
const REBUILD_LOCK_CLASS: i32 = 0x7265_6275;

/// What a rebuild did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    /// Events read from the log and offered to the projection.
    pub events: u64,
    /// The checkpoint the rebuilt tables were swapped in with.
    pub position: i64,
}

/// How far a rebuild has got, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildProgress {
    /// Events read from the log so far.
    pub events: u64,
    /// The log position the copies have reached.
    pub position: i64,
    /// The end of the log when the rebuild started (a few events more may come
    /// in before the swap).
    pub head: i64,
}

/// How a rebuild builds aside. The default is what `dossier projections rebuild`
/// does, given the deployment's keys ([`RebuildOptions::opening_with`]).
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Use the projection's [`BulkBuild`] when it has one (the default). `false`
    /// applies every event one by one, as the runner does: the reference a bulk
    /// build is tested against.
    pub bulk: bool,
    /// Events of its aggregates a bulk build folds into memory before it flushes
    /// them to the tables aside (default 1,000,000). The memory of a bulk build grows
    /// with this, not with the log. For the files projection an event takes about 64
    /// bytes and an upload about 500 more (its row): some 200 MB at the default for a
    /// log like the benchmark's (a quarter of the events uploads), at most about
    /// 550 MB. Each chunk after the first costs a primary-key lookup per file it
    /// touches; halving the default made the benchmark's rebuild about a tenth slower.
    pub bulk_chunk: u64,
    /// Opens the personal fields of the log before the projection sees them.
    /// Without it a rebuild of a log with sealed fields fails (it never writes
    /// ciphertext into a read model).
    pub cipher: Option<Arc<FieldCipher>>,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self {
            bulk: true,
            bulk_chunk: 1_000_000,
            cipher: None,
        }
    }
}

impl RebuildOptions {
    /// These options, opening personal fields with `cipher`.
    pub fn opening_with(mut self, cipher: Arc<FieldCipher>) -> Self {
        self.cipher = Some(cipher);
        self
    }
}

/// Events a bulk build opens together: one look-up of their keys.
const OPEN_CHUNK: usize = 4096;

/// Opens `events` with `cipher`, or, without one, refuses sealed fields.
async fn open_batch(
    cipher: Option<&FieldCipher>,
    events: &mut [LoggedEvent],
) -> Result<(), ProjectionError> {
    match cipher {
        Some(cipher) => Ok(cipher.open(events, Erased::Placeholder).await?),
        None => match events
            .iter()
            .find(|event| personal::has_sealed_fields(event))
        {
            Some(event) => Err(ProjectionError::SealedWithoutKeys {
                position: event.position,
            }),
            None => Ok(()),
        },
    }
}

/// Rebuilds `projection`'s tables from the whole log and swaps them in (see the
/// module docs). Safe while runners and queries are running.
pub async fn rebuild<P: Projection>(
    pool: &Pool,
    projection: &P,
) -> Result<RebuildReport, ProjectionError> {
    rebuild_with_progress(pool, projection, &|_| {}).await
}

/// [`rebuild()`], telling `progress` as the build aside goes on (for
/// `dossier projections rebuild`'s progress bar).
pub async fn rebuild_with_progress<P: Projection>(
    pool: &Pool,
    projection: &P,
    progress: &(dyn Fn(RebuildProgress) + Send + Sync),
) -> Result<RebuildReport, ProjectionError> {
    rebuild_with_options(pool, projection, RebuildOptions::default(), progress).await
}

/// [`rebuild_with_progress`] with the build aside chosen by `options`.
#[tracing::instrument(skip_all, fields(projection = projection.name()))]
pub async fn rebuild_with_options<P: Projection>(
    pool: &Pool,
    projection: &P,
    options: RebuildOptions,
    progress: &(dyn Fn(RebuildProgress) + Send + Sync),
) -> Result<RebuildReport, ProjectionError> {
    validate(projection)?;
    let name = projection.name();

    // A session-level advisory lock on a connection of its own, held for the whole
    // rebuild; it dies with the session if this process does.
    let lock_client = pool.get().await?;
    let locked: bool = lock_client
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2))",
            &[&REBUILD_LOCK_CLASS, &name],
        )
        .await?
        .try_get(0)?;
    if !locked {
        return Err(ProjectionError::RebuildInProgress(name));
    }

    let result = build_and_swap(pool, projection, options, progress).await;

    let unlocked = lock_client
        .query_one(
            "SELECT pg_advisory_unlock($1, hashtext($2))",
            &[&REBUILD_LOCK_CLASS, &name],
        )
        .await;
    if !matches!(
        unlocked.as_ref().map(|row| row.try_get::<_, bool>(0)),
        Ok(Ok(true))
    ) {
        // Closing the session is the other way to let go of the lock: take the
        // connection out of the pool and drop it.
        drop(deadpool_postgres::Client::take(lock_client));
    }

    match &result {
        Ok(report) => tracing::info!(
            projection = name,
            events = report.events,
            position = report.position,
            "rebuilt the read model from the log and swapped it in"
        ),
        Err(error) => tracing::error!(
            projection = name,
            error = %error,
            "rebuild failed; the live read model is unchanged"
        ),
    }
    result
}

async fn build_and_swap<P: Projection>(
    pool: &Pool,
    projection: &P,
    options: RebuildOptions,
    progress: &(dyn Fn(RebuildProgress) + Send + Sync),
) -> Result<RebuildReport, ProjectionError> {
    let name = projection.name();
    let tables = projection.tables();
    let mut client = pool.get().await?;

    // Where the migrations put the live tables (the first schema on the search path).
    let live: String = client
        .query_one("SELECT current_schema()", &[])
        .await?
        .try_get(0)?;
    let live = quote(&live);
    let target = BulkTarget::new(format!("rebuild_{name}"));
    let shadow = quote(&format!("rebuild_{name}"));
    let search_path = format!("SET LOCAL search_path TO {shadow}, {live}");

    let mut ddl = format!("DROP SCHEMA IF EXISTS {shadow} CASCADE; CREATE SCHEMA {shadow};");
    for table in tables {
        let table = quote(table);
        ddl.push_str(&format!(
            " CREATE TABLE {shadow}.{table} (LIKE {live}.{table} INCLUDING ALL);"
        ));
    }
    client.batch_execute(&ddl).await?;

    let result = async {
        // 1. Build aside, from the start of the log.
        let mut reader = LogReader::new(pool.clone());
        let head = reader.safe_position().await?;
        let mut position = 0;
        let mut events = 0u64;
        progress(RebuildProgress {
            events,
            position,
            head,
        });
        let bulk = if options.bulk {
            projection.bulk_build()
        } else {
            None
        };
        if let Some(mut bulk) = bulk {
            let shadow_tables: Vec<String> =
                tables.iter().map(|table| target.table(table)).collect();
            let query_indexes = drop_query_indexes(&client, &shadow_tables).await?;
            events = build_in_bulk(
                pool,
                &mut client,
                &mut bulk,
                &target,
                head,
                &options,
                progress,
            )
            .await?;
            position = head;
            for definition in &query_indexes {
                client.batch_execute(definition).await?;
            }
        } else {
            loop {
                let mut batch = reader.read(position, BATCH, &LogFilter::default()).await?;
                let Some(last) = batch.last().map(|event| event.position) else {
                    break;
                };
                open_batch(options.cipher.as_deref(), &mut batch).await?;
                let tx = client.transaction().await?;
                tx.batch_execute(&search_path).await?;
                // Unprepared: the tables aside, by the search_path (see ApplyTx).
                let aside = ApplyTx::unprepared(&tx);
                for event in &batch {
                    projection.apply(&aside, event).await?;
                }
                drop(aside);
                tx.commit().await?;
                position = last;
                events += batch.len() as u64;
                progress(RebuildProgress {
                    events,
                    position,
                    head,
                });
                if (batch.len() as i64) < BATCH {
                    break;
                }
            }
        }
        // Fresh statistics before the tables serve queries.
        let analyze = tables
            .iter()
            .map(|table| format!("ANALYZE {shadow}.{};", quote(table)))
            .collect::<String>();
        client.batch_execute(&analyze).await?;

        // 2. Swap.
        let tx = client.transaction().await?;
        checkpoint::lock(&tx, name).await?;
        tx.batch_execute(&search_path).await?;
        let live_tables = tables
            .iter()
            .map(|table| format!("{live}.{}", quote(table)))
            .collect::<Vec<_>>()
            .join(", ");
        tx.batch_execute(&format!(
            "LOCK TABLE {live_tables} IN ACCESS EXCLUSIVE MODE"
        ))
        .await?;
        loop {
            let mut batch = reader.read(position, BATCH, &LogFilter::default()).await?;
            let Some(last) = batch.last().map(|event| event.position) else {
                break;
            };
            open_batch(options.cipher.as_deref(), &mut batch).await?;
            let aside = ApplyTx::unprepared(&tx);
            for event in &batch {
                projection.apply(&aside, event).await?;
            }
            position = last;
            events += batch.len() as u64;
        }
        let mut index_names = HashMap::new();
        for table in tables {
            index_names.extend(indexes(&tx, &format!("{live}.{}", quote(table))).await?);
        }
        let mut swap = String::new();
        for table in tables {
            let table = quote(table);
            swap.push_str(&format!(
                "DROP TABLE {live}.{table}; ALTER TABLE {shadow}.{table} SET SCHEMA {live};"
            ));
        }
        tx.batch_execute(&swap).await?;
        // The copies' indexes got generated names; give them the live ones back, so
        // that a rebuilt database looks like a migrated one.
        for table in tables {
            for (definition, generated) in indexes(&tx, &format!("{live}.{}", quote(table))).await?
            {
                if let Some(original) = index_names.get(&definition)
                    && *original != generated
                {
                    tx.batch_execute(&format!(
                        "ALTER INDEX {live}.{} RENAME TO {}",
                        quote(&generated),
                        quote(original)
                    ))
                    .await?;
                }
            }
        }
        checkpoint::store(&tx, name, position).await?;
        tx.batch_execute(&format!("DROP SCHEMA {shadow}")).await?;
        tx.commit().await?;
        Ok(RebuildReport { events, position })
    }
    .await;

    if result.is_err() {
        // Best effort: the next rebuild drops it anyway.
        if let Err(error) = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {shadow} CASCADE"))
            .await
        {
            tracing::debug!(error = %error, "could not drop the rebuild schema after a failure");
        }
    }
    result
}

/// The indexes of `table` (a quoted, qualified name) as `(definition without the
/// index name, index name)`. Two tables with the same definitions have the same
/// indexes, whatever they are called.
async fn indexes(
    tx: &Transaction<'_>,
    table: &str,
) -> Result<Vec<(String, String)>, ProjectionError> {
    let rows = tx
        .query(
            "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = to_regclass($1)",
            &[&table],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let name: String = row.try_get(0)?;
            let definition: String = row.try_get(1)?;
            // "CREATE [UNIQUE] INDEX <name> ON <table> USING ...": all but the name.
            let unique = definition.starts_with("CREATE UNIQUE");
            let shape = match definition.split_once(" ON ") {
                Some((_, rest)) => format!("unique={unique} {rest}"),
                None => definition.clone(),
            };
            Ok((shape, name))
        })
        .collect()
}

/// Drops the indexes of `tables` (quoted, qualified) that serve only queries (not
/// unique, not a constraint's), and answers the statements that build them again,
/// `CONCURRENTLY`, for after a bulk build.
///
/// Building an index once over the finished table sorts its keys a single time;
/// keeping it up to date through the `COPY` inserts each key on its own, into pages
/// all over the index. Measured for the 250,000 rows of the benchmark: the `COPY`
/// into `files` took 2.4 to 3.5 s with the list index, 0.9 to 1.3 s without it, and
/// building it afterwards 0.5 to 0.9 s. `CONCURRENTLY` because a plain `CREATE INDEX` holds a
/// transaction id from start to end, and any open transaction id holds back the safe
/// watermark of every log follower (`dossier_eventlog::log`): the live projections
/// would stop for as long as the index takes. A concurrent build takes none while it
/// scans and sorts. Unique indexes and those of constraints stay: they can decide
/// what a statement does (`ON CONFLICT`), and the primary key serves the lookups of
/// later chunks. The swap finds the indexes again by their definitions, which come
/// back unchanged (`pg_get_indexdef`), names included. (A concurrent build waits for
/// transactions in this database with older snapshots, e.g. a `dossier replay`
/// streaming the log: the rebuild then takes longer, nothing else.)
async fn drop_query_indexes(
    client: &tokio_postgres::Client,
    tables: &[String],
) -> Result<Vec<String>, ProjectionError> {
    let mut definitions = Vec::new();
    for table in tables {
        let rows = client
            .query(
                "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) \
                 FROM pg_index i \
                 WHERE i.indrelid = to_regclass($1) AND NOT i.indisunique \
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid) \
                 ORDER BY 1",
                &[table],
            )
            .await?;
        for row in rows {
            let index: String = row.try_get(0)?;
            let definition: String = row.try_get(1)?;
            let Some(rest) = definition.strip_prefix("CREATE INDEX ") else {
                return Err(ProjectionError::InvalidDefinition(format!(
                    "index {index} has an unexpected definition: {definition}"
                )));
            };
            client.batch_execute(&format!("DROP INDEX {index}")).await?;
            definitions.push(format!("CREATE INDEX CONCURRENTLY {rest}"));
        }
    }
    Ok(definitions)
}

/// The build aside with a [`BulkBuild`]: streams the log up to `head` with one
/// `COPY ... TO STDOUT (FORMAT binary)` on a connection of its own, folds the events of
/// the build's aggregate types, flushes through `client` every `chunk` of them and at
/// the end. Answers how many events it read (of every type).
///
/// Binary `COPY` because it is the cheapest way out of Postgres for a million rows:
/// no row description, no text escapes, one message per row, and the client parses
/// only lengths; the payload arrives as the JSON text the `jsonb` holds, and the
/// projection decodes it straight into its domain event, never into a
/// [`dossier_eventlog::log::LoggedEvent`]. Events of other aggregates come without
/// their payload (`CASE`), so they cost a few bytes each and are still counted.
async fn build_in_bulk<B: BulkBuild>(
    pool: &Pool,
    client: &mut tokio_postgres::Client,
    bulk: &mut B,
    target: &BulkTarget,
    head: i64,
    options: &RebuildOptions,
    progress: &(dyn Fn(RebuildProgress) + Send + Sync),
) -> Result<u64, ProjectionError> {
    let chunk = options.bulk_chunk;
    let cipher = &options.cipher;
    const COLUMNS: [Type; 7] = [
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::JSONB,
    ];
    let aggregate_types = bulk
        .aggregate_types()
        .iter()
        .map(|t| format!("'{}'", t.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(", ");
    // COPY takes no parameters: `head` is a number, the types are code constants.
    let sql = format!(
        "COPY (SELECT position, tenant, aggregate_type, aggregate_id, event_type, \
                      event_version, \
                      CASE WHEN aggregate_type = ANY (ARRAY[{aggregate_types}]::text[]) \
                           THEN payload END \
               FROM events WHERE position <= {head} ORDER BY position) \
         TO STDOUT (FORMAT binary)"
    );
    let reader = pool.get().await?;
    let result = async {
        let mut rows = std::pin::pin!(BinaryCopyOutStream::new(
            reader.copy_out(&sql).await?,
            &COLUMNS
        ));
        let mut events = 0u64;
        let mut folded = 0u64;
        // Events with sealed fields wait here until a chunk of them can be
        // opened with one look-up of their keys; the events after the first
        // of them wait too, so that the fold still sees log order. A full
        // chunk is opened on a task of its own while the next one is read
        // (the other core: opening is AES-GCM and base64 over every sealed
        // field), and folded before anything after it.
        let mut waiting = Chunk::default();
        let mut opening: Option<Opening> = None;
        while let Some(row) = rows.next().await {
            let row = row?;
            let position: i64 = row.try_get(0)?;
            events += 1;
            if let Some(JsonText(payload)) = row.try_get(6)? {
                let raw = RawEvent {
                    position,
                    tenant: row.try_get(1)?,
                    aggregate_type: row.try_get(2)?,
                    aggregate_id: row.try_get(3)?,
                    event_type: row.try_get(4)?,
                    event_version: row.try_get(5)?,
                    payload,
                };
                if waiting.is_empty()
                    && opening.is_none()
                    && !personal::may_hold_sealed_fields(payload)
                {
                    bulk.fold(&raw)?;
                } else {
                    waiting.push(&raw);
                    if waiting.len() >= OPEN_CHUNK {
                        if let Some(previous) = opening.take() {
                            fold_chunk(bulk, previous.opened().await?)?;
                        }
                        opening = Some(Opening::start(cipher, std::mem::take(&mut waiting)));
                    }
                }
                folded += 1;
                if folded.is_multiple_of(chunk.max(1)) {
                    fold_waiting(bulk, cipher, &mut opening, &mut waiting).await?;
                    bulk.flush(client, target).await?;
                }
            }
            if events.is_multiple_of(PROGRESS_EVERY) {
                progress(RebuildProgress {
                    events,
                    position,
                    head,
                });
            }
        }
        fold_waiting(bulk, cipher, &mut opening, &mut waiting).await?;
        bulk.flush(client, target).await?;
        progress(RebuildProgress {
            events,
            position: head,
            head,
        });
        Ok(events)
    }
    .await;
    if result.is_err() {
        // The COPY may still be streaming: close the connection instead of handing it
        // back to the pool to drain the rest.
        drop(deadpool_postgres::Client::take(reader));
    }
    result
}

/// A bulk read's event, owned, waiting for its keys.
struct Waiting {
    position: i64,
    tenant: String,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    event_version: String,
}

/// Events waiting for their keys, in log order, and their payloads (the JSON
/// text [`FieldCipher::open_texts`] opens in place).
#[derive(Default)]
struct Chunk {
    events: Vec<Waiting>,
    payloads: Vec<String>,
}

impl Chunk {
    fn push(&mut self, raw: &RawEvent<'_>) {
        self.events.push(Waiting {
            position: raw.position,
            tenant: raw.tenant.to_owned(),
            aggregate_type: raw.aggregate_type.to_owned(),
            aggregate_id: raw.aggregate_id.to_owned(),
            event_type: raw.event_type.to_owned(),
            event_version: raw.event_version.to_owned(),
        });
        self.payloads.push(raw.payload.to_owned());
    }

    fn len(&self) -> usize {
        self.events.len()
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Opens the payloads with one look-up of their keys. Without a cipher,
    /// a sealed field is refused.
    async fn open(mut self, cipher: Option<&FieldCipher>) -> Result<Self, ProjectionError> {
        personal::open_texts(cipher, &mut self.payloads)
            .await
            .map_err(|error| match error {
                OpenTextsError::Keys(error) => ProjectionError::Keys(error),
                OpenTextsError::SealedWithoutKeys { index } => ProjectionError::SealedWithoutKeys {
                    position: self.events[index].position,
                },
            })?;
        Ok(self)
    }
}

/// A chunk being opened on a task of its own.
struct Opening(tokio::task::JoinHandle<Result<Chunk, ProjectionError>>);

impl Opening {
    fn start(cipher: &Option<Arc<FieldCipher>>, chunk: Chunk) -> Self {
        let cipher = cipher.clone();
        Self(tokio::spawn(
            async move { chunk.open(cipher.as_deref()).await },
        ))
    }

    /// The chunk, opened. A panic of the task is this rebuild's, as if it had
    /// opened the chunk itself.
    async fn opened(self) -> Result<Chunk, ProjectionError> {
        match self.0.await {
            Ok(opened) => opened,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => Err(ProjectionError::Interrupted(format!(
                "opening sealed fields: {error}"
            ))),
        }
    }
}

/// Folds `chunk`'s opened events, in log order.
fn fold_chunk<B: BulkBuild>(bulk: &mut B, chunk: Chunk) -> Result<(), ProjectionError> {
    for (event, payload) in chunk.events.iter().zip(&chunk.payloads) {
        bulk.fold(&RawEvent {
            position: event.position,
            tenant: &event.tenant,
            aggregate_type: &event.aggregate_type,
            aggregate_id: &event.aggregate_id,
            event_type: &event.event_type,
            event_version: &event.event_version,
            payload,
        })?;
    }
    Ok(())
}

/// Folds every event still waiting: the chunk being opened first, then the
/// ones after it (opened here).
async fn fold_waiting<B: BulkBuild>(
    bulk: &mut B,
    cipher: &Option<Arc<FieldCipher>>,
    opening: &mut Option<Opening>,
    waiting: &mut Chunk,
) -> Result<(), ProjectionError> {
    if let Some(previous) = opening.take() {
        fold_chunk(bulk, previous.opened().await?)?;
    }
    if !waiting.is_empty() {
        let chunk = std::mem::take(waiting).open(cipher.as_deref()).await?;
        fold_chunk(bulk, chunk)?;
    }
    Ok(())
}

/// The text of a `json` or `jsonb` value, borrowed from the row (`jsonb`'s binary
/// form is a version byte, 1, and the text).
struct JsonText<'a>(&'a str);

impl<'a> FromSql<'a> for JsonText<'a> {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let text = if *ty == Type::JSONB {
            match raw.split_first() {
                Some((1, text)) => text,
                _ => return Err("unsupported jsonb binary format version".into()),
            }
        } else {
            raw
        };
        Ok(Self(std::str::from_utf8(text)?))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSON | Type::JSONB)
    }
}
