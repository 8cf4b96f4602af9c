//! Dot-product kernels: AVX2+FMA on x86-64 when the CPU has it ([`SimdLevel`], detected
//! once), scalar otherwise.

use ragtune_util::cpu::SimdLevel;

/// Portable dot product with 8 independent accumulators (auto-vectorises reasonably).
#[inline]
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let chunks = n / 8;
    for i in 0..chunks {
        for j in 0..8 {
            acc[j] += a[i * 8 + j] * b[i * 8 + j];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for i in chunks * 8..n {
        s += a[i] * b[i];
    }
    s
}

/// AVX2+FMA dot product of `a[..n]` and `b[..n]`, `n = min(len)`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let pa = a.as_ptr();
    let pb = b.as_ptr();
    let mut i = 0usize;
    // SAFETY: all loads read within `a[..n]` / `b[..n]` (i + 32 <= n, i + 8 <= n, i < n);
    // unaligned loads are used, and the caller guarantees AVX2+FMA.
    unsafe {
        let mut s0 = _mm256_setzero_ps();
        let mut s1 = _mm256_setzero_ps();
        let mut s2 = _mm256_setzero_ps();
        let mut s3 = _mm256_setzero_ps();
        while i + 32 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                s1,
            );
            s2 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 16)),
                _mm256_loadu_ps(pb.add(i + 16)),
                s2,
            );
            s3 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 24)),
                _mm256_loadu_ps(pb.add(i + 24)),
                s3,
            );
            i += 32;
        }
        while i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
        let hi = _mm256_extractf128_ps(s, 1);
        let lo = _mm256_castps256_ps128(s);
        let q = _mm_add_ps(hi, lo);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        let mut r = _mm_cvtss_f32(q);
        while i < n {
            r += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        r
    }
}

/// Whether the AVX2+FMA kernels may be used: the process's kernel level
/// ([`SimdLevel::active`], detected once, lowered by `RAGTUNE_SIMD`) is AVX2 or wider.
#[inline]
pub fn has_avx2() -> bool {
    SimdLevel::active() >= SimdLevel::Avx2
}

/// Dot product with the best kernel for this CPU.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { dot_avx2(a, b) };
    }
    dot_scalar(a, b)
}

/// Hints the CPU to fetch the cache lines of `v` (first `lines` lines of 64 bytes).
#[inline(always)]
pub fn prefetch(v: &[f32], lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = v.as_ptr().cast::<i8>();
        let max = (v.len() * 4).div_ceil(64).min(lines);
        for l in 0..max {
            // SAFETY: prefetch never faults; the address is within (or one line past) `v`.
            unsafe { _mm_prefetch(p.wrapping_add(l * 64), _MM_HINT_T0) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, lines);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_agree() {
        for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 384, 385] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot_scalar(&a, &b) - naive).abs() < 1e-3, "n={n}");
            assert!((dot(&a, &b) - naive).abs() < 1e-3, "n={n}");
        }
    }
}
