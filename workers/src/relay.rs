//! The outbox relay: every event of the log goes to `dossier.events`, at least once,
//! in log order.
//!
//! The log is the outbox. There is no second table to fill in the command's
//! transaction, and nothing cqrs-es does after a commit matters (its in-process
//! queries lose events on a crash; see STYLE.md). The relay is a follower of the
//! log like the read models and the sealer, on the same runner
//! ([`dossier_eventlog::follow`], checkpoint `relay`); its effect is external:
//!
//! 1. the runner reads events after the checkpoint through [`LogReader`], which
//!    never skips an event that commits late, and takes the relay's turn;
//! 2. the relay publishes the window, in position order, on one confirm-mode
//!    channel ([`ConfirmedPublisher`]): routing key `<aggregate>.<event>`
//!    ([`dossier_broker::routing_key`]), header `tenant`, `message_id` = the event
//!    id, persistent, body = the contract's Event JSON;
//! 3. it awaits the confirms in order and answers the last event of the confirmed
//!    prefix; the runner moves the checkpoint there, and only there, and commits.
//!
//! One channel and position order keep every aggregate's events in order. When the
//! broker goes away, publishing fails, the relay drops its channel, and the runner
//! retries with backoff from the checkpoint: events published but not confirmed
//! are published again (consumers deduplicate by event id); nothing after the
//! checkpoint can be lost, because the checkpoint never passes an unconfirmed event.
//!
//! Several processes may run the relay (`--role relay` on more than one node).
//! They take turns through the relay's checkpoint: the turn (an advisory lock of
//! the runner's transaction, [`Effects::External`]) is held from reading the
//! checkpoint until the new one is committed, so one window is published by one
//! relay, and the next relay continues after it. If a relay dies, its session and
//! with it its turn end, and another continues from the shared checkpoint; the
//! worst case is that the window it had published but not stored goes out again.

use std::time::Duration;

use deadpool_postgres::Transaction;
use dossier_broker::{
    self, AmqpError, Broker, ConfirmedPublisher, EVENTS_EXCHANGE, HEADER_TENANT, JSON_CONTENT_TYPE,
    PERSISTENT, PendingConfirm,
};
use dossier_eventlog::db::Pool;
use dossier_eventlog::eventstore::META_CORRELATION_ID;
use dossier_eventlog::follow::{Effects, FollowError, Follower, Halt, Runner, RunnerConfig};
use dossier_eventlog::log::{LogReader, LoggedEvent};
use dossier_runtime::retry::Backoff;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tokio::sync::watch;

/// The relay's row in `checkpoints`.
pub const CHECKPOINT_NAME: &str = "relay";

/// How the relay paces itself.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Events read and published per round; their confirms are awaited together.
    pub batch_size: i64,
    /// Pause when the log has nothing new.
    pub idle_poll: Duration,
    /// Between retries after a failure (broker or Postgres).
    pub backoff: Backoff,
    /// How often the lag gauges are refreshed.
    pub lag_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            idle_poll: Duration::from_millis(50),
            backoff: Backoff::DEFAULT,
            lag_interval: Duration::from_secs(1),
        }
    }
}

/// Why the relay could not go on. [`run`] retries the transient ones inside
/// (broker down, Postgres down) and stops on the others.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// An event cannot become an AMQP message at all (a routing key over 255
    /// bytes). The relay stops rather than skip it: downstream would miss it for
    /// good. Fix the event type's name (or the routing-key rule) and restart.
    #[error("the event at position {position} cannot be published: {source}")]
    Unpublishable {
        /// The event's log position.
        position: i64,
        /// Why.
        #[source]
        source: PublishError,
    },
    /// The broker configuration is unusable (an invalid URL).
    #[error("the relay cannot use RabbitMQ: {0}")]
    Broker(#[source] AmqpError),
    /// RabbitMQ did not take an event (down, restarting, slow). Transient: the
    /// relay publishes again from its checkpoint.
    #[error("publishing the event at position {position} failed: {source}")]
    Publish {
        /// The event's log position.
        position: i64,
        /// Why.
        #[source]
        source: PublishError,
    },
    /// No channel to publish on could be opened. Transient.
    #[error("the relay has no RabbitMQ channel: {0}")]
    Channel(#[source] AmqpError),
    /// Postgres or the log. Transient unless the log itself is unreadable.
    #[error(transparent)]
    Follow(#[from] FollowError),
}

/// Why one event could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker did not take it (transient), or it cannot be an AMQP message
    /// (permanent: a name over 255 bytes).
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// The event cannot be serialized to JSON. Permanent.
    #[error("the event cannot be serialized to JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl PublishError {
    /// Whether publishing it again can never work.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Amqp(error) => error.is_permanent(),
            Self::Json(_) => true,
        }
    }
}

