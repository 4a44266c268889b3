//! The HTTP edge's limits (issue 12, CONTRACT.md rule 14), end to end: real
//! sockets against the real server, real Postgres, a real S3 server or
//! directory store, RabbitMQ where the roles need it.
//!
//! - multipart forms carry only the fields their endpoint names, each once,
//!   with small text fields; anything else is refused with nothing stored;
//! - a half-sent header and a stalled body are cut off (short timeouts set
//!   through the settings), leaving no blob, no temporary file, no
//!   unfinished S3 multipart upload and no event;
//! - connections beyond the bound wait until one closes;
//! - a handler that panics answers 500 `internal`, and the server goes on;
//! - `/readyz` names what is down and nothing else, and writes nothing;
//! - a bulk delete reports every file, past a failure of one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dossier_api::auth::jwt::Role;
use dossier_api::http::serve::{self, Limits};
use dossier_blobstore::{self as blob, BlobStore, BlobStoreSpec};
use dossier_eventlog::db::Pool;
use dossier_test_support::client::Client;
use dossier_test_support::wait::{Wait, eventually};
use dossier_test_support::{AppServer, error_code, s3, settings, wait_until_ready};
use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// How long a test lets the server take to do what a short timeout says.
const PATIENCE: Duration = Duration::from_secs(30);

async fn event_count(pool: &Pool) -> i64 {
    let client = pool.get().await.unwrap();
    client
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

/// `host:port` of an `http://host:port` address.
fn socket_address(address: &str) -> SocketAddr {
    address
        .trim_start_matches("http://")
        .parse()
        .expect("the server's address is IP:port")
}

/// The start of an HTTP answer read off a raw connection: its status and
/// body, or `None` when the server closed without answering.
#[derive(Debug)]
struct RawAnswer {
    status: Option<u16>,
    body: String,
}

/// Reads one answer (headers, then a `Content-Length` body), or whatever
/// comes until the server closes.
async fn read_answer(stream: &mut TcpStream) -> RawAnswer {
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        let head_end = received
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .map(|at| at + 4);
        if let Some(head_end) = head_end {
            let head = String::from_utf8_lossy(&received[..head_end]).to_string();
            let length = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())
                        .flatten()
                })
                .unwrap_or(0);
            if received.len() >= head_end + length {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|status| status.parse().ok());
                let body = String::from_utf8_lossy(&received[head_end..head_end + length]);
                return RawAnswer {
                    status,
                    body: body.into_owned(),
                };
            }
        }
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => {
                return RawAnswer {
                    status: None,
                    body: String::from_utf8_lossy(&received).into_owned(),
                };
            }
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

/// Reads until the server closes the connection (EOF or reset).
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

/// A Dossier of the harness on a blob store of the test's choosing (a
/// private S3 server, a directory), so that what the store holds can be
/// looked at directly. Runs the api and projections roles only (no
/// RabbitMQ), unless `overrides` say otherwise.
struct Edge {
    server: AppServer,
    pool: Pool,
    blobs: Arc<dyn BlobStore>,
    /// A client that keeps no idle connection (so none holds a slot).
    http: reqwest::Client,
}

impl Edge {
    /// On a bucket of its own on the shared S3 server.
    async fn on_s3(overrides: &[(&str, &str)]) -> Self {
        let bucket = format!("h-{}", uuid::Uuid::new_v4().simple());
        let edge = Self::start(dossier_test_support::s3_store(&bucket).await, overrides).await;
        edge.wait_until_ready().await;
        edge
    }

    async fn start(blobs: Arc<dyn BlobStore>, overrides: &[(&str, &str)]) -> Self {
        dossier_runtime::telemetry::init_test_tracing();
        let (pool, database_url) = dossier_test_support::db::fresh_database()
            .await
            .expect("a fresh test database");
        let mut all: Vec<(&str, &str)> = vec![("DOSSIER_ROLES", "api,projections")];
        all.extend_from_slice(overrides);
        let server = AppServer::start(settings(&database_url, &all), blobs.clone())
            .await
            .expect("the application starts");
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        Self {
            server,
            pool,
            blobs,
            http,
        }
    }

    async fn wait_until_ready(&self) {
        wait_until_ready(&self.http, &self.server.address, PATIENCE)
            .await
            .expect("the application becomes ready");
    }

    fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    fn token(&self, role: Role, customer: Option<&str>) -> String {
        let sub = customer.map_or_else(|| "staff-1".to_owned(), |c| format!("user-{c}"));
        dossier_test_support::token("acme", role, &sub, customer, Duration::from_secs(3600))
    }

