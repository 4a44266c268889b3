//! RabbitMQ for every Dossier process: the names of the topology, one shared
//! connection that is rebuilt after any failure, publishing with broker confirms,
//! and a consumer loop that survives broker restarts.
//!
//! # Topology
//!
//! Two durable topic exchanges carry the contract's traffic: [`COMMANDS_EXCHANGE`]
//! (upstream systems send commands) and [`EVENTS_EXCHANGE`] (the outbox relay
//! publishes every logged event). Every consumer queue ([`CONSUMER_QUEUES`]) is a
//! durable **quorum** queue with a dead-letter exchange and a delivery limit, so a
//! message that is rejected, or redelivered too often, ends up in the queue's own
//! dead-letter queue instead of looping or vanishing:
//!
//! ```text
//! dossier.commands ──#──────────────► dossier.intake         ─┐
//! dossier.events ──file.deleted─────► dossier.workers.blob   ─┤ dead letters via
//!                ──#────────────────► dossier.workers.audit  ─┤ dossier.dead (direct),
//!                ──bundle.requested─► dossier.workers.zip    ─┘ routing key = dead queue
//!
//! dossier.dead ──dossier.commands.dead──► dossier.commands.dead
//!              ──dossier.workers.blob.dead──► dossier.workers.blob.dead   (and so on)
//! ```
//!
//! [`declare_topology`] declares all of it and is idempotent; [`Broker`] runs it on
//! every (re)connect, so a broker that lost its definitions gets them back. Queue
//! arguments cannot change on an existing queue: changing them here needs the queue
//! deleted first (RabbitMQ answers `PRECONDITION_FAILED` otherwise).
//!
//! # Connections
//!
//! lapin's automatic recovery does not survive a broker restart (STYLE.md, known
//! traps), so it is off: [`Broker`] owns one connection per process, hands it to
//! whoever needs a channel, and builds a *new* connection (with backoff) as soon as
//! the old one is gone. Users notice a dead connection by the errors of their own
//! channel and simply ask the broker again.
//!
//! # Publishing and consuming
//!
//! [`ConfirmedPublisher`] switches its channel to confirm mode: a publish is done
//! only when the broker has confirmed it (a nack is an error). [`consume`] runs a
//! handler per delivery, acks, dead-letters or requeues by the handler's
//! [`Outcome`], reconnects on connection loss and drains on shutdown. Everything on
//! RabbitMQ is at least once: handlers must be idempotent.
//!
//! [`testing`] gives each test its own virtual host.

use dossier_runtime::retry::Backoff;
use dossier_runtime::shutdown::{is_stopping, sleep_or_stop, stopped};
use std::future::Future;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use dossier_runtime::config::redact_url;

/// Exchange of the commands upstream systems send (topic, durable).
pub const COMMANDS_EXCHANGE: &str = "dossier.commands";
/// Exchange every logged event is published to by the relay (topic, durable).
pub const EVENTS_EXCHANGE: &str = "dossier.events";
/// Dead-letter exchange of every consumer queue (direct, durable). Each consumer
/// queue dead-letters with its own dead-letter queue's name as routing key.
pub const DEAD_LETTER_EXCHANGE: &str = "dossier.dead";

/// The command intake's queue: every command of [`COMMANDS_EXCHANGE`].
pub const INTAKE_QUEUE: &str = "dossier.intake";
/// Where the intake's rejected commands land (CONTRACT.md, "AMQP: commands").
pub const COMMANDS_DEAD_QUEUE: &str = "dossier.commands.dead";
/// The blob worker's queue: `file.deleted` events.
pub const BLOB_QUEUE: &str = "dossier.workers.blob";
/// Dead letters of [`BLOB_QUEUE`].
pub const BLOB_DEAD_QUEUE: &str = "dossier.workers.blob.dead";
/// The audit worker's queue: every event.
pub const AUDIT_QUEUE: &str = "dossier.workers.audit";
/// Dead letters of [`AUDIT_QUEUE`].
pub const AUDIT_DEAD_QUEUE: &str = "dossier.workers.audit.dead";
/// The zip worker's queue: `bundle.requested` events.
pub const ZIP_QUEUE: &str = "dossier.workers.zip";
/// Dead letters of [`ZIP_QUEUE`].
pub const ZIP_DEAD_QUEUE: &str = "dossier.workers.zip.dead";

/// How often a quorum queue delivers one message before dead-lettering it
/// (`x-delivery-limit`). RabbitMQ 3.x counts every return: a [`Outcome::Retry`], and
/// also a delivery that was unacked when its channel or connection died. Twenty
/// leaves room for several broker restarts while a message is being handled, and
/// still stops a poison message that crashes its handler.
pub const DELIVERY_LIMIT: i32 = 20;

/// Message header naming the tenant (contract: commands and events).
pub const HEADER_TENANT: &str = "tenant";
/// Message header naming the actor of a command (contract: commands).
pub const HEADER_ACTOR: &str = "actor";
/// `content_type` of JSON bodies.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// `delivery_mode` of a persistent message (written to disk by the broker).
pub const PERSISTENT: u8 = 2;

