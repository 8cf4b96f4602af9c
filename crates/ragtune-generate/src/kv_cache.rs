//! The KV cache of one sequence, and [`KvSpan`]: a run of its positions copied out in f16,
//! the unit the [`PrefixCache`](crate::PrefixCache) keeps across requests.
//!
//! For a quantized model every key and value is rounded to f16 precision when it is written
//! (llama.cpp's default KV type, `--cache-type-k f16`). The cache keeps them in f32 for the
//! attention kernels, so copying positions out to f16 and back is lossless: a prefix restored
//! from the prefix cache holds exactly the values a fresh prefill would have written. On the
//! f32 path (`WeightFormat::F32`, the exact reference) nothing is rounded and spans keep f32.

use half::f16;

use crate::lora::LoraAdapter;
use crate::{Error, Result};

/// The key/value cache of one sequence: what a caller holds between forward calls.
///
/// Preallocated for `capacity` positions when created and written in place, so a decode
/// step copies nothing but the new position. Per layer, keys and values are stored as
/// `(n_kv_heads, capacity, head_dim)` f32 (f16-representable values, for a quantized model's
/// cache): heads first, so
/// that one head's filled prefix is one contiguous run of `len * head_dim` values.
///
/// Slot `i` holds RoPE position [`first_position`](Self::first_position)` + i` (0 for every
/// cache but those made by `LlamaModel::new_cache_at`).
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
    first_position: usize,
    /// Round what is written to f16 precision, and keep spans in f16.
    f16: bool,
    /// `(id, name)` of the adapter the filled positions were computed with; `None`: base.
    adapter: Option<(u64, String)>,
}

/// One layer's keys and values, each `(n_kv_heads, capacity, head_dim)` f32.
#[derive(Debug, Clone)]
pub(crate) struct LayerKv {
    pub(crate) keys: Vec<f32>,
    pub(crate) values: Vec<f32>,
    /// Round what is written to f16 precision.
    f16: bool,
}

impl LayerKv {
    /// Writes `k`, `v` (`(t, d)` each) at offset `at`, rounded to f16 precision for a
    /// quantized model's cache.
    pub(crate) fn write(&mut self, at: usize, k: &[f32], v: &[f32]) {
        let (ks, vs) = (
            &mut self.keys[at..at + k.len()],
            &mut self.values[at..at + v.len()],
        );
        if self.f16 {
            round_into(ks, k);
            round_into(vs, v);
        } else {
            ks.copy_from_slice(k);
            vs.copy_from_slice(v);
        }
    }
}

