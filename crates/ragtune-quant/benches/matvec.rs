//! Decode-shaped products (one activation row, `t = 1`) of each block format at the shapes of
//! Gemma 3 270M's layers (640 → 2048 and 2048 → 640) and of a 32k-row output matrix, on the
//! rayon pool (`RAYON_NUM_THREADS` sets its size). The throughput is in weight bytes read per
//! second: decode is bound by memory, so this is the figure to compare with the machine's
//! bandwidth. The weights are seeded random blocks with a fixed scale (the kernels' time does
//! not depend on the values).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use ragtune_quant::{QMatrix, QuantFormat, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, QK};

/// `(rows, cols)` of the measured products.
const SHAPES: [(usize, usize); 3] = [(2048, 640), (640, 2048), (32768, 640)];

/// Seeded random blocks of `F` with every scale (and minimum) 0.01.
fn matrix<F: QuantFormat>(rows: usize, cols: usize) -> QMatrix<F> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut bytes: Vec<u8> = (0..rows * cols / QK * F::BYTES)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect();
    let scale = f16::from_f32(0.01).to_le_bytes();
    let fields = if F::HAS_MIN { 2 } else { 1 };
    for block in bytes.chunks_exact_mut(F::BYTES) {
        for k in 0..fields {
            block[2 * k..2 * k + 2].copy_from_slice(&scale);
        }
    }
    QMatrix::from_blocks(rows, cols, &bytes).expect("valid blocks")
}

fn format<F: QuantFormat>(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("matvec/{}", F::NAME));
    for (rows, cols) in SHAPES {
        let w = matrix::<F>(rows, cols);
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0)
            .collect();
        group.throughput(Throughput::Bytes((rows * cols / QK * F::BYTES) as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{rows}x{cols}")),
            &x,
            |b, x| b.iter(|| black_box(w.matmul(black_box(x), 1))),
        );
    }
    group.finish();
}

fn bench(c: &mut Criterion) {
    format::<Q4_0>(c);
    format::<Q4_1>(c);
    format::<Q5_0>(c);
    format::<Q5_1>(c);
    format::<Q8_0>(c);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
