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

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::{Error, Result};

/// Weights per block (`QK4_1`, `QK8_0`, `QK8_1` in ggml).
pub(crate) const QK: usize = 32;

/// From this many activation rows on, [`QMatrix::matmul`] dequantizes panels to f32 and uses
/// gemm (measured on a 2-core Zen 4: the dense path wins from about 8 rows).
pub(crate) const DENSE_MIN_ROWS: usize = 8;

/// Output rows per parallel task on the few-rows path.
const ROWS_PER_TASK: usize = 64;

/// Output rows per dequantized panel on the dense path.
const PANEL_ROWS: usize = 64;

/// A GGUF weight block type with its activation (dot-product) block type.
pub(crate) trait QuantBlock: Copy + Send + Sync + 'static {
    /// The block the activations are quantized to for the dot product.
    type Act: Copy + Default + Send + Sync;
    /// The GGUF type.
    const DTYPE: GgmlDType;
    /// Bytes per block in the file.
    const BYTES: usize;
    /// Reads one block from its little-endian bytes (`BYTES` long).
    fn parse(bytes: &[u8]) -> Self;
    /// Writes the block's 32 values.
    fn dequantize(&self, out: &mut [f32]);
    /// Quantizes `x` (a multiple of 32 values) into activation blocks.
    fn quantize_act(x: &[f32], out: &mut [Self::Act]);
    /// The dot product of a row of weight blocks with a row of activation blocks.
    fn dot(w: &[Self], x: &[Self::Act]) -> f32;
}

/// ggml `block_q4_1`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockQ4_1 {
    d: f16,
    m: f16,
    qs: [u8; QK / 2],
}

/// ggml `block_q8_1`: the activations of a Q4_1 dot product.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockQ8_1 {
    d: f16,
    /// `d * Σ qs`, rounded once (ggml's convention).
    s: f16,
    qs: [i8; QK],
}

impl Default for BlockQ8_1 {
    fn default() -> Self {
        Self {
            d: f16::ZERO,
            s: f16::ZERO,
            qs: [0; QK],
        }
    }
}

/// ggml `block_q8_0`: a Q8_0 weight block, and the activations of a Q8_0 dot product.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockQ8_0 {
    d: f16,
    qs: [i8; QK],
}

impl Default for BlockQ8_0 {
    fn default() -> Self {
        Self {
            d: f16::ZERO,
            qs: [0; QK],
        }
    }
}

/// Quantizes 32 values the way ggml's `quantize_row_q8_0_ref` / `_q8_1_ref` do:
/// returns `(d, Σ q)` with `d = max|x| / 127` and `q = round(x / d)`.
fn quantize_block_i8(x: &[f32], qs: &mut [i8; QK]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (q, &v) in qs.iter_mut().zip(x) {
        let r = (v * id).round() as i32;
        *q = r as i8;
        sum += r;
    }
    (d, sum)
}

impl QuantBlock for BlockQ4_1 {
    type Act = BlockQ8_1;
    const DTYPE: GgmlDType = GgmlDType::Q4_1;
    const BYTES: usize = 20;

    fn parse(b: &[u8]) -> Self {
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&b[4..20]);
        Self {
            d: f16::from_le_bytes([b[0], b[1]]),
            m: f16::from_le_bytes([b[2], b[3]]),
            qs,
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = f32::from(q & 0x0F) * d + m;
            out[j + QK / 2] = f32::from(q >> 4) * d + m;
        }
    }

    fn quantize_act(x: &[f32], out: &mut [BlockQ8_1]) {
        for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let (d, sum) = quantize_block_i8(xs, &mut b.qs);
            b.d = f16::from_f32(d);
            b.s = f16::from_f32(sum as f32 * d);
        }
    }

    #[inline]
    fn dot(w: &[Self], x: &[BlockQ8_1]) -> f32 {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        {
            // SAFETY: the target features are enabled at compile time.
            unsafe { avx2::dot_q4_1_q8_1(w, x) }
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        )))]
        {
            scalar::dot_q4_1_q8_1(w, x)
        }
    }
}

impl QuantBlock for BlockQ8_0 {
    type Act = BlockQ8_0;
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const BYTES: usize = 34;

