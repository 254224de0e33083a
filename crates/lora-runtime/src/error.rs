//! The one error type of the `lora-runtime` crate: what running a task can fail on (checkpoints,
//! images, hub, devices, data-parallel peers, non-finite steps, weight files), plus every
//! adapter-library error unchanged ([`Error::Adapter`]).
use std::path::PathBuf;

/// Errors of the runtime. Every variant names the file, key, device or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error of the adapter library (configs, adapter files, merges), passed on as it is.
    #[error(transparent)]
    Adapter(#[from] serial_lora::Error),
    /// A setting (training or launch flag) is out of range.
    #[error("invalid setting: `{field}` = {value}: {reason}")]
    InvalidConfig { field: &'static str, value: String, reason: String },
    /// A training checkpoint or run directory is unusable.
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// An image file cannot be decoded.
    #[error("{path}: {message}")]
    Image { path: PathBuf, message: String },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON or TOML file could not be parsed.
    #[error("{path}: malformed {format}: {message}")]
    Parse { path: PathBuf, format: &'static str, message: String },
    /// A safetensors file is malformed or a tensor in it has the wrong dtype.
    #[error("{path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// A checkpoint does not fit the model it is loaded into.
    #[error("{path}: weights do not fit the model:\n{report}")]
    WeightsMismatch { path: PathBuf, report: String },
    /// A model given by hub id could not be resolved.
    #[error("model `{id}`: {message}")]
    Hub { id: String, message: String },
    /// A training step produced a non-finite loss or gradient; the step's update was not
    /// applied and nothing from it was saved.
    #[error(
        "training stopped at step {step}: {what} is not finite; the update of this step was not applied and nothing \
         from it was written (the run directory keeps its last good checkpoint); start a new run with a lower --lr, or check the inputs"
    )]
    NonFinite { step: usize, what: String },
    /// The requested device is unknown or its backend is not compiled in.
    #[error("device `{device}`: {message}")]
    Device { device: String, message: String },
    /// An output file's directory does not exist (refused before any work).
    #[error("{flag} {}: directory {} does not exist", path.display(), dir.display())]
    OutputDir { flag: &'static str, path: PathBuf, dir: PathBuf },
    /// A collective operation of data-parallel training failed.
    #[error("data-parallel peer {rank}: {message}")]
    Collective { rank: usize, message: String },
}

impl Error {
    /// Reading or writing `path` failed.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// An invalid setting: `field` = `value`, and why.
    pub fn config(field: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::InvalidConfig { field, value: value.to_string(), reason: reason.into() }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
