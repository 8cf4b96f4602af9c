//! The project's own BERT encoder forward pass on f32 slices, for throughput.
//!
//! Same math as Hugging Face `BertModel` (and candle-transformers' `bert`, kept as the
//! reference backend): embeddings (word + position + token type) → LayerNorm → N × [fused
//! QKV projection → scaled dot-product attention per head → output projection → residual +
//! LayerNorm → GELU (erf) MLP → residual + LayerNorm]. What differs is the layout:
//!
//! - **No padding.** The sequences of a batch are packed one after another into a
//!   `(total_tokens, hidden)` matrix. The projections and the MLP run as single GEMMs over all
//!   tokens; attention runs per (sequence, head) over that sequence's own length, so no mask is
//!   needed and no FLOP is spent on padding.
//! - **Fused QKV.** The three projections are one `(3 * hidden, hidden)` weight.
//! - **Few passes over memory.** Bias is folded into the GEMM (the destination is pre-filled
//!   with it), residual + LayerNorm is one loop, GELU and softmax use vectorisable `exp`/`erf`
//!   approximations accurate to ~2e-7 (relative) and 1.5e-7 (absolute).
//!
//! The projections run in one of three precisions ([`Precision`]):
//!
//! - **Bf16** (the default where the CPU has Intel AMX, [`Precision::Auto`]): each weight
//!   matrix is rounded to bfloat16 and packed into AMX tiles at load, each activation row
//!   rounded to bfloat16 before the product, which sums in f32 on the tile unit
//!   (`ragtune_quant::packed`, `tdpbf16ps`, about 4x the f32 AVX-512 rate per core).
//! - **Int8** (the default where the CPU has AVX-512 VNNI but no AMX): each weight matrix is quantized to Q8_0 at load (per 32 weights
//!   one f16 scale, ggml's `quantize_row_q8_0_ref`) and each activation row to q8 per block of
//!   32 before the product, which runs on the integer kernels of `ragtune-quant` (AVX-512
//!   VNNI, AVX2 or portable, chosen at run time): about 4x the f32 FMA rate per instruction.
//!   Attention, LayerNorm, GELU and the residuals stay f32.
//! - **F32**: f32 GEMMs from the `gemm` crate (the kernels candle itself uses on the CPU),
//!   sentence-transformers' values to within 2e-7.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ragtune_quant::packed::{PackedMatrix, PackedPrecision};
use ragtune_quant::{QMatrix, Q8_0};
use ragtune_util::cpu::SimdLevel;
use ragtune_util::math::fast_exp;
use ragtune_util::ptr::SyncPtr;
use rayon::prelude::*;

use crate::{Error, Result};

/// The precision of the encoder's projections (see the module doc). Written `auto`, `bf16`,
/// `int8` or `f32` in configuration files and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// [`Bf16`](Self::Bf16) where the CPU has Intel AMX, else [`Int8`](Self::Int8) where it
    /// has AVX-512 VNNI (`vpdpbusd`, 64 multiply-adds per instruction), else
    /// [`F32`](Self::F32): on AVX2 alone the integer kernels are no faster than the f32 GEMM
    /// at the encoder's widths (384, 1536).
    #[default]
    Auto,
    /// Weights and activations rounded to bfloat16, products summed in f32, on Intel AMX
    /// (`ragtune_quant::packed`); [`Int8`](Self::Int8)'s rules where AMX is missing (it
    /// resolves to int8 on AVX-512, f32 below). Cosine to sentence-transformers' embeddings
    /// at least 0.99995 (`tests/it/embed_golden.rs`; int8: 0.999); a row does not depend on
    /// its batch.
    Bf16,
    /// Q8_0 weights times q8 activations in integer arithmetic, on every CPU: cosine to the
    /// f32 embeddings at least 0.999 (`tests/it/embed_golden.rs`). Every SIMD level gives the
    /// same bits.
    Int8,
    /// f32 weights and GEMMs: sentence-transformers' embeddings to within 2e-7.
    F32,
}

impl Precision {
    /// [`Bf16`](Self::Bf16), [`Int8`](Self::Int8) or [`F32`](Self::F32): what
    /// [`Auto`](Self::Auto) (and `Bf16`) mean on this CPU at the kernel level `level`
    /// (normally [`SimdLevel::active`]; AMX counts only at `avx512`).
    pub fn resolve(self, level: SimdLevel) -> Precision {
        let amx = level >= SimdLevel::Avx512 && ragtune_quant::packed::amx_available();
        match self {
            Precision::Auto | Precision::Bf16 if amx => Precision::Bf16,
            Precision::Auto | Precision::Bf16 if level >= SimdLevel::Avx512 => Precision::Int8,
            Precision::Auto => Precision::F32,
            Precision::Bf16 => Precision::F32,
            other => other,
        }
    }

