//! CPU twin of the optimiser family.

use crate::error::Result;
use crate::tensor::Tensor;

use super::AdamWConfig;

/// The scalars of one AdamW step (f32, as the kernels receive them).
pub(super) struct Coefficients {
    pub decay: f32,
    pub w1: f32,
    pub b2: f32,
    pub w2: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl Coefficients {
    pub fn new(c: AdamWConfig, step: u64, lr: f64) -> Self {
        let bc1 = 1.0 - c.beta1.powi(step as i32);
        let bc2 = 1.0 - c.beta2.powi(step as i32);
        Coefficients {
            decay: (1.0 - lr * c.weight_decay) as f32,
            w1: (1.0 - c.beta1) as f32,
            b2: c.beta2 as f32,
            w2: (1.0 - c.beta2) as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: c.eps as f32,
        }
    }
}

/// torch's single-tensor AdamW on one tensor: `p ← p·(1 − lr·wd)`; `m ← m + (1 − β1)(g − m)`;
/// `v ← β2·v + (1 − β2)·g²`; `p ← p − (lr/bc1)·m/(√v/√bc2 + eps)`, with g = grad × clip.
pub(super) fn update(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    k: &Coefficients,
    clip: f32,
) {
    for i in 0..p.len() {
        let gi = g[i] * clip;
        p[i] *= k.decay;
        m[i] += k.w1 * (gi - m[i]);
        v[i] = v[i] * k.b2 + k.w2 * gi * gi;
        let denom = v[i].sqrt() / k.bc2_sqrt + k.eps;
        p[i] += -k.step_size * (m[i] / denom);
    }
}

/// sqrt of the sum over tensors of their squared L2 norms (each norm in f64).
pub(super) fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        let n = g
            .as_f32_slice()?
            .iter()
            .map(|x| (*x as f64) * (*x as f64))
            .sum::<f64>()
            .sqrt();
        total += n * n;
    }
    Ok(total.sqrt())
}
