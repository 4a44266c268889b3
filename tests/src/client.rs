//! A client of the HTTP contract for tests: one identity (a bearer token), typed
//! answers, and the waits the contract implies written once.
//!
//! Methods named for an operation (`upload`, `file`, `rename`, `bundle`, …)
//! assert the contract's success status and answer the typed body; a test that
//! is about a refusal uses the raw forms (`post_upload`, `get`, `send_json`) and
//! looks at the response itself. Where the contract says the work finishes
//! later (a bundle), the client waits for it through [`crate::wait`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::HeaderMap;
use reqwest::multipart::{Form, Part};
use reqwest::{Method, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::wait::Wait;

/// How long a bundle may take to build before a test gives up.
pub const BUNDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// The contract's File resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileView {
    pub id: String,
    pub customer_id: String,
    pub name: String,
    pub file_name: String,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    pub visibility: String,
    pub origin: String,
    pub viewed_at: Option<DateTime<Utc>>,
    pub signed_at: Option<DateTime<Utc>>,
    pub contract_id: Option<String>,
    pub task_id: Option<String>,
    pub protected: bool,
}

/// One page of a list: its items and the cursor of the next page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Where a bundle stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleStatus {
    Pending,
    Ready,
    Failed,
}

/// `GET /v1/bundles/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleView {
    pub id: String,
    pub status: BundleStatus,
    pub file_count: u64,
    pub files_done: u64,
    /// The archive's size, once ready.
    pub size: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// When a ready bundle goes away.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A downloaded body with the headers that describe it.
#[derive(Debug, Clone)]
pub struct Download {
    pub headers: HeaderMap,
    pub bytes: Vec<u8>,
}

impl Download {
    /// A header's value as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// What a multipart upload sends: the file part and the text fields.
#[derive(Debug, Clone)]
pub struct Upload {
    /// The `name` field (the display name); `None` leaves it out (or to
    /// [`Self::fields`], to send it in another place).
    pub name: Option<String>,
    /// The file part's file name.
    pub file_name: String,
    /// The file part's content type.
    pub content_type: String,
    /// The content.
    pub bytes: Vec<u8>,
    /// More text fields (`visibility`, `origin`, `contract_id`, …).
    pub fields: Vec<(String, String)>,
    /// A `size` field sent before the file part (the file's declared size).
    pub size_first: Option<String>,
}

impl Upload {
    /// `bytes` as `document.pdf` (`application/pdf`) named `name`.
    pub fn new(name: &str, bytes: Vec<u8>) -> Self {
        Self {
            name: Some(name.to_owned()),
            file_name: "document.pdf".to_owned(),
            content_type: "application/pdf".to_owned(),
            bytes,
            fields: Vec::new(),
            size_first: None,
        }
    }

    /// Declares the file's size as `size` in a field before the file part.
    pub fn declaring_size(mut self, size: impl ToString) -> Self {
        self.size_first = Some(size.to_string());
        self
    }

    /// Another file name and content type for the file part.
    pub fn file(mut self, file_name: &str, content_type: &str) -> Self {
        self.file_name = file_name.to_owned();
        self.content_type = content_type.to_owned();
        self
    }

    /// One more text field.
    pub fn field(mut self, name: &str, value: &str) -> Self {
        self.fields.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The declared size if there is one, then the file part, then the name,
    /// then the other fields (the order
    /// `TestApp::upload` always sent, so the server sees the file before it
    /// knows whether the fields are valid).
    fn form(&self) -> Form {
        let mut form = Form::new();
        if let Some(size) = &self.size_first {
            form = form.text("size", size.clone());
        }
        let mut form = form.part(
            "file",
            Part::bytes(self.bytes.clone())
                .file_name(self.file_name.clone())
                .mime_str(&self.content_type)
                .expect("a valid content type"),
        );
        if let Some(name) = &self.name {
            form = form.text("name", name.clone());
        }
        for (name, value) in &self.fields {
            form = form.text(name.clone(), value.clone());
        }
        form
    }
}

/// The contract spoken as one identity.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    address: String,
    token: String,
}

impl Client {
    /// A client of the Dossier at `address` (`http://host:port`) with `token`.
    pub fn new(http: reqwest::Client, address: &str, token: &str) -> Self {
        Self {
            http,
            address: address.to_owned(),
            token: token.to_owned(),
        }
    }

