//! SentencePiece's BPE segmentation as llama.cpp runs it on a GGUF vocabulary
//! (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral, TinyLlama, Gemma), as a `tokenizers`
//! [`Model`] so that the `tokenizers` crate keeps the normalizer, the added and special
//! tokens and the decoder around it.
//!
//! The algorithm is `llm_tokenizer_spm_session::tokenize` (llama.cpp, `src/llama-vocab.cpp`),
//! itself SentencePiece's `bpe_model.cc`: start from the text's characters; repeatedly merge
//! the adjacent pair whose concatenation is a vocabulary piece with the highest score
//! (`tokenizer.ggml.scores`), the leftmost pair on a tie; emit each final symbol's id, or its
//! UTF-8 bytes as the `<0xXX>` byte pieces when the symbol is not a piece (byte fallback), or
//! the unknown token when a byte piece is missing too.
//!
//! It needs no merge table: Hugging Face's conversion (`SentencePieceExtractor`) lists every
//! split of every piece as a BPE merge, which for Gemma 3's 262,144 pieces made a tokenizer of
//! about 100 MB. This one holds the pieces once, in one string, with a hash table of ids
//! (about 6 MB for Gemma 3).

use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};

use hashbrown::{DefaultHashBuilder, HashTable};
use tokenizers::models::bpe::BpeTrainer;
use tokenizers::models::TrainerWrapper;
use tokenizers::{Model, Token};

/// A SentencePiece vocabulary with its scores; see the module docs.
pub struct SpmModel {
    /// Every piece, one after the other.
    text: String,
    /// Piece `i` is `text[ends[i - 1]..ends[i]]` (`ends[-1]` = 0).
    ends: Vec<u32>,
    /// `tokenizer.ggml.scores`, one a piece.
    scores: Vec<f32>,
    /// Ids, found by their piece's hash.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    /// The ids of the byte pieces `<0x00>` .. `<0xFF>`, where present.
    bytes: [Option<u32>; 256],
    /// `tokenizer.ggml.unknown_token_id`.
    unk: Option<u32>,
}

impl std::fmt::Debug for SpmModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpmModel")
            .field("pieces", &self.scores.len())
            .field("unk", &self.unk)
            .finish_non_exhaustive()
    }
}

/// A candidate merge of the symbols `left` and `right` into a piece of `score` whose text is
/// `len` bytes long (stale once either symbol changed).
#[derive(Debug, PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    /// The highest score first; on a tie, the leftmost pair (llama.cpp's
    /// `llm_bigram_spm::comparator` on a max-heap).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One symbol of the text being segmented: bytes `start..start + len`, `len` 0 once merged
/// into its left neighbour; a doubly linked list through `prev`/`next`.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SpmModel {
    /// The model of `pieces` (ids in order) with their `scores`; `unk` is the id emitted for a
    /// byte that has no `<0xXX>` piece.
    ///
    /// The caller checks that `scores` has one score a piece.
    pub(crate) fn new(pieces: &[&str], scores: &[f32], unk: Option<u32>) -> Self {
        let hasher = DefaultHashBuilder::default();
        let mut text = String::with_capacity(pieces.iter().map(|p| p.len()).sum());
        let mut ends = Vec::with_capacity(pieces.len());
        let mut index = HashTable::with_capacity(pieces.len());
        let mut bytes = [None; 256];
        for (id, piece) in pieces.iter().enumerate() {
            text.push_str(piece);
            ends.push(text.len() as u32);
            let id = id as u32;
            let hash = hasher.hash_one(piece);
            let same = |&other: &u32| piece_of(&text, &ends, other) == *piece;
            // A repeated piece keeps its first id, as llama.cpp's `token_to_id` map does.
            if index.find(hash, same).is_none() {
                index.insert_unique(hash, id, |&i| hasher.hash_one(piece_of(&text, &ends, i)));
            }
            if let Some(b) = byte_piece(piece) {
                bytes[usize::from(b)].get_or_insert(id);
            }
        }
        Self {
            text,
            ends,
            scores: scores.to_vec(),
            index,
            hasher,
            bytes,
            unk,
        }
    }

    /// The text of piece `id`.
    fn piece(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.ends.len()).then(|| piece_of(&self.text, &self.ends, id))
    }

    /// The id of `piece`.
    fn id(&self, piece: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(piece);
        self.index
            .find(hash, |&id| piece_of(&self.text, &self.ends, id) == piece)
            .copied()
    }

    /// The ids of `text` (already normalized: spaces as `▁`, the prefix added), with the byte
    /// offsets of each in `text`.
    pub(crate) fn segment(&self, text: &str) -> Vec<(u32, (usize, usize))> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: usize, right: usize| -> Option<Bigram> {
            let (l, r) = (symbols[left], symbols[right]);
            let len = l.len + r.len;
            let id = self.id(&text[l.start..l.start + len])?;
            Some(Bigram {
                score: self.scores[id as usize],
                left,
                right,
                len,
            })
        };
        for right in 1..symbols.len() {
            queue.extend(bigram(&symbols, right - 1, right));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue; // one side was merged since this pair was proposed
            }
            symbols[b.left].len = b.len;
            symbols[b.left].next = r.next;
            symbols[b.right].len = 0;
            if let Some(next) = r.next {
                symbols[next].prev = Some(b.left);
            }
            if let Some(prev) = l.prev {
                queue.extend(bigram(&symbols, prev, b.left));
            }
            if let Some(next) = r.next {
                queue.extend(bigram(&symbols, b.left, next));
            }
        }
        let mut out = Vec::with_capacity(symbols.len());
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.id(piece) {
                Some(id) => out.push((id, (s.start, s.start + s.len))),
                None => {
                    for (k, b) in piece.bytes().enumerate() {
                        if let Some(id) = self.bytes[usize::from(b)].or(self.unk) {
                            out.push((id, (s.start + k, s.start + k + 1)));
                        }
                    }
                }
            }
            at = s.next;
        }
        out
    }
}

