//! Grouped-query attention over an explicit, preallocated KV cache ([`KvCache`](crate::KvCache)).
//!
//! `softmax(q kᵀ / sqrt(d) + mask) v` (Vaswani et al., 2017), with `h` query heads sharing
//! `kvh` key/value heads in groups of `h / kvh` (Ainslie et al., 2023, GQA).
//!
//! Two paths, chosen by the mask:
//! - **causal** ([`Mask::Causal`], every prompt and every decode step): one query row at a
//!   time against the keys it may see (`pos + i + 1` of them, so the masked half of a prefill
//!   is never computed), fused: scores, softmax and the weighted sum of values in one pass
//!   over a row, with no `t × t` temporaries. A row's arithmetic is the same whatever `t` and
//!   whichever rows share its task, so a prompt prefilled in one call or in pieces, or
//!   decoded token by token, gets the same bits (with the crate's integer projections, a
//!   restored prefix continues exactly as the original). Tasks of 16 rows of one head on the
//!   rayon pool; the loops are compiled for the [`SimdLevel`] chosen at run time.
//! - **an additive mask** ([`Mask::Additive`], block attention): the filled prefix of the
//!   cache as candle tensors and two batched matmuls per KV head group.

use candle_core::{Device, Tensor};
use ragtune_util::cpu::SimdLevel;
use ragtune_util::math::fast_exp;
use ragtune_util::ptr::SyncPtr;

use crate::kv_cache::LayerKv;
use crate::quant::for_each_dynamic;
use crate::Result;

/// Query rows of one head per parallel task on the causal path.
const ROWS_PER_TASK: usize = 16;

/// Which keys each new query sees.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mask<'a> {
    /// Query `i` (at cache slot `pos + i`) sees keys `0..=pos + i`.
    Causal,
    /// Causal within a window of `w` keys: query `i` sees keys `pos + i + 1 - w..=pos + i`
    /// (Gemma 3's local layers; llama.cpp's `LLAMA_SWA_TYPE_STANDARD`).
    Sliding(usize),
    /// An additive mask `(t, pos + t)`: `0` where query `i` sees key `j`, `-inf` elsewhere.
    Additive(&'a Tensor),
}

/// Attention of `t` new tokens at cache slots `pos..pos + t` for one layer.
///
/// `q`: `(h, t, d)`, `k` and `v`: `(kvh, t, d)`, all f32 row-major after RoPE; `k`/`v` are
/// written into `layer` at `pos` first. Returns `(t, h * d)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    layer: &mut LayerKv,
    (kvh, d, capacity): (usize, usize, usize),
    h: usize,
    t: usize,
    pos: usize,
    mask: Mask<'_>,
) -> Result<Tensor> {
    write_kv(layer, (kvh, d, capacity), pos, t, k, v);
    match mask {
        Mask::Causal => {
            let y = causal(q, layer, (kvh, d, capacity), h, t, pos, None);
            Ok(Tensor::from_vec(y, (t, h * d), &Device::Cpu)?)
        }
        Mask::Sliding(w) => {
            let y = causal(q, layer, (kvh, d, capacity), h, t, pos, Some(w.max(1)));
            Ok(Tensor::from_vec(y, (t, h * d), &Device::Cpu)?)
        }
        Mask::Additive(m) => prefill(q, layer, (kvh, d, capacity), h, t, pos, m),
    }
}

/// One sequence's part of a batched decode step ([`decode_rows`]): its layer cache, with the
/// new token's keys and values already written at `pos`, and the cache's capacity.
pub(crate) struct DecodeView<'a> {
    pub(crate) layer: &'a LayerKv,
    pub(crate) capacity: usize,
    pub(crate) pos: usize,
}

