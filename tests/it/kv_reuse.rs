//! KV computed by one request and reused by another (`ragtune_generate::PrefixCache`,
//! `LlamaModel::append_span`) on the pinned SmolLM2 GGUF: reuse changes the work, not the
//! numbers.

use std::path::PathBuf;
use std::sync::OnceLock;

use ragtune::fetch::Role;
use ragtune_generate::{
    end_of_generation_ids, read_gguf, Generator, KvSpan, LlamaModel, PrefixCache, SpecialTokens,
    Tokenizer, WeightFormat, BLOCK_TOKENS,
};

use crate::util::{self, greedy};

struct Fixture {
    path: PathBuf,
    tokenizer: Tokenizer,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let golden = util::golden("smollm2_q4_1.json");
        let file = golden["model_file"].as_str().expect("model_file");
        let path = util::package(Role::Generator).join(file);
        let tokenizer = Tokenizer::from_gguf(&read_gguf(&path).expect("GGUF")).expect("tokenizer");
        Fixture { path, tokenizer }
    })
}

/// The model with its projections dequantized to f32: one arithmetic path whatever the
/// batch size, so reuse can be compared bit for bit.
fn dense() -> &'static LlamaModel {
    static M: OnceLock<LlamaModel> = OnceLock::new();
    M.get_or_init(|| {
        LlamaModel::from_gguf_with(&fixture().path, WeightFormat::F32).expect("load as f32")
    })
}

fn quantized() -> &'static LlamaModel {
    static M: OnceLock<LlamaModel> = OnceLock::new();
    M.get_or_init(|| LlamaModel::from_gguf(&fixture().path).expect("load"))
}

fn tokens(text: &str) -> Vec<u32> {
    fixture().tokenizer.encode_prompt(text).expect("tokenize")
}

const PROMPT: &str = "<|im_start|>system\nYou answer questions about software licenses.<|im_end|>\n\
<|im_start|>user\nSources:\n[1] (mit) MIT License (license key mit). The SPDX license identifier is MIT.\n\
\nQuestion: What is the SPDX identifier of the MIT License?<|im_end|>\n<|im_start|>assistant\n";

fn logits(model: &LlamaModel, rest: &[u32], cache: &mut ragtune_generate::KvCache) -> Vec<f32> {
    let pos = cache.len();
    model
        .forward_last(rest, pos, cache)
        .and_then(|l| Ok(l.to_vec1()?))
        .expect("forward")
}

/// A prompt whose first blocks come from the prefix cache (kept from an earlier request that
/// computed the whole prompt in one call) gives the logits of computing the same prefix
/// without the cache, bit for bit on the f32 path: the cache keeps f16 and the KV cache
/// rounds to f16 when it writes.
#[test]
fn prefix_reuse_gives_the_logits_of_no_cache_on_the_f32_path() {
    prefix_reuse_check(dense());
}

/// The same on the quantized path, bit for bit too: the integer projections and the causal
/// attention compute each row the same way whatever the number of rows in the call, so the
/// prefix computed inside the whole prompt is the prefix computed alone.
#[test]
fn prefix_reuse_gives_the_logits_of_no_cache_on_q4_1() {
    prefix_reuse_check(quantized());
}

fn prefix_reuse_check(model: &LlamaModel) {
    let prompt = tokens(PROMPT);
    let n = (prompt.len() - 1) / BLOCK_TOKENS * BLOCK_TOKENS;
    assert!(n >= 2 * BLOCK_TOKENS, "a prompt of {} tokens", prompt.len());
    let capacity = prompt.len() + 4;

    let mut plain = model.new_cache(capacity).expect("cache");
    model.forward(&prompt[..n], 0, &mut plain).expect("prefix");
    let want = logits(model, &prompt[n..], &mut plain);

    let store = PrefixCache::new(usize::MAX);
    let mut earlier = model.new_cache(capacity).expect("cache");
    model
        .forward(&prompt, 0, &mut earlier)
        .expect("whole prompt");
    assert_eq!(
        store.insert(1, None, &prompt, &earlier).expect("keep"),
        n + BLOCK_TOKENS * ((prompt.len() - n) / BLOCK_TOKENS)
    );
    let hit = store.lookup(1, None, &prompt[..prompt.len() - 1]);
    assert_eq!(hit.len() * BLOCK_TOKENS, n);
    let mut reused = model.new_cache(capacity).expect("cache");
    for span in &hit {
        model.append_span(&mut reused, span, None).expect("restore");
    }
    assert_eq!(reused.len(), n);
    assert_eq!(logits(model, &prompt[n..], &mut reused), want);
    // Another salt finds nothing.
    assert!(store.lookup(2, None, &prompt).is_empty());
}

