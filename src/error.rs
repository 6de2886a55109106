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
    /// A camera frame cannot be used. `fault` says which rule it broke (the node logs each
    /// kind once and counts it in diagnostics), `message` the details.
    #[error("bad frame ({fault}): {message}")]
    Frame {
        /// Which rule the frame broke.
        fault: FrameFault,
        /// The details: the lying field, its value, what was expected.
        message: String,
    },
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
    /// An operator's label cannot be stored (bad defect type, area outside the frame...).
    #[error("bad label: {0}")]
    Label(String),
    /// Long work (a fit) was cancelled by its caller; the reason says where it stopped.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// libtorch reported an error (shape mismatch, out of memory, missing CUDA...).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Why a camera frame (sensor_msgs/Image or CompressedImage) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrameFault {
    /// The pixel encoding is not one the node converts.
    UnsupportedEncoding,
    /// Width or height is zero.
    ZeroSize,
    /// The frame exceeds the size limits (refused before anything is allocated).
    TooLarge,
    /// `step` is shorter than one row of pixels.
    StepTooSmall,
    /// `data` is shorter than `height` rows of `step` bytes.
    DataTooShort,
    /// A float frame holds NaN or infinite samples.
    NonFinite,
    /// A float frame holds samples far outside the 0..1 intensity range (wrong scale or
    /// wrong `is_bigendian`).
    OutOfRange,
    /// A CompressedImage `format` that is neither JPEG nor PNG.
    UnknownFormat,
    /// Compressed data cut short.
    Truncated,
    /// Compressed data that does not decode.
    Corrupt,
    /// The region of interest does not fit in the frame.
    RoiOutsideFrame,
}

impl FrameFault {
    /// A short snake_case name, used in logs and as the diagnostics key `rejected_<name>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnsupportedEncoding => "unsupported_encoding",
            Self::ZeroSize => "zero_size",
            Self::TooLarge => "too_large",
            Self::StepTooSmall => "step_too_small",
            Self::DataTooShort => "data_too_short",
            Self::NonFinite => "non_finite",
            Self::OutOfRange => "out_of_range",
            Self::UnknownFormat => "unknown_format",
            Self::Truncated => "truncated",
            Self::Corrupt => "corrupt",
            Self::RoiOutsideFrame => "roi_outside_frame",
        }
    }
}

impl std::fmt::Display for FrameFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    /// An [`Error::Frame`].
    pub fn frame(fault: FrameFault, message: impl Into<String>) -> Self {
        Error::Frame { fault, message: message.into() }
    }
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// An [`Error::Model`] for `path`.
    pub fn model(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Model { path: path.into(), reason: reason.into() }
    }

    /// A short snake_case name of the kind of error: the [`FrameFault`] of a bad frame, else the
    /// variant (`model`, `inference`, ...). The node logs the first error of each kind and
    /// counts the rest under this name.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Frame { fault, .. } => fault.as_str(),
            Error::BadImage(_) => "bad_image",
            Error::Decode(_) => "decode",
            Error::Io { .. } => "io",
            Error::Model { .. } => "model",
            Error::Config(_) => "config",
            Error::Dataset { .. } => "dataset",
            Error::Label(_) => "label",
            Error::Cancelled(_) => "cancelled",
            Error::Torch(_) => "inference",
        }
    }
}

/// Runs `f`, turning a panic (a bug in a decoder or in libtorch) into an error that names `what`
/// was running, so that one frame can never take a long-running caller (the node) down.
pub fn catch_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::Torch(tch::TchError::Torch(format!("internal error in {what}: {why}"))))
    })
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_that_names_the_work() {
        let err = catch_panic("the test frame", || -> Result<()> { panic!("boom") }).unwrap_err();
        assert_eq!(err.kind(), "inference");
        assert!(err.to_string().contains("internal error in the test frame: boom"), "{err}");
        assert_eq!(catch_panic("nothing", || Ok(3)).unwrap(), 3);
        let frame = Error::frame(FrameFault::DataTooShort, "5 bytes");
        assert_eq!(frame.kind(), "data_too_short");
    }
}
