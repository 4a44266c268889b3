//! What a scenario stands on: a database of its own, an S3 server (on a
//! temporary directory, or the external one of `--s3-endpoint`), a RabbitMQ vhost (`TestVhost`) and the real
//! application, in process, on a free port. Everything here is removed again
//! by the scenario that made it. The pieces are the test harness'
//! (dossier-test-support), so the benchmark runs on what the tests run on; what
//! is here is only what a benchmark wants on top (names, sizes, clean-up).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dossier_api::auth::jwt::Role;
use dossier_blobstore::{BlobStore, BlobStoreSpec, S3BlobStore, S3Options};
use dossier_test_support::rabbit::TestVhost;
use dossier_test_support::s3::S3Dev;
use dossier_test_support::{AppServer, db::Database};
use uuid::Uuid;

use super::Ctx;
use super::report::Figure;

/// A database of a scenario's own, `dossier_bench_<uuid>`, migrated; removed
/// again by [`remove_database`].
pub type BenchDb = Database;

/// Creates and migrates a fresh `dossier_bench_<uuid>` on the bench's Postgres
/// server, with a pool of `pool_size`.
pub async fn database(ctx: &Ctx, pool_size: usize) -> anyhow::Result<BenchDb> {
    let name = format!("dossier_bench_{}", Uuid::new_v4().simple());
    Database::create(&ctx.database_url, &name, pool_size)
        .await
        .with_context(|| format!("creating the bench database {name}"))
}

/// Drops a scenario's database, whoever is still connected.
pub async fn remove_database(db: BenchDb) {
    let name = db.name().to_owned();
    if let Err(error) = db.remove().await {
        eprintln!("bench: could not drop database {name}: {error:#}");
    }
}

/// An S3 server the benchmark does not run: `--s3-endpoint` and friends
/// (Garage, MinIO, AWS). Every scenario writes under a prefix of its own in
/// `bucket` and deletes it again.
#[derive(Clone)]
pub struct ExternalS3 {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

impl ExternalS3 {
    /// The blob store options for its bucket, under `prefix`.
    fn options(&self, prefix: Option<String>) -> S3Options {
        S3Options {
            bucket: self.bucket.clone(),
            prefix,
            endpoint: Some(self.endpoint.clone()),
            region: self.region.clone(),
            access_key: Some(self.access_key.clone()),
            secret_key: Some(self.secret_key.clone()),
            create_bucket_if_missing: false,
        }
    }
}

impl std::fmt::Debug for ExternalS3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalS3")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

/// The S3 server a scenario stores on: the in-process s3s-fs on a temporary
/// directory (the default), or an external one. Scenarios name their buckets
/// as if they had the server to themselves; on an external server each such
/// name is a prefix `dossier-bench-<uuid>/<name>/` in the one bucket given.
#[derive(Debug)]
pub enum S3Server {
    InProcess(S3Dev),
    External { s3: ExternalS3, run: String },
}

impl S3Server {
    /// Starts s3s-fs, or takes the external server of `ctx`.
    pub async fn start(ctx: &Ctx) -> anyhow::Result<Self> {
        match &ctx.s3 {
            None => Ok(Self::InProcess(
                dossier_test_support::s3::spawn_temporary("bench-s3")
                    .await
                    .context("starting the S3 server")?,
            )),
            Some(s3) => Ok(Self::External {
                s3: s3.clone(),
                run: format!("dossier-bench-{}", Uuid::new_v4().simple()),
            }),
        }
    }

    /// The blob store options for the scenario's bucket `bucket`.
    pub fn options(&self, bucket: &str) -> S3Options {
        match self {
            Self::InProcess(dev) => dev.options(bucket),
            Self::External { s3, run } => s3.options(Some(format!("{run}/{bucket}"))),
        }
    }

    /// The blob store on the scenario's bucket `bucket`.
    pub async fn store(&self, bucket: &str) -> anyhow::Result<Arc<dyn BlobStore>> {
        Ok(dossier_blobstore::open(&BlobStoreSpec::S3(self.options(bucket))).await?)
    }

    /// The S3 adapter itself on `bucket`, for its raw `aws-sdk-s3` client
    /// ([`S3BlobStore::object_key`] gives the full key of a blob key).
    pub async fn direct(&self, bucket: &str) -> anyhow::Result<S3BlobStore> {
        Ok(S3BlobStore::open(self.options(bucket)).await?)
    }

