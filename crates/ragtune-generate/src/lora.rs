//! PEFT LoRA adapters over a loaded [`LlamaModel`], applied at run time or merged.
//!
//! An adapter is a directory in Hugging Face PEFT's format:
//!
//! - `adapter_config.json`: `r`, `lora_alpha`, `target_modules`, `fan_in_fan_out`, `bias`,
//!   optionally `use_rslora` and `layers_to_transform` ([`LoraConfig`]);
//! - `adapter_model.safetensors`: per layer `i` and targeted module, the tensors
//!   `base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight` and
//!   `base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight`, with
//!   `lora_A: (r, in)` and `lora_B: (out, r)` (any float dtype; held as f32).
//!
//! Each projection then computes `y = W x + scale * B (A x)` with `scale = lora_alpha / r`
//! (`lora_alpha / sqrt(r)` with `use_rslora`). The PEFT modules map onto the GGUF
//! projections `q_proj → attn_q`, `k_proj → attn_k`, `v_proj → attn_v`,
//! `o_proj → attn_output`, `gate_proj → ffn_gate`, `up_proj → ffn_up`,
//! `down_proj → ffn_down` ([`TargetModule`]).
//!
//! **The q/k row permutation.** Hugging Face llama checkpoints apply RoPE to the two halves
//! of each head ("rotate half"); llama.cpp applies it to interleaved pairs `(2i, 2i + 1)`. So
//! GGUF converters (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorder the output rows of
//! `q_proj` / `k_proj` per head: `W.reshape(n_head, 2, d / 2, in).swapaxes(1, 2)`, i.e. GGUF
//! row `2i` of a head is HF row `i` and GGUF row `2i + 1` is HF row `d / 2 + i` (`n_head` is
//! the KV head count for `k_proj`). An HF adapter's update `B A` must be reordered the same
//! way, which means permuting the rows of `lora_B` (`P (B A) = (P B) A`); `lora_A` is
//! untouched, as are all other modules. Loading applies the permutation, [`LoraAdapter::save`]
//! applies its inverse, so files on disk are always genuine PEFT adapters for the HF base
//! model (what llama.cpp's `convert_lora_to_gguf.py` also assumes).
//!
//! `fan_in_fan_out = true` is accepted: it describes the *base* weight's layout (GPT-2's
//! `Conv1D`); PEFT stores `lora_A: (r, in)` / `lora_B: (out, r)` either way, and for the
//! `nn.Linear` projections of llama it resets the flag to `false` itself. Shapes are checked
//! against the base model, so transposed tensors are refused as [`Error::AdapterShape`].
//!
//! Not supported, as typed errors: `bias` other than `"none"` ([`Error::Unsupported`]),
//! DoRA, per-module `rank_pattern` / `alpha_pattern`, `modules_to_save`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::layers::LoraPair;
use crate::model::LlamaModel;
use crate::props::LlamaProps;
use crate::{Error, Result};

/// The config file of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file of a PEFT adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A llama projection a LoRA adapter can target, by its PEFT module name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetModule {
    /// `self_attn.q_proj` → `attn_q`, `(head_count * head_dim, hidden)`.
    QProj,
    /// `self_attn.k_proj` → `attn_k`, `(head_count_kv * head_dim, hidden)`.
    KProj,
    /// `self_attn.v_proj` → `attn_v`, `(head_count_kv * head_dim, hidden)`.
    VProj,
    /// `self_attn.o_proj` → `attn_output`, `(hidden, head_count * head_dim)`.
    OProj,
    /// `mlp.gate_proj` → `ffn_gate`, `(feed_forward, hidden)`.
    GateProj,
    /// `mlp.up_proj` → `ffn_up`, `(feed_forward, hidden)`.
    UpProj,
    /// `mlp.down_proj` → `ffn_down`, `(hidden, feed_forward)`.
    DownProj,
}

impl TargetModule {
    /// All seven, in layer order.
    pub const ALL: [TargetModule; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// The PEFT / Hugging Face module name, e.g. `q_proj`.
    pub fn peft_name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }

    /// The GGUF tensor name within a block, e.g. `attn_q`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::QProj => "attn_q",
            Self::KProj => "attn_k",
            Self::VProj => "attn_v",
            Self::OProj => "attn_output",
            Self::GateProj => "ffn_gate",
            Self::UpProj => "ffn_up",
            Self::DownProj => "ffn_down",
        }
    }

    /// The module by its PEFT name.
    pub fn from_peft_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.peft_name() == name)
    }

    /// `self_attn` or `mlp`: the parent module in the PEFT tensor name.
    fn parent(self) -> &'static str {
        match self {
            Self::QProj | Self::KProj | Self::VProj | Self::OProj => "self_attn",
            Self::GateProj | Self::UpProj | Self::DownProj => "mlp",
        }
    }

    /// Position in [`ALL`](Self::ALL).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The projection's weight shape `(out, in)` in a base model of `p`'s sizes: `lora_A`
    /// is then `(r, in)` and `lora_B` `(out, r)`.
    pub fn dims(self, p: &LlamaProps) -> (usize, usize) {
        let (hidden, ff) = (p.embedding_length, p.feed_forward_length);
        let (q, kv) = (p.head_count * p.head_dim, p.head_count_kv * p.head_dim);
        match self {
            Self::QProj => (q, hidden),
            Self::KProj | Self::VProj => (kv, hidden),
            Self::OProj => (hidden, q),
            Self::GateProj | Self::UpProj => (ff, hidden),
            Self::DownProj => (hidden, ff),
        }
    }

    /// Heads whose rows the GGUF converter permutes (q: query heads, k: KV heads); `None`
    /// for the other modules, and for every module of a NeoX-RoPE model (Qwen2), whose
    /// converter keeps the Hugging Face order. See the module docs.
    pub fn permuted_heads(self, p: &LlamaProps) -> Option<usize> {
        if p.rope.style == crate::props::RopeStyle::Neox {
            return None;
        }
        match self {
            Self::QProj => Some(p.head_count),
            Self::KProj => Some(p.head_count_kv),
            _ => None,
        }
    }

    /// The PEFT tensor name of this module's `lora_A` / `lora_B` in `layer`.
    pub fn tensor_name(self, layer: usize, factor: Factor) -> String {
        format!(
            "base_model.model.model.layers.{layer}.{}.{}.{}.weight",
            self.parent(),
            self.peft_name(),
            factor.peft_name()
        )
    }
}

