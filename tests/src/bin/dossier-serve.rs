//! `dossier serve` as a separate process for end-to-end tests that must kill
//! Dossier (`kill -9`) in the middle of something: the same start-up as the
//! `dossier` binary, configured only from the environment (see
//! [`dossier_test_support::process::serve_from_env`]). Built by cargo with the
//! tests, so `env!("CARGO_BIN_EXE_dossier-serve")` always names a fresh build.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    dossier_test_support::process::serve_from_env().await
}
