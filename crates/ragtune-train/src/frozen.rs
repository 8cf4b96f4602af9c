//! [`FrozenWeight`]: a frozen projection weight `W: (out, in)` and, on CPUs with AVX-512, this
//! crate's own f32 GEMM for the two products training runs on it: `y = x Wᵀ` (forward) and
//! `dx = dy W` (backward).
//!
//! Why not the `gemm` crate, which the rest of the trainer uses: on a stable toolchain it has
//! no AVX-512 kernels (they need its `nightly` feature), so its 8-wide FMA kernel ran at half
//! the width of these CPUs, and it repacked the row-major activations on every call (`perf` on
//! a 768-token run: 42% of the time in its kernel, 15% packing the left operand). Here the
//! weight is packed once, lazily, in the layout the kernel streams ([`Panels`]), and the
//! activations are read in place.
//!
//! The kernel is the outer-product form of Goto and van de Geijn, "Anatomy of
//! high-performance matrix multiplication" (ACM TOMS 34(3), 2008): a register tile of
//! [`MR`] rows by [`PANEL`] columns (24 zmm accumulators) takes one broadcast of `x` and two
//! 16-lane rows of the packed weight per step of `k`. It computes the same sums as any f32
//! GEMM up to the order of the additions.

use std::sync::{Arc, OnceLock};

use candle_core::Tensor;
use ragtune_util::cpu::SimdLevel;
use ragtune_util::ptr::SyncPtr;
use rayon::prelude::*;

use crate::Result;

/// Columns of the packed weight per panel: two 16-lane f32 vectors.
const PANEL: usize = 32;

/// Rows of `x` per register tile: `2 * MR` accumulators, two weight vectors and one
/// broadcast fit AVX-512's 32 vector registers.
const MR: usize = 12;

/// Which product of `W: (out, in)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Product {
    /// `x (t, in) · Wᵀ -> (t, out)`: the forward projection.
    Transposed,
    /// `dy (t, out) · W -> (t, in)`: the gradient of the projection's input.
    Plain,
}

/// A frozen f32 or f64 weight `(out, in)`, contiguous, with the packed copies of
/// [`Product`]'s two right-hand sides made on first use where the kernel runs (f32, an
/// AVX-512 CPU, `RAGTUNE_SIMD` not below `avx512`). Cloning shares both.
///
/// Memory: the packed copies add twice the f32 weight (SmolLM2-135M's projections: 2 x 0.4
/// GiB), made only on CPUs that use them.
#[derive(Debug, Clone)]
pub struct FrozenWeight {
    tensor: Tensor,
    packed: Arc<OnceLock<Option<Packed>>>,
}

/// The two packed right-hand sides.
#[derive(Debug)]
struct Packed {
    /// `Wᵀ: (in, out)`.
    transposed: Panels,
    /// `W: (out, in)`.
    plain: Panels,
}

/// A `(k, n)` right-hand side in column panels of [`PANEL`]: panel `j` holds columns
/// `32j..32j + 32`, row after row (`k` rows of 32 values, zero past column `n`), so the
/// kernel reads each panel front to back.
#[derive(Debug)]
struct Panels {
    k: usize,
    n: usize,
    /// `n.div_ceil(32) * k * 32` values.
    data: Vec<f32>,
}

impl Panels {
    /// Packs the `(k, n)` matrix whose element `(p, j)` is `at(p, j)`.
    fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let mut data = vec![0f32; n.div_ceil(PANEL) * k * PANEL];
        data.par_chunks_mut(k * PANEL)
            .enumerate()
            .for_each(|(panel, values)| {
                let j0 = panel * PANEL;
                for (p, row) in values.chunks_exact_mut(PANEL).enumerate() {
                    for (c, v) in row.iter_mut().enumerate().take(n - j0) {
                        *v = at(p, j0 + c);
                    }
                }
            });
        Self { k, n, data }
    }
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
            packed: Arc::new(OnceLock::new()),
        })
    }

    /// The weight, `(out, in)`.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The packed copies, made on the first call; `None` where the kernel does not run.
    fn packed(&self) -> Option<&Packed> {
        self.packed
            .get_or_init(|| {
                if SimdLevel::active() < SimdLevel::Avx512 {
                    return None;
                }
                let (out, inp) = self.tensor.dims2().ok()?;
                let w = self.tensor.to_vec2::<f32>().ok()?;
                Some(Packed {
                    transposed: Panels::pack(inp, out, |p, j| w[j][p]),
                    plain: Panels::pack(out, inp, |p, j| w[p][j]),
                })
            })
            .as_ref()
    }

    /// `x (m, k)` times the weight as `product` says, row-major, through the AVX-512 kernel;
    /// `None` where it does not run (see the type). `x` must hold `m` rows of the product's
    /// `k` (`in` for [`Product::Transposed`], `out` for [`Product::Plain`]).
    ///
    /// # Panics
    /// When `x.len() != m * k`.
    pub(crate) fn product(&self, x: &[f32], m: usize, product: Product) -> Option<Vec<f32>> {
        let packed = self.packed()?;
        let b = match product {
            Product::Transposed => &packed.transposed,
            Product::Plain => &packed.plain,
        };
        Some(matmul(x, m, b))
    }
}

