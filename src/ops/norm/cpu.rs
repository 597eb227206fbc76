//! CPU twin of RMSNorm.

use rayon::prelude::*;

use super::NormKind;
use crate::ops::cpu_math::{multiversion, sum_squares};

multiversion! {
    fn norm_row(y: &mut [f32], x: &[f32], w: &[f32], eps: f32, kind: NormKind) {
        let r = 1.0 / (sum_squares(x) / x.len() as f32 + eps).sqrt();
        match kind {
            NormKind::OnePlusWeight => {
                for ((o, &v), &g) in y.iter_mut().zip(x).zip(w) {
                    *o = v * r * (1.0 + g);
                }
            }
            NormKind::Weight => {
                for ((o, &v), &g) in y.iter_mut().zip(x).zip(w) {
                    *o = v * r * g;
                }
            }
        }
    }
}

pub(super) fn rms_norm(x: &[f32], w: &[f32], h: usize, eps: f32, kind: NormKind) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .for_each(|(yr, xr)| norm_row(yr, xr, w, eps, kind));
    y
}

/// dx of RMSNorm with frozen gains: with r = (mean(x²) + eps)^-½ and g the gain,
/// `dx_j = r·g_j·dy_j − x_j·r³/H · Σ_i g_i·dy_i·x_i`.
pub(super) fn rms_norm_backward(
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    h: usize,
    eps: f32,
    kind: NormKind,
) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(h)
        .zip(x.par_chunks(h).zip(dy.par_chunks(h)))
        .for_each(|(dxr, (xr, dyr))| {
            let gain = |i: usize| match kind {
                NormKind::OnePlusWeight => 1.0 + w[i],
                NormKind::Weight => w[i],
            };
            let ms = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / h as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            let dot: f64 = (0..h)
                .map(|i| gain(i) as f64 * dyr[i] as f64 * xr[i] as f64)
                .sum();
            let c = r * r * r / h as f64 * dot;
            for i in 0..h {
                dxr[i] = (r * gain(i) as f64 * dyr[i] as f64 - xr[i] as f64 * c) as f32;
            }
        });
    dx
}
