//! Launchers of kernels/attention.cu.
//!
//! Kernel choice (see the block comment of kernels/attention.cu for the algorithms):
//!
//! | dtype | head_dim      | sm_75 (T4)                   | sm_80+                     |
//! |-------|---------------|------------------------------|----------------------------|
//! | f16   | 64, 128       | `attention_fa_d{64,128}_f16` | `attention_fa_d{64,128}_f16` |
//! | f16   | 256           | `attention_fa_d256_n32_f16`  | `attention_fa_d256_f16`    |
//! | bf16  | 64, 128, 256  | generic (no bf16 mma)        | `attention_fa_d{D}_bf16`   |
//! | f32   | any ≤ 256     | generic                      | generic                    |
//! | any   | other ≤ 256   | generic                      | generic                    |
//!
//! A tensor-core kernel whose shared memory exceeds what the device grants a block (queried,
//! not assumed) also falls back to the generic kernel.

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::bail;
use crate::cuda::abi::engine_attention_params;
use crate::cuda::{CudaBuffer, CudaDevice};
use crate::error::Result;
use crate::kernel_name;
use crate::ops::SeqLayout;
use crate::tensor::{DType, Tensor};

use super::AttentionParams;

/// Queries per block of the tensor-core kernels (`fa::BM` in kernels/attention.cu).
const FA_BLOCK_M: usize = 64;
/// Threads per block of the tensor-core kernels (`fa::THREADS`).
const FA_THREADS: u32 = 128;
/// Queries (one per warp) per block of the generic kernel (`generic::WARPS`).
const GENERIC_WARPS: usize = 4;
/// Largest head_dim the generic kernel handles (`generic::MAX_D`).
const MAX_HEAD_DIM: usize = 256;
/// Dynamic shared memory every device grants without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;

/// The kernel a call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// Tensor-core kernel `name` for (`dtype`, `head_dim`) with key tiles of `block_n` keys.
    Fast {
        name: &'static str,
        dtype: DType,
        head_dim: usize,
        block_n: usize,
    },
    Generic,
}

/// The tensor-core instance for (dtype, head_dim) on a device of compute capability `cc`,
/// if one exists: (kernel name, key-tile size).
fn fast_instance(dtype: DType, head_dim: usize, cc: (i32, i32)) -> Option<(&'static str, usize)> {
    let sm75 = cc < (8, 0);
    if cc < (7, 5) {
        return None;
    }
    match (dtype, head_dim) {
        (DType::F16, 64) => Some(("attention_fa_d64_f16", 64)),
        (DType::F16, 128) => Some(("attention_fa_d128_f16", 64)),
        (DType::F16, 256) if sm75 => Some(("attention_fa_d256_n32_f16", 32)),
        (DType::F16, 256) => Some(("attention_fa_d256_f16", 64)),
        (DType::BF16, _) if sm75 => None,
        (DType::BF16, 64) => Some(("attention_fa_d64_bf16", 64)),
        (DType::BF16, 128) => Some(("attention_fa_d128_bf16", 64)),
        (DType::BF16, 256) => Some(("attention_fa_d256_bf16", 64)),
        _ => None,
    }
}

/// Dynamic shared memory of a tensor-core kernel: Q, K and V tiles of 16-bit elements.
fn fast_smem_bytes(head_dim: usize, block_n: usize) -> usize {
    (FA_BLOCK_M + 2 * block_n) * head_dim * 2
}

/// Whether a tensor-core kernel with `block_n`-key tiles gets its shared memory on `dev`.
fn fast_fits(dev: &CudaDevice, head_dim: usize, block_n: usize) -> Result<bool> {
    let smem = fast_smem_bytes(head_dim, block_n);
    if smem <= DEFAULT_SMEM {
        return Ok(true);
    }
    let optin = dev
        .stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    Ok(smem <= optin.max(0) as usize)
}

fn choose(dev: &CudaDevice, dtype: DType, head_dim: usize) -> Result<Kernel> {
    match fast_instance(dtype, head_dim, dev.capability()) {
        Some((name, block_n)) if fast_fits(dev, head_dim, block_n)? => Ok(Kernel::Fast {
            name,
            dtype,
            head_dim,
            block_n,
        }),
        _ => Ok(Kernel::Generic),
    }
}

pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &SeqLayout,
    p: &AttentionParams,
) -> Result<Tensor> {
    let dev = q.cuda_storage()?.device().clone();
    let kernel = choose(&dev, q.dtype(), p.head_dim)?;
    run(q, k, v, layout, p, kernel)
}

