//! Block-quantized matrices (the GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q6_K and Q8_0 block formats) and
//! f16 matrices, with their matmul
//! kernels, chosen at run time: the hot loop of the generator's decode and prefill
//! (`ragtune-generate`, GGUF weights) and of the sentence encoder's projections
//! (`ragtune-embed`, BERT weights quantized to Q8_0 at load).
//!
//! candle 0.11 has no SIMD kernel for Q4_1 (its Q4_0, Q8_0 and k-quant kernels are vectorised,
//! Q4_1 falls back to scalar code), and SmolLM2-135M-Instruct ships its projections as Q4_1
//! and its tied embedding/output matrix as Q8_0. candle's quantized matmul also runs on its
//! own thread pool, which spins and yields while waiting. So this crate implements both
//! formats on the rayon pool:
//!
//! - **Formats** (`ggml-common.h`), blocks of 32 weights:
//!   `block_q4_1 { d: f16, m: f16, qs: [u8; 16] }` (20 bytes), weight `j` = `d * q_j + m`,
//!   `q_j` the low nibble of `qs[j]` for `j < 16`, the high nibble of `qs[j - 16]` otherwise;
//!   `block_q8_0 { d: f16, qs: [i8; 32] }` (34 bytes), weight `j` = `d * qs[j]`;
//!   `block_q4_0 { d, qs[16] }` (18 bytes), weight `d (q_j - 8)`; `block_q5_0 { d, qh[4],
//!   qs[16] }` (22 bytes) and `block_q5_1 { d, m, qh[4], qs[16] }` (24 bytes), Q4_0/Q4_1's
//!   nibbles with bit 4 of weight `j` in bit `j` of `qh`, weight `d (q_j - 16)` or
//!   `d q_j + m`. Held interleaved in groups of 16 rows (module `blocks`): the same bytes as
//!   the file, regrouped.
//! - **Every product is integer**, for one token (decode) as for 512 (prefill): each
//!   activation row is quantized as llama.cpp does (`block_q8_1 { d, s = d Σq, qs }` for the
//!   formats with a minimum, `block_q8_0` for the others; `d = max|x| / 127`,
//!   `q = round(x / d)`), and each output is `Σ_blocks d_w d_x Σ q_w q_x (+ m_w s_x)` (the
//!   offsets of Q4_0/Q5_0 subtracted from the integer sum), exactly ggml's
//!   `ggml_vec_dot_{q4_0,q5_0,q8_0}_q8_0` / `ggml_vec_dot_{q4_1,q5_1}_q8_1`, computed for 16
//!   weight rows and 4 activation rows at a time (module `kernels`: AVX-512 VNNI, AVX2 or
//!   portable, each for every format, chosen at run time). An activation row's
//!   result does not depend on how many rows are multiplied with it, so a prompt prefilled in
//!   one call or in pieces, and a sequence decoded alone or in a batch, see the same numbers.
//! - **Q6_K** ([`Q6K`]): its super-blocks of 256 regrouped into blocks of 32 with the same
//!   bits (`d`, two 8-bit sub-scales, 6-bit quants: 7 bits a weight), multiplied with
//!   activations quantized as llama.cpp does for k-quants (`block_q8_K`, one scale per 256
//!   values): ggml's `ggml_vec_dot_q6_K_q8_K`, summed per block of 32.
//! - **Other formats** (the other k-quants ...) are rewritten into these by the generator at
//!   load (`ragtune-generate`'s `quant::convert`), and f32 weights are quantized
//!   to Q8_0 with [`quantize_q8_0`] (ggml's `quantize_row_q8_0_ref`).
//! - **F16 weights** stay f16 ([`F16Matrix`]): converted to f32 a slab of rows at a time
//!   inside each parallel task and multiplied with an f32 GEMM.
//! - **Dense f32 matrices multiplied many times** ([`packed`]): packed once for own AVX-512
//!   f32 and AMX bfloat16 GEMM kernels (training's frozen weights, the encoder's bf16
//!   projections).
//! - **Parallel work**: tasks of 64 weight rows × 64 activation rows handed out one at a time
//!   on the rayon pool ([`for_each_dynamic`]), so a core taken by another process delays one
//!   task, not half the matrix.

