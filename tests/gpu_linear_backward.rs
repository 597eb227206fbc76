//! The backward of the linear op on the GPU (kernels/linear.cu, "Backward") against its CPU
//! twin, on fresh random inputs: the input gradient through NF4 (plain and double-quantised
//! absmax) and dense base weights, the LoRA gradients (with and without a separate LoRA input),
//! the f32 score head, odd shapes and the real projection shapes of Gemma-2-9B and
//! Llama-3.1-8B; and the forward with a separate LoRA input (`linear_split`).
//!
//! The GPU computes in T (bf16 or f16): x, dy, A and B are rounded to T on the host and the CPU
//! twin is fed the same values. The kernels also round what the GPU holds in T — the
//! dequantised weight, h = x·Aᵀ (as the forward) and dh = s·dy·B where it meets the tensor
//! cores (dx's LoRA term) — so [`reference`] composes the CPU twin's own products with those
//! same roundings (`reference_composes_the_cpu_twin` checks that, unrounded, the pieces are the
//! twin). dA uses dh split into T hi/lo parts (about 16 significant bits for bf16), so its
//! reference uses the f32 dh. Outputs start poisoned (NaN): an unwritten element fails.
//! Without a GPU every GPU test prints SKIPPED.

mod common;

use std::sync::Arc;

