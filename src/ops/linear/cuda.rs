//! Launchers of kernels/linear.cu: the linear op on the GPU (NF4 or dense base weight, fused
//! LoRA, the f32 score head) and NF4 quantisation / dequantisation of whole weights.
//!
//! Which kernel runs (see [`choose_path`] and [`plan`]):
//! - dense f32 weight with activations in bf16/f16 (the score head) → `matmul_f32w`, f32 out;
//! - bf16 on sm_80+, f16 on sm_75+, NF4 with `K % 64 == 0` or dense T with `K % 8 == 0` →
//!   the tensor-core kernel `matmul_tc_{nf4,dense}`;
//! - anything else (bf16 on sm_75, f32 activations, NF4 blocks straddling rows, odd dense K)
//!   → the SIMT kernel `matmul_simt_{nf4,dense}`.
//!
//! LoRA: `h = x·Aᵀ` is computed first by the same GEMM (dense T weight `A`, `N = r`, rounded to
//! T as PEFT's `lora_A` output is), then the main GEMM adds `scale·h·Bᵀ` into its accumulators
//! before it rounds `y` once. When the tile grid is too small to fill the GPU (few tokens, or
//! `N = r`), K is split across blocks and `splitk_reduce` sums the f32 partials in order.
//! [`linear_split`] is the same with `h` computed from a separate LoRA input.
//!
//! Backward ([`linear_backward`]; kernels/linear.cu "Backward" has the GEMM forms):
//! - the score head (dense f32 weight, activations in T, f32 logits gradient) →
//!   `linear_bwd_head_dx` (dx in T) and `linear_bwd_head_dw` (dW in f32);
//! - otherwise, with LoRA: `h = x_l·Aᵀ` by the forward GEMM; `dh = s·dy·B`, `dB = s·dyᵀ·h`
//!   and `dAᵀ = x_lᵀ·[dh_hi | dh_lo]` by `linear_bwd_tc_thin[_t]` (tensor cores, 128×64
//!   tiles) or `linear_bwd_simt_dense[_t]`, always through f32 partials and
//!   `linear_bwd_reduce` (which also writes dh in T and its hi/lo split, and dA transposed);
//! - `dx = dy·W (+ dh·A)` by `linear_bwd_tc_{nf4,dense}` when the GPU has tensor cores for T,
//!   `N % 8 == 0` and `K % 8 == 0` (dense) / `K % 16 == 0` (NF4), else by
//!   `linear_bwd_simt_{nf4,dense}`; N split across blocks as in the forward (`splitk_reduce`);
//!   with a separate LoRA input, `dx_lora = dh·A` is the same kernel with `W = A`.
//!
//! No kernel uses atomics: results are bit-for-bit reproducible on one GPU.

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{BaseWeight, Linear, LinearGrads, Lora};
use crate::bail;
use crate::cuda::abi::engine_matmul_params;
use crate::cuda::launch::{grid_1d, grid_stride};
use crate::cuda::{CudaBuffer, CudaDevice};
use crate::error::Result;
use crate::kernel_name;
use crate::quant::nf4::{
    ABSMAX_BLOCK, Absmax, BLOCK, DeviceAbsmax, NF4_CODE, Nf4Device, double_quantize,
};
use crate::tensor::{CudaStorage, DType, Tensor};

/// kernels/linear.cu `Nf4Table`: 16 floats passed by value (the NF4 code values, or the 15
/// decision thresholds of the quantiser).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Nf4Table {
    v: [f32; 16],
}

// SAFETY: plain `#[repr(C)]` data with the layout of the C struct (16 floats).
unsafe impl DeviceRepr for Nf4Table {}

/// The NF4 decision thresholds exactly as bitsandbytes' kernel writes them: decimal `float`
/// literals, each rounded once from decimal to f32 (as Rust rounds these literals). They equal
/// the CPU quantiser's thresholds (`tests` below checks it through `Nf4Tensor::quantize`).
#[allow(clippy::excessive_precision)]
const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

fn code_table() -> Nf4Table {
    Nf4Table { v: NF4_CODE }
}

fn threshold_table() -> Nf4Table {
    let mut v = [0f32; 16];
    v[..15].copy_from_slice(&NF4_THRESHOLDS);
    Nf4Table { v }
}

/// Which GEMM kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// `matmul_tc_*`: mma.sync tensor cores, 128×128 tiles.
    TensorCore,
    /// `matmul_simt_*`: f32 FMAs, 64×64 tiles, any shape.
    Simt,
}

impl Path {
    fn tile(self) -> usize {
        match self {
            Path::TensorCore => 128,
            Path::Simt => 64,
        }
    }
}

/// The tensor-core kernel needs tensor-core math in `dtype` on this GPU (bf16: sm_80+, f16:
/// sm_75+) and 16-byte aligned rows of `x`; NF4 also needs whole 64-blocks per row, so that a
/// thread's 16 weights share one absmax.
fn choose_path(dtype: DType, capability: (i32, i32), nf4: bool, k: usize) -> Path {
    let tensor_cores = tensor_cores(dtype, capability);
    let aligned = if nf4 {
        k.is_multiple_of(BLOCK)
    } else {
        k.is_multiple_of(8)
    };
    if tensor_cores && aligned {
        Path::TensorCore
    } else {
        Path::Simt
    }
}

/// Tensor-core math in `dtype` exists on this GPU (bf16: sm_80+, f16: sm_75+).
fn tensor_cores(dtype: DType, capability: (i32, i32)) -> bool {
    match dtype {
        DType::BF16 => capability.0 >= 8,
        DType::F16 => capability >= (7, 5),
        DType::F32 => false,
    }
}

/// Grid of one GEMM launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    path: Path,
    /// Output tiles (blocks per split).
    tiles: usize,
    /// K elements per split, a multiple of 64 (so splits start on NF4 block boundaries).
    k_per_split: usize,
    /// Blocks along K; 1 = no split (the kernel writes `y` directly).
    splits: usize,
}

/// Never split K finer than this (each split streams at least 8 tiles of 32).
const MIN_SPLIT_K: usize = 256;
const MAX_SPLITS: usize = 32;

/// Tiles for `m×n`, and a split of K when the tiles alone would leave SMs idle: aim for two
/// blocks per SM, as the tensor-core kernel is sized for.
fn plan(m: usize, n: usize, k: usize, path: Path, sms: usize) -> Plan {
    let tile = path.tile();
    let tiles = m.div_ceil(tile) * n.div_ceil(tile);
    let (k_per_split, splits) = split_plan(tiles, k, sms);
    Plan {
        path,
        tiles,
        k_per_split,
        splits,
    }
}

/// (reduction elements per split, splits) for a grid of `tiles` blocks reducing over `k`:
/// split only when the tiles leave SMs idle, aiming at two blocks per SM; every split starts
/// on a multiple of 64 and has work.
fn split_plan(tiles: usize, k: usize, sms: usize) -> (usize, usize) {
    let mut splits = 1;
    if tiles > 0 && tiles < sms {
        splits = (2 * sms)
            .div_ceil(tiles)
            .min(k / MIN_SPLIT_K)
            .clamp(1, MAX_SPLITS);
    }
    let k_per_split = k.div_ceil(splits).div_ceil(BLOCK).max(1) * BLOCK;
    (k_per_split, k.div_ceil(k_per_split).max(1))
}

