//! Computed KV kept across requests, bounded in bytes.
//!
//! Two kinds of entries share one byte budget and one least-recently-used order:
//!
//! - **Prefix blocks**: the KV of a prompt's first tokens, in blocks of [`BLOCK_TOKENS`]
//!   positions, in a trie keyed by the blocks' token ids (the idea of SGLang's
//!   RadixAttention, Zheng et al. 2024, arXiv 2312.07104, and of vLLM's automatic prefix
//!   caching, with fixed-size blocks as vLLM's). A request reuses the longest run of whole
//!   blocks its prompt starts with: the system prompt, the earlier turns of a conversation,
//!   a repeated prompt. Only whole blocks are kept, so at most `BLOCK_TOKENS - 1` positions
//!   of a shared prefix are computed again.
//! - **Chunk blocks**: the KV of a span of tokens computed after a given context (a
//!   retrieved chunk after the system prefix), at the position it was computed at, for
//!   block attention (Sun et al. 2024, "Block-Attention for Efficient Prefilling", arXiv
//!   2409.15355): placed into any prompt with its keys re-rotated
//!   (`LlamaModel::append_span`).
//!
//! Entries are separated by namespace: the LoRA adapter they were computed with (its id, so
//! two loads of one directory do not share) and a caller's `salt` for everything else the
//! KV depends on (the prompt format, the attention layout). A block of one namespace is
//! never returned for another.
//!
//! KV is stored in f16 ([`KvSpan`]); the [`KvCache`] rounds what it computes to f16, so
//! restoring a prefix gives the values a fresh prefill writes, bit for bit. SmolLM2-135M:
//! 23,040 bytes per position (30 layers, 3 KV heads of 64), an 8-token block 184,320 bytes.
//!
//! Eviction drops the least recently used chunk block or trie leaf until the bytes in use
//! are within the bound (an interior trie block is dropped only after the blocks below it,
//! so a kept block always has its whole prefix). A request holds what it looked up by
//! `Arc`, so eviction never pulls data from under a running request. Thread-safe: one lock
//! around the index, held for lookups and inserts, never during a forward pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::kv_cache::{KvCache, KvSpan};
use crate::lora::LoraAdapter;
use crate::{Error, Result};

/// Positions per prefix block.
pub const BLOCK_TOKENS: usize = 8;

/// Adapter id (`None`: base) and the caller's salt.
type Namespace = (Option<u64>, u64);

/// What is cached, and how well it served (since the cache was made).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct PrefixCacheStats {
    /// Bytes of KV held (f16 keys and values).
    pub bytes: usize,
    /// The bound on `bytes`.
    pub max_bytes: usize,
    /// Prefix blocks held.
    pub prefix_blocks: usize,
    /// Chunk blocks held.
    pub chunk_blocks: usize,
    /// Prompt positions looked up in the trie.
    pub lookup_tokens: u64,
    /// Of those, positions served from it.
    pub hit_tokens: u64,
    /// Chunk-block lookups, and of those, hits.
    pub chunk_lookups: u64,
    /// Chunk-block lookups that found the block.
    pub chunk_hits: u64,
    /// Entries dropped to keep within `max_bytes`.
    pub evictions: u64,
}

/// The cache (see the module docs).
#[derive(Debug)]
pub struct PrefixCache {
    store: Mutex<Store>,
}

