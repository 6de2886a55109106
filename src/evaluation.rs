//! Scoring a model against labelled images: [`evaluate`] (the paper metrics of `anomaly_inspector
//! eval`), [`calibrate`] (F1-optimal thresholds on validation images) and [`predict_image`] (one
//! image's verdict and pictures). Each returns a typed report, so the command line only prints
//! and the tests read fields, not JSON keys; progress goes to a callback, so the caller owns
//! the progress bars.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::dataset::{load_mask, MvtecDataset, TestSample};
use crate::metrics::{self, PixelScores, AUPRO_FPR_LIMIT};
use crate::model_file::{Calibration, Method};
use crate::DefectRegion;
use crate::{imaging, Inspector, PictureSet};
use crate::{Error, Result};

/// What the reports' `notes` say about how the numbers were made.
pub const EVAL_NOTES: &str = "image metrics on the raw image score; pixel metrics on the normalised map \
                  (0.5 = pixel threshold, clamped to 0..1, so pixels at >= 2x the threshold tie at 1.0), \
                  scaled to pixel_max_side; AUPRO = area under PRO(FPR) for FPR in 0..aupro_fpr_limit, \
                  divided by the limit; ms_per_image = mean Inspector::inspect time after one warm-up call";

/// Which of a data set's test images [`evaluate`] takes. Settings are chosen on one half and
/// reported on the other, so that a number in the README was not tuned on the images it reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TestSplit {
    /// Every test image.
    #[default]
    All,
    /// Every second image of each test/ folder by name, from the second on (positions 1, 3, ...):
    /// the half to choose settings on.
    Validation,
    /// The other half (positions 0, 2, ...): the half to report.
    Evaluation,
}

impl TestSplit {
    /// Whether the image at `position` (0-based, by name) within its test/ folder belongs here.
    pub fn keeps(self, position: usize) -> bool {
        match self {
            Self::All => true,
            Self::Validation => position % 2 == 1,
            Self::Evaluation => position % 2 == 0,
        }
    }
}

/// Options of [`evaluate`] (`anomaly_inspector eval`).
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct EvalOptions {
    /// Which test images: all, the validation half or the evaluation half of each test/ folder.
    #[arg(long, value_enum, default_value_t = TestSplit::All)]
    pub split: TestSplit,
    /// Evaluate only the first N images (by name) of each test/ folder, good included (after
    /// --split).
    #[arg(long)]
    pub limit_per_type: Option<usize>,
    /// Pixel metrics are computed on maps and masks scaled down to at most this many pixels on
    /// the long side (bilinear for maps, nearest for masks), which bounds memory.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(8..))]
    pub pixel_max_side: u32,
}

/// Options of [`calibrate`] (`anomaly_inspector calibrate`).
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct CalibrateOptions {
    /// Pixels are compared on maps and masks scaled to at most this many pixels on the long side.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(8..))]
    pub pixel_max_side: u32,
}

/// What [`evaluate`] and [`calibrate`] tell their caller while they run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Progress<'a> {
    /// The images are chosen: `total` of them will be inspected.
    Started {
        /// Images to inspect.
        total: usize,
    },
    /// `done` of `total` images are through (inspected or skipped).
    Image {
        /// Images through so far.
        done: usize,
        /// Images in all.
        total: usize,
    },
    /// An image, or its pixel metrics, was skipped; the message names the file and the reason.
    Skipped(&'a str),
}

/// Fractions of pixels whose normalised score is clamped at 1.0 (`None`: no such pixels).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SaturatedFraction {
    /// Among the defect-free pixels (of good and defective images).
    pub defect_free: Option<f64>,
    /// Among the ground-truth defect pixels.
    pub defect: Option<f64>,
}

