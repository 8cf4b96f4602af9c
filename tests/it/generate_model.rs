//! The forward pass and generation of `ragtune-generate` against llama.cpp's greedy outputs on
//! the pinned SmolLM2 GGUF (`tests/golden/smollm2_q4_1.json`, `chat.cases`).

use std::path::PathBuf;
use std::sync::OnceLock;

use ragtune::fetch::Role;
use ragtune_generate::candle_core::IndexOp;
use ragtune_generate::{
    end_of_generation_ids, read_gguf, Error, GenerateParams, Generator, LlamaModel, Sampling,
    StopReason, Tokenizer, WeightFormat,
};
use serde_json::Value;

use crate::util::{self, greedy, ids};

struct Fixture {
    model: LlamaModel,
    tokenizer: Tokenizer,
    eog: Vec<u32>,
}

struct Case {
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    margins: Vec<f64>,
    text: String,
}

fn golden() -> &'static Value {
    static G: OnceLock<Value> = OnceLock::new();
    G.get_or_init(|| util::golden("smollm2_q4_1.json"))
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let file = golden()["model_file"].as_str().expect("model_file");
        let path: PathBuf = util::package(Role::Generator).join(file);
        let model = LlamaModel::from_gguf(&path).expect("load the model");
        let tokenizer = Tokenizer::from_gguf(&read_gguf(&path).expect("GGUF")).expect("tokenizer");
        let eog = end_of_generation_ids(&model, &tokenizer);
        Fixture {
            model,
            tokenizer,
            eog,
        }
    })
}

fn cases() -> Vec<Case> {
    golden()["chat"]["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            prompt: ids(&c["prompt_ids"]),
            greedy: ids(&c["greedy_ids"]),
            margins: c["top1_top2_logit_margin"]
                .as_array()
                .expect("margins")
                .iter()
                .map(|m| m.as_f64().expect("margin"))
                .collect(),
            text: c["greedy_text"].as_str().expect("text").to_string(),
        })
        .collect()
}

/// Teacher forcing: prompt + llama.cpp's greedy ids in one forward; our argmax at each
/// position must be llama.cpp's next token at >= 95% of the steps.
#[test]
fn teacher_forced_agreement_with_llama_cpp() {
    let f = fixture();
    let (mut agree, mut total) = (0, 0);
    for (i, c) in cases().iter().enumerate() {
        let ours = util::teacher_forced_argmax(&f.model, &c.prompt, &c.greedy);
        assert_eq!(ours.len(), c.greedy.len());
        let mut n = 0;
        let mut misses = Vec::new();
        for (step, (o, g)) in ours.iter().zip(&c.greedy).enumerate() {
            if o == g {
                n += 1;
            } else {
                misses.push(format!(
                    "step {step}: {o} vs {g} (margin {:.3})",
                    c.margins[step]
                ));
            }
        }
        eprintln!(
            "case {i}: teacher-forced agreement {n}/{} {misses:?}",
            c.greedy.len()
        );
        agree += n;
        total += c.greedy.len();
    }
    let rate = agree as f64 / total as f64;
    eprintln!(
        "teacher-forced agreement overall: {agree}/{total} = {:.1}%",
        rate * 100.0
    );
    assert!(rate >= 0.95, "agreement {rate}");
}

/// Free greedy generation: leading tokens in common with llama.cpp; the first token must match
/// wherever llama.cpp's top-1/top-2 margin is above 0.1.
#[test]
fn free_greedy_generation_follows_llama_cpp() {
    let f = fixture();
    let gen = Generator::new(&f.model, &f.tokenizer, &f.eog);
    for (i, c) in cases().iter().enumerate() {
        let mut cache = f.model.new_cache(c.prompt.len() + 32).expect("cache");
        let g = gen
            .generate(&mut cache, &c.prompt, &greedy(c.greedy.len()), |_| {})
            .expect("generate");
        let lead = g
            .tokens
            .iter()
            .zip(&c.greedy)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "case {i}: {lead}/{} leading greedy tokens match llama.cpp; text {:?}",
            c.greedy.len(),
            g.text
        );
        if c.margins[0] > 0.1 {
            assert_eq!(g.tokens[0], c.greedy[0], "case {i}: first token");
        }
        if lead == c.greedy.len() {
            assert_eq!(g.text, c.text.trim_end_matches("<|im_end|>"), "case {i}");
        }
    }
}

