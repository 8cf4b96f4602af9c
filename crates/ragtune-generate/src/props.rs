//! Typed, validated GGUF metadata for llama-family models, read before any tensor.
//!
//! [`LlamaProps`] is built from a parsed [`Content`] with `TryFrom`: every required key is
//! checked for presence and type, the architecture must be one of [`Architecture`] (its keys
//! are read under its own prefix, `llama.` or `qwen2.`), head counts must divide
//! the embedding, and every special token id must be inside the vocabulary. The context length
//! is the file's own `llama.context_length`; there is no built-in maximum.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};

use crate::{Error, Result};

/// Reads the GGUF header, metadata and tensor directory of `path` (not the tensor data).
///
/// # Errors
/// [`Error::Io`] if the file cannot be opened, [`Error::Gguf`] if it is not valid GGUF.
pub fn read_gguf(path: impl AsRef<Path>) -> Result<Content> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = std::io::BufReader::new(file);
    Content::read(&mut reader).map_err(|source| Error::Gguf {
        path: path.to_path_buf(),
        source,
    })
}

/// A one-line description of a loaded file for a user: architecture, the tensor types of its
/// weights (count per GGML type, most common first), context length and the chat template's
/// family, e.g. `qwen2, Q5_0 x166 Q8_0 x15 Q6_K x14 Q4_K x16, context 32768 tokens,
/// template ChatML`.
pub fn describe(content: &Content, props: &LlamaProps) -> String {
    let mut types: HashMap<String, usize> = HashMap::new();
    for info in content.tensor_infos.values() {
        if info.shape.dims().len() == 2 {
            *types
                .entry(crate::requantize::ggml_name(info.ggml_dtype))
                .or_default() += 1;
        }
    }
    let mut types: Vec<(String, usize)> = types.into_iter().collect();
    types.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let types: Vec<String> = types.iter().map(|(t, n)| format!("{t} x{n}")).collect();
    let template = match props.chat_template.as_deref() {
        // `ChatTemplate::from_props` falls back to Gemma's documented turn format.
        None if props.architecture.is_gemma() => "Gemma turn format (the file has none)",
        None => "none (use --raw)",
        Some(t) if t.contains("<|im_start|>") => "ChatML",
        Some(t) if t.contains("<|start_header_id|>") => "Llama 3",
        Some(t) if t.contains("<start_of_turn>") => "Gemma",
        Some(t) if t.contains("[INST]") => "Llama 2 / Mistral",
        Some(_) => "custom",
    };
    format!(
        "{}{}, {}, context {} tokens, template {template}",
        props.architecture.gguf_name(),
        props
            .name
            .as_deref()
            .map_or(String::new(), |n| format!(" ({n})")),
        types.join(" "),
        props.context_length,
    )
}

/// RoPE frequency scaling, from `llama.rope.scaling.*`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum RopeScaling {
    /// No scaling (the key is absent, or `none`).
    None,
    /// Positions divided by `factor` (`linear`).
    Linear {
        /// The scaling factor (> 0).
        factor: f32,
    },
    /// YaRN scaling (`yarn`).
    Yarn {
        /// The scaling factor (> 0).
        factor: f32,
        /// The context length the model was trained with before scaling, in tokens
        /// (`llama.rope.scaling.original_context_length`), if given.
        original_context_length: Option<usize>,
    },
}

/// Which dimensions RoPE rotates together (llama.cpp's `LLAMA_ROPE_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i + 1)` (`NORM`: llama, whose GGUF converter permutes q/k).
    Normal,
    /// Pairs `(i, i + d/2)` of the two halves (`NEOX`: GPT-NeoX, Qwen2, Gemma).
    Neox,
}

