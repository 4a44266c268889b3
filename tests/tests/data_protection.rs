//! CONTRACT.md, "Data protection": personal fields are stored sealed under
//! their owner's key, readers open them, a delete destroys the file's key in
//! its own transaction, and the hash chain still verifies afterwards. Real
//! Postgres, RabbitMQ and S3, over real HTTP.

use dossier_eventlog::chain::{self, Sealer};
use dossier_test_support::TestApp;
use dossier_test_support::wait::eventually;
use reqwest::Method;
use reqwest::multipart::Form;
use serde_json::{Value, json};

const KEY: &str = "checkpoint-key-of-the-data-protection-tests";

async fn spawn() -> TestApp {
    TestApp::spawn_with(&[("DOSSIER_CHECKPOINT_KEY", KEY)]).await
}

/// Every stored payload of the log, as text: what a stolen database backup
/// shows.
async fn events_dump(app: &TestApp) -> String {
    let client = app.pool.get().await.unwrap();
    client
        .query("SELECT payload::text FROM events ORDER BY position", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn events(app: &TestApp, decrypt: bool) -> Vec<Value> {
    let page: Value = app
        .get(
            &app.auditor("acme"),
            &format!("/v1/events?limit=1000&decrypt={decrypt}"),
        )
        .await
        .json()
        .await
        .unwrap();
    page["items"].as_array().unwrap().clone()
}

fn of_type<'a>(events: &'a [Value], aggregate_id: &str, event_type: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["aggregate_id"] == aggregate_id && e["event_type"] == event_type)
        .unwrap_or_else(|| panic!("no {event_type} of {aggregate_id}"))
}

