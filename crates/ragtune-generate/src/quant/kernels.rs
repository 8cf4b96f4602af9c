//! Dot products of a quantized weight row with a q8 activation row: ggml's
//! `ggml_vec_dot_q4_1_q8_1` (`Σ_b d_w d_x Σ q_w q_x + m_w s_x`) and `ggml_vec_dot_q8_0_q8_0`
//! (`Σ_b d_w d_x Σ q_w q_x`).
//!
//! AVX2 versions when the crate is compiled with `avx2`, `fma` and `f16c` (the workspace's
//! `x86-64-v3` target), portable ones otherwise; the tests check one against the other.

use super::blocks::{ActRow, RowRef, QK};

/// `avx2::$kernel(args)` when the crate is compiled with AVX2, FMA and F16C,
/// `scalar::$kernel(args)` otherwise: the one place that chooses.
macro_rules! dispatch {
    ($kernel:ident($($arg:expr),*)) => {{
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        // SAFETY: the target features are enabled at compile time; the slices have the
        // lengths the `avx2` kernels document (checked in debug builds).
        let value = unsafe { avx2::$kernel($($arg),*) };
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        )))]
        let value = scalar::$kernel($($arg),*);
        value
    }};
}

/// Q4_1 weights times q8_1 activations.
#[inline]
pub(crate) fn dot_q4_1(row: RowRef<'_>, x: &ActRow) -> f32 {
    dispatch!(dot_q4_1(row, x))
}

/// Q8_0 weights times q8_0 activations.
#[inline]
pub(crate) fn dot_q8_0(row: RowRef<'_>, x: &ActRow) -> f32 {
    dispatch!(dot_q8_0(row, x))
}

/// At most this many activation rows per multi-row call ([`dot_q4_1_rows`]).
pub(crate) const MAX_ROWS: usize = 8;

/// [`dot_q4_1`] of `row` with each of `xs` (at most [`MAX_ROWS`]) into `out`, bit for bit,
/// with each weight block loaded and unpacked once for all of them.
#[inline]
pub(crate) fn dot_q4_1_rows(row: RowRef<'_>, xs: &[ActRow], out: &mut [f32]) {
    assert!(xs.len() <= MAX_ROWS && out.len() == xs.len());
    dispatch!(dot_q4_1_rows(row, xs, out))
}

/// [`dot_q8_0`] of `row` with each of `xs` (at most [`MAX_ROWS`]) into `out`, bit for bit,
/// with each weight block loaded once for all of them.
#[inline]
pub(crate) fn dot_q8_0_rows(row: RowRef<'_>, xs: &[ActRow], out: &mut [f32]) {
    assert!(xs.len() <= MAX_ROWS && out.len() == xs.len());
    dispatch!(dot_q8_0_rows(row, xs, out))
}

/// The portable kernels (with AVX2 only the tests call them, to check the AVX2 ones).
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ),
    allow(dead_code)
)]
pub(crate) mod scalar {
    use super::{ActRow, RowRef, QK};

    /// Portable [`dot_q4_1`](super::dot_q4_1).
    pub(crate) fn dot_q4_1(row: RowRef<'_>, x: &ActRow) -> f32 {
        let mut acc = 0f32;
        for b in 0..row.d.len() {
            let (qw, qx) = (&row.qs[b * 16..b * 16 + 16], &x.qs[b * QK..(b + 1) * QK]);
            let mut sum = 0i32;
            for j in 0..QK / 2 {
                sum += i32::from(qw[j] & 0x0F) * i32::from(qx[j]);
                sum += i32::from(qw[j] >> 4) * i32::from(qx[j + QK / 2]);
            }
            acc += row.d[b].to_f32() * x.d[b] * sum as f32 + row.m[b].to_f32() * x.s[b];
        }
        acc
    }

