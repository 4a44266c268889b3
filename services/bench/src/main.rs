//! `dossier-bench`, which `dossier bench` runs: a binary of its own so that the
//! production `dossier` never links the S3 dev server and the test harness the
//! benchmark brings up.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dossier_bench::BenchArgs;
use dossier_runtime::config::Settings;

#[derive(Parser)]
#[command(
    name = "dossier bench",
    about = "Measure speed and memory next to baselines of this machine.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    args: BenchArgs,
}

#[derive(Subcommand)]
enum Role {
    /// The server the `upload_rss` scenario measures, started by the benchmark
    /// as a child of its own build: `dossier serve`'s start-up, configured from
    /// the environment.
    #[command(hide = true)]
    Serve,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Role::Serve) = cli.role {
        return dossier_test_support::process::serve_from_env().await;
    }
    let settings = Settings::from_env().context("reading the configuration")?;
    dossier_bench::main(&settings, cli.args).await
}