/// Runs the relay with [`RelayConfig::default`] until `shutdown` turns `true`,
/// reading the log through `log` (a clone of the process's one reader, so that
/// the relay shares the safe watermark with the other followers).
pub async fn run(
    pool: Pool,
    log: LogReader,
    broker: Broker,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    run_with(pool, log, broker, RelayConfig::default(), shutdown).await
}

/// Runs the relay until `shutdown` turns `true` (see the module docs). Answers
/// `Err` only for what retrying cannot fix.
#[tracing::instrument(name = "relay", skip_all)]
pub async fn run_with(
    pool: Pool,
    log: LogReader,
    broker: Broker,
    config: RelayConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let follower = Relay {
        broker,
        publisher: None,
        shutdown: shutdown.clone(),
    };
    let config = RunnerConfig {
        batch_size: config.batch_size,
        idle_poll: config.idle_poll,
        backoff: config.backoff,
        lag_interval: config.lag_interval,
    };
    let runner = Runner::new(pool, follower, config).reading_from(log);
    tracing::info!(
        "relay publishing the log from its checkpoint, taking turns with any other relay"
    );
    runner.run(shutdown).await
}

/// The relay as a log follower: publishes each window and answers the confirmed
/// prefix.
pub struct Relay {
    broker: Broker,
    /// The confirm-mode channel, kept across windows; dropped after any failure.
    publisher: Option<ConfirmedPublisher>,
    shutdown: watch::Receiver<bool>,
}

impl Relay {
    /// Drops the channel after a failure; a confirm that never came means a
    /// connection that looks alive but is not: rebuild that too.
    async fn drop_publisher(&mut self, error: &PublishError) {
        if let Some(publisher) = self.publisher.take() {
            if matches!(error, PublishError::Amqp(AmqpError::ConfirmTimeout(_))) {
                self.broker.invalidate(publisher.connection());
            }
            publisher.close().await;
        }
    }
}

impl Follower for Relay {
    type Error = RelayError;
    const EFFECTS: Effects = Effects::External;

    fn checkpoints(&self) -> Vec<&'static str> {
        vec![CHECKPOINT_NAME]
    }

    /// Opens the channel before the turn is taken, so that no transaction stays
    /// open while the broker is away.
    async fn prepare(&mut self) -> Result<(), RelayError> {
        if self
            .publisher
            .as_ref()
            .is_some_and(ConfirmedPublisher::is_open)
        {
            return Ok(());
        }
        if let Some(closed) = self.publisher.take() {
            tracing::warn!(
                "the relay's RabbitMQ channel closed; reopening and resuming from the checkpoint"
            );
            closed.close().await;
        }
        match ConfirmedPublisher::open(&self.broker, &self.shutdown).await {
            Ok(publisher) => {
                self.publisher = Some(publisher);
                Ok(())
            }
            Err(error) if error.is_permanent() => Err(RelayError::Broker(error)),
            Err(error) => Err(RelayError::Channel(error)),
        }
    }

    async fn apply(
        &mut self,
        _tx: &Transaction<'_>,
        events: &[LoggedEvent],
        from: &[i64],
    ) -> Result<Vec<i64>, Halt<RelayError>> {
        let Some(publisher) = self.publisher.as_ref() else {
            return Err(Halt::rollback(RelayError::Channel(AmqpError::ShuttingDown)));
        };
        let published = publish_window(publisher, events).await;
        let confirmed = vec![published.confirmed_up_to.unwrap_or(from[0])];
        match published.error {
            None => Ok(confirmed),
            Some((position, source)) if source.is_permanent() => {
                tracing::error!(
                    position,
                    error = %source,
                    "the relay stops: an event cannot be published, and skipping it would lose it downstream"
                );
                Err(Halt::keep(
                    confirmed,
                    RelayError::Unpublishable { position, source },
                ))
            }
            Some((position, source)) => {
                // Everything after the confirmed prefix is sent again on a fresh
                // channel, from the checkpoint.
                self.drop_publisher(&source).await;
                Err(Halt::keep(
                    confirmed,
                    RelayError::Publish { position, source },
                ))
            }
        }
    }

    fn is_transient(error: &RelayError) -> bool {
        match error {
            RelayError::Unpublishable { .. } | RelayError::Broker(_) => false,
            RelayError::Publish { .. } | RelayError::Channel(_) => true,
            RelayError::Follow(error) => error.is_transient(),
        }
    }

    fn kind(error: &RelayError) -> &'static str {
        match error {
            RelayError::Unpublishable { .. } => "unpublishable",
            RelayError::Broker(_) => "broker",
            RelayError::Publish { .. } => "publish",
            RelayError::Channel(_) => "channel",
            RelayError::Follow(_) => "postgres",
        }
    }
}

