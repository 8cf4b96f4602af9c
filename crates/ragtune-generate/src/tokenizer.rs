//! The model's own tokenizer, built from GGUF metadata (`tokenizer.ggml.*`) with the
//! `tokenizers` crate, or loaded from a user's `tokenizer.json`.
//!
//! For a byte-level BPE GGUF (`tokenizer.ggml.model = "gpt2"`) the tokenizer is:
//! a BPE model from `tokenizer.ggml.tokens` + `tokenizer.ggml.merges`; a pre-tokenizer chosen by
//! `tokenizer.ggml.pre` (for `smollm`: `Sequence[Digits(individual_digits), ByteLevel(add_prefix_space
//! = false)]`); a `ByteLevel` decoder; and every control token (`tokenizer.ggml.token_type == 3`)
//! registered as a special token, user-defined tokens (type 4) as added tokens. This reproduces
//! llama.cpp's ids on the same file (candle's `TokenizerFromGguf` adds a prefix space for
//! SmolLM2, so text does not round-trip).
//!
//! For a SentencePiece GGUF (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral, TinyLlama,
//! Gemma) the model is [`SpmModel`](crate::SpmModel), llama.cpp's `llm_tokenizer_spm`
//! (highest-scored merges of adjacent pieces by `tokenizer.ggml.scores`, byte fallback to the
//! `<0xXX>` pieces), inside a `tokenizers` pipeline: a normalizer that prepends `▁`
//! (`tokenizer.ggml.add_space_prefix`, default true; to every text segment between special
//! tokens, as llama.cpp does after a special token) and writes spaces as `▁`; the decoder
//! undoing both. Control and unknown tokens (types 3 and 2) are special tokens.
//!
//! Both special-token modes ([`SpecialTokens`]) share one model ([`SharedModel`]): Gemma 3's
//! tokenizer takes about 11 MB, where two Hugging Face-style BPE copies with every split of
//! every piece as a merge took 128 MB.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::props::Metadata;
use crate::shared_model::{InnerTokenizer, SharedModel};
use crate::spm::SpmModel;
use crate::{Error, Result};

/// GGUF token type of control tokens (`<|im_start|>`, `<|endoftext|>`, ...).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF token type of user-defined tokens.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The Llama 3 (`llama-bpe`) pre-tokenizer regex, as in its `tokenizer.json`.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Whether special-token text in the input (`"<|im_start|>"`) becomes the special token or is
/// tokenized as ordinary text. Same as llama.cpp's `special = true / false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialTokens {
    /// Special-token text becomes the special token's id (for templated prompts).
    Parse,
    /// Special-token text is ordinary text (for user input and documents).
    AsText,
}

