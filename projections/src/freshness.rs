//! Read-your-writes (CONTRACT.md rule 10): once a command has returned, every query
//! reflects it. The command path knows the log position of the events it wrote; it
//! waits with [`Freshness::wait_until`] until the projection's checkpoint has reached
//! that position, and only then answers.
//!
//! Two sources for the checkpoint, one type:
//!
//! - **In process** ([`crate::Runner::freshness`]): the runner publishes every commit
//!   on a `watch` channel. Waiting also pokes the runner, so it reads the log at once
//!   instead of at its next poll.
//! - **Following the database** ([`Freshness::follow`]): a process that serves the
//!   API but does not run the projection (`--role api`) polls the projection's row in
//!   `checkpoints`. It polls fast (every [`FollowerConfig::poll`]) only while someone
//!   waits for a position not reached yet, and slowly otherwise, so an idle API node
//!   costs the database almost nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use dossier_eventlog::db::Pool;
use dossier_eventlog::follow::checkpoint;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Why a wait for a position ended without reaching it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FreshnessError {
    /// The projection did not reach the position in time: it lags (a long
    /// transaction holds the log's watermark back, Postgres is slow) or its runner is
    /// not running anywhere. The write itself is durable.
    #[error(
        "projection {projection} had reached position {reached}, not {wanted}, after {waited:?}"
    )]
    Timeout {
        /// The projection waited on.
        projection: &'static str,
        /// The position waited for.
        wanted: i64,
        /// Where the projection was when the wait gave up.
        reached: i64,
        /// How long it waited.
        waited: Duration,
    },
    /// The runner or follower that published the checkpoint is gone (shut down, or
    /// stopped on an error), so the position will never be reached through it.
    #[error("projection {projection} no longer publishes its checkpoint (stopped at {reached})")]
    Stopped {
        /// The projection waited on.
        projection: &'static str,
        /// The last position it published.
        reached: i64,
    },
}

/// Waits until a projection has applied a log position. Cheap to clone; clones share
/// the same source.
#[derive(Debug, Clone)]
pub struct Freshness {
    projection: &'static str,
    checkpoint: watch::Receiver<i64>,
    /// Pokes whoever advances `checkpoint`: the runner, or the follower task.
    poke: Arc<Notify>,
    /// The highest position anyone asked for; the follower polls fast while it is ahead.
    wanted: Arc<AtomicI64>,
}

/// How a [`Freshness::follow`] task polls the `checkpoints` table.
#[derive(Debug, Clone)]
pub struct FollowerConfig {
    /// Poll interval while a waiter wants a position not reached yet.
    pub poll: Duration,
    /// Poll interval otherwise (keeps [`Freshness::current`] roughly current).
    pub idle: Duration,
    /// How long after the last wait began fast polling may go on; bounds the cost of
    /// a waiter that asked for a position the projection will not reach soon.
    pub fast_window: Duration,
}

impl Default for FollowerConfig {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(10),
            idle: Duration::from_secs(1),
            fast_window: Duration::from_secs(30),
        }
    }
}

impl Freshness {
    /// Freshness fed by a runner in this process (see [`crate::RunnerHandle`]).
    pub(crate) fn in_process(
        projection: &'static str,
        checkpoint: watch::Receiver<i64>,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            projection,
            checkpoint,
            poke: wake,
            wanted: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Freshness for a projection that runs in another process: spawns a task that
    /// follows the projection's row in `checkpoints`. The task ends when `shutdown`
    /// turns `true` (or its sender goes away) or when every clone of the returned
    /// `Freshness` has been dropped.
    pub fn follow(
        pool: Pool,
        projection: &'static str,
        config: FollowerConfig,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let (sender, checkpoint) = watch::channel(0);
        let poke = Arc::new(Notify::new());
        let wanted = Arc::new(AtomicI64::new(0));
        let task = tokio::spawn(follow_checkpoint(
            pool,
            projection,
            config,
            sender,
            poke.clone(),
            wanted.clone(),
            shutdown,
        ));
        let freshness = Self {
            projection,
            checkpoint,
            poke,
            wanted,
        };
        (freshness, task)
    }

    /// The projection waited on.
    pub fn projection(&self) -> &'static str {
        self.projection
    }

    /// The checkpoint as last seen: every event at or below it is in the read model.
    pub fn current(&self) -> i64 {
        *self.checkpoint.borrow()
    }

    /// Waits until the projection has applied `position` (its checkpoint is at or past
    /// it), at most `timeout`. Returns the checkpoint seen.
    pub async fn wait_until(
        &self,
        position: i64,
        timeout: Duration,
    ) -> Result<i64, FreshnessError> {
        let reached = self.current();
        if reached >= position {
            return Ok(reached);
        }
        self.wanted.fetch_max(position, Ordering::Relaxed);
        self.poke.notify_one();

        let started = Instant::now();
        let mut checkpoint = self.checkpoint.clone();
        match tokio::time::timeout(timeout, checkpoint.wait_for(|p| *p >= position)).await {
            Ok(Ok(reached)) => Ok(*reached),
            Ok(Err(_closed)) => Err(FreshnessError::Stopped {
                projection: self.projection,
                reached: self.current(),
            }),
            Err(_elapsed) => Err(FreshnessError::Timeout {
                projection: self.projection,
                wanted: position,
                reached: self.current(),
                waited: started.elapsed(),
            }),
        }
    }

    /// [`Self::wait_until`] for callers that only need to know whether it worked:
    /// `true` once the projection shows `position`, `false` after a timeout or when
    /// the projection stopped.
    pub async fn wait_for(&self, position: i64, timeout: Duration) -> bool {
        self.wait_until(position, timeout).await.is_ok()
    }
}

/// The follower task of [`Freshness::follow`].
async fn follow_checkpoint(
    pool: Pool,
    projection: &'static str,
    config: FollowerConfig,
    sender: watch::Sender<i64>,
    poke: Arc<Notify>,
    wanted: Arc<AtomicI64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut fast_until = Instant::now();
    let mut failing = false;
    loop {
        if *shutdown.borrow() {
            break;
        }
        match checkpoint::read(&pool, projection).await {
            Ok(position) => {
                let position = position.unwrap_or(0);
                // Publish any change, backwards too: a checkpoint reset by hand means the
                // read model was reset, and waiters must wait for it again.
                sender.send_if_modified(|current| {
                    let changed = *current != position;
                    *current = position;
                    changed
                });
                if failing {
                    tracing::info!(projection, "following the projection's checkpoint again");
                    failing = false;
                }
            }
            Err(error) => {
                // Logged once per outage: waiters time out and say so themselves.
                if !failing {
                    tracing::warn!(
                        projection,
                        error = %error,
                        "cannot read the projection's checkpoint; read-your-writes waits will time out"
                    );
                    failing = true;
                }
            }
        }
        let behind = wanted.load(Ordering::Relaxed) > *sender.borrow();
        let pause = if behind && Instant::now() < fast_until {
            config.poll
        } else {
            config.idle
        };
        tokio::select! {
            _ = poke.notified() => {
                fast_until = Instant::now() + config.fast_window;
            }
            _ = tokio::time::sleep(pause) => {}
            _ = sender.closed() => break,
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
}
