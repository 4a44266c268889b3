//! The browser harness (dossier_test_support::browser) on fixture pages of its
//! own: a tiny axum server in the test, every answer under the strict
//! Content-Security-Policy Dossier's pages send, so that what the page tests
//! rely on (axe-core injected past the CSP, screenshots, file drops, uploads,
//! downloads) is known to work before a real page is tested with it.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Multipart, State};
use axum::http::{HeaderValue, header};
use axum::response::{Html, Response};
use axum::routing::get;
use dossier_test_support::browser::Browser;

/// What Dossier's pages send.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'";

/// An accessible page with a drop zone, an upload form and a download link;
/// its one inline script must not run (the CSP forbids it).
const GOOD_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Fixture</title>
<script src="/app.js" defer></script>
<script>window.inlineRan = true;</script>
</head>
<body>
<main>
<h1>Fixture</h1>
<section id="drop" aria-label="Drop a file here"><p>Drop a file here</p></section>
<p id="dropped">nothing dropped</p>
<form method="post" action="/upload" enctype="multipart/form-data">
<label for="note">Note</label>
<input id="note" type="text" name="note">
<label for="file">Document</label>
<input id="file" type="file" name="file">
<button type="submit">Send</button>
</form>
<p><a href="/report">Download the report</a></p>
</main>
</body>
</html>"#;

/// A page with two critical violations: an image without a text alternative
/// and a field without a label.
const BROKEN_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Broken</title></head>
<body>
<main>
<h1>Broken</h1>
<img src="/pixel.svg">
<input type="text" name="nameless">
</main>
</body>
</html>"#;

/// The page's own script: reads what is dropped on #drop into #dropped.
const APP_JS: &str = r#"
const zone = document.getElementById("drop");
zone.addEventListener("dragover", (event) => event.preventDefault());
zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    const bytes = new Uint8Array(await file.arrayBuffer());
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    document.getElementById("dropped").textContent =
        `${file.name} ${file.size} ${file.type} ${hex}`;
});
"#;

const REPORT: &[u8] = b"quarterly report\n\x00\x01\xfe\xff";

/// What the upload form delivered: each part's field name, file name (empty
/// for a text field) and bytes.
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

async fn upload(State(received): State<Received>, mut form: Multipart) -> Html<String> {
    while let Some(field) = form.next_field().await.expect("a multipart form") {
        let name = field.name().unwrap_or_default().to_owned();
        let file_name = field.file_name().unwrap_or_default().to_owned();
        let bytes = field.bytes().await.expect("the part's bytes").to_vec();
        received.lock().unwrap().push((name, file_name, bytes));
    }
    Html(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Received</title></head>
           <body><main><h1 id="received">Received</h1></main></body></html>"#
            .into(),
    )
}

/// Serves the fixture pages on 127.0.0.1 and answers their address.
async fn fixture_server() -> (String, Received) {
    let received = Received::default();
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                (
                    [(
                        header::SET_COOKIE,
                        "fixture=yes; Path=/; HttpOnly; SameSite=Strict",
                    )],
                    Html(GOOD_PAGE),
                )
            }),
        )
        .route("/broken", get(|| async { Html(BROKEN_PAGE) }))
        .route(
            "/app.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], APP_JS) }),
        )
        .route(
            "/pixel.svg",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "image/svg+xml")],
                    r#"<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>"#,
                )
            }),
        )
        .route(
            "/report",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "application/octet-stream"),
                        (
                            header::CONTENT_DISPOSITION,
                            r#"attachment; filename="report.bin""#,
                        ),
                    ],
                    REPORT,
                )
            }),
        )
        .route("/upload", axum::routing::post(upload))
        .with_state(received.clone())
        .layer(axum::middleware::map_response(
            |mut response: Response| async {
                response.headers_mut().insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(CSP),
                );
                response
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port for the fixture server");
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, received)
}

/// PNG's signature, then the IHDR chunk's width and height.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

