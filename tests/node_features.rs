//! The node's features, each observed by a real rclpy peer in another process
//! (tests/peers/node_features.py) and asserted here: every input encoding, compressed input,
//! bad frames, every output topic, markers, diagnostics, services (inspect, set_threshold,
//! load_model, teach), run-time parameters, the frame policy, and a rosbag2 of the results.
#![cfg(feature = "ros")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anomaly_inspector::synthetic::SyntheticConfig;
use common::{python, root, ros_env, start_node, synthetic_model};
use serde_json::Value;

struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    good: PathBuf,
    defect: PathBuf,
    root: PathBuf,
}

/// One small model for all tests of this file.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SyntheticConfig { n_train: 16, n_test_good: 1, n_test_per_defect: 1, ..SyntheticConfig::default() };
        let (ds, model) = synthetic_model(dir.path(), &cfg, "base");
        let models = dir.path().join("models");
        let good = ds.test.iter().find(|s| !s.is_anomalous()).unwrap().path.clone();
        let defect = ds.test.iter().find(|s| s.defect.as_deref() == Some("scratch")).unwrap().path.clone();
        Fixture { model, good, defect, root: models, _dir: dir }
    })
}

/// Starts the node with `params`, runs the peer with `peer_args`, stops the node; returns the
/// peer's observations and the node's log.
fn run_scenario(domain: u32, node_params: &[String], peer_args: &[String]) -> (Value, String) {
    let f = fixture();
    let py = python();
    let tmp = tempfile::tempdir().unwrap();
    let ros_home = tmp.path().join("ros");
    let log_path = tmp.path().join("node.log");
    let mut params = vec![format!("model:={}", f.model.display()), format!("model_root:={}", f.root.display())];
    params.extend(node_params.iter().cloned());
    let mut node = start_node(domain, &ros_home, &params, &log_path);

    let obs_path = tmp.path().join("obs.json");
    let mut peer = Command::new(py);
    peer.arg(root().join("tests/peers/node_features.py"))
        .arg("--good")
        .arg(&f.good)
        .arg("--defect")
        .arg(&f.defect)
        .arg("--out")
        .arg(&obs_path)
        .args(peer_args);
    ros_env(&mut peer, domain, &ros_home);
    let status = peer.status().expect("run the peer");
    let exit = node.stop();
    let log = std::fs::read_to_string(&log_path).unwrap();
    eprintln!("--- node log ---\n{log}");
    assert!(status.success(), "peer failed");
    assert!(exit.is_some_and(|e| e.success()), "node did not exit cleanly: {exit:?}");
    let obs: Value = serde_json::from_str(&std::fs::read_to_string(&obs_path).unwrap()).unwrap();
    eprintln!("--- observations ---\n{}", serde_json::to_string_pretty(&obs).unwrap());
    (obs, log)
}

fn score(v: &Value) -> f64 {
    v["score"].as_f64().unwrap_or_else(|| panic!("no result: {v}"))
}