/// One consumer queue of the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSpec {
    /// The queue's name.
    pub name: &'static str,
    /// The exchange it is bound to.
    pub exchange: &'static str,
    /// The binding key (topic pattern).
    pub binding_key: &'static str,
    /// The queue its dead letters land in, through [`DEAD_LETTER_EXCHANGE`].
    pub dead_letter_queue: &'static str,
}

/// The command intake's queue and its dead letters.
pub const INTAKE: QueueSpec = QueueSpec {
    name: INTAKE_QUEUE,
    exchange: COMMANDS_EXCHANGE,
    binding_key: "#",
    dead_letter_queue: COMMANDS_DEAD_QUEUE,
};
/// The blob worker's queue.
pub const BLOB_WORKER: QueueSpec = QueueSpec {
    name: BLOB_QUEUE,
    exchange: EVENTS_EXCHANGE,
    binding_key: "file.deleted",
    dead_letter_queue: BLOB_DEAD_QUEUE,
};
/// The audit worker's queue (name reserved; declared so nothing is missed before
/// the worker exists).
pub const AUDIT_WORKER: QueueSpec = QueueSpec {
    name: AUDIT_QUEUE,
    exchange: EVENTS_EXCHANGE,
    binding_key: "#",
    dead_letter_queue: AUDIT_DEAD_QUEUE,
};
/// The zip worker's queue.
pub const ZIP_WORKER: QueueSpec = QueueSpec {
    name: ZIP_QUEUE,
    exchange: EVENTS_EXCHANGE,
    binding_key: "bundle.requested",
    dead_letter_queue: ZIP_DEAD_QUEUE,
};
/// Every consumer queue [`declare_topology`] declares.
pub const CONSUMER_QUEUES: &[QueueSpec] = &[INTAKE, BLOB_WORKER, AUDIT_WORKER, ZIP_WORKER];

/// The routing key of an event on [`EVENTS_EXCHANGE`]: `<aggregate>.<event>` in
/// snake case, with the aggregate's name dropped from the front of the event's:
/// `("file", "FileVisibilityChanged")` → `file.visibility_changed`, `("file",
/// "BlobPurged")` → `file.blob_purged`.
pub fn routing_key(aggregate_type: &str, event_type: &str) -> String {
    let aggregate = snake_case(aggregate_type);
    let event = snake_case(event_type);
    let event = event
        .strip_prefix(&aggregate)
        .and_then(|rest| rest.strip_prefix('_'))
        .filter(|rest| !rest.is_empty())
        .unwrap_or(&event);
    format!("{aggregate}.{event}")
}

/// `FileVisibilityChanged` → `file_visibility_changed`; already snake-cased or
/// lower-case input is kept. Runs of capitals stay one word (`ZIPReady` → `zip_ready`).
fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let previous = i.checked_sub(1).and_then(|p| chars.get(p)).copied();
            let next = chars.get(i + 1).copied();
            let starts_word = match previous {
                None => false,
                Some(p) if p == '_' || p == '-' || p == '.' => false,
                Some(p) if p.is_lowercase() || p.is_ascii_digit() => true,
                // Inside a run of capitals, the last one starts the next word.
                Some(p) if p.is_uppercase() => next.is_some_and(char::is_lowercase),
                Some(_) => false,
            };
            if starts_word {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else if c == '-' || c == ' ' {
            out.push('_');
        } else {
            out.push(c);
        }
    }
    out
}

/// What went wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The configured URL is not an AMQP URL. Permanent: retrying cannot help.
    #[error("invalid AMQP URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, password redacted.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// The broker could not be reached or refused the login.
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// lapin's error.
        source: lapin::Error,
    },
    /// Connecting took longer than allowed.
    #[error("connecting to RabbitMQ at {url} took longer than {timeout:?}")]
    ConnectTimeout {
        /// The URL, password redacted.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// Declaring an exchange, queue or binding failed (for example a queue that
    /// exists with other arguments: delete it, or align the code).
    #[error("declaring the RabbitMQ topology failed at {what}: {source}")]
    Topology {
        /// Which declaration failed.
        what: String,
        /// lapin's error.
        source: lapin::Error,
    },
    /// An operation on an open channel failed; the channel (and maybe its
    /// connection) is gone. Transient: reconnect and try again.
    #[error("RabbitMQ {operation} failed: {source}")]
    Channel {
        /// What was being done.
        operation: &'static str,
        /// lapin's error.
        source: lapin::Error,
    },
    /// The broker negatively confirmed a publish: it did not take the message.
    #[error("RabbitMQ refused a message for {exchange}/{routing_key} (negative publisher confirm)")]
    Nacked {
        /// The exchange published to.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// No confirm arrived in time; the connection is presumed dead or blocked.
    #[error("RabbitMQ did not confirm a publish within {0:?}")]
    ConfirmTimeout(Duration),
    /// A publish on a channel without confirm mode: a bug, since nothing would
    /// tell whether the broker has the message.
    #[error("publisher confirms are not enabled on this channel")]
    ConfirmsNotEnabled,
    /// A name or routing key longer than the 255 bytes AMQP allows. Permanent.
    #[error("{what} is longer than the 255 bytes AMQP allows: {value:?}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// Shutdown was requested while waiting for the broker.
    #[error("shutting down")]
    ShuttingDown,
}

impl AmqpError {
    /// Whether retrying can never help (bad configuration or a bad message), as
    /// opposed to a broker that is down, restarting or busy.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::InvalidUrl { .. } | Self::TooLong { .. })
    }

    fn channel(operation: &'static str) -> impl FnOnce(lapin::Error) -> Self {
        move |source| Self::Channel { operation, source }
    }
}

