//! The command path: a domain command in, events in the log out.
//!
//! Every aggregate command of Dossier comes through here: the HTTP API, the
//! AMQP intake, the blob worker and the zip worker alike. A command runs on
//! its aggregate through cqrs-es (event-store mode on our Postgres log), on
//! the state the process remembers of it when it has one ([`AggregateCache`]),
//! otherwise on its events as stored; a command that lost an
//! optimistic-concurrency race (a stale remembered state loses it too) is run
//! again under the one [`RacePolicy`]; every outcome is counted in the one set
//! of command metrics; the caller learns the log position of the aggregate's
//! last event and, when it answers a person, waits until the read models show
//! it (CONTRACT.md rule 10: read your writes).
//!
//! Failures are [`AppError`]s, and the path tells the two kinds of backing
//! failure apart: [`AppError::Unavailable`] when the command was refused
//! before its events were sent to the log (nothing was recorded), and
//! [`AppError::OutcomeUnknown`] when the append itself failed in a way that
//! does not say whether it committed (a connection lost after COMMIT).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cqrs_es::persist::{
    EventStoreAggregateContext, PersistedEventRepository, PersistedEventStore, PersistenceError,
    ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::{Aggregate, AggregateError, CqrsFramework, EventEnvelope, EventStore};
use dossier_domain::{Actor, File, FileCommand, FileId, FilePolicy, TenantId};
use dossier_eventlog::eventstore::{self, EventStoreError, PgEventStore};
use dossier_projections::Freshness;
use dossier_runtime::retry::Backoff;
use uuid::Uuid;

use crate::cache::{AggregateCache, DEFAULT_AGGREGATE_CACHE};
use crate::error::AppError;

/// How long an answer waits by default for the read models to show its own change.
pub const DEFAULT_FRESHNESS_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do when a command lost the optimistic-concurrency race for its
/// aggregate (another writer appended the same sequence number first, or the
/// state the process remembered was stale): load the aggregate again and
/// decide again, at most `attempts` times in all, pausing between tries as
/// `backoff` says so that racing writers spread out.
///
/// The one policy for every command of every process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RacePolicy {
    /// Tries in all, the first included; at least one.
    pub attempts: u32,
    /// The pause before each new try.
    pub backoff: Backoff,
}

impl RacePolicy {
    /// Twelve staff renaming one file at once is the busiest case we know of;
    /// each retry reloads the aggregate's few events, so 24 tries with pauses
    /// of a few milliseconds (at most 64) stay cheap and settle every such race.
    pub const DEFAULT: Self = Self {
        attempts: 24,
        backoff: Backoff {
            initial: Duration::from_millis(2),
            max: Duration::from_millis(64),
        },
    };
}

impl Default for RacePolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Who sends a command, for which tenant, and how to tie it to its cause.
/// [`Self::metadata`] is the one place that turns it into the event metadata.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub tenant: TenantId,
    pub actor: Actor,
    /// The id of what caused the command (an AMQP correlation id, the event a
    /// worker answers).
    pub correlation_id: Option<String>,
    /// An upstream message id: the command's events and its receipt are
    /// written together, so the same key never acts twice.
    pub idempotency_key: Option<String>,
    /// A fixed command id (a worker's, derived from the event it answers);
    /// `None` gives every run a fresh UUIDv7.
    pub command_id: Option<String>,
}

impl CommandContext {
    pub fn new(tenant: TenantId, actor: Actor) -> Self {
        Self {
            tenant,
            actor,
            correlation_id: None,
            idempotency_key: None,
            command_id: None,
        }
    }

    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    pub fn with_command_id(mut self, command_id: impl Into<String>) -> Self {
        self.command_id = Some(command_id.into());
        self
    }

    /// The metadata every event of the command carries (see
    /// `dossier_eventlog::eventstore`): tenant, actor, command id, and the
    /// correlation id and idempotency key when there are any.
    pub fn metadata(&self) -> HashMap<String, String> {
        let command_id = self
            .command_id
            .clone()
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        let mut metadata = HashMap::from([
            (eventstore::META_TENANT.to_owned(), self.tenant.to_string()),
            (eventstore::META_ACTOR.to_owned(), self.actor.to_string()),
            (eventstore::META_COMMAND_ID.to_owned(), command_id),
        ]);
        if let Some(key) = &self.idempotency_key {
            metadata.insert(eventstore::META_IDEMPOTENCY_KEY.to_owned(), key.clone());
        }
        if let Some(correlation_id) = &self.correlation_id {
            metadata.insert(
                eventstore::META_CORRELATION_ID.to_owned(),
                correlation_id.clone(),
            );
        }
        metadata
    }
}

