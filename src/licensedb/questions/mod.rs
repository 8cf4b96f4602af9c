//! Question sets: the deterministic LicenseDB questions (category, SPDX id, owner) used by
//! `ragtune bench` and, through the same templates, by the fine-tuning data; and the
//! scoring rule that decides whether an answer is correct.
//!
//! A question set is JSON Lines, one [`Question`] a line: `question`, optional `answer`,
//! `kind` (`category`, `spdx`, `owner`; anything else or nothing is free `text`), `fresh`
//! and `doc_id`.
//!
//! **Generation.** [`questions_for`] makes at most one question of each kind for a license
//! document that has the field (`category`, `spdx_license_key`, `owner`; an owner of
//! `Unspecified` or `Unknown` gives none), with `{name}` the license `name`. The wording is
//! one of a fixed list per kind ([`TEMPLATES`]), picked by the first byte of
//! `sha256("{kind}:{key}")`. [`default_set`] keeps, per kind, the first `n` seen and the first
//! `n` fresh questions in the order of `sha256(key)`, dropping questions whose text is
//! shared by licenses with different answers, and interleaves the six groups so that any
//! prefix is balanced. Everything depends only on the corpus files.
//!
//! **Scoring** ([`is_correct`]): both texts are normalised (lowercase; every character that
//! is not a letter or a digit becomes a space, except in SPDX ids), then:
//! - `spdx`: one of the answer's SPDX-like tokens (runs of letters, digits, `.`, `-`, `+`,
//!   with a trailing `.`/`-` dropped) equals the expected id, ignoring case (SPDX ids are
//!   case-insensitive);
//! - `category`: the answer names the expected category and no other LicenseDB category, as
//!   whole words, the longest category name winning where they overlap (so "Copyleft
//!   Limited" is not also "Copyleft");
//! - `owner`: the answer contains, as whole words, the owner, or one of its parts split at
//!   ` - ` and parentheses ("FSF" or "Free Software Foundation" for "Free Software Foundation
//!   (FSF)"), or the first significant word of the owner: its first word of at least three
//!   letters that is not a generic word such as "software", "foundation", "university",
//!   "corporation" ([`GENERIC_OWNER_WORDS`]), e.g. "Oracle" for "Oracle Corporation";
//! - `text` (any other kind): the answer contains the expected answer as whole words.
//!
//! [`Question::score`] applies these to an answer from which, for `owner` questions made
//! from a template, the license name has been removed first ("Sencha Software License is
//! owned by a company" does not name Sencha as the owner).

mod scoring;

pub use self::scoring::{is_correct, without_name, CATEGORIES, GENERIC_OWNER_WORDS};
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::fresh::is_fresh;
use super::NO_OWNER;
use crate::corpus::{read_corpus, Document};
use crate::{Error, Result};

/// What a question asks.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The license category (`Permissive`, `Copyleft Limited`, ...).
    Category,
    /// The SPDX license identifier.
    Spdx,
    /// The owner or publisher of the license.
    Owner,
    /// Anything else: scored by whole-word containment of the expected answer.
    #[default]
    #[serde(other)]
    Text,
}

