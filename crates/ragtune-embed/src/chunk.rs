//! Token-aware chunking: splits a document into windows of at most `max_tokens` word
//! pieces of the embedder's own tokenizer, with overlap, each remembering its byte range in
//! the source text so that `&doc[span.start..span.end]` is exactly the chunk.

use tokenizers::Tokenizer;

use crate::{Error, Result};

/// Chunk size and overlap, in word pieces of the embedder's tokenizer (special tokens
/// such as `[CLS]`/`[SEP]` excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    /// Most word pieces in one chunk. Keep it at most the encoder's `max_seq_len - 2`, or
    /// the encoder truncates the chunk's tail.
    pub max_tokens: usize,
    /// Word pieces shared by consecutive chunks (`< max_tokens`).
    pub overlap_tokens: usize,
}

impl Default for ChunkParams {
    /// 200 word pieces with 32 of overlap: a little under MiniLM's 256-piece window.
    fn default() -> Self {
        ChunkParams {
            max_tokens: 200,
            overlap_tokens: 32,
        }
    }
}

/// One chunk of a document: a byte range of the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    /// Byte offset of the first byte (on a UTF-8 character boundary).
    pub start: usize,
    /// Byte offset one past the last byte.
    pub end: usize,
    /// Word pieces in the chunk.
    pub tokens: usize,
}

/// Splits documents into token windows with a tokenizer that neither pads nor truncates.
#[derive(Debug, Clone)]
pub struct Chunker {
    tokenizer: Tokenizer,
    params: ChunkParams,
}

impl Chunker {
    /// A chunker with a copy of `tokenizer` (its padding and truncation are turned off).
    ///
    /// # Errors
    /// [`Error::InvalidChunking`] when `max_tokens == 0` or `overlap_tokens >= max_tokens`.
    pub fn new(tokenizer: &Tokenizer, params: ChunkParams) -> Result<Chunker> {
        if params.max_tokens == 0 || params.overlap_tokens >= params.max_tokens {
            return Err(Error::InvalidChunking {
                max_tokens: params.max_tokens,
                overlap_tokens: params.overlap_tokens,
            });
        }
        let mut tokenizer = tokenizer.clone();
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|source| Error::Tokenizer {
                operation: "turning truncation off",
                source,
            })?;
        Ok(Chunker { tokenizer, params })
    }

    /// The parameters.
    pub fn params(&self) -> ChunkParams {
        self.params
    }

    /// Splits `text` into chunks covering all its word pieces, in order. A window that would
    /// end inside a word is moved back to the start of that word when that keeps at least half
    /// the window, so chunks rarely cut words. Empty or whitespace-only text gives no chunks.
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn split(&self, text: &str) -> Result<Vec<ChunkSpan>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|source| Error::Tokenizer {
                operation: "encoding a text to chunk",
                source,
            })?;
        // Offsets of real pieces (special tokens have (0, 0)).
        let offsets: Vec<(usize, usize)> = enc
            .get_offsets()
            .iter()
            .zip(enc.get_special_tokens_mask())
            .filter(|(o, &special)| special == 0 && o.1 > o.0)
            .map(|(o, _)| *o)
            .collect();
        let n = offsets.len();
        let mut spans = Vec::new();
        if n == 0 {
            return Ok(spans);
        }
        // A piece starts a word when something (a space) separates it from the previous one, or
        // it is the first one.
        let starts_word = |i: usize| i == 0 || offsets[i].0 > offsets[i - 1].1;
        let ChunkParams {
            max_tokens,
            overlap_tokens,
        } = self.params;
        let mut first = 0usize;
        loop {
            let mut end = (first + max_tokens).min(n); // exclusive piece index
            if end < n {
                let mut e = end;
                while e > first + max_tokens / 2 && !starts_word(e) {
                    e -= 1;
                }
                if starts_word(e) && e > first {
                    end = e;
                }
            }
            let start_byte = offsets[first].0;
            let end_byte = offsets[end - 1].1;
            spans.push(ChunkSpan {
                start: floor_char_boundary(text, start_byte),
                end: ceil_char_boundary(text, end_byte),
                tokens: end - first,
            });
            if end >= n {
                break;
            }
            let mut next = end.saturating_sub(overlap_tokens).max(first + 1);
            while next > first + 1 && !starts_word(next) {
                next -= 1;
            }
            first = next;
        }
        Ok(spans)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}
