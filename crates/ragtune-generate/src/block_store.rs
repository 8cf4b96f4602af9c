//! Chunk blocks kept on disk: the KV of retrieved chunks for block attention (prompt format
//! v2), computed once and read back by later processes instead of being prefilled again.
//!
//! A store is a directory of *segment* files (`*.kvb`). Each segment is written whole and
//! atomically (temporary file, fsync, rename, directory fsync: `ragtune_util::fs`), so a
//! crash leaves either no segment or a complete one; a later write adds a segment and never
//! touches an existing one. Every segment records the [`BlockStoreIdentity`] its blocks were
//! computed under (model file, adapter, prompt format, KV precision, index). A segment of another identity
//! is not read: a changed model or adapter gives other KV for the same ids, and a rebuilt
//! index makes the blocks stale.
//!
//! Segment layout, all integers little-endian:
//!
//! | bytes | what |
//! |---|---|
//! | 8 | magic `RTKVBLK\0` |
//! | 4 | `h`, the length of the header |
//! | `h` | header, JSON: format version, identity, geometry `(layers, kv_heads, head_dim)`, entry count `n` |
//! | `56 n` | table of contents, per entry: key hash (u64), offset (u64), length (u64), sha256 of the entry (32) |
//! | 32 | sha256 of everything above |
//! | … | the entries |
//!
//! An entry: `context_len`, `tokens_len`, `first_position`, `dtype` (u32 each; dtype 1 = f16,
//! 2 = f32), the context ids and the chunk's ids (u32 each), then the span's values as
//! [`KvSpan`] holds them (per layer keys then values, `(kv_heads, len, head_dim)`).
//!
//! The table is checked when a segment is opened; an entry's sha256 when it is read, so a
//! damaged entry is skipped (and counted) and its block computed again, never used.
//!
//! Disk per block: the KV itself, `2 × layers × kv_heads × head_dim × 2` bytes per position
//! in f16 (23,040 for SmolLM2-135M), plus 16 bytes and 4 per id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::kv_cache::KvSpan;
use crate::lora::LoraAdapter;
use crate::{Error, Result};

/// The file extension of a segment.
pub const SEGMENT_EXTENSION: &str = "kvb";

const MAGIC: &[u8; 8] = b"RTKVBLK\0";
const FORMAT_VERSION: u32 = 1;
/// Bytes of one table-of-contents entry.
const TOC_ENTRY: usize = 8 + 8 + 8 + 32;
/// Bytes of an entry's fixed fields.
const ENTRY_FIELDS: usize = 16;

/// What a block's KV depends on besides its token ids. Two stores hold interchangeable
/// blocks only when their identities are equal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockStoreIdentity {
    /// sha256 (hex) of the GGUF file.
    pub model_sha256: String,
    /// sha256 (hex) of the LoRA adapter's files; `None`: the base model.
    pub adapter_sha256: Option<String>,
    /// The prompt format the blocks were cut for (2: block attention).
    pub prompt_format: u32,
    /// The KV precision, `f16` (a quantized model) or `f32` (the f32 path): blocks of the
    /// other precision would not give the values a fresh prefill writes.
    pub kv_dtype: String,
    /// A fingerprint of the index the chunks came from: blocks of another index are stale.
    pub index: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Header {
    format_version: u32,
    identity: BlockStoreIdentity,
    /// `(layers, kv_heads, head_dim)`.
    geometry: (usize, usize, usize),
    entries: usize,
}

/// Why a segment file was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// Written for another model, adapter or prompt format (still valid for those).
    OtherIdentity,
    /// Written for another index: stale, to be removed by the next precompute.
    StaleIndex,
    /// Not a segment this build can read: what is wrong.
    Unreadable(String),
}

/// One block to write: the KV of `tokens` computed right after `context`.
#[derive(Debug, Clone, Copy)]
pub struct StoredBlock<'a> {
    /// The ids the block attends to before itself.
    pub context: &'a [u32],
    /// The block's ids.
    pub tokens: &'a [u32],
    /// Its KV (`tokens.len()` positions).
    pub span: &'a KvSpan,
}

#[derive(Debug)]
struct Entry {
    segment: usize,
    offset: usize,
    len: usize,
    sha: [u8; 32],
}