/// One of the two LoRA factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Factor {
    /// `lora_A`: `(r, in)`, the down projection.
    A,
    /// `lora_B`: `(out, r)`, the up projection.
    B,
}

impl Factor {
    fn peft_name(self) -> &'static str {
        match self {
            Self::A => "lora_A",
            Self::B => "lora_B",
        }
    }
}

/// `adapter_config.json` as PEFT writes it (the raw file; [`LoraAdapter`] holds the
/// validated form). Keys this crate does not use are kept in [`other`](Self::other), so a
/// loaded config saves back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// The rank `r` of the update, >= 1.
    pub r: usize,
    /// `lora_alpha`: the update is scaled by `lora_alpha / r`.
    pub lora_alpha: f64,
    /// PEFT module names (`q_proj`, ...; or `"all-linear"`). A single string in the file is
    /// read as a one-element list.
    #[serde(deserialize_with = "one_or_many")]
    pub target_modules: Vec<String>,
    /// Whether the base weights are stored `(in, out)`; see the module docs.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// `"none"`; `"all"` / `"lora_only"` (trained biases) are not supported.
    #[serde(default = "bias_none")]
    pub bias: String,
    /// rsLoRA: scale by `lora_alpha / sqrt(r)` instead of `lora_alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// The layers that carry LoRA tensors; `None`: all of them. A single integer in the
    /// file is read as a one-element list.
    #[serde(default, deserialize_with = "opt_one_or_many")]
    pub layers_to_transform: Option<Vec<usize>>,
    /// Every other key of the file (`peft_type`, `task_type`, `lora_dropout`,
    /// `base_model_name_or_path`, ...).
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

fn bias_none() -> String {
    "none".into()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match Option::<OneOrMany<String>>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

fn opt_one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<usize>>, D::Error> {
    Ok(match Option::<OneOrMany<usize>>::deserialize(d)? {
        None => None,
        Some(OneOrMany::One(i)) => Some(vec![i]),
        Some(OneOrMany::Many(v)) => Some(v),
    })
}

impl LoraConfig {
    /// A config for a causal-LM LoRA of rank `r` on `targets`, with PEFT's defaults
    /// (`bias = "none"`, no dropout, `fan_in_fan_out = false`).
    pub fn new(r: usize, lora_alpha: f64, targets: &[TargetModule]) -> Self {
        let mut other = serde_json::Map::new();
        other.insert("peft_type".into(), "LORA".into());
        other.insert("task_type".into(), "CAUSAL_LM".into());
        other.insert("lora_dropout".into(), 0.0.into());
        Self {
            r,
            lora_alpha,
            target_modules: targets.iter().map(|m| m.peft_name().to_string()).collect(),
            fan_in_fan_out: false,
            bias: bias_none(),
            use_rslora: false,
            layers_to_transform: None,
            other,
        }
    }

    /// Reads `adapter_config.json` (the file itself, not its directory).
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read, [`Error::AdapterConfig`] if it does not parse.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| Error::AdapterConfig {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes a PEFT adapter directory: `tensors` (PEFT names and HF row order, written as
    /// they are, with safetensors metadata `format = pt`) to `dir/adapter_model.safetensors`,
    /// then this config to `dir/adapter_config.json`. Each file is written to a temporary
    /// file in `dir`, fsynced and renamed over the old one, so a crash leaves either the old
    /// or the new file, never a torn one; the config goes last, so a directory with a new
    /// config has its new weights. `dir` is created if needed.
    ///
    /// # Errors
    /// [`Error::Io`] for file-system errors, [`Error::Candle`] if a tensor cannot be
    /// serialized.
    pub fn save(&self, dir: impl AsRef<Path>, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let sorted: BTreeMap<&str, &Tensor> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::tensor::serialize(sorted, Some(metadata))
            .map_err(candle_core::Error::from)?;
        write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| Error::Io {
            path: dir.join(CONFIG_FILE),
            source: std::io::Error::other(e),
        })?;
        json.push(b'\n');
        write_atomic(&dir.join(CONFIG_FILE), &json)
    }
}

/// [`ragtune_util::fs::write_atomic`], its error naming `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    ragtune_util::fs::write_atomic(path, bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The base-model sizes an adapter was validated against.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseShape {
    block_count: usize,
    head_count: usize,
    head_count_kv: usize,
    /// The GGUF converter permuted the q/k rows (llama's RoPE pairing).
    permuted: bool,
    /// `(out, in)` per [`TargetModule::ALL`].
    dims: [(usize, usize); 7],
}

impl BaseShape {
    fn of(p: &LlamaProps) -> Self {
        Self {
            block_count: p.block_count,
            head_count: p.head_count,
            head_count_kv: p.head_count_kv,
            permuted: p.rope.style == crate::props::RopeStyle::Normal,
            dims: TargetModule::ALL.map(|m| m.dims(p)),
        }
    }
}

/// The LoRA factors of one layer, per [`TargetModule::ALL`] (`None`: not adapted).
pub(crate) type LayerDeltas = [Option<LoraPair>; 7];

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A PEFT LoRA adapter, validated against a base model and held in f32, ready to be
/// applied per request ([`LlamaModel::forward_with`], [`Generator::generate_with`]) or
/// merged ([`LlamaModel::merge_adapter`]).
///
/// Loading an adapter does not touch the base weights: any number of adapters can serve
/// one loaded [`LlamaModel`]. Cloning is cheap (the tensors are shared) and a clone keeps
/// the adapter's identity (for the KV-cache check of [`LlamaModel::forward_with`]).
/// Memory: `4 * r * (in + out)` bytes per adapted projection, twice (the tensors, and
/// plain rows for the decode loops; SmolLM2-135M, r = 8, all seven modules: 19 MiB).
///
/// [`Generator::generate_with`]: crate::Generator::generate_with
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    name: String,
    config: LoraConfig,
    rank: usize,
    scale: f64,
    targets: Vec<TargetModule>,
    /// Per base layer.
    layers: Vec<LayerDeltas>,
    base: BaseShape,
    id: u64,
}