mod blocks;
mod half_matrix;
mod kernels;
pub mod packed;

use std::marker::PhantomData;
use std::sync::Arc;

use half::f16;
use ragtune_util::cpu::SimdLevel;
use ragtune_util::ptr::SyncPtr;
use rayon::prelude::*;

use blocks::ActRow;
pub use blocks::{QuantFormat, Q4_0, Q4_1, Q5_0, Q5_1, Q6K, Q8_0, QK};
pub use half_matrix::F16Matrix;
pub use kernels::Kernel;
use kernels::{GroupRef, GROUP};

/// What this crate refuses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A matrix whose shape or bytes do not fit its block format.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What was found, and what was expected.
        what: String,
    },
}

/// Why [`QMatrix::from_row_source`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FromRowsError<E> {
    /// The shape does not fit the block format.
    #[error(transparent)]
    Shape(Error),
    /// The row source failed (for a file: the read error).
    #[error("reading the rows: {0}")]
    Source(E),
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Weight groups (`GROUP` = 16 rows each) per parallel task: 64 rows.
const GROUPS_PER_TASK: usize = 4;

/// Activation rows per parallel task.
const ACT_ROWS_PER_TASK: usize = 64;

/// A `(rows, cols)` block-quantized weight, `cols / 32` blocks per row, held interleaved in
/// groups of `GROUP` = 16 rows (module `blocks`).
#[derive(Debug, Clone)]
pub struct QMatrix<F> {
    rows: usize,
    cols: usize,
    /// `groups * nb * GROUP * F::QS` bytes.
    qs: Arc<[u8]>,
    /// `groups * nb * GROUP` scales.
    d: Arc<[f16]>,
    /// `groups * nb * GROUP` minimums, empty for formats without one.
    m: Arc<[f16]>,
    /// `groups * nb * 2 * GROUP` sub-scales (per block the 16 rows' first, then their
    /// second), empty for formats without them.
    sc: Arc<[i8]>,
    format: PhantomData<F>,
}

impl<F: QuantFormat> QMatrix<F> {
    /// A `(rows, cols)` matrix from its blocks in the file format of `F` (row after row).
    ///
    /// # Errors
    /// [`Error::Unsupported`] when `cols` is not a multiple of 32 or `bytes` does not hold
    /// `rows * cols / 32` blocks.
    pub fn from_blocks(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let expected = rows * (cols / QK) * F::BYTES;
        if cols % QK == 0 && bytes.len() != expected {
            return Err(Error::Unsupported {
                what: format!(
                    "{} tensor of {} bytes for {} blocks of {}",
                    F::NAME,
                    bytes.len(),
                    rows * (cols / QK),
                    F::BYTES
                ),
            });
        }
        let mut at = 0;
        Self::from_row_source(rows, cols, |buf| {
            buf.copy_from_slice(&bytes[at..at + buf.len()]);
            at += buf.len();
            Ok::<_, std::convert::Infallible>(())
        })
        .map_err(|e| match e {
            FromRowsError::Shape(e) => e,
            FromRowsError::Source(never) => match never {},
        })
    }

