//! Grouped-query attention over an explicit, preallocated KV cache.
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

use crate::lora::LoraAdapter;
use crate::quant::for_each_dynamic;
use crate::{Error, Result};

/// From this many new tokens on, attention uses batched matmuls.
pub(crate) const PREFILL_MIN_TOKENS: usize = 8;

/// The key/value cache of one sequence: what a caller holds between forward calls.
///
/// Preallocated for `capacity` positions when created and written in place, so a decode
/// step copies nothing but the new position. Per layer, keys and values are stored as
/// `(n_kv_heads, capacity, head_dim)` f32: heads first, so that one head's filled prefix is
/// one contiguous run of `len * head_dim` values.
///
/// The cache remembers which LoRA adapter (or none) its positions were computed with:
/// continuing it under another adapter is refused ([`Error::CacheAdapterMismatch`]), since
/// the cached keys and values would belong to another model. An empty cache (new, cleared,
/// or truncated to 0) takes any adapter.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer.
    layers: Vec<LayerKv>,
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    /// `(id, name)` of the adapter the filled positions were computed with; `None`: base.
    adapter: Option<(u64, String)>,
}

/// One layer's keys and values, each `(n_kv_heads, capacity, head_dim)` f32.
#[derive(Debug, Clone)]
pub(crate) struct LayerKv {
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl Default for KvCache {
    /// A cache of no layers and no capacity: a placeholder while a cache is moved elsewhere
    /// (a batched decode step holds the real one).
    fn default() -> Self {
        KvCache::new(0, 0, 0, 0)
    }
}

impl KvCache {
    /// A zeroed cache: `2 * layers * n_kv_heads * head_dim * capacity * 4` bytes.
    pub(crate) fn new(layers: usize, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        let size = n_kv_heads * capacity * head_dim;
        Self {
            layers: (0..layers)
                .map(|_| LayerKv {
                    keys: vec![0.0; size],
                    values: vec![0.0; size],
                })
                .collect(),
            n_kv_heads,
            head_dim,
            capacity,
            len: 0,
            adapter: None,
        }
    }

    /// Positions filled so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of positions this cache holds at most, in tokens.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every cached position (the memory stays allocated for the next sequence).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Drops the cached positions from `len` on (e.g. to re-run from a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// A new cache of `capacity` positions holding a copy of this one's first `len`
    /// positions (and its adapter): a computed prompt prefix (e.g. a constant system prompt)
    /// reused by many requests. Copies `len` positions, not the whole capacity.
    ///
    /// # Errors
    /// [`Error::InvalidParams`] when `len` exceeds the filled positions or `capacity`.
    pub fn copy_prefix(&self, len: usize, capacity: usize) -> Result<KvCache> {
        if len > self.len || len > capacity {
            return Err(Error::InvalidParams {
                detail: format!(
                    "prefix of {len} positions from a cache holding {} into a capacity of {capacity}",
                    self.len
                ),
            });
        }
        let (kvh, d) = (self.n_kv_heads, self.head_dim);
        let mut out = KvCache::new(self.layers.len(), kvh, d, capacity);
        for (src, dst) in self.layers.iter().zip(&mut out.layers) {
            for g in 0..kvh {
                let (from, to) = (g * self.capacity * d, g * capacity * d);
                dst.keys[to..to + len * d].copy_from_slice(&src.keys[from..from + len * d]);
                dst.values[to..to + len * d].copy_from_slice(&src.values[from..from + len * d]);
            }
        }
        out.len = len;
        out.adapter = if len > 0 { self.adapter.clone() } else { None };
        Ok(out)
    }

    /// The name of the adapter the cached positions were computed with (`None`: the base
    /// model, or an empty cache).
    pub fn adapter_name(&self) -> Option<&str> {
        match self.len {
            0 => None,
            _ => self.adapter.as_ref().map(|(_, name)| name.as_str()),
        }
    }

    /// Records `adapter` for the positions about to be written; refuses a mix.
    ///
    /// # Errors
    /// [`Error::CacheAdapterMismatch`] when the cache holds positions of another adapter.
    pub(crate) fn bind(&mut self, adapter: Option<&LoraAdapter>) -> Result<()> {
        let requested = adapter.map(LoraAdapter::id);
        if self.len == 0 {
            self.adapter = adapter.map(|a| (a.id(), a.name().to_string()));
            return Ok(());
        }
        if self.adapter.as_ref().map(|(id, _)| *id) == requested {
            return Ok(());
        }
        let show = |n: Option<&str>| n.map_or("none".to_string(), |n| format!("`{n}`"));
        Err(Error::CacheAdapterMismatch {
            cached: show(self.adapter.as_ref().map(|(_, n)| n.as_str())),
            requested: show(adapter.map(LoraAdapter::name)),
            len: self.len,
        })
    }

    /// Marks `len` positions as filled (after every layer has written them).
    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity);
        self.len = len;
    }

    /// The layers, for the forward pass to write and read in turn.
    pub(crate) fn layers_mut(&mut self) -> &mut [LayerKv] {
        &mut self.layers
    }

    /// `(n_kv_heads, head_dim, capacity)`.
    pub(crate) fn geometry(&self) -> (usize, usize, usize) {
        (self.n_kv_heads, self.head_dim, self.capacity)
    }
}

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
        layer.keys[at..at + t * d].copy_from_slice(&k[g * t * d..(g + 1) * t * d]);
        layer.values[at..at + t * d].copy_from_slice(&v[g * t * d..(g + 1) * t * d]);
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
