//! `dossier-s3-dev`: a local S3 server (s3s-fs on a directory) for manual use
//! and the benchmark. Thin wrapper around [`dossier_test_support::s3::spawn`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Serve an S3 API over HTTP from a local directory (buckets are directories).
#[derive(Debug, Parser)]
#[command(name = "dossier-s3-dev", version)]
struct Args {
    /// Directory holding the buckets; created if missing.
    #[arg(long, default_value = "./data/s3")]
    root: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    addr: SocketAddr,
    /// Access key clients must sign with.
    #[arg(long, default_value = dossier_test_support::s3::DEV_ACCESS_KEY)]
    access_key: String,
    /// Secret key clients must sign with.
    #[arg(long, default_value = dossier_test_support::s3::DEV_SECRET_KEY)]
    secret_key: String,
    /// Buckets to create at start (repeatable); Dossier can also create its own.
    #[arg(long = "bucket")]
    buckets: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = dossier_test_support::s3::spawn_with_credentials(
        args.root,
        args.addr,
        &args.access_key,
        &args.secret_key,
    )
    .await?;
    for bucket in &args.buckets {
        server.create_bucket_dir(bucket)?;
    }

    println!(
        "dossier-s3-dev: serving {} at {} (access key {:?}, region {}); Ctrl-C stops",
        server.root.display(),
        server.endpoint,
        server.access_key,
        dossier_test_support::s3::DEV_REGION,
    );
    // The development secret is public anyway; a secret of the caller's
    // choosing is not echoed.
    let secret = if server.secret_key == dossier_test_support::s3::DEV_SECRET_KEY {
        server.secret_key.as_str()
    } else {
        "<your secret key>"
    };
    println!(
        "  e.g. DOSSIER_BLOB_STORE=s3://dossier DOSSIER_S3_ENDPOINT={} AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={secret}",
        server.endpoint, server.access_key
    );

    tokio::signal::ctrl_c().await?;
    println!("dossier-s3-dev: stopping");
    server.shutdown().await;
    Ok(())
}
