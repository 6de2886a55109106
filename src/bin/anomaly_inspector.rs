//! `anomaly_inspector`: fit, predict and make demo data from the command line (no ROS needed).
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use anomaly_inspector::config::{default_backbone_weights, BackboneKind, DeviceChoice, PatchCoreConfig, PostprocessConfig};
use anomaly_inspector::config::{AnomalySource, DraemConfig, Search};
use anomaly_inspector::dataset::MvtecDataset;
use anomaly_inspector::synthetic::{generate_dataset, SyntheticConfig};
use anomaly_inspector::training::{fit_draem, read_checkpoint_state, split_holdout, DraemTrainOptions};
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
    /// Evaluate a model on the labelled test images of an MVTec-layout folder: image AUROC,
    /// F1-max, pixel AUROC, AUPRO, per defect type, and speed; writes a JSON report.
    Eval(EvalArgs),
    /// Set a model's thresholds at the best F1 on labelled validation images (good and
    /// defective, with masks; not the images you evaluate on). The old model.json is kept.
    Calibrate(CalibrateArgs),
    /// Time the engine's stages (decode, preprocess, network, kNN, post-processing) against the
    /// model's own forward + kNN, and the kNN against memory-bank size; prints a table.
    Bench(BenchArgs),
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
    #[arg(long, default_value = "patchcore", value_parser = ["patchcore", "draem"])]
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
    /// PatchCore: keep each image's aspect ratio, scaled down to at most the input's area (the
    /// default; the flag stays for scripts that name it).
    #[arg(long, conflicts_with = "stretch")]
    keep_aspect: bool,
    /// PatchCore: stretch each image to the square input instead (the paper's and anomalib's
    /// input; the default before December 2026).
    #[arg(long)]
    stretch: bool,
    /// Fraction of patches kept in the memory bank.
    #[arg(long)]
    coreset_ratio: Option<f64>,
    /// Upper bound on memory-bank rows, whatever the ratio gives (default 40000; bounds memory
    /// and the search's cost).
    #[arg(long)]
    max_bank_size: Option<usize>,
    /// Nearest-neighbour search the model will use: 0 = exact (default), N = approximate over
    /// the N nearest k-means cells of the bank (faster on large banks; see README "Speed").
    #[arg(long)]
    knn_probes: Option<usize>,
    /// Search each frame's patches only among those of the K training images most like it
    /// (SPADE's image retrieval; each training image keeps its own coreset). 0 = the whole bank
    /// (default). Faster, and more accurate on Magnetic-Tile (README).
    #[arg(long)]
    retrieval_images: Option<usize>,
    /// Dimension of the random projection the coreset is chosen in (at least the feature
    /// dimension: no projection, exact greedy k-center).
    #[arg(long)]
    coreset_dim: Option<i64>,
    /// Side of the square of neighbouring patches averaged into each patch feature (odd; the
    /// paper's 3). Larger sees more context per patch.
    #[arg(long)]
    neighbourhood: Option<i64>,
    /// Gaussian smoothing of the anomaly map, in network-input pixels (the paper's 4). Larger
    /// favours large, low-contrast defects over small sharp ones.
    #[arg(long)]
    blur_sigma: Option<f64>,
    /// PatchCore: a second, wide smoothing in network-input pixels (default 32; 0 = off): each
    /// pixel scores at least the smoothed mean around it, so large low-contrast defects fill in
    /// while small sharp ones keep their peaks.
    #[arg(long)]
    coarse_blur_sigma: Option<f64>,
    /// PatchCore: divide each patch distance by the bank's local spacing at its nearest row, the
    /// distance from that row to its K-th nearest other row (default 5; 0 = the paper's raw distances).
    #[arg(long, value_name = "K")]
    density_neighbors: Option<i64>,
    /// PatchCore: smooth each frame's patch scores among the patches that look alike (default
    /// 0.45, the feature bandwidth relative to the frame's median feature distance; 0 = off), so
    /// that a defect region of one texture scores as a whole.
    #[arg(long, value_name = "B")]
    guided_bandwidth: Option<f64>,
    /// PatchCore: spatial reach of that smoothing, in network-input pixels (default 48).
    #[arg(long, value_name = "PX")]
    guided_sigma: Option<f64>,
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
    /// DRAEM: starting settings, cpu-small (minutes on 2 CPU cores, 128 px) or paper (256 px,
    /// base width 128, 20000 steps: a GPU's work).
    #[arg(long, default_value = "cpu-small", value_parser = ["cpu-small", "paper"])]
    preset: String,
    /// DRAEM: optimiser steps in all (when resuming, counted from the very start).
    #[arg(long)]
    steps: Option<usize>,
    /// DRAEM: passes over the training images instead of --steps.
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<f64>,
    /// DRAEM: channels of the first reconstructive block (paper 128); the discriminative
    /// U-Net uses half.
    #[arg(long)]
    base_width: Option<i64>,
    /// DRAEM: training images per step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// DRAEM: Adam learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// DRAEM: where simulated anomalies take their texture from: training_images (default),
    /// procedural, or a folder of images.
    #[arg(long)]
    anomaly_source: Option<AnomalySource>,
    /// DRAEM: write a checkpoint into <out>/checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = DraemTrainOptions::default().checkpoint_every)]
    checkpoint_every: usize,
    /// DRAEM: continue the training in <out>/checkpoint with its settings; --steps may extend it.
    #[arg(long)]
    resume: bool,
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
        Command::Eval(a) => eval(a),
        Command::Calibrate(a) => calibrate(a),
        Command::Bench(a) => bench(a),
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
    if a.method == "draem" {
        return fit_draem_command(a);
    }
    if a.steps.is_some()
        || a.epochs.is_some()
        || a.base_width.is_some()
        || a.batch_size.is_some()
        || a.lr.is_some()
        || a.anomaly_source.is_some()
        || a.resume
    {
        bail!("--steps, --epochs, --base-width, --batch-size, --lr, --anomaly-source and --resume are DRAEM options: add --method draem");
    }
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
    if a.keep_aspect {
        cfg.preprocess.resize = anomaly_inspector::Resize::KeepAspect;
    }
    if a.stretch {
        cfg.preprocess.resize = anomaly_inspector::Resize::Stretch;
    }
    if let Some(r) = a.coreset_ratio {
        cfg.coreset.ratio = r;
    }
    if let Some(n) = a.max_bank_size {
        cfg.coreset.max_rows = n;
    }
    if let Some(d) = a.coreset_dim {
        cfg.coreset.projection_dim = d;
    }
    if a.knn_probes.unwrap_or(0) > 0 && a.retrieval_images.unwrap_or(0) > 0 {
        bail!("--retrieval-images and --knn-probes both speed up the search in their own way: set one of them to 0");
    }
    if let Some(p) = a.knn_probes {
        cfg.search = if p == 0 { Search::Exact } else { Search::Approximate { probes: p } };
    }
    if let Some(k) = a.retrieval_images {
        cfg.search = if k == 0 { Search::Exact } else { Search::Retrieval { images: k } };
    }
    if let Some(n) = a.neighbourhood {
        cfg.neighbourhood = n;
    }
    if let Some(s) = a.blur_sigma {
        cfg.map.blur_sigma = s;
    }
    if let Some(s) = a.coarse_blur_sigma {
        cfg.map.coarse_blur_sigma = (s != 0.0).then_some(s);
    }
    if let Some(k) = a.density_neighbors {
        cfg.density_neighbors = (k != 0).then_some(k);
    }
    if let Some(b) = a.guided_bandwidth {
        cfg.map.guided_bandwidth = (b != 0.0).then_some(b);
    }
    if let Some(s) = a.guided_sigma {
        cfg.map.guided_sigma = s;
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
                FitStage::Coreset => "coreset",
                FitStage::Calibration => "calibration",
                FitStage::Loading => "loading",
                FitStage::Training => "training",
            };
            bars = Some((stage, bar(total, label)));
        }
        if let Some((_, b)) = &bars {
            b.set_position(done as u64);
        }
    };
    let options = FitOptions { holdout_every: a.holdout_every, name: a.name, ..FitOptions::default() };
    let report =
        fit_patchcore(&data.train_good, &a.data.to_string_lossy(), &cfg, &weights, device, &a.out, &options, &mut progress)
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

