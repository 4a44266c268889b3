//! Sealed blobs end to end (issue 14): the store holds only ciphertext, a
//! delete shreds every copy, a damaged blob is never served, blobs stored
//! before encryption keep working and can be sealed in place, rotation keeps
//! every file readable, and bundle archives are sealed under keys of their
//! own that expiry destroys. Against real Postgres, RabbitMQ, the S3 server
//! and the directory store.

use std::io::{Cursor, Read as _};
use std::time::Duration;

use bytes::Bytes;
use dossier_blobstore::{ByteStream, SealedBlobStore};
use dossier_domain::BlobKey;
use dossier_keys::segments::{self, HEADER, SEGMENT, sealed_by, sealed_len};
use dossier_keys::{KeyLookup, KeyStore, MasterKey, Owner};
use dossier_test_support::client::{BundleStatus, Client};
use dossier_test_support::wait::Wait;
use dossier_test_support::{AppServer, TestApp, error_code, settings};
use futures::{StreamExt as _, TryStreamExt as _};
use uuid::Uuid;

/// A sealed segment: 64 KiB and its tag.
const SEALED_SEGMENT: usize = SEGMENT + 16;

/// What a test does to the stored bytes of a blob.
type Damage<'a> = &'a dyn Fn(Vec<u8>) -> Vec<u8>;

/// Text no ciphertext contains by chance: a payslip, line after line.
fn payslip(len: usize) -> Vec<u8> {
    let mut text = Vec::with_capacity(len + 64);
    let mut line = 0;
    while text.len() < len {
        text.extend_from_slice(
            format!("Payslip of Jane Doe, IBAN DE89 3704, line {line:06}\n").as_bytes(),
        );
        line += 1;
    }
    text.truncate(len);
    text
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn file_key(customer: &str, id: &str) -> BlobKey {
    BlobKey::from_recorded(format!("acme/{customer}/{id}"))
}

/// The app's key table, as the app opens it (the same master keys).
async fn key_store(app: &TestApp, overrides: &[(&str, &str)]) -> KeyStore {
    dossier_api::startup::open_key_store(&settings(&app.database_url, overrides), &app.pool)
        .await
        .expect("the key table opens")
}

async fn raw(app: &TestApp, key: &BlobKey) -> Vec<u8> {
    let object = app.blobs.get(key).await.expect("the stored blob");
    let chunks: Vec<Bytes> = object.body.try_collect().await.expect("its bytes");
    chunks.concat()
}

async fn put_raw(app: &TestApp, key: &BlobKey, bytes: Vec<u8>) {
    let body: ByteStream = Box::pin(futures::stream::iter([Ok(Bytes::from(bytes))]));
    app.blobs
        .put(key, body, u64::MAX)
        .await
        .expect("the blob is stored as it is");
}

/// `GET path`: the status (`None` when the connection ended before the answer's head: the
/// server may cut an answer before it has flushed a byte of it), the bytes
/// that arrived, and why the body ended early, if it did.
async fn get_cut(api: &Client, path: &str) -> (Option<u16>, Vec<u8>, Option<String>) {
    let response = match api.try_get(path).await {
        Ok(response) => response,
        Err(error) => return (None, Vec::new(), Some(error.to_string())),
    };
    let status = Some(response.status().as_u16());
    let mut body = response.bytes_stream();
    let mut received = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => received.extend_from_slice(&chunk),
            Err(error) => return (status, received, Some(error.to_string())),
        }
    }
    (status, received, None)
}

async fn owner_key(keys: &KeyStore, owner: Owner<'_>) -> KeyLookup {
    keys.of_owner("acme", owner)
        .await
        .expect("the key table answers")
}

// ------------------------------------------------------------ ciphertext only

