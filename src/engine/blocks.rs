//! Chunk blocks persisted next to the index, in `<index>.kv-blocks/`
//! ([`ragtune_generate::BlockStore`]), for block attention (prompt format v2).
//!
//! A block is the KV of one source line `[n] (doc_id) text\n` computed right after the
//! context (the system message and the sources' heading), so a chunk has one block per
//! number `n` it can take in a prompt. [`Engine::precompute_blocks`] computes them for
//! chosen chunks and writes them as new segments; a later process with
//! `block_attention = true` reads a block from disk when its memory cache misses, instead of
//! prefilling it. The blocks are tied to the model file, the adapter's files, the prompt
//! format and the index (their sha256s): after any of them changes, the old segments are
//! ignored, and the next precompute removes those of an older index.
//!
//! Disk: 23,040 bytes per position for SmolLM2-135M (f16 keys and values, 30 layers, 3 KV
//! heads of 64), so a 100-token block takes about 2.3 MB.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ragtune_generate::{BlockStore, BlockStoreIdentity, KvSpan, LoraAdapter, Skipped, StoredBlock};
use sha2::{Digest, Sha256};

use super::prompt::{self, BLOCK_PROMPT_FORMAT_VERSION};
use super::{lock, Engine};
use crate::progress::Progress;
use crate::retrieve::RetrievedChunk;
use crate::{Error, Result};

/// Where the chunk blocks of the index at `index_dir` are kept: `<index>.kv-blocks`, beside
/// it (the index directory itself holds only the index's files).
pub fn block_store_dir(index_dir: &Path) -> PathBuf {
    let mut name = index_dir.file_name().unwrap_or_default().to_os_string();
    name.push(".kv-blocks");
    index_dir.with_file_name(name)
}

/// KV bytes gathered before a segment is written.
const SEGMENT_BYTES: usize = 128 << 20;

