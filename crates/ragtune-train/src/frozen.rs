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
//! 16-lane rows of the packed weight per step of `k` ([`avx512`]). It computes the same sums
//! as any f32 GEMM up to the order of the additions: about 120 GFLOP/s a core on a Sapphire
//! Rapids Xeon, 80-90% of its f32 peak.
//!
//! With [`MatmulPrecision::Bf16`] on CPUs with Intel AMX the products run on its tile unit
//! instead ([`amx`]): operands rounded to bfloat16, 32 x 32 blocks of four f32 accumulator
//! tiles, 510-580 GFLOP/s a core on the same Xeon. The AVX-512 BF16 instruction
//! (`vdpbf16ps`) was tried first and was slower than the f32 kernel there (it issues on one
//! port, so it does no more multiply-adds a cycle than two FMA ports, and the operands must
//! be converted).

use std::sync::{Arc, OnceLock};

use candle_core::Tensor;
use half::bf16;
use ragtune_util::cpu::SimdLevel;
use ragtune_util::ptr::SyncPtr;
use rayon::prelude::*;

use crate::Result;

/// Columns of the packed weight per panel: two 16-lane f32 vectors.
const PANEL: usize = 32;

/// Rows of `x` per register tile: `2 * MR` accumulators, two weight vectors and one
/// broadcast fit AVX-512's 32 vector registers.
const MR: usize = 12;

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
            Self::Bf16 if amx::available() => Self::Bf16,
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
enum Packed {
    F32 {
        transposed: Panels,
        plain: Panels,
    },
    Bf16 {
        transposed: TilePanels,
        plain: TilePanels,
    },
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

/// A `(k, n)` right-hand side in bfloat16 AMX tiles. Panel `j` (columns `32j..32j + 32`)
/// holds, for each block of 32 rows, two 1 KiB tiles (columns `0..16`, then `16..32`) of 16
/// rows of 64 bytes: row `r` of a tile has, for each of its 16 columns, the pair
/// `(B[2r][c], B[2r + 1][c])` of the block (the "VNNI" layout `TDPBF16PS` reads its second
/// source in, Intel SDM vol. 2). Zero past row `k` and column `n`.
#[derive(Debug)]
struct TilePanels {
    k: usize,
    n: usize,
    /// bfloat16 bits, `n.div_ceil(32) * k.div_ceil(32) * 1024` values.
    data: Vec<u16>,
}

impl TilePanels {
    /// `k` rounded up to the tile's 32 rows.
    fn padded_k(k: usize) -> usize {
        k.div_ceil(32) * 32
    }

