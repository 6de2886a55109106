//! Fitting a model from a folder of defect-free images: the loop behind `anomaly_inspector fit`
//! (and, later, the node's teach-in). PatchCore decodes images batch by batch, so memory holds
//! features, not pictures; DRAEM ([`fit_draem`], in `training/draem.rs`) keeps the training
//! images at network size as uint8 and trains for a number of steps.
use std::path::{Path, PathBuf};

use tch::{Device, Tensor};

use crate::config::PatchCoreConfig;
use crate::error::{Error, Result};
use crate::imaging;
use crate::model_file::{self, Calibration, TrainingInfo};
use crate::models::backbone::Backbone;
use crate::models::patchcore::{FitProgress, FitSummary, PatchCore};
use crate::models::ModelOutput;
use crate::preprocess::Preprocessor;
use crate::self_check::{self, SelfCheck, SelfCheckPlan, SyntheticDefects};

pub mod adam;
mod checkpoint;
mod draem;
pub mod losses;
mod schedule;
mod supersimplenet;

pub use draem::{
    fit_draem, learning_rate, read_checkpoint_state, CheckpointState, DraemFitReport, DraemTrainOptions, LossRecord,
};
pub use supersimplenet::{
    fit_supersimplenet, read_supersimplenet_checkpoint, EpochLosses, SuperSimpleNetCheckpoint, SuperSimpleNetFitReport,
    SuperSimpleNetTrainOptions,
};

/// Steps of a fit, reported to a progress callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FitStage {
    /// Decoding and resizing training images (DRAEM).
    Loading,
    /// Optimiser steps (DRAEM): `done` of `total` steps.
    Training,
    /// Extracting features of training images (PatchCore).
    Features,
    /// Choosing the memory bank's rows (PatchCore): `done` of `total` rows.
    Coreset,
    /// Scoring held-out good images for the thresholds.
    Calibration,
    /// Scoring synthetic-defect copies of the held-out images (the self-check).
    SelfCheck,
}

/// Options of a fit beyond the model's own configuration.
#[derive(Clone, Debug)]
pub struct FitOptions {
    /// Every `holdout_every`-th good image is held out for calibration instead of fitting
    /// (deterministic; 0 disables hold-out, which needs at least 2 images otherwise).
    pub holdout_every: usize,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Thresholds = max score on held-out good images x margin.
    pub margin: f32,
    /// Name written into the model (shown as `model_id`).
    pub name: String,
    /// Synthetic-defect copies of held-out images scored after the fit ([`self_check`]; 0: none).
    pub self_check_images: usize,
}

/// Synthetic-defect images of the self-check by default: 4.5-6 s of a 256 px model on 2 CPU
/// cores, 84 s with `--tiles 0.5` on BSData's 1024x417 frames (measured with other fits running
/// beside it); enough for an AUROC to two decimals.
pub const SELF_CHECK_IMAGES: usize = 50;

impl Default for FitOptions {
    fn default() -> Self {
        Self { holdout_every: 5, batch_size: 8, margin: 1.0, name: String::new(), self_check_images: SELF_CHECK_IMAGES }
    }
}

/// What a fit produced.
#[derive(Clone, Debug)]
pub struct FitReport {
    /// Sizes and timings.
    pub summary: FitSummary,
    /// The thresholds found.
    pub calibration: Calibration,
    /// Images held out for calibration.
    pub n_holdout: usize,
    /// The good-only self-check (None when `self_check_images` is 0).
    pub self_check: Option<SelfCheck>,
}

/// Splits `images` into (fit, held-out) deterministically: every `every`-th image, starting with
/// the `every`-th, is held out; at least one is held out when there are two or more images.
pub fn split_holdout(images: &[PathBuf], every: usize) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let every = if every == 0 { usize::MAX } else { every };
    let mut fit = Vec::new();
    let mut held = Vec::new();
    for (i, p) in images.iter().enumerate() {
        if (i + 1) % every == 0 {
            held.push(p.clone())
        } else {
            fit.push(p.clone())
        }
    }
    if held.is_empty() && fit.len() >= 2 {
        held.extend(fit.pop());
    }
    (fit, held)
}

/// [`split_holdout`], refusing a split that leaves nothing to fit or nothing to calibrate on.
pub fn split_holdout_checked(images: &[PathBuf], every: usize) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (fit, held) = split_holdout(images, every);
    if fit.is_empty() || held.is_empty() {
        return Err(Error::Config(format!("need at least 2 good images (one to fit, one to calibrate), got {}", images.len())));
    }
    Ok((fit, held))
}

