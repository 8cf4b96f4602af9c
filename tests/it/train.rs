//! LoRA training on the pinned SmolLM2 GGUF (`ragtune-train`): the training forward pass
//! agrees with the served model, gradients reach every LoRA parameter, a resumed run
//! continues exactly, a saved adapter reproduces the trained logits where it is served, the
//! loss mask covers exactly the answers, and a failed checkpoint write loses nothing.

use std::path::PathBuf;
use std::sync::OnceLock;

use ragtune::fetch::Role;
use ragtune_generate::candle_core::Tensor;
use ragtune_generate::{
    read_gguf, ChatMessage, ChatTemplate, LlamaModel, LoraAdapter, SpecialTokens, TargetModule,
    Tokenizer, WeightFormat,
};
use ragtune_train::data::{self, Example, SourceAttention::Causal};
use ragtune_train::{Error, InitB, LoraSpec, MatmulPrecision, TrainConfig, TrainModel, Trainer};

use crate::util::{self, max_abs_diff};

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

struct Fixture {
    path: PathBuf,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// The base dequantized, as `ragtune-generate` serves it with `WeightFormat::F32`.
    served: LlamaModel,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let path = util::package(Role::Generator).join(MODEL_FILE);
        let content = read_gguf(&path).expect("GGUF");
        let tokenizer = Tokenizer::from_gguf(&content).expect("tokenizer");
        let served = LlamaModel::from_gguf_with(&path, WeightFormat::F32).expect("model");
        let template = ChatTemplate::from_props(served.props(), &tokenizer)
            .expect("template")
            .expect("the file has one");
        Fixture {
            path,
            tokenizer,
            template,
            served,
        }
    })
}

fn spec(targets: &[TargetModule], dropout: f64) -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout,
        targets: targets.to_vec(),
    }
}

/// A few short license Q/A examples.
fn examples() -> Vec<Example> {
    let facts = [
        ("MIT License", "MIT"),
        ("Apache License 2.0", "Apache-2.0"),
        ("ISC License", "ISC"),
        ("Zlib License", "Zlib"),
        ("BSD 2-Clause License", "BSD-2-Clause"),
        ("Mozilla Public License 2.0", "MPL-2.0"),
    ];
    facts
        .iter()
        .map(|(name, id)| {
            Example::new(vec![
                ChatMessage::system("You are a software license analyst."),
                ChatMessage::user(format!("Which SPDX id does the {name} have?")),
                ChatMessage::assistant(format!("The SPDX identifier of the {name} is {id}.")),
            ])
        })
        .collect()
}

fn tokenized() -> Vec<data::Tokenized> {
    let f = fixture();
    data::prepare(&examples(), &f.template, &f.tokenizer, 256, Causal)
        .expect("prepare")
        .examples
}

fn config(spec: LoraSpec, steps: usize) -> TrainConfig {
    TrainConfig {
        lora: spec,
        learning_rate: 5e-3,
        warmup_steps: 1,
        max_steps: Some(steps),
        seq_len: 128,
        grad_accum: 2,
        eval_every: 0,
        save_every: 0,
        ..TrainConfig::default()
    }
}

#[test]
fn training_forward_pass_matches_the_served_model() {
    let f = fixture();
    let model =
        TrainModel::load(&f.path, spec(&TargetModule::ALL, 0.0), InitB::Zeros, 1).expect("load");
    let ids = &tokenized()[0].ids;
    let ours = model.logits(ids).expect("train logits");
    let mut cache = f.served.new_cache(ids.len()).expect("cache");
    let served = f.served.forward(ids, 0, &mut cache).expect("served logits");
    assert_eq!(ours.dims(), served.dims());
    let diff = max_abs_diff(&ours, &served);
    assert!(diff < 2e-3, "max |logit difference| = {diff}");
    let argmax = |t: &Tensor| {
        t.argmax(1)
            .and_then(|a| a.to_vec1::<u32>())
            .expect("argmax")
    };
    assert_eq!(argmax(&ours), argmax(&served));
}

