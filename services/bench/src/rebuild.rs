//! `rebuild`: `dossier_projections::rebuild` of the files read model over a
//! log of 1,000,000 events, against reading the same events in log order with
//! `COPY ... TO STDOUT`.
//!
//! The log is seeded with `COPY` into `events` (its insert trigger still draws
//! every position and xid): 250,000 files, each uploaded, renamed, published
//! to the portal and viewed, in chunks of a thousand files so that the events
//! of one file are spread over the log as they would be.

use std::time::Instant;

use anyhow::Context as _;
use chrono::Utc;
use dossier_projections::FilesProjection;
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
    let db = env::database(ctx, 4).await?;
    let result = measure(ctx, &db).await;
    env::remove_database(db).await;
    result
}

async fn measure(ctx: &Ctx, db: &BenchDb) -> anyhow::Result<Vec<Figure>> {
    let events: u64 = ctx.size(1_000_000, 20_000);
    let seeding = Instant::now();
    seed_log(db, events / 4).await?;
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

    let started = Instant::now();
    let report = dossier_projections::rebuild(&db.pool, &FilesProjection)
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
            format!("files projection, {events} events"),
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

/// COPYs four events for each of `files` files into the log.
async fn seed_log(db: &BenchDb, files: u64) -> anyhow::Result<()> {
    const CHUNK: u64 = 1000;
    let now = Utc::now();
    let mut rng = Rng::new(0x10c);
    let metadata = json!({"tenant": TENANT, "actor": "bench"}).to_string();
    let rows = (0..files.div_ceil(CHUNK)).flat_map(move |chunk| {
        let ids: Vec<(uuid::Uuid, String)> = (chunk * CHUNK..((chunk + 1) * CHUNK).min(files))
            .map(|n| (seed::uuid(&mut rng), format!("cust-{}", n % 10_000)))
            .collect();
        let mut rows = Vec::with_capacity(ids.len() * 4);
        let mut row = |id: &uuid::Uuid, sequence: u32, event_type: &str, version: &str, payload: String| {
            rows.push(format!(
                "{}\t{TENANT}\tfile\t{id}\t{sequence}\t{event_type}\t{version}\t{payload}\t{metadata}\tbench\n",
                uuid::Uuid::now_v7()
            ));
        };
        for (id, customer) in &ids {
            let payload = seed::uploaded_payload(TENANT, customer, *id, "Seeded file", now);
            row(id, 1, "FileUploaded", "2", payload.to_string());
        }
        for (id, _) in &ids {
            let payload = json!({"from": "Seeded file", "name": "Renamed file"});
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
