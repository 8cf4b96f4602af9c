//! Pieces shared by every architecture in this crate, written once: rotary position
//! embedding, RMSNorm, the causal mask and the linear projection that carries a LoRA delta.
//!
//! Shapes use `t` for the tokens of one forward call, `h` for query heads, `d` for the head
//! dimension; all activations are `f32` on the CPU.

use candle_core::quantized::QTensor;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};

use crate::props::{RopeParams, RopeScaling, RopeStyle};
use crate::weight::Weight;
use crate::{Error, Result};

/// Rotary position embedding in either pairing ([`RopeStyle`]): llama's "normal" rotation
/// of adjacent pairs `(2i, 2i + 1)` (llama.cpp for `general.architecture = llama`; GGUF
/// converters permute the q/k weights of Hugging Face checkpoints so that this convention
/// holds, which is why candle's `quantized_llama` uses `rope_i`), or NeoX's rotation of
/// `(i, i + d/2)` (Qwen2, with the Hugging Face weight order).
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    style: RopeStyle,
    freqs: RopeFrequencies,
    /// Positions the tables cover (the context length).
    max_positions: usize,
    /// The rows of positions `c * ROPE_CHUNK ..`, computed when a position in them is first
    /// used: `ROPE_CHUNK * d / 2` cosines, then as many sines. A model with a long context
    /// (Gemma 3: 32,768 positions, two RoPE bases, `d = 256`) would otherwise hold 67 MB of
    /// tables for positions a prompt never reaches.
    chunks: Arc<[OnceLock<Box<[f32]>>]>,
}

/// Positions per lazily computed chunk of [`Rope`]'s tables.
const ROPE_CHUNK: usize = 256;

impl Rope {
    /// Tables for positions `0..max_positions` (the values of [`rope_tables`], computed on
    /// first use), `freq_factors` from the file's `rope_freqs.weight` (Llama 3.1+), if it has
    /// one.
    ///
    /// # Errors
    /// As [`rope_tables`].
    pub(crate) fn new(
        rope: &RopeParams,
        head_dim: usize,
        max_positions: usize,
        freq_factors: Option<&[f32]>,
        _device: &Device,
    ) -> Result<Self> {
        let freqs = RopeFrequencies::new(rope, head_dim, freq_factors)?;
        let n_chunks = max_positions.div_ceil(ROPE_CHUNK);
        Ok(Self {
            style: rope.style,
            freqs,
            max_positions,
            chunks: (0..n_chunks).map(|_| OnceLock::new()).collect(),
        })
    }

    /// Rotates one token in place: `x` is `(heads, d)` row-major, at `position`. The same
    /// bits as [`apply`](Self::apply) with `t = 1` (candle's `rope_i`/`rope` kernels compute
    /// each pair as `x0 c - x1 s`, `x0 s + x1 c`, as [`rotate_pairs`] does), without building
    /// tensors: the batched decode step rotates each row on its own slice.
    ///
    /// # Errors
    /// [`Error::InvalidParams`] when `position` is beyond the tables.
    pub(crate) fn rotate_token(&self, x: &mut [f32], position: usize) -> Result<()> {
        let (cos, sin) = self.row(position)?;
        for row in x.chunks_exact_mut(2 * cos.len()) {
            rotate_pairs(self.style, row, cos, sin);
        }
        Ok(())
    }

    /// The cosines and sines (`d / 2` each) of `position`.
    ///
    /// # Errors
    /// [`Error::InvalidParams`] beyond the tables.
    fn row(&self, position: usize) -> Result<(&[f32], &[f32])> {
        let chunk = (position < self.max_positions)
            .then(|| self.chunks.get(position / ROPE_CHUNK))
            .flatten();
        let Some(chunk) = chunk else {
            return Err(Error::InvalidParams {
                detail: format!(
                    "RoPE position {position} beyond the {} of the tables",
                    self.max_positions
                ),
            });
        };
        let half = self.freqs.inv_freq.len();
        let values = chunk.get_or_init(|| {
            let first = position / ROPE_CHUNK * ROPE_CHUNK;
            let (cos, sin) = self.freqs.table(first..first + ROPE_CHUNK);
            cos.into_iter().chain(sin).collect()
        });
        let at = position % ROPE_CHUNK * half;
        let sin_at = ROPE_CHUNK * half + at;
        Ok((&values[at..at + half], &values[sin_at..sin_at + half]))
    }

