//! The [`Runner`]: keeps one [`Follower`] caught up with the log.
//!
//! Each step reads up to a batch of events after the follower's lowest
//! checkpoint (through [`LogReader`], which only returns positions below the safe
//! watermark), then in ONE transaction: takes the follower's turn (its checkpoint
//! rows, see [`checkpoint`]), checks that nobody moved them meanwhile, lets the
//! follower apply the batch, stores the checkpoints it answers and commits. If
//! someone else moved a checkpoint (another instance, a rebuild), the step drops
//! what it read and continues from what is committed.
//!
//! When there is nothing to do the runner polls every
//! [`RunnerConfig::idle_poll`], or at once when poked (the command path does that
//! after it appended events). Each checkpoint is published on a `watch` channel
//! after every commit, which is what in-process read-your-writes waits on.
//!
//! Failures: a transient one (Postgres unreachable, the broker down) is logged
//! and retried with [`RunnerConfig::backoff`], from what is committed; anything
//! else stops the runner with an error log, a metric and an `Err`, never a panic
//! or a silent skip.
//!
//! Metrics (label `follower`: the checkpoint's name, e.g. `files`, `relay`,
//! `sealer`): `dossier_follower_events_total`, `dossier_follower_checkpoint`,
//! `dossier_follower_lag_events`, `dossier_follower_lag_seconds`,
//! `dossier_follower_errors_total` (label `kind`), `dossier_follower_stopped` (1
//! once the runner gave up).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dossier_runtime::retry::Backoff;
use dossier_runtime::shutdown::{is_stopping, stopped};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::{FollowError, Follower, Halt, checkpoint};
use crate::db::Pool;
use crate::log::{LogFilter, LogReader, LoggedEvent};

/// How a [`Runner`] paces itself.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Most events applied in one transaction. Bigger batches catch up faster;
    /// smaller ones hold the turn for less time.
    pub batch_size: i64,
    /// Pause between two looks at the log when there was nothing new (a poke
    /// ends it early).
    pub idle_poll: Duration,
    /// Pauses between attempts after a transient failure.
    pub backoff: Backoff,
    /// How often lag is measured, busy or idle; never per batch: under load a
    /// query per batch is a query per handful of commands.
    pub lag_interval: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            idle_poll: Duration::from_millis(10),
            backoff: Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_secs(5),
            },
            lag_interval: Duration::from_secs(1),
        }
    }
}

/// What one [`Runner::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Events the step read from the log and committed (of every aggregate type:
    /// the checkpoints move past the ones the follower ignores too).
    pub events: usize,
    /// The lowest checkpoint of the follower's members after the step.
    pub position: i64,
    /// Whether there is probably more to do right away (a full batch, or a
    /// checkpoint was moved by someone else).
    pub more: bool,
}

/// One checkpoint of the follower.
struct Member {
    name: &'static str,
    /// The checkpoint as this runner last saw it committed; `None` before it was
    /// read from the database (or after a failure, to read it again).
    position: Option<i64>,
    checkpoint: watch::Sender<i64>,
}

impl Member {
    fn publish(&mut self, position: i64) {
        self.position = Some(position);
        // send_replace: publish even when nobody subscribed yet.
        self.checkpoint.send_replace(position);
        metrics::gauge!("dossier_follower_checkpoint", "follower" => self.name)
            .set(position as f64);
    }
}

/// Keeps a [`Follower`] caught up with the log (see the module docs).
pub struct Runner<F> {
    pool: Pool,
    reader: LogReader,
    follower: F,
    members: Vec<Member>,
    config: RunnerConfig,
    wake: Arc<Notify>,
    last_lag_check: Option<Instant>,
}