/// One defect type's row of an [`EvalReport`]: its images against all good ones. A metric is
/// `None` where it is undefined (one class missing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DefectMetrics {
    /// Defective images of this type that were inspected.
    pub n_images: usize,
    /// Image AUROC.
    pub image_auroc: Option<f64>,
    /// Best image F1 over all thresholds.
    pub image_f1_max: Option<f64>,
    /// Pixel AUROC.
    pub pixel_auroc: Option<f64>,
    /// AUPRO up to [`EvalReport::aupro_fpr_limit`], divided by it.
    pub aupro: Option<f64>,
    /// Ground-truth defect regions.
    pub n_regions: Option<u64>,
}

/// The report of [`evaluate`], written by `anomaly_inspector eval --json`. Metrics are `None`
/// where undefined (say, no defective image among those evaluated).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The model's name (`model_id`).
    pub model: String,
    /// The model directory evaluated.
    pub model_dir: PathBuf,
    /// The model's method.
    pub method: Method,
    /// The data set root.
    pub data: PathBuf,
    /// The device inference ran on, in words.
    pub device: String,
    /// Which test images were evaluated.
    #[serde(default)]
    pub split: TestSplit,
    /// Images inspected.
    pub n_images: usize,
    /// Good images among them.
    pub n_good: usize,
    /// Defective images among them.
    pub n_anomalous: usize,
    /// Images that could not be inspected.
    pub n_failed: usize,
    /// Image AUROC over all images.
    pub image_auroc: Option<f64>,
    /// Best image F1 over all thresholds.
    pub image_f1_max: Option<f64>,
    /// The raw image score at which [`Self::image_f1_max`] is reached.
    pub image_f1_threshold_raw: Option<f32>,
    /// The model's own raw image threshold.
    pub image_threshold_raw: f32,
    /// Image F1 at the model's own threshold: what the node's verdict reaches.
    pub image_f1_at_threshold: Option<f64>,
    /// Pixel AUROC over all images.
    pub pixel_auroc: Option<f64>,
    /// AUPRO over all images up to [`Self::aupro_fpr_limit`], divided by it.
    pub aupro: Option<f64>,
    /// The FPR up to which AUPRO integrates.
    pub aupro_fpr_limit: f64,
    /// Pixels evaluated.
    pub n_pixels: Option<u64>,
    /// Ground-truth defect regions.
    pub n_regions: Option<u64>,
    /// Long side of the maps and masks the pixel metrics are computed on.
    pub pixel_max_side: u32,
    /// Pixels whose normalised score is clamped at 1.0, by class.
    pub pixel_saturated_fraction: SaturatedFraction,
    /// One row per defect type, by name.
    pub per_defect: BTreeMap<String, DefectMetrics>,
    /// Mean [`Inspector::inspect`] time after one warm-up call.
    pub ms_per_image: f64,
    /// Images per second of inspection time (0 when none was measured).
    pub images_per_second: f64,
    /// Seconds the whole evaluation took.
    pub wall_seconds: f64,
    /// One message per image (or per image's pixel metrics) skipped.
    pub errors: Vec<String>,
    /// How the numbers were made ([`EVAL_NOTES`]).
    pub notes: String,
}

impl EvalReport {
    /// The report as pretty JSON, one key per line, ending in a newline.
    pub fn to_json(&self) -> Result<String> {
        Ok(json_text(self, true)? + "\n")
    }

    /// The metrics as a table for people: all images, then one row per defect type, then the
    /// F1 that the model's own threshold reaches. Lines end in newlines.
    pub fn table(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "     -".to_string(), |v| format!("{v:6.3}"));
        let row = |name: &str, n: usize, cells: [Option<f64>; 4]| {
            let [auroc, f1, pixel_auroc, aupro] = cells.map(f);
            format!("{name:<14} {n:>6}  {auroc:>11}  {f1:>6}  {pixel_auroc:>11}  {aupro:>9}\n")
        };
        let mut text = format!(
            "{:<14} {:>6}  {:>11}  {:>6}  {:>11}  {:>9}\n",
            "", "images", "image AUROC", "F1-max", "pixel AUROC", "AUPRO@0.3"
        );
        text += &row("all", self.n_images, [self.image_auroc, self.image_f1_max, self.pixel_auroc, self.aupro]);
        for (name, d) in &self.per_defect {
            text += &row(name, d.n_images, [d.image_auroc, d.image_f1_max, d.pixel_auroc, d.aupro]);
        }
        if let Some(f1) = self.image_f1_at_threshold {
            let t = self.image_threshold_raw;
            text += &format!("image F1 at the model's own threshold ({t:.4} raw, the node's verdict): {f1:.3}\n");
        }
        text
    }
}