/// What publishing one window achieved.
struct Published {
    /// Position of the last event of the confirmed prefix, if any was confirmed.
    confirmed_up_to: Option<i64>,
    confirmed_count: u64,
    /// The first failure and the position of the event it hit.
    error: Option<(i64, PublishError)>,
}

/// Sends `events` in order, then awaits their confirms in order. Stops at the
/// first failure: what follows it is not counted even if the broker has it, so the
/// checkpoint only ever covers a gap-free prefix.
async fn publish_window(publisher: &ConfirmedPublisher, events: &[LoggedEvent]) -> Published {
    let mut pending: Vec<(i64, PendingConfirm)> = Vec::with_capacity(events.len());
    let mut send_error = None;
    for event in events {
        let sent = match message_for(event) {
            Ok((routing_key, properties, body)) => publisher
                .send(EVENTS_EXCHANGE, &routing_key, properties, &body)
                .await
                .map_err(PublishError::from),
            Err(error) => Err(error),
        };
        match sent {
            Ok(confirm) => pending.push((event.position, confirm)),
            Err(error) => {
                send_error = Some((event.position, error));
                break;
            }
        }
    }
    let mut published = Published {
        confirmed_up_to: None,
        confirmed_count: 0,
        error: None,
    };
    for (position, confirm) in pending {
        match confirm.confirmed().await {
            Ok(()) => {
                published.confirmed_up_to = Some(position);
                published.confirmed_count += 1;
            }
            Err(error) => {
                published.error = Some((position, error.into()));
                return published;
            }
        }
    }
    published.error = send_error;
    published
}

/// The AMQP message of an event: routing key, properties and the contract's JSON.
pub fn message_for(
    event: &LoggedEvent,
) -> Result<(String, BasicProperties, Vec<u8>), PublishError> {
    let routing_key = dossier_broker::routing_key(&event.aggregate_type, &event.event_type);
    dossier_broker::short("routing key", &routing_key)?;
    // LoggedEvent serializes to exactly the contract's Event.
    let body = serde_json::to_vec(event)?;
    let mut headers = FieldTable::default();
    headers
        .insert(
            HEADER_TENANT.into(),
            AMQPValue::LongString(event.tenant.clone().into()),
        )
        .insert(
            "aggregate_type".into(),
            AMQPValue::LongString(event.aggregate_type.clone().into()),
        )
        .insert(
            "aggregate_id".into(),
            AMQPValue::LongString(event.aggregate_id.clone().into()),
        )
        .insert("position".into(), AMQPValue::LongLongInt(event.position));
    let mut properties = BasicProperties::default()
        .with_message_id(ShortString::from(event.id.to_string()))
        .with_content_type(JSON_CONTENT_TYPE.into())
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers)
        .with_app_id("dossier".into())
        .with_timestamp(u64::try_from(event.at.timestamp()).unwrap_or_default());
    if let Ok(kind) = ShortString::try_new(event.event_type.clone()) {
        properties = properties.with_type(kind);
    }
    if let Some(correlation_id) = event
        .metadata_str(META_CORRELATION_ID)
        .and_then(|id| ShortString::try_new(id).ok())
    {
        properties = properties.with_correlation_id(correlation_id);
    }
    Ok((routing_key, properties, body))
}
