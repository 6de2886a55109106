//! Reliability under bad input: the running node is fed every kind of bad input by a real rclpy
//! peer in another process (tests/peers/bad_input.py): lying sensor_msgs/Image fields, NaN/Inf
//! float frames, corrupt and truncated CompressedImage data, broken model directories, bad teach
//! requests and invalid parameter values. After each one the peer publishes a valid frame and
//! must get its AnomalyResult. Asserted here: no result for a bad frame, a result after each bad
//! input, a clear message (logged once per kind, counted per kind in /diagnostics, or in the
//! service/parameter reply), the old model and values kept, and a clean exit (no crash).
#![cfg(feature = "ros")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use anomaly_inspector::synthetic::SyntheticConfig;
use common::{python, root, ros_env, run_peer_beside, start_node, synthetic_model, PeerRun};
use serde_json::Value;

/// This file's own DDS domain (92-95 belong to node_features, 91 to node_roundtrip).
const DOMAIN: u32 = 96;

/// The two scenarios share the domain and the 2 cores: one at a time, even when the test
/// harness runs tests in parallel.
static SERIAL: Mutex<()> = Mutex::new(());

struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    good: PathBuf,
    broken: PathBuf,
}

/// Copies `from` to `to`, then lets `damage` change the copy.
fn broken_copy(from: &Path, to: &Path, damage: impl FnOnce(&Path)) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    damage(to);
}

fn truncate(path: &Path, keep: usize) {
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.len() > keep);
    std::fs::write(path, &bytes[..keep]).unwrap();
}

/// One small model and the broken model directories made from it.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let t = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let cfg = SyntheticConfig { n_train: 12, n_test_good: 1, n_test_per_defect: 0, ..SyntheticConfig::default() };
        let (ds, model) = synthetic_model(dir.path(), &cfg, "base");
        let good = ds.test.iter().find(|s| !s.is_anomalous()).unwrap().path.clone();
        let broken = dir.path().join("broken");
        std::fs::create_dir_all(broken.join("empty_dir")).unwrap();
        broken_copy(&model, &broken.join("garbled_json"), |d| {
            std::fs::write(d.join("model.json"), "{\"format\": \"anomaly_inspector_model\", \"version\": 1, \"meth").unwrap()
        });
        broken_copy(&model, &broken.join("wrong_version"), |d| {
            let mut v: Value = serde_json::from_str(&std::fs::read_to_string(d.join("model.json")).unwrap()).unwrap();
            v["version"] = 99.into();
            std::fs::write(d.join("model.json"), v.to_string()).unwrap();
        });
        broken_copy(&model, &broken.join("truncated_bank"), |d| {
            let p = d.join("memory_bank.safetensors");
            let n = std::fs::metadata(&p).unwrap().len() as usize;
            truncate(&p, n / 2);
        });
        broken_copy(&model, &broken.join("truncated_backbone"), |d| truncate(&d.join("backbone.safetensors"), 1000));
        // A memory bank whose header is intact but whose numbers are all NaN (0xFF bytes): it
        // loads, and only scoring shows it is damaged.
        broken_copy(&model, &broken.join("nan_bank"), |d| {
            let p = d.join("memory_bank.safetensors");
            let mut bytes = std::fs::read(&p).unwrap();
            let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            bytes[header..].fill(0xFF);
            std::fs::write(&p, bytes).unwrap();
        });
        eprintln!("fixture ready in {:.1} s", t.elapsed().as_secs_f64());
        Fixture { model, good, broken, _dir: dir }
    })
}

