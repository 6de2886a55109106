//! SuperSimpleNet training ([`crate::models::supersimplenet`]): the frozen backbone's patch
//! features of every training image are computed once and kept in memory, so an epoch costs
//! only the small trainable heads; each step draws a batch of cached features, adds simulated
//! anomalies to a copy of it and updates the adaptor and heads with AdamW. Labelled defective
//! images (`train/<defect>/`) join the good ones: with a mask, the map learns it; without one
//! (a verdict only), only the image score learns from them.
//!
//! Determinism: the initial weights come from `config.seed`; the sample order and every
//! simulated anomaly of step `s` are functions of (seed, s) ([`super::schedule`]), so a run
//! resumed from a checkpoint continues as if it had never stopped.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::adam::Adam;
use super::checkpoint;
use super::losses::{sigmoid_focal_loss, truncated_l1};
use super::schedule::{brightness_gains, step_rng, SampleOrder};
use super::{calibrate, check_on_synthetic_defects, model_name, split_holdout_checked, training_info, FitOptions, FitStage};
use crate::config::SuperSimpleNetConfig;
use crate::dataset::{load_mask, Supervision, TestSample};
use crate::error::{Error, Result};
use crate::imaging;
use crate::model_file::{self, Calibration, CHECKPOINT_DIR, SUPERSIMPLENET_WEIGHTS};
use crate::models::backbone::Backbone;
use crate::models::draem::parameter_count;
use crate::models::supersimplenet::{
    extract_features, FeatureAnomalies, HeadOutput, SuperSimpleNet, SuperSimpleNetFitSummary, SuperSimpleNetNet,
};
use crate::preprocess::Preprocessor;
use crate::self_check::SelfCheck;

/// The anomalib port clips the gradient norm to 1 when real defects train the heads.
const SUPERVISED_CLIP_NORM: f64 = 1.0;

/// Options of a SuperSimpleNet training run beyond the model's configuration.
#[derive(Clone, Debug)]
pub struct SuperSimpleNetTrainOptions {
    /// Write a checkpoint to `<out>/checkpoint/` at the end of each epoch that passes a multiple
    /// of this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Continue from `<out>/checkpoint/`; the checkpoint must come from the same input size,
    /// layers, head sizes, batch size and seed, `epochs` may be larger than before.
    pub resume: bool,
}

impl Default for SuperSimpleNetTrainOptions {
    fn default() -> Self {
        Self { checkpoint_every: 250, resume: false }
    }
}

/// Mean losses of one epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochLosses {
    /// Epochs done after this one (1 for the first).
    pub epoch: usize,
    /// Learning rates relative to the configured ones (the schedule's decay).
    pub lr_scale: f64,
    /// Focal loss of the map logits.
    pub map_focal: f64,
    /// Truncated L1 of the map logits.
    pub map_l1: f64,
    /// Focal loss of the image logits.
    pub score_focal: f64,
    /// The sum that is minimised.
    pub total: f64,
}

/// What `<out>/checkpoint/state.json` of a SuperSimpleNet training holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SuperSimpleNetCheckpoint {
    /// Epochs done.
    pub epoch: usize,
    /// Optimiser steps done.
    pub step: usize,
    /// Training samples of the run that wrote it.
    pub n_samples: usize,
    /// The configuration of the run that wrote it.
    pub config: SuperSimpleNetConfig,
    /// Seconds spent training, over all runs.
    pub train_seconds: f64,
    /// Losses of every epoch so far.
    pub history: Vec<EpochLosses>,
}

/// What a SuperSimpleNet training produced.
#[derive(Clone, Debug)]
pub struct SuperSimpleNetFitReport {
    /// Counts, epochs and timings.
    pub summary: SuperSimpleNetFitSummary,
    /// The thresholds found.
    pub calibration: Calibration,
    /// Good images held out for calibration.
    pub n_holdout: usize,
    /// The good-only self-check (None when `self_check_images` is 0).
    pub self_check: Option<SelfCheck>,
    /// Losses of every epoch, resumed runs included.
    pub history: Vec<EpochLosses>,
}