    /// `(cos, sin)`, each `(positions.len(), d / 2)`, for the positions given.
    fn tables(&self, positions: impl Iterator<Item = usize>) -> Result<(Tensor, Tensor)> {
        let half = self.freqs.inv_freq.len();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in positions {
            let (c, s) = self.row(p)?;
            cos.extend_from_slice(c);
            sin.extend_from_slice(s);
        }
        let t = cos.len() / half.max(1);
        Ok((
            Tensor::from_vec(cos, (t, half), &Device::Cpu)?,
            Tensor::from_vec(sin, (t, half), &Device::Cpu)?,
        ))
    }

    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self.style {
            RopeStyle::Normal => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
            RopeStyle::Neox => candle_nn::rotary_emb::rope(x, cos, sin)?,
        })
    }

    /// Rotates `x: (1, heads, t, d)` (contiguous) whose first token is at position `pos`.
    pub(crate) fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables(pos..pos + x.dim(2)?)?;
        self.rotate(x, &cos, &sin)
    }

    /// Rotates `x: (1, heads, t, d)` (contiguous) whose token `i` is at position
    /// `positions[i]` (any order; block attention computes several chunks at the same
    /// positions in one call).
    pub(crate) fn apply_at(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let (cos, sin) = self.tables(positions.iter().copied())?;
        self.rotate(x, &cos, &sin)
    }

    /// A function that rotates the pairs of `(n, d)` keys (already rotated for
    /// their positions) by `delta` more positions: RoPE's rotations compose, `R(a) R(δ) =
    /// R(a + δ)`, so this moves keys computed at positions `p..` to `p + delta..`, exact up
    /// to f32 rounding of the angles (RoFormer, Su et al. 2021, section 3.4.2; the relocation
    /// of Block-Attention, Sun et al. 2024, arXiv 2409.15355).
    ///
    /// # Errors
    /// [`Error::InvalidParams`] when `|delta|` is beyond the tables.
    pub(crate) fn shift(&self, delta: isize) -> Result<impl Fn(&mut [f32])> {
        let Ok((cos, sin)) = self.row(delta.unsigned_abs()) else {
            return Err(Error::InvalidParams {
                detail: format!(
                    "a RoPE shift of {delta} positions beyond the {} of the tables",
                    self.max_positions
                ),
            });
        };
        let cos = cos.to_vec();
        let sign = if delta < 0 { -1.0 } else { 1.0 };
        let sin: Vec<f32> = sin.iter().map(|s| s * sign).collect();
        let identity = delta == 0;
        let style = self.style;
        Ok(move |keys: &mut [f32]| {
            if identity {
                return;
            }
            for row in keys.chunks_exact_mut(2 * cos.len()) {
                rotate_pairs(style, row, &cos, &sin);
            }
        })
    }
}

/// Rotates the pairs of one head row (`2 * cos.len()` values) by the angles whose cosines
/// and sines are `cos`, `sin`: pairs `(2i, 2i + 1)` for [`RopeStyle::Normal`], `(i, i + d/2)`
/// for NeoX.
fn rotate_pairs(style: RopeStyle, row: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = match style {
            RopeStyle::Normal => (2 * i, 2 * i + 1),
            RopeStyle::Neox => (i, i + half),
        };
        let (x0, x1) = (row[a], row[b]);
        row[a] = x0 * cos[i] - x1 * sin[i];
        row[b] = x0 * sin[i] + x1 * cos[i];
    }
}

/// The RoPE tables `(cos, sin)`, each `(max_positions, head_dim / 2)` f32: angle
/// `p · s · base^(-2i / head_dim) / f_i` for position `p`, frequency `i`, the linear scaling
/// factor's inverse `s` and the frequency factor `f_i` (RoFormer, Su et al. 2021; the GGUF
/// keys `{arch}.rope.freq_base` and `{arch}.rope.scaling.factor`; `f` is the
/// `rope_freqs.weight` tensor of Llama 3.1+ files, `(head_dim / 2,)`, which llama.cpp divides
/// `theta` by, else 1). The training crate builds its differentiable rope from the same
/// tables.
///
/// # Errors
/// [`Error::Unsupported`] for YaRN scaling, or a rotary dimension that is not the whole head
/// (partial rotary embeddings are not llama); [`Error::InvalidParams`] for frequency factors
/// of another length than `head_dim / 2` or not positive.
pub fn rope_tables(
    rope: &RopeParams,
    head_dim: usize,
    max_positions: usize,
    freq_factors: Option<&[f32]>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (cos, sin) = RopeFrequencies::new(rope, head_dim, freq_factors)?.table(0..max_positions);
    let half = head_dim / 2;
    Ok((
        Tensor::from_vec(cos, (max_positions, half), device)?,
        Tensor::from_vec(sin, (max_positions, half), device)?,
    ))
}

/// What RoPE's angle `p · s · base^(-2i / head_dim) / f_i` depends on besides the position
/// (see [`rope_tables`]), validated once.
#[derive(Debug, Clone)]
struct RopeFrequencies {
    /// `base^(-2i / head_dim) / f_i`, `head_dim / 2` values.
    inv_freq: Vec<f32>,
    /// `s`, the inverse of the linear scaling factor (1 without scaling).
    position_scale: f32,
}

