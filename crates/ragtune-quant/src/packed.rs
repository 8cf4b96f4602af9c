//! Right-hand sides of `a (m, k) · b (k, n)` packed once for this crate's own dense GEMM
//! kernels, where a matrix is multiplied many times (a frozen weight in training, a sentence
//! encoder's projections): [`PackedMatrix`].
//!
//! - **f32** on AVX-512: the outer-product form of Goto and van de Geijn, "Anatomy of
//!   high-performance matrix multiplication" (ACM TOMS 34(3), 2008). A register tile of
//!   `MR` rows by `PANEL` columns (24 zmm accumulators) takes one broadcast of `a` and two
//!   16-lane rows of the packed matrix per step of `k` (module `avx512`). The same sums as any
//!   f32 GEMM up to the order of the additions: about 120 GFLOP/s a core on a Sapphire Rapids
//!   Xeon, 80-90% of its f32 peak. The `gemm` crate, which candle uses, has no AVX-512
//!   kernels on a stable toolchain and repacks row-major left operands on every call.
//! - **bfloat16** on Intel AMX (module `amx`): operands rounded to bfloat16, summed in f32 in
//!   32 x 32 blocks of four accumulator tiles (`tdpbf16ps`), 510-580 GFLOP/s a core on the
//!   same Xeon. AVX-512 BF16's `vdpbf16ps` was tried first and was slower than the f32 kernel
//!   there (it issues on one port, so it does no more multiply-adds a cycle than two FMA
//!   ports, and the operands must be converted).
//!
//! Neither runs below AVX-512 ([`PackedMatrix::pack`] says `None`); callers keep their
//! portable GEMM there.

use half::bf16;
use ragtune_util::cpu::SimdLevel;
use ragtune_util::ptr::SyncPtr;
use rayon::prelude::*;

/// Columns of the packed weight per panel: two 16-lane f32 vectors.
const PANEL: usize = 32;

/// Rows of `x` per register tile: `2 * MR` accumulators, two weight vectors and one
/// broadcast fit AVX-512's 32 vector registers.
const MR: usize = 12;

/// The arithmetic of a [`PackedMatrix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedPrecision {
    /// f32 operands and f32 sums (AVX-512).
    F32,
    /// Both operands rounded to bfloat16 (to nearest even; 8 significant bits), the products
    /// summed in f32, as PyTorch's bf16 autocast does for matmuls (AMX).
    Bf16,
}

/// A `(k, n)` right-hand side packed for one of the kernels of this module.
#[derive(Debug)]
pub enum PackedMatrix {
    /// For the AVX-512 f32 kernel.
    F32(Panels),
    /// For the AMX bfloat16 kernel.
    Bf16(TilePanels),
}

/// Whether the AMX bfloat16 kernel runs here: `RAGTUNE_SIMD` not below `avx512`, the CPU
/// has AMX-TILE and AMX-BF16, and Linux granted this process the tile data state. Asked
/// once.
pub fn amx_available() -> bool {
    amx::available()
}

impl PackedMatrix {
    /// Packs the `(k, n)` matrix whose element `(p, j)` is `at(p, j)` for `precision`:
    /// [`PackedPrecision::Bf16`] where AMX is available, f32 where only AVX-512 is (a bf16
    /// request falls back to f32), `None` below AVX-512 (or `RAGTUNE_SIMD` set below it).
    /// Memory: `k n` values of the precision, padded to whole panels (and, for bf16, to
    /// whole 32-row tiles).
    pub fn pack(
        k: usize,
        n: usize,
        precision: PackedPrecision,
        at: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Option<Self> {
        if SimdLevel::active() < SimdLevel::Avx512 {
            return None;
        }
        Some(
            match precision == PackedPrecision::Bf16 && amx::available() {
                true => Self::Bf16(TilePanels::pack(k, n, at)),
                false => Self::F32(Panels::pack(k, n, at)),
            },
        )
    }

    /// The precision the products run in.
    pub fn precision(&self) -> PackedPrecision {
        match self {
            Self::F32(_) => PackedPrecision::F32,
            Self::Bf16(_) => PackedPrecision::Bf16,
        }
    }

    /// `(k, n)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::F32(p) => (p.k, p.n),
            Self::Bf16(p) => (p.k, p.n),
        }
    }

    /// `a (m, k) · self (k, n)`, row-major `(m, n)`, on rayon's threads (one task per panel
    /// of 32 columns).
    ///
    /// # Panics
    /// When `a.len() != m * k`.
    pub fn matmul(&self, a: &[f32], m: usize) -> Vec<f32> {
        match self {
            Self::F32(p) => matmul(a, m, p),
            Self::Bf16(p) => matmul_amx(a, m, p),
        }
    }
}

