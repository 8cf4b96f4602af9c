//! Fuzzing the index loaders with proptest (cargo-fuzz needs a nightly toolchain, which this
//! project's machines do not have): *crafted* files, whose checksums are fixed up after the
//! damage so that the structural validators (offset tables, ids, graph links, postings), not
//! only the crc32 checks, see the bytes. Opening must give a typed error or an index whose
//! every search and lookup returns without panicking.
//!
//! `PROPTEST_CASES` sets the number of cases (default 256 per target); `.ci/run` runs them
//! with the rest of the tests.

#[allow(dead_code)]
mod util;

use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use ragtune_index::synthetic::clustered;
use ragtune_index::{
    Directory, HnswParams, Index, RamDirectory, SearchParams, HEADER_LEN, MANIFEST,
};
use util::*;

/// The files of a small two-segment index with tombstones and metadata.
fn base_files() -> &'static Vec<(String, Vec<u8>)> {
    static FILES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = RamDirectory::new();
        let shared: Arc<dyn Directory> = Arc::new(dir.clone());
        let dim = 8;
        let mut ix = Index::create_in(
            shared,
            embedder(dim),
            HnswParams::default(),
            records(1200, 30),
            &clustered(1200, dim, 6, 0.2, 3),
        )
        .expect("create");
        ix.add(records_for_doc("added", 4), &clustered(4, dim, 2, 0.2, 4))
            .expect("add");
        ix.delete_doc("doc-3").expect("delete");
        let mut names = dir.list().expect("list");
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let b = dir.open_read(&n).expect("read").to_vec();
                (n, b)
            })
            .collect()
    })
}

/// Recomputes the payload and header crc32 of a binary file in place.
fn fix_header(file: &mut [u8]) {
    if file.len() < HEADER_LEN {
        return;
    }
    let payload_len = (file.len() - HEADER_LEN) as u64;
    file[16..24].copy_from_slice(&payload_len.to_le_bytes());
    let crc = crc32fast::hash(&file[HEADER_LEN..]);
    file[24..28].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32fast::hash(&file[0..60]);
    file[60..64].copy_from_slice(&hcrc.to_le_bytes());
}

/// Writes `manifest` (JSON) with a valid trailer.
fn encode_manifest(m: &serde_json::Value) -> Vec<u8> {
    let body = serde_json::to_string_pretty(m).expect("json");
    let crc = crc32fast::hash(body.as_bytes());
    format!("{body}\ncrc32 {crc:08x}\n").into_bytes()
}

/// Points the manifest's entry for `name` at the new length and crc of `file`.
fn fix_manifest_entry(m: &mut serde_json::Value, name: &str, file: &[u8]) {
    let crc = if file.len() >= HEADER_LEN {
        crc32fast::hash(&file[HEADER_LEN..])
    } else {
        0
    };
    for seg in m["segments"].as_array_mut().into_iter().flatten() {
        for kind in ["vectors", "graph", "chunks", "lexical"] {
            if seg[kind]["name"] == name {
                seg[kind]["len"] = file.len().into();
                seg[kind]["crc32"] = crc.into();
            }
        }
    }
}

/// Opens the damaged directory and exercises every read path; panics are the failures.
fn exercise(dir: RamDirectory) {
    let Ok(ix) = Index::open_any_in(Arc::new(dir)) else {
        return;
    };
    let q = clustered(1, 8, 1, 0.2, 11);
    for exact in [false, true] {
        let p = SearchParams {
            k: 5,
            exact,
            ..SearchParams::default()
        };
        let _ = ix.search(&q, &p);
    }
    let p = SearchParams::top(5);
    let _ = ix.search_lexical("chunk 17 doc added", &p);
    let fields = vec![("doc_id".to_string(), 1.0), ("category".to_string(), 1.0)];
    let _ = ix.search_identifiers("doc-4 cat-2 added", &fields, &p);
    let _ = ix.search_fields("doc 4 cat 2", &fields, &p);
    if let Ok(ids) = ix.ids() {
        for id in ids.into_iter().take(50) {
            let _ = ix.chunk(id);
            let _ = ix.vector(id);
        }
    }
    let _ = ix.doc_ids();
    let _ = ix.metadata_keys();
}

