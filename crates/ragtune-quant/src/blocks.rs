//! The GGUF block formats this crate multiplies itself, their in-memory layout, and the q8
//! activation rows their dot products take (`ggml-common.h`, `ggml-quants.c`).
//!
//! In the file a block is `block_q4_1 { d: f16, m: f16, qs: [u8; 16] }` (20 bytes; weight
//! `j` = `d * q_j + m`, `q_j` the low nibble of `qs[j]` for `j < 16`, the high nibble of
//! `qs[j - 16]` otherwise) or `block_q8_0 { d: f16, qs: [i8; 32] }` (34 bytes; weight `j` =
//! `d * qs[j]`).
//!
//! In memory a matrix is cut into groups of [`GROUP`](super::kernels::GROUP) = 16 rows
//! (the last one padded with zero rows), and a group is stored block by block, **interleaved**:
//! the `qs` of block `b` of a group are `QS / 4` chunks of 64 bytes, chunk `c` holding bytes
//! `4c..4c + 4` of each of the 16 rows' `qs`, row after row. The 16 scales of the block follow
//! in their own array, the 16 minimums in a third. For Q4_1 chunk `c`'s low nibbles are the
//! weights `4c..4c + 4` and its high nibbles `16 + 4c..16 + 4c + 4`; for Q8_0 chunk `c` is the
//! weights `4c..4c + 4`; Q5_0 and Q5_1 hold Q4_1's four nibble chunks and a fifth chunk of
//! each row's `qh` (bit `j` is bit 4 of weight `j`). One activation chunk broadcast to every 32-bit lane meets the same 4
//! weights of 16 rows ([`super::kernels`]).

use half::f16;
use ragtune_util::cpu::SimdLevel;

use super::kernels::Kernel;

/// Weights per block (`QK4_1`, `QK8_0`, `QK8_1` in ggml).
pub const QK: usize = 32;

/// A GGUF block format and the kernel that multiplies it with q8 activation rows.
pub trait QuantFormat: Send + Sync + 'static {
    /// The GGML type's name (`Q4_1`, `Q8_0`), for messages.
    const NAME: &'static str;
    /// Bytes per block in the file.
    const BYTES: usize;
    /// Bytes of quants per block.
    const QS: usize;
    /// Whether blocks carry a minimum `m`.
    const HAS_MIN: bool;
    /// The group kernel (`kernels::group_matmul`).
    const KERNEL: Kernel;

    /// Splits one block (`BYTES` long, little-endian) into its quants (written to `qs`,
    /// `QS` long) and `(d, m)` (`m` is zero without a minimum).
    fn split(block: &[u8], qs: &mut [u8]) -> (f16, f16);

    /// Writes one block's 32 values.
    fn dequantize_block(qs: &[u8], d: f32, m: f32, out: &mut [f32]);
}

/// Q4_1: 4-bit quants with a scale and a minimum per block.
#[derive(Debug, Clone, Copy)]
pub struct Q4_1;

/// Q8_0: 8-bit quants with a scale per block.
#[derive(Debug, Clone, Copy)]
pub struct Q8_0;

impl QuantFormat for Q4_1 {
    const NAME: &'static str = "Q4_1";
    const BYTES: usize = 20;
    const QS: usize = 16;
    const HAS_MIN: bool = true;
    const KERNEL: Kernel = Kernel::Q4_1;

    fn split(b: &[u8], qs: &mut [u8]) -> (f16, f16) {
        qs.copy_from_slice(&b[4..20]);
        (
            f16::from_le_bytes([b[0], b[1]]),
            f16::from_le_bytes([b[2], b[3]]),
        )
    }

    fn dequantize_block(qs: &[u8], d: f32, m: f32, out: &mut [f32]) {
        for (j, &q) in qs.iter().enumerate() {
            out[j] = f32::from(q & 0x0F) * d + m;
            out[j + QK / 2] = f32::from(q >> 4) * d + m;
        }
    }
}

impl QuantFormat for Q8_0 {
    const NAME: &'static str = "Q8_0";
    const BYTES: usize = 34;
    const QS: usize = 32;
    const HAS_MIN: bool = false;
    const KERNEL: Kernel = Kernel::Q8_0;

    fn split(b: &[u8], qs: &mut [u8]) -> (f16, f16) {
        qs.copy_from_slice(&b[2..34]);
        (f16::from_le_bytes([b[0], b[1]]), f16::ZERO)
    }

    fn dequantize_block(qs: &[u8], d: f32, _m: f32, out: &mut [f32]) {
        for (o, &q) in out.iter_mut().zip(qs) {
            *o = f32::from(q as i8) * d;
        }
    }
}

/// Q4_0: 4-bit quants `q` in `[0, 15]`, weight `d (q - 8)`.
#[derive(Debug, Clone, Copy)]
pub struct Q4_0;