    /// Packs the `(k, n)` matrix whose element `(p, j)` is `at(p, j)`, rounded to bfloat16.
    fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let panel_len = Self::padded_k(k) * PANEL;
        let mut data = vec![0u16; n.div_ceil(PANEL) * panel_len];
        data.par_chunks_mut(panel_len)
            .enumerate()
            .for_each(|(panel, values)| {
                for (i, v) in values.iter_mut().enumerate() {
                    // i = block * 1024 + tile * 512 + pair row * 32 + column * 2 + element.
                    let (block, tile) = (i / 1024, (i / 512) % 2);
                    let (row, col, e) = ((i / 32) % 16, (i / 2) % 16, i % 2);
                    let p = block * 32 + 2 * row + e;
                    let j = panel * PANEL + tile * 16 + col;
                    if p < k && j < n {
                        *v = bf16::from_f32(at(p, j)).to_bits();
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
                if SimdLevel::active() < SimdLevel::Avx512 {
                    return None;
                }
                let (out, inp) = self.tensor.dims2().ok()?;
                let w = self.tensor.to_vec2::<f32>().ok()?;
                let transposed = |p: usize, j: usize| w[j][p];
                let plain = |p: usize, j: usize| w[p][j];
                Some(
                    match self.precision == MatmulPrecision::Bf16 && amx::available() {
                        true => Packed::Bf16 {
                            transposed: TilePanels::pack(inp, out, transposed),
                            plain: TilePanels::pack(out, inp, plain),
                        },
                        false => Packed::F32 {
                            transposed: Panels::pack(inp, out, transposed),
                            plain: Panels::pack(out, inp, plain),
                        },
                    },
                )
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
        Some(match (self.packed()?, product) {
            (Packed::F32 { transposed, .. }, Product::Transposed) => matmul(x, m, transposed),
            (Packed::F32 { plain, .. }, Product::Plain) => matmul(x, m, plain),
            (Packed::Bf16 { transposed, .. }, Product::Transposed) => matmul_amx(x, m, transposed),
            (Packed::Bf16 { plain, .. }, Product::Plain) => matmul_amx(x, m, plain),
        })
    }
}

/// `a (m, k) · b (k, n)` with both operands rounded to bfloat16, summed in f32, row-major,
/// on rayon's threads (one task per panel of 32 columns), in 32 x 32 blocks of four AMX
/// accumulator tiles.
///
/// # Panics
/// When `a.len() != m * b.k`, or where AMX is not [`amx::available`].
fn matmul_amx(a: &[f32], m: usize, b: &TilePanels) -> Vec<f32> {
    let (k, n) = (b.k, b.n);
    assert_eq!(a.len(), m * k, "matmul_amx: a is not (m, k)");
    assert!(amx::available(), "matmul_amx: needs AMX");
    if m == 0 || n == 0 {
        return vec![0f32; m * n];
    }
    // a in bfloat16, padded with zeros to whole tiles: (m_pad, k_pad).
    let (m_pad, k_pad, n_pad) = (
        m.div_ceil(32) * 32,
        TilePanels::padded_k(k),
        n.div_ceil(32) * 32,
    );
    let mut a16 = vec![0u16; m_pad * k_pad];
    a16.par_chunks_mut(k_pad)
        .zip(a.par_chunks(k.max(1)))
        .for_each(|(dst, src)| {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = bf16::from_f32(v).to_bits();
            }
        });
    let mut c = vec![0f32; m_pad * n_pad];
    let out = SyncPtr::new(&mut c);
    b.data
        .par_chunks(k_pad * PANEL)
        .enumerate()
        .for_each(|(panel, bp)| {
            // SAFETY: AMX is available (asserted above). The blocks read rows 0..m_pad of
            // `a16` (k_pad values each: all of it), the panel's k_pad * 32 values, and write
            // columns 32 panel..32 panel + 32 of the m_pad rows of `c` (m_pad * n_pad
            // long, row stride n_pad); panels write disjoint columns.
            unsafe {
                amx::panel(
                    a16.as_ptr(),
                    m_pad,
                    k_pad,
                    bp.as_ptr(),
                    out.get().add(panel * PANEL),
                    n_pad,
                )
            };
        });
    c.truncate(m * n_pad);
    if n_pad != n {
        for i in 1..m {
            c.copy_within(i * n_pad..i * n_pad + n, i * n);
        }
        c.truncate(m * n);
    }
    c
}

mod amx;

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
mod avx512;

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
            let rounded = precision == MatmulPrecision::Bf16 && amx::available();
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

    /// bfloat16 keeps 8 significant bits: against the exact product of the unrounded
    /// operands, each output is within `2^-8 · Σ|a||b|` (both roundings, 2^-9 relative each)
    /// plus f32 rounding, and it differs from the f32 product (it really rounds).
    #[test]
    fn bf16_products_stay_within_bfloat16_rounding() {
        if !amx::available() {
            eprintln!("skipped: the bfloat16 kernel runs on AMX CPUs only");
            return;
        }
        let (out, inp, m) = (96, 200, 14);
        let w = values(out * inp, 5);
        let x = values(m * inp, 6);
        let tensor = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).expect("w");
        let frozen = FrozenWeight::new(&tensor).expect("frozen");
        let single = frozen.product(&x, m, Product::Transposed).expect("f32");
        let half = frozen
            .with_precision(MatmulPrecision::Bf16)
            .product(&x, m, Product::Transposed)
            .expect("bf16");
        let exact = reference(&x, |p, j| w[j * inp + p], f64::from, (m, inp, out));
        let magnitude = reference(
            &x,
            |p, j| w[j * inp + p].abs(),
            |v| f64::from(v.abs()),
            (m, inp, out),
        );
        let mut differs = false;
        for (i, ((&h, &e), &s)) in half.iter().zip(&exact).zip(&single).enumerate() {
            let bound = magnitude[i] * 2f64.powi(-8) + (inp * inp) as f64 * 2f64.powi(-24);
            assert!(
                (f64::from(h) - e).abs() <= bound,
                "element {i}: {h} against {e}"
            );
            differs |= h != s;
        }
        assert!(differs, "the bfloat16 products equal the f32 ones");
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
