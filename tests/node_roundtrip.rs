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

/// A tiled model in the node: the frame is cut, inspected tile by tile and stitched without the
/// node knowing; the verdict, regions and heatmap come in the frame's pixels.
#[test]
fn node_runs_a_tiled_model_on_large_frames_transparently() {
    let py = python();
    let tmp = tempfile::tempdir().unwrap();
    let mosaics = common::MosaicData::write(tmp.path());
    let model = tmp.path().join("tiled");
    let mut config = anomaly_inspector::config::PatchCoreConfig::default();
    config.preprocess.resize = anomaly_inspector::Resize::tiles(1.0);
    config.coreset.ratio = 0.05;
    let ds = anomaly_inspector::dataset::MvtecDataset::open(&mosaics.frames).unwrap();
    let options = anomaly_inspector::training::FitOptions { name: "tiled".into(), ..Default::default() };
    let weights = anomaly_inspector::config::default_backbone_weights();
    anomaly_inspector::training::fit_patchcore(
        &ds.train_good,
        "mosaics",
        &config,
        &weights,
        tch::Device::Cpu,
        &model,
        &options,
        &mut |_, _, _| {},
    )
    .unwrap();

    let ros_home = tmp.path().join("ros");
    let domain = 90;
    let mut node = start_node(domain, &ros_home, &[format!("model:={}", model.display())], &tmp.path().join("node.log"));
    let (summary_path, saved) = (tmp.path().join("summary.json"), tmp.path().join("saved"));
    let mut peer = Command::new(py);
    peer.arg(root().join("scripts/image_peer.py"))
        .arg("--images")
        .arg(&mosaics.good)
        .arg(&mosaics.scratch)
        .arg("--save-dir")
        .arg(&saved)
        .arg("--summary")
        .arg(&summary_path)
        .stdout(Stdio::inherit());
    ros_env(&mut peer, domain, &ros_home);
    let status = peer.status().expect("run the rclpy peer");
    node.stop();
    eprintln!("--- node log ---\n{}", std::fs::read_to_string(tmp.path().join("node.log")).unwrap());
    assert!(status.success(), "peer failed (missing results?)");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    let frames = summary["frames"].as_array().unwrap();
    let (good, bad) = (&frames[0], &frames[1]);
    assert_eq!((good["received"].as_bool(), bad["received"].as_bool()), (Some(true), Some(true)));
    let score = |f: &serde_json::Value| f["score"].as_f64().unwrap();
    assert!(score(bad) > score(good) + 0.1, "scratch frame {} vs good frame {}", score(bad), score(good));
    assert_eq!(bad["is_anomalous"], true);
    let regions = bad["regions"].as_array().unwrap();
    assert!(!regions.is_empty());
    for r in regions {
        let v = |k: &str| r[k].as_u64().unwrap() as u32;
        assert!(
            common::MosaicData::in_scratched_cell(v("x"), v("y"), v("w"), v("h")),
            "a region outside the scratched cell: {r}"
        );
    }
    let heatmap = image::open(bad["heatmap_png"].as_str().unwrap()).unwrap();
    assert_eq!((heatmap.width(), heatmap.height()), (512, 512), "the stitched heatmap covers the frame");
}
