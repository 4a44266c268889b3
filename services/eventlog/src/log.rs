//! Reading the event log in position order without ever skipping an event that
//! commits late.
//!
//! Every follower of the log (projectors, the outbox relay, `dossier replay`,
//! `GET /v1/events`) reads through [`LogReader`]: "the events after position N, in
//! position order". The hard part is the word *after*.
//!
//! # Why `position > checkpoint` is not enough
//!
//! A position is drawn from `events_position_seq` when a row is inserted, but the row
//! becomes visible only when its transaction commits. Transaction A can draw 41,
//! transaction B draw 42 and commit first; a reader that sees 42, moves its
//! checkpoint to 42 and later asks for `position > 42` never sees 41.
//!
//! Filtering on transaction ids (`txid < pg_snapshot_xmin(pg_current_snapshot())`)
//! does not fix it either: xids and positions are drawn at different moments, so a
//! transaction with a smaller xid can hold a larger position than one with a larger
//! xid, and position order over the rows that pass the filter still has holes that
//! fill in later.
//!
//! # The safe watermark
//!
//! Every appender takes its transaction id *before* it draws a position: the
//! table's insert trigger calls `pg_current_xact_id()` and only then `nextval()`,
//! for the event store's one-statement append and for any other writer alike. The
//! reader then:
//!
//! 1. reads `L`, the last position the sequence has handed out;
//! 2. in a later statement, takes a fresh transaction id `X` of its own
//!    (`pg_current_xact_id()` in a statement of its own, committed at once). Xids are
//!    handed out in increasing order, and every transaction that drew a position `<= L`
//!    did so before step 1, after taking its xid; so each of them has an xid `< X`;
//! 3. once a later statement's snapshot has `pg_snapshot_xmin(..) >= X`, no
//!    transaction with an xid below `X` is still running: each one has committed or
//!    aborted, so the set of rows with position `<= L` is final. `L` becomes the safe
//!    watermark; rows up to it are read in position order and nothing can appear
//!    below it later (positions of aborted transactions stay gaps, which is fine).
//!
//! Step 2 deliberately does not use `pg_snapshot_xmax(pg_current_snapshot())`:
//! PostgreSQL computes a snapshot's xmax as "latest completed xid + 1", not as the
//! next xid to be assigned, so a transaction that is still running with an xid above
//! every completed one is neither below xmax nor in the snapshot's in-progress list,
//! and `xmin >= xmax` can hold while it has not committed. (Seen on PostgreSQL 15: a
//! snapshot `727:727:` taken while xid 727 was open.) Taking an xid costs one xid and
//! a small commit record per new candidate, only when the log has grown.
//!
//! Snapshots span the whole server, so step 3 would also wait for write transactions
//! in *other* databases; when xmin alone is not enough, the reader ignores running
//! xids that `pg_stat_activity` proves belong to sessions of another database (see
//! `xid_horizon_passed`). It never ignores one it cannot place.
//!
//! A candidate `(L, X)` is kept until it settles, and only then replaced by a newer
//! one; under constant load the watermark therefore advances steadily instead of
//! chasing the newest xid. A write transaction in this database that stays open
//! (an appender or anything else) holds the watermark back; the reader never waits
//! for it for longer than [`LogReader::with_max_wait`] per call and returns what is
//! already safe: it lags, it never skips. Details and alternatives:
//! `docs/adr/0002-log-order-and-the-safe-watermark.md`.
//!
//! Round trips: step 1 of a new candidate and the first test of step 3 for the
//! pending one share a statement (the pending candidate's xid committed in an
//! earlier one, which is all step 3 needs), so a call that settles one candidate
//! and draws the next costs three small statements. While a candidate is pending,
//! the reader looks again whenever an append of this process ends (the
//! transactions it waits for are mostly those), or after a short sleep.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::db::{Pool, pg_detail};

