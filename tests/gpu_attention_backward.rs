//! The attention backward on the GPU against its CPU twin (`attention_backward` in
//! `src/ops/attention/cpu.rs`), and the CPU twin against a naive f64 implementation written
//! here, so the oracle itself is checked (that test runs everywhere).
//!
//! Every GPU case draws fresh inputs (its own seed), rounds q, k, v and the upstream gradient
//! dout on the host to the GPU dtype and runs the CPU twin (f32) on the rounded values, so only
//! the kernels' arithmetic differs. q and k are uniform in [-2.5, 2.5) (with scale =
//! head_dim^-0.5 the logits have a standard deviation of about 2: peaked attention), v and dout
//! in [-1, 1). Outputs start as NaN (poison mode), so an element a kernel fails to write fails
//! the test. Each case runs the GPU backward twice — recomputing the forward
//! (`attention_backward`) and reusing the forward's output and log-sum-exp
//! (`attention_forward_lse` + `attention_backward_saved`) — and the two must agree bit for bit:
//! the kernels are deterministic and the recompute runs the same forward kernel.
//!
//! Tolerance: |gpu − cpu| ≤ tol · max(max|cpu|, 0.01) + tol · |cpu|, per gradient tensor.
//! Gradients are sums of many terms of both signs (Σ_j dS_ij = 0 for every query), so an
//! element can be much smaller than the terms it sums: the error is measured against the
//! tensor's largest element, not the element itself. (The floor 0.01 covers tensors that are
//! exactly zero: with a window of 1 every query sees only itself, p = 1 and dS = 0, and the
//! kernels leave a residue of ~1e-7 from dP − D cancelling.)
//! - bf16: tol = 2e-2. bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3). The
//!   kernels round P (for dV = Pᵀ·dO) and dS (for dQ = dS·K and dK = dSᵀ·Q) to bf16 before the
//!   tensor-core products, take D = rowsum(dO ⊙ O) from the bf16 forward output O, and round
//!   each gradient once at the end; accumulation is f32 (order differs from the CPU's:
//!   ~1e-6). Each of these is ≤ 2^-9 of the terms; a bit-faithful host emulation of the kernels
//!   (every variant, rows up to 1000, the Gemma-2 and Llama shapes) stayed below 5.3e-3 of
//!   max|cpu|, so 2e-2 leaves a margin of about 4x.
//! - f16: tol = 5e-3. f16 keeps 11 significant bits (2^-12 ≈ 2.4e-4): the same roundings are
//!   8x smaller; the emulation stayed below 7e-4, a margin of about 7x. (dout is of order 1
//!   here. With upstream gradients of order 1e-3 the emulation's rms error doubled while its
//!   maximum stayed put: dS nears f16's subnormal range, where it loses relative precision —
//!   f16 training needs loss scaling, as everywhere.)
//! - f32 (generic kernels, exact expf/tanhf, no rounding of P or dS): 1e-4, f32 summation
//!   order only.

mod common;

use engine::ops::SeqLayout;
use engine::ops::attention::{
    AttentionParams, attention_backward, attention_backward_saved, attention_forward_lse,
};
use engine::tensor::{CpuStorage, DType, Device, Tensor};

/// One attention problem: row lengths, heads and options.
#[derive(Clone, Debug)]
struct Case {
    lens: Vec<usize>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// `None`: head_dim^-0.5.
    scale: Option<f32>,
    softcap: Option<f32>,
    window: Option<usize>,
}

impl Case {
    fn new(lens: &[usize], n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        Case {
            lens: lens.to_vec(),
            n_heads,
            n_kv_heads,
            head_dim,
            scale: None,
            softcap: None,
            window: None,
        }
    }

    fn softcap(mut self, cap: Option<f32>) -> Self {
        self.softcap = cap;
        self
    }

    fn window(mut self, w: Option<usize>) -> Self {
        self.window = w;
        self
    }

    fn scale(mut self, s: f32) -> Self {
        self.scale = Some(s);
        self
    }

