//! `upload_rss`: the peak resident memory (`VmHWM`) of a `dossier serve`
//! process while 32 uploads of 25 MiB arrive at once.
//!
//! The server is this very binary (`dossier-bench serve`, the start-up of
//! `dossier serve`, built with the same profile as the benchmark), started as a
//! child with the environment production would give it: its database, its
//! vhost, an `s3://` blob store on the benchmark's S3 server, and the S3
//! credentials in `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` for the child
//! only. The goal is 64 MiB plus 8 MiB
//! per upload in flight: one S3 part buffer each (5 MiB), the HTTP side's
//! buffers, and the S3 store's few spare part buffers for pipelining.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use dossier_api::auth::jwt::Role;
use dossier_test_support::process::ServeCommand;
use dossier_test_support::rabbit::TestVhost;

use super::Ctx;
use super::env::{self, BenchDb, Stage};
use super::report::{Figure, Goal};
use super::stats;

const SCENARIO: &str = "upload_rss";
const TENANT: &str = "bench-rss";
const BUCKET: &str = "bench-rss";

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    Stage::run(ctx, 2, "rss", measure).await
}

async fn measure(ctx: &Ctx, stage: &Stage) -> anyhow::Result<Vec<Figure>> {
    let Stage { s3, db, vhost, dir } = stage;
    let uploads = ctx.size(32, 4);
    let size = ctx.size(25 * 1024 * 1024, 2 * 1024 * 1024);
    // The bucket must exist; the server does not create it.
    s3.store(BUCKET).await?;
    let limit = 64.0 + 8.0 * uploads as f64;
    let metric = |store: &str| {
        format!(
            "peak RSS, {uploads} x {} MiB at once, {store}",
            size / (1024 * 1024)
        )
    };

    // S3 credentials reach the child only, the way production passes them.
    // A form without a `size` field is the worst case (a part buffer per
    // upload); with it, each upload streams into one PutObject.
    let options = s3.options(BUCKET);
    let on_s3 = |command: ServeCommand| command.s3_store(&options);
    let mut figures = Vec::new();
    for (declare, how) in [
        (false, "S3, size not declared"),
        (true, "S3, size declared"),
    ] {
        let (idle, peak) = serve_and_upload(db, vhost, dir, on_s3, uploads, size, declare).await?;
        figures.push(
            Figure::new(SCENARIO, metric(how), "MiB")
                .ours(peak.peak_mib)
                .note(format!(
                    "idle after start: RSS {:.0} MiB; goal 64 MiB + 8 MiB x {uploads}",
                    idle.rss_mib
                ))
                .goal(Goal::AtMost(limit)),
        );
    }

    // The same with the directory store (no part buffers): what the S3
    // adapter adds.
    let blob_dir = dir.join("blobs");
    let on_disk = |command: ServeCommand| command.blob_dir(&blob_dir);
    let (idle, peak) = serve_and_upload(db, vhost, dir, on_disk, uploads, size, false).await?;
    figures.push(
        Figure::new(SCENARIO, metric("file://"), "MiB")
            .ours(peak.peak_mib)
            .note(format!("idle after start: RSS {:.0} MiB", idle.rss_mib))
            .goal(Goal::AtMost(limit)),
    );
    Ok(figures)
}

/// Starts `dossier-bench serve` with the blob store `blobs` sets, sends
/// `uploads` uploads of `size` at once, stops it; answers its memory when idle
/// and after the uploads.
async fn serve_and_upload(
    db: &BenchDb,
    vhost: &TestVhost,
    dir: &Path,
    blobs: impl FnOnce(ServeCommand) -> ServeCommand,
    uploads: usize,
    size: usize,
    declare: bool,
) -> anyhow::Result<(Memory, Memory)> {
    let port = env::free_port()?;
    let exe = std::env::current_exe().context("finding the dossier-bench binary")?;
    let log_path = dir.join("server.log");
    let command = ServeCommand::new(exe, ["serve"])
        .current_dir(dir)
        .http_addr(&format!("127.0.0.1:{port}"))
        .database(&db.url)
        .amqp(vhost.url())
        .roles("all")
        .env("RUST_LOG", "warn")
        .log_to(&log_path)?;
    let mut server = blobs(command).spawn()?;
    let pid = server.pid();

    let result = async {
        let base = format!("http://127.0.0.1:{port}");
        let client = env::http_client();
        dossier_test_support::wait_until_ready(&client, &base, Duration::from_secs(60))
            .await
            .with_context(|| format!("see {}", log_path.display()))?;
        let idle = memory(pid)?;

        let token = Arc::new(env::token(TENANT, Role::Staff, None));
        let body = Bytes::from(env::random_bytes(size, 32));
        let base = Arc::new(base);
        stats::batch(uploads, uploads, move |i| {
            let (client, base, token, body) =
                (client.clone(), base.clone(), token.clone(), body.clone());
            async move {
                let url = format!("{base}/v1/customers/cust-{i}/files");
                env::post_upload(&client, &url, &token, body, i, declare).await
            }
        })
        .await?;
        let after = memory(pid)?;
        anyhow::Ok((idle, after))
    }
    .await;
    server.stop(Duration::from_secs(15)).await;
    result
}

/// `VmRSS` and `VmHWM` of a process, in MiB.
struct Memory {
    rss_mib: f64,
    peak_mib: f64,
}

fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading /proc/<pid>/status (Linux only)")?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|line| line.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("a number")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok(Memory {
        rss_mib: field("VmRSS:")?,
        peak_mib: field("VmHWM:")?,
    })
}
