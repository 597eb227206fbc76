//! Linear layers against frozen base weights, with an optional LoRA path:
//! `y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ`.
//!
//! The base weight `W` (`[out, in]`) is dense (f32, bf16 or f16 storage) or NF4. Neither is
//! ever widened to a full-size f32 copy: the CPU twin dequantises a tile of output rows at a
//! time into a small scratch buffer and multiplies it in place (the CUDA kernel does the same
//! inside its tile loads).

mod cpu;
mod cuda;

pub use cuda::{dequantize_nf4, quantize_nf4};

use std::sync::Arc;

use crate::bail;
use crate::error::Result;
use crate::quant::nf4::{Nf4Device, Nf4Tensor};
use crate::tensor::{DType, Device, Tensor};

/// A frozen base weight, `[out_features, in_features]`.
#[derive(Clone, Debug)]
pub enum BaseWeight {
    /// Dense, on the tensor's device, in any storage dtype.
    Dense(Tensor),
    /// NF4 in host memory.
    Nf4(Nf4Tensor),
    /// NF4 in device memory.
    Nf4Cuda(Arc<Nf4Device>),
}

impl BaseWeight {
    pub fn dims(&self) -> (usize, usize) {
        match self {
            BaseWeight::Dense(t) => (t.shape()[0], t.shape()[1]),
            BaseWeight::Nf4(q) => (q.shape[0], q.shape[1]),
            BaseWeight::Nf4Cuda(q) => (q.shape[0], q.shape[1]),
        }
    }

    /// Bytes of weight memory.
    pub fn nbytes(&self) -> usize {
        match self {
            BaseWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            BaseWeight::Nf4(q) => q.nbytes(),
            BaseWeight::Nf4Cuda(q) => q.nbytes(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            BaseWeight::Dense(t) => t.device(),
            BaseWeight::Nf4(_) => Device::Cpu,
            BaseWeight::Nf4Cuda(q) => Device::Cuda(q.packed.device().ordinal()),
        }
    }
}

/// A LoRA adapter on one linear layer: `A` is `[r, in]`, `B` is `[out, r]`.
#[derive(Clone, Debug)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f32,
}

/// A linear layer without bias (none of the supported models has one).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: BaseWeight,
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn new(weight: BaseWeight, lora: Option<Lora>) -> Result<Self> {
        let (out, inp) = weight.dims();
        if let Some(l) = &lora {
            let r = l.a.shape()[0];
            if l.a.shape() != [r, inp] || l.b.shape() != [out, r] {
                bail!(
                    Shape,
                    "LoRA A {:?} / B {:?} do not fit a [{out}, {inp}] weight",
                    l.a.shape(),
                    l.b.shape()
                );
            }
        }
        Ok(Linear { weight, lora })
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }
}

/// `x` is `[tokens, in]`; the result is `[tokens, out]` in `x`'s dtype, except that a dense
/// f32 weight on the GPU (the score head) gives f32.
pub fn linear(x: &Tensor, layer: &Linear) -> Result<Tensor> {
    let (t, k) = x.dims2()?;
    let (n, kw) = layer.weight.dims();
    if k != kw {
        bail!(
            Shape,
            "linear: input has {k} features, the weight expects {kw}"
        );
    }
    if x.device() != layer.weight.device() {
        bail!(
            Shape,
            "linear: input on {} but weight on {}",
            x.device(),
            layer.weight.device()
        );
    }
    match x.device() {
        Device::Cuda(_) => cuda::linear(x, t, k, n, layer),
        Device::Cpu => {
            if x.dtype() != DType::F32 {
                bail!(
                    Shape,
                    "linear: CPU activations must be f32, found {}",
                    x.dtype().name()
                );
            }
            let y = cpu::linear(x.as_f32_slice()?, None, t, k, n, layer)?;
            Tensor::from_f32(y, &[t, n])
        }
    }
}

/// [`linear`] with a separate input for the LoRA path (`x_lora`, the dropped-out `x` when
/// training with LoRA dropout, as PEFT applies dropout before `lora_A`).
pub fn linear_split(x: &Tensor, x_lora: &Tensor, layer: &Linear) -> Result<Tensor> {
    let (t, k) = x.dims2()?;
    let (n, kw) = layer.weight.dims();
    if k != kw || x_lora.shape() != x.shape() {
        bail!(
            Shape,
            "linear: x {:?}, LoRA input {:?}, weight [{n}, {kw}]",
            x.shape(),
            x_lora.shape()
        );
    }
    match x.device() {
        Device::Cuda(_) => cuda::linear_split(x, x_lora, t, k, n, layer),
        Device::Cpu => {
            let y = cpu::linear(
                x.as_f32_slice()?,
                Some(x_lora.as_f32_slice()?),
                t,
                k,
                n,
                layer,
            )?;
            Tensor::from_f32(y, &[t, n])
        }
    }
}

/// Gradients of [`linear`] with respect to its input, the LoRA factors and (if requested) a
/// trainable dense weight. The base weight is frozen: no gradient is formed for it.
#[derive(Debug)]
pub struct LinearGrads {
    pub dx: Tensor,
    /// Gradient of the separate LoRA input of [`linear_split`].
    pub dx_lora: Option<Tensor>,
    /// (dA, dB) when the layer has LoRA.
    pub lora: Option<(Tensor, Tensor)>,
    /// dW when `weight_grad` was asked for.
    pub weight: Option<Tensor>,
}

/// Backward of [`linear`] (or of [`linear_split`] when `x_lora` is given) for the upstream
/// gradient `dy` (`[tokens, out]`) at input `x`.
pub fn linear_backward(
    x: &Tensor,
    x_lora: Option<&Tensor>,
    dy: &Tensor,
    layer: &Linear,
    weight_grad: bool,
) -> Result<LinearGrads> {
    let (t, k) = x.dims2()?;
    let (n, kw) = layer.weight.dims();
    if k != kw || dy.shape() != [t, n] {
        bail!(
            Shape,
            "linear backward: x {:?}, dy {:?}, weight [{n}, {kw}]",
            x.shape(),
            dy.shape()
        );
    }
    match x.device() {
        Device::Cuda(_) => cuda::linear_backward(x, x_lora, dy, t, k, n, layer, weight_grad),
        Device::Cpu => {
            let xl = match x_lora {
                Some(t) => Some(t.as_f32_slice()?),
                None => None,
            };
            let g = cpu::linear_backward(
                x.as_f32_slice()?,
                xl,
                dy.as_f32_slice()?,
                t,
                k,
                n,
                layer,
                weight_grad,
            )?;
            let r = layer.lora.as_ref().map(|l| l.a.shape()[0]).unwrap_or(0);
            Ok(LinearGrads {
                dx: Tensor::from_f32(g.dx, &[t, k])?,
                dx_lora: match g.dx_lora {
                    Some(d) => Some(Tensor::from_f32(d, &[t, k])?),
                    None => None,
                },
                lora: match g.lora {
                    Some((da, db)) => Some((
                        Tensor::from_f32(da, &[r, k])?,
                        Tensor::from_f32(db, &[n, r])?,
                    )),
                    None => None,
                },
                weight: match g.dw {
                    Some(dw) => Some(Tensor::from_f32(dw, &[n, k])?),
                    None => None,
                },
            })
        }
    }
}
