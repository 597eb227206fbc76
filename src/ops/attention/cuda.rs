//! Launchers of kernels/attention.cu.
//!
//! Forward kernel choice (see the block comment of kernels/attention.cu for the algorithms):
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
//!
//! Backward: `attention_bwd_prep_<dtype>` (the (lse, D) pair of every (token, query head)), then
//! the dK/dV kernel and the dQ kernel, each chosen on its own. The first instance of the
//! (dtype, head_dim) whose shared memory the device grants runs (sm_90: 227 KB, sm_80: 163 KB,
//! sm_86/89: 99 KB, sm_75: 64 KB); without one, the generic kernel:
//!
//! | dtype | head_dim | dK/dV, in order of preference             | dQ, in order of preference            |
//! |-------|----------|-------------------------------------------|---------------------------------------|
//! | bf16  | 64       | `kv_d64` (49 KB)                          | `q_d64` (48 KB)                       |
//! | bf16  | 128      | `kv_d128` (64.5 KB)                       | `q_d128` (96 KB)                      |
//! | bf16  | 256      | `kv_d256` (144.5 KB), `kv_d256_n32` (72 KB) | `q_d256` (128 KB), `q_d256_s1` (96 KB) |
//! | f16   | 64       | as bf16                                   | as bf16                               |
//! | f16   | 128      | as bf16, then `kv_d128_s1` (48 KB)        | as bf16, then `q_d128_s1` (64 KB)     |
//! | f16   | 256      | as bf16, then `kv_d256_n32_m16` (52 KB)   | as bf16, then `q_d256_m32` (48 KB)    |
//! | bf16 on sm_75, f32, other head_dims ≤ 256 | | `attention_bwd_kv_generic_<dtype>` | `attention_bwd_q_generic_<dtype>` |
//!
//! (names abbreviated: `kv_d64` is `attention_bwd_kv_d64_<dtype>`). So H100/H200 and A100 run
//! the largest tiles, sm_86/89 the middle ones at head_dim 256, T4 the f16 `_s1`/`_n32_m16`/`_m32`
//! tilings. Both backward kernels write their outputs once, in a fixed order: the backward is
//! deterministic (bit-identical from run to run).

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

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
/// (token, head) pairs per block of `attention_bwd_prep_*` (`bwd::PREP_WARPS`).
const PREP_WARPS: usize = 4;
/// Keys (dK/dV) or queries (dQ), one per warp, per block of the generic backward kernels
/// (`bwd::G_WARPS`).
const GENERIC_BWD_WARPS: usize = 4;

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

/// The most dynamic shared memory `dev` grants one block (after opting in).
fn smem_limit(dev: &CudaDevice) -> Result<usize> {
    let optin = dev
        .stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    Ok((optin.max(0) as usize).max(DEFAULT_SMEM))
}

/// Whether a tensor-core kernel with `block_n`-key tiles gets its shared memory on `dev`.
fn fast_fits(dev: &CudaDevice, head_dim: usize, block_n: usize) -> Result<bool> {
    let smem = fast_smem_bytes(head_dim, block_n);
    Ok(smem <= DEFAULT_SMEM || smem <= smem_limit(dev)?)
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
    Ok(run(q, k, v, layout, p, kernel, false)?.0)
}

/// [`attention`] that also returns the log-sum-exp of every (token, query head)'s logits,
/// `[tokens, n_heads]` f32 (natural log), for the backward.
pub(super) fn attention_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &SeqLayout,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor)> {
    let dev = q.cuda_storage()?.device().clone();
    let kernel = choose(&dev, q.dtype(), p.head_dim)?;
    match run(q, k, v, layout, p, kernel, true)? {
        (out, Some(lse)) => Ok((out, lse)),
        (_, None) => bail!(Cuda, "attention: the forward returned no log-sum-exp"),
    }
}

