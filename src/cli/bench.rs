//! `ragtune bench`: the mode benchmark. Runs a question set through the chosen modes on one
//! engine (one process, one base model), after a warm-up, and writes `bench.json`,
//! `bench.md` (also printed) and `bench.svg` into the output folder.
//!
//! Questions are interleaved across modes (question 1 in every mode, then question 2, ...)
//! so that a slow spell on a shared machine falls on all modes alike. Percentiles are those
//! of the per-answer values with linear interpolation between ranks (numpy's default).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use ragtune::engine::{Answer, Mode, Request};
use ragtune::licensedb::questions::{self, Kind, Question};
use ragtune::util::write_atomic;
use serde::Serialize;
use sha2::Digest;

use super::Context;

/// The committed default question set (see `benches/questions/README.md`).
const DEFAULT_SET: &str = include_str!("../../benches/questions/licenses.jsonl");
/// Where the default set lives in the repository (for reports).
const DEFAULT_SET_PATH: &str = "benches/questions/licenses.jsonl";

/// Arguments of `ragtune bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A JSON Lines question set (`question`, optional `answer`, `kind`, `fresh`, `doc_id`).
    /// Default: the committed LicenseDB set (benches/questions/licenses.jsonl, built in).
    #[arg(long)]
    questions: Option<PathBuf>,
    /// The modes, comma-separated (hybrid, rag, finetune, base). Modes that need an adapter
    /// are skipped, with a note in the report, when none is configured.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "hybrid,rag,finetune,base"
    )]
    modes: Vec<String>,
    /// Unmeasured questions per mode first (the first ones of the set).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Only the first N questions (the default set is ordered so that any prefix mixes the
    /// kinds and seen/fresh).
    #[arg(long)]
    limit: Option<usize>,
    /// Output folder for bench.json, bench.md and bench.svg.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// Sources to retrieve (retrieval modes; default: the configuration's).
    #[arg(short, long)]
    k: Option<usize>,
    /// How the retrieval modes find sources: dense, lexical or hybrid (default: the
    /// configuration's `[retrieval] mode`, hybrid). `--retrieval dense` is the dense-only
    /// baseline.
    #[arg(long, value_enum)]
    retrieval: Option<ragtune::retrieve::RetrievalMode>,
    /// Generated tokens at most per answer.
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// The adapter of hybrid/finetune: a configured name, or a directory to load.
    #[arg(long)]
    adapter: Option<String>,
    /// Write the default question set, generated from the LicenseDB, to OUT and exit.
    #[arg(long, value_name = "OUT")]
    make_questions: Option<PathBuf>,
    /// With --make-questions: seen and fresh questions per kind (each).
    #[arg(long, default_value_t = 20)]
    per_kind: usize,
    /// With --make-questions: the folder of license files (default: the pinned LicenseDB's
    /// licenses).
    #[arg(long)]
    corpus: Option<PathBuf>,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    if let Some(out) = &args.make_questions {
        return make_questions(ctx, &args, out);
    }
    let (source, text) = match &args.questions {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the question set {}", path.display()))?,
        ),
        None => (
            format!("{DEFAULT_SET_PATH} (built in)"),
            DEFAULT_SET.to_string(),
        ),
    };
    let mut set = questions::parse_jsonl(&text, &source)?;
    if let Some(n) = args.limit {
        set.truncate(n);
    }
    anyhow::ensure!(
        !set.is_empty(),
        "the question set {source} has no questions"
    );
    let mut modes = Vec::new();
    for m in &args.modes {
        let mode: Mode = m.parse()?;
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    anyhow::ensure!(!modes.is_empty(), "--modes names no mode");

    let engine = ctx.engine(args.adapter.as_deref())?;
    let adapter = engine.config().default_adapter.clone();
    let loaded = adapter
        .as_deref()
        .is_some_and(|a| engine.adapter_names().contains(&a));
    let mut notes = HashMap::new();
    let runnable: Vec<Mode> = modes
        .iter()
        .copied()
        .filter(|m| {
            if !m.uses_adapter() || loaded {
                return true;
            }
            let why = match &adapter {
                None => format!(
                    "none is configured (train models/adapters/licenses-lora, pass --adapter, \
                     or set default_adapter in {})",
                    ragtune::engine::CONFIG_FILE
                ),
                Some(a) => format!("`{a}` is configured but could not be found on disk"),
            };
            notes.insert(
                *m,
                format!("skipped: mode {m} needs a LoRA adapter and {why}"),
            );
            false
        })
        .collect();

    let request = |q: &Question, mode: Mode| {
        let mut r = Request::new(q.question.clone(), mode);
        r.k = args.k;
        r.retrieval = args.retrieval;
        r.max_tokens = Some(args.max_tokens);
        r
    };
    if args.warmup > 0 && !runnable.is_empty() {
        let bar = ctx
            .progress
            .bar((args.warmup * runnable.len()) as u64, "warm-up");
        for i in 0..args.warmup {
            let q = &set[i % set.len()];
            for &mode in &runnable {
                // Errors show up in the measured run.
                let _ = engine.answer(&request(q, mode));
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
    }
    // The measured run starts with nothing cached, so that the first question about each
    // document is cold.
    engine.clear_kv();

    let bar = ctx
        .progress
        .bar((set.len() * runnable.len()) as u64, "benchmark");
    let mut results = Vec::with_capacity(set.len() * runnable.len());
    let mut asked = std::collections::HashSet::new();
    for (i, q) in set.iter().enumerate() {
        // A follow-up: an earlier question of the run was about the same document.
        let follow_up = q.doc_id.as_ref().is_some_and(|d| !asked.insert(d.clone()));
        for &mode in &runnable {
            let result = engine.answer(&request(q, mode));
            let mut record = Record::new(i, q, mode, result);
            record.follow_up = follow_up;
            results.push(record);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    let report = Report {
        tool: "ragtune bench",
        version: env!("CARGO_PKG_VERSION"),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        machine: Machine::here(),
        settings: Settings {
            questions: source,
            questions_sha256: ragtune::util::hex(&sha2::Sha256::digest(text.as_bytes())),
            n_questions: set.len(),
            warmup: args.warmup,
            k: args.k.unwrap_or(engine.config().k),
            max_tokens: args.max_tokens,
            sampling: "greedy",
            context_window: engine.config().context_window,
            index: engine.index_dir().display().to_string(),
            retrieval: args.retrieval.unwrap_or(engine.config().retrieval.mode),
            adapter,
            prefix_cache: engine.config().prefix_cache,
            prefix_cache_mb: engine.config().prefix_cache_mb,
            block_attention: engine.config().block_attention,
        },
        kv: engine.kv_stats(),
        stored_blocks: {
            let (read, damaged) = engine.block_store_reads();
            StoredBlocks { read, damaged }
        },
        modes: modes
            .iter()
            .map(|&m| match notes.get(&m) {
                Some(note) => ModeSummary::skipped(m, note.clone()),
                None => ModeSummary::of(m, &results),
            })
            .collect(),
        results,
    };

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = serde_json::to_string_pretty(&report)?;
    write_atomic(&args.out.join("bench.json"), format!("{json}\n").as_bytes())?;
    let md = markdown(&report);
    write_atomic(&args.out.join("bench.md"), md.as_bytes())?;
    let svg = chart(&report).context("drawing the chart")?;
    write_atomic(&args.out.join("bench.svg"), svg.as_bytes())?;
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        write!(out, "{md}")?;
        out.flush()?;
    }
    eprintln!(
        "wrote {}/bench.json, bench.md and bench.svg",
        args.out.display()
    );
    Ok(())
}

/// `--make-questions OUT`: the default set from the LicenseDB, written atomically.
fn make_questions(ctx: &Context, args: &Args, out: &Path) -> anyhow::Result<()> {
    let corpus = match &args.corpus {
        Some(dir) => dir.clone(),
        None => ctx.default_corpus()?,
    };
    let set = questions::default_set_from(&corpus, args.per_kind)?;
    write_atomic(out, questions::to_jsonl(&set).as_bytes())?;
    let fresh = set.iter().filter(|q| q.fresh == Some(true)).count();
    eprintln!(
        "wrote {} questions ({} seen, {fresh} fresh) from {} to {}",
        set.len(),
        set.len() - fresh,
        corpus.display(),
        out.display()
    );
    Ok(())
}

/// The whole report (bench.json).
#[derive(Serialize)]
struct Report {
    tool: &'static str,
    version: &'static str,
    unix_time: u64,
    machine: Machine,
    settings: Settings,
    /// The prefix cache at the end of the run: bytes held, hits.
    kv: ragtune_generate::PrefixCacheStats,
    /// Chunk blocks read from `<index>.kv-blocks` (`ragtune precompute-blocks`).
    stored_blocks: StoredBlocks,
    modes: Vec<ModeSummary>,
    results: Vec<Record>,
}

/// Chunk blocks read from disk on memory-cache misses, and damaged entries skipped.
#[derive(Serialize)]
struct StoredBlocks {
    read: u64,
    damaged: u64,
}

/// Where it ran.
#[derive(Serialize)]
struct Machine {
    cpu: String,
    logical_cpus: usize,
    rayon_threads: usize,
    os: &'static str,
    arch: &'static str,
}

impl Machine {
    fn here() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpu,
            logical_cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            rayon_threads: rayon::current_num_threads(),
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
        }
    }
}

/// How it ran.
#[derive(Serialize)]
struct Settings {
    questions: String,
    questions_sha256: String,
    n_questions: usize,
    warmup: usize,
    k: usize,
    max_tokens: usize,
    sampling: &'static str,
    context_window: usize,
    index: String,
    retrieval: ragtune::retrieve::RetrievalMode,
    adapter: Option<String>,
    prefix_cache: bool,
    prefix_cache_mb: usize,
    block_attention: bool,
}

/// One answer (or error) of one question in one mode.
#[derive(Serialize)]
struct Record {
    index: usize,
    mode: Mode,
    kind: Kind,
    fresh: Option<bool>,
    doc_id: Option<String>,
    question: String,
    expected: Option<String>,
    answer: Option<String>,
    correct: Option<bool>,
    error: Option<String>,
    /// Embedding + index search (retrieval modes), ms.
    retrieval_ms: Option<f64>,
    first_token_ms: Option<f64>,
    total_ms: Option<f64>,
    prefill_tokens_per_s: Option<f64>,
    decode_tokens_per_s: Option<f64>,
    prompt_tokens: Option<usize>,
    /// Prompt positions served from the prefix cache.
    cached_tokens: Option<usize>,
    generated_tokens: Option<usize>,
    /// An earlier question of the run was about the same document.
    follow_up: bool,
    /// The prompt was format v2 (block attention).
    block_attention: Option<bool>,
}

impl Record {
    fn new(index: usize, q: &Question, mode: Mode, result: ragtune::Result<Answer>) -> Record {
        let mut r = Record {
            index,
            mode,
            kind: q.kind,
            fresh: q.is_fresh(),
            doc_id: q.doc_id.clone(),
            question: q.question.clone(),
            expected: q.answer.clone(),
            answer: None,
            correct: None,
            error: None,
            retrieval_ms: None,
            first_token_ms: None,
            total_ms: None,
            prefill_tokens_per_s: None,
            decode_tokens_per_s: None,
            prompt_tokens: None,
            cached_tokens: None,
            generated_tokens: None,
            follow_up: false,
            block_attention: None,
        };
        match result {
            Ok(a) => {
                r.correct = q.score(&a.text);
                r.retrieval_ms = mode
                    .uses_retrieval()
                    .then_some(a.timings.embed + a.timings.retrieve);
                r.first_token_ms = Some(a.timings.first_token);
                r.total_ms = Some(a.timings.total);
                r.prefill_tokens_per_s = Some(a.prefill_tokens_per_s);
                // One generated token has no decode step.
                r.decode_tokens_per_s = (a.tokens.generated > 1).then_some(a.decode_tokens_per_s);
                r.prompt_tokens = Some(a.tokens.prompt);
                r.cached_tokens = Some(a.tokens.cached);
                r.block_attention = Some(a.block_attention);
                r.generated_tokens = Some(a.tokens.generated);
                r.answer = Some(a.text);
            }
            Err(e) => {
                // A failed answer is a wrong one when it was to be scored.
                r.correct = q.answer.as_ref().map(|_| false);
                r.error = Some(e.to_string());
            }
        }
        r
    }
}

/// Median and p95 of a measure, over the answers that have it.
#[derive(Serialize, Clone, Copy)]
struct Stat {
    median: f64,
    p95: f64,
    n: usize,
}

impl Stat {
    fn of(values: impl Iterator<Item = f64>) -> Option<Stat> {
        let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Stat {
            median: percentile(&v, 0.5),
            p95: percentile(&v, 0.95),
            n: v.len(),
        })
    }
}

