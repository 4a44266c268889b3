//! The blob store port's behaviours, run against both adapters: the
//! directory store on a temporary directory, and the S3 store talking real
//! HTTP (SigV4, path-style, multipart) through `aws-sdk-s3` to a
//! `dossier-s3-dev` server spawned in-process on `127.0.0.1:0`.
//!
//! Each behaviour is one `async fn` over a [`Subject`]; the `suite!` macro
//! turns every behaviour into one test per adapter, so both adapters are held
//! to exactly the same contract.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use dossier_blobstore::s3::PART_SIZE;
use dossier_blobstore::{
    self as blob, BlobError, BlobStore, BlobStoreSpec, BodyLength, ByteStream, S3Options,
};
use dossier_domain::{BlobKey, CustomerId, FileId, TenantId};
use dossier_test_support::wait::eventually;
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// A directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(purpose: &str) -> Self {
        let path = std::env::temp_dir().join(format!("dossier-{purpose}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A store under test, with a way to see what failed uploads left behind.
struct Subject {
    store: Arc<dyn BlobStore>,
    /// Names of in-progress-upload files (dir store: temp files; S3: the
    /// server's multipart parts and upload records). Empty when no upload runs.
    leftovers: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// A leftover name containing this shows data of an upload was written.
    written_marker: &'static str,
    /// A leftover of a single streamed `PutObject` whose body broke off, if
    /// the server keeps one: s3s-fs leaves its temporary file (never an
    /// object; a real server discards it). Nothing else may be left.
    broken_put_leftover: Option<&'static str>,
    // Dropped after the store: the server first, then its files.
    _server: Option<dossier_test_support::s3::S3Dev>,
    _dir: TempDir,
}

fn files_in(dir: &std::path::Path, wanted: impl Fn(&str) -> bool) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|name| wanted(name))
                .collect()
        })
        .unwrap_or_default()
}

async fn dir_subject() -> Subject {
    let dir = TempDir::new("blobs");
    let root = dir.0.join("blobs");
    let store = blob::open(&BlobStoreSpec::Dir(root.clone()))
        .await
        .expect("open dir store");
    let tmp = root.join(".tmp");
    Subject {
        store,
        leftovers: Box::new(move || files_in(&tmp, |_| true)),
        written_marker: ".part",
        broken_put_leftover: None,
        _server: None,
        _dir: dir,
    }
}

async fn s3_subject() -> Subject {
    let dir = TempDir::new("s3");
    let server = dossier_test_support::s3::spawn(dir.0.join("s3"), "127.0.0.1:0".parse().unwrap())
        .await
        .expect("spawn s3 dev server");
    let store = blob::open(&BlobStoreSpec::S3(S3Options {
        bucket: "dossier-test".into(),
        // A prefix, so every behaviour also checks it is applied and stripped.
        prefix: Some("deployment-a".into()),
        endpoint: Some(server.endpoint.clone()),
        region: dossier_test_support::s3::DEV_REGION.into(),
        access_key: Some(server.access_key.clone()),
        secret_key: Some(server.secret_key.clone()),
        create_bucket_if_missing: true,
    }))
    .await
    .expect("open s3 store");
    let root = server.root.clone();
    Subject {
        store,
        // s3s-fs keeps multipart state as `.upload-<id>.json` and
        // `.upload_id-<id>.part-<n>` files, and writes via `.tmp.*` files.
        leftovers: Box::new(move || {
            files_in(&root, |name| {
                name.starts_with(".upload") || name.starts_with(".tmp.")
            })
        }),
        written_marker: ".part-",
        broken_put_leftover: Some(".internal.part"),
        _server: Some(server),
        _dir: dir,
    }
}

fn file_key(tenant: &str, customer: &str) -> BlobKey {
    BlobKey::for_file(
        &TenantId::parse(tenant).unwrap(),
        &CustomerId::parse(customer).unwrap(),
        FileId::new(),
    )
}

fn new_key() -> BlobKey {
    file_key("acme", "customer-1")
}

/// Deterministic bytes that do not compress or repeat in any useful way.
fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

