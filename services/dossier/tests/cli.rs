//! The data-protection commands of the real `dossier` binary against real
//! Postgres (and, for `blobs encrypt`, a whole Dossier on a blob directory):
//! `keys generate`, `keys rotate`, `keys status`, `blobs encrypt`.

use std::process::Output;

use bytes::Bytes;
use dossier_blobstore::ByteStream;
use dossier_domain::BlobKey;
use dossier_keys::segments::sealed_by;
use dossier_keys::{KeyStore, MasterKey, MasterKeys, Owner};
use dossier_test_support::TestApp;
use dossier_test_support::db::fresh_database;
use serde_json::Value;
use uuid::Uuid;

/// Runs `dossier args...` with only `env` (and PATH) in its environment.
async fn dossier(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_dossier"));
    command.args(args).env_clear();
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    command.env("RUST_LOG", "warn");
    for (name, value) in env {
        command.env(name, value);
    }
    // No `.env` of a developer's checkout may leak in.
    command.current_dir(std::env::temp_dir());
    command.output().await.expect("dossier runs")
}

fn json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "dossier failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "JSON on stdout ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test]
async fn keys_generate_prints_a_new_valid_master_key_each_time() {
    let first = dossier(&["keys", "generate"], &[]).await;
    let second = dossier(&["keys", "generate"], &[]).await;
    assert!(first.status.success() && second.status.success());
    let first = String::from_utf8(first.stdout).unwrap();
    let second = String::from_utf8(second.stdout).unwrap();
    let first = MasterKey::from_base64(&first).expect("32 bytes of base64");
    let second = MasterKey::from_base64(&second).expect("32 bytes of base64");
    assert_ne!(first.id(), second.id());
    assert!(!first.is_development());
}

#[tokio::test]
async fn keys_rotate_rewraps_every_live_key_and_keys_status_counts_them_per_master_key() {
    let (pool, url) = fresh_database().await.unwrap();
    let (old, old_text) = MasterKey::generate();
    let (_, new_text) = MasterKey::generate();
    let old_id = old.id().to_owned();
    let store = KeyStore::open(pool.clone(), MasterKeys::new(old, None))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let file = Uuid::new_v4();
        store.create("acme", Owner::File(file)).await.unwrap();
        ids.push(file);
    }
    // A destroyed key is not live and not rotated.
    store
        .destroy_now("acme", &[Owner::File(ids[2])])
        .await
        .unwrap();

    let status = json(
        &dossier(
            &["keys", "status"],
            &[
                ("DOSSIER_DATABASE_URL", &url),
                ("DOSSIER_MASTER_KEY", &old_text),
            ],
        )
        .await,
    );
    assert_eq!(status["master_key_id"], old_id.as_str());
    assert_eq!(status["live_keys"][&old_id], 2, "{status}");

    let during = [
        ("DOSSIER_DATABASE_URL", url.as_str()),
        ("DOSSIER_MASTER_KEY", new_text.as_str()),
        ("DOSSIER_MASTER_KEY_PREVIOUS", old_text.as_str()),
    ];
    let rotated = json(&dossier(&["keys", "rotate"], &during).await);
    assert_eq!(rotated["rewrapped"], 2, "{rotated}");
    let new_id = rotated["master_key_id"].as_str().unwrap().to_owned();
    assert_ne!(new_id, old_id);
    let again = json(&dossier(&["keys", "rotate"], &during).await);
    assert_eq!(again["rewrapped"], 0, "{again}");

    let after = [
        ("DOSSIER_DATABASE_URL", url.as_str()),
        ("DOSSIER_MASTER_KEY", new_text.as_str()),
    ];
    let status = json(&dossier(&["keys", "status"], &after).await);
    assert_eq!(
        status["live_keys"],
        serde_json::json!({ new_id.clone(): 2 })
    );

    // With only the new key, every live key unwraps.
    let new_only = KeyStore::open(
        pool,
        MasterKeys::new(MasterKey::from_base64(&new_text).unwrap(), None),
    )
    .await
    .unwrap();
    for file in &ids[..2] {
        assert!(
            new_only
                .live("acme", Owner::File(*file))
                .await
                .unwrap()
                .is_some()
        );
    }

    // Rotating without the previous key is refused, naming what is missing.
    let (_, third) = MasterKey::generate();
    let refused = dossier(
        &["keys", "rotate"],
        &[
            ("DOSSIER_DATABASE_URL", &url),
            ("DOSSIER_MASTER_KEY", &third),
        ],
    )
    .await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("DOSSIER_MASTER_KEY_PREVIOUS"), "{stderr}");
}

#[tokio::test]
async fn blobs_encrypt_seals_blobs_stored_before_encryption_in_place_and_is_idempotent() {
    let app = TestApp::spawn_on_dir(&[("DOSSIER_ROLES", "api,projections")]).await;
    let staff = app.api(&app.staff("acme"));
    let old = b"Payslip of Jane Doe, stored before encryption".repeat(3_000);
    let legacy = staff.upload("cust-1", "Old", old.clone()).await;
    let sealed = staff
        .upload("cust-1", "New", b"sealed from the start".to_vec())
        .await;
    // Stored before encryption: the plain bytes, and no key for the file.
    let legacy_key = BlobKey::from_recorded(format!("acme/cust-1/{}", legacy.id));
    let body: ByteStream = Box::pin(futures::stream::iter([Ok(Bytes::from(old.clone()))]));
    app.blobs.put(&legacy_key, body, u64::MAX).await.unwrap();
    let client = app.pool.get().await.unwrap();
    client
        .execute("DELETE FROM data_keys WHERE owner_id = $1", &[&legacy.id])
        .await
        .unwrap();
    assert_eq!(staff.download(&legacy.id).await.bytes, old);

    let dir = app.blob_dir.clone().unwrap();
    let env = [
        ("DOSSIER_DATABASE_URL", app.database_url.clone()),
        ("DOSSIER_BLOB_STORE", format!("file://{}", dir.display())),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let report = json(&dossier(&["blobs", "encrypt"], &env).await);
    assert_eq!(report["checked"], 2, "{report}");
    assert_eq!(report["sealed"], 1, "{report}");
    assert_eq!(report["already_sealed"], 1, "{report}");

    let stored = std::fs::read(dir.join(format!("acme/cust-1/{}", legacy.id))).unwrap();
    assert!(sealed_by(&stored).is_some(), "sealed in place");
    assert!(!stored.windows(8).any(|w| w == b"Jane Doe"));
    assert_eq!(staff.download(&legacy.id).await.bytes, old);
    assert_eq!(
        staff.download(&sealed.id).await.bytes,
        b"sealed from the start"
    );
    // `blobs verify` reads through the seal: every hash matches.
    let verified = json(&dossier(&["blobs", "verify"], &env).await);
    assert_eq!(verified["ok"], 2, "{verified}");

    let again = json(&dossier(&["blobs", "encrypt"], &env).await);
    assert_eq!(
        (again["sealed"].as_u64(), again["already_sealed"].as_u64()),
        (Some(0), Some(2)),
        "{again}"
    );
    app.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
