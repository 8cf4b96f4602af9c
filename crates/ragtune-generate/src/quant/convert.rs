//! Every GGUF block format without a kernel of its own, rewritten at load into one that has
//! one ([`Q4_1`](super::Q4_1), [`Q5_1`](super::Q5_1), [`Q6K`](super::Q6K) or
//! [`Q8_0`](super::Q8_0)), so one set of kernels serves any quantized file (llama.cpp's CPU
//! "repack" does the same for its own layouts). Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 have kernels
//! and are held as stored. Every conversion works on whole blocks, so the loader converts a
//! tensor 16 rows at a time.
//!
//! Block layouts from `ggml-common.h`, the decodings from `dequantize_row_*` in
//! `ggml-quants.c`:
//!
//! | source | bytes / 32 weights | becomes | how | exact? |
//! |---|--:|---|---|---|
//! | Q4_K 256-blocks `{d, dmin, scales[12], qs[128]}`, `w = d·sc_j q - dmin·m_j` per 32 | 18 | Q4_1 (20) | per 32: `d' = f16(d·sc_j)`, `m' = f16(-dmin·m_j)` | scales rounded to f16: each within 2^-11 relative |
//! | Q5_K `{d, dmin, scales[12], qh[32], qs[128]}` | 22 | Q5_1 (24) | as Q4_K, with bit 4 from `qh` | scales rounded to f16 |
//! | Q6_K `{ql[128], qh[64], scales[16], d}` per 256, `w = d·sc_i (q - 32)` per 16 | 26.25 | Q6_K in blocks of 32 (28) | the same bits regrouped: `d`, two `sc`, 24 bytes of quants | yes |
//! | any other (Q2_K, Q3_K, Q8_1) | | Q8_0 (34) | dequantized (candle's `to_float`), then `quantize_row_q8_0_ref` | within half a q8 step (`max|w| / 254` per block) |
//!
//! Q6_K was requantized to Q8_0 until 2026-12-08 (8.5 bits a weight in memory against 6.6
//! in the file); held in blocks of 32 it takes 7.

use candle_core::quantized::k_quants::GgmlType;
use half::f16;

use ragtune_quant::QK;

/// Bytes of a `block_q5_0`.
#[cfg(test)]
const Q5_0_BYTES: usize = 22;
/// Weights per k-quant super-block (`QK_K`).
const QK_K: usize = 256;
/// Bytes of a `block_q4_K`.
const Q4_K_BYTES: usize = 144;
/// Bytes of a `block_q5_K`.
const Q5_K_BYTES: usize = 176;
/// Bytes of a `block_q5_1`, what the Q5_1 conversion writes.
const Q5_1_BYTES: usize = 24;
/// Bytes of a `block_q4_1`, what the Q4_1 conversions write.
const Q4_1_BYTES: usize = 20;
/// Bytes of a `block_q8_0`, what the Q8_0 conversion writes.
#[cfg(test)]
const Q8_0_BYTES: usize = 34;

fn read_f16(b: &[u8]) -> f16 {
    f16::from_le_bytes([b[0], b[1]])
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K super-block
/// (`get_scale_min_k4` in `ggml-quants.c`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K super-blocks as eight Q4_1 blocks each. Sub-block `2k` holds the low nibbles of
/// `qs[32k..32k + 32]`, sub-block `2k + 1` their high nibbles; a Q4_1 block holds weight `j`
/// in the low nibble of byte `j` and weight `16 + j` in its high nibble.
pub(crate) fn q4_k_as_q4_1(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / Q4_K_BYTES * 8 * Q4_1_BYTES);
    for b in src.chunks_exact(Q4_K_BYTES) {
        let (d, dmin) = (read_f16(&b[0..2]).to_f32(), read_f16(&b[2..4]).to_f32());
        let (scales, qs) = (&b[4..16], &b[16..144]);
        for j in 0..QK_K / QK {
            let (sc, m) = scale_min_k4(j, scales);
            let src_qs = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let nibble = |e: usize| {
                if j % 2 == 0 {
                    src_qs[e] & 0x0F
                } else {
                    src_qs[e] >> 4
                }
            };
            out.extend_from_slice(&f16::from_f32(d * f32::from(sc)).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(-(dmin * f32::from(m))).to_le_bytes());
            out.extend((0..QK / 2).map(|e| nibble(e) | (nibble(e + QK / 2) << 4)));
        }
    }
    out
}

