//! The crate's one error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in this crate.
///
/// Each variant carries the path, shape or id involved, and its message says what to do.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on `path`.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file of the index is damaged (bad magic, checksum mismatch, truncated, inconsistent).
    #[error(
        "index file {path} is corrupt ({detail}): rebuild the index with `ragtune ingest`, \
         or restore it from a backup"
    )]
    DataCorruption {
        /// The damaged file.
        path: PathBuf,
        /// What check failed.
        detail: String,
    },
    /// A file was written by a format version this build cannot read.
    #[error(
        "index file {path} has format version {found}, but this build reads version {supported}: \
         rebuild the index with this version of `ragtune ingest`, or use a matching ragtune"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found in the file.
        found: u32,
        /// The version this build supports.
        supported: u32,
    },
    /// The index was built with another embedding model than the one configured.
    #[error(
        "index at {path} was built with embedder {found} but {expected} is configured: \
         re-run `ragtune ingest` to rebuild it, or point --index elsewhere"
    )]
    EmbedderMismatch {
        /// The index directory.
        path: PathBuf,
        /// The embedder the caller configured.
        expected: Box<crate::EmbedderId>,
        /// The embedder recorded in the index.
        found: Box<crate::EmbedderId>,
    },
    /// A vector or query has the wrong number of components.
    #[error(
        "vector dimension mismatch: the index holds {expected}-d vectors but got {got}-d: \
         use the same embedder for queries as for ingest"
    )]
    DimensionMismatch {
        /// The index dimension.
        expected: usize,
        /// The dimension given.
        got: usize,
    },
    /// No index exists at `path`.
    #[error("no index at {path}: build one with `ragtune ingest`, or point --index elsewhere")]
    NotFound {
        /// Where one was looked for.
        path: PathBuf,
    },
    /// An index already exists at `path` and the caller did not ask to replace it.
    #[error(
        "an index already exists at {path}: use create_or_replace (`ragtune ingest --force`) \
         to replace it, or choose another directory"
    )]
    AlreadyExists {
        /// The existing index.
        path: PathBuf,
    },
    /// An index cannot be created from zero chunks.
    #[error("cannot build an index from zero chunks: check that the input folder holds documents")]
    EmptyIndex,
    /// A filter expression could not be parsed.
    #[error(
        "invalid filter {expr:?}: {detail}; write `key=value` conditions joined by `,` or `&&`, \
         e.g. `category=Copyleft,doc_id=gpl-3.0`"
    )]
    InvalidFilter {
        /// The expression as given.
        expr: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A chunk id that is not in the index (never existed, or deleted and compacted away).
    #[error("chunk id {id} is not in the index: search again to get current ids")]
    UnknownChunk {
        /// The id asked for.
        id: u64,
    },
    /// A parameter is outside the range it allows (an embedder dimension of 0, HNSW `m`
    /// outside 2..=255, an `ef` of 0).
    #[error("invalid {name} = {value}: expected {expected}")]
    InvalidParameter {
        /// The parameter, e.g. `HNSW m`.
        name: &'static str,
        /// The value given.
        value: usize,
        /// The range it allows, in words.
        expected: &'static str,
    },
    /// The vectors given do not hold one `dim`-component row per chunk.
    #[error(
        "{chunks} chunks need {chunks} x {dim} = {expected} vector components, got {got}: \
         pass one embedding per chunk"
    )]
    VectorLength {
        /// Chunks given.
        chunks: usize,
        /// The embedder dimension.
        dim: usize,
        /// Components needed: `chunks * dim`.
        expected: usize,
        /// Components given.
        got: usize,
    },
    /// A vector to index is zero or not finite.
    #[error("invalid input: vector {row} {problem}: embeddings must be finite and non-zero")]
    InvalidVector {
        /// The 0-based row of the vector among those given.
        row: usize,
        /// What is wrong with it.
        problem: VectorProblem,
    },
    /// A query vector is zero or not finite.
    #[error("invalid input: query {problem}: embed the query with the index's embedder")]
    InvalidQuery {
        /// What is wrong with it.
        problem: VectorProblem,
    },
    /// Something to write is larger than the index format can hold (u32 counts and offsets).
    #[error(
        "invalid input: {got} {what} exceeds the limit of {limit}: split oversized documents, \
         or ingest them in several batches"
    )]
    TooLarge {
        /// What is counted, e.g. `chunks in one segment`.
        what: &'static str,
        /// The most the format holds.
        limit: u64,
        /// The amount given (at least; counting stops at the first one over the limit).
        got: u64,
    },
    /// A chunk store was given another number of records than of ids.
    #[error("invalid input: {records} chunk records for {ids} ids: pass one record per id")]
    RecordCountMismatch {
        /// Ids given.
        ids: usize,
        /// Records given.
        records: usize,
    },
    /// A row number past the end of a chunk store.
    #[error("invalid input: row {row} out of range {count}: rows run from 0 to count - 1")]
    RowOutOfRange {
        /// The row asked for.
        row: usize,
        /// Records in the store.
        count: usize,
    },
    /// The manifest could not be serialised to JSON (a bug: please report it).
    #[error("cannot serialise manifest: {source}")]
    ManifestEncode {
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// An index path this crate cannot use.
    #[error("invalid index path {path}: {reason}; pass a directory path ending in a name")]
    InvalidPath {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file name inside an index directory that is empty, `..` or holds a path separator.
    #[error(
        "bad file name {name:?}: index file names must be non-empty, not `..` and hold no \
         `/` or `\\`"
    )]
    InvalidFileName {
        /// The name given.
        name: String,
    },
    /// Another process holds the index's writer lock.
    #[error(
        "the index at {path} is being updated by another ragtune process{} (waited {waited:?}): \
         wait for it to finish and try again",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        /// The index directory.
        path: PathBuf,
        /// The holder's process id, when it could be read.
        pid: Option<u32>,
        /// How long this process waited.
        waited: std::time::Duration,
    },
    /// The manifest changed on disk since this handle read it: another writer committed in
    /// between, and committing now would drop its changes.
    #[error(
        "the index at {path} was changed by another writer (generation {expected} -> {found}) \
         since it was opened: nothing was committed; open it again and retry"
    )]
    ConcurrentUpdate {
        /// The index directory.
        path: PathBuf,
        /// The generation this handle read.
        expected: u64,
        /// The generation on disk.
        found: u64,
    },
}

/// What is wrong with a vector ([`Error::InvalidVector`], [`Error::InvalidQuery`]).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorProblem {
    /// A component is NaN or infinite (or the squared norm overflows).
    NonFinite,
    /// The vector has zero norm.
    ZeroNorm,
}

impl std::fmt::Display for VectorProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VectorProblem::NonFinite => "contains non-finite values",
            VectorProblem::ZeroNorm => "has zero norm",
        })
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn corrupt(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::DataCorruption {
            path: path.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