#[derive(Debug)]
struct Node {
    parent: Option<usize>,
    /// The block's token ids (empty for a root).
    key: Box<[u32]>,
    /// `None` for a root.
    span: Option<Arc<KvSpan>>,
    children: HashMap<Box<[u32]>, usize>,
    used: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct ChunkKey {
    ns: Namespace,
    /// The context tokens the chunk was computed after.
    context: Box<[u32]>,
    tokens: Box<[u32]>,
}

#[derive(Debug)]
struct Chunk {
    span: Arc<KvSpan>,
    used: u64,
}

#[derive(Debug)]
struct Store {
    max_bytes: usize,
    tick: u64,
    nodes: HashMap<usize, Node>,
    next_node: usize,
    roots: HashMap<Namespace, usize>,
    chunks: HashMap<ChunkKey, Chunk>,
    stats: PrefixCacheStats,
}

fn namespace(salt: u64, adapter: Option<&LoraAdapter>) -> Namespace {
    (adapter.map(LoraAdapter::id), salt)
}

impl ChunkKey {
    fn new(salt: u64, adapter: Option<&LoraAdapter>, context: &[u32], tokens: &[u32]) -> Self {
        ChunkKey {
            ns: namespace(salt, adapter),
            context: context.into(),
            tokens: tokens.into(),
        }
    }
}

impl PrefixCache {
    /// An empty cache holding at most `max_bytes` of KV (0 keeps nothing).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            store: Mutex::new(Store {
                max_bytes,
                tick: 0,
                nodes: HashMap::new(),
                next_node: 0,
                roots: HashMap::new(),
                chunks: HashMap::new(),
                stats: PrefixCacheStats {
                    max_bytes,
                    ..PrefixCacheStats::default()
                },
            }),
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic elsewhere while holding the lock leaves the index consistent (every
        // mutation below completes or does not start), so the poison is ignored.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached blocks `tokens` starts with, in order (positions `0..n * BLOCK_TOKENS`),
    /// computed under `adapter` with `salt`. Marks them used.
    pub fn lookup(
        &self,
        salt: u64,
        adapter: Option<&LoraAdapter>,
        tokens: &[u32],
    ) -> Vec<Arc<KvSpan>> {
        let mut s = self.store();
        let tick = s.touch();
        s.stats.lookup_tokens += tokens.len() as u64;
        let mut out = Vec::new();
        let Some(&root) = s.roots.get(&namespace(salt, adapter)) else {
            return out;
        };
        let mut at = root;
        for block in tokens.chunks_exact(BLOCK_TOKENS) {
            let Some(&next) = s.nodes[&at].children.get(block) else {
                break;
            };
            let node = s.nodes.get_mut(&next).expect("a child is in the arena");
            node.used = tick;
            out.push(Arc::clone(node.span.as_ref().expect("a child has KV")));
            at = next;
        }
        s.stats.hit_tokens += (out.len() * BLOCK_TOKENS) as u64;
        out
    }

    /// Keeps the whole blocks of `tokens` (the ids at `cache`'s slots `0..tokens.len()`)
    /// that are not cached yet, then evicts down to the bound. Returns the positions now
    /// covered (a multiple of [`BLOCK_TOKENS`]).
    ///
    /// # Errors
    /// [`Error::InvalidParams`] when `cache` holds fewer positions than `tokens`, starts at
    /// another RoPE position than 0, or was computed under another adapter than `adapter`.
    pub fn insert(
        &self,
        salt: u64,
        adapter: Option<&LoraAdapter>,
        tokens: &[u32],
        cache: &KvCache,
    ) -> Result<usize> {
        let id = adapter.map(LoraAdapter::id);
        if cache.len() < tokens.len()
            || cache.first_position() != 0
            || (!cache.is_empty() && cache.adapter_id() != id)
        {
            return Err(Error::InvalidParams {
                detail: format!(
                    "{} prompt positions kept from a cache holding {} (from position {}) \
                     of another adapter or length",
                    tokens.len(),
                    cache.len(),
                    cache.first_position()
                ),
            });
        }
        let blocks = tokens.len() / BLOCK_TOKENS;
        let mut s = self.store();
        let tick = s.touch();
        let ns = namespace(salt, adapter);
        let mut at = match s.roots.get(&ns) {
            Some(&r) => r,
            None => {
                let r = s.add_node(None, Box::new([]), None, tick);
                s.roots.insert(ns, r);
                r
            }
        };
        for (i, block) in tokens.chunks_exact(BLOCK_TOKENS).enumerate() {
            let existing = s.nodes[&at].children.get(block).copied();
            at = match existing {
                Some(next) => {
                    s.nodes.get_mut(&next).expect("child").used = tick;
                    next
                }
                None => {
                    // The copy is made under the lock; it is a few hundred kB per block.
                    let span = cache.span(i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS)?;
                    let key: Box<[u32]> = block.into();
                    let next = s.add_node(Some(at), key.clone(), Some(Arc::new(span)), tick);
                    s.nodes
                        .get_mut(&at)
                        .expect("parent")
                        .children
                        .insert(key, next);
                    next
                }
            };
        }
        s.evict();
        Ok(blocks * BLOCK_TOKENS)
    }

    /// The chunk block of `tokens` computed after `context` under `adapter` with `salt`, if
    /// cached (marked used).
    pub fn chunk(
        &self,
        salt: u64,
        adapter: Option<&LoraAdapter>,
        context: &[u32],
        tokens: &[u32],
    ) -> Option<Arc<KvSpan>> {
        let key = ChunkKey::new(salt, adapter, context, tokens);
        let mut s = self.store();
        let tick = s.touch();
        s.stats.chunk_lookups += 1;
        let found = s.chunks.get_mut(&key).map(|c| {
            c.used = tick;
            Arc::clone(&c.span)
        });
        if found.is_some() {
            s.stats.chunk_hits += 1;
        }
        found
    }

    /// Keeps `span` as the chunk block of `tokens` after `context` (replacing an equal
    /// key's), then evicts down to the bound. Returns it shared.
    ///
    /// # Errors
    /// [`Error::InvalidParams`] when the span was computed under another adapter or holds
    /// another number of positions than `tokens`.
    pub fn insert_chunk(
        &self,
        salt: u64,
        adapter: Option<&LoraAdapter>,
        context: &[u32],
        tokens: &[u32],
        span: KvSpan,
    ) -> Result<Arc<KvSpan>> {
        if span.adapter_id() != adapter.map(LoraAdapter::id) || span.len() != tokens.len() {
            return Err(Error::InvalidParams {
                detail: format!(
                    "a chunk block of {} positions for {} tokens, or of another adapter",
                    span.len(),
                    tokens.len()
                ),
            });
        }
        let span = Arc::new(span);
        let key = ChunkKey::new(salt, adapter, context, tokens);
        let mut s = self.store();
        let used = s.touch();
        s.stats.bytes += span.bytes();
        if let Some(old) = s.chunks.insert(
            key,
            Chunk {
                span: Arc::clone(&span),
                used,
            },
        ) {
            s.stats.bytes -= old.span.bytes();
        }
        s.evict();
        Ok(span)
    }

    /// What is held and how well it served.
    pub fn stats(&self) -> PrefixCacheStats {
        let s = self.store();
        PrefixCacheStats {
            prefix_blocks: s.nodes.values().filter(|n| n.span.is_some()).count(),
            chunk_blocks: s.chunks.len(),
            ..s.stats
        }
    }

    /// Drops every entry (the statistics of use are kept).
    pub fn clear(&self) {
        let mut s = self.store();
        s.nodes.clear();
        s.roots.clear();
        s.chunks.clear();
        s.stats.bytes = 0;
    }
}