    fn params(&self) -> AttentionParams {
        AttentionParams {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            scale: self.scale.unwrap_or((self.head_dim as f32).powf(-0.5)),
            softcap: self.softcap,
            window: self.window,
        }
    }
}

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 2e-2,
        DType::F16 => 5e-3,
        DType::F32 => 1e-4,
    }
}

/// `v` rounded to `dtype` (round to nearest even), back in f32.
fn round_to(v: Vec<f32>, dtype: DType) -> Vec<f32> {
    CpuStorage::F32(v).to_dtype(dtype).to_f32_vec()
}

/// |got − want| ≤ tol · max(max|want|, 0.01) + tol · |want| elementwise (see the file comment).
fn assert_grad_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let scale = want.iter().fold(0.01f32, |m, x| m.max(x.abs()));
    common::assert_close(what, got, want, tol * scale, tol);
}

/// The inputs of one case: q, k, v, dout rounded to `dtype`.
fn inputs(case: &Case, dtype: DType, seed: u64) -> [Vec<f32>; 4] {
    let t: usize = case.lens.iter().sum();
    let (qw, kw) = (
        case.n_heads * case.head_dim,
        case.n_kv_heads * case.head_dim,
    );
    [
        round_to(common::rand_vec(t * qw, seed, 2.5), dtype),
        round_to(
            common::rand_vec(t * kw, seed.wrapping_add(1_000_003), 2.5),
            dtype,
        ),
        round_to(
            common::rand_vec(t * kw, seed.wrapping_add(2_000_003), 1.0),
            dtype,
        ),
        round_to(
            common::rand_vec(t * qw, seed.wrapping_add(3_000_003), 1.0),
            dtype,
        ),
    ]
}

/// Run `case` in `dtype` on GPU 0 (recomputing and with a saved forward) and on the CPU twin,
/// and compare.
fn check(case: &Case, dtype: DType, seed: u64) {
    let layout = SeqLayout::from_lens(&case.lens);
    let t = layout.total_tokens();
    let p = case.params();
    let (qw, kw) = (
        case.n_heads * case.head_dim,
        case.n_kv_heads * case.head_dim,
    );
    let [q, k, v, dout] = inputs(case, dtype, seed);
    let cpu = |x: &[f32], w: usize| Tensor::from_f32(x.to_vec(), &[t, w]).unwrap();
    let want = attention_backward(
        &cpu(&q, qw),
        &cpu(&k, kw),
        &cpu(&v, kw),
        &cpu(&dout, qw),
        &layout,
        &p,
    )
    .unwrap();
    let gpu = |x: &[f32], w: usize| {
        cpu(x, w)
            .to_dtype(dtype)
            .unwrap()
            .to_device(Device::Cuda(0))
            .unwrap()
    };
    let (gq, gk, gv, gd) = (gpu(&q, qw), gpu(&k, kw), gpu(&v, kw), gpu(&dout, qw));
    let what = format!("{case:?} {}", dtype.name());
    let recomputed = attention_backward(&gq, &gk, &gv, &gd, &layout, &p)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let saved = attention_forward_lse(&gq, &gk, &gv, &layout, &p)
        .unwrap_or_else(|e| panic!("{what}: forward: {e}"));
    assert_eq!(
        saved.lse.as_ref().map(|l| l.shape().to_vec()),
        Some(vec![t, case.n_heads]),
        "{what}: the GPU forward keeps its log-sum-exp"
    );
    let reused = attention_backward_saved(&gq, &gk, &gv, &gd, &saved, &layout, &p)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let tol = tolerance(dtype);
    for (name, r, s, w, width) in [
        ("dq", &recomputed.0, &reused.0, &want.0, qw),
        ("dk", &recomputed.1, &reused.1, &want.1, kw),
        ("dv", &recomputed.2, &reused.2, &want.2, kw),
    ] {
        for g in [r, s] {
            assert_eq!(g.shape(), &[t, width], "{what} {name}");
            assert_eq!(g.dtype(), dtype, "{what} {name}");
            assert_eq!(g.device(), Device::Cuda(0), "{what} {name}");
        }
        let (r, s) = (r.to_f32_vec().unwrap(), s.to_f32_vec().unwrap());
        assert_grad_close(
            &format!("{what} {name}"),
            &r,
            w.as_f32_slice().unwrap(),
            tol,
        );
        assert!(
            r.iter().zip(&s).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what} {name}: the saved-forward backward differs from the recomputing one"
        );
    }
}

