//! A generation request on a loaded model: prefill the prompt in batches, decode token by
//! token with a [`Sampling`] policy, stop on end-of-generation ids or stop strings, and
//! stream text deltas that never split a UTF-8 character.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use ragtune_util::rng::SplitMix64;

use crate::kv_cache::KvCache;
use crate::lora::LoraAdapter;
use crate::model::LlamaModel;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (ties: the lowest id).
    Greedy,
    /// Sample from `softmax(logits / temperature)` after the filters, in llama.cpp's order:
    /// top-k, top-p, min-p, then temperature.
    Temperature {
        /// > 0; lower is more deterministic.
        temperature: f32,
        /// Keep the `k` most likely tokens; `None` keeps all.
        top_k: Option<usize>,
        /// Keep the smallest set whose probability reaches `top_p`, in (0, 1]; `None` keeps all.
        top_p: Option<f32>,
        /// Drop tokens whose probability is below `min_p` times the top one, in [0, 1); `None`
        /// keeps all.
        min_p: Option<f32>,
        /// Seed of the sampler's RNG: the same seed, prompt and model give the same tokens.
        seed: u64,
    },
}

/// Penalty on tokens seen recently (CTRL-style, as llama.cpp's `repeat_penalty`): a positive
/// logit is divided by `penalty`, a negative one multiplied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RepeatPenalty {
    /// > 0; 1.0 is no penalty.
    pub penalty: f32,
    /// How many of the last tokens (prompt included) are penalised.
    pub last_n: usize,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// At most this many tokens are generated (the end-of-generation token counts).
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: Sampling,
    /// Applied to the logits before sampling, when set.
    pub repeat_penalty: Option<RepeatPenalty>,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Prompt tokens per forward call during prefill (llama.cpp's `n_batch`), >= 1.
    pub prefill_batch: usize,
    /// When set and the flag becomes `true` (from another thread, a signal handler or the
    /// `on_text` callback), generation ends at the next check with
    /// [`StopReason::Cancelled`] and returns what it has. The flag is checked before each
    /// prefill batch and before each decode step; the generator never resets it.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl PartialEq for GenerateParams {
    /// Field by field; two cancel flags are equal when they are the same flag.
    fn eq(&self, other: &Self) -> bool {
        self.max_new_tokens == other.max_new_tokens
            && self.sampling == other.sampling
            && self.repeat_penalty == other.repeat_penalty
            && self.stop == other.stop
            && self.prefill_batch == other.prefill_batch
            && match (&self.cancel, &other.cancel) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl GenerateParams {
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

impl Default for GenerateParams {
    /// 256 greedy tokens, no stop strings, prefill batches of 512.
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: Sampling::Greedy,
            repeat_penalty: None,
            stop: Vec::new(),
            prefill_batch: 512,
            cancel: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-generation token (EOS / end of turn) was generated; it is the last of
    /// [`Generation::tokens`] and not in the text.
    EndOfGeneration(u32),
    /// The text reached a stop string (the index into [`GenerateParams::stop`]).
    StopString(usize),
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// [`GenerateParams::cancel`] was set; the generation holds what was produced before.
    Cancelled,
}

/// Wall-clock time per phase.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Prompt processing, up to the first generated token's logits, in milliseconds.
    pub prefill_ms: f64,
    /// Everything after: the forward calls of the generated tokens, sampling and
    /// detokenizing, in milliseconds.
    pub decode_ms: f64,
    /// Prompt tokens per second of `prefill_ms`.
    pub prefill_tok_s: f64,
    /// Decode forward calls per second of `decode_ms` (generated tokens minus the first,
    /// whose logits came from prefill).
    pub decode_tok_s: f64,
}

/// The result of [`Generator::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated ids, including a final end-of-generation id if there was one.
    pub tokens: Vec<u32>,
    /// The generated text (special tokens skipped, cut before a stop string).
    pub text: String,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Why it ended.
    pub stop: StopReason,
    /// Time per phase.
    pub timings: Timings,
}

/// Runs generation requests on one model and tokenizer. Holds no per-request state: the
/// caller passes the [`KvCache`] to use.
#[derive(Debug, Clone, Copy)]
pub struct Generator<'m> {
    model: &'m LlamaModel,
    tokenizer: &'m Tokenizer,
    /// Ids that end generation: EOS, end of turn and `<|im_end|>`-style tokens.
    eog: &'m [u32],
}

