//! AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2)
//! with a linear warmup + cosine learning-rate schedule (Loshchilov & Hutter 2017, SGDR,
//! without restarts), and gradient clipping by global L2 norm.

use candle_core::{Tensor, Var};

use crate::Result;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    /// `β1`.
    pub beta1: f64,
    /// `β2`.
    pub beta2: f64,
    /// `ε`.
    pub eps: f64,
    /// Decoupled weight decay `λ` (multiplied by the learning rate).
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The optimizer state: first and second moments per parameter, and the step count.
#[derive(Debug)]
pub struct AdamW {
    params: AdamWParams,
    /// Per parameter, in the order of the `vars` passed to [`step`](Self::step).
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: usize,
}

impl AdamW {
    /// Zero moments for `vars`.
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn new(params: AdamWParams, vars: &[&Var]) -> Result<Self> {
        let zeros = |v: &&Var| v.as_tensor().zeros_like();
        Ok(Self {
            params,
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            t: 0,
        })
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.t
    }

    /// One update of `vars` with `grads` (same order) at learning rate `lr`:
    /// `m ← β1 m + (1-β1) g`, `v ← β2 v + (1-β2) g²`,
    /// `θ ← θ - lr (m̂ / (sqrt(v̂) + ε) + λ θ)` with bias-corrected `m̂`, `v̂`.
    ///
    /// # Errors
    /// Tensor errors (shape mismatch: a bug).
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let p = &self.params;
        let c1 = 1.0 - p.beta1.powi(self.t as i32);
        let c2 = 1.0 - p.beta2.powi(self.t as i32);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + p.eps)?)?;
            let theta = var.as_tensor();
            let decayed = (theta * (1.0 - lr * p.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments, for a checkpoint: `(m, v)` per parameter.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Restores the state of a checkpoint.
    pub fn restore(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, t: usize) {
        self.m = m;
        self.v = v;
        self.t = t;
    }
}

/// Learning rate at `step` (0-based) of `total`: linear from `peak / warmup` to `peak` over
/// the first `warmup` steps, then cosine from `peak` down to `peak * min_ratio` at the last
/// step.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm`; returns the
/// norm before clipping.
///
/// # Errors
/// Tensor errors only.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.iter() {
        sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
    }
    let norm = sq.sqrt();
    if norm > max_norm && norm.is_finite() {
        let s = max_norm / norm;
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let lr = |s| learning_rate(s, 100, 10, 1e-3, 0.1);
        assert!((lr(0) - 1e-4).abs() < 1e-12);
        assert!((lr(9) - 1e-3).abs() < 1e-12);
        assert!((lr(10) - 1e-3).abs() < 1e-12);
        assert!((lr(55) - 0.55e-3).abs() < 1e-9);
        assert!((lr(100) - 1e-4).abs() < 1e-12);
        assert!(lr(30) > lr(60) && lr(60) > lr(90));
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // With bias correction, step 1 is θ - lr · g / (|g| + ε) ≈ θ - lr · sign(g).
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).expect("t"))
            .expect("var");
        let mut opt = AdamW::new(AdamWParams::default(), &[&var]).expect("opt");
        let g = Tensor::new(&[0.5f32, -4.0, 0.0], &Device::Cpu).expect("g");
        opt.step(&[&var], &[g], 0.1).expect("step");
        let got = var.as_tensor().to_vec1::<f32>().expect("vec");
        assert!((got[0] - 0.9).abs() < 1e-5, "{got:?}");
        assert!((got[1] + 1.9).abs() < 1e-5, "{got:?}");
        assert!((got[2] - 3.0).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut g = vec![
            Tensor::new(&[3.0f32], &Device::Cpu).expect("t"),
            Tensor::new(&[4.0f32], &Device::Cpu).expect("t"),
        ];
        let norm = clip_grad_norm(&mut g, 1.0).expect("clip");
        assert!((norm - 5.0).abs() < 1e-9);
        let a = g[0].to_vec1::<f32>().expect("v")[0];
        assert!((a - 0.6).abs() < 1e-6);
    }
}