/// The columns every event query selects, in the order [`LoggedEvent::from_row`]
/// expects; the one place that maps the `events` table to a Rust value.
pub(crate) const EVENT_COLUMNS: &str = "id, position, tenant, aggregate_type, aggregate_id, \
     sequence, event_type, event_version, recorded_at, actor, payload, metadata";

/// How long one call waits, by default, for a pending watermark to settle.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(100);

/// Longest sleep between two checks while waiting for a watermark to settle. A
/// candidate usually settles within an append's duration, and every command's
/// read-your-writes wait sits behind this sleep: at 20 ms a rename took 6.4 ms at
/// one client (p50), at 2 ms 1.9 ms, and projection lag at 64 clients fell from
/// 0.11 to 0.09 s (`dossier bench --scenario commands`). A check is one small
/// query, and clones of a reader share one waiter (see [`LogReader`]). The end of
/// an append of this process cuts the sleep short ([`append_ended`]): only
/// appends of other processes wait for it.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(2);

/// Woken whenever an append of this process has ended, committed or not. The
/// transactions a pending candidate waits for are mostly this process's own
/// appends, and every command's read-your-writes wait sits behind the
/// candidate: a reader waiting for one checks again as soon as an append ends
/// instead of at its next timer tick. Appends of other processes are seen at the
/// next tick, as before.
static APPENDS_ENDED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Tells waiting readers that an append of this process ended (see
/// [`APPENDS_ENDED`]).
pub(crate) fn append_ended() {
    APPENDS_ENDED.notify_waiters();
}

/// One event as it stands in the log.
///
/// Its JSON is the contract's Event: `id`, `position`, `tenant`, `aggregate_type`,
/// `aggregate_id`, `sequence`, `event_type`, `event_version`, `at`, `actor`,
/// `payload`. The cqrs-es metadata map is not part of that shape: it is never
/// serialized, and is `null` after deserializing an Event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedEvent {
    /// The event id (UUID v7); downstream, the AMQP `message_id`.
    pub id: Uuid,
    /// Global log order.
    pub position: i64,
    /// The tenant the event belongs to.
    pub tenant: String,
    /// The aggregate's type, e.g. `file`.
    pub aggregate_type: String,
    /// The aggregate instance.
    pub aggregate_id: String,
    /// The event's number within its aggregate, from 1.
    pub sequence: i64,
    /// The event's name, e.g. `FileUploaded`.
    pub event_type: String,
    /// The version of the event's schema.
    pub event_version: String,
    /// When the event was recorded (the appending transaction's start).
    pub at: DateTime<Utc>,
    /// Who caused it.
    pub actor: String,
    /// The event itself.
    pub payload: serde_json::Value,
    /// The cqrs-es metadata map (`tenant`, `actor`, `command_id`, `correlation_id`,
    /// ...) as a JSON object. See [`LoggedEvent::metadata_str`].
    #[serde(skip_serializing, default)]
    pub metadata: serde_json::Value,
    /// Personal fields of the payload whose key is destroyed, when a reader
    /// opened them with [`crate::personal::Erased::Null`]: each is `null` in
    /// the payload. Not part of the stored event (so not of its chain hash),
    /// and absent from its JSON while empty.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub erased: Vec<String>,
}

impl LoggedEvent {
    /// A string value of the metadata map, e.g.
    /// `metadata_str(eventstore::META_CORRELATION_ID)`.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key)?.as_str()
    }

    /// Maps a row selected with [`EVENT_COLUMNS`]. A row that does not decode is an
    /// error naming its position, never a panic.
    pub(crate) fn from_row(row: &Row) -> Result<Self, LogError> {
        let position: Option<i64> = row.try_get("position").ok();
        let decode = |column: &'static str, error: tokio_postgres::Error| LogError::Decode {
            position,
            column,
            detail: pg_detail(&error),
        };
        macro_rules! column {
            ($name:literal) => {
                row.try_get($name).map_err(|e| decode($name, e))?
            };
        }
        Ok(Self {
            id: column!("id"),
            position: column!("position"),
            tenant: column!("tenant"),
            aggregate_type: column!("aggregate_type"),
            aggregate_id: column!("aggregate_id"),
            sequence: column!("sequence"),
            event_type: column!("event_type"),
            event_version: column!("event_version"),
            at: column!("recorded_at"),
            actor: column!("actor"),
            payload: column!("payload"),
            metadata: column!("metadata"),
            erased: Vec::new(),
        })
    }
}