    fn parse(b: &[u8]) -> Self {
        let mut qs = [0i8; QK];
        for (q, &byte) in qs.iter_mut().zip(&b[2..34]) {
            *q = byte as i8;
        }
        Self {
            d: f16::from_le_bytes([b[0], b[1]]),
            qs,
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = f32::from(q) * d;
        }
    }

    fn quantize_act(x: &[f32], out: &mut [BlockQ8_0]) {
        for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let (d, _) = quantize_block_i8(xs, &mut b.qs);
            b.d = f16::from_f32(d);
        }
    }

    #[inline]
    fn dot(w: &[Self], x: &[BlockQ8_0]) -> f32 {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        {
            // SAFETY: the target features are enabled at compile time.
            unsafe { avx2::dot_q8_0_q8_0(w, x) }
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        )))]
        {
            scalar::dot_q8_0_q8_0(w, x)
        }
    }
}

/// A `(rows, cols)` block-quantized weight, row-major, `cols / 32` blocks per row.
#[derive(Debug, Clone)]
pub(crate) struct QMatrix<B> {
    rows: usize,
    cols: usize,
    blocks: Arc<[B]>,
}

impl<B: QuantBlock> QMatrix<B> {
    /// Copies the blocks of a GGUF tensor of type `B::DTYPE` and shape `(rows, cols)`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the tensor has another type, is not 2-D, or its rows are
    /// not a whole number of blocks.
    pub(crate) fn from_qtensor(t: &QTensor) -> Result<Self> {
        let unsupported = |what: String| Error::Unsupported { what };
        if t.dtype() != B::DTYPE {
            return Err(unsupported(format!(
                "{:?} in the {:?} kernel",
                t.dtype(),
                B::DTYPE
            )));
        }
        let (rows, cols) = t.shape().dims2()?;
        if cols % QK != 0 {
            return Err(unsupported(format!(
                "{:?} rows of {cols} values (not a multiple of 32)",
                B::DTYPE
            )));
        }
        let bytes = t.data()?;
        let n = rows * cols / QK;
        if bytes.len() != n * B::BYTES {
            return Err(unsupported(format!(
                "{:?} tensor of {} bytes for {n} blocks of {}",
                B::DTYPE,
                bytes.len(),
                B::BYTES
            )));
        }
        let blocks = bytes.chunks_exact(B::BYTES).map(B::parse).collect();
        Ok(Self { rows, cols, blocks })
    }