/// `data` as an upload body in chunks of `chunk` bytes.
fn body(data: &Bytes, chunk: usize) -> ByteStream {
    let chunks: Vec<io::Result<Bytes>> = (0..data.len())
        .step_by(chunk.max(1))
        .map(|start| Ok(data.slice(start..(start + chunk).min(data.len()))))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

/// `data` in chunks, then the client's stream fails.
fn failing_body(data: &Bytes, chunk: usize) -> ByteStream {
    let failure = io::Error::new(io::ErrorKind::ConnectionReset, "client went away");
    Box::pin(body(data, chunk).chain(futures::stream::iter([Err(failure)])))
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

async fn read_all(store: &dyn BlobStore, key: &BlobKey) -> Result<(u64, Vec<u8>), BlobError> {
    let object = store.get(key).await?;
    let mut body = object.body;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.map_err(BlobError::Body)?);
    }
    Ok((object.size, out))
}

/// [`assert_no_leftovers`] after puts of a declared length, which go as one
/// streamed `PutObject` to S3: only the server's own temporary file of a
/// broken-off request may stay.
fn assert_nothing_left_but_broken_puts(subject: &Subject) {
    let left: Vec<String> = (subject.leftovers)()
        .into_iter()
        .filter(|name| {
            !subject
                .broken_put_leftover
                .is_some_and(|marker| name.ends_with(marker))
        })
        .collect();
    assert!(
        left.is_empty(),
        "a failed upload left files behind: {left:?}"
    );
}

fn assert_no_leftovers(subject: &Subject) {
    let left = (subject.leftovers)();
    assert!(
        left.is_empty(),
        "a failed upload left files behind: {left:?}"
    );
}

// ---------------------------------------------------------------------------
// Behaviours
// ---------------------------------------------------------------------------

mod behaviours {
    use super::*;

    pub async fn round_trip_keeps_bytes_and_sha256(s: &Subject) {
        let key = new_key();
        let data = pseudo_random(100_000, 1);
        let stored = s
            .store
            .put(&key, body(&data, 7_000), 1_000_000)
            .await
            .unwrap();
        assert_eq!(stored.size, 100_000);
        assert_eq!(stored.sha256, sha256_hex(&data));
        assert!(s.store.exists(&key).await.unwrap());
        let (size, read) = read_all(&*s.store, &key).await.unwrap();
        assert_eq!(size, 100_000);
        assert!(
            read == data,
            "the bytes read back differ from the bytes stored"
        );
    }

