//! The self-describing model artifact: one directory that holds everything needed to run a
//! model, so that a model fitted on a workstation runs unchanged in the cell.
//!
//! ```text
//! <model>/model.json               format version, method, the method's config, calibration,
//!                                  training summary
//! PatchCore:
//! <model>/memory_bank.safetensors  memory bank [M, D]
//! <model>/backbone.safetensors     backbone weights (native EfficientNet-Lite0), or
//! <model>/backbone.pt              a TorchScript feature extractor
//! DRAEM:
//! <model>/draem.safetensors        both networks (VarStore, BatchNorm statistics included)
//! <model>/checkpoint/              the last training checkpoint, to continue training
//! SuperSimpleNet:
//! <model>/backbone.safetensors     the frozen backbone (as for PatchCore)
//! <model>/supersimplenet.safetensors  feature adaptor and heads (BatchNorm statistics included)
//! <model>/checkpoint/              the last training checkpoint
//! ```
//! Writing goes to a temporary sibling directory that is renamed into place, so a crash
//! mid-write never leaves a half-written model under the final name.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::config::{BackboneKind, DraemConfig, PatchCoreConfig, PreprocessConfig, SuperSimpleNetConfig};
use crate::error::{Error, Result};
use crate::models::backbone::Backbone;
use crate::models::draem::{Draem, DraemFitSummary};
use crate::models::patchcore::{self, FitSummary, PatchCore};
use crate::models::supersimplenet::{SuperSimpleNet, SuperSimpleNetFitSummary};
use crate::models::ModelOutput;
use crate::self_check::SelfCheck;

/// Value of `format` in every model.json.
pub const FORMAT: &str = "anomaly_inspector_model";
/// Version this build writes and reads. Bump on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// Which anomaly detection method a model uses (parsed at the boundary, never a string inside).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// PatchCore (memory bank + nearest neighbour).
    Patchcore,
    /// DRAEM (reconstructive + discriminative networks trained on simulated anomalies).
    Draem,
    /// SuperSimpleNet (heads on frozen features, trained on simulated and labelled defects).
    Supersimplenet,
}

impl Method {
    /// The lower-case name used in files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Patchcore => "patchcore",
            Method::Draem => "draem",
            Method::Supersimplenet => "supersimplenet",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = Error;

    /// The lower-case name (as [`Method::as_str`] writes it), any case.
    fn from_str(s: &str) -> Result<Self> {
        [Method::Patchcore, Method::Supersimplenet, Method::Draem]
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| Error::Config(format!("method '{s}': use patchcore, supersimplenet or draem")))
    }
}

/// Thresholds on raw model scores, found on held-out defect-free images. Scores are reported
/// normalised so that the threshold sits at 0.5 (`0.5 * raw / threshold`, clamped to 0..1),
/// which is what anomalib users expect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Raw image score at which an image counts as anomalous.
    pub image_threshold: f32,
    /// Raw pixel score at which a pixel belongs to a defect region.
    pub pixel_threshold: f32,
    /// How the thresholds were chosen, for people reading model.json.
    pub method: String,
    /// Number of held-out images used.
    pub n_images: usize,
}

impl Calibration {
    /// Thresholds from held-out good images: for image scores and for per-image pixel maxima,
    /// the larger of the maximum and mean + 3 standard deviations (the "3 sigma" rule of
    /// statistical process control, since a handful of held-out images rarely shows the
    /// extremes of normal variation), times `margin`.
    pub fn from_good_scores(image_scores: &[f32], pixel_maxima: &[f32], margin: f32) -> Result<Self> {
        let (i, p) = (three_sigma_or_max(image_scores), three_sigma_or_max(pixel_maxima));
        if !(i > 0.0 && p > 0.0) {
            return Err(Error::Config("calibration needs held-out good images with finite, positive scores".into()));
        }
        Ok(Self {
            image_threshold: i * margin,
            pixel_threshold: p * margin,
            method: format!("max(max, mean + 3 sd) over {} held-out good images x {margin}", image_scores.len()),
            n_images: image_scores.len(),
        })
    }

