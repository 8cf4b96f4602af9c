//! Quick check of the encoder against a golden file, and its throughput on a text file of
//! passages (one per line): `cargo run --release -p ragtune-embed --example golden_check --
//! MODEL_DIR GOLDEN_JSON [PASSAGES_TXT]`. `EMBED_PRECISION` (auto, bf16, int8, f32) and
//! `EMBED_BATCH_TOKENS` override the encoder's options.
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    // EMBED_BATCH_TOKENS overrides the token budget of one forward pass.
    let mut options = ragtune_embed::EncoderOptions::default();
    if let Some(v) = std::env::var("EMBED_BATCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options.max_batch_tokens = v;
    }
    // EMBED_PRECISION: auto, bf16, int8 or f32.
    if let Ok(v) = std::env::var("EMBED_PRECISION") {
        options.precision = v.parse()?;
    }
    let enc = ragtune_embed::SentenceEncoder::load_with(&args[1], options)?;
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(&args[2])?)?;
    for c in golden["cases"].as_array().ok_or("cases")? {
        let text = c["text"].as_str().ok_or("text")?;
        let want: Vec<f32> = c["embedding"]
            .as_array()
            .ok_or("emb")?
            .iter()
            .map(|v| v.as_f64().unwrap_or(0.0) as f32)
            .collect();
        let got = enc.encode(&[text])?;
        let dot: f32 = got.row(0).iter().zip(&want).map(|(a, b)| a * b).sum();
        let max = got
            .row(0)
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!(
            "cos {dot:.7} maxdiff {max:.2e} ids_equal {}",
            enc.token_ids(text)?.len() == c["n_tokens"].as_u64().unwrap_or(0) as usize
        );
    }
    if let Some(p) = args.get(3) {
        let text = std::fs::read_to_string(p)?;
        let passages: Vec<&str> = text.lines().collect();
        let t = Instant::now();
        let mut tokens = 0;
        enc.encode_with_progress(&passages, |b| tokens += b.tokens)?;
        let s = t.elapsed().as_secs_f64();
        println!(
            "{} passages, {} word pieces in {:.2} s: {:.0} wp/s, {:.1} passages/s",
            passages.len(),
            tokens,
            s,
            tokens as f64 / s,
            passages.len() as f64 / s
        );
    }
    Ok(())
}
