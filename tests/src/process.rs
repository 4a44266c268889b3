//! Dossier as a child process: for tests that must kill it (`kill -9`) in the
//! middle of something, and for the benchmark, which measures the memory of a
//! `dossier serve` of its own build.
//!
//! [`serve_from_env`] is the server such a child runs: the same start-up as
//! `dossier serve` ([`Application::build`] and `run_until_stopped`), configured
//! only from the environment. The `dossier-serve` binary of this crate is nothing
//! else, and `dossier-bench serve` neither. [`ServeCommand`] starts one with the
//! environment production would give it; [`ServeProcess`] stops or kills it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use dossier_api::startup::Application;
use dossier_runtime::config::Settings;

/// Runs Dossier configured from the environment (`DOSSIER_*`, `DOSSIER_ROLES` to
/// pick the roles, the standard AWS variables for S3 credentials) until Ctrl-C or
/// SIGTERM, then stops gracefully.
pub async fn serve_from_env() -> anyhow::Result<()> {
    dossier_runtime::telemetry::init_tracing();
    let settings = Settings::from_env().context("reading the configuration")?;
    let app = Application::build(settings).await?;
    app.run_until_stopped(dossier_runtime::shutdown::signal())
        .await
}

/// How to start a Dossier child process: an executable that runs
/// [`serve_from_env`] (with leading arguments if it needs them), and its
/// environment. Nothing of the parent's `DOSSIER_*` or `AWS_*` variables leaks
/// into the child unless set here.
#[derive(Debug)]
pub struct ServeCommand {
    command: tokio::process::Command,
    log: Option<PathBuf>,
}

impl ServeCommand {
    /// `exe args...`, standard input closed, output discarded until
    /// [`Self::log_to`], killed if its [`ServeProcess`] is dropped.
    pub fn new<S: AsRef<OsStr>>(exe: impl AsRef<OsStr>, args: impl IntoIterator<Item = S>) -> Self {
        let mut command = tokio::process::Command::new(exe);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for (name, _) in std::env::vars_os() {
            let name_text = name.to_string_lossy();
            if name_text.starts_with("DOSSIER_") || name_text.starts_with("AWS_") {
                command.env_remove(&name);
            }
        }
        command
            .env("DOSSIER_HTTP_ADDR", "127.0.0.1:0")
            .env("DOSSIER_JWT_SECRET", crate::SECRET);
        Self { command, log: None }
    }

    /// Sets one environment variable of the child.
    pub fn env(mut self, name: &str, value: impl AsRef<OsStr>) -> Self {
        self.command.env(name, value);
        self
    }

    /// `DOSSIER_ROLES`: which roles the child runs (`all`, `workers`, ...).
    pub fn roles(self, roles: &str) -> Self {
        self.env("DOSSIER_ROLES", roles)
    }

    /// `DOSSIER_DATABASE_URL`.
    pub fn database(self, url: &str) -> Self {
        self.env("DOSSIER_DATABASE_URL", url)
    }

    /// `DOSSIER_AMQP_URL`.
    pub fn amqp(self, url: &str) -> Self {
        self.env("DOSSIER_AMQP_URL", url)
    }

    /// `DOSSIER_HTTP_ADDR` (default `127.0.0.1:0`).
    pub fn http_addr(self, addr: &str) -> Self {
        self.env("DOSSIER_HTTP_ADDR", addr)
    }

    /// `bucket` on the S3 server at `endpoint` as the blob store, with the
    /// credentials in `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, the way
    /// production passes them.
    pub fn s3_bucket(
        self,
        endpoint: &str,
        access_key: &str,
        secret_key: &str,
        bucket: &str,
    ) -> Self {
        self.s3_store(&crate::s3::bucket_options(
            endpoint, access_key, secret_key, bucket,
        ))
    }

    /// The S3 blob store `options` describe (bucket, prefix, endpoint, region
    /// and credentials), passed the way production passes them.
    pub fn s3_store(self, options: &dossier_blobstore::S3Options) -> Self {
        let prefix = options
            .prefix
            .as_deref()
            .map(|p| format!("/{p}/"))
            .unwrap_or_default();
        let mut command = self
            .env(
                "DOSSIER_BLOB_STORE",
                format!("s3://{}{prefix}", options.bucket),
            )
            .env("DOSSIER_S3_REGION", &options.region)
            .env("AWS_EC2_METADATA_DISABLED", "true");
        if let Some(endpoint) = &options.endpoint {
            command = command.env("DOSSIER_S3_ENDPOINT", endpoint);
        }
        if let (Some(access_key), Some(secret_key)) = (&options.access_key, &options.secret_key) {
            command = command
                .env("AWS_ACCESS_KEY_ID", access_key)
                .env("AWS_SECRET_ACCESS_KEY", secret_key);
        }
        command
    }

    /// A directory as the blob store.
    pub fn blob_dir(self, dir: &Path) -> Self {
        self.env("DOSSIER_BLOB_STORE", format!("file://{}", dir.display()))
    }

    /// The working directory of the child.
    pub fn current_dir(mut self, dir: &Path) -> Self {
        self.command.current_dir(dir);
        self
    }

    /// Standard output and error into the file `path` (created).
    pub fn log_to(mut self, path: &Path) -> std::io::Result<Self> {
        let log = std::fs::File::create(path)?;
        self.command
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        self.log = Some(path.to_owned());
        Ok(self)
    }

    /// Starts the child.
    pub fn spawn(mut self) -> anyhow::Result<ServeProcess> {
        let child = self
            .command
            .spawn()
            .with_context(|| format!("starting {:?}", self.command.as_std().get_program()))?;
        let pid = child.id().context("the child's pid")?;
        Ok(ServeProcess {
            child,
            pid,
            log: self.log,
        })
    }
}

/// A running Dossier child process; killed when dropped.
#[derive(Debug)]
pub struct ServeProcess {
    child: tokio::process::Child,
    pid: u32,
    log: Option<PathBuf>,
}

impl ServeProcess {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where its output goes, if it was logged.
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// SIGKILL: no shutdown, no nack, no cleanup; waits until it is gone.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM (a graceful stop), then SIGKILL if it has not ended after `patience`.
    pub async fn stop(&mut self, patience: Duration) {
        let terminated = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .is_ok_and(|status| status.success());
        let stopped = terminated
            && tokio::time::timeout(patience, self.child.wait())
                .await
                .is_ok();
        if !stopped {
            self.kill().await;
        }
    }
}
