//! `list`: `GET /v1/customers/{customer_id}/files` with filters, for a tenant
//! with 1,000,000 files over 10,000 customers (about a hundred each).
//!
//! The files read model is seeded directly with `COPY` (its list index is
//! dropped first and built again after, as a bulk load would do), then
//! analyzed. Requests go over HTTP with a staff token, each for a random
//! customer with one of several filter combinations, from one client and from
//! eight. There is no baseline: the goal is absolute (p99 under 10 ms).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{TimeZone as _, Utc};
use dossier_api::auth::jwt::Role;
use dossier_blobstore::{self as blob, BlobStoreSpec};

use super::Ctx;
use super::env::{self, App, BenchDb};
use super::report::{Figure, Goal};
use super::seed::{self, Rng};
use super::stats;

const SCENARIO: &str = "list";
const TENANT: &str = "bench-list";

/// The filter combinations a staff UI sends, in rotation.
const FILTERS: [&str; 8] = [
    "",
    "visibility=portal&visibility=portal_and_moving",
    "viewed=false",
    "created_from=2025-03-01&created_to=2025-08-31",
    "origin=contract",
    "visibility=internal&viewed=false&created_from=2025-01-01",
    "contract_id=K-7",
    "limit=200",
];

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    on_read_ground(ctx, TENANT, measure).await
}

/// What the `list` and `console` scenarios read from: a database of their own
/// whose read models hold `files` files of `customers` customers of one
/// tenant, and the API with its projections over it (no RabbitMQ).
pub(crate) struct ReadGround {
    pub app: Arc<App>,
    /// A staff token of the tenant.
    pub token: Arc<String>,
    pub files: u64,
    pub customers: u64,
}

/// Seeds a [`ReadGround`] for `tenant`, runs `measure` on it, then stops the
/// application and removes the database and the blob directory, whatever
/// `measure` answered.
pub(crate) async fn on_read_ground<T>(
    ctx: &Ctx,
    tenant: &str,
    measure: impl AsyncFnOnce(&Ctx, &ReadGround) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let db = env::database(ctx, 4).await?;
    let blob_dir = env::temp_dir(tenant)?;
    let result = async {
        let ground = seed_ground(ctx, &db, &blob_dir, tenant).await?;
        let measured = measure(ctx, &ground).await;
        if let Ok(app) = Arc::try_unwrap(ground.app) {
            app.stop().await;
        }
        measured
    }
    .await;
    env::remove_database(db).await;
    let _ = std::fs::remove_dir_all(&blob_dir);
    result
}

