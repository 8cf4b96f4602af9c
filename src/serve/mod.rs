//! `ragtune serve`: an OpenAI-compatible HTTP API over one [`Engine`] (axum on tokio).
//!
//! Endpoints (the contract is `docs/serve.md`):
//! - `POST /v1/chat/completions`: the last message is the question, earlier user and
//!   assistant messages are the history (as the chat binary uses it); `model` names the mode
//!   and optionally the adapter (`hybrid`, `rag`, `finetune`, `base`, `hybrid:ADAPTER`);
//!   `stream: true` answers with server-sent events. The retrieval options go in a
//!   `ragtune` object (`k`, `filter`, `retrieval`); the sources, citations and timings come
//!   back in a `ragtune` object of the response (and of the last stream chunk).
//! - `POST /v1/embeddings`: the encoder's vectors, as `ragtune embed` prints them.
//! - `GET /v1/models`: the modes and the configured adapters.
//! - `GET /health`.
//!
//! **Admission.** At most `max_concurrent` answers are generated at once (each on a
//! blocking thread; their matmuls share the one rayon pool); up to `queue` more wait for a
//! slot. Beyond that a request gets 503 with `Retry-After`. A client that disconnects
//! cancels its generation at the next token. A panic in one request is that request's 500;
//! the server keeps serving.
//!
//! Errors use OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for a
//! malformed body or a value the engine refuses (a prompt longer than the context, with the
//! numbers), 401 for a missing or wrong API key, 404 for an unknown model, 503 when full.

pub mod wire;

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ragtune_generate::{ChatMessage, Sampling};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::engine::{Answer, Engine, Finish, Mode, Request};
use crate::Error;
use wire::*;

/// How the server admits requests.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Answers generated at once (>= 1).
    pub max_concurrent: usize,
    /// Requests that may wait for a slot; more get 503.
    pub queue: usize,
    /// When set, every `/v1` request needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_concurrent: 2,
            queue: 16,
            api_key: None,
        }
    }
}

/// The state every handler shares.
struct AppState {
    engine: Arc<Engine>,
    config: ServeConfig,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    next_id: AtomicUsize,
}

/// The routes over `engine` (see the module docs).
pub fn router(engine: Arc<Engine>, config: ServeConfig) -> Router {
    let state = Arc::new(AppState {
        slots: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
        engine,
        config,
        waiting: AtomicUsize::new(0),
        next_id: AtomicUsize::new(0),
    });
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .fallback(not_found)
        .with_state(state)
}

/// An error response in OpenAI's format.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: ErrorDetail {
                message: message.into(),
                kind,
                param: None,
                code: None,
            },
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn param(mut self, param: &'static str) -> ApiError {
        self.detail.param = Some(param);
        self
    }

    fn code(mut self, code: &'static str) -> ApiError {
        self.detail.code = Some(code);
        self
    }

    fn model_not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
            .param("model")
            .code("model_not_found")
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The status and body of an engine error: the request's fault (400, or 404 for an
    /// adapter that is not there) or the server's (500).
    fn from_engine(e: Error) -> ApiError {
        match e {
            Error::UnknownAdapter { .. } | Error::NoAdapter { .. } => {
                ApiError::model_not_found(e.to_string())
            }
            Error::PromptTooLong { .. } => {
                ApiError::bad_request(e.to_string()).code("context_length_exceeded")
            }
            Error::EmptyInput { .. }
            | Error::InvalidParameter { .. }
            | Error::UnknownFilterField { .. }
            | Error::UnknownMode { .. }
            | Error::RetrievalUnavailable { .. }
            | Error::Index(ragtune_index::Error::InvalidFilter { .. })
            | Error::Generate(ragtune_generate::Error::InvalidParams { .. }) => {
                ApiError::bad_request(e.to_string())
            }
            Error::Generate(
                ragtune_generate::Error::ContextOverflow { .. }
                | ragtune_generate::Error::PromptTooLong { .. },
            ) => ApiError::bad_request(e.to_string()).code("context_length_exceeded"),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { error: self.detail })).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

