//! The staff console in a real headless Chromium against a real Dossier:
//! what the Files guide (`../shared/seeds/`) tells staff to do, done with the
//! mouse and keyboard on the pages, checked through the API afterwards. Every
//! page shown is saved as a screenshot and held to axe-core
//! (`Browser::check_page`).

use std::io::Read as _;

use axum::Router;
use axum::response::Html;
use axum::routing::get;
use dossier_test_support::TestApp;
use dossier_test_support::browser::Browser;
use dossier_test_support::client::Upload;
use serde_json::{Value, json};

/// The files of `customer` as the API lists them now (names, newest first).
async fn listed_names(app: &TestApp, customer: &str) -> Vec<String> {
    let page: Value = app
        .get(
            &app.staff("acme"),
            &format!("/v1/customers/{customer}/files?limit=500"),
        )
        .await
        .json()
        .await
        .unwrap();
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The names in the Files table's rows, top to bottom.
async fn shown_names(browser: &Browser) -> Vec<String> {
    let names = browser
        .execute(
            "return Array.from(document.querySelectorAll('#files-table tbody th.name'))\
               .map(th => th.firstChild.textContent.trim());",
            vec![],
        )
        .await;
    serde_json::from_value(names).unwrap()
}

/// Opens `path` with its filter form filled by the query: what pressing
/// Filter sends.
async fn filter(browser: &Browser, app: &TestApp, query: &str) -> Vec<String> {
    browser
        .goto(&app.url(&format!("/app/customers/cust-42/files?{query}")))
        .await;
    browser.wait_for("form.filters").await;
    shown_names(browser).await
}

#[tokio::test]
async fn staff_sign_in_add_a_file_with_visible_progress_see_it_listed_and_sign_out() {
    let app = TestApp::spawn().await;
    let browser = Browser::start().await;
    app.sign_in(&browser, &app.staff("acme")).await;
    browser.wait_for_text("h1", "Customers").await;
    browser.check_page("console-customers-empty").await;

    // Customers menu → open the customer → Files tab.
    browser.fill("#open-id", "cust-42").await;
    browser
        .click("form[action='/app/customers/open'] button")
        .await;
    browser.wait_for_text("h1", "Customer cust-42").await;
    browser
        .wait_for_text("nav.tabs [aria-current=page]", "Files")
        .await;

    // Add file: name, file, "Show in customer portal", Add.
    browser.click("[data-open=add-file]").await;
    browser.fill("#add-name", "Invoice November 2025").await;
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    browser
        .upload_file("#add-file-input", "invoice_11.pdf", &bytes)
        .await;
    browser.click("#add-portal").await;
    browser.screenshot("console-add-file").await;
    // Record what the progress bar shows while the bytes go up; the page
    // reloads on success, so keep it where the reloaded page can be asked.
    browser
        .execute(
            "const bar = document.querySelector('#add-file [data-progress]');\
             new MutationObserver(() => {\
               if (!bar.hidden) sessionStorage.setItem('progress-seen',\
                 String(Math.max(Number(sessionStorage.getItem('progress-seen') || -1), bar.value)));\
             }).observe(bar, {attributes: true});",
            vec![],
        )
        .await;
    browser.click("#add-file button[type=submit]").await;
    browser.wait_for_text("#flash", "File added.").await;
    let seen = browser
        .execute("return sessionStorage.getItem('progress-seen');", vec![])
        .await;
    assert_eq!(seen, json!("100"), "the progress bar was shown and filled");

    // The file is in the list at once, with the seed's columns.
    let row = browser.wait_for("#files-table tbody tr").await;
    let text = row.text().await.unwrap();
    for shown in [
        "Invoice November 2025",
        "invoice_11.pdf",
        "Customer portal",
        "Not viewed",
        "Staff upload",
        "3.0 MB",
    ] {
        assert!(text.contains(shown), "{shown:?} missing in {text:?}");
    }
    browser.check_page("console-files").await;
    let api = app.api(&app.staff("acme")).list("cust-42", "").await;
    assert_eq!(api.items.len(), 1);
    // The page sent the upload with an Idempotency-Key (ADR 0016), answered.
    let keys: i64 = app
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM http_idempotency WHERE state = 'done' AND status = 201",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(keys, 1, "the page's upload carried an Idempotency-Key");
    assert_eq!(api.items[0].visibility, "portal");
    assert_eq!(api.items[0].size, 3_000_000);

    // Sign out: the next page asks to sign in again.
    browser.click("form.whoami button").await;
    browser.wait_for_text("h1", "Sign in to Dossier").await;
    browser.goto(&app.url("/app/customers/cust-42/files")).await;
    browser.wait_for_text("h1", "Sign in to Dossier").await;
    let url = browser.current_url().await;
    assert_eq!(url.path(), "/login");
    assert_eq!(url.query(), Some("next=/app/customers/cust-42/files"));
}

#[tokio::test]
async fn a_file_one_byte_over_the_limit_is_refused_naming_the_limit_and_nothing_is_stored() {
    let app = TestApp::spawn_with(&[("DOSSIER_MAX_FILE_BYTES", "1048576")]).await;
    let browser = Browser::start().await;
    app.sign_in(&browser, &app.staff("acme")).await;
    browser.goto(&app.url("/app/customers/cust-42/files")).await;
    browser.click("[data-open=add-file]").await;
    browser.fill("#add-name", "Scan").await;
    browser
        .upload_file("#add-file-input", "scan.tiff", &vec![7; 1_048_577])
        .await;
    browser.click("#add-file button[type=submit]").await;
    let status = browser
        .wait_for_text("#add-file [data-status]", "File too big")
        .await;
    let said = status.text().await.unwrap();
    assert!(said.contains("1 MiB (1048576 bytes)"), "{said}");
    assert!(said.contains("compressing"), "{said}");
    browser.check_page("console-add-file-too-big").await;

    // The same limit, exactly: accepted.
    browser
        .upload_file("#add-file-input", "scan.tiff", &vec![7; 1_048_576])
        .await;
    browser.click("#add-file button[type=submit]").await;
    browser.wait_for_text("#flash", "File added.").await;
    assert_eq!(listed_names(&app, "cust-42").await, ["Scan"]);
    assert_eq!(
        app.blob_keys().await.len(),
        1,
        "only the accepted file is stored"
    );
}

#[tokio::test]
async fn each_filter_narrows_the_files_tab_like_the_api() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let api = app.api(&staff);
    let contract = api
        .upload_file(
            "cust-42",
            &Upload::new("Contract 2025", b"c".to_vec())
                .field("visibility", "portal")
                .field("contract_id", "C-1"),
        )
        .await;
    api.upload("cust-42", "Internal note", b"i".to_vec()).await;
    api.upload_file(
        "cust-42",
        &Upload::new("Moving checklist", b"m".to_vec()).field("visibility", "portal_and_moving"),
    )
    .await;
    // The customer opens the contract in the portal: viewed.
    let customer = app.customer("acme", "cust-42");
    let opened = app
        .get(
            &customer,
            &format!("/v1/portal/files/{}/content", contract.id),
        )
        .await;
    assert_eq!(opened.status(), 200);
    api.list_until("cust-42", "viewed=true", "the contract viewed", |page| {
        page.items.len() == 1
    })
    .await;

    let browser = Browser::start().await;
    app.sign_in(&browser, &staff).await;
    let all = filter(&browser, &app, "").await;
    assert_eq!(all, ["Moving checklist", "Internal note", "Contract 2025"]);

    // Each filter as the form sends it (blank fields included).
    assert_eq!(
        filter(
            &browser,
            &app,
            "viewed=true&created_from=&created_to=&contract_id="
        )
        .await,
        ["Contract 2025"]
    );
    assert_eq!(
        filter(&browser, &app, "viewed=false").await,
        ["Moving checklist", "Internal note"]
    );
    assert_eq!(
        filter(&browser, &app, "visibility=internal").await,
        ["Internal note"]
    );
    assert_eq!(
        filter(
            &browser,
            &app,
            "visibility=portal&visibility=portal_and_moving"
        )
        .await,
        ["Moving checklist", "Contract 2025"]
    );
    assert_eq!(
        filter(&browser, &app, "contract_id=C-1").await,
        ["Contract 2025"]
    );
    let today = chrono::Utc::now().date_naive();
    let yesterday = today.pred_opt().unwrap();
    assert_eq!(
        filter(
            &browser,
            &app,
            &format!("created_from={today}&created_to={today}")
        )
        .await,
        ["Moving checklist", "Internal note", "Contract 2025"]
    );
    assert!(
        filter(&browser, &app, &format!("created_to={yesterday}"))
            .await
            .is_empty()
    );
    browser
        .wait_for_text("p.empty", "No file matches these filters.")
        .await;

    // The form itself: choose "Not viewed" and "Internal", press Filter.
    browser.goto(&app.url("/app/customers/cust-42/files")).await;
    browser.choose("#f-viewed", "false").await;
    browser.click("#f-vis-internal").await;
    browser.click("form.filters button[type=submit]").await;
    browser.wait_for_text("form.filters", "Clear filters").await;
    assert_eq!(shown_names(&browser).await, ["Internal note"]);
    let url = browser.current_url().await;
    assert!(url.query().unwrap().contains("viewed=false"), "{url}");
    browser.check_page("console-files-filtered").await;
}

