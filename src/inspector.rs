//! One call per frame: image in, verdict + anomaly map + defect regions out. This is the whole
//! core as the node and the CLI see it; it hides tensors from them.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::RgbImage;
use tch::{Device, Kind};

use crate::config::{DeviceChoice, PostprocessConfig};
use crate::error::{catch_panic, Error, FrameFault, Result};
use crate::model_file::{self, LoadedModel};
use crate::models::ModelOutput;
use crate::postprocess::{find_regions_resized, heatmap, overlay, AnomalyMap, DefectRegion};
use crate::preprocess::Preprocessor;

/// Normalised scores are 0..1 with the calibrated threshold at one half, for maps as for images.
const NORMALISED_RANGE: (f32, f32) = (0.0, 1.0);
/// The normalised pixel score at which a pixel belongs to a defect region.
const PIXEL_THRESHOLD: f32 = 0.5;

/// A rectangle of a frame, in its pixels: the part that is inspected when only part of the
/// camera's view shows the part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roi {
    /// Left column.
    pub x: u32,
    /// Top row.
    pub y: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Roi {
    /// This part of `frame`; an error (a bad frame) when it does not lie inside it.
    pub fn crop(&self, frame: &RgbImage) -> Result<RgbImage> {
        let (w, h) = frame.dimensions();
        if u64::from(self.x) + u64::from(self.width) > u64::from(w) || u64::from(self.y) + u64::from(self.height) > u64::from(h) {
            return Err(Error::frame(
                FrameFault::RoiOutsideFrame,
                format!(
                    "roi [{}, {}, {}, {}] exceeds the {w}x{h} frame: set parameter 'roi' to a part of the frame",
                    self.x, self.y, self.width, self.height
                ),
            ));
        }
        Ok(image::imageops::crop_imm(frame, self.x, self.y, self.width, self.height).to_image())
    }
}

/// How a model is loaded and what is done with its scores, as a long-running user (the node)
/// sets it.
#[derive(Clone, Debug, PartialEq)]
pub struct InspectorOptions {
    /// Where inference runs; a GPU that cannot be used falls back to the CPU with a warning.
    pub device: DeviceChoice,
    /// Normalised image threshold (0.5 = calibrated).
    pub threshold: f32,
    /// Post-processing (minimum region area...).
    pub postprocess: PostprocessConfig,
}

/// The verdict on one image.
#[derive(Clone, Debug)]
pub struct Inspection {
    /// Normalised image score (0.5 = the model's calibrated threshold).
    pub score: f32,
    /// The model's raw score.
    pub raw_score: f32,
    /// Normalised threshold used for `is_anomalous`.
    pub threshold: f32,
    /// `score >= threshold`.
    pub is_anomalous: bool,
    /// Connected regions of the map at or over 0.5, largest first, in input-image pixels.
    pub regions: Vec<DefectRegion>,
    /// Time spent in [`Inspector::inspect`].
    pub elapsed: Duration,
    /// Normalised per-pixel scores (0.5 = pixel threshold) at the model's resolution: the frame
    /// or its ROI is brought to that size only when a picture asks for it ([`Inspection::map`]),
    /// so that a 5 MP frame's verdict does not wait for a 20 MB map.
    model_map: AnomalyMap,
    /// The inspected frame's size, and the part of it the map covers (all of it, or the ROI).
    frame_size: (u32, u32),
    area: Roi,
}

impl Inspection {
    /// Normalised per-pixel scores at the inspected frame's size (0.5 = pixel threshold; zero
    /// outside the ROI when one was inspected). Computed on each call: keep the result.
    pub fn map(&self) -> AnomalyMap {
        let a = self.area;
        let map = self.model_map.resized(a.width, a.height);
        if (a.x, a.y, a.width, a.height) == (0, 0, self.frame_size.0, self.frame_size.1) {
            return map;
        }
        // The area was checked to lie in the frame (Roi::crop), so the placement fits.
        match map.placed_in(self.frame_size.0, self.frame_size.1, a.x, a.y) {
            Ok(placed) => placed,
            Err(_) => map,
        }
    }

