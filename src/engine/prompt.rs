//! The prompt format of every mode, versioned: the fine-tuning data (the retrieval-augmented
//! examples of the training set) is rendered with these functions, so a change here is a new
//! [`PROMPT_FORMAT_VERSION`] and a retrained adapter.
//!
//! The words come from the corpus [`Profile`]: its two system messages, and its metadata
//! record's id mention, which tells a record that already names its document. The examples
//! below are the default (LicenseDB) profile's.
//!
//! Version 1:
//! - `rag` and `hybrid` (retrieval): the profile's retrieval system message (a short answer
//!   that cites its sources as `[n]`), then one user message:
//!
//!   ```text
//!   Sources:
//!   [1] (apache-1.1) Apache License 1.1 (license key apache-1.1). The SPDX license ...
//!   [2] (apache-2.0) Apache License 2.0 (license key apache-2.0). The SPDX license ...
//!
//!   Question: What is the SPDX identifier of the Apache License 2.0?
//!   ```
//!
//!   The sources are listed in reverse order of relevance, the best last, next to the
//!   question, and numbered in the order listed: small models lean on what they read last
//!   (with the best source first, SmolLM2-135M copied the last source's SPDX id into its
//!   answer; with the best last, the right one).
//!
//! - `finetune` and `base` (closed book): the profile's closed-book system message, then the
//!   question alone as the user message.
//!
//! Sources are numbered from 1 in the order given; a source is whole or absent, never cut
//! ([`fit_sources`]).
//!
//! **Conversation memory** (the chat): earlier turns go between the system message and the
//! current user message, oldest first, as plain user/assistant messages (the earlier
//! questions without their sources, the answers as generated): system, history, then the
//! current user message exactly as above ([`with_history`]). With no history the prompt is
//! the single-turn prompt of version 1, byte for byte, so the format version is unchanged.
//!
//! **Version 2, block attention** (`block_attention = true`; retrieval modes only): the same
//! text as version 1, cut into segments that are tokenized separately and concatenated
//! ([`block_prompt`]):
//!
//! - the *head*: everything before the first source (BOS, the system message, the history,
//!   `<|im_start|>user\nSources:\n` in SmolLM2's template), causal;
//! - one *block* per source: its line `[n] (doc_id) text\n`. A block attends to the
//!   *context* (the head of the same prompt without history) and to itself only, as if it
//!   were computed right after the context: its KV is computed once per (adapter, context,
//!   block ids) and placed at its position by re-rotating the keys (Sun et al. 2024,
//!   "Block-Attention for Efficient Prefilling", arXiv 2409.15355);
//! - the *tail*: `\nQuestion: …` and the generation prompt, which attend to everything.
//!
//! Version 2 changes what the model sees (the sources do not see each other), so an adapter
//! must be trained for it to read it best ([`BLOCK_PROMPT_FORMAT_VERSION`]).
//!
//! The prompt budget is the context window minus the new tokens to generate. Sources come
//! first: they are fitted into the whole budget as if there were no history
//! ([`fit_sources`]); the history then gets what remains ([`fit_history`]): as many of the
//! most recent turns as fit, dropping the oldest whole turn (a user message and the replies
//! after it) first and never cutting a message. The prompt always fits the budget.

use std::collections::BTreeSet;

use ragtune_generate::{ChatMessage, ChatTemplate, Role, SpecialTokens, Tokenizer};

use crate::profile::Profile;
use crate::retrieve::RetrievedChunk;
use crate::{Error, Result};

/// The version of the prompt format below.
pub const PROMPT_FORMAT_VERSION: u32 = 1;

/// The version of the block-attention prompt format ([`block_prompt`]).
pub const BLOCK_PROMPT_FORMAT_VERSION: u32 = 2;

/// A retrieval prompt cut for block attention (version 2, see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPrompt {
    /// The whole prompt's ids: the head, each block, the tail.
    pub tokens: Vec<u32>,
    /// `tokens[..head]` is the head (causal).
    pub head: usize,
    /// Each source's ids within `tokens`, in prompt order; consecutive, from `head` on.
    pub blocks: Vec<std::ops::Range<usize>>,
    /// The ids every block is computed after: the head of this prompt without history.
    pub context: Vec<u32>,
}

/// The text of a retrieval prompt's user message up to and including the sources' heading.
const SOURCES_HEADING: &str = "Sources:\n";