#[test]
fn inputs_outputs_services_parameters_and_bag() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let bag = tmp.path().join("results_bag");
    let (obs, log) = run_scenario(
        92,
        &["working_distance:=0.5".into()],
        &[
            "--model".into(),
            f.model.display().to_string(),
            "--taught-name".into(),
            "taught".into(),
            "--bag".into(),
            bag.display().to_string(),
        ],
    );

    // Every encoding of the same picture gets a result; colour orders give the same score,
    // and so do the grey encodings among themselves (mono16 keeps the high byte).
    let enc = &obs["encodings"];
    let rgb = score(&enc["rgb8"]);
    for k in ["bgr8", "rgba8", "bgra8", "rgb8_pad"] {
        assert!((score(&enc[k]) - rgb).abs() < 1e-4, "{k} differs from rgb8: {enc}");
    }
    let mono = score(&enc["mono8"]);
    for k in ["mono8_pad", "mono16", "mono16_be"] {
        assert!((score(&enc[k]) - mono).abs() < 1e-4, "{k} differs from mono8: {enc}");
    }
    assert!(enc["rgb8"]["is_anomalous"].as_bool().unwrap(), "the scratch must be flagged");

    // Bad frames: no result, logged once per kind, and the node goes on.
    assert_eq!(obs["bad_frames_got_results"], 0);
    assert!(obs["after_bad"]["score"].is_number(), "node stopped serving after bad frames");
    assert!(log.contains("yuv422_weird"), "unknown encoding not reported");

    // Outputs of one frame, all with the input's header.
    let out = &obs["outputs"];
    let stamp = &out["result"]["stamp"];
    assert!(stamp.is_number());
    assert_eq!(out["result"]["frame_id"], "cam");
    let n_regions = out["result"]["n_regions"].as_u64().unwrap();
    assert!(n_regions >= 1, "the scratch must give a region");
    assert_eq!(out["map"]["encoding"], "32FC1");
    assert_eq!(out["map"]["w"], 256);
    assert_eq!(out["map"]["step"], 256 * 4);
    assert!(out["map"]["max"].as_f64().unwrap() >= 0.5 && out["map"]["min"].as_f64().unwrap() >= 0.0);
    for k in ["heatmap", "overlay"] {
        assert_eq!(out[k]["encoding"], "rgb8");
        assert_eq!(out[k]["frame_id"], "cam");
        assert_eq!((out[k]["w"].as_u64(), out[k]["h"].as_u64()), (Some(256), Some(256)));
    }
    assert_eq!(out["markers"]["first_action"], 3, "marker arrays start with DELETEALL");
    assert_eq!(out["markers"]["n"].as_u64().unwrap(), 1 + 3 * n_regions);
    assert_eq!(out["markers"]["frame_id"], "cam");
    for z in out["markers"]["sphere_z"].as_array().unwrap() {
        assert!((z.as_f64().unwrap() - 0.5).abs() < 1e-9, "centroids lie on the plane z = working_distance");
    }
    assert_eq!(out["latched_verdict"], true, "a late subscriber gets the latest verdict");
    let diag = &out["diag"];
    assert_eq!(diag["level"], 0, "diagnostics OK while inspecting: {diag}");
    assert_eq!(diag["values"]["model"], "base");
    assert!(diag["values"]["frames_rejected"].as_str().unwrap().parse::<u64>().unwrap() >= 3);

    // Region of interest set at run time: nothing outside it, results in full-frame pixels.
    assert_eq!(obs["roi_set"], true);
    let roi = &obs["roi"];
    assert_eq!(roi["map_size"], serde_json::json!([256, 256]));
    assert_eq!(roi["max_outside"].as_f64().unwrap(), 0.0);
    for r in roi["result"]["regions"].as_array().unwrap() {
        assert!(r["x"].as_u64().unwrap() >= 128, "region outside the roi: {r}");
    }
    assert!(obs["after_bad_param"]["threshold"].as_f64().unwrap() <= 1.0, "refused parameter was applied");
    assert!(log.contains("refused"), "invalid parameter not reported");

    // Services.
    let none = &obs["inspect_no_frame"];
    assert_eq!(none["success"], false);
    assert!(none["message"].as_str().unwrap().contains("no fresh frame"), "{none}");
    assert!(none["seconds"].as_f64().unwrap() < 5.0, "timeout not honoured");
    let insp = &obs["inspect"];
    assert_eq!(insp["success"], true, "{insp}");
    assert_eq!(insp["stamp"], insp["expected_stamp"], "inspect must return the frame published after the call");
    assert_eq!(obs["set_threshold"]["success"], true);
    assert!((obs["after_threshold"]["threshold"].as_f64().unwrap() - 0.99).abs() < 1e-6);
    assert_eq!(obs["set_threshold_bad"]["success"], false);
    assert_eq!(obs["load_bad"]["success"], false);
    assert!(obs["load_bad"]["message"].as_str().unwrap().contains("/nonexistent/model"));
    assert_eq!(obs["after_load_bad"]["model_id"], "base", "a failed load must keep the model");
    assert_eq!(obs["load_good"]["success"], true);
    assert_eq!(obs["teach_too_few"]["success"], false);
    assert_eq!(obs["teach_bad_name"]["success"], false);
    let teach = &obs["teach"];
    assert_eq!(teach["success"], true, "{teach}");
    assert_eq!(teach["frames_used"], 6);
    let taught = Path::new(teach["model_path"].as_str().unwrap());
    assert_eq!(taught, f.root.join("taught"));
    assert!(taught.join("model.json").is_file(), "taught model not written");
    assert_eq!(std::fs::read_dir(f.root.join("taught.frames/train/good")).unwrap().count(), 6, "teach frames kept");
    assert_eq!(obs["after_teach"]["model_id"], "taught", "node must switch to the taught model");

    // The rosbag2 written from the results reads back identically.
    let b = &obs["bag"];
    assert!(b["written"].as_u64().unwrap() >= 15);
    assert_eq!(b["read"], b["written"]);
    assert_eq!(b["scores_match"], true);
    assert!(b["files"].as_array().unwrap().iter().any(|f| f.as_str().unwrap().ends_with(".mcap")));
}