fn sm_count(dev: &CudaDevice) -> Result<usize> {
    let n = dev
        .stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    Ok(n.max(1) as usize)
}

fn check_i32(what: &str, v: usize) -> Result<i32> {
    match i32::try_from(v) {
        Ok(v) => Ok(v),
        Err(_) => bail!(
            Shape,
            "linear: {what} = {v} exceeds the kernels' 32-bit index range"
        ),
    }
}

/// Push an optional device pointer (null when absent).
fn arg_opt<'a, 'c: 'a>(l: &mut LaunchArgs<'a>, v: &'a Option<CudaView<'c, u8>>, null: &'a u64) {
    match v {
        Some(v) => l.arg(v),
        None => l.arg(null),
    };
}

/// A GEMM's base weight on the device.
enum Weight<'a> {
    /// Dense `[n, k]` in the activation dtype.
    Dense(&'a CudaStorage),
    Nf4(&'a Nf4Device),
}

/// The LoRA up-projection operands of the main GEMM: `h = x·Aᵀ` `[m, r]`, `B` `[n, r]`.
struct LoraUp<'a> {
    h: &'a Tensor,
    b: &'a Tensor,
    scale: f32,
}

/// Pointers and scalars describing an NF4 weight to the kernels.
struct Nf4Args<'a> {
    absmax: Option<CudaView<'a, u8>>,
    q: Option<CudaView<'a, u8>>,
    absmax2: Option<CudaView<'a, u8>>,
    code8: Option<CudaView<'a, u8>>,
    double_quant: i32,
    offset: f32,
}

/// Check that the device buffers of `w` hold an NF4 tensor of `numel` elements.
fn nf4_args(w: &Nf4Device, numel: usize) -> Result<Nf4Args<'_>> {
    let blocks = numel.div_ceil(BLOCK);
    if w.packed.len() < numel.div_ceil(2) {
        bail!(
            Shape,
            "NF4 weight {:?}: {} packed bytes, expected {}",
            w.shape,
            w.packed.len(),
            numel.div_ceil(2)
        );
    }
    Ok(match &w.absmax {
        DeviceAbsmax::Plain(a) => {
            if a.len() < blocks * 4 {
                bail!(
                    Shape,
                    "NF4 weight {:?}: absmax holds {} bytes, expected {}",
                    w.shape,
                    a.len(),
                    blocks * 4
                );
            }
            Nf4Args {
                absmax: Some(a.arg()),
                q: None,
                absmax2: None,
                code8: None,
                double_quant: 0,
                offset: 0.0,
            }
        }
        DeviceAbsmax::Double {
            q,
            absmax2,
            offset,
            code,
        } => {
            if q.len() < blocks
                || absmax2.len() < blocks.div_ceil(ABSMAX_BLOCK) * 4
                || code.len() < 256 * 4
            {
                bail!(
                    Shape,
                    "NF4 weight {:?}: double-quantised absmax buffers are too small",
                    w.shape
                );
            }
            Nf4Args {
                absmax: None,
                q: Some(q.arg()),
                absmax2: Some(absmax2.arg()),
                code8: Some(code.arg()),
                double_quant: 1,
                offset: *offset,
            }
        }
    })
}

pub(super) fn linear(x: &Tensor, t: usize, k: usize, n: usize, layer: &Linear) -> Result<Tensor> {
    forward(x, None, t, k, n, layer)
}

/// [`linear`] with the LoRA path on its own input `x_lora` (`[t, k]`, LoRA dropout): the base
/// GEMM reads `x`, the LoRA down-projection `h = x_lora·Aᵀ` reads `x_lora`.
pub(super) fn linear_split(
    x: &Tensor,
    x_lora: &Tensor,
    t: usize,
    k: usize,
    n: usize,
    layer: &Linear,
) -> Result<Tensor> {
    check_lora_input(x, x_lora)?;
    forward(x, Some(x_lora), t, k, n, layer)
}

/// The separate LoRA input must match `x` in shape, dtype and device.
fn check_lora_input(x: &Tensor, x_lora: &Tensor) -> Result<()> {
    if x_lora.shape() != x.shape() || x_lora.dtype() != x.dtype() || x_lora.device() != x.device() {
        bail!(
            Shape,
            "linear: LoRA input {:?} {} on {}, expected {:?} {} on {}",
            x_lora.shape(),
            x_lora.dtype().name(),
            x_lora.device(),
            x.shape(),
            x.dtype().name(),
            x.device()
        );
    }
    Ok(())
}

fn forward(
    x: &Tensor,
    x_lora: Option<&Tensor>,
    t: usize,
    k: usize,
    n: usize,
    layer: &Linear,
) -> Result<Tensor> {
    let sx = x.cuda_storage()?;
    let dev = sx.device().clone();
    let dtype = x.dtype();
    // The LoRA path's input (the base GEMM always reads x).
    let sl = match x_lora {
        Some(xl) => xl.cuda_storage()?,
        None => sx,
    };
    // h = x·Aᵀ first (a GEMM of its own); a zero scale or rank contributes nothing.
    let lora = match &layer.lora {
        Some(l) if l.scale != 0.0 && l.a.shape()[0] > 0 && t > 0 && n > 0 => {
            let r = l.a.shape()[0];
            l.a.expect_shape(&[r, k], "LoRA A")?;
            l.b.expect_shape(&[n, r], "LoRA B")?;
            if l.a.dtype() != dtype || l.b.dtype() != dtype {
                bail!(
                    Shape,
                    "linear: LoRA A/B are {}/{} but the activations are {}",
                    l.a.dtype().name(),
                    l.b.dtype().name(),
                    dtype.name()
                );
            }
            let h = gemm(
                &dev,
                sl,
                dtype,
                t,
                k,
                r,
                Weight::Dense(l.a.cuda_storage()?),
                None,
            )?;
            Some((h, l))
        }
        _ => None,
    };
    let up = lora.as_ref().map(|(h, l)| LoraUp {
        h,
        b: &l.b,
        scale: l.scale,
    });
    match &layer.weight {
        // The score head: f32 weight, f32 output. (f32 activations with an f32 weight are an
        // ordinary f32 GEMM: the SIMT kernel unless N is tiny.)
        BaseWeight::Dense(w) if w.dtype() == DType::F32 && (dtype != DType::F32 || n <= 64) => {
            f32_weight(&dev, sx, dtype, t, k, n, w.cuda_storage()?, up)
        }
        BaseWeight::Dense(w) if w.dtype() == dtype => {
            w.expect_shape(&[n, k], "linear weight")?;
            gemm(
                &dev,
                sx,
                dtype,
                t,
                k,
                n,
                Weight::Dense(w.cuda_storage()?),
                up,
            )
        }
        BaseWeight::Dense(w) => bail!(
            Shape,
            "linear: a dense {} weight needs {} activations (or is f32), found {}",
            w.dtype().name(),
            w.dtype().name(),
            dtype.name()
        ),
        BaseWeight::Nf4Cuda(q) => gemm(&dev, sx, dtype, t, k, n, Weight::Nf4(q), up),
        BaseWeight::Nf4(_) => bail!(
            Shape,
            "linear: the NF4 weight is on the CPU, the input on a GPU"
        ),
    }
}

