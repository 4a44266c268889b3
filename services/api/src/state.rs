//! What every request handler shares: the pool, the blob store, the command
//! path, the upload path and the settings that shape answers.

use std::sync::Arc;

use dossier_blobstore::BlobStore;
use dossier_broker::Broker;
use dossier_domain::MaxFileBytes;
use dossier_eventlog::db::Pool;
use dossier_eventlog::log::LogReader;
use dossier_eventlog::personal::FieldCipher;
use dossier_keys::KeyStore;
use metrics_exporter_prometheus::PrometheusHandle;

use dossier_application::{Commands, Uploads};

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub pool: Pool,
    /// The process's one reader of the log (shared with the read models, the
    /// relay and the sealer: clones share the safe watermark).
    pub log: LogReader,
    pub blobs: Arc<dyn BlobStore>,
    /// The data keys (wrapped under the master key): what sealed blobs and
    /// sealed event fields open with.
    pub keys: KeyStore,
    /// Opens personal fields for readers that show them (`decrypt=true`,
    /// the audit trail).
    pub cipher: Arc<FieldCipher>,
    pub commands: Arc<Commands>,
    /// Store the bytes, then record them: shared with the AMQP intake.
    pub uploads: Arc<Uploads>,
    pub jwt_secret: Vec<u8>,
    pub max_file_bytes: MaxFileBytes,
    /// The limits of one bundle (`DOSSIER_BUNDLE_MAX_BYTES`, at most 1000 files)
    /// and of a tenant's pending bundles, which it counts in the log.
    pub bundle_policy: dossier_domain::BundlePolicy,
    pub metrics: PrometheusHandle,
    /// The broker, when this process runs a role that talks to RabbitMQ (for /readyz).
    pub broker: Option<Broker>,
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }

    pub fn pool(&self) -> &Pool {
        &self.0.pool
    }

    /// The process's one reader of the log, for `GET /v1/events`.
    pub fn log(&self) -> &LogReader {
        &self.0.log
    }

    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.0.blobs
    }

    /// The data keys.
    pub fn keys(&self) -> &KeyStore {
        &self.0.keys
    }

    /// Opens personal fields of events.
    pub fn cipher(&self) -> &FieldCipher {
        &self.0.cipher
    }

    pub fn commands(&self) -> &Commands {
        &self.0.commands
    }

    /// The command path, shared with the AMQP intake.
    pub fn commands_arc(&self) -> Arc<Commands> {
        self.0.commands.clone()
    }

    /// The upload path, shared with the AMQP intake.
    pub fn uploads(&self) -> &Arc<Uploads> {
        &self.0.uploads
    }

    pub fn jwt_secret(&self) -> &[u8] {
        &self.0.jwt_secret
    }

    pub fn max_file_bytes(&self) -> MaxFileBytes {
        self.0.max_file_bytes
    }

    pub fn bundle_policy(&self) -> dossier_domain::BundlePolicy {
        self.0.bundle_policy.clone()
    }

    pub fn metrics(&self) -> &PrometheusHandle {
        &self.0.metrics
    }

    pub fn broker(&self) -> Option<&Broker> {
        self.0.broker.as_ref()
    }
}