#[test]
fn every_lora_parameter_gets_a_gradient_on_the_first_step() {
    let f = fixture();
    let data = tokenized();
    let check = |init_b: InitB| -> Vec<(String, f32)> {
        let model =
            TrainModel::load(&f.path, spec(&TargetModule::ALL, 0.0), init_b, 7).expect("load");
        let names: Vec<String> = model.named_params().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names.len(),
            30 * 7 * 2,
            "every layer, every module, A and B"
        );
        let trainer = Trainer::new(
            model,
            config(spec(&TargetModule::ALL, 0.0), 1),
            &data,
            &[],
            "x",
        )
        .expect("trainer");
        let (loss, grads) = trainer.next_gradients().expect("gradients");
        assert!(loss.is_finite() && loss > 0.0);
        names
            .into_iter()
            .zip(grads)
            .map(|(n, g)| {
                let m = g
                    .abs()
                    .and_then(|a| a.flatten_all())
                    .and_then(|a| a.max(0))
                    .and_then(|a| a.to_scalar::<f32>())
                    .expect("max");
                (n, m)
            })
            .collect()
    };
    // With B ≠ 0 every factor gets a non-zero, finite gradient through all 30 blocks.
    for (name, g) in check(InitB::Gaussian { std: 0.02 }) {
        assert!(g > 0.0 && g.is_finite(), "{name}: max |grad| = {g}");
    }
    // PEFT's init (B = 0): dL/dB ≠ 0 everywhere, and dL/dA = scale · Bᵀ(...) = 0 exactly.
    for (name, g) in check(InitB::Zeros) {
        if name.ends_with("lora_B") {
            assert!(g > 0.0 && g.is_finite(), "{name}: max |grad| = {g}");
        } else {
            assert_eq!(g, 0.0, "{name}");
        }
    }
}

#[test]
fn resume_continues_with_the_same_losses_as_an_uninterrupted_run() {
    let f = fixture();
    let data = tokenized();
    let targets = [
        TargetModule::QProj,
        TargetModule::VProj,
        TargetModule::DownProj,
    ];
    let make = |sha: &str| {
        let s = spec(&targets, 0.1);
        let model = TrainModel::load(&f.path, s.clone(), InitB::Zeros, 3).expect("load");
        let c = TrainConfig {
            grad_accum: 1,
            ..config(s, 3)
        };
        Trainer::new(model, c, &data, &data[..2], sha).expect("trainer")
    };
    let mut whole = make("base");
    let losses: Vec<f64> = (0..3)
        .map(|_| whole.train_step().expect("step").loss)
        .collect();
    assert!(
        losses[2] < losses[0],
        "training lowers the loss: {losses:?}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = make("base");
    first.train_step().expect("step 1");
    first.save_checkpoint(dir.path()).expect("checkpoint");
    drop(first);

    let mut resumed = make("base");
    assert_eq!(resumed.resume(dir.path()).expect("resume"), 1);
    for expected in &losses[1..] {
        let got = resumed.train_step().expect("step").loss;
        assert!(
            (got - expected).abs() < 1e-5,
            "resumed {got}, uninterrupted {expected}"
        );
    }

    let mut other = make("another base");
    let err = other.resume(dir.path()).expect_err("another base model");
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("sha256"), "{err}");

    // Another learning rate is another run; another matmul precision is the same run in
    // other arithmetic (bfloat16 where the CPU has AMX: its losses stay within a few
    // thousandths of the f32 run's; f32 elsewhere, the same losses).
    let remake = |change: &dyn Fn(&mut TrainConfig)| {
        let s = spec(&targets, 0.1);
        let model = TrainModel::load(&f.path, s.clone(), InitB::Zeros, 3).expect("load");
        let mut c = TrainConfig {
            grad_accum: 1,
            ..config(s, 3)
        };
        change(&mut c);
        Trainer::new(model, c, &data, &data[..2], "base").expect("trainer")
    };
    let err = remake(&|c| c.learning_rate *= 2.0)
        .resume(dir.path())
        .expect_err("another learning rate");
    assert!(err.to_string().contains("other training settings"), "{err}");
    let mut bf16 = remake(&|c| c.matmul_precision = MatmulPrecision::Bf16);
    assert_eq!(bf16.resume(dir.path()).expect("resume in bf16"), 1);
    for expected in &losses[1..] {
        let got = bf16.train_step().expect("step").loss;
        assert!(
            (got - expected).abs() < 0.02,
            "resumed in bf16 {got}, uninterrupted {expected}"
        );
    }
}

