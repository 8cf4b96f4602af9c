//! Integration tests of ragtune-index (one binary; helpers in `util`).

mod util;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ragtune_index::synthetic::clustered;
use ragtune_index::{
    Directory, Error, Filter, FsDirectory, HnswParams, Index, RamDirectory, SearchParams,
    VectorProblem, MANIFEST,
};
use util::*;

#[test]
fn recall_at_10_vs_exact() {
    let (n, dim) = (5000, 96);
    let vecs = clustered(n, dim, 50, 0.3, 1);
    let ram: Arc<dyn Directory> = Arc::new(RamDirectory::new());
    let ix = Index::create_in(
        ram,
        embedder(dim),
        HnswParams::default(),
        records(n, 40),
        &vecs,
    )
    .expect("create");
    let queries = clustered(200, dim, 50, 0.3, 2);
    let mut hit = 0usize;
    for q in queries.chunks_exact(dim) {
        let exact: HashSet<u64> = ix
            .search(
                q,
                &SearchParams {
                    exact: true,
                    ..SearchParams::top(10)
                },
            )
            .expect("exact")
            .iter()
            .map(|h| h.id)
            .collect();
        let approx = ix.search(q, &SearchParams::top(10)).expect("approx");
        assert_eq!(approx.len(), 10);
        hit += approx.iter().filter(|h| exact.contains(&h.id)).count();
    }
    let recall = hit as f64 / 2000.0;
    assert!(recall >= 0.98, "recall@10 = {recall}");
}

#[test]
fn tiny_indexes_and_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dim = 4;
    // n = 1
    let p1 = tmp.path().join("one");
    let ix = Index::create(
        &p1,
        embedder(dim),
        HnswParams::default(),
        records(1, 1),
        &[0.0, 2.0, 0.0, 0.0],
    )
    .expect("create");
    let hits = ix
        .search(&[0.0, 1.0, 0.0, 0.0], &SearchParams::top(5))
        .expect("search");
    assert_eq!(hits.len(), 1);
    assert!(
        (hits[0].score - 1.0).abs() < 1e-5,
        "stored vectors are normalised"
    );
    // empty
    assert!(matches!(
        Index::create(
            tmp.path().join("e"),
            embedder(dim),
            HnswParams::default(),
            vec![],
            &[]
        ),
        Err(Error::EmptyIndex)
    ));
    // already exists / replace
    assert!(matches!(
        Index::create(
            &p1,
            embedder(dim),
            HnswParams::default(),
            records(1, 1),
            &[1.0, 0.0, 0.0, 0.0]
        ),
        Err(Error::AlreadyExists { .. })
    ));
    let vecs = clustered(3, dim, 2, 0.1, 5);
    let ix = Index::create_or_replace(
        &p1,
        embedder(dim),
        HnswParams::default(),
        records(3, 3),
        &vecs,
    )
    .expect("replace");
    assert_eq!(ix.len(), 3);
    assert_eq!(Index::open(&p1, &embedder(dim)).expect("open").len(), 3);
    // only the new segment's files remain (vectors, graph, chunks, lexical) and the manifest
    let names = list(&p1);
    assert_eq!(names.len(), 5, "{names:?}");
    // embedder mismatch
    let mut other = embedder(dim);
    other.model_sha256 = "ffff".into();
    match Index::open(&p1, &other) {
        Err(e @ Error::EmbedderMismatch { .. }) => {
            assert!(e.to_string().contains("ragtune ingest"))
        }
        r => panic!("expected mismatch, got {:?}", r.map(|i| i.len())),
    }
    // dimension mismatch
    assert!(matches!(
        ix.search(&[1.0, 0.0], &SearchParams::top(1)),
        Err(Error::DimensionMismatch {
            expected: 4,
            got: 2
        })
    ));
    assert!(matches!(
        Index::open_any(tmp.path().join("missing")),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        Index::open_any(tmp.path()),
        Err(Error::NotFound { .. })
    ));
    // bad input
    assert!(matches!(
        Index::create(
            tmp.path().join("z"),
            embedder(dim),
            HnswParams::default(),
            records(1, 1),
            &[0.0; 4]
        ),
        Err(Error::InvalidVector {
            row: 0,
            problem: VectorProblem::ZeroNorm
        })
    ));
    assert!(matches!(
        Index::create(
            tmp.path().join("z"),
            embedder(dim),
            HnswParams::default(),
            records(2, 1),
            &[1.0; 4]
        ),
        Err(Error::VectorLength {
            chunks: 2,
            got: 4,
            ..
        })
    ));
    assert!(!tmp.path().join("z").exists());
}

