//! The scoring rule of the benchmark's questions (see the parent module's docs): whether
//! an answer gives the expected category, SPDX id, owner or text.

use super::Kind;
use crate::licensedb::contains_words;

/// The LicenseDB categories (`category` values of licensedcode-data 32.1.0), matched as
/// whole words by the category rule.
pub const CATEGORIES: [&str; 11] = [
    "CLA",
    "Commercial",
    "Copyleft",
    "Copyleft Limited",
    "Free Restricted",
    "Patent License",
    "Permissive",
    "Proprietary Free",
    "Public Domain",
    "Source-available",
    "Unstated License",
];

/// Words that do not identify an owner on their own (see the module docs).
pub const GENERIC_OWNER_WORDS: [&str; 24] = [
    "the",
    "and",
    "free",
    "open",
    "source",
    "software",
    "foundation",
    "university",
    "institute",
    "corporation",
    "corp",
    "company",
    "inc",
    "ltd",
    "llc",
    "gmbh",
    "group",
    "project",
    "team",
    "systems",
    "technologies",
    "technology",
    "national",
    "international",
];

/// Whether `answer` gives `expected` for a question of `kind` (the rules are in the module
/// docs).
pub fn is_correct(kind: Kind, expected: &str, answer: &str) -> bool {
    match kind {
        Kind::Spdx => {
            let want = expected.trim().to_lowercase();
            !want.is_empty() && spdx_tokens(answer).any(|t| t == want)
        }
        Kind::Category => {
            let named = categories_named(answer, expected);
            named.len() == 1 && named[0] == normalize(expected)
        }
        Kind::Owner => owner_alternatives(expected)
            .iter()
            .any(|alt| contains_words(answer, alt)),
        Kind::Text => contains_words(answer, expected),
    }
}

/// Lowercase, every character that is not a letter or digit a space, single spaces.
fn normalize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_lowercase().next().unwrap_or(c)
            } else {
                ' '
            }
        })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `answer` normalised (see [`is_correct`]) with every whole-word occurrence of the
/// normalised `name` replaced by ` | `.
pub fn without_name(answer: &str, name: &str) -> String {
    let name = normalize(name);
    let text = format!(" {} ", normalize(answer));
    if name.is_empty() {
        return text;
    }
    text.replace(&format!(" {name} "), " | ")
}

/// The answer's SPDX-like tokens, lowercase.
fn spdx_tokens(answer: &str) -> impl Iterator<Item = String> + '_ {
    answer
        .split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+')))
        .map(|t| t.trim_end_matches(['.', '-']).to_lowercase())
        .filter(|t| !t.is_empty())
}

/// The categories (normalised) an answer names, longest names first, each span used once;
/// `expected` counts as a category too.
fn categories_named(answer: &str, expected: &str) -> Vec<String> {
    let mut names: Vec<String> = CATEGORIES.iter().map(|c| normalize(c)).collect();
    let expected = normalize(expected);
    if !names.contains(&expected) {
        names.push(expected);
    }
    names.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    let mut text = format!(" {} ", normalize(answer));
    let mut found = Vec::new();
    for name in names.into_iter().filter(|n| !n.is_empty()) {
        let pattern = format!(" {name} ");
        if text.contains(&pattern) {
            text = text.replace(&pattern, " | ");
            found.push(name);
        }
    }
    found
}

/// What counts as naming `owner`: the whole, its parts split at ` - ` and parentheses, and
/// its first significant word.
fn owner_alternatives(owner: &str) -> Vec<String> {
    let mut alts = vec![normalize(owner)];
    let parts = owner
        .split(" - ")
        .flat_map(|p| p.split(['(', ')']))
        .map(normalize)
        .filter(|p| !p.is_empty());
    alts.extend(parts);
    if let Some(word) = normalize(owner).split(' ').find(|w| {
        w.chars().count() >= 3
            && !GENERIC_OWNER_WORDS.contains(w)
            && !w.chars().all(|c| c.is_ascii_digit())
    }) {
        alts.push(word.to_string());
    }
    alts.retain(|a| !a.is_empty());
    alts.dedup();
    alts
}