    /// `(rows, cols)` = `(out, in)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The whole matrix as `(rows, cols)` f32.
    pub(crate) fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .zip(self.blocks.par_chunks(self.cols / QK))
            .for_each(|(dst, row)| dequantize_row(row, dst));
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
        let nb = self.cols / QK;
        let mut xq = vec![B::Act::default(); t * nb];
        for (row, q) in x.chunks_exact(self.cols).zip(xq.chunks_exact_mut(nb)) {
            B::quantize_act(row, q);
        }
        // Computed as (rows, t) so that each task writes one contiguous slice, then
        // transposed (nothing to do when t == 1).
        let mut yt = vec![0f32; self.rows * t];
        let yt_ptr = SyncPtr(yt.as_mut_ptr());
        for_each_dynamic(self.rows.div_ceil(ROWS_PER_TASK), |task| {
            let first = task * ROWS_PER_TASK;
            let n = ROWS_PER_TASK.min(self.rows - first);
            // SAFETY: task `task` alone writes rows first..first + n of yt (n * t values).
            let out = unsafe { std::slice::from_raw_parts_mut(yt_ptr.get().add(first * t), n * t) };
            for (i, out_row) in out.chunks_exact_mut(t).enumerate() {
                let w = &self.blocks[(first + i) * nb..(first + i + 1) * nb];
                for (o, xrow) in out_row.iter_mut().zip(xq.chunks_exact(nb)) {
                    *o = B::dot(w, xrow);
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
        let (rows, cols, nb) = (self.rows, self.cols, self.cols / QK);
        let mut y = vec![0f32; t * rows];
        let y_ptr = SyncPtr(y.as_mut_ptr());
        let panels = rows.div_ceil(PANEL_ROWS);
        for_each_dynamic(panels, |p| {
            let first = p * PANEL_ROWS;
            let n = PANEL_ROWS.min(rows - first);
            let mut panel = vec![0f32; n * cols];
            for (i, dst) in panel.chunks_exact_mut(cols).enumerate() {
                dequantize_row(&self.blocks[(first + i) * nb..(first + i + 1) * nb], dst);
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

/// A raw pointer that may cross into rayon tasks that write disjoint parts of its buffer.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: used only for disjoint writes: see `matmul_quantized`, `matmul_dense` and
// `attention::decode`.
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Dequantizes one row of blocks into `dst` (`blocks.len() * 32` values).
fn dequantize_row<B: QuantBlock>(blocks: &[B], dst: &mut [f32]) {
    for (b, out) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        b.dequantize(out);
    }
}

/// Portable references of the dot products (used when AVX2 is not compiled in, and by the
/// tests to check the SIMD paths).
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
mod scalar {
    use super::{BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};

    pub(crate) fn dot_q4_1_q8_1(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        let mut acc = 0f32;
        for (bw, bx) in w.iter().zip(x) {
            let mut sum = 0i32;
            for j in 0..QK / 2 {
                sum += i32::from(bw.qs[j] & 0x0F) * i32::from(bx.qs[j]);
                sum += i32::from(bw.qs[j] >> 4) * i32::from(bx.qs[j + QK / 2]);
            }
            acc += bw.d.to_f32() * bx.d.to_f32() * sum as f32 + bw.m.to_f32() * bx.s.to_f32();
        }
        acc
    }

    pub(crate) fn dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
        let mut acc = 0f32;
        for (bw, bx) in w.iter().zip(x) {
            let sum: i32 = bw
                .qs
                .iter()
                .zip(&bx.qs)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            acc += bw.d.to_f32() * bx.d.to_f32() * sum as f32;
        }
        acc
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, BlockQ8_0, BlockQ8_1};

    /// Horizontal sum of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `maddubs(u8, i8)` pairs summed to 8 i32 lanes, as f32.
    #[target_feature(enable = "avx2,fma")]
    fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// Q4_1 x q8_1: per block the 32 nibbles are spread to bytes and multiplied with the q8
    /// bytes, scaled by `d_w d_x` with an FMA; `m_w s_x` is summed apart.
    ///
    /// # Safety
    /// Requires AVX2 and FMA (checked at compile time by the caller's `cfg`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q4_1_q8_1(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        let low = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for (bw, bx) in w.iter().zip(x) {
            summs += bw.m.to_f32() * bx.s.to_f32();
            let d = _mm256_set1_ps(bw.d.to_f32() * bx.d.to_f32());
            // SAFETY: qs is 16 bytes, x.qs 32 bytes; unaligned loads.
            let q = unsafe { _mm_loadu_si128(bw.qs.as_ptr().cast()) };
            let qw = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low);
            // SAFETY: as above.
            let qx = unsafe { _mm256_loadu_si256(bx.qs.as_ptr().cast()) };
            acc = _mm256_fmadd_ps(d, dot_u8_i8(qw, qx), acc);
        }
        hsum(acc) + summs
    }

    /// Q8_0 x q8_0: `maddubs` needs one unsigned operand, so it multiplies `|w|` with `x`
    /// carrying the sign of `w`.
    ///
    /// # Safety
    /// Requires AVX2 and FMA (checked at compile time by the caller's `cfg`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (bw, bx) in w.iter().zip(x) {
            let d = _mm256_set1_ps(bw.d.to_f32() * bx.d.to_f32());
            // SAFETY: both qs are 32 bytes; unaligned loads.
            let qw = unsafe { _mm256_loadu_si256(bw.qs.as_ptr().cast()) };
            // SAFETY: as above.
            let qx = unsafe { _mm256_loadu_si256(bx.qs.as_ptr().cast()) };
            let prod = dot_u8_i8(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
            acc = _mm256_fmadd_ps(d, prod, acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
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
        let t = Tensor::from_vec(vals.clone(), (rows, cols), &Device::Cpu).unwrap();
        (QTensor::quantize(&t, dtype).unwrap(), vals)
    }

    fn assert_close(got: &[f32], want: &[f32], rel: f32) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= rel * w.abs().max(1.0), "{g} vs {w}");
        }
    }

    fn dequantize_matches_candle<B: QuantBlock>() {
        let (q, _) = matrix(8, 64, 1, B::DTYPE);
        let ours = QMatrix::<B>::from_qtensor(&q)
            .unwrap()
            .dequantize()
            .unwrap();
        let theirs = q.dequantize(&Device::Cpu).unwrap();
        let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn q4_1_dequantize_matches_candle() {
        dequantize_matches_candle::<BlockQ4_1>();
    }

    #[test]
    fn q8_0_dequantize_matches_candle() {
        dequantize_matches_candle::<BlockQ8_0>();
    }

    /// The few-rows path against candle's quantized matmul (Q4_1 x q8_1: its scalar code;
    /// Q8_0 x q8_0: its AVX code). Q8_0 within 1e-4 relative (f32 summation order). Q4_1
    /// within 5e-3 of max(|y|, 1), not closer: candle stores a q8_1 block's `s` as
    /// `f16(Σq) * f16(d)`, ggml (and this kernel) as `f16(d * Σq)`; the two roundings differ
    /// by up to 2^-11 of `s` per block, times `m` (measured: 1e-3 relative on rows of 4
    /// blocks of values in ±1).
    fn quantized_path_matches_candle<B: QuantBlock>(rel: f32) {
        let (q, _) = matrix(70, 128, 2, B::DTYPE);
        let ours = QMatrix::<B>::from_qtensor(&q).unwrap();
        let (_, xs) = matrix(3, 128, 3, GgmlDType::F32);
        let x = Tensor::from_vec(xs.clone(), (3, 128), &Device::Cpu).unwrap();
        let mm = candle_core::quantized::QMatMul::from_qtensor(q).unwrap();
        let theirs: Vec<f32> = mm
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let three = ours.matmul_quantized(&xs, 3);
        assert_close(&three, &theirs, rel);
        // One row alone gives that row's result exactly (no dependence on t on this path).
        assert_eq!(ours.matmul_quantized(&xs[128..256], 1), three[70..140]);
    }

    #[test]
    fn q4_1_quantized_path_matches_candle() {
        quantized_path_matches_candle::<BlockQ4_1>(5e-3);
    }

    #[test]
    fn q8_0_quantized_path_matches_candle() {
        quantized_path_matches_candle::<BlockQ8_0>(1e-4);
    }

    #[test]
    fn simd_dots_equal_scalar_dots() {
        let (_, xs) = matrix(1, 256, 5, GgmlDType::F32);
        let (q, _) = matrix(1, 256, 4, GgmlDType::Q4_1);
        let w = QMatrix::<BlockQ4_1>::from_qtensor(&q).unwrap();
        let mut x1 = vec![BlockQ8_1::default(); 8];
        BlockQ4_1::quantize_act(&xs, &mut x1);
        let (a, b) = (
            BlockQ4_1::dot(&w.blocks, &x1),
            scalar::dot_q4_1_q8_1(&w.blocks, &x1),
        );
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        let (q, _) = matrix(1, 256, 6, GgmlDType::Q8_0);
        let w = QMatrix::<BlockQ8_0>::from_qtensor(&q).unwrap();
        let mut x0 = vec![BlockQ8_0::default(); 8];
        BlockQ8_0::quantize_act(&xs, &mut x0);
        let (a, b) = (
            BlockQ8_0::dot(&w.blocks, &x0),
            scalar::dot_q8_0_q8_0(&w.blocks, &x0),
        );
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }

    /// The dense path equals x times the dequantized matrix (f32 gemm, 1e-4 relative).
    #[test]
    fn dense_path_matches_dequantized_matmul() {
        let (q, _) = matrix(130, 64, 6, GgmlDType::Q4_1);
        let m = QMatrix::<BlockQ4_1>::from_qtensor(&q).unwrap();
        let (_, xs) = matrix(9, 64, 7, GgmlDType::F32);
        let x = Tensor::from_vec(xs.clone(), (9, 64), &Device::Cpu).unwrap();
        let w = m.dequantize().unwrap();
        let want: Vec<f32> = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_close(&m.matmul(&xs, 9), &want, 1e-4);
    }

    #[test]
    fn other_types_are_refused() {
        let (q, _) = matrix(2, 64, 8, GgmlDType::Q8_0);
        let err = QMatrix::<BlockQ4_1>::from_qtensor(&q).unwrap_err();
        assert!(err.to_string().contains("Q8_0"), "{err}");
    }
}
