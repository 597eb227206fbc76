//! Launchers of kernels/activation.cu.

use cudarc::driver::PushKernelArg;

use super::Gate;
use crate::cuda::launch::{grid_stride, pack};
use crate::error::Result;
use crate::kernel_name;
use crate::tensor::Tensor;

pub(super) fn gated(gate: &Tensor, up: &Tensor, act: Gate) -> Result<Tensor> {
    let (sg, su) = (gate.cuda_storage()?, up.cuda_storage()?);
    let dev = sg.device().clone();
    let dtype = gate.dtype();
    let n = gate.elem_count();
    let mut out = dev.alloc(n * dtype.size_in_bytes())?;
    let f = dev.function("activation", kernel_name!("gated", dtype))?;
    let (n64, act) = (
        n as i64,
        match act {
            Gate::GeluTanh => 0i32,
            Gate::Silu => 1i32,
        },
    );
    let (y, g, u) = (&mut out.arg_mut(), &sg.buf.arg(), &su.buf.arg());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y).arg(g).arg(u).arg(&n64).arg(&act);
    // SAFETY: the kernel reads n elements of gate and up and writes n of y.
    unsafe { l.launch(grid_stride(n.div_ceil(pack(dtype)), 256)) }?;
    Tensor::from_cuda(out, dtype, gate.shape())
}

pub(super) fn gated_backward(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
    act: Gate,
) -> Result<(Tensor, Tensor)> {
    let (sg, su, sd) = (gate.cuda_storage()?, up.cuda_storage()?, dy.cuda_storage()?);
    let dev = sg.device().clone();
    let dtype = gate.dtype();
    let n = gate.elem_count();
    let mut dg = dev.alloc(n * dtype.size_in_bytes())?;
    let mut du = dev.alloc(n * dtype.size_in_bytes())?;
    let f = dev.function("activation", kernel_name!("gated_backward", dtype))?;
    let (n64, act) = (n as i64, if act == Gate::GeluTanh { 0i32 } else { 1i32 });
    let (a, b, g, u, d) = (
        &mut dg.arg_mut(),
        &mut du.arg_mut(),
        &sg.buf.arg(),
        &su.buf.arg(),
        &sd.buf.arg(),
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(a).arg(b).arg(g).arg(u).arg(d).arg(&n64).arg(&act);
    // SAFETY: n elements of each input read, n of each output written.
    unsafe { l.launch(crate::cuda::launch::grid_stride(n, 256)) }?;
    Ok((
        Tensor::from_cuda(dg, dtype, gate.shape())?,
        Tensor::from_cuda(du, dtype, gate.shape())?,
    ))
}
