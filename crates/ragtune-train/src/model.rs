//! The forward pass for training, for every architecture `ragtune-generate` serves
//! ([`Architecture`](ragtune_generate::Architecture): llama with or without Llama 3.1's
//! `rope_freqs`, qwen2, gemma3): the frozen base dequantized to f32, LoRA factors as
//! candle `Var`s, every op differentiable (see [`crate::ops`]).
//!
//! The arithmetic is the one `ragtune-generate` serves (`LlamaModel` with
//! `WeightFormat::F32`), and the variants are decided by the same `Architecture` methods
//! and built from the same [`rope_tables`]: pre-norm blocks, grouped-query attention with
//! interleaved (llama) or NeoX (qwen2, gemma3) RoPE on the GGUF q/k layout, q/k/v biases
//! (qwen2), Gemma's per-head q/k norms, post-norms, GeGLU, embedding scale and local
//! sliding-window layers with their own RoPE base, a gated MLP, tied or separate output
//! projection. Tests check this forward against llama.cpp's logits (tiny qwen2 and llama3
//! files, Gemma 3 270M's greedy tokens) and against the served model, and that an adapter
//! saved from here and loaded there reproduces the trained model's logits.
//!
//! Why a second forward pass and not the served one with `Var`s: the served model is built
//! for inference. Its projections run on quantized weights through this workspace's own
//! kernels, its RoPE, residual adds and norms write in place into plain buffers, and its
//! attention reads and writes a KV cache. None of that records a candle graph, so no
//! gradient could flow through it. Here every op is a candle op with a backward, over
//! packed sequences with block-diagonal masks instead of a cache. What is shared is what
//! decides the arithmetic: the metadata ([`LlamaProps`]), the architecture's variant
//! switches, the RoPE tables and the PEFT target names and shapes ([`TargetModule`]).
//!
//! Inputs are *packed* sequences ([`PackedSeq`]): several examples concatenated, each with
//! its own positions (from 0) and attending only to itself (a block-diagonal causal mask).
//! Within an example, each token's [`Attend`] label narrows what it sees: the source blocks
//! of prompt format v2 see the example's head and themselves only (block attention, Sun et al.
//! 2024, arXiv 2409.15355), as the engine computes them. The engine computes every block as
//! if it came right after the head (its *canonical* positions) and re-rotates its keys to
//! where the block is placed. So here a block token's query and key take its canonical
//! position when the block attends (to the head and itself), and later tokens see its key
//! at its place in the prompt: two score matrices, each row taken from the one its token
//! uses (one fused op computes both, `attention.rs`). This is what the engine serves, up to
//! the rounding of the re-rotation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor, Var};
use ragtune_generate::lora::Factor;
use ragtune_generate::{rope_tables, LlamaProps, LoraConfig, RopeParams, RopeStyle, TargetModule};
use rand::{Rng, SeedableRng};

use crate::attention::{attention, AttentionMask};
use crate::error::io;
use crate::frozen::{FrozenWeight, MatmulPrecision};
use crate::fused::{glu, rms_norm, rope, Gate, RopePairs};
use crate::ops::{frozen_linear, lora_linear, Dropout};
use crate::{Error, Result};

/// What to adapt and how: PEFT's `r`, `lora_alpha`, `lora_dropout`, `target_modules`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    /// Rank `r` of each update `B A`.
    pub rank: usize,
    /// `lora_alpha`; the update is scaled by `alpha / rank` (Hu et al. 2021, LoRA, §4.1).
    pub alpha: f64,
    /// Dropout probability on the input of the LoRA branch (training only), in `[0, 1)`.
    pub dropout: f64,
    /// The adapted projections (PEFT names in JSON).
    #[serde(with = "peft_names")]
    pub targets: Vec<TargetModule>,
}

mod peft_names {
    use ragtune_generate::TargetModule;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &[TargetModule], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(t.iter().map(|m| m.peft_name()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<TargetModule>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|n| {
                TargetModule::from_peft_name(n)
                    .ok_or_else(|| serde::de::Error::custom(format!("unknown module {n}")))
            })
            .collect()
    }
}

