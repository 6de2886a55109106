//! The `eval` subcommand end to end: fit a model on synthetic data with the CLI, evaluate it,
//! and check the JSON report; a missing model must fail with a message naming it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use anomaly_inspector::dataset::MvtecDataset;
use anomaly_inspector::evaluation::EvalReport;
use anomaly_inspector::model_file::Method;
use anomaly_inspector::synthetic::{generate_dataset, SyntheticConfig};
use common::manifest;

fn cli(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anomaly_inspector")).args(args).output().expect("run anomaly_inspector")
}

/// `anomaly_inspector fit --data D --out M --device cpu` plus `extra` arguments.
fn fit(data: &Path, model: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "fit".as_ref(),
        "--data".as_ref(),
        data.as_os_str(),
        "--out".as_ref(),
        model.as_os_str(),
        "--device".as_ref(),
        "cpu".as_ref(),
    ];
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
    cli(&args)
}

/// `anomaly_inspector eval --model M --data D --json J --device cpu` plus `extra` arguments.
fn eval(model: &Path, data: &Path, json: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "eval".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--json".as_ref(),
        json.as_os_str(),
        "--device".as_ref(),
        "cpu".as_ref(),
    ];
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
    cli(&args)
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A synthetic data set of `n_train` good training images (and `n_test_good` good, `n_per_defect`
/// per defect type in test/) written under `dir/data`.
fn synthetic_data(dir: &Path, n_train: usize, n_test_good: usize, n_per_defect: usize) -> PathBuf {
    let data = dir.join("data");
    let cfg = SyntheticConfig { n_train, n_test_good, n_test_per_defect: n_per_defect, ..Default::default() };
    generate_dataset(&data, &cfg).unwrap();
    data
}

/// The named tensors of a model directory's `memory_bank.safetensors`.
fn bank_file(model: &Path) -> Vec<(String, tch::Tensor)> {
    tch::Tensor::read_safetensors(model.join("memory_bank.safetensors")).unwrap()
}

/// The tensor named `key` among `tensors`.
fn tensor(tensors: &[(String, tch::Tensor)], key: &str) -> Option<tch::Tensor> {
    tensors.iter().find(|(n, _)| n == key).map(|(_, t)| t.shallow_clone())
}

/// The report `eval --json` wrote to `path`.
fn report(path: &Path) -> EvalReport {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not an eval report ({e}):\n{text}"))
}

/// `value`, which must be defined and within 0..=1.
fn unit(value: Option<f64>, what: &str) -> f64 {
    let v = value.unwrap_or_else(|| panic!("{what} undefined"));
    assert!((0.0..=1.0).contains(&v), "{what} = {v} outside 0..=1");
    v
}

#[test]
fn eval_reports_metrics_on_synthetic_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cfg = SyntheticConfig { n_train: 20, n_test_good: 3, n_test_per_defect: 2, ..Default::default() };
    generate_dataset(&data, &cfg).unwrap();
    let ds = MvtecDataset::open(&data).unwrap();
    let model = tmp.path().join("model");
    let os = |p: &Path| p.as_os_str().to_owned();

    check(&fit(&data, &model, &[]), "fit");

    let json = tmp.path().join("report/eval.json");
    let out = eval(&model, &data, &json, &[]);
    check(&out, "eval");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(stderr.contains("image AUROC") && stderr.contains("AUPRO"), "no table on stderr:\n{stderr}");

    let r = report(&json);
    unit(r.pixel_auroc, "pixel_auroc");
    unit(r.aupro, "aupro");
    unit(r.image_f1_max, "image_f1_max");
    assert_eq!(r.n_images, ds.test.len(), "{r:#?}");
    assert_eq!(r.n_good, ds.n_test_good());
    assert_eq!(r.n_anomalous, ds.n_test_anomalous());
    assert_eq!(r.n_failed, 0);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.ms_per_image > 0.0 && r.images_per_second > 0.0 && r.wall_seconds > 0.0, "{r:#?}");
    assert_eq!(
        (r.model.as_str(), r.method, r.data.as_path(), r.model_dir.as_path()),
        ("model", Method::Patchcore, &*data, &*model)
    );
    assert!(r.device.starts_with("cpu"), "{}", r.device);
    assert_eq!(r.image_threshold_raw, manifest(&model)["calibration"]["image_threshold"].as_f64().unwrap() as f32);
    let image_auroc = unit(r.image_auroc, "image_auroc");
    assert!(image_auroc > 0.9, "image AUROC {image_auroc} on easy synthetic data");

    assert_eq!(r.per_defect.keys().cloned().collect::<Vec<_>>(), ds.defect_types());
    for (name, m) in &r.per_defect {
        assert_eq!(m.n_images, cfg.n_test_per_defect, "{name}");
        unit(m.image_auroc, &format!("{name} image_auroc"));
        unit(m.pixel_auroc, &format!("{name} pixel_auroc"));
        unit(m.aupro, &format!("{name} aupro"));
    }

    unit(r.image_f1_at_threshold, "image_f1_at_threshold");

    // Calibration on labelled validation images (another synthetic set, not the test set):
    // F1-optimal thresholds replace the held-out-good ones; the old model.json is kept.
    let val = tmp.path().join("validation");
    generate_dataset(&val, &SyntheticConfig { seed: cfg.seed + 1, n_train: 1, ..cfg.clone() }).unwrap();
    let calibrate = |dry: bool| {
        let mut args: Vec<std::ffi::OsString> =
            vec!["calibrate".into(), "--model".into(), os(&model), "--data".into(), os(&val), "--device".into(), "cpu".into()];
        if dry {
            args.push("--dry-run".into());
        }
        let out = cli(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>());
        check(&out, "calibrate");
        // "image   <before> <after>   <F1 before> <F1 after>"
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let row = |name: &str| -> Vec<f64> {
            let line = stderr.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} row:\n{stderr}"));
            line.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect()
        };
        (row("image"), row("pixel"))
    };
    let before = manifest(&model);
    let (image, pixel) = calibrate(false);
    assert!(image[3] >= image[2] && pixel[3] >= pixel[2], "F1-optimal must not be worse: {image:?} {pixel:?}");
    let after = manifest(&model);
    assert!(after["calibration"]["method"].as_str().unwrap().starts_with("F1-optimal"), "{after:#}");
    assert!((after["calibration"]["image_threshold"].as_f64().unwrap() - image[1]).abs() < 1e-3 * image[1].abs().max(1.0));
    assert_eq!(after["patchcore"], before["patchcore"]);
    let kept: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("model.json.previous")).unwrap()).unwrap();
    assert_eq!(kept["calibration"], before["calibration"]);
    // Calibrating again finds the same thresholds: the ones now in force.
    let (again, _) = calibrate(true);
    assert!((again[0] - image[1]).abs() < 1e-3 * image[1].abs().max(1.0), "{again:?} vs {image:?}");
    assert!((again[2] - image[3]).abs() < 1e-6, "F1 at the calibrated threshold {again:?} vs {image:?}");
    let unchanged = manifest(&model);
    assert_eq!(unchanged, after, "--dry-run changed the model");

    // --limit-per-type takes the first N images of every test folder.
    let out = eval(&model, &data, &json, &["--limit-per-type", "1"]);
    check(&out, "eval --limit-per-type 1");
    assert_eq!(report(&json).n_images, 1 + ds.defect_types().len());

    // --split: the two halves of every test folder, by position, together all images, apart none.
    let mut per_folder = std::collections::BTreeMap::<Option<String>, usize>::new();
    for s in &ds.test {
        *per_folder.entry(s.defect.clone()).or_default() += 1;
    }
    let halves = ["validation", "evaluation"].map(|split| {
        let out = eval(&model, &data, &json, &["--split", split]);
        check(&out, split);
        let r = report(&json);
        assert_eq!(serde_json::to_value(r.split).unwrap(), split);
        r.n_images
    });
    assert_eq!(halves[0], per_folder.values().map(|c| c / 2).sum::<usize>(), "positions 1, 3, ... of each folder");
    assert_eq!(halves[1], per_folder.values().map(|c| c.div_ceil(2)).sum::<usize>(), "positions 0, 2, ...");
    assert_eq!(halves[0] + halves[1], ds.test.len());
}