    /// The pictures `wanted` names (the map, the heatmap, the overlay on `frame`), from one
    /// resize of the map; nothing is computed when none is wanted.
    pub fn pictures(&self, frame: &RgbImage, wanted: PictureSet) -> Pictures {
        if !(wanted.map || wanted.heatmap || wanted.overlay) {
            return Pictures::default();
        }
        let map = self.map();
        let colours = wanted.heatmap.then(|| heatmap(&map, NORMALISED_RANGE.0, NORMALISED_RANGE.1));
        let blended =
            wanted.overlay.then(|| overlay(frame, &map, NORMALISED_RANGE.0, NORMALISED_RANGE.1, PIXEL_THRESHOLD, &self.regions));
        Pictures { map: wanted.map.then_some(map), heatmap: colours, overlay: blended }
    }
}

/// Which of a frame's pictures to draw: at 5 MP each costs milliseconds, so a node draws only
/// those someone subscribes to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PictureSet {
    /// The normalised map at the frame's size.
    pub map: bool,
    /// The map in colour.
    pub heatmap: bool,
    /// The frame with the map blended in and the regions outlined.
    pub overlay: bool,
}

impl PictureSet {
    /// All three pictures.
    pub const ALL: Self = Self { map: true, heatmap: true, overlay: true };
}

/// A frame's pictures, those a [`PictureSet`] asked for.
#[derive(Clone, Debug, Default)]
pub struct Pictures {
    /// Normalised per-pixel scores at the frame's size.
    pub map: Option<AnomalyMap>,
    /// The map in colour (turbo).
    pub heatmap: Option<RgbImage>,
    /// The frame with the map blended in and the regions outlined.
    pub overlay: Option<RgbImage>,
}

/// A loaded model with its preprocessing and post-processing.
#[derive(Debug)]
pub struct Inspector {
    loaded: LoadedModel,
    preprocessor: Preprocessor,
    postprocess: PostprocessConfig,
    threshold: f32,
    model_id: String,
    model_dir: PathBuf,
    device: Device,
}

impl Inspector {
    /// Loads the model directory `model_dir` onto `device`.
    pub fn new(model_dir: &Path, device: Device, postprocess: &PostprocessConfig) -> Result<Self> {
        let loaded = model_file::load(model_dir, device)?;
        let preprocessor = Preprocessor::new(loaded.manifest.preprocess(), device)?;
        let model_id = if loaded.manifest.name.is_empty() {
            model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        } else {
            loaded.manifest.name.clone()
        };
        Ok(Self {
            loaded,
            preprocessor,
            postprocess: postprocess.clone(),
            threshold: 0.5,
            model_id,
            model_dir: model_dir.to_path_buf(),
            device,
        })
    }

