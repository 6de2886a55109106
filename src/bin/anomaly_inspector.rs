//! `anomaly_inspector`: fit, predict and make demo data from the command line (no ROS needed).
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use anomaly_inspector::config::{default_backbone_weights, BackboneKind, DeviceChoice, PatchCoreConfig, PostprocessConfig};
use anomaly_inspector::dataset::MvtecDataset;
use anomaly_inspector::postprocess::{heatmap, overlay};
use anomaly_inspector::synthetic::{generate_dataset, SyntheticConfig};
use anomaly_inspector::training::{fit_patchcore, FitOptions, FitStage};
use anomaly_inspector::{device, imaging, Inspector};

#[derive(Parser)]
#[command(name = "anomaly_inspector", version, about = "Surface anomaly detection: fit, predict, demo data")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fit a model on the defect-free images (train/good) of an MVTec-layout folder.
    Fit(FitArgs),
    /// Score images with a model; write heatmap and overlay PNGs and one JSON line per image.
    Predict(PredictArgs),
    /// Write the built-in synthetic data set (MVTec layout) used by the demo and the tests.
    Synth(SynthArgs),
}

#[derive(Args)]
struct FitArgs {
    /// Data set root with train/good/*.png|jpg (MVTec AD layout).
    #[arg(long)]
    data: PathBuf,
    /// Model directory to write (an existing one is kept as <out>.previous).
    #[arg(long)]
    out: PathBuf,
    /// Detection method.
    #[arg(long, default_value = "patchcore", value_parser = ["patchcore"])]
    method: String,
    /// Feature extractor: efficientnet_lite0 (built in) or torchscript (give --backbone-weights).
    #[arg(long, default_value = "efficientnet_lite0")]
    backbone: String,
    /// Backbone weights: safetensors for efficientnet_lite0, a TorchScript .pt for torchscript.
    #[arg(long)]
    backbone_weights: Option<PathBuf>,
    /// Backbone layers, comma separated (efficientnet_lite0: stage1..stage7; torchscript: 0,1,..).
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<String>>,
    /// Network input size in pixels (square).
    #[arg(long)]
    image_size: Option<u32>,
    /// Fraction of patches kept in the memory bank.
    #[arg(long)]
    coreset_ratio: Option<f64>,
    /// Seed for every random choice.
    #[arg(long)]
    seed: Option<u64>,
    /// Hold out every N-th good image for calibration.
    #[arg(long, default_value_t = FitOptions::default().holdout_every)]
    holdout_every: usize,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Name shown as model_id in results (default: the directory name).
    #[arg(long, default_value = "")]
    name: String,
}

#[derive(Args)]
struct PredictArgs {
    /// Model directory written by `fit`.
    #[arg(long)]
    model: PathBuf,
    /// Images or directories of images.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output directory for <stem>_heatmap.png, <stem>_overlay.png and results.jsonl.
    #[arg(long)]
    out: PathBuf,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Normalised threshold (0.5 = calibrated).
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Minimum region area in pixels.
    #[arg(long)]
    min_region_area: Option<u32>,
}

#[derive(Args)]
struct SynthArgs {
    /// Where to write the data set.
    #[arg(long)]
    out: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = SyntheticConfig::default().seed)]
    seed: u64,
    /// Defect-free training images.
    #[arg(long, default_value_t = SyntheticConfig::default().n_train)]
    n_train: usize,
}

