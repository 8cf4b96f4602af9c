//! Differentiable building blocks for the training forward pass.
//!
//! candle's autograd silently drops gradients through `QMatMul` and through the fused
//! `candle_nn` kernels (`rms_norm`, `softmax_last_dim`, `rope`/`rope_i`, `layer_norm`): they
//! have no backward, and a graph through them simply stops tracking. Everything here is either
//! written with elementary candle ops that have a backward (`sqr`, `mean_keepdim`, `sqrt`,
//! `recip`, `exp`, `broadcast_*`, `narrow`, `cat`, `matmul`) or is a custom op with an
//! explicit backward ([`frozen_linear`]).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::Result;

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
        return Err(candle_core::Error::Msg(format!(
            "frozen_linear: x {:?} {:?} against weight {:?} {:?}",
            x.dims(),
            x.dtype(),
            weight.dims(),
            weight.dtype()
        ))
        .into());
    }
    let op = FrozenLinear {
        weight: weight.contiguous()?,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// A projection with a LoRA branch (Hu et al. 2021, eq. 3):
/// `y = x Wᵀ + scale · (x Aᵀ) Bᵀ` with the frozen `W: (out, in)`, `A: (r, in)`,
/// `B: (out, r)`; `x: (t, in)` -> `(t, out)`. `x_lora` is the input of the LoRA branch (`x`
/// itself, or `x` after dropout).
///
/// # Errors
/// Shape or dtype mismatches.
pub fn lora_linear(
    x: &Tensor,
    x_lora: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let y = frozen_linear(x, weight)?;
    let delta = x_lora.matmul(&a.t()?)?.matmul(&b.t()?)?;
    Ok((y + (delta * scale)?)?)
}

struct FrozenLinear {
    /// `(out, in)`, contiguous.
    weight: Tensor,
}

/// `dst (m, n) = lhs (m, k) · rhs(n, k)ᵀ`, all row-major and contiguous.
fn gemm_nt<T: 'static + Copy + Default + num_one::One>(
    lhs: &[T],
    rhs: &[T],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<T> {
    let mut dst = vec![T::default(); m * n];
    let threads = rayon::current_num_threads();
    let parallelism = if m * n * k >= 1 << 18 && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices hold m*k, n*k and m*n elements and the strides below stay inside
    // them: lhs row stride k, rhs read transposed (element (kk, j) at j*k + kk), dst row
    // stride n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            k as isize,
            1,
            T::default(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
    dst
}

mod num_one {
    pub trait One {
        fn one() -> Self;
    }
    impl One for f32 {
        fn one() -> Self {
            1.0
        }
    }
    impl One for f64 {
        fn one() -> Self {
            1.0
        }
    }
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

/// RMSNorm, `x / sqrt(mean(x²) + eps) * w`, over the last dimension of `x: (.., hidden)`
/// with `w: (hidden,)` (Zhang & Sennrich 2019; the llama definition).
///
/// # Errors
/// Shape errors only.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let rms = (x.sqr()?.mean_keepdim(candle_core::D::Minus1)? + eps)?.sqrt()?;
    Ok(x.broadcast_div(&rms)?.broadcast_mul(weight)?)
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

/// Rotary position embedding on interleaved pairs `(2i, 2i + 1)` (llama.cpp's "normal"
/// RoPE, the layout of GGUF q/k weights): `x: (heads, t, d)`, `cos`/`sin: (t, d / 2)` for the
/// tokens' positions. `out[2i] = x[2i] cos_i - x[2i+1] sin_i`,
/// `out[2i+1] = x[2i] sin_i + x[2i+1] cos_i` (Su et al. 2021, RoFormer, eq. 34).
///
/// # Errors
/// Shape errors only (`d` must be even).
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (h, t, d) = x.dims3()?;
    let pairs = x.reshape((h, t, d / 2, 2))?;
    let x0 = pairs.narrow(3, 0, 1)?;
    let x1 = pairs.narrow(3, 1, 1)?;
    let cos = cos.reshape((1, t, d / 2, 1))?;
    let sin = sin.reshape((1, t, d / 2, 1))?;
    let out0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let out1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Ok(Tensor::cat(&[out0, out1], 3)?.reshape((h, t, d))?)
}

/// Rotary position embedding on the two halves `(i, i + d / 2)` (llama.cpp's NeoX RoPE,
/// used by Qwen2 and Gemma 3, whose GGUF q/k rows are not permuted): `x: (heads, t, d)`,
/// `cos`/`sin: (t, d / 2)`. `out[i] = x[i] cos_i - x[i + d/2] sin_i`,
/// `out[i + d/2] = x[i] sin_i + x[i + d/2] cos_i` (Su et al. 2021, RoFormer, eq. 34, with
/// GPT-NeoX's pairing).
///
/// # Errors
/// Shape errors only (`d` must be even).
pub fn rope_neox(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (h, t, d) = x.dims3()?;
    let x0 = x.narrow(2, 0, d / 2)?;
    let x1 = x.narrow(2, d / 2, d / 2)?;
    let cos = cos.reshape((1, t, d / 2))?;
    let sin = sin.reshape((1, t, d / 2))?;
    let out0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let out1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Ok(Tensor::cat(&[out0, out1], 2)?.reshape((h, t, d))?)
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
        let a = Var::from_tensor(&randn((r, inp))).expect("a");
        let b = Var::from_tensor(&randn((out, r))).expect("b");
        let c = randn((t, out));
        let loss = |x: &Tensor, a: &Tensor, b: &Tensor| -> f64 {
            lora_linear(x, x, &w, a, b, scale)
                .and_then(|y| Ok((y * &c)?.sum_all()?.to_scalar::<f64>()?))
                .expect("loss")
        };
        let y = lora_linear(
            x.as_tensor(),
            x.as_tensor(),
            &w,
            a.as_tensor(),
            b.as_tensor(),
            scale,
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

    #[test]
    fn rms_norm_and_softmax_match_candle_fused_kernels() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (4, 16), &dev).expect("x");
        let w = Tensor::randn(1f32, 0.1, 16, &dev).expect("w");
        let fused = candle_nn::ops::rms_norm(&x, &w, 1e-5).expect("fused");
        assert!(close(&rms_norm(&x, &w, 1e-5).expect("ours"), &fused, 1e-5));
        let fused = candle_nn::ops::softmax_last_dim(&x).expect("fused");
        assert!(close(&softmax_last_dim(&x).expect("ours"), &fused, 1e-6));
    }

    #[test]
    fn neox_rope_matches_candle_rope_and_backprops() {
        let dev = Device::Cpu;
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, 8), &dev).expect("x")).expect("var");
        // Real rotations (cos² + sin² = 1), so that the gradient is known in closed form.
        let angles = Tensor::randn(0f32, 3.0, (5, 4), &dev).expect("angles");
        let (cos, sin) = (angles.cos().expect("cos"), angles.sin().expect("sin"));
        let fused =
            candle_nn::rotary_emb::rope(&x.as_tensor().unsqueeze(0).expect("4d"), &cos, &sin)
                .and_then(|t| t.squeeze(0))
                .expect("fused");
        let ours = rope_neox(x.as_tensor(), &cos, &sin).expect("ours");
        assert!(close(&ours, &fused, 1e-5));
        // y = R x with R orthogonal: d sum(y²) / dx = 2 Rᵀ R x = 2 x.
        let grads = ours
            .sqr()
            .and_then(|s| s.sum_all())
            .expect("L")
            .backward()
            .expect("bwd");
        let g = grads.get(x.as_tensor()).expect("x has a gradient");
        assert!(close(g, &(x.as_tensor() * 2.0).expect("2x"), 1e-4));
    }

    #[test]
    fn rope_matches_candle_rope_i() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 5, 8), &dev).expect("x");
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev).expect("cos");
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev).expect("sin");
        let fused = candle_nn::rotary_emb::rope_i(&x.unsqueeze(0).expect("4d"), &cos, &sin)
            .and_then(|t| t.squeeze(0))
            .expect("fused");
        assert!(close(
            &rope_interleaved(&x, &cos, &sin).expect("ours"),
            &fused,
            1e-5
        ));
    }
}
