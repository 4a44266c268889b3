//! `rebuild`: `dossier_projections::rebuild` of the files read model over a
//! log of 1,000,000 events, against reading the same events in log order with
//! `COPY ... TO STDOUT`.
//!
//! The log is seeded with `COPY` into `events` (its insert trigger still draws
//! every position and xid): 250,000 files, each uploaded, renamed, published
//! to the portal and viewed, in chunks of a thousand files so that the events
//! of one file are spread over the log as they would be.
//!
//! Twice: once with clear payloads (a log written before encryption), once
//! with every personal field sealed under its file's own key, as the service
//! writes them now, the rebuild opening them with the key table (one look-up
//! per few thousand events). Each against its own COPY of the same log.

use std::time::Instant;

use anyhow::Context as _;
use chrono::Utc;
use dossier_eventlog::personal::FieldCipher;
use dossier_keys::{DataKey, KeyStore, Owner};
use dossier_projections::{FilesProjection, RebuildOptions};
use futures::StreamExt as _;
use serde_json::json;

use super::Ctx;
use super::env::{self, BenchDb};
use super::report::{Figure, Goal};
use super::seed::{self, Rng};

const SCENARIO: &str = "rebuild";
const TENANT: &str = "bench-rebuild";

/// The columns the log reader selects, in log order.
const READ_ALL: &str = "COPY (SELECT id, position, tenant, aggregate_type, aggregate_id, \
    sequence, event_type, event_version, recorded_at, actor, payload, metadata \
    FROM events ORDER BY position) TO STDOUT";

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for sealed in [false, true] {
        let db = env::database(ctx, 4).await?;
        let result = measure(ctx, &db, sealed).await;
        env::remove_database(db).await;
        figures.extend(result?);
    }
    Ok(figures)
}

async fn measure(ctx: &Ctx, db: &BenchDb, sealed: bool) -> anyhow::Result<Vec<Figure>> {
    let events: u64 = ctx.size(1_000_000, 20_000);
    let seeding = Instant::now();
    let keys = dossier_test_support::development_keys(&db.pool).await?;
    seed_log(db, events / 4, sealed.then_some(&keys)).await?;
    db.pool
        .get()
        .await?
        .batch_execute("VACUUM ANALYZE events")
        .await?;
    eprintln!(
        "bench: rebuild: seeded {events} events in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );

    // The baseline twice: the first run warms the cache for both.
    read_with_copy(db).await?;
    let started = Instant::now();
    let read = read_with_copy(db).await?;
    let baseline = started.elapsed();
    anyhow::ensure!(read == events, "COPY read {read} events, not {events}");

    let mut options = RebuildOptions::default();
    if sealed {
        options = options.opening_with(FieldCipher::new(keys, db.pool.clone(), true));
    }
    let started = Instant::now();
    let report =
        dossier_projections::rebuild_with_options(&db.pool, &FilesProjection, options, &|_| {})
            .await
            .context("rebuilding the files projection")?;
    let ours = started.elapsed();
    anyhow::ensure!(
        report.events == events,
        "the rebuild read {} events, not {events}",
        report.events
    );
    // Every file ends renamed, in the portal and viewed: the last state of its four
    // events, not the first (a bulk build folds them; this checks it folded them all).
    let row = db
        .pool
        .get()
        .await?
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE name = 'Renamed file' \
                 AND visibility = 'portal' AND viewed_at IS NOT NULL) FROM files",
            &[],
        )
        .await?;
    let (live, final_state): (i64, i64) = (row.get(0), row.get(1));
    anyhow::ensure!(
        live as u64 == events / 4 && final_state == live,
        "the rebuilt model has {live} files, {final_state} of them in their final state"
    );

    Ok(vec![
        Figure::new(
            SCENARIO,
            if sealed {
                format!("files projection, {events} events, personal fields sealed")
            } else {
                format!("files projection, {events} events")
            },
            "events/s",
        )
        .ours(events as f64 / ours.as_secs_f64())
        .baseline(
            events as f64 / baseline.as_secs_f64(),
            "COPY (SELECT the log's columns ORDER BY position) TO STDOUT",
        )
        .note(format!(
            "rebuild took {:.1} s, COPY {:.2} s",
            ours.as_secs_f64(),
            baseline.as_secs_f64()
        ))
        .goal(Goal::RatioAtLeast(0.4)),
    ])
}

