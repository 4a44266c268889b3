//! RabbitMQ for every Dossier process, one module per job:
//!
//! - [`topology`]: the names of the exchanges and queues, their declaration (every
//!   consumer queue a quorum queue with its own dead-letter queue), the routing
//!   key of an event, the queue-depth gauge;
//! - [`connection`]: [`Broker`], the one shared connection, rebuilt after any
//!   failure;
//! - [`publisher`]: [`ConfirmedPublisher`], publishing with broker confirms;
//! - [`consumer`]: the consumer loop that survives broker restarts, one delivery
//!   at a time ([`consume`]) or a window at a time ([`consume_batches`]);
//! - [`error`], [`AmqpError`]: what can go wrong, and whether retrying helps.
//!
//! Everything on RabbitMQ is at least once: handlers must be idempotent.

pub mod connection;
pub mod consumer;
pub mod error;
pub mod publisher;
pub mod topology;

pub use connection::{Broker, BrokerOptions};
pub use consumer::{
    Batch, BatchOptions, BatchOutcome, ConsumerOptions, Incoming, Outcome, PANICKED_REASON,
    consume, consume_batches, consume_with,
};
pub use error::{AmqpError, short};
pub use publisher::{ConfirmedPublisher, PendingConfirm};
pub use topology::{
    AUDIT_DEAD_QUEUE, AUDIT_QUEUE, AUDIT_WORKER, BLOB_DEAD_QUEUE, BLOB_QUEUE, BLOB_WORKER,
    COMMANDS_DEAD_QUEUE, COMMANDS_EXCHANGE, CONSUMER_QUEUES, DEAD_LETTER_EXCHANGE, DELIVERY_LIMIT,
    EVENTS_EXCHANGE, HEADER_ACTOR, HEADER_TENANT, INTAKE, INTAKE_QUEUE, JSON_CONTENT_TYPE,
    PERSISTENT, QUEUE_DEPTH_INTERVAL, QueueSpec, REASON_HEADER, ZIP_DEAD_QUEUE, ZIP_QUEUE,
    ZIP_WORKER, declare_topology, routing_key, watch_queue_depths,
};
