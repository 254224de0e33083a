//! The one error type of the `serial-lora` crate.
use std::path::PathBuf;

/// Errors of the adapter library. Every variant names the file, key, module or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting (adapter configuration) is out of range.
    #[error("invalid setting: `{field}` = {value}: {reason}")]
    InvalidConfig { field: &'static str, value: String, reason: String },
    /// A target selection matched no module of the model.
    #[error("adapter target matches nothing: {0}")]
    TargetMatchesNothing(String),
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
    /// An adapter file does not fit the model it is loaded into.
    #[error("{path}: adapter does not fit the model:\n{report}")]
    AdapterMismatch { path: PathBuf, report: String },
    /// Merging would write non-finite weights.
    #[error("merge refused: `{module}` would get non-finite weights")]
    NonFiniteMerge { module: String },
    /// Merging or unmerging a module in the wrong state.
    #[error("`{module}`: {message}")]
    MergeState { module: String, message: &'static str },
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