    pub async fn an_unhashed_put_stores_the_same_bytes_under_the_same_limit(s: &Subject) {
        let key = new_key();
        let data = pseudo_random(2 * PART_SIZE + 10, 11);
        let size = s
            .store
            .put_unhashed(
                &key,
                body(&data, 64 * 1024),
                BodyLength::AtMost(data.len() as u64),
            )
            .await
            .unwrap();
        assert_eq!(size, data.len() as u64);
        assert!(read_all(&*s.store, &key).await.unwrap().1 == data);
        let over = new_key();
        let err = s
            .store
            .put_unhashed(
                &over,
                body(&data, 64 * 1024),
                BodyLength::AtMost(data.len() as u64 - 1),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::TooLarge { .. }), "{err:?}");
        assert!(!s.store.exists(&over).await.unwrap());
        assert_no_leftovers(s);
    }

    pub async fn body_of_exactly_the_limit_is_stored(s: &Subject) {
        let key = new_key();
        let data = pseudo_random(1_000, 2);
        let stored = s.store.put(&key, body(&data, 300), 1_000).await.unwrap();
        assert_eq!(stored.size, 1_000);
        assert_eq!(read_all(&*s.store, &key).await.unwrap().1, data);
    }

    pub async fn one_byte_over_the_limit_is_too_large_and_leaves_nothing(s: &Subject) {
        let key = new_key();
        let data = pseudo_random(1_001, 3);
        let err = s
            .store
            .put(&key, body(&data, 300), 1_000)
            .await
            .unwrap_err();
        assert!(
            matches!(err, BlobError::TooLarge { limit: 1_000 }),
            "{err:?}"
        );
        assert!(!s.store.exists(&key).await.unwrap());
        assert_no_leftovers(s);
    }

    pub async fn over_the_limit_after_several_parts_is_too_large_and_leaves_nothing(s: &Subject) {
        let key = new_key();
        let limit = 2 * PART_SIZE as u64;
        let data = pseudo_random(2 * PART_SIZE + 1, 4);
        let err = s
            .store
            .put(&key, body(&data, 64 * 1024), limit)
            .await
            .unwrap_err();
        assert!(
            matches!(err, BlobError::TooLarge { limit: l } if l == limit),
            "{err:?}"
        );
        assert!(!s.store.exists(&key).await.unwrap());
        assert!(matches!(s.store.get(&key).await, Err(BlobError::NotFound)));
        assert_no_leftovers(s);
    }

    pub async fn empty_body_is_stored(s: &Subject) {
        let key = new_key();
        let stored = s
            .store
            .put(&key, body(&Bytes::new(), 1), 1_000)
            .await
            .unwrap();
        assert_eq!(stored.size, 0);
        assert_eq!(stored.sha256, sha256_hex(b""));
        assert!(s.store.exists(&key).await.unwrap());
        assert_eq!(read_all(&*s.store, &key).await.unwrap(), (0, Vec::new()));
    }

    pub async fn failing_body_leaves_nothing(s: &Subject) {
        let key = new_key();
        let data = pseudo_random(100_000, 5);
        let err = s
            .store
            .put(&key, failing_body(&data, 10_000), 1_000_000)
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Body(_)), "{err:?}");
        assert!(!s.store.exists(&key).await.unwrap());
        assert_no_leftovers(s);
    }

    pub async fn failing_body_after_several_parts_leaves_nothing(s: &Subject) {
        let key = new_key();
        let data = pseudo_random(PART_SIZE * 2 + 1_000, 6);
        let err = s
            .store
            .put(&key, failing_body(&data, 64 * 1024), 100 * 1024 * 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Body(_)), "{err:?}");
        assert!(!s.store.exists(&key).await.unwrap());
        assert_no_leftovers(s);
    }

    pub async fn a_body_of_its_declared_length_is_stored_whole(s: &Subject) {
        let key = new_key();
        let data = pseudo_random(2 * PART_SIZE + 10, 12);
        let stored = s
            .store
            .put_sized(
                &key,
                body(&data, 64 * 1024),
                BodyLength::Exactly(data.len() as u64),
            )
            .await
            .unwrap();
        assert_eq!(stored.size, data.len() as u64);
        assert_eq!(stored.sha256, sha256_hex(&data));
        assert!(read_all(&*s.store, &key).await.unwrap().1 == data);
    }

    pub async fn a_body_shorter_or_longer_than_declared_leaves_nothing(s: &Subject) {
        let data = pseudo_random(PART_SIZE + 10, 13);
        for declared in [data.len() as u64 - 1, data.len() as u64 + 1] {
            let key = new_key();
            let err = s
                .store
                .put_sized(&key, body(&data, 64 * 1024), BodyLength::Exactly(declared))
                .await
                .unwrap_err();
            assert!(
                matches!(err, BlobError::LengthMismatch { declared: d } if d == declared),
                "{err:?}"
            );
            assert!(!s.store.exists(&key).await.unwrap(), "declared {declared}");
        }
        assert_nothing_left_but_broken_puts(s);
    }

    pub async fn a_body_that_fails_after_its_last_declared_byte_leaves_nothing(s: &Subject) {
        // Every declared byte arrives, then the client's stream fails: a
        // store streaming exactly that many bytes must not complete the object.
        let key = new_key();
        let data = pseudo_random(PART_SIZE + 10, 14);
        let err = s
            .store
            .put_sized(
                &key,
                failing_body(&data, 64 * 1024),
                BodyLength::Exactly(data.len() as u64),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Body(_)), "{err:?}");
        assert!(!s.store.exists(&key).await.unwrap());
        assert_nothing_left_but_broken_puts(s);
    }

    pub async fn failed_upload_keeps_the_previous_blob(s: &Subject) {
        let key = new_key();
        let first = pseudo_random(5_000, 7);
        s.store
            .put(&key, body(&first, 1_000), 1_000_000)
            .await
            .unwrap();
        let second = pseudo_random(PART_SIZE + 5_000, 8);
        let err = s
            .store
            .put(&key, failing_body(&second, 64 * 1024), 100 * 1024 * 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Body(_)), "{err:?}");
        assert_eq!(read_all(&*s.store, &key).await.unwrap().1, first);
        assert_no_leftovers(s);
    }

    pub async fn cancelled_upload_leaves_nothing(s: &Subject) {
        // The request handler's future is dropped mid-upload (the client
        // disconnected): no error path runs, only destructors.
        let key = new_key();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
        let body: ByteStream = Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let upload = tokio::spawn({
            let store = Arc::clone(&s.store);
            let key = key.clone();
            async move { store.put(&key, body, 100 * 1024 * 1024).await }
        });
        let data = pseudo_random(2 * PART_SIZE + 1, 14);
        for start in (0..data.len()).step_by(64 * 1024) {
            let end = (start + 64 * 1024).min(data.len());
            tx.send(Ok(data.slice(start..end))).await.unwrap();
        }
        eventually("the upload wrote data", async || {
            let left = (s.leftovers)();
            if left.iter().any(|name| name.contains(s.written_marker)) {
                Ok(())
            } else {
                Err(left)
            }
        })
        .await;

        upload.abort();
        assert!(upload.await.unwrap_err().is_cancelled());
        eventually("the cancelled upload is cleaned up", async || {
            let left = (s.leftovers)();
            if left.is_empty() { Ok(()) } else { Err(left) }
        })
        .await;
        assert!(!s.store.exists(&key).await.unwrap());
        drop(tx);
    }

    pub async fn put_replaces_an_existing_blob(s: &Subject) {
        let key = new_key();
        s.store
            .put(&key, body(&pseudo_random(5_000, 9), 1_000), 1_000_000)
            .await
            .unwrap();
        let second = pseudo_random(3_000, 10);
        let stored = s
            .store
            .put(&key, body(&second, 1_000), 1_000_000)
            .await
            .unwrap();
        assert_eq!(stored.sha256, sha256_hex(&second));
        assert_eq!(
            read_all(&*s.store, &key).await.unwrap(),
            (3_000, second.to_vec())
        );
    }

    pub async fn multi_part_upload_round_trips(s: &Subject) {
        let key = new_key();
        let data = pseudo_random(20 * 1024 * 1024, 11);
        let stored = s
            .store
            .put(&key, body(&data, 64 * 1024), 25 * 1024 * 1024)
            .await
            .unwrap();
        assert_eq!(stored.size, data.len() as u64);
        assert_eq!(stored.sha256, sha256_hex(&data));
        let (size, read) = read_all(&*s.store, &key).await.unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(sha256_hex(&read), stored.sha256);
        assert_no_leftovers(s);
    }

    pub async fn body_of_exactly_one_part_round_trips(s: &Subject) {
        let key = new_key();
        let data = pseudo_random(PART_SIZE, 12);
        let stored = s
            .store
            .put(&key, body(&data, 1024 * 1024), PART_SIZE as u64)
            .await
            .unwrap();
        assert_eq!(stored.sha256, sha256_hex(&data));
        assert_eq!(
            sha256_hex(&read_all(&*s.store, &key).await.unwrap().1),
            stored.sha256
        );
    }

    pub async fn bodies_in_chunks_larger_than_a_part_round_trip(s: &Subject) {
        // An AMQP upload is one chunk: alone, and followed by more bytes.
        for (seed, len, chunk) in [
            (15, 2 * PART_SIZE + 1, 2 * PART_SIZE + 1),
            (16, 3 * PART_SIZE + 7, 2 * PART_SIZE + 3),
        ] {
            let key = new_key();
            let data = pseudo_random(len, seed);
            let stored = s
                .store
                .put(&key, body(&data, chunk), 25 * 1024 * 1024)
                .await
                .unwrap();
            assert_eq!(stored.size, len as u64);
            assert_eq!(stored.sha256, sha256_hex(&data));
            let (size, read) = read_all(&*s.store, &key).await.unwrap();
            assert_eq!(size, len as u64);
            assert!(
                read == data,
                "the bytes read back differ from the bytes stored"
            );
        }
        assert_no_leftovers(s);
    }

    pub async fn get_of_an_absent_key_is_not_found(s: &Subject) {
        let err = s.store.get(&new_key()).await.unwrap_err();
        assert!(matches!(err, BlobError::NotFound), "{err:?}");
        assert!(!s.store.exists(&new_key()).await.unwrap());
    }

    pub async fn delete_is_idempotent(s: &Subject) {
        let key = new_key();
        s.store
            .put(&key, body(&pseudo_random(10, 13), 10), 100)
            .await
            .unwrap();
        s.store.delete(&key).await.unwrap();
        assert!(!s.store.exists(&key).await.unwrap());
        assert!(matches!(s.store.get(&key).await, Err(BlobError::NotFound)));
        s.store.delete(&key).await.unwrap();
        s.store.delete(&new_key()).await.unwrap();
    }

    pub async fn list_by_prefix_finds_what_was_put(s: &Subject) {
        let a = file_key("t1", "c1");
        let b = file_key("t1", "c1");
        let c = file_key("t1", "c2");
        let d = file_key("t2", "c1");
        for (i, key) in [&a, &b, &c, &d].into_iter().enumerate() {
            s.store
                .put(key, body(&pseudo_random(100 + i, i as u64), 50), 1_000)
                .await
                .unwrap();
        }

        let mut listed = s.store.list_all("t1/c1/").await.unwrap();
        listed.sort_by(|x, y| x.key.cmp(&y.key));
        let mut expected = vec![(a.as_str().to_owned(), 100), (b.as_str().to_owned(), 101)];
        expected.sort();
        assert_eq!(
            listed
                .iter()
                .map(|l| (l.key.clone(), l.size))
                .collect::<Vec<_>>(),
            expected
        );
        assert!(listed.iter().all(|l| l.last_modified.is_some()));

        let keys = |prefix: &'static str| async move {
            let mut keys: Vec<String> = s
                .store
                .list_all(prefix)
                .await
                .unwrap()
                .into_iter()
                .map(|l| l.key)
                .collect();
            keys.sort();
            keys
        };
        let mut t1 = vec![a.to_string(), b.to_string(), c.to_string()];
        t1.sort();
        assert_eq!(keys("t1/").await, t1);
        // A plain string prefix, not only whole segments.
        assert_eq!(keys("t1/c").await, t1);
        assert_eq!(keys("t2").await, vec![d.to_string()]);
        assert_eq!(keys("").await.len(), 4);
        assert!(keys("t3/").await.is_empty());
    }

    pub async fn check_passes_and_describe_names_the_store(s: &Subject) {
        s.store.check().await.unwrap();
        assert!(!s.store.describe().is_empty());
    }
}

