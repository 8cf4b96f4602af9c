//! The ANN benchmark on real vectors, measured the way `benches/anchors/ann_anchor.py`
//! measures hnswlib/faiss/usearch: M = 16, ef_construction = 200, k = 10, recall@10 against
//! exact inner-product top-10, the same ef sweep, QPS of 1,000 queries on one thread
//! (repeated for >= 0.5 s, median of 5), open time (median of 5, file in the page cache).
//!
//! ```text
//! cargo run --release -p ragtune-index --example ann_bench -- BASE QUERIES.npy [--export-base OUT.npy]
//! ```
//! BASE is a float32 `(n, dim)` `.npy` file, or an index directory whose live vectors are used
//! (and written to `--export-base` so other libraries can index the same vectors). Prints one
//! JSON object.

use std::path::Path;
use std::time::Instant;

use ragtune_index::{ChunkRecord, EmbedderId, HnswParams, Index, SearchParams};

const EF_SWEEP: &[usize] = &[
    10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512,
];

fn read_npy(path: &Path) -> Result<(Vec<f32>, usize, usize), Box<dyn std::error::Error>> {
    let bytes = std::fs::read(path)?;
    if !bytes.starts_with(b"\x93NUMPY") {
        return Err(format!("{} is not a .npy file", path.display()).into());
    }
    let (hlen, start) = if bytes[6] == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        )
    };
    let header = std::str::from_utf8(&bytes[start..start + hlen])?;
    if !header.contains("'<f4'") || header.contains("'fortran_order': True") {
        return Err(format!(
            "{}: need little-endian float32 in C order, got {header}",
            path.display()
        )
        .into());
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or("no shape")?;
    let dims: Vec<usize> = shape
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let data: Vec<f32> = bytes[start + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((data, dims[0], dims[1]))
}

fn write_npy(path: &Path, data: &[f32], rows: usize, cols: usize) -> std::io::Result<()> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    data.iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    std::fs::write(path, out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let base = Path::new(
        args.get(1)
            .ok_or("usage: ann_bench BASE QUERIES.npy [--export-base OUT.npy]")?,
    );
    let (p, n, dim) = if base.is_dir() {
        let ix = Index::open_any(base)?;
        let ids = ix.ids()?;
        let mut data = Vec::with_capacity(ids.len() * ix.dim());
        for id in &ids {
            data.extend(ix.vector(*id)?);
        }
        (data, ids.len(), ix.dim())
    } else {
        read_npy(base)?
    };
    if let Some(i) = args.iter().position(|a| a == "--export-base") {
        write_npy(Path::new(&args[i + 1]), &p, n, dim)?;
    }
    let (q, nq, qdim) = read_npy(Path::new(args.get(2).ok_or("missing QUERIES.npy")?))?;
    assert_eq!(dim, qdim, "base and queries differ in dimension");

    let embedder = EmbedderId {
        model: "bench".into(),
        model_sha256: String::new(),
        dim: dim as u32,
        pooling: "mean".into(),
        normalized: true,
    };
    let chunks: Vec<ChunkRecord> = (0..n)
        .map(|i| ChunkRecord {
            doc_id: format!("d{i}"),
            text: String::new(),
            ..Default::default()
        })
        .collect();
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("ix");
    let t = Instant::now();
    let params = HnswParams {
        m: 16,
        ef_construction: 200,
        ef_search: 64,
    };
    drop(Index::create(&path, embedder.clone(), params, chunks, &p)?);
    let build_s = t.elapsed().as_secs_f64();
    let open_ms = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let ix = Index::open(&path, &embedder).expect("open");
                let ms = t.elapsed().as_secs_f64() * 1e3;
                drop(ix);
                ms
            })
            .collect(),
    );
    let ix = Index::open(&path, &embedder)?;
    let queries: Vec<&[f32]> = q.chunks(dim).collect();
    let truth: Vec<Vec<u64>> = queries
        .iter()
        .map(|v| {
            ix.search(
                v,
                &SearchParams {
                    k: 10,
                    exact: true,
                    ..SearchParams::default()
                },
            )
            .map(|h| h.into_iter().map(|h| h.id).collect())
        })
        .collect::<Result<_, _>>()?;
    let run = |ef: usize| -> Vec<Vec<u64>> {
        queries
            .iter()
            .map(|v| {
                ix.search(
                    v,
                    &SearchParams {
                        k: 10,
                        ef_search: Some(ef),
                        ..SearchParams::default()
                    },
                )
                .expect("search")
                .into_iter()
                .map(|h| h.id)
                .collect()
            })
            .collect()
    };
    let recall = |got: &[Vec<u64>]| -> f64 {
        let hit: usize = got
            .iter()
            .zip(&truth)
            .map(|(g, t)| g.iter().filter(|id| t.contains(id)).count())
            .sum();
        hit as f64 / (truth.len() * 10) as f64
    };
    let sweep: Vec<(usize, f64)> = EF_SWEEP.iter().map(|&ef| (ef, recall(&run(ef)))).collect();
    let qps = |ef: usize| -> f64 {
        median(
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    let mut reps = 0;
                    while t.elapsed().as_secs_f64() < 0.5 {
                        std::hint::black_box(run(ef));
                        reps += 1;
                    }
                    (reps * nq) as f64 / t.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    let mut targets = Vec::new();
    for target in [0.95, 0.99] {
        if let Some(&(ef, r)) = sweep.iter().find(|(_, r)| *r >= target) {
            run(ef);
            targets.push(format!(
                "\"{target}\": {{\"ef\": {ef}, \"recall@10\": {r:.4}, \"qps_1t\": {:.0}}}",
                qps(ef)
            ));
        }
    }
    let exact_qps = {
        let t = Instant::now();
        for v in &queries {
            std::hint::black_box(ix.search(
                v,
                &SearchParams {
                    k: 10,
                    exact: true,
                    ..SearchParams::default()
                },
            )?);
        }
        nq as f64 / t.elapsed().as_secs_f64()
    };
    let stats = ix.stats();
    println!(
        "{{\"n\": {n}, \"dim\": {dim}, \"queries\": {nq}, \"build_s\": {build_s:.2}, \"open_ms\": {open_ms:.2}, \"disk_mib\": {:.2}, \"exact_qps_1t\": {exact_qps:.0}, \"at_recall\": {{{}}}, \"sweep\": [{}]}}",
        stats.bytes as f64 / 1048576.0,
        targets.join(", "),
        sweep.iter().map(|(ef, r)| format!("{{\"ef\": {ef}, \"recall@10\": {r:.4}}}")).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}
