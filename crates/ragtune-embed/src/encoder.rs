//! The sentence encoder: a BERT-family model (candle-transformers' `bert`) with its
//! tokenizer, pooling and L2 normalisation, as sentence-transformers runs it.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use ragtune_util::cpu::SimdLevel;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use crate::bert::{FastBert, FastBertConfig, Precision};
use crate::pooling::Pooling;
use crate::{read_json, Error, Result};

/// Tuning knobs of [`SentenceEncoder::encode`].
#[derive(Debug, Clone)]
pub struct EncoderOptions {
    /// Most sequences in one forward pass (default 32, as sentence-transformers).
    pub batch_size: usize,
    /// Most tokens in one forward pass (default 1024; with the candle backend, padded
    /// tokens `batch * longest`). 1,024 tokens keep a projection's output (6 MB for the
    /// MiniLM FFN) near the cache, and still make 96 parallel tasks of a projection; against
    /// 16,384 (100 MB outputs) it embedded 9,000 word pieces/s against 7,650 with the int8
    /// kernels and 6,150 against 5,630 with f32 (2-core Intel AVX-512 machine, 600 passages
    /// of 190 word pieces, two runs each; benches/README.md).
    pub max_batch_tokens: usize,
    /// Overrides the truncation length in word pieces, `[CLS]`/`[SEP]` included (default:
    /// `max_seq_length` from `sentence_bert_config.json`, else the model's position limit).
    pub max_seq_len: Option<usize>,
    /// Which forward pass runs the model (default [`Backend::Fast`]).
    pub backend: Backend,
    /// The precision of [`Backend::Fast`]'s projections (default [`Precision::Auto`]);
    /// [`Backend::Candle`] is always f32.
    pub precision: Precision,
}

/// The implementation of the BERT forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The project's own packed, padding-free forward pass (`bert.rs`): same math, several
    /// times faster on the CPU.
    #[default]
    Fast,
    /// candle-transformers' `BertModel` on padded batches: the reference implementation.
    Candle,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        EncoderOptions {
            batch_size: 32,
            max_batch_tokens: 1024,
            max_seq_len: None,
            backend: Backend::Fast,
            precision: Precision::default(),
        }
    }
}

/// Who made an embedding: enough to refuse an index built by another encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderIdentity {
    /// The model directory's name (for messages).
    pub name: String,
    /// Hex sha256 of `model.safetensors`.
    pub model_sha256: String,
    /// Embedding dimension.
    pub dim: usize,
    /// The pooling.
    pub pooling: Pooling,
}

/// Row-major `(n, dim)` f32 embeddings, each row L2-normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// `n * dim` values.
    pub data: Vec<f32>,
    /// Columns.
    pub dim: usize,
}

impl Embeddings {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }
    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Row `i` (`dim` floats). Panics when `i >= len()`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// Progress of a long [`SentenceEncoder::encode_with_progress`] call.
#[derive(Debug, Clone, Copy)]
pub struct BatchDone {
    /// Texts encoded in this batch.
    pub texts: usize,
    /// Word pieces (`[CLS]`/`[SEP]` included, padding excluded) in this batch.
    pub tokens: usize,
}

/// A BERT-family sentence encoder on the CPU.
///
/// Loaded from a sentence-transformers model directory: `config.json`, `tokenizer.json`,
/// `model.safetensors` (memory-mapped), and optionally `sentence_bert_config.json`
/// (`max_seq_length`) and `1_Pooling/config.json`. Inputs are truncated to the
/// maximum sequence length, sorted by length and batched with padding only to the longest
/// sequence of each batch (the shipped tokenizer.json pads to 128; that setting is
/// replaced), then pooled and L2-normalised as sentence-transformers does.
pub struct SentenceEncoder {
    model: Model,
    tokenizer: Tokenizer,
    pooling: Pooling,
    max_seq_len: usize,
    options: EncoderOptions,
    identity: EncoderIdentity,
    device: Device,
}

impl std::fmt::Debug for SentenceEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEncoder")
            .field("identity", &self.identity)
            .field("max_seq_len", &self.max_seq_len)
            .finish_non_exhaustive()
    }
}

enum Model {
    Fast(FastBert),
    Candle(BertModel),
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

impl SentenceEncoder {
    /// Loads the encoder in `dir` with default [`EncoderOptions`].
    ///
    /// # Errors
    /// [`Error::MissingFile`] when a required file is absent, [`Error::InvalidConfig`] when a
    /// config does not parse, [`Error::Unsupported`] for a non-BERT model, and
    /// [`Error::Candle`] when the safetensors file lacks a weight or has a wrong shape.
    pub fn load(dir: impl AsRef<Path>) -> Result<SentenceEncoder> {
        Self::load_with(dir, EncoderOptions::default())
    }

