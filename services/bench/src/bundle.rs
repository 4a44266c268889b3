//! `zip_bundle`: a bundle of 100 files of 1 MiB (half text that compresses,
//! half bytes that do not), from `POST /v1/bundles` until its archive is
//! downloaded, against two baselines on the same bytes:
//!
//! - S3: `GetObject` of every blob, read to the end, then one `PutObject` of
//!   an archive of the same size (the least a worker that builds the archive
//!   in S3 must move), with aws-sdk-s3 on the same server, `UNSIGNED-PAYLOAD`
//!   as our adapter sends it, of bytes that neither compress nor repeat
//!   stored ones (a sealed archive does neither);
//! - the `zip` tool (deflate, default level) on the same files on local disk.
//!
//! Until the bundles feature is in the build, `POST /v1/bundles` answers 404
//! and only the baselines are reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use dossier_api::auth::jwt::Role;
use dossier_test_support::wait::Wait;
use serde_json::{Value, json};

use super::Ctx;

use super::env::{self, App, BenchDb, S3Server, Stage};
use super::report::{Figure, Goal};
use super::stats::{self, mb_per_s};

const SCENARIO: &str = "zip_bundle";
const TENANT: &str = "bench-zip";
const BUCKET: &str = "bench-zip";

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    Stage::run(ctx, 4, "zip", measure).await
}

/// The content of file `i`: even ones text, odd ones random bytes.
fn content(i: usize, size: usize) -> Bytes {
    Bytes::from(if i.is_multiple_of(2) {
        env::text_bytes(size, i as u64 + 1)
    } else {
        env::random_bytes(size, i as u64 + 1)
    })
}

async fn measure(ctx: &Ctx, stage: &Stage) -> anyhow::Result<Vec<Figure>> {
    let Stage { s3, db, vhost, dir } = stage;
    let count = ctx.size(100, 10);
    let size = 1024 * 1024;
    let input = (count * size) as u64;

    let blobs = s3.store(BUCKET).await?;
    let app = Arc::new(App::spawn(&db.url, blobs, &[("DOSSIER_AMQP_URL", vhost.url())]).await?);
    let result = async {
        // The files, uploaded the ordinary way.
        let token = Arc::new(env::token(TENANT, Role::Staff, None));
        let ids = Arc::new(std::sync::Mutex::new(vec![String::new(); count]));
        stats::batch(count, 4, {
            let (app, token, ids) = (app.clone(), token.clone(), ids.clone());
            move |i| {
                let (app, token, ids) = (app.clone(), token.clone(), ids.clone());
                async move {
                    let id = upload(&app, &token, i, content(i, size)).await?;
                    if let Ok(mut ids) = ids.lock() {
                        ids[i] = id;
                    }
                    Ok(())
                }
            }
        })
        .await
        .context("uploading the bundle's files")?;
        let ids: Vec<String> = ids.lock().map(|ids| ids.clone()).unwrap_or_default();

        let ours = bundle(&app, &token, &ids).await?;
        let archive_size = ours.map_or(input, |(_, size)| size);
        let s3_baseline = get_and_put(s3, db, archive_size).await?;
        let zip_baseline = zip_tool(dir, count, size).await;

        let mut figures = Vec::new();
        let mut figure = Figure::new(SCENARIO, format!("{count} x 1 MiB mixed, vs S3"), "MB/s")
            .baseline(
                mb_per_s(input, s3_baseline),
                "GetObject of every blob + PutObject of an archive of the same size",
            );
        let mut vs_zip = Figure::new(
            SCENARIO,
            format!("{count} x 1 MiB mixed, vs zip tool"),
            "MB/s",
        );
        match ours {
            Some((took, size)) => {
                figure = figure.ours(mb_per_s(input, took)).note(format!(
                    "request to downloaded archive: {:.2} s; archive {size} bytes",
                    took.as_secs_f64()
                ));
                vs_zip = vs_zip.ours(mb_per_s(input, took));
            }
            None => {
                figure =
                    figure.note("bundles are not in this build (POST /v1/bundles answers 404)");
            }
        }
        figures.push(figure.goal(Goal::RatioAtLeast(0.7)));
        match zip_baseline {
            Ok(took) => {
                vs_zip = vs_zip.baseline(
                    mb_per_s(input, took),
                    "zip -q -r (deflate -6) on local disk",
                );
            }
            Err(error) => vs_zip = vs_zip.note(format!("zip tool: {error:#}")),
        }
        figures.push(vs_zip.goal(Goal::Report));
        anyhow::Ok(figures)
    }
    .await;
    if let Ok(app) = Arc::try_unwrap(app) {
        app.stop().await;
    }
    result
}