#[derive(Debug, Clone)]
enum Damage {
    /// XOR a byte of the payload.
    Flip { at: usize, mask: u8 },
    /// Overwrite an aligned u32 of the payload (an offset, a count, an id, a link).
    Word { at: usize, value: u32 },
    /// Cut the file at `at` (header kept).
    Truncate { at: usize },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Damage::Flip { at, mask }),
        (
            any::<usize>(),
            prop_oneof![Just(0u32), Just(u32::MAX), Just(1), any::<u32>()]
        )
            .prop_map(|(at, value)| Damage::Word { at, value }),
        any::<usize>().prop_map(|at| Damage::Truncate { at }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    /// A segment file (vectors, graph, chunk store or lexical postings) crafted with valid
    /// checksums.
    #[test]
    fn crafted_segment_files_never_panic(file_ix in any::<usize>(), d in damage()) {
        let files = base_files();
        let segs: Vec<usize> = (0..files.len()).filter(|&i| files[i].0 != MANIFEST).collect();
        let target = segs[file_ix % segs.len()];
        let dir = RamDirectory::new();
        let mut manifest: serde_json::Value = {
            let m = &files.iter().find(|f| f.0 == MANIFEST).expect("manifest").1;
            let text = std::str::from_utf8(m).expect("utf-8");
            serde_json::from_str(&text[..text.rfind("\ncrc32 ").expect("trailer")]).expect("json")
        };
        for (i, (name, bytes)) in files.iter().enumerate() {
            if name == MANIFEST {
                continue;
            }
            let mut b = bytes.clone();
            if i == target {
                let payload = b.len() - HEADER_LEN;
                match d {
                    Damage::Flip { at, mask } if payload > 0 => b[HEADER_LEN + at % payload] ^= mask,
                    Damage::Word { at, value } if payload >= 4 => {
                        let w = HEADER_LEN + (at % (payload / 4)) * 4;
                        b[w..w + 4].copy_from_slice(&value.to_le_bytes());
                    }
                    Damage::Truncate { at } => b.truncate(HEADER_LEN + at % (payload + 1)),
                    _ => {}
                }
                fix_header(&mut b);
                fix_manifest_entry(&mut manifest, name, &b);
            }
            dir.write_raw(name, &b);
        }
        dir.write_raw(MANIFEST, &encode_manifest(&manifest));
        exercise(dir);
    }

    /// The manifest crafted with a valid trailer: numbers, names and lists changed.
    #[test]
    fn crafted_manifests_never_panic(
        field in prop_oneof![
            Just("next_id"), Just("live_chunks"), Just("dim"), Just("next_segment"),
            Just("generation"), Just("tombstones"), Just("segments")
        ],
        value in prop_oneof![
            any::<u64>().prop_map(serde_json::Value::from),
            Just(serde_json::Value::from(0)),
            Just(serde_json::json!([])),
            Just(serde_json::json!([0, 0])),
            Just(serde_json::json!([u64::MAX])),
            Just(serde_json::json!("x")),
        ],
        seg_field in prop_oneof![Just("rows"), Just("seg"), Just("none")],
        seg_value in any::<u64>(),
    ) {
        let files = base_files();
        let dir = RamDirectory::new();
        for (name, bytes) in files {
            dir.write_raw(name, bytes);
        }
        let m = &files.iter().find(|f| f.0 == MANIFEST).expect("manifest").1;
        let text = std::str::from_utf8(m).expect("utf-8");
        let mut manifest: serde_json::Value =
            serde_json::from_str(&text[..text.rfind("\ncrc32 ").expect("trailer")]).expect("json");
        manifest[field] = value;
        if seg_field != "none" {
            if let Some(s) = manifest["segments"].get_mut(0).and_then(|s| s.as_object_mut()) {
                s.insert(seg_field.to_string(), seg_value.into());
            }
        }
        dir.write_raw(MANIFEST, &encode_manifest(&manifest));
        exercise(dir);
    }

    /// Arbitrary bytes as any index file, checksums fixed up.
    #[test]
    fn random_bytes_as_files_never_panic(name_ix in any::<usize>(), bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let files = base_files();
        let dir = RamDirectory::new();
        let target = name_ix % files.len();
        for (i, (name, b)) in files.iter().enumerate() {
            if i == target {
                let mut mine = b[..HEADER_LEN.min(b.len())].to_vec();
                mine.extend_from_slice(&bytes);
                if name == MANIFEST {
                    mine = bytes.clone();
                } else {
                    fix_header(&mut mine);
                }
                dir.write_raw(name, &mine);
            } else {
                dir.write_raw(name, b);
            }
        }
        exercise(dir);
    }

    /// Chunk records and the analyzer on arbitrary input.
    #[test]
    fn record_decoding_and_analysis_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), text in "\\PC{0,200}") {
        let _ = ragtune_index::decode_record(&bytes);
        let terms = ragtune_index::lexical::analyze_to_vec(&text);
        prop_assert!(terms.iter().all(|t| !t.is_empty()));
        let _ = ragtune_index::lexical::phrase_tokens(&text);
        let _ = ragtune_index::Filter::parse(&text);
    }
}
