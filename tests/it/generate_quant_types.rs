//! Every GGUF quantization type against llama.cpp: the pinned SmolLM2 file re-quantized by
//! llama.cpp's own quantizer to Q4_0, Q4_K_M, Q5_K_M, Q6_K and F16, and llama.cpp's greedy
//! tokens on each (`tests/golden/smollm2_requant.json`, made by
//! `benches/anchors/requant_golden.py`).
//!
//! The tests need no llama.cpp: they rebuild each file from the pinned one with
//! [`ragtune_generate::requantize`] (candle's quantizers), with the type llama.cpp chose for
//! each tensor, and check every tensor's bytes against the sha256 of the file the golden
//! script built the same way and ran llama.cpp on; so the golden tokens are llama.cpp's on
//! exactly the file loaded here. For Q4_0, Q5_0, Q5_1, Q8_0 and F16 those bytes are also
//! what llama.cpp's own quantizer writes (the golden file records it per tensor); candle's
//! k-quant quantizers choose slightly different scales.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ragtune::fetch::Role;
use ragtune_generate::candle_core::quantized::gguf_file::Content;
use ragtune_generate::candle_core::quantized::GgmlDType;
use ragtune_generate::candle_core::Device;
use ragtune_generate::{ggml_dtype, requantize, LlamaModel};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::util::{self, ids};

fn golden() -> &'static Value {
    static G: OnceLock<Value> = OnceLock::new();
    G.get_or_init(|| util::golden("smollm2_requant.json"))
}

/// The pinned file re-quantized with the types llama.cpp chose for `ftype`, written (again
/// on every run) to Cargo's scratch folder for integration tests, `target/tmp/requant` (a
/// temporary folder held by a static would never be removed: 700 MB left behind a run);
/// panics naming a tensor whose bytes differ from those of the file llama.cpp ran on.
fn requantized(ftype: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("requant");
    std::fs::create_dir_all(&dir).expect("scratch folder");
    let src_name = golden()["source_file"].as_str().expect("source_file");
    let src = util::package(Role::Generator).join(src_name);
    let tensors = golden()["files"][ftype]["tensors"]
        .as_array()
        .expect("tensors");
    let plan: HashMap<String, GgmlDType> = tensors
        .iter()
        .map(|t| {
            let name = t["name"].as_str().expect("name").to_string();
            (
                name,
                ggml_dtype(t["type"].as_str().expect("type")).expect("known type"),
            )
        })
        .collect();
    let dst = dir.join(format!("smollm2-{ftype}.gguf"));
    requantize(&src, &dst, &plan).expect("requantize");
    let mut reader = std::io::BufReader::new(std::fs::File::open(&dst).expect("open"));
    let content = Content::read(&mut reader).expect("GGUF");
    for t in tensors {
        let name = t["name"].as_str().expect("name");
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .expect("tensor");
        let sha = hex(&Sha256::digest(&*q.data().expect("data")));
        assert_eq!(
            sha,
            t["sha256"].as_str().expect("sha256"),
            "{ftype}: tensor {name} ({:?}) differs from the file llama.cpp ran on",
            q.dtype()
        );
    }
    dst
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Teacher forcing on `path` against llama.cpp's greedy tokens on the same file: the
/// fraction of steps where our argmax is llama.cpp's next token, and the misses where
/// llama.cpp's top-2 margin was above 0.5 (a real disagreement, not a near tie).
fn agreement(path: &Path, cases: &[Value]) -> (f64, Vec<String>) {
    let model = LlamaModel::from_gguf(path).expect("load");
    let (mut agree, mut total) = (0, 0);
    let mut clear_misses = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let (prompt, greedy) = (ids(&c["prompt_ids"]), ids(&c["greedy_ids"]));
        let margins: Vec<f64> = c["top1_top2_logit_margin"]
            .as_array()
            .expect("margins")
            .iter()
            .map(|m| m.as_f64().expect("margin"))
            .collect();
        let ours = util::teacher_forced_argmax(&model, &prompt, &greedy);
        for (step, (o, g)) in ours.iter().zip(&greedy).enumerate() {
            total += 1;
            if o == g {
                agree += 1;
            } else if margins[step] > 0.5 {
                clear_misses.push(format!(
                    "case {i} step {step}: {o} vs {g} (margin {})",
                    margins[step]
                ));
            }
        }
    }
    (agree as f64 / total as f64, clear_misses)
}

/// Loads the `ftype` file and asks for teacher-forced agreement of at least `min_rate`, and
/// (`strict`) no miss where llama.cpp's top-2 margin is above 0.5.
fn check(ftype: &str, min_rate: f64, strict: bool) {
    let path = requantized(ftype);
    let file = &golden()["files"][ftype];
    let mut types: HashMap<&str, usize> = HashMap::new();
    for t in file["tensors"].as_array().expect("tensors") {
        *types.entry(t["type"].as_str().expect("type")).or_default() += 1;
    }
    let cases = file["cases"].as_array().expect("cases");
    let (rate, clear_misses) = agreement(&path, cases);
    eprintln!(
        "{ftype} ({types:?}): teacher-forced agreement with llama.cpp {:.1}%",
        rate * 100.0
    );
    assert!(
        rate >= min_rate,
        "{ftype}: agreement {rate}: {clear_misses:?}"
    );
    assert!(
        !strict || clear_misses.is_empty(),
        "{ftype}: {clear_misses:?}"
    );
}

/// Q4_0 has its own kernel (ggml's exact `Σ (q - 8) x`); the token embedding stays Q8_0.
#[test]
fn q4_0_follows_llama_cpp() {
    check("Q4_0", 0.97, true);
}

/// The k-quant files are held below the 97% of the exact formats, and the reason is
/// llama.cpp's side: it multiplies k-quant weights with activations quantized in blocks of
/// 256 (`block_q8_K`), coarser than the 32 of every other format. Measured on these files
/// (2026-12-02): this crate's quantized path 91.4% (Q4_K_M), 96.3% (Q5_K_M), 96.9% (Q6_K);
/// the same files dequantized to f32 (`WeightFormat::F32`, no activation quantization at
/// all) 93.4%, 94.9%, 96.9%. On 2026-12-03: 92.1%, 97.1%, 96.2% with the Q5_0/Q5_1 kernels
/// and Q5_K held as Q5_1; Q4_K_M and Q6_K gave the same 92.1% and 96.2% on the build before
/// those kernels. So the weight conversion costs at most a point or two against
/// exact arithmetic; the floors below sit under the measured rates by that much. On
/// 2026-12-08, with Q6_K held with its own bits and multiplied with q8_K activations as
/// llama.cpp does (Q4_K and Q5_K still as Q4_1/Q5_1 with activations per 32): 94.1%, 94.9%,
/// 96.2% (the same Q6_K bits with activations per 32: 94.7% for Q6_K, and Gemma 3 fell
/// below its 97% floor). A token or three of about 130 moves either way with any change of
/// rounding.
#[test]
fn q4_k_m_follows_llama_cpp() {
    check("Q4_K_M", 0.90, false);
}

/// See [`q4_k_m_follows_llama_cpp`].
#[test]
fn q5_k_m_follows_llama_cpp() {
    check("Q5_K_M", 0.94, false);
}

/// See [`q4_k_m_follows_llama_cpp`].
#[test]
fn q6_k_follows_llama_cpp() {
    check("Q6_K", 0.95, false);
}

/// F16 weights are kept in f16 and multiplied in f32 (exact products), as llama.cpp's F16
/// path is near exact: 100% on these cases.
#[test]
fn f16_follows_llama_cpp() {
    check("F16", 0.97, true);
}