async fn the_store_holds_only_ciphertext(app: TestApp) {
    let staff = app.api(&app.staff("acme"));
    for len in [0, 1_000, 3 * SEGMENT + 100] {
        let plain = payslip(len);
        let file = staff.upload("cust-1", "Payslip", plain.clone()).await;
        assert_eq!(file.size, len as u64);
        let stored = raw(&app, &file_key("cust-1", &file.id)).await;
        assert_eq!(stored.len() as u64, sealed_len(len as u64), "len {len}");
        assert!(sealed_by(&stored).is_some(), "len {len}: a sealed header");
        assert!(
            !contains(&stored, b"Jane Doe") && !contains(&stored, b"IBAN"),
            "len {len}: the stored object holds no plaintext"
        );
        let download = staff.download(&file.id).await;
        assert_eq!(
            download.bytes, plain,
            "len {len}: the download is the plain file"
        );
        assert_eq!(
            download.header("content-length"),
            Some(len.to_string().as_str())
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_s3_bucket_holds_only_ciphertext_and_downloads_are_the_plain_file() {
    the_store_holds_only_ciphertext(TestApp::spawn().await).await;
}

#[tokio::test]
async fn a_blob_directory_holds_only_ciphertext_and_downloads_are_the_plain_file() {
    the_store_holds_only_ciphertext(TestApp::spawn_on_dir(&[]).await).await;
}

// ------------------------------------------------------- a delete shreds copies

async fn a_copy_taken_before_a_delete_is_noise_after_it(app: TestApp) {
    let staff = app.api(&app.staff("acme"));
    let keys = key_store(&app, &[]).await;
    let plain = payslip(2 * SEGMENT + 7);
    let file = staff.upload("cust-1", "Payslip", plain.clone()).await;
    let key = file_key("cust-1", &file.id);
    let file_id = Uuid::parse_str(&file.id).unwrap();

    // The copy aside opens while the file lives...
    let copy = raw(&app, &key).await;
    let KeyLookup::Live(data_key) = owner_key(&keys, Owner::File(file_id)).await else {
        panic!("the file has a live key");
    };
    assert_eq!(sealed_by(&copy), Some(data_key.id()));
    let body = futures::stream::iter([Ok(Bytes::from(copy.clone()))]);
    let opened: Vec<Bytes> = segments::open(data_key.clone(), body)
        .try_collect()
        .await
        .expect("the copy opens before the delete");
    assert_eq!(opened.concat(), plain);

    // ...and the delete destroys its key.
    staff.delete(&file.id).await;
    Wait::new("the deleted file's key to be destroyed and its blob removed")
        .timeout(Duration::from_secs(60))
        .expect(async || {
            let key_state = owner_key(&keys, Owner::File(file_id)).await;
            let stored = app.blobs.exists(&key).await.unwrap();
            match (&key_state, stored) {
                (KeyLookup::Destroyed, false) => Ok(()),
                _ => Err(format!("key {key_state:?}, blob stored: {stored}")),
            }
        })
        .await;
    assert!(matches!(
        keys.lookup_one(data_key.id()).await.unwrap(),
        KeyLookup::Destroyed
    ));
    // The copy, put back where it was, is refused as shredded, not served.
    put_raw(&app, &key, copy).await;
    let err = app.sealed_blobs.get(&key).await.unwrap_err();
    assert!(
        matches!(err, dossier_blobstore::BlobError::Shredded),
        "{err:?}"
    );
    let response = staff.get(&format!("/v1/files/{}/content", file.id)).await;
    assert_eq!(response.status(), 404);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn on_s3_a_copy_taken_before_a_delete_opens_before_and_never_after() {
    a_copy_taken_before_a_delete_is_noise_after_it(TestApp::spawn().await).await;
}

#[tokio::test]
async fn in_a_directory_a_copy_taken_before_a_delete_opens_before_and_never_after() {
    a_copy_taken_before_a_delete_is_noise_after_it(TestApp::spawn_on_dir(&[]).await).await;
}

// ----------------------------------------------------------- damage is refused

async fn damaged_blobs_are_refused(app: TestApp) {
    // A connection of its own per request: answers here are cut off on
    // purpose, and a pooled connection the server has just closed would make
    // the next request fail before it is sent (seen once in a full run).
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("an HTTP client");
    let staff = Client::new(http, &app.address, &app.staff("acme"));
    let plain = payslip(3 * SEGMENT + 100);
    let small = payslip(5_000);

    // Damage in the first segment, a swap, a blob cut to its header: refused
    // with the contract's 503 before the answer starts.
    let first_flip = |mut stored: Vec<u8>| {
        stored[HEADER + 10] ^= 0x01;
        stored
    };
    let swapped = |stored: Vec<u8>| {
        let mut out = stored[..HEADER].to_vec();
        out.extend_from_slice(&stored[HEADER + SEALED_SEGMENT..HEADER + 2 * SEALED_SEGMENT]);
        out.extend_from_slice(&stored[HEADER..HEADER + SEALED_SEGMENT]);
        out.extend_from_slice(&stored[HEADER + 2 * SEALED_SEGMENT..]);
        out
    };
    let header_only = |stored: Vec<u8>| stored[..HEADER].to_vec();
    let before: [(&str, &[u8], Damage); 4] = [
        ("a flipped byte in the first segment", &plain, &first_flip),
        ("the first two segments swapped", &plain, &swapped),
        (
            "a one-segment blob cut by its segment",
            &small,
            &header_only,
        ),
        ("a flipped byte in the header", &small, &|mut s: Vec<u8>| {
            s[5] ^= 0x80;
            s
        }),
    ];
    for (what, content, damage) in before {
        let file = staff.upload("cust-1", what, content.to_vec()).await;
        let key = file_key("cust-1", &file.id);
        let stored = raw(&app, &key).await;
        put_raw(&app, &key, damage(stored)).await;
        let response = staff.get(&format!("/v1/files/{}/content", file.id)).await;
        assert_eq!(response.status(), 503, "{what}");
        let body: serde_json::Value = response.json().await.expect("an error body");
        assert_eq!(body["error"]["code"], "unavailable", "{what}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("integrity check"), "{what}: {message}");
        assert!(!message.contains("acme"), "{what}: no key in the message");
    }

    // Damage further in, or the last segment cut off: the answer has begun,
    // so it is cut off; what arrived is the file's true beginning, never
    // more, never other bytes.
    let later_flip = |mut stored: Vec<u8>| {
        stored[HEADER + 2 * SEALED_SEGMENT + 5] ^= 0x01;
        stored
    };
    let cut_last = |stored: Vec<u8>| stored[..HEADER + 3 * SEALED_SEGMENT].to_vec();
    let during: [(&str, Damage); 2] = [
        ("a flipped byte in the third segment", &later_flip),
        ("the last segment cut off", &cut_last),
    ];
    for (what, damage) in during {
        let file = staff.upload("cust-1", what, plain.clone()).await;
        let key = file_key("cust-1", &file.id);
        let stored = raw(&app, &key).await;
        put_raw(&app, &key, damage(stored)).await;
        let (status, received, cut) =
            get_cut(&staff, &format!("/v1/files/{}/content", file.id)).await;
        // The first segment was sound, so the answer began (200), unless the
        // connection was cut before its head was flushed; either way only
        // true bytes arrived.
        assert!(matches!(status, Some(200) | None), "{what}: {status:?}");
        assert!(cut.is_some(), "{what}: the body is cut off, not ended");
        assert!(
            received.len() < 3 * SEGMENT,
            "{what}: {} bytes",
            received.len()
        );
        assert_eq!(received, plain[..received.len()], "{what}: only true bytes");
    }

    // The sealed store itself says why, for the zip worker and `blobs verify`.
    let file = staff.upload("cust-1", "Flipped", small.clone()).await;
    let key = file_key("cust-1", &file.id);
    put_raw(&app, &key, first_flip(raw(&app, &key).await)).await;
    let err = app.sealed_blobs.get(&key).await.unwrap_err();
    assert!(
        matches!(err, dossier_blobstore::BlobError::Damaged(_)),
        "{err:?}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn on_s3_a_flipped_byte_a_swap_or_a_cut_segment_is_refused_and_never_served() {
    damaged_blobs_are_refused(TestApp::spawn().await).await;
}

#[tokio::test]
async fn in_a_directory_a_flipped_byte_a_swap_or_a_cut_segment_is_refused_and_never_served() {
    damaged_blobs_are_refused(TestApp::spawn_on_dir(&[]).await).await;
}

// ------------------------------------------------- blobs stored before sealing

/// Turns an uploaded file into one stored before encryption: its plain
/// bytes under its key, and no key in the table.
async fn unseal(app: &TestApp, customer: &str, id: &str, plain: &[u8]) {
    put_raw(app, &file_key(customer, id), plain.to_vec()).await;
    let client = app.pool.get().await.unwrap();
    let removed = client
        .execute(
            "DELETE FROM data_keys WHERE owner_kind = 'file' AND owner_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(removed, 1);
}

#[tokio::test]
async fn a_blob_stored_before_encryption_still_downloads_and_blobs_encrypt_seals_it_in_place() {
    let app = TestApp::spawn().await;
    let staff = app.api(&app.staff("acme"));
    let old = payslip(SEGMENT + 300);
    let new = payslip(700);
    let legacy = staff.upload("cust-1", "Old", old.clone()).await;
    let sealed = staff.upload("cust-1", "New", new.clone()).await;
    unseal(&app, "cust-1", &legacy.id, &old).await;

    assert_eq!(
        staff.download(&legacy.id).await.bytes,
        old,
        "served as it is"
    );
    assert_eq!(staff.download(&sealed.id).await.bytes, new);

    let store = SealedBlobStore::new(app.blobs.clone(), key_store(&app, &[]).await);
    let report = dossier_workers::encrypt_blobs(&app.pool, &store)
        .await
        .unwrap();
    assert_eq!(
        (report.checked, report.sealed, report.already_sealed),
        (2, 1, 1),
        "{report:?}"
    );
    assert!(report.is_clean(), "{report:?}");
    let stored = raw(&app, &file_key("cust-1", &legacy.id)).await;
    assert!(sealed_by(&stored).is_some() && !contains(&stored, b"Jane Doe"));
    assert_eq!(
        staff.download(&legacy.id).await.bytes,
        old,
        "sealed, the same file"
    );
    assert_eq!(staff.download(&sealed.id).await.bytes, new);

    // Run again, there is nothing left to do.
    let again = dossier_workers::encrypt_blobs(&app.pool, &store)
        .await
        .unwrap();
    assert_eq!((again.sealed, again.already_sealed), (0, 2), "{again:?}");
    app.stop().await.unwrap();
}

// ------------------------------------------------------------------- rotation

#[tokio::test]
async fn after_a_rotation_every_file_downloads_with_only_the_new_master_key() {
    let (_, old) = MasterKey::generate();
    let (_, new) = MasterKey::generate();
    let mut app = TestApp::spawn_with(&[("DOSSIER_MASTER_KEY", &old)]).await;
    let token = app.staff("acme");
    let staff = app.api(&token);
    let mut files = Vec::new();
    for i in 0..3 {
        let plain = payslip(1_000 + i * SEGMENT);
        let file = staff
            .upload(&format!("cust-{i}"), "Payslip", plain.clone())
            .await;
        files.push((file.id, plain));
    }
    app.shutdown().await.unwrap();

    let rotating = key_store(
        &app,
        &[
            ("DOSSIER_MASTER_KEY", &new),
            ("DOSSIER_MASTER_KEY_PREVIOUS", &old),
        ],
    )
    .await;
    assert_eq!(rotating.rotate().await.unwrap(), 3);
    let counts = rotating.count_by_master().await.unwrap();
    assert_eq!(counts, vec![(rotating.master_key_id().to_owned(), 3)]);

    let mut after = AppServer::start(
        settings(
            &app.database_url,
            &[
                ("DOSSIER_MASTER_KEY", &new),
                ("DOSSIER_ROLES", "api,projections"),
            ],
        ),
        app.blobs.clone(),
    )
    .await
    .expect("the application starts with the new master key only");
    after
        .wait_until_ready(&app.client, Duration::from_secs(60))
        .await
        .unwrap();
    let staff = Client::new(app.client.clone(), &after.address, &token);
    for (id, plain) in &files {
        assert_eq!(&staff.download(id).await.bytes, plain);
    }
    // No blob was touched: each still names the key it was sealed under.
    let ids: Vec<Uuid> = files
        .iter()
        .map(|(id, _)| Uuid::parse_str(id).unwrap())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let stored = raw(&app, &file_key(&format!("cust-{i}"), &id.to_string())).await;
        let KeyLookup::Live(key) = owner_key(&rotating, Owner::File(*id)).await else {
            panic!("a live key");
        };
        assert_eq!(sealed_by(&stored), Some(key.id()));
    }
    after.stop().await.unwrap();
}

// --------------------------------------------------------------------- bundles

#[tokio::test]
async fn a_bundle_archive_is_sealed_downloads_whole_and_its_expiry_destroys_its_key() {
    let app = TestApp::spawn_with(&[("DOSSIER_BUNDLE_TTL_SECS", "5")]).await;
    let staff = app.api(&app.staff("acme"));
    let keys = key_store(&app, &[]).await;
    let a = payslip(SEGMENT + 10);
    let b = payslip(3_000);
    let first = staff.upload("cust-1", "First", a.clone()).await;
    let second = staff.upload("cust-1", "Second", b.clone()).await;
    let bundle = staff.bundle(&[&first.id, &second.id]).await;
    let bundle_id = Uuid::parse_str(&bundle.id).unwrap();
    let archive_key = BlobKey::from_recorded(format!("acme/!bundles/{}.zip", bundle.id));

    let stored = raw(&app, &archive_key).await;
    let KeyLookup::Live(bundle_key) = owner_key(&keys, Owner::Bundle(bundle_id)).await else {
        panic!("the archive has a live key of its own");
    };
    assert_eq!(sealed_by(&stored), Some(bundle_key.id()));
    assert!(!stored.starts_with(b"PK"), "no ZIP header in the clear");
    assert!(!contains(&stored, b"Jane Doe"));

    let archive = staff.bundle_content(&bundle.id).await.bytes;
    assert_eq!(Some(archive.len() as u64), bundle.size);
    let mut zip = zip::ZipArchive::new(Cursor::new(archive)).expect("a valid ZIP");
    let mut contents = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).unwrap();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        contents.push(bytes);
    }
    contents.sort();
    let mut expected = vec![a, b];
    expected.sort();
    assert_eq!(contents, expected);

    Wait::new("the bundle to expire and its key to be destroyed")
        .timeout(Duration::from_secs(60))
        .interval(Duration::from_millis(200))
        .expect(async || {
            let key_state = owner_key(&keys, Owner::Bundle(bundle_id)).await;
            let stored = app.blobs.exists(&archive_key).await.unwrap();
            match (&key_state, stored) {
                (KeyLookup::Destroyed, false) => Ok(()),
                _ => Err(format!("key {key_state:?}, archive stored: {stored}")),
            }
        })
        .await;
    let status = staff.get(&format!("/v1/bundles/{}", bundle.id)).await;
    assert_eq!(status.status(), 404);
    assert_ne!(bundle.status, BundleStatus::Failed);
    app.stop().await.unwrap();
}

/// The plain limit holds through the seal: an upload over it is refused
/// naming the plain limit, and nothing is stored.
#[tokio::test]
async fn the_size_limit_counts_plain_bytes_and_an_upload_over_it_stores_nothing() {
    let app = TestApp::spawn_with(&[("DOSSIER_MAX_FILE_BYTES", "100000")]).await;
    let staff = app.api(&app.staff("acme"));
    let fits = staff.upload("cust-1", "Fits", payslip(100_000)).await;
    assert_eq!(fits.size, 100_000);
    let upload = dossier_test_support::client::Upload::new("Too big", payslip(100_001));
    let response = staff.post_upload("cust-1", &upload).await;
    assert_eq!(response.status(), 413);
    assert_eq!(error_code(response).await, "file_too_large");
    let keys = app.blob_keys().await;
    assert_eq!(keys, vec![format!("acme/cust-1/{}", fits.id)]);
    app.stop().await.unwrap();
}
