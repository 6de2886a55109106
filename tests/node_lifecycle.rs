//! The node as a managed (lifecycle) node, driven by a real rclpy lifecycle client in another
//! process (tests/peers/lifecycle.py) through the standard lifecycle_msgs services: every
//! transition, the refused ones, the transition events, and in each state whether frames are
//! inspected and what `~/inspect` answers. Also the default (unmanaged) start: active at once.
#![cfg(feature = "ros")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
mod common;

use std::process::Command;
use std::sync::Mutex;

use anomaly_inspector::synthetic::SyntheticConfig;
use common::{python, root, ros_env, run_peer_beside, start_node, synthetic_model, PeerRun};
use serde_json::Value;

/// This file's own DDS domain.
const DOMAIN: u32 = 89;

/// One node at a time on the domain and the 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the client against a node started with `params` (plus the model); returns its
/// observations and the node's log.
fn drive(unmanaged: bool) -> (Value, String) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig { n_train: 10, n_test_good: 1, n_test_per_defect: 0, ..SyntheticConfig::default() };
    let (ds, model) = synthetic_model(dir.path(), &cfg, "good");
    let good = ds.test.iter().find(|s| !s.is_anomalous()).unwrap().path.clone();
    // A model whose model.json reads but whose weights are cut short: configure must fail.
    let broken = dir.path().join("models/broken");
    std::fs::create_dir_all(&broken).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
        }
    }
    let bank = broken.join("memory_bank.safetensors");
    let bytes = std::fs::read(&bank).unwrap();
    std::fs::write(&bank, &bytes[..bytes.len() / 2]).unwrap();

    let ros_home = dir.path().join("ros");
    let log_path = dir.path().join("node.log");
    let params = if unmanaged {
        vec![format!("model:={}", model.display())]
    } else {
        vec![format!("model:={}", broken.display()), "managed:=true".into()]
    };
    let mut node = start_node(DOMAIN, &ros_home, &params, &log_path);
    let obs_path = dir.path().join("obs.json");
    let mut peer = Command::new(python());
    peer.arg(root().join("tests/peers/lifecycle.py"))
        .arg("--good")
        .arg(&good)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&obs_path);
    if unmanaged {
        peer.arg("--unmanaged");
    }
    ros_env(&mut peer, DOMAIN, &ros_home);
    let PeerRun { peer: status, node_alive: alive, node_exit: exit, log } = run_peer_beside(&mut node, &mut peer, &log_path);
    assert!(alive && status.success(), "node alive {alive}, peer {status:?}");
    assert!(exit.is_some_and(|e| e.success()), "node did not exit cleanly: {exit:?}");
    let obs: Value = serde_json::from_str(&std::fs::read_to_string(&obs_path).unwrap()).unwrap();
    eprintln!("--- observations ---\n{}", serde_json::to_string_pretty(&obs).unwrap());
    (obs, log)
}

/// The step named `name`.
fn step<'a>(obs: &'a Value, name: &str) -> &'a Value {
    obs["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("no step {name}"))
}

/// (success, state after, frames answered of 4, ~/inspect succeeded)
fn outcome(s: &Value) -> (bool, &str, u64, bool) {
    (
        s["success"].as_bool().unwrap(),
        s["state"].as_str().unwrap(),
        s["frames_answered"].as_u64().unwrap(),
        s["inspect"][0].as_bool().unwrap(),
    )
}