#[tokio::test]
async fn two_selected_files_download_as_one_zip_and_delete_asks_first_and_spares_protected_files() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let api = app.api(&staff);
    for upload in [
        Upload::new("Contract 2025", b"contract bytes".to_vec())
            .file("contract_2025.pdf", "application/pdf"),
        Upload::new("Invoice November 2025", b"invoice bytes".to_vec())
            .file("invoice_11.pdf", "application/pdf"),
        Upload::new("Product sheet", b"product".to_vec()).field("origin", "product"),
    ] {
        api.upload_file("cust-42", &upload).await;
    }

    let browser = Browser::start().await;
    app.sign_in(&browser, &staff).await;
    browser.goto(&app.url("/app/customers/cust-42/files")).await;
    browser.wait_for("#files-table").await;

    // Tick two files, Download: one ZIP with both, named by display name.
    let tick = |name: &'static str| {
        let browser = &browser;
        async move {
            browser
                .click(&format!("input[name=file_id][aria-label='Select {name}']"))
                .await;
        }
    };
    tick("Contract 2025").await;
    tick("Invoice November 2025").await;
    browser
        .wait_for_text("[data-selected-count]", "2 files selected")
        .await;
    browser.click("[data-bulk=download]").await;
    let zip = browser
        .wait_for_download(|name: &str| name.ends_with(".zip"))
        .await;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip.bytes)).unwrap();
    let mut entries = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let mut body = String::new();
        entry.read_to_string(&mut body).unwrap();
        entries.push((entry.name().unwrap().to_string(), body));
    }
    entries.sort();
    assert_eq!(
        entries,
        [
            ("Contract 2025.pdf".to_owned(), "contract bytes".to_owned()),
            (
                "Invoice November 2025.pdf".to_owned(),
                "invoice bytes".to_owned()
            ),
        ]
    );
    browser.wait_for_text("#bulk-status", "ready").await;

    // Only the protected file selected: Delete is off, and the page says why.
    browser.goto(&app.url("/app/customers/cust-42/files")).await;
    tick("Product sheet").await;
    let delete = browser.find("[data-bulk=delete]").await;
    assert!(
        !delete.is_enabled().await.unwrap(),
        "a protected file cannot be deleted"
    );
    let why = browser.find("[data-delete-why]").await;
    assert!(why.is_displayed().await.unwrap());
    assert!(why.text().await.unwrap().contains("protected"));

    // Select all, Delete: the dialog names how many go and how many stay.
    browser.click("[data-select-all]").await;
    browser
        .wait_for_text("[data-selected-count]", "3 files selected")
        .await;
    browser.click("[data-bulk=delete]").await;
    let question = browser
        .wait_for_text(
            "#confirm-delete [data-confirm-text]",
            "Delete 2 files permanently?",
        )
        .await;
    assert!(
        question
            .text()
            .await
            .unwrap()
            .contains("1 protected file stays")
    );
    browser.check_page("console-delete-dialog").await;
    // Cancel first: nothing happens.
    browser.click("#confirm-delete [data-close]").await;
    assert_eq!(listed_names(&app, "cust-42").await.len(), 3);
    browser.click("[data-bulk=delete]").await;
    browser.click("#confirm-delete [data-confirm-delete]").await;
    browser.wait_for_text("#flash", "Deleted 2 files.").await;
    assert_eq!(shown_names(&browser).await, ["Product sheet"]);
    assert_eq!(listed_names(&app, "cust-42").await, ["Product sheet"]);
}