/// The KV cache: a batched prefill in two uneven batches followed by one-token decode steps
/// gives the logits of one forward over the whole sequence, position by position.
///
/// Not bit for bit: candle's f32 gemm sums in a different order for a different number of
/// rows (~4e-6 on a 64-long dot product, measured), and the q8_1 quantization of activations
/// before each Q4_1 matmul turns such a difference into a different rounding now and then,
/// which grows through 30 layers (llama.cpp has the same batch-size dependence). With the
/// weights as stored, prefill (>= 8 tokens) also takes another path than decode: Q4_1 panels
/// dequantized for an f32 gemm, without the q8_1 rounding of the activations. Measured: cosine
/// 0.998-0.99997, max abs diff 0.5-1.0 on logits of magnitude ~20, and an argmax that flips
/// where the top two are close. So with the weights as stored the test asks for a cosine of
/// at least 0.995 and the incremental argmax within the full forward's top 3, and with the weights
/// dequantized to f32 (one arithmetic path) for agreement within 1e-3 absolute and the same
/// argmax. A cache written at the wrong position or a wrong mask fails all of them by far.
#[test]
fn kv_cache_decode_matches_one_full_forward() {
    let f = fixture();
    kv_cache_check(&f.model, 0.995, f32::INFINITY, 3);
    let file = golden()["model_file"].as_str().expect("model_file");
    let path: PathBuf = util::package(Role::Generator).join(file);
    let dense = LlamaModel::from_gguf_with(&path, WeightFormat::F32).expect("load as f32");
    kv_cache_check(&dense, 1.0 - 1e-9, 1e-3, 1);
}

/// `top`: the incremental argmax must be among the full forward's `top` best tokens.
fn kv_cache_check(model: &LlamaModel, min_cosine: f64, max_abs: f32, top: usize) {
    let c = &cases()[0];
    let mut seq = c.prompt.clone();
    seq.extend(&c.greedy[..8]);
    let mut full_cache = model.new_cache(seq.len()).expect("cache");
    let full = model.forward(&seq, 0, &mut full_cache).expect("forward");
    let row = |t: &ragtune_generate::candle_core::Tensor, i: usize| -> Vec<f32> {
        t.i(i).and_then(|l| l.to_vec1()).expect("row")
    };
    let full_last = row(&full, seq.len() - 1);

    let mut cache = model.new_cache(seq.len()).expect("cache");
    let split = c.prompt.len();
    model.forward(&seq[..20], 0, &mut cache).expect("batch 1");
    let prefill = model
        .forward(&seq[20..split], 20, &mut cache)
        .expect("batch 2");
    let mut rows = vec![row(&prefill, split - 21)];
    for (k, &tok) in seq[split..].iter().enumerate() {
        let l = model
            .forward_last(&[tok], split + k, &mut cache)
            .expect("decode");
        rows.push(l.to_vec1().expect("row"));
    }
    assert_eq!(cache.len(), seq.len());
    let argmax = |v: &[f32]| -> usize {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .expect("non-empty")
    };
    let cosine = |a: &[f32], b: &[f32]| {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x * y)).sum();
        let na: f64 = a.iter().map(|x| f64::from(x * x)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| f64::from(x * x)).sum::<f64>().sqrt();
        dot / (na * nb)
    };
    for (k, inc) in rows.iter().enumerate() {
        let pos = split - 1 + k;
        let reference = row(&full, pos);
        let cos = cosine(&reference, inc);
        let max_diff = reference
            .iter()
            .zip(inc)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("position {pos}: cosine {cos:.6}, max abs diff {max_diff:.3}");
        let best = argmax(inc);
        let rank = reference.iter().filter(|&&v| v > reference[best]).count();
        assert!(
            rank < top,
            "argmax at position {pos} is the reference's number {}",
            rank + 1
        );
        assert!(cos >= min_cosine, "cosine {cos} at position {pos}");
        assert!(
            max_diff <= max_abs,
            "max abs diff {max_diff} at position {pos}"
        );
    }

    // A cleared cache starts over and gives the same logits again.
    cache.clear();
    assert!(cache.is_empty());
    let again = model
        .forward(&seq, 0, &mut cache)
        .expect("forward after clear");
    let again_last: Vec<f32> = again
        .i(seq.len() - 1)
        .and_then(|l| l.to_vec1())
        .expect("row");
    assert_eq!(again_last, full_last);
}

