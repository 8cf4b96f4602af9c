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
    /// A GGUF tensor the model needs is absent or could not be read.
    #[error("GGUF tensor `{name}`: {source}")]
    Tensor {
        /// The tensor name, e.g. `blk.0.attn_q.weight`.
        name: String,
        /// candle's error.
        source: candle_core::Error,
    },

    /// A GGUF tensor has a shape that does not fit the metadata.
    #[error("GGUF tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// The shape the metadata implies (GGUF order: `(out, in)` for projections).
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },

    /// A feature of the file that this crate does not implement (YaRN RoPE scaling, a
    /// partial rotary dimension, ...).
    #[error("unsupported: {what}")]
    Unsupported {
        /// What is not supported.
        what: String,
    },

    /// A forward call would write past the end of the KV cache.
    #[error("context overflow: {needed} positions needed, the KV cache holds {capacity}")]
    ContextOverflow {
        /// Positions the call needs (cached + new tokens).
        needed: usize,
        /// The cache capacity, in tokens.
        capacity: usize,
    },

    /// A KV cache was asked for more positions than the model's context length, or for none.
    #[error(
        "KV cache capacity {requested} is not in 1..={context_length} (the model's context length)"
    )]
    CacheCapacity {
        /// The capacity asked for, in tokens.
        requested: usize,
        /// `llama.context_length`.
        context_length: usize,
    },

    /// A prompt plus the requested new tokens do not fit the KV cache.
    #[error(
        "prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceed the context \
         of {capacity} tokens by {excess} tokens"
    )]
    PromptTooLong {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// `GenerateParams::max_new_tokens`.
        max_new_tokens: usize,
        /// The KV cache capacity.
        capacity: usize,
        /// How many tokens too many: `prompt_tokens + max_new_tokens - capacity`.
        excess: usize,
    },

    /// Generation parameters out of range (an empty prompt, a temperature <= 0, top_p outside
    /// (0, 1], ...).
    #[error("invalid generation parameters: {detail}")]
    InvalidParams {
        /// What is wrong.
        detail: String,
    },

    /// A tensor operation failed (a shape mismatch inside the forward pass: a bug, or a file
    /// whose tensors disagree in a way not checked at load time).
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