/// A tokenizer with the model's BOS policy.
///
/// Cheap to share by reference; `encode` and `decode` take `&self`. Cloning shares the
/// vocabulary.
#[derive(Clone)]
pub struct Tokenizer {
    /// Splits special-token text into special tokens.
    parsing: InnerTokenizer,
    /// Treats special-token text as ordinary text.
    plain: InnerTokenizer,
    bos: Option<u32>,
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    ///
    /// BOS: `tokenizer.ggml.bos_token_id`, prepended by [`Tokenizer::encode_prompt`] when
    /// `tokenizer.ggml.add_bos_token` is true (default false).
    ///
    /// # Errors
    /// [`Error::MissingKey`] / [`Error::KeyType`] for absent or mistyped `tokenizer.ggml.*`
    /// keys, [`Error::LengthMismatch`] if `token_type` and `tokens` differ in length,
    /// [`Error::InvalidValue`] for a merge that is not two tokens,
    /// [`Error::UnsupportedTokenizer`] for a model or pre-tokenizer this crate cannot build.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        Self::from_metadata(&content.metadata)
    }

    /// As [`Tokenizer::from_gguf`], from the metadata map alone.
    ///
    /// # Errors
    /// See [`Tokenizer::from_gguf`].
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let md = Metadata(md);
        let model = md.string("tokenizer.ggml.model")?;
        if model == "llama" {
            return spm_from_metadata(&md);
        }
        if model != "gpt2" {
            return Err(Error::UnsupportedTokenizer {
                key: "tokenizer.ggml.model".into(),
                value: model.to_string(),
            });
        }
        let pre = md.opt_string("tokenizer.ggml.pre")?.unwrap_or("default");
        let pre_tokenizer = pre_tokenizer(pre)?;

        let tokens = md.strings("tokenizer.ggml.tokens")?;
        let merges_key = "tokenizer.ggml.merges";
        let merges = md
            .strings(merges_key)?
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::InvalidValue {
                        key: merges_key.into(),
                        detail: format!("entry {i} `{m}` is not two tokens separated by a space"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let types = token_types(&md, tokens.len())?;

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer {
                path: None,
                detail: e.to_string(),
            })?;
        let mut tok = InnerTokenizer::new(SharedModel::Hf(Arc::new(bpe.into())));
        tok.with_pre_tokenizer(Some(pre_tokenizer));
        tok.with_decoder(Some(ByteLevel::default()));

        add_typed_tokens(&mut tok, &tokens, &types, &[TOKEN_TYPE_CONTROL])?;
        finish(&md, tok, tokens.len(), false)
    }

    /// Loads a Hugging Face `tokenizer.json`. No BOS is prepended by
    /// [`Tokenizer::encode_prompt`] unless set with [`Tokenizer::with_bos`].
    ///
    /// # Errors
    /// [`Error::Tokenizer`] with the path if the file cannot be read or parsed.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let tok = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: Some(path.to_path_buf()),
            detail: e.to_string(),
        })?;
        Self::from_hf(tok, None, false).map_err(|e| match e {
            Error::Tokenizer { detail, .. } => Error::Tokenizer {
                path: Some(path.to_path_buf()),
                detail,
            },
            other => other,
        })
    }

    /// Wraps a `tokenizers` tokenizer: its model, normalizer, pre-tokenizer, post-processor,
    /// decoder and added tokens (with their ids). `bos` is prepended by
    /// [`Tokenizer::encode_prompt`] when `add_bos` is true.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] when an added token does not keep its id.
    pub fn from_hf(tok: tokenizers::Tokenizer, bos: Option<u32>, add_bos: bool) -> Result<Self> {
        let mut inner = InnerTokenizer::new(SharedModel::Hf(Arc::new(tok.get_model().clone())));
        inner
            .with_normalizer(tok.get_normalizer().cloned())
            .map_err(|e| tokenizer_error(e.to_string()))?;
        inner.with_pre_tokenizer(tok.get_pre_tokenizer().cloned());
        inner.with_post_processor(tok.get_post_processor().cloned());
        inner.with_decoder(tok.get_decoder().cloned());
        let mut added: Vec<(u32, AddedToken)> =
            tok.get_added_tokens_decoder().into_iter().collect();
        added.sort_by_key(|(id, _)| *id);
        // In id order, runs of special and of ordinary tokens (each call rebuilds the
        // matcher of added tokens, so not one call a token).
        for run in added.chunk_by(|a, b| a.1.special == b.1.special) {
            let tokens = run.iter().map(|(_, t)| t.clone());
            let result = match run[0].1.special {
                true => inner.add_special_tokens(tokens),
                false => inner.add_tokens(tokens),
            };
            result.map_err(|e| tokenizer_error(e.to_string()))?;
        }
        for (id, token) in &added {
            let got = inner.token_to_id(&token.content);
            if got != Some(*id) {
                return Err(tokenizer_error(format!(
                    "added token `{}` (id {id}) gets id {got:?} when rebuilt",
                    token.content
                )));
            }
        }
        Ok(Self::from_inner(inner, bos, add_bos))
    }

    /// Wraps a tokenizer built around a [`SharedModel`]; the two special-token modes share
    /// its model. `bos` is prepended by [`Tokenizer::encode_prompt`] when `add_bos` is true.
    pub fn from_inner(tok: InnerTokenizer, bos: Option<u32>, add_bos: bool) -> Self {
        let mut parsing = tok.clone();
        parsing.set_encode_special_tokens(false);
        let mut plain = tok;
        plain.set_encode_special_tokens(true);
        Tokenizer {
            parsing,
            plain,
            bos,
            add_bos,
        }
    }

    /// Sets the BOS token and whether [`Tokenizer::encode_prompt`] prepends it.
    pub fn with_bos(mut self, bos: Option<u32>, add_bos: bool) -> Self {
        self.bos = bos;
        self.add_bos = add_bos;
        self
    }

    /// Token ids of `text`, without BOS or any other added token.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if `tokenizers` fails (it does not for valid UTF-8 with a
    /// byte-level BPE).
    pub fn encode(&self, text: &str, special: SpecialTokens) -> Result<Vec<u32>> {
        let tok = match special {
            SpecialTokens::Parse => &self.parsing,
            SpecialTokens::AsText => &self.plain,
        };
        let enc = tok.encode(text, false).map_err(|e| Error::Tokenizer {
            path: None,
            detail: e.to_string(),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a templated prompt: special-token text parsed, BOS prepended if the model
    /// asks for it. What llama.cpp does with
    /// `tokenize(prompt, add_bos = add_bos_token, special = true)`.
    ///
    /// # Errors
    /// As [`Tokenizer::encode`].
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend(self.encode(text, SpecialTokens::Parse)?);
        Ok(ids)
    }

    /// The text of `ids`; special tokens are dropped when `skip_special` is true.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if an id is outside the vocabulary.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.parsing
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer {
                path: None,
                detail: e.to_string(),
            })
    }

    /// The id of a token string (`"<|im_end|>"`), if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.parsing.token_to_id(token)
    }

    /// The token string of an id, in the vocabulary's own form (`"Ġworld"` for byte-level BPE).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.parsing.id_to_token(id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.parsing.get_vocab_size(true)
    }

    /// The BOS id, if known.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Whether [`Tokenizer::encode_prompt`] prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The underlying `tokenizers` tokenizer (special-token text parsed).
    pub fn inner(&self) -> &InnerTokenizer {
        &self.parsing
    }
}

