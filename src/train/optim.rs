//! The learning-rate schedules of Hugging Face's `get_{constant,linear,cosine}_schedule_with_warmup`
//! and the clipping coefficient of `torch.nn.utils.clip_grad_norm_` (the AdamW update itself is
//! the op family `ops::optim`).

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

/// The factor `clip_grad_norm_` multiplies every gradient by: `min(1, max / (norm + 1e-6))`
/// (1 when clipping is off).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f32 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0) as f32
    } else {
        1.0
    }
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
        assert!((clip_coefficient(5.0, 1.0) - 0.2).abs() < 1e-6);
        assert_eq!(clip_coefficient(0.3, 1.0), 1.0);
        assert_eq!(clip_coefficient(50.0, 0.0), 1.0);
    }
}