#[tokio::test]
async fn rename_visibility_and_signature_go_through_the_edit_window_and_markup_stays_text() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let markup = "<img src=x onerror=alert(1)>";
    let file = app
        .upload_ok(&staff, "cust-42", markup, b"x".to_vec())
        .await;
    let id = file["id"].as_str().unwrap().to_owned();

    let browser = Browser::start().await;
    app.sign_in(&browser, &staff).await;
    browser.goto(&app.url("/app/customers/cust-42/files")).await;
    // Shown as those characters, and no image was made of them.
    assert_eq!(shown_names(&browser).await, [markup]);
    let images = browser
        .execute(
            "return document.querySelectorAll('#files-table img').length;",
            vec![],
        )
        .await;
    assert_eq!(images, json!(0));

    browser.click(&format!("[data-edit='{id}']")).await;
    browser.fill("#edit-name", "Lease 2026").await;
    browser
        .choose("#edit-visibility", "portal_and_moving")
        .await;
    browser.check_page("console-edit-file").await;
    browser.click("#edit-file button[type=submit]").await;
    browser.wait_for_text("#flash", "Changes saved.").await;
    assert_eq!(shown_names(&browser).await, ["Lease 2026"]);

    browser
        .click(&format!(
            "tr[data-file-id='{id}'] form[data-api$='/signature'] button"
        ))
        .await;
    browser.wait_for_text("#flash", "Marked as signed.").await;
    let now = app.api(&staff).file(&id).await;
    assert_eq!(now.name, "Lease 2026");
    assert_eq!(now.visibility, "portal_and_moving");
    assert!(now.signed_at.is_some());
    // The edit and the signature went with Idempotency-Keys of their own
    // (ADR 0017), each answered: a retry after a network error repeats them.
    let answered: i64 = app
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM http_idempotency WHERE state = 'done' AND status = 200",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        answered >= 2,
        "the page's edit and signature carried keys ({answered} answered)"
    );

    // The single download is the exact bytes under the display name.
    browser
        .click(&format!("tr[data-file-id='{id}'] a[download]"))
        .await;
    let download = browser
        .wait_for_download(|name: &str| name.starts_with("Lease 2026"))
        .await;
    assert_eq!(download.bytes, b"x");

    // The audit page shows what happened, filtered by the file.
    browser
        .goto(&app.url(&format!("/app/audit?file_id={id}")))
        .await;
    browser.wait_for_text("table", "file.renamed").await;
    browser.check_page("console-audit").await;
}

