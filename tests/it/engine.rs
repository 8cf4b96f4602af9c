//! The hybrid engine end to end on the real models and an index of a corpus subset: the four
//! modes, the token budget, bad requests, concurrent requests, and `ragtune ask`.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::OnceLock;

use ragtune::engine::{prompt, Engine, EngineConfig, Mode, Request};
use ragtune::retrieve::Retriever;
use ragtune_generate::candle_core::{Device, Tensor};
use ragtune_generate::lora::Factor;
use ragtune_generate::{LlamaModel, LoraAdapter, LoraConfig, TargetModule};

use crate::util;

const APACHE: &str = "What is the SPDX identifier of the Apache License 2.0?";

fn gguf() -> std::path::PathBuf {
    ragtune::engine::default_gguf(
        &util::fetch_config(),
        &ragtune::progress::Progress::hidden(),
    )
    .expect("the pinned GGUF")
}

/// A small seeded adapter on q_proj/v_proj (values from a fixed LCG; PEFT's zero-initialised
/// B would make it a no-op).
fn synthetic_adapter(model: &LlamaModel) -> LoraAdapter {
    let p = model.props();
    let (hidden, q, kv) = (
        p.embedding_length,
        p.head_count * p.head_dim,
        p.head_count_kv * p.head_dim,
    );
    let r = 4;
    let mut state = 7u64;
    let mut seeded = |rows: usize, cols: usize, amp: f32| -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor")
    };
    let mut tensors = HashMap::new();
    for layer in 0..p.block_count {
        for (m, out) in [(TargetModule::QProj, q), (TargetModule::VProj, kv)] {
            tensors.insert(m.tensor_name(layer, Factor::A), seeded(r, hidden, 0.05));
            tensors.insert(m.tensor_name(layer, Factor::B), seeded(out, r, 0.05));
        }
    }
    let config = LoraConfig::new(r, 8.0, &[TargetModule::QProj, TargetModule::VProj]);
    LoraAdapter::from_tensors("synthetic", config, tensors, model).expect("a valid adapter")
}

fn config() -> EngineConfig {
    EngineConfig {
        models_dir: util::fetch_config().models_dir,
        index: Some(util::subset_index().index.clone()),
        default_adapter: Some("synthetic".into()),
        adapters: BTreeMap::from([("synthetic".into(), "unused".into())]),
        ..EngineConfig::default()
    }
}

fn engine_with(config: EngineConfig) -> Engine {
    let index = config.index.clone().expect("the subset index");
    let retriever = Retriever::with_encoder(util::load_encoder(), &index).expect("subset index");
    let gguf = gguf();
    let model = LlamaModel::from_gguf(&gguf).expect("model");
    let adapters = BTreeMap::from([("synthetic".to_string(), synthetic_adapter(&model))]);
    Engine::from_parts(retriever, model, &gguf, adapters, config).expect("engine")
}

/// [`engine_with`] on the model dequantized to f32 (`WeightFormat::F32`): one arithmetic
/// path whatever the batch size, where KV reuse must not change an answer.
fn dense_engine_with(config: EngineConfig) -> Engine {
    let index = config.index.clone().expect("the subset index");
    let retriever = Retriever::with_encoder(util::load_encoder(), &index).expect("subset index");
    let gguf = gguf();
    let model =
        LlamaModel::from_gguf_with(&gguf, ragtune_generate::WeightFormat::F32).expect("model");
    let adapters = BTreeMap::from([("synthetic".to_string(), synthetic_adapter(&model))]);
    Engine::from_parts(retriever, model, &gguf, adapters, config).expect("engine")
}

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| engine_with(config()))
}

fn request(question: &str, mode: Mode, k: usize, max_tokens: usize) -> Request {
    let mut r = Request::new(question, mode);
    r.k = Some(k);
    r.max_tokens = Some(max_tokens);
    r
}