/// Every file, every kind of damage: a typed error naming that file.
#[test]
fn corruption_is_detected_and_names_the_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("idx");
    build_small_fs(&dir);
    let names = list(&dir);
    assert!(names.len() >= 7, "two segments + manifest: {names:?}");
    for name in &names {
        let path = dir.join(name);
        let orig = std::fs::read(&path).expect("read");
        let len = orig.len();
        let mut positions = vec![
            0,
            3,
            8,
            12,
            17,
            25,
            33,
            45,
            50,
            61,
            63,
            64,
            70,
            len / 2,
            len - 2,
            len - 1,
        ];
        positions.retain(|&p| p < len);
        for &pos in &positions {
            let mut bad = orig.clone();
            bad[pos] ^= 0x20;
            std::fs::write(&path, &bad).expect("write");
            expect_corrupt(&dir, &path, &format!("flip at {pos}"));
        }
        for cut in [0, 1, 63, 64, len / 2, len - 1] {
            std::fs::write(&path, &orig[..cut.min(len)]).expect("write");
            expect_corrupt(&dir, &path, &format!("truncate to {cut}"));
        }
        // extended
        let mut ext = orig.clone();
        ext.push(0);
        std::fs::write(&path, &ext).expect("write");
        expect_corrupt(&dir, &path, "extended by one byte");
        std::fs::write(&path, &orig).expect("restore");
        Index::open_any(&dir).expect("restored index opens");
    }
    // a missing file is named too
    let victim = names
        .iter()
        .find(|n| n.ends_with(".graph"))
        .expect("graph file");
    std::fs::remove_file(dir.join(victim)).expect("rm");
    expect_corrupt(&dir, &dir.join(victim), "missing file");
}

fn expect_corrupt(dir: &Path, path: &Path, what: &str) {
    match Index::open_any(dir) {
        Err(Error::DataCorruption { path: p, .. })
        | Err(Error::UnsupportedVersion { path: p, .. }) => {
            assert_eq!(p, path, "{what}: wrong file named")
        }
        Err(e) => panic!("{what} in {}: unexpected error {e}", path.display()),
        Ok(_) => panic!("{what} in {}: opened a damaged index", path.display()),
    }
}

#[test]
fn stale_temp_files_and_killed_updates_are_harmless() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("idx");
    build_small_fs(&dir);
    let q = clustered(5, 16, 4, 0.2, 77);
    let before = search_all(&Index::open_any(&dir).expect("open"), &q);

    // Stale temp files, an orphan segment, a half-written manifest, a stale temp dir.
    std::fs::write(
        dir.join("manifest.json.123-0.tmp"),
        b"{\"format_version\": 1, \"gen",
    )
    .expect("w");
    std::fs::write(dir.join("seg-000007.vectors.55-1.tmp"), b"garbage").expect("w");
    std::fs::create_dir(tmp.path().join(".idx.999-3.tmp")).expect("mkdir");
    // A killed `add`: segment files complete, manifest never swapped.
    let copy = tmp.path().join("copy");
    copy_dir(&dir, &copy);
    let mut other = Index::open_any(&copy).expect("open copy");
    other
        .add(records_for_doc("late", 3), &clustered(3, 16, 2, 0.1, 3))
        .expect("add");
    for name in list(&copy) {
        if name.starts_with("seg-") && !dir.join(&name).exists() {
            std::fs::copy(copy.join(&name), dir.join(&name)).expect("cp");
        }
    }
    let ix = Index::open_any(&dir).expect("old index still opens");
    assert_eq!(search_all(&ix, &q), before);
    assert!(ix.doc_ids().expect("docs").iter().all(|d| d != "late"));
    // The next committed update sweeps the orphan segment but keeps working.
    let mut ix = ix;
    ix.add(records_for_doc("later", 2), &clustered(2, 16, 2, 0.1, 4))
        .expect("add");
    let reopened = Index::open_any(&dir).expect("reopen");
    assert_eq!(reopened.len(), ix.len());
    assert!(reopened
        .doc_ids()
        .expect("docs")
        .contains(&"later".to_string()));
}

