//! The staff file lifecycle end to end: real HTTP, real Postgres, a real S3
//! server over HTTP, the real application.

use std::collections::HashSet;

use dossier_api::auth::jwt::Role;
use dossier_test_support::client::{Client, Upload};
use dossier_test_support::{AppServer, TestApp, error_code, settings};
use reqwest::Method;
use serde_json::{Value, json};

const LIMIT: usize = 26_214_400;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

async fn event_count(app: &TestApp) -> i64 {
    let client = app.pool.get().await.unwrap();
    client
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_file_of_exactly_the_limit_is_accepted_and_one_byte_more_is_refused_with_nothing_stored()
{
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");

    let exact = app
        .upload(
            &staff,
            "cust-1",
            "big.bin",
            pattern(LIMIT),
            &[("name", "Exactly the limit")],
        )
        .await;
    assert_eq!(exact.status(), 201);
    let file: Value = exact.json().await.unwrap();
    assert_eq!(file["size"], LIMIT as u64);

    let events_before = event_count(&app).await;
    let blobs_before = app.blob_keys().await;
    let over = app
        .upload(
            &staff,
            "cust-1",
            "bigger.bin",
            pattern(LIMIT + 1),
            &[("name", "One byte more")],
        )
        .await;
    assert_eq!(over.status(), 413);
    let body: Value = over.json().await.unwrap();
    assert_eq!(body["error"]["code"], "file_too_large");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("25 MiB"),
        "the message names the limit: {body}"
    );
    assert_eq!(
        event_count(&app).await,
        events_before,
        "nothing was recorded"
    );
    assert_eq!(app.blob_keys().await, blobs_before, "nothing was stored");
    let list: Value = app
        .get(&staff, "/v1/customers/cust-1/files")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn an_uploaded_file_downloads_as_the_exact_bytes_with_its_metadata() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let bytes = pattern(70_000);
    let response = app
        .upload(
            &staff,
            "cust-42",
            "contract_2025.pdf",
            bytes.clone(),
            &[
                ("name", "Contract 2025"),
                ("visibility", "portal"),
                ("origin", "contract"),
                ("contract_id", "k-7"),
            ],
        )
        .await;
    assert_eq!(response.status(), 201);
    let file: Value = response.json().await.unwrap();
    assert_eq!(file["customer_id"], "cust-42");
    assert_eq!(file["name"], "Contract 2025");
    assert_eq!(file["file_name"], "contract_2025.pdf");
    assert_eq!(file["content_type"], "application/pdf");
    assert_eq!(file["size"], 70_000);
    assert_eq!(file["visibility"], "portal");
    assert_eq!(file["origin"], "contract");
    assert_eq!(file["contract_id"], "k-7");
    assert_eq!(file["viewed_at"], Value::Null);
    assert_eq!(file["signed_at"], Value::Null);
    assert_eq!(file["task_id"], Value::Null);
    assert_eq!(file["protected"], false);
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    assert_eq!(file["sha256"], sha);

    let id = file["id"].as_str().unwrap();
    let got: Value = app
        .get(&staff, &format!("/v1/files/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got, file);
    let content = app.get(&staff, &format!("/v1/files/{id}/content")).await;
    assert_eq!(content.status(), 200);
    assert_eq!(content.headers()["content-type"], "application/pdf");
    assert_eq!(
        content.headers()["content-disposition"],
        "attachment; filename=\"Contract 2025.pdf\"; filename*=UTF-8''Contract%202025.pdf"
    );
    assert_eq!(content.bytes().await.unwrap().as_ref(), bytes.as_slice());
}

#[tokio::test]
async fn a_file_whose_size_is_declared_first_is_stored_whole() {
    let app = TestApp::spawn().await;
    let api = app.api(&app.staff("acme"));
    // Several S3 parts' worth, so the multipart path would have been taken.
    let bytes = pattern(12 * 1024 * 1024 + 7);
    let upload = Upload::new("Scanned archive", bytes.clone()).declaring_size(bytes.len());
    let file = api.upload_file("cust-1", &upload).await;
    assert_eq!(file.size, bytes.len() as u64);
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    assert_eq!(file.sha256, sha);
    assert!(api.download(&file.id).await.bytes == bytes);
    assert_eq!(app.blob_keys().await.len(), 1);
}

#[tokio::test]
async fn a_file_that_is_not_its_declared_size_is_refused_with_nothing_stored() {
    let app = TestApp::spawn().await;
    let api = app.api(&app.staff("acme"));
    let bytes = pattern(6 * 1024 * 1024);
    let events_before = event_count(&app).await;
    for declared in [bytes.len() - 1, bytes.len() + 1] {
        let upload = Upload::new("Wrong size", bytes.clone()).declaring_size(declared);
        let response = api.post_upload("cust-1", &upload).await;
        assert_eq!(response.status(), 422, "declared {declared}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "validation_failed", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("size"),
            "the message names the field: {body}"
        );
    }
    // A size after the file part is a check of what arrived.
    let late = Upload::new("Late size", bytes.clone()).field("size", "5");
    let response = api.post_upload("cust-1", &late).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("size"),
        "the message names the field: {body}"
    );
    // Not a number of bytes.
    let bad = Upload::new("Bad size", bytes.clone()).declaring_size("-1");
    assert_eq!(api.post_upload("cust-1", &bad).await.status(), 422);

    assert_eq!(
        event_count(&app).await,
        events_before,
        "nothing was recorded"
    );
    assert!(app.blob_keys().await.is_empty(), "nothing was stored");
    assert!(api.list_all("cust-1", "").await.is_empty());
}

#[tokio::test]
async fn a_declared_size_past_the_limit_is_refused_before_the_file_is_read() {
    let app = TestApp::spawn().await;
    let api = app.api(&app.staff("acme"));
    let upload = Upload::new("Too big", pattern(1000)).declaring_size(LIMIT + 1);
    let response = api.post_upload("cust-1", &upload).await;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "file_too_large");
    assert!(app.blob_keys().await.is_empty(), "nothing was stored");
}

