//! `ragtune search`.

use std::io::Write;

use ragtune::retrieve::{Query, RetrievalMode, Retriever, SearchResult};
use ragtune_index::Filter;
use serde::Serialize;

use super::{Context, Format};

/// Arguments of `ragtune search`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The query; without it, one query per line is read from stdin.
    query: Option<String>,
    /// Number of chunks to return.
    #[arg(short, long, default_value_t = 5)]
    k: usize,
    /// HNSW ef_search (candidate list size, >= k); default: the index's.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    ef: Option<usize>,
    /// Exact (flat) search instead of HNSW.
    #[arg(long)]
    exact: bool,
    /// Metadata filter, e.g. `category=Copyleft` or `category=Permissive,owner=MIT`.
    #[arg(long)]
    filter: Option<String>,
    /// Which lists to search: `dense` (embeddings), `lexical` (BM25 + identifier matches)
    /// or `hybrid` (all, fused by RRF); default: `[retrieval] mode` of the config, `hybrid`.
    #[arg(long, value_enum)]
    retrieval: Option<RetrievalMode>,
    /// Output format: `text`, for people; `json`, one JSON object per query: `{"hits":
    /// [{"doc_id", "chunk", "score", "text"}]}`.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Serialize)]
struct JsonOut<'a> {
    hits: &'a [ragtune::retrieve::RetrievedChunk],
}

/// Most hits one query may ask for.
const MAX_K: usize = 1000;

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_K).contains(&args.k),
        "-k {} is out of range: ask for 1 to {MAX_K} hits",
        args.k
    );
    if let Some(ef) = args.ef {
        anyhow::ensure!(
            ef >= args.k,
            "--ef {ef} is smaller than -k {}: the candidate list must hold at least k hits \
             (use --ef {} or more)",
            args.k,
            args.k
        );
    }
    let filter = args.filter.as_deref().map(Filter::parse).transpose()?;
    let encoder = ctx.encoder()?;
    let config = ctx.engine_config(None)?;
    ragtune::ingest::ensure_default_index(&config, &ctx.profile, &encoder, &ctx.progress)?;
    // The index's own errors name the path and say what to do; no context on top, which
    // would say it twice.
    let retriever = Retriever::with_encoder(encoder, &ctx.index)?
        .with_profile(config.retrieval, &ctx.profile)?;
    if let Some(notice) = retriever.lexical_notice() {
        ctx.progress.notice(&notice);
    }
    let make_query = |text: &str| Query {
        text: text.to_string(),
        k: args.k,
        ef_search: args.ef,
        filter: filter.clone(),
        exact: args.exact,
        mode: args.retrieval,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match &args.query {
        Some(q) => {
            let result = retriever.search(&make_query(q))?;
            print_result(&mut out, args.format, q, &result)?;
        }
        None => {
            let stdin = std::io::stdin();
            let mut failures = 0usize;
            for input in super::input_lines(stdin.lock()) {
                let input = input?;
                let n = input.number - 1;
                let line = match input.text {
                    Ok(line) => line,
                    Err(e) => {
                        failures += 1;
                        print_error(&mut out, args.format, n + 1, &e)?;
                        continue;
                    }
                };
                let result = if line.trim().is_empty() {
                    eprintln!("line {}: empty query, no hits", n + 1);
                    SearchResult {
                        hits: Vec::new(),
                        embed_ms: 0.0,
                        search_ms: 0.0,
                        mode: retriever.config().mode,
                    }
                } else {
                    match retriever.search(&make_query(&line)) {
                        Ok(r) => r,
                        Err(e) => {
                            failures += 1;
                            print_error(&mut out, args.format, n + 1, &format!("{e:#}"))?;
                            continue;
                        }
                    }
                };
                print_result(&mut out, args.format, &line, &result)?;
                out.flush()?;
            }
            out.flush()?;
            anyhow::ensure!(
                failures == 0,
                "{failures} query line(s) failed (see their error lines)"
            );
        }
    }
    out.flush()?;
    Ok(())
}

/// A failed query line: `{"line": N, "error": "..."}` in JSON (so the output keeps one line
/// per input line), an `error:` line in text; the message also goes to stderr.
fn print_error(
    out: &mut impl Write,
    format: Format,
    line: usize,
    error: &str,
) -> anyhow::Result<()> {
    eprintln!("line {line}: {error}");
    match format {
        Format::Json => {
            let j = serde_json::json!({"line": line, "error": error, "hits": []});
            writeln!(out, "{j}")?;
        }
        Format::Text => writeln!(
            out,
            "line {line}: error: {error}
"
        )?,
    }
    out.flush()?;
    Ok(())
}

fn print_result(
    out: &mut impl Write,
    format: Format,
    query: &str,
    result: &SearchResult,
) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            serde_json::to_writer(&mut *out, &JsonOut { hits: &result.hits })?;
            writeln!(out)?;
        }
        Format::Text => {
            writeln!(out, "query: {query}")?;
            for (i, hit) in result.hits.iter().enumerate() {
                let snippet: String = hit.text.split_whitespace().collect::<Vec<_>>().join(" ");
                let snippet: String = snippet.chars().take(160).collect();
                writeln!(
                    out,
                    "{:>2}. {:.3}  {}#{}  {}",
                    i + 1,
                    hit.score,
                    hit.doc_id,
                    hit.chunk,
                    snippet
                )?;
            }
            writeln!(
                out,
                "({} hits, {}; embed {:.1} ms, search {:.2} ms)\n",
                result.hits.len(),
                result.mode,
                result.embed_ms,
                result.search_ms
            )?;
        }
    }
    Ok(())
}