/// What a successful command tells its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The log position of the aggregate's last event after the command.
    pub position: i64,
}

/// The command path of every aggregate: one event store, the race policy, and
/// the read models that answers wait for.
pub struct Commands {
    store: PgEventStore,
    file_policy: FilePolicy,
    freshness: Vec<Freshness>,
    freshness_timeout: Duration,
    races: RacePolicy,
    cache: Arc<AggregateCache>,
}

impl Commands {
    /// `freshness`: every read model a command's answer must already show
    /// (none for a worker, which answers nobody).
    pub fn new(store: PgEventStore, file_policy: FilePolicy, freshness: Vec<Freshness>) -> Self {
        Self {
            store,
            file_policy,
            freshness,
            freshness_timeout: DEFAULT_FRESHNESS_TIMEOUT,
            races: RacePolicy::DEFAULT,
            cache: Arc::new(AggregateCache::new(DEFAULT_AGGREGATE_CACHE)),
        }
    }

    /// Remembers at most `capacity` aggregates instead of
    /// [`DEFAULT_AGGREGATE_CACHE`]; 0 loads every aggregate's events for every
    /// command.
    pub fn with_aggregate_cache(mut self, capacity: usize) -> Self {
        self.cache = Arc::new(AggregateCache::new(capacity));
        self
    }

    /// The aggregates this command path remembers.
    pub fn aggregate_cache(&self) -> &AggregateCache {
        &self.cache
    }

    /// How long [`Self::await_read_models`] waits before it gives up.
    pub fn with_freshness_timeout(mut self, timeout: Duration) -> Self {
        self.freshness_timeout = timeout;
        self
    }

    /// Another [`RacePolicy`] than the default (tests of the policy).
    pub fn with_race_policy(mut self, races: RacePolicy) -> Self {
        self.races = races;
        self
    }

    /// The event store the commands append to.
    pub fn store(&self) -> &PgEventStore {
        &self.store
    }

    /// Runs a command on one file and waits until the read models show it.
    #[tracing::instrument(skip(self, ctx, command), fields(tenant = %ctx.tenant, file_id = %file_id))]
    pub async fn file(
        &self,
        ctx: &CommandContext,
        file_id: FileId,
        command: FileCommand,
    ) -> Result<Accepted, AppError> {
        let accepted = self.file_no_wait(ctx, file_id, command).await?;
        self.await_read_models(accepted.position).await;
        Ok(accepted)
    }

    /// Runs a command on one file without waiting for the read models; for
    /// callers that run many and wait once ([`Self::await_read_models`]).
    pub async fn file_no_wait(
        &self,
        ctx: &CommandContext,
        file_id: FileId,
        command: FileCommand,
    ) -> Result<Accepted, AppError> {
        self.execute::<File>(ctx, &file_id.to_string(), command, self.file_policy)
            .await
    }

    /// Runs a command on any aggregate and waits until the read models show it.
    pub async fn run<A>(
        &self,
        ctx: &CommandContext,
        aggregate_id: &str,
        command: A::Command,
        services: A::Services,
    ) -> Result<Accepted, AppError>
    where
        A: Aggregate + Clone + Send + Sync + 'static,
        A::Command: Clone,
        A::Error: Into<AppError>,
    {
        let accepted = self
            .execute::<A>(ctx, aggregate_id, command, services)
            .await?;
        self.await_read_models(accepted.position).await;
        Ok(accepted)
    }

    /// Waits until every read model has applied `position`, or the freshness
    /// timeout passed; `true` when they all show it. The read models are
    /// waited on together: each runner is poked at once, so the answer waits
    /// for the slowest, not for their sum.
    pub async fn await_read_models(&self, position: i64) -> bool {
        let timeout = self.freshness_timeout;
        let waits = self.freshness.iter().map(|freshness| async move {
            let shown = freshness.wait_for(position, timeout).await;
            if !shown {
                metrics::counter!("dossier_read_your_writes_timeouts_total", "projection" => freshness.projection())
                    .increment(1);
                tracing::warn!(
                    position,
                    projection = freshness.projection(),
                    "a command was recorded but a read model did not show it within {timeout:?}; \
                     is the projections role running?"
                );
            }
            shown
        });
        futures::future::join_all(waits)
            .await
            .into_iter()
            .all(|shown| shown)
    }

