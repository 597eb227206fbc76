//! The row-wise CUDA kernels under criterion at Gemma-2-9B and Llama-3.1-8B shapes (tokens
//! 1536, 3072, 6144): RMSNorm, the fused residual norms, RoPE, the gated activation and the
//! residual add, reported in bytes/s (each input read once, each output written once — the
//! minimum traffic, so the number is a fraction of the copy bandwidth). The device is
//! synchronised before the clock stops. Without a GPU it prints SKIPPED and measures nothing.
//!
//! `cargo bench --bench cuda_ops`

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use engine::ops::SeqLayout;
use engine::ops::activation::{Gate, gated};
use engine::ops::elementwise::add;
use engine::ops::norm::{NormKind, RmsNorm, norm_add_norm, rms_norm};
use engine::ops::rope::{self, RopeTable};
use engine::tensor::{CpuStorage, DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

fn gpu_tensor(n: usize, shape: &[usize], seed: u32) -> Tensor {
    let v: Vec<f32> = (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    Tensor::from_cpu(CpuStorage::F32(v).to_dtype(DType::BF16), shape)
        .unwrap()
        .to_device(GPU)
        .unwrap()
}

fn timed(dev: &engine::cuda::CudaDevice, iters: u64, mut f: impl FnMut()) -> Duration {
    dev.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    dev.synchronize().unwrap();
    t.elapsed()
}

fn benches(c: &mut Criterion) {
    let dev = match engine::cuda::availability() {
        Ok(_) => engine::cuda::device(0).unwrap(),
        Err(why) => {
            eprintln!("SKIPPED cuda_ops benches: no GPU ({why})");
            return;
        }
    };
    let mut g = c.benchmark_group("cuda_rowwise");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for (model, h, heads, hd, inter) in [
        ("gemma2_9b", 3584usize, 16usize, 256usize, 14336usize),
        ("llama31_8b", 4096, 32, 128, 14336),
    ] {
        for t in [1536usize, 3072, 6144] {
            let x = gpu_tensor(t * h, &[t, h], 1);
            let a = gpu_tensor(t * h, &[t, h], 2);
            let w = Tensor::from_f32(vec![0.1; h], &[h])
                .unwrap()
                .to_device(GPU)
                .unwrap();
            let norm = RmsNorm {
                weight: w,
                eps: 1e-6,
                kind: NormKind::OnePlusWeight,
            };
            let bytes = (t * h * 2) as u64;
            g.throughput(Throughput::Bytes(2 * bytes));
            g.bench_function(format!("rms_norm/{model}/{t}"), |b| {
                b.iter_custom(|n| timed(&dev, n, || drop(rms_norm(&x, &norm).unwrap())))
            });
            g.throughput(Throughput::Bytes(4 * bytes));
            g.bench_function(format!("norm_add_norm/{model}/{t}"), |b| {
                b.iter_custom(|n| {
                    timed(&dev, n, || {
                        drop(norm_add_norm(&x, &a, &norm, &norm).unwrap())
                    })
                })
            });
            g.throughput(Throughput::Bytes(3 * bytes));
            g.bench_function(format!("add/{model}/{t}"), |b| {
                b.iter_custom(|n| timed(&dev, n, || drop(add(&x, &a).unwrap())))
            });

            let layout = SeqLayout::from_lens(&vec![1536; t / 1536]);
            let inv = engine::ops::rope::default_inv_freq(hd, 10000.0);
            let table = RopeTable::new(&layout.positions(), &inv, GPU).unwrap();
            let q = gpu_tensor(t * heads * hd, &[t, heads * hd], 3);
            g.throughput(Throughput::Bytes(
                (2 * t * heads * hd * 2 + 2 * t * hd / 2 * 4) as u64,
            ));
            g.bench_function(format!("rope/{model}/{t}"), |b| {
                b.iter_custom(|n| timed(&dev, n, || drop(rope::apply(&q, &table, hd).unwrap())))
            });

            let gate = gpu_tensor(t * inter, &[t, inter], 4);
            let up = gpu_tensor(t * inter, &[t, inter], 5);
            let act = if model.starts_with("gemma") {
                Gate::GeluTanh
            } else {
                Gate::Silu
            };
            g.throughput(Throughput::Bytes((3 * t * inter * 2) as u64));
            g.bench_function(format!("gated/{model}/{t}"), |b| {
                b.iter_custom(|n| timed(&dev, n, || drop(gated(&gate, &up, act).unwrap())))
            });
        }
    }
    g.finish();
}

criterion_group!(cuda, benches);
criterion_main!(cuda);