#[tokio::test]
async fn staff_run_a_customers_tasks_and_the_portal_switch_from_the_console() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let customer = app.customer("acme", "cust-42");
    let browser = Browser::start().await;
    app.sign_in(&browser, &staff).await;
    browser.goto(&app.url("/app/customers/cust-42/tasks")).await;
    browser
        .fill("#task-title", "Send your bank statements")
        .await;
    browser
        .click("form[data-api$='/tasks'] button[type=submit]")
        .await;
    browser.wait_for_text("#flash", "Task created.").await;
    let tasks: Value = app
        .get(&staff, "/v1/customers/cust-42/tasks")
        .await
        .json()
        .await
        .unwrap();
    let task_id = tasks["items"][0]["id"].as_str().unwrap().to_owned();

    // The customer uploads the wrong file and says so in the thread.
    let wrong = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"wrong".to_vec()).file_name("holiday.jpg"),
    );
    let uploaded = app
        .post_form(
            &customer,
            &format!("/v1/portal/tasks/{task_id}/attachments"),
            wrong,
        )
        .await;
    assert_eq!(uploaded.status(), 201);
    let said =
        reqwest::multipart::Form::new().text("text", "Sorry, wrong file: please remove the photo");
    let sent = app
        .post_form(
            &customer,
            &format!("/v1/portal/tasks/{task_id}/messages"),
            said,
        )
        .await;
    assert_eq!(sent.status(), 201);

    // Staff reply with an attachment, then remove the wrong one.
    browser.goto(&app.url("/app/customers/cust-42/tasks")).await;
    browser
        .wait_for_text(".thread", "please remove the photo")
        .await;
    browser
        .fill(
            &format!("#reply-{task_id}"),
            "Removed it. Here is the form to sign.",
        )
        .await;
    browser
        .upload_file(&format!("#reply-file-{task_id}"), "form.pdf", b"form")
        .await;
    browser.click("form.compose button[type=submit]").await;
    browser.wait_for_text("#flash", "Reply sent.").await;
    browser
        .wait_for_text(".thread", "Here is the form to sign.")
        .await;
    browser.wait_for_text(".attachments", "form").await;
    browser.click("form[data-confirm] button").await;
    browser
        .wait_for_text("#confirm [data-confirm-text]", "holiday")
        .await;
    browser.click("#confirm [data-confirm-yes]").await;
    browser.wait_for_text("#flash", "Attachment removed.").await;
    browser.check_page("console-tasks").await;
    let portal: Value = app
        .get(&customer, "/v1/portal/tasks")
        .await
        .json()
        .await
        .unwrap();
    let attachments: Vec<&str> = portal["items"][0]["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["file_name"].as_str().unwrap())
        .collect();
    assert_eq!(attachments, ["form.pdf"]);

    // Settings: switch portal uploads off.
    browser.goto(&app.url("/app/settings")).await;
    browser.click("#portal_uploads_enabled").await;
    browser
        .click("form[data-api='PUT /v1/settings'] button[type=submit]")
        .await;
    browser.wait_for_text("#flash", "Settings saved.").await;
    assert!(
        !browser
            .find("#portal_uploads_enabled")
            .await
            .is_selected()
            .await
            .unwrap()
    );
    browser.check_page("console-settings").await;
    let refused = app
        .post_form(
            &customer,
            &format!("/v1/portal/tasks/{task_id}/attachments"),
            reqwest::multipart::Form::new().part(
                "file",
                reqwest::multipart::Part::bytes(b"x".to_vec()).file_name("x.pdf"),
            ),
        )
        .await;
    assert_eq!(refused.status(), 403);
}

