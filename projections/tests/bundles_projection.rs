//! The bundles projection against a real Postgres: bundle events written through
//! cqrs-es and `PgEventStore` as the application writes them, the real runner, the
//! real queries, a rebuild from the log and a replay over rows already there.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::CqrsFramework;
use cqrs_es::persist::PersistedEventStore;
use dossier_domain::{
    Actor, BlobKey, Bundle, BundleArchive, BundleCommand, BundleFile, BundlePolicy, BundleStatus,
    CustomerId, FileId, RequestBundle, Sha256Hex, TenantId,
};
use dossier_eventlog::db::Pool;
use dossier_eventlog::eventstore::{self, PgEventStore};
use dossier_projections::bundles::{self, BundleView};
use dossier_projections::{BundlesProjection, Runner, RunnerConfig, rebuild};
use dossier_test_support::db::fresh_database;
use uuid::Uuid;

type Bundles = CqrsFramework<Bundle, PersistedEventStore<PgEventStore, Bundle>>;

fn at(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::minutes(minutes)
}

fn acme() -> TenantId {
    TenantId::parse("acme").unwrap()
}

async fn run(bundles: &Bundles, id: Uuid, command: BundleCommand) {
    let metadata = HashMap::from([
        (eventstore::META_TENANT.to_owned(), "acme".to_owned()),
        (eventstore::META_ACTOR.to_owned(), "alice".to_owned()),
    ]);
    bundles
        .execute_with_metadata(&id.to_string(), command, metadata)
        .await
        .unwrap();
}

fn request(files: usize) -> BundleCommand {
    BundleCommand::Request(RequestBundle {
        tenant: acme(),
        requested_by: Actor::new("alice"),
        files: (0..files)
            .map(|n| BundleFile {
                file_id: FileId(Uuid::from_u128(n as u128 + 1)),
                customer_id: CustomerId::parse("cust-1").unwrap(),
                size: 100 * (n as u64 + 1),
            })
            .collect(),
        at: at(0),
    })
}

fn ready(id: Uuid) -> BundleCommand {
    BundleCommand::MarkReady {
        tenant: acme(),
        archive: BundleArchive {
            blob_key: BlobKey::for_bundle(&acme(), id),
            size: 4_096,
            sha256: Sha256Hex::parse(&"ab".repeat(32)).unwrap(),
        },
        at: at(5),
        expires_at: at(60),
    }
}

async fn rows(pool: &Pool) -> Vec<String> {
    pool.get()
        .await
        .unwrap()
        .query(
            "SELECT row_to_json(b)::text FROM bundles b ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn get(pool: &Pool, id: Uuid) -> BundleView {
    bundles::get(pool, &acme(), id).await.unwrap().unwrap()
}

#[tokio::test]
async fn every_state_of_a_bundle_is_shown_and_a_rebuild_gives_the_same_rows() {
    let (pool, _) = fresh_database().await.unwrap();
    let bundles: Bundles = CqrsFramework::new(
        PersistedEventStore::new_event_store(PgEventStore::new(pool.clone())),
        vec![],
        BundlePolicy::default(),
    );
    let (building, done, failed, expired) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    run(&bundles, building, request(3)).await;
    for files_done in [2, 1] {
        let command = BundleCommand::RecordProgress {
            tenant: acme(),
            files_done,
        };
        // The second one is behind: the aggregate records nothing.
        run(&bundles, building, command).await;
    }
    run(&bundles, done, request(2)).await;
    run(&bundles, done, ready(done)).await;
    run(&bundles, failed, request(1)).await;
    let fail = BundleCommand::MarkFailed {
        tenant: acme(),
        reason: "a file was deleted".into(),
        at: at(5),
        expires_at: at(60),
    };
    run(&bundles, failed, fail).await;
    run(&bundles, expired, request(1)).await;
    run(&bundles, expired, ready(expired)).await;
    let expire = BundleCommand::Expire {
        tenant: acme(),
        at: at(61),
    };
    run(&bundles, expired, expire).await;

    let mut runner = Runner::new(pool.clone(), BundlesProjection, RunnerConfig::default());
    runner.catch_up().await.unwrap();

    let view = get(&pool, building).await;
    assert_eq!(
        (view.status, view.file_count, view.files_done),
        (BundleStatus::Pending, 3, 2)
    );
    assert_eq!(view.total_size, 600);
    assert_eq!(view.files.len(), 3);
    assert_eq!(view.requested_by, "alice");
    assert_eq!(view.requested_at, at(0));
    assert!(view.blob_key.is_none() && view.expires_at.is_none());

    let view = get(&pool, done).await;
    assert_eq!((view.status, view.files_done), (BundleStatus::Ready, 2));
    assert_eq!(view.size, Some(4_096));
    assert_eq!(view.blob_key, Some(BlobKey::for_bundle(&acme(), done)));
    assert_eq!(
        (view.finished_at, view.expires_at),
        (Some(at(5)), Some(at(60)))
    );
    assert!(!view.has_expired(at(59)) && view.has_expired(at(60)));

    let view = get(&pool, failed).await;
    assert_eq!(view.status, BundleStatus::Failed);
    assert_eq!(view.error.as_deref(), Some("a file was deleted"));
    assert_eq!(get(&pool, expired).await.status, BundleStatus::Expired);

    // Another tenant sees none of them.
    let globex = TenantId::parse("globex").unwrap();
    assert!(bundles::get(&pool, &globex, done).await.unwrap().is_none());

    // Due at minute 60: the ready and the failed one, not the expired one, and the
    // pending one only once it is old enough.
    let shared = &pool;
    let due = |pending_before| async move {
        let mut ids: Vec<Uuid> = bundles::due_for_expiry(shared, at(60), pending_before, 100)
            .await
            .unwrap()
            .iter()
            .map(|view| view.id)
            .collect();
        ids.sort();
        ids
    };
    let mut expected = vec![done, failed];
    expected.sort();
    assert_eq!(due(at(-1)).await, expected);
    expected.push(building);
    expected.sort();
    assert_eq!(due(at(1)).await, expected);

    // The log rebuilds the same rows, and applying every event again changes nothing.
    let live = rows(&pool).await;
    rebuild(&pool, &BundlesProjection).await.unwrap();
    assert_eq!(rows(&pool).await, live);
    pool.get()
        .await
        .unwrap()
        .execute(
            "UPDATE checkpoints SET position = 0 WHERE name = $1",
            &[&BundlesProjection::NAME],
        )
        .await
        .unwrap();
    let mut again = Runner::new(pool.clone(), BundlesProjection, RunnerConfig::default());
    again.catch_up().await.unwrap();
    assert_eq!(rows(&pool).await, live);
}
