//! The engine's configuration: embedded defaults, overridden by a `ragtune.toml` the user
//! may edit, overridden by CLI flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ragtune_embed::{EncoderOptions, Precision};
use serde::{Deserialize, Serialize};

use crate::profile::Profile;
use crate::retrieve::RetrievalConfig;
use crate::{Error, Result};

/// The configuration file read from the working directory when present.
pub const CONFIG_FILE: &str = "ragtune.toml";

/// What an [`Engine`](super::Engine) is built from. Every field has a default; a
/// `ragtune.toml` sets any subset:
///
/// ```toml
/// profile = "licensedb"    # or "generic", or the path of a profile file
/// models_dir = "models"
/// index = "index/licensedb"
/// context_window = 2048
/// k = 2
/// max_chunks_per_doc = 2
/// max_tokens = 128
/// default_adapter = "licenses-lora"
///
/// [retrieval]
/// mode = "hybrid"          # or "dense", "lexical"
/// rrf_k = 60.0
/// dense_weight = 1.0
/// lexical_weight = 1.0
/// identifier_weight = 1.0
/// candidates = 50
/// # identifier_fields = { doc_id = 1.0, title = 1.0 }   # default: the profile's
///
/// [adapters]
/// licenses-lora = "models/adapters/licenses-lora"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// The corpus profile: a built-in name (`licensedb`, `generic`) or the path of a profile
    /// TOML file (see [`crate::profile`]).
    pub profile: String,
    /// Where the pinned models and corpus are (fetched on first use).
    pub models_dir: PathBuf,
    /// The index directory; `None`: `index/<profile name>`, built from the profile's pinned
    /// corpus on first use when the profile has one.
    pub index: Option<PathBuf>,
    /// A sentence-transformers model directory instead of the pinned MiniLM.
    pub embedder: Option<PathBuf>,
    /// The encoder's projections: `auto` (the default: `int8` where the CPU has AVX-512
    /// VNNI, else `f32`), `int8` (Q8_0 weights and integer kernels, about 1.7x the f32
    /// throughput with VNNI; embeddings at cosine >= 0.999 to f32) or `f32` (bit-level
    /// sentence-transformers). An index built in one precision is searched in any other.
    pub encoder_precision: Precision,
    /// A GGUF file instead of the pinned SmolLM2-135M-Instruct.
    pub gguf: Option<PathBuf>,
    /// LoRA adapters by name: a directory each (relative paths are taken from the working
    /// directory). Adapters that are configured but absent on disk are skipped with a
    /// warning; naming one in a request is then an error.
    pub adapters: BTreeMap<String, PathBuf>,
    /// The adapter of `hybrid` and `finetune` requests that name none.
    pub default_adapter: Option<String>,
    /// KV cache positions per request: prompt + generated tokens, at most the model's
    /// context length.
    pub context_window: usize,
    /// Sources put into a retrieval prompt (before the token budget).
    pub k: usize,
    /// At most this many chunks of one document among the sources.
    pub max_chunks_per_doc: usize,
    /// Default maximum of generated tokens.
    pub max_tokens: usize,
    /// Keep computed KV across requests and reuse it (prefix caching: the system prompt, a
    /// chat's earlier turns, repeated prompts, and with `block_attention` the sources'
    /// chunk blocks).
    pub prefix_cache: bool,
    /// The bound of the prefix cache in MiB of f16 KV, least recently used entries evicted
    /// first (SmolLM2-135M: 22.5 KiB per position, so 256 MiB hold about 11,600 positions).
    pub prefix_cache_mb: usize,
    /// Retrieval prompts in format v2 (block attention, see [`prompt`](super::prompt)):
    /// each source's KV is computed once and reused in any prompt that has it. Off by
    /// default: the shipped adapter was trained on format v1.
    pub block_attention: bool,
    /// Decode concurrent answers together, one forward step for all of them (continuous
    /// batching; the answers are the same as one at a time). On by default: with 4
    /// concurrent answers it gives 2.1-2.2x the aggregate tokens/s of one, against 1.7x for
    /// independent steps (2-core machine, docs/serve.md).
    pub batch_decode: bool,
    /// How sources are retrieved: `mode` (`hybrid`, `dense`, `lexical`), RRF constant and
    /// weights, identifier fields (see [`RetrievalConfig`]).
    pub retrieval: RetrievalConfig,
    /// When the default index has to be built on first use: index the metadata records
    /// first and embed the full texts on a thread, so the engine opens in seconds and
    /// searches the full index once it is written (`ragtune chat` sets it). Not a file key.
    #[serde(skip)]
    pub index_in_background: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            profile: crate::profile::DEFAULT_PROFILE.to_string(),
            models_dir: PathBuf::from("models"),
            index: None,
            embedder: None,
            encoder_precision: Precision::Auto,
            gguf: None,
            adapters: BTreeMap::new(),
            default_adapter: None,
            context_window: 2048,
            // 2, not 4: measured with `ragtune bench` (60 questions, hybrid retrieval, shipped
            // adapter), k = 2 answers 85% in hybrid against 78% with k = 4 and halves the
            // first-token time; with more sources, look-alike records (`mit-license-1998` for
            // "the MIT license") lead SmolLM2-135M to copy the wrong one.
            k: 2,
            max_chunks_per_doc: 2,
            max_tokens: 128,
            prefix_cache: true,
            prefix_cache_mb: 256,
            block_attention: false,
            batch_decode: true,
            retrieval: RetrievalConfig::default(),
            index_in_background: false,
        }
    }
}