use engine::cuda::CudaDevice;
use engine::ops::linear::{
    BaseWeight, Linear, LinearGrads, Lora, linear, linear_backward, linear_split,
};
use engine::quant::nf4::{Nf4Device, Nf4Tensor};
use engine::tensor::{CpuStorage, DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

/// Both activation types; bf16 runs on the SIMT kernels where the GPU has no bf16 tensor cores.
const DTYPES: [DType; 2] = [DType::BF16, DType::F16];

fn round(v: &[f32], dtype: DType) -> Vec<f32> {
    CpuStorage::F32(v.to_vec()).to_dtype(dtype).to_f32_vec()
}

fn gpu_tensor(v: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_cpu(CpuStorage::F32(v.to_vec()).to_dtype(dtype), shape)
        .unwrap()
        .to_device(GPU)
        .unwrap()
}

fn host(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(v.to_vec(), shape).unwrap()
}

// ------------------------------------------------------------------------------------------
// The CPU oracle, piece by piece
// ------------------------------------------------------------------------------------------

/// `u·v` for u `[t, red]` and v `[red, q]`: the CPU twin's input gradient (`dy·W`) with v as
/// the weight.
fn cpu_u_v(u: &[f32], t: usize, red: usize, v: &[f32], q: usize) -> Vec<f32> {
    let layer = Linear::new(BaseWeight::Dense(host(v, &[red, q])), None).unwrap();
    let x = host(&vec![0.0; t * q], &[t, q]);
    linear_backward(&x, None, &host(u, &[t, red]), &layer, false)
        .unwrap()
        .dx
        .to_f32_vec()
        .unwrap()
}

/// `aᵀ·b` for a `[t, p]` and b `[t, q]` (a `[p, q]` result): the CPU twin's weight gradient
/// (`dyᵀ·x`) with b as the input and a as the upstream gradient.
fn cpu_at_b(a: &[f32], t: usize, p: usize, b: &[f32], q: usize) -> Vec<f32> {
    let layer = Linear::new(BaseWeight::Dense(host(&vec![0.0; p * q], &[p, q])), None).unwrap();
    linear_backward(&host(b, &[t, q]), None, &host(a, &[t, p]), &layer, true)
        .unwrap()
        .weight
        .unwrap()
        .to_f32_vec()
        .unwrap()
}

/// `u·vᵀ` for u `[t, k]` and v `[q, k]`: the CPU twin's forward.
fn cpu_u_vt(u: &[f32], t: usize, k: usize, v: &[f32], q: usize) -> Vec<f32> {
    let layer = Linear::new(BaseWeight::Dense(host(v, &[q, k])), None).unwrap();
    linear(&host(u, &[t, k]), &layer)
        .unwrap()
        .to_f32_vec()
        .unwrap()
}

fn scaled(v: Vec<f32>, s: f32) -> Vec<f32> {
    v.into_iter().map(|x| x * s).collect()
}

/// A LoRA adapter as f32 host values (already rounded to the activation type).
#[derive(Clone)]
struct LoraHost {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    scale: f32,
}

impl LoraHost {
    /// B is random, not zero as at initialisation, so that every gradient is exercised; the
    /// LoRA path stays smaller than the base path, as in training.
    fn random(r: usize, k: usize, n: usize, scale: f32, seed: u64, dtype: DType) -> Self {
        LoraHost {
            a: round(&common::rand_vec(r * k, seed, 0.05), dtype),
            b: round(&common::rand_vec(n * r, seed + 1, 0.05), dtype),
            r,
            scale,
        }
    }

    fn on_gpu(&self, k: usize, n: usize, dtype: DType) -> Lora {
        Lora {
            a: gpu_tensor(&self.a, &[self.r, k], dtype),
            b: gpu_tensor(&self.b, &[n, self.r], dtype),
            scale: self.scale,
        }
    }

    fn on_cpu(&self, k: usize, n: usize) -> Lora {
        Lora {
            a: host(&self.a, &[self.r, k]),
            b: host(&self.b, &[n, self.r]),
            scale: self.scale,
        }
    }
}

/// The inputs of one backward, as f32 host values already rounded to T.
struct Case {
    t: usize,
    n: usize,
    k: usize,
    dtype: DType,
    x: Vec<f32>,
    /// The separate LoRA input (LoRA dropout), if any.
    x_lora: Option<Vec<f32>>,
    dy: Vec<f32>,
    lora: Option<LoraHost>,
}

impl Case {
    fn random(
        (t, n, k): (usize, usize, usize),
        dtype: DType,
        rank: usize,
        split: bool,
        seed: u64,
    ) -> Self {
        // rsLoRA-free PEFT scale alpha / r with alpha = 16.
        let lora =
            (rank > 0).then(|| LoraHost::random(rank, k, n, 16.0 / rank as f32, seed + 3, dtype));
        Case {
            t,
            n,
            k,
            dtype,
            x: round(&common::rand_vec(t * k, seed, 1.0), dtype),
            x_lora: split.then(|| round(&common::rand_vec(t * k, seed + 1, 1.0), dtype)),
            dy: round(&common::rand_vec(t * n, seed + 2, 1.0), dtype),
            lora,
        }
    }

    fn label(&self) -> String {
        format!(
            "{} [M {}, N {}, K {}] r={} x_lora={}",
            self.dtype.name(),
            self.t,
            self.n,
            self.k,
            self.lora.as_ref().map_or(0, |l| l.r),
            self.x_lora.is_some()
        )
    }
}

/// Gradients as f32 host values.
struct Grads {
    dx: Vec<f32>,
    dx_lora: Option<Vec<f32>>,
    da: Option<Vec<f32>>,
    db: Option<Vec<f32>>,
}

/// The CPU twin on the operands the GPU multiplies, `w` being the base weight `[n, k]` as the
/// GPU sees it (T-rounded, dequantised for NF4):
///   dx = dy·W + round_T(dh)·A  (or dx_lora = round_T(dh)·A with a separate LoRA input),
///   h = round_T(x_l·Aᵀ),  dh = s·dy·B,  dB = s·dyᵀ·h,  dA = dhᵀ·x_l.
/// Nothing is rounded at the end: the tolerances cover the GPU's rounding of dx.
fn reference(c: &Case, w: &[f32]) -> Grads {
    let (t, n, k) = (c.t, c.n, c.k);
    let mut dx = cpu_u_v(&c.dy, t, n, w, k);
    let (mut dx_lora, mut da, mut db) = (None, None, None);
    if let Some(l) = &c.lora {
        let xl = c.x_lora.as_ref().unwrap_or(&c.x);
        let h = round(&cpu_u_vt(xl, t, k, &l.a, l.r), c.dtype);
        let dh = scaled(cpu_u_v(&c.dy, t, n, &l.b, l.r), l.scale);
        db = Some(scaled(cpu_at_b(&c.dy, t, n, &h, l.r), l.scale));
        da = Some(cpu_at_b(&dh, t, l.r, xl, k));
        let up = cpu_u_v(&round(&dh, c.dtype), t, l.r, &l.a, k);
        if c.x_lora.is_some() {
            dx_lora = Some(up);
        } else {
            dx.iter_mut().zip(&up).for_each(|(d, u)| *d += u);
        }
    }
    Grads {
        dx,
        dx_lora,
        da,
        db,
    }
}

/// Run the GPU backward and download every output as f32, checking dtypes, shapes and devices.
fn run_gpu(c: &Case, weight: BaseWeight) -> Grads {
    let (t, n, k, dtype) = (c.t, c.n, c.k, c.dtype);
    let layer = Linear::new(weight, c.lora.as_ref().map(|l| l.on_gpu(k, n, dtype))).unwrap();
    let x = gpu_tensor(&c.x, &[t, k], dtype);
    let xl = c.x_lora.as_ref().map(|v| gpu_tensor(v, &[t, k], dtype));
    let dy = gpu_tensor(&c.dy, &[t, n], dtype);
    let g = linear_backward(&x, xl.as_ref(), &dy, &layer, false).unwrap();
    download(&g, c, dtype)
}

fn download(g: &LinearGrads, c: &Case, dtype: DType) -> Grads {
    let (t, n, k) = (c.t, c.n, c.k);
    let get = |x: &Tensor, shape: &[usize], dt: DType, what: &str| {
        assert_eq!(x.shape(), shape, "{what} shape");
        assert_eq!(x.dtype(), dt, "{what} dtype");
        assert_eq!(x.device(), GPU, "{what} device");
        x.to_f32_vec().unwrap()
    };
    assert!(g.weight.is_none(), "no weight gradient was asked for");
    assert_eq!(
        g.dx_lora.is_some(),
        c.x_lora.is_some() && c.lora.is_some(),
        "dx_lora"
    );
    assert_eq!(g.lora.is_some(), c.lora.is_some(), "LoRA gradients");
    let r = c.lora.as_ref().map_or(0, |l| l.r);
    Grads {
        dx: get(&g.dx, &[t, k], dtype, "dx"),
        dx_lora: g
            .dx_lora
            .as_ref()
            .map(|d| get(d, &[t, k], dtype, "dx_lora")),
        da: g
            .lora
            .as_ref()
            .map(|(a, _)| get(a, &[r, k], DType::F32, "dA")),
        db: g
            .lora
            .as_ref()
            .map(|(_, b)| get(b, &[n, r], DType::F32, "dB")),
    }
}

// ------------------------------------------------------------------------------------------
// Tolerances
// ------------------------------------------------------------------------------------------

/// Per-element tolerance relative to the row: |got − want| ≤ ε·(|want| + rms(want's row)),
/// rows of `row` elements. The rms term is the slack for what is not relative to the element
/// (f32 sums in another order; an intermediate rounded to a neighbouring T value); a wrong
/// tile, a missed mask or a misplaced nibble is off by the row's whole scale and fails by
/// orders of magnitude.
fn check(what: &str, got: &[f32], want: &[f32], row: usize, eps: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut bad = Vec::new();
    let mut worst = 0f32;
    for (i, (g, w)) in got.chunks(row).zip(want.chunks(row)).enumerate() {
        let rms = (w.iter().map(|v| v * v).sum::<f32>() / row as f32).sqrt();
        for (j, (&g, &w)) in g.iter().zip(w).enumerate() {
            let tol = eps * (w.abs() + rms);
            let err = (g - w).abs();
            if err.is_nan() || err > tol {
                bad.push(format!("[{i}, {j}] got {g} want {w} (tol {tol:e})"));
            }
            if err.is_finite() && rms > 0.0 {
                worst = worst.max(err / (w.abs() + rms));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} elements out of tolerance (worst error / (|want| + rms) = {worst:e}, ε = {eps:e}); first: {}",
        bad.len(),
        got.len(),
        bad.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
    );
}

/// ε for an output rounded to T once: half an ulp is at most 2⁻⁹·|y| for bf16 (8 significant
/// bits) and 2⁻¹²·|y| for f16 (11 bits); one full ulp (2⁻⁸, 2⁻¹⁰ as in tests/gpu_linear.rs)
/// lets a value whose f32 sum lands on the other side of a rounding boundary pass.
fn eps_round(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1.0 / 256.0,
        DType::F16 => 1.0 / 1024.0,
        DType::F32 => 1e-5,
    }
}

/// ε for an output built from a T intermediate (h for dB, dh for dx_lora) that the GPU and
/// the CPU may round to neighbouring values after summing in different orders: one ulp of one
/// term is up to 2⁻⁷ of it for bf16 (2⁻¹⁰ for f16). With one row of tokens (M = 1), dB[n, j] is
/// a single product s·dy·h, so the whole element can be off by that much.
fn eps_ulp(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1.0 / 128.0,
        DType::F16 => 1.0 / 1024.0,
        DType::F32 => 1e-5,
    }
}

