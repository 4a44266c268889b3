//! Consuming a queue: [`consume`] runs a handler per delivery and acks,
//! dead-letters or requeues by the handler's [`Outcome`]; [`consume_batches`]
//! hands a handler a window of deliveries at once and settles them together.
//! Both reconnect on connection loss and drain on shutdown. Everything on
//! RabbitMQ is at least once: handlers must be idempotent.
//!
//! A handler that panics does not take its delivery down with it: both forms
//! catch the panic, dead-letter the delivery with [`PANICKED_REASON`] in the
//! [`crate::REASON_HEADER`] header (a confirmed copy to the queue's dead-letter
//! queue, or the broker's own dead-lettering if the copy fails), count it in
//! `dossier_amqp_handler_panics_total{queue}` and keep consuming. Before this, a
//! panicking handler left its delivery unacknowledged, holding a prefetch slot
//! until the channel closed, so a few poison messages stopped a queue for
//! everyone. A window whose batch handler panics is handed over again one
//! delivery at a time, so that only the delivery that panics is dead-lettered.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dossier_runtime::shutdown::{is_stopping, sleep_or_stop, stopped};
use futures::{FutureExt as _, StreamExt as _};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::connection::Broker;
use crate::error::{AmqpError, short};
use crate::publisher::ConfirmedPublisher;
use crate::topology::{DEAD_LETTER_EXCHANGE, REASON_HEADER, consumer_queue};

/// The [`crate::REASON_HEADER`] of a delivery whose handler panicked. It names no
/// content of the message (a panic's text may quote it); the service log has
/// the queue, message id and routing key at the same time.
pub const PANICKED_REASON: &str = "the handler panicked on this message; it was taken out of the queue so that it cannot \
     block others (see the service log for the queue and message id)";

/// What a consumer's handler decided about one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done, its effect is durable: acknowledge.
    Ack,
    /// It can never succeed (unparseable, invalid): reject without requeue, so
    /// the broker dead-letters it.
    Reject,
    /// It can never succeed, and an operator should read why: a confirmed
    /// copy goes to the queue's dead-letter queue with `reason` in
    /// [`crate::REASON_HEADER`], then the delivery is acknowledged (rejected,
    /// so the broker dead-letters it without the reason, if the copy fails).
    DeadLetter {
        /// Why, for the operator; ids, never personal data.
        reason: String,
    },
    /// It failed for now; the handler already waited its own backoff: nack with
    /// requeue. The queue's delivery limit dead-letters it if this never ends.
    Retry,
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Reject => "reject",
            Self::DeadLetter { .. } => "dead_letter",
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
    /// Its body (cheap to clone: the consumer keeps a handle to dead-letter
    /// the message should its handler panic).
    pub body: Bytes,
}

impl Incoming {
    /// The delivery as a handler sees it, and what settles it.
    fn from_delivery(queue: &str, delivery: lapin::message::Delivery) -> (Self, lapin::Acker) {
        let lapin::message::Delivery {
            exchange,
            routing_key,
            redelivered,
            properties,
            data,
            acker,
            ..
        } = delivery;
        let incoming = Self {
            queue: queue.to_owned(),
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            redelivered,
            properties,
            body: Bytes::from(data),
        };
        (incoming, acker)
    }

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
    let drain_timeout = options.drain_timeout;
    keep_consuming(
        broker,
        queue,
        options.prefetch,
        shutdown,
        |channel, consumer, stopping| {
            let handler = Arc::clone(&handler);
            let queue = queue.to_owned();
            let panics = PanicPolicy {
                broker: broker.clone(),
                queue: queue.clone(),
                shutdown: stopping.clone(),
            };
            Box::pin(async move {
                let mut in_flight = JoinSet::new();
                let ended = run_session(
                    &channel,
                    consumer,
                    &handler,
                    &panics,
                    &mut in_flight,
                    stopping,
                )
                .await;
                if let SessionEnd::Shutdown { consumer_tag } = &ended {
                    // No new deliveries from here on; prefetched ones that no
                    // handler took go back to the queue when the channel closes.
                    let _ = channel
                        .basic_cancel(consumer_tag.clone(), BasicCancelOptions::default())
                        .await;
                }
                drain(&queue, &mut in_flight, drain_timeout).await;
                ended
            })
        },
    )
    .await
}