#[test]
fn context_overflow_is_a_typed_error() {
    let f = fixture();
    let mut cache = f.model.new_cache(8).expect("cache");
    f.model
        .forward(&[1, 2, 3, 4, 5, 6], 0, &mut cache)
        .expect("fits");
    match f.model.forward(&[7, 8, 9], 6, &mut cache) {
        Err(Error::ContextOverflow { needed, capacity }) => assert_eq!((needed, capacity), (9, 8)),
        other => panic!("expected ContextOverflow, got {other:?}"),
    }
    assert_eq!(cache.len(), 6, "a refused call leaves the cache as it was");

    let ctx = f.model.props().context_length;
    assert!(matches!(
        f.model.new_cache(ctx + 1),
        Err(Error::CacheCapacity { requested, context_length }) if requested == ctx + 1 && context_length == ctx
    ));

    let gen = Generator::new(&f.model, &f.tokenizer, &f.eog);
    let prompt = &cases()[0].prompt; // 37 tokens
    let mut cache = f.model.new_cache(40).expect("cache");
    match gen.generate(&mut cache, prompt, &greedy(10), |_| {}) {
        Err(e @ Error::PromptTooLong { .. }) => {
            let Error::PromptTooLong { excess, .. } = e else {
                unreachable!()
            };
            assert_eq!(excess, prompt.len() + 10 - 40);
            assert!(e.to_string().contains("by 7 tokens"), "{e}");
        }
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
}

/// Streaming: the deltas concatenate to the final text, on a case whose output has
/// multi-byte characters ("L'Étoile, la Cité, ..."), and none is cut mid-character (each
/// delta is a `&str`). Also a stop string ends generation and is not streamed.
#[test]
fn streamed_deltas_are_the_text() {
    let f = fixture();
    let gen = Generator::new(&f.model, &f.tokenizer, &f.eog);
    let c = &cases()[0];
    let mut cache = f.model.new_cache(c.prompt.len() + 32).expect("cache");
    let mut deltas = Vec::new();
    let g = gen
        .generate(&mut cache, &c.prompt, &greedy(32), |d| {
            deltas.push(d.to_string())
        })
        .expect("generate");
    assert!(
        !g.text.is_ascii(),
        "the case should have multi-byte characters: {:?}",
        g.text
    );
    assert_eq!(deltas.concat(), g.text);
    assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
    assert_eq!(g.prompt_tokens, c.prompt.len());
    assert!(
        g.timings.prefill_ms > 0.0 && g.timings.decode_tok_s > 0.0,
        "{:?}",
        g.timings
    );

    // Stop at the first comma: the text is what precedes it.
    let params = GenerateParams {
        stop: vec![",".into()],
        ..greedy(32)
    };
    let mut deltas = Vec::new();
    let s = gen
        .generate(&mut cache, &c.prompt, &params, |d| {
            deltas.push(d.to_string())
        })
        .expect("generate");
    assert_eq!(s.stop, StopReason::StopString(0));
    assert_eq!(s.text, g.text[..g.text.find(',').expect("a comma")]);
    assert_eq!(deltas.concat(), s.text);
}

/// Sampling with a seed is reproducible, and the end-of-generation token stops it.
#[test]
fn seeded_sampling_is_reproducible() {
    let f = fixture();
    let gen = Generator::new(&f.model, &f.tokenizer, &f.eog);
    let c = &cases()[1];
    let params = GenerateParams {
        sampling: Sampling::Temperature {
            temperature: 0.8,
            top_k: Some(40),
            top_p: Some(0.95),
            min_p: Some(0.05),
            seed: 42,
        },
        ..greedy(16)
    };
    let mut cache = f.model.new_cache(c.prompt.len() + 16).expect("cache");
    let a = gen
        .generate(&mut cache, &c.prompt, &params, |_| {})
        .expect("a");
    let b = gen
        .generate(&mut cache, &c.prompt, &params, |_| {})
        .expect("b");
    assert_eq!(a.tokens, b.tokens);
    if let StopReason::EndOfGeneration(id) = a.stop {
        assert!(f.eog.contains(&id));
        assert_eq!(a.tokens.last(), Some(&id));
    }
}

/// A prompt prefix computed once and copied into a request's cache gives the logits of
/// computing the whole prompt in that cache, bit for bit (the same calls on the same values).
#[test]
fn a_copied_prefix_continues_like_the_original() {
    let f = fixture();
    let c = &cases()[0];
    let (prefix, rest) = c.prompt.split_at(16);
    let mut whole = f.model.new_cache(c.prompt.len() + 4).expect("cache");
    f.model.forward(prefix, 0, &mut whole).expect("prefix");
    let want: Vec<f32> = f
        .model
        .forward_last(rest, prefix.len(), &mut whole)
        .and_then(|l| Ok(l.to_vec1()?))
        .expect("rest");

    let mut shared = f.model.new_cache(prefix.len()).expect("cache");
    f.model.forward(prefix, 0, &mut shared).expect("prefix");
    let mut copy = shared
        .copy_prefix(prefix.len(), c.prompt.len() + 4)
        .expect("copy");
    assert_eq!(copy.len(), prefix.len());
    let got: Vec<f32> = f
        .model
        .forward_last(rest, prefix.len(), &mut copy)
        .and_then(|l| Ok(l.to_vec1()?))
        .expect("rest");
    assert_eq!(got, want);
    assert!(shared.copy_prefix(prefix.len() + 1, 64).is_err());
}
