//! `Idempotency-Key` on HTTP commands (CONTRACT.md "Idempotent requests",
//! ADR 0016): one key, one effect, the first answer again; also after the
//! server was killed between recording a command and answering it.

use std::time::Duration;

use dossier_test_support::wait::eventually;
use dossier_test_support::{AppServer, TestApp, error_code, s3_store, settings};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use uuid::Uuid;

fn form(name: &str, bytes: &[u8]) -> Form {
    Form::new()
        .part(
            "file",
            Part::bytes(bytes.to_vec())
                .file_name("invoice.pdf")
                .mime_str("application/pdf")
                .unwrap(),
        )
        .text("name", name.to_owned())
}

async fn upload(
    client: &reqwest::Client,
    address: &str,
    token: &str,
    key: Option<&str>,
    name: &str,
    bytes: &[u8],
) -> reqwest::Response {
    let mut request = client
        .post(format!("{address}/v1/customers/cust-1/files"))
        .bearer_auth(token)
        .multipart(form(name, bytes));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.expect("the request is answered")
}

async fn count(pool: &dossier_eventlog::db::Pool, sql: &str) -> i64 {
    pool.get()
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

async fn uploaded_events(pool: &dossier_eventlog::db::Pool) -> i64 {
    count(
        pool,
        "SELECT count(*) FROM events WHERE event_type = 'FileUploaded'",
    )
    .await
}

#[tokio::test]
async fn the_same_upload_twice_with_one_key_stores_one_file_and_answers_identically() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let bytes = b"%PDF-1.7 invoice".to_vec();
    let first = upload(
        &app.client,
        &app.address,
        &staff,
        Some("k-1"),
        "Invoice",
        &bytes,
    )
    .await;
    assert_eq!(first.status(), 201);
    let first_type = first.headers()["content-type"].clone();
    let first_body = first.bytes().await.unwrap();
    let second = upload(
        &app.client,
        &app.address,
        &staff,
        Some("k-1"),
        "Invoice",
        &bytes,
    )
    .await;
    assert_eq!(second.status(), 201);
    assert_eq!(second.headers()["content-type"], first_type);
    assert_eq!(
        second.bytes().await.unwrap(),
        first_body,
        "the first answer, byte for byte"
    );

    assert_eq!(uploaded_events(&app.pool).await, 1);
    let files = app.api(&staff).list_all("cust-1", "").await;
    assert_eq!(files.len(), 1);
    // The repeat's bytes were only hashed: one blob, the file's.
    eventually("one blob is left", async || {
        let keys = app.blob_keys().await;
        if keys.len() == 1 {
            Ok(())
        } else {
            Err(format!("{keys:?}"))
        }
    })
    .await;
    // Without a key, the same upload is a new one.
    let third = upload(&app.client, &app.address, &staff, None, "Invoice", &bytes).await;
    assert_eq!(third.status(), 201);
    assert_eq!(uploaded_events(&app.pool).await, 2);
}

#[tokio::test]
async fn a_reused_key_with_other_bytes_or_fields_answers_422_and_stores_nothing() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let first = upload(
        &app.client,
        &app.address,
        &staff,
        Some("k-2"),
        "Invoice",
        b"one",
    )
    .await;
    assert_eq!(first.status(), 201);

    let other_bytes = upload(
        &app.client,
        &app.address,
        &staff,
        Some("k-2"),
        "Invoice",
        b"two",
    )
    .await;
    assert_eq!(other_bytes.status(), 422);
    assert_eq!(error_code(other_bytes).await, "idempotency_key_reused");
    let other_name = upload(
        &app.client,
        &app.address,
        &staff,
        Some("k-2"),
        "Other",
        b"one",
    )
    .await;
    assert_eq!(other_name.status(), 422);
    assert_eq!(error_code(other_name).await, "idempotency_key_reused");
    // Another path with the same key.
    let other_path = app
        .client
        .post(app.url("/v1/customers/cust-2/files"))
        .bearer_auth(&staff)
        .header("Idempotency-Key", "k-2")
        .multipart(form("Invoice", b"one"))
        .send()
        .await
        .unwrap();
    assert_eq!(other_path.status(), 422);
    assert_eq!(error_code(other_path).await, "idempotency_key_reused");

    assert_eq!(uploaded_events(&app.pool).await, 1);
    eventually("only the first upload's blob is left", async || {
        let keys = app.blob_keys().await;
        if keys.len() == 1 {
            Ok(())
        } else {
            Err(format!("{keys:?}"))
        }
    })
    .await;
}

