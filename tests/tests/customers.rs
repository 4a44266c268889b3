//! The customers list (`GET /v1/customers`, contract v1.1) end to end: real
//! HTTP, Postgres, RabbitMQ and S3, the real application. Every list is read
//! right after the command's answer, with no wait: a command's `2xx` means
//! every read model shows it (rule 10), the customers list included.

use std::collections::HashSet;
use std::time::Duration;

use dossier_api::auth::jwt::Role;
use dossier_test_support::wait::Wait;
use dossier_test_support::{TestApp, error_code};
use reqwest::Method;
use reqwest::multipart::Form;
use serde_json::{Value, json};

async fn customers(app: &TestApp, token: &str, query: &str) -> Value {
    let response = app.get(token, &format!("/v1/customers{query}")).await;
    assert_eq!(response.status(), 200, "/v1/customers{query}");
    response.json().await.unwrap()
}

/// The ids of one page, in order.
fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["customer_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The list entry of `customer` on the first page.
fn entry<'a>(page: &'a Value, customer: &str) -> &'a Value {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["customer_id"] == customer)
        .unwrap_or_else(|| panic!("{customer} is listed: {page}"))
}

/// `(files, open_tasks)` of `customer`.
fn counts(page: &Value, customer: &str) -> (u64, u64) {
    let entry = entry(page, customer);
    (
        entry["files"].as_u64().unwrap(),
        entry["open_tasks"].as_u64().unwrap(),
    )
}

async fn upload(app: &TestApp, token: &str, customer: &str, name: &str) -> String {
    let file = app.upload_ok(token, customer, name, b"%PDF".to_vec()).await;
    file["id"].as_str().unwrap().to_owned()
}

/// Every page of the list with `limit`, following `next_cursor`.
async fn all_pages(app: &TestApp, token: &str, query: &str, limit: u32) -> Vec<String> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let after = cursor
            .as_deref()
            .map(|c| format!("&cursor={c}"))
            .unwrap_or_default();
        let page = customers(app, token, &format!("?limit={limit}{query}{after}")).await;
        let items = ids(&page);
        assert!(items.len() <= limit as usize);
        all.extend(items);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    all
}

