//! Telemetry in one place: structured logs through `tracing`, and metrics through
//! the `metrics` facade rendered in Prometheus' text format by the API's
//! `/metrics`.
//!
//! Logs go to stderr: JSON (one object per line, event fields at the top level,
//! with the current span's fields) when stderr is not a terminal, so log
//! collectors can index tenant, aggregate id, position and message id; readable
//! text on a terminal, for people. Both set-up functions are idempotent, because
//! tests (and every role of `dossier serve`) may call them more than once.

use std::io::IsTerminal as _;
use std::sync::{Once, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// The log filter when `RUST_LOG` is unset or invalid.
pub const DEFAULT_LOG_FILTER: &str = "info,dossier=info";

/// Histogram buckets for metrics whose name ends in `_seconds` (durations): from
/// a fast query to a slow bundle.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Histogram buckets for metrics whose name ends in `_bytes` (sizes): 1 KiB to
/// 1 GiB in powers of four, which covers files up to the limit and bundles.
const BYTES_BUCKETS: &[f64] = &[
    1024.0,
    4096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
];

/// How often the Prometheus recorder's upkeep runs. Without it, histogram and
/// summary data would grow without bound between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the global `tracing` subscriber: JSON logs on a non-terminal stderr,
/// human-readable on a terminal, filtered by `RUST_LOG` (default
/// [`DEFAULT_LOG_FILTER`]). Also routes `log` records of dependencies into it.
///
/// Safe to call more than once: later calls do nothing, and so does a call when
/// another global subscriber is already installed (a test's, say).
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let (filter, rejected) = filter_from_env();
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let installed = if std::io::stderr().is_terminal() {
            builder.try_init()
        } else {
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .try_init()
        };
        if installed.is_ok()
            && let Some(spec) = rejected
        {
            tracing::warn!(
                rust_log = %spec,
                default = DEFAULT_LOG_FILTER,
                "RUST_LOG could not be parsed; logging with the default filter instead"
            );
        }
    });
}

/// Like [`init_tracing`], but for tests: readable logs through the test
/// harness' capture, so they show only for failing tests.
pub fn init_test_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let (filter, _) = filter_from_env();
        // An error means a subscriber is already installed: keep that one.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// The filter from `RUST_LOG`, or the default; the second value is a `RUST_LOG`
/// that was set but did not parse, to be reported once logging works.
fn filter_from_env() -> (EnvFilter, Option<String>) {
    match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(filter) => (filter, None),
            Err(_) => (EnvFilter::new(DEFAULT_LOG_FILTER), Some(spec)),
        },
        _ => (EnvFilter::new(DEFAULT_LOG_FILTER), None),
    }
}

/// Installs the Prometheus recorder as the global `metrics` recorder, once, and
/// returns a handle whose [`PrometheusHandle::render`] produces the `/metrics`
/// body. Later calls return a clone of the same handle.
///
/// Histograms whose names end in `_seconds` or `_bytes` get fixed buckets (real
/// Prometheus histograms, which add up across processes); other histograms are
/// summaries. A background thread runs the recorder's upkeep.
///
/// If another global recorder was installed first, that one keeps receiving the
/// metrics, a warning is logged, and the returned handle renders an empty page
/// rather than failing start-up.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES_BUCKETS)
                })
                // Deliberate panic: the only error is an empty bucket list, and
                // both lists are non-empty constants.
                .expect("bucket lists are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => spawn_upkeep(handle.clone()),
                Err(_) => tracing::warn!(
                    "another metrics recorder is already installed; /metrics will be empty"
                ),
            }
            handle
        })
        .clone()
}

fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "could not start the metrics upkeep thread; histogram memory will grow");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_tracing_twice_is_harmless() {
        init_tracing();
        init_tracing();
        init_test_tracing();
        tracing::info!("still logging");
    }

    #[test]
    fn metrics_are_installed_once_and_rendered() {
        let first = install_metrics();
        let second = install_metrics();
        metrics::counter!("dossier_telemetry_test_total").increment(2);
        metrics::histogram!("dossier_telemetry_test_seconds").record(0.2);
        let page = second.render();
        assert!(page.contains("dossier_telemetry_test_total 2"), "{page}");
        // `_seconds` histograms have buckets, not quantiles.
        assert!(
            page.contains("dossier_telemetry_test_seconds_bucket{le=\"0.25\"} 1"),
            "{page}"
        );
        assert!(first.render().contains("dossier_telemetry_test_total 2"));
    }
}