#[tokio::test]
async fn a_form_another_site_posts_with_the_staff_session_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    // Another site on this very host (another port: the same "site" to
    // SameSite, so the cookie goes along): a page that posts a form to
    // Dossier as soon as it loads, shaped to look like JSON.
    let target = app.url("/v1/customers/cust-42/tasks");
    let page = format!(
        r#"<!doctype html><html lang="en"><head><title>Win a prize</title>
<script src="/go.js" defer></script></head><body><main>
<form id="f" method="post" action="{target}" enctype="text/plain">
<input type="hidden" name='{{"title":"forged","x":"' value='"}}'>
</form></main></body></html>"#
    );
    let evil = Router::new()
        .route("/", get(move || std::future::ready(Html(page.clone()))))
        .route(
            "/go.js",
            get(|| async {
                (
                    [("content-type", "text/javascript")],
                    "document.getElementById('f').submit();",
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil_address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, evil).await });

    let browser = Browser::start().await;
    app.sign_in(&browser, &staff).await;
    browser.goto(&format!("http://{evil_address}/")).await;
    let answer = browser.wait_for_text("body", "forbidden").await;
    assert!(answer.text().await.unwrap().contains("another site"));
    let tasks: Value = app
        .get(&staff, "/v1/customers/cust-42/tasks")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tasks["items"], json!([]), "no task was created");

    // The same session still works from Dossier's own page.
    browser.goto(&app.url("/app/customers/cust-42/tasks")).await;
    browser.fill("#task-title", "Real task").await;
    browser
        .click("form[data-api$='/tasks'] button[type=submit]")
        .await;
    browser.wait_for_text("#flash", "Task created.").await;
}