impl QuantFormat for Q4_0 {
    const NAME: &'static str = "Q4_0";
    const BYTES: usize = 18;
    const QS: usize = 16;
    const HAS_MIN: bool = false;
    const KERNEL: Kernel = Kernel::Q4_0;

    fn split(b: &[u8], qs: &mut [u8]) -> (f16, f16) {
        qs.copy_from_slice(&b[2..18]);
        (f16::from_le_bytes([b[0], b[1]]), f16::ZERO)
    }

    fn dequantize_block(qs: &[u8], d: f32, _m: f32, out: &mut [f32]) {
        for (j, &q) in qs.iter().enumerate() {
            out[j] = (i32::from(q & 0x0F) - 8) as f32 * d;
            out[j + QK / 2] = (i32::from(q >> 4) - 8) as f32 * d;
        }
    }
}

/// Q5_0: 5-bit quants `q` in `[0, 31]`, weight `d (q - 16)`.
#[derive(Debug, Clone, Copy)]
pub struct Q5_0;

/// Q5_1: 5-bit quants with a scale and a minimum, weight `d q + m`.
#[derive(Debug, Clone, Copy)]
pub struct Q5_1;

/// The 20 quant bytes of a 5-bit block as held: the 16 nibble bytes of the file (low nibble
/// of byte `j` = bits 0-3 of weight `j`, high nibble = of weight `16 + j`), then `qh`, whose
/// bit `j` is bit 4 of weight `j` (little-endian u32). `file_qs` is the block's `qh` (4 bytes)
/// followed by its 16 nibble bytes, as in `block_q5_0`/`block_q5_1`.
fn split_5bit(file_qs: &[u8], qs: &mut [u8]) {
    qs[..16].copy_from_slice(&file_qs[4..20]);
    qs[16..20].copy_from_slice(&file_qs[..4]);
}

