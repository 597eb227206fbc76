//! Gated activations of the feed-forward blocks: `act(gate) · up`, with `act` the tanh
//! approximation of GELU (Gemma-2's `gelu_pytorch_tanh`) or SiLU (Llama's SwiGLU).

mod cpu;
mod cuda;

use crate::bail;
use crate::error::Result;
use crate::tensor::{Device, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`
    GeluTanh,
    /// `x · sigmoid(x)`
    Silu,
}

impl Gate {
    /// Map a config's `hidden_act` / `hidden_activation` name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" => Ok(Gate::GeluTanh),
            "silu" | "swish" => Ok(Gate::Silu),
            other => bail!(
                Model,
                "unsupported activation `{other}` (expected gelu_pytorch_tanh or silu)"
            ),
        }
    }
}

/// `act(gate) · up`, elementwise; both inputs `[tokens, intermediate]`.
pub fn gated(gate: &Tensor, up: &Tensor, act: Gate) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!(
            Shape,
            "gated activation: gate {:?} vs up {:?}",
            gate.shape(),
            up.shape()
        );
    }
    if gate.dtype() != up.dtype() {
        bail!(
            Shape,
            "gated activation: gate is {}, up is {}",
            gate.dtype().name(),
            up.dtype().name()
        );
    }
    match gate.device() {
        Device::Cuda(_) => cuda::gated(gate, up, act),
        Device::Cpu => Tensor::from_f32(
            cpu::gated(gate.as_f32_slice()?, up.as_f32_slice()?, act),
            gate.shape(),
        ),
    }
}

/// (d gate, d up) of [`gated`] for the upstream gradient `dy`.
pub fn gated_backward(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
    act: Gate,
) -> Result<(Tensor, Tensor)> {
    if gate.shape() != up.shape() || dy.shape() != gate.shape() {
        bail!(
            Shape,
            "gated backward: gate {:?}, up {:?}, dy {:?}",
            gate.shape(),
            up.shape(),
            dy.shape()
        );
    }
    match gate.device() {
        Device::Cuda(_) => cuda::gated_backward(gate, up, dy, act),
        Device::Cpu => {
            let (dg, du) = cpu::gated_backward(
                gate.as_f32_slice()?,
                up.as_f32_slice()?,
                dy.as_f32_slice()?,
                act,
            );
            Ok((
                Tensor::from_f32(dg, gate.shape())?,
                Tensor::from_f32(du, gate.shape())?,
            ))
        }
    }
}