/// `p` in 0..=1 of sorted `v` (not empty), linear between ranks.
fn percentile(v: &[f64], p: f64) -> f64 {
    let pos = p * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Correct answers among the scored ones.
#[derive(Serialize, Clone, Copy, Default)]
struct Accuracy {
    correct: usize,
    scored: usize,
    accuracy: Option<f64>,
}

impl Accuracy {
    fn of<'a>(records: impl Iterator<Item = &'a Record>) -> Accuracy {
        let mut a = Accuracy::default();
        for c in records.filter_map(|r| r.correct) {
            a.scored += 1;
            a.correct += usize::from(c);
        }
        a.accuracy = (a.scored > 0).then(|| a.correct as f64 / a.scored as f64);
        a
    }

    fn cell(&self) -> String {
        match self.accuracy {
            Some(x) => format!("{:.1}% ({}/{})", 100.0 * x, self.correct, self.scored),
            None => "–".into(),
        }
    }
}

/// Accuracy overall and split.
#[derive(Serialize)]
struct AccuracySplit {
    all: Accuracy,
    seen: Accuracy,
    fresh: Accuracy,
    /// Per kind: all, seen, fresh.
    by_kind: BTreeMap<Kind, [Accuracy; 3]>,
}

/// One mode's results.
#[derive(Serialize)]
struct ModeSummary {
    mode: Mode,
    /// `ran` or `skipped`.
    status: &'static str,
    note: Option<String>,
    answered: usize,
    errors: usize,
    retrieval_ms: Option<Stat>,
    first_token_ms: Option<Stat>,
    /// First token of the first question about each document.
    first_token_cold_ms: Option<Stat>,
    /// First token of the later questions about a document (follow-ups).
    first_token_follow_up_ms: Option<Stat>,
    prefill_tokens_per_s: Option<Stat>,
    decode_tokens_per_s: Option<Stat>,
    end_to_end_ms: Option<Stat>,
    prompt_tokens: Option<Stat>,
    cached_tokens: Option<Stat>,
    /// Cached prompt positions over all prompt positions.
    cache_hit_rate: Option<f64>,
    generated_tokens: Option<Stat>,
    accuracy: Option<AccuracySplit>,
}

