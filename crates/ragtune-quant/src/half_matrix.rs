//! [`F16Matrix`]: a weight stored as f16 (GGUF `F16`) and kept in f16, half the memory of an
//! f32 copy, multiplied in f32.
//!
//! Each parallel task converts a slab of [`SLAB`] weight rows to f32 (F16C where the CPU has
//! it, through `half`) and multiplies every activation row with it in one f32 GEMM (the `gemm`
//! crate, on the task's thread). The conversion is exact, so the result is the f32 product of
//! the dequantized weights up to the summation order; for decode (one activation row) the
//! conversion is paid for every product, which a 2-byte weight read repays in memory
//! traffic.

use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;
use ragtune_util::ptr::SyncPtr;

use crate::{for_each_dynamic, Error, Result};

/// Weight rows per parallel task.
const SLAB: usize = 64;

/// A `(rows, cols)` weight held as f16, row-major.
#[derive(Debug, Clone)]
pub struct F16Matrix {
    rows: usize,
    cols: usize,
    /// `rows * cols` values.
    data: Arc<[f16]>,
}

impl F16Matrix {
    /// A `(rows, cols)` matrix whose little-endian f16 values (row after row, 2 bytes each)
    /// come from `fill`, asked for up to 64 KiB at a time: it must fill the buffer it is
    /// given. Built in place, so reading a tensor from a file takes no second copy.
    ///
    /// # Errors
    /// What `fill` returned.
    pub fn from_byte_source<E>(
        rows: usize,
        cols: usize,
        mut fill: impl FnMut(&mut [u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<Self, E> {
        let mut data: Arc<[f16]> = std::iter::repeat_n(f16::ZERO, rows * cols).collect();
        let values = Arc::get_mut(&mut data).expect("a new Arc has one owner");
        let mut buf = vec![0u8; 64 << 10];
        for chunk in values.chunks_mut(buf.len() / 2) {
            let bytes = &mut buf[..2 * chunk.len()];
            fill(bytes)?;
            for (v, b) in chunk.iter_mut().zip(bytes.chunks_exact(2)) {
                *v = f16::from_le_bytes([b[0], b[1]]);
            }
        }
        Ok(Self { rows, cols, data })
    }

    /// A `(rows, cols)` matrix of `values` (row-major).
    ///
    /// # Errors
    /// [`Error::Unsupported`] when `values` is not `rows * cols` long.
    pub fn new(rows: usize, cols: usize, values: Arc<[f16]>) -> Result<Self> {
        if values.len() != rows * cols {
            return Err(Error::Unsupported {
                what: format!("{} f16 values for a ({rows}, {cols}) matrix", values.len()),
            });
        }
        Ok(Self {
            rows,
            cols,
            data: values,
        })
    }

    /// `(rows, cols)` = `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Rows `ids` as f32, `(ids.len(), cols)` row-major.
    ///
    /// # Panics
    /// When an id is `>= rows`.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (o, &id) in out.chunks_exact_mut(self.cols).zip(ids) {
            let at = id as usize * self.cols;
            self.data[at..at + self.cols].convert_to_f32_slice(o);
        }
        out
    }

    /// The whole matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        self.data.to_f32_vec()
    }

    /// `y (t, rows) = x (t, cols) · Wᵀ` in f32; `x` is row-major.
    ///
    /// # Panics
    /// When `x` is shorter than `t * cols`.
    pub fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        assert!(
            x.len() >= t * cols,
            "{} values for {t} rows of {cols}",
            x.len()
        );
        let mut y = vec![0f32; t * rows];
        if t == 0 || rows == 0 {
            return y;
        }
        let y_ptr = SyncPtr::new(&mut y);
        for_each_dynamic(rows.div_ceil(SLAB), |task| {
            let first = task * SLAB;
            let n = SLAB.min(rows - first);
            let slab = self.data[first * cols..(first + n) * cols].to_f32_vec();
            // SAFETY: dst is y's columns first..first + n of rows 0..t (row stride `rows`),
            // inside y and written by this task alone; lhs is x's t rows of `cols`; rhs reads
            // slab (n rows of `cols`) transposed: element (k, j) at j * cols + k.
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
                    slab.as_ptr(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A `(rows, cols)` matrix of f16 values and the same values as f32.
    fn matrix(rows: usize, cols: usize, seed: u64) -> (F16Matrix, Vec<f32>) {
        let mut rng = ragtune_util::rng::SplitMix64::new(seed);
        let values: Vec<f16> = (0..rows * cols)
            .map(|_| f16::from_f32(rng.normal() * 0.5))
            .collect();
        let dense = values.iter().map(|v| v.to_f32()).collect();
        let m = F16Matrix::new(rows, cols, values.into()).expect("matrix");
        (m, dense)
    }

    /// The product equals the f64 product of the same (exactly converted) values within f32
    /// rounding, for one activation row (decode) and for many, with a last slab that is
    /// not full.
    #[test]
    fn matmul_equals_the_f64_product() {
        let (rows, cols) = (SLAB * 2 + 5, 96);
        let (m, w) = matrix(rows, cols, 3);
        for t in [1usize, 7, 70] {
            let mut rng = ragtune_util::rng::SplitMix64::new(t as u64);
            let x: Vec<f32> = (0..t * cols).map(|_| rng.normal()).collect();
            let y = m.matmul(&x, t);
            for i in 0..t {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|k| f64::from(x[i * cols + k]) * f64::from(w[r * cols + k]))
                        .sum();
                    let got = f64::from(y[i * rows + r]);
                    assert!(
                        (got - want).abs() < 1e-4,
                        "t {t} ({i}, {r}): {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_bytes_and_shapes() {
        let (m, w) = matrix(5, 8, 1);
        assert_eq!(m.dequantize(), w);
        assert_eq!(m.dequantize_rows(&[4, 0]), [&w[32..40], &w[0..8]].concat());
        let bytes: Vec<u8> = w
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let mut at = 0;
        let read = F16Matrix::from_byte_source(5, 8, |buf: &mut [u8]| {
            buf.copy_from_slice(&bytes[at..at + buf.len()]);
            at += buf.len();
            Ok::<_, ()>(())
        })
        .expect("read");
        assert_eq!(read.dequantize(), w);
        assert!(F16Matrix::new(5, 7, vec![f16::ZERO; 35 + 1].into()).is_err());
    }
}
