//! Differentiable building blocks for the training forward pass.
//!
//! candle's autograd silently drops gradients through `QMatMul` and through the fused
//! `candle_nn` kernels (`rms_norm`, `softmax_last_dim`, `rope`/`rope_i`, `layer_norm`): they
//! have no backward, and a graph through them simply stops tracking. Everything here is either
//! written with elementary candle ops that have a backward ([`softmax_last_dim`]) or is a
//! custom op with an explicit backward ([`frozen_linear`], [`lora_linear`]); the norms, RoPE
//! and the gated activation are in [`crate::fused`].

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

use crate::frozen::{FrozenWeight, Product};
use crate::real::Real;
use crate::Result;

/// The error of a training op called with operands that do not fit: `what` names them,
/// with their shapes and dtypes.
pub(crate) fn mismatch(what: String) -> crate::Error {
    candle_core::Error::Msg(what).into()
}

/// `y = x Wᵀ` for a frozen weight `W: (out, in)`: `x: (t, in)` -> `(t, out)`, f32 or f64
/// (both operands the same dtype).
///
/// A custom op because candle's `matmul` backward always computes the gradient of *both*
/// operands: for a frozen weight that is a wasted `(out, in)` product per projection, a third
/// of the training FLOPs. Here the backward returns only `dL/dx = dL/dy · W`.
///
/// # Errors
/// Mismatched dtypes, an `x` that is not 2-D or whose last dimension is not `in`.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (_, wk) = weight.dims2()?;
    if k != wk || x.dtype() != weight.dtype() {
        return Err(mismatch(format!(
            "frozen_linear: x {:?} {:?} against weight {:?} {:?}",
            x.dims(),
            x.dtype(),
            weight.dims(),
            weight.dtype()
        )));
    }
    let op = FrozenLinear {
        weight: weight.contiguous()?,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// LoRA dropout on the adapter's input: each element of `x` is kept, scaled by
/// `1 / (1 - p)`, or zeroed, from a counter-based hash of `(seed, index)`, so the backward
/// pass recomputes the same mask instead of keeping it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Drawn once per projection call from the trainer's seeded generator.
    pub seed: u64,
    /// The probability of zeroing an element, in `[0, 1)`.
    pub p: f64,
}

impl Dropout {
    /// The mask's factor for element `index`: `1 / (1 - p)` (kept) or 0. The uniform number
    /// is the top 53 bits of SplitMix64 (Steele et al. 2014) of `seed + index · φ`.
    pub fn factor(&self, index: usize) -> f64 {
        let mut z = self
            .seed
            .wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        if u < self.p {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }

    /// The mask of `len` elements (for tests and references): [`factor`](Self::factor) of
    /// `0..len`.
    pub fn mask(&self, len: usize) -> Vec<f64> {
        (0..len).map(|i| self.factor(i)).collect()
    }
}

/// A projection with a LoRA branch (Hu et al. 2021, eq. 3; PEFT's `lora_B(lora_A(dropout(x)))
/// · scaling`): `y = x Wᵀ + scale · (dropout(x) Aᵀ) Bᵀ` with the frozen `W: (out, in)`,
/// `A: (r, in)`, `B: (out, r)`; `x: (t, in)` -> `(t, out)`, f32 or f64, all of one dtype.
///
/// One candle op with its own backward: `dx = dy W + scale · ((dy B) A) ⊙ mask`,
/// `dA = scale · (dy B)ᵀ dropout(x)`, `dB = scale · dyᵀ (dropout(x) Aᵀ)`. Written op by op,
/// each projection made about ten `(t, in)`/`(t, out)` temporaries and as many elementwise
/// passes in the backward, and the dropout mask was a tensor of random numbers.
///
/// # Errors
/// Shape or dtype mismatches.
pub fn lora_linear(
    x: &Tensor,
    weight: &FrozenWeight,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (out, wk) = weight.tensor().dims2()?;
    let (r, ak) = a.dims2()?;
    let (bo, br) = b.dims2()?;
    let dtypes = [weight.tensor().dtype(), a.dtype(), b.dtype()];
    if k != wk || ak != k || bo != out || br != r || dtypes.iter().any(|&d| d != x.dtype()) {
        return Err(mismatch(format!(
            "lora_linear: x {:?}, W {:?}, A {:?}, B {:?}, dtypes {:?} and {dtypes:?}",
            x.dims(),
            weight.tensor().dims(),
            a.dims(),
            b.dims(),
            x.dtype()
        )));
    }
    let op = LoraLinear {
        weight: weight.clone(),
        scale,
        dropout: dropout.filter(|d| d.p > 0.0),
    };
    Ok(x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?)
}

struct LoraLinear {
    /// `(out, in)`, contiguous.
    weight: FrozenWeight,
    scale: f64,
    dropout: Option<Dropout>,
}

/// The output of [`gemm_strided`] and how to write it.
pub(crate) struct Dst<'a, T> {
    /// Row-major, row stride `rs`.
    pub(crate) data: &'a mut [T],
    pub(crate) rs: usize,
    /// Add the product to `data` instead of overwriting it.
    pub(crate) accumulate: bool,
    /// Let large products run on rayon's threads (the callers inside a rayon task pass
    /// `false`).
    pub(crate) parallel: bool,
}

