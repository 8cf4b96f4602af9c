//! The weight of one projection, in the form the forward pass multiplies with.
//!
//! A projection weight is `(out, in)` (GGUF's `ne = [in, out]`, row-major rows of `in`
//! values). It is kept in one of two forms:
//!
//! - [`Weight::Q4_1`], [`Weight::Q8_0`]: blocks as stored, multiplied by this crate's own
//!   kernels ([`crate::quant`]: q8 dot products for decode, dequantize + gemm for prefill).
//! - [`Weight::Quantized`]: any other GGUF block format as stored (Q4_0, the k-quants ...),
//!   multiplied by candle's quantized matmul, which quantizes the activations to the format's
//!   dot-product type (q8_0 / q8_K) as llama.cpp does.
//! - [`Weight::Dense`]: dequantized to f32, multiplied by an f32 gemm. Four to eight times
//!   the memory of a 4-bit file; used when a LoRA adapter is merged into the weights
//!   (a LoRA merge) and by [`WeightFormat::F32`] loads, whose
//!   results do not depend on the batch size (exact KV-cache tests, training).

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

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
    /// A GGUF block-quantized tensor.
    Quantized(QMatMul),
    /// `(out, in)` f32, contiguous.
    Dense(Tensor),
}

impl Weight {
    /// Wraps a tensor read from a GGUF file in the requested format. f32/f16/bf16 tensors
    /// are always made dense.
    pub(crate) fn from_qtensor(t: std::sync::Arc<QTensor>, format: WeightFormat) -> Result<Self> {
        let float = matches!(
            t.dtype(),
            candle_core::quantized::GgmlDType::F32
                | candle_core::quantized::GgmlDType::F16
                | candle_core::quantized::GgmlDType::BF16
        );
        if format == WeightFormat::F32 || float {
            let dense = t
                .dequantize(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?;
            return Ok(Self::Dense(dense));
        }
        match t.dtype() {
            candle_core::quantized::GgmlDType::Q4_1 => {
                return Ok(Self::Q4_1(QMatrix::from_qtensor(&t)?))
            }
            candle_core::quantized::GgmlDType::Q8_0 => {
                return Ok(Self::Q8_0(QMatrix::from_qtensor(&t)?))
            }
            _ => {}
        }
        Ok(Self::Quantized(QMatMul::from_arc(t)?))
    }

    /// `(out, in)`.
    pub(crate) fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Q4_1(m) => m.dims(),
            Self::Q8_0(m) => m.dims(),
            Self::Quantized(QMatMul::QTensor(q)) => q.shape().dims2()?,
            Self::Quantized(QMatMul::Tensor(t)) | Self::Quantized(QMatMul::TensorF16(t)) => {
                t.dims2()?
            }
            Self::Dense(t) => t.dims2()?,
        })
    }

    /// The weight as `(out, in)` f32 (a copy for quantized weights).
    pub(crate) fn dequantize(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Q4_1(m) => m.dequantize()?,
            Self::Q8_0(m) => m.dequantize()?,
            Self::Quantized(QMatMul::QTensor(q)) => q.dequantize(&Device::Cpu)?,
            Self::Quantized(QMatMul::Tensor(t)) | Self::Quantized(QMatMul::TensorF16(t)) => {
                t.to_dtype(DType::F32)?
            }
            Self::Dense(t) => t.clone(),
        })
    }

    /// `x: (.., in)` f32 -> `(.., out)` f32.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Q4_1(m) => qmatmul(m, x)?,
            Self::Q8_0(m) => qmatmul(m, x)?,
            Self::Quantized(q) => q.forward(x)?,
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
            Self::Quantized(_) | Self::Dense(_) => None,
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