#[test]
fn a_lifecycle_client_takes_the_managed_node_through_every_transition() {
    let (obs, log) = drive(false);
    // Managed start-up: unconfigured, nothing inspected, ~/inspect says why.
    assert_eq!(obs["start_state"], "unconfigured");
    assert_eq!(obs["start_available"], serde_json::json!(["configure", "unconfigured_shutdown"]));
    assert_eq!(obs["start_frames_answered"], 0);
    assert!(obs["start_inspect"][1].as_str().unwrap().contains("inactive"), "{}", obs["start_inspect"]);
    assert_eq!(obs["states"].as_array().unwrap().len(), 11);
    assert_eq!(obs["graph"].as_array().unwrap().len(), 25);

    assert_eq!(outcome(step(&obs, "activate_refused")), (false, "unconfigured", 0, false));
    assert_eq!(outcome(step(&obs, "configure_broken")), (false, "unconfigured", 0, false), "damaged weights: configure fails");
    assert!(log.contains("configuring failed"), "the reason is logged");
    assert_eq!(obs["set_good_model"], true);
    assert_eq!(outcome(step(&obs, "configure")), (true, "inactive", 0, false));
    assert!(step(&obs, "configure")["inspect"][1].as_str().unwrap().contains("inactive"));
    assert_eq!(step(&obs, "configure")["available"], serde_json::json!(["cleanup", "activate", "inactive_shutdown"]));
    assert_eq!(outcome(step(&obs, "activate")), (true, "active", 4, true));
    // ~/describe (std_srvs/Trigger, JSON): nothing loaded while unconfigured; then the model.
    let before = &obs["start_describe"];
    assert_eq!((before["lifecycle_state"].as_str(), before["model"].is_null()), (Some("unconfigured"), true), "{before}");
    assert_eq!(before["parameters"]["managed"], true);
    let d = &obs["active_describe"];
    assert_eq!((d["lifecycle_state"].as_str(), d["model"]["model_id"].as_str()), (Some("active"), Some("good")), "{d}");
    assert_eq!(d["model"]["method"], "patchcore");
    assert!(d["model"]["model_json"]["calibration"]["image_threshold"].as_f64().unwrap() > 0.0, "{d}");
    assert_eq!(d["model"]["model_json"]["training"]["data"], "synthetic", "the training summary: {d}");
    assert!(d["model"]["device"].as_str().unwrap().starts_with("cpu"), "{d}");
    assert_eq!(d["parameters"]["model"], d["model"]["model_dir"]);
    assert!(d["frames_inspected"].as_u64().unwrap() >= 4, "{d}");
    assert_eq!(outcome(step(&obs, "deactivate")), (true, "inactive", 0, false));
    assert_eq!(outcome(step(&obs, "activate_again")), (true, "active", 4, true));
    assert_eq!(outcome(step(&obs, "deactivate_again")), (true, "inactive", 0, false));
    assert_eq!(outcome(step(&obs, "cleanup")), (true, "unconfigured", 0, false));
    assert_eq!(obs["load_model_unconfigured"][0], false, "no model is loaded while unconfigured");
    assert!(obs["load_model_unconfigured"][1].as_str().unwrap().contains("configure"));
    assert_eq!(outcome(step(&obs, "configure_again")), (true, "inactive", 0, false));
    assert_eq!(outcome(step(&obs, "activate_third")), (true, "active", 4, true));
    assert_eq!(outcome(step(&obs, "shutdown")), (true, "finalized", 0, false));
    assert_eq!(step(&obs, "shutdown")["available"], serde_json::json!([]));
    assert_eq!(outcome(step(&obs, "configure_after_shutdown")), (false, "finalized", 0, false));

    // Each change announced on ~/transition_event: (start, goal) in order.
    let events: Vec<(String, String)> = obs["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[2].as_str().unwrap().to_string(), e[3].as_str().unwrap().to_string()))
        .collect();
    let expected = [
        ("unconfigured", "configuring"),
        ("configuring", "unconfigured"),
        ("unconfigured", "configuring"),
        ("configuring", "inactive"),
        ("inactive", "activating"),
        ("activating", "active"),
        ("active", "deactivating"),
        ("deactivating", "inactive"),
        ("inactive", "activating"),
        ("activating", "active"),
        ("active", "deactivating"),
        ("deactivating", "inactive"),
        ("inactive", "cleaningup"),
        ("cleaningup", "unconfigured"),
        ("unconfigured", "configuring"),
        ("configuring", "inactive"),
        ("inactive", "activating"),
        ("activating", "active"),
        ("active", "shuttingdown"),
        ("shuttingdown", "finalized"),
    ];
    let expected: Vec<(String, String)> = expected.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(events, expected);
    assert_eq!(obs["events"][1][1], "configure_failure");
}

#[test]
fn the_default_start_is_active_and_a_client_can_still_deactivate_it() {
    let (obs, _) = drive(true);
    assert_eq!(obs["start_state"], "active");
    assert_eq!(obs["start_frames_answered"], 4);
    assert_eq!(obs["start_inspect"][0], true);
    assert_eq!(outcome(step(&obs, "deactivate")), (true, "inactive", 0, false));
    assert_eq!(outcome(step(&obs, "activate")), (true, "active", 4, true));
}