async fn seed_ground(
    ctx: &Ctx,
    db: &BenchDb,
    blob_dir: &std::path::Path,
    tenant: &str,
) -> anyhow::Result<ReadGround> {
    let files: u64 = ctx.size(1_000_000, 20_000);
    let customers: u64 = ctx.size(10_000, 200);
    let seeding = std::time::Instant::now();
    seed_files(db, tenant, files, customers).await?;
    seed_customers(db).await?;
    eprintln!(
        "bench: seeded {files} files of {customers} customers for {tenant} in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let blobs = blob::open(&BlobStoreSpec::Dir(blob_dir.to_owned())).await?;
    let app = App::spawn(&db.url, blobs, &[("DOSSIER_ROLES", "api,projections")]).await?;
    Ok(ReadGround {
        app: Arc::new(app),
        token: Arc::new(env::token(tenant, Role::Staff, None)),
        files,
        customers,
    })
}

async fn measure(ctx: &Ctx, ground: &ReadGround) -> anyhow::Result<Vec<Figure>> {
    let ReadGround {
        app,
        token,
        files,
        customers,
    } = ground;
    let (files, customers) = (*files, *customers);
    let list = {
        let (app, token) = (app.clone(), token.clone());
        move |client: usize, i: u64| {
            let (app, token) = (app.clone(), token.clone());
            async move {
                let mut rng = Rng::new((client as u64) << 32 | i);
                let customer = rng.below(customers);
                let filter = FILTERS[(i as usize + client) % FILTERS.len()];
                let response = app
                    .client
                    .get(app.url(&format!("/v1/customers/cust-{customer}/files?{filter}")))
                    .bearer_auth(token.as_str())
                    .send()
                    .await?;
                let status = response.status();
                anyhow::ensure!(status.is_success(), "list answered {status}");
                response.bytes().await?;
                Ok(())
            }
        }
    };
    let mut figures = Vec::new();
    for clients in [1usize, 8] {
        let warmup = ctx.size(Duration::from_secs(1), Duration::from_millis(200));
        let window = ctx.size(Duration::from_secs(8), Duration::from_secs(1));
        let load = stats::closed_loop(clients, warmup, window, list.clone())
            .await
            .with_context(|| format!("lists from {clients} clients"))?;
        let goal = if clients == 1 {
            Goal::AtMost(10.0)
        } else {
            Goal::Report
        };
        figures.push(
            Figure::new(SCENARIO, format!("p50, {clients} client(s)"), "ms")
                .ours(load.latencies.p50_ms())
                .goal(Goal::Report),
        );
        figures.push(
            Figure::new(SCENARIO, format!("p99, {clients} client(s)"), "ms")
                .ours(load.latencies.p99_ms())
                .note(format!(
                    "{} requests at {:.0}/s; {files} files, {customers} customers; filters rotate",
                    load.ops,
                    load.per_second()
                ))
                .goal(goal),
        );
    }
    Ok(figures)
}

/// COPYs `files` rows of `tenant` over `customers` customers (`cust-0`,
/// `cust-1`, ...) into the files read model, with the list index built after
/// the load.
async fn seed_files(db: &BenchDb, tenant: &str, files: u64, customers: u64) -> anyhow::Result<()> {
    let client = db.pool.get().await?;
    let index: String = client
        .query_one(
            "SELECT pg_get_indexdef('files_customer_newest_first'::regclass)",
            &[],
        )
        .await?
        .get(0);
    client
        .batch_execute("DROP INDEX files_customer_newest_first")
        .await?;
    let start = Utc
        .with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
        .single()
        .context("a date")?;
    let span_secs = 2 * 365 * 86_400;
    let mut rng = Rng::new(0x5eed);
    let rows = (0..files).map(move |n| {
        let id = seed::uuid(&mut rng);
        let customer = n % customers;
        let created = start + chrono::Duration::seconds(rng.below(span_secs) as i64);
        let visibility = ["internal", "portal", "portal_and_moving"][rng.below(3) as usize];
        let origin = ["staff_upload", "customer_upload", "contract", "product", "system"]
            [rng.below(5) as usize];
        let viewed = if visibility != "internal" && rng.below(2) == 0 {
            (created + chrono::Duration::days(1)).to_rfc3339()
        } else {
            "\\N".to_owned()
        };
        let contract = if origin == "contract" {
            format!("K-{}", rng.below(10))
        } else {
            "\\N".to_owned()
        };
        format!(
            "{id}\t{tenant}\tcust-{customer}\tDocument {n}\tdocument_{n}.pdf\tapplication/pdf\t{size}\t\
             9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\t{created}\t{visibility}\t\
             {origin}\t{viewed}\t\\N\t{contract}\t\\N\t{tenant}/cust-{customer}/{id}\t0\n",
            size = 10_000 + rng.below(5_000_000),
            created = created.to_rfc3339(),
        )
    });
    seed::copy_in(
        &db.pool,
        "COPY files (id, tenant, customer_id, name, file_name, content_type, size, sha256, \
         created_at, visibility, origin, viewed_at, signed_at, contract_id, task_id, blob_key, \
         last_position) FROM STDIN",
        rows,
    )
    .await
    .context("COPY into files")?;
    client.batch_execute(&index).await?;
    client.batch_execute("VACUUM ANALYZE files").await?;
    Ok(())
}

/// The customers read model as the projection would have it for the seeded
/// files: each customer's file count and newest upload as its last activity.
async fn seed_customers(db: &BenchDb) -> anyhow::Result<()> {
    let client = db.pool.get().await?;
    client
        .batch_execute(
            "INSERT INTO customers \
                 (tenant, customer_id, files, open_tasks, last_activity_at, last_position) \
             SELECT tenant, customer_id, count(*), 0, max(created_at), 0 \
             FROM files GROUP BY tenant, customer_id",
        )
        .await
        .context("seeding the customers read model")?;
    client.batch_execute("VACUUM ANALYZE customers").await?;
    Ok(())
}