    /// The contract spoken by a staff member of `acme`.
    fn staff(&self) -> Client {
        Client::new(
            self.http.clone(),
            &self.server.address,
            &self.token(Role::Staff, None),
        )
    }

    /// `POST path` with a multipart body as given, whatever it answers.
    async fn post_form(&self, path: &str, token: &str, form: Form) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .unwrap_or_else(|error| panic!("POST {path} is answered: {error}"))
    }

    fn socket(&self) -> SocketAddr {
        socket_address(&self.server.address)
    }

    async fn blob_keys(&self) -> Vec<String> {
        dossier_test_support::blob_keys(self.blobs.as_ref()).await
    }

    async fn stop(mut self) {
        self.server.stop().await.expect("a graceful stop");
    }
}

/// Files of `dir` (not recursive) whose names start with `prefix`.
fn files_starting_with(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn temporary_dir(purpose: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "dossier-{purpose}-{}",
        uuid::Uuid::new_v4().simple()
    ))
}

// ---------------------------------------------------------------- forms

/// Fails the test unless the store holds no blob (a refused form's file part
/// is removed right after the refusal).
async fn expect_no_blob(edge: &Edge) {
    eventually("no blob to stay", async || {
        let keys = edge.blob_keys().await;
        if keys.is_empty() { Ok(()) } else { Err(keys) }
    })
    .await;
}

#[tokio::test]
async fn a_form_of_100000_small_fields_is_refused_with_nothing_stored_and_the_server_answers_on() {
    let edge = Edge::on_s3(&[]).await;
    let staff = edge.staff();
    // Written by hand: reqwest's form nests one stream per part, too deep for
    // 100,000 of them. The file comes first, so its blob is stored before
    // the form is refused.
    let boundary = "hardening-fields";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"first.pdf\"\r\n\
         Content-Type: application/pdf\r\n\r\n%PDF-1.7 first part\r\n"
    );
    for i in 0..100_000 {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nn{i}\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    let response = edge
        .http
        .post(edge.url("/v1/customers/cust-1/files"))
        .bearer_auth(staff.token())
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .expect("the refusal is answered");
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "validation_failed", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("name:"),
        "the message names the field: {body}"
    );

    assert_eq!(event_count(&edge.pool).await, 0, "nothing was recorded");
    expect_no_blob(&edge).await;
    // The service stays up and takes the next form.
    let file = staff
        .upload("cust-1", "After the flood", b"ok".to_vec())
        .await;
    assert_eq!(file.name, "After the flood");
    edge.stop().await;
}

#[tokio::test]
async fn a_form_field_the_endpoint_does_not_name_is_refused_naming_it_with_nothing_stored() {
    let edge = Edge::on_s3(&[]).await;
    let staff = edge.staff();

    // Staff upload: the file first, then a field the contract does not list.
    let form = Form::new()
        .part(
            "file",
            Part::bytes(b"bytes".to_vec()).file_name("contract.pdf"),
        )
        .text("name", "Contract")
        .text("colour", "blue");
    let response = edge
        .post_form("/v1/customers/cust-1/files", staff.token(), form)
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "validation_failed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("\"colour\""), "names the field: {message}");

    // Portal attachment: the form takes `file` alone.
    let task: Value = staff
        .send_json(
            Method::POST,
            "/v1/customers/cust-1/tasks",
            json!({"title": "Send your ID"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let task_id = task["id"].as_str().unwrap();
    let customer = edge.token(Role::Customer, Some("cust-1"));
    let events_before = event_count(&edge.pool).await;
    let form = Form::new()
        .part("file", Part::bytes(b"id".to_vec()).file_name("id.png"))
        .text("name", "My ID");
    let path = format!("/v1/portal/tasks/{task_id}/attachments");
    let response = edge.post_form(&path, &customer, form).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"name\""),
        "{body}"
    );

    assert_eq!(event_count(&edge.pool).await, events_before);
    expect_no_blob(&edge).await;
    edge.stop().await;
}

#[tokio::test]
async fn a_text_field_past_64_kib_is_refused_naming_it_with_nothing_stored() {
    let edge = Edge::on_s3(&[]).await;
    let staff = edge.staff();
    let form = Form::new()
        .part("file", Part::bytes(b"bytes".to_vec()).file_name("a.pdf"))
        .text("name", "x".repeat(64 * 1024 + 1));
    let response = edge
        .post_form("/v1/customers/cust-1/files", staff.token(), form)
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("name:"),
        "{body}"
    );
    assert_eq!(event_count(&edge.pool).await, 0);
    expect_no_blob(&edge).await;
    edge.stop().await;
}

