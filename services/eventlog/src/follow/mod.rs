//! Following the log: the one mechanism every follower of the event log uses,
//! the read models, the outbox relay and the sealer alike.
//!
//! A follower keeps a checkpoint (the position of the last event it is done
//! with) in the `checkpoints` table and works through the log after it, batch by
//! batch, in position order. The [`Runner`] does everything that is the same for
//! all of them:
//!
//! - reads a batch through the process's [`LogReader`] (clones share the safe
//!   watermark, so an event that commits late is never skipped and the
//!   watermark is worked out once per process, not once per follower);
//! - takes the follower's turn ([`checkpoint`]), so that a second instance of
//!   the same follower (another process) waits, then continues from where the
//!   first one got to, and takes over when the first one dies;
//! - hands the batch to the [`Follower`], then stores the new checkpoint in the
//!   same transaction and commits;
//! - publishes each checkpoint on a `watch` channel (read-your-writes waits on
//!   it), measures lag on a timer, retries transient failures with the one
//!   backoff policy, and stops loudly on a failure that retrying cannot fix.
//!
//! What differs is the effect of a batch, and so how the turn is held
//! ([`Effects`]): the read models and the sealer write their effects in the
//! runner's transaction, so checkpoint and effects commit together; the relay's
//! effect is a broker publish, confirmed before the transaction that moves the
//! checkpoint commits, so the checkpoint never passes an unconfirmed event.
//! `docs/adr/0009-one-log-follower.md` says why.

pub mod checkpoint;
mod runner;

use std::future::Future;

use deadpool_postgres::Transaction;

use crate::db::pg_detail;
use crate::log::{LogError, LoggedEvent};

pub use runner::{Progress, Runner, RunnerConfig};

/// Where a follower's effects go; decides how the runner holds its turn (see
/// [`checkpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effects {
    /// Into the runner's transaction (read models, the sealer): the checkpoint
    /// rows are locked `FOR UPDATE` and commit with the effects, so each event
    /// takes effect exactly once.
    InTransaction,
    /// Outside Postgres (the relay's publish): the turn is an advisory lock that
    /// gives the transaction no xid while the effect runs, and the checkpoint is
    /// stored only past what the effect confirmed. At least once: an effect done
    /// but not stored (a crash in between) is done again by whoever comes next.
    External,
}

/// A follower of the log: applies batches of logged events.
///
/// It names one checkpoint per independent member ([`Self::checkpoints`]): a
/// runner of several read models keeps a row for each, so that the rebuild of one
/// moves only its own; the relay and the sealer have one.
pub trait Follower: Send {
    /// Why a batch failed. Failures of the runner itself (Postgres, the log)
    /// arrive through `From<FollowError>`.
    type Error: From<FollowError> + std::fmt::Display + Send;

    /// Where the effects go.
    const EFFECTS: Effects;

    /// The names of its checkpoint rows, one per member, in the order the
    /// `from` and answer vectors of [`Self::apply`] use. Unique.
    fn checkpoints(&self) -> Vec<&'static str>;

    /// Gets ready for a batch, outside any transaction and before the log is
    /// read (the relay opens its broker channel here, so that no transaction
    /// stays open while it waits for the broker).
    fn prepare(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        async { Ok(()) }
    }

    /// Applies `events` (ascending, gap-free as far as the log is concerned) with
    /// the turn held by `tx`. `from[i]` is the committed checkpoint of member
    /// `i`: events at or below it are already applied for that member and must
    /// be skipped for it. `tx` is the pooled connection's transaction, with its
    /// statement cache: a follower that sends the same statements batch after
    /// batch prepares them once per connection (`prepare_typed_cached`).
    ///
    /// Answers each member's new checkpoint. An [`Effects::InTransaction`]
    /// follower writes only through `tx`. On failure, [`Halt`] says whether the
    /// members' progress before the failure is kept (stored and committed) or the
    /// transaction is rolled back.
    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[LoggedEvent],
        from: &[i64],
    ) -> impl Future<Output = Result<Vec<i64>, Halt<Self::Error>>> + Send;

    /// Whether waiting and trying again may help (Postgres or the broker down).
    /// Anything else stops [`Runner::run`] with the error.
    fn is_transient(error: &Self::Error) -> bool;

    /// A short, stable label of the error for the `kind` of
    /// `dossier_follower_errors_total`.
    fn kind(error: &Self::Error) -> &'static str;

    /// The checkpoint (member) an error is about, when it is about one; `None`
    /// counts it against every member.
    fn culprit(_error: &Self::Error) -> Option<&'static str> {
        None
    }
}

/// How a batch ended that did not apply in full.
#[derive(Debug)]
pub struct Halt<E> {
    /// What went wrong.
    pub error: E,
    /// `Some(ends)`: keep what was done before the failure, with member `i` at
    /// checkpoint `ends[i]` (the transaction must still be usable). `None`: roll
    /// the transaction back.
    pub keep: Option<Vec<i64>>,
}

impl<E> Halt<E> {
    /// Nothing of the batch is kept.
    pub fn rollback(error: E) -> Self {
        Self { error, keep: None }
    }

    /// The members reached `ends` before `error`: keep that.
    pub fn keep(ends: Vec<i64>, error: E) -> Self {
        Self {
            error,
            keep: Some(ends),
        }
    }
}

impl<E: From<FollowError>> From<tokio_postgres::Error> for Halt<E> {
    fn from(error: tokio_postgres::Error) -> Self {
        Self::rollback(FollowError::from(error).into())
    }
}

/// What the runner itself can fail on.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// No pooled connection could be had.
    #[error("no Postgres connection for following the log: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement (a checkpoint's, or the follower's) failed.
    #[error("a statement of a log follower failed: {}", pg_detail(.0))]
    Query(#[from] tokio_postgres::Error),
    /// Reading the log failed.
    #[error(transparent)]
    Log(#[from] LogError),
}

impl FollowError {
    /// Whether waiting and trying again may help.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Pool(_) | Self::Log(LogError::Pool(_)) => true,
            Self::Query(error) | Self::Log(LogError::Query(error)) => {
                crate::db::is_transient(error)
            }
            Self::Log(_) => false,
        }
    }
}
