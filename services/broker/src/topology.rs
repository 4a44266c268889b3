//! The topology: the exchanges, consumer queues and dead-letter queues every
//! Dossier process agrees on, their declaration, and the routing key of an event.
//!
//! Two durable topic exchanges carry the contract's traffic: [`COMMANDS_EXCHANGE`]
//! (upstream systems send commands) and [`EVENTS_EXCHANGE`] (the outbox relay
//! publishes every logged event). Every consumer queue ([`CONSUMER_QUEUES`]) is a
//! durable **quorum** queue with a dead-letter exchange and a delivery limit, so a
//! message that is rejected, or redelivered too often, ends up in the queue's own
//! dead-letter queue instead of looping or vanishing:
//!
//! ```text
//! dossier.commands ──#──────────────► dossier.intake         ─┐
//! dossier.events ──file.deleted─────► dossier.workers.blob   ─┤ dead letters via
//!                ──#────────────────► dossier.workers.audit  ─┤ dossier.dead (direct),
//!                ──bundle.requested─► dossier.workers.zip    ─┘ routing key = dead queue
//!
//! dossier.dead ──dossier.commands.dead──► dossier.commands.dead
//!              ──dossier.workers.blob.dead──► dossier.workers.blob.dead   (and so on)
//! ```
//!
//! [`declare_topology`] declares all of it and is idempotent; [`crate::Broker`]
//! runs it on every (re)connect, so a broker that lost its definitions gets them
//! back. Queue arguments cannot change on an existing queue: changing them here
//! needs the queue deleted first (RabbitMQ answers `PRECONDITION_FAILED`
//! otherwise).

use std::time::Duration;

use dossier_runtime::shutdown::sleep_or_stop;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use tokio::sync::watch;

use crate::connection::Broker;
use crate::error::AmqpError;

/// Exchange of the commands upstream systems send (topic, durable).
pub const COMMANDS_EXCHANGE: &str = "dossier.commands";
/// Exchange every logged event is published to by the relay (topic, durable).
pub const EVENTS_EXCHANGE: &str = "dossier.events";
/// Dead-letter exchange of every consumer queue (direct, durable). Each consumer
/// queue dead-letters with its own dead-letter queue's name as routing key.
pub const DEAD_LETTER_EXCHANGE: &str = "dossier.dead";

/// The command intake's queue: every command of [`COMMANDS_EXCHANGE`].
pub const INTAKE_QUEUE: &str = "dossier.intake";
/// Where the intake's rejected commands land (CONTRACT.md, "AMQP: commands").
pub const COMMANDS_DEAD_QUEUE: &str = "dossier.commands.dead";
/// The blob worker's queue: `file.deleted` events.
pub const BLOB_QUEUE: &str = "dossier.workers.blob";
/// Dead letters of [`BLOB_QUEUE`].
pub const BLOB_DEAD_QUEUE: &str = "dossier.workers.blob.dead";
/// The audit worker's queue: every event.
pub const AUDIT_QUEUE: &str = "dossier.workers.audit";
/// Dead letters of [`AUDIT_QUEUE`].
pub const AUDIT_DEAD_QUEUE: &str = "dossier.workers.audit.dead";
/// The zip worker's queue: `bundle.requested` events.
pub const ZIP_QUEUE: &str = "dossier.workers.zip";
/// Dead letters of [`ZIP_QUEUE`].
pub const ZIP_DEAD_QUEUE: &str = "dossier.workers.zip.dead";

/// How often a quorum queue delivers one message before dead-lettering it
/// (`x-delivery-limit`). RabbitMQ 3.x counts every return: a [`Outcome::Retry`], and
/// also a delivery that was unacked when its channel or connection died. Twenty
/// leaves room for several broker restarts while a message is being handled, and
/// still stops a poison message that crashes its handler.
pub const DELIVERY_LIMIT: i32 = 20;

/// Message header naming the tenant (contract: commands and events).
pub const HEADER_TENANT: &str = "tenant";
/// Message header naming the actor of a command (contract: commands).
pub const HEADER_ACTOR: &str = "actor";
/// `content_type` of JSON bodies.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// `delivery_mode` of a persistent message (written to disk by the broker).
pub const PERSISTENT: u8 = 2;
/// Header of a message a consumer dead-lettered itself: why (see
/// [`crate::BatchOutcome::DeadLetter`]). The broker's own dead-lettering only
/// says `rejected` or `delivery_limit` in `x-death`.
pub const REASON_HEADER: &str = "x-dossier-reason";

/// One consumer queue of the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSpec {
    /// The queue's name.
    pub name: &'static str,
    /// The exchange it is bound to.
    pub exchange: &'static str,
    /// The binding key (topic pattern).
    pub binding_key: &'static str,
    /// The queue its dead letters land in, through [`DEAD_LETTER_EXCHANGE`].
    pub dead_letter_queue: &'static str,
}