/// On the quantized path (batch-size dependent kernels), a generation from a restored prefix
/// produces the greedy text of a generation from scratch.
#[test]
fn prefix_reuse_gives_the_same_greedy_text_on_q4_1() {
    let model = quantized();
    let tokenizer = &fixture().tokenizer;
    let eog = end_of_generation_ids(model, tokenizer);
    let generator = Generator::new(model, tokenizer, &eog);
    let prompt = tokens(PROMPT);
    let params = greedy(24);
    let mut scratch = model.new_cache(prompt.len() + 24).expect("cache");
    let a = generator
        .generate(&mut scratch, &prompt, &params, |_| {})
        .expect("from scratch");

    let store = PrefixCache::new(usize::MAX);
    store.insert(1, None, &prompt, &scratch).expect("keep");
    let mut cache = model.new_cache(prompt.len() + 24).expect("cache");
    for span in store.lookup(1, None, &prompt[..prompt.len() - 1]) {
        model.append_span(&mut cache, &span, None).expect("restore");
    }
    assert!(cache.len() >= 2 * BLOCK_TOKENS);
    let b = generator
        .generate_after_prefix(&mut cache, &prompt, &params, None, |_| {})
        .expect("from the cache");
    assert_eq!(b.text, a.text);
    assert_eq!(b.tokens, a.tokens);
}

/// The largest absolute difference between two spans' keys (or values), and the largest
/// magnitude in the first.
fn max_diff(a: &KvSpan, b: &KvSpan, keys: bool) -> (f32, f32) {
    let (layers, heads) = a.shape();
    let (mut diff, mut top) = (0f32, 0f32);
    for l in 0..layers {
        for g in 0..heads {
            for i in 0..a.len() {
                let (x, y) = if keys {
                    (a.key(l, g, i), b.key(l, g, i))
                } else {
                    (a.value(l, g, i), b.value(l, g, i))
                };
                for (p, q) in x.iter().zip(&y) {
                    diff = diff.max((p - q).abs());
                    top = top.max(p.abs());
                }
            }
        }
    }
    (diff, top)
}

/// A chunk's KV block computed after its context at the canonical position and moved by
/// re-rotating its keys equals the block computed in place: the same context and chunk
/// computed with every position shifted by `DELTA` (RoPE is relative, so the attention is
/// the same up to rounding).
///
/// Tolerances, from the roundings involved. The rotation angles are f32 products `p * f`
/// whose error grows with `p` (~ p * 2^-24 rad, 2e-5 rad at 350), and every layer's input
/// differs by such roundings computed at other positions. On the f32 path (f32 KV) that is
/// all: measured 0.003 f16 steps (2^-10 of the largest magnitude) on the keys, 0.002 on the
/// values; the bound is 0.05 steps. A quantized model quantizes every projection's input
/// to q8 (as llama.cpp does): a value that lands on the other side of a rounding boundary
/// moves by one q8 step, 1/127 of its block's largest value (8 f16 steps), and such flips
/// add up over the 30 layers: measured 2.5 q8 steps on the keys and 4.8 on the values; the
/// bound is 8 q8 steps (64 f16 steps, 6% of the largest value). A missing rotation is off by
/// 10% of the largest key and more. The next token must be the same.
#[test]
fn a_rerotated_block_equals_one_computed_in_place() {
    rerotation_check(dense(), 0.05);
    rerotation_check(quantized(), 8.0 * 1024.0 / 127.0);
}

