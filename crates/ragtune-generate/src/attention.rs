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

/// Query heads (of one KV head) attended in one pass over the keys and values.
const HEADS_PER_PASS: usize = 4;

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
        let q = &queries[(r * h + hq) * d..(r * h + hq + 1) * d];
        job.rows(level, 0, &[q], &mut scores, &mut [yr]);
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
///
/// The query heads that share a KV head are attended up to [`HEADS_PER_PASS`] at a time, so
/// each key and value row is read once for all of them. Fewer when that would make fewer
/// than 4 tasks per thread, as in a decode step: there the time goes to the last, uneven
/// task (SmolLM2's 3 tasks of 3 heads on 2 threads decoded 15% slower than 9 of one).
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
    let threads = rayon::current_num_threads();
    let mut per_pass = HEADS_PER_PASS.min(group);
    while per_pass > 1 && kvh * tiles * group.div_ceil(per_pass) < 4 * threads {
        per_pass /= 2;
    }
    let sets = group.div_ceil(per_pass);
    for_each_dynamic(kvh * sets * tiles, |task| {
        let (g, set, tile) = (task / (sets * tiles), task / tiles % sets, task % tiles);
        let heads = g * group + set * per_pass..g * group + ((set + 1) * per_pass).min(group);
        let rows = tile * ROWS_PER_TASK..((tile + 1) * ROWS_PER_TASK).min(t);
        let job = Rows {
            keys: &layer.keys[g * capacity * d..(g + 1) * capacity * d],
            values: &layer.values[g * capacity * d..(g + 1) * capacity * d],
            d,
            pos,
            scale,
            window,
        };
        let mut scores = Vec::with_capacity(heads.len() * (pos + rows.end));
        for i in rows {
            let qs: Vec<&[f32]> = heads
                .clone()
                .map(|hq| &q[(hq * t + i) * d..(hq * t + i + 1) * d])
                .collect();
            // SAFETY: y[(i * h + hq) * d..][..d] is inside y (i < t, hq < h), the heads are
            // distinct, and only the task of (hq's set, i's tile) writes them.
            let mut ys: Vec<&mut [f32]> = heads
                .clone()
                .map(|hq| unsafe { out.slice_mut((i * h + hq) * d, d) })
                .collect();
            job.rows(level, i, &qs, &mut scores, &mut ys);
        }
    });
    y
}