/// The BOS policy read from `md` around a built tokenizer (`add_bos_default`: the value when
/// `tokenizer.ggml.add_bos_token` is absent; llama.cpp's default is true for SentencePiece
/// vocabularies, false for byte-level BPE as the golden file's loader reads it).
fn finish(
    md: &Metadata<'_>,
    tok: InnerTokenizer,
    vocab_size: usize,
    add_bos_default: bool,
) -> Result<Tokenizer> {
    let bos = match md.opt_u64("tokenizer.ggml.bos_token_id")? {
        Some(id) if id < vocab_size as u64 => Some(id as u32),
        Some(id) => {
            return Err(Error::TokenOutOfRange {
                key: "tokenizer.ggml.bos_token_id".into(),
                id,
                vocab_size,
            })
        }
        None => None,
    };
    let add_bos = md
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(add_bos_default);
    Ok(Tokenizer::from_inner(tok, bos, add_bos))
}

/// An [`Error::Tokenizer`] without a path.
fn tokenizer_error(detail: String) -> Error {
    Error::Tokenizer { path: None, detail }
}

/// GGUF token type of the unknown token.
const TOKEN_TYPE_UNKNOWN: i64 = 2;

/// `tokenizer.ggml.token_type`, empty when absent.
///
/// # Errors
/// [`Error::LengthMismatch`] when it is present with another length than the `n` tokens.
fn token_types(md: &Metadata<'_>, n: usize) -> Result<Vec<i64>> {
    let key = "tokenizer.ggml.token_type";
    let types = md.opt_ints(key)?.unwrap_or_default();
    if !types.is_empty() && types.len() != n {
        return Err(Error::LengthMismatch {
            key: key.into(),
            expected: n,
            got: types.len(),
        });
    }
    Ok(types)
}

