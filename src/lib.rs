//! anomaly_inspector: surface anomaly detection (PatchCore, DRAEM) for ROS 2 inspection cells.
//!
//! Data flows through the modules in this order (see ARCHITECTURE.md): [`imaging`] (decode,
//! convert) -> preprocess -> models (backbone, PatchCore, DRAEM) -> postprocess (anomaly map,
//! regions, heatmaps) -> [`Inspector`] (one call per frame) -> `ros` (topics, parameters;
//! behind the `ros` feature). The core knows nothing of ROS. Fitting and evaluating are in
//! [`training`], [`evaluation`] and [`metrics`]; a model on disk is a [`model_file`]; the
//! command line's grammar is [`cli`].
#![warn(missing_docs)]

// The library's public modules: what the binaries, the whole-flow tests and a user who trains on
// a workstation call. Everything else is reached through the re-exports below.
pub mod bench;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod device;
pub mod evaluation;
pub mod imaging;
pub mod labels;
pub mod metrics;
pub mod model_file;
pub mod self_check;
pub mod synthetic;
pub mod training;

mod camera;
mod error;
mod inspector;
mod postprocess;

// The models and their preprocessing are internals; the measurement studies in examples/ (and
// nobody else) see them through the `studies` feature.
#[cfg(feature = "studies")]
pub mod models;
#[cfg(not(feature = "studies"))]
mod models;
#[cfg(feature = "studies")]
pub mod preprocess;
#[cfg(not(feature = "studies"))]
mod preprocess;

#[cfg(feature = "ros")]
pub mod ros;

pub use camera::{PinholeCamera, Plane};
pub use config::{
    BackboneConfig, BackboneKind, CoresetConfig, DeviceChoice, MapSmoothing, Normalization, PatchCoreConfig, PostprocessConfig,
    Precision, PreprocessConfig, Resize, Search,
};
pub use device::{load_cuda_backend, set_precision, InferenceThread, ThreadGovernor};
pub use error::{catch_panic, Error, FrameFault, Result};
pub use imaging::{PixelEncoding, RawImage};
pub use inspector::{Inspection, Inspector, InspectorOptions, PictureSet, Pictures, Roi};
pub use labels::{DefectArea, LabelCounts, LabelStore, StoredLabel, Verdict, DEFAULT_DEFECT_TYPE};
pub use model_file::Method;
pub use models::patchcore::{MemoryBank, PatchCore};
pub use postprocess::{AnomalyMap, DefectRegion};

/// The checkout this crate was built from (models/, config/ and the venv live there).
pub fn project_root() -> std::path::PathBuf {
    std::env::var_os("ANOMALY_INSPECTOR_ROOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