    /// A `(rows, cols)` matrix whose blocks (in the file format of `F`, row after row) come
    /// from `fill`, asked for up to 16 rows at a time: it must fill the buffer it is given
    /// (`n * cols / 32 * F::BYTES` bytes for the next `n` rows). The matrix is built in
    /// place, so loading a tensor from a file takes the matrix's memory plus 16 rows, not a
    /// second copy of the tensor (Gemma 3's token embedding is 178 MB).
    ///
    /// # Errors
    /// [`FromRowsError::Shape`] when `cols` is not a multiple of 32;
    /// [`FromRowsError::Source`] with what `fill` returned.
    pub fn from_row_source<E>(
        rows: usize,
        cols: usize,
        mut fill: impl FnMut(&mut [u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<Self, FromRowsError<E>> {
        if cols % QK != 0 {
            return Err(FromRowsError::Shape(Error::Unsupported {
                what: format!("{} rows of {cols} values (not a multiple of 32)", F::NAME),
            }));
        }
        let nb = cols / QK;
        let groups = rows.div_ceil(GROUP);
        let zeroed_u8 = |n: usize| -> Arc<[u8]> { std::iter::repeat_n(0, n).collect() };
        let zeroed_f16 = |n: usize| -> Arc<[f16]> { std::iter::repeat_n(f16::ZERO, n).collect() };
        // Allocated as `Arc`s and written through `get_mut`: `Arc::from(Vec)` would copy.
        let mut qs = zeroed_u8(groups * nb * GROUP * F::QS);
        let mut d = zeroed_f16(groups * nb * GROUP);
        let mut m = zeroed_f16(if F::HAS_MIN { d.len() } else { 0 });
        let mut sc: Arc<[i8]> =
            std::iter::repeat_n(0, if F::SUB_SCALES { 2 * d.len() } else { 0 }).collect();
        {
            let unique = "a new Arc has one owner";
            let qs = Arc::get_mut(&mut qs).expect(unique);
            let d = Arc::get_mut(&mut d).expect(unique);
            let m = Arc::get_mut(&mut m).expect(unique);
            let sc = Arc::get_mut(&mut sc).expect(unique);
            let mut block_qs = vec![0u8; F::QS];
            let mut buf = vec![0u8; GROUP * nb * F::BYTES];
            for g in 0..groups {
                let n = GROUP.min(rows - g * GROUP);
                let buf = &mut buf[..n * nb * F::BYTES];
                fill(buf).map_err(FromRowsError::Source)?;
                for (rr, row) in buf.chunks_exact(nb * F::BYTES).enumerate() {
                    for (b, block) in row.chunks_exact(F::BYTES).enumerate() {
                        let (scale, min) = F::split(block, &mut block_qs);
                        let at = (g * nb + b) * GROUP;
                        d[at + rr] = scale;
                        if F::HAS_MIN {
                            m[at + rr] = min;
                        }
                        if F::SUB_SCALES {
                            let [s0, s1] = F::sub_scales(block);
                            sc[2 * at + rr] = s0;
                            sc[2 * at + GROUP + rr] = s1;
                        }
                        let base = at * F::QS;
                        for (c, chunk) in block_qs.chunks_exact(4).enumerate() {
                            let dst = base + c * 4 * GROUP + rr * 4;
                            qs[dst..dst + 4].copy_from_slice(chunk);
                        }
                    }
                }
            }
        }
        Ok(Self {
            rows,
            cols,
            qs,
            d,
            m,
            sc,
            format: PhantomData,
        })
    }

    /// `(rows, cols)` = `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Group `g` (rows `16g..16g + 16`) in interleaved form.
    fn group(&self, g: usize) -> GroupRef<'_> {
        let n = (self.cols / QK) * GROUP;
        GroupRef {
            qs: &self.qs[g * n * F::QS..(g + 1) * n * F::QS],
            d: &self.d[g * n..(g + 1) * n],
            m: if F::HAS_MIN {
                &self.m[g * n..(g + 1) * n]
            } else {
                &[]
            },
            sc: if F::SUB_SCALES {
                &self.sc[2 * g * n..2 * (g + 1) * n]
            } else {
                &[]
            },
        }
    }

    /// Dequantizes row `r` into `dst` (`cols` values).
    fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        let group = self.group(r / GROUP);
        let rr = r % GROUP;
        let mut block_qs = vec![0u8; F::QS];
        for (b, out) in dst.chunks_exact_mut(QK).enumerate() {
            let base = b * GROUP * F::QS;
            for (c, chunk) in block_qs.chunks_exact_mut(4).enumerate() {
                let src = base + c * 4 * GROUP + rr * 4;
                chunk.copy_from_slice(&group.qs[src..src + 4]);
            }
            let m = if F::HAS_MIN {
                group.m[b * GROUP + rr].to_f32()
            } else {
                0.0
            };
            let sc = if F::SUB_SCALES {
                let at = 2 * b * GROUP + rr;
                [group.sc[at], group.sc[at + GROUP]]
            } else {
                [0, 0]
            };
            F::dequantize_block(&block_qs, group.d[b * GROUP + rr].to_f32(), m, sc, out);
        }
    }

    /// Rows `ids` as `(ids.len(), cols)` f32 values, row-major: a quantized token embedding's
    /// lookup (`get_rows` in ggml), which keeps the matrix in its blocks.
    ///
    /// # Panics
    /// When an id is `>= rows` (the callers check token ids first).
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (dst, &id) in out.chunks_exact_mut(self.cols).zip(ids) {
            assert!((id as usize) < self.rows, "row {id} of {}", self.rows);
            self.dequantize_row(id as usize, dst);
        }
        out
    }

