//! [`Index`]: segments + manifest, create/open/search/add/delete/compact.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::chunks::{encode_store, ChunkStore};
use crate::directory::{Directory, FileBytes, FsDirectory, TMP_SUFFIX};
use crate::error::{Error, Result, VectorProblem};
use crate::filter::{Filter, DOC_ID_KEY};
use crate::format::{
    cast_slice, verify_file, write_file, FileEntry, Manifest, SegmentEntry, FORMAT_VERSION,
    HEADER_LEN, MAGIC_CHUNKS, MAGIC_GRAPH, MAGIC_LEXICAL, MAGIC_VECTORS, MANIFEST,
};
use crate::graph::{self, GraphView};
use crate::lexical::{self, LexicalView};
use crate::{ChunkRecord, EmbedderId, Hit, HnswParams, IndexStats, Metric, SearchParams};

/// The least share of a field value's idf that a query must contain for
/// [`Index::search_fields`] to count the value.
pub const FIELD_MIN_COVERAGE: f32 = 0.5;

/// Segments with fewer rows than this are searched exactly (a graph is still stored).
pub const EXACT_BELOW: usize = 1000;
/// Threads used to build a graph.
const BUILD_THREADS: usize = 2;

/// Per-segment metadata tables, decoded lazily from the chunk store on first need.
#[derive(Debug)]
struct SegMeta {
    docs: Vec<String>,
    doc_of_row: Vec<u32>,
    postings: HashMap<(String, String), Vec<u32>>,
}

#[derive(Debug)]
struct Segment {
    dim: usize,
    vectors: FileBytes,
    vec_path: PathBuf,
    graph: GraphView,
    chunks: ChunkStore,
    deleted: Vec<u64>,
    n_deleted: usize,
    meta: OnceLock<SegMeta>,
    lexical: Option<LexicalView>,
    phrases: OnceLock<PhraseMap>,
}

/// Identifier phrases of a segment: for each metadata field value (and the document id),
/// its [`lexical::phrase_tokens`] joined by spaces → (field, first row of each document
/// carrying it).
#[derive(Debug, Default)]
struct PhraseMap {
    fields: Vec<String>,
    by_phrase: HashMap<String, Vec<(u16, u32)>>,
    max_words: usize,
    /// Analyzed terms of the field values: term → (field, first row of the document, tf).
    terms: HashMap<String, Vec<(u16, u32, u32)>>,
    /// Analyzed length of each (field, first row).
    field_len: HashMap<(u16, u32), u32>,
    /// Per field: documents that have it, and their summed analyzed length.
    field_docs: Vec<(u32, u64)>,
    /// Sum of the idf of the distinct terms of each (field, first row) value.
    field_idf: HashMap<(u16, u32), f32>,
}

impl PhraseMap {
    /// The weight of each of this segment's fields in `fields` (0 when not named).
    fn weights(&self, fields: &[(String, f32)]) -> Vec<f32> {
        self.fields
            .iter()
            .map(|f| fields.iter().find(|(n, _)| n == f).map_or(0.0, |&(_, w)| w))
            .collect()
    }
}

impl Segment {
    fn rows(&self) -> usize {
        self.chunks.len()
    }

    fn live(&self) -> usize {
        self.rows() - self.n_deleted
    }

    fn vectors(&self) -> Result<&[f32]> {
        if !self.vectors.still_intact() {
            return Err(Error::corrupt(
                &self.vec_path,
                "the file was truncated while the index was open (index files must never be \
                 edited in place)",
            ));
        }
        cast_slice(&self.vectors[HEADER_LEN..], &self.vec_path, "vectors")
    }

    #[inline]
    fn is_deleted(&self, row: u32) -> bool {
        let r = row as usize;
        self.deleted
            .get(r / 64)
            .is_some_and(|w| w >> (r % 64) & 1 == 1)
    }

    fn meta(&self) -> Result<&SegMeta> {
        if let Some(m) = self.meta.get() {
            return Ok(m);
        }
        let mut docs: Vec<String> = Vec::new();
        let mut doc_ix: HashMap<String, u32> = HashMap::new();
        let mut doc_of_row = Vec::with_capacity(self.rows());
        let mut postings: HashMap<(String, String), Vec<u32>> = HashMap::new();
        for row in 0..self.rows() {
            let r = self.chunks.get(row)?;
            let ix = match doc_ix.get(r.doc_id) {
                Some(&i) => i,
                None => {
                    let i = docs.len() as u32;
                    docs.push(r.doc_id.to_string());
                    doc_ix.insert(r.doc_id.to_string(), i);
                    i
                }
            };
            doc_of_row.push(ix);
            postings
                .entry((DOC_ID_KEY.to_string(), r.doc_id.to_string()))
                .or_default()
                .push(row as u32);
            for (k, v) in &r.metadata {
                if *k != DOC_ID_KEY {
                    postings
                        .entry((k.to_string(), v.to_string()))
                        .or_default()
                        .push(row as u32);
                }
            }
        }
        Ok(self.meta.get_or_init(|| SegMeta {
            docs,
            doc_of_row,
            postings,
        }))
    }

    /// Live rows matching `filter`, ascending.
    fn filter_rows(&self, filter: &Filter) -> Result<Vec<u32>> {
        let meta = self.meta()?;
        let mut lists: Vec<&Vec<u32>> = Vec::new();
        for (k, v) in filter.conditions() {
            match meta.postings.get(&(k.clone(), v.clone())) {
                Some(l) => lists.push(l),
                None => return Ok(Vec::new()),
            }
        }
        if lists.is_empty() {
            return Ok((0..self.rows() as u32)
                .filter(|&r| !self.is_deleted(r))
                .collect());
        }
        lists.sort_by_key(|l| l.len());
        let mut out: Vec<u32> = lists[0]
            .iter()
            .copied()
            .filter(|&r| !self.is_deleted(r))
            .collect();
        for l in &lists[1..] {
            out.retain(|r| l.binary_search(r).is_ok());
        }
        Ok(out)
    }

    fn row_of(&self, id: u64) -> Result<Option<usize>> {
        Ok(self.chunks.ids()?.binary_search(&id).ok())
    }

