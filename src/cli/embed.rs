//! `ragtune embed`: embeddings of stdin lines, as JSON lines or a `.npy` file.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use super::Context;

/// Arguments of `ragtune embed`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Write a float32 `(n, dim)` NumPy `.npy` file here instead of JSON lines on stdout.
    #[arg(long)]
    npy: Option<PathBuf>,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let encoder = ctx.encoder()?;
    // Every line is read; lines that are not UTF-8 are reported by number, and (in JSON
    // output) get an error object in their place so the output stays line-aligned.
    let mut lines: Vec<String> = Vec::new();
    let mut bad: Vec<(usize, String)> = Vec::new();
    for input in super::input_lines(std::io::stdin().lock()) {
        let input = input?;
        match input.text {
            Ok(t) => lines.push(t),
            Err(e) => {
                eprintln!("{e}");
                bad.push((input.number - 1, e));
            }
        }
    }
    if args.npy.is_some() && !bad.is_empty() {
        anyhow::bail!(
            "{} input line(s) are not valid UTF-8 (first: {}): nothing was written",
            bad.len(),
            bad[0].1
        );
    }
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
        "embedded {} texts ({} word pieces) in {:.2} s: {:.0} word pieces/s, {:.1} texts/s ({} encoder)",
        lines.len(),
        tokens,
        secs,
        tokens as f64 / secs.max(1e-9),
        lines.len() as f64 / secs.max(1e-9),
        encoder.precision()
    );
    match args.npy {
        Some(path) => {
            ragtune::util::write_atomic(&path, &npy_f32(&emb.data, emb.len(), emb.dim))?;
        }
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut bad_iter = bad.iter().peekable();
            let mut row = 0usize;
            for line in 0..emb.len() + bad.len() {
                if let Some((_, e)) = bad_iter.next_if(|(l, _)| *l == line) {
                    serde_json::to_writer(
                        &mut out,
                        &serde_json::json!({ "line": line + 1, "error": e }),
                    )?;
                } else {
                    serde_json::to_writer(
                        &mut out,
                        &serde_json::json!({ "embedding": emb.row(row) }),
                    )?;
                    row += 1;
                }
                writeln!(out)?;
            }
            out.flush()?;
            anyhow::ensure!(
                bad.is_empty(),
                "{} input line(s) are not valid UTF-8 (see their error lines)",
                bad.len()
            );
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
