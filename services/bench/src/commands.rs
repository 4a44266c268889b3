//! `commands` and `projection_lag`: renames (`PATCH /v1/files/{id}`) from 1, 16
//! and 64 concurrent clients, against single-row INSERT+COMMIT of an
//! event-sized row at the same concurrency; and, under that load, how long an
//! event takes from its commit to being visible in the files read model.
//!
//! Ours is the whole command path a client waits for: HTTP, token check,
//! cqrs-es loading the file's events, the append transaction, and the
//! read-your-writes wait for every read model. Each client renames files of
//! its own (no lost races). The baseline runs first, with no server up.
//!
//! The lag probe appends a rename of a file of its own through the event store
//! every 25 ms, takes the time when its commit returned, and polls the files
//! row (every millisecond) until the new name shows.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dossier_api::auth::jwt::Role;
use dossier_blobstore::{self as blob, BlobStoreSpec};
use dossier_eventlog::db::Pool;
use dossier_eventlog::eventstore::PgEventStore;
use dossier_eventlog::personal::FieldCipher;
use dossier_test_support::rabbit::TestVhost;
use serde_json::json;
use tokio::time::Instant;
use uuid::Uuid;

use super::Ctx;
use super::env::{self, App, BenchDb};
use super::report::{Figure, Goal};
use super::seed;
use super::stats::{self, Load, Samples};

const SCENARIO: &str = "commands";
const LAG: &str = "projection_lag";
const TENANT: &str = "bench-commands";
const LEVELS: [usize; 3] = [1, 16, 64];

const BASELINE_TABLE: &str = "CREATE TABLE bench_insert (
    position BIGSERIAL PRIMARY KEY, id UUID NOT NULL, tenant TEXT NOT NULL,
    aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, sequence BIGINT NOT NULL,
    event_type TEXT NOT NULL, event_version TEXT NOT NULL, payload JSONB NOT NULL,
    metadata JSONB NOT NULL, actor TEXT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now())";

const BASELINE_INSERT: &str = "INSERT INTO bench_insert (id, tenant, aggregate_type, \
    aggregate_id, sequence, event_type, event_version, payload, metadata, actor) \
    VALUES ($1, $2, 'file', $3, $4, 'FileRenamed', '1', $5, $6, 'bench')";

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let db = env::database(ctx, 4).await?;
    let vhost = TestVhost::create().await?;
    let blob_dir = env::temp_dir("commands-blobs")?;
    let result = measure(ctx, &db, &vhost, &blob_dir).await;
    env::remove_database(db).await;
    let _ = vhost.cleanup().await;
    let _ = std::fs::remove_dir_all(&blob_dir);
    result
}

/// An event store on `db` that seals personal fields as the application's
/// does (the development master key, which the harness' settings leave in
/// place), with a key cache of its own: the application finds each key once.
async fn sealing_store(db: &BenchDb) -> anyhow::Result<PgEventStore> {
    let keys = dossier_test_support::development_keys(&db.pool)
        .await
        .context("the key table")?;
    let cipher = FieldCipher::new(keys, db.pool.clone(), true);
    Ok(PgEventStore::new(db.pool.clone()).with_cipher(cipher))
}

struct Level {
    clients: usize,
    baseline: Load,
    ours: Option<Load>,
    lag: Samples,
}