    /// Thresholds at the best F1 on labelled validation images (good ones and defective ones
    /// with masks, none of them used for fitting or for the evaluation): the image threshold
    /// over `image_scores` (`image_defective[i]`: image i has a defect), the pixel threshold
    /// over raw `pixel_scores` with their mask labels. An image or pixel is anomalous when its
    /// score is >= the threshold. Returns the calibration and the two F1 values reached.
    pub fn from_validation(
        image_scores: &[f32],
        image_defective: &[bool],
        pixel_scores: &[f32],
        pixel_defective: &[bool],
        source: &str,
    ) -> Result<(Self, f64, f64)> {
        let need = |e: Error, what: &str| {
            Error::Config(format!(
                "F1-optimal {what} threshold: {e}; the validation images must include good and defective \
                 ones (test/good/ and test/<defect>/ with ground_truth/ masks)"
            ))
        };
        let (image_f1, image_threshold) = crate::metrics::f1_max(image_scores, image_defective).map_err(|e| need(e, "image"))?;
        let (pixel_f1, pixel_threshold) = crate::metrics::f1_max(pixel_scores, pixel_defective).map_err(|e| need(e, "pixel"))?;
        if !(image_threshold > 0.0 && image_threshold.is_finite() && pixel_threshold > 0.0 && pixel_threshold.is_finite()) {
            return Err(Error::Config(format!(
                "F1-optimal thresholds {image_threshold} (image) and {pixel_threshold} (pixel) are not positive, finite \
                 scores: the validation images do not separate good from defective"
            )));
        }
        let n_defective = image_defective.iter().filter(|&&d| d).count();
        Ok((
            Self {
                image_threshold,
                pixel_threshold,
                method: format!(
                    "F1-optimal over {} validation images ({} good, {n_defective} defective) of {source}",
                    image_scores.len(),
                    image_scores.len() - n_defective
                ),
                n_images: image_scores.len(),
            },
            image_f1,
            pixel_f1,
        ))
    }

    /// Raw image score -> normalised score (0.5 = threshold).
    pub fn normalize_image(&self, raw: f32) -> f32 {
        normalize(raw, self.image_threshold)
    }

    /// Raw pixel score -> normalised score (0.5 = pixel threshold).
    pub fn normalize_pixel(&self, raw: f32) -> f32 {
        normalize(raw, self.pixel_threshold)
    }
}

/// max(max, mean + 3 sd) of the finite values; NaN when there are none (or one is NaN).
fn three_sigma_or_max(values: &[f32]) -> f32 {
    if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
        return f32::NAN;
    }
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let max = values.iter().copied().fold(f32::MIN, f32::max);
    max.max((mean + 3.0 * var.sqrt()) as f32)
}

fn normalize(raw: f32, threshold: f32) -> f32 {
    if raw.is_nan() {
        return 1.0; // never let a NaN pass as "good"
    }
    (0.5 * raw / threshold).clamp(0.0, 1.0)
}

/// What the model was trained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingInfo {
    /// The data set folder (as given by the user).
    pub data: String,
    /// Sizes and timings of a PatchCore fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patchcore: Option<FitSummary>,
    /// Steps, losses and timings of a DRAEM training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draem: Option<DraemFitSummary>,
    /// Labels, epochs and timings of a SuperSimpleNet training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supersimplenet: Option<SuperSimpleNetFitSummary>,
    /// The good-only self-check on synthetic defects, when the fit ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_check: Option<SelfCheck>,
    /// Seconds since the Unix epoch when the model was written.
    pub created_unix: u64,
    /// anomaly_inspector version that wrote it.
    pub written_by: String,
}

/// A model's method with its settings: exactly one, so that a PatchCore model cannot carry (or
/// lack) another method's settings.
#[derive(Clone, Debug, PartialEq)]
pub enum MethodConfig {
    /// PatchCore: backbone, layers, input size, memory bank, search, map smoothing...
    Patchcore(PatchCoreConfig),
    /// DRAEM: input size, widths, training settings...
    Draem(DraemConfig),
    /// SuperSimpleNet: input size, backbone layers, head sizes, training settings...
    SuperSimpleNet(SuperSimpleNetConfig),
}

impl MethodConfig {
    /// The method's name.
    pub fn method(&self) -> Method {
        match self {
            MethodConfig::Patchcore(_) => Method::Patchcore,
            MethodConfig::Draem(_) => Method::Draem,
            MethodConfig::SuperSimpleNet(_) => Method::Supersimplenet,
        }
    }

