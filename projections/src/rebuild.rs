//! Rebuilding a read model from the log while the service keeps running
//! (`dossier projections rebuild`).
//!
//! 1. **Build aside.** A schema `rebuild_<projection>` gets an empty copy of each of
//!    the projection's tables (`LIKE ... INCLUDING ALL`: columns, generated columns,
//!    constraints, indexes). The projection's own `apply` fills them from position 0,
//!    in batches, with that schema first on the `search_path`, which is why projections
//!    use unqualified table names. Queries and the live runner go on using the live
//!    tables meanwhile.
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

use dossier_platform::db::Pool;
use dossier_platform::log::{LogFilter, LogReader};
use tokio_postgres::Transaction;

use crate::checkpoint;
use crate::error::ProjectionError;
use crate::projection::{Projection, validate};

/// Events per transaction while building aside.
const BATCH: i64 = 500;

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

/// Rebuilds `projection`'s tables from the whole log and swaps them in (see the
/// module docs). Safe while runners and queries are running.
pub async fn rebuild<P: Projection>(
    pool: &Pool,
    projection: &P,
) -> Result<RebuildReport, ProjectionError> {
    rebuild_with_progress(pool, projection, &|_| {}).await
}

/// [`rebuild()`], telling `progress` after every batch built aside (for
/// `dossier projections rebuild`'s progress bar).
#[tracing::instrument(skip_all, fields(projection = projection.name()))]
pub async fn rebuild_with_progress<P: Projection>(
    pool: &Pool,
    projection: &P,
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

    let result = build_and_swap(pool, projection, progress).await;

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
        loop {
            let batch = reader.read(position, BATCH, &LogFilter::default()).await?;
            let Some(last) = batch.last().map(|event| event.position) else {
                break;
            };
            let tx = client.transaction().await?;
            tx.batch_execute(&search_path).await?;
            for event in &batch {
                projection.apply(&tx, event).await?;
            }
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
            let batch = reader.read(position, BATCH, &LogFilter::default()).await?;
            let Some(last) = batch.last().map(|event| event.position) else {
                break;
            };
            for event in &batch {
                projection.apply(&tx, event).await?;
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

/// Quotes an SQL identifier. The names come from code constants and the catalog,
/// never from users; quoting keeps odd but legal schema names working.
fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}
