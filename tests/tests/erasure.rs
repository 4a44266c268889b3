//! Erasure of a customer (CONTRACT.md "Data protection", `POST
//! /v1/customers/{customer_id}/erasure` and AMQP `customer.erase`) end to end:
//! real HTTP, Postgres, RabbitMQ and S3, the real application. Lists are read
//! right after the erasure's answer (rule 10); what a worker does afterwards
//! (purging the blobs, the audit entry) is waited on as a condition.

use std::collections::HashSet;

use dossier_api::auth::jwt::Role;
use dossier_test_support::upstream::{Command, Upstream};
use dossier_test_support::wait::eventually;
use dossier_test_support::{TestApp, error_code};
use reqwest::Method;
use reqwest::multipart::Form;
use serde_json::{Value, json};

/// Uploads a file for `customer` with extra form fields; answers its id.
async fn upload(
    app: &TestApp,
    token: &str,
    customer: &str,
    name: &str,
    fields: &[(&str, &str)],
) -> String {
    let mut all = vec![("name", name)];
    all.extend_from_slice(fields);
    let response = app
        .upload(token, customer, "doc.pdf", b"%PDF".to_vec(), &all)
        .await;
    assert_eq!(response.status(), 201, "uploading {name}");
    let file: Value = response.json().await.unwrap();
    file["id"].as_str().unwrap().to_owned()
}

/// A protected file (origin `system`), published in the portal.
async fn upload_protected(app: &TestApp, token: &str, customer: &str, name: &str) -> String {
    upload(
        app,
        token,
        customer,
        name,
        &[("origin", "system"), ("visibility", "portal")],
    )
    .await
}

async fn erase(app: &TestApp, token: &str, customer: &str, body: Value) -> reqwest::Response {
    app.send_json(
        Method::POST,
        token,
        &format!("/v1/customers/{customer}/erasure"),
        body,
    )
    .await
}

/// Erases `customer`, asserting 202; answers the body.
async fn erase_ok(app: &TestApp, token: &str, customer: &str) -> Value {
    let response = erase(app, token, customer, json!({"confirm": true})).await;
    assert_eq!(response.status(), 202, "erasing {customer}");
    response.json().await.unwrap()
}

async fn json_of(app: &TestApp, token: &str, path: &str) -> Value {
    let response = app.get(token, path).await;
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

/// The ids of `items` of a list answer.
fn ids(list: &Value) -> HashSet<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The customers list entry of `customer`, if listed.
async fn listed_customer(app: &TestApp, staff: &str, customer: &str) -> Option<Value> {
    json_of(app, staff, "/v1/customers").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["customer_id"] == customer)
        .cloned()
}

async fn count_events(app: &TestApp, event_type: &str) -> i64 {
    app.pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM events WHERE event_type = $1",
            &[&event_type],
        )
        .await
        .unwrap()
        .get(0)
}