impl Store {
    /// The next tick of the least-recently-used clock.
    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn add_node(
        &mut self,
        parent: Option<usize>,
        key: Box<[u32]>,
        span: Option<Arc<KvSpan>>,
        used: u64,
    ) -> usize {
        let id = self.next_node;
        self.next_node += 1;
        self.stats.bytes += span.as_ref().map_or(0, |s| s.bytes());
        self.nodes.insert(
            id,
            Node {
                parent,
                key,
                span,
                children: HashMap::new(),
                used,
            },
        );
        id
    }

    /// Drops least recently used leaves and chunk blocks until within the bound.
    fn evict(&mut self) {
        while self.stats.bytes > self.max_bytes {
            let leaf = self
                .nodes
                .iter()
                .filter(|(_, n)| n.span.is_some() && n.children.is_empty())
                .min_by_key(|(_, n)| n.used)
                .map(|(&id, n)| (id, n.used));
            let chunk = self
                .chunks
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(k, c)| (k, c.used));
            match (leaf, chunk) {
                (Some((id, lu)), c) if c.is_none_or(|(_, cu)| lu <= cu) => {
                    let node = self.nodes.remove(&id).expect("the leaf is in the arena");
                    self.stats.bytes -= node.span.map_or(0, |s| s.bytes());
                    if let Some(p) = node.parent {
                        let parent = self.nodes.get_mut(&p).expect("parent");
                        parent.children.remove(&node.key);
                        if parent.children.is_empty() && parent.span.is_none() {
                            // An empty root: drop it with its namespace.
                            self.nodes.remove(&p);
                            self.roots.retain(|_, r| *r != p);
                        }
                    }
                }
                (_, Some((key, _))) => {
                    let key = key.clone();
                    let c = self.chunks.remove(&key).expect("the chunk is held");
                    self.stats.bytes -= c.span.bytes();
                }
                (None, None) => break,
                (Some(_), None) => unreachable!("matched by the first arm"),
            }
            self.stats.evictions += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of 2 layers, 1 KV head of 4, whose slot `i` holds keys and values `token + i`
    /// (f16-exact small integers), as if `tokens` had been computed into it.
    fn cache_of(tokens: &[u32]) -> KvCache {
        let mut c = KvCache::new(2, 1, 4, tokens.len().max(1) + 8);
        let d = 4;
        for layer in c.layers_mut() {
            for (i, &t) in tokens.iter().enumerate() {
                let x = vec![(t as f32) + i as f32; d];
                layer.write(i * d, &x, &x);
            }
        }
        c.set_len(tokens.len());
        c
    }

    fn bytes_per_block() -> usize {
        cache_of(&[0]).span_bytes_per_position() * BLOCK_TOKENS
    }

    #[test]
    fn the_longest_whole_block_prefix_is_found() {
        const B: usize = BLOCK_TOKENS;
        let cache = PrefixCache::new(usize::MAX);
        let n = (2 * B + B / 2) as u32;
        let a: Vec<u32> = (0..n).collect();
        assert_eq!(
            cache.insert(7, None, &a, &cache_of(&a)).expect("insert"),
            2 * B
        );
        // Shares the first block and a half: one whole block.
        let mut b: Vec<u32> = (0..(B + B / 2) as u32).collect();
        b.extend(100..130);
        let hit = cache.lookup(7, None, &b);
        assert_eq!(hit.len(), 1);
        assert_eq!(hit[0].first_position(), 0);
        assert_eq!(hit[0].key(1, 0, 5), vec![10.0; 4], "token 5 at slot 5");
        assert_eq!(hit[0].len(), B);
        assert_eq!(cache.lookup(7, None, &a).len(), 2);
        // Another salt is another namespace.
        assert!(cache.lookup(8, None, &a).is_empty());
        let s = cache.stats();
        assert_eq!(s.prefix_blocks, 2);
        assert_eq!(s.bytes, 2 * bytes_per_block());
        assert_eq!(s.hit_tokens as usize, B + 2 * B);
        assert_eq!(s.lookup_tokens as usize, b.len() + 2 * a.len());
    }

    #[test]
    fn the_byte_bound_holds_under_eviction_and_keeps_the_recent_ones() {
        let block = bytes_per_block();
        let cache = PrefixCache::new(3 * block);
        let seqs: Vec<Vec<u32>> = (0..6u32)
            .map(|s| (0..2 * BLOCK_TOKENS as u32).map(|i| s * 1000 + i).collect())
            .collect();
        for (n, s) in seqs.iter().enumerate() {
            cache.insert(0, None, s, &cache_of(s)).expect("insert");
            let st = cache.stats();
            assert!(
                st.bytes <= 3 * block,
                "after {n}: {} > {}",
                st.bytes,
                3 * block
            );
            // Touch the first sequence each time: it stays.
            assert!(!cache.lookup(0, None, &seqs[0]).is_empty(), "after {n}");
        }
        let st = cache.stats();
        assert!(st.evictions > 0);
        assert_eq!(st.bytes, st.prefix_blocks * block);
        // The most recent sequence's first block is kept, the middle ones are gone.
        assert!(!cache.lookup(0, None, &seqs[5]).is_empty());
        assert!(cache.lookup(0, None, &seqs[2]).is_empty());
        // A chunk block shares the budget.
        let chunk = cache_of(&[9; 20]).span(0..20).expect("span");
        let chunk_bytes = chunk.bytes();
        cache
            .insert_chunk(0, None, &[1, 2], &[9; 20], chunk)
            .expect("chunk");
        let st = cache.stats();
        assert!(st.bytes <= 3 * block && st.chunk_blocks == 1, "{st:?}");
        assert_eq!(st.bytes, st.prefix_blocks * block + chunk_bytes);
    }

    #[test]
    fn a_kept_block_always_has_its_prefix() {
        let block = bytes_per_block();
        let cache = PrefixCache::new(2 * block);
        let long: Vec<u32> = (0..4 * BLOCK_TOKENS as u32).collect();
        cache
            .insert(0, None, &long, &cache_of(&long))
            .expect("insert");
        // Only the first two blocks can stay; the deepest were dropped first.
        assert_eq!(cache.lookup(0, None, &long).len(), 2);
        assert_eq!(cache.stats().prefix_blocks, 2);
    }

    #[test]
    fn chunks_are_keyed_by_context_and_tokens() {
        let cache = PrefixCache::new(usize::MAX);
        let span = cache_of(&[5; 3]).span(0..3).expect("span");
        cache
            .insert_chunk(1, None, &[1, 2], &[5, 5, 5], span.clone())
            .expect("insert");
        assert_eq!(
            cache.chunk(1, None, &[1, 2], &[5, 5, 5]).as_deref(),
            Some(&span)
        );
        assert!(cache.chunk(1, None, &[1], &[5, 5, 5]).is_none());
        assert!(cache.chunk(2, None, &[1, 2], &[5, 5, 5]).is_none());
        assert!(cache.chunk(1, None, &[1, 2], &[5, 5]).is_none());
        assert!(cache.insert_chunk(1, None, &[1], &[5, 5], span).is_err());
        let s = cache.stats();
        assert_eq!((s.chunk_lookups, s.chunk_hits), (4, 1));
    }

    #[test]
    fn a_cache_shorter_than_the_tokens_is_refused() {
        let cache = PrefixCache::new(usize::MAX);
        let tokens: Vec<u32> = (0..2 * BLOCK_TOKENS as u32).collect();
        assert!(cache
            .insert(0, None, &tokens, &cache_of(&tokens[..BLOCK_TOKENS]))
            .is_err());
        assert_eq!(cache.stats().bytes, 0);
    }
}
