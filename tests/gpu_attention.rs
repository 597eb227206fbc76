//! Attention on the GPU against its CPU twin (`src/ops/attention/cpu.rs`), and the CPU twin
//! against a naive f64 implementation written here, so the oracle itself is checked.
//!
//! Every GPU case draws fresh inputs (its own seed), rounds them on the host to the GPU dtype
//! and runs the CPU twin (f32) on the rounded values, so only the kernel's arithmetic differs.
//! Inputs are uniform in [-2.5, 2.5) for q and k, so with scale = head_dim^-0.5 the logits have
//! a standard deviation of about 2 (peaked, not uniform, attention), and in [-1, 1) for v.
//! Outputs start as NaN (poison mode), so an element a kernel fails to write fails the test.
//!
//! Tolerance (|gpu - cpu| <= atol + rtol |cpu|):
//! - bf16: atol = rtol = 2e-2. bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3).
//!   The kernel rounds the probabilities to bf16 before P·V (error up to 2e-3 of each weight,
//!   so up to ~2e-3 of max|v| on the output) and rounds the output once (2e-3 relative); the
//!   f32 accumulations differ from the CPU's only in order (~1e-6). 2e-2 leaves a margin of
//!   about 5x over those bounds.
//! - f16: atol = rtol = 5e-3. f16 keeps 11 significant bits (2^-12 ~ 2.4e-4): the same two
//!   roundings are ~10x smaller than bf16's, and 5e-3 keeps a similar margin.
//! - f32 (generic kernel, exact expf/tanhf, no rounding of p): 1e-4, f32 summation order and
//!   the CPU twin's vectorised exp/tanh (~1e-6 relative) only.

mod common;

use engine::ops::SeqLayout;
use engine::ops::attention::{AttentionParams, attention};
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

