//! A request's KV cache, assembled before generation from what earlier requests computed.
//!
//! 1. The longest run of whole blocks the prompt starts with comes from the prefix cache
//!    ([`PrefixCache`], a trie of blocks of [`BLOCK_TOKENS`](ragtune_generate::BLOCK_TOKENS) positions): the system prompt, a conversation's
//!    earlier turns, a repeated prompt.
//! 2. For a block-attention prompt ([`BlockPrompt`], format v2), the rest of the head is
//!    prefilled, then each source's KV block is taken from the cache, else from the blocks
//!    persisted next to the index (blocks.rs), else computed after the context (one causal
//!    prefill call each) and kept, and appended with its keys re-rotated to its place.
//! 3. The generator prefills what is left (the tail) and decodes.
//!
//! After the answer, the prompt and the generated tokens are kept in the trie, so the next
//! turn of a chat prefills only its new tokens.
//!
//! The namespaces ([`CAUSAL`], [`BLOCKS`]) keep apart KV computed with plain causal attention
//! and KV of block-attention prompts, whose positions after the head differ for the same
//! ids; the adapter is part of every key.

use std::time::Instant;

use std::sync::Arc;

use ragtune_generate::{KvCache, KvSpan, LoraAdapter};

use super::prompt::BlockPrompt;
use super::Engine;
use crate::Result;

/// The prefix-cache salt of prompts computed with causal attention throughout (format v1,
/// the closed-book modes).
pub(crate) const CAUSAL: u64 = 1;
/// The salt of block-attention prompts (format v2) and their chunk blocks.
pub(crate) const BLOCKS: u64 = 2;

/// The salt of a prompt's prefix blocks: [`BLOCKS`] for a block-attention prompt, else
/// [`CAUSAL`].
fn salt(block_prompt: bool) -> u64 {
    if block_prompt {
        BLOCKS
    } else {
        CAUSAL
    }
}

/// What [`Engine::assemble_kv`] did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Assembled {
    /// Prompt positions taken from the cache (prefix blocks and chunk blocks).
    pub cached: usize,
    /// Milliseconds spent computing the head and the missing chunk blocks.
    pub prefill_ms: f64,
}

impl Engine {
    /// A cache of `capacity` positions holding the first positions of `prompt` (all but the
    /// tail, for a block prompt; at least one token is always left to prefill). `named` is
    /// `adapter` with its configured name (`None` for the base model or an adapter given
    /// without one), for the persisted chunk blocks.
    ///
    /// # Errors
    /// Model errors (a forward pass, a span that does not fit).
    pub(crate) fn assemble_kv(
        &self,
        prompt: &[u32],
        layout: Option<&BlockPrompt>,
        named: Option<(&str, &LoraAdapter)>,
        adapter: Option<&LoraAdapter>,
        capacity: usize,
    ) -> Result<(KvCache, Assembled)> {
        let salt = salt(layout.is_some());
        let mut cache = self.model.new_cache(capacity)?;
        let mut done = Assembled::default();
        for span in self
            .kv
            .lookup(salt, adapter, &prompt[..prompt.len().saturating_sub(1)])
        {
            self.model.append_span(&mut cache, &span, adapter)?;
        }
        let Some(layout) = layout else {
            done.cached = cache.len();
            return Ok((cache, done));
        };
        let started = Instant::now();
        // Resume at the first block the cached run does not cover whole.
        if cache.len() > layout.head {
            let resume = layout
                .blocks
                .iter()
                .find(|b| b.end > cache.len())
                .map_or(cache.len(), |b| b.start);
            cache.truncate(resume);
        }
        done.cached = cache.len();
        if cache.len() < layout.head {
            let from = cache.len();
            self.model
                .forward_last_with(&prompt[from..layout.head], from, &mut cache, adapter)?;
        }
        // The blocks still to place: from the cache, else computed together in one call.
        let todo: Vec<&std::ops::Range<usize>> = layout
            .blocks
            .iter()
            .filter(|b| b.end > cache.len())
            .collect();
        let mut spans: Vec<Option<Arc<KvSpan>>> = todo
            .iter()
            .map(|b| {
                self.kv
                    .chunk(BLOCKS, adapter, &layout.context, &prompt[(*b).clone()])
            })
            .collect();
        // Missed in memory: from the persisted blocks (blocks.rs), kept in memory too.
        for (b, s) in todo.iter().zip(spans.iter_mut()) {
            if s.is_none() {
                let ids = &prompt[(*b).clone()];
                if let Some(span) = self.stored_block(named, &layout.context, ids) {
                    *s = Some(
                        self.kv
                            .insert_chunk(BLOCKS, adapter, &layout.context, ids, span)?,
                    );
                }
            }
        }
        for (b, s) in todo.iter().zip(&spans) {
            if s.is_some() {
                done.cached += b.len();
            }
        }
        let missing: Vec<usize> = (0..todo.len()).filter(|&i| spans[i].is_none()).collect();
        if !missing.is_empty() {
            let ids: Vec<&[u32]> = missing.iter().map(|&i| &prompt[todo[i].clone()]).collect();
            let computed = self.chunk_blocks(layout, &ids, &cache, adapter)?;
            for ((&i, ids), span) in missing.iter().zip(&ids).zip(computed) {
                spans[i] =
                    Some(
                        self.kv
                            .insert_chunk(BLOCKS, adapter, &layout.context, ids, span)?,
                    );
            }
        }
        for span in spans.iter().flatten() {
            self.model.append_span(&mut cache, span, adapter)?;
        }
        done.prefill_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok((cache, done))
    }