/// The checks every attention launch needs (shapes against the layout, one device, one
/// dtype, the kernels' limits): the device and the dtype.
fn check_inputs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &SeqLayout,
    p: &AttentionParams,
) -> Result<(Arc<CudaDevice>, DType)> {
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
    if p.n_kv_heads == 0
        || !p.n_heads.is_multiple_of(p.n_kv_heads)
        || q.shape() != [t, p.n_heads * d]
        || k.shape() != [t, p.n_kv_heads * d]
        || v.shape() != k.shape()
    {
        bail!(
            Shape,
            "attention: q {:?}, k {:?}, v {:?} do not fit {t} tokens of {}/{} heads × {d}",
            q.shape(),
            k.shape(),
            v.shape(),
            p.n_heads,
            p.n_kv_heads
        );
    }
    if t > i32::MAX as usize
        || layout.rows() > u16::MAX as usize
        || p.n_heads > u16::MAX as usize
        || (t * p.n_heads).div_ceil(PREP_WARPS) > i32::MAX as usize
    {
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
    if p.window == Some(0) {
        bail!(Shape, "attention: a sliding window of 0 sees nothing");
    }
    Ok((dev, dtype))
}

/// The kernels' parameter block for one call.
fn kernel_params(layout: &SeqLayout, p: &AttentionParams) -> engine_attention_params {
    let max_len = (0..layout.rows()).map(|r| layout.len(r)).max().unwrap_or(0);
    engine_attention_params {
        n_heads: p.n_heads as i32,
        n_kv_heads: p.n_kv_heads as i32,
        head_dim: p.head_dim as i32,
        num_rows: layout.rows() as i32,
        total_tokens: layout.total_tokens() as i32,
        max_len: max_len as i32,
        // A window at least as long as the longest row hides nothing: pass "none".
        window: match p.window {
            Some(w) if w < max_len => w as i32,
            _ => 0,
        },
        scale: p.scale,
        softcap: p.softcap.unwrap_or(0.0),
        reserved: 0,
    }
}

/// The row offsets as the kernels read them: `num_rows + 1` int32 on the device.
fn upload_offsets(dev: &Arc<CudaDevice>, layout: &SeqLayout) -> Result<CudaBuffer> {
    let cu_seqlens: Vec<i32> = layout.offsets().iter().map(|&o| o as i32).collect();
    dev.upload(bytemuck::cast_slice(&cu_seqlens))
}

/// Check, allocate, upload the row offsets and launch `kernel`; with `want_lse` also the
/// log-sum-exp `[tokens, n_heads]` f32.
fn run(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &SeqLayout,
    p: &AttentionParams,
    kernel: Kernel,
    want_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (dev, dtype) = check_inputs(q, k, v, layout, p)?;
    let (sq, sk, sv) = (q.cuda_storage()?, k.cuda_storage()?, v.cuda_storage()?);
    let d = p.head_dim;
    let t = layout.total_tokens();
    let width = p.n_heads * d;
    let mut out = dev.alloc(t * width * dtype.size_in_bytes())?;
    let mut lse = match want_lse {
        true => Some(dev.alloc(t * p.n_heads * 4)?),
        false => None,
    };
    let tensors = |out: CudaBuffer, lse: Option<CudaBuffer>| -> Result<(Tensor, Option<Tensor>)> {
        let lse = match lse {
            Some(b) => Some(Tensor::from_cuda(b, DType::F32, &[t, p.n_heads])?),
            None => None,
        };
        Ok((Tensor::from_cuda(out, dtype, &[t, width])?, lse))
    };
    if t == 0 {
        return tensors(out, lse);
    }
    let cu = upload_offsets(&dev, layout)?;
    let params = kernel_params(layout, p);
    let bufs = Buffers {
        out: &mut out,
        lse: lse.as_mut(),
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
    tensors(out, lse)
}

/// The device buffers of one forward call.
struct Buffers<'a> {
    out: &'a mut CudaBuffer,
    /// `[tokens, n_heads]` f32 log-sum-exp; `None`: not written (a null pointer).
    lse: Option<&'a mut CudaBuffer>,
    q: &'a CudaBuffer,
    k: &'a CudaBuffer,
    v: &'a CudaBuffer,
    /// `num_rows + 1` int32 token offsets.
    cu: &'a CudaBuffer,
}

/// A null device pointer, for an output a kernel is told not to write.
const NULL: u64 = 0;

/// Launch a forward kernel `f` with the arguments (out, lse, q, k, v, cu_seqlens, params).
fn launch_forward(
    dev: &Arc<CudaDevice>,
    f: &cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    b: Buffers,
    p: &engine_attention_params,
) -> Result<()> {
    let (o, q, k, v, cu) = (
        &mut b.out.arg_mut(),
        &b.q.arg(),
        &b.k.arg(),
        &b.v.arg(),
        &b.cu.arg(),
    );
    let mut lse_view = b.lse.map(|l| l.arg_mut());
    let mut l = dev.stream().launch_builder(f);
    l.arg(o);
    match lse_view.as_mut() {
        Some(view) => l.arg(view),
        None => l.arg(&NULL),
    };
    l.arg(q).arg(k).arg(v).arg(cu).arg(p);
    // SAFETY: q/out hold total_tokens x n_heads x head_dim and k/v total_tokens x n_kv_heads x
    // head_dim elements of the kernel's dtype, lse (when passed) total_tokens x n_heads f32
    // (checked and allocated by the caller), cu holds num_rows + 1 offsets ending at
    // total_tokens; a block reads and writes only rows inside its own row; head_dim <= 256 fits
    // the generic kernel's per-warp query buffer.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// Opt `f` in to `smem` bytes of dynamic shared memory when that is above the default.
fn set_smem(f: &CudaFunction, smem: usize) -> Result<()> {
    if smem > DEFAULT_SMEM {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )?;
    }
    Ok(())
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
    set_smem(&f, smem)?;
    let tiles = (p.max_len as usize).div_ceil(FA_BLOCK_M);
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, p.n_heads as u32, p.num_rows as u32),
        block_dim: (FA_THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    launch_forward(dev, &f, cfg, b, p)
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
    launch_forward(dev, &f, cfg, b, p)
}

// ---------------------------------------------------------------------------------------------
// Backward.

/// Tiling of a dK/dV kernel (`bwd::Kv<D, KG, DS, BM, STAGES>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KvTiling {
    /// Groups of 16 keys per block.
    kg: usize,
    /// Warps per key group (1, or 2 splitting the head dims).
    ds: usize,
    /// Queries per step.
    bm: usize,
    stages: usize,
}