#[tokio::test]
async fn the_most_recently_active_customer_comes_first_with_its_files_and_open_tasks() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");

    let empty = customers(&app, &staff, "").await;
    assert_eq!(empty, json!({"items": [], "next_cursor": null}));

    let old = upload(&app, &staff, "cust-old", "Contract 2019").await;
    upload(&app, &staff, "cust-mid", "Offer").await;
    let newest = upload(&app, &staff, "cust-new", "Invoice").await;
    let page = customers(&app, &staff, "").await;
    assert_eq!(ids(&page), ["cust-new", "cust-mid", "cust-old"]);
    let first = &page["items"][0];
    let mut fields: Vec<&String> = first.as_object().unwrap().keys().collect();
    fields.sort();
    assert_eq!(
        fields,
        ["customer_id", "files", "last_activity_at", "open_tasks"],
        "exactly the contract's fields"
    );
    assert_eq!(counts(&page, "cust-old"), (1, 0));
    assert!(page["next_cursor"].is_null());

    // A rename of the old customer's file is activity: it moves to the top.
    let renamed = app
        .send_json(
            Method::PATCH,
            &staff,
            &format!("/v1/files/{old}"),
            json!({"name": "Contract 2019 (signed)"}),
        )
        .await;
    assert_eq!(renamed.status(), 200);
    let page = customers(&app, &staff, "").await;
    assert_eq!(ids(&page), ["cust-old", "cust-new", "cust-mid"]);
    let (old_at, new_at) = (
        entry(&page, "cust-old")["last_activity_at"]
            .as_str()
            .unwrap(),
        entry(&page, "cust-new")["last_activity_at"]
            .as_str()
            .unwrap(),
    );
    assert!(
        chrono::DateTime::parse_from_rfc3339(old_at).unwrap()
            > chrono::DateTime::parse_from_rfc3339(new_at).unwrap()
    );

    // A second file counts; a delete uncounts and is activity too.
    let second = upload(&app, &staff, "cust-new", "Invoice 2").await;
    assert_eq!(
        counts(&customers(&app, &staff, "").await, "cust-new"),
        (2, 0)
    );
    let deleted = app
        .delete(&staff, &format!("/v1/files/{newest}?confirm=true"))
        .await;
    assert_eq!(deleted.status(), 204);
    let page = customers(&app, &staff, "").await;
    assert_eq!(ids(&page)[0], "cust-new");
    assert_eq!(counts(&page, "cust-new"), (1, 0));
    let deleted = app
        .delete(&staff, &format!("/v1/files/{second}?confirm=true"))
        .await;
    assert_eq!(deleted.status(), 204);
    assert_eq!(
        counts(&customers(&app, &staff, "").await, "cust-new"),
        (0, 0),
        "a customer whose files are all deleted stays listed"
    );

    // A task counts as open and is activity; so is a message in its thread.
    let task = app
        .send_json(
            Method::POST,
            &staff,
            "/v1/customers/cust-mid/tasks",
            json!({"title": "Send your bank statements"}),
        )
        .await;
    assert_eq!(task.status(), 201);
    let task: Value = task.json().await.unwrap();
    let page = customers(&app, &staff, "").await;
    assert_eq!(ids(&page), ["cust-mid", "cust-new", "cust-old"]);
    assert_eq!(counts(&page, "cust-mid"), (1, 1));
    // A customer that only has a task is listed too.
    let only_task = app
        .send_json(
            Method::POST,
            &staff,
            "/v1/customers/cust-task-only/tasks",
            json!({"title": "Welcome"}),
        )
        .await;
    assert_eq!(only_task.status(), 201);
    let page = customers(&app, &staff, "").await;
    assert_eq!(ids(&page)[0], "cust-task-only");
    assert_eq!(counts(&page, "cust-task-only"), (0, 1));
    let message = app
        .post_form(
            &staff,
            &format!("/v1/tasks/{}/messages", task["id"].as_str().unwrap()),
            Form::new().text("text", "January to March, please"),
        )
        .await;
    assert_eq!(message.status(), 201);
    assert_eq!(ids(&customers(&app, &staff, "").await)[0], "cust-mid");

    // The console's customer list shows the same rows in the same order, and
    // its search box is `q`.
    let console = |query: &'static str| {
        let (app, staff) = (&app, &staff);
        async move {
            let response = app.get(staff, &format!("/app{query}")).await;
            assert_eq!(response.status(), 200, "/app{query}");
            let html = response.text().await.unwrap();
            let mut shown: Vec<(usize, &str)> =
                ["cust-mid", "cust-task-only", "cust-new", "cust-old"]
                    .into_iter()
                    .filter_map(|id| html.find(&format!(">{id}</a>")).map(|at| (at, id)))
                    .collect();
            shown.sort();
            shown.into_iter().map(|(_, id)| id).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        console("").await,
        ["cust-mid", "cust-task-only", "cust-new", "cust-old"]
    );
    assert_eq!(console("?q=cust-n").await, ["cust-new"]);

    // A download is a fact recorded by a GET, not a command: the list shows it
    // once the projection applied it.
    let download = app.get(&staff, &format!("/v1/files/{old}/content")).await;
    assert_eq!(download.status(), 200);
    Wait::new("the download to make cust-old the most recently active")
        .timeout(Duration::from_secs(20))
        .expect(async || {
            let page = customers(&app, &staff, "").await;
            let first = ids(&page).first().cloned();
            if first.as_deref() == Some("cust-old") {
                Ok(())
            } else {
                Err(first)
            }
        })
        .await;
}

