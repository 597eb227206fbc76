//! The optimiser side of a step, as torch and Hugging Face do it: AdamW (decoupled weight
//! decay, bias-corrected moments, eps outside the square root), the learning-rate schedules of
//! `get_{constant,linear,cosine}_schedule_with_warmup`, and `clip_grad_norm_`.

use serde::{Deserialize, Serialize};

/// Learning-rate schedule (Hugging Face names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl Schedule {
    /// The multiplier of the base learning rate for the optimiser step with 0-based index
    /// `k` (the scheduler steps after the optimiser, so the first step uses `k = 0`: with
    /// warm-up that is a step at learning rate 0, exactly as the Trainer does).
    pub fn factor(self, k: usize, warmup: usize, total: usize) -> f64 {
        if k < warmup {
            return k as f64 / warmup.max(1) as f64;
        }
        let progress = (k - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => {
                ((total as f64 - k as f64) / (total.saturating_sub(warmup)).max(1) as f64).max(0.0)
            }
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

/// AdamW's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW state for a list of f32 parameter tensors.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Optimiser steps taken.
    pub step: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, sizes: &[usize]) -> Self {
        AdamW {
            cfg,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of every parameter with its gradient, at learning rate `lr`, in the order
    /// of torch's single-tensor AdamW: `p ← p·(1 − lr·wd)`; `m ← lerp(m, g, 1 − β1)`;
    /// `v ← β2·v + (1 − β2)·g²`; `p ← p − (lr / bc1) · m / (√v / √bc2 + eps)` with
    /// `bc_i = 1 − β_i^step`.
    pub fn update(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f64) {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let (w1, b2, w2, eps) = (
            (1.0 - c.beta1) as f32,
            c.beta2 as f32,
            (1.0 - c.beta2) as f32,
            c.eps as f32,
        );
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            for i in 0..p.len() {
                p[i] *= decay;
                // torch's lerp with weight < 0.5: m + w·(g − m)
                m[i] += w1 * (g[i] - m[i]);
                v[i] = v[i] * b2 + w2 * g[i] * g[i];
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p[i] += -step_size * (m[i] / denom);
            }
        }
    }
}

/// The global L2 norm of all gradients (before clipping), and the gradients scaled by
/// `min(1, max_norm / (norm + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let total = grads
        .iter()
        .map(|g| {
            let n: f64 = g
                .iter()
                .map(|x| (*x as f64) * (*x as f64))
                .sum::<f64>()
                .sqrt();
            n * n
        })
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 {
        let coef = (max_norm / (total + 1e-6)).min(1.0) as f32;
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= coef;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_hugging_face() {
        // linear, warmup 1, 3 steps: lr factors 0, 1, 0.5 (the fixture's run).
        let f: Vec<f64> = (0..3).map(|k| Schedule::Linear.factor(k, 1, 3)).collect();
        assert_eq!(f, [0.0, 1.0, 0.5]);
        // cosine, no warmup, 2 steps: 1, 0.5.
        let f: Vec<f64> = (0..2).map(|k| Schedule::Cosine.factor(k, 0, 2)).collect();
        assert!(
            (f[0] - 1.0).abs() < 1e-12 && (f[1] - 0.5).abs() < 1e-12,
            "{f:?}"
        );
        assert_eq!(Schedule::Constant.factor(0, 2, 10), 0.0);
        assert_eq!(Schedule::Constant.factor(1, 2, 10), 0.5);
        assert_eq!(Schedule::Constant.factor(5, 2, 10), 1.0);
        assert_eq!(Schedule::Linear.factor(10, 0, 10), 0.0);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        let n = clip_grad_norm(&mut g, 1.0);
        assert_eq!(n, 5.0);
        assert!((g[0][0] - 0.6).abs() < 1e-6 && (g[1][0] - 0.8).abs() < 1e-6);
        let mut g = vec![vec![0.3f32]];
        clip_grad_norm(&mut g, 1.0);
        assert_eq!(g[0][0], 0.3);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign() {
        // After one step with zero moments, m̂/√v̂ = g/|g|: the update is −lr·sign(g) (plus decay).
        let mut p = vec![vec![1.0f32, -2.0]];
        let mut opt = AdamW::new(
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            &[2],
        );
        opt.update(&mut p, &[vec![0.5, -3.0]], 0.01);
        assert!(
            (p[0][0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6,
            "{}",
            p[0][0]
        );
        assert!(
            (p[0][1] - (-2.0 * (1.0 - 0.001) + 0.01)).abs() < 1e-6,
            "{}",
            p[0][1]
        );
    }
}