/// A [`ShortString`] (exchange, queue, routing key, property), refusing rather
/// than panicking on more than 255 bytes (lapin's `From<&str>` panics).
pub fn short(what: &'static str, value: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(value).map_err(|_| AmqpError::TooLong {
        what,
        value: value.to_owned(),
    })
}

/// How often [`watch_queue_depths`] looks.
pub const QUEUE_DEPTH_INTERVAL: Duration = Duration::from_secs(15);

/// Publishes the depth of every consumer queue and dead-letter queue as the
/// gauge `dossier_amqp_queue_depth{queue}` until shutdown, so an operator sees
/// a backlog or dead letters piling up. A look that fails is skipped: the
/// consumers' own reconnect logic reports broker trouble.
pub async fn watch_queue_depths(broker: Broker, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Some(connection) = broker.live_connection()
            && let Ok(channel) = connection.create_channel().await
        {
            for spec in CONSUMER_QUEUES {
                for queue in [spec.name, spec.dead_letter_queue] {
                    let passive = QueueDeclareOptions {
                        passive: true,
                        durable: true,
                        ..QueueDeclareOptions::default()
                    };
                    match channel
                        .queue_declare(queue.into(), passive, FieldTable::default())
                        .await
                    {
                        Ok(declared) => {
                            metrics::gauge!("dossier_amqp_queue_depth", "queue" => queue)
                                .set(f64::from(declared.message_count()))
                        }
                        // A failed passive declare closes the channel: stop this round.
                        Err(_) => break,
                    }
                }
            }
            let _ = channel.close(200, "queue depths read".into()).await;
        }
        if sleep_or_stop(QUEUE_DEPTH_INTERVAL, &mut shutdown).await {
            return;
        }
    }
}

/// Declares every exchange, queue and binding of the topology (see the module
/// docs). Idempotent: declaring what exists with the same arguments is a no-op.
pub async fn declare_topology(channel: &Channel) -> Result<(), AmqpError> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for (name, kind) in [
        (COMMANDS_EXCHANGE, ExchangeKind::Topic),
        (EVENTS_EXCHANGE, ExchangeKind::Topic),
        (DEAD_LETTER_EXCHANGE, ExchangeKind::Direct),
    ] {
        channel
            .exchange_declare(name.into(), kind, durable_exchange, FieldTable::default())
            .await
            .map_err(|source| AmqpError::Topology {
                what: format!("exchange {name}"),
                source,
            })?;
    }
    for spec in CONSUMER_QUEUES {
        declare_queue(
            channel,
            spec.dead_letter_queue,
            dead_letter_queue_arguments(),
        )
        .await?;
        bind(
            channel,
            spec.dead_letter_queue,
            DEAD_LETTER_EXCHANGE,
            spec.dead_letter_queue,
        )
        .await?;
        declare_queue(channel, spec.name, consumer_queue_arguments(spec)).await?;
        bind(channel, spec.name, spec.exchange, spec.binding_key).await?;
    }
    Ok(())
}

/// Arguments of a consumer queue: quorum, dead-lettering into its own dead queue,
/// with a delivery limit.
fn consumer_queue_arguments(spec: &QueueSpec) -> FieldTable {
    let mut arguments = dead_letter_queue_arguments();
    arguments
        .insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
        )
        .insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(spec.dead_letter_queue.into()),
        )
        .insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(DELIVERY_LIMIT),
        )
        // A dead letter stays in its source queue until the dead-letter queue has
        // it (RabbitMQ 3.10+; older brokers fall back to at-most-once). It needs
        // reject-publish overflow, which only matters if a max-length policy is set:
        // then publishers get a nack (and retry) instead of losing old messages.
        .insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        )
        .insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    arguments
}

/// Arguments of a dead-letter queue: a quorum queue that keeps what it gets.
fn dead_letter_queue_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments
}

async fn declare_queue(
    channel: &Channel,
    name: &'static str,
    arguments: FieldTable,
) -> Result<(), AmqpError> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), options, arguments)
        .await
        .map(drop)
        .map_err(|source| AmqpError::Topology {
            what: format!("queue {name}"),
            source,
        })
}

async fn bind(
    channel: &Channel,
    queue: &'static str,
    exchange: &'static str,
    key: &'static str,
) -> Result<(), AmqpError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Topology {
            what: format!("binding {exchange} -[{key}]-> {queue}"),
            source,
        })
}