/// Run `case` in `dtype` on GPU 0 and on the CPU twin and compare.
fn check(case: &Case, dtype: DType, seed: u64) {
    let layout = SeqLayout::from_lens(&case.lens);
    let t = layout.total_tokens();
    let p = case.params();
    let (qw, kw) = (
        case.n_heads * case.head_dim,
        case.n_kv_heads * case.head_dim,
    );
    let q = round_to(common::rand_vec(t * qw, seed, 2.5), dtype);
    let k = round_to(
        common::rand_vec(t * kw, seed.wrapping_add(1_000_003), 2.5),
        dtype,
    );
    let v = round_to(
        common::rand_vec(t * kw, seed.wrapping_add(2_000_003), 1.0),
        dtype,
    );
    let cpu = |x: &[f32], w: usize| Tensor::from_f32(x.to_vec(), &[t, w]).unwrap();
    let want = attention(&cpu(&q, qw), &cpu(&k, kw), &cpu(&v, kw), &layout, &p).unwrap();
    let gpu = |x: &[f32], w: usize| {
        cpu(x, w)
            .to_dtype(dtype)
            .unwrap()
            .to_device(Device::Cuda(0))
            .unwrap()
    };
    let got = attention(&gpu(&q, qw), &gpu(&k, kw), &gpu(&v, kw), &layout, &p)
        .unwrap_or_else(|e| panic!("{case:?} {}: {e}", dtype.name()));
    assert_eq!(got.shape(), &[t, qw]);
    assert_eq!(got.dtype(), dtype);
    assert_eq!(got.device(), Device::Cuda(0));
    let tol = tolerance(dtype);
    common::assert_close(
        &format!("{case:?} {}", dtype.name()),
        &got.to_f32_vec().unwrap(),
        want.as_f32_slice().unwrap(),
        tol,
        tol,
    );
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
fn gpu_attention_small_head_dims() {
    // The tiny test models (head_dim 16, 24, 32): the generic kernel, every dtype.
    let Some(_dev) = common::gpu("gpu_attention_small_head_dims") else {
        return;
    };
    let mut seed = 1_000;
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
fn gpu_attention_odd_row_lengths() {
    // Single rows of awkward lengths around the 64-query / 64-key tiles, at the tensor-core
    // head_dims.
    let Some(_dev) = common::gpu("gpu_attention_odd_row_lengths") else {
        return;
    };
    let mut seed = 2_000;
    for len in [1, 2, 17, 63, 64, 65, 200, 1000] {
        for d in [64, 128, 256] {
            check_all(&Case::new(&[len], 2, 1, d), HALF, &mut seed);
        }
    }
}

#[test]
fn gpu_attention_packed_rows_gqa() {
    // Several rows of different lengths in one batch, GQA ratios 1, 2 and 4.
    let Some(_dev) = common::gpu("gpu_attention_packed_rows_gqa") else {
        return;
    };
    let mut seed = 3_000;
    let lens = [65, 1, 200, 64, 17, 130, 2];
    for d in [64, 128, 256] {
        for (nh, nkv) in [(2, 2), (4, 2), (8, 2)] {
            check_all(&Case::new(&lens, nh, nkv, d), HALF, &mut seed);
        }
    }
}

#[test]
fn gpu_attention_softcap_and_windows() {
    // Windows smaller and larger than the 64-token tiles and than the rows, with and without
    // a soft-cap (3.0 bends the logits, 50.0 is Gemma-2's).
    let Some(_dev) = common::gpu("gpu_attention_softcap_and_windows") else {
        return;
    };
    let mut seed = 4_000;
    let lens = [300, 45, 129];
    for d in [64, 128, 256] {
        for w in [
            None,
            Some(1),
            Some(7),
            Some(32),
            Some(64),
            Some(65),
            Some(100),
            Some(200),
            Some(5000),
        ] {
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
fn gpu_attention_f32() {
    // f32 runs the generic kernel at every head_dim, tightly.
    let Some(_dev) = common::gpu("gpu_attention_f32") else {
        return;
    };
    let mut seed = 5_000;
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
fn gpu_attention_empty_rows_and_batches() {
    // Rows of length 0 between others, and a batch with no tokens at all.
    let Some(_dev) = common::gpu("gpu_attention_empty_rows_and_batches") else {
        return;
    };
    let mut seed = 6_000;
    for d in [24, 64, 256] {
        check_all(&Case::new(&[0, 5, 0, 66, 0], 2, 1, d), HALF, &mut seed);
        check_all(&Case::new(&[], 2, 1, d), HALF, &mut seed);
    }
}

#[test]
fn gpu_attention_gemma2_9b_heads() {
    // Gemma-2-9B: 16 query / 8 KV heads of 256, scale query_pre_attn_scalar^-0.5 = 1/16,
    // soft-cap 50, window 4096 on sliding layers (and a window shorter than the rows).
    let Some(_dev) = common::gpu("gpu_attention_gemma2_9b_heads") else {
        return;
    };
    let mut seed = 7_000;
    for w in [None, Some(4096), Some(700)] {
        let case = Case::new(&[1100, 700, 3, 900], 16, 8, 256)
            .scale(1.0 / 16.0)
            .softcap(Some(50.0))
            .window(w);
        check_all(&case, HALF, &mut seed);
    }
}

#[test]
fn gpu_attention_llama31_8b_heads() {
    // Llama-3.1-8B: 32 query / 8 KV heads of 128, scale 128^-0.5, no cap, no window.
    let Some(_dev) = common::gpu("gpu_attention_llama31_8b_heads") else {
        return;
    };
    let mut seed = 8_000;
    check_all(
        &Case::new(&[1500, 400, 1, 650], 32, 8, 128),
        HALF,
        &mut seed,
    );
}

#[test]
fn gpu_attention_rejects_bad_inputs() {
    let Some(_dev) = common::gpu("gpu_attention_rejects_bad_inputs") else {
        return;
    };
    let layout = SeqLayout::from_lens(&[3]);
    let on_gpu = |dtype: DType, w: usize| {
        Tensor::from_f32(vec![0.5; 3 * w], &[3, w])
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(Device::Cuda(0))
            .unwrap()
    };
    let p = Case::new(&[3], 2, 1, 64).params();
    // Mixed dtypes.
    let e = attention(
        &on_gpu(DType::BF16, 128),
        &on_gpu(DType::F16, 64),
        &on_gpu(DType::BF16, 64),
        &layout,
        &p,
    )
    .unwrap_err();
    assert!(e.to_string().contains("dtype"), "{e}");
    // head_dim beyond the kernels.
    let p = Case::new(&[3], 1, 1, 512).params();
    let e = attention(
        &on_gpu(DType::BF16, 512),
        &on_gpu(DType::BF16, 512),
        &on_gpu(DType::BF16, 512),
        &layout,
        &p,
    )
    .unwrap_err();
    assert!(e.to_string().contains("head_dim"), "{e}");
}

/// Naive causal attention in f64, straight from the definition: one query at a time, every
/// visible key, max-subtracted softmax.
fn naive_f64(q: &[f32], k: &[f32], v: &[f32], layout: &SeqLayout, p: &AttentionParams) -> Vec<f64> {
    let d = p.head_dim;
    let (qw, kw) = (p.n_heads * d, p.n_kv_heads * d);
    let group = p.n_heads / p.n_kv_heads;
    let mut out = vec![0f64; layout.total_tokens() * qw];
    for r in 0..layout.rows() {
        let start = layout.range(r).start;
        for h in 0..p.n_heads {
            let kvh = h / group;
            for i in 0..layout.len(r) {
                let lo = p.window.map_or(0, |w| (i + 1).saturating_sub(w));
                let scores: Vec<f64> = (lo..=i)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|x| {
                                q[(start + i) * qw + h * d + x] as f64
                                    * k[(start + j) * kw + kvh * d + x] as f64
                            })
                            .sum();
                        let s = dot * p.scale as f64;
                        match p.softcap {
                            Some(c) => c as f64 * (s / c as f64).tanh(),
                            None => s,
                        }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (jj, j) in (lo..=i).enumerate() {
                    for x in 0..d {
                        out[(start + i) * qw + h * d + x] +=
                            e[jj] / sum * v[(start + j) * kw + kvh * d + x] as f64;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn cpu_attention_matches_naive_f64() {
    // The oracle of the GPU tests, checked against the definition (runs everywhere). f32
    // arithmetic with the twin's vectorised exp/tanh (~1e-6 relative) on logits of a few
    // units and outputs below 1: errors observed here stay below 1e-6; 2e-5 leaves room for
    // other CPUs' exp/tanh code paths.
    let mut seed = 9_000;
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
        let q = common::rand_vec(t * qw, seed, 2.5);
        let k = common::rand_vec(t * kw, seed + 100, 2.5);
        let v = common::rand_vec(t * kw, seed + 200, 1.0);
        let cpu = |x: &[f32], w: usize| Tensor::from_f32(x.to_vec(), &[t, w]).unwrap();
        let got = attention(&cpu(&q, qw), &cpu(&k, kw), &cpu(&v, kw), &layout, &p).unwrap();
        let want: Vec<f32> = naive_f64(&q, &k, &v, &layout, &p)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        common::assert_close(
            &format!("{case:?}"),
            got.as_f32_slice().unwrap(),
            &want,
            2e-5,
            2e-5,
        );
    }
}
