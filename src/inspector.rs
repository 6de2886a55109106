//! One call per frame: image in, verdict + anomaly map + defect regions out. This is the whole
//! core as the node and the CLI see it; it hides tensors from them.
use std::path::Path;
use std::time::{Duration, Instant};

use image::RgbImage;
use tch::{Device, Kind};

use crate::config::PostprocessConfig;
use crate::error::{Error, Result};
use crate::model_file::{self, LoadedModel};
use crate::models::ModelOutput;
use crate::postprocess::{find_regions, AnomalyMap, DefectRegion};
use crate::preprocess::Preprocessor;

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
    /// Normalised per-pixel scores at the input image's size (0.5 = pixel threshold).
    pub map: AnomalyMap,
    /// Connected regions of `map >= 0.5`, largest first, in input-image pixels.
    pub regions: Vec<DefectRegion>,
    /// Time spent in [`Inspector::inspect`].
    pub elapsed: Duration,
}

/// A loaded model with its preprocessing and post-processing.
#[derive(Debug)]
pub struct Inspector {
    loaded: LoadedModel,
    preprocessor: Preprocessor,
    postprocess: PostprocessConfig,
    threshold: f32,
    model_id: String,
    device: Device,
}

impl Inspector {
    /// Loads the model directory `model_dir` onto `device`.
    pub fn new(model_dir: &Path, device: Device, postprocess: &PostprocessConfig) -> Result<Self> {
        let loaded = model_file::load(model_dir, device)?;
        let preprocessor = Preprocessor::new(loaded.manifest.preprocess()?, device)?;
        let model_id = if loaded.manifest.name.is_empty() {
            model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        } else {
            loaded.manifest.name.clone()
        };
        Ok(Self { loaded, preprocessor, postprocess: postprocess.clone(), threshold: 0.5, model_id, device })
    }

    /// Short model name reported in results.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Method name ("patchcore", "draem").
    pub fn method(&self) -> &'static str {
        self.loaded.manifest.method.as_str()
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

    /// The model and its preprocessor, for the stage timings of [`crate::bench`].
    pub(crate) fn parts(&self) -> (&model_file::AnomalyModel, &Preprocessor) {
        (&self.loaded.model, &self.preprocessor)
    }

    /// Inspects one image.
    pub fn inspect(&self, image: &RgbImage) -> Result<Inspection> {
        let t0 = Instant::now();
        let _guard = tch::no_grad_guard();
        let x = self.preprocessor.frame(image)?;
        let out = self.loaded.model.forward(&x)?;
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
            .f_mul_scalar(0.5 / cal.pixel_threshold as f64)?
            .f_clamp(0.0, 1.0)?
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
        // The map has the network input's size, which with keep_aspect differs per frame.
        let (h, w) = (map.size()[0], map.size()[1]);
        let data = Vec::<f32>::try_from(map.f_view([-1])?)?;
        let map = AnomalyMap::new(w as u32, h as u32, data)?.resized(width, height);
        let regions = find_regions(&map, 0.5, self.postprocess.min_region_area);
        Ok(Inspection {
            score,
            raw_score,
            threshold: self.threshold,
            is_anomalous: score >= self.threshold,
            map,
            regions,
            elapsed: Duration::ZERO,
        })
    }
}
