//! Anomaly models: feature extractors ([`backbone`]) and the detectors built on them
//! ([`patchcore`] with its memory-bank selection [`coreset`] and approximate search
//! [`bank_index`], [`draem`] with its anomaly simulator [`perlin`], and [`supersimplenet`]
//! on frozen features).
pub mod backbone;
pub mod bank_index;
pub mod coreset;
pub mod draem;
mod layers;
pub mod patchcore;
pub mod perlin;
pub mod supersimplenet;

use tch::Tensor;

/// What every model gives for a batch, whatever the method.
#[derive(Debug)]
pub struct ModelOutput {
    /// `[N]` raw image scores (larger = more anomalous).
    pub image_scores: Tensor,
    /// `[N, 1, H, W]` raw anomaly maps at network-input size.
    pub anomaly_maps: Tensor,
}