type SessionFuture = Pin<Box<dyn Future<Output = SessionEnd> + Send>>;

/// The loop every consumer runs: start a consumer with `prefetch`, run
/// `session` on it until shutdown or until the connection is lost, close the
/// channel (unacknowledged messages go back to the queue), and on a loss
/// reconnect with backoff.
async fn keep_consuming<S>(
    broker: &Broker,
    queue: &str,
    prefetch: u16,
    shutdown: watch::Receiver<bool>,
    mut session: S,
) -> Result<(), AmqpError>
where
    S: FnMut(Channel, lapin::Consumer, watch::Receiver<bool>) -> SessionFuture,
{
    let queue_name = short("queue", queue)?;
    let mut stopping = shutdown.clone();
    let mut restarts = 0u32;
    loop {
        if is_stopping(&stopping) {
            return Ok(());
        }
        let (channel, consumer) = match start_consumer(broker, &queue_name, prefetch, &shutdown)
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
        tracing::info!(queue, prefetch, "consuming");
        let started = Instant::now();
        let ended = session(channel.clone(), consumer, stopping.clone()).await;
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
    prefetch: u16,
    shutdown: &watch::Receiver<bool>,
) -> Result<(Channel, lapin::Consumer), AmqpError> {
    let (_connection, channel) = broker.open_channel(shutdown).await?;
    let started = async {
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
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

/// What a per-delivery consumer does with a delivery whose handler panicked:
/// it copies it to the queue's dead-letter queue with the reason.
#[derive(Clone)]
struct PanicPolicy {
    broker: Broker,
    queue: String,
    shutdown: watch::Receiver<bool>,
}

/// Takes deliveries and spawns their handlers until shutdown or the consumer ends.
async fn run_session<H, Fut>(
    channel: &Channel,
    mut consumer: lapin::Consumer,
    handler: &Arc<H>,
    panics: &PanicPolicy,
    in_flight: &mut JoinSet<()>,
    mut shutdown: watch::Receiver<bool>,
) -> SessionEnd
where
    H: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let mut alive = ChannelWatch::new(channel);
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut shutdown) => {
                return SessionEnd::Shutdown { consumer_tag: consumer.tag() };
            }
            Some(finished) = in_flight.join_next(), if !in_flight.is_empty() => {
                report_task_end(&panics.queue, finished);
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    in_flight.spawn(handle_delivery(panics.clone(), delivery, Arc::clone(handler)));
                }
                Some(Err(error)) => return SessionEnd::Lost(error.to_string()),
                None => return SessionEnd::Lost("the broker cancelled the consumer".to_owned()),
            },
            ended = alive.gone() => return ended,
        }
    }
}

/// How often a session that waits for deliveries checks that its channel is
/// still connected (see [`ChannelWatch`]).
const CHANNEL_CHECK: Duration = Duration::from_millis(500);

/// Why a session ended when [`ChannelWatch`] found its channel gone.
const CHANNEL_GONE: &str = "the channel is no longer connected, and the consumer did not end";

/// Notices a session's channel is gone. A consumer's stream ends when its
/// connection fails; this is for when it does not (lapin has had such bugs,
/// and one fault test here once saw the audit trail stop after a cut
/// connection with nothing logged): a session waits on a dead channel for
/// [`CHANNEL_CHECK`] at most, then reconnects. One timer per session, polled
/// only while the session waits for deliveries, never while a handler runs.
struct ChannelWatch {
    channel: Channel,
    check: tokio::time::Interval,
}

