//! Ingest: documents → chunks → embeddings → index directory.
//!
//! Every document becomes: one *metadata record* chunk (chunk 0) when it has front matter
//! with a name, SPDX id, category or owner (a sentence such as "MIT License (license key
//! mit). The SPDX license identifier is MIT. The category is Permissive. ..."), whose byte
//! range is the front matter; then its body split by [`ragtune_embed::Chunker`] into chunks
//! 1, 2, ... with byte ranges into the file. Each chunk carries the document's metadata.
//! The index is built in a temporary directory and swapped into place only when complete,
//! so an interrupted ingest leaves the previous index intact.

use std::path::Path;
use std::time::Instant;

use ragtune_embed::{ChunkParams, Chunker, SentenceEncoder};
use ragtune_index::{ChunkRecord, HnswParams, Index, WriterLock, DEFAULT_LOCK_TIMEOUT};

use crate::corpus::{read_corpus, CorpusOptions, Document, Skipped};
use crate::progress::Progress;
use crate::Result;

/// How to ingest.
#[derive(Debug, Clone, Default)]
pub struct IngestOptions {
    /// Which files to read.
    pub corpus: CorpusOptions,
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

/// Chunks of one document: the metadata record (if any) and the body chunks.
///
/// # Errors
/// Tokenizer errors.
pub fn chunk_document(doc: &Document, chunker: &Chunker) -> Result<Vec<ChunkRecord>> {
    let mut out = Vec::new();
    if let Some(record) = doc.metadata_record() {
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
        chunks.extend(chunk_document(doc, &chunker)?);
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
