//! Dossier's application layer: the only way any aggregate command runs.
//!
//! ```text
//!   edges:    HTTP API (axum)   AMQP intake   blob worker   zip worker
//!                    \               |             |            /
//!   application:      commands (one race policy, one metadata builder,
//!                     one set of metrics), uploads, AppError (the codes)
//!                                     |
//!   adapters:          event log · read models · blob store
//! ```
//!
//! - [`commands`]: a domain command in, events in the log out, with the one
//!   [`RacePolicy`] for a lost optimistic-concurrency race and the one
//!   [`CommandContext::metadata`] builder.
//! - [`cache`]: the aggregates a process last loaded or committed, so that a
//!   command need not read its aggregate's events again (a stale one loses
//!   the optimistic-concurrency race and is run again on the stored events).
//! - [`upload`]: store the bytes, then record them; the one rule for what
//!   becomes of a blob whose command failed ([`BlobFate`]), and the answer to
//!   an upload whose read models lag.
//! - [`erasure`]: erasing a customer: its files that may be deleted through
//!   the file command path, then `CustomerErased`.
//! - [`bundles`]: the pending bundles of a tenant, counted in the log for the
//!   bundle aggregate's per-tenant bound.
//! - [`error`]: [`AppError`], the contract's codes without any transport;
//!   each edge maps it once to its own answer.
//!
//! Nothing here knows HTTP or AMQP (see docs/adr/0008-application-layer.md).

pub mod bundles;
pub mod cache;
pub mod commands;
pub mod erasure;
pub mod error;
pub mod upload;

pub use bundles::PendingInLog;
pub use cache::{AggregateCache, DEFAULT_AGGREGATE_CACHE};
pub use commands::{Accepted, CommandContext, Commands, DEFAULT_FRESHNESS_TIMEOUT, RacePolicy};
pub use erasure::Erasure;
pub use error::AppError;
pub use upload::{BlobFate, RecordedUpload, Recording, StoredUpload, UploadedFile, Uploads};
