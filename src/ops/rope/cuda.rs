//! Launchers of kernels/rope.cu.

use std::sync::Arc;

use cudarc::driver::PushKernelArg;

use crate::cuda::CudaDevice;
use crate::cuda::launch::grid_1d;
use crate::error::Result;
use crate::kernel_name;
use crate::tensor::{DType, Tensor};

/// cos/sin tables `[tokens, half]` (f32) on the device.
pub(super) fn table(
    dev: &Arc<CudaDevice>,
    positions: &[u32],
    inv_freq: &[f32],
) -> Result<(Tensor, Tensor)> {
    let (t, half) = (positions.len(), inv_freq.len());
    let pos = dev.upload(bytemuck::cast_slice(positions))?;
    let freq = dev.upload(bytemuck::cast_slice(inv_freq))?;
    let mut cos = dev.alloc(t * half * 4)?;
    let mut sin = dev.alloc(t * half * 4)?;
    let f = dev.function("rope", "rope_table")?;
    let (t32, h32) = (t as i32, half as i32);
    let (c, s, p, fr) = (
        &mut cos.arg_mut(),
        &mut sin.arg_mut(),
        &pos.arg(),
        &freq.arg(),
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(c).arg(s).arg(p).arg(fr).arg(&t32).arg(&h32);
    if t * half > 0 {
        // SAFETY: one thread per (token, frequency) pair inside both tables.
        unsafe { l.launch(grid_1d(t * half, 256)) }?;
    }
    Ok((
        Tensor::from_cuda(cos, DType::F32, &[t, half])?,
        Tensor::from_cuda(sin, DType::F32, &[t, half])?,
    ))
}

pub(super) fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, head_dim: usize) -> Result<Tensor> {
    rotate(x, cos, sin, head_dim, kernel_name!("rope", x.dtype()))
}

/// dx of the rotation (rotate back).
pub(super) fn apply_backward(
    dy: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    head_dim: usize,
) -> Result<Tensor> {
    rotate(
        dy,
        cos,
        sin,
        head_dim,
        kernel_name!("rope_backward", dy.dtype()),
    )
}

/// Run a rotation kernel (`kernel`: forward or backward, for `x`'s dtype) over `x` [t, w].
fn rotate(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    head_dim: usize,
    kernel: &'static str,
) -> Result<Tensor> {
    let sx = x.cuda_storage()?;
    let dev = sx.device().clone();
    let (t, w) = x.dims2()?;
    let dtype = x.dtype();
    let mut out = dev.alloc(t * w * dtype.size_in_bytes())?;
    let f = dev.function("rope", kernel)?;
    let (t32, w32, d32) = (t as i32, w as i32, head_dim as i32);
    let (y, xb, cb, sb) = (
        &mut out.arg_mut(),
        &sx.buf.arg(),
        &cos.cuda_storage()?.buf.arg(),
        &sin.cuda_storage()?.buf.arg(),
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y)
        .arg(xb)
        .arg(cb)
        .arg(sb)
        .arg(&t32)
        .arg(&w32)
        .arg(&d32);
    if t * w > 0 {
        // SAFETY: one thread per rotated pair; shapes checked by the caller.
        unsafe { l.launch(grid_1d(t * w / 2, 256)) }?;
    }
    Tensor::from_cuda(out, dtype, &[t, w])
}