    /// The whole matrix as `(rows, cols)` f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let cols = self.cols;
        out.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, dst)| self.dequantize_row(r, dst));
        out
    }

    /// `y = x W^T`: `x` is `(t, cols)` f32 row-major, returns `(t, rows)` f32 row-major, with
    /// the kernels of [`SimdLevel::active`].
    pub fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        self.matmul_at(SimdLevel::active(), x, t)
    }

    /// [`matmul`](Self::matmul) with the kernels of `level` (the tests compare the levels).
    ///
    /// # Panics
    /// When `level` is above what this CPU has ([`SimdLevel::detected`]).
    pub fn matmul_at(&self, level: SimdLevel, x: &[f32], t: usize) -> Vec<f32> {
        let mut y = vec![0f32; t * self.rows];
        self.matmul_into(level, x, t, &mut y);
        y
    }

    /// [`matmul_at`](Self::matmul_at) writing its `(t, rows)` result into `y` (overwritten),
    /// for callers that keep their buffers across calls.
    ///
    /// # Panics
    /// When `level` is above what this CPU has, or `x` / `y` are shorter than `t * cols` /
    /// `t * rows`.
    pub fn matmul_into(&self, level: SimdLevel, x: &[f32], t: usize, y: &mut [f32]) {
        assert!(x.len() >= t * self.cols && y.len() >= t * self.rows);
        let x = &x[..t * self.cols];
        let quantize = |row: &[f32]| match F::Q8_K_ACTIVATIONS {
            true => ActRow::quantize_q8_k(row),
            false => ActRow::quantize_at(level, row),
        };
        let xq: Vec<ActRow> = if t >= 16 {
            x.par_chunks_exact(self.cols).map(quantize).collect()
        } else {
            x.chunks_exact(self.cols).map(quantize).collect()
        };
        let rows = self.rows;
        let y_ptr = SyncPtr::new(&mut y[..t * rows]);
        let group_tasks = rows.div_ceil(GROUP).div_ceil(GROUPS_PER_TASK);
        let act_tasks = t.div_ceil(ACT_ROWS_PER_TASK);
        for_each_dynamic(group_tasks * act_tasks, |task| {
            let (a, gt) = (task / group_tasks, task % group_tasks);
            let acts = &xq[a * ACT_ROWS_PER_TASK..((a + 1) * ACT_ROWS_PER_TASK).min(t)];
            let mut out = vec![[0f32; GROUP]; acts.len()];
            let first_group = gt * GROUPS_PER_TASK;
            for g in first_group..(first_group + GROUPS_PER_TASK).min(rows.div_ceil(GROUP)) {
                kernels::group_matmul(F::KERNEL, level, self.group(g), acts, &mut out);
                let (first_row, n) = (g * GROUP, GROUP.min(rows - g * GROUP));
                for (j, o) in out.iter().enumerate() {
                    let row = a * ACT_ROWS_PER_TASK + j;
                    // SAFETY: y[row * rows + first_row..][..n] is inside y (row < t,
                    // first_row + n <= rows), and only this task writes those rows × groups.
                    let dst = unsafe { y_ptr.slice_mut(row * rows + first_row, n) };
                    // A full group as a fixed-size copy (four moves, not a `memmove` call per
                    // 64 bytes: 5% of a prefill).
                    match <&mut [f32; GROUP]>::try_from(&mut *dst) {
                        Ok(full) => *full = *o,
                        Err(_) => dst.copy_from_slice(&o[..n]),
                    }
                }
            }
        });
    }
}

