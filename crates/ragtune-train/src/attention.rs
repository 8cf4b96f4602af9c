//! Fused masked attention for training: one candle op with its own backward, so that the
//! `(t, t)` score, probability and mask tensors of every layer are neither built op by op
//! nor kept alive until the backward pass.
//!
//! Written op by op (`matmul`, `* scale`, `+ mask`, a softmax of five elementwise ops,
//! `matmul`), one layer of SmolLM2-135M over 768 packed tokens keeps about six `(9, 768,
//! 768)` f32 tensors (21 MB each) for the backward, 30 layers about 4 GB a sequence, and the
//! elementwise passes over them took more time than the projections. Here the forward keeps
//! only its inputs and output; the backward recomputes each head's probabilities (one `t x t`
//! matrix product) and frees them per head, as FlashAttention does (Dao et al. 2022,
//! arXiv 2205.14135, §3.1: recomputation in the backward; the gradient of the softmax is
//! `dS = P ⊙ (dP - rowsum(P ⊙ dP))`, their eq. in Appendix B.2).
//!
//! Block attention (prompt format v2, see `model.rs`) needs two score matrices: the
//! tokens of a source block score with their queries and keys at canonical positions, all
//! other tokens with those at their real positions. The op takes both in one tensor: `q` and
//! `k` of width `2d`, the first half at real positions, the second at canonical ones, and
//! the rows of [`AttentionMask::block_rows`] read the second half.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::{contiguous_values, gemm_strided, Dst};
use crate::real::Real;
use crate::Result;

/// Which keys each query sees, for one packed sequence of `t` tokens (the same for every
/// head).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AttentionMask {
    t: usize,
    /// Row-major `(t, t)`: whether query `i` sees key `j`.
    allowed: Vec<bool>,
    /// Per query, whether it scores with the second half of `q` and `k` (a block token at
    /// its canonical position). `None`: every row reads the whole width.
    block_rows: Option<Vec<bool>>,
    /// The rows in tiles that cover every query once, in order (see [`Tile`]).
    tiles: Vec<Tile>,
}

/// Queries `rows` (at most [`TILE_ROWS`]), all reading the same half of `q` and `k`, which
/// see no key outside `keys`. The op computes scores only over these rectangles: a packed
/// sequence is block-diagonal (one block per example) and causal, so about half of `t x t`
/// or less, and a block-attention row only with the half it reads.
#[derive(Debug, Clone, PartialEq)]
struct Tile {
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
    /// 0: the first `d` of the q/k width, 1: the second (canonical positions).
    half: usize,
}

/// The most queries per [`Tile`]: smaller tiles skip more of the causal triangle, larger
/// ones make longer matrix products. 64 rows against 768 keys of width 64 keeps the products
/// efficient.
const TILE_ROWS: usize = 64;

impl AttentionMask {
    /// A mask of `t` queries over `t` keys from `allowed` (row-major `t x t`), where every
    /// query sees at least itself, and the rows that score at canonical positions.
    ///
    /// # Errors
    /// `Error::InvalidParameter` for lengths other than
    /// `t * t` and `t`, or a query that does not see itself.
    pub(crate) fn new(t: usize, allowed: Vec<bool>, block_rows: Option<Vec<bool>>) -> Result<Self> {
        let bad = |value: String| crate::Error::InvalidParameter {
            name: "attention mask",
            value,
            expected: "t x t entries, every query seeing itself, and t block-row flags",
        };
        if allowed.len() != t * t {
            return Err(bad(format!("{} entries for {t} tokens", allowed.len())));
        }
        if let Some(i) = (0..t).find(|&i| !allowed[i * t + i]) {
            return Err(bad(format!("query {i} does not see itself")));
        }
        if let Some(rows) = block_rows.as_ref().filter(|r| r.len() != t) {
            return Err(bad(format!(
                "{} block-row flags for {t} tokens",
                rows.len()
            )));
        }
        let tiles = tiles(t, &allowed, block_rows.as_deref());
        Ok(Self {
            t,
            allowed,
            block_rows,
            tiles,
        })
    }
}