impl Kind {
    /// The generated kinds, in the order reports list them.
    pub const GENERATED: [Kind; 3] = [Kind::Category, Kind::Spdx, Kind::Owner];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Category => "category",
            Kind::Spdx => "spdx",
            Kind::Owner => "owner",
            Kind::Text => "text",
        }
    }

    /// The front matter field that holds the answer (`None` for [`Kind::Text`]).
    pub fn field(self) -> Option<&'static str> {
        match self {
            Kind::Category => Some("category"),
            Kind::Spdx => Some("spdx_license_key"),
            Kind::Owner => Some("owner"),
            Kind::Text => None,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One question of a set (one line of the JSON Lines file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    /// The question text.
    pub question: String,
    /// The expected answer; without one the question is timed but not scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// What it asks (decides the scoring rule).
    #[serde(default)]
    pub kind: Kind,
    /// Whether the license is fresh (never in fine-tuning data); `None`: unknown, then
    /// taken from `doc_id` when there is one ([`Question::is_fresh`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fresh: Option<bool>,
    /// The document the answer comes from (the license key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_id: Option<String>,
}

impl Question {
    /// `fresh`, else [`is_fresh`] of `doc_id`, else `None`.
    pub fn is_fresh(&self) -> Option<bool> {
        self.fresh.or_else(|| self.doc_id.as_deref().map(is_fresh))
    }

    /// Whether `answer` is correct ([`is_correct`]); `None` when the question has no answer.
    /// For an `owner` question made from a template, the license name is first removed from
    /// the answer ([`without_name`]): many names contain their owner, and repeating the name
    /// does not say who owns it.
    pub fn score(&self, answer: &str) -> Option<bool> {
        let expected = self.answer.as_deref()?;
        Some(match license_name(self.kind, &self.question) {
            Some(name) if self.kind == Kind::Owner => {
                is_correct(self.kind, expected, &without_name(answer, name))
            }
            _ => is_correct(self.kind, expected, answer),
        })
    }
}

/// The wordings of each generated kind; `{name}` is the license name. Issue 5 (fine-tuning
/// data) reuses them.
pub const TEMPLATES: [(Kind, &[&str]); 3] = [
    (
        Kind::Category,
        &[
            "What is the license category of {name}?",
            "Which license category does {name} belong to?",
            "What category of license is {name}?",
        ],
    ),
    (
        Kind::Spdx,
        &[
            "What is the SPDX identifier of {name}?",
            "What is the SPDX license key for {name}?",
            "Which SPDX license identifier does {name} have?",
        ],
    ),
    (
        Kind::Owner,
        &[
            "Who owns {name}?",
            "Who is the owner of {name}?",
            "Who publishes {name}?",
        ],
    ),
];

/// The wordings of `kind` (empty for [`Kind::Text`]).
pub fn templates(kind: Kind) -> &'static [&'static str] {
    TEMPLATES
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, t)| *t)
        .unwrap_or(&[])
}

/// The `{name}` of `question` when it is one of the [`TEMPLATES`] of `kind`.
pub fn license_name(kind: Kind, question: &str) -> Option<&str> {
    templates(kind).iter().find_map(|t| {
        let (pre, post) = t.split_once("{name}")?;
        question.strip_prefix(pre)?.strip_suffix(post)
    })
}

/// The questions of one license document: one per kind whose field it has, in the order
/// category, spdx, owner. The document's `key` field (else its `doc_id`) is the license key
/// of the fresh split; `name` (else `short_name`) fills `{name}`. None without a name.
pub fn questions_for(doc: &Document) -> Vec<Question> {
    let m = &doc.metadata;
    let key = m.get("key").unwrap_or(&doc.doc_id);
    let Some(name) = m.get("name").or_else(|| m.get("short_name")) else {
        return Vec::new();
    };
    let fresh = is_fresh(key);
    let mut out = Vec::new();
    for kind in Kind::GENERATED {
        let Some(answer) = kind.field().and_then(|f| m.get(f)) else {
            continue;
        };
        let answer = answer.trim();
        if answer.is_empty()
            || (kind == Kind::Owner && NO_OWNER.contains(&answer.to_lowercase().as_str()))
        {
            continue;
        }
        let wordings = templates(kind);
        let pick = sha256(&format!("{kind}:{key}"))[0] as usize % wordings.len();
        out.push(Question {
            question: wordings[pick].replace("{name}", name.trim()),
            answer: Some(answer.to_string()),
            kind,
            fresh: Some(fresh),
            doc_id: Some(key.clone()),
        });
    }
    out
}

