//! The examples of one license: closed-book wordings of each fact, and retrieval-augmented
//! (RAFT) examples whose sources come from the real retriever.

use std::collections::{BTreeMap, HashMap};

use ragtune_generate::ChatMessage;

use super::facts::{collapse, follows_key_pattern, sentence, Fact, FactOf};
use super::{pick, DataOptions, Example, ExampleKind, SkippedCounts, Style, ABSENT_PERCENT};
use crate::engine::prompt;
use crate::licensedb::contains_words;
use crate::licensedb::fresh::{is_fresh, FreshGuard};
use crate::profile::Profile;
use crate::retrieve::{Query, RetrievedChunk, Retriever};
use crate::Result;

pub(super) struct Generator<'a> {
    pub(super) retriever: &'a Retriever,
    pub(super) options: &'a DataOptions,
    pub(super) profile: Profile,
    pub(super) guard: &'a FreshGuard,
    /// Whether a chunk (doc id, chunk number) mentions a fresh license.
    pub(super) mention_cache: HashMap<(String, u32), bool>,
    pub(super) metadata_records: HashMap<String, RetrievedChunk>,
    pub(super) skipped: SkippedCounts,
    /// Percent of the licenses whose SPDX id follows `LicenseRef-scancode-<key>` that get a
    /// retrieval example on it (see [`Generator::retrieval`]).
    pub(super) pattern_spdx_percent: u64,
}