impl<F> std::fmt::Debug for Runner<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field(
                "checkpoints",
                &self
                    .members
                    .iter()
                    .map(|m| (m.name, m.position))
                    .collect::<Vec<_>>(),
            )
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<F: Follower> Runner<F> {
    /// A runner of `follower` on the database of `pool` (migrated), with a log
    /// reader of its own; give it the process's one reader with
    /// [`Self::reading_from`].
    pub fn new(pool: Pool, follower: F, config: RunnerConfig) -> Self {
        let reader = LogReader::new(pool.clone());
        let mut runner = Self {
            pool,
            reader,
            follower,
            members: Vec::new(),
            config,
            wake: Arc::new(Notify::new()),
            last_lag_check: None,
        };
        runner.sync_members();
        runner
    }

    /// Reads the log through `reader`, a clone of the process's one reader, so
    /// that the runner shares the safe watermark with the other followers (see
    /// [`LogReader`]) instead of working it out again.
    pub fn reading_from(mut self, reader: LogReader) -> Self {
        self.reader = reader;
        self
    }

    /// Paces it by `config`.
    pub fn with_config(mut self, config: RunnerConfig) -> Self {
        self.config = config;
        self
    }

    /// The follower.
    pub fn follower(&self) -> &F {
        &self.follower
    }

    /// Changes the follower (before it runs: adds a read model to a runner of
    /// several); members it names from now on get a checkpoint of their own.
    pub fn update(&mut self, change: impl FnOnce(&mut F)) {
        change(&mut self.follower);
        self.sync_members();
    }

    fn sync_members(&mut self) {
        let names = self.follower.checkpoints();
        let mut members = Vec::with_capacity(names.len());
        for name in names {
            let member = match self.members.iter().position(|m| m.name == name) {
                Some(i) => self.members.swap_remove(i),
                None => Member {
                    name,
                    position: None,
                    checkpoint: watch::channel(0).0,
                },
            };
            members.push(member);
        }
        self.members = members;
    }

    /// The names of the follower's checkpoints.
    pub fn names(&self) -> Vec<&'static str> {
        self.members.iter().map(|m| m.name).collect()
    }

    /// The checkpoint `name` as last committed by this runner, followable; `None`
    /// for a name the follower does not have.
    pub fn subscribe(&self, name: &str) -> Option<watch::Receiver<i64>> {
        self.members
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.checkpoint.subscribe())
    }

    /// What pokes the runner: `notify_one` makes it look at the log now instead
    /// of at its next poll (a permit is kept when it is busy, so no poke is lost).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Applies at most one batch: reads events after the lowest checkpoint and
    /// commits their effects together with the new checkpoints.
    pub async fn step(&mut self) -> Result<Progress, F::Error> {
        self.follower.prepare().await?;
        if self.members.iter().any(|member| member.position.is_none()) {
            self.load_checkpoints().await?;
        }
        let after = self.lowest();
        let events = self
            .reader
            .read(after, self.config.batch_size, &LogFilter::default())
            .await
            .map_err(FollowError::from)?;
        let Some(last) = events.last().map(|event| event.position) else {
            return Ok(Progress {
                events: 0,
                position: after,
                more: false,
            });
        };

        let mut client = self.pool.get().await.map_err(FollowError::from)?;
        let tx = client.transaction().await.map_err(FollowError::from)?;
        let names = self.names();
        let committed = checkpoint::take_turns(&tx, &names, F::EFFECTS)
            .await
            .map_err(FollowError::from)?;
        let moved: Vec<usize> = (0..self.members.len())
            .filter(|&i| committed[i] != self.members[i].position)
            .collect();
        if !moved.is_empty() {
            // Another instance got here first, or a rebuild swapped tables in.
            // What we read may already be applied: start over from what is
            // committed.
            drop(tx);
            for i in moved {
                let member = &mut self.members[i];
                tracing::info!(
                    follower = member.name,
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

        let from: Vec<i64> = self
            .members
            .iter()
            .map(|m| m.position.unwrap_or(0))
            .collect();
        match self.follower.apply(&tx, &events, &from).await {
            Ok(ends) => {
                let ends = bounded(&ends, &from, last);
                checkpoint::store_all(&tx, &names, &ends)
                    .await
                    .map_err(FollowError::from)?;
                tx.commit().await.map_err(FollowError::from)?;
                self.applied(&events, &ends);
                tracing::debug!(
                    followers = ?names,
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
            Err(Halt { error, keep: None }) => Err(error),
            Err(Halt {
                error,
                keep: Some(ends),
            }) => {
                // Keep what was done before the failure: the checkpoints stop
                // right in front of it.
                let ends = bounded(&ends, &from, last);
                let kept = async {
                    checkpoint::store_all(&tx, &names, &ends).await?;
                    tx.commit().await
                }
                .await;
                match kept {
                    Ok(()) => self.applied(&events, &ends),
                    Err(store_error) => tracing::warn!(
                        followers = ?names,
                        error = %FollowError::from(store_error),
                        "could not keep the events before the one that failed; they are applied again"
                    ),
                }
                Err(error)
            }
        }
    }

    /// Steps until the follower has applied everything that is safe to read
    /// now; returns the lowest checkpoint. For tests, the command line and
    /// start-up.
    pub async fn catch_up(&mut self) -> Result<i64, F::Error> {
        loop {
            let progress = self.step().await?;
            if !progress.more {
                return Ok(progress.position);
            }
        }
    }

    /// Runs until `shutdown` turns `true` (or its sender goes away): steps,
    /// sleeps when idle, retries transient failures with backoff. A batch in
    /// flight when the signal comes is dropped uncommitted (its transaction rolls
    /// back; the next run repeats it).
    ///
    /// Returns `Err` only for a failure that retrying cannot fix (see
    /// [`Follower::is_transient`]); the follower then stays where it is until
    /// someone fixes the cause and restarts it.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), F::Error> {
        let names = self.names();
        for name in &names {
            metrics::gauge!("dossier_follower_stopped", "follower" => *name).set(0.0);
        }
        tracing::info!(followers = ?names, "following the log");
        let mut failures = 0u32;
        loop {
            if is_stopping(&shutdown) {
                break;
            }
            let stepped = tokio::select! {
                stepped = self.step() => stepped,
                () = stopped(&mut shutdown) => break,
            };
            // Busy or idle, but not per batch: at most once per `lag_interval`.
            self.measure_lag().await;
            let pause = match stepped {
                Ok(progress) => {
                    failures = 0;
                    if progress.more {
                        continue;
                    }
                    self.config.idle_poll
                }
                Err(error) if F::is_transient(&error) => {
                    if is_stopping(&shutdown) {
                        break;
                    }
                    self.count_error(&error);
                    let delay = self.config.backoff.delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(
                        followers = ?names,
                        error = %error,
                        attempt = failures,
                        retry_in_ms = delay.as_millis() as u64,
                        "following the log failed; the follower lags until it works again, \
                         and nothing is skipped"
                    );
                    // After an outage, re-read what is committed.
                    for member in &mut self.members {
                        member.position = None;
                    }
                    delay
                }
                Err(error) => {
                    self.count_error(&error);
                    for name in &names {
                        metrics::gauge!("dossier_follower_stopped", "follower" => *name).set(1.0);
                    }
                    tracing::error!(
                        followers = ?names,
                        culprit = F::culprit(&error),
                        error = %error,
                        positions = ?self.members.iter().map(|m| m.position).collect::<Vec<_>>(),
                        "the follower stopped: it will not move past this event until the cause \
                         is fixed and the process restarted"
                    );
                    return Err(error);
                }
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                () = stopped(&mut shutdown) => break,
            }
        }
        tracing::info!(
            followers = ?names,
            positions = ?self.members.iter().map(|m| m.position).collect::<Vec<_>>(),
            "stopped following the log"
        );
        Ok(())
    }

    fn count_error(&self, error: &F::Error) {
        let kind = F::kind(error);
        let names = match F::culprit(error) {
            Some(culprit) => vec![culprit],
            None => self.names(),
        };
        for name in names {
            metrics::counter!("dossier_follower_errors_total", "follower" => name, "kind" => kind)
                .increment(1);
        }
    }

    /// The lowest checkpoint of the members (0 for one not read yet).
    fn lowest(&self) -> i64 {
        self.members
            .iter()
            .map(|member| member.position.unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    /// Reads the committed checkpoints (creating missing rows at 0), waiting for
    /// a batch of another instance in flight.
    async fn load_checkpoints(&mut self) -> Result<(), FollowError> {
        let mut client = self.pool.get().await?;
        let names = self.names();
        let tx = client.transaction().await?;
        checkpoint::create_missing(&tx, &names).await?;
        tx.commit().await?;
        let tx = client.transaction().await?;
        let committed = checkpoint::take_turns(&tx, &names, F::EFFECTS).await?;
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
            metrics::counter!("dossier_follower_events_total", "follower" => member.name)
                .increment(count as u64);
            member.publish(end);
        }
    }

    /// Updates the lag gauges when `lag_interval` has passed since the last
    /// time, whether the runner is busy or idle (the log may be held back by a
    /// long transaction even when nothing is read). A failure only costs a stale
    /// gauge, never the follower.
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
            match log_head(&self.pool, position).await {
                Ok((head, oldest_pending)) => {
                    let events = (head - position).max(0);
                    let seconds = oldest_pending.map_or(0.0, |at| {
                        (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
                    });
                    metrics::gauge!("dossier_follower_lag_events", "follower" => member.name)
                        .set(events as f64);
                    metrics::gauge!("dossier_follower_lag_seconds", "follower" => member.name)
                        .set(seconds);
                }
                Err(error) => {
                    tracing::debug!(follower = member.name, error = %error, "could not measure lag");
                }
            }
        }
    }
}

/// The follower's answer, held to what the batch allows: never behind the
/// committed checkpoint, never past the batch's last event.
fn bounded(ends: &[i64], from: &[i64], last: i64) -> Vec<i64> {
    from.iter()
        .enumerate()
        .map(|(i, &start)| {
            ends.get(i)
                .copied()
                .unwrap_or(start)
                .clamp(start, last.max(start))
        })
        .collect()
}

/// The newest committed position of the log, and when the oldest committed event
/// after `after` was recorded (`None` when there is none).
async fn log_head(pool: &Pool, after: i64) -> Result<(i64, Option<DateTime<Utc>>), FollowError> {
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

#[cfg(test)]
mod tests {
    use super::bounded;

    #[test]
    fn a_followers_answer_never_moves_a_checkpoint_back_or_past_the_batch() {
        assert_eq!(bounded(&[7, 3, 99], &[5, 5, 5], 10), vec![7, 5, 10]);
        // A missing answer keeps the member where it was.
        assert_eq!(bounded(&[], &[4, 6], 10), vec![4, 6]);
        // A member already past the batch stays there.
        assert_eq!(bounded(&[12], &[12], 10), vec![12]);
    }
}