impl<'m> Generator<'m> {
    /// A generator; `eog` lists the ids that end generation (see [`end_of_generation_ids`]).
    pub fn new(model: &'m LlamaModel, tokenizer: &'m Tokenizer, eog: &'m [u32]) -> Self {
        Self {
            model,
            tokenizer,
            eog,
        }
    }

    /// Generates a continuation of `prompt` (token ids, BOS included if the model wants one).
    /// The cache is cleared first; its capacity bounds `prompt.len() + max_new_tokens`.
    /// `on_text` receives the text as it is produced, in pieces that are whole UTF-8
    /// characters and never part of a stop string; their concatenation is
    /// [`Generation::text`].
    ///
    /// # Errors
    /// [`Error::PromptTooLong`] when the prompt and `max_new_tokens` do not fit the cache
    /// (checked before any work), [`Error::InvalidParams`] for an empty prompt or parameters
    /// out of range, tokenizer and tensor errors.
    pub fn generate(
        &self,
        cache: &mut KvCache,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        self.generate_with(cache, prompt, params, None, on_text)
    }

    /// [`generate`](Self::generate) with a LoRA adapter for this request (`None`: the base
    /// model). The adapter must have been loaded for this generator's model; the cache is
    /// cleared first, so one cache may serve requests with different adapters in turn.
    ///
    /// # Errors
    /// As [`generate`](Self::generate), and [`Error::AdapterModelMismatch`] for an adapter
    /// loaded for a model of other sizes.
    pub fn generate_with(
        &self,
        cache: &mut KvCache,
        prompt: &[u32],
        params: &GenerateParams,
        adapter: Option<&LoraAdapter>,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        cache.clear();
        self.generate_after_prefix(cache, prompt, params, adapter, on_text)
    }

    /// [`generate_with`](Self::generate_with) on a cache that already holds the first
    /// `cache.len()` tokens of `prompt` (for example a copy of a constant system prompt's
    /// cache, [`KvCache::copy_prefix`]): only the rest of the prompt is prefilled. The caller
    /// guarantees that the cached positions are those tokens, computed under `adapter`.
    /// [`Generation::prompt_tokens`] is the whole prompt; [`Timings::prefill_tok_s`] counts the
    /// prefilled tokens only.
    ///
    /// # Errors
    /// As [`generate_with`](Self::generate_with); [`Error::InvalidParams`] when the cache
    /// holds the whole prompt or more (at least one token must be prefilled to get logits).
    pub fn generate_after_prefix(
        &self,
        cache: &mut KvCache,
        prompt: &[u32],
        params: &GenerateParams,
        adapter: Option<&LoraAdapter>,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let model = self.model;
        self.generate_after_prefix_with(
            cache,
            prompt,
            params,
            adapter,
            on_text,
            &mut |token, cache| model.forward_last_with(&[token], cache.len(), cache, adapter),
        )
    }

