//! The flagship profile: the ScanCode LicenseDB (`licensedcode-data`, one `.LICENSE` file per
//! license with YAML front matter). Everything that knows about licenses lives here:
//! - [`profile`]: the prompts, the metadata record, the identifier and filter fields and the
//!   skip rule (deprecated licenses) that the engine core reads through
//!   [`crate::profile::Profile`];
//! - [`fresh`]: the fresh split, licenses never used for training;
//! - [`questions`]: the mode benchmark's question set and its scoring rule;
//! - [`train_data`]: the fine-tuning data generated from the corpus and its index.

pub mod fresh;
pub mod questions;
pub mod train_data;

use crate::corpus::{CorpusOptions, Document};
use crate::profile::{Profile, RecordField, RecordTemplate, SkipRule};

pub use fresh::is_fresh;

/// The folder of the pinned corpus package that holds the licenses.
pub const LICENSES_DIR: &str = "licenses";

/// The LicenseDB profile (the default, see [`crate::profile`]).
///
/// Its metadata record reads, for `mit.LICENSE`: "MIT License (license key mit). The short
/// name is MIT License. The SPDX license identifier is MIT. The category is Permissive. The
/// owner is MIT." The shipped adapter was trained on these prompts (prompt format 1).
pub fn profile() -> Profile {
    let field = |field: &str, label: &str| RecordField {
        field: field.into(),
        label: label.into(),
    };
    Profile {
        name: crate::profile::LICENSEDB.to_string(),
        rag_system_prompt: "You are a software license analyst. Answer the question in one or \
            two sentences using only the numbered sources, and cite the sources you use as [1], \
            [2]. If the sources do not contain the answer, say that they do not."
            .to_string(),
        closed_book_system_prompt:
            "You are a software license analyst. Answer the question in one or two sentences."
                .to_string(),
        record: Some(RecordTemplate {
            title: vec!["name".into(), "short_name".into()],
            id_label: "license key".into(),
            fields: vec![
                field("short_name", "short name"),
                field("spdx_license_key", "SPDX license identifier"),
                field("category", "category"),
                field("owner", "owner"),
            ],
        }),
        // A license is named by its key (the document id), its SPDX id, its full name or its
        // short name.
        identifier_fields: [
            ragtune_index::DOC_ID_KEY,
            "spdx_license_key",
            "name",
            "short_name",
        ]
        .into_iter()
        .map(|k| (k.to_string(), 1.0))
        .collect(),
        filter_fields: [
            ragtune_index::DOC_ID_KEY,
            "key",
            "category",
            "owner",
            "spdx_license_key",
            "short_name",
            "name",
            "is_exception",
            "language",
        ]
        .map(String::from)
        .to_vec(),
        skip: vec![SkipRule {
            field: "is_deprecated".into(),
            values: vec!["yes".into(), "true".into()],
            reason: "deprecated license".into(),
        }],
        pinned_corpus: Some(LICENSES_DIR.to_string()),
    }
}

/// How the LicenseDB's own tools read the corpus: the profile's skip rule.
pub fn corpus_options() -> CorpusOptions {
    CorpusOptions {
        skip: profile().skip,
        ..CorpusOptions::default()
    }
}

/// The license key of a document: its `key` field, else its `doc_id`.
pub fn license_key(doc: &Document) -> &str {
    doc.metadata.get("key").unwrap_or(&doc.doc_id)
}

/// Owner values that name nobody: no question or example is made for them.
pub(crate) const NO_OWNER: [&str; 2] = ["unspecified", "unknown"];

/// Lowercase words of letters and digits (everything else separates words).
pub(crate) fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Whether the words of `needle` occur in `haystack` as whole words (see [`words`]), so
/// "GPL 2.0" is in "the GPL-2.0 license" and "MIT" is not in "MITRE".
pub(crate) fn contains_words(haystack: &str, needle: &str) -> bool {
    let n = words(needle);
    !n.is_empty() && words(haystack).windows(n.len()).any(|w| w == n)
}

/// A license document for unit tests: `key` as doc id and `key` field, `fields` as the rest
/// of the front matter, `body` as its text.
#[cfg(test)]
pub(crate) fn test_doc(key: &str, fields: &[(&str, &str)], body: &str) -> Document {
    let mut metadata: std::collections::BTreeMap<String, String> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    metadata.insert("key".into(), key.into());
    Document {
        doc_id: key.into(),
        path: format!("{key}.LICENSE").into(),
        text: body.to_string(),
        body_start: 0,
        metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_the_one_the_shipped_adapter_was_trained_on() {
        let text = "---\nkey: mit\nshort_name: MIT License\nname: MIT License\ncategory: Permissive\nowner: MIT\nspdx_license_key: MIT\n---\nPermission is hereby granted\n";
        let (metadata, body_start) = crate::corpus::parse_front_matter(text).expect("parses");
        let doc = Document {
            doc_id: "mit".into(),
            path: "mit.LICENSE".into(),
            text: text.into(),
            body_start,
            metadata,
        };
        assert_eq!(
            profile().metadata_record(&doc).as_deref(),
            Some(
                "MIT License (license key mit). The short name is MIT License. The SPDX license \
                 identifier is MIT. The category is Permissive. The owner is MIT."
            )
        );
    }

    #[test]
    fn whole_words_only() {
        assert!(contains_words("the GPL-2.0 license", "GPL 2.0"));
        assert!(!contains_words("MITRE", "MIT"));
        assert!(!contains_words("anything", ""));
    }

    #[test]
    fn deprecated_licenses_are_skipped() {
        let p = profile();
        let m = |v: &str| {
            std::collections::BTreeMap::from([("is_deprecated".to_string(), v.to_string())])
        };
        assert!(p.skip_reason(&m("yes")).is_some());
        assert!(p.skip_reason(&m("no")).is_none());
    }
}