/// Registers the tokens of the `special` types as special tokens (split out when parsing
/// special-token text, text otherwise) and the user-defined ones as added tokens (always
/// split out, as llama.cpp does).
fn add_typed_tokens(
    tok: &mut InnerTokenizer,
    tokens: &[&str],
    types: &[i64],
    special: &[i64],
) -> Result<()> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Tokenizer {
        path: None,
        detail: e.to_string(),
    };
    let of = |keep: &dyn Fn(i64) -> bool, special: bool| -> Vec<AddedToken> {
        types
            .iter()
            .zip(tokens)
            .filter(|(t, _)| keep(**t))
            .map(|(_, t)| AddedToken::from(t.to_string(), special))
            .collect()
    };
    tok.add_special_tokens(of(&|t| special.contains(&t), true))
        .map_err(err)?;
    tok.add_tokens(of(&|t| t == TOKEN_TYPE_USER_DEFINED, false))
        .map_err(err)?;
    Ok(())
}

/// The SentencePiece tokenizer of `md` (see the module docs).
fn spm_from_metadata(md: &Metadata<'_>) -> Result<Tokenizer> {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as DecoderSequence;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
    use tokenizers::{DecoderWrapper, NormalizerWrapper};

    let tokens = md.strings("tokenizer.ggml.tokens")?;
    let scores_key = "tokenizer.ggml.scores";
    let scores = md
        .opt_floats(scores_key)?
        .ok_or_else(|| Error::MissingKey {
            key: scores_key.into(),
        })?;
    if scores.len() != tokens.len() {
        return Err(Error::LengthMismatch {
            key: scores_key.into(),
            expected: tokens.len(),
            got: scores.len(),
        });
    }
    let types = token_types(md, tokens.len())?;
    let tokenizer_err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Tokenizer {
        path: None,
        detail: e.to_string(),
    };
    let unk = md
        .opt_u64("tokenizer.ggml.unknown_token_id")?
        .filter(|&id| (id as usize) < tokens.len())
        .map(|id| id as u32);
    let model = SpmModel::new(&tokens, &scores, unk);
    let mut tok = InnerTokenizer::new(SharedModel::Spm(Arc::new(model)));
    let add_space_prefix = md
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let replace = Replace::new(" ", "\u{2581}").map_err(tokenizer_err)?;
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("\u{2581}".into()).into());
    }
    normalizers.push(replace.into());
    tok.with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(tokenizer_err)?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("\u{2581}", " ").map_err(tokenizer_err)?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    add_typed_tokens(
        &mut tok,
        &tokens,
        &types,
        &[TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN],
    )?;
    finish(md, tok, tokens.len(), true)
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value (llama.cpp's names).
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex| PreTokenizerWrapper::from(ByteLevel::new(false, true, use_regex));
    match pre {
        // GPT-2 regex, digits split one by one (llama.cpp: `\p{N}` then the GPT-2 regex).
        "smollm" | "starcoder" | "refact" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into())
        }
        "default" | "gpt2" | "gpt-2" => Ok(byte_level(true)),
        "llama-bpe" | "llama3" | "llama-v3" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_PATTERN.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer {
                path: None,
                detail: e.to_string(),
            })?;
            Ok(Sequence::new(vec![split.into(), byte_level(false)]).into())
        }
        other => Err(Error::UnsupportedTokenizer {
            key: "tokenizer.ggml.pre".into(),
            value: other.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::props::tests::tiny;

    /// `tiny()` plus a byte-level BPE over "a", "b", " " with one merge and one control token.
    fn tiny_tok() -> HashMap<String, Value> {
        let s = |x: &str| Value::String(x.to_string());
        let mut md = tiny();
        md.insert("tokenizer.ggml.model".into(), s("gpt2"));
        md.insert("tokenizer.ggml.pre".into(), s("smollm"));
        let tokens = ["<|end|>", "<|im_start|>", "a", "b", "ab", "Ġ", "1", "2"];
        md.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        );
        md.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                [3, 3, 1, 1, 1, 1, 1, 1]
                    .iter()
                    .map(|&t| Value::I32(t))
                    .collect(),
            ),
        );
        md.insert("tokenizer.ggml.merges".into(), Value::Array(vec![s("a b")]));
        md
    }

    #[test]
    fn bpe_from_metadata_round_trips() {
        let tok = Tokenizer::from_metadata(&tiny_tok()).expect("tokenizer");
        let ids = tok
            .encode("ab a 12", SpecialTokens::AsText)
            .expect("encode");
        assert_eq!(ids, [4, 5, 2, 5, 6, 7]);
        assert_eq!(tok.decode(&ids, false).expect("decode"), "ab a 12");
    }

    #[test]
    fn special_text_is_parsed_only_when_asked() {
        let tok = Tokenizer::from_metadata(&tiny_tok()).expect("tokenizer");
        assert_eq!(
            tok.encode("<|im_start|>ab", SpecialTokens::Parse)
                .expect("encode"),
            [1, 4]
        );
        // As text, "<|im_start|>" is bytes: only the "a" of "start" is in this tiny vocabulary
        // (BPE without an unk token drops the rest).
        assert_eq!(
            tok.encode("<|im_start|>ab", SpecialTokens::AsText)
                .expect("encode"),
            [2, 4]
        );
        assert_eq!(tok.decode(&[1, 4], true).expect("decode"), "ab");
    }

    #[test]
    fn bos_is_prepended_when_the_file_says_so() {
        let mut md = tiny_tok();
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
        md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
        let tok = Tokenizer::from_metadata(&md).expect("tokenizer");
        assert_eq!(tok.encode_prompt("ab").expect("encode"), [1, 4]);
    }

    #[test]
    fn llama3_pre_tokenizer_builds_and_round_trips() {
        let mut md = tiny_tok();
        md.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("llama-bpe".into()),
        );
        let tok = Tokenizer::from_metadata(&md).expect("tokenizer");
        let ids = tok
            .encode("ab a 12", SpecialTokens::AsText)
            .expect("encode");
        assert_eq!(tok.decode(&ids, false).expect("decode"), "ab a 12");
    }

    #[test]
    fn tokenizer_json_round_trip() {
        let tok = Tokenizer::from_metadata(&tiny_tok()).expect("tokenizer");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokenizer.json");
        tok.inner().save(&path, false).expect("save");
        let loaded = Tokenizer::from_file(&path).expect("load");
        for text in ["ab a 12", "<|im_start|>ab"] {
            for special in [SpecialTokens::Parse, SpecialTokens::AsText] {
                assert_eq!(
                    loaded.encode(text, special).ok(),
                    tok.encode(text, special).ok()
                );
            }
        }
        match Tokenizer::from_file(dir.path().join("missing.json")) {
            Err(Error::Tokenizer { path: Some(p), .. }) => assert!(p.ends_with("missing.json")),
            other => panic!("expected Tokenizer error with the path, got {other:?}"),
        }
    }

    #[test]
    fn unknown_pre_tokenizers_and_models_are_typed_errors() {
        let mut md = tiny_tok();
        md.insert("tokenizer.ggml.pre".into(), Value::String("qwen9".into()));
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(Error::UnsupportedTokenizer { key, value }) if key == "tokenizer.ggml.pre" && value == "qwen9"
        ));
        let mut md = tiny_tok();
        md.insert("tokenizer.ggml.model".into(), Value::String("rwkv".into()));
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(Error::UnsupportedTokenizer { value, .. }) if value == "rwkv"
        ));
        // A SentencePiece vocabulary needs its scores.
        let mut md = tiny_tok();
        md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(Error::MissingKey { key }) if key == "tokenizer.ggml.scores"
        ));
    }

    #[test]
    fn malformed_arrays_are_named() {
        let mut md = tiny_tok();
        md.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(vec![Value::I32(3)]),
        );
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(Error::LengthMismatch {
                expected: 8,
                got: 1,
                ..
            })
        ));
        let mut md = tiny_tok();
        md.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("ab".into())]),
        );
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(Error::InvalidValue { .. })
        ));
    }
}
