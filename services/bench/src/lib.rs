//! `dossier bench`: speed and memory, measured next to what the machine can do.
//!
//! Every figure is ours next to a baseline measured in the same run on the same
//! machine (the same Postgres, RabbitMQ and S3 server doing the least work that
//! the same job needs), and their ratio against the goal of issue 7. Scenarios:
//!
//! | scenario | module |
//! |---|---|
//! | `upload`: 25 MiB over HTTP vs. PutObject | [`upload`] |
//! | `sealed_blobs`: put and get through the sealing decorator vs. without it | [`sealed`] |
//! | `commands` and `projection_lag`: renames vs. INSERT+COMMIT | [`commands`] |
//! | `postgres_es`: the same commands on cqrs-es + postgres-es (feature) | [`postgres_es`] |
//! | `list`: filtered lists of a tenant with 1,000,000 files | [`list`] |
//! | `console`: a customer's Files tab page vs. its JSON list, and the customers list | [`console`] |
//! | `rebuild`: projection rebuild vs. COPY of the same events | [`rebuild`] |
//! | `zip_bundle`: bundle of 100 × 1 MiB vs. GET+PUT and the zip tool | [`bundle`] |
//! | `upload_rss`: peak RSS of `dossier serve` under 32 uploads | [`rss`] |
//! | `amqp_intake`: 1 KiB uploads over AMQP vs. publish with confirms | [`intake`] |
//!
//! Each scenario brings up what it needs for itself (a database
//! `dossier_bench_<uuid>`, a RabbitMQ vhost, an in-process S3 server on a
//! temporary directory, the real [`dossier_api::startup::Application`]) and
//! removes it again, failed or not. `--quick` runs each one small, to keep the
//! benchmark from rotting (the test suite runs it); its numbers mean little.

mod bundle;
mod commands;
mod console;
mod env;
mod intake;
mod list;
mod postgres_es;
mod rebuild;
mod report;
mod rss;
mod sealed;
mod seed;
mod stats;
mod upload;

use std::time::Instant;

use dossier_runtime::config::Settings;

use report::Figure;

/// `dossier bench [--quick] [--json] [--scenario NAME]...`
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Every scenario small enough to finish in well under two minutes.
    #[arg(long)]
    pub quick: bool,
    /// JSON on stdout (one object per figure) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run only this scenario (repeatable): upload, sealed_blobs, commands,
    /// postgres_es, list, console, rebuild, zip_bundle, upload_rss, amqp_intake.
    #[arg(long = "scenario", value_name = "NAME")]
    pub scenarios: Vec<String>,
    /// Store on this S3 server instead of the in-process s3s-fs (e.g. Garage
    /// at http://127.0.0.1:3900); every scenario that stores blobs uses it,
    /// under a prefix of its own in `--s3-bucket`, deleted afterwards.
    #[arg(long, env = "DOSSIER_BENCH_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// The bucket on `--s3-endpoint` (it must exist).
    #[arg(long, env = "DOSSIER_BENCH_S3_BUCKET", default_value = "dossier")]
    pub s3_bucket: String,
    /// The region `--s3-endpoint` wants requests signed for.
    #[arg(long, env = "DOSSIER_BENCH_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// The access key for `--s3-endpoint` (from the environment only).
    #[arg(skip = std::env::var("DOSSIER_BENCH_S3_ACCESS_KEY").ok())]
    pub s3_access_key: Option<String>,
    /// The secret key for `--s3-endpoint` (from the environment only).
    #[arg(skip = std::env::var("DOSSIER_BENCH_S3_SECRET_KEY").ok())]
    pub s3_secret_key: Option<String>,
}

impl BenchArgs {
    /// The external S3 server asked for, if any.
    fn external_s3(&self) -> anyhow::Result<Option<env::ExternalS3>> {
        let Some(endpoint) = &self.s3_endpoint else {
            return Ok(None);
        };
        let (Some(access_key), Some(secret_key)) = (&self.s3_access_key, &self.s3_secret_key)
        else {
            anyhow::bail!(
                "--s3-endpoint needs DOSSIER_BENCH_S3_ACCESS_KEY and DOSSIER_BENCH_S3_SECRET_KEY"
            );
        };
        Ok(Some(env::ExternalS3 {
            endpoint: endpoint.clone(),
            region: self.s3_region.clone(),
            bucket: self.s3_bucket.clone(),
            access_key: access_key.clone(),
            secret_key: secret_key.clone(),
        }))
    }
}