impl ModeSummary {
    fn skipped(mode: Mode, note: String) -> ModeSummary {
        ModeSummary {
            mode,
            status: "skipped",
            note: Some(note),
            answered: 0,
            errors: 0,
            retrieval_ms: None,
            first_token_ms: None,
            first_token_cold_ms: None,
            first_token_follow_up_ms: None,
            prefill_tokens_per_s: None,
            decode_tokens_per_s: None,
            end_to_end_ms: None,
            prompt_tokens: None,
            cached_tokens: None,
            cache_hit_rate: None,
            generated_tokens: None,
            accuracy: None,
        }
    }

    fn of(mode: Mode, results: &[Record]) -> ModeSummary {
        let rs: Vec<&Record> = results.iter().filter(|r| r.mode == mode).collect();
        let stat = |f: fn(&Record) -> Option<f64>| Stat::of(rs.iter().filter_map(|r| f(r)));
        let split = |fresh: Option<bool>, kind: Option<Kind>| {
            Accuracy::of(rs.iter().copied().filter(|r| {
                fresh.is_none_or(|f| r.fresh == Some(f)) && kind.is_none_or(|k| r.kind == k)
            }))
        };
        let mut by_kind = BTreeMap::new();
        for kind in [Kind::Category, Kind::Spdx, Kind::Owner, Kind::Text] {
            let all = split(None, Some(kind));
            if all.scored > 0 {
                by_kind.insert(
                    kind,
                    [
                        all,
                        split(Some(false), Some(kind)),
                        split(Some(true), Some(kind)),
                    ],
                );
            }
        }
        let errors = rs.iter().filter(|r| r.error.is_some()).count();
        let first_token = |follow_up: bool| {
            Stat::of(
                rs.iter()
                    .filter(|r| r.follow_up == follow_up)
                    .filter_map(|r| r.first_token_ms),
            )
        };
        let (cached, prompt): (usize, usize) = rs
            .iter()
            .filter_map(|r| r.cached_tokens.zip(r.prompt_tokens))
            .fold((0, 0), |(c, p), (rc, rp)| (c + rc, p + rp));
        let first_error = rs.iter().find_map(|r| r.error.clone());
        ModeSummary {
            mode,
            status: "ran",
            note: first_error.map(|e| format!("{errors} answer(s) failed, e.g.: {e}")),
            answered: rs.len() - errors,
            errors,
            retrieval_ms: stat(|r| r.retrieval_ms),
            first_token_ms: stat(|r| r.first_token_ms),
            first_token_cold_ms: first_token(false),
            first_token_follow_up_ms: first_token(true),
            prefill_tokens_per_s: stat(|r| r.prefill_tokens_per_s),
            decode_tokens_per_s: stat(|r| r.decode_tokens_per_s),
            end_to_end_ms: stat(|r| r.total_ms),
            prompt_tokens: stat(|r| r.prompt_tokens.map(|n| n as f64)),
            cached_tokens: stat(|r| r.cached_tokens.map(|n| n as f64)),
            cache_hit_rate: (prompt > 0).then(|| cached as f64 / prompt as f64),
            generated_tokens: stat(|r| r.generated_tokens.map(|n| n as f64)),
            accuracy: Some(AccuracySplit {
                all: split(None, None),
                seen: split(Some(false), None),
                fresh: split(Some(true), None),
                by_kind,
            }),
        }
    }
}

