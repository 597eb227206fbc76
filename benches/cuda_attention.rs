//! The attention kernels under criterion at the real models' head shapes, bf16, rows of 1536
//! tokens (1, 2 and 4 rows: 1536, 3072 and 6144 tokens):
//! - Gemma-2-9B: 16 query / 8 KV heads of 256, scale 1/16, soft-cap 50, window none and 4096
//!   (a 4096 window hides nothing in 1536-token rows: the two should time the same);
//! - Llama-3.1-8B: 32 query / 8 KV heads of 128, no cap, no window.
//!
//! Two groups: `cuda_attention` (the forward) and `cuda_attention_backward` (dQ, dK, dV from
//! the forward's saved output and log-sum-exp, as training calls it: the prep, dK/dV and dQ
//! kernels).
//!
//! Timing synchronises the device before starting and before stopping the clock
//! (`iter_custom`), so it measures finished kernels, not queued launches. Throughput is in
//! FLOPs, so criterion's "elem/s" reads as FLOP/s. Forward: 4 · head_dim · visible (query, key)
//! pairs · query heads (q·k and p·v, 2 FLOPs per multiply-add). Backward: 2.5× that (the
//! flash-attention-2 convention: five products of the forward's size — S recomputed, dP = dO·Vᵀ,
//! dV, dK, dQ). The kernels actually compute seven (the dQ kernel recomputes S and dP rather
//! than adding dQ with atomics, for determinism), so the hardware does 1.4× the FLOPs credited.
//! Without a GPU it prints a SKIPPED line and benches nothing.
//!
//! `cargo bench --bench cuda_attention`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use engine::cuda::CudaDevice;
use engine::ops::SeqLayout;
use engine::ops::attention::{
    AttentionParams, attention, attention_backward_saved, attention_forward_lse,
};
use engine::tensor::{DType, Device, Tensor};

const ROW: usize = 1536;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 2.0
        })
        .collect()
}

/// Visible (query, key) pairs of one row of `len` tokens.
fn visible_pairs(len: usize, window: Option<usize>) -> usize {
    (0..len)
        .map(|i| window.map_or(i + 1, |w| (i + 1).min(w)))
        .sum()
}

fn on_gpu(data: Vec<f32>, shape: &[usize], dev: &CudaDevice) -> Tensor {
    Tensor::from_f32(data, shape)
        .and_then(|t| t.to_dtype(DType::BF16))
        .and_then(|t| t.to_device(Device::Cuda(dev.ordinal())))
        .expect("upload a bench input")
}

/// The attention shape of one model.
struct Model {
    name: &'static str,
    nh: usize,
    nkv: usize,
    d: usize,
    scale: f32,
    softcap: Option<f32>,
    windows: &'static [Option<usize>],
}

/// The two models' attention shapes.
fn models() -> [Model; 2] {
    [
        Model {
            name: "gemma2-9b",
            nh: 16,
            nkv: 8,
            d: 256,
            scale: 1.0 / 16.0,
            softcap: Some(50.0),
            windows: &[None, Some(4096)],
        },
        Model {
            name: "llama3.1-8b",
            nh: 32,
            nkv: 8,
            d: 128,
            scale: (128f32).powf(-0.5),
            softcap: None,
            windows: &[None],
        },
    ]
}

fn bench_attention(c: &mut Criterion) {
    let dev: Arc<CudaDevice> = match engine::cuda::availability() {
        Ok(_) => engine::cuda::device(0).expect("a visible GPU must open"),
        Err(why) => {
            println!("SKIPPED cuda_attention: no GPU ({why})");
            return;
        }
    };
    let mut g = c.benchmark_group("cuda_attention");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for Model {
        name: model,
        nh,
        nkv,
        d,
        scale,
        softcap,
        windows,
    } in models()
    {
        for rows in [1usize, 2, 4] {
            let t = rows * ROW;
            let layout = SeqLayout::from_lens(&vec![ROW; rows]);
            let q = on_gpu(rand(t * nh * d, 1), &[t, nh * d], &dev);
            let k = on_gpu(rand(t * nkv * d, 2), &[t, nkv * d], &dev);
            let v = on_gpu(rand(t * nkv * d, 3), &[t, nkv * d], &dev);
            for &window in windows {
                let p = AttentionParams {
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: d,
                    scale,
                    softcap,
                    window,
                };
                let flops = 4 * d * nh * rows * visible_pairs(ROW, window);
                g.throughput(Throughput::Elements(flops as u64));
                let label = match window {
                    Some(w) => format!("{model}/window{w}"),
                    None => format!("{model}/full"),
                };
                g.bench_with_input(BenchmarkId::new(label, t), &p, |b, p| {
                    b.iter_custom(|iters| {
                        dev.synchronize().expect("synchronize");
                        let start = Instant::now();
                        for _ in 0..iters {
                            let out = attention(&q, &k, &v, &layout, p).expect("attention");
                            drop(out);
                        }
                        dev.synchronize().expect("synchronize");
                        start.elapsed()
                    })
                });
            }
        }
    }
    g.finish();
}

fn bench_attention_backward(c: &mut Criterion) {
    let dev: Arc<CudaDevice> = match engine::cuda::availability() {
        Ok(_) => engine::cuda::device(0).expect("a visible GPU must open"),
        Err(why) => {
            println!("SKIPPED cuda_attention_backward: no GPU ({why})");
            return;
        }
    };
    let mut g = c.benchmark_group("cuda_attention_backward");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for Model {
        name: model,
        nh,
        nkv,
        d,
        scale,
        softcap,
        windows,
    } in models()
    {
        for rows in [1usize, 2, 4] {
            let t = rows * ROW;
            let layout = SeqLayout::from_lens(&vec![ROW; rows]);
            let q = on_gpu(rand(t * nh * d, 1), &[t, nh * d], &dev);
            let k = on_gpu(rand(t * nkv * d, 2), &[t, nkv * d], &dev);
            let v = on_gpu(rand(t * nkv * d, 3), &[t, nkv * d], &dev);
            let dout = on_gpu(rand(t * nh * d, 4), &[t, nh * d], &dev);
            for &window in windows {
                let p = AttentionParams {
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: d,
                    scale,
                    softcap,
                    window,
                };
                let saved = attention_forward_lse(&q, &k, &v, &layout, &p).expect("forward");
                // 2.5x the forward's 4 · d · pairs · heads (see the file comment).
                let flops = 10 * d * nh * rows * visible_pairs(ROW, window);
                g.throughput(Throughput::Elements(flops as u64));
                let label = match window {
                    Some(w) => format!("{model}/window{w}"),
                    None => format!("{model}/full"),
                };
                g.bench_with_input(BenchmarkId::new(label, t), &p, |b, p| {
                    b.iter_custom(|iters| {
                        dev.synchronize().expect("synchronize");
                        let start = Instant::now();
                        for _ in 0..iters {
                            let grads =
                                attention_backward_saved(&q, &k, &v, &dout, &saved, &layout, p)
                                    .expect("attention backward");
                            drop(grads);
                        }
                        dev.synchronize().expect("synchronize");
                        start.elapsed()
                    })
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench_attention, bench_attention_backward);
criterion_main!(benches);
