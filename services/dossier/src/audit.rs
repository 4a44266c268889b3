//! The auditors' commands: `dossier replay`, `dossier verify` and
//! `dossier projections rebuild`. Argument parsing, output and progress bars
//! only; the work is done by the library functions the tests call
//! (`dossier_projections::replay`, `dossier_eventlog::chain::verify`,
//! `dossier_projections::registry`).
//!
//! Progress bars go to stderr, and only when stderr is a terminal and the
//! output (stdout) is not: on a terminal the lines themselves show progress,
//! and a pipe or a log file gets no bar at all.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use dossier_eventlog::chain::{self, Checkpoint};
use dossier_eventlog::db::{self, Pool};
use dossier_eventlog::personal::FieldCipher;
use dossier_projections::RebuildOptions;
use dossier_projections::registry;
use dossier_projections::replay::{self, ReplayFilter, ReplayProgress};
use dossier_runtime::config::Settings;
use indicatif::{ProgressBar, ProgressStyle};

/// `dossier replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Only this tenant's events.
    #[arg(long)]
    tenant: Option<String>,
    /// Only events about this customer (needs --tenant): those naming it and
    /// every event of its files.
    #[arg(long, requires = "tenant")]
    customer: Option<String>,
    /// Only events about this file: its own events and its downloads.
    #[arg(long)]
    file: Option<String>,
    /// Only events at or after this time (RFC 3339, or YYYY-MM-DD: that day's start).
    #[arg(long)]
    from: Option<String>,
    /// Only events at or before this time (RFC 3339, or YYYY-MM-DD: that day's end).
    #[arg(long)]
    to: Option<String>,
    /// Instead of events, print the customer's file list as it stood at this
    /// time (RFC 3339, or YYYY-MM-DD: that day's end), one File per line,
    /// rebuilt from the events alone. Needs --tenant and --customer.
    #[arg(long, requires_all = ["tenant", "customer"], conflicts_with_all = ["file", "from", "to"])]
    as_of: Option<String>,
    /// Print personal fields readable instead of as stored (`enc:v1:...`); a
    /// field whose key is destroyed is then null and named under "erased".
    /// Needs the master key (DOSSIER_MASTER_KEY).
    #[arg(long)]
    decrypt: bool,
}

/// `dossier verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The tenant whose chain to recompute.
    #[arg(long)]
    tenant: String,
    /// A checkpoint kept outside the database (a JSON object as the audit worker
    /// logs it, or a file of such lines); compared with the chain too.
    #[arg(long)]
    checkpoint: Vec<PathBuf>,
}

/// `dossier projections ...`.
#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Rebuild read models from the log while the service runs: each is built
    /// aside, then swapped in. Without a name, every read model.
    Rebuild {
        /// One read model (see `dossier projections list`).
        name: Option<String>,
    },
    /// Name every read model.
    List,
}

async fn connect(settings: &Settings) -> anyhow::Result<Pool> {
    let pool = db::connect(&settings.database_url, 4)
        .await
        .context("connecting to Postgres")?;
    db::migrate(&pool).await.context("applying migrations")?;
    Ok(pool)
}

/// What opens personal fields: the data keys under the configured master key.
async fn cipher(settings: &Settings, pool: &Pool) -> anyhow::Result<Arc<FieldCipher>> {
    let keys = dossier_api::startup::open_key_store(settings, pool).await?;
    Ok(dossier_api::startup::field_cipher(settings, &keys, pool))
}

/// A progress bar on stderr, or a hidden one (see the module docs).
fn progress_bar(message: &str, length: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() || std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(length);
    let style = ProgressStyle::with_template(
        "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} ({eta} left)",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn track(bar: &ProgressBar) -> impl Fn(ReplayProgress) + '_ {
    move |progress: ReplayProgress| {
        bar.set_length(u64::try_from(progress.end).unwrap_or_default());
        bar.set_position(u64::try_from(progress.position).unwrap_or_default());
    }
}

fn time(
    raw: Option<&str>,
    flag: &str,
    end_of_day: bool,
) -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
    raw.map(|raw| replay::parse_time(raw, end_of_day).map_err(|e| anyhow::anyhow!("--{flag}: {e}")))
        .transpose()
}

