//! The customer portal end to end: published files, viewed tracking, tasks,
//! messages and the upload switch, with real tokens over real HTTP.

use dossier_test_support::upstream::{Command, Upstream};
use dossier_test_support::{TestApp, error_code};
use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

async fn publish(app: &TestApp, staff: &str, id: &str, visibility: &str) {
    let response = app
        .send_json(
            Method::PATCH,
            staff,
            &format!("/v1/files/{id}"),
            json!({"visibility": visibility}),
        )
        .await;
    assert_eq!(response.status(), 200);
}

fn file_form(name: &str, bytes: Vec<u8>) -> Form {
    Form::new().part(
        "file",
        Part::bytes(bytes)
            .file_name(name.to_owned())
            .mime_str("image/png")
            .unwrap(),
    )
}

async fn portal_ids(app: &TestApp, token: &str) -> Vec<String> {
    let list: Value = app
        .get(token, "/v1/portal/files")
        .await
        .json()
        .await
        .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn customers_see_only_their_own_published_files_and_unpublishing_hides_at_once() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let internal = app
        .upload_ok(&staff, "cust-1", "Internal note", b"i".to_vec())
        .await;
    let portal = app
        .upload_ok(&staff, "cust-1", "Your contract", b"p".to_vec())
        .await;
    let moving = app
        .upload_ok(&staff, "cust-1", "Moving checklist", b"m".to_vec())
        .await;
    let other = app
        .upload_ok(&staff, "cust-2", "Someone else's", b"o".to_vec())
        .await;
    publish(&app, &staff, portal["id"].as_str().unwrap(), "portal").await;
    publish(
        &app,
        &staff,
        moving["id"].as_str().unwrap(),
        "portal_and_moving",
    )
    .await;
    publish(&app, &staff, other["id"].as_str().unwrap(), "portal").await;

    let customer = app.customer("acme", "cust-1");
    let mut seen = portal_ids(&app, &customer).await;
    seen.sort();
    let mut expected = vec![
        portal["id"].as_str().unwrap().to_owned(),
        moving["id"].as_str().unwrap().to_owned(),
    ];
    expected.sort();
    assert_eq!(seen, expected);

    // Internal and other customers' files cannot be downloaded either.
    for id in [
        internal["id"].as_str().unwrap(),
        other["id"].as_str().unwrap(),
    ] {
        let response = app
            .get(&customer, &format!("/v1/portal/files/{id}/content"))
            .await;
        assert_eq!(response.status(), 404);
    }
    // Another tenant's customer with the same id sees nothing.
    assert!(
        portal_ids(&app, &app.customer("globex", "cust-1"))
            .await
            .is_empty()
    );

    publish(&app, &staff, portal["id"].as_str().unwrap(), "internal").await;
    assert_eq!(
        portal_ids(&app, &customer).await,
        [moving["id"].as_str().unwrap()]
    );
    let response = app
        .get(
            &customer,
            &format!(
                "/v1/portal/files/{}/content",
                portal["id"].as_str().unwrap()
            ),
        )
        .await;
    assert_eq!(
        response.status(),
        404,
        "an unpublished file is gone from the portal at once"
    );
}