/// `dst[i] = f16(src[i])` as f32.
fn round_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(*s).to_f32();
    }
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
                    f16: true,
                })
                .collect(),
            n_kv_heads,
            head_dim,
            capacity,
            len: 0,
            first_position: 0,
            f16: true,
            adapter: None,
        }
    }

    /// This cache rounding to f16 (`true`, the default) or keeping f32.
    pub(crate) fn with_f16(mut self, f16: bool) -> Self {
        self.f16 = f16;
        for layer in &mut self.layers {
            layer.f16 = f16;
        }
        self
    }

    /// This cache with slot 0 at RoPE position `first`.
    pub(crate) fn starting_at(mut self, first: usize) -> Self {
        self.first_position = first;
        self
    }

    /// Positions filled so far (the slot of the next token).
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

    /// The RoPE position of slot 0 (0 unless made by `LlamaModel::new_cache_at`).
    pub fn first_position(&self) -> usize {
        self.first_position
    }

    /// Bytes of one position in a [`KvSpan`] (keys and values of every layer, f16 for a
    /// quantized model, else f32): `2 * layers * n_kv_heads * head_dim * 2` (SmolLM2-135M:
    /// 23,040), twice that in f32.
    pub fn span_bytes_per_position(&self) -> usize {
        2 * self.layers.len() * self.n_kv_heads * self.head_dim * if self.f16 { 2 } else { 4 }
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
        let mut out = KvCache::new(self.layers.len(), kvh, d, capacity)
            .starting_at(self.first_position)
            .with_f16(self.f16);
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

    /// Slots `range` copied out (in f16 when the cache rounds to f16, else f32), tagged with
    /// this cache's adapter and the RoPE position of their first slot.
    ///
    /// # Errors
    /// [`Error::InvalidParams`] for a range beyond the filled positions or empty.
    pub fn span(&self, range: std::ops::Range<usize>) -> Result<KvSpan> {
        if range.start >= range.end || range.end > self.len {
            return Err(Error::InvalidParams {
                detail: format!("span {range:?} of a cache holding {} positions", self.len),
            });
        }
        let (kvh, d, n) = (self.n_kv_heads, self.head_dim, range.len());
        let half = |buf: &[f32]| -> SpanData {
            let runs = (0..kvh).map(|g| {
                let at = (g * self.capacity + range.start) * d;
                &buf[at..at + n * d]
            });
            if self.f16 {
                SpanData::F16(runs.flatten().map(|&x| f16::from_f32(x)).collect())
            } else {
                SpanData::F32(runs.flatten().copied().collect())
            }
        };
        Ok(KvSpan {
            layers: self
                .layers
                .iter()
                .map(|l| (half(&l.keys), half(&l.values)))
                .collect(),
            len: n,
            n_kv_heads: kvh,
            head_dim: d,
            first_position: self.first_position + range.start,
            adapter: self.adapter.as_ref().map(|(id, _)| *id),
        })
    }

    /// Appends `span` at slot `len()`, its keys rotated by `rotate` (a function of the layer
    /// index that turns the `(n, head_dim)` keys of one head, at RoPE positions starting at
    /// `span.first_position()`, into the keys at positions starting at this cache's next
    /// position; identity when they are the same). The caller binds the adapter first.
    ///
    /// # Errors
    /// [`Error::ContextOverflow`] when the span does not fit; [`Error::InvalidParams`] for a
    /// span of another geometry.
    pub(crate) fn append_span(
        &mut self,
        span: &KvSpan,
        mut rotate: impl FnMut(usize, &mut [f32]),
    ) -> Result<()> {
        if (span.layers.len(), span.n_kv_heads, span.head_dim)
            != (self.layers.len(), self.n_kv_heads, self.head_dim)
        {
            return Err(Error::InvalidParams {
                detail: "a KV span of another model's geometry".into(),
            });
        }
        let needed = self.len + span.len;
        if needed > self.capacity {
            return Err(Error::ContextOverflow {
                needed,
                capacity: self.capacity,
            });
        }
        let (kvh, d, n) = (self.n_kv_heads, self.head_dim, span.len);
        let mut k = vec![0f32; n * d];
        let mut v = vec![0f32; n * d];
        for (il, (layer, (sk, sv))) in self.layers.iter_mut().zip(&span.layers).enumerate() {
            for g in 0..kvh {
                let from = g * n * d;
                sk.read(from, &mut k);
                sv.read(from, &mut v);
                rotate(il, &mut k);
                layer.write((g * self.capacity + self.len) * d, &k, &v);
            }
        }
        self.len = needed;
        Ok(())
    }

    /// The id of the adapter the cached positions were computed with (`None`: the base model
    /// or an empty cache).
    pub(crate) fn adapter_id(&self) -> Option<u64> {
        match self.len {
            0 => None,
            _ => self.adapter.as_ref().map(|(id, _)| *id),
        }
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

    /// The layers, for the forward pass to read (the batched decode step's attention).
    pub(crate) fn layers(&self) -> &[LayerKv] {
        &self.layers
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

/// The values of one layer's keys or values in a [`KvSpan`].
#[derive(Debug, Clone, PartialEq)]
enum SpanData {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl SpanData {
    /// `dst.len()` values from `from`, as f32.
    fn read(&self, from: usize, dst: &mut [f32]) {
        match self {
            SpanData::F16(v) => {
                for (o, x) in dst.iter_mut().zip(&v[from..]) {
                    *o = x.to_f32();
                }
            }
            SpanData::F32(v) => dst.copy_from_slice(&v[from..from + dst.len()]),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            SpanData::F16(v) => v.len() * 2,
            SpanData::F32(v) => v.len() * 4,
        }
    }
}

/// Consecutive positions of a [`KvCache`], in f16 (a quantized model's cache) or f32: per
/// layer, keys and values each `(n_kv_heads, len, head_dim)`. Made by [`KvCache::span`]; put back with
/// `LlamaModel::append_span`, which re-rotates the keys when the span lands at another
/// position.
#[derive(Debug, Clone, PartialEq)]
pub struct KvSpan {
    layers: Vec<(SpanData, SpanData)>,
    len: usize,
    n_kv_heads: usize,
    head_dim: usize,
    first_position: usize,
    adapter: Option<u64>,
}

impl KvSpan {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when the span holds no position (never, for a span made by
    /// [`KvCache::span`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The RoPE position its keys were computed at (of its first position).
    pub fn first_position(&self) -> usize {
        self.first_position
    }

    /// The heap bytes of its keys and values: `len * 2 * layers * n_kv_heads * head_dim`
    /// times 2 (f16) or 4 (f32).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.bytes() + v.bytes()).sum()
    }

    /// The id of the adapter it was computed with (`None`: the base model).
    pub(crate) fn adapter_id(&self) -> Option<u64> {
        self.adapter
    }

    /// This span with its keys' RoPE position set to `first` (they were computed at
    /// positions other than their slots', as `LlamaModel::forward_blocks` does).
    pub(crate) fn at_position(mut self, first: usize) -> Self {
        self.first_position = first;
        self
    }

    /// Keys of layer `layer`, KV head `g`, position `i`: `head_dim` values (for tests).
    pub fn key(&self, layer: usize, g: usize, i: usize) -> Vec<f32> {
        let d = self.head_dim;
        let mut out = vec![0f32; d];
        self.layers[layer].0.read((g * self.len + i) * d, &mut out);
        out
    }

    /// Values of layer `layer`, KV head `g`, position `i`: `head_dim` values (for tests).
    pub fn value(&self, layer: usize, g: usize, i: usize) -> Vec<f32> {
        let d = self.head_dim;
        let mut out = vec![0f32; d];
        self.layers[layer].1.read((g * self.len + i) * d, &mut out);
        out
    }

    /// `(layers, n_kv_heads)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.layers.len(), self.n_kv_heads)
    }

    /// `(layers, n_kv_heads, head_dim)`.
    pub(crate) fn geometry(&self) -> (usize, usize, usize) {
        (self.layers.len(), self.n_kv_heads, self.head_dim)
    }

    /// Whether the values are held in f16 (else f32).
    pub(crate) fn is_f16(&self) -> bool {
        matches!(self.layers.first(), Some((SpanData::F16(_), _)) | None)
    }

    /// Appends the values to `out`: per layer the keys, then the values, each
    /// `(n_kv_heads, len, head_dim)` little-endian f16 or f32 ([`is_f16`](Self::is_f16)).
    pub(crate) fn write_values(&self, out: &mut Vec<u8>) {
        for (k, v) in &self.layers {
            for data in [k, v] {
                match data {
                    SpanData::F16(x) => out.extend(x.iter().flat_map(|h| h.to_le_bytes())),
                    SpanData::F32(x) => out.extend(x.iter().flat_map(|f| f.to_le_bytes())),
                }
            }
        }
    }

    /// The span that [`write_values`](Self::write_values) wrote into `bytes`, of `len`
    /// positions whose keys were computed at `first_position` with the adapter of id
    /// `adapter`. `None` when `bytes` has another length than the geometry wants.
    pub(crate) fn from_values(
        bytes: &[u8],
        f16_values: bool,
        (layers, n_kv_heads, head_dim): (usize, usize, usize),
        len: usize,
        first_position: usize,
        adapter: Option<u64>,
    ) -> Option<KvSpan> {
        let per = n_kv_heads * len * head_dim;
        let width = if f16_values { 2 } else { 4 };
        if len == 0 || bytes.len() != 2 * layers * per * width {
            return None;
        }
        let mut parts = bytes.chunks_exact(per * width).map(|b| {
            if f16_values {
                SpanData::F16(
                    b.chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                )
            } else {
                SpanData::F32(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                )
            }
        });
        let layers = (0..layers)
            .map(|_| Some((parts.next()?, parts.next()?)))
            .collect::<Option<Vec<_>>>()?;
        Some(KvSpan {
            layers,
            len,
            n_kv_heads,
            head_dim,
            first_position,
            adapter,
        })
    }
}
