//! The [`Runner`]: keeps one or more [`Projection`]s caught up with the event log.
//!
//! Each step reads up to a batch of events after the checkpoint (through
//! [`LogReader`], which only returns positions below a safe watermark, so an event
//! that commits late is never skipped), then in ONE transaction: locks the
//! checkpoint rows, applies every event, moves the checkpoints to the last one,
//! commits. A crash anywhere leaves either all of a batch or none of it, and the
//! next run starts exactly after the last committed event. On top of that every
//! projection is idempotent per event, so even a checkpoint moved back by hand does
//! no harm.
//!
//! A process runs every read model in **one** runner ([`Runner::with`]): one log
//! reader works out the safe watermark once, one read serves every projection, and
//! one transaction per batch applies the batch to all of them and stores all their
//! checkpoints. Each projection keeps a checkpoint row of its own (a rebuild swaps
//! one read model and moves only its checkpoint), and an event is applied to a
//! projection only above that projection's checkpoint. Before issue 7 each read
//! model had a runner of its own, and every command paid for three watermarks,
//! three reads and three transactions.
//!
//! When it has nothing to do the runner polls every [`RunnerConfig::idle_poll`], or
//! at once when poked through [`RunnerHandle::wake`] (the command path does that
//! after it appended events). Each checkpoint is published on a `watch` channel
//! after every commit, which is what in-process [`Freshness`] waits on.
//!
//! Failures: a transient one (Postgres unreachable, pool timeout) is logged and
//! retried with a growing pause; anything else, above all an event that does not
//! decode, stops the runner with an error log, a metric and an `Err`, and never a
//! panic or a silent skip. The other projections of the batch keep what they
//! applied before the culprit, exactly like the one that refused it.
//!
//! Metrics (label `projection`): `dossier_projection_events_applied_total`,
//! `dossier_projection_checkpoint`, `dossier_projection_lag_events`,
//! `dossier_projection_lag_seconds`, `dossier_projection_errors_total` (label
//! `kind`), `dossier_projection_stopped` (1 once the runner gave up).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dossier_eventlog::db::Pool;
use dossier_eventlog::log::{LogFilter, LogReader, LoggedEvent};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_postgres::Transaction;

use crate::checkpoint;
use crate::error::ProjectionError;
use crate::freshness::Freshness;
use crate::projection::Projection;

/// How a [`Runner`] paces itself.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Most events applied in one transaction. Bigger batches catch up faster; smaller
    /// ones hold the checkpoint locks for less time.
    pub batch_size: i64,
    /// Pause between two looks at the log when there was nothing new (a poke through
    /// [`RunnerHandle::wake`] ends it early).
    pub idle_poll: Duration,
    /// Longest pause between two attempts after a transient failure.
    pub max_backoff: Duration,
    /// How often lag is measured, busy or idle; never per batch: under load a query
    /// per batch is a query per handful of commands.
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
    /// the checkpoints move past the ones the projections ignore too).
    pub events: usize,
    /// The lowest checkpoint of the runner's projections after the step.
    pub position: i64,
    /// Whether there is probably more to do right away (a full batch, or a
    /// checkpoint was moved by someone else, such as a rebuild).
    pub more: bool,
}

/// A cheap handle to one projection of a running [`Runner`], for the command path:
/// poke the runner, or read and follow the projection's checkpoint.
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

    /// The checkpoint the runner last committed for this projection.
    pub fn checkpoint(&self) -> i64 {
        *self.checkpoint.borrow()
    }

    /// Read-your-writes on this projection, in process.
    pub fn freshness(&self) -> Freshness {
        Freshness::in_process(self.name, self.checkpoint.clone(), self.wake.clone())
    }
}

type ApplyFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ProjectionError>> + Send + 'a>>;

/// [`Projection`] as a trait object, so that one runner can hold several read
/// models of different types. The box per applied event costs nothing next to the
/// statement it sends.
trait AnyProjection: Send + Sync {
    fn name(&self) -> &'static str;
    fn apply_boxed<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        event: &'a LoggedEvent,
    ) -> ApplyFuture<'a>;
}

