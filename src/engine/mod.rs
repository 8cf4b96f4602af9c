//! The hybrid engine: one embedder, one index, one base model and any number of LoRA
//! adapters in one process, answering in four [`Mode`]s.
//!
//! | mode       | adapter | retrieval |
//! |------------|---------|-----------|
//! | `hybrid`   | yes     | yes       |
//! | `rag`      | no      | yes       |
//! | `finetune` | yes     | no        |
//! | `base`     | no      | no        |
//!
//! `rag` and `hybrid` build the exact same prompt ([`prompt::rag_messages`]); `finetune` and
//! `base` the question alone ([`prompt::closed_book_messages`]). Switching modes never
//! reloads anything: the adapter is chosen per forward call.
//!
//! **Concurrency.** [`Engine`] is `Send + Sync`; [`Engine::answer`] takes `&self` and each
//! call owns its KV cache, so any number of threads may ask at once. The matmul kernels of
//! every request run on the one rayon pool (as many threads as cores), so concurrent requests
//! share it rather than oversubscribing the CPU. With `batch_decode` (the default) their
//! decode steps are batched ([`batch`]): one forward pass runs the next token of every answer
//! being decoded, each with its own cache and adapter, and the answers are the same as one at
//! a time.

pub mod batch;
mod blocks;
mod config;
mod kv;
pub mod prompt;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::Instant;

use ragtune_embed::SentenceEncoder;
use ragtune_generate::{
    end_of_generation_ids, read_gguf, ChatMessage, ChatTemplate, GenerateParams, Generator,
    KvCache, LlamaModel, LlamaProps, LoraAdapter, PrefixCache, PrefixCacheStats, Sampling,
    StopReason, Tokenizer,
};
use ragtune_index::Filter;
use serde::Serialize;

pub use blocks::{block_store_dir, PrecomputeReport};
pub use config::{default_index_dir, EngineConfig, CONFIG_FILE};
pub use prompt::{Citation, BLOCK_PROMPT_FORMAT_VERSION, PROMPT_FORMAT_VERSION};

use crate::fetch::{FetchConfig, Role};
use crate::ingest::BackgroundIngest;
use crate::profile::Profile;
use crate::progress::Progress;
use crate::retrieve::{Query, RetrievalMode, RetrievedChunk, Retriever};
use crate::{Error, Result};

/// How a question is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Adapter + retrieval (the product).
    Hybrid,
    /// Retrieval, base model.
    Rag,
    /// Adapter, no retrieval.
    #[serde(rename = "finetune")]
    FineTune,
    /// Base model, no retrieval.
    Base,
}

impl Mode {
    /// All four, in the order benchmarks report them.
    pub const ALL: [Mode; 4] = [Mode::Hybrid, Mode::Rag, Mode::FineTune, Mode::Base];

    /// Whether the mode puts retrieved sources into the prompt.
    pub fn uses_retrieval(self) -> bool {
        matches!(self, Mode::Hybrid | Mode::Rag)
    }

    /// Whether the mode runs with a LoRA adapter.
    pub fn uses_adapter(self) -> bool {
        matches!(self, Mode::Hybrid | Mode::FineTune)
    }

    /// The lowercase name (`hybrid`, `rag`, `finetune`, `base`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Hybrid => "hybrid",
            Mode::Rag => "rag",
            Mode::FineTune => "finetune",
            Mode::Base => "base",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Mode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hybrid" => Ok(Mode::Hybrid),
            "rag" => Ok(Mode::Rag),
            "finetune" | "fine-tune" | "ft" => Ok(Mode::FineTune),
            "base" => Ok(Mode::Base),
            other => Err(Error::UnknownMode {
                got: other.to_string(),
            }),
        }
    }
}