#[tokio::test]
async fn concurrent_requests_with_one_key_have_one_effect() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let bytes = vec![7u8; 512 * 1024];
    let sends = (0..6).map(|_| {
        upload(
            &app.client,
            &app.address,
            &staff,
            Some("k-3"),
            "Scan",
            &bytes,
        )
    });
    let answers = futures::future::join_all(sends).await;
    let mut created = Vec::new();
    for answer in answers {
        match answer.status().as_u16() {
            201 => created.push(answer.bytes().await.unwrap()),
            409 => {
                assert!(
                    answer.headers().contains_key("retry-after"),
                    "409 has Retry-After"
                );
                assert_eq!(error_code(answer).await, "conflict");
            }
            other => panic!("unexpected answer {other}"),
        }
    }
    assert!(!created.is_empty(), "one request ran");
    assert!(
        created.windows(2).all(|w| w[0] == w[1]),
        "every 201 is the first answer"
    );
    assert_eq!(uploaded_events(&app.pool).await, 1);

    // Once the first has answered, a retry gets its answer.
    let retry = upload(
        &app.client,
        &app.address,
        &staff,
        Some("k-3"),
        "Scan",
        &bytes,
    )
    .await;
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.bytes().await.unwrap(), created[0]);
    assert_eq!(uploaded_events(&app.pool).await, 1);
}

#[tokio::test]
async fn an_expired_key_is_a_new_request_and_the_sweep_removes_it() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let first = upload(
        &app.client,
        &app.address,
        &staff,
        Some("k-4"),
        "Invoice",
        b"one",
    )
    .await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let client = app.pool.get().await.unwrap();
    client
        .execute(
            "UPDATE http_idempotency SET expires_at = now() - interval '1 second', \
                 created_at = now() - interval '25 hours'",
            &[],
        )
        .await
        .unwrap();
    let second = upload(
        &app.client,
        &app.address,
        &staff,
        Some("k-4"),
        "Invoice",
        b"one",
    )
    .await;
    assert_eq!(second.status(), 201);
    let second: Value = second.json().await.unwrap();
    assert_ne!(first["id"], second["id"], "a new request, a new file");
    assert_eq!(uploaded_events(&app.pool).await, 2);

    // The retention sweep deletes expired keys and old receipts.
    client
        .execute(
            "UPDATE http_idempotency SET expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE command_receipts SET recorded_at = now() - interval '25 hours'",
            &[],
        )
        .await
        .unwrap();
    let swept =
        dossier_eventlog::idempotency::sweep(&app.pool, dossier_eventlog::idempotency::RETENTION)
            .await
            .unwrap();
    assert_eq!((swept.keys, swept.receipts), (1, 1));
    assert_eq!(
        count(&app.pool, "SELECT count(*) FROM http_idempotency").await,
        0
    );
}

#[tokio::test]
async fn keys_are_checked_and_scoped_to_the_user() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let other = app.token("acme", dossier_api::auth::jwt::Role::Staff, "staff-2", None);
    let bad = upload(
        &app.client,
        &app.address,
        &staff,
        Some("has space"),
        "A",
        b"a",
    )
    .await;
    assert_eq!(bad.status(), 422);
    assert_eq!(error_code(bad).await, "validation_failed");
    let long = "x".repeat(256);
    let bad = upload(&app.client, &app.address, &staff, Some(&long), "A", b"a").await;
    assert_eq!(bad.status(), 422);
    assert_eq!(uploaded_events(&app.pool).await, 0);

    let mine = upload(&app.client, &app.address, &staff, Some("shared"), "A", b"a").await;
    assert_eq!(mine.status(), 201);
    // Another user's same key (and another request) is theirs.
    let theirs = upload(&app.client, &app.address, &other, Some("shared"), "B", b"b").await;
    assert_eq!(theirs.status(), 201);
    assert_eq!(uploaded_events(&app.pool).await, 2);
}

