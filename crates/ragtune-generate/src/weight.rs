//! The weight of one projection, in the form the forward pass multiplies with.
//!
//! A projection weight is `(out, in)` (GGUF's `ne = [in, out]`, row-major rows of `in`
//! values). It is kept in one of three forms:
//!
//! - [`Weight::Blocks`]: Q4_0, Q4_1, Q5_0, Q5_1, Q6_K or Q8_0 blocks multiplied by this
//!   crate's own kernels ([`crate::quant`]: q8 activations, integer dot products, for decode
//!   and prefill). Every other GGUF block format is rewritten into one of these at load
//!   ([`crate::quant::convert`]: Q4_K becomes Q4_1, Q5_K becomes Q5_1, Q6_K is regrouped in
//!   blocks of 32 with its bits, the rest is requantized to Q8_0). Block formats are read
//!   from the file 16 rows at a time straight into the held matrix.
//! - [`Weight::F16`]: F16 tensors kept in f16 (half the memory of f32), converted a slab of
//!   rows at a time inside the product ([`F16Matrix`]).
//! - [`Weight::Dense`]: f32, multiplied by an f32 gemm. For F32/BF16 tensors, when a
//!   LoRA adapter is merged into the weights, and for [`WeightFormat::F32`] loads, whose
//!   results do not depend on the batch size (exact KV-cache tests, training). Four to
//!   eight times the memory of a 4-bit file.

use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{k_quants, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::quant::convert;
use crate::quant::{QMatrix, QuantFormat, Q4_0, Q4_1, Q5_0, Q5_1, Q6K, Q8_0};
use crate::{Error, Result};
use ragtune_quant::{F16Matrix, FromRowsError, QK};

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
    /// Blocks multiplied by this crate's integer kernels.
    Blocks(Blocks),
    /// f16, converted to f32 slab by slab inside the product.
    F16(F16Matrix),
    /// `(out, in)` f32, contiguous.
    Dense(Tensor),
}

/// A block-quantized weight in one of the formats the kernels take.
#[derive(Debug, Clone)]
pub(crate) enum Blocks {
    Q4_0(QMatrix<Q4_0>),
    Q4_1(QMatrix<Q4_1>),
    Q5_0(QMatrix<Q5_0>),
    Q5_1(QMatrix<Q5_1>),
    Q6K(QMatrix<Q6K>),
    Q8_0(QMatrix<Q8_0>),
}

/// `$body` with `$m` bound to the [`QMatrix`] of any [`Blocks`] variant.
macro_rules! with_matrix {
    ($blocks:expr, $m:ident => $body:expr) => {
        match $blocks {
            Blocks::Q4_0($m) => $body,
            Blocks::Q4_1($m) => $body,
            Blocks::Q5_0($m) => $body,
            Blocks::Q5_1($m) => $body,
            Blocks::Q6K($m) => $body,
            Blocks::Q8_0($m) => $body,
        }
    };
}

impl Blocks {
    /// The matrix of `bytes`, blocks of `dtype` as stored, when the kernels take `dtype`.
    fn from_stored(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Option<Self>> {
        Ok(Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0(QMatrix::from_blocks(rows, cols, bytes)?),
            GgmlDType::Q4_1 => Self::Q4_1(QMatrix::from_blocks(rows, cols, bytes)?),
            GgmlDType::Q5_0 => Self::Q5_0(QMatrix::from_blocks(rows, cols, bytes)?),
            GgmlDType::Q5_1 => Self::Q5_1(QMatrix::from_blocks(rows, cols, bytes)?),
            GgmlDType::Q8_0 => Self::Q8_0(QMatrix::from_blocks(rows, cols, bytes)?),
            _ => return Ok(None),
        }))
    }
}