/// The readable segments of a store directory, for one identity (see the module docs).
/// Thread-safe: reads are from read-only memory maps.
#[derive(Debug)]
pub struct BlockStore {
    dir: PathBuf,
    identity: BlockStoreIdentity,
    geometry: (usize, usize, usize),
    segments: Vec<(PathBuf, memmap2::Mmap)>,
    entries: HashMap<u64, Vec<Entry>>,
    skipped: Vec<(PathBuf, Skipped)>,
    damaged: AtomicU64,
    reads: AtomicU64,
}

/// The key hash of a block: the first 8 bytes of sha256 over both id lists.
fn key_hash(context: &[u32], tokens: &[u32]) -> u64 {
    let mut h = Sha256::new();
    for ids in [context, tokens] {
        h.update((ids.len() as u32).to_le_bytes());
        for id in ids {
            h.update(id.to_le_bytes());
        }
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The header and table of contents of a segment's bytes.
fn parse_segment(b: &[u8]) -> std::result::Result<(Header, Vec<(u64, Entry)>), String> {
    if b.get(..8) != Some(MAGIC.as_slice()) {
        return Err("not a ragtune block segment (bad magic)".into());
    }
    let h = u32_at(b, 8).ok_or("truncated header")? as usize;
    let header: Header = serde_json::from_slice(b.get(12..12 + h).ok_or("truncated header")?)
        .map_err(|e| format!("header: {e}"))?;
    if header.format_version != FORMAT_VERSION {
        return Err(format!(
            "segment format {} (this build reads {FORMAT_VERSION})",
            header.format_version
        ));
    }
    let toc_at = 12 + h;
    let toc_len = header
        .entries
        .checked_mul(TOC_ENTRY)
        .ok_or("entry count overflows")?;
    let sum_at = toc_at + toc_len;
    let stored = b.get(sum_at..sum_at + 32).ok_or("truncated table")?;
    if Sha256::digest(&b[..sum_at]).as_slice() != stored {
        return Err("table checksum mismatch".into());
    }
    let mut entries = Vec::with_capacity(header.entries);
    for i in 0..header.entries {
        let at = toc_at + i * TOC_ENTRY;
        let (hash, offset, len) = (
            u64_at(b, at).ok_or("table")?,
            u64_at(b, at + 8).ok_or("table")? as usize,
            u64_at(b, at + 16).ok_or("table")? as usize,
        );
        if offset < sum_at + 32 || offset.checked_add(len).is_none_or(|end| end > b.len()) {
            return Err(format!("entry {i} lies outside the file (truncated?)"));
        }
        let sha = b[at + 24..at + 56].try_into().expect("32 bytes");
        entries.push((
            hash,
            Entry {
                segment: 0,
                offset,
                len,
                sha,
            },
        ));
    }
    Ok((header, entries))
}

impl BlockStore {
    /// Opens the segments in `dir` written under `identity` for a model of `geometry`
    /// `(layers, kv_heads, head_dim)`. The others are listed in
    /// [`skipped`](Self::skipped). A missing directory is an empty store.
    ///
    /// # Errors
    /// [`Error::Io`] when `dir` or a segment in it cannot be read or mapped.
    pub fn open(
        dir: &Path,
        identity: BlockStoreIdentity,
        geometry: (usize, usize, usize),
    ) -> Result<BlockStore> {
        let mut store = BlockStore {
            dir: dir.to_path_buf(),
            identity,
            geometry,
            segments: Vec::new(),
            entries: HashMap::new(),
            skipped: Vec::new(),
            damaged: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        };
        let list = match std::fs::read_dir(dir) {
            Ok(list) => list,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(store),
            Err(e) => return Err(io_err(dir)(e)),
        };
        let mut paths: Vec<PathBuf> = list
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == SEGMENT_EXTENSION))
            .collect();
        paths.sort();
        for path in paths {
            let file = std::fs::File::open(&path).map_err(io_err(&path))?;
            // SAFETY: segments are written once under a temporary name and renamed into
            // place, never modified afterwards; the map is read-only.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(&path))?;
            let skip = match parse_segment(&map) {
                Err(why) => Some(Skipped::Unreadable(why)),
                Ok((header, _)) if header.identity.index != store.identity.index => {
                    Some(Skipped::StaleIndex)
                }
                Ok((header, _))
                    if header.identity != store.identity || header.geometry != geometry =>
                {
                    Some(Skipped::OtherIdentity)
                }
                Ok((_, entries)) => {
                    let segment = store.segments.len();
                    for (hash, mut e) in entries {
                        e.segment = segment;
                        store.entries.entry(hash).or_default().push(e);
                    }
                    None
                }
            };
            match skip {
                Some(why) => store.skipped.push((path, why)),
                None => store.segments.push((path, map)),
            }
        }
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The identity the readable segments were written under.
    pub fn identity(&self) -> &BlockStoreIdentity {
        &self.identity
    }

    /// The segment files that were not read, and why.
    pub fn skipped(&self) -> &[(PathBuf, Skipped)] {
        &self.skipped
    }

    /// Blocks held in the readable segments.
    pub fn len(&self) -> usize {
        self.entries.values().map(Vec::len).sum()
    }

    /// `true` when no readable segment holds a block.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the readable segments on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|(_, m)| m.len() as u64).sum()
    }

    /// Entries found damaged on reading (sha256 mismatch, malformed), since opening.
    pub fn damaged(&self) -> u64 {
        self.damaged.load(Ordering::Relaxed)
    }

    /// Blocks read from disk since opening.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The entry of `tokens` after `context`, checked: its bytes, or `None`.
    fn find(&self, context: &[u32], tokens: &[u32]) -> Option<(&[u8], usize)> {
        for e in self.entries.get(&key_hash(context, tokens))? {
            let bytes = &self.segments[e.segment].1[e.offset..e.offset + e.len];
            let fields = |i: usize| u32_at(bytes, 4 * i).map(|x| x as usize);
            let ids_match = || -> Option<bool> {
                let (c, t) = (fields(0)?, fields(1)?);
                let ids = |at: usize, n: usize| {
                    (0..n).map(move |i| u32_at(bytes, ENTRY_FIELDS + 4 * (at + i)))
                };
                Some(
                    c == context.len()
                        && t == tokens.len()
                        && ids(0, c).eq(context.iter().map(|&x| Some(x)))
                        && ids(c, t).eq(tokens.iter().map(|&x| Some(x))),
                )
            };
            if ids_match() == Some(true) {
                if Sha256::digest(bytes).as_slice() != e.sha {
                    self.damaged.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                return Some((bytes, ENTRY_FIELDS + 4 * (context.len() + tokens.len())));
            }
        }
        None
    }

    /// Whether a readable segment holds the block of `tokens` after `context` (undamaged).
    pub fn contains(&self, context: &[u32], tokens: &[u32]) -> bool {
        self.find(context, tokens).is_some()
    }

    /// The block of `tokens` computed after `context`, for `adapter` (the adapter whose
    /// files the store's identity names; its id is recorded on the span), or `None` when no
    /// readable segment holds it undamaged.
    pub fn get(
        &self,
        context: &[u32],
        tokens: &[u32],
        adapter: Option<&LoraAdapter>,
    ) -> Option<KvSpan> {
        let (bytes, values_at) = self.find(context, tokens)?;
        let first_position = u32_at(bytes, 8)? as usize;
        let f16_values = match u32_at(bytes, 12)? {
            1 => true,
            2 => false,
            _ => {
                self.damaged.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let span = KvSpan::from_values(
            &bytes[values_at..],
            f16_values,
            self.geometry,
            tokens.len(),
            first_position,
            adapter.map(LoraAdapter::id),
        );
        match span {
            Some(span) => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                Some(span)
            }
            None => {
                self.damaged.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Writes `blocks` as one new segment of this store's identity into its directory
    /// (created if missing), atomically. Returns the segment's path and size in bytes. The
    /// open store does not see the new segment; open it again to read it.
    ///
    /// # Errors
    /// [`Error::InvalidParams`] for a block whose span does not match its ids or the store's
    /// geometry; [`Error::Io`] when the directory or file cannot be written.
    pub fn write_segment(&self, blocks: &[StoredBlock<'_>]) -> Result<(PathBuf, u64)> {
        let mut body = Vec::new();
        let mut toc = Vec::with_capacity(blocks.len() * TOC_ENTRY);
        let mut offsets = Vec::with_capacity(blocks.len());
        for b in blocks {
            if b.span.len() != b.tokens.len() || b.span.geometry() != self.geometry {
                return Err(Error::InvalidParams {
                    detail: format!(
                        "a block of {} ids with a span of {} positions and geometry {:?} \
                         (the store's is {:?})",
                        b.tokens.len(),
                        b.span.len(),
                        b.span.geometry(),
                        self.geometry
                    ),
                });
            }
            let start = body.len();
            for x in [
                b.context.len(),
                b.tokens.len(),
                b.span.first_position(),
                if b.span.is_f16() { 1 } else { 2 },
            ] {
                body.extend((x as u32).to_le_bytes());
            }
            for id in b.context.iter().chain(b.tokens) {
                body.extend(id.to_le_bytes());
            }
            b.span.write_values(&mut body);
            offsets.push((key_hash(b.context, b.tokens), start, body.len() - start));
        }
        let header = serde_json::to_vec(&Header {
            format_version: FORMAT_VERSION,
            identity: self.identity.clone(),
            geometry: self.geometry,
            entries: blocks.len(),
        })
        .expect("a header serializes");
        let body_at = 8 + 4 + header.len() + blocks.len() * TOC_ENTRY + 32;
        for (hash, start, len) in offsets {
            toc.extend(hash.to_le_bytes());
            toc.extend(((body_at + start) as u64).to_le_bytes());
            toc.extend((len as u64).to_le_bytes());
            toc.extend(Sha256::digest(&body[start..start + len]));
        }
        let mut head = Vec::with_capacity(body_at);
        head.extend(MAGIC);
        head.extend((header.len() as u32).to_le_bytes());
        head.extend(&header);
        head.extend(&toc);
        let sum = Sha256::digest(&head);
        head.extend(sum);
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = self.dir.join(format!(
            "blocks-{stamp}-{}.{SEGMENT_EXTENSION}",
            std::process::id()
        ));
        ragtune_util::fs::write_atomic_with(&path, |f| {
            use std::io::Write;
            f.write_all(&head)?;
            f.write_all(&body)
        })
        .map_err(io_err(&path))?;
        Ok((path, (head.len() + body.len()) as u64))
    }

    /// Removes the segments of `dir` written for an index other than `index` (stale for every
    /// model and adapter) and the unreadable ones. Returns the files removed.
    ///
    /// # Errors
    /// [`Error::Io`] when a file cannot be read or removed.
    pub fn remove_stale(dir: &Path, index: &str) -> Result<Vec<PathBuf>> {
        let probe = BlockStoreIdentity {
            model_sha256: String::new(),
            adapter_sha256: None,
            prompt_format: 0,
            kv_dtype: String::new(),
            index: index.to_string(),
        };
        let store = BlockStore::open(dir, probe, (0, 0, 0))?;
        let mut removed = Vec::new();
        for (path, why) in store.skipped {
            if matches!(why, Skipped::StaleIndex | Skipped::Unreadable(_)) {
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                removed.push(path);
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvCache;

    fn identity(index: &str) -> BlockStoreIdentity {
        BlockStoreIdentity {
            model_sha256: "m".into(),
            adapter_sha256: None,
            prompt_format: 2,
            kv_dtype: "f16".into(),
            index: index.into(),
        }
    }

    /// A span of `n` positions with distinct values, f16 or f32.
    fn span(n: usize, f16: bool, seed: f32) -> KvSpan {
        let (layers, kvh, d) = (2, 3, 4);
        let mut cache = KvCache::new(layers, kvh, d, n).with_f16(f16);
        for (l, layer) in cache.layers_mut().iter_mut().enumerate() {
            for (i, x) in layer.keys.iter_mut().enumerate() {
                *x = seed + (l * 1000 + i) as f32 * 0.25;
            }
            for (i, x) in layer.values.iter_mut().enumerate() {
                *x = -seed - (l * 1000 + i) as f32 * 0.5;
            }
        }
        cache.set_len(n);
        cache.span(0..n).expect("span").at_position(17)
    }

    #[test]
    fn blocks_written_are_read_back_equal_and_others_are_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlockStore::open(dir.path(), identity("i1"), (2, 3, 4)).expect("open");
        assert!(store.is_empty());
        let (a, b) = (span(3, true, 1.0), span(2, false, 2.0));
        let (path, bytes) = store
            .write_segment(&[
                StoredBlock {
                    context: &[1, 2],
                    tokens: &[5, 6, 7],
                    span: &a,
                },
                StoredBlock {
                    context: &[1, 2],
                    tokens: &[8, 9],
                    span: &b,
                },
            ])
            .expect("write");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), bytes);
        // f16: 2 layers x (K + V) x 3 heads x 3 positions x 4 dims x 2 bytes = 288.
        assert_eq!(a.bytes(), 288);
        let store = BlockStore::open(dir.path(), identity("i1"), (2, 3, 4)).expect("reopen");
        assert_eq!((store.len(), store.bytes()), (2, bytes));
        assert_eq!(store.get(&[1, 2], &[5, 6, 7], None), Some(a));
        assert_eq!(store.get(&[1, 2], &[8, 9], None), Some(b));
        assert_eq!(store.get(&[1], &[5, 6, 7], None), None, "other context");
        assert_eq!(store.get(&[1, 2], &[5, 6], None), None, "other ids");
        assert_eq!((store.reads(), store.damaged()), (2, 0));
    }

    #[test]
    fn segments_of_another_identity_or_index_are_skipped_and_stale_ones_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = span(2, true, 0.0);
        let block = [StoredBlock {
            context: &[1],
            tokens: &[2, 3],
            span: &s,
        }];
        let old = BlockStore::open(dir.path(), identity("old"), (2, 3, 4)).expect("open");
        let (stale, _) = old.write_segment(&block).expect("write");
        let mut other = identity("new");
        other.adapter_sha256 = Some("a".into());
        let (kept, _) = BlockStore::open(dir.path(), other, (2, 3, 4))
            .expect("open")
            .write_segment(&block)
            .expect("write");
        let store = BlockStore::open(dir.path(), identity("new"), (2, 3, 4)).expect("open");
        assert!(store.is_empty());
        let mut skipped = store.skipped().to_vec();
        skipped.sort_by(|x, y| x.0.cmp(&y.0));
        let mut want = vec![
            (stale.clone(), Skipped::StaleIndex),
            (kept.clone(), Skipped::OtherIdentity),
        ];
        want.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(skipped, want);
        assert_eq!(
            BlockStore::remove_stale(dir.path(), "new").expect("remove"),
            vec![stale.clone()]
        );
        assert!(!stale.exists() && kept.exists());
    }

    #[test]
    fn a_damaged_entry_is_not_used_and_a_truncated_segment_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = span(4, true, 3.0);
        let store = BlockStore::open(dir.path(), identity("i"), (2, 3, 4)).expect("open");
        let (path, bytes) = store
            .write_segment(&[StoredBlock {
                context: &[1],
                tokens: &[2, 3, 4, 5],
                span: &s,
            }])
            .expect("write");
        // Flip one bit of the last value: the table is intact, the entry's sha256 is not.
        let mut data = std::fs::read(&path).expect("read");
        *data.last_mut().expect("byte") ^= 1;
        std::fs::write(&path, &data).expect("write");
        let store = BlockStore::open(dir.path(), identity("i"), (2, 3, 4)).expect("open");
        assert_eq!(store.len(), 1);
        assert_eq!(store.get(&[1], &[2, 3, 4, 5], None), None);
        assert_eq!(store.damaged(), 1);
        // Cut the file short: the table points past its end.
        std::fs::write(&path, &data[..bytes as usize - 10]).expect("truncate");
        let store = BlockStore::open(dir.path(), identity("i"), (2, 3, 4)).expect("open");
        assert!(store.is_empty());
        assert!(
            matches!(&store.skipped()[0].1, Skipped::Unreadable(w) if w.contains("outside")),
            "{:?}",
            store.skipped()
        );
        // Not a segment at all.
        std::fs::write(&path, b"hello").expect("garbage");
        let store = BlockStore::open(dir.path(), identity("i"), (2, 3, 4)).expect("open");
        assert!(matches!(&store.skipped()[0].1, Skipped::Unreadable(w) if w.contains("magic")));
    }

    #[test]
    fn a_span_of_another_geometry_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlockStore::open(dir.path(), identity("i"), (30, 3, 64)).expect("open");
        let s = span(2, true, 0.0);
        let err = store
            .write_segment(&[StoredBlock {
                context: &[],
                tokens: &[1, 2],
                span: &s,
            }])
            .expect_err("geometry");
        assert!(err.to_string().contains("geometry"), "{err}");
        assert!(std::fs::read_dir(dir.path()).map_or(true, |mut d| d.next().is_none()));
    }
}
