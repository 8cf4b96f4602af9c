//! [`FrozenWeight`]: a frozen projection weight `W: (out, in)` and, on CPUs with AVX-512, the
//! own dense GEMM kernels of `ragtune_quant::packed` for the two products training runs on
//! it: `y = x Wᵀ` (forward) and `dx = dy W` (backward); f32 on AVX-512, or bfloat16 on Intel
//! AMX with [`MatmulPrecision::Bf16`].
//!
//! Why not the `gemm` crate, which the rest of the trainer uses: on a stable toolchain it has
//! no AVX-512 kernels (they need its `nightly` feature), so its 8-wide FMA kernel ran at half
//! the width of these CPUs, and it repacked the row-major activations on every call (`perf` on
//! a 768-token run: 42% of the time in its kernel, 15% packing the left operand). Here the
//! weight is packed once, lazily, in the layout the kernel streams, and the activations are
//! read in place.

use std::sync::{Arc, OnceLock};

use candle_core::Tensor;
use ragtune_quant::packed::{amx_available, PackedMatrix, PackedPrecision};

use crate::Result;

/// The arithmetic of the products with frozen weights ([`FrozenWeight`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// f32 operands and f32 sums: the reference.
    #[default]
    F32,
    /// Both operands rounded to bfloat16 (to nearest even; 8 significant bits), the
    /// products summed in f32, as PyTorch's bf16 autocast does for matmuls. Runs on Intel
    /// AMX (`tdpbf16ps`, Sapphire Rapids and later), about 4x the f32 AVX-512 kernel per
    /// core; [`F32`](Self::F32) on other CPUs.
    Bf16,
}

impl MatmulPrecision {
    /// The precision the products run in on this CPU: [`Bf16`](Self::Bf16) only where AMX
    /// is available, [`F32`](Self::F32) otherwise.
    pub fn on_this_cpu(self) -> Self {
        match self {
            Self::Bf16 if amx_available() => Self::Bf16,
            _ => Self::F32,
        }
    }

    /// The name the CLI takes and reports print: `f32`, `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

/// Which product of `W: (out, in)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Product {
    /// `x (t, in) · Wᵀ -> (t, out)`: the forward projection.
    Transposed,
    /// `dy (t, out) · W -> (t, in)`: the gradient of the projection's input.
    Plain,
}

/// A frozen f32 or f64 weight `(out, in)`, contiguous, with packed copies of its two
/// right-hand sides (`Wᵀ` for the forward, `W` for the input gradient) made on first use
/// where a kernel runs (f32, an AVX-512 CPU, `RAGTUNE_SIMD` not below `avx512`), in its
/// [`MatmulPrecision`]. Cloning shares both.
///
/// Memory: the packed copies add twice the weight in the precision's width (SmolLM2-135M's
/// projections in f32: 2 x 0.4 GiB), made only on CPUs that use them.
#[derive(Debug, Clone)]
pub struct FrozenWeight {
    tensor: Tensor,
    precision: MatmulPrecision,
    packed: Arc<OnceLock<Option<Packed>>>,
}

/// The two packed right-hand sides, `Wᵀ: (in, out)` and `W: (out, in)`.
#[derive(Debug)]
struct Packed {
    transposed: PackedMatrix,
    plain: PackedMatrix,
}

impl FrozenWeight {
    /// Wraps `tensor` (`(out, in)`, f32 or f64), made contiguous.
    ///
    /// # Errors
    /// A tensor that is not 2-D; candle's errors from the copy.
    pub fn new(tensor: &Tensor) -> Result<Self> {
        tensor.dims2()?;
        Ok(Self {
            tensor: tensor.contiguous()?,
            precision: MatmulPrecision::F32,
            packed: Arc::new(OnceLock::new()),
        })
    }

    /// The same weight with its products in `precision` (packed anew on first use).
    pub fn with_precision(&self, precision: MatmulPrecision) -> Self {
        Self {
            tensor: self.tensor.clone(),
            precision,
            packed: Arc::new(OnceLock::new()),
        }
    }

    /// The weight, `(out, in)`.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The packed copies, made on the first call; `None` where the kernel does not run.
    fn packed(&self) -> Option<&Packed> {
        self.packed
            .get_or_init(|| {
                let (out, inp) = self.tensor.dims2().ok()?;
                let w = self.tensor.to_vec2::<f32>().ok()?;
                let precision = match self.precision {
                    MatmulPrecision::F32 => PackedPrecision::F32,
                    MatmulPrecision::Bf16 => PackedPrecision::Bf16,
                };
                Some(Packed {
                    transposed: PackedMatrix::pack(inp, out, precision, |p, j| w[j][p])?,
                    plain: PackedMatrix::pack(out, inp, precision, |p, j| w[p][j])?,
                })
            })
            .as_ref()
    }

