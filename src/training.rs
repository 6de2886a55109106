//! Fitting a model from a folder of defect-free images: the loop behind `anomaly_inspector fit`
//! (and, later, the node's teach-in). PatchCore decodes images batch by batch, so memory holds
//! features, not pictures; DRAEM ([`fit_draem`], in `training/draem.rs`) keeps the training
//! images at network size as uint8 and trains for a number of steps.
use std::path::{Path, PathBuf};

use tch::{Device, Tensor};

use crate::config::{DraemConfig, PatchCoreConfig};
use crate::dataset::MvtecDataset;
use crate::error::{Error, Result};
use crate::imaging;
use crate::labels::{LabelCounts, LabelStore};
use crate::model_file::{self, Calibration, Method, MethodConfig, TrainingInfo};
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
    /// (deterministic; 0 disables hold-out, which needs at least 2 images otherwise). PatchCore
    /// adds them to its bank once the thresholds are set.
    pub holdout_every: usize,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Thresholds = max score on held-out good images x margin.
    pub margin: f32,
    /// Name written into the model (shown as `model_id`).
    pub name: String,
    /// Synthetic-defect copies of held-out images scored after the fit ([`self_check`]; 0: none).
    pub self_check_images: usize,
    /// Set from another thread to stop the fit between batches or steps (an [`Error::Cancelled`]).
    pub cancel: Cancel,
}

/// A flag another thread sets to stop a fit early (the node's teach-in action is cancellable).
/// Clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    /// Asks the fit to stop at its next check.
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// An [`Error::Cancelled`] naming `during` once cancelled; Ok before.
    pub fn check(&self, during: &str) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled(format!("stopped during {during}")))
        } else {
            Ok(())
        }
    }
}

/// Synthetic-defect images of the self-check by default: 4.5-6 s of a 256 px model on 2 CPU
/// cores, 84 s with `--tiles 0.5` on BSData's 1024x417 frames (measured with other fits running
/// beside it); enough for an AUROC to two decimals.
pub const SELF_CHECK_IMAGES: usize = 50;

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            holdout_every: 5,
            batch_size: 8,
            margin: 1.0,
            name: String::new(),
            self_check_images: SELF_CHECK_IMAGES,
            cancel: Cancel::default(),
        }
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
    let (model, summary) =
        PatchCore::fit(backbone, image_batches(&fit_set, batch_size, &pre, options, &loaded), config, |p| match p {
            FitProgress::Images(_) => progress(FitStage::Features, loaded.get(), fit_set.len()),
            FitProgress::Coreset { done, total } => progress(FitStage::Coreset, done, total),
        })?;

    let forward = |x: &Tensor| model.forward(x);
    let (image_scores, pixel_max) = calibrate(&holdout, &pre, batch_size, &forward, progress)?;
    let calibration = Calibration::from_good_scores(&image_scores, &pixel_max, options.margin)?;
    let self_check = check_on_synthetic_defects(&holdout, &image_scores, config.seed, &pre, &forward, options, progress)?;

    // The held-out images were scored as unseen parts; now they join the bank, so that it learns
    // from every good image (README, "Thresholds"). The thresholds stay those of the bank without
    // them: against more images good parts score no higher, so they err towards passing a part.
    let (model, mut summary) =
        model.grown(&summary, image_batches(&holdout, batch_size, &pre, options, &loaded), |p| match p {
            FitProgress::Images(_) => progress(FitStage::Features, loaded.get(), holdout.len()),
            FitProgress::Coreset { done, total } => progress(FitStage::Coreset, done, total),
        })?;
    // With tiles the model counts tiles.
    summary.n_images = images.len();

    let mut training = training_info(data_label);
    training.patchcore = Some(summary.clone());
    training.self_check = self_check.clone();
    model_file::save_patchcore(out, &model, backbone_weights, &calibration, training, &model_name(out, options))?;
    Ok(FitReport { summary, calibration, n_holdout: holdout.len(), self_check })
}

