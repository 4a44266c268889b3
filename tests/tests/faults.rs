//! Faults: nothing acknowledged is lost (issue 12).
//!
//! Each test runs a load of concurrent uploads, renames and downloads through
//! one fault — a restart of Postgres, an S3 outage, RabbitMQ connections closed,
//! the broker unreachable — and then checks the end state:
//!
//! - every upload that got a 2xx is listed and downloads with its recorded
//!   SHA-256 (lost = 0);
//! - every upload that failed left no event, and (after the orphan sweep) no blob;
//! - no command was recorded twice;
//! - the hash chain verifies;
//! - the service recovered without a restart, `/readyz` said so during and after;
//! - every error during the fault was `503 unavailable`, never a hang or a 500.
//!
//! The machine's shared Postgres is never restarted: the Postgres test starts a
//! private server ([`PrivatePostgres`]). S3 and RabbitMQ are cut with a
//! [`FaultyProxy`] between Dossier and the real server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dossier_api::auth::jwt::Role;
use dossier_blobstore::{self as blob, BlobStore, BlobStoreSpec, S3Options};
use dossier_eventlog::chain;
use dossier_eventlog::db::{self, Pool};
use dossier_test_support::postgres::PrivatePostgres;
use dossier_test_support::proxy::FaultyProxy;
use dossier_test_support::rabbit::TestVhost;
use dossier_test_support::wait::Wait;
use dossier_test_support::{AppServer, s3_server, settings};
use rand::Rng as _;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use uuid::Uuid;

const TENANT: &str = "acme";
const CUSTOMER: &str = "cust-faults";
/// How long a request may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(45);
/// How long a fault lasts: the outage itself, not a synchronisation.
const OUTAGE: Duration = Duration::from_secs(4);

/// Where the application under test finds its backing services.
struct Backends {
    database_url: String,
    amqp_url: String,
    /// The store the application writes through (maybe behind a proxy).
    app_blobs: Arc<dyn BlobStore>,
    /// The same bucket, straight to the server, for the checks.
    check_blobs: Arc<dyn BlobStore>,
}

struct Running {
    server: AppServer,
    http: reqwest::Client,
    pool: Pool,
    check_blobs: Arc<dyn BlobStore>,
}

impl Running {
    async fn start(backends: Backends) -> Self {
        dossier_runtime::telemetry::init_test_tracing();
        let overrides = [
            ("DOSSIER_AMQP_URL", backends.amqp_url.as_str()),
            ("DOSSIER_MAX_FILE_BYTES", "1048576"),
        ];
        let settings = settings(&backends.database_url, &overrides);
        let server = AppServer::start(settings, backends.app_blobs.clone())
            .await
            .expect("the application starts");
        let pool = db::connect(&backends.database_url, 8)
            .await
            .expect("a pool for the checks");
        let running = Self {
            server,
            http: reqwest::Client::builder()
                .timeout(HANG)
                .build()
                .expect("a client"),
            pool,
            check_blobs: backends.check_blobs,
        };
        running.wait_ready(true).await;
        running
    }

    fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    /// Waits until `/readyz` says `ready` (2xx) or not.
    async fn wait_ready(&self, ready: bool) {
        Wait::new(format!("/readyz to say ready={ready}"))
            .timeout(Duration::from_secs(90))
            .interval(Duration::from_millis(100))
            .expect(async || {
                self.http
                    .get(self.url("/readyz"))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                    == ready
            })
            .await;
    }

    async fn stop(mut self) {
        let _ = self.server.stop().await;
    }
}

fn staff_token() -> String {
    dossier_test_support::token(
        TENANT,
        Role::Staff,
        "staff-faults",
        None,
        Duration::from_secs(3600),
    )
}

/// What one upload attempt ended as.
#[derive(Debug, Clone)]
struct Attempt {
    name: String,
    sha256: String,
    /// The created file's id, for a 2xx.
    file_id: Option<String>,
    /// What the client was told otherwise.
    failure: Option<String>,
}

/// What the load saw.
#[derive(Debug, Default)]
struct Observed {
    uploads: Vec<Attempt>,
    /// Status (0 = no answer in time or a broken connection) of every failed
    /// request by kind, with the error codes.
    failures: BTreeMap<String, usize>,
    renames_ok: usize,
    downloads_ok: usize,
    /// A download whose bytes did not match what its upload recorded.
    corrupt_downloads: Vec<String>,
}

impl Observed {
    fn acknowledged(&self) -> impl Iterator<Item = &Attempt> {
        self.uploads.iter().filter(|a| a.file_id.is_some())
    }

