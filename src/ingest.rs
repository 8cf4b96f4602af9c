//! Ingest: documents → chunks → embeddings → index directory.
//!
//! Every document becomes: one *metadata record* chunk (chunk 0) when the profile has a
//! [`RecordTemplate`] and the document's front matter has its fields (for the default
//! profile a sentence such as "MIT License (license key mit). The SPDX license identifier is
//! MIT. ..."), whose byte range is the front matter; then its body split by
//! [`ragtune_embed::Chunker`] into chunks 1, 2, ... with byte ranges into the file. Each chunk carries the document's metadata.
//! The index is built in a temporary directory and swapped into place only when complete,
//! so an interrupted ingest leaves the previous index intact.

use std::path::Path;
use std::time::Instant;

use ragtune_embed::{ChunkParams, Chunker, SentenceEncoder};
use ragtune_index::{ChunkRecord, HnswParams, Index, WriterLock, DEFAULT_LOCK_TIMEOUT};

use crate::corpus::{read_corpus, CorpusOptions, Document, Skipped};
use crate::engine::EngineConfig;
use crate::fetch::{FetchConfig, Role};
use crate::profile::{Profile, RecordTemplate};
use crate::progress::Progress;
use crate::Result;

/// How to ingest. The default is the default profile's ([`IngestOptions::for_profile`] of
/// [`crate::profile::default_profile`]).
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Which files to read.
    pub corpus: CorpusOptions,
    /// How the metadata record chunk is written; `None`: no record chunk.
    pub record: Option<RecordTemplate>,
    /// Chunk size and overlap in word pieces.
    pub chunk: ChunkParams,
    /// HNSW build parameters.
    pub hnsw: HnswParams,
    /// Add to (or replace documents in) an existing index instead of rebuilding it.
    pub add: bool,
}

/// What an ingest did.
#[derive(Debug, Clone)]
pub struct IngestReport {
    /// Documents indexed.
    pub documents: usize,
    /// Chunks indexed.
    pub chunks: usize,
    /// Word pieces embedded (special tokens included, padding excluded).
    pub tokens: usize,
    /// Files skipped, with reasons.
    pub skipped: Vec<Skipped>,
    /// Time spent embedding, seconds.
    pub embed_secs: f64,
    /// Time spent building and writing the index, seconds.
    pub index_secs: f64,
    /// Wall time of the whole ingest, seconds.
    pub total_secs: f64,
}

impl IngestOptions {
    /// The default chunking and HNSW settings with `profile`'s skip rules and record
    /// template.
    pub fn for_profile(profile: &Profile) -> IngestOptions {
        IngestOptions {
            corpus: CorpusOptions {
                skip: profile.skip.clone(),
                ..CorpusOptions::default()
            },
            record: profile.record.clone(),
            chunk: ChunkParams::default(),
            hnsw: HnswParams::default(),
            add: false,
        }
    }
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions::for_profile(&crate::profile::default_profile())
    }
}

/// Chunks of one document: the metadata record written by `record` (if any) and the body
/// chunks.
///
/// # Errors
/// Tokenizer errors.
pub fn chunk_document(
    doc: &Document,
    chunker: &Chunker,
    record: Option<&RecordTemplate>,
) -> Result<Vec<ChunkRecord>> {
    let mut out = Vec::new();
    if let Some(record) = record.and_then(|r| r.render(doc)) {
        out.push(ChunkRecord {
            doc_id: doc.doc_id.clone(),
            chunk: 0,
            start: 0,
            end: doc.body_start as u64,
            text: record,
            metadata: doc.metadata.clone(),
        });
    }
    let body = doc.body();
    for (i, span) in chunker.split(body)?.into_iter().enumerate() {
        out.push(ChunkRecord {
            doc_id: doc.doc_id.clone(),
            chunk: i as u32 + 1,
            start: (doc.body_start + span.start) as u64,
            end: (doc.body_start + span.end) as u64,
            text: body[span.start..span.end].to_string(),
            metadata: doc.metadata.clone(),
        });
    }
    Ok(out)
}

