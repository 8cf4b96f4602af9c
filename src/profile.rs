//! Corpus profiles: what the engine needs to know about a corpus and its users, which the
//! core must not hard-code.
//!
//! A [`Profile`] gives
//! - the system prompts of the retrieval modes (`rag`, `hybrid`) and the closed-book modes
//!   (`finetune`, `base`);
//! - the *metadata record*: which front-matter fields make the extra chunk 0 of a document,
//!   and in which words ([`RecordTemplate`]);
//! - the identifier fields, whose values name a document in a question (the default of
//!   `[retrieval] identifier_fields`);
//! - which fields a `--filter` may name;
//! - which documents are skipped when a corpus is read ([`SkipRule`]).
//!
//! Two profiles are built in: [`LICENSEDB`] (the default: the ScanCode LicenseDB, see
//! [`crate::licensedb`]) and [`GENERIC`] (any folder of Markdown or text documents). A user
//! profile is a TOML file with the fields of [`Profile`]; fields it leaves out take the
//! generic profile's values:
//!
//! ```toml
//! name = "handbook"
//! rag_system_prompt = "You answer questions about the company handbook. ..."
//! closed_book_system_prompt = "You answer questions about the company handbook."
//! identifier_fields = { doc_id = 1.0, title = 1.0 }
//! filter_fields = ["team", "year"]
//! skip = [{ field = "draft", values = ["yes", "true"], reason = "draft" }]
//!
//! [record]
//! title = ["title"]
//! id_label = "page"
//! fields = [{ field = "team", label = "owning team" }]
//! ```
//!
//! It is chosen with `profile = "NAME-or-PATH"` in `ragtune.toml`, `--profile` or
//! `RAGTUNE_PROFILE`. The prompt text is part of what an adapter learned: an adapter records
//! the profile and prompt-format version it was trained with, and the engine warns when they
//! differ from the running ones.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::corpus::Document;
use crate::{Error, Result};

/// The name of the built-in LicenseDB profile (the default).
pub const LICENSEDB: &str = "licensedb";

/// The name of the built-in profile for any folder of documents.
pub const GENERIC: &str = "generic";

/// The profile used when none is configured: [`LICENSEDB`].
pub const DEFAULT_PROFILE: &str = LICENSEDB;

/// The profile named by [`DEFAULT_PROFILE`].
pub fn default_profile() -> Profile {
    crate::licensedb::profile()
}

/// What the engine knows about a corpus (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// The profile's name, recorded by the adapters trained for it.
    pub name: String,
    /// The system message of `rag` and `hybrid` prompts.
    pub rag_system_prompt: String,
    /// The system message of `finetune` and `base` prompts.
    pub closed_book_system_prompt: String,
    /// How the metadata record chunk is written; `None`: documents get no record chunk.
    pub record: Option<RecordTemplate>,
    /// Metadata fields whose whole value, found in a question, names the document, with
    /// their RRF weights (`doc_id` is the document id).
    pub identifier_fields: BTreeMap<String, f32>,
    /// The fields a metadata filter may name; empty: any field the index's chunks have.
    pub filter_fields: Vec<String>,
    /// Documents left out when a corpus is read.
    pub skip: Vec<SkipRule>,
    /// The folder of the pinned corpus package (`ragtune fetch`) that the default index is
    /// built from on first use; `None`: the index is built with `ragtune ingest PATH`.
    pub pinned_corpus: Option<String>,
}

/// How a document's front matter becomes its metadata record, the chunk 0 that lets
/// questions about the fields be retrieved:
/// `{title} ({id_label} {doc_id}). The {label} is {value}. ...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordTemplate {
    /// Fields tried in order for the title; the document id when none is set.
    pub title: Vec<String>,
    /// The words that name the document id in parentheses after the title.
    pub id_label: String,
    /// The fields stated, in order, each as `The {label} is {value}` when set.
    #[serde(default)]
    pub fields: Vec<RecordField>,
}

/// One field of a [`RecordTemplate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordField {
    /// The front-matter field.
    pub field: String,
    /// How the record names it ("SPDX license identifier").
    pub label: String,
}

/// Skips a document whose front-matter `field` has one of `values` (compared without case).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkipRule {
    /// The front-matter field.
    pub field: String,
    /// The values that skip the document.
    pub values: Vec<String>,
    /// Why, as reported for each skipped file ("deprecated license").
    pub reason: String,
}

impl SkipRule {
    /// The reason `metadata` is skipped by this rule, `None` when it is kept.
    pub fn applies(&self, metadata: &BTreeMap<String, String>) -> Option<String> {
        let value = metadata.get(&self.field)?;
        self.values
            .iter()
            .any(|v| v.eq_ignore_ascii_case(value.trim()))
            .then(|| format!("{} ({}: {value})", self.reason, self.field))
    }
}

impl RecordTemplate {
    /// The words that name `doc_id` in a record: `({id_label} {doc_id})`. A source whose text
    /// contains them already says which document it is.
    pub fn id_mention(&self, doc_id: &str) -> String {
        format!("({} {doc_id})", self.id_label)
    }

    /// The record of `doc`; `None` when it has none of the title and record fields.
    pub fn render(&self, doc: &Document) -> Option<String> {
        let m = &doc.metadata;
        let title = self.title.iter().find_map(|f| m.get(f));
        let fields: Vec<(&str, &String)> = self
            .fields
            .iter()
            .filter_map(|f| m.get(&f.field).map(|v| (f.label.as_str(), v)))
            .collect();
        if title.is_none() && fields.is_empty() {
            return None;
        }
        let mut out = format!(
            "{} {}",
            title.map(String::as_str).unwrap_or(&doc.doc_id),
            self.id_mention(&doc.doc_id)
        );
        for (label, value) in fields {
            out.push_str(&format!(". The {label} is {value}"));
        }
        out.push('.');
        Some(out)
    }
}

