//! The key table against a real Postgres: one live key per owner, destruction
//! that readers can tell from "never encrypted", and rotation that keeps every
//! key usable.

use dossier_keys::{KeyLookup, KeyStore, MasterKey, MasterKeys, Owner};
use dossier_test_support::db::fresh_database;
use uuid::Uuid;

async fn store(masters: MasterKeys) -> KeyStore {
    let (pool, _) = fresh_database().await.expect("a test database");
    KeyStore::open(pool, masters).await.expect("the key table")
}

fn live(lookup: &KeyLookup) -> &dossier_keys::DataKey {
    match lookup {
        KeyLookup::Live(key) => key,
        other => panic!("expected a live key, got {other:?}"),
    }
}

#[tokio::test]
async fn a_destroyed_key_is_told_apart_from_an_unknown_one_and_opens_nothing() {
    let store = store(MasterKeys::new(MasterKey::generate().0, None)).await;
    let file = Uuid::new_v4();
    let key = store.create("acme", Owner::File(file)).await.unwrap();
    let sealed = key.seal_field("Payslip March.pdf");

    let found = store.lookup_one(key.id()).await.unwrap();
    let field = dossier_keys::SealedField::parse(&sealed).unwrap().unwrap();
    assert_eq!(
        live(&found).open_field(&field).unwrap(),
        "Payslip March.pdf"
    );

    assert_eq!(
        store
            .destroy_now("acme", &[Owner::File(file)])
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        store.lookup_one(key.id()).await.unwrap(),
        KeyLookup::Destroyed
    ));
    assert!(matches!(
        store.lookup_one(Uuid::new_v4()).await.unwrap(),
        KeyLookup::Unknown
    ));
    assert!(
        store
            .live("acme", Owner::File(file))
            .await
            .unwrap()
            .is_none()
    );
    // Destroying again is a no-op, so a retried delete succeeds.
    assert_eq!(
        store
            .destroy_now("acme", &[Owner::File(file)])
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn an_owner_has_one_live_key_and_a_new_one_after_destruction() {
    let store = store(MasterKeys::new(MasterKey::generate().0, None)).await;
    let first = store
        .live_or_create("acme", Owner::Customer("c-1"))
        .await
        .unwrap();
    let again = store
        .live_or_create("acme", Owner::Customer("c-1"))
        .await
        .unwrap();
    assert_eq!(first.id(), again.id());
    assert!(store.create("acme", Owner::Customer("c-1")).await.is_err());
    // Another tenant's customer of the same id has a key of its own.
    let other = store
        .live_or_create("globex", Owner::Customer("c-1"))
        .await
        .unwrap();
    assert_ne!(other.id(), first.id());

    store
        .destroy_now("acme", &[Owner::Customer("c-1")])
        .await
        .unwrap();
    let fresh = store
        .live_or_create("acme", Owner::Customer("c-1"))
        .await
        .unwrap();
    assert_ne!(fresh.id(), first.id());
}

#[tokio::test]
async fn rotation_rewraps_every_key_under_the_new_master_key_and_all_still_open() {
    let (old, old_text) = MasterKey::generate();
    let (pool, _) = fresh_database().await.unwrap();
    let before = KeyStore::open(pool.clone(), MasterKeys::new(old, None))
        .await
        .unwrap();
    let mut sealed = Vec::new();
    for _ in 0..1005 {
        let key = before
            .create("acme", Owner::File(Uuid::new_v4()))
            .await
            .unwrap();
        sealed.push((key.id(), key.seal_field("x")));
    }
    let old_id = before.master_key_id().to_owned();

    let (new, new_text) = MasterKey::generate();
    let previous = MasterKey::from_base64(&old_text).unwrap();
    let during = KeyStore::open(pool.clone(), MasterKeys::new(new, Some(previous)))
        .await
        .unwrap();
    assert_eq!(during.rotate().await.unwrap(), 1005);
    assert_eq!(during.rotate().await.unwrap(), 0);
    let counts = during.count_by_master().await.unwrap();
    assert_eq!(counts, vec![(during.master_key_id().to_owned(), 1005)]);
    assert!(counts.iter().all(|(id, _)| *id != old_id));

    // Without the old master key, every key still opens what it sealed.
    let after = KeyStore::open(
        pool,
        MasterKeys::new(MasterKey::from_base64(&new_text).unwrap(), None),
    )
    .await
    .unwrap();
    let ids: Vec<Uuid> = sealed.iter().map(|(id, _)| *id).collect();
    let found = after.lookup(&ids).await.unwrap();
    for (id, field) in &sealed {
        let field = dossier_keys::SealedField::parse(field).unwrap().unwrap();
        assert_eq!(live(&found[id]).open_field(&field).unwrap(), "x");
    }
    // The old process, holding only the old key, is told which key it lacks.
    let err = before.lookup_one(ids[0]).await.unwrap_err();
    assert!(
        err.to_string().contains("DOSSIER_MASTER_KEY_PREVIOUS"),
        "{err}"
    );
}

#[tokio::test]
async fn an_owners_key_is_live_destroyed_or_never_there() {
    let store = store(MasterKeys::new(MasterKey::generate().0, None)).await;
    let file = Uuid::new_v4();
    assert!(matches!(
        store.of_owner("acme", Owner::File(file)).await.unwrap(),
        KeyLookup::Unknown
    ));
    let key = store.create("acme", Owner::File(file)).await.unwrap();
    assert_eq!(
        live(&store.of_owner("acme", Owner::File(file)).await.unwrap()).id(),
        key.id()
    );
    // Another tenant's owner of the same id is another owner.
    assert!(matches!(
        store.of_owner("globex", Owner::File(file)).await.unwrap(),
        KeyLookup::Unknown
    ));
    store
        .destroy_now("acme", &[Owner::File(file)])
        .await
        .unwrap();
    assert!(matches!(
        store.of_owner("acme", Owner::File(file)).await.unwrap(),
        KeyLookup::Destroyed
    ));
    // An owner with a destroyed key and a newer live one (a customer after an
    // erasure) is answered with the live one.
    store
        .live_or_create("acme", Owner::Customer("c-1"))
        .await
        .unwrap();
    store
        .destroy_now("acme", &[Owner::Customer("c-1")])
        .await
        .unwrap();
    let fresh = store
        .live_or_create("acme", Owner::Customer("c-1"))
        .await
        .unwrap();
    assert_eq!(
        live(
            &store
                .of_owner("acme", Owner::Customer("c-1"))
                .await
                .unwrap()
        )
        .id(),
        fresh.id()
    );
}