/// Piece `id` of the concatenated `text` with its `ends`.
fn piece_of<'a>(text: &'a str, ends: &[u32], id: u32) -> &'a str {
    let i = id as usize;
    let start = if i == 0 { 0 } else { ends[i - 1] as usize };
    &text[start..ends[i] as usize]
}

/// The byte of a byte piece (`"<0x0A>"` is 10).
fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

impl Model for SpmModel {
    type Trainer = TrainerWrapper;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        Ok(self
            .segment(sequence)
            .into_iter()
            .map(|(id, offsets)| Token {
                id,
                value: self.piece(id).unwrap_or_default().to_string(),
                offsets,
            })
            .collect())
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.piece(id).map(str::to_string)
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        (0..self.ends.len() as u32)
            .rev()
            .map(|id| (piece_of(&self.text, &self.ends, id).to_string(), id))
            .collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.ends.len()
    }

    /// Not supported: a GGUF vocabulary is saved with its GGUF file.
    fn save(&self, _folder: &Path, _prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        Err(
            "a SentencePiece vocabulary read from GGUF metadata cannot be saved as \
             tokenizer.json files"
                .into(),
        )
    }

    /// A default BPE trainer: training a vocabulary is not this crate's business, and the
    /// `tokenizers` trait asks for one.
    fn get_trainer(&self) -> TrainerWrapper {
        BpeTrainer::default().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces `▁`, `a`, `b`, `c`, `ab`, `bc`, `abc`, `▁ab` and two byte pieces, with scores
    /// that make `bc` merge before `ab`.
    fn model() -> SpmModel {
        let pieces = [
            "<unk>",
            "<0x21>",
            "<0xE2>",
            "\u{2581}",
            "a",
            "b",
            "c",
            "ab",
            "bc",
            "abc",
            "\u{2581}ab",
        ];
        let scores = [
            0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -2.0, -5.0, -3.0, -4.0, -6.0,
        ];
        SpmModel::new(&pieces, &scores, Some(0))
    }

    #[test]
    fn the_highest_scored_merge_goes_first() {
        let m = model();
        // `bc` (-3) beats `ab` (-5): a + bc, then `abc` (-4).
        assert_eq!(
            m.segment("abc").iter().map(|t| t.0).collect::<Vec<_>>(),
            [9]
        );
        // `▁ab`: `ab` first, then `▁` + `ab`; the trailing `b` stays.
        let ids: Vec<u32> = m.segment("\u{2581}abb").iter().map(|t| t.0).collect();
        assert_eq!(ids, [10, 5]);
    }

    #[test]
    fn ties_merge_the_leftmost_pair() {
        // `aa` and `ab` both score -1: in `aab` the leftmost pair `aa` merges first, and `b`
        // is left alone since `aab` is no piece.
        let pieces = ["a", "b", "aa", "ab"];
        let m = SpmModel::new(&pieces, &[0.0, 0.0, -1.0, -1.0], None);
        let ids: Vec<u32> = m.segment("aab").iter().map(|t| t.0).collect();
        assert_eq!(ids, [2, 1]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes_or_unk() {
        let m = model();
        // `!` is the byte piece <0x21>; `€` (E2 82 AC) has only its first byte as a piece.
        let got = m.segment("a!€");
        let ids: Vec<u32> = got.iter().map(|t| t.0).collect();
        assert_eq!(ids, [4, 1, 2, 0, 0]);
        assert_eq!(got[1].1, (1, 2));
        assert_eq!(got[4].1, (4, 5));
        assert!(m.segment("").is_empty());
    }

    #[test]
    fn lookups_and_byte_pieces() {
        let m = model();
        assert_eq!(m.token_to_id("\u{2581}ab"), Some(10));
        assert_eq!(m.token_to_id("ba"), None);
        assert_eq!(m.id_to_token(8).as_deref(), Some("bc"));
        assert_eq!(m.id_to_token(11), None);
        assert_eq!(m.get_vocab().len(), 11);
        assert_eq!(byte_piece("<0x0A>"), Some(10));
        assert_eq!(byte_piece("<0xZZ>"), None);
        assert_eq!(byte_piece("<0x0A0>"), None);
    }
}
