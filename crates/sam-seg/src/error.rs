//! Errors of the `sam-seg` crate.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SamError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid SAM config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Dataset { path: PathBuf, message: String },
    #[error("invalid prompt: {0}")]
    Prompt(String),
    #[error(transparent)]
    Adapter(#[from] serial_lora::Error),
    #[error(transparent)]
    Runtime(#[from] lora_runtime::Error),
}

pub type Result<T, E = SamError> = std::result::Result<T, E>;
