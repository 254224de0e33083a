//! Errors of the `sd3-gen` crate.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Sd3Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, #[source] source: std::io::Error },
    #[error("{path}: invalid SD3 config: {message}")]
    Config { path: PathBuf, message: String },
    /// A dataset folder, caption or image is unusable (the file and line are named).
    #[error("{path}: {message}")]
    Dataset { path: PathBuf, message: String },
    /// Training produced a non-finite loss; the run directory keeps the last good checkpoint.
    #[error("{run_dir}: non-finite loss {loss} at step {step} (the checkpoint there is the last good one; lower --lr or check the data)")]
    NonFiniteLoss { run_dir: PathBuf, step: usize, loss: f32 },
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Adapter(#[from] serial_lora::Error),
}

pub type Result<T, E = Sd3Error> = std::result::Result<T, E>;
