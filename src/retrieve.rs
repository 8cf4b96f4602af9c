//! Retrieval: question → candidates from dense search (embedding → HNSW), lexical search
//! (BM25 over the chunk text) and identifier matches (metadata fields such as a name or an id
//! found verbatim in the question), fused by reciprocal rank fusion → top-k chunks. Metadata
//! filters apply to every list.
//!
//! Measured on the 1,000 dev queries of `benches/retrieval_eval.py` (see `benches/README.md`):
//! hybrid is the default because it beats either list alone.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use ragtune_embed::SentenceEncoder;
use ragtune_index::{Filter, Hit, Index, SearchParams};
use serde::{Deserialize, Serialize};

use crate::profile::Profile;
use crate::{Error, Result};

/// One search request.
#[derive(Debug, Clone)]
pub struct Query {
    /// The query text (a question or a passage).
    pub text: String,
    /// Results wanted (top-k).
    pub k: usize,
    /// HNSW `ef_search`; `None` uses the index default.
    pub ef_search: Option<usize>,
    /// Metadata filter (AND of `key=value`).
    pub filter: Option<Filter>,
    /// Exact (flat) search instead of HNSW.
    pub exact: bool,
    /// Which lists to search; `None`: the retriever's configured mode.
    pub mode: Option<RetrievalMode>,
}

impl Query {
    /// A top-`k` query with the index defaults.
    pub fn new(text: impl Into<String>, k: usize) -> Query {
        Query {
            text: text.into(),
            k,
            ef_search: None,
            filter: None,
            exact: false,
            mode: None,
        }
    }
}

/// Which candidate lists a search uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RetrievalMode {
    /// Embedding similarity only (HNSW over the chunk vectors).
    Dense,
    /// BM25 over the chunk text, identifier matches and BM25 over the identifier fields,
    /// fused by RRF; no embedding.
    Lexical,
    /// The dense list and the three lexical ones, fused by RRF.
    #[default]
    Hybrid,
}

impl std::fmt::Display for RetrievalMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RetrievalMode::Dense => "dense",
            RetrievalMode::Lexical => "lexical",
            RetrievalMode::Hybrid => "hybrid",
        })
    }
}

/// How candidates are found and fused; the `[retrieval]` table of `ragtune.toml`.
///
/// A fused hit's score is `Σ weight / (rrf_k + rank)` over the lists it is in (RRF,
/// [`ragtune_index::rrf`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrievalConfig {
    /// Which lists to use.
    pub mode: RetrievalMode,
    /// The RRF constant (60 in Cormack et al. 2009).
    pub rrf_k: f32,
    /// RRF weight of the dense list.
    pub dense_weight: f32,
    /// RRF weight of the BM25 list.
    pub lexical_weight: f32,
    /// RRF weight of the identifier-match list (whole field values found in the query).
    pub identifier_weight: f32,
    /// RRF weight of the field list: BM25 of the query against the identifier fields alone
    /// (a name found in other words: "Apache Software License, Version 2.0").
    pub field_weight: f32,
    /// Metadata fields whose whole value, found verbatim among the query's words, marks the
    /// document as named by the query; each with its weight (a match counts `weight x words`).
    /// `doc_id` is the document id. `None`: the corpus profile's
    /// ([`Profile::identifier_fields`](crate::profile::Profile::identifier_fields)).
    pub identifier_fields: Option<BTreeMap<String, f32>>,
    /// Candidates taken from each list before fusion (at least `k`).
    pub candidates: usize,
    /// Fuse at document level ([`ragtune_index::rrf_by_doc`]: a list ranks documents by
    /// their best chunk, and the hits give each document's best chunk first); `false` fuses
    /// chunks ([`ragtune_index::rrf`]).
    pub fuse_documents: bool,
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        RetrievalConfig {
            mode: RetrievalMode::Hybrid,
            rrf_k: ragtune_index::RRF_K,
            dense_weight: 1.0,
            lexical_weight: 1.0,
            identifier_weight: 1.0,
            field_weight: 1.0,
            identifier_fields: None,
            candidates: 50,
            fuse_documents: true,
        }
    }
}

impl RetrievalConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for a non-finite or negative weight, `rrf_k <= 0` or
    /// `candidates == 0`.
    pub fn validate(&self) -> Result<()> {
        let weights = [
            ("dense_weight", self.dense_weight),
            ("lexical_weight", self.lexical_weight),
            ("identifier_weight", self.identifier_weight),
            ("field_weight", self.field_weight),
        ];
        for (name, w) in weights.into_iter().chain(
            self.identifier_fields
                .iter()
                .flatten()
                .map(|(k, &w)| (k.as_str(), w)),
        ) {
            if !w.is_finite() || w < 0.0 {
                return Err(Error::InvalidSetting {
                    key: format!("[retrieval] {name}"),
                    value: w.to_string(),
                    expected: "a finite number >= 0".into(),
                });
            }
        }
        if !self.rrf_k.is_finite() || self.rrf_k <= 0.0 {
            return Err(Error::InvalidSetting {
                key: "[retrieval] rrf_k".into(),
                value: self.rrf_k.to_string(),
                expected: "a finite number > 0".into(),
            });
        }
        if self.candidates == 0 {
            return Err(Error::InvalidSetting {
                key: "[retrieval] candidates".into(),
                value: "0".into(),
                expected: "at least 1".into(),
            });
        }
        Ok(())
    }
}

