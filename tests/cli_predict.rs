//! Whole flow of the command line on real image files: `synth` -> `fit` -> `predict`, on the
//! built-in data and (when present) on the real Magnetic-Tile data set. A corrupt and a missing
//! file must be reported per file without stopping the run.
#![allow(clippy::unwrap_used, clippy::expect_used)] // whole-flow tests: a failed unwrap is the test failing
mod common;

use std::path::PathBuf;
use std::process::Command;

use anomaly_inspector::evaluation::{ImagePrediction, PredictLine, Verdict};

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_anomaly_inspector"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run anomaly_inspector");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "command failed: {cmd:?}\n{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn json_lines(stdout: &str) -> Vec<PredictLine> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a predict line ({e}): {l}"))).collect()
}

/// The lines of inspected images, in order; panics at a failed one.
fn inspected(lines: &[PredictLine]) -> Vec<&ImagePrediction> {
    lines
        .iter()
        .map(|l| match l {
            PredictLine::Inspected(p) => p,
            PredictLine::Failed { image, error } => panic!("{} failed: {error}", image.display()),
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn synth_fit_predict_on_built_in_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let model = tmp.path().join("model");
    let out = tmp.path().join("pred");
    run_ok(cli().args(["synth", "--n-train", "20", "--out"]).arg(&data));
    let fit = cli().args(["fit", "--device", "cpu", "--data"]).arg(&data).arg("--out").arg(&model).output().unwrap();
    let fit_log = String::from_utf8_lossy(&fit.stderr);
    assert!(fit.status.success(), "{fit_log}");
    assert!(fit_log.contains("memory bank"), "fit should summarise the bank: {fit_log}");
    assert!(model.join("model.json").is_file() && model.join("memory_bank.safetensors").is_file());

    // Bad inputs among good ones: reported per file, the run goes on.
    let corrupt = tmp.path().join("corrupt.png");
    let png = std::fs::read(data.join("test/good/000.png")).unwrap();
    std::fs::write(&corrupt, &png[..png.len() / 3]).unwrap();
    let missing = tmp.path().join("missing.png");
    let stdout = run_ok(
        cli()
            .args(["predict", "--device", "cpu", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .arg(data.join("test/good"))
            .arg(data.join("test/scratch"))
            .arg(&corrupt)
            .arg(&missing),
    );
    let lines = json_lines(&stdout);
    let n_images = std::fs::read_dir(data.join("test/good")).unwrap().count()
        + std::fs::read_dir(data.join("test/scratch")).unwrap().count();
    assert_eq!(lines.len(), n_images + 2);
    let errors: Vec<(&PathBuf, &String)> = lines
        .iter()
        .filter_map(|l| match l {
            PredictLine::Failed { image, error } => Some((image, error)),
            PredictLine::Inspected(_) => None,
        })
        .collect();
    assert_eq!(errors.len(), 2, "exactly the corrupt and the missing file fail: {errors:?}");
    assert!(errors.iter().any(|(image, error)| *image == &missing && error.contains("missing.png")), "{errors:?}");
    let jsonl = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), lines.len(), "results.jsonl mirrors stdout");

    let scored = inspected(&lines[..n_images]);
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for p in &scored {
        let score = f64::from(p.score);
        assert!(p.heatmap.is_file());
        let overlay = image::open(&p.overlay).unwrap();
        assert_eq!((overlay.width(), overlay.height()), (256, 256), "overlay keeps the input size");
        assert_eq!(p.is_anomalous, p.verdict == Verdict::Anomalous);
        assert_eq!(p.is_anomalous, p.score >= p.threshold);
        if p.image.to_string_lossy().contains("/good/") {
            good.push(score)
        } else {
            bad.push(score)
        }
    }
    assert!(mean(&bad) > mean(&good) + 0.2, "scratches {bad:?} vs good {good:?}");
    let flagged =
        scored.iter().filter(|p| p.image.to_string_lossy().contains("/scratch/")).filter(|p| !p.regions.is_empty()).count();
    assert!(flagged >= bad.len() - 1, "scratches should come with defect regions");
}

#[test]
fn fit_and_predict_on_magnetic_tile() {
    let Some(mt) = common::magnetic_tile() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // A small, fixed training subset keeps this test short; the full set is for `eval`.
    let data = tmp.path().join("subset");
    std::fs::create_dir_all(data.join("train/good")).unwrap();
    let mut train: Vec<PathBuf> = std::fs::read_dir(mt.join("train/good")).unwrap().map(|e| e.unwrap().path()).collect();
    train.sort();
    for p in train.iter().take(40) {
        std::os::unix::fs::symlink(p, data.join("train/good").join(p.file_name().unwrap())).unwrap();
    }
    let model = tmp.path().join("model");
    run_ok(cli().args(["fit", "--device", "cpu", "--data"]).arg(&data).arg("--out").arg(&model));
    let pick = |dir: &str, n: usize| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(mt.join("test").join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v.into_iter().step_by(5).take(n).collect()
    };
    let goods = pick("good", 10);
    let defects: Vec<PathBuf> = ["blowhole", "break", "crack", "uneven"].iter().flat_map(|d| pick(d, 3)).collect();
    let stdout = run_ok(
        cli()
            .args(["predict", "--device", "cpu", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(tmp.path().join("pred"))
            .args(&goods)
            .args(&defects),
    );
    let lines = json_lines(&stdout);
    assert_eq!(lines.len(), goods.len() + defects.len());
    let raw = |p: &&ImagePrediction| f64::from(p.raw_score);
    let scored = inspected(&lines);
    let good: Vec<f64> = scored[..goods.len()].iter().map(raw).collect();
    let bad: Vec<f64> = scored[goods.len()..].iter().map(raw).collect();
    eprintln!("magnetic tile raw scores: good {good:?}\ndefective {bad:?}");
    assert!(mean(&bad) > mean(&good), "defective tiles must score higher on average");
}

#[test]
fn keep_aspect_models_take_images_of_any_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    run_ok(cli().args(["synth", "--n-train", "8", "--out"]).arg(&data));
    // The same kind of surface cut to different shapes, as in Magnetic-Tile.
    let shaped = tmp.path().join("shaped");
    std::fs::create_dir_all(shaped.join("train/good")).unwrap();
    let mut sources: Vec<PathBuf> = std::fs::read_dir(data.join("train/good")).unwrap().map(|e| e.unwrap().path()).collect();
    sources.sort();
    for (i, src) in sources.iter().enumerate() {
        let img = image::open(src).unwrap().to_rgb8();
        let (w, h) = if i % 2 == 0 { (200, 120) } else { (120, 200) };
        image::imageops::crop_imm(&img, 0, 0, w, h).to_image().save(shaped.join(format!("train/good/{i}.png"))).unwrap();
    }
    // Keeping the aspect is PatchCore's default; --stretch asks for the paper's square input.
    let model = tmp.path().join("model");
    run_ok(cli().args(["fit", "--device", "cpu", "--data"]).arg(&shaped).arg("--out").arg(&model));
    let m = common::manifest(&model);
    assert_eq!(m["patchcore"]["preprocess"]["resize"], "keep_aspect", "{m:#}");
    let stretched = tmp.path().join("stretched");
    run_ok(cli().args(["fit", "--device", "cpu", "--stretch", "--data"]).arg(&shaped).arg("--out").arg(&stretched));
    assert_eq!(common::manifest(&stretched)["patchcore"]["preprocess"]["resize"], "stretch");

    let wide = tmp.path().join("in/wide.png");
    std::fs::create_dir_all(wide.parent().unwrap()).unwrap();
    let test_img = image::open(data.join("test/scratch").read_dir().unwrap().next().unwrap().unwrap().path()).unwrap().to_rgb8();
    image::imageops::crop_imm(&test_img, 0, 0, 250, 90).to_image().save(&wide).unwrap();
    let out = tmp.path().join("pred");
    let lines =
        json_lines(&run_ok(cli().args(["predict", "--device", "cpu", "--model"]).arg(&model).arg("--out").arg(&out).arg(&wide)));
    assert_eq!(lines.len(), 1);
    let p = inspected(&lines)[0];
    assert!((0.0..=1.0).contains(&p.score), "{p:?}");
    let heatmap = image::open(&p.heatmap).unwrap();
    assert_eq!((heatmap.width(), heatmap.height()), (250, 90), "the map covers the image at its own shape");
    for r in &p.regions {
        assert!(r.x + r.width <= 250, "{r:?}");
        assert!(r.y + r.height <= 90, "{r:?}");
    }
    // DRAEM trains on one input size: the option is refused with a reason.
    let draem = cli()
        .args(["fit", "--method", "draem", "--keep-aspect", "--data"])
        .arg(&shaped)
        .arg("--out")
        .arg(tmp.path().join("d"))
        .output()
        .unwrap();
    assert!(!draem.status.success());
    assert!(String::from_utf8_lossy(&draem.stderr).contains("options of another method"));
}

#[test]
fn tiled_models_find_a_defect_in_its_tile_of_a_large_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let mosaics = common::MosaicData::write(tmp.path());
    let frames = &mosaics.frames;
    let model = tmp.path().join("model");
    run_ok(
        cli()
            .args(["fit", "--device", "cpu", "--tiles", "1", "--coreset-ratio", "0.05", "--data"])
            .arg(frames)
            .arg("--out")
            .arg(&model),
    );
    let m = common::manifest(&model);
    assert_eq!(m["patchcore"]["preprocess"]["resize"], serde_json::json!({"tiles": {"scale": 1.0, "overlap": 0.25}}), "{m:#}");
    assert_eq!(m["training"]["patchcore"]["n_images"], 12, "images, not tiles, are counted (the 2 held out too)");
    assert_eq!(m["training"]["patchcore"]["n_patches"], 12 * 9 * 32 * 32, "9 tiles of 32x32 patches per image");

    let out = tmp.path().join("pred");
    let lines = json_lines(&run_ok(
        cli()
            .args(["predict", "--device", "cpu", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .arg(&mosaics.good)
            .arg(&mosaics.scratch),
    ));
    let scored = inspected(&lines);
    assert_eq!(scored.len(), 2);
    let (good, bad) = (scored[0], scored[1]);
    assert!(bad.score > good.score + 0.1, "scratch frame {} vs good frame {}", bad.score, good.score);
    assert!(bad.is_anomalous && !bad.regions.is_empty(), "{bad:?}");
    for r in &bad.regions {
        assert!(common::MosaicData::in_scratched_cell(r.x, r.y, r.width, r.height), "a region outside the scratched cell: {r:?}");
    }
    let heatmap = image::open(&bad.heatmap).unwrap();
    assert_eq!((heatmap.width(), heatmap.height()), (512, 512), "the stitched map covers the whole frame");
}