/// `dst (m, n) (+)= alpha · lhs (m, k) · rhs (k, n)` (`+=` with `dst.accumulate`), each
/// operand strided: element `(i, j)` of `lhs` at `i * lhs_rs + j * lhs_cs`, likewise `rhs`;
/// `dst` at `i * dst.rs + j`. With `dst.parallel`, large products run on rayon's threads
/// (see [`parallelism`]).
///
/// # Panics
/// When a stride reaches outside its slice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: Dst<'_, T>,
    alpha: T,
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(dst.rs, 1, m, n) < dst.data.len(),
        "gemm_strided: dst out of bounds"
    );
    assert!(
        last(lhs_rs, lhs_cs, m, k) < lhs.len(),
        "gemm_strided: lhs out of bounds"
    );
    assert!(
        last(rhs_rs, rhs_cs, k, n) < rhs.len(),
        "gemm_strided: rhs out of bounds"
    );
    let parallelism = match dst.parallel {
        true => parallelism(m, n, k),
        false => gemm::Parallelism::None,
    };
    // SAFETY: the asserts above keep every (i, j) the strides reach inside the slices; dst
    // is borrowed mutably and written at i * dst.rs + j for i < m, j < n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.rs as isize,
            dst.accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::from_f64(1.0),
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `dst (m, n) (+)= alpha · lhs (m, k) · rhs (k, n)` into a contiguous `(m, n)` buffer, on
/// rayon's threads when large: [`gemm_strided`] for the LoRA op.
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: Real>(
    mnk: (usize, usize, usize),
    data: &mut [T],
    accumulate: bool,
    alpha: T,
    lhs: &[T],
    lhs_strides: (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
) {
    let dst = Dst {
        data,
        rs: mnk.1,
        accumulate,
        parallel: true,
    };
    gemm_strided(mnk, dst, alpha, lhs, lhs_strides, rhs, rhs_strides);
}

impl LoraLinear {
    /// `dropout(x)`, or `None` without dropout.
    fn dropped<T: Real>(&self, x: &[T]) -> Option<Vec<T>> {
        let d = self.dropout?;
        Some(
            x.iter()
                .enumerate()
                .map(|(i, &v)| v * T::from_f64(d.factor(i)))
                .collect(),
        )
    }

    /// `y (t, out)` for `x (t, in)`, `a (r, in)`, `b (out, r)`.
    fn forward<T: Real>(&self, w: &[T], x: &[T], a: &[T], b: &[T], (t, k, r, n): Dims) -> Vec<T> {
        let mut y = T::packed_product(x, t, &self.weight, Product::Transposed)
            .unwrap_or_else(|| gemm_nt(x, w, t, n, k));
        let dropped = self.dropped(x);
        let xd = dropped.as_deref().unwrap_or(x);
        let u = gemm_nt(xd, a, t, r, k);
        let scale = T::from_f64(self.scale);
        gemm_into((t, n, r), &mut y, true, scale, &u, (r, 1), b, (1, r));
        y
    }

    /// `(dx, dA, dB)` for the output gradient `dy (t, out)`; `dx` only when `need_dx` (an
    /// `x` that tracks no gradient, such as the first layer's, needs none: the largest
    /// product of the backward is skipped).
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(
        &self,
        w: &[T],
        x: &[T],
        a: &[T],
        b: &[T],
        dy: &[T],
        (t, k, r, n): Dims,
        need_dx: bool,
    ) -> LoraGrads<T> {
        let scale = T::from_f64(self.scale);
        let mask: Option<Vec<T>> = self
            .dropout
            .map(|d| (0..x.len()).map(|i| T::from_f64(d.factor(i))).collect());
        let dropped: Option<Vec<T>> = mask
            .as_ref()
            .map(|m| x.iter().zip(m).map(|(&v, &f)| v * f).collect());
        let xd = dropped.as_deref().unwrap_or(x);
        // u = dropout(x) Aᵀ (t, r), g = dy B (t, r).
        let u = gemm_nt(xd, a, t, r, k);
        let mut g = vec![T::default(); t * r];
        gemm_into(
            (t, r, n),
            &mut g,
            false,
            T::from_f64(1.0),
            dy,
            (n, 1),
            b,
            (r, 1),
        );
        // dB = scale · dyᵀ u (out, r); dA = scale · gᵀ dropout(x) (r, in).
        let mut db = vec![T::default(); n * r];
        gemm_into((n, r, t), &mut db, false, scale, dy, (1, n), &u, (r, 1));
        let mut da = vec![T::default(); r * k];
        gemm_into((r, k, t), &mut da, false, scale, &g, (1, r), xd, (k, 1));
        if !need_dx {
            return (None, da, db);
        }
        // dx = dy W + scale · (g A) ⊙ mask: (t, out) · (out, in), then (t, r) · (r, in).
        let mut dx = T::packed_product(dy, t, &self.weight, Product::Plain).unwrap_or_else(|| {
            let mut dx = vec![T::default(); t * k];
            let one = T::from_f64(1.0);
            gemm_into((t, k, n), &mut dx, false, one, dy, (n, 1), w, (k, 1));
            dx
        });
        match mask {
            None => gemm_into((t, k, r), &mut dx, true, scale, &g, (r, 1), a, (k, 1)),
            Some(mask) => {
                let mut ga = vec![T::default(); t * k];
                gemm_into((t, k, r), &mut ga, false, scale, &g, (r, 1), a, (k, 1));
                for ((acc, v), f) in dx.iter_mut().zip(ga).zip(mask) {
                    *acc += v * f;
                }
            }
        }
        (Some(dx), da, db)
    }
}

/// `(dx, dA, dB)` of one [`LoraLinear`] call, `dx` only when `x` needs one.
type LoraGrads<T> = (Option<Vec<T>>, Vec<T>, Vec<T>);

/// `(t, in, r, out)` of one [`LoraLinear`] call.
type Dims = (usize, usize, usize, usize);

/// The values of a CPU storage's `data` under `layout`, which must be contiguous (the ops
/// make their inputs contiguous before they are applied); `what` names the operand in the
/// error.
pub(crate) fn contiguous_values<'a, T>(
    data: &'a [T],
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

impl LoraLinear {
    fn dims(&self, x: &Layout, a: &Layout) -> candle_core::Result<Dims> {
        let (t, k) = x.shape().dims2()?;
        let (r, _) = a.shape().dims2()?;
        let (n, _) = self.weight.tensor().dims2()?;
        Ok((t, k, r, n))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        let dims = self.dims(l1, l2)?;
        let (w_storage, w_layout) = self.weight.tensor().storage_and_layout();
        let candle_core::Storage::Cpu(w_storage) = &*w_storage else {
            candle_core::bail!("lora-linear: CPU only");
        };
        let y = match (w_storage, s1, s2, s3) {
            (CpuStorage::F32(w), CpuStorage::F32(x), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.forward(
                    contiguous_values(w, w_layout, "lora-linear: W")?,
                    contiguous_values(x, l1, "lora-linear: x")?,
                    contiguous_values(a, l2, "lora-linear: A")?,
                    contiguous_values(b, l3, "lora-linear: B")?,
                    dims,
                ))
            }
            (CpuStorage::F64(w), CpuStorage::F64(x), CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.forward(
                    contiguous_values(w, w_layout, "lora-linear: W")?,
                    contiguous_values(x, l1, "lora-linear: x")?,
                    contiguous_values(a, l2, "lora-linear: A")?,
                    contiguous_values(b, l3, "lora-linear: B")?,
                    dims,
                ))
            }
            _ => candle_core::bail!("lora-linear: x, W, A, B all f32 or all f64"),
        };
        Ok((y, Shape::from((dims.0, dims.3))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (t, k) = x.dims2()?;
        let (r, _) = a.dims2()?;
        let (n, _) = self.weight.tensor().dims2()?;
        let dims = (t, k, r, n);
        fn grads<T: Real>(
            op: &LoraLinear,
            [w, x, a, b, dy]: [&Tensor; 5],
            dims: Dims,
            need_dx: bool,
        ) -> candle_core::Result<LoraGrads<T>> {
            // Read in place: a copy of W per call was the size of the model per sequence.
            let dy = dy.contiguous()?;
            let guards = [w, x, a, b, &dy].map(|t| t.storage_and_layout());
            let mut slices = Vec::with_capacity(5);
            for (storage, layout) in &guards {
                let candle_core::Storage::Cpu(cpu) = &**storage else {
                    candle_core::bail!("lora-linear: CPU only");
                };
                slices.push(contiguous_values(
                    T::cpu_storage_as_slice(cpu)?,
                    layout,
                    "lora-linear: gradient input",
                )?);
            }
            let [w, x, a, b, dy] = slices[..] else {
                unreachable!("five slices for five tensors")
            };
            Ok(op.backward(w, x, a, b, dy, dims, need_dx))
        }
        let tensors = [self.weight.tensor(), x, a, b, grad_res];
        let dev = x.device();
        let need_dx = x.track_op();
        let (dx, da, db) = match x.dtype() {
            candle_core::DType::F32 => {
                let (dx, da, db) = grads::<f32>(self, tensors, dims, need_dx)?;
                (
                    dx.map(|dx| Tensor::from_vec(dx, (t, k), dev)).transpose()?,
                    Tensor::from_vec(da, (r, k), dev)?,
                    Tensor::from_vec(db, (n, r), dev)?,
                )
            }
            candle_core::DType::F64 => {
                let (dx, da, db) = grads::<f64>(self, tensors, dims, need_dx)?;
                (
                    dx.map(|dx| Tensor::from_vec(dx, (t, k), dev)).transpose()?,
                    Tensor::from_vec(da, (r, k), dev)?,
                    Tensor::from_vec(db, (n, r), dev)?,
                )
            }
            other => candle_core::bail!("lora-linear: {other:?} gradients"),
        };
        Ok((dx, Some(da), Some(db)))
    }
}

struct FrozenLinear {
    /// `(out, in)`, contiguous.
    weight: Tensor,
}

/// Threads for a `(m, k) · (k, n)` product: rayon's when both output sides are at least
/// [`PARALLEL_MIN_SIDE`] and the product is large; one thread for the LoRA branch's rank-`r`
/// products, where splitting costs more than it saves.
fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m.min(n) >= PARALLEL_MIN_SIDE && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// The smallest output side worth splitting across threads.
const PARALLEL_MIN_SIDE: usize = 32;

/// `dst (m, n) = lhs (m, k) · rhs(n, k)ᵀ`, all row-major and contiguous.
fn gemm_nt<T: Real>(lhs: &[T], rhs: &[T], m: usize, n: usize, k: usize) -> Vec<T> {
    let mut dst = vec![T::default(); m * n];
    gemm_into(
        (m, n, k),
        &mut dst,
        false,
        T::from_f64(1.0),
        lhs,
        (k, 1),
        rhs,
        (1, k),
    );
    dst
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (n, _) = self.weight.dims2()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-linear: input must be contiguous");
        };
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(w_storage) = &*w_storage else {
            candle_core::bail!("frozen-linear: CPU only");
        };
        let Some((ws, we)) = w_layout.contiguous_offsets() else {
            candle_core::bail!("frozen-linear: weight must be contiguous");
        };
        let out = match (storage, w_storage) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(gemm_nt(&x[start..end], &w[ws..we], m, n, k))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                CpuStorage::F64(gemm_nt(&x[start..end], &w[ws..we], m, n, k))
            }
            _ => candle_core::bail!("frozen-linear: f32 or f64 input and weight of one dtype"),
        };
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // dL/dx (m, k) = dL/dy (m, n) · W (n, k).
        Ok(Some(grad_res.contiguous()?.matmul(&self.weight)?))
    }
}