#[tokio::test]
async fn the_first_portal_download_sets_viewed_at_and_staff_downloads_never_do() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let file = app
        .upload_ok(&staff, "cust-1", "Invoice", b"invoice".to_vec())
        .await;
    let id = file["id"].as_str().unwrap();
    publish(&app, &staff, id, "portal").await;

    // Staff downloads leave viewed_at alone.
    assert_eq!(
        app.get(&staff, &format!("/v1/files/{id}/content"))
            .await
            .status(),
        200
    );
    let after_staff: Value = app
        .get(&staff, &format!("/v1/files/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(after_staff["viewed_at"], Value::Null);

    let customer = app.customer("acme", "cust-1");
    let first = app
        .get(&customer, &format!("/v1/portal/files/{id}/content"))
        .await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.bytes().await.unwrap().as_ref(), b"invoice");
    let viewed: Value = app
        .get(&staff, &format!("/v1/files/{id}"))
        .await
        .json()
        .await
        .unwrap();
    let viewed_at = viewed["viewed_at"]
        .as_str()
        .expect("viewed_at is set")
        .to_owned();

    // A second download keeps the first time.
    assert_eq!(
        app.get(&customer, &format!("/v1/portal/files/{id}/content"))
            .await
            .status(),
        200
    );
    let again: Value = app
        .get(&staff, &format!("/v1/files/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["viewed_at"], viewed_at);

    let client = app.pool.get().await.unwrap();
    let rows = client
        .query("SELECT payload->>'viewer' FROM events WHERE aggregate_id = $1 AND event_type = 'FileViewed'", &[&id])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "viewed once");
    assert_eq!(rows[0].get::<_, String>(0), "cust-1");

    let viewed_list: Value = app
        .get(&staff, "/v1/customers/cust-1/files?viewed=true")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(viewed_list["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn task_and_message_uploads_are_attachments_and_show_in_the_staff_list() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let task = app
        .create_task(&staff, "cust-1", "Send your bank statements")
        .await;
    let task_id = task["id"].as_str().unwrap();
    assert_eq!(task["title"], "Send your bank statements");
    assert_eq!(task["attachments"], json!([]));

    let customer = app.customer("acme", "cust-1");
    let response = app
        .post_form(
            &customer,
            &format!("/v1/portal/tasks/{task_id}/attachments"),
            file_form("statement_march.png", b"png bytes".to_vec()),
        )
        .await;
    assert_eq!(response.status(), 201);
    let attachment: Value = response.json().await.unwrap();
    assert_eq!(attachment["name"], "statement_march");
    assert_eq!(attachment["file_name"], "statement_march.png");
    assert_eq!(attachment["origin"], "customer_upload");
    assert_eq!(attachment["visibility"], "portal");
    assert_eq!(attachment["task_id"], task_id);

    let form =
        file_form("signed_form.pdf", b"pdf bytes".to_vec()).text("text", "Here is the signed form");
    let response = app
        .post_form(
            &customer,
            &format!("/v1/portal/tasks/{task_id}/messages"),
            form,
        )
        .await;
    assert_eq!(response.status(), 201);
    let message: Value = response.json().await.unwrap();
    assert_eq!(message["text"], "Here is the signed form");
    assert_eq!(message["author"], "user-cust-1");
    let message_file = message["file_id"]
        .as_str()
        .expect("the message carries its file")
        .to_owned();

    let text_only = Form::new().text("text", "Anything else?");
    let response = app
        .post_form(
            &customer,
            &format!("/v1/portal/tasks/{task_id}/messages"),
            text_only,
        )
        .await;
    assert_eq!(response.status(), 201);

    // The customer's task shows both files as attachments and the thread in order.
    let tasks: Value = app
        .get(&customer, "/v1/portal/tasks")
        .await
        .json()
        .await
        .unwrap();
    let mine = &tasks["items"][0];
    let attached: Vec<&str> = mine["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        attached,
        [attachment["id"].as_str().unwrap(), message_file.as_str()]
    );
    let texts: Vec<&str> = mine["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["Here is the signed form", "Anything else?"]);

    // Staff see them at once, in the customer's list and on the task.
    let list: Value = app
        .get(&staff, "/v1/customers/cust-1/files?origin=customer_upload")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let staff_tasks: Value = app
        .get(&staff, "/v1/customers/cust-1/tasks")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        staff_tasks["items"][0]["attachments"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn customers_can_never_delete_and_never_touch_another_customers_task() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let theirs = app.create_task(&staff, "cust-2", "Not yours").await;
    let task_id = theirs["id"].as_str().unwrap();
    let customer = app.customer("acme", "cust-1");

    let response = app
        .post_form(
            &customer,
            &format!("/v1/portal/tasks/{task_id}/attachments"),
            file_form("a.png", b"a".to_vec()),
        )
        .await;
    assert_eq!(response.status(), 404);
    assert_eq!(error_code(response).await, "not_found");
    let response = app
        .post_form(
            &customer,
            &format!("/v1/portal/tasks/{task_id}/messages"),
            Form::new().text("text", "hi"),
        )
        .await;
    assert_eq!(response.status(), 404);
    assert!(app.blob_keys().await.is_empty(), "nothing was stored");
    let tasks: Value = app
        .get(&customer, "/v1/portal/tasks")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tasks["items"], json!([]));

    let file = app.upload_ok(&staff, "cust-1", "Mine", b"m".to_vec()).await;
    let id = file["id"].as_str().unwrap();
    let response = app
        .delete(&customer, &format!("/v1/files/{id}?confirm=true"))
        .await;
    assert_eq!(response.status(), 403);
    assert_eq!(error_code(response).await, "forbidden");
    let response = app
        .send_json(
            Method::POST,
            &customer,
            "/v1/files/delete",
            json!({"file_ids": [id], "confirm": true}),
        )
        .await;
    assert_eq!(response.status(), 403);
    assert_eq!(
        app.get(&staff, &format!("/v1/files/{id}")).await.status(),
        200
    );
    // Nor create tasks or change settings.
    let response = app
        .send_json(
            Method::POST,
            &customer,
            "/v1/customers/cust-1/tasks",
            json!({"title": "x"}),
        )
        .await;
    assert_eq!(response.status(), 403);
    let response = app
        .send_json(
            Method::PUT,
            &customer,
            "/v1/settings",
            json!({"portal_uploads_enabled": true}),
        )
        .await;
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn the_upload_switch_is_per_tenant_and_refuses_with_nothing_stored() {
    let app = TestApp::spawn().await;
    let acme_staff = app.staff("acme");
    let globex_staff = app.staff("globex");
    let acme_task = app
        .create_task(&acme_staff, "cust-1", "Upload please")
        .await;
    let globex_task = app
        .create_task(&globex_staff, "cust-1", "Upload please")
        .await;

    let response = app
        .send_json(
            Method::PUT,
            &acme_staff,
            "/v1/settings",
            json!({"portal_uploads_enabled": false}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"portal_uploads_enabled": false})
    );

    let acme_customer = app.customer("acme", "cust-1");
    let acme_path = format!("/v1/portal/tasks/{}", acme_task["id"].as_str().unwrap());
    let response = app
        .post_form(
            &acme_customer,
            &format!("{acme_path}/attachments"),
            file_form("a.png", b"a".to_vec()),
        )
        .await;
    assert_eq!(response.status(), 403);
    assert_eq!(error_code(response).await, "portal_upload_disabled");
    let with_file = file_form("b.png", b"b".to_vec()).text("text", "see attached");
    let response = app
        .post_form(&acme_customer, &format!("{acme_path}/messages"), with_file)
        .await;
    assert_eq!(response.status(), 403);
    assert_eq!(error_code(response).await, "portal_upload_disabled");
    assert!(app.blob_keys().await.is_empty(), "nothing was stored");
    // Writing without a file still works.
    let response = app
        .post_form(
            &acme_customer,
            &format!("{acme_path}/messages"),
            Form::new().text("text", "I cannot upload"),
        )
        .await;
    assert_eq!(response.status(), 201);

    // Globex's switch is untouched.
    let globex_customer = app.customer("globex", "cust-1");
    let globex_path = format!(
        "/v1/portal/tasks/{}/attachments",
        globex_task["id"].as_str().unwrap()
    );
    let response = app
        .post_form(
            &globex_customer,
            &globex_path,
            file_form("c.png", b"c".to_vec()),
        )
        .await;
    assert_eq!(response.status(), 201);

    // Switched on again, acme's customers upload again.
    app.send_json(
        Method::PUT,
        &acme_staff,
        "/v1/settings",
        json!({"portal_uploads_enabled": true}),
    )
    .await;
    let response = app
        .post_form(
            &acme_customer,
            &format!("{acme_path}/attachments"),
            file_form("d.png", b"d".to_vec()),
        )
        .await;
    assert_eq!(response.status(), 201);
}

#[tokio::test]
async fn an_oversized_portal_upload_answers_413_with_nothing_stored() {
    let app = TestApp::spawn_with(&[("DOSSIER_MAX_FILE_BYTES", "1024")]).await;
    let staff = app.staff("acme");
    let task = app.create_task(&staff, "cust-1", "Upload please").await;
    let customer = app.customer("acme", "cust-1");
    let path = format!("/v1/portal/tasks/{}", task["id"].as_str().unwrap());
    let response = app
        .post_form(
            &customer,
            &format!("{path}/attachments"),
            file_form("big.png", vec![1; 1025]),
        )
        .await;
    assert_eq!(response.status(), 413);
    assert_eq!(error_code(response).await, "file_too_large");
    let form = file_form("big.png", vec![1; 1025]).text("text", "too big");
    let response = app
        .post_form(&customer, &format!("{path}/messages"), form)
        .await;
    assert_eq!(response.status(), 413);
    assert!(app.blob_keys().await.is_empty());
    let tasks: Value = app
        .get(&customer, "/v1/portal/tasks")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tasks["items"][0]["attachments"], json!([]));
    assert_eq!(tasks["items"][0]["messages"], json!([]));
    let response = app
        .post_form(
            &customer,
            &format!("{path}/attachments"),
            file_form("ok.png", vec![1; 1024]),
        )
        .await;
    assert_eq!(response.status(), 201);
}

#[tokio::test]
async fn upstream_task_create_is_idempotent_and_answered() {
    let app = TestApp::spawn().await;
    let upstream = Upstream::connect(app.vhost.url()).await;
    let command = Command::json(
        "task.create",
        "acme",
        json!({"customer_id": "cust-1", "title": "Sign the lease"}),
    );
    upstream.send(&command).await;
    upstream.send(&command).await;
    let replies = upstream.replies(2).await;
    let answers = &replies[command.correlation_id.as_ref().unwrap()];
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0]["status"], "accepted");
    let task_id = answers[0]["task_id"]
        .as_str()
        .expect("the reply names the task");
    let tasks: Value = app
        .get(&app.staff("acme"), "/v1/customers/cust-1/tasks")
        .await
        .json()
        .await
        .unwrap();
    let items = tasks["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "one task");
    assert_eq!(items[0]["id"], task_id);
    assert_eq!(items[0]["title"], "Sign the lease");

    let invalid = Command::json(
        "task.create",
        "acme",
        json!({"customer_id": "cust-1", "title": "   "}),
    );
    upstream.send(&invalid).await;
    let replies = upstream.replies(1).await;
    let answer = &replies[invalid.correlation_id.as_ref().unwrap()][0];
    assert_eq!(answer["status"], "rejected");
    assert_eq!(answer["error"]["code"], "validation_failed");
}

/// The ids of the attachments of each of the customer's tasks in the portal,
/// and the `file_id` of each message, as the customer sees them.
async fn portal_task_files(app: &TestApp, customer: &str) -> (Vec<String>, Vec<Value>) {
    let tasks: Value = app
        .get(customer, "/v1/portal/tasks")
        .await
        .json()
        .await
        .unwrap();
    let task = &tasks["items"][0];
    let attachments = task["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_owned())
        .collect();
    let message_files = task["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.get("file_id").cloned().unwrap_or(Value::Null))
        .collect();
    (attachments, message_files)
}

#[tokio::test]
async fn an_attachment_set_to_internal_leaves_the_portal_task_list_and_comes_back_when_published() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let task = app
        .create_task(&staff, "cust-1", "Send your payslips")
        .await;
    let task_id = task["id"].as_str().unwrap();
    let customer = app.customer("acme", "cust-1");
    let form = file_form("payslip_may.pdf", b"may".to_vec()).text("text", "May's payslip");
    let response = app
        .post_form(
            &customer,
            &format!("/v1/portal/tasks/{task_id}/messages"),
            form,
        )
        .await;
    assert_eq!(response.status(), 201);
    let message: Value = response.json().await.unwrap();
    let file_id = message["file_id"].as_str().unwrap().to_owned();
    assert_eq!(
        portal_task_files(&app, &customer).await,
        (vec![file_id.clone()], vec![json!(file_id)])
    );

    publish(&app, &staff, &file_id, "internal").await;
    let (attachments, message_files) = portal_task_files(&app, &customer).await;
    assert!(attachments.is_empty(), "an internal file is not listed");
    assert_eq!(
        message_files,
        [Value::Null],
        "the message keeps its text but no longer names the internal file"
    );
    let shown = app
        .get(&customer, "/v1/portal/tasks")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !shown.contains(&file_id) && !shown.contains("payslip_may"),
        "nothing of the internal file shows: {shown}"
    );
    // Staff still see it on the task.
    let staff_tasks: Value = app
        .get(&staff, "/v1/customers/cust-1/tasks")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(staff_tasks["items"][0]["attachments"][0]["id"], file_id);
    assert_eq!(staff_tasks["items"][0]["messages"][0]["file_id"], file_id);

    publish(&app, &staff, &file_id, "portal").await;
    assert_eq!(
        portal_task_files(&app, &customer).await,
        (vec![file_id.clone()], vec![json!(file_id)])
    );
}

/// How many downloads the log holds for `file_id`, and its `viewed_at`.
async fn downloads_and_viewed(app: &TestApp, file_id: &str) -> (i64, Value) {
    let client = app.pool.get().await.unwrap();
    let downloads: i64 = client
        .query_one(
            "SELECT count(*) FROM events WHERE event_type = 'FileDownloaded' \
             AND payload::text LIKE '%' || $1 || '%'",
            &[&file_id],
        )
        .await
        .unwrap()
        .get(0);
    let file: Value = app
        .get(&app.staff("acme"), &format!("/v1/files/{file_id}"))
        .await
        .json()
        .await
        .unwrap();
    (downloads, file["viewed_at"].clone())
}

#[tokio::test]
async fn head_on_a_content_route_records_no_download_and_sets_no_viewed_at() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let file = app
        .upload_ok(&staff, "cust-1", "Lease", b"lease bytes".to_vec())
        .await;
    let id = file["id"].as_str().unwrap();
    publish(&app, &staff, id, "portal").await;
    let customer = app.customer("acme", "cust-1");

    for (token, path) in [
        (&staff, format!("/v1/files/{id}/content")),
        (&customer, format!("/v1/portal/files/{id}/content")),
    ] {
        let response = app
            .client
            .head(app.url(&path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "HEAD {path}");
        assert_eq!(
            response.headers()["content-length"],
            "11",
            "HEAD {path} says the size"
        );
        assert!(response.headers().contains_key("content-disposition"));
    }
    assert_eq!(
        downloads_and_viewed(&app, id).await,
        (0, Value::Null),
        "HEAD records nothing"
    );

    // A GET does.
    let response = app
        .get(&customer, &format!("/v1/portal/files/{id}/content"))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"lease bytes");
    let (downloads, viewed_at) = downloads_and_viewed(&app, id).await;
    assert_eq!(downloads, 1);
    assert!(viewed_at.is_string(), "the GET set viewed_at");
}

#[tokio::test]
async fn a_failed_blob_read_answers_503_and_records_no_download_and_no_viewed_at() {
    let (app, s3) = TestApp::spawn_behind_s3_proxy(&[]).await;
    let staff = app.staff("acme");
    let file = app
        .upload_ok(&staff, "cust-1", "Contract", b"contract".to_vec())
        .await;
    let id = file["id"].as_str().unwrap();
    publish(&app, &staff, id, "portal").await;
    let customer = app.customer("acme", "cust-1");
    let staff_path = format!("/v1/files/{id}/content");
    let portal_path = format!("/v1/portal/files/{id}/content");

    s3.cut().await;
    for (token, path) in [(&staff, &staff_path), (&customer, &portal_path)] {
        let response = app.get(token, path).await;
        assert_eq!(response.status(), 503, "GET {path} while S3 is down");
        assert_eq!(error_code(response).await, "unavailable");
    }
    assert_eq!(
        downloads_and_viewed(&app, id).await,
        (0, Value::Null),
        "no byte left, so nothing is recorded"
    );

    s3.restore();
    let response = app.get(&customer, &portal_path).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"contract");
    let (downloads, viewed_at) = downloads_and_viewed(&app, id).await;
    assert_eq!(downloads, 1);
    assert!(viewed_at.is_string());
}