/// What [`Engine::precompute_blocks`] did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PrecomputeReport {
    /// Chunks asked for.
    pub chunks: usize,
    /// Blocks wanted: chunks times source numbers.
    pub blocks: usize,
    /// Of those, already on disk (not computed again).
    pub already_stored: usize,
    /// Blocks computed and written.
    pub written: usize,
    /// Positions (tokens) of the written blocks.
    pub positions: usize,
    /// Bytes of the segment files written.
    pub bytes_written: u64,
    /// Segment files written.
    pub segments: Vec<PathBuf>,
    /// Stale segments (of another index, or unreadable) removed first.
    pub removed_stale: usize,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Hex sha256 of the files, in order (a file's bytes then its length).
fn sha256_files(paths: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for path in paths {
        let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let n = std::io::copy(&mut f, &mut h).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        h.update(n.to_le_bytes());
    }
    Ok(crate::util::hex(&h.finalize()))
}

impl Engine {
    /// The identity of the blocks this engine computes with the adapter named `adapter`
    /// (`None`: the base model): the sha256 of the GGUF file, one over the adapter's
    /// `adapter_config.json` and `adapter_model.safetensors`, the KV precision, and the
    /// sha256 of the index's manifest.
    /// The model's is computed once.
    ///
    /// # Errors
    /// [`Error::Io`] when a file cannot be read; [`Error::UnknownAdapter`] for an adapter
    /// that is not loaded.
    pub fn block_identity(&self, adapter: Option<&str>) -> Result<BlockStoreIdentity> {
        let model_sha256 = match self.model_sha256.get() {
            Some(s) => s.clone(),
            None => {
                let s = crate::fetch::sha256_hex(&self.gguf)?;
                self.model_sha256.get_or_init(|| s).clone()
            }
        };
        let adapter_sha256 = match adapter {
            None => None,
            Some(name) => {
                let dir = self
                    .config
                    .adapters
                    .get(name)
                    .ok_or_else(|| self.unknown_adapter(name))?;
                Some(sha256_files(&[
                    dir.join(ragtune_generate::lora::CONFIG_FILE),
                    dir.join(ragtune_generate::lora::WEIGHTS_FILE),
                ])?)
            }
        };
        let index = sha256_files(&[self.index_dir.join(ragtune_index::MANIFEST)])?;
        let (layers, kv_heads, head_dim) = self.kv_geometry();
        let f16 =
            self.model.new_cache(1)?.span_bytes_per_position() == 4 * layers * kv_heads * head_dim;
        Ok(BlockStoreIdentity {
            model_sha256,
            adapter_sha256,
            prompt_format: BLOCK_PROMPT_FORMAT_VERSION,
            kv_dtype: if f16 { "f16" } else { "f32" }.to_string(),
            index,
        })
    }

    /// `(layers, kv_heads, head_dim)` of the model's KV.
    fn kv_geometry(&self) -> (usize, usize, usize) {
        let p = self.model.props();
        (p.block_count, p.head_count_kv, p.head_dim)
    }

    /// The persisted blocks for `adapter`, opened on first use; `None` without block
    /// attention, without a store directory, or when it cannot be opened (said once on the
    /// engine's notices).
    pub(crate) fn block_store(&self, adapter: Option<&str>) -> Option<Arc<BlockStore>> {
        if !self.config.block_attention {
            return None;
        }
        let key = adapter.map(str::to_string);
        let mut stores = lock(&self.block_stores);
        if let Some(store) = stores.get(&key) {
            return store.clone();
        }
        let dir = block_store_dir(&self.index_dir);
        let opened = if dir.exists() {
            match self
                .block_identity(adapter)
                .and_then(|id| Ok(BlockStore::open(&dir, id, self.kv_geometry())?))
            {
                Ok(store) => {
                    let stale = store
                        .skipped()
                        .iter()
                        .filter(|(_, why)| !matches!(why, Skipped::OtherIdentity))
                        .count();
                    if stale > 0 {
                        self.notices.notice(&format!(
                            "{stale} chunk-block segment(s) in {} are stale or unreadable and \
                             are ignored; `ragtune precompute-blocks` removes them",
                            dir.display()
                        ));
                    }
                    (!store.is_empty()).then(|| Arc::new(store))
                }
                Err(e) => {
                    self.notices
                        .notice(&format!("chunk blocks in {} not used: {e}", dir.display()));
                    None
                }
            }
        } else {
            None
        };
        stores.insert(key, opened.clone());
        opened
    }

    /// Blocks read from the persisted stores since the engine started, and entries found
    /// damaged (not used).
    pub fn block_store_reads(&self) -> (u64, u64) {
        lock(&self.block_stores)
            .values()
            .flatten()
            .fold((0, 0), |(r, d), s| (r + s.reads(), d + s.damaged()))
    }

    /// The persisted block of `tokens` after `context` for `adapter`, if stored.
    pub(crate) fn stored_block(
        &self,
        adapter: Option<(&str, &LoraAdapter)>,
        context: &[u32],
        tokens: &[u32],
    ) -> Option<KvSpan> {
        self.block_store(adapter.map(|(n, _)| n))?
            .get(context, tokens, adapter.map(|(_, a)| a))
    }

    /// Computes the chunk blocks of `chunks`, each as source number 1 to `numbers` (a
    /// chunk's block differs by its number), with the adapter named `adapter` (`None`: the
    /// base model, as `rag` uses), and writes those not yet stored into new segments of
    /// [`block_store_dir`] (at most 128 MiB of KV each). Segments of an older index are
    /// removed first. Progress is counted in blocks on `progress`.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for `numbers` of 0, a chat template without separable
    /// sources, or a chunk longer than the context window leaves; model errors (among them
    /// block attention refused on a model with sliding-window layers), adapter and I/O
    /// errors.
    pub fn precompute_blocks(
        &self,
        chunks: &[RetrievedChunk],
        numbers: usize,
        adapter: Option<&str>,
        progress: &Progress,
    ) -> Result<PrecomputeReport> {
        let started = Instant::now();
        if numbers == 0 {
            return Err(Error::InvalidSetting {
                key: "numbers".into(),
                value: "0".into(),
                expected: "at least 1 (the sources a prompt holds, the engine's k)".into(),
            });
        }
        let loaded = match adapter {
            None => None,
            Some(name) => Some(
                self.adapters
                    .get(name)
                    .ok_or_else(|| self.unknown_adapter(name))?,
            ),
        };
        let dir = block_store_dir(&self.index_dir);
        let identity = self.block_identity(adapter)?;
        let removed = BlockStore::remove_stale(&dir, &identity.index)?;
        let store = BlockStore::open(&dir, identity, self.kv_geometry())?;
        let mut report = PrecomputeReport {
            chunks: chunks.len(),
            blocks: chunks.len() * numbers,
            removed_stale: removed.len(),
            ..PrecomputeReport::default()
        };
        let Some(first) = chunks.first() else {
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        };
        let layout = prompt::block_prompt(
            &self.template,
            &self.tokenizer,
            &self.profile,
            "?",
            std::slice::from_ref(first),
            &[],
        )?
        .ok_or_else(|| Error::InvalidSetting {
            key: "block_attention".into(),
            value: "true".into(),
            expected: "a chat template that copies the user message verbatim".into(),
        })?;
        let context = layout.context;
        let bar = progress.bar(report.blocks as u64, "blocks");
        let mut todo: Vec<Vec<u32>> = Vec::new();
        for chunk in chunks {
            for n in 1..=numbers {
                let ids = prompt::source_block_ids(&self.tokenizer, &self.profile, n, chunk)?;
                if store.contains(&context, &ids) {
                    report.already_stored += 1;
                    bar.inc(1);
                } else {
                    todo.push(ids);
                }
            }
        }
        if todo.is_empty() {
            bar.finish_and_clear();
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        // The context's KV, then each block after it in the free slots.
        let longest = todo.iter().map(Vec::len).max().unwrap_or(0);
        let limit = self.model.props().context_length;
        let mut cache = self.model.new_cache((context.len() + longest).min(limit))?;
        self.model
            .forward_last_with(&context, 0, &mut cache, loaded)?;
        let positions: usize = todo.iter().map(Vec::len).sum();
        progress.notice(&format!(
            "{} blocks to compute ({positions} positions): about {:.0} MB in {}",
            todo.len(),
            (positions * cache.span_bytes_per_position()) as f64 / 1e6,
            dir.display()
        ));
        let mut pending: Vec<(Vec<u32>, KvSpan)> = Vec::new();
        let mut pending_bytes = 0;
        for (i, ids) in todo.iter().enumerate() {
            // One block a call: a plain causal prefill after the context (the model's
            // fastest path; several blocks in one call need a block mask).
            let capacity = context.len() + ids.len();
            if capacity > cache.capacity() {
                return Err(Error::InvalidSetting {
                    key: "chunk".into(),
                    value: format!("{} tokens", ids.len()),
                    expected: "a chunk that fits the model's context after the system prompt"
                        .into(),
                });
            }
            let span = self
                .model
                .forward_blocks(&[ids.as_slice()], &mut cache, loaded)?
                .pop()
                .expect("one span per chunk");
            pending_bytes += span.bytes();
            pending.push((ids.clone(), span));
            bar.inc(1);
            if pending_bytes >= SEGMENT_BYTES || i + 1 == todo.len() {
                let blocks: Vec<StoredBlock<'_>> = pending
                    .iter()
                    .map(|(ids, span)| StoredBlock {
                        context: &context,
                        tokens: ids,
                        span,
                    })
                    .collect();
                let (path, bytes) = store.write_segment(&blocks)?;
                report.written += blocks.len();
                report.positions += pending.iter().map(|(ids, _)| ids.len()).sum::<usize>();
                report.bytes_written += bytes;
                report.segments.push(path);
                pending.clear();
                pending_bytes = 0;
            }
        }
        bar.finish_and_clear();
        // The engine's open stores do not see the new segments: open them again.
        lock(&self.block_stores).clear();
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}