impl Default for Profile {
    /// The generic profile ([`GENERIC`]; not the default profile, [`DEFAULT_PROFILE`]): its
    /// values fill what a profile file leaves out.
    fn default() -> Self {
        Profile {
            name: GENERIC.to_string(),
            rag_system_prompt: "You are a helpful assistant. Answer the question in one or two \
                sentences using only the numbered sources, and cite the sources you use as [1], \
                [2]. If the sources do not contain the answer, say that they do not."
                .to_string(),
            closed_book_system_prompt:
                "You are a helpful assistant. Answer the question in one or two sentences."
                    .to_string(),
            // No record: which fields a folder's front matter has is not known, and a record
            // of a title alone only takes a source's place in the prompt.
            record: None,
            identifier_fields: [(ragtune_index::DOC_ID_KEY, 1.0), ("title", 1.0)]
                .into_iter()
                .map(|(k, w)| (k.to_string(), w))
                .collect(),
            filter_fields: Vec::new(),
            skip: Vec::new(),
            pinned_corpus: None,
        }
    }
}

impl Profile {
    /// The built-in profile `name` ([`LICENSEDB`], [`GENERIC`]).
    pub fn builtin(name: &str) -> Option<Profile> {
        match name {
            LICENSEDB => Some(crate::licensedb::profile()),
            GENERIC => Some(Profile::default()),
            _ => None,
        }
    }

    /// The profile that `spec` names: a built-in name, else a TOML file.
    ///
    /// # Errors
    /// [`Error::UnknownProfile`] for a name that is neither built in nor a file;
    /// [`Error::ConfigFile`] for a file that cannot be read or parsed (unknown keys
    /// included).
    pub fn resolve(spec: &str) -> Result<Profile> {
        if let Some(p) = Profile::builtin(spec) {
            return Ok(p);
        }
        let path = Path::new(spec);
        if !path.is_file() {
            return Err(Error::UnknownProfile {
                name: spec.to_string(),
            });
        }
        let config_err = |reason: String| Error::ConfigFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| config_err(e.to_string()))?;
        let profile: Profile = toml::from_str(&text).map_err(|e| config_err(e.to_string()))?;
        if profile.rag_system_prompt.trim().is_empty()
            || profile.closed_book_system_prompt.trim().is_empty()
        {
            return Err(config_err(
                "rag_system_prompt and closed_book_system_prompt must not be empty".into(),
            ));
        }
        Ok(profile)
    }

    /// Why `doc`'s metadata makes it skipped, `None` when it is kept.
    pub fn skip_reason(&self, metadata: &BTreeMap<String, String>) -> Option<String> {
        self.skip.iter().find_map(|r| r.applies(metadata))
    }

    /// The metadata record of `doc` (chunk 0), `None` without a template or fields.
    pub fn metadata_record(&self, doc: &Document) -> Option<String> {
        self.record.as_ref()?.render(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(fields: &[(&str, &str)]) -> Document {
        Document {
            doc_id: "handbook-7".into(),
            path: "handbook-7.md".into(),
            text: String::new(),
            body_start: 0,
            metadata: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_record_names_title_id_and_the_fields_in_order() {
        let t = RecordTemplate {
            title: vec!["title".into(), "name".into()],
            id_label: "page".into(),
            fields: vec![
                RecordField {
                    field: "team".into(),
                    label: "owning team".into(),
                },
                RecordField {
                    field: "year".into(),
                    label: "year".into(),
                },
            ],
        };
        let d = doc(&[("name", "Travel"), ("year", "2024"), ("team", "HR")]);
        assert_eq!(
            t.render(&d).as_deref(),
            Some("Travel (page handbook-7). The owning team is HR. The year is 2024.")
        );
        assert_eq!(t.render(&doc(&[("other", "x")])), None);
        assert_eq!(
            t.render(&doc(&[("year", "1999")])).as_deref(),
            Some("handbook-7 (page handbook-7). The year is 1999.")
        );
    }

    #[test]
    fn skip_rules_ignore_case_and_say_why() {
        let p = Profile {
            skip: vec![SkipRule {
                field: "draft".into(),
                values: vec!["yes".into()],
                reason: "draft page".into(),
            }],
            ..Profile::default()
        };
        let m = |v: &str| BTreeMap::from([("draft".to_string(), v.to_string())]);
        assert_eq!(
            p.skip_reason(&m("YES")).as_deref(),
            Some("draft page (draft: YES)")
        );
        assert_eq!(p.skip_reason(&m("no")), None);
        assert_eq!(p.skip_reason(&BTreeMap::new()), None);
    }

    #[test]
    fn a_profile_file_overrides_the_generic_defaults_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "name = \"handbook\"\nfilter_fields = [\"team\"]\n[record]\ntitle = [\"title\"]\nid_label = \"page\"\n",
        )
        .expect("write");
        let p = Profile::resolve(path.to_str().expect("utf-8")).expect("parses");
        assert_eq!(p.name, "handbook");
        assert_eq!(p.filter_fields, ["team"]);
        assert_eq!(p.rag_system_prompt, Profile::default().rag_system_prompt);
        assert_eq!(p.record.expect("record").id_label, "page");
        std::fs::write(&path, "nmae = \"x\"\n").expect("write");
        let err = Profile::resolve(path.to_str().expect("utf-8")).expect_err("unknown key");
        assert!(err.to_string().contains("nmae"), "{err}");
        let err = Profile::resolve("no-such-profile").expect_err("unknown");
        assert!(err.to_string().contains("licensedb"), "{err}");
    }
}