impl QMatrix<Q8_0> {
    /// Quantizes a `(rows, cols)` f32 matrix (row-major) to Q8_0 as ggml's
    /// `quantize_row_q8_0_ref` does: per block of 32, `d = max|w| / 127` (stored as f16),
    /// `q = round(w / d)`. The error per weight is at most `d / 2` (plus the f16 rounding of
    /// `d`, a relative 2^-11).
    ///
    /// # Errors
    /// [`Error::Unsupported`] when `cols` is not a multiple of 32 or `w` is not
    /// `rows * cols` long.
    pub fn quantize_q8_0(rows: usize, cols: usize, w: &[f32]) -> Result<Self> {
        if w.len() != rows * cols {
            return Err(Error::Unsupported {
                what: format!("{} values for a ({rows}, {cols}) matrix", w.len()),
            });
        }
        if cols % QK != 0 {
            return Err(Error::Unsupported {
                what: format!("Q8_0 rows of {cols} values (not a multiple of 32)"),
            });
        }
        Self::from_blocks(rows, cols, &quantize_q8_0(w))
    }
}

/// `x` (a multiple of 32 values) as Q8_0 blocks in the file format (34 bytes each), as ggml's
/// `quantize_row_q8_0_ref`: per block `d = max|x| / 127`, `q = round(x / d)` half away from
/// zero, `d` stored as f16.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * Q8_0::BYTES);
    for xs in x.chunks_exact(QK) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(xs.iter().map(|v| ((v * id).round() as i8) as u8));
    }
    out
}