async fn measure(
    ctx: &Ctx,
    db: &BenchDb,
    vhost: &TestVhost,
    blob_dir: &std::path::Path,
) -> anyhow::Result<Vec<Figure>> {
    let warmup = ctx.size(Duration::from_secs(2), Duration::from_millis(300));
    let window = ctx.size(Duration::from_secs(10), Duration::from_millis(1500));
    let file_count = ctx.size(4096, 256);

    // The baseline first, with nothing else running.
    db.pool.get().await?.batch_execute(BASELINE_TABLE).await?;
    let mut levels = Vec::new();
    for clients in LEVELS {
        let pool = db.pool(clients).await?;
        let baseline = stats::closed_loop(clients, warmup, window, {
            let pool = pool.clone();
            move |client, i| {
                let pool = pool.clone();
                async move { insert_row(&pool, client, i).await }
            }
        })
        .await
        .context("the INSERT baseline")?;
        pool.close();
        levels.push(Level {
            clients,
            baseline,
            ours: None,
            lag: Samples::default(),
        });
    }

    // Ours: the real server, files seeded through the event store.
    let blobs = blob::open(&BlobStoreSpec::Dir(blob_dir.to_owned())).await?;
    let app = Arc::new(App::spawn(&db.url, blobs, &[("DOSSIER_AMQP_URL", vhost.url())]).await?);
    let result = async {
        // Seeded as uploads through Dossier are: each file has its data key
        // and its events are sealed under it. (Seeded clear, every file was
        // one stored before encryption, and each rename looked for its key
        // in vain: a statement per rename no uploaded file pays.)
        let store = sealing_store(db).await?;
        let files: Vec<(Uuid, String)> = (0..file_count)
            .map(|i| (Uuid::new_v4(), format!("cust-{}", i % 100)))
            .collect();
        let probe_file = Uuid::new_v4();
        let mut seeded = files.clone();
        seeded.push((probe_file, "cust-probe".to_owned()));
        seed::append_uploads(&store, TENANT, &seeded).await?;
        seed::wait_for_files(&db.pool, TENANT, seeded.len() as i64).await?;

        let ids: Arc<Vec<Uuid>> = Arc::new(files.iter().map(|(id, _)| *id).collect());
        let token = Arc::new(env::token(TENANT, Role::Staff, None));
        let mut probe = Probe {
            pool: db.pool.clone(),
            store,
            file: probe_file,
            sequence: 1,
            name: "Seeded file".to_owned(),
        };
        for level in &mut levels {
            let clients = level.clients;
            let probing = tokio::spawn(probe.run(Instant::now() + warmup, window));
            let load = stats::closed_loop(clients, warmup, window, {
                let (app, ids, token) = (app.clone(), ids.clone(), token.clone());
                move |client, i| {
                    let (app, ids, token) = (app.clone(), ids.clone(), token.clone());
                    async move {
                        // Client c renames files c, c + clients, c + 2 * clients, ...
                        let slot = (client + (i as usize) * clients) % ids.len();
                        rename(&app, &token, ids[slot], client, i).await
                    }
                }
            })
            .await
            .with_context(|| format!("renames from {clients} clients"))?;
            let (back, lag) = probing.await??;
            probe = back;
            level.ours = Some(load);
            level.lag = lag;
        }
        anyhow::Ok(ids)
    }
    .await;
    if let Ok(app) = Arc::try_unwrap(app) {
        app.stop().await;
    }
    let ids = result?;
    let mut figures = figures(&levels);

    // Where the time goes, at 16 clients and without the probe: Postgres
    // transactions per rename with every role, and the rate with only the
    // roles a rename needs (no relay, audit or workers following the log).
    let baseline_16 = levels
        .iter()
        .find(|level| level.clients == 16)
        .map(|level| level.baseline.per_second());
    for roles in ["all", "api,projections"] {
        let blobs = blob::open(&BlobStoreSpec::Dir(blob_dir.to_owned())).await?;
        let overrides = [("DOSSIER_AMQP_URL", vhost.url()), ("DOSSIER_ROLES", roles)];
        let app = Arc::new(App::spawn(&db.url, blobs, &overrides).await?);
        let measured = diagnose(db, &app, &ids, 16, warmup, window).await;
        if let Ok(app) = Arc::try_unwrap(app) {
            app.stop().await;
        }
        let (load, transactions) = measured?;
        let mut figure = Figure::new(
            SCENARIO,
            format!("renames, 16 clients, roles {roles}"),
            "cmd/s",
        )
        .ours(load.per_second())
        .note(format!(
            "{transactions:.1} Postgres transactions per rename (the baseline: 1), \
                 no lag probe"
        ));
        if let Some(baseline) = baseline_16 {
            figure = figure.baseline(
                baseline,
                "single-row INSERT+COMMIT of an event-sized row, same concurrency",
            );
        }
        figures.push(figure.goal(Goal::Report));
    }
    Ok(figures)
}