/// Starts the node with `node_params`, runs the peer's `scenario`, stops the node (which must
/// still be running and exit cleanly); returns the observations and the node's log.
fn run_scenario(scenario: &str, node_params: &[String]) -> (Value, String) {
    let f = fixture();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let py = python();
    let tmp = tempfile::tempdir().unwrap();
    let ros_home = tmp.path().join("ros");
    let log_path = tmp.path().join("node.log");
    let mut params = vec![format!("model:={}", f.model.display())];
    params.extend(node_params.iter().cloned());
    let mut node = start_node(DOMAIN, &ros_home, &params, &log_path);

    let obs_path = tmp.path().join("obs.json");
    let mut peer = Command::new(py);
    peer.arg(root().join("tests/peers/bad_input.py"))
        .args(["--scenario", scenario])
        .arg("--good")
        .arg(&f.good)
        .arg("--models")
        .arg(&f.broken)
        .arg("--out")
        .arg(&obs_path);
    ros_env(&mut peer, DOMAIN, &ros_home);
    let PeerRun { peer: status, node_alive: alive, node_exit: exit, log } = run_peer_beside(&mut node, &mut peer, &log_path);
    assert!(alive, "the node died during the bad input: {exit:?}");
    assert!(status.success(), "peer failed");
    assert!(exit.is_some_and(|e| e.success()), "node did not exit cleanly: {exit:?}");
    let obs: Value = serde_json::from_str(&std::fs::read_to_string(&obs_path).unwrap()).unwrap();
    eprintln!("--- observations ---\n{}", serde_json::to_string_pretty(&obs).unwrap());
    eprintln!(
        "scenario '{scenario}' took {:.1} s (peer {:.1} s)",
        t.elapsed().as_secs_f64(),
        obs["seconds"].as_f64().unwrap_or(-1.0)
    );
    (obs, log)
}

fn score(v: &Value) -> f64 {
    v["score"].as_f64().unwrap_or_else(|| panic!("no result: {v}"))
}

/// The node served a valid frame after the bad input `name`, with the original model.
fn served_after(obs: &Value, name: &str) {
    let case = &obs["cases"][name];
    let after = &case["after"];
    assert!(after["score"].is_number(), "{name}: no result for the valid frame after it: {case}");
    assert_eq!(after["model_id"], "base", "{name}: the model in force changed: {case}");
}

/// Bad frames of `kind`: none got a result, the node went on, the log has exactly one line for
/// the kind (containing every `needles`), and diagnostics counted every frame.
fn check_bad_frames(obs: &Value, log: &str, kind: &str, needles: &[&str]) {
    let case = &obs["cases"][kind];
    assert_eq!(case["bad_results"], 0, "{kind}: a bad frame got a result: {case}");
    served_after(obs, kind);
    let tag = format!("bad frame ({kind})");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&tag)).collect();
    assert_eq!(lines.len(), 1, "{kind}: must be logged exactly once (further ones counted), got {lines:#?}");
    for n in needles {
        assert!(lines[0].contains(n), "{kind}: log line lacks {n:?}: {}", lines[0]);
    }
    assert!(lines[0].contains(&format!("further '{kind}' errors are counted")), "{}", lines[0]);
    let counted = &obs["diag"]["values"][format!("rejected_{kind}")];
    assert_eq!(counted.as_str(), Some(case["sent"].to_string().as_str()), "{kind}: diagnostics count: {}", obs["diag"]);
}

fn diag_count(obs: &Value, key: &str) -> u64 {
    obs["diag"]["values"][key].as_str().unwrap_or_else(|| panic!("no {key} in {}", obs["diag"])).parse().unwrap()
}

