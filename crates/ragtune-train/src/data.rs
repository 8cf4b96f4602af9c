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
//!
//! **Source blocks** (prompt format v2, block attention; Sun et al. 2024, arXiv 2409.15355).
//! A retrieval example may mark its sources with a top-level `"blocks": [[start, end], ...]`:
//! byte ranges of the `content` of its first user message, which must come before any other
//! user or assistant message, in order and disjoint (the engine's `[n] (doc_id) text\n`
//! lines; `ragtune finetune-data` writes them). Prepared with
//! [`SourceAttention::Blocks`], the prompt is tokenized as the engine serves a v2 prompt: the
//! *head* (everything before the first block) with [`Tokenizer::encode_prompt`], then each
//! block and each piece between or after them on its own, and the tokens are labelled with
//! what they attend to ([`Attend`]): a block sees the head and itself, the rest sees
//! everything before it. With [`SourceAttention::Causal`] (format v1) the blocks are ignored.

use std::ops::Range;
use std::path::Path;

use ragtune_generate::{ChatMessage, ChatTemplate, Role, SpecialTokens, Tokenizer};
use serde_json::Value;

use crate::error::io;
use crate::model::{Attend, PackedSeq};
use crate::{EmptyReason, Error, Result};

/// One chat example.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Example {
    /// The conversation, in order.
    pub messages: Vec<ChatMessage>,
    /// Source blocks: byte ranges of the first user message's content, in order, disjoint,
    /// non-empty (see the module docs). Empty for an example without sources.
    pub blocks: Vec<Range<usize>>,
}

impl Example {
    /// An example without source blocks.
    pub fn new(messages: Vec<ChatMessage>) -> Self {
        Self {
            messages,
            blocks: Vec::new(),
        }
    }
}

/// How the source blocks of a retrieval example are attended: the engine's prompt formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceAttention {
    /// Prompt format v1: one causal sequence; an example's blocks are ignored.
    #[default]
    Causal,
    /// Prompt format v2, block attention: each block attends to the head and to itself; the
    /// question and the answer attend to everything.
    Blocks,
}