/// `(live, destroyed)` data keys of an owner of tenant acme.
async fn keys_of(app: &TestApp, kind: &str, owner: &str) -> (i64, i64) {
    let row = app
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FILTER (WHERE destroyed_at IS NULL), \
                    count(*) FILTER (WHERE destroyed_at IS NOT NULL) \
             FROM data_keys WHERE tenant = 'acme' AND owner_kind = $1 AND owner_id = $2",
            &[&kind, &owner],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn all_events(app: &TestApp) -> i64 {
    app.pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

/// A customer with two erasable files (one published), a protected file, a
/// task with a staff message; answers `(erasable, protected, task)`.
async fn customer_with_everything(
    app: &TestApp,
    staff: &str,
    customer: &str,
) -> (Vec<String>, String, String) {
    let internal = upload(app, staff, customer, "Internal note", &[]).await;
    let published = upload(app, staff, customer, "Invoice", &[("visibility", "portal")]).await;
    let protected = upload_protected(app, staff, customer, "Terms of service").await;
    let task = app.create_task(staff, customer, "Send your payslips").await;
    let task_id = task["id"].as_str().unwrap().to_owned();
    let posted = app
        .post_form(
            staff,
            &format!("/v1/tasks/{task_id}/messages"),
            Form::new().text("text", "January to March, please"),
        )
        .await;
    assert_eq!(posted.status(), 201);
    (vec![internal, published], protected, task_id)
}

#[tokio::test]
async fn an_erasure_removes_the_customers_files_and_tasks_everywhere_keeps_protected_files_and_answers_the_counts()
 {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let (erasable, protected, task) = customer_with_everything(&app, &staff, "cust-1").await;
    let (other_files, _, other_task) = customer_with_everything(&app, &staff, "cust-2").await;

    let answer = erase_ok(&app, &staff, "cust-1").await;
    assert_eq!(
        answer,
        json!({"erased_files": 2, "kept_protected_files": 1}),
        "exactly the contract's fields"
    );

    // Staff: the erased files are gone from every endpoint, the protected one stays.
    for id in &erasable {
        for path in [format!("/v1/files/{id}"), format!("/v1/files/{id}/content")] {
            let response = app.get(&staff, &path).await;
            assert_eq!(response.status(), 404, "{path}");
            assert_eq!(error_code(response).await, "not_found");
        }
    }
    let files = json_of(&app, &staff, "/v1/customers/cust-1/files").await;
    assert_eq!(ids(&files), HashSet::from([protected.clone()]));
    let kept = app.api(&staff).download(&protected).await;
    assert_eq!(kept.bytes, b"%PDF");
    let tasks = json_of(&app, &staff, "/v1/customers/cust-1/tasks").await;
    assert!(ids(&tasks).is_empty(), "no tasks: {tasks}");
    let thread = app
        .post_form(
            &staff,
            &format!("/v1/tasks/{task}/messages"),
            Form::new().text("text", "Still there?"),
        )
        .await;
    assert_eq!(thread.status(), 404, "the erased task takes no message");

    // The portal: no tasks, only the kept published file.
    let customer = app.customer("acme", "cust-1");
    let portal_tasks = json_of(&app, &customer, "/v1/portal/tasks").await;
    assert!(ids(&portal_tasks).is_empty(), "{portal_tasks}");
    let portal_files = json_of(&app, &customer, "/v1/portal/files").await;
    assert_eq!(ids(&portal_files), HashSet::from([protected.clone()]));

    // The customers list: kept only for the kept file, without tasks.
    let entry = listed_customer(&app, &staff, "cust-1").await.unwrap();
    assert_eq!(
        (entry["files"].clone(), entry["open_tasks"].clone()),
        (json!(1), json!(0))
    );

    // Keys: the customer's and the erased files' are destroyed, with their
    // events; the kept file's and the other customer's stay.
    assert_eq!(keys_of(&app, "customer", "cust-1").await, (0, 1));
    for id in &erasable {
        assert_eq!(keys_of(&app, "file", id).await, (0, 1), "{id}");
    }
    assert_eq!(keys_of(&app, "file", &protected).await, (1, 0));
    assert_eq!(keys_of(&app, "customer", "cust-2").await, (1, 0));

    // The other customer is untouched.
    let files = json_of(&app, &staff, "/v1/customers/cust-2/files").await;
    assert_eq!(ids(&files).len(), 3);
    assert!(other_files.iter().all(|id| ids(&files).contains(id)));
    let tasks = json_of(&app, &staff, "/v1/customers/cust-2/tasks").await;
    assert_eq!(ids(&tasks), HashSet::from([other_task]));
    let entry = listed_customer(&app, &staff, "cust-2").await.unwrap();
    assert_eq!(
        (entry["files"].clone(), entry["open_tasks"].clone()),
        (json!(3), json!(1))
    );

    // The blob worker purges the erased files' bytes; the kept file's stay.
    eventually("the erased files' blobs purged from storage", async || {
        let keys = app.blob_keys().await;
        let left: Vec<&String> = keys
            .iter()
            .filter(|key| erasable.iter().any(|id| key.ends_with(id.as_str())))
            .collect();
        if left.is_empty() {
            Ok(keys)
        } else {
            Err(format!("still stored: {left:?}"))
        }
    })
    .await;
    assert!(
        app.blob_keys()
            .await
            .iter()
            .any(|key| key.ends_with(protected.as_str()))
    );

    // The audit trail has the erasure as an entry of its own.
    let auditor = app.auditor("acme");
    let trail = json_of(&app, &auditor, "/v1/audit?customer_id=cust-1").await;
    let entry = trail["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "customer.erased")
        .unwrap_or_else(|| panic!("an erasure entry: {trail}"))
        .clone();
    assert_eq!(entry["customer_id"], "cust-1");
    assert_eq!(entry["details"]["kept_protected_files"], 1);
    let listed: HashSet<String> = entry["details"]["erased_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, erasable.iter().cloned().collect());
}

#[tokio::test]
async fn later_uploads_for_an_erased_customer_work_and_a_second_erasure_erases_only_them() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let (_, protected, _) = customer_with_everything(&app, &staff, "cust-1").await;
    erase_ok(&app, &staff, "cust-1").await;

    let later = upload(&app, &staff, "cust-1", "After the erasure", &[]).await;
    let download = app.api(&staff).download(&later).await;
    assert_eq!(download.bytes, b"%PDF");
    let task = app.create_task(&staff, "cust-1", "A new task").await;
    assert_eq!(
        keys_of(&app, "customer", "cust-1").await,
        (1, 1),
        "a new customer key, the erased one stays destroyed"
    );
    assert_eq!(keys_of(&app, "file", &later).await, (1, 0));
    assert_eq!(app.api(&staff).file(&later).await.name, "After the erasure");
    assert_eq!(task["title"], "A new task");
    let entry = listed_customer(&app, &staff, "cust-1").await.unwrap();
    assert_eq!(
        (entry["files"].clone(), entry["open_tasks"].clone()),
        (json!(2), json!(1))
    );
    let tasks = json_of(&app, &staff, "/v1/customers/cust-1/tasks").await;
    assert_eq!(
        ids(&tasks),
        HashSet::from([task["id"].as_str().unwrap().to_owned()])
    );

    let answer = erase_ok(&app, &staff, "cust-1").await;
    assert_eq!(
        answer,
        json!({"erased_files": 1, "kept_protected_files": 1})
    );
    assert_eq!(
        count_events(&app, "CustomerErased").await,
        2,
        "each erasure is recorded"
    );
    assert_eq!(keys_of(&app, "customer", "cust-1").await, (0, 2));
    assert_eq!(keys_of(&app, "file", &later).await, (0, 1));
    let files = json_of(&app, &staff, "/v1/customers/cust-1/files").await;
    assert_eq!(ids(&files), HashSet::from([protected]));
    let tasks = json_of(&app, &staff, "/v1/customers/cust-1/tasks").await;
    assert!(ids(&tasks).is_empty());
}

#[tokio::test]
async fn a_customer_without_protected_files_leaves_every_list_and_an_unknown_one_is_erased_with_zeros()
 {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    upload(&app, &staff, "cust-3", "Offer", &[]).await;
    app.create_task(&staff, "cust-3", "Sign the offer").await;
    assert!(listed_customer(&app, &staff, "cust-3").await.is_some());

    let answer = erase_ok(&app, &staff, "cust-3").await;
    assert_eq!(
        answer,
        json!({"erased_files": 1, "kept_protected_files": 0})
    );
    assert!(
        listed_customer(&app, &staff, "cust-3").await.is_none(),
        "no read model lists it"
    );
    let files = json_of(&app, &staff, "/v1/customers/cust-3/files").await;
    assert!(ids(&files).is_empty());

    // Nothing is known of cust-404: the erasure is still done and recorded.
    let answer = erase_ok(&app, &staff, "cust-404").await;
    assert_eq!(
        answer,
        json!({"erased_files": 0, "kept_protected_files": 0})
    );
    assert_eq!(count_events(&app, "CustomerErased").await, 2);
    assert!(listed_customer(&app, &staff, "cust-404").await.is_none());
}

#[tokio::test]
async fn an_unconfirmed_or_malformed_erasure_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let file = upload(&app, &staff, "cust-1", "Keep me", &[]).await;
    let before = all_events(&app).await;

    for body in [json!({}), json!({"confirm": false})] {
        let response = erase(&app, &staff, "cust-1", body.clone()).await;
        assert_eq!(response.status(), 422, "{body}");
        assert_eq!(
            error_code(response).await,
            "confirmation_required",
            "{body}"
        );
    }
    for body in [
        json!({"confirm": "yes"}),
        json!({"confirm": true, "also": 1}),
        json!([true]),
    ] {
        let response = erase(&app, &staff, "cust-1", body.clone()).await;
        assert_eq!(response.status(), 422, "{body}");
        assert_eq!(error_code(response).await, "validation_failed", "{body}");
    }
    let response = erase(&app, &staff, "cust%201", json!({"confirm": true})).await;
    assert_eq!(response.status(), 422);
    assert_eq!(error_code(response).await, "validation_failed");

    assert_eq!(all_events(&app).await, before, "nothing recorded");
    assert_eq!(app.api(&staff).file(&file).await.name, "Keep me");
}

#[tokio::test]
async fn only_staff_may_erase_a_customer() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let file = upload(&app, &staff, "cust-1", "Keep me", &[]).await;
    let before = all_events(&app).await;

    let customer = app.customer("acme", "cust-1");
    let auditor = app.auditor("acme");
    for token in [&customer, &auditor] {
        let response = erase(&app, token, "cust-1", json!({"confirm": true})).await;
        assert_eq!(response.status(), 403);
        assert_eq!(error_code(response).await, "forbidden");
    }
    let response = erase(&app, "not-a-token", "cust-1", json!({"confirm": true})).await;
    assert_eq!(response.status(), 401);

    // The system role is staff's (CONTRACT.md: upstream systems).
    let system = app.token("acme", Role::System, "crm", None);
    let response = erase(&app, &system, "cust-1", json!({"confirm": true})).await;
    assert_eq!(response.status(), 202);
    assert!(all_events(&app).await > before);
    let gone = app.get(&staff, &format!("/v1/files/{file}")).await;
    assert_eq!(gone.status(), 404);
}

#[tokio::test]
async fn an_upstream_customer_erase_has_its_effect_once_per_message_id() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let (erasable, protected, _) = customer_with_everything(&app, &staff, "cust-1").await;
    let upstream = Upstream::connect(app.vhost.url()).await;

    let refused = Command::json("customer.erase", "acme", json!({"customer_id": "cust-1"}));
    let command = Command::json(
        "customer.erase",
        "acme",
        json!({"customer_id": "cust-1", "confirm": true}),
    );
    upstream.send(&refused).await;
    upstream.send(&command).await;
    upstream.send(&command).await;
    let replies = upstream.replies(3).await;

    let rejected = &replies[refused.correlation_id.as_ref().unwrap()][0];
    assert_eq!(rejected["status"], "rejected", "{rejected}");
    assert_eq!(rejected["error"]["code"], "confirmation_required");
    let answers = &replies[command.correlation_id.as_ref().unwrap()];
    assert_eq!(answers.len(), 2);
    assert_eq!(
        answers[0], answers[1],
        "the second answer repeats the first"
    );
    assert_eq!(answers[0]["status"], "accepted", "{}", answers[0]);
    assert_eq!(answers[0]["customer_id"], "cust-1");
    assert!(answers[0]["position"].as_i64().unwrap() > 0);

    assert_eq!(count_events(&app, "CustomerErased").await, 1, "one erasure");
    assert_eq!(
        count_events(&app, "FileDeleted").await,
        2,
        "each file deleted once"
    );
    let files = json_of(&app, &staff, "/v1/customers/cust-1/files").await;
    assert_eq!(ids(&files), HashSet::from([protected]));
    let tasks = json_of(&app, &staff, "/v1/customers/cust-1/tasks").await;
    assert!(ids(&tasks).is_empty());
    eventually("the erased files' blobs purged from storage", async || {
        let keys = app.blob_keys().await;
        !keys
            .iter()
            .any(|key| erasable.iter().any(|id| key.ends_with(id.as_str())))
    })
    .await;
}

#[tokio::test]
async fn a_rebuild_after_an_erasure_gives_the_rows_the_live_read_models_have() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let (erasable, _, _) = customer_with_everything(&app, &staff, "cust-1").await;
    customer_with_everything(&app, &staff, "cust-2").await;
    upload(&app, &staff, "cust-3", "Only file", &[]).await;
    erase_ok(&app, &staff, "cust-1").await;
    erase_ok(&app, &staff, "cust-3").await;
    upload(&app, &staff, "cust-1", "After the erasure", &[]).await;
    // The purges are events too: wait for them, so the log is still.
    let erased_in_all = erasable.len() as i64 + 1; // cust-1's and cust-3's
    eventually("the erased files' purges recorded", async || {
        count_events(&app, "BlobPurged").await >= erased_in_all
    })
    .await;
    let live = app.read_model_rows().await;
    let customers = &live.iter().find(|(t, _)| t == "customers").unwrap().1;
    assert_eq!(
        customers.len(),
        2,
        "cust-1 (kept file) and cust-2: {customers:?}"
    );

    app.rebuild_every_read_model(&|_| {}).await;
    assert_eq!(app.read_model_rows().await, live);
}