#[tokio::test]
async fn names_titles_and_texts_are_stored_sealed_and_read_back_readable() {
    let app = spawn().await;
    let staff = app.staff("acme");
    let file = app
        .upload_ok(
            &staff,
            "cust-1",
            "Payslip Alice Example",
            b"payslip".to_vec(),
        )
        .await;
    let id = file["id"].as_str().unwrap();
    let renamed = app
        .send_json(
            Method::PATCH,
            &staff,
            &format!("/v1/files/{id}"),
            json!({"name": "Payslip Alice Example (March)"}),
        )
        .await;
    assert_eq!(renamed.status(), 200);
    let task = app
        .create_task(&staff, "cust-1", "Send the divorce papers")
        .await;
    let task_id = task["id"].as_str().unwrap();
    let posted = app
        .post_form(
            &app.customer("acme", "cust-1"),
            &format!("/v1/portal/tasks/{task_id}/messages"),
            Form::new().text("text", "My new address is Elm Street 5"),
        )
        .await;
    assert_eq!(posted.status(), 201);

    // What the database holds: none of it in clear.
    let dump = events_dump(&app).await;
    for secret in [
        "Payslip Alice",
        "document.pdf",
        "application/pdf",
        "divorce",
        "Elm Street",
    ] {
        assert!(!dump.contains(secret), "{secret:?} is in the events table");
    }
    let sha256 = file["sha256"].as_str().unwrap();
    assert!(!dump.contains(sha256), "the SHA-256 is in the events table");

    // As stored: each personal field is an enc:v1 string naming its key; ids,
    // sizes and visibility stay clear.
    let stored = events(&app, false).await;
    let uploaded = of_type(&stored, id, "FileUploaded");
    for field in ["name", "file_name", "content_type", "sha256"] {
        let value = uploaded["payload"][field].as_str().unwrap();
        assert!(value.starts_with("enc:v1:"), "{field}: {value}");
    }
    assert_eq!(uploaded["payload"]["customer_id"], "cust-1");
    assert_eq!(uploaded["payload"]["size"], 7);
    let title = of_type(&stored, task_id, "TaskCreated")["payload"]["title"]
        .as_str()
        .unwrap();
    assert!(title.starts_with("enc:v1:"));
    // The task's text is under the customer's key, the file's under the file's.
    let key_of = |sealed: &str| sealed.split(':').nth(2).unwrap().to_owned();
    let message = of_type(&stored, task_id, "TaskMessagePosted");
    assert_eq!(
        key_of(message["payload"]["text"].as_str().unwrap()),
        key_of(title)
    );
    assert_ne!(
        key_of(uploaded["payload"]["name"].as_str().unwrap()),
        key_of(title)
    );

    // Opened: readable, and nothing is erased.
    let opened = events(&app, true).await;
    let uploaded = of_type(&opened, id, "FileUploaded");
    assert_eq!(uploaded["payload"]["name"], "Payslip Alice Example");
    assert_eq!(uploaded["payload"]["sha256"], sha256);
    assert_eq!(
        of_type(&opened, id, "FileRenamed")["payload"]["name"],
        "Payslip Alice Example (March)"
    );
    assert_eq!(
        of_type(&opened, task_id, "TaskMessagePosted")["payload"]["text"],
        "My new address is Elm Street 5"
    );
    assert!(opened.iter().all(|e| e.get("erased").is_none()));

    // The read models and the answers read names as ever.
    let shown: Value = app
        .get(&staff, &format!("/v1/files/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["name"], "Payslip Alice Example (March)");
    let tasks: Value = app
        .get(&app.customer("acme", "cust-1"), "/v1/portal/tasks")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tasks["items"][0]["title"], "Send the divorce papers");
}

#[tokio::test]
async fn a_delete_destroys_the_file_key_with_its_event_and_the_chain_still_verifies() {
    let app = spawn().await;
    let staff = app.staff("acme");
    let kept = app
        .upload_ok(&staff, "cust-1", "Kept contract", b"kept".to_vec())
        .await;
    let file = app
        .upload_ok(&staff, "cust-1", "Medical report Bob", b"report".to_vec())
        .await;
    let id = file["id"].as_str().unwrap();
    let client = app.pool.get().await.unwrap();
    let live_key = |id: String| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT wrapped IS NOT NULL, destroyed_at IS NOT NULL FROM data_keys \
                     WHERE owner_kind = 'file' AND owner_id = $1",
                    &[&id],
                )
                .await
                .map(|row| (row.get::<_, bool>(0), row.get::<_, bool>(1)))
                .unwrap()
        }
    };
    assert_eq!(live_key(id.to_owned()).await, (true, false));

    let deleted = app
        .delete(&staff, &format!("/v1/files/{id}?confirm=true"))
        .await;
    assert_eq!(deleted.status(), 204);
    // Committed with the FileDeleted: no waiting for a worker.
    assert_eq!(live_key(id.to_owned()).await, (false, true));
    assert_eq!(
        live_key(kept["id"].as_str().unwrap().to_owned()).await,
        (true, false)
    );

    let dump = events_dump(&app).await;
    assert!(!dump.contains("Medical report"));
    let opened = events(&app, true).await;
    let uploaded = of_type(&opened, id, "FileUploaded");
    assert_eq!(uploaded["payload"]["name"], Value::Null);
    assert_eq!(uploaded["payload"]["size"], 6, "sizes stay clear");
    assert_eq!(
        uploaded["erased"],
        json!(["name", "file_name", "content_type", "sha256"])
    );
    assert!(of_type(&opened, id, "FileDeleted").get("erased").is_none());
    let kept_uploaded = of_type(&opened, kept["id"].as_str().unwrap(), "FileUploaded");
    assert_eq!(kept_uploaded["payload"]["name"], "Kept contract");

    // The chain covers what is stored, which a destroyed key does not change.
    Sealer::new(app.pool.clone()).catch_up().await.unwrap();
    let report = chain::verify(&app.pool, "acme", KEY.as_bytes(), &[])
        .await
        .unwrap();
    assert!(report.is_ok(), "{report:#?}");
    // The blob worker's BlobPurged may have come since: at least these.
    assert!(report.events >= opened.len() as u64, "{report:#?}");

    // The file is gone everywhere, and a rebuild of the read models from the
    // log gives what the live ones hold.
    let listed: Value = app
        .get(&staff, "/v1/customers/cust-1/files")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    let before = app.read_model_rows().await;
    app.rebuild_every_read_model(&|_| {}).await;
    assert_eq!(app.read_model_rows().await, before);
}

#[tokio::test]
async fn a_rebuild_without_keys_refuses_sealed_fields_instead_of_storing_ciphertext() {
    let app = spawn().await;
    let staff = app.staff("acme");
    app.upload_ok(&staff, "cust-1", "Tax return", b"tax".to_vec())
        .await;
    let refused = dossier_projections::rebuild(&app.pool, &dossier_projections::FilesProjection)
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            dossier_projections::ProjectionError::SealedWithoutKeys { .. }
        ),
        "{refused}"
    );
    let shown: Value = app
        .get(&staff, "/v1/customers/cust-1/files")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        shown["items"][0]["name"], "Tax return",
        "the live model is unchanged"
    );
}