/// Reads the checkpoint state of a SuperSimpleNet model directory `out`.
pub fn read_supersimplenet_checkpoint(out: &Path) -> Result<SuperSimpleNetCheckpoint> {
    checkpoint::read_state(out)
}

/// The training set as the heads see it, all on the training device.
struct FeatureCache {
    /// `[M, C, h, w]` patch features.
    features: Tensor,
    /// `[M, 1, h, w]` 0/1 defect masks on the feature grid (0 where unknown).
    masks: Tensor,
    /// `[M]` 0/1 image labels.
    labels: Tensor,
    /// `[M]` whether the mask is known (good images and defects with a mask drawn).
    mask_known: Tensor,
}

/// A defect mask on the feature grid `[1, 1, h, w]`: the mask scaled to the network input
/// (nearest), then to the grid bilinearly and cut at 0.5 (the paper's choice, from DeSTSeg).
fn grid_mask(path: &Path, input: (i64, i64), grid: (i64, i64), device: Device) -> Result<Tensor> {
    let mask = load_mask(path, input.1 as u32, input.0 as u32)?;
    let t = Tensor::f_from_slice(mask.as_raw())?.f_view([1, 1, input.0, input.1])?.f_to_kind(Kind::Float)?.f_div_scalar(255.0)?;
    let small = t.f_upsample_bilinear2d([grid.0, grid.1], false, None, None)?;
    Ok(small.f_ge(0.5)?.f_to_kind(Kind::Float)?.f_to_device(device)?)
}