/// Check, allocate, upload the row offsets and launch `kernel`.
fn run(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &SeqLayout,
    p: &AttentionParams,
    kernel: Kernel,
) -> Result<Tensor> {
    let (sq, sk, sv) = (q.cuda_storage()?, k.cuda_storage()?, v.cuda_storage()?);
    let dev = sq.device().clone();
    for (what, s) in [("k", sk), ("v", sv)] {
        if !Arc::ptr_eq(s.device(), &dev) {
            bail!(
                Shape,
                "attention: q is on cuda:{} but {what} on cuda:{}",
                dev.ordinal(),
                s.device().ordinal()
            );
        }
    }
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype {
        bail!(
            Shape,
            "attention: q, k and v must share a dtype (found {}, {}, {})",
            dtype.name(),
            k.dtype().name(),
            v.dtype().name()
        );
    }
    let d = p.head_dim;
    if d == 0 || d > MAX_HEAD_DIM {
        bail!(
            Shape,
            "attention on the GPU: head_dim {d} is not in 1..={MAX_HEAD_DIM}"
        );
    }
    let t = layout.total_tokens();
    let width = p.n_heads * d;
    let max_len = (0..layout.rows()).map(|r| layout.len(r)).max().unwrap_or(0);
    if t > i32::MAX as usize || layout.rows() > u16::MAX as usize || p.n_heads > u16::MAX as usize {
        bail!(
            Shape,
            "attention on the GPU: {t} tokens in {} rows with {} heads exceed the kernel's limits \
             (2^31 tokens, 65535 rows, 65535 heads)",
            layout.rows(),
            p.n_heads
        );
    }
    if let Some(c) = p.softcap
        && !(c.is_finite() && c > 0.0)
    {
        bail!(
            Shape,
            "attention: the logit soft-cap must be positive and finite, found {c}"
        );
    }
    let mut out = dev.alloc(t * width * dtype.size_in_bytes())?;
    if t == 0 {
        return Tensor::from_cuda(out, dtype, &[0, width]);
    }
    let cu_seqlens: Vec<i32> = layout.offsets().iter().map(|&o| o as i32).collect();
    let cu = dev.upload(bytemuck::cast_slice(&cu_seqlens))?;
    let params = engine_attention_params {
        n_heads: p.n_heads as i32,
        n_kv_heads: p.n_kv_heads as i32,
        head_dim: d as i32,
        num_rows: layout.rows() as i32,
        total_tokens: t as i32,
        max_len: max_len as i32,
        // A window at least as long as the longest row hides nothing: pass "none".
        window: match p.window {
            Some(w) if w < max_len => w as i32,
            _ => 0,
        },
        scale: p.scale,
        softcap: p.softcap.unwrap_or(0.0),
        reserved: 0,
    };
    let bufs = Buffers {
        out: &mut out,
        q: &sq.buf,
        k: &sk.buf,
        v: &sv.buf,
        cu: &cu,
    };
    match kernel {
        Kernel::Fast {
            name,
            dtype: kd,
            head_dim: kh,
            block_n,
        } => {
            if (kd, kh) != (dtype, d) {
                bail!(
                    Shape,
                    "attention: kernel {name} cannot run {} head_dim {d}",
                    dtype.name()
                );
            }
            launch_fast(&dev, name, block_n, bufs, &params)?
        }
        Kernel::Generic => launch_generic(&dev, dtype, bufs, &params)?,
    }
    Tensor::from_cuda(out, dtype, &[t, width])
}

/// The device buffers of one attention call.
struct Buffers<'a> {
    out: &'a mut CudaBuffer,
    q: &'a CudaBuffer,
    k: &'a CudaBuffer,
    v: &'a CudaBuffer,
    /// `num_rows + 1` int32 token offsets.
    cu: &'a CudaBuffer,
}

