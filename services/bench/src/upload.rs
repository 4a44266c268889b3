//! `upload`: 25 MiB files over HTTP, 1 and 8 at once, end to end into the
//! blob store (S3), against the same bytes `PutObject`-ed directly with
//! aws-sdk-s3 to the same server.
//!
//! Every upload, ours and the baseline's, sends a body no earlier one sent
//! ([`Distinct`]): a content-addressed server (Garage) writes a repeated
//! body's blocks only once, and ours are new ciphertext every time.
//!
//! Ours includes everything a client waits for: multipart parsing, hashing,
//! sealing, the S3 upload, the command, and the read-your-writes wait. The
//! goal figure is a form that declares the file's size before the file, as
//! the pages send it (one streamed PutObject); the same form without it goes
//! as a multipart upload (parts of [`PART_SIZE`]) and is reported beside it. Client, server and S3 server share this process and
//! its two cores.
//!
//! The baseline sends its body the way our S3 adapter does, with
//! `UNSIGNED-PAYLOAD`: a signed payload costs a SHA-256 on each side that the
//! adapter no longer pays, and comparing against it would credit ours with
//! work the baseline did and we skipped. The SDK's default (signed) PutObject
//! is reported beside it, as the figure earlier runs compared against.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use dossier_api::auth::jwt::Role;
use dossier_blobstore::S3BlobStore;
use dossier_blobstore::s3::PART_SIZE;

use super::Ctx;
use super::env::{self, App, Distinct, S3Server, Stage};
use super::report::{Figure, Goal};
use super::stats::{self, mb_per_s};

const SCENARIO: &str = "upload";
const TENANT: &str = "bench-upload";

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    Stage::run(ctx, 4, "upload", measure).await
}

async fn measure(ctx: &Ctx, stage: &Stage) -> anyhow::Result<Vec<Figure>> {
    let Stage { s3, db, vhost, .. } = stage;
    let size = ctx.size(25 * 1024 * 1024, 2 * 1024 * 1024);
    let levels: [(usize, usize); 2] = [(1, ctx.size(8, 2)), (8, ctx.size(32, 8))];

    let blobs = s3.store("bench-upload").await?;
    let app = Arc::new(App::spawn(&db.url, blobs, &[("DOSSIER_AMQP_URL", vhost.url())]).await?);
    let result = measure_levels(
        s3,
        &app,
        &levels,
        ctx.size(4, 1),
        Distinct::new(env::random_bytes(size, 25)),
    )
    .await;
    if let Ok(app) = Arc::try_unwrap(app) {
        app.stop().await;
    }
    result
}