impl KvTiling {
    fn threads(&self) -> u32 {
        (32 * self.kg * self.ds) as u32
    }

    fn keys(&self) -> usize {
        16 * self.kg
    }

    /// `bwd::Kv::SMEM`: K, V; stages x (Q, dO, (lse2, D) pairs); with ds = 2 a 16 x bm f32
    /// exchange tile per warp.
    fn smem(&self, d: usize) -> usize {
        let exchange = match self.ds {
            2 => self.kg * self.ds * 16 * self.bm * 4,
            _ => 0,
        };
        (2 * self.keys() * d + 2 * self.stages * self.bm * d) * 2
            + self.stages * self.bm * 8
            + exchange
    }
}

/// Tiling of a dQ kernel (`bwd::Qt<D, WARPS, BN, STAGES>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct QTiling {
    /// Warps of 16 queries per block.
    warps: usize,
    /// Keys per step.
    bn: usize,
    stages: usize,
}

impl QTiling {
    fn threads(&self) -> u32 {
        (32 * self.warps) as u32
    }

    fn queries(&self) -> usize {
        16 * self.warps
    }

    /// `bwd::Qt::SMEM`: Q, dO; stages x (K, V).
    fn smem(&self, d: usize) -> usize {
        (2 * self.queries() * d + 2 * self.stages * self.bn * d) * 2
    }
}

const fn kv(kg: usize, ds: usize, bm: usize, stages: usize) -> KvTiling {
    KvTiling { kg, ds, bm, stages }
}

const fn qt(warps: usize, bn: usize, stages: usize) -> QTiling {
    QTiling { warps, bn, stages }
}

/// The tensor-core dK/dV instances (kernels/attention.cu `ATTENTION_BWD_TYPES` and the sm_75
/// list), per (dtype, head_dim) in order of preference.
const KV_INSTANCES: &[(DType, usize, &str, KvTiling)] = &[
    (
        DType::BF16,
        64,
        "attention_bwd_kv_d64_bf16",
        kv(4, 1, 64, 2),
    ),
    (
        DType::BF16,
        128,
        "attention_bwd_kv_d128_bf16",
        kv(4, 1, 32, 2),
    ),
    (
        DType::BF16,
        256,
        "attention_bwd_kv_d256_bf16",
        kv(4, 2, 32, 2),
    ),
    (
        DType::BF16,
        256,
        "attention_bwd_kv_d256_n32_bf16",
        kv(2, 2, 32, 1),
    ),
    (DType::F16, 64, "attention_bwd_kv_d64_f16", kv(4, 1, 64, 2)),
    (
        DType::F16,
        128,
        "attention_bwd_kv_d128_f16",
        kv(4, 1, 32, 2),
    ),
    (
        DType::F16,
        128,
        "attention_bwd_kv_d128_s1_f16",
        kv(4, 1, 32, 1),
    ),
    (
        DType::F16,
        256,
        "attention_bwd_kv_d256_f16",
        kv(4, 2, 32, 2),
    ),
    (
        DType::F16,
        256,
        "attention_bwd_kv_d256_n32_f16",
        kv(2, 2, 32, 1),
    ),
    (
        DType::F16,
        256,
        "attention_bwd_kv_d256_n32_m16_f16",
        kv(2, 2, 16, 1),
    ),
];

