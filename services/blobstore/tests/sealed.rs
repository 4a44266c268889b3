//! The sealing decorator over the directory store, with the key table on a
//! real Postgres: what it answers and what it leaves behind, beyond what the
//! end-to-end tests see over HTTP.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use dossier_blobstore::{
    self as blob, BlobError, BlobStore, BlobStoreSpec, ByteStream, SealedBlobStore, SealedInPlace,
};
use dossier_domain::BlobKey;
use dossier_keys::segments::sealed_by;
use dossier_keys::{KeyLookup, KeyStore, MasterKey, MasterKeys, Owner};
use dossier_test_support::db::fresh_database;
use futures::TryStreamExt as _;
use uuid::Uuid;

struct Stage {
    raw: Arc<dyn BlobStore>,
    sealed: SealedBlobStore,
    keys: KeyStore,
    dir: PathBuf,
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn stage() -> Stage {
    let dir = std::env::temp_dir().join(format!("dossier-sealed-{}", Uuid::new_v4()));
    let raw = blob::open(&BlobStoreSpec::Dir(dir.clone())).await.unwrap();
    let (pool, _) = fresh_database().await.unwrap();
    let keys = KeyStore::open(pool, MasterKeys::new(MasterKey::generate().0, None))
        .await
        .unwrap();
    Stage {
        sealed: SealedBlobStore::new(raw.clone(), keys.clone()),
        raw,
        keys,
        dir,
    }
}

fn body(bytes: &[u8]) -> ByteStream {
    let chunks: Vec<std::io::Result<Bytes>> = bytes
        .chunks(10_000)
        .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

async fn read(store: &dyn BlobStore, key: &BlobKey) -> Result<Vec<u8>, BlobError> {
    let object = store.get(key).await?;
    let chunks: Vec<Bytes> = object.body.try_collect().await.map_err(BlobError::Body)?;
    Ok(chunks.concat())
}

fn file(id: Uuid) -> BlobKey {
    BlobKey::from_recorded(format!("acme/cust-1/{id}"))
}

#[tokio::test]
async fn put_answers_the_plain_size_and_hash_and_a_retried_put_reuses_the_key() {
    let stage = stage().await;
    let id = Uuid::new_v4();
    let plain = b"hello, sealed world".repeat(10_000);
    let stored = stage
        .sealed
        .put(&file(id), body(&plain), 1 << 20)
        .await
        .unwrap();
    assert_eq!(stored.size, plain.len() as u64);
    assert_eq!(
        stored.sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&plain))
    );
    let object = stage.sealed.get(&file(id)).await.unwrap();
    assert_eq!(object.size, plain.len() as u64);
    let first = sealed_by(&read(stage.raw.as_ref(), &file(id)).await.unwrap()).unwrap();

    stage
        .sealed
        .put(&file(id), body(&plain), 1 << 20)
        .await
        .unwrap();
    let second = sealed_by(&read(stage.raw.as_ref(), &file(id)).await.unwrap()).unwrap();
    assert_eq!(first, second, "one key per file");
    assert_eq!(read(&stage.sealed, &file(id)).await.unwrap(), plain);
}

#[tokio::test]
async fn an_upload_over_the_plain_limit_is_too_large_and_leaves_no_blob_and_no_live_key() {
    let stage = stage().await;
    let id = Uuid::new_v4();
    // Within the sealed size of the limit, but over the plain limit.
    let err = stage
        .sealed
        .put(&file(id), body(&[7u8; 1001]), 1000)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BlobError::TooLarge { limit: 1000 }),
        "{err:?}"
    );
    assert!(!stage.raw.exists(&file(id)).await.unwrap());
    assert!(
        stage
            .keys
            .live("acme", Owner::File(id))
            .await
            .unwrap()
            .is_none()
    );
    // Exactly at the limit is fine.
    stage
        .sealed
        .put(&file(id), body(&[7u8; 1000]), 1000)
        .await
        .unwrap();
}