    fn phrases(&self) -> Result<&PhraseMap> {
        if let Some(p) = self.phrases.get() {
            return Ok(p);
        }
        let meta = self.meta()?;
        let mut map = PhraseMap::default();
        let mut field_ix: HashMap<&str, u16> = HashMap::new();
        for ((field, value), rows) in &meta.postings {
            let words = lexical::phrase_tokens(value);
            if words.is_empty() || words.len() > 16 {
                continue;
            }
            let f = match field_ix.get(field.as_str()) {
                Some(&f) => f,
                None => {
                    let Ok(f) = u16::try_from(map.fields.len()) else {
                        continue;
                    };
                    map.fields.push(field.clone());
                    field_ix.insert(field, f);
                    f
                }
            };
            map.max_words = map.max_words.max(words.len());
            let mut firsts = Vec::new();
            let mut last_doc = None;
            for &row in rows {
                let doc = meta.doc_of_row[row as usize];
                if last_doc != Some(doc) {
                    firsts.push(row);
                    last_doc = Some(doc);
                }
            }
            let mut tf: HashMap<String, u32> = HashMap::new();
            let mut len = 0u32;
            lexical::analyze(value, &mut |t| {
                len += 1;
                *tf.entry(t.to_string()).or_insert(0) += 1;
            });
            while map.field_docs.len() <= f as usize {
                map.field_docs.push((0, 0));
            }
            for &row in &firsts {
                map.field_len.insert((f, row), len);
                map.field_docs[f as usize].0 += 1;
                map.field_docs[f as usize].1 += u64::from(len);
                for (t, &n) in &tf {
                    map.terms.entry(t.clone()).or_default().push((f, row, n));
                }
            }
            let entry = map.by_phrase.entry(words.join(" ")).or_default();
            entry.extend(firsts.iter().map(|&row| (f, row)));
        }
        // Second pass: how much idf each value holds, for the coverage rule of
        // `search_fields` (df per field, as there).
        let mut df: HashMap<(u16, &str), u64> = HashMap::new();
        for (t, list) in &map.terms {
            for &(f, _, _) in list {
                *df.entry((f, t.as_str())).or_insert(0) += 1;
            }
        }
        let mut field_idf: HashMap<(u16, u32), f32> = HashMap::new();
        for (t, list) in &map.terms {
            for &(f, row, _) in list {
                let n = u64::from(map.field_docs[f as usize].0);
                *field_idf.entry((f, row)).or_insert(0.0) += lexical::idf(n, df[&(f, t.as_str())]);
            }
        }
        map.field_idf = field_idf;
        Ok(self.phrases.get_or_init(|| map))
    }

    /// The best `k` of `scored` `(score, row)` pairs of this segment as hits (stable ids).
    fn top_hits(&self, scored: Vec<(f32, u32)>, k: usize) -> Result<Vec<Hit>> {
        let ids = self.chunks.ids()?;
        Ok(top_rows(scored, k)
            .into_iter()
            .map(|(score, row)| Hit {
                id: ids[row as usize],
                score,
            })
            .collect())
    }

    /// Rows allowed by the filter and not deleted, as a bitset; `None` = every live row.
    fn allowed(&self, filter: Option<&Filter>) -> Result<Option<Vec<u64>>> {
        match filter {
            Some(f) if !f.conditions().is_empty() => {
                let mut bits = vec![0u64; self.rows().div_ceil(64)];
                for r in self.filter_rows(f)? {
                    bits[r as usize / 64] |= 1 << (r % 64);
                }
                Ok(Some(bits))
            }
            _ => Ok(None),
        }
    }

    #[inline]
    fn accepts(&self, allowed: &Option<Vec<u64>>, row: u32) -> bool {
        match allowed {
            Some(bits) => bits[row as usize / 64] >> (row % 64) & 1 == 1,
            None => !self.is_deleted(row),
        }
    }
}

/// The best `k` of hits gathered from several segments: score descending, then id.
fn best_hits(mut hits: Vec<Hit>, k: usize) -> Vec<Hit> {
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
    hits.truncate(k);
    hits
}

/// Best `k` of `(score, row)` pairs, score descending then row ascending.
fn top_rows(mut scored: Vec<(f32, u32)>, k: usize) -> Vec<(f32, u32)> {
    let cmp = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if scored.len() > k {
        scored.select_nth_unstable_by(k - 1, cmp);
        scored.truncate(k);
    }
    scored.sort_by(cmp);
    scored
}

/// A vector index with its chunk store, opened from a [`Directory`].
///
/// `Index` is `Send + Sync`; [`search`](Index::search) takes `&self` and may run on many
/// threads at once. Updates ([`add`](Index::add), [`delete_doc`](Index::delete_doc),
/// [`compact`](Index::compact)) take `&mut self`. Across processes, hold a
/// [`WriterLock`](crate::WriterLock) from opening the index to the last update: an update
/// whose handle is stale (another writer committed since it was opened) is refused with
/// [`Error::ConcurrentUpdate`] rather than dropping the other writer's segment.
#[derive(Debug)]
pub struct Index {
    dir: Arc<dyn Directory>,
    manifest: Manifest,
    segments: Vec<Segment>,
    bytes_on_disk: u64,
}

fn validate_input(dim: usize, chunks: &[ChunkRecord], vectors: &[f32]) -> Result<Vec<f32>> {
    if dim == 0 {
        return Err(Error::InvalidParameter {
            name: "embedder dimension",
            value: 0,
            expected: "a value >= 1 (the embedder's output size)",
        });
    }
    if vectors.len() != chunks.len() * dim {
        return Err(Error::VectorLength {
            chunks: chunks.len(),
            dim,
            expected: chunks.len() * dim,
            got: vectors.len(),
        });
    }
    if chunks.len() >= u32::MAX as usize {
        return Err(Error::TooLarge {
            what: "chunks in one segment",
            limit: u64::from(u32::MAX) - 1,
            got: chunks.len() as u64,
        });
    }
    let mut out = vectors.to_vec();
    for (row, v) in out.chunks_exact_mut(dim).enumerate() {
        normalize(v).map_err(|problem| Error::InvalidVector { row, problem })?;
    }
    Ok(out)
}

/// Scales `v` to unit L2 norm (no-op when already within 1e-4).
fn normalize(v: &mut [f32]) -> std::result::Result<(), VectorProblem> {
    let n2: f32 = crate::simd::dot(v, v);
    if !n2.is_finite() || v.iter().any(|x| !x.is_finite()) {
        return Err(VectorProblem::NonFinite);
    }
    if n2 <= f32::MIN_POSITIVE {
        return Err(VectorProblem::ZeroNorm);
    }
    if (n2 - 1.0).abs() > 1e-4 {
        let inv = 1.0 / n2.sqrt();
        v.iter_mut().for_each(|x| *x *= inv);
    }
    Ok(())
}

fn seg_name(seg: u64, ext: &str) -> String {
    format!("seg-{seg:06}.{ext}")
}

fn parse_seg_no(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("seg-")?;
    let num = rest.split('.').next()?;
    num.parse().ok()
}

fn write_one(dir: &dyn Directory, name: String, bytes: &[u8]) -> Result<FileEntry> {
    dir.atomic_write(&name, bytes)?;
    Ok(FileEntry {
        name,
        len: bytes.len() as u64,
        crc32: crc32fast::hash(&bytes[HEADER_LEN..]),
    })
}