#[tokio::test]
async fn an_empty_file_is_accepted() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let file = app.upload_ok(&staff, "cust-1", "Empty", vec![]).await;
    assert_eq!(file["size"], 0);
    assert_eq!(
        file["sha256"],
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let content = app
        .get(
            &staff,
            &format!("/v1/files/{}/content", file["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(content.status(), 200);
    assert!(content.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn download_names_are_safe_and_keep_non_ascii_in_filename_star() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let cases = [
        (
            "Vertrag Müller",
            "vertrag.pdf",
            "attachment; filename=\"Vertrag M_ller.pdf\"; filename*=UTF-8''Vertrag%20M%C3%BCller.pdf",
        ),
        (
            "../../etc/passwd",
            "x.txt",
            "attachment; filename=\"_.._etc_passwd.txt\"; filename*=UTF-8''_.._etc_passwd.txt",
        ),
        (
            "C:\\Users\\a",
            "scan.JPG",
            "attachment; filename=\"C__Users_a.JPG\"; filename*=UTF-8''C__Users_a.JPG",
        ),
        (
            "Rechnung \"Q4\"",
            "r.pdf",
            "attachment; filename=\"Rechnung _Q4_.pdf\"; filename*=UTF-8''Rechnung%20_Q4_.pdf",
        ),
    ];
    for (name, file_name, expected) in cases {
        let response = app
            .upload(
                &staff,
                "cust-1",
                file_name,
                b"x".to_vec(),
                &[("name", name)],
            )
            .await;
        assert_eq!(response.status(), 201, "{name}");
        let file: Value = response.json().await.unwrap();
        let content = app
            .get(
                &staff,
                &format!("/v1/files/{}/content", file["id"].as_str().unwrap()),
            )
            .await;
        assert_eq!(content.headers()["content-disposition"], expected, "{name}");
    }
}

#[tokio::test]
async fn an_upload_without_a_name_or_with_a_bad_field_is_refused_with_nothing_stored() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[], "name"),
        (&[("name", "x"), ("visibility", "public")], "visibility"),
        (&[("name", "x"), ("origin", "alien")], "origin"),
    ];
    for (fields, field) in cases {
        let response = app
            .upload(&staff, "cust-1", "a.pdf", b"abc".to_vec(), fields)
            .await;
        assert_eq!(response.status(), 422);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "validation_failed");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{body}"
        );
    }
    assert!(
        app.blob_keys().await.is_empty(),
        "refused uploads leave no blob"
    );
    assert_eq!(event_count(&app).await, 0);
}