/// The model families this crate runs, from `general.architecture`: the llama decoder and
/// the variants that differ from it in a few named places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Architecture {
    /// `llama`: Llama 2/3, Mistral, SmolLM, TinyLlama. Llama 3.1+ RoPE scaling comes as the
    /// `rope_freqs.weight` tensor.
    Llama,
    /// `qwen2`: llama with biases on the q/k/v projections and NeoX RoPE (Qwen2, Qwen2.5,
    /// the DeepSeek-R1 Qwen distills).
    Qwen2,
    /// `gemma3`: NeoX RoPE, RMS norms on q and k per head, norms after attention and after
    /// the MLP as well as before, a GELU-gated MLP (GeGLU), embeddings scaled by
    /// `sqrt(hidden)`, and five local layers (sliding-window attention, RoPE base 10,000)
    /// to each global one (Gemma Team 2025, "Gemma 3 Technical Report", arXiv 2503.19786;
    /// llama.cpp's `llm_build_gemma3`). Its GGUF norm weights already hold the `1 + w` of
    /// Gemma's RMSNorm.
    Gemma3,
}

impl Architecture {
    /// Every architecture, in the order error messages list them.
    pub const ALL: [Architecture; 3] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Gemma3,
    ];

    /// The `general.architecture` value, also the prefix of the architecture's keys.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
        }
    }

    /// The RoPE pairing the architecture uses (llama.cpp's `llama_model_rope_type`).
    pub fn rope_style(self) -> RopeStyle {
        match self {
            Self::Llama => RopeStyle::Normal,
            Self::Qwen2 | Self::Gemma3 => RopeStyle::Neox,
        }
    }

    /// Whether layer `il` is a local (sliding-window) layer: Gemma 3's pattern of five local
    /// layers to one global (llama.cpp's `set_swa_pattern(6)`: `il % 6 < 5`).
    pub fn is_local_layer(self, il: usize) -> bool {
        matches!(self, Self::Gemma3) && il % 6 < 5
    }

    /// The RoPE base of the local layers (Gemma 3: 10,000; llama.cpp's
    /// `rope_freq_base_train_swa`), `None` where all layers share `rope.freq_base`.
    pub fn local_rope_base(self) -> Option<f32> {
        matches!(self, Self::Gemma3).then_some(10_000.0)
    }

    /// Whether the architecture has Gemma's extra pieces: q/k norms, post-attention and
    /// post-MLP norms, a GELU-gated MLP and scaled embeddings.
    pub fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma3)
    }

    /// Whether the q/k/v projections carry a bias (`blk.N.attn_{q,k,v}.bias`).
    pub fn qkv_bias(self) -> bool {
        matches!(self, Self::Qwen2)
    }

    /// The architecture named `name`, if this crate runs it.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.gguf_name() == name)
    }
}

/// Rotary position embedding parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    /// Which dimensions rotate together.
    pub style: RopeStyle,
    /// Base of the inverse frequencies (`llama.rope.freq_base`, default 10000).
    pub freq_base: f32,
    /// Number of rotated dimensions per head (`llama.rope.dimension_count`, default the head
    /// dimension).
    pub dimension_count: usize,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// Special token ids, each checked to be `< vocab_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpecialTokenIds {
    /// Beginning of sequence (`tokenizer.ggml.bos_token_id`).
    pub bos: Option<u32>,
    /// End of sequence (`tokenizer.ggml.eos_token_id`).
    pub eos: Option<u32>,
    /// Padding (`tokenizer.ggml.padding_token_id`).
    pub pad: Option<u32>,
    /// Unknown token (`tokenizer.ggml.unknown_token_id`).
    pub unk: Option<u32>,
    /// End of turn, where the file declares one separately (`tokenizer.ggml.eot_token_id`).
    pub eot: Option<u32>,
}

