//! The end-to-end test harness: a whole Dossier on real services.
//!
//! Every test gets its own Postgres database (uuid name, migrated) and its own
//! S3 bucket on a real S3 server over HTTP (s3s-fs, one per test process, on a
//! runtime of its own so it outlives any single test), and the real
//! [`Application`] listening on a free port. Requests go through reqwest,
//! like any client's.

pub mod db;
pub mod postgres;
pub mod proxy;
pub mod rabbit;
pub mod s3;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use crate::rabbit::TestVhost;
use dossier_api::auth::jwt::{self, Claims, Role};
use dossier_api::startup::Application;
use dossier_blobstore::{self as blob, BlobStore, BlobStoreSpec, S3Options};
use dossier_eventlog::db::Pool;
use dossier_runtime::config::Settings;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use uuid::Uuid;

pub const SECRET: &str = "test-secret-for-dossier-end-to-end-tests";

/// The S3 server every test of this process shares (each with its own bucket).
pub struct SharedS3 {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub root: PathBuf,
}

/// Removes the S3 roots of earlier test runs (older than an hour), so that
/// repeated runs on one machine do not fill its disk.
fn remove_old_s3_roots() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let hour = std::time::Duration::from_secs(3600);
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > hour);
        if old
            && entry
                .file_name()
                .to_string_lossy()
                .starts_with("dossier-s3-")
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Starts the process-wide S3 server on its own thread and runtime, once.
pub fn s3_server() -> &'static SharedS3 {
    static S3: OnceLock<SharedS3> = OnceLock::new();
    S3.get_or_init(|| {
        remove_old_s3_roots();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("s3-dev".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime for the test S3 server");
                runtime.block_on(async move {
                    let root = std::env::temp_dir()
                        .join(format!("dossier-s3-{}", Uuid::new_v4().simple()));
                    let server = crate::s3::spawn(root, SocketAddr::from(([127, 0, 0, 1], 0)))
                        .await
                        .expect("the test S3 server starts");
                    tx.send(SharedS3 {
                        endpoint: server.endpoint.clone(),
                        access_key: server.access_key.clone(),
                        secret_key: server.secret_key.clone(),
                        root: server.root.clone(),
                    })
                    .expect("the harness waits for the S3 server");
                    // Serve for the rest of the process.
                    std::future::pending::<()>().await;
                    drop(server);
                });
            })
            .expect("a thread for the test S3 server");
        rx.recv().expect("the test S3 server reports its address")
    })
}

/// A fresh bucket on the shared S3 server, opened through aws-sdk-s3.
pub async fn s3_store(bucket: &str) -> Arc<dyn BlobStore> {
    let s3 = s3_server();
    blob::open(&BlobStoreSpec::S3(S3Options {
        bucket: bucket.to_owned(),
        prefix: None,
        endpoint: Some(s3.endpoint.clone()),
        region: "us-east-1".to_owned(),
        access_key: Some(s3.access_key.clone()),
        secret_key: Some(s3.secret_key.clone()),
        create_bucket_if_missing: true,
    }))
    .await
    .expect("the test bucket opens")
}

/// Settings for a test: defaults, a database of its own, a free port.
pub fn settings(database_url: &str, overrides: &[(&str, &str)]) -> Settings {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("DOSSIER_DATABASE_URL".into(), database_url.to_owned()),
        ("DOSSIER_HTTP_ADDR".into(), "127.0.0.1:0".into()),
        ("DOSSIER_JWT_SECRET".into(), SECRET.into()),
    ]);
    for (k, v) in overrides {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    Settings::from_lookup(|var| vars.get(var).cloned()).expect("test settings are valid")
}

pub struct TestApp {
    pub address: String,
    /// This test's own RabbitMQ virtual host (deleted when the app is dropped).
    pub vhost: TestVhost,
    pub client: reqwest::Client,
    pub pool: Pool,
    pub database_url: String,
    pub blobs: Arc<dyn BlobStore>,
    pub bucket: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    /// A whole Dossier with the default limits.
    pub async fn spawn() -> Self {
        Self::spawn_with(&[]).await
    }

    /// A whole Dossier with some settings overridden (`DOSSIER_MAX_FILE_BYTES`, …).
    pub async fn spawn_with(overrides: &[(&str, &str)]) -> Self {
        let app = Self::spawn_unready(overrides).await;
        app.wait_until_ready().await;
        app
    }