#[tokio::test]
async fn every_filter_and_the_cursor_pagination_work() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    // 120 files: every third published, every fifth from a contract.
    let mut ids = Vec::new();
    for i in 0..120 {
        let visibility = if i % 3 == 0 { "portal" } else { "internal" };
        let origin = if i % 5 == 0 {
            "contract"
        } else {
            "staff_upload"
        };
        let mut fields = vec![
            ("name", "Doc"),
            ("visibility", visibility),
            ("origin", origin),
        ];
        if i % 5 == 0 {
            fields.push(("contract_id", "k-1"));
        }
        let response = app
            .upload(&staff, "cust-1", "d.pdf", vec![i as u8], &fields)
            .await;
        assert_eq!(response.status(), 201);
        let file: Value = response.json().await.unwrap();
        ids.push(file["id"].as_str().unwrap().to_owned());
    }
    // Another customer's file never shows up.
    app.upload_ok(&staff, "cust-2", "Other", b"o".to_vec())
        .await;

    // Pagination: every file exactly once, newest first.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/customers/cust-1/files?limit=50&cursor={c}"),
            None => "/v1/customers/cust-1/files?limit=50".to_owned(),
        };
        let page: Value = app.get(&staff, &path).await.json().await.unwrap();
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    let count = |path: String| {
        let app = &app;
        let staff = staff.clone();
        async move {
            let response = app.get(&staff, &path).await;
            assert_eq!(response.status(), 200, "{path}");
            let page: Value = response.json().await.unwrap();
            page["items"].as_array().unwrap().len()
        }
    };
    let base = "/v1/customers/cust-1/files?limit=500";
    assert_eq!(count(format!("{base}&visibility=portal")).await, 40);
    assert_eq!(count(format!("{base}&visibility=internal")).await, 80);
    assert_eq!(
        count(format!("{base}&visibility=portal&visibility=internal")).await,
        120
    );
    assert_eq!(
        count(format!("{base}&visibility=portal_and_moving")).await,
        0
    );
    assert_eq!(count(format!("{base}&origin=contract")).await, 24);
    assert_eq!(count(format!("{base}&contract_id=k-1")).await, 24);
    assert_eq!(
        count(format!("{base}&origin=contract&visibility=portal")).await,
        8
    );
    assert_eq!(count(format!("{base}&viewed=false")).await, 120);
    assert_eq!(count(format!("{base}&viewed=true")).await, 0);
    let today = chrono::Utc::now().date_naive();
    assert_eq!(
        count(format!("{base}&created_from={today}&created_to={today}")).await,
        120
    );
    let tomorrow = today.succ_opt().unwrap();
    assert_eq!(count(format!("{base}&created_from={tomorrow}")).await, 0);
    let yesterday = today.pred_opt().unwrap();
    assert_eq!(count(format!("{base}&created_to={yesterday}")).await, 0);

    // The viewed filter follows the customer's first portal download.
    let portal_file = &ids[0];
    let customer = app.customer("acme", "cust-1");
    let download = app
        .get(
            &customer,
            &format!("/v1/portal/files/{portal_file}/content"),
        )
        .await;
    assert_eq!(download.status(), 200);
    let viewed: Value = app
        .get(&staff, &format!("{base}&viewed=true"))
        .await
        .json()
        .await
        .unwrap();
    let viewed_ids: Vec<&str> = viewed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(viewed_ids, [portal_file.as_str()]);
    assert_eq!(count(format!("{base}&viewed=false")).await, 119);

    // Malformed filters answer validation_failed naming the field.
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("visibility=public", "visibility"),
        ("viewed=maybe", "viewed"),
        ("created_from=yesterday", "created_from"),
        ("cursor=garbage", "cursor"),
        ("origin=alien", "origin"),
    ] {
        let response = app
            .get(&staff, &format!("/v1/customers/cust-1/files?{query}"))
            .await;
        assert_eq!(response.status(), 422, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "validation_failed");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{query}: {body}"
        );
    }
}

