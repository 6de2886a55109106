//! `anomaly_inspector`: fit, predict and make demo data from the command line (no ROS needed).
//! The work is done by the library; this parses, dispatches, draws progress bars and prints.
use std::io::Write as _;

use anyhow::{bail, Context as _};
use clap::ArgMatches;
use indicatif::{ProgressBar, ProgressStyle};

use anomaly_inspector::bench::{bench_engine, bench_knn_scaling, BenchReport, EngineBench};
use anomaly_inspector::cli::{BenchArgs, CalibrateArgs, Cli, Command, EvalArgs, FitArgs, PredictArgs, SynthArgs};
use anomaly_inspector::config::options::refuse_other_methods_options;
use anomaly_inspector::config::{PatchCoreConfig, PostprocessConfig};
use anomaly_inspector::dataset::{collect_images, MvtecDataset};
use anomaly_inspector::evaluation::{self, PredictLine, Progress};
use anomaly_inspector::model_file::{save_calibration, Method};
use anomaly_inspector::synthetic::{generate_dataset, SyntheticConfig};
use anomaly_inspector::training::{
    fit_draem, fit_patchcore, fit_supersimplenet, split_holdout, EpochLosses, FitOptions, FitStage, LossRecord,
};
use anomaly_inspector::{device, imaging, InferenceThread, Inspector};

fn main() -> anyhow::Result<()> {
    let _ = device::load_cuda_backend();
    let (cli, matches) = Cli::try_parse_with_matches(std::env::args_os()).unwrap_or_else(|e| e.exit());
    device::set_precision(cli.precision);
    match cli.command {
        Command::Fit(a) => fit(a, matches.subcommand_matches("fit").context("fit without its arguments")?),
        Command::Predict(a) => predict(a),
        Command::Synth(a) => synth(a),
        Command::Eval(a) => eval(a),
        Command::Calibrate(a) => calibrate(a),
        Command::Bench(a) => bench(a),
    }
}

/// A progress bar of `len` steps labelled `label`; `{msg}` is left for a running figure.
fn bar(len: usize, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        // A constant template; were it refused, indicatif's plain bar still shows progress.
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// A fit's progress callback: one bar per stage, the last loss beside DRAEM's training bar.
fn stage_bars<'a>(
    bars: &'a mut Option<(FitStage, ProgressBar)>,
    last_loss: &'a std::cell::Cell<f64>,
) -> impl FnMut(FitStage, usize, usize) + 'a {
    move |stage, done, total| {
        if bars.as_ref().map(|(s, _)| *s) != Some(stage) {
            if let Some((_, b)) = bars.take() {
                b.finish();
            }
            *bars = Some((stage, bar(total, &format!("{stage:?}").to_lowercase())));
        }
        if let Some((_, b)) = bars.as_ref() {
            b.set_position(done as u64);
            if stage == FitStage::Training {
                b.set_message(format!("loss {:.4}", last_loss.get()));
            }
        }
    }
}

fn fit(a: FitArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    refuse_other_methods_options(a.method, matches)?;
    let data = MvtecDataset::open(&a.data)?;
    eprintln!("{}", data.training_labels());
    if !data.train_defective.is_empty() && a.method != Method::Supersimplenet {
        eprintln!(
            "{} learns from good images only: the {} labelled defective images in train/ are not used (--method supersimplenet learns from them)",
            a.method.as_str(),
            data.train_defective.len()
        );
    }
    let device = device::resolve(a.device)?;
    let options = FitOptions {
        holdout_every: a.holdout_every,
        name: a.name.clone(),
        self_check_images: a.self_check,
        ..FitOptions::default()
    };
    let (mut bars, last_loss) = (None, std::cell::Cell::new(f64::NAN));
    let mut progress = stage_bars(&mut bars, &last_loss);
    let fitted = match a.method {
        Method::Draem => fit_draem_model(&a, &data, &options, device, &mut progress, &last_loss)?,
        Method::Supersimplenet => fit_supersimplenet_model(&a, &data, &options, device, &mut progress, &last_loss)?,
        Method::Patchcore => fit_patchcore_model(&a, &data, &options, device, &mut progress)?,
    };
    let Fitted { summary, calibration, n_holdout, self_check } = fitted;
    drop(progress);
    if let Some((_, b)) = bars.take() {
        b.finish();
    }
    let (image, pixel) = (calibration.image_threshold, calibration.pixel_threshold);
    eprintln!("{summary}; thresholds image {image:.4} pixel {pixel:.4} from {n_holdout} held-out images");
    if let Some(check) = self_check {
        let learnt = if a.method == Method::Draem { " (DRAEM trained on defects of this kind: expect it high)" } else { "" };
        eprintln!("{check}{learnt}");
    }
    match a.method {
        Method::Draem | Method::Supersimplenet => {
            eprintln!("model written to {} (checkpoint in {}/checkpoint)", a.out.display(), a.out.display())
        }
        Method::Patchcore => eprintln!("model written to {}", a.out.display()),
    }
    Ok(())
}