/// Q5_K super-blocks as eight Q5_1 blocks each: as [`q4_k_as_q4_1`], with bit 4 of weight
/// `l` of sub-block `s` from bit `s` of `qh[l]` (`dequantize_row_q5_K`).
pub(crate) fn q5_k_as_q5_1(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / Q5_K_BYTES * 8 * Q5_1_BYTES);
    for b in src.chunks_exact(Q5_K_BYTES) {
        let (d, dmin) = (read_f16(&b[0..2]).to_f32(), read_f16(&b[2..4]).to_f32());
        let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
        for j in 0..QK_K / QK {
            let (sc, m) = scale_min_k4(j, scales);
            let src_qs = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let q = |l: usize| {
                let nibble = if j % 2 == 0 {
                    src_qs[l] & 0x0F
                } else {
                    src_qs[l] >> 4
                };
                nibble | (((qh[l] >> j) & 1) << 4)
            };
            out.extend_from_slice(&f16::from_f32(d * f32::from(sc)).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(-(dmin * f32::from(m))).to_le_bytes());
            let high: u32 = (0..QK).map(|l| u32::from(q(l) >> 4) << l).sum();
            out.extend_from_slice(&high.to_le_bytes());
            out.extend((0..QK / 2).map(|e| (q(e) & 0x0F) | ((q(e + QK / 2) & 0x0F) << 4)));
        }
    }
    out
}

/// Q6_K super-blocks (210 bytes, 256 weights) as eight blocks of 32 of
/// [`Q6K`](super::Q6K), bit for bit ([`ragtune_quant::Q6K::from_q6_k`]).
pub(crate) fn q6_k_regrouped(src: &[u8]) -> Vec<u8> {
    ragtune_quant::Q6K::from_q6_k(src)
}

/// Blocks of candle's `T` (a format without a kernel of its own: Q3_K, Q2_K, Q8_1)
/// requantized to Q8_0: dequantized by candle's `T::to_float` (ggml's `dequantize_row_*`),
/// then [`quantize_q8_0`](ragtune_quant::quantize_q8_0). The bits of dequantizing the whole
/// tensor first, for any slice of whole blocks, so a tensor is converted 16 rows at a time and
/// never exists in f32 (a Q6_K output matrix of a 1B model would be 1 GB of f32).
///
/// # Panics
/// When `src` is not whole blocks of `T`.
pub(crate) fn as_q8_0<T: GgmlType>(src: &[u8]) -> Vec<u8> {
    let block_bytes = std::mem::size_of::<T>();
    assert_eq!(src.len() % block_bytes, 0, "whole {:?} blocks", T::DTYPE);
    let n = src.len() / block_bytes;
    let mut blocks = vec![T::zeros(); n];
    // SAFETY: candle's block types are `repr(C)` structs of integers, byte arrays and f16
    // (plain data, any bit pattern valid, no padding: candle asserts each size), and `blocks`
    // holds exactly `src.len()` bytes of them.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), blocks.as_mut_ptr().cast::<u8>(), src.len());
    }
    let mut values = vec![0f32; n * T::BLCK_SIZE];
    T::to_float(&blocks, &mut values);
    ragtune_quant::quantize_q8_0(&values)
}

