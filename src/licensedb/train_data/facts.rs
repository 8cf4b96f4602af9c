//! The facts of a license that examples ask about, their question wordings and answer
//! sentences, and which of them are unambiguous among the seen licenses.

use std::collections::{BTreeSet, HashMap};

use super::PASSAGE_CHARS;
use crate::corpus::Document;
use crate::licensedb::{words, NO_OWNER};

/// One fact of a license that examples ask about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fact {
    /// The LicenseDB `category` (exact string, e.g. `Copyleft Limited`).
    Category,
    /// The `spdx_license_key`.
    Spdx,
    /// The `owner` (not `Unspecified`/`Unknown`).
    Owner,
    /// The full `name`, asked from the `short_name`.
    FullName,
    /// The `short_name`, asked from the full `name`.
    ShortName,
    /// How the license text begins ([`key_passage`]); closed book only.
    Passage,
}

impl Fact {
    /// Every fact, in the order examples of a license are made.
    pub const ALL: [Fact; 6] = [
        Fact::Category,
        Fact::Spdx,
        Fact::Owner,
        Fact::FullName,
        Fact::ShortName,
        Fact::Passage,
    ];

    /// The lowercase name used in `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Fact::Category => "category",
            Fact::Spdx => "spdx",
            Fact::Owner => "owner",
            Fact::FullName => "full_name",
            Fact::ShortName => "short_name",
            Fact::Passage => "passage",
        }
    }

    /// Whether retrieval-augmented examples ask it (the metadata record holds the answer).
    pub fn retrievable(self) -> bool {
        self != Fact::Passage
    }

    /// The question wordings (`{name}` is the subject: the short name for
    /// [`Fact::FullName`], else the license name).
    pub fn wordings(self) -> &'static [&'static str] {
        WORDINGS
            .iter()
            .find(|(f, _)| *f == self)
            .map(|(_, w)| *w)
            .unwrap_or(&[])
    }

    /// The answer sentence stating `value` of `subject`, without a final period.
    pub(crate) fn statement(self, subject: &str, value: &str) -> String {
        match self {
            Fact::Category => format!("The license category of {subject} is {value}"),
            Fact::Spdx => format!("The SPDX license identifier of {subject} is {value}"),
            Fact::Owner => format!("The owner of {subject} is {value}"),
            Fact::FullName => format!("The full name of {subject} is {value}"),
            Fact::ShortName => format!("The short name of {subject} is {value}"),
            Fact::Passage => format!("{subject} begins: \"{value}\""),
        }
    }

    /// The answer when the sources do not give the fact.
    pub(crate) fn absent(self, subject: &str) -> String {
        match self {
            Fact::Category => format!("The sources do not give the license category of {subject}."),
            Fact::Spdx => {
                format!("The sources do not give the SPDX license identifier of {subject}.")
            }
            Fact::Owner => format!("The sources do not say who owns {subject}."),
            Fact::FullName => format!("The sources do not give the full name of {subject}."),
            Fact::ShortName => format!("The sources do not give the short name of {subject}."),
            Fact::Passage => format!("The sources do not quote the text of {subject}."),
        }
    }
}

impl std::fmt::Display for Fact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The question wordings of each fact; `{name}` is the subject. None is one of the
/// benchmark's [`crate::licensedb::questions::TEMPLATES`] (a unit test checks).
pub const WORDINGS: [(Fact, &[&str]); 6] = [
    (
        Fact::Category,
        &[
            "What is the category of {name}?",
            "In which LicenseDB category is {name}?",
            "How is {name} categorized?",
            "Which category does {name} fall under?",
        ],
    ),
    (
        Fact::Spdx,
        &[
            "What is the SPDX id of {name}?",
            "Which SPDX identifier is used for {name}?",
            "How is {name} written as an SPDX license identifier?",
            "What SPDX license identifier does {name} have?",
        ],
    ),
    (
        Fact::Owner,
        &[
            "Who is the publisher of {name}?",
            "Which organization or person owns {name}?",
            "Who is {name} from?",
            "Whose license is {name}?",
        ],
    ),
    (
        Fact::FullName,
        &[
            "What is the full name of the license with the short name {name}?",
            "What is the full name of {name}?",
            "{name} is the short name of which license?",
            "Give the full name of the license known as {name}.",
        ],
    ),
    (
        Fact::ShortName,
        &[
            "What is the short name of {name}?",
            "How is {name} abbreviated?",
            "What is the short form of the name {name}?",
            "Give the short name of {name}.",
        ],
    ),
    (
        Fact::Passage,
        &[
            "How does the text of {name} begin?",
            "What is the opening of the license text of {name}?",
            "Quote the beginning of {name}.",
            "What are the first words of {name}?",
        ],
    ),
];