#[test]
fn add_delete_compact_filter_on_both_directories() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fs: Arc<dyn Directory> = Arc::new(FsDirectory::create(tmp.path().join("fs")).expect("fs"));
    let ram: Arc<dyn Directory> = Arc::new(RamDirectory::new());
    for dir in [fs, ram] {
        lifecycle(dir);
    }
}

fn lifecycle(dir: Arc<dyn Directory>) {
    let dim = 16;
    let n = 1200; // above EXACT_BELOW: the first segment is graph-searched
    let vecs = clustered(n, dim, 12, 0.15, 9);
    let mut ix = Index::create_in(
        dir.clone(),
        embedder(dim),
        HnswParams::default(),
        records(n, 60),
        &vecs,
    )
    .expect("create");
    assert_eq!(ix.len(), n);
    assert_eq!(ix.stats().docs, 60);
    let ids0 = ix.ids().expect("ids");

    // add
    let extra = clustered(30, dim, 3, 0.1, 10);
    ix.add(records_for_doc("new-doc", 30), &extra).expect("add");
    assert_eq!(ix.len(), n + 30);
    assert_eq!(ix.stats().segments, 2);
    let hits = ix
        .search(&extra[..dim], &SearchParams::top(3))
        .expect("search");
    assert_eq!(ix.chunk(hits[0].id).expect("chunk").doc_id, "new-doc");
    assert!(hits[0].id >= n as u64, "added ids are above old ids");

    // filter
    let f = Filter::parse("category=cat-3").expect("filter");
    let hits = ix
        .search(
            &vecs[..dim],
            &SearchParams {
                filter: Some(f.clone()),
                ..SearchParams::top(10)
            },
        )
        .expect("search");
    assert_eq!(hits.len(), 10);
    for h in &hits {
        assert_eq!(ix.chunk(h.id).expect("chunk").metadata["category"], "cat-3");
    }
    // a very selective filter still returns everything that matches
    let f1 = Filter::eq("doc_id", "doc-7").and(Filter::eq("category", "cat-2"));
    let hits = ix
        .search(
            &vecs[..dim],
            &SearchParams {
                filter: Some(f1),
                ..SearchParams::top(1000)
            },
        )
        .expect("search");
    assert_eq!(hits.len(), n / 60);
    assert!(ix
        .search(
            &vecs[..dim],
            &SearchParams {
                filter: Some(Filter::eq("category", "none")),
                ..SearchParams::top(5)
            }
        )
        .expect("s")
        .is_empty());

    // delete
    let before_exact = |ix: &Index, q: &[f32]| {
        ix.search(
            q,
            &SearchParams {
                exact: true,
                ..SearchParams::top(20)
            },
        )
        .expect("s")
    };
    let removed = ix.delete_doc("doc-3").expect("delete");
    assert_eq!(removed, n / 60);
    assert_eq!(ix.delete_doc("doc-3").expect("again"), 0);
    assert_eq!(ix.delete_doc("new-doc").expect("delete new"), 30);
    assert_eq!(ix.len(), n - n / 60);
    assert_eq!(ix.stats().tombstones, n / 60 + 30);
    assert_eq!(ix.stats().docs, 59);
    assert!(!ix.doc_ids().expect("docs").contains(&"doc-3".to_string()));
    let qs = clustered(20, dim, 12, 0.15, 11);
    for q in qs.chunks_exact(dim) {
        for exact in [false, true] {
            for h in ix
                .search(
                    q,
                    &SearchParams {
                        exact,
                        ..SearchParams::top(50)
                    },
                )
                .expect("s")
            {
                let c = ix.chunk(h.id).expect("chunk");
                assert!(c.doc_id != "doc-3" && c.doc_id != "new-doc");
            }
        }
    }
    let deleted_id = ids0
        .iter()
        .copied()
        .find(|&id| id % 60 == 3)
        .expect("an id of doc-3");
    assert!(matches!(
        ix.chunk(deleted_id),
        Err(Error::UnknownChunk { .. })
    ));
    let reopened = Index::open_any_in(dir.clone()).expect("reopen");
    assert_eq!(reopened.len(), ix.len());

    // compact preserves exact results and ids, drops tombstones and old files
    let want: Vec<Vec<u64>> = qs
        .chunks_exact(dim)
        .map(|q| before_exact(&ix, q).iter().map(|h| h.id).collect())
        .collect();
    ix.compact().expect("compact");
    assert_eq!(ix.stats().tombstones, 0);
    assert_eq!(ix.stats().segments, 1);
    assert_eq!(ix.len(), n - n / 60);
    let got: Vec<Vec<u64>> = qs
        .chunks_exact(dim)
        .map(|q| before_exact(&ix, q).iter().map(|h| h.id).collect())
        .collect();
    assert_eq!(got, want);
    let files: Vec<String> = dir
        .list()
        .expect("list")
        .into_iter()
        .filter(|f| f.starts_with("seg-"))
        .collect();
    assert_eq!(files.len(), 4, "{files:?}");
    let reopened = Index::open_in(dir.clone(), &embedder(dim)).expect("reopen");
    assert_eq!(reopened.ids().expect("ids"), ix.ids().expect("ids"));

    // delete everything, compact to empty, search returns nothing, add again works
    for d in ix.doc_ids().expect("docs") {
        ix.delete_doc(&d).expect("delete");
    }
    ix.compact().expect("compact empty");
    assert!(ix.is_empty());
    assert!(ix
        .search(&vecs[..dim], &SearchParams::top(3))
        .expect("s")
        .is_empty());
    ix.add(records_for_doc("phoenix", 2), &extra[..2 * dim])
        .expect("add");
    assert_eq!(Index::open_any_in(dir).expect("reopen").len(), 2);
}

