//! [`SharedModel`]: the vocabulary and segmentation of a tokenizer, held once behind an
//! `Arc` and shared by the two `tokenizers` pipelines of [`Tokenizer`](crate::Tokenizer) (one
//! per special-token mode; `tokenizers` keeps that mode in a pipeline's added vocabulary).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tokenizers::{
    DecoderWrapper, Model, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Token, TokenizerImpl,
};

use crate::spm::SpmModel;

/// The model half of a tokenizer (vocabulary and segmentation), held once and shared by the
/// two special-token modes of [`Tokenizer`](crate::Tokenizer): `tokenizers` keeps that mode in the added
/// vocabulary of a whole `TokenizerImpl`, so the two modes are two of those around one model.
#[derive(Debug, Clone)]
pub enum SharedModel {
    /// A `tokenizers` model (byte-level BPE from GGUF, or any `tokenizer.json`).
    Hf(Arc<ModelWrapper>),
    /// SentencePiece's BPE as llama.cpp runs it on a GGUF vocabulary (module `spm`).
    Spm(Arc<SpmModel>),
}

impl Model for SharedModel {
    type Trainer = tokenizers::models::TrainerWrapper;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        match self {
            Self::Hf(m) => m.tokenize(sequence),
            Self::Spm(m) => m.tokenize(sequence),
        }
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Self::Hf(m) => m.token_to_id(token),
            Self::Spm(m) => m.token_to_id(token),
        }
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        match self {
            Self::Hf(m) => m.id_to_token(id),
            Self::Spm(m) => m.id_to_token(id),
        }
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        match self {
            Self::Hf(m) => m.get_vocab(),
            Self::Spm(m) => m.get_vocab(),
        }
    }

    fn get_vocab_size(&self) -> usize {
        match self {
            Self::Hf(m) => m.get_vocab_size(),
            Self::Spm(m) => m.get_vocab_size(),
        }
    }

    fn save(
        &self,
        folder: &Path,
        prefix: Option<&str>,
    ) -> tokenizers::Result<Vec<std::path::PathBuf>> {
        match self {
            Self::Hf(m) => m.save(folder, prefix),
            Self::Spm(m) => m.save(folder, prefix),
        }
    }

    fn get_trainer(&self) -> Self::Trainer {
        match self {
            Self::Hf(m) => m.get_trainer(),
            Self::Spm(m) => m.get_trainer(),
        }
    }
}

impl serde::Serialize for SharedModel {
    /// A `tokenizers` model serializes as itself (so [`InnerTokenizer::save`] writes a
    /// `tokenizer.json`); a GGUF SentencePiece vocabulary is refused.
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Hf(m) => m.as_ref().serialize(s),
            Self::Spm(_) => Err(serde::ser::Error::custom(
                "a SentencePiece vocabulary read from GGUF metadata has no tokenizer.json form",
            )),
        }
    }
}

/// A `tokenizers` tokenizer around a [`SharedModel`].
pub type InnerTokenizer = TokenizerImpl<
    SharedModel,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;