impl AppState {
    /// Refuses a `/v1` request without the configured key.
    fn authorize(&self, headers: &HeaderMap) -> ApiResult<()> {
        let Some(key) = &self.config.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "incorrect API key provided",
            )
            .code("invalid_api_key")),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing API key: send `Authorization: Bearer <key>` (the key given to \
                 `ragtune serve --api-key`)",
            )
            .code("invalid_api_key")),
        }
    }

    /// A generation slot: at once when one is free, after waiting when the queue has room,
    /// else 503.
    async fn admit(&self) -> ApiResult<OwnedSemaphorePermit> {
        if let Ok(p) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(p);
        }
        let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = WaitingGuard(&self.waiting);
        if waiting >= self.config.queue {
            drop(guard);
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!(
                    "the server is busy: {} answers are being generated and {} requests are \
                     waiting (--max-concurrent {}, --queue {}); retry later",
                    self.config.max_concurrent,
                    self.config.queue,
                    self.config.max_concurrent,
                    self.config.queue
                ),
            )
            .code("server_busy");
            e.retry_after = Some(1);
            return Err(e);
        }
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("the server is shutting down"))?;
        drop(guard);
        Ok(permit)
    }

    fn completion_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("chatcmpl-{:x}-{n}", unix_secs())
    }

    /// The model names: each mode, and each mode with an adapter for each adapter.
    fn model_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        let has_default = self.engine.config().default_adapter.is_some();
        for mode in Mode::ALL {
            if !mode.uses_adapter() || has_default {
                ids.push(mode.as_str().to_string());
            }
            if mode.uses_adapter() {
                for name in self.engine.adapter_names() {
                    ids.push(format!("{mode}:{name}"));
                }
            }
        }
        ids
    }
}

struct WaitingGuard<'a>(&'a AtomicUsize);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sets the cancel flag when dropped: a non-streamed request whose client went away (axum
/// drops the handler's future) stops its generation.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `{"status": "ok", "decode": {"steps", "rows"}, "kv_cache": {...}}`: with batched
/// decoding, the decode steps run and the rows in them (`rows / steps` is the mean batch);
/// the prefix cache's bytes, blocks and hits (`PrefixCacheStats`).
async fn health(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let (steps, rows) = st.engine.batch_stats();
    Json(serde_json::json!({
        "status": "ok",
        "decode": {"steps": steps, "rows": rows},
        "kv_cache": st.engine.kv_stats(),
    }))
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown endpoint: ragtune serves POST /v1/chat/completions, POST /v1/embeddings, GET \
         /v1/models and GET /health",
    )
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<Response> {
    st.authorize(&headers)?;
    let data: Vec<serde_json::Value> = st
        .model_ids()
        .into_iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "ragtune"}))
        .collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})).into_response())
}

/// Parses a JSON body, or says in OpenAI's format why not.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))
}

/// The mode and adapter that `model` names.
fn parse_model(st: &AppState, model: &str) -> ApiResult<(Mode, Option<String>)> {
    let (mode, adapter) = match model.split_once(':') {
        Some((m, a)) => (m, Some(a.to_string())),
        None => (model, None),
    };
    let known = || st.model_ids().join(", ");
    let mode: Mode = mode.parse().map_err(|_| {
        ApiError::model_not_found(format!(
            "the model `{model}` does not exist: use one of {}",
            known()
        ))
    })?;
    match &adapter {
        Some(_) if !mode.uses_adapter() => Err(ApiError::model_not_found(format!(
            "the model `{model}` does not exist: mode {mode} runs without an adapter; use one \
             of {}",
            known()
        ))),
        Some(a) if !st.engine.adapter_names().contains(&a.as_str()) => {
            Err(ApiError::model_not_found(format!(
                "the model `{model}` does not exist: no adapter `{a}` is loaded; use one of {}",
                known()
            )))
        }
        None if mode.uses_adapter() && st.engine.config().default_adapter.is_none() => {
            Err(ApiError::model_not_found(format!(
                "the model `{model}` does not exist: mode {mode} needs an adapter and none is \
                 configured; use one of {}",
                known()
            )))
        }
        _ => Ok((mode, adapter)),
    }
}