impl LoraAdapter {
    /// Loads the PEFT adapter in `dir` (`adapter_config.json`, `adapter_model.safetensors`)
    /// for `model`. Its name is the directory's name.
    ///
    /// # Errors
    /// [`Error::Io`] for a missing file, [`Error::AdapterConfig`] for a config that does
    /// not parse, [`Error::AdapterWeights`] for an unreadable safetensors file, and the
    /// validation errors of [`from_tensors`](Self::from_tensors).
    pub fn load(dir: impl AsRef<Path>, model: &LlamaModel) -> Result<Self> {
        Self::load_for(dir.as_ref(), model.props())
    }

    pub(crate) fn load_for(dir: &Path, props: &LlamaProps) -> Result<Self> {
        let config = LoraConfig::read(dir.join(CONFIG_FILE))?;
        let path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|source| Error::AdapterWeights { path, source })?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Self::build(name, config, tensors, props)
    }

    /// An adapter from a config and its tensors under their PEFT names (HF row order for
    /// `lora_B` of q/k, as in a file), validated against `model`. For synthetic adapters
    /// and for code that trains one.
    ///
    /// # Errors
    /// - [`Error::Unsupported`]: `bias` other than `"none"`, DoRA, `rank_pattern` /
    ///   `alpha_pattern`, `modules_to_save`;
    /// - [`Error::AdapterConfigValue`]: `r = 0`, a non-finite `lora_alpha`, no targets;
    /// - [`Error::AdapterTargetModule`]: a target that is not a llama projection;
    /// - [`Error::AdapterTensorUnexpected`]: a tensor that is not a LoRA factor of a target;
    /// - [`Error::AdapterLayer`]: a tensor for a layer the model does not have;
    /// - [`Error::AdapterTensorMissing`]: a factor of a target is absent;
    /// - [`Error::AdapterRank`]: a factor whose rank dimension is not `r`;
    /// - [`Error::AdapterShape`]: a factor whose other dimension does not fit the model.
    pub fn from_tensors(
        name: impl Into<String>,
        config: LoraConfig,
        tensors: HashMap<String, Tensor>,
        model: &LlamaModel,
    ) -> Result<Self> {
        Self::build(name.into(), config, tensors, model.props())
    }

    pub(crate) fn build(
        name: String,
        config: LoraConfig,
        mut tensors: HashMap<String, Tensor>,
        props: &LlamaProps,
    ) -> Result<Self> {
        let resolved = Resolved::from_config(&config)?;
        for (name, t) in &tensors {
            let bad = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map(|v| v.iter().filter(|x| !x.is_finite()).count())
                .map_err(|source| Error::AdapterTensorValues {
                    tensor: name.clone(),
                    detail: source.to_string(),
                })?;
            if bad > 0 {
                return Err(Error::AdapterTensorValues {
                    tensor: name.clone(),
                    detail: format!("{bad} values are NaN or infinite"),
                });
            }
        }
        let base = BaseShape::of(props);
        let layers_used: Vec<usize> = match &config.layers_to_transform {
            None => (0..base.block_count).collect(),
            Some(l) => l.clone(),
        };

        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for name in names {
            let unexpected = || Error::AdapterTensorUnexpected { name: name.clone() };
            let (layer, module, _) = parse_tensor_name(name).ok_or_else(unexpected)?;
            if !resolved.targets.contains(&module) {
                return Err(unexpected());
            }
            if layer >= base.block_count {
                return Err(Error::AdapterLayer {
                    name: name.clone(),
                    layer,
                    block_count: base.block_count,
                });
            }
            if !layers_used.contains(&layer) {
                return Err(unexpected());
            }
        }

        let r = resolved.rank;
        let mut layers: Vec<LayerDeltas> = (0..base.block_count).map(|_| empty_layer()).collect();
        for &layer in &layers_used {
            for &module in &resolved.targets {
                let (out, inp) = module.dims(props);
                let mut take = |factor: Factor, expected: [usize; 2]| -> Result<Tensor> {
                    let name = module.tensor_name(layer, factor);
                    let t = tensors
                        .remove(&name)
                        .ok_or_else(|| Error::AdapterTensorMissing { name: name.clone() })?;
                    let got = t.dims().to_vec();
                    let rank_dim = if factor == Factor::A { 0 } else { 1 };
                    if got.len() == 2 && got[rank_dim] != r {
                        return Err(Error::AdapterRank {
                            name,
                            expected: r,
                            got: got[rank_dim],
                        });
                    }
                    if got != expected {
                        return Err(Error::AdapterShape {
                            name,
                            expected: expected.to_vec(),
                            got,
                        });
                    }
                    Ok(t.to_dtype(DType::F32)?)
                };
                let a = take(Factor::A, [r, inp])?;
                let mut b = take(Factor::B, [out, r])?;
                if let Some(heads) = module.permuted_heads(props) {
                    b = permute_rows_hf_to_gguf(&b, heads)?;
                }
                layers[layer][module.index()] = Some(LoraPair::new(a, b, resolved.scale)?);
            }
        }
        Ok(Self {
            name,
            config,
            rank: r,
            scale: resolved.scale,
            targets: resolved.targets,
            layers,
            base,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The adapter's name (its directory's name when loaded from disk).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The config it was built from.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The factor applied to `B A`: `lora_alpha / r` (`lora_alpha / sqrt(r)` for rsLoRA).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The adapted projections.
    pub fn targets(&self) -> &[TargetModule] {
        &self.targets
    }

    /// The factors of `module` in `layer` as the forward pass uses them:
    /// `(A: (r, in), B: (out, r))` f32, `B` in GGUF row order (q/k permuted, see the module
    /// docs). `None` where the layer or module is not adapted.
    pub fn factors(&self, layer: usize, module: TargetModule) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(layer)?[module.index()]
            .as_ref()
            .map(|p| (&p.a, &p.b))
    }

    /// The adapter's tensors under their PEFT names, in HF row order (the inverse of the
    /// q/k permutation applied at load), f32: what [`save`](Self::save) writes.
    ///
    /// # Errors
    /// Tensor errors only (a bug).
    pub fn peft_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (layer, deltas) in self.layers.iter().enumerate() {
            for module in TargetModule::ALL {
                let Some(pair) = &deltas[module.index()] else {
                    continue;
                };
                let b = match module {
                    TargetModule::QProj if self.base.permuted => {
                        permute_rows_gguf_to_hf(&pair.b, self.base.head_count)?
                    }
                    TargetModule::KProj if self.base.permuted => {
                        permute_rows_gguf_to_hf(&pair.b, self.base.head_count_kv)?
                    }
                    _ => pair.b.clone(),
                };
                out.insert(module.tensor_name(layer, Factor::A), pair.a.clone());
                out.insert(module.tensor_name(layer, Factor::B), b);
            }
        }
        Ok(out)
    }

    /// Writes the adapter to `dir` as a PEFT adapter for the HF base model (config as
    /// loaded, tensors from [`peft_tensors`](Self::peft_tensors)), atomically per file; see
    /// [`LoraConfig::save`].
    ///
    /// # Errors
    /// As [`LoraConfig::save`].
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.config.save(dir, &self.peft_tensors()?)
    }

    /// The deltas of `layer` (`None` past the last layer).
    pub(crate) fn layer(&self, layer: usize) -> Option<&LayerDeltas> {
        self.layers.get(layer)
    }

    /// An identity shared by clones, distinct between loads.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Checks that the adapter was validated against a model of `props`' sizes.
    ///
    /// # Errors
    /// [`Error::AdapterModelMismatch`] naming what differs.
    pub(crate) fn check_fits(&self, props: &LlamaProps) -> Result<()> {
        let other = BaseShape::of(props);
        if other == self.base {
            return Ok(());
        }
        Err(Error::AdapterModelMismatch {
            adapter: self.name.clone(),
            detail: format!(
                "adapter for {} layers, heads {}/{}, projections {:?}; model has {} layers, \
                 heads {}/{}, projections {:?}",
                self.base.block_count,
                self.base.head_count,
                self.base.head_count_kv,
                self.base.dims,
                other.block_count,
                other.head_count,
                other.head_count_kv,
                other.dims
            ),
        })
    }
}

