//! The end-to-end test harness: a whole Dossier on real services.
//!
//! Every test gets its own Postgres database (uuid name, migrated) and its own
//! S3 bucket on a real S3 server over HTTP (s3s-fs, one per test process, on a
//! runtime of its own so it outlives any single test), and the real
//! [`Application`] listening on a free port. Requests go through reqwest,
//! like any client's; [`client::Client`] speaks the contract for a test, and
//! [`wait::eventually`] is how a test waits for something to happen.
//! Page tests drive a real headless Chromium with [`browser::Browser`].
//!
//! The benchmark stands on the same pieces: [`db::Database`], [`s3`],
//! [`rabbit::TestVhost`], [`AppServer`], [`token`] and [`process`].

pub mod browser;
pub mod client;
pub mod db;
pub mod postgres;
pub mod process;
pub mod property;
pub mod proxy;
pub mod rabbit;
pub mod s3;
pub mod upstream;
pub mod wait;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::rabbit::TestVhost;
use dossier_api::auth::jwt::{self, Claims, Role};
use dossier_api::startup::Application;
use dossier_blobstore::{self as blob, BlobStore, BlobStoreSpec, S3Options};
use dossier_eventlog::db::Pool;
use dossier_runtime::config::{ConfigError, Settings};
use serde_json::Value;
use uuid::Uuid;

/// The JWT secret of every Dossier the harness starts (tests and benchmark).
pub const SECRET: &str = "test-secret-for-dossier-end-to-end-tests";

/// The key table of the database of `pool` under the development master key,
/// which the harness' settings leave in place: what the application running
/// on that database seals and opens personal fields with.
pub async fn development_keys(
    pool: &dossier_eventlog::db::Pool,
) -> Result<dossier_keys::KeyStore, dossier_keys::KeyError> {
    dossier_keys::KeyStore::open(
        pool.clone(),
        dossier_keys::MasterKeys::new(dossier_keys::MasterKey::development(), None),
    )
    .await
}

/// A bearer token signed with [`SECRET`], valid for `ttl` from now.
pub fn token(tenant: &str, role: Role, sub: &str, customer: Option<&str>, ttl: Duration) -> String {
    let now = chrono::Utc::now().timestamp();
    jwt::issue(
        SECRET.as_bytes(),
        &Claims {
            sub: sub.to_owned(),
            tenant: tenant.to_owned(),
            role,
            customer: customer.map(str::to_owned),
            exp: now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2),
            iat: Some(now),
        },
    )
}

/// The S3 server every test of this process shares (each with its own bucket).
pub struct SharedS3 {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub root: PathBuf,
}

