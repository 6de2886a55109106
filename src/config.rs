//! Typed configuration with every default in one place. The same structs are read from
//! `config/*.yaml` parameters (node) and from command-line options (CLI), and stored inside
//! each model file so that a model knows how it was built.
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Where inference runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// CUDA when a CUDA libtorch and a GPU are present, else CPU.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// The first CUDA GPU; an error when there is none.
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" | "cuda:0" => Ok(Self::Cuda),
            other => Err(Error::Config(format!("device '{other}': use auto, cpu or cuda"))),
        }
    }
}

/// Which feature extractor a PatchCore model uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneKind {
    /// Native EfficientNet-Lite0 with ImageNet weights (the default; ships with the set-up).
    #[default]
    EfficientnetLite0,
    /// Any TorchScript module whose `forward(x)` returns a tensor, or a tuple/list of tensors.
    Torchscript,
}

/// The feature extractor and the layers PatchCore takes features from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackboneConfig {
    /// Network family.
    pub kind: BackboneKind,
    /// Layers to take features from, shallow to deep. EfficientNet-Lite0: `stage1`..`stage7`
    /// (strides 2, 4, 8, 16, 16, 32, 32). TorchScript: output indices `0`, `1`, ...
    pub layers: Vec<String>,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self { kind: BackboneKind::EfficientnetLite0, layers: vec!["stage3".into(), "stage5".into()] }
    }
}

/// Pixel normalisation applied after scaling to 0..1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// ImageNet mean/std (torchvision convention).
    #[default]
    Imagenet,
    /// (x - 127) / 128 on 0..255 values (the TensorFlow EfficientNet-Lite convention).
    Symmetric,
}

/// How a camera frame becomes a network input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreprocessConfig {
    /// Network input size `[height, width]`; frames are resized (not cropped) to it.
    pub image_size: [u32; 2],
    /// Pixel normalisation.
    pub normalization: Normalization,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self { image_size: [256, 256], normalization: Normalization::Imagenet }
    }
}

/// PatchCore settings (Roth et al., "Towards Total Recall in Industrial Anomaly Detection").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PatchCoreConfig {
    /// Feature extractor and layers.
    pub backbone: BackboneConfig,
    /// Input size and normalisation.
    pub preprocess: PreprocessConfig,
    /// Side of the local neighbourhood averaged around each patch (paper: 3).
    pub neighbourhood: i64,
    /// Fraction of training patches kept in the memory bank by greedy k-center coreset (0..=1).
    pub coreset_ratio: f64,
    /// Upper bound on memory-bank rows, whatever the ratio gives (bounds memory and kNN cost).
    pub max_bank_size: usize,
    /// Dimension of the random projection the coreset selection runs in.
    pub coreset_projection_dim: i64,
    /// Neighbours used for the paper's image-score reweighting.
    pub num_neighbors: i64,
    /// Standard deviation (input pixels) of the Gaussian that smooths the anomaly map.
    pub blur_sigma: f64,
    /// Seed of every random choice (projection, coreset start), for reproducible models.
    pub seed: u64,
}

impl Default for PatchCoreConfig {
    fn default() -> Self {
        Self {
            backbone: BackboneConfig::default(),
            preprocess: PreprocessConfig::default(),
            neighbourhood: 3,
            coreset_ratio: 0.1,
            max_bank_size: 40_000,
            coreset_projection_dim: 128,
            num_neighbors: 9,
            blur_sigma: 4.0,
            seed: 0,
        }
    }
}

impl PatchCoreConfig {
    /// Checks ranges; call at the boundary (CLI, model file, parameters).
    pub fn validate(&self) -> Result<()> {
        let [h, w] = self.preprocess.image_size;
        if !(32..=2048).contains(&h) || !(32..=2048).contains(&w) {
            return Err(Error::Config(format!("image_size {h}x{w}: each side must be 32..=2048")));
        }
        if !(self.coreset_ratio > 0.0 && self.coreset_ratio <= 1.0) {
            return Err(Error::Config(format!("coreset_ratio {}: must be in (0, 1]", self.coreset_ratio)));
        }
        if self.neighbourhood < 1 || self.neighbourhood % 2 == 0 {
            return Err(Error::Config(format!("neighbourhood {}: must be odd and >= 1", self.neighbourhood)));
        }
        if self.backbone.layers.is_empty() {
            return Err(Error::Config("backbone.layers is empty: name at least one layer".into()));
        }
        if self.num_neighbors < 1 || self.max_bank_size < 1 || self.coreset_projection_dim < 1 {
            return Err(Error::Config("num_neighbors, max_bank_size and coreset_projection_dim must be >= 1".into()));
        }
        if !(self.blur_sigma >= 0.0) {
            return Err(Error::Config(format!("blur_sigma {}: must be >= 0", self.blur_sigma)));
        }
        Ok(())
    }
}

/// Post-processing: anomaly map to defect regions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostprocessConfig {
    /// Regions smaller than this many input-image pixels are ignored.
    pub min_region_area: u32,
}

impl Default for PostprocessConfig {
    fn default() -> Self {
        Self { min_region_area: 25 }
    }
}

/// Default location of the converted ImageNet EfficientNet-Lite0 weights (made by the set-up).
pub fn default_backbone_weights() -> PathBuf {
    crate::project_root().join("models/efficientnet_lite0.safetensors")
}
