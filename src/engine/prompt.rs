//! The prompt format of every mode, versioned: the fine-tuning data (the retrieval-augmented
//! examples of the training set) is rendered with these functions, so a change here is a new
//! [`PROMPT_FORMAT_VERSION`] and a retrained adapter.
//!
//! Version 1:
//! - `rag` and `hybrid` (retrieval): a system message asking for a short answer that cites
//!   its sources as `[n]`, then one user message:
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
//! - `finetune` and `base` (closed book): a system message asking for a short answer, then
//!   the question alone as the user message.
//!
//! Sources are numbered from 1 in the order given; a source is whole or absent, never cut
//! ([`fit_sources`]).

use std::collections::BTreeSet;

use ragtune_generate::{ChatMessage, ChatTemplate, Tokenizer};

use crate::retrieve::RetrievedChunk;
use crate::{Error, Result};

/// The version of the prompt format below.
pub const PROMPT_FORMAT_VERSION: u32 = 1;

/// The system message of the retrieval modes.
pub const RAG_SYSTEM_PROMPT: &str = "You are a software license analyst. Answer the question \
in one or two sentences using only the numbered sources, and cite the sources you use as [1], \
[2]. If the sources do not contain the answer, say that they do not.";

/// The system message of the closed-book modes.
pub const CLOSED_BOOK_SYSTEM_PROMPT: &str =
    "You are a software license analyst. Answer the question in one or two sentences.";

/// The text of source `n` (1-based) as it appears in the prompt: `[n] (doc_id) text`.
pub fn source_line(n: usize, chunk: &RetrievedChunk) -> String {
    let text = chunk.text.split_whitespace().collect::<Vec<_>>().join(" ");
    if chunk.chunk == 0 && text.contains(&format!("(license key {})", chunk.doc_id)) {
        // A metadata record already names its document.
        format!("[{n}] {text}")
    } else {
        format!("[{n}] ({}) {text}", chunk.doc_id)
    }
}

/// The messages of a retrieval-mode prompt for `question` over `sources` (in prompt order).
pub fn rag_messages(question: &str, sources: &[RetrievedChunk]) -> Vec<ChatMessage> {
    let mut user = String::from("Sources:\n");
    for (i, s) in sources.iter().enumerate() {
        user.push_str(&source_line(i + 1, s));
        user.push('\n');
    }
    user.push_str("\nQuestion: ");
    user.push_str(question.trim());
    vec![
        ChatMessage::system(RAG_SYSTEM_PROMPT),
        ChatMessage::user(user),
    ]
}

/// The messages of a closed-book prompt for `question`.
pub fn closed_book_messages(question: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage::system(CLOSED_BOOK_SYSTEM_PROMPT),
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
/// [`Error::InvalidRequest`] when the prompt with no source at all exceeds `budget` (the
/// question alone does not fit), naming both numbers.
pub fn fit_sources(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    question: &str,
    candidates: &[RetrievedChunk],
    budget: usize,
) -> Result<(Vec<RetrievedChunk>, Vec<u32>)> {
    let mut kept: Vec<RetrievedChunk> = Vec::new();
    let mut ids = encode(template, tokenizer, &rag_messages(question, &kept))?;
    if ids.len() > budget {
        return Err(Error::InvalidRequest(format!(
            "the question alone takes {} prompt tokens, more than the {budget} tokens left for \
             the prompt (context window minus max new tokens): shorten the question, lower \
             --max-tokens, or raise the context window",
            ids.len()
        )));
    }
    for c in candidates {
        kept.insert(0, c.clone());
        let with = encode(template, tokenizer, &rag_messages(question, &kept))?;
        if with.len() <= budget {
            ids = with;
        } else {
            kept.remove(0);
        }
    }
    Ok((kept, ids))
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
        assert_eq!(citations("[0]", &sources)[0].valid, false);
    }

    #[test]
    fn sources_are_numbered_in_order() {
        let m = rag_messages("  Which?  ", &[chunk("mit"), chunk("isc")]);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[1].content,
            "Sources:\n[1] (mit) text of mit\n[2] (isc) text of isc\n\nQuestion: Which?"
        );
    }
}
