//! The library's error type. Every variant says what went wrong and, where it can, what to do.
use std::path::PathBuf;

/// Errors of the anomaly_inspector core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input image could not be used (bad encoding, lying size fields, truncated data...).
    #[error("bad image: {0}")]
    BadImage(String),
    /// A compressed image or image file could not be decoded.
    #[error("cannot decode image: {0}")]
    Decode(String),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A model file is missing, broken or of an unsupported version.
    #[error("model {}: {reason}", path.display())]
    Model {
        /// The model file or directory.
        path: PathBuf,
        /// What is wrong with it and what to do.
        reason: String,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A data set folder does not follow the MVTec AD layout.
    #[error("data set {}: {reason}", path.display())]
    Dataset {
        /// The data set root.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// libtorch reported an error (shape mismatch, out of memory, missing CUDA...).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// An [`Error::Model`] for `path`.
    pub fn model(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Model { path: path.into(), reason: reason.into() }
    }
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