#[test]
fn compressed_input_jpeg_and_png() {
    // Also the output QoS override: results published best effort, as asked.
    let (obs, log) = run_scenario(
        93,
        &["input_transport:=compressed".into(), "output_qos:=best_effort".into()],
        &["--compressed".into(), "--best-effort".into(), "--scenario".into(), "compressed".into()],
    );
    assert_eq!(obs["result_reliability"], serde_json::json!(["BEST_EFFORT"]), "output_qos not applied");
    assert!(log.contains("waiting for frames on 'image/compressed'"));
    for fmt in ["jpeg", "png"] {
        assert!(score(&obs[format!("{fmt}_defect")]) > score(&obs[format!("{fmt}_good")]), "{fmt}: {obs}");
    }
    assert!(obs["truncated_jpeg"].is_null(), "a truncated JPEG must not produce a result");
    assert!(obs["after_truncated"]["score"].is_number(), "node must go on after a corrupt frame");
}

#[test]
fn frames_faster_than_inference_keep_only_the_newest() {
    let (obs, _) = run_scenario(94, &[], &["--scenario".into(), "policy".into()]);
    let sent = obs["sent"].as_u64().unwrap();
    let received = obs["received"].as_u64().unwrap();
    assert!(received < sent, "all {sent} frames inspected: was the node not overloaded?");
    assert_eq!(obs["last_received"], true, "the newest frame must always be inspected");
    // Latency stays bounded: the last frame's result comes about one inference after it was
    // sent, not after the backlog of 60 frames (generous bound for a loaded 2-core machine).
    assert!(obs["last_latency_s"].as_f64().unwrap() < 3.0, "{obs}");
    let dropped: u64 = obs["diag"]["frames_dropped"].as_str().unwrap().parse().unwrap();
    assert!(dropped > 0, "drops must be counted");
    assert!(dropped + received <= sent + 1);
    // The node's own share of the latency (mailbox, conversion, messages) is reported, and is a
    // part of the latency, not more.
    let own: f64 = obs["diag"]["node_overhead_median_ms"].as_str().unwrap().parse().unwrap();
    let max: f64 = obs["diag"]["latency_max_ms"].as_str().unwrap().parse().unwrap();
    let wait: f64 = obs["diag"]["queue_wait_median_ms"].as_str().unwrap().parse().unwrap();
    assert!(own >= 0.0 && own <= max, "node overhead {own} ms vs latency max {max} ms: {obs}");
    assert!(wait >= 0.0 && wait <= max, "queue wait {wait} ms vs latency max {max} ms: {obs}");
}