#[tokio::test]
async fn a_newcomer_signs_in_as_staff_then_as_a_customer_with_the_development_form() {
    let app = TestApp::spawn_with(&[(
        "DOSSIER_JWT_SECRET",
        dossier_runtime::config::DEV_JWT_SECRET,
    )])
    .await;
    let browser = Browser::start().await;
    browser.goto(&app.url("/")).await;
    browser.wait_for_text("h1", "Sign in to Dossier").await;
    browser.check_page("login").await;

    // Staff of tenant "demo".
    browser.fill("#as-tenant", "demo").await;
    browser.fill("#as-user", "ada").await;
    browser
        .click("form[action='/login/as'] button[type=submit]")
        .await;
    browser
        .wait_for_text("form.whoami", "ada · staff · demo")
        .await;
    browser.fill("#open-id", "cust-42").await;
    browser
        .click("form[action='/app/customers/open'] button")
        .await;
    browser.wait_for_text("h1", "Customer cust-42").await;
    browser.goto(&app.url("/app/customers/cust-42/tasks")).await;
    browser.fill("#task-title", "Your first task").await;
    browser
        .click("form[data-api$='/tasks'] button[type=submit]")
        .await;
    browser.wait_for_text("#flash", "Task created.").await;
    browser.click("form.whoami button").await;

    // The customer cust-42 of the same tenant sees the task; the console is
    // not theirs.
    browser.wait_for_text("h1", "Sign in to Dossier").await;
    browser.choose("#as-role", "customer").await;
    browser.fill("#as-user", "carla").await;
    browser.fill("#as-customer", "cust-42").await;
    browser
        .click("form[action='/login/as'] button[type=submit]")
        .await;
    browser
        .wait_for_text("h1", "Your tasks and documents")
        .await;
    browser.wait_for_text(".task-list", "Your first task").await;
    browser.goto(&app.url("/app")).await;
    browser.wait_for_text("h1", "Not allowed").await;
    browser.check_page("error-forbidden").await;
}

#[tokio::test]
async fn an_upload_that_fails_says_whether_the_server_or_the_network_failed() {
    let (mut app, s3) = TestApp::spawn_behind_s3_proxy(&[]).await;
    let browser = Browser::start().await;
    app.sign_in(&browser, &app.staff("acme")).await;
    browser.goto(&app.url("/app/customers/cust-42/files")).await;
    browser.click("[data-open=add-file]").await;
    browser.fill("#add-name", "Bank statement").await;
    browser
        .upload_file("#add-file-input", "statement.pdf", b"statement")
        .await;

    // The blob store is down: the server answers 503, and the window says so.
    s3.cut().await;
    browser.click("#add-file button[type=submit]").await;
    let status = browser
        .wait_for_text("#add-file [data-status]", "Server error (503)")
        .await;
    assert!(status.text().await.unwrap().contains("Try again"));
    s3.restore();

    // Dossier cannot be reached at all: a network problem.
    app.shutdown().await.unwrap();
    browser.click("#add-file button[type=submit]").await;
    browser
        .wait_for_text("#add-file [data-status]", "Network problem")
        .await;
    browser.screenshot("console-add-file-network-problem").await;
}
