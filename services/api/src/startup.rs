//! Start-up: builds every part of one process from [`Settings`] and runs the
//! chosen roles side by side until shutdown.
//!
//! `dossier serve` and the end-to-end tests both come through here, so what
//! the tests run is what production runs. Each role is a task of its own; a
//! role that stops on its own is reported and stops the process (a silently
//! dead projector would break read-your-writes without anyone noticing).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dossier_application::{Commands, Uploads};
use dossier_blobstore::{self as blob, BlobStore, BlobStoreSpec, S3Options, SealedBlobStore};
use dossier_broker::{Broker, BrokerOptions};
use dossier_domain::{FilePolicy, MaxFileBytes};
use dossier_eventlog::db::{self, Pool};
use dossier_eventlog::eventstore::PgEventStore;
use dossier_eventlog::log::LogReader;
use dossier_eventlog::personal::FieldCipher;
use dossier_keys::{KeyStore, MasterKey, MasterKeys};
use dossier_projections::BundlesProjection;
use dossier_projections::{
    CustomersProjection, FilesProjection, FollowerConfig, Freshness, PortalProjection, Projection,
    Runner, RunnerConfig,
};
use dossier_runtime::config::{BlobStoreLocation, Component, Settings};
use dossier_runtime::telemetry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::intake::Intake;
use crate::state::{AppState, Inner};

/// How long a graceful shutdown waits for the roles to finish what they hold.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Connections a process keeps to Postgres.
const POOL_SIZE: usize = 32;

/// Opens the blob store the settings name, as it is: what it holds is
/// ciphertext, so every reader and writer goes through
/// [`open_sealed_blob_store`] (or [`Application::build_with_blobs`], which
/// seals what it is given). Credentials for S3 come the standard AWS way
/// (environment, profile, instance role).
pub async fn open_blob_store(settings: &Settings) -> anyhow::Result<Arc<dyn BlobStore>> {
    let spec = match &settings.blob_store {
        BlobStoreLocation::Dir(root) => BlobStoreSpec::Dir(root.clone()),
        BlobStoreLocation::S3 { bucket, prefix } => BlobStoreSpec::S3(S3Options {
            bucket: bucket.clone(),
            prefix: prefix.clone(),
            endpoint: settings.s3_endpoint.clone(),
            region: settings.s3_region.clone(),
            access_key: None,
            secret_key: None,
            create_bucket_if_missing: false,
        }),
    };
    blob::open(&spec)
        .await
        .with_context(|| format!("opening the blob store {}", settings.blob_store))
}

/// The blob store the settings name, sealed under the data keys of `keys`
/// (the command line's blob commands; the service seals in
/// [`Application::build_with_blobs`]).
pub async fn open_sealed_blob_store(
    settings: &Settings,
    keys: &KeyStore,
) -> anyhow::Result<SealedBlobStore> {
    Ok(SealedBlobStore::new(
        open_blob_store(settings).await?,
        keys.clone(),
    ))
}

/// Connections a process keeps to a separate keys database.
const KEYS_POOL_SIZE: usize = 8;

/// Opens the data key table where the settings put it (the main database
/// unless `DOSSIER_KEYS_DATABASE_URL` names another), under the master keys
/// the settings hold.
pub async fn open_key_store(settings: &Settings, pool: &Pool) -> anyhow::Result<KeyStore> {
    let current =
        MasterKey::from_base64(settings.master_key.expose()).context("DOSSIER_MASTER_KEY")?;
    let previous = settings
        .master_key_previous
        .as_ref()
        .map(|key| MasterKey::from_base64(key.expose()))
        .transpose()
        .context("DOSSIER_MASTER_KEY_PREVIOUS")?;
    let keys_pool = match &settings.keys_database_url {
        Some(url) => db::connect(url, KEYS_POOL_SIZE)
            .await
            .context("connecting to the keys database (DOSSIER_KEYS_DATABASE_URL)")?,
        None => pool.clone(),
    };
    KeyStore::open(keys_pool, MasterKeys::new(current, previous))
        .await
        .context("opening the data key table")
}

