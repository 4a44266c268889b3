//! `dossier-bench`, which `dossier bench` runs: a binary of its own so that the
//! production `dossier` never links the S3 dev server and the test harness the
//! benchmark brings up.

use anyhow::Context as _;
use clap::Parser;
use dossier_bench::BenchArgs;
use dossier_runtime::config::Settings;

#[derive(Parser)]
#[command(
    name = "dossier bench",
    about = "Measure speed and memory next to baselines of this machine."
)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env().context("reading the configuration")?;
    // `dossier-bench serve`: the server the upload_rss scenario measures, started
    // exactly as `dossier serve` starts it.
    if std::env::args().nth(1).as_deref() == Some("serve") {
        dossier_runtime::telemetry::init_tracing();
        let app = dossier_api::startup::Application::build(settings).await?;
        return app
            .run_until_stopped(dossier_runtime::shutdown::signal())
            .await;
    }
    let cli = Cli::parse();
    dossier_bench::main(&settings, cli.args).await
}
