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
    /// No usable example: the file or the training set is empty, or every example was
    /// skipped.
    #[error("{}", empty_dataset_message(path.as_deref(), reason))]
    EmptyDataset {
        /// The dataset file, when the examples came from one.
        path: Option<PathBuf>,
        /// Why nothing is left.
        reason: EmptyReason,
    },
    /// A configuration value is out of range.
    #[error("invalid training configuration: `{name}` = {value}: expected {expected}")]
    InvalidParameter {
        /// The field of [`LoraSpec`](crate::LoraSpec) or [`TrainConfig`](crate::TrainConfig),
        /// e.g. `learning_rate`.
        name: &'static str,
        /// The value given, formatted.
        value: String,
        /// What it must be, in words.
        expected: &'static str,
    },
    /// A model was given to a trainer whose configuration has another LoRA spec.
    #[error(
        "the model's LoRA spec {model:?} differs from the training config's {config:?}: load \
         the model with the config's `lora` spec"
    )]
    LoraSpecMismatch {
        /// The spec the model was loaded with.
        model: Box<crate::LoraSpec>,
        /// The spec of the training config.
        config: Box<crate::LoraSpec>,
    },
    /// A packed sequence whose token, position, segment and attention lists are empty or
    /// differ in length.
    #[error(
        "a packed sequence needs tokens, positions, segments and attention labels of one \
         length >= 1, got {tokens} tokens, {positions} positions, {segments} segments and \
         {attend} labels"
    )]
    SequenceShape {
        /// Token ids.
        tokens: usize,
        /// Positions.
        positions: usize,
        /// Segment ids.
        segments: usize,
        /// Attention labels.
        attend: usize,
    },
    /// A token id outside the model's vocabulary.
    #[error(
        "token id {id} outside the vocabulary of {vocab_size}: tokenize with the model's own \
         tokenizer"
    )]
    TokenOutOfRange {
        /// The token id.
        id: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// A position at or past the model's context length.
    #[error(
        "position {position} past the context length {context_length}: lower the sequence \
         length (--seq-len)"
    )]
    PositionOutOfRange {
        /// The position.
        position: u32,
        /// `llama.context_length`.
        context_length: usize,
    },
    /// A packed sequence with no loss target: there is nothing to score.
    #[error("a packed sequence without loss targets ({tokens} tokens): pack examples with answer tokens")]
    NoLossTargets {
        /// Tokens in the sequence.
        tokens: usize,
    },
    /// The chat template does not render a conversation's prefixes as prefixes of its
    /// rendering, so the assistant tokens cannot be masked.
    #[error(
        "the chat template does not render a conversation's prefixes as prefixes of its \
         rendering (at message {message}), so the assistant tokens cannot be located: use a \
         template whose output for a conversation extends its output for each prefix"
    )]
    UnmaskableTemplate {
        /// The 0-based index of the assistant message where the check failed.
        message: usize,
    },
    /// An example's source blocks could not be placed: its first user message is not copied
    /// verbatim into the chat template's rendering.
    #[error(
        "an example's \"blocks\" could not be placed: the chat template does not copy its \
         first user message verbatim (train without block attention, or use a template that \
         renders the message as it is)"
    )]
    BlocksNotFound,
    /// A checkpoint lacks a LoRA tensor of the model.
    #[error("checkpoint has no tensor {name}")]
    CheckpointTensorMissing {
        /// The parameter name, as [`TrainModel::named_params`](crate::TrainModel::named_params)
        /// gives it.
        name: String,
    },
    /// A checkpoint tensor has another shape than the model's parameter.
    #[error("checkpoint tensor {name} has shape {got:?}, the model needs {expected:?}")]
    CheckpointTensorShape {
        /// The parameter name.
        name: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The checkpoint's shape.
        got: Vec<usize>,
    },
    /// The training state could not be serialised to JSON (a bug: please report it).
    #[error("cannot serialise the training state for {path}: {source}")]
    StateEncode {
        /// The state file that was to be written.
        path: PathBuf,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// A step was asked of a run that has done all its steps.
    #[error("the run has no step left (all {total_steps} done): start a new run to train further")]
    NoStepLeft {
        /// Steps of the run.
        total_steps: usize,
    },
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

/// Why a data set is empty ([`Error::EmptyDataset`]).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmptyReason {
    /// There is no example at all.
    NoExample,
    /// Every example was skipped.
    AllSkipped {
        /// Examples given.
        examples: usize,
        /// Examples longer than the sequence length.
        too_long: usize,
        /// Examples whose answers tokenized to nothing.
        no_target: usize,
        /// The sequence length.
        seq_len: usize,
    },
}

fn empty_dataset_message(path: Option<&std::path::Path>, reason: &EmptyReason) -> String {
    match (path, reason) {
        (Some(path), EmptyReason::NoExample) => format!(
            "{} holds no example: write one {{\"messages\": [...]}} object per line",
            path.display()
        ),
        (None, EmptyReason::NoExample) => {
            "no training example: give the trainer at least one example".to_string()
        }
        (
            path,
            EmptyReason::AllSkipped {
                examples,
                too_long,
                no_target,
                seq_len,
            },
        ) => format!(
            "no usable example among {examples}{}: {too_long} longer than the sequence length \
             {seq_len} (raise --seq-len), {no_target} without answer tokens",
            path.map(|p| format!(" in {}", p.display()))
                .unwrap_or_default()
        ),
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