fn empty_layer() -> LayerDeltas {
    [None, None, None, None, None, None, None]
}

/// The largest `|lora_alpha|` accepted.
pub const MAX_LORA_ALPHA: f64 = 1e4;

/// The config after validation.
struct Resolved {
    rank: usize,
    scale: f64,
    targets: Vec<TargetModule>,
}

impl Resolved {
    fn from_config(c: &LoraConfig) -> Result<Self> {
        if c.bias != "none" {
            return Err(Error::Unsupported {
                what: format!(
                    "LoRA adapter with bias = {:?} (trained biases); only \"none\" is supported",
                    c.bias
                ),
            });
        }
        if c.other.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(Error::Unsupported {
                what: "DoRA adapters (use_dora = true)".into(),
            });
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if c.other
                .get(key)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(Error::Unsupported {
                    what: format!("LoRA adapter with a per-module `{key}`"),
                });
            }
        }
        if let Some(m) = c.other.get("modules_to_save").filter(|v| match v {
            Value::Null => false,
            Value::Array(a) => !a.is_empty(),
            _ => true,
        }) {
            return Err(Error::Unsupported {
                what: format!("LoRA adapter with modules_to_save = {m} (full module copies)"),
            });
        }
        if c.r == 0 {
            return Err(Error::AdapterConfigValue {
                key: "r".into(),
                detail: "the rank must be >= 1".into(),
            });
        }
        if let Some(t) = c.other.get("peft_type").filter(|v| !v.is_null()) {
            if t.as_str() != Some("LORA") {
                return Err(Error::Unsupported {
                    what: format!("PEFT adapter with peft_type = {t}; only \"LORA\" is supported"),
                });
            }
        }
        if !c.lora_alpha.is_finite() {
            return Err(Error::AdapterConfigValue {
                key: "lora_alpha".into(),
                detail: format!("{} is not a finite number", c.lora_alpha),
            });
        }
        // PEFT's own configs use alpha of the order of r (8..64); beyond 1e4 the update is
        // noise that drowns the base model (and empty answers follow), so it is refused.
        if c.lora_alpha.abs() > MAX_LORA_ALPHA {
            return Err(Error::AdapterConfigValue {
                key: "lora_alpha".into(),
                detail: format!(
                    "{} is out of range: |lora_alpha| must be at most {MAX_LORA_ALPHA}",
                    c.lora_alpha
                ),
            });
        }
        let mut targets = Vec::new();
        for t in &c.target_modules {
            if t == "all-linear" {
                targets.extend(TargetModule::ALL);
                continue;
            }
            // PEFT matches module names by suffix: `self_attn.q_proj` names `q_proj` too.
            let last = t.rsplit('.').next().unwrap_or(t);
            let m = TargetModule::from_peft_name(last)
                .ok_or_else(|| Error::AdapterTargetModule { module: t.clone() })?;
            targets.push(m);
        }
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err(Error::AdapterConfigValue {
                key: "target_modules".into(),
                detail: "no module is targeted".into(),
            });
        }
        let r = c.r as f64;
        let scale = if c.use_rslora {
            c.lora_alpha / r.sqrt()
        } else {
            c.lora_alpha / r
        };
        Ok(Self {
            rank: c.r,
            scale,
            targets,
        })
    }
}