// ------------------------------------------------------------- timeouts

#[tokio::test]
async fn a_half_sent_header_is_closed_after_the_header_timeout() {
    let edge = Edge::on_s3(&[("DOSSIER_HTTP_HEADER_TIMEOUT_SECS", "1")]).await;
    let address = edge.socket();

    let started = Instant::now();
    let mut half = TcpStream::connect(address).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: dossier\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(address).await.unwrap();
    let closed = tokio::time::timeout(PATIENCE, async {
        tokio::join!(read_until_closed(&mut half), read_until_closed(&mut silent))
    })
    .await
    .expect("both connections are closed by the server");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed by the timeout, not at once: {waited:?}"
    );
    for answer in [closed.0, closed.1] {
        let text = String::from_utf8_lossy(&answer).into_owned();
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "nothing but a timeout answer: {text}"
        );
    }
    // Others are still served.
    let health = edge.http.get(edge.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    edge.stop().await;
}

/// Sends the head of an upload whose body claims `file_size` bytes, then
/// `sent` bytes of the file, and stalls.
async fn stall_an_upload(
    address: SocketAddr,
    token: &str,
    file_size: usize,
    sent: usize,
) -> TcpStream {
    let boundary = "hardening-boundary";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nStalled\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"stalled.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let length = head.len() + file_size + tail.len();
    let request = format!(
        "POST /v1/customers/cust-1/files HTTP/1.1\r\nHost: dossier\r\n\
         Authorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\n\
         Content-Length: {length}\r\n\r\n{head}"
    );
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0;
    while written < sent {
        let n = chunk.len().min(sent - written);
        stream.write_all(&chunk[..n]).await.unwrap();
        written += n;
    }
    stream.flush().await.unwrap();
    stream
}

/// What a stalled upload must end in: an answer that says the body broke
/// off (or none) and a closed connection.
async fn expect_cut_off(stream: &mut TcpStream) {
    let answer = tokio::time::timeout(PATIENCE, read_answer(stream))
        .await
        .expect("the stalled upload is cut off");
    if let Some(status) = answer.status {
        assert_eq!(status, 422, "{answer:?}");
        assert!(answer.body.contains("validation_failed"), "{answer:?}");
    }
    let rest = tokio::time::timeout(PATIENCE, read_until_closed(stream))
        .await
        .expect("the server closes the connection after a stalled body");
    assert!(rest.is_empty(), "nothing more is said");
}

