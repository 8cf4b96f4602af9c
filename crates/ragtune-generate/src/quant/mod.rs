//! Block-quantized matrices (GGUF Q4_1 and Q8_0) and their matmul kernels: the hot loop of
//! decode and prefill.
//!
//! candle 0.11 has no SIMD kernel for Q4_1 (its Q4_0, Q8_0 and k-quant kernels are vectorised,
//! Q4_1 falls back to scalar code), and SmolLM2-135M-Instruct ships its projections as Q4_1
//! and its tied embedding/output matrix as Q8_0. candle's quantized matmul also runs on its
//! own thread pool, which spins and yields while waiting. So this module implements both
//! formats on the rayon pool:
//!
//! - **Formats** (`ggml-common.h`), blocks of 32 weights:
//!   `block_q4_1 { d: f16, m: f16, qs: [u8; 16] }` (20 bytes), weight `j` = `d * q_j + m`,
//!   `q_j` the low nibble of `qs[j]` for `j < 16`, the high nibble of `qs[j - 16]` otherwise;
//!   `block_q8_0 { d: f16, qs: [i8; 32] }` (34 bytes), weight `j` = `d * qs[j]`.
//! - **Few rows** (decode, `t < DENSE_MIN_ROWS`): each activation row is quantized to the
//!   format's dot-product type as llama.cpp does (`block_q8_1 { d, s = d Σq, qs }` for Q4_1,
//!   `block_q8_0` for Q8_0; `d = max|x| / 127`, `q = round(x / d)`), and each output is
//!   `Σ_blocks d_w d_x Σ q_w q_x (+ m_w s_x)`, exactly `ggml_vec_dot_q4_1_q8_1` /
//!   `ggml_vec_dot_q8_0_q8_0`. AVX2 `maddubs` paths when the crate is compiled with `avx2` +
//!   `fma` (the workspace's `x86-64-v3` target), scalar paths otherwise. Rows are split across
//!   the rayon pool in small chunks, so a core taken by another process delays one chunk, not
//!   half the matrix.
//! - **Many rows** (prefill): panels of output rows are dequantized to f32 and multiplied
//!   with an f32 gemm (the `gemm` crate), faster than integer dot products once the
//!   dequantization is amortised over many tokens. The activations are not quantized on this
//!   path, so its results differ from the decode path by the q8 rounding (~1e-2 relative per
//!   layer), as llama.cpp's batched and single-token paths differ.

mod blocks;
mod kernels;

use std::marker::PhantomData;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use half::f16;
use ragtune_util::ptr::SyncPtr;

pub(crate) use blocks::QuantFormat;
use blocks::{ActRow, RowRef, QK};
pub(crate) use blocks::{Q4_1, Q8_0};

use crate::{Error, Result};

/// From this many activation rows on, [`QMatrix::matmul`] dequantizes panels to f32 and uses
/// gemm (measured on a 2-core Zen 4: the dense path wins from about 8 rows).
pub(crate) const DENSE_MIN_ROWS: usize = 8;

/// Output rows per parallel task on the few-rows path.
const ROWS_PER_TASK: usize = 64;

/// Output rows per dequantized panel on the dense path.
const PANEL_ROWS: usize = 64;

/// A `(rows, cols)` block-quantized weight, row-major, `cols / 32` blocks per row, held in
/// split form ([`blocks`]): the same bytes as the file, regrouped.
#[derive(Debug, Clone)]
pub(crate) struct QMatrix<F> {
    rows: usize,
    cols: usize,
    /// `rows * nb * F::QS` bytes.
    qs: Arc<[u8]>,
    /// `rows * nb` scales.
    d: Arc<[f16]>,
    /// `rows * nb` minimums, empty for formats without one.
    m: Arc<[f16]>,
    format: PhantomData<F>,
}

