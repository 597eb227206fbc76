//! Launchers of kernels/norm.cu.

use cudarc::driver::PushKernelArg;

use super::{NormKind, RmsNorm};
use crate::cuda::abi::engine_norm_params;
use crate::cuda::launch::{per_row, row_threads};
use crate::error::Result;
use crate::kernel_name;
use crate::tensor::{DType, Tensor};

/// The kernels read the gains as f32 on the same device.
fn check_weight(n: &RmsNorm, x: &Tensor) -> Result<()> {
    if n.weight.dtype() != DType::F32 || n.weight.device() != x.device() {
        crate::bail!(
            Shape,
            "rms_norm: the gain must be f32 on {}, found {} on {}",
            x.device(),
            n.weight.dtype().name(),
            n.weight.device()
        );
    }
    Ok(())
}

fn params(rows: usize, hidden: usize, n: &RmsNorm) -> engine_norm_params {
    engine_norm_params {
        rows: rows as i32,
        hidden: hidden as i32,
        eps: n.eps,
        one_plus_weight: (n.kind == NormKind::OnePlusWeight) as i32,
    }
}

pub(super) fn rms_norm(x: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
    check_weight(norm, x)?;
    let sx = x.cuda_storage()?;
    let dev = sx.device().clone();
    let (t, h) = x.dims2()?;
    let dtype = x.dtype();
    let mut out = dev.alloc(t * h * dtype.size_in_bytes())?;
    let f = dev.function("norm", kernel_name!("rms_norm", dtype))?;
    let p = params(t, h, norm);
    let (y, xb, wb) = (
        &mut out.arg_mut(),
        &sx.buf.arg(),
        &norm.weight.cuda_storage()?.buf.arg(),
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y).arg(xb).arg(wb).arg(&p);
    if t > 0 {
        // SAFETY: one block per row of `hidden` elements; the weight has `hidden` f32 values.
        unsafe { l.launch(per_row(t, row_threads(h))) }?;
    }
    Tensor::from_cuda(out, dtype, &[t, h])
}

/// (s, y) with s = x + a, y = norm(s).
pub(super) fn add_rms_norm(x: &Tensor, a: &Tensor, norm: &RmsNorm) -> Result<(Tensor, Tensor)> {
    check_weight(norm, x)?;
    let (sx, sa) = (x.cuda_storage()?, a.cuda_storage()?);
    let dev = sx.device().clone();
    let (t, h) = x.dims2()?;
    let dtype = x.dtype();
    let mut s = dev.alloc(t * h * dtype.size_in_bytes())?;
    let mut y = dev.alloc(t * h * dtype.size_in_bytes())?;
    let f = dev.function("norm", kernel_name!("add_rms_norm", dtype))?;
    let p = params(t, h, norm);
    let (sb, yb, xb, ab, wb) = (
        &mut s.arg_mut(),
        &mut y.arg_mut(),
        &sx.buf.arg(),
        &sa.buf.arg(),
        &norm.weight.cuda_storage()?.buf.arg(),
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(sb).arg(yb).arg(xb).arg(ab).arg(wb).arg(&p);
    if t > 0 {
        // SAFETY: as in rms_norm, with two inputs and two outputs of the same shape.
        unsafe { l.launch(per_row(t, row_threads(h))) }?;
    }
    Ok((
        Tensor::from_cuda(s, dtype, &[t, h])?,
        Tensor::from_cuda(y, dtype, &[t, h])?,
    ))
}

/// (s, y) with s = x + norm1(a), y = norm2(s).
pub(super) fn norm_add_norm(
    x: &Tensor,
    a: &Tensor,
    n1: &RmsNorm,
    n2: &RmsNorm,
) -> Result<(Tensor, Tensor)> {
    check_weight(n1, x)?;
    check_weight(n2, x)?;
    let (sx, sa) = (x.cuda_storage()?, a.cuda_storage()?);
    let dev = sx.device().clone();
    let (t, h) = x.dims2()?;
    let dtype = x.dtype();
    let mut s = dev.alloc(t * h * dtype.size_in_bytes())?;
    let mut y = dev.alloc(t * h * dtype.size_in_bytes())?;
    let f = dev.function("norm", kernel_name!("norm_add_norm", dtype))?;
    let p = params(t, h, n1);
    let (sb, yb, xb, ab) = (
        &mut s.arg_mut(),
        &mut y.arg_mut(),
        &sx.buf.arg(),
        &sa.buf.arg(),
    );
    let (w1, w2) = (
        &n1.weight.cuda_storage()?.buf.arg(),
        &n2.weight.cuda_storage()?.buf.arg(),
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(sb).arg(yb).arg(xb).arg(ab).arg(w1).arg(w2).arg(&p);
    if t > 0 {
        // SAFETY: as in rms_norm, with two weights.
        unsafe { l.launch(per_row(t, row_threads(h))) }?;
    }
    Ok((
        Tensor::from_cuda(s, dtype, &[t, h])?,
        Tensor::from_cuda(y, dtype, &[t, h])?,
    ))
}

/// dx of RMSNorm (frozen gains).
pub(super) fn rms_norm_backward(x: &Tensor, dy: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
    check_weight(norm, x)?;
    let (sx, sd) = (x.cuda_storage()?, dy.cuda_storage()?);
    let dev = sx.device().clone();
    let (t, h) = x.dims2()?;
    let dtype = x.dtype();
    let mut out = dev.alloc(t * h * dtype.size_in_bytes())?;
    let f = dev.function("norm", kernel_name!("rms_norm_backward", dtype))?;
    let p = params(t, h, norm);
    let (y, xb, db, wb) = (
        &mut out.arg_mut(),
        &sx.buf.arg(),
        &sd.buf.arg(),
        &norm.weight.cuda_storage()?.buf.arg(),
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y).arg(xb).arg(db).arg(wb).arg(&p);
    if t > 0 {
        // SAFETY: one block per row of `hidden` elements, as the forward.
        unsafe { l.launch(per_row(t, row_threads(h))) }?;
    }
    Tensor::from_cuda(out, dtype, &[t, h])
}