/// Multiplies every channel of every pixel by `gain`, clipped to 0..=255. By hand: the image
/// crate's `brighten` adds a constant, while a change of exposure or lamp scales the light.
fn scale_brightness(image: &mut image::RgbImage, gain: f32) {
    if gain != 1.0 {
        for v in image.iter_mut() {
            *v = (f32::from(*v) * gain).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// Extracts and caches the patch features of `good` and `defective` images, in batches of
/// `options.batch_size`, reporting `FitStage::Features` per batch (cancellable between them).
fn cache_features(
    good: &[PathBuf],
    defective: &[TestSample],
    backbone: &Backbone,
    pre: &Preprocessor,
    config: &SuperSimpleNetConfig,
    options: &FitOptions,
    progress: &mut dyn FnMut(FitStage, usize, usize),
) -> Result<FeatureCache> {
    let batch_size = options.batch_size.max(1);
    let paths: Vec<&Path> = good.iter().map(PathBuf::as_path).chain(defective.iter().map(|s| s.path.as_path())).collect();
    let total = paths.len();
    // The good images only: a labelled defect's brightness may be what makes it one.
    let gains = brightness_gains(config.seed, 0, good.len(), config.brightness_jitter);
    let mut chunks = Vec::new();
    for (i, chunk) in paths.chunks(batch_size).enumerate() {
        options.cancel.check("feature extraction")?;
        let mut imgs = chunk.iter().map(|p| imaging::load(p)).collect::<Result<Vec<_>>>()?;
        for (j, img) in imgs.iter_mut().enumerate() {
            if let Some(&gain) = gains.get(i * batch_size + j) {
                scale_brightness(img, gain);
            }
        }
        chunks.push(extract_features(backbone, &pre.batch(&imgs)?, config)?);
        progress(FitStage::Features, (i * batch_size + chunk.len()).min(total), total);
    }
    let features = Tensor::f_cat(&chunks, 0)?;
    let s = features.size();
    let (device, grid) = (features.device(), (s[2], s[3]));
    let zeros = || Tensor::f_zeros([1, 1, grid.0, grid.1], (Kind::Float, device));
    let mut masks = Vec::with_capacity(total);
    for _ in good {
        masks.push(zeros()?);
    }
    for sample in defective {
        masks.push(match &sample.mask {
            Some(m) => grid_mask(m, pre.input_size(), grid, device)?,
            None => zeros()?,
        });
    }
    let flags = |f: &dyn Fn(&TestSample) -> bool, good_value: bool| -> Result<Tensor> {
        let v: Vec<bool> = good.iter().map(|_| good_value).chain(defective.iter().map(f)).collect();
        Ok(Tensor::f_from_slice(&v)?.f_to_device(device)?)
    };
    Ok(FeatureCache {
        features,
        masks: Tensor::f_cat(&masks, 0)?,
        labels: flags(&|_| true, false)?.f_to_kind(Kind::Float)?,
        mask_known: flags(&|s| s.mask.is_some(), true)?,
    })
}

/// Learning rates relative to the configured ones at `step` of `total` steps: `lr_decay` per
/// milestone passed.
fn lr_scale(config: &SuperSimpleNetConfig, step: usize, total: usize) -> f64 {
    let passed = config.lr_milestones.iter().filter(|&&m| step as f64 >= m * total as f64).count();
    config.lr_decay.powi(passed as i32)
}

/// SuperSimpleNet's loss on one batch: focal + truncated L1 on the map logits of the rows whose
/// mask is known (`mask_known` `[2B]`), focal on every image logit. Returns (total, map focal,
/// map L1, score focal).
fn step_loss(
    out: &HeadOutput,
    masks: &Tensor,
    labels: &Tensor,
    mask_known: &Tensor,
    config: &SuperSimpleNetConfig,
) -> Result<(Tensor, [f64; 3])> {
    let rows = mask_known.f_nonzero()?.f_flatten(0, -1)?;
    let (map_focal, map_l1) = if rows.size()[0] > 0 {
        let map = out.map.f_index_select(0, &rows)?;
        let target = masks.f_index_select(0, &rows)?;
        (sigmoid_focal_loss(&map, &target, config.focal_gamma)?, truncated_l1(&map, &target, config.truncation)?)
    } else {
        let zero = Tensor::f_zeros([], (Kind::Float, out.map.device()))?;
        (zero.shallow_clone(), zero)
    };
    let score_focal = sigmoid_focal_loss(&out.score, labels, config.focal_gamma)?;
    let total = map_focal.f_add(&map_l1)?.f_add(&score_focal)?;
    let parts = [map_focal.f_double_value(&[])?, map_l1.f_double_value(&[])?, score_focal.f_double_value(&[])?];
    Ok((total, parts))
}

fn check_resumable(saved: &SuperSimpleNetConfig, wanted: &SuperSimpleNetConfig) -> Result<()> {
    let shape = |c: &SuperSimpleNetConfig| {
        format!(
            "input {:?}, layers {:?}, upscale {}, pool {}, seg_hidden {}, cls_channels {}, cls_kernel {}, batch {}, seed {}",
            c.preprocess, c.backbone, c.upscale, c.pool, c.seg_hidden, c.cls_channels, c.cls_kernel, c.batch_size, c.seed
        )
    };
    let (a, b) = (shape(saved), shape(wanted));
    if a == b {
        return Ok(());
    }
    Err(Error::Config(format!(
        "cannot resume: the checkpoint was trained with other settings (checkpoint: {a}; now: {b}); \
         use the checkpoint's settings or train from scratch without --resume"
    )))
}

/// Trains SuperSimpleNet on the good images `good` and the labelled `defective` ones,
/// calibrates it on held-out good images (every `options.holdout_every`-th, as for the other
/// methods) and writes the model directory `out` (model.json, backbone.safetensors,
/// supersimplenet.safetensors, checkpoint/). `progress(stage, done, total)` is called per batch
/// while caching features, per step while training and per batch while calibrating;
/// `on_epoch` gets every epoch's mean losses.
#[allow(clippy::too_many_arguments)] // each is one thing the caller chooses; a struct would only rename them
pub fn fit_supersimplenet(
    good: &[PathBuf],
    defective: &[TestSample],
    data_label: &str,
    config: &SuperSimpleNetConfig,
    backbone_weights: &Path,
    device: Device,
    out: &Path,
    options: &FitOptions,
    train: &SuperSimpleNetTrainOptions,
    progress: &mut dyn FnMut(FitStage, usize, usize),
    on_epoch: &mut dyn FnMut(&EpochLosses),
) -> Result<SuperSimpleNetFitReport> {
    config.validate()?;
    let (fit_good, holdout) = split_holdout_checked(good, options.holdout_every)?;
    let supervision = Supervision::of(defective);
    // The model file says which image score it uses, not `auto`.
    let config = &SuperSimpleNetConfig { image_score: config.image_score.for_supervision(supervision), ..config.clone() };
    let backbone = Backbone::new(&config.backbone, backbone_weights, device)?;
    let pre = Preprocessor::new(&config.preprocess, device)?;

    let t_features = Instant::now();
    let cache = cache_features(&fit_good, defective, &backbone, &pre, config, options, progress)?;
    let feature_seconds = t_features.elapsed().as_secs_f64();
    let [m, c, h, w]: [i64; 4] =
        cache.features.size().try_into().map_err(|_| Error::Config("patch features are not [M, C, h, w]".into()))?;
    let n_samples = m as usize;

    // Unsupervised, the classification head learns from the map without changing it (the
    // paper's stop-gradient); with real defects, both heads learn together.
    let stop_grad = supervision == Supervision::GoodOnly;
    let mut vars = nn::VarStore::new(device);
    let net = SuperSimpleNetNet::new(&vars.root(), c, config, config.seed, stop_grad)?;
    net.set_feature_statistics(&cache.features)?;
    let mut adam = Adam::new(&vars)?;
    let mut state = SuperSimpleNetCheckpoint {
        epoch: 0,
        step: 0,
        n_samples,
        config: config.clone(),
        train_seconds: 0.0,
        history: Vec::new(),
    };
    let mut resumed_from_epoch = None;
    if train.resume {
        let saved = read_supersimplenet_checkpoint(out)?;
        check_resumable(&saved.config, config)?;
        checkpoint::restore(out, SUPERSIMPLENET_WEIGHTS, &mut vars, &mut adam, saved.step)?;
        resumed_from_epoch = Some(saved.epoch);
        state = SuperSimpleNetCheckpoint { n_samples, config: config.clone(), ..saved };
    }

    // A set smaller than a batch trains on all of it at once.
    let batch = config.batch_size.min(n_samples);
    // The cache holds the good images first, then the labelled defects.
    let mut order = SampleOrder::new(config.seed, batch, fit_good.len(), defective.len(), config.defect_share);
    let steps_per_epoch = order.steps_per_epoch();
    let total_steps = config.epochs * steps_per_epoch;
    let anomalies = FeatureAnomalies::new(config);
    let t0 = Instant::now();
    let seconds_before = state.train_seconds;
    for epoch in state.epoch..config.epochs {
        let mut sums = [0.0f64; 4];
        let mut scale = 1.0;
        for step in epoch * steps_per_epoch..(epoch + 1) * steps_per_epoch {
            options.cancel.check(&format!("training (step {} of {total_steps})", step + 1))?;
            let idx = Tensor::f_from_slice(&order.indices(step))?.f_to_device(device)?;
            let features = cache.features.f_index_select(0, &idx)?;
            let masks = cache.masks.f_index_select(0, &idx)?;
            let labels = cache.labels.f_index_select(0, &idx)?;
            let known = cache.mask_known.f_index_select(0, &idx)?;
            // The simulated copy of a weakly labelled image has no known mask either.
            let known = Tensor::f_cat(&[known.shallow_clone(), known], 0)?;
            let mut rng = step_rng(config.seed, step);
            adam.zero_grad()?;
            let (out, targets, target_labels) = net.forward_train(&features, &masks, &labels, &anomalies, &mut rng)?;
            let (total, parts) = step_loss(&out, &targets, &target_labels, &known, config)?;
            let loss = total.f_double_value(&[])?;
            if !loss.is_finite() {
                return Err(Error::Config(format!(
                    "training diverged at epoch {} (loss {loss}); lower the learning rates",
                    epoch + 1
                )));
            }
            total.f_backward()?;
            if !stop_grad {
                adam.clip_grad_norm(SUPERVISED_CLIP_NORM)?;
            }
            scale = lr_scale(config, step, total_steps);
            let (adaptor, heads) =
                ((config.adaptor_lr * scale, config.weight_decay[0]), (config.head_lr * scale, config.weight_decay[1]));
            adam.step_decoupled(&|name: &str| if name.starts_with("adaptor.") { adaptor } else { heads })?;
            for (sum, v) in sums.iter_mut().zip([parts[0], parts[1], parts[2], loss]) {
                *sum += v / steps_per_epoch as f64;
            }
            state.step = step + 1;
            progress(FitStage::Training, step + 1, total_steps);
        }
        let record = EpochLosses {
            epoch: epoch + 1,
            lr_scale: scale,
            map_focal: sums[0],
            map_l1: sums[1],
            score_focal: sums[2],
            total: sums[3],
        };
        state.history.push(record);
        state.epoch = epoch + 1;
        on_epoch(&record);
        let every = train.checkpoint_every;
        let passed_multiple = every > 0 && state.step / every > (state.step - steps_per_epoch) / every;
        if passed_multiple && state.epoch < config.epochs {
            state.train_seconds = seconds_before + t0.elapsed().as_secs_f64();
            checkpoint::save(out, SUPERSIMPLENET_WEIGHTS, &vars, &adam, &state)?;
        }
    }
    let run_seconds = t0.elapsed().as_secs_f64();
    state.train_seconds = seconds_before + run_seconds;
    checkpoint::save(out, SUPERSIMPLENET_WEIGHTS, &vars, &adam, &state)?;
    drop(cache);

    let parameters = parameter_count(&vars);
    let model = SuperSimpleNet::from_trained(vars, backbone, net, config)?;
    let forward = |x: &Tensor| model.forward(x);
    let (image_scores, pixel_max) = calibrate(&holdout, &pre, options.batch_size, &forward, progress)?;
    let calibration = Calibration::from_good_scores(&image_scores, &pixel_max, options.margin)?;
    let self_check = check_on_synthetic_defects(&holdout, &image_scores, config.seed, &pre, &forward, options, progress)?;

    let summary = SuperSimpleNetFitSummary {
        n_good: fit_good.len(),
        n_defective: defective.len(),
        n_masks: defective.iter().filter(|s| s.mask.is_some()).count(),
        supervision,
        epochs: state.epoch,
        steps: state.step,
        batch_size: batch,
        resumed_from_epoch,
        parameters,
        feature_shape: [c, h, w],
        feature_seconds,
        train_seconds: run_seconds,
        final_loss: state.history.last().map_or(f64::NAN, |r| r.total),
    };
    let mut training = training_info(data_label);
    training.supersimplenet = Some(summary.clone());
    training.self_check = self_check.clone();
    let checkpoint = out.join(CHECKPOINT_DIR);
    model_file::save_supersimplenet(
        out,
        &model,
        backbone_weights,
        &calibration,
        training,
        &model_name(out, options),
        Some(&checkpoint),
    )?;
    Ok(SuperSimpleNetFitReport { summary, calibration, n_holdout: holdout.len(), self_check, history: state.history })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PreprocessConfig;
    use crate::models::backbone::lite0_weights_for_tests;
    use crate::synthetic::{generate_dataset, SyntheticConfig};

    #[test]
    fn brightness_scales_every_channel_and_saturates() {
        let mut img = image::RgbImage::from_pixel(2, 1, image::Rgb([100, 200, 0]));
        scale_brightness(&mut img, 1.1);
        assert_eq!(img.get_pixel(1, 0).0, [110, 220, 0]);
        scale_brightness(&mut img, 2.0);
        assert_eq!(img.get_pixel(0, 0).0, [220, 255, 0]);
    }

    fn tiny(epochs: usize) -> SuperSimpleNetConfig {
        SuperSimpleNetConfig {
            preprocess: PreprocessConfig { image_size: [64, 64], ..SuperSimpleNetConfig::cpu_small().preprocess },
            seg_hidden: 16,
            cls_channels: 8,
            epochs,
            batch_size: 4,
            // no decay: the runs of different lengths below then share one schedule
            lr_milestones: vec![],
            ..SuperSimpleNetConfig::cpu_small()
        }
    }

    /// A tiny synthetic set: its good training images and two labelled defects, the first with
    /// its mask, the second with only its verdict.
    fn tiny_data(dir: &Path) -> (Vec<PathBuf>, Vec<TestSample>) {
        let cfg = SyntheticConfig { seed: 5, size: 64, n_train: 10, n_test_good: 1, n_test_per_defect: 1 };
        generate_dataset(dir, &cfg).unwrap();
        let data = crate::dataset::MvtecDataset::open(dir).unwrap();
        let mut defective: Vec<TestSample> = data.test.into_iter().filter(|s| s.mask.is_some()).take(2).collect();
        defective[1].mask = None;
        (data.train_good, defective)
    }

    #[test]
    fn fit_save_load_and_inspect_with_masks_and_verdicts() {
        let Some(weights) = lite0_weights_for_tests() else { return };
        let tmp = tempfile::tempdir().unwrap();
        let (good, defective) = tiny_data(&tmp.path().join("data"));
        let out = tmp.path().join("model");
        let (mut stages, mut epochs) = (Vec::new(), Vec::new());
        let report = fit_supersimplenet(
            &good,
            &defective,
            "tiny",
            &tiny(3),
            &weights,
            Device::Cpu,
            &out,
            &FitOptions { name: "tiny_ssn".into(), self_check_images: 4, ..FitOptions::default() },
            &SuperSimpleNetTrainOptions { checkpoint_every: 0, resume: false },
            &mut |s, _, _| {
                if stages.last() != Some(&s) {
                    stages.push(s)
                }
            },
            &mut |r| epochs.push(r.epoch),
        )
        .unwrap();
        assert_eq!(stages, vec![FitStage::Features, FitStage::Training, FitStage::Calibration, FitStage::SelfCheck]);
        assert_eq!(epochs, vec![1, 2, 3]);
        let s = &report.summary;
        assert_eq!((s.n_good, s.n_defective, s.n_masks, s.supervision), (8, 2, 1, Supervision::Mixed));
        // 10 samples in batches of 4: 3 steps an epoch; stage3 of a 64 px input is an 8x8 grid.
        assert_eq!((s.epochs, s.steps, s.batch_size), (3, 9, 4));
        assert_eq!(s.feature_shape, [40 + 112, 8, 8]);
        assert!(report.history.iter().all(|r| r.total.is_finite() && r.map_focal > 0.0 && r.score_focal > 0.0));
        assert!(out.join("model.json").is_file() && out.join(SUPERSIMPLENET_WEIGHTS).is_file());
        assert!(out.join("backbone.safetensors").is_file() && out.join("checkpoint/state.json").is_file());

        let insp = crate::Inspector::new(&out, Device::Cpu, &Default::default()).unwrap();
        assert_eq!((insp.method(), insp.model_id()), ("supersimplenet", "tiny_ssn"));
        let manifest = insp.manifest();
        assert_eq!(manifest.training.supersimplenet.as_ref(), Some(&report.summary));
        assert_eq!(manifest.training.self_check, report.self_check);
        // A frame of another size than the network's: the map comes back at the frame's size,
        // scores are probabilities.
        let img = crate::synthetic::render_defect(5, 99, 80, crate::synthetic::DefectKind::Stain).0;
        let r = insp.inspect(&img).unwrap();
        assert!((0.0..=1.0).contains(&r.raw_score) && r.score.is_finite());
        assert_eq!((r.map().width(), r.map().height()), (80, 80));

        // With labelled defects `auto` chose the classification head, and the file says so;
        // `auto` itself is refused in a trained model.
        let path = out.join("model.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["supersimplenet"]["image_score"], "classifier");
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let head = model_file::load(&out, Device::Cpu).unwrap().model.forward(&x).unwrap();
        json["supersimplenet"]["image_score"] = "auto".into();
        std::fs::write(&path, json.to_string()).unwrap();
        let err = model_file::load(&out, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("image_score auto"), "{err}");

        // image_score map_max (SimpleNet's): the score is the map's maximum; the maps stay.
        json["supersimplenet"]["image_score"] = "map_max".into();
        std::fs::write(&path, json.to_string()).unwrap();
        let o = model_file::load(&out, Device::Cpu).unwrap().model.forward(&x).unwrap();
        let maxima = o.anomaly_maps.flatten(1, 3).amax([1i64].as_slice(), false);
        assert!(o.image_scores.allclose(&maxima, 1e-6, 1e-7, false));
        assert!(!head.image_scores.allclose(&maxima, 1e-3, 1e-3, false));
        assert!(o.anomaly_maps.allclose(&head.anomaly_maps, 1e-6, 1e-7, false));
    }

    #[test]
    fn good_only_fit_scores_by_the_map_maximum_and_calibrates_on_it() {
        let Some(weights) = lite0_weights_for_tests() else { return };
        let tmp = tempfile::tempdir().unwrap();
        let (good, _) = tiny_data(&tmp.path().join("data"));
        let out = tmp.path().join("model");
        let options = FitOptions { self_check_images: 2, ..FitOptions::default() };
        let train = SuperSimpleNetTrainOptions { checkpoint_every: 0, resume: false };
        let report = fit_supersimplenet(
            &good,
            &[],
            "tiny",
            &tiny(1),
            &weights,
            Device::Cpu,
            &out,
            &options,
            &train,
            &mut |_, _, _| {},
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(report.summary.supervision, Supervision::GoodOnly);
        let loaded = model_file::load(&out, Device::Cpu).unwrap();
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
        assert_eq!(json["supersimplenet"]["image_score"], "map_max");
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let o = loaded.model.forward(&x).unwrap();
        let maxima = o.anomaly_maps.flatten(1, 3).amax([1i64].as_slice(), false);
        assert!(o.image_scores.allclose(&maxima, 1e-6, 1e-7, false));
        // Calibrated on the held-out images' map maxima: the image threshold is the pixel one,
        // so an image is anomalous exactly when it has a defect region.
        let c = &report.calibration;
        assert!(c.image_threshold > 0.0 && c.image_threshold == c.pixel_threshold, "{c:?}");
    }

    #[test]
    fn resume_continues_the_losses_exactly_and_refuses_another_network() {
        let Some(weights) = lite0_weights_for_tests() else { return };
        let tmp = tempfile::tempdir().unwrap();
        let (good, defective) = tiny_data(&tmp.path().join("data"));
        let run = |out: &Path, config: &SuperSimpleNetConfig, resume: bool| {
            fit_supersimplenet(
                &good,
                &defective,
                "tiny",
                config,
                &weights,
                Device::Cpu,
                out,
                &FitOptions { self_check_images: 0, ..FitOptions::default() },
                &SuperSimpleNetTrainOptions { checkpoint_every: 3, resume },
                &mut |_, _, _| {},
                &mut |_| {},
            )
        };
        let a = tmp.path().join("a");
        let first = run(&a, &tiny(2), false).unwrap();
        let state = read_supersimplenet_checkpoint(&a).unwrap();
        assert_eq!((state.epoch, state.step, state.history.len()), (2, 6, 2));
        let resumed = run(&a, &tiny(4), true).unwrap();
        assert_eq!((resumed.summary.resumed_from_epoch, resumed.summary.epochs), (Some(2), 4));
        // (JSON keeps f64 to about 1e-16, not always to the last bit)
        for (x, y) in resumed.history[..2].iter().zip(&first.history) {
            assert!(x.epoch == y.epoch && (x.total - y.total).abs() < 1e-12, "history rewritten: {x:?} vs {y:?}");
        }
        let straight = run(&tmp.path().join("b"), &tiny(4), false).unwrap();
        for (x, y) in straight.history.iter().zip(&resumed.history) {
            assert!((x.total - y.total).abs() <= 1e-4 * x.total.abs().max(1.0), "epoch {}: {} vs {}", x.epoch, x.total, y.total);
        }
        let err = run(&a, &SuperSimpleNetConfig { seg_hidden: 8, ..tiny(6) }, true).unwrap_err().to_string();
        assert!(err.contains("cannot resume") && err.contains("seg_hidden 16"), "{err}");
        let err = run(&tmp.path().join("none"), &tiny(2), true).unwrap_err().to_string();
        assert!(err.contains("no training checkpoint"), "{err}");
    }

    #[test]
    fn masks_reach_the_feature_grid_and_unknown_masks_train_no_map() {
        let tmp = tempfile::tempdir().unwrap();
        // Left half defective, at 40x20 px; the grid is 4x8.
        let mut mask = image::GrayImage::new(40, 20);
        for (x, _, p) in mask.enumerate_pixels_mut() {
            p.0[0] = if x < 20 { 255 } else { 0 };
        }
        let path = tmp.path().join("m.png");
        mask.save(&path).unwrap();
        let grid = grid_mask(&path, (32, 64), (4, 8), Device::Cpu).unwrap();
        let want = Tensor::from_slice(&[1.0f32, 1., 1., 1., 0., 0., 0., 0.]).view([1, 1, 1, 8]).expand([1, 1, 4, 8], false);
        assert!(grid.equal(&want), "{grid}");

        let cfg = tiny(1);
        let out = HeadOutput {
            map: Tensor::randn([4, 1, 4, 8], (Kind::Float, Device::Cpu)),
            score: Tensor::randn([4], (Kind::Float, Device::Cpu)),
        };
        let masks = Tensor::ones([4, 1, 4, 8], (Kind::Float, Device::Cpu));
        let labels = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let none = Tensor::from_slice(&[false, false, false, false]);
        let (total, parts) = step_loss(&out, &masks, &labels, &none, &cfg).unwrap();
        assert_eq!((parts[0], parts[1]), (0.0, 0.0), "no known mask, no map loss");
        assert!((total.double_value(&[]) - parts[2]).abs() < 1e-9 && parts[2] > 0.0);
        // Only the known rows count: rows 0 and 1 alone give the same map loss as all with rows
        // 2 and 3 copied from them.
        let some = Tensor::from_slice(&[true, true, false, false]);
        let (_, a) = step_loss(&out, &masks, &labels, &some, &cfg).unwrap();
        let twice =
            HeadOutput { map: Tensor::cat(&[out.map.narrow(0, 0, 2), out.map.narrow(0, 0, 2)], 0), score: out.score.copy() };
        let all = Tensor::from_slice(&[true, true, true, true]);
        let (_, b) = step_loss(&twice, &masks, &labels, &all, &cfg).unwrap();
        assert!((a[0] - b[0]).abs() < 1e-6 && (a[1] - b[1]).abs() < 1e-6);
    }

    #[test]
    fn learning_rates_decay_at_the_milestones() {
        let cfg = SuperSimpleNetConfig { lr_milestones: vec![0.8, 0.9], lr_decay: 0.4, ..tiny(10) };
        assert_eq!(lr_scale(&cfg, 0, 100), 1.0);
        assert_eq!(lr_scale(&cfg, 79, 100), 1.0);
        assert!((lr_scale(&cfg, 80, 100) - 0.4).abs() < 1e-12);
        assert!((lr_scale(&cfg, 95, 100) - 0.16).abs() < 1e-12);
    }
}
