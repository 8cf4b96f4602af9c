//! Integer matrix kernels over the interleaved layout ([`super::blocks`]): one group of
//! [`GROUP`] weight rows times a few q8 activation rows, for every block
//! `y_r += d_w[r] d_x · Σ q_w q_x` (+ `m_w[r] s_x` for Q4_1; for Q6_K the sum is
//! `Σ_h sc_h Σ (q_w - 32) q_x` over the block's two halves): ggml's
//! `ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q8_0_q8_0` and `ggml_vec_dot_q6_K_q8_K` (per block
//! of 32 rather than per 256), computed for 16 weight rows at once.
//!
//! The interleaving puts 4 consecutive weights of 16 rows side by side, so one 4-byte
//! activation value broadcast to every lane meets the matching 4 weights of each row: with
//! AVX-512 VNNI one `vpdpbusd` is 64 multiply-adds with no horizontal sum, with AVX2 a
//! `vpmaddubsw` is 32 (8 rows at a time). This is the repacked layout of llama.cpp's CPU
//! backend (`ggml-cpu/repack.cpp`), in our own form.
//!
//! Every level computes the integer sums exactly and then the same f32 operations in the same
//! order per output (`dd = d_w × d_x`, `acc = fma(dd, Σ, acc)`, `macc = fma(m_w, s_x, macc)`,
//! `y = acc + macc`), so all levels give the same bits, and an activation row's result does
//! not depend on which other rows are multiplied with it (batch-size invariance).
//!
//! The level is chosen at run time ([`SimdLevel`]); the caller passes it, so the tests can run
//! each one.

use half::f16;
use ragtune_util::cpu::SimdLevel;

use super::blocks::{ActRow, QK};

/// Weight rows per interleaved group.
pub(crate) const GROUP: usize = 16;

/// Activation rows per register tile: each weight block is unpacked once for this many.
const NR: usize = 4;

/// One group of [`GROUP`] weight rows over `nb` blocks, interleaved ([`super::blocks`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupRef<'a> {
    /// `nb * GROUP * qs_per_block` bytes: block by block, 4-byte chunk by chunk, row by row.
    pub(crate) qs: &'a [u8],
    /// `nb * GROUP` scales, block by block.
    pub(crate) d: &'a [f16],
    /// `nb * GROUP` minimums (Q4_1), empty for Q8_0.
    pub(crate) m: &'a [f16],
    /// `nb * 2 * GROUP` sub-scales (Q6_K): per block the 16 rows' first (weights 0-15),
    /// then their second (16-31); empty for the other formats.
    pub(crate) sc: &'a [i8],
}

/// The formats' group kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Q4_1 weights (16 bytes of nibbles per block and row) × q8_1 activations.
    Q4_1,
    /// Q8_0 weights (32 signed bytes per block and row) × q8_0 activations.
    Q8_0,
    /// Q4_0 weights (16 bytes of nibbles per block and row) × q8_0 activations: `Σ (q - 8) x`
    /// as `Σ q x - 8 Σ x`, exact in i32.
    Q4_0,
    /// Q5_0 weights (16 bytes of nibbles and 4 of high bits per block and row) × q8_0
    /// activations: `Σ (q - 16) x` as `Σ q x - 16 Σ x`, exact in i32.
    Q5_0,
    /// Q5_1 weights (as Q5_0, with a minimum) × q8_1 activations.
    Q5_1,
    /// Q6_K weights regrouped in blocks of 32 (16 bytes of nibbles and 8 of high bits per
    /// block and row, two sub-scales) × q8_K activations (one scale per 256 values, held per
    /// block like the others): per half of 16 weights
    /// `sc Σ (q - 32) x` as `sc (Σ q x - 32 Σ x)`, exact in i32.
    Q6K,
}

impl Kernel {
    /// Bytes of quants per block and row.
    fn qs_per_block(self) -> usize {
        match self {
            Kernel::Q4_0 | Kernel::Q4_1 => QK / 2,
            Kernel::Q8_0 => QK,
            Kernel::Q5_0 | Kernel::Q5_1 => QK / 2 + 4,
            Kernel::Q6K => QK / 2 + 8,
        }
    }

    /// Whether the blocks carry a minimum (added as `m_w s_x`).
    fn has_min(self) -> bool {
        matches!(self, Kernel::Q4_1 | Kernel::Q5_1)
    }
}