impl LoraSpec {
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks the ranges.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `rank = 0`, a non-finite `alpha`, a dropout outside
    /// `[0, 1)`, no target.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, value: String, expected| {
            Err(Error::InvalidParameter {
                name,
                value,
                expected,
            })
        };
        if self.rank == 0 {
            return bad("rank", self.rank.to_string(), "a LoRA rank >= 1");
        }
        if !self.alpha.is_finite() {
            return bad("alpha", self.alpha.to_string(), "a finite LoRA alpha");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(
                "dropout",
                self.dropout.to_string(),
                "a LoRA dropout in [0, 1)",
            );
        }
        if self.targets.is_empty() {
            return bad(
                "targets",
                "[]".to_string(),
                "at least one LoRA target module",
            );
        }
        Ok(())
    }

    /// The PEFT `adapter_config.json` of this spec.
    pub fn peft_config(&self, base_model: &str) -> LoraConfig {
        let mut config = LoraConfig::new(self.rank, self.alpha, &self.targets);
        config
            .other
            .insert("lora_dropout".into(), self.dropout.into());
        config
            .other
            .insert("base_model_name_or_path".into(), base_model.into());
        config
    }
}

/// How `lora_B` starts. PEFT's default is zeros (the adapted model starts as the base); the
/// other choice exists for gradient tests, where a zero `B` makes `dL/dA` exactly zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitB {
    /// `B = 0` (PEFT's `init_lora_weights = True`).
    Zeros,
    /// `B ~ N(0, std²)`.
    Gaussian {
        /// Standard deviation.
        std: f64,
    },
}

/// What a token attends to within its example (always causally, never past itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Attend {
    /// The tokens labelled `Context` before it: the example's head, or the whole example when
    /// it has no source blocks.
    #[default]
    Context,
    /// Source block `k` (from 1): the `Context` tokens and block `k`'s tokens before it.
    Block(u32),
    /// Every token of the example before it (the question after the sources, the answer).
    All,
}

impl Attend {
    /// Whether a token labelled `self` sees an earlier token of its example labelled `other`.
    pub fn sees(self, other: Attend) -> bool {
        match self {
            Attend::All => true,
            Attend::Context => other == Attend::Context,
            Attend::Block(k) => other == Attend::Context || other == Attend::Block(k),
        }
    }
}

/// One packed training sequence: `tokens[i]` at position `positions[i]` in example
/// `segments[i]`; `targets` lists `(i, next)` where the loss asks for token `next` after
/// reading `tokens[..=i]` (assistant tokens only).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackedSeq {
    /// Token ids, `t` of them.
    pub tokens: Vec<u32>,
    /// Position of each token within its example (RoPE), from 0.
    pub positions: Vec<u32>,
    /// Example index of each token within this sequence; tokens attend within one example.
    pub segments: Vec<u32>,
    /// What each token attends to within its example.
    pub attend: Vec<Attend>,
    /// `(index into tokens, target id)`, in increasing index order.
    pub targets: Vec<(u32, u32)>,
}

