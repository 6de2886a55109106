//! The operator's labels and teach-in from them, with a real rclpy peer
//! (tests/peers/label_teach.py): `~/label` stores recent frames by stamp as good or defective
//! (box, polygon, mask or verdict only) in `<model_root>/labels/`, refuses bad requests with a
//! reason and loses nothing; the `~/teach` action fits SuperSimpleNet on fresh frames and every
//! label with feedback, can be cancelled while collecting or fitting (nothing left on disk),
//! refuses an unknown method, and the node switches to the taught model.
#![cfg(feature = "ros")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
mod common;

use std::path::Path;
use std::process::Command;

use anomaly_inspector::dataset::MvtecDataset;
use anomaly_inspector::synthetic::SyntheticConfig;
use common::{python, root, ros_env, run_peer_beside, start_node, synthetic_model};
use serde_json::Value;

/// This file's own DDS domain.
const DOMAIN: u32 = 85;

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file())).count()).unwrap_or(0)
}

#[test]
fn operator_labels_frames_and_teaches_a_model_from_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig { n_train: 12, n_test_good: 1, n_test_per_defect: 1, ..SyntheticConfig::default() };
    let (ds, model) = synthetic_model(tmp.path(), &cfg, "base");
    let models = model.parent().unwrap().to_path_buf();
    let good = ds.test.iter().find(|s| !s.is_anomalous()).unwrap().path.clone();
    let defect = ds.test.iter().find(|s| s.is_anomalous()).unwrap().path.clone();
    let ros_home = tmp.path().join("ros");
    let log_path = tmp.path().join("node.log");
    let params = [format!("model:={}", model.display()), "label_buffer_frames:=12".to_string()];
    let mut node = start_node(DOMAIN, &ros_home, &params, &log_path);
    let obs_path = tmp.path().join("obs.json");
    let mut peer = Command::new(python());
    peer.arg(root().join("tests/peers/label_teach.py"))
        .arg("--good")
        .arg(&good)
        .arg("--defect")
        .arg(&defect)
        .arg("--out")
        .arg(&obs_path);
    ros_env(&mut peer, DOMAIN, &ros_home);
    let run = run_peer_beside(&mut node, &mut peer, &log_path);
    assert!(run.node_alive, "the node died: {:?}", run.node_exit);
    assert!(run.peer.success(), "peer failed");
    assert!(run.node_exit.is_some_and(|e| e.success()), "node did not exit cleanly: {:?}", run.node_exit);
    let obs: Value = serde_json::from_str(&std::fs::read_to_string(&obs_path).unwrap()).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&obs).unwrap());
    let msg = |k: &str| obs[k]["message"].as_str().unwrap_or_default().to_string();

    // Before any frame: refused with the reason.
    assert_eq!(obs["before_frames"]["success"], false);
    assert!(msg("before_frames").contains("no frame inspected yet"), "{}", obs["before_frames"]);

    // Labels that work, each counted, stored where the reply says.
    let labels = models.join("labels");
    for k in ["good", "good_again", "box", "polygon", "mask", "verdict"] {
        assert_eq!(obs[k]["success"], true, "{k}: {}", obs[k]);
        let path = Path::new(obs[k]["path"].as_str().unwrap());
        assert!(path.starts_with(&labels) && path.is_file(), "{k}: {}", path.display());
    }
    assert!(msg("good_again").contains("replaces its earlier label: good"), "{}", obs["good_again"]);
    assert!(msg("box").contains("learns from good frames only"), "a defective label under PatchCore must say who uses it");
    let last = &obs["verdict"];
    assert_eq!(
        (last["good"].as_u64(), last["defective"].as_u64(), last["defective_with_region"].as_u64()),
        (Some(1), Some(4), Some(3))
    );
    // On disk: the MVTec layout, masks of the frame's size where an area was drawn.
    let store = MvtecDataset::open(&labels).unwrap();
    assert_eq!(store.train_good.len(), 1);
    assert_eq!(store.train_defective.len(), 4);
    let with_mask: Vec<_> = store.train_defective.iter().filter_map(|s| s.mask.clone()).collect();
    assert_eq!(with_mask.len(), 3);
    let frame_size = image::image_dimensions(&good).unwrap();
    for m in &with_mask {
        let mask = image::open(m).unwrap().to_luma8();
        assert_eq!(mask.dimensions(), frame_size);
        let on = mask.pixels().filter(|p| p.0[0] == 255).count();
        assert!(on > 0 && mask.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255), "{}", m.display());
    }
    let boxed = image::open(labels.join(format!("ground_truth/scratch/{}_mask.png", stem(&obs["box"])))).unwrap().to_luma8();
    assert_eq!(boxed.pixels().filter(|p| p.0[0] == 255).count(), 30 * 40, "the box's pixels exactly");
    assert_eq!(boxed.get_pixel(10, 20).0[0], 255);
    assert_eq!(boxed.get_pixel(9, 20).0[0], 0);
    assert_eq!(count(&labels.join("train/dent")), 1);
    assert_eq!(count(&labels.join("train/defective")), 1, "a verdict without a type is 'defective'");

    // Refused labels: a reason each, and nothing stored or lost by them.
    for (k, why) in [
        ("unknown_stamp", "no inspected frame has stamp 5.000000000"),
        ("bad_label", "label 7: use GOOD (1) or DEFECTIVE (2)"),
        ("good_with_box", "a good frame has no defect area"),
        ("mask_wrong_size", "mask is 8x8"),
        ("mask_bad_data", "mask: "),
        ("bad_type", "defect type '../escape'"),
        ("two_areas", "at most one of box, polygon and mask"),
    ] {
        assert_eq!(obs[k]["success"], false, "{k}: {}", obs[k]);
        assert!(msg(k).contains(why), "{k}: {}", obs[k]);
    }
    assert!(msg("unknown_stamp").contains("label_buffer_frames = 12"), "{}", obs["unknown_stamp"]);

    // Teach-in goals.
    assert_eq!(obs["teach_server"], true, "no ~/teach action server");
    assert_eq!(obs["bad_method"]["status"], "aborted");
    assert!(msg("bad_method").contains("method 'random_forest': use patchcore, supersimplenet or draem"));

    let cc = &obs["collect_cancelled"];
    assert_eq!(cc["status"], "canceled", "{cc}");
    assert!(msg("collect_cancelled").starts_with("cancelled after collecting"), "{cc}");
    assert!(cc["feedback"].as_array().unwrap().iter().all(|f| f["stage"] == "collecting" && f["frames_requested"] == 400));
    assert!(!models.join("collect_cancelled").exists() && !models.join("collect_cancelled.frames").exists());

    let fc = &obs["fit_cancelled"];
    assert_eq!(fc["status"], "canceled", "{fc}");
    assert!(msg("fit_cancelled").starts_with("cancelled: stopped during"), "{fc}");
    assert!(!models.join("fit_cancelled").exists(), "a cancelled fit leaves no model");
    assert!(!models.join("fit_cancelled.frames").exists(), "a cancelled fit leaves no frames");

    let t = &obs["taught"];
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(
        (t["frames_used"].as_u64(), t["labels_good"].as_u64(), t["labels_defective"].as_u64()),
        (Some(6), Some(1), Some(4))
    );
    let fb = t["feedback"].as_array().unwrap();
    let stages: Vec<&str> = fb.iter().map(|f| f["stage"].as_str().unwrap()).collect();
    let first = |s: &str| stages.iter().position(|x| *x == s).unwrap_or_else(|| panic!("no {s} feedback: {stages:?}"));
    assert!(first("collecting") < first("fitting") && first("fitting") < first("installing"), "{stages:?}");
    let steps: Vec<&str> = fb.iter().filter(|f| f["stage"] == "fitting").map(|f| f["fit_step"].as_str().unwrap()).collect();
    assert!(steps.contains(&"features") && steps.contains(&"training"), "{steps:?}");
    let taught = models.join("taught_ssn");
    assert_eq!(Path::new(t["model_path"].as_str().unwrap()), taught);
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(taught.join("model.json")).unwrap()).unwrap();
    assert_eq!(manifest["method"], "supersimplenet");
    assert_eq!(manifest["supersimplenet"]["image_score"], "classifier", "taught with defective labels");
    let kept = MvtecDataset::open(&models.join("taught_ssn.frames")).unwrap();
    assert_eq!((kept.train_good.len(), kept.train_defective.len()), (7, 4), "frames and labels kept beside the model");
    assert_eq!(obs["after_teach"]["model_id"], "taught_ssn");
    assert_eq!(obs["after_teach"]["method"], "supersimplenet");

    // The service never overwrites a model, and the labels outlive every teach-in.
    assert_eq!(obs["overwrite"]["success"], false, "{}", obs["overwrite"]);
    assert!(msg("overwrite").contains("never overwrites"), "{}", obs["overwrite"]);
    assert!(taught.join("model.json").is_file());
    let after = MvtecDataset::open(&labels).unwrap();
    assert_eq!((after.train_good.len(), after.train_defective.len()), (1, 4));
}

/// The file stem of a label reply's stored image.
fn stem(reply: &Value) -> String {
    Path::new(reply["path"].as_str().unwrap()).file_stem().unwrap().to_string_lossy().into_owned()
}
