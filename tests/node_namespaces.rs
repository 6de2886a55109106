//! Two nodes side by side, as a cell with two cameras runs them: one in /cell1 with its input
//! remapped to /cam1/image_raw, one in /cell2/top. An rclpy peer (tests/peers/namespaces.py)
//! lists every name each node uses, sends frames to each input and sets a parameter. Asserted:
//! every topic and service lives under its node's namespace (only /diagnostics is global), the
//! remap takes, frames reach only their own node, and parameter changes are announced on
//! /parameter_events as `ros2 param` tools expect.
#![cfg(feature = "ros")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
mod common;

use std::process::Command;

use anomaly_inspector::ros::node::OUTPUT_NAMES;
use anomaly_inspector::synthetic::SyntheticConfig;
use common::{python, root, ros_env, synthetic_model, Proc};
use serde_json::Value;

/// This file's own DDS domain.
const DOMAIN: u32 = 88;

fn start(model: &std::path::Path, ns: &str, remap: Option<&str>, ros_home: &std::path::Path, log: &std::path::Path) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_anomaly_inspector_node"));
    cmd.args(["--ros-args", "-p", "device:=cpu", "-p"]).arg(format!("model:={}", model.display()));
    cmd.args(["-r", &format!("__ns:={ns}")]);
    if let Some(r) = remap {
        cmd.args(["-r", r]);
    }
    cmd.stdout(out.try_clone().unwrap()).stderr(out);
    ros_env(&mut cmd, DOMAIN, ros_home);
    Proc(Some(cmd.spawn().expect("start anomaly_inspector_node")))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[test]
fn two_nodes_in_two_namespaces_keep_to_their_own_names() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig { n_train: 10, n_test_good: 1, n_test_per_defect: 0, ..SyntheticConfig::default() };
    let (ds, model) = synthetic_model(dir.path(), &cfg, "m");
    let good = ds.test.iter().find(|s| !s.is_anomalous()).unwrap().path.clone();
    let ros_home = dir.path().join("ros");
    std::fs::create_dir_all(&ros_home).unwrap();
    let mut a = start(&model, "/cell1", Some("image:=/cam1/image_raw"), &ros_home, &dir.path().join("a.log"));
    let mut b = start(&model, "/cell2/top", None, &ros_home, &dir.path().join("b.log"));
    let obs_path = dir.path().join("obs.json");
    let mut peer = Command::new(python());
    peer.arg(root().join("tests/peers/namespaces.py")).arg("--good").arg(&good).arg("--out").arg(&obs_path);
    ros_env(&mut peer, DOMAIN, &ros_home);
    let status = peer.status().expect("run the peer");
    let (ea, eb) = (a.stop(), b.stop());
    let names = ["a.log", "b.log"];
    let logs: Vec<String> = names.iter().map(|l| std::fs::read_to_string(dir.path().join(l)).unwrap()).collect();
    for (l, text) in names.iter().zip(&logs) {
        eprintln!("--- {l} ---\n{text}");
    }
    // input_qos auto follows the publishers of the input's resolved name, remapped or namespaced.
    for (text, input) in logs.iter().zip(["/cam1/image_raw", "/cell2/top/image"]) {
        assert!(text.contains(&format!("input_qos auto: '{input}' is read best effort")), "{input} not resolved");
    }
    assert!(status.success(), "peer failed");
    assert!(ea.is_some_and(|e| e.success()) && eb.is_some_and(|e| e.success()), "nodes did not exit cleanly");
    let obs: Value = serde_json::from_str(&std::fs::read_to_string(&obs_path).unwrap()).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&obs).unwrap());

    for (ns, input) in [("/cell1", "/cam1/image_raw"), ("/cell2/top", "/cell2/top/image")] {
        let node = &obs[ns];
        let publishes = strings(&node["publishes"]);
        for name in OUTPUT_NAMES {
            let expected = if name.starts_with('/') { name.to_string() } else { format!("{ns}/{name}") };
            assert!(publishes.contains(&expected), "{ns}: {expected} not published: {publishes:?}");
        }
        let foreign: Vec<_> = publishes
            .iter()
            .filter(|t| {
                !t.starts_with(&format!("{ns}/")) && !["/diagnostics", "/parameter_events", "/rosout"].contains(&t.as_str())
            })
            .collect();
        assert!(foreign.is_empty(), "{ns} publishes outside its namespace: {foreign:?}");
        let subscribes = strings(&node["subscribes"]);
        assert!(
            subscribes.contains(&input.to_string()) && subscribes.contains(&format!("{ns}/camera_info")),
            "{ns}: {subscribes:?}"
        );
        let services = strings(&node["services"]);
        for s in ["inspect", "teach", "load_model", "set_threshold", "describe", "change_state", "get_state", "set_parameters"] {
            let expected = format!("{ns}/anomaly_inspector/{s}");
            assert!(services.contains(&expected), "{ns}: no {expected} in {services:?}");
        }
        assert!(services.iter().all(|s| s.starts_with(&format!("{ns}/anomaly_inspector/"))), "{ns}: {services:?}");
    }
    // Each input reaches its own node only.
    assert_eq!(obs["answers"]["/cell1"], serde_json::json!({"/cell1": 3, "/cell2/top": 0}));
    assert_eq!(obs["answers"]["/cell2/top"], serde_json::json!({"/cell1": 0, "/cell2/top": 3}));
    // A parameter set on one node is announced for that node, and the other keeps its own.
    assert_eq!(obs["set_ok"], true);
    let events = obs["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["node"] == "/cell1/anomaly_inspector" && e["changed"][0][0] == "threshold" && e["changed"][0][1] == 0.6),
        "no /parameter_events for the change: {events:?}"
    );
    assert_eq!(obs["other_threshold"], 0.5);
}