/// A `(k, n)` right-hand side in column panels of `PANEL`: panel `j` holds columns
/// `32j..32j + 32`, row after row (`k` rows of 32 values, zero past column `n`), so the
/// kernel reads each panel front to back.
#[derive(Debug)]
pub struct Panels {
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
pub struct TilePanels {
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

    /// Both kernels against an f64 reference on shapes that leave partial register tiles,
    /// AMX tiles and panels: rows not a multiple of 12 or 32, columns not a multiple of 32
    /// or under 16, `k` not a multiple of 32. The reference multiplies the operands the
    /// kernel sees (for bfloat16, each rounded to nearest even), so what is left is f32
    /// rounding of a k-term sum of products below 0.25 in size: k * 2^-24 * k/4 with room
    /// (each partial sum is at most k/4, each addition rounds by half an ulp).
    #[test]
    fn packed_products_match_an_f64_reference() {
        if SimdLevel::active() < SimdLevel::Avx512 {
            eprintln!("skipped: the packed kernels run on AVX-512 CPUs only");
            return;
        }
        let shapes = [
            (24, 40, 13),
            (33, 7, 1),
            (96, 64, 25),
            (192, 576, 12),
            (15, 17, 30),
            (70, 100, 45),
        ];
        for precision in [PackedPrecision::F32, PackedPrecision::Bf16] {
            let rounded = precision == PackedPrecision::Bf16 && amx::available();
            let seen = |v: f32| match rounded {
                true => f64::from(bf16::from_f32(v).to_f32()),
                false => f64::from(v),
            };
            for (k, n, m) in shapes {
                let b = values(k * n, (n * 31 + k) as u64);
                let at = |p: usize, j: usize| b[p * n + j];
                let packed = PackedMatrix::pack(k, n, precision, at).expect("AVX-512");
                assert_eq!(packed.precision() == PackedPrecision::Bf16, rounded);
                assert_eq!(packed.dims(), (k, n));
                let a = values(m * k, (m * 7 + k) as u64);
                let got = packed.matmul(&a, m);
                let want = reference(&a, at, seen, (m, k, n));
                let bound = (k * k) as f64 * f64::from(f32::EPSILON) / 4.0;
                let case = format!("{precision:?} ({k}, {n}) m={m}");
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

    /// bfloat16 keeps 8 significant bits: against the exact product of the unrounded
    /// operands, each output is within `2^-8 · Σ|a||b|` (both roundings, 2^-9 relative each)
    /// plus f32 rounding, and it differs from the f32 product (it really rounds).
    #[test]
    fn bf16_products_stay_within_bfloat16_rounding() {
        if !amx::available() {
            eprintln!("skipped: the bfloat16 kernel runs on AMX CPUs only");
            return;
        }
        let (k, n, m) = (200, 96, 14);
        let b = values(k * n, 5);
        let a = values(m * k, 6);
        let at = |p: usize, j: usize| b[p * n + j];
        let single = PackedMatrix::pack(k, n, PackedPrecision::F32, at).expect("f32");
        let half = PackedMatrix::pack(k, n, PackedPrecision::Bf16, at).expect("bf16");
        let (single, half) = (single.matmul(&a, m), half.matmul(&a, m));
        let exact = reference(&a, at, f64::from, (m, k, n));
        let magnitude = reference(&a, |p, j| at(p, j).abs(), |v| f64::from(v.abs()), (m, k, n));
        let mut differs = false;
        for (i, ((&h, &e), &s)) in half.iter().zip(&exact).zip(&single).enumerate() {
            let bound = magnitude[i] * 2f64.powi(-8) + (k * k) as f64 * 2f64.powi(-24);
            assert!(
                (f64::from(h) - e).abs() <= bound,
                "element {i}: {h} against {e}"
            );
            differs |= h != s;
        }
        assert!(differs, "the bfloat16 products equal the f32 ones");
    }

    /// Below AVX-512 nothing is packed: the callers keep their portable GEMM.
    #[test]
    fn nothing_packed_below_avx512() {
        let packed = PackedMatrix::pack(4, 4, PackedPrecision::F32, |_, _| 0.0);
        assert_eq!(packed.is_some(), SimdLevel::active() >= SimdLevel::Avx512);
    }
}