    /// Loads `model_dir` as a service that must not fail later would: the device resolved from
    /// `options` (a GPU that cannot be used is reported to `warn` and the CPU taken), the
    /// threshold and post-processing set, and the model tried on a plain grey frame, so that a
    /// model whose files load but cannot score (a memory bank of the wrong width, NaN from a
    /// damaged file) is refused now, while the caller's current model can stay. A panic inside
    /// libtorch is an error too.
    pub fn load_checked(model_dir: &Path, options: &InspectorOptions, warn: &mut dyn FnMut(String)) -> Result<Self> {
        let device = crate::device::resolve(options.device).unwrap_or_else(|e| {
            warn(format!("{e}; falling back to the CPU"));
            Device::Cpu
        });
        let mut inspector = catch_panic("model loading", || Inspector::new(model_dir, device, &options.postprocess))?;
        inspector.set_threshold(options.threshold)?;
        let probe = RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128]));
        let fault = match catch_panic("the test frame", || inspector.inspect(&probe)) {
            Ok(i) if i.raw_score.is_finite() => return Ok(inspector),
            Ok(i) => format!(
                "a plain grey test frame scores {} (not a finite number): the model files are damaged; \
                 re-fit the model or copy it again",
                i.raw_score
            ),
            Err(e) => format!(
                "fails on a plain grey test frame ({e}): the model files are damaged or do not fit together; re-fit the model"
            ),
        };
        Err(Error::model(model_dir, fault))
    }

    /// The cheap part of [`Inspector::load_checked`]: whether `model_dir` holds a readable
    /// model.json of a known method (damaged weights are only found by loading them).
    pub fn check_model_dir(model_dir: &Path) -> Result<()> {
        model_file::read_manifest(model_dir).map(|_| ())
    }

    /// The model directory this inspector was loaded from.
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// The post-processing in force.
    pub fn postprocess(&self) -> &PostprocessConfig {
        &self.postprocess
    }

    /// A one-line description of the device, for logs and diagnostics.
    pub fn device_name(&self) -> String {
        crate::device::describe(self.device)
    }

    /// Short model name reported in results.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Method name ("patchcore", "draem").
    pub fn method(&self) -> &'static str {
        self.loaded.manifest.method().as_str()
    }

    /// The device inference runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The parsed model.json.
    pub fn manifest(&self) -> &model_file::ModelManifest {
        &self.loaded.manifest
    }

    /// Normalised image threshold in force (0.5 = calibrated).
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Overrides the normalised image threshold (0..=1).
    pub fn set_threshold(&mut self, threshold: f32) -> Result<()> {
        if !(0.0..=1.0).contains(&threshold) {
            return Err(Error::Config(format!("threshold {threshold}: must be within 0..=1 (0.5 = calibrated)")));
        }
        self.threshold = threshold;
        Ok(())
    }

    /// Sets the post-processing (minimum region area...).
    pub fn set_postprocess(&mut self, postprocess: &PostprocessConfig) {
        self.postprocess = postprocess.clone();
    }

    /// What this inspector is, for a cell's logs: model directory and id, method, device, the
    /// threshold and minimum region area in force, and the model's model.json as written (its
    /// settings, calibration and training summary).
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "model_id": self.model_id,
            "model_dir": self.model_dir,
            "method": self.method(),
            "device": self.device_name(),
            "threshold": self.threshold,
            "min_region_area": self.postprocess.min_region_area,
            "model_json": serde_json::to_value(&self.loaded.manifest).unwrap_or_default(),
        })
    }

    /// The model and its preprocessor, for the stage timings of [`crate::bench`] and the studies.
    pub fn parts(&self) -> (&model_file::AnomalyModel, &Preprocessor) {
        (&self.loaded.model, &self.preprocessor)
    }

    /// Inspects `frame`, or only its `roi` when one is given, and reports in the frame's pixels
    /// either way. Returns the inspection and the pixels inspected when they are a crop (`None`:
    /// the whole frame, which is not copied). Never panics: a panic inside libtorch is an error.
    pub fn inspect_within(&self, frame: &RgbImage, roi: Option<Roi>) -> Result<(Inspection, Option<RgbImage>)> {
        catch_panic("inspection", || {
            let Some(roi) = roi else { return Ok((self.inspect(frame)?, None)) };
            let part = roi.crop(frame)?;
            let mut inspection = self.inspect(&part)?;
            inspection.frame_size = frame.dimensions();
            inspection.area = roi;
            inspection.regions = inspection.regions.iter().map(|r| r.offset(roi.x, roi.y)).collect();
            Ok((inspection, Some(part)))
        })
    }

    /// Inspects one image.
    pub fn inspect(&self, image: &RgbImage) -> Result<Inspection> {
        let t0 = Instant::now();
        let _guard = tch::no_grad_guard();
        let out = self.preprocessor.run(image, &|x| self.loaded.model.forward(x))?;
        let mut inspection = self.conclude(&out, image.width(), image.height())?;
        inspection.elapsed = t0.elapsed();
        Ok(inspection)
    }

    /// The post-processing of one frame's model output: normalised score and verdict, the map
    /// at the frame's `width` x `height`, regions (`elapsed` left at zero).
    pub(crate) fn conclude(&self, out: &ModelOutput, width: u32, height: u32) -> Result<Inspection> {
        let raw_score = out.image_scores.f_double_value(&[0])? as f32;
        let cal = &self.loaded.manifest.calibration;
        let score = cal.normalize_image(raw_score);

        // Normalise the map on the device, bring it to the CPU once, then to image size.
        let map = out
            .anomaly_maps
            .f_get(0)?
            .f_get(0)?
            .f_mul_scalar(f64::from(PIXEL_THRESHOLD) / f64::from(cal.pixel_threshold))?
            .f_clamp(f64::from(NORMALISED_RANGE.0), f64::from(NORMALISED_RANGE.1))?
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
        // The map has the network input's size (with tiles, the scaled frame's), which with
        // keep_aspect differs per frame.
        let (h, w) = (map.size()[0], map.size()[1]);
        let data = Vec::<f32>::try_from(map.f_view([-1])?)?;
        let model_map = AnomalyMap::new(w as u32, h as u32, data)?;
        let regions = find_regions_resized(&model_map, width, height, PIXEL_THRESHOLD, self.postprocess.min_region_area);
        Ok(Inspection {
            score,
            raw_score,
            threshold: self.threshold,
            is_anomalous: score >= self.threshold,
            regions,
            elapsed: Duration::ZERO,
            model_map,
            frame_size: (width, height),
            area: Roi { x: 0, y: 0, width, height },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inspection(model_map: AnomalyMap, frame_size: (u32, u32), area: Roi) -> Inspection {
        let (score, raw_score, threshold, is_anomalous) = (0.5, 1.0, 0.5, true);
        Inspection {
            score,
            raw_score,
            threshold,
            is_anomalous,
            regions: Vec::new(),
            elapsed: Duration::ZERO,
            model_map,
            frame_size,
            area,
        }
    }

    #[test]
    fn the_map_comes_at_the_frame_size_with_the_roi_in_place() {
        let ones = AnomalyMap::new(2, 2, vec![1.0; 4]).unwrap();
        let whole = inspection(ones.clone(), (8, 6), Roi { x: 0, y: 0, width: 8, height: 6 }).map();
        assert_eq!((whole.width(), whole.height()), (8, 6));
        assert!(whole.data().iter().all(|&v| v == 1.0));
        let part = inspection(ones, (8, 6), Roi { x: 4, y: 2, width: 4, height: 4 }).map();
        assert_eq!((part.width(), part.height()), (8, 6));
        assert_eq!(
            (part.get(4, 2), part.get(7, 5), part.get(3, 2), part.get(4, 1)),
            (Some(1.0), Some(1.0), Some(0.0), Some(0.0))
        );
        let frame = RgbImage::new(8, 6);
        let whole = inspection(part.clone(), (8, 6), Roi { x: 0, y: 0, width: 8, height: 6 });
        let all = whole.pictures(&frame, PictureSet::ALL);
        let sizes = (all.heatmap.map(|h| h.dimensions()), all.overlay.map(|o| o.dimensions()));
        assert_eq!((all.map, sizes), (Some(part), (Some((8, 6)), Some((8, 6)))));
        let heatmap_only = whole.pictures(&frame, PictureSet { heatmap: true, ..PictureSet::default() });
        assert!(heatmap_only.heatmap.is_some() && heatmap_only.map.is_none() && heatmap_only.overlay.is_none());
        let none = whole.pictures(&frame, PictureSet::default());
        assert!(none.map.is_none() && none.heatmap.is_none() && none.overlay.is_none());
    }
}