/// `rag` finds the Apache License 2.0 and the base model, shown its metadata record, copies
/// its SPDX id. The id is compared case-insensitively, as SPDX license identifiers are
/// (SPDX spec, Annex "SPDX License List": "License identifiers ... are case-insensitive").
/// One source: with two or more (here the Artistic License 2.0 comes second) SmolLM2-135M
/// mixes them up and answers "2.0" or another source's id; teaching it to read several
/// sources is the adapter's job (RAFT-style training data).
#[test]
fn rag_answers_the_apache_question_from_its_source() {
    let a = engine()
        .answer(&request(APACHE, Mode::Rag, 1, 32))
        .expect("answer");
    eprintln!(
        "rag: {:?} sources {:?}",
        a.text,
        a.sources.iter().map(|s| &s.doc_id).collect::<Vec<_>>()
    );
    assert!(a.sources.iter().any(|s| s.doc_id == "apache-2.0"));
    assert!(a.text.to_lowercase().contains("apache-2.0"), "{}", a.text);
    assert_eq!(a.adapter, None);
    assert!(a.tokens.prompt > 0 && a.tokens.generated > 0);
    assert!(a.timings.first_token <= a.timings.total);
}

/// `hybrid` builds the same prompt as `rag` (same sources, same prompt tokens) and runs the
/// adapter; `finetune` and `base` have no sources, and only `finetune` and `hybrid` an adapter.
#[test]
fn modes_differ_only_in_adapter_and_retrieval() {
    let e = engine();
    let rag = e.answer(&request(APACHE, Mode::Rag, 2, 8)).expect("rag");
    let hybrid = e
        .answer(&request(APACHE, Mode::Hybrid, 2, 8))
        .expect("hybrid");
    assert_eq!(hybrid.adapter.as_deref(), Some("synthetic"));
    assert_eq!(hybrid.tokens.prompt, rag.tokens.prompt);
    let ids = |a: &ragtune::engine::Answer| {
        a.sources
            .iter()
            .map(|s| (s.doc_id.clone(), s.chunk))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&hybrid), ids(&rag));
    for mode in [Mode::FineTune, Mode::Base] {
        let a = e.answer(&request(APACHE, mode, 2, 8)).expect("closed book");
        assert!(a.sources.is_empty(), "{mode}: {:?}", a.sources);
        assert!(a.citations.iter().all(|c| !c.valid), "{mode}");
        assert_eq!(a.adapter.is_some(), mode == Mode::FineTune);
        assert!(a.tokens.prompt < rag.tokens.prompt);
    }
}

/// With a tiny context window the sources that do not fit are dropped whole: every kept
/// source's text is in the prompt uncut, and the prompt always fits.
#[test]
fn a_tiny_context_drops_whole_sources_and_the_prompt_fits() {
    let e = engine();
    let tokenizer_dir = gguf();
    let content = ragtune_generate::read_gguf(&tokenizer_dir).expect("gguf");
    let props = ragtune_generate::LlamaProps::try_from(&content).expect("props");
    let profile = ragtune::licensedb::profile();
    let tokenizer = ragtune_generate::Tokenizer::from_gguf(&content).expect("tokenizer");
    let template = ragtune_generate::ChatTemplate::from_props(&props, &tokenizer)
        .expect("template")
        .expect("has one");
    let hits = e
        .retriever()
        .search(&ragtune::retrieve::Query::new(
            "permissive license attribution",
            6,
        ))
        .expect("search")
        .hits;
    let mut last = 0;
    for budget in [2000, 600, 400, 250, 150, 110] {
        let (kept, ids) = prompt::fit_sources(
            &template,
            &tokenizer,
            &profile,
            "Which is permissive?",
            &hits,
            budget,
        )
        .expect("the question alone fits");
        assert!(ids.len() <= budget, "{} > {budget}", ids.len());
        // Not monotone in general: a smaller budget may skip a long source and keep two
        // short ones. At the smallest budget some sources must be dropped (below).
        last = kept.len();
        let text = tokenizer.decode(&ids, false).expect("decode");
        for s in &kept {
            let flat = s.text.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(text.contains(&flat), "source {}#{} cut", s.doc_id, s.chunk);
        }
    }
    assert!(last < hits.len(), "the smallest budget must drop sources");
    let err = prompt::fit_sources(
        &template,
        &tokenizer,
        &profile,
        "Which is permissive?",
        &hits,
        20,
    )
    .expect_err("the question alone does not fit 20 tokens");
    assert!(
        matches!(err, ragtune::Error::PromptTooLong { tokens, budget: 20, .. } if tokens > 20),
        "{err}"
    );

    // Through the engine: a context window that the question alone overflows.
    let mut small = config();
    small.context_window = 64;
    let e = engine_with(small);
    let err = e
        .answer(&request(&"license ".repeat(80), Mode::Rag, 2, 16))
        .expect_err("too long");
    assert!(
        matches!(err, ragtune::Error::PromptTooLong { tokens, budget: 48, .. } if tokens > 48),
        "{err}"
    );
}

