//! The one error type of the `serial-lora` crate.
use std::path::PathBuf;

/// Errors of the adapter library. Every variant names the file, key, module or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting (adapter configuration, training or launch flag) is out of range.
    #[error("invalid setting: `{field}` = {value}: {reason}")]
    InvalidConfig { field: &'static str, value: String, reason: String },
    /// A target selection matched no module of the model.
    #[error("adapter target matches nothing: {0}")]
    TargetMatchesNothing(String),
    /// A training checkpoint or run directory is unusable.
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// An image file cannot be decoded.
    #[error("{path}: {message}")]
    Image { path: PathBuf, message: String },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, #[source] source: std::io::Error },
    /// A JSON or TOML file could not be parsed.
    #[error("{path}: malformed {format}: {message}")]
    Parse { path: PathBuf, format: &'static str, message: String },
    /// A safetensors file is malformed or a tensor in it has the wrong dtype.
    #[error("{path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// An adapter file does not fit the model it is loaded into.
    #[error("{path}: adapter does not fit the model:\n{report}")]
    AdapterMismatch { path: PathBuf, report: String },
    /// A checkpoint does not fit the model it is loaded into.
    #[error("{path}: weights do not fit the model:\n{report}")]
    WeightsMismatch { path: PathBuf, report: String },
    /// Merging would write non-finite weights.
    #[error("merge refused: `{module}` would get non-finite weights")]
    NonFiniteMerge { module: String },
    /// Merging or unmerging a module in the wrong state.
    #[error("`{module}`: {message}")]
    MergeState { module: String, message: &'static str },
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
    /// A collective operation of data-parallel training failed.
    #[error("data-parallel peer {rank}: {message}")]
    Collective { rank: usize, message: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// An invalid setting: `field` = `value`, and why.
    pub fn config(field: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::InvalidConfig { field, value: value.to_string(), reason: reason.into() }
    }
    /// Prefixes the module name of a merge error with the path of its parent module.
    pub fn in_module(self, parent: &str) -> Self {
        match self {
            Error::NonFiniteMerge { module } => Error::NonFiniteMerge { module: format!("{parent}.{module}") },
            Error::MergeState { module, message } => Error::MergeState { module: format!("{parent}.{module}"), message },
            other => other,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