#[test]
fn eval_of_a_missing_model_names_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no_such_model");
    let out = eval(&missing, tmp.path(), &tmp.path().join("r.json"), &[]);
    assert!(!out.status.success(), "eval of a missing model succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&*missing.to_string_lossy()), "message does not name the model path:\n{stderr}");
    assert!(!tmp.path().join("r.json").exists());
}

#[test]
fn retrieval_model_fits_evaluates_and_refuses_a_bank_without_images() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 20, 3, 2);
    let model = tmp.path().join("model");
    check(&fit(&data, &model, &["--retrieval-images", "4"]), "fit --retrieval-images 4");
    let manifest_path = model.join("model.json");
    let manifest = manifest(&model);
    assert_eq!(manifest["patchcore"]["retrieval_images"].as_u64(), Some(4), "{manifest:#}");
    // 20 images (16 fitted, the 4 held out to calibrate added after), each keeping its own rows,
    // each row tagged.
    let bank_path = model.join("memory_bank.safetensors");
    let tensors = bank_file(&model);
    let get = |k: &str| tensor(&tensors, k).unwrap_or_else(|| panic!("no {k}"));
    let (bank, owners, descriptors) = (get("memory_bank"), get("image_of_row"), get("image_descriptors"));
    assert_eq!(descriptors.size()[0], 20);
    assert_eq!(owners.size(), vec![bank.size()[0]]);
    assert_eq!(owners.max().int64_value(&[]), 19);

    let json = tmp.path().join("eval.json");
    let run_eval = || eval(&model, &data, &json, &[]);
    check(&run_eval(), "eval of a retrieval model");
    let r = report(&json);
    let image_auroc = unit(r.image_auroc, "image_auroc");
    assert!(image_auroc > 0.9, "image AUROC {image_auroc} on easy synthetic data with retrieval");
    unit(r.pixel_auroc, "pixel_auroc");

    // The same bank without the image of each row cannot serve retrieval: a clear error that
    // names model.json and both ways out.
    tch::Tensor::write_safetensors(&[("memory_bank", &bank)], &bank_path).unwrap();
    let out = run_eval();
    assert!(!out.status.success(), "eval must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("model.json") && stderr.contains("retrieval_images to 0") && stderr.contains("--retrieval-images"),
        "{stderr}"
    );
    // ... and with retrieval switched off it searches the whole bank again.
    let mut off = manifest.clone();
    off["patchcore"]["retrieval_images"] = 0.into();
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&off).unwrap()).unwrap();
    check(&run_eval(), "eval with retrieval_images 0");
}