/// ε for dA: dh reaches it as T hi + lo parts (16 significant bits for bf16, 22 for f16, so
/// within 2⁻¹⁷ of the f32 dh), x is exact in T and the sums are f32 in another order; 2⁻¹²
/// leaves a margin of 30 over the hi/lo representation error.
const EPS_DA: f32 = 1.0 / 4096.0;

fn compare(c: &Case, got: &Grads, want: &Grads) {
    let label = c.label();
    let k = c.k;
    // dx's LoRA term holds round_T(dh) on both sides, up to a neighbouring value: its terms are
    // far below the base term's row scale, so ε_round (plus the rms slack) covers it.
    check(
        &format!("dx {label}"),
        &got.dx,
        &want.dx,
        k,
        eps_round(c.dtype),
    );
    if let (Some(g), Some(w)) = (&got.dx_lora, &want.dx_lora) {
        check(&format!("dx_lora {label}"), g, w, k, eps_ulp(c.dtype));
    }
    if let (Some(g), Some(w)) = (&got.da, &want.da) {
        check(&format!("dA {label}"), g, w, k, EPS_DA);
    }
    if let (Some(g), Some(w), Some(l)) = (&got.db, &want.db, &c.lora) {
        check(&format!("dB {label}"), g, w, l.r, eps_ulp(c.dtype));
    }
}