impl EngineConfig {
    /// The sentence encoder's options: the defaults with `encoder_precision`.
    pub fn encoder_options(&self) -> EncoderOptions {
        EncoderOptions {
            precision: self.encoder_precision,
            ..EncoderOptions::default()
        }
    }

    /// The defaults overridden by `path` when it exists.
    ///
    /// # Errors
    /// [`Error::ConfigFile`] naming the file for a file that cannot be read or parsed
    /// (unknown keys included).
    pub fn load_or_default(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Ok(Self::default());
        }
        let err = |reason: String| Error::ConfigFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// The profile that [`profile`](Self::profile) names.
    ///
    /// # Errors
    /// As [`Profile::resolve`].
    pub fn resolve_profile(&self) -> Result<Profile> {
        Profile::resolve(&self.profile)
    }

    /// The index directory: [`index`](Self::index), else `index/<profile name>`.
    pub fn index_dir(&self, profile: &Profile) -> PathBuf {
        self.index
            .clone()
            .unwrap_or_else(|| default_index_dir(profile))
    }
}

/// The default index directory of `profile`: `index/<name>`.
pub fn default_index_dir(profile: &Profile) -> PathBuf {
    Path::new("index").join(&profile.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_file_overrides_the_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, "k = 2\n[adapters]\nx = \"a/b\"\n").expect("write");
        let c = EngineConfig::load_or_default(&path).expect("load");
        assert_eq!(c.k, 2);
        assert_eq!(c.adapters["x"], PathBuf::from("a/b"));
        assert_eq!(c.context_window, 2048);
        std::fs::write(&path, "kk = 2\n").expect("write");
        let err = EngineConfig::load_or_default(&path).expect_err("unknown key");
        assert!(err.to_string().contains("kk"), "{err}");
    }

    #[test]
    fn encoder_precision_is_read_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CONFIG_FILE);
        assert_eq!(
            EngineConfig::default().encoder_options().precision,
            Precision::Auto
        );
        std::fs::write(&path, "encoder_precision = \"int8\"\n").expect("write");
        let c = EngineConfig::load_or_default(&path).expect("load");
        assert_eq!(c.encoder_options().precision, Precision::Int8);
        std::fs::write(&path, "encoder_precision = \"int4\"\n").expect("write");
        let err = EngineConfig::load_or_default(&path).expect_err("unknown precision");
        assert!(err.to_string().contains("int4"), "{err}");
    }
}
