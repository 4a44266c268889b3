//! The event log against a real Postgres: appends, optimistic concurrency, the
//! append-only guard, migrations, the Event JSON shape, cqrs-es on top of the store,
//! and the log reader's promise never to skip an event that commits late.
//!
//! Every test gets its own database from `dossier_test_support::db::fresh_database` (server from
//! `DOSSIER_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cqrs_es::persist::{
    PersistedEventRepository, PersistedEventStore, PersistenceError, SerializedEvent,
};
use cqrs_es::{
    Aggregate, AggregateContext, AggregateError, CqrsFramework, DomainEvent, EventStore,
};
use dossier_eventlog::db::{self, MIGRATIONS, Pool};
use dossier_eventlog::eventstore::{
    EventStoreError, META_ACTOR, META_COMMAND_ID, META_CORRELATION_ID, META_TENANT, PgEventStore,
};
use dossier_eventlog::log::{LogFilter, LogReader, LoggedEvent};
use dossier_test_support::db as testing;
use dossier_test_support::wait::eventually;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The keys of the contract's Event, in CONTRACT.md ("AMQP: events to downstream systems").
const CONTRACT_EVENT_KEYS: [&str; 11] = [
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
];

async fn fresh() -> (Pool, PgEventStore) {
    let (pool, _url) = testing::fresh_database()
        .await
        .expect("a fresh test database (is Postgres running?)");
    let store = PgEventStore::new(pool.clone());
    (pool, store)
}

fn metadata(tenant: &str) -> serde_json::Value {
    json!({
        META_TENANT: tenant,
        META_ACTOR: "tester",
        META_COMMAND_ID: uuid::Uuid::new_v4().to_string(),
        META_CORRELATION_ID: "corr-1",
    })
}

fn event(aggregate_id: &str, sequence: usize, tenant: &str) -> SerializedEvent {
    SerializedEvent::new(
        aggregate_id.to_owned(),
        sequence,
        "probe".to_owned(),
        "Probed".to_owned(),
        "1".to_owned(),
        // Tagged like cqrs-es serializes a `Probed { n }` variant; the log keeps `{"n": ..}`.
        json!({ "Probed": { "n": sequence } }),
        metadata(tenant),
    )
}

/// A reader for reads that expect data: it returns as soon as something is safe, and
/// the long wait only matters if some other transaction on a busy shared test server
/// holds the watermark back for a moment.
fn patient_reader(pool: &Pool) -> LogReader {
    LogReader::new(pool.clone()).with_max_wait(Duration::from_secs(10))
}

async fn count_events(pool: &Pool) -> i64 {
    let client = pool.get().await.expect("connection");
    client
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .expect("count")
        .get(0)
}