#[test]
fn bad_requests_are_typed_errors_and_the_engine_keeps_serving() {
    let e = engine();
    let empty = e
        .answer(&request("   ", Mode::Rag, 2, 8))
        .expect_err("empty");
    assert!(empty.to_string().contains("empty"), "{empty}");
    let mut r = request(APACHE, Mode::Hybrid, 2, 8);
    r.adapter = Some("missing".into());
    let missing = e.answer(&r).expect_err("missing adapter");
    assert!(missing.to_string().contains("missing"), "{missing}");
    assert!("nope".parse::<Mode>().is_err());
    let mut r = request(APACHE, Mode::Rag, 2, 8);
    r.filter = Some(ragtune_index::Filter::parse("colour=red").expect("parses"));
    let unknown = e.answer(&r).expect_err("unknown filter field");
    assert!(unknown.to_string().contains("colour"), "{unknown}");
    r.filter = Some(ragtune_index::Filter::parse("category=Permissive").expect("parses"));
    let permissive = e.answer(&r).expect("a known field");
    assert!(permissive
        .sources
        .iter()
        .all(|s| s.metadata.get("category").map(String::as_str) == Some("Permissive")));
    e.answer(&request(APACHE, Mode::Base, 2, 4))
        .expect("still serving");
}

/// Several threads asking at once get what sequential calls get (greedy).
#[test]
fn concurrent_requests_equal_sequential_ones() {
    let e = engine();
    let questions = [
        ("Who owns the MIT License?", Mode::Rag),
        ("What category is the GPL 3.0?", Mode::Base),
        (APACHE, Mode::Hybrid),
    ];
    let sequential: Vec<String> = questions
        .iter()
        .map(|(q, m)| e.answer(&request(q, *m, 2, 12)).expect("answer").text)
        .collect();
    let concurrent = all_at_once(
        e,
        questions
            .iter()
            .map(|(q, m)| request(q, *m, 2, 12))
            .collect(),
    );
    assert_eq!(concurrent, sequential);
}

/// The answers' texts to `requests`, each on its own thread, all at once.
fn all_at_once(e: &Engine, requests: Vec<Request>) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .into_iter()
            .map(|r| s.spawn(move || e.answer(&r).expect("answer").text))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    })
}

fn ragtune_ask() -> Command {
    let mut cmd = util::ragtune(&util::subset_index().index);
    cmd.arg("ask");
    cmd
}