impl Weight {
    /// Wraps a tensor read from a GGUF file in the requested format. f32/bf16 tensors are
    /// made dense, f16 ones kept in f16; block formats the kernels do not take are converted
    /// ([`crate::quant::convert`]).
    ///
    /// # Errors
    /// [`Error::Unsupported`](crate::Error::Unsupported) for a tensor that is not 2-D or whose
    /// rows are not whole blocks; candle's errors for a format it cannot dequantize.
    pub(crate) fn from_qtensor(t: std::sync::Arc<QTensor>, format: WeightFormat) -> Result<Self> {
        let dtype = t.dtype();
        if dtype == GgmlDType::F16 && format == WeightFormat::AsStored {
            let (rows, cols) = t.shape().dims2()?;
            let bytes = t.data()?;
            let mut at = 0;
            let m = F16Matrix::from_byte_source(rows, cols, |buf: &mut [u8]| {
                buf.copy_from_slice(&bytes[at..at + buf.len()]);
                at += buf.len();
                Ok::<_, std::convert::Infallible>(())
            });
            return Ok(Self::F16(m.unwrap_or_else(|never| match never {})));
        }
        let float = matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if format == WeightFormat::F32 || float {
            let dense = t
                .dequantize(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?;
            return Ok(Self::Dense(dense));
        }
        let (rows, cols) = t.shape().dims2()?;
        let data = t.data()?;
        if let Some(blocks) = Blocks::from_stored(dtype, rows, cols, &data)? {
            return Ok(Self::Blocks(blocks));
        }
        if dtype == GgmlDType::Q6K {
            let m = QMatrix::from_blocks(rows, cols, &convert::q6_k_regrouped(&data))?;
            return Ok(Self::Blocks(Blocks::Q6K(m)));
        }
        let converted = match dtype {
            GgmlDType::Q4K => Some((GgmlDType::Q4_1, convert::q4_k_as_q4_1(&data))),
            GgmlDType::Q5K => Some((GgmlDType::Q5_1, convert::q5_k_as_q5_1(&data))),
            _ => None,
        };
        let (dtype, bytes) = match converted {
            Some(c) => c,
            None => {
                let x = t
                    .dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                (GgmlDType::Q8_0, ragtune_quant::quantize_q8_0(&x))
            }
        };
        let blocks = Blocks::from_stored(dtype, rows, cols, &bytes)?;
        Ok(Self::Blocks(blocks.expect("a format the kernels take")))
    }

    /// Rows `ids` of the matrix as `(ids.len(), in)` f32: the token embedding's lookup,
    /// dequantizing only the rows asked for.
    ///
    /// # Panics
    /// When an id is `>= out` (the callers check token ids first).
    pub(crate) fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let cols = self.dims()?.1;
        let values = match self {
            Self::Blocks(b) => with_matrix!(b, m => m.dequantize_rows(ids)),
            Self::F16(m) => m.dequantize_rows(ids),
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
            Self::Blocks(b) => with_matrix!(b, m => m.dims()),
            Self::F16(m) => m.dims(),
            Self::Dense(t) => t.dims2()?,
        })
    }

    /// The weight as `(out, in)` f32 (a copy for quantized weights).
    pub(crate) fn dequantize(&self) -> Result<Tensor> {
        let (dims, values) = match self {
            Self::Blocks(b) => with_matrix!(b, m => (m.dims(), m.dequantize())),
            Self::F16(m) => (m.dims(), m.dequantize()),
            Self::Dense(t) => return Ok(t.clone()),
        };
        Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
    }

    /// `x: (.., in)` f32 -> `(.., out)` f32.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(x.broadcast_matmul(&w.t()?)?),
            _ => {
                let out = self.dims()?.0;
                rows_product(x, out, |xs, t| self.forward_rows(xs, t).expect("not dense"))
            }
        }
    }

    /// `x: (.., in)` as a row-major `Vec` of `(rows, out)` values, for the weights this crate
    /// multiplies itself (`None` for the others), so a caller can add to the result in place
    /// before it becomes a tensor. `xs` is `x`'s values.
    pub(crate) fn forward_rows(&self, xs: &[f32], rows: usize) -> Option<Vec<f32>> {
        match self {
            Self::Blocks(b) => Some(with_matrix!(b, m => m.matmul(xs, rows))),
            Self::F16(m) => Some(m.matmul(xs, rows)),
            Self::Dense(_) => None,
        }
    }
}

/// `x: (.., in)` -> `(.., out)` through `product(values, rows)`, which returns `rows * out`
/// values.
fn rows_product(
    x: &Tensor,
    out: usize,
    product: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> Result<Tensor> {
    let dims = x.dims();
    let cols = dims[dims.len() - 1];
    let t = x.elem_count() / cols;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out;
    }
    Ok(Tensor::from_vec(product(&xs, t), out_dims, &Device::Cpu)?)
}

