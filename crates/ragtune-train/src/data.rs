//! Training data: chat-format JSON Lines, rendered with the model's chat template, tokenized
//! with a loss mask on the assistant tokens only, and packed into sequences.
//!
//! **Format.** One JSON object per line with a `messages` array of `{"role", "content"}`
//! (`system`, `user`, `assistant`), as in OpenAI / Hugging Face chat datasets; other keys are
//! ignored; blank lines are skipped. An example needs at least one assistant message after
//! another message.
//!
//! **Loss mask.** For each assistant message `i`, the template is rendered for
//! `messages[..i]` with the generation prompt and for `messages[..=i]` without: the text
//! between the two (the answer and the template's end-of-turn marker, `<|im_end|>` for
//! ChatML) is where the loss is taken, so the model learns to answer and to stop, never to
//! write the user's turns. Each part is tokenized on its own, as generation sees it: the
//! prompt is encoded once, the answer is produced token by token after it.
//!
//! **Too long.** An example longer than the sequence length is *skipped* (cutting it would
//! cut the answer, which comes last) and counted in [`Prepared::skipped_too_long`].

use std::path::Path;

use ragtune_generate::{ChatMessage, ChatTemplate, Role, SpecialTokens, Tokenizer};
use serde_json::Value;

use crate::error::io;
use crate::model::PackedSeq;
use crate::{EmptyReason, Error, Result};

/// One chat example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The conversation, in order.
    pub messages: Vec<ChatMessage>,
}

/// Parses one JSONL line; `Err` carries the message for [`Error::DataLine`].
fn parse_line(line: &str) -> std::result::Result<Example, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let messages = value
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("no \"messages\" array")?;
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(other) => return Err(format!("message {i}: unknown role {other:?}")),
            None => return Err(format!("message {i}: no \"role\" string")),
        };
        let content = m
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("message {i}: no \"content\" string"))?;
        out.push(ChatMessage::new(role, content));
    }
    if !out
        .iter()
        .enumerate()
        .any(|(i, m)| i > 0 && m.role == Role::Assistant)
    {
        return Err("no assistant message after a prompt message (nothing to learn)".into());
    }
    Ok(Example { messages: out })
}

/// Reads a chat-format JSONL file.
///
/// # Errors
/// [`Error::Io`] if unreadable, [`Error::DataLine`] naming the first malformed line (1-based),
/// [`Error::EmptyDataset`] when it holds no example.
pub fn read_jsonl(path: impl AsRef<Path>) -> Result<Vec<Example>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_line(line).map_err(|message| Error::DataLine {
            path: path.to_path_buf(),
            line: n + 1,
            message,
        })?);
    }
    if out.is_empty() {
        return Err(Error::EmptyDataset {
            path: Some(path.to_path_buf()),
            reason: EmptyReason::NoExample,
        });
    }
    Ok(out)
}

/// An example as token ids with its loss mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    /// Token ids of the rendered conversation.
    pub ids: Vec<u32>,
    /// `true` where the token is part of an assistant answer (predicted, scored).
    pub loss: Vec<bool>,
}

impl Tokenized {
    /// Number of scored tokens.
    pub fn target_count(&self) -> usize {
        self.loss.iter().skip(1).filter(|&&l| l).count()
    }
}

/// Renders and tokenizes `example` (see the module docs).
///
/// # Errors
/// Template and tokenizer errors; [`Error::UnmaskableTemplate`] when the template does not render
/// prefixes of the conversation as prefixes of its rendering (it cannot be masked).
pub fn tokenize(
    example: &Example,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
) -> Result<Tokenized> {
    let msgs = &example.messages;
    let full = template.render(msgs, false)?;
    let mut ids = Vec::new();
    let mut loss = Vec::new();
    let mut done = 0usize;
    let mut push = |text: &str, scored: bool, first: bool| -> Result<()> {
        let part = if first {
            tokenizer.encode_prompt(text)?
        } else {
            tokenizer.encode(text, SpecialTokens::Parse)?
        };
        loss.extend(std::iter::repeat_n(scored, part.len()));
        ids.extend(part);
        Ok(())
    };
    for i in 1..msgs.len() {
        if msgs[i].role != Role::Assistant {
            continue;
        }
        let prompt = template.render(&msgs[..i], true)?;
        let through = template.render(&msgs[..=i], false)?;
        if !through.starts_with(&prompt) || !full.starts_with(&through) || prompt.len() < done {
            return Err(Error::UnmaskableTemplate { message: i });
        }
        push(&full[done..prompt.len()], false, done == 0)?;
        push(&full[prompt.len()..through.len()], true, false)?;
        done = through.len();
    }
    if done < full.len() {
        push(&full[done..], false, false)?;
    }
    Ok(Tokenized { ids, loss })
}