/// One question.
#[derive(Debug, Clone)]
pub struct Request {
    /// The question (not empty).
    pub question: String,
    /// How to answer.
    pub mode: Mode,
    /// Sources to retrieve (retrieval modes); `None`: the engine's default.
    pub k: Option<usize>,
    /// Metadata filter on the retrieved chunks.
    pub filter: Option<Filter>,
    /// How sources are found (dense, lexical or hybrid); `None`: `[retrieval] mode`.
    pub retrieval: Option<RetrievalMode>,
    /// Token choice; greedy by default.
    pub sampling: Sampling,
    /// Generated tokens at most; `None`: the engine's default.
    pub max_tokens: Option<usize>,
    /// The adapter of `hybrid`/`finetune` (a loaded adapter's name); `None`: the default.
    pub adapter: Option<String>,
    /// Earlier turns of the conversation, oldest first: user messages (the questions alone)
    /// and assistant messages (the answers). As many of the most recent turns as fit the
    /// prompt budget after the sources go into the prompt (see [`prompt`]); empty: a single
    /// question.
    pub history: Vec<ChatMessage>,
    /// When set, storing `true` stops the answer at the next token: it ends with the text
    /// so far and [`Answer::cancelled`] set, not an error.
    pub cancel: Option<Arc<AtomicBool>>,
    /// The answer ends before the first of these strings (which is not part of it).
    pub stop: Vec<String>,
}

impl Request {
    /// A greedy request with the engine's defaults.
    pub fn new(question: impl Into<String>, mode: Mode) -> Self {
        Self {
            question: question.into(),
            mode,
            k: None,
            filter: None,
            retrieval: None,
            sampling: Sampling::Greedy,
            max_tokens: None,
            adapter: None,
            history: Vec::new(),
            cancel: None,
            stop: Vec::new(),
        }
    }
}

/// Wall-clock time per phase of one answer, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Embedding the question.
    pub embed: f64,
    /// The index search.
    pub retrieve: f64,
    /// Building and tokenizing the prompt (fitting the sources into the budget).
    pub prompt: f64,
    /// Prompt processing up to the first token's logits.
    pub prefill: f64,
    /// Generating the rest.
    pub decode: f64,
    /// From the request to the first generated text.
    pub first_token: f64,
    /// The whole request.
    pub total: f64,
}

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TokenCounts {
    /// Prompt tokens.
    pub prompt: usize,
    /// Of those, the positions whose KV came from the prefix cache (computed by an earlier
    /// request: prompt prefix blocks and sources' chunk blocks), not prefilled.
    pub cached: usize,
    /// Generated tokens.
    pub generated: usize,
}

/// An answer with its sources and measurements.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// The mode it was produced in.
    pub mode: Mode,
    /// The generated text.
    pub text: String,
    /// The sources given in the prompt, numbered from 1 in this order (empty in `finetune`
    /// and `base`).
    pub sources: Vec<RetrievedChunk>,
    /// The citations in the text, with those of sources not given flagged.
    pub citations: Vec<Citation>,
    /// The adapter used, if any.
    pub adapter: Option<String>,
    /// Time per phase.
    pub timings: Timings,
    /// Token counts.
    pub tokens: TokenCounts,
    /// Prefill tokens/s of this answer.
    pub prefill_tokens_per_s: f64,
    /// Decode tokens/s of this answer.
    pub decode_tokens_per_s: f64,
    /// How many messages of [`Request::history`] (its most recent) fit into the prompt.
    pub history_messages: usize,
    /// Whether the prompt was the block-attention format v2 (`block_attention` on and a
    /// retrieval mode with sources), see [`prompt`].
    pub block_attention: bool,
    /// Whether [`Request::cancel`] stopped the answer (the text is what came before).
    pub cancelled: bool,
    /// Why the answer ended.
    pub finish: Finish,
}

/// Why an answer ended (OpenAI's `finish_reason` words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// The model ended its turn, or the text reached a [`Request::stop`] string.
    Stop,
    /// The token limit (`max_tokens`) was reached.
    Length,
    /// [`Request::cancel`] was set.
    Cancelled,
}

impl Finish {
    /// `stop`, `length` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
        }
    }
}

/// Whether the engine searches the whole corpus ([`Engine::index_status`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IndexStatus {
    /// The index holds every chunk.
    Complete,
    /// A first run: the index holds the metadata records only, while the full ingest runs
    /// on a thread ([`crate::ingest::ensure_default_index_in_background`]); the engine
    /// searches the full index as soon as it is written.
    RecordsOnly {
        /// Chunks of the full ingest embedded so far.
        embedded: usize,
        /// Chunks it embeds in all (0 while the documents are being chunked).
        total: usize,
        /// Seconds since it started.
        elapsed_secs: f64,
    },
    /// The full ingest of a first run failed (a notice said why): the index holds the
    /// metadata records only until `ragtune ingest` (or the next first-run check) builds it.
    RecordsOnlyFailed,
}