#[tokio::test]
async fn a_stalled_upload_to_s3_is_cut_off_and_leaves_no_multipart_upload_no_blob_and_no_event() {
    let s3 = s3::spawn_temporary("hardening-s3").await.unwrap();
    let blobs = s3.store("stalled").await.unwrap();
    let edge = Edge::start(blobs, &[("DOSSIER_HTTP_BODY_IDLE_TIMEOUT_SECS", "3")]).await;
    edge.wait_until_ready().await;
    let token = edge.token(Role::Staff, None);

    // 9 MiB of a 10 MiB file: past the first 8 MiB part, so the store has
    // begun an S3 multipart upload when the body stalls.
    let mut stream = stall_an_upload(edge.socket(), &token, 10 << 20, 9 << 20).await;
    Wait::new("the S3 multipart upload to begin")
        .timeout(Duration::from_secs(3))
        .interval(Duration::from_millis(10))
        .expect(async || !files_starting_with(&s3.root, ".upload-").is_empty())
        .await;

    expect_cut_off(&mut stream).await;
    eventually("the multipart upload to be aborted", async || {
        let left = files_starting_with(&s3.root, ".upload");
        if left.is_empty() { Ok(()) } else { Err(left) }
    })
    .await;
    assert!(edge.blob_keys().await.is_empty(), "no blob");
    assert_eq!(event_count(&edge.pool).await, 0, "no event");
    // The service goes on.
    let health = edge.http.get(edge.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    edge.stop().await;
    s3.remove().await.unwrap();
}

#[tokio::test]
async fn a_stalled_upload_to_a_directory_is_cut_off_and_leaves_no_temporary_file_no_blob_and_no_event()
 {
    let root = temporary_dir("hardening-dir");
    let blobs = blob::open(&BlobStoreSpec::Dir(root.clone())).await.unwrap();
    let edge = Edge::start(blobs, &[("DOSSIER_HTTP_BODY_IDLE_TIMEOUT_SECS", "3")]).await;
    edge.wait_until_ready().await;
    let token = edge.token(Role::Staff, None);

    let mut stream = stall_an_upload(edge.socket(), &token, 1 << 20, 256 << 10).await;
    let tmp = root.join(".tmp");
    Wait::new("the temporary file to be written")
        .timeout(Duration::from_secs(3))
        .interval(Duration::from_millis(10))
        .expect(async || !files_starting_with(&tmp, "").is_empty())
        .await;

    expect_cut_off(&mut stream).await;
    eventually("the temporary file to be removed", async || {
        let left = files_starting_with(&tmp, "");
        if left.is_empty() { Ok(()) } else { Err(left) }
    })
    .await;
    assert!(edge.blob_keys().await.is_empty(), "no blob");
    assert_eq!(event_count(&edge.pool).await, 0, "no event");
    edge.stop().await;
    let _ = std::fs::remove_dir_all(root);
}

// ---------------------------------------------------------- connections

#[tokio::test]
async fn connections_beyond_the_bound_wait_until_one_closes() {
    let root = temporary_dir("hardening-bound");
    let blobs = blob::open(&BlobStoreSpec::Dir(root.clone())).await.unwrap();
    let edge = Edge::start(blobs, &[("DOSSIER_HTTP_MAX_CONNECTIONS", "2")]).await;
    edge.wait_until_ready().await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: dossier\r\n\r\n";

    // Two kept-alive connections, each served once: they hold both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(edge.socket()).await.unwrap();
        stream.write_all(request).await.unwrap();
        let answer = tokio::time::timeout(PATIENCE, read_answer(&mut stream))
            .await
            .expect("a connection within the bound is served");
        assert_eq!(answer.status, Some(200), "{answer:?}");
        held.push(stream);
    }

    // A third one is connected (the kernel's backlog takes it) but not served.
    let mut third = TcpStream::connect(edge.socket()).await.unwrap();
    third.write_all(request).await.unwrap();
    let early = tokio::time::timeout(Duration::from_secs(1), read_answer(&mut third)).await;
    assert!(
        early.is_err(),
        "the third connection is not served while two are open: {early:?}"
    );

    // One closes: the third is served.
    drop(held.remove(0));
    let answer = tokio::time::timeout(PATIENCE, read_answer(&mut third))
        .await
        .expect("the waiting connection is served once a slot is free");
    assert_eq!(answer.status, Some(200), "{answer:?}");
    drop(held);
    drop(third);
    edge.stop().await;
    let _ = std::fs::remove_dir_all(root);
}

// ---------------------------------------------------------------- panics

/// What a handler with a bug does.
fn panics(detail: &str) -> &'static str {
    panic!("{detail}")
}

