//! Command handling: a domain command in, events in the log out.
//!
//! Both edges (HTTP and the AMQP intake) come through here. A command runs on
//! its aggregate through cqrs-es (event-store mode on our Postgres log); a
//! command that lost an optimistic-concurrency race is retried a bounded
//! number of times; on success the caller learns the log position of the
//! aggregate's last event and, before answering, waits until the read models
//! show it (CONTRACT.md rule 10: read your writes).

use std::collections::HashMap;
use std::time::Duration;

use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateError, CqrsFramework};
use dossier_domain::{Actor, File, FileCommand, FileId, FilePolicy, TenantId};
use dossier_eventlog::eventstore::{self, EventStoreError, PgEventStore};
use dossier_projections::Freshness;
use rand::Rng;
use uuid::Uuid;

use crate::error::ApiError;

/// How often a command that lost a race is tried again. Twelve staff renaming
/// one file at once is the busiest case we know of; each retry reloads the
/// file's few events, so this stays cheap.
const MAX_ATTEMPTS: u32 = 24;

/// How long an answer waits for the read models to show its own change.
const FRESHNESS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The aggregate refused the command; already mapped to the contract's code.
    #[error("{0}")]
    Rejected(ApiError),
    #[error("a concurrent change kept winning the race")]
    Conflict,
    /// The command's idempotency key was used before: it had its effect then.
    #[error("this command was already handled")]
    Duplicate,
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// Who sends a command, for which tenant, and how to tie it to its cause.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub tenant: TenantId,
    pub actor: Actor,
    pub correlation_id: Option<String>,
    /// An upstream message id: the command's events and its receipt are
    /// written together, so the same key never acts twice.
    pub idempotency_key: Option<String>,
}

impl CommandContext {
    pub fn new(tenant: TenantId, actor: Actor) -> Self {
        Self {
            tenant,
            actor,
            correlation_id: None,
            idempotency_key: None,
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        let mut metadata = HashMap::from([
            (eventstore::META_TENANT.to_owned(), self.tenant.to_string()),
            (eventstore::META_ACTOR.to_owned(), self.actor.to_string()),
            (
                eventstore::META_COMMAND_ID.to_owned(),
                Uuid::now_v7().to_string(),
            ),
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

/// The command path of every aggregate: one event store, and the read models
/// that answers wait for.
pub struct Commands {
    store: PgEventStore,
    file_policy: FilePolicy,
    freshness: Vec<Freshness>,
}

impl Commands {
    /// `freshness`: every read model a command's answer must already show.
    pub fn new(store: PgEventStore, file_policy: FilePolicy, freshness: Vec<Freshness>) -> Self {
        Self {
            store,
            file_policy,
            freshness,
        }
    }

    /// Runs a command on one file and waits until the read models show it.
    #[tracing::instrument(skip(self, ctx, command), fields(tenant = %ctx.tenant, file_id = %file_id))]
    pub async fn file(
        &self,
        ctx: &CommandContext,
        file_id: FileId,
        command: FileCommand,
    ) -> Result<Accepted, CommandError> {
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
    ) -> Result<Accepted, CommandError> {
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
    ) -> Result<Accepted, CommandError>
    where
        A: Aggregate + Send + Sync,
        A::Command: Clone,
        A::Services: Clone,
        A::Error: Into<ApiError>,
    {
        let accepted = self
            .execute::<A>(ctx, aggregate_id, command, services)
            .await?;
        self.await_read_models(accepted.position).await;
        Ok(accepted)
    }

    /// Blocks until every read model has applied `position`, or the timeout
    /// passed. The read models are waited on together: each runner is poked at
    /// once, so the answer waits for the slowest, not for their sum.
    pub async fn await_read_models(&self, position: i64) {
        let waits = self.freshness.iter().map(|freshness| async move {
            if !freshness.wait_for(position, FRESHNESS_TIMEOUT).await {
                tracing::warn!(
                    position,
                    projection = freshness.projection(),
                    "a command was recorded but a read model did not show it within {FRESHNESS_TIMEOUT:?}; \
                     is the projections role running?"
                );
            }
        });
        futures::future::join_all(waits).await;
    }

    /// Runs `command` through cqrs-es (event-store mode on our log), retrying a
    /// lost optimistic-concurrency race a bounded number of times. Does not
    /// wait for the read models: for facts no read model answer depends on
    /// (downloads), and for callers that wait once for many commands.
    pub async fn execute<A>(
        &self,
        ctx: &CommandContext,
        aggregate_id: &str,
        command: A::Command,
        services: A::Services,
    ) -> Result<Accepted, CommandError>
    where
        A: Aggregate + Send + Sync,
        A::Command: Clone,
        A::Error: Into<ApiError>,
    {
        execute::<A>(&self.store, ctx, aggregate_id, command, services).await
    }
}

async fn execute<A>(
    store: &PgEventStore,
    ctx: &CommandContext,
    aggregate_id: &str,
    command: A::Command,
    services: A::Services,
) -> Result<Accepted, CommandError>
where
    A: Aggregate + Send + Sync,
    A::Command: Clone,
    A::Error: Into<ApiError>,
{
    // Cheap: the framework is a store handle (a pool clone) and the services.
    // The handle notes where the append put the events, for read-your-writes.
    let (noting, appended) = store.noting_positions();
    let framework = CqrsFramework::new(
        PersistedEventStore::<PgEventStore, A>::new_event_store(noting),
        vec![],
        services,
    );
    for attempt in 1..=MAX_ATTEMPTS {
        match framework
            .execute_with_metadata(aggregate_id, command.clone(), ctx.metadata())
            .await
        {
            Ok(()) => {
                let position = match appended.get() {
                    Some(position) => position,
                    // A command that changed nothing: the read models must still
                    // show the aggregate as it stands, that is its last event.
                    None => store
                        .last_position(A::TYPE, aggregate_id)
                        .await
                        .map_err(|e| CommandError::Unavailable(e.to_string()))?
                        .unwrap_or(0),
                };
                metrics::counter!("dossier_commands_total", "aggregate" => A::TYPE, "outcome" => "accepted")
                    .increment(1);
                return Ok(Accepted { position });
            }
            Err(AggregateError::AggregateConflict) => {
                metrics::counter!("dossier_command_conflicts_total", "aggregate" => A::TYPE)
                    .increment(1);
                // Jittered, growing pause so that racing writers spread out.
                let ceiling = 2u64.saturating_pow(attempt.min(6));
                let pause = rand::rng().random_range(0..=ceiling);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            Err(AggregateError::UserError(error)) => {
                metrics::counter!("dossier_commands_total", "aggregate" => A::TYPE, "outcome" => "rejected")
                    .increment(1);
                return Err(CommandError::Rejected(error.into()));
            }
            Err(AggregateError::DatabaseConnectionError(error)) => {
                return Err(CommandError::Unavailable(error.to_string()));
            }
            Err(AggregateError::DeserializationError(error)) => {
                return Err(CommandError::Internal(format!(
                    "a stored event could not be read: {error}"
                )));
            }
            Err(AggregateError::UnexpectedError(error)) => {
                return Err(match error.downcast_ref::<EventStoreError>() {
                    Some(EventStoreError::DuplicateCommand { .. }) => CommandError::Duplicate,
                    _ => CommandError::Unavailable(error.to_string()),
                });
            }
        }
    }
    metrics::counter!("dossier_commands_total", "aggregate" => A::TYPE, "outcome" => "conflict")
        .increment(1);
    Err(CommandError::Conflict)
}