/// The command intake's queue and its dead letters.
pub const INTAKE: QueueSpec = QueueSpec {
    name: INTAKE_QUEUE,
    exchange: COMMANDS_EXCHANGE,
    binding_key: "#",
    dead_letter_queue: COMMANDS_DEAD_QUEUE,
};
/// The blob worker's queue.
pub const BLOB_WORKER: QueueSpec = QueueSpec {
    name: BLOB_QUEUE,
    exchange: EVENTS_EXCHANGE,
    binding_key: "file.deleted",
    dead_letter_queue: BLOB_DEAD_QUEUE,
};
/// The audit worker's queue (name reserved; declared so nothing is missed before
/// the worker exists).
pub const AUDIT_WORKER: QueueSpec = QueueSpec {
    name: AUDIT_QUEUE,
    exchange: EVENTS_EXCHANGE,
    binding_key: "#",
    dead_letter_queue: AUDIT_DEAD_QUEUE,
};
/// The zip worker's queue.
pub const ZIP_WORKER: QueueSpec = QueueSpec {
    name: ZIP_QUEUE,
    exchange: EVENTS_EXCHANGE,
    binding_key: "bundle.requested",
    dead_letter_queue: ZIP_DEAD_QUEUE,
};
/// Every consumer queue [`declare_topology`] declares.
pub const CONSUMER_QUEUES: &[QueueSpec] = &[INTAKE, BLOB_WORKER, AUDIT_WORKER, ZIP_WORKER];

/// The consumer queue called `name`, if the topology has one.
pub fn consumer_queue(name: &str) -> Option<&'static QueueSpec> {
    CONSUMER_QUEUES.iter().find(|spec| spec.name == name)
}

/// The routing key of an event on [`EVENTS_EXCHANGE`]: `<aggregate>.<event>` in
/// snake case, with the aggregate's name dropped from the front of the event's:
/// `("file", "FileVisibilityChanged")` → `file.visibility_changed`, `("file",
/// "BlobPurged")` → `file.blob_purged`.
pub fn routing_key(aggregate_type: &str, event_type: &str) -> String {
    let aggregate = snake_case(aggregate_type);
    let event = snake_case(event_type);
    let event = event
        .strip_prefix(&aggregate)
        .and_then(|rest| rest.strip_prefix('_'))
        .filter(|rest| !rest.is_empty())
        .unwrap_or(&event);
    format!("{aggregate}.{event}")
}

/// `FileVisibilityChanged` → `file_visibility_changed`; already snake-cased or
/// lower-case input is kept. Runs of capitals stay one word (`ZIPReady` → `zip_ready`).
fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let previous = i.checked_sub(1).and_then(|p| chars.get(p)).copied();
            let next = chars.get(i + 1).copied();
            let starts_word = match previous {
                None => false,
                Some(p) if p == '_' || p == '-' || p == '.' => false,
                Some(p) if p.is_lowercase() || p.is_ascii_digit() => true,
                // Inside a run of capitals, the last one starts the next word.
                Some(p) if p.is_uppercase() => next.is_some_and(char::is_lowercase),
                Some(_) => false,
            };
            if starts_word {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else if c == '-' || c == ' ' {
            out.push('_');
        } else {
            out.push(c);
        }
    }
    out
}

/// How often [`watch_queue_depths`] looks.
pub const QUEUE_DEPTH_INTERVAL: Duration = Duration::from_secs(15);

/// Publishes the depth of every consumer queue and dead-letter queue as the
/// gauge `dossier_amqp_queue_depth{queue}` until shutdown, so an operator sees
/// a backlog or dead letters piling up. A look that fails is skipped: the
/// consumers' own reconnect logic reports broker trouble.
pub async fn watch_queue_depths(broker: Broker, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Some(connection) = broker.live_connection()
            && let Ok(channel) = connection.create_channel().await
        {
            for spec in CONSUMER_QUEUES {
                for queue in [spec.name, spec.dead_letter_queue] {
                    let passive = QueueDeclareOptions {
                        passive: true,
                        durable: true,
                        ..QueueDeclareOptions::default()
                    };
                    match channel
                        .queue_declare(queue.into(), passive, FieldTable::default())
                        .await
                    {
                        Ok(declared) => {
                            metrics::gauge!("dossier_amqp_queue_depth", "queue" => queue)
                                .set(f64::from(declared.message_count()))
                        }
                        // A failed passive declare closes the channel: stop this round.
                        Err(_) => break,
                    }
                }
            }
            let _ = channel.close(200, "queue depths read".into()).await;
        }
        if sleep_or_stop(QUEUE_DEPTH_INTERVAL, &mut shutdown).await {
            return;
        }
    }
}