/// Reads a GGUF file's tensors, checking each one's shape against the metadata.
pub(crate) struct TensorReader<'a, R> {
    pub(crate) content: &'a Content,
    pub(crate) reader: R,
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

    /// The 2-D tensor `name` as a [`Weight`] in `format`. Block formats (held as stored or
    /// converted block by block, [`convert`]) and F16 are read 16 rows at a time straight into
    /// the held matrix, so loading takes no second copy of the tensor; the others go through
    /// [`qtensor`](Self::qtensor) and [`Weight::from_qtensor`].
    ///
    /// # Errors
    /// As [`qtensor`](Self::qtensor), also for a read that fails (a truncated file);
    /// [`Error::Unsupported`] for rows that are not whole blocks.
    pub(crate) fn weight(
        &mut self,
        name: &str,
        expected: &[usize],
        format: WeightFormat,
    ) -> Result<Weight> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Weight::from_qtensor(self.qtensor(name, expected)?.into(), format);
        };
        let dtype = info.ggml_dtype;
        let plan: Option<StreamPlan> = match dtype {
            _ if format != WeightFormat::AsStored => None,
            GgmlDType::F16 => Some((2, 1, None)),
            GgmlDType::Q4_1 => Some((20, 32, None)),
            GgmlDType::Q8_0 => Some((34, 32, None)),
            GgmlDType::Q4_0 => Some((18, 32, None)),
            GgmlDType::Q4K => Some((144, 256, Some(convert::q4_k_as_q4_1))),
            GgmlDType::Q5_0 => Some((22, 32, None)),
            GgmlDType::Q5_1 => Some((24, 32, None)),
            GgmlDType::Q5K => Some((176, 256, Some(convert::q5_k_as_q5_1))),
            GgmlDType::Q6K => Some((210, 256, Some(convert::q6_k_regrouped))),
            GgmlDType::Q3K => Some(as_q8_0::<k_quants::BlockQ3K>()),
            GgmlDType::Q2K => Some(as_q8_0::<k_quants::BlockQ2K>()),
            GgmlDType::Q8_1 => Some(as_q8_0::<k_quants::BlockQ8_1>()),
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
                    "tensor `{name}`: {dtype:?} rows of {cols} values (not whole blocks of \
                     {block_weights})"
                ),
            });
        }
        let offset = self.content.tensor_data_offset + info.offset;
        // A read that fails names the tensor (a truncated file fails at the first tensor
        // past its end).
        let io = |source: std::io::Error| Error::Tensor {
            name: name.to_string(),
            source: candle_core::Error::Io(source),
        };
        self.reader.seek(SeekFrom::Start(offset)).map_err(io)?;
        let source_row_bytes = cols / block_weights * block_bytes;
        let reader = &mut self.reader;
        let weight = match dtype {
            GgmlDType::F16 => {
                F16Matrix::from_byte_source(rows, cols, |buf: &mut [u8]| reader.read_exact(buf))
                    .map(Weight::F16)
            }
            GgmlDType::Q4_0 => read_rows(reader, rows, cols, source_row_bytes, convert)
                .map(|m| Weight::Blocks(Blocks::Q4_0(m))),
            GgmlDType::Q4_1 | GgmlDType::Q4K => {
                read_rows(reader, rows, cols, source_row_bytes, convert)
                    .map(|m| Weight::Blocks(Blocks::Q4_1(m)))
            }
            GgmlDType::Q5_0 => read_rows(reader, rows, cols, source_row_bytes, convert)
                .map(|m| Weight::Blocks(Blocks::Q5_0(m))),
            GgmlDType::Q5_1 | GgmlDType::Q5K => {
                read_rows(reader, rows, cols, source_row_bytes, convert)
                    .map(|m| Weight::Blocks(Blocks::Q5_1(m)))
            }
            GgmlDType::Q6K => read_rows(reader, rows, cols, source_row_bytes, convert)
                .map(|m| Weight::Blocks(Blocks::Q6K(m))),
            _ => read_rows(reader, rows, cols, source_row_bytes, convert)
                .map(|m| Weight::Blocks(Blocks::Q8_0(m))),
        };
        weight.map_err(io)
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

/// The plan of a format requantized to Q8_0 block by block ([`convert::as_q8_0`]).
fn as_q8_0<T: k_quants::GgmlType>() -> StreamPlan {
    (
        std::mem::size_of::<T>(),
        T::BLCK_SIZE,
        Some(convert::as_q8_0::<T>),
    )
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
