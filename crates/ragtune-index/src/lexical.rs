//! Lexical retrieval: an identifier-aware analyzer, BM25 postings stored per segment
//! (`seg-NNNNNN.lexical`), and exact matching of identifier fields (names, keys, ids).
//!
//! # Analysis
//!
//! [`analyze`] lowercases and splits text into words: maximal runs of letters, digits and the
//! *joiners* `- . _ + / : @`, with leading joiners and trailing ones (but `+`) trimmed. A word
//! with a joiner is emitted whole *and* as its parts, so `gpl-2.0-plus` gives `gpl-2.0-plus`,
//! `gpl`, `2.0`, `plus`; a dot between two digits never splits (`2.0`, `v1.1` stay one part),
//! a `v` before a version is also dropped (`v1.1` adds `1.1`), and letters glued to digits
//! are split too (`gplv2` adds `gpl`, `2`). Common English function words ([`STOP_WORDS`])
//! are dropped. Queries and documents go through the same analysis.
//!
//! # Scoring
//!
//! Okapi BM25 with Lucene's idf, `idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))`, and
//! `k1 = 1.2`, `b = 0.75` (Robertson & Zaragoza, "The Probabilistic Relevance Framework:
//! BM25 and Beyond", 2009). `N`, `df` and the average length are summed over all segments
//! (tombstoned rows included, as Lucene does), so a score does not depend on how the index is
//! split into segments.
//!
//! # Why our own postings, not tantivy or the `bm25` crate
//!
//! The postings must be part of the segment's atomic, checksummed commit: add, delete and
//! compact stay consistent because the lexical file is one more immutable file named by the
//! same manifest, with the same header and crc32 as the vectors. tantivy keeps its own
//! `meta.json` commit point and segment files (two commits to keep in step, and ~60 more
//! crates to build); the `bm25` crate has no on-disk form and hashes tokens to `u32`, so
//! identifiers could collide. The file below is memory-mapped and searched in place (binary
//! search over the sorted term table), so opening costs one checksum pass and no decoding.
//!
//! # File layout (`RTLEX\0\0\0`, payload after the 64-byte header)
//!
//! ```text
//! doc_len   rows x u32            analyzed tokens per row
//! df        n_terms x u32         rows containing each term
//! term_off  (n_terms + 1) x u32   byte offsets into `terms`
//! post_off  (n_terms + 1) x u32   byte offsets into `postings`
//! terms     UTF-8 terms, strictly ascending, concatenated
//! postings  per term, `df` pairs (LEB128 row delta, LEB128 term frequency), rows ascending
//! ```
//!
//! Header `aux0` = rows, `aux1` = n_terms.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::directory::FileBytes;
use crate::error::{Error, Result};
use crate::format::{cast_slice, HEADER_LEN};

/// BM25 term-frequency saturation.
pub const BM25_K1: f32 = 1.2;
/// BM25 length normalisation.
pub const BM25_B: f32 = 0.75;

/// Words dropped by [`analyze`]: English function words that carry no topic.
pub const STOP_WORDS: &[&str] = &[
    "a", "about", "an", "and", "are", "as", "at", "be", "been", "but", "by", "can", "do", "does",
    "for", "from", "had", "has", "have", "how", "i", "if", "in", "into", "is", "it", "its", "me",
    "my", "of", "on", "or", "our", "shall", "so", "such", "that", "the", "their", "then", "there",
    "these", "this", "those", "to", "was", "we", "were", "what", "when", "which", "who", "will",
    "with", "you", "your",
];

const JOINERS: &[char] = &['-', '.', '_', '+', '/', ':', '@'];

fn is_joiner(c: char) -> bool {
    JOINERS.contains(&c)
}

fn is_stop(w: &str) -> bool {
    STOP_WORDS.binary_search(&w).is_ok()
}

/// Lowercased words of `text` with leading joiners and trailing joiners other than `+`
/// trimmed (see the module docs).
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_alphanumeric() || is_joiner(c)))
        .filter_map(|raw| {
            let w = raw
                .trim_start_matches(is_joiner)
                .trim_end_matches(|c: char| is_joiner(c) && c != '+');
            if w.is_empty() {
                None
            } else {
                Some(w.to_lowercase())
            }
        })
}