/// Cuts the `t` queries into [`Tile`]s: a tile ends after [`TILE_ROWS`] rows, where the half
/// read changes, and before a row whose first visible key comes after the tile's first row
/// (the start of the next packed example). Its keys span the first to the last key any of
/// its rows sees. Every row sees itself, so each tile is at least one row.
fn tiles(t: usize, allowed: &[bool], block_rows: Option<&[bool]>) -> Vec<Tile> {
    let half = |i: usize| block_rows.map_or(0, |r| usize::from(r[i]));
    let row = |i: usize| &allowed[i * t..(i + 1) * t];
    let first = |i: usize| row(i).iter().position(|&a| a).unwrap_or(i);
    let last = |i: usize| row(i).iter().rposition(|&a| a).unwrap_or(i);
    let mut tiles = Vec::new();
    let mut start = 0;
    while start < t {
        let (mut lo, mut hi) = (first(start), last(start));
        let mut end = start + 1;
        while end < t && end - start < TILE_ROWS && half(end) == half(start) {
            let row_lo = first(end);
            if row_lo > start {
                break;
            }
            lo = lo.min(row_lo);
            hi = hi.max(last(end));
            end += 1;
        }
        tiles.push(Tile {
            rows: start..end,
            keys: lo..hi + 1,
            half: half(start),
        });
        start = end;
    }
    tiles
}

/// Grouped-query attention `softmax(scale · q kᵀ + mask) v` of one packed sequence:
/// `q: (h, t, dq)`, `k: (kvh, t, dq)`, `v: (kvh, t, d)` -> `(h, t, d)`, query head `i` on
/// key/value head `i / (h / kvh)`. `dq` is `d`, or `2d` when `mask` has block rows (module
/// docs). f32 or f64, all three of one dtype; differentiable in all three.
///
/// # Errors
/// Shape errors: ranks, a `t` other than the mask's, `h` not a multiple of `kvh`, `dq`
/// neither `d` nor `2d` as the mask wants.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Arc<AttentionMask>,
    scale: f64,
) -> Result<Tensor> {
    let op = FusedAttention {
        mask: mask.clone(),
        scale,
    };
    op.geometry(q.dims(), k.dims(), v.dims())?;
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct FusedAttention {
    mask: Arc<AttentionMask>,
    scale: f64,
}

/// The sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    h: usize,
    kvh: usize,
    t: usize,
    d: usize,
    /// Width of q and k rows: `d`, or `2d` with block rows.
    dq: usize,
}

impl FusedAttention {
    fn geometry(&self, q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<Geometry> {
        let (&[h, t, dq], &[kvh, tk, dk], &[kvv, tv, d]) = (q, k, v) else {
            candle_core::bail!("fused attention: q {q:?}, k {k:?}, v {v:?} are not 3-D");
        };
        let want_dq = if self.mask.block_rows.is_some() {
            2 * d
        } else {
            d
        };
        if t != self.mask.t || tk != t || tv != t {
            candle_core::bail!(
                "fused attention: {t}/{tk}/{tv} tokens, mask of {}",
                self.mask.t
            );
        }
        if kvh == 0 || h % kvh != 0 || kvv != kvh || dk != dq || dq != want_dq {
            candle_core::bail!(
                "fused attention: q {q:?}, k {k:?}, v {v:?} (q/k width {want_dq} wanted)"
            );
        }
        Ok(Geometry { h, kvh, t, d, dq })
    }
}

/// A strided matrix view: element `(r, c)` at `offset + r * rs + c * cs`.
#[derive(Clone, Copy)]
struct View<'a, T> {
    data: &'a [T],
    offset: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> View<'a, T> {
    fn new(data: &'a [T], offset: usize, rs: usize, cs: usize) -> Self {
        Self {
            data,
            offset,
            rs,
            cs,
        }
    }

