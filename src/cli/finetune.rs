//! `ragtune finetune`: trains a LoRA adapter on a chat-format JSONL file with
//! `ragtune-train`, writing a PEFT adapter directory with its loss log and plot.
//!
//! `OUT/` receives `adapter_config.json` + `adapter_model.safetensors` (the adapter, written
//! at the end), `loss.jsonl` (one record per step and per evaluation), `loss.svg` (train and
//! eval loss against steps), `train_summary.json` (settings, data counts, wall time,
//! throughput, losses) and `checkpoints/` (the two newest; `--resume` continues from them).
//! Ctrl-C finishes the current step, saves a checkpoint and exits.
//!
//! With block attention on (`ragtune --block-attention finetune …` or `block_attention` in
//! ragtune.toml, the setting the engine serves with) the examples' source blocks are trained
//! with the prompt format v2 mask, and the adapter records format 2.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use plotters::prelude::*;
use ragtune::util::write_atomic;
use ragtune_generate::{read_gguf, ChatTemplate, LlamaProps, TargetModule, Tokenizer};
use ragtune_train::{
    data, Event, Finish, InitB, LoraSpec, MatmulPrecision, TrainConfig, TrainModel, Trainer,
};
use serde_json::json;

use super::Context;

/// The Hugging Face model the pinned GGUF was converted from (recorded in
/// `adapter_config.json` as PEFT's `base_model_name_or_path`).
const DEFAULT_BASE_NAME: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// Arguments of `ragtune finetune`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Training examples: JSON Lines of `{"messages": [{"role", "content"}, ...]}`.
    #[arg(long)]
    data: PathBuf,
    /// Held-out examples for the evaluation loss (same format).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// The adapter directory to write.
    #[arg(long)]
    out: PathBuf,
    /// A GGUF base model instead of the pinned SmolLM2-135M-Instruct.
    #[arg(long, env = "RAGTUNE_GGUF")]
    gguf: Option<PathBuf>,
    /// `base_model_name_or_path` recorded in adapter_config.json [default: the Hugging Face
    /// name of the pinned model; for another GGUF, its `general.name`, else its file name].
    #[arg(long)]
    base_name: Option<String>,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (the update is scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// LoRA dropout on the adapter's input.
    #[arg(long, default_value_t = 0.05)]
    dropout: f64,
    /// Adapted projections, PEFT names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    targets: Vec<String>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Cosine floor as a fraction of the peak learning rate.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Tokens per packed sequence; longer examples are skipped and counted.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Packed sequences per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 4)]
    grad_accum: usize,
    /// Clip the global gradient norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Evaluate every K steps (0: at the end only).
    #[arg(long, default_value_t = 25)]
    eval_every: usize,
    /// Evaluate on at most this many packed sequences of --eval.
    #[arg(long, default_value_t = 24)]
    eval_max_seqs: usize,
    /// Save a checkpoint every N steps (0: at the end and on Ctrl-C only).
    #[arg(long, default_value_t = 25)]
    save_every: usize,
    /// Seed of the LoRA init, the example order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The arithmetic of the products with the frozen base weights: `f32`, or `bf16`
    /// (operands rounded to bfloat16, summed in f32) on CPUs with Intel AMX (Sapphire
    /// Rapids and later), f32 elsewhere. Part of the run: a resume must keep it.
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    matmul_precision: MatmulPrecision,
    /// Continue the run whose checkpoints are in --out (same data and flags).
    #[arg(long)]
    resume: bool,
    /// Replace a trained adapter already in --out (its weights, loss log, plot and summary).
    /// Without it, an --out holding an adapter is refused.
    #[arg(long)]
    overwrite: bool,
}

/// `f32` or `bf16`, as [`MatmulPrecision::name`] writes them.
fn parse_precision(name: &str) -> Result<MatmulPrecision, String> {
    [MatmulPrecision::F32, MatmulPrecision::Bf16]
        .into_iter()
        .find(|p| p.name() == name)
        .ok_or_else(|| format!("`{name}`: expected f32 or bf16"))
}

