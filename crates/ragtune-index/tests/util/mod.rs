//! Shared helpers for the integration tests.

use std::path::Path;

use ragtune_index::synthetic::clustered;
use ragtune_index::{ChunkRecord, EmbedderId, HnswParams, Index};

/// A test embedder of dimension `dim`.
pub fn embedder(dim: usize) -> EmbedderId {
    EmbedderId {
        model: "test-model".into(),
        model_sha256: "abc123".into(),
        dim: dim as u32,
        pooling: "mean".into(),
        normalized: true,
    }
}

/// `n` records spread round-robin over `docs` documents (`doc-{i % docs}`), with metadata
/// `category = cat-{i % 5}`; unicode in the text.
pub fn records(n: usize, docs: usize) -> Vec<ChunkRecord> {
    (0..n)
        .map(|i| ChunkRecord {
            doc_id: format!("doc-{}", i % docs),
            chunk: (i / docs) as u32,
            start: (i as u64) * 100,
            end: (i as u64) * 100 + 99,
            text: format!("chunk {i} – ünïcødé ✓"),
            metadata: [("category".to_string(), format!("cat-{}", i % 5))]
                .into_iter()
                .collect(),
        })
        .collect()
}

/// `n` records of one document.
pub fn records_for_doc(doc: &str, n: usize) -> Vec<ChunkRecord> {
    (0..n)
        .map(|i| ChunkRecord {
            doc_id: doc.into(),
            chunk: i as u32,
            start: 0,
            end: 1,
            text: format!("{doc} {i}"),
            metadata: Default::default(),
        })
        .collect()
}

/// A small on-disk index with two segments and tombstones (16-d).
pub fn build_small_fs(dir: &Path) {
    let dim = 16;
    let vecs = clustered(40, dim, 4, 0.2, 42);
    let mut ix = Index::create(
        dir,
        embedder(dim),
        HnswParams::default(),
        records(40, 8),
        &vecs,
    )
    .expect("create");
    ix.add(records_for_doc("added", 5), &clustered(5, dim, 2, 0.2, 43))
        .expect("add");
    ix.delete_doc("doc-1").expect("delete");
}
