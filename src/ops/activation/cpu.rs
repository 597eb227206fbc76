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

/// d/dx of the tanh-approximated GELU.
#[inline]
fn gelu_tanh_grad(x: f32) -> f32 {
    const K: f32 = 0.797_884_6;
    let inner = K * (x + 0.044_715 * x * x * x);
    let t = inner.tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * K * (1.0 + 3.0 * 0.044_715 * x * x)
}

/// d/dx of SiLU: σ(x)·(1 + x·(1 − σ(x))).
#[inline]
fn silu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

/// (d gate, d up) of `act(gate)·up`.
pub(super) fn gated_backward(
    gate: &[f32],
    up: &[f32],
    dy: &[f32],
    act: Gate,
) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; gate.len()];
    let mut du = vec![0f32; gate.len()];
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(
            gate.par_chunks(4096)
                .zip(up.par_chunks(4096))
                .zip(dy.par_chunks(4096)),
        )
        .for_each(|((dg, du), ((g, u), dy))| {
            for i in 0..g.len() {
                let (a, da) = match act {
                    Gate::GeluTanh => (gelu_tanh(g[i]), gelu_tanh_grad(g[i])),
                    Gate::Silu => (silu(g[i]), silu_grad(g[i])),
                };
                dg[i] = dy[i] * u[i] * da;
                du[i] = dy[i] * a;
            }
        });
    (dg, du)
}