    /// Portable [`dot_q4_1_rows`](super::dot_q4_1_rows): one row at a time.
    pub(crate) fn dot_q4_1_rows(row: RowRef<'_>, xs: &[ActRow], out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = dot_q4_1(row, x);
        }
    }

    /// Portable [`dot_q8_0_rows`](super::dot_q8_0_rows): one row at a time.
    pub(crate) fn dot_q8_0_rows(row: RowRef<'_>, xs: &[ActRow], out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = dot_q8_0(row, x);
        }
    }

    /// Portable [`dot_q8_0`](super::dot_q8_0).
    pub(crate) fn dot_q8_0(row: RowRef<'_>, x: &ActRow) -> f32 {
        let mut acc = 0f32;
        for b in 0..row.d.len() {
            let (qw, qx) = (&row.qs[b * QK..(b + 1) * QK], &x.qs[b * QK..(b + 1) * QK]);
            let sum: i32 = qw
                .iter()
                .zip(qx)
                .map(|(&w, &v)| i32::from(w as i8) * i32::from(v))
                .sum();
            acc += row.d[b].to_f32() * x.d[b] * sum as f32;
        }
        acc
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ActRow, RowRef, QK};

    /// Horizontal sum of 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `Σ u8 × i8` of 32 byte pairs, as 8 f32 lanes of partial sums (`maddubs` to i16
    /// pairs, `madd` with ones to i32; no saturation for 4-bit or |i8| operands).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// Blocks per segment: the scales of a segment are computed first, into a stack array.
    const SEGMENT: usize = 64;

    /// `d_w d_x` for blocks `b..b + n` into `dd[..n]`, and returns `Σ m_w s_x` over them
    /// (zero without minimums). Eight blocks at a time with F16C conversions.
    ///
    /// # Safety
    /// `b + n <= row.d.len()`, the activation arrays as long, `n <= SEGMENT`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales(
        row: RowRef<'_>,
        x: &ActRow,
        b: usize,
        n: usize,
        dd: &mut [f32; SEGMENT],
    ) -> f32 {
        let has_min = !row.m.is_empty();
        let mut macc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: 8 f16 (16 bytes) and 8 f32 from b + i on are in bounds (caller).
            unsafe {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(row.d.as_ptr().add(b + i).cast()));
                let xd = _mm256_loadu_ps(x.d.as_ptr().add(b + i));
                _mm256_storeu_ps(dd.as_mut_ptr().add(i), _mm256_mul_ps(dw, xd));
                if has_min {
                    let mw = _mm256_cvtph_ps(_mm_loadu_si128(row.m.as_ptr().add(b + i).cast()));
                    let xs = _mm256_loadu_ps(x.s.as_ptr().add(b + i));
                    macc = _mm256_fmadd_ps(mw, xs, macc);
                }
            }
            i += 8;
        }
        let mut msum = hsum(macc);
        for (j, out) in dd.iter_mut().enumerate().take(n).skip(i) {
            *out = row.d[b + j].to_f32() * x.d[b + j];
            if has_min {
                msum += row.m[b + j].to_f32() * x.s[b + j];
            }
        }
        msum
    }

    /// `Σ_b d_w d_x block(b)` over all blocks of `row`, as 8 lanes, and `Σ m_w s_x` (zero
    /// without minimums): the scales segment by segment ([`scales`]), the blocks in pairs
    /// into two accumulators (to halve the FMA dependency chain).
    ///
    /// # Safety
    /// AVX2, FMA and F16C available; `row.m` empty or as long as `row.d`, the activation
    /// arrays as long as `row.d`, and `block(b)` sound for every `b < row.d.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scaled_blocks(
        row: RowRef<'_>,
        x: &ActRow,
        block: impl Fn(usize) -> __m256,
    ) -> (__m256, f32) {
        let nb = row.d.len();
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut msum = 0f32;
        let mut dd = [0f32; SEGMENT];
        let mut b = 0;
        while b < nb {
            let n = (nb - b).min(SEGMENT);
            // SAFETY: b + n <= nb, n <= SEGMENT.
            msum += unsafe { scales(row, x, b, n, &mut dd) };
            let mut i = 0;
            while i + 2 <= n {
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(dd[i]), block(b + i), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(dd[i + 1]), block(b + i + 1), acc1);
                i += 2;
            }
            if i < n {
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(dd[i]), block(b + i), acc0);
            }
            b += n;
        }
        (_mm256_add_ps(acc0, acc1), msum)
    }

    /// AVX2 Q4_1 × q8_1: per block the 32 nibbles are spread to bytes (low nibbles, then
    /// high), multiplied with the 32 activation bytes, and scaled by `d_w d_x`
    /// ([`scaled_blocks`]).
    ///
    /// # Safety
    /// AVX2, FMA and F16C available; `row.qs.len() == 16 * nb`, `row.d.len() == row.m.len()
    /// == nb`, `x.qs.len() == 32 * nb`, `x.d.len() == x.s.len() == nb`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1(row: RowRef<'_>, x: &ActRow) -> f32 {
        let nb = row.d.len();
        debug_assert!(row.qs.len() == 16 * nb && row.m.len() == nb);
        debug_assert!(x.qs.len() == QK * nb && x.d.len() == nb && x.s.len() == nb);
        let low = _mm256_set1_epi8(0x0F);
        let block = |i: usize| -> __m256 {
            // SAFETY: i < nb: 16 quant bytes at 16 i, 32 activation bytes at 32 i.
            let (q, qx) = unsafe {
                (
                    _mm_loadu_si128(row.qs.as_ptr().add(i * 16).cast()),
                    _mm256_loadu_si256(x.qs.as_ptr().add(i * QK).cast()),
                )
            };
            let qw = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low);
            dot_u8_i8(qw, qx)
        };
        // SAFETY: the lengths are the caller's (this function's `# Safety`).
        let (acc, msum) = unsafe { scaled_blocks(row, x, block) };
        hsum(acc) + msum
    }

    /// AVX2 Q8_0 × q8_0: as [`dot_q4_1`], with `maddubs` taking `|w|` and `x` carrying the
    /// sign of `w` (it needs one unsigned operand).
    ///
    /// # Safety
    /// AVX2, FMA and F16C available; `row.qs.len() == 32 * nb`, `row.d.len() == nb`,
    /// `x.qs.len() == 32 * nb`, `x.d.len() == nb`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0(row: RowRef<'_>, x: &ActRow) -> f32 {
        let nb = row.d.len();
        debug_assert!(row.qs.len() == QK * nb && row.m.is_empty());
        debug_assert!(x.qs.len() == QK * nb && x.d.len() == nb);
        let block = |i: usize| -> __m256 {
            // SAFETY: i < nb: 32 bytes each at 32 i.
            let (qw, qx) = unsafe {
                (
                    _mm256_loadu_si256(row.qs.as_ptr().add(i * QK).cast()),
                    _mm256_loadu_si256(x.qs.as_ptr().add(i * QK).cast()),
                )
            };
            dot_u8_i8(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw))
        };
        // SAFETY: the lengths are the caller's (this function's `# Safety`); no minimums,
        // nothing summed.
        let (acc, _) = unsafe { scaled_blocks(row, x, block) };
        hsum(acc)
    }

    /// [`scaled_blocks`] of one weight row against each of `xs`, into `acc[r]` and
    /// `msum[r]`: per activation row exactly the operations of [`scaled_blocks`] in its order
    /// (so each result is bit for bit the one-row result), with `block(i)` giving the weight
    /// block `i` prepared once (`prep`) and its product with row `r` (`mul`).
    ///
    /// # Safety
    /// As [`scaled_blocks`] for every row of `xs`; `xs.len() <= MAX_ROWS`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scaled_blocks_rows<W: Copy>(
        row: RowRef<'_>,
        xs: &[ActRow],
        prep: impl Fn(usize) -> W,
        mul: impl Fn(W, &ActRow, usize) -> __m256,
    ) -> ([__m256; super::MAX_ROWS], [f32; super::MAX_ROWS]) {
        let nb = row.d.len();
        let rows = xs.len();
        let mut acc0 = [_mm256_setzero_ps(); super::MAX_ROWS];
        let mut acc1 = [_mm256_setzero_ps(); super::MAX_ROWS];
        let mut msum = [0f32; super::MAX_ROWS];
        let mut dd = [[0f32; SEGMENT]; super::MAX_ROWS];
        let mut b = 0;
        while b < nb {
            let n = (nb - b).min(SEGMENT);
            for r in 0..rows {
                // SAFETY: b + n <= nb, n <= SEGMENT (the caller's lengths for every row).
                msum[r] += unsafe { scales(row, &xs[r], b, n, &mut dd[r]) };
            }
            let mut i = 0;
            while i + 2 <= n {
                let (w0, w1) = (prep(b + i), prep(b + i + 1));
                for r in 0..rows {
                    let x = &xs[r];
                    acc0[r] = _mm256_fmadd_ps(_mm256_set1_ps(dd[r][i]), mul(w0, x, b + i), acc0[r]);
                    acc1[r] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dd[r][i + 1]),
                        mul(w1, x, b + i + 1),
                        acc1[r],
                    );
                }
                i += 2;
            }
            if i < n {
                let w0 = prep(b + i);
                for r in 0..rows {
                    acc0[r] =
                        _mm256_fmadd_ps(_mm256_set1_ps(dd[r][i]), mul(w0, &xs[r], b + i), acc0[r]);
                }
            }
            b += n;
        }
        let mut acc = [_mm256_setzero_ps(); super::MAX_ROWS];
        for r in 0..rows {
            acc[r] = _mm256_add_ps(acc0[r], acc1[r]);
        }
        (acc, msum)
    }

    /// [`dot_q4_1`] against each of `xs` (module `dot_q4_1_rows`).
    ///
    /// # Safety
    /// As [`dot_q4_1`] for every row of `xs`; `out.len() == xs.len() <= MAX_ROWS`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1_rows(row: RowRef<'_>, xs: &[ActRow], out: &mut [f32]) {
        let nb = row.d.len();
        debug_assert!(row.qs.len() == 16 * nb && row.m.len() == nb);
        debug_assert!(xs
            .iter()
            .all(|x| x.qs.len() == QK * nb && x.d.len() == nb && x.s.len() == nb));
        let low = _mm256_set1_epi8(0x0F);
        let prep = |i: usize| -> __m256i {
            // SAFETY: i < nb: 16 quant bytes at 16 i.
            let q = unsafe { _mm_loadu_si128(row.qs.as_ptr().add(i * 16).cast()) };
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low)
        };
        let mul = |qw: __m256i, x: &ActRow, i: usize| -> __m256 {
            // SAFETY: i < nb: 32 activation bytes at 32 i.
            let qx = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(i * QK).cast()) };
            dot_u8_i8(qw, qx)
        };
        // SAFETY: the lengths are the caller's (this function's `# Safety`).
        let (acc, msum) = unsafe { scaled_blocks_rows(row, xs, prep, mul) };
        for (r, o) in out.iter_mut().enumerate() {
            *o = hsum(acc[r]) + msum[r];
        }
    }

    /// [`dot_q8_0`] against each of `xs` (module `dot_q8_0_rows`).
    ///
    /// # Safety
    /// As [`dot_q8_0`] for every row of `xs`; `out.len() == xs.len() <= MAX_ROWS`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0_rows(row: RowRef<'_>, xs: &[ActRow], out: &mut [f32]) {
        let nb = row.d.len();
        debug_assert!(row.qs.len() == QK * nb && row.m.is_empty());
        debug_assert!(xs.iter().all(|x| x.qs.len() == QK * nb && x.d.len() == nb));
        let prep = |i: usize| -> __m256i {
            // SAFETY: i < nb: 32 bytes at 32 i.
            unsafe { _mm256_loadu_si256(row.qs.as_ptr().add(i * QK).cast()) }
        };
        let mul = |qw: __m256i, x: &ActRow, i: usize| -> __m256 {
            // SAFETY: i < nb: 32 bytes at 32 i.
            let qx = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(i * QK).cast()) };
            dot_u8_i8(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw))
        };
        // SAFETY: the lengths are the caller's (this function's `# Safety`); no minimums.
        let (acc, _) = unsafe { scaled_blocks_rows(row, xs, prep, mul) };
        for (r, o) in out.iter_mut().enumerate() {
            *o = hsum(acc[r]);
        }
    }
}