impl RopeFrequencies {
    /// # Errors
    /// As [`rope_tables`].
    fn new(rope: &RopeParams, head_dim: usize, freq_factors: Option<&[f32]>) -> Result<Self> {
        if rope.dimension_count != head_dim {
            return Err(Error::Unsupported {
                what: format!(
                    "rotary dimension {} differs from the head dimension {head_dim}",
                    rope.dimension_count
                ),
            });
        }
        let position_scale = match rope.scaling {
            RopeScaling::None => 1.0f32,
            RopeScaling::Linear { factor } => 1.0 / factor,
            other => {
                return Err(Error::Unsupported {
                    what: format!("RoPE scaling {other:?}"),
                })
            }
        };
        let half = head_dim / 2;
        if let Some(f) = freq_factors {
            if f.len() != half || f.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(Error::InvalidParams {
                    detail: format!(
                        "rope_freqs.weight: {} factors for a head of {head_dim} (wants {half}, \
                         each positive)",
                        f.len()
                    ),
                });
            }
        }
        let inv_freq = (0..half)
            .map(|i| {
                let factor = freq_factors.map_or(1.0, |f| f[i]);
                1.0 / rope.freq_base.powf((2 * i) as f32 / head_dim as f32) / factor
            })
            .collect();
        Ok(Self {
            inv_freq,
            position_scale,
        })
    }

    /// The rows `(cos, sin)` of `positions`, row-major, `d / 2` values a row. Each value
    /// depends on its position and frequency alone, so a chunk computed later holds the same
    /// bits as one table built at once.
    fn table(&self, positions: std::ops::Range<usize>) -> (Vec<f32>, Vec<f32>) {
        let n = positions.len() * self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for p in positions {
            let p = p as f32 * self.position_scale;
            for f in &self.inv_freq {
                let (s, c) = (p * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        (cos, sin)
    }
}

/// The gate activation of a gated MLP: SiLU (SwiGLU; llama, Qwen2) or GELU with the tanh
/// approximation (GeGLU; Gemma), each in the arithmetic of llama.cpp's CPU backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GateActivation {
    Silu,
    GeluTanh,
}

impl GateActivation {
    /// The activation of one value.
    ///
    /// - `Silu`: `v / (1 + e^-v)`, candle's f32 `silu` (`candle_core::op`) bit for bit.
    /// - `GeluTanh`: [`gelu_tanh_ggml`].
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        match self {
            Self::Silu => v / (1.0 + (-v).exp()),
            Self::GeluTanh => gelu_tanh_ggml(v),
        }
    }
}

/// GELU with the tanh approximation as llama.cpp computes it on the CPU (`ggml_vec_gelu_f32`
/// and `ggml_vec_geglu_f32` under `GGML_GELU_FP16`, which ggml's `ggml-cpu/vec.h` defines):
/// 0 for `v ≤ -10`, `v` for `v ≥ 10`, otherwise [`gelu_tanh_f32`] of `v` rounded to f16,
/// looked up in a 65,536-entry table of f16 results ([`gelu_tanh_f16_table`]).
///
/// It is within about 2⁻¹⁰ relative of the formula and 6x faster than one `tanhf` (which
/// took 14% of Gemma 3 270M's prefill).
#[inline(always)]
fn gelu_tanh_ggml(v: f32) -> f32 {
    if v <= -10.0 {
        0.0
    } else if v >= 10.0 {
        v
    } else {
        gelu_tanh_f16_table()[usize::from(half::f16::from_f32(v).to_bits())].to_f32()
    }
}

/// GELU with the tanh approximation, `0.5·v·(1 + tanh(√(2/π)·v·(1 + 0.044715·v²)))`
/// (Hendrycks & Gimpel 2016, eq. 3; ggml's `ggml_gelu_f32`, candle's f32 `gelu`), in f32.
fn gelu_tanh_f32(v: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    0.5 * v * (1.0 + f32::tanh(SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v)))
}

/// `table[i] = f16(gelu_tanh_f32(f32(f16::from_bits(i))))` for every 16-bit pattern `i`
/// (128 KB, built on first use in about 1 ms): ggml's `ggml_table_gelu_f16`, which
/// `ggml_cpu_init` fills the same way.
fn gelu_tanh_f16_table() -> &'static [half::f16; 1 << 16] {
    static TABLE: OnceLock<Box<[half::f16; 1 << 16]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = Box::new([half::f16::ZERO; 1 << 16]);
        for (bits, entry) in table.iter_mut().enumerate() {
            let v = half::f16::from_bits(bits as u16).to_f32();
            *entry = half::f16::from_f32(gelu_tanh_f32(v));
        }
        table
    })
}

