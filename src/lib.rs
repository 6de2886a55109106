//! anomaly_inspector: surface anomaly detection (PatchCore, DRAEM) for ROS 2 inspection cells.
//!
//! Data flows through the modules in this order (see ARCHITECTURE.md):
//! [`imaging`] (decode, convert) -> [`preprocess`] -> [`models`] (backbone, patchcore)
//! -> [`postprocess`] (anomaly map, regions, heatmaps) -> [`inspector`] (one call per frame)
//! -> `ros` (topics, parameters; behind the `ros` feature). The core knows nothing of ROS.
#![warn(missing_docs)]

pub mod bench;
pub mod camera;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod device;
pub mod error;
pub mod evaluation;
pub mod imaging;
pub mod inspector;
pub mod metrics;
pub mod model_file;
pub mod models;
pub mod postprocess;
pub mod preprocess;
pub mod synthetic;
pub mod training;

#[cfg(feature = "ros")]
pub mod ros;

pub use config::{
    BackboneConfig, BackboneKind, DeviceChoice, Normalization, PatchCoreConfig, PostprocessConfig, PreprocessConfig, Resize,
};
pub use error::{Error, Result};
pub use imaging::{PixelEncoding, RawImage};
pub use inspector::{Inspection, Inspector};
pub use models::patchcore::{MemoryBank, PatchCore};
pub use postprocess::{AnomalyMap, DefectRegion};

/// The checkout this crate was built from (models/, config/ and the venv live there).
pub fn project_root() -> std::path::PathBuf {
    std::env::var_os("ANOMALY_INSPECTOR_ROOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