#[test]
fn fit_options_cap_the_bank_and_switch_the_coarse_map_density_and_guided_smoothing_on() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 10, 1, 1);
    // The default: the paper's raw distances and one-scale map, no guided smoothing, no spacing.
    let model = tmp.path().join("model_default");
    check(&fit(&data, &model, &["--max-bank-size", "150"]), "fit --max-bank-size 150");
    let m = manifest(&model);
    assert_eq!(m["patchcore"]["max_bank_size"].as_u64(), Some(150), "{m:#}");
    for key in ["coarse_blur_sigma", "guided_bandwidth"] {
        assert_eq!(m["patchcore"][key].as_f64(), Some(0.0), "{key} off by default: {m:#}");
    }
    assert_eq!(m["patchcore"]["density_neighbors"].as_i64(), Some(0), "{m:#}");
    // 8 images fitted would give far more than 150 rows at the default ratio.
    let tensors = bank_file(&model);
    assert_eq!(tensor(&tensors, "memory_bank").unwrap().size()[0], 150);
    assert_eq!(tensors.len(), 1, "raw distances: no spacing saved");

    // Each extra is one option away, and the model keeps what it was fitted with.
    let model = tmp.path().join("model");
    let args = [
        "--max-bank-size",
        "150",
        "--coarse-blur-sigma",
        "32",
        "--density-neighbors",
        "5",
        "--guided-bandwidth",
        "0.45",
        "--guided-sigma",
        "20",
    ];
    check(&fit(&data, &model, &args), "fit with the coarse map, density and guided smoothing on");
    let m = manifest(&model);
    assert_eq!(m["patchcore"]["coarse_blur_sigma"].as_f64(), Some(32.0), "{m:#}");
    assert_eq!(m["patchcore"]["density_neighbors"].as_i64(), Some(5), "{m:#}");
    assert_eq!(m["patchcore"]["guided_bandwidth"].as_f64(), Some(0.45), "{m:#}");
    assert_eq!(m["patchcore"]["guided_sigma"].as_f64(), Some(20.0), "{m:#}");
    // Density normalisation keeps the bank's spacing beside it, one value per row, all positive.
    let tensors = bank_file(&model);
    let spacing = tensor(&tensors, "spacing_k5").expect("spacing_k5 saved");
    assert_eq!(spacing.size(), [150]);
    assert!(spacing.min().double_value(&[]) > 0.0);
}