/// `check` in every dtype of `dtypes`, each with its own seed.
fn check_all(case: &Case, dtypes: &[DType], seed: &mut u64) {
    for &dtype in dtypes {
        *seed += 1;
        check(case, dtype, *seed);
    }
}

const HALF: &[DType] = &[DType::BF16, DType::F16];

#[test]
fn gpu_attention_backward_small_head_dims() {
    // The tiny test models (head_dim 16, 24, 32): the generic kernels, every dtype.
    let Some(_dev) = common::gpu("gpu_attention_backward_small_head_dims") else {
        return;
    };
    let mut seed = 11_000;
    for d in [16, 24, 32] {
        for (nh, nkv) in [(2, 2), (4, 2), (4, 1)] {
            for (cap, w) in [
                (None, None),
                (Some(3.0), None),
                (None, Some(5)),
                (Some(3.0), Some(64)),
            ] {
                let case = Case::new(&[1, 2, 17, 63, 64, 65], nh, nkv, d)
                    .softcap(cap)
                    .window(w);
                check_all(&case, &[DType::BF16, DType::F16, DType::F32], &mut seed);
            }
        }
    }
}

#[test]
fn gpu_attention_backward_odd_row_lengths() {
    // Single rows of awkward lengths around the 16/32/64-token tiles, at the tensor-core
    // head_dims.
    let Some(_dev) = common::gpu("gpu_attention_backward_odd_row_lengths") else {
        return;
    };
    let mut seed = 12_000;
    for len in [1, 2, 17, 63, 64, 65, 200, 1000] {
        for d in [64, 128, 256] {
            check_all(&Case::new(&[len], 2, 1, d), HALF, &mut seed);
        }
    }
}

#[test]
fn gpu_attention_backward_packed_rows_gqa() {
    // Several rows of different lengths in one batch, GQA ratios 1, 2 and 4 (dK/dV summed over
    // the query heads that share a KV head).
    let Some(_dev) = common::gpu("gpu_attention_backward_packed_rows_gqa") else {
        return;
    };
    let mut seed = 13_000;
    let lens = [65, 1, 200, 64, 17, 130, 2];
    for d in [64, 128, 256] {
        for (nh, nkv) in [(2, 2), (4, 2), (8, 2)] {
            check_all(&Case::new(&lens, nh, nkv, d), HALF, &mut seed);
        }
    }
}

#[test]
fn gpu_attention_backward_softcap_and_windows() {
    // Windows smaller and larger than the tiles and than the rows, with and without a soft-cap
    // (3.0 bends the logits, 50.0 is Gemma-2's).
    let Some(_dev) = common::gpu("gpu_attention_backward_softcap_and_windows") else {
        return;
    };
    let mut seed = 14_000;
    let lens = [300, 45, 129];
    for d in [64, 128, 256] {
        for w in [None, Some(1), Some(7), Some(64), Some(65), Some(4096)] {
            for cap in [None, Some(3.0), Some(50.0)] {
                check_all(
                    &Case::new(&lens, 4, 2, d).softcap(cap).window(w),
                    HALF,
                    &mut seed,
                );
            }
        }
    }
}