/// Keeps the records of `loss.jsonl` up to `step` (a resumed run rewrites what came after).
fn truncate_log(path: &Path, step: usize) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step")?.as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())?;
    Ok(())
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let targets = args
        .targets
        .iter()
        .map(|n| {
            TargetModule::from_peft_name(n.trim()).with_context(|| {
                format!("unknown --targets module {n:?}: use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = TrainConfig {
        lora: LoraSpec {
            rank: args.rank,
            alpha: args.alpha,
            dropout: args.dropout,
            targets,
        },
        learning_rate: args.lr,
        min_lr_ratio: args.min_lr_ratio,
        warmup_steps: args.warmup,
        adamw: ragtune_train::optim::AdamWParams {
            weight_decay: args.weight_decay,
            ..Default::default()
        },
        epochs: args.epochs,
        max_steps: args.max_steps,
        seq_len: args.seq_len,
        grad_accum: args.grad_accum,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        eval_every: args.eval_every,
        eval_max_seqs: args.eval_max_seqs,
        save_every: args.save_every,
        seed: args.seed,
        source_attention: if ctx.config.block_attention {
            data::SourceAttention::Blocks
        } else {
            data::SourceAttention::Causal
        },
        matmul_precision: args.matmul_precision,
    };
    config.validate()?;
    let out = &args.out;
    let has_checkpoint = out.join("checkpoints").join("latest").exists();
    if has_checkpoint && !args.resume && !args.overwrite {
        bail!(
            "{} already holds a training run's checkpoints: pass --resume to continue it, \
             --overwrite to start over, or choose another --out",
            out.display()
        );
    }
    let trained = ["adapter_model.safetensors", "adapter_config.json"]
        .iter()
        .any(|f| out.join(f).exists());
    if trained && !args.resume && !args.overwrite {
        bail!(
            "{} already holds a trained adapter: pass --overwrite to replace it (its weights, \
             loss.jsonl, loss.svg and train_summary.json), or choose another --out",
            out.display()
        );
    }
    if args.overwrite && has_checkpoint && !args.resume {
        let dir = out.join("checkpoints");
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }

    let gguf = match &args.gguf {
        Some(p) => p.clone(),
        None => super::generate::default_gguf(ctx)?,
    };
    let content = read_gguf(&gguf)?;
    let props = LlamaProps::try_from(&content)?;
    let tokenizer = Tokenizer::from_gguf(&content)?;
    drop(content);
    let template = ChatTemplate::from_props(&props, &tokenizer)?.with_context(|| {
        format!(
            "{} has no chat template to render the examples with",
            gguf.display()
        )
    })?;
    if args.seq_len > props.context_length {
        bail!(
            "--seq-len {} exceeds the model's context length {}",
            args.seq_len,
            props.context_length
        );
    }

    let attention = config.source_attention;
    let examples = data::read_jsonl(&args.data)?;
    if attention == data::SourceAttention::Blocks && examples.iter().all(|e| e.blocks.is_empty()) {
        bail!(
            "block attention is on, but no example in {} marks source blocks: write the data \
             with `ragtune finetune-data` (it marks them), or train without --block-attention",
            args.data.display()
        );
    }
    let train = data::prepare(&examples, &template, &tokenizer, args.seq_len, attention)?;
    eprintln!(
        "train: {} examples, {} tokens ({} skipped as longer than --seq-len {}, {} without answer tokens)",
        train.examples.len(),
        train.tokens(),
        train.skipped_too_long,
        args.seq_len,
        train.skipped_no_target
    );
    let dev = match &args.eval {
        Some(path) => {
            let d = data::prepare(
                &data::read_jsonl(path)?,
                &template,
                &tokenizer,
                args.seq_len,
                attention,
            )?;
            eprintln!(
                "eval: {} examples, {} tokens ({} skipped as too long)",
                d.examples.len(),
                d.tokens(),
                d.skipped_too_long
            );
            d
        }
        None => data::Prepared::default(),
    };

    let base_sha256 = ragtune::fetch::sha256_hex(&gguf)?;
    let model = TrainModel::load(&gguf, config.lora.clone(), InitB::Zeros, config.seed)?;
    let params = model.param_count();
    let mut trainer = Trainer::new(
        model,
        config.clone(),
        &train.examples,
        &dev.examples,
        &base_sha256,
    )?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let log_path = out.join("loss.jsonl");
    if args.resume {
        let step = trainer.resume(out)?;
        truncate_log(&log_path, step)?;
        eprintln!("resumed at step {step} of {}", trainer.total_steps());
    } else {
        write_atomic(&log_path, b"")?;
    }
    eprintln!(
        "training {params} LoRA parameters (r = {}, alpha = {}) over {} steps, {} tokens, \
         {} products",
        args.rank,
        args.alpha,
        trainer.total_steps(),
        trainer.total_tokens(),
        args.matmul_precision.on_this_cpu().name()
    );
    if args.matmul_precision.on_this_cpu() != args.matmul_precision {
        eprintln!(
            "note: --matmul-precision {} needs Intel AMX (absent here, or turned off by \
             RAGTUNE_SIMD): the products run in f32",
            args.matmul_precision.name()
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second handler cannot be installed in one process (tests call run twice): ignore.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let bar = ctx.progress.bar_with(
        trainer.total_steps() as u64,
        "{msg} [{bar:30}] step {pos}/{len} (eta {eta})",
        "finetune",
    );
    bar.set_position(trainer.step() as u64);
    bar.reset_eta();
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let started = Instant::now();
    let mut write_err: Option<std::io::Error> = None;
    let mut tokens_done = 0usize;
    let mut last_eval: Option<f64> = None;
    let mut first_eval: Option<f64> = None;
    let mut phase = [0.0f64; 3];
    let finish = trainer.run(out, &stop, |event| {
        let record = match &event {
            Event::Step(r) => {
                tokens_done += r.tokens;
                phase[0] += r.forward_ms;
                phase[1] += r.backward_ms;
                phase[2] += r.optimizer_ms;
                bar.set_position(r.step as u64);
                bar.set_message(format!(
                    "loss {:.3} | {:.0} tok/s",
                    r.loss,
                    r.tokens_per_s()
                ));
                json!({"step": r.step, "lr": r.lr, "loss": r.loss, "tokens": r.tokens,
                       "targets": r.targets, "grad_norm": r.grad_norm,
                       "tokens_per_s": r.tokens_per_s(), "forward_ms": r.forward_ms,
                       "backward_ms": r.backward_ms, "optimizer_ms": r.optimizer_ms})
            }
            Event::Eval { step, loss } => {
                last_eval = Some(*loss);
                first_eval.get_or_insert(*loss);
                bar.println(format!("step {step}: eval loss {loss:.4}"));
                json!({"step": step, "eval_loss": loss})
            }
            Event::Checkpoint { step, path } => {
                json!({"step": step, "checkpoint": path.display().to_string()})
            }
        };
        if let Err(e) = writeln!(log, "{record}") {
            write_err.get_or_insert(e);
        }
    })?;
    bar.finish_and_clear();
    if let Some(e) = write_err {
        return Err(e).context(format!("writing {}", log_path.display()));
    }
    if finish == Finish::Interrupted {
        eprintln!(
            "interrupted at step {}: checkpoint saved; continue with the same command and --resume",
            trainer.step()
        );
        return Ok(());
    }
    let wall = started.elapsed().as_secs_f64();
    let base_name = match (
        &args.base_name,
        args.gguf.is_some() || ctx.config.gguf.is_some(),
    ) {
        (Some(name), _) => name.clone(),
        (None, false) => DEFAULT_BASE_NAME.to_string(),
        (None, true) => trainer.model().props().name.clone().unwrap_or_else(|| {
            gguf.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        }),
    };
    trainer.model().save_adapter(out, &base_name)?;
    plot_losses(&log_path, &out.join("loss.svg"))?;
    let (profile, data_format_version) = trained_for(ctx, &args.data);
    let prompt_format_version = match attention {
        data::SourceAttention::Causal => data_format_version,
        data::SourceAttention::Blocks => ragtune::engine::BLOCK_PROMPT_FORMAT_VERSION,
    };
    let summary = json!({
        "profile": profile,
        "prompt_format_version": prompt_format_version,
        "base_gguf": gguf.display().to_string(),
        "base_sha256": base_sha256,
        "config": config,
        "trainable_params": params,
        "train_examples": train.examples.len(),
        "train_tokens_per_epoch": train.tokens(),
        "skipped_too_long": train.skipped_too_long,
        "eval_examples": dev.examples.len(),
        "steps": trainer.step(),
        "wall_s_this_invocation": wall,
        "tokens_this_invocation": tokens_done,
        "tokens_per_s": tokens_done as f64 / wall.max(1e-9),
        "time_split_ms": {"forward": phase[0], "backward": phase[1], "optimizer": phase[2]},
        "eval_loss_first": first_eval,
        "eval_loss_final": last_eval,
    });
    write_atomic(
        &out.join("train_summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    eprintln!(
        "wrote the adapter to {} ({} steps, {:.0} s, {:.0} tokens/s{})",
        out.display(),
        trainer.step(),
        wall,
        tokens_done as f64 / wall.max(1e-9),
        last_eval.map_or(String::new(), |l| format!(", eval loss {l:.4}"))
    );
    Ok(())
}

/// The profile and prompt-format version the examples in `data` were rendered with: the
/// `profile` and `prompt_format_version` of the `stats.json` that `ragtune finetune-data`
/// writes beside them, else the running profile and prompt format. The engine warns when an
/// adapter's differ from its own (`ragtune::engine::adapter_mismatch`).
fn trained_for(ctx: &Context, data: &Path) -> (String, u32) {
    let stats: Option<serde_json::Value> = data
        .parent()
        .and_then(|dir| std::fs::read_to_string(dir.join("stats.json")).ok())
        .and_then(|text| serde_json::from_str(&text).ok());
    let field = |key: &str| stats.as_ref().and_then(|s| s.get(key).cloned());
    let profile = field("profile")
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| ctx.profile.name.clone());
    let version = field("prompt_format_version")
        .and_then(|v| v.as_u64())
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(ragtune::engine::PROMPT_FORMAT_VERSION);
    (profile, version)
}

/// Draws train loss (per step) and eval loss (per evaluation) from `loss.jsonl` as an SVG.
fn plot_losses(log: &Path, svg: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let step = v.get("step").and_then(|s| s.as_f64()).unwrap_or(0.0);
        if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
            train.push((step, l));
        }
        if let Some(l) = v.get("eval_loss").and_then(|l| l.as_f64()) {
            eval.push((step, l));
        }
    }
    let max_step = train.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_loss = train.iter().chain(&eval).map(|p| p.1).fold(0.1, f64::max) * 1.05;
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (720, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("LoRA fine-tuning loss", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..max_step, 0.0..max_loss)?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("cross-entropy (nats / answer token)")
            .draw()?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        chart
            .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))?
            .label("eval (held-out)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        chart.draw_series(eval.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
    }
    write_atomic(svg, buf.as_bytes())?;
    Ok(())
}