/// `dossier replay`: JSON lines to stdout, constant memory.
pub async fn replay(settings: &Settings, args: ReplayArgs) -> anyhow::Result<()> {
    let pool = connect(settings).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    if let Some(as_of) = &args.as_of {
        let at = replay::parse_time(as_of, true).map_err(|e| anyhow::anyhow!("--as-of: {e}"))?;
        let (Some(tenant), Some(customer)) = (&args.tenant, &args.customer) else {
            anyhow::bail!("--as-of needs --tenant and --customer");
        };
        let cipher = cipher(settings, &pool).await?;
        let bar = progress_bar("rebuilding", 0);
        let files =
            replay::files_as_of(&pool, Some(&cipher), tenant, customer, at, &track(&bar)).await?;
        bar.finish_and_clear();
        for file in &files {
            serde_json::to_writer(&mut out, &replay::as_of_line(file))?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        return Ok(());
    }
    let filter = ReplayFilter {
        tenant: args.tenant,
        customer: args.customer,
        file: args.file,
        from: time(args.from.as_deref(), "from", false)?,
        to: time(args.to.as_deref(), "to", true)?,
    };
    let decrypt = match args.decrypt {
        true => Some(cipher(settings, &pool).await?),
        false => None,
    };
    let bar = progress_bar("replaying", 0);
    let report = replay::replay(&pool, &filter, decrypt.as_deref(), &mut out, &track(&bar)).await?;
    bar.finish_and_clear();
    tracing::debug!(
        read = report.read,
        written = report.written,
        end = report.end,
        "replay done"
    );
    Ok(())
}

/// Reads checkpoints kept elsewhere: one JSON object per file, or one per line.
fn external_checkpoints(paths: &[PathBuf]) -> anyhow::Result<Vec<Checkpoint>> {
    let mut checkpoints = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the checkpoint file {}", path.display()))?;
        if let Ok(one) = serde_json::from_str::<Checkpoint>(&text) {
            checkpoints.push(one);
            continue;
        }
        for (number, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let checkpoint = serde_json::from_str::<Checkpoint>(line).with_context(|| {
                format!("{} line {}: not a checkpoint", path.display(), number + 1)
            })?;
            checkpoints.push(checkpoint);
        }
    }
    Ok(checkpoints)
}

/// `dossier verify --tenant T`: prints the report as JSON; exit code 1 when
/// something does not match.
pub async fn verify(settings: &Settings, args: VerifyArgs) -> anyhow::Result<()> {
    if settings.checkpoint_key_is_default() {
        tracing::warn!(
            "DOSSIER_CHECKPOINT_KEY is not set: checking checkpoints against the public \
             development key, which proves nothing"
        );
    }
    let external = external_checkpoints(&args.checkpoint)?;
    let pool = connect(settings).await?;
    let report = chain::verify(
        &pool,
        &args.tenant,
        settings.checkpoint_key.expose_bytes(),
        &external,
    )
    .await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    match &report.problem {
        None => {
            eprintln!(
                "ok: {} events of tenant {}, {} sealed, {} not sealed yet, {} checkpoint(s) matched",
                report.events,
                report.tenant,
                report.sealed,
                report.unsealed,
                report.checkpoints.len()
            );
            Ok(())
        }
        Some(problem) => {
            eprintln!("NOT OK: {}", problem.message);
            std::process::exit(1);
        }
    }
}

/// `dossier projections ...`.
pub async fn projections(settings: &Settings, command: ProjectionsCommand) -> anyhow::Result<()> {
    match command {
        ProjectionsCommand::List => {
            for registered in registry::all() {
                println!("{}", registered.name());
            }
            Ok(())
        }
        ProjectionsCommand::Rebuild { name } => {
            let chosen = match name {
                None => registry::all(),
                Some(name) => vec![registry::find(&name).ok_or_else(|| {
                    let known: Vec<&str> = registry::all().iter().map(|r| r.name()).collect();
                    anyhow::anyhow!("no read model {name:?}; known: {}", known.join(", "))
                })?],
            };
            let pool = connect(settings).await?;
            let options = RebuildOptions::default().opening_with(cipher(settings, &pool).await?);
            for registered in chosen {
                let bar = if std::io::stderr().is_terminal() {
                    let bar = ProgressBar::new(0);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} positions",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.set_message(registered.name());
                    bar.enable_steady_tick(Duration::from_millis(200));
                    bar
                } else {
                    ProgressBar::hidden()
                };
                let progress = {
                    let bar = bar.clone();
                    move |progress: dossier_projections::RebuildProgress| {
                        bar.set_length(u64::try_from(progress.head).unwrap_or_default());
                        bar.set_position(u64::try_from(progress.position).unwrap_or_default());
                    }
                };
                let report = registered
                    .rebuild(&pool, options.clone(), &progress)
                    .await
                    .with_context(|| format!("rebuilding {}", registered.name()))?;
                bar.finish_and_clear();
                println!(
                    "{}: rebuilt from {} events, swapped in at position {}",
                    registered.name(),
                    report.events,
                    report.position
                );
            }
            Ok(())
        }
    }
}
