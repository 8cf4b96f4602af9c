//! `ragtune ask`: one question (or one per stdin line) through the engine.

use std::io::Write;

use anyhow::Context as _;
use ragtune::engine::{Answer, Engine, Mode, Request};
use ragtune_generate::Sampling;
use ragtune_index::Filter;
use serde::Serialize;

use super::{Context, Format};

/// Options shared by `ask` and `chat`: how each question is answered.
#[derive(Debug, Clone, clap::Args)]
pub struct AnswerArgs {
    /// hybrid (adapter + retrieval), rag, finetune (adapter only) or base. Default: hybrid
    /// when an adapter is configured, else rag.
    #[arg(long)]
    pub mode: Option<String>,
    /// Sources to retrieve (retrieval modes).
    #[arg(short, long)]
    pub k: Option<usize>,
    /// Metadata filter on the sources, e.g. `category=Copyleft`.
    #[arg(long)]
    pub filter: Option<String>,
    /// How sources are found: dense, lexical or hybrid (default: `[retrieval] mode`, hybrid).
    #[arg(long, value_enum)]
    pub retrieval: Option<ragtune::retrieve::RetrievalMode>,
    /// The adapter of hybrid/finetune: a configured name, or a directory to load.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Sampling temperature, a finite number >= 0; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = super::parse_temperature)]
    pub temperature: f32,
    /// Generated tokens at most (default: the configuration's, 128).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Seed of the sampler (with --temperature > 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl AnswerArgs {
    /// The mode to use with `engine`.
    pub fn mode(&self, engine: &Engine) -> anyhow::Result<Mode> {
        Ok(match &self.mode {
            Some(m) => m.parse()?,
            None => default_mode(engine),
        })
    }

    /// A request for `question`.
    pub fn request(&self, engine: &Engine, question: &str) -> anyhow::Result<Request> {
        let mut r = Request::new(question, self.mode(engine)?);
        r.k = self.k;
        r.filter = self.filter.as_deref().map(Filter::parse).transpose()?;
        r.retrieval = self.retrieval;
        r.max_tokens = self.max_tokens;
        r.adapter = self.adapter.clone();
        if self.temperature > 0.0 {
            r.sampling = Sampling::Temperature {
                temperature: self.temperature,
                top_k: Some(40),
                top_p: Some(0.95),
                min_p: Some(0.05),
                seed: self.seed,
            };
        }
        Ok(r)
    }
}

/// hybrid when the engine has a default adapter, else rag.
pub fn default_mode(engine: &Engine) -> Mode {
    if engine.config().default_adapter.is_some() {
        Mode::Hybrid
    } else {
        Mode::Rag
    }
}

/// Arguments of `ragtune ask`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The question; without it, one question per stdin line.
    question: Option<String>,
    #[command(flatten)]
    answer: AnswerArgs,
    /// Output format: `text`, the answer (streamed), then the sources with doc ids and
    /// scores, then timings; `json`, one JSON object per question (the contract in
    /// docs/commands.md), JSON Lines on stdin input.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// The JSON contract of DESIGN.md, plus `citations` and `adapter`.
#[derive(Serialize)]
struct JsonAnswer<'a> {
    question: &'a str,
    mode: Mode,
    answer: &'a str,
    sources: Vec<JsonSource<'a>>,
    citations: &'a [ragtune::engine::Citation],
    adapter: Option<&'a str>,
    timings_ms: JsonTimings,
    tokens: ragtune::engine::TokenCounts,
}

#[derive(Serialize)]
struct JsonSource<'a> {
    doc_id: &'a str,
    chunk: u32,
    score: f32,
    text: &'a str,
}

#[derive(Serialize)]
struct JsonTimings {
    embed: f64,
    retrieve: f64,
    prefill: f64,
    decode: f64,
    first_token: f64,
    total: f64,
}

#[derive(Serialize)]
struct JsonError<'a> {
    question: &'a str,
    error: String,
}