/// The rendered retrieval prompt (with `history`) and the byte offsets of its segments:
/// where the first source line starts and where each line ends. `None` when the template
/// does not copy the user message verbatim or there is no source.
fn segments(
    template: &ChatTemplate,
    profile: &Profile,
    question: &str,
    sources: &[RetrievedChunk],
    history: &[ChatMessage],
) -> Result<Option<(String, usize, Vec<usize>)>> {
    if sources.is_empty() {
        return Ok(None);
    }
    let messages = with_history(&rag_messages(profile, question, sources), history);
    let text = template.render(&messages, true).map_err(generate_err)?;
    let user = &messages.last().expect("a user message").content;
    let Some(at) = text.rfind(user.as_str()) else {
        return Ok(None);
    };
    let first = at + SOURCES_HEADING.len();
    let mut ends = Vec::with_capacity(sources.len());
    let mut end = first;
    for (i, s) in sources.iter().enumerate() {
        let line = source_line(profile, i + 1, s) + "\n";
        if text.get(end..end + line.len()) != Some(line.as_str()) {
            return Ok(None);
        }
        end += line.len();
        ends.push(end);
    }
    Ok(Some((text, first, ends)))
}

/// The version-2 prompt of a retrieval question over `sources` (in prompt order, from
/// [`fit_sources`]) with `history` (as [`with_history`] puts it). `None` when the chat
/// template does not copy the user message into the prompt verbatim (the segments cannot be
/// found), or when there is no source: the caller then uses version 1.
///
/// # Errors
/// Template and tokenizer errors.
pub fn block_prompt(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    profile: &Profile,
    question: &str,
    sources: &[RetrievedChunk],
    history: &[ChatMessage],
) -> Result<Option<BlockPrompt>> {
    let Some((text, first, ends)) = segments(template, profile, question, sources, history)? else {
        return Ok(None);
    };
    let context = match segments(template, profile, question, sources, &[])? {
        Some((t, f, _)) => tokenizer.encode_prompt(&t[..f]).map_err(generate_err)?,
        None => return Ok(None),
    };
    let piece = |t: &str| {
        tokenizer
            .encode(t, SpecialTokens::Parse)
            .map_err(generate_err)
    };
    let mut tokens = tokenizer
        .encode_prompt(&text[..first])
        .map_err(generate_err)?;
    let head = tokens.len();
    let mut blocks = Vec::with_capacity(ends.len());
    let mut at = first;
    for end in ends {
        let start = tokens.len();
        tokens.extend(piece(&text[at..end])?);
        blocks.push(start..tokens.len());
        at = end;
    }
    tokens.extend(piece(&text[at..])?);
    Ok(Some(BlockPrompt {
        tokens,
        head,
        blocks,
        context,
    }))
}

/// How many of `prompt`'s first ids (a version-1 retrieval prompt of the same arguments)
/// are the head and the sources, the part before the question that a later question with
/// the same sources shares: the ids of that text tokenized alone, as far as they agree with
/// `prompt`. `None` as for [`block_prompt`].
///
/// # Errors
/// Template and tokenizer errors.
pub fn sources_end(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    profile: &Profile,
    question: &str,
    sources: &[RetrievedChunk],
    history: &[ChatMessage],
    prompt: &[u32],
) -> Result<Option<usize>> {
    let Some((text, _, ends)) = segments(template, profile, question, sources, history)? else {
        return Ok(None);
    };
    let end = *ends.last().expect("a source");
    let ids = tokenizer
        .encode_prompt(&text[..end])
        .map_err(generate_err)?;
    Ok(Some(
        ids.iter().zip(prompt).take_while(|(a, b)| a == b).count(),
    ))
}

/// The ids of source `n`'s block in a version-2 prompt ([`block_prompt`]): its line
/// `[n] … \n` tokenized alone, as `block_prompt` tokenizes each block. What
/// [`Engine::precompute_blocks`](super::Engine::precompute_blocks) computes ahead.
///
/// # Errors
/// Tokenizer errors.
pub fn source_block_ids(
    tokenizer: &Tokenizer,
    profile: &Profile,
    n: usize,
    chunk: &RetrievedChunk,
) -> Result<Vec<u32>> {
    let line = source_line(profile, n, chunk) + "\n";
    tokenizer
        .encode(&line, SpecialTokens::Parse)
        .map_err(generate_err)
}