    /// The transpose.
    fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `dst (m, n), row-major with row stride dst_rs = lhs (m, k) · rhs (k, n)`, or `+=` that
/// product when `accumulate`; single-threaded (the callers run one head per rayon task).
#[allow(clippy::too_many_arguments)]
fn matmul<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    lhs: View<'_, T>,
    rhs: View<'_, T>,
    accumulate: bool,
) {
    let dst = Dst {
        data: dst,
        rs: dst_rs,
        accumulate,
        parallel: false,
    };
    gemm_strided(
        (m, n, k),
        dst,
        T::from_f64(1.0),
        &lhs.data[lhs.offset..],
        (lhs.rs, lhs.cs),
        &rhs.data[rhs.offset..],
        (rhs.rs, rhs.cs),
    );
}

impl FusedAttention {
    /// The softmax probabilities of head `hh` over `tile`: `(rows, keys)` of the tile,
    /// row-major; masked entries exactly 0.
    fn probabilities<T: Real>(
        &self,
        g: Geometry,
        q: &[T],
        k: &[T],
        hh: usize,
        tile: &Tile,
    ) -> Vec<T> {
        let Geometry { t, d, dq, .. } = g;
        let kv = hh / (g.h / g.kvh);
        let (m, n) = (tile.rows.len(), tile.keys.len());
        let half = tile.half * d;
        let mut s = vec![T::default(); m * n];
        let qh = View::new(q, hh * t * dq + tile.rows.start * dq + half, dq, 1);
        let kt = View::new(k, kv * t * dq + tile.keys.start * dq + half, dq, 1).t();
        matmul(m, n, d, &mut s, n, qh, kt, false);
        let scale = T::from_f64(self.scale);
        for (row, i) in s.chunks_mut(n).zip(tile.rows.clone()) {
            let allowed = &self.mask.allowed[i * t + tile.keys.start..i * t + tile.keys.end];
            let mut max: Option<T> = None;
            for (x, &a) in row.iter_mut().zip(allowed) {
                *x *= scale;
                if a && max.is_none_or(|m| *x > m) {
                    max = Some(*x);
                }
            }
            let max = max.unwrap_or_default();
            let mut sum = T::default();
            for (x, &a) in row.iter_mut().zip(allowed) {
                *x = if a { (*x - max).exp() } else { T::default() };
                sum += *x;
            }
            for x in row.iter_mut() {
                *x /= sum;
            }
        }
        s
    }

    fn forward<T: Real>(&self, g: Geometry, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let Geometry { t, d, .. } = g;
        let rep = g.h / g.kvh;
        let heads: Vec<Vec<T>> = (0..g.h)
            .into_par_iter()
            .map(|hh| {
                let mut out = vec![T::default(); t * d];
                for tile in &self.mask.tiles {
                    let p = self.probabilities(g, q, k, hh, tile);
                    let (m, n) = (tile.rows.len(), tile.keys.len());
                    let vg = View::new(v, (hh / rep) * t * d + tile.keys.start * d, d, 1);
                    let dst = &mut out[tile.rows.start * d..];
                    matmul(m, d, n, dst, d, View::new(&p, 0, n, 1), vg, false);
                }
                out
            })
            .collect();
        heads.concat()
    }