#[test]
fn ram_and_fs_give_identical_files() {
    // The format does not depend on the storage: same chunks -> same chunk/vector files.
    let tmp = tempfile::tempdir().expect("tmp");
    let dim = 8;
    let vecs = clustered(20, dim, 3, 0.1, 21);
    let fs = FsDirectory::create(tmp.path().join("a")).expect("fs");
    let ram = RamDirectory::new();
    Index::create_in(
        Arc::new(fs.clone()),
        embedder(dim),
        HnswParams::default(),
        records(20, 4),
        &vecs,
    )
    .expect("fs");
    Index::create_in(
        Arc::new(ram.clone()),
        embedder(dim),
        HnswParams::default(),
        records(20, 4),
        &vecs,
    )
    .expect("ram");
    for name in ["seg-000001.vectors", "seg-000001.chunks"] {
        assert_eq!(
            &fs.open_read(name).expect("fs")[..],
            &ram.open_read(name).expect("ram")[..]
        );
    }
}

fn search_all(ix: &Index, q: &[f32]) -> Vec<Vec<(u64, u32)>> {
    q.chunks_exact(ix.dim())
        .map(|q| {
            ix.search(q, &SearchParams::top(10))
                .expect("search")
                .iter()
                .map(|h| (h.id, h.score.to_bits()))
                .collect()
        })
        .collect()
}

fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn copy_dir(from: &Path, to: &PathBuf) {
    std::fs::create_dir_all(to).expect("mkdir");
    for name in list(from) {
        std::fs::copy(from.join(&name), to.join(&name)).expect("cp");
    }
}