/// The tensor-core dQ instances, per (dtype, head_dim) in order of preference.
const Q_INSTANCES: &[(DType, usize, &str, QTiling)] = &[
    (DType::BF16, 64, "attention_bwd_q_d64_bf16", qt(4, 64, 2)),
    (DType::BF16, 128, "attention_bwd_q_d128_bf16", qt(4, 64, 2)),
    (DType::BF16, 256, "attention_bwd_q_d256_bf16", qt(4, 32, 2)),
    (
        DType::BF16,
        256,
        "attention_bwd_q_d256_s1_bf16",
        qt(4, 32, 1),
    ),
    (DType::F16, 64, "attention_bwd_q_d64_f16", qt(4, 64, 2)),
    (DType::F16, 128, "attention_bwd_q_d128_f16", qt(4, 64, 2)),
    (DType::F16, 128, "attention_bwd_q_d128_s1_f16", qt(4, 64, 1)),
    (DType::F16, 256, "attention_bwd_q_d256_f16", qt(4, 32, 2)),
    (DType::F16, 256, "attention_bwd_q_d256_s1_f16", qt(4, 32, 1)),
    (
        DType::F16,
        256,
        "attention_bwd_q_d256_m32_f16",
        qt(2, 16, 1),
    ),
];

/// A backward kernel: a tensor-core instance (`threads` per block, `tile` keys (dK/dV) or
/// queries (dQ) per block, `smem` bytes of dynamic shared memory) or the generic kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BwdKernel {
    Fast {
        name: &'static str,
        threads: u32,
        tile: usize,
        smem: usize,
    },
    Generic,
}

/// Whether tensor-core kernels of `dtype` exist on compute capability `cc`.
fn has_mma(dtype: DType, cc: (i32, i32)) -> bool {
    match dtype {
        DType::BF16 => cc >= (8, 0),
        DType::F16 => cc >= (7, 5),
        DType::F32 => false,
    }
}

/// Every tensor-core dK/dV instance for (dtype, head_dim) on capability `cc` whose shared
/// memory fits `smem_limit`, in order of preference.
fn kv_candidates(dtype: DType, d: usize, cc: (i32, i32), smem_limit: usize) -> Vec<BwdKernel> {
    KV_INSTANCES
        .iter()
        .filter(|(t, hd, _, tl)| *t == dtype && *hd == d && tl.smem(d) <= smem_limit)
        .filter(|_| has_mma(dtype, cc))
        .map(|&(_, _, name, tl)| BwdKernel::Fast {
            name,
            threads: tl.threads(),
            tile: tl.keys(),
            smem: tl.smem(d),
        })
        .collect()
}

/// As [`kv_candidates`] for the dQ kernel.
fn q_candidates(dtype: DType, d: usize, cc: (i32, i32), smem_limit: usize) -> Vec<BwdKernel> {
    Q_INSTANCES
        .iter()
        .filter(|(t, hd, _, tl)| *t == dtype && *hd == d && tl.smem(d) <= smem_limit)
        .filter(|_| has_mma(dtype, cc))
        .map(|&(_, _, name, tl)| BwdKernel::Fast {
            name,
            threads: tl.threads(),
            tile: tl.queries(),
            smem: tl.smem(d),
        })
        .collect()
}

/// The (dK/dV, dQ) kernels the backward runs on `dev`.
fn choose_backward(dev: &CudaDevice, dtype: DType, d: usize) -> Result<(BwdKernel, BwdKernel)> {
    let (cc, limit) = (dev.capability(), smem_limit(dev)?);
    let first = |v: Vec<BwdKernel>| v.first().copied().unwrap_or(BwdKernel::Generic);
    Ok((
        first(kv_candidates(dtype, d, cc, limit)),
        first(q_candidates(dtype, d, cc, limit)),
    ))
}

