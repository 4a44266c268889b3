//! A real S3 server over HTTP, for tests, benchmarks and development.
//!
//! It is [s3s-fs](https://docs.rs/s3s-fs) (S3 on a local directory) behind a
//! hyper server with signature checking switched on, so the code under test
//! talks real S3 through `aws-sdk-s3`: SigV4, path-style addressing, multipart
//! uploads and error responses included. Buckets are directories under the
//! root; create them with [`S3Dev::create_bucket_dir`] or a `CreateBucket`
//! call.
//!
//! Tests call [`spawn`] on `127.0.0.1:0` and read the chosen port from
//! [`S3Dev::endpoint`]; the `dossier-s3-dev` binary runs the same server for
//! manual use and the benchmark.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dossier_blobstore::{
    self as blob, BlobError, BlobStore, BlobStoreSpec, S3BlobStore, S3Options,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The fixed development access key the server accepts.
pub const DEV_ACCESS_KEY: &str = "dossier-dev";
/// The fixed development secret key the server accepts.
pub const DEV_SECRET_KEY: &str = "dossier-dev-secret";
/// The region to sign with; s3s accepts any, this one matches Dossier's default.
pub const DEV_REGION: &str = "us-east-1";

/// How long [`S3Dev::shutdown`] waits for open connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A running server. Dropping it stops accepting connections (in-flight ones
/// finish in the background); [`S3Dev::shutdown`] also waits for them.
#[derive(Debug)]
pub struct S3Dev {
    /// Base URL for `endpoint_url`, e.g. `http://127.0.0.1:40123`.
    pub endpoint: String,
    /// The address actually bound (the port is chosen when binding port 0).
    pub addr: SocketAddr,
    /// The access key requests must be signed with.
    pub access_key: String,
    /// The secret key requests must be signed with.
    pub secret_key: String,
    /// The directory holding the buckets (canonical path).
    pub root: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Starts a server on `addr` storing buckets under `root` (created if
/// missing), spawned on the current tokio runtime, with the development
/// credentials [`DEV_ACCESS_KEY`] / [`DEV_SECRET_KEY`].
pub async fn spawn(root: PathBuf, addr: SocketAddr) -> anyhow::Result<S3Dev> {
    spawn_with_credentials(root, addr, DEV_ACCESS_KEY, DEV_SECRET_KEY).await
}

/// Like [`spawn`], with credentials of the caller's choosing.
pub async fn spawn_with_credentials(
    root: PathBuf,
    addr: SocketAddr,
    access_key: &str,
    secret_key: &str,
) -> anyhow::Result<S3Dev> {
    std::fs::create_dir_all(&root)
        .with_context(|| format!("creating the S3 root directory {}", root.display()))?;
    // s3s-fs canonicalizes the root; keep the same path so callers can look
    // inside it (tests check for leftover multipart parts there).
    let root = root
        .canonicalize()
        .with_context(|| format!("resolving {}", root.display()))?;
    // s3s_fs::Error is not a std error (it wraps one), so only its message travels.
    let fs = s3s_fs::FileSystem::new(&root)
        .map_err(|err| anyhow::anyhow!("opening {} as an S3 store: {err:?}", root.display()))?;

    let service = {
        let mut builder = S3ServiceBuilder::new(fs);
        // Signature checking on: a client that signs wrongly must fail here
        // as it would against AWS, not pass silently.
        builder.set_auth(SimpleAuth::from_single(access_key, secret_key));
        builder.build()
    };

    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let addr = listener.local_addr().context("reading the bound address")?;

    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    let task = tokio::spawn(serve(listener, service, shutdown_rx));

    Ok(S3Dev {
        endpoint: format!("http://{addr}"),
        addr,
        access_key: access_key.to_owned(),
        secret_key: secret_key.to_owned(),
        root,
        shutdown: Some(shutdown_tx),
        task: Some(task),
    })
}

/// Starts a server on a free port of 127.0.0.1 storing under a new directory
/// `dossier-<purpose>-<uuid>` of the system's temporary directory;
/// [`S3Dev::remove`] stops it and removes the directory again.
pub async fn spawn_temporary(purpose: &str) -> anyhow::Result<S3Dev> {
    let root = std::env::temp_dir().join(format!(
        "dossier-{purpose}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    spawn(root, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

/// The blob store options for `bucket` on the server at `endpoint` (region
/// [`DEV_REGION`], path-style, created if missing), with explicit credentials.
pub fn bucket_options(
    endpoint: &str,
    access_key: &str,
    secret_key: &str,
    bucket: &str,
) -> S3Options {
    S3Options {
        bucket: bucket.to_owned(),
        prefix: None,
        endpoint: Some(endpoint.to_owned()),
        region: DEV_REGION.to_owned(),
        access_key: Some(access_key.to_owned()),
        secret_key: Some(secret_key.to_owned()),
        create_bucket_if_missing: true,
    }
}

impl S3Dev {
    /// The blob store options for `bucket` on this server.
    pub fn options(&self, bucket: &str) -> S3Options {
        bucket_options(&self.endpoint, &self.access_key, &self.secret_key, bucket)
    }

    /// The blob store on `bucket` of this server (the bucket is created).
    pub async fn store(&self, bucket: &str) -> Result<Arc<dyn BlobStore>, BlobError> {
        blob::open(&BlobStoreSpec::S3(self.options(bucket))).await
    }

    /// The same as the S3 adapter itself, for its raw `aws-sdk-s3` client.
    pub async fn direct(&self, bucket: &str) -> Result<S3BlobStore, BlobError> {
        S3BlobStore::open(self.options(bucket)).await
    }

    /// [`Self::shutdown`], then removes the server's directory with every bucket.
    pub async fn remove(self) -> std::io::Result<()> {
        let root = self.root.clone();
        self.shutdown().await;
        std::fs::remove_dir_all(root)
    }

    /// Creates a bucket by creating its directory (s3s-fs keeps one
    /// directory per bucket). Idempotent.
    pub fn create_bucket_dir(&self, bucket: &str) -> anyhow::Result<PathBuf> {
        let dir = bucket_dir(&self.root, bucket)?;
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating bucket directory {}", dir.display()))?;
        Ok(dir)
    }

    /// Stops accepting connections and waits (a few seconds at most) for
    /// open ones to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            // The server may already have stopped; nothing to tell it then.
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// The directory of `bucket` under `root`, refusing names that would escape it.
fn bucket_dir(root: &Path, bucket: &str) -> anyhow::Result<PathBuf> {
    if bucket.is_empty() || bucket == "." || bucket == ".." || bucket.contains(['/', '\\']) {
        anyhow::bail!("{bucket:?} is not a bucket name");
    }
    Ok(root.join(bucket))
}

/// The accept loop: one task per connection, HTTP/1 or HTTP/2 as the client
/// asks, until `shutdown` fires or its sender is dropped.
async fn serve(listener: TcpListener, service: S3Service, mut shutdown: oneshot::Receiver<()>) {
    let http = ConnBuilder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();

    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _peer)) => socket,
                Err(err) => {
                    // Usually out of file descriptors: back off instead of
                    // spinning, the condition is mostly transient.
                    eprintln!("dossier-s3-dev: accepting a connection failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let conn = http.serve_connection(TokioIo::new(socket), service.clone());
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            // A client that goes away mid-request is not the server's problem.
            let _ = conn.await;
        });
    }

    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_TIMEOUT) => {
            eprintln!("dossier-s3-dev: connections still open after {DRAIN_TIMEOUT:?}, stopping anyway");
        }
    }
}