/// `out[j][r]` = weight row `r` of `g` · activation row `xs[j]`, for `j < xs.len()`.
///
/// # Panics
/// When `level` is above [`SimdLevel::detected`] (the instructions would fault), or the
/// lengths disagree (`xs[j]` must have `nb` blocks, `out` as many entries as `xs`).
pub(crate) fn group_matmul(
    kernel: Kernel,
    level: SimdLevel,
    g: GroupRef<'_>,
    xs: &[ActRow],
    out: &mut [[f32; GROUP]],
) {
    assert!(
        level <= SimdLevel::detected(),
        "{level} kernels on a CPU without them"
    );
    let nb = g.d.len() / GROUP;
    assert!(g.qs.len() == nb * GROUP * kernel.qs_per_block() && out.len() == xs.len());
    assert!(!kernel.has_min() || g.m.len() == g.d.len());
    assert!(kernel != Kernel::Q6K || g.sc.len() == 2 * g.d.len());
    assert!(xs.iter().all(|x| x.qs.len() == nb * QK
        && x.d.len() == nb
        && x.s.len() == nb
        && x.qsum.len() == nb
        && x.qsum_lo.len() == nb));
    for (x, o) in xs.chunks(NR).zip(out.chunks_mut(NR)) {
        match level {
            SimdLevel::Portable => portable(kernel, g, x, o),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2, FMA and F16C were detected (the assertion above); the lengths were
            // checked above.
            SimdLevel::Avx2 => unsafe { avx2::tile(kernel, g, x, o) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F/BW/VL/VNNI (and AVX2) were detected; lengths checked above.
            SimdLevel::Avx512 => unsafe { avx512::tile(kernel, g, x, o) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the portable level is detected off x86-64"),
        }
    }
}

/// The portable kernel: plain loops with the operations of the SIMD ones.
fn portable(kernel: Kernel, g: GroupRef<'_>, xs: &[ActRow], out: &mut [[f32; GROUP]]) {
    let nb = g.d.len() / GROUP;
    for (x, o) in xs.iter().zip(out.iter_mut()) {
        let mut acc = [0f32; GROUP];
        let mut macc = [0f32; GROUP];
        for b in 0..nb {
            let xq = &x.qs[b * QK..(b + 1) * QK];
            for r in 0..GROUP {
                let isum: i32 = match kernel {
                    Kernel::Q4_0 | Kernel::Q4_1 => {
                        let qs = &g.qs[b * GROUP * 16..(b + 1) * GROUP * 16];
                        let sum: i32 = (0..4)
                            .flat_map(|c| (0..4).map(move |i| (c, i)))
                            .map(|(c, i)| {
                                let byte = qs[c * 4 * GROUP + r * 4 + i];
                                i32::from(byte & 0x0F) * i32::from(xq[4 * c + i])
                                    + i32::from(byte >> 4) * i32::from(xq[16 + 4 * c + i])
                            })
                            .sum();
                        match kernel {
                            Kernel::Q4_0 => sum - 8 * x.qsum[b],
                            _ => sum,
                        }
                    }
                    Kernel::Q8_0 => {
                        let qs = &g.qs[b * GROUP * 32..(b + 1) * GROUP * 32];
                        (0..8)
                            .flat_map(|c| (0..4).map(move |i| (c, i)))
                            .map(|(c, i)| {
                                i32::from(qs[c * 4 * GROUP + r * 4 + i] as i8)
                                    * i32::from(xq[4 * c + i])
                            })
                            .sum()
                    }
                    Kernel::Q5_0 | Kernel::Q5_1 => {
                        let qs = &g.qs[b * GROUP * 20..(b + 1) * GROUP * 20];
                        let h = &qs[16 * GROUP + 4 * r..16 * GROUP + 4 * r + 4];
                        let qh = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
                        let bit = |j: usize| (((qh >> j) & 1) as u8) << 4;
                        let sum: i32 = (0..4)
                            .flat_map(|c| (0..4).map(move |i| (c, i)))
                            .map(|(c, i)| {
                                let byte = qs[c * 4 * GROUP + r * 4 + i];
                                let (lo, hi) = (4 * c + i, 16 + 4 * c + i);
                                i32::from((byte & 0x0F) | bit(lo)) * i32::from(xq[lo])
                                    + i32::from((byte >> 4) | bit(hi)) * i32::from(xq[hi])
                            })
                            .sum();
                        match kernel {
                            Kernel::Q5_0 => sum - 16 * x.qsum[b],
                            _ => sum,
                        }
                    }
                    Kernel::Q6K => {
                        let qs = &g.qs[b * GROUP * 24..(b + 1) * GROUP * 24];
                        let byte = |c: usize, i: usize| qs[c * 4 * GROUP + r * 4 + i];
                        let (mut s0, mut s1) = (0i32, 0i32);
                        for c in 0..4 {
                            for i in 0..4 {
                                let (lo, hi) = (4 * c + i, 16 + 4 * c + i);
                                let high = |h: usize| ((byte(4 + h, i) >> (2 * c)) & 3) << 4;
                                let q_lo = (byte(c, i) & 0x0F) | high(0);
                                let q_hi = (byte(c, i) >> 4) | high(1);
                                s0 += i32::from(q_lo) * i32::from(xq[lo]);
                                s1 += i32::from(q_hi) * i32::from(xq[hi]);
                            }
                        }
                        let x_lo = x.qsum_lo[b];
                        let x_hi = x.qsum[b] - x_lo;
                        let sc = |h: usize| i32::from(g.sc[2 * b * GROUP + h * GROUP + r]);
                        sc(0) * (s0 - 32 * x_lo) + sc(1) * (s1 - 32 * x_hi)
                    }
                };
                let dd = g.d[b * GROUP + r].to_f32() * x.d[b];
                acc[r] = dd.mul_add(isum as f32, acc[r]);
                if kernel.has_min() {
                    macc[r] = g.m[b * GROUP + r].to_f32().mul_add(x.s[b], macc[r]);
                }
            }
        }
        for r in 0..GROUP {
            o[r] = acc[r] + macc[r];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ActRow, GroupRef, Kernel, GROUP, NR, QK};

    /// [`super::group_matmul`] for at most [`NR`] activation rows, as two halves of 8 rows.
    ///
    /// # Safety
    /// AVX2, FMA and F16C available; the lengths of [`super::group_matmul`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile(
        kernel: Kernel,
        g: GroupRef<'_>,
        xs: &[ActRow],
        out: &mut [[f32; GROUP]],
    ) {
        debug_assert!((1..=NR).contains(&xs.len()));
        // SAFETY: forwarded (this function's contract); each kernel takes exactly n rows.
        unsafe {
            match (kernel, xs.len()) {
                (Kernel::Q4_1, 4) => q4_1::<4>(g, xs, out),
                (Kernel::Q4_1, 3) => q4_1::<3>(g, xs, out),
                (Kernel::Q4_1, 2) => q4_1::<2>(g, xs, out),
                (Kernel::Q4_1, _) => q4_1::<1>(g, xs, out),
                (Kernel::Q8_0, 4) => q8_0::<4>(g, xs, out),
                (Kernel::Q8_0, 3) => q8_0::<3>(g, xs, out),
                (Kernel::Q8_0, 2) => q8_0::<2>(g, xs, out),
                (Kernel::Q8_0, _) => q8_0::<1>(g, xs, out),
                (Kernel::Q4_0, 4) => nibbles::<4, false, false>(g, xs, out),
                (Kernel::Q4_0, 3) => nibbles::<3, false, false>(g, xs, out),
                (Kernel::Q4_0, 2) => nibbles::<2, false, false>(g, xs, out),
                (Kernel::Q4_0, _) => nibbles::<1, false, false>(g, xs, out),
                (Kernel::Q5_0, 4) => nibbles::<4, true, false>(g, xs, out),
                (Kernel::Q5_0, 3) => nibbles::<3, true, false>(g, xs, out),
                (Kernel::Q5_0, 2) => nibbles::<2, true, false>(g, xs, out),
                (Kernel::Q5_0, _) => nibbles::<1, true, false>(g, xs, out),
                (Kernel::Q5_1, 4) => nibbles::<4, true, true>(g, xs, out),
                (Kernel::Q5_1, 3) => nibbles::<3, true, true>(g, xs, out),
                (Kernel::Q5_1, 2) => nibbles::<2, true, true>(g, xs, out),
                (Kernel::Q5_1, _) => nibbles::<1, true, true>(g, xs, out),
                (Kernel::Q6K, 4) => q6_k::<4>(g, xs, out),
                (Kernel::Q6K, 3) => q6_k::<3>(g, xs, out),
                (Kernel::Q6K, 2) => q6_k::<2>(g, xs, out),
                (Kernel::Q6K, _) => q6_k::<1>(g, xs, out),
            }
        }
    }

    /// The 4 activation bytes `4c..4c + 4` of block `b`, in every 32-bit lane.
    ///
    /// # Safety
    /// `b * 32 + 4c + 4 <= x.qs.len()`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn chunk(x: &ActRow, b: usize, c: usize) -> __m256i {
        // SAFETY: in bounds (caller); an unaligned 4-byte read.
        let v = unsafe {
            x.qs.as_ptr()
                .add(b * QK + 4 * c)
                .cast::<i32>()
                .read_unaligned()
        };
        _mm256_set1_epi32(v)
    }

    /// Q4_1: per block the 4 chunk loads give 8 weight registers (low nibbles = weights
    /// `4c..4c + 4`, high = `16 + 4c..`); `vpmaddubsw` pairs sum in i16 (at most
    /// 8 × 2 × 15 × 127 = 30,480, no overflow), one `vpmaddwd` makes the i32 sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1<const N: usize>(g: GroupRef<'_>, xs: &[ActRow], out: &mut [[f32; GROUP]]) {
        let nb = g.d.len() / GROUP;
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); N];
            let mut macc = [_mm256_setzero_ps(); N];
            for b in 0..nb {
                let mut w = [_mm256_setzero_si256(); 8];
                // SAFETY: b < nb: the block's 256 quant bytes and 16 scales and minimums are
                // in bounds (the lengths were checked by group_matmul).
                let (dw, mw) = unsafe {
                    let base = g.qs.as_ptr().add(b * GROUP * 16 + h * 32);
                    for c in 0..4 {
                        let v = _mm256_loadu_si256(base.add(c * 4 * GROUP).cast());
                        w[c] = _mm256_and_si256(v, low);
                        w[4 + c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    }
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(
                            g.d.as_ptr().add(b * GROUP + h * 8).cast(),
                        )),
                        _mm256_cvtph_ps(_mm_loadu_si128(
                            g.m.as_ptr().add(b * GROUP + h * 8).cast(),
                        )),
                    )
                };
                for j in 0..N {
                    let x = &xs[j];
                    let mut s16 = _mm256_setzero_si256();
                    for (c, wc) in w.iter().enumerate() {
                        // SAFETY: x has nb blocks (checked by group_matmul).
                        let xc = unsafe { chunk(x, b, c) };
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(*wc, xc));
                    }
                    let isum = _mm256_madd_epi16(s16, ones);
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(x.d[b]));
                    acc[j] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc[j]);
                    macc[j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x.s[b]), macc[j]);
                }
            }
            for j in 0..N {
                // SAFETY: 8 floats at h * 8 inside a row of GROUP = 16.
                unsafe {
                    _mm256_storeu_ps(
                        out[j].as_mut_ptr().add(h * 8),
                        _mm256_add_ps(acc[j], macc[j]),
                    )
                };
            }
        }
    }

    /// Q8_0: 8 chunk registers per block; `vpmaddubsw` takes `|w|` and the activation with
    /// the sign of `w` (its pairs reach 2 × 127 × 127 = 32,258, so each chunk goes to i32 at
    /// once with `vpmaddwd`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0<const N: usize>(g: GroupRef<'_>, xs: &[ActRow], out: &mut [[f32; GROUP]]) {
        let nb = g.d.len() / GROUP;
        let ones = _mm256_set1_epi16(1);
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..nb {
                let mut w = [_mm256_setzero_si256(); 8];
                let mut aw = [_mm256_setzero_si256(); 8];
                // SAFETY: b < nb: the block's 512 quant bytes and 16 scales are in bounds.
                let dw = unsafe {
                    let base = g.qs.as_ptr().add(b * GROUP * 32 + h * 32);
                    for c in 0..8 {
                        w[c] = _mm256_loadu_si256(base.add(c * 4 * GROUP).cast());
                        aw[c] = _mm256_sign_epi8(w[c], w[c]);
                    }
                    _mm256_cvtph_ps(_mm_loadu_si128(g.d.as_ptr().add(b * GROUP + h * 8).cast()))
                };
                for j in 0..N {
                    let x = &xs[j];
                    let mut isum = _mm256_setzero_si256();
                    for c in 0..8 {
                        // SAFETY: x has nb blocks (checked by group_matmul).
                        let xc = unsafe { chunk(x, b, c) };
                        let p = _mm256_maddubs_epi16(aw[c], _mm256_sign_epi8(xc, w[c]));
                        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
                    }
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(x.d[b]));
                    acc[j] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc[j]);
                }
            }
            for j in 0..N {
                // `acc + 0.0` as the other levels compute `acc + macc` with macc = 0.
                let y = _mm256_add_ps(acc[j], _mm256_setzero_ps());
                // SAFETY: 8 floats at h * 8 inside a row of GROUP = 16.
                unsafe { _mm256_storeu_ps(out[j].as_mut_ptr().add(h * 8), y) };
            }
        }
    }

    /// Bit 4 of the 4 weights of each lane whose bits are `first..first + 4` of the lane's
    /// `qh` (`first` a multiple of 4), as bytes `0x10` or 0: the byte holding them is
    /// broadcast within the lane, each byte keeps its own bit, and a compare makes it a mask.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn high_bits(qh: __m256i, first: usize) -> __m256i {
        let byte = (first / 8) as i8;
        let shift = first % 8;
        let lane = |k: i8| 4 * k + byte;
        let pick = _mm256_setr_epi8(
            lane(0),
            lane(0),
            lane(0),
            lane(0),
            lane(1),
            lane(1),
            lane(1),
            lane(1),
            lane(2),
            lane(2),
            lane(2),
            lane(2),
            lane(3),
            lane(3),
            lane(3),
            lane(3),
            lane(0),
            lane(0),
            lane(0),
            lane(0),
            lane(1),
            lane(1),
            lane(1),
            lane(1),
            lane(2),
            lane(2),
            lane(2),
            lane(2),
            lane(3),
            lane(3),
            lane(3),
            lane(3),
        );
        let bit = |i: usize| (1u8 << (shift + i)) as i8;
        let mask = _mm256_setr_epi8(
            bit(0),
            bit(1),
            bit(2),
            bit(3),
            bit(0),
            bit(1),
            bit(2),
            bit(3),
            bit(0),
            bit(1),
            bit(2),
            bit(3),
            bit(0),
            bit(1),
            bit(2),
            bit(3),
            bit(0),
            bit(1),
            bit(2),
            bit(3),
            bit(0),
            bit(1),
            bit(2),
            bit(3),
            bit(0),
            bit(1),
            bit(2),
            bit(3),
            bit(0),
            bit(1),
            bit(2),
            bit(3),
        );
        let set = _mm256_and_si256(_mm256_shuffle_epi8(qh, pick), mask);
        _mm256_and_si256(_mm256_cmpeq_epi8(set, mask), _mm256_set1_epi8(0x10))
    }

    /// Q4_0 (`HIGH = false, MIN = false`), Q5_0 (`HIGH`) and Q5_1 (`HIGH, MIN`): Q4_1's
    /// nibbles, with bit 4 from the fifth chunk ([`high_bits`]) for the 5-bit formats;
    /// `vpmaddubsw` pairs reach 2 × 31 × 127 = 7,874, so four chunks are summed in i16
    /// (31,496) before each `vpmaddwd`. Without a minimum the offset (8 or 16) times `Σ x` is
    /// subtracted from the i32 sum (exact, as `Σ (q - 8) x` / `Σ (q - 16) x`); Q5_1 adds
    /// `m_w s_x` as Q4_1 does.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles<const N: usize, const HIGH: bool, const MIN: bool>(
        g: GroupRef<'_>,
        xs: &[ActRow],
        out: &mut [[f32; GROUP]],
    ) {
        let nb = g.d.len() / GROUP;
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let (block_bytes, offset) = if HIGH { (20, 16) } else { (16, 8) };
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); N];
            let mut macc = [_mm256_setzero_ps(); N];
            for b in 0..nb {
                let mut w = [_mm256_setzero_si256(); 8];
                // SAFETY: b < nb: the block's quant bytes (16 rows of 16 or 20) and 16 scales
                // (and minimums for Q5_1) are in bounds (lengths checked by group_matmul).
                let (dw, mw) = unsafe {
                    let base = g.qs.as_ptr().add(b * GROUP * block_bytes + h * 32);
                    for c in 0..4 {
                        let v = _mm256_loadu_si256(base.add(c * 4 * GROUP).cast());
                        w[c] = _mm256_and_si256(v, low);
                        w[4 + c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    }
                    if HIGH {
                        let qh = _mm256_loadu_si256(base.add(4 * 4 * GROUP).cast());
                        for c in 0..4 {
                            w[c] = _mm256_or_si256(w[c], high_bits(qh, 4 * c));
                            w[4 + c] = _mm256_or_si256(w[4 + c], high_bits(qh, 16 + 4 * c));
                        }
                    }
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                        g.d.as_ptr().add(b * GROUP + h * 8).cast(),
                    ));
                    let mw = match MIN {
                        true => _mm256_cvtph_ps(_mm_loadu_si128(
                            g.m.as_ptr().add(b * GROUP + h * 8).cast(),
                        )),
                        false => _mm256_setzero_ps(),
                    };
                    (dw, mw)
                };
                for j in 0..N {
                    let x = &xs[j];
                    let mut s16 = [_mm256_setzero_si256(); 2];
                    for (c, wc) in w.iter().enumerate() {
                        // SAFETY: x has nb blocks (checked by group_matmul).
                        let xc = unsafe { chunk(x, b, c) };
                        s16[c / 4] = _mm256_add_epi16(s16[c / 4], _mm256_maddubs_epi16(*wc, xc));
                    }
                    let mut isum = _mm256_add_epi32(
                        _mm256_madd_epi16(s16[0], ones),
                        _mm256_madd_epi16(s16[1], ones),
                    );
                    if !MIN {
                        isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(offset * x.qsum[b]));
                    }
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(x.d[b]));
                    acc[j] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc[j]);
                    if MIN {
                        macc[j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x.s[b]), macc[j]);
                    }
                }
            }
            for j in 0..N {
                // `acc + macc`, macc = 0 without a minimum, as the portable level computes it.
                // SAFETY: 8 floats at h * 8 inside a row of GROUP = 16.
                unsafe {
                    _mm256_storeu_ps(
                        out[j].as_mut_ptr().add(h * 8),
                        _mm256_add_ps(acc[j], macc[j]),
                    )
                };
            }
        }
    }

    /// Bits 4-5 of the weights of nibble chunk `c` (0..4), in place as bytes `0x00..=0x30`:
    /// the high-bit chunk `qh` holds them at bits `2c..2c + 2` of each byte (the Q6_K layout
    /// of module `blocks`), so one 16-bit shift of the whole register and a mask do it (bits
    /// crossing a byte boundary land outside the mask).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn q6_high(qh: __m256i, c: usize) -> __m256i {
        let mask = _mm256_set1_epi8(0x30);
        let moved = match c {
            0 => _mm256_slli_epi16(qh, 4),
            1 => _mm256_slli_epi16(qh, 2),
            2 => qh,
            _ => _mm256_srli_epi16(qh, 2),
        };
        _mm256_and_si256(moved, mask)
    }

    /// Q6_K: 8 weight registers of unsigned 6-bit quants per block (Q4_1's nibbles with bits
    /// 4-5 from the two high-bit chunks, [`q6_high`]); `vpmaddubsw` pairs reach
    /// 2 × 63 × 127 = 16,002, so two chunks are summed in i16 before each `vpmaddwd`. Each
    /// half of 16 weights gets its offset (`32 Σ x` of that half) and its sub-scale in i32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k<const N: usize>(g: GroupRef<'_>, xs: &[ActRow], out: &mut [[f32; GROUP]]) {
        let nb = g.d.len() / GROUP;
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..nb {
                let mut w = [_mm256_setzero_si256(); 8];
                // SAFETY: b < nb: the block's 384 quant bytes, 16 scales and 32 sub-scales are
                // in bounds (the lengths were checked by group_matmul).
                let (dw, sc0, sc1) = unsafe {
                    let base = g.qs.as_ptr().add(b * GROUP * 24 + h * 32);
                    let qh0 = _mm256_loadu_si256(base.add(4 * 4 * GROUP).cast());
                    let qh1 = _mm256_loadu_si256(base.add(5 * 4 * GROUP).cast());
                    for c in 0..4 {
                        let v = _mm256_loadu_si256(base.add(c * 4 * GROUP).cast());
                        w[c] = _mm256_or_si256(_mm256_and_si256(v, low), q6_high(qh0, c));
                        w[4 + c] = _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(v, 4), low),
                            q6_high(qh1, c),
                        );
                    }
                    let sc = g.sc.as_ptr().add(2 * b * GROUP + h * 8);
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(
                            g.d.as_ptr().add(b * GROUP + h * 8).cast(),
                        )),
                        _mm256_cvtepi8_epi32(_mm_loadl_epi64(sc.cast())),
                        _mm256_cvtepi8_epi32(_mm_loadl_epi64(sc.add(GROUP).cast())),
                    )
                };
                for j in 0..N {
                    let x = &xs[j];
                    let mut half = [_mm256_setzero_si256(); 2];
                    for k in 0..4 {
                        // Chunks 2k and 2k + 1: weights 8k..8k + 8 (k < 2: the first half).
                        let (c0, c1) = (2 * k, 2 * k + 1);
                        // SAFETY: x has nb blocks (checked by group_matmul).
                        let (x0, x1) = unsafe { (chunk(x, b, c0), chunk(x, b, c1)) };
                        let s16 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(w[c0], x0),
                            _mm256_maddubs_epi16(w[c1], x1),
                        );
                        half[k / 2] = _mm256_add_epi32(half[k / 2], _mm256_madd_epi16(s16, ones));
                    }
                    let x_lo = x.qsum_lo[b];
                    let x_hi = x.qsum[b] - x_lo;
                    let s0 = _mm256_sub_epi32(half[0], _mm256_set1_epi32(32 * x_lo));
                    let s1 = _mm256_sub_epi32(half[1], _mm256_set1_epi32(32 * x_hi));
                    let isum =
                        _mm256_add_epi32(_mm256_mullo_epi32(sc0, s0), _mm256_mullo_epi32(sc1, s1));
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(x.d[b]));
                    acc[j] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc[j]);
                }
            }
            for j in 0..N {
                // `acc + 0.0` as the other levels compute `acc + macc` with macc = 0.
                let y = _mm256_add_ps(acc[j], _mm256_setzero_ps());
                // SAFETY: 8 floats at h * 8 inside a row of GROUP = 16.
                unsafe { _mm256_storeu_ps(out[j].as_mut_ptr().add(h * 8), y) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{ActRow, GroupRef, Kernel, GROUP, NR, QK};

    /// [`super::group_matmul`] for at most [`NR`] activation rows, all 16 rows per register.
    ///
    /// # Safety
    /// AVX-512 F, BW, VL and VNNI, and AVX2, FMA and F16C available; the lengths of
    /// [`super::group_matmul`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn tile(
        kernel: Kernel,
        g: GroupRef<'_>,
        xs: &[ActRow],
        out: &mut [[f32; GROUP]],
    ) {
        debug_assert!((1..=NR).contains(&xs.len()));
        // SAFETY: forwarded (this function's contract); each kernel takes exactly n rows.
        unsafe {
            match (kernel, xs.len()) {
                (Kernel::Q4_1, 4) => q4_1::<4>(g, xs, out),
                (Kernel::Q4_1, 3) => q4_1::<3>(g, xs, out),
                (Kernel::Q4_1, 2) => q4_1::<2>(g, xs, out),
                (Kernel::Q4_1, _) => q4_1::<1>(g, xs, out),
                (Kernel::Q8_0, 4) => q8_0::<4>(g, xs, out),
                (Kernel::Q8_0, 3) => q8_0::<3>(g, xs, out),
                (Kernel::Q8_0, 2) => q8_0::<2>(g, xs, out),
                (Kernel::Q8_0, _) => q8_0::<1>(g, xs, out),
                (Kernel::Q4_0, 4) => nibbles::<4, false, false>(g, xs, out),
                (Kernel::Q4_0, 3) => nibbles::<3, false, false>(g, xs, out),
                (Kernel::Q4_0, 2) => nibbles::<2, false, false>(g, xs, out),
                (Kernel::Q4_0, _) => nibbles::<1, false, false>(g, xs, out),
                (Kernel::Q5_0, 4) => nibbles::<4, true, false>(g, xs, out),
                (Kernel::Q5_0, 3) => nibbles::<3, true, false>(g, xs, out),
                (Kernel::Q5_0, 2) => nibbles::<2, true, false>(g, xs, out),
                (Kernel::Q5_0, _) => nibbles::<1, true, false>(g, xs, out),
                (Kernel::Q5_1, 4) => nibbles::<4, true, true>(g, xs, out),
                (Kernel::Q5_1, 3) => nibbles::<3, true, true>(g, xs, out),
                (Kernel::Q5_1, 2) => nibbles::<2, true, true>(g, xs, out),
                (Kernel::Q5_1, _) => nibbles::<1, true, true>(g, xs, out),
                (Kernel::Q6K, 4) => q6_k::<4>(g, xs, out),
                (Kernel::Q6K, 3) => q6_k::<3>(g, xs, out),
                (Kernel::Q6K, 2) => q6_k::<2>(g, xs, out),
                (Kernel::Q6K, _) => q6_k::<1>(g, xs, out),
            }
        }
    }

    /// The 4 activation bytes `4c..4c + 4` of block `b`, in every 32-bit lane.
    ///
    /// # Safety
    /// `b * 32 + 4c + 4 <= x.qs.len()`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn chunk(x: &ActRow, b: usize, c: usize) -> __m512i {
        // SAFETY: in bounds (caller); an unaligned 4-byte read.
        let v = unsafe {
            x.qs.as_ptr()
                .add(b * QK + 4 * c)
                .cast::<i32>()
                .read_unaligned()
        };
        _mm512_set1_epi32(v)
    }

    /// Q4_1: 8 weight registers per block (low and high nibbles of 4 loads), two `vpdpbusd`
    /// chains of 4 per activation row.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn q4_1<const N: usize>(g: GroupRef<'_>, xs: &[ActRow], out: &mut [[f32; GROUP]]) {
        let nb = g.d.len() / GROUP;
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); N];
        let mut macc = [_mm512_setzero_ps(); N];
        for b in 0..nb {
            let mut w = [_mm512_setzero_si512(); 8];
            // SAFETY: b < nb: the block's 256 quant bytes and 16 scales and minimums are in
            // bounds (the lengths were checked by group_matmul).
            let (dw, mw) = unsafe {
                let base = g.qs.as_ptr().add(b * GROUP * 16);
                for c in 0..4 {
                    let v = _mm512_loadu_si512(base.add(c * 4 * GROUP).cast());
                    w[c] = _mm512_and_si512(v, low);
                    w[4 + c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                }
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(g.d.as_ptr().add(b * GROUP).cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(g.m.as_ptr().add(b * GROUP).cast())),
                )
            };
            for j in 0..N {
                let x = &xs[j];
                let (mut i0, mut i1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for c in 0..4 {
                    // SAFETY: x has nb blocks (checked by group_matmul).
                    let (lo, hi) = unsafe { (chunk(x, b, c), chunk(x, b, 4 + c)) };
                    i0 = _mm512_dpbusd_epi32(i0, w[c], lo);
                    i1 = _mm512_dpbusd_epi32(i1, w[4 + c], hi);
                }
                let isum = _mm512_add_epi32(i0, i1);
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(x.d[b]));
                acc[j] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isum), acc[j]);
                macc[j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x.s[b]), macc[j]);
            }
        }
        for j in 0..N {
            // SAFETY: 16 floats, one output row.
            unsafe { _mm512_storeu_ps(out[j].as_mut_ptr(), _mm512_add_ps(acc[j], macc[j])) };
        }
    }

    /// Q8_0: `vpdpbusd` needs one unsigned operand, so the weights are biased to
    /// `w + 128` (`w ^ 0x80`) and the sum starts at `-128 Σ q_x` of the block.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn q8_0<const N: usize>(g: GroupRef<'_>, xs: &[ActRow], out: &mut [[f32; GROUP]]) {
        let nb = g.d.len() / GROUP;
        let bias = _mm512_set1_epi8(-128);
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..nb {
            let mut w = [_mm512_setzero_si512(); 8];
            // SAFETY: b < nb: the block's 512 quant bytes and 16 scales are in bounds.
            let dw = unsafe {
                let base = g.qs.as_ptr().add(b * GROUP * 32);
                for (c, wc) in w.iter_mut().enumerate() {
                    *wc =
                        _mm512_xor_si512(_mm512_loadu_si512(base.add(c * 4 * GROUP).cast()), bias);
                }
                _mm512_cvtph_ps(_mm256_loadu_si256(g.d.as_ptr().add(b * GROUP).cast()))
            };
            for j in 0..N {
                let x = &xs[j];
                let mut i0 = _mm512_set1_epi32(-128 * x.qsum[b]);
                let mut i1 = _mm512_setzero_si512();
                for c in 0..4 {
                    // SAFETY: x has nb blocks (checked by group_matmul).
                    let (lo, hi) = unsafe { (chunk(x, b, c), chunk(x, b, 4 + c)) };
                    i0 = _mm512_dpbusd_epi32(i0, w[c], lo);
                    i1 = _mm512_dpbusd_epi32(i1, w[4 + c], hi);
                }
                let isum = _mm512_add_epi32(i0, i1);
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(x.d[b]));
                acc[j] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isum), acc[j]);
            }
        }
        for j in 0..N {
            let y = _mm512_add_ps(acc[j], _mm512_setzero_ps());
            // SAFETY: 16 floats, one output row.
            unsafe { _mm512_storeu_ps(out[j].as_mut_ptr(), y) };
        }
    }

    /// Bit 4 of the 4 weights of each 32-bit lane (one row's 4 weights of a chunk) whose bits
    /// are `first..first + 4` of the row's `qh`, as bytes `0x10` or 0: the lane is shifted so
    /// those bits are its lowest, its low byte is copied to all 4 bytes (`pick`), and byte `i`
    /// tests bit `i` (`bits`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn high_bits(qh: __m512i, first: i32, pick: __m512i, bits: __m512i) -> __m512i {
        let shifted = _mm512_srl_epi32(qh, _mm_cvtsi32_si128(first));
        let spread = _mm512_shuffle_epi8(shifted, pick);
        _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(spread, bits), _mm512_set1_epi8(0x10))
    }

    /// Q4_0 (`HIGH = false, MIN = false`), Q5_0 (`HIGH`) and Q5_1 (`HIGH, MIN`): Q4_1's
    /// nibbles (unsigned, the `vpdpbusd` operand that must be), with bit 4 from the fifth
    /// chunk ([`high_bits`]) for the 5-bit formats. Without a minimum the offset (8 or 16)
    /// times `Σ x` is subtracted from the i32 sum, as the AVX2 and portable kernels do.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn nibbles<const N: usize, const HIGH: bool, const MIN: bool>(
        g: GroupRef<'_>,
        xs: &[ActRow],
        out: &mut [[f32; GROUP]],
    ) {
        let nb = g.d.len() / GROUP;
        let low = _mm512_set1_epi8(0x0F);
        // Byte 4k of each 16-byte lane to its bytes 4k..4k + 4; byte i of a dword tests bit i.
        let pick = _mm512_set4_epi32(0x0C0C_0C0C, 0x0808_0808, 0x0404_0404, 0);
        let bits = _mm512_set1_epi32(0x0804_0201);
        let (block_bytes, offset) = if HIGH { (20, 16) } else { (16, 8) };
        let mut acc = [_mm512_setzero_ps(); N];
        let mut macc = [_mm512_setzero_ps(); N];
        for b in 0..nb {
            let mut w = [_mm512_setzero_si512(); 8];
            // SAFETY: b < nb: the block's quant bytes (16 rows of 16 or 20) and 16 scales (and
            // minimums for Q5_1) are in bounds (lengths checked by group_matmul).
            let (dw, mw) = unsafe {
                let base = g.qs.as_ptr().add(b * GROUP * block_bytes);
                for c in 0..4 {
                    let v = _mm512_loadu_si512(base.add(c * 4 * GROUP).cast());
                    w[c] = _mm512_and_si512(v, low);
                    w[4 + c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                }
                if HIGH {
                    let qh = _mm512_loadu_si512(base.add(4 * 4 * GROUP).cast());
                    for c in 0..4 {
                        let first = 4 * c as i32;
                        w[c] = _mm512_or_si512(w[c], high_bits(qh, first, pick, bits));
                        w[4 + c] = _mm512_or_si512(w[4 + c], high_bits(qh, 16 + first, pick, bits));
                    }
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(g.d.as_ptr().add(b * GROUP).cast()));
                let mw = match MIN {
                    true => _mm512_cvtph_ps(_mm256_loadu_si256(g.m.as_ptr().add(b * GROUP).cast())),
                    false => _mm512_setzero_ps(),
                };
                (dw, mw)
            };
            for j in 0..N {
                let x = &xs[j];
                let (mut i0, mut i1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for c in 0..4 {
                    // SAFETY: x has nb blocks (checked by group_matmul).
                    let (lo, hi) = unsafe { (chunk(x, b, c), chunk(x, b, 4 + c)) };
                    i0 = _mm512_dpbusd_epi32(i0, w[c], lo);
                    i1 = _mm512_dpbusd_epi32(i1, w[4 + c], hi);
                }
                let mut isum = _mm512_add_epi32(i0, i1);
                if !MIN {
                    isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(offset * x.qsum[b]));
                }
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(x.d[b]));
                acc[j] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isum), acc[j]);
                if MIN {
                    macc[j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x.s[b]), macc[j]);
                }
            }
        }
        for j in 0..N {
            // `acc + macc`, macc = 0 without a minimum, as the portable level computes it.
            // SAFETY: 16 floats, one output row.
            unsafe { _mm512_storeu_ps(out[j].as_mut_ptr(), _mm512_add_ps(acc[j], macc[j])) };
        }
    }

    /// Q6_K: 8 weight registers of unsigned 6-bit quants per block (Q4_1's nibbles with bits
    /// 4-5 from the two high-bit chunks, as in the AVX2 kernel); each half's `vpdpbusd` chain
    /// starts at `-32 Σ x` of that half, and the two sums are scaled by their sub-scales in
    /// i32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn q6_k<const N: usize>(g: GroupRef<'_>, xs: &[ActRow], out: &mut [[f32; GROUP]]) {
        let nb = g.d.len() / GROUP;
        let low = _mm512_set1_epi8(0x0F);
        let mask = _mm512_set1_epi8(0x30);
        let high = |qh: __m512i, c: usize| {
            let moved = match c {
                0 => _mm512_slli_epi16(qh, 4),
                1 => _mm512_slli_epi16(qh, 2),
                2 => qh,
                _ => _mm512_srli_epi16(qh, 2),
            };
            _mm512_and_si512(moved, mask)
        };
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..nb {
            let mut w = [_mm512_setzero_si512(); 8];
            // SAFETY: b < nb: the block's 384 quant bytes, 16 scales and 32 sub-scales are in
            // bounds (the lengths were checked by group_matmul).
            let (dw, sc0, sc1) = unsafe {
                let base = g.qs.as_ptr().add(b * GROUP * 24);
                let qh0 = _mm512_loadu_si512(base.add(4 * 4 * GROUP).cast());
                let qh1 = _mm512_loadu_si512(base.add(5 * 4 * GROUP).cast());
                for c in 0..4 {
                    let v = _mm512_loadu_si512(base.add(c * 4 * GROUP).cast());
                    w[c] = _mm512_or_si512(_mm512_and_si512(v, low), high(qh0, c));
                    w[4 + c] = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16(v, 4), low),
                        high(qh1, c),
                    );
                }
                let sc = g.sc.as_ptr().add(2 * b * GROUP);
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(g.d.as_ptr().add(b * GROUP).cast())),
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(sc.cast())),
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(sc.add(GROUP).cast())),
                )
            };
            for j in 0..N {
                let x = &xs[j];
                let x_lo = x.qsum_lo[b];
                let x_hi = x.qsum[b] - x_lo;
                let mut i0 = _mm512_set1_epi32(-32 * x_lo);
                let mut i1 = _mm512_set1_epi32(-32 * x_hi);
                for c in 0..4 {
                    // SAFETY: x has nb blocks (checked by group_matmul).
                    let (lo, hi) = unsafe { (chunk(x, b, c), chunk(x, b, 4 + c)) };
                    i0 = _mm512_dpbusd_epi32(i0, w[c], lo);
                    i1 = _mm512_dpbusd_epi32(i1, w[4 + c], hi);
                }
                let isum =
                    _mm512_add_epi32(_mm512_mullo_epi32(sc0, i0), _mm512_mullo_epi32(sc1, i1));
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(x.d[b]));
                acc[j] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isum), acc[j]);
            }
        }
        for j in 0..N {
            let y = _mm512_add_ps(acc[j], _mm512_setzero_ps());
            // SAFETY: 16 floats, one output row.
            unsafe { _mm512_storeu_ps(out[j].as_mut_ptr(), y) };
        }
    }
}