    /// [`generate_after_prefix`](Self::generate_after_prefix) with each decode step (the
    /// logits of `token` appended to `cache`, `(vocab,)`) computed by `decode` instead of
    /// [`LlamaModel::forward_last_with`]: a scheduler that batches the steps of several
    /// sequences ([`LlamaModel::decode_batch`]) plugs in here. `decode` must give what
    /// `forward_last_with(&[token], cache.len(), cache, adapter)` would.
    ///
    /// # Errors
    /// As [`generate_after_prefix`](Self::generate_after_prefix), and `decode`'s.
    pub fn generate_after_prefix_with(
        &self,
        cache: &mut KvCache,
        prompt: &[u32],
        params: &GenerateParams,
        adapter: Option<&LoraAdapter>,
        mut on_text: impl FnMut(&str),
        decode: &mut dyn FnMut(u32, &mut KvCache) -> Result<Tensor>,
    ) -> Result<Generation> {
        validate(params)?;
        let cached = cache.len();
        if cached >= prompt.len() && !prompt.is_empty() {
            return Err(Error::InvalidParams {
                detail: format!(
                    "the cache holds {cached} positions of a {}-token prompt: at least one \
                     prompt token must be left to prefill",
                    prompt.len()
                ),
            });
        }
        if prompt.is_empty() {
            return Err(Error::InvalidParams {
                detail: "empty prompt".into(),
            });
        }
        let capacity = cache.capacity();
        let total = prompt.len() + params.max_new_tokens;
        if total > capacity {
            return Err(Error::PromptTooLong {
                prompt_tokens: prompt.len(),
                max_new_tokens: params.max_new_tokens,
                capacity,
                excess: total - capacity,
            });
        }
        let mut sampler = Sampler::new(params);
        let mut history: Vec<u32> = prompt.to_vec();

        let start = Instant::now();
        let mut logits = None;
        for chunk in prompt[cached..].chunks(params.prefill_batch) {
            if params.cancelled() {
                logits = None;
                break;
            }
            logits = Some(
                self.model
                    .forward_last_with(chunk, cache.len(), cache, adapter)?,
            );
        }
        let prefill = start.elapsed();

        let start = Instant::now();
        let mut tokens = Vec::new();
        let mut stream = TextStream::new(&params.stop);
        let mut decode_steps = 0usize;
        let stop = loop {
            if params.cancelled() {
                break StopReason::Cancelled;
            }
            // `None` only when prefill was cancelled, which the check above caught (the
            // flag is never reset).
            let Some(current) = logits.as_ref() else {
                break StopReason::Cancelled;
            };
            if tokens.len() == params.max_new_tokens {
                break StopReason::MaxTokens;
            }
            let next = sampler.next(current, &history)?;
            tokens.push(next);
            history.push(next);
            if self.eog.contains(&next) {
                break StopReason::EndOfGeneration(next);
            }
            let text = self.tokenizer.decode(&tokens[..], true)?;
            if let Some(i) = stream.push(&text, &mut on_text) {
                break StopReason::StopString(i);
            }
            if tokens.len() == params.max_new_tokens {
                break StopReason::MaxTokens;
            }
            if params.cancelled() {
                break StopReason::Cancelled;
            }
            logits = Some(decode(next, cache)?);
            decode_steps += 1;
        };
        let text = stream.finish(&mut on_text);
        let decode = start.elapsed();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let per_s = |n: usize, d: std::time::Duration| {
            if d.as_secs_f64() > 0.0 {
                n as f64 / d.as_secs_f64()
            } else {
                0.0
            }
        };
        Ok(Generation {
            tokens,
            text,
            prompt_tokens: prompt.len(),
            stop,
            timings: Timings {
                prefill_ms: ms(prefill),
                decode_ms: ms(decode),
                prefill_tok_s: per_s(prompt.len() - cached, prefill),
                decode_tok_s: per_s(decode_steps, decode),
            },
        })
    }
}

/// The ids that end generation for a model: its EOS and end-of-turn ids, plus the vocabulary's
/// `<|im_end|>`, `<|eot_id|>` and `<|end_of_text|>` tokens where present (llama.cpp's
/// end-of-generation set for chat models).
pub fn end_of_generation_ids(model: &LlamaModel, tokenizer: &Tokenizer) -> Vec<u32> {
    let s = &model.props().special;
    let mut ids: Vec<u32> = [s.eos, s.eot].into_iter().flatten().collect();
    for name in [
        "<|im_end|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        "<|endoftext|>",
        "<end_of_turn>",
    ] {
        if let Some(id) = tokenizer.token_to_id(name) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

// `!(x > 0.0)` on purpose: NaN must fail the checks too.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn validate(p: &GenerateParams) -> Result<()> {
    let bad = |detail: String| Err(Error::InvalidParams { detail });
    if p.prefill_batch == 0 {
        return bad("prefill_batch must be >= 1".into());
    }
    if p.stop.iter().any(String::is_empty) {
        return bad("empty stop string".into());
    }
    if let Some(r) = p.repeat_penalty {
        if r.penalty.is_nan() || r.penalty <= 0.0 {
            return bad(format!("repeat penalty {} must be > 0", r.penalty));
        }
    }
    if let Sampling::Temperature {
        temperature,
        top_k,
        top_p,
        min_p,
        ..
    } = p.sampling
    {
        if !temperature.is_finite() || temperature <= 0.0 {
            return bad(format!(
                "temperature {temperature} must be a finite number > 0 (use Sampling::Greedy)"
            ));
        }
        if top_k == Some(0) {
            return bad("top_k must be >= 1".into());
        }
        if let Some(tp) = top_p {
            if !(tp > 0.0 && tp <= 1.0) {
                return bad(format!("top_p {tp} must be in (0, 1]"));
            }
        }
        if let Some(mp) = min_p {
            if !(0.0..1.0).contains(&mp) {
                return bad(format!("min_p {mp} must be in [0, 1)"));
            }
        }
    }
    Ok(())
}

/// Turns the full decoded text after each token into deltas for the caller: holds back a
/// trailing replacement character (an incomplete multi-byte character whose other bytes
/// are in the next token) and any suffix that may be the start of a stop string.
#[derive(Debug)]
pub(crate) struct TextStream<'a> {
    stop: &'a [String],
    /// The text so far, as of the last push.
    text: String,
    /// Bytes of `text` already given to the caller.
    emitted: usize,
    /// Set when a stop string was found: the text is final.
    done: bool,
}