#[test]
fn gpu_attention_backward_f32() {
    // f32 runs the generic kernels at every head_dim, tightly.
    let Some(_dev) = common::gpu("gpu_attention_backward_f32") else {
        return;
    };
    let mut seed = 15_000;
    for d in [8, 40, 64, 128, 256] {
        for (cap, w) in [(None, None), (Some(3.0), Some(33))] {
            check_all(
                &Case::new(&[1, 70, 150], 4, 2, d).softcap(cap).window(w),
                &[DType::F32],
                &mut seed,
            );
        }
    }
}

#[test]
fn gpu_attention_backward_empty_rows_and_batches() {
    // Rows of length 0 between others, and a batch with no tokens at all.
    let Some(_dev) = common::gpu("gpu_attention_backward_empty_rows_and_batches") else {
        return;
    };
    let mut seed = 16_000;
    for d in [24, 64, 256] {
        check_all(&Case::new(&[0, 5, 0, 66, 0], 2, 1, d), HALF, &mut seed);
        check_all(&Case::new(&[], 2, 1, d), HALF, &mut seed);
    }
}

#[test]
fn gpu_attention_backward_gemma2_9b_heads() {
    // Gemma-2-9B: 16 query / 8 KV heads of 256, scale query_pre_attn_scalar^-0.5 = 1/16,
    // soft-cap 50, window 4096 on sliding layers (and a window shorter than the rows); rows of
    // 2703 tokens in all.
    let Some(_dev) = common::gpu("gpu_attention_backward_gemma2_9b_heads") else {
        return;
    };
    let mut seed = 17_000;
    for w in [None, Some(4096), Some(700)] {
        let case = Case::new(&[1100, 700, 3, 900], 16, 8, 256)
            .scale(1.0 / 16.0)
            .softcap(Some(50.0))
            .window(w);
        check_all(&case, HALF, &mut seed);
    }
}

#[test]
fn gpu_attention_backward_llama31_8b_heads() {
    // Llama-3.1-8B: 32 query / 8 KV heads of 128, scale 128^-0.5, no cap, no window; 2551
    // tokens.
    let Some(_dev) = common::gpu("gpu_attention_backward_llama31_8b_heads") else {
        return;
    };
    let mut seed = 18_000;
    check_all(
        &Case::new(&[1500, 400, 1, 650], 32, 8, 128),
        HALF,
        &mut seed,
    );
}

#[test]
fn gpu_attention_backward_is_deterministic() {
    // No atomics: two runs on the same inputs agree bit for bit.
    let Some(_dev) = common::gpu("gpu_attention_backward_is_deterministic") else {
        return;
    };
    let case = Case::new(&[300, 45, 129], 8, 2, 128).softcap(Some(50.0));
    for dtype in [DType::BF16, DType::F16] {
        let layout = SeqLayout::from_lens(&case.lens);
        let t = layout.total_tokens();
        let p = case.params();
        let [q, k, v, dout] = inputs(&case, dtype, 19_000);
        let gpu = |x: &[f32], w: usize| {
            Tensor::from_f32(x.to_vec(), &[t, w])
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_device(Device::Cuda(0))
                .unwrap()
        };
        let (qw, kw) = (8 * 128, 2 * 128);
        let (gq, gk, gv, gd) = (gpu(&q, qw), gpu(&k, kw), gpu(&v, kw), gpu(&dout, qw));
        let run = || {
            let (dq, dk, dv) = attention_backward(&gq, &gk, &gv, &gd, &layout, &p).unwrap();
            [dq, dk, dv].map(|x| x.to_f32_vec().unwrap())
        };
        let (a, b) = (run(), run());
        for (x, y) in a.iter().zip(&b) {
            assert!(x.iter().zip(y).all(|(s, t)| s.to_bits() == t.to_bits()));
        }
    }
}

