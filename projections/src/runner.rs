//! The read models' follower: every [`Projection`] of a process, kept up to date
//! by the log's one runner ([`dossier_eventlog::follow::Runner`]).
//!
//! Each step reads up to a batch of events after the lowest checkpoint, then in
//! ONE transaction: locks the read models' checkpoint rows, applies every event
//! (the batch's writes sent to Postgres together, see [`ApplyTx`]), moves the
//! checkpoints to the last one, commits. A crash anywhere leaves either
//! all of a batch or none of it, and the next run starts exactly after the last
//! committed event. On top of that every projection is idempotent per event, so
//! even a checkpoint moved back by hand does no harm.
//!
//! A process runs every read model in **one** runner ([`Runner::with`]): one
//! read serves every projection, and one transaction per batch applies the batch
//! to all of them and stores all their checkpoints. Each projection keeps a
//! checkpoint row of its own (a rebuild swaps one read model and moves only its
//! checkpoint), and an event is applied to a projection only above that
//! projection's checkpoint.
//!
//! An event a projection refuses (it does not decode, or is malformed) stops the
//! runner, loudly and without skipping it; the other projections of the batch
//! keep what they applied before the culprit, exactly like the one that refused
//! it. Metrics: see [`dossier_eventlog::follow`] (label `follower` = the
//! projection's name).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use deadpool_postgres::Transaction;
use dossier_eventlog::db::Pool;
use dossier_eventlog::follow::{self, Effects, Follower, Halt};
use dossier_eventlog::log::{LogReader, LoggedEvent};
use dossier_eventlog::personal::{Erased, FieldCipher};
use tokio::sync::{Notify, watch};

use crate::error::ProjectionError;
use crate::freshness::Freshness;
use crate::projection::{ApplyTx, Projection};

pub use dossier_eventlog::follow::{Progress, RunnerConfig};

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
    fn apply_boxed<'a>(&'a self, tx: &'a ApplyTx<'_>, event: &'a LoggedEvent) -> ApplyFuture<'a>;
}

impl<P: Projection> AnyProjection for P {
    fn name(&self) -> &'static str {
        Projection::name(self)
    }

    fn apply_boxed<'a>(&'a self, tx: &'a ApplyTx<'_>, event: &'a LoggedEvent) -> ApplyFuture<'a> {
        Box::pin(Projection::apply(self, tx, event))
    }
}

/// The read models of a runner, as one [`Follower`] with a checkpoint each.
#[derive(Default)]
struct ReadModels {
    projections: Vec<Box<dyn AnyProjection>>,
    /// Opens personal fields before the read models see them.
    cipher: Option<Arc<FieldCipher>>,
}

impl Follower for ReadModels {
    type Error = ProjectionError;
    const EFFECTS: Effects = Effects::InTransaction;

    fn checkpoints(&self) -> Vec<&'static str> {
        self.projections.iter().map(|p| p.name()).collect()
    }

    async fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[LoggedEvent],
        from: &[i64],
    ) -> Result<Vec<i64>, Halt<ProjectionError>> {
        // Read models hold names, titles and texts in clear (they are searched
        // and shown); a field whose key is gone reads as the placeholder, and
        // the delete or erasure that destroyed the key removes its row.
        let opened;
        let events = match &self.cipher {
            Some(cipher) => {
                cipher.forget_destroyed_by(events);
                let mut copy = events.to_vec();
                cipher
                    .open(&mut copy, Erased::Placeholder)
                    .await
                    .map_err(|error| Halt::rollback(ProjectionError::Keys(error)))?;
                opened = copy;
                &opened[..]
            }
            None => events,
        };
        // The live tables: statements prepared once per pooled connection,
        // the batch's writes sent together (one round trip, see `ApplyTx`).
        let tx = ApplyTx::pipelined(tx);
        for (index, event) in events.iter().enumerate() {
            for (m, projection) in self.projections.iter().enumerate() {
                if event.position <= from[m] {
                    continue;
                }
                if let Err(error) = projection.apply_boxed(&tx, event).await {
                    // What was applied before a refused event is kept: send it.
                    if is_refusal(&error)
                        && let Err(sent) = tx.flush().await
                    {
                        return Err(Halt::rollback(sent.into()));
                    }
                    return Err(refused(events, index, m, from, error));
                }
            }
        }
        if let Err(error) = tx.flush().await {
            return Err(Halt::rollback(error.into()));
        }
        let last = events.last().map_or(0, |event| event.position);
        Ok(from.iter().map(|&p| p.max(last)).collect())
    }

    fn is_transient(error: &ProjectionError) -> bool {
        error.is_transient()
    }

    fn kind(error: &ProjectionError) -> &'static str {
        error.kind()
    }

    fn culprit(error: &ProjectionError) -> Option<&'static str> {
        error.projection()
    }
}