/// Every `(position, id)` of the table, in position order: the truth to compare with.
async fn all_rows(pool: &Pool) -> Vec<(i64, uuid::Uuid)> {
    let client = pool.get().await.expect("connection");
    client
        .query("SELECT position, id FROM events ORDER BY position", &[])
        .await
        .expect("select")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Inserts one event by hand on a client that is inside a transaction; the insert
/// trigger assigns position and txid exactly as for the event store.
async fn raw_insert(client: &tokio_postgres::Client, aggregate_id: &str) -> i64 {
    client
        .query_one(
            "INSERT INTO events (id, tenant, aggregate_type, aggregate_id, sequence, \
                 event_type, event_version, payload, actor) \
             VALUES ($1, 't1', 'probe', $2, 1, 'Probed', '1', '{}', 'tester') \
             RETURNING position",
            &[&uuid::Uuid::now_v7(), &aggregate_id],
        )
        .await
        .expect("insert")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reader_never_skips_events_committed_out_of_order() {
    const WRITERS: usize = 16;
    const COMMANDS_PER_WRITER: usize = 40;

    let (pool, store) = fresh().await;
    let writers_done = Arc::new(AtomicBool::new(false));

    // The follower: tails the log from its own checkpoint while the writers run.
    let reader = tokio::spawn({
        let pool = pool.clone();
        let writers_done = writers_done.clone();
        async move {
            let mut reader = patient_reader(&pool);
            let mut checkpoint = 0;
            let mut seen = Vec::new();
            let mut seen_while_writing = 0;
            loop {
                let writing = !writers_done.load(Ordering::SeqCst);
                let batch = reader
                    .read(checkpoint, 50, &LogFilter::default())
                    .await
                    .expect("read");
                for e in &batch {
                    assert!(e.position > checkpoint, "positions go backwards");
                    checkpoint = e.position;
                    seen.push((e.position, e.id));
                    if writing {
                        seen_while_writing += 1;
                    }
                }
                if batch.is_empty() {
                    if !writing {
                        // Every writer had finished before this read began.
                        let client = pool.get().await.expect("connection");
                        let max: Option<i64> = client
                            .query_one("SELECT max(position) FROM events", &[])
                            .await
                            .expect("max")
                            .get(0);
                        if checkpoint >= max.unwrap_or(0) {
                            return (seen, seen_while_writing);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    });

    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                let aggregate = format!("writer-{writer}");
                let tenant = format!("tenant-{}", writer % 3);
                let mut sequence = 0;
                let mut committed = 0;
                for command in 0..COMMANDS_PER_WRITER {
                    let delay = Duration::from_millis(rand::rng().random_range(0..=20));
                    if writer % 4 == 0 && command % 5 == 2 {
                        // A command that loses on purpose: its first event draws a
                        // position, the duplicate sequence aborts the transaction, and
                        // the position stays a gap in the log.
                        let doomed = [
                            event(&aggregate, sequence + 1, &tenant),
                            event(&aggregate, sequence, &tenant),
                        ];
                        let result = store.persist_with_commit_delay(&doomed, delay).await;
                        assert!(
                            matches!(result, Err(PersistenceError::OptimisticLockError)),
                            "expected an optimistic lock error, got {result:?}"
                        );
                        continue;
                    }
                    // Every tenth command appends two events in one transaction.
                    let count = if command % 10 == 9 { 2 } else { 1 };
                    let events: Vec<_> = (1..=count)
                        .map(|i| event(&aggregate, sequence + i, &tenant))
                        .collect();
                    let positions = store
                        .persist_with_commit_delay(&events, delay)
                        .await
                        .expect("append");
                    assert_eq!(positions.len(), count);
                    assert!(positions.windows(2).all(|w| w[0] < w[1]));
                    sequence += count;
                    committed += count;
                }
                committed
            })
        })
        .collect();

    let mut committed = 0;
    for writer in writers {
        committed += writer.await.expect("writer task");
    }
    writers_done.store(true, Ordering::SeqCst);
    let (seen, seen_while_writing) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the reader catches up within a minute")
        .expect("reader task");

    let table = all_rows(&pool).await;
    assert_eq!(
        table.len(),
        committed,
        "every committed event is in the table"
    );
    assert_eq!(
        seen, table,
        "the reader saw exactly the table, in position order"
    );
    let ids: HashSet<_> = seen.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), seen.len(), "each event seen once");
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "ascending positions"
    );
    let max_position = seen.last().map_or(0, |(position, _)| *position);
    assert!(
        max_position > committed as i64,
        "aborted appends left gaps ({max_position} positions for {committed} events)"
    );
    assert!(
        seen_while_writing > 0,
        "the reader tailed while writers ran"
    );

    // Per aggregate, log order is sequence order.
    let client = pool.get().await.expect("connection");
    let out_of_order: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT sequence, lag(sequence) OVER \
                 (PARTITION BY aggregate_id ORDER BY position) AS previous FROM events) s \
             WHERE previous IS NOT NULL AND sequence <> previous + 1",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert_eq!(out_of_order, 0);
}

