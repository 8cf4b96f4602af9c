//! The elementwise layers of the training forward pass as single candle ops with their own
//! backward: RMSNorm, rotary position embedding and the gated FFN activation.
//!
//! Written with elementary candle ops (see the references in the tests), each was five to
//! ten passes over its input forward, as many temporaries kept for the backward, and twice
//! that backward; together a quarter of a 768-token training step on two cores. Each op here
//! is one pass forward and one backward, and keeps only its inputs. The frozen weights and
//! tables are fields of the op, not arguments, so they get no gradient.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use crate::ops::{contiguous_values, mismatch};
use crate::real::Real;
use crate::Result;

/// The contiguous values of a storage, f32 or f64; `what` names the operand in the error.
fn slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    contiguous_values(T::cpu_storage_as_slice(s)?, l, what)
}

/// The values of a tensor (copied), row-major.
fn values<T: candle_core::WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// Runs `f32` or `f64` according to the storage's dtype.
macro_rules! by_dtype {
    ($storage:expr, $op:literal, |$t:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(_) => {
                type $t = f32;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!(concat!($op, ": f32 or f64 only")),
        }
    };
}

/// A tensor from values shaped as `like`.
fn tensor_like<T: candle_core::WithDType>(v: Vec<T>, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, like.shape(), like.device())
}

// ---------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------

/// RMSNorm, `x / sqrt(mean(x²) + eps) ⊙ w`, over the last dimension of `x: (.., hidden)`
/// with the frozen `w: (hidden,)` (Zhang & Sennrich 2019; the llama definition); f32 or f64.
/// Backward: with `r = 1 / sqrt(mean(x²) + eps)`, `n = x r` and `g = dy ⊙ w`,
/// `dx = r (g - n · mean(g ⊙ n))`.
///
/// # Errors
/// A weight whose length is not the last dimension, or another dtype than `x`'s.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let hidden = x.dims().last().copied().unwrap_or(0);
    if weight.dims() != [hidden] || weight.dtype() != x.dtype() {
        return Err(mismatch(format!(
            "rms_norm: x {:?} {:?}, weight {:?} {:?}",
            x.dims(),
            x.dtype(),
            weight.dims(),
            weight.dtype()
        )));
    }
    let op = RmsNorm {
        weight: weight.contiguous()?,
        eps,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn inverse_rms<T: Real>(&self, row: &[T]) -> T {
        let ms = row.iter().fold(T::default(), |a, &v| a + v * v) / T::from_f64(row.len() as f64);
        T::from_f64(1.0) / (ms + T::from_f64(self.eps)).sqrt()
    }

    fn forward<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks(w.len()) {
            let r = self.inverse_rms(row);
            y.extend(row.iter().zip(w).map(|(&v, &wi)| v * r * wi));
        }
        y
    }

    fn backward<T: Real>(&self, x: &[T], w: &[T], dy: &[T]) -> Vec<T> {
        let hidden = w.len();
        let mut dx = Vec::with_capacity(x.len());
        for (row, drow) in x.chunks(hidden).zip(dy.chunks(hidden)) {
            let r = self.inverse_rms(row);
            let gn = row
                .iter()
                .zip(drow)
                .zip(w)
                .fold(T::default(), |a, ((&v, &d), &wi)| a + d * wi * v * r);
            let mean = gn / T::from_f64(hidden as f64);
            dx.extend(
                row.iter()
                    .zip(drow)
                    .zip(w)
                    .map(|((&v, &d), &wi)| r * (d * wi - v * r * mean)),
            );
        }
        dx
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_dtype!(s, "rms-norm", |T| self
            .forward::<T>(slice(s, l, "rms-norm: input")?, &values::<T>(&self.weight)?));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = match x.dtype() {
            candle_core::DType::F32 => tensor_like(
                self.backward::<f32>(&values(x)?, &values(&self.weight)?, &values(dy)?),
                x,
            )?,
            candle_core::DType::F64 => tensor_like(
                self.backward::<f64>(&values(x)?, &values(&self.weight)?, &values(dy)?),
                x,
            )?,
            other => candle_core::bail!("rms-norm: {other:?} gradients"),
        };
        Ok(Some(dx))
    }
}

