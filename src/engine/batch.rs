//! Continuous batching of decode steps: the answers being generated at the same time (the
//! server's concurrent requests) run their next token together, one
//! [`LlamaModel::decode_batch`] call for all of them, and join or leave between steps.
//!
//! Each answer keeps its own thread, generation loop (sampling, stop strings, streaming) and
//! KV cache; only the forward pass of a decode step is shared. A thread that needs a step
//! hands its token and cache to the batcher. The first one becomes the *leader*: it waits
//! until every answer that is decoding has handed in its step (or [`GATHER_WAIT`] has
//! passed, so an answer busy elsewhere never stalls the rest), runs the batch, and hands each
//! its cache and logits back. The rows of a batch may use different adapters. Each row's
//! logits equal those of a step run alone, bit for bit, so batching never changes an answer.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ragtune_generate::candle_core::Tensor;
use ragtune_generate::{DecodeRow, KvCache, LlamaModel, LoraAdapter};

/// How long a leader waits for the other decoding answers to hand in their steps.
pub const GATHER_WAIT: Duration = Duration::from_millis(3);

/// At most this many rows per step.
pub const MAX_BATCH: usize = 16;

/// A step's result: the cache back, and the logits `(vocab,)`.
type StepResult = std::result::Result<(KvCache, Tensor), ragtune_generate::Error>;

struct Pending {
    ticket: u64,
    token: u32,
    cache: KvCache,
    /// `cache.len()` when handed in: where the token goes.
    pos: usize,
    adapter: Option<String>,
}

#[derive(Default)]
struct State {
    /// Answers in their decode loop.
    decoding: usize,
    pending: Vec<Pending>,
    leading: bool,
    done: HashMap<u64, StepResult>,
    next_ticket: u64,
    /// Steps run and rows in them (for the statistics).
    steps: u64,
    rows: u64,
}

/// The batcher of one engine (see the module docs).
#[derive(Default)]
pub struct DecodeBatcher {
    state: Mutex<State>,
    changed: Condvar,
}

impl std::fmt::Debug for DecodeBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (steps, rows) = self.stats();
        f.debug_struct("DecodeBatcher")
            .field("steps", &steps)
            .field("rows", &rows)
            .finish()
    }
}

/// Marks an answer as decoding while it lives.
pub struct Decoding<'a>(&'a DecodeBatcher);

impl Drop for Decoding<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.decoding -= 1;
        drop(s);
        self.0.changed.notify_all();
    }
}

impl DecodeBatcher {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an answer as decoding until the returned guard drops.
    pub fn enter(&self) -> Decoding<'_> {
        self.lock().decoding += 1;
        Decoding(self)
    }

    /// `(steps, rows)`: decode steps run and the rows in them; `rows / steps` is the mean
    /// batch size.
    pub fn stats(&self) -> (u64, u64) {
        let s = self.lock();
        (s.steps, s.rows)
    }

    /// One decode step of `token` on `cache` under the adapter named `adapter` (a key of
    /// `adapters`), batched with the steps of the other decoding answers. Returns the cache
    /// and the logits.
    ///
    /// # Errors
    /// The model's errors for this row (a failing batch is rerun row by row, so one bad row
    /// fails alone).
    pub fn step(
        &self,
        model: &LlamaModel,
        adapters: &BTreeMap<String, LoraAdapter>,
        token: u32,
        cache: KvCache,
        adapter: Option<&str>,
    ) -> StepResult {
        let mut s = self.lock();
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        s.pending.push(Pending {
            ticket,
            token,
            pos: cache.len(),
            cache,
            adapter: adapter.map(str::to_string),
        });
        self.changed.notify_all();
        loop {
            if let Some(r) = s.done.remove(&ticket) {
                return r;
            }
            if s.leading {
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Lead: gather the other decoding answers' steps, then run them all.
            s.leading = true;
            let deadline = Instant::now() + GATHER_WAIT;
            while s.pending.len() < s.decoding.min(MAX_BATCH) {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                s = self
                    .changed
                    .wait_timeout(s, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let take = s.pending.len().min(MAX_BATCH);
            let batch: Vec<Pending> = s.pending.drain(..take).collect();
            s.steps += 1;
            s.rows += batch.len() as u64;
            drop(s);
            let results = run(model, adapters, batch);
            s = self.lock();
            s.done.extend(results);
            s.leading = false;
            self.changed.notify_all();
        }
    }
}

/// Runs `batch` as one step; if it fails or panics, row by row.
fn run(
    model: &LlamaModel,
    adapters: &BTreeMap<String, LoraAdapter>,
    mut batch: Vec<Pending>,
) -> Vec<(u64, StepResult)> {
    let adapter_of = |name: &Option<String>| name.as_ref().and_then(|n| adapters.get(n));
    if batch.len() > 1 {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut rows: Vec<DecodeRow<'_>> = batch
                .iter_mut()
                .map(|p| DecodeRow {
                    token: p.token,
                    cache: &mut p.cache,
                    adapter: adapter_of(&p.adapter),
                })
                .collect();
            model.decode_batch(&mut rows)
        }));
        if let Ok(Ok(logits)) = outcome {
            return batch
                .into_iter()
                .zip(logits)
                .map(|(p, l)| (p.ticket, Ok((p.cache, l))))
                .collect();
        }
        // A failed batch leaves the caches as they were (the lengths are set last): the
        // rows rerun alone, so that one bad row fails alone.
    }
    batch
        .into_iter()
        .map(|mut p| {
            let adapter = adapter_of(&p.adapter);
            p.cache.truncate(p.pos);
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                model.forward_last_with(&[p.token], p.pos, &mut p.cache, adapter)
            }));
            let result = match result {
                Ok(Ok(logits)) => Ok((p.cache, logits)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(ragtune_generate::Error::InvalidParams {
                    detail: "the decode step panicked".into(),
                }),
            };
            (p.ticket, result)
        })
        .collect()
}
