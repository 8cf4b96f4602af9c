//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in `ragtune-generate`.
///
/// Variants name what was involved: the file path, the GGUF metadata key, the token id or the
/// shape that did not fit.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A file is not a GGUF file candle can parse (bad magic, truncated, unknown value type).
    #[error("{path}: not a readable GGUF file: {source}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// candle's parse error.
        source: candle_core::Error,
    },

    /// A required GGUF metadata key is absent.
    #[error("GGUF metadata: required key `{key}` is missing")]
    MissingKey {
        /// The metadata key, e.g. `llama.context_length`.
        key: String,
    },

    /// A GGUF metadata value has the wrong type (e.g. a string where an integer is expected).
    #[error("GGUF metadata: key `{key}` should be {expected}, found {found}")]
    KeyType {
        /// The metadata key.
        key: String,
        /// What was expected, in words ("an unsigned integer").
        expected: &'static str,
        /// The GGUF value type found.
        found: String,
    },

    /// A GGUF metadata value has the right type but an invalid value (zero heads, a head
    /// count that does not divide the embedding, an unknown RoPE scaling type, ...).
    #[error("GGUF metadata: key `{key}`: {detail}")]
    InvalidValue {
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        detail: String,
    },

    /// The GGUF file is for an architecture this crate does not run.
    #[error("GGUF metadata: unsupported architecture `{found}` (this crate runs `llama`)")]
    UnsupportedArchitecture {
        /// The value of `general.architecture`.
        found: String,
    },

    /// A special token id (BOS, EOS, padding, ...) is not a valid index into the vocabulary.
    #[error(
        "GGUF metadata: `{key}` = {id} is out of range for a vocabulary of {vocab_size} tokens"
    )]
    TokenOutOfRange {
        /// The metadata key holding the id.
        key: String,
        /// The id found.
        id: u64,
        /// The vocabulary size.
        vocab_size: usize,
    },

    /// Two metadata arrays (or an array and a declared size) that must agree do not.
    #[error("GGUF metadata: `{key}` has {got} entries, expected {expected}")]
    LengthMismatch {
        /// The metadata key of the array that does not fit.
        key: String,
        /// The expected length.
        expected: usize,
        /// The length found.
        got: usize,
    },

    /// The tokenizer described by the metadata is of a kind this crate cannot build
    /// (e.g. `tokenizer.ggml.model = "llama"`, SentencePiece, or an unknown `tokenizer.ggml.pre`).
    #[error("unsupported tokenizer: `{key}` = `{value}`")]
    UnsupportedTokenizer {
        /// The metadata key (`tokenizer.ggml.model` or `tokenizer.ggml.pre`).
        key: String,
        /// Its value.
        value: String,
    },

    /// The `tokenizers` crate failed to build, load, encode or decode.
    #[error("tokenizer{}: {detail}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Tokenizer {
        /// The `tokenizer.json` involved, if the tokenizer came from a file.
        path: Option<PathBuf>,
        /// The error message from `tokenizers`.
        detail: String,
    },

    /// The chat template does not compile, or rendering it failed (including the template
    /// calling `raise_exception(..)`).
    #[error("chat template: {source:#}")]
    ChatTemplate {
        /// minijinja's error, with the template line where known.
        #[source]
        source: minijinja::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