#[allow(dead_code)]
fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A small index written by format version 1 and committed (`tests/data/golden-v1`), so a
/// format change that can no longer read old files fails here. Regenerate it only on a
/// deliberate format change: `RAGTUNE_WRITE_GOLDEN_INDEX=1 cargo test -p ragtune-index golden`.
#[test]
fn golden_index_of_format_v1_still_opens_and_answers() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden-v1");
    if std::env::var_os("RAGTUNE_WRITE_GOLDEN_INDEX").is_some() {
        let _ = std::fs::remove_dir_all(&golden);
        std::fs::create_dir_all(golden.parent().expect("parent")).expect("mkdir");
        build_small_fs(&golden);
    }
    // Open a copy, so nothing the test does can touch the committed files.
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("ix");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for e in std::fs::read_dir(&golden).expect("golden index is committed") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.join(e.file_name())).expect("copy");
    }
    let ix = Index::open(&dir, &embedder(16)).expect("a v1 index opens");
    // build_small_fs: 40 records over 8 docs + 5 added, doc-1 (5 records) deleted.
    assert_eq!(ix.len(), 40);
    assert_eq!(ix.stats().segments, 2);
    let vecs = clustered(40, 16, 4, 0.2, 42);
    let hits = ix
        .search(
            &vecs[..16],
            &SearchParams {
                k: 3,
                exact: true,
                ..SearchParams::default()
            },
        )
        .expect("search");
    assert_eq!(hits[0].id, 0);
    assert!((hits[0].score - 1.0).abs() < 1e-5);
    let first = ix.chunk(0).expect("chunk 0");
    assert_eq!(first, records(40, 8)[0]);
    let docs: HashSet<String> = ix.doc_ids().expect("docs").into_iter().collect();
    assert!(docs.contains("added") && !docs.contains("doc-1") && docs.len() == 8);

    // Written before lexical search existed: dense search works, lexical finds nothing and
    // says so through `lexical_missing`; `add_lexical` upgrades it without re-embedding.
    assert_eq!(ix.lexical_missing(), 2);
    let lex = SearchParams::top(3);
    assert!(ix
        .search_lexical("chunk 7", &lex)
        .expect("lexical")
        .is_empty());
    let mut ix = ix;
    assert_eq!(ix.add_lexical().expect("upgrade"), 2);
    assert_eq!(ix.lexical_missing(), 0);
    let hits = ix.search_lexical("added", &lex).expect("lexical");
    assert_eq!(hits.len(), 3);
    for h in &hits {
        assert_eq!(ix.chunk(h.id).expect("chunk").doc_id, "added");
    }
    // The upgrade is committed: a fresh open sees it, and a second upgrade does nothing.
    let mut again = Index::open(&dir, &embedder(16)).expect("reopen");
    assert_eq!(again.lexical_missing(), 0);
    assert_eq!(again.add_lexical().expect("noop"), 0);
}

fn licence_like(doc: &str, name: &str, text: &str, category: &str) -> ragtune_index::ChunkRecord {
    ragtune_index::ChunkRecord {
        doc_id: doc.into(),
        chunk: 0,
        start: 0,
        end: text.len() as u64,
        text: text.into(),
        metadata: meta(&[("name", name), ("category", category)]),
    }
}