// ------------------------------------------------------------------------------------------
// Cases
// ------------------------------------------------------------------------------------------

/// A random NF4 weight `[n, k]` on the GPU and its dequantised values.
fn nf4_weight(
    dev: &Arc<CudaDevice>,
    n: usize,
    k: usize,
    double: bool,
    seed: u64,
) -> (Arc<Nf4Device>, Vec<f32>) {
    let w = common::rand_vec(n * k, seed, 0.05);
    let q = Nf4Tensor::quantize(&CpuStorage::F32(w), &[n, k], double).unwrap();
    (Arc::new(q.to_device(dev).unwrap()), q.dequantize())
}

/// One NF4 shape in both activation types, for each (rank, separate LoRA input) variant.
fn nf4_case(
    dev: &Arc<CudaDevice>,
    (t, n, k): (usize, usize, usize),
    double: bool,
    variants: &[(usize, bool)],
    seed: u64,
) {
    let (qd, deq) = nf4_weight(dev, n, k, double, seed);
    for dtype in DTYPES {
        let w_t = round(&deq, dtype);
        for &(rank, split) in variants {
            let c = Case::random((t, n, k), dtype, rank, split, seed + 10);
            let got = run_gpu(&c, BaseWeight::Nf4Cuda(qd.clone()));
            let want = reference(&c, &w_t);
            compare(&c, &got, &want);
        }
    }
}

/// One dense-T shape in both activation types.
fn dense_case((t, n, k): (usize, usize, usize), variants: &[(usize, bool)], seed: u64) {
    for dtype in DTYPES {
        let w = round(&common::rand_vec(n * k, seed, 0.05), dtype);
        let wg = gpu_tensor(&w, &[n, k], dtype);
        for &(rank, split) in variants {
            let c = Case::random((t, n, k), dtype, rank, split, seed + 10);
            let got = run_gpu(&c, BaseWeight::Dense(wg.clone()));
            compare(&c, &got, &reference(&c, &w));
        }
    }
}