/// Which events [`LogReader::read`] returns; the default is every event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogFilter {
    /// Only this tenant's events.
    pub tenant: Option<String>,
    /// Only this aggregate instance's events.
    pub aggregate_id: Option<String>,
}

/// What went wrong while reading the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// No pooled connection could be had.
    #[error("no Postgres connection for reading the event log: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A query failed.
    #[error("reading the event log failed: {}", pg_detail(.0))]
    Query(#[from] tokio_postgres::Error),
    /// A stored row does not decode into a [`LoggedEvent`].
    #[error("the stored event at position {} has an undecodable {column}: {detail}",
        position.map_or_else(|| "?".to_owned(), |p| p.to_string()))]
    Decode {
        /// The row's position, when even that could not be read: `None`.
        position: Option<i64>,
        /// The column that failed.
        column: &'static str,
        /// Why.
        detail: String,
    },
    /// Postgres returned a transaction id or sequence state the reader cannot use.
    #[error("unexpected answer while computing the log's safe watermark: {0}")]
    Watermark(String),
}

/// A position bound that is not final yet: every position `<= last_position` has been
/// handed out to a transaction with an xid `< xid_horizon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    last_position: i64,
    xid_horizon: u64,
}

/// Reads the log in position order up to a safe watermark (see the module docs).
///
/// Keep one per follower and call it repeatedly: it remembers the watermark and the
/// candidate it is waiting for, so a call costs one to three small queries plus the
/// read itself. The follower keeps its own checkpoint and passes it as `after`.
///
/// **Clones share the watermark.** The safe watermark is a fact about the log, not
/// about a follower, so every follower of a process reads through clones of one
/// reader (the start-up code does that for the projections, the relay and the
/// sealer): the first one that needs a newer watermark works it out while the
/// others wait for it, then all of them use it. Followers with a reader of their
/// own work out the same watermark again, with queries of their own.
#[derive(Clone)]
pub struct LogReader {
    pool: Pool,
    watermark: Arc<Mutex<Watermark>>,
    max_wait: Duration,
}

