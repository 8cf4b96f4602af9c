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
    #[error(
        "GGUF metadata: unsupported architecture `{found}` (this crate runs `llama`, `qwen2` \
         and `gemma3`; phi, gemma2 and the others are not implemented)"
    )]
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

    /// A LoRA adapter's `adapter_config.json` does not parse (not JSON, a missing `r` /
    /// `lora_alpha` / `target_modules`, a value of the wrong type).
    #[error("LoRA adapter config {path}: {source} (expected a PEFT `adapter_config.json`)")]
    AdapterConfig {
        /// The `adapter_config.json` read.
        path: PathBuf,
        /// serde_json's error, with line and column.
        source: serde_json::Error,
    },

    /// A LoRA adapter config parses but a value is out of range (`r = 0`, a non-finite
    /// `lora_alpha`, ...).
    #[error("LoRA adapter config: `{key}`: {detail}")]
    AdapterConfigValue {
        /// The config key, e.g. `r`.
        key: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A LoRA factor holds values that are not finite numbers (a diverged training run or a
    /// damaged file).
    #[error(
        "LoRA adapter tensor `{tensor}`: {detail}: the adapter is unusable; retrain it or \
         restore it from a backup"
    )]
    AdapterTensorValues {
        /// The PEFT tensor name.
        tensor: String,
        /// What is wrong.
        detail: String,
    },

    /// `adapter_model.safetensors` is not a readable safetensors file.
    #[error("LoRA adapter weights {path}: not a readable safetensors file: {source}")]
    AdapterWeights {
        /// The file.
        path: PathBuf,
        /// candle's error.
        source: candle_core::Error,
    },

    /// `target_modules` names a module this crate cannot map onto a llama projection.
    #[error(
        "LoRA adapter: unknown target module `{module}`; llama adapters may target q_proj, \
         k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (or \"all-linear\")"
    )]
    AdapterTargetModule {
        /// The module name as written in the config.
        module: String,
    },

    /// A LoRA tensor the config implies (a targeted module of a transformed layer) is absent.
    #[error("LoRA adapter: tensor `{name}` is missing (its module is in `target_modules`)")]
    AdapterTensorMissing {
        /// The PEFT tensor name, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
        name: String,
    },

    /// A tensor in the adapter file is not a LoRA weight of a targeted llama projection
    /// (another naming scheme, a module outside `target_modules`, `modules_to_save` copies).
    #[error(
        "LoRA adapter: unexpected tensor `{name}`; expected only \
         `base_model.model.model.layers.{{i}}.{{self_attn|mlp}}.{{module}}.lora_{{A|B}}.weight` \
         for the modules in `target_modules`"
    )]
    AdapterTensorUnexpected {
        /// The tensor name found.
        name: String,
    },

    /// A LoRA tensor's rank dimension differs from the config's `r`.
    #[error("LoRA adapter: tensor `{name}` has rank {got}, but `r` = {expected} in the config")]
    AdapterRank {
        /// The PEFT tensor name.
        name: String,
        /// `r` from the config.
        expected: usize,
        /// The rank dimension found (`lora_A` dim 0, `lora_B` dim 1).
        got: usize,
    },

    /// A LoRA tensor's feature dimension does not fit the base model: the adapter was made
    /// for a base of another width.
    #[error(
        "LoRA adapter: tensor `{name}` has shape {got:?}, expected {expected:?} for this base \
         model; was the adapter trained for another base?"
    )]
    AdapterShape {
        /// The PEFT tensor name.
        name: String,
        /// `(r, in)` for `lora_A`, `(out, r)` for `lora_B`, from the base model's props.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },

    /// A LoRA tensor names a layer the base model does not have.
    #[error(
        "LoRA adapter: tensor `{name}` is for layer {layer}, but the base model has \
         {block_count} layers; was the adapter trained for another base?"
    )]
    AdapterLayer {
        /// The PEFT tensor name.
        name: String,
        /// The layer index in the name.
        layer: usize,
        /// The base model's `block_count`.
        block_count: usize,
    },

    /// An adapter was used with a model other than the one it was validated against (the
    /// layer count or projection sizes differ).
    #[error(
        "LoRA adapter `{adapter}` does not fit this model ({detail}); load it with \
         `LoraAdapter::load(dir, &model)` for the model it is used with"
    )]
    AdapterModelMismatch {
        /// The adapter's name.
        adapter: String,
        /// What differs.
        detail: String,
    },

    /// A forward call continued a KV cache filled under another adapter (or none): the
    /// cached keys and values do not belong to the requested model.
    #[error(
        "the KV cache holds {len} positions computed with adapter {cached}, but this call \
         uses adapter {requested}; clear the cache (or use one cache per adapter)"
    )]
    CacheAdapterMismatch {
        /// The adapter the cache was filled with (`none` for the base).
        cached: String,
        /// The adapter of this call (`none` for the base).
        requested: String,
        /// Positions in the cache.
        len: usize,
    },

    /// A tensor operation failed (a shape mismatch inside the forward pass: a bug, or a file
    /// whose tensors disagree in a way not checked at load time).
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
