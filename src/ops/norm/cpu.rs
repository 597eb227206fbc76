//! CPU twin of RMSNorm.

use rayon::prelude::*;

use super::NormKind;

pub(super) fn rms_norm(x: &[f32], w: &[f32], h: usize, eps: f32, kind: NormKind) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .for_each(|(yr, xr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                let g = match kind {
                    NormKind::OnePlusWeight => 1.0 + g,
                    NormKind::Weight => g,
                };
                *o = v * r * g;
            }
        });
    y
}
