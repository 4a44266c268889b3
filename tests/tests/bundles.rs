//! ZIP bundles end to end: real HTTP, Postgres, RabbitMQ and S3, the real zip
//! worker, and every archive read back with a real ZIP reader (the `zip` crate,
//! and Info-ZIP's `unzip -t` where it is installed).

use std::io::{Cursor, Read};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike as _, Timelike as _, Utc};
use dossier_broker::{Broker, ZIP_QUEUE};
use dossier_test_support::client::{BundleStatus, Client, FileView, Upload};
use dossier_test_support::process::ServeProcess;
use dossier_test_support::wait::{Wait, eventually};
use dossier_test_support::{TestApp, error_code};
use dossier_workers::zip::{ZipWorkerConfig, ZipWorkerError};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zip::{CompressionMethod, ZipArchive};

/// Every role but the workers: bundles stay pending until a test starts one.
const NO_WORKERS: (&str, &str) = ("DOSSIER_ROLES", "api,intake,relay,projections");

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Uploads with an explicit file name and content type; answers the File.
async fn upload(
    api: &Client,
    customer: &str,
    name: &str,
    file_name: &str,
    content_type: &str,
    bytes: Vec<u8>,
) -> FileView {
    let upload = Upload::new(name, bytes).file(file_name, content_type);
    api.upload_file(customer, &upload).await
}

/// Downloads a ready bundle's archive, with the contract's headers.
async fn download(api: &Client, id: &str) -> Vec<u8> {
    let archive = api.bundle_content(id).await;
    assert_eq!(archive.header("content-type"), Some("application/zip"));
    let length: usize = archive.header("content-length").unwrap().parse().unwrap();
    let disposition = archive.header("content-disposition").unwrap();
    assert!(
        disposition.starts_with("attachment; filename=\"bundle-"),
        "{disposition}"
    );
    assert_eq!(archive.bytes.len(), length);
    archive.bytes
}

/// One entry as a ZIP reader sees it.
#[derive(Debug)]
struct Entry {
    name: String,
    method: CompressionMethod,
    bytes: Vec<u8>,
    modified: (u16, u8, u8, u8, u8, u8),
}

/// Reads every entry (the reader checks each CRC-32 as it reads), and checks that
/// no name could leave the folder it is extracted to.
fn read_zip(bytes: &[u8]) -> Vec<Entry> {
    let mut archive = ZipArchive::new(Cursor::new(bytes)).expect("a valid ZIP");
    let mut entries = Vec::new();
    for index in 0..archive.len() {
        let mut file = archive.by_index(index).unwrap();
        let name = file.name().expect("a UTF-8 name").into_owned();
        let enclosed = file
            .enclosed_name()
            .expect("the name stays inside the archive");
        assert_eq!(enclosed.to_str(), Some(name.as_str()), "a plain file name");
        assert!(
            !name.contains(['/', '\\']) && !name.starts_with('.'),
            "{name}"
        );
        let time = file.last_modified().expect("an entry time");
        let mut content = Vec::new();
        file.read_to_end(&mut content).unwrap();
        entries.push(Entry {
            name,
            method: file.compression(),
            bytes: content,
            modified: (
                time.year(),
                time.month(),
                time.day(),
                time.hour(),
                time.minute(),
                time.second(),
            ),
        });
    }
    entries
}