/// The parts of a lowercased word: split at joiners, except a `.` between two digits.
fn parts(word: &str, out: &mut Vec<String>) {
    let chars: Vec<char> = word.chars().collect();
    let mut cur = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let keep = c.is_alphanumeric()
            || (c == '.'
                && i > 0
                && chars[i - 1].is_ascii_digit()
                && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit()));
        if keep {
            cur.push(c);
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
}

/// Variants of one part: a version without its `v` (`v1.1` → `1.1`), and letters glued to
/// digits split (`gplv2` → `gpl`, `2`; `lgpl2.1` → `lgpl`, `2.1`).
fn variants(part: &str, emit: &mut dyn FnMut(&str)) {
    let split = part.find(|c: char| c.is_ascii_digit());
    let Some(at) = split else { return };
    if at == 0 {
        return;
    }
    let (letters, digits) = part.split_at(at);
    if !letters.chars().all(|c| c.is_alphabetic())
        || !digits.chars().all(|c| c.is_ascii_digit() || c == '.')
    {
        return;
    }
    emit(digits);
    let stem = if letters.len() > 1 {
        letters.strip_suffix('v').unwrap_or(letters)
    } else {
        letters
    };
    if stem != "v" && !is_stop(stem) {
        emit(stem);
    }
}

/// Analyzes `text` into index terms (see the module docs), calling `emit` once per term
/// occurrence, in text order.
pub fn analyze(text: &str, emit: &mut dyn FnMut(&str)) {
    let mut ps = Vec::new();
    for w in words(text) {
        ps.clear();
        parts(&w, &mut ps);
        if ps.len() == 1 && ps[0] == w {
            if !is_stop(&w) {
                emit(&w);
                variants(&w, emit);
            }
            continue;
        }
        emit(&w);
        for p in &ps {
            if !is_stop(p) {
                emit(p);
                variants(p, emit);
            }
        }
    }
}

/// The analyzed terms of `text` as a vector (see [`analyze`]).
pub fn analyze_to_vec(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    analyze(text, &mut |t| out.push(t.to_string()));
    out
}

/// The word sequence used to match identifier phrases: lowercased parts, stop words kept,
/// joined by single spaces (`"Apache License 2.0"` and `apache-2.0` both start `apache`).
pub fn phrase_tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for w in words(text) {
        parts(&w, &mut out);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Building

fn put_u32(out: &mut Vec<u8>, x: u32) {
    out.extend_from_slice(&x.to_le_bytes());
}

fn put_varint(out: &mut Vec<u8>, mut x: u32) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

/// Builds the payload of a lexical file for `texts` (one per row, in row order).
/// Returns `(payload, n_terms)`.
///
/// # Errors
/// [`Error::TooLarge`] when a table would not fit its u32 offsets (over 4 GiB).
pub(crate) fn build<'a>(texts: impl Iterator<Item = &'a str>) -> Result<(Vec<u8>, u64)> {
    let mut doc_len: Vec<u32> = Vec::new();
    let mut postings: BTreeMap<String, Vec<(u32, u32)>> = BTreeMap::new();
    let mut counts: HashMap<String, u32> = HashMap::new();
    for (row, text) in texts.enumerate() {
        counts.clear();
        let mut n = 0u32;
        analyze(text, &mut |t| {
            n = n.saturating_add(1);
            *counts.entry(t.to_string()).or_insert(0) += 1;
        });
        doc_len.push(n);
        let row = u32::try_from(row).map_err(|_| Error::TooLarge {
            what: "rows in a lexical segment",
            limit: u64::from(u32::MAX) + 1,
            got: row as u64 + 1,
        })?;
        for (t, tf) in counts.drain() {
            postings.entry(t).or_default().push((row, tf));
        }
    }
    let too_big = |what: &'static str, got: usize| Error::TooLarge {
        what,
        limit: u64::from(u32::MAX),
        got: got as u64,
    };
    let mut terms = Vec::new();
    let mut blob = Vec::new();
    let mut df = Vec::with_capacity(postings.len());
    let mut term_off = vec![0u32];
    let mut post_off = vec![0u32];
    for (t, mut list) in postings {
        list.sort_unstable();
        terms.extend_from_slice(t.as_bytes());
        let mut prev = 0u32;
        for (i, &(row, tf)) in list.iter().enumerate() {
            put_varint(&mut blob, if i == 0 { row } else { row - prev });
            put_varint(&mut blob, tf);
            prev = row;
        }
        df.push(list.len() as u32);
        term_off.push(
            u32::try_from(terms.len())
                .map_err(|_| too_big("bytes in a lexical segment's term table", terms.len()))?,
        );
        post_off.push(
            u32::try_from(blob.len())
                .map_err(|_| too_big("bytes in a lexical segment's postings", blob.len()))?,
        );
    }
    let n_terms = df.len();
    let mut out =
        Vec::with_capacity(4 * (doc_len.len() + 3 * n_terms + 2) + terms.len() + blob.len());
    for x in doc_len.iter().chain(&df).chain(&term_off).chain(&post_off) {
        put_u32(&mut out, *x);
    }
    out.extend_from_slice(&terms);
    out.extend_from_slice(&blob);
    Ok((out, n_terms as u64))
}

