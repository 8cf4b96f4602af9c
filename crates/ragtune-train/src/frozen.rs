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
    use candle_core::{DType, Device};
    use ragtune_util::cpu::SimdLevel;

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

    /// Each product reaches the packed right-hand side it needs (`x Wᵀ` and `dy W`, in the
    /// weight's precision): against candle's f64 matmul of the operands the kernel sees
    /// (rounded to bfloat16 first for bf16 where AMX runs it), within f32 rounding of a
    /// k-term sum of products below 0.25 (k² 2^-26). The kernels themselves are tested on
    /// many shapes in `ragtune_quant::packed`.
    #[test]
    fn products_match_candles_f64_matmul() {
        if SimdLevel::active() < SimdLevel::Avx512 {
            eprintln!("skipped: the packed kernels run on AVX-512 CPUs only");
            return;
        }
        let (out, inp, m) = (40, 70, 13);
        let dev = Device::Cpu;
        let w = Tensor::from_vec(values(out * inp, 1), (out, inp), &dev).expect("w");
        for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
            let frozen = FrozenWeight::new(&w)
                .expect("frozen")
                .with_precision(precision);
            let seen = |t: &Tensor| -> Tensor {
                let t = match precision.on_this_cpu() {
                    MatmulPrecision::Bf16 => t.to_dtype(DType::BF16).expect("bf16"),
                    MatmulPrecision::F32 => t.clone(),
                };
                t.to_dtype(DType::F64).expect("f64")
            };
            for product in [Product::Transposed, Product::Plain] {
                let (k, n) = match product {
                    Product::Transposed => (inp, out),
                    Product::Plain => (out, inp),
                };
                let x = values(m * k, 2 + k as u64);
                let got = frozen
                    .product(&x, m, product)
                    .expect("AVX-512 runs a kernel");
                let xt = Tensor::from_vec(x, (m, k), &dev).expect("x");
                let rhs = match product {
                    Product::Transposed => seen(&w).t().expect("t"),
                    Product::Plain => seen(&w),
                };
                let want: Vec<f64> = seen(&xt)
                    .matmul(&rhs)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())
                    .expect("matmul");
                let bound = (k * k) as f64 * f64::from(f32::EPSILON) / 4.0;
                assert_eq!(got.len(), m * n);
                for (idx, (&g, &r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(g) - r).abs() <= bound,
                        "{precision:?} {product:?} element {idx}: {g} against {r}"
                    );
                }
            }
        }
    }

    /// Below AVX-512 (here via the detected level) the kernel is not used: `product` says
    /// `None` and the callers keep the `gemm` crate.
    #[test]
    fn no_packed_product_below_avx512() {
        let tensor = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).expect("w");
        let frozen = FrozenWeight::new(&tensor).expect("frozen");
        let got = frozen.product(&[0.0; 8], 2, Product::Plain);
        assert_eq!(got.is_some(), SimdLevel::active() >= SimdLevel::Avx512);
    }
}
