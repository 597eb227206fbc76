//! CPU twins under criterion, at shapes of the real models and of the `small` preset:
//! the GEMM every linear layer uses (dense f32, bf16 and NF4 weights), attention, RMSNorm and
//! the gated activations. Throughput is reported in FLOP/s or bytes/s.
//!
//! `cargo bench --bench cpu_ops` (set RAYON_NUM_THREADS to pin the thread count).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use engine::ops::SeqLayout;
use engine::ops::activation::{Gate, gated};
use engine::ops::attention::{AttentionParams, attention};
use engine::ops::linear::{BaseWeight, Linear, linear};
use engine::ops::norm::{NormKind, RmsNorm, rms_norm};
use engine::quant::nf4::Nf4Tensor;
use engine::tensor::{CpuStorage, DType, Tensor};

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

fn bench_linear(c: &mut Criterion) {
    let mut g = c.benchmark_group("linear");
    g.sample_size(10);
    // (tokens, in, out): small-preset MLP up, Gemma-2-9B q_proj and MLP down slices.
    for &(t, k, n) in &[
        (1024usize, 768usize, 3072usize),
        (512, 3584, 4096),
        (512, 14336, 3584),
    ] {
        let x = Tensor::from_f32(rand(t * k, 1), &[t, k]).unwrap();
        let w = CpuStorage::F32(rand(n * k, 2));
        g.throughput(Throughput::Elements((2 * t * k * n) as u64));
        for kind in ["f32", "bf16", "nf4"] {
            let weight = match kind {
                "f32" => BaseWeight::Dense(Tensor::from_cpu(w.clone(), &[n, k]).unwrap()),
                "bf16" => {
                    BaseWeight::Dense(Tensor::from_cpu(w.to_dtype(DType::BF16), &[n, k]).unwrap())
                }
                _ => BaseWeight::Nf4(Nf4Tensor::quantize(&w, &[n, k], false).unwrap()),
            };
            let layer = Linear::new(weight, None).unwrap();
            g.bench_with_input(
                BenchmarkId::new(kind, format!("{t}x{k}x{n}")),
                &layer,
                |b, l| b.iter(|| linear(&x, l).unwrap()),
            );
        }
    }
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    // Gemma-2-9B heads (16 q / 8 kv × 256), one row of 1024 tokens, full and sliding (window 256).
    let (len, nh, nkv, d) = (1024usize, 16usize, 8usize, 256usize);
    let q = Tensor::from_f32(rand(len * nh * d, 3), &[len, nh * d]).unwrap();
    let k = Tensor::from_f32(rand(len * nkv * d, 4), &[len, nkv * d]).unwrap();
    let v = Tensor::from_f32(rand(len * nkv * d, 5), &[len, nkv * d]).unwrap();
    let layout = SeqLayout::from_lens(&[len]);
    for window in [None, Some(256)] {
        let p = AttentionParams {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: d,
            scale: 1.0 / 16.0,
            softcap: Some(50.0),
            window,
        };
        // Causal: about half of the len² score matrix, twice (q·k and p·v).
        let visible: usize = (0..len)
            .map(|i| window.map_or(i + 1, |w| (i + 1).min(w)))
            .sum();
        g.throughput(Throughput::Elements((4 * visible * d * nh) as u64));
        g.bench_function(format!("gemma2_{len}_window_{window:?}"), |b| {
            b.iter(|| attention(&q, &k, &v, &layout, &p).unwrap())
        });
    }
    g.finish();
}

fn bench_elementwise(c: &mut Criterion) {
    let mut g = c.benchmark_group("elementwise");
    let (t, h, inter) = (1024usize, 3584usize, 14336usize);
    let x = Tensor::from_f32(rand(t * h, 6), &[t, h]).unwrap();
    let norm = RmsNorm {
        weight: Tensor::from_f32(rand(h, 7), &[h]).unwrap(),
        eps: 1e-6,
        kind: NormKind::OnePlusWeight,
    };
    g.throughput(Throughput::Bytes((2 * t * h * 4) as u64));
    g.bench_function("rms_norm_1024x3584", |b| {
        b.iter(|| rms_norm(&x, &norm).unwrap())
    });
    let gate = Tensor::from_f32(rand(t * inter, 8), &[t, inter]).unwrap();
    let up = Tensor::from_f32(rand(t * inter, 9), &[t, inter]).unwrap();
    g.throughput(Throughput::Bytes((3 * t * inter * 4) as u64));
    for act in [Gate::GeluTanh, Gate::Silu] {
        g.bench_function(format!("{act:?}_1024x14336"), |b| {
            b.iter(|| gated(&gate, &up, act).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench_linear, bench_attention, bench_elementwise);
criterion_main!(benches);