impl ChannelWatch {
    fn new(channel: &Channel) -> Self {
        let mut check = tokio::time::interval(CHANNEL_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            channel: channel.clone(),
            check,
        }
    }

    /// Resolves once the channel is no longer connected (cancel-safe).
    async fn gone(&mut self) -> SessionEnd {
        loop {
            self.check.tick().await;
            if !self.channel.status().connected() {
                return SessionEnd::Lost(CHANNEL_GONE.to_owned());
            }
        }
    }
}

/// Runs the handler on one delivery and settles it by the outcome. A panic of
/// the handler (in the call or in its future) is caught here: the delivery is
/// dead-lettered with [`PANICKED_REASON`] instead of staying unacknowledged.
async fn handle_delivery<H, Fut>(
    panics: PanicPolicy,
    delivery: lapin::message::Delivery,
    handler: Arc<H>,
) where
    H: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let queue = panics.queue.clone();
    let (incoming, acker) = Incoming::from_delivery(&queue, delivery);
    let redelivered = incoming.redelivered;
    let span = tracing::info_span!(
        "delivery",
        queue = %queue,
        message_id = incoming.message_id().unwrap_or_default(),
        routing_key = %incoming.routing_key,
        redelivered,
    );
    async move {
        // A cheap copy (the body is shared) for dead-lettering it afterwards.
        let kept = incoming.clone();
        let ran = AssertUnwindSafe(async { handler(incoming).await })
            .catch_unwind()
            .await;
        let (outcome, label) = match ran {
            Ok(outcome) => {
                let label = outcome.label();
                (outcome, label)
            }
            Err(_) => {
                // The panic's text is not logged: it may quote the message.
                count_panic(&queue);
                tracing::error!(
                    "a message handler panicked; dead-lettering the message so that it holds \
                     no prefetch slot, and consuming on"
                );
                let reason = PANICKED_REASON.to_owned();
                (Outcome::DeadLetter { reason }, "panicked")
            }
        };
        let rejected = outcome == Outcome::Reject;
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
            Outcome::DeadLetter { reason } => {
                let mut dead_letters =
                    DeadLetters::new(panics.broker.clone(), &queue, panics.shutdown.clone());
                let copied = dead_letters.copy(&kept, &reason).await;
                dead_letters.close().await;
                match copied {
                    Ok(()) => acker.ack(BasicAckOptions::default()).await,
                    Err(error) => {
                        tracing::warn!(
                            error = %error,
                            "could not copy the message to the dead-letter queue; rejecting it \
                             instead (the broker dead-letters it without the reason)"
                        );
                        acker
                            .reject(BasicRejectOptions { requeue: false })
                            .await
                    }
                }
            }
        };
        metrics::counter!("dossier_amqp_deliveries_total", "queue" => queue.clone(), "outcome" => label)
            .increment(1);
        match settled {
            Ok(true) => {
                if rejected {
                    tracing::warn!("message rejected: dead-lettered for an operator to look at");
                }
            }
            Ok(false) | Err(_) => {
                metrics::counter!("dossier_amqp_ack_failures_total", "queue" => queue.clone())
                    .increment(1);
                tracing::warn!(
                    outcome = label,
                    "could not settle the message (its channel is gone); the broker will redeliver it"
                );
            }
        }
    }
    .instrument(span)
    .await;
}

fn count_panic(queue: &str) {
    metrics::counter!("dossier_amqp_handler_panics_total", "queue" => queue.to_owned())
        .increment(1);
}

