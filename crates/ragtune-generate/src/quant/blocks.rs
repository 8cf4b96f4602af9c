//! The GGUF block formats this crate multiplies itself, and the q8 activation rows their dot
//! products take (`ggml-common.h`, `ggml-quants.c`).
//!
//! In the file a block is `block_q4_1 { d: f16, m: f16, qs: [u8; 16] }` (20 bytes; weight
//! `j` = `d * q_j + m`, `q_j` the low nibble of `qs[j]` for `j < 16`, the high nibble of
//! `qs[j - 16]` otherwise) or `block_q8_0 { d: f16, qs: [i8; 32] }` (34 bytes; weight `j` =
//! `d * qs[j]`). In memory a matrix keeps the same bytes split into three arrays (all `qs`,
//! all `d`, all `m`), so the kernels convert eight scales with one instruction and load the
//! quants of consecutive blocks from consecutive addresses.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::kernels;

/// Weights per block (`QK4_1`, `QK8_0`, `QK8_1` in ggml).
pub(crate) const QK: usize = 32;

/// One row of a matrix in split form: `nb` blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowRef<'a> {
    /// `nb * F::QS` bytes.
    pub(crate) qs: &'a [u8],
    /// `nb` scales.
    pub(crate) d: &'a [f16],
    /// `nb` minimums (empty for formats without one).
    pub(crate) m: &'a [f16],
}

/// A GGUF block format with its dot product against a q8 activation row.
pub(crate) trait QuantFormat: Send + Sync + 'static {
    /// The GGUF type.
    const DTYPE: GgmlDType;
    /// Bytes per block in the file.
    const BYTES: usize;
    /// Bytes of quants per block.
    const QS: usize;
    /// Whether blocks carry a minimum `m`.
    const HAS_MIN: bool;

    /// Splits one block (`BYTES` long, little-endian) into its quants (written to `qs`,
    /// `QS` long) and `(d, m)` (`m` is zero without a minimum).
    fn split(block: &[u8], qs: &mut [u8]) -> (f16, f16);

    /// Writes one block's 32 values.
    fn dequantize_block(qs: &[u8], d: f32, m: f32, out: &mut [f32]);

    /// The dot product of one weight row with one activation row of as many blocks.
    fn dot(row: RowRef<'_>, x: &ActRow) -> f32;

    /// [`dot`](Self::dot) of one weight row with each of `xs` (at most
    /// [`kernels::MAX_ROWS`]) into `out`, bit for bit, sharing the weight loads.
    fn dot_rows(row: RowRef<'_>, xs: &[ActRow], out: &mut [f32]);
}

/// Q4_1: 4-bit quants with a scale and a minimum per block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q4_1;

/// Q8_0: 8-bit quants with a scale per block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8_0;

impl QuantFormat for Q4_1 {
    const DTYPE: GgmlDType = GgmlDType::Q4_1;
    const BYTES: usize = 20;
    const QS: usize = 16;
    const HAS_MIN: bool = true;

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

    #[inline]
    fn dot(row: RowRef<'_>, x: &ActRow) -> f32 {
        kernels::dot_q4_1(row, x)
    }

    #[inline]
    fn dot_rows(row: RowRef<'_>, xs: &[ActRow], out: &mut [f32]) {
        kernels::dot_q4_1_rows(row, xs, out)
    }
}

impl QuantFormat for Q8_0 {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const BYTES: usize = 34;
    const QS: usize = 32;
    const HAS_MIN: bool = false;

    fn split(b: &[u8], qs: &mut [u8]) -> (f16, f16) {
        qs.copy_from_slice(&b[2..34]);
        (f16::from_le_bytes([b[0], b[1]]), f16::ZERO)
    }

    fn dequantize_block(qs: &[u8], d: f32, _m: f32, out: &mut [f32]) {
        for (o, &q) in out.iter_mut().zip(qs) {
            *o = f32::from(q as i8) * d;
        }
    }

    #[inline]
    fn dot(row: RowRef<'_>, x: &ActRow) -> f32 {
        kernels::dot_q8_0(row, x)
    }

    #[inline]
    fn dot_rows(row: RowRef<'_>, xs: &[ActRow], out: &mut [f32]) {
        kernels::dot_q8_0_rows(row, xs, out)
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
}

impl ActRow {
    /// Quantizes `x` (a multiple of 32 values) as ggml's `quantize_row_q8_1_ref` does: per
    /// block `d = max|x| / 127`, `q = round(x / d)`, `s = d Σ q`. The Q8_0 dot product uses
    /// the same `d` and `q` (`quantize_row_q8_0_ref`) and ignores `s`.
    pub(crate) fn quantize(x: &[f32]) -> Self {
        let nb = x.len() / QK;
        let mut row = Self {
            qs: vec![0; nb * QK],
            d: Vec::with_capacity(nb),
            s: Vec::with_capacity(nb),
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
        }
        row
    }
}