/// `ragtune ask --format json`: the contract of DESIGN.md; stdin batch mode answers each line
/// in order with one JSON object per line; a bad line gets an error object, the others are
/// answered, and the exit status says something failed.
#[test]
fn ask_json_matches_the_contract_and_batch_mode_keeps_order() {
    let out = util::run_ok(ragtune_ask().args([
        "--format",
        "json",
        "--mode",
        "rag",
        "-k",
        "2",
        "--max-tokens",
        "8",
        APACHE,
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["question"], APACHE);
    assert_eq!(v["mode"], "rag");
    assert!(v["answer"].is_string());
    let s = &v["sources"][0];
    for key in ["doc_id", "chunk", "score", "text"] {
        assert!(!s[key].is_null(), "source field {key}: {v}");
    }
    for key in ["embed", "retrieve", "prefill", "decode", "total"] {
        assert!(v["timings_ms"][key].is_number(), "timing {key}: {v}");
    }
    assert!(v["tokens"]["prompt"].as_u64().expect("prompt") > 0);
    assert!(v["tokens"]["generated"].as_u64().expect("generated") > 0);

    let questions = ["Who owns the MIT License?", " ", "What is the ISC license?"];
    let out = util::run_with_stdin(
        ragtune_ask().args(["--format", "json", "--mode", "base", "--max-tokens", "4"]),
        questions.join("\n").as_bytes(),
    );
    assert!(!out.status.success(), "one line was empty");
    let lines = util::json_lines(&out.stdout);
    assert_eq!(lines.len(), 3);
    for (line, q) in lines.iter().zip(questions) {
        assert_eq!(line["question"], q);
    }
    assert!(lines[0]["answer"].is_string() && lines[2]["answer"].is_string());
    assert!(lines[1]["error"].as_str().expect("error").contains("empty"));
    assert!(lines[0]["sources"].as_array().expect("sources").is_empty());

    let stderr = util::run_err(ragtune_ask().args(["--mode", "sideways", "hello"]));
    assert!(stderr.contains("unknown mode"), "{stderr}");
}

/// Prefix caching (KV of earlier requests restored into each request) changes the work, not
/// the answers: the same prompts, sources and greedy text as without it, request after
/// request, on the f32 path, where a projection's result does not depend on how the prompt
/// is split into forward calls. (With the quantized kernels it may: as llama.cpp says of
/// `cache_prompt`, logits are not bit for bit the same across batch sizes, and a near tie
/// can flip; `kv_reuse.rs` checks the greedy text on Q4_1 for a prompt.)
#[test]
fn prefix_caching_gives_the_same_answers() {
    let mut off = config();
    off.prefix_cache = false;
    let plain = dense_engine_with(off);
    let cached = dense_engine_with(config());
    for (q, mode) in [
        (APACHE, Mode::Rag),
        ("Who owns the MIT License?", Mode::Base),
        (APACHE, Mode::Hybrid),
        ("What category is the ISC license?", Mode::Rag),
    ] {
        let a = plain.answer(&request(q, mode, 2, 12)).expect("plain");
        let b = cached.answer(&request(q, mode, 2, 12)).expect("cached");
        let c = cached
            .answer(&request(q, mode, 2, 12))
            .expect("cached again");
        assert_eq!(a.tokens.cached, 0);
        assert!(c.tokens.cached > b.tokens.cached, "{mode} {q}");
        assert_eq!(a.text, c.text, "{mode} {q}");
        assert_eq!(a.tokens.prompt, b.tokens.prompt, "{mode} {q}");
        assert_eq!(a.sources.len(), b.sources.len());
        assert_eq!(a.text, b.text, "{mode} {q}");
    }
}

/// The prefix cache serves what earlier requests computed: the same question again is
/// prefilled from its question on (v1 keeps a retrieval prompt up to its sources), and the
/// second turn of a closed-book chat starts with the whole first turn, answer included. The
/// adapter is part of the key: `finetune` (adapter) never reuses `base` KV.
#[test]
fn the_prefix_cache_serves_repeats_and_the_next_turn() {
    let e = engine_with(config());
    let first = e.answer(&request(APACHE, Mode::Rag, 2, 8)).expect("first");
    let again = e.answer(&request(APACHE, Mode::Rag, 2, 8)).expect("again");
    assert_eq!(first.text, again.text);
    assert!(!first.block_attention);
    let question_tokens = 20;
    assert!(
        again.tokens.cached + question_tokens + ragtune_generate::BLOCK_TOKENS
            >= again.tokens.prompt,
        "{} of {} prompt tokens cached",
        again.tokens.cached,
        again.tokens.prompt
    );

    let q1 = "Who owns the MIT License?";
    let turn1 = e.answer(&request(q1, Mode::Base, 2, 16)).expect("turn 1");
    let mut second = request("And who owns the ISC License?", Mode::Base, 2, 8);
    second.history = vec![
        ragtune_generate::ChatMessage::user(q1),
        ragtune_generate::ChatMessage::assistant(turn1.text.trim()),
    ];
    let turn2 = e.answer(&second).expect("turn 2");
    assert_eq!(turn2.history_messages, 2);
    // The first turn's prompt and most of its answer (re-tokenized alike) are reused.
    let floor =
        (turn1.tokens.prompt / ragtune_generate::BLOCK_TOKENS) * ragtune_generate::BLOCK_TOKENS;
    assert!(
        turn2.tokens.cached >= floor,
        "turn 2 reused {} positions; turn 1 had {} prompt tokens",
        turn2.tokens.cached,
        turn1.tokens.prompt
    );
    let ft = e
        .answer(&request(q1, Mode::FineTune, 2, 4))
        .expect("finetune");
    assert_eq!(ft.tokens.cached, 0, "finetune reused base KV");
    let stats = e.kv_stats();
    assert!(
        stats.bytes > 0 && stats.bytes <= stats.max_bytes,
        "{stats:?}"
    );
    assert!(stats.hit_tokens > 0);
}

/// Block attention (format v2): the sources' KV blocks are computed once per adapter and
/// reused by any prompt that has them; an answer from reused blocks equals the answer that
/// computed them; the base model's blocks are never used under an adapter; concurrent
/// requests sharing blocks answer as sequential ones do. On the f32 path, where reuse must
/// not change a token (see `prefix_caching_gives_the_same_answers`).
#[test]
fn block_attention_reuses_sources_per_adapter() {
    let mut c = config();
    c.block_attention = true;
    let e = dense_engine_with(c);
    let cold = e.answer(&request(APACHE, Mode::Rag, 2, 12)).expect("cold");
    assert!(cold.block_attention);
    assert_eq!(cold.sources.len(), 2);
    let after = e.kv_stats();
    assert_eq!(after.chunk_blocks, 2, "{after:?}");
    let warm = e.answer(&request(APACHE, Mode::Rag, 2, 12)).expect("warm");
    assert_eq!(warm.text, cold.text);
    assert!(
        warm.tokens.cached > cold.tokens.cached + 40,
        "warm {} vs cold {} cached",
        warm.tokens.cached,
        cold.tokens.cached
    );
    // Other words, the same sources: the blocks are reused.
    let other = e
        .answer(&request(
            "Which SPDX id does the Apache License 2.0 have?",
            Mode::Rag,
            2,
            12,
        ))
        .expect("follow-up");
    assert!(
        other.tokens.cached > other.tokens.prompt / 2,
        "{:?}",
        other.tokens
    );
    let before = e.kv_stats().chunk_hits;
    let hybrid = e
        .answer(&request(APACHE, Mode::Hybrid, 2, 12))
        .expect("hybrid");
    assert_eq!(
        e.kv_stats().chunk_hits,
        before,
        "base blocks served an adapter"
    );
    assert!(hybrid.tokens.cached < warm.tokens.cached);

    let questions = [
        APACHE,
        "What category is the ISC license?",
        APACHE,
        "Who owns the MIT License?",
    ];
    let sequential: Vec<String> = questions
        .iter()
        .map(|q| {
            e.answer(&request(q, Mode::Rag, 2, 10))
                .expect("answer")
                .text
        })
        .collect();
    let fresh = {
        let mut c = config();
        c.block_attention = true;
        dense_engine_with(c)
    };
    let concurrent = all_at_once(
        &fresh,
        questions
            .iter()
            .map(|q| request(q, Mode::Rag, 2, 10))
            .collect(),
    );
    assert_eq!(concurrent, sequential);
}

/// Chunk blocks precomputed into `<index>.kv-blocks` are read by a later engine (another
/// process in real use) instead of being prefilled, and give the answer that computing them
/// gives. A second precompute finds them stored; a damaged entry is not used (its block is
/// computed again); blocks of an index that changed are ignored, then removed.
#[test]
fn precomputed_blocks_are_read_from_disk_by_a_new_engine() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let index = tmp.path().join("index");
    util::copy_subset_index(&index);
    let store = ragtune::engine::block_store_dir(&index);
    assert_eq!(store, tmp.path().join("index.kv-blocks"));
    let fresh = || {
        let mut c = config();
        c.index = Some(index.clone());
        c.block_attention = true;
        engine_with(c)
    };
    let hidden = ragtune::progress::Progress::hidden();
    let cold = fresh()
        .answer(&request(APACHE, Mode::Rag, 2, 12))
        .expect("cold");
    assert_eq!(cold.sources.len(), 2);

    // The base model's blocks (rag) of the two sources, as numbers 1 and 2.
    let e = fresh();
    let report = e
        .precompute_blocks(&cold.sources, 2, None, &hidden)
        .expect("precompute");
    assert_eq!(
        (report.blocks, report.written, report.already_stored),
        (4, 4, 0)
    );
    let on_disk: u64 = report
        .segments
        .iter()
        .map(|p| std::fs::metadata(p).expect("segment").len())
        .sum();
    assert_eq!(report.bytes_written, on_disk);
    // SmolLM2-135M, f16: 23,040 bytes of KV a position, plus ids and the table.
    let per_position = report.bytes_written as f64 / report.positions as f64;
    assert!(
        (23_040.0..23_400.0).contains(&per_position),
        "{per_position}"
    );

    let warm_engine = fresh();
    let warm = warm_engine
        .answer(&request(APACHE, Mode::Rag, 2, 12))
        .expect("from disk");
    assert_eq!(warm.text, cold.text);
    assert_eq!(warm_engine.block_store_reads(), (2, 0));
    assert!(
        warm.tokens.cached >= cold.tokens.cached + 40,
        "{:?} vs cold {:?}",
        warm.tokens,
        cold.tokens
    );
    // Under an adapter the base model's blocks are not used.
    let hybrid = warm_engine
        .answer(&request(APACHE, Mode::Hybrid, 2, 12))
        .expect("hybrid");
    assert_eq!(warm_engine.block_store_reads(), (2, 0));
    assert!(hybrid.tokens.cached < warm.tokens.cached);

    let again = e
        .precompute_blocks(&cold.sources, 2, None, &hidden)
        .expect("again");
    assert_eq!((again.written, again.already_stored), (0, 4));

    // Flip the last byte of the last segment: the last block written (the second source
    // as number 2, which the prompt uses) fails its checksum and is computed again.
    let last = report.segments.last().expect("a segment");
    let mut bytes = std::fs::read(last).expect("read");
    *bytes.last_mut().expect("byte") ^= 0x40;
    std::fs::write(last, &bytes).expect("write");
    let damaged = fresh();
    let answer = damaged
        .answer(&request(APACHE, Mode::Rag, 2, 12))
        .expect("damaged");
    assert_eq!(answer.text, cold.text);
    assert_eq!(damaged.block_store_reads(), (1, 1));

    // A changed index (a document deleted) makes the segments stale: ignored, then removed
    // by the next precompute.
    util::run_ok(util::ragtune(&index).args(["index", "delete", "zlib"]));
    let stale = fresh();
    stale
        .answer(&request(APACHE, Mode::Rag, 2, 12))
        .expect("stale");
    assert_eq!(stale.block_store_reads(), (0, 0));
    let rebuilt = stale
        .precompute_blocks(&cold.sources[..1], 1, None, &hidden)
        .expect("rebuild");
    assert_eq!(rebuilt.removed_stale, report.segments.len());
    assert_eq!(rebuilt.written, 1);
}

/// The README's example questions, answered by the shipped adapter (`hybrid`) and by the
/// base model (`rag`) with the default settings (k = 2, hybrid retrieval, greedy) over the
/// subset index, whose look-alikes (`mit-license-1998`, `mit-1995`, `gpl-3.0-plus`,
/// `apache-1.1`) are the sources that used to win. SPDX ids compare case-insensitively
/// (SPDX License List: identifiers are case-insensitive); "MIT" must be the whole id.
#[test]
fn the_readme_questions_are_answered_right_in_hybrid_and_rag() {
    let shipped = util::repo().join("models/adapters/licenses-lora");
    let index = util::subset_index().index.clone();
    let retriever = Retriever::with_encoder(util::load_encoder(), &index).expect("subset index");
    let gguf = gguf();
    let model = LlamaModel::from_gguf(&gguf).expect("model");
    let adapter = LoraAdapter::load(&shipped, &model).expect("the shipped adapter");
    let config = EngineConfig {
        models_dir: util::fetch_config().models_dir,
        index: Some(index),
        default_adapter: Some("licenses-lora".into()),
        adapters: BTreeMap::from([("licenses-lora".into(), shipped)]),
        ..EngineConfig::default()
    };
    let adapters = BTreeMap::from([("licenses-lora".to_string(), adapter)]);
    let e = Engine::from_parts(retriever, model, &gguf, adapters, config).expect("engine");
    let spdx = |want: &'static str| {
        move |a: &str| {
            a.split_whitespace()
                .map(|w| w.trim_matches(|c: char| "\"'.,;:()[]".contains(c)))
                .any(|w| w.eq_ignore_ascii_case(want))
        }
    };
    type Check = Box<dyn Fn(&str) -> bool>;
    let cases: [(&str, &str, Check); 3] = [
        (
            "What is the SPDX id of the MIT license?",
            "mit",
            Box::new(spdx("MIT")),
        ),
        (
            "What is the SPDX identifier of the Apache License 2.0?",
            "apache-2.0",
            Box::new(spdx("Apache-2.0")),
        ),
        (
            "Is the GPL 3.0 a copyleft license?",
            "gpl-3.0",
            Box::new(|a: &str| {
                let a = a.to_lowercase();
                a.contains("copyleft") && !a.contains("not a copyleft") && !a.contains("is not")
            }),
        ),
    ];
    for mode in [Mode::Hybrid, Mode::Rag] {
        for (question, doc, ok) in &cases {
            let mut r = Request::new(*question, mode);
            r.max_tokens = Some(48);
            let a = e.answer(&r).expect("answer");
            assert_eq!(a.sources.len(), 2, "{mode}: the default k");
            assert!(
                a.sources.iter().any(|s| s.doc_id == *doc),
                "{mode}: {question}: {doc} not among {:?}",
                a.sources.iter().map(|s| &s.doc_id).collect::<Vec<_>>()
            );
            assert!(ok(&a.text), "{mode}: {question} -> {:?}", a.text);
        }
    }
}