/// The validated hyper-parameters and tokenizer settings of a llama-architecture GGUF.
///
/// Built with `LlamaProps::try_from(&content)`; see the module docs for what is checked.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaProps {
    /// `general.architecture`.
    pub architecture: Architecture,
    /// `general.name`, if present.
    pub name: Option<String>,
    /// Maximum number of positions the model was trained for, in tokens (`llama.context_length`).
    pub context_length: usize,
    /// Hidden size (`llama.embedding_length`).
    pub embedding_length: usize,
    /// Number of transformer blocks (`llama.block_count`).
    pub block_count: usize,
    /// Inner size of the feed-forward network (`llama.feed_forward_length`).
    pub feed_forward_length: usize,
    /// Number of query heads (`llama.attention.head_count`).
    pub head_count: usize,
    /// Number of key/value heads (`llama.attention.head_count_kv`, default `head_count`);
    /// divides `head_count` (grouped-query attention).
    pub head_count_kv: usize,
    /// Dimension of one attention head (`llama.attention.key_length`, default
    /// `embedding_length / head_count`).
    pub head_dim: usize,
    /// RoPE parameters.
    pub rope: RopeParams,
    /// RMSNorm epsilon (`llama.attention.layer_norm_rms_epsilon`).
    pub rms_norm_eps: f32,
    /// Vocabulary size (`llama.vocab_size`, default the length of `tokenizer.ggml.tokens`).
    pub vocab_size: usize,
    /// Special token ids.
    pub special: SpecialTokenIds,
    /// Whether a BOS token is prepended to prompts (`tokenizer.ggml.add_bos_token`, default
    /// `false`, as llama-cpp-python reads it for the golden file).
    pub add_bos_token: bool,
    /// The Jinja chat template (`tokenizer.chat_template`), if present.
    pub chat_template: Option<String>,
    /// The window of the local layers' sliding-window attention, in tokens
    /// (`{arch}.attention.sliding_window`; read for architectures with local layers only,
    /// as llama.cpp does: Qwen2 files carry the key unused).
    pub sliding_window: Option<usize>,
}

impl TryFrom<&Content> for LlamaProps {
    type Error = Error;

    fn try_from(content: &Content) -> Result<Self> {
        LlamaProps::from_metadata(&content.metadata)
    }
}

impl LlamaProps {
    /// Validates raw GGUF metadata (the map of [`Content::metadata`]).
    ///
    /// # Errors
    /// [`Error::UnsupportedArchitecture`], [`Error::MissingKey`], [`Error::KeyType`],
    /// [`Error::InvalidValue`] or [`Error::TokenOutOfRange`], naming the key involved.
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let md = Metadata(md);
        let arch = md.string("general.architecture")?;
        let architecture =
            Architecture::from_gguf_name(arch).ok_or_else(|| Error::UnsupportedArchitecture {
                found: arch.to_string(),
            })?;
        let prefix = architecture.gguf_name();
        let key = |k: &str| format!("{prefix}.{k}");

