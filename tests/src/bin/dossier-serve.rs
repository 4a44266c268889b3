//! `dossier serve` as a separate process for end-to-end tests that must kill
//! Dossier (`kill -9`) in the middle of something: the same start-up as the
//! `dossier` binary ([`Application::build`] and `run_until_stopped`), configured
//! only from the environment (`DOSSIER_*`, `DOSSIER_ROLES` to pick the roles, and
//! the standard AWS variables for S3 credentials). Built by cargo with the tests,
//! so `env!("CARGO_BIN_EXE_dossier-serve")` always names a fresh build.

use anyhow::Context as _;
use dossier_api::startup::Application;
use dossier_runtime::config::Settings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    dossier_runtime::telemetry::init_tracing();
    let settings = Settings::from_env().context("reading the configuration")?;
    let app = Application::build(settings).await?;
    app.run_until_stopped(dossier_runtime::shutdown::signal())
        .await
}