/// `y[m, n] = x·Wᵀ (+ scale·h·Bᵀ)` in `dtype` by the tensor-core or SIMT kernel.
#[allow(clippy::too_many_arguments)]
fn gemm(
    dev: &Arc<CudaDevice>,
    x: &CudaStorage,
    dtype: DType,
    m: usize,
    k: usize,
    n: usize,
    w: Weight<'_>,
    lora: Option<LoraUp<'_>>,
) -> Result<Tensor> {
    let nf4 = matches!(w, Weight::Nf4(_));
    let path = choose_path(dtype, dev.capability(), nf4, k);
    let plan = plan(m, n, k, path, sm_count(dev)?);
    let mut out = dev.alloc(m * n * dtype.size_in_bytes())?;
    if m == 0 || n == 0 {
        return Tensor::from_cuda(out, dtype, &[m, n]);
    }
    let rank = lora.as_ref().map_or(0, |l| l.h.shape()[1]);
    let p = engine_matmul_params {
        m: check_i32("M", m)?,
        n: check_i32("N", n)?,
        k: check_i32("K", k)?,
        lora_rank: check_i32("LoRA rank", rank)?,
        lora_scale: lora.as_ref().map_or(0.0, |l| l.scale),
        double_quant: 0,
        absmax_offset: 0.0,
        reserved: 0,
    };
    let (w_view, nf4) = match w {
        Weight::Dense(s) => {
            if s.buf.len() < n * k * dtype.size_in_bytes() {
                bail!(
                    Shape,
                    "linear: the dense weight buffer is smaller than [{n}, {k}]"
                );
            }
            (s.buf.arg(), None)
        }
        Weight::Nf4(q) => {
            if q.shape != [n, k] {
                bail!(
                    Shape,
                    "linear: NF4 weight {:?}, expected [{n}, {k}]",
                    q.shape
                );
            }
            (q.packed.arg(), Some(nf4_args(q, n * k)?))
        }
    };
    let p = match &nf4 {
        Some(a) => engine_matmul_params {
            double_quant: a.double_quant,
            absmax_offset: a.offset,
            ..p
        },
        None => p,
    };
    let name = match (path, nf4.is_some()) {
        (Path::TensorCore, true) => kernel_name!("matmul_tc_nf4", dtype),
        (Path::TensorCore, false) => kernel_name!("matmul_tc_dense", dtype),
        (Path::Simt, true) => kernel_name!("matmul_simt_nf4", dtype),
        (Path::Simt, false) => kernel_name!("matmul_simt_dense", dtype),
    };
    let f = dev.function("linear", name)?;
    let mut partial = if plan.splits > 1 {
        Some(dev.alloc(plan.splits * m * n * 4)?)
    } else {
        None
    };
    {
        let null = 0u64;
        let k_per_split = check_i32("K per split", plan.k_per_split)?;
        let code = code_table();
        let none: Option<CudaView<'_, u8>> = None;
        let (absmax, q, absmax2, code8) = match &nf4 {
            Some(a) => (&a.absmax, &a.q, &a.absmax2, &a.code8),
            None => (&none, &none, &none, &none),
        };
        let h = lora
            .as_ref()
            .map(|l| l.h.cuda_storage())
            .transpose()?
            .map(|s| s.buf.arg());
        let b = lora
            .as_ref()
            .map(|l| l.b.cuda_storage())
            .transpose()?
            .map(|s| s.buf.arg());
        let mut y = out.arg_mut();
        let mut part = partial.as_mut().map(|b| b.arg_mut());
        let xv = x.buf.arg();
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&mut y);
        match part.as_mut() {
            Some(v) => l.arg(v),
            None => l.arg(&null),
        };
        l.arg(&xv).arg(&w_view);
        arg_opt(&mut l, absmax, &null);
        arg_opt(&mut l, q, &null);
        arg_opt(&mut l, absmax2, &null);
        arg_opt(&mut l, code8, &null);
        arg_opt(&mut l, &h, &null);
        arg_opt(&mut l, &b, &null);
        l.arg(&p).arg(&k_per_split).arg(&code);
        let cfg = LaunchConfig {
            grid_dim: (
                check_i32("tiles", plan.tiles)? as u32,
                1,
                plan.splits as u32,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x is [m, k] and the weight [n, k] (dense: checked length; NF4: checked
        // buffers), h is [m, r] and B [n, r] (checked by the caller); the kernel writes y
        // [m, n] (or, split, partial [splits, m, n]) inside its bounds checks; 256 threads as
        // the kernels' launch bounds require.
        unsafe { l.launch(cfg) }?;
    }
    if let Some(partial) = partial {
        let f = dev.function("linear", kernel_name!("splitk_reduce", dtype))?;
        let (mn, splits) = ((m * n) as i64, plan.splits as i32);
        let (y, pv) = (&mut out.arg_mut(), &partial.arg());
        let mut l = dev.stream().launch_builder(&f);
        l.arg(y).arg(pv).arg(&mn).arg(&splits);
        // SAFETY: partial holds splits·m·n f32 values, y m·n elements of dtype.
        unsafe { l.launch(grid_stride(m * n, 256)) }?;
    }
    Tensor::from_cuda(out, dtype, &[m, n])
}

/// The score head: an f32 weight `[n, k]` with activations in any float type, f32 output,
/// one warp per output element.
#[allow(clippy::too_many_arguments)]
fn f32_weight(
    dev: &Arc<CudaDevice>,
    x: &CudaStorage,
    dtype: DType,
    m: usize,
    k: usize,
    n: usize,
    w: &CudaStorage,
    lora: Option<LoraUp<'_>>,
) -> Result<Tensor> {
    if w.buf.len() < n * k * 4 {
        bail!(
            Shape,
            "linear: the f32 weight buffer is smaller than [{n}, {k}]"
        );
    }
    let mut out = dev.alloc(m * n * 4)?;
    if m == 0 || n == 0 {
        return Tensor::from_cuda(out, DType::F32, &[m, n]);
    }
    let rank = lora.as_ref().map_or(0, |l| l.h.shape()[1]);
    let p = engine_matmul_params {
        m: check_i32("M", m)?,
        n: check_i32("N", n)?,
        k: check_i32("K", k)?,
        lora_rank: check_i32("LoRA rank", rank)?,
        lora_scale: lora.as_ref().map_or(0.0, |l| l.scale),
        double_quant: 0,
        absmax_offset: 0.0,
        reserved: 0,
    };
    let f = dev.function("linear", kernel_name!("matmul_f32w", dtype))?;
    let null = 0u64;
    let h = lora
        .as_ref()
        .map(|l| l.h.cuda_storage())
        .transpose()?
        .map(|s| s.buf.arg());
    let b = lora
        .as_ref()
        .map(|l| l.b.cuda_storage())
        .transpose()?
        .map(|s| s.buf.arg());
    let (y, xv, wv) = (&mut out.arg_mut(), &x.buf.arg(), &w.buf.arg());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y).arg(xv).arg(wv);
    arg_opt(&mut l, &h, &null);
    arg_opt(&mut l, &b, &null);
    l.arg(&p);
    // SAFETY: one warp per output element of y [m, n] (f32); x is [m, k], w [n, k] (checked),
    // h [m, r] and B [n, r].
    unsafe { l.launch(grid_1d(m * n * 32, 256)) }?;
    Tensor::from_cuda(out, DType::F32, &[m, n])
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// Which backward GEMM kernel runs (kernels/linear.cu, "Backward").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BwdKernel {
    /// `linear_bwd_tc_{nf4,dense}`: tensor cores, 128×128 tiles (dx, dx_lora).
    Tc,
    /// `linear_bwd_tc_thin[_t]`: tensor cores, 128×64 tiles (the LoRA GEMMs, Q = r or 2r).
    TcThin,
    /// `linear_bwd_simt_*`: f32 FMAs, 64×64 tiles, any shape.
    Simt,
}

impl BwdKernel {
    /// Output tiles of a `[p, q]` result.
    fn tiles(self, p: usize, q: usize) -> usize {
        let (tp, tq) = match self {
            BwdKernel::Tc => (128, 128),
            BwdKernel::TcThin => (128, 64),
            BwdKernel::Simt => (64, 64),
        };
        p.div_ceil(tp) * q.div_ceil(tq)
    }
}

/// dx-shaped GEMMs (`U [P, red]` row-major times `V [red, Q]`, Q large): tensor cores when the
/// GPU has them for `dtype` and the 16-byte tile loads line up — U rows (`red`) and dense V rows
/// (`Q`) a multiple of 8 elements; an NF4 V needs `Q % 16 == 0` so that a thread's 16 weights
/// are 8 aligned bytes inside one 64-block.
fn choose_dx_kernel(
    dtype: DType,
    capability: (i32, i32),
    nf4: bool,
    red: usize,
    q: usize,
) -> BwdKernel {
    let aligned = red.is_multiple_of(8) && q.is_multiple_of(if nf4 { 16 } else { 8 });
    if tensor_cores(dtype, capability) && aligned {
        BwdKernel::Tc
    } else {
        BwdKernel::Simt
    }
}

/// The LoRA GEMMs (Q = r or 2r columns): tensor cores when U's rows (`red` for a row-major U,
/// `p` for one read transposed) and V's rows (`q`) are multiples of 8 elements.
fn choose_thin_kernel(
    dtype: DType,
    capability: (i32, i32),
    trans: bool,
    p: usize,
    red: usize,
    q: usize,
) -> BwdKernel {
    let u_row = if trans { p } else { red };
    if tensor_cores(dtype, capability) && u_row.is_multiple_of(8) && q.is_multiple_of(8) {
        BwdKernel::TcThin
    } else {
        BwdKernel::Simt
    }
}

/// One backward GEMM `C[P, Q] = Σ_red U(p, red)·V[red, q]` (kernels/linear.cu, "Backward").
struct BwdGemm<'a> {
    kernel: BwdKernel,
    dtype: DType,
    /// `[P, red]`, or `[red, P]` when `trans` (dy or x read along the token axis).
    u: &'a CudaStorage,
    trans: bool,
    /// `[red, Q]`: dense in `dtype`, or the NF4 base weight `[N, K]` (dx: red = N, Q = K).
    v: Weight<'a>,
    /// dx's fused LoRA steps: dh `[P, r]` and A `[r, Q]` in `dtype`, and r.
    lora: Option<(&'a CudaStorage, &'a CudaStorage, usize)>,
    p: usize,
    red: usize,
    q: usize,
}