#[test]
fn nf4_backward_odd_shapes_match_cpu() {
    let Some(dev) = common::gpu("nf4_backward_odd_shapes_match_cpu") else {
        return;
    };
    // (M, N, K). Tensor cores need N % 8 == 0 (dy rows) and K % 16 == 0 (whole 8-byte NF4
    // loads inside one 64-block); the others run on the SIMT kernels. K = 112 and 1040 put
    // 64-blocks across rows of W on the tensor-core path; K = 200 and 3592 do on SIMT, and
    // (3, 520, 200) splits N across SIMT blocks.
    let shapes = [
        (1, 1, 64),
        (7, 77, 128),
        (64, 129, 1088),
        (129, 255, 320),
        (33, 96, 112),
        (130, 136, 1040),
        (7, 333, 96),
        (129, 80, 200),
        (65, 264, 3592),
        (3, 520, 200),
    ];
    for (i, &s) in shapes.iter().enumerate() {
        nf4_case(
            &dev,
            s,
            false,
            &[(0, false), (8, false)],
            100 + 20 * i as u64,
        );
    }
}

#[test]
fn nf4_backward_double_quant_matches_cpu() {
    let Some(dev) = common::gpu("nf4_backward_double_quant_matches_cpu") else {
        return;
    };
    // More than 256 blocks, so several absmax2 groups; one shape on the SIMT path.
    for (i, &s) in [(129, 1000, 3584), (7, 4096, 1024), (64, 333, 1000)]
        .iter()
        .enumerate()
    {
        nf4_case(
            &dev,
            s,
            true,
            &[(0, false), (32, true)],
            300 + 20 * i as u64,
        );
    }
}

#[test]
fn lora_backward_ranks_and_separate_input_match_cpu() {
    let Some(dev) = common::gpu("lora_backward_ranks_and_separate_input_match_cpu") else {
        return;
    };
    // r = 8 and 32 with and without a separate LoRA input; r = 5 runs the LoRA GEMMs on the
    // SIMT kernels and r = 4 mixes them (dA's hi/lo GEMM has 2r = 8 columns: tensor cores);
    // r = 72 spans two column tiles of the thin kernel and three 32-steps of the fused dh·A.
    let all = [(8, false), (8, true), (32, false), (32, true)];
    nf4_case(&dev, (129, 512, 1024), false, &all, 400);
    nf4_case(&dev, (7, 256, 3584), true, &all, 420);
    nf4_case(
        &dev,
        (64, 136, 192),
        false,
        &[(5, false), (5, true), (4, true)],
        440,
    );
    nf4_case(
        &dev,
        (130, 264, 256),
        false,
        &[(72, false), (72, true)],
        460,
    );
    dense_case((66, 200, 136), &[(8, true), (32, false)], 480);
}

