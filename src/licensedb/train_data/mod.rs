//! The deterministic LicenseDB fine-tuning data: chat-format examples for the LoRA trainer,
//! written as JSON Lines (`train.jsonl`, `dev.jsonl`) with a `stats.json`.
//!
//! Each line is one [`Example`]:
//! `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}], "kind": "...",
//! "license": "<key>", "blocks": [[start, end], ...]}`. A trainer reads `messages`, and
//! `blocks` (retrieval examples only: each source line's byte range in the user message) when
//! it trains for block attention (prompt format v2); `kind` (`closed/spdx`, `oracle/owner`,
//! `absent/category`, ...) and `license` are for counting and auditing.
//!
//! **What is generated**, per seen license (never a fresh one, see below), from its front
//! matter fields ([`Fact`]): its category, SPDX id, owner (not `Unspecified`/`Unknown`), full
//! name from its short name and short name from its full name (when the two differ), and how
//! its text begins ([`key_passage`]).
//! - *Closed book* ([`Style::ClosedBook`]): the prompt of the `finetune`/`base` modes
//!   ([`prompt::closed_book_messages`]) and a one-sentence answer that states the fact with
//!   the license name ("The SPDX license identifier of MIT License is MIT."). Each fact is
//!   asked in `closed_per_fact` of the four wordings of its kind ([`WORDINGS`]); no wording is
//!   one of the benchmark's held-out [`crate::licensedb::questions::TEMPLATES`].
//! - *Retrieval-augmented* (RAFT): the prompt of the `rag`/`hybrid` modes
//!   ([`prompt::rag_messages`]) with [`DataOptions::sources`] sources. The question (any fact
//!   but the passage) is searched with the real retriever ([`DataOptions::candidates`] hits);
//!   chunks of the license itself, of fresh licenses, and chunks that mention a fresh license
//!   are dropped, and at most [`DataOptions::max_chunks_per_doc`] chunks of a document are
//!   kept. In [`Style::Oracle`] examples (about 80%) the sources are the license's metadata
//!   record (chunk 0, from the index) at a random position among the best other hits, listed
//!   best last as the engine lists them, and the answer cites it: "... is MIT \[3\]." In
//!   [`Style::Absent`] examples (about 20%) all sources are other hits that do not name the
//!   license, and the answer says that the sources do not give the fact.
//!
//! **Fresh licenses** (DESIGN.md, "the fresh split"; [`is_fresh`] of the `key` field, else the
//! file stem) are never the subject, a source, or a word of an answer: every example that
//! mentions a fresh license's key, name or short name as whole words (case and punctuation
//! ignored, [`FreshGuard`]) is dropped, which also drops the few seen licenses whose own name
//! contains a fresh one ("zlib" in "D zlib License").
//!
//! **Ambiguous facts** (one question subject, e.g. one license name, with different answers
//! among the seen licenses) are skipped: they would teach contradictions.
//!
//! **Splits**: a license whose `sha256("dev:" + key)` starts with a byte below
//! [`DEV_BYTE_BELOW`] (about 5%) has all its examples in `dev.jsonl`, every other one in
//! `train.jsonl`. (Not `sha256(key)` itself: the benchmark takes its seen questions from the
//! first licenses in that order.)
//!
//! **Determinism**: every choice (wordings, facts, oracle or absent, the position of the right
//! source, the order of the lines) is a hash of the seed and the license key; the retriever
//! is deterministic. The same corpus, index and options give byte-identical files.
//! `--max-licenses N` takes the first N seen licenses in the benchmark's order (by
//! `sha256(key)`), so a small dataset covers the benchmark's seen licenses first.

mod examples;
mod facts;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use ragtune_generate::ChatMessage;
use serde::Serialize;
use sha2::Digest;

use self::examples::Generator;
use self::facts::unambiguous_facts;
pub use self::facts::{key_passage, Fact, WORDINGS};
use super::fresh::{is_fresh, FreshGuard};
use super::license_key;
use crate::corpus::{read_corpus, Document};
use crate::engine::{prompt, EngineConfig};
use crate::progress::Progress;
use crate::retrieve::{RetrievedChunk, Retriever};
use crate::{Error, Result};

