//! Publishing with broker confirms: [`ConfirmedPublisher`] switches its channel
//! to confirm mode, so a publish is done only when the broker has confirmed it (a
//! nack is an error).

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::watch;

use crate::connection::Broker;
use crate::error::{AmqpError, short};

/// A channel in confirm mode: [`Self::publish`] returns only once the broker has
/// the message. Open a new one (with [`Self::open`]) after any error.
pub struct ConfirmedPublisher {
    connection: Arc<Connection>,
    channel: Channel,
    confirm_timeout: Duration,
}

impl std::fmt::Debug for ConfirmedPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfirmedPublisher")
            .field("channel", &self.channel.id())
            .field("open", &self.is_open())
            .finish_non_exhaustive()
    }
}

impl ConfirmedPublisher {
    /// Opens a channel on the broker's connection (waiting for the broker with
    /// backoff) and switches it to confirm mode.
    pub async fn open(
        broker: &Broker,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Self, AmqpError> {
        let (connection, channel) = broker.open_channel(shutdown).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(AmqpError::channel("switching on publisher confirms"))?;
        Ok(Self {
            connection,
            channel,
            confirm_timeout: broker.options().confirm_timeout,
        })
    }

    /// Publishes and waits for the broker's confirm. `Ok` means the broker took
    /// responsibility for the message (for a persistent message to a durable
    /// queue: it is on disk).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<(), AmqpError> {
        self.send(exchange, routing_key, properties, body)
            .await?
            .confirmed()
            .await
    }

    /// Sends without waiting for the confirm; await [`PendingConfirm::confirmed`]
    /// later. Confirms of one channel arrive in publish order, so a window of
    /// messages can be sent and their confirms awaited in order.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<PendingConfirm, AmqpError> {
        let publishing = self.channel.basic_publish(
            short("exchange", exchange)?,
            short("routing key", routing_key)?,
            BasicPublishOptions::default(),
            body,
            properties,
        );
        // Bounded too: a broker that blocked the connection (memory or disk
        // alarm) can hold the send itself, not only the confirm.
        let confirm = tokio::time::timeout(self.confirm_timeout, publishing)
            .await
            .map_err(|_| AmqpError::ConfirmTimeout(self.confirm_timeout))?
            .map_err(AmqpError::channel("publish"))?;
        Ok(PendingConfirm {
            confirm,
            timeout: self.confirm_timeout,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        })
    }

    /// Whether the channel and its connection are still up.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected() && self.connection.status().connected()
    }

    /// The connection it publishes on (for [`Broker::invalidate`]).
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }

    /// Closes the channel; unconfirmed messages stay unconfirmed.
    pub async fn close(self) {
        if self.channel.status().connected() {
            let _ = self.channel.close(200, "publisher done".into()).await;
        }
    }
}

/// A published message whose broker confirm has not been awaited yet.
#[must_use = "a publish is only safe once its confirm has been awaited"]
pub struct PendingConfirm {
    confirm: lapin::PublisherConfirm,
    timeout: Duration,
    exchange: String,
    routing_key: String,
}

impl std::fmt::Debug for PendingConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingConfirm")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .finish_non_exhaustive()
    }
}

impl PendingConfirm {
    /// Waits for the broker's confirm: `Ok` on ack, an error on nack, timeout or
    /// a channel that died first.
    pub async fn confirmed(self) -> Result<(), AmqpError> {
        let confirmation = tokio::time::timeout(self.timeout, self.confirm)
            .await
            .map_err(|_| AmqpError::ConfirmTimeout(self.timeout))?
            .map_err(AmqpError::channel("waiting for a publisher confirm"))?;
        match confirmation {
            Confirmation::Ack(_) => Ok(()),
            Confirmation::Nack(_) => {
                metrics::counter!("dossier_amqp_publish_nacks_total").increment(1);
                Err(AmqpError::Nacked {
                    exchange: self.exchange,
                    routing_key: self.routing_key,
                })
            }
            Confirmation::NotRequested => Err(AmqpError::ConfirmsNotEnabled),
        }
    }
}