/// The `dossier bench` command: runs on the Postgres server of
/// `DOSSIER_DATABASE_URL` (a database of its own per scenario), the RabbitMQ on
/// 127.0.0.1:5672 with its management API on 15672 (a vhost of its own;
/// `DOSSIER_TEST_AMQP_ADDR` and `DOSSIER_TEST_RABBITMQ_MANAGEMENT` move them,
/// as for the tests), and S3 servers of its own unless `--s3-endpoint` names
/// one. Fails if a scenario failed.
pub async fn main(settings: &Settings, args: BenchArgs) -> anyhow::Result<()> {
    let s3 = args.external_s3()?;
    let outcome = run(Options {
        s3,
        quick: args.quick,
        json: args.json,
        only: args.scenarios,
        database_url: settings.database_url.clone(),
    })
    .await?;
    anyhow::ensure!(
        outcome.failed.is_empty(),
        "scenarios failed: {}",
        outcome.failed.join(", ")
    );
    Ok(())
}

/// Every scenario, in the order they run. `commands` also reports the
/// `projection_lag` figures (measured under its load).
pub const SCENARIOS: [&str; 10] = [
    "upload",
    "sealed_blobs",
    "commands",
    "postgres_es",
    "list",
    "console",
    "rebuild",
    "zip_bundle",
    "upload_rss",
    "amqp_intake",
];

/// What `dossier bench` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Small sizes and short runs (well under two minutes in all).
    pub quick: bool,
    /// JSON on stdout instead of a table.
    pub json: bool,
    /// Only these scenarios (all when empty).
    pub only: Vec<String>,
    /// A Postgres URL of the server to use; the database name is replaced by a
    /// fresh `dossier_bench_<uuid>` per scenario.
    pub database_url: String,
    /// The S3 server to store on instead of the in-process s3s-fs.
    pub s3: Option<env::ExternalS3>,
}

/// What every scenario gets: the size to run at and where the services are.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub quick: bool,
    pub database_url: String,
    /// `None`: each scenario runs s3s-fs in process.
    pub s3: Option<env::ExternalS3>,
}

impl Ctx {
    /// `full` normally, `quick` with `--quick`.
    pub fn size<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}

/// Runs the chosen scenarios and prints the report. Errors only for bad
/// options; a failed scenario is reported in its figures and makes the exit
/// code non-zero through [`Outcome::failed`].
pub async fn run(options: Options) -> anyhow::Result<Outcome> {
    for name in &options.only {
        anyhow::ensure!(
            SCENARIOS.contains(&name.as_str()),
            "unknown scenario {name:?}; choose from {}",
            SCENARIOS.join(", ")
        );
    }
    let ctx = Ctx {
        quick: options.quick,
        database_url: options.database_url.clone(),
        s3: options.s3.clone(),
    };
    let started = Instant::now();
    let load_at_start = report::load_average();
    let mut figures = Vec::new();
    let mut failed = Vec::new();
    for name in SCENARIOS {
        if !options.only.is_empty() && !options.only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("bench: {name} ...");
        let scenario_started = Instant::now();
        let result = match name {
            "upload" => upload::run(&ctx).await,
            "sealed_blobs" => sealed::run(&ctx).await,
            "commands" => commands::run(&ctx).await,
            "postgres_es" => postgres_es::run(&ctx).await,
            "list" => list::run(&ctx).await,
            "console" => console::run(&ctx).await,
            "rebuild" => rebuild::run(&ctx).await,
            "zip_bundle" => bundle::run(&ctx).await,
            "upload_rss" => rss::run(&ctx).await,
            "amqp_intake" => intake::run(&ctx).await,
            _ => unreachable!("SCENARIOS lists only names matched here"),
        };
        match result {
            Ok(mut found) => {
                eprintln!(
                    "bench: {name} done in {:.1} s",
                    scenario_started.elapsed().as_secs_f64()
                );
                figures.append(&mut found);
            }
            Err(error) => {
                eprintln!("bench: {name} failed: {error:#}");
                failed.push(name);
                figures.push(Figure::failed(name, &format!("{error:#}")));
            }
        }
    }
    let s3_server = match &options.s3 {
        None => "s3s-fs in process".to_owned(),
        Some(s3) => format!("{} (bucket {})", s3.endpoint, s3.bucket),
    };
    let report = report::Report::new(
        options.quick,
        s3_server,
        figures,
        started.elapsed(),
        load_at_start,
    );
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(Outcome { failed })
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    /// The scenarios that failed (their figures say why).
    pub failed: Vec<&'static str>,
}