impl BwdGemm<'_> {
    fn name(&self) -> Result<&'static str> {
        let nf4 = matches!(self.v, Weight::Nf4(_));
        let dtype = self.dtype;
        Ok(match (self.kernel, nf4, self.trans) {
            (BwdKernel::Tc, true, false) => kernel_name!("linear_bwd_tc_nf4", dtype),
            (BwdKernel::Tc, false, false) => kernel_name!("linear_bwd_tc_dense", dtype),
            (BwdKernel::TcThin, false, false) => kernel_name!("linear_bwd_tc_thin", dtype),
            (BwdKernel::TcThin, false, true) => kernel_name!("linear_bwd_tc_thin_t", dtype),
            (BwdKernel::Simt, true, false) => kernel_name!("linear_bwd_simt_nf4", dtype),
            (BwdKernel::Simt, false, false) => kernel_name!("linear_bwd_simt_dense", dtype),
            (BwdKernel::Simt, false, true) => kernel_name!("linear_bwd_simt_dense_t", dtype),
            (k, nf4, trans) => bail!(
                Cuda,
                "linear backward: no {k:?} kernel for nf4={nf4}, transposed U={trans}"
            ),
        })
    }

    /// (reduction elements per split, splits) on this device.
    fn split(&self, sms: usize) -> (usize, usize) {
        split_plan(self.kernel.tiles(self.p, self.q), self.red, sms)
    }

    /// Launch with `red_per_split` (a multiple of 64) over `splits` blocks along z: into `out`
    /// (`[P, Q]` in `dtype`) when `partial` is `None`, else into `partial` (`[splits, P, Q]`
    /// f32).
    fn launch(
        &self,
        dev: &Arc<CudaDevice>,
        out: Option<&mut CudaBuffer>,
        partial: Option<&mut CudaBuffer>,
        red_per_split: usize,
        splits: usize,
    ) -> Result<()> {
        let (p, red, q, size) = (self.p, self.red, self.q, self.dtype.size_in_bytes());
        if self.u.dtype != self.dtype || self.u.buf.len() < p * red * size {
            bail!(
                Shape,
                "linear backward: U is not a [{p}, {red}] {} buffer",
                self.dtype.name()
            );
        }
        let (v_view, nf4) = match &self.v {
            Weight::Dense(s) => {
                if s.dtype != self.dtype || s.buf.len() < red * q * size {
                    bail!(
                        Shape,
                        "linear backward: V is not a [{red}, {q}] {} buffer",
                        self.dtype.name()
                    );
                }
                (s.buf.arg(), None)
            }
            Weight::Nf4(w) => {
                if w.shape != [red, q] {
                    bail!(
                        Shape,
                        "linear backward: NF4 weight {:?}, expected [{red}, {q}]",
                        w.shape
                    );
                }
                (w.packed.arg(), Some(nf4_args(w, red * q)?))
            }
        };
        let rank = match self.lora {
            Some((dh, a, r)) => {
                if dh.buf.len() < p * r * size || a.buf.len() < r * q * size {
                    bail!(
                        Shape,
                        "linear backward: LoRA operands are not [{p}, {r}] and [{r}, {q}]"
                    );
                }
                r
            }
            None => 0,
        };
        match (&out, &partial) {
            (None, Some(b)) if b.len() >= splits * p * q * 4 => {}
            (Some(b), None) if splits == 1 && b.len() >= p * q * size => {}
            _ => bail!(
                Shape,
                "linear backward: needs either a [{p}, {q}] output or [{splits}, {p}, {q}] partials"
            ),
        }
        let params = engine_matmul_params {
            m: check_i32("P", p)?,
            n: check_i32("reduction", red)?,
            k: check_i32("Q", q)?,
            lora_rank: check_i32("LoRA rank", rank)?,
            lora_scale: 1.0,
            double_quant: nf4.as_ref().map_or(0, |a| a.double_quant),
            absmax_offset: nf4.as_ref().map_or(0.0, |a| a.offset),
            reserved: 0,
        };
        let f = dev.function("linear", self.name()?)?;
        let tiles = check_i32("tiles", self.kernel.tiles(p, q))?;
        let per = check_i32("reduction per split", red_per_split)?;
        let code = code_table();
        let null = 0u64;
        let none: Option<CudaView<'_, u8>> = None;
        let (absmax, qv, absmax2, code8) = match &nf4 {
            Some(a) => (&a.absmax, &a.q, &a.absmax2, &a.code8),
            None => (&none, &none, &none, &none),
        };
        let lora_u = self.lora.map(|(dh, _, _)| dh.buf.arg());
        let lora_v = self.lora.map(|(_, a, _)| a.buf.arg());
        let mut out = out.map(|b| b.arg_mut());
        let mut part = partial.map(|b| b.arg_mut());
        let uv = self.u.buf.arg();
        let mut l = dev.stream().launch_builder(&f);
        match out.as_mut() {
            Some(v) => l.arg(v),
            None => l.arg(&null),
        };
        match part.as_mut() {
            Some(v) => l.arg(v),
            None => l.arg(&null),
        };
        l.arg(&uv).arg(&v_view);
        arg_opt(&mut l, absmax, &null);
        arg_opt(&mut l, qv, &null);
        arg_opt(&mut l, absmax2, &null);
        arg_opt(&mut l, code8, &null);
        arg_opt(&mut l, &lora_u, &null);
        arg_opt(&mut l, &lora_v, &null);
        l.arg(&params).arg(&per).arg(&code);
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, 1, splits as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: U holds [p, red] (or [red, p]) and V [red, q] elements of dtype (dense:
        // checked length; NF4: checked shape and buffers), the LoRA operands [p, r] and [r, q];
        // the kernel writes out [p, q] or partial [splits, p, q] (checked) inside its bounds
        // checks; 256 threads as the kernels' launch bounds require.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }

    /// The result `[P, Q]` in `dtype`: written directly, or through f32 partials and
    /// `splitk_reduce` when the reduction is split.
    fn run_t(&self, dev: &Arc<CudaDevice>) -> Result<Tensor> {
        let (p, q) = (self.p, self.q);
        let mut out = dev.alloc(p * q * self.dtype.size_in_bytes())?;
        let (per, splits) = self.split(sm_count(dev)?);
        if splits == 1 {
            self.launch(dev, Some(&mut out), None, per, 1)?;
        } else {
            let mut partial = dev.alloc(splits * p * q * 4)?;
            self.launch(dev, None, Some(&mut partial), per, splits)?;
            let f = dev.function("linear", kernel_name!("splitk_reduce", self.dtype))?;
            let (pq, s) = ((p * q) as i64, splits as i32);
            let (y, pv) = (&mut out.arg_mut(), &partial.arg());
            let mut l = dev.stream().launch_builder(&f);
            l.arg(y).arg(pv).arg(&pq).arg(&s);
            // SAFETY: partial holds splits·p·q f32 values, out p·q elements of dtype.
            unsafe { l.launch(grid_stride(p * q, 256)) }?;
        }
        Tensor::from_cuda(out, self.dtype, &[p, q])
    }

    /// f32 partial sums `[splits, P, Q]` and the split count, for [`bwd_reduce`].
    fn run_partials(&self, dev: &Arc<CudaDevice>) -> Result<(CudaBuffer, usize)> {
        let (per, splits) = self.split(sm_count(dev)?);
        let mut partial = dev.alloc(splits * self.p * self.q * 4)?;
        self.launch(dev, None, Some(&mut partial), per, splits)?;
        Ok((partial, splits))
    }
}

/// Where `linear_bwd_reduce` writes `C = scale·Σ partials` (`[p, q]`): f32 (`[q, p]` when
/// `transpose`), T, and T hi/lo column blocks `[p, 2q]`.
#[derive(Default)]
struct ReduceOut<'a> {
    f32: Option<&'a mut CudaBuffer>,
    t: Option<&'a mut CudaBuffer>,
    hilo: Option<&'a mut CudaBuffer>,
    transpose: bool,
}

