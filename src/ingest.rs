//! Ingest: documents → chunks → embeddings → index directory.
//!
//! Every document becomes: one *metadata record* chunk (chunk 0) when the profile has a
//! [`RecordTemplate`] and the document's front matter has its fields (for the default
//! profile a sentence such as "MIT License (license key mit). The SPDX license identifier is
//! MIT. ..."), whose byte range is the front matter; then its body split by
//! [`ragtune_embed::Chunker`] into chunks 1, 2, ... with byte ranges into the file. Each chunk carries the document's metadata.
//! The index is built in a temporary directory and swapped into place only when complete,
//! so an interrupted ingest leaves the previous index intact.
//!
//! **First run in stages.** Embedding the full LicenseDB takes minutes (4-12 on the 2-core
//! CI machine kind, by CPU), its 2,165 metadata records a few seconds. So the chat builds
//! the records first, opens its prompt, and embeds everything on a thread
//! ([`ensure_default_index_in_background`], [`BackgroundIngest`]); the engine opens the
//! full index when it is ready. Until then `<index>.partial` ([`partial_marker`]) marks the
//! index as records only, so a run cut short is completed by the next one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
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
    /// Only the metadata record chunks (no body chunks): the first stage of a first run.
    pub records_only: bool,
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
            records_only: false,
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
    let mut out: Vec<ChunkRecord> = record_chunk(doc, record).into_iter().collect();
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

/// The metadata record chunk of `doc` (chunk 0) written by `record`, when the document's
/// front matter has the template's fields.
fn record_chunk(doc: &Document, record: Option<&RecordTemplate>) -> Option<ChunkRecord> {
    let text = record?.render(doc)?;
    Some(ChunkRecord {
        doc_id: doc.doc_id.clone(),
        chunk: 0,
        start: 0,
        end: doc.body_start as u64,
        text,
        metadata: doc.metadata.clone(),
    })
}

/// Where the marker of a records-only index is: `<index_dir>.partial`, beside the index
/// directory (an index is replaced as a whole directory, and the marker must outlive that).
/// It exists from before the first stage of a first run until the full index replaced the
/// partial one; any full ingest into `index_dir` removes it.
pub fn partial_marker(index_dir: &Path) -> PathBuf {
    let mut name = index_dir.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    index_dir.with_file_name(name)
}

/// How far an ingest got: chunks embedded of the chunks to embed, readable from another
/// thread while it runs.
#[derive(Debug, Default)]
pub struct IngestStatus {
    embedded: AtomicUsize,
    total: AtomicUsize,
}