/// `a (m, k) · b (k, n)`, row-major, on rayon's threads (one task per panel).
///
/// # Panics
/// When `a.len() != m * b.k`, or on a CPU without AVX-512 F.
fn matmul(a: &[f32], m: usize, b: &Panels) -> Vec<f32> {
    let (k, n) = (b.k, b.n);
    assert_eq!(a.len(), m * k, "matmul: a is not (m, k)");
    assert!(
        SimdLevel::detected() >= SimdLevel::Avx512,
        "matmul: the packed kernel needs AVX-512"
    );
    let mut c = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return c;
    }
    let out = SyncPtr::new(&mut c);
    b.data
        .par_chunks(k * PANEL)
        .enumerate()
        .for_each(|(panel, bp)| {
            let j0 = panel * PANEL;
            let cols = (n - j0).min(PANEL);
            for i0 in (0..m).step_by(MR) {
                let rows = (m - i0).min(MR);
                // SAFETY: AVX-512 F is present (asserted above). The tile reads rows
                // i0..i0 + rows of `a` (k values each, inside `a`: m * k long), the panel's
                // k * 32 values, and writes columns j0..j0 + cols of those rows of `c`
                // (m * n long); panels write disjoint columns, so no two tasks touch the
                // same element.
                unsafe {
                    avx512::tile(
                        rows,
                        k,
                        a.as_ptr().add(i0 * k),
                        bp.as_ptr(),
                        out.get().add(i0 * n + j0),
                        n,
                        cols,
                    );
                }
            }
        });
    c
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR, PANEL};

    /// `c (rows, cols) = a (rows, k) · panel (k, 32)` restricted to `cols` columns, for
    /// `rows <= MR`; `a` row stride `k`, `c` row stride `ldc`.
    ///
    /// # Safety
    /// AVX-512 F; `a` valid for `rows * k` reads, `panel` for `k * 32`, `c` for writes of
    /// `cols <= 32` values at each of `rows` rows `ldc` apart.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(
        rows: usize,
        k: usize,
        a: *const f32,
        panel: *const f32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let low = if cols >= 16 {
            0xFFFF
        } else {
            (1u16 << cols) - 1
        };
        let high = match cols {
            32.. => 0xFFFF,
            17..32 => (1u16 << (cols - 16)) - 1,
            _ => 0,
        };
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match rows {
                    $($r => tile_rows::<$r>(k, a, panel, c, ldc, [low, high]),)*
                    _ => unreachable!("tile: {rows} rows, at most {MR}"),
                }
            };
        }
        // SAFETY: the caller's contract, with rows <= MR (matched).
        unsafe { dispatch!(1 2 3 4 5 6 7 8 9 10 11 12) }
    }

    /// [`tile`] for `R` rows: `2R` accumulators stay in registers over all of `k`.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_rows<const R: usize>(
        k: usize,
        a: *const f32,
        panel: *const f32,
        c: *mut f32,
        ldc: usize,
        masks: [u16; 2],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for p in 0..k {
            // SAFETY: p < k, so both vectors are inside the panel's k * 32 values, and
            // a + i * k + p inside row i of a (the caller's contract).
            unsafe {
                let b0 = _mm512_loadu_ps(panel.add(p * PANEL));
                let b1 = _mm512_loadu_ps(panel.add(p * PANEL + 16));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*a.add(i * k + p));
                    acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: the masks keep the stores to the first `cols` columns of row i.
            unsafe {
                _mm512_mask_storeu_ps(c.add(i * ldc), masks[0], acc[0]);
                _mm512_mask_storeu_ps(c.add(i * ldc + 16), masks[1], acc[1]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    /// Never called: [`SimdLevel::detected`](ragtune_util::cpu::SimdLevel::detected) is
    /// below AVX-512 off x86-64.
    pub(super) unsafe fn tile(
        _: usize,
        _: usize,
        _: *const f32,
        _: *const f32,
        _: *mut f32,
        _: usize,
        _: usize,
    ) {
        unreachable!("AVX-512 kernel off x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `a (m, k) · b (k, n)` in f64, the reference.
    fn reference(
        a: &[f32],
        b: impl Fn(usize, usize) -> f32,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| f64::from(a[i * k + p]) * f64::from(b(p, j)))
                    .sum();
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

    /// Both products against an f64 reference on shapes that leave partial tiles and
    /// panels: rows not a multiple of 12, columns not a multiple of 32 or under 16. The
    /// bound is f32 rounding of a k-term sum of products below 0.25 in size: k * 2^-24 * k/4
    /// with room (each partial sum is at most k/4, each addition rounds by half an ulp).
    #[test]
    fn packed_products_match_an_f64_reference() {
        if SimdLevel::active() < SimdLevel::Avx512 {
            eprintln!("skipped: the packed kernel runs on AVX-512 CPUs only");
            return;
        }
        for (out, inp, m) in [
            (40, 24, 13),
            (7, 33, 1),
            (64, 96, 25),
            (576, 192, 12),
            (17, 16, 30),
        ] {
            let w = values(out * inp, (out * 31 + inp) as u64);
            let tensor = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).expect("w");
            let frozen = FrozenWeight::new(&tensor).expect("frozen");
            for product in [Product::Transposed, Product::Plain] {
                let (k, n) = match product {
                    Product::Transposed => (inp, out),
                    Product::Plain => (out, inp),
                };
                let x = values(m * k, (m * 7 + k) as u64);
                let got = frozen
                    .product(&x, m, product)
                    .expect("AVX-512 runs the kernel");
                let want = reference(
                    &x,
                    |p, j| match product {
                        Product::Transposed => w[j * inp + p],
                        Product::Plain => w[p * inp + j],
                    },
                    m,
                    k,
                    n,
                );
                let bound = (k * k) as f64 * f64::from(f32::EPSILON) / 4.0;
                assert_eq!(got.len(), m * n, "{product:?} ({out}, {inp}) m={m}");
                for (idx, (&g, &r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(g) - r).abs() <= bound,
                        "{product:?} ({out}, {inp}) m={m} element {idx}: {g} against {r}"
                    );
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