/// Writes the three files of a new segment (not yet referenced by any manifest).
fn write_segment(
    dir: &dyn Directory,
    seg: u64,
    ids: &[u64],
    records: &[&ChunkRecord],
    vectors: &[f32],
    dim: usize,
    params: &HnswParams,
) -> Result<SegmentEntry> {
    let rows = ids.len() as u64;
    let graph = graph::build(vectors, dim, params, BUILD_THREADS)?;
    let mut vbytes = Vec::with_capacity(vectors.len() * 4);
    for x in vectors {
        vbytes.extend_from_slice(&x.to_le_bytes());
    }
    let vectors_e = write_one(
        dir,
        seg_name(seg, "vectors"),
        &write_file(MAGIC_VECTORS, rows, dim as u64, &vbytes),
    )?;
    drop(vbytes);
    let graph_e = write_one(
        dir,
        seg_name(seg, "graph"),
        &write_file(MAGIC_GRAPH, rows, params.m as u64, &graph.encode()),
    )?;
    let payload = encode_store(ids, records.iter().copied())?;
    let chunks_e = write_one(
        dir,
        seg_name(seg, "chunks"),
        &write_file(MAGIC_CHUNKS, rows, 0, &payload),
    )?;
    drop(payload);
    let lexical_e = write_lexical(dir, seg, rows, records.iter().map(|r| r.text.as_str()))?;
    Ok(SegmentEntry {
        seg,
        rows,
        vectors: vectors_e,
        graph: graph_e,
        chunks: chunks_e,
        lexical: Some(lexical_e),
    })
}

/// Writes the lexical postings of a segment's chunk texts (row order).
fn write_lexical<'a>(
    dir: &dyn Directory,
    seg: u64,
    rows: u64,
    texts: impl Iterator<Item = &'a str>,
) -> Result<FileEntry> {
    let (payload, n_terms) = lexical::build(texts)?;
    write_one(
        dir,
        seg_name(seg, "lexical"),
        &write_file(MAGIC_LEXICAL, rows, n_terms, &payload),
    )
}

fn open_checked(
    dir: &dyn Directory,
    fe: &FileEntry,
    magic: [u8; 8],
) -> Result<(FileBytes, PathBuf, crate::format::Header)> {
    let path = dir.path_of(&fe.name);
    let bytes = match dir.open_read(&fe.name) {
        Ok(b) => b,
        Err(Error::NotFound { .. }) => {
            return Err(Error::corrupt(
                &path,
                "file named by the manifest is missing",
            ));
        }
        Err(e) => return Err(e),
    };
    if bytes.len() as u64 != fe.len {
        return Err(Error::corrupt(
            &path,
            format!(
                "file is {} bytes but the manifest says {} (truncated?)",
                bytes.len(),
                fe.len
            ),
        ));
    }
    let h = verify_file(&bytes, magic, &path)?;
    if h.payload_crc != fe.crc32 {
        return Err(Error::corrupt(
            &path,
            "checksum differs from the one in the manifest",
        ));
    }
    Ok((bytes, path, h))
}

fn open_segment(dir: &dyn Directory, e: &SegmentEntry, dim: usize, m: usize) -> Result<Segment> {
    let rows = usize::try_from(e.rows)
        .map_err(|_| Error::corrupt(dir.path_of(MANIFEST), "row count too large"))?;
    let (vectors, vec_path, vh) = open_checked(dir, &e.vectors, MAGIC_VECTORS)?;
    if vh.aux0 != e.rows || vh.aux1 != dim as u64 {
        return Err(Error::corrupt(
            &vec_path,
            "vector file shape differs from the manifest",
        ));
    }
    if (vectors.len() - HEADER_LEN) as u64 != e.rows.saturating_mul(dim as u64).saturating_mul(4) {
        return Err(Error::corrupt(
            &vec_path,
            "vector payload size differs from rows x dim",
        ));
    }
    cast_slice::<f32>(&vectors[HEADER_LEN..], &vec_path, "vectors")?;
    let (gbytes, gpath, gh) = open_checked(dir, &e.graph, MAGIC_GRAPH)?;
    if gh.aux0 != e.rows || gh.aux1 != m as u64 {
        return Err(Error::corrupt(
            &gpath,
            "graph file shape differs from the manifest",
        ));
    }
    let graph = GraphView::open(gbytes, &gpath, rows, m)?;
    let (cbytes, cpath, ch) = open_checked(dir, &e.chunks, MAGIC_CHUNKS)?;
    if ch.aux0 != e.rows {
        return Err(Error::corrupt(
            &cpath,
            "chunk store row count differs from the manifest",
        ));
    }
    let chunks = ChunkStore::open(cbytes, &cpath, e.rows)?;
    let lexical = match &e.lexical {
        None => None,
        Some(fe) => {
            let (lbytes, lpath, lh) = open_checked(dir, fe, MAGIC_LEXICAL)?;
            if lh.aux0 != e.rows {
                return Err(Error::corrupt(
                    &lpath,
                    "lexical postings row count differs from the manifest",
                ));
            }
            Some(LexicalView::open(lbytes, &lpath, e.rows, lh.aux1)?)
        }
    };
    Ok(Segment {
        dim,
        vectors,
        vec_path,
        graph,
        chunks,
        deleted: vec![0; rows.div_ceil(64)],
        n_deleted: 0,
        meta: OnceLock::new(),
        lexical,
        phrases: OnceLock::new(),
    })
}

impl Index {
    // ------------------------------------------------------------------ create