/// `median / p95` with `decimals`, or a dash.
fn cell(s: Option<Stat>, decimals: usize) -> String {
    match s {
        Some(s) => format!("{:.*} / {:.*}", decimals, s.median, decimals, s.p95),
        None => "–".into(),
    }
}

/// The Markdown report: the main table, accuracy per kind, notes and settings.
fn markdown(r: &Report) -> String {
    let mut md = String::new();
    md.push_str(&format!(
        "## ragtune bench: {} questions, {} warm-up, max {} tokens, k = {}, greedy\n\n",
        r.settings.n_questions, r.settings.warmup, r.settings.max_tokens, r.settings.k
    ));
    md.push_str(
        "| mode | answered | retrieval ms | first token ms | prefill tok/s | decode tok/s | end-to-end ms | accuracy | seen | fresh |\n\
         |------|---------:|-------------:|---------------:|--------------:|-------------:|--------------:|---------:|-----:|------:|\n",
    );
    for m in &r.modes {
        if m.status == "skipped" {
            md.push_str(&format!(
                "| {} | skipped | – | – | – | – | – | – | – | – |\n",
                m.mode
            ));
            continue;
        }
        let acc = m.accuracy.as_ref();
        let a = |f: fn(&AccuracySplit) -> Accuracy| acc.map(|x| f(x).cell()).unwrap_or_default();
        md.push_str(&format!(
            "| {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            m.mode,
            m.answered,
            if m.errors > 0 {
                format!(" ({} failed)", m.errors)
            } else {
                String::new()
            },
            cell(m.retrieval_ms, 1),
            cell(m.first_token_ms, 0),
            cell(m.prefill_tokens_per_s, 0),
            cell(m.decode_tokens_per_s, 1),
            cell(m.end_to_end_ms, 0),
            a(|x| x.all),
            a(|x| x.seen),
            a(|x| x.fresh),
        ));
    }
    md.push_str(
        "\nCells are median / p95 over the answers. retrieval = embedding the question + the \
         index search (retrieval modes only); first token = from the request to the first \
         generated text; end-to-end = the whole request. Accuracy: correct / scored answers \
         (rules in benches/questions/README.md); seen and fresh as in DESIGN.md.\n",
    );

    md.push_str(&format!(
        "\nFirst token by what the prefix cache held ({}; bound {} MiB):\n\n\
         | mode | cold ms | follow-up ms | prompt tokens | cached tokens | cache hit rate |\n\
         |------|--------:|-------------:|--------------:|--------------:|---------------:|\n",
        if !r.settings.prefix_cache {
            "prefix cache off"
        } else if r.settings.block_attention {
            "block attention, prompt format v2"
        } else {
            "prompt format v1"
        },
        r.settings.prefix_cache_mb
    ));
    for m in r.modes.iter().filter(|m| m.status == "ran") {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            m.mode,
            cell(m.first_token_cold_ms, 0),
            cell(m.first_token_follow_up_ms, 0),
            cell(m.prompt_tokens, 0),
            cell(m.cached_tokens, 0),
            m.cache_hit_rate
                .map_or("–".into(), |x| format!("{:.1}%", 100.0 * x)),
        ));
    }
    md.push_str(&format!(
        "\ncold = the first question about its document in the run (the cache is emptied after \
         the warm-up); follow-up = a later question about the same document (other words, \
         another fact). Cells are median / p95. At the end the cache held {:.1} MiB in {} \
         prefix blocks and {} chunk blocks ({} evictions); chunk-block hits {} of {}; \
         chunk blocks read from disk (`ragtune precompute-blocks`) {}{}.\n",
        r.kv.bytes as f64 / (1 << 20) as f64,
        r.kv.prefix_blocks,
        r.kv.chunk_blocks,
        r.kv.evictions,
        r.kv.chunk_hits,
        r.kv.chunk_lookups,
        r.stored_blocks.read,
        match r.stored_blocks.damaged {
            0 => String::new(),
            n => format!(" ({n} damaged, computed again)"),
        },
    ));

    let kinds: Vec<Kind> = {
        let mut ks: Vec<Kind> = r
            .modes
            .iter()
            .filter_map(|m| m.accuracy.as_ref())
            .flat_map(|a| a.by_kind.keys().copied())
            .collect();
        ks.sort();
        ks.dedup();
        ks
    };
    if !kinds.is_empty() {
        md.push_str("\nAccuracy per kind (seen / fresh):\n\n| mode |");
        for k in &kinds {
            md.push_str(&format!(" {k} |"));
        }
        md.push_str("\n|------|");
        for _ in &kinds {
            md.push_str("------:|");
        }
        md.push('\n');
        for m in r.modes.iter() {
            let Some(acc) = &m.accuracy else { continue };
            md.push_str(&format!("| {} |", m.mode));
            for k in &kinds {
                let c = match acc.by_kind.get(k) {
                    Some([_, seen, fresh]) => {
                        format!("{} / {}", pct(seen.accuracy), pct(fresh.accuracy))
                    }
                    None => "–".into(),
                };
                md.push_str(&format!(" {c} |"));
            }
            md.push('\n');
        }
    }

    let notes: Vec<String> = r
        .modes
        .iter()
        .filter_map(|m| m.note.as_ref().map(|n| format!("- **{}**: {n}", m.mode)))
        .collect();
    if !notes.is_empty() {
        md.push_str("\nNotes:\n\n");
        for n in notes {
            md.push_str(&n);
            md.push('\n');
        }
    }
    md.push_str(&format!(
        "\nMachine: {} ({} logical CPUs, {} rayon threads, {}/{}). Questions: {} (sha256 {}). \
         Index: {} ({} retrieval). Adapter: {}.\n",
        r.machine.cpu,
        r.machine.logical_cpus,
        r.machine.rayon_threads,
        r.machine.os,
        r.machine.arch,
        r.settings.questions,
        &r.settings.questions_sha256[..12],
        r.settings.index,
        r.settings.retrieval,
        r.settings.adapter.as_deref().unwrap_or("none"),
    ));
    md
}

