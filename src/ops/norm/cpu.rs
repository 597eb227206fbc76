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