/// How a [`Broker`] connects and publishes.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Shown in the RabbitMQ management UI next to the connection.
    pub connection_name: String,
    /// Longest wait for one connection attempt (TCP, AMQP handshake, topology).
    pub connect_timeout: Duration,
    /// Longest wait of [`Broker::check`] when there is no live connection.
    pub check_timeout: Duration,
    /// Between connection attempts, and between consumer restarts.
    pub backoff: Backoff,
    /// Longest wait for a publisher confirm before the connection is presumed dead.
    pub confirm_timeout: Duration,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            connection_name: "dossier".to_owned(),
            connect_timeout: Duration::from_secs(10),
            check_timeout: Duration::from_secs(2),
            backoff: Backoff::DEFAULT,
            confirm_timeout: Duration::from_secs(30),
        }
    }
}

/// The process's way to RabbitMQ: owns one shared connection and rebuilds it after
/// any failure. Cheap to clone; every clone shares the connection.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<BrokerInner>,
}

struct BrokerInner {
    uri: AMQPUri,
    /// The URL with its password redacted, for logs and errors.
    display_url: String,
    options: BrokerOptions,
    /// The connection handed out, if any. A plain mutex: held for no await.
    current: StdMutex<Option<Arc<Connection>>>,
    /// Serialises connection attempts, so that twenty channels noticing the same
    /// broker restart build one new connection, not twenty.
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.inner.display_url)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// A broker for `url` with default options. Does not connect yet; an invalid
    /// URL is refused here.
    pub fn new(url: &str) -> Result<Self, AmqpError> {
        Self::with_options(url, BrokerOptions::default())
    }

    /// A broker for `url` with `options`. Does not connect yet.
    pub fn with_options(url: &str, options: BrokerOptions) -> Result<Self, AmqpError> {
        let display_url = redact_url(url);
        let uri = url
            .parse::<AMQPUri>()
            .map_err(|reason| AmqpError::InvalidUrl {
                url: display_url.clone(),
                reason,
            })?;
        Ok(Self {
            inner: Arc::new(BrokerInner {
                uri,
                display_url,
                options,
                current: StdMutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The options it was built with.
    pub fn options(&self) -> &BrokerOptions {
        &self.inner.options
    }

    /// The URL, password redacted.
    pub fn display_url(&self) -> &str {
        &self.inner.display_url
    }

    /// The current connection if it is up; never connects.
    pub fn live_connection(&self) -> Option<Arc<Connection>> {
        let current = self
            .inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        current
            .as_ref()
            .filter(|connection| connection.status().connected())
            .cloned()
    }

    /// The live connection, or one new connection attempt (with the topology
    /// declared on it) if there is none. No retries: see [`Self::connect`].
    pub async fn connect_once(&self) -> Result<Arc<Connection>, AmqpError> {
        if let Some(connection) = self.live_connection() {
            return Ok(connection);
        }
        let _one_at_a_time = self.inner.connecting.lock().await;
        // Someone else may have connected while we waited for the lock.
        if let Some(connection) = self.live_connection() {
            return Ok(connection);
        }
        let started = Instant::now();
        let timeout = self.inner.options.connect_timeout;
        let connection = tokio::time::timeout(timeout, self.open_connection())
            .await
            .map_err(|_| AmqpError::ConnectTimeout {
                url: self.inner.display_url.clone(),
                timeout,
            })
            .and_then(|connected| connected);
        let connection = match connection {
            Ok(connection) => Arc::new(connection),
            Err(error) => {
                metrics::counter!("dossier_amqp_connect_failures_total").increment(1);
                return Err(error);
            }
        };
        *self
            .inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&connection));
        metrics::counter!("dossier_amqp_connections_opened_total").increment(1);
        tracing::info!(
            url = %self.inner.display_url,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "connected to RabbitMQ and declared the topology"
        );
        Ok(connection)
    }

    /// Opens a connection and declares the topology on it; on a topology failure
    /// the connection is closed again.
    async fn open_connection(&self) -> Result<Connection, AmqpError> {
        let name: LongString = self.inner.options.connection_name.clone().into();
        let properties = ConnectionProperties::default().with_connection_name(name);
        // Auto-recovery stays off (the default): it does not survive a broker
        // restart, and this type rebuilds connections itself.
        let connection = Connection::connect_uri(self.inner.uri.clone(), properties)
            .await
            .map_err(|source| AmqpError::Connect {
                url: self.inner.display_url.clone(),
                source,
            })?;
        let declared = async {
            let channel = connection
                .create_channel()
                .await
                .map_err(AmqpError::channel("opening a channel for the topology"))?;
            declare_topology(&channel).await?;
            // Best effort: the channel goes with the connection anyway.
            let _ = channel.close(200, "topology declared".into()).await;
            Ok(())
        }
        .await;
        if let Err(error) = declared {
            let _ = connection
                .close(200, "topology declaration failed".into())
                .await;
            return Err(error);
        }
        Ok(connection)
    }

    /// A live connection, retrying with backoff until one is made or shutdown is
    /// requested ([`AmqpError::ShuttingDown`]). Fails at once only for permanent
    /// errors (an invalid URL).
    pub async fn connect(
        &self,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Arc<Connection>, AmqpError> {
        let mut shutdown = shutdown.clone();
        let mut attempt = 0u32;
        loop {
            if is_stopping(&shutdown) {
                return Err(AmqpError::ShuttingDown);
            }
            match self.connect_once().await {
                Ok(connection) => {
                    if attempt > 0 {
                        tracing::info!(failed_attempts = attempt, "RabbitMQ is reachable again");
                    }
                    return Ok(connection);
                }
                Err(error) if error.is_permanent() => return Err(error),
                Err(error) => {
                    let delay = self.inner.options.backoff.delay(attempt);
                    tracing::warn!(
                        error = %error,
                        attempt = attempt + 1,
                        retry_in_ms = delay.as_millis() as u64,
                        "RabbitMQ is unreachable; events wait in the log and messages in the broker until it is back"
                    );
                    if sleep_or_stop(delay, &mut shutdown).await {
                        return Err(AmqpError::ShuttingDown);
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// A new channel on a live connection, retrying like [`Self::connect`]. A
    /// connection that cannot open a channel is dropped and rebuilt.
    pub async fn open_channel(
        &self,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(Arc<Connection>, Channel), AmqpError> {
        let mut stopping = shutdown.clone();
        let mut attempt = 0u32;
        loop {
            let connection = self.connect(shutdown).await?;
            match connection.create_channel().await {
                Ok(channel) => return Ok((connection, channel)),
                Err(source) => {
                    self.invalidate(&connection);
                    let delay = self.inner.options.backoff.delay(attempt);
                    tracing::warn!(
                        error = %source,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot open a RabbitMQ channel; rebuilding the connection"
                    );
                    if sleep_or_stop(delay, &mut stopping).await {
                        return Err(AmqpError::ShuttingDown);
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// Forgets `connection` (if it is still the current one) and closes it, so the
    /// next user builds a new one. For a connection that looks alive but does not
    /// work (a publisher confirm that never comes).
    pub fn invalidate(&self, connection: &Arc<Connection>) {
        let taken = {
            let mut current = self
                .inner
                .current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match current.as_ref() {
                Some(held) if Arc::ptr_eq(held, connection) => current.take(),
                _ => None,
            }
        };
        if let Some(connection) = taken {
            tracing::warn!(
                "dropping a RabbitMQ connection that stopped working; a new one will be built"
            );
            metrics::counter!("dossier_amqp_connections_invalidated_total").increment(1);
            if connection.status().connected() {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        connection.close(200, "replaced after a failure".into()),
                    )
                    .await;
                });
            }
        }
    }

    /// Readiness probe for `/readyz`: fine if there is a live connection, else one
    /// connection attempt bounded by [`BrokerOptions::check_timeout`].
    pub async fn check(&self) -> Result<(), AmqpError> {
        if self.live_connection().is_some() {
            return Ok(());
        }
        let timeout = self.inner.options.check_timeout;
        tokio::time::timeout(timeout, self.connect_once())
            .await
            .map_err(|_| AmqpError::ConnectTimeout {
                url: self.inner.display_url.clone(),
                timeout,
            })?
            .map(drop)
    }

    /// Closes the shared connection (at shutdown, after every user is done).
    pub async fn close(&self) {
        let taken = self
            .inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(connection) = taken
            && connection.status().connected()
        {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                connection.close(200, "shutting down".into()),
            )
            .await;
        }
    }
}

/// A channel in confirm mode: [`Self::publish`] returns only once the broker has
/// the message. Open a new one (with [`Self::open`]) after any error.
pub struct ConfirmedPublisher {
    connection: Arc<Connection>,
    channel: Channel,
    confirm_timeout: Duration,
}

impl std::fmt::Debug for ConfirmedPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfirmedPublisher")
            .field("channel", &self.channel.id())
            .field("open", &self.is_open())
            .finish_non_exhaustive()
    }
}

impl ConfirmedPublisher {
    /// Opens a channel on the broker's connection (waiting for the broker with
    /// backoff) and switches it to confirm mode.
    pub async fn open(
        broker: &Broker,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Self, AmqpError> {
        let (connection, channel) = broker.open_channel(shutdown).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(AmqpError::channel("switching on publisher confirms"))?;
        Ok(Self {
            connection,
            channel,
            confirm_timeout: broker.options().confirm_timeout,
        })
    }

    /// Publishes and waits for the broker's confirm. `Ok` means the broker took
    /// responsibility for the message (for a persistent message to a durable
    /// queue: it is on disk).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<(), AmqpError> {
        self.send(exchange, routing_key, properties, body)
            .await?
            .confirmed()
            .await
    }

    /// Sends without waiting for the confirm; await [`PendingConfirm::confirmed`]
    /// later. Confirms of one channel arrive in publish order, so a window of
    /// messages can be sent and their confirms awaited in order.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<PendingConfirm, AmqpError> {
        let publishing = self.channel.basic_publish(
            short("exchange", exchange)?,
            short("routing key", routing_key)?,
            BasicPublishOptions::default(),
            body,
            properties,
        );
        // Bounded too: a broker that blocked the connection (memory or disk
        // alarm) can hold the send itself, not only the confirm.
        let confirm = tokio::time::timeout(self.confirm_timeout, publishing)
            .await
            .map_err(|_| AmqpError::ConfirmTimeout(self.confirm_timeout))?
            .map_err(AmqpError::channel("publish"))?;
        Ok(PendingConfirm {
            confirm,
            timeout: self.confirm_timeout,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        })
    }

    /// Whether the channel and its connection are still up.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected() && self.connection.status().connected()
    }

    /// The connection it publishes on (for [`Broker::invalidate`]).
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }

    /// Closes the channel; unconfirmed messages stay unconfirmed.
    pub async fn close(self) {
        if self.channel.status().connected() {
            let _ = self.channel.close(200, "publisher done".into()).await;
        }
    }
}

/// A published message whose broker confirm has not been awaited yet.
#[must_use = "a publish is only safe once its confirm has been awaited"]
pub struct PendingConfirm {
    confirm: lapin::PublisherConfirm,
    timeout: Duration,
    exchange: String,
    routing_key: String,
}

impl std::fmt::Debug for PendingConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingConfirm")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .finish_non_exhaustive()
    }
}

impl PendingConfirm {
    /// Waits for the broker's confirm: `Ok` on ack, an error on nack, timeout or
    /// a channel that died first.
    pub async fn confirmed(self) -> Result<(), AmqpError> {
        let confirmation = tokio::time::timeout(self.timeout, self.confirm)
            .await
            .map_err(|_| AmqpError::ConfirmTimeout(self.timeout))?
            .map_err(AmqpError::channel("waiting for a publisher confirm"))?;
        match confirmation {
            Confirmation::Ack(_) => Ok(()),
            Confirmation::Nack(_) => {
                metrics::counter!("dossier_amqp_publish_nacks_total").increment(1);
                Err(AmqpError::Nacked {
                    exchange: self.exchange,
                    routing_key: self.routing_key,
                })
            }
            Confirmation::NotRequested => Err(AmqpError::ConfirmsNotEnabled),
        }
    }
}

/// What a consumer's handler decided about one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done, its effect is durable: acknowledge.
    Ack,
    /// It can never succeed (unparseable, invalid): reject without requeue, so
    /// the broker dead-letters it.
    Reject,
    /// It failed for now; the handler already waited its own backoff: nack with
    /// requeue. The queue's delivery limit dead-letters it if this never ends.
    Retry,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Reject => "reject",
            Self::Retry => "retry",
        }
    }
}

