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

/// `y = x·Wᵀ + s·(x_lora·Aᵀ)·Bᵀ`, with `x_lora = x` unless a separate LoRA input (the
/// dropped-out `x` of training) is given.
pub(super) fn linear(
    x: &[f32],
    x_lora: Option<&[f32]>,
    t: usize,
    k: usize,
    n: usize,
    layer: &Linear,
) -> Result<Vec<f32>> {
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
        let x = x_lora.unwrap_or(x);
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

/// Gradients of the linear op: `dx = dy·W + (s·dy·B)·A`, `dA = (s·dy·B)ᵀ·x`,
/// `dB = s·dyᵀ·(x·Aᵀ)` and, when asked (a trainable dense weight such as the score head),
/// `dW = dyᵀ·x`. The frozen base weight is read tile by tile as in the forward pass.
pub(super) struct CpuLinearGrads {
    pub dx: Vec<f32>,
    /// The LoRA path's input gradient, when it had its own input.
    pub dx_lora: Option<Vec<f32>>,
    pub lora: Option<(Vec<f32>, Vec<f32>)>,
    pub dw: Option<Vec<f32>>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn linear_backward(
    x: &[f32],
    x_lora: Option<&[f32]>,
    dy: &[f32],
    t: usize,
    k: usize,
    n: usize,
    layer: &Linear,
    want_dw: bool,
) -> Result<CpuLinearGrads> {
    let mut dx = vec![0f32; t * k];
    // dyᵀ as a [n, t] view of the row-major [t, n] dy.
    let dy_t = MatRef {
        data: dy,
        rs: 1,
        cs: n,
    };
    match &layer.weight {
        BaseWeight::Dense(w) => match w.cpu_storage()? {
            CpuStorage::F32(w) => sgemm(
                t,
                k,
                n,
                &mut dx,
                k,
                false,
                MatRef::rows(dy, n),
                MatRef::rows(w, k),
                1.0,
                Threads::All,
            ),
            w => tiled_t(dy, t, k, n, &mut dx, |start, out| w.read_f32(start, out)),
        },
        BaseWeight::Nf4(q) => tiled_t(dy, t, k, n, &mut dx, |start, out| {
            q.dequantize_into(start, out)
        }),
        BaseWeight::Nf4Cuda(_) => bail!(Shape, "linear backward: the NF4 weight is on a GPU"),
    }
    let dw = if want_dw {
        let mut dw = vec![0f32; n * k];
        sgemm(
            n,
            k,
            t,
            &mut dw,
            k,
            false,
            dy_t,
            MatRef::rows(x, k),
            1.0,
            Threads::All,
        );
        Some(dw)
    } else {
        None
    };
    let mut dx_lora = None;
    let lora = match &layer.lora {
        None => None,
        Some(l) => {
            let separate = x_lora.is_some();
            let x = x_lora.unwrap_or(x);
            let (a, b, s) = (l.a.as_f32_slice()?, l.b.as_f32_slice()?, l.scale);
            let r = l.a.shape()[0];
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
            let mut db = vec![0f32; n * r];
            sgemm(
                n,
                r,
                t,
                &mut db,
                r,
                false,
                dy_t,
                MatRef::rows(&h, r),
                s,
                Threads::All,
            );
            let mut dh = vec![0f32; t * r];
            sgemm(
                t,
                r,
                n,
                &mut dh,
                r,
                false,
                MatRef::rows(dy, n),
                MatRef::rows(b, r),
                s,
                Threads::All,
            );
            let mut da = vec![0f32; r * k];
            let dh_t = MatRef {
                data: &dh,
                rs: 1,
                cs: r,
            };
            sgemm(
                r,
                k,
                t,
                &mut da,
                k,
                false,
                dh_t,
                MatRef::rows(x, k),
                1.0,
                Threads::All,
            );
            if separate {
                let mut dxl = vec![0f32; t * k];
                sgemm(
                    t,
                    k,
                    r,
                    &mut dxl,
                    k,
                    false,
                    MatRef::rows(&dh, r),
                    MatRef::rows(a, k),
                    1.0,
                    Threads::All,
                );
                dx_lora = Some(dxl);
            } else {
                sgemm(
                    t,
                    k,
                    r,
                    &mut dx,
                    k,
                    true,
                    MatRef::rows(&dh, r),
                    MatRef::rows(a, k),
                    1.0,
                    Threads::All,
                );
            }
            Some((da, db))
        }
    };
    Ok(CpuLinearGrads {
        dx,
        dx_lora,
        lora,
        dw,
    })
}

/// `dx += dy·W` where rows of `W` are produced on demand by `fill(flat_start, out)`.
fn tiled_t(
    dy: &[f32],
    t: usize,
    k: usize,
    n: usize,
    dx: &mut [f32],
    fill: impl Fn(usize, &mut [f32]),
) {
    let rows = tile_rows(k);
    let mut scratch = vec![0f32; rows * k];
    let mut n0 = 0;
    while n0 < n {
        let nr = rows.min(n - n0);
        let w = &mut scratch[..nr * k];
        fill(n0 * k, w);
        let dy_cols = MatRef {
            data: &dy[n0..],
            rs: n,
            cs: 1,
        };
        sgemm(
            t,
            k,
            nr,
            dx,
            k,
            n0 > 0,
            dy_cols,
            MatRef::rows(w, k),
            1.0,
            Threads::All,
        );
        n0 += nr;
    }
}
