//! `ragtune embed`: embeddings of stdin lines, as JSON lines or a `.npy` file.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use ragtune_embed::SentenceEncoder;

use super::Context;

/// Arguments of `ragtune embed`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Write a float32 `(n, dim)` NumPy `.npy` file here instead of JSON lines on stdout.
    #[arg(long)]
    npy: Option<PathBuf>,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let encoder = SentenceEncoder::load(ctx.embedder_dir()?)?;
    let lines: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .collect::<Result<_, _>>()
        .context("reading texts from stdin")?;
    let bar = ctx.progress.bar(lines.len() as u64, "embedding");
    let started = Instant::now();
    let mut tokens = 0usize;
    let emb = encoder.encode_with_progress(&lines, |b| {
        tokens += b.tokens;
        bar.inc(b.texts as u64);
    })?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "embedded {} texts ({} word pieces) in {:.2} s: {:.0} word pieces/s, {:.1} texts/s",
        lines.len(),
        tokens,
        secs,
        tokens as f64 / secs.max(1e-9),
        lines.len() as f64 / secs.max(1e-9)
    );
    match args.npy {
        Some(path) => {
            ragtune::util::write_atomic(&path, &npy_f32(&emb.data, emb.len(), emb.dim))?;
        }
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for i in 0..emb.len() {
                serde_json::to_writer(&mut out, &serde_json::json!({ "embedding": emb.row(i) }))?;
                writeln!(out)?;
            }
            out.flush()?;
        }
    }
    Ok(())
}

/// A NumPy v1.0 `.npy` file of little-endian float32 `(rows, cols)`, C order
/// (format: numpy.org/doc/stable/reference/generated/numpy.lib.format.html).
fn npy_f32(data: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of
    // 64 and ended by a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}