/// The report of [`calibrate`]: the thresholds before and after, and the F1 each reaches on
/// the validation images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationReport {
    /// The validation data set root.
    pub data: PathBuf,
    /// Validation images scored.
    pub n_images: usize,
    /// Validation images that could not be scored.
    pub n_skipped: usize,
    /// The model's calibration before.
    pub before: Calibration,
    /// The F1-optimal calibration found.
    pub after: Calibration,
    /// Image F1 at the old image threshold.
    pub image_f1_before: f64,
    /// Image F1 at the new one.
    pub image_f1_after: f64,
    /// Pixel F1 at the old pixel threshold.
    pub pixel_f1_before: f64,
    /// Pixel F1 at the new one.
    pub pixel_f1_after: f64,
}

impl CalibrationReport {
    /// The thresholds before and after, with the F1 of each, as a table for people. Lines end
    /// in newlines.
    pub fn table(&self) -> String {
        let row = |name: &str, old: f32, new: f32, f1_old: f64, f1_new: f64| {
            format!("{name:<16}{old:>9.4} {new:>9.4}   {f1_old:>6.3}  {f1_new:>6.3}\n")
        };
        let (before, after) = (&self.before, &self.after);
        format!("{} validation images ({} skipped) of {}\n", self.n_images, self.n_skipped, self.data.display())
            + "                  threshold (raw)      F1 on these images\n"
            + "                  before     after     before   after\n"
            + &row("image", before.image_threshold, after.image_threshold, self.image_f1_before, self.image_f1_after)
            + &row("pixel", before.pixel_threshold, after.pixel_threshold, self.pixel_f1_before, self.pixel_f1_after)
    }
}

/// `anomaly_inspector predict`'s verdict on an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The image score reached the threshold.
    #[serde(rename = "ANOMALOUS")]
    Anomalous,
    /// It did not.
    #[serde(rename = "good")]
    Good,
}

/// One image as [`predict_image`] saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImagePrediction {
    /// The image file.
    pub image: PathBuf,
    /// Normalised image score (0.5 = the calibrated threshold).
    pub score: f32,
    /// The model's raw image score.
    pub raw_score: f32,
    /// Normalised threshold the verdict used.
    pub threshold: f32,
    /// `score >= threshold`.
    pub is_anomalous: bool,
    /// The same, in words.
    pub verdict: Verdict,
    /// Defect regions, largest first, in image pixels.
    pub regions: Vec<DefectRegion>,
    /// Inspection time in milliseconds.
    pub ms: f64,
    /// The heatmap PNG written.
    pub heatmap: PathBuf,
    /// The overlay PNG written.
    pub overlay: PathBuf,
}

/// One line of `anomaly_inspector predict`'s output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PredictLine {
    /// The image was inspected.
    Inspected(ImagePrediction),
    /// It could not be.
    Failed {
        /// The image file.
        image: PathBuf,
        /// Why, with every cause.
        error: String,
    },
}

impl PredictLine {
    /// The line as compact JSON (no newline).
    pub fn to_json(&self) -> Result<String> {
        json_text(self, false)
    }
}

/// `value` as JSON text, built through [`serde_json::Value`] on purpose: that widens f32 fields
/// to the f64 they are (as `serde_json::json!` does) and sorts keys, so the reports read as
/// they always have, digit for digit.
pub(crate) fn json_text<T: Serialize>(value: &T, pretty: bool) -> Result<String> {
    let value = serde_json::to_value(value).map_err(|e| Error::Config(format!("report does not serialise: {e}")))?;
    let text = if pretty { serde_json::to_string_pretty(&value) } else { serde_json::to_string(&value) };
    text.map_err(|e| Error::Config(format!("report does not serialise: {e}")))
}

