//! The relay and the blob worker against real services: a RabbitMQ virtual host
//! and a Postgres database of their own per test, events written through
//! cqrs-es and `PgEventStore` as the application writes them, and both blob
//! stores (a directory, and a real S3 server in-process).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use chrono::Utc;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{AggregateError, CqrsFramework};
use dossier_blobstore::{self as blob, BlobStore, BlobStoreSpec, ByteStream, S3Options};
use dossier_broker::{
    self, BLOB_DEAD_QUEUE, BLOB_QUEUE, Broker, ConfirmedPublisher, EVENTS_EXCHANGE,
};
use dossier_domain::{
    BlobKey, ContentType, CustomerId, DisplayName, File, FileCommand, FileId, FileName, FilePolicy,
    Origin, Sha256Hex, TenantId, UploadFile, Visibility,
};
use dossier_eventlog::db::Pool;
use dossier_eventlog::eventstore::{self, PgEventStore};
use dossier_eventlog::log::LoggedEvent;
use dossier_projections::{FilesProjection, Runner, RunnerConfig};
use dossier_test_support::rabbit::{TestVhost, fast_backoff, test_broker};
use dossier_test_support::wait::eventually;
use dossier_workers::blob::BlobWorkerConfig;
use dossier_workers::relay::{self, RelayConfig};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const TENANT: &str = "acme";
const CUSTOMER: &str = "customer-1";

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,lapin=off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A database, a vhost and a broker of their own, and a shutdown switch for the
/// tasks a test spawns.
struct Harness {
    pool: Pool,
    vhost: TestVhost,
    broker: Broker,
    shutdown: watch::Sender<bool>,
}

impl Harness {
    async fn new() -> Self {
        init_tracing();
        let (pool, _url) = dossier_test_support::db::fresh_database()
            .await
            .expect("test database");
        let vhost = TestVhost::create().await.expect("test vhost");
        let broker = test_broker(&vhost, "dossier-workers-test").await;
        let (shutdown, _) = watch::channel(false);
        Self {
            pool,
            vhost,
            broker,
            shutdown,
        }
    }

    fn spawn_relay(&self) -> Task {
        let config = RelayConfig {
            backoff: fast_backoff(),
            idle_poll: Duration::from_millis(20),
            ..RelayConfig::default()
        };
        let running = relay::run_with(
            self.pool.clone(),
            dossier_eventlog::log::LogReader::new(self.pool.clone()),
            self.broker.clone(),
            config,
            self.shutdown.subscribe(),
        );
        tokio::spawn(async move { running.await.map_err(|error| error.to_string()) })
    }

    fn spawn_blob_worker(&self, blobs: Arc<dyn BlobStore>) -> Task {
        let config = BlobWorkerConfig {
            retry: fast_backoff(),
            drain_timeout: Duration::from_secs(5),
            // These tests are about purging; the sweep has its own.
            first_sweep_after: Duration::from_secs(3600),
            ..BlobWorkerConfig::default()
        };
        let running = dossier_workers::blob::run(
            self.pool.clone(),
            self.broker.clone(),
            blobs,
            config,
            self.shutdown.subscribe(),
        );
        tokio::spawn(async move { running.await.map_err(|error| error.to_string()) })
    }

    /// Stops every spawned task and waits for them: once this returns, every
    /// delivery their consumers took is settled (handled and acked or rejected,
    /// or back in its queue).
    async fn stop(&self, tasks: Vec<Task>) {
        let _ = self.shutdown.send(true);
        for task in tasks {
            let ended = tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("a task did not stop on shutdown")
                .expect("a task panicked");
            ended.expect("a task failed");
        }
    }

    /// Stops every spawned task, waits for them, and removes the vhost.
    async fn finish(self, tasks: Vec<Task>) {
        self.stop(tasks).await;
        self.broker.close().await;
        self.vhost.cleanup().await.expect("delete vhost");
    }

    fn files(&self) -> Files {
        Files::new(self.pool.clone())
    }

    /// A second connection, not the broker's, for looking at queues.
    async fn observer(&self) -> lapin::Channel {
        let connection = Connection::connect(self.vhost.url(), ConnectionProperties::default())
            .await
            .expect("observer connection");
        let channel = connection.create_channel().await.expect("observer channel");
        // The connection stays open as long as its channels live.
        channel
    }