/// One retrieved chunk, as the JSON contract of DESIGN.md names its fields.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RetrievedChunk {
    /// The document (file stem; for the LicenseDB the license key).
    pub doc_id: String,
    /// Chunk number within the document (0 = metadata record).
    pub chunk: u32,
    /// Retrieval score, higher is closer: the cosine similarity in `dense` mode, the RRF
    /// score of the fused lists in `hybrid` and `lexical` mode.
    pub score: f32,
    /// The chunk's text.
    pub text: String,
    /// Byte range of the chunk in the source file.
    #[serde(skip)]
    pub range: (u64, u64),
    /// The document's metadata.
    #[serde(skip)]
    pub metadata: BTreeMap<String, String>,
}

impl RetrievedChunk {
    /// The chunk `c` of the index as a source with retrieval score `score`.
    pub fn from_record(c: ragtune_index::ChunkRecord, score: f32) -> RetrievedChunk {
        RetrievedChunk {
            doc_id: c.doc_id,
            chunk: c.chunk,
            score,
            text: c.text,
            range: (c.start, c.end),
            metadata: c.metadata,
        }
    }
}

/// Hits and where the time went.
#[derive(Debug, Clone)]
pub struct SearchResult {
    /// Best first.
    pub hits: Vec<RetrievedChunk>,
    /// Embedding the query, ms.
    pub embed_ms: f64,
    /// Searching the index (every list, and their fusion) and reading the chunks, ms.
    pub search_ms: f64,
    /// The mode that ran (`hybrid` on an index without lexical postings runs as `dense`).
    pub mode: RetrievalMode,
}

/// An encoder and the index it built, loaded once and searched many times. `Send + Sync`.
#[derive(Debug)]
pub struct Retriever {
    encoder: SentenceEncoder,
    index: Index,
    config: RetrievalConfig,
    /// The fields a filter may name; empty: any the index has.
    filter_fields: Vec<String>,
    filter_keys: std::sync::OnceLock<std::collections::BTreeSet<String>>,
}

impl Retriever {
    /// Loads the encoder in `encoder_dir` and opens the index at `index_dir`, checking that
    /// the index was built by this encoder.
    ///
    /// # Errors
    /// Missing model files, a missing or corrupt index, or
    /// [`ragtune_index::Error::EmbedderMismatch`].
    pub fn open(encoder_dir: impl AsRef<Path>, index_dir: impl AsRef<Path>) -> Result<Retriever> {
        let encoder = SentenceEncoder::load(encoder_dir)?;
        Self::with_encoder(encoder, index_dir)
    }

    /// Opens the index at `index_dir` for an encoder already loaded, with the default
    /// retrieval settings and the default profile's identifier and filter fields
    /// ([`crate::profile::default_profile`]; [`with_profile`](Self::with_profile) sets
    /// another's).
    ///
    /// # Errors
    /// As [`Retriever::open`].
    pub fn with_encoder(
        encoder: SentenceEncoder,
        index_dir: impl AsRef<Path>,
    ) -> Result<Retriever> {
        let index = Index::open(index_dir.as_ref(), &crate::embedder_id(&encoder))?;
        let profile = crate::profile::default_profile();
        Ok(Retriever {
            encoder,
            index,
            config: RetrievalConfig {
                identifier_fields: Some(profile.identifier_fields),
                ..RetrievalConfig::default()
            },
            filter_fields: profile.filter_fields,
            filter_keys: std::sync::OnceLock::new(),
        })
    }

    /// Uses `config` for every later search.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] from [`RetrievalConfig::validate`].
    pub fn with_config(mut self, config: RetrievalConfig) -> Result<Retriever> {
        config.validate()?;
        self.config = config;
        Ok(self)
    }

    /// Uses `config` for every later search, with `profile`'s identifier fields where
    /// `config` names none, and `profile`'s filter fields.
    ///
    /// # Errors
    /// As [`with_config`](Self::with_config).
    pub fn with_profile(
        mut self,
        mut config: RetrievalConfig,
        profile: &Profile,
    ) -> Result<Retriever> {
        if config.identifier_fields.is_none() {
            config.identifier_fields = Some(profile.identifier_fields.clone());
        }
        self.filter_fields = profile.filter_fields.clone();
        self.with_config(config)
    }

    /// The retrieval configuration.
    pub fn config(&self) -> &RetrievalConfig {
        &self.config
    }