/// Inspects `path` and writes `<parent>_<stem>_heatmap.png` and `..._overlay.png` into `out`.
pub fn predict_image(inspector: &Inspector, path: &Path, out: &Path) -> Result<ImagePrediction> {
    let image = imaging::load(path)?;
    let insp = inspector.inspect(&image)?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    // Data sets repeat file names across folders (test/good/000.png, test/crack/000.png).
    let parent = path.parent().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = if parent.is_empty() { stem } else { format!("{parent}_{stem}") };
    let hm = out.join(format!("{stem}_heatmap.png"));
    let ov = out.join(format!("{stem}_overlay.png"));
    let save_err = |path: &Path, e: image::ImageError| Error::io(path, std::io::Error::other(e));
    let pictures = insp.pictures(&image, PictureSet { heatmap: true, overlay: true, map: false });
    for (picture, path) in [(pictures.heatmap, &hm), (pictures.overlay, &ov)] {
        if let Some(picture) = picture {
            picture.save(path).map_err(|e| save_err(path, e))?;
        }
    }
    Ok(ImagePrediction {
        image: path.to_path_buf(),
        score: insp.score,
        raw_score: insp.raw_score,
        threshold: insp.threshold,
        is_anomalous: insp.is_anomalous,
        verdict: if insp.is_anomalous { Verdict::Anomalous } else { Verdict::Good },
        regions: insp.regions,
        ms: insp.elapsed.as_secs_f64() * 1e3,
        heatmap: hm,
        overlay: ov,
    })
}

/// Image score of one evaluated image.
struct EvalImage {
    /// Index into the evaluation's groups (0 = good, then the defect types).
    group: usize,
    raw_score: f32,
}

