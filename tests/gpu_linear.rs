//! The linear op on the GPU (kernels/linear.cu) against its CPU twin, on fresh random inputs:
//! NF4 (plain and double-quantised absmax) and dense base weights, fused LoRA, the f32 score
//! head, odd shapes and the real projection shapes of Gemma-2-9B and Llama-3.1-8B, and NF4
//! quantisation / dequantisation on the GPU bit for bit against src/quant/nf4.rs.
//!
//! The GPU computes in T (bf16 or f16): x, A and B are rounded to T on the host and the CPU
//! twin is fed the same rounded values. The kernel also rounds the dequantised weight to T
//! before the MMA (as bitsandbytes dequantises to the compute dtype) and rounds h = x·Aᵀ to T
//! (PEFT's lora_A output is a T tensor), so [`reference`] builds the CPU result from those same
//! rounded operands with the CPU twin; what remains is the kernel's own arithmetic (f32 sums in
//! another order) and its single rounding of y to T. Without a GPU every test prints SKIPPED.

mod common;

use std::sync::Arc;

use engine::cuda::CudaDevice;
use engine::ops::linear::{BaseWeight, Linear, Lora, dequantize_nf4, linear, quantize_nf4};
use engine::quant::nf4::{Absmax, DeviceAbsmax, NF4_CODE, Nf4Device, Nf4Tensor};
use engine::tensor::{CpuStorage, DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

/// Both activation types; bf16 runs on the SIMT kernel where the GPU has no bf16 tensor cores.
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

fn cpu_matmul(x: &[f32], t: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let xt = Tensor::from_f32(x.to_vec(), &[t, k]).unwrap();
    let layer = Linear::new(
        BaseWeight::Dense(Tensor::from_f32(w.to_vec(), &[n, k]).unwrap()),
        None,
    )
    .unwrap();
    linear(&xt, &layer).unwrap().to_f32_vec().unwrap()
}

/// A LoRA adapter as f32 host values (already rounded to the activation type).
struct LoraHost {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    scale: f32,
}

impl LoraHost {
    fn random(r: usize, k: usize, n: usize, scale: f32, seed: u64, dtype: DType) -> Self {
        LoraHost {
            a: round(&common::rand_vec(r * k, seed, 0.05), dtype),
            b: round(&common::rand_vec(n * r, seed + 1, 0.1), dtype),
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
}

/// The CPU twin on the operands the kernel multiplies: `x` `[t, k]` and the base weight
/// `w` `[n, k]` as f32 values already rounded to T; `h = x·Aᵀ` rounded to T; then
/// `y = x·wᵀ + scale·h·Bᵀ` in f32 (not rounded: the tolerance covers the kernel's rounding).
fn reference(
    x: &[f32],
    t: usize,
    k: usize,
    w: &[f32],
    n: usize,
    lora: Option<&LoraHost>,
    dtype: DType,
) -> Vec<f32> {
    let mut y = cpu_matmul(x, t, k, w, n);
    if let Some(l) = lora {
        let h = round(&cpu_matmul(x, t, k, &l.a, l.r), dtype);
        let up = cpu_matmul(&h, t, l.r, &l.b, n);
        for (y, u) in y.iter_mut().zip(up) {
            *y += l.scale * u;
        }
    }
    y
}

/// Per-element tolerance relative to the row: |got − want| ≤ ε·(|want| + rms(want's row)).
///
/// ε = 2⁻⁸ for bf16 (8 significant bits) and 2⁻¹⁰ for f16 (11 bits): the kernel rounds y to
/// T once, an error of at most half an ulp, 2⁻⁹·|y| for bf16 (2⁻¹²·|y| for f16) — ε·|want|
/// allows one full ulp, so a value whose f32 sum lands on the other side of a rounding boundary
/// still passes. The rms term is the absolute slack for what is not relative to the element:
/// the f32 sums in a different order (about √(K/16)·2⁻²⁴·rms, far below it) and an element of
/// h = x·Aᵀ that the GPU and CPU round to neighbouring T values (one ulp of one of r terms
/// moves the LoRA part by about 2⁻⁸/√r of the row's scale for bf16). A wrong tile, a missed
/// mask or a misplaced nibble is off by the row's whole scale and fails by orders of magnitude.
/// For f32 output (the score head, f32 activations) only the summation order differs: 1e-5.
fn check(what: &str, got: &[f32], want: &[f32], n: usize, dtype: DType) {
    let eps = match dtype {
        DType::BF16 => 1.0 / 256.0,
        DType::F16 => 1.0 / 1024.0,
        DType::F32 => 1e-5,
    };
    check_eps(what, got, want, n, eps);
}

fn check_eps(what: &str, got: &[f32], want: &[f32], n: usize, eps: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut bad = Vec::new();
    let mut worst = 0f32;
    for (row, (g, w)) in got.chunks(n).zip(want.chunks(n)).enumerate() {
        let rms = (w.iter().map(|v| v * v).sum::<f32>() / n as f32).sqrt();
        for (j, (&g, &w)) in g.iter().zip(w).enumerate() {
            let tol = eps * (w.abs() + rms);
            let err = (g - w).abs();
            if err.is_nan() || err > tol {
                bad.push(format!("[{row}, {j}] got {g} want {w} (tol {tol:e})"));
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

/// Run the GPU linear op and return its output as f32 (asserting the output dtype).
fn run_gpu(
    x: &[f32],
    t: usize,
    k: usize,
    dtype: DType,
    weight: BaseWeight,
    lora: Option<Lora>,
    out: DType,
) -> Vec<f32> {
    let xg = gpu_tensor(x, &[t, k], dtype);
    let layer = Linear::new(weight, lora).unwrap();
    let y = linear(&xg, &layer).unwrap();
    assert_eq!(y.shape(), [t, layer.out_features()]);
    assert_eq!(y.dtype(), out, "output dtype");
    assert_eq!(y.device(), GPU);
    y.to_f32_vec().unwrap()
}

/// One NF4 case: a random weight quantised on the CPU, copied to the GPU, multiplied in every
/// activation type with and without the given LoRA rank.
fn nf4_case(
    dev: &Arc<CudaDevice>,
    (t, n, k): (usize, usize, usize),
    double: bool,
    ranks: &[usize],
    seed: u64,
) {
    let w = common::rand_vec(n * k, seed, 0.05);
    let q = Nf4Tensor::quantize(&CpuStorage::F32(w), &[n, k], double).unwrap();
    let deq = q.dequantize();
    let qd = Arc::new(q.to_device(dev).unwrap());
    for dtype in DTYPES {
        let x = round(&common::rand_vec(t * k, seed + 1, 1.0), dtype);
        let w_t = round(&deq, dtype);
        for &r in ranks {
            let lora = (r > 0).then(|| LoraHost::random(r, k, n, 16.0 / r as f32, seed + 2, dtype));
            let got = run_gpu(
                &x,
                t,
                k,
                dtype,
                BaseWeight::Nf4Cuda(qd.clone()),
                lora.as_ref().map(|l| l.on_gpu(k, n, dtype)),
                dtype,
            );
            let want = reference(&x, t, k, &w_t, n, lora.as_ref(), dtype);
            let what = format!(
                "NF4 {} [{t}x{k}]·[{n}x{k}]ᵀ double={double} r={r}",
                dtype.name()
            );
            check(&what, &got, &want, n, dtype);
        }
    }
}

#[test]
fn nf4_matmul_odd_shapes_match_cpu() {
    let Some(dev) = common::gpu("nf4_matmul_odd_shapes_match_cpu") else {
        return;
    };
    // (M, N, K): M and N off the 128 tile, K a multiple of 64 (tensor cores) or not (SIMT).
    let shapes = [
        (1, 1, 64),
        (1, 3, 192),
        (7, 77, 128),
        (64, 129, 1088),
        (129, 255, 320),
        (7, 333, 96),
        (129, 77, 160),
        (64, 129, 200),
        (1, 100, 200),
        (130, 131, 3592),
    ];
    for (i, &s) in shapes.iter().enumerate() {
        nf4_case(&dev, s, false, &[0], 100 + i as u64);
    }
}

#[test]
fn nf4_matmul_double_quant_matches_cpu() {
    let Some(dev) = common::gpu("nf4_matmul_double_quant_matches_cpu") else {
        return;
    };
    // More than 256 blocks, so several absmax2 groups; one shape on the SIMT path.
    for (i, &s) in [(129, 1000, 3584), (7, 4095, 1024), (64, 333, 1000)]
        .iter()
        .enumerate()
    {
        nf4_case(&dev, s, true, &[0], 200 + i as u64);
    }
}

#[test]
fn nf4_matmul_with_lora_matches_cpu() {
    let Some(dev) = common::gpu("nf4_matmul_with_lora_matches_cpu") else {
        return;
    };
    // Ranks 8/16/32 (and an odd 5) with scale 16/r; plain and double quant; K off 64 too.
    nf4_case(&dev, (129, 300, 1024), false, &[8, 16, 32, 5], 300);
    nf4_case(&dev, (7, 513, 3584), true, &[8, 32], 310);
    nf4_case(&dev, (64, 129, 160), false, &[16], 320);
    nf4_case(&dev, (1, 4096, 14336), true, &[32], 330);
}

#[test]
fn nf4_matmul_real_model_shapes_match_cpu() {
    let Some(dev) = common::gpu("nf4_matmul_real_model_shapes_match_cpu") else {
        return;
    };
    // Gemma-2-9B (hidden 3584: q 4096, k/v 2048, MLP 14336) and Llama-3.1-8B (hidden 4096:
    // k/v 1024, MLP 14336) projections, (M, N, K).
    type Case = ((usize, usize, usize), bool, &'static [usize]);
    let cases: [Case; 8] = [
        ((1536, 4096, 3584), false, &[0, 16]), // Gemma q_proj
        ((129, 2048, 3584), true, &[8]),       // Gemma k/v_proj
        ((64, 3584, 4096), false, &[0]),       // Gemma o_proj
        ((7, 14336, 3584), true, &[32]),       // Gemma gate/up_proj
        ((129, 3584, 14336), false, &[0]),     // Gemma down_proj
        ((1536, 1024, 4096), true, &[0, 32]),  // Llama k/v_proj
        ((1, 14336, 4096), false, &[0]),       // Llama gate/up_proj
        ((64, 4096, 14336), true, &[16]),      // Llama down_proj
    ];
    for (i, (shape, double, ranks)) in cases.into_iter().enumerate() {
        nf4_case(&dev, shape, double, ranks, 400 + i as u64);
    }
}

#[test]
fn nf4_matmul_is_close_to_the_unrounded_cpu_twin() {
    let Some(dev) = common::gpu("nf4_matmul_is_close_to_the_unrounded_cpu_twin") else {
        return;
    };
    // The CPU twin exactly as the model uses it (f32 weights, f32 h), fed the rounded x, A, B:
    // the GPU differs by the T roundings of the weight and of h as well.
    let (t, n, k, r) = (64, 515, 3584, 16);
    let w = common::rand_vec(n * k, 500, 0.05);
    let q = Nf4Tensor::quantize(&CpuStorage::F32(w), &[n, k], true).unwrap();
    let qd = Arc::new(q.to_device(&dev).unwrap());
    for dtype in DTYPES {
        let x = round(&common::rand_vec(t * k, 501, 1.0), dtype);
        let l = LoraHost::random(r, k, n, 2.0, 502, dtype);
        let got = run_gpu(
            &x,
            t,
            k,
            dtype,
            BaseWeight::Nf4Cuda(qd.clone()),
            Some(l.on_gpu(k, n, dtype)),
            dtype,
        );
        let twin = Linear::new(
            BaseWeight::Nf4(q.clone()),
            Some(Lora {
                a: Tensor::from_f32(l.a.clone(), &[r, k]).unwrap(),
                b: Tensor::from_f32(l.b.clone(), &[n, r]).unwrap(),
                scale: l.scale,
            }),
        )
        .unwrap();
        let want = linear(&Tensor::from_f32(x, &[t, k]).unwrap(), &twin)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        // 4× the bf16 bound: the weight and h roundings add about 2⁻⁹ of the row scale each.
        check_eps(
            &format!("NF4 vs unrounded twin, {}", dtype.name()),
            &got,
            &want,
            n,
            1.0 / 64.0,
        );
    }
}

/// One dense-T case: W rounded to T, with and without LoRA.
fn dense_case((t, n, k): (usize, usize, usize), ranks: &[usize], seed: u64) {
    for dtype in DTYPES {
        let w = round(&common::rand_vec(n * k, seed, 0.05), dtype);
        let wg = gpu_tensor(&w, &[n, k], dtype);
        let x = round(&common::rand_vec(t * k, seed + 1, 1.0), dtype);
        for &r in ranks {
            let lora = (r > 0).then(|| LoraHost::random(r, k, n, 0.75, seed + 2, dtype));
            let got = run_gpu(
                &x,
                t,
                k,
                dtype,
                BaseWeight::Dense(wg.clone()),
                lora.as_ref().map(|l| l.on_gpu(k, n, dtype)),
                dtype,
            );
            let want = reference(&x, t, k, &w, n, lora.as_ref(), dtype);
            check(
                &format!("dense {} [{t}x{k}]·[{n}x{k}]ᵀ r={r}", dtype.name()),
                &got,
                &want,
                n,
                dtype,
            );
        }
    }
}

#[test]
fn dense_matmul_matches_cpu() {
    let Some(_dev) = common::gpu("dense_matmul_matches_cpu") else {
        return;
    };
    // K % 8 == 0 runs on tensor cores (with a masked K tail when K % 32 != 0); odd K on SIMT.
    dense_case((1, 1, 8), &[0], 600);
    dense_case((7, 333, 96), &[0, 8], 601);
    dense_case((129, 77, 200), &[0, 16], 602);
    dense_case((64, 129, 201), &[0, 8], 603);
    dense_case((130, 257, 4095), &[0, 32], 604);
    dense_case((1536, 4096, 3584), &[0, 32], 605); // Gemma q_proj
    dense_case((7, 1024, 4096), &[16], 606); // Llama k/v_proj
    dense_case((1, 3584, 14336), &[0], 607); // Gemma down_proj
}

#[test]
fn score_head_f32_weight_gives_f32() {
    let Some(_dev) = common::gpu("score_head_f32_weight_gives_f32") else {
        return;
    };
    // The [3, hidden] classifier: f32 weight, activations in T, f32 output.
    for (i, &(t, k)) in [(1usize, 3584usize), (7, 4096), (64, 4097)]
        .iter()
        .enumerate()
    {
        let w = common::rand_vec(3 * k, 700 + i as u64, 0.05);
        let wg = Tensor::from_f32(w.clone(), &[3, k])
            .unwrap()
            .to_device(GPU)
            .unwrap();
        for dtype in DTYPES {
            let x = round(&common::rand_vec(t * k, 710 + i as u64, 1.0), dtype);
            let got = run_gpu(
                &x,
                t,
                k,
                dtype,
                BaseWeight::Dense(wg.clone()),
                None,
                DType::F32,
            );
            let want = cpu_matmul(&x, t, k, &w, 3);
            check(
                &format!("score head {} [{t}x{k}]", dtype.name()),
                &got,
                &want,
                3,
                DType::F32,
            );
            // With a LoRA too (not used by the models, but supported).
            let l = LoraHost::random(8, k, 3, 2.0, 720, dtype);
            let got = run_gpu(
                &x,
                t,
                k,
                dtype,
                BaseWeight::Dense(wg.clone()),
                Some(l.on_gpu(k, 3, dtype)),
                DType::F32,
            );
            let h = round(&cpu_matmul(&x, t, k, &l.a, 8), dtype);
            let up = cpu_matmul(&h, t, 8, &l.b, 3);
            let want: Vec<f32> = want.iter().zip(&up).map(|(y, u)| y + 2.0 * u).collect();
            // h is rounded to the activation dtype on both sides after different f32 summation
            // orders, so an element can land one ulp apart: judge at the activation dtype.
            check(
                &format!("score head + LoRA {} [{t}x{k}]", dtype.name()),
                &got,
                &want,
                3,
                dtype,
            );
        }
    }
}

#[test]
fn f32_activations_run_on_the_simt_kernels() {
    let Some(dev) = common::gpu("f32_activations_run_on_the_simt_kernels") else {
        return;
    };
    let (t, n, k) = (65, 130, 1024);
    let x = common::rand_vec(t * k, 800, 1.0);
    // NF4 weight (nothing rounded: T = f32).
    let w = common::rand_vec(n * k, 801, 0.05);
    let q = Nf4Tensor::quantize(&CpuStorage::F32(w.clone()), &[n, k], false).unwrap();
    let l = LoraHost::random(8, k, n, 2.0, 802, DType::F32);
    let got = run_gpu(
        &x,
        t,
        k,
        DType::F32,
        BaseWeight::Nf4Cuda(Arc::new(q.to_device(&dev).unwrap())),
        Some(l.on_gpu(k, n, DType::F32)),
        DType::F32,
    );
    let want = reference(&x, t, k, &q.dequantize(), n, Some(&l), DType::F32);
    check("NF4 f32", &got, &want, n, DType::F32);
    // Dense f32 weight with N > 64: an f32 GEMM.
    let got = run_gpu(
        &x,
        t,
        k,
        DType::F32,
        BaseWeight::Dense(
            Tensor::from_f32(w.clone(), &[n, k])
                .unwrap()
                .to_device(GPU)
                .unwrap(),
        ),
        None,
        DType::F32,
    );
    check(
        "dense f32",
        &got,
        &reference(&x, t, k, &w, n, None, DType::F32),
        n,
        DType::F32,
    );
}

// ------------------------------------------------------------------------------------------
// NF4 quantisation and dequantisation
// ------------------------------------------------------------------------------------------

/// The NF4 decision thresholds as src/quant/nf4.rs derives them (midpoints of the code,
/// printed shortest and parsed as f32).
fn thresholds() -> Vec<f32> {
    (0..15)
        .map(|i| {
            let mid = (NF4_CODE[i] as f64 + NF4_CODE[i + 1] as f64) / 2.0;
            format!("{mid}").parse::<f32>().unwrap()
        })
        .collect()
}

/// Test tensors for the quantiser: (name, shape, values).
fn quantiser_inputs() -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    // Odd size, an all-zero block in the middle, a partial last block.
    let mut v = common::rand_vec(131, 900, 2.0);
    v[64..128].fill(0.0);
    out.push(("zero block, 131", vec![131], v));
    // Values exactly on, just above and just below every threshold (absmax 1), then the same
    // pattern scaled by 3.7 (the scaled values land near, not on, the thresholds).
    let mut on = vec![1.0f32];
    for t in thresholds() {
        on.extend([t, t.next_up(), t.next_down(), -t]);
    }
    on.extend(NF4_CODE);
    let scaled: Vec<f32> = on.iter().map(|v| v * 3.7).collect();
    out.push(("on thresholds", vec![on.len()], on));
    out.push(("thresholds x3.7", vec![scaled.len()], scaled));
    out.push(("one element", vec![1], vec![-0.25]));
    out.push(("63", vec![63], common::rand_vec(63, 901, 1.0)));
    out.push(("65 zeros", vec![65], vec![0.0; 65]));
    out.push((
        "333x777",
        vec![333, 777],
        common::rand_vec(333 * 777, 902, 0.1),
    ));
    out.push((
        "1000x3584",
        vec![1000, 3584],
        common::rand_vec(1000 * 3584, 903, 0.03),
    ));
    out
}

fn download_f32(b: &engine::cuda::CudaBuffer) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(&b.download().unwrap())
}

fn assert_same_nf4(what: &str, gpu: &Nf4Device, cpu: &Nf4Tensor) {
    assert_eq!(gpu.shape, cpu.shape, "{what}: shape");
    assert_eq!(
        gpu.packed.download().unwrap(),
        cpu.packed,
        "{what}: packed codes"
    );
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    match (&gpu.absmax, &cpu.absmax) {
        (DeviceAbsmax::Plain(g), Absmax::Plain(c)) => {
            assert_eq!(bits(&download_f32(g)), bits(c), "{what}: absmax")
        }
        (
            DeviceAbsmax::Double {
                q: gq,
                absmax2: ga2,
                offset: go,
                code: gc,
            },
            Absmax::Double {
                q,
                absmax2,
                offset,
                code,
            },
        ) => {
            assert_eq!(&gq.download().unwrap(), q, "{what}: absmax q");
            assert_eq!(bits(&download_f32(ga2)), bits(absmax2), "{what}: absmax2");
            assert_eq!(go.to_bits(), offset.to_bits(), "{what}: offset");
            assert_eq!(bits(&download_f32(gc)), bits(&code[..]), "{what}: code");
        }
        _ => panic!("{what}: plain vs double absmax"),
    }
}

#[test]
fn quantize_nf4_is_bit_identical_to_cpu() {
    let Some(_dev) = common::gpu("quantize_nf4_is_bit_identical_to_cpu") else {
        return;
    };
    for (name, shape, values) in quantiser_inputs() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let host = CpuStorage::F32(values.clone()).to_dtype(dtype);
            let t = Tensor::from_cpu(host.clone(), &shape)
                .unwrap()
                .to_device(GPU)
                .unwrap();
            for double in [false, true] {
                let cpu = Nf4Tensor::quantize(&host, &shape, double).unwrap();
                let gpu = quantize_nf4(&t, double).unwrap();
                assert_same_nf4(
                    &format!("{name} {} double={double}", dtype.name()),
                    &gpu,
                    &cpu,
                );
            }
        }
    }
}

#[test]
fn dequantize_nf4_is_exact() {
    let Some(dev) = common::gpu("dequantize_nf4_is_exact") else {
        return;
    };
    for (name, shape, values) in quantiser_inputs() {
        for double in [false, true] {
            let cpu =
                Nf4Tensor::quantize(&CpuStorage::F32(values.clone()), &shape, double).unwrap();
            let want = cpu.dequantize();
            let gpu = cpu.to_device(&dev).unwrap();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let got = dequantize_nf4(&gpu, dtype).unwrap();
                assert_eq!(got.shape(), &shape[..]);
                assert_eq!(got.dtype(), dtype);
                let got: Vec<u32> = got
                    .to_f32_vec()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                let want: Vec<u32> = round(&want, dtype).iter().map(|x| x.to_bits()).collect();
                assert_eq!(got, want, "{name} double={double} {}", dtype.name());
            }
        }
    }
}

#[test]
fn gpu_quantised_weights_multiply_like_cpu_quantised_ones() {
    let Some(_dev) = common::gpu("gpu_quantised_weights_multiply_like_cpu_quantised_ones") else {
        return;
    };
    // The load path on the GPU: quantise there, then multiply.
    let (t, n, k) = (129, 2048, 3584);
    let w = common::rand_vec(n * k, 950, 0.05);
    let cpu = Nf4Tensor::quantize(&CpuStorage::F32(w.clone()), &[n, k], true).unwrap();
    let gpu = quantize_nf4(&gpu_tensor(&w, &[n, k], DType::F32), true).unwrap();
    assert_same_nf4("2048x3584", &gpu, &cpu);
    let dtype = DType::F16;
    let x = round(&common::rand_vec(t * k, 951, 1.0), dtype);
    let got = run_gpu(
        &x,
        t,
        k,
        dtype,
        BaseWeight::Nf4Cuda(Arc::new(gpu)),
        None,
        dtype,
    );
    check(
        "GPU-quantised NF4",
        &got,
        &reference(&x, t, k, &round(&cpu.dequantize(), dtype), n, None, dtype),
        n,
        dtype,
    );
}

/// CPU only: the test's oracle. [`reference`] in f32 (nothing rounded) is the CPU twin itself:
/// an NF4 base plus LoRA through `linear` agrees with the pieces [`reference`] composes.
#[test]
fn reference_composes_the_cpu_twin() {
    let (t, n, k, r) = (9, 70, 192, 8);
    let x = common::rand_vec(t * k, 990, 1.0);
    let w = common::rand_vec(n * k, 991, 0.05);
    let q = Nf4Tensor::quantize(&CpuStorage::F32(w), &[n, k], true).unwrap();
    let l = LoraHost::random(r, k, n, 2.0, 992, DType::F32);
    let twin = Linear::new(
        BaseWeight::Nf4(q.clone()),
        Some(Lora {
            a: Tensor::from_f32(l.a.clone(), &[r, k]).unwrap(),
            b: Tensor::from_f32(l.b.clone(), &[n, r]).unwrap(),
            scale: l.scale,
        }),
    )
    .unwrap();
    let want = linear(&Tensor::from_f32(x.clone(), &[t, k]).unwrap(), &twin)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let got = reference(&x, t, k, &q.dequantize(), n, Some(&l), DType::F32);
    check("reference vs twin", &got, &want, n, DType::F32);
    // The tolerance catches a real error: one wrong weight row changes a column.
    let mut w_bad = q.dequantize();
    w_bad[5 * k..6 * k].iter_mut().for_each(|v| *v = -*v);
    let bad = reference(&x, t, k, &w_bad, n, Some(&l), DType::F32);
    assert!(std::panic::catch_unwind(|| check("bad", &bad, &want, n, DType::BF16)).is_err());
}
