//! RMSNorm over the last dimension, computed in f32:
//! `y = x · rsqrt(mean(x²) + eps) · g` where `g = 1 + w` (Gemma) or `g = w` (Llama).

mod cpu;

use crate::bail;
use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// Which gain the norm applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// Gemma: `(1 + w)`, weights stored as offsets from one.
    OnePlusWeight,
    /// Llama: `w`.
    Weight,
}

/// An RMSNorm layer (weights kept as f32).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
    pub kind: NormKind,
}

/// Normalise every row of `x` (`[tokens, hidden]`).
pub fn rms_norm(x: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
    let (t, h) = x.dims2()?;
    if norm.weight.shape() != [h] {
        bail!(
            Shape,
            "rms_norm: weight {:?} does not fit hidden size {h}",
            norm.weight.shape()
        );
    }
    match x.device() {
        Device::Cpu => {
            let y = cpu::rms_norm(
                x.as_f32_slice()?,
                norm.weight.as_f32_slice()?,
                h,
                norm.eps,
                norm.kind,
            );
            Tensor::from_f32(y, &[t, h])
        }
    }
}