    /// Loads the encoder in `dir` with `options`. Errors as [`SentenceEncoder::load`].
    pub fn load_with(dir: impl AsRef<Path>, options: EncoderOptions) -> Result<SentenceEncoder> {
        let dir = dir.as_ref();
        let need = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::MissingFile { path: p })
            }
        };
        let config_path = need("config.json")?;
        let tokenizer_path = need("tokenizer.json")?;
        let weights_path = need("model.safetensors")?;

        let raw_config: serde_json::Value = read_json(&config_path)?;
        let model_type = raw_config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if !matches!(model_type, "bert" | "roberta" | "xlm-roberta" | "camembert") {
            return Err(Error::Unsupported {
                path: config_path,
                detail: format!(
                    "model_type {model_type:?}: only BERT-family encoders (bert) are supported"
                ),
            });
        }
        let config: BertConfig =
            serde_json::from_value(raw_config.clone()).map_err(|e| Error::InvalidConfig {
                path: config_path.clone(),
                detail: e.to_string(),
            })?;
        let max_positions = raw_config
            .get("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .unwrap_or(512) as usize;
        let hidden = raw_config
            .get("hidden_size")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as usize;

        let st_config = dir.join("sentence_bert_config.json");
        let st_max = if st_config.is_file() {
            read_json::<SentenceBertConfig>(&st_config)?.max_seq_length
        } else {
            None
        };
        let max_seq_len = options
            .max_seq_len
            .or(st_max)
            .unwrap_or(max_positions)
            .min(max_positions);
        if max_seq_len < 3 {
            return Err(Error::InvalidConfig {
                path: st_config,
                detail: format!("max_seq_length {max_seq_len} is too small"),
            });
        }
        let pooling = Pooling::from_sentence_transformers(&dir.join("1_Pooling/config.json"))?;

        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| Error::InvalidConfig {
                path: tokenizer_path.clone(),
                detail: e.to_string(),
            })?;
        // Padding is done per batch, to the longest sequence; truncation at max_seq_len.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_len,
                ..Default::default()
            }))
            .map_err(|source| Error::Tokenizer {
                operation: "setting the truncation to max_seq_len",
                source,
            })?;

        let device = Device::Cpu;
        let model = match options.backend {
            Backend::Fast => Model::Fast(FastBert::load(
                &weights_path,
                &FastBertConfig {
                    hidden: config.hidden_size,
                    heads: config.num_attention_heads,
                    layers: config.num_hidden_layers,
                    eps: config.layer_norm_eps as f32,
                    precision: options.precision,
                },
            )?),
            Backend::Candle => {
                // SAFETY: the file is memory-mapped read-only; candle copies what it keeps. The
                // documented hazard (another process truncating it while mapped) is outside our
                // control, as for every mmap reader.
                let vb = unsafe {
                    VarBuilder::from_mmaped_safetensors(&[&weights_path], DType::F32, &device)?
                };
                // sentence-transformers checkpoints store `embeddings.*` or `bert.embeddings.*`.
                Model::Candle(
                    BertModel::load(vb.clone(), &config)
                        .or_else(|_| BertModel::load(vb.pp("bert"), &config))?,
                )
            }
        };

        let identity = EncoderIdentity {
            name: dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            model_sha256: sha256_file(&weights_path)?,
            dim: hidden,
            pooling,
        };
        Ok(SentenceEncoder {
            model,
            tokenizer,
            pooling,
            max_seq_len,
            options,
            identity,
            device,
        })
    }

    /// The precision the projections run in ([`Precision::Bf16`], [`Precision::Int8`] or [`Precision::F32`];
    /// always f32 for [`Backend::Candle`]).
    pub fn precision(&self) -> Precision {
        match self.model {
            Model::Fast(_) => self.options.precision.resolve(SimdLevel::active()),
            Model::Candle(_) => Precision::F32,
        }
    }

    /// Embedding dimension (384 for MiniLM-L6).
    pub fn dim(&self) -> usize {
        self.identity.dim
    }

    /// Truncation length in word pieces, `[CLS]`/`[SEP]` included.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// Who this encoder is (model hash, dim, pooling).
    pub fn identity(&self) -> &EncoderIdentity {
        &self.identity
    }

    /// The tokenizer, with padding off and truncation at [`Self::max_seq_len`].
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text` as the model sees it (`[CLS]` ... `[SEP]`, truncated).
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_one(text)?.get_ids().to_vec())
    }

    fn encode_one(&self, text: &str) -> Result<Encoding> {
        self.tokenizer
            .encode(text, true)
            .map_err(|source| Error::Tokenizer {
                operation: "encoding a text",
                source,
            })
    }

    /// Embeds `texts` into `(texts.len(), dim)` L2-normalised f32 rows, in input order.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] or [`Error::Candle`].
    pub fn encode<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Embeddings> {
        self.encode_with_progress(texts, |_| {})
    }

    /// As [`Self::encode`], calling `on_batch` after every forward pass.
    pub fn encode_with_progress<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        mut on_batch: impl FnMut(BatchDone),
    ) -> Result<Embeddings> {
        let dim = self.dim();
        let mut data = vec![0f32; texts.len() * dim];
        if texts.is_empty() {
            return Ok(Embeddings { data, dim });
        }
        let encodings = {
            use rayon::prelude::*;
            texts
                .par_iter()
                .map(|t| self.encode_one(t.as_ref()))
                .collect::<Result<Vec<_>>>()?
        };
        // Longest first, so the first batch shows the worst memory use and the padding within
        // each batch is minimal.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].get_ids().len()));

        let packed = matches!(self.model, Model::Fast(_));
        let mut start = 0;
        while start < order.len() {
            let size = if packed {
                // No padding: fill the batch up to the token budget.
                let mut tokens = 0;
                order[start..]
                    .iter()
                    .take_while(|&&i| {
                        tokens += encodings[i].get_ids().len();
                        tokens <= self.options.max_batch_tokens
                    })
                    .count()
                    .max(1)
            } else {
                let longest = encodings[order[start]].get_ids().len().max(1);
                let by_tokens = (self.options.max_batch_tokens / longest).max(1);
                self.options.batch_size.min(by_tokens).max(1)
            };
            let batch = &order[start..(start + size).min(order.len())];
            let rows = self.forward_batch(batch.iter().map(|&i| &encodings[i]))?;
            for (k, &i) in batch.iter().enumerate() {
                data[i * dim..(i + 1) * dim].copy_from_slice(&rows[k * dim..(k + 1) * dim]);
            }
            on_batch(BatchDone {
                texts: batch.len(),
                tokens: batch.iter().map(|&i| encodings[i].get_ids().len()).sum(),
            });
            start += batch.len();
        }
        Ok(Embeddings { data, dim })
    }

    /// One forward pass over a batch, padded to its longest sequence. Returns
    /// `batch * dim` floats.
    fn forward_batch<'a>(&self, batch: impl Iterator<Item = &'a Encoding>) -> Result<Vec<f32>> {
        let batch: Vec<&Encoding> = batch.collect();
        let model = match &self.model {
            Model::Fast(fast) => {
                let seqs: Vec<(&[u32], &[u32])> = batch
                    .iter()
                    .map(|e| (e.get_ids(), e.get_type_ids()))
                    .collect();
                let hidden = fast.forward(&seqs)?;
                let dim = fast.hidden();
                let mut out = vec![0f32; batch.len() * dim];
                let mut row = 0;
                for (k, e) in batch.iter().enumerate() {
                    let len = e.get_ids().len();
                    self.pooling.pool_rows_normalized(
                        &hidden[row * dim..(row + len) * dim],
                        dim,
                        &mut out[k * dim..(k + 1) * dim],
                    );
                    row += len;
                }
                return Ok(out);
            }
            Model::Candle(model) => model,
        };
        let b = batch.len();
        let seq = batch.iter().map(|e| e.get_ids().len()).max().unwrap_or(1);
        let mut ids = vec![0u32; b * seq];
        let mut types = vec![0u32; b * seq];
        let mut mask = vec![0f32; b * seq];
        for (r, e) in batch.iter().enumerate() {
            let n = e.get_ids().len();
            ids[r * seq..r * seq + n].copy_from_slice(e.get_ids());
            types[r * seq..r * seq + n].copy_from_slice(e.get_type_ids());
            mask[r * seq..r * seq + n].fill(1.0);
        }
        let ids = Tensor::from_vec(ids, (b, seq), &self.device)?;
        let types = Tensor::from_vec(types, (b, seq), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, seq), &self.device)?;
        let hidden = model.forward(&ids, &types, Some(&mask))?; // (b, seq, dim)
        let pooled = self.pooling.pool_normalized(&hidden, &mask)?; // (b, dim)
        Ok(pooled.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Hex sha256 of a file, streamed.
///
/// # Errors
/// [`Error::Io`].
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
