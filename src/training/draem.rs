//! DRAEM training: simulated anomalies on defect-free images, losses L2 + SSIM on the
//! reconstruction and focal loss on the predicted mask, Adam; checkpoints that a later run
//! resumes exactly; calibration on held-out good images as for PatchCore.
//!
//! Determinism: the initial weights come from `config.seed`; the order of training images is a
//! seeded shuffle per epoch and every simulated anomaly of step `s` comes from a generator
//! seeded by (`seed`, `s`). A checkpoint therefore needs only the weights (BatchNorm
//! statistics included), Adam's state and the step counter for a resumed run to continue as
//! if it had never stopped.
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Reduction, Tensor};

use super::adam::Adam;
use super::checkpoint;
use super::losses::{focal_loss, ssim};
use super::schedule::{batch_indices, brightness_gains, step_rng};
use super::{calibrate, check_on_synthetic_defects, model_name, split_holdout_checked, training_info, FitOptions, FitStage};
use crate::config::{AnomalySource, DraemConfig};
use crate::error::{Error, Result};
use crate::imaging;
use crate::model_file::{self, Calibration, CHECKPOINT_DIR, DRAEM_WEIGHTS};
use crate::models::draem::{parameter_count, Draem, DraemFitSummary, DraemNet, Losses};
use crate::models::perlin::{AnomalySynthesizer, TextureSource};
use crate::preprocess::Preprocessor;

/// SSIM window side (DRAEM: 11).
pub const SSIM_WINDOW: i64 = 11;
/// SSIM Gaussian standard deviation (DRAEM: 1.5).
pub const SSIM_SIGMA: f64 = 1.5;
/// Focal loss exponent (DRAEM: 2).
pub const FOCAL_GAMMA: f64 = 2.0;

/// Options of a DRAEM training run beyond the model's configuration.
#[derive(Clone, Debug)]
pub struct DraemTrainOptions {
    /// Write a checkpoint to `<out>/checkpoint/` every this many steps (0: only at the end;
    /// the last step always writes one).
    pub checkpoint_every: usize,
    /// Continue from `<out>/checkpoint/` instead of starting from scratch. The checkpoint must
    /// come from the same input size, normalisation, base width, batch size and seed; `steps`
    /// may be larger than before (train longer) and other settings may change. The learning
    /// rate follows the new `steps`: a run extended past its old end goes on at the full rate
    /// until the new milestones (a warm restart).
    pub resume: bool,
}

impl Default for DraemTrainOptions {
    fn default() -> Self {
        Self { checkpoint_every: 250, resume: false }
    }
}

/// The losses of one optimiser step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossRecord {
    /// Steps done after this one (1 for the first).
    pub step: usize,
    /// Learning rate used.
    pub lr: f64,
    /// The losses.
    #[serde(flatten)]
    pub losses: Losses,
}

/// What `<out>/checkpoint/state.json` holds besides the weights and the optimiser state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimiser steps done.
    pub step: usize,
    /// Epoch (pass over the training images) the next sample belongs to.
    pub epoch: usize,
    /// Training samples drawn so far (`step * batch_size`).
    pub samples_seen: usize,
    /// Seed of the weights, the sample order and the simulated anomalies.
    pub seed: u64,
    /// Training images of the run that wrote the checkpoint.
    pub n_images: usize,
    /// The configuration of the run that wrote the checkpoint.
    pub config: DraemConfig,
    /// Seconds spent training, over all runs.
    pub train_seconds: f64,
    /// Losses of every step so far.
    pub history: Vec<LossRecord>,
}

/// What a DRAEM training produced.
#[derive(Clone, Debug)]
pub struct DraemFitReport {
    /// Steps, losses and timings.
    pub summary: DraemFitSummary,
    /// The thresholds found.
    pub calibration: Calibration,
    /// Images held out for calibration.
    pub n_holdout: usize,
    /// The good-only self-check (None when `self_check_images` is 0).
    pub self_check: Option<crate::self_check::SelfCheck>,
    /// Losses of every step, resumed runs included.
    pub history: Vec<LossRecord>,
}