impl<'a> TextStream<'a> {
    pub(crate) fn new(stop: &'a [String]) -> Self {
        Self {
            stop,
            text: String::new(),
            emitted: 0,
            done: false,
        }
    }

    /// `full`: the decoded text of all generated tokens. Emits what is safe; returns the
    /// index of the stop string found, if any (the text is then cut before it).
    pub(crate) fn push(&mut self, full: &str, on_text: &mut impl FnMut(&str)) -> Option<usize> {
        // Decoding is prefix-stable except for the trailing replacement characters of an
        // incomplete UTF-8 sequence, which we never emit.
        self.text = full.to_string();
        let found = self
            .stop
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.text.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, i)) = found {
            self.text.truncate(at);
            self.done = true;
            self.emit_to(self.text.len(), on_text);
            return Some(i);
        }
        let mut safe = self.text.trim_end_matches('\u{FFFD}').len();
        // Hold back the longest suffix that is a proper prefix of a stop string.
        let mut hold = 0;
        for s in self.stop {
            for (k, _) in s.char_indices().skip(1) {
                if self.text[..safe].ends_with(&s[..k]) {
                    hold = hold.max(k);
                }
            }
        }
        safe -= hold;
        self.emit_to(safe, on_text);
        None
    }

    fn emit_to(&mut self, end: usize, on_text: &mut impl FnMut(&str)) {
        if end > self.emitted && self.text.is_char_boundary(end) {
            on_text(&self.text[self.emitted..end]);
            self.emitted = end;
        }
    }

    /// Emits what was held back (the generation is over, so a partial stop string is plain
    /// text) and returns the final text. A trailing replacement character stays: the
    /// tokens really ended mid-character.
    pub(crate) fn finish(mut self, on_text: &mut impl FnMut(&str)) -> String {
        let end = self.text.len();
        self.emit_to(end, on_text);
        self.text
    }
}

/// Chooses tokens from logits; owns the seeded RNG.
#[derive(Debug)]
struct Sampler {
    sampling: Sampling,
    repeat: Option<RepeatPenalty>,
    rng: SplitMix64,
}

