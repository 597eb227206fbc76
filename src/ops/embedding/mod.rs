//! Embedding lookup: rows of a (frozen) table gathered by token id and multiplied by a
//! constant (Gemma-2 scales by √hidden; Llama by 1).

mod cpu;
mod cuda;

use crate::bail;
use crate::error::Result;
use crate::tensor::{DType, Device, Tensor};

/// `[tokens, hidden]` rows of `table` (`[vocab, hidden]`, any storage dtype), times `scale`,
/// as `dtype` (the activation dtype: f32 on the CPU).
pub fn embed(table: &Tensor, ids: &[u32], scale: f32, dtype: DType) -> Result<Tensor> {
    let (vocab, h) = table.dims2()?;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        bail!(
            Shape,
            "embedding: token id {bad} is outside the table of {vocab} rows"
        );
    }
    match table.device() {
        Device::Cuda(_) => cuda::embed(table, ids, scale, dtype),
        Device::Cpu if dtype != DType::F32 => bail!(
            Shape,
            "embedding: CPU activations are f32, not {}",
            dtype.name()
        ),
        Device::Cpu => Tensor::from_f32(
            cpu::embed(table.cpu_storage()?, h, ids, scale),
            &[ids.len(), h],
        ),
    }
}

/// Rows `idx` of `x` (`[tokens, hidden]`), e.g. the last token of every row of a batch.
pub fn gather_rows(x: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let (t, h) = x.dims2()?;
    if let Some(&bad) = idx.iter().find(|&&i| i >= t) {
        bail!(Shape, "gather_rows: row {bad} of {t}");
    }
    match x.device() {
        Device::Cuda(_) => cuda::gather_rows(x, idx),
        Device::Cpu => {
            Tensor::from_f32(cpu::gather_rows(x.as_f32_slice()?, h, idx), &[idx.len(), h])
        }
    }
}

/// dx of [`gather_rows`]: the row gradients scattered (added) back into a `[rows, hidden]`
/// zero tensor.
pub fn gather_rows_backward(dy: &Tensor, idx: &[usize], rows: usize) -> Result<Tensor> {
    let (n, h) = dy.dims2()?;
    if n != idx.len() || idx.iter().any(|&i| i >= rows) {
        bail!(
            Shape,
            "gather_rows backward: {n} gradients for {} indices into {rows} rows",
            idx.len()
        );
    }
    match dy.device() {
        Device::Cuda(_) => cuda::gather_rows_backward(dy, idx, rows),
        Device::Cpu => {
            let g = dy.as_f32_slice()?;
            let mut dx = vec![0f32; rows * h];
            for (r, &i) in idx.iter().enumerate() {
                for (d, s) in dx[i * h..(i + 1) * h]
                    .iter_mut()
                    .zip(&g[r * h..(r + 1) * h])
                {
                    *d += s;
                }
            }
            Tensor::from_f32(dx, &[rows, h])
        }
    }
}
