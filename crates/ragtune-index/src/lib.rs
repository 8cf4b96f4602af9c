//! A vector index for sentence embeddings, with a chunk store and a checksummed on-disk format.
//!
//! Vectors are `dim`-dimensional f32, L2-normalised; similarity is their dot product (=
//! cosine), and every [`Hit::score`] is that cosine (higher is better). Each vector belongs to
//! a [`ChunkRecord`] (document id, chunk number, byte range, text, metadata) with a stable
//! `u64` id.
//!
//! Search is approximate (HNSW) on large segments and exact on small ones; metadata
//! [`Filter`]s and deleted documents are honoured in both.
//!
//! # Example
//!
//! ```
//! use ragtune_index::{ChunkRecord, EmbedderId, HnswParams, Index, SearchParams};
//!
//! let dir = tempfile::tempdir()?;
//! let embedder = EmbedderId {
//!     model: "toy".into(),
//!     model_sha256: "00".into(),
//!     dim: 3,
//!     pooling: "mean".into(),
//!     normalized: true,
//! };
//! let chunk = |doc: &str, text: &str| ChunkRecord {
//!     doc_id: doc.into(),
//!     chunk: 0,
//!     start: 0,
//!     end: text.len() as u64,
//!     text: text.into(),
//!     metadata: Default::default(),
//! };
//! let chunks = vec![chunk("mit", "permission is hereby granted"), chunk("gpl", "copyleft")];
//! let vectors = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
//! let index = Index::create(dir.path().join("idx"), embedder.clone(), HnswParams::default(), chunks, &vectors)?;
//!
//! let index = Index::open(dir.path().join("idx"), &embedder)?;
//! let hits = index.search(&[0.9, 0.1, 0.0], &SearchParams::top(1))?;
//! assert_eq!(index.chunk(hits[0].id)?.doc_id, "mit");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # On-disk format
//!
//! An index is a directory:
//!
//! ```text
//! manifest.json          names the live segments; replaced atomically on every change
//! seg-000001.vectors     f32 little-endian, (rows, dim) row-major
//! seg-000001.graph       the frozen HNSW graph (see below)
//! seg-000001.chunks      the chunk store: ids, offset table, encoded records
//! seg-000002.*           a segment added later by `Index::add`
//! ```
//!
//! Every binary file starts with a fixed 64-byte header (magic `RTVEC\0\0\0` / `RTGRAPH\0` /
//! `RTCHUNK\0`, u32 format version, u64 payload length, u32 crc32 of the payload, two u64
//! per-kind fields, and a crc32 of the header itself); all integers are fixed-width
//! little-endian. The payload starts at byte 64, so in a page-aligned memory map the vectors
//! can be read in place as `&[f32]` (alignment is checked at run time, never assumed).
//!
//! `manifest.json` is pretty JSON followed by a trailer line `crc32 xxxxxxxx` over the JSON
//! body. It records the format version, the [`EmbedderId`], the [`Metric`], the
//! [`HnswParams`], the dimension, the next chunk id and segment number, the live chunk
//! count, the sorted tombstone ids, and for each segment file its name, length and payload
//! crc32. Opening an index checks the manifest trailer, every file's length, header, and
//! payload checksum (crc32fast, ~10 GB/s), so a flipped byte or a truncation anywhere gives
//! [`Error::DataCorruption`] naming the file.
//!
//! ## Crash safety
//!
//! Segment files are immutable once written. Every file is written to a `*.tmp` name in the
//! same directory, fsynced, renamed into place, and the directory fsynced. An update
//! (`add`, `delete_doc`, `compact`, `create_or_replace`) writes any new segment files first,
//! then replaces `manifest.json` (the commit point), then deletes files the new manifest no
//! longer names. A process killed at any step leaves the previous manifest and every file it
//! names intact; unreferenced segment files and `*.tmp` files are ignored by `open` and swept
//! by the next update. A new index is built in a temporary sibling directory and renamed into
//! place.
//!
//! ## Why the graph is frozen into our own layout
//!
//! The graph is built with `hnsw_rs` (good parallel construction), but its in-memory form is a
//! web of `Arc`s and locks, its own dump/reload code prints and may exit, and its search
//! allocates per query. After the build we read the levels, neighbour lists and entry point
//! out once and store them as flat fixed-stride `u32` tables (layer 0: `1 + 2M` words per point,
//! a count then ids; upper layers: `1 + M` words per block). That file is memory-mapped and
//! validated on open (counts and ids in range), and searched by our own loop: greedy descent
//! on upper layers, best-first search with `ef` on layer 0, a per-thread generation-stamped
//! visited array and reused heaps (no `&mut self`, no per-query allocation beyond the result),
//! prefetch of the next neighbour's vector, and an AVX2+FMA dot product chosen at run time.
//! `hnsw_rs` types never appear in this crate's API.
//!
//! Files are little-endian; the crate refuses to compile for big-endian targets.

#![warn(missing_docs)]

