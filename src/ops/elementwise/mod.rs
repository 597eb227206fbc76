//! Elementwise ops: the residual add, products (dropout masks), `a + w·b` (gradient
//! accumulation) and dtype casts.

mod cpu;
mod cuda;

use crate::bail;
use crate::error::Result;
use crate::tensor::{DType, Device, Tensor};

/// `a + b`, same shapes.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        bail!(Shape, "add: {:?} vs {:?}", a.shape(), b.shape());
    }
    if a.dtype() != b.dtype() || a.device() != b.device() {
        bail!(
            Shape,
            "add: {} on {} vs {} on {}",
            a.dtype().name(),
            a.device(),
            b.dtype().name(),
            b.device()
        );
    }
    match a.device() {
        Device::Cuda(_) => cuda::add(a, b),
        Device::Cpu => Tensor::from_f32(cpu::add(a.as_f32_slice()?, b.as_f32_slice()?), a.shape()),
    }
}

fn check_pair(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() || a.device() != b.device() {
        bail!(
            Shape,
            "{what}: {:?} {} on {} vs {:?} {} on {}",
            a.shape(),
            a.dtype().name(),
            a.device(),
            b.shape(),
            b.dtype().name(),
            b.device()
        );
    }
    Ok(())
}

/// `a ⊙ b`, same shapes.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_pair("mul", a, b)?;
    match a.device() {
        Device::Cuda(_) => cuda::mul(a, b),
        Device::Cpu => Tensor::from_f32(
            a.as_f32_slice()?
                .iter()
                .zip(b.as_f32_slice()?)
                .map(|(x, y)| x * y)
                .collect(),
            a.shape(),
        ),
    }
}

/// `a + w·b`, same shapes.
pub fn axpy(a: &Tensor, b: &Tensor, w: f32) -> Result<Tensor> {
    check_pair("axpy", a, b)?;
    match a.device() {
        Device::Cuda(_) => cuda::axpy(a, b, w),
        Device::Cpu => Tensor::from_f32(
            a.as_f32_slice()?
                .iter()
                .zip(b.as_f32_slice()?)
                .map(|(x, y)| x + w * y)
                .collect(),
            a.shape(),
        ),
    }
}

/// The tensor in `dtype` (on the GPU converted there; round to nearest even).
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    match x.device() {
        Device::Cuda(_) => cuda::cast(x, dtype),
        Device::Cpu => x.to_dtype(dtype),
    }
}