/// One delivery as a handler sees it. The acknowledgement stays with
/// [`consume`], which acts on the handler's [`Outcome`].
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The queue it came from.
    pub queue: String,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Whether the broker delivered it before (to this or another consumer).
    pub redelivered: bool,
    /// Its properties and headers.
    pub properties: BasicProperties,
    /// Its body.
    pub body: Vec<u8>,
}

impl Incoming {
    /// The `message_id` property.
    pub fn message_id(&self) -> Option<&str> {
        self.properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// A header's value if it is a string (long or short) or UTF-8 bytes.
    pub fn header_str(&self, name: &str) -> Option<String> {
        let headers = self.properties.headers().as_ref()?;
        match headers.inner().get(name)? {
            AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes())
                .ok()
                .map(str::to_owned),
            AMQPValue::ShortString(value) => Some(value.as_str().to_owned()),
            AMQPValue::ByteArray(value) => std::str::from_utf8(value.as_slice())
                .ok()
                .map(str::to_owned),
            _ => None,
        }
    }
}

/// How [`consume_with`] runs.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Deliveries the broker sends before any is acknowledged (`basic.qos`), and
    /// so the number of handlers running at once.
    pub prefetch: u16,
    /// How long, at shutdown or after losing the connection, running handlers may
    /// take to finish before they are abandoned (their messages go back to the
    /// queue).
    pub drain_timeout: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            prefetch: 8,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// [`consume_with`] with `prefetch` and the default drain timeout.