    /// Runs `command` through cqrs-es (event-store mode on our log, the
    /// aggregate remembered when it can be) under the [`RacePolicy`]. Does not
    /// wait for the read models: for facts no read model answer depends on
    /// (downloads, a worker's records), and for callers that wait once for
    /// many commands.
    pub async fn execute<A>(
        &self,
        ctx: &CommandContext,
        aggregate_id: &str,
        command: A::Command,
        services: A::Services,
    ) -> Result<Accepted, AppError>
    where
        A: Aggregate + Clone + Send + Sync + 'static,
        A::Command: Clone,
        A::Error: Into<AppError>,
    {
        let outcome = self
            .execute_racing::<A>(ctx, aggregate_id, command, services)
            .await;
        let label = match &outcome {
            Ok(_) => "accepted",
            Err(AppError::Conflict) => "conflict",
            Err(AppError::Duplicate) => "duplicate",
            Err(AppError::Unavailable(_)) => "unavailable",
            Err(AppError::OutcomeUnknown(_)) => "unknown",
            Err(AppError::Internal(_)) => "internal",
            Err(_) => "rejected",
        };
        metrics::counter!("dossier_commands_total", "aggregate" => A::TYPE, "outcome" => label)
            .increment(1);
        outcome
    }

    async fn execute_racing<A>(
        &self,
        ctx: &CommandContext,
        aggregate_id: &str,
        command: A::Command,
        services: A::Services,
    ) -> Result<Accepted, AppError>
    where
        A: Aggregate + Clone + Send + Sync + 'static,
        A::Command: Clone,
        A::Error: Into<AppError>,
    {
        // Cheap: the framework is a store handle (a pool clone) and the
        // services. The handle notes where the append put the events (for
        // read-your-writes), whether an append was tried (for telling a
        // refusal from an unknown outcome) and whether the decision was taken
        // on a remembered state.
        let (noting, appended) = self.store.noting_positions();
        let watched = AppendWatch::new(noting);
        let append_tried = watched.tried();
        let store = Remembering {
            inner: PersistedEventStore::<_, A>::new_event_store(watched),
            cache: Arc::clone(&self.cache),
            attempt: Arc::default(),
        };
        let attempt = Arc::clone(&store.attempt);
        let framework = CqrsFramework::new(store, vec![], services);
        let attempts = self.races.attempts.max(1);
        let mut lost = 0;
        loop {
            append_tried.store(false, Ordering::Release);
            let outcome = framework
                .execute_with_metadata(aggregate_id, command.clone(), ctx.metadata())
                .await;
            let remembered = attempt.remembered.load(Ordering::Acquire);
            // A decision on a remembered state that appended nothing (a refusal,
            // or nothing to change) is not checked by the append's sequence: take
            // it again on the stored events. Not a race: no pause, no try used.
            let unchecked = match &outcome {
                Ok(()) => appended.get().is_none(),
                Err(AggregateError::UserError(_)) => true,
                Err(_) => false,
            };
            if remembered && unchecked {
                self.cache.forget::<A>(aggregate_id);
                attempt.recall.store(false, Ordering::Release);
                metrics::counter!("dossier_aggregate_cache_total", "aggregate" => A::TYPE, "outcome" => "rechecked")
                    .increment(1);
                continue;
            }
            attempt.recall.store(true, Ordering::Release);
            let error = match outcome {
                Ok(()) => {
                    let position = match appended.get() {
                        Some(position) => position,
                        // A command that changed nothing: the read models must
                        // still show the aggregate as it stands, that is its
                        // last event.
                        None => self
                            .store
                            .last_position(A::TYPE, aggregate_id)
                            .await
                            .map_err(|e| AppError::Unavailable(e.to_string()))?
                            .unwrap_or(0),
                    };
                    return Ok(Accepted { position });
                }
                Err(AggregateError::AggregateConflict) => {
                    metrics::counter!("dossier_command_conflicts_total", "aggregate" => A::TYPE)
                        .increment(1);
                    lost += 1;
                    if lost >= attempts {
                        break;
                    }
                    tokio::time::sleep(self.races.backoff.delay(lost - 1)).await;
                    continue;
                }
                Err(AggregateError::UserError(error)) => return Err(error.into()),
                Err(AggregateError::DeserializationError(error)) => {
                    return Err(AppError::Internal(format!(
                        "a stored event could not be read: {error}"
                    )));
                }
                Err(AggregateError::DatabaseConnectionError(error))
                | Err(AggregateError::UnexpectedError(error)) => error,
            };
            return Err(classify_store_failure(
                error.as_ref(),
                append_tried.load(Ordering::Acquire),
            ));
        }
        tracing::warn!(
            aggregate = A::TYPE,
            aggregate_id,
            attempts,
            "a command kept losing the race for its aggregate; giving up"
        );
        Err(AppError::Conflict)
    }
}

