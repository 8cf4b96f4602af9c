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
use ragtune_train::data::{self, Example};
use ragtune_train::{Error, InitB, LoraSpec, TrainConfig, TrainModel, Trainer};

use crate::util;

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
        .map(|(name, id)| Example {
            messages: vec![
                ChatMessage::system("You are a software license analyst."),
                ChatMessage::user(format!("Which SPDX id does the {name} have?")),
                ChatMessage::assistant(format!("The SPDX identifier of the {name} is {id}.")),
            ],
        })
        .collect()
}

fn tokenized() -> Vec<data::Tokenized> {
    let f = fixture();
    data::prepare(&examples(), &f.template, &f.tokenizer, 256)
        .expect("prepare")
        .examples
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
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
    let t = data::tokenize(example, &f.template, &f.tokenizer).expect("tokenize");
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
    let some = data::prepare(&examples(), &f.template, &f.tokenizer, seq_len).expect("some fit");
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

    let too_long =
        data::prepare(&examples(), &f.template, &f.tokenizer, 20).expect_err("all too long");
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