/// The text of source `n` (1-based) as it appears in the prompt: `[n] (doc_id) text`, or
/// `[n] text` for a metadata record that names its document itself (the profile's
/// [`RecordTemplate::id_mention`](crate::profile::RecordTemplate::id_mention)).
pub fn source_line(profile: &Profile, n: usize, chunk: &RetrievedChunk) -> String {
    let text = chunk.text.split_whitespace().collect::<Vec<_>>().join(" ");
    let names_itself = chunk.chunk == 0
        && profile
            .record
            .as_ref()
            .is_some_and(|r| text.contains(&r.id_mention(&chunk.doc_id)));
    if names_itself {
        format!("[{n}] {text}")
    } else {
        format!("[{n}] ({}) {text}", chunk.doc_id)
    }
}

/// The messages of a retrieval-mode prompt for `question` over `sources` (in prompt order).
pub fn rag_messages(
    profile: &Profile,
    question: &str,
    sources: &[RetrievedChunk],
) -> Vec<ChatMessage> {
    rag_messages_with_blocks(profile, question, sources).0
}

/// [`rag_messages`] and where each source's line `[n] … \n` lies in the user message: byte
/// ranges of its content, in prompt order. These are the blocks of format v2
/// ([`block_prompt`]); the fine-tuning data marks them so that the trainer can render an
/// example with the v2 mask.
pub fn rag_messages_with_blocks(
    profile: &Profile,
    question: &str,
    sources: &[RetrievedChunk],
) -> (Vec<ChatMessage>, Vec<std::ops::Range<usize>>) {
    let mut user = String::from(SOURCES_HEADING);
    let mut blocks = Vec::with_capacity(sources.len());
    for (i, s) in sources.iter().enumerate() {
        let start = user.len();
        user.push_str(&source_line(profile, i + 1, s));
        user.push('\n');
        blocks.push(start..user.len());
    }
    user.push_str("\nQuestion: ");
    user.push_str(question.trim());
    let messages = vec![
        ChatMessage::system(profile.rag_system_prompt.clone()),
        ChatMessage::user(user),
    ];
    (messages, blocks)
}

/// The messages of a closed-book prompt for `question`.
pub fn closed_book_messages(profile: &Profile, question: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage::system(profile.closed_book_system_prompt.clone()),
        ChatMessage::user(question.trim().to_string()),
    ]
}

/// Renders `messages` with the chat template (generation prompt added) and tokenizes them.
///
/// # Errors
/// Template and tokenizer errors.
pub fn encode(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
) -> Result<Vec<u32>> {
    let text = template.render(messages, true).map_err(generate_err)?;
    tokenizer.encode_prompt(&text).map_err(generate_err)
}

/// Keeps as many of `candidates` (best first) as fit `budget` prompt tokens, in rank order,
/// skipping (not cutting) a source that does not fit and trying the next. Returns the kept
/// sources in prompt order (best last, see the module docs) and the prompt's token ids.
///
/// # Errors
/// [`Error::PromptTooLong`] when the prompt with no source at all exceeds `budget` (the
/// question alone does not fit), naming both numbers.
pub fn fit_sources(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    profile: &Profile,
    question: &str,
    candidates: &[RetrievedChunk],
    budget: usize,
) -> Result<(Vec<RetrievedChunk>, Vec<u32>)> {
    let mut kept: Vec<RetrievedChunk> = Vec::new();
    let mut ids = encode(template, tokenizer, &rag_messages(profile, question, &kept))?;
    if ids.len() > budget {
        return Err(Error::PromptTooLong {
            tokens: ids.len(),
            budget,
            without: "without any source",
        });
    }
    for c in candidates {
        kept.insert(0, c.clone());
        let with = encode(template, tokenizer, &rag_messages(profile, question, &kept))?;
        if with.len() <= budget {
            ids = with;
        } else {
            kept.remove(0);
        }
    }
    Ok((kept, ids))
}

/// `messages` (a single-turn prompt: a system message, then the current user message) with
/// `history` (earlier user/assistant messages, oldest first) inserted after the system
/// message. Without a leading system message the history goes first.
pub fn with_history(messages: &[ChatMessage], history: &[ChatMessage]) -> Vec<ChatMessage> {
    let split = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
    let mut out = Vec::with_capacity(messages.len() + history.len());
    out.extend_from_slice(&messages[..split]);
    out.extend_from_slice(history);
    out.extend_from_slice(&messages[split..]);
    out
}

