//! What every Dossier process runs on, whatever its role: typed configuration
//! read once at start-up, and telemetry (logs, traces, metrics).

pub mod config;
pub mod retry;
pub mod shutdown;
pub mod telemetry;