/// Follows `path` page by page (`limit` each) as `token`; the ids of every
/// page, in order.
async fn pages(app: &TestApp, token: &str, path: &str, limit: u32) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(cursor) => format!("{path}?limit={limit}&cursor={cursor}"),
            None => format!("{path}?limit={limit}"),
        };
        let response = app.get(token, &url).await;
        assert_eq!(response.status(), 200, "GET {url}");
        let page: Value = response.json().await.unwrap();
        pages.push(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|item| item["id"].as_str().unwrap().to_owned())
                .collect(),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return pages,
        }
    }
}

#[tokio::test]
async fn the_portal_file_and_task_lists_are_paged_newest_first() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let mut files = Vec::new();
    let mut tasks = Vec::new();
    for n in 0..5 {
        let file = app
            .upload_ok(&staff, "cust-1", &format!("Letter {n}"), vec![n])
            .await;
        let id = file["id"].as_str().unwrap().to_owned();
        publish(&app, &staff, &id, "portal").await;
        files.push(id);
        let task = app
            .create_task(&staff, "cust-1", &format!("Task {n}"))
            .await;
        tasks.push(task["id"].as_str().unwrap().to_owned());
    }
    // Unpublished files and other customers' tasks stay out of every page.
    app.upload_ok(&staff, "cust-1", "Internal", b"i".to_vec())
        .await;
    app.create_task(&staff, "cust-2", "Not yours").await;
    files.reverse();
    tasks.reverse();

    let customer = app.customer("acme", "cust-1");
    for (path, newest_first) in [("/v1/portal/files", &files), ("/v1/portal/tasks", &tasks)] {
        let pages = pages(&app, &customer, path, 2).await;
        assert_eq!(pages.len(), 3, "{path}: 2 + 2 + 1");
        assert_eq!(&pages.concat(), newest_first, "{path}");
        // Without a limit, the default page (50) holds them all.
        let all: Value = app.get(&customer, path).await.json().await.unwrap();
        assert_eq!(all["items"].as_array().unwrap().len(), 5, "{path}");
        assert_eq!(all["next_cursor"], Value::Null, "{path}");
        for bad in [
            "limit=0",
            "limit=501",
            "limit=x",
            "cursor=garbage",
            "cursor=",
        ] {
            let response = app.get(&customer, &format!("{path}?{bad}")).await;
            assert_eq!(response.status(), 422, "{path}?{bad}");
            assert_eq!(error_code(response).await, "validation_failed");
        }
    }
}

