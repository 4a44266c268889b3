//! Checkpoints: the position of the last log event a follower is done with,
//! kept in the `checkpoints` table (migration 0001), one row per follower name
//! (each read model, `relay`, `sealer`).
//!
//! The one place that reads, locks and moves a checkpoint. The row doubles as
//! the follower's turn: whoever moves a checkpoint first holds its turn for the
//! whole batch, so two instances of one follower (two processes, or a runner and
//! a rebuild) never apply the same events on top of each other. They take turns,
//! and the one that comes second sees where the first one got to. How the turn
//! is held depends on where the follower's effects go ([`Effects`]):
//!
//! - [`Effects::InTransaction`]: the rows are locked `FOR UPDATE` ([`lock_all`]);
//!   the effects and the new checkpoint commit together, which makes every event
//!   take effect exactly once. A rebuild takes the same row lock to swap its
//!   tables in.
//! - [`Effects::External`]: a transaction-level advisory lock per name
//!   ([`take_turns`]), and the rows are read without a row lock. A row lock
//!   would give the transaction an xid for as long as the external effect runs
//!   (a broker publish awaiting its confirms, seconds when the broker is slow),
//!   and an open xid holds back the log's safe watermark for every follower
//!   (`crate::log`). An advisory lock gives none; only the final `UPDATE`
//!   does, just before the commit.
//!
//! Either way the lock ends with the transaction, also when the process dies
//! (its connection closes), so another instance takes over from the committed
//! checkpoint.

use std::future::Future;

use futures::TryStreamExt as _;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, Transaction};

use super::{Effects, FollowError};
use crate::db::Pool;

/// First key of the advisory locks of [`Effects::External`] followers ("turn"
/// in ASCII); the second is a hash of the checkpoint's name.
const TURN_LOCK_CLASS: i32 = 0x7475_726e;

/// The checkpoint of `name`, or `None` if that follower has never run.
pub async fn read(pool: &Pool, name: &str) -> Result<Option<i64>, FollowError> {
    let client = pool.get().await?;
    let statement = client
        .prepare_cached("SELECT position FROM checkpoints WHERE name = $1")
        .await?;
    let row = client.query_opt(&statement, &[&name]).await?;
    Ok(row.map(|row| row.try_get(0)).transpose()?)
}

/// Locks the checkpoint row of `name` until `tx` ends (creating it at 0 first if
/// needed) and returns its position.
pub async fn lock(tx: &impl CheckpointTx, name: &str) -> Result<i64, tokio_postgres::Error> {
    create_missing(tx, &[name]).await?;
    Ok(lock_all(tx, &[name]).await?[0].unwrap_or(0))
}

/// Moves the checkpoint of `name` to `position`, in `tx` (which holds its lock).
pub async fn store(
    tx: &impl CheckpointTx,
    name: &str,
    position: i64,
) -> Result<(), tokio_postgres::Error> {
    store_all(tx, &[name], &[position]).await
}

// The batch forms below serve a runner of several read models (and the single
// forms above): one statement each, whatever the count.

/// A transaction the checkpoint statements run in. A pooled connection's
/// ([`deadpool_postgres::Transaction`], every runner step) prepares each
/// statement once per connection and then only binds and executes it: a
/// runner sends the same two every batch, and parsing and planning them each
/// time was Postgres work per batch and follower. Any other transaction sends
/// them unprepared (parse, bind and execute together). One round trip either
/// way, once prepared.
pub trait CheckpointTx: Sync {
    /// Runs `sql` with typed parameters; its rows.
    fn rows(
        &self,
        sql: &'static str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send;
}

impl CheckpointTx for Transaction<'_> {
    async fn rows(
        &self,
        sql: &'static str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        self.query_typed(sql, params).await
    }
}

impl CheckpointTx for deadpool_postgres::Transaction<'_> {
    async fn rows(
        &self,
        sql: &'static str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let types: Vec<Type> = params.iter().map(|(_, ty)| ty.clone()).collect();
        let statement = self.prepare_typed_cached(sql, &types).await?;
        self.query_raw(&statement, params.iter().map(|(value, _)| *value))
            .await?
            .try_collect()
            .await
    }
}

/// Creates the checkpoint rows of `names` that do not exist yet, at 0.
pub async fn create_missing(
    tx: &impl CheckpointTx,
    names: &[&str],
) -> Result<(), tokio_postgres::Error> {
    tx.rows(
        "INSERT INTO checkpoints (name, position) SELECT unnest($1::text[]), 0 \
         ON CONFLICT (name) DO NOTHING",
        &[(&names, Type::TEXT_ARRAY)],
    )
    .await?;
    Ok(())
}

/// Takes the turn of `names` for a follower whose effects go where `effects`
/// says (see the module docs) until `tx` ends, and returns their positions in
/// the order of `names`; `None` for a row that does not exist.
pub async fn take_turns(
    tx: &impl CheckpointTx,
    names: &[&str],
    effects: Effects,
) -> Result<Vec<Option<i64>>, tokio_postgres::Error> {
    match effects {
        Effects::InTransaction => lock_all(tx, names).await,
        Effects::External => {
            // In name order, the same order for every locker, in one statement.
            tx.rows(
                "SELECT count(pg_advisory_xact_lock($1, hashtext(name))) \
                 FROM (SELECT name FROM unnest($2::text[]) AS n(name) ORDER BY name) AS ordered",
                &[(&TURN_LOCK_CLASS, Type::INT4), (&names, Type::TEXT_ARRAY)],
            )
            .await?;
            let rows = tx
                .rows(
                    "SELECT name, position FROM checkpoints WHERE name = ANY($1)",
                    &[(&names, Type::TEXT_ARRAY)],
                )
                .await?;
            positions_by_name(names, &rows)
        }
    }
}

/// Locks the checkpoint rows of `names` until `tx` ends, in one statement (in name
/// order, the same order for every locker), and returns their positions in the
/// order of `names`; `None` for a row that does not exist.
pub async fn lock_all(
    tx: &impl CheckpointTx,
    names: &[&str],
) -> Result<Vec<Option<i64>>, tokio_postgres::Error> {
    let rows = tx
        .rows(
            "SELECT name, position FROM checkpoints WHERE name = ANY($1) \
             ORDER BY name FOR UPDATE",
            &[(&names, Type::TEXT_ARRAY)],
        )
        .await?;
    positions_by_name(names, &rows)
}

fn positions_by_name(
    names: &[&str],
    rows: &[tokio_postgres::Row],
) -> Result<Vec<Option<i64>>, tokio_postgres::Error> {
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
/// (which holds their turn), in one statement.
pub async fn store_all(
    tx: &impl CheckpointTx,
    names: &[&str],
    positions: &[i64],
) -> Result<(), tokio_postgres::Error> {
    tx.rows(
        "UPDATE checkpoints AS c SET position = v.position, updated_at = now() \
         FROM unnest($1::text[], $2::bigint[]) AS v(name, position) WHERE c.name = v.name",
        &[(&names, Type::TEXT_ARRAY), (&positions, Type::INT8_ARRAY)],
    )
    .await?;
    Ok(())
}