/// Sum `splits` f32 partials `[splits, p, q]` (or `[splits, p, 2q]` with `fold`, whose two
/// column blocks are added) in split order, scale, and write the requested outputs.
#[allow(clippy::too_many_arguments)]
fn bwd_reduce(
    dev: &Arc<CudaDevice>,
    dtype: DType,
    partial: &CudaBuffer,
    splits: usize,
    (p, q): (usize, usize),
    scale: f32,
    fold: bool,
    out: ReduceOut<'_>,
) -> Result<()> {
    let width = if fold { 2 * q } else { q };
    let size = dtype.size_in_bytes();
    let small =
        |b: &Option<&mut CudaBuffer>, bytes: usize| b.as_ref().is_some_and(|b| b.len() < bytes);
    if partial.len() < splits * p * width * 4
        || small(&out.f32, p * q * 4)
        || small(&out.t, p * q * size)
        || small(&out.hilo, 2 * p * q * size)
    {
        bail!(
            Shape,
            "linear backward: reduction buffers do not fit [{splits}, {p}, {width}] -> [{p}, {q}]"
        );
    }
    let f = dev.function("linear", kernel_name!("linear_bwd_reduce", dtype))?;
    let null = 0u64;
    let (pi, qi, si) = (check_i32("P", p)?, check_i32("Q", q)?, splits as i32);
    let (transpose, fold) = (out.transpose as i32, fold as i32);
    let mut o32 = out.f32.map(|b| b.arg_mut());
    let mut ot = out.t.map(|b| b.arg_mut());
    let mut ohl = out.hilo.map(|b| b.arg_mut());
    let pv = partial.arg();
    let mut l = dev.stream().launch_builder(&f);
    for o in [&mut o32, &mut ot, &mut ohl] {
        match o.as_mut() {
            Some(v) => l.arg(v),
            None => l.arg(&null),
        };
    }
    l.arg(&pv)
        .arg(&pi)
        .arg(&qi)
        .arg(&si)
        .arg(&scale)
        .arg(&transpose)
        .arg(&fold);
    // SAFETY: partial holds splits·p·width f32 values and each output p·q (hilo 2·p·q)
    // elements (checked); one thread per output element, grid-stride.
    unsafe { l.launch(grid_stride(p * q, 256)) }?;
    Ok(())
}

/// The LoRA operands of a layer on the GPU, checked against the activations.
fn lora_operands(
    l: &Lora,
    dtype: DType,
    k: usize,
    n: usize,
) -> Result<(usize, &CudaStorage, &CudaStorage)> {
    let r = l.a.shape()[0];
    l.a.expect_shape(&[r, k], "LoRA A")?;
    l.b.expect_shape(&[n, r], "LoRA B")?;
    if l.a.dtype() != dtype || l.b.dtype() != dtype {
        bail!(
            Shape,
            "linear backward: LoRA A/B are {}/{} but the activations are {}",
            l.a.dtype().name(),
            l.b.dtype().name(),
            dtype.name()
        );
    }
    Ok((r, l.a.cuda_storage()?, l.b.cuda_storage()?))
}