/// What a fit reports back to `fit`'s summary lines.
struct Fitted {
    summary: String,
    calibration: anomaly_inspector::model_file::Calibration,
    n_holdout: usize,
    self_check: Option<anomaly_inspector::self_check::SelfCheck>,
}

/// `fit --method draem`: the preset (or checkpoint) with the options given; trains DRAEM.
fn fit_draem_model(
    a: &FitArgs,
    data: &MvtecDataset,
    options: &FitOptions,
    device: tch::Device,
    progress: &mut dyn FnMut(FitStage, usize, usize),
    last_loss: &std::cell::Cell<f64>,
) -> anyhow::Result<Fitted> {
    let label = a.data.to_string_lossy();
    let mut cfg = a.training.starting_draem(&a.out).with_context(|| format!("resuming {}", a.out.display()))?;
    a.shared.apply(&mut cfg.preprocess, &mut cfg.seed);
    a.training.apply_draem(&mut cfg, split_holdout(&data.train_good, a.holdout_every).0.len());
    let [h, w] = cfg.preprocess.image_size;
    eprintln!(
        "training draem on {} good images of {} ({h}x{w} px, base width {}, {} steps of {} images, lr {}, anomalies from {:?}; device {}){}",
        data.train_good.len(), a.data.display(), cfg.base_width, cfg.steps, cfg.batch_size, cfg.lr, cfg.anomaly_source,
        device::describe(device), if a.training.resume { "; resuming" } else { "" }
    );
    let mut on_step = |r: &LossRecord| last_loss.set(r.losses.total);
    let train = a.training.draem_train_options();
    // fit_draem validates the configuration.
    let report = fit_draem(&data.train_good, &label, &cfg, device, &a.out, options, &train, progress, &mut on_step)
        .with_context(|| format!("training DRAEM on {}", a.data.display()))?;
    let (s, l) = (&report.summary, &report.summary.final_losses);
    let summary = format!(
        "{} steps ({} this run, {:.1} s, {} parameters) on {} images; last losses: total {:.4} = l2 {:.4} + ssim {:.4} + focal {:.4}",
        s.steps, s.steps - s.resumed_from_step.unwrap_or(0), s.train_seconds, s.parameters, s.n_images, l.total, l.l2, l.ssim, l.focal
    );
    Ok(Fitted { summary, calibration: report.calibration, n_holdout: report.n_holdout, self_check: report.self_check })
}

/// `fit --method supersimplenet`: the preset (or checkpoint) with the options given; trains
/// SuperSimpleNet on the good and the labelled images.
fn fit_supersimplenet_model(
    a: &FitArgs,
    data: &MvtecDataset,
    options: &FitOptions,
    device: tch::Device,
    progress: &mut dyn FnMut(FitStage, usize, usize),
    last_loss: &std::cell::Cell<f64>,
) -> anyhow::Result<Fitted> {
    let label = a.data.to_string_lossy();
    let mut cfg = a.training.starting_supersimplenet(&a.out).with_context(|| format!("resuming {}", a.out.display()))?;
    a.shared.apply(&mut cfg.preprocess, &mut cfg.seed);
    a.training.apply_supersimplenet(&mut cfg);
    a.patchcore.apply_backbone(&mut cfg.backbone);
    let weights = a.patchcore.backbone_weights()?;
    let [h, w] = cfg.preprocess.image_size;
    eprintln!(
        "training supersimplenet on {} ({h}x{w} px, {}, upscale {}, heads {}/{}, {} epochs of batches of {}, image score from {}; device {}){}",
        a.data.display(),
        cfg.backbone.layers.join("+"),
        cfg.upscale,
        cfg.seg_hidden,
        cfg.cls_channels,
        cfg.epochs,
        cfg.batch_size,
        cfg.image_score.for_supervision(data.supervision()).describe(),
        device::describe(device),
        if a.training.resume { "; resuming" } else { "" }
    );
    let mut on_epoch = |r: &EpochLosses| last_loss.set(r.total);
    let train = a.training.supersimplenet_train_options();
    let report = fit_supersimplenet(
        &data.train_good,
        &data.train_defective,
        &label,
        &cfg,
        &weights,
        device,
        &a.out,
        options,
        &train,
        progress,
        &mut on_epoch,
    )
    .with_context(|| format!("training SuperSimpleNet on {}", a.data.display()))?;
    let s = &report.summary;
    let summary = format!(
        "{} epochs ({} steps, {:.1} s; features {:?} cached in {:.1} s; {} parameters) on {} good + {} defective images ({} with masks); last loss {:.4}",
        s.epochs, s.steps, s.train_seconds, s.feature_shape, s.feature_seconds, s.parameters, s.n_good, s.n_defective, s.n_masks, s.final_loss
    );
    Ok(Fitted { summary, calibration: report.calibration, n_holdout: report.n_holdout, self_check: report.self_check })
}

