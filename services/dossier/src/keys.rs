//! The data-protection commands: `dossier keys generate|rotate|status` and
//! `dossier blobs encrypt`. Argument parsing and output only; the work is done
//! by the library functions the tests call too (`dossier_keys::KeyStore`,
//! `dossier_workers::encrypt_blobs`).

use std::collections::BTreeMap;

use anyhow::Context as _;
use clap::Subcommand;
use dossier_eventlog::db::{self, Pool};
use dossier_keys::{KeyStore, MasterKey};
use dossier_runtime::config::Settings;
use serde_json::json;

/// `dossier keys`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print a new random master key (32 bytes, standard base64) for
    /// DOSSIER_MASTER_KEY.
    Generate,
    /// Re-wrap every data key under DOSSIER_MASTER_KEY (the new master key);
    /// keys under DOSSIER_MASTER_KEY_PREVIOUS (the old one) unwrap for it. No
    /// blob and no event is touched. Prints how many keys were re-wrapped.
    Rotate,
    /// How many live data keys each master key wraps (by master key id).
    Status,
}

/// The main database (migrated) and the key table the settings name.
async fn open(settings: &Settings) -> anyhow::Result<(Pool, KeyStore)> {
    let pool = db::connect(&settings.database_url, 4).await?;
    db::migrate(&pool).await?;
    let keys = dossier_api::startup::open_key_store(settings, &pool).await?;
    Ok((pool, keys))
}

/// Runs `dossier keys ...`; JSON on stdout.
pub async fn keys(settings: &Settings, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Generate => {
            let (key, text) = MasterKey::generate();
            eprintln!(
                "a new master key, id {}: keep it secret, set it as DOSSIER_MASTER_KEY",
                key.id()
            );
            println!("{text}");
        }
        KeysCommand::Rotate => {
            let (_, keys) = open(settings).await?;
            let rewrapped = keys
                .rotate()
                .await
                .context("re-wrapping the data keys under DOSSIER_MASTER_KEY")?;
            println!(
                "{}",
                json!({"rewrapped": rewrapped, "master_key_id": keys.master_key_id()})
            );
        }
        KeysCommand::Status => {
            let (_, keys) = open(settings).await?;
            let live: BTreeMap<String, i64> = keys
                .count_by_master()
                .await
                .context("counting the data keys")?
                .into_iter()
                .collect();
            println!(
                "{}",
                json!({"master_key_id": keys.master_key_id(), "live_keys": live})
            );
        }
    }
    Ok(())
}

/// `dossier blobs encrypt`: seals every live file's blob stored before
/// encryption; exits 1 if a blob is missing or could not be sealed.
pub async fn encrypt_blobs(settings: &Settings) -> anyhow::Result<()> {
    let (pool, keys) = open(settings).await?;
    let blobs = dossier_api::startup::open_sealed_blob_store(settings, &keys).await?;
    let report = dossier_workers::encrypt_blobs(&pool, &blobs).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report.is_clean() {
        std::process::exit(1);
    }
    Ok(())
}
