//! Prints recall@10 and single-thread QPS against ef on synthetic clustered vectors.
//!
//! `cargo run -p ragtune-index --release --example recall -- [n] [dim] [centres] [spread]`

use std::collections::HashSet;
use std::time::Instant;

use ragtune_index::synthetic::clustered;
use ragtune_index::{ChunkRecord, EmbedderId, HnswParams, Index, SearchParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: f64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n, dim, centres, spread) = (
        arg(1, 11836.0) as usize,
        arg(2, 384.0) as usize,
        arg(3, 300.0) as usize,
        arg(4, 0.05) as f32,
    );
    let vecs = clustered(n, dim, centres, spread, 1);
    let queries = clustered(1000, dim, centres, spread, 2);
    let chunks: Vec<ChunkRecord> = (0..n)
        .map(|i| ChunkRecord {
            doc_id: format!("d{}", i / 10),
            chunk: i as u32,
            text: format!("t{i}"),
            ..Default::default()
        })
        .collect();
    let embedder = EmbedderId {
        model: "synthetic".into(),
        model_sha256: String::new(),
        dim: dim as u32,
        pooling: "mean".into(),
        normalized: true,
    };
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("idx");
    let t = Instant::now();
    Index::create(
        &path,
        embedder.clone(),
        HnswParams::default(),
        chunks,
        &vecs,
    )?;
    println!("build {n} x {dim}: {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let reps = 20;
    for _ in 0..reps {
        let ix = Index::open(&path, &embedder)?;
        std::hint::black_box(ix.len());
    }
    println!(
        "open: {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
    let ix = Index::open(&path, &embedder)?;
    let truth: Vec<HashSet<u64>> = queries
        .chunks_exact(dim)
        .map(|q| {
            ix.search(
                q,
                &SearchParams {
                    exact: true,
                    ..SearchParams::top(10)
                },
            )
            .map(|h| h.iter().map(|h| h.id).collect())
        })
        .collect::<Result<_, _>>()?;
    for ef in [10, 16, 24, 32, 48, 64, 96, 128, 200] {
        let p = SearchParams {
            ef_search: Some(ef),
            ..SearchParams::top(10)
        };
        let mut hit = 0;
        let t = Instant::now();
        let mut res = Vec::with_capacity(truth.len());
        for q in queries.chunks_exact(dim) {
            res.push(ix.search(q, &p)?);
        }
        let secs = t.elapsed().as_secs_f64();
        for (r, tr) in res.iter().zip(&truth) {
            hit += r.iter().filter(|h| tr.contains(&h.id)).count();
        }
        println!(
            "ef {ef:4}: recall@10 {:.4}  {:8.0} q/s",
            hit as f64 / (10.0 * truth.len() as f64),
            truth.len() as f64 / secs
        );
    }
    Ok(())
}