#[tokio::test]
async fn json_commands_repeat_their_first_answer_and_refuse_another_body() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let create = async |key: &str, title: &str| {
        app.client
            .post(app.url("/v1/customers/cust-1/tasks"))
            .bearer_auth(&staff)
            .header("Idempotency-Key", key)
            .json(&json!({"title": title}))
            .send()
            .await
            .unwrap()
    };
    let first = create("t-1", "Send your statements").await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let second = create("t-1", "Send your statements").await;
    assert_eq!(second.status(), 201);
    assert_eq!(second.json::<Value>().await.unwrap(), first);
    let tasks = count(
        &app.pool,
        "SELECT count(*) FROM events WHERE event_type = 'TaskCreated'",
    )
    .await;
    assert_eq!(tasks, 1);
    let reused = create("t-1", "Another title").await;
    assert_eq!(reused.status(), 422);
    assert_eq!(error_code(reused).await, "idempotency_key_reused");

    // A refusal is an answer too: repeated, not run again.
    let file = app
        .upload_ok(&staff, "cust-1", "Doc", b"doc".to_vec())
        .await;
    let id = file["id"].as_str().unwrap();
    let delete = async || {
        app.client
            .delete(app.url(&format!("/v1/files/{id}")))
            .bearer_auth(&staff)
            .header("Idempotency-Key", "d-1")
            .send()
            .await
            .unwrap()
    };
    assert_eq!(delete().await.status(), 422, "confirmation_required");
    assert_eq!(delete().await.status(), 422);
}

/// A token of tenant `acme` for an hour, for the tests that start servers of
/// their own.
fn acme_token(role: dossier_api::auth::jwt::Role, sub: &str, customer: Option<&str>) -> String {
    dossier_test_support::token("acme", role, sub, customer, Duration::from_secs(3600))
}

/// For the tests that start servers of their own: tracing, a fresh database
/// (its pool and URL) and the name of a bucket of their own.
async fn fresh_stage() -> (dossier_eventlog::db::Pool, String, String) {
    dossier_runtime::telemetry::init_test_tracing();
    let (pool, database_url) = dossier_test_support::db::fresh_database()
        .await
        .expect("a fresh test database");
    (pool, database_url, format!("t-{}", Uuid::new_v4().simple()))
}

