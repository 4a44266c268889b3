//! The `dossier` command line. Thin on purpose: every command calls a library
//! function that the tests use too.

mod audit;
mod keys;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dossier_api::auth::jwt::{self, Claims, Role};
use dossier_eventlog::db;
use dossier_runtime::config::{Components, Settings};
use dossier_runtime::telemetry;

#[derive(Parser)]
#[command(
    name = "dossier",
    version,
    about = "Every customer's documents, event sourced."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: HTTP API, command intake, relay, workers and projections
    /// (all by default; `--role` picks a subset for scaling out).
    Serve {
        /// Comma list of api, intake, relay, workers, projections (or all);
        /// overrides DOSSIER_ROLES.
        #[arg(long)]
        role: Option<Components>,
    },
    /// Apply the database migrations and exit.
    Migrate,
    /// Blob store maintenance.
    Blobs {
        #[command(subcommand)]
        command: BlobsCommand,
    },
    /// The event log as JSON lines (the contract's Event), filtered by tenant,
    /// customer, file and time; or, with --as-of, a customer's file list as it
    /// stood then.
    Replay(audit::ReplayArgs),
    /// Recompute a tenant's hash chain and compare it with its seals and its
    /// signed checkpoints; names the first event that does not match (exit 1).
    Verify(audit::VerifyArgs),
    /// Master and data keys: generate a master key, rotate to it, status.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Read-model maintenance: rebuild from the log while the service runs.
    Projections {
        #[command(subcommand)]
        command: audit::ProjectionsCommand,
    },
    /// Measure speed and memory next to baselines of this machine (a table, or
    /// JSON with --json); --quick runs every scenario small. Runs the
    /// `dossier-bench` binary that is built beside this one (`cargo build
    /// --release --bins`), so that production never links what it brings up.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print a bearer token for calling the API.
    Token {
        #[arg(long)]
        tenant: String,
        /// staff, customer, auditor or system
        #[arg(long)]
        role: String,
        #[arg(long)]
        sub: String,
        /// The customer id (required for role customer).
        #[arg(long)]
        customer: Option<String>,
        /// How long the token lives, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Subcommand)]
enum BlobsCommand {
    /// Re-hash every live file's blob against its recorded SHA-256 and report
    /// mismatches and missing blobs (exit code 1 if any).
    Verify,
    /// Seal, in place, every live file's blob stored before encryption (run
    /// again, it finds nothing to do); exit code 1 if a blob is missing or
    /// could not be sealed.
    Encrypt,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut settings = Settings::from_env().context("reading the configuration")?;
    match cli.command {
        Command::Serve { role } => {
            telemetry::init_tracing();
            telemetry::log_panics_without_their_messages();
            if let Some(components) = role {
                settings.components = components;
            }
            // Application::build logs the settings' start-up warnings (development
            // secrets), for this binary and the end-to-end tests alike.
            let app = dossier_api::startup::Application::build(settings).await?;
            app.run_until_stopped(dossier_runtime::shutdown::signal())
                .await
        }
        Command::Migrate => {
            telemetry::init_tracing();
            let pool = db::connect(&settings.database_url, 2).await?;
            db::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Blobs {
            command: BlobsCommand::Verify,
        } => {
            telemetry::init_tracing();
            let pool = db::connect(&settings.database_url, 4).await?;
            db::migrate(&pool).await?;
            let keys = dossier_api::startup::open_key_store(&settings, &pool).await?;
            let blobs = dossier_api::startup::open_sealed_blob_store(&settings, &keys).await?;
            let report = dossier_workers::verify_blobs(&pool, &blobs).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.is_clean() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Blobs {
            command: BlobsCommand::Encrypt,
        } => {
            telemetry::init_tracing();
            keys::encrypt_blobs(&settings).await
        }
        Command::Keys { command } => {
            telemetry::init_tracing();
            keys::keys(&settings, command).await
        }
        Command::Replay(args) => {
            telemetry::init_tracing();
            audit::replay(&settings, args).await
        }
        Command::Verify(args) => {
            telemetry::init_tracing();
            audit::verify(&settings, args).await
        }
        Command::Projections { command } => {
            telemetry::init_tracing();
            audit::projections(&settings, command).await
        }
        Command::Bench { args } => run_bench(args),
        Command::Token {
            tenant,
            role,
            sub,
            customer,
            ttl,
        } => {
            let role: Role = serde_json::from_value(serde_json::Value::String(role.clone()))
                .map_err(|_| {
                    anyhow::anyhow!(
                        "--role must be staff, customer, auditor or system, not {role:?}"
                    )
                })?;
            if role == Role::Customer && customer.is_none() {
                anyhow::bail!("--customer is required for role customer");
            }
            let ttl = parse_ttl(&ttl)?;
            let now = chrono::Utc::now().timestamp();
            let claims = Claims {
                sub,
                tenant,
                role,
                customer,
                exp: now + ttl.as_secs() as i64,
                iat: Some(now),
            };
            println!(
                "{}",
                jwt::issue(settings.jwt_secret.expose_bytes(), &claims)
            );
            Ok(())
        }
    }
}

/// `90s`, `30m`, `1h`, `7d`, or plain seconds.
fn parse_ttl(raw: &str) -> anyhow::Result<Duration> {
    let raw = raw.trim();
    let (number, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("--ttl: expected a number with s, m, h or d, got {raw:?}"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => anyhow::bail!("--ttl: unknown unit {unit:?}; use s, m, h or d"),
    };
    Ok(Duration::from_secs(seconds))
}

/// `dossier bench ARGS`: runs `dossier-bench ARGS` from this binary's folder and
/// exits with its status.
fn run_bench(args: Vec<String>) -> anyhow::Result<()> {
    let here = std::env::current_exe().context("finding the dossier binary")?;
    let bench = here.with_file_name(format!("dossier-bench{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        bench.exists(),
        "{} is not built: run `cargo build --release --bins` (the benchmark is a binary of its own)",
        bench.display()
    );
    let status = std::process::Command::new(&bench)
        .args(args)
        .status()
        .with_context(|| format!("running {}", bench.display()))?;
    std::process::exit(status.code().unwrap_or(1));
}
