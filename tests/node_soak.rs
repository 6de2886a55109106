//! Overload and endurance, short version of `scripts/bench.sh --soak`: a real node is fed at
//! several times the rate it can inspect while the result subscriber and the camera publisher
//! restart, ~/inspect is called every few seconds and the model is reloaded mid-stream
//! (scripts/soak.py does the driving and records; this test asserts).
#![cfg(feature = "ros")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
mod common;

use std::process::Command;

use anomaly_inspector::synthetic::SyntheticConfig;
use common::{python, root, ros_env, synthetic_model};
use serde_json::Value;

#[test]
fn node_survives_overload_restarts_and_reload() {
    let py = python();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig { n_train: 16, n_test_good: 1, n_test_per_defect: 1, ..SyntheticConfig::default() };
    let (ds, model) = synthetic_model(tmp.path(), &cfg, "soak");
    let image = ds.test.iter().find(|s| s.is_anomalous()).unwrap().path.clone();
    let ros_home = tmp.path().join("ros");
    std::fs::create_dir_all(&ros_home).unwrap();
    let report_path = tmp.path().join("soak.json");
    let log_path = tmp.path().join("node.log");
    let mut soak = Command::new(py);
    soak.arg(root().join("scripts/soak.py"))
        .arg("--node")
        .arg(env!("CARGO_BIN_EXE_anomaly_inspector_node"))
        .arg("--model")
        .arg(&model)
        .arg("--image")
        .arg(&image)
        .args(["--seconds", "24", "--rate", "40", "--frame", "320x240", "--restart-every", "5", "--inspect-every", "3"])
        .arg("--out")
        .arg(&report_path)
        .arg("--node-log")
        .arg(&log_path);
    ros_env(&mut soak, 97, &ros_home);
    let status = soak.status().expect("run scripts/soak.py");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    eprintln!(
        "--- node log (tail) ---\n{}",
        log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    assert!(status.success(), "soak.py failed");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    eprintln!("--- report ---\n{}", serde_json::to_string_pretty(&r).unwrap());

    assert_eq!(r["node_alive"], true, "the node died under load");
    assert_eq!(r["node_exit"], 0, "the node did not exit cleanly on SIGTERM");
    let published = r["published"].as_u64().unwrap();
    let results = r["results"].as_u64().unwrap();
    assert!(published >= 400, "the peer published only {published} frames");
    assert!(results >= 20, "only {results} results for {published} frames");
    assert!(results < published, "no frame was dropped at 40 Hz: the overload did not happen");
    // Drops are counted, not hidden.
    let dropped: u64 = r["diagnostics"]["frames_dropped"].as_str().unwrap().parse().unwrap();
    assert!(dropped > 0, "diagnostics report no dropped frames");
    // Peers that came and went did not stop the results.
    assert!(r["peer_restarts"].as_u64().unwrap() >= 3);
    assert!(r["results_after_last_restart"].as_u64().unwrap() > 0, "no results after the last peer restart");
    // Latency stays bounded: the newest frame is inspected, never a growing queue.
    let max_latency = r["latency_ms"]["max"].as_f64().unwrap();
    assert!(max_latency < 5000.0, "latency grew to {max_latency} ms");
    // Every ~/inspect call and the mid-stream reload were answered successfully.
    let calls = r["inspect_calls"].as_array().unwrap();
    assert!(calls.len() >= 5);
    for c in calls {
        assert_eq!(c["success"], true, "~/inspect failed: {c}");
    }
    assert_eq!(r["reload"]["success"], true, "reload failed: {}", r["reload"]);
    // Memory is flat: no growth between the middle and the last third of the run.
    let growth = r["rss_growth_mib"].as_f64().unwrap();
    assert!(growth < 16.0, "resident memory grew by {growth} MiB");
}