/// dQ, dK, dV of attention for the upstream gradient `dout`. `saved` is the forward's output
/// and log-sum-exp (as [`attention_lse`] returns them); `None` recomputes both with one more
/// forward.
pub(super) fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    saved: Option<(&Tensor, &Tensor)>,
    layout: &SeqLayout,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dev, dtype) = check_inputs(q, k, v, layout, p)?;
    let (kv_kernel, q_kernel) = choose_backward(&dev, dtype, p.head_dim)?;
    run_backward(q, k, v, dout, saved, layout, p, (kv_kernel, q_kernel))
}

/// Check, recompute the forward if needed, and launch the prep, dK/dV and dQ kernels.
#[allow(clippy::too_many_arguments)] // the op's six inputs plus the kernel choice
fn run_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    saved: Option<(&Tensor, &Tensor)>,
    layout: &SeqLayout,
    p: &AttentionParams,
    kernels: (BwdKernel, BwdKernel),
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dev, dtype) = check_inputs(q, k, v, layout, p)?;
    let t = layout.total_tokens();
    let (qw, kw) = (p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim);
    let same_device = |x: &Tensor, what: &str| -> Result<()> {
        if !Arc::ptr_eq(x.cuda_storage()?.device(), &dev) {
            bail!(
                Shape,
                "attention backward: {what} is not on cuda:{}",
                dev.ordinal()
            );
        }
        Ok(())
    };
    same_device(dout, "dout")?;
    if dout.shape() != q.shape() || dout.dtype() != dtype {
        bail!(
            Shape,
            "attention backward: dout is {} {:?}, q {} {:?}",
            dout.dtype().name(),
            dout.shape(),
            dtype.name(),
            q.shape()
        );
    }
    let (out, lse) = match saved {
        Some((out, lse)) => {
            same_device(out, "the saved output")?;
            same_device(lse, "the saved log-sum-exp")?;
            if out.shape() != q.shape()
                || out.dtype() != dtype
                || lse.shape() != [t, p.n_heads]
                || lse.dtype() != DType::F32
            {
                bail!(
                    Shape,
                    "attention backward: saved output {} {:?} and log-sum-exp {} {:?} do not fit \
                     q {} {:?}",
                    out.dtype().name(),
                    out.shape(),
                    lse.dtype().name(),
                    lse.shape(),
                    dtype.name(),
                    q.shape()
                );
            }
            (out.clone(), lse.clone())
        }
        None => attention_lse(q, k, v, layout, p)?,
    };
    let size = dtype.size_in_bytes();
    let mut dq = dev.alloc(t * qw * size)?;
    let mut dk = dev.alloc(t * kw * size)?;
    let mut dv = dev.alloc(t * kw * size)?;
    if t > 0 {
        let cu = upload_offsets(&dev, layout)?;
        let params = kernel_params(layout, p);
        let mut ld = dev.alloc(t * p.n_heads * 8)?;
        launch_prep(
            &dev,
            dtype,
            &mut ld,
            &lse.cuda_storage()?.buf,
            &out.cuda_storage()?.buf,
            &dout.cuda_storage()?.buf,
            &params,
        )?;
        let b = BwdInputs {
            q: &q.cuda_storage()?.buf,
            k: &k.cuda_storage()?.buf,
            v: &v.cuda_storage()?.buf,
            dout: &dout.cuda_storage()?.buf,
            ld: &ld,
            cu: &cu,
        };
        launch_bwd_kv(&dev, dtype, kernels.0, &mut dk, &mut dv, &b, &params)?;
        launch_bwd_q(&dev, dtype, kernels.1, &mut dq, &b, &params)?;
    }
    Ok((
        Tensor::from_cuda(dq, dtype, &[t, qw])?,
        Tensor::from_cuda(dk, dtype, &[t, kw])?,
        Tensor::from_cuda(dv, dtype, &[t, kw])?,
    ))
}

/// The read-only device buffers of the backward kernels.
struct BwdInputs<'a> {
    q: &'a CudaBuffer,
    k: &'a CudaBuffer,
    v: &'a CudaBuffer,
    dout: &'a CudaBuffer,
    /// `[tokens, n_heads]` (lse, D) f32 pairs from `attention_bwd_prep_*`.
    ld: &'a CudaBuffer,
    /// `num_rows + 1` int32 token offsets.
    cu: &'a CudaBuffer,
}