/// The engine request of a chat request.
fn engine_request(st: &AppState, req: ChatRequest) -> ApiResult<Request> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("n must be 1: ragtune gives one choice").param("n"));
    }
    let (mode, adapter) = parse_model(st, &req.model)?;
    let mut turns = Vec::new();
    for (i, m) in req.messages.into_iter().enumerate() {
        let text = match m.content {
            Content::Text(t) => t,
            Content::Parts(parts) => {
                let mut text = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::bad_request(format!(
                            "messages[{i}] has a `{}` content part: ragtune reads text only",
                            p.kind
                        ))
                        .param("messages"));
                    }
                    text.push_str(&p.text);
                }
                text
            }
        };
        match m.role {
            // The profile's system prompt is what the adapter was trained with.
            MessageRole::System | MessageRole::Developer => {}
            MessageRole::User => turns.push(ChatMessage::user(text)),
            MessageRole::Assistant => turns.push(ChatMessage::assistant(text)),
        }
    }
    let question = match turns.pop() {
        Some(m) if m.role == ragtune_generate::Role::User => m.content,
        _ => {
            return Err(
                ApiError::bad_request("the last message must be the user's question")
                    .param("messages"),
            )
        }
    };
    let mut request = Request::new(question, mode);
    request.history = turns;
    request.adapter = adapter;
    request.max_tokens = req.max_completion_tokens.or(req.max_tokens);
    request.k = req.ragtune.k;
    request.retrieval = req.ragtune.retrieval;
    request.filter = req
        .ragtune
        .filter
        .as_deref()
        .map(ragtune_index::Filter::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()).param("ragtune.filter"))?;
    if let Some(stop) = req.stop {
        let stop = stop.into_vec();
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(
                ApiError::bad_request("stop takes up to 4 non-empty strings").param("stop"),
            );
        }
        request.stop = stop;
    }
    let temperature = req.temperature.unwrap_or(0.0);
    if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
        return Err(
            ApiError::bad_request(format!("temperature {temperature} must be in 0..=2"))
                .param("temperature"),
        );
    }
    if let Some(p) = req.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(
                ApiError::bad_request(format!("top_p {p} must be in (0, 1]")).param("top_p"),
            );
        }
    }
    if temperature > 0.0 {
        request.sampling = Sampling::Temperature {
            temperature,
            top_k: None,
            top_p: req.top_p,
            min_p: None,
            seed: req.seed.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            }),
        };
    }
    Ok(request)
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    st.authorize(&headers)?;
    let req: ChatRequest = parse(&body)?;
    let model = req.model.clone();
    let stream = req.stream;
    let mut request = engine_request(&st, req)?;
    let cancel = Arc::new(AtomicBool::new(false));
    request.cancel = Some(Arc::clone(&cancel));
    let permit = st.admit().await?;
    let id = st.completion_id();
    let created = unix_secs();
    if stream {
        return stream_completion(&st, request, permit, id, created, model).await;
    }
    let _cancel_on_drop = CancelOnDrop(cancel);
    let engine = Arc::clone(&st.engine);
    let answer = on_blocking_thread(permit, move || engine.answer(&request)).await?;
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model,
        choices: vec![Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: answer.text.clone(),
            },
            finish_reason: finish_reason(&answer),
        }],
        usage: Usage::of(&answer),
        ragtune: ResponseExtension::of(&answer),
    })
    .into_response())
}

/// Runs `work` on a blocking thread while holding `permit` (the request's generation slot):
/// an engine error is the request's status ([`ApiError::from_engine`]), a panic its 500.
async fn on_blocking_thread<T: Send + 'static>(
    permit: OwnedSemaphorePermit,
    work: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await
    .map_err(|e| ApiError::internal(format!("the request failed: {e}")))?
    .map_err(ApiError::from_engine)
}

fn finish_reason(answer: &Answer) -> &'static str {
    match answer.finish {
        Finish::Length => "length",
        Finish::Stop | Finish::Cancelled => "stop",
    }
}

/// What the generating thread sends to the SSE stream.
enum StreamItem {
    /// A chunk's JSON.
    Chunk(String),
    /// The request failed before any text.
    Failed(ApiError),
}

