//! Anomaly models: feature extractors ([`backbone`]) and the detectors built on them
//! ([`patchcore`], [`draem`] with its anomaly simulator [`perlin`]).
pub mod backbone;
pub mod draem;
pub mod patchcore;
pub mod perlin;

use tch::Tensor;

/// What every model gives for a batch, whatever the method.
#[derive(Debug)]
pub struct ModelOutput {
    /// `[N]` raw image scores (larger = more anomalous).
    pub image_scores: Tensor,
    /// `[N, 1, H, W]` raw anomaly maps at network-input size.
    pub anomaly_maps: Tensor,
}