/// Softmax over the last dimension, `exp(x - max) / sum(exp(x - max))`; the max is
/// detached (it cancels out of the value, so it needs no gradient).
///
/// # Errors
/// Shape errors only.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(candle_core::D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(candle_core::D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f64) -> bool {
        let d = (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_dtype(candle_core::DType::F64))
            .and_then(|d| d.to_scalar::<f64>())
            .expect("diff");
        d <= tol
    }

    #[test]
    fn frozen_linear_matches_matmul_and_backprops_into_x_only() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 7), &dev).expect("x")).expect("var");
        let w = Tensor::randn(0f32, 1.0, (3, 7), &dev).expect("w");
        let y = frozen_linear(x.as_tensor(), &w).expect("y");
        let reference = x.as_tensor().matmul(&w.t().expect("t")).expect("mm");
        assert!(close(&y, &reference, 1e-5));
        let grads = y.sum_all().expect("sum").backward().expect("backward");
        let gx = grads.get(x.as_tensor()).expect("x has a gradient");
        // d sum(x Wᵀ) / dx = 1 · W, the same for every row.
        let expected = Tensor::ones((5, 3), candle_core::DType::F32, &dev)
            .and_then(|o| o.matmul(&w))
            .expect("expected");
        assert!(close(gx, &expected, 1e-5));
        assert!(grads.get(&w).is_none());
    }

    /// Central finite differences of `L = sum(c ⊙ lora_linear(x, W, A, B))` in f64 against
    /// the autograd gradients of `A`, `B` and `x`.
    #[test]
    fn lora_linear_gradients_match_finite_differences() {
        use candle_core::DType;
        let dev = Device::Cpu;
        let randn = |shape: (usize, usize)| Tensor::randn(0f64, 1.0, shape, &dev).expect("randn");
        let (t, inp, out, r, scale) = (3, 6, 5, 2, 1.5);
        let x = Var::from_tensor(&randn((t, inp))).expect("x");
        let w = randn((out, inp));
        let frozen = FrozenWeight::new(&w).expect("w");
        let a = Var::from_tensor(&randn((r, inp))).expect("a");
        let b = Var::from_tensor(&randn((out, r))).expect("b");
        let c = randn((t, out));
        let loss = |x: &Tensor, a: &Tensor, b: &Tensor| -> f64 {
            lora_linear(x, &frozen, a, b, scale, None)
                .and_then(|y| Ok((y * &c)?.sum_all()?.to_scalar::<f64>()?))
                .expect("loss")
        };
        let y = lora_linear(
            x.as_tensor(),
            &frozen,
            a.as_tensor(),
            b.as_tensor(),
            scale,
            None,
        )
        .expect("y");
        let grads = (y * &c)
            .and_then(|p| p.sum_all())
            .expect("L")
            .backward()
            .expect("bwd");
        let h = 1e-6;
        for var in [&x, &a, &b] {
            let g = grads
                .get(var.as_tensor())
                .expect("gradient")
                .flatten_all()
                .expect("flat");
            let g = g.to_vec1::<f64>().expect("vec");
            let base = var
                .as_tensor()
                .flatten_all()
                .and_then(|f| f.to_vec1::<f64>())
                .expect("v");
            let shape = var.as_tensor().shape().clone();
            for i in 0..base.len() {
                let mut plus = base.clone();
                let mut minus = base.clone();
                plus[i] += h;
                minus[i] -= h;
                let at = |v: Vec<f64>| Tensor::from_vec(v, shape.clone(), &dev).expect("t");
                let (lp, lm) = if std::ptr::eq(var, &x) {
                    (
                        loss(&at(plus), a.as_tensor(), b.as_tensor()),
                        loss(&at(minus), a.as_tensor(), b.as_tensor()),
                    )
                } else if std::ptr::eq(var, &a) {
                    (
                        loss(x.as_tensor(), &at(plus), b.as_tensor()),
                        loss(x.as_tensor(), &at(minus), b.as_tensor()),
                    )
                } else {
                    (
                        loss(x.as_tensor(), a.as_tensor(), &at(plus)),
                        loss(x.as_tensor(), a.as_tensor(), &at(minus)),
                    )
                };
                let numeric = (lp - lm) / (2.0 * h);
                assert!(
                    (numeric - g[i]).abs() <= 1e-6 * (1.0 + numeric.abs()),
                    "element {i}: finite difference {numeric}, autograd {}",
                    g[i]
                );
            }
        }
        assert_eq!(w.dtype(), DType::F64);
    }

    /// With dropout, the fused op's output and its gradients of `x`, `A` and `B` equal the
    /// op-by-op formula `x Wᵀ + scale · ((x ⊙ mask) Aᵀ) Bᵀ` on candle's autograd, with the
    /// mask from [`Dropout::mask`]; the mask keeps about `1 - p` of the elements.
    #[test]
    fn lora_linear_with_dropout_equals_the_op_by_op_formula() {
        let dev = Device::Cpu;
        let randn = |shape: (usize, usize)| Tensor::randn(0f64, 1.0, shape, &dev).expect("randn");
        let (t, inp, out, r, scale) = (37, 24, 20, 4, 2.0);
        let x = Var::from_tensor(&randn((t, inp))).expect("x");
        let w = randn((out, inp));
        let a = Var::from_tensor(&randn((r, inp))).expect("a");
        let b = Var::from_tensor(&randn((out, r))).expect("b");
        let c = randn((t, out));
        let dropout = Dropout { seed: 7, p: 0.25 };
        let mask = dropout.mask(t * inp);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.25).abs() < 0.05, "{dropped}");
        assert!(mask
            .iter()
            .all(|&m| m == 0.0 || (m - 1.0 / 0.75).abs() < 1e-12));
        let mask = Tensor::from_vec(mask, (t, inp), &dev).expect("mask");

        let fused = lora_linear(
            x.as_tensor(),
            &FrozenWeight::new(&w).expect("w"),
            a.as_tensor(),
            b.as_tensor(),
            scale,
            Some(dropout),
        )
        .expect("fused");
        let reference = (x.as_tensor().matmul(&w.t().expect("t")).expect("xw")
            + ((x.as_tensor() * &mask).expect("xd"))
                .matmul(&a.as_tensor().t().expect("t"))
                .and_then(|u| u.matmul(&b.as_tensor().t()?))
                .and_then(|d| d * scale)
                .expect("delta"))
        .expect("reference");
        assert!(close(&fused, &reference, 1e-10));
        let grads = |y: &Tensor| {
            (y * &c)
                .and_then(|p| p.sum_all())
                .and_then(|l| l.backward())
                .expect("backward")
        };
        let (gf, gr) = (grads(&fused), grads(&reference));
        for var in [&x, &a, &b] {
            let f = gf.get(var.as_tensor()).expect("fused gradient");
            let r = gr.get(var.as_tensor()).expect("reference gradient");
            assert!(close(f, r, 1e-10), "{:?}", var.as_tensor().dims());
        }
        // Another seed, another mask.
        assert_ne!(
            Dropout { seed: 8, p: 0.25 }.mask(64),
            Dropout { seed: 7, p: 0.25 }.mask(64)
        );
    }

    /// An input that tracks no gradient (the first layer's) gets none, and `A` and `B` get
    /// the same gradients as when it does.
    #[test]
    fn lora_linear_skips_dx_for_an_input_without_gradient() {
        let dev = Device::Cpu;
        let randn = |shape: (usize, usize)| Tensor::randn(0f64, 1.0, shape, &dev).expect("randn");
        let (x, w, c) = (randn((9, 6)), randn((5, 6)), randn((9, 5)));
        let a = Var::from_tensor(&randn((2, 6))).expect("a");
        let b = Var::from_tensor(&randn((5, 2))).expect("b");
        let dropout = Some(Dropout { seed: 3, p: 0.2 });
        let w = FrozenWeight::new(&w).expect("w");
        let grads = |x: &Tensor| {
            let y = lora_linear(x, &w, a.as_tensor(), b.as_tensor(), 2.0, dropout).expect("y");
            (y * &c)
                .and_then(|p| p.sum_all()?.backward())
                .expect("backward")
        };
        let x_var = Var::from_tensor(&x).expect("x");
        let (tracked, plain) = (grads(x_var.as_tensor()), grads(&x));
        assert!(tracked.get(x_var.as_tensor()).is_some());
        assert!(plain.get(&x).is_none());
        for v in [&a, &b] {
            let (g1, g2) = (
                tracked.get(v.as_tensor()).expect("tracked"),
                plain.get(v.as_tensor()).expect("plain"),
            );
            assert!(close(g1, g2, 0.0));
        }
    }

    /// In f32 (the packed AVX-512 kernel for `x Wᵀ` and `dy W` where the CPU has it, the
    /// `gemm` crate elsewhere) the op and its gradients equal the f64 op (the `gemm` crate)
    /// up to f32 rounding. Shapes leave partial register tiles and panels.
    #[test]
    fn lora_linear_in_f32_matches_f64() {
        use candle_core::DType;
        let dev = Device::Cpu;
        let randn = |shape: (usize, usize)| Tensor::randn(0f64, 1.0, shape, &dev).expect("randn");
        let (t, inp, out, r) = (29, 40, 50, 4);
        let [x, w, a, b, c] = [(t, inp), (out, inp), (r, inp), (out, r), (t, out)].map(randn);
        let dropout = Some(Dropout { seed: 11, p: 0.1 });
        let run = |dtype: DType| {
            let cast = |v: &Tensor| v.to_dtype(dtype).expect("cast");
            let [x, a, b] = [&x, &a, &b].map(|v| Var::from_tensor(&cast(v)).expect("var"));
            let frozen = FrozenWeight::new(&cast(&w)).expect("w");
            let y = lora_linear(
                x.as_tensor(),
                &frozen,
                a.as_tensor(),
                b.as_tensor(),
                2.0,
                dropout,
            )
            .expect("y");
            let grads = (&y * &cast(&c))
                .and_then(|p| p.sum_all()?.backward())
                .expect("backward");
            let to64 = |v: &Tensor| v.to_dtype(DType::F64).expect("f64");
            let mut all = vec![to64(&y)];
            for v in [&x, &a, &b] {
                all.push(to64(grads.get(v.as_tensor()).expect("gradient")));
            }
            all
        };
        let (single, double) = (run(DType::F32), run(DType::F64));
        for (i, (s, d)) in single.iter().zip(&double).enumerate() {
            // Sums of up to 50 products of unit normals (y, dx) and up to 29 x 50 (dA, dB):
            // f32 keeps them to a few 1e-5 absolute.
            assert!(close(s, d, 1e-3), "output {i} (y, dx, dA, dB)");
        }
    }

    #[test]
    fn softmax_matches_candle_fused_kernel() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (4, 16), &dev).expect("x");
        let fused = candle_nn::ops::softmax_last_dim(&x).expect("fused");
        assert!(close(&softmax_last_dim(&x).expect("ours"), &fused, 1e-6));
    }
}