        let context_length = md.positive(&key("context_length"))?;
        let embedding_length = md.positive(&key("embedding_length"))?;
        let block_count = md.positive(&key("block_count"))?;
        let feed_forward_length = md.positive(&key("feed_forward_length"))?;
        let head_count = md.positive(&key("attention.head_count"))?;
        let head_count_kv = md
            .opt_positive(&key("attention.head_count_kv"))?
            .unwrap_or(head_count);
        if head_count % head_count_kv != 0 {
            return Err(Error::InvalidValue {
                key: key("attention.head_count_kv"),
                detail: format!("{head_count_kv} does not divide head_count {head_count}"),
            });
        }
        let head_dim = match md.opt_positive(&key("attention.key_length"))? {
            Some(d) => d,
            None if embedding_length % head_count == 0 => embedding_length / head_count,
            None => {
                return Err(Error::InvalidValue {
                    key: key("attention.head_count"),
                    detail: format!(
                        "{head_count} does not divide embedding_length {embedding_length}"
                    ),
                })
            }
        };
        let rope_dims = md
            .opt_positive(&key("rope.dimension_count"))?
            .unwrap_or(head_dim);
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(Error::InvalidValue {
                key: key("rope.dimension_count"),
                detail: format!(
                    "{rope_dims} must be even and at most the head dimension {head_dim}"
                ),
            });
        }
        let freq_base = md.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        if !(freq_base.is_finite() && freq_base > 0.0) {
            return Err(Error::InvalidValue {
                key: key("rope.freq_base"),
                detail: format!("{freq_base} is not a positive number"),
            });
        }
        let scaling = rope_scaling(&md, prefix)?;
        let rms_norm_eps = md.f32(&key("attention.layer_norm_rms_epsilon"))?;
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(Error::InvalidValue {
                key: key("attention.layer_norm_rms_epsilon"),
                detail: format!("{rms_norm_eps} is not a positive number"),
            });
        }

        let tokens_len = md.opt_array("tokenizer.ggml.tokens")?.map(<[Value]>::len);
        let vocab_size = match (md.opt_positive(&key("vocab_size"))?, tokens_len) {
            (Some(v), Some(t)) if v != t => {
                return Err(Error::LengthMismatch {
                    key: "tokenizer.ggml.tokens".into(),
                    expected: v,
                    got: t,
                })
            }
            (Some(v), _) => v,
            (None, Some(t)) if t > 0 => t,
            (None, _) => {
                return Err(Error::MissingKey {
                    key: key("vocab_size"),
                })
            }
        };
        let id = |k: &str| md.opt_token_id(k, vocab_size);
        let special = SpecialTokenIds {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            eot: id("tokenizer.ggml.eot_token_id")?,
        };
        let add_bos_token = md
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false);
        let chat_template = md
            .opt_string("tokenizer.chat_template")?
            .map(str::to_string);
        let name = md.opt_string("general.name")?.map(str::to_string);
        let sliding_window = if architecture.is_local_layer(0) {
            Some(md.positive(&key("attention.sliding_window"))?)
        } else {
            None
        };

        Ok(LlamaProps {
            architecture,
            name,
            context_length,
            embedding_length,
            block_count,
            feed_forward_length,
            head_count,
            head_count_kv,
            head_dim,
            rope: RopeParams {
                style: architecture.rope_style(),
                freq_base,
                dimension_count: rope_dims,
                scaling,
            },
            rms_norm_eps,
            vocab_size,
            special,
            add_bos_token,
            chat_template,
            sliding_window,
        })
    }
}

fn rope_scaling(md: &Metadata<'_>, prefix: &str) -> Result<RopeScaling> {
    let type_key = format!("{prefix}.rope.scaling.type");
    let factor_key = format!("{prefix}.rope.scaling.factor");
    let factor = md.opt_f32(&factor_key)?;
    // Older converters wrote only `rope.scale_linear`.
    let legacy_linear = md.opt_f32(&format!("{prefix}.rope.scale_linear"))?;
    let kind = md.opt_string(&type_key)?;
    let check = |f: f32, key: &str| {
        if f.is_finite() && f > 0.0 {
            Ok(f)
        } else {
            Err(Error::InvalidValue {
                key: key.to_string(),
                detail: format!("{f} is not a positive factor"),
            })
        }
    };
    match kind {
        None | Some("none") => match legacy_linear {
            Some(f) if f != 1.0 => Ok(RopeScaling::Linear {
                factor: check(f, &format!("{prefix}.rope.scale_linear"))?,
            }),
            _ => Ok(RopeScaling::None),
        },
        Some("linear") => {
            let f = factor.ok_or_else(|| Error::MissingKey {
                key: factor_key.clone(),
            })?;
            Ok(RopeScaling::Linear {
                factor: check(f, &factor_key)?,
            })
        }
        Some("yarn") => {
            let f = factor.ok_or_else(|| Error::MissingKey {
                key: factor_key.clone(),
            })?;
            Ok(RopeScaling::Yarn {
                factor: check(f, &factor_key)?,
                original_context_length: md
                    .opt_positive(&format!("{prefix}.rope.scaling.original_context_length"))?,
            })
        }
        Some(other) => Err(Error::InvalidValue {
            key: type_key,
            detail: format!("unknown RoPE scaling type `{other}` (known: none, linear, yarn)"),
        }),
    }
}