/// Reads the checkpoint state of the model directory `out` (`<out>/checkpoint/state.json`).
pub fn read_checkpoint_state(out: &Path) -> Result<CheckpointState> {
    checkpoint::read_state(out)
}

/// Per-channel affine map between 0..1 pixel values and the preprocessor's normalised values,
/// read off the preprocessor itself (a black and a white frame), so the two never disagree.
struct UnitSpace {
    /// `[1, 3, 1, 1]`: normalised = unit * scale + shift.
    scale: Tensor,
    shift: Tensor,
}

impl UnitSpace {
    fn of(pre: &Preprocessor) -> Result<Self> {
        let (h, w) = pre.input_size();
        let px = |t: Tensor| -> Result<Tensor> { Ok(t.f_narrow(2, 0, 1)?.f_narrow(3, 0, 1)?) };
        let black = px(pre.frame(&RgbImage::new(w as u32, h as u32))?)?;
        let white = px(pre.frame(&RgbImage::from_pixel(w as u32, h as u32, Rgb([255, 255, 255])))?)?;
        Ok(Self { scale: white.f_sub(&black)?, shift: black })
    }

    /// 0..1 values -> normalised network input.
    fn normalise(&self, unit: &Tensor) -> Result<Tensor> {
        Ok(unit.f_mul(&self.scale)?.f_add(&self.shift)?)
    }

    /// Normalised values -> 0..1 scale.
    fn unit(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_sub(&self.shift)?.f_div(&self.scale)?)
    }
}

/// Decodes `paths` and resizes them to `size` (antialiased bilinear, as [`Preprocessor`]
/// does): `[M, 3, H, W]` uint8 on `device`. uint8 keeps 600 images of 256 px in 120 MB.
fn load_images_u8(paths: &[PathBuf], size: (i64, i64), device: Device, on_image: &mut dyn FnMut(usize)) -> Result<Tensor> {
    let mut out = Vec::with_capacity(paths.len());
    for (i, p) in paths.iter().enumerate() {
        let img = imaging::load(p)?;
        let (w, h) = img.dimensions();
        let t = Tensor::f_from_slice(img.as_raw())?
            .f_view([h as i64, w as i64, 3])?
            .f_permute([2, 0, 1])?
            .f_unsqueeze(0)?
            .f_to_kind(Kind::Float)?;
        let t = if (h as i64, w as i64) == size {
            t
        } else {
            t.f_internal_upsample_bilinear2d_aa([size.0, size.1], false, None, None)?
        };
        out.push(t.f_round()?.f_clamp(0.0, 255.0)?.f_to_kind(Kind::Uint8)?);
        on_image(i + 1);
    }
    Ok(Tensor::f_cat(&out, 0)?.f_to_device(device)?)
}

/// Learning rate at `step`: `lr`, times `lr_decay` for each milestone passed.
pub fn learning_rate(config: &DraemConfig, step: usize) -> f64 {
    let passed = config.lr_milestones.iter().filter(|&&m| step as f64 >= m * config.steps as f64).count();
    config.lr * config.lr_decay.powi(passed as i32)
}

/// `images` `[B, 3, H, W]` in 0..1, each scaled by its gain (`gains`: B values) and clipped to
/// 0..1; unchanged when every gain is 1.
fn with_brightness(images: Tensor, gains: &[f32]) -> Result<Tensor> {
    if gains.iter().all(|&g| g == 1.0) {
        return Ok(images);
    }
    let g = Tensor::f_from_slice(gains)?.f_view([-1, 1, 1, 1])?.f_to_device(images.device())?;
    Ok(images.f_mul(&g)?.f_clamp(0.0, 1.0)?)
}