/// The default benchmark set from `documents`: per kind, the first `per_kind` seen and the
/// first `per_kind` fresh questions in the order of `sha256(key)`. The result takes the
/// first of each (kind, seen/fresh) group in the order category seen, category fresh, spdx
/// seen, ..., owner fresh, then the second of each, and so on, so that any prefix of the set
/// mixes kinds and seen/fresh. Questions whose text is shared by licenses with different
/// answers are dropped (they cannot be scored).
pub fn default_set(documents: &[Document], per_kind: usize) -> Vec<Question> {
    let all: Vec<Question> = documents.iter().flat_map(questions_for).collect();
    let mut answers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for q in &all {
        answers
            .entry(q.question.as_str())
            .or_default()
            .push(q.answer.as_deref().unwrap_or(""));
    }
    let ambiguous = |q: &Question| {
        let a = &answers[q.question.as_str()];
        a.iter().any(|x| *x != a[0])
    };
    let mut keyed: Vec<([u8; 32], &Question)> = all
        .iter()
        .filter(|q| !ambiguous(q))
        .map(|q| (sha256(q.doc_id.as_deref().unwrap_or("")), q))
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.kind.cmp(&b.1.kind)));
    let groups: Vec<Vec<&Question>> = Kind::GENERATED
        .iter()
        .flat_map(|&kind| [(kind, false), (kind, true)])
        .map(|(kind, fresh)| {
            keyed
                .iter()
                .filter(|(_, q)| q.kind == kind && q.fresh == Some(fresh))
                .take(per_kind)
                .map(|(_, q)| *q)
                .collect()
        })
        .collect();
    let mut out = Vec::new();
    for rank in 0..per_kind {
        for group in &groups {
            if let Some(q) = group.get(rank) {
                out.push((*q).clone());
            }
        }
    }
    out
}

/// [`default_set`] of the license documents in `licenses_dir` (deprecated ones skipped).
///
/// # Errors
/// As [`read_corpus`].
pub fn default_set_from(licenses_dir: &Path, per_kind: usize) -> Result<Vec<Question>> {
    let corpus = read_corpus(licenses_dir, &super::corpus_options())?;
    Ok(default_set(&corpus.documents, per_kind))
}

