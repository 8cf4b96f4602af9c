//! `ragtune ingest`.

use std::path::PathBuf;

use ragtune::ingest::{ingest, IngestOptions};
use ragtune_embed::ChunkParams;

use super::Context;

/// Arguments of `ragtune ingest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder of documents (.LICENSE/.RULE/.md/.txt) or one file; default: the profile's
    /// pinned corpus (the LicenseDB licenses).
    path: Option<PathBuf>,
    /// Chunk size in word pieces of the embedder's tokenizer.
    #[arg(long, default_value_t = ChunkParams::default().max_tokens)]
    chunk_tokens: usize,
    /// Word pieces shared by consecutive chunks.
    #[arg(long, default_value_t = ChunkParams::default().overlap_tokens)]
    overlap_tokens: usize,
    /// Also index the documents that the profile's skip rules leave out (for the LicenseDB:
    /// licenses marked `is_deprecated: yes`).
    #[arg(long, alias = "include-deprecated")]
    include_skipped: bool,
    /// Add the documents to the existing index (replacing documents with the same id)
    /// instead of rebuilding it.
    #[arg(long)]
    add: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let corpus = match args.path {
        Some(p) => p,
        None => ctx.default_corpus()?,
    };
    let encoder = ctx.encoder()?;
    let mut options = IngestOptions {
        chunk: ChunkParams {
            max_tokens: args.chunk_tokens,
            overlap_tokens: args.overlap_tokens,
        },
        add: args.add,
        ..IngestOptions::for_profile(&ctx.profile)
    };
    if args.include_skipped {
        options.corpus.skip.clear();
    }
    if options.chunk.max_tokens + 2 > encoder.max_seq_len() {
        anyhow::bail!(
            "--chunk-tokens {} does not fit the encoder's window of {} word pieces ([CLS] and [SEP] included): use at most {}",
            options.chunk.max_tokens,
            encoder.max_seq_len(),
            encoder.max_seq_len() - 2
        );
    }
    let report = ingest(&encoder, &corpus, &ctx.index, &options, &ctx.progress)?;
    for s in &report.skipped {
        eprintln!("skipped {}: {}", s.path.display(), s.reason);
    }
    eprintln!(
        "indexed {} documents as {} chunks ({} word pieces) into {} in {:.1} s (embedding {:.1} s = {:.0} word pieces/s with the {} encoder, index {:.1} s); {} files skipped",
        report.documents,
        report.chunks,
        report.tokens,
        ctx.index.display(),
        report.total_secs,
        report.embed_secs,
        report.tokens as f64 / report.embed_secs.max(1e-9),
        encoder.precision(),
        report.index_secs,
        report.skipped.len()
    );
    Ok(())
}
