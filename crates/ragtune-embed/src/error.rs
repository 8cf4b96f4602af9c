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
    /// The `tokenizers` crate failed to configure the tokenizer or to encode an input.
    #[error(
        "tokenizer error while {operation}: {source}; check that tokenizer.json belongs to \
         the encoder (run `ragtune fetch` for the default model)"
    )]
    Tokenizer {
        /// What was being done, e.g. "encoding a text" or "setting the truncation".
        operation: &'static str,
        /// The error from `tokenizers`.
        #[source]
        source: tokenizers::Error,
    },
    /// A token sequence given to the model is longer than its position table, or its token
    /// and type ids differ in number.
    #[error(
        "a sequence of {tokens} token ids and {type_ids} type ids for a model of \
         {max_positions} positions: give one type id per token and at most {max_positions} \
         tokens (truncate the input)"
    )]
    InvalidSequence {
        /// Token ids in the sequence.
        tokens: usize,
        /// Type ids in the sequence.
        type_ids: usize,
        /// The model's position-table size.
        max_positions: usize,
    },
    /// A token id or type id is outside the model's embedding tables.
    #[error(
        "token id {id} (vocabulary of {vocab_size}) or type id {type_id} (of {type_vocab_size}) \
         is out of range: tokenizer.json does not belong to this model's weights"
    )]
    TokenOutOfRange {
        /// The token id.
        id: u32,
        /// Its type id.
        type_id: u32,
        /// Rows of the word-embedding table.
        vocab_size: usize,
        /// Rows of the token-type table.
        type_vocab_size: usize,
    },
    /// A tensor operation failed (shapes, dtypes, missing weights in the safetensors file).
    #[error("model error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The chunking parameters are out of range (`max_tokens == 0` or
    /// `overlap_tokens >= max_tokens`).
    #[error(
        "invalid chunking parameters: need 0 <= overlap_tokens < max_tokens, got max_tokens \
         {max_tokens} and overlap_tokens {overlap_tokens}"
    )]
    InvalidChunking {
        /// `ChunkParams::max_tokens` as given.
        max_tokens: usize,
        /// `ChunkParams::overlap_tokens` as given.
        overlap_tokens: usize,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