macro_rules! suite {
    ($($behaviour:ident),* $(,)?) => {
        mod dir_store {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $behaviour() {
                    let subject = dir_subject().await;
                    behaviours::$behaviour(&subject).await;
                }
            )*
        }

        mod s3_store {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $behaviour() {
                    let subject = s3_subject().await;
                    behaviours::$behaviour(&subject).await;
                }
            )*
        }
    };
}

suite!(
    round_trip_keeps_bytes_and_sha256,
    an_unhashed_put_stores_the_same_bytes_under_the_same_limit,
    body_of_exactly_the_limit_is_stored,
    one_byte_over_the_limit_is_too_large_and_leaves_nothing,
    over_the_limit_after_several_parts_is_too_large_and_leaves_nothing,
    empty_body_is_stored,
    failing_body_leaves_nothing,
    failing_body_after_several_parts_leaves_nothing,
    a_body_of_its_declared_length_is_stored_whole,
    a_body_shorter_or_longer_than_declared_leaves_nothing,
    a_body_that_fails_after_its_last_declared_byte_leaves_nothing,
    failed_upload_keeps_the_previous_blob,
    cancelled_upload_leaves_nothing,
    put_replaces_an_existing_blob,
    multi_part_upload_round_trips,
    body_of_exactly_one_part_round_trips,
    bodies_in_chunks_larger_than_a_part_round_trip,
    get_of_an_absent_key_is_not_found,
    delete_is_idempotent,
    list_by_prefix_finds_what_was_put,
    check_passes_and_describe_names_the_store,
);