/// Examples ready for packing, and what was left out.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// The kept examples.
    pub examples: Vec<Tokenized>,
    /// Examples longer than the sequence length (skipped).
    pub skipped_too_long: usize,
    /// Examples whose answer tokenized to nothing (skipped).
    pub skipped_no_target: usize,
}

impl Prepared {
    /// Total tokens of the kept examples.
    pub fn tokens(&self) -> usize {
        self.examples.iter().map(|e| e.ids.len()).sum()
    }
}

/// Tokenizes `examples`, skipping those longer than `seq_len` tokens.
///
/// # Errors
/// As [`tokenize`]; [`Error::EmptyDataset`] when nothing is left, saying why.
pub fn prepare(
    examples: &[Example],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    seq_len: usize,
) -> Result<Prepared> {
    let mut out = Prepared::default();
    for e in examples {
        let t = tokenize(e, template, tokenizer)?;
        if t.ids.len() > seq_len {
            out.skipped_too_long += 1;
        } else if t.target_count() == 0 {
            out.skipped_no_target += 1;
        } else {
            out.examples.push(t);
        }
    }
    if out.examples.is_empty() {
        return Err(Error::EmptyDataset {
            path: None,
            reason: EmptyReason::AllSkipped {
                examples: examples.len(),
                too_long: out.skipped_too_long,
                no_target: out.skipped_no_target,
                seq_len,
            },
        });
    }
    Ok(out)
}

/// Packs `examples` (taken in `order`) into sequences of at most `seq_len` tokens, greedily:
/// an example goes into the current sequence if it fits, else starts the next one. Each
/// example keeps its own positions (from 0) and segment.
pub fn pack(examples: &[Tokenized], order: &[usize], seq_len: usize) -> Vec<PackedSeq> {
    let mut out = Vec::new();
    let mut cur = PackedSeq::default();
    let mut segment = 0u32;
    for &i in order {
        let e = &examples[i];
        if !cur.is_empty() && cur.len() + e.ids.len() > seq_len {
            out.push(std::mem::take(&mut cur));
            segment = 0;
        }
        let start = cur.len() as u32;
        for (j, &id) in e.ids.iter().enumerate() {
            if j > 0 && e.loss[j] {
                cur.targets.push((start + j as u32 - 1, id));
            }
            cur.tokens.push(id);
            cur.positions.push(j as u32);
            cur.segments.push(segment);
        }
        segment += 1;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_lines_are_named_by_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.jsonl");
        let good = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
        std::fs::write(&path, format!("{good}\n\n{{\"messages\": 3}}\n")).expect("write");
        let err = read_jsonl(&path).expect_err("line 3 is bad").to_string();
        assert!(err.contains("d.jsonl:3:"), "{err}");
        assert!(err.contains("messages"), "{err}");
        std::fs::write(&path, r#"{"messages": [{"role": "user", "content": "q"}]}"#)
            .expect("write");
        let err = read_jsonl(&path).expect_err("no answer").to_string();
        assert!(err.contains(":1:") && err.contains("assistant"), "{err}");
        std::fs::write(&path, "\n\n").expect("write");
        assert!(matches!(
            read_jsonl(&path),
            Err(Error::EmptyDataset {
                path: Some(_),
                reason: EmptyReason::NoExample
            })
        ));
    }

    #[test]
    fn packing_keeps_positions_segments_and_targets_per_example() {
        let a = Tokenized {
            ids: vec![1, 2, 3],
            loss: vec![false, true, true],
        };
        let b = Tokenized {
            ids: vec![4, 5],
            loss: vec![false, true],
        };
        let c = Tokenized {
            ids: vec![6, 7, 8, 9],
            loss: vec![false, false, true, false],
        };
        let seqs = pack(&[a, b, c], &[0, 1, 2], 5);
        assert_eq!(seqs.len(), 2);
        assert_eq!(seqs[0].tokens, [1, 2, 3, 4, 5]);
        assert_eq!(seqs[0].positions, [0, 1, 2, 0, 1]);
        assert_eq!(seqs[0].segments, [0, 0, 0, 1, 1]);
        // Token 2 is predicted at index 0, token 3 at 1; token 5 at index 3 (b's first).
        assert_eq!(seqs[0].targets, [(0, 2), (1, 3), (3, 5)]);
        assert_eq!(seqs[1].tokens, [6, 7, 8, 9]);
        assert_eq!(seqs[1].segments, [0, 0, 0, 0]);
        assert_eq!(seqs[1].targets, [(1, 8)]);
    }
}