/// Declares every exchange, queue and binding of the topology (see the module
/// docs). Idempotent: declaring what exists with the same arguments is a no-op.
pub async fn declare_topology(channel: &Channel) -> Result<(), AmqpError> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for (name, kind) in [
        (COMMANDS_EXCHANGE, ExchangeKind::Topic),
        (EVENTS_EXCHANGE, ExchangeKind::Topic),
        (DEAD_LETTER_EXCHANGE, ExchangeKind::Direct),
    ] {
        channel
            .exchange_declare(name.into(), kind, durable_exchange, FieldTable::default())
            .await
            .map_err(|source| AmqpError::Topology {
                what: format!("exchange {name}"),
                source,
            })?;
    }
    for spec in CONSUMER_QUEUES {
        declare_queue(
            channel,
            spec.dead_letter_queue,
            dead_letter_queue_arguments(),
        )
        .await?;
        bind(
            channel,
            spec.dead_letter_queue,
            DEAD_LETTER_EXCHANGE,
            spec.dead_letter_queue,
        )
        .await?;
        declare_queue(channel, spec.name, consumer_queue_arguments(spec)).await?;
        bind(channel, spec.name, spec.exchange, spec.binding_key).await?;
    }
    Ok(())
}

/// Arguments of a consumer queue: quorum, dead-lettering into its own dead queue,
/// with a delivery limit.
fn consumer_queue_arguments(spec: &QueueSpec) -> FieldTable {
    let mut arguments = dead_letter_queue_arguments();
    arguments
        .insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
        )
        .insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(spec.dead_letter_queue.into()),
        )
        .insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(DELIVERY_LIMIT),
        )
        // A dead letter stays in its source queue until the dead-letter queue has
        // it (RabbitMQ 3.10+; older brokers fall back to at-most-once). It needs
        // reject-publish overflow, which only matters if a max-length policy is set:
        // then publishers get a nack (and retry) instead of losing old messages.
        .insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        )
        .insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    arguments
}

/// Arguments of a dead-letter queue: a quorum queue that keeps what it gets.
fn dead_letter_queue_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments
}

async fn declare_queue(
    channel: &Channel,
    name: &'static str,
    arguments: FieldTable,
) -> Result<(), AmqpError> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), options, arguments)
        .await
        .map(drop)
        .map_err(|source| AmqpError::Topology {
            what: format!("queue {name}"),
            source,
        })
}

async fn bind(
    channel: &Channel,
    queue: &'static str,
    exchange: &'static str,
    key: &'static str,
) -> Result<(), AmqpError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Topology {
            what: format!("binding {exchange} -[{key}]-> {queue}"),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_are_aggregate_dot_event_in_snake_case() {
        assert_eq!(routing_key("file", "FileUploaded"), "file.uploaded");
        assert_eq!(
            routing_key("file", "FileVisibilityChanged"),
            "file.visibility_changed"
        );
        assert_eq!(routing_key("file", "FileDeleted"), "file.deleted");
        assert_eq!(routing_key("file", "BlobPurged"), "file.blob_purged");
        assert_eq!(routing_key("task", "TaskCreated"), "task.created");
        assert_eq!(routing_key("bundle", "BundleRequested"), "bundle.requested");
    }

    #[test]
    fn routing_keys_handle_odd_names() {
        // The aggregate's name alone is not dropped: there would be nothing left.
        assert_eq!(routing_key("file", "File"), "file.file");
        // Only a whole-word prefix is dropped.
        assert_eq!(routing_key("file", "Filesystem"), "file.filesystem");
        assert_eq!(
            routing_key("Settings", "SettingsChanged"),
            "settings.changed"
        );
        assert_eq!(routing_key("bundle", "ZIPReady"), "bundle.zip_ready");
        assert_eq!(routing_key("file", "file_renamed"), "file.renamed");
    }

    #[test]
    fn the_blob_worker_queue_gets_exactly_the_deleted_files() {
        assert_eq!(BLOB_WORKER.binding_key, routing_key("file", "FileDeleted"));
        assert_eq!(
            ZIP_WORKER.binding_key,
            routing_key("bundle", "BundleRequested")
        );
        assert_eq!(INTAKE.dead_letter_queue, "dossier.commands.dead");
    }

    #[test]
    fn consumer_queues_are_quorum_queues_that_dead_letter() {
        for spec in CONSUMER_QUEUES {
            let arguments = consumer_queue_arguments(spec);
            let get = |key: &str| arguments.inner().get(key).cloned();
            assert_eq!(
                get("x-queue-type"),
                Some(AMQPValue::LongString("quorum".into()))
            );
            assert_eq!(
                get("x-dead-letter-exchange"),
                Some(AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()))
            );
            assert_eq!(
                get("x-dead-letter-routing-key"),
                Some(AMQPValue::LongString(spec.dead_letter_queue.into()))
            );
            assert!(matches!(get("x-delivery-limit"), Some(AMQPValue::LongInt(n)) if n > 0));
        }
    }
}
