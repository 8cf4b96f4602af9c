//! Errors of the trainer. Every variant says what went wrong and, where the user can fix it,
//! what to do.

use std::path::PathBuf;

/// What can go wrong while preparing data, training or checkpointing.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line of a JSONL dataset is not a `{"messages": [...]}` object.
    #[error(
        "{path}:{line}: {message} (each line must be a JSON object \
         {{\"messages\": [{{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": \"...\"}}, ...]}})"
    )]
    DataLine {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// No usable example: the file is empty, or every example was skipped.
    #[error("{0}")]
    EmptyDataset(String),
    /// A configuration value is out of range.
    #[error("invalid training configuration: {0}")]
    Config(String),
    /// A checkpoint cannot be resumed (missing, corrupt, or for another base model or
    /// configuration).
    #[error("cannot resume from {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An error of the generation crate (GGUF, tokenizer, chat template, adapter files).
    #[error(transparent)]
    Generate(#[from] ragtune_generate::Error),
    /// A tensor operation failed (a shape bug, or out of memory).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
