//! The [`Runner`]: keeps one [`Projection`] caught up with the event log.
//!
//! Each step reads up to a batch of events after the checkpoint (through
//! [`LogReader`], which only returns positions below a safe watermark, so an event
//! that commits late is never skipped), then in ONE transaction: locks the checkpoint
//! row, applies every event, moves the checkpoint to the last one, commits. A crash
//! anywhere leaves either all of a batch or none of it, and the next run starts
//! exactly after the last committed event. On top of that every projection is
//! idempotent per event, so even a checkpoint moved back by hand does no harm.
//!
//! When it has nothing to do the runner polls every [`RunnerConfig::idle_poll`], or at
//! once when poked through [`RunnerHandle::wake`] (the command path does that after
//! it appended events). Its checkpoint is published on a `watch` channel after every
//! commit, which is what in-process [`Freshness`] waits on.
//!
//! Failures: a transient one (Postgres unreachable, pool timeout) is logged and
//! retried with a growing pause; anything else, above all an event that does not
//! decode, stops the runner with an error log, a metric and an `Err`, and never a
//! panic or a silent skip.
//!
//! Metrics (label `projection`): `dossier_projection_events_applied_total`,
//! `dossier_projection_checkpoint`, `dossier_projection_lag_events`,
//! `dossier_projection_lag_seconds`, `dossier_projection_errors_total` (label
//! `kind`), `dossier_projection_stopped` (1 once the runner gave up).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dossier_platform::db::Pool;
use dossier_platform::log::{LogFilter, LogReader};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::checkpoint;
use crate::error::ProjectionError;
use crate::freshness::Freshness;
use crate::projection::Projection;

/// How a [`Runner`] paces itself.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Most events applied in one transaction. Bigger batches catch up faster; smaller
    /// ones hold the checkpoint lock for less time.
    pub batch_size: i64,
    /// Pause between two looks at the log when there was nothing new (a poke through
    /// [`RunnerHandle::wake`] ends it early).
    pub idle_poll: Duration,
    /// Longest pause between two attempts after a transient failure.
    pub max_backoff: Duration,
    /// How often lag is measured while idle (it is also measured after every batch).
    pub lag_interval: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            idle_poll: Duration::from_millis(10),
            max_backoff: Duration::from_secs(5),
            lag_interval: Duration::from_secs(1),
        }
    }
}

/// What one [`Runner::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Events the step read from the log and committed (of every aggregate type:
    /// the checkpoint moves past the ones the projection ignores too).
    pub events: usize,
    /// The checkpoint after the step.
    pub position: i64,
    /// Whether there is probably more to do right away (a full batch, or the
    /// checkpoint was moved by someone else, such as a rebuild).
    pub more: bool,
}

/// A cheap handle to a running [`Runner`], for the command path: poke it, or read
/// and follow its checkpoint.
#[derive(Debug, Clone)]
pub struct RunnerHandle {
    name: &'static str,
    wake: Arc<Notify>,
    checkpoint: watch::Receiver<i64>,
}

impl RunnerHandle {
    /// The projection's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Asks the runner to look at the log now instead of at its next poll.
    pub fn wake(&self) {
        // notify_one keeps a permit when the runner is busy, so the poke is not lost.
        self.wake.notify_one();
    }

    /// The checkpoint the runner last committed.
    pub fn checkpoint(&self) -> i64 {
        *self.checkpoint.borrow()
    }

    /// Read-your-writes on this runner, in process.
    pub fn freshness(&self) -> Freshness {
        Freshness::in_process(self.name, self.checkpoint.clone(), self.wake.clone())
    }
}

/// Keeps one projection caught up with the log (see the module docs).
pub struct Runner<P: Projection> {
    pool: Pool,
    projection: P,
    reader: LogReader,
    config: RunnerConfig,
    /// The checkpoint as this runner last saw it committed; `None` before the first
    /// step has read it from the database.
    position: Option<i64>,
    checkpoint: watch::Sender<i64>,
    wake: Arc<Notify>,
    last_lag_check: Option<Instant>,
}

