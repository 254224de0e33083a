//! Errors of the `sd3-gen` crate.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Sd3Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid SD3 config: {message}")]
    Config { path: PathBuf, message: String },
    /// A dataset folder, caption or image is unusable (the file and line are named).
    #[error("{path}: {message}")]
    Dataset { path: PathBuf, message: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Adapter(#[from] serial_lora::Error),
    #[error(transparent)]
    Runtime(#[from] lora_runtime::Error),
}

pub type Result<T, E = Sd3Error> = std::result::Result<T, E>;