fn main() -> anyhow::Result<()> {
    let _ = device::load_cuda_backend();
    match Cli::parse().command {
        Command::Fit(a) => fit(a),
        Command::Predict(a) => predict(a),
        Command::Synth(a) => synth(a),
    }
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn fit(a: FitArgs) -> anyhow::Result<()> {
    let mut cfg = PatchCoreConfig::default();
    cfg.backbone.kind = match a.backbone.as_str() {
        "efficientnet_lite0" => BackboneKind::EfficientnetLite0,
        "torchscript" => BackboneKind::Torchscript,
        other => bail!("--backbone {other}: use efficientnet_lite0 or torchscript"),
    };
    let weights = match (a.backbone_weights, cfg.backbone.kind) {
        (Some(w), _) => w,
        (None, BackboneKind::EfficientnetLite0) => default_backbone_weights(),
        (None, BackboneKind::Torchscript) => bail!("--backbone torchscript needs --backbone-weights <module.pt>"),
    };
    if let Some(l) = a.layers {
        cfg.backbone.layers = l;
    } else if cfg.backbone.kind == BackboneKind::Torchscript {
        cfg.backbone.layers = vec!["0".into()];
    }
    if let Some(s) = a.image_size {
        cfg.preprocess.image_size = [s, s];
    }
    if let Some(r) = a.coreset_ratio {
        cfg.coreset_ratio = r;
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    cfg.validate()?;
    let data = MvtecDataset::open(&a.data)?;
    let device = device::resolve(a.device)?;
    eprintln!(
        "fitting {} on {} good images of {} ({}; device {})",
        a.method,
        data.train_good.len(),
        a.data.display(),
        cfg.backbone.layers.join("+"),
        device::describe(device)
    );
    let mut bars: Option<(FitStage, ProgressBar)> = None;
    let mut progress = |stage: FitStage, done: usize, total: usize| {
        if bars.as_ref().map(|(s, _)| *s) != Some(stage) {
            if let Some((_, b)) = bars.take() {
                b.finish();
            }
            let label = match stage {
                FitStage::Features => "features",
                FitStage::Calibration => "calibration",
            };
            bars = Some((stage, bar(total, label)));
        }
        if let Some((_, b)) = &bars {
            b.set_position(done as u64);
        }
    };
    let options = FitOptions { holdout_every: a.holdout_every, name: a.name, ..FitOptions::default() };
    let report = fit_patchcore(
        &data.train_good,
        &a.data.to_string_lossy(),
        &cfg,
        &weights,
        device,
        &a.out,
        &options,
        &mut progress,
    )
    .with_context(|| format!("fitting on {}", a.data.display()))?;
    if let Some((_, b)) = bars.take() {
        b.finish();
    }
    let s = &report.summary;
    eprintln!(
        "memory bank {} x {} from {} patches of {} images (features {:.1} s, coreset {:.1} s); \
         thresholds image {:.4} pixel {:.4} from {} held-out images",
        s.bank_size,
        s.feature_dim,
        s.n_patches,
        s.n_images,
        s.extract_seconds,
        s.coreset_seconds,
        report.calibration.image_threshold,
        report.calibration.pixel_threshold,
        report.n_holdout
    );
    eprintln!("model written to {}", a.out.display());
    Ok(())
}

fn collect_images(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| anomaly_inspector::dataset::is_image(f))
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    if out.is_empty() {
        bail!("no images found in {:?}", inputs);
    }
    Ok(out)
}

fn predict(a: PredictArgs) -> anyhow::Result<()> {
    let device = device::resolve(a.device)?;
    let mut post = PostprocessConfig::default();
    if let Some(m) = a.min_region_area {
        post.min_region_area = m;
    }
    let mut inspector = Inspector::new(&a.model, device, &post).with_context(|| format!("loading model {}", a.model.display()))?;
    inspector.set_threshold(a.threshold)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let images = collect_images(&a.inputs)?;
    let jsonl_path = a.out.join("results.jsonl");
    let mut jsonl = std::fs::File::create(&jsonl_path).with_context(|| format!("creating {}", jsonl_path.display()))?;
    let pb = bar(images.len(), "predict");
    let mut failures = 0;
    for path in &images {
        let line = match predict_one(&inspector, path, &a.out) {
            Ok(v) => v,
            Err(e) => {
                failures += 1;
                serde_json::json!({ "image": path, "error": format!("{e:#}") })
            }
        };
        pb.suspend(|| println!("{line}"));
        writeln!(jsonl, "{line}")?;
        pb.inc(1);
    }
    pb.finish();
    eprintln!("{} images, {} failed; pictures and results.jsonl in {}", images.len(), failures, a.out.display());
    Ok(())
}

fn predict_one(inspector: &Inspector, path: &Path, out: &Path) -> anyhow::Result<serde_json::Value> {
    let image = imaging::load(path)?;
    let insp = inspector.inspect(&image)?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    let parent = path.parent().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = if parent.is_empty() { stem } else { format!("{parent}_{stem}") };
    let hm = out.join(format!("{stem}_heatmap.png"));
    let ov = out.join(format!("{stem}_overlay.png"));
    heatmap(&insp.map, 0.0, 1.0).save(&hm).with_context(|| format!("writing {}", hm.display()))?;
    overlay(&image, &insp.map, 0.0, 1.0, 0.5, &insp.regions).save(&ov).with_context(|| format!("writing {}", ov.display()))?;
    Ok(serde_json::json!({
        "image": path,
        "score": insp.score,
        "raw_score": insp.raw_score,
        "threshold": insp.threshold,
        "is_anomalous": insp.is_anomalous,
        "verdict": if insp.is_anomalous { "ANOMALOUS" } else { "good" },
        "regions": insp.regions,
        "ms": insp.elapsed.as_secs_f64() * 1e3,
        "heatmap": hm,
        "overlay": ov,
    }))
}

fn synth(a: SynthArgs) -> anyhow::Result<()> {
    let cfg = SyntheticConfig { seed: a.seed, n_train: a.n_train, ..SyntheticConfig::default() };
    let summary = generate_dataset(&a.out, &cfg).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("synthetic data set written to {}: {summary:?}", a.out.display());
    Ok(())
}