/// Fits PatchCore on `images` (defect-free), calibrates it on a held-out part of them and
/// writes the model directory `out`. `progress(stage, done, total)` is called per batch.
#[allow(clippy::too_many_arguments)] // each is one thing the caller chooses; a struct would only rename them
pub fn fit_patchcore(
    images: &[PathBuf],
    data_label: &str,
    config: &PatchCoreConfig,
    backbone_weights: &Path,
    device: Device,
    out: &Path,
    options: &FitOptions,
    progress: &mut dyn FnMut(FitStage, usize, usize),
) -> Result<FitReport> {
    let (fit_set, holdout) = split_holdout_checked(images, options.holdout_every)?;
    let backbone = Backbone::new(&config.backbone, backbone_weights, device)?;
    let pre = Preprocessor::new(&config.preprocess, device)?;
    // Frames of different shapes (keep_aspect) go through the network one at a time.
    let batch_size = if pre.fixed_size() { options.batch_size.max(1) } else { 1 };
    // Images loaded so far: with tiles, the fit sees each image as a batch of tiles.
    let loaded = std::cell::Cell::new(0);
    let batches = fit_set.chunks(batch_size).map(|chunk| {
        let imgs = chunk.iter().map(|p| imaging::load(p)).collect::<Result<Vec<_>>>()?;
        loaded.set(loaded.get() + chunk.len());
        pre.batch(&imgs)
    });
    let total = fit_set.len();
    let (model, mut summary) = PatchCore::fit(backbone, batches, config, |p| match p {
        FitProgress::Images(_) => progress(FitStage::Features, loaded.get(), total),
        FitProgress::Coreset { done, total } => progress(FitStage::Coreset, done, total),
    })?;
    summary.n_images = total;

    let forward = |x: &Tensor| model.forward(x);
    let (image_scores, pixel_max) = calibrate(&holdout, &pre, batch_size, &forward, progress)?;
    let calibration = Calibration::from_good_scores(&image_scores, &pixel_max, options.margin)?;
    let self_check = check_on_synthetic_defects(&holdout, &image_scores, config.seed, &pre, &forward, options, progress)?;

    let mut training = training_info(data_label);
    training.patchcore = Some(summary.clone());
    training.self_check = self_check.clone();
    model_file::save_patchcore(out, &model, backbone_weights, &calibration, training, &model_name(out, options))?;
    Ok(FitReport { summary, calibration, n_holdout: holdout.len(), self_check })
}

/// What a teach-in fits: its frames are kept beside the model so that it can be audited and redone.
#[derive(Clone, Debug)]
pub struct TeachRequest {
    /// The model directory to write.
    pub out: PathBuf,
    /// Where the frames go, as an MVTec-layout data set (`<frames_dir>/train/good/0000.png`, ...).
    pub frames_dir: PathBuf,
    /// Model name (shown as `model_id`).
    pub name: String,
}

/// What a teach-in takes over from the model in force: its PatchCore settings and backbone
/// (the defaults when it is not a PatchCore model), its device, threshold and post-processing.
/// Cheap to take, so the inference thread hands it to a fitting thread and goes on.
#[derive(Clone, Debug)]
pub struct TeachBase {
    config: PatchCoreConfig,
    backbone_weights: PathBuf,
    device: Device,
    threshold: f32,
    postprocess: crate::PostprocessConfig,
}

impl TeachBase {
    /// The settings of `inspector`'s model.
    pub fn of(inspector: &crate::Inspector) -> Self {
        let (config, backbone_weights) = match inspector.manifest().patchcore().cloned() {
            // A model carries its backbone.
            Some(c) => {
                let w = inspector.model_dir().join(model_file::backbone_file(c.backbone.kind));
                (c, w)
            }
            None => (PatchCoreConfig::default(), crate::config::default_backbone_weights()),
        };
        Self {
            config,
            backbone_weights,
            device: inspector.device(),
            threshold: inspector.threshold(),
            postprocess: inspector.postprocess().clone(),
        }
    }
}

/// The node's teach-in: fits PatchCore on `frames` (good parts, as the model sees them) as
/// `base` says, writes the frames and the model as `request` says, and returns the new model
/// loaded with `base`'s device, threshold and post-processing. Meant for a thread of its own,
/// beside inference; a panic inside is an error.
pub fn teach(frames: &[image::RgbImage], base: &TeachBase, request: &TeachRequest) -> Result<crate::Inspector> {
    crate::error::catch_panic("the teach-in fit", || {
        let _no_grad = tch::no_grad_guard();
        let good = request.frames_dir.join("train/good");
        std::fs::create_dir_all(&good).map_err(|e| Error::io(&good, e))?;
        let mut paths = Vec::with_capacity(frames.len());
        for (i, frame) in frames.iter().enumerate() {
            let p = good.join(format!("{i:04}.png"));
            imaging::save_png(&p, frame)?;
            paths.push(p);
        }
        let options = FitOptions { name: request.name.clone(), ..Default::default() };
        let data_label = request.frames_dir.to_string_lossy();
        let progress = &mut |_, _, _| {};
        fit_patchcore(&paths, &data_label, &base.config, &base.backbone_weights, base.device, &request.out, &options, progress)?;
        let mut taught = crate::Inspector::new(&request.out, base.device, &base.postprocess)?;
        taught.set_threshold(base.threshold)?;
        Ok(taught)
    })
}