/// Q5_0 blocks as Q8_0 blocks: the 5-bit quants minus 16 as bytes, the same `d` (the load
/// path before the Q5_0 kernel; the tests check the kernel against it).
#[cfg(test)]
pub(crate) fn q5_0_as_q8_0(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / Q5_0_BYTES * Q8_0_BYTES);
    for b in src.chunks_exact(Q5_0_BYTES) {
        out.extend_from_slice(&b[0..2]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let low = (0..16).map(|j| (qs[j] & 0x0F) | ((((qh >> j) << 4) & 0x10) as u8));
        let high = (0..16).map(|j| (qs[j] >> 4) | (((qh >> (j + 12)) & 0x10) as u8));
        out.extend(low.chain(high).map(|q| (q as i8 - 16) as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;
    use ragtune_quant::{quantize_q8_0, QMatrix, Q4_1, Q5_0, Q5_1, Q6K, Q8_0};

    /// `(rows, cols)` seeded values, a few blocks scaled up so that scales differ a lot.
    fn values(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut s = seed;
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0;
                if (i / 32) % 7 == 3 {
                    v * 9.0
                } else {
                    v
                }
            })
            .collect();
        Tensor::from_vec(vals, (rows, cols), &Device::Cpu).expect("test value")
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("test value")
    }

    /// The converted matrix dequantized, and candle's dequantization of the source.
    fn both(dtype: GgmlDType, convert: fn(&[u8]) -> Vec<u8>, q4: bool) -> (Vec<f32>, Vec<f32>) {
        let (rows, cols) = (19, 512);
        let q = QTensor::quantize(&values(rows, cols, 3), dtype).expect("test value");
        let bytes = convert(&q.data().expect("test value"));
        let ours = if q4 {
            QMatrix::<Q4_1>::from_blocks(rows, cols, &bytes).map(|m| m.dequantize())
        } else {
            QMatrix::<Q8_0>::from_blocks(rows, cols, &bytes).map(|m| m.dequantize())
        }
        .expect("test value");
        let theirs = q.dequantize(&Device::Cpu).expect("test value");
        (ours, flat(&theirs))
    }

    #[test]
    fn q5_0_becomes_q8_0_exactly() {
        let (ours, theirs) = both(GgmlDType::Q5_0, q5_0_as_q8_0, false);
        assert!(ours == theirs);
    }

    /// Each weight of `ours` within `3 · 2^-11 · max|w|` of `theirs`, per 256-block: the bound
    /// of a k-quant whose scales were rounded to f16 (the tests below derive it).
    fn assert_within_scale_rounding(ours: &[f32], theirs: &[f32]) {
        for (o, t) in ours.chunks_exact(QK_K).zip(theirs.chunks_exact(QK_K)) {
            let amax = t.iter().fold(0f32, |a, v| a.max(v.abs()));
            let bound = amax * 3.0 / 2048.0 + 1e-7;
            for (a, b) in o.iter().zip(t) {
                assert!((a - b).abs() <= bound, "{a} vs {b} (bound {bound})");
            }
        }
    }

    /// Each weight within the f16 rounding of its block's two scales: `|d' - d·sc| <=
    /// 2^-11 d·sc` and the same for `dmin·m`, so `|w' - w| <= 2^-11 (15 d·sc + dmin·m)`;
    /// `15 d·sc` spans the block's range (at most `2 max|w|`) and `dmin·m` is at most
    /// `max|w|`, so `3 · 2^-11 · max|w|` of the 256-block bounds it.
    #[test]
    fn q4_k_becomes_q4_1_within_the_scale_rounding() {
        let (ours, theirs) = both(GgmlDType::Q4K, q4_k_as_q4_1, true);
        assert_within_scale_rounding(&ours, &theirs);
    }

    /// Q5_K as Q5_1 within the f16 rounding of the scales: as for Q4_K, with 31 steps in place
    /// of 15, so `|w' - w| <= 2^-11 (31 d·sc + dmin·m) <= 3 · 2^-11 · max|w|` again.
    #[test]
    fn q5_k_becomes_q5_1_within_the_scale_rounding() {
        let (rows, cols) = (19, 512);
        let q = QTensor::quantize(&values(rows, cols, 3), GgmlDType::Q5K).expect("test value");
        let bytes = q5_k_as_q5_1(&q.data().expect("test value"));
        let ours = QMatrix::<Q5_1>::from_blocks(rows, cols, &bytes)
            .expect("test value")
            .dequantize();
        let theirs = flat(&q.dequantize(&Device::Cpu).expect("test value"));
        assert_within_scale_rounding(&ours, &theirs);
    }

    /// The Q5_0 kernel gives the bits of the Q8_0 kernel on the exact Q8_0 conversion (how
    /// Q5_0 was served before it had a kernel, and what the golden tests were first run on):
    /// both sum `(q - 16) x` exactly in integers.
    #[test]
    fn q5_0_kernel_equals_the_q8_0_conversion_bit_for_bit() {
        let (rows, cols) = (37, 512);
        let q = QTensor::quantize(&values(rows, cols, 5), GgmlDType::Q5_0).expect("test value");
        let bytes = q.data().expect("test value");
        let native = QMatrix::<Q5_0>::from_blocks(rows, cols, &bytes).expect("test value");
        let converted =
            QMatrix::<Q8_0>::from_blocks(rows, cols, &q5_0_as_q8_0(&bytes)).expect("test value");
        for t in [1, 5, 70] {
            let x = flat(&values(t, cols, 9 + t as u64));
            let (a, b) = (native.matmul(&x, t), converted.matmul(&x, t));
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "t = {t}"
            );
        }
    }

    /// Q6_K regrouped in blocks of 32, converted three rows at a time as the loader streams
    /// it, dequantizes to candle's values bit for bit.
    #[test]
    fn q6_k_regrouped_dequantizes_to_the_file_values() {
        let (rows, cols) = (19, 768);
        let q = QTensor::quantize(&values(rows, cols, 11), GgmlDType::Q6K).expect("test value");
        let bytes = q.data().expect("test value");
        let streamed: Vec<u8> = bytes
            .chunks(3 * bytes.len() / rows)
            .flat_map(q6_k_regrouped)
            .collect();
        let ours = QMatrix::<Q6K>::from_blocks(rows, cols, &streamed)
            .expect("test value")
            .dequantize();
        let theirs = flat(&q.dequantize(&Device::Cpu).expect("test value"));
        assert!(ours == theirs);
    }

    type Conversion = fn(&[u8]) -> Vec<u8>;

    /// The streamed conversion of a few rows at a time gives the bits of candle's whole-tensor
    /// dequantization followed by `quantize_q8_0` (how these formats were loaded before).
    #[test]
    fn streamed_q8_0_conversion_equals_the_whole_tensor_one() {
        use candle_core::quantized::k_quants::{BlockQ2K, BlockQ3K, BlockQ8_1};
        let cases: [(GgmlDType, Conversion); 3] = [
            (GgmlDType::Q3K, as_q8_0::<BlockQ3K>),
            (GgmlDType::Q2K, as_q8_0::<BlockQ2K>),
            (GgmlDType::Q8_1, as_q8_0::<BlockQ8_1>),
        ];
        for (dtype, convert) in cases {
            let (rows, cols) = (19, 512);
            let q = QTensor::quantize(&values(rows, cols, 7), dtype).expect("test value");
            let whole = quantize_q8_0(&flat(&q.dequantize(&Device::Cpu).expect("test value")));
            let bytes = q.data().expect("test value");
            // Three rows at a time, as a loader reading a few rows would.
            let row_bytes = bytes.len() / rows;
            let streamed: Vec<u8> = bytes.chunks(3 * row_bytes).flat_map(convert).collect();
            assert!(streamed == whole, "{dtype:?}");
        }
    }

    /// Requantized k-quants: within half a q8 step of candle's dequantization.
    #[test]
    fn requantized_k_quants_are_within_half_a_q8_step() {
        for dtype in [GgmlDType::Q3K, GgmlDType::Q2K] {
            let q = QTensor::quantize(&values(19, 512, 3), dtype).expect("test value");
            let theirs = flat(&q.dequantize(&Device::Cpu).expect("test value"));
            let bytes = quantize_q8_0(&theirs);
            let ours = QMatrix::<Q8_0>::from_blocks(19, 512, &bytes)
                .map(|m| m.dequantize())
                .expect("test value");
            for (o, t) in ours.chunks_exact(QK).zip(theirs.chunks_exact(QK)) {
                let amax = t.iter().fold(0f32, |a, v| a.max(v.abs()));
                // Half a step, plus the f16 rounding of d (2^-11 of 127 steps).
                let bound = amax / 254.0 + amax / 2048.0 + 1e-7;
                for (a, b) in o.iter().zip(t) {
                    assert!((a - b).abs() <= bound, "{dtype:?}: {a} vs {b}");
                }
            }
        }
    }
}