    fn refused(&self) -> usize {
        self.uploads.iter().filter(|a| a.file_id.is_none()).count()
    }
}

/// Records a failed answer, by kind, status and contract code, and answers it.
async fn failure(
    observed: &Mutex<Observed>,
    kind: &str,
    answer: Result<reqwest::Response, reqwest::Error>,
) -> String {
    let what = match answer {
        Ok(response) => {
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let code = body["error"]["code"].as_str().unwrap_or("-").to_owned();
            format!("{kind} {status} {code}")
        }
        Err(error) if error.is_timeout() => format!("{kind} hang"),
        Err(_) => format!("{kind} connection"),
    };
    *observed
        .lock()
        .await
        .failures
        .entry(what.clone())
        .or_default() += 1;
    what
}

/// Uploads, renames and downloads from `clients` tasks until `stop`.
async fn load(app: Arc<Running>, stop: Arc<AtomicBool>, observed: Arc<Mutex<Observed>>) {
    let token = staff_token();
    let mut tasks = tokio::task::JoinSet::new();
    for uploader in 0..3 {
        let (app, stop, observed, token) =
            (app.clone(), stop.clone(), observed.clone(), token.clone());
        tasks.spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let name = format!("upload {uploader}-{n}");
                let size = rand::rng().random_range(1..64 * 1024);
                let bytes: Vec<u8> = (0..size).map(|_| rand::rng().random()).collect();
                let sha256 = hex::encode(Sha256::digest(&bytes));
                let form = Form::new()
                    .text("name", name.clone())
                    .part("file", Part::bytes(bytes).file_name(format!("{name}.bin")));
                let answer = app
                    .http
                    .post(app.url(&format!("/v1/customers/{CUSTOMER}/files")))
                    .bearer_auth(&token)
                    .multipart(form)
                    .send()
                    .await;
                let (file_id, failure) = match answer {
                    Ok(response) if response.status().is_success() => {
                        let body: Value = response.json().await.expect("a File");
                        assert_eq!(
                            body["sha256"],
                            sha256.as_str(),
                            "the recorded SHA-256 is the bytes'"
                        );
                        (Some(body["id"].as_str().expect("an id").to_owned()), None)
                    }
                    other => (None, Some(failure(&observed, "upload", other).await)),
                };
                observed.lock().await.uploads.push(Attempt {
                    name,
                    sha256,
                    file_id,
                    failure,
                });
            }
        });
    }
    // One renamer and one downloader over what is acknowledged so far.
    for role in ["rename", "download"] {
        let (app, stop, observed, token) =
            (app.clone(), stop.clone(), observed.clone(), token.clone());
        tasks.spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let pick = {
                    let seen = observed.lock().await;
                    let acknowledged: Vec<Attempt> = seen.acknowledged().cloned().collect();
                    (!acknowledged.is_empty()).then(|| {
                        acknowledged[rand::rng().random_range(0..acknowledged.len())].clone()
                    })
                };
                let Some(file) = pick else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let id = file.file_id.clone().expect("acknowledged");
                n += 1;
                if role == "rename" {
                    let answer = app
                        .http
                        .patch(app.url(&format!("/v1/files/{id}")))
                        .bearer_auth(&token)
                        .json(&serde_json::json!({ "name": format!("renamed {n}") }))
                        .send()
                        .await;
                    match answer {
                        Ok(response) if response.status().is_success() => {
                            observed.lock().await.renames_ok += 1
                        }
                        other => drop(failure(&observed, "rename", other).await),
                    }
                } else {
                    let answer = app
                        .http
                        .get(app.url(&format!("/v1/files/{id}/content")))
                        .bearer_auth(&token)
                        .send()
                        .await;
                    match answer {
                        Ok(response) if response.status().is_success() => {
                            match response.bytes().await {
                                Ok(bytes) => {
                                    let mut seen = observed.lock().await;
                                    if hex::encode(Sha256::digest(&bytes)) == file.sha256 {
                                        seen.downloads_ok += 1;
                                    } else {
                                        seen.corrupt_downloads.push(id);
                                    }
                                }
                                // The stream broke half way: the client sees an error, not wrong bytes.
                                Err(_) => {
                                    *observed
                                        .lock()
                                        .await
                                        .failures
                                        .entry("download body broken".into())
                                        .or_default() += 1
                                }
                            }
                        }
                        other => drop(failure(&observed, "download", other).await),
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Acknowledged uploads so far.
async fn acknowledged(observed: &Mutex<Observed>) -> usize {
    observed.lock().await.acknowledged().count()
}

/// Waits until at least `n` uploads were acknowledged.
async fn until_acknowledged(observed: &Mutex<Observed>, n: usize, within: Duration) {
    Wait::new(format!("{n} acknowledged uploads"))
        .timeout(within)
        .expect(async || {
            let seen = acknowledged(observed).await;
            if seen >= n { Ok(()) } else { Err(seen) }
        })
        .await;
}

/// Runs the load through `fault`: some uploads first, the fault (its outage and
/// its recovery), then more uploads to prove the service recovered by itself.
/// Answers what the load saw and whether `/readyz` went unready during it.
async fn through<F, R>(app: &Arc<Running>, fault: F, recover: R, expect_unready: bool) -> Observed
where
    F: std::future::Future<Output = ()>,
    R: std::future::Future<Output = ()>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let observed = Arc::new(Mutex::new(Observed::default()));
    let load = tokio::spawn(load(app.clone(), stop.clone(), observed.clone()));

    until_acknowledged(&observed, 20, Duration::from_secs(60)).await;
    fault.await;
    if expect_unready {
        app.wait_ready(false).await;
    }
    tokio::time::sleep(OUTAGE).await;
    recover.await;
    app.wait_ready(true).await;
    let before = acknowledged(&observed).await;
    until_acknowledged(&observed, before + 20, Duration::from_secs(90)).await;

    stop.store(true, Ordering::SeqCst);
    load.await.expect("the load ends");
    Arc::try_unwrap(observed)
        .expect("the load is done")
        .into_inner()
}

/// Every check of the end state; prints the counts.
async fn check_end_state(app: &Running, fault: &str, observed: &Observed) {
    let token = staff_token();
    // Errors during the fault: only 503 unavailable, or a broken connection of a
    // request cut by the fault itself. Never a hang, never a 500.
    for (what, count) in &observed.failures {
        assert!(
            what.ends_with("503 unavailable")
                || what.ends_with("connection")
                || what == "download body broken",
            "{fault}: {count} × {what}: errors during a fault are 503 unavailable, never a hang or a 500"
        );
    }
    assert!(
        observed.corrupt_downloads.is_empty(),
        "{fault}: downloads with wrong bytes: {:?}",
        observed.corrupt_downloads
    );

    // Every acknowledged upload is listed and downloads with its SHA-256.
    let mut listed: HashMap<String, Value> = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = app.url(&format!("/v1/customers/{CUSTOMER}/files?limit=500"));
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = app
            .http
            .get(url)
            .bearer_auth(&token)
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("a page");
        for item in page["items"].as_array().expect("items") {
            listed.insert(item["id"].as_str().expect("id").to_owned(), item.clone());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut lost = Vec::new();
    for attempt in observed.acknowledged() {
        let id = attempt.file_id.as_deref().expect("acknowledged");
        let Some(file) = listed.get(id) else {
            lost.push(format!("{id} ({}) not listed", attempt.name));
            continue;
        };
        assert_eq!(file["sha256"], attempt.sha256.as_str());
        let response = app
            .http
            .get(app.url(&format!("/v1/files/{id}/content")))
            .bearer_auth(&token)
            .send()
            .await
            .expect("a download");
        if !response.status().is_success() {
            lost.push(format!("{id} answers {}", response.status()));
            continue;
        }
        let bytes = response.bytes().await.expect("the bytes");
        if hex::encode(Sha256::digest(&bytes)) != attempt.sha256 {
            lost.push(format!("{id} has other bytes"));
        }
    }

    // Failed uploads left no event: the log holds exactly the acknowledged ones,
    // and no command twice.
    let client = app.pool.get().await.expect("a connection");
    let uploaded: Vec<String> = client
        .query(
            "SELECT aggregate_id FROM events WHERE tenant = $1 AND event_type = 'FileUploaded'",
            &[&TENANT],
        )
        .await
        .expect("the uploads in the log")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let unique: HashSet<&String> = uploaded.iter().collect();
    assert_eq!(
        unique.len(),
        uploaded.len(),
        "{fault}: a file was uploaded twice in the log"
    );
    let acknowledged: HashSet<String> = observed
        .acknowledged()
        .filter_map(|a| a.file_id.clone())
        .collect();
    let recorded_unanswered: Vec<&String> = uploaded
        .iter()
        .filter(|id| !acknowledged.contains(*id))
        .collect();
    if !recorded_unanswered.is_empty() {
        let told: Vec<(&str, Option<&str>)> = observed
            .uploads
            .iter()
            .filter(|a| a.file_id.is_none())
            .map(|a| (a.name.as_str(), a.failure.as_deref()))
            .collect();
        panic!(
            "{fault}: uploads recorded although their client was told they failed: \
             {recorded_unanswered:?}; the failed uploads were told: {told:?}"
        );
    }
    let commands: i64 = client
        .query_one(
            "SELECT count(*) - count(DISTINCT metadata->>'command_id') FROM events WHERE tenant = $1 AND metadata ? 'command_id'",
            &[&TENANT],
        )
        .await
        .expect("command ids")
        .get(0);
    assert_eq!(commands, 0, "{fault}: no command was recorded twice");

    // Failed uploads left no blob once the sweep (which checks the log) ran.
    dossier_workers::sweep_orphans(&app.pool, app.check_blobs.as_ref(), Duration::ZERO)
        .await
        .expect("the orphan sweep runs");
    let blobs = app
        .check_blobs
        .list_all("")
        .await
        .expect("the bucket lists");
    let blob_keys: HashSet<String> = blobs.into_iter().map(|b| b.key).collect();
    for id in &acknowledged {
        assert!(
            blob_keys.iter().any(|key| key.ends_with(id.as_str())),
            "{fault}: the blob of acknowledged file {id} is gone"
        );
    }
    let stray: Vec<&String> = blob_keys
        .iter()
        .filter(|key| !acknowledged.iter().any(|id| key.ends_with(id.as_str())))
        .collect();
    assert!(
        stray.is_empty(),
        "{fault}: blobs of failed uploads are left: {stray:?}"
    );

    // The log verifies once the sealer has caught up with it.
    let newest: i64 = client
        .query_one("SELECT coalesce(max(position), 0) FROM events", &[])
        .await
        .expect("the newest position")
        .get(0);
    Wait::new(format!("{fault}: the sealer to catch up with the log"))
        .interval(Duration::from_millis(100))
        .expect(async || {
            let sealed = chain::sealed_position(&app.pool)
                .await
                .expect("the sealed position");
            if sealed >= newest {
                Ok(())
            } else {
                Err(sealed)
            }
        })
        .await;
    let report = chain::verify(
        &app.pool,
        TENANT,
        dossier_runtime::config::DEV_CHECKPOINT_KEY.as_bytes(),
        &[],
    )
    .await
    .expect("verify runs");
    assert!(
        report.is_ok(),
        "{fault}: the log does not verify: {report:?}"
    );

    println!(
        "fault {fault}: acknowledged {}, refused {}, lost {}; renames {}, downloads {}; errors {:?}",
        acknowledged.len(),
        observed.refused(),
        lost.len(),
        observed.renames_ok,
        observed.downloads_ok,
        observed.failures
    );
    assert!(
        lost.is_empty(),
        "{fault}: acknowledged uploads lost: {lost:?}"
    );
}

/// The shared S3 server's address, for a proxy in front of it.
fn s3_address() -> SocketAddr {
    s3_server()
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .expect("the S3 endpoint is host:port")
}

async fn s3_bucket(endpoint: &str, bucket: &str) -> Arc<dyn BlobStore> {
    let s3 = s3_server();
    blob::open(&BlobStoreSpec::S3(S3Options {
        bucket: bucket.to_owned(),
        prefix: None,
        endpoint: Some(endpoint.to_owned()),
        region: "us-east-1".to_owned(),
        access_key: Some(s3.access_key.clone()),
        secret_key: Some(s3.secret_key.clone()),
        create_bucket_if_missing: true,
    }))
    .await
    .expect("the bucket opens")
}

/// A bucket straight to the S3 server for both the app and the checks.
async fn direct_bucket() -> (Arc<dyn BlobStore>, Arc<dyn BlobStore>) {
    let bucket = format!("f-{}", Uuid::new_v4().simple());
    let store = s3_bucket(&s3_server().endpoint, &bucket).await;
    (store.clone(), store)
}

/// One fault test: the service on `backends`, the load through `fault` and
/// `recover`, every check of the end state (with `through_broker`, also that
/// every event reached the audit trail through RabbitMQ), then a graceful stop.
async fn fault_test<F, R>(
    name: &str,
    backends: Backends,
    fault: F,
    recover: R,
    expect_unready: bool,
    through_broker: bool,
) where
    F: std::future::Future<Output = ()>,
    R: std::future::Future<Output = ()>,
{
    let app = Arc::new(Running::start(backends).await);
    let observed = through(&app, fault, recover, expect_unready).await;
    check_end_state(&app, name, &observed).await;
    if through_broker {
        check_every_event_went_through_the_broker(&app, name).await;
    }
    Arc::try_unwrap(app)
        .ok()
        .expect("the load is done")
        .stop()
        .await;
}

/// A fresh database on the shared Postgres.
async fn shared_database() -> String {
    let (pool, database_url) = dossier_test_support::db::fresh_database()
        .await
        .expect("a database");
    drop(pool);
    database_url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_acknowledged_is_lost_when_postgres_restarts() {
    let postgres = PrivatePostgres::start().expect("a private Postgres starts");
    let vhost = TestVhost::create().await.expect("a vhost");
    let (app_blobs, check_blobs) = direct_bucket().await;
    let backends = Backends {
        database_url: postgres.url("dossier_faults"),
        amqp_url: vhost.url().to_owned(),
        app_blobs,
        check_blobs,
    };
    let stop = async { postgres.stop().expect("Postgres stops") };
    let start = async { postgres.start_again().expect("Postgres starts again") };
    fault_test("postgres restart", backends, stop, start, true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_acknowledged_is_lost_when_s3_is_down() {
    let vhost = TestVhost::create().await.expect("a vhost");
    let proxy = FaultyProxy::start(s3_address()).await.expect("a proxy");
    let bucket = format!("f-{}", Uuid::new_v4().simple());
    let backends = Backends {
        database_url: shared_database().await,
        amqp_url: vhost.url().to_owned(),
        app_blobs: s3_bucket(&format!("http://{}", proxy.address()), &bucket).await,
        check_blobs: s3_bucket(&s3_server().endpoint, &bucket).await,
    };
    let restore = async { proxy.restore() };
    fault_test("s3 outage", backends, proxy.cut(), restore, true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_acknowledged_is_lost_when_rabbitmq_connections_are_closed() {
    let vhost = TestVhost::create().await.expect("a vhost");
    let (app_blobs, check_blobs) = direct_bucket().await;
    let backends = Backends {
        database_url: shared_database().await,
        amqp_url: vhost.url().to_owned(),
        app_blobs,
        check_blobs,
    };
    // A connection shows up in the management API after its statistics round:
    // close until at least one was closed.
    let close = async {
        Wait::new("a connection of the vhost to close")
            .timeout(Duration::from_secs(30))
            .interval(Duration::from_millis(200))
            .expect(async || {
                vhost
                    .close_connections()
                    .await
                    .expect("the management API answers")
                    > 0
            })
            .await;
    };
    let name = "rabbitmq connections closed";
    fault_test(name, backends, close, async {}, false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_acknowledged_is_lost_when_rabbitmq_is_unreachable() {
    let vhost = TestVhost::create().await.expect("a vhost");
    let broker: SocketAddr = std::env::var(dossier_test_support::rabbit::AMQP_ADDR_VAR)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| dossier_test_support::rabbit::DEFAULT_AMQP_ADDR.to_owned())
        .parse()
        .expect("the AMQP address is host:port");
    let proxy = FaultyProxy::start(broker).await.expect("a proxy");
    let (app_blobs, check_blobs) = direct_bucket().await;
    let backends = Backends {
        database_url: shared_database().await,
        amqp_url: format!(
            "amqp://{}:{}@{}/{}",
            dossier_test_support::rabbit::USER,
            dossier_test_support::rabbit::PASSWORD,
            proxy.address(),
            dossier_test_support::rabbit::percent_encode(vhost.name())
        ),
        app_blobs,
        check_blobs,
    };
    let restore = async { proxy.restore() };
    let name = "rabbitmq unreachable";
    fault_test(name, backends, proxy.cut(), restore, true, true).await;
}

/// The audit worker consumes every event from RabbitMQ: once its trail has an
/// entry for every event in the log, nothing was lost between the relay and
/// the consumers.
async fn check_every_event_went_through_the_broker(app: &Running, fault: &str) {
    let client = app.pool.get().await.expect("a connection");
    let events = Wait::new(format!("{fault}: every event in the audit trail"))
        .timeout(Duration::from_secs(90))
        .interval(Duration::from_millis(200))
        .expect(async || {
            let row = client
                .query_one(
                    "SELECT (SELECT count(*) FROM events WHERE tenant = $1), (SELECT count(*) FROM audit_trail WHERE tenant = $1)",
                    &[&TENANT],
                )
                .await
                .expect("counts");
            let (events, audited): (i64, i64) = (row.get(0), row.get(1));
            if events == audited {
                Ok(events)
            } else {
                Err(format!("{audited} of {events} events audited"))
            }
        })
        .await;
    println!("fault {fault}: {events} events, every one through the broker to the audit trail");
}
