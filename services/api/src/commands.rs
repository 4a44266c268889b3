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
use dossier_domain::{Actor, File, FileCommand, FileError, FileId, FilePolicy, TenantId};
use dossier_platform::eventstore::{self, PgEventStore};
use dossier_projections::Freshness;
use rand::Rng;
use uuid::Uuid;

/// How often a command that lost a race is tried again. Twelve staff renaming
/// one file at once is the busiest case we know of; each retry reloads the
/// file's few events, so this stays cheap.
const MAX_ATTEMPTS: u32 = 24;

/// How long an answer waits for the read models to show its own change.
const FRESHNESS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("a concurrent change kept winning the race")]
    Conflict,
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
}

impl CommandContext {
    pub fn new(tenant: TenantId, actor: Actor) -> Self {
        Self {
            tenant,
            actor,
            correlation_id: None,
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

type Framework<A> = CqrsFramework<A, PersistedEventStore<PgEventStore, A>>;

pub struct Commands {
    files: Framework<File>,
    store: PgEventStore,
    freshness: Freshness,
}

impl Commands {
    pub fn new(store: PgEventStore, policy: FilePolicy, freshness: Freshness) -> Self {
        let files = CqrsFramework::new(
            PersistedEventStore::new_event_store(store.clone()),
            vec![],
            policy,
        );
        Self {
            files,
            store,
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
        execute(&self.files, &self.store, ctx, &file_id.to_string(), command).await
    }

    /// Blocks until every read model has applied `position`, or the timeout passed.
    pub async fn await_read_models(&self, position: i64) {
        if !self.freshness.wait_for(position, FRESHNESS_TIMEOUT).await {
            tracing::warn!(
                position,
                "a command was recorded but the read models did not show it within {FRESHNESS_TIMEOUT:?}; \
                 is the projections role running?"
            );
        }
    }
}

async fn execute<A>(
    framework: &Framework<A>,
    store: &PgEventStore,
    ctx: &CommandContext,
    aggregate_id: &str,
    command: A::Command,
) -> Result<Accepted, CommandError>
where
    A: Aggregate + Send + Sync,
    A::Command: Clone,
    CommandError: From<A::Error>,
{
    for attempt in 1..=MAX_ATTEMPTS {
        match framework
            .execute_with_metadata(aggregate_id, command.clone(), ctx.metadata())
            .await
        {
            Ok(()) => {
                let position = store
                    .last_position(A::TYPE, aggregate_id)
                    .await
                    .map_err(|e| CommandError::Unavailable(e.to_string()))?
                    .unwrap_or(0);
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
                return Err(error.into());
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
                return Err(CommandError::Unavailable(error.to_string()));
            }
        }
    }
    metrics::counter!("dossier_commands_total", "aggregate" => A::TYPE, "outcome" => "conflict")
        .increment(1);
    Err(CommandError::Conflict)
}
