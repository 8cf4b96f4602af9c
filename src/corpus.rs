//! Reading a folder of documents: `.LICENSE`, `.RULE`, `.md` and `.txt` files, with
//! optional YAML front matter (`---` lines) that becomes metadata.
//!
//! What is skipped, and reported with the file's path and the reason: files with other
//! extensions (silently), files larger than [`CorpusOptions::max_file_bytes`], binary files
//! (a NUL byte in the first 8 KiB), files that are not UTF-8, files whose front matter does
//! not parse, and documents that a [`SkipRule`] of the profile names (the LicenseDB profile
//! skips licenses marked `is_deprecated: yes`). Nothing is written while reading.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::profile::SkipRule;
use crate::{Error, Result};

/// One document of the corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The file stem (e.g. `apache-2.0` for `apache-2.0.LICENSE`).
    pub doc_id: String,
    /// Where it was read from.
    pub path: PathBuf,
    /// The whole file, UTF-8.
    pub text: String,
    /// Byte offset where the body starts (after the front matter; 0 without one).
    pub body_start: usize,
    /// Front matter fields as strings (lists joined with `, `; nested maps dropped).
    pub metadata: BTreeMap<String, String>,
}

impl Document {
    /// The body (text after the front matter).
    pub fn body(&self) -> &str {
        &self.text[self.body_start..]
    }
}

/// A file that was not read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// Why it was skipped.
    pub reason: String,
}

/// What to read.
#[derive(Debug, Clone)]
pub struct CorpusOptions {
    /// Documents left out by their metadata (default none; the profile's `skip` rules).
    pub skip: Vec<SkipRule>,
    /// Files larger than this are skipped (default 8 MiB).
    pub max_file_bytes: u64,
    /// Extensions read (default `LICENSE`, `RULE`, `md`, `txt`).
    pub extensions: Vec<String>,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        CorpusOptions {
            skip: Vec::new(),
            max_file_bytes: 8 << 20,
            extensions: ["LICENSE", "RULE", "md", "txt"].map(String::from).to_vec(),
        }
    }
}

/// Documents read and files skipped.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    /// Documents in file name order.
    pub documents: Vec<Document>,
    /// Files skipped, with reasons.
    pub skipped: Vec<Skipped>,
}

/// Reads the documents in `dir` (not recursive), or the single file `dir`.
///
/// # Errors
/// [`Error::Io`] when the folder cannot be listed; [`Error::EmptyCorpus`] when no document
/// could be read (the message lists why files were skipped).
pub fn read_corpus(dir: &Path, options: &CorpusOptions) -> Result<Corpus> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths: Vec<PathBuf> = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else {
        fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| options.extensions.iter().any(|x| x == e))
            })
            .collect()
    };
    paths.sort();
    let mut corpus = Corpus::default();
    for path in paths {
        match read_document(&path, options) {
            Ok(doc) => corpus.documents.push(doc),
            Err(reason) => corpus.skipped.push(Skipped { path, reason }),
        }
    }
    if corpus.documents.is_empty() {
        let why = if corpus.skipped.is_empty() {
            format!(
                "it has no {} files",
                options
                    .extensions
                    .iter()
                    .map(|e| format!(".{e}"))
                    .collect::<Vec<_>>()
                    .join("/")
            )
        } else {
            format!(
                "all {} files were skipped, e.g. {}: {}",
                corpus.skipped.len(),
                corpus.skipped[0].path.display(),
                corpus.skipped[0].reason
            )
        };
        return Err(Error::EmptyCorpus {
            path: dir.to_path_buf(),
            detail: why,
        });
    }
    Ok(corpus)
}