/// The prompt of `messages` (see [`with_history`]) with as many of the most recent turns of
/// `history` as fit `budget` prompt tokens. A turn starts at a user message; the oldest
/// whole turn is dropped first and no message is ever cut. Returns how many messages of
/// `history` (its last ones) were kept and the prompt's token ids (at most `budget`).
///
/// # Errors
/// [`Error::PromptTooLong`] when `messages` alone exceed `budget`; template and tokenizer
/// errors.
pub fn fit_history(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    history: &[ChatMessage],
    budget: usize,
) -> Result<(usize, Vec<u32>)> {
    // Where the kept history may start, oldest (longest) first: the start, each later turn,
    // then nothing.
    let starts = std::iter::once(0)
        .chain((1..history.len()).filter(|&i| history[i].role == Role::User))
        .chain(std::iter::once(history.len()));
    let mut last = 0;
    for start in starts {
        let ids = encode(
            template,
            tokenizer,
            &with_history(messages, &history[start..]),
        )?;
        last = ids.len();
        if ids.len() <= budget {
            return Ok((history.len() - start, ids));
        }
    }
    Err(Error::PromptTooLong {
        tokens: last,
        budget,
        without: "without any earlier turn",
    })
}

/// A citation `[n]` found in an answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Citation {
    /// The number as written.
    pub number: usize,
    /// The cited source's document, when `number` names a source that was given.
    pub doc_id: Option<String>,
    /// `false` when the answer cites a source that was not in the prompt.
    pub valid: bool,
}

/// The citations of `answer`, in order of first appearance, each number once: `[n]`,
/// `[n, m]` and `[n][m]` forms. A number outside `1..=sources.len()` is kept and flagged
/// (`valid: false`), not dropped.
pub fn citations(answer: &str, sources: &[RetrievedChunk]) -> Vec<Citation> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else { break };
        let inside = &after[..close];
        let numbers: Option<Vec<usize>> = inside
            .split(',')
            .map(|p| p.trim().parse::<usize>().ok())
            .collect();
        if let Some(numbers) = numbers {
            for n in numbers {
                if seen.insert(n) {
                    let source = n.checked_sub(1).and_then(|i| sources.get(i));
                    out.push(Citation {
                        number: n,
                        doc_id: source.map(|s| s.doc_id.clone()),
                        valid: source.is_some(),
                    });
                }
            }
        }
        rest = &after[close + 1..];
    }
    out
}

