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
//! each row's `qh` (bit `j` is bit 4 of weight `j`); Q6_K holds the four nibble chunks and two
//! chunks of 2-bit high parts ([`Q6K`]), its two sub-scales per block and row in an array of
//! their own. One activation chunk broadcast to every 32-bit lane meets the same 4
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
    /// Whether blocks carry two 8-bit sub-scales, one per 16 weights ([`Q6K`]).
    const SUB_SCALES: bool = false;
    /// Whether activation rows are quantized as ggml's `block_q8_K` (one scale per 256
    /// values, `quantize_row_q8_K_ref`), the activations llama.cpp multiplies k-quants
    /// with, rather than per 32 values.
    const Q8_K_ACTIVATIONS: bool = false;
    /// The group kernel (`kernels::group_matmul`).
    const KERNEL: Kernel;

    /// Splits one block (`BYTES` long, little-endian) into its quants (written to `qs`,
    /// `QS` long) and `(d, m)` (`m` is zero without a minimum).
    fn split(block: &[u8], qs: &mut [u8]) -> (f16, f16);

    /// The block's two sub-scales (weights 0-15 and 16-31), for formats with
    /// [`SUB_SCALES`](Self::SUB_SCALES); `[0, 0]` for the others.
    fn sub_scales(_block: &[u8]) -> [i8; 2] {
        [0, 0]
    }

    /// Writes one block's 32 values (`sc`: its sub-scales, `[0, 0]` without them).
    fn dequantize_block(qs: &[u8], d: f32, m: f32, sc: [i8; 2], out: &mut [f32]);
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

    fn dequantize_block(qs: &[u8], d: f32, m: f32, _sc: [i8; 2], out: &mut [f32]) {
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

    fn dequantize_block(qs: &[u8], d: f32, _m: f32, _sc: [i8; 2], out: &mut [f32]) {
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

    fn dequantize_block(qs: &[u8], d: f32, _m: f32, _sc: [i8; 2], out: &mut [f32]) {
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

    fn dequantize_block(qs: &[u8], d: f32, _m: f32, _sc: [i8; 2], out: &mut [f32]) {
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

    fn dequantize_block(qs: &[u8], d: f32, m: f32, _sc: [i8; 2], out: &mut [f32]) {
        for (o, q) in out.iter_mut().zip(unpack_5bit(qs)) {
            *o = f32::from(q) * d + m;
        }
    }
}

/// Q6_K's weights regrouped into blocks of 32, held at 7 bits a weight (Q6_K: 6.56, its
/// Q8_0 requantization: 8.5), with the file's bits: weight `j` = `d sc_{j/16} (q_j - 32)`,
/// `q_j` unsigned 6-bit, `d` the super-block's f16 scale and `sc` its signed 8-bit scales
/// of 16 weights (`block_q6_K` and `dequantize_row_q6_K` in `ggml-quants.c`).
///
/// A block (what [`Q6K::from_q6_k`] writes, 28 bytes) is `{ d: f16, sc: [i8; 2], ql: [u8;
/// 16], qh: [u8; 8] }`: the low nibble of `ql[j]` holds bits 0-3 of weight `j`, its high
/// nibble those of weight `16 + j`; bits 4-5 of weight `16h + 4k + i` (`h` < 2, `k`, `i` <
/// 4) are bits `2k..2k + 2` of `qh[4h + i]`. So the 4 nibble chunks are Q4_1's, and the two
/// chunks of `qh` give the high bits of each nibble chunk `c` with one shift by `2c` for
/// all bytes of a register (`kernels`).
#[derive(Debug, Clone, Copy)]
pub struct Q6K;

impl Q6K {
    /// Bytes of a `block_q6_K` (256 weights).
    pub const SUPER_BLOCK_BYTES: usize = 210;
    /// Weights per `block_q6_K` (`QK_K`).
    pub const SUPER_BLOCK_WEIGHTS: usize = 256;

    /// `block_q6_K { ql[128], qh[64], scales[16], d }` super-blocks (210 bytes each) as 8
    /// blocks of this format each, bit for bit (no rounding).
    ///
    /// # Panics
    /// When `src` is not a whole number of super-blocks.
    pub fn from_q6_k(src: &[u8]) -> Vec<u8> {
        assert!(
            src.len() % Self::SUPER_BLOCK_BYTES == 0,
            "{} bytes",
            src.len()
        );
        let n = src.len() / Self::SUPER_BLOCK_BYTES;
        let mut out = Vec::with_capacity(n * 8 * Self::BYTES);
        for sb in src.chunks_exact(Self::SUPER_BLOCK_BYTES) {
            let (ql, qh, scales, d) = (&sb[..128], &sb[128..192], &sb[192..208], &sb[208..]);
            // Weight w of the super-block (dequantize_row_q6_K): in half n = w / 128, with
            // l = w % 32 and k = (w % 128) / 32, its nibble is ql[64n + l + 32 (k % 2)] (low
            // for k < 2, high otherwise) and its high bits are bits 2k.. of qh[32n + l].
            let q = |w: usize| -> u8 {
                let (n, k, l) = (w / 128, (w % 128) / 32, w % 32);
                let byte = ql[64 * n + l + 32 * (k % 2)];
                let nibble = if k < 2 { byte & 0x0F } else { byte >> 4 };
                nibble | (((qh[32 * n + l] >> (2 * k)) & 3) << 4)
            };
            for blk in 0..Self::SUPER_BLOCK_WEIGHTS / QK {
                let q: Vec<u8> = (0..QK).map(|j| q(QK * blk + j)).collect();
                out.extend_from_slice(d);
                out.extend_from_slice(&[scales[2 * blk], scales[2 * blk + 1]]);
                out.extend((0..QK / 2).map(|j| (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)));
                let mut high = [0u8; 8];
                for (j, &v) in q.iter().enumerate() {
                    let (h, k, i) = (j / 16, (j % 16) / 4, j % 4);
                    high[4 * h + i] |= (v >> 4) << (2 * k);
                }
                out.extend_from_slice(&high);
            }
        }
        out
    }
}

/// The 32 unsigned 6-bit quants of a held [`Q6K`] block's 24 quant bytes.
fn unpack_6bit(qs: &[u8]) -> [u8; QK] {
    let mut q = [0u8; QK];
    for (j, v) in q.iter_mut().enumerate() {
        let nibble = if j < 16 {
            qs[j] & 0x0F
        } else {
            qs[j - 16] >> 4
        };
        let (h, k, i) = (j / 16, (j % 16) / 4, j % 4);
        *v = nibble | (((qs[16 + 4 * h + i] >> (2 * k)) & 3) << 4);
    }
    q
}

impl QuantFormat for Q6K {
    const NAME: &'static str = "Q6_K";
    const BYTES: usize = 28;
    const QS: usize = 24;
    const HAS_MIN: bool = false;
    const SUB_SCALES: bool = true;
    const Q8_K_ACTIVATIONS: bool = true;
    const KERNEL: Kernel = Kernel::Q6K;

    fn split(b: &[u8], qs: &mut [u8]) -> (f16, f16) {
        qs.copy_from_slice(&b[4..28]);
        (f16::from_le_bytes([b[0], b[1]]), f16::ZERO)
    }

    fn sub_scales(b: &[u8]) -> [i8; 2] {
        [b[2] as i8, b[3] as i8]
    }

    /// `(d · sc) · (q - 32)`, the order of `dequantize_row_q6_K`.
    fn dequantize_block(qs: &[u8], d: f32, _m: f32, sc: [i8; 2], out: &mut [f32]) {
        for (j, (o, q)) in out.iter_mut().zip(unpack_6bit(qs)).enumerate() {
            *o = d * f32::from(sc[j / 16]) * f32::from(q as i8 - 32);
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
    /// `nb` integer sums of the first 16 quants of each block (the Q6_K kernel's offset per
    /// sub-scale).
    pub(crate) qsum_lo: Vec<i32>,
}

impl ActRow {
    /// A row of `nb` blocks of zeros.
    fn zeroed(nb: usize) -> Self {
        Self {
            qs: vec![0; nb * QK],
            d: vec![0.0; nb],
            s: vec![0.0; nb],
            qsum: vec![0; nb],
            qsum_lo: vec![0; nb],
        }
    }

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
        let mut row = Self::zeroed(x.len() / QK);
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

impl ActRow {
    /// Quantizes `x` (a multiple of 256 values) as ggml's `quantize_row_q8_K_ref`: per 256
    /// values, `max` the value of largest magnitude (the first one), `iscale = -127 / max`,
    /// `q = nearest_int(iscale x)` (half to even) at most 127, `d = 1 / iscale` kept in f32.
    /// Held per block of 32 like the other rows: `d` repeated for the super-block's 8
    /// blocks, `qsum` and `qsum_lo` per block (ggml's `bsums` are per 16), `s` unused (zero).
    /// Scalar code, the same at every level.
    ///
    /// # Panics
    /// When `x` is not a multiple of 256 values long.
    pub(crate) fn quantize_q8_k(x: &[f32]) -> Self {
        const QK_K: usize = 256;
        assert!(x.len() % QK_K == 0, "{} values", x.len());
        let mut row = Self::zeroed(x.len() / QK);
        for (i, xs) in x.chunks_exact(QK_K).enumerate() {
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in xs {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            // An all-zero super-block keeps d = 0 and q = 0.
            if amax != 0.0 {
                let iscale = -127.0 / max;
                for (q, &v) in row.qs[i * QK_K..(i + 1) * QK_K].iter_mut().zip(xs) {
                    // nearest_int: adding 1.5 * 2^23 rounds half to even into the mantissa.
                    let v =
                        ((iscale * v + 12_582_912.0).to_bits() & 0x007F_FFFF) as i32 - 0x0040_0000;
                    *q = v.min(127) as i8;
                }
                row.d[i * 8..(i + 1) * 8].fill(1.0 / iscale);
            }
        }
        for (b, qs) in row.qs.chunks_exact(QK).enumerate() {
            let sum = |q: &[i8]| q.iter().map(|&v| i32::from(v)).sum::<i32>();
            row.qsum_lo[b] = sum(&qs[..QK / 2]);
            row.qsum[b] = row.qsum_lo[b] + sum(&qs[QK / 2..]);
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
        let sum_lo = qs[..QK / 2].iter().map(|&q| i32::from(q)).sum();
        row.d[b] = f16::from_f32(d).to_f32();
        row.s[b] = f16::from_f32(sum as f32 * d).to_f32();
        row.qsum[b] = sum;
        row.qsum_lo[b] = sum_lo;
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
            row.qsum_lo
                .push(qs[..QK / 2].iter().map(|&q| i32::from(q)).sum());
        }
        row
    }

    /// ggml's `quantize_row_q8_K_ref` as written there, on 256 values: `(d, qs)`.
    fn reference_q8_k(x: &[f32]) -> (f32, Vec<i8>) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            return (0.0, vec![0; 256]);
        }
        let iscale = -127.0 / max;
        // nearest_int: rint, ties to even.
        let qs = x
            .iter()
            .map(|&v| ((iscale * v).round_ties_even() as i32).min(127) as i8)
            .collect();
        (1.0 / iscale, qs)
    }

    /// The q8_K row has ggml's quants and scale, and the block sums of those quants: random
    /// values, a super-block whose largest value is negative, one of exact halves (`k + 0.5`
    /// with `iscale = 1`, where ties go to even), one of zeros.
    #[test]
    fn q8_k_quantizes_as_the_reference() {
        let mut s = 3u64;
        let mut x: Vec<f32> = (0..256 * 3)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 6.0 - 3.0
            })
            .collect();
        x[300] = -9.0;
        x.extend((0..256).map(|i| match i {
            0 => -127.0,
            _ => ((i % 120) as f32 + 0.5) * if i % 2 == 0 { 1.0 } else { -1.0 },
        }));
        x.extend([0.0; 256]);
        let row = ActRow::quantize_q8_k(&x);
        for (i, xs) in x.chunks_exact(256).enumerate() {
            let (d, qs) = reference_q8_k(xs);
            assert_eq!(
                &row.qs[i * 256..(i + 1) * 256],
                qs.as_slice(),
                "super-block {i}"
            );
            assert!(row.d[i * 8..(i + 1) * 8]
                .iter()
                .all(|&v| v.to_bits() == d.to_bits()));
        }
        for (b, qs) in row.qs.chunks_exact(QK).enumerate() {
            let sum = |q: &[i8]| q.iter().map(|&v| i32::from(v)).sum::<i32>();
            assert_eq!(row.qsum_lo[b], sum(&qs[..16]));
            assert_eq!(row.qsum[b], sum(qs));
        }
        // The halves really tie to even: -1.5 to -2, 2.5 to 2, -3.5 to -4.
        assert_eq!(&row.qs[768 + 1..768 + 4], &[-2, 2, -4]);
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
            assert_eq!(got.qsum_lo, want.qsum_lo, "{level}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.d), bits(&want.d), "{level}");
            assert_eq!(bits(&got.s), bits(&want.s), "{level}");
        }
    }
}
