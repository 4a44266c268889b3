//! The relay as one follower of the log among others, and the audit worker's
//! windows, against a real Postgres database and RabbitMQ virtual host of their
//! own per test:
//!
//! - two relays take turns through the relay's checkpoint (each event is
//!   published once), and one takes over when the other dies, also in the
//!   middle of its turn, whose advisory lock does not hold back the log;
//! - the audit worker writes a whole window of deliveries in one transaction and
//!   dead-letters the poison of a window, with a reason, without losing the rest.

use std::collections::HashMap;
use std::time::Duration;

use dossier_broker::{
    AUDIT_DEAD_QUEUE, Broker, ConfirmedPublisher, EVENTS_EXCHANGE, REASON_HEADER,
};
use dossier_eventlog::db::Pool;
use dossier_eventlog::follow::{Effects, checkpoint};
use dossier_eventlog::log::{LogReader, LoggedEvent};
use dossier_runtime::config::Secret;
use dossier_test_support::rabbit::{TestVhost, fast_backoff, test_broker};
use dossier_test_support::wait::Wait;
use dossier_workers::audit::{self, AuditConfig};
use dossier_workers::relay::{self, RelayConfig};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);
const TENANT: &str = "acme";

/// A database, a vhost and a broker of their own.
struct Harness {
    pool: Pool,
    url: String,
    vhost: TestVhost,
    broker: Broker,
    shutdown: watch::Sender<bool>,
}

/// A spawned role; its error as text.
type Task = JoinHandle<Result<(), String>>;

impl Harness {
    async fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,lapin=off".into()),
            )
            .with_test_writer()
            .try_init();
        let (pool, url) = dossier_test_support::db::fresh_database()
            .await
            .expect("test database");
        let vhost = TestVhost::create().await.expect("test vhost");
        let broker = test_broker(&vhost, "dossier-relay-audit-test").await;
        let (shutdown, _) = watch::channel(false);
        Self {
            pool,
            url,
            vhost,
            broker,
            shutdown,
        }
    }

    /// A relay with a pool of its own (a process of its own), stopped by
    /// `shutdown`.
    async fn spawn_relay(&self, shutdown: watch::Receiver<bool>) -> Task {
        let pool = dossier_eventlog::db::connect(&self.url, 4)
            .await
            .expect("the relay's pool");
        let config = RelayConfig {
            batch_size: 8,
            backoff: fast_backoff(),
            idle_poll: Duration::from_millis(20),
            ..RelayConfig::default()
        };
        let running = relay::run_with(
            pool.clone(),
            LogReader::new(pool),
            self.broker.clone(),
            config,
            shutdown,
        );
        tokio::spawn(async move { running.await.map_err(|error| error.to_string()) })
    }

    /// Stops every spawned task, waits for them, and removes the vhost.
    async fn finish(self, tasks: Vec<Task>) {
        let _ = self.shutdown.send(true);
        for task in tasks {
            let ended = tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("a task did not stop on shutdown")
                .expect("a task panicked");
            ended.expect("a task failed");
        }
        self.broker.close().await;
        self.vhost.cleanup().await.expect("delete vhost");
    }

    /// A second connection, not the broker's, for looking at queues.
    async fn observer(&self) -> lapin::Channel {
        let connection = Connection::connect(self.vhost.url(), ConnectionProperties::default())
            .await
            .expect("observer connection");
        connection.create_channel().await.expect("observer channel")
    }

    /// A durable queue bound to `dossier.events` with `#`.
    async fn bind_test_queue(&self) -> String {
        let name = format!("test.events.{}", uuid::Uuid::new_v4().simple());
        let channel = self.observer().await;
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare test queue");
        channel
            .queue_bind(
                name.as_str().into(),
                EVENTS_EXCHANGE.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind test queue");
        let _ = channel.close(200, "bound".into()).await;
        name
    }
}

/// Appends `count` task events, each in a transaction of its own; answers the
/// last position.
async fn append(pool: &Pool, count: usize) -> i64 {
    let client = pool.get().await.expect("connection");
    let mut last = 0;
    for i in 0..count {
        last = client
            .query_one(
                "INSERT INTO events (id, tenant, aggregate_type, aggregate_id, sequence, \
                     event_type, event_version, payload, actor) \
                 VALUES ($1, $2, 'task', $3, 1, 'TaskCreated', '1', $4, 'staff-1') \
                 RETURNING position",
                &[
                    &uuid::Uuid::now_v7(),
                    &TENANT,
                    &uuid::Uuid::new_v4().to_string(),
                    &serde_json::json!({ "title": format!("task {i}") }),
                ],
            )
            .await
            .expect("insert")
            .get(0);
    }
    last
}