/// The attention of a batched decode step: sequence `r`'s one query `(h, d)` (row `r` of
/// `queries`, `(n, h * d)`) against the first `pos + 1` positions of its own cache
/// (`views[r]`), all `n × h` (sequence, head) pairs as tasks of one parallel loop rather
/// than one loop per sequence. Each pair's arithmetic is that of [`attention`] for the
/// sequence alone (`t = 1`), so the result is the same bits. Returns `(n, h * d)`.
///
/// # Errors
/// [`Error::InvalidParams`](crate::Error::InvalidParams) for an additive mask (block
/// attention never decodes).
pub(crate) fn decode_rows(
    queries: &[f32],
    views: &[DecodeView<'_>],
    (kvh, d): (usize, usize),
    h: usize,
    mask: Mask<'_>,
) -> Result<Vec<f32>> {
    let window = match mask {
        Mask::Causal => None,
        Mask::Sliding(w) => Some(w.max(1)),
        Mask::Additive(_) => {
            return Err(crate::Error::InvalidParams {
                detail: "a batched decode step with an additive mask".to_string(),
            })
        }
    };
    let group = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let level = SimdLevel::active();
    let mut y = vec![0f32; views.len() * h * d];
    let out = SyncPtr::new(&mut y);
    for_each_dynamic(views.len() * h, |task| {
        let (r, hq) = (task / h, task % h);
        let (view, g) = (&views[r], hq / group);
        let keys_at = g * view.capacity * d..(g + 1) * view.capacity * d;
        let job = Rows {
            q: &queries[(r * h + hq) * d..(r * h + hq + 1) * d],
            keys: &view.layer.keys[keys_at.clone()],
            values: &view.layer.values[keys_at],
            d,
            pos: view.pos,
            scale,
            window,
        };
        let mut scores = Vec::with_capacity(view.pos + 1);
        // SAFETY: y[(r * h + hq) * d..][..d] is inside y (r < n, hq < h); only this task
        // writes it.
        let yr = unsafe { out.slice_mut((r * h + hq) * d, d) };
        job.row(level, 0, &mut scores, yr);
    });
    Ok(y)
}

/// Writes the keys and values of `t` tokens (`(kvh, t, d)` each, heads first) at positions
/// `pos..pos + t` of `layer`: [`attention`]'s write, and the batched decode step's with
/// `t = 1`.
pub(crate) fn write_kv(
    layer: &mut LayerKv,
    (kvh, d, capacity): (usize, usize, usize),
    pos: usize,
    t: usize,
    k: &[f32],
    v: &[f32],
) {
    for g in 0..kvh {
        let at = (g * capacity + pos) * d;
        layer.write(
            at,
            &k[g * t * d..(g + 1) * t * d],
            &v[g * t * d..(g + 1) * t * d],
        );
    }
}

/// The causal path (module docs), within `window` keys if given. Returns `(t, h * d)`.
#[allow(clippy::too_many_arguments)]
fn causal(
    q: &[f32],
    layer: &LayerKv,
    (kvh, d, capacity): (usize, usize, usize),
    h: usize,
    t: usize,
    pos: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let group = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let level = SimdLevel::active();
    let mut y = vec![0f32; t * h * d];
    let out = SyncPtr::new(&mut y);
    let tiles = t.div_ceil(ROWS_PER_TASK);
    for_each_dynamic(h * tiles, |task| {
        let (hq, tile) = (task / tiles, task % tiles);
        let g = hq / group;
        let rows = tile * ROWS_PER_TASK..((tile + 1) * ROWS_PER_TASK).min(t);
        let job = Rows {
            q: &q[hq * t * d..(hq + 1) * t * d],
            keys: &layer.keys[g * capacity * d..(g + 1) * capacity * d],
            values: &layer.values[g * capacity * d..(g + 1) * capacity * d],
            d,
            pos,
            scale,
            window,
        };
        let mut scores = Vec::with_capacity(pos + rows.end);
        for i in rows {
            // SAFETY: y[(i * h + hq) * d..][..d] is inside y (i < t, hq < h); only the task
            // of (hq, i's tile) writes it.
            let yi = unsafe { out.slice_mut((i * h + hq) * d, d) };
            job.row(level, i, &mut scores, yi);
        }
    });
    y
}

/// One head's queries and its KV head's cache, for [`causal`].
struct Rows<'a> {
    /// `(t, d)`.
    q: &'a [f32],
    /// `(capacity, d)`.
    keys: &'a [f32],
    /// `(capacity, d)`.
    values: &'a [f32],
    d: usize,
    pos: usize,
    scale: f32,
    /// At most this many keys, the latest (sliding-window attention).
    window: Option<usize>,
}