fn pct(x: Option<f64>) -> String {
    x.map(|x| format!("{:.0}%", 100.0 * x))
        .unwrap_or_else(|| "–".into())
}

/// The chart: latency percentiles by mode (left) and accuracy seen/fresh by mode (right),
/// modes that ran only.
fn chart(r: &Report) -> anyhow::Result<String> {
    let ran: Vec<&ModeSummary> = r.modes.iter().filter(|m| m.status == "ran").collect();
    let names: Vec<String> = ran.iter().map(|m| m.mode.to_string()).collect();
    let skipped: Vec<String> = r
        .modes
        .iter()
        .filter(|m| m.status == "skipped")
        .map(|m| m.mode.to_string())
        .collect();
    let n = ran.len().max(1);
    let get = |s: Option<Stat>, p95: bool| s.map(|s| if p95 { s.p95 } else { s.median });
    let latency: [(&str, RGBColor, Vec<f64>); 4] = [
        (
            "first token, median",
            RGBColor(158, 202, 225),
            ran.iter()
                .map(|m| get(m.first_token_ms, false).unwrap_or(0.0))
                .collect(),
        ),
        (
            "first token, p95",
            RGBColor(49, 130, 189),
            ran.iter()
                .map(|m| get(m.first_token_ms, true).unwrap_or(0.0))
                .collect(),
        ),
        (
            "end-to-end, median",
            RGBColor(253, 174, 107),
            ran.iter()
                .map(|m| get(m.end_to_end_ms, false).unwrap_or(0.0))
                .collect(),
        ),
        (
            "end-to-end, p95",
            RGBColor(230, 85, 13),
            ran.iter()
                .map(|m| get(m.end_to_end_ms, true).unwrap_or(0.0))
                .collect(),
        ),
    ];
    let acc = |f: fn(&AccuracySplit) -> Accuracy| -> Vec<f64> {
        ran.iter()
            .map(|m| {
                m.accuracy
                    .as_ref()
                    .and_then(|a| f(a).accuracy)
                    .unwrap_or(0.0)
                    * 100.0
            })
            .collect()
    };
    let accuracy: [(&str, RGBColor, Vec<f64>); 2] = [
        ("seen", RGBColor(49, 163, 84), acc(|a| a.seen)),
        ("fresh", RGBColor(117, 107, 177), acc(|a| a.fresh)),
    ];
    let max_ms = latency
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .fold(1.0f64, f64::max);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1100, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let title = if skipped.is_empty() {
            format!("ragtune bench: {} questions", r.settings.n_questions)
        } else {
            format!(
                "ragtune bench: {} questions (skipped: {})",
                r.settings.n_questions,
                skipped.join(", ")
            )
        };
        let root = root.titled(&title, ("sans-serif", 20))?;
        let (left, right) = root.split_horizontally(560);
        panel(
            &left,
            "latency by mode",
            "ms",
            &names,
            n,
            max_ms * 1.15,
            &latency,
        )?;
        panel(
            &right,
            "accuracy by mode",
            "% correct",
            &names,
            n,
            100.0,
            &accuracy,
        )?;
        root.present()?;
    }
    Ok(svg)
}