pub async fn consume<H, Fut>(
    broker: &Broker,
    queue: &str,
    prefetch: u16,
    handler: H,
    shutdown: watch::Receiver<bool>,
) -> Result<(), AmqpError>
where
    H: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let options = ConsumerOptions {
        prefetch,
        ..ConsumerOptions::default()
    };
    consume_with(broker, queue, options, handler, shutdown).await
}

/// Consumes `queue` until shutdown: runs `handler` on every delivery (up to
/// `prefetch` at once) and acks, rejects or requeues by its [`Outcome`].
///
/// On connection loss it waits for the running handlers (their acks fail; the
/// broker redelivers those messages), then reconnects with backoff and consumes
/// again. On shutdown it cancels the consumer so nothing new arrives, lets running
/// handlers finish for up to the drain timeout, and closes the channel, which
/// returns every unacknowledged message to the queue. Answers `Ok` after shutdown;
/// an error only for a permanent problem (an invalid URL or queue name).
pub async fn consume_with<H, Fut>(
    broker: &Broker,
    queue: &str,
    options: ConsumerOptions,
    handler: H,
    shutdown: watch::Receiver<bool>,
) -> Result<(), AmqpError>
where
    H: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let handler = Arc::new(handler);
    let queue_name = short("queue", queue)?;
    let mut stopping = shutdown.clone();
    let mut restarts = 0u32;
    loop {
        if is_stopping(&stopping) {
            return Ok(());
        }
        let (channel, consumer) = match start_consumer(broker, &queue_name, &options, &shutdown)
            .await
        {
            Ok(started) => started,
            Err(AmqpError::ShuttingDown) => return Ok(()),
            Err(error) if error.is_permanent() => return Err(error),
            Err(error) => {
                let delay = broker.options().backoff.delay(restarts);
                tracing::warn!(
                    queue,
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "cannot start consuming; messages wait in the queue until this works"
                );
                metrics::counter!("dossier_amqp_consumer_failures_total", "queue" => queue.to_owned())
                        .increment(1);
                if sleep_or_stop(delay, &mut stopping).await {
                    return Ok(());
                }
                restarts = restarts.saturating_add(1);
                continue;
            }
        };
        tracing::info!(queue, prefetch = options.prefetch, "consuming");
        let started = Instant::now();
        let mut in_flight = JoinSet::new();
        let ended = run_session(queue, consumer, &handler, &mut in_flight, stopping.clone()).await;

        if let SessionEnd::Shutdown { consumer_tag } = &ended {
            // No new deliveries from here on; prefetched ones that no handler took
            // go back to the queue when the channel closes.
            let _ = channel
                .basic_cancel(consumer_tag.clone(), BasicCancelOptions::default())
                .await;
        }
        drain(queue, &mut in_flight, options.drain_timeout).await;
        if channel.status().connected() {
            let _ = channel.close(200, "consumer stopped".into()).await;
        }
        match ended {
            SessionEnd::Shutdown { .. } => {
                tracing::info!(
                    queue,
                    "stopped consuming; unacknowledged messages are back in the queue"
                );
                return Ok(());
            }
            SessionEnd::Lost(reason) => {
                metrics::counter!("dossier_amqp_consumer_failures_total", "queue" => queue.to_owned())
                    .increment(1);
                // A session that ran for a while starts the backoff over; one that
                // died at once keeps growing it, so a broken queue is not hammered.
                if started.elapsed() > Duration::from_secs(60) {
                    restarts = 0;
                }
                let delay = broker.options().backoff.delay(restarts);
                tracing::warn!(
                    queue,
                    reason = %reason,
                    retry_in_ms = delay.as_millis() as u64,
                    "lost the consumer; unacknowledged messages will be redelivered, reconnecting"
                );
                if sleep_or_stop(delay, &mut stopping).await {
                    return Ok(());
                }
                restarts = restarts.saturating_add(1);
            }
        }
    }
}

