//! CPU twin of the linear op: dense or NF4 base, plus LoRA.

use crate::bail;
use crate::error::Result;
use crate::ops::gemm::{MatRef, Threads, sgemm};
use crate::tensor::CpuStorage;

use super::{BaseWeight, Linear};

/// Output rows of `W` widened per tile: about 1 MiB of f32 scratch, small enough to stay in
/// cache while the GEMM streams `x` past it.
fn tile_rows(k: usize) -> usize {
    ((1 << 18) / k.max(1)).clamp(16, 4096)
}

pub(super) fn linear(x: &[f32], t: usize, k: usize, n: usize, layer: &Linear) -> Result<Vec<f32>> {
    let mut y = vec![0f32; t * n];
    match &layer.weight {
        BaseWeight::Dense(w) => match w.cpu_storage()? {
            CpuStorage::F32(w) => sgemm(
                t,
                n,
                k,
                &mut y,
                n,
                false,
                MatRef::rows(x, k),
                MatRef::transposed(w, k),
                1.0,
                Threads::All,
            ),
            w => tiled(x, t, k, n, &mut y, |start, out| w.read_f32(start, out)),
        },
        BaseWeight::Nf4(q) => tiled(x, t, k, n, &mut y, |start, out| {
            q.dequantize_into(start, out)
        }),
        BaseWeight::Nf4Cuda(_) => bail!(
            Shape,
            "linear: the NF4 weight is on a GPU, the input on the CPU"
        ),
    }
    if let Some(l) = &layer.lora {
        let a = l.a.as_f32_slice()?;
        let b = l.b.as_f32_slice()?;
        let r = l.a.shape()[0];
        // h = x·Aᵀ  [t, r];  y += scale · h·Bᵀ
        let mut h = vec![0f32; t * r];
        sgemm(
            t,
            r,
            k,
            &mut h,
            r,
            false,
            MatRef::rows(x, k),
            MatRef::transposed(a, k),
            1.0,
            Threads::All,
        );
        sgemm(
            t,
            n,
            r,
            &mut y,
            n,
            true,
            MatRef::rows(&h, r),
            MatRef::transposed(b, r),
            l.scale,
            Threads::All,
        );
    }
    Ok(y)
}

/// `y = x·Wᵀ` where rows of `W` are produced on demand by `fill(flat_start, out)`.
fn tiled(x: &[f32], t: usize, k: usize, n: usize, y: &mut [f32], fill: impl Fn(usize, &mut [f32])) {
    let rows = tile_rows(k);
    let mut scratch = vec![0f32; rows * k];
    let mut n0 = 0;
    while n0 < n {
        let nr = rows.min(n - n0);
        let w = &mut scratch[..nr * k];
        fill(n0 * k, w);
        sgemm(
            t,
            nr,
            k,
            &mut y[n0..],
            n,
            false,
            MatRef::rows(x, k),
            MatRef::transposed(w, k),
            1.0,
            Threads::All,
        );
        n0 += nr;
    }
}