/// What a failure of the event store means for the command: refused before
/// anything was written, or perhaps written.
fn classify_store_failure(
    error: &(dyn std::error::Error + Send + Sync + 'static),
    append_tried: bool,
) -> AppError {
    match error.downcast_ref::<EventStoreError>() {
        Some(EventStoreError::DuplicateCommand { .. }) => AppError::Duplicate,
        // No connection was had: nothing was sent.
        Some(EventStoreError::Pool(_)) => AppError::Unavailable(error.to_string()),
        // Refused before a connection was taken: a bug in the command path.
        Some(
            EventStoreError::MissingTenant { .. }
            | EventStoreError::BadMetadata { .. }
            | EventStoreError::PayloadTag { .. }
            | EventStoreError::SequenceOutOfRange(_),
        ) => AppError::Internal(error.to_string()),
        // A statement failed: while loading the aggregate nothing was
        // written; during the append, the COMMIT may have happened.
        _ if append_tried => AppError::OutcomeUnknown(error.to_string()),
        _ => AppError::Unavailable(error.to_string()),
    }
}

/// How one command's current try loads its aggregate, shared between the
/// loop in [`Commands::execute`] and the framework's [`Remembering`] store.
#[derive(Debug)]
struct Attempt {
    /// Whether the try may use a remembered state (not when it checks a
    /// decision taken on one).
    recall: AtomicBool,
    /// Whether the try's decision was taken on a remembered state.
    remembered: AtomicBool,
}

impl Default for Attempt {
    fn default() -> Self {
        Self {
            recall: AtomicBool::new(true),
            remembered: AtomicBool::new(false),
        }
    }
}

/// The event store as the framework sees it: cqrs-es's own (event-store mode
/// on our log) behind the [`AggregateCache`]. A load answers the remembered
/// state when there is one and the try may use it; otherwise it loads the
/// events and remembers what they give. A commit that succeeded is remembered
/// with its events applied; one that failed forgets the aggregate.
struct Remembering<A: Aggregate> {
    inner: PersistedEventStore<AppendWatch, A>,
    cache: Arc<AggregateCache>,
    attempt: Arc<Attempt>,
}

impl<A> EventStore<A> for Remembering<A>
where
    A: Aggregate + Clone + Send + Sync + 'static,
{
    type AC = EventStoreAggregateContext<A>;

    async fn load_events(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        self.inner.load_events(aggregate_id).await
    }

    async fn load_aggregate(
        &self,
        aggregate_id: &str,
    ) -> Result<EventStoreAggregateContext<A>, AggregateError<A::Error>> {
        let recalled = if self.attempt.recall.load(Ordering::Acquire) {
            self.cache.get::<A>(aggregate_id)
        } else {
            None
        };
        let outcome = if recalled.is_some() { "hit" } else { "miss" };
        metrics::counter!("dossier_aggregate_cache_total", "aggregate" => A::TYPE, "outcome" => outcome)
            .increment(1);
        self.attempt
            .remembered
            .store(recalled.is_some(), Ordering::Release);
        if let Some((aggregate, sequence)) = recalled {
            return Ok(EventStoreAggregateContext {
                aggregate_id: aggregate_id.to_owned(),
                aggregate,
                current_sequence: sequence,
                current_snapshot: None,
            });
        }
        let context = self.inner.load_aggregate(aggregate_id).await?;
        // An aggregate without events is not worth remembering (and a flood of
        // unknown ids would push the others out).
        if context.current_sequence > 0 {
            self.cache.put(
                aggregate_id,
                context.aggregate.clone(),
                context.current_sequence,
            );
        }
        Ok(context)
    }

    async fn commit(
        &self,
        events: Vec<A::Event>,
        context: EventStoreAggregateContext<A>,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        if events.is_empty() {
            return self.inner.commit(events, context, metadata).await;
        }
        // The state after the events, as the next load of them would give it.
        let mut after = context.aggregate.clone();
        for event in &events {
            after.apply(event.clone());
        }
        let sequence = context.current_sequence + events.len();
        let aggregate_id = context.aggregate_id.clone();
        let committed = self.inner.commit(events, context, metadata).await;
        match &committed {
            Ok(_) => self.cache.put(&aggregate_id, after, sequence),
            // Lost the race (the remembered state was stale, or another writer
            // came first), or perhaps not written at all: load it next time.
            Err(_) => self.cache.forget::<A>(&aggregate_id),
        }
        committed
    }
}

/// The event store as cqrs-es's own store sees it, noting whether an append
/// was tried: a failure before that recorded nothing, one after it may have.
struct AppendWatch {
    store: PgEventStore,
    tried: Arc<AtomicBool>,
}

impl AppendWatch {
    fn new(store: PgEventStore) -> Self {
        Self {
            store,
            tried: Arc::new(AtomicBool::new(false)),
        }
    }

    fn tried(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.tried)
    }
}