// ---------------------------------------------------------------------------
// Adapter-specific behaviours
// ---------------------------------------------------------------------------

#[tokio::test]
async fn dir_store_refuses_keys_that_would_leave_its_root() {
    let subject = dir_subject().await;
    for raw in ["../escape", "a/../../escape", "a//b", ".tmp/x", "/abs"] {
        let key = BlobKey::from_recorded(raw);
        let err = subject
            .store
            .put(&key, body(&Bytes::from_static(b"x"), 1), 10)
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Backend(_)), "{raw}: {err:?}");
        assert!(subject.store.get(&key).await.is_err(), "{raw}");
    }
    assert!(!subject._dir.0.join("escape").exists());
    assert_no_leftovers(&subject);
}

#[tokio::test]
async fn dir_store_readiness_check_only_reads_and_fails_on_a_read_only_root() {
    use std::os::unix::fs::PermissionsExt as _;
    let subject = dir_subject().await;
    let root = subject._dir.0.join("blobs");
    let tmp = root.join(".tmp");
    let before = std::fs::metadata(&tmp).unwrap().modified().unwrap();
    for _ in 0..3 {
        subject.store.check().await.unwrap();
    }
    // Nothing was written and removed again: the folder did not change.
    assert_eq!(std::fs::metadata(&tmp).unwrap().modified().unwrap(), before);
    assert_no_leftovers(&subject);

    let mut permissions = std::fs::metadata(&root).unwrap().permissions();
    permissions.set_mode(0o555);
    std::fs::set_permissions(&root, permissions.clone()).unwrap();
    let err = subject.store.check().await.unwrap_err();
    permissions.set_mode(0o755);
    std::fs::set_permissions(&root, permissions).unwrap();
    assert!(matches!(err, BlobError::Backend(_)), "{err:?}");
    subject.store.check().await.unwrap();
}