    /// A durable queue bound to `dossier.events` with `binding`: it survives the
    /// force-close of every connection of the vhost.
    async fn bind_test_queue(&self, binding: &str) -> String {
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
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind test queue");
        let _ = channel.close(200, "bound".into()).await;
        name
    }
}

/// A spawned role; its error as text.
type Task = JoinHandle<Result<(), String>>;

/// Files through cqrs-es on the real event store, as the application runs them.
struct Files {
    framework: CqrsFramework<File, PersistedEventStore<PgEventStore, File>>,
}

impl Files {
    fn new(pool: Pool) -> Self {
        Self {
            framework: CqrsFramework::new(
                PersistedEventStore::new_event_store(PgEventStore::new(pool)),
                vec![],
                FilePolicy::default(),
            ),
        }
    }

    async fn execute(&self, file_id: FileId, command: FileCommand) {
        let metadata = HashMap::from([
            (eventstore::META_TENANT.to_owned(), TENANT.to_owned()),
            (eventstore::META_ACTOR.to_owned(), "staff-1".to_owned()),
        ]);
        for _ in 0..50 {
            match self
                .framework
                .execute_with_metadata(&file_id.to_string(), command.clone(), metadata.clone())
                .await
            {
                Ok(()) => return,
                Err(AggregateError::AggregateConflict) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(error) => panic!("command failed: {error}"),
            }
        }
        panic!("command kept conflicting");
    }

    /// Records an upload of `content` stored under `key` (the bytes themselves
    /// must be put by the caller, or not at all for tests that do not read them).
    async fn upload(&self, file_id: FileId, key: &BlobKey, content: &[u8]) {
        let upload = UploadFile {
            tenant: tenant(),
            file_id,
            customer_id: CustomerId::parse(CUSTOMER).unwrap(),
            name: DisplayName::parse("Contract 2025").unwrap(),
            file_name: FileName::parse("contract_2025.pdf").unwrap(),
            content_type: ContentType::parse(Some("application/pdf")).unwrap(),
            size: content.len() as u64,
            sha256: Sha256Hex::parse(&hex::encode(Sha256::digest(content))).unwrap(),
            blob_key: key.clone(),
            visibility: Visibility::Internal,
            origin: Origin::StaffUpload,
            contract_id: None,
            task_id: None,
            at: Utc::now(),
        };
        self.execute(file_id, FileCommand::Upload(Box::new(upload)))
            .await;
    }

    async fn rename(&self, file_id: FileId, name: &str) {
        let command = FileCommand::Rename {
            tenant: tenant(),
            name: DisplayName::parse(name).unwrap(),
        };
        self.execute(file_id, command).await;
    }

    async fn delete(&self, file_id: FileId) {
        let command = FileCommand::Delete {
            tenant: tenant(),
            confirmed: true,
            at: Utc::now(),
        };
        self.execute(file_id, command).await;
    }
}

fn tenant() -> TenantId {
    TenantId::parse(TENANT).unwrap()
}

fn key_for(file_id: FileId) -> BlobKey {
    BlobKey::for_file(&tenant(), &CustomerId::parse(CUSTOMER).unwrap(), file_id)
}

fn body(bytes: &'static [u8]) -> ByteStream {
    Box::pin(futures::stream::iter([Ok(Bytes::from_static(bytes))]))
}

async fn put(blobs: &dyn BlobStore, key: &BlobKey, bytes: &'static [u8]) {
    blobs
        .put(key, body(bytes), 1 << 20)
        .await
        .expect("put blob");
}

/// Every event of the log, in position order.
async fn log(pool: &Pool) -> Vec<LoggedEvent> {
    let mut reader = dossier_eventlog::log::LogReader::new(pool.clone());
    reader
        .read(0, 100_000, &Default::default())
        .await
        .expect("read log")
}

async fn events_of_type(pool: &Pool, file_id: FileId, event_type: &str) -> usize {
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = $2",
            &[&file_id.to_string(), &event_type],
        )
        .await
        .unwrap();
    usize::try_from(row.get::<_, i64>(0)).unwrap()
}