async fn measure_levels(
    s3: &S3Server,
    app: &Arc<App>,
    levels: &[(usize, usize)],
    rounds: usize,
    bodies: Distinct,
) -> anyhow::Result<Vec<Figure>> {
    let size = bodies.len();
    let direct = Arc::new(s3.direct("bench-upload-direct").await?);
    let token = Arc::new(env::token(TENANT, Role::Staff, None));

    // As the pages send a file: its size declared before it (one streamed
    // PutObject), and as a client that does not declare it (multipart).
    let upload_with = |declare: bool| {
        let (app, token) = (app.clone(), token.clone());
        move |i: usize, body: Bytes| {
            let (app, token) = (app.clone(), token.clone());
            async move {
                let url = app.url(&format!("/v1/customers/cust-{}/files", i % 10));
                env::post_upload(&app.client, &url, &token, body, i, declare).await
            }
        }
    };
    let upload = upload_with(true);
    let upload_undeclared = upload_with(false);
    let put_with = |sign_payload: bool| {
        let direct = direct.clone();
        move |i: usize, body: Bytes| {
            let direct = direct.clone();
            async move { put_object(&direct, body, i, sign_payload).await }
        }
    };
    let put = put_with(false);
    let put_signed = put_with(true);

    // What the blob store sends after the HTTP side: the same parts, one after
    // the other, straight from memory. Splits ours into "multipart" and "the
    // rest".
    let multipart = {
        let direct = direct.clone();
        move |i: usize, body: Bytes| {
            let direct = direct.clone();
            async move { put_multipart(&direct, body, i).await }
        }
    };

    // Warm up every path (connections, buckets, first allocations).
    bodies.batch(2, 2, upload.clone()).await?;
    bodies.batch(2, 2, upload_undeclared.clone()).await?;
    bodies.batch(2, 2, put.clone()).await?;
    bodies.batch(2, 2, put_signed.clone()).await?;
    bodies.batch(2, 2, multipart.clone()).await?;

    let mut figures = Vec::new();
    for &(parallel, count) in levels {
        let bytes = (count * size) as u64;
        // The goal's pair in interleaved rounds, averaged: at one upload at
        // a time a single batch is only a second or two long.
        let (baseline, ours) = stats::interleaved(
            rounds,
            async || bodies.batch(count, parallel, put.clone()).await,
            async || bodies.batch(count, parallel, upload.clone()).await,
        )
        .await?;
        let average = |runs: Vec<Duration>| runs.iter().sum::<Duration>() / runs.len() as u32;
        let (baseline, ours) = (average(baseline), average(ours));
        figures.push(
            Figure::new(
                SCENARIO,
                format!("{} MiB files, {parallel} at once", size / (1024 * 1024)),
                "MB/s",
            )
            .ours(mb_per_s(bytes, ours))
            .baseline(
                mb_per_s(bytes, baseline),
                "PutObject of the same bytes with aws-sdk-s3, UNSIGNED-PAYLOAD like ours, same S3 server",
            )
            .goal(Goal::RatioAtLeast(0.8)),
        );
        let undeclared = bodies
            .batch(count, parallel, upload_undeclared.clone())
            .await?;
        figures.push(
            Figure::new(
                SCENARIO,
                format!(
                    "{} MiB files, {parallel} at once, size not declared",
                    size / (1024 * 1024)
                ),
                "MB/s",
            )
            .ours(mb_per_s(bytes, undeclared))
            .baseline(
                mb_per_s(bytes, baseline),
                "PutObject of the same bytes with aws-sdk-s3, UNSIGNED-PAYLOAD like ours, same S3 server",
            )
            .note("a client that sends no `size` field: the body goes as a multipart upload of 5 MiB parts")
            .goal(Goal::Report),
        );
        let signed = bodies.batch(count, parallel, put_signed.clone()).await?;
        figures.push(
            Figure::new(
                SCENARIO,
                format!(
                    "{} MiB files, {parallel} at once, vs signed PutObject",
                    size / (1024 * 1024)
                ),
                "MB/s",
            )
            .ours(mb_per_s(bytes, ours))
            .baseline(
                mb_per_s(bytes, signed),
                "PutObject with the SDK's default payload signing (SHA-256 on both sides)",
            )
            .goal(Goal::Report),
        );
        let split = bodies.batch(count, parallel, multipart.clone()).await?;
        figures.push(
            Figure::new(
                SCENARIO,
                format!(
                    "{} MiB files, {parallel} at once, size not declared, vs multipart",
                    size / (1024 * 1024)
                ),
                "MB/s",
            )
            .ours(mb_per_s(bytes, undeclared))
            .baseline(
                mb_per_s(bytes, split),
                "the same bytes as sequential UploadParts of our part size, UNSIGNED-PAYLOAD",
            )
            .goal(Goal::Report),
        );
    }
    Ok(figures)
}

/// One PutObject of `body`, with or without payload signing.
async fn put_object(
    direct: &S3BlobStore,
    body: Bytes,
    i: usize,
    sign_payload: bool,
) -> anyhow::Result<()> {
    let request = direct
        .client()
        .put_object()
        .bucket(direct.bucket())
        .key(direct.object_key(&format!("direct/{i}-{}", uuid::Uuid::new_v4())))
        .content_length(body.len() as i64)
        .body(ByteStream::from(body))
        .customize();
    let request = if sign_payload {
        request
    } else {
        request.disable_payload_signing()
    };
    request.send().await.context("PutObject")?;
    Ok(())
}

/// CreateMultipartUpload, UploadParts of the adapter's part size one after
/// the other (unsigned payload, as the adapter sends them), Complete.
async fn put_multipart(direct: &S3BlobStore, body: Bytes, i: usize) -> anyhow::Result<()> {
    const PART: usize = PART_SIZE;
    let client = direct.client();
    let key = direct.object_key(&format!("multipart/{i}-{}", uuid::Uuid::new_v4()));
    let created = client
        .create_multipart_upload()
        .bucket(direct.bucket())
        .key(&key)
        .send()
        .await
        .context("CreateMultipartUpload")?;
    let upload_id = created.upload_id().context("an upload id")?.to_owned();
    let mut parts = Vec::new();
    for (n, start) in (0..body.len()).step_by(PART).enumerate() {
        let chunk = body.slice(start..(start + PART).min(body.len()));
        let number = n as i32 + 1;
        let uploaded = client
            .upload_part()
            .bucket(direct.bucket())
            .key(&key)
            .upload_id(&upload_id)
            .part_number(number)
            .content_length(chunk.len() as i64)
            .body(ByteStream::from(chunk))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .context("UploadPart")?;
        parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(uploaded.e_tag().map(str::to_owned))
                .build(),
        );
    }
    client
        .complete_multipart_upload()
        .bucket(direct.bucket())
        .key(&key)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .context("CompleteMultipartUpload")?;
    Ok(())
}