// ---------------------------------------------------------------------------------------------
// Reading

/// A lexical file opened in place. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct LexicalView {
    bytes: FileBytes,
    path: PathBuf,
    rows: usize,
    n_terms: usize,
    df_at: usize,
    term_off_at: usize,
    post_off_at: usize,
    terms_at: usize,
    postings_at: usize,
    /// Sum of `doc_len`.
    pub(crate) total_len: u64,
}

impl LexicalView {
    /// Opens a verified file (header and checksum already checked) and validates its tables:
    /// sizes, monotone offsets in range, terms strictly ascending and UTF-8.
    ///
    /// # Errors
    /// [`Error::DataCorruption`] naming `path`.
    pub(crate) fn open(bytes: FileBytes, path: &Path, rows: u64, n_terms: u64) -> Result<Self> {
        let bad = |d: &str| Error::corrupt(path, format!("lexical postings: {d}"));
        let rows = usize::try_from(rows).map_err(|_| bad("row count too large"))?;
        let n_terms = usize::try_from(n_terms).map_err(|_| bad("term count too large"))?;
        let words = rows
            .checked_add(
                n_terms
                    .checked_mul(3)
                    .ok_or_else(|| bad("term count too large"))?,
            )
            .and_then(|x| x.checked_add(2))
            .and_then(|x| x.checked_mul(4))
            .ok_or_else(|| bad("term count too large"))?;
        let payload = bytes.len() - HEADER_LEN;
        if payload < words {
            return Err(bad("tables are truncated"));
        }
        let df_at = HEADER_LEN + 4 * rows;
        let term_off_at = df_at + 4 * n_terms;
        let post_off_at = term_off_at + 4 * (n_terms + 1);
        let terms_at = post_off_at + 4 * (n_terms + 1);
        let mut view = LexicalView {
            bytes,
            path: path.to_path_buf(),
            rows,
            n_terms,
            df_at,
            term_off_at,
            post_off_at,
            terms_at,
            postings_at: 0,
            total_len: 0,
        };
        let term_off = view.table(term_off_at, n_terms + 1)?;
        let post_off = view.table(post_off_at, n_terms + 1)?;
        let terms_len = *term_off.last().unwrap_or(&0) as usize;
        let post_len = *post_off.last().unwrap_or(&0) as usize;
        if term_off.first() != Some(&0)
            || post_off.first() != Some(&0)
            || term_off.windows(2).any(|w| w[0] >= w[1])
            || post_off.windows(2).any(|w| w[0] > w[1])
            || terms_at + terms_len + post_len != view.bytes.len()
        {
            return Err(bad("offset tables are inconsistent"));
        }
        let terms = &view.bytes[terms_at..terms_at + terms_len];
        if std::str::from_utf8(terms).is_err() {
            return Err(bad("terms are not UTF-8"));
        }
        let mut prev: Option<&[u8]> = None;
        for w in term_off.windows(2) {
            let t = &terms[w[0] as usize..w[1] as usize];
            if prev.is_some_and(|p| p >= t) {
                return Err(bad("terms are not strictly ascending"));
            }
            prev = Some(t);
        }
        let total: u64 = view
            .table(HEADER_LEN, rows)?
            .iter()
            .map(|&x| u64::from(x))
            .sum();
        view.postings_at = terms_at + terms_len;
        view.total_len = total;
        Ok(view)
    }

