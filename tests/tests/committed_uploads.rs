//! A committed upload never loses its blob (CONTRACT.md rule 15, issue 12
//! defect 3): not when the read models lag past the read-your-writes wait,
//! and not when the connection to the log is lost after COMMIT was sent.
//!
//! The lag is real: the application runs without the projections role and a
//! separate process runs the projections only while the test wants them. The
//! lost connection is real too: the application reaches Postgres through a
//! TCP proxy that, once, lets an append through and cuts the connection as
//! soon as Postgres has answered it (so the events are committed and the
//! client sees a lost connection).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use dossier_api::auth::jwt::{self, Claims, Role};
use dossier_api::startup::Application;
use dossier_blobstore::BlobStore;
use dossier_test_support::upstream::{Command, Upstream};
use dossier_test_support::wait::eventually;
use dossier_test_support::{SECRET, TestApp, s3_store, settings};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

/// A Dossier that runs the HTTP API only: no projections (so its read models
/// lag for as long as the test wants), a short read-your-writes wait, and no
/// broker (nothing here needs one).
struct Lagging {
    address: String,
    client: reqwest::Client,
    database_url: String,
    blobs: Arc<dyn BlobStore>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Lagging {
    async fn spawn() -> Self {
        dossier_runtime::telemetry::init_test_tracing();
        let (_, database_url) = dossier_test_support::db::fresh_database()
            .await
            .expect("a fresh test database");
        let blobs = s3_store(&format!("t-{}", Uuid::new_v4().simple())).await;
        let settings = settings(
            &database_url,
            &[
                ("DOSSIER_ROLES", "api"),
                ("DOSSIER_FRESHNESS_TIMEOUT_MS", "300"),
            ],
        );
        let app = Application::build_with_blobs(settings, blobs.clone())
            .await
            .expect("the application starts");
        let address = format!(
            "http://{}",
            app.http_address().expect("the api role listens")
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Self {
            address,
            client: reqwest::Client::new(),
            database_url,
            blobs,
            stop: Some(stop),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    fn token(&self, role: Role, sub: &str, customer: Option<&str>) -> String {
        let now = chrono::Utc::now().timestamp();
        jwt::issue(
            SECRET.as_bytes(),
            &Claims {
                sub: sub.to_owned(),
                tenant: "acme".to_owned(),
                role,
                customer: customer.map(str::to_owned),
                exp: now + 3600,
                iat: Some(now),
            },
        )
    }

    async fn get(&self, token: &str, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("the request is answered")
    }

    async fn post_form(&self, token: &str, path: &str, form: Form) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .expect("the request is answered")
    }

    async fn blob_keys(&self) -> Vec<String> {
        dossier_test_support::blob_keys(self.blobs.as_ref()).await
    }
}

impl Drop for Lagging {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A process of its own running only the projections, on the test's database.
struct Projections {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Projections {
    async fn start(app: &Lagging) -> Self {
        let settings = settings(&app.database_url, &[("DOSSIER_ROLES", "projections")]);
        let process = Application::build_with_blobs(settings, app.blobs.clone())
            .await
            .expect("the projections process starts");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(process.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("the projections process ends")
            .expect("the projections process stops cleanly");
    }
}

fn file_form(file_name: &str, mime: &str, bytes: Vec<u8>) -> Form {
    Form::new().part(
        "file",
        Part::bytes(bytes)
            .file_name(file_name.to_owned())
            .mime_str(mime)
            .expect("a valid mime type"),
    )
}

fn lag_header(response: &reqwest::Response) -> Option<&str> {
    response
        .headers()
        .get("dossier-read-models")
        .and_then(|value| value.to_str().ok())
}

#[tokio::test]
async fn an_upload_whose_read_models_lag_answers_the_recorded_file_and_keeps_its_blob() {
    let app = Lagging::spawn().await;
    let staff = app.token(Role::Staff, "staff-1", None);
    let bytes = b"%PDF-1.7 recorded while the read models lag".to_vec();

    let form = file_form("lagging.pdf", "application/pdf", bytes.clone())
        .text("name", "Lagging")
        .text("visibility", "portal");
    let response = app
        .post_form(&staff, "/v1/customers/cust-1/files", form)
        .await;
    assert_eq!(
        response.status(),
        201,
        "a recorded upload is answered as recorded"
    );
    assert_eq!(
        lag_header(&response),
        Some("lagging"),
        "the answer says that lists may not show it yet"
    );
    let answered: Value = response.json().await.unwrap();
    let id = answered["id"].as_str().unwrap().to_owned();
    assert_eq!(answered["name"], "Lagging");
    assert_eq!(answered["file_name"], "lagging.pdf");
    assert_eq!(answered["customer_id"], "cust-1");
    assert_eq!(answered["visibility"], "portal");
    assert_eq!(answered["origin"], "staff_upload");
    assert_eq!(answered["size"], bytes.len());
    assert_eq!(answered["protected"], false);
    assert_eq!(
        app.blob_keys().await,
        [format!("acme/cust-1/{id}")],
        "the blob of a recorded upload stays"
    );

    // Once the projections run, the file is there: exactly as answered, bytes included.
    let projections = Projections::start(&app).await;
    eventually("the file is listed once projections run", || async {
        let list: Value = app
            .get(&staff, "/v1/customers/cust-1/files")
            .await
            .json()
            .await
            .unwrap();
        list["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|file| file["id"] == id.as_str()))
    })
    .await;
    let read: Value = app
        .get(&staff, &format!("/v1/files/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        read, answered,
        "the answer built from the command is the file"
    );
    let content = app.get(&staff, &format!("/v1/files/{id}/content")).await;
    assert_eq!(content.status(), 200);
    assert_eq!(content.bytes().await.unwrap().as_ref(), bytes.as_slice());

    // With the read models current, the same path answers without the header.
    let form = file_form("fresh.pdf", "application/pdf", b"fresh".to_vec()).text("name", "Fresh");
    let response = app
        .post_form(&staff, "/v1/customers/cust-1/files", form)
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(lag_header(&response), None);
    projections.stop().await;
}

#[tokio::test]
async fn a_portal_upload_whose_read_models_lag_answers_the_recorded_attachment_and_keeps_its_blob()
{
    let app = Lagging::spawn().await;
    let staff = app.token(Role::Staff, "staff-1", None);
    // The task must be in the read models before the customer can upload to it.
    let projections = Projections::start(&app).await;
    let response = app
        .client
        .post(app.url("/v1/customers/cust-7/tasks"))
        .bearer_auth(&staff)
        .json(&json!({"title": "Send your payslip"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let task: Value = response.json().await.unwrap();
    let task_id = task["id"].as_str().unwrap().to_owned();
    projections.stop().await;

    let customer = app.token(Role::Customer, "user-cust-7", Some("cust-7"));
    let bytes = b"payslip bytes".to_vec();
    let response = app
        .post_form(
            &customer,
            &format!("/v1/portal/tasks/{task_id}/attachments"),
            file_form("payslip_may.png", "image/png", bytes.clone()),
        )
        .await;
    assert_eq!(response.status(), 201, "a recorded attachment is answered");
    assert_eq!(lag_header(&response), Some("lagging"));
    let answered: Value = response.json().await.unwrap();
    let id = answered["id"].as_str().unwrap().to_owned();
    assert_eq!(answered["name"], "payslip_may");
    assert_eq!(answered["origin"], "customer_upload");
    assert_eq!(answered["visibility"], "portal");
    assert_eq!(answered["task_id"], task_id.as_str());
    assert_eq!(
        app.blob_keys().await,
        [format!("acme/cust-7/{id}")],
        "the blob of a recorded attachment stays"
    );

    let projections = Projections::start(&app).await;
    eventually(
        "the attachment shows on the task once projections run",
        || async {
            let tasks: Value = app
                .get(&customer, "/v1/portal/tasks")
                .await
                .json()
                .await
                .unwrap();
            tasks["items"][0]["attachments"]
                .as_array()
                .is_some_and(|files| files.iter().any(|file| file["id"] == id.as_str()))
        },
    )
    .await;
    let content = app
        .get(&customer, &format!("/v1/portal/files/{id}/content"))
        .await;
    assert_eq!(content.status(), 200);
    assert_eq!(content.bytes().await.unwrap().as_ref(), bytes.as_slice());
    projections.stop().await;
}

#[tokio::test]
async fn an_upstream_upload_whose_connection_is_lost_after_commit_keeps_its_blob_and_is_accepted_on_redelivery()
 {
    let (pool, database_url) = dossier_test_support::db::fresh_database()
        .await
        .expect("a database for the proxied application");
    let probe = format!("Lost commit probe {}", Uuid::new_v4());
    let cutter = CommitCutter::start(&database_url, probe.as_bytes().to_vec()).await;
    let app = TestApp::spawn_with(&[("DOSSIER_DATABASE_URL", &cutter.url)]).await;
    let upstream = Upstream::connect(app.vhost.url()).await;

    let bytes = b"%PDF-1.7 committed, then the connection died".to_vec();
    let command = Command::new("file.upload", "acme", bytes.clone())
        .header("customer_id", "cust-3")
        .header("name", &probe)
        .header("file_name", "statement.pdf")
        .header("content_type", "application/pdf");
    upstream.send(&command).await;
    let replies = upstream.replies(1).await;
    let reply = &replies[command.correlation_id.as_ref().unwrap()][0];

    assert_eq!(
        cutter.cuts(),
        1,
        "the append's connection was cut after its COMMIT"
    );
    assert_eq!(
        reply["status"], "accepted",
        "the redelivery finds the receipt: {reply}"
    );
    let file_id = reply["file_id"].as_str().unwrap().to_owned();
    let client = pool.get().await.unwrap();
    let events: i64 = client
        .query_one(
            "SELECT count(*) FROM events WHERE aggregate_type = 'file' AND aggregate_id = $1",
            &[&file_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 1, "the upload was recorded once");
    assert_eq!(
        app.blob_keys().await,
        [format!("acme/cust-3/{file_id}")],
        "the blob the event names is still there"
    );
    // A reply to a redelivery answers the receipt that stands, without
    // waiting for the read models (rule 10 is HTTP's); the file shows up in
    // them within their lag.
    let staff = app.staff("acme");
    let content = eventually("the accepted file can be downloaded", async || {
        let response = app
            .get(&staff, &format!("/v1/files/{file_id}/content"))
            .await;
        if response.status() == 200 {
            Ok(response.bytes().await.unwrap())
        } else {
            Err(response.status())
        }
    })
    .await;
    assert_eq!(content.as_ref(), bytes.as_slice());
}

/// A TCP proxy in front of Postgres that, once, lets through the first
/// statement whose parameters carry `marker` and closes that connection as
/// soon as Postgres has finished it (its ReadyForQuery: the implicit
/// transaction is committed), without passing the answer on.
struct CommitCutter {
    url: String,
    cuts: Arc<AtomicUsize>,
}

impl CommitCutter {
    async fn start(database_url: &str, marker: Vec<u8>) -> Self {
        let config: tokio_postgres::Config = database_url.parse().expect("a Postgres URL");
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            other => panic!("the test database must be reached over TCP, not {other:?}"),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let upstream = format!("{host}:{port}");
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let address = listener.local_addr().unwrap();
        let user = config.get_user().unwrap_or("postgres");
        let dbname = config.get_dbname().expect("the URL names its database");
        let url = format!("postgres://{user}@{address}/{dbname}");

        let cuts = Arc::new(AtomicUsize::new(0));
        let armed = Arc::new(AtomicBool::new(true));
        let marker = Arc::new(marker);
        let counting = Arc::clone(&cuts);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(proxy(
                    client,
                    server,
                    Arc::clone(&marker),
                    Arc::clone(&armed),
                    Arc::clone(&counting),
                ));
            }
        });
        Self { url, cuts }
    }

    fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

async fn proxy(
    client: TcpStream,
    server: TcpStream,
    marker: Arc<Vec<u8>>,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
) {
    let doomed = AtomicBool::new(false);
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let upstream = async {
        let mut buffer = vec![0u8; 64 * 1024];
        // The end of the previous chunk, so a marker split across reads is found.
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let read = match from_client.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            let chunk = &buffer[..read];
            let mut window = std::mem::take(&mut tail);
            window.extend_from_slice(chunk);
            if armed.load(Ordering::SeqCst)
                && window.windows(marker.len()).any(|w| w == marker.as_slice())
                && armed.swap(false, Ordering::SeqCst)
            {
                doomed.store(true, Ordering::SeqCst);
            }
            let keep = window.len().min(marker.len());
            tail = window[window.len() - keep..].to_vec();
            if to_server.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    let downstream = async {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let read = match from_server.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            pending.extend_from_slice(&buffer[..read]);
            // Server messages: a type byte, then a length that counts itself.
            while pending.len() >= 5 {
                let length =
                    u32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]) as usize;
                if pending.len() < 1 + length {
                    break;
                }
                let message: Vec<u8> = pending.drain(..1 + length).collect();
                if doomed.load(Ordering::SeqCst) {
                    if message[0] == b'Z' {
                        // Committed; the client never hears of it.
                        cuts.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    continue;
                }
                if to_client.write_all(&message).await.is_err() {
                    return;
                }
            }
        }
    };
    // Either side ending ends both: dropping the halves closes the sockets.
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}
