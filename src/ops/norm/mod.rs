//! RMSNorm over the last dimension, computed in f32:
//! `y = x · rsqrt(mean(x²) + eps) · g` where `g = 1 + w` (Gemma) or `g = w` (Llama).

mod cpu;
mod cuda;

use crate::bail;
use crate::error::Result;
use crate::ops::elementwise::add;
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
        Device::Cuda(_) => cuda::rms_norm(x, norm),
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

/// The residual add fused with the next norm: `s = x + a`, `y = norm(s)`; returns `(s, y)`
/// (Llama: after attention and after the MLP). On the CPU it is the composition of [`add`] and
/// [`rms_norm`], the definition the fused CUDA kernel is tested against.
pub fn add_rms_norm(x: &Tensor, a: &Tensor, norm: &RmsNorm) -> Result<(Tensor, Tensor)> {
    check_pair(x, a, norm)?;
    match x.device() {
        Device::Cuda(_) => cuda::add_rms_norm(x, a, norm),
        Device::Cpu => {
            let s = add(x, a)?;
            let y = rms_norm(&s, norm)?;
            Ok((s, y))
        }
    }
}

/// Post-norm, residual add and the next pre-norm fused: `s = x + post(a)`, `y = pre(s)`;
/// returns `(s, y)` (Gemma-2, whose sublayer outputs are normalised before the residual).
pub fn norm_add_norm(
    x: &Tensor,
    a: &Tensor,
    post: &RmsNorm,
    pre: &RmsNorm,
) -> Result<(Tensor, Tensor)> {
    check_pair(x, a, post)?;
    if pre.weight.shape() != post.weight.shape() || pre.eps != post.eps || pre.kind != post.kind {
        bail!(
            Shape,
            "norm_add_norm: the two norms must share size, eps and kind"
        );
    }
    match x.device() {
        Device::Cuda(_) => cuda::norm_add_norm(x, a, post, pre),
        Device::Cpu => {
            let s = add(x, &rms_norm(a, post)?)?;
            let y = rms_norm(&s, pre)?;
            Ok((s, y))
        }
    }
}

fn check_pair(x: &Tensor, a: &Tensor, norm: &RmsNorm) -> Result<()> {
    let (_, h) = x.dims2()?;
    if x.shape() != a.shape() || x.dtype() != a.dtype() || norm.weight.shape() != [h] {
        bail!(
            Shape,
            "fused norm: x {:?} {}, a {:?} {}, weight {:?}",
            x.shape(),
            x.dtype().name(),
            a.shape(),
            a.dtype().name(),
            norm.weight.shape()
        );
    }
    Ok(())
}

/// dx of [`rms_norm`] (the gains are frozen).
pub fn rms_norm_backward(x: &Tensor, dy: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
    let (t, h) = x.dims2()?;
    if dy.shape() != x.shape() || norm.weight.shape() != [h] {
        bail!(
            Shape,
            "rms_norm backward: x {:?}, dy {:?}, weight {:?}",
            x.shape(),
            dy.shape(),
            norm.weight.shape()
        );
    }
    match x.device() {
        Device::Cuda(_) => cuda::rms_norm_backward(x, dy, norm),
        Device::Cpu => Tensor::from_f32(
            cpu::rms_norm_backward(
                x.as_f32_slice()?,
                dy.as_f32_slice()?,
                norm.weight.as_f32_slice()?,
                h,
                norm.eps,
                norm.kind,
            ),
            &[t, h],
        ),
    }
}
