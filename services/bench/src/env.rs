//! What a scenario stands on: a database of its own, an S3 server on a
//! temporary directory, a RabbitMQ vhost (`TestVhost`) and the real
//! application, in process, on a free port. Everything here is removed again
//! by the scenario that made it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dossier_api::auth::jwt::{self, Claims, Role};
use dossier_api::startup::Application;
use dossier_blobstore::{self as blob, BlobStore, BlobStoreSpec, S3BlobStore, S3Options};
use dossier_eventlog::db::{self, Pool};
use dossier_runtime::config::Settings;
use dossier_test_support::s3::S3Dev;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::Ctx;

/// The JWT secret of every server the benchmark starts.
pub const SECRET: &str = "dossier-bench-secret-not-for-production-use";

/// A database of its own, `dossier_bench_<uuid>`, migrated; dropped by
/// [`BenchDb::drop`].
pub struct BenchDb {
    pub url: String,
    pub pool: Pool,
    name: String,
    server_url: String,
}

impl BenchDb {
    /// Creates and migrates a fresh database with a pool of `pool_size`.
    pub async fn create(ctx: &Ctx, pool_size: usize) -> anyhow::Result<Self> {
        let name = format!("dossier_bench_{}", Uuid::new_v4().simple());
        let url = with_database(&ctx.database_url, &name);
        let pool = db::connect(&url, pool_size)
            .await
            .with_context(|| format!("creating the bench database {name}"))?;
        db::migrate(&pool).await.context("migrating")?;
        Ok(Self {
            url,
            pool,
            name,
            server_url: ctx.database_url.clone(),
        })
    }

    /// A second pool on the same database, e.g. one connection per client.
    pub async fn pool(&self, size: usize) -> anyhow::Result<Pool> {
        Ok(db::connect(&self.url, size).await?)
    }

    /// Drops the database, whoever is still connected.
    pub async fn drop(self) {
        self.pool.close();
        let name = self.name.clone();
        if let Err(error) = drop_database(&self.server_url, &name).await {
            eprintln!("bench: could not drop database {name}: {error:#}");
        }
    }
}

async fn drop_database(server_url: &str, name: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(
        &with_database(server_url, "postgres"),
        tokio_postgres::NoTls,
    )
    .await?;
    let driver = tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// Replaces the database name (the path) of a `postgres://` URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// The S3 server (s3s-fs, `dossier-s3-dev`) on a temporary directory, in
/// this process.
pub struct S3 {
    server: S3Dev,
    root: PathBuf,
}

impl S3 {
    pub async fn start() -> anyhow::Result<Self> {
        let root =
            std::env::temp_dir().join(format!("dossier-bench-s3-{}", Uuid::new_v4().simple()));
        let server =
            dossier_test_support::s3::spawn(root.clone(), SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .context("starting the S3 server")?;
        Ok(Self { server, root })
    }

    pub fn endpoint(&self) -> &str {
        &self.server.endpoint
    }

    pub fn access_key(&self) -> &str {
        &self.server.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.server.secret_key
    }

    fn options(&self, bucket: &str) -> S3Options {
        S3Options {
            bucket: bucket.to_owned(),
            prefix: None,
            endpoint: Some(self.server.endpoint.clone()),
            region: "us-east-1".to_owned(),
            access_key: Some(self.server.access_key.clone()),
            secret_key: Some(self.server.secret_key.clone()),
            create_bucket_if_missing: true,
        }
    }

    /// The blob store on `bucket` (created), with explicit credentials.
    pub async fn store(&self, bucket: &str) -> anyhow::Result<Arc<dyn BlobStore>> {
        Ok(blob::open(&BlobStoreSpec::S3(self.options(bucket))).await?)
    }

    /// The same, as the S3 adapter, for its raw `aws-sdk-s3` client (baselines).
    pub async fn direct(&self, bucket: &str) -> anyhow::Result<S3BlobStore> {
        Ok(S3BlobStore::open(self.options(bucket)).await?)
    }

    /// Stops the server and removes its directory.
    pub async fn stop(self) {
        self.server.shutdown().await;
        if let Err(error) = std::fs::remove_dir_all(&self.root) {
            eprintln!("bench: could not remove {}: {error}", self.root.display());
        }
    }
}

/// Settings for a server of the benchmark: its database, a free port, the
/// bench secret, and `overrides`.
pub fn settings(database_url: &str, overrides: &[(&str, &str)]) -> anyhow::Result<Settings> {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("DOSSIER_DATABASE_URL".into(), database_url.to_owned()),
        ("DOSSIER_HTTP_ADDR".into(), "127.0.0.1:0".into()),
        ("DOSSIER_JWT_SECRET".into(), SECRET.into()),
    ]);
    for (k, v) in overrides {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    Ok(Settings::from_lookup(|var| vars.get(var).cloned())?)
}

/// The real application, in process, on a free port.
pub struct App {
    pub base: String,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl App {
    /// Builds and runs the application; answers once `/readyz` is green.
    pub async fn spawn(
        database_url: &str,
        blobs: Arc<dyn BlobStore>,
        overrides: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let settings = settings(database_url, overrides)?;
        let app = Application::build_with_blobs(settings, blobs)
            .await
            .context("building the application")?;
        let address = app
            .http_address()
            .context("the bench server runs the api role")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        let app = Self {
            base: format!("http://{address}"),
            client: http_client(),
            stop: Some(stop),
            task: Some(task),
        };
        wait_ready(&app.client, &app.base, Duration::from_secs(60)).await?;
        Ok(app)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the application gracefully.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => eprintln!("bench: the server ended with an error: {error:#}"),
                Err(error) => eprintln!("bench: the server task failed: {error}"),
            }
        }
    }
}

/// One HTTP client for a scenario (connections are reused).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()
        .unwrap_or_default()
}

/// Waits until `GET {base}/readyz` answers 2xx.
pub async fn wait_ready(
    client: &reqwest::Client,
    base: &str,
    patience: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let ready = client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the server at {base} did not become ready within {patience:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A bearer token of the bench secret.
pub fn token(tenant: &str, role: Role, customer: Option<&str>) -> String {
    let now = chrono::Utc::now().timestamp();
    jwt::issue(
        SECRET.as_bytes(),
        &Claims {
            sub: "bench".to_owned(),
            tenant: tenant.to_owned(),
            role,
            customer: customer.map(str::to_owned),
            exp: now + 6 * 3600,
            iat: Some(now),
        },
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
    fn database_names_are_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/dossier", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }

    #[test]
    fn generated_bytes_have_the_asked_length() {
        assert_eq!(random_bytes(1001, 7).len(), 1001);
        assert_eq!(text_bytes(1001, 7).len(), 1001);
        assert_ne!(random_bytes(64, 1), random_bytes(64, 2));
    }
}
