//! A projection's checkpoint: the position of the last log event whose effect is in
//! its tables, kept in the `checkpoints` table (migration 0001) under the
//! projection's name.
//!
//! The checkpoint row doubles as the projection's write lock: every batch (and the
//! swap of a rebuild) first locks it with `SELECT ... FOR UPDATE`, so two runners in
//! two processes, or a runner and a rebuild, never apply the same events on top of
//! each other. They take turns, and the one that comes second sees where the first
//! one got to.

use dossier_eventlog::db::Pool;
use tokio_postgres::Transaction;
use tokio_postgres::types::Type;

use crate::error::ProjectionError;

/// The checkpoint of `name`, or `None` if that projection has never run.
pub async fn read(pool: &Pool, name: &str) -> Result<Option<i64>, ProjectionError> {
    let client = pool.get().await?;
    let statement = client
        .prepare_cached("SELECT position FROM checkpoints WHERE name = $1")
        .await?;
    let row = client.query_opt(&statement, &[&name]).await?;
    Ok(row.map(|row| row.try_get(0)).transpose()?)
}

/// Locks the checkpoint row of `name` until `tx` ends (creating it at 0 first if
/// needed) and returns its position.
pub async fn lock(tx: &Transaction<'_>, name: &str) -> Result<i64, ProjectionError> {
    create_missing(tx, &[name]).await?;
    Ok(lock_all(tx, &[name]).await?[0].unwrap_or(0))
}

/// Moves the checkpoint of `name` to `position`, in `tx` (which holds its lock).
pub async fn store(tx: &Transaction<'_>, name: &str, position: i64) -> Result<(), ProjectionError> {
    store_all(tx, &[name], &[position]).await
}

// The batch forms below serve a runner of several projections (and the single
// forms above): one round trip each (`*_typed`: parse, bind and execute travel
// together), whatever the count.

/// Creates the checkpoint rows of `names` that do not exist yet, at 0.
pub async fn create_missing(tx: &Transaction<'_>, names: &[&str]) -> Result<(), ProjectionError> {
    tx.execute_typed(
        "INSERT INTO checkpoints (name, position) SELECT unnest($1::text[]), 0 \
         ON CONFLICT (name) DO NOTHING",
        &[(&names, Type::TEXT_ARRAY)],
    )
    .await?;
    Ok(())
}

/// Locks the checkpoint rows of `names` until `tx` ends, in one statement (in name
/// order, the same order for every locker), and returns their positions in the
/// order of `names`; `None` for a row that does not exist.
pub async fn lock_all(
    tx: &Transaction<'_>,
    names: &[&str],
) -> Result<Vec<Option<i64>>, ProjectionError> {
    let rows = tx
        .query_typed(
            "SELECT name, position FROM checkpoints WHERE name = ANY($1) \
             ORDER BY name FOR UPDATE",
            &[(&names, Type::TEXT_ARRAY)],
        )
        .await?;
    let mut positions = vec![None; names.len()];
    for row in rows {
        let name: &str = row.try_get(0)?;
        if let Some(i) = names.iter().position(|n| *n == name) {
            positions[i] = Some(row.try_get(1)?);
        }
    }
    Ok(positions)
}

/// Moves the checkpoint of `names[i]` to `positions[i]` for every `i`, in `tx`
/// (which holds their locks), in one statement.
pub async fn store_all(
    tx: &Transaction<'_>,
    names: &[&str],
    positions: &[i64],
) -> Result<(), ProjectionError> {
    tx.execute_typed(
        "UPDATE checkpoints AS c SET position = v.position, updated_at = now() \
         FROM unnest($1::text[], $2::bigint[]) AS v(name, position) WHERE c.name = v.name",
        &[(&names, Type::TEXT_ARRAY), (&positions, Type::INT8_ARRAY)],
    )
    .await?;
    Ok(())
}
