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

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{BaseWeight, Linear};
use crate::bail;
use crate::cuda::CudaDevice;
use crate::cuda::abi::engine_matmul_params;
use crate::cuda::launch::{grid_1d, grid_stride};
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
    let tensor_cores = match dtype {
        DType::BF16 => capability.0 >= 8,
        DType::F16 => capability >= (7, 5),
        DType::F32 => false,
    };
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
    let mut splits = 1;
    if tiles > 0 && tiles < sms {
        splits = (2 * sms)
            .div_ceil(tiles)
            .min(k / MIN_SPLIT_K)
            .clamp(1, MAX_SPLITS);
    }
    let k_per_split = k.div_ceil(splits).div_ceil(BLOCK).max(1) * BLOCK;
    let splits = k.div_ceil(k_per_split).max(1);
    Plan {
        path,
        tiles,
        k_per_split,
        splits,
    }
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
    let sx = x.cuda_storage()?;
    let dev = sx.device().clone();
    let dtype = x.dtype();
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
                sx,
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
}