impl Sampler {
    fn new(p: &GenerateParams) -> Self {
        let seed = match p.sampling {
            Sampling::Temperature { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Self {
            sampling: p.sampling,
            repeat: p.repeat_penalty,
            rng: SplitMix64::new(seed),
        }
    }

    /// `logits: (vocab,)` f32; `history`: prompt and generated ids so far.
    fn next(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        let mut logits: Vec<f32> = logits.to_vec1()?;
        if let Some(r) = self.repeat {
            let from = history.len().saturating_sub(r.last_n);
            let mut seen = history[from..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / r.penalty
                    } else {
                        *l * r.penalty
                    };
                }
            }
        }
        Ok(match self.sampling {
            Sampling::Greedy => argmax(&logits),
            Sampling::Temperature {
                temperature,
                top_k,
                top_p,
                min_p,
                ..
            } => {
                let mut cand: Vec<(u32, f32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, l))
                    .collect();
                cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                if let Some(k) = top_k {
                    cand.truncate(k.max(1));
                }
                let probs = |c: &[(u32, f32)], t: f32| -> Vec<f32> {
                    let m = c[0].1;
                    let e: Vec<f32> = c.iter().map(|&(_, l)| ((l - m) / t).exp()).collect();
                    let s: f32 = e.iter().sum();
                    e.into_iter().map(|x| x / s).collect()
                };
                if let Some(tp) = top_p {
                    let p = probs(&cand, 1.0);
                    let mut acc = 0.0;
                    let mut keep = cand.len();
                    for (i, x) in p.iter().enumerate() {
                        acc += x;
                        if acc >= tp {
                            keep = i + 1;
                            break;
                        }
                    }
                    cand.truncate(keep.max(1));
                }
                if let Some(mp) = min_p {
                    let p = probs(&cand, 1.0);
                    let keep = p.iter().take_while(|&&x| x >= mp * p[0]).count();
                    cand.truncate(keep.max(1));
                }
                let p = probs(&cand, temperature);
                let u = self.rng.next_f32();
                let mut acc = 0.0;
                let mut pick = cand[cand.len() - 1].0;
                for (x, &(id, _)) in p.iter().zip(&cand) {
                    acc += x;
                    if u < acc {
                        pick = id;
                        break;
                    }
                }
                pick
            }
        })
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stop: &[&str], steps: &[&str]) -> (Vec<String>, String, Option<usize>) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream::new(&stop);
        let mut out = Vec::new();
        let mut found = None;
        for step in steps {
            found = s.push(step, &mut |d: &str| out.push(d.to_string()));
            if found.is_some() {
                break;
            }
        }
        let text = s.finish(&mut |d: &str| out.push(d.to_string()));
        (out, text, found)
    }

    #[test]
    fn an_emoji_split_across_tokens_is_emitted_whole() {
        // "hi 😀!" decoded after each of four tokens: the emoji's bytes arrive in two tokens,
        // so the intermediate decode ends in a replacement character.
        let (out, text, _) = run(&[], &["hi", "hi \u{FFFD}", "hi 😀", "hi 😀!"]);
        assert_eq!(out, ["hi", " ", "😀", "!"]);
        assert_eq!(out.concat(), text);
    }

    #[test]
    fn a_stop_string_is_cut_and_never_streamed() {
        let (out, text, found) = run(
            &["\nUser:"],
            &["Yes", "Yes.\n", "Yes.\nUs", "Yes.\nUser: no"],
        );
        assert_eq!(found, Some(0));
        assert_eq!(text, "Yes.");
        assert_eq!(out.concat(), "Yes.");
        assert!(out.iter().all(|d| !d.contains('\n')), "{out:?}");
    }

    #[test]
    fn a_held_back_partial_stop_is_released_at_the_end() {
        let (out, text, found) = run(&["END"], &["ok E", "ok EN"]);
        assert_eq!(found, None);
        assert_eq!(out, ["ok ", "EN"]);
        assert_eq!(text, "ok EN");
    }

    fn sampler(sampling: Sampling) -> Sampler {
        Sampler::new(&GenerateParams {
            sampling,
            ..Default::default()
        })
    }

    #[test]
    fn sampling_is_seeded_and_filters_apply() {
        let logits =
            Tensor::new(&[1.0f32, 3.0, 2.0, 0.5], &candle_core::Device::Cpu).expect("test");
        assert_eq!(
            sampler(Sampling::Greedy).next(&logits, &[]).expect("test"),
            1
        );
        let t = |seed, top_k| Sampling::Temperature {
            temperature: 1.0,
            top_k,
            top_p: None,
            min_p: None,
            seed,
        };
        let draw = |s: Sampling| {
            let mut sm = sampler(s);
            (0..50)
                .map(|_| sm.next(&logits, &[]).expect("test"))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(t(7, None)), draw(t(7, None)));
        assert_ne!(draw(t(7, None)), draw(t(8, None)));
        assert!(draw(t(7, Some(1))).iter().all(|&x| x == 1));
        assert!(draw(t(7, Some(2))).iter().all(|&x| x == 1 || x == 2));
        // min_p 0.5: only tokens with p >= 0.5 * p(top) survive (ids 1 and 2: e^-1 = 0.37 < 0.5
        // drops id 2 too).
        let mp = Sampling::Temperature {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            min_p: Some(0.5),
            seed: 1,
        };
        assert!(draw(mp).iter().all(|&x| x == 1));
    }

    #[test]
    fn repeat_penalty_demotes_seen_tokens() {
        let logits = Tensor::new(&[1.0f32, 3.0, 2.5], &candle_core::Device::Cpu).expect("test");
        let mut s = Sampler::new(&GenerateParams {
            repeat_penalty: Some(RepeatPenalty {
                penalty: 2.0,
                last_n: 64,
            }),
            ..Default::default()
        });
        assert_eq!(s.next(&logits, &[1]).expect("test"), 2);
    }

    /// The tiny llama of `props::tests::tiny` (2 layers, hidden 8, vocabulary 6) with seeded
    /// F32 weights, written to a GGUF file and loaded; every token is plain text.
    fn tiny_model() -> (LlamaModel, Tokenizer) {
        use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
        use candle_core::Device;
        use gguf_file::Value;

        let mut md = crate::props::tests::tiny();
        md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        md.insert("tokenizer.ggml.pre".into(), Value::String("smollm".into()));
        md.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array((0..6).map(|_| Value::I32(1)).collect()),
        );
        md.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("a b".into())]),
        );
        let mut rng = SplitMix64::new(7);
        // The weights these tests were written with start at the second draw.
        rng.next_u64();
        let mut tensor = |name: String, shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| (rng.next_f32() - 0.5) * 0.8).collect();
            let t = Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor");
            (
                name,
                QTensor::quantize(&t, GgmlDType::F32).expect("f32 qtensor"),
            )
        };
        // GGUF dims are (out, in) in candle's order for a weight of `in` -> `out`.
        let mut tensors = vec![
            tensor("token_embd.weight".into(), &[6, 8]),
            tensor("output_norm.weight".into(), &[8]),
        ];
        for i in 0..2 {
            for (name, shape) in [
                ("attn_norm", &[8][..]),
                ("attn_q", &[8, 8]),
                ("attn_k", &[4, 8]),
                ("attn_v", &[4, 8]),
                ("attn_output", &[8, 8]),
                ("ffn_norm", &[8]),
                ("ffn_gate", &[16, 8]),
                ("ffn_up", &[16, 8]),
                ("ffn_down", &[8, 16]),
            ] {
                tensors.push(tensor(format!("blk.{i}.{name}.weight"), shape));
            }
        }
        let path =
            std::env::temp_dir().join(format!("ragtune-session-test-{}.gguf", std::process::id()));
        {
            let mut f = std::fs::File::create(&path).expect("create gguf");
            let pairs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
            gguf_file::write(&mut f, &pairs, &ts).expect("write gguf");
        }
        let model = LlamaModel::from_gguf(&path).expect("load tiny model");
        let tokenizer = Tokenizer::from_metadata(&md).expect("tokenizer");
        let _ = std::fs::remove_file(&path);
        (model, tokenizer)
    }

    #[test]
    fn a_cancel_flag_ends_generation_with_what_it_has() {
        let (model, tokenizer) = tiny_model();
        let gen = Generator::new(&model, &tokenizer, &[]);
        let prompt = [2u32, 3, 4, 5];
        let mut cache = model.new_cache(64).expect("cache");

        // Uncancelled: runs to max_new_tokens.
        let flag = Arc::new(AtomicBool::new(false));
        let params = GenerateParams {
            max_new_tokens: 40,
            cancel: Some(flag.clone()),
            ..Default::default()
        };
        let full = gen
            .generate(&mut cache, &prompt, &params, |_| {})
            .expect("generate");
        assert_eq!(full.stop, StopReason::MaxTokens);
        assert_eq!(full.tokens.len(), 40);

        // Set from the callback after the first delta: stops at the next check.
        let mut deltas = Vec::new();
        let g = gen
            .generate(&mut cache, &prompt, &params, |d| {
                deltas.push(d.to_string());
                flag.store(true, Ordering::Relaxed);
            })
            .expect("generate");
        assert_eq!(g.stop, StopReason::Cancelled);
        assert!(
            !g.tokens.is_empty() && g.tokens.len() <= 3,
            "{:?}",
            g.tokens
        );
        assert_eq!(g.tokens[..], full.tokens[..g.tokens.len()]);
        assert_eq!(deltas.concat(), g.text);

        // Already set: nothing is computed, and it is not an error.
        let g = gen
            .generate(&mut cache, &prompt, &params, |_| {})
            .expect("generate");
        assert_eq!(g.stop, StopReason::Cancelled);
        assert!(g.tokens.is_empty() && g.text.is_empty());
    }

    #[test]
    fn bad_params_are_named() {
        let p = GenerateParams {
            sampling: Sampling::Temperature {
                temperature: 0.0,
                top_k: None,
                top_p: None,
                min_p: None,
                seed: 0,
            },
            ..Default::default()
        };
        assert!(validate(&p)
            .expect_err("test")
            .to_string()
            .contains("temperature"));
    }
}