/// Backward of [`linear`] / [`linear_split`] on the GPU: see [`super::linear_backward`] and
/// kernels/linear.cu ("Backward") for the GEMMs, their kernels and their precision.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_backward(
    x: &Tensor,
    x_lora: Option<&Tensor>,
    dy: &Tensor,
    t: usize,
    k: usize,
    n: usize,
    layer: &Linear,
    weight_grad: bool,
) -> Result<LinearGrads> {
    let sx = x.cuda_storage()?;
    let dev = sx.device().clone();
    let dtype = x.dtype();
    if dy.device() != x.device() || layer.weight.device() != x.device() {
        bail!(
            Shape,
            "linear backward: x on {}, dy on {}, weight on {}",
            x.device(),
            dy.device(),
            layer.weight.device()
        );
    }
    if let Some(xl) = x_lora {
        check_lora_input(x, xl)?;
    }
    let rank = layer.lora.as_ref().map(|l| l.a.shape()[0]);
    // As the CPU twin: a LoRA input gradient exists when the layer has LoRA on its own input.
    let separate = x_lora.is_some() && rank.is_some();
    // The score head: a dense f32 weight with activations in T (the forward's f32-weight
    // path), whose upstream gradient is the f32 logits gradient.
    let head = matches!(&layer.weight, BaseWeight::Dense(w) if w.dtype() == DType::F32)
        && dtype != DType::F32;
    let dy_dtype = if head { DType::F32 } else { dtype };
    if dy.dtype() != dy_dtype {
        bail!(
            Shape,
            "linear backward: dy is {}, expected {} for {} activations and this weight",
            dy.dtype().name(),
            dy_dtype.name(),
            dtype.name()
        );
    }
    if head && rank.is_some() {
        bail!(
            Cuda,
            "linear backward: LoRA on a dense f32 weight with {} activations has no GPU kernel",
            dtype.name()
        );
    }
    let dense_f32 = matches!(&layer.weight, BaseWeight::Dense(w) if w.dtype() == DType::F32);
    if weight_grad && !dense_f32 {
        bail!(
            Cuda,
            "linear backward: a weight gradient is computed on the GPU for dense f32 weights only (the score head)"
        );
    }

    // Sums over an empty range, or empty tensors: every output is zero.
    if t == 0 || k == 0 || n == 0 {
        let device = x.device();
        let zeros = |shape: &[usize], dt: DType| Tensor::zeros(shape, dt, device);
        return Ok(LinearGrads {
            dx: zeros(&[t, k], dtype)?,
            dx_lora: separate.then(|| zeros(&[t, k], dtype)).transpose()?,
            lora: rank
                .map(|r| {
                    Ok::<_, crate::error::Error>((
                        zeros(&[r, k], DType::F32)?,
                        zeros(&[n, r], DType::F32)?,
                    ))
                })
                .transpose()?,
            weight: weight_grad
                .then(|| zeros(&[n, k], DType::F32))
                .transpose()?,
        });
    }

    let weight = if weight_grad {
        match &layer.weight {
            BaseWeight::Dense(w) => Some(head_dw(&dev, dy, sx, dtype, w, t, k, n)?),
            _ => unreachable!("checked above: dense f32"),
        }
    } else {
        None
    };
    if head {
        let BaseWeight::Dense(w) = &layer.weight else {
            unreachable!("head is a dense f32 weight")
        };
        return Ok(LinearGrads {
            dx: head_dx(&dev, dy, w, dtype, t, k, n)?,
            dx_lora: None,
            lora: None,
            weight,
        });
    }

    let cap = dev.capability();
    let sdy = dy.cuda_storage()?;
    let base = match &layer.weight {
        BaseWeight::Dense(w) if w.dtype() == dtype => {
            w.expect_shape(&[n, k], "linear weight")?;
            Weight::Dense(w.cuda_storage()?)
        }
        BaseWeight::Dense(w) => bail!(
            Shape,
            "linear backward: a dense {} weight needs {} activations, found {}",
            w.dtype().name(),
            w.dtype().name(),
            dtype.name()
        ),
        BaseWeight::Nf4Cuda(q) => Weight::Nf4(q),
        BaseWeight::Nf4(_) => bail!(
            Shape,
            "linear backward: the NF4 weight is on the CPU, the input on a GPU"
        ),
    };
    let nf4 = matches!(base, Weight::Nf4(_));

    // LoRA: h, dh (T, and T hi/lo for dA), dB, dA.
    let mut dh_t = None;
    let mut lora_grads = None;
    let mut lora_a = None;
    if let Some(l) = &layer.lora {
        let (r, sa, sb) = lora_operands(l, dtype, k, n)?;
        if r == 0 {
            lora_grads = Some((
                Tensor::zeros(&[0, k], DType::F32, x.device())?,
                Tensor::zeros(&[n, 0], DType::F32, x.device())?,
            ));
        } else {
            let s = l.scale;
            let sl = match x_lora {
                Some(xl) => xl.cuda_storage()?,
                None => sx,
            };
            // h = x_l·Aᵀ, rounded to T as in the forward pass.
            let h = gemm(&dev, sl, dtype, t, k, r, Weight::Dense(sa), None)?;
            // dh = s·dy·B: [t, r] in T (for dx) and as T hi/lo blocks [t, 2r] (for dA).
            let g = BwdGemm {
                kernel: choose_thin_kernel(dtype, cap, false, t, n, r),
                dtype,
                u: sdy,
                trans: false,
                v: Weight::Dense(sb),
                lora: None,
                p: t,
                red: n,
                q: r,
            };
            let (partial, splits) = g.run_partials(&dev)?;
            let mut dh = dev.alloc(t * r * dtype.size_in_bytes())?;
            let mut hilo = dev.alloc(2 * t * r * dtype.size_in_bytes())?;
            let out = ReduceOut {
                t: Some(&mut dh),
                hilo: Some(&mut hilo),
                ..Default::default()
            };
            bwd_reduce(&dev, dtype, &partial, splits, (t, r), s, false, out)?;
            drop(partial);
            let dh = Tensor::from_cuda(dh, dtype, &[t, r])?;
            let hilo = Tensor::from_cuda(hilo, dtype, &[t, 2 * r])?;
            // dB = s·dyᵀ·h  [n, r] f32.
            let g = BwdGemm {
                kernel: choose_thin_kernel(dtype, cap, true, n, t, r),
                dtype,
                u: sdy,
                trans: true,
                v: Weight::Dense(h.cuda_storage()?),
                lora: None,
                p: n,
                red: t,
                q: r,
            };
            let (partial, splits) = g.run_partials(&dev)?;
            let mut db = dev.alloc(n * r * 4)?;
            let out = ReduceOut {
                f32: Some(&mut db),
                ..Default::default()
            };
            bwd_reduce(&dev, dtype, &partial, splits, (n, r), s, false, out)?;
            drop(partial);
            // dAᵀ = x_lᵀ·[dh_hi | dh_lo]  [k, 2r], folded and transposed into dA [r, k] f32.
            let g = BwdGemm {
                kernel: choose_thin_kernel(dtype, cap, true, k, t, 2 * r),
                dtype,
                u: sl,
                trans: true,
                v: Weight::Dense(hilo.cuda_storage()?),
                lora: None,
                p: k,
                red: t,
                q: 2 * r,
            };
            let (partial, splits) = g.run_partials(&dev)?;
            let mut da = dev.alloc(r * k * 4)?;
            let out = ReduceOut {
                f32: Some(&mut da),
                transpose: true,
                ..Default::default()
            };
            bwd_reduce(&dev, dtype, &partial, splits, (k, r), 1.0, true, out)?;
            drop(partial);
            lora_grads = Some((
                Tensor::from_cuda(da, DType::F32, &[r, k])?,
                Tensor::from_cuda(db, DType::F32, &[n, r])?,
            ));
            dh_t = Some(dh);
            lora_a = Some((sa, r));
        }
    }

    // dx = dy·W (+ dh·A fused, unless the LoRA path had its own input).
    let dh_s = dh_t.as_ref().map(|d| d.cuda_storage()).transpose()?;
    let fused = match (x_lora, dh_s, lora_a) {
        (None, Some(dh), Some((a, r))) => Some((dh, a, r)),
        _ => None,
    };
    let dx = BwdGemm {
        kernel: choose_dx_kernel(dtype, cap, nf4, n, k),
        dtype,
        u: sdy,
        trans: false,
        v: base,
        lora: fused,
        p: t,
        red: n,
        q: k,
    }
    .run_t(&dev)?;
    // dx_lora = dh·A (zeros for a rank-0 adapter).
    let dx_lora = if !separate {
        None
    } else if let (Some(dh), Some((a, r))) = (dh_s, lora_a) {
        let g = BwdGemm {
            kernel: choose_dx_kernel(dtype, cap, false, r, k),
            dtype,
            u: dh,
            trans: false,
            v: Weight::Dense(a),
            lora: None,
            p: t,
            red: r,
            q: k,
        };
        Some(g.run_t(&dev)?)
    } else {
        Some(Tensor::zeros(&[t, k], dtype, x.device())?)
    };
    Ok(LinearGrads {
        dx,
        dx_lora,
        lora: lora_grads,
        weight,
    })
}