/// What a reader (and its clones) knows about the log's safe watermark.
#[derive(Debug, Default)]
struct Watermark {
    safe: i64,
    pending: Option<Candidate>,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("watermark", &self.watermark)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl LogReader {
    /// A reader that knows nothing yet (its watermark starts at 0).
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            watermark: Arc::default(),
            max_wait: DEFAULT_MAX_WAIT,
        }
    }

    /// How long one call may wait for a pending watermark to settle before it returns
    /// what is already safe (default [`DEFAULT_MAX_WAIT`]; zero never waits). Clones
    /// made afterwards inherit it; the watermark itself stays shared.
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Events with `after < position <= safe watermark`, ascending, at most `limit`,
    /// matching `filter`. Empty when nothing new is safe yet, which is not an error:
    /// poll again later. Waits at most the reader's max wait when nothing after `after`
    /// is safe yet.
    pub async fn read(
        &mut self,
        after: i64,
        limit: i64,
        filter: &LogFilter,
    ) -> Result<Vec<LoggedEvent>, LogError> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let safe = self.advance(after).await?;
        if safe <= after {
            return Ok(Vec::new());
        }

        let mut sql =
            format!("SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 AND position <= $2");
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after, &safe];
        // Build the WHERE clause per filter rather than `($3 IS NULL OR tenant = $3)`,
        // so that Postgres can use events_tenant_position_idx.
        if let Some(tenant) = &filter.tenant {
            params.push(tenant);
            sql.push_str(&format!(" AND tenant = ${}", params.len()));
        }
        if let Some(aggregate_id) = &filter.aggregate_id {
            params.push(aggregate_id);
            sql.push_str(&format!(" AND aggregate_id = ${}", params.len()));
        }
        params.push(&limit);
        sql.push_str(&format!(" ORDER BY position LIMIT ${}", params.len()));

        let client = self.pool.get().await?;
        let statement = client.prepare_cached(&sql).await?;
        let rows = client.query(&statement, &params).await?;
        rows.iter().map(LoggedEvent::from_row).collect()
    }

    /// The current safe watermark: every event at or below it is committed and
    /// visible, and no event can ever appear at or below it later. Advances it if
    /// possible, waiting at most the reader's max wait.
    pub async fn safe_position(&mut self) -> Result<i64, LogError> {
        let current = self.watermark.lock().await.safe;
        self.advance(current).await
    }

    /// Moves the watermark forward as far as is provably safe. Returns as soon as the
    /// watermark is above `want_above`, when there is nothing pending, or when the max
    /// wait is over.
    async fn advance(&mut self, want_above: i64) -> Result<i64, LogError> {
        // Held for the whole call: a clone that comes meanwhile waits, then finds
        // the watermark this call worked out.
        //
        // Every call looks at the log once more, even when the watermark is
        // already above `want_above`: the positions up to it may all be gaps (an
        // aborted append draws a position too), and a follower that found nothing
        // there asks again from the same place; only a newer candidate gets it on.
        let mut state = self.watermark.lock().await;
        let client = self.pool.get().await?;
        let deadline = tokio::time::Instant::now() + self.max_wait;
        let mut interval = Duration::from_millis(1);
        loop {
            // Registered before the look, so that an append ending right after
            // it still wakes the wait below.
            let append_ended = APPENDS_ENDED.notified();
            // Step 1 of a new candidate, and in the same statement step 3 of the
            // pending one (its xid committed in an earlier statement).
            let look = look(&client).await?;
            if let Some(candidate) = state.pending
                && xid_horizon_passed(&client, candidate.xid_horizon, look.xmin).await?
            {
                state.settle(candidate);
            }
            if state.pending.is_none() && look.last_position > state.safe {
                // Step 2 in a later statement than step 1: the order is the proof.
                let xid_horizon = fresh_xid(&client).await?;
                let candidate = Candidate {
                    last_position: look.last_position,
                    xid_horizon,
                };
                state.pending = Some(candidate);
                // Step 3, in a later statement again. On a quiet server this
                // settles at once.
                let xmin = snapshot_xmin(&client).await?;
                if xid_horizon_passed(&client, xid_horizon, xmin).await? {
                    state.settle(candidate);
                }
            }
            if state.safe > want_above
                || state.pending.is_none()
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(state.safe);
            }
            // The pending candidate waits for transactions to end, most often
            // appends of this process: look again when one of them ends, or
            // at the next tick for those of other processes.
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = append_ended => {}
            }
            interval = (interval * 2).min(MAX_POLL_INTERVAL);
        }
    }
}

impl Watermark {
    fn settle(&mut self, candidate: Candidate) {
        self.safe = self.safe.max(candidate.last_position);
        self.pending = None;
    }
}

/// What one statement sees: the snapshot's xmin (step 3 of a pending candidate) and
/// the last position the sequence has handed out (step 1 of a new one).
struct Look {
    xmin: u64,
    last_position: i64,
}

/// Step 1 with step 3's first test, in one round trip. Reading the sequence
/// relation is not transactional: it sees other sessions' `nextval` at once.
async fn look(client: &deadpool_postgres::Client) -> Result<Look, LogError> {
    let statement = client
        .prepare_cached(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, last_value, is_called \
             FROM events_position_seq",
        )
        .await?;
    let row = client.query_one(&statement, &[]).await?;
    let last_value: i64 = row.try_get(1)?;
    let is_called: bool = row.try_get(2)?;
    Ok(Look {
        xmin: parse_xid(row.try_get(0)?)?,
        // Before the first nextval, last_value is the start value, not handed out yet.
        last_position: if is_called {
            last_value
        } else {
            last_value - 1
        },
    })
}