#[test]
fn gpu_attention_backward_rejects_bad_inputs() {
    let Some(_dev) = common::gpu("gpu_attention_backward_rejects_bad_inputs") else {
        return;
    };
    let layout = SeqLayout::from_lens(&[3]);
    let on_gpu = |dtype: DType, rows: usize, w: usize| {
        Tensor::from_f32(vec![0.5; rows * w], &[rows, w])
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(Device::Cuda(0))
            .unwrap()
    };
    let p = Case::new(&[3], 2, 1, 64).params();
    let (q, k, v) = (
        on_gpu(DType::BF16, 3, 128),
        on_gpu(DType::BF16, 3, 64),
        on_gpu(DType::BF16, 3, 64),
    );
    // dout in another dtype.
    let e = attention_backward(&q, &k, &v, &on_gpu(DType::F16, 3, 128), &layout, &p).unwrap_err();
    assert!(e.to_string().contains("dout"), "{e}");
    // dout of the wrong shape.
    let e = attention_backward(&q, &k, &v, &on_gpu(DType::BF16, 3, 64), &layout, &p).unwrap_err();
    assert!(e.to_string().contains("dout"), "{e}");
    // A saved forward of another problem.
    let mut saved = attention_forward_lse(&q, &k, &v, &layout, &p).unwrap();
    saved.lse = Some(on_gpu(DType::F32, 3, 3));
    let dout = on_gpu(DType::BF16, 3, 128);
    let e = attention_backward_saved(&q, &k, &v, &dout, &saved, &layout, &p).unwrap_err();
    assert!(e.to_string().contains("log-sum-exp"), "{e}");
    // head_dim beyond the kernels.
    let p = Case::new(&[3], 1, 1, 512).params();
    let x = on_gpu(DType::BF16, 3, 512);
    let e = attention_backward(&x, &x, &x, &x, &layout, &p).unwrap_err();
    assert!(e.to_string().contains("head_dim"), "{e}");
}