fn rerotation_check(model: &LlamaModel, bound_steps: f32) {
    const DELTA: usize = 300;
    let text = PROMPT;
    let split = text.find("[1]").expect("source");
    let end = text.find("\n\nQuestion").expect("question") + 1;
    let context = tokens(&text[..split]);
    let piece = |t: &str| {
        fixture()
            .tokenizer
            .encode(t, SpecialTokens::Parse)
            .expect("tokenize")
    };
    let block = piece(&text[split..end]);
    let tail = piece(&text[end..]);
    let (c, b) = (context.len(), block.len());
    let capacity = c + b + tail.len() + 1;
    let mut run = context.clone();
    run.extend(&block);

    let mut canonical = model.new_cache(capacity).expect("cache");
    model.forward(&run, 0, &mut canonical).expect("canonical");
    let moved = canonical.span(c..c + b).expect("span");
    assert_eq!(moved.first_position(), c);

    let mut in_place = model.new_cache_at(capacity, DELTA).expect("cache");
    model.forward(&run, 0, &mut in_place).expect("in place");
    let want = in_place.span(c..c + b).expect("span");
    assert_eq!(want.first_position(), DELTA + c);

    let mut placed = model.new_cache_at(capacity, DELTA).expect("cache");
    model.forward(&context, 0, &mut placed).expect("context");
    model
        .append_span(&mut placed, &moved, None)
        .expect("re-rotate");
    let got = placed.span(c..c + b).expect("span");

    let step = 2f32.powi(-10);
    for keys in [true, false] {
        let (diff, top) = max_diff(&got, &want, keys);
        let bound = bound_steps * step * top;
        assert!(
            diff <= bound,
            "{}: max difference {diff} > {bound} (max magnitude {top})",
            if keys { "keys" } else { "values" }
        );
    }
    // Without the re-rotation the keys are far off: the test can tell.
    let mut unrotated = model.new_cache(capacity).expect("cache");
    model.forward(&context, 0, &mut unrotated).expect("context");
    model
        .append_span(&mut unrotated, &moved, None)
        .expect("identity");
    let (far, top) = max_diff(&moved, &want, true);
    assert!(far > 0.1 * top, "unrotated keys differ by only {far}");

    let argmax = |l: Vec<f32>| {
        l.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .expect("logits")
    };
    assert_eq!(
        argmax(logits(model, &tail, &mut placed)),
        argmax(logits(model, &tail, &mut in_place))
    );
}

/// Several chunks computed in one call with the block mask (`forward_blocks`) equal each
/// chunk computed alone after the same context: the same keys and values to the tolerance of
/// `a_rerotated_block_equals_one_computed_in_place` (the one call takes the batched attention
/// path, the chunk alone another batch size), and the same first position.
#[test]
fn blocks_computed_together_equal_blocks_computed_alone() {
    let model = dense();
    let context = tokens(
        "<|im_start|>system\nAnswer from the sources.<|im_end|>\n<|im_start|>user\nSources:\n",
    );
    let piece = |t: &str| {
        fixture()
            .tokenizer
            .encode(t, SpecialTokens::Parse)
            .expect("tokenize")
    };
    let chunks = [
        piece("[1] (mit) MIT License (license key mit). The SPDX license identifier is MIT.\n"),
        piece("[2] (isc) ISC License (license key isc). The category is Permissive.\n"),
        piece("[3] (x11) X11 License.\n"),
    ];
    let c = context.len();
    let total: usize = chunks.iter().map(Vec::len).sum();
    let mut scratch = model.new_cache(c + total).expect("cache");
    model.forward(&context, 0, &mut scratch).expect("context");
    let refs: Vec<&[u32]> = chunks.iter().map(Vec::as_slice).collect();
    let together = model
        .forward_blocks(&refs, &mut scratch, None)
        .expect("blocks");
    assert_eq!(scratch.len(), c, "the scratch cache is back to the context");
    let step = 2f32.powi(-10);
    for (chunk, got) in chunks.iter().zip(&together) {
        let mut alone = model.new_cache(c + chunk.len()).expect("cache");
        model.forward(&context, 0, &mut alone).expect("context");
        model.forward(chunk, c, &mut alone).expect("chunk");
        let want = alone.span(c..c + chunk.len()).expect("span");
        assert_eq!(got.first_position(), c);
        assert_eq!(got.len(), chunk.len());
        for keys in [true, false] {
            let (diff, top) = max_diff(got, &want, keys);
            assert!(diff <= 4.0 * step * top, "keys {keys}: {diff} (max {top})");
        }
    }
    // No chunk, or an empty one: refused.
    assert!(model.forward_blocks(&[], &mut scratch, None).is_err());
    assert!(model
        .forward_blocks(&[&chunks[2][..3], &[]], &mut scratch, None)
        .is_err());
}