async fn relay_checkpoint(pool: &Pool) -> i64 {
    let client = pool.get().await.unwrap();
    client
        .query_opt(
            "SELECT position FROM checkpoints WHERE name = $1",
            &[&relay::CHECKPOINT_NAME],
        )
        .await
        .unwrap()
        .map_or(0, |row| row.get(0))
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

/// Messages ready in the blob worker's queue (a passive declare).
async fn blob_queue_depth(channel: &lapin::Channel) -> u32 {
    channel
        .queue_declare(
            BLOB_QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(value) => Some(String::from_utf8_lossy(value.as_bytes()).into()),
        AMQPValue::ShortString(value) => Some(value.to_string()),
        _ => None,
    }
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(purpose: &str) -> Self {
        let path = std::env::temp_dir().join(format!("dossier-{purpose}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A blob store under test, with what keeps it alive.
struct Store {
    blobs: Arc<dyn BlobStore>,
    _server: Option<dossier_test_support::s3::S3Dev>,
    _dir: TempDir,
}

async fn dir_store() -> Store {
    let dir = TempDir::new("worker-blobs");
    let blobs = blob::open(&BlobStoreSpec::Dir(dir.0.join("blobs")))
        .await
        .unwrap();
    Store {
        blobs,
        _server: None,
        _dir: dir,
    }
}

async fn s3_store() -> Store {
    let dir = TempDir::new("worker-s3");
    let server = dossier_test_support::s3::spawn(dir.0.join("s3"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let blobs = blob::open(&BlobStoreSpec::S3(S3Options {
        bucket: "dossier-worker-test".into(),
        prefix: Some("deployment-a".into()),
        endpoint: Some(server.endpoint.clone()),
        region: dossier_test_support::s3::DEV_REGION.into(),
        access_key: Some(server.access_key.clone()),
        secret_key: Some(server.secret_key.clone()),
        create_bucket_if_missing: true,
    }))
    .await
    .unwrap();
    Store {
        blobs,
        _server: Some(server),
        _dir: dir,
    }
}

// ---------------------------------------------------------------------------
// The relay
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_every_event_in_order_with_the_tenant_header() {
    let harness = Harness::new().await;
    let queue = harness.bind_test_queue("file.#").await;
    let relay = harness.spawn_relay();

    let files = harness.files();
    let file_id = FileId::new();
    files.upload(file_id, &key_for(file_id), b"%PDF").await;
    files.rename(file_id, "Contract 2026").await;
    files.delete(file_id).await;
    let logged = log(&harness.pool).await;
    assert_eq!(logged.len(), 3);

    let observer = harness.observer().await;
    let mut received = Vec::new();
    eventually("the three events on the test queue", async || {
        received.extend(take_all(&observer, &queue).await);
        if received.len() >= 3 {
            Ok(())
        } else {
            Err(received.len())
        }
    })
    .await;
    // Anything more would be a duplicate, which the relay has no reason to send
    // here. It moves its checkpoint only past confirmed publishes, and the broker
    // confirms a publish once the message is in the queue: with the checkpoint at
    // the log head, whatever the relay published is in the test queue now.
    let head = logged.last().unwrap().position;
    let pool = &harness.pool;
    eventually("the checkpoint at the log head", || async move {
        relay_checkpoint(pool).await == head
    })
    .await;
    received.extend(take_all(&observer, &queue).await);

    assert_eq!(received.len(), 3, "exactly the three events, once each");
    let routing_keys: Vec<String> = received.iter().map(|d| d.routing_key.to_string()).collect();
    assert_eq!(
        routing_keys,
        ["file.uploaded", "file.renamed", "file.deleted"]
    );
    for (delivery, event) in received.iter().zip(&logged) {
        let properties = &delivery.properties;
        assert_eq!(
            properties.message_id().as_ref().map(|id| id.to_string()),
            Some(event.id.to_string())
        );
        assert_eq!(header(properties, "tenant").as_deref(), Some(TENANT));
        assert_eq!(
            properties
                .content_type()
                .as_ref()
                .map(|t| t.to_string())
                .as_deref(),
            Some("application/json")
        );
        assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
        // The body is the contract's Event, exactly what the log serializes to.
        let body: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
        assert_eq!(body, serde_json::to_value(event).unwrap());
        let keys: HashSet<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let expected: HashSet<&str> = [
            "id",
            "position",
            "tenant",
            "aggregate_type",
            "aggregate_id",
            "sequence",
            "event_type",
            "event_version",
            "at",
            "actor",
            "payload",
        ]
        .into();
        assert_eq!(keys, expected);
    }

    harness.finish(vec![relay]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_loses_nothing_when_the_connection_is_force_closed() {
    const EVENTS: usize = 200;
    const BEFORE: usize = 40;
    const WRITERS: usize = 4;
    const CLOSE_AT: usize = 100;

    let harness = Harness::new().await;
    let queue = harness.bind_test_queue("#").await;
    let relay = harness.spawn_relay();

    // Some events first, until the management API lists the relay's connection
    // (it does after a statistics round, a few seconds).
    let files = harness.files();
    for _ in 0..BEFORE {
        let file_id = FileId::new();
        files.upload(file_id, &key_for(file_id), b"x").await;
    }
    eventually("the relay's connection in the management API", async || {
        !harness
            .vhost
            .connection_names()
            .await
            .expect("list")
            .is_empty()
    })
    .await;
    // Then writers that append as fast as they can while the relay publishes, and
    // the force-close in the middle of that.
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let files = harness.files();
            tokio::spawn(async move {
                for _ in 0..(EVENTS - BEFORE) / WRITERS {
                    let file_id = FileId::new();
                    files.upload(file_id, &key_for(file_id), b"x").await;
                }
            })
        })
        .collect();
    let pool = &harness.pool;
    eventually("the log to pass the closing point", || async move {
        log(pool).await.len() >= CLOSE_AT
    })
    .await;
    let closed = harness
        .vhost
        .close_connections()
        .await
        .expect("force-close");
    let written_at_close = log(&harness.pool).await.len();
    assert!(
        closed > 0,
        "the relay's connection was listed, so it is closed"
    );
    for writer in writers {
        writer.await.unwrap();
    }

    let logged = log(&harness.pool).await;
    assert_eq!(logged.len(), EVENTS);
    let expected: HashSet<String> = logged.iter().map(|e| e.id.to_string()).collect();
    let observer = harness.observer().await;
    let mut seen = HashSet::new();
    let mut deliveries = 0;
    eventually("every event id on the test queue", async || {
        for delivery in take_all(&observer, &queue).await {
            deliveries += 1;
            if let Some(id) = delivery.properties.message_id() {
                seen.insert(id.to_string());
            }
        }
        let missing = expected.difference(&seen).count();
        if missing == 0 {
            Ok(())
        } else {
            Err(format!("{missing} missing"))
        }
    })
    .await;
    assert!(
        deliveries >= EVENTS,
        "duplicates are allowed, losses are not"
    );

    let head = logged.last().unwrap().position;
    let pool = &harness.pool;
    eventually("the checkpoint at the log head", || async move {
        relay_checkpoint(pool).await == head
    })
    .await;
    assert!(
        !relay.is_finished(),
        "the relay must survive the broker dropping it"
    );
    eprintln!(
        "force-closed {closed} connection(s) after {written_at_close} events; \
         {deliveries} deliveries for {EVENTS} events"
    );

    harness.finish(vec![relay]).await;
}

// ---------------------------------------------------------------------------
// The blob worker
// ---------------------------------------------------------------------------

async fn deleted_files_blob_is_purged_and_recorded_once(store: Store) {
    let harness = Harness::new().await;
    let blobs = Arc::clone(&store.blobs);
    let relay = harness.spawn_relay();
    let worker = harness.spawn_blob_worker(Arc::clone(&blobs));

    let files = harness.files();
    let file_id = FileId::new();
    let key = key_for(file_id);
    put(blobs.as_ref(), &key, b"the bytes of a contract").await;
    files
        .upload(file_id, &key, b"the bytes of a contract")
        .await;
    // A neighbour that stays.
    let kept_id = FileId::new();
    let kept_key = key_for(kept_id);
    put(blobs.as_ref(), &kept_key, b"kept").await;
    files.upload(kept_id, &kept_key, b"kept").await;

    files.delete(file_id).await;
    let pool = &harness.pool;
    eventually("a BlobPurged event", || async move {
        events_of_type(pool, file_id, "BlobPurged").await == 1
    })
    .await;
    assert!(!blobs.exists(&key).await.unwrap(), "the blob is gone");
    assert!(blobs.exists(&kept_key).await.unwrap(), "other blobs stay");
    let purged = log(&harness.pool)
        .await
        .into_iter()
        .find(|e| e.event_type == "BlobPurged")
        .unwrap();
    assert_eq!(purged.actor, "blob-worker");
    assert_eq!(purged.tenant, TENANT);

    // The same FileDeleted again (at least once delivery): nothing new is recorded.
    let deleted = log(&harness.pool)
        .await
        .into_iter()
        .find(|e| e.event_type == "FileDeleted")
        .unwrap();
    let publisher = ConfirmedPublisher::open(&harness.broker, &harness.shutdown.subscribe())
        .await
        .unwrap();
    let (routing_key, properties, body) = relay::message_for(&deleted).unwrap();
    publisher
        .publish(EVENTS_EXCHANGE, &routing_key, properties, &body)
        .await
        .unwrap();
    publisher.close().await;
    let observer = &harness.observer().await;
    eventually("the blob queue to be empty", async || {
        blob_queue_depth(observer).await == 0
    })
    .await;
    // Stopped, the worker has settled the second delivery: handled and acked,
    // or back in its queue, which must then still be empty.
    harness.stop(vec![relay, worker]).await;
    assert_eq!(
        blob_queue_depth(observer).await,
        0,
        "the second delivery was handled, not given back"
    );
    assert_eq!(
        events_of_type(&harness.pool, file_id, "BlobPurged").await,
        1,
        "a second delivery records nothing"
    );
    assert!(take_all(observer, BLOB_DEAD_QUEUE).await.is_empty());

    harness.finish(vec![]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_blobs_are_purged_and_recorded_dir_store() {
    deleted_files_blob_is_purged_and_recorded_once(dir_store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_blobs_are_purged_and_recorded_s3_store() {
    deleted_files_blob_is_purged_and_recorded_once(s3_store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blob_worker_consumes_again_after_its_connection_is_force_closed() {
    let harness = Harness::new().await;
    let store = dir_store().await;
    let relay = harness.spawn_relay();
    let worker = harness.spawn_blob_worker(Arc::clone(&store.blobs));

    eventually(
        "the worker's connection in the management API",
        async || {
            !harness
                .vhost
                .connection_names()
                .await
                .expect("list")
                .is_empty()
        },
    )
    .await;
    assert!(
        harness
            .vhost
            .close_connections()
            .await
            .expect("force-close")
            > 0
    );

    let files = harness.files();
    let file_id = FileId::new();
    let key = key_for(file_id);
    put(store.blobs.as_ref(), &key, b"bytes").await;
    files.upload(file_id, &key, b"bytes").await;
    files.delete(file_id).await;
    let pool = &harness.pool;
    eventually("a BlobPurged event after the reconnect", || async move {
        events_of_type(pool, file_id, "BlobPurged").await == 1
    })
    .await;
    assert!(!store.blobs.exists(&key).await.unwrap());

    harness.finish(vec![relay, worker]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparseable_message_is_dead_lettered_not_retried() {
    let harness = Harness::new().await;
    let store = dir_store().await;
    let worker = harness.spawn_blob_worker(Arc::clone(&store.blobs));

    let publisher = ConfirmedPublisher::open(&harness.broker, &harness.shutdown.subscribe())
        .await
        .unwrap();
    let properties = BasicProperties::default()
        .with_message_id("garbage-1".into())
        .with_delivery_mode(dossier_broker::PERSISTENT);
    publisher
        .publish(
            EVENTS_EXCHANGE,
            "file.deleted",
            properties,
            b"this is not JSON",
        )
        .await
        .unwrap();
    publisher.close().await;

    let observer = harness.observer().await;
    let mut dead = Vec::new();
    eventually("the message in the dead-letter queue", async || {
        dead.extend(take_all(&observer, BLOB_DEAD_QUEUE).await);
        !dead.is_empty()
    })
    .await;
    // Stopped, the worker has settled every delivery it took: whatever it
    // dead-lettered is in the dead-letter queue, whatever it gave back is in its
    // own queue (and must not be, below).
    harness.stop(vec![worker]).await;
    dead.extend(take_all(&observer, BLOB_DEAD_QUEUE).await);
    assert_eq!(dead.len(), 1, "dead-lettered once");
    let message = &dead[0];
    assert_eq!(message.data, b"this is not JSON");
    assert!(!message.redelivered);
    // x-death says why and how often: rejected, once, from the blob queue.
    let deaths = match message
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death").cloned())
    {
        Some(AMQPValue::FieldArray(deaths)) => deaths,
        other => panic!("no x-death header: {other:?}"),
    };
    let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
        panic!("x-death entry is not a table");
    };
    let field = |name: &str| death.inner().get(name).cloned();
    assert_eq!(
        field("reason"),
        Some(AMQPValue::LongString("rejected".into()))
    );
    assert_eq!(
        field("queue"),
        Some(AMQPValue::LongString(BLOB_QUEUE.into()))
    );
    assert!(
        matches!(field("count"), Some(AMQPValue::LongLongInt(1))),
        "delivered once: {:?}",
        field("count")
    );
    assert!(take_all(&observer, BLOB_QUEUE).await.is_empty());

    harness.finish(vec![]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_the_log_does_not_know_is_dead_lettered_and_deletes_nothing() {
    let harness = Harness::new().await;
    let store = dir_store().await;
    let worker = harness.spawn_blob_worker(Arc::clone(&store.blobs));

    // A live file, and a forged FileDeleted naming its blob.
    let files = harness.files();
    let file_id = FileId::new();
    let key = key_for(file_id);
    put(store.blobs.as_ref(), &key, b"precious").await;
    files.upload(file_id, &key, b"precious").await;
    let mut forged = log(&harness.pool).await.remove(0);
    forged.id = uuid::Uuid::now_v7();
    forged.event_type = "FileDeleted".to_owned();
    forged.sequence = 2;
    forged.payload = serde_json::json!({
        "customer_id": CUSTOMER,
        "blob_key": key.as_str(),
        "deleted_at": Utc::now(),
    });
    let (routing_key, properties, body) = relay::message_for(&forged).unwrap();
    assert_eq!(routing_key, "file.deleted");
    let publisher = ConfirmedPublisher::open(&harness.broker, &harness.shutdown.subscribe())
        .await
        .unwrap();
    publisher
        .publish(EVENTS_EXCHANGE, &routing_key, properties, &body)
        .await
        .unwrap();
    publisher.close().await;

    let observer = harness.observer().await;
    let mut dead = Vec::new();
    eventually("the forged message in the dead-letter queue", async || {
        dead.extend(take_all(&observer, BLOB_DEAD_QUEUE).await);
        !dead.is_empty()
    })
    .await;
    assert!(
        store.blobs.exists(&key).await.unwrap(),
        "nothing was deleted"
    );
    assert_eq!(
        events_of_type(&harness.pool, file_id, "BlobPurged").await,
        0
    );

    harness.finish(vec![worker]).await;
}

// ---------------------------------------------------------------------------
// Orphan sweep and verification
// ---------------------------------------------------------------------------

/// Makes a directory-store blob look `age` old.
fn age_blob(root: &std::path::Path, key: &BlobKey, age: Duration) {
    let path = root.join(key.as_str());
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orphan_sweep_removes_old_unreferenced_blobs_only() {
    init_tracing();
    let (pool, _) = dossier_test_support::db::fresh_database().await.unwrap();
    let dir = TempDir::new("sweep");
    let root = dir.0.join("blobs");
    let blobs = blob::open(&BlobStoreSpec::Dir(root.clone())).await.unwrap();
    let files = Files::new(pool.clone());
    let old = Duration::from_secs(2 * 3600);

    // Old and referenced by a live file (in the read model and the log).
    let live = FileId::new();
    let live_key = key_for(live);
    put(blobs.as_ref(), &live_key, b"live").await;
    files.upload(live, &live_key, b"live").await;
    age_blob(&root, &live_key, old);
    // Old, its file deleted but not purged yet: the blob worker's, not the sweep's.
    let deleted = FileId::new();
    let deleted_key = key_for(deleted);
    put(blobs.as_ref(), &deleted_key, b"deleted").await;
    files.upload(deleted, &deleted_key, b"deleted").await;
    files.delete(deleted).await;
    age_blob(&root, &deleted_key, old);
    // Old and referenced by nothing: an upload whose command never got recorded.
    let orphan_key = key_for(FileId::new());
    put(blobs.as_ref(), &orphan_key, b"orphan").await;
    age_blob(&root, &orphan_key, old);
    // Fresh and referenced by nothing: maybe an upload in progress.
    let fresh_key = key_for(FileId::new());
    put(blobs.as_ref(), &fresh_key, b"fresh").await;
    // An old bundle: the bundle expiry's business.
    let bundle_key = BlobKey::for_bundle(&tenant(), uuid::Uuid::now_v7());
    put(blobs.as_ref(), &bundle_key, b"PK").await;
    age_blob(&root, &bundle_key, old);

    Runner::new(pool.clone(), FilesProjection, RunnerConfig::default())
        .catch_up()
        .await
        .unwrap();
    let report = dossier_workers::sweep_orphans(&pool, blobs.as_ref(), Duration::from_secs(3600))
        .await
        .unwrap();

    assert_eq!(report.removed, vec![orphan_key.as_str().to_owned()]);
    assert!(
        report.purged.is_empty(),
        "a deletion younger than the grace period is the blob worker's"
    );
    assert!(report.failed.is_empty());
    assert_eq!(report.listed, 5);
    assert_eq!(report.referenced, 2);
    assert_eq!(report.fresh, 1);
    assert_eq!(report.bundles, 1);
    assert!(!blobs.exists(&orphan_key).await.unwrap());
    for kept in [&live_key, &deleted_key, &fresh_key, &bundle_key] {
        assert!(blobs.exists(kept).await.unwrap(), "{kept} must stay");
    }

    // A second sweep finds nothing more to do.
    let again = dossier_workers::sweep_orphans(&pool, blobs.as_ref(), Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(again.removed.is_empty());
}

/// A deleted file whose `file.deleted` message was lost (no blob worker ran
/// when it was deleted, and none ever gets the message): the sweep purges its
/// blob through the blob worker's path and records `BlobPurged` once.
async fn a_lost_purge_is_reconciled_by_the_sweep(store: Store) {
    init_tracing();
    let (pool, _) = dossier_test_support::db::fresh_database().await.unwrap();
    let blobs = store.blobs.as_ref();
    let files = Files::new(pool.clone());

    let deleted = FileId::new();
    let deleted_key = key_for(deleted);
    put(blobs, &deleted_key, b"deleted long ago").await;
    files
        .upload(deleted, &deleted_key, b"deleted long ago")
        .await;
    files.delete(deleted).await;
    let live = FileId::new();
    let live_key = key_for(live);
    put(blobs, &live_key, b"live").await;
    files.upload(live, &live_key, b"live").await;
    Runner::new(pool.clone(), FilesProjection, RunnerConfig::default())
        .catch_up()
        .await
        .unwrap();

    // No grace: the deletion is "old enough" for the sweep to take it over.
    let report = dossier_workers::sweep_orphans(&pool, blobs, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(report.purged, vec![deleted.0], "{report:?}");
    assert!(report.removed.is_empty(), "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.referenced, 1, "the live file stays: {report:?}");
    assert!(
        !blobs.exists(&deleted_key).await.unwrap(),
        "the bytes are gone"
    );
    assert!(blobs.exists(&live_key).await.unwrap());
    assert_eq!(events_of_type(&pool, deleted, "BlobPurged").await, 1);
    let purged = log(&pool)
        .await
        .into_iter()
        .find(|e| e.event_type == "BlobPurged")
        .unwrap();
    assert_eq!(purged.actor, "blob-worker", "the blob worker's own command");

    // Once reconciled there is nothing left to do, and nothing is recorded twice.
    let again = dossier_workers::sweep_orphans(&pool, blobs, Duration::ZERO)
        .await
        .unwrap();
    assert!(
        again.purged.is_empty() && again.removed.is_empty(),
        "{again:?}"
    );
    assert_eq!(events_of_type(&pool, deleted, "BlobPurged").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_purge_is_reconciled_by_the_sweep_dir_store() {
    a_lost_purge_is_reconciled_by_the_sweep(dir_store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_purge_is_reconciled_by_the_sweep_s3_store() {
    a_lost_purge_is_reconciled_by_the_sweep(s3_store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_called_bundles_keeps_its_files_in_the_sweep_and_loses_its_orphans() {
    init_tracing();
    let (pool, _) = dossier_test_support::db::fresh_database().await.unwrap();
    let store = dir_store().await;
    let blobs = store.blobs.as_ref();
    let files = Files::new(pool.clone());
    let bundles_customer = CustomerId::parse("_bundles").unwrap();

    // An upload of customer `_bundles` whose command was never recorded.
    let orphan = FileId::new();
    let orphan_key = BlobKey::for_file(&tenant(), &bundles_customer, orphan);
    put(blobs, &orphan_key, b"orphan of _bundles").await;
    // A live file of the same customer: referenced, stays.
    let live = FileId::new();
    let live_key = BlobKey::for_file(&tenant(), &bundles_customer, live);
    put(blobs, &live_key, b"live of _bundles").await;
    files.upload(live, &live_key, b"live of _bundles").await;
    // Bundle archives, old and new layout: the bundle expiry's, never the sweep's.
    let bundle = uuid::Uuid::now_v7();
    let bundle_key = BlobKey::for_bundle(&tenant(), bundle);
    put(blobs, &bundle_key, b"PK").await;
    let legacy_key = BlobKey::legacy_bundle(&tenant(), uuid::Uuid::now_v7());
    put(blobs, &legacy_key, b"PK").await;
    assert_ne!(
        bundle_key.as_str().split('/').nth(1),
        Some(bundles_customer.as_str()),
        "new archives do not share the customer's folder"
    );

    let report = dossier_workers::sweep_orphans(&pool, blobs, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        report.removed,
        vec![orphan_key.as_str().to_owned()],
        "{report:?}"
    );
    assert_eq!(report.referenced, 1, "{report:?}");
    assert_eq!(report.bundles, 2, "{report:?}");
    assert!(!blobs.exists(&orphan_key).await.unwrap());
    for kept in [&live_key, &bundle_key, &legacy_key] {
        assert!(blobs.exists(kept).await.unwrap(), "{kept} must stay");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_reports_mismatched_and_missing_blobs() {
    init_tracing();
    let (pool, _) = dossier_test_support::db::fresh_database().await.unwrap();
    let store = s3_store().await;
    let blobs = store.blobs.as_ref();
    let files = Files::new(pool.clone());

    let good = FileId::new();
    put(blobs, &key_for(good), b"good").await;
    files.upload(good, &key_for(good), b"good").await;
    let tampered = FileId::new();
    put(blobs, &key_for(tampered), b"tampered").await;
    files
        .upload(tampered, &key_for(tampered), b"original")
        .await;
    let missing = FileId::new();
    files
        .upload(missing, &key_for(missing), b"never stored")
        .await;
    Runner::new(pool.clone(), FilesProjection, RunnerConfig::default())
        .catch_up()
        .await
        .unwrap();

    let report = dossier_workers::verify_blobs(&pool, blobs).await.unwrap();
    assert_eq!(report.checked, 3);
    assert_eq!(report.ok, 1);
    assert!(!report.is_clean());
    assert_eq!(report.mismatched.len(), 1);
    let mismatch = &report.mismatched[0];
    assert_eq!(mismatch.file_id, tampered.0);
    assert_eq!(
        mismatch.actual_sha256.as_deref(),
        Some(hex::encode(Sha256::digest(b"tampered")).as_str())
    );
    assert_eq!(report.missing.len(), 1);
    assert_eq!(report.missing[0].file_id, missing.0);
    assert!(report.unreadable.is_empty());
}