/// Reads one document; `Err` carries the reason it is skipped.
pub fn read_document(
    path: &Path,
    options: &CorpusOptions,
) -> std::result::Result<Document, String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > options.max_file_bytes {
        return Err(format!(
            "file is {} bytes, more than the limit of {} bytes",
            meta.len(),
            options.max_file_bytes
        ));
    }
    let bytes = fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    if bytes[..bytes.len().min(8192)].contains(&0) {
        return Err("binary file (contains NUL bytes)".to_string());
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    let doc_id = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| "file name is not UTF-8".to_string())?
        .to_string();
    let (metadata, body_start) = parse_front_matter(&text)?;
    if let Some(reason) = options.skip.iter().find_map(|r| r.applies(&metadata)) {
        return Err(reason);
    }
    if text[body_start..].trim().is_empty() && metadata.is_empty() {
        return Err("empty file (no text and no front matter)".to_string());
    }
    Ok(Document {
        doc_id,
        path: path.to_path_buf(),
        text,
        body_start,
        metadata,
    })
}

/// Splits YAML front matter (between a first line `---` and the next line `---`) from the
/// text. Returns the fields and the byte offset where the body starts.
///
/// # Errors
/// A message when the front matter is not closed or is not a YAML mapping.
pub fn parse_front_matter(
    text: &str,
) -> std::result::Result<(BTreeMap<String, String>, usize), String> {
    let first_line_end = match text.find('\n') {
        Some(i) => i + 1,
        None => text.len(),
    };
    if text[..first_line_end].trim_end() != "---" {
        return Ok((BTreeMap::new(), 0));
    }
    let mut pos = first_line_end;
    let close = loop {
        if pos >= text.len() {
            return Err(
                "front matter starts with `---` but is never closed by a `---` line".to_string(),
            );
        }
        let end = text[pos..]
            .find('\n')
            .map(|i| pos + i + 1)
            .unwrap_or(text.len());
        if text[pos..end].trim_end() == "---" {
            break (pos, end);
        }
        pos = end;
    };
    let yaml = &text[first_line_end..close.0];
    let value: serde_yaml_ng::Value = if yaml.trim().is_empty() {
        serde_yaml_ng::Value::Mapping(Default::default())
    } else {
        serde_yaml_ng::from_str(yaml).map_err(|e| format!("malformed front matter: {e}"))?
    };
    let mapping = match value {
        serde_yaml_ng::Value::Mapping(m) => m,
        serde_yaml_ng::Value::Null => Default::default(),
        _ => return Err("malformed front matter: not a mapping of fields".to_string()),
    };
    let mut out = BTreeMap::new();
    for (k, v) in mapping {
        let Some(key) = scalar(&k) else { continue };
        let value = match &v {
            serde_yaml_ng::Value::Sequence(items) => {
                let parts: Vec<String> = items.iter().filter_map(scalar).collect();
                if parts.is_empty() {
                    continue;
                }
                parts.join(", ")
            }
            other => match scalar(other) {
                Some(s) => s,
                None => continue,
            },
        };
        out.insert(key, value);
    }
    Ok((out, close.1))
}

fn scalar(v: &serde_yaml_ng::Value) -> Option<String> {
    match v {
        serde_yaml_ng::Value::String(s) => Some(s.clone()),
        serde_yaml_ng::Value::Bool(b) => Some(if *b { "yes" } else { "no" }.to_string()),
        serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_fields_and_body_offset() {
        let text = "---\nkey: mit\nname: MIT License\nis_deprecated: yes\nother:\n  - A\n  - B\n---\n\nBody here\n";
        let (m, start) = parse_front_matter(text).expect("parses");
        assert_eq!(m["key"], "mit");
        assert_eq!(m["name"], "MIT License");
        assert_eq!(m["is_deprecated"], "yes");
        assert_eq!(m["other"], "A, B");
        assert_eq!(&text[start..], "\nBody here\n");
    }

    #[test]
    fn no_front_matter_and_broken_front_matter() {
        assert_eq!(parse_front_matter("plain text").expect("ok").1, 0);
        assert!(parse_front_matter("---\nkey: a\nno close\n").is_err());
        assert!(parse_front_matter("---\nkey: [unclosed\n---\nbody").is_err());
    }
}