mod chunks;
mod directory;
mod error;
mod filter;
mod format;
mod fusion;
mod graph;
mod index;
pub mod lexical;
mod lock;
mod simd;
pub mod synthetic;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::chunks::{decode_record, encode_record, RecordRef};
pub use crate::directory::{Directory, FileBytes, FsDirectory, RamDirectory, TMP_SUFFIX};
pub use crate::error::{Error, Result, VectorProblem};
pub use crate::filter::{Filter, DOC_ID_KEY};
pub use crate::format::{Header, FORMAT_VERSION, HEADER_LEN, MANIFEST};
pub use crate::fusion::{rrf, rrf_by_doc, RRF_K};
pub use crate::index::{Index, EXACT_BELOW, FIELD_MIN_COVERAGE};
pub use crate::lock::{lock_path, WriterLock, DEFAULT_LOCK_TIMEOUT};
pub use crate::simd::dot;

/// Identity of the embedding model that produced an index's vectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedderId {
    /// Human-readable model name (informational when `model_sha256` is set).
    pub model: String,
    /// sha256 (hex) of the model weights.
    pub model_sha256: String,
    /// Output dimension.
    pub dim: u32,
    /// Pooling, e.g. `"mean"` or `"cls"`.
    pub pooling: String,
    /// Whether the embedder L2-normalises its output.
    pub normalized: bool,
}

impl EmbedderId {
    /// Whether vectors from `self` and `other` are comparable: same weights (sha256, or the
    /// name when either hash is empty), dimension, pooling and normalisation.
    pub fn same_model(&self, other: &EmbedderId) -> bool {
        let weights = if self.model_sha256.is_empty() || other.model_sha256.is_empty() {
            self.model == other.model
        } else {
            self.model_sha256.eq_ignore_ascii_case(&other.model_sha256)
        };
        weights
            && self.dim == other.dim
            && self.pooling == other.pooling
            && self.normalized == other.normalized
    }
}

impl fmt::Display for EmbedderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sha: String = self.model_sha256.chars().take(12).collect();
        write!(
            f,
            "{} (sha256 {sha}, {}-d, {} pooling{})",
            self.model,
            self.dim,
            self.pooling,
            if self.normalized { ", normalised" } else { "" }
        )
    }
}

/// Similarity metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Dot product of L2-normalised vectors.
    #[default]
    Cosine,
}

/// HNSW graph parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Links per point on upper layers (layer 0 keeps `2 * m`); 2..=255.
    pub m: usize,
    /// Candidate list size while building; >= 1.
    pub ef_construction: usize,
    /// Default candidate list size while searching (raised to `k` when smaller); >= 1.
    /// The default, 128, gives recall@10 0.981 against exact search on the 22,836 MiniLM
    /// chunk vectors of the LicenseDB with 1,000 rule-text queries (64 gives 0.958, 256 0.992;
    /// `examples/ann_bench.rs`).
    pub ef_search: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams {
            m: 16,
            ef_construction: 200,
            ef_search: 128,
        }
    }
}

impl HnswParams {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when `m` is outside 2..=255 or an `ef` is 0.
    pub fn validate(&self) -> Result<()> {
        if !(2..=255).contains(&self.m) {
            return Err(Error::InvalidParameter {
                name: "HNSW m",
                value: self.m,
                expected: "a value in 2..=255",
            });
        }
        for (name, value) in [
            ("HNSW ef_construction", self.ef_construction),
            ("HNSW ef_search", self.ef_search),
        ] {
            if value == 0 {
                return Err(Error::InvalidParameter {
                    name,
                    value,
                    expected: "a value >= 1",
                });
            }
        }
        Ok(())
    }
}

/// One chunk of a source document.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChunkRecord {
    /// Document id (e.g. the file stem).
    pub doc_id: String,
    /// Chunk number within the document.
    pub chunk: u32,
    /// Start byte offset in the source document.
    pub start: u64,
    /// End byte offset (exclusive) in the source document.
    pub end: u64,
    /// The chunk text.
    pub text: String,
    /// Metadata (e.g. from YAML front matter).
    pub metadata: BTreeMap<String, String>,
}

/// Parameters of one search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchParams {
    /// Number of hits wanted.
    pub k: usize,
    /// Candidate list size; `None` = the index default ([`HnswParams::ef_search`]).
    pub ef_search: Option<usize>,
    /// Only chunks matching this filter.
    pub filter: Option<Filter>,
    /// Exact (brute-force) search instead of the graph.
    pub exact: bool,
}

impl SearchParams {
    /// Top-`k`, default ef, no filter, approximate.
    pub fn top(k: usize) -> Self {
        SearchParams {
            k,
            ef_search: None,
            filter: None,
            exact: false,
        }
    }
}

impl Default for SearchParams {
    fn default() -> Self {
        SearchParams::top(10)
    }
}

/// One search result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Stable chunk id (see [`Index::chunk`]).
    pub id: u64,
    /// Cosine similarity to the query, in [-1, 1]; higher is better.
    pub score: f32,
}

/// Counts and sizes of an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexStats {
    /// Live chunks.
    pub chunks: usize,
    /// Distinct documents with live chunks.
    pub docs: usize,
    /// Segments.
    pub segments: usize,
    /// Deleted chunks not yet compacted away.
    pub tombstones: usize,
    /// Bytes of the manifest and all live segment files.
    pub bytes: u64,
}
