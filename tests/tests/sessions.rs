//! The browser's session over plain HTTP: signing in with a token keeps it in
//! a cookie, the API takes that cookie like a bearer token, and a request
//! another site starts cannot change anything with it. Also what every page
//! answer carries (the security headers) and who may open which pages. The
//! pages in a real browser are in `console.rs` and `portal_pages.rs`.

use dossier_api::auth::jwt::{self, Claims, Role};
use dossier_runtime::config::DEV_JWT_SECRET;
use dossier_test_support::{SECRET, TestApp, error_code};
use reqwest::header::{CONTENT_SECURITY_POLICY, COOKIE, LOCATION, ORIGIN, SET_COOKIE};
use reqwest::redirect::Policy;
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};

/// A client that shows redirects instead of following them.
fn browser_like() -> Client {
    Client::builder().redirect(Policy::none()).build().unwrap()
}

/// `POST /login` with `token`, as the sign-in page's form sends it.
async fn log_in(app: &TestApp, token: &str, next: &str) -> Response {
    browser_like()
        .post(app.url("/login"))
        .header(ORIGIN, app.address.as_str())
        .form(&[("token", token), ("next", next)])
        .send()
        .await
        .unwrap()
}

/// The `name=value` of the session cookie a sign-in answer sets.
fn session_cookie(response: &Response) -> String {
    let set = response
        .headers()
        .get(SET_COOKIE)
        .expect("a session cookie")
        .to_str()
        .unwrap();
    set.split(';').next().unwrap().to_owned()
}