/// The version of the generator: a change to what is generated is a new version.
pub const GENERATOR_VERSION: u32 = 3;

/// A license is in the dev split when the first byte of `sha256("dev:" + key)` is below this
/// (13 / 256, about 5%).
pub const DEV_BYTE_BELOW: u8 = 13;

/// Percent of retrieval-augmented examples whose sources do not contain the answer.
pub const ABSENT_PERCENT: u64 = 20;

/// The passage of [`Fact::Passage`] is cut at about this many characters.
pub const PASSAGE_CHARS: usize = 200;

/// How an example is prompted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Style {
    /// The closed-book prompt (`finetune` and `base` modes).
    ClosedBook,
    /// The retrieval prompt with the right metadata record among the sources.
    Oracle,
    /// The retrieval prompt with only other licenses' chunks; the answer says so.
    Absent,
}

impl Style {
    /// The lowercase name used in `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Style::ClosedBook => "closed",
            Style::Oracle => "oracle",
            Style::Absent => "absent",
        }
    }
}

/// What an example is: its style and fact, written `style/fact` (e.g. `oracle/spdx`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExampleKind {
    /// How it is prompted.
    pub style: Style,
    /// What it asks.
    pub fact: Fact,
}

impl std::fmt::Display for ExampleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.style.as_str(), self.fact.as_str())
    }
}

impl Serialize for ExampleKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One training example (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Example {
    /// System, user and assistant messages.
    pub messages: Vec<ChatMessage>,
    /// What it is.
    pub kind: ExampleKind,
    /// The license key the example is about (always a seen license).
    pub license: String,
    /// The sources' lines in a retrieval example, `[start, end)` byte ranges of the user
    /// message's content: the blocks of prompt format v2, which the trainer reads with
    /// block attention on (`ragtune_train::data`). Absent from closed-book examples.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<[usize; 2]>,
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOptions {
    /// Seed of every choice (default 0).
    pub seed: u64,
    /// The first this many seen licenses in `sha256(key)` order; `None`: all.
    pub max_licenses: Option<usize>,
    /// Retrieval-augmented examples per license (default 2).
    pub rag_per_license: usize,
    /// Closed-book wordings per fact, at most 4 (default 2).
    pub closed_per_fact: usize,
    /// Retrieval hits searched per question (default 8).
    pub candidates: usize,
    /// Sources in a retrieval prompt (default 4, the number the shipped adapter was trained
    /// with: more than the engine's default k = 2, so that it learns to pick the right source
    /// among look-alikes).
    pub sources: usize,
    /// At most this many chunks of one document among the sources (default: the engine's, 2).
    pub max_chunks_per_doc: usize,
}

/// Sources per retrieval-augmented training example by default.
pub const TRAIN_SOURCES: usize = 4;

impl Default for DataOptions {
    fn default() -> Self {
        let engine = EngineConfig::default();
        DataOptions {
            seed: 0,
            max_licenses: None,
            rag_per_license: 2,
            closed_per_fact: 2,
            candidates: 8,
            sources: TRAIN_SOURCES,
            max_chunks_per_doc: engine.max_chunks_per_doc,
        }
    }
}

/// Examples per split and what was counted; `stats.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// [`GENERATOR_VERSION`].
    pub generator_version: u32,
    /// The profile whose prompts the examples use (`licensedb`); an adapter trained on them
    /// records it.
    pub profile: String,
    /// [`prompt::PROMPT_FORMAT_VERSION`] of the retrieval and closed-book prompts.
    pub prompt_format_version: u32,
    /// The seed.
    pub seed: u64,
    /// The options, as given.
    pub options: StatsOptions,
    /// License counts.
    pub licenses: LicenseCounts,
    /// Examples per split (`train`, `dev`) and kind, with a `total` per split.
    pub examples: BTreeMap<String, BTreeMap<String, usize>>,
    /// Approximate tokens per split: characters of all message contents / 4.
    pub approx_tokens: BTreeMap<String, usize>,
    /// What was left out, and how often.
    pub skipped: SkippedCounts,
}

/// The options in `stats.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatsOptions {
    /// [`DataOptions::max_licenses`].
    pub max_licenses: Option<usize>,
    /// [`DataOptions::rag_per_license`].
    pub rag_per_license: usize,
    /// [`DataOptions::closed_per_fact`].
    pub closed_per_fact: usize,
    /// [`DataOptions::candidates`].
    pub candidates: usize,
    /// [`DataOptions::sources`].
    pub sources: usize,
    /// [`DataOptions::max_chunks_per_doc`].
    pub max_chunks_per_doc: usize,
}