/// Handler panics are caught inside the task; a task that still panics did so
/// while settling, and its message is redelivered once the channel closes.
fn report_task_end(queue: &str, finished: Result<(), tokio::task::JoinError>) {
    if let Err(error) = finished
        && error.is_panic()
    {
        count_panic(queue);
        tracing::error!(
            queue,
            "settling a message panicked; it stays unacknowledged until the channel closes"
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

// ---------------------------------------------------------------- batches

/// A window of deliveries as a batch handler sees it, in delivery order.
pub type Batch = Arc<[Incoming]>;

/// What a batch handler decided about one delivery of its [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Done, its effect is durable: acknowledged with the rest of the window.
    Ack,
    /// It failed for now; the handler already waited its own backoff: nack with
    /// requeue. The queue's delivery limit dead-letters it if this never ends.
    Retry,
    /// It can never succeed (it does not decode, it names something that does
    /// not exist): a copy goes to the queue's dead-letter queue with `reason` in
    /// the [`crate::REASON_HEADER`] header, confirmed, and the delivery is acked;
    /// if the copy cannot be published it is rejected and the broker dead-letters
    /// it (without the reason). Either way on its own: the rest of the window
    /// is settled as the handler said.
    DeadLetter {
        /// Why, for the operator who looks at the dead-letter queue.
        reason: String,
    },
}

impl BatchOutcome {
    fn label(&self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Retry => "retry",
            Self::DeadLetter { .. } => "dead_letter",
        }
    }
}

/// How [`consume_batches`] runs.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// The most deliveries in one batch, and the prefetch (`basic.qos`): the
    /// broker sends no more than this many before the batch is settled.
    pub prefetch: u16,
    /// How long after the first delivery of a batch to wait for more before
    /// handing over what has arrived; a full batch is handed over at once.
    pub window: Duration,
    /// How long, at shutdown, a batch in flight may take to finish before it is
    /// abandoned (its messages go back to the queue).
    pub drain_timeout: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            prefetch: 16,
            window: Duration::from_millis(25),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Consumes `queue` a window at a time until shutdown: takes up to `prefetch`
/// deliveries (or what has arrived within `window` of the first), hands them to
/// `handler` at once, and settles them by its answer, one [`BatchOutcome`] per
/// delivery in order: every `Ack` of the window in one `basic.ack` (multiple),
/// after the handler returned, so after its effect committed; each `Retry` and
/// `DeadLetter` on its own. A handler that answers too few outcomes gets `Retry`
/// for the missing ones. A window whose handler panics is handed to it again
/// one delivery at a time: a delivery that panics alone is dead-lettered with
/// [`PANICKED_REASON`], the others are settled by their outcome.
///
/// Batches of one consumer run one after the other. Reconnecting and shutdown
/// work as in [`consume_with`]. Answers `Ok` after shutdown; an error only for
/// a permanent problem (an invalid URL or queue name).
pub async fn consume_batches<H, Fut>(
    broker: &Broker,
    queue: &str,
    options: BatchOptions,
    handler: H,
    shutdown: watch::Receiver<bool>,
) -> Result<(), AmqpError>
where
    H: Fn(Batch) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<BatchOutcome>> + Send + 'static,
{
    let handler = Arc::new(handler);
    keep_consuming(
        broker,
        queue,
        options.prefetch,
        shutdown,
        |channel, consumer, stopping| {
            let session = BatchSession {
                queue: queue.to_owned(),
                options: options.clone(),
                dead_letters: DeadLetters::new(broker.clone(), queue, stopping.clone()),
            };
            Box::pin(session.run(channel, consumer, Arc::clone(&handler), stopping))
        },
    )
    .await
}

/// One consumer's batches, on one channel.
struct BatchSession {
    queue: String,
    options: BatchOptions,
    /// Where dead-letter copies are published.
    dead_letters: DeadLetters,
}

/// How one run of a batch handler ended.
enum Ran {
    Answered(Vec<BatchOutcome>),
    Panicked,
    /// Shutdown came and the handler did not finish within the drain timeout.
    Abandoned,
}

impl BatchSession {
    async fn run<H, Fut>(
        mut self,
        channel: Channel,
        mut consumer: lapin::Consumer,
        handler: Arc<H>,
        mut shutdown: watch::Receiver<bool>,
    ) -> SessionEnd
    where
        H: Fn(Batch) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<BatchOutcome>> + Send + 'static,
    {
        let mut alive = ChannelWatch::new(&channel);
        let ended = loop {
            let deliveries = match self.gather(&mut alive, &mut consumer, &mut shutdown).await {
                Ok(deliveries) => deliveries,
                Err(ended) => break ended,
            };
            self.handle(deliveries, &handler, &mut shutdown).await;
        };
        if let SessionEnd::Shutdown { consumer_tag } = &ended {
            let _ = channel
                .basic_cancel(consumer_tag.clone(), BasicCancelOptions::default())
                .await;
        }
        self.dead_letters.close().await;
        ended
    }

    /// The next window: waits for a first delivery, then for more until the
    /// batch is full or the window is over. Deliveries gathered when the session
    /// ends are not handed over; they go back to the queue with the channel.
    async fn gather(
        &self,
        alive: &mut ChannelWatch,
        consumer: &mut lapin::Consumer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Vec<lapin::message::Delivery>, SessionEnd> {
        let lost = |next: Option<Result<_, lapin::Error>>| match next {
            Some(Ok(delivery)) => Ok(delivery),
            Some(Err(error)) => Err(SessionEnd::Lost(error.to_string())),
            None => Err(SessionEnd::Lost(
                "the broker cancelled the consumer".to_owned(),
            )),
        };
        let first = tokio::select! {
            biased;
            () = stopped(shutdown) => {
                return Err(SessionEnd::Shutdown { consumer_tag: consumer.tag() });
            }
            next = consumer.next() => lost(next)?,
            ended = alive.gone() => return Err(ended),
        };
        let size = usize::from(self.options.prefetch.max(1));
        let mut deliveries = Vec::with_capacity(size);
        deliveries.push(first);
        let window_ends = tokio::time::Instant::now() + self.options.window;
        while deliveries.len() < size {
            tokio::select! {
                biased;
                () = stopped(shutdown) => {
                    return Err(SessionEnd::Shutdown { consumer_tag: consumer.tag() });
                }
                next = consumer.next() => deliveries.push(lost(next)?),
                () = tokio::time::sleep_until(window_ends) => break,
                ended = alive.gone() => return Err(ended),
            }
        }
        Ok(deliveries)
    }

    /// Runs the handler on one window and settles it.
    async fn handle<H, Fut>(
        &mut self,
        deliveries: Vec<lapin::message::Delivery>,
        handler: &Arc<H>,
        shutdown: &mut watch::Receiver<bool>,
    ) where
        H: Fn(Batch) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<BatchOutcome>> + Send + 'static,
    {
        let (incoming, ackers): (Vec<Incoming>, Vec<lapin::Acker>) = deliveries
            .into_iter()
            .map(|delivery| Incoming::from_delivery(&self.queue, delivery))
            .unzip();
        let batch: Batch = incoming.into();
        let span = tracing::info_span!("batch", queue = %self.queue, size = batch.len());
        let mut outcomes = match self
            .run_handler(Arc::clone(&batch), handler, shutdown, &span)
            .await
        {
            Ran::Answered(outcomes) => outcomes,
            Ran::Abandoned => return,
            Ran::Panicked => match self.isolate(&batch, handler, shutdown, &span).await {
                Some(outcomes) => outcomes,
                None => return,
            },
        };
        if outcomes.len() < batch.len() {
            if !outcomes.is_empty() {
                tracing::error!(
                    queue = %self.queue,
                    answered = outcomes.len(),
                    size = batch.len(),
                    "a batch handler answered fewer outcomes than it got messages; retrying the rest"
                );
            }
            outcomes.resize(batch.len(), BatchOutcome::Retry);
        }
        self.settle(&batch, &ackers, &outcomes)
            .instrument(span)
            .await;
    }

    /// Runs the handler on `batch` in a task of its own, so that a panic ends
    /// only that task; at shutdown it waits up to the drain timeout.
    async fn run_handler<H, Fut>(
        &self,
        batch: Batch,
        handler: &Arc<H>,
        shutdown: &mut watch::Receiver<bool>,
        span: &tracing::Span,
    ) -> Ran
    where
        H: Fn(Batch) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<BatchOutcome>> + Send + 'static,
    {
        let size = batch.len();
        let handler = Arc::clone(handler);
        // The call itself runs in the task too: a handler may panic before it
        // returns its future.
        let mut running =
            tokio::spawn(async move { handler(batch).await }.instrument(span.clone()));
        let finished = tokio::select! {
            finished = &mut running => Some(finished),
            () = stopped(shutdown) => {
                tokio::time::timeout(self.options.drain_timeout, &mut running)
                    .await
                    .ok()
            }
        };
        match finished {
            Some(Ok(outcomes)) => Ran::Answered(outcomes),
            Some(Err(error)) if error.is_panic() => {
                count_panic(&self.queue);
                // The panic's text is not logged: it may quote a message.
                tracing::error!(
                    queue = %self.queue,
                    size,
                    "a batch handler panicked"
                );
                Ran::Panicked
            }
            // Cancelled: only at shutdown, like an abandoned batch.
            Some(Err(_)) => Ran::Abandoned,
            None => {
                running.abort();
                tracing::warn!(
                    queue = %self.queue,
                    abandoned = size,
                    "a batch did not finish in {:?}; abandoning it, its messages go back to the queue",
                    self.options.drain_timeout
                );
                Ran::Abandoned
            }
        }
    }

    /// After a panic: hands the window's deliveries over one at a time, so
    /// that only a delivery that panics on its own is dead-lettered. `None` when
    /// shutdown abandoned it (every message goes back to the queue).
    async fn isolate<H, Fut>(
        &self,
        batch: &Batch,
        handler: &Arc<H>,
        shutdown: &mut watch::Receiver<bool>,
        span: &tracing::Span,
    ) -> Option<Vec<BatchOutcome>>
    where
        H: Fn(Batch) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<BatchOutcome>> + Send + 'static,
    {
        let panicked = || BatchOutcome::DeadLetter {
            reason: PANICKED_REASON.to_owned(),
        };
        if batch.len() == 1 {
            return Some(vec![panicked()]);
        }
        tracing::info!(
            queue = %self.queue,
            size = batch.len(),
            "handing the window over again one message at a time, to find the one that panics"
        );
        let mut outcomes = Vec::with_capacity(batch.len());
        for message in batch.iter() {
            let single: Batch = Arc::from(vec![message.clone()]);
            let outcome = match self.run_handler(single, handler, shutdown, span).await {
                Ran::Answered(answered) => {
                    answered.into_iter().next().unwrap_or(BatchOutcome::Retry)
                }
                Ran::Panicked => {
                    tracing::error!(
                        queue = %self.queue,
                        message_id = message.message_id().unwrap_or_default(),
                        routing_key = %message.routing_key,
                        "this message makes the handler panic; dead-lettering it"
                    );
                    panicked()
                }
                Ran::Abandoned => return None,
            };
            outcomes.push(outcome);
        }
        Some(outcomes)
    }

    /// Dead letters and retries one by one, then every ack of the window at once.
    async fn settle(
        &mut self,
        batch: &[Incoming],
        ackers: &[lapin::Acker],
        outcomes: &[BatchOutcome],
    ) {
        let mut acked: Vec<usize> = Vec::with_capacity(batch.len());
        for (i, outcome) in outcomes.iter().enumerate().take(batch.len()) {
            metrics::counter!("dossier_amqp_deliveries_total", "queue" => self.queue.clone(), "outcome" => outcome.label())
                .increment(1);
            let settled = match outcome {
                BatchOutcome::Ack => {
                    acked.push(i);
                    continue;
                }
                BatchOutcome::Retry => {
                    ackers[i]
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        })
                        .await
                }
                BatchOutcome::DeadLetter { reason } => {
                    tracing::warn!(
                        reason,
                        message_id = batch[i].message_id().unwrap_or_default(),
                        "dead-lettering a message for an operator to look at"
                    );
                    match self.dead_letters.copy(&batch[i], reason).await {
                        Ok(()) => {
                            acked.push(i);
                            continue;
                        }
                        Err(error) => {
                            tracing::warn!(
                                error = %error,
                                "could not copy the message to the dead-letter queue; rejecting it \
                                 instead (the broker dead-letters it without the reason)"
                            );
                            ackers[i]
                                .reject(BasicRejectOptions { requeue: false })
                                .await
                        }
                    }
                }
            };
            self.settled(settled);
        }
        // Every delivery of the window that is not settled yet is acked, and
        // earlier windows are settled: one ack of the highest tag covers them all.
        if let Some(&last) = acked.last() {
            let settled = ackers[last]
                .ack(BasicAckOptions {
                    multiple: acked.len() > 1,
                })
                .await;
            self.settled(settled);
        }
    }

    fn settled(&self, settled: Result<bool, lapin::Error>) {
        if !matches!(settled, Ok(true)) {
            metrics::counter!("dossier_amqp_ack_failures_total", "queue" => self.queue.clone())
                .increment(1);
            tracing::warn!(
                queue = %self.queue,
                "could not settle messages (their channel is gone); the broker will redeliver them"
            );
        }
    }
}

