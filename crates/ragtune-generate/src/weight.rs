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

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::quant::{QMatrix, QuantFormat, Q4_1, Q8_0};
use crate::{Error, Result};
use ragtune_quant::{FromRowsError, QK};

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
            GgmlDType::Q4K => Weight::Q4_1(QMatrix::from_blocks(
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

/// Reads a GGUF file's tensors, checking each one's shape against the metadata.
pub(crate) struct TensorReader<'a, R> {
    pub(crate) content: &'a Content,
    pub(crate) reader: R,
    pub(crate) path: &'a Path,
}

/// How a block format that is streamed from the file becomes a held one: the source's
/// bytes and weights per block, and the conversion of whole blocks (`None`: held as stored).
type StreamPlan = (usize, usize, Option<BlockConversion>);

/// A conversion of whole blocks of one format into another's ([`crate::quant::convert`]).
type BlockConversion = fn(&[u8]) -> Vec<u8>;

impl<R: Read + Seek> TensorReader<'_, R> {
    /// The tensor `name` as candle reads it (a copy of its bytes).
    ///
    /// # Errors
    /// [`Error::Tensor`] for a missing or unreadable tensor, [`Error::TensorShape`] when its
    /// shape is not `expected`.
    pub(crate) fn qtensor(&mut self, name: &str, expected: &[usize]) -> Result<QTensor> {
        let t = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|source| Error::Tensor {
                name: name.to_string(),
                source,
            })?;
        check_shape(name, t.shape().dims(), expected)?;
        Ok(t)
    }

    /// The 2-D tensor `name` as a [`Weight`] in `format`. The formats held as Q4_1/Q8_0 with
    /// a block-wise conversion (or none) are read 16 rows at a time straight into the held
    /// matrix, so loading takes no second copy of the tensor; the others go through
    /// [`qtensor`](Self::qtensor) and [`Weight::from_qtensor`].
    ///
    /// # Errors
    /// As [`qtensor`](Self::qtensor); [`Error::Io`] for a read that fails;
    /// [`Error::Unsupported`] for rows that are not whole blocks.
    pub(crate) fn weight(
        &mut self,
        name: &str,
        expected: &[usize],
        format: WeightFormat,
    ) -> Result<Weight> {
        use crate::quant::convert;
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Weight::from_qtensor(self.qtensor(name, expected)?.into(), format);
        };
        let plan: Option<StreamPlan> = match info.ggml_dtype {
            _ if format != WeightFormat::AsStored => None,
            GgmlDType::Q4_1 => Some((20, 32, None)),
            GgmlDType::Q8_0 => Some((34, 32, None)),
            GgmlDType::Q4_0 => Some((18, 32, Some(convert::q4_0_as_q4_1))),
            GgmlDType::Q4K => Some((144, 256, Some(convert::q4_k_as_q4_1))),
            GgmlDType::Q5_0 => Some((22, 32, Some(convert::q5_0_as_q8_0))),
            _ => None,
        };
        let Some((block_bytes, block_weights, convert)) = plan else {
            return Weight::from_qtensor(self.qtensor(name, expected)?.into(), format);
        };
        check_shape(name, info.shape.dims(), expected)?;
        let (rows, cols) = info.shape.dims2()?;
        if cols % block_weights != 0 {
            return Err(Error::Unsupported {
                what: format!(
                    "tensor `{name}`: {:?} rows of {cols} values (not whole blocks of \
                     {block_weights})",
                    info.ggml_dtype
                ),
            });
        }
        let offset = self.content.tensor_data_offset + info.offset;
        let path = self.path;
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        self.reader.seek(SeekFrom::Start(offset)).map_err(io)?;
        let source_row_bytes = cols / block_weights * block_bytes;
        let reader = &mut self.reader;
        Ok(match info.ggml_dtype {
            GgmlDType::Q4_1 | GgmlDType::Q4_0 | GgmlDType::Q4K => {
                Weight::Q4_1(read_rows(reader, rows, cols, source_row_bytes, convert).map_err(io)?)
            }
            _ => {
                Weight::Q8_0(read_rows(reader, rows, cols, source_row_bytes, convert).map_err(io)?)
            }
        })
    }
}

/// A `(rows, cols)` matrix of `F` read from `reader`, 16 rows at a time: rows of
/// `source_row_bytes` in the file, turned into `F`'s blocks by `convert` (`None`: already
/// `F`'s blocks).
///
/// # Errors
/// The read's error; `InvalidData` for `cols` that is not a multiple of 32.
fn read_rows<F: QuantFormat>(
    reader: &mut impl Read,
    rows: usize,
    cols: usize,
    source_row_bytes: usize,
    convert: Option<BlockConversion>,
) -> std::io::Result<QMatrix<F>> {
    let held_row_bytes = cols / QK * F::BYTES;
    let mut source = Vec::new();
    let fill = |buf: &mut [u8]| -> std::io::Result<()> {
        let Some(convert) = convert else {
            return reader.read_exact(buf);
        };
        source.resize(buf.len() / held_row_bytes * source_row_bytes, 0);
        reader.read_exact(&mut source)?;
        buf.copy_from_slice(&convert(&source));
        Ok(())
    };
    QMatrix::from_row_source(rows, cols, fill).map_err(|e| match e {
        FromRowsError::Source(e) => e,
        FromRowsError::Shape(e) => std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// Fails with [`Error::TensorShape`] unless `got == expected`.
fn check_shape(name: &str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got == expected {
        return Ok(());
    }
    Err(Error::TensorShape {
        name: name.to_string(),
        expected: expected.to_vec(),
        got: got.to_vec(),
    })
}