/// `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight` →
/// `(i, module, factor)`; `None` for anything else.
fn parse_tensor_name(name: &str) -> Option<(usize, TargetModule, Factor)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let parts: Vec<&str> = rest.split('.').collect();
    let [layer, parent, module, factor, "weight"] = parts[..] else {
        return None;
    };
    let layer: usize = layer.parse().ok()?;
    let module = TargetModule::from_peft_name(module)?;
    if module.parent() != parent {
        return None;
    }
    let factor = match factor {
        "lora_A" => Factor::A,
        "lora_B" => Factor::B,
        _ => return None,
    };
    Some((layer, module, factor))
}

/// Rows of `w: (heads * d, cols)` from HF order to GGUF order, per head:
/// `w.reshape(heads, 2, d / 2, cols).swapaxes(1, 2)` (llama.cpp's `permute`).
///
/// # Errors
/// Tensor errors when the rows are not `heads * d` with `d` even.
pub fn permute_rows_hf_to_gguf(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads;
    Ok(w.reshape((heads, 2, d / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The inverse of [`permute_rows_hf_to_gguf`].
///
/// # Errors
/// As [`permute_rows_hf_to_gguf`].
pub fn permute_rows_gguf_to_hf(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads;
    Ok(w.reshape((heads, d / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::props::tests::tiny;

    /// The tiny test model: 2 layers, hidden 8, 2 query heads and 1 KV head of 4, ff 16.
    fn props() -> LlamaProps {
        LlamaProps::from_metadata(&tiny()).expect("tiny props")
    }

    /// SplitMix64 uniform values in [-1, 1): seeded tensors without candle's RNG.
    fn seeded(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = ragtune_util::rng::SplitMix64::new(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.next_signed_f32())
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    /// PEFT tensors of rank `r` for every layer and target of `props`.
    fn tensors(p: &LlamaProps, r: usize, targets: &[TargetModule]) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        let mut seed = 1;
        for layer in 0..p.block_count {
            for &m in targets {
                let (o, i) = m.dims(p);
                seed += 2;
                out.insert(m.tensor_name(layer, Factor::A), seeded((r, i), seed));
                out.insert(m.tensor_name(layer, Factor::B), seeded((o, r), seed + 1));
            }
        }
        out
    }

    fn build(config: LoraConfig, t: HashMap<String, Tensor>) -> Result<LoraAdapter> {
        LoraAdapter::build("test".into(), config, t, &props())
    }

    fn all(r: usize) -> (LoraConfig, HashMap<String, Tensor>) {
        (
            LoraConfig::new(r, 16.0, &TargetModule::ALL),
            tensors(&props(), r, &TargetModule::ALL),
        )
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2().expect("2-d")
    }

    #[test]
    fn a_peft_config_file_parses_and_keeps_its_other_keys() {
        let text = r#"{
          "alpha_pattern": {}, "auto_mapping": null,
          "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
          "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
          "init_lora_weights": true, "layers_pattern": null, "layers_to_transform": null,
          "lora_alpha": 16, "lora_dropout": 0.05, "modules_to_save": null,
          "peft_type": "LORA", "r": 8, "rank_pattern": {}, "revision": null,
          "target_modules": ["v_proj", "q_proj"], "task_type": "CAUSAL_LM",
          "use_dora": false, "use_rslora": false
        }"#;
        let c: LoraConfig = serde_json::from_str(text).expect("parses");
        assert_eq!((c.r, c.lora_alpha), (8, 16.0));
        assert_eq!(c.target_modules, ["v_proj", "q_proj"]);
        assert_eq!(
            c.other["base_model_name_or_path"],
            "HuggingFaceTB/SmolLM2-135M-Instruct"
        );
        let back: LoraConfig =
            serde_json::from_str(&serde_json::to_string(&c).expect("json")).expect("again");
        assert_eq!(back, c);
        let r = Resolved::from_config(&c).expect("valid");
        assert_eq!(r.targets, [TargetModule::QProj, TargetModule::VProj]);
        assert_eq!(r.scale, 2.0);

        let one: LoraConfig =
            serde_json::from_str(r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#)
                .expect("a single string");
        let r = Resolved::from_config(&one).expect("valid");
        assert_eq!(r.targets, TargetModule::ALL);
        let rs = LoraConfig {
            use_rslora: true,
            ..one
        };
        assert_eq!(Resolved::from_config(&rs).expect("valid").scale, 4.0);
    }

    /// llama.cpp's `permute(w, n_head)` = `w.reshape(n_head, 2, d / 2, cols).swapaxes(1, 2)`:
    /// GGUF row `2i` of a head is HF row `i`, `2i + 1` is HF row `d / 2 + i`.
    #[test]
    fn q_k_rows_are_permuted_like_llama_cpp() {
        let w = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .and_then(|t| t.reshape((8, 2)))
            .expect("w");
        let g = permute_rows_hf_to_gguf(&w, 2).expect("permute");
        let first: Vec<f32> = rows(&g).iter().map(|r| r[0] / 2.0).collect();
        assert_eq!(first, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        let back = permute_rows_gguf_to_hf(&g, 2).expect("inverse");
        assert_eq!(rows(&back), rows(&w));
    }

    /// Why the permutation: HF's rotate-half RoPE on the HF projection, then permuted, equals
    /// llama.cpp's interleaved RoPE (what this crate runs) on the permuted projection.
    #[test]
    fn the_permutation_turns_rotate_half_rope_into_interleaved_rope() {
        let (heads, d, pos) = (2, 8, 5);
        let half = d / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / 10_000f32.powf((2 * i) as f32 / d as f32))
            .collect();
        let cos: Vec<f32> = inv.iter().map(|f| (pos as f32 * f).cos()).collect();
        let sin: Vec<f32> = inv.iter().map(|f| (pos as f32 * f).sin()).collect();
        let cos = Tensor::from_vec(cos, (1, half), &Device::Cpu).expect("cos");
        let sin = Tensor::from_vec(sin, (1, half), &Device::Cpu).expect("sin");
        let q_hf = seeded((heads * d, 1), 7); // one token's q, as rows
        let as_heads = |q: &Tensor| q.reshape((1, heads, 1, d)).expect("heads");
        let hf = candle_nn::rotary_emb::rope(&as_heads(&q_hf), &cos, &sin).expect("rope");
        let hf = permute_rows_hf_to_gguf(&hf.reshape((heads * d, 1)).expect("rows"), heads)
            .expect("permute");
        let q_gguf = permute_rows_hf_to_gguf(&q_hf, heads).expect("permute");
        let gguf = candle_nn::rotary_emb::rope_i(&as_heads(&q_gguf), &cos, &sin).expect("rope_i");
        let gguf = gguf.reshape((heads * d, 1)).expect("rows");
        for (a, b) in rows(&hf).iter().zip(rows(&gguf)) {
            assert!((a[0] - b[0]).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    /// Loaded factors are in GGUF order (q/k `B` permuted, the rest as given); saving writes
    /// the PEFT tensors back exactly, and loading the directory gives the same adapter.
    #[test]
    fn save_and_load_round_trip_in_hf_order() {
        let p = props();
        let (config, t) = all(3);
        let adapter = build(config.clone(), t.clone()).expect("valid");
        assert_eq!((adapter.rank(), adapter.scale()), (3, 16.0 / 3.0));
        let (_, b_q) = adapter.factors(1, TargetModule::QProj).expect("q");
        let want = permute_rows_hf_to_gguf(&t[&TargetModule::QProj.tensor_name(1, Factor::B)], 2)
            .expect("permute");
        assert_eq!(rows(b_q), rows(&want));
        assert_ne!(
            rows(b_q),
            rows(&t[&TargetModule::QProj.tensor_name(1, Factor::B)])
        );
        let (a_v, b_v) = adapter.factors(0, TargetModule::VProj).expect("v");
        assert_eq!(
            rows(b_v),
            rows(&t[&TargetModule::VProj.tensor_name(0, Factor::B)])
        );
        assert_eq!(
            rows(a_v),
            rows(&t[&TargetModule::VProj.tensor_name(0, Factor::A)])
        );

        let saved = adapter.peft_tensors().expect("tensors");
        assert_eq!(saved.len(), t.len());
        for (name, tensor) in &t {
            assert_eq!(rows(&saved[name]), rows(tensor), "{name}");
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("my-adapter");
        adapter.save(&path).expect("save");
        let names: Vec<_> = std::fs::read_dir(&path)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
        let loaded = LoraAdapter::load_for(&path, &p).expect("load");
        assert_eq!(loaded.name(), "my-adapter");
        assert_eq!(loaded.config(), adapter.config());
        assert_ne!(loaded.id(), adapter.id());
        for layer in 0..p.block_count {
            for m in TargetModule::ALL {
                let (a0, b0) = adapter.factors(layer, m).expect("factors");
                let (a1, b1) = loaded.factors(layer, m).expect("factors");
                assert_eq!((rows(a0), rows(b0)), (rows(a1), rows(b1)), "{layer} {m:?}");
            }
        }
    }

    /// Values a diverged run or a damaged file can hold are refused on load, naming what is
    /// wrong (they used to give empty answers with exit 0).
    #[test]
    fn non_finite_weights_a_huge_alpha_and_other_peft_types_are_refused() {
        let (config, mut t) = all(2);
        let name = TargetModule::VProj.tensor_name(1, Factor::B);
        let shape = t[&name].dims2().expect("2-d");
        let mut v = vec![0.1f32; shape.0 * shape.1];
        v[3] = f32::NAN;
        t.insert(
            name.clone(),
            Tensor::from_vec(v, shape, &Device::Cpu).expect("t"),
        );
        match build(config.clone(), t) {
            Err(Error::AdapterTensorValues { tensor, detail }) => {
                assert_eq!(tensor, name);
                assert!(detail.contains("1 values"), "{detail}");
            }
            other => panic!("expected AdapterTensorValues, got {other:?}"),
        }
        let (mut config, t) = all(2);
        config.lora_alpha = 1e300;
        match build(config, t) {
            Err(Error::AdapterConfigValue { key, .. }) => assert_eq!(key, "lora_alpha"),
            other => panic!("expected AdapterConfigValue, got {other:?}"),
        }
        let (mut config, t) = all(2);
        config
            .other
            .insert("peft_type".into(), "PREFIX_TUNING".into());
        match build(config, t) {
            Err(Error::Unsupported { what }) => assert!(what.contains("PREFIX_TUNING"), "{what}"),
            other => panic!("expected Unsupported, got {other:?}"),
        }
        // PEFT's own value is accepted.
        let (mut config, t) = all(2);
        config.other.insert("peft_type".into(), "LORA".into());
        build(config, t).expect("a LoRA adapter");
    }

    #[test]
    fn layers_to_transform_limits_the_layers() {
        let mut config = LoraConfig::new(2, 4.0, &[TargetModule::DownProj]);
        config.layers_to_transform = Some(vec![1]);
        let mut t = tensors(&props(), 2, &[TargetModule::DownProj]);
        t.retain(|name, _| name.contains("layers.1."));
        let adapter = build(config.clone(), t.clone()).expect("valid");
        assert!(adapter.factors(0, TargetModule::DownProj).is_none());
        assert!(adapter.factors(1, TargetModule::DownProj).is_some());
        assert!(adapter.factors(1, TargetModule::UpProj).is_none());
        // A tensor for a layer not listed is refused.
        let extra = tensors(&props(), 2, &[TargetModule::DownProj]);
        match build(config, extra) {
            Err(Error::AdapterTensorUnexpected { name }) => assert!(name.contains("layers.0.")),
            other => panic!("expected AdapterTensorUnexpected, got {other:?}"),
        }
    }

    #[test]
    fn a_config_that_does_not_parse_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CONFIG_FILE), "{\"r\": 8, \"lora_alpha\": ").expect("w");
        match LoraAdapter::load_for(dir.path(), &props()) {
            Err(e @ Error::AdapterConfig { .. }) => {
                assert!(e.to_string().contains(CONFIG_FILE), "{e}")
            }
            other => panic!("expected AdapterConfig, got {other:?}"),
        }
        // Valid JSON without `target_modules`.
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            r#"{"r": 8, "lora_alpha": 16}"#,
        )
        .expect("w");
        match LoraAdapter::load_for(dir.path(), &props()) {
            Err(e @ Error::AdapterConfig { .. }) => {
                assert!(e.to_string().contains("target_modules"), "{e}")
            }
            other => panic!("expected AdapterConfig, got {other:?}"),
        }
    }

    #[test]
    fn unreadable_weights_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LoraConfig::new(2, 4.0, &[TargetModule::QProj]);
        config.save(dir.path(), &HashMap::new()).expect("save");
        std::fs::write(dir.path().join(WEIGHTS_FILE), b"not safetensors").expect("w");
        match LoraAdapter::load_for(dir.path(), &props()) {
            Err(Error::AdapterWeights { path, .. }) => assert!(path.ends_with(WEIGHTS_FILE)),
            other => panic!("expected AdapterWeights, got {other:?}"),
        }
        std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).expect("rm");
        assert!(matches!(
            LoraAdapter::load_for(dir.path(), &props()),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn config_values_out_of_range_are_typed() {
        let (config, t) = all(2);
        let unknown = LoraConfig {
            target_modules: vec!["q_proj".into(), "c_attn".into()],
            ..config.clone()
        };
        match build(unknown, t.clone()) {
            Err(Error::AdapterTargetModule { module }) => assert_eq!(module, "c_attn"),
            other => panic!("expected AdapterTargetModule, got {other:?}"),
        }
        let bias = LoraConfig {
            bias: "lora_only".into(),
            ..config.clone()
        };
        match build(bias, t.clone()) {
            Err(Error::Unsupported { what }) => assert!(what.contains("lora_only"), "{what}"),
            other => panic!("expected Unsupported, got {other:?}"),
        }
        let zero = LoraConfig {
            r: 0,
            ..config.clone()
        };
        assert!(matches!(
            build(zero, t.clone()),
            Err(Error::AdapterConfigValue { key, .. }) if key == "r"
        ));
        let mut dora = config.clone();
        dora.other.insert("use_dora".into(), true.into());
        assert!(matches!(build(dora, t), Err(Error::Unsupported { .. })));
    }

    #[test]
    fn a_missing_tensor_is_named() {
        let (config, mut t) = all(2);
        let name = TargetModule::UpProj.tensor_name(1, Factor::B);
        t.remove(&name);
        match build(config, t) {
            Err(e @ Error::AdapterTensorMissing { .. }) => assert!(e.to_string().contains(&name)),
            other => panic!("expected AdapterTensorMissing, got {other:?}"),
        }
    }

    #[test]
    fn a_wrong_rank_is_named() {
        let (config, mut t) = all(2);
        let name = TargetModule::KProj.tensor_name(0, Factor::A);
        t.insert(name.clone(), seeded((3, 8), 1));
        match build(config, t) {
            Err(Error::AdapterRank {
                name: n,
                expected,
                got,
            }) => assert_eq!((n, expected, got), (name, 2, 3)),
            other => panic!("expected AdapterRank, got {other:?}"),
        }
    }

    /// An adapter made for a base of another width (hidden 16 instead of 8), or a transposed
    /// factor.
    #[test]
    fn an_adapter_for_another_base_is_refused_by_shape() {
        let (config, mut t) = all(2);
        let name = TargetModule::GateProj.tensor_name(0, Factor::A);
        t.insert(name.clone(), seeded((2, 16), 1));
        match build(config.clone(), t) {
            Err(e @ Error::AdapterShape { .. }) => {
                let Error::AdapterShape {
                    name: n,
                    expected,
                    got,
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!((n, expected, got), (&name, &vec![2, 8], &vec![2, 16]));
                assert!(e.to_string().contains("another base"), "{e}");
            }
            other => panic!("expected AdapterShape, got {other:?}"),
        }
        let (_, mut t) = all(2);
        let name = TargetModule::DownProj.tensor_name(1, Factor::B);
        t.insert(name.clone(), seeded((2, 8), 1)); // (r, out) instead of (out, r)
        assert!(matches!(build(config, t), Err(Error::AdapterRank { name: n, .. }) if n == name));
    }

    #[test]
    fn a_layer_the_base_lacks_is_named() {
        let (config, mut t) = all(2);
        let name = TargetModule::QProj.tensor_name(2, Factor::A);
        t.insert(name.clone(), seeded((2, 8), 1));
        match build(config, t) {
            Err(Error::AdapterLayer {
                name: n,
                layer,
                block_count,
            }) => assert_eq!((n, layer, block_count), (name, 2, 2)),
            other => panic!("expected AdapterLayer, got {other:?}"),
        }
    }

    #[test]
    fn tensors_outside_the_targets_are_named() {
        let (_, t) = all(2);
        let config = LoraConfig::new(2, 16.0, &[TargetModule::QProj, TargetModule::VProj]);
        match build(config.clone(), t) {
            Err(Error::AdapterTensorUnexpected { name }) => {
                assert!(name.contains("k_proj") || name.contains("mlp"), "{name}")
            }
            other => panic!("expected AdapterTensorUnexpected, got {other:?}"),
        }
        let mut t = tensors(&props(), 2, &[TargetModule::QProj, TargetModule::VProj]);
        t.insert("lm_head.weight".into(), seeded((6, 8), 1));
        assert!(matches!(
            build(config, t),
            Err(Error::AdapterTensorUnexpected { name }) if name == "lm_head.weight"
        ));
    }

    #[test]
    fn an_adapter_is_checked_against_the_model_it_runs_with() {
        let (config, t) = all(2);
        let adapter = build(config, t).expect("valid");
        adapter.check_fits(&props()).expect("same sizes");
        let mut md = tiny();
        md.insert(
            "llama.feed_forward_length".into(),
            candle_core::quantized::gguf_file::Value::U32(32),
        );
        let wider = LlamaProps::from_metadata(&md).expect("props");
        assert!(matches!(
            adapter.check_fits(&wider),
            Err(Error::AdapterModelMismatch { adapter, .. }) if adapter == "test"
        ));
    }
}