/// A `dossier-serve` of the API alone (no projections) on `database_url`
/// and `bucket`, ready, and its address: it records a command and then waits
/// ten minutes for read models that never catch up, so a kill while it waits
/// is certainly between recording and answering.
async fn server_stuck_after_recording(
    client: &reqwest::Client,
    database_url: &str,
    bucket: &str,
) -> (dossier_test_support::process::ServeProcess, String) {
    let s3 = dossier_test_support::s3_server();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("http://127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("idempotency-kill-{port}.log"));
    let server = dossier_test_support::process::ServeCommand::new(
        env!("CARGO_BIN_EXE_dossier-serve"),
        [] as [&str; 0],
    )
    .database(database_url)
    .s3_bucket(&s3.endpoint, &s3.access_key, &s3.secret_key, bucket)
    .roles("api")
    .http_addr(&format!("127.0.0.1:{port}"))
    .env("DOSSIER_FRESHNESS_TIMEOUT_MS", "600000")
    .log_to(&log)
    .unwrap()
    .spawn()
    .expect("dossier-serve starts");
    dossier_test_support::wait_until_ready(client, &address, Duration::from_secs(60))
        .await
        .expect("the server is ready");
    (server, address)
}

/// Waits until `server` recorded one file, kills it (`kill -9`), checks that
/// the request it was serving got no answer, and gives the file's id.
async fn kill_once_a_file_is_recorded(
    pool: &dossier_eventlog::db::Pool,
    server: &mut dossier_test_support::process::ServeProcess,
    pending: tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) -> String {
    eventually("a file is recorded", async || {
        match uploaded_events(pool).await {
            1 => Ok(()),
            n => Err(format!("{n} uploads")),
        }
    })
    .await;
    server.kill().await;
    assert!(pending.await.unwrap().is_err(), "the request got no answer");
    pool.get()
        .await
        .unwrap()
        .query_one(
            "SELECT aggregate_id FROM events WHERE event_type = 'FileUploaded'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A Dossier killed (`kill -9`) after it recorded an upload and before it
/// answered: the retry with the key answers the recorded file, and there is
/// still one file. The first server runs the API without projections and
/// waits long for read models that never catch up, so it is certainly
/// between the two when it is killed.
#[tokio::test]
async fn a_server_killed_between_recording_and_answering_answers_the_recorded_file_on_retry() {
    let (pool, database_url, bucket) = fresh_stage().await;
    let blobs = s3_store(&bucket).await;
    let client = reqwest::Client::new();
    let (mut first, address) = server_stuck_after_recording(&client, &database_url, &bucket).await;

    let staff = acme_token(dossier_api::auth::jwt::Role::Staff, "staff-1", None);
    let bytes = b"%PDF-1.7 the only copy".to_vec();
    let pending = tokio::spawn({
        let (client, address, staff, bytes) = (
            client.clone(),
            address.clone(),
            staff.clone(),
            bytes.clone(),
        );
        async move {
            client
                .post(format!("{address}/v1/customers/cust-1/files"))
                .bearer_auth(&staff)
                .header("Idempotency-Key", "crash-1")
                .multipart(form("Only copy", &bytes))
                .send()
                .await
        }
    });
    let file_id = kill_once_a_file_is_recorded(&pool, &mut first, pending).await;

    let mut second = AppServer::start(
        settings(&database_url, &[("DOSSIER_ROLES", "api,projections")]),
        blobs,
    )
    .await
    .expect("the second server starts");
    let retry = upload(
        &client,
        &second.address,
        &staff,
        Some("crash-1"),
        "Only copy",
        &bytes,
    )
    .await;
    assert_eq!(retry.status(), 201);
    let body: Value = retry.json().await.unwrap();
    assert_eq!(body["id"], file_id.as_str(), "the recorded file");
    assert_eq!(body["name"], "Only copy");
    assert_eq!(uploaded_events(&pool).await, 1, "no second copy");
    // Again, the same.
    let again = upload(
        &client,
        &second.address,
        &staff,
        Some("crash-1"),
        "Only copy",
        &bytes,
    )
    .await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], file_id.as_str());
    // Other bytes under the key are still another request.
    let other = upload(
        &client,
        &second.address,
        &staff,
        Some("crash-1"),
        "Only copy",
        b"x",
    )
    .await;
    assert_eq!(other.status(), 422);
    assert_eq!(uploaded_events(&pool).await, 1);
    second.stop().await.unwrap();
}

/// `POST /v1/portal/tasks/{task_id}/messages` with the text "January" and a
/// file of `bytes`, under the key `crash-m`.
async fn message_with_file(
    client: &reqwest::Client,
    address: &str,
    customer: &str,
    task_id: &str,
    bytes: &'static [u8],
) -> reqwest::Result<reqwest::Response> {
    let form = Form::new().text("text", "January").part(
        "file",
        Part::bytes(bytes)
            .file_name("statement.pdf")
            .mime_str("application/pdf")
            .unwrap(),
    );
    client
        .post(format!("{address}/v1/portal/tasks/{task_id}/messages"))
        .bearer_auth(customer)
        .header("Idempotency-Key", "crash-m")
        .multipart(form)
        .send()
        .await
}

/// A Dossier killed between the two commands of a message with a file (the
/// file recorded, the message not): the retry with the key gives the
/// recorded file to the message instead of recording the bytes again, and
/// other bytes under the key are another request. The first server runs the
/// API without projections, so it waits long after recording the file.
#[tokio::test]
async fn a_message_killed_between_its_file_and_its_text_keeps_one_file_on_retry() {
    let (pool, database_url, bucket) = fresh_stage().await;
    let staff = acme_token(dossier_api::auth::jwt::Role::Staff, "staff-1", None);
    let customer = acme_token(
        dossier_api::auth::jwt::Role::Customer,
        "customer-1",
        Some("cust-1"),
    );
    let client = reqwest::Client::new();
    let serving = async |roles: &str| {
        AppServer::start(
            settings(&database_url, &[("DOSSIER_ROLES", roles)]),
            s3_store(&bucket).await,
        )
        .await
        .expect("a server starts")
    };
    // The task, on a whole server.
    let mut setup = serving("api,projections").await;
    let task = dossier_test_support::client::Client::new(client.clone(), &setup.address, &staff)
        .create_task("cust-1", "Send your statements")
        .await;
    setup.stop().await.unwrap();
    let task_id = task["id"].as_str().expect("a task id").to_owned();
    let (mut first, address) = server_stuck_after_recording(&client, &database_url, &bucket).await;
    let pending = tokio::spawn({
        let (client, address, customer, task_id) = (
            client.clone(),
            address.clone(),
            customer.clone(),
            task_id.clone(),
        );
        async move { message_with_file(&client, &address, &customer, &task_id, b"statement").await }
    });
    let file_id = kill_once_a_file_is_recorded(&pool, &mut first, pending).await;
    let messages = "SELECT count(*) FROM events WHERE event_type = 'TaskMessagePosted'";
    assert_eq!(count(&pool, messages).await, 0, "killed before the message");

    // The dead process's lease runs out (as 30 s later).
    let mut second = serving("api,projections").await;
    execute(&pool, "UPDATE http_idempotency SET lease_until = now()").await;
    let retry = message_with_file(&client, &second.address, &customer, &task_id, b"statement")
        .await
        .unwrap();
    assert_eq!(retry.status(), 201);
    let body: Value = retry.json().await.unwrap();
    assert_eq!(body["file_id"], file_id.as_str(), "the recorded file");
    assert_eq!(body["text"], "January");
    assert_eq!(uploaded_events(&pool).await, 1, "no second copy");
    assert_eq!(count(&pool, messages).await, 1);

    // The same state again (the message's receipt gone, its claim open and
    // abandoned), retried with other bytes: another request.
    execute(
        &pool,
        "UPDATE http_idempotency SET state = 'in_flight', status = NULL, body = NULL, \
             headers = NULL, lease_until = now()",
    )
    .await;
    execute(
        &pool,
        "DELETE FROM command_receipts WHERE idempotency_key NOT LIKE '%#file'",
    )
    .await;
    let other = message_with_file(
        &client,
        &second.address,
        &customer,
        &task_id,
        b"another statement",
    )
    .await
    .unwrap();
    assert_eq!(other.status(), 422);
    assert_eq!(error_code(other).await, "idempotency_key_reused");
    assert_eq!(uploaded_events(&pool).await, 1);
    assert_eq!(count(&pool, messages).await, 1);
    second.stop().await.unwrap();
}

async fn execute(pool: &dossier_eventlog::db::Pool, sql: &str) {
    pool.get().await.unwrap().execute(sql, &[]).await.unwrap();
}

/// The three states of a key whose first request has no stored answer: its
/// command recorded (answered from the receipt), still running (409), and
/// abandoned without a record (taken over once its lease ran out).
#[tokio::test]
async fn a_claim_without_an_answer_is_answered_from_its_receipt_waited_for_or_taken_over() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let first = upload(
        &app.client,
        &app.address,
        &staff,
        Some("k-5"),
        "Invoice",
        b"one",
    )
    .await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();

    // Recorded, not answered (as after a crash): the receipt answers.
    execute(
        &app.pool,
        "UPDATE http_idempotency SET state = 'in_flight', status = NULL, body = NULL, \
             headers = NULL, lease_until = now() + interval '30 seconds'",
    )
    .await;
    let again = upload(
        &app.client,
        &app.address,
        &staff,
        Some("k-5"),
        "Invoice",
        b"one",
    )
    .await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);

    // Nothing recorded yet and the lease running: 409 with Retry-After.
    execute(&app.pool, "DELETE FROM command_receipts").await;
    let busy = upload(
        &app.client,
        &app.address,
        &staff,
        Some("k-5"),
        "Invoice",
        b"one",
    )
    .await;
    assert_eq!(busy.status(), 409);
    let retry_after: u64 = busy.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(error_code(busy).await, "conflict");

    // The lease ran out and nothing was recorded: the retry runs.
    execute(
        &app.pool,
        "UPDATE http_idempotency SET lease_until = now() - interval '1 second'",
    )
    .await;
    let taken = upload(
        &app.client,
        &app.address,
        &staff,
        Some("k-5"),
        "Invoice",
        b"one",
    )
    .await;
    assert_eq!(taken.status(), 201);
    assert_ne!(taken.json::<Value>().await.unwrap()["id"], first["id"]);
    assert_eq!(uploaded_events(&app.pool).await, 2);
}