/// Elements per parallel task of [`glu`] and [`add`]; smaller inputs run on the calling
/// thread.
const ELEMENTWISE_CHUNK: usize = 16 * 1024;

/// `act(g) ⊙ u` for `g`, `u` of one shape (the gated MLP's input to its down projection).
///
/// It runs on this crate's rayon pool, in tasks of [`ELEMENTWISE_CHUNK`] values. candle's
/// own elementwise ops split tensors of 64 Ki values and more over a second thread pool
/// whose workers spin after each op, which takes a core from the next matmul's rayon tasks
/// on a 2-core machine (about 5-15% of prefill speed, measured with `CANDLE_NUM_THREADS=1`).
///
/// # Errors
/// [`Error::InvalidParams`] for shapes that differ; candle's errors.
pub(crate) fn glu(act: GateActivation, g: &Tensor, u: &Tensor) -> Result<Tensor> {
    zip_map(g, u, move |a, b| act.apply(a) * b)
}

/// `x + y` for `x`, `y` of one shape (the residual connections), as [`glu`] runs.
///
/// # Errors
/// As [`glu`].
pub(crate) fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    zip_map(x, y, |a, b| a + b)
}

/// `f(a_i, b_i)` for every element of two f32 tensors of one shape, read in place when they
/// are contiguous on the CPU.
fn zip_map(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Tensor> {
    use rayon::prelude::*;
    if a.dims() != b.dims() {
        return Err(Error::InvalidParams {
            detail: format!("elementwise op on shapes {:?} and {:?}", a.dims(), b.dims()),
        });
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Some(xa), Some(xb)) = (cpu_f32(&sa, la), cpu_f32(&sb, lb)) else {
        return Err(Error::InvalidParams {
            detail: "elementwise op on a tensor that is not f32 on the CPU".into(),
        });
    };
    let mut out = vec![0f32; xa.len()];
    let run = |(o, (x, y)): (&mut [f32], (&[f32], &[f32]))| {
        for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
            *o = f(x, y);
        }
    };
    if out.len() > ELEMENTWISE_CHUNK {
        out.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(
                xa.par_chunks(ELEMENTWISE_CHUNK)
                    .zip(xb.par_chunks(ELEMENTWISE_CHUNK)),
            )
            .for_each(run);
    } else {
        run((&mut out, (xa, xb)));
    }
    Ok(Tensor::from_vec(out, a.dims(), a.device())?)
}

/// The values of a contiguous f32 CPU tensor's storage, in place.
fn cpu_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Option<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            let (start, end) = layout.contiguous_offsets()?;
            v.get(start..end)
        }
        _ => None,
    }
}

/// Root-mean-square normalisation with a learned scale: `x / sqrt(mean(x²) + eps) * w`.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    /// `(hidden,)` f32.
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn from_qtensor(w: QTensor, eps: f32) -> Result<Self> {
        let weight = w.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        Ok(Self { weight, eps })
    }

    /// `x: (.., hidden)` -> same shape.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// The LoRA factors of one projection, ready for the forward pass:
/// `delta(x) = scale * B (A x)`, i.e. for row vectors `x: (t, in)`,
/// `scale * (x Aᵀ) Bᵀ: (t, out)`.
///
/// `B`'s rows are in the projection's GGUF order (for `attn_q` / `attn_k`, permuted from
/// the Hugging Face order; see the [`lora`](crate::lora) module docs).
#[derive(Debug, Clone)]
pub(crate) struct LoraPair {
    /// `A`: `(r, in)` f32, contiguous.
    pub(crate) a: Tensor,
    /// `B`: `(out, r)` f32, contiguous, GGUF row order.
    pub(crate) b: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)` for rsLoRA).
    pub(crate) scale: f64,
    /// `A`'s rows, `r` times `in` values, for the small-batch loops.
    a_rows: Arc<[f32]>,
    /// `scale * Bᵀ`'s rows, `r` times `out` values: the scale costs nothing per call.
    bt_scaled: Arc<[f32]>,
}

impl LoraPair {
    /// `a: (r, in)`, `b: (out, r)` f32 (any layout), `b` already in GGUF row order.
    pub(crate) fn new(a: Tensor, b: Tensor, scale: f64) -> Result<Self> {
        let a = a.to_dtype(DType::F32)?.contiguous()?;
        let b = b.to_dtype(DType::F32)?.contiguous()?;
        let a_rows = a.flatten_all()?.to_vec1::<f32>()?.into();
        let bt_scaled = (b.t()? * scale)?.flatten_all()?.to_vec1::<f32>()?.into();
        Ok(Self {
            a,
            b,
            scale,
            a_rows,
            bt_scaled,
        })
    }

    /// `scale * B A`: `(out, in)` f32, the dense update a merge adds to the weight.
    pub(crate) fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }
}

/// A linear projection over a weight `(out, in)` ([`Weight`]), with an optional bias
/// `(out,)` (Qwen2's q/k/v); a LoRA delta is passed per call, so one loaded model serves any
/// adapter. Every path computes a row as `(W x + bias) + delta(x)`, in that order.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) weight: Weight,
    bias: Option<Arc<[f32]>>,
}

impl Linear {
    pub(crate) fn new(weight: Weight) -> Self {
        Self { weight, bias: None }
    }

    /// The projection with a bias of `out` values.
    ///
    /// # Errors
    /// [`Error::TensorShape`] when the bias does not have `out` values.
    pub(crate) fn with_bias(weight: Weight, bias: Vec<f32>, name: &str) -> Result<Self> {
        let out = weight.dims()?.0;
        if bias.len() != out {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: vec![out],
                got: vec![bias.len()],
            });
        }
        Ok(Self {
            weight,
            bias: Some(bias.into()),
        })
    }

    /// Adds the bias, if any, to each row of `out` (`rows * out` values).
    fn add_bias(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(b.len()) {
                for (o, v) in row.iter_mut().zip(b.iter()) {
                    *o += v;
                }
            }
        }
    }

    /// `x: (.., in)` f32 -> `(.., out)` f32: `W x (+ bias)`, plus `scale * B (A x)` when
    /// `delta` is given (`r * (in + out)` multiply-adds per token against `in * out` for the
    /// base).
    pub(crate) fn forward(&self, x: &Tensor, delta: Option<&LoraPair>) -> Result<Tensor> {
        let inp = *x.dims().last().unwrap_or(&0);
        let rows = x.elem_count() / inp.max(1);
        let own_kernels = matches!(self.weight, Weight::Blocks(_));
        if delta.is_none() && self.bias.is_none() {
            return self.weight.forward(x);
        }
        if let Some(d) = delta {
            if rows > SMALL_BATCH && !own_kernels {
                let y = self.plus_bias(self.weight.forward(x)?)?;
                let low = x.broadcast_matmul(&d.a.t()?)?.broadcast_matmul(&d.b.t()?)?;
                return Ok((y + (low * d.scale)?)?);
            }
        }
        // The low-rank product in plain loops, row by row: over the crate's own kernels for
        // every row count, so a row's result does not depend on the others (a restored
        // prefix continues exactly, with an adapter too); for other weights in decode and
        // other small batches, where two tiny gemm calls, a scale and an add cost more in
        // dispatch than their arithmetic.
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        // The base product straight into a Vec when this crate computes it (no tensor round
        // trip), else through the tensor.
        let mut out = match self.weight.forward_rows(&xs, rows) {
            Some(v) => v,
            None => self.weight.forward(x)?.flatten_all()?.to_vec1::<f32>()?,
        };
        self.add_bias(&mut out);
        let n_out = out.len() / rows.max(1);
        if let Some(d) = delta {
            for (xr, yr) in xs.chunks_exact(inp).zip(out.chunks_exact_mut(n_out)) {
                add_lora_row(d, xr, yr);
            }
        }
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n_out;
        }
        Ok(Tensor::from_vec(out, shape, x.device())?)
    }

    /// `y + bias` (broadcast over the rows), or `y` without a bias.
    fn plus_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(&Tensor::from_slice(b, b.len(), y.device())?)?),
            None => Ok(y),
        }
    }

    /// `xs: (rows, in)` row-major through the projection, each row with its own LoRA delta
    /// (`deltas[i]` for row `i`): `(rows, out)` values, each row bit for bit what
    /// [`forward`](Self::forward) gives for that row alone. The batched decode step
    /// ([`crate::LlamaModel::decode_batch`]): the crate's own kernels multiply all rows in one
    /// pass over the weights (each weight block is unpacked once for 4 activation rows, and
    /// a row's result does not depend on the others); other weight forms go row by row.
    pub(crate) fn forward_rows_each(
        &self,
        xs: &[f32],
        rows: usize,
        deltas: &[Option<&LoraPair>],
    ) -> Result<Vec<f32>> {
        debug_assert_eq!(deltas.len(), rows);
        let inp = xs.len() / rows.max(1);
        let mut out = match self.weight.forward_rows(xs, rows) {
            Some(y) => y,
            None => {
                let mut out = Vec::new();
                for row in xs.chunks_exact(inp) {
                    let x = Tensor::from_slice(row, (1, inp), &candle_core::Device::Cpu)?;
                    out.extend(self.weight.forward(&x)?.flatten_all()?.to_vec1::<f32>()?);
                }
                out
            }
        };
        self.add_bias(&mut out);
        let n_out = out.len() / rows.max(1);
        for ((xr, yr), d) in xs
            .chunks_exact(inp)
            .zip(out.chunks_exact_mut(n_out))
            .zip(deltas)
        {
            if let Some(d) = d {
                add_lora_row(d, xr, yr);
            }
        }
        Ok(out)
    }
}

/// `y += scale * B (A x)` for one row, in the order both projection paths use.
fn add_lora_row(d: &LoraPair, xr: &[f32], yr: &mut [f32]) {
    let n_out = yr.len();
    for (aj, btj) in d
        .a_rows
        .chunks_exact(xr.len())
        .zip(d.bt_scaled.chunks_exact(n_out))
    {
        let u = dot(aj, xr);
        for (o, b) in yr.iter_mut().zip(btj) {
            *o += u * b;
        }
    }
}

/// `Σ a_i b_i` in eight independent lanes, so the compiler can vectorize it (a plain
/// `sum()` of f32 is one serial chain of adds).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Up to this many rows (tokens), [`Linear::forward`] adds a LoRA delta with plain loops
/// rather than gemm calls.
const SMALL_BATCH: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_interleaved_pairs() {
        let params = RopeParams {
            style: RopeStyle::Normal,
            freq_base: 10_000.0,
            dimension_count: 4,
            scaling: RopeScaling::None,
        };
        let rope = Rope::new(&params, 4, 8, None, &Device::Cpu).expect("test");
        // One head, one token at position 3: pair (x0, x1) rotates by 3 rad, (x2, x3) by
        // 3 / 100 rad.
        let x = Tensor::new(&[[[[1f32, 0.0, 0.0, 1.0]]]], &Device::Cpu).expect("test");
        let y = rope
            .apply(&x, 3)
            .expect("test")
            .flatten_all()
            .expect("test")
            .to_vec1::<f32>()
            .expect("test");
        let (a, b) = (3f32, 0.03f32);
        let want = [a.cos(), a.sin(), -b.sin(), b.cos()];
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }

    /// The rows computed chunk by chunk on first use are the bits of the whole table built
    /// at once by [`rope_tables`] (the training crate's), on both sides of a chunk boundary
    /// and at the last position; a position past the context is an error even inside the
    /// last chunk.
    #[test]
    fn lazily_computed_rows_equal_the_whole_table() {
        let params = RopeParams {
            style: RopeStyle::Neox,
            freq_base: 1_000_000.0,
            dimension_count: 16,
            scaling: RopeScaling::Linear { factor: 2.0 },
        };
        let max = 3 * ROPE_CHUNK - 40;
        let factors: Vec<f32> = (0..8).map(|i| 1.0 + i as f32 * 0.5).collect();
        let rope = Rope::new(&params, 16, max, Some(&factors), &Device::Cpu).expect("rope");
        let (cos, sin) =
            rope_tables(&params, 16, max, Some(&factors), &Device::Cpu).expect("tables");
        let (cos, sin) = (
            cos.to_vec2::<f32>().expect("cos"),
            sin.to_vec2::<f32>().expect("sin"),
        );
        for p in [max - 1, ROPE_CHUNK, ROPE_CHUNK - 1, 0, 300] {
            let (c, s) = rope.row(p).expect("row");
            assert_eq!(c, cos[p].as_slice(), "cos at {p}");
            assert_eq!(s, sin[p].as_slice(), "sin at {p}");
        }
        assert!(rope.row(max).is_err());
        assert!(rope.row(3 * ROPE_CHUNK).is_err());
    }

    /// Shifting keys rotated at positions `p..` by `delta` gives the keys rotated at
    /// `p + delta..` (forward and back). Tolerance: both sides are f32 rotations of |x| <= 1
    /// by angles whose f32 products `p * f` differ by at most a few ulps of the largest
    /// angle (here 1,000 rad: ~6e-5), so 2e-4 bounds the difference.
    #[test]
    fn a_shift_moves_rotated_keys_to_the_new_positions() {
        let params = RopeParams {
            style: RopeStyle::Normal,
            freq_base: 10_000.0,
            dimension_count: 8,
            scaling: RopeScaling::None,
        };
        let rope = Rope::new(&params, 8, 1100, None, &Device::Cpu).expect("test");
        let x: Vec<f32> = (0..3 * 8)
            .map(|i| ((i * 37 % 17) as f32 / 8.5) - 1.0)
            .collect();
        let at = |pos: usize| -> Vec<f32> {
            let t = Tensor::from_slice(&x, (1, 1, 3, 8), &Device::Cpu).expect("test");
            rope.apply(&t, pos)
                .and_then(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
                .expect("test")
        };
        for (from, to) in [(5usize, 1000usize), (900, 7), (40, 40)] {
            let mut k = at(from);
            rope.shift(to as isize - from as isize).expect("shift")(&mut k);
            let want = at(to);
            for (g, w) in k.iter().zip(&want) {
                assert!((g - w).abs() < 2e-4, "{from}->{to}: {g} vs {w}");
            }
        }
        assert!(rope.shift(1100).is_err());
    }

    /// ggml's GELU of one f32 under `GGML_GELU_FP16`, evaluated per value without the table:
    /// 0 at or below -10, the input at or above 10, else the formula at the input rounded to
    /// f16, rounded to f16.
    fn ggml_gelu_per_value(v: f32) -> f32 {
        if v <= -10.0 {
            0.0
        } else if v >= 10.0 {
            v
        } else {
            let x = half::f16::from_f32(v).to_f32();
            half::f16::from_f32(gelu_tanh_f32(x)).to_f32()
        }
    }

    /// The table GELU is within f16 rounding of candle's f32 `gelu` (the formula), and exactly
    /// 0 / the input from ±10 on.
    #[test]
    fn table_gelu_is_the_formula_within_f16_rounding() {
        let dev = &Device::Cpu;
        let xs: Vec<f32> = (-2400..=2400).map(|i| i as f32 * 0.005).collect();
        let formula = Tensor::from_vec(xs.clone(), (xs.len(),), dev)
            .and_then(|t| t.gelu())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("candle gelu");
        for (&x, &want) in xs.iter().zip(&formula) {
            let got = gelu_tanh_ggml(x);
            // Rounding the input to f16 moves the result by up to |x|·gelu'(x)·2⁻¹¹
            // (gelu' ≤ 1.13), rounding the output by |gelu(x)|·2⁻¹¹.
            let bound = (1.2 * x.abs() + want.abs()) * 2f32.powi(-11) + 1e-7;
            assert!(
                (got - want).abs() <= bound,
                "gelu({x}) = {got}, formula {want}"
            );
        }
        for (x, want) in [(-10.0, 0.0), (-1e30, 0.0), (10.0, 10.0), (123.5, 123.5)] {
            assert_eq!(gelu_tanh_ggml(x), want);
        }
    }

    /// The gated product and the residual add equal candle's `silu`, `*` and `+` (GeGLU its
    /// per-value definition) bit for bit, below and above the size where they split into
    /// parallel tasks; shapes that differ are refused.
    #[test]
    fn elementwise_ops_equal_their_definitions_bit_for_bit() {
        let dev = &Device::Cpu;
        for n in [7usize, 3 * ELEMENTWISE_CHUNK + 5] {
            let g = Tensor::from_vec(
                (0..n)
                    .map(|i| (i as f32 * 0.013).sin() * 9.0)
                    .collect::<Vec<_>>(),
                (n,),
                dev,
            )
            .expect("g");
            let u = Tensor::from_vec(
                (0..n).map(|i| (i as f32 * 0.029).cos()).collect::<Vec<_>>(),
                (n,),
                dev,
            )
            .expect("u");
            let bits = |t: Tensor| -> Vec<u32> {
                t.to_vec1::<f32>()
                    .expect("values")
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            let silu = (g.silu().expect("silu") * &u).expect("mul");
            let geglu: Vec<u32> = g
                .to_vec1::<f32>()
                .expect("g")
                .iter()
                .zip(u.to_vec1::<f32>().expect("u"))
                .map(|(&g, u)| (ggml_gelu_per_value(g) * u).to_bits())
                .collect();
            let sum = (&g + &u).expect("add");
            assert_eq!(
                bits(glu(GateActivation::Silu, &g, &u).expect("glu")),
                bits(silu)
            );
            assert_eq!(
                bits(glu(GateActivation::GeluTanh, &g, &u).expect("glu")),
                geglu
            );
            assert_eq!(bits(add(&g, &u).expect("add")), bits(sum));
        }
        let short = Tensor::zeros((3,), DType::F32, dev).expect("short");
        let long = Tensor::zeros((4,), DType::F32, dev).expect("long");
        assert!(add(&short, &long).is_err());
    }

    /// One token rotated on its slice is bit for bit candle's `rope_i`/`rope` kernel
    /// ([`Rope::apply`] with `t = 1`), in both pairings; a position past the tables is an
    /// error.
    #[test]
    fn rotating_one_token_in_place_equals_the_tensor_path() {
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            let params = RopeParams {
                style,
                freq_base: 10_000.0,
                dimension_count: 16,
                scaling: RopeScaling::None,
            };
            let rope = Rope::new(&params, 16, 600, None, &Device::Cpu).expect("test");
            let x: Vec<f32> = (0..3 * 16).map(|i| (i as f32 * 0.71).sin()).collect();
            for pos in [0usize, 1, 17, 599] {
                let t = Tensor::from_slice(&x, (1, 3, 1, 16), &Device::Cpu).expect("test");
                let want = rope
                    .apply(&t, pos)
                    .and_then(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
                    .expect("test");
                let mut got = x.clone();
                rope.rotate_token(&mut got, pos).expect("rotate");
                let (g, w): (Vec<u32>, Vec<u32>) = (
                    got.iter().map(|v| v.to_bits()).collect(),
                    want.iter().map(|v| v.to_bits()).collect(),
                );
                assert_eq!(g, w, "{style:?} at {pos}");
                if pos > 0 {
                    assert_ne!(got, x, "{style:?} at {pos}: nothing rotated");
                }
            }
            assert!(rope.rotate_token(&mut x.clone(), 600).is_err());
        }
    }

    /// The LoRA delta, through the small-batch loops (3 rows) and the gemm path (12 rows),
    /// equals `x (W + scale B A)ᵀ` to f32 rounding.
    #[test]
    fn linear_with_a_lora_delta_is_the_merged_weight() {
        let dev = &Device::Cpu;
        let (out, inp, r, scale) = (20, 24, 3, 1.5);
        let vals =
            |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin()).collect() };
        let w = Tensor::from_vec(vals(out * inp, 0.37), (out, inp), dev).expect("w");
        let a = Tensor::from_vec(vals(r * inp, 0.91), (r, inp), dev).expect("a");
        let b = Tensor::from_vec(vals(out * r, 1.3), (out, r), dev).expect("b");
        let pair = LoraPair::new(a.clone(), b.clone(), scale).expect("pair");
        let merged = (&w + (b.matmul(&a).expect("ba") * scale).expect("scale")).expect("add");
        let linear = Linear::new(Weight::Dense(w));
        for rows in [1, 3, 12] {
            let x = Tensor::from_vec(vals(rows * inp, 0.53), (rows, inp), dev).expect("x");
            let got = linear.forward(&x, Some(&pair)).expect("forward");
            let want = x.matmul(&merged.t().expect("t")).expect("matmul");
            let diff = (got - want)
                .expect("sub")
                .abs()
                .and_then(|d| d.max_all())
                .and_then(|m| m.to_scalar::<f32>())
                .expect("max");
            assert!(diff < 1e-4, "{rows} rows: {diff}");
        }
    }

    /// NeoX pairs `(i, i + d/2)`: for one head at position 3 the pair `(x0, x2)` rotates by
    /// 3 rad and `(x1, x3)` by 3/100 rad; a shift by `delta` moves NeoX-rotated keys too.
    #[test]
    fn neox_rotates_the_two_halves() {
        let params = RopeParams {
            style: RopeStyle::Neox,
            freq_base: 10_000.0,
            dimension_count: 4,
            scaling: RopeScaling::None,
        };
        let rope = Rope::new(&params, 4, 16, None, &Device::Cpu).expect("test");
        let at = |pos: usize| -> Vec<f32> {
            let x = Tensor::new(&[[[[1f32, 0.0, 0.0, 1.0]]]], &Device::Cpu).expect("test");
            rope.apply(&x, pos)
                .and_then(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
                .expect("test")
        };
        let (a, b) = (3f32, 0.03f32);
        let want = [a.cos(), -b.sin(), a.sin(), b.cos()];
        for (g, w) in at(3).iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        let mut k = at(3);
        rope.shift(9).expect("shift")(&mut k);
        for (g, w) in k.iter().zip(at(12)) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    /// `rope_freqs` divides each frequency: a factor of 4 on the first pair makes position
    /// 8 rotate it as position 2 does without factors; a wrong length is refused.
    #[test]
    fn frequency_factors_divide_the_frequencies() {
        let params = RopeParams {
            style: RopeStyle::Normal,
            freq_base: 10_000.0,
            dimension_count: 4,
            scaling: RopeScaling::None,
        };
        let dev = &Device::Cpu;
        let (cos_f, _) = rope_tables(&params, 4, 16, Some(&[4.0, 1.0]), dev).expect("test");
        let (cos, _) = rope_tables(&params, 4, 16, None, dev).expect("test");
        let get = |t: &Tensor, p: usize, i: usize| -> f32 {
            t.get(p)
                .and_then(|r| r.get(i))
                .and_then(|v| v.to_scalar())
                .expect("test")
        };
        assert!((get(&cos_f, 8, 0) - get(&cos, 2, 0)).abs() < 1e-6);
        assert_eq!(get(&cos_f, 8, 1), get(&cos, 8, 1));
        assert!(rope_tables(&params, 4, 16, Some(&[1.0]), dev).is_err());
    }

    #[test]
    fn yarn_is_refused_by_name() {
        let params = RopeParams {
            style: RopeStyle::Normal,
            freq_base: 10_000.0,
            dimension_count: 4,
            scaling: RopeScaling::Yarn {
                factor: 4.0,
                original_context_length: None,
            },
        };
        let err = Rope::new(&params, 4, 8, None, &Device::Cpu).expect_err("test");
        assert!(err.to_string().contains("Yarn"), "{err}");
    }
}