    /// `(dq, dk, dv)` for the output gradient `dout: (h, t, d)`.
    fn backward<T: Real>(
        &self,
        g: Geometry,
        q: &[T],
        k: &[T],
        v: &[T],
        dout: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Geometry { t, d, dq, .. } = g;
        let rep = g.h / g.kvh;
        let scale = T::from_f64(self.scale);
        let per_head: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..g.h)
            .into_par_iter()
            .map(|hh| {
                let kv = hh / rep;
                let mut dv = vec![T::default(); t * d];
                let mut dqh = vec![T::default(); t * dq];
                let mut dkh = vec![T::default(); t * dq];
                for tile in &self.mask.tiles {
                    let (m, n) = (tile.rows.len(), tile.keys.len());
                    let half = tile.half * d;
                    let p = self.probabilities(g, q, k, hh, tile);
                    let pv = View::new(&p, 0, n, 1);
                    let doh = View::new(dout, hh * t * d + tile.rows.start * d, d, 1);
                    // dV_h[keys] += Pᵀ dO[rows].
                    let dv_keys = &mut dv[tile.keys.start * d..];
                    matmul(n, d, m, dv_keys, d, pv.t(), doh, true);
                    // dP = dO Vᵀ, then dS = P ⊙ (dP - rowsum(P ⊙ dP)) · scale, in place.
                    let mut ds = vec![T::default(); m * n];
                    let vt = View::new(v, kv * t * d + tile.keys.start * d, d, 1).t();
                    matmul(m, n, d, &mut ds, n, doh, vt, false);
                    for (drow, prow) in ds.chunks_mut(n).zip(p.chunks(n)) {
                        let dot = drow
                            .iter()
                            .zip(prow)
                            .fold(T::default(), |acc, (&a, &b)| acc + a * b);
                        for (x, &pp) in drow.iter_mut().zip(prow) {
                            *x = pp * (*x - dot) * scale;
                        }
                    }
                    // dQ[rows] = dS K[keys], dK[keys] += dSᵀ Q[rows], in the half the
                    // tile reads (the other half of its rows' dQ stays 0).
                    let dsv = View::new(&ds, 0, n, 1);
                    let kh = View::new(k, kv * t * dq + tile.keys.start * dq + half, dq, 1);
                    let qh = View::new(q, hh * t * dq + tile.rows.start * dq + half, dq, 1);
                    let dq_rows = &mut dqh[tile.rows.start * dq + half..];
                    matmul(m, d, n, dq_rows, dq, dsv, kh, false);
                    let dk_keys = &mut dkh[tile.keys.start * dq + half..];
                    matmul(n, d, m, dk_keys, dq, dsv.t(), qh, true);
                }
                (dqh, dkh, dv)
            })
            .collect();
        let mut dq_all = Vec::with_capacity(g.h * t * dq);
        let mut dk_all = vec![T::default(); g.kvh * t * dq];
        let mut dv_all = vec![T::default(); g.kvh * t * d];
        for (hh, (dqh, dkh, dv)) in per_head.into_iter().enumerate() {
            let kv = hh / rep;
            dq_all.extend(dqh);
            for (acc, x) in dk_all[kv * t * dq..(kv + 1) * t * dq].iter_mut().zip(dkh) {
                *acc += x;
            }
            for (acc, x) in dv_all[kv * t * d..(kv + 1) * t * d].iter_mut().zip(dv) {
                *acc += x;
            }
        }
        (dq_all, dk_all, dv_all)
    }
}