#[test]
fn nf4_backward_real_model_shapes_match_cpu() {
    let Some(dev) = common::gpu("nf4_backward_real_model_shapes_match_cpu") else {
        return;
    };
    // Gemma-2-9B (hidden 3584: q 4096, k/v 2048, MLP 14336) and Llama-3.1-8B (hidden 4096:
    // k/v 1024, MLP 14336) projections, (M, N, K), with LoRA r 8 / 32 as the recipes use.
    // M = 1 and 7 split the reduction over N across blocks (the LoRA term in split 0).
    type Proj = ((usize, usize, usize), bool, &'static [(usize, bool)]);
    let cases: [Proj; 8] = [
        ((1536, 4096, 3584), false, &[(32, false)]), // Gemma q_proj
        ((129, 2048, 3584), true, &[(8, true)]),     // Gemma k/v_proj
        ((64, 3584, 4096), false, &[(0, false)]),    // Gemma o_proj
        ((7, 14336, 3584), true, &[(32, false)]),    // Gemma gate/up_proj
        ((1, 3584, 14336), false, &[(8, true)]),     // Gemma down_proj
        ((1536, 1024, 4096), true, &[(32, true)]),   // Llama k/v_proj
        ((64, 14336, 4096), false, &[(8, false)]),   // Llama gate/up_proj
        ((129, 4096, 14336), true, &[(32, false)]),  // Llama down_proj
    ];
    for (i, (shape, double, variants)) in cases.into_iter().enumerate() {
        nf4_case(&dev, shape, double, variants, 500 + 20 * i as u64);
    }
}

#[test]
fn dense_backward_matches_cpu() {
    let Some(_dev) = common::gpu("dense_backward_matches_cpu") else {
        return;
    };
    // K % 8 == 0 and N % 8 == 0 run on tensor cores (K tails masked per 16-byte chunk); odd N
    // or K on SIMT.
    dense_case((1, 1, 8), &[(0, false)], 700);
    dense_case((7, 333, 96), &[(0, false), (8, true)], 720);
    dense_case((129, 80, 201), &[(0, false), (8, false)], 740);
    dense_case((64, 129, 200), &[(32, false)], 760);
    dense_case((130, 264, 4095), &[(0, false), (32, true)], 780);
    dense_case((1536, 4096, 3584), &[(32, false)], 800); // Gemma q_proj
    dense_case((7, 1024, 4096), &[(8, true)], 820); // Llama k/v_proj
    dense_case((1, 3584, 14336), &[(0, false)], 840); // Gemma down_proj
    dense_case((1, 1000, 1001), &[(8, false)], 860); // SIMT with N split, LoRA in split 0
}

#[test]
fn score_head_backward_matches_cpu() {
    let Some(_dev) = common::gpu("score_head_backward_matches_cpu") else {
        return;
    };
    // The [3, hidden] classifier: f32 weight, activations in T, f32 logits gradient; dx in T
    // and dW in f32.
    for (i, &(t, k)) in [(1usize, 3584usize), (7, 4096), (64, 4097), (300, 3584)]
        .iter()
        .enumerate()
    {
        let n = 3;
        let seed = 900 + 10 * i as u64;
        let w = common::rand_vec(n * k, seed, 0.05);
        let layer = Linear::new(
            BaseWeight::Dense(host(&w, &[n, k]).to_device(GPU).unwrap()),
            None,
        )
        .unwrap();
        let dy = common::rand_vec(t * n, seed + 1, 1.0);
        let dyg = host(&dy, &[t, n]).to_device(GPU).unwrap();
        for dtype in DTYPES {
            let x = round(&common::rand_vec(t * k, seed + 2, 1.0), dtype);
            let xg = gpu_tensor(&x, &[t, k], dtype);
            let label = format!("score head {} [{t}x{k}]", dtype.name());
            for want_dw in [true, false] {
                let g = linear_backward(&xg, None, &dyg, &layer, want_dw).unwrap();
                assert!(g.lora.is_none() && g.dx_lora.is_none(), "{label}");
                assert_eq!(g.dx.dtype(), dtype, "{label}: dx dtype");
                assert_eq!(g.dx.shape(), [t, k], "{label}: dx shape");
                // The twin itself, on the same f32 dy, W and T-rounded x.
                let twin = Linear::new(BaseWeight::Dense(host(&w, &[n, k])), None).unwrap();
                let want =
                    linear_backward(&host(&x, &[t, k]), None, &host(&dy, &[t, n]), &twin, true)
                        .unwrap();
                let want_dx = want.dx.to_f32_vec().unwrap();
                // dx is 3 f32 products rounded to T once.
                check(
                    &format!("{label} dx"),
                    &g.dx.to_f32_vec().unwrap(),
                    &want_dx,
                    k,
                    eps_round(dtype),
                );
                match (&g.weight, want_dw) {
                    (Some(dw), true) => {
                        assert_eq!(
                            (dw.dtype(), dw.shape()),
                            (DType::F32, &[n, k][..]),
                            "{label}: dW"
                        );
                        // dW = dyᵀ·x in f32 over exact inputs: only the summation order
                        // differs (t ≤ 300 terms).
                        check(
                            &format!("{label} dW"),
                            &dw.to_f32_vec().unwrap(),
                            &want.weight.as_ref().unwrap().to_f32_vec().unwrap(),
                            k,
                            1e-5,
                        );
                    }
                    (None, false) => {}
                    _ => panic!("{label}: weight gradient present = {}", g.weight.is_some()),
                }
            }
        }
    }
}

#[test]
fn linear_split_matches_cpu() {
    let Some(dev) = common::gpu("linear_split_matches_cpu") else {
        return;
    };
    // The forward with a separate LoRA input: y = x·Wᵀ + s·round_T(x_l·Aᵀ)·Bᵀ.
    for (i, &((t, n, k), r)) in [
        ((129, 300, 1024), 8),
        ((7, 4096, 3584), 32),
        ((64, 129, 200), 16),
    ]
    .iter()
    .enumerate()
    {
        let seed = 1000 + 10 * i as u64;
        let (qd, deq) = nf4_weight(&dev, n, k, true, seed);
        for dtype in DTYPES {
            let c = Case::random((t, n, k), dtype, r, true, seed + 1);
            let l = c.lora.as_ref().unwrap();
            let xl = c.x_lora.as_ref().unwrap();
            let layer =
                Linear::new(BaseWeight::Nf4Cuda(qd.clone()), Some(l.on_gpu(k, n, dtype))).unwrap();
            let y = linear_split(
                &gpu_tensor(&c.x, &[t, k], dtype),
                &gpu_tensor(xl, &[t, k], dtype),
                &layer,
            )
            .unwrap();
            assert_eq!((y.dtype(), y.shape()), (dtype, &[t, n][..]));
            let mut want = cpu_u_vt(&c.x, t, k, &round(&deq, dtype), n);
            let h = round(&cpu_u_vt(xl, t, k, &l.a, r), dtype);
            let up = cpu_u_vt(&h, t, r, &l.b, n);
            want.iter_mut()
                .zip(&up)
                .for_each(|(y, u)| *y += l.scale * u);
            // As tests/gpu_linear.rs: y rounded to T once, h possibly one ulp apart.
            check(
                &format!("linear_split {}", c.label()),
                &y.to_f32_vec().unwrap(),
                &want,
                n,
                eps_round(dtype),
            );
        }
    }
}

#[test]
fn f32_activations_backward_runs_on_simt() {
    let Some(dev) = common::gpu("f32_activations_backward_runs_on_simt") else {
        return;
    };
    // T = f32: nothing is rounded, every GEMM runs on the SIMT kernels; the hi/lo split of dh
    // has an exact hi and a zero lo.
    let (t, n, k) = (65, 130, 1024);
    let (qd, deq) = nf4_weight(&dev, n, k, false, 1100);
    for split in [false, true] {
        let c = Case::random((t, n, k), DType::F32, 8, split, 1101);
        let got = run_gpu(&c, BaseWeight::Nf4Cuda(qd.clone()));
        compare(&c, &got, &reference(&c, &deq));
    }
    // A dense f32 weight with f32 activations and N > 64, with its gradient.
    let w = common::rand_vec(n * k, 1102, 0.05);
    let c = Case::random((t, n, k), DType::F32, 0, false, 1103);
    let layer = Linear::new(
        BaseWeight::Dense(host(&w, &[n, k]).to_device(GPU).unwrap()),
        None,
    )
    .unwrap();
    let g = linear_backward(
        &gpu_tensor(&c.x, &[t, k], DType::F32),
        None,
        &gpu_tensor(&c.dy, &[t, n], DType::F32),
        &layer,
        true,
    )
    .unwrap();
    check(
        "dense f32 dx",
        &g.dx.to_f32_vec().unwrap(),
        &reference(&c, &w).dx,
        k,
        1e-5,
    );
    check(
        "dense f32 dW",
        &g.weight.unwrap().to_f32_vec().unwrap(),
        &cpu_at_b(&c.dy, t, n, &c.x, k),
        k,
        1e-5,
    );
}

#[test]
fn backward_is_deterministic() {
    let Some(dev) = common::gpu("backward_is_deterministic") else {
        return;
    };
    // Split reductions everywhere (M = 7: dx over N, dh over N, dB and dA over M): the same
    // inputs give the same bits.
    let (t, n, k) = (7, 4096, 3584);
    let (qd, _) = nf4_weight(&dev, n, k, true, 1200);
    for dtype in DTYPES {
        for split in [false, true] {
            let c = Case::random((t, n, k), dtype, 32, split, 1201);
            let bits = |g: &Grads| {
                let mut v: Vec<u32> = g.dx.iter().map(|x| x.to_bits()).collect();
                for part in [&g.dx_lora, &g.da, &g.db].into_iter().flatten() {
                    v.extend(part.iter().map(|x| x.to_bits()));
                }
                v
            };
            let a = bits(&run_gpu(&c, BaseWeight::Nf4Cuda(qd.clone())));
            let b = bits(&run_gpu(&c, BaseWeight::Nf4Cuda(qd.clone())));
            assert!(a == b, "{}: two runs differ", c.label());
        }
    }
}

#[test]
fn empty_backward_gives_zeros() {
    let Some(_dev) = common::gpu("empty_backward_gives_zeros") else {
        return;
    };
    // No tokens: dA and dB are sums over nothing (zeros), dx is empty.
    let (n, k, r) = (64, 128, 8);
    let dtype = DType::BF16;
    let l = LoraHost::random(r, k, n, 2.0, 1300, dtype);
    let w = gpu_tensor(&common::rand_vec(n * k, 1301, 0.05), &[n, k], dtype);
    let layer = Linear::new(BaseWeight::Dense(w), Some(l.on_gpu(k, n, dtype))).unwrap();
    let x = gpu_tensor(&[], &[0, k], dtype);
    let dy = gpu_tensor(&[], &[0, n], dtype);
    let g = linear_backward(&x, Some(&x), &dy, &layer, false).unwrap();
    assert_eq!(g.dx.shape(), [0, k]);
    assert_eq!(g.dx_lora.unwrap().shape(), [0, k]);
    let (da, db) = g.lora.unwrap();
    assert_eq!((da.shape(), db.shape()), (&[r, k][..], &[n, r][..]));
    assert!(da.to_f32_vec().unwrap().iter().all(|&v| v == 0.0));
    assert!(db.to_f32_vec().unwrap().iter().all(|&v| v == 0.0));
}

/// CPU only: the test's oracle. [`reference`] in f32 (nothing rounded) is the CPU twin itself:
/// an NF4 base plus LoRA through `linear_backward`, with and without a separate LoRA input,
/// agrees with the pieces [`reference`] composes; and the tolerance catches a real error.
#[test]
fn reference_composes_the_cpu_twin() {
    let (t, n, k, r) = (9, 70, 192, 8);
    let w = common::rand_vec(n * k, 1400, 0.05);
    let q = Nf4Tensor::quantize(&CpuStorage::F32(w), &[n, k], true).unwrap();
    for split in [false, true] {
        let c = Case::random((t, n, k), DType::F32, r, split, 1401);
        let l = c.lora.as_ref().unwrap();
        let twin = Linear::new(BaseWeight::Nf4(q.clone()), Some(l.on_cpu(k, n))).unwrap();
        let xl = c.x_lora.as_ref().map(|v| host(v, &[t, k]));
        let g = linear_backward(
            &host(&c.x, &[t, k]),
            xl.as_ref(),
            &host(&c.dy, &[t, n]),
            &twin,
            false,
        )
        .unwrap();
        let (da, db) = g.lora.as_ref().unwrap();
        let twin_grads = Grads {
            dx: g.dx.to_f32_vec().unwrap(),
            dx_lora: g.dx_lora.as_ref().map(|d| d.to_f32_vec().unwrap()),
            da: Some(da.to_f32_vec().unwrap()),
            db: Some(db.to_f32_vec().unwrap()),
        };
        let pieces = reference(&c, &q.dequantize());
        compare(&c, &pieces, &twin_grads);
        // One wrong weight row changes every dx element it feeds: caught at bf16 tolerance.
        let mut w_bad = q.dequantize();
        w_bad[5 * k..6 * k].iter_mut().for_each(|v| *v = -*v);
        let bad = reference(&c, &w_bad);
        let dx = twin_grads.dx.clone();
        assert!(
            std::panic::catch_unwind(|| check("bad", &bad.dx, &dx, k, eps_round(DType::BF16)))
                .is_err()
        );
    }
}
