//! Errors a user can cause: files, tensors, shapes, arguments.
//!
//! Every variant names the file or tensor it is about. `panic!` is kept for broken
//! invariants inside the crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed safetensors: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: malformed JSON: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor { path: PathBuf, tensor: String, msg: String },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("invalid argument: {0}")]
    Arg(String),
    #[error("adapter mismatch: {0}")]
    Mismatch(String),
    /// A kernel launch or the device behind it failed.
    #[error(transparent)]
    Kernel(#[from] crate::kernels::KernelError),
    #[error("bad input: {0}")]
    Input(String),
    /// The compute device: no usable GPU for `--device cuda`, or a kernel launch that failed.
    #[error("device: {0}")]
    Device(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