    /// `address` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// The token this client sends.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// `GET path`, whatever it answers.
    pub async fn get(&self, path: &str) -> Response {
        self.try_get(path)
            .await
            .unwrap_or_else(|error| panic!("GET {path} is answered: {error}"))
    }

    /// `GET path`, or the error of a connection that ended before the
    /// answer's head arrived (for tests of answers the server cuts off).
    pub async fn try_get(&self, path: &str) -> reqwest::Result<Response> {
        self.http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
    }

    /// `method path` with a JSON body, whatever it answers.
    pub async fn send_json(&self, method: Method, path: &str, body: Value) -> Response {
        self.http
            .request(method.clone(), self.url(path))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|error| panic!("{method} {path} is answered: {error}"))
    }

    /// `GET path`, asserting 200, as `T`.
    pub async fn get_ok<T: DeserializeOwned>(&self, path: &str) -> T {
        expect_json(self.get(path).await, StatusCode::OK, &format!("GET {path}")).await
    }

    /// `POST /v1/customers/{customer}/tasks` (staff), asserting 201; the Task.
    pub async fn create_task(&self, customer: &str, title: &str) -> Value {
        let path = format!("/v1/customers/{customer}/tasks");
        let response = self
            .send_json(Method::POST, &path, json!({ "title": title }))
            .await;
        expect_json(response, StatusCode::CREATED, &format!("POST {path}")).await
    }

    /// `POST /v1/customers/{customer}/files`, whatever it answers.
    pub async fn post_upload(&self, customer: &str, upload: &Upload) -> Response {
        self.http
            .post(self.url(&format!("/v1/customers/{customer}/files")))
            .bearer_auth(&self.token)
            .multipart(upload.form())
            .send()
            .await
            .unwrap_or_else(|error| panic!("the upload is answered: {error}"))
    }

    /// Uploads `bytes` as `document.pdf` named `name`; asserts 201.
    pub async fn upload(&self, customer: &str, name: &str, bytes: Vec<u8>) -> FileView {
        self.upload_file(customer, &Upload::new(name, bytes)).await
    }

    /// Uploads `upload`; asserts 201.
    pub async fn upload_file(&self, customer: &str, upload: &Upload) -> FileView {
        let response = self.post_upload(customer, upload).await;
        let what = format!("the upload of {} for {customer}", upload.file_name);
        expect_json(response, StatusCode::CREATED, &what).await
    }

    /// `GET /v1/files/{id}`; asserts 200.
    pub async fn file(&self, id: &str) -> FileView {
        self.get_ok(&format!("/v1/files/{id}")).await
    }

    /// One page of `GET /v1/customers/{customer}/files?{query}`; asserts 200.
    pub async fn list(&self, customer: &str, query: &str) -> Page<FileView> {
        self.get_ok(&format!("/v1/customers/{customer}/files?{query}"))
            .await
    }