/// `m` locked; a poisoned lock is taken over (what it guards stays consistent: an option
/// taken or left whole).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The engine (see the module docs).
#[derive(Debug)]
pub struct Engine {
    /// Swapped for the full index when a background ingest finishes ([`IndexStatus`]).
    retriever: RwLock<Arc<Retriever>>,
    /// The full ingest of a first run, while it runs.
    background: Mutex<Option<BackgroundIngest>>,
    /// It failed: the index holds the records only.
    background_failed: AtomicBool,
    /// Where notices go (the full index ready, or its build failed).
    notices: Progress,
    model: LlamaModel,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    eog: Vec<u32>,
    adapters: BTreeMap<String, LoraAdapter>,
    config: EngineConfig,
    profile: Profile,
    index_dir: PathBuf,
    /// Computed KV kept across requests: prompt prefixes and the sources' chunk blocks
    /// (kv.rs).
    kv: PrefixCache,
    /// Batches the decode steps of concurrent answers.
    batcher: batch::DecodeBatcher,
    /// The GGUF file the model was loaded from, and its sha256 once computed (blocks.rs).
    gguf: PathBuf,
    model_sha256: OnceLock<String>,
    /// The persisted chunk blocks per adapter name, opened on first use (blocks.rs).
    block_stores: Mutex<HashMap<Option<String>, Option<Arc<ragtune_generate::BlockStore>>>>,
}