/// `images` loaded and preprocessed `batch_size` at a time (cancellable between batches);
/// `loaded` counts the images, from 0.
fn image_batches<'a>(
    images: &'a [PathBuf],
    batch_size: usize,
    pre: &'a Preprocessor,
    options: &'a FitOptions,
    loaded: &'a std::cell::Cell<usize>,
) -> impl Iterator<Item = Result<Tensor>> + 'a {
    loaded.set(0);
    images.chunks(batch_size).map(move |chunk| {
        options.cancel.check("feature extraction")?;
        let imgs = chunk.iter().map(|p| imaging::load(p)).collect::<Result<Vec<_>>>()?;
        loaded.set(loaded.get() + chunk.len());
        pre.batch(&imgs)
    })
}

/// What a teach-in fits: its frames (and the labels it learned from) are kept beside the model
/// so that it can be audited and redone.
#[derive(Clone, Debug)]
pub struct TeachRequest {
    /// The model directory to write (must not exist: a teach-in never overwrites a model).
    pub out: PathBuf,
    /// Where the frames go, as an MVTec-layout data set (`<frames_dir>/train/good/0000.png`, ...),
    /// with the labels linked in beside them.
    pub frames_dir: PathBuf,
    /// Model name (shown as `model_id`).
    pub name: String,
    /// The method to fit.
    pub method: Method,
    /// The operator's labels to learn from too (every label the store holds).
    pub labels: Option<LabelStore>,
}

/// What a teach-in takes over from the model in force: its settings and backbone when it is of
/// the method asked for (else that method's defaults, with the model's backbone weights when it
/// carries Lite0's), its device, threshold and post-processing. Cheap to take, so the inference
/// thread hands it to a fitting thread and goes on.
#[derive(Clone, Debug)]
pub struct TeachBase {
    config: MethodConfig,
    model_dir: PathBuf,
    device: Device,
    threshold: f32,
    postprocess: crate::PostprocessConfig,
}

impl TeachBase {
    /// The settings of `inspector`'s model.
    pub fn of(inspector: &crate::Inspector) -> Self {
        Self {
            config: inspector.manifest().config.clone(),
            model_dir: inspector.model_dir().to_path_buf(),
            device: inspector.device(),
            threshold: inspector.threshold(),
            postprocess: inspector.postprocess().clone(),
        }
    }

    /// The method of the model in force.
    pub fn method(&self) -> Method {
        self.config.method()
    }

    /// Lite0 weights for a new model: the ones the model in force carries, else the project's.
    fn lite0_weights(&self) -> PathBuf {
        let carried = self.model_dir.join(model_file::backbone_file(crate::config::BackboneKind::EfficientnetLite0));
        if carried.is_file() {
            carried
        } else {
            crate::config::default_backbone_weights()
        }
    }

    /// The settings and backbone weights to fit `method` with.
    fn settings_for(&self, method: Method) -> (MethodConfig, PathBuf) {
        let own = |kind| self.model_dir.join(model_file::backbone_file(kind));
        match (method, &self.config) {
            (Method::Patchcore, MethodConfig::Patchcore(c)) => (self.config.clone(), own(c.backbone.kind)),
            // The image score is chosen again by the labels this teach-in finds (the model's
            // was chosen by those of its own fit).
            (Method::Supersimplenet, MethodConfig::SuperSimpleNet(c)) => {
                let c = crate::config::SuperSimpleNetConfig { image_score: crate::config::ImageScore::Auto, ..c.clone() };
                (MethodConfig::SuperSimpleNet(c.clone()), own(c.backbone.kind))
            }
            (Method::Draem, MethodConfig::Draem(_)) => (self.config.clone(), PathBuf::new()),
            (Method::Patchcore, _) => (MethodConfig::Patchcore(PatchCoreConfig::default()), self.lite0_weights()),
            (Method::Supersimplenet, _) => {
                (MethodConfig::SuperSimpleNet(crate::config::SuperSimpleNetConfig::default()), self.lite0_weights())
            }
            // The paper's DRAEM trains for hours on a CPU; its small preset in minutes.
            (Method::Draem, _) => {
                let c = if self.device == Device::Cpu { DraemConfig::cpu_small() } else { DraemConfig::paper() };
                (MethodConfig::Draem(c), PathBuf::new())
            }
        }
    }
}