impl<F: QuantFormat> QMatrix<F> {
    /// Copies the blocks of a GGUF tensor of type `F::DTYPE` and shape `(rows, cols)`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the tensor has another type, is not 2-D, or its rows are
    /// not a whole number of blocks.
    pub(crate) fn from_qtensor(t: &QTensor) -> Result<Self> {
        let unsupported = |what: String| Error::Unsupported { what };
        if t.dtype() != F::DTYPE {
            return Err(unsupported(format!(
                "{:?} in the {:?} kernel",
                t.dtype(),
                F::DTYPE
            )));
        }
        let (rows, cols) = t.shape().dims2()?;
        if cols % QK != 0 {
            return Err(unsupported(format!(
                "{:?} rows of {cols} values (not a multiple of 32)",
                F::DTYPE
            )));
        }
        let bytes = t.data()?;
        let n = rows * cols / QK;
        if bytes.len() != n * F::BYTES {
            return Err(unsupported(format!(
                "{:?} tensor of {} bytes for {n} blocks of {}",
                F::DTYPE,
                bytes.len(),
                F::BYTES
            )));
        }
        let mut qs = vec![0u8; n * F::QS];
        let mut d = Vec::with_capacity(n);
        let mut m = Vec::with_capacity(if F::HAS_MIN { n } else { 0 });
        for (block, q) in bytes.chunks_exact(F::BYTES).zip(qs.chunks_exact_mut(F::QS)) {
            let (scale, min) = F::split(block, q);
            d.push(scale);
            if F::HAS_MIN {
                m.push(min);
            }
        }
        Ok(Self {
            rows,
            cols,
            qs: qs.into(),
            d: d.into(),
            m: m.into(),
            format: PhantomData,
        })
    }

