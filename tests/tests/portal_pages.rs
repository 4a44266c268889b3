//! The customer portal in a real headless Chromium against a real Dossier:
//! what the portal guide (`../shared/seeds/`) tells customers to do, done on
//! the pages and checked through the API. Every page shown is saved as a
//! screenshot and held to axe-core (`Browser::check_page`).

use dossier_test_support::TestApp;
use dossier_test_support::browser::Browser;
use dossier_test_support::client::Upload;
use reqwest::Method;
use serde_json::{Value, json};

/// A task for `cust-42` of tenant `acme`, made by staff; answers its id.
async fn task_for_cust_42(app: &TestApp, title: &str) -> String {
    let task = app.create_task(&app.staff("acme"), "cust-42", title).await;
    task["id"].as_str().unwrap().to_owned()
}

/// The task as the customer's portal API shows it now.
async fn portal_task(app: &TestApp, task_id: &str) -> Value {
    let tasks: Value = app
        .get(&app.customer("acme", "cust-42"), "/v1/portal/tasks")
        .await
        .json()
        .await
        .unwrap();
    tasks["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == task_id)
        .cloned()
        .expect("the task is listed")
}

fn file_names(task: &Value) -> Vec<String> {
    task["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["file_name"].as_str().unwrap().to_owned())
        .collect()
}

/// Nothing on the page deletes: no delete or remove control, no DELETE call.
async fn assert_no_delete_control(browser: &Browser) {
    let found = browser
        .execute(
            "return Array.from(document.querySelectorAll('button, a, [data-api]'))\
               .filter(e => /delete|remove/i.test(e.textContent + ' ' + (e.dataset.api || '') + ' ' + (e.getAttribute('aria-label') || '')))\
               .map(e => e.outerHTML);",
            vec![],
        )
        .await;
    assert_eq!(found, json!([]), "a delete control in the portal");
}

#[tokio::test]
async fn a_customer_opens_a_task_drops_a_file_on_it_and_uses_the_upload_button() {
    let app = TestApp::spawn().await;
    let task_id = task_for_cust_42(&app, "Send your bank statements").await;
    let staff = app.api(&app.staff("acme"));
    let published = staff
        .upload_file(
            "cust-42",
            &Upload::new("Tenancy agreement", b"lease".to_vec())
                .file("lease.pdf", "application/pdf")
                .field("visibility", "portal"),
        )
        .await;
    staff
        .upload("cust-42", "Internal assessment", b"secret".to_vec())
        .await;

    let browser = Browser::start().await;
    app.sign_in(&browser, &app.customer("acme", "cust-42"))
        .await;
    browser
        .wait_for_text("h1", "Your tasks and documents")
        .await;
    let dashboard = browser.find("main").await.text().await.unwrap();
    assert!(dashboard.contains("Send your bank statements"));
    assert!(dashboard.contains("Tenancy agreement"));
    assert!(!dashboard.contains("Internal assessment"), "rule 8");
    assert_no_delete_control(&browser).await;
    browser.check_page("portal-dashboard").await;

    // Opening a published document downloads it and marks it viewed.
    browser
        .click("a[aria-label='Download Tenancy agreement']")
        .await;
    let download = browser
        .wait_for_download(|name: &str| name.starts_with("Tenancy agreement"))
        .await;
    assert_eq!(download.bytes, b"lease");
    assert!(
        staff.file(&published.id).await.viewed_at.is_some(),
        "rule 9"
    );

    // Open the task: drag a file onto the window.
    browser.click("a[href^='/portal/tasks/']").await;
    browser
        .wait_for_text("h1", "Send your bank statements")
        .await;
    browser.check_page("portal-task").await;
    // Dragging a file over the open task shows where to let go.
    let overlay = browser.find("[data-drop-overlay]").await;
    assert!(!overlay.is_displayed().await.unwrap());
    browser
        .execute(
            "const transfer = new DataTransfer();\
             transfer.items.add(new File(['x'], 'x.pdf'));\
             document.querySelector('.task-window').dispatchEvent(new DragEvent('dragenter',\
               {bubbles: true, cancelable: true, dataTransfer: transfer}));",
            vec![],
        )
        .await;
    browser
        .wait_for_text("[data-drop-overlay]", "Release to upload")
        .await;
    assert!(overlay.is_displayed().await.unwrap());
    browser.screenshot("portal-task-drop-zone").await;
    browser
        .synthetic_drop(
            ".task-window",
            "statement_october.pdf",
            b"october",
            "application/pdf",
        )
        .await;
    browser.wait_for_text("#flash", "File uploaded").await;
    browser
        .wait_for_text(".attachments", "statement_october")
        .await;

    // Or press Upload file in the Details panel and choose one.
    browser
        .upload_file("#upload-file", "statement_november.pdf", b"november")
        .await;
    browser
        .wait_for_text(".attachments", "statement_november")
        .await;
    assert_no_delete_control(&browser).await;
    browser.check_page("portal-task-attachments").await;

    let task = portal_task(&app, &task_id).await;
    let mut names = file_names(&task);
    names.sort();
    assert_eq!(names, ["statement_november.pdf", "statement_october.pdf"]);
    for file in task["attachments"].as_array().unwrap() {
        assert_eq!(file["origin"], "customer_upload");
        assert_eq!(file["visibility"], "portal");
    }
}

#[tokio::test]
async fn a_message_with_the_paperclip_lands_in_the_thread_and_in_attachments() {
    let app = TestApp::spawn().await;
    let task_id = task_for_cust_42(&app, "Payslips").await;
    let browser = Browser::start().await;
    app.sign_in(&browser, &app.customer("acme", "cust-42"))
        .await;
    browser
        .goto(&app.url(&format!("/portal/tasks/{task_id}")))
        .await;
    browser.fill("#message-text", "Here is May's payslip").await;
    browser
        .upload_file("#message-file", "payslip_may.pdf", b"may")
        .await;
    browser
        .wait_for_text("form[data-message] [data-chosen]", "payslip_may.pdf")
        .await;
    browser
        .click("form[data-message] button[type=submit]")
        .await;
    browser.wait_for_text("#flash", "Message sent.").await;
    let message = browser
        .wait_for_text(".thread .message", "Here is May's payslip")
        .await;
    assert!(message.text().await.unwrap().contains("payslip_may.pdf"));
    browser
        .wait_for_text(".attachments", "payslip_may.pdf")
        .await;

    // A file alone, without words, is a message too.
    browser
        .upload_file("#message-file", "payslip_june.pdf", b"june")
        .await;
    browser
        .click("form[data-message] button[type=submit]")
        .await;
    browser
        .wait_for_text(".attachments", "payslip_june.pdf")
        .await;
    browser.check_page("portal-task-thread").await;

    let task = portal_task(&app, &task_id).await;
    assert_eq!(task["messages"].as_array().unwrap().len(), 2);
    assert_eq!(task["messages"][0]["text"], "Here is May's payslip");
    let mut names = file_names(&task);
    names.sort();
    assert_eq!(names, ["payslip_june.pdf", "payslip_may.pdf"]);
}

#[tokio::test]
async fn with_uploads_switched_off_the_task_shows_the_providers_notice_instead_of_upload_controls()
{
    let app = TestApp::spawn().await;
    let task_id = task_for_cust_42(&app, "Proof of address").await;
    let off = app
        .send_json(
            Method::PUT,
            &app.staff("acme"),
            "/v1/settings",
            json!({"portal_uploads_enabled": false}),
        )
        .await;
    assert_eq!(off.status(), 200);
    let browser = Browser::start().await;
    app.sign_in(&browser, &app.customer("acme", "cust-42"))
        .await;
    browser
        .goto(&app.url(&format!("/portal/tasks/{task_id}")))
        .await;
    let notice = browser.wait_for("[data-uploads-off]").await;
    let said = notice.text().await.unwrap();
    assert!(said.contains("turned off file uploads"), "{said}");
    assert!(
        said.contains("how they prefer to receive documents"),
        "{said}"
    );
    let inputs = browser
        .execute(
            "return document.querySelectorAll('input[type=file], [data-drop-target]').length;",
            vec![],
        )
        .await;
    assert_eq!(inputs, json!(0), "no upload control while uploads are off");
    // Writing in the thread still works.
    browser.fill("#message-text", "How should I send it?").await;
    browser
        .click("form[data-message] button[type=submit]")
        .await;
    browser
        .wait_for_text(".thread", "How should I send it?")
        .await;
    assert_no_delete_control(&browser).await;
    browser.check_page("portal-task-uploads-off").await;
}

#[tokio::test]
async fn a_file_over_the_limit_gets_the_compress_or_split_advice_and_nothing_is_stored() {
    let app = TestApp::spawn_with(&[("DOSSIER_MAX_FILE_BYTES", "1048576")]).await;
    let task_id = task_for_cust_42(&app, "Scans").await;
    let browser = Browser::start().await;
    app.sign_in(&browser, &app.customer("acme", "cust-42"))
        .await;
    browser
        .goto(&app.url(&format!("/portal/tasks/{task_id}")))
        .await;
    browser
        .upload_file("#upload-file", "scan.pdf", &vec![1; 1_048_577])
        .await;
    let status = browser
        .wait_for_text("#task-upload [data-status]", "File too big")
        .await;
    let said = status.text().await.unwrap();
    assert!(said.contains("1 MiB (1048576 bytes)"), "{said}");
    assert!(said.contains("compressing it or splitting it"), "{said}");
    browser.check_page("portal-task-too-big").await;
    assert!(file_names(&portal_task(&app, &task_id).await).is_empty());
    assert!(app.blob_keys().await.is_empty(), "nothing stored");
}

#[tokio::test]
async fn on_a_phone_the_task_details_show_an_upload_area_that_takes_a_file() {
    let app = TestApp::spawn().await;
    let task_id = task_for_cust_42(&app, "ID document").await;
    let browser = Browser::start().await;
    browser.set_viewport(390, 844).await;
    app.sign_in(&browser, &app.customer("acme", "cust-42"))
        .await;
    browser
        .goto(&app.url(&format!("/portal/tasks/{task_id}")))
        .await;
    let area = browser.wait_for(".details .upload-area").await;
    assert!(area.is_displayed().await.unwrap());
    let rect = browser
        .execute(
            "const r = document.querySelector('.details .upload-area').getBoundingClientRect();\
             return [r.left, r.right, r.top, r.height, document.documentElement.scrollWidth];",
            vec![],
        )
        .await;
    let [left, right, top, height, page_width]: [f64; 5] = serde_json::from_value(rect).unwrap();
    assert!(
        left >= 0.0 && right <= 390.0,
        "inside the screen: {left}..{right}"
    );
    assert!(top < 844.0, "on the first screen: {top}");
    assert!(height >= 44.0, "big enough to tap: {height}");
    assert!(page_width <= 390.0, "no sideways scrolling: {page_width}");
    browser.check_page("portal-task-phone").await;
    browser
        .upload_file("#upload-file", "passport.jpg", b"jpg")
        .await;
    browser.wait_for_text(".attachments", "passport.jpg").await;
}
