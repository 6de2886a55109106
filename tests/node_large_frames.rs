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
use serde_json::Value;

/// This file's own DDS domain (91-97 and 99 belong to the other whole-flow tests).
const DOMAIN: u32 = 98;

/// Frames per phase: `default`, or ANOMALY_INSPECTOR_LARGE_FRAMES=N for a quicker look.
fn frames_per_phase(default: usize) -> usize {
    std::env::var("ANOMALY_INSPECTOR_LARGE_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Starts the node (on a small synthetic model, with `params`) and runs
/// tests/peers/large_frames.py beside it with `peer_args` and its environment set by
/// `peer_env`; both must end cleanly. Returns the node's log and the peer's summary.
fn run_beside_node(params: &[&str], peer_args: &[&str], peer_env: impl FnOnce(&mut Command)) -> (String, Value) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig { n_train: 12, n_test_good: 1, n_test_per_defect: 0, ..SyntheticConfig::default() };
    let (_, model) = synthetic_model(tmp.path(), &cfg, "large");
    let ros_home = tmp.path().join("ros");
    let log_path = tmp.path().join("node.log");
    let mut params: Vec<String> = params.iter().map(|p| p.to_string()).collect();
    params.push(format!("model:={}", model.display()));
    let mut node = start_node(DOMAIN, &ros_home, &params, &log_path);
    let summary_path = tmp.path().join("summary.json");
    let mut peer = Command::new(python());
    peer.arg(root().join("tests/peers/large_frames.py")).args(peer_args).arg("--summary").arg(&summary_path);
    peer_env(&mut peer);
    ros_env(&mut peer, DOMAIN, &ros_home);
    let status = peer.status().expect("run the rclpy peer");
    let exit = node.stop();
    let log = std::fs::read_to_string(&log_path).unwrap();
    eprintln!("--- node log ---\n{log}");
    assert!(status.success() && exit.is_some_and(|e| e.success()), "peer {status:?}, node {exit:?}");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&summary).unwrap());
    (log, summary)
}

/// A camera that knows nothing of our profile (the peer's environment without it).
fn without_our_profile(peer: &mut Command) {
    peer.env_remove("FASTDDS_DEFAULT_PROFILES_FILE").env_remove("FASTRTPS_DEFAULT_PROFILES_FILE");
}

/// Every frame of every phase answered; with `pictures`, map, heatmap and overlay arrived whole
/// and `~/inspect` answered too.
fn assert_all_answered(summary: &Value, phases: usize, frames: usize, pictures: bool) {
    let all = summary["phases"].as_array().unwrap();
    assert_eq!(all.len(), phases);
    for p in all {
        let what = format!("{} {} {}", p["size"], p["encoding"], p["qos"]);
        assert_eq!(p["answered"].as_u64(), Some(frames as u64), "{what}: frames lost");
        if pictures {
            // Pictures may be skipped while the image thread is busy, but some must arrive, whole.
            for topic in ["map", "heatmap", "overlay"] {
                assert!(p["pictures"][topic].as_u64().unwrap() > 0, "{what}: no {topic} arrived");
            }
            assert_eq!(p["picture_sizes_ok"], true, "{what}: a picture of the wrong size");
            assert_eq!(p["inspect_success"], true, "{what}: ~/inspect failed");
        }
    }
}

#[test]
fn every_large_frame_is_answered_whatever_the_qos() {
    // 100 frames per size and QoS (about 4 minutes on 2 cores).
    let frames = frames_per_phase(100);
    let profile = root().join("config/fastdds_large_frames.xml");
    let (log, summary) = run_beside_node(
        &[],
        &["--sizes", "640x480,1280x1024,2448x2048", "--qos", "best_effort,reliable", "--frames", &frames.to_string()],
        |peer| {
            peer.env("FASTDDS_DEFAULT_PROFILES_FILE", &profile);
        },
    );
    assert!(log.contains("fastdds_large_frames.xml (large frames through shared memory)"), "profile not used");
    // The node's own heatmap and overlay are Image topics too: the input must be found as /image.
    assert!(log.contains("input_qos auto: '/image' is read best effort"), "input resolved to another topic");
    assert_all_answered(&summary, 6, frames, true);
    assert!(summary["markers"].as_u64().unwrap() >= 6 * frames as u64, "one MarkerArray per frame");
}

#[test]
fn a_reliable_camera_without_our_profile_is_followed_and_loses_nothing() {
    // rgb8 and mono8 (a monochrome inspection camera's usual encoding), 640x480 and 5 MP.
    // A camera that knows nothing of config/fastdds_large_frames.xml: frames over 512 KB go over
    // UDP fragments, which a best-effort reader loses (README, "QoS and large frames"). With
    // the default input_qos auto the node reads a reliable camera reliably.
    let frames = frames_per_phase(30);
    let (log, summary) = run_beside_node(
        &["publish_images:=false"],
        &["--sizes", "640x480,2448x2048", "--encodings", "rgb8,mono8", "--qos", "reliable", "--settle", "3"],
        |peer| {
            peer.args(["--frames", &frames.to_string(), "--timeout", "5"]);
            without_our_profile(peer);
        },
    );
    assert!(log.contains("now read reliable"), "the node did not follow the reliable camera");
    assert!(log.contains("input_qos auto: '/image' is read best effort"), "input resolved to another topic");
    assert_all_answered(&summary, 4, frames, false);
}

#[test]
fn a_reliable_camera_on_another_host_is_answered_over_udp() {
    // A camera on another host reaches the node over UDP only. Fast DDS's own switch
    // FASTDDS_BUILTIN_TRANSPORTS=UDPv4 on the camera side takes shared memory away, so every
    // frame, and every output the peer subscribes (map, heatmap, overlay), crosses loopback UDP
    // in fragments. Reliable (image_transport's default) is what works there: best effort over
    // UDP loses most frames over half a megabyte whatever the reader does (README, "QoS and
    // large frames", measured with scripts/dds_probe.py --transport udp).
    let frames = frames_per_phase(20);
    let (log, summary) = run_beside_node(&[], &["--sizes", "640x480,2448x2048", "--qos", "reliable", "--settle", "3"], |peer| {
        peer.args(["--frames", &frames.to_string(), "--timeout", "10"]);
        without_our_profile(peer);
        peer.env("FASTDDS_BUILTIN_TRANSPORTS", "UDPv4");
    });
    assert!(log.contains("now read reliable"), "the node did not follow the reliable camera");
    assert_all_answered(&summary, 2, frames, true);
}
