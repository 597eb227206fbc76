//! Launchers of kernels/optim.cu.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::cpu::Coefficients;
use crate::bail;
use crate::error::Result;
use crate::tensor::{Device, Tensor};

const THREADS: u32 = 256;

fn grid(slots: usize, max_len: usize) -> LaunchConfig {
    let x = max_len.div_ceil(THREADS as usize).clamp(1, 1024) as u32;
    LaunchConfig {
        grid_dim: (x, slots as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One fused launch over every slot of `table` (five u64 per slot: p, g, m, v, n).
pub(super) fn adamw(
    device: Device,
    table: &[u64],
    slots: usize,
    k: &Coefficients,
    clip: f32,
) -> Result<()> {
    let Device::Cuda(i) = device else {
        bail!(Shape, "AdamW on the GPU needs a GPU device")
    };
    if slots == 0 {
        return Ok(());
    }
    if slots > 65535 {
        bail!(Shape, "AdamW: {slots} tensors exceed one launch's grid");
    }
    let dev = crate::cuda::device(i)?;
    let max_len = table.chunks(5).map(|s| s[4] as usize).max().unwrap_or(0);
    let t = dev.upload(bytemuck::cast_slice(table))?;
    let f = dev.function("optim", "adamw_multi")?;
    let tb = &t.arg();
    let mut l = dev.stream().launch_builder(&f);
    l.arg(tb)
        .arg(&k.decay)
        .arg(&k.w1)
        .arg(&k.b2)
        .arg(&k.w2)
        .arg(&k.step_size)
        .arg(&k.bc2_sqrt)
        .arg(&k.eps)
        .arg(&clip);
    // SAFETY: every pointer in the table addresses `n` f32 values of a live buffer (the
    // optimiser's masters and moments, and the caller's gradients), and they stay alive until
    // the stream has run the kernel (the table upload and the launch are ordered on it; the
    // caller keeps the gradients until its next synchronising read).
    unsafe { l.launch(grid(slots, max_len)) }?;
    dev.synchronize()
}

/// sqrt(Σ‖g‖²) in one launch.
pub(super) fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let Some(first) = grads.first() else {
        return Ok(0.0);
    };
    let dev = first.cuda_storage()?.device().clone();
    let mut table = Vec::with_capacity(2 * grads.len());
    let mut max_len = 0;
    for g in grads {
        table.extend_from_slice(&[g.cuda_storage()?.buf.raw_ptr(), g.elem_count() as u64]);
        max_len = max_len.max(g.elem_count());
    }
    if grads.len() > 65535 {
        bail!(
            Shape,
            "grad norm: {} tensors exceed one launch's grid",
            grads.len()
        );
    }
    let t = dev.upload(bytemuck::cast_slice(&table))?;
    let mut out = dev.alloc_zeros(grads.len() * 8)?;
    let f = dev.function("optim", "sum_squares_multi")?;
    let (tb, ob) = (&t.arg(), &mut out.arg_mut());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(tb).arg(ob);
    // SAFETY: each table entry addresses `n` f32 values of a gradient the caller holds; `out`
    // has one f64 per tensor.
    unsafe { l.launch(grid(grads.len(), max_len)) }?;
    let sums: Vec<f64> = bytemuck::cast_slice(&out.download()?).to_vec();
    Ok(sums.iter().sum::<f64>().sqrt())
}