/// `attention_fa_d*`: grid (query tiles of the longest row, heads, rows), 128 threads.
fn launch_fast(
    dev: &Arc<CudaDevice>,
    name: &'static str,
    block_n: usize,
    b: Buffers,
    p: &engine_attention_params,
) -> Result<()> {
    let f = dev.function("attention", name)?;
    let smem = fast_smem_bytes(p.head_dim as usize, block_n);
    if smem > DEFAULT_SMEM {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )?;
    }
    let tiles = (p.max_len as usize).div_ceil(FA_BLOCK_M);
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, p.n_heads as u32, p.num_rows as u32),
        block_dim: (FA_THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (o, q, k, v, cu) = (
        &mut b.out.arg_mut(),
        &b.q.arg(),
        &b.k.arg(),
        &b.v.arg(),
        &b.cu.arg(),
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(o).arg(q).arg(k).arg(v).arg(cu).arg(p);
    // SAFETY: q/out hold total_tokens x n_heads x head_dim and k/v total_tokens x n_kv_heads x
    // head_dim elements of the kernel's dtype (checked by the caller), cu holds num_rows + 1
    // offsets ending at total_tokens; the block reads and writes only rows inside its own row.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// `attention_generic_<dtype>`: grid (ceil(longest row / 4), heads, rows), one warp per query.
fn launch_generic(
    dev: &Arc<CudaDevice>,
    dtype: DType,
    b: Buffers,
    p: &engine_attention_params,
) -> Result<()> {
    let f = dev.function("attention", kernel_name!("attention_generic", dtype))?;
    let blocks = (p.max_len as usize).div_ceil(GENERIC_WARPS);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, p.n_heads as u32, p.num_rows as u32),
        block_dim: (32 * GENERIC_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (o, q, k, v, cu) = (
        &mut b.out.arg_mut(),
        &b.q.arg(),
        &b.k.arg(),
        &b.v.arg(),
        &b.cu.arg(),
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(o).arg(q).arg(k).arg(v).arg(cu).arg(p);
    // SAFETY: as in launch_fast; head_dim <= 256 (checked by the caller) fits the kernel's
    // per-warp query buffer.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{CpuStorage, Device};

    #[test]
    fn kernel_table() {
        assert_eq!(
            fast_instance(DType::BF16, 256, (9, 0)),
            Some(("attention_fa_d256_bf16", 64))
        );
        assert_eq!(fast_instance(DType::BF16, 128, (7, 5)), None);
        assert_eq!(
            fast_instance(DType::F16, 256, (7, 5)),
            Some(("attention_fa_d256_n32_f16", 32))
        );
        assert_eq!(
            fast_instance(DType::F16, 256, (8, 6)),
            Some(("attention_fa_d256_f16", 64))
        );
        assert_eq!(fast_instance(DType::F32, 128, (9, 0)), None);
        assert_eq!(fast_instance(DType::BF16, 32, (9, 0)), None);
        assert_eq!(fast_instance(DType::F16, 128, (7, 0)), None);
        // sm_75 grants 64 KB per block: the n32 instance fits exactly.
        assert_eq!(fast_smem_bytes(256, 32), 64 * 1024);
        assert_eq!(fast_smem_bytes(128, 64), DEFAULT_SMEM);
        assert_eq!(fast_smem_bytes(256, 64), 96 * 1024);
    }

    fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Every kernel variant that can run on this GPU (the generic kernel at the tensor-core
    /// head_dims too, and the sm_75 `_n32` tiling, which also runs on sm_80+) against the CPU
    /// twin. The public op only ever reaches one variant per (dtype, head_dim, arch); the
    /// integration tests in tests/gpu_attention.rs cover that path.
    #[test]
    fn every_kernel_variant_matches_the_cpu_twin() {
        if let Err(why) = crate::cuda::availability() {
            println!("SKIPPED every_kernel_variant_matches_the_cpu_twin: no GPU ({why})");
            return;
        }
        let dev = crate::cuda::device(0).expect("a visible GPU must open");
        dev.set_poison(true);
        let lens = [1usize, 64, 65, 200, 17];
        let layout = SeqLayout::from_lens(&lens);
        let t = layout.total_tokens();
        let mut seed = 100;
        for dtype in [DType::BF16, DType::F16] {
            for d in [64usize, 128, 256] {
                let mut kernels = vec![Kernel::Generic];
                for cc in [(7, 5), dev.capability()] {
                    if cc <= dev.capability()
                        && let Some((name, block_n)) = fast_instance(dtype, d, cc)
                        && fast_fits(&dev, d, block_n).unwrap()
                    {
                        let k = Kernel::Fast {
                            name,
                            dtype,
                            head_dim: d,
                            block_n,
                        };
                        if !kernels.contains(&k) {
                            kernels.push(k);
                        }
                    }
                }
                for (softcap, window) in [(None, None), (Some(3.0), Some(40))] {
                    let p = AttentionParams {
                        n_heads: 4,
                        n_kv_heads: 2,
                        head_dim: d,
                        scale: (d as f32).powf(-0.5),
                        softcap,
                        window,
                    };
                    let round = |v: Vec<f32>| CpuStorage::F32(v).to_dtype(dtype).to_f32_vec();
                    seed += 3;
                    let q = round(rand(t * 4 * d, seed, 2.5));
                    let k = round(rand(t * 2 * d, seed + 1, 2.5));
                    let v = round(rand(t * 2 * d, seed + 2, 1.0));
                    let want = super::super::cpu::attention(&q, &k, &v, &layout, &p);
                    let gpu = |x: &[f32], w: usize| {
                        Tensor::from_f32(x.to_vec(), &[t, w])
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                            .to_device(Device::Cuda(0))
                            .unwrap()
                    };
                    let (gq, gk, gv) = (gpu(&q, 4 * d), gpu(&k, 2 * d), gpu(&v, 2 * d));
                    for &kernel in &kernels {
                        let got = run(&gq, &gk, &gv, &layout, &p, kernel)
                            .unwrap()
                            .to_f32_vec()
                            .unwrap();
                        // bf16/f16 outputs and probabilities: see tests/gpu_attention.rs.
                        let tol = if dtype == DType::BF16 { 2e-2 } else { 5e-3 };
                        let mut worst = 0f32;
                        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                            let err = (g - w).abs();
                            assert!(
                                err <= tol + tol * w.abs(),
                                "{kernel:?} {softcap:?} {window:?}: [{i}] got {g} want {w}"
                            );
                            worst = worst.max(err);
                        }
                        println!(
                            "{kernel:?} softcap {softcap:?} window {window:?}: max |err| {worst:e}"
                        );
                    }
                }
            }
        }
    }
}