#[tokio::test]
async fn pages_load_under_a_strict_csp_are_screenshot_and_checked_by_axe() {
    let (address, _) = fixture_server().await;
    let browser = Browser::start().await;

    browser.goto(&format!("{address}/")).await;
    browser.wait_for_text("h1", "Fixture").await;
    assert_eq!(browser.current_url().await.path(), "/");
    let cookies = browser.cookies().await;
    assert!(
        cookies
            .iter()
            .any(|c| c.name() == "fixture" && c.value() == "yes" && c.http_only() == Some(true)),
        "{cookies:?}"
    );
    // The CSP is in force: the page's inline script was refused ...
    assert_eq!(
        browser
            .execute("return window.inlineRan === undefined;", vec![])
            .await,
        true,
        "the fixture's inline script ran, so its CSP is not applied"
    );
    // ... and axe-core still gets in, finding nothing serious.
    let shot = browser.check_page("harness-fixture").await;
    let png = std::fs::read(&shot).expect("the screenshot file");
    assert_eq!(png_size(&png), (1280, 900), "{}", shot.display());

    browser.set_viewport(390, 844).await;
    let phone = browser.screenshot("harness-fixture-phone").await;
    assert_eq!(png_size(&std::fs::read(&phone).unwrap()), (390, 844));

    browser.goto(&format!("{address}/broken")).await;
    let violations = browser.accessibility_violations().await;
    let blocking: Vec<&str> = violations
        .iter()
        .filter(|v| v.is_blocking())
        .map(|v| v.id.as_str())
        .collect();
    assert!(
        blocking.contains(&"image-alt") && blocking.contains(&"label"),
        "axe-core reports the image without alt and the field without label: {violations:#?}"
    );
    // assert_accessible fails the test on them, naming each rule and element.
    let failed = tokio::spawn(async move {
        browser.assert_accessible("broken fixture").await;
    })
    .await
    .expect_err("assert_accessible fails on the broken page");
    let message = failed
        .into_panic()
        .downcast::<String>()
        .expect("a panic message");
    for expected in ["broken fixture", "image-alt", "label", "img", "/broken"] {
        assert!(message.contains(expected), "{expected:?} in: {message}");
    }
}

#[tokio::test]
async fn files_are_dropped_uploaded_and_downloaded() {
    let (address, received) = fixture_server().await;
    let browser = Browser::start().await;
    browser.goto(&format!("{address}/")).await;

    // A drop the page's own script reads, bytes and all.
    let dropped: &[u8] = b"%PDF\x00\xff";
    browser
        .synthetic_drop("#drop", "scan.pdf", dropped, "application/pdf")
        .await;
    browser
        .wait_for_text("#dropped", "scan.pdf 6 application/pdf 2550444600ff")
        .await;

    // An upload through the form, as a person filling it in would.
    let uploaded = b"bank statement \x00\x01\x02".to_vec();
    browser.fill("#note", "March").await;
    browser
        .upload_file("#file", "statement.pdf", &uploaded)
        .await;
    browser.click("button[type=submit]").await;
    browser.wait_for("#received").await;
    assert_eq!(
        received.lock().unwrap().clone(),
        vec![
            ("note".to_owned(), String::new(), b"March".to_vec()),
            ("file".to_owned(), "statement.pdf".to_owned(), uploaded)
        ]
    );

    // A Content-Disposition: attachment answer lands in the download folder.
    browser.goto(&format!("{address}/")).await;
    browser.click("a[href='/report']").await;
    let download = browser.wait_for_download("report.bin").await;
    assert_eq!(download.bytes, REPORT);
    // Taken out of the folder: the same link downloads anew, not "report (1).bin".
    browser.click("a[href='/report']").await;
    let again = browser
        .wait_for_download(|name: &str| name.starts_with("report"))
        .await;
    assert_eq!(
        (again.file_name.as_str(), again.bytes.as_slice()),
        ("report.bin", REPORT)
    );
}
