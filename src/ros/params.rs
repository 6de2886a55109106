//! Node parameters, declared up front with descriptions (`ros2 param describe` shows them).
use r2r::RosParams;

use crate::config::{DeviceChoice, PostprocessConfig};
use crate::error::{Error, Result};

/// Raw ROS parameters as the user sets them (`--ros-args -p`, a params file, or at run time).
#[derive(Clone, Debug, RosParams)]
pub struct NodeParams {
    /// Model directory (written by `anomaly_inspector fit`). Relative paths are resolved against
    /// the working directory. Changing it at run time reloads the model.
    pub model: String,
    /// Inference device: auto, cpu or cuda. Read at start-up.
    pub device: String,
    /// Normalised image-score threshold for is_anomalous (0.5 = the model's calibrated threshold).
    pub threshold: f64,
    /// Defect regions smaller than this many pixels are not reported.
    pub min_region_area: i64,
    /// Publish the colour heatmap and overlay images (turn off to save bandwidth).
    pub publish_images: bool,
}

impl Default for NodeParams {
    fn default() -> Self {
        Self {
            model: crate::project_root().join("models/demo_patchcore").to_string_lossy().into_owned(),
            device: "auto".into(),
            threshold: 0.5,
            min_region_area: PostprocessConfig::default().min_region_area as i64,
            publish_images: true,
        }
    }
}

/// Parameters parsed and checked: what the node actually uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Model directory.
    pub model: std::path::PathBuf,
    /// Inference device.
    pub device: DeviceChoice,
    /// Normalised threshold.
    pub threshold: f32,
    /// Post-processing.
    pub postprocess: PostprocessConfig,
    /// Whether heatmap/overlay images are published.
    pub publish_images: bool,
}

impl NodeParams {
    /// Parses and range-checks every value (parse at the boundary).
    pub fn settings(&self) -> Result<Settings> {
        let device: DeviceChoice = self.device.parse()?;
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::Config(format!("threshold {}: must be within 0..=1", self.threshold)));
        }
        if self.min_region_area < 0 || self.min_region_area > u32::MAX as i64 {
            return Err(Error::Config(format!("min_region_area {}: must be >= 0", self.min_region_area)));
        }
        if self.model.trim().is_empty() {
            return Err(Error::Config("model is empty: set it to a model directory".into()));
        }
        Ok(Settings {
            model: self.model.clone().into(),
            device,
            threshold: self.threshold as f32,
            postprocess: PostprocessConfig { min_region_area: self.min_region_area as u32 },
            publish_images: self.publish_images,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_refused() {
        let p = NodeParams::default();
        let s = p.settings().unwrap();
        assert_eq!(s.device, DeviceChoice::Auto);
        assert_eq!(s.threshold, 0.5);
        assert!(NodeParams { threshold: 1.5, ..p.clone() }.settings().is_err());
        assert!(NodeParams { device: "tpu".into(), ..p.clone() }.settings().is_err());
        assert!(NodeParams { min_region_area: -1, ..p.clone() }.settings().is_err());
        assert!(NodeParams { model: " ".into(), ..p }.settings().is_err());
    }
}
