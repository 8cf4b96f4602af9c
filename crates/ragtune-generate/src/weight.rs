//! The weight of one projection, in the form the forward pass multiplies with.
//!
//! A projection weight is `(out, in)` (GGUF's `ne = [in, out]`, row-major rows of `in`
//! values). It is kept in one of three forms:
//!
//! - [`Weight::Q4_1`], [`Weight::Q8_0`]: blocks multiplied by this crate's own kernels
//!   ([`crate::quant`]: q8 activations, integer dot products, for decode and prefill). Every
//!   other GGUF block format is rewritten into one of these two at load
//!   ([`crate::quant::convert`]: Q4_0 and Q4_K become Q4_1, Q5_0 becomes Q8_0, the rest is
//!   requantized to Q8_0).
//! - [`Weight::Dense`]: f32, multiplied by an f32 gemm. For F32/F16/BF16 tensors, when a
//!   LoRA adapter is merged into the weights, and for [`WeightFormat::F32`] loads, whose
//!   results do not depend on the batch size (exact KV-cache tests, training). Four to
//!   eight times the memory of a 4-bit file.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::quant::{QMatrix, QuantFormat, Q4_1, Q8_0};
use crate::Result;

/// How a model's projection weights are held after loading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// As stored in the file (the default): the least memory and the fastest decode.
    #[default]
    AsStored,
    /// Dequantized to f32 at load: exact, batch-size-independent arithmetic, 4-8x the memory.
    F32,
}

/// One projection weight `(out, in)`; see the module docs.
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    /// Q4_1 with this crate's kernels.
    Q4_1(QMatrix<Q4_1>),
    /// Q8_0 with this crate's kernels.
    Q8_0(QMatrix<Q8_0>),
    /// `(out, in)` f32, contiguous.
    Dense(Tensor),
}

impl Weight {
    /// Wraps a tensor read from a GGUF file in the requested format. f32/f16/bf16 tensors
    /// are always made dense; block formats other than Q4_1/Q8_0 are converted
    /// ([`crate::quant::convert`]).
    ///
    /// # Errors
    /// [`Error::Unsupported`](crate::Error::Unsupported) for a tensor that is not 2-D or whose
    /// rows are not whole blocks; candle's errors for a format it cannot dequantize.
    pub(crate) fn from_qtensor(t: std::sync::Arc<QTensor>, format: WeightFormat) -> Result<Self> {
        use crate::quant::convert;
        let dtype = t.dtype();
        let float = matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if format == WeightFormat::F32 || float {
            let dense = t
                .dequantize(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?;
            return Ok(Self::Dense(dense));
        }
        let (rows, cols) = t.shape().dims2()?;
        Ok(match dtype {
            GgmlDType::Q4_1 => Self::Q4_1(QMatrix::from_blocks(rows, cols, &t.data()?)?),
            GgmlDType::Q8_0 => Self::Q8_0(QMatrix::from_blocks(rows, cols, &t.data()?)?),
            GgmlDType::Q4_0 => Self::Q4_1(QMatrix::from_blocks(
                rows,
                cols,
                &convert::q4_0_as_q4_1(&t.data()?),
            )?),
            GgmlDType::Q4K => Self::Q4_1(QMatrix::from_blocks(
                rows,
                cols,
                &convert::q4_k_as_q4_1(&t.data()?),
            )?),
            GgmlDType::Q5_0 => Self::Q8_0(QMatrix::from_blocks(
                rows,
                cols,
                &convert::q5_0_as_q8_0(&t.data()?),
            )?),
            _ => {
                let x = t
                    .dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Self::Q8_0(QMatrix::from_blocks(
                    rows,
                    cols,
                    &ragtune_quant::quantize_q8_0(&x),
                )?)
            }
        })
    }

    /// Rows `ids` of the matrix as `(ids.len(), in)` f32: the token embedding's lookup,
    /// dequantizing only the rows asked for.
    ///
    /// # Panics
    /// When an id is `>= out` (the callers check token ids first).
    pub(crate) fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let cols = self.dims()?.1;
        let values = match self {
            Self::Q4_1(m) => m.dequantize_rows(ids),
            Self::Q8_0(m) => m.dequantize_rows(ids),
            Self::Dense(t) => {
                let ids = Tensor::new(ids, t.device())?;
                return Ok(t.index_select(&ids, 0)?);
            }
        };
        Ok(Tensor::from_vec(values, (ids.len(), cols), &Device::Cpu)?)
    }

    /// `(out, in)`.
    pub(crate) fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Q4_1(m) => m.dims(),
            Self::Q8_0(m) => m.dims(),
            Self::Dense(t) => t.dims2()?,
        })
    }

    /// The weight as `(out, in)` f32 (a copy for quantized weights).
    pub(crate) fn dequantize(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Q4_1(m) => Tensor::from_vec(m.dequantize(), m.dims(), &Device::Cpu)?,
            Self::Q8_0(m) => Tensor::from_vec(m.dequantize(), m.dims(), &Device::Cpu)?,
            Self::Dense(t) => t.clone(),
        })
    }

    /// `x: (.., in)` f32 -> `(.., out)` f32.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Q4_1(m) => qmatmul(m, x)?,
            Self::Q8_0(m) => qmatmul(m, x)?,
            Self::Dense(w) => x.broadcast_matmul(&w.t()?)?,
        })
    }

    /// `x: (.., in)` as a row-major `Vec` of `(rows, out)` values, for the weights this crate
    /// multiplies itself (`None` for the others), so a caller can add to the result in place
    /// before it becomes a tensor. `xs` is `x`'s values.
    pub(crate) fn forward_rows(&self, xs: &[f32], rows: usize) -> Option<Vec<f32>> {
        match self {
            Self::Q4_1(m) => Some(m.matmul(xs, rows)),
            Self::Q8_0(m) => Some(m.matmul(xs, rows)),
            Self::Dense(_) => None,
        }
    }
}

/// `x: (.., in)` times a [`QMatrix`] `(out, in)` -> `(.., out)`.
fn qmatmul<F: QuantFormat>(m: &QMatrix<F>, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let cols = dims[dims.len() - 1];
    let t = x.elem_count() / cols;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = m.dims().0;
    }
    Ok(Tensor::from_vec(m.matmul(&xs, t), out_dims, &Device::Cpu)?)
}