/// What seals and opens personal event fields of the log in `pool` with
/// `keys`: the one way every process and tool builds it, so that whether an
/// append may destroy keys in its own transaction follows the settings.
pub fn field_cipher(settings: &Settings, keys: &KeyStore, pool: &Pool) -> Arc<FieldCipher> {
    FieldCipher::new(
        keys.clone(),
        pool.clone(),
        settings.keys_database_url.is_none(),
    )
}

/// Every read model of this process: one runner for all of them (projections
/// role), or a follower of each one's checkpoint (other roles), and what
/// read-your-writes waits on.
struct ReadModels {
    run_here: bool,
    log: LogReader,
    runner: Option<Runner>,
    freshness: Vec<Freshness>,
    followers: Vec<tokio::task::JoinHandle<()>>,
}

impl ReadModels {
    fn new(run_here: bool, log: LogReader) -> Self {
        Self {
            run_here,
            log,
            runner: None,
            freshness: Vec::new(),
            followers: Vec::new(),
        }
    }

    /// Adds one projection: to the process's runner when this process runs
    /// projections (one watermark, one read and one transaction per batch for
    /// all of them), otherwise a follower of its checkpoint for read-your-writes.
    fn add<P: Projection>(&mut self, pool: &Pool, projection: P, shutdown: &watch::Sender<bool>) {
        if self.run_here {
            self.runner = Some(match self.runner.take() {
                None => Runner::new(pool.clone(), projection, RunnerConfig::default())
                    .reading_from(self.log.clone()),
                Some(runner) => runner.with(projection),
            });
        } else {
            let (freshness, task) = Freshness::follow(
                pool.clone(),
                projection.name(),
                FollowerConfig::default(),
                shutdown.subscribe(),
            );
            self.freshness.push(freshness);
            self.followers.push(task);
        }
    }

    /// What read-your-writes waits on, and the runner to spawn, if any.
    fn finish(
        mut self,
    ) -> (
        Vec<Freshness>,
        Option<Runner>,
        Vec<tokio::task::JoinHandle<()>>,
    ) {
        if let Some(runner) = &self.runner {
            self.freshness
                .extend(runner.handles().iter().map(|handle| handle.freshness()));
        }
        (self.freshness, self.runner, self.followers)
    }
}

/// One process of Dossier, built and ready to run.
pub struct Application {
    settings: Settings,
    pool: Pool,
    state: AppState,
    broker: Option<Broker>,
    listener: Option<TcpListener>,
    /// Every read model of the process, when it runs the projections role.
    runner: Option<Runner>,
    /// The process's one reader of the log (see [`LogReader`]: clones share the
    /// safe watermark).
    log: LogReader,
    shutdown: watch::Sender<bool>,
    followers: Vec<tokio::task::JoinHandle<()>>,
}