/// Streams the answer as server-sent events. The first item decides the response: an error
/// before any text is an ordinary error response with its status.
async fn stream_completion(
    st: &AppState,
    request: Request,
    permit: OwnedSemaphorePermit,
    id: String,
    created: u64,
    model: String,
) -> ApiResult<Response> {
    let (tx, mut rx) = mpsc::channel::<StreamItem>(256);
    let engine = Arc::clone(&st.engine);
    let cancel = request.cancel.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let chunk = |delta: Delta, last: Option<&Answer>| {
            let c = ChatChunk {
                id: id.clone(),
                object: "chat.completion.chunk",
                created,
                model: model.clone(),
                choices: vec![ChunkChoice {
                    index: 0,
                    delta,
                    finish_reason: last.map(finish_reason),
                }],
                usage: last.map(Usage::of),
                ragtune: last.map(ResponseExtension::of),
            };
            serde_json::to_string(&c).unwrap_or_default()
        };
        let role = || {
            chunk(
                Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                None,
            )
        };
        let mut started = false;
        let send = |item: StreamItem| {
            if tx.blocking_send(item).is_err() {
                // The client went away: stop generating.
                if let Some(c) = &cancel {
                    c.store(true, Ordering::Relaxed);
                }
            }
        };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            engine.answer_streaming(&request, |text| {
                if !started {
                    started = true;
                    send(StreamItem::Chunk(role()));
                }
                send(StreamItem::Chunk(chunk(
                    Delta {
                        role: None,
                        content: Some(text.to_string()),
                    },
                    None,
                )));
            })
        }));
        match result {
            Ok(Ok(answer)) => {
                if !started {
                    send(StreamItem::Chunk(role()));
                }
                send(StreamItem::Chunk(chunk(Delta::default(), Some(&answer))));
            }
            Ok(Err(e)) => send(StreamItem::Failed(ApiError::from_engine(e))),
            Err(_) => send(StreamItem::Failed(ApiError::internal(
                "the request failed (a panic while generating; the server keeps serving)",
            ))),
        }
    });
    let first = match rx.recv().await {
        Some(StreamItem::Chunk(c)) => c,
        Some(StreamItem::Failed(e)) => return Err(e),
        None => return Err(ApiError::internal("the request ended without an answer")),
    };
    let events = async_stream(first, rx);
    Ok(Sse::new(events).into_response())
}

/// The SSE events: `first`, the rest of `rx`, then `[DONE]`. An error after text has been
/// sent becomes an `error` object in the stream (the status is already 200).
fn async_stream(
    first: String,
    rx: mpsc::Receiver<StreamItem>,
) -> impl tokio_stream::Stream<Item = std::result::Result<Event, Infallible>> {
    let rest = tokio_stream::wrappers::ReceiverStream::new(rx);
    use tokio_stream::StreamExt;
    tokio_stream::once(first)
        .chain(rest.map(|item| match item {
            StreamItem::Chunk(c) => c,
            StreamItem::Failed(e) => {
                serde_json::to_string(&ErrorBody { error: e.detail }).unwrap_or_default()
            }
        }))
        .chain(tokio_stream::once("[DONE]".to_string()))
        .map(|data| Ok(Event::default().data(data)))
}

async fn embeddings(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    st.authorize(&headers)?;
    let req: EmbeddingsRequest = parse(&body)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "encoding_format `{other}`: use `float` or `base64`"
            ))
            .param("encoding_format"))
        }
    };
    let texts = match req.input {
        EmbeddingInput::One(t) => vec![t],
        EmbeddingInput::Many(v) => v,
    };
    if texts.is_empty() || texts.iter().any(|t| t.is_empty()) {
        return Err(
            ApiError::bad_request("input must hold at least one non-empty text").param("input"),
        );
    }
    let permit = st.admit().await?;
    let engine = Arc::clone(&st.engine);
    let (embeddings, tokens) = on_blocking_thread(permit, move || {
        let mut tokens = 0usize;
        let e = engine
            .retriever()
            .encoder()
            .encode_with_progress(&texts, |b| tokens += b.tokens)?;
        Ok((e, tokens))
    })
    .await?;
    let data: Vec<serde_json::Value> = (0..embeddings.len())
        .map(|i| {
            let row = embeddings.row(i);
            let embedding = if base64 {
                // OpenAI's base64 form: the little-endian f32 values.
                use base64::Engine as _;
                let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                serde_json::json!(row)
            };
            serde_json::json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let model = req.model.unwrap_or_else(|| engine_encoder_name(&st.engine));
    Ok(Json(serde_json::json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

fn engine_encoder_name(engine: &Engine) -> String {
    engine.retriever().encoder().identity().name.clone()
}
