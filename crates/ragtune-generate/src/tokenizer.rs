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
//! SentencePiece GGUFs (`tokenizer.ggml.model = "llama"`, e.g. Llama 2 and Mistral v0.1) are not
//! built yet: they give [`Error::UnsupportedTokenizer`]; pass their `tokenizer.json` to
//! [`Tokenizer::from_file`] instead.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::props::Metadata;
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
/// Cheap to share by reference; `encode` and `decode` take `&self`.
#[derive(Clone)]
pub struct Tokenizer {
    /// Splits special-token text into special tokens.
    parsing: tokenizers::Tokenizer,
    /// Treats special-token text as ordinary text.
    plain: tokenizers::Tokenizer,
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
        let types_key = "tokenizer.ggml.token_type";
        let types = md.opt_ints(types_key)?.unwrap_or_default();
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(Error::LengthMismatch {
                key: types_key.into(),
                expected: tokens.len(),
                got: types.len(),
            });
        }

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
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(pre_tokenizer));
        tok.with_decoder(Some(ByteLevel::default()));

        let of_type = |ty: i64| {
            types
                .iter()
                .zip(&tokens)
                .filter(move |(t, _)| **t == ty)
                .map(|(_, tok)| *tok)
        };
        let control: Vec<AddedToken> = of_type(TOKEN_TYPE_CONTROL)
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        let user: Vec<AddedToken> = of_type(TOKEN_TYPE_USER_DEFINED)
            .map(|t| AddedToken::from(t.to_string(), false))
            .collect();
        tok.add_special_tokens(control)
            .map_err(|e| Error::Tokenizer {
                path: None,
                detail: e.to_string(),
            })?;
        tok.add_tokens(user).map_err(|e| Error::Tokenizer {
            path: None,
            detail: e.to_string(),
        })?;

        let vocab_size = tokens.len();
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
            .unwrap_or(false);
        Ok(Self::from_inner(tok, bos, add_bos))
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
        Ok(Self::from_inner(tok, None, false))
    }

    /// Wraps a `tokenizers` tokenizer. `bos` is prepended by [`Tokenizer::encode_prompt`] when
    /// `add_bos` is true.
    pub fn from_inner(tok: tokenizers::Tokenizer, bos: Option<u32>, add_bos: bool) -> Self {
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
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.parsing
    }
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
    fn unknown_pre_tokenizer_and_sentencepiece_are_typed_errors() {
        let mut md = tiny_tok();
        md.insert("tokenizer.ggml.pre".into(), Value::String("qwen9".into()));
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(Error::UnsupportedTokenizer { key, value }) if key == "tokenizer.ggml.pre" && value == "qwen9"
        ));
        let mut md = tiny_tok();
        md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        assert!(matches!(
            Tokenizer::from_metadata(&md),
            Err(Error::UnsupportedTokenizer { .. })
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
