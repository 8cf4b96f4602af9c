//! End-to-end tests on the real pinned models and a small subset of the real corpus.
//! One test binary with shared helpers (`it/util.rs`), so the models are fetched and the
//! subset index is built once.

#[path = "it/util.rs"]
mod util;

#[path = "it/chunking.rs"]
mod chunking;
#[path = "it/cli.rs"]
mod cli;
#[path = "it/embed_golden.rs"]
mod embed_golden;
#[path = "it/engine.rs"]
mod engine;
#[path = "it/finetune_data.rs"]
mod finetune_data;
#[path = "it/generate_arch.rs"]
mod generate_arch;
#[path = "it/generate_gemma3.rs"]
mod generate_gemma3;
#[path = "it/generate_golden.rs"]
mod generate_golden;
#[path = "it/generate_lora.rs"]
mod generate_lora;
#[path = "it/generate_model.rs"]
mod generate_model;
#[path = "it/generate_quant_types.rs"]
mod generate_quant_types;
#[path = "it/generic_corpus.rs"]
mod generic_corpus;
#[path = "it/kv_reuse.rs"]
mod kv_reuse;
#[path = "it/reliability.rs"]
mod reliability;
#[path = "it/retrieval.rs"]
mod retrieval;
#[path = "it/serve.rs"]
mod serve;
#[path = "it/train.rs"]
mod train;
#[path = "it/train_arch.rs"]
mod train_arch;