/// DRAEM's loss on one batch: returns (total, its parts). `clean` and `augmented` are 0..1
/// images `[B, 3, H, W]`, `mask` `[B, 1, H, W]`.
fn step_loss(net: &DraemNet, unit: &UnitSpace, clean: &Tensor, augmented: &Tensor, mask: &Tensor) -> Result<(Tensor, Losses)> {
    let out = net.forward_train(&unit.normalise(augmented)?)?;
    let reconstruction = unit.unit(&out.reconstruction)?;
    let l2 = reconstruction.f_mse_loss(clean, Reduction::Mean)?;
    let ssim_loss = ssim(&reconstruction, clean, SSIM_WINDOW, SSIM_SIGMA, 1.0)?.f_neg()?.f_add_scalar(1.0)?;
    let focal = focal_loss(&out.logits, mask, FOCAL_GAMMA)?;
    let total = l2.f_add(&ssim_loss)?.f_add(&focal)?;
    let losses = Losses {
        l2: l2.f_double_value(&[])?,
        ssim: ssim_loss.f_double_value(&[])?,
        focal: focal.f_double_value(&[])?,
        total: total.f_double_value(&[])?,
    };
    Ok((total, losses))
}

fn check_resumable(saved: &DraemConfig, wanted: &DraemConfig) -> Result<()> {
    let mut diffs = Vec::new();
    if saved.preprocess != wanted.preprocess {
        diffs.push(format!("preprocess {:?} vs {:?}", saved.preprocess, wanted.preprocess));
    }
    if saved.base_width != wanted.base_width {
        diffs.push(format!("base_width {} vs {}", saved.base_width, wanted.base_width));
    }
    if saved.batch_size != wanted.batch_size {
        diffs.push(format!("batch_size {} vs {}", saved.batch_size, wanted.batch_size));
    }
    if saved.seed != wanted.seed {
        diffs.push(format!("seed {} vs {}", saved.seed, wanted.seed));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "cannot resume: the checkpoint was trained with other settings (checkpoint vs now: {}); \
             use the checkpoint's settings or train from scratch without --resume",
            diffs.join(", ")
        )))
    }
}