    /// How images are resized and normalised for this model.
    pub fn preprocess(&self) -> &PreprocessConfig {
        match self {
            MethodConfig::Patchcore(c) => &c.preprocess,
            MethodConfig::Draem(c) => &c.preprocess,
            MethodConfig::SuperSimpleNet(c) => &c.preprocess,
        }
    }
}

/// Contents of model.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ManifestFile", into = "ManifestFile")]
pub struct ModelManifest {
    /// A short name, shown in results (`model_id`).
    pub name: String,
    /// The method and its settings.
    pub config: MethodConfig,
    /// Thresholds.
    pub calibration: Calibration,
    /// Training data summary.
    pub training: TrainingInfo,
}

impl ModelManifest {
    /// A manifest of this build's format.
    pub fn new(name: &str, config: MethodConfig, calibration: Calibration, training: TrainingInfo) -> Self {
        Self { name: name.into(), config, calibration, training }
    }

    /// The detection method.
    pub fn method(&self) -> Method {
        self.config.method()
    }

    /// The PatchCore settings, when it is a PatchCore model.
    pub fn patchcore(&self) -> Option<&PatchCoreConfig> {
        match &self.config {
            MethodConfig::Patchcore(c) => Some(c),
            MethodConfig::Draem(_) | MethodConfig::SuperSimpleNet(_) => None,
        }
    }

    /// How images are resized and normalised for this model, whatever its method.
    pub fn preprocess(&self) -> &PreprocessConfig {
        self.config.preprocess()
    }
}

/// model.json as written: the method's name, and its settings under a key of that name. Every
/// model written so far has this form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    format: String,
    version: u32,
    method: Method,
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    patchcore: Option<PatchCoreConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    draem: Option<DraemConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    supersimplenet: Option<SuperSimpleNetConfig>,
    calibration: Calibration,
    training: TrainingInfo,
}

impl TryFrom<ManifestFile> for ModelManifest {
    type Error = Error;
    /// Checks that the method's settings, and only those, are present and valid.
    fn try_from(f: ManifestFile) -> Result<Self> {
        let config = match (f.method, f.patchcore, f.draem, f.supersimplenet) {
            // PatchCore settings were checked as they were parsed.
            (Method::Patchcore, Some(cfg), None, None) => MethodConfig::Patchcore(cfg),
            (Method::Draem, None, Some(cfg), None) => {
                cfg.validate()?;
                MethodConfig::Draem(cfg)
            }
            (Method::Supersimplenet, None, None, Some(cfg)) => {
                cfg.validate()?;
                MethodConfig::SuperSimpleNet(cfg)
            }
            (method, _, _, _) => {
                return Err(Error::Config(format!(
                    "method {} needs its own settings (\"{}\": {{...}}) and no other method's",
                    method.as_str(),
                    method.as_str()
                )))
            }
        };
        Ok(Self { name: f.name, config, calibration: f.calibration, training: f.training })
    }
}

impl From<ModelManifest> for ManifestFile {
    fn from(m: ModelManifest) -> Self {
        let method = m.method();
        let (patchcore, draem, supersimplenet) = match m.config {
            MethodConfig::Patchcore(c) => (Some(c), None, None),
            MethodConfig::Draem(c) => (None, Some(c), None),
            MethodConfig::SuperSimpleNet(c) => (None, None, Some(c)),
        };
        Self {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            method,
            name: m.name,
            patchcore,
            draem,
            supersimplenet,
            calibration: m.calibration,
            training: m.training,
        }
    }
}

/// A model ready to run, whatever its method.
#[derive(Debug)]
pub enum AnomalyModel {
    /// PatchCore. (Both boxed: a model is loaded once and is hundreds of bytes to thousands.)
    PatchCore(Box<PatchCore>),
    /// DRAEM.
    Draem(Box<Draem>),
    /// SuperSimpleNet.
    SuperSimpleNet(Box<SuperSimpleNet>),
}

impl AnomalyModel {
    /// Scores a normalised batch `[N, 3, H, W]`: image scores `[N]` and maps `[N, 1, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<ModelOutput> {
        match self {
            AnomalyModel::PatchCore(m) => m.forward(x),
            AnomalyModel::Draem(m) => m.forward(x),
            AnomalyModel::SuperSimpleNet(m) => m.forward(x),
        }
    }
}