/// Whether a projection refused an event before touching the database (it
/// does not decode, or is malformed), which leaves the transaction usable.
fn is_refusal(error: &ProjectionError) -> bool {
    matches!(
        error,
        ProjectionError::Undecodable { .. } | ProjectionError::Malformed { .. }
    )
}

/// Member `culprit` refused `events[index]`. An event a projection refuses
/// before touching the database leaves the transaction usable: keep what every
/// projection applied before it, so that the culprit's checkpoint stops right in
/// front of it (and the projections before it in the runner keep the event, as
/// they applied it). Any other failure rolls the batch back.
fn refused(
    events: &[LoggedEvent],
    index: usize,
    culprit: usize,
    from: &[i64],
    error: ProjectionError,
) -> Halt<ProjectionError> {
    if !is_refusal(&error) {
        return Halt::rollback(error);
    }
    let ends = from
        .iter()
        .enumerate()
        .map(|(m, &p)| {
            let reached = if m < culprit {
                Some(events[index].position)
            } else {
                index.checked_sub(1).map(|before| events[before].position)
            };
            reached.map_or(p, |r| p.max(r))
        })
        .collect();
    Halt::keep(ends, error)
}

/// Keeps its projections caught up with the log (see the module docs).
#[derive(Debug)]
pub struct Runner {
    inner: follow::Runner<ReadModels>,
}

impl Runner {
    /// A runner for `projection` on the database of `pool` (migrated). Add more
    /// projections to the same runner with [`Runner::with`].
    pub fn new<P: Projection>(pool: Pool, projection: P, config: RunnerConfig) -> Self {
        Self {
            inner: follow::Runner::new(pool, ReadModels::default(), config),
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
        self.inner
            .update(|models| models.projections.push(Box::new(projection)));
        self
    }

    /// Reads the log through `reader`, a clone of the process's one reader, so
    /// that the runner shares the safe watermark with the other followers (see
    /// [`LogReader`]) instead of working it out again.
    pub fn reading_from(mut self, reader: LogReader) -> Self {
        self.inner = self.inner.reading_from(reader);
        self
    }

    /// Opens the personal fields of every event with `cipher` before the
    /// projections apply it (CONTRACT.md, "Data protection").
    pub fn opening_with(mut self, cipher: Arc<FieldCipher>) -> Self {
        self.inner.update(|models| models.cipher = Some(cipher));
        self
    }

    /// The names of the runner's projections, in the order they apply each event.
    pub fn names(&self) -> Vec<&'static str> {
        self.inner.names()
    }

    /// The handle of the runner's first projection (for a runner of one projection,
    /// its only one). See [`Self::handles`].
    pub fn handle(&self) -> RunnerHandle {
        self.handles().remove(0)
    }

    /// One handle per projection (wake-ups, checkpoint, freshness).
    pub fn handles(&self) -> Vec<RunnerHandle> {
        self.names()
            .into_iter()
            .filter_map(|name| {
                Some(RunnerHandle {
                    name,
                    wake: self.inner.waker(),
                    checkpoint: self.inner.subscribe(name)?,
                })
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
        self.inner.step().await
    }

    /// Steps until the projections have applied everything that is safe to read
    /// now; returns the lowest checkpoint. For tests, the command line and start-up.
    pub async fn catch_up(&mut self) -> Result<i64, ProjectionError> {
        self.inner.catch_up().await
    }

    /// Runs until `shutdown` turns `true` (or its sender goes away); see
    /// [`follow::Runner::run`]. Returns `Err` only for a failure that retrying
    /// cannot fix (see [`ProjectionError::is_transient`]); the projections then
    /// stay where they are until someone fixes the cause and restarts it.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), ProjectionError> {
        self.inner.run(shutdown).await
    }
}