fn to_json(question: &str, a: &Answer) -> anyhow::Result<String> {
    let j = JsonAnswer {
        question,
        mode: a.mode,
        answer: &a.text,
        sources: a
            .sources
            .iter()
            .map(|s| JsonSource {
                doc_id: &s.doc_id,
                chunk: s.chunk,
                score: s.score,
                text: &s.text,
            })
            .collect(),
        citations: &a.citations,
        adapter: a.adapter.as_deref(),
        timings_ms: JsonTimings {
            embed: a.timings.embed,
            retrieve: a.timings.retrieve,
            prefill: a.timings.prefill,
            decode: a.timings.decode,
            first_token: a.timings.first_token,
            total: a.timings.total,
        },
        tokens: a.tokens,
    };
    Ok(serde_json::to_string(&j)?)
}

/// The answer's sources and timings, for people.
pub fn print_details(out: &mut impl Write, a: &Answer) -> std::io::Result<()> {
    if !a.sources.is_empty() {
        writeln!(out, "\nsources:")?;
        for n in 1..=a.sources.len() {
            writeln!(out, "  {}", super::source_label(a, n, "#"))?;
        }
    }
    for c in a.citations.iter().filter(|c| !c.valid) {
        writeln!(
            out,
            "  note: the answer cites [{}], which is not a given source",
            c.number
        )?;
    }
    let t = &a.timings;
    writeln!(
        out,
        "[{}{}; embed {:.1} ms, search {:.2} ms, first token {:.0} ms, prefill {:.0} ms ({} tokens, {} cached), decode {:.0} ms ({} tokens, {:.1} tokens/s), total {:.0} ms]",
        a.mode,
        a.adapter.as_deref().map(|n| format!(" + {n}")).unwrap_or_default(),
        t.embed,
        t.retrieve,
        t.first_token,
        t.prefill,
        a.tokens.prompt,
        a.tokens.cached,
        t.decode,
        a.tokens.generated,
        a.decode_tokens_per_s,
        t.total
    )
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let engine = ctx.engine(args.answer.adapter.as_deref())?;
    let stdout = std::io::stdout();
    match &args.question {
        Some(q) => {
            let request = args.answer.request(&engine, q)?;
            match args.format {
                Format::Json => {
                    let a = engine.answer(&request)?;
                    writeln!(stdout.lock(), "{}", to_json(q, &a)?)?;
                }
                Format::Text => {
                    let mut out = stdout.lock();
                    let a = engine.answer_streaming(&request, |t| {
                        let _ = out.write_all(t.as_bytes()).and_then(|()| out.flush());
                    })?;
                    writeln!(out)?;
                    print_details(&mut out, &a)?;
                }
            }
            Ok(())
        }
        None => {
            let mut failures = 0usize;
            let stdin = std::io::stdin();
            let mut out = std::io::BufWriter::new(stdout.lock());
            for input in super::input_lines(stdin.lock()) {
                let input = input?;
                let (line, result) = match input.text {
                    Ok(line) => {
                        let result = args
                            .answer
                            .request(&engine, &line)
                            .and_then(|r| Ok(engine.answer(&r)?))
                            .with_context(|| format!("line {}", input.number));
                        (line, result)
                    }
                    Err(e) => (String::new(), Err(anyhow::anyhow!(e))),
                };
                match (args.format, result) {
                    (Format::Json, Ok(a)) => writeln!(out, "{}", to_json(&line, &a)?)?,
                    (Format::Text, Ok(a)) => {
                        writeln!(out, "Q: {line}\n{}", a.text)?;
                        print_details(&mut out, &a)?;
                        writeln!(out)?;
                    }
                    (Format::Json, Err(e)) => {
                        failures += 1;
                        eprintln!("error: {e:#}");
                        let j = JsonError {
                            question: &line,
                            error: format!("{e:#}"),
                        };
                        writeln!(out, "{}", serde_json::to_string(&j)?)?;
                    }
                    (Format::Text, Err(e)) => {
                        failures += 1;
                        writeln!(out, "Q: {line}\nerror: {e:#}\n")?;
                    }
                }
                out.flush()?;
            }
            if failures > 0 {
                anyhow::bail!("{failures} question(s) failed (see the error lines above)");
            }
            Ok(())
        }
    }
}
