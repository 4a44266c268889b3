//! `sealed_blobs`: what sealing costs. 25 MiB blobs put into and read back
//! from the S3 server, 1 and 8 at once, through the sealing decorator
//! ([`SealedBlobStore`]: a data key per blob, created in Postgres, and
//! AES-256-GCM in 64 KiB segments both ways) next to the same store without
//! it, same server, same run.
//!
//! Measured at the blob store port, not over HTTP: the service has no
//! unsealed mode to compare against (it must not), and at the port the
//! sealing is the largest share of the work it can ever be; over HTTP the
//! multipart parsing, the command and the read-your-writes wait come on top
//! of both. Ours includes the key's creation (put) and its lookup (get).
//! Downloads read the whole body, as a client would. Three rounds of each,
//! interleaved, each on fresh blobs that are removed afterwards.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use dossier_blobstore::{BlobStore, ByteStream, SealedBlobStore};
use dossier_domain::BlobKey;
use dossier_keys::{KeyStore, MasterKey, MasterKeys};
use futures::StreamExt as _;
use uuid::Uuid;

use super::Ctx;
use super::env::{self, Distinct, Stage};
use super::report::{Figure, Goal};
use super::stats::{self, mb_per_s};

const SCENARIO: &str = "sealed_blobs";
/// The chunk size an upload's body arrives in, about.
const CHUNK: usize = 64 * 1024;

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    Stage::run(ctx, 4, "sealed", measure).await
}

/// One store under measurement.
#[derive(Clone)]
struct Subject {
    store: Arc<dyn BlobStore>,
}

/// `count` fresh blob keys of files.
fn fresh_keys(count: usize) -> Arc<Vec<BlobKey>> {
    Arc::new(
        (0..count)
            .map(|i| BlobKey::from_recorded(format!("bench/cust-{}/{}", i % 10, Uuid::new_v4())))
            .collect(),
    )
}

impl Subject {
    async fn puts(
        &self,
        keys: &Arc<Vec<BlobKey>>,
        parallel: usize,
        bodies: &Distinct,
    ) -> anyhow::Result<Duration> {
        let (store, keys) = (self.store.clone(), keys.clone());
        bodies
            .batch(keys.len(), parallel, move |i, body| {
                let (store, keys) = (store.clone(), keys.clone());
                async move {
                    let size = body.len() as u64;
                    let chunks: Vec<std::io::Result<Bytes>> = (0..body.len())
                        .step_by(CHUNK)
                        .map(|at| Ok(body.slice(at..(at + CHUNK).min(body.len()))))
                        .collect();
                    let stream: ByteStream = Box::pin(futures::stream::iter(chunks));
                    let stored = store.put(&keys[i], stream, size).await.context("put")?;
                    anyhow::ensure!(
                        stored.size == size,
                        "stored {} of {size} bytes",
                        stored.size
                    );
                    Ok(())
                }
            })
            .await
    }

    async fn gets(
        &self,
        keys: &Arc<Vec<BlobKey>>,
        parallel: usize,
        size: u64,
    ) -> anyhow::Result<Duration> {
        let (store, keys) = (self.store.clone(), keys.clone());
        stats::batch(keys.len(), parallel, move |i| {
            let (store, keys) = (store.clone(), keys.clone());
            async move {
                let object = store.get(&keys[i]).await.context("get")?;
                let mut body = object.body;
                let mut read = 0u64;
                while let Some(chunk) = body.next().await {
                    read += chunk.context("reading")?.len() as u64;
                }
                anyhow::ensure!(read == size, "read {read} of {size} bytes");
                Ok(())
            }
        })
        .await
    }

    /// Puts `count` blobs, reads them back and removes them: the time of the
    /// puts and of the gets.
    async fn round(
        &self,
        count: usize,
        parallel: usize,
        bodies: &Distinct,
    ) -> anyhow::Result<(Duration, Duration)> {
        let keys = fresh_keys(count);
        let put = self.puts(&keys, parallel, bodies).await?;
        let get = self.gets(&keys, parallel, bodies.len() as u64).await?;
        for key in keys.iter() {
            self.store.delete(key).await.context("removing a blob")?;
        }
        Ok((put, get))
    }
}

async fn measure(ctx: &Ctx, stage: &Stage) -> anyhow::Result<Vec<Figure>> {
    let size = ctx.size(25 * 1024 * 1024, 2 * 1024 * 1024);
    let levels: [(usize, usize); 2] = [(1, ctx.size(8, 2)), (8, ctx.size(32, 8))];
    let rounds = ctx.size(3, 1);
    let pool = stage.db.pool(16).await?;
    let keys = KeyStore::open(pool, MasterKeys::new(MasterKey::generate().0, None))
        .await
        .context("the key table")?;
    let bare_store = stage.s3.store("bench-sealed").await?;
    let bare = Subject {
        store: bare_store.clone(),
    };
    let sealed = Subject {
        store: SealedBlobStore::shared(bare_store, keys),
    };
    // New bytes for every put, as every upload is (see [`Distinct`]).
    let bodies = Distinct::new(env::random_bytes(size, 14));

    // Warm up both paths (connections, the key table, first allocations).
    bare.round(2, 2, &bodies).await?;
    sealed.round(2, 2, &bodies).await?;

    let mut figures = Vec::new();
    for &(parallel, count) in &levels {
        let (bare_runs, sealed_runs) = stats::interleaved(
            rounds,
            async || bare.round(count, parallel, &bodies).await,
            async || sealed.round(count, parallel, &bodies).await,
        )
        .await?;
        let sum = |runs: &[(Duration, Duration)]| {
            runs.iter()
                .fold((Duration::ZERO, Duration::ZERO), |(put, get), (p, g)| {
                    (put + *p, get + *g)
                })
        };
        let ((bare_put, bare_get), (sealed_put, sealed_get)) = (sum(&bare_runs), sum(&sealed_runs));
        let bytes = (rounds * count * size) as u64;
        let mib = size / (1024 * 1024);
        figures.push(
            Figure::new(SCENARIO, format!("upload {mib} MiB, {parallel} at once"), "MB/s")
                .ours(mb_per_s(bytes, sealed_put))
                .baseline(
                    mb_per_s(bytes, bare_put),
                    "the same puts into the same S3 store without the sealing decorator, rounds interleaved",
                )
                .goal(Goal::RatioAtLeast(0.9)),
        );
        figures.push(
            Figure::new(SCENARIO, format!("download {mib} MiB, {parallel} at once"), "MB/s")
                .ours(mb_per_s(bytes, sealed_get))
                .baseline(
                    mb_per_s(bytes, bare_get),
                    "the same gets from the same S3 store without the sealing decorator, rounds interleaved",
                )
                .goal(Goal::RatioAtLeast(0.9)),
        );
    }
    Ok(figures)
}
