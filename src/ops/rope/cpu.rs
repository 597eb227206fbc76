//! CPU twin of the rotary embedding.

use rayon::prelude::*;

pub(super) fn table(positions: &[u32], inv_freq: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let h = inv_freq.len();
    let mut cos = vec![0f32; positions.len() * h];
    let mut sin = vec![0f32; positions.len() * h];
    for (t, &p) in positions.iter().enumerate() {
        for (i, &f) in inv_freq.iter().enumerate() {
            let a = p as f32 * f;
            cos[t * h + i] = a.cos();
            sin[t * h + i] = a.sin();
        }
    }
    (cos, sin)
}

pub(super) fn apply(x: &[f32], cos: &[f32], sin: &[f32], width: usize, d: usize) -> Vec<f32> {
    let half = d / 2;
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .enumerate()
        .for_each(|(t, (yr, xr))| {
            let c = &cos[t * half..(t + 1) * half];
            let s = &sin[t * half..(t + 1) * half];
            for (yh, xh) in yr.chunks_mut(d).zip(xr.chunks(d)) {
                for i in 0..half {
                    let (a, b) = (xh[i], xh[i + half]);
                    yh[i] = a * c[i] - b * s[i];
                    yh[i + half] = b * c[i] + a * s[i];
                }
            }
        });
    y
}