/// A loaded model directory.
#[derive(Debug)]
pub struct LoadedModel {
    /// The parsed model.json.
    pub manifest: ModelManifest,
    /// The network, on its device.
    pub model: AnomalyModel,
}

/// File name of the backbone inside a PatchCore model directory.
pub fn backbone_file(kind: BackboneKind) -> &'static str {
    match kind {
        BackboneKind::EfficientnetLite0 => "backbone.safetensors",
        BackboneKind::Torchscript => "backbone.pt",
    }
}

/// Reads model.json of `dir` with checks that turn every problem into a clear message.
pub fn read_manifest(dir: &Path) -> Result<ModelManifest> {
    let path = dir.join("model.json");
    if !dir.is_dir() {
        return Err(Error::model(
            dir,
            "no such model directory; fit one with `anomaly_inspector fit --data <dir> --out <model>`",
        ));
    }
    let text = read_small_text(&path)?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::model(&path, format!("not valid JSON ({e}); the file is damaged")))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(Error::model(&path, format!("not an anomaly_inspector model (missing \"format\": \"{FORMAT}\")")));
    }
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version != FORMAT_VERSION as u64 {
        return Err(Error::model(
            &path,
            format!(
                "format version {version}, but this build reads version {FORMAT_VERSION}; re-fit the model with this version"
            ),
        ));
    }
    serde_json::from_value(value).map_err(|e| Error::model(&path, format!("invalid model.json: {e}")))
}

/// Largest model.json read: real ones are a few kilobytes, so anything near this is not one (and
/// must not be read into memory whole).
const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;

/// model.json as text, with messages that say what to do when it is missing or not text.
fn read_small_text(path: &Path) -> Result<String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::model(
                dir,
                "no model.json in this directory: not a model directory, or one that was not completely copied",
            ))
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(Error::model(path, format!("{} bytes: not a model.json (those are a few kilobytes)", meta.len())));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| Error::model(path, format!("not UTF-8 text ({e}); the file is damaged")))
}

/// Loads a model directory onto `device`.
pub fn load(dir: &Path, device: Device) -> Result<LoadedModel> {
    let manifest = read_manifest(dir)?;
    let model = match &manifest.config {
        MethodConfig::Patchcore(cfg) => {
            let weights = dir.join(backbone_file(cfg.backbone.kind));
            let backbone = Backbone::new(&cfg.backbone, &weights, device).map_err(|e| damaged(&weights, e))?;
            let bank_path = dir.join("memory_bank.safetensors");
            let (bank, retrieval) =
                patchcore::load_memory_bank(&bank_path, device, cfg.density_neighbors).map_err(|e| damaged(&bank_path, e))?;
            // A setting that does not fit this bank is a model.json to fix, not a damaged file.
            AnomalyModel::PatchCore(Box::new(PatchCore::new(cfg, backbone, bank, retrieval).map_err(|e| match e {
                Error::Config(reason) => Error::model(dir.join("model.json"), reason),
                other => damaged(&bank_path, other),
            })?))
        }
        MethodConfig::Draem(cfg) => {
            let weights = dir.join(DRAEM_WEIGHTS);
            AnomalyModel::Draem(Box::new(Draem::load(cfg, &weights, device).map_err(|e| damaged(&weights, e))?))
        }
        MethodConfig::SuperSimpleNet(cfg) => {
            let backbone = dir.join(backbone_file(cfg.backbone.kind));
            let weights = dir.join(SUPERSIMPLENET_WEIGHTS);
            let model = SuperSimpleNet::load(cfg, &backbone, &weights, device).map_err(|e| match e {
                Error::Config(reason) => Error::model(dir.join("model.json"), reason),
                other => damaged(&weights, other),
            })?;
            AnomalyModel::SuperSimpleNet(Box::new(model))
        }
    };
    Ok(LoadedModel { manifest, model })
}