impl Engine {
    /// Builds the engine from `config`: resolves its profile, fetches missing pinned models,
    /// builds the default index from the profile's pinned corpus on first use (progress and
    /// notices on `progress`), loads the encoder, the index, the model and every configured
    /// adapter that exists on disk. An adapter trained for another profile or prompt format
    /// is loaded with a notice.
    ///
    /// # Errors
    /// Profile, fetch, model, index and adapter errors; [`Error::InvalidSetting`] for a
    /// context window of 0 or beyond the model's context length, or a default adapter that is
    /// not configured.
    pub fn open(config: EngineConfig, progress: &Progress) -> Result<Engine> {
        let profile = config.resolve_profile()?;
        let index_dir = config.index_dir(&profile);
        let fetch = FetchConfig::new(&config.models_dir);
        let encoder_dir = match &config.embedder {
            Some(dir) => dir.clone(),
            None => crate::fetch::ensure(&fetch, Role::Embedder, progress)?,
        };
        let encoder = SentenceEncoder::load_with(&encoder_dir, config.encoder_options())?;
        let background = if config.index_in_background {
            crate::ingest::ensure_default_index_in_background(
                &config,
                &profile,
                &encoder,
                &encoder_dir,
                progress,
            )?
        } else {
            crate::ingest::ensure_default_index(&config, &profile, &encoder, progress)?;
            None
        };
        let retriever = Retriever::with_encoder(encoder, &index_dir)?
            .with_profile(config.retrieval.clone(), &profile)?;
        if let Some(notice) = retriever.lexical_notice() {
            progress.notice(&notice);
        }
        let gguf = match &config.gguf {
            Some(path) => path.clone(),
            None => default_gguf(&fetch, progress)?,
        };
        let mut adapters = BTreeMap::new();
        let model = LlamaModel::from_gguf(&gguf)?;
        for (name, dir) in &config.adapters {
            if !dir.exists() {
                progress.notice(&format!(
                    "adapter `{name}`: {} does not exist, skipped",
                    dir.display()
                ));
                continue;
            }
            let adapter = match LoraAdapter::load(dir, &model) {
                Ok(a) => a,
                // Another base model than the pinned one: adapters trained for the pinned
                // one do not fit it, and `rag`/`base` need none.
                Err(e) if config.gguf.is_some() => {
                    progress.notice(&format!(
                        "adapter `{name}` does not fit {} ({e}); skipped, so `hybrid` and \
                         `finetune` need an adapter trained for this model",
                        gguf.display()
                    ));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let format = if config.block_attention {
                BLOCK_PROMPT_FORMAT_VERSION
            } else {
                PROMPT_FORMAT_VERSION
            };
            if let Some(notice) = adapter_mismatch(name, dir, &profile, format) {
                progress.notice(&notice);
            }
            adapters.insert(name.clone(), adapter);
        }
        let mut engine = Self::assemble(retriever, model, &gguf, adapters, config, profile)?;
        *lock(&engine.background) = background;
        engine.notices = progress.clone();
        Ok(engine)
    }

    /// Builds the engine from loaded parts (the tokenizer and chat template are read from
    /// the GGUF at `gguf`, the file `model` was loaded from), with the profile that
    /// `config` names.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn from_parts(
        retriever: Retriever,
        model: LlamaModel,
        gguf: &std::path::Path,
        adapters: BTreeMap<String, LoraAdapter>,
        config: EngineConfig,
    ) -> Result<Engine> {
        let profile = config.resolve_profile()?;
        Self::assemble(retriever, model, gguf, adapters, config, profile)
    }

    /// [`from_parts`](Self::from_parts) with the profile already resolved (by
    /// [`open`](Self::open), which needed it first).
    fn assemble(
        retriever: Retriever,
        model: LlamaModel,
        gguf: &std::path::Path,
        adapters: BTreeMap<String, LoraAdapter>,
        config: EngineConfig,
        profile: Profile,
    ) -> Result<Engine> {
        let index_dir = config.index_dir(&profile);
        let content = read_gguf(gguf)?;
        let props = LlamaProps::try_from(&content)?;
        let tokenizer = Tokenizer::from_gguf(&content)?;
        let template =
            ChatTemplate::from_props(&props, &tokenizer)?.ok_or_else(|| Error::NoChatTemplate {
                path: gguf.to_path_buf(),
            })?;
        if config.context_window == 0 || config.context_window > props.context_length {
            return Err(Error::InvalidSetting {
                key: "context_window".into(),
                value: config.context_window.to_string(),
                expected: format!(
                    "in 1..={} (the model's context length)",
                    props.context_length
                ),
            });
        }
        if let Some(name) = &config.default_adapter {
            if !config.adapters.contains_key(name) {
                return Err(Error::InvalidSetting {
                    key: "default_adapter".into(),
                    value: name.clone(),
                    expected: format!(
                        "one of the configured adapters ({})",
                        names(config.adapters.keys())
                    ),
                });
            }
        }
        let eog = end_of_generation_ids(&model, &tokenizer);
        let kv_bytes = if config.prefix_cache {
            config.prefix_cache_mb.saturating_mul(1 << 20)
        } else {
            0
        };
        Ok(Engine {
            retriever: RwLock::new(Arc::new(retriever)),
            background: Mutex::new(None),
            background_failed: AtomicBool::new(false),
            notices: Progress::hidden(),
            model,
            tokenizer,
            template,
            eog,
            adapters,
            config,
            profile,
            index_dir,
            kv: PrefixCache::new(kv_bytes),
            batcher: batch::DecodeBatcher::default(),
            gguf: gguf.to_path_buf(),
            model_sha256: OnceLock::new(),
            block_stores: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The corpus profile (prompts, record template, fields).
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The index directory the engine searches.
    pub fn index_dir(&self) -> &std::path::Path {
        &self.index_dir
    }

    /// Decode steps run and the rows in them since the engine was opened: `rows / steps` is
    /// the mean number of answers decoded together.
    pub fn batch_stats(&self) -> (u64, u64) {
        self.batcher.stats()
    }

    /// What the prefix cache holds (bytes of KV, blocks) and how often it served.
    pub fn kv_stats(&self) -> PrefixCacheStats {
        self.kv.stats()
    }

    /// Whether the prefix cache keeps anything (`prefix_cache` on, a bound above 0).
    fn keeps_kv(&self) -> bool {
        self.config.prefix_cache && self.config.prefix_cache_mb > 0
    }

    /// Empties the prefix cache (the next requests compute everything; the statistics of
    /// use are kept).
    pub fn clear_kv(&self) {
        self.kv.clear();
    }

    /// The retriever (encoder and index) that searches now: the full index once a first
    /// run's background ingest has finished ([`index_status`](Self::index_status)).
    pub fn retriever(&self) -> Arc<Retriever> {
        self.poll_background();
        Arc::clone(
            &self
                .retriever
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Searches the index `ingest` writes once it has finished: until then
    /// [`index_status`](Self::index_status) reports its progress, then the engine opens the
    /// new index with the ingest's encoder (a notice on the engine's progress says so). This
    /// is what [`open`](Self::open) does with a first run's background ingest
    /// ([`EngineConfig::index_in_background`]); an engine built with
    /// [`from_parts`](Self::from_parts) can follow one started with
    /// [`crate::ingest::ingest_in_stages`] into the directory it searches.
    pub fn follow_ingest(&self, ingest: BackgroundIngest) {
        *lock(&self.background) = Some(ingest);
    }

    /// Whether the index is complete, or holds the metadata records only while a first run
    /// embeds the rest in the background.
    pub fn index_status(&self) -> IndexStatus {
        self.poll_background();
        match lock(&self.background).as_ref() {
            None if self.background_failed.load(Ordering::Relaxed) => {
                IndexStatus::RecordsOnlyFailed
            }
            None => IndexStatus::Complete,
            Some(b) => {
                let (embedded, total) = b.chunks();
                IndexStatus::RecordsOnly {
                    embedded,
                    total,
                    elapsed_secs: b.elapsed_secs(),
                }
            }
        }
    }

    /// When the background ingest has finished: opens the full index with its encoder and
    /// searches it from now on (a notice says so), or keeps the records and says why.
    fn poll_background(&self) {
        let mut background = lock(&self.background);
        if !background
            .as_ref()
            .is_some_and(BackgroundIngest::is_finished)
        {
            return;
        }
        let Some(done) = background.take() else {
            return;
        };
        let index_dir = done.index_dir().to_path_buf();
        let opened = done.join().and_then(|(report, encoder)| {
            let retriever = Retriever::with_encoder(encoder, &index_dir)?
                .with_profile(self.config.retrieval.clone(), &self.profile)?;
            Ok((report, retriever))
        });
        match opened {
            Ok((report, retriever)) => {
                *self
                    .retriever
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Arc::new(retriever);
                self.notices.notice(&format!(
                    "full index ready: {} documents as {} chunks (embedded in the background \
                     in {:.0} s); answers now draw on the full texts",
                    report.documents, report.chunks, report.total_secs
                ));
            }
            Err(e) => {
                self.background_failed.store(true, Ordering::Relaxed);
                self.notices.notice(&format!(
                    "the full index could not be built in the background ({e}); searching the \
                 metadata records only (`ragtune ingest` builds it)"
                ));
            }
        }
    }

    /// The names of the loaded adapters.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.keys().map(String::as_str).collect()
    }

    /// Answers `request` (see [`answer_streaming`](Self::answer_streaming)).
    ///
    /// # Errors
    /// As [`answer_streaming`](Self::answer_streaming).
    pub fn answer(&self, request: &Request) -> Result<Answer> {
        self.answer_streaming(request, |_| {})
    }

    /// Answers `request`, passing the text to `on_text` as it is generated (whole UTF-8
    /// characters); the returned [`Answer`] carries the rest (sources, citations, timings).
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for an empty question; [`Error::InvalidParameter`] for `k == 0`,
    /// a `k` beyond what fits the context window or a `max_tokens` that leaves no room for the
    /// prompt; [`Error::PromptTooLong`] for a question that does not fit;
    /// [`Error::NoAdapter`] or [`Error::UnknownAdapter`] for a mode that needs an adapter when
    /// none is loaded or the named one is not; retrieval and generation errors. None of them
    /// affects later requests.
    pub fn answer_streaming(
        &self,
        request: &Request,
        mut on_text: impl FnMut(&str),
    ) -> Result<Answer> {
        let started = Instant::now();
        let question = request.question.trim();
        if question.is_empty() {
            return Err(Error::EmptyInput { what: "question" });
        }
        let k = request.k.unwrap_or(self.config.k);
        if k == 0 {
            return Err(Error::InvalidParameter {
                name: "k",
                value: "0".into(),
                expected: "at least 1".into(),
            });
        }
        // A source takes at least MIN_SOURCE_TOKENS of the prompt (its header and a short
        // chunk), so more than this many can never fit; asking for them only costs time.
        let max_k = (self.config.context_window / MIN_SOURCE_TOKENS).max(1);
        if request.mode.uses_retrieval() && k > max_k {
            return Err(Error::InvalidParameter {
                name: "k",
                value: k.to_string(),
                expected: format!(
                    "at most {max_k}: more sources do not fit the context window of {} tokens",
                    self.config.context_window
                ),
            });
        }
        let max_tokens = request.max_tokens.unwrap_or(self.config.max_tokens);
        let budget = self
            .config
            .context_window
            .checked_sub(max_tokens)
            .filter(|b| *b > 0)
            .ok_or_else(|| Error::InvalidParameter {
                name: "max_tokens",
                value: max_tokens.to_string(),
                expected: format!(
                    "less than the context window of {} tokens, to leave room for the prompt",
                    self.config.context_window
                ),
            })?;
        let (adapter_name, adapter) = self.adapter_for(request)?;

        let mut timings = Timings::default();
        let (sources, single) = if request.mode.uses_retrieval() {
            let candidates = self.retrieve(
                question,
                k,
                request.filter.clone(),
                request.retrieval,
                &mut timings,
            )?;
            let t = Instant::now();
            let (sources, ids) = prompt::fit_sources(
                &self.template,
                &self.tokenizer,
                &self.profile,
                question,
                &candidates,
                budget,
            )?;
            timings.prompt = ms(t);
            (sources, ids)
        } else {
            let t = Instant::now();
            let ids = prompt::encode(
                &self.template,
                &self.tokenizer,
                &prompt::closed_book_messages(&self.profile, question),
            )?;
            timings.prompt = ms(t);
            if ids.len() > budget {
                return Err(Error::PromptTooLong {
                    tokens: ids.len(),
                    budget,
                    without: "with the question alone",
                });
            }
            (Vec::new(), ids)
        };
        let (history_messages, mut prompt) = if request.history.is_empty() {
            (0, single)
        } else {
            let t = Instant::now();
            let messages = if request.mode.uses_retrieval() {
                prompt::rag_messages(&self.profile, question, &sources)
            } else {
                prompt::closed_book_messages(&self.profile, question)
            };
            let fitted = prompt::fit_history(
                &self.template,
                &self.tokenizer,
                &messages,
                &request.history,
                budget,
            )?;
            timings.prompt += ms(t);
            fitted
        };

        let params = GenerateParams {
            max_new_tokens: max_tokens,
            sampling: request.sampling,
            cancel: request.cancel.clone(),
            stop: request.stop.clone(),
            ..GenerateParams::default()
        };
        // Format v2 when block attention is on and the prompt can be cut (prompt.rs); a
        // v2 prompt a few tokens over the budget falls back to v1, which was fitted.
        let layout = if request.mode.uses_retrieval() && self.config.block_attention {
            let t = Instant::now();
            let history = &request.history[request.history.len() - history_messages..];
            let layout = prompt::block_prompt(
                &self.template,
                &self.tokenizer,
                &self.profile,
                question,
                &sources,
                history,
            )?
            .filter(|b| b.tokens.len() <= budget);
            timings.prompt += ms(t);
            layout
        } else {
            None
        };
        if let Some(b) = &layout {
            prompt.clone_from(&b.tokens);
        }
        let named = adapter_name.as_deref().zip(adapter);
        let (mut cache, assembled) = self.assemble_kv(
            &prompt,
            layout.as_ref(),
            named,
            adapter,
            prompt.len() + max_tokens,
        )?;
        let generator = Generator::new(&self.model, &self.tokenizer, &self.eog);
        let mut first_token = None;
        // Decode steps go through the batcher, which runs them together with those of the
        // other answers being generated at the same time (batch.rs).
        let mut decoding = None;
        let batched = adapter_name.as_deref();
        let mut decode = |token: u32, cache: &mut KvCache| {
            if !self.config.batch_decode {
                return self
                    .model
                    .forward_last_with(&[token], cache.len(), cache, adapter);
            }
            decoding.get_or_insert_with(|| self.batcher.enter());
            let (owned, logits) = self.batcher.step(
                &self.model,
                &self.adapters,
                token,
                std::mem::take(cache),
                batched,
            )?;
            *cache = owned;
            Ok(logits)
        };
        let generation = generator.generate_after_prefix_with(
            &mut cache,
            &prompt,
            &params,
            adapter,
            |text| {
                if first_token.is_none() {
                    first_token = Some(ms(started));
                }
                on_text(text);
            },
            &mut decode,
        )?;
        drop(decoding);
        // What later requests may share: a closed-book prompt with its answer (the next turn
        // of a chat starts with both), a retrieval prompt up to its question (the head and,
        // in v1, the sources; v2 keeps its sources as chunk blocks).
        let mut seen = prompt.clone();
        let keep = match &layout {
            _ if !self.keeps_kv() => 0,
            Some(b) => b.head,
            None if request.mode.uses_retrieval() => prompt::sources_end(
                &self.template,
                &self.tokenizer,
                &self.profile,
                question,
                &sources,
                &request.history[request.history.len() - history_messages..],
                &prompt,
            )?
            .unwrap_or(prompt.len()),
            None => {
                seen.extend(&generation.tokens);
                seen.len()
            }
        };
        if keep > 0 {
            self.remember_kv(&seen[..keep], layout.is_some(), adapter, &cache)?;
        }
        timings.prefill = assembled.prefill_ms + generation.timings.prefill_ms;
        timings.decode = generation.timings.decode_ms;
        timings.total = ms(started);
        timings.first_token = first_token.unwrap_or(timings.total);
        let citations = prompt::citations(&generation.text, &sources);
        Ok(Answer {
            mode: request.mode,
            text: generation.text,
            sources,
            citations,
            adapter: adapter_name,
            timings,
            tokens: TokenCounts {
                prompt: prompt.len(),
                cached: assembled.cached,
                generated: generation.tokens.len(),
            },
            block_attention: layout.is_some(),
            prefill_tokens_per_s: generation.timings.prefill_tok_s,
            decode_tokens_per_s: generation.timings.decode_tok_s,
            history_messages,
            cancelled: generation.stop == StopReason::Cancelled,
            finish: match generation.stop {
                StopReason::Cancelled => Finish::Cancelled,
                StopReason::MaxTokens => Finish::Length,
                StopReason::EndOfGeneration(_) | StopReason::StopString(_) => Finish::Stop,
            },
        })
    }

    /// The adapter a request runs with: none outside `hybrid`/`finetune`.
    fn adapter_for(&self, request: &Request) -> Result<(Option<String>, Option<&LoraAdapter>)> {
        if !request.mode.uses_adapter() {
            return Ok((None, None));
        }
        let name = request
            .adapter
            .as_ref()
            .or(self.config.default_adapter.as_ref())
            .ok_or_else(|| Error::NoAdapter {
                mode: request.mode.to_string(),
            })?;
        let adapter = self
            .adapters
            .get(name)
            .ok_or_else(|| self.unknown_adapter(name))?;
        Ok((Some(name.clone()), Some(adapter)))
    }

    /// [`Error::UnknownAdapter`] for `name`, listing the loaded adapters.
    fn unknown_adapter(&self, name: &str) -> Error {
        Error::UnknownAdapter {
            name: name.to_string(),
            loaded: self.adapters.keys().cloned().collect(),
        }
    }

    /// The top chunks for `question`: `3k` candidates from the index, at most
    /// `max_chunks_per_doc` of each document, the first `k` of those.
    fn retrieve(
        &self,
        question: &str,
        k: usize,
        filter: Option<Filter>,
        retrieval: Option<RetrievalMode>,
        timings: &mut Timings,
    ) -> Result<Vec<RetrievedChunk>> {
        let mut query = Query::new(question, k * 3);
        query.filter = filter;
        query.mode = retrieval;
        let result = self.retriever().search(&query)?;
        timings.embed = result.embed_ms;
        timings.retrieve = result.search_ms;
        let mut per_doc: BTreeMap<&str, usize> = BTreeMap::new();
        let mut kept = Vec::with_capacity(k);
        for hit in &result.hits {
            let n = per_doc.entry(hit.doc_id.as_str()).or_default();
            if *n < self.config.max_chunks_per_doc && kept.len() < k {
                *n += 1;
                kept.push(hit.clone());
            }
        }
        Ok(kept)
    }
}

/// The fewest prompt tokens one source takes (its numbered header and a short chunk); bounds
/// `k` by the context window.
const MIN_SOURCE_TOKENS: usize = 32;

/// The pinned GGUF (fetched if missing).
///
/// # Errors
/// Fetch errors; [`Error::Manifest`] when the manifest lists no `.gguf` (a build defect).
pub fn default_gguf(fetch: &FetchConfig, progress: &Progress) -> Result<PathBuf> {
    let dir = crate::fetch::ensure(fetch, Role::Generator, progress)?;
    let manifest = crate::fetch::Manifest::embedded()?;
    let file = manifest
        .package(Role::Generator)?
        .files
        .iter()
        .find(|f| f.to.ends_with(".gguf"))
        .ok_or_else(|| Error::Manifest {
            reason: "the generator package lists no .gguf".into(),
        })?;
    Ok(dir.join(&file.to))
}

/// The adapter summary that records what an adapter was trained for (written by
/// `ragtune finetune`).
pub const ADAPTER_SUMMARY: &str = "train_summary.json";

/// A notice when the adapter in `dir` records a profile or prompt format other than
/// `profile` and `format` (the version the engine serves retrieval prompts in:
/// [`PROMPT_FORMAT_VERSION`], or [`BLOCK_PROMPT_FORMAT_VERSION`] with block attention; the
/// adapter's `train_summary.json` fields `profile` and `prompt_format_version`); `None` when
/// they match or the adapter records neither.
pub fn adapter_mismatch(
    name: &str,
    dir: &std::path::Path,
    profile: &Profile,
    format: u32,
) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(ADAPTER_SUMMARY)).ok()?;
    let summary: serde_json::Value = serde_json::from_str(&text).ok()?;
    let trained_profile = summary.get("profile").and_then(|v| v.as_str());
    let trained_format = summary
        .get("prompt_format_version")
        .and_then(|v| v.as_u64());
    let mut differences = Vec::new();
    if let Some(p) = trained_profile.filter(|p| *p != profile.name) {
        differences.push(format!("profile `{p}` (running: `{}`)", profile.name));
    }
    if let Some(v) = trained_format.filter(|v| *v != u64::from(format)) {
        differences.push(format!("prompt format {v} (running: {format})"));
    }
    (!differences.is_empty()).then(|| {
        format!(
            "adapter `{name}` was trained for {}: its answers may suffer; retrain it with \
             `ragtune finetune` for this profile and format (`--block-attention` selects \
             format 2)",
            differences.join(" and ")
        )
    })
}

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = it.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Engine>();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_adapter_notice_compares_with_the_format_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let profile = crate::licensedb::profile();
        let write = |format: u32| {
            let summary =
                serde_json::json!({"profile": profile.name, "prompt_format_version": format});
            std::fs::write(dir.path().join(ADAPTER_SUMMARY), summary.to_string()).expect("write");
        };
        write(PROMPT_FORMAT_VERSION);
        assert_eq!(
            adapter_mismatch("a", dir.path(), &profile, PROMPT_FORMAT_VERSION),
            None
        );
        let notice = adapter_mismatch("a", dir.path(), &profile, BLOCK_PROMPT_FORMAT_VERSION)
            .expect("a v1 adapter served in format 2");
        assert!(notice.contains("prompt format 1 (running: 2)"), "{notice}");
        write(BLOCK_PROMPT_FORMAT_VERSION);
        assert_eq!(
            adapter_mismatch("a", dir.path(), &profile, BLOCK_PROMPT_FORMAT_VERSION),
            None
        );
        assert!(adapter_mismatch("a", dir.path(), &profile, PROMPT_FORMAT_VERSION).is_some());
    }
}