#[tokio::test]
async fn s3_store_without_its_bucket_fails_its_readiness_check() {
    let dir = TempDir::new("s3");
    let server = dossier_test_support::s3::spawn(dir.0.join("s3"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let store = blob::open(&BlobStoreSpec::S3(S3Options {
        bucket: "not-created".into(),
        prefix: None,
        endpoint: Some(server.endpoint.clone()),
        region: dossier_test_support::s3::DEV_REGION.into(),
        access_key: Some(server.access_key.clone()),
        secret_key: Some(server.secret_key.clone()),
        create_bucket_if_missing: false,
    }))
    .await
    .expect("open does not contact the service");
    let err = store.check().await.unwrap_err();
    assert!(matches!(err, BlobError::Backend(_)), "{err:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn s3_store_with_wrong_credentials_says_so() {
    let dir = TempDir::new("s3");
    let server = dossier_test_support::s3::spawn(dir.0.join("s3"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    server.create_bucket_dir("dossier-test").unwrap();
    let store = blob::open(&BlobStoreSpec::S3(S3Options {
        bucket: "dossier-test".into(),
        prefix: None,
        endpoint: Some(server.endpoint.clone()),
        region: dossier_test_support::s3::DEV_REGION.into(),
        access_key: Some(server.access_key.clone()),
        secret_key: Some("wrong".into()),
        create_bucket_if_missing: false,
    }))
    .await
    .unwrap();
    let err = store
        .put(&new_key(), body(&Bytes::from_static(b"x"), 1), 10)
        .await
        .unwrap_err();
    let BlobError::Backend(message) = err else {
        panic!("expected a backend error, got {err:?}");
    };
    assert!(message.contains("SignatureDoesNotMatch"), "{message}");
    server.shutdown().await;
}