    /// Builds a new index in the directory `dir` (created if missing) from `chunks` and their
    /// `vectors` (`(n, dim)` row-major f32, `dim = embedder.dim`; normalised here if needed).
    ///
    /// The index is built in a temporary sibling directory and renamed into place when `dir`
    /// does not exist or is empty; otherwise the manifest write is the commit point.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] if an index is there (see [`create_or_replace`](Self::create_or_replace)),
    /// [`Error::EmptyIndex`] for zero chunks, [`Error::VectorLength`] for inconsistent lengths,
    /// [`Error::InvalidVector`] for zero or non-finite vectors, [`Error::InvalidParameter`]
    /// for bad params, [`Error::TooLarge`], [`Error::Io`].
    pub fn create(
        dir: impl AsRef<Path>,
        embedder: EmbedderId,
        params: HnswParams,
        chunks: Vec<ChunkRecord>,
        vectors: &[f32],
    ) -> Result<Index> {
        let path = dir.as_ref();
        if path.join(MANIFEST).exists() {
            return Err(Error::AlreadyExists {
                path: path.to_path_buf(),
            });
        }
        if chunks.is_empty() {
            return Err(Error::EmptyIndex);
        }
        let empty_or_missing = match std::fs::read_dir(path) {
            Ok(mut rd) => rd.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(Error::io(path, e)),
        };
        if !empty_or_missing {
            let d: Arc<dyn Directory> = Arc::new(FsDirectory::open(path)?);
            return Index::create_in(d, embedder, params, chunks, vectors);
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::InvalidPath {
                path: path.to_path_buf(),
                reason: "it has no file name, or the name is not UTF-8",
            })?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        // Half-built indexes of crashed ingests (`.<name>.<pid>-<n>.tmp`) are swept.
        if let Ok(rd) = std::fs::read_dir(&parent) {
            let prefix = format!(".{name}.");
            for entry in rd.flatten() {
                let n = entry.file_name().to_string_lossy().into_owned();
                if n.starts_with(&prefix) && crate::directory::is_stale_tmp(&n) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let tmp = parent.join(format!(".{}", ragtune_util::fs::tmp_name(name)));
        let built = (|| {
            let d: Arc<dyn Directory> = Arc::new(FsDirectory::create(&tmp)?);
            Index::create_in(d, embedder, params, chunks, vectors)?;
            // Where `path` is an empty directory, rename(2) replaces it atomically.
            std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
            ragtune_util::fs::sync_dir(&parent).map_err(|e| Error::io(&parent, e))
        })();
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Index::open_any(path)
    }

    /// Like [`create`](Self::create), but an existing index at `dir` is replaced atomically:
    /// the new segment files are written next to the old ones, the manifest is swapped, and
    /// only then are the old files removed. A crash at any point leaves either the old or the
    /// new index.
    ///
    /// # Errors
    /// As [`create`](Self::create), without `AlreadyExists`.
    pub fn create_or_replace(
        dir: impl AsRef<Path>,
        embedder: EmbedderId,
        params: HnswParams,
        chunks: Vec<ChunkRecord>,
        vectors: &[f32],
    ) -> Result<Index> {
        let path = dir.as_ref();
        if !path.join(MANIFEST).exists() {
            return Index::create(path, embedder, params, chunks, vectors);
        }
        let d: Arc<dyn Directory> = Arc::new(FsDirectory::open(path)?);
        Index::create_or_replace_in(d, embedder, params, chunks, vectors)
    }

    /// [`create`](Self::create) on any [`Directory`] (e.g. a [`RamDirectory`](crate::RamDirectory)).
    ///
    /// # Errors
    /// As [`create`](Self::create).
    pub fn create_in(
        dir: Arc<dyn Directory>,
        embedder: EmbedderId,
        params: HnswParams,
        chunks: Vec<ChunkRecord>,
        vectors: &[f32],
    ) -> Result<Index> {
        if dir.exists(MANIFEST)? {
            return Err(Error::AlreadyExists { path: dir.root() });
        }
        Index::create_or_replace_in(dir, embedder, params, chunks, vectors)
    }

    /// [`create_or_replace`](Self::create_or_replace) on any [`Directory`].
    ///
    /// # Errors
    /// As [`create`](Self::create), without `AlreadyExists`.
    pub fn create_or_replace_in(
        dir: Arc<dyn Directory>,
        embedder: EmbedderId,
        params: HnswParams,
        chunks: Vec<ChunkRecord>,
        vectors: &[f32],
    ) -> Result<Index> {
        if chunks.is_empty() {
            return Err(Error::EmptyIndex);
        }
        params.validate()?;
        let dim = embedder.dim as usize;
        let vecs = validate_input(dim, &chunks, vectors)?;
        // Segment numbers never reuse a name present in the directory (old or orphaned).
        let seg = dir
            .list()?
            .iter()
            .filter_map(|n| parse_seg_no(n))
            .max()
            .map_or(1, |m| m + 1);
        let generation = match dir.open_read(MANIFEST) {
            Ok(b) => Manifest::decode(&b, &dir.path_of(MANIFEST)).map_or(1, |m| m.generation + 1),
            Err(_) => 1,
        };
        let n = chunks.len() as u64;
        let ids: Vec<u64> = (0..n).collect();
        let refs: Vec<&ChunkRecord> = chunks.iter().collect();
        let entry = write_segment(dir.as_ref(), seg, &ids, &refs, &vecs, dim, &params)?;
        let docs: HashSet<&str> = chunks.iter().map(|c| c.doc_id.as_str()).collect();
        let mut notes = std::collections::BTreeMap::new();
        notes.insert("live_docs".to_string(), docs.len().to_string());
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            generation,
            embedder,
            metric: Metric::Cosine,
            params,
            dim: dim as u32,
            next_id: n,
            next_segment: seg + 1,
            live_chunks: n,
            segments: vec![entry],
            tombstones: Vec::new(),
            notes,
        };
        Index::commit(dir, &manifest)
    }

    /// Commits an update of `self`: refuses when the manifest on disk is no longer the one
    /// this handle read (another writer committed meanwhile; committing would drop its
    /// segment), then [`commit`](Self::commit)s.
    fn commit_update(&self, manifest: &Manifest) -> Result<Index> {
        let mpath = self.dir.path_of(MANIFEST);
        let on_disk = Manifest::decode(&self.dir.open_read(MANIFEST)?, &mpath)?;
        if on_disk.generation != self.manifest.generation {
            return Err(Error::ConcurrentUpdate {
                path: self.dir.root(),
                expected: self.manifest.generation,
                found: on_disk.generation,
            });
        }
        Index::commit(self.dir.clone(), manifest)
    }

    /// Atomically installs `manifest`, removes files no longer referenced, and opens the result.
    fn commit(dir: Arc<dyn Directory>, manifest: &Manifest) -> Result<Index> {
        dir.atomic_write(MANIFEST, &manifest.encode()?)?;
        let live: HashSet<&str> = manifest
            .segments
            .iter()
            .flat_map(|s| {
                [
                    Some(s.vectors.name.as_str()),
                    Some(s.graph.name.as_str()),
                    Some(s.chunks.name.as_str()),
                    s.lexical.as_ref().map(|l| l.name.as_str()),
                ]
                .into_iter()
                .flatten()
            })
            .collect();
        if let Ok(names) = dir.list() {
            for name in names {
                let orphan = parse_seg_no(&name).is_some()
                    && !name.ends_with(TMP_SUFFIX)
                    && !live.contains(name.as_str());
                // Best effort: an orphan left behind is ignored by `open` and retried later.
                // Temporary files are swept only when the process that wrote them is gone.
                if orphan || crate::directory::is_stale_tmp(&name) {
                    let _ = dir.delete(&name);
                }
            }
        }
        Index::load(dir)
    }

    // ------------------------------------------------------------------ open

    /// Opens the index at `dir`, checking that it was built with `expected`.
    ///
    /// Every file is checksummed; vectors and graph stay memory-mapped.
    ///
    /// # Errors
    /// [`Error::NotFound`] if there is no index, [`Error::EmbedderMismatch`] if it was built with
    /// another model, [`Error::DataCorruption`] / [`Error::UnsupportedVersion`] naming a file.
    pub fn open(dir: impl AsRef<Path>, expected: &EmbedderId) -> Result<Index> {
        let ix = Index::open_any(dir)?;
        ix.check_embedder(expected)?;
        Ok(ix)
    }

    /// Opens the index at `dir` without checking the embedder (for inspection).
    ///
    /// # Errors
    /// As [`open`](Self::open), without `EmbedderMismatch`.
    pub fn open_any(dir: impl AsRef<Path>) -> Result<Index> {
        let path = dir.as_ref();
        let d = FsDirectory::open(path).map_err(|_| Error::NotFound {
            path: path.to_path_buf(),
        })?;
        Index::load(Arc::new(d))
    }

    /// [`open`](Self::open) on any [`Directory`].
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn open_in(dir: Arc<dyn Directory>, expected: &EmbedderId) -> Result<Index> {
        let ix = Index::load(dir)?;
        ix.check_embedder(expected)?;
        Ok(ix)
    }

    /// [`open_any`](Self::open_any) on any [`Directory`].
    ///
    /// # Errors
    /// As [`open_any`](Self::open_any).
    pub fn open_any_in(dir: Arc<dyn Directory>) -> Result<Index> {
        Index::load(dir)
    }

    fn check_embedder(&self, expected: &EmbedderId) -> Result<()> {
        if !expected.same_model(&self.manifest.embedder) {
            return Err(Error::EmbedderMismatch {
                path: self.dir.root(),
                expected: Box::new(expected.clone()),
                found: Box::new(self.manifest.embedder.clone()),
            });
        }
        Ok(())
    }

    fn load(dir: Arc<dyn Directory>) -> Result<Index> {
        let mpath = dir.path_of(MANIFEST);
        let mbytes = match dir.open_read(MANIFEST) {
            Ok(b) => b,
            Err(Error::NotFound { .. }) => return Err(Error::NotFound { path: dir.root() }),
            Err(e) => return Err(e),
        };
        let manifest = Manifest::decode(&mbytes, &mpath)?;
        let bad = |d: &str| Error::corrupt(&mpath, d.to_string());
        if manifest.dim == 0 || manifest.dim != manifest.embedder.dim {
            return Err(bad("dimension is 0 or differs from the embedder's"));
        }
        manifest
            .params
            .validate()
            .map_err(|_| bad("HNSW parameters are out of range"))?;
        let dim = manifest.dim as usize;
        let mut segments = Vec::with_capacity(manifest.segments.len());
        let mut bytes_on_disk = mbytes.len() as u64;
        let mut last_id: Option<u64> = None;
        for e in &manifest.segments {
            let seg = open_segment(dir.as_ref(), e, dim, manifest.params.m)?;
            let ids = seg.chunks.ids()?;
            if let (Some(first), Some(prev)) = (ids.first(), last_id) {
                if *first <= prev {
                    return Err(bad("segments' chunk ids overlap or are out of order"));
                }
            }
            if let Some(&l) = ids.last() {
                if l >= manifest.next_id {
                    return Err(bad("a chunk id is not below next_id"));
                }
                last_id = Some(l);
            }
            bytes_on_disk += e.vectors.len
                + e.graph.len
                + e.chunks.len
                + e.lexical.as_ref().map_or(0, |l| l.len);
            segments.push(seg);
        }
        let mut prev = None;
        for &t in &manifest.tombstones {
            if prev.is_some_and(|p| p >= t) {
                return Err(bad("tombstones are not sorted"));
            }
            prev = Some(t);
            let mut found = false;
            for seg in &mut segments {
                if let Some(row) = seg.row_of(t)? {
                    seg.deleted[row / 64] |= 1 << (row % 64);
                    seg.n_deleted += 1;
                    found = true;
                    break;
                }
            }
            if !found {
                return Err(bad(&format!("tombstone for unknown chunk id {t}")));
            }
        }
        let live: usize = segments.iter().map(Segment::live).sum();
        if live as u64 != manifest.live_chunks {
            return Err(bad("live chunk count differs from the segments"));
        }
        Ok(Index {
            dir,
            manifest,
            segments,
            bytes_on_disk,
        })
    }

    // ------------------------------------------------------------------ read

    /// Top-`k` chunks by cosine similarity to `query` (`dim` f32; normalised here if needed),
    /// best first. Tombstoned chunks are never returned; with a filter, only matching chunks
    /// are (a very selective filter is answered by exact search over the matching chunks, so
    /// `k` hits come back whenever `k` chunks match).
    ///
    /// Segments under [`EXACT_BELOW`] rows, and all segments when `params.exact`, are searched
    /// exactly.
    ///
    /// # Errors
    /// [`Error::DimensionMismatch`], [`Error::InvalidQuery`] for a zero or non-finite query.
    pub fn search(&self, query: &[f32], params: &SearchParams) -> Result<Vec<Hit>> {
        let dim = self.dim();
        if query.len() != dim {
            return Err(Error::DimensionMismatch {
                expected: dim,
                got: query.len(),
            });
        }
        if params.k == 0 {
            return Ok(Vec::new());
        }
        let mut q = query.to_vec();
        normalize(&mut q).map_err(|problem| Error::InvalidQuery { problem })?;
        let k = params.k;
        let ef = params
            .ef_search
            .unwrap_or(self.manifest.params.ef_search)
            .max(k);
        let mut hits: Vec<Hit> = Vec::new();
        for seg in &self.segments {
            if seg.live() == 0 {
                continue;
            }
            let vectors = seg.vectors()?;
            let ids = seg.chunks.ids()?;
            let not_deleted = |r: u32| !seg.is_deleted(r);
            let found = match &params.filter {
                Some(f) if !f.conditions().is_empty() => {
                    let rows = seg.filter_rows(f)?;
                    if rows.is_empty() {
                        Vec::new()
                    } else if params.exact
                        || seg.rows() < EXACT_BELOW
                        || rows.len() <= 2048
                        || rows.len() * 10 < seg.live()
                    {
                        graph::exact_search(vectors, dim, &q, k, Some(&rows), &not_deleted)
                    } else {
                        let mut allowed = vec![0u64; seg.rows().div_ceil(64)];
                        for &r in &rows {
                            allowed[r as usize / 64] |= 1 << (r % 64);
                        }
                        let accept = |r: u32| allowed[r as usize / 64] >> (r % 64) & 1 == 1;
                        let frac = rows.len() as f64 / seg.rows() as f64;
                        let ef_f = ((ef as f64 / frac).ceil() as usize).min(seg.rows());
                        let mut got = seg.graph.search(vectors, dim, &q, ef_f, &accept, false)?;
                        if got.len() < k.min(rows.len()) {
                            got =
                                graph::exact_search(vectors, dim, &q, k, Some(&rows), &not_deleted);
                        }
                        got
                    }
                }
                _ => {
                    if params.exact || seg.rows() < EXACT_BELOW {
                        graph::exact_search(vectors, dim, &q, k, None, &not_deleted)
                    } else {
                        let all = seg.n_deleted == 0;
                        let mut got = seg.graph.search(vectors, dim, &q, ef, &not_deleted, all)?;
                        if got.len() < k.min(seg.live()) {
                            got = graph::exact_search(vectors, dim, &q, k, None, &not_deleted);
                        }
                        got
                    }
                }
            };
            // A stored vector with NaN or infinite components (a crafted file: `add` refuses
            // them) has no meaningful score; it is never a hit, rather than ranking first.
            hits.extend(
                found
                    .into_iter()
                    .filter(|(score, _)| score.is_finite())
                    .take(k)
                    .map(|(score, row)| Hit {
                        id: ids[row as usize],
                        score,
                    }),
            );
        }
        Ok(best_hits(hits, k))
    }

    /// Top-`k` chunks by BM25 over their analyzed text ([`crate::lexical`]), best first;
    /// [`Hit::score`] is the BM25 score (> 0). Tombstoned chunks and chunks failing
    /// `params.filter` are never returned; `ef_search` and `exact` are ignored. A query with no
    /// index terms left after analysis (only stop words or punctuation) gives no hits, and so
    /// do segments without lexical postings (see [`lexical_missing`](Self::lexical_missing)).
    ///
    /// # Errors
    /// [`Error::DataCorruption`] for a malformed posting list.
    pub fn search_lexical(&self, query: &str, params: &SearchParams) -> Result<Vec<Hit>> {
        let k = params.k;
        if k == 0 {
            return Ok(Vec::new());
        }
        let mut terms = lexical::analyze_to_vec(query);
        terms.sort_unstable();
        terms.dedup();
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let segs: Vec<&Segment> = self
            .segments
            .iter()
            .filter(|s| s.lexical.is_some() && s.live() > 0)
            .collect();
        // Corpus statistics over every segment, so scores do not depend on segmentation.
        let mut n_rows = 0u64;
        let mut total_len = 0u64;
        let mut found: Vec<Vec<Option<usize>>> = Vec::with_capacity(segs.len());
        let mut df = vec![0u64; terms.len()];
        for seg in &segs {
            let Some(lex) = &seg.lexical else { continue };
            lex.doc_len()?; // fails, instead of faulting, on a file truncated under us
            n_rows += lex.rows() as u64;
            total_len += lex.total_len;
            let mut ids = Vec::with_capacity(terms.len());
            for (j, t) in terms.iter().enumerate() {
                let i = lex.find(t)?;
                if let Some(i) = i {
                    df[j] += u64::from(lex.df(i)?);
                }
                ids.push(i);
            }
            found.push(ids);
        }
        if n_rows == 0 {
            return Ok(Vec::new());
        }
        let avgdl = (total_len as f32 / n_rows as f32).max(1.0);
        let idfs: Vec<f32> = df.iter().map(|&d| lexical::idf(n_rows, d)).collect();
        let mut hits = Vec::new();
        for (seg, ids) in segs.iter().zip(&found) {
            let Some(lex) = &seg.lexical else { continue };
            let allowed = seg.allowed(params.filter.as_ref())?;
            let doc_len = lex.doc_len()?;
            let mut scores = vec![0f32; lex.rows()];
            for (j, i) in ids.iter().enumerate() {
                let Some(i) = *i else { continue };
                let w = idfs[j];
                lex.for_each_posting(i, &mut |row, tf| {
                    scores[row as usize] += lexical::bm25(w, tf, doc_len[row as usize], avgdl);
                })?;
            }
            let scored: Vec<(f32, u32)> = scores
                .iter()
                .enumerate()
                .filter(|&(r, &sc)| sc > 0.0 && seg.accepts(&allowed, r as u32))
                .map(|(r, &sc)| (sc, r as u32))
                .collect();
            hits.extend(seg.top_hits(scored, k)?);
        }
        Ok(best_hits(hits, k))
    }

    /// Documents whose identifier fields occur verbatim in `query`: for each metadata field
    /// named in `fields` (with its weight; [`DOC_ID_KEY`] names the document id), a value whose
    /// [`lexical::phrase_tokens`] appear as consecutive words of the query counts
    /// `weight x words`. One hit per document (its first chunk, usually the metadata record),
    /// best first; [`Hit::score`] is that sum. Values of more than 16 words are not matched.
    ///
    /// So "What is the SPDX id of the MIT license?" finds the document whose `name` is
    /// "MIT License" (2 words) and whose id is `mit` (1 word), but not one named
    /// "MIT License 1998".
    ///
    /// # Errors
    /// [`Error::DataCorruption`] if a chunk record cannot be decoded.
    pub fn search_identifiers(
        &self,
        query: &str,
        fields: &[(String, f32)],
        params: &SearchParams,
    ) -> Result<Vec<Hit>> {
        if params.k == 0 || fields.is_empty() {
            return Ok(Vec::new());
        }
        let words = lexical::phrase_tokens(query);
        let mut hits = Vec::new();
        for seg in &self.segments {
            if seg.live() == 0 {
                continue;
            }
            let phrases = seg.phrases()?;
            let weight = phrases.weights(fields);
            if weight.iter().all(|&w| w <= 0.0) {
                continue;
            }
            let allowed = seg.allowed(params.filter.as_ref())?;
            let mut score: HashMap<u32, f32> = HashMap::new();
            let mut seen: HashSet<(u16, u32)> = HashSet::new();
            let mut gram = String::new();
            for start in 0..words.len() {
                gram.clear();
                for (n, w) in words[start..].iter().take(phrases.max_words).enumerate() {
                    if n > 0 {
                        gram.push(' ');
                    }
                    gram.push_str(w);
                    let Some(list) = phrases.by_phrase.get(&gram) else {
                        continue;
                    };
                    for &(f, row) in list {
                        let w = weight[f as usize];
                        // A field counts once per document, by its longest match.
                        if w > 0.0 && seg.accepts(&allowed, row) && seen.insert((f, row)) {
                            *score.entry(row).or_insert(0.0) += w * (n + 1) as f32;
                        }
                    }
                }
            }
            let scored: Vec<(f32, u32)> = score.into_iter().map(|(r, sc)| (sc, r)).collect();
            hits.extend(seg.top_hits(scored, params.k)?);
        }
        Ok(best_hits(hits, params.k))
    }

    /// The metadata keys present on any chunk, with [`DOC_ID_KEY`]: what a [`Filter`] can
    /// name (a condition on another key matches nothing).
    ///
    /// # Errors
    /// [`Error::DataCorruption`] if a chunk record cannot be decoded.
    pub fn metadata_keys(&self) -> Result<BTreeSet<String>> {
        let mut keys = BTreeSet::from([DOC_ID_KEY.to_string()]);
        for seg in &self.segments {
            keys.extend(seg.meta()?.postings.keys().map(|(k, _)| k.clone()));
        }
        Ok(keys)
    }

    /// Documents by BM25 of `query` against their metadata fields named in `fields` (each
    /// field its own BM25 with its own statistics, weighted by the field's weight and summed:
    /// BM25F without shared length normalisation). One hit per document (its first chunk),
    /// best first; [`Hit::score`] is that sum. Where [`search_identifiers`](Self::search_identifiers)
    /// needs a whole value verbatim, this finds "the Apache Software License, Version 2.0"
    /// for a document named "Apache License 2.0".
    ///
    /// A field value counts only when the query covers at least [`FIELD_MIN_COVERAGE`] of
    /// it, measured in idf (the idf of its terms found in the query over the idf of all its
    /// terms), and its BM25 is scaled by that coverage: sharing "public license" with
    /// "GNU General Public License 3.0 or later" does not make a query name it.
    ///
    /// # Errors
    /// [`Error::DataCorruption`] if a chunk record cannot be decoded.
    pub fn search_fields(
        &self,
        query: &str,
        fields: &[(String, f32)],
        params: &SearchParams,
    ) -> Result<Vec<Hit>> {
        if params.k == 0 || fields.is_empty() {
            return Ok(Vec::new());
        }
        let mut terms = lexical::analyze_to_vec(query);
        terms.sort_unstable();
        terms.dedup();
        let mut hits = Vec::new();
        for seg in &self.segments {
            if seg.live() == 0 || terms.is_empty() {
                continue;
            }
            let pm = seg.phrases()?;
            let weight = pm.weights(fields);
            let allowed = seg.allowed(params.filter.as_ref())?;
            // (field, row) -> (BM25, matched idf). Ordered: a row's fields are summed below in
            // key order, so its score has the same bits in every process (a HashMap's order
            // changes with its random seed, and f32 addition is not associative).
            let mut matched: std::collections::BTreeMap<(u16, u32), (f32, f32)> =
                std::collections::BTreeMap::new();
            for t in &terms {
                let Some(list) = pm.terms.get(t) else {
                    continue;
                };
                let mut df = vec![0u64; pm.fields.len()];
                for &(f, _, _) in list {
                    df[f as usize] += 1;
                }
                for &(f, row, tf) in list {
                    let w = weight[f as usize];
                    if w <= 0.0 || !seg.accepts(&allowed, row) {
                        continue;
                    }
                    let (n_docs, total) = pm.field_docs[f as usize];
                    let avg = (total as f32 / n_docs.max(1) as f32).max(1.0);
                    let dl = pm.field_len.get(&(f, row)).copied().unwrap_or(1);
                    let idf = lexical::idf(u64::from(n_docs), df[f as usize]);
                    let e = matched.entry((f, row)).or_insert((0.0, 0.0));
                    e.0 += w * lexical::bm25(idf, tf, dl, avg);
                    e.1 += idf;
                }
            }
            let mut score: HashMap<u32, f32> = HashMap::new();
            for ((f, row), (bm25, idf)) in matched {
                let total = pm.field_idf.get(&(f, row)).copied().unwrap_or(0.0);
                let coverage = if total > 0.0 {
                    (idf / total).min(1.0)
                } else {
                    0.0
                };
                if coverage >= FIELD_MIN_COVERAGE {
                    *score.entry(row).or_insert(0.0) += bm25 * coverage;
                }
            }
            let scored: Vec<(f32, u32)> = score
                .into_iter()
                .filter(|&(_, sc)| sc > 0.0)
                .map(|(r, sc)| (sc, r))
                .collect();
            hits.extend(seg.top_hits(scored, params.k)?);
        }
        Ok(best_hits(hits, params.k))
    }

    /// Segments that have no lexical postings (written before lexical search existed); their
    /// chunks are found by dense search only until [`add_lexical`](Self::add_lexical) runs.
    pub fn lexical_missing(&self) -> usize {
        self.segments.iter().filter(|s| s.lexical.is_none()).count()
    }

    /// The chunk with stable id `id`.
    ///
    /// # Errors
    /// [`Error::UnknownChunk`] if no live chunk has that id.
    pub fn chunk(&self, id: u64) -> Result<ChunkRecord> {
        for seg in &self.segments {
            if let Some(row) = seg.row_of(id)? {
                if seg.is_deleted(row as u32) {
                    break;
                }
                return Ok(seg.chunks.get(row)?.to_owned_record());
            }
        }
        Err(Error::UnknownChunk { id })
    }

    /// The document of chunk `id`, without decoding its record (from the segment's document
    /// table, built once per segment).
    ///
    /// # Errors
    /// [`Error::UnknownChunk`] if no live chunk has that id.
    pub fn doc_id(&self, id: u64) -> Result<&str> {
        for seg in &self.segments {
            if let Some(row) = seg.row_of(id)? {
                if seg.is_deleted(row as u32) {
                    break;
                }
                let meta = seg.meta()?;
                return Ok(&meta.docs[meta.doc_of_row[row] as usize]);
            }
        }
        Err(Error::UnknownChunk { id })
    }

    /// The stored (unit-norm) vector of chunk `id`: `dim` f32.
    ///
    /// # Errors
    /// [`Error::UnknownChunk`] if no live chunk has that id.
    pub fn vector(&self, id: u64) -> Result<Vec<f32>> {
        for seg in &self.segments {
            if let Some(row) = seg.row_of(id)? {
                if seg.is_deleted(row as u32) {
                    break;
                }
                let d = seg.dim;
                return Ok(seg.vectors()?[row * d..(row + 1) * d].to_vec());
            }
        }
        Err(Error::UnknownChunk { id })
    }

    /// Ids of all live chunks, ascending.
    ///
    /// # Errors
    /// [`Error::DataCorruption`] (only if a file changed under us).
    pub fn ids(&self) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(self.len());
        for seg in &self.segments {
            let ids = seg.chunks.ids()?;
            out.extend(
                (0..seg.rows())
                    .filter(|&r| !seg.is_deleted(r as u32))
                    .map(|r| ids[r]),
            );
        }
        Ok(out)
    }

