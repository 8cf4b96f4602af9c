//! The OpenAI wire format that `ragtune serve` speaks (the subset it implements, see
//! `docs/serve.md`), and the `ragtune` extension object of requests and responses.
//!
//! Request bodies accept the fields OpenAI clients send and ignore the ones ragtune has no
//! use for (`presence_penalty`, `logprobs`, `user`, ...); fields whose value ragtune cannot
//! honour (`n` > 1, a role other than system/user/assistant) are refused.

use serde::{Deserialize, Serialize};

use crate::engine::{Answer, Citation, Timings};
use crate::retrieve::RetrievedChunk;

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// `hybrid`, `rag`, `finetune`, `base`, or `MODE:ADAPTER`.
    pub model: String,
    /// The conversation; the last message is the question.
    pub messages: Vec<Message>,
    /// Server-sent events (`data: {chunk}` lines, then `data: [DONE]`).
    #[serde(default)]
    pub stream: bool,
    /// Generated tokens at most.
    pub max_tokens: Option<usize>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    /// 0 or absent: greedy.
    pub temperature: Option<f32>,
    /// Nucleus sampling, with a temperature > 0.
    pub top_p: Option<f32>,
    /// Seed of the sampler.
    pub seed: Option<u64>,
    /// Up to 4 stop strings.
    pub stop: Option<Stop>,
    /// Must be 1 when given.
    pub n: Option<usize>,
    /// The retrieval options.
    #[serde(default)]
    pub ragtune: RequestExtension,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// The strings.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// One message of `messages`.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: MessageRole,
    /// The text: a string, or a list of `{"type": "text", "text": ...}` parts.
    pub content: Content,
}

/// The roles ragtune reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    /// Ignored: the profile's system prompt is used (the adapter was trained with it).
    System,
    /// Also accepted for `system` (newer clients send it).
    Developer,
    /// A question.
    User,
    /// An earlier answer.
    Assistant,
}

/// Message content.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts; only `text` parts are read.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: String,
}

/// The `ragtune` object of a chat request: how sources are retrieved.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestExtension {
    /// Sources to retrieve (default: the engine's `k`).
    pub k: Option<usize>,
    /// A metadata filter, `key=value,...` as `--filter` takes it.
    pub filter: Option<String>,
    /// `dense`, `lexical` or `hybrid` (default: the configured mode).
    pub retrieval: Option<crate::retrieve::RetrievalMode>,
}

/// A completed chat (`"object": "chat.completion"`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model as requested.
    pub model: String,
    /// One choice.
    pub choices: Vec<Choice>,
    /// Token counts.
    pub usage: Usage,
    /// Sources, citations and timings.
    pub ragtune: ResponseExtension,
}

/// The one choice of a completion.
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    /// 0.
    pub index: usize,
    /// The answer.
    pub message: AssistantMessage,
    /// `stop` or `length` (`cancelled` never reaches a client).
    pub finish_reason: &'static str,
}

/// `{"role": "assistant", "content": ...}`.
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: &'static str,
    /// The answer text.
    pub content: String,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Prompt tokens (sources and history included).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// OpenAI's breakdown of the prompt tokens.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`, as OpenAI's prompt caching reports it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache (computed by an earlier request).
    pub cached_tokens: usize,
}

/// The `ragtune` object of a response and of the last stream chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseExtension {
    /// `hybrid`, `rag`, `finetune` or `base`.
    pub mode: &'static str,
    /// The adapter used, if any.
    pub adapter: Option<String>,
    /// The sources given in the prompt, numbered from 1 in this order.
    pub sources: Vec<RetrievedChunk>,
    /// The `[n]` citations of the answer.
    pub citations: Vec<Citation>,
    /// Milliseconds per phase.
    pub timings_ms: Timings,
    /// How many earlier messages fit into the prompt.
    pub history_messages: usize,
}

impl ResponseExtension {
    /// The extension of `answer`.
    pub fn of(answer: &Answer) -> ResponseExtension {
        ResponseExtension {
            mode: answer.mode.as_str(),
            adapter: answer.adapter.clone(),
            sources: answer.sources.clone(),
            citations: answer.citations.clone(),
            timings_ms: answer.timings,
            history_messages: answer.history_messages,
        }
    }
}

impl Usage {
    /// The counts of `answer`.
    pub fn of(answer: &Answer) -> Usage {
        Usage {
            prompt_tokens: answer.tokens.prompt,
            completion_tokens: answer.tokens.generated,
            total_tokens: answer.tokens.prompt + answer.tokens.generated,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: answer.tokens.cached,
            },
        }
    }
}

/// One stream chunk (`"object": "chat.completion.chunk"`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    /// The completion's id (the same in every chunk).
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model as requested.
    pub model: String,
    /// One choice with a delta.
    pub choices: Vec<ChunkChoice>,
    /// Only on the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Only on the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ragtune: Option<ResponseExtension>,
}

/// The choice of a chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkChoice {
    /// 0.
    pub index: usize,
    /// New text (or the role, first).
    pub delta: Delta,
    /// `null` until the last chunk.
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    /// `assistant`, on the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// The new text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingsRequest {
    /// One text or a list.
    pub input: EmbeddingInput,
    /// Any name (the server has one encoder).
    #[serde(default)]
    pub model: Option<String>,
    /// `float` (the default) only.
    #[serde(default)]
    pub encoding_format: Option<String>,
}

/// `input` of an embeddings request.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    One(String),
    /// Several texts.
    Many(Vec<String>),
}

/// The error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The fields of [`ErrorBody`].
#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    /// What went wrong and what to do.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `server_error`, ...
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<&'static str>,
    /// A machine-readable code (`model_not_found`, `invalid_api_key`, ...).
    pub code: Option<&'static str>,
}