    /// Refuses a filter on a field no chunk of the index has (a typo would otherwise filter
    /// every hit out silently), or that the profile does not make filterable.
    ///
    /// # Errors
    /// [`Error::UnknownFilterField`] naming the field and listing the ones there are.
    pub fn check_filter(&self, filter: &Filter) -> Result<()> {
        let keys = match self.filter_keys.get() {
            Some(k) => k,
            None => {
                let keys = self.index.metadata_keys()?;
                self.filter_keys.get_or_init(|| keys)
            }
        };
        let allowed = |k: &str| {
            keys.contains(k)
                && (self.filter_fields.is_empty() || self.filter_fields.iter().any(|f| f == k))
        };
        for (key, _) in filter.conditions() {
            if !allowed(key) {
                return Err(Error::UnknownFilterField {
                    field: key.to_string(),
                    allowed: keys.iter().filter(|k| allowed(k)).cloned().collect(),
                });
            }
        }
        Ok(())
    }

    /// A notice for the user when the index cannot serve lexical search in full (built before
    /// lexical postings existed), saying how to add them; `None` when it can.
    pub fn lexical_notice(&self) -> Option<String> {
        self.missing_lexical("their chunks are found by dense search only")
    }

    /// "The index has N segment(s) without lexical postings ...: `consequence`; run ...".
    fn missing_lexical(&self, consequence: &str) -> Option<String> {
        let missing = self.index.lexical_missing();
        (missing > 0).then(|| {
            format!(
                "the index has {missing} segment(s) without lexical postings (built by an older \
                 ragtune): {consequence}; run `ragtune index upgrade` to add them (no \
                 re-embedding), or re-run `ragtune ingest`"
            )
        })
    }

    /// The encoder.
    pub fn encoder(&self) -> &SentenceEncoder {
        &self.encoder
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Embeds `query.text` and returns the top-`k` chunks.
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for an empty query, [`Error::InvalidParameter`] for `k == 0`,
    /// [`Error::UnknownFilterField`], [`Error::RetrievalUnavailable`] for `lexical` on an index
    /// without lexical postings; embedding and index errors.
    pub fn search(&self, query: &Query) -> Result<SearchResult> {
        if query.text.trim().is_empty() {
            return Err(Error::EmptyInput { what: "query" });
        }
        if query.k == 0 {
            return Err(Error::InvalidParameter {
                name: "k",
                value: "0".into(),
                expected: "at least 1".into(),
            });
        }
        if let Some(f) = &query.filter {
            self.check_filter(f)?;
        }
        let mut mode = query.mode.unwrap_or(self.config.mode);
        if mode == RetrievalMode::Lexical {
            if let Some(why) = self.missing_lexical("lexical search needs them") {
                return Err(Error::RetrievalUnavailable { reason: why });
            }
        }
        if mode == RetrievalMode::Hybrid
            && self.index.lexical_missing() == self.index.stats().segments
        {
            mode = RetrievalMode::Dense;
        }
        let t0 = Instant::now();
        let embedding = match mode {
            RetrievalMode::Lexical => None,
            _ => Some(self.encoder.encode(&[query.text.as_str()])?),
        };
        let t1 = Instant::now();
        let cfg = &self.config;
        let n = query.k.max(cfg.candidates);
        let params = SearchParams {
            k: if mode == RetrievalMode::Dense {
                query.k
            } else {
                n
            },
            ef_search: query.ef_search,
            filter: query.filter.clone(),
            exact: query.exact,
        };
        let dense: Vec<Hit> = match &embedding {
            Some(e) => self.index.search(e.row(0), &params)?,
            None => Vec::new(),
        };
        let hits = if mode == RetrievalMode::Dense {
            dense
        } else {
            let lexical = self.index.search_lexical(&query.text, &params)?;
            let fields: Vec<(String, f32)> = cfg
                .identifier_fields
                .iter()
                .flatten()
                .map(|(k, &w)| (k.clone(), w))
                .collect();
            let named = self
                .index
                .search_identifiers(&query.text, &fields, &params)?;
            let by_fields = if cfg.field_weight > 0.0 {
                self.index.search_fields(&query.text, &fields, &params)?
            } else {
                Vec::new()
            };
            let lists = [
                (&dense[..], cfg.dense_weight),
                (&lexical[..], cfg.lexical_weight),
                (&named[..], cfg.identifier_weight),
                (&by_fields[..], cfg.field_weight),
            ];
            if cfg.fuse_documents {
                let mut doc_of: HashMap<u64, &str> = HashMap::new();
                for (list, _) in &lists {
                    for h in list.iter() {
                        if let std::collections::hash_map::Entry::Vacant(e) = doc_of.entry(h.id) {
                            e.insert(self.index.doc_id(h.id)?);
                        }
                    }
                }
                ragtune_index::rrf_by_doc(&lists, cfg.rrf_k, query.k, |id| {
                    doc_of.get(&id).copied().unwrap_or_default()
                })
            } else {
                ragtune_index::rrf(&lists, cfg.rrf_k, query.k)
            }
        };
        let hits = hits
            .into_iter()
            .map(|h| {
                Ok(RetrievedChunk::from_record(
                    self.index.chunk(h.id)?,
                    h.score,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let t2 = Instant::now();
        Ok(SearchResult {
            hits,
            embed_ms: (t1 - t0).as_secs_f64() * 1e3,
            search_ms: (t2 - t1).as_secs_f64() * 1e3,
            mode,
        })
    }
}