/// One grouped bar chart: a group per mode, a bar per series.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    names: &[String],
    n: usize,
    y_max: f64,
    series: &[(&str, RGBColor, Vec<f64>)],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    // Mode names are drawn under the bars, in a strip below y = 0.
    let strip = y_max * 0.07;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(8)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, -strip..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .max_light_lines(0)
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|y| {
            if *y < 0.0 {
                String::new()
            } else {
                format!("{y:.0}")
            }
        })
        .y_desc(y_desc)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let centered = ("sans-serif", 14)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Center));
    chart
        .draw_series(
            names.iter().enumerate().map(|(i, name)| {
                Text::new(name.clone(), (i as f64, -strip / 2.0), centered.clone())
            }),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let width = 0.8 / series.len() as f64;
    for (s, (label, color, values)) in series.iter().enumerate() {
        let color = *color;
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                let x0 = i as f64 - 0.4 + s as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.92, *v)], color.filled())
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                let x = i as f64 - 0.4 + (s as f64 + 0.46) * width;
                Text::new(
                    format!("{v:.0}"),
                    (x, *v + y_max * 0.005),
                    ("sans-serif", 10)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.5);
        assert!((percentile(&v, 0.95) - 3.85).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 0.95), 7.0);
        let s = Stat::of([3.0, f64::NAN, 1.0, 2.0].into_iter()).expect("stat");
        assert_eq!((s.median, s.n), (2.0, 3));
        assert!(Stat::of(std::iter::empty()).is_none());
    }
}