    /// `(rows, cols)` = `(out, in)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Row `r` in split form.
    fn row(&self, r: usize) -> RowRef<'_> {
        let nb = self.cols / QK;
        RowRef {
            qs: &self.qs[r * nb * F::QS..(r + 1) * nb * F::QS],
            d: &self.d[r * nb..(r + 1) * nb],
            m: if F::HAS_MIN {
                &self.m[r * nb..(r + 1) * nb]
            } else {
                &[]
            },
        }
    }

    /// Dequantizes row `r` into `dst` (`cols` values).
    fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        let row = self.row(r);
        for (b, out) in dst.chunks_exact_mut(QK).enumerate() {
            let m = if F::HAS_MIN { row.m[b].to_f32() } else { 0.0 };
            F::dequantize_block(
                &row.qs[b * F::QS..(b + 1) * F::QS],
                row.d[b].to_f32(),
                m,
                out,
            );
        }
    }

    /// The whole matrix as `(rows, cols)` f32.
    pub(crate) fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        let ptr = SyncPtr::new(&mut out);
        let cols = self.cols;
        for_each_dynamic(self.rows.div_ceil(ROWS_PER_TASK), |task| {
            let first = task * ROWS_PER_TASK;
            for r in first..(first + ROWS_PER_TASK).min(self.rows) {
                // SAFETY: task `task` alone writes rows first..first + ROWS_PER_TASK.
                let dst = unsafe { ptr.slice_mut(r * cols, cols) };
                self.dequantize_row(r, dst);
            }
        });
        Ok(Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// `y = x W^T`: `x` is `(t, cols)` f32 row-major, returns `(t, rows)` f32 row-major.
    pub(crate) fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), t * self.cols);
        if t >= DENSE_MIN_ROWS {
            self.matmul_dense(x, t)
        } else {
            self.matmul_quantized(x, t)
        }
    }

    /// The few-rows path: activations quantized, integer dot products (module docs).
    fn matmul_quantized(&self, x: &[f32], t: usize) -> Vec<f32> {
        let xq: Vec<ActRow> = x.chunks_exact(self.cols).map(ActRow::quantize).collect();
        // Computed as (rows, t) so that each task writes one contiguous slice, then
        // transposed (nothing to do when t == 1).
        let mut yt = vec![0f32; self.rows * t];
        let yt_ptr = SyncPtr::new(&mut yt);
        for_each_dynamic(self.rows.div_ceil(ROWS_PER_TASK), |task| {
            let first = task * ROWS_PER_TASK;
            let n = ROWS_PER_TASK.min(self.rows - first);
            // SAFETY: task `task` alone writes rows first..first + n of yt (n * t values).
            let out = unsafe { yt_ptr.slice_mut(first * t, n * t) };
            for (i, out_row) in out.chunks_exact_mut(t).enumerate() {
                let w = self.row(first + i);
                if t == 1 {
                    out_row[0] = F::dot(w, &xq[0]);
                } else {
                    // Several rows (a batched decode step): each weight block is loaded
                    // once for all of them; every result equals F::dot bit for bit.
                    for (o, x) in out_row
                        .chunks_mut(kernels::MAX_ROWS)
                        .zip(xq.chunks(kernels::MAX_ROWS))
                    {
                        F::dot_rows(w, x, o);
                    }
                }
            }
        });
        if t == 1 {
            return yt;
        }
        let mut y = vec![0f32; t * self.rows];
        for r in 0..self.rows {
            for j in 0..t {
                y[j * self.rows + r] = yt[r * t + j];
            }
        }
        y
    }

    /// The dequantize-and-gemm path (module docs).
    fn matmul_dense(&self, x: &[f32], t: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let mut y = vec![0f32; t * rows];
        let y_ptr = SyncPtr::new(&mut y);
        for_each_dynamic(rows.div_ceil(PANEL_ROWS), |p| {
            let first = p * PANEL_ROWS;
            let n = PANEL_ROWS.min(rows - first);
            let mut panel = vec![0f32; n * cols];
            for (i, dst) in panel.chunks_exact_mut(cols).enumerate() {
                self.dequantize_row(first + i, dst);
            }
            // SAFETY: dst addresses y[j * rows + first + c] for j < t, c < n: inside y, and
            // the columns first..first + n belong to this panel alone. lhs is x (t, cols)
            // with row stride cols; rhs (cols, n) is the panel (n, cols) read transposed.
            unsafe {
                gemm::gemm(
                    t,
                    n,
                    cols,
                    y_ptr.get().add(first),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    panel.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
        y
    }
}

/// Runs `f(0)`, ..., `f(n - 1)` on the rayon pool, handing out indices one at a time from a
/// shared counter: the calling thread and each pool thread that joins take the next index
/// until none is left. A thread descheduled by another process (a busy machine) holds up
/// at most the one task it took, where a static split would wait for its whole share.
pub(crate) fn for_each_dynamic(n: usize, f: impl Fn(usize) + Sync) {
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
    use candle_core::quantized::GgmlDType;
    use candle_core::Module;

    use super::*;

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

    fn dequantize_matches_candle<F: QuantFormat>() {
        let (q, _) = matrix(70, 64, 1, F::DTYPE);
        let ours = QMatrix::<F>::from_qtensor(&q)
            .expect("test value")
            .dequantize()
            .expect("test value");
        let theirs = q.dequantize(&Device::Cpu).expect("test value");
        let diff = (ours - theirs)
            .expect("test value")
            .abs()
            .expect("test value")
            .max_all()
            .expect("test value");
        assert_eq!(diff.to_scalar::<f32>().expect("test value"), 0.0);
    }

    /// Several activation rows at once (the batched decode step) give, for every row, the
    /// one-row result bit for bit: 1 to 11 rows (so also more than `kernels::MAX_ROWS`, in
    /// chunks), rows of 18 blocks (two segments of eight and a tail of two) and of 70 (two
    /// segments, the second short and odd).
    fn rows_at_once_equal_one_row<F: QuantFormat>() {
        for blocks in [18, 70] {
            let cols = blocks * QK;
            let (q, _) = matrix(37, cols, 5, F::DTYPE);
            let m = QMatrix::<F>::from_qtensor(&q).expect("test value");
            for t in 1..DENSE_MIN_ROWS {
                let (_, xs) = matrix(t, cols, 6 + t as u64, GgmlDType::F32);
                let together = m.matmul_quantized(&xs, t);
                for (j, xrow) in xs.chunks_exact(cols).enumerate() {
                    let alone = m.matmul_quantized(xrow, 1);
                    let got: Vec<f32> = (0..37).map(|r| together[j * 37 + r]).collect();
                    assert!(got == alone, "{blocks} blocks, {t} rows, row {j}");
                }
            }
            let x: Vec<ActRow> = (0..11)
                .map(|j| ActRow::quantize(&matrix(1, cols, 40 + j, GgmlDType::F32).1))
                .collect();
            for r in 0..37 {
                let w = m.row(r);
                let mut out = [0f32; 11];
                for (o, xs) in out
                    .chunks_mut(kernels::MAX_ROWS)
                    .zip(x.chunks(kernels::MAX_ROWS))
                {
                    F::dot_rows(w, xs, o);
                }
                for (j, xj) in x.iter().enumerate() {
                    assert!(
                        out[j].to_bits() == F::dot(w, xj).to_bits(),
                        "row {r}, x {j}"
                    );
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

    #[test]
    fn q4_1_dequantize_matches_candle() {
        dequantize_matches_candle::<Q4_1>();
    }

    #[test]
    fn q8_0_dequantize_matches_candle() {
        dequantize_matches_candle::<Q8_0>();
    }

    /// The few-rows path against candle's quantized matmul (Q4_1 x q8_1: its scalar code;
    /// Q8_0 x q8_0: its AVX code). Q8_0 within 1e-4 relative (f32 summation order). Q4_1 not
    /// closer than `Σ_b |m_b s_b| 2^-10`: candle stores a q8_1 block's `s` as
    /// `f16(Σq) * f16(d)`, ggml (and this kernel) as `f16(d * Σq)`, two roundings that differ
    /// by up to 2^-11 of `s` each. 18 blocks per row (candle needs an even count): two groups
    /// of eight and a tail of two.
    fn quantized_path_matches_candle<F: QuantFormat>() {
        let cols = 18 * QK;
        let (q, _) = matrix(70, cols, 2, F::DTYPE);
        let ours = QMatrix::<F>::from_qtensor(&q).expect("test value");
        let (_, xs) = matrix(3, cols, 3, GgmlDType::F32);
        let x = Tensor::from_vec(xs.clone(), (3, cols), &Device::Cpu).expect("test value");
        let mm = candle_core::quantized::QMatMul::from_qtensor(q).expect("test value");
        let theirs: Vec<f32> = mm
            .forward(&x)
            .expect("test value")
            .flatten_all()
            .expect("test value")
            .to_vec1()
            .expect("test value");
        let three = ours.matmul_quantized(&xs, 3);
        for (j, xrow) in xs.chunks_exact(cols).enumerate() {
            let act = ActRow::quantize(xrow);
            for r in 0..70 {
                let w = ours.row(r);
                let s_rounding: f32 = if F::HAS_MIN {
                    w.m.iter()
                        .zip(&act.s)
                        .map(|(m, s)| (m.to_f32() * s).abs())
                        .sum::<f32>()
                        / 1024.0
                } else {
                    0.0
                };
                let (got, want) = (three[j * 70 + r], theirs[j * 70 + r]);
                let tol = 1e-4 * want.abs().max(1.0) + s_rounding;
                assert!(
                    (got - want).abs() <= tol,
                    "row {j}, col {r}: {got} vs {want} (tol {tol})"
                );
            }
        }
        // One row alone gives that row's result exactly (no dependence on t on this path).
        assert_eq!(
            ours.matmul_quantized(&xs[cols..2 * cols], 1),
            three[70..140]
        );
    }

    #[test]
    fn q4_1_quantized_path_matches_candle() {
        quantized_path_matches_candle::<Q4_1>();
    }

    #[test]
    fn q8_0_quantized_path_matches_candle() {
        quantized_path_matches_candle::<Q8_0>();
    }

    /// The SIMD dot products against the portable ones, on rows of 1 to 19 blocks (every
    /// tail length after groups of eight).
    #[test]
    fn simd_dots_equal_scalar_dots() {
        for nb in 1..=19 {
            let cols = nb * QK;
            let (_, xs) = matrix(1, cols, 5, GgmlDType::F32);
            let x = ActRow::quantize(&xs);
            let (q, _) = matrix(1, cols, 4, GgmlDType::Q4_1);
            let w = QMatrix::<Q4_1>::from_qtensor(&q).expect("test value");
            let (a, b) = (
                Q4_1::dot(w.row(0), &x),
                kernels::scalar::dot_q4_1(w.row(0), &x),
            );
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{nb} blocks: {a} vs {b}"
            );
            let (q, _) = matrix(1, cols, 6, GgmlDType::Q8_0);
            let w = QMatrix::<Q8_0>::from_qtensor(&q).expect("test value");
            let (a, b) = (
                Q8_0::dot(w.row(0), &x),
                kernels::scalar::dot_q8_0(w.row(0), &x),
            );
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{nb} blocks: {a} vs {b}"
            );
        }
    }

    /// The dense path equals x times the dequantized matrix (f32 gemm, 1e-4 relative).
    #[test]
    fn dense_path_matches_dequantized_matmul() {
        let (q, _) = matrix(130, 64, 6, GgmlDType::Q4_1);
        let m = QMatrix::<Q4_1>::from_qtensor(&q).expect("test value");
        let (_, xs) = matrix(9, 64, 7, GgmlDType::F32);
        let x = Tensor::from_vec(xs.clone(), (9, 64), &Device::Cpu).expect("test value");
        let w = m.dequantize().expect("test value");
        let want: Vec<f32> = x
            .matmul(&w.t().expect("test value"))
            .expect("test value")
            .flatten_all()
            .expect("test value")
            .to_vec1()
            .expect("test value");
        assert_close(&m.matmul(&xs, 9), &want, 1e-4);
    }

    #[test]
    fn other_types_are_refused() {
        let (q, _) = matrix(2, 64, 8, GgmlDType::Q8_0);
        let err = QMatrix::<Q4_1>::from_qtensor(&q).expect_err("an error");
        assert!(err.to_string().contains("Q8_0"), "{err}");
    }
}