/// The score head's input gradient: `dx = dy·W` with dy `[t, n]` f32 and W `[n, k]` f32, dx
/// in the activation dtype.
fn head_dx(
    dev: &Arc<CudaDevice>,
    dy: &Tensor,
    w: &Tensor,
    dtype: DType,
    t: usize,
    k: usize,
    n: usize,
) -> Result<Tensor> {
    w.expect_shape(&[n, k], "linear weight")?;
    let (sdy, sw) = (dy.cuda_storage()?, w.cuda_storage()?);
    if sdy.dtype != DType::F32 || sw.dtype != DType::F32 {
        bail!(
            Shape,
            "linear backward: the score head's dy and W must be f32"
        );
    }
    let mut out = dev.alloc(t * k * dtype.size_in_bytes())?;
    let f = dev.function("linear", kernel_name!("linear_bwd_head_dx", dtype))?;
    let (mi, ni, ki) = (check_i32("M", t)?, check_i32("N", n)?, check_i32("K", k)?);
    let (o, dv, wv) = (&mut out.arg_mut(), &sdy.buf.arg(), &sw.buf.arg());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(o).arg(dv).arg(wv).arg(&mi).arg(&ni).arg(&ki);
    // SAFETY: dy is [t, n] and W [n, k] f32 (checked dtypes and shapes); one thread per element
    // of dx [t, k], grid-stride.
    unsafe { l.launch(grid_stride(t * k, 256)) }?;
    Tensor::from_cuda(out, dtype, &[t, k])
}

/// The gradient of a dense f32 weight: `dW = dyᵀ·x` `[n, k]` f32, with dy f32 and x in the
/// activation dtype (one thread per element, a sequential sum over the `t` rows).
#[allow(clippy::too_many_arguments)]
fn head_dw(
    dev: &Arc<CudaDevice>,
    dy: &Tensor,
    x: &CudaStorage,
    dtype: DType,
    w: &Tensor,
    t: usize,
    k: usize,
    n: usize,
) -> Result<Tensor> {
    w.expect_shape(&[n, k], "linear weight")?;
    let sdy = dy.cuda_storage()?;
    if sdy.dtype != DType::F32 || x.buf.len() < t * k * dtype.size_in_bytes() {
        bail!(
            Shape,
            "linear backward: dW needs f32 dy [{t}, {n}] and x [{t}, {k}]"
        );
    }
    let mut out = dev.alloc(n * k * 4)?;
    let f = dev.function("linear", kernel_name!("linear_bwd_head_dw", dtype))?;
    let (mi, ni, ki) = (check_i32("M", t)?, check_i32("N", n)?, check_i32("K", k)?);
    let (o, dv, xv) = (&mut out.arg_mut(), &sdy.buf.arg(), &x.buf.arg());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(o).arg(dv).arg(xv).arg(&mi).arg(&ni).arg(&ki);
    // SAFETY: dy is [t, n] f32 (shape checked by the caller), x [t, k] of dtype (checked);
    // one thread per element of dW [n, k], grid-stride.
    unsafe { l.launch(grid_stride(n * k, 256)) }?;
    Tensor::from_cuda(out, DType::F32, &[n, k])
}

/// The whole NF4 weight dequantised to `dtype` (f32 gives exactly `Nf4Tensor::dequantize`).
pub fn dequantize_nf4(w: &Nf4Device, dtype: DType) -> Result<Tensor> {
    let dev = w.packed.device().clone();
    let numel = w.numel();
    let args = nf4_args(w, numel)?;
    let mut out = dev.alloc(numel * dtype.size_in_bytes())?;
    if numel == 0 {
        return Tensor::from_cuda(out, dtype, &w.shape);
    }
    let p = engine_matmul_params {
        double_quant: args.double_quant,
        absmax_offset: args.offset,
        ..Default::default()
    };
    let f = dev.function("linear", kernel_name!("nf4_dequantize", dtype))?;
    let (null, n64, code) = (0u64, numel as i64, code_table());
    let (y, packed) = (&mut out.arg_mut(), &w.packed.arg());
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y).arg(packed);
    arg_opt(&mut l, &args.absmax, &null);
    arg_opt(&mut l, &args.q, &null);
    arg_opt(&mut l, &args.absmax2, &null);
    arg_opt(&mut l, &args.code8, &null);
    l.arg(&p).arg(&n64).arg(&code);
    // SAFETY: one thread per packed byte (checked to hold numel codes with their scales); the
    // kernel writes numel elements of y.
    unsafe { l.launch(grid_stride(numel.div_ceil(2), 256)) }?;
    Tensor::from_cuda(out, dtype, &w.shape)
}