impl FusedAttention {
    /// [`backward`](Self::backward) on tensors: `(dq, dk, dv)` shaped as `q`, `k`, `v`.
    fn gradients<T: Real>(
        &self,
        g: Geometry,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let values = |x: &Tensor| x.flatten_all()?.to_vec1::<T>();
        let (dq, dk, dv) =
            self.backward::<T>(g, &values(q)?, &values(k)?, &values(v)?, &values(dout)?);
        let dev = q.device();
        Ok((
            Tensor::from_vec(dq, q.shape(), dev)?,
            Tensor::from_vec(dk, k.shape(), dev)?,
            Tensor::from_vec(dv, v.shape(), dev)?,
        ))
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> candle_core::Result<&'a [T]> {
    contiguous_values(data, layout, "fused attention: inputs")
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry(l1.dims(), l2.dims(), l3.dims())?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.forward(
                    g,
                    contiguous(q, l1)?,
                    contiguous(k, l2)?,
                    contiguous(v, l3)?,
                ))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                CpuStorage::F64(self.forward(
                    g,
                    contiguous(q, l1)?,
                    contiguous(k, l2)?,
                    contiguous(v, l3)?,
                ))
            }
            _ => candle_core::bail!("fused attention: q, k, v all f32 or all f64"),
        };
        Ok((out, Shape::from((g.h, g.t, g.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry(q.dims(), k.dims(), v.dims())?;
        let (dq, dk, dv) = match q.dtype() {
            candle_core::DType::F32 => self.gradients::<f32>(g, q, k, v, grad_res)?,
            candle_core::DType::F64 => self.gradients::<f64>(g, q, k, v, grad_res)?,
            other => candle_core::bail!("fused attention: {other:?} gradients"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The op-by-op composition this op replaces, on candle's autograd: per head,
    /// `softmax(scale · q kᵀ + mask) v`, block rows from the second half of the width.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, scale: f64) -> Tensor {
        let (h, t, _) = q.dims3().expect("q");
        let (kvh, _, d) = v.dims3().expect("v");
        let additive: Vec<f64> = mask
            .allowed
            .iter()
            .map(|&a| if a { 0.0 } else { -1e9 })
            .collect();
        let additive = Tensor::from_vec(additive, (t, t), q.device()).expect("mask");
        let heads: Vec<Tensor> = (0..h)
            .map(|hh| {
                let g = hh / (h / kvh);
                let (qh, kg, vg) = (
                    q.get(hh).expect("q"),
                    k.get(g).expect("k"),
                    v.get(g).expect("v"),
                );
                let scores = |off: usize| {
                    qh.narrow(1, off, d)
                        .and_then(|a| a.matmul(&kg.narrow(1, off, d)?.t()?))
                        .expect("scores")
                };
                let mut s = scores(0);
                if let Some(rows) = &mask.block_rows {
                    let sel: Vec<f64> = rows.iter().map(|&b| f64::from(u8::from(b))).collect();
                    let sel = Tensor::from_vec(sel, (t, 1), q.device()).expect("sel");
                    let other = (1.0 - &sel).expect("other");
                    s = (s.broadcast_mul(&other).expect("a")
                        + scores(d).broadcast_mul(&sel).expect("b"))
                    .expect("select");
                }
                let s = ((s * scale).expect("scale") + &additive).expect("mask");
                crate::ops::softmax_last_dim(&s)
                    .and_then(|p| Ok(p.matmul(&vg)?))
                    .expect("pv")
            })
            .collect();
        Tensor::stack(&heads, 0).expect("stack")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .and_then(|x| x.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>())
            .expect("diff")
    }

    /// Two packed examples (a segment boundary), two source blocks that see only the head and
    /// themselves, grouped-query heads, with and without canonical rows: the output and the
    /// gradients of q, k and v equal candle's autograd of the op-by-op formula (f64).
    #[test]
    fn fused_attention_equals_the_op_by_op_formula_and_its_gradients() {
        let dev = Device::Cpu;
        let (h, kvh, t, d) = (4, 2, 9, 3);
        // Example 0: tokens 0..6 = head 0..2, block A 2..4, block B 4..6 (each block sees
        // the head and itself only); example 1: tokens 6..9, causal, except that token 8
        // does not see token 6 (a hole in a row).
        let block = |i: usize| match i {
            2..4 => Some(0),
            4..6 => Some(1),
            _ => None,
        };
        let mut allowed = vec![false; t * t];
        for i in 0..t {
            for j in 0..=i {
                let same = (i < 6) == (j < 6);
                let sees = match (block(i), block(j)) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                };
                allowed[i * t + j] = same && sees;
            }
        }
        allowed[8 * t + 6] = false;
        let block_rows: Vec<bool> = (0..t).map(|i| block(i).is_some()).collect();
        for canonical in [false, true] {
            let dq = if canonical { 2 * d } else { d };
            let mask = Arc::new(
                AttentionMask::new(t, allowed.clone(), canonical.then(|| block_rows.clone()))
                    .expect("mask"),
            );
            let var = |shape: (usize, usize, usize)| {
                Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev).expect("randn"))
                    .expect("var")
            };
            let (q, k, v) = (var((h, t, dq)), var((kvh, t, dq)), var((kvh, t, d)));
            let weights = Tensor::randn(0f64, 1.0, (h, t, d), &dev).expect("weights");
            let scale = 0.7;
            let ours = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, scale)
                .expect("fused");
            let theirs = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, scale);
            assert!(max_diff(&ours, &theirs) < 1e-12, "forward");
            let loss = |y: &Tensor| (y * &weights).and_then(|p| p.sum_all()).expect("loss");
            let g_ours = loss(&ours).backward().expect("bwd");
            let g_theirs = loss(&theirs).backward().expect("bwd");
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let a = g_ours.get(x.as_tensor()).expect("fused gradient");
                let b = g_theirs.get(x.as_tensor()).expect("reference gradient");
                let diff = max_diff(a, b);
                assert!(diff < 1e-10, "canonical {canonical}: d{name} off by {diff}");
                assert!(
                    max_diff(b, &b.zeros_like().expect("0")) > 1e-3,
                    "d{name} is zero"
                );
            }
            assert_eq!(ours.dtype(), DType::F64);
        }
    }

    /// At SmolLM2's sizes (9 query heads on 3 KV heads of 64, 700 packed tokens: a head,
    /// four 80-token source blocks, a tail, then a second causal example), f32 and f64
    /// agree with the op-by-op formula in f64: the realistic sizes take gemm's packed paths,
    /// which the small test above does not reach.
    #[test]
    fn fused_attention_at_model_sizes_in_f32_and_f64() {
        let dev = Device::Cpu;
        let (h, kvh, t, d) = (9, 3, 700, 64);
        // head 0..40, blocks of 80 tokens 40..360, tail 360..500, second example 500..700 causal
        let block = |i: usize| {
            if (40..360).contains(&i) {
                Some((i - 40) / 80)
            } else {
                None
            }
        };
        let mut allowed = vec![false; t * t];
        for i in 0..t {
            for j in 0..=i {
                let same = (i < 500) == (j < 500);
                let sees = match (block(i), block(j)) {
                    (Some(a), Some(b)) => a == b,
                    (Some(_), None) => j < 40,
                    _ => true,
                };
                allowed[i * t + j] = same && sees;
            }
        }
        let block_rows: Vec<bool> = (0..t).map(|i| block(i).is_some()).collect();
        let mask = Arc::new(AttentionMask::new(t, allowed, Some(block_rows)).expect("mask"));
        let dq = 2 * d;
        let var = |shape: (usize, usize, usize)| {
            Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev).expect("randn")).expect("var")
        };
        let (q, k, v) = (var((h, t, dq)), var((kvh, t, dq)), var((kvh, t, d)));
        let weights = Tensor::randn(0f64, 1.0, (h, t, d), &dev).expect("weights");
        let scale = 0.125;
        let theirs = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, scale);
        let loss = |y: &Tensor| (y * &weights).and_then(|p| p.sum_all()).expect("loss");
        let g_theirs = loss(&theirs).backward().expect("bwd");
        for dtype in [DType::F64, DType::F32] {
            let q32 = Var::from_tensor(&q.to_dtype(dtype).expect("tensor")).expect("tensor");
            let k32 = Var::from_tensor(&k.to_dtype(dtype).expect("tensor")).expect("tensor");
            let v32 = Var::from_tensor(&v.to_dtype(dtype).expect("tensor")).expect("tensor");
            let ours = attention(
                q32.as_tensor(),
                k32.as_tensor(),
                v32.as_tensor(),
                &mask,
                scale,
            )
            .expect("tensor");
            let w = weights.to_dtype(dtype).expect("tensor");
            let g = (&ours * &w)
                .expect("tensor")
                .sum_all()
                .expect("tensor")
                .backward()
                .expect("tensor");
            // Measured: f64 within 2e-15, f32 within 5.1e-6 of gradients up to 7.5.
            let bound = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
            let forward = max_diff(&ours.to_dtype(DType::F64).expect("tensor"), &theirs);
            assert!(forward < bound, "{dtype:?} forward off by {forward}");
            for (name, x, xr) in [("q", &q32, &q), ("k", &k32, &k), ("v", &v32, &v)] {
                let a = g
                    .get(x.as_tensor())
                    .expect("tensor")
                    .to_dtype(DType::F64)
                    .expect("tensor");
                let b = g_theirs.get(xr.as_tensor()).expect("tensor");
                let diff = max_diff(&a, b);
                assert!(diff < bound, "{dtype:?} d{name} off by {diff}");
                assert!(
                    max_diff(b, &b.zeros_like().expect("tensor")) > 1.0,
                    "d{name} is small"
                );
            }
        }
    }

    /// The tiles cover every query once, in order, each with one half and at most
    /// `TILE_ROWS` rows, and every key a query sees lies in its tile's keys; on a causal
    /// sequence they score well under the full square, and a second packed example is
    /// never scored against the first.
    #[test]
    fn tiles_cover_every_visible_key_and_skip_the_rest() {
        let t = 300;
        let split = 170; // two packed examples: 0..170 and 170..300
        let seg = |i: usize| usize::from(i >= split);
        // Source blocks (rows 20..60 and 60..100) see the head 0..20 and themselves.
        let block = |i: usize| (20..100).contains(&i).then(|| (i - 20) / 40);
        for (window, with_blocks) in [(None, false), (None, true), (Some(50), false)] {
            let mut allowed = vec![false; t * t];
            for i in 0..t {
                for j in 0..=i {
                    let sees = match (with_blocks, block(i), block(j)) {
                        (true, Some(a), Some(b)) => a == b,
                        (true, Some(_), None) => j < 20,
                        _ => true,
                    };
                    let near = window.is_none_or(|w| i - j < w);
                    allowed[i * t + j] = seg(i) == seg(j) && sees && near;
                }
            }
            let rows = with_blocks.then(|| (0..t).map(|i| block(i).is_some()).collect());
            let mask = AttentionMask::new(t, allowed.clone(), rows).expect("mask");
            let mut next = 0;
            let mut area = 0;
            for tile in &mask.tiles {
                assert_eq!(tile.rows.start, next, "{window:?} {with_blocks}");
                assert!(!tile.rows.is_empty() && tile.rows.len() <= TILE_ROWS);
                next = tile.rows.end;
                area += tile.rows.len() * tile.keys.len();
                for i in tile.rows.clone() {
                    let half = usize::from(with_blocks && block(i).is_some());
                    assert_eq!(tile.half, half, "row {i}");
                    for j in (0..t).filter(|&j| allowed[i * t + j]) {
                        assert!(tile.keys.contains(&j), "row {i} key {j} {tile:?}");
                    }
                    if i >= split {
                        assert!(tile.keys.start >= split, "row {i}: {tile:?}");
                    }
                }
            }
            assert_eq!(next, t);
            // The visible pairs are about a third of t², split between the two examples.
            assert!(
                area < t * t / 2,
                "{window:?} {with_blocks}: {area} of {}",
                t * t
            );
        }
    }

    #[test]
    fn a_mask_where_a_query_misses_itself_is_refused() {
        let err = AttentionMask::new(2, vec![true, false, true, false], None).expect_err("bad");
        assert!(err.to_string().contains("query 1"), "{err}");
        assert!(AttentionMask::new(2, vec![true; 3], None).is_err());
    }
}