#[tokio::test]
async fn q_is_a_literal_prefix_and_pages_cover_the_list_once() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    for customer in ["a_b-1", "axb-2", "a.b", "A_b", "ab"] {
        upload(&app, &staff, customer, "Doc").await;
    }
    // `_` and `.` are no wildcards, and letters keep their case.
    let prefixed = async |q: &str| {
        let mut found = ids(&customers(&app, &staff, &format!("?q={q}")).await);
        found.sort();
        found
    };
    assert_eq!(prefixed("a_").await, ["a_b-1"]);
    assert_eq!(prefixed("a.").await, ["a.b"]);
    assert_eq!(prefixed("a").await, ["a.b", "a_b-1", "ab", "axb-2"]);
    assert_eq!(prefixed("A").await, ["A_b"]);
    assert_eq!(prefixed("a_b-1").await, ["a_b-1"]);
    assert!(prefixed("a_b-12").await.is_empty());
    assert!(prefixed("zz").await.is_empty());
    // No customer id holds `%` or `*`: such a `q` can only be a mistake.
    for bad in ["%25", "a%25", "*", "a%20b", "", &"a".repeat(129)] {
        let response = app.get(&staff, &format!("/v1/customers?q={bad}")).await;
        assert_eq!(response.status(), 422, "q={bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "validation_failed");
        assert!(
            body["error"]["message"].as_str().unwrap().contains('q'),
            "names the field: {body}"
        );
    }

    // 23 more customers: every page size gives every customer once, in the
    // order of the whole list.
    for n in 0..23 {
        upload(&app, &staff, &format!("cust-{n:02}"), "Doc").await;
    }
    let whole = ids(&customers(&app, &staff, "?limit=500").await);
    assert_eq!(whole.len(), 28);
    assert_eq!(whole.iter().collect::<HashSet<_>>().len(), 28);
    assert_eq!(whole[0], "cust-22");
    for limit in [1, 5, 27, 28] {
        assert_eq!(
            all_pages(&app, &staff, "", limit).await,
            whole,
            "limit {limit}"
        );
    }
    let cust: Vec<String> = whole
        .iter()
        .filter(|c| c.starts_with("cust-"))
        .cloned()
        .collect();
    assert_eq!(all_pages(&app, &staff, "&q=cust-", 4).await, cust);
    assert_eq!(
        customers(&app, &staff, "").await["items"]
            .as_array()
            .unwrap()
            .len(),
        28
    );
    let first = customers(&app, &staff, "?limit=27").await;
    assert!(first["next_cursor"].is_string());
    let last = customers(
        &app,
        &staff,
        &format!(
            "?limit=27&cursor={}",
            first["next_cursor"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(ids(&last).len(), 1);
    assert!(last["next_cursor"].is_null());

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("limit=", "limit"),
        ("cursor=nonsense", "cursor"),
        ("cursor=c01_a", "cursor"),
        ("cursor=", "cursor"),
        // A cursor of the files list is not one of this list.
        ("cursor=AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "cursor"),
    ] {
        let response = app.get(&staff, &format!("/v1/customers?{query}")).await;
        assert_eq!(response.status(), 422, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "validation_failed", "{query}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{query} names {field}: {body}"
        );
    }
}

#[tokio::test]
async fn a_tenant_sees_only_its_own_customers_and_only_staff_and_systems_list_them() {
    let app = TestApp::spawn().await;
    let acme = app.staff("acme");
    let globex = app.staff("globex");
    upload(&app, &acme, "cust-1", "Ours").await;
    upload(&app, &acme, "cust-1", "Ours too").await;
    upload(&app, &acme, "acme-only", "Ours").await;
    upload(&app, &globex, "cust-1", "Theirs").await;

    let mut theirs = ids(&customers(&app, &globex, "").await);
    theirs.sort();
    assert_eq!(theirs, ["cust-1"]);
    assert_eq!(
        counts(&customers(&app, &globex, "").await, "cust-1"),
        (1, 0)
    );
    assert_eq!(counts(&customers(&app, &acme, "").await, "cust-1"), (2, 0));
    assert!(ids(&customers(&app, &globex, "?q=acme").await).is_empty());
    // Another tenant's cursor names no row of this one: it only says where to go on.
    let page = customers(&app, &acme, "?limit=1").await;
    let cursor = page["next_cursor"].as_str().unwrap();
    let after = customers(&app, &globex, &format!("?cursor={cursor}")).await;
    assert!(ids(&after).iter().all(|c| c == "cust-1"));

    let system = app.token("acme", Role::System, "billing", None);
    assert_eq!(ids(&customers(&app, &system, "").await).len(), 2);
    for token in [app.customer("acme", "cust-1"), app.auditor("acme")] {
        let response = app.get(&token, "/v1/customers").await;
        assert_eq!(response.status(), 403);
        assert_eq!(error_code(response).await, "forbidden");
    }
    let anonymous = app
        .client
        .get(app.url("/v1/customers"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(error_code(anonymous).await, "unauthorized");
}