/// Runs `f(0)`, ..., `f(n - 1)` on the rayon pool, handing out indices one at a time from a
/// shared counter: the calling thread and each pool thread that joins take the next index
/// until none is left. A thread descheduled by another process (a busy machine) holds up
/// at most the one task it took, where a static split would wait for its whole share.
pub fn for_each_dynamic(n: usize, f: impl Fn(usize) + Sync) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    };
    let helpers = rayon::current_num_threads().min(n).saturating_sub(1);
    if helpers == 0 {
        work();
        return;
    }
    rayon::scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| work());
        }
        work();
    });
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Module, Tensor};

    use super::*;

    /// The candle type of `F` (candle is the reference these tests compare against).
    fn dtype<F: QuantFormat>() -> GgmlDType {
        match F::NAME {
            "Q4_1" => GgmlDType::Q4_1,
            "Q8_0" => GgmlDType::Q8_0,
            "Q4_0" => GgmlDType::Q4_0,
            "Q5_0" => GgmlDType::Q5_0,
            "Q5_1" => GgmlDType::Q5_1,
            "Q6_K" => GgmlDType::Q6K,
            other => panic!("no candle type for {other}"),
        }
    }

    /// Columns for `blocks` blocks of 32, rounded up to whole 256-weight super-blocks for
    /// Q6_K (candle quantizes whole super-blocks).
    fn cols<F: QuantFormat>(blocks: usize) -> usize {
        match F::SUB_SCALES {
            true => blocks.next_multiple_of(8) * QK,
            false => blocks * QK,
        }
    }

    /// Our matrix of candle's quantized tensor `q` (same blocks; Q6_K super-blocks
    /// regrouped by [`Q6K::from_q6_k`]).
    fn from_q<F: QuantFormat>(q: &QTensor) -> QMatrix<F> {
        let (rows, cols) = q.shape().dims2().expect("test value");
        let data = q.data().expect("test value");
        let blocks = match F::SUB_SCALES {
            true => Q6K::from_q6_k(&data),
            false => data.to_vec(),
        };
        QMatrix::from_blocks(rows, cols, &blocks).expect("test value")
    }

    /// A seeded `(rows, cols)` matrix of values in [-1, 1), and its quantization by candle's
    /// own quantizer.
    fn matrix(rows: usize, cols: usize, seed: u64, dtype: GgmlDType) -> (QTensor, Vec<f32>) {
        let mut s = seed;
        let vals: Vec<f32> = (0..rows * cols)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        let t = Tensor::from_vec(vals.clone(), (rows, cols), &Device::Cpu).expect("test value");
        (QTensor::quantize(&t, dtype).expect("test value"), vals)
    }

    fn assert_close(got: &[f32], want: &[f32], rel: f32) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= rel * w.abs().max(1.0), "{g} vs {w}");
        }
    }

    /// candle's dequantization of `q`, flat.
    fn candle_values(q: &QTensor) -> Vec<f32> {
        q.dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("test value")
    }

    fn dequantize_matches_candle<F: QuantFormat>() {
        let (q, _) = matrix(70, cols::<F>(2), 1, dtype::<F>());
        let ours = from_q::<F>(&q).dequantize();
        assert!(ours == candle_values(&q));
    }

    /// Every activation row of a multi-row product is bit for bit that row alone, at every
    /// level: 1 to 11 rows (several register tiles of 4 and every remainder) and 67 (two
    /// tasks of activation rows), 37 weight rows (a padded last group).
    fn rows_at_once_equal_one_row<F: QuantFormat>() {
        let cols = cols::<F>(18);
        let (q, _) = matrix(37, cols, 5, dtype::<F>());
        let m = from_q::<F>(&q);
        for level in SimdLevel::supported() {
            for t in (1..=11).chain([67]) {
                let (_, xs) = matrix(t, cols, 6 + t as u64, GgmlDType::F32);
                let together = m.matmul_at(level, &xs, t);
                for (j, xrow) in xs.chunks_exact(cols).enumerate() {
                    let alone = m.matmul_at(level, xrow, 1);
                    let got = &together[j * 37..(j + 1) * 37];
                    assert!(got == alone.as_slice(), "{level}: {t} rows, row {j}");
                }
            }
        }
    }

    #[test]
    fn q4_0_rows_at_once_equal_one_row() {
        rows_at_once_equal_one_row::<Q4_0>();
    }

    #[test]
    fn q4_0_every_level_equals_portable() {
        every_level_equals_portable::<Q4_0>();
    }

    #[test]
    fn q4_0_dequantize_matches_candle() {
        dequantize_matches_candle::<Q4_0>();
    }

    #[test]
    fn q4_0_quantized_path_matches_candle() {
        quantized_path_matches_candle::<Q4_0>();
    }

    #[test]
    fn q5_0_rows_at_once_equal_one_row() {
        rows_at_once_equal_one_row::<Q5_0>();
    }

    #[test]
    fn q5_1_rows_at_once_equal_one_row() {
        rows_at_once_equal_one_row::<Q5_1>();
    }

    #[test]
    fn q5_0_every_level_equals_portable() {
        every_level_equals_portable::<Q5_0>();
    }

    #[test]
    fn q5_1_every_level_equals_portable() {
        every_level_equals_portable::<Q5_1>();
    }

    #[test]
    fn q5_0_dequantize_matches_candle() {
        dequantize_matches_candle::<Q5_0>();
    }

    #[test]
    fn q5_1_dequantize_matches_candle() {
        dequantize_matches_candle::<Q5_1>();
    }

    #[test]
    fn q5_0_quantized_path_matches_candle() {
        quantized_path_matches_candle::<Q5_0>();
    }

    #[test]
    fn q5_1_quantized_path_matches_candle() {
        quantized_path_matches_candle::<Q5_1>();
    }

    #[test]
    fn q6_k_rows_at_once_equal_one_row() {
        rows_at_once_equal_one_row::<Q6K>();
    }

    /// Against candle's Q6_K x q8_K product (`vec_dot_q6k_q8k`, its port of ggml's): the
    /// same activation quants (candle rounds ties away from zero where ggml and this crate
    /// round to even; random values never tie), the sums in another order.
    #[test]
    fn q6_k_quantized_path_matches_candle() {
        quantized_path_matches_candle::<Q6K>();
    }

    #[test]
    fn q6_k_every_level_equals_portable() {
        every_level_equals_portable::<Q6K>();
    }

    /// Held Q6_K dequantizes to candle's `dequantize_row_q6_K` values bit for bit: the
    /// regrouping loses nothing.
    #[test]
    fn q6_k_dequantize_matches_candle() {
        dequantize_matches_candle::<Q6K>();
    }

    /// Every level against an f64 sum over candle's dequantized Q6_K weights times the q8_K
    /// activations (`d_x q_x`, ggml's `quantize_row_q8_K_ref`, tested on its own in
    /// `blocks`): what the integer kernel must compute, up to its f32 roundings: `d_w d_x`
    /// and one `fma` per block, against `d sc` rounded in the weights, each within 2^-24 of
    /// `Σ |w x|` (the integer sum itself is exact in f32: `|sc Σ (q - 32) x| <= 2 · 128 ·
    /// 16 · 32 · 127 < 2^24`). 24 blocks per row (3 super-blocks), 37 rows, 1 to 9
    /// activation rows.
    #[test]
    fn q6_k_matmul_matches_the_dequantized_weights_times_q8_k_activations() {
        let (rows, cols) = (37, 24 * QK);
        let (q, _) = matrix(rows, cols, 31, GgmlDType::Q6K);
        let ours = from_q::<Q6K>(&q);
        let w = candle_values(&q);
        for t in 1..=9 {
            let (_, xs) = matrix(t, cols, 40 + t as u64, GgmlDType::F32);
            for level in SimdLevel::supported() {
                let got = ours.matmul_at(level, &xs, t);
                for (j, xrow) in xs.chunks_exact(cols).enumerate() {
                    let act = ActRow::quantize_q8_k(xrow);
                    let xq = |i: usize| f64::from(act.d[i / QK]) * f64::from(act.qs[i]);
                    for r in 0..rows {
                        let wr = &w[r * cols..(r + 1) * cols];
                        let want: f64 = (0..cols).map(|i| f64::from(wr[i]) * xq(i)).sum();
                        let mass: f64 = (0..cols).map(|i| (f64::from(wr[i]) * xq(i)).abs()).sum();
                        let g = f64::from(got[j * rows + r]);
                        assert!(
                            (g - want).abs() <= (cols / QK + 3) as f64 * mass / 16_777_216.0,
                            "{level}: t = {t}, row {j}, col {r}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn q4_1_rows_at_once_equal_one_row() {
        rows_at_once_equal_one_row::<Q4_1>();
    }

    #[test]
    fn q8_0_rows_at_once_equal_one_row() {
        rows_at_once_equal_one_row::<Q8_0>();
    }

    /// Each level this CPU supports gives the portable kernels' bits: rows of 1, 18 and 70
    /// blocks, 1 to 9 activation rows and 67, 37 and 48 weight rows (padded and whole last
    /// groups).
    fn every_level_equals_portable<F: QuantFormat>() {
        for (blocks, rows) in [(1, 37), (18, 48), (70, 37)] {
            let cols = cols::<F>(blocks);
            let (q, _) = matrix(rows, cols, 9 + blocks as u64, dtype::<F>());
            let m = from_q::<F>(&q);
            for t in (1..=9).chain([67]) {
                let (_, xs) = matrix(t, cols, 20 + t as u64, GgmlDType::F32);
                let want = m.matmul_at(SimdLevel::Portable, &xs, t);
                for level in SimdLevel::supported() {
                    let got = m.matmul_at(level, &xs, t);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{level} vs portable: {blocks} blocks, {rows} rows, t = {t}"
                    );
                }
            }
        }
    }

    #[test]
    fn q4_1_every_level_equals_portable() {
        every_level_equals_portable::<Q4_1>();
    }

    #[test]
    fn q8_0_every_level_equals_portable() {
        every_level_equals_portable::<Q8_0>();
    }

    #[test]
    fn q4_1_dequantize_matches_candle() {
        dequantize_matches_candle::<Q4_1>();
    }

    #[test]
    fn q8_0_dequantize_matches_candle() {
        dequantize_matches_candle::<Q8_0>();
    }

    /// Against candle's quantized matmul (Q4_1 x q8_1: its scalar code; Q8_0 x q8_0: its AVX
    /// code), at every level. Q8_0 within 1e-4 relative (f32 summation order). Q4_1 not
    /// closer than `Σ_b |m_b s_b| 2^-10`: candle stores a q8_1 block's `s` as
    /// `f16(Σq) * f16(d)`, ggml (and this kernel) as `f16(d * Σq)`, two roundings that differ
    /// by up to 2^-11 of `s` each. 18 blocks per row (candle needs an even count), 70 rows.
    fn quantized_path_matches_candle<F: QuantFormat>() {
        let cols = cols::<F>(18);
        let (q, _) = matrix(70, cols, 2, dtype::<F>());
        let ours = from_q::<F>(&q);
        let t = 9;
        let (_, xs) = matrix(t, cols, 3, GgmlDType::F32);
        let x = Tensor::from_vec(xs.clone(), (t, cols), &Device::Cpu).expect("test value");
        let mm = candle_core::quantized::QMatMul::from_qtensor(q).expect("test value");
        let theirs: Vec<f32> = mm
            .forward(&x)
            .expect("test value")
            .flatten_all()
            .expect("test value")
            .to_vec1()
            .expect("test value");
        for level in SimdLevel::supported() {
            let got_all = ours.matmul_at(level, &xs, t);
            for (j, xrow) in xs.chunks_exact(cols).enumerate() {
                let act = ActRow::quantize_at(level, xrow);
                for r in 0..70 {
                    let g = ours.group(r / GROUP);
                    let s_rounding: f32 = if F::HAS_MIN {
                        (0..cols / QK)
                            .map(|b| (g.m[b * GROUP + r % GROUP].to_f32() * act.s[b]).abs())
                            .sum::<f32>()
                            / 1024.0
                    } else {
                        0.0
                    };
                    let (got, want) = (got_all[j * 70 + r], theirs[j * 70 + r]);
                    let tol = 1e-4 * want.abs().max(1.0) + s_rounding;
                    assert!(
                        (got - want).abs() <= tol,
                        "{level}: row {j}, col {r}: {got} vs {want} (tol {tol})"
                    );
                }
            }
        }
    }

    #[test]
    fn q4_1_quantized_path_matches_candle() {
        quantized_path_matches_candle::<Q4_1>();
    }

    #[test]
    fn q8_0_quantized_path_matches_candle() {
        quantized_path_matches_candle::<Q8_0>();
    }

    /// The integer path against x times the dequantized matrix in f32: within the q8
    /// rounding of the activations (1/254 of each block's largest value, summed).
    #[test]
    fn matmul_matches_the_dequantized_product() {
        let (q, _) = matrix(130, 64, 6, GgmlDType::Q4_1);
        let m = from_q::<Q4_1>(&q);
        let (_, xs) = matrix(9, 64, 7, GgmlDType::F32);
        let x = Tensor::from_vec(xs.clone(), (9, 64), &Device::Cpu).expect("test value");
        let w = Tensor::from_vec(m.dequantize(), (130, 64), &Device::Cpu).expect("test value");
        let want: Vec<f32> = x
            .matmul(&w.t().expect("test value"))
            .expect("test value")
            .flatten_all()
            .expect("test value")
            .to_vec1()
            .expect("test value");
        // |w| <= 1 and each x is off by at most d/2 = max|x|/254 per value: 64 values.
        assert_close(&m.matmul(&xs, 9), &want, 64.0 / 254.0);
    }

    #[test]
    fn blocks_of_the_wrong_length_are_refused() {
        let err = QMatrix::<Q4_1>::from_blocks(2, 64, &[0u8; 4 * 34]).expect_err("an error");
        assert!(
            err.to_string().contains("Q4_1 tensor of 136 bytes"),
            "{err}"
        );
        let err = QMatrix::<Q8_0>::from_blocks(2, 48, &[]).expect_err("an error");
        assert!(err.to_string().contains("not a multiple of 32"), "{err}");
    }

    /// Our Q8_0 quantizer writes candle's bytes (both are ggml's `quantize_row_q8_0_ref`).
    #[test]
    fn quantize_q8_0_matches_candle() {
        let (q, vals) = matrix(37, 96, 11, GgmlDType::Q8_0);
        let ours = QMatrix::quantize_q8_0(37, 96, &vals).expect("test value");
        let theirs = from_q::<Q8_0>(&q);
        assert!(ours.qs == theirs.qs && ours.d == theirs.d);
        let err = QMatrix::quantize_q8_0(2, 40, &[0.0; 80]).expect_err("an error");
        assert!(err.to_string().contains("multiple of 32"), "{err}");
    }
}