impl Rows<'_> {
    /// Query row `i` into `y` (`d` values), with the kernels of `level` (the portable ones
    /// when `d` is not a multiple of the vector width).
    fn row(&self, level: SimdLevel, i: usize, scores: &mut Vec<f32>, y: &mut [f32]) {
        let end = self.pos + i + 1;
        let start = self.window.map_or(0, |w| end.saturating_sub(w));
        let visible = end - start;
        scores.clear();
        scores.resize(visible, 0.0);
        let qi = &self.q[i * self.d..(i + 1) * self.d];
        let (keys, values) = (
            &self.keys[start * self.d..end * self.d],
            &self.values[start * self.d..end * self.d],
        );
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is at most the detected one (SimdLevel::active); the slices
            // hold `visible` rows of d, d a multiple of 16.
            SimdLevel::Avx512 if self.d.is_multiple_of(16) => unsafe {
                simd::row_avx512(qi, keys, values, self.scale, scores, y)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, d a multiple of 8.
            SimdLevel::Avx2 | SimdLevel::Avx512 if self.d.is_multiple_of(8) => unsafe {
                simd::row_avx2(qi, keys, values, self.scale, scores, y)
            },
            _ => row_portable(qi, keys, values, self.scale, scores, y),
        }
    }
}

/// Scores of `qi` against every row of `keys` (scaled), softmax, and the weighted sum of
/// `values` into `y`: one query row of the causal path.
fn row_portable(
    qi: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    y: &mut [f32],
) {
    let d = qi.len();
    for (s, kj) in scores.iter_mut().zip(keys.chunks_exact(d)) {
        *s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
    }
    let inv = softmax_in_place(scores);
    y.fill(0.0);
    for (p, vj) in scores.iter().zip(values.chunks_exact(d)) {
        let w = p * inv;
        for (o, x) in y.iter_mut().zip(vj) {
            *o += w * x;
        }
    }
}