/// The set as JSON Lines (one object a line, `\n` after each).
pub fn to_jsonl(questions: &[Question]) -> String {
    let mut out = String::new();
    for q in questions {
        // A struct of strings, bools and a unit enum always serializes.
        out.push_str(&serde_json::to_string(q).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// Parses a JSON Lines question set (blank lines skipped). `source` names it in errors.
///
/// # Errors
/// [`Error::MalformedLine`] naming the line of a malformed object or an empty question.
pub fn parse_jsonl(text: &str, source: &str) -> Result<Vec<Question>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: Question = serde_json::from_str(line).map_err(|e| {
            Error::MalformedLine {
                source_name: source.to_string(),
                line: i + 1,
                reason: format!(
                    "{e} (expected {{\"question\": ..., \"answer\": ..., \"kind\": ..., \"fresh\": ...}})"
                ),
            }
        })?;
        if q.question.trim().is_empty() {
            return Err(Error::MalformedLine {
                source_name: source.to_string(),
                line: i + 1,
                reason: "the question is empty".into(),
            });
        }
        out.push(q);
    }
    Ok(out)
}

fn sha256(s: &str) -> [u8; 32] {
    sha2::Sha256::digest(s.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(key: &str, fields: &[(&str, &str)]) -> Document {
        crate::licensedb::test_doc(key, fields, "")
    }

    #[test]
    fn spdx_ids_match_as_whole_tokens_ignoring_case() {
        let yes = [
            ("Apache-2.0", "The SPDX identifier is Apache-2.0."),
            ("Apache-2.0", "apache-2.0"),
            ("GPL-2.0-or-later", "It is `GPL-2.0-or-later`"),
            ("MIT", "SPDX: MIT"),
            (
                "LicenseRef-scancode-adi-bsd",
                "licenseref-scancode-adi-bsd is its identifier",
            ),
            ("GPL-2.0+", "GPL-2.0+ (deprecated form)"),
        ];
        for (want, answer) in yes {
            assert!(is_correct(Kind::Spdx, want, answer), "{want} in {answer:?}");
        }
        let no = [
            ("Apache-2.0", "Apache 2.0"),
            ("Apache-2.0", "Apache-2.0-with-exception"),
            ("MIT", "MIT-0"),
            ("GPL-2.0", "GPL-2.0-only"),
            ("BSD-3-Clause", "BSD-2-Clause"),
            ("Zlib", ""),
        ];
        for (want, answer) in no {
            assert!(
                !is_correct(Kind::Spdx, want, answer),
                "{want} in {answer:?}"
            );
        }
    }

    #[test]
    fn categories_match_whole_words_and_the_longest_name_wins() {
        let yes = [
            ("Permissive", "It is a permissive license."),
            ("Copyleft Limited", "copyleft limited"),
            ("Copyleft Limited", "The category is Copyleft-Limited."),
            ("Copyleft", "This is a strong Copyleft license"),
            ("Public Domain", "Public domain dedication"),
            ("Source-available", "source available"),
            ("Proprietary Free", "Proprietary Free"),
        ];
        for (want, answer) in yes {
            assert!(
                is_correct(Kind::Category, want, answer),
                "{want} in {answer:?}"
            );
        }
        let no = [
            ("Copyleft", "It is Copyleft Limited."),
            ("Copyleft Limited", "Copyleft"),
            ("Permissive", "It is either Permissive or Copyleft."),
            ("Permissive", "Nonpermissive"),
            ("Proprietary Free", "proprietary"),
            ("Public Domain", "Permissive"),
        ];
        for (want, answer) in no {
            assert!(
                !is_correct(Kind::Category, want, answer),
                "{want} in {answer:?}"
            );
        }
    }

    #[test]
    fn owners_match_the_whole_a_part_or_the_first_significant_word() {
        let yes = [
            (
                "Apache Software Foundation",
                "The Apache Software Foundation.",
            ),
            ("Apache Software Foundation", "Apache"),
            (
                "Free Software Foundation (FSF)",
                "the Free Software Foundation",
            ),
            ("Free Software Foundation (FSF)", "FSF"),
            ("Oracle Corporation", "Oracle"),
            ("Oracle (Sun)", "Sun Microsystems"),
            (
                "W3C - World Wide Web Consortium",
                "the World Wide Web Consortium",
            ),
            ("Microsoft", "microsoft corp."),
            ("Analog Devices", "Analog Devices, Inc."),
            ("HP - Hewlett Packard", "Hewlett-Packard"),
        ];
        for (want, answer) in yes {
            assert!(
                is_correct(Kind::Owner, want, answer),
                "{want} in {answer:?}"
            );
        }
        let no = [
            (
                "Free Software Foundation (FSF)",
                "Apache Software Foundation",
            ),
            ("Free Software Foundation (FSF)", "free software"),
            ("Apache Software Foundation", "The Software Foundation"),
            ("Oracle Corporation", "Microsoft Corporation"),
            ("Microsoft", "Microsoftish"),
            (
                "Regents of the University of California",
                "University of California",
            ),
            ("Google", ""),
        ];
        for (want, answer) in no {
            assert!(
                !is_correct(Kind::Owner, want, answer),
                "{want} in {answer:?}"
            );
        }
    }

    #[test]
    fn owner_scoring_ignores_the_license_name_repeated_in_the_answer() {
        let q = |name: &str, owner: &str| Question {
            question: format!("Who owns {name}?"),
            answer: Some(owner.into()),
            kind: Kind::Owner,
            fresh: None,
            doc_id: None,
        };
        let sencha = q("Sencha Software License Agreement v3.9", "Sencha");
        assert_eq!(
            license_name(Kind::Owner, &sencha.question),
            Some("Sencha Software License Agreement v3.9")
        );
        // Real base-mode answers of the default set.
        assert_eq!(
            sencha.score(
                "Sencha Software License Agreement v3.9 is owned by the company, which is a \
                 subsidiary of the Japanese company"
            ),
            Some(false)
        );
        assert_eq!(sencha.score("It is published by Sencha, Inc."), Some(true));
        let eclipse = q(
            "Eclipse Foundation Specification License - v1.0",
            "Eclipse Foundation",
        );
        assert_eq!(
            eclipse.score(
                "The Eclipse Foundation Specification License - v1.0 is owned by the Eclipse \
                 Foundation, which is a non-profit"
            ),
            Some(true)
        );
        // Not from a template: scored on the whole answer.
        let free = Question {
            question: "Whose is the Sencha license?".into(),
            ..sencha.clone()
        };
        assert_eq!(free.score("Sencha Software License"), Some(true));
        assert_eq!(license_name(Kind::Spdx, &sencha.question), None);
    }

    #[test]
    fn text_answers_are_whole_word_containment() {
        assert!(is_correct(
            Kind::Text,
            "patent grant",
            "It has a Patent-Grant."
        ));
        assert!(!is_correct(Kind::Text, "patent", "patents"));
        assert!(!is_correct(Kind::Text, "", "anything"));
    }

    #[test]
    fn questions_for_a_license_use_its_fields_and_a_stable_wording() {
        let d = doc(
            "apache-2.0",
            &[
                ("name", "Apache License 2.0"),
                ("category", "Permissive"),
                ("owner", "Apache Software Foundation"),
                ("spdx_license_key", "Apache-2.0"),
            ],
        );
        let qs = questions_for(&d);
        assert_eq!(qs.len(), 3);
        assert_eq!(
            qs.iter().map(|q| q.kind).collect::<Vec<_>>(),
            Kind::GENERATED
        );
        for q in &qs {
            assert!(q.question.contains("Apache License 2.0"), "{}", q.question);
            assert!(templates(q.kind)
                .iter()
                .any(|t| t.replace("{name}", "Apache License 2.0") == q.question));
            assert_eq!(q.fresh, Some(false));
            assert_eq!(q.doc_id.as_deref(), Some("apache-2.0"));
        }
        assert_eq!(qs[1].answer.as_deref(), Some("Apache-2.0"));
        assert_eq!(questions_for(&d), qs, "deterministic");

        let fresh = doc(
            "adi-bsd",
            &[("name", "ADI BSD License"), ("owner", "Unspecified")],
        );
        assert!(questions_for(&fresh).is_empty(), "no field, no question");
        let fresh = doc(
            "adi-bsd",
            &[("name", "ADI BSD"), ("category", "Permissive")],
        );
        assert_eq!(questions_for(&fresh)[0].fresh, Some(true));
        assert!(questions_for(&doc("x", &[("category", "Permissive")])).is_empty());
    }

    #[test]
    fn the_default_set_samples_seen_and_fresh_per_kind_and_drops_ambiguous_names() {
        let mut docs = Vec::new();
        for i in 0..200 {
            docs.push(doc(
                &format!("lic-{i}"),
                &[
                    ("name", &format!("License {i}")),
                    ("category", "Permissive"),
                    ("spdx_license_key", &format!("LicenseRef-{i}")),
                ],
            ));
        }
        // Two licenses with one name and different categories: no category question.
        docs.push(doc("dup-a", &[("name", "Dup"), ("category", "Permissive")]));
        docs.push(doc("dup-b", &[("name", "Dup"), ("category", "Copyleft")]));
        let set = default_set(&docs, 5);
        assert_eq!(set.len(), 20, "5 seen + 5 fresh for category and spdx");
        for q in &set {
            assert_eq!(q.fresh, Some(is_fresh(q.doc_id.as_deref().unwrap_or(""))));
            assert!(!q.question.contains("Dup"));
        }
        assert_eq!(set.iter().filter(|q| q.fresh == Some(true)).count(), 10);
        assert_eq!(default_set(&docs, 5), set);
        let text = to_jsonl(&set);
        assert_eq!(parse_jsonl(&text, "x").expect("parse"), set);
    }

    #[test]
    fn parsing_takes_optional_fields_and_names_bad_lines() {
        let qs = parse_jsonl(
            "{\"question\": \"q1\"}\n\n{\"question\": \"q2\", \"answer\": \"a\", \"kind\": \"summary\", \"doc_id\": \"adi-bsd\"}\n",
            "f.jsonl",
        )
        .expect("parse");
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[0].kind, Kind::Text);
        assert_eq!(qs[0].is_fresh(), None);
        assert_eq!(qs[0].score("x"), None);
        assert_eq!(qs[1].kind, Kind::Text);
        assert_eq!(qs[1].is_fresh(), Some(true));
        assert_eq!(qs[1].score("a b"), Some(true));
        let err = parse_jsonl("{\"question\": \"q\"}\n{\"answer\": 1}\n", "f.jsonl")
            .expect_err("an error");
        assert!(err.to_string().contains("f.jsonl line 2"), "{err}");
        let err = parse_jsonl("{\"question\": \" \"}\n", "f.jsonl").expect_err("an error");
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