    /// The name configuration files use.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
            Precision::F32 => "f32",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [
            Precision::Auto,
            Precision::Bf16,
            Precision::Int8,
            Precision::F32,
        ]
        .into_iter()
        .find(|p| p.name() == s.trim())
        .ok_or_else(|| format!("unknown encoder precision `{s}` (known: auto, bf16, int8, f32)"))
    }
}

/// The weights of a [`Linear`], `(out, inp)` as stored by PyTorch.
enum Weights {
    /// Row-major f32.
    F32(Vec<f32>),
    /// Quantized to Q8_0 at load.
    Q8(QMatrix<Q8_0>),
    /// `Wᵀ (inp, out)` packed for the AMX bfloat16 kernel at load.
    Packed(PackedMatrix),
}

/// A dense layer `y = x W^T + b`.
struct Linear {
    w: Weights,
    b: Vec<f32>,
    out: usize,
    inp: usize,
}

impl Linear {
    /// The layer of `w: (out, inp)` and `b: (out)` in `precision`.
    fn new(
        w: Vec<f32>,
        b: Vec<f32>,
        out: usize,
        inp: usize,
        precision: Precision,
    ) -> std::result::Result<Linear, ragtune_quant::Error> {
        let w = match precision.resolve(SimdLevel::active()) {
            Precision::Int8 => Weights::Q8(QMatrix::quantize_q8_0(out, inp, &w)?),
            Precision::Bf16 => {
                match PackedMatrix::pack(inp, out, PackedPrecision::Bf16, |p, j| w[j * inp + p]) {
                    Some(m) => Weights::Packed(m),
                    None => Weights::F32(w),
                }
            }
            _ => Weights::F32(w),
        };
        Ok(Linear { w, b, out, inp })
    }
}

struct LayerNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    ffn_ln: LayerNorm,
}

/// BERT encoder weights and hyper-parameters (from `config.json`).
pub(crate) struct FastBert {
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    eps: f32,
    max_positions: usize,
    type_vocab: usize,
    vocab: usize,
}

/// Hyper-parameters the fast path needs.
pub(crate) struct FastBertConfig {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub eps: f32,
    pub precision: Precision,
}