/// Removes the folders of earlier test runs (older than an hour) whose names in
/// the temporary directory start with `prefix`, so that repeated runs on one
/// machine, some of them killed before they cleaned up, do not fill its disk.
pub(crate) fn remove_old_temp_dirs(prefix: &str) {
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
        if old && entry.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Starts the process-wide S3 server on its own thread and runtime, once.
pub fn s3_server() -> &'static SharedS3 {
    static S3: OnceLock<SharedS3> = OnceLock::new();
    S3.get_or_init(|| {
        remove_old_temp_dirs("dossier-s3-");
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

impl SharedS3 {
    /// The blob store options for `bucket` on this server.
    pub fn options(&self, bucket: &str) -> S3Options {
        s3::bucket_options(&self.endpoint, &self.access_key, &self.secret_key, bucket)
    }
}

/// A fresh bucket on the shared S3 server, opened through aws-sdk-s3.
pub async fn s3_store(bucket: &str) -> Arc<dyn BlobStore> {
    blob::open(&BlobStoreSpec::S3(s3_server().options(bucket)))
        .await
        .expect("the test bucket opens")
}

/// Settings for a test: defaults, a database of its own, a free port.
pub fn settings(database_url: &str, overrides: &[(&str, &str)]) -> Settings {
    try_settings(database_url, overrides).expect("test settings are valid")
}

/// Settings for a Dossier of the harness: defaults, `database_url`, a free
/// port of 127.0.0.1, [`SECRET`], then `overrides`.
pub fn try_settings(
    database_url: &str,
    overrides: &[(&str, &str)],
) -> Result<Settings, ConfigError> {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("DOSSIER_DATABASE_URL".into(), database_url.to_owned()),
        ("DOSSIER_HTTP_ADDR".into(), "127.0.0.1:0".into()),
        ("DOSSIER_JWT_SECRET".into(), SECRET.into()),
    ]);
    for (k, v) in overrides {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    Settings::from_lookup(|var| vars.get(var).cloned())
}

/// The real [`Application`], in this process, on a free port of 127.0.0.1.
pub struct AppServer {
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl AppServer {
    /// Builds the application from `settings` on `blobs` and runs it until
    /// [`Self::stop`]; it must run the api role.
    pub async fn start(settings: Settings, blobs: Arc<dyn BlobStore>) -> anyhow::Result<Self> {
        let app = Application::build_with_blobs(settings, blobs).await?;
        let address = app
            .http_address()
            .ok_or_else(|| anyhow::anyhow!("the application runs no api role"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            address: format!("http://{address}"),
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// `address` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// Waits until `/readyz` answers 2xx: every backing service reachable and
    /// the RabbitMQ topology declared.
    pub async fn wait_until_ready(
        &self,
        client: &reqwest::Client,
        patience: Duration,
    ) -> Result<(), wait::TimedOut> {
        wait_until_ready(client, &self.address, patience).await
    }

    /// Stops the application gracefully (it stops taking work and finishes what
    /// is in flight) and reports how it ended; a second call does nothing.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

/// Waits until `GET {address}/readyz` answers 2xx (any Dossier, in this
/// process or a child).
pub async fn wait_until_ready(
    client: &reqwest::Client,
    address: &str,
    patience: Duration,
) -> Result<(), wait::TimedOut> {
    let url = format!("{address}/readyz");
    wait::Wait::new(format!("{url} to answer 2xx"))
        .timeout(patience)
        .until(async || match client.get(&url).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(response.status().to_string()),
            Err(error) => Err(error.to_string()),
        })
        .await
}

/// Every table of every read model (the projections' `tables()`).
const READ_MODEL_TABLES: [&str; 9] = [
    "files",
    "files_tombstones",
    "tasks",
    "task_messages",
    "tenant_settings",
    "customers",
    "customer_files",
    "customer_tasks",
    "bundles",
];

pub struct TestApp {
    pub address: String,
    /// This test's own RabbitMQ virtual host (deleted when the app is dropped).
    pub vhost: TestVhost,
    pub client: reqwest::Client,
    pub pool: Pool,
    pub database_url: String,
    /// The bucket as it is: ciphertext (and blobs stored before encryption),
    /// for looking at what the store holds.
    pub blobs: Arc<dyn BlobStore>,
    /// The bucket as the application reads and writes it: sealed under its
    /// data keys (for workers a test runs in-process).
    pub sealed_blobs: Arc<dyn BlobStore>,
    /// The bucket's name (for [`Self::spawn_on_dir`], the directory's path).
    pub bucket: String,
    /// The directory of [`Self::spawn_on_dir`]'s blobs.
    pub blob_dir: Option<PathBuf>,
    server: AppServer,
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
        Self::spawn_unready_on(overrides, None).await
    }

    /// A whole Dossier whose S3 traffic goes through a proxy the test can
    /// cut ([`proxy::FaultyProxy::cut`]): the S3 server is unreachable for the
    /// application only, while [`Self::blobs`] still reaches the bucket.
    pub async fn spawn_behind_s3_proxy(overrides: &[(&str, &str)]) -> (Self, proxy::FaultyProxy) {
        let server = s3_server()
            .endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("the S3 endpoint is host:port");
        let proxy = proxy::FaultyProxy::start(server)
            .await
            .expect("a proxy in front of S3");
        let endpoint = format!("http://{}", proxy.address());
        let app = Self::spawn_unready_on(overrides, Some(&endpoint)).await;
        app.wait_until_ready().await;
        (app, proxy)
    }

    /// A whole Dossier that keeps its blobs in a directory of its own (the
    /// embedded default store) instead of an S3 bucket: [`Self::blob_dir`].
    pub async fn spawn_on_dir(overrides: &[(&str, &str)]) -> Self {
        remove_old_temp_dirs("dossier-blobs-");
        let dir = std::env::temp_dir().join(format!("dossier-blobs-{}", Uuid::new_v4().simple()));
        let blobs = blob::open(&BlobStoreSpec::Dir(dir.clone()))
            .await
            .expect("the test blob directory opens");
        let (pool, database_url) = crate::db::fresh_database()
            .await
            .expect("a fresh test database");
        let name = dir.display().to_string();
        let mut app =
            Self::start_on(overrides, pool, database_url, blobs.clone(), blobs, name).await;
        app.blob_dir = Some(dir);
        app.wait_until_ready().await;
        app
    }

    /// [`Self::spawn_unready`], the application reaching S3 at `s3_endpoint`
    /// (the shared server when `None`).
    async fn spawn_unready_on(overrides: &[(&str, &str)], s3_endpoint: Option<&str>) -> Self {
        dossier_runtime::telemetry::init_test_tracing();
        let (pool, database_url) = crate::db::fresh_database()
            .await
            .expect("a fresh test database");
        let bucket = format!("t-{}", Uuid::new_v4().simple());
        let blobs = s3_store(&bucket).await;
        let app_blobs = match s3_endpoint {
            None => blobs.clone(),
            Some(endpoint) => {
                let s3 = s3_server();
                blob::open(&BlobStoreSpec::S3(s3::bucket_options(
                    endpoint,
                    &s3.access_key,
                    &s3.secret_key,
                    &bucket,
                )))
                .await
                .expect("the test bucket opens through the proxy")
            }
        };
        Self::start_on(overrides, pool, database_url, blobs, app_blobs, bucket).await
    }

    /// The application on `pool`, reaching its blobs through `app_blobs`
    /// (`blobs` as the test sees them), with a vhost of its own; not yet
    /// ready.
    async fn start_on(
        overrides: &[(&str, &str)],
        pool: Pool,
        database_url: String,
        blobs: Arc<dyn BlobStore>,
        app_blobs: Arc<dyn BlobStore>,
        bucket: String,
    ) -> Self {
        dossier_runtime::telemetry::init_test_tracing();
        let vhost = TestVhost::create()
            .await
            .expect("a RabbitMQ vhost for the test");
        let mut all: Vec<(&str, &str)> = vec![("DOSSIER_AMQP_URL", vhost.url())];
        all.extend_from_slice(overrides);
        let settings = settings(&database_url, &all);
        let keys = dossier_api::startup::open_key_store(&settings, &pool)
            .await
            .expect("the data key table opens");
        let sealed_blobs = blob::SealedBlobStore::shared(blobs.clone(), keys);
        let server = AppServer::start(settings, app_blobs)
            .await
            .expect("the application starts");
        Self {
            address: server.address.clone(),
            vhost,
            client: reqwest::Client::new(),
            pool,
            database_url,
            blobs,
            sealed_blobs,
            bucket,
            blob_dir: None,
            server,
        }
    }

    /// Waits for `/readyz`: every backing service reachable and the RabbitMQ
    /// topology declared, so a test's own clients find the exchanges.
    pub async fn wait_until_ready(&self) {
        if let Err(timed_out) = self
            .server
            .wait_until_ready(&self.client, wait::DEFAULT_TIMEOUT)
            .await
        {
            panic!("the application did not become ready: {timed_out}");
        }
    }

    /// Stops the application gracefully and reports how it ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown().await
    }

    /// Stops the application gracefully but keeps what it ran on (database,
    /// vhost, bucket) for looking at: once this returns, every delivery its
    /// consumers took is settled (acked, rejected, or back in its queue) and
    /// nothing of it writes any more. A second call does nothing.
    pub async fn shutdown(&mut self) -> anyhow::Result<()> {
        self.server.stop().await
    }

    /// What opens the personal fields of this app's log: its key table under
    /// the development master key the tests run with.
    pub async fn cipher(&self) -> Arc<dossier_eventlog::personal::FieldCipher> {
        let keys = development_keys(&self.pool)
            .await
            .expect("the test's key table");
        dossier_eventlog::personal::FieldCipher::new(keys, self.pool.clone(), true)
    }

    /// Every table of every read model, row by row in a fixed order: what a
    /// rebuild from the log must give again.
    pub async fn read_model_rows(&self) -> Vec<(String, Vec<Value>)> {
        let client = self.pool.get().await.expect("a connection");
        let mut tables = Vec::new();
        for table in READ_MODEL_TABLES {
            let rows: Vec<Value> = client
                .query(
                    &format!("SELECT to_jsonb(t) FROM {table} t ORDER BY to_jsonb(t)::text"),
                    &[],
                )
                .await
                .expect("a read model table")
                .iter()
                .map(|row| row.get(0))
                .collect();
            tables.push((table.to_owned(), rows));
        }
        tables
    }

    /// The rows of one read model table (see [`Self::read_model_rows`]).
    pub async fn table_rows(&self, table: &str) -> Vec<Value> {
        self.read_model_rows()
            .await
            .into_iter()
            .find(|(name, _)| name == table)
            .map(|(_, rows)| rows)
            .unwrap_or_else(|| panic!("{table} is not a read model table"))
    }

    /// Rebuilds every registered read model from the log (opening personal
    /// fields with [`Self::cipher`]), telling `progress`; answers the events
    /// each read.
    pub async fn rebuild_every_read_model(
        &self,
        progress: &(dyn Fn(dossier_projections::RebuildProgress) + Send + Sync),
    ) -> Vec<(&'static str, u64)> {
        let options =
            dossier_projections::RebuildOptions::default().opening_with(self.cipher().await);
        let mut reports = Vec::new();
        for registered in dossier_projections::registry::all() {
            let report = registered
                .rebuild(&self.pool, options.clone(), progress)
                .await
                .unwrap_or_else(|e| panic!("rebuilding {}: {e}", registered.name()));
            reports.push((registered.name(), report.events));
        }
        reports
    }

    /// A client of the contract for whoever holds `token`.
    pub fn api(&self, token: &str) -> client::Client {
        client::Client::new(self.client.clone(), &self.address, token)
    }

    /// A Dossier child process (`exe args...`, which must run
    /// [`process::serve_from_env`]) on this test's database, vhost and bucket.
    pub fn serve_command<S: AsRef<std::ffi::OsStr>>(
        &self,
        exe: impl AsRef<std::ffi::OsStr>,
        args: impl IntoIterator<Item = S>,
    ) -> process::ServeCommand {
        let s3 = s3_server();
        process::ServeCommand::new(exe, args)
            .database(&self.database_url)
            .amqp(self.vhost.url())
            .s3_bucket(&s3.endpoint, &s3.access_key, &s3.secret_key, &self.bucket)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub fn token(&self, tenant: &str, role: Role, sub: &str, customer: Option<&str>) -> String {
        token(tenant, role, sub, customer, Duration::from_secs(3600))
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

    /// `POST /v1/customers/{customer}/tasks` as `staff`; answers the Task,
    /// asserting 201.
    pub async fn create_task(&self, staff: &str, customer: &str, title: &str) -> Value {
        self.api(staff).create_task(customer, title).await
    }

    /// Signs `browser` in to this Dossier's pages with `token`, as a person
    /// does on the sign-in page (paste the token, press Sign in), and waits
    /// for the start page of the token's role.
    pub async fn sign_in(&self, browser: &browser::Browser, token: &str) {
        browser.goto(&self.url("/login")).await;
        browser.fill("#token", token).await;
        browser
            .click("form[action='/login'] button[type=submit]")
            .await;
        browser.wait_for("form.whoami").await;
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
        let upload = client::Upload {
            name: None,
            file_name: file_name.to_owned(),
            content_type: "application/pdf".to_owned(),
            bytes,
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            size_first: None,
        };
        self.api(token).post_upload(customer, &upload).await
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
        self.api(token).get(path).await
    }

    pub async fn send_json(
        &self,
        method: reqwest::Method,
        token: &str,
        path: &str,
        body: Value,
    ) -> reqwest::Response {
        self.api(token).send_json(method, path, body).await
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
        blob_keys(self.blobs.as_ref()).await
    }

    /// `POST {path}` with a multipart `form`.
    pub async fn post_form(
        &self,
        token: &str,
        path: &str,
        form: reqwest::multipart::Form,
    ) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .expect("the request is answered")
    }
}

/// Every key in `blobs`, sorted: what "nothing stored" checks look at.
pub async fn blob_keys(blobs: &dyn BlobStore) -> Vec<String> {
    let mut keys: Vec<String> = blobs
        .list_all("")
        .await
        .expect("the bucket lists")
        .into_iter()
        .map(|blob| blob.key)
        .collect();
    keys.sort();
    keys
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