    /// Number of live (not deleted) chunks.
    pub fn len(&self) -> usize {
        self.manifest.live_chunks as usize
    }

    /// True when no live chunk remains.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.manifest.dim as usize
    }

    /// The embedder the index was built with.
    pub fn embedder(&self) -> &EmbedderId {
        &self.manifest.embedder
    }

    /// The graph parameters (ef_search is the default for searches).
    pub fn params(&self) -> &HnswParams {
        &self.manifest.params
    }

    /// The similarity metric.
    pub fn metric(&self) -> Metric {
        self.manifest.metric
    }

    /// Distinct document ids with at least one live chunk, sorted.
    ///
    /// # Errors
    /// [`Error::DataCorruption`] if a chunk record cannot be decoded.
    pub fn doc_ids(&self) -> Result<Vec<String>> {
        let mut set = BTreeSet::new();
        for seg in &self.segments {
            let meta = seg.meta()?;
            for (row, &d) in meta.doc_of_row.iter().enumerate() {
                if !seg.is_deleted(row as u32) {
                    set.insert(meta.docs[d as usize].clone());
                }
            }
        }
        Ok(set.into_iter().collect())
    }

    /// Counts and sizes.
    pub fn stats(&self) -> IndexStats {
        IndexStats {
            chunks: self.len(),
            docs: self
                .manifest
                .notes
                .get("live_docs")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            segments: self.segments.len(),
            tombstones: self.manifest.tombstones.len(),
            bytes: self.bytes_on_disk,
        }
    }

    /// The directory holding the index.
    pub fn directory(&self) -> &Arc<dyn Directory> {
        &self.dir
    }

    // ------------------------------------------------------------------ update

    fn live_docs_with(&self, extra: &[ChunkRecord], dropped: &HashSet<u64>) -> Result<usize> {
        let mut set: HashSet<&str> = HashSet::new();
        for seg in &self.segments {
            let meta = seg.meta()?;
            let ids = seg.chunks.ids()?;
            for (row, &d) in meta.doc_of_row.iter().enumerate() {
                if !seg.is_deleted(row as u32) && !dropped.contains(&ids[row]) {
                    set.insert(&meta.docs[d as usize]);
                }
            }
        }
        set.extend(extra.iter().map(|c| c.doc_id.as_str()));
        Ok(set.len())
    }

    /// Adds `chunks` with their `vectors` (`(n, dim)` row-major) as a new segment, then swaps
    /// the manifest atomically. New chunks get ids above every existing id.
    ///
    /// # Errors
    /// [`Error::VectorLength`] for inconsistent lengths, [`Error::InvalidVector`] for bad
    /// vectors, [`Error::TooLarge`], [`Error::Io`].
    pub fn add(&mut self, chunks: Vec<ChunkRecord>, vectors: &[f32]) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let dim = self.dim();
        if vectors.len() % dim != 0 {
            return Err(Error::DimensionMismatch {
                expected: dim,
                got: vectors.len() % dim,
            });
        }
        let vecs = validate_input(dim, &chunks, vectors)?;
        let seg = self.next_segment_no()?;
        let first = self.manifest.next_id;
        let ids: Vec<u64> = (first..first + chunks.len() as u64).collect();
        let refs: Vec<&ChunkRecord> = chunks.iter().collect();
        let entry = write_segment(
            self.dir.as_ref(),
            seg,
            &ids,
            &refs,
            &vecs,
            dim,
            &self.manifest.params,
        )?;
        let docs = self.live_docs_with(&chunks, &HashSet::new())?;
        let mut m = self.manifest.clone();
        m.generation += 1;
        m.next_id = first + chunks.len() as u64;
        m.next_segment = seg + 1;
        m.live_chunks += chunks.len() as u64;
        m.segments.push(entry);
        m.notes.insert("live_docs".into(), docs.to_string());
        *self = self.commit_update(&m)?;
        Ok(())
    }

    fn next_segment_no(&self) -> Result<u64> {
        let listed = self
            .dir
            .list()?
            .iter()
            .filter_map(|n| parse_seg_no(n))
            .max()
            .map_or(0, |m| m + 1);
        Ok(self.manifest.next_segment.max(listed))
    }

    /// Writes lexical postings for every segment that lacks them (from the stored chunk
    /// texts; nothing is re-embedded), then swaps the manifest atomically. Returns how many
    /// segments were upgraded (0 when none needed it).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::DataCorruption`].
    pub fn add_lexical(&mut self) -> Result<usize> {
        let mut m = self.manifest.clone();
        let mut done = 0;
        for (e, seg) in m.segments.iter_mut().zip(&self.segments) {
            if e.lexical.is_some() {
                continue;
            }
            let texts = (0..seg.rows())
                .map(|r| Ok(seg.chunks.get(r)?.text.to_string()))
                .collect::<Result<Vec<String>>>()?;
            e.lexical = Some(write_lexical(
                self.dir.as_ref(),
                e.seg,
                e.rows,
                texts.iter().map(String::as_str),
            )?);
            done += 1;
        }
        if done > 0 {
            m.generation += 1;
            *self = self.commit_update(&m)?;
        }
        Ok(done)
    }

    /// Tombstones every live chunk of document `doc_id`; returns how many.
    /// The manifest is swapped atomically; vectors stay on disk until [`compact`](Self::compact).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::DataCorruption`].
    pub fn delete_doc(&mut self, doc_id: &str) -> Result<usize> {
        let mut newly: HashSet<u64> = HashSet::new();
        for seg in &self.segments {
            let ids = seg.chunks.ids()?;
            for row in seg.filter_rows(&Filter::eq(DOC_ID_KEY, doc_id))? {
                newly.insert(ids[row as usize]);
            }
        }
        if newly.is_empty() {
            return Ok(0);
        }
        let docs = self.live_docs_with(&[], &newly)?;
        let mut m = self.manifest.clone();
        let mut all: BTreeSet<u64> = m.tombstones.iter().copied().collect();
        all.extend(newly.iter().copied());
        m.tombstones = all.into_iter().collect();
        m.generation += 1;
        m.live_chunks -= newly.len() as u64;
        m.notes.insert("live_docs".into(), docs.to_string());
        *self = self.commit_update(&m)?;
        Ok(newly.len())
    }

    /// Rewrites all live chunks into one segment with a fresh graph, dropping tombstones and
    /// deleting the old segment files after the manifest swap. Chunk ids are preserved.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::DataCorruption`].
    pub fn compact(&mut self) -> Result<()> {
        let dim = self.dim();
        let mut ids = Vec::with_capacity(self.len());
        let mut records = Vec::with_capacity(self.len());
        let mut vecs = Vec::with_capacity(self.len() * dim);
        for seg in &self.segments {
            let sids = seg.chunks.ids()?;
            let sv = seg.vectors()?;
            for row in 0..seg.rows() {
                if seg.is_deleted(row as u32) {
                    continue;
                }
                ids.push(sids[row]);
                records.push(seg.chunks.get(row)?.to_owned_record());
                vecs.extend_from_slice(&sv[row * dim..(row + 1) * dim]);
            }
        }
        let mut m = self.manifest.clone();
        m.generation += 1;
        m.tombstones.clear();
        m.live_chunks = ids.len() as u64;
        m.segments.clear();
        if !ids.is_empty() {
            let seg = self.next_segment_no()?;
            let refs: Vec<&ChunkRecord> = records.iter().collect();
            m.segments.push(write_segment(
                self.dir.as_ref(),
                seg,
                &ids,
                &refs,
                &vecs,
                dim,
                &m.params,
            )?);
            m.next_segment = seg + 1;
        }
        *self = self.commit_update(&m)?;
        Ok(())
    }
}