    fn table(&self, at: usize, n: usize) -> Result<&[u32]> {
        cast_slice(&self.bytes[at..at + 4 * n], &self.path, "lexical table")
    }

    /// Rows (chunks) covered.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Analyzed length of each row. Fails if the file was truncated under us (see
    /// [`FileBytes::still_intact`]); searches call this first.
    pub(crate) fn doc_len(&self) -> Result<&[u32]> {
        if !self.bytes.still_intact() {
            return Err(Error::corrupt(
                &self.path,
                "the file was truncated while the index was open (index files must never be \
                 edited in place)",
            ));
        }
        self.table(HEADER_LEN, self.rows)
    }

    fn term(&self, i: usize, off: &[u32]) -> &[u8] {
        &self.bytes[self.terms_at + off[i] as usize..self.terms_at + off[i + 1] as usize]
    }

    /// Index of `term` in the term table.
    pub(crate) fn find(&self, term: &str) -> Result<Option<usize>> {
        let off = self.table(self.term_off_at, self.n_terms + 1)?;
        let (mut lo, mut hi) = (0usize, self.n_terms);
        let key = term.as_bytes();
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.term(mid, off).cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(mid)),
            }
        }
        Ok(None)
    }

    /// Rows containing term `i`.
    pub(crate) fn df(&self, i: usize) -> Result<u32> {
        Ok(self.table(self.df_at, self.n_terms)?[i])
    }

    /// Calls `f(row, tf)` for every posting of term `i`, rows ascending.
    ///
    /// # Errors
    /// [`Error::DataCorruption`] for a malformed posting list (a crafted file).
    pub(crate) fn for_each_posting(&self, i: usize, f: &mut dyn FnMut(u32, u32)) -> Result<()> {
        let off = self.table(self.post_off_at, self.n_terms + 1)?;
        let df = self.df(i)?;
        let mut b =
            &self.bytes[self.postings_at + off[i] as usize..self.postings_at + off[i + 1] as usize];
        let bad = || Error::corrupt(&self.path, format!("lexical posting list {i} is malformed"));
        let mut row = 0u32;
        for n in 0..df {
            let delta = read_varint(&mut b).ok_or_else(bad)?;
            let tf = read_varint(&mut b).ok_or_else(bad)?;
            row = if n == 0 {
                delta
            } else {
                row.checked_add(delta)
                    .filter(|_| delta > 0)
                    .ok_or_else(bad)?
            };
            if row as usize >= self.rows {
                return Err(bad());
            }
            f(row, tf);
        }
        if !b.is_empty() {
            return Err(bad());
        }
        Ok(())
    }
}

fn read_varint(b: &mut &[u8]) -> Option<u32> {
    let mut x: u32 = 0;
    for shift in (0..35).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        x |= u32::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(x);
        }
    }
    None
}

/// BM25 weight of one posting.
#[inline]
pub(crate) fn bm25(idf: f32, tf: u32, dl: u32, avgdl: f32) -> f32 {
    let tf = tf as f32;
    idf * tf * (BM25_K1 + 1.0) / (tf + BM25_K1 * (1.0 - BM25_B + BM25_B * dl as f32 / avgdl))
}