impl PackedSeq {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// The positions the engine computes `seq`'s tokens at when they attend: a source block's
/// tokens right after its example's head (the `Context` tokens before the first block), at
/// `head + offset in the block`; every other token at its own position. `None` when `seq`
/// has no block token.
fn canonical_positions(seq: &PackedSeq) -> Option<Vec<u32>> {
    if !seq.attend.iter().any(|a| matches!(a, Attend::Block(_))) {
        return None;
    }
    let mut out = seq.positions.clone();
    let mut head = 0u32;
    let mut block_start = 0u32;
    for (i, canonical) in out.iter_mut().enumerate() {
        let position = seq.positions[i];
        let new_example = i == 0 || seq.segments[i] != seq.segments[i - 1];
        if new_example {
            head = 0;
        }
        match seq.attend[i] {
            Attend::Context if head == position => head += 1,
            Attend::Block(k) => {
                if new_example || seq.attend[i - 1] != Attend::Block(k) {
                    block_start = position;
                }
                *canonical = head + position - block_start;
            }
            _ => {}
        }
    }
    Some(out)
}

#[derive(Debug)]
struct FrozenBlock {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// Per [`TargetModule::ALL`] index, `(out, in)` f32.
    weights: Vec<FrozenWeight>,
    /// Qwen2: the biases of the q, k and v projections, `(out,)` each.
    qkv_bias: Option<[Tensor; 3]>,
    /// Gemma 3: RMS norms of each head's query and key, `(head_dim,)`, before RoPE.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// Gemma 3: norms of the attention output and of the MLP output, `(hidden,)`, before
    /// each residual add.
    post_attn_norm: Option<Tensor>,
    post_ffn_norm: Option<Tensor>,
    /// A local layer: sliding-window attention and the local RoPE base.
    local: bool,
}

/// The LoRA factors of one projection, in GGUF row order: `a: (r, in)`, `b: (out, r)`.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// `lora_A`.
    pub a: Var,
    /// `lora_B`.
    pub b: Var,
}

/// The frozen base (f32) with trainable LoRA factors.
#[derive(Debug)]
pub struct TrainModel {
    props: LlamaProps,
    /// `(vocab, hidden)`.
    embeddings: Tensor,
    blocks: Vec<FrozenBlock>,
    norm: Tensor,
    /// `(vocab, hidden)`; the embeddings when tied.
    output: Tensor,
    /// `(context_length, d / 2)`.
    cos: Tensor,
    sin: Tensor,
    /// The local layers' tables (Gemma 3), `(context_length, d / 2)` each.
    local_rope: Option<(Tensor, Tensor)>,
    /// Gemma: the embeddings are scaled by `sqrt(hidden)`.
    embed_scale: Option<f64>,
    spec: LoraSpec,
    /// Per layer, per [`TargetModule::ALL`] index.
    lora: Vec<Vec<Option<LoraFactors>>>,
}