impl IngestStatus {
    /// `(chunks embedded, chunks to embed)`; `(0, 0)` while the documents are being chunked.
    pub fn chunks(&self) -> (usize, usize) {
        (
            self.embedded.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
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
    ingest_with_status(
        encoder,
        corpus_dir,
        index_dir,
        options,
        progress,
        &IngestStatus::default(),
    )
}

/// [`ingest`], counting the chunks embedded in `status` as it goes. A full ingest (not
/// [`IngestOptions::add`], not [`IngestOptions::records_only`]) removes the
/// [`partial_marker`] of `index_dir` once the index is in place.
///
/// # Errors
/// As [`ingest`]; [`crate::Error::EmptyCorpus`] also for a records-only ingest of documents
/// that have no record.
pub fn ingest_with_status(
    encoder: &SentenceEncoder,
    corpus_dir: &Path,
    index_dir: &Path,
    options: &IngestOptions,
    progress: &Progress,
    status: &IngestStatus,
) -> Result<IngestReport> {
    let started = Instant::now();
    if options.add && partial_marker(index_dir).exists() {
        // A first run's full ingest would replace the index, and what was added with it.
        return Err(crate::Error::Missing {
            what: "full index (a first run indexed the metadata records only)",
            path: index_dir.to_path_buf(),
            fix: "run `ragtune ingest` (or let `ragtune chat` finish it) before adding documents",
        });
    }
    let corpus = read_corpus(corpus_dir, &options.corpus)?;
    let chunker = Chunker::new(encoder.tokenizer(), options.chunk)?;
    let bar = progress.bar(corpus.documents.len() as u64, "chunking documents");
    let mut chunks = Vec::new();
    for doc in &corpus.documents {
        if options.records_only {
            chunks.extend(record_chunk(doc, options.record.as_ref()));
        } else {
            chunks.extend(chunk_document(doc, &chunker, options.record.as_ref())?);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if chunks.is_empty() {
        return Err(crate::Error::EmptyCorpus {
            path: corpus_dir.to_path_buf(),
            detail: format!(
                "{} documents read, none with a metadata record (a records-only ingest needs \
                 the profile's record fields in the front matter)",
                corpus.documents.len()
            ),
        });
    }
    status.total.store(chunks.len(), Ordering::Relaxed);

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
        status.embedded.fetch_add(done.texts, Ordering::Relaxed);
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
    if !options.add && !options.records_only {
        remove_partial_marker(index_dir)?;
    }
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

/// Removes `index_dir`'s [`partial_marker`], if any.
fn remove_partial_marker(index_dir: &Path) -> Result<()> {
    match std::fs::remove_file(partial_marker(index_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(crate::Error::Io {
            path: partial_marker(index_dir),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The directory of `config`'s default index when that has to be built or completed: the profile has a pinned corpus, `config` names no index directory and no
/// embedder of its own, and the index directory does not exist or holds the records only
/// ([`partial_marker`]). `None` otherwise.
fn default_index_to_build(config: &EngineConfig, profile: &Profile) -> Option<PathBuf> {
    profile.pinned_corpus.as_ref()?;
    let index_dir = config.index_dir(profile);
    let to_build = config.index.is_none()
        && config.embedder.is_none()
        && (!index_dir.exists() || partial_marker(&index_dir).exists());
    to_build.then_some(index_dir)
}

/// The pinned corpus folder of `profile` (fetched when missing).
fn pinned_corpus(config: &EngineConfig, profile: &Profile, progress: &Progress) -> Result<PathBuf> {
    let folder = profile.pinned_corpus.as_deref().unwrap_or_default();
    let fetch = FetchConfig::new(&config.models_dir);
    Ok(crate::fetch::ensure(&fetch, Role::Corpus, progress)?.join(folder))
}

/// Builds the default index of `config` on first use: when `config` names no index
/// directory, no embedder of its own, the profile has a pinned corpus and its default index
/// directory does not exist yet (or holds the metadata records only, [`partial_marker`]),
/// the corpus is fetched (if missing) and ingested there with the profile's options. Returns
/// the report of the build, `None` when nothing was to do.
///
/// # Errors
/// Fetch and [`ingest`] errors.
pub fn ensure_default_index(
    config: &EngineConfig,
    profile: &Profile,
    encoder: &SentenceEncoder,
    progress: &Progress,
) -> Result<Option<IngestReport>> {
    let Some(index_dir) = default_index_to_build(config, profile) else {
        return Ok(None);
    };
    let partial = index_dir.exists();
    progress.notice(&format!(
        "{} {}: building it from the pinned corpus of profile `{}` (first run; `ragtune \
         ingest` rebuilds it)",
        if partial {
            "metadata records only in"
        } else {
            "no index at"
        },
        index_dir.display(),
        profile.name
    ));
    let corpus = pinned_corpus(config, profile, progress)?;
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

/// A full ingest running on its own thread (with its own encoder), started by
/// [`ensure_default_index_in_background`].
#[derive(Debug)]
pub struct BackgroundIngest {
    index_dir: PathBuf,
    status: Arc<IngestStatus>,
    started: Instant,
    handle: Option<JoinHandle<Result<(IngestReport, SentenceEncoder)>>>,
}

impl BackgroundIngest {
    /// The index directory it writes.
    pub fn index_dir(&self) -> &Path {
        &self.index_dir
    }

    /// `(chunks embedded, chunks to embed)` so far.
    pub fn chunks(&self) -> (usize, usize) {
        self.status.chunks()
    }

    /// Seconds since it started.
    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Whether the thread has finished (successfully or not).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the thread: the report and the encoder it embedded with (to search the
    /// new index with).
    ///
    /// # Errors
    /// The ingest's error; [`crate::Error::Io`] when the thread panicked.
    pub fn join(mut self) -> Result<(IngestReport, SentenceEncoder)> {
        let handle = self.handle.take().expect("joined once");
        handle.join().unwrap_or_else(|_| {
            Err(crate::Error::Io {
                path: self.index_dir.clone(),
                source: std::io::Error::other("the background ingest panicked"),
            })
        })
    }
}

/// [`ensure_default_index`] in two stages, for a prompt that should open early: when the
/// default index has to be built and the profile writes metadata records, the records alone
/// are embedded now (seconds) and indexed at the default index directory, marked partial
/// ([`partial_marker`]), and the full ingest then runs on a thread with an encoder of its own
/// (loaded from `encoder_dir` with `config`'s options), replacing the partial index when
/// done. A partial index left by an earlier run is completed the same way. `None` when
/// there was nothing to build, or when the profile has no record template (then everything
/// is built before returning, as [`ensure_default_index`] does).
///
/// # Errors
/// Fetch errors, the records' [`ingest`] errors, and [`crate::Error::Io`] for a marker that
/// cannot be written.
pub fn ensure_default_index_in_background(
    config: &EngineConfig,
    profile: &Profile,
    encoder: &SentenceEncoder,
    encoder_dir: &Path,
    progress: &Progress,
) -> Result<Option<BackgroundIngest>> {
    let Some(index_dir) = default_index_to_build(config, profile) else {
        return Ok(None);
    };
    if profile.record.is_none() {
        ensure_default_index(config, profile, encoder, progress)?;
        return Ok(None);
    }
    let corpus = pinned_corpus(config, profile, progress)?;
    if !index_dir.exists() {
        progress.notice(&format!(
            "no index at {}: indexing the metadata records of the pinned corpus of profile \
             `{}` first (first run), then the full texts in the background",
            index_dir.display(),
            profile.name
        ));
    } else {
        progress.notice(&format!(
            "{} holds the metadata records only: embedding the full texts in the background",
            index_dir.display()
        ));
    }
    let (encoder_dir, encoder_options) = (encoder_dir.to_path_buf(), config.encoder_options());
    let load = move || SentenceEncoder::load_with(&encoder_dir, encoder_options);
    let options = IngestOptions::for_profile(profile);
    ingest_in_stages(encoder, load, &corpus, &index_dir, &options, progress).map(Some)
}

/// Ingests `corpus_dir` into `index_dir` in two stages: when `index_dir` does not exist, the
/// metadata records alone (`options` with [`IngestOptions::records_only`], embedded with
/// `encoder` now), under a [`partial_marker`]; then everything (`options`) on a thread with the
/// encoder `load_encoder` gives it, which replaces the partial index and removes the marker.
/// An `index_dir` that exists is taken as the first stage's (the caller checked its marker).
///
/// # Errors
/// The records' [`ingest`] errors; [`crate::Error::Io`] for a marker that cannot be written
/// or a thread that cannot be started. The full ingest's errors come from
/// [`BackgroundIngest::join`].
pub fn ingest_in_stages(
    encoder: &SentenceEncoder,
    load_encoder: impl FnOnce() -> std::result::Result<SentenceEncoder, ragtune_embed::Error>
        + Send
        + 'static,
    corpus_dir: &Path,
    index_dir: &Path,
    options: &IngestOptions,
    progress: &Progress,
) -> Result<BackgroundIngest> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| crate::Error::Io { path, source }
    };
    if !index_dir.exists() {
        let marker = partial_marker(index_dir);
        if let Some(parent) = marker.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(
            &marker,
            b"metadata records only; the full ingest has not finished\n",
        )
        .map_err(io(&marker))?;
        let records = IngestOptions {
            records_only: true,
            ..options.clone()
        };
        let report = ingest(encoder, corpus_dir, index_dir, &records, progress)?;
        progress.notice(&format!(
            "indexed the metadata records of {} documents in {:.1} s",
            report.documents, report.total_secs
        ));
    }
    let status = Arc::new(IngestStatus::default());
    let (thread_status, corpus, index, options) = (
        status.clone(),
        corpus_dir.to_path_buf(),
        index_dir.to_path_buf(),
        options.clone(),
    );
    let handle = std::thread::Builder::new()
        .name("ragtune-ingest".into())
        .spawn(move || {
            let encoder = load_encoder()?;
            let report = ingest_with_status(
                &encoder,
                &corpus,
                &index,
                &options,
                &Progress::hidden(),
                &thread_status,
            )?;
            Ok((report, encoder))
        })
        .map_err(io(index_dir))?;
    Ok(BackgroundIngest {
        index_dir: index_dir.to_path_buf(),
        status,
        started: Instant::now(),
        handle: Some(handle),
    })
}