/// Renames from `clients` clients (no probe); answers the load and how many
/// Postgres transactions the database committed per rename meanwhile.
async fn diagnose(
    db: &BenchDb,
    app: &Arc<App>,
    ids: &Arc<Vec<Uuid>>,
    clients: usize,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<(Load, f64)> {
    let token = Arc::new(env::token(TENANT, Role::Staff, None));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let before = committed(&db.pool).await?;
    let load = stats::closed_loop(clients, warmup, window, {
        let (app, ids, token, done) = (app.clone(), ids.clone(), token.clone(), done.clone());
        move |client, i| {
            let (app, ids, token, done) = (app.clone(), ids.clone(), token.clone(), done.clone());
            async move {
                let slot = (client + (i as usize) * clients) % ids.len();
                rename(&app, &token, ids[slot], client, i + 1_000_000).await?;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
        }
    })
    .await?;
    // Backends report their counts at most once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = committed(&db.pool).await?;
    let renames = done.load(std::sync::atomic::Ordering::Relaxed).max(1);
    Ok((load, (after - before) as f64 / renames as f64))
}

/// Transactions committed in this database so far (cumulative statistics).
async fn committed(pool: &Pool) -> anyhow::Result<i64> {
    let client = pool.get().await?;
    client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await?;
    Ok(client
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?
        .get(0))
}

fn figures(levels: &[Level]) -> Vec<Figure> {
    let baseline_is = "single-row INSERT+COMMIT of an event-sized row, same concurrency";
    let mut figures = Vec::new();
    for level in levels {
        let Some(ours) = &level.ours else { continue };
        let c = level.clients;
        let goal = if c == 16 {
            Goal::RatioAtLeast(0.5)
        } else {
            Goal::Report
        };
        figures.push(
            Figure::new(SCENARIO, format!("renames, {c} clients"), "cmd/s")
                .ours(ours.per_second())
                .baseline(level.baseline.per_second(), baseline_is)
                .goal(goal),
        );
        figures.push(
            Figure::new(SCENARIO, format!("p50 latency, {c} clients"), "ms")
                .ours(ours.latencies.p50_ms())
                .baseline(level.baseline.latencies.p50_ms(), baseline_is)
                .goal(Goal::Report),
        );
        figures.push(
            Figure::new(SCENARIO, format!("p99 latency, {c} clients"), "ms")
                .ours(ours.latencies.p99_ms())
                .baseline(level.baseline.latencies.p99_ms(), baseline_is)
                .goal(Goal::Report),
        );
    }
    for level in levels {
        let c = level.clients;
        figures.push(
            Figure::new(LAG, format!("p99 commit to read model, {c} clients"), "s")
                .ours(level.lag.percentile(99.0).as_secs_f64())
                .note(format!(
                    "{} probes; p50 {:.4} s; polled every 1 ms",
                    level.lag.len(),
                    level.lag.percentile(50.0).as_secs_f64()
                ))
                .goal(Goal::AtMost(0.1)),
        );
    }
    figures
}

async fn insert_row(pool: &Pool, client: usize, i: u64) -> anyhow::Result<()> {
    let connection = pool.get().await?;
    let statement = connection.prepare_cached(BASELINE_INSERT).await?;
    let aggregate = format!("{client}-{}", i % 64);
    let payload = json!({"from": "Seeded file", "name": format!("Renamed {client}-{i}")});
    let metadata = json!({"tenant": TENANT, "actor": "bench", "command_id": Uuid::now_v7()});
    connection
        .execute(
            &statement,
            &[
                &Uuid::now_v7(),
                &TENANT,
                &aggregate,
                &(i as i64),
                &payload,
                &metadata,
            ],
        )
        .await?;
    Ok(())
}

async fn rename(app: &App, token: &str, file: Uuid, client: usize, i: u64) -> anyhow::Result<()> {
    let response = app
        .client
        .patch(app.url(&format!("/v1/files/{file}")))
        .bearer_auth(token)
        .json(&json!({"name": format!("Renamed {client}-{i}")}))
        .send()
        .await?;
    let status = response.status();
    anyhow::ensure!(
        status.is_success(),
        "rename answered {status}: {}",
        response.text().await.unwrap_or_default()
    );
    Ok(())
}

/// Appends renames of its own file and times commit → visible.
struct Probe {
    pool: Pool,
    store: PgEventStore,
    file: Uuid,
    sequence: usize,
    name: String,
}

impl Probe {
    async fn run(mut self, from: Instant, window: Duration) -> anyhow::Result<(Self, Samples)> {
        tokio::time::sleep_until(from).await;
        let end = from + window;
        let client = self.pool.get().await?;
        let read = client
            .prepare("SELECT name FROM files WHERE id = $1")
            .await?;
        let mut lags = Vec::new();
        while Instant::now() < end {
            self.sequence += 1;
            let name = format!("Probe {}", self.sequence);
            let event = seed::serialized(
                TENANT,
                self.file,
                self.sequence,
                "FileRenamed",
                "1",
                json!({"from": self.name, "name": name}),
            );
            self.store
                .persist_returning_positions(&[event])
                .await
                .map_err(|e| anyhow::anyhow!("probe append: {e}"))?;
            let committed = Instant::now();
            self.name = name;
            loop {
                let row = client.query_opt(&read, &[&self.file]).await?;
                if row.is_some_and(|row| row.get::<_, String>(0) == self.name) {
                    break;
                }
                anyhow::ensure!(
                    committed.elapsed() < Duration::from_secs(30),
                    "the probe's rename did not show in the read model within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            lags.push(committed.elapsed());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        drop(read);
        drop(client);
        Ok((self, Samples::new(lags)))
    }
}