/// Reads `corpus_dir`, embeds it with `encoder` and writes the index at `index_dir`
/// (replacing any index there atomically, or adding to it with [`IngestOptions::add`]).
///
/// # Errors
/// [`crate::Error::EmptyCorpus`] when nothing can be read; index and embedding errors.
pub fn ingest(
    encoder: &SentenceEncoder,
    corpus_dir: &Path,
    index_dir: &Path,
    options: &IngestOptions,
    progress: &Progress,
) -> Result<IngestReport> {
    let started = Instant::now();
    let corpus = read_corpus(corpus_dir, &options.corpus)?;
    let chunker = Chunker::new(encoder.tokenizer(), options.chunk)?;
    let bar = progress.bar(corpus.documents.len() as u64, "chunking documents");
    let mut chunks = Vec::new();
    for doc in &corpus.documents {
        chunks.extend(chunk_document(doc, &chunker, options.record.as_ref())?);
        bar.inc(1);
    }
    bar.finish_and_clear();

    let embed_started = Instant::now();
    let bar = progress.bar_with(
        chunks.len() as u64,
        "{msg:<12} [{bar:30}] {human_pos}/{human_len} chunks, {prefix} word pieces/s, eta {eta}",
        "embedding",
    );
    let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
    let mut tokens = 0usize;
    let embeddings = encoder.encode_with_progress(&texts, |done| {
        tokens += done.tokens;
        let secs = embed_started.elapsed().as_secs_f64().max(1e-6);
        bar.set_prefix(format!("{:.0}", tokens as f64 / secs));
        bar.inc(done.texts as u64);
    })?;
    bar.finish_and_clear();
    let embed_secs = embed_started.elapsed().as_secs_f64();

    let index_started = Instant::now();
    let spinner = progress.spinner(format!("building HNSW index of {} chunks", chunks.len()));
    let n_chunks = chunks.len();
    // One writer at a time across processes, from reading the manifest to the commit
    // (embedding, the slow part, runs before, unlocked).
    let _lock = WriterLock::acquire(index_dir, DEFAULT_LOCK_TIMEOUT)?;
    let existing = if options.add {
        match Index::open(index_dir, &crate::embedder_id(encoder)) {
            Ok(index) => Some(index),
            Err(ragtune_index::Error::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    if let Some(mut index) = existing {
        for doc in &corpus.documents {
            index.delete_doc(&doc.doc_id)?;
        }
        index.add(chunks, &embeddings.data)?;
    } else {
        Index::create_or_replace(
            index_dir,
            crate::embedder_id(encoder),
            options.hnsw,
            chunks,
            &embeddings.data,
        )?;
    }
    spinner.finish_and_clear();
    Ok(IngestReport {
        documents: corpus.documents.len(),
        chunks: n_chunks,
        tokens,
        skipped: corpus.skipped,
        embed_secs,
        index_secs: index_started.elapsed().as_secs_f64(),
        total_secs: started.elapsed().as_secs_f64(),
    })
}

/// Builds the default index of `config` on first use: when `config` names no index
/// directory, no embedder of its own, the profile has a pinned corpus and its default index
/// directory does not exist yet, the corpus is fetched (if missing) and ingested there with
/// the profile's options. Returns the report of the build, `None` when nothing was to do.
///
/// # Errors
/// Fetch and [`ingest`] errors.
pub fn ensure_default_index(
    config: &EngineConfig,
    profile: &Profile,
    encoder: &SentenceEncoder,
    progress: &Progress,
) -> Result<Option<IngestReport>> {
    let Some(folder) = &profile.pinned_corpus else {
        return Ok(None);
    };
    let index_dir = config.index_dir(profile);
    if config.index.is_some() || config.embedder.is_some() || index_dir.exists() {
        return Ok(None);
    }
    progress.notice(&format!(
        "no index at {}: building it from the pinned corpus of profile `{}` (first run; \
         `ragtune ingest` rebuilds it)",
        index_dir.display(),
        profile.name
    ));
    let fetch = FetchConfig::new(&config.models_dir);
    let corpus = crate::fetch::ensure(&fetch, Role::Corpus, progress)?.join(folder);
    let report = ingest(
        encoder,
        &corpus,
        &index_dir,
        &IngestOptions::for_profile(profile),
        progress,
    )?;
    progress.notice(&format!(
        "indexed {} documents as {} chunks in {:.1} s",
        report.documents, report.chunks, report.total_secs
    ));
    Ok(Some(report))
}
