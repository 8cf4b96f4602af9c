//! Search QPS at ef 64 (single thread) and open time, on synthetic clustered unit vectors
//! (12,000 x 384 around 300 centres, seeded). Recall@10 against exact search at each measured
//! ef is printed once before timing, so the QPS figure can be read at a known recall.

use std::collections::HashSet;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ragtune_index::synthetic::clustered;
use ragtune_index::{ChunkRecord, EmbedderId, HnswParams, Index, SearchParams};

const N: usize = 12_000;
const DIM: usize = 384;
const QUERIES: usize = 500;
const SPREAD: f32 = 0.15;

fn embedder() -> EmbedderId {
    EmbedderId {
        model: "synthetic".into(),
        model_sha256: String::new(),
        dim: DIM as u32,
        pooling: "mean".into(),
        normalized: true,
    }
}

fn bench(c: &mut Criterion) {
    let vecs = clustered(N, DIM, 300, SPREAD, 1);
    let queries = clustered(QUERIES, DIM, 300, SPREAD, 2);
    let chunks: Vec<ChunkRecord> = (0..N)
        .map(|i| ChunkRecord {
            doc_id: format!("d{}", i / 8),
            chunk: (i % 8) as u32,
            text: format!("chunk {i}"),
            ..Default::default()
        })
        .collect();
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("idx");
    Index::create(&path, embedder(), HnswParams::default(), chunks, &vecs).expect("build");
    let ix = Index::open(&path, &embedder()).expect("open");

    let truth: Vec<HashSet<u64>> = queries
        .chunks_exact(DIM)
        .map(|q| {
            let p = SearchParams {
                exact: true,
                ..SearchParams::top(10)
            };
            ix.search(q, &p)
                .expect("exact")
                .iter()
                .map(|h| h.id)
                .collect()
        })
        .collect();

    let mut g = c.benchmark_group("search");
    g.throughput(Throughput::Elements(QUERIES as u64));
    for ef in [32usize, 64, 96] {
        let p = SearchParams {
            ef_search: Some(ef),
            ..SearchParams::top(10)
        };
        let mut hit = 0usize;
        for (q, t) in queries.chunks_exact(DIM).zip(&truth) {
            hit += ix
                .search(q, &p)
                .expect("search")
                .iter()
                .filter(|h| t.contains(&h.id))
                .count();
        }
        eprintln!(
            "ef {ef}: recall@10 = {:.4}",
            hit as f64 / (10 * QUERIES) as f64
        );
        g.bench_function(format!("hnsw_k10_ef{ef}"), |b| {
            b.iter(|| {
                for q in queries.chunks_exact(DIM) {
                    black_box(ix.search(black_box(q), &p).expect("search"));
                }
            })
        });
    }
    g.throughput(Throughput::Elements(50));
    let p = SearchParams {
        exact: true,
        ..SearchParams::top(10)
    };
    g.bench_function("exact_k10", |b| {
        b.iter(|| {
            for q in queries.chunks_exact(DIM).take(50) {
                black_box(ix.search(black_box(q), &p).expect("search"));
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("open");
    g.bench_function("open_12k_x_384", |b| {
        b.iter(|| black_box(Index::open(&path, &embedder()).expect("open")))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
