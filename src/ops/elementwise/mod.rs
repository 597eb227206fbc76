//! Elementwise ops: the residual add.

mod cpu;
mod cuda;

use crate::bail;
use crate::error::Result;
use crate::tensor::{Device, Tensor};

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
