//! `ragtune generate`: prompt in, streamed text out, on the GGUF model (default: the pinned
//! SmolLM2), with an optional LoRA adapter.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use ragtune_generate::{
    end_of_generation_ids, read_gguf, ChatMessage, ChatTemplate, GenerateParams, Generator,
    LlamaModel, LlamaProps, LoraAdapter, RepeatPenalty, Sampling, Tokenizer,
};
use serde::Serialize;

use super::{Context, Format};

/// Arguments of `ragtune generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The prompt; without it, the whole of stdin.
    prompt: Option<String>,
    /// Use the prompt as is (no chat template; special-token text such as `<|im_start|>` is
    /// parsed as special tokens).
    #[arg(long)]
    raw: bool,
    /// A system message for the chat template.
    #[arg(long, conflicts_with = "raw")]
    system: Option<String>,
    /// A GGUF file to use instead of the pinned SmolLM2-135M-Instruct.
    #[arg(long, env = "RAGTUNE_GGUF")]
    model: Option<PathBuf>,
    /// A PEFT LoRA adapter: a directory with adapter_config.json and
    /// adapter_model.safetensors, or the name of one under `<models-dir>/adapters/`.
    #[arg(long)]
    adapter: Option<String>,
    /// Sampling temperature, a finite number >= 0; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = super::parse_temperature)]
    temperature: f32,
    /// Keep the k most likely tokens (with --temperature > 0).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1] (with --temperature > 0).
    #[arg(long)]
    top_p: Option<f32>,
    /// Drop tokens below this fraction of the top probability (with --temperature > 0).
    #[arg(long)]
    min_p: Option<f32>,
    /// Repeat penalty over the last 64 tokens (1.0: none).
    #[arg(long)]
    repeat_penalty: Option<f32>,
    /// Maximum number of generated tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Output format: `text`, the text streamed as it is generated, timings on stderr;
    /// `json`, one JSON object at the end: `{"prompt_tokens": [...], "tokens": [...], "text":
    /// "...", "timings_ms": {...}, "peak_rss_bytes": N}` (peak resident memory, on Linux).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Serialize)]
struct JsonOut<'a> {
    prompt_tokens: &'a [u32],
    tokens: &'a [u32],
    text: &'a str,
    stop: String,
    timings_ms: JsonTimings,
    /// The process's peak resident memory (`VmHWM`), bytes; absent off Linux.
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_rss_bytes: Option<u64>,
}

#[derive(Serialize)]
struct JsonTimings {
    prefill: f64,
    decode: f64,
    total: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let prompt_text = match &args.prompt {
        Some(p) => p.clone(),
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from stdin")?;
            s
        }
    };
    if prompt_text.trim().is_empty() {
        bail!("empty prompt: pass it as an argument or on stdin");
    }
    let gguf = match &args.model {
        Some(path) => path.clone(),
        None => default_gguf(ctx)?,
    };
    let content = read_gguf(&gguf)?;
    let props = LlamaProps::try_from(&content)?;
    eprintln!(
        "[{}: {}]",
        gguf.display(),
        ragtune_generate::describe(&content, &props)
    );
    let tokenizer = Tokenizer::from_gguf(&content)?;
    drop(content);
    let model = LlamaModel::from_gguf(&gguf)?;
    let adapter = args
        .adapter
        .as_deref()
        .map(|a| -> anyhow::Result<LoraAdapter> {
            let dir = resolve_adapter(ctx, a)?;
            Ok(LoraAdapter::load(&dir, &model)?)
        })
        .transpose()?;

    let prompt = if args.raw {
        tokenizer.encode_prompt(&prompt_text)?
    } else {
        let template = ChatTemplate::from_props(&props, &tokenizer)?.with_context(|| {
            format!(
                "{} has no chat template (tokenizer.chat_template); use --raw",
                gguf.display()
            )
        })?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.push(ChatMessage::user(prompt_text.clone()));
        tokenizer.encode_prompt(&template.render(&messages, true)?)?
    };

    let sampling = if args.temperature > 0.0 {
        Sampling::Temperature {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            seed: args.seed,
        }
    } else {
        Sampling::Greedy
    };
    let params = GenerateParams {
        max_new_tokens: args.max_tokens,
        sampling,
        repeat_penalty: args.repeat_penalty.map(|penalty| RepeatPenalty {
            penalty,
            last_n: 64,
        }),
        stop: args.stop.clone(),
        ..GenerateParams::default()
    };
    let capacity = (prompt.len() + args.max_tokens).min(props.context_length);
    let mut cache = model.new_cache(capacity.max(1))?;
    let eog = end_of_generation_ids(&model, &tokenizer);
    let generator = Generator::new(&model, &tokenizer, &eog);

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let streaming = matches!(args.format, Format::Text);
    let mut write_err = None;
    let generation =
        generator.generate_with(&mut cache, &prompt, &params, adapter.as_ref(), |delta| {
            if streaming && write_err.is_none() {
                if let Err(e) = out.write_all(delta.as_bytes()).and_then(|()| out.flush()) {
                    write_err = Some(e);
                }
            }
        })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    let t = generation.timings;
    match args.format {
        Format::Text => {
            writeln!(out)?;
            let memory = peak_rss_bytes()
                .map(|b| format!(", peak RSS {} MB", b / 1_000_000))
                .unwrap_or_default();
            eprintln!(
                "[{} prompt tokens, {} generated ({:?}); prefill {:.0} ms ({:.1} tokens/s), decode {:.0} ms ({:.1} tokens/s){memory}]",
                generation.prompt_tokens,
                generation.tokens.len(),
                generation.stop,
                t.prefill_ms,
                t.prefill_tok_s,
                t.decode_ms,
                t.decode_tok_s,
            );
        }
        Format::Json => {
            let json = JsonOut {
                prompt_tokens: &prompt,
                tokens: &generation.tokens,
                text: &generation.text,
                stop: format!("{:?}", generation.stop),
                timings_ms: JsonTimings {
                    prefill: t.prefill_ms,
                    decode: t.decode_ms,
                    total: t.prefill_ms + t.decode_ms,
                    prefill_tokens_per_s: t.prefill_tok_s,
                    decode_tokens_per_s: t.decode_tok_s,
                },
                peak_rss_bytes: peak_rss_bytes(),
            };
            writeln!(out, "{}", serde_json::to_string(&json)?)?;
        }
    }
    Ok(())
}

/// The process's peak resident set size (`VmHWM` of `/proc/self/status`), bytes; `None` where
/// there is no such file (not Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let kb: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// The pinned GGUF (fetched if missing).
/// The GGUF of the configuration (`gguf` in ragtune.toml), else the pinned one (fetched if
/// missing).
pub fn default_gguf(ctx: &Context) -> anyhow::Result<PathBuf> {
    if let Some(path) = &ctx.config.gguf {
        return Ok(path.clone());
    }
    Ok(ragtune::engine::default_gguf(&ctx.fetch, &ctx.progress)?)
}

/// An adapter argument: an existing directory, else a name under `<models-dir>/adapters/`.
pub fn resolve_adapter(ctx: &Context, arg: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(arg);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let named = ctx.fetch.models_dir.join("adapters").join(arg);
    if named.is_dir() {
        return Ok(named);
    }
    bail!(
        "no adapter `{arg}`: not a directory, and no {} (an adapter directory holds \
         adapter_config.json and adapter_model.safetensors)",
        named.display()
    )
}
