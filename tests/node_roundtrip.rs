//! Whole flow: the node binary and a real rclpy peer in another process. The peer publishes
//! good and defective images; results must come back with the input's stamp and frame_id,
//! with heatmap and overlay images, and defective parts must score higher than good ones.
#![cfg(feature = "ros")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
mod common;

use std::process::{Command, Stdio};

use anomaly_inspector::synthetic::SyntheticConfig;
use common::{python, root, ros_env, start_node, synthetic_model};

#[test]
fn node_scores_defects_higher_and_keeps_stamps() {
    let py = python();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig { n_train: 20, n_test_good: 4, n_test_per_defect: 2, ..SyntheticConfig::default() };
    let (ds, model) = synthetic_model(tmp.path(), &cfg, "roundtrip");
    let ros_home = tmp.path().join("ros");
    let domain = 91;
    let mut node = start_node(domain, &ros_home, &[format!("model:={}", model.display())], &tmp.path().join("node.log"));

    let images: Vec<String> = ds.test.iter().map(|s| s.path.to_string_lossy().into_owned()).collect();
    let summary_path = tmp.path().join("summary.json");
    let mut peer = Command::new(py);
    peer.arg(root().join("scripts/image_peer.py"))
        .arg("--images")
        .args(&images)
        .args(["--frame-id", "test_cam", "--summary"])
        .arg(&summary_path)
        .stdout(Stdio::inherit());
    ros_env(&mut peer, domain, &ros_home);
    let status = peer.status().expect("run the rclpy peer");
    let exit = node.stop().expect("node was running");
    let log = std::fs::read_to_string(tmp.path().join("node.log")).unwrap();
    eprintln!("--- node log ---\n{log}");
    assert!(status.success(), "peer failed (missing results?)");
    assert!(exit.success(), "node did not exit cleanly on SIGTERM: {exit:?}");
    assert!(log.contains("model 'roundtrip' (patchcore) loaded"), "no load message");
    assert!(log.contains("on device cpu"), "device not logged");

    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    let frames = summary["frames"].as_array().unwrap();
    assert_eq!(frames.len(), ds.test.len());
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for (f, sample) in frames.iter().zip(&ds.test) {
        assert_eq!(f["received"], true);
        assert_eq!(f["result_stamp_ns"], f["stamp_ns"], "result stamp differs from the input's");
        assert_eq!(f["frame_id"], "test_cam");
        assert_eq!(f["model_id"], "roundtrip");
        assert_eq!(f["method"], "patchcore");
        assert_eq!(f["heatmap"], true, "no heatmap for {}", f["image"]);
        assert_eq!(f["overlay"], true, "no overlay for {}", f["image"]);
        let score = f["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score));
        assert_eq!(f["is_anomalous"].as_bool().unwrap(), score >= f["threshold"].as_f64().unwrap());
        if sample.is_anomalous() {
            bad.push(score)
        } else {
            good.push(score)
        }
    }
    assert_eq!(summary["n_scores"].as_u64().unwrap() as usize, frames.len(), "one Float32 score per frame");
    let max_good = good.iter().cloned().fold(f64::MIN, f64::max);
    let min_bad = bad.iter().cloned().fold(f64::MAX, f64::min);
    eprintln!("good scores {good:?}\ndefect scores {bad:?}");
    assert!(min_bad > max_good, "a defective part scored at or below a good one: {bad:?} vs {good:?}");
}