impl FastBert {
    /// Loads the weights from a safetensors file with Hugging Face BERT names (optionally
    /// prefixed `bert.`; `LayerNorm.gamma/beta` accepted for `weight/bias`).
    pub(crate) fn load(weights: &Path, cfg: &FastBertConfig) -> Result<FastBert> {
        let tensors = candle_core::safetensors::load(weights, &Device::Cpu)?;
        let get = |name: &str| -> Result<(Vec<f32>, Vec<usize>)> {
            let alt = name.replace(".weight", ".gamma").replace(".bias", ".beta");
            let t = [
                name.to_string(),
                format!("bert.{name}"),
                alt.clone(),
                format!("bert.{alt}"),
            ]
            .iter()
            .find_map(|n| tensors.get(n))
            .ok_or_else(|| Error::Unsupported {
                path: weights.to_path_buf(),
                detail: format!("tensor {name} is missing"),
            })?;
            let dims = t.dims().to_vec();
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok((v, dims))
        };
        let h = cfg.hidden;
        // The (weight, bias) of a projection, shape-checked.
        let dense = |prefix: &str, out: usize, inp: usize| -> Result<(Vec<f32>, Vec<f32>)> {
            let (w, dims) = get(&format!("{prefix}.weight"))?;
            let (b, _) = get(&format!("{prefix}.bias"))?;
            if dims != [out, inp] || b.len() != out {
                return Err(Error::Unsupported {
                    path: weights.to_path_buf(),
                    detail: format!("{prefix}.weight has shape {dims:?}, expected [{out}, {inp}]"),
                });
            }
            Ok((w, b))
        };
        let make = |(w, b): (Vec<f32>, Vec<f32>), out: usize, inp: usize| -> Result<Linear> {
            Linear::new(w, b, out, inp, cfg.precision).map_err(|e| Error::Unsupported {
                path: weights.to_path_buf(),
                detail: e.to_string(),
            })
        };
        let linear = |prefix: &str, out: usize, inp: usize| -> Result<Linear> {
            make(dense(prefix, out, inp)?, out, inp)
        };
        let ln = |prefix: &str| -> Result<LayerNorm> {
            let (gamma, _) = get(&format!("{prefix}.weight"))?;
            let (beta, _) = get(&format!("{prefix}.bias"))?;
            if gamma.len() != h || beta.len() != h {
                return Err(Error::Unsupported {
                    path: weights.to_path_buf(),
                    detail: format!("{prefix} has {} values, expected {h}", gamma.len()),
                });
            }
            Ok(LayerNorm { gamma, beta })
        };
        let (word, wdims) = get("embeddings.word_embeddings.weight")?;
        let (position, pdims) = get("embeddings.position_embeddings.weight")?;
        let (token_type, tdims) = get("embeddings.token_type_embeddings.weight")?;
        if wdims.get(1) != Some(&h) || pdims.get(1) != Some(&h) || tdims.get(1) != Some(&h) {
            return Err(Error::Unsupported {
                path: weights.to_path_buf(),
                detail: format!(
                    "embedding widths {wdims:?}/{pdims:?}/{tdims:?} do not match hidden_size {h}"
                ),
            });
        }
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("encoder.layer.{i}");
            let (qw, qb) = dense(&format!("{p}.attention.self.query"), h, h)?;
            let (kw, kb) = dense(&format!("{p}.attention.self.key"), h, h)?;
            let (vw, vb) = dense(&format!("{p}.attention.self.value"), h, h)?;
            let qkv = make(([qw, kw, vw].concat(), [qb, kb, vb].concat()), 3 * h, h)?;
            let inter = get(&format!("{p}.intermediate.dense.bias"))?.0.len();
            layers.push(Layer {
                qkv,
                attn_out: linear(&format!("{p}.attention.output.dense"), h, h)?,
                attn_ln: ln(&format!("{p}.attention.output.LayerNorm"))?,
                ffn_in: linear(&format!("{p}.intermediate.dense"), inter, h)?,
                ffn_out: linear(&format!("{p}.output.dense"), h, inter)?,
                ffn_ln: ln(&format!("{p}.output.LayerNorm"))?,
            });
        }
        if h % cfg.heads != 0 {
            return Err(Error::Unsupported {
                path: weights.to_path_buf(),
                detail: format!(
                    "hidden_size {h} is not a multiple of num_attention_heads {}",
                    cfg.heads
                ),
            });
        }
        Ok(FastBert {
            vocab: wdims[0],
            max_positions: pdims[0],
            type_vocab: tdims[0],
            word,
            position,
            token_type,
            emb_ln: ln("embeddings.LayerNorm")?,
            layers,
            hidden: h,
            heads: cfg.heads,
            eps: cfg.eps,
        })
    }

    /// Runs the encoder over `seqs` (token ids and type ids per sequence, each at most
    /// `max_positions` long) and returns the last hidden states packed as
    /// `(sum of lengths, hidden)` row-major f32, sequence after sequence.
    pub(crate) fn forward(&self, seqs: &[(&[u32], &[u32])]) -> Result<Vec<f32>> {
        let h = self.hidden;
        let mut offsets = Vec::with_capacity(seqs.len() + 1);
        offsets.push(0usize);
        for (ids, types) in seqs {
            if ids.len() > self.max_positions || ids.len() != types.len() {
                return Err(Error::InvalidSequence {
                    tokens: ids.len(),
                    type_ids: types.len(),
                    max_positions: self.max_positions,
                });
            }
            offsets.push(offsets.last().copied().unwrap_or(0) + ids.len());
        }
        let total = offsets.last().copied().unwrap_or(0);
        // Embeddings.
        let mut x = vec![0f32; total * h];
        for (s, (ids, types)) in seqs.iter().enumerate() {
            for (p, (&id, &ty)) in ids.iter().zip(types.iter()).enumerate() {
                let (id, ty) = (id as usize, ty as usize);
                if id >= self.vocab || ty >= self.type_vocab {
                    return Err(Error::TokenOutOfRange {
                        id: id as u32,
                        type_id: ty as u32,
                        vocab_size: self.vocab,
                        type_vocab_size: self.type_vocab,
                    });
                }
                let row = &mut x[(offsets[s] + p) * h..(offsets[s] + p + 1) * h];
                let (w, pe, te) = (
                    &self.word[id * h..(id + 1) * h],
                    &self.position[p * h..(p + 1) * h],
                    &self.token_type[ty * h..(ty + 1) * h],
                );
                for i in 0..h {
                    row[i] = w[i] + pe[i] + te[i];
                }
            }
        }
        layer_norm_residual(&mut x, None, &self.emb_ln, h, self.eps);

        let inter = self.layers.first().map(|l| l.ffn_in.out).unwrap_or(h);
        let mut qkv = vec![0f32; total * 3 * h];
        let mut ctx = vec![0f32; total * h];
        let mut tmp = vec![0f32; total * h];
        let mut mid = vec![0f32; total * inter];
        for layer in &self.layers {
            linear(&x, total, &layer.qkv, &mut qkv, Bias::InGemm);
            self.attention(&qkv, &offsets, &mut ctx);
            // The biases of the other three projections are added in the pass that follows
            // each GEMM (GELU, residual + LayerNorm), saving a pass over memory.
            linear(&ctx, total, &layer.attn_out, &mut tmp, Bias::Caller);
            layer_norm_residual(
                &mut x,
                Some((&tmp, &layer.attn_out.b)),
                &layer.attn_ln,
                h,
                self.eps,
            );
            linear(&x, total, &layer.ffn_in, &mut mid, Bias::Caller);
            let b = &layer.ffn_in.b;
            mid[..total * inter]
                .par_chunks_mut(inter)
                .with_min_len(16)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v = gelu(*v + b)));
            linear(&mid, total, &layer.ffn_out, &mut tmp, Bias::Caller);
            layer_norm_residual(
                &mut x,
                Some((&tmp, &layer.ffn_out.b)),
                &layer.ffn_ln,
                h,
                self.eps,
            );
        }
        Ok(x)
    }

    /// Scaled dot-product attention of every (sequence, head) pair, in parallel.
    /// `qkv: (total, 3 * hidden)`, `ctx: (total, hidden)` written.
    fn attention(&self, qkv: &[f32], offsets: &[usize], ctx: &mut [f32]) {
        let h = self.hidden;
        let d = h / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        let jobs: Vec<(usize, usize)> = (0..offsets.len() - 1)
            .flat_map(|s| (0..self.heads).map(move |hd| (s, hd)))
            .collect();
        let ctx_ptr = SyncPtr::new(ctx);
        jobs.par_iter()
            .for_each_init(Vec::new, |scores: &mut Vec<f32>, &(s, hd)| {
                let (o, len) = (offsets[s], offsets[s + 1] - offsets[s]);
                scores.clear();
                scores.resize(len * len, 0.0);
                let q = qkv[o * 3 * h + hd * d..].as_ptr();
                let k = qkv[o * 3 * h + h + hd * d..].as_ptr();
                let v = qkv[o * 3 * h + 2 * h + hd * d..].as_ptr();
                let stride = (3 * h) as isize;
                // SAFETY: every pointer/stride pair addresses rows o..o+len of qkv (inside the
                // slice: (o + len - 1) * 3h + 2h + hd*d + d <= total * 3h), the score buffer has
                // len*len elements, and each job writes a disjoint (rows, head columns) block of ctx.
                unsafe {
                    // scores (len, len) = Q (len, d) · K^T (d, len) * scale
                    gemm::gemm(
                        len,
                        len,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        len as isize,
                        false,
                        q,
                        1,
                        stride,
                        k,
                        stride,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for row in scores.chunks_mut(len) {
                    softmax_in_place(row);
                }
                let ctx_block = ctx_ptr.get().wrapping_add(o * h + hd * d);
                // SAFETY: as above.
                unsafe {
                    // ctx (len, d) = P (len, len) · V (len, d)
                    gemm::gemm(
                        len,
                        d,
                        len,
                        ctx_block,
                        1,
                        h as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        len as isize,
                        v,
                        1,
                        stride,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
    }

    /// The hidden size.
    pub(crate) fn hidden(&self) -> usize {
        self.hidden
    }
}

/// Where the bias of a [`linear`] is added.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bias {
    /// `y` is pre-filled with the bias and the GEMM accumulates into it.
    InGemm,
    /// The GEMM overwrites `y` with `x W^T`; the caller adds the bias in its next pass.
    Caller,
}

/// `y (rows, out) = x (rows, inp) · W^T (+ b, see [`Bias`])`, multi-threaded.
fn linear(x: &[f32], rows: usize, l: &Linear, y: &mut [f32], bias: Bias) {
    debug_assert!(x.len() >= rows * l.inp && y.len() >= rows * l.out);
    let w = match &l.w {
        Weights::Q8(m) => {
            m.matmul_into(SimdLevel::active(), x, rows, y);
            if bias == Bias::InGemm {
                y[..rows * l.out]
                    .par_chunks_mut(l.out)
                    .with_min_len(64)
                    .for_each(|r| r.iter_mut().zip(&l.b).for_each(|(v, b)| *v += b));
            }
            return;
        }
        Weights::Packed(m) => {
            let product = m.matmul(&x[..rows * l.inp], rows);
            let add_bias = bias == Bias::InGemm;
            y[..rows * l.out]
                .par_chunks_mut(l.out)
                .zip(product.par_chunks(l.out))
                .with_min_len(64)
                .for_each(|(dst, src)| match add_bias {
                    true => dst
                        .iter_mut()
                        .zip(src.iter().zip(&l.b))
                        .for_each(|(v, (p, b))| *v = p + b),
                    false => dst.copy_from_slice(src),
                });
            return;
        }
        Weights::F32(w) => w,
    };
    if bias == Bias::InGemm {
        y[..rows * l.out]
            .par_chunks_mut(l.out)
            .with_min_len(64)
            .for_each(|r| r.copy_from_slice(&l.b));
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && rows >= 64 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: x is (rows, inp) row-major, W^T is read from W (out, inp) with row stride 1
    // and column stride inp, y is (rows, out) row-major; all within their slices.
    unsafe {
        gemm::gemm(
            rows,
            l.out,
            l.inp,
            y.as_mut_ptr(),
            1,
            l.out as isize,
            bias == Bias::InGemm,
            x.as_ptr(),
            1,
            l.inp as isize,
            w.as_ptr(),
            l.inp as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `x = LayerNorm(x + residual + bias)` row by row (rows of width `h`), in parallel;
/// `residual` is `(rows, bias)` of the projection whose bias was left to this pass.
fn layer_norm_residual(
    x: &mut [f32],
    residual: Option<(&[f32], &[f32])>,
    ln: &LayerNorm,
    h: usize,
    eps: f32,
) {
    let bias = residual.map(|r| r.1);
    let work = |(row, res): (&mut [f32], Option<&[f32]>)| {
        if let (Some(res), Some(bias)) = (res, bias) {
            for ((a, r), b) in row.iter_mut().zip(res).zip(bias) {
                *a += *r + *b;
            }
        }
        let mean = row.iter().sum::<f32>() / h as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(&ln.gamma).zip(&ln.beta) {
            *v = (*v - mean) * inv * g + b;
        }
    };
    match residual {
        Some((res, _)) => x
            .par_chunks_mut(h)
            .zip(res.par_chunks(h))
            .with_min_len(64)
            .for_each(|(r, s)| work((r, Some(s)))),
        None => x
            .par_chunks_mut(h)
            .with_min_len(64)
            .for_each(|r| work((r, None))),
    }
}

/// Row softmax in place (max-subtracted).
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|v| *v = fast_exp(*v - max));
    // Eight partial sums so the reduction vectorises.
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        lanes.iter_mut().zip(c).for_each(|(l, v)| *l += v);
    }
    let sum = lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// GELU with the exact erf form `0.5 x (1 + erf(x / sqrt 2))`, erf by Abramowitz & Stegun
/// 7.1.26 (absolute error <= 1.5e-7).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let erf_abs = 1.0 - poly * fast_exp(-a * a);
    let erf = erf_abs.copysign(z);
    0.5 * x * (1.0 + erf)
}

/// Tensors by name, for tests.
#[allow(dead_code)]
pub(crate) type Named = HashMap<String, Tensor>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_erf_definition() {
        // Reference erf values (Abramowitz & Stegun table 7.1): erf(0.5) = 0.5204998778,
        // erf(1) = 0.8427007929, erf(2) = 0.9953222650.
        for (z, erf) in [
            (0.5f64, 0.520_499_877_8f64),
            (1.0, 0.842_700_792_9),
            (2.0, 0.995_322_265_0),
        ] {
            for sign in [1.0, -1.0] {
                let x = sign * z * std::f64::consts::SQRT_2;
                let want = 0.5 * x * (1.0 + sign * erf);
                assert!((gelu(x as f32) as f64 - want).abs() < 1e-6, "gelu({x})");
            }
        }
        assert_eq!(gelu(0.0), 0.0);
    }
}