/// Copies of messages, with a reason, into their queue's dead-letter queue:
/// the one way both consumer forms dead-letter with a reason.
struct DeadLetters {
    broker: Broker,
    queue: String,
    /// Opened when first needed, kept while it works.
    publisher: Option<ConfirmedPublisher>,
    /// Ends the wait for a channel at shutdown.
    shutdown: watch::Receiver<bool>,
}

impl DeadLetters {
    fn new(broker: Broker, queue: &str, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            broker,
            queue: queue.to_owned(),
            publisher: None,
            shutdown,
        }
    }

    /// Publishes a copy of `message` with `reason` in [`REASON_HEADER`] to the
    /// queue's dead-letter queue, confirmed.
    async fn copy(&mut self, message: &Incoming, reason: &str) -> Result<(), AmqpError> {
        let Some(spec) = consumer_queue(&self.queue) else {
            return Err(AmqpError::NoDeadLetterQueue {
                queue: self.queue.clone(),
            });
        };
        let mut headers = message.properties.headers().clone().unwrap_or_default();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason.to_owned())),
        );
        headers.insert(
            "x-original-routing-key".into(),
            AMQPValue::LongString(LongString::from(message.routing_key.clone())),
        );
        let properties = message.properties.clone().with_headers(headers);
        let publisher = match self.publisher.take() {
            Some(publisher) if publisher.is_open() => publisher,
            _ => {
                // Bounded: a broker that is gone takes this channel with it anyway.
                tokio::time::timeout(
                    self.broker.options().connect_timeout,
                    ConfirmedPublisher::open(&self.broker, &self.shutdown),
                )
                .await
                .map_err(|_| AmqpError::ConnectTimeout {
                    url: self.broker.display_url().to_owned(),
                    timeout: self.broker.options().connect_timeout,
                })??
            }
        };
        let published = publisher
            .publish(
                DEAD_LETTER_EXCHANGE,
                spec.dead_letter_queue,
                properties,
                &message.body,
            )
            .await;
        if published.is_ok() {
            self.publisher = Some(publisher);
        } else {
            publisher.close().await;
        }
        published
    }

    async fn close(&mut self) {
        if let Some(publisher) = self.publisher.take() {
            publisher.close().await;
        }
    }
}
