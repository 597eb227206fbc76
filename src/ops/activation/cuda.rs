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
