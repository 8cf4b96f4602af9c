//! `ragtune finetune-data`: the LicenseDB fine-tuning data (chat JSON Lines) for the trainer.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use ragtune::licensedb::train_data::{self, DataOptions};

use super::Context;

/// Arguments of `ragtune finetune-data`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output folder: train.jsonl, dev.jsonl and stats.json are written (atomically) into it.
    #[arg(long, default_value = "data/licenses")]
    out: PathBuf,
    /// The folder of license files (default: the pinned LicenseDB's licenses, fetched if
    /// missing). The index (--index) must have been built from it.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Seed of every choice; the same corpus, index and seed give identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use only the first N seen licenses (in the benchmark's order); default: all.
    #[arg(long)]
    max_licenses: Option<usize>,
    /// Retrieval-augmented examples per license.
    #[arg(long, default_value_t = DataOptions::default().rag_per_license)]
    rag_per_license: usize,
    /// Closed-book wordings per fact (at most 4).
    #[arg(long, default_value_t = DataOptions::default().closed_per_fact)]
    closed_per_fact: usize,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let corpus = match &args.corpus {
        Some(dir) => dir.clone(),
        None => ctx.default_corpus()?,
    };
    let options = DataOptions {
        seed: args.seed,
        max_licenses: args.max_licenses,
        rag_per_license: args.rag_per_license,
        closed_per_fact: args.closed_per_fact,
        ..DataOptions::default()
    };
    let dataset = train_data::generate_from(
        &corpus,
        &ctx.embedder_dir()?,
        &ctx.index,
        &options,
        &ctx.progress,
    )?;
    train_data::write_dataset(&dataset, &args.out)
        .with_context(|| format!("writing the dataset into {}", args.out.display()))?;

    let s = &dataset.stats;
    eprintln!(
        "{} seen licenses of {} ({} fresh left out): {} in train, {} in dev",
        s.licenses.selected, s.licenses.corpus, s.licenses.fresh, s.licenses.train, s.licenses.dev
    );
    let kinds: std::collections::BTreeSet<&String> =
        s.examples.values().flat_map(|m| m.keys()).collect();
    eprintln!("{:<20} {:>8} {:>8}", "kind", "train", "dev");
    for kind in kinds {
        let n = |split: &str| s.examples.get(split).and_then(|m| m.get(kind)).copied();
        eprintln!(
            "{kind:<20} {:>8} {:>8}",
            n("train").unwrap_or(0),
            n("dev").unwrap_or(0)
        );
    }
    let tokens = |split: &str| s.approx_tokens.get(split).copied().unwrap_or(0);
    eprintln!(
        "approx. tokens (chars/4): {} train, {} dev",
        tokens("train"),
        tokens("dev")
    );
    let k = &s.skipped;
    eprintln!(
        "skipped: {} ambiguous facts, {} examples mentioning a fresh license, {} without a \
         metadata record in the index, {} with too few sources; {} retrieval hits of fresh \
         licenses and {} mentioning one passed over",
        k.ambiguous_facts,
        k.fresh_mentions,
        k.no_metadata_record,
        k.too_few_sources,
        k.fresh_hits,
        k.fresh_mention_hits
    );
    eprintln!(
        "wrote {0}/train.jsonl, {0}/dev.jsonl and {0}/stats.json in {1:.1} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
