//! `ragtune precompute-blocks`: the chunk blocks of block attention (prompt format v2),
//! computed ahead and written next to the index (`Engine::precompute_blocks`).

use std::collections::BTreeSet;

use anyhow::Context as _;
use ragtune::engine::{block_store_dir, Mode};
use ragtune::retrieve::RetrievedChunk;

use super::{Context, Format};

/// Arguments of `ragtune precompute-blocks`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The chunks of these documents (repeatable). Default: every document's metadata
    /// record when the profile has records (the LicenseDB's), else every chunk.
    #[arg(long = "doc", value_name = "DOC_ID")]
    docs: Vec<String>,
    /// Every chunk of the index (22,836 for the LicenseDB: well over 100 GB per source number).
    #[arg(long, conflicts_with = "docs")]
    all: bool,
    /// At most this many chunks, in index order.
    #[arg(long)]
    limit: Option<usize>,
    /// Source numbers to compute each chunk for, 1 to K (a block holds its number `[n]`)
    /// [default: the engine's k].
    #[arg(short, long)]
    k: Option<usize>,
    /// The mode whose blocks to compute: hybrid (with the adapter) or rag (the base model).
    #[arg(long, default_value = "hybrid")]
    mode: String,
    /// The adapter of hybrid: a configured name, or a directory to load [default: the
    /// configured default adapter].
    #[arg(long)]
    adapter: Option<String>,
    /// `text`: a summary; `json`: the report as one JSON object.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// The chunks `args` selects from the index of `engine`, as prompt sources.
fn select(engine: &ragtune::engine::Engine, args: &Args) -> anyhow::Result<Vec<RetrievedChunk>> {
    let retriever = engine.retriever();
    let index = retriever.index();
    let records = engine.profile().record.is_some();
    let wanted: BTreeSet<&str> = args.docs.iter().map(String::as_str).collect();
    let mut chunks = Vec::new();
    let mut found = BTreeSet::new();
    for id in index.ids()? {
        if args.limit.is_some_and(|n| chunks.len() >= n) {
            break;
        }
        let c = index.chunk(id)?;
        let keep = if !wanted.is_empty() {
            wanted.contains(c.doc_id.as_str())
        } else {
            args.all || !records || c.chunk == 0
        };
        if keep {
            found.insert(c.doc_id.clone());
            chunks.push(RetrievedChunk::from_record(c, 0.0));
        }
    }
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|d| !found.contains(**d))
        .copied()
        .collect();
    if !missing.is_empty() && args.limit.is_none() {
        anyhow::bail!(
            "no such document in {}: {} (`ragtune search` finds doc ids)",
            engine.index_dir().display(),
            missing.join(", ")
        );
    }
    Ok(chunks)
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let mode: Mode = args.mode.parse()?;
    if !mode.uses_retrieval() {
        anyhow::bail!("--mode {mode}: blocks are for the retrieval modes, hybrid or rag");
    }
    let engine = ctx.engine(args.adapter.as_deref())?;
    let adapter =
        if mode.uses_adapter() {
            Some(engine.config().default_adapter.clone().context(
                "hybrid needs an adapter: pass --adapter, or --mode rag for the base model",
            )?)
        } else {
            None
        };
    let chunks = select(&engine, &args)?;
    let k = args.k.unwrap_or(engine.config().k);
    ctx.progress.notice(&format!(
        "{} chunks x {k} source numbers, {} ({})",
        chunks.len(),
        adapter
            .as_deref()
            .map_or("base model".to_string(), |a| format!("adapter `{a}`")),
        mode
    ));
    let report = engine.precompute_blocks(&chunks, k, adapter.as_deref(), &ctx.progress)?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => {
            let per = |x: u64, n: usize| if n == 0 { 0.0 } else { x as f64 / n as f64 };
            println!(
                "{} blocks of {} chunks: {} computed ({} positions), {} already stored",
                report.blocks,
                report.chunks,
                report.written,
                report.positions,
                report.already_stored
            );
            let dir = block_store_dir(engine.index_dir());
            if report.written == 0 {
                println!(
                    "nothing to write: every block is already in {} ({:.1} s)",
                    dir.display(),
                    report.seconds
                );
            } else {
                println!(
                    "wrote {:.1} MB in {} segment(s) to {} in {:.1} s ({:.0} bytes per \
                     position, {:.2} MB per block)",
                    report.bytes_written as f64 / 1e6,
                    report.segments.len(),
                    dir.display(),
                    report.seconds,
                    per(report.bytes_written, report.positions),
                    per(report.bytes_written, report.written) / 1e6,
                );
            }
            if report.removed_stale > 0 {
                println!("removed {} stale segment(s)", report.removed_stale);
            }
        }
    }
    if !engine.config().block_attention {
        ctx.progress.notice(
            "the blocks are read when block attention is on: `--block-attention`, or \
             `block_attention = true` in ragtune.toml",
        );
    }
    Ok(())
}