impl Generator<'_> {
    /// `closed_per_fact` wordings of each fact, in a seeded order, closed book.
    pub(super) fn closed_book(&self, key: &str, facts: &[FactOf]) -> Vec<Example> {
        let mut out = Vec::new();
        for f in facts {
            let wordings = f.fact.wordings();
            let mut order: Vec<usize> = (0..wordings.len()).collect();
            order.sort_by_key(|&i| {
                pick(
                    self.options.seed,
                    &["closed", key, f.fact.as_str(), &i.to_string()],
                )
            });
            for &i in order.iter().take(self.options.closed_per_fact) {
                let question = wordings[i].replace("{name}", &f.subject);
                let mut messages = prompt::closed_book_messages(&self.profile, &question);
                messages.push(ChatMessage::assistant(sentence(
                    f.fact.statement(&f.subject, &f.value),
                )));
                out.push(Example {
                    messages,
                    kind: ExampleKind {
                        style: Style::ClosedBook,
                        fact: f.fact,
                    },
                    license: key.to_string(),
                    blocks: Vec::new(),
                });
            }
        }
        out
    }

    /// `rag_per_license` retrieval-augmented examples: facts in a seeded order (repeating
    /// when there are fewer facts than examples; the SPDX id first or last, see below), each
    /// oracle or absent.
    pub(super) fn retrieval(
        &mut self,
        key: &str,
        doc_id: &str,
        facts: &[FactOf],
        bar: &indicatif::ProgressBar,
    ) -> Result<Vec<Example>> {
        let seed = self.options.seed;
        let mut facts: Vec<&FactOf> = facts.iter().filter(|f| f.fact.retrievable()).collect();
        if facts.is_empty() {
            return Ok(Vec::new());
        }
        facts.sort_by_key(|f| pick(seed, &["rag-fact", key, f.fact.as_str()]));
        // Balance the SPDX examples: every license whose id is not the LicenseDB pattern is
        // asked it first, and about as many of those whose id follows the pattern
        // (`pattern_spdx_percent`); the others ask it last. The adapter then sees as many
        // ids to copy that break the pattern as ids that follow it.
        if let Some(i) = facts.iter().position(|f| f.fact == Fact::Spdx) {
            let spdx = facts.remove(i);
            let ask = !follows_key_pattern(key, &spdx.value)
                || pick(seed, &["spdx-pattern", key]) % 100 < self.pattern_spdx_percent;
            match ask {
                true => facts.insert(0, spdx),
                false => facts.push(spdx),
            }
        }
        let mut out = Vec::new();
        for n in 0..self.options.rag_per_license {
            bar.inc(1);
            let n_str = n.to_string();
            let f = facts[n % facts.len()];
            let wordings = f.fact.wordings();
            let wording =
                wordings[(pick(seed, &["rag-wording", key, &n_str]) as usize) % wordings.len()];
            let question = wording.replace("{name}", &f.subject);
            let absent = pick(seed, &["absent", key, &n_str]) % 100 < ABSENT_PERCENT;
            let right = if absent {
                None
            } else {
                match self.metadata_records.get(doc_id) {
                    Some(c) if collapse(&c.text).contains(&f.value) => Some(c.clone()),
                    _ => {
                        self.skipped.no_metadata_record += 1;
                        continue;
                    }
                }
            };
            let wanted = self.options.sources - usize::from(right.is_some());
            let Some(mut sources) =
                self.distractors(&question, doc_id, absent.then_some(f), wanted)?
            else {
                self.skipped.too_few_sources += 1;
                continue;
            };
            // Best last, as the engine lists them.
            sources.reverse();
            let (style, answer) = match right {
                Some(c) => {
                    let at = (pick(seed, &["position", key, &n_str]) % (sources.len() as u64 + 1))
                        as usize;
                    sources.insert(at, c);
                    let s = f.fact.statement(&f.subject, &f.value);
                    (Style::Oracle, format!("{s} [{}].", at + 1))
                }
                None => (Style::Absent, f.fact.absent(&f.subject)),
            };
            let (mut messages, blocks) =
                prompt::rag_messages_with_blocks(&self.profile, &question, &sources);
            messages.push(ChatMessage::assistant(answer));
            out.push(Example {
                messages,
                kind: ExampleKind {
                    style,
                    fact: f.fact,
                },
                license: key.to_string(),
                blocks: blocks.into_iter().map(|r| [r.start, r.end]).collect(),
            });
        }
        Ok(out)
    }

    /// `wanted` retrieved chunks of other documents for `question`, best first: not fresh,
    /// not mentioning a fresh license, at most `max_chunks_per_doc` per document, and (for an
    /// absent example, `absent_of`) not naming the license asked about. Searches
    /// `candidates` hits, then four times as many if those are not enough; `None` if still
    /// not enough.
    fn distractors(
        &mut self,
        question: &str,
        doc_id: &str,
        absent_of: Option<&FactOf>,
        wanted: usize,
    ) -> Result<Option<Vec<RetrievedChunk>>> {
        for k in [self.options.candidates, self.options.candidates * 4] {
            let hits = self.retriever.search(&Query::new(question, k))?.hits;
            let mut per_doc: BTreeMap<String, usize> = BTreeMap::new();
            let mut kept = Vec::new();
            for hit in hits {
                if kept.len() == wanted {
                    break;
                }
                let hit_key = hit.metadata.get("key").unwrap_or(&hit.doc_id);
                if hit.doc_id == doc_id {
                    continue;
                }
                if is_fresh(hit_key) {
                    self.skipped.fresh_hits += 1;
                    continue;
                }
                let n = per_doc.entry(hit.doc_id.clone()).or_default();
                if *n >= self.options.max_chunks_per_doc {
                    continue;
                }
                let guard = self.guard;
                let mentions = *self
                    .mention_cache
                    .entry((hit.doc_id.clone(), hit.chunk))
                    .or_insert_with(|| guard.mention(&hit.text).is_some());
                if mentions {
                    self.skipped.fresh_mention_hits += 1;
                    continue;
                }
                if let Some(f) = absent_of {
                    let names_value = matches!(f.fact, Fact::FullName | Fact::ShortName)
                        && contains_words(&hit.text, &f.value);
                    if names_value || contains_words(&hit.text, &f.subject) {
                        continue;
                    }
                }
                *n += 1;
                kept.push(hit);
            }
            if kept.len() == wanted {
                return Ok(Some(kept));
            }
        }
        Ok(None)
    }
}