/// What a teach-in produced.
#[derive(Debug)]
pub struct Taught {
    /// The new model, loaded with the base's device, threshold and post-processing.
    pub inspector: crate::Inspector,
    /// Fresh frames it learned from.
    pub frames: usize,
    /// The labels it found (all linked into the frames' data set).
    pub labels: LabelCounts,
    /// Whether the method learned from the defective labels (only SuperSimpleNet does).
    pub used_defective: bool,
}

/// The node's teach-in: writes `frames` (good parts, as the model sees them) and links every
/// label of `request.labels` into one MVTec-layout data set, fits `request.method` on it as
/// `base` says (PatchCore and DRAEM on its good images, SuperSimpleNet on all of it), writes the
/// model and returns it loaded. `options.cancel` stops it between steps; on any failure nothing
/// of it is left on disk (the labels stay in their store). Meant for a thread of its own,
/// beside inference; a panic inside is an error.
pub fn teach(
    frames: &[image::RgbImage],
    base: &TeachBase,
    request: &TeachRequest,
    options: &FitOptions,
    progress: &mut dyn FnMut(FitStage, usize, usize),
) -> Result<Taught> {
    for dir in [&request.out, &request.frames_dir] {
        if dir.exists() {
            return Err(Error::Config(format!(
                "{} exists and a teach-in never overwrites: choose another model_name",
                dir.display()
            )));
        }
    }
    let taught = crate::error::catch_panic("the teach-in fit", || teach_into(frames, base, request, options, progress));
    if taught.is_err() {
        let _ = std::fs::remove_dir_all(&request.out);
        let _ = std::fs::remove_dir_all(&request.frames_dir);
    }
    taught
}

