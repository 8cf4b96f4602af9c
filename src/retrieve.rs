//! Retrieval: question → embedding → HNSW top-k (optionally filtered by metadata) → chunks.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use ragtune_embed::SentenceEncoder;
use ragtune_index::{Filter, Index, SearchParams};
use serde::Serialize;

use crate::{Error, Result};

/// One search request.
#[derive(Debug, Clone)]
pub struct Query {
    /// The query text (a question or a passage).
    pub text: String,
    /// Results wanted (top-k).
    pub k: usize,
    /// HNSW `ef_search`; `None` uses the index default.
    pub ef_search: Option<usize>,
    /// Metadata filter (AND of `key=value`).
    pub filter: Option<Filter>,
    /// Exact (flat) search instead of HNSW.
    pub exact: bool,
}

impl Query {
    /// A top-`k` query with the index defaults.
    pub fn new(text: impl Into<String>, k: usize) -> Query {
        Query {
            text: text.into(),
            k,
            ef_search: None,
            filter: None,
            exact: false,
        }
    }
}

/// One retrieved chunk, as the JSON contract of DESIGN.md names its fields.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RetrievedChunk {
    /// The document (file stem; for the LicenseDB the license key).
    pub doc_id: String,
    /// Chunk number within the document (0 = metadata record).
    pub chunk: u32,
    /// Cosine similarity to the query (higher is closer).
    pub score: f32,
    /// The chunk's text.
    pub text: String,
    /// Byte range of the chunk in the source file.
    #[serde(skip)]
    pub range: (u64, u64),
    /// The document's metadata.
    #[serde(skip)]
    pub metadata: BTreeMap<String, String>,
}

/// Hits and where the time went.
#[derive(Debug, Clone)]
pub struct SearchResult {
    /// Best first.
    pub hits: Vec<RetrievedChunk>,
    /// Embedding the query, ms.
    pub embed_ms: f64,
    /// Searching the index and reading the chunks, ms.
    pub search_ms: f64,
}

/// An encoder and the index it built, loaded once and searched many times. `Send + Sync`.
#[derive(Debug)]
pub struct Retriever {
    encoder: SentenceEncoder,
    index: Index,
}

impl Retriever {
    /// Loads the encoder in `encoder_dir` and opens the index at `index_dir`, checking that
    /// the index was built by this encoder.
    ///
    /// # Errors
    /// Missing model files, a missing or corrupt index, or
    /// [`ragtune_index::Error::EmbedderMismatch`].
    pub fn open(encoder_dir: impl AsRef<Path>, index_dir: impl AsRef<Path>) -> Result<Retriever> {
        let encoder = SentenceEncoder::load(encoder_dir)?;
        Self::with_encoder(encoder, index_dir)
    }

    /// Opens the index at `index_dir` for an encoder already loaded.
    ///
    /// # Errors
    /// As [`Retriever::open`].
    pub fn with_encoder(
        encoder: SentenceEncoder,
        index_dir: impl AsRef<Path>,
    ) -> Result<Retriever> {
        let index = Index::open(index_dir.as_ref(), &crate::embedder_id(&encoder))?;
        Ok(Retriever { encoder, index })
    }

    /// The encoder.
    pub fn encoder(&self) -> &SentenceEncoder {
        &self.encoder
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Embeds `query.text` and returns the top-`k` chunks.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] for an empty query or `k == 0`; embedding and index errors.
    pub fn search(&self, query: &Query) -> Result<SearchResult> {
        if query.text.trim().is_empty() {
            return Err(Error::InvalidRequest(
                "the query is empty: give some text to search for".into(),
            ));
        }
        if query.k == 0 {
            return Err(Error::InvalidRequest("k must be at least 1".into()));
        }
        let t0 = Instant::now();
        let embedding = self.encoder.encode(&[query.text.as_str()])?;
        let t1 = Instant::now();
        let params = SearchParams {
            k: query.k,
            ef_search: query.ef_search,
            filter: query.filter.clone(),
            exact: query.exact,
        };
        let hits = self.index.search(embedding.row(0), &params)?;
        let hits = hits
            .into_iter()
            .map(|h| {
                let c = self.index.chunk(h.id)?;
                Ok(RetrievedChunk {
                    doc_id: c.doc_id,
                    chunk: c.chunk,
                    score: h.score,
                    text: c.text,
                    range: (c.start, c.end),
                    metadata: c.metadata,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let t2 = Instant::now();
        Ok(SearchResult {
            hits,
            embed_ms: (t1 - t0).as_secs_f64() * 1e3,
            search_ms: (t2 - t1).as_secs_f64() * 1e3,
        })
    }
}