/// A model file that model.json promises but that cannot be used: say what to do about it.
fn damaged(file: &Path, e: Error) -> Error {
    const HINT: &str = "the file is damaged or incomplete (copied only in part?): copy the model again or re-fit it";
    match e {
        Error::Model { path, reason } => Error::model(path, format!("{reason}; {HINT}")),
        Error::Io { path, source } => Error::model(path, format!("{source}; {HINT}")),
        other => Error::model(file, format!("{other}; {HINT}")),
    }
}

/// Writes a fitted PatchCore model to `dir` atomically (temporary sibling, then rename; an
/// existing model at `dir` is kept as `<dir>.previous`).
pub fn save_patchcore(
    dir: &Path,
    model: &PatchCore,
    backbone_source: &Path,
    calibration: &Calibration,
    training: TrainingInfo,
    name: &str,
) -> Result<()> {
    let manifest = ModelManifest::new(name, MethodConfig::Patchcore(model.config().clone()), calibration.clone(), training);
    write_model(dir, &manifest, |tmp| {
        copy_backbone(backbone_source, model.config().backbone.kind, tmp)?;
        patchcore::save_memory_bank(model.memory_bank(), model.image_retrieval(), &tmp.join("memory_bank.safetensors"))
    })
}

/// File name of DRAEM's weights inside a model directory.
pub const DRAEM_WEIGHTS: &str = "draem.safetensors";
/// Folder of the training checkpoint inside a DRAEM model directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// Writes a trained DRAEM model to `dir` atomically (like [`save_patchcore`]). When
/// `checkpoint` names a folder, it is copied into the model as `checkpoint/`, so that training
/// can later be continued from the saved model.
pub fn save_draem(
    dir: &Path,
    model: &Draem,
    calibration: &Calibration,
    training: TrainingInfo,
    name: &str,
    checkpoint: Option<&Path>,
) -> Result<()> {
    let manifest = ModelManifest::new(name, MethodConfig::Draem(model.config().clone()), calibration.clone(), training);
    write_model(dir, &manifest, |tmp| {
        model.save(&tmp.join(DRAEM_WEIGHTS))?;
        copy_checkpoint(checkpoint, tmp)
    })?;
    drop_checkpoint_only_previous(dir);
    Ok(())
}

/// File name of SuperSimpleNet's adaptor and heads inside a model directory.
pub const SUPERSIMPLENET_WEIGHTS: &str = "supersimplenet.safetensors";

/// Writes a trained SuperSimpleNet model to `dir` atomically (like [`save_draem`]), with a copy
/// of the backbone weights from `backbone_source` and of the `checkpoint` folder, if any.
pub fn save_supersimplenet(
    dir: &Path,
    model: &SuperSimpleNet,
    backbone_source: &Path,
    calibration: &Calibration,
    training: TrainingInfo,
    name: &str,
    checkpoint: Option<&Path>,
) -> Result<()> {
    let config = model.config().clone();
    let kind = config.backbone.kind;
    let manifest = ModelManifest::new(name, MethodConfig::SuperSimpleNet(config), calibration.clone(), training);
    write_model(dir, &manifest, |tmp| {
        copy_backbone(backbone_source, kind, tmp)?;
        model.save(&tmp.join(SUPERSIMPLENET_WEIGHTS))?;
        copy_checkpoint(checkpoint, tmp)
    })?;
    drop_checkpoint_only_previous(dir);
    Ok(())
}

/// Writes the model directory `dir` atomically ([`write_atomically`]): `fill` writes the
/// weights into the temporary directory, then model.json goes in last.
fn write_model(dir: &Path, manifest: &ModelManifest, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    write_atomically(dir, |tmp| {
        fill(tmp)?;
        let path = tmp.join("model.json");
        std::fs::write(&path, manifest_json(manifest)?).map_err(|e| Error::io(&path, e))
    })
}

/// Copies the backbone weights at `source` into the model directory `tmp` under their file name.
fn copy_backbone(source: &Path, kind: BackboneKind, tmp: &Path) -> Result<()> {
    std::fs::copy(source, tmp.join(backbone_file(kind))).map_err(|e| Error::io(source, e))?;
    Ok(())
}