/// Info-ZIP's own test of the archive, when `unzip` is installed.
fn unzip_test(bytes: &[u8]) {
    if !std::path::Path::new("/usr/bin/unzip").exists() {
        eprintln!("unzip is not installed; only the zip crate read the archive");
        return;
    }
    let path = std::env::temp_dir().join(format!("dossier-bundle-{}.zip", uuid::Uuid::new_v4()));
    std::fs::write(&path, bytes).unwrap();
    let output = Command::new("/usr/bin/unzip")
        .arg("-tq")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        output.status.success(),
        "unzip -t: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The DOS date and time a ZIP entry gets for an upload time (UTC, even seconds).
fn dos_parts(at: &DateTime<Utc>) -> (u16, u8, u8, u8, u8, u8) {
    (
        at.year() as u16,
        at.month() as u8,
        at.day() as u8,
        at.hour() as u8,
        at.minute() as u8,
        (at.second() as u8) & !1,
    )
}

/// A zip worker in this process, on the app's database, vhost and bucket.
fn start_zip_worker(
    app: &TestApp,
    config: ZipWorkerConfig,
) -> (watch::Sender<bool>, JoinHandle<Result<(), ZipWorkerError>>) {
    let broker = Broker::new(app.vhost.url()).unwrap();
    let (stop, stopping) = watch::channel(false);
    let task = tokio::spawn(dossier_workers::zip::run(
        app.pool.clone(),
        broker,
        app.sealed_blobs.clone(),
        config,
        stopping,
    ));
    (stop, task)
}

async fn bundle_events(app: &TestApp, id: &str) -> Vec<(String, Value)> {
    let client = app.pool.get().await.unwrap();
    client
        .query(
            "SELECT event_type, payload FROM events \
             WHERE aggregate_type = 'bundle' AND aggregate_id = $1 ORDER BY sequence",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// One file of the naming test and the entry it must become.
struct Case {
    name: &'static str,
    file_name: &'static str,
    content_type: &'static str,
    bytes: Vec<u8>,
    entry: &'static str,
    method: CompressionMethod,
}

#[tokio::test]
async fn entries_are_named_by_the_contract_and_hold_the_exact_bytes() {
    let app = TestApp::spawn().await;
    let staff = app.api(&app.staff("acme"));
    let text = "Invoice line, amount, currency\n"
        .repeat(2_000)
        .into_bytes();
    let cases = [
        Case {
            name: "Invoice November 2025",
            file_name: "invoice_11.pdf",
            content_type: "application/pdf",
            bytes: pattern(70_000, 1),
            entry: "Invoice November 2025.pdf",
            method: CompressionMethod::Stored,
        },
        Case {
            name: "Invoice November 2025",
            file_name: "scan.pdf",
            content_type: "application/pdf",
            bytes: pattern(1_000, 2),
            entry: "Invoice November 2025 (2).pdf",
            method: CompressionMethod::Stored,
        },
        Case {
            name: "invoice november 2025",
            file_name: "OTHER.PDF",
            content_type: "application/pdf",
            bytes: pattern(10, 3),
            entry: "invoice november 2025 (3).PDF",
            method: CompressionMethod::Stored,
        },
        Case {
            name: "../../etc/passwd",
            file_name: "notes.txt",
            content_type: "text/plain",
            bytes: text.clone(),
            entry: "_.._etc_passwd.txt",
            method: CompressionMethod::Deflated,
        },
        Case {
            name: "/absolute/Vertrag Müller",
            file_name: "vertrag.docx",
            content_type: "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            bytes: pattern(5_000, 4),
            entry: "_absolute_Vertrag Müller.docx",
            method: CompressionMethod::Stored,
        },
        Case {
            name: "Export",
            file_name: "export.csv",
            content_type: "application/vnd.ms-excel",
            bytes: text.clone(),
            entry: "Export.csv",
            method: CompressionMethod::Deflated,
        },
        Case {
            name: "Photo",
            file_name: "IMG_0001.JPG",
            content_type: "image/jpeg",
            bytes: pattern(3_000, 5),
            entry: "Photo.JPG",
            method: CompressionMethod::Stored,
        },
        Case {
            name: "Empty",
            file_name: "empty.txt",
            content_type: "text/plain",
            bytes: Vec::new(),
            entry: "Empty.txt",
            method: CompressionMethod::Deflated,
        },
        Case {
            name: "Notes",
            file_name: "README",
            content_type: "application/octet-stream",
            bytes: pattern(100, 6),
            entry: "Notes",
            method: CompressionMethod::Stored,
        },
    ];
    let mut files = Vec::new();
    for case in &cases {
        files.push(
            upload(
                &staff,
                "cust-1",
                case.name,
                case.file_name,
                case.content_type,
                case.bytes.clone(),
            )
            .await,
        );
    }
    let ids: Vec<&str> = files.iter().map(|f| f.id.as_str()).collect();

    let id = staff.request_bundle(&ids).await;
    let status = staff.bundle_finished(&id).await;
    assert_eq!(status.status, BundleStatus::Ready, "{status:?}");
    assert_eq!(status.file_count, cases.len() as u64);
    assert_eq!(status.files_done, cases.len() as u64);
    assert!(status.error.is_none());

    let zip = download(&staff, &id).await;
    assert_eq!(status.size, Some(zip.len() as u64));
    unzip_test(&zip);
    let entries = read_zip(&zip);
    assert_eq!(entries.len(), cases.len());
    for ((case, file), entry) in cases.iter().zip(&files).zip(&entries) {
        assert_eq!(entry.name, case.entry);
        assert_eq!(entry.bytes, case.bytes, "the bytes of {}", case.entry);
        assert_eq!(entry.method, case.method, "{}", case.entry);
        assert_eq!(
            entry.modified,
            dos_parts(&file.created_at),
            "{}",
            case.entry
        );
    }
    // Deflating made the text-like entries smaller than their content.
    assert!(zip.len() < cases.iter().map(|c| c.bytes.len()).sum::<usize>());

    // Every file of the bundle is in the audit trail as downloaded, once per download.
    let client = app.pool.get().await.unwrap();
    let recorded: i64 = client
        .query_one(
            "SELECT count(*) FROM events WHERE event_type = 'FileDownloaded' \
             AND payload->>'channel' = 'bundle' AND payload->>'bundle_id' = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, cases.len() as i64);

    // The request recorded who asked and for which files.
    let events = bundle_events(&app, &id).await;
    let (first, requested) = &events[0];
    assert_eq!(first, "BundleRequested");
    assert_eq!(requested["requested_by"], "staff-1");
    assert_eq!(requested["files"].as_array().unwrap().len(), cases.len());
    assert_eq!(events.last().unwrap().0, "BundleReady");
}

#[tokio::test]
async fn a_thirty_file_bundle_is_complete_and_valid() {
    let app = TestApp::spawn().await;
    let staff = app.api(&app.staff("acme"));
    let mut expected = Vec::new();
    let mut ids = Vec::new();
    for n in 0..30 {
        // 30 files, about 12 MiB in all: the archive goes up in S3 multipart parts.
        let bytes = pattern(300_000 + n * 10_007, n);
        let file = upload(
            &staff,
            &format!("cust-{}", n % 3),
            &format!("Document {}", n % 10),
            "document.pdf",
            "application/pdf",
            bytes.clone(),
        )
        .await;
        ids.push(file.id.clone());
        expected.push(sha256(&bytes));
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let id = staff.request_bundle(&ids).await;
    let status = staff.bundle_finished(&id).await;
    assert_eq!(status.status, BundleStatus::Ready, "{status:?}");
    assert_eq!(status.files_done, 30);

    let zip = download(&staff, &id).await;
    unzip_test(&zip);
    let entries = read_zip(&zip);
    assert_eq!(entries.len(), 30);
    for (n, (entry, sha)) in entries.iter().zip(&expected).enumerate() {
        assert_eq!(sha256(&entry.bytes), *sha, "entry {n}");
        // Three of each name: "Document 3.pdf", "Document 3 (2).pdf", "Document 3 (3).pdf".
        let copy = n / 10;
        let expected_name = match copy {
            0 => format!("Document {}.pdf", n % 10),
            _ => format!("Document {} ({}).pdf", n % 10, copy + 1),
        };
        assert_eq!(entry.name, expected_name);
    }
}

#[tokio::test]
async fn another_tenant_gets_404_for_status_and_content() {
    let app = TestApp::spawn().await;
    let acme = app.api(&app.staff("acme"));
    let globex = app.api(&app.staff("globex"));
    let file = upload(
        &acme,
        "cust-1",
        "Contract",
        "contract.pdf",
        "application/pdf",
        pattern(1_000, 1),
    )
    .await;
    let file_id = file.id.as_str();
    let id = acme.request_bundle(&[file_id]).await;
    acme.bundle_finished(&id).await;

    for path in [
        format!("/v1/bundles/{id}"),
        format!("/v1/bundles/{id}/content"),
    ] {
        let response = globex.get(&path).await;
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(error_code(response).await, "not_found");
    }
    // Unknown and malformed ids answer the same.
    let unknown = uuid::Uuid::now_v7();
    for path in [
        format!("/v1/bundles/{unknown}"),
        format!("/v1/bundles/{unknown}/content"),
        "/v1/bundles/not-a-uuid".to_owned(),
    ] {
        assert_eq!(acme.get(&path).await.status(), 404, "{path}");
    }
    // Another tenant's file cannot go into a bundle: like an unknown file.
    let response = globex.post_bundle(&[file_id]).await;
    assert_eq!(response.status(), 404);
    assert_eq!(error_code(response).await, "not_found");
    // Customers and auditors have no bundles.
    let customer = app.api(&app.customer("acme", "cust-1"));
    assert_eq!(customer.post_bundle(&[file_id]).await.status(), 403);
    assert_eq!(
        app.get(&app.auditor("acme"), &format!("/v1/bundles/{id}"))
            .await
            .status(),
        403
    );
    // The owner still gets it.
    assert_eq!(
        acme.get(&format!("/v1/bundles/{id}/content"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn content_before_ready_is_409_bundle_not_ready() {
    let app = TestApp::spawn_with(&[NO_WORKERS]).await;
    let staff = app.api(&app.staff("acme"));
    let file = upload(
        &staff,
        "cust-1",
        "Contract",
        "contract.pdf",
        "application/pdf",
        pattern(1_000, 1),
    )
    .await;
    let id = staff.request_bundle(&[file.id.as_str()]).await;

    // Read your writes: the status shows the request at once.
    let status: Value = staff
        .get(&format!("/v1/bundles/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        status,
        json!({"id": id, "status": "pending", "file_count": 1, "files_done": 0})
    );
    let response = staff.get(&format!("/v1/bundles/{id}/content")).await;
    assert_eq!(response.status(), 409);
    assert_eq!(error_code(response).await, "bundle_not_ready");

    // Once a worker comes, it is built.
    let (stop, worker) = start_zip_worker(&app, ZipWorkerConfig::default());
    let status = staff.bundle_finished(&id).await;
    assert_eq!(status.status, BundleStatus::Ready);
    assert_eq!(
        staff
            .get(&format!("/v1/bundles/{id}/content"))
            .await
            .status(),
        200
    );
    stop.send(true).unwrap();
    worker.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_file_deleted_after_the_request_fails_the_bundle_cleanly() {
    let app = TestApp::spawn_with(&[NO_WORKERS]).await;
    let staff = app.api(&app.staff("acme"));
    let mut ids = Vec::new();
    for n in 0..3 {
        let file = upload(
            &staff,
            "cust-1",
            &format!("File {n}"),
            "file.pdf",
            "application/pdf",
            pattern(50_000, n),
        )
        .await;
        ids.push(file.id.clone());
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let id = staff.request_bundle(&refs).await;
    let deleted = &ids[1];
    assert_eq!(
        app.delete(staff.token(), &format!("/v1/files/{deleted}?confirm=true"))
            .await
            .status(),
        204
    );

    let (stop, worker) = start_zip_worker(&app, ZipWorkerConfig::default());
    let status = staff.bundle_finished(&id).await;
    assert_eq!(status.status, BundleStatus::Failed, "{status:?}");
    let error = status.error.as_deref().unwrap();
    assert!(
        error.contains(deleted.as_str()) && error.contains("deleted"),
        "the error names the deleted file: {error}"
    );
    assert!(status.size.is_none());

    // No archive at all, not a partial one.
    let response = staff.get(&format!("/v1/bundles/{id}/content")).await;
    assert_eq!(response.status(), 409);
    assert_eq!(error_code(response).await, "bundle_not_ready");
    let bundles: Vec<String> = app
        .blob_keys()
        .await
        .into_iter()
        .filter(|key| key.contains("/!bundles/"))
        .collect();
    assert!(bundles.is_empty(), "{bundles:?}");
    stop.send(true).unwrap();
    worker.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_missing_blob_fails_the_bundle_with_a_stable_message_and_no_partial_archive() {
    let app = TestApp::spawn_with(&[NO_WORKERS]).await;
    let staff = app.api(&app.staff("acme"));
    let kept = upload(
        &staff,
        "cust-1",
        "Kept",
        "kept.pdf",
        "application/pdf",
        pattern(20_000, 1),
    )
    .await;
    let lost = upload(
        &staff,
        "cust-1",
        "Lost",
        "lost.pdf",
        "application/pdf",
        pattern(20_000, 2),
    )
    .await;
    let lost_id = lost.id.as_str();
    app.blobs
        .delete(&dossier_domain::BlobKey::from_recorded(format!(
            "acme/cust-1/{lost_id}"
        )))
        .await
        .unwrap();
    let id = staff.request_bundle(&[kept.id.as_str(), lost_id]).await;
    let (stop, worker) = start_zip_worker(&app, ZipWorkerConfig::default());
    let status = staff.bundle_finished(&id).await;
    assert_eq!(status.status, BundleStatus::Failed);
    // A stable sentence for the requester; what the store said is for the log.
    let error = status.error.as_deref().unwrap();
    assert_eq!(error, dossier_workers::zip::UNREADABLE_FILE);
    assert!(
        !error.contains("blob store") && !error.contains("Lost"),
        "{error}"
    );
    assert!(
        !app.blob_keys()
            .await
            .iter()
            .any(|k| k.contains("/!bundles/")),
        "nothing was stored"
    );
    stop.send(true).unwrap();
    worker.await.unwrap().unwrap();
}

#[tokio::test]
async fn progress_is_recorded_while_the_archive_is_built() {
    let app = TestApp::spawn_with(&[NO_WORKERS]).await;
    let staff = app.api(&app.staff("acme"));
    let mut ids = Vec::new();
    for n in 0..5 {
        let file = upload(
            &staff,
            "cust-1",
            &format!("Part {n}"),
            "part.pdf",
            "application/pdf",
            pattern(100_000, n),
        )
        .await;
        ids.push(file.id.clone());
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let id = staff.request_bundle(&refs).await;
    let config = ZipWorkerConfig {
        progress_interval: Duration::ZERO,
        ..ZipWorkerConfig::default()
    };
    let (stop, worker) = start_zip_worker(&app, config);
    assert_eq!(staff.bundle_finished(&id).await.status, BundleStatus::Ready);

    let events = bundle_events(&app, &id).await;
    let progress: Vec<u64> = events
        .iter()
        .filter(|(event_type, _)| event_type == "BundleProgress")
        .map(|(_, payload)| payload["files_done"].as_u64().unwrap())
        .collect();
    assert!(!progress.is_empty(), "{events:?}");
    assert!(
        progress.windows(2).all(|w| w[0] < w[1]),
        "files_done only grows: {progress:?}"
    );
    assert!(progress.iter().all(|&done| (1..=5).contains(&done)));
    assert_eq!(events.last().unwrap().0, "BundleReady");
    stop.send(true).unwrap();
    worker.await.unwrap().unwrap();
}

#[tokio::test]
async fn requests_over_a_limit_are_refused_naming_the_limit() {
    let app = TestApp::spawn_with(&[("DOSSIER_BUNDLE_MAX_BYTES", "1000")]).await;
    let staff = app.api(&app.staff("acme"));
    let mut ids = Vec::new();
    for n in 0..2 {
        let file = upload(
            &staff,
            "cust-1",
            &format!("Half {n}"),
            "half.pdf",
            "application/pdf",
            pattern(600, n),
        )
        .await;
        ids.push(file.id.clone());
    }
    // 1,200 bytes in all, over the limit of 1,000.
    let response = staff.post_bundle(&[&ids[0], &ids[1]]).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "validation_failed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("1000") && message.contains("file_ids"),
        "{message}"
    );
    // One file is within it (and the same id twice is one entry).
    staff.request_bundle(&[&ids[0], &ids[0]]).await;

    // 1,001 files: over the contract's 1,000.
    let many: Vec<String> = (0..1001)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let response = staff.post_bundle(&many).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "validation_failed");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("1000"),
        "{body}"
    );

    for body in [
        json!({"file_ids": []}),
        json!({"file_ids": ["not-a-uuid"]}),
        json!({}),
    ] {
        let response = staff
            .send_json(Method::POST, "/v1/bundles", body.clone())
            .await;
        assert_eq!(response.status(), 422, "{body}");
        assert_eq!(error_code(response).await, "validation_failed");
    }
    // An unknown file: like any unknown id.
    let unknown = uuid::Uuid::now_v7().to_string();
    let response = staff.post_bundle(&[&ids[0], &unknown]).await;
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn bundles_expire_and_the_worker_removes_their_archives() {
    let app = TestApp::spawn_with(&[("DOSSIER_BUNDLE_TTL_SECS", "2")]).await;
    let staff = app.api(&app.staff("acme"));
    let file = upload(
        &staff,
        "cust-1",
        "Contract",
        "contract.pdf",
        "application/pdf",
        pattern(1_000, 1),
    )
    .await;
    let id = staff.request_bundle(&[file.id.as_str()]).await;
    let status = staff.bundle_finished(&id).await;
    assert_eq!(status.status, BundleStatus::Ready);
    let expires_at: DateTime<Utc> = status.expires_at.unwrap();
    assert!(expires_at > Utc::now() && expires_at <= Utc::now() + chrono::Duration::seconds(3));
    let archive = format!("acme/!bundles/{id}.zip");
    assert!(app.blob_keys().await.contains(&archive));

    // After its TTL the bundle is gone: 404, and the worker removed the archive.
    Wait::new(format!("bundle {id} to expire"))
        .timeout(Duration::from_secs(30))
        .interval(Duration::from_millis(200))
        .expect(async || {
            let status = staff.get(&format!("/v1/bundles/{id}")).await.status();
            let stored = app.blob_keys().await.contains(&archive);
            let expired = bundle_events(&app, &id)
                .await
                .iter()
                .any(|(event_type, _)| event_type == "BundleExpired");
            if status == 404 && !stored && expired {
                Ok(())
            } else {
                Err(format!(
                    "status {status}, archive stored: {stored}, BundleExpired: {expired}"
                ))
            }
        })
        .await;
    assert_eq!(
        staff
            .get(&format!("/v1/bundles/{id}/content"))
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn a_file_deleted_after_the_bundle_was_built_never_leaves_through_it() {
    let app = TestApp::spawn().await;
    let staff = app.api(&app.staff("acme"));
    let file = upload(
        &staff,
        "cust-1",
        "Contract",
        "contract.pdf",
        "application/pdf",
        pattern(1_000, 1),
    )
    .await;
    let file_id = file.id.as_str();
    let id = staff.request_bundle(&[file_id]).await;
    assert_eq!(staff.bundle_finished(&id).await.status, BundleStatus::Ready);
    assert_eq!(
        app.delete(staff.token(), &format!("/v1/files/{file_id}?confirm=true"))
            .await
            .status(),
        204
    );
    let response = staff.get(&format!("/v1/bundles/{id}/content")).await;
    assert_eq!(response.status(), 404);
}

/// `dossier serve --role workers` as a child process on the test's database,
/// vhost and bucket.
fn spawn_worker_process(app: &TestApp, log: &std::path::Path) -> ServeProcess {
    app.serve_command(env!("CARGO_BIN_EXE_dossier-serve"), [] as [&str; 0])
        .roles("workers")
        .env("RUST_LOG", "info")
        .log_to(log)
        .unwrap()
        .spawn()
        .expect("the dossier-serve binary starts")
}

/// The zip worker's queue as the broker sees it now: messages ready for a
/// consumer, and consumers.
async fn zip_queue(app: &TestApp) -> (u32, u32) {
    let connection = lapin::Connection::connect(app.vhost.url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare(ZIP_QUEUE.into(), passive, FieldTable::default())
        .await
        .unwrap();
    let _ = connection.close(200, "looked".into()).await;
    (queue.message_count(), queue.consumer_count())
}

/// The peak resident set size of a live process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Uploads `count` files of `size` bytes ("Scan 0.pdf", …) and requests their
/// bundle; answers the bundle id and each file's SHA-256.
async fn scans_bundle(api: &Client, count: usize, size: usize) -> (String, Vec<String>) {
    let mut ids = Vec::new();
    let mut expected = Vec::new();
    for n in 0..count {
        let bytes = pattern(size, n);
        expected.push(sha256(&bytes));
        let file = upload(
            api,
            "cust-1",
            &format!("Scan {n}"),
            "scan.pdf",
            "application/pdf",
            bytes,
        )
        .await;
        ids.push(file.id.clone());
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    (api.request_bundle(&refs).await, expected)
}

/// Downloads the bundle and checks every entry against `expected`.
async fn assert_scans(api: &Client, id: &str, expected: &[String]) {
    let zip = download(api, id).await;
    unzip_test(&zip);
    let entries = read_zip(&zip);
    assert_eq!(entries.len(), expected.len());
    for (n, (entry, sha)) in entries.iter().zip(expected).enumerate() {
        assert_eq!(entry.name, format!("Scan {n}.pdf"));
        assert_eq!(sha256(&entry.bytes), *sha, "entry {n}");
    }
}

#[tokio::test]
async fn a_worker_killed_mid_bundle_leaves_it_to_another_that_finishes_it() {
    let app = TestApp::spawn_with(&[NO_WORKERS]).await;
    let staff = app.api(&app.staff("acme"));
    // 8 files of 6 MiB: long enough to build that the first worker dies in the
    // middle, big enough for S3 multipart parts.
    let (id, expected) = scans_bundle(&staff, 8, 6 * 1024 * 1024).await;

    let logs = std::env::temp_dir().join(format!("dossier-zip-kill-{id}"));
    std::fs::create_dir_all(&logs).unwrap();
    let mut first = spawn_worker_process(&app, &logs.join("first.log"));
    // Kill it as soon as it has recorded progress: in the middle of the archive.
    let status = staff
        .bundle_until(&id, Duration::from_secs(180), |status| {
            status.files_done >= 1 || status.status != BundleStatus::Pending
        })
        .await;
    first.kill().await; // SIGKILL: no shutdown, no nack, no cleanup
    assert_eq!(
        status.status,
        BundleStatus::Pending,
        "the first worker must be killed mid-bundle (log in {logs:?}): {status:?}"
    );
    let done_at_kill = status.files_done;
    assert!(done_at_kill < 8, "{status:?}");
    // The broker saw the worker go: the job is back in the queue and nobody
    // consumes it, so nothing can be finishing the bundle behind our back.
    eventually(
        "the killed worker's job back in the zip queue, unconsumed",
        async || {
            let (ready, consumers) = zip_queue(&app).await;
            if ready == 1 && consumers == 0 {
                Ok(())
            } else {
                Err(format!("{ready} ready, {consumers} consumers"))
            }
        },
    )
    .await;
    let status: Value = staff
        .get(&format!("/v1/bundles/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "pending", "nothing finished it: {status}");
    assert_eq!(
        staff
            .get(&format!("/v1/bundles/{id}/content"))
            .await
            .status(),
        409
    );

    let mut second = spawn_worker_process(&app, &logs.join("second.log"));
    let status = staff
        .bundle_until(&id, Duration::from_secs(300), |status| {
            status.status != BundleStatus::Pending
        })
        .await;
    second.kill().await;
    assert_eq!(
        status.status,
        BundleStatus::Ready,
        "(log in {logs:?}): {status:?}"
    );
    assert_scans(&staff, &id, &expected).await;
    let events = bundle_events(&app, &id).await;
    assert_eq!(
        events.iter().filter(|(t, _)| t == "BundleReady").count(),
        1,
        "ready once"
    );
    let _ = std::fs::remove_dir_all(&logs);
}

/// The figure for the notes: peak RSS (VmHWM) of a worker process (every worker
/// role, debug build) idle, after a 20 MiB bundle and after a 200 MiB one. Run with
/// `cargo test -p dossier-tests --test bundles peak_rss -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "uploads and bundles 220 MiB; run on purpose for the memory figure"]
async fn peak_rss_of_a_worker_process_does_not_grow_with_the_bundle() {
    let app = TestApp::spawn_with(&[NO_WORKERS]).await;
    let staff = app.api(&app.staff("acme"));
    let logs = std::env::temp_dir().join(format!("dossier-zip-rss-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&logs).unwrap();
    let mut worker = spawn_worker_process(&app, &logs.join("worker.log"));
    // Idle means started and waiting for work: consuming the zip queue.
    eventually("the worker process consuming the zip queue", async || {
        zip_queue(&app).await.1 >= 1
    })
    .await;
    let idle = peak_rss_kib(worker.pid());

    let mut figures = Vec::new();
    for (count, size) in [(2, 10 * 1024 * 1024), (8, 25 * 1024 * 1024)] {
        let (id, expected) = scans_bundle(&staff, count, size).await;
        let started = Instant::now();
        let status = staff
            .bundle_until(&id, Duration::from_secs(600), |status| {
                status.status != BundleStatus::Pending
            })
            .await;
        let elapsed = started.elapsed();
        assert_eq!(
            status.status,
            BundleStatus::Ready,
            "(log in {logs:?}): {status:?}"
        );
        figures.push((count * size, elapsed, peak_rss_kib(worker.pid())));
        assert_scans(&staff, &id, &expected).await;
    }
    worker.kill().await;
    eprintln!("zip worker process (debug build), peak RSS (VmHWM): idle {idle:?} KiB");
    for (bytes, elapsed, peak) in &figures {
        eprintln!(
            "  after a {} MiB bundle (built in {elapsed:?}): {peak:?} KiB",
            bytes / (1024 * 1024)
        );
    }
    let (small, large) = (figures[0].2.unwrap(), figures[1].2.unwrap());
    assert!(
        large < small + 16 * 1024,
        "the peak grew from {small} KiB to {large} KiB with the bundle"
    );
    let _ = std::fs::remove_dir_all(&logs);
}

/// The real blob store, with the reads of one tenant's files held until the
/// test lets them go: that tenant's bundles stay in the zip worker, building.
struct HeldReads {
    inner: std::sync::Arc<dyn dossier_blobstore::BlobStore>,
    held_prefix: String,
    released: watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl dossier_blobstore::BlobStore for HeldReads {
    async fn put_sized(
        &self,
        key: &dossier_domain::BlobKey,
        body: dossier_blobstore::ByteStream,
        length: dossier_blobstore::BodyLength,
    ) -> Result<dossier_blobstore::StoredBlob, dossier_blobstore::BlobError> {
        self.inner.put_sized(key, body, length).await
    }

    async fn get(
        &self,
        key: &dossier_domain::BlobKey,
    ) -> Result<dossier_blobstore::BlobObject, dossier_blobstore::BlobError> {
        if key.as_str().starts_with(&self.held_prefix) {
            let mut released = self.released.clone();
            let _ = released.wait_for(|released| *released).await;
        }
        self.inner.get(key).await
    }

    async fn delete(
        &self,
        key: &dossier_domain::BlobKey,
    ) -> Result<(), dossier_blobstore::BlobError> {
        self.inner.delete(key).await
    }

    async fn exists(
        &self,
        key: &dossier_domain::BlobKey,
    ) -> Result<bool, dossier_blobstore::BlobError> {
        self.inner.exists(key).await
    }

    fn list<'a>(&'a self, prefix: &'a str) -> dossier_blobstore::BlobListStream<'a> {
        self.inner.list(prefix)
    }

    async fn check(&self) -> Result<(), dossier_blobstore::BlobError> {
        self.inner.check().await
    }

    fn describe(&self) -> String {
        format!(
            "{} (reads of {}* held)",
            self.inner.describe(),
            self.held_prefix
        )
    }
}

#[tokio::test]
async fn a_tenant_at_its_pending_bound_gets_429_while_another_tenants_bundle_is_built() {
    const BOUND: u32 = 2;
    let app =
        TestApp::spawn_with(&[NO_WORKERS, ("DOSSIER_MAX_PENDING_BUNDLES_PER_TENANT", "2")]).await;
    let busy = app.api(&app.staff("busy"));
    let other = app.api(&app.staff("other"));
    let mut busy_files = Vec::new();
    for n in 0..3 {
        let file = upload(
            &busy,
            "cust-1",
            &format!("Large {n}"),
            "large.pdf",
            "application/pdf",
            pattern(10_000, n),
        )
        .await;
        busy_files.push(file.id);
    }
    let other_file = upload(
        &other,
        "cust-9",
        "Small",
        "small.pdf",
        "application/pdf",
        pattern(1_000, 9),
    )
    .await;

    // The busy tenant's builds hang in the zip worker (its reads are held),
    // which runs exactly as `dossier serve` configures it for this bound.
    let (release, released) = watch::channel(false);
    let blobs: std::sync::Arc<dyn dossier_blobstore::BlobStore> = std::sync::Arc::new(HeldReads {
        inner: app.sealed_blobs.clone(),
        held_prefix: "busy/".to_owned(),
        released,
    });
    let config = ZipWorkerConfig::default().with_pending_bound(BOUND);
    assert!(config.prefetch > BOUND as u16, "{config:?}");
    let broker = Broker::new(app.vhost.url()).unwrap();
    let (stop, stopping) = watch::channel(false);
    let worker = tokio::spawn(dossier_workers::zip::run(
        app.pool.clone(),
        broker,
        blobs,
        config,
        stopping,
    ));

    let first = busy.request_bundle(&[busy_files[0].as_str()]).await;
    let second = busy.request_bundle(&[busy_files[1].as_str()]).await;
    let refused = busy.post_bundle(&[busy_files[2].as_str()]).await;
    assert_eq!(refused.status(), 429);
    let retry_after = refused
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    assert!(retry_after.is_some_and(|secs| secs > 0), "{retry_after:?}");
    assert_eq!(error_code(refused).await, "too_many_pending_bundles");

    // Another tenant is not held up: its bundle is built beside them.
    let ready = other.bundle(&[other_file.id.as_str()]).await;
    assert_eq!(ready.status, BundleStatus::Ready);
    for id in [&first, &second] {
        assert_eq!(
            busy.bundle_status(id).await.status,
            BundleStatus::Pending,
            "{id} is still being built"
        );
    }

    // Once the busy tenant's bundles are done, it may ask again.
    release.send(true).unwrap();
    for id in [&first, &second] {
        assert_eq!(busy.bundle_finished(id).await.status, BundleStatus::Ready);
    }
    busy.request_bundle(&[busy_files[2].as_str()]).await;

    stop.send(true).unwrap();
    worker.await.unwrap().unwrap();
}
