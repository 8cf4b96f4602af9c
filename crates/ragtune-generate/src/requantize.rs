//! Re-quantizing a GGUF file: every tensor into a chosen GGML type, as `llama-quantize` does,
//! with candle's quantizers (ports of ggml's reference `quantize_row_*_ref`; for Q4_0, Q5_0,
//! Q5_1 and Q8_0 byte for byte what `llama_model_quantize` writes without an importance
//! matrix, for the k-quants a close variant). Metadata is copied unchanged.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::{Error, Result};

/// The GGML type named `name` as llama.cpp and the `gguf` package spell it (`Q4_K`, `F16`).
///
/// # Errors
/// [`Error::Unsupported`] for a name candle cannot quantize to, listing the known ones.
pub fn ggml_dtype(name: &str) -> Result<GgmlDType> {
    let known = known_types();
    known
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| Error::Unsupported {
            what: format!(
                "GGML type `{name}` (known: {})",
                known.map(|(n, _)| n).join(", ")
            ),
        })
}

/// The name llama.cpp gives `t` (`Q4_K`; candle's `Debug` says `Q4K`).
pub fn ggml_name(t: GgmlDType) -> String {
    known_types()
        .iter()
        .find(|(_, k)| *k == t)
        .map_or_else(|| format!("{t:?}"), |(n, _)| (*n).to_string())
}

fn known_types() -> [(&'static str, GgmlDType); 13] {
    use GgmlDType as T;
    [
        ("F32", T::F32),
        ("F16", T::F16),
        ("BF16", T::BF16),
        ("Q4_0", T::Q4_0),
        ("Q4_1", T::Q4_1),
        ("Q5_0", T::Q5_0),
        ("Q5_1", T::Q5_1),
        ("Q8_0", T::Q8_0),
        ("Q2_K", T::Q2K),
        ("Q3_K", T::Q3K),
        ("Q4_K", T::Q4K),
        ("Q5_K", T::Q5K),
        ("Q6_K", T::Q6K),
    ]
}

/// Writes `dst`: the tensors of `src` in the types `plan` gives by tensor name (a tensor
/// the plan leaves out keeps its type; one already of the planned type is copied as is,
/// others are dequantized to f32 and quantized). The write is atomic (a temporary file
/// beside `dst`, renamed).
///
/// # Errors
/// [`Error::Io`]/[`Error::Gguf`] for unreadable or unwritable files, [`Error::Tensor`] for a
/// tensor that cannot be read or quantized (a row length the type's block does not divide).
pub fn requantize(src: &Path, dst: &Path, plan: &HashMap<String, GgmlDType>) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let mut reader = std::io::BufReader::new(std::fs::File::open(src).map_err(io(src))?);
    let content = Content::read(&mut reader).map_err(|source| Error::Gguf {
        path: src.to_path_buf(),
        source,
    })?;
    let dev = Device::Cpu;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let tensor_err = |source| Error::Tensor {
            name: name.clone(),
            source,
        };
        let t = content
            .tensor(&mut reader, name, &dev)
            .map_err(tensor_err)?;
        let q = match plan.get(name) {
            Some(&want) if want != t.dtype() => {
                let x = t.dequantize(&dev).map_err(tensor_err)?;
                QTensor::quantize(&x, want).map_err(tensor_err)?
            }
            _ => t,
        };
        tensors.push((name.clone(), q));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let tmp = dst.with_extension("partial");
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut out = std::io::BufWriter::new(file);
    gguf_file::write(&mut out, &metadata, &refs).map_err(|source| Error::Tensor {
        name: format!("(writing {})", tmp.display()),
        source,
    })?;
    let file = out.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, dst).map_err(io(dst))
}