impl<P: Projection> AnyProjection for P {
    fn name(&self) -> &'static str {
        Projection::name(self)
    }

    fn apply_boxed<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        event: &'a LoggedEvent,
    ) -> ApplyFuture<'a> {
        Box::pin(Projection::apply(self, tx, event))
    }
}

/// One projection of a runner, with its own checkpoint.
struct Member {
    projection: Box<dyn AnyProjection>,
    /// The checkpoint as this runner last saw it committed; `None` before it was
    /// read from the database (or after a failure, to read it again).
    position: Option<i64>,
    checkpoint: watch::Sender<i64>,
}

impl Member {
    fn name(&self) -> &'static str {
        self.projection.name()
    }

    fn publish(&mut self, position: i64) {
        self.position = Some(position);
        // send_replace: publish even when nobody subscribed yet.
        self.checkpoint.send_replace(position);
        metrics::gauge!("dossier_projection_checkpoint", "projection" => self.name())
            .set(position as f64);
    }
}

/// Keeps its projections caught up with the log (see the module docs).
pub struct Runner {
    pool: Pool,
    members: Vec<Member>,
    reader: LogReader,
    config: RunnerConfig,
    wake: Arc<Notify>,
    last_lag_check: Option<Instant>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("projections", &self.names())
            .field(
                "positions",
                &self.members.iter().map(|m| m.position).collect::<Vec<_>>(),
            )
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// A runner for `projection` on the database of `pool` (migrated). Add more
    /// projections to the same runner with [`Runner::with`].
    ///
    pub fn new<P: Projection>(pool: Pool, projection: P, config: RunnerConfig) -> Self {
        let reader = LogReader::new(pool.clone());
        Self {
            pool,
            members: Vec::new(),
            reader,
            config,
            wake: Arc::new(Notify::new()),
            last_lag_check: None,
        }
        .with(projection)
    }

    /// Adds `projection` to this runner: it follows the log with the others, in the
    /// same reads and transactions, from its own checkpoint.
    ///
    /// # Panics
    ///
    /// If a projection of that name is already in the runner: the two would share
    /// one checkpoint row (a wiring mistake, caught by any test that starts it).
    pub fn with<P: Projection>(mut self, projection: P) -> Self {
        let name = Projection::name(&projection);
        assert!(
            !self.names().contains(&name),
            "the projection {name} is in this runner twice"
        );
        let (checkpoint, _) = watch::channel(0);
        self.members.push(Member {
            projection: Box::new(projection),
            position: None,
            checkpoint,
        });
        self
    }

    /// Reads the log through `reader`, a clone of the process's one reader, so
    /// that the runner shares the safe watermark with the other followers (see
    /// [`LogReader`]) instead of working it out again.
    pub fn reading_from(mut self, reader: LogReader) -> Self {
        self.reader = reader;
        self
    }