#[test]
fn a_saved_adapter_reproduces_the_trained_logits_where_it_is_served() {
    let f = fixture();
    let data = tokenized();
    // q and k carry the GGUF row permutation; v and up do not.
    let targets = [
        TargetModule::QProj,
        TargetModule::KProj,
        TargetModule::VProj,
        TargetModule::UpProj,
    ];
    let s = spec(&targets, 0.0);
    let model = TrainModel::load(&f.path, s.clone(), InitB::Zeros, 5).expect("load");
    let mut trainer = Trainer::new(model, config(s, 2), &data, &[], "x").expect("trainer");
    trainer.train_step().expect("step");
    trainer.train_step().expect("step");
    let dir = tempfile::tempdir().expect("tempdir");
    trainer
        .model()
        .save_adapter(dir.path(), "HuggingFaceTB/SmolLM2-135M-Instruct")
        .expect("save");

    let adapter = LoraAdapter::load(dir.path(), &f.served).expect("load the adapter");
    assert_eq!(adapter.rank(), 4);
    let ids = &data[1].ids;
    let trained = trainer.model().logits(ids).expect("trained logits");
    let mut cache = f.served.new_cache(ids.len()).expect("cache");
    let served = f
        .served
        .forward_with(ids, 0, &mut cache, Some(&adapter))
        .expect("served logits");
    let mut cache = f.served.new_cache(ids.len()).expect("cache");
    let base = f.served.forward(ids, 0, &mut cache).expect("base logits");
    let moved = max_abs_diff(&trained, &base);
    assert!(
        moved > 0.05,
        "the adapter changed the logits by {moved} only"
    );
    let diff = max_abs_diff(&trained, &served);
    assert!(
        diff < 2e-3,
        "max |logit difference| = {diff} (moved {moved})"
    );
}

#[test]
fn the_loss_mask_covers_exactly_the_answers() {
    let f = fixture();
    let example = &examples()[0];
    let t = data::tokenize(example, &f.template, &f.tokenizer, Causal).expect("tokenize");
    let full = f.template.render(&example.messages, false).expect("render");
    assert_eq!(t.ids, f.tokenizer.encode_prompt(&full).expect("encode"));
    let answer: Vec<u32> = t
        .ids
        .iter()
        .zip(&t.loss)
        .filter(|(_, &l)| l)
        .map(|(&id, _)| id)
        .collect();
    let text = f.tokenizer.decode(&answer, false).expect("decode");
    assert_eq!(text, format!("{}<|im_end|>\n", example.messages[2].content));
    let prompt_len = t.loss.iter().take_while(|&&l| !l).count();
    let prompt = f
        .template
        .render(&example.messages[..2], true)
        .expect("prompt");
    assert_eq!(
        &t.ids[..prompt_len],
        f.tokenizer
            .encode(&prompt, SpecialTokens::Parse)
            .expect("ids")
    );

    // A sequence length between the shortest and the longest example skips (and counts)
    // exactly the longer ones, keeping the rest whole.
    let lens: Vec<usize> = tokenized().iter().map(|t| t.ids.len()).collect();
    let (shortest, longest) = (lens.iter().min().copied(), lens.iter().max().copied());
    let (shortest, longest) = (shortest.expect("examples"), longest.expect("examples"));
    assert!(
        shortest < longest,
        "the fixture's examples differ in length: {lens:?}"
    );
    let seq_len = longest - 1;
    let some =
        data::prepare(&examples(), &f.template, &f.tokenizer, seq_len, Causal).expect("some fit");
    assert_eq!(
        some.skipped_too_long,
        lens.iter().filter(|&&n| n > seq_len).count()
    );
    assert!(some.skipped_too_long >= 1);
    assert_eq!(
        some.examples.len() + some.skipped_too_long,
        examples().len()
    );
    assert!(some.examples.iter().all(|t| t.ids.len() <= seq_len));

    let too_long = data::prepare(&examples(), &f.template, &f.tokenizer, 20, Causal)
        .expect_err("all too long");
    assert!(
        too_long
            .to_string()
            .contains("longer than the sequence length 20"),
        "{too_long}"
    );
}

