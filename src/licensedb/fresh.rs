//! The fresh split (docs/DESIGN.md, "the fresh split"): licenses that never appear in
//! fine-tuning data, so that every evaluation can report seen and fresh licenses apart.

use std::collections::{BTreeSet, HashMap};

use super::{license_key, words};
use crate::corpus::Document;

/// True when `key` is *fresh*: its sha256 in hex starts with `0` or `1` (about 1/8 of the
/// licenses). Fresh licenses are never in fine-tuning data.
pub fn is_fresh(key: &str) -> bool {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    digest[0] >> 4 <= 1
}

/// Finds mentions of fresh licenses: their keys, names and short names, as whole words,
/// ignoring case and punctuation (`epl-2.0` matches "EPL 2.0").
#[derive(Debug, Clone, Default)]
pub struct FreshGuard {
    /// Patterns (word sequences) by their first word.
    by_first: HashMap<String, Vec<Vec<String>>>,
}

impl FreshGuard {
    /// The guard of the fresh licenses among `documents`.
    pub fn new(documents: &[Document]) -> FreshGuard {
        let mut guard = FreshGuard::default();
        let mut seen = BTreeSet::new();
        for doc in documents.iter().filter(|d| is_fresh(license_key(d))) {
            let names = [
                Some(license_key(doc)),
                doc.metadata.get("name").map(String::as_str),
                doc.metadata.get("short_name").map(String::as_str),
            ];
            for pattern in names.into_iter().flatten().map(words) {
                if !pattern.is_empty() && seen.insert(pattern.clone()) {
                    guard
                        .by_first
                        .entry(pattern[0].clone())
                        .or_default()
                        .push(pattern);
                }
            }
        }
        guard
    }

    /// The first fresh key or name that `text` mentions (its words joined by spaces).
    pub fn mention(&self, text: &str) -> Option<String> {
        let ws = words(text);
        for (i, w) in ws.iter().enumerate() {
            if let Some(patterns) = self.by_first.get(w) {
                for p in patterns {
                    if ws.len() - i >= p.len() && ws[i..i + p.len()] == p[..] {
                        return Some(p.join(" "));
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_split_matches_sha256_prefix() {
        // Hashes computed independently with `printf KEY | sha256sum`.
        for key in [
            "acroname-bdk",
            "actuate-birt-ihub-ftype-sla",
            "adi-bsd",
            "adobe-general-tou",
        ] {
            assert!(is_fresh(key), "{key} hashes to 0.. or 1..");
        }
        for key in ["mit", "gpl-3.0", "apache-2.0", "bsd-new"] {
            assert!(!is_fresh(key), "{key} hashes to 7.., 7.., 4.., c..");
        }
    }
}