/// Lucene's BM25 idf.
#[inline]
pub(crate) fn idf(n: u64, df: u64) -> f32 {
    let (n, df) = (n as f64, df as f64);
    (1.0 + (n - df + 0.5) / (df + 0.5)).ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_kept_whole_and_split() {
        let t = analyze_to_vec("Licensed under GPL-2.0-plus, see LicenseRef-scancode-mit-1995.");
        for want in [
            "licensed",
            "gpl-2.0-plus",
            "gpl",
            "2.0",
            "plus",
            "licenseref-scancode-mit-1995",
            "licenseref",
            "scancode",
            "mit",
            "1995",
        ] {
            assert!(t.iter().any(|x| x == want), "{want} missing from {t:?}");
        }
        assert!(!t.iter().any(|x| x == "2" || x == "0"), "{t:?}");
    }

    #[test]
    fn versions_and_glued_names() {
        let t = analyze_to_vec("version v1.1 of GPLv2 and LGPL2.1 or gpl-2.0+");
        for want in [
            "v1.1", "1.1", "gplv2", "gpl", "2", "lgpl2.1", "lgpl", "2.1", "gpl-2.0+", "2.0",
        ] {
            assert!(t.iter().any(|x| x == want), "{want} missing from {t:?}");
        }
        assert!(
            !t.iter().any(|x| x == "of" || x == "and" || x == "or"),
            "{t:?}"
        );
    }

    #[test]
    fn stop_words_sorted_for_binary_search() {
        assert!(STOP_WORDS.windows(2).all(|w| w[0] < w[1]));
        assert!(analyze_to_vec("what is the of ?!").is_empty());
    }

    #[test]
    fn phrase_tokens_ignore_punctuation() {
        assert_eq!(
            phrase_tokens("Apache License 2.0"),
            ["apache", "license", "2.0"]
        );
        assert_eq!(phrase_tokens("apache-2.0"), ["apache", "2.0"]);
        assert_eq!(
            phrase_tokens("What is the MIT license?"),
            ["what", "is", "the", "mit", "license"]
        );
    }

    #[test]
    fn build_and_read_back() {
        let texts = ["MIT license text", "GPL-2.0 license, GPL text", "nothing"];
        let (payload, n_terms) = build(texts.iter().copied()).expect("build");
        let file = crate::format::write_file(crate::format::MAGIC_LEXICAL, 3, n_terms, &payload);
        let view = LexicalView::open(FileBytes::from_slice(&file), Path::new("x"), 3, n_terms)
            .expect("open");
        let i = view.find("license").expect("find").expect("term");
        assert_eq!(view.df(i).expect("df"), 2);
        let mut got = Vec::new();
        view.for_each_posting(i, &mut |r, tf| got.push((r, tf)))
            .expect("postings");
        assert_eq!(got, [(0, 1), (1, 1)]);
        let g = view.find("gpl").expect("find").expect("gpl");
        let mut got = Vec::new();
        view.for_each_posting(g, &mut |r, tf| got.push((r, tf)))
            .expect("postings");
        assert_eq!(got, [(1, 2)]);
        assert!(view.find("absent").expect("find").is_none());
        assert_eq!(view.doc_len().expect("len"), &[3, 6, 1]);
        // A crafted file (valid header, bad table) is a typed error.
        let mut broken = payload.clone();
        broken[4 * 3 + 4 * n_terms as usize] ^= 0x01; // term_off[0] != 0
        let file = crate::format::write_file(crate::format::MAGIC_LEXICAL, 3, n_terms, &broken);
        let err = LexicalView::open(FileBytes::from_slice(&file), Path::new("x"), 3, n_terms)
            .expect_err("corrupt");
        assert!(matches!(err, Error::DataCorruption { .. }), "{err}");
    }

    #[test]
    fn bm25_prefers_rare_terms_and_short_docs() {
        assert!(idf(100, 1) > idf(100, 50));
        assert!(bm25(1.0, 1, 5, 10.0) > bm25(1.0, 1, 20, 10.0));
        assert!(bm25(1.0, 3, 10, 10.0) > bm25(1.0, 1, 10, 10.0));
    }
}