/// Opens a channel, sets the prefetch and starts a consumer.
async fn start_consumer(
    broker: &Broker,
    queue: &ShortString,
    options: &ConsumerOptions,
    shutdown: &watch::Receiver<bool>,
) -> Result<(Channel, lapin::Consumer), AmqpError> {
    let (_connection, channel) = broker.open_channel(shutdown).await?;
    let started = async {
        channel
            .basic_qos(options.prefetch.max(1), BasicQosOptions::default())
            .await
            .map_err(AmqpError::channel("setting the prefetch"))?;
        let tag = short(
            "consumer tag",
            &format!(
                "{}.{}.{}",
                broker.options().connection_name,
                queue,
                uuid::Uuid::new_v4().simple()
            ),
        )
        .unwrap_or_else(|_| ShortString::from(String::new()));
        channel
            .basic_consume(
                queue.clone(),
                tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(AmqpError::channel("starting a consumer"))
    }
    .await;
    match started {
        Ok(consumer) => Ok((channel, consumer)),
        Err(error) => {
            if channel.status().connected() {
                let _ = channel.close(200, "consumer failed to start".into()).await;
            }
            Err(error)
        }
    }
}

enum SessionEnd {
    Shutdown { consumer_tag: ShortString },
    Lost(String),
}

/// Takes deliveries and spawns their handlers until shutdown or the consumer ends.
async fn run_session<H, Fut>(
    queue: &str,
    mut consumer: lapin::Consumer,
    handler: &Arc<H>,
    in_flight: &mut JoinSet<()>,
    mut shutdown: watch::Receiver<bool>,
) -> SessionEnd
where
    H: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut shutdown) => {
                return SessionEnd::Shutdown { consumer_tag: consumer.tag() };
            }
            Some(finished) = in_flight.join_next(), if !in_flight.is_empty() => {
                report_task_end(queue, finished);
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    in_flight.spawn(handle_delivery(queue.to_owned(), delivery, Arc::clone(handler)));
                }
                Some(Err(error)) => return SessionEnd::Lost(error.to_string()),
                None => return SessionEnd::Lost("the broker cancelled the consumer".to_owned()),
            },
        }
    }
}