    /// The names of the runner's projections, in the order they apply each event.
    pub fn names(&self) -> Vec<&'static str> {
        self.members.iter().map(Member::name).collect()
    }

    /// The handle of the runner's first projection (for a runner of one projection,
    /// its only one). See [`Self::handles`].
    pub fn handle(&self) -> RunnerHandle {
        self.handles().remove(0)
    }

    /// One handle per projection (wake-ups, checkpoint, freshness).
    pub fn handles(&self) -> Vec<RunnerHandle> {
        self.members
            .iter()
            .map(|member| RunnerHandle {
                name: member.name(),
                wake: self.wake.clone(),
                checkpoint: member.checkpoint.subscribe(),
            })
            .collect()
    }

    /// Read-your-writes on the runner's first projection (same as
    /// `handle().freshness()`).
    pub fn freshness(&self) -> Freshness {
        self.handle().freshness()
    }

    /// Applies at most one batch: reads events after the lowest checkpoint and
    /// commits their effects together with the new checkpoints.
    pub async fn step(&mut self) -> Result<Progress, ProjectionError> {
        if self.members.iter().any(|member| member.position.is_none()) {
            self.load_checkpoints().await?;
        }
        let after = self.lowest();

        let events = self
            .reader
            .read(after, self.config.batch_size, &LogFilter::default())
            .await?;
        let Some(last) = events.last().map(|event| event.position) else {
            return Ok(Progress {
                events: 0,
                position: after,
                more: false,
            });
        };

        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let names = self.names();
        let committed = checkpoint::lock_all(&tx, &names).await?;
        let moved: Vec<usize> = (0..self.members.len())
            .filter(|&i| committed[i] != self.members[i].position)
            .collect();
        if !moved.is_empty() {
            // A rebuild swapped tables in, or another runner (another process) got
            // here first. What we read may already be applied: start over from what
            // is committed.
            drop(tx);
            for i in moved {
                let member = &mut self.members[i];
                tracing::info!(
                    projection = member.name(),
                    from = member.position,
                    to = committed[i],
                    "the checkpoint was moved by someone else; continuing from there"
                );
                match committed[i] {
                    Some(position) => member.publish(position),
                    // The row is gone: create it again on the next step.
                    None => member.position = None,
                }
            }
            return Ok(Progress {
                events: 0,
                position: self.lowest(),
                more: true,
            });
        }

        for (index, event) in events.iter().enumerate() {
            for (m, member) in self.members.iter().enumerate() {
                if member.position.is_some_and(|p| event.position <= p) {
                    continue;
                }
                if let Err(error) = member.projection.apply_boxed(&tx, event).await {
                    return Err(self.refused(tx, &events, index, m, error).await);
                }
            }
        }
        let ends: Vec<i64> = self
            .members
            .iter()
            .map(|member| member.position.map_or(last, |p| p.max(last)))
            .collect();
        checkpoint::store_all(&tx, &names, &ends).await?;
        tx.commit().await?;
        self.applied(&events, &ends);

        tracing::debug!(
            projections = ?names,
            count = events.len(),
            position = last,
            "applied events"
        );
        Ok(Progress {
            events: events.len(),
            position: self.lowest(),
            more: events.len() as i64 >= self.config.batch_size,
        })
    }

    /// Member `culprit` refused `events[index]`. An event a projection refuses
    /// before touching the database leaves the transaction usable: keep what every
    /// projection applied before it, so that the culprit's checkpoint stops right in
    /// front of it (and the projections before it in the runner keep the event, as
    /// they applied it), then answer the error.
    async fn refused(
        &mut self,
        tx: deadpool_postgres::Transaction<'_>,
        events: &[LoggedEvent],
        index: usize,
        culprit: usize,
        error: ProjectionError,
    ) -> ProjectionError {
        let refused = matches!(
            error,
            ProjectionError::Undecodable { .. } | ProjectionError::Malformed { .. }
        );
        if !refused {
            return error;
        }
        let names = self.names();
        let ends: Vec<i64> = self
            .members
            .iter()
            .enumerate()
            .map(|(m, member)| {
                let reached = if m < culprit {
                    Some(events[index].position)
                } else {
                    index.checked_sub(1).map(|before| events[before].position)
                };
                match (member.position, reached) {
                    (Some(p), Some(r)) => p.max(r),
                    (Some(p), None) => p,
                    (None, r) => r.unwrap_or(0),
                }
            })
            .collect();
        let kept = async {
            checkpoint::store_all(&tx, &names, &ends).await?;
            tx.commit().await?;
            Ok::<_, ProjectionError>(())
        }
        .await;
        match kept {
            Ok(()) => self.applied(&events[..index], &ends),
            Err(store_error) => tracing::warn!(
                error = %store_error,
                "could not keep the events before the one a projection refused"
            ),
        }
        error
    }

    /// Steps until the projections have applied everything that is safe to read
    /// now; returns the lowest checkpoint. For tests, the command line and start-up.
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
    /// [`ProjectionError::is_transient`]); the projections then stay where they are
    /// until someone fixes the cause and restarts it.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), ProjectionError> {
        let names = self.names();
        for name in &names {
            metrics::gauge!("dossier_projection_stopped", "projection" => *name).set(0.0);
        }
        tracing::info!(projections = ?names, "projection runner started");
        let mut backoff = Duration::ZERO;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let stepped = self.step().await;
            // Busy or idle, but not per batch: at most once per `lag_interval`.
            self.measure_lag().await;
            let pause = match stepped {
                Ok(progress) => {
                    backoff = Duration::ZERO;
                    if progress.more {
                        continue;
                    }
                    self.config.idle_poll
                }
                Err(error) if error.is_transient() => {
                    for name in &names {
                        metrics::counter!(
                            "dossier_projection_errors_total",
                            "projection" => *name,
                            "kind" => error.kind()
                        )
                        .increment(1);
                    }
                    backoff = (backoff * 2)
                        .max(Duration::from_millis(50))
                        .min(self.config.max_backoff);
                    tracing::warn!(
                        projections = ?names,
                        error = %error,
                        retry_in = ?backoff,
                        "projection step failed; the read models lag until it succeeds"
                    );
                    // Forget the cached positions: after an outage, re-read what is
                    // committed.
                    for member in &mut self.members {
                        member.position = None;
                    }
                    backoff
                }
                Err(error) => {
                    let projection = error.projection().unwrap_or("?");
                    metrics::counter!(
                        "dossier_projection_errors_total",
                        "projection" => projection,
                        "kind" => error.kind()
                    )
                    .increment(1);
                    for name in &names {
                        metrics::gauge!("dossier_projection_stopped", "projection" => *name)
                            .set(1.0);
                    }
                    tracing::error!(
                        projection,
                        error = %error,
                        positions = ?self.members.iter().map(|m| m.position).collect::<Vec<_>>(),
                        "projections stopped: they will not move past this event until the \
                         cause is fixed and the process restarted; queries show the state \
                         before it"
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
            projections = ?names,
            positions = ?self.members.iter().map(|m| m.position).collect::<Vec<_>>(),
            "projection runner stopped"
        );
        Ok(())
    }

    /// The lowest checkpoint of the runner's projections (0 for one not read yet).
    fn lowest(&self) -> i64 {
        self.members
            .iter()
            .map(|member| member.position.unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    /// Reads the committed checkpoints (creating missing rows at 0).
    async fn load_checkpoints(&mut self) -> Result<(), ProjectionError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let names = self.names();
        checkpoint::create_missing(&tx, &names).await?;
        let committed = checkpoint::lock_all(&tx, &names).await?;
        tx.commit().await?;
        for (member, position) in self.members.iter_mut().zip(committed) {
            member.publish(position.unwrap_or(0));
        }
        Ok(())
    }

    /// Books a committed batch: `ends[i]` is the new checkpoint of member `i`.
    fn applied(&mut self, events: &[LoggedEvent], ends: &[i64]) {
        for (member, &end) in self.members.iter_mut().zip(ends) {
            let from = member.position.unwrap_or(0);
            let count = events
                .iter()
                .filter(|e| e.position > from && e.position <= end)
                .count();
            metrics::counter!("dossier_projection_events_applied_total", "projection" => member.name())
                .increment(count as u64);
            member.publish(end);
        }
    }

    /// Updates the lag gauges when `lag_interval` has passed since the last time,
    /// whether the runner is busy or idle (the log may be held back by a long
    /// transaction even when nothing is read). A failure only costs a stale gauge,
    /// never the projections.
    async fn measure_lag(&mut self) {
        let now = Instant::now();
        if self
            .last_lag_check
            .is_some_and(|at| now.duration_since(at) < self.config.lag_interval)
        {
            return;
        }
        self.last_lag_check = Some(now);
        for member in &self.members {
            let Some(position) = member.position else {
                continue;
            };
            let name = member.name();
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