#[tokio::test]
async fn a_file_recorded_before_encryption_stays_readable_everywhere() {
    let app = spawn().await;
    let staff = app.staff("acme");
    // An upload as the service recorded it before this change: clear fields,
    // no key (the event store without a cipher is the old writer).
    let old = dossier_eventlog::eventstore::PgEventStore::new(app.pool.clone());
    let id = uuid::Uuid::now_v7();
    let payload = json!({"FileUploaded": {
        "tenant": "acme", "customer_id": "cust-1", "name": "Old letter",
        "file_name": "old.pdf", "content_type": "application/pdf", "size": 3,
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "blob_key": format!("acme/cust-1/{id}"), "visibility": "internal",
        "origin": "staff_upload", "contract_id": null, "task_id": null,
        "uploaded_at": "2026-01-01T00:00:00Z"}});
    old.persist_returning_positions(&[cqrs_es::persist::SerializedEvent {
        aggregate_id: id.to_string(),
        sequence: 1,
        aggregate_type: "file".into(),
        event_type: "FileUploaded".into(),
        event_version: "2".into(),
        payload,
        metadata: json!({"tenant": "acme", "actor": "staff-1"}),
    }])
    .await
    .unwrap();

    eventually("the old upload in the read model", async || {
        let listed: Value = app
            .get(&staff, "/v1/customers/cust-1/files")
            .await
            .json()
            .await
            .unwrap();
        match listed["items"][0]["name"].as_str() {
            Some("Old letter") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let opened = events(&app, true).await;
    assert_eq!(
        of_type(&opened, &id.to_string(), "FileUploaded")["payload"]["name"],
        "Old letter"
    );
    // Changing it loads the aggregate from the clear event.
    let renamed = app
        .send_json(
            Method::PATCH,
            &staff,
            &format!("/v1/files/{id}"),
            json!({"visibility": "portal"}),
        )
        .await;
    assert_eq!(renamed.status(), 200);
}

#[tokio::test]
async fn after_an_erasure_nothing_of_the_customer_opens_protected_files_do_and_the_chain_verifies()
{
    let app = spawn().await;
    let staff = app.staff("acme");
    let erased = app
        .upload_ok(
            &staff,
            "cust-7",
            "Bank statement Carol",
            b"statement".to_vec(),
        )
        .await;
    let erased_id = erased["id"].as_str().unwrap().to_owned();
    let protected = app
        .upload(
            &app.token("acme", dossier_api::auth::jwt::Role::System, "erp", None),
            "cust-7",
            "invoice.pdf",
            b"invoice".to_vec(),
            &[("name", "Invoice 42"), ("origin", "system")],
        )
        .await;
    assert_eq!(protected.status(), 201);
    let protected: Value = protected.json().await.unwrap();
    let protected_id = protected["id"].as_str().unwrap().to_owned();
    let task = app
        .create_task(&staff, "cust-7", "Carol's health form")
        .await;
    let task_id = task["id"].as_str().unwrap().to_owned();

    let answer = app
        .send_json(
            Method::POST,
            &staff,
            "/v1/customers/cust-7/erasure",
            json!({"confirm": true}),
        )
        .await;
    assert_eq!(answer.status(), 202);
    let counts: Value = answer.json().await.unwrap();
    assert_eq!(
        counts,
        json!({"erased_files": 1, "kept_protected_files": 1})
    );

    // The log, opened with every key there is: the customer's fields are gone.
    let opened = events(&app, true).await;
    for (id, event_type, fields) in [
        (
            erased_id.as_str(),
            "FileUploaded",
            json!(["name", "file_name", "content_type", "sha256"]),
        ),
        (task_id.as_str(), "TaskCreated", json!(["title"])),
    ] {
        let event = of_type(&opened, id, event_type);
        assert_eq!(event["erased"], fields, "{event_type}");
    }
    // The protected file keeps its key, its name and its bytes.
    assert_eq!(
        of_type(&opened, &protected_id, "FileUploaded")["payload"]["name"],
        "Invoice 42"
    );
    let download = app
        .get(&staff, &format!("/v1/files/{protected_id}/content"))
        .await;
    assert_eq!(download.status(), 200);
    assert_eq!(download.bytes().await.unwrap().as_ref(), b"invoice");
    let gone = app
        .get(&staff, &format!("/v1/files/{erased_id}/content"))
        .await;
    assert_eq!(gone.status(), 404);

    // No live key of the customer or of its erased file is left.
    let client = app.pool.get().await.unwrap();
    let live: i64 = client
        .query_one(
            "SELECT count(*) FROM data_keys WHERE destroyed_at IS NULL \
             AND ((owner_kind = 'customer' AND owner_id = 'cust-7') \
                  OR (owner_kind = 'file' AND owner_id = $1))",
            &[&erased_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(live, 0);

    Sealer::new(app.pool.clone()).catch_up().await.unwrap();
    let report = chain::verify(&app.pool, "acme", KEY.as_bytes(), &[])
        .await
        .unwrap();
    assert!(report.is_ok(), "{report:#?}");
}