fn teach_into(
    frames: &[image::RgbImage],
    base: &TeachBase,
    request: &TeachRequest,
    options: &FitOptions,
    progress: &mut dyn FnMut(FitStage, usize, usize),
) -> Result<Taught> {
    let good = request.frames_dir.join("train/good");
    std::fs::create_dir_all(&good).map_err(|e| Error::io(&good, e))?;
    for (i, frame) in frames.iter().enumerate() {
        options.cancel.check("saving the frames")?;
        imaging::save_png(&good.join(format!("{i:04}.png")), frame)?;
    }
    let labels = match &request.labels {
        Some(store) => store.link_into(&request.frames_dir)?,
        None => LabelCounts::default(),
    };
    let data = MvtecDataset::open(&request.frames_dir)?;
    let options = FitOptions { name: request.name.clone(), ..options.clone() };
    let label = request.frames_dir.to_string_lossy();
    let (config, weights) = base.settings_for(request.method);
    let out = &request.out;
    match &config {
        MethodConfig::Patchcore(c) => {
            // Nothing is trained: no autograd graph for the features.
            let _no_grad = tch::no_grad_guard();
            fit_patchcore(&data.train_good, &label, c, &weights, base.device, out, &options, progress)?;
        }
        MethodConfig::Draem(c) => {
            let train = DraemTrainOptions::default();
            fit_draem(&data.train_good, &label, c, base.device, out, &options, &train, progress, &mut |_| {})?;
        }
        MethodConfig::SuperSimpleNet(c) => {
            let train = SuperSimpleNetTrainOptions::default();
            let (good, defective) = (&data.train_good, &data.train_defective);
            fit_supersimplenet(good, defective, &label, c, &weights, base.device, out, &options, &train, progress, &mut |_| {})?;
        }
    }
    let mut inspector = crate::Inspector::new(out, base.device, &base.postprocess)?;
    inspector.set_threshold(base.threshold)?;
    Ok(Taught { inspector, frames: frames.len(), labels, used_defective: request.method == Method::Supersimplenet })
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

    /// A PatchCore model on a small synthetic set, loaded, and the set's images as frames.
    fn taught_base(dir: &Path) -> Option<(crate::Inspector, Vec<image::RgbImage>, crate::dataset::MvtecDataset)> {
        let weights = crate::models::backbone::lite0_weights_for_tests()?;
        let cfg = crate::synthetic::SyntheticConfig { seed: 3, size: 64, n_train: 6, n_test_good: 1, n_test_per_defect: 1 };
        crate::synthetic::generate_dataset(&dir.join("data"), &cfg).unwrap();
        let data = MvtecDataset::open(&dir.join("data")).unwrap();
        let mut config = PatchCoreConfig::default();
        config.preprocess.image_size = [64, 64];
        let options = FitOptions { self_check_images: 0, ..FitOptions::default() };
        let model = dir.join("models/base");
        fit_patchcore(&data.train_good, "tiny", &config, &weights, Device::Cpu, &model, &options, &mut |_, _, _| {}).unwrap();
        let inspector = crate::Inspector::new(&model, Device::Cpu, &crate::PostprocessConfig::default()).unwrap();
        let frames = data.train_good.iter().map(|p| imaging::load(p).unwrap()).collect();
        Some((inspector, frames, data))
    }

    #[test]
    fn teach_learns_from_frames_and_labels_and_keeps_them_beside_the_model() {
        let tmp = tempfile::tempdir().unwrap();
        let Some((base, frames, data)) = taught_base(tmp.path()) else { return };
        let store = LabelStore::new(&tmp.path().join("models/labels"));
        let test_good = imaging::load(&data.test.iter().find(|s| !s.is_anomalous()).unwrap().path).unwrap();
        store.add("s1", &test_good, &crate::Verdict::Good).unwrap();
        let defect = data.test.iter().find(|s| s.mask.is_some()).unwrap();
        let mask = imaging::load_gray(defect.mask.as_ref().unwrap()).unwrap();
        let verdict = crate::Verdict::Defective { defect_type: "scratch".into(), mask: Some(mask) };
        store.add("s2", &imaging::load(&defect.path).unwrap(), &verdict).unwrap();

        let request = TeachRequest {
            out: tmp.path().join("models/taught"),
            frames_dir: tmp.path().join("models/taught.frames"),
            name: "taught".into(),
            method: Method::Patchcore,
            labels: Some(store.clone()),
        };
        let base = TeachBase::of(&base);
        let options = FitOptions { self_check_images: 0, ..FitOptions::default() };
        let mut stages = Vec::new();
        let taught = teach(&frames, &base, &request, &options, &mut |s, _, _| stages.push(s)).unwrap();
        assert_eq!(taught.inspector.model_id(), "taught");
        assert_eq!(taught.inspector.method(), "patchcore");
        assert_eq!((taught.frames, taught.labels.good, taught.labels.defective), (6, 1, 1));
        assert!(!taught.used_defective, "PatchCore learns from good images only");
        assert!(stages.contains(&FitStage::Features) && stages.contains(&FitStage::Calibration));
        // The fit's data set: the frames, the good label among them, the defect with its mask.
        let kept = MvtecDataset::open(&request.frames_dir).unwrap();
        assert_eq!(kept.train_good.len(), 7);
        assert_eq!(kept.train_defective.len(), 1);
        assert!(kept.train_defective[0].mask.is_some());
        let fitted = model_file::read_manifest(&request.out).unwrap();
        // The bank learns from every good image, the held-out ones too (after calibrating without them).
        assert_eq!(fitted.training.patchcore.as_ref().unwrap().n_images, 7);

        // A teach-in never overwrites a model.
        let again = teach(&frames, &base, &request, &options, &mut |_, _, _| {}).unwrap_err();
        assert!(again.to_string().contains("never overwrites"), "{again}");
        assert!(request.out.join("model.json").is_file());

        // Cancelled: an error that says so, and nothing of it left on disk; the labels stay.
        let cancelled = TeachRequest {
            out: tmp.path().join("models/cancelled"),
            frames_dir: tmp.path().join("models/cancelled.frames"),
            name: "cancelled".into(),
            method: Method::Supersimplenet,
            labels: Some(store.clone()),
        };
        let options = FitOptions { cancel: Cancel::default(), ..options };
        options.cancel.cancel();
        let err = teach(&frames, &base, &cancelled, &options, &mut |_, _, _| {}).unwrap_err();
        assert_eq!(err.kind(), "cancelled", "{err}");
        assert!(!cancelled.out.exists() && !cancelled.frames_dir.exists());
        assert_eq!(store.counts().unwrap().defective, 1);
    }
}
