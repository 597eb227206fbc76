//! CPU twin of the gated activations.

use rayon::prelude::*;

use super::Gate;

#[inline]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (K * (x + 0.044_715 * x * x * x)).tanh())
}

#[inline]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub(super) fn gated(gate: &[f32], up: &[f32], act: Gate) -> Vec<f32> {
    let mut y = vec![0f32; gate.len()];
    y.par_chunks_mut(4096)
        .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
        .for_each(|(y, (g, u))| {
            for ((o, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *o = match act {
                    Gate::GeluTanh => gelu_tanh(g),
                    Gate::Silu => silu(g),
                } * u;
            }
        });
    y
}