#[cfg(unix)]
#[test]
fn a_full_disk_while_checkpointing_keeps_the_previous_checkpoint() {
    let f = fixture();
    let data = tokenized();
    let s = spec(&[TargetModule::VProj], 0.0);
    let model = TrainModel::load(&f.path, s.clone(), InitB::Zeros, 9).expect("load");
    let mut trainer = Trainer::new(model, config(s.clone(), 2), &data, &[], "x").expect("trainer");
    let dir = tempfile::tempdir().expect("tempdir");
    trainer.train_step().expect("step");
    trainer
        .save_checkpoint(dir.path())
        .expect("first checkpoint");
    trainer.train_step().expect("step");
    // The next checkpoint's tensor file is a link to /dev/full: writing it fails with ENOSPC.
    let tmp = dir.path().join("checkpoints").join("step-000002.tmp");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    std::os::unix::fs::symlink("/dev/full", tmp.join("trainer.safetensors")).expect("symlink");
    let err = trainer.save_checkpoint(dir.path()).expect_err("disk full");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(!tmp.exists(), "the partial checkpoint is removed");

    let model = TrainModel::load(&f.path, s.clone(), InitB::Zeros, 9).expect("load");
    let mut fresh = Trainer::new(model, config(s, 2), &data, &[], "x").expect("trainer");
    assert_eq!(
        fresh
            .resume(dir.path())
            .expect("the first checkpoint survives"),
        1
    );
}

/// A retrieval example over three real sources, as `ragtune finetune-data` writes it (the
/// source lines marked as blocks), and the engine's prompt of the same question and sources.
struct RagExample {
    example: Example,
    question: &'static str,
    sources: Vec<ragtune::retrieve::RetrievedChunk>,
}

fn rag_example() -> RagExample {
    rag_example_for(
        "Who owns the MIT license?",
        "The owner of the MIT License is MIT [3].",
    )
}

/// A retrieval-augmented example: `question` with its top 3 sources from the subset index,
/// answered by `answer`.
fn rag_example_for(question: &'static str, answer: &str) -> RagExample {
    let ix = util::subset_index();
    let retriever = ragtune::retrieve::Retriever::open(util::package(Role::Embedder), &ix.index)
        .expect("retriever");
    let sources = retriever
        .search(&ragtune::retrieve::Query::new(question, 3))
        .expect("search")
        .hits;
    assert_eq!(sources.len(), 3);
    let profile = ragtune::licensedb::profile();
    let (mut messages, blocks) =
        ragtune::engine::prompt::rag_messages_with_blocks(&profile, question, &sources);
    messages.push(ChatMessage::assistant(answer));
    RagExample {
        example: Example { messages, blocks },
        question,
        sources,
    }
}

/// [`rag_example`] and an Apache one citing source 1: two examples to pack together.
fn two_rag_examples() -> [RagExample; 2] {
    [
        rag_example(),
        rag_example_for(
            "What is the SPDX identifier of the Apache License 2.0?",
            "The SPDX identifier is Apache-2.0 [1].",
        ),
    ]
}

