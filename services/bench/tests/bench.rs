//! `dossier bench --quick` runs once per test suite, so the benchmark cannot
//! rot: it must exit 0 and report every scenario. Timings are not asserted;
//! they mean nothing on a debug build that shares the machine with the suite.

use std::process::Command;

/// Every scenario name that figures carry (`commands` also reports
/// `projection_lag`).
const SCENARIOS: [&str; 11] = [
    "upload",
    "sealed_blobs",
    "commands",
    "postgres_es",
    "projection_lag",
    "list",
    "console",
    "rebuild",
    "zip_bundle",
    "upload_rss",
    "amqp_intake",
];

#[test]
fn quick_bench_reports_every_scenario() {
    let output = Command::new(env!("CARGO_BIN_EXE_dossier-bench"))
        .args(["--quick", "--json"])
        .output()
        .expect("dossier bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "dossier bench --quick failed ({}):\n{stderr}",
        output.status
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("--json prints one JSON document");
    assert_eq!(report["quick"], true);
    let figures = report["figures"].as_array().expect("figures");
    for scenario in SCENARIOS {
        let found: Vec<&serde_json::Value> = figures
            .iter()
            .filter(|f| f["scenario"] == scenario)
            .collect();
        assert!(!found.is_empty(), "no figure for {scenario}:\n{report:#}");
        for figure in found {
            assert!(figure["metric"].is_string(), "{figure}");
            for key in ["ours", "baseline", "ratio", "goal", "met"] {
                assert!(figure.get(key).is_some(), "{key} missing in {figure}");
            }
        }
    }
}
