use std::path::PathBuf;

/// Errors of the embedding crate. Every variant names the file or the shape involved and,
/// where there is one, what the user can do about it.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file could not be read.
    #[error("cannot read {path}: {source}; check that the encoder directory is complete (run `ragtune fetch` for the default model)")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A required file of the encoder directory is missing.
    #[error("missing {path}: an encoder directory needs config.json, tokenizer.json and model.safetensors (run `ragtune fetch` for the default model)")]
    MissingFile {
        /// The file that is missing.
        path: PathBuf,
    },
    /// A configuration file does not parse or has values this crate cannot use.
    #[error("invalid {path}: {detail}")]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The model is not a BERT-family encoder this crate supports.
    #[error("unsupported model in {path}: {detail}")]
    Unsupported {
        /// The model directory or file.
        path: PathBuf,
        /// What is not supported.
        detail: String,
    },
    /// The tokenizer failed on an input.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A tensor operation failed (shapes, dtypes, missing weights in the safetensors file).
    #[error("model error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A chunking parameter is out of range.
    #[error("invalid chunking parameters: {0}")]
    InvalidChunking(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
