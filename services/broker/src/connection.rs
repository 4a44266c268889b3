//! The process's one connection to RabbitMQ: [`Broker`] hands it to whoever
//! needs a channel and builds a *new* connection (with backoff) as soon as the old
//! one is gone.
//!
//! lapin's automatic recovery does not survive a broker restart (STYLE.md, known
//! traps), so it is off. Users notice a dead connection by the errors of their own
//! channel and simply ask the broker again.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use dossier_runtime::config::redact_url;
use dossier_runtime::retry::Backoff;
use dossier_runtime::shutdown::{is_stopping, sleep_or_stop};
use lapin::types::LongString;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::watch;

use crate::error::AmqpError;
use crate::topology::declare_topology;

/// How a [`Broker`] connects and publishes.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Shown in the RabbitMQ management UI next to the connection.
    pub connection_name: String,
    /// Longest wait for one connection attempt (TCP, AMQP handshake, topology).
    pub connect_timeout: Duration,
    /// Longest wait of [`Broker::check`] when there is no live connection.
    pub check_timeout: Duration,
    /// Between connection attempts, and between consumer restarts.
    pub backoff: Backoff,
    /// Longest wait for a publisher confirm before the connection is presumed dead.
    pub confirm_timeout: Duration,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            connection_name: "dossier".to_owned(),
            connect_timeout: Duration::from_secs(10),
            check_timeout: Duration::from_secs(2),
            backoff: Backoff::DEFAULT,
            confirm_timeout: Duration::from_secs(30),
        }
    }
}

/// The process's way to RabbitMQ: owns one shared connection and rebuilds it after
/// any failure. Cheap to clone; every clone shares the connection.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<BrokerInner>,
}

