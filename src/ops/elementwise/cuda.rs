//! Launchers of kernels/elementwise.cu.

use cudarc::driver::PushKernelArg;

use crate::cuda::launch::{grid_stride, pack};
use crate::error::Result;
use crate::kernel_name;
use crate::tensor::{DType, Tensor};

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

/// y = a ⊙ b.
pub(super) fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (sa, sb) = (a.cuda_storage()?, b.cuda_storage()?);
    let dev = sa.device().clone();
    let dtype = a.dtype();
    let n = a.elem_count();
    let mut out = dev.alloc(n * dtype.size_in_bytes())?;
    let f = dev.function("elementwise", kernel_name!("mul", dtype))?;
    let n64 = n as i64;
    let (ya, aa, ba) = (&mut out.arg_mut(), &sa.buf.arg(), &sb.buf.arg());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(ya).arg(aa).arg(ba).arg(&n64);
    // SAFETY: n elements of a and b read, n of y written.
    unsafe { l.launch(grid_stride(n, 256)) }?;
    Tensor::from_cuda(out, dtype, a.shape())
}

/// y = a + w·b.
pub(super) fn axpy(a: &Tensor, b: &Tensor, w: f32) -> Result<Tensor> {
    let (sa, sb) = (a.cuda_storage()?, b.cuda_storage()?);
    let dev = sa.device().clone();
    let dtype = a.dtype();
    let n = a.elem_count();
    let mut out = dev.alloc(n * dtype.size_in_bytes())?;
    let f = dev.function("elementwise", kernel_name!("axpy", dtype))?;
    let n64 = n as i64;
    let (ya, aa, ba) = (&mut out.arg_mut(), &sa.buf.arg(), &sb.buf.arg());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(ya).arg(aa).arg(ba).arg(&w).arg(&n64);
    // SAFETY: n elements of a and b read, n of y written.
    unsafe { l.launch(grid_stride(n, 256)) }?;
    Tensor::from_cuda(out, dtype, a.shape())
}

/// Convert on the device.
pub(super) fn cast(x: &Tensor, to: DType) -> Result<Tensor> {
    let sx = x.cuda_storage()?;
    let dev = sx.device().clone();
    let n = x.elem_count();
    let name = match (x.dtype(), to) {
        (DType::F32, DType::F32) => "cast_f32_f32",
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::F32, DType::F16) => "cast_f32_f16",
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (DType::BF16, DType::BF16) => "cast_bf16_bf16",
        (DType::BF16, DType::F16) => "cast_bf16_f16",
        (DType::F16, DType::F32) => "cast_f16_f32",
        (DType::F16, DType::BF16) => "cast_f16_bf16",
        (DType::F16, DType::F16) => "cast_f16_f16",
    };
    let mut out = dev.alloc(n * to.size_in_bytes())?;
    let f = dev.function("elementwise", name)?;
    let n64 = n as i64;
    let (y, xb) = (&mut out.arg_mut(), &sx.buf.arg());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y).arg(xb).arg(&n64);
    // SAFETY: n elements read and written.
    unsafe { l.launch(grid_stride(n, 256)) }?;
    Tensor::from_cuda(out, to, x.shape())
}