/// Trains DRAEM on `images` (defect-free), calibrates it on a held-out part of them (every
/// `options.holdout_every`-th image, as [`super::fit_patchcore`] does) and writes the model
/// directory `out` (model.json, draem.safetensors, checkpoint/). Checkpoints go to
/// `<out>/checkpoint/` during training; with `train.resume` the run continues from there.
/// `progress(stage, done, total)` is called per image while loading, per step while
/// training and per batch while calibrating; `on_step` gets every step's losses.
#[allow(clippy::too_many_arguments)]
pub fn fit_draem(
    images: &[PathBuf],
    data_label: &str,
    config: &DraemConfig,
    device: Device,
    out: &Path,
    options: &FitOptions,
    train: &DraemTrainOptions,
    progress: &mut dyn FnMut(FitStage, usize, usize),
    on_step: &mut dyn FnMut(&LossRecord),
) -> Result<DraemFitReport> {
    config.validate()?;
    let (fit_set, holdout) = split_holdout_checked(images, options.holdout_every)?;
    let mut vars = nn::VarStore::new(device);
    let net = DraemNet::new(config, &vars.root())?;
    let mut adam = Adam::new(&vars)?;
    let mut state = CheckpointState {
        step: 0,
        epoch: 0,
        samples_seen: 0,
        seed: config.seed,
        n_images: fit_set.len(),
        config: config.clone(),
        train_seconds: 0.0,
        history: Vec::new(),
    };
    let mut resumed_from_step = None;
    if train.resume {
        let saved = read_checkpoint_state(out)?;
        check_resumable(&saved.config, config)?;
        checkpoint::restore(out, DRAEM_WEIGHTS, &mut vars, &mut adam, saved.step)?;
        resumed_from_step = Some(saved.step);
        state = CheckpointState { n_images: fit_set.len(), config: config.clone(), ..saved };
    }

    let pre = Preprocessor::new(&config.preprocess, device)?;
    let unit = UnitSpace::of(&pre)?;
    let size = pre.input_size();
    let store = load_images_u8(&fit_set, size, device, &mut |i| progress(FitStage::Loading, i, fit_set.len()))?;
    let source = match &config.anomaly_source {
        AnomalySource::TrainingImages => TextureSource::Images(store.shallow_clone()),
        AnomalySource::Procedural => TextureSource::Procedural,
        AnomalySource::Folder(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| crate::dataset::is_image(p))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::Config(format!("anomaly source folder {} holds no images", dir.display())));
            }
            TextureSource::Images(load_images_u8(&files, size, device, &mut |_| {})?)
        }
    };
    let synthesizer = AnomalySynthesizer::new(source, config)?;

    let n = fit_set.len();
    let t0 = Instant::now();
    let mut order_cache = None;
    let seconds_before = state.train_seconds;
    for step in state.step..config.steps {
        options.cancel.check(&format!("training (step {} of {})", step + 1, config.steps))?;
        let idx = Tensor::f_from_slice(&batch_indices(config.seed, step, config.batch_size, n, &mut order_cache))?
            .f_to_device(device)?;
        let clean = store.f_index_select(0, &idx)?.f_to_kind(Kind::Float)?.f_div_scalar(255.0)?;
        let clean =
            with_brightness(clean, &brightness_gains(config.seed, step as u64, config.batch_size, config.brightness_jitter))?;
        let (augmented, mask) = synthesizer.synthesize(&clean, &mut step_rng(config.seed, step))?;
        let lr = learning_rate(config, step);
        adam.zero_grad()?;
        let (total, losses) = step_loss(&net, &unit, &clean, &augmented, &mask)?;
        if !losses.total.is_finite() {
            return Err(Error::Config(format!(
                "training diverged at step {} (loss {}); lower the learning rate",
                step + 1,
                losses.total
            )));
        }
        total.f_backward()?;
        adam.step(lr)?;
        let record = LossRecord { step: step + 1, lr, losses };
        state.history.push(record);
        state.step = step + 1;
        state.samples_seen = state.step * config.batch_size;
        state.epoch = state.samples_seen / n;
        on_step(&record);
        progress(FitStage::Training, step + 1, config.steps);
        if train.checkpoint_every > 0 && state.step % train.checkpoint_every == 0 && state.step < config.steps {
            state.train_seconds = seconds_before + t0.elapsed().as_secs_f64();
            checkpoint::save(out, DRAEM_WEIGHTS, &vars, &adam, &state)?;
        }
    }
    let run_seconds = t0.elapsed().as_secs_f64();
    state.train_seconds = seconds_before + run_seconds;
    checkpoint::save(out, DRAEM_WEIGHTS, &vars, &adam, &state)?;

    // Calibration on the held-out good images, with the inference path.
    let forward = |x: &Tensor| net.forward(x);
    let (image_scores, pixel_max) = calibrate(&holdout, &pre, options.batch_size, &forward, progress)?;
    let calibration = Calibration::from_good_scores(&image_scores, &pixel_max, options.margin)?;
    // DRAEM learnt from defects of this kind: its figure flatters it (see self_check.rs).
    let self_check = check_on_synthetic_defects(&holdout, &image_scores, config.seed, &pre, &forward, options, progress)?;

    let tail = &state.history[state.history.len().saturating_sub(50)..];
    let mut final_losses = Losses::default();
    for r in tail {
        final_losses.l2 += r.losses.l2 / tail.len() as f64;
        final_losses.ssim += r.losses.ssim / tail.len() as f64;
        final_losses.focal += r.losses.focal / tail.len() as f64;
        final_losses.total += r.losses.total / tail.len() as f64;
    }
    let summary = DraemFitSummary {
        n_images: n,
        steps: state.step,
        batch_size: config.batch_size,
        resumed_from_step,
        parameters: parameter_count(&vars),
        train_seconds: run_seconds,
        final_losses,
    };
    let mut training = training_info(data_label);
    training.draem = Some(summary.clone());
    training.self_check = self_check.clone();
    let model = Draem::from_trained(vars, net, config);
    let checkpoint = out.join(CHECKPOINT_DIR);
    model_file::save_draem(out, &model, &calibration, training, &model_name(out, options), Some(&checkpoint))?;
    Ok(DraemFitReport { summary, calibration, n_holdout: holdout.len(), self_check, history: state.history })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PreprocessConfig;
    use crate::synthetic::{generate_dataset, SyntheticConfig};

    #[test]
    fn learning_rate_follows_milestones() {
        let cfg = DraemConfig { steps: 100, lr: 1.0, ..DraemConfig::paper() };
        assert_eq!(learning_rate(&cfg, 0), 1.0);
        assert_eq!(learning_rate(&cfg, 79), 1.0);
        assert!((learning_rate(&cfg, 80) - 0.2).abs() < 1e-12);
        assert!((learning_rate(&cfg, 95) - 0.04).abs() < 1e-12);
    }

    #[test]
    fn brightness_scales_each_image_and_clips() {
        let images = Tensor::full([2, 3, 2, 2], 0.6, (Kind::Float, Device::Cpu));
        let out = with_brightness(images.shallow_clone(), &[0.5, 2.0]).unwrap();
        assert!((out.double_value(&[0, 1, 1, 1]) - 0.3).abs() < 1e-6);
        assert_eq!(out.double_value(&[1, 0, 0, 0]), 1.0, "clipped to 0..1");
        let same = with_brightness(images.shallow_clone(), &[1.0, 1.0]).unwrap();
        assert!(same.equal(&images));
    }

    fn tiny(steps: usize) -> DraemConfig {
        DraemConfig {
            preprocess: PreprocessConfig { image_size: [64, 64], ..Default::default() },
            base_width: 8,
            steps,
            batch_size: 4,
            lr: 5e-4,
            // no decay: the 10-step and the 20-step runs below then share one schedule
            lr_milestones: vec![],
            score_pool: 7,
            ..DraemConfig::cpu_small()
        }
    }

    fn tiny_data(dir: &Path) -> Vec<PathBuf> {
        let cfg = SyntheticConfig { seed: 5, size: 64, n_train: 10, n_test_good: 2, n_test_per_defect: 1 };
        generate_dataset(dir, &cfg).unwrap();
        crate::dataset::MvtecDataset::open(dir).unwrap().train_good
    }

    #[test]
    fn fit_save_load_and_inspect_end_to_end() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let images = tiny_data(&data);
        let out = tmp.path().join("model");
        let mut seen = Vec::new();
        let mut stages = Vec::new();
        let report = fit_draem(
            &images,
            "tiny",
            &tiny(20),
            Device::Cpu,
            &out,
            &FitOptions { name: "tiny_draem".into(), ..FitOptions::default() },
            &DraemTrainOptions { checkpoint_every: 0, resume: false },
            &mut |s, _, _| {
                if stages.last() != Some(&s) {
                    stages.push(s)
                }
            },
            &mut |r| seen.push(r.step),
        )
        .unwrap();
        assert_eq!(stages, vec![FitStage::Loading, FitStage::Training, FitStage::Calibration, FitStage::SelfCheck]);
        assert_eq!(seen, (1..=20).collect::<Vec<_>>());
        assert_eq!(report.history.len(), 20);
        assert!(report.history.iter().all(|r| r.losses.total.is_finite()));
        assert_eq!(report.n_holdout, 2);
        assert_eq!(report.summary.n_images, 8);
        assert!(report.calibration.image_threshold > 0.0);
        assert!(out.join("model.json").is_file() && out.join("draem.safetensors").is_file());
        assert!(out.join("checkpoint/state.json").is_file(), "final checkpoint kept with the model");
        assert!(!tmp.path().join("model.previous").exists(), "no leftover of the checkpoint-only folder");

        let insp = crate::Inspector::new(&out, Device::Cpu, &Default::default()).unwrap();
        assert_eq!(insp.method(), "draem");
        assert_eq!(insp.model_id(), "tiny_draem");
        let manifest = insp.manifest();
        assert_eq!(manifest.method(), crate::model_file::Method::Draem);
        assert_eq!(manifest.training.draem.as_ref().unwrap().steps, 20);
        assert_eq!(manifest.training.self_check, report.self_check, "the self-check is kept in model.json");
        assert_eq!(report.self_check.as_ref().map(|c| c.n_synthetic), Some(crate::training::SELF_CHECK_IMAGES));
        // an image of another size than the network's: the map comes back at the image's size
        let img = crate::synthetic::render_defect(5, 99, 80, crate::synthetic::DefectKind::Stain).0;
        let r = insp.inspect(&img).unwrap();
        assert!(r.raw_score.is_finite() && r.score.is_finite());
        let map = r.map();
        assert_eq!((map.width(), map.height()), (80, 80));
    }

    #[test]
    fn resume_continues_steps_and_history_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let images = tiny_data(&tmp.path().join("data"));
        let run = |out: &Path, steps: usize, resume: bool, every: usize| {
            fit_draem(
                &images,
                "tiny",
                &tiny(steps),
                Device::Cpu,
                out,
                &FitOptions::default(),
                &DraemTrainOptions { checkpoint_every: every, resume },
                &mut |_, _, _| {},
                &mut |_| {},
            )
        };
        let a = tmp.path().join("a");
        // 10 steps with a checkpoint every 5 (and one at the end)
        let first = run(&a, 10, false, 5).unwrap();
        let state = read_checkpoint_state(&a).unwrap();
        assert_eq!((state.step, state.history.len()), (10, 10));
        assert_eq!(state.samples_seen, 40);
        assert_eq!(state.epoch, 5, "40 samples of 8 images");
        let resumed = run(&a, 20, true, 5).unwrap();
        assert_eq!(resumed.summary.resumed_from_step, Some(10));
        assert_eq!(resumed.summary.steps, 20);
        assert_eq!(resumed.history.len(), 20);
        // (JSON keeps f64 to about 1e-16, not always to the last bit)
        for (x, y) in resumed.history[..10].iter().zip(&first.history) {
            assert_eq!(x.step, y.step);
            assert!(
                (x.losses.total - y.losses.total).abs() < 1e-12 && (x.losses.focal - y.losses.focal).abs() < 1e-12,
                "history rewritten"
            );
        }
        assert_eq!(resumed.history.iter().map(|r| r.step).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
        assert_eq!(read_checkpoint_state(&a).unwrap().step, 20);

        // The same 20 steps in one go give the same losses: the checkpoint lost nothing.
        let b = tmp.path().join("b");
        let straight = run(&b, 20, false, 0).unwrap();
        for (x, y) in straight.history.iter().zip(&resumed.history) {
            let d = (x.losses.total - y.losses.total).abs();
            assert!(d <= 1e-4 * x.losses.total.abs().max(1.0), "step {}: {} vs {}", x.step, x.losses.total, y.losses.total);
        }

        // Resuming with another architecture is refused with a clear message; without a
        // checkpoint too.
        let err = fit_draem(
            &images,
            "tiny",
            &DraemConfig { base_width: 4, ..tiny(30) },
            Device::Cpu,
            &a,
            &FitOptions::default(),
            &DraemTrainOptions { checkpoint_every: 0, resume: true },
            &mut |_, _, _| {},
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("base_width 8 vs 4"), "{err}");
        let err = run(&tmp.path().join("none"), 5, true, 0).unwrap_err().to_string();
        assert!(err.contains("no training checkpoint"), "{err}");
    }
}