fn generate_err(e: ragtune_generate::Error) -> Error {
    Error::Generate(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> Profile {
        Profile::default()
    }

    fn chunk(doc: &str) -> RetrievedChunk {
        RetrievedChunk {
            doc_id: doc.into(),
            chunk: 0,
            score: 0.5,
            text: format!("text of {doc}"),
            range: (0, 1),
            metadata: Default::default(),
        }
    }

    #[test]
    fn citations_are_mapped_and_unknown_ones_flagged() {
        let sources = [chunk("mit"), chunk("apache-2.0")];
        let got = citations("MIT [1], also [2, 7][1] and [x] or [", &sources);
        assert_eq!(
            got,
            vec![
                Citation {
                    number: 1,
                    doc_id: Some("mit".into()),
                    valid: true
                },
                Citation {
                    number: 2,
                    doc_id: Some("apache-2.0".into()),
                    valid: true
                },
                Citation {
                    number: 7,
                    doc_id: None,
                    valid: false
                },
            ]
        );
        assert!(citations("no citations", &sources).is_empty());
        assert!(!citations("[0]", &sources)[0].valid);
    }

    /// One token per word or run of punctuation (every one `[UNK]`), and the ChatML template
    /// of SmolLM2: token counts that are easy to reason about.
    fn word_tokenizer() -> (ChatTemplate, Tokenizer) {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0},"unk_token":"[UNK]"}}"#;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json).expect("write tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).expect("tokenizer");
        let chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' \
            + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt \
            %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let template = ChatTemplate::new(chatml, "<|im_start|>", "<|im_end|>").expect("template");
        (template, tokenizer)
    }

    fn turns(n: usize) -> Vec<ChatMessage> {
        (0..n)
            .flat_map(|i| {
                [
                    ChatMessage::user(format!("question {i} about the terms")),
                    ChatMessage::assistant(format!("answer {i} with several words in it")),
                ]
            })
            .collect()
    }

    #[test]
    fn without_history_the_prompt_is_the_single_turn_prompt() {
        let (t, tok) = word_tokenizer();
        let sources = [chunk("mit"), chunk("isc")];
        for messages in [
            rag_messages(&p(), "Which?", &sources),
            closed_book_messages(&p(), "Which?"),
        ] {
            assert_eq!(with_history(&messages, &[]), messages);
            let (kept, ids) = fit_history(&t, &tok, &messages, &[], 10_000).expect("fits");
            assert_eq!(kept, 0);
            assert_eq!(ids, encode(&t, &tok, &messages).expect("encode"));
        }
        let (kept, sources_ids) = fit_sources(&t, &tok, &p(), "Which?", &sources, 10_000)
            .map(|(k, ids)| (k.len(), ids))
            .expect("fits");
        assert_eq!(kept, 2);
        let single = encode(
            &t,
            &tok,
            &rag_messages(&p(), "Which?", &[chunk("isc"), chunk("mit")]),
        );
        assert_eq!(sources_ids, single.expect("encode"));
    }

    #[test]
    fn history_goes_between_system_and_question_oldest_first() {
        let history = turns(2);
        let m = with_history(&closed_book_messages(&p(), "Now?"), &history);
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].content, p().closed_book_system_prompt);
        assert_eq!(&m[1..5], &history[..]);
        assert_eq!(m[5], ChatMessage::user("Now?"));
    }

    #[test]
    fn a_small_budget_drops_the_oldest_turns_first_and_always_fits() {
        let (t, tok) = word_tokenizer();
        let messages = rag_messages(&p(), "Which one?", &[chunk("mit")]);
        let history = turns(5);
        let alone = encode(&t, &tok, &messages).expect("encode").len();
        let all = encode(&t, &tok, &with_history(&messages, &history))
            .expect("encode")
            .len();
        let mut previous = 0;
        for budget in alone..=all + 3 {
            let (kept, ids) = fit_history(&t, &tok, &messages, &history, budget).expect("fits");
            assert!(ids.len() <= budget, "{} > {budget}", ids.len());
            // Whole turns, the most recent ones.
            assert_eq!(kept % 2, 0);
            assert!(kept >= previous);
            previous = kept;
            let expected = with_history(&messages, &history[history.len() - kept..]);
            assert_eq!(ids, encode(&t, &tok, &expected).expect("encode"));
            // One more turn would not have fit.
            if kept < history.len() {
                let more = with_history(&messages, &history[history.len() - kept - 2..]);
                assert!(encode(&t, &tok, &more).expect("encode").len() > budget);
            }
        }
        assert_eq!(previous, history.len());
        assert!(fit_history(&t, &tok, &messages, &history, alone - 1).is_err());
    }

    #[test]
    fn the_words_come_from_the_profile() {
        let with_records = Profile {
            name: "pages".into(),
            rag_system_prompt: "Answer from the pages.".into(),
            closed_book_system_prompt: "Answer.".into(),
            record: Some(crate::profile::RecordTemplate {
                title: vec!["title".into()],
                id_label: "page".into(),
                fields: Vec::new(),
            }),
            ..Profile::default()
        };
        let mut record = chunk("travel");
        record.text = "Travel (page travel). ".into();
        let m = rag_messages(&with_records, "Which?", &[record.clone(), chunk("mit")]);
        assert_eq!(m[0].content, "Answer from the pages.");
        // A record that names its document is listed without the `(doc_id)` prefix; under a
        // profile whose records read otherwise, it gets one.
        assert_eq!(
            m[1].content,
            "Sources:\n[1] Travel (page travel).\n[2] (mit) text of mit\n\nQuestion: Which?"
        );
        assert_eq!(
            source_line(&p(), 1, &record),
            "[1] (travel) Travel (page travel)."
        );
        assert_eq!(
            closed_book_messages(&with_records, "Which?")[0].content,
            "Answer."
        );
        assert_eq!(
            closed_book_messages(&p(), "Which?")[0].content,
            p().closed_book_system_prompt
        );
    }

    #[test]
    fn sources_are_numbered_in_order() {
        let m = rag_messages(&p(), "  Which?  ", &[chunk("mit"), chunk("isc")]);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[1].content,
            "Sources:\n[1] (mit) text of mit\n[2] (isc) text of isc\n\nQuestion: Which?"
        );
    }
}
