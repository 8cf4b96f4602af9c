//! The architecture variants no pinned file covers, against llama.cpp's logits on tiny
//! synthetic GGUFs (`tests/golden/tiny-*.gguf` and `synthetic.json`, written by
//! `benches/anchors/synthetic_golden.py` with the `gguf` package, F32 weights):
//! `qwen2` (q/k/v biases, NeoX RoPE) and `llama` with Llama 3.1's `rope_freqs.weight`.

use crate::util;
use ragtune_generate::{Architecture, LlamaModel};

/// Every logit of a 16-token sequence within `2e-3 · max|logit|` of llama.cpp's, and the
/// same argmax at every position. llama.cpp keeps the KV cache in f16 and rounds the queries
/// and attention weights to f16 for their products with it (`vec_dot_type` of an F16
/// tensor), 2^-11 (5e-4) relative each; this model rounds the cached keys and values alike
/// but multiplies in f32, so a few such roundings apart. Measured: 1.5e-2 of max 17 (qwen2),
/// 3.8e-3 of max 4.3 (llama3). A wrong RoPE pairing, a missing bias or ignored frequency
/// factors move logits by whole units.
fn check(file: &str, arch: Architecture) {
    let golden = util::golden("synthetic.json");
    let path = util::repo().join("tests/golden").join(file);
    let model = LlamaModel::from_gguf(&path).expect("load");
    assert_eq!(model.props().architecture, arch);
    let tokens = crate::util::ids(&golden["tokens"]);
    let mut cache = model.new_cache(tokens.len()).expect("cache");
    let ours: Vec<Vec<f32>> = model
        .forward(&tokens, 0, &mut cache)
        .and_then(|l| Ok(l.to_vec2::<f32>()?))
        .expect("forward");
    util::assert_synthetic_logits(file, "served", &ours);
}

#[test]
fn qwen2_matches_llama_cpp() {
    check("tiny-qwen2.gguf", Architecture::Qwen2);
}

#[test]
fn llama3_rope_freqs_match_llama_cpp() {
    check("tiny-llama3-rope-freqs.gguf", Architecture::Llama);
}

/// An architecture this crate does not run is an error naming it and the supported ones.
/// A quantized file cut short fails to load with an error that names the tensor it could not
/// read (the block formats are streamed from the file into place).
#[test]
fn a_truncated_file_names_the_tensor_it_could_not_read() {
    use ragtune_generate::candle_core::quantized::GgmlDType;
    let src = util::repo().join("tests/golden/tiny-qwen2.gguf");
    let dir = tempfile::tempdir().expect("temp dir");
    let q8 = dir.path().join("tiny-qwen2-q8_0.gguf");
    let plan = ragtune_generate::read_gguf(&src)
        .expect("GGUF")
        .tensor_infos
        .iter()
        .filter(|(n, i)| n.ends_with(".weight") && i.shape.dims().len() == 2)
        .map(|(n, _)| (n.clone(), GgmlDType::Q8_0))
        .collect();
    ragtune_generate::requantize(&src, &q8, &plan).expect("requantize");
    LlamaModel::from_gguf(&q8).expect("the whole Q8_0 file loads");
    let bytes = std::fs::read(&q8).expect("read");
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).expect("write");
    let msg = LlamaModel::from_gguf(&cut)
        .expect_err("a truncated file is refused")
        .to_string();
    assert!(
        msg.contains("GGUF tensor `") && msg.contains(".weight`"),
        "{msg}"
    );
}

#[test]
fn an_unknown_architecture_is_named() {
    use ragtune_generate::candle_core::quantized::gguf_file::Value as V;
    let mut md = std::collections::HashMap::new();
    md.insert("general.architecture".to_string(), V::String("phi3".into()));
    let err = ragtune_generate::LlamaProps::from_metadata(&md).expect_err("refused");
    let msg = err.to_string();
    assert!(msg.contains("phi3") && msg.contains("gemma3"), "{msg}");
}

/// A SentencePiece vocabulary from GGUF metadata (`tokenizer.ggml.model = llama`: pieces,
/// scores, types, byte fallback; trained with the `sentencepiece` package on license texts)
/// gives llama.cpp's ids for every golden string, with and without special-token parsing,
/// and decodes back to the text.
#[test]
fn sentencepiece_ids_match_llama_cpp() {
    use ragtune_generate::{read_gguf, SpecialTokens, Tokenizer};
    let golden = util::golden("synthetic.json");
    let spm = &golden["spm"];
    let path = util::repo()
        .join("tests/golden")
        .join(spm["file"].as_str().expect("file"));
    let tok = Tokenizer::from_gguf(&read_gguf(&path).expect("GGUF")).expect("SPM tokenizer");
    assert!(
        tok.add_bos(),
        "SentencePiece vocabularies prepend BOS by default"
    );
    let mut failures = Vec::new();
    let cases = spm["tokenize"].as_array().expect("cases");
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want = crate::util::ids(&case["ids"]);
        let want_special = case
            .get("ids_parse_special")
            .map(crate::util::ids)
            .unwrap_or_else(|| want.clone());
        let got = tok.encode(text, SpecialTokens::AsText).expect("encode");
        let got_special = tok.encode(text, SpecialTokens::Parse).expect("encode");
        if got != want {
            failures.push(format!("{text:?}:\n  want {want:?}\n  got  {got:?}"));
        }
        if got_special != want_special {
            failures.push(format!(
                "{text:?} (special):\n  want {want_special:?}\n  got  {got_special:?}"
            ));
        }
        let back = tok.decode(&got, false).expect("decode");
        if back != text {
            failures.push(format!("{text:?} decodes as {back:?}"));
        }
    }
    eprintln!(
        "SentencePiece: {} of {} strings as llama.cpp",
        cases.len() - failures.len().min(cases.len()),
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
