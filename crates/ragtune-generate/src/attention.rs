//! Grouped-query attention over an explicit, preallocated KV cache ([`KvCache`](crate::KvCache)).
//!
//! `softmax(q kᵀ / sqrt(d) + causal mask) v` (Vaswani et al., 2017), with `h` query heads
//! sharing `kvh` key/value heads in groups of `h / kvh` (Ainslie et al., 2023, GQA).
//!
//! Two paths, chosen by the number of new tokens `t`:
//! - **decode** (`t < PREFILL_MIN_TOKENS`): plain loops over the cache buffers, one task per
//!   query head on the rayon pool. For one query row a gemm spends its time packing
//!   operands (measured: 18% of a decode step went to candle's matmul packing the keys).
//! - **prefill**: the filled prefix of the cache as candle tensors and two batched matmuls
//!   per KV head group, where the gemm's packing pays off.

use candle_core::{Device, Tensor};
use ragtune_util::ptr::SyncPtr;

use crate::kv_cache::LayerKv;
use crate::quant::for_each_dynamic;
use crate::Result;

/// From this many new tokens on, attention uses batched matmuls.
pub(crate) const PREFILL_MIN_TOKENS: usize = 8;

/// Attention of `t` new tokens at positions `pos..pos + t` for one layer.
///
/// `q`: `(h, t, d)`, `k` and `v`: `(kvh, t, d)`, all f32 row-major after RoPE; `k`/`v` are
/// written into `layer` at `pos` first. `mask` is the causal mask `(t, pos + t)` (`None`
/// when `t == 1`). Returns `(t, h * d)`.
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
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    for g in 0..kvh {
        let at = (g * capacity + pos) * d;
        layer.write(
            at,
            &k[g * t * d..(g + 1) * t * d],
            &v[g * t * d..(g + 1) * t * d],
        );
    }
    if t < PREFILL_MIN_TOKENS {
        let y = decode(q, layer, (kvh, d, capacity), h, t, pos);
        return Ok(Tensor::from_vec(y, (t, h * d), &Device::Cpu)?);
    }
    prefill(q, layer, (kvh, d, capacity), h, t, pos, mask)
}

/// The decode path: per query head, scores against every visible cached key, softmax, and
/// the weighted sum of values. Returns `(t, h * d)`.
fn decode(
    q: &[f32],
    layer: &LayerKv,
    (kvh, d, capacity): (usize, usize, usize),
    h: usize,
    t: usize,
    pos: usize,
) -> Vec<f32> {
    let group = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    // (h, t, d), transposed to (t, h * d) below.
    let mut heads = vec![0f32; h * t * d];
    let out = SyncPtr::new(&mut heads);
    for_each_dynamic(h, |hq| {
        let g = hq / group;
        let keys = &layer.keys[g * capacity * d..];
        let values = &layer.values[g * capacity * d..];
        // SAFETY: head hq alone writes heads[hq * t * d .. (hq + 1) * t * d].
        let y = unsafe { out.slice_mut(hq * t * d, t * d) };
        let mut scores = Vec::with_capacity(pos + t);
        for i in 0..t {
            let qi = &q[(hq * t + i) * d..(hq * t + i + 1) * d];
            let visible = pos + i + 1;
            scores.clear();
            scores.extend(
                keys[..visible * d]
                    .chunks_exact(d)
                    .map(|kj| dot(qi, kj) * scale),
            );
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in &mut scores {
                *s = (*s - max).exp();
                sum += *s;
            }
            let yi = &mut y[i * d..(i + 1) * d];
            yi.fill(0.0);
            for (p, vj) in scores.iter().zip(values[..visible * d].chunks_exact(d)) {
                let w = p / sum;
                for (o, x) in yi.iter_mut().zip(vj) {
                    *o += w * x;
                }
            }
        }
    });
    let mut y = vec![0f32; t * h * d];
    for hq in 0..h {
        for i in 0..t {
            y[(i * h + hq) * d..(i * h + hq + 1) * d]
                .copy_from_slice(&heads[(hq * t + i) * d..(hq * t + i + 1) * d]);
        }
    }
    y
}

/// The prefill path on candle matmuls. Returns `(t, h * d)`.
fn prefill(
    q: &[f32],
    layer: &LayerKv,
    (kvh, d, capacity): (usize, usize, usize),
    h: usize,
    t: usize,
    pos: usize,
    mask: Option<&Tensor>,
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
    let att = match mask {
        None => att,
        Some(m) => att
            .reshape((kvh, group, t, kv_len))?
            .broadcast_add(m)?
            .reshape((kvh, group * t, kv_len))?,
    };
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    let y = att.matmul(&v)?; // (kvh, group * t, d)
    Ok(y.reshape((h, t, d))?.transpose(0, 1)?.reshape((t, h * d))?)
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums, so the compiler vectorises the loop without reassociating.
    let mut acc = [0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail: f32 = a
        .chunks_exact(8)
        .remainder()
        .iter()
        .zip(b.chunks_exact(8).remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}