/// Typed access to GGUF metadata; every accessor names the key in its error.
pub(crate) struct Metadata<'a>(pub(crate) &'a HashMap<String, Value>);

pub(crate) fn type_name(v: &Value) -> String {
    format!("{:?}", v.value_type())
}

impl<'a> Metadata<'a> {
    fn get(&self, key: &str) -> Result<&'a Value> {
        self.0.get(key).ok_or_else(|| Error::MissingKey {
            key: key.to_string(),
        })
    }

    fn wrong(key: &str, expected: &'static str, v: &Value) -> Error {
        Error::KeyType {
            key: key.to_string(),
            expected,
            found: type_name(v),
        }
    }

    pub(crate) fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.0.get(key) else {
            return Ok(None);
        };
        let n: Option<u64> = match *v {
            Value::U8(x) => Some(x.into()),
            Value::U16(x) => Some(x.into()),
            Value::U32(x) => Some(x.into()),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => return Err(Self::wrong(key, "an unsigned integer", v)),
        };
        n.map(Some).ok_or_else(|| Error::InvalidValue {
            key: key.to_string(),
            detail: format!("{v:?} is negative"),
        })
    }

    fn opt_positive(&self, key: &str) -> Result<Option<usize>> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(0) => Err(Error::InvalidValue {
                key: key.to_string(),
                detail: "must be > 0".into(),
            }),
            Some(n) => usize::try_from(n)
                .map(Some)
                .map_err(|_| Error::InvalidValue {
                    key: key.to_string(),
                    detail: format!("{n} does not fit in usize"),
                }),
        }
    }

    fn positive(&self, key: &str) -> Result<usize> {
        self.opt_positive(key)?.ok_or_else(|| Error::MissingKey {
            key: key.to_string(),
        })
    }

    fn opt_token_id(&self, key: &str, vocab_size: usize) -> Result<Option<u32>> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(id) if id < vocab_size as u64 => Ok(Some(id as u32)),
            Some(id) => Err(Error::TokenOutOfRange {
                key: key.to_string(),
                id,
                vocab_size,
            }),
        }
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        let Some(v) = self.0.get(key) else {
            return Ok(None);
        };
        match *v {
            Value::F32(x) => Ok(Some(x)),
            Value::F64(x) => Ok(Some(x as f32)),
            _ => Err(Self::wrong(key, "a float", v)),
        }
    }

    fn f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?.ok_or_else(|| Error::MissingKey {
            key: key.to_string(),
        })
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        let Some(v) = self.0.get(key) else {
            return Ok(None);
        };
        match *v {
            Value::Bool(b) => Ok(Some(b)),
            _ => Err(Self::wrong(key, "a bool", v)),
        }
    }

    pub(crate) fn opt_string(&self, key: &str) -> Result<Option<&'a str>> {
        let Some(v) = self.0.get(key) else {
            return Ok(None);
        };
        match v {
            Value::String(s) => Ok(Some(s.as_str())),
            _ => Err(Self::wrong(key, "a string", v)),
        }
    }

    pub(crate) fn string(&self, key: &str) -> Result<&'a str> {
        let v = self.get(key)?;
        match v {
            Value::String(s) => Ok(s.as_str()),
            _ => Err(Self::wrong(key, "a string", v)),
        }
    }

    pub(crate) fn opt_array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        let Some(v) = self.0.get(key) else {
            return Ok(None);
        };
        match v {
            Value::Array(a) => Ok(Some(a.as_slice())),
            _ => Err(Self::wrong(key, "an array", v)),
        }
    }

    pub(crate) fn array(&self, key: &str) -> Result<&'a [Value]> {
        self.opt_array(key)?.ok_or_else(|| Error::MissingKey {
            key: key.to_string(),
        })
    }

    /// An array of strings, e.g. `tokenizer.ggml.tokens`.
    pub(crate) fn strings(&self, key: &str) -> Result<Vec<&'a str>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(Self::wrong(key, "an array of strings", v)),
            })
            .collect()
    }

    /// An array of integers, e.g. `tokenizer.ggml.token_type`.
    pub(crate) fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(a) = self.opt_array(key)? else {
            return Ok(None);
        };
        a.iter()
            .map(|v| match *v {
                Value::I8(x) => Ok(x.into()),
                Value::I16(x) => Ok(x.into()),
                Value::I32(x) => Ok(x.into()),
                Value::I64(x) => Ok(x),
                Value::U8(x) => Ok(x.into()),
                Value::U16(x) => Ok(x.into()),
                Value::U32(x) => Ok(x.into()),
                _ => Err(Self::wrong(key, "an array of integers", v)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub(crate) fn opt_floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(a) = self.opt_array(key)? else {
            return Ok(None);
        };
        a.iter()
            .map(|v| match *v {
                Value::F32(x) => Ok(x),
                Value::F64(x) => Ok(x as f32),
                _ => Err(Self::wrong(key, "an array of floats", v)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Metadata of a tiny but valid llama model: 2 blocks, 8-d embedding, 2 heads, 1 KV head,
    /// a 6-token vocabulary.
    pub(crate) fn tiny() -> HashMap<String, Value> {
        let s = |x: &str| Value::String(x.to_string());
        let mut md = HashMap::new();
        md.insert("general.architecture".into(), s("llama"));
        md.insert("llama.context_length".into(), Value::U32(256));
        md.insert("llama.embedding_length".into(), Value::U32(8));
        md.insert("llama.block_count".into(), Value::U32(2));
        md.insert("llama.feed_forward_length".into(), Value::U32(16));
        md.insert("llama.attention.head_count".into(), Value::U32(2));
        md.insert("llama.attention.head_count_kv".into(), Value::U32(1));
        md.insert(
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        );
        let tokens = ["<s>", "</s>", "a", "b", "ab", "Ġ"];
        md.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        );
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(0));
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1));
        md
    }

    #[test]
    fn tiny_metadata_parses_with_defaults() {
        let p = LlamaProps::from_metadata(&tiny()).expect("valid");
        assert_eq!(p.context_length, 256);
        assert_eq!(p.head_dim, 4);
        assert_eq!(p.head_count_kv, 1);
        assert_eq!(p.vocab_size, 6);
        assert_eq!(p.rope.freq_base, 10_000.0);
        assert_eq!(p.rope.dimension_count, 4);
        assert_eq!(p.rope.scaling, RopeScaling::None);
        assert_eq!(p.special.bos, Some(0));
        assert_eq!(p.special.eos, Some(1));
        assert!(!p.add_bos_token);
        assert_eq!(p.chat_template, None);
    }

    #[test]
    fn context_length_is_read_not_capped() {
        let mut md = tiny();
        md.insert("llama.context_length".into(), Value::U64(131_072));
        assert_eq!(
            LlamaProps::from_metadata(&md)
                .expect("valid")
                .context_length,
            131_072
        );
    }

    #[test]
    fn gguf_round_trip_through_a_file_in_memory() {
        let md = tiny();
        let pairs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut buf = std::io::Cursor::new(Vec::new());
        candle_core::quantized::gguf_file::write(&mut buf, &pairs, &[]).expect("write gguf");
        buf.set_position(0);
        let content = Content::read(&mut buf).expect("read gguf");
        let p = LlamaProps::try_from(&content).expect("valid");
        assert_eq!(p.embedding_length, 8);
    }

    #[test]
    fn other_architecture_is_a_typed_error() {
        let mut md = tiny();
        md.insert("general.architecture".into(), Value::String("gemma".into()));
        match LlamaProps::from_metadata(&md) {
            Err(Error::UnsupportedArchitecture { found }) => assert_eq!(found, "gemma"),
            other => panic!("expected UnsupportedArchitecture, got {other:?}"),
        }
    }

    #[test]
    fn missing_key_is_named() {
        let mut md = tiny();
        md.remove("llama.context_length");
        match LlamaProps::from_metadata(&md) {
            Err(Error::MissingKey { key }) => assert_eq!(key, "llama.context_length"),
            other => panic!("expected MissingKey, got {other:?}"),
        }
    }

    #[test]
    fn wrong_type_is_named() {
        let mut md = tiny();
        md.insert("llama.block_count".into(), Value::String("two".into()));
        match LlamaProps::from_metadata(&md) {
            Err(Error::KeyType { key, .. }) => assert_eq!(key, "llama.block_count"),
            other => panic!("expected KeyType, got {other:?}"),
        }
    }

    #[test]
    fn token_ids_are_checked_against_the_vocabulary() {
        let mut md = tiny();
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(6));
        match LlamaProps::from_metadata(&md) {
            Err(Error::TokenOutOfRange {
                key,
                id,
                vocab_size,
            }) => {
                assert_eq!(
                    (key.as_str(), id, vocab_size),
                    ("tokenizer.ggml.eos_token_id", 6, 6)
                )
            }
            other => panic!("expected TokenOutOfRange, got {other:?}"),
        }
    }

    #[test]
    fn vocab_size_must_agree_with_tokens() {
        let mut md = tiny();
        md.insert("llama.vocab_size".into(), Value::U32(7));
        assert!(matches!(
            LlamaProps::from_metadata(&md),
            Err(Error::LengthMismatch {
                expected: 7,
                got: 6,
                ..
            })
        ));
    }

    #[test]
    fn head_counts_must_divide() {
        let mut md = tiny();
        md.insert("llama.attention.head_count".into(), Value::U32(3));
        md.insert("llama.attention.head_count_kv".into(), Value::U32(2));
        match LlamaProps::from_metadata(&md) {
            Err(Error::InvalidValue { key, .. }) => {
                assert_eq!(key, "llama.attention.head_count_kv")
            }
            other => panic!("expected InvalidValue, got {other:?}"),
        }
        let mut md = tiny();
        md.insert("llama.attention.head_count".into(), Value::U32(3));
        md.insert("llama.attention.head_count_kv".into(), Value::U32(3));
        match LlamaProps::from_metadata(&md) {
            Err(Error::InvalidValue { key, .. }) => assert_eq!(key, "llama.attention.head_count"),
            other => panic!("expected InvalidValue, got {other:?}"),
        }
    }

    #[test]
    fn rope_scaling_is_typed() {
        let mut md = tiny();
        md.insert("llama.rope.freq_base".into(), Value::F32(500_000.0));
        md.insert(
            "llama.rope.scaling.type".into(),
            Value::String("yarn".into()),
        );
        md.insert("llama.rope.scaling.factor".into(), Value::F32(4.0));
        md.insert(
            "llama.rope.scaling.original_context_length".into(),
            Value::U32(128),
        );
        let p = LlamaProps::from_metadata(&md).expect("valid");
        assert_eq!(p.rope.freq_base, 500_000.0);
        assert_eq!(
            p.rope.scaling,
            RopeScaling::Yarn {
                factor: 4.0,
                original_context_length: Some(128)
            }
        );
        md.insert(
            "llama.rope.scaling.type".into(),
            Value::String("longrope".into()),
        );
        assert!(matches!(
            LlamaProps::from_metadata(&md),
            Err(Error::InvalidValue { .. })
        ));
        md.insert(
            "llama.rope.scaling.type".into(),
            Value::String("linear".into()),
        );
        md.remove("llama.rope.scaling.factor");
        assert!(matches!(
            LlamaProps::from_metadata(&md),
            Err(Error::MissingKey { .. })
        ));
    }

    #[test]
    fn zero_is_rejected() {
        let mut md = tiny();
        md.insert("llama.block_count".into(), Value::U32(0));
        assert!(matches!(
            LlamaProps::from_metadata(&md),
            Err(Error::InvalidValue { .. })
        ));
    }
}