/// The interleaving that defeats a watermark built on `pg_snapshot_xmax`: B takes its
/// xid first, A takes a larger xid but draws the smaller position, B commits. Until A
/// ends, position A is unresolved, so B's event must not be handed out either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_waits_for_an_older_position_held_by_a_younger_transaction() {
    let (pool, _store) = fresh().await;
    let a = pool.get().await.expect("connection a");
    let b = pool.get().await.expect("connection b");

    b.batch_execute("BEGIN").await.expect("begin b");
    b.execute("SELECT pg_current_xact_id()", &[])
        .await
        .expect("xid b");
    a.batch_execute("BEGIN").await.expect("begin a");
    a.execute("SELECT pg_current_xact_id()", &[])
        .await
        .expect("xid a");
    let position_a = raw_insert(&a, "held-by-a").await;
    let position_b = raw_insert(&b, "committed-by-b").await;
    assert!(position_a < position_b);
    b.batch_execute("COMMIT").await.expect("commit b");

    let mut reader = LogReader::new(pool.clone()).with_max_wait(Duration::from_millis(50));
    let early = reader
        .read(0, 100, &LogFilter::default())
        .await
        .expect("read");
    assert!(
        early.is_empty(),
        "handed out {:?} while position {position_a} was still open",
        early.iter().map(|e| e.position).collect::<Vec<_>>()
    );
    assert!(reader.safe_position().await.expect("safe") < position_a);

    a.batch_execute("COMMIT").await.expect("commit a");
    let mut reader = reader.with_max_wait(Duration::from_secs(10));
    let late = reader
        .read(0, 100, &LogFilter::default())
        .await
        .expect("read");
    let positions: Vec<_> = late.iter().map(|e| e.position).collect();
    assert_eq!(positions, vec![position_a, position_b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_returns_what_is_safe_within_its_max_wait_while_a_transaction_stays_open() {
    let (pool, store) = fresh().await;
    let first = store
        .persist_returning_positions(&[event("agg-1", 1, "t1")])
        .await
        .expect("append")[0];
    let mut reader = patient_reader(&pool);
    let seen = reader
        .read(0, 10, &LogFilter::default())
        .await
        .expect("read");
    assert_eq!(
        seen.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![first]
    );

    // Some unrelated write transaction that stays open.
    let idle = pool.get().await.expect("connection");
    idle.batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .expect("open transaction");
    let second = store
        .persist_returning_positions(&[event("agg-2", 1, "t1")])
        .await
        .expect("append")[0];

    let mut reader = reader.with_max_wait(Duration::from_millis(100));
    let started = Instant::now();
    let blocked = reader
        .read(first, 10, &LogFilter::default())
        .await
        .expect("read");
    assert!(
        blocked.is_empty(),
        "nothing after {first} is provably safe yet"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "bounded wait");
    assert_eq!(reader.safe_position().await.expect("safe"), first);

    idle.batch_execute("COMMIT").await.expect("commit");
    let mut reader = reader.with_max_wait(Duration::from_secs(10));
    let seen = reader
        .read(first, 10, &LogFilter::default())
        .await
        .expect("read");
    assert_eq!(
        seen.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![second]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_is_not_held_back_by_a_transaction_in_another_database() {
    let (pool, store) = fresh().await;
    let (other_pool, _url) = testing::fresh_database().await.expect("second database");
    let other = other_pool.get().await.expect("connection");
    other
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .expect("open transaction elsewhere");

    let position = store
        .persist_returning_positions(&[event("agg", 1, "t1")])
        .await
        .expect("append")[0];
    let mut reader = LogReader::new(pool).with_max_wait(Duration::from_secs(30));
    let started = Instant::now();
    let seen = reader
        .read(0, 10, &LogFilter::default())
        .await
        .expect("read");
    assert_eq!(
        seen.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![position]
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited {:?} for another database's transaction",
        started.elapsed()
    );
    other.batch_execute("COMMIT").await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_filters_by_tenant_and_aggregate_and_respects_limit() {
    let (pool, store) = fresh().await;
    for (aggregate, tenant) in [("a", "t1"), ("b", "t2"), ("c", "t1"), ("a2", "t1")] {
        store
            .persist_returning_positions(&[
                event(aggregate, 1, tenant),
                event(aggregate, 2, tenant),
            ])
            .await
            .expect("append");
    }
    let mut reader = patient_reader(&pool);
    let by_tenant = LogFilter {
        tenant: Some("t1".to_owned()),
        aggregate_id: None,
    };
    let t1 = reader.read(0, 100, &by_tenant).await.expect("read");
    assert_eq!(t1.len(), 6);
    assert!(t1.iter().all(|e| e.tenant == "t1"));

    let by_aggregate = LogFilter {
        tenant: Some("t1".to_owned()),
        aggregate_id: Some("c".to_owned()),
    };
    let c = reader.read(0, 100, &by_aggregate).await.expect("read");
    assert_eq!(
        c.iter()
            .map(|e| (e.aggregate_id.as_str(), e.sequence))
            .collect::<Vec<_>>(),
        vec![("c", 1), ("c", 2)]
    );

    let page = reader
        .read(0, 3, &LogFilter::default())
        .await
        .expect("read");
    assert_eq!(page.len(), 3);
    let rest = reader
        .read(page[2].position, 100, &LogFilter::default())
        .await
        .expect("read");
    assert_eq!(rest.len(), 5);
    assert!(
        reader
            .read(0, 0, &LogFilter::default())
            .await
            .expect("read")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_of_the_same_sequence_let_exactly_one_win() {
    let (pool, store) = fresh().await;
    // The first holds its transaction open; the second inserts meanwhile, waits on the
    // unique index, and loses when the first commits.
    let winner_or_loser = [event("race", 1, "t1")];
    let first = store.persist_with_commit_delay(&winner_or_loser, Duration::from_millis(300));
    let second = async {
        // Meanwhile: once the first has inserted its row (it drew the database's
        // first position), and before it commits.
        eventually("the first append's insert", async || {
            let client = pool.get().await.expect("connection");
            let drawn: bool = client
                .query_one("SELECT is_called FROM events_position_seq", &[])
                .await
                .expect("the position sequence")
                .get(0);
            drawn
        })
        .await;
        store
            .persist_returning_positions(&[event("race", 1, "t1")])
            .await
    };
    let (first, second) = tokio::join!(first, second);
    let results = [first, second];
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(PersistenceError::OptimisticLockError))),
        "{results:?}"
    );

    // And without any overlap.
    let again = store
        .persist_returning_positions(&[event("race", 1, "t1")])
        .await;
    assert!(matches!(again, Err(PersistenceError::OptimisticLockError)));
    assert_eq!(count_events(&pool).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persist_without_a_tenant_is_refused_and_writes_nothing() {
    let (pool, store) = fresh().await;
    let mut no_tenant = event("agg", 2, "t1");
    no_tenant.metadata = json!({ META_ACTOR: "tester" });
    let mut empty_tenant = event("agg", 1, "t1");
    empty_tenant.metadata = json!({ META_TENANT: "" });
    let mut no_metadata = event("agg", 1, "t1");
    no_metadata.metadata = json!({});

    for events in [
        vec![event("agg", 1, "t1"), no_tenant],
        vec![empty_tenant],
        vec![no_metadata],
    ] {
        let result = store.persist_returning_positions(&events).await;
        match result {
            Err(PersistenceError::UnknownError(error)) => assert!(
                matches!(
                    error.downcast_ref::<EventStoreError>(),
                    Some(EventStoreError::MissingTenant { .. })
                ),
                "{error}"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(count_events(&pool).await, 0);
    // Refused before any transaction: not even a position was drawn.
    let client = pool.get().await.expect("connection");
    let called: bool = client
        .query_one("SELECT is_called FROM events_position_seq", &[])
        .await
        .expect("sequence")
        .get(0);
    assert!(!called);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_defaults_to_system_and_metadata_is_kept_whole() {
    let (pool, store) = fresh().await;
    let mut e = event("agg", 1, "t1");
    e.metadata = json!({ META_TENANT: "t1", META_CORRELATION_ID: "corr-9", "extra": "x" });
    store
        .persist_returning_positions(&[e])
        .await
        .expect("append");
    let logged = patient_reader(&pool)
        .read(0, 10, &LogFilter::default())
        .await
        .expect("read");
    assert_eq!(logged[0].actor, "system");
    assert_eq!(logged[0].metadata_str(META_CORRELATION_ID), Some("corr-9"));
    assert_eq!(logged[0].metadata_str("extra"), Some("x"));
    assert_eq!(logged[0].metadata_str(META_ACTOR), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_refuses_update_delete_and_truncate() {
    let (pool, store) = fresh().await;
    store
        .persist_returning_positions(&[event("agg", 1, "t1")])
        .await
        .expect("append");
    let client = pool.get().await.expect("connection");
    for statement in [
        "UPDATE events SET actor = 'mallory'",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        let error = client
            .batch_execute(statement)
            .await
            .expect_err("the log must refuse it");
        let message = error.as_db_error().map(|db| db.message().to_owned());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("append-only")),
            "{statement}: {message:?}"
        );
    }
    let actor: String = client
        .query_one("SELECT actor FROM events", &[])
        .await
        .expect("select")
        .get(0);
    assert_eq!(actor, "tester");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_safe_to_run_concurrently() {
    let (pool, _store) = fresh().await;
    db::migrate(&pool).await.expect("second run");
    db::migrate(&pool).await.expect("third run");
    let client = pool.get().await.expect("connection");
    let recorded: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(recorded, MIGRATIONS.len() as i64);

    // Four processes starting at once on a database that does not exist yet.
    let url = testing::unique_database_url();
    let (a, b) = tokio::join!(db::connect(&url, 4), db::connect(&url, 4));
    let (a, b) = (a.expect("connect a"), b.expect("connect b"));
    let results = tokio::join!(
        db::migrate(&a),
        db::migrate(&b),
        db::migrate(&a),
        db::migrate(&b)
    );
    for result in [results.0, results.1, results.2, results.3] {
        result.expect("concurrent migrate");
    }
    let client = a.get().await.expect("connection");
    let recorded: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(recorded, MIGRATIONS.len() as i64);
    assert_eq!(count_events(&a).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logged_event_serializes_to_exactly_the_contract_event_keys() {
    let (pool, store) = fresh().await;
    let positions = store
        .persist_returning_positions(&[event("agg", 1, "t1")])
        .await
        .expect("append");
    let logged = patient_reader(&pool)
        .read(0, 10, &LogFilter::default())
        .await
        .expect("read");
    let logged = &logged[0];
    assert_eq!(logged.position, positions[0]);
    assert_eq!(logged.id.get_version_num(), 7);
    assert_eq!(logged.metadata_str(META_CORRELATION_ID), Some("corr-1"));

    let json = serde_json::to_value(logged).expect("serialize");
    let keys: HashSet<&str> = json
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        CONTRACT_EVENT_KEYS.into_iter().collect::<HashSet<_>>()
    );
    assert_eq!(json["tenant"], "t1");
    assert_eq!(json["actor"], "tester");
    assert_eq!(json["sequence"], 1);
    assert_eq!(json["payload"], json!({ "n": 1 }));
    assert!(
        chrono::DateTime::parse_from_rfc3339(json["at"].as_str().expect("at is a string")).is_ok()
    );

    // What a downstream consumer parses back: the same event, without the metadata.
    let parsed: LoggedEvent = serde_json::from_value(json).expect("deserialize");
    assert_eq!(parsed.id, logged.id);
    assert_eq!(parsed.at, logged.at);
    assert_eq!(parsed.metadata_str(META_TENANT), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_position_is_the_aggregates_highest_position() {
    let (_pool, store) = fresh().await;
    assert_eq!(
        store.last_position("probe", "agg").await.expect("query"),
        None
    );
    store
        .persist_returning_positions(&[event("agg", 1, "t1"), event("agg", 2, "t1")])
        .await
        .expect("append");
    let other = store
        .persist_returning_positions(&[event("other", 1, "t1")])
        .await
        .expect("append");
    let last = store
        .persist_returning_positions(&[event("agg", 3, "t1")])
        .await
        .expect("append");
    assert_eq!(
        store.last_position("probe", "agg").await.expect("query"),
        Some(last[0])
    );
    assert_eq!(
        store.last_position("probe", "other").await.expect("query"),
        Some(other[0])
    );
}

// A tiny aggregate to drive the store through cqrs-es itself.

#[derive(Debug, Default, Serialize, Deserialize)]
struct Counter {
    opened: bool,
    total: u64,
}

enum CounterCommand {
    Open,
    Add(u64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum CounterEvent {
    // Variant names are the event types: the log stores the payload without
    // its tag and puts it back from `event_type` (dossier_domain::codec).
    CounterOpened {},
    CounterAdded { amount: u64 },
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> String {
        match self {
            Self::CounterOpened {} => "CounterOpened",
            Self::CounterAdded { .. } => "CounterAdded",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CounterError(&'static str);

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = CounterError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &cqrs_es::event_sink::EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command {
            CounterCommand::Open if self.opened => return Err(CounterError("already open")),
            CounterCommand::Open => sink.write(CounterEvent::CounterOpened {}, self).await,
            CounterCommand::Add(_) if !self.opened => return Err(CounterError("not open")),
            CounterCommand::Add(amount) => {
                sink.write(CounterEvent::CounterAdded { amount }, self)
                    .await
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            CounterEvent::CounterOpened {} => self.opened = true,
            CounterEvent::CounterAdded { amount } => self.total += amount,
        }
    }
}

fn command_metadata(tenant: &str) -> HashMap<String, String> {
    HashMap::from([
        (META_TENANT.to_owned(), tenant.to_owned()),
        (META_ACTOR.to_owned(), "staff-1".to_owned()),
        (META_CORRELATION_ID.to_owned(), "corr-7".to_owned()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cqrs_framework_executes_commands_and_reloads_through_the_store() {
    let (pool, store) = fresh().await;
    let cqrs = CqrsFramework::new(
        PersistedEventStore::<PgEventStore, Counter>::new_event_store(store.clone()),
        vec![],
        (),
    );
    cqrs.execute_with_metadata("counter-1", CounterCommand::Open, command_metadata("t1"))
        .await
        .expect("open");
    cqrs.execute_with_metadata("counter-1", CounterCommand::Add(5), command_metadata("t1"))
        .await
        .expect("add");
    let refused = cqrs
        .execute_with_metadata("counter-1", CounterCommand::Open, command_metadata("t1"))
        .await;
    assert!(matches!(refused, Err(AggregateError::UserError(_))));
    // cqrs-es' plain `execute` passes no metadata, hence no tenant: refused.
    let untenanted = cqrs.execute("counter-1", CounterCommand::Add(1)).await;
    assert!(matches!(
        untenanted,
        Err(AggregateError::UnexpectedError(_))
    ));

    // Reload: the aggregate is rebuilt from its two events, each applied once.
    let mut reloaded = PersistedEventStore::<PgEventStore, Counter>::new_event_store(store.clone())
        .load_aggregate("counter-1")
        .await
        .expect("load");
    assert!(reloaded.aggregate().opened);
    assert_eq!(reloaded.aggregate().total, 5);

    let events = store
        .get_events::<Counter>("counter-1")
        .await
        .expect("events");
    assert_eq!(
        events
            .iter()
            .map(|e| (e.sequence, e.event_type.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, "CounterOpened"), (2, "CounterAdded")]
    );
    let last = store
        .get_last_events::<Counter>("counter-1", 1)
        .await
        .expect("events");
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].sequence, 2);
    assert!(
        store
            .get_snapshot::<Counter>("counter-1")
            .await
            .expect("snapshot")
            .is_none()
    );

    let mut stream = store
        .stream_events::<Counter>("counter-1")
        .await
        .expect("stream");
    let mut streamed = Vec::new();
    while let Some(envelope) = stream.next::<Counter>(&[]).await {
        streamed.push(envelope.expect("event").payload);
    }
    assert_eq!(
        streamed,
        vec![
            CounterEvent::CounterOpened {},
            CounterEvent::CounterAdded { amount: 5 }
        ]
    );

    cqrs.execute_with_metadata("counter-2", CounterCommand::Open, command_metadata("t2"))
        .await
        .expect("open");
    let mut all = store.stream_all_events::<Counter>().await.expect("stream");
    let mut count = 0;
    while let Some(envelope) = all.next::<Counter>(&[]).await {
        envelope.expect("event");
        count += 1;
    }
    assert_eq!(count, 3);

    // The log has who, which tenant and the correlation id.
    let logged = patient_reader(&pool)
        .read(0, 10, &LogFilter::default())
        .await
        .expect("read");
    assert_eq!(logged.len(), 3);
    assert_eq!(logged[1].actor, "staff-1");
    assert_eq!(logged[2].tenant, "t2");
    assert_eq!(logged[1].metadata_str(META_CORRELATION_ID), Some("corr-7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_events_get_increasing_positions_and_one_receipt_in_one_statement() {
    let (pool, store) = fresh().await;
    let keyed = |sequence: usize| {
        let mut event = event("agg", sequence, "t1");
        event.metadata["idempotency_key"] = json!("msg-1");
        event
    };
    let (noting, appended) = store.noting_positions();
    assert_eq!(appended.get(), None);
    let positions = noting
        .persist_returning_positions(&[keyed(1), keyed(2), keyed(3)])
        .await
        .expect("append");
    assert_eq!(positions.len(), 3);
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert_eq!(appended.get(), Some(positions[2]));
    let sequences: Vec<i64> = pool
        .get()
        .await
        .unwrap()
        .query("SELECT sequence FROM events ORDER BY position", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(sequences, vec![1, 2, 3], "position order is sequence order");
    let receipt: i64 = pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT position FROM command_receipts WHERE tenant = 't1' AND idempotency_key = 'msg-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(receipt, positions[2], "the receipt names the last event");

    // The same key again is refused whole: no event, no second receipt.
    let again = store.persist_returning_positions(&[keyed(4)]).await;
    let Err(PersistenceError::UnknownError(error)) = again else {
        panic!("expected a duplicate command, got {again:?}");
    };
    assert!(matches!(
        error.downcast_ref::<EventStoreError>(),
        Some(EventStoreError::DuplicateCommand { key, .. }) if key == "msg-1"
    ));
    assert_eq!(count_events(&pool).await, 3);

    // Without a key there is no receipt at all.
    store
        .persist_returning_positions(&[event("other", 1, "t1")])
        .await
        .expect("append");
    let receipts: i64 = pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM command_receipts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(receipts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_sharing_a_reader_get_past_a_gap_left_by_an_aborted_append() {
    let (pool, store) = fresh().await;
    let first = store
        .persist_returning_positions(&[event("agg", 1, "t1")])
        .await
        .expect("append")[0];
    // An append that draws a position and rolls back: a gap at the log's end.
    {
        let mut client = pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        raw_insert(tx.client(), "doomed").await;
        tx.rollback().await.unwrap();
    }
    let mut one = patient_reader(&pool);
    let mut other = one.clone();
    let read = one.read(0, 10, &LogFilter::default()).await.unwrap();
    assert_eq!(
        read.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![first]
    );
    // Both followers are now at `first`, below a watermark that only covers the gap.
    assert!(
        other
            .read(first, 10, &LogFilter::default())
            .await
            .unwrap()
            .is_empty()
    );

    let later = store
        .persist_returning_positions(&[event("agg", 2, "t1")])
        .await
        .expect("append")[0];
    for reader in [&mut one, &mut other] {
        let event = eventually("a follower past the gap", async || {
            let read = reader.read(first, 10, &LogFilter::default()).await.unwrap();
            read.into_iter().next()
        })
        .await;
        assert_eq!(event.position, later);
    }
}
