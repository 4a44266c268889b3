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
use tracing_subscriber::fmt::format::{Format, Json, JsonFields};
use tracing_subscriber::fmt::{MakeWriter, SubscriberBuilder};

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
        let installed = if std::io::stderr().is_terminal() {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .try_init()
        } else {
            json_logs(filter, std::io::stderr).try_init()
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

/// Makes every panic of the process one log line saying where it happened,
/// without its message: a message can quote what the code was handed (a file
/// name, a customer id), and the service's logs carry ids, never personal
/// data. The default hook would print the message to stderr. For `dossier
/// serve`; tests keep the default hook, whose messages explain a failure.
pub fn log_panics_without_their_messages() {
    std::panic::set_hook(Box::new(log_panic));
}

fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let location = info
        .location()
        .map(|at| format!("{}:{}", at.file(), at.line()))
        .unwrap_or_else(|| "unknown".to_owned());
    let thread = std::thread::current();
    tracing::error!(
        %location,
        thread = thread.name().unwrap_or("unnamed"),
        "a thread panicked; its message is left out of the log (it may quote personal data)"
    );
}

/// The JSON log format of [`init_tracing`], writing to `writer`: one object per
/// line, the event's fields at the top level, the current span's fields under
/// `span` and every open span under `spans`.
fn json_logs<W>(
    filter: EnvFilter,
    writer: W,
) -> SubscriberBuilder<JsonFields, Format<Json>, EnvFilter, W>
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(true)
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

    use std::sync::{Arc, Mutex};

    #[test]
    fn init_tracing_twice_is_harmless() {
        init_tracing();
        init_tracing();
        init_test_tracing();
        // No panic, and a global subscriber is in place that still takes the
        // default filter's events (unless this run's RUST_LOG says otherwise).
        assert!(tracing::dispatcher::has_been_set());
        if std::env::var_os(EnvFilter::DEFAULT_ENV).is_none() {
            assert!(tracing::enabled!(tracing::Level::INFO));
            assert!(!tracing::enabled!(tracing::Level::DEBUG));
        }
    }

    /// Everything written to it, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'writer> MakeWriter<'writer> for Captured {
        type Writer = Self;

        fn make_writer(&'writer self) -> Self {
            self.clone()
        }
    }

    #[test]
    fn json_logs_put_event_fields_at_the_top_level_with_the_span_fields() {
        let captured = Captured::default();
        let subscriber = json_logs(EnvFilter::new("info"), captured.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("relay", tenant = "acme", position = 42_i64);
            let _entered = span.enter();
            tracing::info!(message_id = "m-1", "event published");
            tracing::debug!("below the filter");
        });
        let output = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "one JSON object per line, filtered: {output}"
        );
        let line: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
        assert_eq!(line["level"], "INFO", "{line}");
        // The event's fields at the top level, not under "fields".
        assert_eq!(line["message"], "event published", "{line}");
        assert_eq!(line["message_id"], "m-1", "{line}");
        assert!(line.get("fields").is_none(), "{line}");
        assert!(line["timestamp"].is_string(), "{line}");
        // The current span and its fields, and the span list.
        assert_eq!(line["span"]["name"], "relay", "{line}");
        assert_eq!(line["span"]["tenant"], "acme", "{line}");
        assert_eq!(line["span"]["position"], 42, "{line}");
        assert_eq!(line["spans"][0]["tenant"], "acme", "{line}");
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