/// Copies the files of the training checkpoint folder `src` (if any) into `<tmp>/checkpoint/`.
fn copy_checkpoint(src: Option<&Path>, tmp: &Path) -> Result<()> {
    let Some(src) = src else { return Ok(()) };
    let dst = tmp.join(CHECKPOINT_DIR);
    std::fs::create_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        if entry.path().is_file() {
            std::fs::copy(entry.path(), dst.join(entry.file_name())).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// Training wrote its checkpoints into `dir` before there was a model there; what
/// write_atomically kept of that as `<dir>.previous` is no model, only an old checkpoint.
fn drop_checkpoint_only_previous(dir: &Path) {
    if let (Some(parent), Some(file_name)) = (dir.parent(), dir.file_name()) {
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        let previous = parent.join(format!("{}.previous", file_name.to_string_lossy()));
        if previous.is_dir() && !previous.join("model.json").exists() {
            let _ = std::fs::remove_dir_all(&previous);
        }
    }
}

/// Replaces the calibration in `dir`'s model.json, keeping the file it replaces as
/// `model.json.previous` (the new file is written beside it and renamed into place, so a crash
/// leaves one complete model.json or the other).
pub fn save_calibration(dir: &Path, calibration: &Calibration) -> Result<()> {
    let mut manifest = read_manifest(dir)?;
    manifest.calibration = calibration.clone();
    let path = dir.join("model.json");
    let tmp = dir.join(format!(".model.json.tmp-{}", std::process::id()));
    let json = manifest_json(&manifest)?;
    std::fs::write(&tmp, json).map_err(|e| Error::io(&tmp, e))?;
    let previous = dir.join("model.json.previous");
    if let Err(e) = std::fs::copy(&path, &previous) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&previous, e));
    }
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}

/// model.json's text. Serialising plain structs of strings and numbers cannot fail; should it,
/// the model is not written.
fn manifest_json(manifest: &ModelManifest) -> Result<String> {
    serde_json::to_string_pretty(manifest).map_err(|e| Error::Config(format!("cannot write model.json: {e}")))
}