    /// Stops s3s-fs and removes its directory, or deletes every object the
    /// run wrote on the external server.
    pub async fn remove(self) {
        match self {
            Self::InProcess(dev) => {
                let root = dev.root.clone();
                if let Err(error) = dev.remove().await {
                    eprintln!("bench: could not remove {}: {error}", root.display());
                }
            }
            Self::External { s3, run } => {
                if let Err(error) = delete_prefix(&s3, &run).await {
                    eprintln!(
                        "bench: could not delete s3://{}/{run}/: {error:#}",
                        s3.bucket
                    );
                }
            }
        }
    }
}

/// Deletes every object under `run/` of the external bucket.
async fn delete_prefix(s3: &ExternalS3, run: &str) -> anyhow::Result<()> {
    let store = S3BlobStore::open(s3.options(None)).await?;
    let mut pages = store
        .client()
        .list_objects_v2()
        .bucket(&s3.bucket)
        .prefix(format!("{run}/"))
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for object in page?.contents() {
            if let Some(key) = object.key() {
                store
                    .client()
                    .delete_object()
                    .bucket(&s3.bucket)
                    .key(key)
                    .send()
                    .await?;
            }
        }
    }
    Ok(())
}

/// Everything a scenario that runs the whole service stands on: a database of
/// its own, an S3 server, a RabbitMQ vhost and a scratch directory.
/// [`Stage::remove`] takes all of it down again.
pub struct Stage {
    pub s3: S3Server,
    pub db: BenchDb,
    pub vhost: TestVhost,
    pub dir: PathBuf,
}

impl Stage {
    /// Sets the stage up; what was made before a failing step is removed.
    pub async fn new(ctx: &Ctx, pool_size: usize, what: &str) -> anyhow::Result<Self> {
        let dir = temp_dir(what)?;
        let s3 = match S3Server::start(ctx).await {
            Ok(s3) => s3,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error);
            }
        };
        let db = match database(ctx, pool_size).await {
            Ok(db) => db,
            Err(error) => {
                s3.remove().await;
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error);
            }
        };
        match TestVhost::create().await {
            Ok(vhost) => Ok(Self { s3, db, vhost, dir }),
            Err(error) => {
                remove_database(db).await;
                s3.remove().await;
                let _ = std::fs::remove_dir_all(&dir);
                Err(anyhow::Error::new(error).context("creating a RabbitMQ vhost"))
            }
        }
    }

    /// Runs `measure` on a stage of its own, and removes the stage whatever
    /// `measure` answered.
    pub async fn run<M>(
        ctx: &Ctx,
        pool_size: usize,
        what: &str,
        measure: M,
    ) -> anyhow::Result<Vec<Figure>>
    where
        M: AsyncFn(&Ctx, &Stage) -> anyhow::Result<Vec<Figure>>,
    {
        let stage = Self::new(ctx, pool_size, what).await?;
        let result = measure(ctx, &stage).await;
        stage.remove().await;
        result
    }

    /// Removes the database, the vhost, the S3 server and the directory.
    pub async fn remove(self) {
        remove_database(self.db).await;
        if let Err(error) = self.vhost.cleanup().await {
            eprintln!("bench: could not remove a RabbitMQ vhost: {error}");
        }
        self.s3.remove().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The real application, in process, on a free port, with a client for it.
pub struct App {
    pub client: reqwest::Client,
    server: AppServer,
}

impl App {
    /// Builds and runs the application on `database_url` and `blobs` with the
    /// harness' settings and `overrides`; answers once `/readyz` is green.
    pub async fn spawn(
        database_url: &str,
        blobs: Arc<dyn BlobStore>,
        overrides: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let settings = dossier_test_support::try_settings(database_url, overrides)?;
        let server = AppServer::start(settings, blobs)
            .await
            .context("building the application")?;
        let client = http_client();
        server
            .wait_until_ready(&client, Duration::from_secs(60))
            .await?;
        Ok(Self { client, server })
    }

    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    /// Stops the application gracefully.
    pub async fn stop(mut self) {
        if let Err(error) = self.server.stop().await {
            eprintln!("bench: the server ended with an error: {error:#}");
        }
    }
}

/// One upload of `body` to `url` (a customer's files) as the pages send it:
/// the name, the size if `declare`, then the file; fails unless it is 201.
pub async fn post_upload(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: bytes::Bytes,
    i: usize,
    declare: bool,
) -> anyhow::Result<()> {
    let length = body.len() as u64;
    let part = reqwest::multipart::Part::stream_with_length(reqwest::Body::from(body), length)
        .file_name(format!("upload-{i}.bin"))
        .mime_str("application/octet-stream")?;
    let mut form = reqwest::multipart::Form::new().text("name", format!("Bench upload {i}"));
    if declare {
        form = form.text("size", length.to_string());
    }
    let response = client
        .post(url)
        .bearer_auth(token)
        .multipart(form.part("file", part))
        .send()
        .await?;
    let status = response.status();
    anyhow::ensure!(
        status == reqwest::StatusCode::CREATED,
        "upload answered {status}: {}",
        response.text().await.unwrap_or_default()
    );
    Ok(())
}

/// One HTTP client for a scenario (connections are reused).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()
        .unwrap_or_default()
}