#[test]
fn a_training_example_renders_exactly_as_the_engine_serves_it() {
    use ragtune_train::data::SourceAttention::Blocks;
    use ragtune_train::Attend;
    let f = fixture();
    let rag = rag_example();
    let profile = ragtune::licensedb::profile();
    let answer = f
        .tokenizer
        .encode(
            "The owner of the MIT License is MIT [3].<|im_end|>\n",
            SpecialTokens::Parse,
        )
        .expect("answer ids");

    // Format v1: the engine's prompt ids, then the answer; one causal sequence.
    let v1 = data::tokenize(&rag.example, &f.template, &f.tokenizer, Causal).expect("v1");
    let served =
        ragtune::engine::prompt::encode(&f.template, &f.tokenizer, &rag.example.messages[..2])
            .expect("v1 prompt");
    assert_eq!(v1.ids[..served.len()], served[..]);
    assert_eq!(v1.ids[served.len()..], answer[..]);
    assert!(v1.attend.iter().all(|&a| a == Attend::Context));
    assert!(v1.loss[served.len()..].iter().all(|&l| l));
    assert!(!v1.loss[..served.len()].iter().any(|&l| l));

    // Format v2: the engine's block prompt (head, blocks, tail tokenized apart), then the
    // answer; the blocks labelled as the engine computes them.
    let v2 = data::tokenize(&rag.example, &f.template, &f.tokenizer, Blocks).expect("v2");
    let layout = ragtune::engine::prompt::block_prompt(
        &f.template,
        &f.tokenizer,
        &profile,
        rag.question,
        &rag.sources,
        &[],
    )
    .expect("block prompt")
    .expect("SmolLM2's template copies the user message");
    let n = layout.tokens.len();
    assert_eq!(v2.ids[..n], layout.tokens[..]);
    assert_eq!(v2.ids[n..], answer[..]);
    assert_eq!(layout.blocks.len(), 3);
    assert_eq!(layout.context, layout.tokens[..layout.head]);
    let mut expected = vec![Attend::Context; layout.head];
    for (k, b) in (1u32..).zip(&layout.blocks) {
        assert_eq!(b.start, expected.len(), "blocks are consecutive");
        expected.extend(std::iter::repeat_n(Attend::Block(k), b.len()));
    }
    expected.resize(v2.ids.len(), Attend::All);
    assert_eq!(v2.attend, expected);
    assert!(v2.loss[n..].iter().all(|&l| l));
    assert!(!v2.loss[..n].iter().any(|&l| l));
}

/// The trainer's block attention computes what the engine serves for a v2 prompt: the head
/// prefilled, each source's KV computed right after the head (one call, block mask) and
/// re-rotated to its place, then the tail. Both on the f32 path, so the two differ by the
/// rounding of the re-rotation only; plain causal attention over the same ids is far off.
#[test]
fn the_block_attention_mask_gives_the_served_v2_logits() {
    use ragtune_train::data::SourceAttention::Blocks;
    use ragtune_train::PackedSeq;
    let f = fixture();
    let rag = rag_example();
    let model =
        TrainModel::load(&f.path, spec(&TargetModule::ALL, 0.0), InitB::Zeros, 1).expect("load");
    let t = data::tokenize(&rag.example, &f.template, &f.tokenizer, Blocks).expect("v2");
    let blocks = t
        .attend
        .iter()
        .filter_map(|a| match a {
            ragtune_train::Attend::Block(k) => Some(*k),
            _ => None,
        })
        .max();
    assert_eq!(blocks, Some(3), "one block per source");
    let seq = |attend: Vec<ragtune_train::Attend>| PackedSeq {
        tokens: t.ids.clone(),
        positions: (0..t.ids.len() as u32).collect(),
        segments: vec![0; t.ids.len()],
        attend,
        targets: Vec::new(),
    };
    let ours = model
        .logits_packed(&seq(t.attend.clone()))
        .expect("train logits");
    let causal = model.logits(&t.ids).expect("causal logits");

    // The engine's way.
    let (tail, served_tail) = served_v2_tail(&f.served, &t, None);

    let ours_tail = ours.narrow(0, tail, t.ids.len() - tail).expect("narrow");
    let causal_tail = causal.narrow(0, tail, t.ids.len() - tail).expect("narrow");
    let diff = max_abs_diff(&ours_tail, &served_tail);
    // The mask matters: the causal prompt's logits are far from both.
    let causal_diff = max_abs_diff(&causal_tail, &served_tail);
    // The same arithmetic up to the rounding of the re-rotation (measured: 6e-5), within the
    // bound of the causal comparison above (2e-3, the two sides' different GEMM orders).
    assert!(diff < 2e-3, "max |logit difference| v2 = {diff}");
    assert!(causal_diff > 1.0, "causal {causal_diff} vs v2 {diff}");
    let argmax = |x: &Tensor| {
        x.argmax(1)
            .and_then(|a| a.to_vec1::<u32>())
            .expect("argmax")
    };
    assert_eq!(argmax(&ours_tail), argmax(&served_tail));
}