/// A message with a file is two commands (the file, then the message); the
/// key goes with the last, and a repeat records neither again.
#[tokio::test]
async fn a_repeated_portal_message_with_a_file_records_one_message_and_one_file() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let task = app
        .create_task(&staff, "cust-1", "Send your statements")
        .await;
    let task_id = task["id"].as_str().unwrap();
    let customer = app.customer("acme", "cust-1");
    let send = async |text: &str| {
        app.client
            .post(app.url(&format!("/v1/portal/tasks/{task_id}/messages")))
            .bearer_auth(&customer)
            .header("Idempotency-Key", "m-1")
            .multipart(
                Form::new().text("text", text.to_owned()).part(
                    "file",
                    Part::bytes(b"statement".to_vec())
                        .file_name("statement.pdf")
                        .mime_str("application/pdf")
                        .unwrap(),
                ),
            )
            .send()
            .await
            .unwrap()
    };
    let first = send("January").await;
    assert_eq!(first.status(), 201);
    let first = first.bytes().await.unwrap();
    let second = send("January").await;
    assert_eq!(second.status(), 201);
    assert_eq!(second.bytes().await.unwrap(), first);
    let reused = send("February").await;
    assert_eq!(reused.status(), 422);
    assert_eq!(error_code(reused).await, "idempotency_key_reused");
    let messages = count(
        &app.pool,
        "SELECT count(*) FROM events WHERE event_type = 'TaskMessagePosted'",
    )
    .await;
    assert_eq!((messages, uploaded_events(&app.pool).await), (1, 1));

    // Recorded, not answered: the message is rebuilt from its receipt.
    execute(
        &app.pool,
        "UPDATE http_idempotency SET state = 'in_flight', status = NULL, body = NULL, headers = NULL",
    )
    .await;
    let rebuilt = send("January").await;
    assert_eq!(rebuilt.status(), 201);
    let rebuilt: Value = rebuilt.json().await.unwrap();
    let first: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(rebuilt, first);
}

#[tokio::test]
async fn the_openapi_document_declares_the_header_on_every_command() {
    let app = TestApp::spawn().await;
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut commands = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["post", "put", "patch", "delete"] {
            let Some(operation) = item.get(method) else {
                continue;
            };
            commands += 1;
            let declared = operation["parameters"].as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header")
            });
            assert!(declared, "{method} {path} declares Idempotency-Key");
        }
    }
    assert!(commands >= 12, "{commands} commands");
}