#[test]
fn labelled_defects_in_train_are_reported_never_evaluated_and_fit_checks_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 12, 2, 3);
    let ds = MvtecDataset::open(&data).unwrap();
    let types = ds.defect_types();
    // One labelled defect per type moves to train/ (links; the source stays as it was).
    let split = tmp.path().join("split");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/split_labels.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--per-type", "1", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&split)
        .output()
        .unwrap();
    check(&out, "split_labels.py");
    assert_eq!(MvtecDataset::open(&data).unwrap(), ds, "the source data set changed");
    let labelled = MvtecDataset::open(&split).unwrap();
    assert_eq!(labelled.train_defective.len(), types.len());
    assert_eq!(labelled.test.len(), ds.test.len() - types.len());

    let model = tmp.path().join("model");
    let out = fit(&split, &model, &["--self-check", "8"]);
    check(&out, "fit");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let n = types.len();
    assert!(stderr.contains(&format!("{n} defective of {n} types ({n} with masks): fully labelled")), "{stderr}");
    assert!(stderr.contains(&format!("the {n} labelled defective images in train/ are not used")), "{stderr}");
    // The self-check: printed, and kept in model.json; the built-in data's parts are plain, so
    // a pasted defect must rank above the held-out good images more often than not.
    assert!(stderr.contains("self-check on synthetic defects: image AUROC"), "{stderr}");
    let check_json = &manifest(&model)["training"]["self_check"];
    assert_eq!(check_json["n_synthetic"], 8, "{check_json:#}");
    let auroc = check_json["image_auroc"].as_f64().unwrap();
    assert!(auroc > 0.7 && auroc <= 1.0, "self-check image AUROC {auroc}");
    let out = fit(&split, &tmp.path().join("unchecked"), &["--self-check", "0"]);
    check(&out, "fit --self-check 0");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("self-check"));
    assert!(manifest(&tmp.path().join("unchecked"))["training"].get("self_check").is_none());

    // eval scores only the images left in test/.
    let json = tmp.path().join("eval.json");
    check(&eval(&model, &split, &json, &[]), "eval");
    assert_eq!(report(&json).n_images, ds.test.len() - types.len());

    // SuperSimpleNet learns from them: with masks, and (another split) with verdicts only.
    let weak = tmp.path().join("weak");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--per-type", "1", "--weak", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&weak)
        .output();
    check(&out.unwrap(), "split_labels.py --weak");
    for (set, regime) in [(&split, "pixel_masks"), (&weak, "image_labels")] {
        let ssn = tmp.path().join(format!("ssn_{regime}"));
        let args = ["--method", "supersimplenet", "--epochs", "2", "--image-size", "64", "--self-check", "0"];
        let out = fit(set, &ssn, &args);
        check(&out, "fit --method supersimplenet");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("training supersimplenet") && !stderr.contains("are not used"), "{stderr}");
        // With labels, `auto` scores images with the classification head, and says so.
        assert!(stderr.contains("image score from the classification head"), "{stderr}");
        assert_eq!(manifest(&ssn)["supersimplenet"]["image_score"], "classifier");
        let summary = &manifest(&ssn)["training"]["supersimplenet"];
        assert_eq!(
            (summary["n_defective"].as_u64(), summary["supervision"].as_str()),
            (Some(n as u64), Some(regime)),
            "{summary:#}"
        );
        check(&eval(&ssn, set, &json, &[]), "eval of a SuperSimpleNet model");
        assert_eq!(report(&json).n_images, ds.test.len() - types.len());
    }

    // The same file in train/ and test/: refused by fit and eval, naming both.
    let moved = &labelled.train_defective[0];
    let twin = split.join("test").join(moved.defect.as_deref().unwrap()).join(moved.path.file_name().unwrap());
    std::os::unix::fs::symlink(std::fs::read_link(&moved.path).unwrap(), &twin).unwrap();
    for out in [fit(&split, &tmp.path().join("m2"), &[]), eval(&model, &split, &json, &[])] {
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("both a training and a test image") && stderr.contains(&*twin.to_string_lossy()), "{stderr}");
    }
}
