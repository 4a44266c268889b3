//! Adapters every Dossier process needs. The domain never sees any of this:
//! configuration, the Postgres event store and log reader, the blob store,
//! RabbitMQ, authentication and telemetry.

pub mod amqp;
pub mod auth;
pub mod blob;
pub mod chain;
pub mod config;
pub mod db;
pub mod eventstore;
pub mod log;
pub mod receipts;
pub mod telemetry;