#[tokio::test]
async fn a_handler_that_panics_answers_500_internal_and_the_next_request_is_served() {
    use axum::Router;
    use axum::routing::get;

    // A route that panics exists only here, under the API's own edge layers
    // and serve loop; the API ships no such route.
    let router = dossier_api::http::with_edge_layers(
        Router::new()
            .route(
                "/panics",
                get(|| async { panics("the handler's secret detail") }),
            )
            .route("/fine", get(|| async { "fine" })),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = Limits {
        header_timeout: Duration::from_secs(30),
        body_idle_timeout: Duration::from_secs(60),
        max_connections: 16,
    };
    let server = tokio::spawn(serve::serve(listener, router, limits, async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();

    for _ in 0..2 {
        let response = client
            .get(format!("http://{address}/panics"))
            .send()
            .await
            .expect("a panic is answered");
        assert_eq!(response.status(), 500);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "internal", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(!message.is_empty());
        assert!(
            !message.contains("secret"),
            "the panic's detail stays in the log: {message}"
        );
        let fine = client
            .get(format!("http://{address}/fine"))
            .send()
            .await
            .expect("the next request is served");
        assert_eq!(fine.status(), 200);
        assert_eq!(fine.text().await.unwrap(), "fine");
    }

    let _ = stop.send(());
    server.await.unwrap().expect("the server stops gracefully");
}

// ---------------------------------------------------------------- readyz

#[tokio::test]
async fn readyz_names_what_is_down_and_says_nothing_internal() {
    let s3 = s3::spawn_temporary("hardening-ready").await.unwrap();
    let bucket = "readiness-bucket";
    let blobs = s3.store(bucket).await.unwrap();
    // Nothing listens on port 1: RabbitMQ is down for the whole test.
    let edge = Edge::start(
        blobs,
        &[
            ("DOSSIER_ROLES", "all"),
            ("DOSSIER_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ],
    )
    .await;
    let url = edge.url("/readyz");
    let readiness = async |expected: &Value| {
        let response = edge.http.get(&url).send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        if status == 503 && &body == expected {
            Ok(())
        } else {
            Err((status, body))
        }
    };

    let broker_down = json!({"ready": false, "checks": [
        {"name": "postgres", "ok": true},
        {"name": "blob_store", "ok": true},
        {"name": "rabbitmq", "ok": false},
    ]});
    eventually("/readyz to name RabbitMQ, and only that", async || {
        readiness(&broker_down).await
    })
    .await;

    let endpoint = s3.endpoint.clone();
    s3.remove().await.unwrap();
    let both_down = json!({"ready": false, "checks": [
        {"name": "postgres", "ok": true},
        {"name": "blob_store", "ok": false},
        {"name": "rabbitmq", "ok": false},
    ]});
    eventually("/readyz to name the blob store too", async || {
        readiness(&both_down).await
    })
    .await;
    let text = edge
        .http
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for internal in [
        endpoint.as_str(),
        endpoint.trim_start_matches("http://"),
        bucket,
        "127.0.0.1",
        "amqp",
    ] {
        assert!(!text.contains(internal), "{internal} in {text}");
    }
    edge.stop().await;
}

#[tokio::test]
async fn readyz_of_a_directory_store_writes_nothing() {
    let root = temporary_dir("hardening-probe");
    let blobs = blob::open(&BlobStoreSpec::Dir(root.clone())).await.unwrap();
    let edge = Edge::start(blobs, &[]).await;
    edge.wait_until_ready().await;
    let tmp = root.join(".tmp");
    let before = std::fs::metadata(&tmp).unwrap().modified().unwrap();
    for _ in 0..5 {
        let response = edge.http.get(edge.url("/readyz")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let after = std::fs::metadata(&tmp).unwrap().modified().unwrap();
    assert_eq!(before, after, "no probe file was written and removed");
    assert!(files_starting_with(&tmp, "").is_empty());
    edge.stop().await;
    let _ = std::fs::remove_dir_all(root);
}

// ----------------------------------------------------------- bulk delete

#[tokio::test]
async fn a_bulk_delete_reports_every_file_and_goes_on_past_a_transient_failure() {
    let edge = Edge::on_s3(&[]).await;
    let staff = edge.staff();
    let first = staff.upload("cust-1", "First", b"1".to_vec()).await.id;
    let failing = staff.upload("cust-1", "Failing", b"2".to_vec()).await.id;
    let third = staff.upload("cust-1", "Third", b"3".to_vec()).await.id;

    // The log refuses any append for one file, as a failing database would:
    // a real statement error in the real Postgres, for that file alone.
    let db = edge.pool.get().await.unwrap();
    db.batch_execute(&format!(
        "CREATE FUNCTION hardening_refuse_append() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.aggregate_id = '{failing}' THEN
             RAISE EXCEPTION 'the hardening test refuses this append';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER hardening_refuse_append BEFORE INSERT ON events
           FOR EACH ROW EXECUTE FUNCTION hardening_refuse_append();"
    ))
    .await
    .unwrap();

    let delete = async |ids: Value| -> Value {
        let response = staff
            .send_json(
                Method::POST,
                "/v1/files/delete",
                json!({"file_ids": ids, "confirm": true}),
            )
            .await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    };
    let answer = delete(json!([first, failing, "not-a-file", third])).await;
    assert_eq!(
        answer,
        json!({"results": [
            {"id": first, "status": "deleted"},
            {"id": failing, "status": "unavailable"},
            {"id": "not-a-file", "status": "not_found"},
            {"id": third, "status": "deleted"},
        ]})
    );
    let listed: Vec<String> = staff
        .list_all("cust-1", "")
        .await
        .into_iter()
        .map(|file| file.id)
        .collect();
    assert_eq!(
        listed,
        vec![failing.clone()],
        "exactly the deleted ones are gone"
    );

    // `unavailable` is retryable: once the log takes appends again, the same
    // request deletes it.
    db.batch_execute("DROP TRIGGER hardening_refuse_append ON events")
        .await
        .unwrap();
    assert_eq!(
        delete(json!([failing])).await,
        json!({"results": [{"id": failing, "status": "deleted"}]})
    );
    assert!(staff.list_all("cust-1", "").await.is_empty());
    let gone = staff.get(&format!("/v1/files/{failing}")).await;
    assert_eq!(gone.status(), 404);
    assert_eq!(error_code(gone).await, "not_found");
    edge.stop().await;
}