/// `s_j = exp(s_j - max s)`; returns `1 / Σ s_j`. The max and the sum run in 16 lanes and
/// `exp` is [`fast_exp`] (relative error about 2e-7), so the loops vectorise at the level
/// of the kernel this is inlined into.
#[inline(always)]
fn softmax_in_place(scores: &mut [f32]) -> f32 {
    const LANES: usize = 16;
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut chunks = scores.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in max.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&max)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sum = [0f32; LANES];
    let mut chunks = scores.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (acc, v) in sum.iter_mut().zip(c) {
            *v = fast_exp(*v - max);
            *acc += *v;
        }
    }
    let mut tail = 0.0;
    for v in chunks.into_remainder() {
        *v = fast_exp(*v - max);
        tail += *v;
    }
    1.0 / (sum.iter().sum::<f32>() + tail)
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::softmax_in_place;

    /// [`super::row_portable`] with 512-bit vectors: a dot product per key (one
    /// accumulator, reduced in a fixed order), and the output kept in registers 64 values
    /// at a time while the values stream past.
    ///
    /// # Safety
    /// AVX-512 F and FMA available; `qi.len() = d`, a multiple of 16; `keys` and `values`
    /// `scores.len()` rows of `d`; `y.len() = d`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn row_avx512(
        qi: &[f32],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        scores: &mut [f32],
        y: &mut [f32],
    ) {
        let d = qi.len();
        let n = scores.len();
        debug_assert!(d.is_multiple_of(16) && keys.len() == n * d && values.len() == n * d);
        let (q, k, v) = (qi.as_ptr(), keys.as_ptr(), values.as_ptr());
        // SAFETY: every offset below is < n * d (keys, values) or < d (q, y): the caller's
        // lengths.
        unsafe {
            for (j, s) in scores.iter_mut().enumerate() {
                let kj = k.add(j * d);
                let mut acc = _mm512_setzero_ps();
                let mut l = 0;
                while l < d {
                    acc =
                        _mm512_fmadd_ps(_mm512_loadu_ps(q.add(l)), _mm512_loadu_ps(kj.add(l)), acc);
                    l += 16;
                }
                *s = _mm512_reduce_add_ps(acc) * scale;
            }
            let inv = softmax_in_place(scores);
            let out = y.as_mut_ptr();
            let mut l0 = 0;
            while l0 < d {
                let lanes = (d - l0).min(64) / 16;
                let mut acc = [_mm512_setzero_ps(); 4];
                for (j, p) in scores.iter().enumerate() {
                    let w = _mm512_set1_ps(p * inv);
                    let vj = v.add(j * d + l0);
                    for (c, a) in acc.iter_mut().enumerate().take(lanes) {
                        *a = _mm512_fmadd_ps(w, _mm512_loadu_ps(vj.add(16 * c)), *a);
                    }
                }
                for (c, a) in acc.iter().enumerate().take(lanes) {
                    _mm512_storeu_ps(out.add(l0 + 16 * c), *a);
                }
                l0 += 64;
            }
        }
    }

    /// Horizontal sum of 8 lanes, in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// [`row_avx512`] with 256-bit vectors, 32 output values in registers at a time.
    ///
    /// # Safety
    /// AVX2 and FMA available; as [`row_avx512`] with `d` a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_avx2(
        qi: &[f32],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        scores: &mut [f32],
        y: &mut [f32],
    ) {
        let d = qi.len();
        let n = scores.len();
        debug_assert!(d.is_multiple_of(8) && keys.len() == n * d && values.len() == n * d);
        let (q, k, v) = (qi.as_ptr(), keys.as_ptr(), values.as_ptr());
        // SAFETY: every offset below is < n * d (keys, values) or < d (q, y): the caller's
        // lengths.
        unsafe {
            for (j, s) in scores.iter_mut().enumerate() {
                let kj = k.add(j * d);
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut l = 0;
                while l + 16 <= d {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(l)), _mm256_loadu_ps(kj.add(l)), a0);
                    a1 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(q.add(l + 8)),
                        _mm256_loadu_ps(kj.add(l + 8)),
                        a1,
                    );
                    l += 16;
                }
                if l < d {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(l)), _mm256_loadu_ps(kj.add(l)), a0);
                }
                *s = hsum(_mm256_add_ps(a0, a1)) * scale;
            }
            let inv = softmax_in_place(scores);
            let out = y.as_mut_ptr();
            let mut l0 = 0;
            while l0 < d {
                let lanes = (d - l0).min(32) / 8;
                let mut acc = [_mm256_setzero_ps(); 4];
                for (j, p) in scores.iter().enumerate() {
                    let w = _mm256_set1_ps(p * inv);
                    let vj = v.add(j * d + l0);
                    for (c, a) in acc.iter_mut().enumerate().take(lanes) {
                        *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj.add(8 * c)), *a);
                    }
                }
                for (c, a) in acc.iter().enumerate().take(lanes) {
                    _mm256_storeu_ps(out.add(l0 + 8 * c), *a);
                }
                l0 += 32;
            }
        }
    }
}

/// The additive-mask path on candle matmuls. Returns `(t, h * d)`.
fn prefill(
    q: &[f32],
    layer: &LayerKv,
    (kvh, d, capacity): (usize, usize, usize),
    h: usize,
    t: usize,
    pos: usize,
    mask: &Tensor,
) -> Result<Tensor> {
    let kv_len = pos + t;
    let prefix = |buf: &[f32]| -> Result<Tensor> {
        let mut out = Vec::with_capacity(kvh * kv_len * d);
        for g in 0..kvh {
            out.extend_from_slice(&buf[g * capacity * d..(g * capacity + kv_len) * d]);
        }
        Ok(Tensor::from_vec(out, (kvh, kv_len, d), &Device::Cpu)?)
    };
    let (k, v) = (prefix(&layer.keys)?, prefix(&layer.values)?);
    // Query heads g * group .. (g + 1) * group share KV head g: their rows go into one
    // matmul per KV head instead of repeating the keys.
    let group = h / kvh;
    let q = Tensor::from_slice(q, (kvh, group * t, d), &Device::Cpu)?;
    let scale = 1.0 / (d as f64).sqrt();
    let att = (q.matmul(&k.t()?)? * scale)?; // (kvh, group * t, kv_len)
    let att = att
        .reshape((kvh, group, t, kv_len))?
        .broadcast_add(mask)?
        .reshape((kvh, group * t, kv_len))?;
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    let y = att.matmul(&v)?; // (kvh, group * t, d)
    Ok(y.reshape((h, t, d))?.transpose(0, 1)?.reshape((t, h * d))?)
}
