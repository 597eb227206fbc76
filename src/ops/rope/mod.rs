//! Rotary position embeddings, "rotate half" layout (as Hugging Face's Gemma-2 and Llama):
//! for each head, feature `i < d/2` pairs with `i + d/2` and rotates by `pos · inv_freq[i]`.
//!
//! The frequencies come from the model config: the default `1 / theta^(2i/d)` or Llama-3's
//! scaled variant ([`llama3_inv_freq`]). Angles are computed in f32 as `pos · inv_freq`
//! (the product Hugging Face's rotary module forms), then `cos`/`sin` in f32.

mod cpu;
mod cuda;

use crate::bail;
use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// The default rotary frequencies `1 / theta^(2i/d)` for `i < d/2`, in f32 as torch computes
/// them (`arange(0, d, 2).float() / d`, then a power).
pub fn default_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / head_dim as f32;
            1.0 / (theta as f32).powf(e)
        })
        .collect()
}

/// Llama-3 frequency scaling (`rope_type = "llama3"`): long wavelengths are divided by
/// `factor`, short ones kept, and those in between blended smoothly.
pub fn llama3_inv_freq(
    base: &[f32],
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_max_position: f32,
) -> Vec<f32> {
    // f32 throughout, in the order of transformers' `_compute_llama3_parameters`.
    let low_freq_wavelen = original_max_position / low_freq_factor;
    let high_freq_wavelen = original_max_position / high_freq_factor;
    base.iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < high_freq_wavelen {
                f
            } else if wavelen > low_freq_wavelen {
                f / factor
            } else {
                let smooth = (original_max_position / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}

/// Per-token cosines and sines, `[tokens, head_dim / 2]` each, shared by every layer.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTable {
    pub fn new(positions: &[u32], inv_freq: &[f32], device: Device) -> Result<Self> {
        match device {
            Device::Cuda(i) => {
                let (cos, sin) = cuda::table(&crate::cuda::device(i)?, positions, inv_freq)?;
                Ok(RopeTable { cos, sin })
            }
            Device::Cpu => {
                let (cos, sin) = cpu::table(positions, inv_freq);
                let shape = [positions.len(), inv_freq.len()];
                Ok(RopeTable {
                    cos: Tensor::from_f32(cos, &shape)?,
                    sin: Tensor::from_f32(sin, &shape)?,
                })
            }
        }
    }
}

/// Rotate every head of `x` (`[tokens, heads · head_dim]`).
pub fn apply(x: &Tensor, table: &RopeTable, head_dim: usize) -> Result<Tensor> {
    let (t, w) = x.dims2()?;
    if !head_dim.is_multiple_of(2) || w % head_dim != 0 || table.cos.shape() != [t, head_dim / 2] {
        bail!(
            Shape,
            "rope: x {:?}, head_dim {head_dim} and table {:?} do not fit",
            x.shape(),
            table.cos.shape()
        );
    }
    match x.device() {
        Device::Cuda(_) => cuda::apply(x, &table.cos, &table.sin, head_dim),
        Device::Cpu => {
            let y = cpu::apply(
                x.as_f32_slice()?,
                table.cos.as_f32_slice()?,
                table.sin.as_f32_slice()?,
                w,
                head_dim,
            );
            Tensor::from_f32(y, &[t, w])
        }
    }
}

/// dx of [`apply`]: the rotation is orthogonal, so its gradient rotates back by the opposite
/// angle.
pub fn apply_backward(dy: &Tensor, table: &RopeTable, head_dim: usize) -> Result<Tensor> {
    let (t, w) = dy.dims2()?;
    if !head_dim.is_multiple_of(2) || w % head_dim != 0 || table.cos.shape() != [t, head_dim / 2] {
        bail!(
            Shape,
            "rope backward: dy {:?}, head_dim {head_dim}, table {:?}",
            dy.shape(),
            table.cos.shape()
        );
    }
    match dy.device() {
        Device::Cuda(_) => cuda::apply_backward(dy, &table.cos, &table.sin, head_dim),
        Device::Cpu => {
            let neg_sin: Vec<f32> = table.sin.as_f32_slice()?.iter().map(|s| -s).collect();
            let y = cpu::apply(
                dy.as_f32_slice()?,
                table.cos.as_f32_slice()?,
                &neg_sin,
                w,
                head_dim,
            );
            Tensor::from_f32(y, &[t, w])
        }
    }
}