/// A bearer token for the servers the benchmark starts, for its whole run.
pub fn token(tenant: &str, role: Role, customer: Option<&str>) -> String {
    dossier_test_support::token(
        tenant,
        role,
        "bench",
        customer,
        Duration::from_secs(6 * 3600),
    )
}

/// `n` bytes that do not compress (a cheap xorshift stream).
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Bodies for measured uploads: `base` again and again, each copy made unlike
/// every other (of this run and of earlier ones) by a stamp of its own every
/// 64 KiB.
///
/// A content-addressed S3 server keeps one copy of each block it has seen:
/// Garage hashes a body sent a second time but writes none of it (nor
/// compresses it), which no real upload gets, and none of ours (each sealed
/// blob is new ciphertext). Measured on Garage 2.5.0 with one 25 MiB body sent
/// again and again, its PutObjects took 119 ms of Garage's CPU each, the same
/// size arriving through Dossier 181-198 ms, nearly all of the difference in
/// writing the blocks: a baseline of repeated bytes measured the dedup, not
/// the store.
pub struct Distinct {
    base: bytes::Bytes,
    run: u64,
    next: std::sync::atomic::AtomicU64,
}

impl Distinct {
    /// Stride of the stamps: smaller than any block size an S3 server
    /// deduplicates by.
    const STRIDE: usize = 64 * 1024;

    pub fn new(base: Vec<u8>) -> Self {
        Self {
            base: base.into(),
            run: rand::random(),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.base.len()
    }

    /// One body no other has matched.
    pub fn one(&self) -> bytes::Bytes {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut stamp = [0u8; 16];
        stamp[..8].copy_from_slice(&self.run.to_le_bytes());
        stamp[8..].copy_from_slice(&n.to_le_bytes());
        let mut body = self.base.to_vec();
        for at in (0..body.len()).step_by(Self::STRIDE) {
            let end = (at + stamp.len()).min(body.len());
            body[at..end].copy_from_slice(&stamp[..end - at]);
        }
        body.into()
    }

    /// [`super::stats::batch`] of `op` on `count` new bodies, `parallel` at once:
    /// operation `i` gets body `i`. The bodies are made before it is timed.
    pub async fn batch<F, Fut>(
        &self,
        count: usize,
        parallel: usize,
        op: F,
    ) -> anyhow::Result<Duration>
    where
        F: Fn(usize, bytes::Bytes) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let bodies: Arc<[bytes::Bytes]> = (0..count).map(|_| self.one()).collect();
        super::stats::batch(count, parallel, move |i| op(i, bodies[i].clone())).await
    }
}

/// `n` bytes of text that compresses like a document does (about 3:1).
pub fn text_bytes(n: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "invoice",
        "contract",
        "customer",
        "amount",
        "due",
        "net",
        "total",
        "tax",
        "service",
        "period",
        "November",
        "payment",
        "reference",
        "account",
        "dossier",
        "signed",
    ];
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(n + 16);
    while out.len() < n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(WORDS[(state % 16) as usize].as_bytes());
        out.push(if state.is_multiple_of(11) {
            b'\n'
        } else {
            b' '
        });
        if state.is_multiple_of(5) {
            out.extend_from_slice(format!("{} ", state % 100_000).as_bytes());
        }
    }
    out.truncate(n);
    out
}

/// A free TCP port on 127.0.0.1 (bound, then let go: good enough for a child
/// process that binds it a moment later).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A temporary directory of the benchmark's own.
pub fn temp_dir(what: &str) -> anyhow::Result<PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("dossier-bench-{what}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_bytes_have_the_asked_length() {
        assert_eq!(random_bytes(1001, 7).len(), 1001);
        assert_eq!(text_bytes(1001, 7).len(), 1001);
        assert_ne!(random_bytes(64, 1), random_bytes(64, 2));
    }
}
