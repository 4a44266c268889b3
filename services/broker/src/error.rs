//! What can go wrong talking to RabbitMQ, sorted by whether retrying can help.

use std::time::Duration;

use lapin::types::ShortString;

/// What went wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The configured URL is not an AMQP URL. Permanent: retrying cannot help.
    #[error("invalid AMQP URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, password redacted.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// The broker could not be reached or refused the login.
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// lapin's error.
        source: lapin::Error,
    },
    /// Connecting took longer than allowed.
    #[error("connecting to RabbitMQ at {url} took longer than {timeout:?}")]
    ConnectTimeout {
        /// The URL, password redacted.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// Declaring an exchange, queue or binding failed (for example a queue that
    /// exists with other arguments: delete it, or align the code).
    #[error("declaring the RabbitMQ topology failed at {what}: {source}")]
    Topology {
        /// Which declaration failed.
        what: String,
        /// lapin's error.
        source: lapin::Error,
    },
    /// An operation on an open channel failed; the channel (and maybe its
    /// connection) is gone. Transient: reconnect and try again.
    #[error("RabbitMQ {operation} failed: {source}")]
    Channel {
        /// What was being done.
        operation: &'static str,
        /// lapin's error.
        source: lapin::Error,
    },
    /// The broker negatively confirmed a publish: it did not take the message.
    #[error("RabbitMQ refused a message for {exchange}/{routing_key} (negative publisher confirm)")]
    Nacked {
        /// The exchange published to.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// No confirm arrived in time; the connection is presumed dead or blocked.
    #[error("RabbitMQ did not confirm a publish within {0:?}")]
    ConfirmTimeout(Duration),
    /// A publish on a channel without confirm mode: a bug, since nothing would
    /// tell whether the broker has the message.
    #[error("publisher confirms are not enabled on this channel")]
    ConfirmsNotEnabled,
    /// A name or routing key longer than the 255 bytes AMQP allows. Permanent.
    #[error("{what} is longer than the 255 bytes AMQP allows: {value:?}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// A consumer dead-letters a message itself, but its queue has no
    /// dead-letter queue in the topology.
    #[error("queue {queue} has no dead-letter queue in the topology")]
    NoDeadLetterQueue {
        /// The queue.
        queue: String,
    },
    /// Shutdown was requested while waiting for the broker.
    #[error("shutting down")]
    ShuttingDown,
}

impl AmqpError {
    /// Whether retrying can never help (bad configuration or a bad message), as
    /// opposed to a broker that is down, restarting or busy.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::InvalidUrl { .. } | Self::TooLong { .. })
    }

    pub(crate) fn channel(operation: &'static str) -> impl FnOnce(lapin::Error) -> Self {
        move |source| Self::Channel { operation, source }
    }
}

/// A [`ShortString`] (exchange, queue, routing key, property), refusing rather
/// than panicking on more than 255 bytes (lapin's `From<&str>` panics).
pub fn short(what: &'static str, value: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(value).map_err(|_| AmqpError::TooLong {
        what,
        value: value.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_refused_not_panicked_on() {
        assert!(short("routing key", &"x".repeat(256)).is_err());
        assert!(short("routing key", "file.uploaded").is_ok());
    }
}
