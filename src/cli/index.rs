//! `ragtune index`: inspect and maintain an index (info, delete documents, compact).

use std::io::Write;

use ragtune_index::{Index, WriterLock, DEFAULT_LOCK_TIMEOUT};

use super::Context;

/// Arguments of `ragtune index`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Counts, embedder, HNSW parameters and size on disk (JSON).
    Info,
    /// Delete documents by id (tombstones; `compact` reclaims the space).
    Delete {
        /// Document ids (file stems, e.g. license keys).
        #[arg(required = true)]
        doc_ids: Vec<String>,
    },
    /// Rewrite the index into one segment with a fresh graph, dropping deleted chunks.
    Compact,
    /// Add what this version's format has and the index lacks: the lexical (BM25) postings
    /// of indexes built before lexical search, from the stored chunk texts (no re-embedding).
    Upgrade,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    // Updates hold the writer lock from reading the manifest to the commit; `info` only
    // reads. Maintenance does not embed anything, so any embedder's index can be opened.
    let _lock = match args.action {
        Action::Info => None,
        _ => Some(WriterLock::acquire(&ctx.index, DEFAULT_LOCK_TIMEOUT)?),
    };
    let mut index = Index::open_any(&ctx.index)?;
    match args.action {
        Action::Info => {
            let s = index.stats();
            let info = serde_json::json!({
                "path": ctx.index.display().to_string(),
                "chunks": s.chunks,
                "documents": s.docs,
                "segments": s.segments,
                "tombstones": s.tombstones,
                "bytes": s.bytes,
                "dim": index.dim(),
                "embedder": index.embedder(),
                "hnsw": index.params(),
                "segments_without_lexical": index.lexical_missing(),
            });
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
            out.flush()?;
        }
        Action::Delete { doc_ids } => {
            let mut unknown = Vec::new();
            for id in &doc_ids {
                let n = index.delete_doc(id)?;
                if n == 0 {
                    eprintln!("{id}: not in the index");
                    unknown.push(id.as_str());
                } else {
                    eprintln!("{id}: deleted {n} chunks");
                }
            }
            anyhow::ensure!(
                unknown.is_empty(),
                "{} of {} document id(s) are not in the index at {}: {} (`ragtune search` or \
                 `ragtune index info` shows what is there)",
                unknown.len(),
                doc_ids.len(),
                ctx.index.display(),
                unknown.join(", ")
            );
        }
        Action::Upgrade => {
            let n = index.add_lexical()?;
            if n == 0 {
                eprintln!("{}: already up to date", ctx.index.display());
            } else {
                eprintln!(
                    "{}: added lexical postings to {n} segment(s); now {} bytes",
                    ctx.index.display(),
                    index.stats().bytes
                );
            }
        }
        Action::Compact => {
            let before = index.stats();
            index.compact()?;
            let after = index.stats();
            eprintln!(
                "compacted {} segments ({} deleted chunks) into {}: {} -> {} bytes",
                before.segments, before.tombstones, after.segments, before.bytes, after.bytes
            );
        }
    }
    Ok(())
}
