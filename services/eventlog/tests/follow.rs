//! The one log-follower mechanism against a real Postgres, through the sealer:
//! two instances take turns through the checkpoint without sealing an event
//! twice or forking a chain, and one takes over from where another stopped,
//! also when the other died in the middle of its turn.

use std::time::Duration;

use dossier_eventlog::chain::{self, SEALER_CHECKPOINT, Sealer};
use dossier_eventlog::db::Pool;
use dossier_eventlog::follow::{Effects, RunnerConfig, checkpoint};
use dossier_eventlog::log::LogReader;
use dossier_test_support::db::fresh_database;
use dossier_test_support::wait::Wait;

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];

/// How long a condition may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

/// Appends `count` events round-robin over [`TENANTS`], each in its own
/// transaction; answers the last position.
async fn append(pool: &Pool, count: usize) -> i64 {
    let client = pool.get().await.expect("connection");
    let mut last = 0;
    for i in 0..count {
        last = client
            .query_one(
                "INSERT INTO events (id, tenant, aggregate_type, aggregate_id, sequence, \
                     event_type, event_version, payload, actor) \
                 VALUES ($1, $2, 'probe', $3, 1, 'Probed', '1', $4, 'tester') \
                 RETURNING position",
                &[
                    &uuid::Uuid::now_v7(),
                    &TENANTS[i % TENANTS.len()],
                    &uuid::Uuid::new_v4().to_string(),
                    &serde_json::json!({ "n": i }),
                ],
            )
            .await
            .expect("insert")
            .get(0);
    }
    last
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

/// A sealer with small batches, so that a catch-up takes many turns.
fn sealer(pool: &Pool, batch_size: i64) -> Sealer {
    Sealer::new(pool.clone()).with_config(RunnerConfig {
        batch_size,
        ..RunnerConfig::default()
    })
}

/// Catches up until the sealer's checkpoint is at `position`: another
/// transaction on the shared test server may hold the watermark back a moment.
async fn seal_up_to(sealer: &mut Sealer, position: i64) {
    Wait::new(format!("the sealer to reach {position}"))
        .timeout(WAIT)
        .interval(Duration::from_millis(5))
        .expect(async || {
            let sealed = sealer.catch_up().await.expect("sealing works");
            if sealed >= position {
                Ok(())
            } else {
                Err(sealed)
            }
        })
        .await;
}

/// Every event is sealed exactly once and every tenant's chain verifies.
async fn assert_sealed_once_and_verified(pool: &Pool) {
    assert_eq!(
        count(pool, "SELECT count(*) FROM event_hashes").await,
        count(pool, "SELECT count(*) FROM events").await,
        "every event has exactly one seal"
    );
    for tenant in TENANTS {
        let report = chain::verify(pool, tenant, b"key", &[])
            .await
            .expect("verify");
        assert!(report.is_ok(), "{tenant}: {:?}", report.problem);
        assert_eq!(report.unsealed, 0, "{tenant}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sealers_take_turns_through_the_checkpoint_and_seal_each_event_once() {
    let (pool, _url) = fresh_database().await.expect("test database");
    let head = append(&pool, 60).await;

    // Two instances of the sealer (as in two processes), different batch sizes so
    // that their turns interleave at different places.
    let mut a = sealer(&pool, 7);
    let mut b = sealer(&pool, 5);
    tokio::join!(seal_up_to(&mut a, head), seal_up_to(&mut b, head));

    assert_eq!(chain::sealed_position(&pool).await.unwrap(), head);
    // Two sealers that did not take turns would have forked the chains: the
    // second seal of a position breaks the primary key, or a chain head is
    // computed from a stale one and verification fails.
    assert_sealed_once_and_verified(&pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_sealer_takes_over_when_the_first_dies_in_the_middle_of_its_turn() {
    let (pool, url) = fresh_database().await.expect("test database");
    let head = append(&pool, 21).await;

    // The first sealer does part of the work.
    let mut dying = sealer(&pool, 5);
    dying.step().await.expect("a first batch");
    let sealed_before = chain::sealed_position(&pool).await.unwrap();
    assert!(sealed_before > 0 && sealed_before < head);

    // The second one knows the log is safe up to the head before the first one
    // takes its next turn (a turn holds the watermark back while it lasts, as
    // any write transaction does).
    let reader = LogReader::new(pool.clone()).with_max_wait(WAIT);
    assert_eq!(reader.clone().safe_position().await.unwrap(), head);

    // The first sealer then dies while it holds its turn: a connection of its
    // own (another process) in the middle of a batch.
    let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("the dying process's connection");
    let connection = tokio::spawn(connection);
    let turn = client.transaction().await.expect("begin");
    let held = checkpoint::take_turns(&turn, &[SEALER_CHECKPOINT], Effects::InTransaction)
        .await
        .expect("the first sealer's turn");
    assert_eq!(held, vec![Some(sealed_before)]);

    // The second one waits for that turn instead of sealing beside it.
    let mut taking_over = Sealer::reading_from(pool.clone(), reader).with_config(RunnerConfig {
        batch_size: 4,
        ..RunnerConfig::default()
    });
    let seal = seal_up_to(&mut taking_over, head);
    tokio::pin!(seal);
    let waiting = Wait::new("the second sealer to wait for the first one's turn")
        .timeout(WAIT)
        .interval(Duration::from_millis(5));
    let lock_wait = waiting.expect(async || {
        count(
            &pool,
            "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid \
                 WHERE NOT l.granted AND a.datname = current_database()",
        )
        .await
            > 0
    });
    tokio::select! {
        () = &mut seal => panic!("the second sealer sealed beside the first one's turn"),
        () = lock_wait => {}
    }
    assert_eq!(
        chain::sealed_position(&pool).await.unwrap(),
        sealed_before,
        "nothing is sealed while the first sealer holds its turn"
    );

    // The first process dies: its connection goes without a word, its session
    // ends, and with it its turn.
    connection.abort();
    drop(turn);
    drop(client);
    tokio::time::timeout(WAIT, seal)
        .await
        .expect("the second sealer took over");

    assert_eq!(chain::sealed_position(&pool).await.unwrap(), head);
    assert_sealed_once_and_verified(&pool).await;
}
