//! Checkpoints: `DIR/checkpoints/step-NNNNNN/` holding `trainer.safetensors` (the LoRA
//! factors under their [`TrainModel::named_params`](crate::TrainModel::named_params) names
//! and AdamW's moments as `adam_m.NAME` / `adam_v.NAME`, f32) and `state.json`
//! ([`CheckpointState`]), plus `DIR/checkpoints/latest` naming the newest one.
//!
//! **Atomicity.** A checkpoint is written into `step-NNNNNN.tmp/` (each file fsynced), the
//! directory is renamed into place and the parent fsynced, and only then is `latest`
//! replaced (temp file, fsync, rename). A crash or a full disk at any point leaves `latest`
//! naming a complete checkpoint; a failed write removes its temporary directory and returns
//! the error. The two newest checkpoints are kept.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};

use crate::error::io;
use crate::trainer::TrainConfig;
use crate::{Error, Result};

/// Checkpoints kept (the newest ones).
const KEEP: usize = 2;
const STATE_FILE: &str = "state.json";
const TENSORS_FILE: &str = "trainer.safetensors";
const LATEST_FILE: &str = "latest";

/// What a checkpoint records besides the tensors.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps done (the next step to run is this one, 0-based).
    pub step: usize,
    /// AdamW's step counter (for bias correction).
    pub optimizer_steps: usize,
    /// sha256 of the base GGUF file.
    pub base_sha256: String,
    /// The run's configuration.
    pub config: TrainConfig,
    /// Steps planned for the whole run (a fingerprint of the data).
    pub total_steps: usize,
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    ragtune_util::fs::write_synced(path, bytes).map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    ragtune_util::fs::sync_dir(dir).map_err(io(dir))
}

/// Writes a checkpoint of `params` and the moments `m`, `v` (same order) under
/// `dir/checkpoints/` and returns its directory.
///
/// # Errors
/// [`Error::Io`]; the previous checkpoint and `latest` are untouched on failure.
pub fn save(
    dir: &Path,
    state: &CheckpointState,
    params: &[(String, &Var)],
    m: &[Tensor],
    v: &[Tensor],
) -> Result<PathBuf> {
    let root = dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let name = format!("step-{:06}", state.step);
    let tmp = root.join(format!("{name}.tmp"));
    let last = root.join(&name);
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for (i, (n, var)) in params.iter().enumerate() {
            tensors.insert(n.clone(), var.as_tensor().copy()?);
            tensors.insert(format!("adam_m.{n}"), m[i].clone());
            tensors.insert(format!("adam_v.{n}"), v[i].clone());
        }
        let bytes =
            safetensors::tensor::serialize(&tensors, None).map_err(candle_core::Error::from)?;
        write_synced(&tmp.join(TENSORS_FILE), &bytes)?;
        let state_path = tmp.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(state).map_err(|source| Error::StateEncode {
            path: state_path.clone(),
            source,
        })?;
        write_synced(&state_path, &json)?;
        sync_dir(&tmp)?;
        if last.exists() {
            std::fs::remove_dir_all(&last).map_err(io(&last))?;
        }
        std::fs::rename(&tmp, &last).map_err(io(&last))?;
        sync_dir(&root)?;
        let latest = root.join(LATEST_FILE);
        ragtune_util::fs::write_atomic(&latest, name.as_bytes()).map_err(io(&latest))
    })();
    if let Err(e) = written {
        // Best effort: the error that matters is the one returned.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    prune(&root, &name);
    Ok(last)
}

/// Removes all but the [`KEEP`] newest complete checkpoints (never `current`).
fn prune(root: &Path, current: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-") && !n.ends_with(".tmp"))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(KEEP);
    for n in names.into_iter().take(excess) {
        if n != current {
            let _ = std::fs::remove_dir_all(root.join(n));
        }
    }
}

/// Reads the checkpoint `dir/checkpoints/latest` names: its directory, state, and tensors.
///
/// # Errors
/// [`Error::Checkpoint`] when there is none or it cannot be read, saying what to do.
pub fn load_latest(dir: &Path) -> Result<(PathBuf, CheckpointState, HashMap<String, Tensor>)> {
    let root = dir.join("checkpoints");
    let latest = root.join(LATEST_FILE);
    let name = std::fs::read_to_string(&latest).map_err(|e| Error::Checkpoint {
        path: root.clone(),
        message: format!("no checkpoint to resume ({e}); run without --resume to start a new run"),
    })?;
    let path = root.join(name.trim());
    let fail = |message: String| Error::Checkpoint {
        path: path.clone(),
        message,
    };
    let json = std::fs::read(path.join(STATE_FILE)).map_err(|e| fail(e.to_string()))?;
    let state: CheckpointState =
        serde_json::from_slice(&json).map_err(|e| fail(format!("corrupt {STATE_FILE}: {e}")))?;
    let bytes = std::fs::read(path.join(TENSORS_FILE)).map_err(|e| fail(e.to_string()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| fail(format!("corrupt {TENSORS_FILE}: {e}")))?;
    Ok((path, state, tensors))
}