impl<P: Projection> std::fmt::Debug for Runner<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("projection", &self.projection.name())
            .field("position", &self.position)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<P: Projection> Runner<P> {
    /// A runner for `projection` on the database of `pool` (migrated).
    pub fn new(pool: Pool, projection: P, config: RunnerConfig) -> Self {
        let reader = LogReader::new(pool.clone());
        let (checkpoint, _) = watch::channel(0);
        Self {
            pool,
            projection,
            reader,
            config,
            position: None,
            checkpoint,
            wake: Arc::new(Notify::new()),
            last_lag_check: None,
        }
    }

    /// The projection's name.
    pub fn name(&self) -> &'static str {
        self.projection.name()
    }

    /// The projection this runner feeds.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// A handle for the command path (wake-ups, checkpoint, freshness).
    pub fn handle(&self) -> RunnerHandle {
        RunnerHandle {
            name: self.projection.name(),
            wake: self.wake.clone(),
            checkpoint: self.checkpoint.subscribe(),
        }
    }

    /// Read-your-writes on this runner, in process (same as `handle().freshness()`).
    pub fn freshness(&self) -> Freshness {
        self.handle().freshness()
    }

    /// Applies at most one batch: reads events after the checkpoint and commits their
    /// effects together with the new checkpoint.
    pub async fn step(&mut self) -> Result<Progress, ProjectionError> {
        let name = self.projection.name();
        let after = match self.position {
            Some(position) => position,
            None => self.load_checkpoint().await?,
        };

        let events = self
            .reader
            .read(after, self.config.batch_size, &LogFilter::default())
            .await?;
        let Some(last) = events.last().map(|event| event.position) else {
            self.measure_lag(false).await;
            return Ok(Progress {
                events: 0,
                position: after,
                more: false,
            });
        };

        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let committed = checkpoint::lock(&tx, name).await?;
        if committed != after {
            // A rebuild swapped the tables in, or another runner (another process)
            // got here first. What we read may already be applied: start over from
            // what is committed.
            drop(tx);
            tracing::info!(
                projection = name,
                from = after,
                to = committed,
                "the checkpoint was moved by someone else; continuing from there"
            );
            self.publish(committed);
            return Ok(Progress {
                events: 0,
                position: committed,
                more: true,
            });
        }

        for (index, event) in events.iter().enumerate() {
            if let Err(error) = self.projection.apply(&tx, event).await {
                // An event the projection refuses before touching the database leaves
                // the transaction usable: keep the events before it, so that the
                // checkpoint stops right in front of the culprit.
                let refused = matches!(
                    error,
                    ProjectionError::Undecodable { .. } | ProjectionError::Malformed { .. }
                );
                if refused && index > 0 {
                    let before = events[index - 1].position;
                    checkpoint::store(&tx, name, before).await?;
                    tx.commit().await?;
                    self.applied(index, before);
                }
                return Err(error);
            }
        }
        checkpoint::store(&tx, name, last).await?;
        tx.commit().await?;
        self.applied(events.len(), last);

        let full = events.len() as i64 >= self.config.batch_size;
        self.measure_lag(true).await;
        tracing::debug!(
            projection = name,
            count = events.len(),
            position = last,
            "applied events"
        );
        Ok(Progress {
            events: events.len(),
            position: last,
            more: full,
        })
    }

    /// Steps until the projection has applied everything that is safe to read now;
    /// returns the checkpoint. For tests, the command line and start-up.
    pub async fn catch_up(&mut self) -> Result<i64, ProjectionError> {
        loop {
            let progress = self.step().await?;
            if !progress.more {
                return Ok(progress.position);
            }
        }
    }

    /// Runs until `shutdown` turns `true` (or its sender goes away): steps, sleeps
    /// when idle, retries transient failures with backoff. A batch in flight when the
    /// signal comes is finished (or not committed at all), never cut in half.
    ///
    /// Returns `Err` only for a failure that retrying cannot fix (see
    /// [`ProjectionError::is_transient`]); the projection then stays where it is
    /// until someone fixes the cause and restarts it.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), ProjectionError> {
        let name = self.projection.name();
        metrics::gauge!("dossier_projection_stopped", "projection" => name).set(0.0);
        tracing::info!(projection = name, "projection runner started");
        let mut backoff = Duration::ZERO;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let pause = match self.step().await {
                Ok(progress) => {
                    backoff = Duration::ZERO;
                    if progress.more {
                        continue;
                    }
                    self.config.idle_poll
                }
                Err(error) if error.is_transient() => {
                    metrics::counter!(
                        "dossier_projection_errors_total",
                        "projection" => name,
                        "kind" => error.kind()
                    )
                    .increment(1);
                    backoff = (backoff * 2)
                        .max(Duration::from_millis(50))
                        .min(self.config.max_backoff);
                    tracing::warn!(
                        projection = name,
                        error = %error,
                        retry_in = ?backoff,
                        "projection step failed; the read model lags until it succeeds"
                    );
                    // Forget the cached position: after an outage, re-read what is committed.
                    self.position = None;
                    backoff
                }
                Err(error) => {
                    metrics::counter!(
                        "dossier_projection_errors_total",
                        "projection" => name,
                        "kind" => error.kind()
                    )
                    .increment(1);
                    metrics::gauge!("dossier_projection_stopped", "projection" => name).set(1.0);
                    tracing::error!(
                        projection = name,
                        error = %error,
                        position = self.position,
                        "projection stopped: it will not move past this event until the cause \
                         is fixed and the process restarted; queries show the state before it"
                    );
                    return Err(error);
                }
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
        }
        tracing::info!(
            projection = name,
            position = self.position,
            "projection runner stopped"
        );
        Ok(())
    }

    /// Reads the committed checkpoint (creating its row at 0 if needed).
    async fn load_checkpoint(&mut self) -> Result<i64, ProjectionError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let position = checkpoint::lock(&tx, self.projection.name()).await?;
        tx.commit().await?;
        self.publish(position);
        Ok(position)
    }

    /// Books a committed batch of `count` events ending at `position`.
    fn applied(&mut self, count: usize, position: i64) {
        metrics::counter!("dossier_projection_events_applied_total", "projection" => self.projection.name())
            .increment(count as u64);
        self.publish(position);
    }

    fn publish(&mut self, position: i64) {
        self.position = Some(position);
        // send_replace: publish even when nobody subscribed yet.
        self.checkpoint.send_replace(position);
        metrics::gauge!("dossier_projection_checkpoint", "projection" => self.projection.name())
            .set(position as f64);
    }

    /// Updates the lag gauges: after every batch, and every `lag_interval` when idle
    /// (the log may be held back by a long transaction even when nothing is read).
    /// A failure only costs a stale gauge, never the projection.
    async fn measure_lag(&mut self, applied: bool) {
        let now = Instant::now();
        let due = self
            .last_lag_check
            .is_none_or(|at| now.duration_since(at) >= self.config.lag_interval);
        if !applied && !due {
            return;
        }
        self.last_lag_check = Some(now);
        let Some(position) = self.position else {
            return;
        };
        let name = self.projection.name();
        match log_head(&self.pool, position).await {
            Ok((head, oldest_pending)) => {
                let events = (head - position).max(0);
                let seconds = oldest_pending.map_or(0.0, |at| {
                    (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
                });
                metrics::gauge!("dossier_projection_lag_events", "projection" => name)
                    .set(events as f64);
                metrics::gauge!("dossier_projection_lag_seconds", "projection" => name)
                    .set(seconds);
            }
            Err(error) => {
                tracing::debug!(projection = name, error = %error, "could not measure projection lag");
            }
        }
    }
}

/// The newest committed position of the log, and when the oldest committed event the
/// projection has not applied yet was recorded (`None` when it is caught up).
async fn log_head(
    pool: &Pool,
    after: i64,
) -> Result<(i64, Option<DateTime<Utc>>), ProjectionError> {
    let client = pool.get().await?;
    let statement = client
        .prepare_cached(
            "SELECT COALESCE((SELECT max(position) FROM events), 0), \
                    (SELECT recorded_at FROM events WHERE position > $1 ORDER BY position LIMIT 1)",
        )
        .await?;
    let row = client.query_one(&statement, &[&after]).await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