/// Every event of the log, in position order.
async fn log(pool: &Pool) -> Vec<LoggedEvent> {
    LogReader::new(pool.clone())
        .with_max_wait(WAIT)
        .read(0, 100_000, &Default::default())
        .await
        .expect("read log")
}

async fn relay_checkpoint(pool: &Pool) -> i64 {
    checkpoint::read(pool, relay::CHECKPOINT_NAME)
        .await
        .expect("checkpoint")
        .unwrap_or(0)
}

async fn count(pool: &Pool, sql: &str) -> i64 {
    pool.get()
        .await
        .expect("connection")
        .query_one(sql, &[])
        .await
        .expect("count")
        .get(0)
}

/// Lock requests that wait, in the test's database.
async fn waiting_locks(pool: &Pool) -> i64 {
    count(
        pool,
        "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid \
         WHERE NOT l.granted AND a.datname = current_database()",
    )
    .await
}

/// Takes every message now in `queue` (auto-ack).
async fn take_all(channel: &lapin::Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let mut taken = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        taken.push(message.delivery);
    }
    taken
}

/// How often each message id arrived.
fn tally(deliveries: &[lapin::message::Delivery]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for delivery in deliveries {
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

/// Waits until `check` answers `true`, looking every 20 ms, for at most [`WAIT`].
async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    Wait::new(what)
        .timeout(WAIT)
        .interval(Duration::from_millis(20))
        .expect(check)
        .await;
}

// ---------------------------------------------------------------------------
// The relay: turns and take-over through the one checkpoint mechanism
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_take_turns_publish_each_event_once_and_one_takes_over_when_the_other_dies() {
    let harness = Harness::new().await;
    let queue = harness.bind_test_queue().await;
    let observer = harness.observer().await;
    let (stop_first, first_stopped) = watch::channel(false);
    let first = harness.spawn_relay(first_stopped).await;
    let second = harness.spawn_relay(harness.shutdown.subscribe()).await;

    // Both relays run while the log grows, in windows of 8.
    let head = append(&harness.pool, 60).await;
    let pool = &harness.pool;
    eventually("the relay checkpoint at the log head", || async move {
        relay_checkpoint(pool).await == head
    })
    .await;
    // Confirmed means routed: everything either relay published is in the queue
    // once the checkpoint is at the head, and no relay publishes below it.
    let received = take_all(&observer, &queue).await;
    let seen = tally(&received);
    let logged = log(&harness.pool).await;
    assert_eq!(logged.len(), 60);
    for event in &logged {
        assert_eq!(
            seen.get(&event.id.to_string()),
            Some(&1),
            "the event at {} was published once, by one of the two relays",
            event.position
        );
    }
    assert_eq!(received.len(), 60, "nothing else, and no duplicates");
    assert!(!first.is_finished() && !second.is_finished());

    // The first relay dies; the second one carries on alone from the shared
    // checkpoint.
    first.abort();
    let _ = first.await;
    drop(stop_first);
    let head = append(&harness.pool, 20).await;
    eventually("the relay checkpoint at the new head", || async move {
        relay_checkpoint(pool).await == head
    })
    .await;
    let seen = tally(&take_all(&observer, &queue).await);
    for event in log(&harness.pool).await.iter().skip(60) {
        assert!(
            seen.contains_key(&event.id.to_string()),
            "the event at {} was published after the take-over",
            event.position
        );
    }

    harness.finish(vec![second]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_waits_for_the_turn_of_one_that_died_mid_window_then_takes_over() {
    let harness = Harness::new().await;
    let queue = harness.bind_test_queue().await;
    let observer = harness.observer().await;
    append(&harness.pool, 10).await;

    // Another relay process holds the relay's turn, as while it awaits its
    // window's confirms.
    let (mut client, connection) = tokio_postgres::connect(&harness.url, tokio_postgres::NoTls)
        .await
        .expect("the other relay's connection");
    let connection = tokio::spawn(connection);
    let turn = client.transaction().await.expect("begin");
    checkpoint::take_turns(&turn, &[relay::CHECKPOINT_NAME], Effects::External)
        .await
        .expect("the other relay's turn");

    // Its turn holds back no follower: the log's watermark passes events that
    // commit while the turn lasts (a row lock would give the turn an xid, and
    // that would hold the watermark back until the confirms came).
    let head = append(&harness.pool, 5).await;
    assert_eq!(
        log(&harness.pool).await.last().map(|e| e.position),
        Some(head),
        "the log is readable up to the head while a relay holds its turn"
    );

    // This relay waits for the turn instead of publishing beside the other one.
    let relay = harness.spawn_relay(harness.shutdown.subscribe()).await;
    let pool = &harness.pool;
    eventually(
        "the relay waiting for the other one's turn",
        || async move { waiting_locks(pool).await > 0 },
    )
    .await;
    assert!(
        take_all(&observer, &queue).await.is_empty(),
        "nothing is published while the other relay holds its turn"
    );
    assert_eq!(relay_checkpoint(&harness.pool).await, 0);

    // The other process dies without a word: its session, and its turn, end.
    connection.abort();
    drop(turn);
    drop(client);
    eventually("the relay checkpoint at the log head", || async move {
        relay_checkpoint(pool).await == head
    })
    .await;
    let seen = tally(&take_all(&observer, &queue).await);
    assert_eq!(seen.len(), 15, "every event, after the take-over");

    harness.finish(vec![relay]).await;
}

// ---------------------------------------------------------------------------
// The audit worker: a window per transaction, poison on its own
// ---------------------------------------------------------------------------

fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(value) => Some(String::from_utf8_lossy(value.as_bytes()).into()),
        AMQPValue::ShortString(value) => Some(value.to_string()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_worker_writes_a_window_in_one_transaction_and_dead_letters_its_poison_alone() {
    let harness = Harness::new().await;
    append(&harness.pool, 14).await;
    let logged = log(&harness.pool).await;
    assert_eq!(logged.len(), 14);

    // A window's worth of messages waits in the queue before the worker starts:
    // the fourteen events as the relay publishes them, one message that names no
    // event, and one that names an event the log does not have.
    let publisher = ConfirmedPublisher::open(&harness.broker, &harness.shutdown.subscribe())
        .await
        .expect("publisher");
    let mut messages: Vec<(String, BasicProperties, Vec<u8>)> = logged
        .iter()
        .map(|event| relay::message_for(event).expect("a message"))
        .collect();
    messages.insert(
        5,
        (
            "task.created".to_owned(),
            BasicProperties::default().with_delivery_mode(dossier_broker::PERSISTENT),
            b"this is not JSON".to_vec(),
        ),
    );
    let mut forged = logged[0].clone();
    forged.id = uuid::Uuid::now_v7();
    messages.insert(9, relay::message_for(&forged).expect("a message"));
    assert_eq!(messages.len(), 16);
    for (routing_key, properties, body) in &messages {
        publisher
            .publish(EVENTS_EXCHANGE, routing_key, properties.clone(), body)
            .await
            .expect("published");
    }
    publisher.close().await;

    let config = AuditConfig {
        prefetch: 16,
        // Long enough that the window is closed by being full, not by time.
        window: Duration::from_secs(5),
        retry: fast_backoff(),
        drain_timeout: Duration::from_secs(5),
        ..AuditConfig::new(Secret::new("audit-window-test-key".to_owned()))
    };
    let worker = {
        let running = audit::run(
            harness.pool.clone(),
            LogReader::new(harness.pool.clone()),
            harness.broker.clone(),
            config,
            harness.shutdown.subscribe(),
        );
        tokio::spawn(async move { running.await.map_err(|error| error.to_string()) })
    };

    let observer = harness.observer().await;
    let mut dead = Vec::new();
    let pool = &harness.pool;
    eventually("fourteen audit entries", || async move {
        count(pool, "SELECT count(*) FROM audit_trail").await == 14
    })
    .await;
    eventually(
        "the two poison messages in the dead-letter queue",
        async || {
            dead.extend(take_all(&observer, AUDIT_DEAD_QUEUE).await);
            dead.len() >= 2
        },
    )
    .await;

    // One transaction wrote the whole window: every row carries its xid. One
    // transaction per event would leave fourteen.
    assert_eq!(
        count(
            &harness.pool,
            "SELECT count(DISTINCT xmin::text) FROM audit_trail"
        )
        .await,
        1,
        "the window's entries were written in one transaction"
    );
    let entries: i64 = harness
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM audit_trail WHERE event_id = ANY($1) AND action = 'task.created'",
            &[&logged.iter().map(|e| e.id).collect::<Vec<_>>()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(entries, 14, "an entry for every event of the window");

    // Each poison message is in the dead-letter queue on its own, saying why.
    let mut reasons: Vec<(Vec<u8>, String)> = dead
        .iter()
        .map(|message| {
            (
                message.data.clone(),
                header(&message.properties, REASON_HEADER).expect("a reason header"),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    let (forged_body, not_in_log) = reasons
        .iter()
        .find(|(body, _)| body.as_slice() != b"this is not JSON")
        .expect("the forged event");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(forged_body).unwrap()["id"],
        forged.id.to_string()
    );
    assert!(not_in_log.contains("log has no event"), "{not_in_log}");
    let (_, no_event) = reasons
        .iter()
        .find(|(body, _)| body.as_slice() == b"this is not JSON")
        .expect("the unreadable message");
    assert!(no_event.contains("names no event"), "{no_event}");
    assert!(
        take_all(&observer, dossier_broker::AUDIT_QUEUE)
            .await
            .is_empty(),
        "nothing is left in the queue: the window was acked"
    );

    harness.finish(vec![worker]).await;
}
