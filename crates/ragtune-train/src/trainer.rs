//! The training loop: packed batches per step, gradient accumulation, AdamW with warmup +
//! cosine, evaluation loss, checkpoints and exact resume.
//!
//! **Determinism.** Everything random derives from [`TrainConfig::seed`]: the LoRA init, the
//! example order of each epoch (a Fisher-Yates shuffle seeded with `(seed, epoch)`), and the
//! dropout masks of each sequence (seeded with `(seed, step, sequence)`). So the whole step
//! plan is known up front, and a resumed run computes exactly what an uninterrupted run
//! would from the checkpoint's step on.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::checkpoint::{self, CheckpointState};
use crate::data::SourceAttention;
use crate::data::{pack, Tokenized};
use crate::frozen::MatmulPrecision;
use crate::model::{LoraSpec, PackedSeq, TrainModel};
use crate::optim::{clip_grad_norm, learning_rate, AdamW, AdamWParams};
use crate::{EmptyReason, Error, Result};

/// Hyper-parameters of a run. Saved in every checkpoint; a resume must use the same.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// What to adapt.
    pub lora: LoraSpec,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// The cosine ends at `learning_rate * min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// AdamW's moments and weight decay.
    pub adamw: AdamWParams,
    /// Passes over the training examples.
    pub epochs: usize,
    /// Stop after this many optimizer steps (`None`: all epochs).
    pub max_steps: Option<usize>,
    /// Tokens per packed sequence.
    pub seq_len: usize,
    /// Packed sequences per optimizer step (gradient accumulation).
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Evaluate on at most this many packed dev sequences.
    pub eval_max_seqs: usize,
    /// Save a checkpoint every this many steps (0: only at the end / on interrupt).
    pub save_every: usize,
    /// The seed of everything random.
    pub seed: u64,
    /// How the examples' source blocks were attended ([`data::prepare`](crate::data::prepare)
    /// takes it): recorded so that a resume with the other prompt format is refused.
    /// Checkpoints written before this field read as [`SourceAttention::Causal`].
    #[serde(default)]
    pub source_attention: SourceAttention,
    /// The arithmetic of the frozen weights' products ([`MatmulPrecision`]); checkpoints
    /// written before this field read as f32. The one setting a resume may change.
    #[serde(default)]
    pub matmul_precision: MatmulPrecision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lora: LoraSpec {
                rank: 16,
                alpha: 32.0,
                dropout: 0.05,
                targets: ragtune_generate::TargetModule::ALL.to_vec(),
            },
            learning_rate: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            adamw: AdamWParams::default(),
            epochs: 1,
            max_steps: None,
            seq_len: 512,
            grad_accum: 4,
            max_grad_norm: Some(1.0),
            eval_every: 25,
            eval_max_seqs: 32,
            save_every: 25,
            seed: 0,
            source_attention: SourceAttention::Causal,
            matmul_precision: MatmulPrecision::F32,
        }
    }
}

impl TrainConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the bad value.
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        let bad = |name, value: String, expected| {
            Err(Error::InvalidParameter {
                name,
                value,
                expected,
            })
        };
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            let lr = self.learning_rate.to_string();
            return bad("learning_rate", lr, "a positive finite learning rate");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(
                "min_lr_ratio",
                self.min_lr_ratio.to_string(),
                "a ratio in [0, 1]",
            );
        }
        if self.epochs == 0 {
            return bad("epochs", self.epochs.to_string(), "at least 1 epoch");
        }
        if self.seq_len < 2 {
            return bad(
                "seq_len",
                self.seq_len.to_string(),
                "a sequence length >= 2",
            );
        }
        if self.grad_accum == 0 {
            return bad(
                "grad_accum",
                self.grad_accum.to_string(),
                "at least 1 micro-batch",
            );
        }
        if self.max_steps == Some(0) {
            return bad(
                "max_steps",
                "0".to_string(),
                "at least 1 step (or no limit)",
            );
        }
        Ok(())
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepReport {
    /// 1-based step number.
    pub step: usize,
    /// Steps of the run.
    pub total_steps: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean cross-entropy per target token (nats).
    pub loss: f64,
    /// Tokens processed (prompt and answer).
    pub tokens: usize,
    /// Target (answer) tokens scored.
    pub targets: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Forward pass wall time, ms.
    pub forward_ms: f64,
    /// Backward pass wall time, ms.
    pub backward_ms: f64,
    /// Gradient accumulation, clipping and AdamW, ms.
    pub optimizer_ms: f64,
}

