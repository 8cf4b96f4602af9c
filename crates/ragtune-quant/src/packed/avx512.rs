//! The f32 register-tile kernel of [`super::matmul`] on AVX-512 F (x86-64 only).

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