    /// Like [`Self::spawn_with`], without waiting for `/readyz` (for tests of a
    /// backing service that is down).
    pub async fn spawn_unready(overrides: &[(&str, &str)]) -> Self {
        dossier_runtime::telemetry::init_test_tracing();
        let (pool, database_url) = crate::db::fresh_database()
            .await
            .expect("a fresh test database");
        let bucket = format!("t-{}", Uuid::new_v4().simple());
        let blobs = s3_store(&bucket).await;
        let vhost = TestVhost::create()
            .await
            .expect("a RabbitMQ vhost for the test");
        let mut all: Vec<(&str, &str)> = vec![("DOSSIER_AMQP_URL", vhost.url())];
        all.extend_from_slice(overrides);
        let settings = settings(&database_url, &all);
        let app = Application::build_with_blobs(settings, blobs.clone())
            .await
            .expect("the application starts");
        let address = format!(
            "http://{}",
            app.http_address().expect("the api role listens")
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Self {
            address,
            vhost,
            client: reqwest::Client::new(),
            pool,
            database_url,
            blobs,
            bucket,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Waits for `/readyz`: every backing service reachable and the RabbitMQ
    /// topology declared, so a test's own clients find the exchanges.
    pub async fn wait_until_ready(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let ready = self
                .client
                .get(self.url("/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the application did not become ready"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Stops the application gracefully and reports how it ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub fn token(&self, tenant: &str, role: Role, sub: &str, customer: Option<&str>) -> String {
        let now = chrono::Utc::now().timestamp();
        jwt::issue(
            SECRET.as_bytes(),
            &Claims {
                sub: sub.to_owned(),
                tenant: tenant.to_owned(),
                role,
                customer: customer.map(str::to_owned),
                exp: now + 3600,
                iat: Some(now),
            },
        )
    }

    pub fn staff(&self, tenant: &str) -> String {
        self.token(tenant, Role::Staff, "staff-1", None)
    }

    pub fn customer(&self, tenant: &str, customer: &str) -> String {
        self.token(
            tenant,
            Role::Customer,
            &format!("user-{customer}"),
            Some(customer),
        )
    }

    pub fn auditor(&self, tenant: &str) -> String {
        self.token(tenant, Role::Auditor, "auditor-1", None)
    }

    /// `POST /v1/customers/{customer}/files` with a file part and text fields.
    pub async fn upload(
        &self,
        token: &str,
        customer: &str,
        file_name: &str,
        bytes: Vec<u8>,
        fields: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut form = Form::new().part(
            "file",
            Part::bytes(bytes)
                .file_name(file_name.to_owned())
                .mime_str("application/pdf")
                .expect("a valid mime type"),
        );
        for (k, v) in fields {
            form = form.text((*k).to_owned(), (*v).to_owned());
        }
        self.client
            .post(self.url(&format!("/v1/customers/{customer}/files")))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .expect("the upload request is answered")
    }

    /// Uploads and returns the created File, asserting 201.
    pub async fn upload_ok(
        &self,
        token: &str,
        customer: &str,
        name: &str,
        bytes: Vec<u8>,
    ) -> Value {
        let response = self
            .upload(token, customer, "document.pdf", bytes, &[("name", name)])
            .await;
        assert_eq!(
            response.status(),
            201,
            "upload answered {}",
            response.status()
        );
        response.json().await.expect("a File body")
    }

    pub async fn get(&self, token: &str, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("the request is answered")
    }

    pub async fn send_json(
        &self,
        method: reqwest::Method,
        token: &str,
        path: &str,
        body: Value,
    ) -> reqwest::Response {
        self.client
            .request(method, self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("the request is answered")
    }

    pub async fn delete(&self, token: &str, path: &str) -> reqwest::Response {
        self.client
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("the request is answered")
    }

    /// The ids of every blob in this test's bucket.
    pub async fn blob_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .blobs
            .list("")
            .await
            .expect("the bucket lists")
            .into_iter()
            .map(|b| b.key)
            .collect();
        keys.sort();
        keys
    }
}

/// Asserts the contract's error body and returns its code.
pub async fn error_code(response: reqwest::Response) -> String {
    let body: Value = response.json().await.expect("an error body");
    let code = body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_owned();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error.message is present: {body}"
    );
    code
}