impl PersistedEventRepository for AppendWatch {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.store.get_events::<A>(aggregate_id).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.store
            .get_last_events::<A>(aggregate_id, last_sequence)
            .await
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        self.store.get_snapshot::<A>(aggregate_id).await
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, serde_json::Value, usize)>,
    ) -> Result<(), PersistenceError> {
        self.tried.store(true, Ordering::Release);
        self.store.persist::<A>(events, snapshot_update).await
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        self.store.stream_events::<A>(aggregate_id).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        self.store.stream_all_events::<A>().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_carries_who_for_whom_and_why() {
        let ctx = CommandContext::new(TenantId::parse("acme").unwrap(), Actor::new("crm"))
            .with_correlation_id("corr-1")
            .with_idempotency_key("msg-1")
            .with_command_id("blob-purge:e1");
        let metadata = ctx.metadata();
        assert_eq!(metadata[eventstore::META_TENANT], "acme");
        assert_eq!(metadata[eventstore::META_ACTOR], "crm");
        assert_eq!(metadata[eventstore::META_COMMAND_ID], "blob-purge:e1");
        assert_eq!(metadata[eventstore::META_CORRELATION_ID], "corr-1");
        assert_eq!(metadata[eventstore::META_IDEMPOTENCY_KEY], "msg-1");
    }

    #[test]
    fn without_a_fixed_id_every_run_gets_its_own_command_id() {
        let ctx = CommandContext::new(TenantId::parse("acme").unwrap(), Actor::new("staff-1"));
        let (first, second) = (ctx.metadata(), ctx.metadata());
        assert_ne!(
            first[eventstore::META_COMMAND_ID],
            second[eventstore::META_COMMAND_ID]
        );
        assert!(!first.contains_key(eventstore::META_IDEMPOTENCY_KEY));
        assert!(!first.contains_key(eventstore::META_CORRELATION_ID));
    }

    #[test]
    fn a_failed_statement_is_an_unknown_outcome_only_once_the_append_was_tried() {
        let io = std::io::Error::other("connection reset");
        assert!(matches!(
            classify_store_failure(&io, true),
            AppError::OutcomeUnknown(_)
        ));
        assert!(matches!(
            classify_store_failure(&io, false),
            AppError::Unavailable(_)
        ));
        let duplicate = EventStoreError::DuplicateCommand {
            tenant: "acme".into(),
            key: "k".into(),
        };
        assert!(matches!(
            classify_store_failure(&duplicate, true),
            AppError::Duplicate
        ));
        let missing = EventStoreError::MissingTenant {
            aggregate_type: "file".into(),
            aggregate_id: "f".into(),
        };
        assert!(matches!(
            classify_store_failure(&missing, true),
            AppError::Internal(_)
        ));
    }

    #[test]
    fn the_race_policy_is_bounded_and_pauses_briefly() {
        let policy = RacePolicy::DEFAULT;
        assert!(policy.attempts >= 2);
        for attempt in 0..policy.attempts {
            assert!(policy.backoff.delay(attempt) <= Duration::from_millis(64));
        }
    }
}
