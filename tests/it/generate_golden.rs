//! `ragtune-generate` against llama.cpp on the pinned SmolLM2 GGUF
//! (`tests/golden/smollm2_q4_1.json`): tokenizer ids, chat prompts and their ids.

use std::path::PathBuf;
use std::sync::OnceLock;

use ragtune::fetch::Role;
use ragtune_generate::{
    read_gguf, ChatMessage, ChatTemplate, LlamaProps, SpecialTokens, Tokenizer,
};
use serde_json::Value;

use crate::util::{self, ids};

const GOLDEN: &str = "smollm2_q4_1.json";

struct Model {
    props: LlamaProps,
    tokenizer: Tokenizer,
}

fn golden() -> &'static Value {
    static G: OnceLock<Value> = OnceLock::new();
    G.get_or_init(|| util::golden(GOLDEN))
}

fn gguf_path() -> PathBuf {
    let file = golden()["model_file"].as_str().expect("model_file");
    util::package(Role::Generator).join(file)
}

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let content = read_gguf(gguf_path()).expect("read the GGUF metadata");
        let props = LlamaProps::try_from(&content).expect("valid llama props");
        let tokenizer = Tokenizer::from_gguf(&content).expect("tokenizer from GGUF");
        Model { props, tokenizer }
    })
}

#[test]
fn props_match_the_file() {
    let g = &golden()["tokenizer"];
    let m = model();
    let p = &m.props;
    assert_eq!(p.vocab_size as u64, g["n_vocab"].as_u64().expect("n_vocab"));
    assert_eq!(p.special.bos.map(u64::from), g["bos_id"].as_u64());
    assert_eq!(p.special.eos.map(u64::from), g["eos_id"].as_u64());
    assert_eq!(p.add_bos_token, g["gguf_add_bos_token"] == "true");
    assert_eq!(m.tokenizer.vocab_size(), p.vocab_size);
    // SmolLM2-135M: 30 blocks, 576 wide, 9 query heads over 3 KV heads, 8k context.
    assert_eq!(
        (
            p.block_count,
            p.embedding_length,
            p.head_count,
            p.head_count_kv
        ),
        (30, 576, 9, 3)
    );
    assert_eq!((p.head_dim, p.context_length), (64, 8192));
    assert_eq!(p.rope.freq_base, 100_000.0);
    assert_eq!(
        p.chat_template.as_deref(),
        golden()["chat"]["chat_template"].as_str()
    );
}

#[test]
fn tokenizer_ids_match_llama_cpp() {
    let tok = &model().tokenizer;
    let cases = golden()["tokenize"].as_array().expect("tokenize cases");
    let mut failures = Vec::new();
    let mut matched = 0;
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        // Without `ids_parse_special`, parsing special tokens gives the same ids.
        let want_special = case
            .get("ids_parse_special")
            .map(ids)
            .unwrap_or_else(|| want.clone());
        let got = tok.encode(text, SpecialTokens::AsText).expect("encode");
        let got_special = tok.encode(text, SpecialTokens::Parse).expect("encode");
        let mut ok = true;
        if got != want {
            failures.push(format!(
                "{text:?} special=false:\n  want {want:?}\n  got  {got:?}"
            ));
            ok = false;
        }
        if got_special != want_special {
            failures.push(format!(
                "{text:?} special=true:\n  want {want_special:?}\n  got  {got_special:?}"
            ));
            ok = false;
        }
        if case["roundtrip_ok"].as_bool() == Some(true) {
            let back = tok.decode(&got, false).expect("decode");
            if back != text {
                failures.push(format!("{text:?} does not round-trip: {back:?}"));
                ok = false;
            }
        }
        matched += usize::from(ok);
    }
    eprintln!(
        "tokenizer: {matched}/{} strings match llama.cpp",
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn chat_prompts_and_ids_match_llama_cpp() {
    let m = model();
    let template = ChatTemplate::from_props(&m.props, &m.tokenizer)
        .expect("template compiles")
        .expect("the file has a chat template");
    let cases = golden()["chat"]["cases"].as_array().expect("chat cases");
    let mut failures = Vec::new();
    let (mut rendered_ok, mut ids_ok) = (0, 0);
    for case in cases {
        let user = case["user"].as_str().expect("user");
        let want = case["formatted_prompt"].as_str().expect("formatted_prompt");
        let got = template
            .render(&[ChatMessage::user(user)], true)
            .expect("render");
        if got == want {
            rendered_ok += 1;
        } else {
            failures.push(format!(
                "prompt for {user:?}:\n  want {want:?}\n  got  {got:?}"
            ));
        }
        // Tokenize the reference prompt, so an id mismatch is the tokenizer's alone.
        let want_ids = ids(&case["prompt_ids"]);
        let got_ids = m.tokenizer.encode_prompt(want).expect("encode");
        if got_ids == want_ids {
            ids_ok += 1;
        } else {
            failures.push(format!(
                "ids for {user:?}:\n  want {want_ids:?}\n  got  {got_ids:?}"
            ));
        }
    }
    eprintln!(
        "chat: {rendered_ok}/{n} prompts rendered byte for byte, {ids_ok}/{n} prompt ids match",
        n = cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The GGUF-built tokenizer saved as `tokenizer.json` and loaded back gives the same ids.
#[test]
fn tokenizer_json_from_the_gguf_tokenizer_matches() {
    let tok = &model().tokenizer;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokenizer.json");
    tok.inner().save(&path, false).expect("save tokenizer.json");
    let loaded = Tokenizer::from_file(&path).expect("load tokenizer.json");
    for case in golden()["tokenize"].as_array().expect("tokenize cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(
            loaded.encode(text, SpecialTokens::AsText).expect("encode"),
            ids(&case["ids"]),
            "{text:?}"
        );
    }
}
