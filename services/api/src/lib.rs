//! Dossier's edges and start-up: the HTTP API (axum), the command path both
//! edges share, and the wiring that runs every role of one process.

pub mod auth;
/// The command path lives in the application layer; the edge uses it from here.
pub use dossier_application::commands;
pub mod error;
pub mod http;
pub mod intake;
pub mod pages;
pub mod startup;
pub mod state;