#[tokio::test]
async fn staff_reply_in_a_tasks_thread_and_the_customer_sees_the_reply_and_its_file() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let customer = app.customer("acme", "cust-1");
    let task = app
        .create_task(&staff, "cust-1", "Send your bank statements")
        .await;
    let task_id = task["id"].as_str().unwrap();
    let path = format!("/v1/tasks/{task_id}/messages");

    // The customer writes, staff answer with a form to fill in.
    let question = Form::new().text("text", "Which months do you need?");
    let response = app
        .post_form(
            &customer,
            &format!("/v1/portal/tasks/{task_id}/messages"),
            question,
        )
        .await;
    assert_eq!(response.status(), 201);
    let answer = file_form("statement_request.pdf", b"pdf bytes".to_vec())
        .text("text", "January to March, please use this form");
    let response = app.post_form(&staff, &path, answer).await;
    assert_eq!(response.status(), 201);
    let message: Value = response.json().await.unwrap();
    assert_eq!(message["author"], "staff-1");
    let file_id = message["file_id"]
        .as_str()
        .expect("the reply carries its file")
        .to_owned();

    // The customer sees the whole thread, in order, and the staff file among
    // the task's attachments, published to the portal.
    let tasks: Value = app
        .get(&customer, "/v1/portal/tasks")
        .await
        .json()
        .await
        .unwrap();
    let mine = &tasks["items"][0];
    let thread: Vec<(&str, &str)> = mine["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["author"].as_str().unwrap(), m["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        thread,
        [
            ("user-cust-1", "Which months do you need?"),
            ("staff-1", "January to March, please use this form"),
        ]
    );
    let attachment = &mine["attachments"][0];
    assert_eq!(attachment["id"], file_id.as_str());
    assert_eq!(attachment["name"], "statement_request");
    assert_eq!(attachment["origin"], "staff_upload");
    assert_eq!(attachment["visibility"], "portal");
    let download = app
        .get(&customer, &format!("/v1/portal/files/{file_id}/content"))
        .await;
    assert_eq!(download.status(), 200);
    assert_eq!(download.bytes().await.unwrap().as_ref(), b"pdf bytes");

    // Only staff of the task's own tenant write there.
    let as_customer = app
        .post_form(&customer, &path, Form::new().text("text", "hi"))
        .await;
    assert_eq!(as_customer.status(), 403);
    let other_tenant = app.staff("globex");
    let elsewhere = app
        .post_form(&other_tenant, &path, Form::new().text("text", "hi"))
        .await;
    assert_eq!(elsewhere.status(), 404);
    let unknown = format!("/v1/tasks/{}/messages", uuid::Uuid::new_v4());
    let nowhere = app
        .post_form(&staff, &unknown, Form::new().text("text", "hi"))
        .await;
    assert_eq!(nowhere.status(), 404);
}
