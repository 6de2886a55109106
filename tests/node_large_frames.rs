//! Large frames at the camera's rate, as a camera driver publishes them: rgb8 from 640x480 to
//! 5 MP, best effort (sensor data) and reliable, with every output subscribed. The peer
//! (tests/peers/large_frames.py) publishes lock-step, each frame after the previous result, so
//! every frame must be answered; it runs, as README's "QoS and large frames" tells a camera
//! driver to, with config/fastdds_large_frames.xml. The node uses that profile by itself.
#![cfg(feature = "ros")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
mod common;

use std::process::Command;

use anomaly_inspector::synthetic::SyntheticConfig;
use common::{python, root, ros_env, start_node, synthetic_model};

/// This file's own DDS domain (91-97 and 99 belong to the other whole-flow tests).
const DOMAIN: u32 = 98;

#[test]
fn every_large_frame_is_answered_whatever_the_qos() {
    // 100 frames per size and QoS (about 4 minutes on 2 cores); ANOMALY_INSPECTOR_LARGE_FRAMES=N
    // for a quicker look.
    let frames: usize = std::env::var("ANOMALY_INSPECTOR_LARGE_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let py = python();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig { n_train: 12, n_test_good: 1, n_test_per_defect: 0, ..SyntheticConfig::default() };
    let (_, model) = synthetic_model(tmp.path(), &cfg, "large");
    let ros_home = tmp.path().join("ros");
    let log_path = tmp.path().join("node.log");
    let mut node = start_node(DOMAIN, &ros_home, &[format!("model:={}", model.display())], &log_path);

    let summary_path = tmp.path().join("summary.json");
    let mut peer = Command::new(py);
    peer.arg(root().join("tests/peers/large_frames.py"))
        .args(["--sizes", "640x480,1280x1024,2448x2048", "--qos", "best_effort,reliable"])
        .args(["--frames", &frames.to_string(), "--summary"])
        .arg(&summary_path)
        .env("FASTDDS_DEFAULT_PROFILES_FILE", root().join("config/fastdds_large_frames.xml"));
    ros_env(&mut peer, DOMAIN, &ros_home);
    let status = peer.status().expect("run the rclpy peer");
    let exit = node.stop();
    let log = std::fs::read_to_string(&log_path).unwrap();
    eprintln!("--- node log ---\n{log}");
    assert!(status.success(), "peer failed");
    assert!(exit.is_some_and(|e| e.success()), "node did not exit cleanly: {exit:?}");
    assert!(log.contains("fastdds_large_frames.xml (large frames through shared memory)"), "profile not used");
    // The node's own heatmap and overlay are Image topics too: the input must be found as /image.
    assert!(log.contains("input_qos auto: '/image' is read best effort"), "input resolved to another topic");

    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&summary).unwrap());
    let phases = summary["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 6, "3 sizes x 2 QoS");
    for p in phases {
        let what = format!("{} {}", p["size"], p["qos"]);
        assert_eq!(p["answered"].as_u64(), Some(frames as u64), "{what}: frames lost");
        // Pictures may be skipped while the image thread is busy, but some must arrive, whole.
        for topic in ["map", "heatmap", "overlay"] {
            assert!(p["pictures"][topic].as_u64().unwrap() > 0, "{what}: no {topic} arrived");
        }
        assert_eq!(p["picture_sizes_ok"], true, "{what}: a picture of the wrong size");
        assert_eq!(p["inspect_success"], true, "{what}: ~/inspect failed");
    }
    assert!(summary["markers"].as_u64().unwrap() >= 6 * frames as u64, "one MarkerArray per frame");
}