#[test]
fn raw_frames_models_teach_and_parameters() {
    let f = fixture();
    let (obs, log) = run_scenario("raw", &["input_qos:=reliable".into()]);
    assert!(obs["baseline"]["score"].is_number(), "no result for the first valid frame");

    // Lying sensor_msgs/Image fields, float frames.
    check_bad_frames(&obs, &log, "step_too_small", &["step 767 is smaller than a row", "256 x 3 bytes per pixel"]);
    check_bad_frames(&obs, &log, "data_too_short", &["needs at least"]);
    check_bad_frames(&obs, &log, "unsupported_encoding", &["yuv422_weird", "supported are", "32FC1"]);
    check_bad_frames(&obs, &log, "zero_size", &["image is 0x256", "must be at least 1"]);
    check_bad_frames(&obs, &log, "too_large", &["20000x20000", "at most 16384"]);
    check_bad_frames(&obs, &log, "non_finite", &["NaN or infinite", "32FC1", "pixel (5, 3)"]);
    check_bad_frames(&obs, &log, "out_of_range", &["outside 0..1", "is_bigendian 1", "byte order"]);
    // A 5000-character encoding with a newline and an escape sequence is cut and escaped.
    assert!(!log.contains("FAKE") && !log.contains('\u{1b}'), "hostile encoding string reached the log");
    assert!(log.lines().all(|l| l.len() < 2000), "a log line was flooded");

    // The byte-order flag is honoured, float frames are intensities 0..1 (32FC3 in BGR order).
    let v = &obs["valid"];
    let (rgb, mono) = (score(&v["rgb8"]), score(&v["mono8"]));
    for (k, want) in [
        ("rgb8_bigendian_flag", rgb),
        ("32FC3_le", rgb),
        ("32FC3_be", rgb),
        ("mono16_le", mono),
        ("mono16_be", mono),
        ("32FC1_le", mono),
        ("32FC1_be", mono),
    ] {
        assert!((score(&v[k]) - want).abs() < 1e-4, "{k} scores {} instead of {want}: {v}", score(&v[k]));
    }

    // Broken models through ~/load_model: a clear error, the old model keeps serving.
    for (name, needles) in [
        ("missing", &["no such model directory", "fit one with"][..]),
        ("empty_dir", &["no model.json"][..]),
        ("garbled_json", &["not valid JSON", "damaged"][..]),
        ("wrong_version", &["format version 99", "reads version 1", "re-fit"][..]),
        ("truncated_bank", &["memory_bank.safetensors", "damaged or incomplete", "copy the model again"][..]),
        ("truncated_backbone", &["backbone.safetensors", "damaged or incomplete"][..]),
        ("nan_bank", &["test frame", "damaged"][..]),
    ] {
        let case = format!("load_{name}");
        let reply = &obs["cases"][&case]["observed"];
        assert_eq!(reply["success"], false, "{case}: {reply}");
        let message = reply["message"].as_str().unwrap_or_default();
        for n in needles {
            assert!(message.contains(n), "{case}: message lacks {n:?}: {message}");
        }
        assert!(log.contains(&format!("cannot load model {}", f.broken.join(name).display())), "{case} not logged");
        served_after(&obs, &case);
    }

    // Invalid parameters: refused in the reply with the reason; the old values stay.
    let params = obs["params"].as_array().unwrap();
    assert_eq!(params.len(), 15);
    for p in params {
        let reply = &p["reply"];
        assert_eq!(reply["successful"], false, "accepted: {p}");
        assert!(!reply["reason"].as_str().unwrap_or_default().is_empty(), "no reason: {p}");
    }
    let reason = |i: usize| params[i]["reply"]["reason"].as_str().unwrap().to_string();
    for (i, needle) in [
        (0, "threshold -0.5: must be within 0..=1"),
        (1, "threshold NaN"),
        (2, "threshold"),
        (3, "input_qos 'bogus': use auto, sensor_data or reliable"),
        (4, "read at start-up only"),
        (5, "tpu"),
        (6, "roi [0, 0, -5, 10]"),
        (7, "roi [1, 2, 3]"),
        (8, "min_region_area -1"),
        (9, "working_distance -1"),
        (10, "marker_pixel_size 0"),
        (11, "no such model directory"),
        (12, "damaged"),
        (13, "format version 99"),
        (14, "threshold -0.5"),
    ] {
        assert!(reason(i).contains(needle), "{}: reason lacks {needle:?}: {}", params[i]["name"], reason(i));
    }
    for line in [
        "parameter threshold = Double(-0.5) refused",
        "parameter input_qos = String(\"bogus\") refused",
        "parameter roi = IntegerArray([0, 0, -5, 10]) refused",
    ] {
        assert!(log.contains(line), "refusal not logged: {line}");
    }
    assert_eq!(obs["param_valid"]["successful"], true, "a valid change after refused ones: {}", obs["param_valid"]);
    assert_eq!(obs["param_truncated_bank"]["successful"], true, "{}", obs["param_truncated_bank"]);
    let after = &obs["params_after"];
    assert_eq!(after["threshold"], 0.5, "{after}");
    assert_eq!(after["input_qos"], "reliable");
    assert_eq!(after["device"], "cpu");
    assert_eq!(after["roi"], serde_json::json!([]));
    assert_eq!(after["min_region_area"], 30, "the valid change was not applied: {after}");
    assert_eq!(after["working_distance"], 0.0);
    assert_eq!(after["marker_pixel_size"], 0.001);
    assert_eq!(after["model"], f.model.display().to_string(), "a model that failed to load stayed in the parameter");
    let model_refused = format!("parameter model = String(\"{}\") refused", f.broken.join("truncated_bank").display());
    assert!(log.contains(&model_refused), "the failed model parameter was not reported: {model_refused}");
    served_after(&obs, "params");
    assert!(
        (obs["cases"]["params"]["after"]["threshold"].as_f64().unwrap() - 0.5).abs() < 1e-6,
        "a refused threshold is in force"
    );

    // A region of interest outside the frame: the frame is refused with the reason.
    assert_eq!(obs["roi_outside"]["successful"], true);
    assert!(obs["roi_outside_result"].is_null(), "a frame was inspected with a roi outside it");
    assert_eq!(obs["roi_reset"]["successful"], true);
    let roi_lines: Vec<&str> = log.lines().filter(|l| l.contains("bad frame (roi_outside_frame)")).collect();
    assert_eq!(roi_lines.len(), 1, "{roi_lines:?}");
    assert!(roi_lines[0].contains("roi [246, 246, 100, 100] exceeds the 256x256 frame"), "{}", roi_lines[0]);
    served_after(&obs, "roi_outside_frame");

    // Teach requests that cannot work: a clear error, and the node keeps serving.
    for (name, needle) in [
        ("teach_one_frame", "need at least 2 good frames"),
        ("teach_zero_frames_no_stream", "collected 0 of 30 frames before the timeout"),
        ("teach_too_many", "at most 500 frames"),
        ("teach_bad_name", "plain directory name"),
    ] {
        let reply = &obs["cases"][name]["observed"];
        assert_eq!(reply["success"], false, "{name}: {reply}");
        assert!(reply["message"].as_str().unwrap_or_default().contains(needle), "{name}: {reply}");
        assert!(reply["seconds"].as_f64().unwrap() < 10.0, "{name} took too long: {reply}");
        served_after(&obs, name);
    }

    // Diagnostics: every bad frame counted, none lost as "dropped" (which would mean it was
    // replaced before the node looked at it, and the checks above would prove nothing).
    assert_eq!(obs["diag"]["values"]["model"], "base");
    assert_eq!(diag_count(&obs, "frames_rejected"), 15, "{}", obs["diag"]);
    assert_eq!(diag_count(&obs, "frames_dropped"), 0, "{}", obs["diag"]);
    assert!(diag_count(&obs, "frames_inspected") >= 29, "{}", obs["diag"]);
    assert!(!obs["diag"]["values"]["last_error"].as_str().unwrap().is_empty());
}

#[test]
fn compressed_frames() {
    let (obs, log) = run_scenario("compressed", &["input_transport:=compressed".into(), "input_qos:=reliable".into()]);
    assert!(obs["baseline"]["score"].is_number(), "no result for the first valid frame");
    for k in ["png", "image_transport_format", "empty_format"] {
        assert!(obs["valid"][k]["score"].is_number(), "valid {k} frame got no result: {}", obs["valid"]);
    }
    check_bad_frames(&obs, &log, "corrupt", &["not a JPEG or PNG image", "5000 bytes"]);
    check_bad_frames(&obs, &log, "truncated", &["truncated JPEG"]);
    check_bad_frames(&obs, &log, "unknown_format", &["format 'theora'", "accepted are jpeg, png"]);
    check_bad_frames(&obs, &log, "too_large", &["image is 20000x20000", "at most 16384"]);
    assert_eq!(diag_count(&obs, "frames_rejected"), 8, "{}", obs["diag"]);
    assert_eq!(diag_count(&obs, "frames_dropped"), 0, "{}", obs["diag"]);
}