async fn upload(app: &App, token: &str, i: usize, body: Bytes) -> anyhow::Result<String> {
    let (file_name, mime) = if i.is_multiple_of(2) {
        (format!("letter-{i}.txt"), "text/plain")
    } else {
        (format!("scan-{i}.jpg"), "image/jpeg")
    };
    let form = reqwest::multipart::Form::new()
        .text("name", format!("Bundle file {i}"))
        .part(
            "file",
            reqwest::multipart::Part::bytes(body.to_vec())
                .file_name(file_name)
                .mime_str(mime)?,
        );
    let response = app
        .client
        .post(app.url("/v1/customers/cust-zip/files"))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == reqwest::StatusCode::CREATED,
        "upload answered {}",
        response.status()
    );
    let file: Value = response.json().await?;
    file["id"]
        .as_str()
        .map(str::to_owned)
        .context("the File has an id")
}

/// `GET /v1/bundles/{id}`.
async fn bundle_status(app: &App, token: &str, id: &str) -> anyhow::Result<Value> {
    Ok(app
        .client
        .get(app.url(&format!("/v1/bundles/{id}")))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?)
}

/// Requests the bundle, waits until it is ready and downloads it; `None` when
/// the build has no bundles. Answers the time taken and the archive's size.
async fn bundle(app: &App, token: &str, ids: &[String]) -> anyhow::Result<Option<(Duration, u64)>> {
    let started = Instant::now();
    let response = app
        .client
        .post(app.url("/v1/bundles"))
        .bearer_auth(token)
        .json(&json!({ "file_ids": ids }))
        .send()
        .await?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    anyhow::ensure!(
        response.status().is_success(),
        "POST /v1/bundles answered {}",
        response.status()
    );
    let created: Value = response.json().await?;
    let id = created["id"]
        .as_str()
        .context("the bundle has an id")?
        .to_owned();
    // A failed bundle or request ends the wait at once, with its error.
    Wait::new("the bundle to be ready")
        .timeout(Duration::from_secs(300))
        .interval(Duration::from_millis(10))
        .until(async || {
            let status: Value = match bundle_status(app, token, &id).await {
                Ok(status) => status,
                Err(error) => return Ok(Err(error)),
            };
            match status["status"].as_str() {
                Some("ready") => Ok(Ok(())),
                Some("failed") => Ok(Err(anyhow::anyhow!("the bundle failed: {status}"))),
                _ => Err(status),
            }
        })
        .await??;
    let mut response = app
        .client
        .get(app.url(&format!("/v1/bundles/{id}/content")))
        .bearer_auth(token)
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "bundle content answered {}",
        response.status()
    );
    let mut size = 0u64;
    while let Some(chunk) = response.chunk().await? {
        size += chunk.len() as u64;
    }
    Ok(Some((started.elapsed(), size)))
}

/// GET of every blob of the tenant, then a PUT of `archive_size` bytes.
async fn get_and_put(s3: &S3Server, db: &BenchDb, archive_size: u64) -> anyhow::Result<Duration> {
    let keys: Vec<String> = db
        .pool
        .get()
        .await?
        .query("SELECT blob_key FROM files WHERE tenant = $1", &[&TENANT])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let direct = s3.direct(BUCKET).await?;
    // Bytes that neither compress nor repeat anything stored before, as a
    // sealed archive is (zeros compressed to nothing on Garage, and its
    // blocks were all one block).
    let archive = env::Distinct::new(env::random_bytes(archive_size as usize, 7)).one();
    let started = Instant::now();
    for key in &keys {
        let object = direct
            .client()
            .get_object()
            .bucket(direct.bucket())
            .key(direct.object_key(key))
            .send()
            .await
            .with_context(|| format!("GetObject {key}"))?;
        object.body.collect().await.context("reading a blob")?;
    }
    direct
        .client()
        .put_object()
        .bucket(direct.bucket())
        .key(direct.object_key("baseline/archive.zip"))
        .body(ByteStream::from(archive))
        .customize()
        // As our S3 adapter sends it.
        .disable_payload_signing()
        .send()
        .await
        .context("PutObject of the archive")?;
    Ok(started.elapsed())
}

/// The zip tool on the same files written to local disk.
async fn zip_tool(dir: &std::path::Path, count: usize, size: usize) -> anyhow::Result<Duration> {
    let files = dir.join("files");
    std::fs::create_dir_all(&files)?;
    for i in 0..count {
        let name = if i.is_multiple_of(2) {
            format!("letter-{i}.txt")
        } else {
            format!("scan-{i}.jpg")
        };
        std::fs::write(files.join(name), content(i, size))?;
    }
    let started = Instant::now();
    let status = tokio::process::Command::new("zip")
        .args(["-q", "-r", "../archive.zip", "."])
        .current_dir(&files)
        .status()
        .await
        .context("running zip (is it installed?)")?;
    let took = started.elapsed();
    anyhow::ensure!(status.success(), "zip exited with {status}");
    Ok(took)
}