fn write_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let file_name = dir.file_name().ok_or_else(|| Error::model(dir, "model path has no name"))?;
    let tmp: PathBuf = parent.join(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let previous = parent.join(format!("{}.previous", file_name.to_string_lossy()));
        let _ = std::fs::remove_dir_all(&previous);
        std::fs::rename(dir, &previous).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_puts_the_threshold_at_one_half() {
        // mean 1.5, sd 0.5: 3 sigma gives 3.0 > max 2.0
        let c = Calibration::from_good_scores(&[1.0, 2.0], &[4.0, 4.0], 1.0).unwrap();
        assert_eq!(c.image_threshold, 3.0);
        // no spread: the max itself
        assert_eq!(c.pixel_threshold, 4.0);
        let c = Calibration { image_threshold: 2.0, ..c };
        assert_eq!(c.normalize_image(2.0), 0.5);
        assert_eq!(c.normalize_image(1.0), 0.25);
        assert_eq!(c.normalize_image(100.0), 1.0);
        assert_eq!(c.normalize_image(f32::NAN), 1.0);
        assert_eq!(c.normalize_pixel(2.0), 0.25);
    }

    #[test]
    fn validation_thresholds_sit_at_the_best_f1() {
        // Images: good 1, 2, 3; defective 2.5, 4, 5. Threshold 4 -> P 1, R 2/3, F1 0.8;
        // 2.5 -> TP 3, FP 1 (the 3.0), F1 6/7 = 0.857 (best); 2 -> TP 3, FP 2, F1 0.75.
        let images = [1.0, 2.0, 3.0, 2.5, 4.0, 5.0];
        let defective = [false, false, false, true, true, true];
        // Pixels: a clean cut at 0.7.
        let pixels = [0.1, 0.2, 0.3, 0.7, 0.9];
        let masks = [false, false, false, true, true];
        let (c, f_img, f_px) = Calibration::from_validation(&images, &defective, &pixels, &masks, "val").unwrap();
        assert_eq!(c.image_threshold, 2.5);
        assert!((f_img - 6.0 / 7.0).abs() < 1e-12, "{f_img}");
        assert_eq!((c.pixel_threshold, f_px), (0.7, 1.0));
        assert_eq!(c.n_images, 6);
        assert!(c.method.contains("3 good, 3 defective"), "{}", c.method);
        // Without defective images there is no F1.
        let err = Calibration::from_validation(&images[..3], &defective[..3], &pixels, &masks, "val").unwrap_err();
        assert!(err.to_string().contains("must include good and defective"), "{err}");
    }

    #[test]
    fn calibration_refuses_empty_or_degenerate_scores() {
        assert!(Calibration::from_good_scores(&[], &[], 1.0).is_err());
        assert!(Calibration::from_good_scores(&[0.0], &[0.0], 1.0).is_err());
        assert!(Calibration::from_good_scores(&[f32::NAN], &[1.0], 1.0).is_err());
    }

    #[test]
    fn broken_model_directories_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = read_manifest(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(missing.contains("fit one with"), "{missing}");

        let m = dir.path().join("m");
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("model.json"), "{ truncated").unwrap();
        assert!(read_manifest(&m).unwrap_err().to_string().contains("damaged"));

        std::fs::write(m.join("model.json"), r#"{"format": "anomaly_inspector_model", "version": 99}"#).unwrap();
        let err = read_manifest(&m).unwrap_err().to_string();
        assert!(err.contains("version 99"), "{err}");

        std::fs::write(m.join("model.json"), r#"{"hello": 1}"#).unwrap();
        assert!(read_manifest(&m).unwrap_err().to_string().contains("not an anomaly_inspector model"));

        std::fs::write(m.join("model.json"), b"{\"format\": \"\xff\xfe\"}").unwrap();
        let err = read_manifest(&m).unwrap_err().to_string();
        assert!(err.contains("not UTF-8") && err.contains("damaged"), "{err}");

        std::fs::remove_file(m.join("model.json")).unwrap();
        let err = read_manifest(&m).unwrap_err().to_string();
        assert!(err.contains("no model.json"), "{err}");
    }

    #[test]
    fn manifest_carries_exactly_the_method_settings() {
        let calibration = Calibration { image_threshold: 1.0, pixel_threshold: 1.0, method: "m".into(), n_images: 1 };
        let m = ModelManifest::new("n", MethodConfig::Draem(DraemConfig::cpu_small()), calibration, training_for_test());
        assert_eq!(m.preprocess().image_size, [128, 128]);
        let json = serde_json::to_value(&m).unwrap();
        assert!(json.get("patchcore").is_none(), "absent settings are not written");
        assert_eq!(
            (json["method"].as_str(), json["format"].as_str(), json["version"].as_u64()),
            (Some("draem"), Some(FORMAT), Some(1))
        );
        assert_eq!(serde_json::from_value::<ModelManifest>(json.clone()).unwrap(), m);

        // Written by hand or damaged: both methods' settings, or none, or DRAEM's out of range.
        let refused = |json: &serde_json::Value| serde_json::from_value::<ModelManifest>(json.clone()).unwrap_err().to_string();
        let mut both = json.clone();
        both["patchcore"] = serde_json::to_value(PatchCoreConfig::default()).unwrap();
        assert!(refused(&both).contains("no other method"), "{}", refused(&both));
        let mut none = json.clone();
        none.as_object_mut().unwrap().remove("draem");
        assert!(refused(&none).contains("needs its own settings"));
        let mut bad = json.clone();
        bad["draem"]["base_width"] = 1.into();
        assert!(refused(&bad).contains("base_width 1"), "{}", refused(&bad));
        let mut patchcore = none;
        patchcore["method"] = "patchcore".into();
        patchcore["patchcore"] = serde_json::json!({});
        let read: ModelManifest = serde_json::from_value(patchcore).unwrap();
        assert_eq!(read.method(), Method::Patchcore);
        assert_eq!(read.preprocess().image_size, [256, 256]);

        // SuperSimpleNet: its own key, validated; DRAEM's settings beside it are refused.
        let calibration = Calibration { image_threshold: 0.5, pixel_threshold: 0.5, method: "m".into(), n_images: 1 };
        let ssn = MethodConfig::SuperSimpleNet(SuperSimpleNetConfig::cpu_small());
        let m = ModelManifest::new("s", ssn, calibration, training_for_test());
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!((json["method"].as_str(), json.get("draem")), (Some("supersimplenet"), None));
        assert_eq!(serde_json::from_value::<ModelManifest>(json.clone()).unwrap(), m);
        assert!(m.patchcore().is_none());
        let mut bad = json.clone();
        bad["supersimplenet"]["pool"] = 2.into();
        assert!(refused(&bad).contains("must be odd"), "{}", refused(&bad));
        let mut both = json;
        both["draem"] = serde_json::to_value(DraemConfig::cpu_small()).unwrap();
        assert!(refused(&both).contains("no other method"), "{}", refused(&both));
    }

    #[test]
    fn a_model_json_written_before_the_typed_options_loads_as_fitted() {
        // The model.json of a PatchCore model written at 3db7608, before the typed options.
        let dir = tempfile::tempdir().unwrap();
        let json = r#"{
          "format": "anomaly_inspector_model", "version": 1, "method": "patchcore", "name": "old",
          "patchcore": {"backbone": {"kind": "efficientnet_lite0", "layers": ["stage3", "stage5"]},
            "preprocess": {"image_size": [256, 256], "normalization": "imagenet", "resize": "keep_aspect"},
            "neighbourhood": 3, "coreset_ratio": 0.1, "max_bank_size": 40000, "coreset_projection_dim": 64,
            "num_neighbors": 9, "blur_sigma": 4.0, "coarse_blur_sigma": 32.0, "density_neighbors": 5,
            "guided_bandwidth": 0.45, "guided_sigma": 48.0, "seed": 0, "knn_probes": 0, "retrieval_images": 0},
          "calibration": {"image_threshold": 2.5, "pixel_threshold": 3.5, "method": "held-out", "n_images": 4},
          "training": {"data": "d", "created_unix": 0, "written_by": "anomaly_inspector 0.1.0"}
        }"#;
        std::fs::write(dir.path().join("model.json"), json).unwrap();
        let read = read_manifest(dir.path()).unwrap();
        // The defaults of 3db7608, as fitted, whatever today's defaults are.
        let defaults = PatchCoreConfig::default();
        let map =
            crate::config::MapSmoothing { coarse_blur_sigma: Some(32.0), guided_bandwidth: Some(0.45), ..defaults.map.clone() };
        let as_fitted = PatchCoreConfig { density_neighbors: Some(5), map, ..defaults };
        assert_eq!(read.patchcore(), Some(&as_fitted), "the settings it was fitted with");
        assert_eq!(read.calibration.image_threshold, 2.5);
        // Written back, it is the same file.
        let original: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(serde_json::to_value(&read).unwrap(), original);
    }

    #[test]
    fn new_calibration_replaces_the_old_which_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let old = Calibration::from_good_scores(&[1.0], &[2.0], 1.0).unwrap();
        let manifest =
            ModelManifest::new("m", MethodConfig::Patchcore(PatchCoreConfig::default()), old.clone(), training_for_test());
        std::fs::write(dir.path().join("model.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
        let new = Calibration { image_threshold: 7.0, pixel_threshold: 8.0, method: "F1".into(), n_images: 3 };
        save_calibration(dir.path(), &new).unwrap();
        let read = read_manifest(dir.path()).unwrap();
        assert_eq!(read.calibration, new);
        assert_eq!(read.config, manifest.config, "the rest of model.json must not change");
        let kept: ModelManifest =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("model.json.previous")).unwrap()).unwrap();
        assert_eq!(kept.calibration, old);
        assert!(save_calibration(&dir.path().join("missing"), &new).is_err());
    }

    fn training_for_test() -> TrainingInfo {
        TrainingInfo {
            data: "d".into(),
            patchcore: None,
            draem: None,
            supersimplenet: None,
            self_check: None,
            created_unix: 0,
            written_by: "test".into(),
        }
    }

    #[test]
    fn atomic_write_keeps_the_previous_model_and_cleans_up_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model");
        write_atomically(&target, |t| std::fs::write(t.join("a"), "1").map_err(|e| Error::io(t, e))).unwrap();
        write_atomically(&target, |t| std::fs::write(t.join("a"), "2").map_err(|e| Error::io(t, e))).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("a")).unwrap(), "2");
        assert_eq!(std::fs::read_to_string(dir.path().join("model.previous/a")).unwrap(), "1");
        let err = write_atomically(&target, |_| Err(Error::Config("boom".into())));
        assert!(err.is_err());
        assert_eq!(std::fs::read_to_string(target.join("a")).unwrap(), "2", "good model replaced by a failed write");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
