//! Decode speed with and without a LoRA adapter on one loaded model.
//!
//! ```text
//! cargo run --release -p ragtune-generate --example lora_decode -- MODEL.gguf [TOKENS] [RUNS]
//! ```
//!
//! Builds a seeded synthetic adapter (r = 8, lora_alpha = 16, all seven llama projections),
//! then alternates greedy generations of `TOKENS` (default 128) new tokens without and with
//! it, `RUNS` (default 5) times each, with no end-of-generation id so every run decodes the
//! same number of tokens. Prints the median decode tokens/s of each and the slowdown. Set
//! `RAYON_NUM_THREADS` to fix the thread count.

use std::collections::HashMap;

use ragtune_generate::candle_core::{Device, Tensor};
use ragtune_generate::lora::Factor;
use ragtune_generate::{
    read_gguf, ChatMessage, ChatTemplate, GenerateParams, Generator, LlamaModel, LoraAdapter,
    LoraConfig, Sampling, TargetModule, Tokenizer,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: lora_decode MODEL.gguf [TOKENS] [RUNS]")?;
    let tokens: usize = args.get(2).map_or(Ok(128), |s| s.parse())?;
    let runs: usize = args.get(3).map_or(Ok(5), |s| s.parse())?;

    let model = LlamaModel::from_gguf(path)?;
    let tokenizer = Tokenizer::from_gguf(&read_gguf(path)?)?;
    let template = ChatTemplate::from_props(model.props(), &tokenizer)?.ok_or("no template")?;
    let text = template.render(&[ChatMessage::user("What is the MIT license?")], true)?;
    let prompt = tokenizer.encode_prompt(&text)?;
    let adapter = synthetic(&model)?;

    let gen = Generator::new(&model, &tokenizer, &[]);
    let params = GenerateParams {
        max_new_tokens: tokens,
        sampling: Sampling::Greedy,
        ..Default::default()
    };
    let mut cache = model.new_cache(prompt.len() + tokens)?;
    // Warm-up, one of each.
    gen.generate_with(&mut cache, &prompt, &params, None, |_| {})?;
    gen.generate_with(&mut cache, &prompt, &params, Some(&adapter), |_| {})?;
    let (mut base, mut lora) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let g = gen.generate_with(&mut cache, &prompt, &params, None, |_| {})?;
        base.push(g.timings.decode_tok_s);
        let g = gen.generate_with(&mut cache, &prompt, &params, Some(&adapter), |_| {})?;
        lora.push(g.timings.decode_tok_s);
        eprintln!(
            "run {}: no adapter {:.1} tok/s, adapter {:.1} tok/s",
            base.len(),
            base[base.len() - 1],
            g.timings.decode_tok_s
        );
    }
    let (b, l) = (median(&mut base), median(&mut lora));
    println!(
        "prompt {} tokens, {tokens} new tokens, {runs} runs each, threads {}",
        prompt.len(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
    );
    println!("no adapter:   median {b:.1} tok/s  {base:.1?}");
    println!("with adapter: median {l:.1} tok/s  {lora:.1?}");
    println!("slowdown: {:.1}%", (1.0 - l / b) * 100.0);
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A seeded adapter with non-zero `A` and `B` on all seven projections of every layer.
fn synthetic(model: &LlamaModel) -> Result<LoraAdapter, Box<dyn std::error::Error>> {
    let (r, p) = (8, model.props());
    let mut rng = ragtune_util::rng::SplitMix64::new(42);
    let mut uniform =
        |n: usize, amp: f32| -> Vec<f32> { (0..n).map(|_| rng.next_signed_f32() * amp).collect() };
    let mut tensors = HashMap::new();
    for layer in 0..p.block_count {
        for m in TargetModule::ALL {
            let (o, i) = m.dims(p);
            let a = uniform(r * i, 1.0 / (i as f32).sqrt());
            let b = uniform(o * r, 0.02);
            tensors.insert(
                m.tensor_name(layer, Factor::A),
                Tensor::from_vec(a, (r, i), &Device::Cpu)?,
            );
            tensors.insert(
                m.tensor_name(layer, Factor::B),
                Tensor::from_vec(b, (o, r), &Device::Cpu)?,
            );
        }
    }
    let config = LoraConfig::new(r, 16.0, &TargetModule::ALL);
    Ok(LoraAdapter::from_tensors(
        "synthetic",
        config,
        tensors,
        model,
    )?)
}