/// A first run in stages (`ragtune chat` on a machine without an index): the metadata records
/// are indexed before the call returns, marked partial, and the engine searches them; the full
/// ingest runs on a thread, and the engine searches its index once it is written, with the
/// marker gone. The subset corpus stands in for the pinned one.
#[test]
fn a_first_run_answers_from_the_records_then_from_the_full_index() {
    use ragtune::engine::IndexStatus;
    use ragtune::ingest::{ingest_in_stages, partial_marker, IngestOptions};
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = dir.path().join("corpus");
    util::copy_subset(&corpus, util::SUBSET);
    let index = dir.path().join("index").join("licensedb");
    let staged = ingest_in_stages(
        util::encoder(),
        || Ok(util::load_encoder()),
        &corpus,
        &index,
        &IngestOptions::default(),
        &ragtune::progress::Progress::hidden(),
    )
    .expect("the records, then the full ingest started");
    // The records alone, one per document, under the marker (the thread may be done already
    // on a fast machine; the marker goes only when the full index is in place).
    let records = ragtune_index::Index::open(&index, &ragtune::embedder_id(util::encoder()))
        .expect("the records index")
        .stats();
    let full = util::subset_index();
    let full_stats =
        ragtune_index::Index::open(&full.index, &ragtune::embedder_id(util::encoder()))
            .expect("the subset index")
            .stats();
    assert_eq!(records.docs, util::SUBSET.len());
    assert!(
        records.chunks == util::SUBSET.len() || records.chunks == full_stats.chunks,
        "{} chunks: neither the records nor the full index",
        records.chunks
    );

    let e = engine_with(EngineConfig {
        index: Some(index.clone()),
        ..config()
    });
    let hits = e
        .retriever()
        .search(&ragtune::retrieve::Query::new(APACHE, 20))
        .expect("search")
        .hits;
    let body_hits = e
        .retriever()
        .search(&ragtune::retrieve::Query::new(BODY_LINE, 3))
        .expect("search")
        .hits;
    if records.chunks == util::SUBSET.len() {
        assert!(hits.iter().all(|h| h.chunk == 0), "records only: {hits:?}");
        assert!(
            body_hits.iter().all(|h| h.chunk == 0),
            "records only: {body_hits:?}"
        );
    }
    e.follow_ingest(staged);
    let started = std::time::Instant::now();
    while let IndexStatus::RecordsOnly {
        embedded, total, ..
    } = e.index_status()
    {
        assert!(embedded <= total || total == 0, "{embedded} of {total}");
        assert!(
            started.elapsed().as_secs() < 600,
            "the background ingest did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !partial_marker(&index).exists(),
        "the marker outlived the full index"
    );
    let stats = e.retriever().index().stats();
    assert_eq!(
        (stats.docs, stats.chunks),
        (full_stats.docs, full_stats.chunks)
    );
    // A line of a license text: only a body chunk holds it.
    let hits = e
        .retriever()
        .search(&ragtune::retrieve::Query::new(BODY_LINE, 3))
        .expect("search")
        .hits;
    assert!(
        hits.iter().any(|h| h.chunk > 0),
        "body chunks are searched: {hits:?}"
    );
}

/// A line of the Apache License 2.0's text (in a body chunk, not in its record).
const BODY_LINE: &str = "you may not use this file except in compliance with the License";