/// Evaluates `inspector` on the labelled test images of `data`:
/// image AUROC and F1-max, pixel AUROC and AUPRO, overall and per defect type, and speed. An
/// image that cannot be inspected is skipped and reported, as is a defective image without a
/// mask (for the pixel metrics only); an error only when no image at all could be inspected.
pub fn evaluate(
    inspector: &Inspector,
    data: &MvtecDataset,
    options: &EvalOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<EvalReport> {
    let t_start = Instant::now();
    // Groups: "good" first, then the defect types (sorted); the first N images of each.
    let mut group_names = vec!["good".to_string()];
    group_names.extend(data.defect_types());
    let group_of = |s: &TestSample| s.defect.as_ref().map_or(0, |d| group_names.iter().position(|g| g == d).unwrap_or(0));
    let mut seen = vec![0usize; group_names.len()];
    let mut taken = vec![0usize; group_names.len()];
    let samples: Vec<_> = data
        .test
        .iter()
        .filter(|s| {
            let g = group_of(s);
            seen[g] += 1;
            if !options.split.keeps(seen[g] - 1) {
                return false;
            }
            taken[g] += 1;
            options.limit_per_type.is_none_or(|n| taken[g] <= n)
        })
        .collect();
    if samples.is_empty() {
        return Err(no_test_images(data, "no test images (expected test/good/*.png and test/<defect>/*.png)".into()));
    }
    progress(Progress::Started { total: samples.len() });

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
    for (i, s) in samples.iter().enumerate() {
        let group = group_of(s);
        let result = imaging::load(&s.path).and_then(|image| Ok((image.dimensions(), inspector.inspect(&image)?)));
        let ((w, h), insp) = match result {
            Ok(v) => v,
            Err(e) => {
                let msg = format!("{}: {}", s.path.display(), error_chain(&e));
                progress(Progress::Skipped(&format!("{msg} (image skipped)")));
                errors.push(msg);
                progress(Progress::Image { done: i + 1, total: samples.len() });
                continue;
            }
        };
        inspect_seconds += insp.elapsed.as_secs_f64();
        images.push(EvalImage { group, raw_score: insp.raw_score });

        let (pw, ph) = eval_size(w, h, options.pixel_max_side);
        let pixel_error = match eval_mask(s, w, h, pw, ph) {
            Ok(mask) => {
                let map = insp.map().resized(pw, ph);
                for (&v, &m) in map.data().iter().zip(&mask) {
                    counted[m as usize] += 1;
                    saturated[m as usize] += u64::from(v >= 1.0);
                }
                pixels[group].add_image(map.data(), &mask, pw).err().map(|e| e.to_string())
            }
            Err(e) => Some(e),
        };
        if let Some(e) = pixel_error {
            let msg = format!("{}: {e} (pixel metrics skipped for this image)", s.path.display());
            progress(Progress::Skipped(&msg));
            errors.push(msg);
        }
        progress(Progress::Image { done: i + 1, total: samples.len() });
    }
    if images.is_empty() {
        let reason = format!("no test image could be inspected ({} errors; first: {})", errors.len(), errors[0]);
        return Err(no_test_images(data, reason));
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
    let per_defect = group_names
        .iter()
        .enumerate()
        .skip(1)
        .map(|(g, name)| {
            let (auroc, f1) = image_metrics(&images, &[0, g]);
            let px = metrics::pixel_metrics(&[&sorted[0], &sorted[g]], AUPRO_FPR_LIMIT).ok();
            let row = DefectMetrics {
                n_images: n_in(g),
                image_auroc: auroc,
                image_f1_max: f1.map(|f| f.0),
                pixel_auroc: px.map(|p| p.auroc),
                aupro: px.map(|p| p.aupro),
                n_regions: px.map(|p| p.n_regions),
            };
            (name.clone(), row)
        })
        .collect();

    let n = images.len();
    let frac = |i: usize| if counted[i] == 0 { None } else { Some(saturated[i] as f64 / counted[i] as f64) };
    Ok(EvalReport {
        model: inspector.model_id().to_string(),
        model_dir: inspector.model_dir().to_path_buf(),
        method: inspector.manifest().method(),
        data: data.root.clone(),
        device: inspector.device_name(),
        split: options.split,
        n_images: n,
        n_good: n_in(0),
        n_anomalous: n - n_in(0),
        n_failed: samples.len() - n,
        image_auroc,
        image_f1_max: image_f1.map(|f| f.0),
        image_f1_threshold_raw: image_f1.map(|f| f.1),
        image_threshold_raw: image_threshold,
        image_f1_at_threshold: f1_at_threshold,
        pixel_auroc: pixel.map(|p| p.auroc),
        aupro: pixel.map(|p| p.aupro),
        aupro_fpr_limit: AUPRO_FPR_LIMIT,
        n_pixels: pixel.map(|p| p.n_pixels),
        n_regions: pixel.map(|p| p.n_regions),
        pixel_max_side: options.pixel_max_side,
        pixel_saturated_fraction: SaturatedFraction { defect_free: frac(0), defect: frac(1) },
        per_defect,
        ms_per_image: inspect_seconds * 1e3 / n as f64,
        images_per_second: if inspect_seconds > 0.0 { n as f64 / inspect_seconds } else { 0.0 },
        wall_seconds: t_start.elapsed().as_secs_f64(),
        errors,
        notes: EVAL_NOTES.to_string(),
    })
}

/// Finds the thresholds at the best image and pixel F1 on the labelled images of `data`
/// (validation images: good and defective, with masks; not the ones evaluated on). The model
/// is left as it is: save [`CalibrationReport::after`] to apply them.
pub fn calibrate(
    inspector: &Inspector,
    data: &MvtecDataset,
    options: &CalibrateOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<CalibrationReport> {
    if data.test.is_empty() {
        return Err(no_test_images(data, "no validation images (expected test/good/*.png and test/<defect>/*.png)".into()));
    }
    let before = inspector.manifest().calibration.clone();
    let (mut image_scores, mut image_defective) = (Vec::new(), Vec::new());
    let (mut pixel_scores, mut pixel_defective) = (Vec::new(), Vec::new());
    let mut n_skipped = 0usize;
    progress(Progress::Started { total: data.test.len() });
    for (i, s) in data.test.iter().enumerate() {
        let scored = (|| -> std::result::Result<_, String> {
            let image = imaging::load(&s.path).map_err(|e| error_chain(&e))?;
            let insp = inspector.inspect(&image).map_err(|e| error_chain(&e))?;
            let (w, h) = image.dimensions();
            let (pw, ph) = eval_size(w, h, options.pixel_max_side);
            Ok((insp.raw_score, insp.map().resized(pw, ph), eval_mask(s, w, h, pw, ph)?))
        })();
        match scored {
            Ok((raw, map, mask)) => {
                image_scores.push(raw);
                image_defective.push(s.defect.is_some());
                // The map is normalised (0.5 at the current pixel threshold): back to raw scores.
                pixel_scores.extend(map.data().iter().map(|&v| 2.0 * v * before.pixel_threshold));
                pixel_defective.extend(mask);
            }
            Err(e) => {
                n_skipped += 1;
                progress(Progress::Skipped(&format!("{}: {e} (image skipped)", s.path.display())));
            }
        }
        progress(Progress::Image { done: i + 1, total: data.test.len() });
    }
    let (after, image_f1_after, pixel_f1_after) = Calibration::from_validation(
        &image_scores,
        &image_defective,
        &pixel_scores,
        &pixel_defective,
        &data.root.display().to_string(),
    )?;
    // from_validation has checked that both sets hold defects.
    let f1_at = |scores: &[f32], labels: &[bool], t: f32| metrics::f1_at(scores, labels, t).unwrap_or(0.0);
    Ok(CalibrationReport {
        data: data.root.clone(),
        n_images: image_scores.len(),
        n_skipped,
        image_f1_before: f1_at(&image_scores, &image_defective, before.image_threshold),
        pixel_f1_before: f1_at(&pixel_scores, &pixel_defective, before.pixel_threshold),
        before,
        after,
        image_f1_after,
        pixel_f1_after,
    })
}

/// A data-set error about `data`'s test images.
fn no_test_images(data: &MvtecDataset, reason: String) -> Error {
    Error::Dataset { path: data.root.clone(), reason }
}

/// `error` and each of its causes, joined by ": " (as `anyhow`'s `{:#}` writes them), so that
/// a skipped image's message says everything the command line used to.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
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
/// row-major, `true` = defect; all `false` for a good image. The error is the message to
/// report: a missing mask only costs the image its pixel metrics.
fn eval_mask(sample: &TestSample, w: u32, h: u32, pw: u32, ph: u32) -> std::result::Result<Vec<bool>, String> {
    match (&sample.defect, &sample.mask) {
        (None, _) => Ok(vec![false; pw as usize * ph as usize]),
        (Some(_), None) => Err("no ground-truth mask found under ground_truth/".into()),
        (Some(_), Some(path)) => {
            let m = load_mask(path, w, h).map_err(|e| error_chain(&e))?;
            let m =
                if (pw, ph) == (w, h) { m } else { image::imageops::resize(&m, pw, ph, image::imageops::FilterType::Nearest) };
            Ok(m.pixels().map(|p| p.0[0] > 0).collect())
        }
    }
}

/// Image AUROC and F1-max of the images in `groups` (good = negative), `None` where undefined.
fn image_metrics(images: &[EvalImage], groups: &[usize]) -> (Option<f64>, Option<(f64, f32)>) {
    let (scores, labels): (Vec<f32>, Vec<bool>) =
        images.iter().filter(|i| groups.contains(&i.group)).map(|i| (i.raw_score, i.group != 0)).unzip();
    (metrics::auroc(&scores, &labels).ok(), metrics::f1_max(&scores, &labels).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_halves_take_alternate_positions_and_all_takes_every_one() {
        let take = |split: TestSplit| (0..7).filter(|&i| split.keeps(i)).collect::<Vec<_>>();
        assert_eq!(take(TestSplit::Validation), [1, 3, 5]);
        assert_eq!(take(TestSplit::Evaluation), [0, 2, 4, 6]);
        assert_eq!(take(TestSplit::All), [0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn eval_size_scales_the_long_side_down_only() {
        assert_eq!(eval_size(200, 100, 256), (200, 100), "small images stay as they are");
        assert_eq!(eval_size(512, 256, 256), (256, 128));
        assert_eq!(eval_size(100, 1000, 256), (26, 256), "aspect kept, rounded");
        assert_eq!(eval_size(10_000, 1, 8), (8, 1), "never below one pixel");
    }

    #[test]
    fn eval_mask_is_empty_for_good_images_resized_nearest_and_an_error_without_a_file() {
        let good = TestSample { path: "good/0.png".into(), defect: None, mask: None };
        assert_eq!(eval_mask(&good, 4, 4, 2, 3).unwrap(), vec![false; 6]);
        let unmasked = TestSample { path: "crack/0.png".into(), defect: Some("crack".into()), mask: None };
        assert!(eval_mask(&unmasked, 4, 4, 4, 4).unwrap_err().contains("ground_truth/"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0_mask.png");
        // Left half defective.
        image::GrayImage::from_fn(4, 4, |x, _| image::Luma([if x < 2 { 255 } else { 0 }])).save(&path).unwrap();
        let masked = TestSample { path: "crack/0.png".into(), defect: Some("crack".into()), mask: Some(path) };
        assert_eq!(eval_mask(&masked, 4, 4, 2, 2).unwrap(), vec![true, false, true, false]);
        let missing = TestSample { mask: Some(dir.path().join("none.png")), ..masked };
        assert!(eval_mask(&missing, 4, 4, 4, 4).unwrap_err().contains("none.png"));
    }

    #[test]
    fn image_metrics_take_the_groups_asked_for_with_good_as_negative() {
        let img = |group, raw_score| EvalImage { group, raw_score };
        // Group 1 is separated from the good images, group 2 is not.
        let images = [img(0, 0.1), img(0, 0.2), img(1, 0.9), img(1, 0.8), img(2, 0.15)];
        let (auroc, f1) = image_metrics(&images, &[0, 1]);
        assert_eq!(auroc, Some(1.0));
        assert_eq!(f1, Some((1.0, 0.8)));
        let (auroc, _) = image_metrics(&images, &[0, 2]);
        assert_eq!(auroc, Some(0.5));
        assert_eq!(image_metrics(&images, &[0]), (None, None), "undefined without defects");
    }

    #[test]
    fn reports_write_f32_fields_as_the_f64_they_widen_to_and_read_back() {
        let line = PredictLine::Failed { image: "a.png".into(), error: "gone".into() };
        assert_eq!(line.to_json().unwrap(), r#"{"error":"gone","image":"a.png"}"#);
        let pred = ImagePrediction {
            image: "b.png".into(),
            score: 0.1,
            raw_score: 2.5,
            threshold: 0.5,
            is_anomalous: false,
            verdict: Verdict::Good,
            regions: vec![],
            ms: 1.0,
            heatmap: "h.png".into(),
            overlay: "o.png".into(),
        };
        let text = PredictLine::Inspected(pred.clone()).to_json().unwrap();
        assert!(text.contains(r#""score":0.10000000149011612"#) && text.contains(r#""verdict":"good""#), "{text}");
        assert_eq!(serde_json::from_str::<PredictLine>(&text).unwrap(), PredictLine::Inspected(pred));
        assert_eq!(serde_json::from_str::<PredictLine>(&line.to_json().unwrap()).unwrap(), line);
    }

    #[test]
    fn error_chain_writes_every_cause() {
        let e = Error::io("x.png", std::io::Error::new(std::io::ErrorKind::NotFound, "gone"));
        assert_eq!(error_chain(&e), "x.png: gone: gone");
    }
}