fn dequantize(content: &Content, reader: &mut std::fs::File, name: &str) -> Result<Tensor> {
    let q = content.tensor(reader, name, &Device::Cpu)?;
    Ok(q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
}

impl TrainModel {
    /// Loads the GGUF at `path`, dequantizes every weight to f32 (SmolLM2-135M: 0.5 GiB,
    /// Gemma 3 270M: about 1 GiB, 0.6 GiB of it the 262,144-row embedding) and adds LoRA
    /// factors for `spec`: `A` Kaiming-uniform in `±1/sqrt(in)` (PEFT's init), `B` per
    /// `init_b`, from a generator seeded with `seed`.
    ///
    /// # Errors
    /// GGUF and props errors of `ragtune-generate` (among them
    /// [`Unsupported`](ragtune_generate::Error::Unsupported) naming an architecture outside
    /// [`Architecture::ALL`](ragtune_generate::Architecture::ALL), and
    /// [`TensorShape`](ragtune_generate::Error::TensorShape) for a weight whose shape
    /// differs from the metadata), [`Error::InvalidParameter`] for a bad `spec`.
    pub fn load(path: impl AsRef<Path>, spec: LoraSpec, init_b: InitB, seed: u64) -> Result<Self> {
        spec.validate()?;
        let path = path.as_ref();
        let mut file = std::fs::File::open(path).map_err(io(path))?;
        let content = Content::read(&mut file).map_err(|source| ragtune_generate::Error::Gguf {
            path: path.to_path_buf(),
            source,
        })?;
        let props = LlamaProps::try_from(&content)?;
        let arch = props.architecture;
        let (hidden, hd) = (props.embedding_length, props.head_dim);
        let embeddings = dequantize(&content, &mut file, "token_embd.weight")?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            dequantize(&content, &mut file, "output.weight")?
        } else {
            embeddings.clone()
        };
        let norm = dequantize(&content, &mut file, "output_norm.weight")?;
        let mut blocks = Vec::with_capacity(props.block_count);
        for i in 0..props.block_count {
            let mut t = |n: &str, shape: &[usize]| {
                let name = format!("blk.{i}.{n}");
                let w = dequantize(&content, &mut file, &name)?;
                if w.dims() != shape {
                    return Err(Error::from(ragtune_generate::Error::TensorShape {
                        name,
                        expected: shape.to_vec(),
                        got: w.dims().to_vec(),
                    }));
                }
                Ok(w)
            };
            let attn_norm = t("attn_norm.weight", &[hidden])?;
            let ffn_norm = t("ffn_norm.weight", &[hidden])?;
            let qkv_bias = match arch.qkv_bias() {
                true => {
                    let (q, kv) = (props.head_count * hd, props.head_count_kv * hd);
                    Some([
                        t("attn_q.bias", &[q])?,
                        t("attn_k.bias", &[kv])?,
                        t("attn_v.bias", &[kv])?,
                    ])
                }
                false => None,
            };
            let gemma = arch.is_gemma();
            let mut norm = |n: &str, len: usize| match gemma {
                true => t(n, &[len]).map(Some),
                false => Ok(None),
            };
            let (q_norm, k_norm) = (
                norm("attn_q_norm.weight", hd)?,
                norm("attn_k_norm.weight", hd)?,
            );
            let (post_attn_norm, post_ffn_norm) = (
                norm("post_attention_norm.weight", hidden)?,
                norm("post_ffw_norm.weight", hidden)?,
            );
            let mut weights = Vec::with_capacity(7);
            for m in TargetModule::ALL {
                let (out, inp) = m.dims(&props);
                let w = t(&format!("{}.weight", m.gguf_name()), &[out, inp])?;
                weights.push(FrozenWeight::new(&w)?);
            }
            blocks.push(FrozenBlock {
                attn_norm,
                ffn_norm,
                weights,
                qkv_bias,
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                local: arch.is_local_layer(i),
            });
        }
        // Llama 3.1+ RoPE scaling: per-frequency divisors of the global tables.
        let freq_factors = match content.tensor_infos.contains_key("rope_freqs.weight") {
            true => Some(dequantize(&content, &mut file, "rope_freqs.weight")?.to_vec1::<f32>()?),
            false => None,
        };
        let ctx = props.context_length;
        let (cos, sin) = rope_tables(&props.rope, hd, ctx, freq_factors.as_deref(), &Device::Cpu)?;
        let local_rope = match arch.local_rope_base() {
            Some(freq_base) => {
                let params = RopeParams {
                    freq_base,
                    ..props.rope
                };
                Some(rope_tables(&params, hd, ctx, None, &Device::Cpu)?)
            }
            None => None,
        };
        let embed_scale = arch.is_gemma().then(|| f64::from((hidden as f32).sqrt()));
        let mut model = Self {
            props,
            embeddings,
            blocks,
            norm,
            output,
            cos,
            sin,
            local_rope,
            embed_scale,
            spec,
            lora: Vec::new(),
        };
        model.init_lora(init_b, seed)?;
        Ok(model)
    }

    fn init_lora(&mut self, init_b: InitB, seed: u64) -> Result<()> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let r = self.spec.rank;
        let mut layers = Vec::with_capacity(self.props.block_count);
        for _ in 0..self.props.block_count {
            let mut modules: Vec<Option<LoraFactors>> = vec![None; 7];
            for m in TargetModule::ALL {
                if !self.spec.targets.contains(&m) {
                    continue;
                }
                let (out, inp) = m.dims(&self.props);
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..r * inp)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let b: Vec<f32> = match init_b {
                    InitB::Zeros => vec![0.0; out * r],
                    InitB::Gaussian { std } => (0..out * r)
                        .map(|_| {
                            // Box-Muller.
                            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
                            let u2: f64 = rng.random();
                            (std * (-2.0 * u1.ln()).sqrt()
                                * (2.0 * std::f64::consts::PI * u2).cos())
                                as f32
                        })
                        .collect(),
                };
                modules[m.index()] = Some(LoraFactors {
                    a: Var::from_tensor(&Tensor::from_vec(a, (r, inp), &Device::Cpu)?)?,
                    b: Var::from_tensor(&Tensor::from_vec(b, (out, r), &Device::Cpu)?)?,
                });
            }
            layers.push(modules);
        }
        self.lora = layers;
        Ok(())
    }

    /// The base model's typed metadata.
    pub fn props(&self) -> &LlamaProps {
        &self.props
    }

    /// Runs the frozen projections' products in `precision` from now on (see
    /// [`MatmulPrecision`]).
    pub fn set_matmul_precision(&mut self, precision: MatmulPrecision) {
        for block in &mut self.blocks {
            for w in &mut block.weights {
                *w = w.with_precision(precision);
            }
        }
    }

    /// The LoRA spec.
    pub fn spec(&self) -> &LoraSpec {
        &self.spec
    }

    /// Every trainable tensor with a stable name `layers.{i}.{peft module}.lora_{A|B}` (GGUF
    /// row order), in a fixed order (layer, module, A before B).
    pub fn named_params(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (i, modules) in self.lora.iter().enumerate() {
            for m in TargetModule::ALL {
                if let Some(f) = &modules[m.index()] {
                    out.push((format!("layers.{i}.{}.lora_A", m.peft_name()), &f.a));
                    out.push((format!("layers.{i}.{}.lora_B", m.peft_name()), &f.b));
                }
            }
        }
        out
    }

    /// Number of trainable parameters.
    pub fn param_count(&self) -> usize {
        self.named_params()
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    }

    /// The factors of `module` in `layer`, if adapted.
    pub fn factors(&self, layer: usize, module: TargetModule) -> Option<&LoraFactors> {
        self.lora.get(layer)?[module.index()].as_ref()
    }

    /// The adapter's tensors under PEFT names in HF row order (q/k `lora_B` rows permuted
    /// back, see `ragtune_generate::lora`), as `adapter_model.safetensors` holds them.
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn peft_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, modules) in self.lora.iter().enumerate() {
            for m in TargetModule::ALL {
                let Some(f) = &modules[m.index()] else {
                    continue;
                };
                let mut b = f.b.as_tensor().copy()?;
                if let Some(heads) = m.permuted_heads(&self.props) {
                    b = ragtune_generate::lora::permute_rows_gguf_to_hf(&b, heads)?;
                }
                out.insert(m.tensor_name(i, Factor::A), f.a.as_tensor().copy()?);
                out.insert(m.tensor_name(i, Factor::B), b);
            }
        }
        Ok(out)
    }

    /// Writes the adapter as a PEFT directory (`adapter_config.json`,
    /// `adapter_model.safetensors`), each file atomically.
    ///
    /// # Errors
    /// File-system errors as `ragtune_generate::Error::Io`.
    pub fn save_adapter(&self, dir: impl AsRef<Path>, base_model: &str) -> Result<()> {
        self.spec
            .peft_config(base_model)
            .save(dir, &self.peft_tensors()?)?;
        Ok(())
    }

    /// The projection `x: (t, in)` -> `(t, out)` of `module` in `layer`, with its LoRA
    /// branch `scale · dropout(x) Aᵀ Bᵀ` when adapted.
    fn project(
        &self,
        layer: usize,
        module: TargetModule,
        x: &Tensor,
        dropout: &mut Option<&mut rand::rngs::StdRng>,
    ) -> Result<Tensor> {
        let w = &self.blocks[layer].weights[module.index()];
        let Some(f) = &self.lora[layer][module.index()] else {
            return frozen_linear(x, w.tensor());
        };
        let p = self.spec.dropout;
        let dropout = match dropout {
            Some(rng) if p > 0.0 => Some(Dropout {
                seed: rng.random::<u64>(),
                p,
            }),
            _ => None,
        };
        lora_linear(
            x,
            w,
            f.a.as_tensor(),
            f.b.as_tensor(),
            self.spec.scale(),
            dropout,
        )
    }

    /// The final hidden states (after the output norm) of `seq`: `(t, hidden)`.
    /// `dropout`: the generator for LoRA dropout (training), `None` for evaluation.
    ///
    /// # Errors
    /// [`Error::SequenceShape`] for an empty sequence, [`Error::TokenOutOfRange`] for a token
    /// outside the vocabulary, [`Error::PositionOutOfRange`] for a position past the context
    /// length, [`Unsupported`](ragtune_generate::Error::Unsupported) for source blocks on a
    /// model with sliding-window layers (the engine serves no block attention there);
    /// tensor errors.
    pub fn hidden(
        &self,
        seq: &PackedSeq,
        mut dropout: Option<&mut rand::rngs::StdRng>,
    ) -> Result<Tensor> {
        let p = &self.props;
        let t = seq.len();
        if t == 0 || seq.positions.len() != t || seq.segments.len() != t || seq.attend.len() != t {
            return Err(Error::SequenceShape {
                tokens: t,
                positions: seq.positions.len(),
                segments: seq.segments.len(),
                attend: seq.attend.len(),
            });
        }
        if let Some(&bad) = seq.tokens.iter().find(|&&id| id as usize >= p.vocab_size) {
            return Err(Error::TokenOutOfRange {
                id: bad,
                vocab_size: p.vocab_size,
            });
        }
        if let Some(&bad) = seq
            .positions
            .iter()
            .find(|&&x| x as usize >= p.context_length)
        {
            return Err(Error::PositionOutOfRange {
                position: bad,
                context_length: p.context_length,
            });
        }
        let dev = Device::Cpu;
        let (h, kv, d) = (p.head_count, p.head_count_kv, p.head_dim);
        let ids = Tensor::new(seq.tokens.as_slice(), &dev)?;
        let pos = Tensor::new(seq.positions.as_slice(), &dev)?;
        let tables = |(cos, sin): (&Tensor, &Tensor), pos: &Tensor| -> Result<(Tensor, Tensor)> {
            Ok((cos.index_select(pos, 0)?, sin.index_select(pos, 0)?))
        };
        let global = tables((&self.cos, &self.sin), &pos)?;
        let local = match &self.local_rope {
            Some((cos, sin)) => Some(tables((cos, sin), &pos)?),
            None => None,
        };
        // Block-diagonal causal mask narrowed by the attention labels; local layers also limit
        // the distance to the sliding window (query at position p sees keys p + 1 - w ..= p,
        // as the engine's `Mask::Sliding` and llama.cpp's standard SWA).
        let block_rows = match canonical_positions(seq) {
            Some(_) if p.sliding_window.is_some() => {
                // As the engine's `forward_blocks`: a block's KV computed apart would not
                // see the window it is placed in.
                return Err(ragtune_generate::Error::Unsupported {
                    what: "block attention (prompt format v2) on a model with sliding-window \
                           layers: train without --block-attention"
                        .into(),
                }
                .into());
            }
            Some(positions) => {
                let pos = Tensor::new(positions.as_slice(), &dev)?;
                let rows = seq
                    .attend
                    .iter()
                    .map(|a| matches!(a, Attend::Block(_)))
                    .collect();
                Some((tables((&self.cos, &self.sin), &pos)?, rows))
            }
            None => None,
        };
        let build_mask = |window: Option<usize>| -> Result<Arc<AttentionMask>> {
            let mut allowed = vec![false; t * t];
            for i in 0..t {
                let row = &mut allowed[i * t..(i + 1) * t];
                for j in (0..=i).rev() {
                    if seq.segments[j] != seq.segments[i] {
                        break;
                    }
                    let near =
                        window.is_none_or(|w| (seq.positions[i] - seq.positions[j]) < w as u32);
                    row[j] = near && (j == i || seq.attend[i].sees(seq.attend[j]));
                }
            }
            let rows = block_rows.as_ref().map(|(_, rows)| Vec::clone(rows));
            Ok(Arc::new(AttentionMask::new(t, allowed, rows)?))
        };
        let mask = build_mask(None)?;
        let window = p
            .sliding_window
            .filter(|_| self.blocks.iter().any(|b| b.local));
        let local_mask = match window {
            Some(w) => Some(build_mask(Some(w))?),
            None => None,
        };
        let scale = 1.0 / (d as f64).sqrt();
        let eps = f64::from(p.rms_norm_eps);
        let pairs = match p.rope.style {
            RopeStyle::Normal => RopePairs::Interleaved,
            RopeStyle::Neox => RopePairs::Neox,
        };
        let head_norm = |norm: &Option<Tensor>, y: Tensor, count: usize| -> Result<Tensor> {
            match norm {
                Some(w) => {
                    Ok(rms_norm(&y.reshape((t, count, d))?, w, eps)?.reshape((t, count * d))?)
                }
                None => Ok(y),
            }
        };

        let mut x = self.embeddings.index_select(&ids, 0)?;
        if let Some(s) = self.embed_scale {
            x = (x * s)?;
        }
        for (l, block) in self.blocks.iter().enumerate() {
            let n = rms_norm(&x, &block.attn_norm, eps)?;
            let heads = |y: Tensor, count: usize| -> Result<Tensor> {
                Ok(y.reshape((t, count, d))?.transpose(0, 1)?.contiguous()?)
            };
            let mut q = self.project(l, TargetModule::QProj, &n, &mut dropout)?;
            let mut k = self.project(l, TargetModule::KProj, &n, &mut dropout)?;
            let mut v = self.project(l, TargetModule::VProj, &n, &mut dropout)?;
            if let Some([bq, bk, bv]) = &block.qkv_bias {
                q = q.broadcast_add(bq)?;
                k = k.broadcast_add(bk)?;
                v = v.broadcast_add(bv)?;
            }
            let q = heads(head_norm(&block.q_norm, q, h)?, h)?;
            let k = heads(head_norm(&block.k_norm, k, kv)?, kv)?;
            let v = heads(v, kv)?;
            let ((cos, sin), mask) = match (&local, &local_mask, block.local) {
                (Some(tables), Some(m), true) => (tables, m),
                (Some(tables), None, true) => (tables, &mask),
                _ => (&global, &mask),
            };
            // Block rows score with q and k at canonical positions: the second half of the
            // width (see `attention`).
            let mut tables = vec![(cos, sin)];
            if let Some(((cos_c, sin_c), _)) = &block_rows {
                tables.push((cos_c, sin_c));
            }
            let (qa, ka) = (rope(&q, &tables, pairs)?, rope(&k, &tables, pairs)?);
            let attn = attention(&qa, &ka, &v, mask, scale)?; // (h, t, d)
            let attn = attn
                .reshape((h, t, d))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((t, h * d))?;
            let mut y = self.project(l, TargetModule::OProj, &attn, &mut dropout)?;
            if let Some(w) = &block.post_attn_norm {
                y = rms_norm(&y, w, eps)?;
            }
            x = (x + y)?;

            let n = rms_norm(&x, &block.ffn_norm, eps)?;
            let gate = self.project(l, TargetModule::GateProj, &n, &mut dropout)?;
            let up = self.project(l, TargetModule::UpProj, &n, &mut dropout)?;
            // SwiGLU, or GeGLU with the tanh approximation of GELU for Gemma: the formula
            // (candle's `gelu`), differentiable. The engine looks GELU up in llama.cpp's f16
            // table, within 2⁻¹⁰ relative of this.
            let act = match p.architecture.is_gemma() {
                true => Gate::GeluTanh,
                false => Gate::Silu,
            };
            let mut y = self.project(
                l,
                TargetModule::DownProj,
                &glu(&gate, &up, act)?,
                &mut dropout,
            )?;
            if let Some(w) = &block.post_ffn_norm {
                y = rms_norm(&y, w, eps)?;
            }
            x = (x + y)?;
        }
        rms_norm(&x, &self.norm, eps)
    }

    /// Logits of every position of a single example `tokens` (positions from 0): `(t, vocab)`.
    /// For tests and evaluation; training uses [`loss`](Self::loss).
    ///
    /// # Errors
    /// As [`hidden`](Self::hidden).
    pub fn logits(&self, tokens: &[u32]) -> Result<Tensor> {
        self.logits_packed(&PackedSeq {
            tokens: tokens.to_vec(),
            positions: (0..tokens.len() as u32).collect(),
            segments: vec![0; tokens.len()],
            attend: vec![Attend::Context; tokens.len()],
            targets: Vec::new(),
        })
    }

    /// Logits of every position of `seq`, with its segments and attention labels:
    /// `(t, vocab)`, without dropout. For tests and evaluation.
    ///
    /// # Errors
    /// As [`hidden`](Self::hidden).
    pub fn logits_packed(&self, seq: &PackedSeq) -> Result<Tensor> {
        frozen_linear(&self.hidden(seq, None)?, &self.output)
    }

    /// The summed cross-entropy (nats) of `seq`'s targets, a scalar f32 tensor that tracks
    /// the LoRA parameters, and the number of targets. The output projection runs only at
    /// the target positions (the vocabulary is a fifth of SmolLM2-135M's weights).
    ///
    /// # Errors
    /// As [`hidden`](Self::hidden); [`Error::NoLossTargets`] for a sequence without targets.
    pub fn loss(
        &self,
        seq: &PackedSeq,
        dropout: Option<&mut rand::rngs::StdRng>,
    ) -> Result<(Tensor, usize)> {
        if seq.targets.is_empty() {
            return Err(Error::NoLossTargets { tokens: seq.len() });
        }
        let hidden = self.hidden(seq, dropout)?;
        let dev = Device::Cpu;
        let rows: Vec<u32> = seq.targets.iter().map(|&(i, _)| i).collect();
        let next: Vec<u32> = seq.targets.iter().map(|&(_, id)| id).collect();
        let rows = Tensor::new(rows.as_slice(), &dev)?;
        let next = Tensor::new(next.as_slice(), &dev)?.unsqueeze(1)?;
        let logits = frozen_linear(&hidden.index_select(&rows, 0)?, &self.output)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, 1)?;
        let nll = log_probs.gather(&next, 1)?.sum_all()?.neg()?;
        Ok((nll, seq.targets.len()))
    }

    /// Replaces the LoRA factors with `tensors` named as [`named_params`](Self::named_params)
    /// (a checkpoint).
    ///
    /// # Errors
    /// [`Error::CheckpointTensorMissing`] or [`Error::CheckpointTensorShape`] naming the
    /// tensor.
    pub fn set_params(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.named_params() {
            let t = tensors
                .get(&name)
                .ok_or_else(|| Error::CheckpointTensorMissing { name: name.clone() })?;
            if t.dims() != var.as_tensor().dims() {
                return Err(Error::CheckpointTensorShape {
                    name,
                    expected: var.as_tensor().dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_attend_at_their_canonical_positions() {
        use Attend::{All, Block, Context};
        // Two examples: head of 2, blocks of 3 and 2, a tail of 2; then one without blocks.
        let attend = [
            Context,
            Context,
            Block(1),
            Block(1),
            Block(1),
            Block(2),
            Block(2),
            All,
            All,
            Context,
            Context,
        ];
        let seq = PackedSeq {
            tokens: vec![0; 11],
            positions: vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1],
            segments: vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
            attend: attend.to_vec(),
            targets: Vec::new(),
        };
        assert_eq!(
            canonical_positions(&seq).expect("blocks"),
            [0, 1, 2, 3, 4, 2, 3, 7, 8, 0, 1]
        );
        let plain = PackedSeq {
            attend: vec![Context; 11],
            ..seq
        };
        assert_eq!(canonical_positions(&plain), None);
    }
}