/// BM25 and identifier matching on both directories, kept consistent through add, delete
/// and compact; filters apply to both; corpus statistics span segments.
#[test]
fn lexical_and_identifier_search_through_updates() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fs: Arc<dyn Directory> = Arc::new(FsDirectory::create(tmp.path().join("ix")).expect("fs"));
    for dir in [fs, Arc::new(RamDirectory::new()) as Arc<dyn Directory>] {
        let recs = vec![
            licence_like("mit", "MIT License", "Permission is hereby granted, free of charge, MIT", "Permissive"),
            licence_like("mit-license-1998", "MIT License 1998", "Permission to use, copy, modify and distribute this software, M.I.T. 1998", "Permissive"),
            licence_like("gpl-2.0-plus", "GPL 2.0 or later", "This program is free software; you can redistribute it under the GNU General Public License version 2 or any later version. SPDX: gpl-2.0-plus", "Copyleft"),
            licence_like("apache-2.0", "Apache License 2.0", "Licensed under the Apache License, Version 2.0 (the License)", "Permissive"),
        ];
        let n = recs.len();
        let vecs = clustered(n, 8, 2, 0.2, 5);
        let mut ix = Index::create_in(dir.clone(), embedder(8), HnswParams::default(), recs, &vecs)
            .expect("create");
        assert_eq!(ix.lexical_missing(), 0);
        let doc = |ix: &Index, h: &ragtune_index::Hit| {
            let d = ix.chunk(h.id).expect("chunk").doc_id;
            assert_eq!(ix.doc_id(h.id).expect("doc_id"), d);
            d
        };
        let p = SearchParams::top(4);

        // An identifier is matched whole; its parts match too.
        let hits = ix
            .search_lexical("licensed as gpl-2.0-plus", &p)
            .expect("lexical");
        assert_eq!(doc(&ix, &hits[0]), "gpl-2.0-plus");
        let hits = ix.search_lexical("Version 2.0", &p).expect("lexical");
        assert_eq!(doc(&ix, &hits[0]), "apache-2.0");
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        assert!(hits.iter().all(|h| h.score > 0.0));
        // Only stop words or punctuation: no lexical hits (the dense list still answers).
        assert!(ix
            .search_lexical("what is the ?!", &p)
            .expect("stop")
            .is_empty());

        // The name found verbatim in the question ranks its document first; a longer name
        // that the question does not contain never matches.
        let fields = vec![("name".to_string(), 1.0), ("doc_id".to_string(), 1.0)];
        let named = ix
            .search_identifiers("What is the SPDX id of the MIT license?", &fields, &p)
            .expect("identifiers");
        assert_eq!(named.len(), 1, "only `mit` is named");
        assert_eq!(doc(&ix, &named[0]), "mit");
        assert!(
            (named[0].score - 3.0).abs() < 1e-6,
            "name (2 words) + id (1 word)"
        );
        let named = ix
            .search_identifiers("Is apache-2.0 permissive?", &fields, &p)
            .expect("identifiers");
        assert_eq!(doc(&ix, &named[0]), "apache-2.0");
        // Fields not asked for are not matched.
        let named = ix
            .search_identifiers("permissive", &[("name".to_string(), 1.0)], &p)
            .expect("identifiers");
        assert!(named.is_empty());

        // Filters apply to both.
        let filtered = SearchParams {
            filter: Some(Filter::eq("category", "Copyleft")),
            ..SearchParams::top(4)
        };
        let hits = ix
            .search_lexical("permission software license", &filtered)
            .expect("lexical");
        assert!(!hits.is_empty());
        assert!(hits.iter().all(|h| doc(&ix, h) == "gpl-2.0-plus"));
        assert!(ix
            .search_identifiers("the MIT License", &fields, &filtered)
            .expect("identifiers")
            .is_empty());

        // Add a segment: its chunks are found, and the idf spans both segments.
        let before = ix.search_lexical("charge", &p).expect("lexical")[0].score;
        ix.add(
            vec![licence_like(
                "zlib",
                "zlib License",
                "free of charge zlib",
                "Permissive",
            )],
            &clustered(1, 8, 1, 0.2, 6),
        )
        .expect("add");
        let hits = ix.search_lexical("zlib", &p).expect("lexical");
        assert_eq!(doc(&ix, &hits[0]), "zlib");
        let after = ix
            .search_lexical("charge", &p)
            .expect("lexical")
            .iter()
            .find(|h| doc(&ix, h) == "mit")
            .expect("mit still found")
            .score;
        assert!(
            after < before,
            "df of `charge` grew from 1 to 2: {after} < {before}"
        );

        // Delete: gone from both lists; compact keeps everything else consistent.
        ix.delete_doc("mit").expect("delete");
        assert!(ix
            .search_lexical("hereby granted", &p)
            .expect("lexical")
            .iter()
            .all(|h| doc(&ix, h) != "mit"));
        assert!(ix
            .search_identifiers("the MIT License", &fields, &p)
            .expect("identifiers")
            .is_empty());
        ix.compact().expect("compact");
        assert_eq!(ix.stats().segments, 1);
        assert_eq!(ix.lexical_missing(), 0);
        let hits = ix.search_lexical("zlib gpl-2.0-plus", &p).expect("lexical");
        let docs: HashSet<String> = hits.iter().map(|h| doc(&ix, h)).collect();
        assert!(
            docs.contains("zlib") && docs.contains("gpl-2.0-plus"),
            "{docs:?}"
        );
        let reopened = Index::open_in(dir.clone(), &embedder(8)).expect("reopen");
        assert_eq!(
            reopened.search_lexical("zlib", &p).expect("lexical"),
            ix.search_lexical("zlib", &p).expect("lexical")
        );
    }
}