/// One KV head's cache, for [`causal`] and [`decode_rows`].
struct Rows<'a> {
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
    /// Query row `i` of each head in `qs` (`d` values each, at most [`HEADS_PER_PASS`]) into
    /// the matching `ys`, with the kernels of `level` (the portable ones when `d` is not a
    /// multiple of the vector width). Each head's result is the same bits as alone.
    fn rows(
        &self,
        level: SimdLevel,
        i: usize,
        qs: &[&[f32]],
        scores: &mut Vec<f32>,
        ys: &mut [&mut [f32]],
    ) {
        assert!(qs.len() == ys.len() && (1..=HEADS_PER_PASS).contains(&qs.len()));
        assert!(qs.iter().all(|q| q.len() == self.d) && ys.iter().all(|y| y.len() == self.d));
        let end = self.pos + i + 1;
        let start = self.window.map_or(0, |w| end.saturating_sub(w));
        let visible = end - start;
        scores.clear();
        scores.resize(qs.len() * visible, 0.0);
        let (keys, values) = (
            &self.keys[start * self.d..end * self.d],
            &self.values[start * self.d..end * self.d],
        );
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is at most the detected one (SimdLevel::active); the slices
            // hold `visible` rows of d, d a multiple of 16; qs and ys hold d values each
            // (asserted above).
            SimdLevel::Avx512 if self.d.is_multiple_of(16) => unsafe {
                simd::rows_avx512(qs, keys, values, self.scale, scores, ys)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, d a multiple of 8.
            SimdLevel::Avx2 | SimdLevel::Avx512 if self.d.is_multiple_of(8) => unsafe {
                simd::rows_avx2(qs, keys, values, self.scale, scores, ys)
            },
            _ => {
                for ((qi, y), sc) in qs.iter().zip(ys.iter_mut()).zip(scores.chunks_mut(visible)) {
                    row_portable(qi, keys, values, self.scale, sc, y);
                }
            }
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

    use super::{softmax_in_place, HEADS_PER_PASS};

    /// Pointers to the `R` query rows and output rows of `qs` and `ys`.
    fn pointers<const R: usize>(
        qs: &[&[f32]],
        ys: &mut [&mut [f32]],
    ) -> [(*const f32, *mut f32); R] {
        std::array::from_fn(|r| (qs[r].as_ptr(), ys[r].as_mut_ptr()))
    }

    /// [`super::row_portable`] for up to [`HEADS_PER_PASS`] query rows that share their keys
    /// and values, with 512-bit vectors: per key one dot product per row (one accumulator,
    /// reduced in a fixed order), the key read once for all rows; then each row's softmax;
    /// then the outputs kept in registers 64 values at a time while each value row streams
    /// past once. Each row's operations are those it would have alone.
    ///
    /// # Safety
    /// AVX-512 F and FMA available; every `qs[r]` and `ys[r]` holds `d` values, `d` a multiple
    /// of 16; `keys` and `values` hold `n` rows of `d` and `scores` `qs.len() * n` values.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn rows_avx512(
        qs: &[&[f32]],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        scores: &mut [f32],
        ys: &mut [&mut [f32]],
    ) {
        // SAFETY: forwarded.
        unsafe {
            match qs.len() {
                1 => rows_avx512_n::<1>(pointers(qs, ys), keys, values, scale, scores),
                2 => rows_avx512_n::<2>(pointers(qs, ys), keys, values, scale, scores),
                3 => rows_avx512_n::<3>(pointers(qs, ys), keys, values, scale, scores),
                _ => rows_avx512_n::<HEADS_PER_PASS>(pointers(qs, ys), keys, values, scale, scores),
            }
        }
    }

    /// [`rows_avx512`] for `R` rows.
    ///
    /// # Safety
    /// As [`rows_avx512`]; `d = keys.len() / n` with `n = scores.len() / R`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn rows_avx512_n<const R: usize>(
        rows: [(*const f32, *mut f32); R],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        scores: &mut [f32],
    ) {
        let n = scores.len() / R;
        if n == 0 {
            return;
        }
        let d = keys.len() / n;
        debug_assert!(d.is_multiple_of(16) && keys.len() == n * d && values.len() == n * d);
        let (k, v) = (keys.as_ptr(), values.as_ptr());
        // SAFETY: every offset below is < n * d (keys, values) or < d (queries, outputs): the
        // caller's lengths.
        unsafe {
            for j in 0..n {
                let kj = k.add(j * d);
                let mut acc = [_mm512_setzero_ps(); R];
                let mut l = 0;
                while l < d {
                    let kl = _mm512_loadu_ps(kj.add(l));
                    for (a, &(q, _)) in acc.iter_mut().zip(&rows) {
                        *a = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(l)), kl, *a);
                    }
                    l += 16;
                }
                for (r, a) in acc.iter().enumerate() {
                    *scores.get_unchecked_mut(r * n + j) = _mm512_reduce_add_ps(*a) * scale;
                }
            }
            let inv: [f32; R] =
                std::array::from_fn(|r| softmax_in_place(&mut scores[r * n..(r + 1) * n]));
            let mut l0 = 0;
            while l0 < d {
                match (d - l0) / 16 {
                    1 => values_avx512::<R, 1>(&rows, v, d, l0, scores, &inv),
                    2 => values_avx512::<R, 2>(&rows, v, d, l0, scores, &inv),
                    3 => values_avx512::<R, 3>(&rows, v, d, l0, scores, &inv),
                    _ => values_avx512::<R, 4>(&rows, v, d, l0, scores, &inv),
                }
                l0 += 64;
            }
        }
    }

    /// Output values `l0..l0 + 16 L` of each of the `R` rows: `Σ_j p_rj / Σ p_r · v_j`, in
    /// `R × L` registers while the value rows stream past (constant `R` and `L`, so the
    /// compiler keeps them in registers).
    ///
    /// # Safety
    /// AVX-512 F and FMA available; `v` holds `n = scores.len() / R` rows of `d`,
    /// `l0 + 16 L <= d`, and each output row holds `d` values.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn values_avx512<const R: usize, const L: usize>(
        rows: &[(*const f32, *mut f32); R],
        v: *const f32,
        d: usize,
        l0: usize,
        scores: &[f32],
        inv: &[f32; R],
    ) {
        let n = scores.len() / R;
        let mut acc = [[_mm512_setzero_ps(); L]; R];
        // SAFETY: offsets < n * d (values) and < d (outputs): the caller's lengths.
        unsafe {
            for j in 0..n {
                let vj = v.add(j * d + l0);
                let vl: [__m512; L] = std::array::from_fn(|c| _mm512_loadu_ps(vj.add(16 * c)));
                for (r, row) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*scores.get_unchecked(r * n + j) * inv[r]);
                    for (a, x) in row.iter_mut().zip(&vl) {
                        *a = _mm512_fmadd_ps(w, *x, *a);
                    }
                }
            }
            for (row, &(_, y)) in acc.iter().zip(rows) {
                for (c, a) in row.iter().enumerate() {
                    _mm512_storeu_ps(y.add(l0 + 16 * c), *a);
                }
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

    /// [`rows_avx512`] with 256-bit vectors: two accumulators per dot product (alternate
    /// 8-value chunks, then [`hsum`] of their sum), and 16 output values per row in
    /// registers at a time.
    ///
    /// # Safety
    /// AVX2 and FMA available; as [`rows_avx512`] with `d` a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2(
        qs: &[&[f32]],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        scores: &mut [f32],
        ys: &mut [&mut [f32]],
    ) {
        // SAFETY: forwarded.
        unsafe {
            match qs.len() {
                1 => rows_avx2_n::<1>(pointers(qs, ys), keys, values, scale, scores),
                2 => rows_avx2_n::<2>(pointers(qs, ys), keys, values, scale, scores),
                3 => rows_avx2_n::<3>(pointers(qs, ys), keys, values, scale, scores),
                _ => rows_avx2_n::<HEADS_PER_PASS>(pointers(qs, ys), keys, values, scale, scores),
            }
        }
    }

    /// [`rows_avx2`] for `R` rows.
    ///
    /// # Safety
    /// As [`rows_avx2`]; `d = keys.len() / n` with `n = scores.len() / R`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_avx2_n<const R: usize>(
        rows: [(*const f32, *mut f32); R],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        scores: &mut [f32],
    ) {
        let n = scores.len() / R;
        if n == 0 {
            return;
        }
        let d = keys.len() / n;
        debug_assert!(d.is_multiple_of(8) && keys.len() == n * d && values.len() == n * d);
        let (k, v) = (keys.as_ptr(), values.as_ptr());
        // SAFETY: every offset below is < n * d (keys, values) or < d (queries, outputs): the
        // caller's lengths.
        unsafe {
            for j in 0..n {
                let kj = k.add(j * d);
                let mut a0 = [_mm256_setzero_ps(); R];
                let mut a1 = [_mm256_setzero_ps(); R];
                let mut l = 0;
                while l + 16 <= d {
                    let (k0, k1) = (_mm256_loadu_ps(kj.add(l)), _mm256_loadu_ps(kj.add(l + 8)));
                    for (r, &(q, _)) in rows.iter().enumerate() {
                        a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(l)), k0, a0[r]);
                        a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(l + 8)), k1, a1[r]);
                    }
                    l += 16;
                }
                if l < d {
                    let k0 = _mm256_loadu_ps(kj.add(l));
                    for (r, &(q, _)) in rows.iter().enumerate() {
                        a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(l)), k0, a0[r]);
                    }
                }
                for r in 0..R {
                    *scores.get_unchecked_mut(r * n + j) =
                        hsum(_mm256_add_ps(a0[r], a1[r])) * scale;
                }
            }
            let inv: [f32; R] =
                std::array::from_fn(|r| softmax_in_place(&mut scores[r * n..(r + 1) * n]));
            // Up to 32 output values per row for one or two rows, 16 for more (16 registers).
            let step = if R <= 2 { 32 } else { 16 };
            let mut l0 = 0;
            while l0 < d {
                match ((d - l0) / 8).min(step / 8) {
                    1 => values_avx2::<R, 1>(&rows, v, d, l0, scores, &inv),
                    2 => values_avx2::<R, 2>(&rows, v, d, l0, scores, &inv),
                    3 => values_avx2::<R, 3>(&rows, v, d, l0, scores, &inv),
                    _ => values_avx2::<R, 4>(&rows, v, d, l0, scores, &inv),
                }
                l0 += step;
            }
        }
    }

    /// [`values_avx512`] with 256-bit vectors: output values `l0..l0 + 8 L`.
    ///
    /// # Safety
    /// AVX2 and FMA available; as [`values_avx512`] with `l0 + 8 L <= d`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn values_avx2<const R: usize, const L: usize>(
        rows: &[(*const f32, *mut f32); R],
        v: *const f32,
        d: usize,
        l0: usize,
        scores: &[f32],
        inv: &[f32; R],
    ) {
        let n = scores.len() / R;
        let mut acc = [[_mm256_setzero_ps(); L]; R];
        // SAFETY: offsets < n * d (values) and < d (outputs): the caller's lengths.
        unsafe {
            for j in 0..n {
                let vj = v.add(j * d + l0);
                let vl: [__m256; L] = std::array::from_fn(|c| _mm256_loadu_ps(vj.add(8 * c)));
                for (r, row) in acc.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(*scores.get_unchecked(r * n + j) * inv[r]);
                    for (a, x) in row.iter_mut().zip(&vl) {
                        *a = _mm256_fmadd_ps(w, *x, *a);
                    }
                }
            }
            for (row, &(_, y)) in acc.iter().zip(rows) {
                for (c, a) in row.iter().enumerate() {
                    _mm256_storeu_ps(y.add(l0 + 8 * c), *a);
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Up to four heads attended in one pass give each head's bits alone, at every level
    /// this CPU has, with and without a window and for head sizes that take the 512-bit,
    /// 256-bit (with a half chunk) and portable kernels; every level is within rounding of
    /// the portable row.
    #[test]
    fn heads_in_one_pass_equal_each_head_alone() {
        for d in [64usize, 40, 36] {
            let (capacity, pos) = (50, 30);
            let (keys, vals) = (values(capacity * d, 1), values(capacity * d, 2));
            let qs: Vec<Vec<f32>> = (0..HEADS_PER_PASS)
                .map(|r| values(d, 10 + r as u64).iter().map(|x| 3.0 * x).collect())
                .collect();
            for window in [None, Some(7)] {
                let job = Rows {
                    keys: &keys,
                    values: &vals,
                    d,
                    pos,
                    scale: 1.0 / (d as f32).sqrt(),
                    window,
                };
                for i in [0usize, 5, 19] {
                    let mut scores = Vec::new();
                    let alone = |level: SimdLevel, q: &[f32], scores: &mut Vec<f32>| {
                        let mut y = vec![0f32; d];
                        job.rows(level, i, &[q], scores, &mut [&mut y]);
                        y
                    };
                    let portable: Vec<Vec<f32>> = qs
                        .iter()
                        .map(|q| alone(SimdLevel::Portable, q, &mut scores))
                        .collect();
                    for level in SimdLevel::supported() {
                        let single: Vec<Vec<f32>> =
                            qs.iter().map(|q| alone(level, q, &mut scores)).collect();
                        for (s, p) in single.iter().flatten().zip(portable.iter().flatten()) {
                            assert!((s - p).abs() < 1e-5, "{level}, d = {d}: {s} vs {p}");
                        }
                        for r in 1..=HEADS_PER_PASS {
                            let q: Vec<&[f32]> = qs[..r].iter().map(|q| q.as_slice()).collect();
                            let mut ys = vec![vec![0f32; d]; r];
                            let mut y: Vec<&mut [f32]> =
                                ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                            job.rows(level, i, &q, &mut scores, &mut y);
                            for (k, got) in ys.iter().enumerate() {
                                let same = got
                                    .iter()
                                    .zip(&single[k])
                                    .all(|(a, b)| a.to_bits() == b.to_bits());
                                assert!(
                                    same,
                                    "{level}, d = {d}, {window:?}, row {i}: head {k} of {r}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
