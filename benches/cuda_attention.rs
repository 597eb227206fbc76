//! The attention kernels under criterion at the real models' head shapes, bf16, rows of 1536
//! tokens (1, 2 and 4 rows: 1536, 3072 and 6144 tokens):
//! - Gemma-2-9B: 16 query / 8 KV heads of 256, scale 1/16, soft-cap 50, window none and 4096
//!   (a 4096 window hides nothing in 1536-token rows: the two should time the same);
//! - Llama-3.1-8B: 32 query / 8 KV heads of 128, no cap, no window.
//!
//! Timing synchronises the device before starting and before stopping the clock
//! (`iter_custom`), so it measures finished kernels, not queued launches. Throughput is in
//! FLOPs — 4 · head_dim · visible (query, key) pairs · query heads (q·k and p·v, 2 FLOPs per
//! multiply-add) — so criterion's "elem/s" reads as FLOP/s. Without a GPU it prints a SKIPPED
//! line and benches nothing.
//!
//! `cargo bench --bench cuda_attention`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use engine::cuda::CudaDevice;
use engine::ops::SeqLayout;
use engine::ops::attention::{AttentionParams, attention};
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
    let models = [
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
    ];
    for Model {
        name: model,
        nh,
        nkv,
        d,
        scale,
        softcap,
        windows,
    } in models
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

criterion_group!(benches, bench_attention);
criterion_main!(benches);
