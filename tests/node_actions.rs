//! The `~/inspect` action with a real rclpy ActionClient (tests/peers/inspect_action.py): a
//! goal over several frames with feedback after each, a cancelled goal keeping the frames
//! inspected so far, and goals aborted with a reason (no camera, too many frames).
#![cfg(feature = "ros")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
mod common;

use std::process::Command;

use anomaly_inspector::synthetic::SyntheticConfig;
use common::{python, root, ros_env, run_peer_beside, start_node, synthetic_model};
use serde_json::Value;

/// This file's own DDS domain.
const DOMAIN: u32 = 87;

#[test]
fn inspect_action_gives_feedback_per_frame_and_can_be_cancelled() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig { n_train: 12, n_test_good: 1, n_test_per_defect: 1, ..SyntheticConfig::default() };
    let (ds, model) = synthetic_model(tmp.path(), &cfg, "action");
    let good = ds.test.iter().find(|s| !s.is_anomalous()).unwrap().path.clone();
    let bad = ds.test.iter().find(|s| s.is_anomalous()).unwrap().path.clone();
    let ros_home = tmp.path().join("ros");
    let log_path = tmp.path().join("node.log");
    let mut node = start_node(DOMAIN, &ros_home, &[format!("model:={}", model.display())], &log_path);
    let obs_path = tmp.path().join("obs.json");
    let mut peer = Command::new(python());
    peer.arg(root().join("tests/peers/inspect_action.py")).arg("--images").arg(&good).arg(&bad).arg("--out").arg(&obs_path);
    ros_env(&mut peer, DOMAIN, &ros_home);
    let run = run_peer_beside(&mut node, &mut peer, &log_path);
    assert!(run.node_alive, "the node died during the goals: {:?}", run.node_exit);
    assert!(run.peer.success(), "peer failed");
    assert!(run.node_exit.is_some_and(|e| e.success()), "node did not exit cleanly: {:?}", run.node_exit);
    let obs: Value = serde_json::from_str(&std::fs::read_to_string(&obs_path).unwrap()).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&obs).unwrap());
    assert_eq!(obs["server"], true, "no ~/inspect action server");

    // Three frames: one feedback per frame, in order, each naming the frame the result holds.
    let several = &obs["several"];
    assert_eq!(several["status"], "succeeded", "{several}");
    assert_eq!(several["success"], true);
    let flagged = several["results"].as_array().unwrap().iter().filter(|r| r["is_anomalous"] == true).count();
    assert_eq!(several["message"], format!("3 frames inspected, {flagged} anomalous"));
    let results = several["results"].as_array().unwrap();
    let feedback = several["feedback"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(feedback.len(), 3, "one feedback per frame");
    let stamps: Vec<u64> = results.iter().map(|r| r["stamp_ns"].as_u64().unwrap()).collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "three distinct frames in order: {stamps:?}");
    for (i, (f, r)) in feedback.iter().zip(results).enumerate() {
        assert_eq!(f["frames_done"].as_u64(), Some(i as u64 + 1));
        assert_eq!(f["frames_requested"].as_u64(), Some(3));
        assert_eq!(f["stamp_ns"], r["stamp_ns"]);
        assert_eq!(r["frame_id"], "camera_optical");
    }
    // The part's verdict is the frames' verdicts taken together.
    let any = results.iter().any(|r| r["is_anomalous"] == true);
    let max = results.iter().map(|r| r["score"].as_f64().unwrap()).fold(f64::MIN, f64::max);
    assert_eq!(several["is_anomalous"].as_bool(), Some(any));
    assert!((several["max_score"].as_f64().unwrap() - max).abs() < 1e-6);
    // Good and defective frames alternate: over three frames the defect is seen.
    assert!(any, "the defective frame was not flagged: {results:?}");

    let cancelled = &obs["cancelled"];
    assert_eq!(cancelled["status"], "canceled", "{cancelled}");
    assert_eq!(cancelled["success"], false);
    let kept = cancelled["results"].as_array().unwrap().len();
    assert!((2..50).contains(&kept), "the frames inspected before the cancel are kept: {kept}");
    assert!(cancelled["message"].as_str().unwrap().starts_with("cancelled after"), "{cancelled}");

    let no_camera = &obs["no_camera"];
    assert_eq!(no_camera["status"], "aborted", "{no_camera}");
    assert!(no_camera["message"].as_str().unwrap().contains("no fresh frame inspected within 1.0 s"), "{no_camera}");
    assert!(no_camera["results"].as_array().unwrap().is_empty());

    let too_many = &obs["too_many"];
    assert_eq!(too_many["status"], "aborted", "{too_many}");
    assert!(too_many["message"].as_str().unwrap().contains("at most 1000"), "{too_many}");
}
