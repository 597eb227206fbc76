//! Launchers of kernels/embedding.cu.

use cudarc::driver::PushKernelArg;

use crate::cuda::launch::{per_row, row_threads};
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// Gather rows of `table` for `ids` (already checked against the vocabulary) into `out_dtype`.
pub(super) fn embed(table: &Tensor, ids: &[u32], scale: f32, out_dtype: DType) -> Result<Tensor> {
    let st = table.cuda_storage()?;
    let dev = st.device().clone();
    let (_, h) = table.dims2()?;
    let t = ids.len();
    let ids_buf = dev.upload(bytemuck::cast_slice(ids))?;
    let mut out = dev.alloc(t * h * out_dtype.size_in_bytes())?;
    let name = match (table.dtype(), out_dtype) {
        (DType::F32, DType::F32) => "embed_f32_f32",
        (DType::F32, DType::BF16) => "embed_f32_bf16",
        (DType::F32, DType::F16) => "embed_f32_f16",
        (DType::BF16, DType::F32) => "embed_bf16_f32",
        (DType::BF16, DType::BF16) => "embed_bf16_bf16",
        (DType::BF16, DType::F16) => "embed_bf16_f16",
        (DType::F16, DType::F32) => "embed_f16_f32",
        (DType::F16, DType::BF16) => "embed_f16_bf16",
        (DType::F16, DType::F16) => "embed_f16_f16",
    };
    let f = dev.function("embedding", name)?;
    let h32 = h as i32;
    let (y, tb, ib) = (&mut out.arg_mut(), &st.buf.arg(), &ids_buf.arg());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y).arg(tb).arg(ib).arg(&h32).arg(&scale);
    if t > 0 {
        // SAFETY: one block per id; every id indexes a row of the table (checked by the caller).
        unsafe { l.launch(per_row(t, row_threads(h))) }?;
    }
    Tensor::from_cuda(out, out_dtype, &[t, h])
}

pub(super) fn gather_rows(x: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let sx = x.cuda_storage()?;
    let dev = sx.device().clone();
    let (_, h) = x.dims2()?;
    let dtype = x.dtype();
    let idx32: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let idx_buf = dev.upload(bytemuck::cast_slice(&idx32))?;
    let mut out = dev.alloc(idx.len() * h * dtype.size_in_bytes())?;
    let f = dev.function("embedding", crate::kernel_name!("gather_rows", dtype))?;
    let h32 = h as i32;
    let (y, xb, ib) = (&mut out.arg_mut(), &sx.buf.arg(), &idx_buf.arg());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y).arg(xb).arg(ib).arg(&h32);
    if !idx.is_empty() {
        // SAFETY: one block per index; indices were checked against the row count.
        unsafe { l.launch(per_row(idx.len(), row_threads(h))) }?;
    }
    Tensor::from_cuda(out, dtype, &[idx.len(), h])
}

/// Backward of gather_rows for distinct indices: zero rows except the gathered ones.
pub(super) fn gather_rows_backward(dy: &Tensor, idx: &[usize], rows: usize) -> Result<Tensor> {
    let sd = dy.cuda_storage()?;
    let dev = sd.device().clone();
    let (_, h) = dy.dims2()?;
    let dtype = dy.dtype();
    let mut src = vec![-1i32; rows];
    for (r, &i) in idx.iter().enumerate() {
        if src[i] >= 0 {
            crate::bail!(
                Shape,
                "gather_rows backward on the GPU needs distinct indices (row {i} twice)"
            );
        }
        src[i] = r as i32;
    }
    let src_buf = dev.upload(bytemuck::cast_slice(&src))?;
    let mut out = dev.alloc(rows * h * dtype.size_in_bytes())?;
    let f = dev.function("embedding", crate::kernel_name!("scatter_rows", dtype))?;
    let h32 = h as i32;
    let (y, db, sb) = (&mut out.arg_mut(), &sd.buf.arg(), &src_buf.arg());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y).arg(db).arg(sb).arg(&h32);
    if rows > 0 {
        // SAFETY: one block per output row; src_of_row holds -1 or a valid row of dy.
        unsafe { l.launch(per_row(rows, row_threads(h))) }?;
    }
    Tensor::from_cuda(out, dtype, &[rows, h])
}