#[tokio::test]
async fn signing_in_keeps_the_token_in_an_http_only_lax_cookie_until_it_expires() {
    let app = TestApp::spawn().await;
    let response = log_in(&app, &app.staff("acme"), "").await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/app");
    let set = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(set.starts_with("dossier_session=ey"), "{set}");
    for attribute in ["Path=/", "HttpOnly", "SameSite=Lax"] {
        assert!(set.contains(attribute), "{attribute} missing in {set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    let max_age: i64 = set
        .split("; ")
        .find_map(|a| a.strip_prefix("Max-Age="))
        .unwrap()
        .parse()
        .unwrap();
    // The harness's tokens live an hour.
    assert!((3590..=3600).contains(&max_age), "{max_age}");

    // Behind a proxy that says HTTPS, the cookie is Secure.
    let over_https = browser_like()
        .post(app.url("/login"))
        .header(ORIGIN, app.address.as_str())
        .header("x-forwarded-proto", "https")
        .form(&[("token", app.staff("acme").as_str())])
        .send()
        .await
        .unwrap();
    assert!(
        over_https.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("; Secure")
    );
}

#[tokio::test]
async fn each_role_lands_on_its_own_start_page_and_next_only_leads_within_this_site() {
    let app = TestApp::spawn().await;
    for (token, home) in [
        (app.staff("acme"), "/app"),
        (app.auditor("acme"), "/app/audit"),
        (app.customer("acme", "cust-1"), "/portal"),
    ] {
        let response = log_in(&app, &token, "").await;
        assert_eq!(response.headers()[LOCATION], home);
        let cookie = session_cookie(&response);
        let root = browser_like()
            .get(app.url("/"))
            .header(COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(root.headers()[LOCATION], home);
    }
    let staff = app.staff("acme");
    let response = log_in(&app, &staff, "/app/audit?customer_id=cust-1").await;
    assert_eq!(
        response.headers()[LOCATION],
        "/app/audit?customer_id=cust-1"
    );
    for away in [
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example",
    ] {
        let response = log_in(&app, &staff, away).await;
        assert_eq!(response.headers()[LOCATION], "/app", "{away}");
    }
    // Without a session, `/` and every page send a person to sign in, and
    // come back afterwards.
    let root = browser_like().get(app.url("/")).send().await.unwrap();
    assert_eq!(root.headers()[LOCATION], "/login");
    let page = browser_like()
        .get(app.url("/app/customers/cust-1/files?viewed=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        page.headers()[LOCATION],
        "/login?next=/app/customers/cust-1/files%3Fviewed%3Dtrue"
    );
}

#[tokio::test]
async fn a_token_that_is_not_valid_shows_the_sign_in_page_again_and_sets_no_cookie() {
    let app = TestApp::spawn().await;
    let response = log_in(&app, "not-a-token", "").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().get(SET_COOKIE).is_none());
    let page = response.text().await.unwrap();
    assert!(page.contains("That token does not sign you in"), "{page}");

    // Signed with another secret: refused too.
    let now = chrono::Utc::now().timestamp();
    let forged = jwt::issue(
        b"some-other-secret-of-32-bytes-or-more",
        &Claims {
            sub: "mallory".into(),
            tenant: "acme".into(),
            role: Role::Staff,
            customer: None,
            exp: now + 600,
            iat: Some(now),
        },
    );
    assert_eq!(
        log_in(&app, &forged, "").await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn the_session_cookie_reads_and_writes_like_a_bearer_token_but_another_site_changes_nothing()
{
    let app = TestApp::spawn().await;
    let cookie = session_cookie(&log_in(&app, &app.staff("acme"), "").await);
    let client = browser_like();

    // A read with the cookie alone.
    let list = client
        .get(app.url("/v1/customers/cust-1/files"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), StatusCode::OK);

    // A write from a page of this site: by Origin, or by Sec-Fetch-Site.
    let create = |origin: Option<&str>, fetch_site: Option<&str>, title: &str| {
        let mut request = client
            .post(app.url("/v1/customers/cust-1/tasks"))
            .header(COOKIE, &cookie)
            .json(&json!({ "title": title }));
        if let Some(origin) = origin {
            request = request.header(ORIGIN, origin);
        }
        if let Some(site) = fetch_site {
            request = request.header("sec-fetch-site", site);
        }
        request.send()
    };
    let same_origin = create(Some(&app.address), None, "by origin").await.unwrap();
    assert_eq!(same_origin.status(), StatusCode::CREATED);
    let same_site = create(None, Some("same-origin"), "by fetch metadata")
        .await
        .unwrap();
    assert_eq!(same_site.status(), StatusCode::CREATED);

    // Another site's page, a page on another port of the same host, a
    // browser that says nothing about where the request came from: 403.
    for (origin, site) in [
        (Some("http://evil.example"), None),
        (Some("http://127.0.0.1:1"), None),
        (Some("null"), None),
        (Some(app.address.as_str()), Some("cross-site")),
        (None, Some("same-site")),
        (None, None),
    ] {
        let refused = create(origin, site, "forged").await.unwrap();
        assert_eq!(
            refused.status(),
            StatusCode::FORBIDDEN,
            "{origin:?} {site:?}"
        );
        assert_eq!(error_code(refused).await, "forbidden");
    }
    let tasks: Value = app
        .get(&app.staff("acme"), "/v1/customers/cust-1/tasks")
        .await
        .json()
        .await
        .unwrap();
    let titles: Vec<&str> = tasks["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["by origin", "by fetch metadata"]);

    // The bearer header needs no such check: it is never sent by itself.
    let bearer = app
        .send_json(
            reqwest::Method::POST,
            &app.staff("acme"),
            "/v1/customers/cust-1/tasks",
            json!({"title": "by bearer"}),
        )
        .await;
    assert_eq!(bearer.status(), StatusCode::CREATED);

    // Signing in from another site is refused as well (login forgery).
    let forged_login = client
        .post(app.url("/login"))
        .header(ORIGIN, "http://evil.example")
        .form(&[("token", app.staff("acme").as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(forged_login.status(), StatusCode::FORBIDDEN);
    assert!(forged_login.headers().get(SET_COOKIE).is_none());
}

#[tokio::test]
async fn signing_out_ends_the_session() {
    let app = TestApp::spawn().await;
    let cookie = session_cookie(&log_in(&app, &app.staff("acme"), "").await);
    let out = browser_like()
        .post(app.url("/logout"))
        .header(COOKIE, &cookie)
        .header(ORIGIN, app.address.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_eq!(out.headers()[LOCATION], "/login");
    let cleared = out.headers()[SET_COOKIE].to_str().unwrap();
    assert!(
        cleared.starts_with("dossier_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
}

#[tokio::test]
async fn sign_in_as_exists_only_while_the_service_uses_the_public_development_secret() {
    let app = TestApp::spawn().await;
    let page = reqwest::get(app.url("/login"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("With a token"));
    assert!(!page.contains("Sign in as"), "{page}");
    let minted = browser_like()
        .post(app.url("/login/as"))
        .header(ORIGIN, app.address.as_str())
        .form(&[("tenant", "acme"), ("role", "staff"), ("user", "eve")])
        .send()
        .await
        .unwrap();
    assert_eq!(minted.status(), StatusCode::NOT_FOUND);
    assert!(minted.headers().get(SET_COOKIE).is_none());
    assert_ne!(SECRET, DEV_JWT_SECRET);

    let dev = TestApp::spawn_with(&[("DOSSIER_JWT_SECRET", DEV_JWT_SECRET)]).await;
    let page = reqwest::get(dev.url("/login"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Sign in as"), "{page}");
    let signed_in = browser_like()
        .post(dev.url("/login/as"))
        .header(ORIGIN, dev.address.as_str())
        .form(&[
            ("tenant", "acme"),
            ("role", "customer"),
            ("user", "carla"),
            ("customer", "cust-7"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), StatusCode::SEE_OTHER);
    assert_eq!(signed_in.headers()[LOCATION], "/portal");
    let token = session_cookie(&signed_in)
        .strip_prefix("dossier_session=")
        .unwrap()
        .to_owned();
    let claims = jwt::verify(DEV_JWT_SECRET.as_bytes(), &token).unwrap();
    assert_eq!(
        (
            claims.tenant.as_str(),
            claims.role,
            claims.customer.as_deref()
        ),
        ("acme", Role::Customer, Some("cust-7"))
    );
}

#[tokio::test]
async fn pages_and_api_answers_carry_a_strict_content_security_policy() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    for path in [
        "/login",
        "/app/customers/cust-1/files",
        "/v1/customers/cust-1/files",
    ] {
        let response = app.get(&staff, path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let policy = response.headers()[CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'self'",
        ] {
            assert!(policy.contains(directive), "{path}: {policy}");
        }
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    }
    // The pages' script and style come from this site and have no inline parts.
    let page = app
        .get(&staff, "/app/customers/cust-1/files")
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"<script src="/assets/dossier.js" defer></script>"#));
    assert_eq!(page.matches("<script").count(), 1, "no inline script");
    assert!(!page.contains("style=\""), "no inline style");
    let script = app.get(&staff, "/assets/dossier.js").await;
    assert_eq!(
        script.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
}

#[tokio::test]
async fn a_file_name_with_markup_is_shown_as_text_on_every_page() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let markup = "<img src=x onerror=alert(1)>";
    let file = app.upload_ok(&staff, "cust-1", markup, b"x".to_vec()).await;
    let page = app
        .get(&staff, "/app/customers/cust-1/files")
        .await
        .text()
        .await
        .unwrap();
    assert!(!page.contains(markup), "raw markup in the page");
    assert!(
        page.contains("&#60;img src=x onerror=alert(1)&#62;"),
        "{page}"
    );
    assert!(page.contains(file["id"].as_str().unwrap()));
}

#[tokio::test]
async fn each_role_opens_only_its_own_pages_and_a_customer_only_their_own_tasks() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let customer = app.customer("acme", "cust-1");
    let auditor = app.auditor("acme");
    let status = |token: String, path: &'static str| {
        let app = &app;
        async move { app.get(&token, path).await.status() }
    };
    assert_eq!(
        status(customer.clone(), "/app").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(customer.clone(), "/app/audit").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(staff.clone(), "/portal").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(auditor.clone(), "/app/customers/cust-1/files").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(status(auditor.clone(), "/app/audit").await, StatusCode::OK);
    assert_eq!(status(customer.clone(), "/portal").await, StatusCode::OK);

    let task: Value = app
        .send_json(
            reqwest::Method::POST,
            &staff,
            "/v1/customers/cust-1/tasks",
            json!({"title": "Send your payslips"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let path = format!("/portal/tasks/{}", task["id"].as_str().unwrap());
    let own = app.get(&customer, &path).await;
    assert_eq!(own.status(), StatusCode::OK);
    assert!(own.text().await.unwrap().contains("Send your payslips"));
    let other = app.get(&app.customer("acme", "cust-2"), &path).await;
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    let other_tenant = app.get(&app.customer("globex", "cust-1"), &path).await;
    assert_eq!(other_tenant.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_message_may_carry_a_file_without_text_but_not_be_empty() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let customer = app.customer("acme", "cust-1");
    let task: Value = app
        .send_json(
            reqwest::Method::POST,
            &staff,
            "/v1/customers/cust-1/tasks",
            json!({"title": "Payslips"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let path = format!("/v1/portal/tasks/{}/messages", task["id"].as_str().unwrap());
    let file_only = reqwest::multipart::Form::new().text("text", "").part(
        "file",
        reqwest::multipart::Part::bytes(b"may".to_vec()).file_name("payslip_may.pdf"),
    );
    let sent = app.post_form(&customer, &path, file_only).await;
    assert_eq!(sent.status(), StatusCode::CREATED);
    let message: Value = sent.json().await.unwrap();
    assert_eq!(message["text"], "");
    assert!(message["file_id"].is_string());

    let empty = reqwest::multipart::Form::new().text("text", "  ");
    let refused = app.post_form(&customer, &path, empty).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(refused).await, "validation_failed");
}