#[test]
fn a_reliable_camera_without_our_profile_is_followed_and_loses_nothing() {
    // rgb8 and mono8 (a monochrome inspection camera's usual encoding), 640x480 and 5 MP.
    // A camera that knows nothing of config/fastdds_large_frames.xml: frames over 512 KB go over
    // UDP fragments, which a best-effort reader loses (README, "QoS and large frames"). With
    // the default input_qos auto the node reads a reliable camera reliably.
    let frames: usize = std::env::var("ANOMALY_INSPECTOR_LARGE_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig { n_train: 12, n_test_good: 1, n_test_per_defect: 0, ..SyntheticConfig::default() };
    let (_, model) = synthetic_model(tmp.path(), &cfg, "large");
    let ros_home = tmp.path().join("ros");
    let log_path = tmp.path().join("node.log");
    let params = [format!("model:={}", model.display()), "publish_images:=false".into()];
    let mut node = start_node(DOMAIN, &ros_home, &params, &log_path);
    let summary_path = tmp.path().join("summary.json");
    let mut peer = Command::new(python());
    peer.arg(root().join("tests/peers/large_frames.py"))
        .args(["--sizes", "640x480,2448x2048", "--encodings", "rgb8,mono8", "--qos", "reliable", "--settle", "3"])
        .args(["--frames", &frames.to_string(), "--timeout", "5", "--summary"])
        .arg(&summary_path)
        .env_remove("FASTDDS_DEFAULT_PROFILES_FILE")
        .env_remove("FASTRTPS_DEFAULT_PROFILES_FILE");
    ros_env(&mut peer, DOMAIN, &ros_home);
    let status = peer.status().expect("run the rclpy peer");
    let exit = node.stop();
    let log = std::fs::read_to_string(&log_path).unwrap();
    eprintln!("--- node log ---\n{log}");
    assert!(status.success() && exit.is_some_and(|e| e.success()), "peer {status:?}, node {exit:?}");
    assert!(log.contains("now read reliable"), "the node did not follow the reliable camera");
    assert!(log.contains("input_qos auto: '/image' is read best effort"), "input resolved to another topic");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    let phases = summary["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 4, "2 sizes x rgb8 and mono8");
    for p in phases {
        assert_eq!(p["answered"].as_u64(), Some(frames as u64), "{} {} {}: frames lost", p["size"], p["encoding"], p["qos"]);
    }
}

#[test]
fn a_reliable_camera_on_another_host_is_answered_over_udp() {
    // A camera on another host reaches the node over UDP only. Fast DDS's own switch
    // FASTDDS_BUILTIN_TRANSPORTS=UDPv4 on the camera side takes shared memory away, so every
    // frame, and every output the peer subscribes (map, heatmap, overlay), crosses loopback UDP
    // in fragments. Reliable (image_transport's default) is what works there: best effort over
    // UDP loses most frames over half a megabyte whatever the reader does (README, "QoS and
    // large frames", measured with scripts/dds_probe.py --transport udp).
    let frames: usize = std::env::var("ANOMALY_INSPECTOR_LARGE_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig { n_train: 12, n_test_good: 1, n_test_per_defect: 0, ..SyntheticConfig::default() };
    let (_, model) = synthetic_model(tmp.path(), &cfg, "large");
    let ros_home = tmp.path().join("ros");
    let log_path = tmp.path().join("node.log");
    let mut node = start_node(DOMAIN, &ros_home, &[format!("model:={}", model.display())], &log_path);
    let summary_path = tmp.path().join("summary.json");
    let mut peer = Command::new(python());
    peer.arg(root().join("tests/peers/large_frames.py"))
        .args(["--sizes", "640x480,2448x2048", "--qos", "reliable", "--settle", "3"])
        .args(["--frames", &frames.to_string(), "--timeout", "10", "--summary"])
        .arg(&summary_path)
        .env_remove("FASTDDS_DEFAULT_PROFILES_FILE")
        .env_remove("FASTRTPS_DEFAULT_PROFILES_FILE")
        .env("FASTDDS_BUILTIN_TRANSPORTS", "UDPv4");
    ros_env(&mut peer, DOMAIN, &ros_home);
    let status = peer.status().expect("run the rclpy peer");
    let exit = node.stop();
    let log = std::fs::read_to_string(&log_path).unwrap();
    eprintln!("--- node log ---\n{log}");
    assert!(status.success() && exit.is_some_and(|e| e.success()), "peer {status:?}, node {exit:?}");
    assert!(log.contains("now read reliable"), "the node did not follow the reliable camera");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&summary).unwrap());
    let phases = summary["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 2, "2 sizes");
    for p in phases {
        let what = format!("{} over UDP", p["size"]);
        assert_eq!(p["answered"].as_u64(), Some(frames as u64), "{what}: frames lost");
        for topic in ["map", "heatmap", "overlay"] {
            assert!(p["pictures"][topic].as_u64().unwrap() > 0, "{what}: no {topic} arrived");
        }
        assert_eq!(p["picture_sizes_ok"], true, "{what}: a picture of the wrong size");
        assert_eq!(p["inspect_success"], true, "{what}: ~/inspect failed");
    }
}