/// `attention_bwd_prep_<dtype>`: one warp per (token, head), 4 per block.
fn launch_prep(
    dev: &Arc<CudaDevice>,
    dtype: DType,
    ld: &mut CudaBuffer,
    lse: &CudaBuffer,
    out: &CudaBuffer,
    dout: &CudaBuffer,
    p: &engine_attention_params,
) -> Result<()> {
    let f = dev.function("attention", kernel_name!("attention_bwd_prep", dtype))?;
    let pairs = p.total_tokens as usize * p.n_heads as usize;
    let cfg = LaunchConfig {
        grid_dim: (pairs.div_ceil(PREP_WARPS) as u32, 1, 1),
        block_dim: (32 * PREP_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (l, s, o, d) = (&mut ld.arg_mut(), &lse.arg(), &out.arg(), &dout.arg());
    let mut b = dev.stream().launch_builder(&f);
    b.arg(l).arg(s).arg(o).arg(d).arg(p);
    // SAFETY: ld holds total_tokens x n_heads f32 pairs, lse as many f32, out and dout
    // total_tokens x n_heads x head_dim elements of the kernel's dtype (allocated or checked by
    // the caller); warps past the last pair return.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The function and launch shape of a backward kernel (`generic`: the SIMT fallback's name):
/// grid (tiles of the longest row, `heads`, rows), with the instance's shared memory set.
fn bwd_kernel(
    dev: &Arc<CudaDevice>,
    kernel: BwdKernel,
    generic: &'static str,
    heads: u32,
    p: &engine_attention_params,
) -> Result<(CudaFunction, LaunchConfig)> {
    let (f, threads, tile, smem) = match kernel {
        BwdKernel::Fast {
            name,
            threads,
            tile,
            smem,
        } => (dev.function("attention", name)?, threads, tile, smem),
        BwdKernel::Generic => (
            dev.function("attention", generic)?,
            32 * GENERIC_BWD_WARPS as u32,
            GENERIC_BWD_WARPS,
            0,
        ),
    };
    set_smem(&f, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (
            (p.max_len as usize).div_ceil(tile) as u32,
            heads,
            p.num_rows as u32,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    Ok((f, cfg))
}

/// The dK/dV kernel: grid (key tiles of the longest row, KV heads, rows).
fn launch_bwd_kv(
    dev: &Arc<CudaDevice>,
    dtype: DType,
    kernel: BwdKernel,
    dk: &mut CudaBuffer,
    dv: &mut CudaBuffer,
    b: &BwdInputs,
    p: &engine_attention_params,
) -> Result<()> {
    let generic = kernel_name!("attention_bwd_kv_generic", dtype);
    let (f, cfg) = bwd_kernel(dev, kernel, generic, p.n_kv_heads as u32, p)?;
    let (dk, dv) = (&mut dk.arg_mut(), &mut dv.arg_mut());
    let (q, k, v, dout, ld, cu) = (
        &b.q.arg(),
        &b.k.arg(),
        &b.v.arg(),
        &b.dout.arg(),
        &b.ld.arg(),
        &b.cu.arg(),
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(dk)
        .arg(dv)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(dout)
        .arg(ld)
        .arg(cu)
        .arg(p);
    // SAFETY: q/dout hold total_tokens x n_heads x head_dim, k/v/dk/dv total_tokens x
    // n_kv_heads x head_dim elements of the kernel's dtype, ld total_tokens x n_heads f32
    // pairs, cu num_rows + 1 offsets ending at total_tokens (checked or allocated by the
    // caller); a fast instance is only chosen for its own (dtype, head_dim) with the shared
    // memory set above; a block reads and writes only rows of its own row.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// The dQ kernel: grid (query tiles of the longest row, query heads, rows).
fn launch_bwd_q(
    dev: &Arc<CudaDevice>,
    dtype: DType,
    kernel: BwdKernel,
    dq: &mut CudaBuffer,
    b: &BwdInputs,
    p: &engine_attention_params,
) -> Result<()> {
    let generic = kernel_name!("attention_bwd_q_generic", dtype);
    let (f, cfg) = bwd_kernel(dev, kernel, generic, p.n_heads as u32, p)?;
    let dq = &mut dq.arg_mut();
    let (q, k, v, dout, ld, cu) = (
        &b.q.arg(),
        &b.k.arg(),
        &b.v.arg(),
        &b.dout.arg(),
        &b.ld.arg(),
        &b.cu.arg(),
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(dq)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(dout)
        .arg(ld)
        .arg(cu)
        .arg(p);
    // SAFETY: as in launch_bwd_kv; dq holds total_tokens x n_heads x head_dim elements.
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

    fn names(v: Vec<BwdKernel>) -> Vec<&'static str> {
        v.into_iter()
            .map(|k| match k {
                BwdKernel::Fast { name, .. } => name,
                BwdKernel::Generic => "generic",
            })
            .collect()
    }

    #[test]
    fn backward_kernel_table() {
        // Shared memory of every instance, as bwd::Kv / bwd::Qt compute it.
        let kv_smem: Vec<(&str, usize)> = KV_INSTANCES
            .iter()
            .map(|(_, d, n, t)| (*n, t.smem(*d)))
            .collect();
        assert!(kv_smem.contains(&("attention_bwd_kv_d64_bf16", 50176)));
        assert!(kv_smem.contains(&("attention_bwd_kv_d128_f16", 66048)));
        assert!(kv_smem.contains(&("attention_bwd_kv_d128_s1_f16", 49408)));
        assert!(kv_smem.contains(&("attention_bwd_kv_d256_bf16", 147968)));
        assert!(kv_smem.contains(&("attention_bwd_kv_d256_n32_f16", 73984)));
        assert!(kv_smem.contains(&("attention_bwd_kv_d256_n32_m16_f16", 53376)));
        let q_smem: Vec<(&str, usize)> = Q_INSTANCES
            .iter()
            .map(|(_, d, n, t)| (*n, t.smem(*d)))
            .collect();
        assert!(q_smem.contains(&("attention_bwd_q_d64_f16", 49152)));
        assert!(q_smem.contains(&("attention_bwd_q_d128_bf16", 98304)));
        assert!(q_smem.contains(&("attention_bwd_q_d128_s1_f16", 65536)));
        assert!(q_smem.contains(&("attention_bwd_q_d256_bf16", 131072)));
        assert!(q_smem.contains(&("attention_bwd_q_d256_s1_f16", 98304)));
        assert!(q_smem.contains(&("attention_bwd_q_d256_m32_f16", 49152)));
        // Every name carries its own head_dim and dtype.
        let all = KV_INSTANCES
            .iter()
            .map(|(t, d, n, _)| (*t, *d, *n))
            .chain(Q_INSTANCES.iter().map(|(t, d, n, _)| (*t, *d, *n)));
        for (dtype, d, name) in all {
            assert!(name.contains(&format!("_d{d}")), "{name}");
            assert!(name.ends_with(dtype.name()), "{name}");
        }
        // H100/H200 (227 KB), A100 (163 KB), sm_86/89 (99 KB), T4 (64 KB).
        let h100 = ((9, 0), 232448);
        let a100 = ((8, 0), 166912);
        let ada = ((8, 9), 101376);
        let t4 = ((7, 5), 65536);
        let first = |v: Vec<BwdKernel>| names(v).first().copied().unwrap_or("generic");
        for (cc, lim) in [h100, a100] {
            assert_eq!(
                first(kv_candidates(DType::BF16, 256, cc, lim)),
                "attention_bwd_kv_d256_bf16"
            );
            assert_eq!(
                first(q_candidates(DType::BF16, 256, cc, lim)),
                "attention_bwd_q_d256_bf16"
            );
            assert_eq!(
                first(kv_candidates(DType::BF16, 128, cc, lim)),
                "attention_bwd_kv_d128_bf16"
            );
            assert_eq!(
                first(q_candidates(DType::BF16, 128, cc, lim)),
                "attention_bwd_q_d128_bf16"
            );
        }
        let (cc, lim) = ada;
        assert_eq!(
            first(kv_candidates(DType::BF16, 256, cc, lim)),
            "attention_bwd_kv_d256_n32_bf16"
        );
        assert_eq!(
            first(q_candidates(DType::BF16, 256, cc, lim)),
            "attention_bwd_q_d256_s1_bf16"
        );
        let (cc, lim) = t4;
        assert_eq!(first(kv_candidates(DType::BF16, 64, cc, lim)), "generic");
        assert_eq!(
            first(kv_candidates(DType::F16, 64, cc, lim)),
            "attention_bwd_kv_d64_f16"
        );
        assert_eq!(
            first(q_candidates(DType::F16, 64, cc, lim)),
            "attention_bwd_q_d64_f16"
        );
        assert_eq!(
            first(kv_candidates(DType::F16, 128, cc, lim)),
            "attention_bwd_kv_d128_s1_f16"
        );
        assert_eq!(
            first(q_candidates(DType::F16, 128, cc, lim)),
            "attention_bwd_q_d128_s1_f16"
        );
        assert_eq!(
            first(kv_candidates(DType::F16, 256, cc, lim)),
            "attention_bwd_kv_d256_n32_m16_f16"
        );
        assert_eq!(
            first(q_candidates(DType::F16, 256, cc, lim)),
            "attention_bwd_q_d256_m32_f16"
        );
        // No tensor cores for f32 or other head_dims.
        assert!(kv_candidates(DType::F32, 64, (9, 0), 232448).is_empty());
        assert!(q_candidates(DType::BF16, 32, (9, 0), 232448).is_empty());
        assert!(q_candidates(DType::F16, 128, (7, 0), 232448).is_empty());
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
                        let got = run(&gq, &gk, &gv, &layout, &p, kernel, false)
                            .unwrap()
                            .0
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

    /// Every backward kernel that can run on this GPU (each tensor-core instance of the
    /// (dtype, head_dim) whose shared memory fits — so an H100 also runs the sm_86/89 and T4
    /// tilings — and the generic kernels) against the CPU twin, with and without a saved
    /// forward. Tolerances: see tests/gpu_attention_backward.rs.
    #[test]
    fn every_backward_variant_matches_the_cpu_twin() {
        if let Err(why) = crate::cuda::availability() {
            println!("SKIPPED every_backward_variant_matches_the_cpu_twin: no GPU ({why})");
            return;
        }
        let dev = crate::cuda::device(0).expect("a visible GPU must open");
        dev.set_poison(true);
        let lens = [1usize, 64, 65, 200, 17];
        let layout = SeqLayout::from_lens(&lens);
        let t = layout.total_tokens();
        let limit = smem_limit(&dev).unwrap();
        let mut seed = 500;
        for dtype in [DType::BF16, DType::F16] {
            for d in [64usize, 128, 256] {
                let mut kvs = kv_candidates(dtype, d, dev.capability(), limit);
                kvs.push(BwdKernel::Generic);
                let mut qs = q_candidates(dtype, d, dev.capability(), limit);
                qs.push(BwdKernel::Generic);
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
                    seed += 4;
                    let q = round(rand(t * 4 * d, seed, 2.5));
                    let k = round(rand(t * 2 * d, seed + 1, 2.5));
                    let v = round(rand(t * 2 * d, seed + 2, 1.0));
                    let dout = round(rand(t * 4 * d, seed + 3, 1.0));
                    let want =
                        super::super::cpu::attention_backward(&q, &k, &v, &dout, &layout, &p);
                    let gpu = |x: &[f32], w: usize| {
                        Tensor::from_f32(x.to_vec(), &[t, w])
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                            .to_device(Device::Cuda(0))
                            .unwrap()
                    };
                    let (gq, gk, gv, gd) = (
                        gpu(&q, 4 * d),
                        gpu(&k, 2 * d),
                        gpu(&v, 2 * d),
                        gpu(&dout, 4 * d),
                    );
                    let (out, lse) = attention_lse(&gq, &gk, &gv, &layout, &p).unwrap();
                    // Pair every dK/dV kernel with every dQ kernel's position in its list.
                    let n = kvs.len().max(qs.len());
                    for i in 0..n {
                        let kernels = (kvs[i.min(kvs.len() - 1)], qs[i.min(qs.len() - 1)]);
                        for saved in [Some((&out, &lse)), None] {
                            let (dq, dk, dv) =
                                run_backward(&gq, &gk, &gv, &gd, saved, &layout, &p, kernels)
                                    .unwrap();
                            let tol = if dtype == DType::BF16 { 2e-2 } else { 5e-3 };
                            for (what, got, want) in [
                                ("dq", dq, &want.0),
                                ("dk", dk, &want.1),
                                ("dv", dv, &want.2),
                            ] {
                                let got = got.to_f32_vec().unwrap();
                                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                                let mut worst = 0f32;
                                for (j, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
                                    let err = (g - w).abs();
                                    assert!(
                                        err <= tol * scale + tol * w.abs(),
                                        "{kernels:?} {} d{d} {softcap:?} {window:?} {what}[{j}]: \
                                         got {g} want {w}",
                                        dtype.name()
                                    );
                                    worst = worst.max(err / scale);
                                }
                                println!(
                                    "{kernels:?} {} d{d} cap {softcap:?} window {window:?} \
                                     saved {}: {what} max |err| / max |want| {worst:e}",
                                    dtype.name(),
                                    saved.is_some()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