/// Parses a message's `"blocks"`: `[[start, end], ...]`, checked against `content`.
fn parse_blocks(value: &Value, content: &str) -> std::result::Result<Vec<Range<usize>>, String> {
    let list = value
        .as_array()
        .ok_or("\"blocks\" must be an array of [start, end] byte ranges")?;
    let mut out: Vec<Range<usize>> = Vec::with_capacity(list.len());
    for (k, pair) in list.iter().enumerate() {
        let bounds: Option<Vec<usize>> = pair.as_array().and_then(|p| {
            p.iter()
                .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect()
        });
        let range = match bounds.as_deref() {
            Some(&[start, end]) => start..end,
            _ => {
                return Err(format!(
                    "block {k}: not a [start, end] pair of byte offsets"
                ))
            }
        };
        let after_previous = out.last().is_none_or(|p| p.end <= range.start);
        if range.is_empty()
            || !after_previous
            || range.end > content.len()
            || !content.is_char_boundary(range.start)
            || !content.is_char_boundary(range.end)
        {
            return Err(format!(
                "block {k}: {range:?} is empty, overlaps the block before it, or is not within \
                 the {} bytes of the content on character boundaries",
                content.len()
            ));
        }
        out.push(range);
    }
    Ok(out)
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
    let blocks = match value.get("blocks") {
        None => Vec::new(),
        Some(b) => {
            let user = out
                .iter()
                .find(|m| m.role != Role::System)
                .filter(|m| m.role == Role::User)
                .ok_or(
                    "\"blocks\" mark the first user message, which must come first after \
                        the system messages",
                )?;
            parse_blocks(b, &user.content).map_err(|e| format!("\"blocks\": {e}"))?
        }
    };
    if !out
        .iter()
        .enumerate()
        .any(|(i, m)| i > 0 && m.role == Role::Assistant)
    {
        return Err("no assistant message after a prompt message (nothing to learn)".into());
    }
    Ok(Example {
        messages: out,
        blocks,
    })
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
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tokenized {
    /// Token ids of the rendered conversation.
    pub ids: Vec<u32>,
    /// `true` where the token is part of an assistant answer (predicted, scored).
    pub loss: Vec<bool>,
    /// What each token attends to; all [`Attend::Context`] without source blocks.
    pub attend: Vec<Attend>,
}

impl Tokenized {
    /// Number of scored tokens.
    pub fn target_count(&self) -> usize {
        self.loss.iter().skip(1).filter(|&&l| l).count()
    }
}

/// Renders and tokenizes `example` (see the module docs), its source blocks as `attention`
/// says.
///
/// # Errors
/// Template and tokenizer errors; [`Error::UnmaskableTemplate`] when the template does not render
/// prefixes of the conversation as prefixes of its rendering (it cannot be masked);
/// [`Error::BlocksNotFound`] when the blocks' message is not copied verbatim into the
/// rendering.
pub fn tokenize(
    example: &Example,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    attention: SourceAttention,
) -> Result<Tokenized> {
    let msgs = &example.messages;
    let full = template.render(msgs, false)?;
    // The source blocks as byte ranges of `full`, each with its block number (from 1).
    let blocks = match attention {
        SourceAttention::Blocks if !example.blocks.is_empty() => {
            blocks_in(example, template, &full)?
        }
        _ => Vec::new(),
    };
    let mut out = Tokenized::default();
    let mut done = 0usize;
    let mut seen_block = false;
    // Tokenizes `full[from..to]` as one piece, cut at the block boundaries inside it.
    let mut push = |from: usize, to: usize, scored: bool| -> Result<()> {
        let mut at = from;
        while at < to {
            let block = blocks.iter().find(|(r, _)| r.start <= at && at < r.end);
            let (end, attend) = match block {
                Some((r, k)) => (r.end.min(to), Attend::Block(*k)),
                None => {
                    let next = blocks
                        .iter()
                        .map(|(r, _)| r.start)
                        .filter(|&s| s > at)
                        .min()
                        .unwrap_or(to);
                    let attend = if seen_block {
                        Attend::All
                    } else {
                        Attend::Context
                    };
                    (next.min(to), attend)
                }
            };
            seen_block |= block.is_some();
            let piece = if at == 0 {
                tokenizer.encode_prompt(&full[at..end])?
            } else {
                tokenizer.encode(&full[at..end], SpecialTokens::Parse)?
            };
            out.loss.extend(std::iter::repeat_n(scored, piece.len()));
            out.attend.extend(std::iter::repeat_n(attend, piece.len()));
            out.ids.extend(piece);
            at = end;
        }
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
        push(done, prompt.len(), false)?;
        push(prompt.len(), through.len(), true)?;
        done = through.len();
    }
    if done < full.len() {
        push(done, full.len(), false)?;
    }
    Ok(out)
}

/// `example.blocks` as byte ranges of its rendering `full`, numbered from 1: the blocks'
/// message is found as the last copy of its content in the rendering of the conversation up
/// to it (as the engine finds its user message).
fn blocks_in(
    example: &Example,
    template: &ChatTemplate,
    full: &str,
) -> Result<Vec<(Range<usize>, u32)>> {
    let at = example
        .messages
        .iter()
        .position(|m| m.role == Role::User)
        .ok_or(Error::BlocksNotFound)?;
    let upto = template.render(&example.messages[..=at], false)?;
    let content = &example.messages[at].content;
    let start = upto
        .rfind(content.as_str())
        .filter(|_| full.starts_with(&upto))
        .ok_or(Error::BlocksNotFound)?;
    Ok(example
        .blocks
        .iter()
        .zip(1u32..)
        .map(|(r, k)| (start + r.start..start + r.end, k))
        .collect())
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

/// Tokenizes `examples` (their source blocks as `attention` says), skipping those longer
/// than `seq_len` tokens.
///
/// # Errors
/// As [`tokenize`]; [`Error::EmptyDataset`] when nothing is left, saying why.
pub fn prepare(
    examples: &[Example],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    seq_len: usize,
    attention: SourceAttention,
) -> Result<Prepared> {
    let mut out = Prepared::default();
    for e in examples {
        let t = tokenize(e, template, tokenizer, attention)?;
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
/// example keeps its own positions (from 0), segment and attention labels.
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
            cur.attend
                .push(e.attend.get(j).copied().unwrap_or_default());
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
    fn source_blocks_are_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.jsonl");
        let line = |blocks: &str| {
            format!(
                r#"{{"messages": [{{"role": "system", "content": "s"}}, {{"role": "user", "content": "Sources:\n[1] a\n[2] bé\n\nQuestion: q"}}, {{"role": "assistant", "content": "a [1]."}}], "blocks": {blocks}}}"#
            )
        };
        std::fs::write(&path, line("[[9, 15], [15, 23]]")).expect("write");
        let e = read_jsonl(&path).expect("valid blocks");
        assert_eq!(e[0].blocks, [9..15, 15..23]);
        assert_eq!(&e[0].messages[1].content[9..15], "[1] a\n");
        for bad in [
            "[[9, 15], [14, 23]]", // overlap
            "[[9, 9]]",            // empty
            "[[9, 200]]",          // past the content
            "[[9, 21]]",           // inside the two bytes of é
            "[[9]]",               // not a pair
            "{\"a\": 1}",          // not a list
        ] {
            std::fs::write(&path, line(bad)).expect("write");
            let err = read_jsonl(&path).expect_err(bad).to_string();
            assert!(
                err.contains("d.jsonl:1:") && err.contains("blocks"),
                "{bad}: {err}"
            );
        }
        // Blocks need the user message first.
        std::fs::write(
            &path,
            r#"{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "[1] x"}, {"role": "assistant", "content": "a"}], "blocks": [[0, 5]]}"#,
        )
        .expect("write");
        let err = read_jsonl(&path).expect_err("history").to_string();
        assert!(err.contains("first user message"), "{err}");
    }

    #[test]
    fn block_labels_narrow_what_a_token_sees() {
        use Attend::{All, Block, Context};
        assert!(Context.sees(Context) && !Context.sees(Block(1)) && !Context.sees(All));
        assert!(Block(1).sees(Context) && Block(1).sees(Block(1)));
        assert!(!Block(1).sees(Block(2)) && !Block(2).sees(All));
        assert!(All.sees(Context) && All.sees(Block(3)) && All.sees(All));
    }

    #[test]
    fn packing_keeps_positions_segments_and_targets_per_example() {
        let a = Tokenized {
            ids: vec![1, 2, 3],
            loss: vec![false, true, true],
            attend: vec![Attend::Context; 3],
        };
        let b = Tokenized {
            ids: vec![4, 5],
            loss: vec![false, true],
            attend: vec![Attend::Context, Attend::Block(1)],
        };
        let c = Tokenized {
            ids: vec![6, 7, 8, 9],
            loss: vec![false, false, true, false],
            attend: vec![Attend::Context; 4],
        };
        let seqs = pack(&[a, b, c], &[0, 1, 2], 5);
        assert_eq!(seqs.len(), 2);
        assert_eq!(seqs[0].tokens, [1, 2, 3, 4, 5]);
        assert_eq!(seqs[0].positions, [0, 1, 2, 0, 1]);
        assert_eq!(seqs[0].segments, [0, 0, 0, 1, 1]);
        assert_eq!(seqs[0].attend[3..], [Attend::Context, Attend::Block(1)]);
        // Token 2 is predicted at index 0, token 3 at 1; token 5 at index 3 (b's first).
        assert_eq!(seqs[0].targets, [(0, 2), (1, 3), (3, 5)]);
        assert_eq!(seqs[1].tokens, [6, 7, 8, 9]);
        assert_eq!(seqs[1].segments, [0, 0, 0, 0]);
        assert_eq!(seqs[1].targets, [(1, 8)]);
    }
}