#[tokio::test]
async fn delete_destroys_the_key_and_is_idempotent() {
    let stage = stage().await;
    let id = Uuid::new_v4();
    stage
        .sealed
        .put(&file(id), body(b"bye"), 100)
        .await
        .unwrap();
    let copy = read(stage.raw.as_ref(), &file(id)).await.unwrap();
    stage.sealed.delete(&file(id)).await.unwrap();
    stage.sealed.delete(&file(id)).await.unwrap();
    assert!(matches!(
        stage.keys.of_owner("acme", Owner::File(id)).await.unwrap(),
        KeyLookup::Destroyed
    ));
    stage
        .raw
        .put(&file(id), body(&copy), u64::MAX)
        .await
        .unwrap();
    let err = stage.sealed.get(&file(id)).await.unwrap_err();
    assert!(matches!(err, BlobError::Shredded), "{err:?}");
}

#[tokio::test]
async fn a_blob_without_a_key_is_served_as_it_is_unless_it_carries_a_sealed_header() {
    let stage = stage().await;
    let legacy = Uuid::new_v4();
    stage
        .raw
        .put(&file(legacy), body(b"%PDF-1.4 written in 2024"), 100)
        .await
        .unwrap();
    assert_eq!(
        read(&stage.sealed, &file(legacy)).await.unwrap(),
        b"%PDF-1.4 written in 2024"
    );

    // Sealed bytes whose key the table does not hold are never served.
    let orphan = Uuid::new_v4();
    stage
        .sealed
        .put(&file(orphan), body(b"x"), 100)
        .await
        .unwrap();
    let sealed = read(stage.raw.as_ref(), &file(orphan)).await.unwrap();
    let stranger = Uuid::new_v4();
    stage
        .raw
        .put(&file(stranger), body(&sealed), u64::MAX)
        .await
        .unwrap();
    let err = stage.sealed.get(&file(stranger)).await.unwrap_err();
    assert!(matches!(err, BlobError::Damaged(_)), "{err:?}");
    // Nor a file's blob moved under another file that has a key.
    let other = Uuid::new_v4();
    stage
        .sealed
        .put(&file(other), body(b"y"), 100)
        .await
        .unwrap();
    stage
        .raw
        .put(&file(other), body(&sealed), u64::MAX)
        .await
        .unwrap();
    let err = stage.sealed.get(&file(other)).await.unwrap_err();
    assert!(matches!(err, BlobError::Damaged(_)), "{err:?}");
}

#[tokio::test]
async fn seal_in_place_seals_once_finishes_an_interrupted_run_and_skips_shredded_blobs() {
    let stage = stage().await;
    let legacy = Uuid::new_v4();
    let plain = b"old bytes".repeat(20_000);
    stage
        .raw
        .put(&file(legacy), body(&plain), u64::MAX)
        .await
        .unwrap();
    assert_eq!(
        stage.sealed.seal_in_place(&file(legacy)).await.unwrap(),
        SealedInPlace::Sealed
    );
    assert!(sealed_by(&read(stage.raw.as_ref(), &file(legacy)).await.unwrap()).is_some());
    assert_eq!(read(&stage.sealed, &file(legacy)).await.unwrap(), plain);
    assert_eq!(
        stage.sealed.seal_in_place(&file(legacy)).await.unwrap(),
        SealedInPlace::AlreadySealed
    );

    // A run that made the key and stopped before its put.
    let interrupted = Uuid::new_v4();
    stage
        .raw
        .put(&file(interrupted), body(&plain), u64::MAX)
        .await
        .unwrap();
    stage
        .keys
        .create("acme", Owner::File(interrupted))
        .await
        .unwrap();
    assert_eq!(
        stage
            .sealed
            .seal_in_place(&file(interrupted))
            .await
            .unwrap(),
        SealedInPlace::Sealed
    );
    assert_eq!(
        read(&stage.sealed, &file(interrupted)).await.unwrap(),
        plain
    );

    stage.sealed.delete(&file(legacy)).await.unwrap();
    assert_eq!(
        stage.sealed.seal_in_place(&file(legacy)).await.unwrap(),
        SealedInPlace::Shredded
    );
    let err = stage
        .sealed
        .seal_in_place(&file(Uuid::new_v4()))
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::NotFound), "{err:?}");
}

#[tokio::test]
async fn a_key_that_names_no_file_or_bundle_is_refused() {
    let stage = stage().await;
    let key = BlobKey::from_recorded("acme/notes.txt");
    let err = stage.sealed.put(&key, body(b"x"), 10).await.unwrap_err();
    assert!(matches!(err, BlobError::Backend(_)), "{err:?}");
    assert!(!stage.raw.exists(&key).await.unwrap());
}