impl Application {
    /// Connects to everything the settings name, applies migrations and binds
    /// the HTTP port (for the api role).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let blobs = open_blob_store(&settings).await?;
        Self::build_with_blobs(settings, blobs).await
    }

    /// Like [`Self::build`], with a blob store opened by the caller (tests
    /// pass S3 credentials explicitly instead of through the environment).
    /// `blobs` is the store as it is; every part of the process (uploads,
    /// downloads, the intake, the blob and zip workers, the orphan sweep)
    /// reads and writes it sealed, through one [`SealedBlobStore`].
    pub async fn build_with_blobs(
        settings: Settings,
        blobs: Arc<dyn BlobStore>,
    ) -> anyhow::Result<Self> {
        for warning in settings.startup_warnings() {
            tracing::warn!(%warning, "insecure configuration");
        }
        let pool = db::connect(&settings.database_url, POOL_SIZE)
            .await
            .context("connecting to Postgres")?;
        db::migrate(&pool).await.context("applying migrations")?;
        let keys = open_key_store(&settings, &pool).await?;
        let cipher = field_cipher(&settings, &keys, &pool);
        let blobs = SealedBlobStore::shared(blobs, keys.clone());
        let metrics = telemetry::install_metrics();
        let (shutdown, _) = watch::channel(false);

        // Every read model; a new one is one line here.
        // One reader of the log for every follower in this process (the read
        // models, the relay, the sealer): they share its safe watermark.
        let log = LogReader::new(pool.clone());
        let mut read_models = ReadModels::new(
            settings.components.contains(Component::Projections),
            log.clone(),
        );
        read_models.add(&pool, FilesProjection, &shutdown);
        read_models.add(&pool, PortalProjection, &shutdown);
        read_models.add(&pool, BundlesProjection, &shutdown);
        read_models.add(&pool, CustomersProjection, &shutdown);
        let (freshness, runner, followers) = read_models.finish();
        let runner = runner.map(|runner| runner.opening_with(cipher.clone()));

        let store = PgEventStore::new(pool.clone()).with_cipher(cipher.clone());
        let max_file_bytes = MaxFileBytes(settings.max_file_bytes);
        let commands = Arc::new(
            Commands::new(store, FilePolicy { max_file_bytes }, freshness)
                .with_freshness_timeout(settings.freshness_timeout),
        );
        let uploads = Arc::new(Uploads::new(pool.clone(), blobs.clone(), commands.clone()));
        // Only roles that talk to RabbitMQ connect to it: an API-only node keeps
        // taking commands (they wait in the log) while the broker is down.
        let needs_broker = [Component::Intake, Component::Relay, Component::Workers]
            .into_iter()
            .any(|component| settings.components.contains(component));
        let broker = if needs_broker {
            let options = BrokerOptions {
                connection_name: format!("dossier {}", settings.components),
                ..BrokerOptions::default()
            };
            Some(Broker::with_options(&settings.amqp_url, options).context("DOSSIER_AMQP_URL")?)
        } else {
            None
        };
        let state = AppState::new(Inner {
            pool: pool.clone(),
            log: log.clone(),
            blobs,
            keys,
            cipher,
            commands,
            uploads,
            jwt_secret: settings.jwt_secret.expose_bytes().to_vec(),
            max_file_bytes,
            bundle_policy: dossier_domain::BundlePolicy {
                max_files: dossier_domain::BundlePolicy::MAX_FILES,
                max_bytes: settings.bundle_max_bytes,
                max_pending_per_tenant: settings.max_pending_bundles_per_tenant,
                pending: Some(Arc::new(dossier_application::PendingInLog::new(
                    pool.clone(),
                ))),
            },
            metrics,
            broker: broker.clone(),
        });
        let listener = if settings.components.contains(Component::Api) {
            let listener = TcpListener::bind(settings.http_addr)
                .await
                .with_context(|| format!("binding the HTTP API to {}", settings.http_addr))?;
            Some(listener)
        } else {
            None
        };
        Ok(Self {
            settings,
            pool,
            state,
            broker,
            listener,
            runner,
            log,
            shutdown,
            followers,
        })
    }

    /// Where the HTTP API listens (the real port when 0 was asked for).
    pub fn http_address(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Runs every role until `stop` resolves (then shuts down gracefully) or a
    /// role fails (then stops the others and answers its error).
    pub async fn run_until_stopped(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            settings,
            pool,
            state,
            broker,
            listener,
            runner,
            log,
            shutdown,
            followers,
            ..
        } = self;
        let mut roles: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();

        if let Some(listener) = listener {
            let router = crate::http::router(state.clone());
            let limits = crate::http::serve::Limits::from_settings(&settings);
            let mut stopping = shutdown.subscribe();
            let address = listener.local_addr()?;
            tracing::info!(%address, ?limits, "HTTP API listening");
            tracing::info!("console and portal: open http://{address}/ in a browser");
            roles.spawn(async move {
                let stop = async move { dossier_runtime::shutdown::stopped(&mut stopping).await };
                let served = crate::http::serve::serve(listener, router, limits, stop)
                    .await
                    .context("serving HTTP");
                ("api", served)
            });
        }
        if let Some(runner) = runner {
            let stopping = shutdown.subscribe();
            roles.spawn(async move {
                let ran = runner.run(stopping).await;
                ("projections", ran.context("running the projections"))
            });
        }
        if let Some(broker) = &broker {
            if settings.components.contains(Component::Intake) {
                let intake = Intake::new(
                    pool.clone(),
                    state.uploads().clone(),
                    state.commands_arc(),
                    broker.clone(),
                    settings.max_file_bytes,
                    shutdown.subscribe(),
                );
                roles.spawn(async move {
                    (
                        "intake",
                        intake.run().await.context("running the command intake"),
                    )
                });
            }
            if settings.components.contains(Component::Relay) {
                let (pool, log, broker, stopping) = (
                    pool.clone(),
                    log.clone(),
                    broker.clone(),
                    shutdown.subscribe(),
                );
                roles.spawn(async move {
                    let ran = dossier_workers::relay::run(pool, log, broker, stopping).await;
                    ("relay", ran.context("relaying events to RabbitMQ"))
                });
            }
            if settings.components.contains(Component::Workers) {
                // Not a role of its own: a gauge that never stops on its own.
                tokio::spawn(dossier_broker::watch_queue_depths(
                    broker.clone(),
                    shutdown.subscribe(),
                ));
                {
                    // The audit trail, the sealing of the log and its signed checkpoints.
                    let config =
                        dossier_workers::audit::AuditConfig::new(settings.checkpoint_key.clone());
                    let (pool, log, broker, stopping) = (
                        pool.clone(),
                        log.clone(),
                        broker.clone(),
                        shutdown.subscribe(),
                    );
                    roles.spawn(async move {
                        let ran =
                            dossier_workers::audit::run(pool, log, broker, config, stopping).await;
                        ("audit", ran.context("running the audit worker"))
                    });
                }
                {
                    // ZIP bundles: built streaming, expired after DOSSIER_BUNDLE_TTL_SECS,
                    // more at once than one tenant may have pending.
                    let (pool, broker, blobs, stopping) = (
                        pool.clone(),
                        broker.clone(),
                        state.blobs().clone(),
                        shutdown.subscribe(),
                    );
                    let config =
                        dossier_workers::zip::ZipWorkerConfig::with_ttl(settings.bundle_ttl)
                            .with_pending_bound(settings.max_pending_bundles_per_tenant);
                    roles.spawn(async move {
                        let ran =
                            dossier_workers::zip::run(pool, broker, blobs, config, stopping).await;
                        ("zip", ran.context("running the zip worker"))
                    });
                }
                let (pool, broker, blobs, stopping) = (
                    pool.clone(),
                    broker.clone(),
                    state.blobs().clone(),
                    shutdown.subscribe(),
                );
                roles.spawn(async move {
                    let ran = dossier_workers::run_blob_worker(pool, broker, blobs, stopping).await;
                    ("workers", ran.context("running the blob worker"))
                });
            }
        }
        tracing::info!(roles = %settings.components, "dossier is running");

        let outcome = tokio::select! {
            () = stop => Ok(()),
            Some(finished) = roles.join_next() => match finished {
                Ok((role, Ok(()))) => Err(anyhow::anyhow!("the {role} role stopped on its own")),
                Ok((role, Err(error))) => Err(error.context(format!("the {role} role failed"))),
                Err(panic) => Err(anyhow::anyhow!("a role panicked: {panic}")),
            },
        };
        if let Err(error) = &outcome {
            tracing::error!(
                error = format!("{error:#}"),
                "stopping every role because one of them stopped"
            );
        }
        let _ = shutdown.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(finished) = roles.join_next().await {
                if let Ok((role, Err(error))) = finished {
                    tracing::warn!(
                        role,
                        error = format!("{error:#}"),
                        "a role ended with an error while shutting down"
                    );
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("some roles did not finish within {SHUTDOWN_GRACE:?}; stopping them");
            roles.abort_all();
        }
        for follower in followers {
            follower.abort();
        }
        if let Some(broker) = &broker {
            broker.close().await;
        }
        tracing::info!("dossier stopped");
        outcome
    }
}