/// `fit` (PatchCore): the defaults with the options given; fits the memory bank.
fn fit_patchcore_model(
    a: &FitArgs,
    data: &MvtecDataset,
    options: &FitOptions,
    device: tch::Device,
    progress: &mut dyn FnMut(FitStage, usize, usize),
) -> anyhow::Result<Fitted> {
    let label = a.data.to_string_lossy();
    let mut cfg = PatchCoreConfig::default();
    a.patchcore.apply(&mut cfg)?;
    a.shared.apply(&mut cfg.preprocess, &mut cfg.seed);
    let weights = a.patchcore.backbone_weights()?;
    let (n, what, dev) = (data.train_good.len(), cfg.backbone.layers.join("+"), device::describe(device));
    eprintln!("fitting {} on {n} good images of {} ({what}; device {dev})", a.method.as_str(), a.data.display());
    // PatchCore::fit validates the configuration.
    let report = fit_patchcore(&data.train_good, &label, &cfg, &weights, device, &a.out, options, progress)
        .with_context(|| format!("fitting on {}", a.data.display()))?;
    let s = &report.summary;
    let summary = format!(
        "memory bank {} x {} from {} patches of {} images (features {:.1} s, coreset {:.1} s)",
        s.bank_size, s.feature_dim, s.n_patches, s.n_images, s.extract_seconds, s.coreset_seconds
    );
    Ok(Fitted { summary, calibration: report.calibration, n_holdout: report.n_holdout, self_check: report.self_check })
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
    if images.is_empty() {
        bail!("no images found in {:?}", a.inputs);
    }
    let jsonl_path = a.out.join("results.jsonl");
    let mut jsonl = std::fs::File::create(&jsonl_path).with_context(|| format!("creating {}", jsonl_path.display()))?;
    let pb = bar(images.len(), "predict");
    let mut failures = 0;
    for path in &images {
        let line = evaluation::predict_image(&inspector, path, &a.out).map(PredictLine::Inspected).unwrap_or_else(|e| {
            failures += 1;
            PredictLine::Failed { image: path.clone(), error: format!("{:#}", anyhow::Error::new(e)) }
        });
        let line = line.to_json()?;
        pb.suspend(|| println!("{line}"));
        writeln!(jsonl, "{line}")?;
        pb.inc(1);
    }
    pb.finish();
    eprintln!("{} images, {} failed; pictures and results.jsonl in {}", images.len(), failures, a.out.display());
    Ok(())
}

fn synth(a: SynthArgs) -> anyhow::Result<()> {
    let cfg = SyntheticConfig { seed: a.seed, n_train: a.n_train, ..SyntheticConfig::default() };
    let summary = generate_dataset(&a.out, &cfg).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("synthetic data set written to {}: {summary:?}", a.out.display());
    Ok(())
}

fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let _inference = InferenceThread::enter(a.threads.map(usize::from));
    let device = device::resolve(a.device)?;
    let source = imaging::load(&a.image).with_context(|| format!("reading {}", a.image.display()))?;
    let mut engine = Vec::new();
    println!("{}", EngineBench::table_header());
    for model_dir in &a.model {
        let inspector = Inspector::new(model_dir, device, &PostprocessConfig::default())
            .with_context(|| format!("loading {}", model_dir.display()))?;
        for &(w, h) in &a.frame {
            let frame = image::imageops::resize(&source, w, h, image::imageops::FilterType::Triangle);
            let mut png = Vec::new();
            image::DynamicImage::ImageRgb8(frame.clone())
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            let r = bench_engine(&inspector, &frame, &png, a.iterations)?;
            println!("{}", r.table_row());
            engine.push(r);
        }
    }
    let device_name = device::describe(device);
    println!(
        "(ms, medians of {} runs on {device_name}; floor = network + kNN only; overhead = engine / floor - 1)",
        a.iterations
    );
    let dim = engine.iter().find_map(|r| r.bank_dim).unwrap_or(152);
    let mut knn_scaling = Vec::new();
    if !a.bank_rows.is_empty() {
        let queries = 1024; // one 256 px image at stride 8
        knn_scaling = bench_knn_scaling(&a.bank_rows, dim, queries, device, a.iterations.min(10))?;
        println!("\nkNN against memory-bank size ({queries} query patches, dim {dim}):");
        for k in &knn_scaling {
            println!("  {:>7} rows  {:>8.2} ms", k.bank_rows, k.knn_ms);
        }
    }
    if let Some(path) = &a.json {
        let json = BenchReport { device: device_name, engine, knn_scaling }.to_json()?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The progress callback of `eval` and `calibrate`: a bar, with skipped images printed above it.
fn image_bar<'a>(
    pb: &'a mut Option<ProgressBar>,
    label: &'a str,
    mut on_start: impl FnMut(usize) + 'a,
) -> impl FnMut(Progress<'_>) + 'a {
    move |p| match p {
        Progress::Started { total } => {
            on_start(total);
            *pb = Some(bar(total, label));
        }
        Progress::Image { done, .. } => pb.iter().for_each(|b| b.set_position(done as u64)),
        Progress::Skipped(msg) => match pb {
            Some(b) => b.suspend(|| eprintln!("error: {msg}")),
            None => eprintln!("error: {msg}"),
        },
    }
}

fn calibrate(a: CalibrateArgs) -> anyhow::Result<()> {
    let device = device::resolve(a.device)?;
    let inspector = Inspector::new(&a.model, device, &PostprocessConfig::default())
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let data = MvtecDataset::open(&a.data)?;
    let mut pb = None;
    let r = evaluation::calibrate(&inspector, &data, &a.options, &mut image_bar(&mut pb, "calibrate", |_| {}))?;
    pb.iter().for_each(ProgressBar::finish_and_clear);
    eprint!("{}", r.table());
    if a.dry_run {
        eprintln!("--dry-run: {} unchanged", a.model.display());
    } else {
        save_calibration(&a.model, &r.after)?;
        eprintln!(
            "thresholds written to {}/model.json (the previous file is model.json.previous); scores are now 0.5 at these thresholds",
            a.model.display()
        );
    }
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let t_start = std::time::Instant::now();
    if !a.model.exists() {
        bail!("model directory {} does not exist: write one with `anomaly_inspector fit`", a.model.display());
    }
    let device = device::resolve(a.device)?;
    let inspector = Inspector::new(&a.model, device, &PostprocessConfig::default())
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let data = MvtecDataset::open(&a.data)?;
    let mut pb = None;
    let on_start = |n: usize| {
        eprintln!(
            "evaluating {} \"{}\" on {n} test images of {} (device {}; pixel metrics at <= {} px)",
            inspector.method(),
            inspector.model_id(),
            a.data.display(),
            device::describe(device),
            a.options.pixel_max_side
        )
    };
    let mut r = evaluation::evaluate(&inspector, &data, &a.options, &mut image_bar(&mut pb, "eval", on_start))?;
    pb.iter().for_each(ProgressBar::finish_and_clear);
    // The wall time has always counted the model's loading too.
    r.wall_seconds = t_start.elapsed().as_secs_f64();
    if let Some(dir) = a.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&a.json, r.to_json()?).with_context(|| format!("writing {}", a.json.display()))?;

    eprint!("{}", r.table());
    eprintln!(
        "{} good test images (the negatives of every row); inspect {:.1} ms/image ({:.1} images/s); {} errors; report in {}",
        r.n_good,
        r.ms_per_image,
        r.images_per_second,
        r.errors.len(),
        a.json.display()
    );
    if r.image_auroc.is_none() {
        eprintln!("warning: image AUROC undefined: the evaluated images need both good and defective ones");
    }
    Ok(())
}