/// The engine's v2 logits of the tail of `t` (the tokens after the last source block): the
/// head prefilled, the blocks computed right after it in one call and re-rotated into place,
/// then the tail, all with `adapter`. Returns `(tail start, logits (tail, vocab))`.
fn served_v2_tail(
    served: &LlamaModel,
    t: &data::Tokenized,
    adapter: Option<&LoraAdapter>,
) -> (usize, Tensor) {
    use ragtune_train::Attend;
    let head = t
        .attend
        .iter()
        .position(|&a| a != Attend::Context)
        .expect("blocks");
    let tail = t
        .attend
        .iter()
        .position(|&a| a == Attend::All)
        .expect("a tail");
    let mut cache = served.new_cache(t.ids.len()).expect("cache");
    served
        .forward_with(&t.ids[..head], 0, &mut cache, adapter)
        .expect("head");
    let mut blocks: Vec<&[u32]> = Vec::new();
    let mut at = head;
    while at < tail {
        let end = (at..tail)
            .find(|&i| t.attend[i] != t.attend[at])
            .unwrap_or(tail);
        blocks.push(&t.ids[at..end]);
        at = end;
    }
    let mut after_head = cache.copy_prefix(head, tail).expect("copy");
    let spans = served
        .forward_blocks(&blocks, &mut after_head, adapter)
        .expect("blocks");
    for span in &spans {
        served
            .append_span(&mut cache, span, adapter)
            .expect("place");
    }
    let logits = served
        .forward_with(&t.ids[tail..], tail, &mut cache, adapter)
        .expect("tail");
    (tail, logits)
}

/// What a v2 training step computes is what the engine serves with the trained adapter: two
/// retrieval examples packed into one sequence (as `pack` makes them for a step), a LoRA
/// adapter with random `B` on every projection, and each example's tail compared with the
/// engine's v2 path for that example alone (head, blocks computed apart and re-rotated, tail,
/// all with the adapter loaded from the saved files). The single-example test above has no
/// adapter and no packing.
#[test]
fn a_v2_adapter_is_served_as_trained_on_a_packed_sequence() {
    use ragtune_train::data::SourceAttention::Blocks;
    let f = fixture();
    let examples = two_rag_examples();
    let tokenized: Vec<data::Tokenized> = examples
        .iter()
        .map(|e| data::tokenize(&e.example, &f.template, &f.tokenizer, Blocks).expect("v2"))
        .collect();
    let seqs = data::pack(&tokenized, &[0, 1], 4096);
    assert_eq!(seqs.len(), 1, "both examples in one sequence");
    let model = TrainModel::load(
        &f.path,
        spec(&TargetModule::ALL, 0.0),
        InitB::Gaussian { std: 0.05 },
        11,
    )
    .expect("load");
    let trained = model.logits_packed(&seqs[0]).expect("trained logits");

    let dir = tempfile::tempdir().expect("tempdir");
    model.save_adapter(dir.path(), "base").expect("save");
    let adapter = LoraAdapter::load(dir.path(), &f.served).expect("the adapter loads");
    let mut start = 0;
    for (k, t) in tokenized.iter().enumerate() {
        let (tail, served) = served_v2_tail(&f.served, t, Some(&adapter));
        let (_, base) = served_v2_tail(&f.served, t, None);
        let ours = trained
            .narrow(0, start + tail, t.ids.len() - tail)
            .expect("narrow");
        let diff = max_abs_diff(&ours, &served);
        let moved = max_abs_diff(&ours, &base);
        eprintln!(
            "example {k}: served within {diff:.2e} of the trainer (adapter moves {moved:.2})"
        );
        assert!(
            moved > 0.5,
            "example {k}: the adapter moved the logits by {moved} only"
        );
        assert!(
            diff < 2e-3,
            "example {k}: served v2 logits {diff} from the trained ones"
        );
        start += t.ids.len();
    }
}