/// Runs the handler on one delivery and settles it by the outcome.
async fn handle_delivery<H, Fut>(queue: String, delivery: lapin::message::Delivery, handler: Arc<H>)
where
    H: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let lapin::message::Delivery {
        exchange,
        routing_key,
        redelivered,
        properties,
        data,
        acker,
        ..
    } = delivery;
    let incoming = Incoming {
        queue: queue.clone(),
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
        redelivered,
        properties,
        body: data,
    };
    let span = tracing::info_span!(
        "delivery",
        queue = %queue,
        message_id = incoming.message_id().unwrap_or_default(),
        routing_key = %incoming.routing_key,
        redelivered,
    );
    async move {
        let outcome = handler(incoming).await;
        let settled = match outcome {
            Outcome::Ack => acker.ack(BasicAckOptions::default()).await,
            Outcome::Reject => {
                acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await
            }
            Outcome::Retry => {
                acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await
            }
        };
        metrics::counter!("dossier_amqp_deliveries_total", "queue" => queue.clone(), "outcome" => outcome.label())
            .increment(1);
        match settled {
            Ok(true) => {
                if outcome == Outcome::Reject {
                    tracing::warn!("message rejected: dead-lettered for an operator to look at");
                }
            }
            Ok(false) | Err(_) => {
                metrics::counter!("dossier_amqp_ack_failures_total", "queue" => queue.clone())
                    .increment(1);
                tracing::warn!(
                    outcome = outcome.label(),
                    "could not settle the message (its channel is gone); the broker will redeliver it"
                );
            }
        }
    }
    .instrument(span)
    .await;
}

fn report_task_end(queue: &str, finished: Result<(), tokio::task::JoinError>) {
    if let Err(error) = finished
        && error.is_panic()
    {
        metrics::counter!("dossier_amqp_handler_panics_total", "queue" => queue.to_owned())
            .increment(1);
        tracing::error!(
            queue,
            "a message handler panicked; the message stays unacknowledged and will be redelivered \
             (and dead-lettered after the delivery limit)"
        );
    }
}

/// Lets running handlers finish for up to `timeout`, then abandons the rest.
async fn drain(queue: &str, in_flight: &mut JoinSet<()>, timeout: Duration) {
    if in_flight.is_empty() {
        return;
    }
    let drained = tokio::time::timeout(timeout, async {
        while let Some(finished) = in_flight.join_next().await {
            report_task_end(queue, finished);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            queue,
            abandoned = in_flight.len(),
            "handlers did not finish in {timeout:?}; abandoning them, their messages go back to the queue"
        );
        in_flight.abort_all();
        while in_flight.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_are_aggregate_dot_event_in_snake_case() {
        assert_eq!(routing_key("file", "FileUploaded"), "file.uploaded");
        assert_eq!(
            routing_key("file", "FileVisibilityChanged"),
            "file.visibility_changed"
        );
        assert_eq!(routing_key("file", "FileDeleted"), "file.deleted");
        assert_eq!(routing_key("file", "BlobPurged"), "file.blob_purged");
        assert_eq!(routing_key("task", "TaskCreated"), "task.created");
        assert_eq!(routing_key("bundle", "BundleRequested"), "bundle.requested");
    }

    #[test]
    fn routing_keys_handle_odd_names() {
        // The aggregate's name alone is not dropped: there would be nothing left.
        assert_eq!(routing_key("file", "File"), "file.file");
        // Only a whole-word prefix is dropped.
        assert_eq!(routing_key("file", "Filesystem"), "file.filesystem");
        assert_eq!(
            routing_key("Settings", "SettingsChanged"),
            "settings.changed"
        );
        assert_eq!(routing_key("bundle", "ZIPReady"), "bundle.zip_ready");
        assert_eq!(routing_key("file", "file_renamed"), "file.renamed");
    }

    #[test]
    fn the_blob_worker_queue_gets_exactly_the_deleted_files() {
        assert_eq!(BLOB_WORKER.binding_key, routing_key("file", "FileDeleted"));
        assert_eq!(
            ZIP_WORKER.binding_key,
            routing_key("bundle", "BundleRequested")
        );
        assert_eq!(INTAKE.dead_letter_queue, "dossier.commands.dead");
    }

    #[test]
    fn consumer_queues_are_quorum_queues_that_dead_letter() {
        for spec in CONSUMER_QUEUES {
            let arguments = consumer_queue_arguments(spec);
            let get = |key: &str| arguments.inner().get(key).cloned();
            assert_eq!(
                get("x-queue-type"),
                Some(AMQPValue::LongString("quorum".into()))
            );
            assert_eq!(
                get("x-dead-letter-exchange"),
                Some(AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()))
            );
            assert_eq!(
                get("x-dead-letter-routing-key"),
                Some(AMQPValue::LongString(spec.dead_letter_queue.into()))
            );
            assert!(matches!(get("x-delivery-limit"), Some(AMQPValue::LongInt(n)) if n > 0));
        }
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for _ in 0..100 {
            let first = backoff.delay(0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let late = backoff.delay(40);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }

    #[test]
    fn long_names_are_refused_not_panicked_on() {
        assert!(short("routing key", &"x".repeat(256)).is_err());
        assert!(short("routing key", "file.uploaded").is_ok());
    }

    #[test]
    fn invalid_urls_are_refused_without_their_password() {
        let error = Broker::new("http://guest:secret@localhost").unwrap_err();
        assert!(error.is_permanent());
        assert!(!error.to_string().contains("secret"), "{error}");
    }
}