/// The 32 unsigned 5-bit quants of a held 5-bit block ([`split_5bit`]'s layout).
fn unpack_5bit(qs: &[u8]) -> [u8; QK] {
    let qh = u32::from_le_bytes([qs[16], qs[17], qs[18], qs[19]]);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        q[j + QK / 2] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

impl QuantFormat for Q5_0 {
    const NAME: &'static str = "Q5_0";
    const BYTES: usize = 22;
    const QS: usize = 20;
    const HAS_MIN: bool = false;
    const KERNEL: Kernel = Kernel::Q5_0;

    fn split(b: &[u8], qs: &mut [u8]) -> (f16, f16) {
        split_5bit(&b[2..22], qs);
        (f16::from_le_bytes([b[0], b[1]]), f16::ZERO)
    }

    fn dequantize_block(qs: &[u8], d: f32, _m: f32, out: &mut [f32]) {
        for (o, q) in out.iter_mut().zip(unpack_5bit(qs)) {
            *o = (i32::from(q) - 16) as f32 * d;
        }
    }
}

impl QuantFormat for Q5_1 {
    const NAME: &'static str = "Q5_1";
    const BYTES: usize = 24;
    const QS: usize = 20;
    const HAS_MIN: bool = true;
    const KERNEL: Kernel = Kernel::Q5_1;

    fn split(b: &[u8], qs: &mut [u8]) -> (f16, f16) {
        split_5bit(&b[4..24], qs);
        (
            f16::from_le_bytes([b[0], b[1]]),
            f16::from_le_bytes([b[2], b[3]]),
        )
    }

    fn dequantize_block(qs: &[u8], d: f32, m: f32, out: &mut [f32]) {
        for (o, q) in out.iter_mut().zip(unpack_5bit(qs)) {
            *o = f32::from(q) * d + m;
        }
    }
}

/// One activation row quantized to q8 blocks (ggml `block_q8_1`, which is `block_q8_0` plus
/// `s`), split like the weights.
#[derive(Debug, Clone, Default)]
pub(crate) struct ActRow {
    /// `nb * 32` quants.
    pub(crate) qs: Vec<i8>,
    /// `nb` scales, rounded through f16 as ggml stores them.
    pub(crate) d: Vec<f32>,
    /// `nb` values `d * Σ qs`, rounded through f16 once (ggml's `quantize_row_q8_1`).
    pub(crate) s: Vec<f32>,
    /// `nb` integer sums `Σ qs` (the AVX-512 Q8_0 kernel's bias correction).
    pub(crate) qsum: Vec<i32>,
}

impl ActRow {
    /// Quantizes `x` (a multiple of 32 values) as ggml's `quantize_row_q8_1_ref` does: per
    /// block `d = max|x| / 127`, `q = round(x / d)` (half away from zero), `s = d Σ q`. The
    /// Q8_0 dot product uses the same `d` and `q` (`quantize_row_q8_0_ref`) and ignores `s`.
    /// Vectorised for `level`; every level gives the same bytes.
    ///
    /// # Panics
    /// When `level` is above [`SimdLevel::detected`].
    pub(crate) fn quantize_at(level: SimdLevel, x: &[f32]) -> Self {
        assert!(
            level <= SimdLevel::detected(),
            "{level} kernels on a CPU without them"
        );
        let nb = x.len() / QK;
        let mut row = Self {
            qs: vec![0; nb * QK],
            d: vec![0.0; nb],
            s: vec![0.0; nb],
            qsum: vec![0; nb],
        };
        match level {
            SimdLevel::Portable => quantize_blocks(x, &mut row),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2, FMA and F16C were detected (the assertion above).
            SimdLevel::Avx2 => unsafe { quantize_avx2(x, &mut row) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F/BW/VL were detected (the assertion above).
            SimdLevel::Avx512 => unsafe { quantize_avx512(x, &mut row) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the portable level is detected off x86-64"),
        }
        row
    }
}

/// [`quantize_blocks`] compiled with AVX2 (the compiler vectorises it).
///
/// # Safety
/// AVX2, FMA and F16C available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_avx2(x: &[f32], row: &mut ActRow) {
    quantize_blocks(x, row);
}

/// [`quantize_blocks`] compiled with AVX-512.
///
/// # Safety
/// AVX-512 F, BW and VL, AVX2, FMA and F16C available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn quantize_avx512(x: &[f32], row: &mut ActRow) {
    quantize_blocks(x, row);
}

/// The body of [`ActRow::quantize_at`], written so that it vectorises exactly: `max|x|` on the
/// bit patterns (non-negative floats order as integers; a NaN would win, where the scalar
/// `f32::max` skips it), and `round` as `trunc` plus a step away from zero when the fraction
/// is at least one half (`y - trunc(y)` is exact).
#[inline(always)]
fn quantize_blocks(x: &[f32], row: &mut ActRow) {
    for (b, (xs, qs)) in x
        .chunks_exact(QK)
        .zip(row.qs.chunks_exact_mut(QK))
        .enumerate()
    {
        let amax = f32::from_bits(
            xs.iter()
                .fold(0u32, |a, v| a.max(v.to_bits() & 0x7FFF_FFFF)),
        );
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(xs) {
            let y = v * id;
            let t = y.trunc();
            let r = if (y - t).abs() >= 0.5 {
                t + 1f32.copysign(y)
            } else {
                t
            };
            // r is a whole number, |r| <= 127 for finite x (the clamp bounds an infinite
            // one). Adding 1.5 * 2^23 puts it in the low mantissa bits: an exact conversion
            // that vectorises, where `as i32` checks every value for NaN.
            let r = ((r.clamp(-127.0, 127.0) + 12_582_912.0).to_bits() as i32) - 0x4B40_0000;
            *q = r as i8;
            sum += r;
        }
        row.d[b] = f16::from_f32(d).to_f32();
        row.s[b] = f16::from_f32(sum as f32 * d).to_f32();
        row.qsum[b] = sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's `quantize_row_q8_1_ref`, as written there (the reference for every level).
    fn reference(x: &[f32]) -> ActRow {
        let nb = x.len() / QK;
        let mut row = ActRow {
            qs: vec![0; nb * QK],
            ..ActRow::default()
        };
        for (xs, qs) in x.chunks_exact(QK).zip(row.qs.chunks_exact_mut(QK)) {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(xs) {
                let r = (v * id).round() as i32;
                *q = r as i8;
                sum += r;
            }
            row.d.push(f16::from_f32(d).to_f32());
            row.s.push(f16::from_f32(sum as f32 * d).to_f32());
            row.qsum.push(sum);
        }
        row
    }

    /// Every level gives the reference's bytes: random values, a block of exact halves
    /// (`k + 0.5` with `d = 1`, where rounding direction matters), negative halves, zeros.
    #[test]
    fn every_level_quantizes_as_the_reference() {
        let mut s = 7u64;
        let mut x: Vec<f32> = (0..QK * 40)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 6.0 - 3.0
            })
            .collect();
        x.extend((0..QK).map(|i| if i == 0 { 127.0 } else { i as f32 + 0.5 }));
        x.extend((0..QK).map(|i| if i == 0 { -127.0 } else { -(i as f32) - 0.5 }));
        x.extend([0.0; QK]);
        let want = reference(&x);
        for level in SimdLevel::supported() {
            let got = ActRow::quantize_at(level, &x);
            assert_eq!(got.qs, want.qs, "{level}");
            assert_eq!(got.qsum, want.qsum, "{level}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.d), bits(&want.d), "{level}");
            assert_eq!(bits(&got.s), bits(&want.s), "{level}");
        }
    }
}