/// The xmin of a fresh snapshot (step 3's first test on its own).
async fn snapshot_xmin(client: &deadpool_postgres::Client) -> Result<u64, LogError> {
    let statement = client
        .prepare_cached("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
        .await?;
    parse_xid(client.query_one(&statement, &[]).await?.try_get(0)?)
}

/// Step 2: a transaction id newer than every xid assigned before this call. The
/// statement runs (and commits) on its own, outside any transaction block.
async fn fresh_xid(client: &deadpool_postgres::Client) -> Result<u64, LogError> {
    let statement = client
        .prepare_cached("SELECT pg_current_xact_id()::text")
        .await?;
    parse_xid(client.query_one(&statement, &[]).await?.try_get(0)?)
}

/// Step 3: whether every transaction with an xid below `horizon` that could have
/// written to this database has ended. `xmin` is the xmin of a snapshot taken in a
/// statement after the one that drew `horizon` (see [`look`] and [`snapshot_xmin`]).
///
/// First the cheap, cluster-wide test: that xmin. Postgres snapshots span
/// every database of the server, so a long write transaction in some other database
/// would hold it back; when it does, a second statement looks at the snapshot's list
/// of running xids and ignores those that `pg_stat_activity` shows belonging to a
/// session of another database (a session cannot write to a database it is not
/// connected to). Only positively identified xids are ignored: an xid whose session
/// is hidden or unknown (a prepared transaction, a role that may not see other
/// sessions' `backend_xid`) still counts as running, so this can only wait longer,
/// never skip. `backend_xid` is a 32-bit xid; running xids are within 2^31 of each
/// other, so comparing the low 32 bits of the `xid8` is exact.
async fn xid_horizon_passed(
    client: &deadpool_postgres::Client,
    horizon: u64,
    xmin: u64,
) -> Result<bool, LogError> {
    if xmin >= horizon {
        return Ok(true);
    }
    let horizon = i64::try_from(horizon)
        .map_err(|_| LogError::Watermark(format!("transaction id {horizon} is out of range")))?;
    let statement = client
        .prepare_cached(
            "SELECT NOT EXISTS ( \
                 SELECT 1 FROM pg_snapshot_xip(pg_current_snapshot()) AS running(xid) \
                 WHERE running.xid::text::bigint < $1 \
                   AND NOT EXISTS ( \
                       SELECT 1 FROM pg_stat_activity AS session \
                       WHERE session.datid IS DISTINCT FROM \
                                 (SELECT oid FROM pg_database WHERE datname = current_database()) \
                         AND session.backend_xid::text::bigint \
                             = running.xid::text::bigint & 4294967295))",
        )
        .await?;
    Ok(client
        .query_one(&statement, &[&horizon])
        .await?
        .try_get(0)?)
}

/// `xid8` values travel as text: tokio-postgres has no Rust type for them.
fn parse_xid(text: &str) -> Result<u64, LogError> {
    text.parse()
        .map_err(|_| LogError::Watermark(format!("{text:?} is not a transaction id")))
}

/// The event with id `id`, as the log keeps it; `None` if the log has no such
/// event. Consumers of `dossier.events` use it to act on what the log says
/// rather than on what a message claims.
pub async fn find_event(pool: &Pool, id: uuid::Uuid) -> Result<Option<LoggedEvent>, LogError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1"),
            &[&id],
        )
        .await?;
    row.as_ref().map(LoggedEvent::from_row).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xids_parse_and_garbage_is_an_error() {
        assert_eq!(parse_xid("727").ok(), Some(727));
        assert!(matches!(parse_xid("72x"), Err(LogError::Watermark(_))));
    }
}