impl StepReport {
    /// Tokens per second of the whole step.
    pub fn tokens_per_s(&self) -> f64 {
        let ms = self.forward_ms + self.backward_ms + self.optimizer_ms;
        self.tokens as f64 / (ms / 1e3).max(1e-9)
    }
}

/// Something the loop reports to its caller (progress bar, loss log).
#[derive(Debug, Clone)]
pub enum Event {
    /// A step finished.
    Step(StepReport),
    /// The dev loss after `step` steps: mean nats per target token.
    Eval {
        /// Steps done.
        step: usize,
        /// Mean cross-entropy (nats).
        loss: f64,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Steps done.
        step: usize,
        /// Its directory.
        path: PathBuf,
    },
}

/// How a [`Trainer::run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// All steps done.
    Completed,
    /// The stop flag was raised (Ctrl-C); a checkpoint was saved.
    Interrupted,
}

/// A LoRA training run over a [`TrainModel`].
#[derive(Debug)]
pub struct Trainer {
    model: TrainModel,
    config: TrainConfig,
    /// The packed sequences of each step, for the whole run.
    plan: Vec<Vec<PackedSeq>>,
    dev: Vec<PackedSeq>,
    optimizer: AdamW,
    base_sha256: String,
    step: usize,
}

/// A 64-bit seed from a tag and numbers (FNV-1a; only has to be stable).
fn derive_seed(parts: &[u64]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for b in p.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

impl Trainer {
    /// Plans the run: packs `train` for every epoch (shuffled per epoch) into steps of
    /// `grad_accum` sequences, and `dev` once in order.
    ///
    /// `base_sha256` identifies the base model file; checkpoints record it and a resume
    /// refuses another base.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad config, [`Error::LoraSpecMismatch`] for a model
    /// whose LoRA spec differs from it; [`Error::EmptyDataset`] for no training example.
    pub fn new(
        mut model: TrainModel,
        config: TrainConfig,
        train: &[Tokenized],
        dev: &[Tokenized],
        base_sha256: impl Into<String>,
    ) -> Result<Self> {
        config.validate()?;
        if model.spec() != &config.lora {
            return Err(Error::LoraSpecMismatch {
                model: Box::new(model.spec().clone()),
                config: Box::new(config.lora.clone()),
            });
        }
        if train.is_empty() {
            return Err(Error::EmptyDataset {
                path: None,
                reason: EmptyReason::NoExample,
            });
        }
        let mut plan = Vec::new();
        for epoch in 0..config.epochs {
            let mut order: Vec<usize> = (0..train.len()).collect();
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(derive_seed(&[config.seed, 1, epoch as u64]));
            order.shuffle(&mut rng);
            let seqs = pack(train, &order, config.seq_len);
            for chunk in seqs.chunks(config.grad_accum) {
                plan.push(chunk.to_vec());
            }
        }
        if let Some(max) = config.max_steps {
            plan.truncate(max);
        }
        model.set_matmul_precision(config.matmul_precision);
        let dev_order: Vec<usize> = (0..dev.len()).collect();
        let mut dev = pack(dev, &dev_order, config.seq_len);
        dev.truncate(config.eval_max_seqs);
        let vars: Vec<_> = model.named_params().into_iter().map(|(_, v)| v).collect();
        let optimizer = AdamW::new(config.adamw.clone(), &vars)?;
        Ok(Self {
            model,
            config,
            plan,
            dev,
            optimizer,
            base_sha256: base_sha256.into(),
            step: 0,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &TrainModel {
        &self.model
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Steps done.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> usize {
        self.plan.len()
    }

    /// Tokens of the whole run (all steps).
    pub fn total_tokens(&self) -> usize {
        self.plan.iter().flatten().map(PackedSeq::len).sum()
    }

    /// The mean loss and the gradients (summed over the step's sequences, divided by their
    /// target count) of step `index`, without updating anything.
    ///
    /// # Errors
    /// Tensor errors.
    fn loss_and_grads(&self, index: usize) -> Result<(f64, Vec<Tensor>, usize, usize, f64, f64)> {
        let seqs = &self.plan[index];
        let targets: usize = seqs.iter().map(|s| s.targets.len()).sum();
        let tokens: usize = seqs.iter().map(PackedSeq::len).sum();
        let params = self.model.named_params();
        let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut loss_sum = 0.0f64;
        let (mut fwd, mut bwd) = (0.0, 0.0);
        for (j, seq) in seqs.iter().enumerate() {
            let mut rng = rand::rngs::StdRng::seed_from_u64(derive_seed(&[
                self.config.seed,
                2,
                index as u64,
                j as u64,
            ]));
            let t0 = Instant::now();
            let (nll, _) = self.model.loss(seq, Some(&mut rng))?;
            // The step's loss is the mean over all its target tokens.
            let scaled = (&nll / targets as f64)?;
            loss_sum += f64::from(nll.to_scalar::<f32>()?);
            let t1 = Instant::now();
            let store = scaled.backward()?;
            for (g, (_, var)) in grads.iter_mut().zip(&params) {
                if let Some(new) = store.get(var.as_tensor()) {
                    *g = Some(match g.take() {
                        Some(old) => (old + new)?,
                        None => new.clone(),
                    });
                }
            }
            fwd += (t1 - t0).as_secs_f64() * 1e3;
            bwd += t1.elapsed().as_secs_f64() * 1e3;
        }
        let grads = grads
            .into_iter()
            .zip(&params)
            .map(|(g, (_, v))| match g {
                Some(g) => Ok(g),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((loss_sum / targets as f64, grads, tokens, targets, fwd, bwd))
    }

    /// The gradients of the next step's loss with respect to every LoRA parameter (in
    /// [`TrainModel::named_params`] order) and that loss, without updating anything. For
    /// gradient checks.
    ///
    /// # Errors
    /// [`Error::NoStepLeft`] when the run is over; tensor errors.
    pub fn next_gradients(&self) -> Result<(f64, Vec<Tensor>)> {
        if self.step >= self.plan.len() {
            return Err(Error::NoStepLeft {
                total_steps: self.plan.len(),
            });
        }
        let (loss, grads, ..) = self.loss_and_grads(self.step)?;
        Ok((loss, grads))
    }

    /// Runs the next optimizer step.
    ///
    /// # Errors
    /// [`Error::NoStepLeft`] when the run is over; tensor errors.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let index = self.step;
        if index >= self.plan.len() {
            return Err(Error::NoStepLeft {
                total_steps: self.plan.len(),
            });
        }
        let (loss, mut grads, tokens, targets, forward_ms, backward_ms) =
            self.loss_and_grads(index)?;
        let t0 = Instant::now();
        let grad_norm = match self.config.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, max)?,
            None => clip_grad_norm(&mut grads, f64::INFINITY)?,
        };
        let c = &self.config;
        let lr = learning_rate(
            index,
            self.plan.len(),
            c.warmup_steps,
            c.learning_rate,
            c.min_lr_ratio,
        );
        let params = self.model.named_params();
        let vars: Vec<_> = params.iter().map(|(_, v)| *v).collect();
        self.optimizer.step(&vars, &grads, lr)?;
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            total_steps: self.plan.len(),
            lr,
            loss,
            tokens,
            targets,
            grad_norm,
            forward_ms,
            backward_ms,
            optimizer_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Mean cross-entropy per target token (nats) over the dev sequences; `None` without dev
    /// data. No dropout.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn eval_loss(&self) -> Result<Option<f64>> {
        if self.dev.is_empty() {
            return Ok(None);
        }
        let (mut sum, mut n) = (0.0f64, 0usize);
        for seq in &self.dev {
            let (nll, count) = self.model.loss(seq, None)?;
            sum += f64::from(nll.detach().to_scalar::<f32>()?);
            n += count;
        }
        Ok(Some(sum / n as f64))
    }

    /// Writes a checkpoint of the current step under `dir/checkpoints/` (see
    /// [`crate::checkpoint`]) and returns its directory.
    ///
    /// # Errors
    /// [`Error::Io`] (a full disk included): the previous checkpoint is left as it was.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<PathBuf> {
        let params = self.model.named_params();
        let (m, v) = self.optimizer.moments();
        let state = CheckpointState {
            step: self.step,
            optimizer_steps: self.optimizer.steps(),
            base_sha256: self.base_sha256.clone(),
            config: self.config.clone(),
            total_steps: self.plan.len(),
        };
        checkpoint::save(dir, &state, &params, m, v)
    }

    /// Continues from the latest checkpoint under `dir/checkpoints/`.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when there is none, it is unreadable, or it was made for another
    /// base model (sha256 differs), another configuration, or another data set (a different
    /// number of steps). Only [`TrainConfig::matmul_precision`] may differ from the
    /// checkpoint's: the run goes on in this trainer's.
    pub fn resume(&mut self, dir: &Path) -> Result<usize> {
        let (path, state, tensors) = checkpoint::load_latest(dir)?;
        let fail = |message: String| Error::Checkpoint {
            path: path.clone(),
            message,
        };
        if state.base_sha256 != self.base_sha256 {
            return Err(fail(format!(
                "it was trained on a base model with sha256 {}, this one is {}: pass the \
                 same --gguf, or start a new run in another directory",
                state.base_sha256, self.base_sha256
            )));
        }
        // The precision of the frozen products is arithmetic, not the plan: a run may go on
        // in another one (to switch to bfloat16 midway).
        let planned = TrainConfig {
            matmul_precision: self.config.matmul_precision,
            ..state.config.clone()
        };
        if planned != self.config {
            return Err(fail(
                "it was made with other training settings: pass the same flags as the \
                 interrupted run"
                    .into(),
            ));
        }
        if state.total_steps != self.plan.len() {
            return Err(fail(format!(
                "it planned {} steps and this data gives {}: resume with the same data files",
                state.total_steps,
                self.plan.len()
            )));
        }
        self.model
            .set_params(&tensors)
            .map_err(|e| fail(e.to_string()))?;
        let params = self.model.named_params();
        let take = |prefix: &str| -> Result<Vec<Tensor>> {
            params
                .iter()
                .map(|(name, _)| {
                    tensors
                        .get(&format!("{prefix}{name}"))
                        .cloned()
                        .ok_or_else(|| fail(format!("no optimizer state {prefix}{name}")))
                })
                .collect()
        };
        let (m, v) = (take("adam_m.")?, take("adam_v.")?);
        self.optimizer.restore(m, v, state.optimizer_steps);
        self.step = state.step;
        Ok(self.step)
    }

    /// Runs the remaining steps, evaluating and checkpointing under `dir` as configured,
    /// reporting each [`Event`]. When `stop` is raised (Ctrl-C), finishes the current step,
    /// saves a checkpoint and returns [`Finish::Interrupted`].
    ///
    /// # Errors
    /// As [`train_step`](Self::train_step), [`eval_loss`](Self::eval_loss) and
    /// [`save_checkpoint`](Self::save_checkpoint).
    pub fn run(
        &mut self,
        dir: &Path,
        stop: &AtomicBool,
        mut on_event: impl FnMut(Event),
    ) -> Result<Finish> {
        let c = self.config.clone();
        while self.step < self.plan.len() {
            let report = self.train_step()?;
            let step = report.step;
            on_event(Event::Step(report));
            let last = step == self.plan.len();
            if (c.eval_every > 0 && step % c.eval_every == 0) || last {
                if let Some(loss) = self.eval_loss()? {
                    on_event(Event::Eval { step, loss });
                }
            }
            let interrupted = stop.load(Ordering::SeqCst);
            if (c.save_every > 0 && step % c.save_every == 0) || last || interrupted {
                let path = self.save_checkpoint(dir)?;
                on_event(Event::Checkpoint { step, path });
            }
            if interrupted && !last {
                return Ok(Finish::Interrupted);
            }
        }
        Ok(Finish::Completed)
    }
}