/// A segment file truncated in place by another process while an index is open (which breaks
/// the files-are-immutable contract) is reported as corruption by the next search instead of
/// crashing the reader with SIGBUS.
#[test]
fn a_file_truncated_under_an_open_reader_is_an_error_not_a_crash() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("idx");
    let dim = 16;
    let vecs = clustered(2000, dim, 8, 0.2, 9);
    let ix = Index::create(
        &dir,
        embedder(dim),
        HnswParams::default(),
        records(2000, 50),
        &vecs,
    )
    .expect("create");
    let q = &vecs[..dim];
    ix.search(q, &SearchParams::top(5)).expect("search before");
    for ext in ["vectors", "chunks", "lexical"] {
        let name = list(&dir)
            .into_iter()
            .find(|n| n.ends_with(ext))
            .expect("segment file");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(&name))
            .expect("open");
        let len = f.metadata().expect("meta").len();
        // Keep the bytes, shrink the file: the last pages vanish from the map.
        let keep = std::fs::read(dir.join(&name)).expect("read");
        f.set_len(len / 2).expect("truncate");
        let err = match ext {
            "vectors" => ix.search(q, &SearchParams::top(5)).map(|_| ()),
            "chunks" => ix.chunk(1999).map(|_| ()),
            _ => ix
                .search_lexical("chunk", &SearchParams::top(5))
                .map(|_| ()),
        }
        .expect_err("a truncated file is an error");
        assert!(matches!(err, Error::DataCorruption { .. }), "{ext}: {err}");
        assert!(err.to_string().contains("truncated"), "{ext}: {err}");
        std::fs::write(dir.join(&name), &keep).expect("restore");
    }
}

/// A vectors file holding NaN (crafted, with valid checksums: `add` refuses such vectors)
/// never puts that chunk first with a `null` score: it is not a hit at all.
#[test]
fn nan_vectors_in_a_crafted_file_are_never_hits() {
    let dir = RamDirectory::new();
    let shared: Arc<dyn Directory> = Arc::new(dir.clone());
    let dim = 4;
    let vecs = clustered(10, dim, 2, 0.2, 1);
    Index::create_in(
        shared.clone(),
        embedder(dim),
        HnswParams::default(),
        records(10, 5),
        &vecs,
    )
    .expect("create");
    let name = dir
        .list()
        .expect("list")
        .into_iter()
        .find(|n| n.ends_with(".vectors"))
        .expect("vectors");
    let mut b = dir.open_read(&name).expect("read").to_vec();
    let at = ragtune_index::HEADER_LEN + 3 * dim * 4; // row 3
    for i in 0..dim {
        b[at + 4 * i..at + 4 * i + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let crc = crc32fast::hash(&b[ragtune_index::HEADER_LEN..]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32fast::hash(&b[0..60]);
    b[60..64].copy_from_slice(&hcrc.to_le_bytes());
    dir.write_raw(&name, &b);
    let m = dir.open_read(MANIFEST).expect("manifest").to_vec();
    let text = String::from_utf8(m).expect("utf-8");
    let body = &text[..text.rfind("\ncrc32 ").expect("trailer")];
    let mut v: serde_json::Value = serde_json::from_str(body).expect("json");
    v["segments"][0]["vectors"]["crc32"] = crc.into();
    let body = serde_json::to_string_pretty(&v).expect("json");
    let trailer = crc32fast::hash(body.as_bytes());
    dir.write_raw(
        MANIFEST,
        format!("{body}\ncrc32 {trailer:08x}\n").as_bytes(),
    );
    let ix = Index::open_in(shared, &embedder(dim)).expect("opens: the checksums are valid");
    let hits = ix
        .search(&vecs[3 * dim..4 * dim], &SearchParams::top(10))
        .expect("search");
    assert_eq!(hits.len(), 9);
    assert!(
        hits.iter().all(|h| h.id != 3 && h.score.is_finite()),
        "{hits:?}"
    );
}