/// License counts in `stats.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LicenseCounts {
    /// Documents read from the corpus.
    pub corpus: usize,
    /// Fresh licenses (never used).
    pub fresh: usize,
    /// Seen licenses with a name (the candidates).
    pub seen: usize,
    /// Seen licenses selected (after `max_licenses`).
    pub selected: usize,
    /// Selected licenses with at least one example in `train.jsonl`.
    pub train: usize,
    /// Selected licenses with at least one example in `dev.jsonl`.
    pub dev: usize,
}

/// What was left out, in `stats.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SkippedCounts {
    /// Facts whose question subject has different answers among the seen licenses.
    pub ambiguous_facts: usize,
    /// Examples dropped because they mention a fresh license.
    pub fresh_mentions: usize,
    /// Retrieval hits passed over because they are chunks of a fresh license.
    pub fresh_hits: usize,
    /// Retrieval hits passed over because they mention a fresh license.
    pub fresh_mention_hits: usize,
    /// Retrieval-augmented examples dropped because the index has no metadata record of
    /// the license.
    pub no_metadata_record: usize,
    /// Retrieval-augmented examples dropped because retrieval gave too few usable chunks.
    pub too_few_sources: usize,
}

/// The generated examples, in file order, and the statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `train.jsonl`.
    pub train: Vec<Example>,
    /// `dev.jsonl`.
    pub dev: Vec<Example>,
    /// `stats.json`.
    pub stats: Stats,
}

/// Whether `key` is in the dev split (see the module docs).
pub fn is_dev(key: &str) -> bool {
    sha2::Sha256::digest(format!("dev:{key}").as_bytes())[0] < DEV_BYTE_BELOW
}