// ---------------------------------------------------------------------------------------
// Rotary position embedding
// ---------------------------------------------------------------------------------------

/// Which dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopePairs {
    /// `(2i, 2i + 1)`: llama.cpp's "normal" RoPE, the layout of llama GGUF q/k weights.
    Interleaved,
    /// `(i, i + d / 2)`: GPT-NeoX's pairing, used by Qwen2 and Gemma 3.
    Neox,
}

/// Rotary position embedding (Su et al. 2021, RoFormer, eq. 34) of `x: (heads, t, d)` under
/// each of `tables` (`cos`/`sin: (t, d / 2)`, the angles of the tokens' positions), side by
/// side: `(heads, t, d · tables.len())`. Per pair `(a, b)`,
/// `out_a = x_a cos - x_b sin`, `out_b = x_a sin + x_b cos`; the backward rotates back by
/// the same angles and sums over the tables. Two tables serve block attention (real and
/// canonical positions, see `attention.rs`).
///
/// # Errors
/// `d` odd, tables of another shape or dtype, no table.
pub fn rope(x: &Tensor, tables: &[(&Tensor, &Tensor)], pairs: RopePairs) -> Result<Tensor> {
    let (_, t, d) = x.dims3()?;
    let bad = tables.is_empty()
        || d % 2 == 1
        || tables.iter().any(|(c, s)| {
            c.dims() != [t, d / 2]
                || s.dims() != [t, d / 2]
                || c.dtype() != x.dtype()
                || s.dtype() != x.dtype()
        });
    if bad {
        return Err(mismatch(format!(
            "rope: x {:?} {:?} against {} tables of {:?}",
            x.dims(),
            x.dtype(),
            tables.len(),
            tables.first().map(|(c, _)| c.dims().to_vec())
        )));
    }
    let op = Rope {
        tables: tables
            .iter()
            .map(|(c, s)| Ok(((*c).contiguous()?, (*s).contiguous()?)))
            .collect::<candle_core::Result<_>>()?,
        pairs,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

struct Rope {
    tables: Vec<(Tensor, Tensor)>,
    pairs: RopePairs,
}

impl Rope {
    /// The pair indices `(a, b)` of pair `j` of a `d`-wide row.
    fn pair(&self, j: usize, d: usize) -> (usize, usize) {
        match self.pairs {
            RopePairs::Interleaved => (2 * j, 2 * j + 1),
            RopePairs::Neox => (j, j + d / 2),
        }
    }

    fn tables<T: candle_core::WithDType>(&self) -> candle_core::Result<Vec<(Vec<T>, Vec<T>)>> {
        self.tables
            .iter()
            .map(|(c, s)| Ok((values(c)?, values(s)?)))
            .collect()
    }

    fn forward<T: Real>(
        &self,
        x: &[T],
        (h, t, d): (usize, usize, usize),
    ) -> candle_core::Result<Vec<T>> {
        let tables = self.tables::<T>()?;
        let width = d * tables.len();
        let mut out = vec![T::default(); h * t * width];
        for (row, (src, dst)) in x.chunks(d).zip(out.chunks_mut(width)).enumerate() {
            let i = row % t;
            for (k, (cos, sin)) in tables.iter().enumerate() {
                let dst = &mut dst[k * d..(k + 1) * d];
                for j in 0..d / 2 {
                    let (a, b) = self.pair(j, d);
                    let (c, s) = (cos[i * d / 2 + j], sin[i * d / 2 + j]);
                    dst[a] = src[a] * c - src[b] * s;
                    dst[b] = src[a] * s + src[b] * c;
                }
            }
        }
        Ok(out)
    }

    fn backward<T: Real>(
        &self,
        dy: &[T],
        (h, t, d): (usize, usize, usize),
    ) -> candle_core::Result<Vec<T>> {
        let tables = self.tables::<T>()?;
        let width = d * tables.len();
        let mut dx = vec![T::default(); h * t * d];
        for (row, (dst, src)) in dx.chunks_mut(d).zip(dy.chunks(width)).enumerate() {
            let i = row % t;
            for (k, (cos, sin)) in tables.iter().enumerate() {
                let src = &src[k * d..(k + 1) * d];
                for j in 0..d / 2 {
                    let (a, b) = self.pair(j, d);
                    let (c, s) = (cos[i * d / 2 + j], sin[i * d / 2 + j]);
                    dst[a] += src[a] * c + src[b] * s;
                    dst[b] += src[b] * c - src[a] * s;
                }
            }
        }
        Ok(dx)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims3()?;
        let out = by_dtype!(s, "rope", |T| self
            .forward::<T>(slice(s, l, "rope: input")?, dims)?);
        Ok((
            out,
            Shape::from((dims.0, dims.1, dims.2 * self.tables.len())),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dims = x.dims3()?;
        let dx = match x.dtype() {
            candle_core::DType::F32 => tensor_like(self.backward::<f32>(&values(dy)?, dims)?, x)?,
            candle_core::DType::F64 => tensor_like(self.backward::<f64>(&values(dy)?, dims)?, x)?,
            other => candle_core::bail!("rope: {other:?} gradients"),
        };
        Ok(Some(dx))
    }
}

// ---------------------------------------------------------------------------------------
// Gated FFN activation
// ---------------------------------------------------------------------------------------

/// The activation of a gated FFN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// SwiGLU: `silu(x) = x σ(x)` (llama, qwen2).
    Silu,
    /// GeGLU with the tanh approximation of GELU,
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (Gemma; candle's `gelu`).
    GeluTanh,
}

/// `act(gate) ⊙ up` for two tensors of one shape (Shazeer 2020, "GLU Variants Improve
/// Transformer"); f32 or f64. Backward: `d_gate = dy ⊙ up ⊙ act'(gate)`,
/// `d_up = dy ⊙ act(gate)`.
///
/// # Errors
/// Shapes or dtypes that differ.
pub fn glu(gate: &Tensor, up: &Tensor, act: Gate) -> Result<Tensor> {
    if gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        return Err(mismatch(format!(
            "glu: gate {:?} {:?}, up {:?} {:?}",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        )));
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, Glu(act))?)
}

struct Glu(Gate);

impl Glu {
    /// `(act(x), act'(x))`.
    fn act<T: Real>(&self, x: T) -> (T, T) {
        let one = T::from_f64(1.0);
        match self.0 {
            Gate::Silu => {
                let s = one / (one + (-x).exp());
                (x * s, s * (one + x * (one - s)))
            }
            Gate::GeluTanh => {
                let (c, a, half) = (
                    T::from_f64((2.0 / std::f64::consts::PI).sqrt()),
                    T::from_f64(0.044715),
                    T::from_f64(0.5),
                );
                let th = (c * (x + a * x * x * x)).tanh();
                let dinner = c * (one + T::from_f64(3.0) * a * x * x);
                (
                    half * x * (one + th),
                    half * (one + th) + half * x * (one - th * th) * dinner,
                )
            }
        }
    }
}

impl CustomOp2 for Glu {
    fn name(&self) -> &'static str {
        "glu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_dtype!(s1, "glu", |T| {
            let (g, u) = (
                slice::<T>(s1, l1, "glu: gate")?,
                slice::<T>(s2, l2, "glu: up")?,
            );
            g.iter().zip(u).map(|(&g, &u)| self.act(g).0 * u).collect()
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        fn grads<T: Real>(op: &Glu, g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
            g.iter()
                .zip(u)
                .zip(dy)
                .map(|((&g, &u), &d)| {
                    let (a, da) = op.act(g);
                    (d * u * da, d * a)
                })
                .unzip()
        }
        let (dg, du) = match gate.dtype() {
            candle_core::DType::F32 => {
                let (dg, du) = grads::<f32>(self, &values(gate)?, &values(up)?, &values(dy)?);
                (tensor_like(dg, gate)?, tensor_like(du, up)?)
            }
            candle_core::DType::F64 => {
                let (dg, du) = grads::<f64>(self, &values(gate)?, &values(up)?, &values(dy)?);
                (tensor_like(dg, gate)?, tensor_like(du, up)?)
            }
            other => candle_core::bail!("glu: {other:?} gradients"),
        };
        Ok((Some(dg), Some(du)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>())
            .expect("diff")
    }

    fn randn(shape: &[usize], mean: f64) -> Tensor {
        Tensor::randn(mean, 1.0, shape, &Device::Cpu).expect("randn")
    }

    /// Output and input gradients of `fused` and `reference` (candle's autograd over
    /// elementary ops) on the same inputs, under `L = sum(c ⊙ y)`.
    fn assert_same(
        inputs: &[Tensor],
        fused: impl Fn(&[&Tensor]) -> Tensor,
        reference: impl Fn(&[&Tensor]) -> Tensor,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).expect("var"))
            .collect();
        let args: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let (yf, yr) = (fused(&args), reference(&args));
        assert!(max_diff(&yf, &yr) < 1e-12, "output {}", max_diff(&yf, &yr));
        let c = randn(yf.dims(), 0.0);
        let grads = |y: &Tensor| {
            (y * &c)
                .and_then(|p| p.sum_all()?.backward())
                .expect("backward")
        };
        let (gf, gr) = (grads(&yf), grads(&yr));
        for (i, v) in vars.iter().enumerate() {
            let (f, r) = (
                gf.get(v.as_tensor()).expect("fused gradient"),
                gr.get(v.as_tensor()).expect("reference gradient"),
            );
            assert!(max_diff(f, r) < 1e-12, "input {i}: {}", max_diff(f, r));
        }
    }

    #[test]
    fn rms_norm_equals_the_elementary_formula_and_its_gradient() {
        let w = randn(&[16], 1.0);
        let eps = 1e-5;
        assert_same(
            &[randn(&[2, 5, 16], 0.0)],
            |x| rms_norm(x[0], &w, eps).expect("fused"),
            |x| {
                let rms = x[0]
                    .sqr()
                    .and_then(|s| s.mean_keepdim(candle_core::D::Minus1))
                    .and_then(|m| (m + eps)?.sqrt())
                    .expect("rms");
                x[0].broadcast_div(&rms)
                    .and_then(|n| n.broadcast_mul(&w))
                    .expect("reference")
            },
        );
        // And candle's own fused kernel (no backward) in f32.
        let x = randn(&[4, 16], 0.0)
            .to_dtype(candle_core::DType::F32)
            .expect("f32");
        let w = w.to_dtype(candle_core::DType::F32).expect("f32");
        let ours = rms_norm(&x, &w, eps).expect("ours");
        let candle = candle_nn::ops::rms_norm(&x, &w, eps as f32).expect("candle");
        assert!(
            max_diff(
                &ours.to_dtype(candle_core::DType::F64).expect("f64"),
                &candle.to_dtype(candle_core::DType::F64).expect("f64")
            ) < 1e-5
        );
    }

    /// The elementary rotation of one table, as the trainer wrote it before this op.
    fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor, pairs: RopePairs) -> Tensor {
        let (h, t, d) = x.dims3().expect("3-D");
        let (x0, x1, dim) = match pairs {
            RopePairs::Interleaved => {
                let p = x.reshape((h, t, d / 2, 2)).expect("pairs");
                (
                    p.narrow(3, 0, 1).expect("x0"),
                    p.narrow(3, 1, 1).expect("x1"),
                    3,
                )
            }
            RopePairs::Neox => (
                x.narrow(2, 0, d / 2).expect("x0"),
                x.narrow(2, d / 2, d / 2).expect("x1"),
                2,
            ),
        };
        let shape: &[usize] = match pairs {
            RopePairs::Interleaved => &[1, t, d / 2, 1],
            RopePairs::Neox => &[1, t, d / 2],
        };
        let (cos, sin) = (
            cos.reshape(shape).expect("cos"),
            sin.reshape(shape).expect("sin"),
        );
        let out0 =
            (x0.broadcast_mul(&cos).expect("a") - x1.broadcast_mul(&sin).expect("b")).expect("o0");
        let out1 =
            (x0.broadcast_mul(&sin).expect("c") + x1.broadcast_mul(&cos).expect("d")).expect("o1");
        Tensor::cat(&[out0, out1], dim)
            .and_then(|o| o.reshape((h, t, d)))
            .expect("rope")
    }

    /// One and two tables, both pairings, against the elementary rotation (two tables side
    /// by side as the block-attention `cat`), and the interleaved one against candle's
    /// `rope_i` kernel.
    #[test]
    fn rope_equals_the_elementary_rotation_and_its_gradient() {
        let (h, t, d) = (3, 7, 8);
        let tables: Vec<(Tensor, Tensor)> = (0..2)
            .map(|_| {
                let angles = randn(&[t, d / 2], 0.0);
                (angles.cos().expect("cos"), angles.sin().expect("sin"))
            })
            .collect();
        for pairs in [RopePairs::Interleaved, RopePairs::Neox] {
            for n in [1, 2] {
                let refs: Vec<(&Tensor, &Tensor)> =
                    tables[..n].iter().map(|(c, s)| (c, s)).collect();
                assert_same(
                    &[randn(&[h, t, d], 0.0)],
                    |x| rope(x[0], &refs, pairs).expect("fused"),
                    |x| {
                        let parts: Vec<Tensor> = refs
                            .iter()
                            .map(|(c, s)| rope_reference(x[0], c, s, pairs))
                            .collect();
                        Tensor::cat(&parts, 2).expect("cat")
                    },
                );
            }
        }
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32).expect("f32");
        let x = f32(&randn(&[h, t, d], 0.0));
        let (cos, sin) = (f32(&tables[0].0), f32(&tables[0].1));
        let ours = rope(&x, &[(&cos, &sin)], RopePairs::Interleaved).expect("ours");
        let candle = candle_nn::rotary_emb::rope_i(&x.unsqueeze(0).expect("4d"), &cos, &sin)
            .and_then(|t| t.squeeze(0))
            .expect("candle");
        let ours = ours.to_dtype(candle_core::DType::F64).expect("f64");
        assert!(
            max_diff(
                &ours,
                &candle.to_dtype(candle_core::DType::F64).expect("f64")
            ) < 1e-5
        );
    }

    /// SwiGLU against candle's `silu` and its autograd. GeGLU's output against candle's
    /// `gelu`; its derivative against the central finite difference of the formula, since
    /// candle's own `gelu` backward uses six-digit constants (0.797885, 0.0356774) and is
    /// 4e-7 off in f64.
    #[test]
    fn glu_equals_silu_and_gelu_times_up_and_their_gradients() {
        assert_same(
            &[randn(&[5, 12], 0.0), randn(&[5, 12], 0.0)],
            |x| glu(x[0], x[1], Gate::Silu).expect("fused"),
            |x| (x[0].silu().expect("silu") * x[1]).expect("reference"),
        );
        let (g, u) = (randn(&[5, 12], 0.0), randn(&[5, 12], 0.0));
        let ours = glu(&g, &u, Gate::GeluTanh).expect("fused");
        let candle = (g.gelu().expect("gelu") * &u).expect("reference");
        assert!(max_diff(&ours, &candle) < 1e-12);
        let op = Glu(Gate::GeluTanh);
        let h = 1e-6;
        for x in [-4.0, -1.3, -0.2, 0.0, 0.4, 1.7, 3.5f64] {
            let numeric = (op.act(x + h).0 - op.act(x - h).0) / (2.0 * h);
            let analytic = op.act(x).1;
            assert!(
                (numeric - analytic).abs() < 1e-8,
                "{x}: {numeric} vs {analytic}"
            );
        }
    }
}
