//! CPU twin of the gated activations.

use rayon::prelude::*;

use super::Gate;
use crate::ops::cpu_math::{gelu_tanh, multiversion, silu};

multiversion! {
    fn gated_chunk(y: &mut [f32], gate: &[f32], up: &[f32], act: Gate) {
        match act {
            Gate::GeluTanh => {
                for ((o, &g), &u) in y.iter_mut().zip(gate).zip(up) {
                    *o = gelu_tanh(g) * u;
                }
            }
            Gate::Silu => {
                for ((o, &g), &u) in y.iter_mut().zip(gate).zip(up) {
                    *o = silu(g) * u;
                }
            }
        }
    }
}

pub(super) fn gated(gate: &[f32], up: &[f32], act: Gate) -> Vec<f32> {
    let mut y = vec![0f32; gate.len()];
    y.par_chunks_mut(16384)
        .zip(gate.par_chunks(16384).zip(up.par_chunks(16384)))
        .for_each(|(y, (g, u))| gated_chunk(y, g, u, act));
    y
}