#[tokio::test]
async fn another_tenants_file_answers_404_on_every_endpoint_and_is_never_listed() {
    let app = TestApp::spawn().await;
    let acme = app.staff("acme");
    let globex = app.staff("globex");
    let file = app
        .upload_ok(&acme, "cust-1", "Secret", b"secret".to_vec())
        .await;
    let id = file["id"].as_str().unwrap();

    for response in [
        app.get(&globex, &format!("/v1/files/{id}")).await,
        app.get(&globex, &format!("/v1/files/{id}/content")).await,
        app.send_json(
            Method::PATCH,
            &globex,
            &format!("/v1/files/{id}"),
            json!({"name": "Mine"}),
        )
        .await,
        app.send_json(
            Method::POST,
            &globex,
            &format!("/v1/files/{id}/signature"),
            json!({}),
        )
        .await,
        app.delete(&globex, &format!("/v1/files/{id}?confirm=true"))
            .await,
    ] {
        assert_eq!(response.status(), 404);
        assert_eq!(error_code(response).await, "not_found");
    }
    let bulk: Value = app
        .send_json(
            Method::POST,
            &globex,
            "/v1/files/delete",
            json!({"file_ids": [id], "confirm": true}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(bulk["results"][0]["status"], "not_found");
    let list: Value = app
        .get(&globex, "/v1/customers/cust-1/files")
        .await
        .json()
        .await
        .unwrap();
    assert!(list["items"].as_array().unwrap().is_empty());

    // Unknown ids answer exactly the same.
    let unknown = uuid::Uuid::now_v7();
    let response = app.get(&globex, &format!("/v1/files/{unknown}")).await;
    assert_eq!(response.status(), 404);

    // And acme's file is untouched.
    let still: Value = app
        .get(&acme, &format!("/v1/files/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(still["name"], "Secret");
}

#[tokio::test]
async fn missing_or_bad_tokens_answer_401_and_wrong_roles_403() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let file = app.upload_ok(&staff, "cust-1", "Doc", b"d".to_vec()).await;
    let id = file["id"].as_str().unwrap();

    let anonymous = app
        .client
        .get(app.url(&format!("/v1/files/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(error_code(anonymous).await, "unauthorized");

    let forged = dossier_api::auth::jwt::issue(
        b"not-the-secret",
        &dossier_api::auth::jwt::Claims {
            sub: "x".into(),
            tenant: "acme".into(),
            role: Role::Staff,
            customer: None,
            exp: chrono::Utc::now().timestamp() + 60,
            iat: None,
        },
    );
    let response = app.get(&forged, &format!("/v1/files/{id}")).await;
    assert_eq!(response.status(), 401);

    let expired = dossier_api::auth::jwt::issue(
        dossier_test_support::SECRET.as_bytes(),
        &dossier_api::auth::jwt::Claims {
            sub: "x".into(),
            tenant: "acme".into(),
            role: Role::Staff,
            customer: None,
            // Well past the verification leeway (jwt::LEEWAY_SECS).
            exp: chrono::Utc::now().timestamp() - 3600,
            iat: None,
        },
    );
    assert_eq!(
        app.get(&expired, &format!("/v1/files/{id}")).await.status(),
        401
    );
    assert_eq!(
        app.get("garbage", &format!("/v1/files/{id}"))
            .await
            .status(),
        401
    );

    for token in [app.customer("acme", "cust-1"), app.auditor("acme")] {
        let response = app.get(&token, &format!("/v1/files/{id}")).await;
        assert_eq!(response.status(), 403);
        assert_eq!(error_code(response).await, "forbidden");
        let response = app
            .delete(&token, &format!("/v1/files/{id}?confirm=true"))
            .await;
        assert_eq!(response.status(), 403);
        let response = app
            .upload(&token, "cust-1", "a.pdf", b"a".to_vec(), &[("name", "x")])
            .await;
        assert_eq!(response.status(), 403);
    }
    assert!(
        app.get(&staff, &format!("/v1/files/{id}"))
            .await
            .status()
            .is_success()
    );
}

/// RFC 9110: the auth scheme is case-insensitive, so `bearer` and `BEARER`
/// open the API like `Bearer` does (issue 12: `bearer x` answered 401).
#[tokio::test]
async fn the_bearer_scheme_is_accepted_in_any_case() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let file = app.upload_ok(&staff, "cust-1", "Doc", b"d".to_vec()).await;
    let path = format!("/v1/files/{}", file["id"].as_str().unwrap());

    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        for separator in [" ", "  ", "\t"] {
            let response = app
                .client
                .get(app.url(&path))
                .header("authorization", format!("{scheme}{separator}{staff}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{scheme}{separator:?}<token>");
        }
    }
    for value in [
        format!("Basic {staff}"),
        format!("Bearer{staff}"),
        "bearer ".into(),
    ] {
        let response = app
            .client
            .get(app.url(&path))
            .header("authorization", value.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{value:.12}");
        assert_eq!(error_code(response).await, "unauthorized");
    }
}

#[tokio::test]
async fn deleting_a_protected_file_answers_409_and_keeps_it() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    for origin in ["system", "product"] {
        let response = app
            .upload(
                &staff,
                "cust-1",
                "terms.pdf",
                b"terms".to_vec(),
                &[("name", "Terms"), ("origin", origin)],
            )
            .await;
        let file: Value = response.json().await.unwrap();
        assert_eq!(file["protected"], true);
        let id = file["id"].as_str().unwrap();
        let response = app
            .delete(&staff, &format!("/v1/files/{id}?confirm=true"))
            .await;
        assert_eq!(response.status(), 409);
        assert_eq!(error_code(response).await, "file_protected");
        assert_eq!(
            app.get(&staff, &format!("/v1/files/{id}")).await.status(),
            200
        );
        assert_eq!(
            app.get(&staff, &format!("/v1/files/{id}/content"))
                .await
                .status(),
            200
        );
    }
}

#[tokio::test]
async fn deleting_without_confirmation_answers_422_and_keeps_the_file() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let file = app.upload_ok(&staff, "cust-1", "Doc", b"d".to_vec()).await;
    let id = file["id"].as_str().unwrap();
    for path in [
        format!("/v1/files/{id}"),
        format!("/v1/files/{id}?confirm=false"),
    ] {
        let response = app.delete(&staff, &path).await;
        assert_eq!(response.status(), 422);
        assert_eq!(error_code(response).await, "confirmation_required");
    }
    let response = app
        .send_json(
            Method::POST,
            &staff,
            "/v1/files/delete",
            json!({"file_ids": [id]}),
        )
        .await;
    assert_eq!(error_code(response).await, "confirmation_required");
    assert_eq!(
        app.get(&staff, &format!("/v1/files/{id}")).await.status(),
        200
    );
}

#[tokio::test]
async fn a_deleted_file_is_404_everywhere_at_once() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let file = app.upload_ok(&staff, "cust-1", "Doc", b"d".to_vec()).await;
    let id = file["id"].as_str().unwrap();
    let response = app
        .delete(&staff, &format!("/v1/files/{id}?confirm=true"))
        .await;
    assert_eq!(response.status(), 204);

    // No waiting: the answer above already means every query reflects it.
    assert_eq!(
        app.get(&staff, &format!("/v1/files/{id}")).await.status(),
        404
    );
    assert_eq!(
        app.get(&staff, &format!("/v1/files/{id}/content"))
            .await
            .status(),
        404
    );
    let list: Value = app
        .get(&staff, "/v1/customers/cust-1/files")
        .await
        .json()
        .await
        .unwrap();
    assert!(list["items"].as_array().unwrap().is_empty());
    let patch = app
        .send_json(
            Method::PATCH,
            &staff,
            &format!("/v1/files/{id}"),
            json!({"name": "x"}),
        )
        .await;
    assert_eq!(patch.status(), 404);
    assert_eq!(
        app.delete(&staff, &format!("/v1/files/{id}?confirm=true"))
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn bulk_delete_reports_each_file() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let plain = app
        .upload_ok(&staff, "cust-1", "Plain", b"p".to_vec())
        .await;
    let protected: Value = app
        .upload(
            &staff,
            "cust-1",
            "s.pdf",
            b"s".to_vec(),
            &[("name", "Sys"), ("origin", "system")],
        )
        .await
        .json()
        .await
        .unwrap();
    let unknown = uuid::Uuid::now_v7().to_string();
    let ids = [
        plain["id"].as_str().unwrap().to_owned(),
        protected["id"].as_str().unwrap().to_owned(),
        unknown.clone(),
        "not-a-uuid".to_owned(),
    ];
    let response = app
        .send_json(
            Method::POST,
            &staff,
            "/v1/files/delete",
            json!({"file_ids": ids, "confirm": true}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"results": [
            {"id": ids[0], "status": "deleted"},
            {"id": ids[1], "status": "protected"},
            {"id": unknown, "status": "not_found"},
            {"id": "not-a-uuid", "status": "not_found"},
        ]})
    );
    let list: Value = app
        .get(&staff, "/v1/customers/cust-1/files")
        .await
        .json()
        .await
        .unwrap();
    let left: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(left, [ids[1].as_str()]);
}

#[tokio::test]
async fn renaming_publishing_and_signing_show_at_once() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let file = app
        .upload_ok(&staff, "cust-1", "Draft", b"d".to_vec())
        .await;
    let id = file["id"].as_str().unwrap();
    let patched: Value = app
        .send_json(
            Method::PATCH,
            &staff,
            &format!("/v1/files/{id}"),
            json!({"name": "Final", "visibility": "portal_and_moving"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(patched["name"], "Final");
    assert_eq!(patched["visibility"], "portal_and_moving");
    let signed: Value = app
        .send_json(
            Method::POST,
            &staff,
            &format!("/v1/files/{id}/signature"),
            json!({"signed_at": "2026-11-20T08:00:00Z"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(signed["signed_at"], "2026-11-20T08:00:00Z");
    let list: Value = app
        .get(
            &staff,
            "/v1/customers/cust-1/files?visibility=portal_and_moving",
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"][0]["name"], "Final");

    let bad = app
        .send_json(
            Method::PATCH,
            &staff,
            &format!("/v1/files/{id}"),
            json!({"name": "  "}),
        )
        .await;
    assert_eq!(bad.status(), 422);
    let bad = app
        .send_json(
            Method::PATCH,
            &staff,
            &format!("/v1/files/{id}"),
            json!({"colour": "red"}),
        )
        .await;
    assert_eq!(bad.status(), 422);
}

#[tokio::test]
async fn twenty_four_concurrent_uploads_all_land() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let uploads = (0..24).map(|i| {
        let app = &app;
        let staff = staff.clone();
        async move {
            let response = app
                .upload(
                    &staff,
                    "cust-1",
                    &format!("f{i}.pdf"),
                    pattern(10_000 + i),
                    &[("name", &format!("File {i}"))],
                )
                .await;
            assert_eq!(response.status(), 201);
            let file: Value = response.json().await.unwrap();
            file["id"].as_str().unwrap().to_owned()
        }
    });
    let ids: HashSet<String> = futures::future::join_all(uploads)
        .await
        .into_iter()
        .collect();
    assert_eq!(ids.len(), 24);
    let list: Value = app
        .get(&staff, "/v1/customers/cust-1/files?limit=100")
        .await
        .json()
        .await
        .unwrap();
    let listed: HashSet<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, ids);
    assert_eq!(app.blob_keys().await.len(), 24);
}

#[tokio::test]
async fn twelve_concurrent_renames_of_one_file_settle_on_one_name() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let file = app
        .upload_ok(&staff, "cust-1", "Original", b"o".to_vec())
        .await;
    let id = file["id"].as_str().unwrap().to_owned();
    let renames = (0..12).map(|i| {
        let app = &app;
        let staff = staff.clone();
        let id = id.clone();
        async move {
            let response = app
                .send_json(
                    Method::PATCH,
                    &staff,
                    &format!("/v1/files/{id}"),
                    json!({"name": format!("Name {i}")}),
                )
                .await;
            assert_eq!(
                response.status(),
                200,
                "every rename is applied, after retries"
            );
        }
    });
    futures::future::join_all(renames).await;

    // The log, opened: the names are sealed as stored.
    let events: Value = app
        .get(&app.auditor("acme"), "/v1/events?limit=1000&decrypt=true")
        .await
        .json()
        .await
        .unwrap();
    let renamed: Vec<String> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["aggregate_id"] == id && e["event_type"] == "FileRenamed")
        .map(|e| e["payload"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(renamed.len(), 12, "every rename is one event");
    let last = renamed.last().unwrap();
    let shown: Value = app
        .get(&staff, &format!("/v1/files/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        &shown["name"], last,
        "the read model shows the last rename in the log"
    );
    let listed: Value = app
        .get(&staff, "/v1/customers/cust-1/files")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(&listed["items"][0]["name"], last);
}

#[tokio::test]
async fn a_projection_dropped_and_rebuilt_from_the_log_gives_the_same_rows() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    for i in 0..30 {
        let file = app
            .upload_ok(
                &staff,
                &format!("cust-{}", i % 3),
                &format!("Doc {i}"),
                vec![i as u8],
            )
            .await;
        let id = file["id"].as_str().unwrap();
        if i % 4 == 0 {
            app.send_json(
                Method::PATCH,
                &staff,
                &format!("/v1/files/{id}"),
                json!({"visibility": "portal"}),
            )
            .await;
        }
        if i % 7 == 0 {
            app.delete(&staff, &format!("/v1/files/{id}?confirm=true"))
                .await;
        }
    }
    let snapshot = |pool: dossier_eventlog::db::Pool| async move {
        let client = pool.get().await.unwrap();
        client
            .query("SELECT to_jsonb(f) FROM files f ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<_, Value>(0))
            .collect::<Vec<_>>()
    };
    let before = snapshot(app.pool.clone()).await;
    assert_eq!(before.len(), 30 - 5);
    let options = dossier_projections::RebuildOptions::default().opening_with(app.cipher().await);
    let report = dossier_projections::rebuild_with_options(
        &app.pool,
        &dossier_projections::FilesProjection,
        options,
        &|_| {},
    )
    .await
    .unwrap();
    assert!(report.events > 0);
    let after = snapshot(app.pool.clone()).await;
    assert_eq!(before, after);
}

#[tokio::test]
async fn operations_endpoints_answer() {
    let app = TestApp::spawn().await;
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["ready"], true);
    let openapi: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(openapi["openapi"].as_str().unwrap().starts_with("3.1"));
    assert!(openapi["paths"]["/v1/customers/{customer_id}/files"]["post"].is_object());
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dossier_http_request_duration_seconds"),
        "{metrics}"
    );
}

/// The command path remembers the files a process last changed (its aggregate
/// cache) and decides the next command on one without reading its events.
/// Another process appending to the same files makes that memory stale; every
/// answer here must still be the one the stored events give: a stale rename
/// loses the append's race and is decided again, a rename back to the name
/// this process remembers is not taken for "nothing to change", and a file
/// deleted elsewhere is 404.
#[tokio::test]
async fn a_stale_remembered_file_in_one_process_still_answers_what_another_appended() {
    let app = TestApp::spawn().await;
    // A second process on the same database, with a memory of its own; its
    // answers wait for the first one's projections (through `checkpoints`).
    let mut other = AppServer::start(
        settings(&app.database_url, &[("DOSSIER_ROLES", "api")]),
        app.blobs.clone(),
    )
    .await
    .expect("a second process starts");
    let staff = app.staff("acme");
    let here = app.api(&staff);
    let there = Client::new(app.client.clone(), &other.address, &staff);

    let file = app
        .upload_ok(&staff, "cust-1", "Original", b"o".to_vec())
        .await;
    let id = file["id"].as_str().unwrap().to_owned();
    // Both processes remember the file now.
    assert_eq!(here.rename(&id, "Here 1").await.name, "Here 1");
    assert_eq!(there.rename(&id, "There 1").await.name, "There 1");

    // This process remembers "Here 1" at sequence 2; the log has sequence 3.
    assert_eq!(here.rename(&id, "Here 2").await.name, "Here 2");
    assert_eq!(there.file(&id).await.name, "Here 2");

    // The other process remembers "There 1": renaming to that is a change.
    assert_eq!(there.rename(&id, "There 1").await.name, "There 1");
    assert_eq!(here.file(&id).await.name, "There 1");

    // Visibility the same way: "internal" here is stale after a change there.
    let published = there.patch(&id, json!({"visibility": "portal"})).await;
    assert_eq!(published.visibility, "portal");
    let back = here.patch(&id, json!({"visibility": "internal"})).await;
    assert_eq!(back.visibility, "internal");

    let client = app.pool.get().await.unwrap();
    let sequences: Vec<i64> = client
        .query(
            "SELECT sequence FROM events WHERE aggregate_id = $1 ORDER BY sequence",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        sequences,
        (1..=7).collect::<Vec<i64>>(),
        "one event per change, none lost or doubled"
    );

    // Deleted there: here it is gone, although this process remembers it live.
    there.delete(&id).await;
    let response = here
        .send_json(
            Method::PATCH,
            &format!("/v1/files/{id}"),
            json!({"name": "Too late"}),
        )
        .await;
    assert_eq!(response.status(), 404);
    assert_eq!(error_code(response).await, "not_found");

    other.stop().await.expect("the second process stops");
}