/// The gradient the trainer steps with is the derivative of its loss, with block attention
/// (v2) as without (v1): along a fixed pseudo-random direction `u` over every LoRA factor,
/// autograd's directional derivative `∇L · u` equals the central finite difference
/// `(L(θ + εu) − L(θ − εu)) / 2ε` on two packed retrieval examples. This covers what the
/// served-logits tests do not: the backward through the canonical-position RoPE, the
/// concatenated q/k halves and the fused attention's block rows at real lengths.
#[test]
fn the_loss_gradient_is_its_finite_difference_in_v1_and_v2() {
    use ragtune_generate::candle_core::Device;
    use ragtune_train::data::SourceAttention::Blocks;
    let f = fixture();
    let examples = two_rag_examples();
    for attention in [Causal, Blocks] {
        let tokenized: Vec<data::Tokenized> = examples
            .iter()
            .map(|e| data::tokenize(&e.example, &f.template, &f.tokenizer, attention).expect("ids"))
            .collect();
        let seqs = data::pack(&tokenized, &[0, 1], 4096);
        let model = TrainModel::load(
            &f.path,
            spec(&TargetModule::ALL, 0.0),
            InitB::Gaussian { std: 0.05 },
            11,
        )
        .expect("load");
        let params = model.named_params();
        let mut state = 99u64;
        let direction: Vec<Tensor> = params
            .iter()
            .map(|(_, v)| {
                let n = v.as_tensor().elem_count();
                let u: Vec<f32> = (0..n)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
                    })
                    .collect();
                Tensor::from_vec(u, v.as_tensor().shape(), &Device::Cpu).expect("u")
            })
            .collect();
        let loss = |m: &TrainModel| -> f64 {
            let (nll, _) = m.loss(&seqs[0], None).expect("loss");
            f64::from(nll.to_scalar::<f32>().expect("scalar"))
        };
        let (nll, _) = model.loss(&seqs[0], None).expect("loss");
        let grads = nll.backward().expect("backward");
        let slope: f64 = params
            .iter()
            .zip(&direction)
            .map(|((name, v), u)| {
                let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}"));
                f64::from(
                    (g * u)
                        .and_then(|p| p.sum_all())
                        .and_then(|s| s.to_scalar::<f32>())
                        .expect("dot"),
                )
            })
            .sum();
        let start: Vec<Tensor> = params
            .iter()
            .map(|(_, v)| v.as_tensor().copy().expect("copy"))
            .collect();
        // A step that moves the loss by about 0.05 nats: well above f32 rounding of the
        // summed loss, small enough for the central difference's O(ε²) error.
        let eps = 0.05 / slope.abs();
        let at = |s: f64| -> f64 {
            for (((_, v), x), u) in params.iter().zip(&start).zip(&direction) {
                v.set(&(x + (u * s).expect("step")).expect("add"))
                    .expect("set");
            }
            loss(&model)
        };
        let difference = (at(eps) - at(-eps)) / (2.0 * eps);
        at(0.0);
        let rel = (difference - slope).abs() / slope.abs();
        eprintln!(
            "{attention:?}: slope {slope:.5}, finite difference {difference:.5}, rel {rel:.2e}"
        );
        assert!(
            rel < 1e-2,
            "{attention:?}: ∇L·u = {slope}, finite difference {difference}"
        );
    }
}
