//! A handler that panics, against a real broker (a RabbitMQ vhost of the test's
//! own): its delivery is dead-lettered with the reason, and the consumer goes on
//! with the next messages. The prefetch is as small as the test allows, so a
//! delivery left unacknowledged by the panic would stop the queue.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dossier_broker::{
    AUDIT_DEAD_QUEUE, AUDIT_QUEUE, BLOB_DEAD_QUEUE, BLOB_QUEUE, BatchOptions, BatchOutcome, Broker,
    ConfirmedPublisher, ConsumerOptions, EVENTS_EXCHANGE, Outcome, PANICKED_REASON, REASON_HEADER,
};
use dossier_test_support::rabbit::{TestVhost, test_broker};
use dossier_test_support::wait::eventually;
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::watch;

const POISON: &[u8] = b"poison";

struct Harness {
    vhost: TestVhost,
    broker: Broker,
    shutdown: watch::Sender<bool>,
}

impl Harness {
    async fn new() -> Self {
        let vhost = TestVhost::create().await.expect("a vhost for the test");
        let broker = test_broker(&vhost, "dossier-consumer-panics-test").await;
        let (shutdown, _) = watch::channel(false);
        Self {
            vhost,
            broker,
            shutdown,
        }
    }

    /// Publishes `bodies` to `dossier.events` with `routing_key`, confirmed, in order.
    async fn publish(&self, routing_key: &str, bodies: &[&[u8]]) {
        let publisher = ConfirmedPublisher::open(&self.broker, &self.shutdown.subscribe())
            .await
            .expect("a publisher");
        for (n, body) in bodies.iter().enumerate() {
            let properties = BasicProperties::default()
                .with_message_id(format!("message-{n}").into())
                .with_delivery_mode(dossier_broker::PERSISTENT);
            publisher
                .publish(EVENTS_EXCHANGE, routing_key, properties, body)
                .await
                .expect("published");
        }
        publisher.close().await;
    }

    /// Every message now in `queue`, taken (auto-ack) through a connection of
    /// the test's own.
    async fn take_all(&self, queue: &str) -> Vec<lapin::message::Delivery> {
        let connection = Connection::connect(self.vhost.url(), ConnectionProperties::default())
            .await
            .expect("observer connection");
        let channel = connection.create_channel().await.expect("observer channel");
        let mut taken = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            taken.push(message.delivery);
        }
        let _ = connection.close(200, "looked".into()).await;
        taken
    }

    async fn finish(
        self,
        consumer: tokio::task::JoinHandle<Result<(), dossier_broker::AmqpError>>,
    ) {
        let _ = self.shutdown.send(true);
        tokio::time::timeout(Duration::from_secs(30), consumer)
            .await
            .expect("the consumer stops on shutdown")
            .expect("the consumer task did not panic")
            .expect("the consumer ended cleanly");
        self.broker.close().await;
        self.vhost.cleanup().await.expect("delete vhost");
    }
}

fn reason(message: &lapin::message::Delivery) -> Option<String> {
    match message
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(REASON_HEADER)?
    {
        AMQPValue::LongString(value) => Some(String::from_utf8_lossy(value.as_bytes()).into()),
        _ => None,
    }
}

/// Waits for the poison message in `dead_queue` and checks it says why.
async fn assert_dead_lettered_with_the_reason(harness: &Harness, dead_queue: &str) {
    let mut dead = Vec::new();
    eventually("the poison message in the dead-letter queue", async || {
        dead.extend(harness.take_all(dead_queue).await);
        !dead.is_empty()
    })
    .await;
    assert_eq!(dead.len(), 1, "dead-lettered once");
    assert_eq!(dead[0].data, POISON);
    assert_eq!(reason(&dead[0]).as_deref(), Some(PANICKED_REASON));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_dead_letters_its_delivery_and_frees_the_slot() {
    let harness = Harness::new().await;
    let handled: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let seen = Arc::clone(&handled);
    // One delivery at a time: a slot held by the panic would stop everything.
    let options = ConsumerOptions {
        prefetch: 1,
        drain_timeout: Duration::from_secs(5),
    };
    let broker = harness.broker.clone();
    let stopping = harness.shutdown.subscribe();
    let consumer = tokio::spawn(async move {
        dossier_broker::consume_with(
            &broker,
            BLOB_QUEUE,
            options,
            move |incoming| {
                let seen = Arc::clone(&seen);
                async move {
                    if incoming.body.as_ref() == POISON {
                        panic!("a handler bug");
                    }
                    seen.lock().unwrap().push(incoming.body.to_vec());
                    Outcome::Ack
                }
            },
            stopping,
        )
        .await
    });

    harness
        .publish("file.deleted", &[POISON, b"first after", b"second after"])
        .await;

    eventually("both messages after the poison handled", || async {
        handled.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(
        *handled.lock().unwrap(),
        [b"first after".to_vec(), b"second after".to_vec()]
    );
    assert_dead_lettered_with_the_reason(&harness, BLOB_DEAD_QUEUE).await;
    assert!(
        harness.take_all(BLOB_QUEUE).await.is_empty(),
        "nothing waits in the queue"
    );
    harness.finish(consumer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handler_that_panics_dead_letters_only_the_message_that_makes_it_panic() {
    let harness = Harness::new().await;
    let handled: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let seen = Arc::clone(&handled);
    let options = BatchOptions {
        prefetch: 2,
        window: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(5),
    };
    let broker = harness.broker.clone();
    let stopping = harness.shutdown.subscribe();
    let consumer = tokio::spawn(async move {
        dossier_broker::consume_batches(
            &broker,
            AUDIT_QUEUE,
            options,
            move |batch| {
                let seen = Arc::clone(&seen);
                async move {
                    if batch.iter().any(|message| message.body.as_ref() == POISON) {
                        panic!("a handler bug");
                    }
                    let mut seen = seen.lock().unwrap();
                    seen.extend(batch.iter().map(|message| message.body.to_vec()));
                    vec![BatchOutcome::Ack; batch.len()]
                }
            },
            stopping,
        )
        .await
    });

    harness
        .publish("file.uploaded", &[b"before", POISON, b"after", b"last"])
        .await;

    eventually("every message but the poison handled", || async {
        let handled = handled.lock().unwrap();
        ["before", "after", "last"]
            .iter()
            .all(|body| handled.contains(&body.as_bytes().to_vec()))
    })
    .await;
    assert_dead_lettered_with_the_reason(&harness, AUDIT_DEAD_QUEUE).await;
    assert!(
        harness.take_all(AUDIT_QUEUE).await.is_empty(),
        "nothing waits in the queue"
    );
    harness.finish(consumer).await;
}
