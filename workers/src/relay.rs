//! The outbox relay: every event of the log goes to `dossier.events`, at least once,
//! in log order.
//!
//! The log is the outbox. There is no second table to fill in the command's
//! transaction, and nothing cqrs-es does after a commit matters (its in-process
//! queries lose events on a crash; see STYLE.md). The relay:
//!
//! 1. reads events after its checkpoint (`checkpoints.name = 'relay'`) through
//!    [`LogReader`], which never skips an event that commits late;
//! 2. publishes a window of them, in position order, on one confirm-mode channel
//!    ([`ConfirmedPublisher`]): routing key `<aggregate>.<event>`
//!    ([`dossier_broker::routing_key`]), header `tenant`, `message_id` = the event id,
//!    persistent, body = the contract's Event JSON;
//! 3. awaits the confirms in order and moves the checkpoint to the last event of
//!    the confirmed prefix, and only then.
//!
//! One channel and position order keep every aggregate's events in order. When the
//! broker goes away, publishing fails, and the relay builds a new connection with
//! backoff and starts again from its checkpoint: events published but not confirmed
//! are published again (consumers deduplicate by event id); nothing after the
//! checkpoint can be lost, because the checkpoint never passes an unconfirmed event.
//!
//! Several processes may run the relay (`--role relay` on more than one node): a
//! Postgres advisory lock lets one of them publish while the others stand by, so
//! the events are not all sent twice. If the leader's session dies, another takes
//! over from the shared checkpoint; the worst case is a few duplicates.

use std::time::{Duration, Instant};

use dossier_broker::{
    self, AmqpError, Broker, ConfirmedPublisher, EVENTS_EXCHANGE, HEADER_TENANT, JSON_CONTENT_TYPE,
    PERSISTENT, PendingConfirm,
};
use dossier_eventlog::db::Pool;
use dossier_eventlog::eventstore::META_CORRELATION_ID;
use dossier_eventlog::log::{LogFilter, LogReader, LoggedEvent};
use dossier_runtime::retry::Backoff;
use dossier_runtime::shutdown::{sleep_or_stop, stopped};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tokio::sync::watch;

use crate::PgError;

/// The relay's row in `checkpoints`.
pub const CHECKPOINT_NAME: &str = "relay";

/// Key of the advisory lock that makes one relay the publisher ("relay" in ASCII,
/// recognisable in `pg_locks`).
const LEADER_LOCK_KEY: i64 = 0x0072_656c_6179;

/// How the relay paces itself.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Events read and published per round; their confirms are awaited together.
    pub batch_size: i64,
    /// Pause when the log has nothing new.
    pub idle_poll: Duration,
    /// Between retries after a failure (broker or Postgres).
    pub backoff: Backoff,
    /// How often a standby relay tries to become the publisher, and how often the
    /// publisher checks that it still holds its lock.
    pub leader_check: Duration,
    /// How often the backlog gauge is refreshed.
    pub backlog_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            idle_poll: Duration::from_millis(50),
            backoff: Backoff::DEFAULT,
            leader_check: Duration::from_secs(5),
            backlog_interval: Duration::from_secs(1),
        }
    }
}

/// Why the relay stopped. Everything transient (broker down, Postgres down) is
/// retried inside; these are the problems retrying cannot fix.
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

/// Runs the relay until `shutdown` turns `true` (see the module docs).
#[tracing::instrument(name = "relay", skip_all)]
pub async fn run_with(
    pool: Pool,
    log: LogReader,
    broker: Broker,
    config: RelayConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let mut stopping = shutdown.clone();
    let mut relay = Relay {
        pool: pool.clone(),
        reader: log,
        config,
        checkpoint: 0,
        publisher: None,
        failures: 0,
        backlog_refreshed: None,
    };
    loop {
        let Some(leader) = Leader::acquire(&pool, &relay.config, &shutdown).await else {
            return Ok(());
        };
        let outcome = tokio::select! {
            outcome = relay.publish_while_leader(&broker, &leader, &shutdown) => outcome,
            () = stopped(&mut stopping) => Ok(Led::Shutdown),
        };
        if let Some(publisher) = relay.publisher.take() {
            publisher.close().await;
        }
        leader.release().await;
        match outcome? {
            Led::Shutdown => {
                tracing::info!(checkpoint = relay.checkpoint, "relay stopped");
                return Ok(());
            }
            Led::LostLeadership => {
                tracing::warn!(
                    "the relay lost its Postgres session and with it the publisher lock; \
                     standing by until it can take the lock again"
                );
            }
        }
    }
}

enum Led {
    Shutdown,
    LostLeadership,
}

struct Relay {
    pool: Pool,
    reader: LogReader,
    config: RelayConfig,
    /// The position of the last event the broker confirmed (in memory; the stored
    /// checkpoint may lag behind it after a failed update, never run ahead).
    checkpoint: i64,
    publisher: Option<ConfirmedPublisher>,
    failures: u32,
    backlog_refreshed: Option<Instant>,
}

