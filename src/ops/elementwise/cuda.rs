//! Launchers of kernels/elementwise.cu.

use cudarc::driver::PushKernelArg;

use crate::cuda::launch::{grid_stride, pack};
use crate::error::Result;
use crate::kernel_name;
use crate::tensor::Tensor;

pub(super) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (sa, sb) = (a.cuda_storage()?, b.cuda_storage()?);
    let dev = sa.device().clone();
    let dtype = a.dtype();
    let n = a.elem_count();
    let mut out = dev.alloc(n * dtype.size_in_bytes())?;
    let f = dev.function("elementwise", kernel_name!("add", dtype))?;
    let n64 = n as i64;
    let (ya, aa, ba) = (&mut out.arg_mut(), &sa.buf.arg(), &sb.buf.arg());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(ya).arg(aa).arg(ba).arg(&n64);
    // SAFETY: the kernel reads n elements of a and b and writes n of y, all sized here.
    unsafe { l.launch(grid_stride(n.div_ceil(pack(dtype)), 256)) }?;
    Tensor::from_cuda(out, dtype, a.shape())
}