/// How the body of a license begins: its first sentence (whitespace collapsed) when that has
/// 20 to `max_chars` characters, else its first `max_chars` characters cut after a word and
/// followed by `...`. `None` for a body of fewer than 20 characters or 3 words.
pub fn key_passage(body: &str, max_chars: usize) -> Option<String> {
    let text = collapse(body);
    if text.chars().count() < 20 || text.split(' ').count() < 3 {
        return None;
    }
    // The end of the first sentence: `.`, `!` or `?` followed by a space or the end.
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut sentence_end = None;
    for (n, &(i, c)) in chars.iter().enumerate() {
        if matches!(c, '.' | '!' | '?') && chars.get(n + 1).is_none_or(|&(_, next)| next == ' ') {
            sentence_end = Some((n + 1, i + c.len_utf8()));
            break;
        }
    }
    if let Some((n_chars, end)) = sentence_end {
        if (20..=max_chars).contains(&n_chars) {
            return Some(text[..end].to_string());
        }
    }
    if chars.len() <= max_chars {
        return Some(text);
    }
    let limit = chars[max_chars].0;
    let cut = text[..limit].rfind(' ').unwrap_or(limit);
    let head = text[..cut].trim_end_matches([',', ';', ':', ' ']);
    Some(format!("{head}..."))
}

/// `s` with runs of whitespace made one space, trimmed.
pub(crate) fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `s` ending with a period (unless it ends with `.`, `!`, `?` or a quote).
pub(crate) fn sentence(s: String) -> String {
    if s.ends_with(['.', '!', '?', '"']) {
        s
    } else {
        s + "."
    }
}

/// Whether an SPDX id is the LicenseDB's own `LicenseRef-scancode-<key>` for the license
/// `key`: about two thirds of the licenses have one, and an adapter trained on them tends to
/// answer that pattern for every license instead of copying the id its source gives.
pub(crate) fn follows_key_pattern(key: &str, spdx: &str) -> bool {
    spdx.eq_ignore_ascii_case(&format!("LicenseRef-scancode-{key}"))
}

/// One fact of one license: the subject the question names and the answer value.
#[derive(Debug, Clone)]
pub(crate) struct FactOf {
    pub(crate) fact: Fact,
    pub(crate) subject: String,
    pub(crate) value: String,
}

/// The facts of `doc` (before the ambiguity check), in [`Fact::ALL`] order.
pub(crate) fn facts_of(doc: &Document) -> Vec<FactOf> {
    let m = &doc.metadata;
    // Whitespace collapsed, as sources appear in the prompt (`prompt::source_line`).
    let field = |f: &str| m.get(f).map(|v| collapse(v)).filter(|v| !v.is_empty());
    let name = field("name");
    let short = field("short_name");
    let Some(subject) = name.clone().or_else(|| short.clone()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut push = |fact, subject: &str, value: String| {
        out.push(FactOf {
            fact,
            subject: subject.to_string(),
            value,
        })
    };
    if let Some(v) = field("category") {
        push(Fact::Category, &subject, v);
    }
    if let Some(v) = field("spdx_license_key") {
        push(Fact::Spdx, &subject, v);
    }
    if let Some(v) = field("owner").filter(|v| !NO_OWNER.contains(&v.to_lowercase().as_str())) {
        push(Fact::Owner, &subject, v);
    }
    if let (Some(name), Some(short)) = (&name, &short) {
        if name != short {
            push(Fact::FullName, short, name.clone());
            push(Fact::ShortName, name, short.clone());
        }
    }
    if let Some(p) = key_passage(doc.body(), PASSAGE_CHARS) {
        push(Fact::Passage, &subject, p);
    }
    out
}

/// The facts of each selected license, ambiguous ones removed; returns the count removed.
pub(crate) fn unambiguous_facts<'d>(
    seen: &[&'d Document],
    selected: &[&'d Document],
) -> (Vec<(&'d Document, Vec<FactOf>)>, usize) {
    let mut values: HashMap<(Fact, Vec<String>), BTreeSet<String>> = HashMap::new();
    for doc in seen {
        for f in facts_of(doc) {
            values
                .entry((f.fact, words(&f.subject)))
                .or_default()
                .insert(f.value);
        }
    }
    let mut removed = 0;
    let out = selected
        .iter()
        .map(|doc| {
            let mut facts = facts_of(doc);
            let before = facts.len();
            facts.retain(|f| values[&(f.fact, words(&f.subject))].len() == 1);
            removed += before - facts.len();
            (*doc, facts)
        })
        .collect();
    (out, removed)
}
