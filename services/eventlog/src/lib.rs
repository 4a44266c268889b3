//! The Postgres event log, the system's source of truth: the schema and its
//! migrations, the event store commands append to (cqrs-es's repository), the
//! log reader every follower reads through (never past the safe watermark,
//! ADR 0002), the one mechanism every follower of the log runs on (checkpoints,
//! turns, batches; ADR 0009), the command receipts that make AMQP commands
//! effect-once, and the tenant hash chain that makes tampering evident.

pub mod chain;
pub mod db;
pub mod eventstore;
pub mod follow;
pub mod idempotency;
pub mod log;
pub mod personal;
pub mod receipts;