/// Scores the held-out good images with the inference path `forward`: (image scores, per-image
/// maximum of the anomaly map), for [`Calibration::from_good_scores`].
fn calibrate(
    holdout: &[PathBuf],
    pre: &Preprocessor,
    batch_size: usize,
    forward: &dyn Fn(&Tensor) -> Result<ModelOutput>,
    progress: &mut dyn FnMut(FitStage, usize, usize),
) -> Result<(Vec<f32>, Vec<f32>)> {
    let batch_size = batch_size.max(1);
    let mut image_scores = Vec::with_capacity(holdout.len());
    let mut pixel_max = Vec::with_capacity(holdout.len());
    for (i, chunk) in holdout.chunks(batch_size).enumerate() {
        let imgs = chunk.iter().map(|p| imaging::load(p)).collect::<Result<Vec<_>>>()?;
        if pre.tiled() {
            // With tiles, an image's score and map are its tiles' together, as at inference.
            for image in &imgs {
                let out = pre.run(image, forward)?;
                image_scores.push(out.image_scores.f_double_value(&[0])? as f32);
                pixel_max.push(out.anomaly_maps.f_max()?.f_double_value(&[])? as f32);
            }
        } else {
            let out = forward(&pre.batch(&imgs)?)?;
            image_scores.extend(Vec::<f32>::try_from(&out.image_scores.f_to_device(Device::Cpu)?)?);
            let n = out.anomaly_maps.size()[0];
            let maxima = out.anomaly_maps.f_reshape([n, -1])?.f_amax([1i64].as_slice(), false)?.f_to_device(Device::Cpu)?;
            pixel_max.extend(Vec::<f32>::try_from(&maxima)?);
        }
        progress(FitStage::Calibration, (i * batch_size + chunk.len()).min(holdout.len()), holdout.len());
    }
    Ok((image_scores, pixel_max))
}

/// The self-check of a fitted model ([`self_check::run`]) with `options.self_check_images`
/// copies, None when that is 0.
pub(crate) fn check_on_synthetic_defects(
    holdout: &[PathBuf],
    good_scores: &[f32],
    seed: u64,
    pre: &Preprocessor,
    forward: &dyn Fn(&Tensor) -> Result<ModelOutput>,
    options: &FitOptions,
    progress: &mut dyn FnMut(FitStage, usize, usize),
) -> Result<Option<SelfCheck>> {
    if options.self_check_images == 0 {
        return Ok(None);
    }
    let n = options.self_check_images;
    progress(FitStage::SelfCheck, 0, n);
    let plan = SelfCheckPlan { images: n, defects: SyntheticDefects::default(), seed };
    let check = self_check::run(holdout, good_scores, &plan, pre, forward, &mut |done, total| {
        progress(FitStage::SelfCheck, done, total)
    })?;
    Ok(Some(check))
}

/// The model's name: `options.name`, or the output directory's name.
fn model_name(out: &Path, options: &FitOptions) -> String {
    if options.name.is_empty() {
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    } else {
        options.name.clone()
    }
}

/// Training information without a method's summary (the caller fills in its own).
fn training_info(data_label: &str) -> TrainingInfo {
    TrainingInfo {
        data: data_label.to_string(),
        patchcore: None,
        draem: None,
        supersimplenet: None,
        self_check: None,
        created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        written_by: format!("anomaly_inspector {}", env!("CARGO_PKG_VERSION")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdout_is_deterministic_and_never_empty() {
        let imgs: Vec<PathBuf> = (0..25).map(|i| PathBuf::from(format!("{i}.png"))).collect();
        let (fit, held) = split_holdout(&imgs, 10);
        assert_eq!(held, vec![PathBuf::from("9.png"), PathBuf::from("19.png")]);
        assert_eq!(fit.len(), 23);
        let (fit, held) = split_holdout(&imgs[..3], 10);
        assert_eq!((fit.len(), held.len()), (2, 1));
        let (fit, held) = split_holdout(&imgs[..1], 10);
        assert_eq!((fit.len(), held.len()), (1, 0));
    }
}