/// `fit --method draem`: settings from the preset (or, with --resume, from the checkpoint),
/// overridden by the options given.
fn fit_draem_command(a: FitArgs) -> anyhow::Result<()> {
    if a.coreset_ratio.is_some()
        || a.max_bank_size.is_some()
        || a.coreset_dim.is_some()
        || a.knn_probes.is_some()
        || a.retrieval_images.is_some()
        || a.neighbourhood.is_some()
        || a.blur_sigma.is_some()
        || a.coarse_blur_sigma.is_some()
        || a.density_neighbors.is_some()
        || a.guided_bandwidth.is_some()
        || a.guided_sigma.is_some()
        || a.keep_aspect
        || a.stretch
        || a.layers.is_some()
        || a.backbone_weights.is_some()
        || a.backbone != "efficientnet_lite0"
    {
        bail!(
            "--backbone, --backbone-weights, --layers, --coreset-ratio, --max-bank-size, --coreset-dim, --knn-probes, --retrieval-images, \
             --neighbourhood, --blur-sigma, --coarse-blur-sigma, --density-neighbors, --guided-bandwidth, --guided-sigma, \
             --keep-aspect and --stretch are PatchCore options; DRAEM trains its own networks"
        );
    }
    let data = MvtecDataset::open(&a.data)?;
    let mut cfg = if a.resume {
        read_checkpoint_state(&a.out).with_context(|| format!("resuming {}", a.out.display()))?.config
    } else if a.preset == "paper" {
        DraemConfig::paper()
    } else {
        DraemConfig::cpu_small()
    };
    if let Some(s) = a.image_size {
        cfg.preprocess.image_size = [s, s];
    }
    if let Some(b) = a.base_width {
        cfg.base_width = b;
    }
    if let Some(b) = a.batch_size {
        cfg.batch_size = b;
    }
    if let Some(lr) = a.lr {
        cfg.lr = lr;
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if let Some(src) = a.anomaly_source {
        cfg.anomaly_source = src;
    }
    if let Some(s) = a.steps {
        cfg.steps = s;
    } else if let Some(e) = a.epochs {
        let n_fit = split_holdout(&data.train_good, a.holdout_every).0.len();
        cfg.steps = (e * n_fit as f64 / cfg.batch_size.max(1) as f64).ceil().max(1.0) as usize;
    }
    cfg.validate()?;
    let device = device::resolve(a.device)?;
    let [h, w] = cfg.preprocess.image_size;
    eprintln!(
        "training draem on {} good images of {} ({h}x{w} px, base width {}, {} steps of {} images, lr {}, anomalies from {:?}; device {}){}",
        data.train_good.len(),
        a.data.display(),
        cfg.base_width,
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
        cfg.anomaly_source,
        device::describe(device),
        if a.resume { "; resuming" } else { "" }
    );
    let last_loss = std::cell::Cell::new(f64::NAN);
    let mut bars: Option<(FitStage, ProgressBar)> = None;
    let mut progress = |stage: FitStage, done: usize, total: usize| {
        if bars.as_ref().map(|(s, _)| *s) != Some(stage) {
            if let Some((_, b)) = bars.take() {
                b.finish();
            }
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_prefix(format!("{stage:?}").to_lowercase());
            bars = Some((stage, b));
        }
        if let Some((_, b)) = &bars {
            b.set_position(done as u64);
            if stage == FitStage::Training {
                b.set_message(format!("loss {:.4}", last_loss.get()));
            }
        }
    };
    let mut on_step = |r: &anomaly_inspector::training::LossRecord| last_loss.set(r.losses.total);
    let options = FitOptions { holdout_every: a.holdout_every, name: a.name, ..FitOptions::default() };
    let train = DraemTrainOptions { checkpoint_every: a.checkpoint_every, resume: a.resume };
    let report = fit_draem(
        &data.train_good,
        &a.data.to_string_lossy(),
        &cfg,
        device,
        &a.out,
        &options,
        &train,
        &mut progress,
        &mut on_step,
    )
    .with_context(|| format!("training DRAEM on {}", a.data.display()))?;
    if let Some((_, b)) = bars.take() {
        b.finish();
    }
    let s = &report.summary;
    let l = &s.final_losses;
    eprintln!(
        "{} steps ({} this run, {:.1} s, {} parameters) on {} images; last losses: total {:.4} = l2 {:.4} + ssim {:.4} + focal {:.4}; \
         thresholds image {:.4} pixel {:.4} from {} held-out images",
        s.steps,
        s.steps - s.resumed_from_step.unwrap_or(0),
        s.train_seconds,
        s.parameters,
        s.n_images,
        l.total,
        l.l2,
        l.ssim,
        l.focal,
        report.calibration.image_threshold,
        report.calibration.pixel_threshold,
        report.n_holdout
    );
    eprintln!("model written to {} (checkpoint in {}/checkpoint)", a.out.display(), a.out.display());
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
    let mut inspector =
        Inspector::new(&a.model, device, &post).with_context(|| format!("loading model {}", a.model.display()))?;
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
    insp.heatmap().save(&hm).with_context(|| format!("writing {}", hm.display()))?;
    insp.overlay(&image).save(&ov).with_context(|| format!("writing {}", ov.display()))?;
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

#[derive(Args)]
struct BenchArgs {
    /// Model directories to time (each at each --frame size).
    #[arg(long, required = true)]
    model: Vec<PathBuf>,
    /// Image whose pixels are used as the frame (resized to each --frame size).
    #[arg(long)]
    image: PathBuf,
    /// Frame sizes WxH fed to the engine.
    #[arg(long, value_delimiter = ',', default_value = "640x480")]
    frame: Vec<String>,
    /// Timed repetitions per stage (medians are reported).
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// Memory-bank sizes for the kNN scaling table (empty: skip it).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,20000,40000,100000")]
    bank_rows: Vec<i64>,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Also write the numbers as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_frame_size(s: &str) -> anyhow::Result<(u32, u32)> {
    let (w, h) = s.split_once('x').with_context(|| format!("frame size '{s}': write WxH, e.g. 640x480"))?;
    let (w, h): (u32, u32) = (w.trim().parse()?, h.trim().parse()?);
    if !(16..=8192).contains(&w) || !(16..=8192).contains(&h) {
        bail!("frame size {w}x{h}: each side must be 16..=8192");
    }
    Ok((w, h))
}

fn bench(a: BenchArgs) -> anyhow::Result<()> {
    use anomaly_inspector::bench::{bench_engine, bench_knn_scaling};
    let device = device::resolve(a.device)?;
    let source = imaging::load(&a.image).with_context(|| format!("reading {}", a.image.display()))?;
    let sizes = a.frame.iter().map(|s| parse_frame_size(s)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut engine = Vec::new();
    println!(
        "{:<22} {:>5} {:>9} {:>7} | {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} {:>8} | {:>6}",
        "model",
        "input",
        "frame",
        "bank",
        "png",
        "convert",
        "preproc",
        "network",
        "knn",
        "forward",
        "post",
        "engine",
        "floor",
        "overhead",
        "RSS MiB"
    );
    for model_dir in &a.model {
        let inspector = Inspector::new(model_dir, device, &PostprocessConfig::default())
            .with_context(|| format!("loading {}", model_dir.display()))?;
        for &(w, h) in &sizes {
            let frame = image::imageops::resize(&source, w, h, image::imageops::FilterType::Triangle);
            let mut png = Vec::new();
            image::DynamicImage::ImageRgb8(frame.clone())
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            let r = bench_engine(&inspector, &frame, &png, a.iterations)?;
            let s = &r.stages;
            println!(
                "{:<22} {:>5} {:>9} {:>7} | {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} | {:>7.2} {:>7.2} {:>7.1}% | {:>6.0}",
                r.model, r.input_size, format!("{w}x{h}"), r.bank_size.map_or("-".into(), |b| b.to_string()),
                s.decode_png_ms, s.convert_ms, s.preprocess_ms, s.network_ms, s.knn_ms, s.forward_ms, s.postprocess_ms,
                s.engine_ms, s.floor_ms, r.engine_overhead * 100.0, r.rss_mib
            );
            engine.push(r);
        }
    }
    println!(
        "(ms, medians of {} runs on {}; floor = network + kNN only; overhead = engine / floor - 1)",
        a.iterations,
        device::describe(device)
    );
    let dim = engine.iter().find_map(|r| r.bank_dim).unwrap_or(152);
    let mut knn = Vec::new();
    if !a.bank_rows.is_empty() {
        let queries = 1024; // one 256 px image at stride 8
        knn = bench_knn_scaling(&a.bank_rows, dim, queries, device, a.iterations.min(10))?;
        println!("\nkNN against memory-bank size ({queries} query patches, dim {dim}):");
        for k in &knn {
            println!("  {:>7} rows  {:>8.2} ms", k.bank_rows, k.knn_ms);
        }
    }
    if let Some(path) = &a.json {
        let json = serde_json::json!({ "device": device::describe(device), "engine": engine, "knn_scaling": knn });
        std::fs::write(path, serde_json::to_string_pretty(&json)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[derive(Args)]
struct CalibrateArgs {
    /// Model directory written by `fit` (its model.json is rewritten; the old one is kept as
    /// model.json.previous).
    #[arg(long)]
    model: PathBuf,
    /// Validation images in the MVTec AD layout: test/good/, test/<defect>/ and
    /// ground_truth/<defect>/<stem>_mask.png. Use images kept apart from the ones you evaluate on.
    #[arg(long)]
    data: PathBuf,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Pixels are compared on maps and masks scaled to at most this many pixels on the long side.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(8..))]
    pixel_max_side: u32,
    /// Print the thresholds found without changing the model.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// Model directory written by `fit`.
    #[arg(long)]
    model: PathBuf,
    /// Data set root in the MVTec AD layout: test/<good|defect>/ images and
    /// ground_truth/<defect>/<stem>_mask.png masks.
    #[arg(long)]
    data: PathBuf,
    /// The JSON report to write.
    #[arg(long)]
    json: PathBuf,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Evaluate only the first N images (by name) of each test/ folder, good included.
    #[arg(long)]
    limit_per_type: Option<usize>,
    /// Pixel metrics are computed on maps and masks scaled down to at most this many pixels on
    /// the long side (bilinear for maps, nearest for masks), which bounds memory.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(8..))]
    pixel_max_side: u32,
}

/// Image scores of one evaluated image.
struct EvalImage {
    /// Index into the evaluation's groups (0 = good, then the defect types).
    group: usize,
    raw_score: f32,
}

/// The size pixel metrics use for a `width` x `height` image: at most `max_side` on the long
/// side, aspect ratio kept.
fn eval_size(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let long = width.max(height);
    if long <= max_side {
        return (width, height);
    }
    let s = f64::from(max_side) / f64::from(long);
    let side = |v: u32| ((f64::from(v) * s).round() as u32).clamp(1, max_side);
    (side(width), side(height))
}

/// The ground truth of `sample` (a `w` x `h` image) at the pixel-metric size `pw` x `ph`,
/// row-major, `true` = defect; all `false` for a good image.
fn eval_mask(sample: &anomaly_inspector::dataset::TestSample, w: u32, h: u32, pw: u32, ph: u32) -> anyhow::Result<Vec<bool>> {
    match (&sample.defect, &sample.mask) {
        (None, _) => Ok(vec![false; pw as usize * ph as usize]),
        (Some(_), None) => Err(anyhow::anyhow!("no ground-truth mask found under ground_truth/")),
        (Some(_), Some(path)) => anomaly_inspector::dataset::load_mask(path, w, h).map_err(Into::into).map(|m| {
            let m =
                if (pw, ph) == (w, h) { m } else { image::imageops::resize(&m, pw, ph, image::imageops::FilterType::Nearest) };
            m.pixels().map(|p| p.0[0] > 0).collect()
        }),
    }
}

/// Image AUROC and F1-max of the images in `groups` (good = negative), `None` where undefined.
fn image_metrics(images: &[EvalImage], groups: &[usize]) -> (Option<f64>, Option<(f64, f32)>) {
    let (scores, labels): (Vec<f32>, Vec<bool>) =
        images.iter().filter(|i| groups.contains(&i.group)).map(|i| (i.raw_score, i.group != 0)).unzip();
    (anomaly_inspector::metrics::auroc(&scores, &labels).ok(), anomaly_inspector::metrics::f1_max(&scores, &labels).ok())
}

fn calibrate(a: CalibrateArgs) -> anyhow::Result<()> {
    use anomaly_inspector::model_file::{save_calibration, Calibration};

    let device = device::resolve(a.device)?;
    let inspector = Inspector::new(&a.model, device, &PostprocessConfig::default())
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let data = MvtecDataset::open(&a.data)?;
    if data.test.is_empty() {
        bail!("{}: no validation images (expected test/good/*.png and test/<defect>/*.png)", a.data.display());
    }
    let old = inspector.manifest().calibration.clone();
    let (mut image_scores, mut image_defective) = (Vec::new(), Vec::new());
    let (mut pixel_scores, mut pixel_defective) = (Vec::new(), Vec::new());
    let mut skipped = 0usize;
    let pb = bar(data.test.len(), "calibrate");
    for s in &data.test {
        let scored = (|| -> anyhow::Result<_> {
            let image = imaging::load(&s.path)?;
            let insp = inspector.inspect(&image)?;
            let (w, h) = image.dimensions();
            let (pw, ph) = eval_size(w, h, a.pixel_max_side);
            Ok((insp.raw_score, insp.map.resized(pw, ph), eval_mask(s, w, h, pw, ph)?))
        })();
        match scored {
            Ok((raw, map, mask)) => {
                image_scores.push(raw);
                image_defective.push(s.defect.is_some());
                // The map is normalised (0.5 at the current pixel threshold): back to raw scores.
                pixel_scores.extend(map.data().iter().map(|&v| 2.0 * v * old.pixel_threshold));
                pixel_defective.extend(mask);
            }
            Err(e) => {
                skipped += 1;
                pb.suspend(|| eprintln!("error: {}: {e:#} (image skipped)", s.path.display()));
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let (new, image_f1, pixel_f1) = Calibration::from_validation(
        &image_scores,
        &image_defective,
        &pixel_scores,
        &pixel_defective,
        &a.data.display().to_string(),
    )?;
    // from_validation has checked that both sets hold defects.
    let f1_at = |scores: &[f32], labels: &[bool], t: f32| anomaly_inspector::metrics::f1_at(scores, labels, t).unwrap_or(0.0);
    eprintln!("{} validation images ({} skipped) of {}", image_scores.len(), skipped, a.data.display());
    eprintln!("                  threshold (raw)      F1 on these images");
    eprintln!("                  before     after     before   after");
    eprintln!(
        "image           {:>9.4} {:>9.4}   {:>6.3}  {:>6.3}",
        old.image_threshold,
        new.image_threshold,
        f1_at(&image_scores, &image_defective, old.image_threshold),
        image_f1
    );
    eprintln!(
        "pixel           {:>9.4} {:>9.4}   {:>6.3}  {:>6.3}",
        old.pixel_threshold,
        new.pixel_threshold,
        f1_at(&pixel_scores, &pixel_defective, old.pixel_threshold),
        pixel_f1
    );
    if a.dry_run {
        eprintln!("--dry-run: {} unchanged", a.model.display());
    } else {
        save_calibration(&a.model, &new)?;
        eprintln!(
            "thresholds written to {}/model.json (the previous file is model.json.previous); scores are now 0.5 at these thresholds",
            a.model.display()
        );
    }
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    use anomaly_inspector::metrics::{self, PixelScores, AUPRO_FPR_LIMIT};

    let t_start = std::time::Instant::now();
    if !a.model.exists() {
        bail!("model directory {} does not exist: write one with `anomaly_inspector fit`", a.model.display());
    }
    let device = device::resolve(a.device)?;
    let inspector = Inspector::new(&a.model, device, &PostprocessConfig::default())
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let data = MvtecDataset::open(&a.data)?;

    // Groups: "good" first, then the defect types (sorted); the first N images of each.
    let mut group_names = vec!["good".to_string()];
    group_names.extend(data.defect_types());
    let group_of = |s: &anomaly_inspector::dataset::TestSample| {
        s.defect.as_ref().map_or(0, |d| group_names.iter().position(|g| g == d).unwrap_or(0))
    };
    let mut taken = vec![0usize; group_names.len()];
    let samples: Vec<_> = data
        .test
        .iter()
        .filter(|s| {
            let g = group_of(s);
            taken[g] += 1;
            a.limit_per_type.is_none_or(|n| taken[g] <= n)
        })
        .collect();
    if samples.is_empty() {
        bail!("{}: no test images (expected test/good/*.png and test/<defect>/*.png)", a.data.display());
    }
    eprintln!(
        "evaluating {} \"{}\" on {} test images of {} (device {}; pixel metrics at <= {} px)",
        inspector.method(),
        inspector.model_id(),
        samples.len(),
        a.data.display(),
        device::describe(device),
        a.pixel_max_side
    );

    // One untimed inspection first: the first call pays one-off costs (allocations, thread
    // pools, CUDA kernels) that say nothing about the speed in service.
    if let Ok(img) = imaging::load(&samples[0].path) {
        let _ = inspector.inspect(&img);
    }

    let mut images: Vec<EvalImage> = Vec::with_capacity(samples.len());
    let mut pixels: Vec<PixelScores> = vec![PixelScores::new(); group_names.len()];
    let mut errors: Vec<String> = Vec::new();
    let mut inspect_seconds = 0.0f64;
    // Pixels whose normalised score is clamped at 1.0, by class: [defect-free, defect].
    let mut saturated = [0u64; 2];
    let mut counted = [0u64; 2];
    let pb = bar(samples.len(), "eval");
    for s in &samples {
        let group = group_of(s);
        let result = (|| -> anyhow::Result<_> {
            let image = imaging::load(&s.path)?;
            let insp = inspector.inspect(&image)?;
            Ok((image.dimensions(), insp))
        })();
        let ((w, h), insp) = match result {
            Ok(v) => v,
            Err(e) => {
                let msg = format!("{}: {e:#}", s.path.display());
                pb.suspend(|| eprintln!("error: {msg} (image skipped)"));
                errors.push(msg);
                pb.inc(1);
                continue;
            }
        };
        inspect_seconds += insp.elapsed.as_secs_f64();
        images.push(EvalImage { group, raw_score: insp.raw_score });

        let (pw, ph) = eval_size(w, h, a.pixel_max_side);
        let mask = eval_mask(s, w, h, pw, ph);
        match mask {
            Ok(mask) => {
                let map = insp.map.resized(pw, ph);
                for (&v, &m) in map.data().iter().zip(&mask) {
                    counted[m as usize] += 1;
                    saturated[m as usize] += u64::from(v >= 1.0);
                }
                if let Err(e) = pixels[group].add_image(map.data(), &mask, pw) {
                    let msg = format!("{}: {e} (pixel metrics skipped for this image)", s.path.display());
                    pb.suspend(|| eprintln!("error: {msg}"));
                    errors.push(msg);
                }
            }
            Err(e) => {
                let msg = format!("{}: {e:#} (pixel metrics skipped for this image)", s.path.display());
                pb.suspend(|| eprintln!("error: {msg}"));
                errors.push(msg);
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if images.is_empty() {
        bail!("no test image could be inspected ({} errors; first: {})", errors.len(), errors[0]);
    }

    let sorted: Vec<_> = pixels.into_iter().map(PixelScores::into_sorted).collect();
    let n_in = |g: usize| images.iter().filter(|i| i.group == g).count();
    let all_groups: Vec<usize> = (0..group_names.len()).collect();
    let (image_auroc, image_f1) = image_metrics(&images, &all_groups);
    let pixel = metrics::pixel_metrics(&sorted.iter().collect::<Vec<_>>(), AUPRO_FPR_LIMIT).ok();
    let image_threshold = inspector.manifest().calibration.image_threshold;
    let f1_at_threshold = {
        let (scores, labels): (Vec<f32>, Vec<bool>) = images.iter().map(|i| (i.raw_score, i.group != 0)).unzip();
        metrics::f1_at(&scores, &labels, image_threshold).ok()
    };

    let mut per_defect = serde_json::Map::new();
    let mut rows = Vec::new();
    for (g, name) in group_names.iter().enumerate().skip(1) {
        let (auroc, f1) = image_metrics(&images, &[0, g]);
        let px = metrics::pixel_metrics(&[&sorted[0], &sorted[g]], AUPRO_FPR_LIMIT).ok();
        per_defect.insert(
            name.clone(),
            serde_json::json!({
                "n_images": n_in(g),
                "image_auroc": auroc,
                "image_f1_max": f1.map(|f| f.0),
                "pixel_auroc": px.map(|p| p.auroc),
                "aupro": px.map(|p| p.aupro),
                "n_regions": px.map(|p| p.n_regions),
            }),
        );
        rows.push((name.clone(), n_in(g), auroc, f1.map(|f| f.0), px));
    }

    let n = images.len();
    let ms_per_image = inspect_seconds * 1e3 / n as f64;
    let frac = |i: usize| if counted[i] == 0 { None } else { Some(saturated[i] as f64 / counted[i] as f64) };
    let report = serde_json::json!({
        "model": inspector.model_id(),
        "model_dir": a.model,
        "method": inspector.method(),
        "data": a.data,
        "device": device::describe(device),
        "n_images": n,
        "n_good": n_in(0),
        "n_anomalous": n - n_in(0),
        "n_failed": samples.len() - n,
        "image_auroc": image_auroc,
        "image_f1_max": image_f1.map(|f| f.0),
        "image_f1_threshold_raw": image_f1.map(|f| f.1),
        // What the node's verdict reaches: F1 with the model's own threshold, not the best one.
        "image_threshold_raw": image_threshold,
        "image_f1_at_threshold": f1_at_threshold,
        "pixel_auroc": pixel.map(|p| p.auroc),
        "aupro": pixel.map(|p| p.aupro),
        "aupro_fpr_limit": AUPRO_FPR_LIMIT,
        "n_pixels": pixel.map(|p| p.n_pixels),
        "n_regions": pixel.map(|p| p.n_regions),
        "pixel_max_side": a.pixel_max_side,
        "pixel_saturated_fraction": { "defect_free": frac(0), "defect": frac(1) },
        "per_defect": per_defect,
        "ms_per_image": ms_per_image,
        "images_per_second": if inspect_seconds > 0.0 { n as f64 / inspect_seconds } else { 0.0 },
        "wall_seconds": t_start.elapsed().as_secs_f64(),
        "errors": errors,
        "notes": "image metrics on the raw image score; pixel metrics on the normalised map \
                  (0.5 = pixel threshold, clamped to 0..1, so pixels at >= 2x the threshold tie at 1.0), \
                  scaled to pixel_max_side; AUPRO = area under PRO(FPR) for FPR in 0..aupro_fpr_limit, \
                  divided by the limit; ms_per_image = mean Inspector::inspect time after one warm-up call",
    });
    if let Some(dir) = a.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&a.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", a.json.display()))?;

    let f = |v: Option<f64>| v.map_or_else(|| "     -".to_string(), |v| format!("{v:6.3}"));
    eprintln!("{:<14} {:>6}  {:>11}  {:>6}  {:>11}  {:>9}", "", "images", "image AUROC", "F1-max", "pixel AUROC", "AUPRO@0.3");
    eprintln!(
        "{:<14} {:>6}  {:>11}  {:>6}  {:>11}  {:>9}",
        "all",
        n,
        f(image_auroc),
        f(image_f1.map(|f| f.0)),
        f(pixel.map(|p| p.auroc)),
        f(pixel.map(|p| p.aupro))
    );
    for (name, count, auroc, f1, px) in rows {
        eprintln!(
            "{:<14} {:>6}  {:>11}  {:>6}  {:>11}  {:>9}",
            name,
            count,
            f(auroc),
            f(f1),
            f(px.map(|p| p.auroc)),
            f(px.map(|p| p.aupro))
        );
    }
    if let Some(f1) = f1_at_threshold {
        eprintln!("image F1 at the model's own threshold ({image_threshold:.4} raw, the node's verdict): {f1:.3}");
    }
    eprintln!(
        "{} good test images (the negatives of every row); inspect {:.1} ms/image ({:.1} images/s); {} errors; report in {}",
        n_in(0),
        ms_per_image,
        if inspect_seconds > 0.0 { n as f64 / inspect_seconds } else { 0.0 },
        errors.len(),
        a.json.display()
    );
    if image_auroc.is_none() {
        eprintln!("warning: image AUROC undefined: the evaluated images need both good and defective ones");
    }
    Ok(())
}