/// Attention gradients in f64, straight from the definition: per (row, query head) the full
/// visible-key matrix, `P = softmax(s)`, `dV += Pᵀ·dO`, `dP = dO·Vᵀ`,
/// `dS = P ⊙ (dP − rowsum(P ⊙ dP))`, times `1 − tanh²(u/cap)` under a cap,
/// `dQ = scale·dS·K`, `dK += scale·dSᵀ·Q`.
fn naive_backward_f64(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    layout: &SeqLayout,
    p: &AttentionParams,
) -> [Vec<f64>; 3] {
    let d = p.head_dim;
    let (qw, kw) = (p.n_heads * d, p.n_kv_heads * d);
    let group = p.n_heads / p.n_kv_heads;
    let t = layout.total_tokens();
    let (mut dq, mut dk, mut dv) = (vec![0f64; t * qw], vec![0f64; t * kw], vec![0f64; t * kw]);
    let dot = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| x as f64 * y as f64)
            .sum::<f64>()
    };
    for r in 0..layout.rows() {
        let start = layout.range(r).start;
        for h in 0..p.n_heads {
            let kvh = h / group;
            let qi = |i: usize| &q[(start + i) * qw + h * d..][..d];
            let doi = |i: usize| &dout[(start + i) * qw + h * d..][..d];
            let kj = |j: usize| &k[(start + j) * kw + kvh * d..][..d];
            let vj = |j: usize| &v[(start + j) * kw + kvh * d..][..d];
            for i in 0..layout.len(r) {
                let lo = p.window.map_or(0, |w| (i + 1).saturating_sub(w));
                let keys: Vec<usize> = (lo..=i).collect();
                // u = scale·q·k, s = cap·tanh(u/cap) (or u), P = softmax(s).
                let u: Vec<f64> = keys
                    .iter()
                    .map(|&j| dot(qi(i), kj(j)) * p.scale as f64)
                    .collect();
                let s: Vec<f64> = u
                    .iter()
                    .map(|&u| match p.softcap {
                        Some(c) => c as f64 * (u / c as f64).tanh(),
                        None => u,
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                let prob: Vec<f64> = e.iter().map(|x| x / sum).collect();
                let dp: Vec<f64> = keys.iter().map(|&j| dot(doi(i), vj(j))).collect();
                let row_dot: f64 = prob.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (jj, &j) in keys.iter().enumerate() {
                    let mut ds = prob[jj] * (dp[jj] - row_dot);
                    if let Some(c) = p.softcap {
                        let th = (u[jj] / c as f64).tanh();
                        ds *= 1.0 - th * th;
                    }
                    let g = ds * p.scale as f64;
                    for x in 0..d {
                        dv[(start + j) * kw + kvh * d + x] += prob[jj] * doi(i)[x] as f64;
                        dq[(start + i) * qw + h * d + x] += g * kj(j)[x] as f64;
                        dk[(start + j) * kw + kvh * d + x] += g * qi(i)[x] as f64;
                    }
                }
            }
        }
    }
    [dq, dk, dv]
}

#[test]
fn cpu_attention_backward_matches_naive_f64() {
    // The oracle of the GPU tests, checked against the definition (runs everywhere): small
    // shapes, several rows (one empty), GQA 1/2/4, windows (1: every query sees only itself,
    // dQ = dK = 0), soft-caps and scales. f32 arithmetic with the twin's own exp/tanh on
    // gradients of order 1: errors stay near 1e-6 of the largest element; 5e-5 (same form as
    // the GPU tolerance) leaves room for other CPUs' code paths and summation orders.
    let mut seed = 20_000;
    let cases = [
        Case::new(&[1, 2, 17, 63, 64, 65, 130], 4, 2, 16),
        Case::new(&[70, 3, 129], 4, 1, 24).window(Some(5)),
        Case::new(&[200, 1, 66], 2, 2, 32)
            .softcap(Some(3.0))
            .window(Some(64)),
        Case::new(&[150, 40], 4, 2, 64)
            .softcap(Some(50.0))
            .window(Some(100))
            .scale(0.1),
        Case::new(&[90, 0, 33], 8, 2, 8)
            .softcap(Some(1.5))
            .window(Some(1)),
        Case::new(&[100], 2, 1, 16).window(Some(1000)),
        Case::new(&[65, 65], 4, 4, 20)
            .softcap(Some(3.0))
            .window(Some(7)),
    ];
    for case in &cases {
        seed += 1;
        let layout = SeqLayout::from_lens(&case.lens);
        let t = layout.total_tokens();
        let p = case.params();
        let (qw, kw) = (
            case.n_heads * case.head_dim,
            case.n_kv_heads * case.head_dim,
        );
        let [q, k, v, dout] = inputs(case, DType::F32, seed);
        let cpu = |x: &[f32], w: usize| Tensor::from_f32(x.to_vec(), &[t, w]).unwrap();
        let got = attention_backward(
            &cpu(&q, qw),
            &cpu(&k, kw),
            &cpu(&v, kw),
            &cpu(&dout, qw),
            &layout,
            &p,
        )
        .unwrap();
        let want = naive_backward_f64(&q, &k, &v, &dout, &layout, &p);
        for (name, g, w) in [
            ("dq", &got.0, &want[0]),
            ("dk", &got.1, &want[1]),
            ("dv", &got.2, &want[2]),
        ] {
            let w: Vec<f32> = w.iter().map(|&x| x as f32).collect();
            assert_grad_close(
                &format!("{case:?} {name}"),
                g.as_f32_slice().unwrap(),
                &w,
                5e-5,
            );
        }
        // The CPU forward keeps no log-sum-exp, and its backward ignores the saved forward.
        let saved =
            attention_forward_lse(&cpu(&q, qw), &cpu(&k, kw), &cpu(&v, kw), &layout, &p).unwrap();
        assert!(saved.lse.is_none());
        let again = attention_backward_saved(
            &cpu(&q, qw),
            &cpu(&k, kw),
            &cpu(&v, kw),
            &cpu(&dout, qw),
            &saved,
            &layout,
            &p,
        )
        .unwrap();
        assert_eq!(
            again.0.as_f32_slice().unwrap(),
            got.0.as_f32_slice().unwrap()
        );
    }
}