impl Relay {
    /// The publishing loop of the lock holder.
    async fn publish_while_leader(
        &mut self,
        broker: &Broker,
        leader: &Leader,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Led, RelayError> {
        let mut stopping = shutdown.clone();
        self.checkpoint = loop {
            match load_checkpoint(&self.pool).await {
                Ok(position) => break position,
                Err(error) => {
                    if self
                        .pause_after_failure(
                            "checkpoint",
                            "reading the relay checkpoint",
                            &error.to_string(),
                            &mut stopping,
                        )
                        .await
                    {
                        return Ok(Led::Shutdown);
                    }
                }
            }
        };
        tracing::info!(
            checkpoint = self.checkpoint,
            "relay publishing from its checkpoint"
        );
        let mut leadership_checked = Instant::now();
        loop {
            if *stopping.borrow() {
                return Ok(Led::Shutdown);
            }
            if leadership_checked.elapsed() >= self.config.leader_check {
                if !leader.still_held().await {
                    return Ok(Led::LostLeadership);
                }
                leadership_checked = Instant::now();
            }
            let publisher = match self.publisher.take() {
                Some(publisher) if publisher.is_open() => publisher,
                previous => {
                    if previous.is_some() {
                        tracing::warn!(
                            checkpoint = self.checkpoint,
                            "the relay's RabbitMQ channel closed; reopening and resuming from the checkpoint"
                        );
                    }
                    match ConfirmedPublisher::open(broker, shutdown).await {
                        Ok(publisher) => publisher,
                        Err(AmqpError::ShuttingDown) => return Ok(Led::Shutdown),
                        Err(error) if error.is_permanent() => {
                            return Err(RelayError::Broker(error));
                        }
                        Err(error) => {
                            if self
                                .pause_after_failure(
                                    "channel",
                                    "opening a publisher channel",
                                    &error.to_string(),
                                    &mut stopping,
                                )
                                .await
                            {
                                return Ok(Led::Shutdown);
                            }
                            continue;
                        }
                    }
                }
            };
            self.publisher = Some(publisher);

            let events = match self
                .reader
                .read(
                    self.checkpoint,
                    self.config.batch_size,
                    &LogFilter::default(),
                )
                .await
            {
                Ok(events) => events,
                Err(error) => {
                    if self
                        .pause_after_failure(
                            "log",
                            "reading the event log",
                            &error.to_string(),
                            &mut stopping,
                        )
                        .await
                    {
                        return Ok(Led::Shutdown);
                    }
                    continue;
                }
            };
            self.refresh_backlog().await;
            if events.is_empty() {
                self.failures = 0;
                if sleep_or_stop(self.config.idle_poll, &mut stopping).await {
                    return Ok(Led::Shutdown);
                }
                continue;
            }

            let Some(publisher) = self.publisher.as_ref() else {
                continue;
            };
            let published = publish_window(publisher, &events).await;
            if let Some(position) = published.confirmed_up_to {
                metrics::counter!("dossier_relay_events_published_total")
                    .increment(published.confirmed_count);
                self.checkpoint = position;
                if let Err(error) = store_checkpoint(&self.pool, position).await {
                    // The broker has these events; the next successful store covers
                    // them. A crash before that only republishes them.
                    metrics::counter!("dossier_relay_failures_total", "reason" => "checkpoint_store")
                        .increment(1);
                    tracing::warn!(
                        error = %error,
                        position,
                        "could not store the relay checkpoint; a restart would publish some events again"
                    );
                }
                metrics::gauge!("dossier_relay_checkpoint").set(position as f64);
            }
            match published.error {
                None => self.failures = 0,
                Some((position, error)) if error.is_permanent() => {
                    metrics::counter!("dossier_relay_failures_total", "reason" => "unpublishable")
                        .increment(1);
                    tracing::error!(
                        position,
                        error = %error,
                        "the relay stops: an event cannot be published, and skipping it would lose it downstream"
                    );
                    return Err(RelayError::Unpublishable {
                        position,
                        source: error,
                    });
                }
                Some((position, error)) => {
                    // Everything after the checkpoint is sent again on a fresh channel.
                    if let Some(publisher) = self.publisher.take() {
                        if matches!(error, PublishError::Amqp(AmqpError::ConfirmTimeout(_))) {
                            // Silent for too long: the connection may be half-dead.
                            broker.invalidate(publisher.connection());
                        }
                        publisher.close().await;
                    }
                    tracing::debug!(position, "publishing failed at this position");
                    if self
                        .pause_after_failure(
                            "publish",
                            "publishing to RabbitMQ (resuming from the checkpoint; some events may be published twice)",
                            &error.to_string(),
                            &mut stopping,
                        )
                        .await
                    {
                        return Ok(Led::Shutdown);
                    }
                }
            }
        }
    }

    /// Logs and counts a failure, then waits the backoff; answers whether shutdown
    /// came first.
    async fn pause_after_failure(
        &mut self,
        reason: &'static str,
        doing: &'static str,
        error: &str,
        stopping: &mut watch::Receiver<bool>,
    ) -> bool {
        let delay = self.config.backoff.delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        metrics::counter!("dossier_relay_failures_total", "reason" => reason).increment(1);
        tracing::warn!(
            error = %error,
            checkpoint = self.checkpoint,
            attempt = self.failures,
            retry_in_ms = delay.as_millis() as u64,
            "relay failed {doing}; events wait in the log and nothing is lost"
        );
        sleep_or_stop(delay, stopping).await
    }

    /// Sets the backlog gauge (events between the checkpoint and the log head) at
    /// most once per `backlog_interval`.
    async fn refresh_backlog(&mut self) {
        if self
            .backlog_refreshed
            .is_some_and(|at| at.elapsed() < self.config.backlog_interval)
        {
            return;
        }
        self.backlog_refreshed = Some(Instant::now());
        match log_head(&self.pool).await {
            Ok(head) => {
                let backlog = (head - self.checkpoint).max(0);
                metrics::gauge!("dossier_relay_backlog_events").set(backlog as f64);
            }
            Err(error) => tracing::debug!(error = %error, "could not measure the relay backlog"),
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

/// The publisher lock: a session-level advisory lock on a connection taken out of
/// the pool for as long as the relay publishes. Dropping that connection releases
/// the lock, also when the process dies.
struct Leader {
    client: deadpool_postgres::ClientWrapper,
}

impl Leader {
    /// Waits until this process holds the lock; `None` on shutdown.
    async fn acquire(
        pool: &Pool,
        config: &RelayConfig,
        shutdown: &watch::Receiver<bool>,
    ) -> Option<Self> {
        let mut stopping = shutdown.clone();
        let mut announced = false;
        let mut failures = 0u32;
        loop {
            if *stopping.borrow() {
                return None;
            }
            let wait = match Self::try_acquire(pool).await {
                Ok(Some(leader)) => {
                    tracing::info!("this process is the relay's publisher");
                    return Some(leader);
                }
                Ok(None) => {
                    if !announced {
                        tracing::info!(
                            "another process publishes the log; this relay stands by and takes over if it stops"
                        );
                        announced = true;
                    }
                    failures = 0;
                    config.leader_check
                }
                Err(error) => {
                    let delay = config.backoff.delay(failures);
                    failures = failures.saturating_add(1);
                    metrics::counter!("dossier_relay_failures_total", "reason" => "leader_lock")
                        .increment(1);
                    tracing::warn!(
                        error = %error,
                        retry_in_ms = delay.as_millis() as u64,
                        "the relay cannot reach Postgres; events wait in the log"
                    );
                    delay
                }
            };
            if sleep_or_stop(wait, &mut stopping).await {
                return None;
            }
        }
    }

    async fn try_acquire(pool: &Pool) -> Result<Option<Self>, PgError> {
        let client = pool.get().await?;
        let held: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK_KEY])
            .await?
            .try_get(0)?;
        if held {
            // Out of the pool: a pooled connection would keep the lock after we
            // hand it back, for whoever borrows it next.
            Ok(Some(Self {
                client: deadpool_postgres::Object::take(client),
            }))
        } else {
            Ok(None)
        }
    }

    /// Whether the lock's session is still alive (and so the lock still held).
    async fn still_held(&self) -> bool {
        self.client.simple_query("SELECT 1").await.is_ok()
    }

    /// Releases the lock by ending its session.
    async fn release(self) {
        let _ = self
            .client
            .query_one("SELECT pg_advisory_unlock($1)", &[&LEADER_LOCK_KEY])
            .await;
        drop(self.client);
    }
}

/// The relay's stored checkpoint, creating its row at 0 if it has none.
pub async fn load_checkpoint(pool: &Pool) -> Result<i64, PgError> {
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO checkpoints (name, position) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING",
            &[&CHECKPOINT_NAME],
        )
        .await?;
    let row = client
        .query_one(
            "SELECT position FROM checkpoints WHERE name = $1",
            &[&CHECKPOINT_NAME],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// Moves the stored checkpoint forward to `position` (never back: a standby that
/// took over and a leader that has not noticed yet cannot undo each other).
async fn store_checkpoint(pool: &Pool, position: i64) -> Result<(), PgError> {
    let client = pool.get().await?;
    client
        .execute(
            "UPDATE checkpoints SET position = GREATEST(position, $2), updated_at = now() \
             WHERE name = $1",
            &[&CHECKPOINT_NAME, &position],
        )
        .await?;
    Ok(())
}

/// The highest position in the log (0 when empty).
async fn log_head(pool: &Pool) -> Result<i64, PgError> {
    let client = pool.get().await?;
    let row = client
        .query_one("SELECT COALESCE(max(position), 0) FROM events", &[])
        .await?;
    Ok(row.try_get(0)?)
}
