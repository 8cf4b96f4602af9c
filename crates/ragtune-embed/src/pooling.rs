//! Pooling of token embeddings into one sentence embedding, as sentence-transformers'
//! `Pooling` module does (`1_Pooling/config.json`), followed by L2 normalisation
//! (`2_Normalize`).

use std::path::Path;

use candle_core::{DType, Tensor, D};
use serde::Deserialize;

use crate::{Error, Result};

/// How token embeddings become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean of the token embeddings over the attention mask (all-MiniLM-L6-v2).
    Mean,
    /// The embedding of the first (`[CLS]`) token.
    Cls,
    /// Element-wise max over the attention mask.
    Max,
}

impl Pooling {
    /// Name used in index manifests (`"mean"`, `"cls"`, `"max"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Max => "max",
        }
    }

    /// Reads sentence-transformers' `1_Pooling/config.json`; a missing file means mean pooling.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the file does not parse or asks for no or several modes.
    pub fn from_sentence_transformers(path: &Path) -> Result<Pooling> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            pooling_mode_cls_token: bool,
            #[serde(default)]
            pooling_mode_mean_tokens: bool,
            #[serde(default)]
            pooling_mode_max_tokens: bool,
            #[serde(default)]
            pooling_mode_mean_sqrt_len_tokens: bool,
        }
        if !path.exists() {
            return Ok(Pooling::Mean);
        }
        let raw: Raw = crate::read_json(path)?;
        let invalid = |detail: &str| Error::InvalidConfig {
            path: path.to_path_buf(),
            detail: detail.to_string(),
        };
        if raw.pooling_mode_mean_sqrt_len_tokens {
            return Err(invalid(
                "pooling_mode_mean_sqrt_len_tokens is not supported",
            ));
        }
        match (
            raw.pooling_mode_cls_token,
            raw.pooling_mode_mean_tokens,
            raw.pooling_mode_max_tokens,
        ) {
            (false, true, false) => Ok(Pooling::Mean),
            (true, false, false) => Ok(Pooling::Cls),
            (false, false, true) => Ok(Pooling::Max),
            _ => Err(invalid("exactly one pooling mode must be set")),
        }
    }

    /// Pools `hidden: (batch, seq, dim)` f32 with `mask: (batch, seq)` f32 (1 = token,
    /// 0 = padding) into `(batch, dim)` f32, then L2-normalises each row.
    ///
    /// # Errors
    /// Shape errors from candle when `hidden` and `mask` disagree.
    pub fn pool_normalized(self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden = hidden.to_dtype(DType::F32)?;
        let pooled = match self {
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?; // (b, s, 1)
                let summed = hidden.broadcast_mul(&m)?.sum(1)?; // (b, d)
                let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?; // (b, 1)
                summed.broadcast_div(&counts)?
            }
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Max => {
                let m = mask.unsqueeze(2)?;
                // Padding positions get -1e9 so they never win the max.
                let neg = ((m.ones_like()? - &m)? * -1e9)?;
                hidden.broadcast_add(&neg)?.max(1)?
            }
        };
        let norm = pooled
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(pooled.broadcast_div(&norm)?)
    }
}

impl Pooling {
    /// Pools the hidden states of one unpadded sequence, `rows: (len, dim)` row-major f32,
    /// into `out: (dim,)`, L2-normalised.
    pub(crate) fn pool_rows_normalized(self, rows: &[f32], dim: usize, out: &mut [f32]) {
        let len = rows.len() / dim;
        out.fill(0.0);
        match self {
            Pooling::Mean => {
                for r in rows.chunks(dim) {
                    out.iter_mut().zip(r).for_each(|(o, v)| *o += v);
                }
                let inv = 1.0 / len.max(1) as f32;
                out.iter_mut().for_each(|o| *o *= inv);
            }
            Pooling::Cls => out.copy_from_slice(&rows[..dim]),
            Pooling::Max => {
                out.fill(f32::NEG_INFINITY);
                for r in rows.chunks(dim) {
                    out.iter_mut().zip(r).for_each(|(o, v)| *o = o.max(*v));
                }
            }
        }
        let norm = out.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        out.iter_mut().for_each(|o| *o /= norm);
    }
}