/// A hash of the seed and `parts`: the source of every choice.
pub(crate) fn pick(seed: u64, parts: &[&str]) -> u64 {
    let mut h = sha2::Sha256::new();
    h.update(seed.to_le_bytes());
    for p in parts {
        h.update([0x1f]);
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Generates the dataset from the license `documents` (fresh ones included: they are
/// recognised and left out) and the retriever over their index.
///
/// # Errors
/// [`Error::InvalidParameter`] for options that select nothing (`max_licenses` 0,
/// `closed_per_fact` and `rag_per_license` both 0, `closed_per_fact` above 4, `sources` 0)
/// or a corpus with no seen license that has a name; embedding and index errors.
pub fn generate(
    documents: &[Document],
    retriever: &Retriever,
    options: &DataOptions,
    progress: &Progress,
) -> Result<Dataset> {
    let max_wordings = WORDINGS.iter().map(|(_, w)| w.len()).min().unwrap_or(0);
    if options.closed_per_fact > max_wordings {
        return Err(Error::InvalidParameter {
            name: "closed_per_fact",
            value: options.closed_per_fact.to_string(),
            expected: format!("at most {max_wordings}: each fact has {max_wordings} wordings"),
        });
    }
    if options.closed_per_fact == 0 && options.rag_per_license == 0 {
        return Err(Error::InvalidParameter {
            name: "rag_per_license",
            value: "0".into(),
            expected: "at least 1 when closed_per_fact is 0: there is no example to make".into(),
        });
    }
    if options.rag_per_license > 0 && (options.sources == 0 || options.candidates == 0) {
        return Err(Error::InvalidParameter {
            name: if options.sources == 0 {
                "sources"
            } else {
                "candidates"
            },
            value: "0".into(),
            expected: "at least 1 for retrieval-augmented examples".into(),
        });
    }
    let guard = FreshGuard::new(documents);
    let mut seen: Vec<&Document> = documents
        .iter()
        .filter(|d| !is_fresh(license_key(d)))
        .filter(|d| d.metadata.contains_key("name") || d.metadata.contains_key("short_name"))
        .collect();
    seen.sort_by_cached_key(|d| {
        (
            <[u8; 32]>::from(sha2::Sha256::digest(license_key(d).as_bytes())),
            license_key(d).to_string(),
        )
    });
    seen.dedup_by(|a, b| license_key(a) == license_key(b));
    let selected: Vec<&Document> = seen
        .iter()
        .copied()
        .take(options.max_licenses.unwrap_or(usize::MAX))
        .collect();
    if selected.is_empty() {
        return Err(Error::InvalidParameter {
            name: "max_licenses",
            value: format!("{:?}", options.max_licenses),
            expected: format!(
                "a selection of at least one license: the corpus has {} documents, {} seen \
                 licenses with a name",
                documents.len(),
                seen.len()
            ),
        });
    }
    let (licenses, ambiguous) = unambiguous_facts(&seen, &selected);
    let (patterned, other) = licenses
        .iter()
        .flat_map(|(doc, facts)| facts.iter().map(move |f| (license_key(doc), f)))
        .filter(|(_, f)| f.fact == Fact::Spdx)
        .fold(
            (0u64, 0u64),
            |(p, o), (key, f)| match facts::follows_key_pattern(key, &f.value) {
                true => (p + 1, o),
                false => (p, o + 1),
            },
        );

    let mut gen = Generator {
        retriever,
        options,
        profile: super::profile(),
        guard: &guard,
        mention_cache: HashMap::new(),
        metadata_records: metadata_records(retriever, &selected)?,
        skipped: SkippedCounts {
            ambiguous_facts: ambiguous,
            ..Default::default()
        },
        pattern_spdx_percent: match patterned {
            0 => 100,
            p => (other * 100 / p).min(100),
        },
    };
    let rag_total = licenses
        .iter()
        .filter(|(_, f)| f.iter().any(|f| f.fact.retrievable()))
        .count()
        * options.rag_per_license;
    let bar = progress.bar(rag_total as u64, "retrieving sources");
    let mut per_license: Vec<(String, Vec<Example>)> = Vec::new();
    for (doc, facts) in &licenses {
        let key = license_key(doc).to_string();
        let mut examples = gen.closed_book(&key, facts);
        examples.extend(gen.retrieval(&key, &doc.doc_id, facts, &bar)?);
        let before = examples.len();
        examples.retain(|e| {
            !e.messages
                .iter()
                .any(|m| guard.mention(&m.content).is_some())
        });
        gen.skipped.fresh_mentions += before - examples.len();
        per_license.push((key, examples));
    }
    bar.finish_and_clear();

    let mut train = Vec::new();
    let mut dev = Vec::new();
    let (mut train_licenses, mut dev_licenses) = (0, 0);
    for (key, examples) in per_license {
        if examples.is_empty() {
            continue;
        }
        let split = if is_dev(&key) {
            dev_licenses += 1;
            &mut dev
        } else {
            train_licenses += 1;
            &mut train
        };
        for (n, e) in examples.into_iter().enumerate() {
            split.push((pick(options.seed, &["order", &key, &n.to_string()]), e));
        }
    }
    let order = |mut v: Vec<(u64, Example)>| {
        v.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.license.cmp(&b.1.license)));
        v.into_iter().map(|(_, e)| e).collect::<Vec<_>>()
    };
    let (train, dev) = (order(train), order(dev));

    let mut examples = BTreeMap::new();
    let mut approx_tokens = BTreeMap::new();
    for (name, split) in [("train", &train), ("dev", &dev)] {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for e in split {
            *counts.entry(e.kind.to_string()).or_default() += 1;
        }
        counts.insert("total".into(), split.len());
        examples.insert(name.to_string(), counts);
        let chars: usize = split
            .iter()
            .flat_map(|e| &e.messages)
            .map(|m| m.content.chars().count())
            .sum();
        approx_tokens.insert(name.to_string(), chars / 4);
    }
    let stats = Stats {
        generator_version: GENERATOR_VERSION,
        profile: super::profile().name,
        prompt_format_version: prompt::PROMPT_FORMAT_VERSION,
        seed: options.seed,
        options: StatsOptions {
            max_licenses: options.max_licenses,
            rag_per_license: options.rag_per_license,
            closed_per_fact: options.closed_per_fact,
            candidates: options.candidates,
            sources: options.sources,
            max_chunks_per_doc: options.max_chunks_per_doc,
        },
        licenses: LicenseCounts {
            corpus: documents.len(),
            fresh: documents
                .iter()
                .filter(|d| is_fresh(license_key(d)))
                .count(),
            seen: seen.len(),
            selected: selected.len(),
            train: train_licenses,
            dev: dev_licenses,
        },
        examples,
        approx_tokens,
        skipped: gen.skipped,
    };
    Ok(Dataset { train, dev, stats })
}

/// The metadata record (chunk 0) of each selected license that the index holds, by doc id.
fn metadata_records(
    retriever: &Retriever,
    selected: &[&Document],
) -> Result<HashMap<String, RetrievedChunk>> {
    let wanted: BTreeSet<&str> = selected.iter().map(|d| d.doc_id.as_str()).collect();
    let index = retriever.index();
    let mut out = HashMap::new();
    for id in index.ids()? {
        let c = index.chunk(id)?;
        if c.chunk == 0 && wanted.contains(c.doc_id.as_str()) {
            out.insert(
                c.doc_id.clone(),
                RetrievedChunk {
                    doc_id: c.doc_id,
                    chunk: 0,
                    score: 0.0,
                    text: c.text,
                    range: (c.start, c.end),
                    metadata: c.metadata,
                },
            );
        }
    }
    Ok(out)
}

/// JSON Lines of `examples` (one object a line, `\n` after each).
///
/// # Errors
/// [`Error::Serialize`] if an example cannot be serialized (it always can).
pub fn to_jsonl(examples: &[Example]) -> Result<String> {
    let mut out = String::new();
    for e in examples {
        let line = serde_json::to_string(e).map_err(|source| Error::Serialize {
            what: "a training example",
            source,
        })?;
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

/// Writes `train.jsonl`, `dev.jsonl` and `stats.json` into `out_dir` (created if missing),
/// each atomically (a temporary file in `out_dir`, fsync, rename).
///
/// # Errors
/// [`Error::Io`] naming the file or folder.
pub fn write_dataset(dataset: &Dataset, out_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(out_dir).map_err(|source| Error::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    crate::util::write_atomic(
        &out_dir.join("train.jsonl"),
        to_jsonl(&dataset.train)?.as_bytes(),
    )?;
    crate::util::write_atomic(
        &out_dir.join("dev.jsonl"),
        to_jsonl(&dataset.dev)?.as_bytes(),
    )?;
    let stats =
        serde_json::to_string_pretty(&dataset.stats).map_err(|source| Error::Serialize {
            what: "the statistics",
            source,
        })?;
    crate::util::write_atomic(&out_dir.join("stats.json"), format!("{stats}\n").as_bytes())
}

/// Reads the license documents in `licenses_dir`, opens the index at `index_dir` with the
/// encoder in `encoder_dir`, and [`generate`]s.
///
/// # Errors
/// [`Error::Missing`] saying what to run when the corpus folder (`ragtune fetch`) or the
/// index (`ragtune ingest`) is missing; as [`read_corpus`], [`Retriever::open`] and
/// [`generate`].
pub fn generate_from(
    licenses_dir: &Path,
    encoder_dir: &Path,
    index_dir: &Path,
    options: &DataOptions,
    progress: &Progress,
) -> Result<Dataset> {
    if !licenses_dir.is_dir() {
        return Err(Error::Missing {
            what: "license corpus",
            path: licenses_dir.to_path_buf(),
            fix: "run `ragtune fetch` (or pass the folder of .LICENSE files)",
        });
    }
    if !index_dir.join("manifest.json").is_file() {
        return Err(Error::Missing {
            what: "index",
            path: index_dir.to_path_buf(),
            fix: "build it with `ragtune ingest` (or pass --index)",
        });
    }
    let corpus = read_corpus(licenses_dir, &super::corpus_options())?;
    let retriever = Retriever::open(encoder_dir, index_dir)?
        .with_profile(Default::default(), &super::profile())?;
    generate(&corpus.documents, &retriever, options, progress)
}

#[cfg(test)]
mod tests {
    use super::facts::{facts_of, sentence};
    use super::*;
    use crate::licensedb::questions::{Kind, TEMPLATES};

    fn doc(key: &str, fields: &[(&str, &str)], body: &str) -> Document {
        crate::licensedb::test_doc(key, fields, body)
    }

    #[test]
    fn no_wording_is_a_benchmark_template() {
        let templates: Vec<String> = TEMPLATES
            .iter()
            .flat_map(|(_, t)| t.iter())
            .map(|t| t.to_lowercase())
            .collect();
        for (fact, wordings) in WORDINGS {
            assert_eq!(wordings.len(), 4, "{fact}");
            for w in wordings {
                assert!(w.contains("{name}"), "{w}");
                assert!(!templates.contains(&w.to_lowercase()), "{w} is a template");
            }
        }
        // And so no question made from them equals a benchmark question of its license.
        let d = doc(
            "mit",
            &[
                ("name", "MIT License"),
                ("short_name", "MIT"),
                ("category", "Permissive"),
                ("owner", "MIT"),
                ("spdx_license_key", "MIT"),
            ],
            "Permission is hereby granted, free of charge, to any person.",
        );
        let bench: Vec<String> = Kind::GENERATED
            .iter()
            .flat_map(|k| crate::licensedb::questions::templates(*k))
            .map(|t| t.replace("{name}", "MIT License"))
            .collect();
        for f in facts_of(&d) {
            for w in f.fact.wordings() {
                let q = w.replace("{name}", &f.subject);
                assert!(!bench.contains(&q), "{q}");
            }
        }
    }

    #[test]
    fn facts_follow_the_fields() {
        let d = doc(
            "apache-2.0",
            &[
                ("name", "Apache License 2.0"),
                ("short_name", "Apache 2.0"),
                ("category", "Permissive"),
                ("owner", "Apache Software Foundation"),
                ("spdx_license_key", "Apache-2.0"),
            ],
            "\n  Apache License\n  Version 2.0, January 2004\n\n TERMS AND CONDITIONS. More.",
        );
        let facts = facts_of(&d);
        let got: Vec<(Fact, &str, &str)> = facts
            .iter()
            .map(|f| (f.fact, f.subject.as_str(), f.value.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (Fact::Category, "Apache License 2.0", "Permissive"),
                (Fact::Spdx, "Apache License 2.0", "Apache-2.0"),
                (
                    Fact::Owner,
                    "Apache License 2.0",
                    "Apache Software Foundation"
                ),
                (Fact::FullName, "Apache 2.0", "Apache License 2.0"),
                (Fact::ShortName, "Apache License 2.0", "Apache 2.0"),
                (
                    Fact::Passage,
                    "Apache License 2.0",
                    "Apache License Version 2.0, January 2004 TERMS AND CONDITIONS."
                ),
            ]
        );
        // Same name and short name: no name facts; an unknown owner: none; no name: nothing.
        let d = doc(
            "x",
            &[("name", "X"), ("short_name", "X"), ("owner", "Unknown")],
            "",
        );
        assert!(facts_of(&d).is_empty());
        assert!(facts_of(&doc(
            "y",
            &[("category", "Permissive")],
            "Some body text here."
        ))
        .is_empty());
    }

    #[test]
    fn passages_cut_at_a_sentence_or_a_word() {
        assert_eq!(
            key_passage(
                "Permission is hereby granted, free of charge.  Next one.",
                200
            )
            .as_deref(),
            Some("Permission is hereby granted, free of charge.")
        );
        let long = "word ".repeat(100);
        let p = key_passage(&long, 30).expect("a passage");
        assert_eq!(p, "word word word word word word...");
        assert_eq!(key_passage("too short", 200), None);
        assert_eq!(key_passage("", 200), None);
        // A first sentence under 20 characters: the head of the text instead.
        assert_eq!(
            key_passage("MIT. Permission is granted to all.", 200).as_deref(),
            Some("MIT. Permission is granted to all.")
        );
        // Non-ASCII text is cut on a character boundary.
        let p = key_passage(&"é".repeat(50).replace("éé", "éé "), 21).expect("passage");
        assert!(p.ends_with("..."), "{p}");
    }

    #[test]
    fn the_fresh_guard_finds_keys_and_names_as_whole_words() {
        let docs = [
            doc(
                "zlib",
                &[("name", "ZLIB License"), ("short_name", "ZLIB License")],
                "",
            ),
            doc("epl-2.0", &[("name", "Eclipse Public License 2.0")], ""),
            doc("mit", &[("name", "MIT License")], ""),
        ];
        assert!(is_fresh("zlib") && is_fresh("epl-2.0") && !is_fresh("mit"));
        let g = FreshGuard::new(&docs);
        assert_eq!(
            g.mention("uses the Zlib compression").as_deref(),
            Some("zlib")
        );
        assert_eq!(g.mention("under EPL 2.0 terms").as_deref(), Some("epl 2 0"));
        assert_eq!(
            g.mention("the eclipse public license 2.0!").as_deref(),
            Some("eclipse public license 2 0")
        );
        assert_eq!(g.mention("EPL-2.01 is not it"), None);
        assert_eq!(g.mention("zlibrary and the MIT License"), None);
        assert_eq!(g.mention(""), None);
    }

    #[test]
    fn the_dev_split_is_about_five_percent_and_not_the_fresh_split() {
        let keys: Vec<String> = (0..4000).map(|i| format!("license-{i}")).collect();
        let dev = keys.iter().filter(|k| is_dev(k)).count();
        assert!((150..260).contains(&dev), "{dev} of 4000");
        // Computed with `printf dev:cddl-1.0 | sha256sum` (starts with 07) and
        // `printf dev:mit | sha256sum`.
        assert!(is_dev("cddl-1.0"));
        assert!(!is_dev("mit"));
    }

    #[test]
    fn ambiguous_facts_are_dropped() {
        let a = doc(
            "a",
            &[
                ("name", "Same"),
                ("category", "Permissive"),
                ("spdx_license_key", "A"),
            ],
            "",
        );
        let b = doc(
            "b",
            &[
                ("name", "Same"),
                ("category", "Permissive"),
                ("spdx_license_key", "B"),
            ],
            "",
        );
        let (facts, removed) = unambiguous_facts(&[&a, &b], &[&a]);
        assert_eq!(removed, 1);
        let kinds: Vec<Fact> = facts[0].1.iter().map(|f| f.fact).collect();
        assert_eq!(kinds, [Fact::Category]);
    }

    #[test]
    fn picks_depend_on_the_seed_and_every_part() {
        assert_eq!(pick(0, &["a", "b"]), pick(0, &["a", "b"]));
        assert_ne!(pick(0, &["a", "b"]), pick(1, &["a", "b"]));
        assert_ne!(pick(0, &["ab"]), pick(0, &["a", "b"]));
    }

    #[test]
    fn answers_are_one_sentence_with_the_name() {
        assert_eq!(
            sentence(Fact::Spdx.statement("MIT License", "MIT")),
            "The SPDX license identifier of MIT License is MIT."
        );
        assert_eq!(
            sentence(Fact::Owner.statement("X", "Foo Inc.")),
            "The owner of X is Foo Inc."
        );
        assert_eq!(
            Fact::Category.absent("MIT License"),
            "The sources do not give the license category of MIT License."
        );
    }
}