/// Quantise a GPU tensor (f32, bf16 or f16) to NF4 on the GPU, bit-identical to
/// `Nf4Tensor::quantize`. With `double_quant` the per-block absmax values are downloaded and
/// double-quantised by the CPU code (so the mean is the same f64-summed value), then uploaded.
pub fn quantize_nf4(w: &Tensor, double_quant: bool) -> Result<Nf4Device> {
    let s = w.cuda_storage()?;
    let dev = s.device().clone();
    let numel = w.elem_count();
    if numel == 0 {
        bail!(Shape, "NF4: cannot quantise an empty tensor");
    }
    let blocks = numel.div_ceil(BLOCK);
    let mut packed = dev.alloc(numel.div_ceil(2))?;
    let mut absmax = dev.alloc(blocks * 4)?;
    {
        let f = dev.function("linear", kernel_name!("nf4_quantize", w.dtype()))?;
        let (n64, th) = (numel as i64, threshold_table());
        let (pv, av, xv) = (&mut packed.arg_mut(), &mut absmax.arg_mut(), &s.buf.arg());
        let mut l = dev.stream().launch_builder(&f);
        l.arg(pv).arg(av).arg(xv).arg(&n64).arg(&th);
        // SAFETY: one warp per 64-block of the numel inputs; the kernel writes ceil(numel/2)
        // packed bytes and one f32 per block.
        unsafe { l.launch(grid_1d(blocks * 32, 256)) }?;
    }
    let absmax = if double_quant {
        let host: Vec<f32> = bytemuck::pod_collect_to_vec(&absmax.download()?[..blocks * 4]);
        match double_quantize(&host) {
            Absmax::Double {
                q,
                absmax2,
                offset,
                code,
            } => DeviceAbsmax::Double {
                q: dev.upload(&q)?,
                absmax2: dev.upload(bytemuck::cast_slice(&absmax2))?,
                offset,
                code: dev.upload(bytemuck::cast_slice(&code[..]))?,
            },
            Absmax::Plain(_) => unreachable!("double_quantize returns Absmax::Double"),
        }
    } else {
        DeviceAbsmax::Plain(absmax)
    };
    Ok(Nf4Device {
        shape: w.shape().to_vec(),
        packed,
        absmax,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::nf4::{Nf4Tensor, nf4_code_of};
    use crate::tensor::CpuStorage;

    /// The thresholds the kernel gets are the CPU quantiser's: every value on, just above and
    /// just below each threshold gets the same code from both.
    #[test]
    fn kernel_thresholds_equal_the_cpu_quantiser() {
        let mut vals = vec![1.0f32]; // absmax 1: the scaled values are the values themselves
        for &t in &NF4_THRESHOLDS {
            vals.extend([t, t.next_up(), t.next_down()]);
        }
        let q = Nf4Tensor::quantize(&CpuStorage::F32(vals.clone()), &[vals.len()], false).unwrap();
        assert_eq!(q.absmax.get(0), 1.0);
        for (i, &v) in vals.iter().enumerate() {
            let byte = q.packed[i / 2];
            let cpu = if i % 2 == 0 { byte >> 4 } else { byte & 0xf };
            assert_eq!(
                nf4_code_of(v, &NF4_THRESHOLDS),
                cpu,
                "value {v:e} (element {i})"
            );
        }
        assert!(NF4_THRESHOLDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn bf16_needs_sm80_and_nf4_needs_whole_blocks_per_row() {
        use DType::*;
        assert_eq!(choose_path(BF16, (9, 0), true, 3584), Path::TensorCore);
        assert_eq!(choose_path(BF16, (7, 5), true, 3584), Path::Simt);
        assert_eq!(choose_path(F16, (7, 5), true, 3584), Path::TensorCore);
        assert_eq!(choose_path(F16, (8, 0), true, 96), Path::Simt);
        assert_eq!(choose_path(F16, (8, 0), false, 96), Path::TensorCore);
        assert_eq!(choose_path(BF16, (8, 6), false, 4095), Path::Simt);
        assert_eq!(choose_path(F32, (9, 0), false, 4096), Path::Simt);
    }

    #[test]
    fn plans_cover_k_exactly_once() {
        let cases = [
            (1536, 4096, 3584, 132),
            (6144, 14336, 3584, 132),
            (1, 4096, 14336, 132),
            (7, 3, 3584, 132),
            (1536, 32, 4096, 132),
            (129, 1024, 200, 40),
            (64, 64, 0, 132),
            (1, 1, 64, 1),
        ];
        for &(m, n, k, sms) in &cases {
            for path in [Path::TensorCore, Path::Simt] {
                let p = plan(m, n, k, path, sms);
                assert!(p.splits >= 1 && p.splits <= MAX_SPLITS, "{p:?}");
                assert!(
                    p.k_per_split.is_multiple_of(BLOCK) && p.k_per_split > 0,
                    "{p:?}"
                );
                // Every split has work, and together they cover [0, k).
                assert!(p.k_per_split * p.splits >= k, "{p:?}");
                assert!(k == 0 || p.k_per_split * (p.splits - 1) < k, "{p:?}");
                assert_eq!(p.tiles, m.div_ceil(path.tile()) * n.div_ceil(path.tile()));
                if p.tiles >= sms {
                    assert_eq!(p.splits, 1, "a full grid is never split: {p:?}");
                }
                if p.splits > 1 {
                    assert!(p.k_per_split >= MIN_SPLIT_K, "{p:?}");
                }
            }
        }
        // Big projections never split; a single token over a long K does.
        assert_eq!(plan(6144, 14336, 3584, Path::TensorCore, 132).splits, 1);
        assert!(plan(1, 4096, 14336, Path::TensorCore, 132).splits > 1);
    }

    #[test]
    fn backward_kernels_need_tensor_cores_and_aligned_rows() {
        use BwdKernel::*;
        use DType::*;
        // dx: dy rows (N) a multiple of 8; W rows (K) of 8 (dense) or 16 (NF4).
        assert_eq!(choose_dx_kernel(BF16, (9, 0), true, 4096, 3584), Tc);
        assert_eq!(choose_dx_kernel(BF16, (7, 5), true, 4096, 3584), Simt);
        assert_eq!(choose_dx_kernel(F16, (7, 5), true, 4096, 3584), Tc);
        assert_eq!(choose_dx_kernel(F16, (8, 0), true, 4096, 1000), Simt);
        assert_eq!(choose_dx_kernel(F16, (8, 0), false, 4096, 1000), Tc);
        assert_eq!(choose_dx_kernel(BF16, (9, 0), false, 333, 1024), Simt);
        assert_eq!(choose_dx_kernel(F32, (9, 0), false, 4096, 4096), Simt);
        // The LoRA GEMMs: U rows (red, or P when read transposed) and Q multiples of 8.
        assert_eq!(
            choose_thin_kernel(BF16, (9, 0), false, 1536, 4096, 32),
            TcThin
        );
        assert_eq!(choose_thin_kernel(BF16, (9, 0), false, 1536, 4096, 5), Simt);
        assert_eq!(choose_thin_kernel(BF16, (9, 0), false, 1536, 333, 8), Simt);
        assert_eq!(choose_thin_kernel(BF16, (9, 0), true, 333, 1536, 8), Simt);
        assert_eq!(choose_thin_kernel(BF16, (9, 0), true, 3584, 7, 8), TcThin);
        assert_eq!(choose_thin_kernel(BF16, (7, 5), true, 3584, 1536, 64), Simt);
    }

    #[test]
    fn backward_splits_cover_the_reduction_exactly_once() {
        // (P, red, Q) of the backward GEMMs: dx (M, N, K), dh (M, N, r), dB (N, M, r),
        // dA (K, M, 2r).
        let cases = [
            (1536, 4096, 3584),
            (1, 14336, 3584),
            (7, 3584, 14336),
            (1536, 14336, 32),
            (1, 4096, 8),
            (14336, 1536, 32),
            (3584, 7, 64),
            (4096, 1, 16),
            (64, 0, 128),
        ];
        for &(p, red, q) in &cases {
            for kernel in [BwdKernel::Tc, BwdKernel::TcThin, BwdKernel::Simt] {
                let (per, splits) = split_plan(kernel.tiles(p, q), red, 132);
                assert!(
                    (1..=MAX_SPLITS).contains(&splits),
                    "{kernel:?} {p} {red} {q}"
                );
                assert!(per.is_multiple_of(BLOCK) && per > 0);
                assert!(per * splits >= red && (red == 0 || per * (splits - 1) < red));
            }
        }
        // A few tokens through a long reduction split; a full grid does not.
        assert!(split_plan(BwdKernel::Tc.tiles(1, 3584), 14336, 132).1 > 1);
        assert_eq!(split_plan(BwdKernel::Tc.tiles(1536, 3584), 4096, 132).1, 1);
        assert!(split_plan(BwdKernel::TcThin.tiles(1536, 32), 14336, 132).1 > 1);
    }
}
