//! Errors of the `clip-cls` crate.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid CLIP config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Dataset { path: PathBuf, message: String },
    #[error(transparent)]
    Adapter(#[from] serial_lora::Error),
    #[error(transparent)]
    Runtime(#[from] lora_runtime::Error),
}

pub type Result<T, E = ClipError> = std::result::Result<T, E>;