struct BrokerInner {
    uri: AMQPUri,
    /// The URL with its password redacted, for logs and errors.
    display_url: String,
    options: BrokerOptions,
    /// The connection handed out, if any. A plain mutex: held for no await.
    current: StdMutex<Option<Arc<Connection>>>,
    /// Serialises connection attempts, so that twenty channels noticing the same
    /// broker restart build one new connection, not twenty.
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.inner.display_url)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// A broker for `url` with default options. Does not connect yet; an invalid
    /// URL is refused here.
    pub fn new(url: &str) -> Result<Self, AmqpError> {
        Self::with_options(url, BrokerOptions::default())
    }

    /// A broker for `url` with `options`. Does not connect yet.
    pub fn with_options(url: &str, options: BrokerOptions) -> Result<Self, AmqpError> {
        let display_url = redact_url(url);
        let uri = url
            .parse::<AMQPUri>()
            .map_err(|reason| AmqpError::InvalidUrl {
                url: display_url.clone(),
                reason,
            })?;
        Ok(Self {
            inner: Arc::new(BrokerInner {
                uri,
                display_url,
                options,
                current: StdMutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The options it was built with.
    pub fn options(&self) -> &BrokerOptions {
        &self.inner.options
    }

    /// The URL, password redacted.
    pub fn display_url(&self) -> &str {
        &self.inner.display_url
    }

    /// The current connection if it is up; never connects.
    pub fn live_connection(&self) -> Option<Arc<Connection>> {
        let current = self
            .inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        current
            .as_ref()
            .filter(|connection| connection.status().connected())
            .cloned()
    }

    /// The live connection, or one new connection attempt (with the topology
    /// declared on it) if there is none. No retries: see [`Self::connect`].
    pub async fn connect_once(&self) -> Result<Arc<Connection>, AmqpError> {
        if let Some(connection) = self.live_connection() {
            return Ok(connection);
        }
        let _one_at_a_time = self.inner.connecting.lock().await;
        // Someone else may have connected while we waited for the lock.
        if let Some(connection) = self.live_connection() {
            return Ok(connection);
        }
        let started = Instant::now();
        let timeout = self.inner.options.connect_timeout;
        let connection = tokio::time::timeout(timeout, self.open_connection())
            .await
            .map_err(|_| AmqpError::ConnectTimeout {
                url: self.inner.display_url.clone(),
                timeout,
            })
            .and_then(|connected| connected);
        let connection = match connection {
            Ok(connection) => Arc::new(connection),
            Err(error) => {
                metrics::counter!("dossier_amqp_connect_failures_total").increment(1);
                return Err(error);
            }
        };
        *self
            .inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&connection));
        metrics::counter!("dossier_amqp_connections_opened_total").increment(1);
        tracing::info!(
            url = %self.inner.display_url,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "connected to RabbitMQ and declared the topology"
        );
        Ok(connection)
    }

    /// Opens a connection and declares the topology on it; on a topology failure
    /// the connection is closed again.
    async fn open_connection(&self) -> Result<Connection, AmqpError> {
        let name: LongString = self.inner.options.connection_name.clone().into();
        let properties = ConnectionProperties::default().with_connection_name(name);
        // Auto-recovery stays off (the default): it does not survive a broker
        // restart, and this type rebuilds connections itself.
        let connection = Connection::connect_uri(self.inner.uri.clone(), properties)
            .await
            .map_err(|source| AmqpError::Connect {
                url: self.inner.display_url.clone(),
                source,
            })?;
        let declared = async {
            let channel = connection
                .create_channel()
                .await
                .map_err(AmqpError::channel("opening a channel for the topology"))?;
            declare_topology(&channel).await?;
            // Best effort: the channel goes with the connection anyway.
            let _ = channel.close(200, "topology declared".into()).await;
            Ok(())
        }
        .await;
        if let Err(error) = declared {
            let _ = connection
                .close(200, "topology declaration failed".into())
                .await;
            return Err(error);
        }
        Ok(connection)
    }

    /// A live connection, retrying with backoff until one is made or shutdown is
    /// requested ([`AmqpError::ShuttingDown`]). Fails at once only for permanent
    /// errors (an invalid URL).
    pub async fn connect(
        &self,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Arc<Connection>, AmqpError> {
        let mut shutdown = shutdown.clone();
        let mut attempt = 0u32;
        loop {
            if is_stopping(&shutdown) {
                return Err(AmqpError::ShuttingDown);
            }
            match self.connect_once().await {
                Ok(connection) => {
                    if attempt > 0 {
                        tracing::info!(failed_attempts = attempt, "RabbitMQ is reachable again");
                    }
                    return Ok(connection);
                }
                Err(error) if error.is_permanent() => return Err(error),
                Err(error) => {
                    let delay = self.inner.options.backoff.delay(attempt);
                    tracing::warn!(
                        error = %error,
                        attempt = attempt + 1,
                        retry_in_ms = delay.as_millis() as u64,
                        "RabbitMQ is unreachable; events wait in the log and messages in the broker until it is back"
                    );
                    if sleep_or_stop(delay, &mut shutdown).await {
                        return Err(AmqpError::ShuttingDown);
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// A new channel on a live connection, retrying like [`Self::connect`]. A
    /// connection that cannot open a channel is dropped and rebuilt.
    pub async fn open_channel(
        &self,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(Arc<Connection>, Channel), AmqpError> {
        let mut stopping = shutdown.clone();
        let mut attempt = 0u32;
        loop {
            let connection = self.connect(shutdown).await?;
            match connection.create_channel().await {
                Ok(channel) => return Ok((connection, channel)),
                Err(source) => {
                    self.invalidate(&connection);
                    let delay = self.inner.options.backoff.delay(attempt);
                    tracing::warn!(
                        error = %source,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot open a RabbitMQ channel; rebuilding the connection"
                    );
                    if sleep_or_stop(delay, &mut stopping).await {
                        return Err(AmqpError::ShuttingDown);
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// Forgets `connection` (if it is still the current one) and closes it, so the
    /// next user builds a new one. For a connection that looks alive but does not
    /// work (a publisher confirm that never comes).
    pub fn invalidate(&self, connection: &Arc<Connection>) {
        let taken = {
            let mut current = self
                .inner
                .current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match current.as_ref() {
                Some(held) if Arc::ptr_eq(held, connection) => current.take(),
                _ => None,
            }
        };
        if let Some(connection) = taken {
            tracing::warn!(
                "dropping a RabbitMQ connection that stopped working; a new one will be built"
            );
            metrics::counter!("dossier_amqp_connections_invalidated_total").increment(1);
            if connection.status().connected() {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        connection.close(200, "replaced after a failure".into()),
                    )
                    .await;
                });
            }
        }
    }

    /// Readiness probe for `/readyz`: fine if there is a live connection, else one
    /// connection attempt bounded by [`BrokerOptions::check_timeout`].
    pub async fn check(&self) -> Result<(), AmqpError> {
        if self.live_connection().is_some() {
            return Ok(());
        }
        let timeout = self.inner.options.check_timeout;
        tokio::time::timeout(timeout, self.connect_once())
            .await
            .map_err(|_| AmqpError::ConnectTimeout {
                url: self.inner.display_url.clone(),
                timeout,
            })?
            .map(drop)
    }

    /// Closes the shared connection (at shutdown, after every user is done).
    pub async fn close(&self) {
        let taken = self
            .inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(connection) = taken
            && connection.status().connected()
        {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                connection.close(200, "shutting down".into()),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for _ in 0..100 {
            let first = backoff.delay(0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let late = backoff.delay(40);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }

    #[test]
    fn invalid_urls_are_refused_without_their_password() {
        let error = Broker::new("http://guest:secret@localhost").unwrap_err();
        assert!(error.is_permanent());
        assert!(!error.to_string().contains("secret"), "{error}");
    }
}
