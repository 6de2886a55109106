//! Anomaly models: feature extractors ([`backbone`]) and the detectors built on them.
pub mod backbone;
pub mod patchcore;
