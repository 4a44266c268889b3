//! `postgres_es`: the same renames through cqrs-es on postgres-es (sqlx),
//! against the same framework on our event store, both without HTTP and
//! without waiting for read models, at 1, 16 and 64 concurrent clients.
//! Built only with the `postgres-es` cargo feature (off by default, never in
//! CI: it pulls in sqlx).
//!
//! Both stores get a pool of 32 connections (the server's) on the same
//! database: ours its migrated `events`, postgres-es the schema of its README
//! under the names `pges_events` / `pges_snapshots`. Files are seeded through
//! each repository; each client renames files of its own.

use super::Ctx;
use super::report::Figure;

const SCENARIO: &str = "postgres_es";

#[cfg(not(feature = "postgres-es"))]
pub async fn run(_ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    Ok(vec![
        Figure::new(SCENARIO, "renames through cqrs-es", "cmd/s")
            .note("not built: cargo build --release --features postgres-es --bin dossier"),
    ])
}

#[cfg(feature = "postgres-es")]
pub use with_postgres_es::run;

#[cfg(feature = "postgres-es")]
mod with_postgres_es {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::Context as _;
    use cqrs_es::CqrsFramework;
    use cqrs_es::persist::{PersistedEventRepository, PersistedEventStore, SerializedEvent};
    use dossier_api::commands::{CommandContext, Commands};
    use dossier_domain::{Actor, DisplayName, File, FileCommand, FileId, FilePolicy, TenantId};
    use dossier_eventlog::eventstore::{META_ACTOR, META_TENANT, PgEventStore};
    use postgres_es::PostgresEventRepository;
    use uuid::Uuid;

    use super::super::env::{self, BenchDb};
    use super::super::report::Goal;
    use super::super::seed;
    use super::super::stats;
    use super::*;

    const TENANT: &str = "bench-pges";
    const POOL: u32 = 32;

    /// postgres-es' schema (its README's `db/init.sql`), renamed.
    const SCHEMA: &str = "
        CREATE TABLE pges_events (
            aggregate_type text NOT NULL, aggregate_id text NOT NULL,
            sequence bigint CHECK (sequence >= 0) NOT NULL,
            event_type text NOT NULL, event_version text NOT NULL,
            payload json NOT NULL, metadata json NOT NULL,
            PRIMARY KEY (aggregate_type, aggregate_id, sequence));
        CREATE TABLE pges_snapshots (
            aggregate_type text NOT NULL, aggregate_id text NOT NULL,
            last_sequence bigint CHECK (last_sequence >= 0) NOT NULL,
            current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
            payload json NOT NULL,
            PRIMARY KEY (aggregate_type, aggregate_id, last_sequence));";

    type PgesFramework = CqrsFramework<File, PersistedEventStore<PostgresEventRepository, File>>;

    pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
        let db = env::database(ctx, POOL as usize).await?;
        let result = measure(ctx, &db).await;
        env::remove_database(db).await;
        result
    }

    async fn measure(ctx: &Ctx, db: &BenchDb) -> anyhow::Result<Vec<Figure>> {
        let warmup = ctx.size(Duration::from_secs(2), Duration::from_millis(300));
        let window = ctx.size(Duration::from_secs(10), Duration::from_millis(1500));
        let file_count = ctx.size(4096, 256);
        db.pool.get().await?.batch_execute(SCHEMA).await?;

        let sqlx_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(POOL)
            .connect(&db.url)
            .await
            .context("connecting sqlx")?;
        let repository = PostgresEventRepository::new(sqlx_pool.clone())
            .with_tables("pges_events", "pges_snapshots");

        let files: Vec<(Uuid, String)> = (0..file_count)
            .map(|i| (Uuid::new_v4(), format!("cust-{}", i % 100)))
            .collect();
        let store = PgEventStore::new(db.pool.clone());
        seed::append_uploads(&store, TENANT, &files).await?;
        let now = chrono::Utc::now();
        for chunk in files.chunks(500) {
            let events: Vec<SerializedEvent> = chunk
                .iter()
                .map(|(id, customer)| {
                    seed::serialized(
                        TENANT,
                        *id,
                        1,
                        "FileUploaded",
                        "2",
                        seed::uploaded_payload(TENANT, customer, *id, "Seeded file", now),
                    )
                })
                .collect();
            repository
                .persist::<File>(&events, None)
                .await
                .map_err(|e| anyhow::anyhow!("seeding postgres-es: {e}"))?;
        }

        let ids: Arc<Vec<Uuid>> = Arc::new(files.iter().map(|(id, _)| *id).collect());
        let tenant = TenantId::parse(TENANT)?;
        let commands = Arc::new(Commands::new(store, FilePolicy::default(), vec![]));
        let pges: Arc<PgesFramework> = Arc::new(CqrsFramework::new(
            PersistedEventStore::new_event_store(repository),
            vec![],
            FilePolicy::default(),
        ));

        let mut figures = Vec::new();
        for clients in [1usize, 16, 64] {
            let ours = stats::closed_loop(clients, warmup, window, {
                let (commands, ids, tenant) = (commands.clone(), ids.clone(), tenant.clone());
                move |client, i| {
                    let (commands, ids, tenant) = (commands.clone(), ids.clone(), tenant.clone());
                    async move {
                        let id = ids[(client + i as usize * clients) % ids.len()];
                        let context = CommandContext::new(tenant.clone(), Actor::new("bench"));
                        commands
                            .file_no_wait(&context, FileId(id), rename(&tenant, client, i)?)
                            .await
                            .map_err(|e| anyhow::anyhow!("our rename: {e}"))?;
                        Ok(())
                    }
                }
            })
            .await?;
            let theirs = stats::closed_loop(clients, warmup, window, {
                let (pges, ids, tenant) = (pges.clone(), ids.clone(), tenant.clone());
                move |client, i| {
                    let (pges, ids, tenant) = (pges.clone(), ids.clone(), tenant.clone());
                    async move {
                        let id = ids[(client + i as usize * clients) % ids.len()];
                        let metadata = HashMap::from([
                            (META_TENANT.to_owned(), TENANT.to_owned()),
                            (META_ACTOR.to_owned(), "bench".to_owned()),
                        ]);
                        pges.execute_with_metadata(
                            &id.to_string(),
                            rename(&tenant, client, i)?,
                            metadata,
                        )
                        .await
                        .map_err(|e| anyhow::anyhow!("postgres-es rename: {e}"))?;
                        Ok(())
                    }
                }
            })
            .await?;
            figures.push(
                Figure::new(SCENARIO, format!("renames, {clients} clients"), "cmd/s")
                    .ours(theirs.per_second())
                    .baseline(
                        ours.per_second(),
                        "our PgEventStore under the same cqrs-es framework, no HTTP",
                    )
                    .note(format!(
                        "p99 {:.1} ms with postgres-es, {:.1} ms with ours",
                        theirs.latencies.p99_ms(),
                        ours.latencies.p99_ms()
                    ))
                    .goal(Goal::Report),
            );
        }
        sqlx_pool.close().await;
        Ok(figures)
    }

    fn rename(tenant: &TenantId, client: usize, i: u64) -> anyhow::Result<FileCommand> {
        Ok(FileCommand::Rename {
            tenant: tenant.clone(),
            name: DisplayName::parse(&format!("Renamed {client}-{i}"))?,
        })
    }
}