    /// `x (m, k)` times the weight as `product` says, row-major, through the AVX-512 f32
    /// kernel or the AMX bfloat16 one (the weight's precision, where AMX is available);
    /// `None` where neither runs (see the type). `x` must hold `m` rows of the product's
    /// `k` (`in` for [`Product::Transposed`], `out` for [`Product::Plain`]).
    ///
    /// # Panics
    /// When `x.len() != m * k`.
    pub(crate) fn product(&self, x: &[f32], m: usize, product: Product) -> Option<Vec<f32>> {
        let packed = self.packed()?;
        Some(match product {
            Product::Transposed => packed.transposed.matmul(x, m),
            Product::Plain => packed.plain.matmul(x, m),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use half::bf16;
    use ragtune_util::cpu::SimdLevel;

    /// `a (m, k) · b (k, n)` in f64 of the operands as `seen` makes them, the reference.
    fn reference(
        a: &[f32],
        b: impl Fn(usize, usize) -> f32,
        seen: impl Fn(f32) -> f64,
        (m, k, n): (usize, usize, usize),
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| seen(a[i * k + p]) * seen(b(p, j))).sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Both products in both precisions against an f64 reference on shapes that leave
    /// partial register tiles, AMX tiles and panels: rows not a multiple of 12 or 32,
    /// columns not a multiple of 32 or under 16, `k` not a multiple of 32. The reference
    /// multiplies the operands the kernel sees (for bfloat16, each rounded to nearest
    /// even), so what is left is f32 rounding of a k-term sum of products below 0.25 in
    /// size: k * 2^-24 * k/4 with room (each partial sum is at most k/4, each addition
    /// rounds by half an ulp).
    #[test]
    fn packed_products_match_an_f64_reference() {
        if SimdLevel::active() < SimdLevel::Avx512 {
            eprintln!("skipped: the packed kernels run on AVX-512 CPUs only");
            return;
        }
        let shapes = [
            (40, 24, 13),
            (7, 33, 1),
            (64, 96, 25),
            (576, 192, 12),
            (17, 15, 30),
            (100, 70, 45),
        ];
        for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
            let rounded = precision == MatmulPrecision::Bf16 && amx_available();
            let seen = |v: f32| match rounded {
                true => f64::from(bf16::from_f32(v).to_f32()),
                false => f64::from(v),
            };
            for (out, inp, m) in shapes {
                let w = values(out * inp, (out * 31 + inp) as u64);
                let tensor = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).expect("w");
                let frozen = FrozenWeight::new(&tensor)
                    .expect("frozen")
                    .with_precision(precision);
                for product in [Product::Transposed, Product::Plain] {
                    let (k, n) = match product {
                        Product::Transposed => (inp, out),
                        Product::Plain => (out, inp),
                    };
                    let x = values(m * k, (m * 7 + k) as u64);
                    let got = frozen
                        .product(&x, m, product)
                        .expect("AVX-512 runs a kernel");
                    let want = reference(
                        &x,
                        |p, j| match product {
                            Product::Transposed => w[j * inp + p],
                            Product::Plain => w[p * inp + j],
                        },
                        seen,
                        (m, k, n),
                    );
                    let bound = (k * k) as f64 * f64::from(f32::EPSILON) / 4.0;
                    let case = format!("{precision:?} {product:?} ({out}, {inp}) m={m}");
                    assert_eq!(got.len(), m * n, "{case}");
                    for (idx, (&g, &r)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (f64::from(g) - r).abs() <= bound,
                            "{case} element {idx}: {g} against {r}"
                        );
                    }
                }
            }
        }
    }

    /// Below AVX-512 (here via the detected level) the kernel is not used: `product` says
    /// `None` and the callers keep the `gemm` crate.
    #[test]
    fn no_packed_product_below_avx512() {
        let tensor = Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).expect("w");
        let frozen = FrozenWeight::new(&tensor).expect("frozen");
        let got = frozen.product(&[0.0; 8], 2, Product::Plain);
        assert_eq!(got.is_some(), SimdLevel::active() >= SimdLevel::Avx512);
    }
}