/// Reads every event in log order with COPY; answers how many rows came.
async fn read_with_copy(db: &BenchDb) -> anyhow::Result<u64> {
    let client = db.pool.get().await?;
    let stream = client.copy_out(READ_ALL).await?;
    futures::pin_mut!(stream);
    let mut rows = 0u64;
    while let Some(chunk) = stream.next().await {
        rows += chunk?.iter().filter(|b| **b == b'\n').count() as u64;
    }
    Ok(rows)
}

/// COPYs four events for each of `files` files into the log; with `keys`,
/// each file gets a key and its personal fields are sealed under it.
async fn seed_log(db: &BenchDb, files: u64, keys: Option<&KeyStore>) -> anyhow::Result<()> {
    const CHUNK: u64 = 1000;
    let now = Utc::now();
    let mut rng = Rng::new(0x10c);
    let metadata = json!({"tenant": TENANT, "actor": "bench"}).to_string();
    let mut chunks = Vec::new();
    for chunk in 0..files.div_ceil(CHUNK) {
        let ids: Vec<(uuid::Uuid, String)> = (chunk * CHUNK..((chunk + 1) * CHUNK).min(files))
            .map(|n| (seed::uuid(&mut rng), format!("cust-{}", n % 10_000)))
            .collect();
        let sealers = match keys {
            Some(keys) => {
                let owners: Vec<Owner<'_>> = ids.iter().map(|(id, _)| Owner::File(*id)).collect();
                keys.create_many(TENANT, &owners)
                    .await?
                    .into_iter()
                    .map(Some)
                    .collect()
            }
            None => vec![None; ids.len()],
        };
        chunks.push((ids, sealers));
    }
    let rows = chunks.into_iter().flat_map(move |(ids, sealers)| {
        let seal = |key: &Option<DataKey>, text: &str| match key {
            Some(key) => key.seal_field(text),
            None => text.to_owned(),
        };
        let mut rows = Vec::with_capacity(ids.len() * 4);
        let mut row = |id: &uuid::Uuid, sequence: u32, event_type: &str, version: &str, payload: String| {
            rows.push(format!(
                "{}\t{TENANT}\tfile\t{id}\t{sequence}\t{event_type}\t{version}\t{payload}\t{metadata}\tbench\n",
                uuid::Uuid::now_v7()
            ));
        };
        for ((id, customer), key) in ids.iter().zip(&sealers) {
            let mut payload = seed::uploaded_payload(TENANT, customer, *id, "Seeded file", now);
            for field in ["name", "file_name", "content_type", "sha256"] {
                let sealed = seal(key, payload[field].as_str().unwrap_or_default());
                payload[field] = sealed.into();
            }
            row(id, 1, "FileUploaded", "2", payload.to_string());
        }
        for ((id, _), key) in ids.iter().zip(&sealers) {
            let payload = json!({
                "from": seal(key, "Seeded file"),
                "name": seal(key, "Renamed file"),
            });
            row(id, 2, "FileRenamed", "1", payload.to_string());
        }
        for (id, _) in &ids {
            let payload = json!({"from": "internal", "visibility": "portal"});
            row(id, 3, "FileVisibilityChanged", "1", payload.to_string());
        }
        for (id, customer) in &ids {
            let payload = json!({"viewer": customer, "viewed_at": now});
            row(id, 4, "FileViewed", "1", payload.to_string());
        }
        rows
    });
    seed::copy_in(
        &db.pool,
        "COPY events (id, tenant, aggregate_type, aggregate_id, sequence, event_type, \
         event_version, payload, metadata, actor) FROM STDIN",
        rows,
    )
    .await
    .context("COPY into events")?;
    Ok(())
}