    /// Every page of the list, following the cursor.
    pub async fn list_all(&self, customer: &str, query: &str) -> Vec<FileView> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page_query = match &cursor {
                Some(cursor) if query.is_empty() => format!("cursor={cursor}"),
                Some(cursor) => format!("{query}&cursor={cursor}"),
                None => query.to_owned(),
            };
            let page = self.list(customer, &page_query).await;
            items.extend(page.items);
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return items,
            }
        }
    }

    /// Waits until the list (one page of `query`) satisfies `done`, for things
    /// that arrive by another way than this client (AMQP, the log).
    pub async fn list_until(
        &self,
        customer: &str,
        query: &str,
        what: &str,
        done: impl Fn(&Page<FileView>) -> bool,
    ) -> Page<FileView> {
        Wait::new(what)
            .expect(async || {
                let page = self.list(customer, query).await;
                if done(&page) {
                    Ok(page)
                } else {
                    Err(page.items.into_iter().map(|f| f.name).collect::<Vec<_>>())
                }
            })
            .await
    }

    /// `GET /v1/files/{id}/content`; asserts 200.
    pub async fn download(&self, id: &str) -> Download {
        let path = format!("/v1/files/{id}/content");
        expect_body(self.get(&path).await, &format!("GET {path}")).await
    }

    /// `PATCH /v1/files/{id}` with `body`; asserts 200.
    pub async fn patch(&self, id: &str, body: Value) -> FileView {
        let path = format!("/v1/files/{id}");
        let response = self.send_json(Method::PATCH, &path, body).await;
        expect_json(response, StatusCode::OK, &format!("PATCH {path}")).await
    }

    /// Renames the file; asserts 200.
    pub async fn rename(&self, id: &str, name: &str) -> FileView {
        self.patch(id, json!({ "name": name })).await
    }

    /// `DELETE /v1/files/{id}?confirm=true`; asserts 204.
    pub async fn delete(&self, id: &str) {
        let path = format!("/v1/files/{id}?confirm=true");
        let response = self
            .http
            .delete(self.url(&path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap_or_else(|error| panic!("DELETE {path} is answered: {error}"));
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::NO_CONTENT, "DELETE {path}: {body}");
    }

    /// `POST /v1/bundles` for `ids`, whatever it answers.
    pub async fn post_bundle(&self, ids: &[&str]) -> Response {
        self.send_json(Method::POST, "/v1/bundles", json!({ "file_ids": ids }))
            .await
    }

    /// Requests a bundle of `ids`, asserting the contract's 202 `pending`;
    /// answers its id.
    pub async fn request_bundle(&self, ids: &[&str]) -> String {
        let body: Value = expect_json(
            self.post_bundle(ids).await,
            StatusCode::ACCEPTED,
            "POST /v1/bundles",
        )
        .await;
        assert_eq!(body["status"], "pending", "{body}");
        body["id"]
            .as_str()
            .unwrap_or_else(|| panic!("a bundle id in {body}"))
            .to_owned()
    }

    /// `GET /v1/bundles/{id}`; asserts 200.
    pub async fn bundle_status(&self, id: &str) -> BundleView {
        self.get_ok(&format!("/v1/bundles/{id}")).await
    }

    /// Waits (up to `timeout`) until the bundle's status satisfies `done`.
    pub async fn bundle_until(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&BundleView) -> bool,
    ) -> BundleView {
        Wait::new(format!("bundle {id} to get there"))
            .timeout(timeout)
            .expect(async || {
                let status = self.bundle_status(id).await;
                if done(&status) {
                    Ok(status)
                } else {
                    Err(status)
                }
            })
            .await
    }

    /// Waits until the bundle is no longer pending (ready or failed).
    pub async fn bundle_finished(&self, id: &str) -> BundleView {
        self.bundle_until(id, BUNDLE_TIMEOUT, |status| {
            status.status != BundleStatus::Pending
        })
        .await
    }

    /// Requests a bundle of `ids` and waits until it is ready; asserts that it
    /// did not fail.
    pub async fn bundle(&self, ids: &[&str]) -> BundleView {
        let id = self.request_bundle(ids).await;
        let status = self.bundle_finished(&id).await;
        assert_eq!(status.status, BundleStatus::Ready, "{status:?}");
        status
    }

    /// `GET /v1/bundles/{id}/content`; asserts 200.
    pub async fn bundle_content(&self, id: &str) -> Download {
        let path = format!("/v1/bundles/{id}/content");
        expect_body(self.get(&path).await, &format!("GET {path}")).await
    }
}

/// Asserts `expected` and reads the body as `T`; the failure shows the body.
async fn expect_json<T: DeserializeOwned>(
    response: Response,
    expected: StatusCode,
    what: &str,
) -> T {
    let status = response.status();
    let body = response
        .text()
        .await
        .unwrap_or_else(|error| panic!("{what}: reading the body: {error}"));
    assert_eq!(status, expected, "{what} answered {status}: {body}");
    serde_json::from_str(&body)
        .unwrap_or_else(|error| panic!("{what}: the body does not parse ({error}): {body}"))
}

/// Asserts 200 and reads the body as bytes.
async fn expect_body(response: Response, what: &str) -> Download {
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .bytes()
        .await
        .unwrap_or_else(|error| panic!("{what}: reading the body: {error}"))
        .to_vec();
    assert_eq!(
        status,
        StatusCode::OK,
        "{what} answered {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    Download { headers, bytes }
}
