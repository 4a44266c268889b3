//! Read models fed from the event log: their projectors, their queries, and the
//! machinery that keeps them up to date.
//!
//! The event log is the source of truth; every table here is derived from it and can
//! be dropped and rebuilt at any time ([`rebuild()`]). The pieces:
//!
//! - [`Projection`]: one read model's reaction to one logged event, applied inside a
//!   transaction the framework gives it.
//! - [`Runner`]: the read models as one follower of the log
//!   ([`dossier_eventlog::follow`], the mechanism the relay and the sealer run on
//!   too): applies batches of events, committing each batch's effects together
//!   with every projection's checkpoint, so every event takes effect exactly once,
//!   crashes included.
//! - [`Freshness`]: read-your-writes. The command path waits until a projection's
//!   checkpoint has reached the position of the events it just wrote, in process (a
//!   `watch` channel of the runner) or across processes (by following the
//!   `checkpoints` table).
//! - [`files`]: the files read model (CONTRACT.md "File resource") and its queries.
//! - [`customers`]: the customers read model (`/v1/customers`, the staff console's
//!   customer list): per customer its files, open tasks and last activity.
//! - [`cursor`]: the keyset cursors of the lists (files and tasks newest first,
//!   customers most recently active first).
//! - [`bundles`]: the bundles read model (`/v1/bundles`) and its queries.
//! - [`audit`]: the audit trail's queries (`/v1/audit`); the audit worker writes it.
//! - [`rebuild()`]: builds a read model aside from position 0 and swaps it in while the
//!   service keeps running; [`registry`] lists every read model for
//!   `dossier projections rebuild`.
//! - [`replay`]: `dossier replay`, the log as JSON lines and a customer's file list
//!   as it stood at a moment, streamed from the log.
//!
//! Why cqrs-es's own in-process queries are not used: they run after the commit of a
//! command and a crash between the two loses them (STYLE.md, known traps). Following
//! the log by position has no such window.

pub mod audit;
pub mod bundles;
pub mod cursor;
pub mod customers;
pub mod error;
pub mod files;
pub mod freshness;
pub mod portal;
pub mod projection;
pub mod rebuild;
pub mod registry;
pub mod replay;
pub mod runner;

pub use bundles::BundlesProjection;
pub use customers::CustomersProjection;
pub use error::ProjectionError;
pub use files::FilesProjection;
pub use freshness::{FollowerConfig, Freshness, FreshnessError};
pub use portal::PortalProjection;
pub use projection::{ApplyTx, Projection};
pub use rebuild::{
    RebuildOptions, RebuildProgress, RebuildReport, rebuild, rebuild_with_options,
    rebuild_with_progress,
};
pub use runner::{Progress, Runner, RunnerConfig, RunnerHandle};