    /// The KV blocks of `chunks`, each computed right after the layout's context and
    /// attending to it and itself only: one causal prefill call each, on a scratch copy of
    /// the context's KV. That is the model's fastest path (several chunks in one call need a
    /// `(t, past + t)` block mask outside the own attention kernels: about half the
    /// speed), and it computes a block exactly as `Engine::precompute_blocks` does, so a
    /// block read from disk holds the same bits. The context's KV comes from a copy of the
    /// request's head when the prompt has no history (the head is the context), else from
    /// the prefix cache, the rest prefilled and kept.
    fn chunk_blocks(
        &self,
        layout: &BlockPrompt,
        chunks: &[&[u32]],
        request: &KvCache,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Vec<KvSpan>> {
        let context = &layout.context;
        let longest = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        let capacity = context.len() + longest;
        let mut cache = if layout.head == context.len() && request.len() >= layout.head {
            request.copy_prefix(layout.head, capacity)?
        } else {
            let mut c = self.model.new_cache(capacity)?;
            for span in self.kv.lookup(BLOCKS, adapter, context) {
                self.model.append_span(&mut c, &span, adapter)?;
            }
            if c.len() < context.len() {
                let from = c.len();
                self.model
                    .forward_last_with(&context[from..], from, &mut c, adapter)?;
            }
            // The context is the head of every prompt without history: keep it.
            self.kv.insert(BLOCKS, adapter, context, &c)?;
            c
        };
        let mut spans = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            spans.extend(self.model.forward_blocks(&[chunk], &mut cache, adapter)?);
        }
        Ok(spans)
    }

    /// Keeps the computed positions of `tokens` (the prompt, then the generated ids) for
    /// later requests.
    ///
    /// # Errors
    /// Only for a cache that does not hold `tokens` (a defect).
    pub(crate) fn remember_kv(
        &self,
        tokens: &[u32],
        block_prompt: bool,
        adapter: Option<&LoraAdapter>,
        cache: &KvCache,
    ) -> Result<()> {
        let salt = salt(block_prompt);
        let n = cache.len().min(tokens.len());
        self.kv.insert(salt, adapter, &tokens[..n], cache)?;
        Ok(())
    }
}
