//! The CUDA matmul kernels under criterion at the projection shapes of Gemma-2-9B (hidden
//! 3584) and Llama-3.1-8B (hidden 4096), tokens 1536, 3072 and 6144: the NF4 dequantize-matmul
//! and the dense bf16 matmul, each without and with a fused LoRA of rank 32, reported as
//! FLOP/s (2·M·N·K, the base GEMM only, so a LoRA's cost shows as lower throughput); the
//! backward of the same layers with the LoRA of rank 32 (`…/bwd/…`: dx through the NF4 or
//! dense bf16 weight with the fused dh·A term, plus h, dh, dA and dB), also reported as
//! 2·M·N·K (the dx GEMM; the LoRA gradients add 2·M·r·(2N + 4K) more: 3–14% at r = 32);
//! and NF4 quantisation of a 14336×3584 bf16 weight on the GPU in bytes/s (input read, codes
//! and absmax written). The device is synchronised before the clock stops. Without a GPU it
//! prints SKIPPED and measures nothing.
//!
//! `cargo bench --bench cuda_linear`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use engine::cuda::CudaDevice;
use engine::ops::linear::{BaseWeight, Linear, Lora, linear, linear_backward, quantize_nf4};
use engine::tensor::{CpuStorage, DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

/// Deterministic values in [-scale, scale) as a bf16 GPU tensor.
fn gpu_tensor(shape: &[usize], seed: u32, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            ((((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_cpu(CpuStorage::F32(v).to_dtype(DType::BF16), shape)
        .unwrap()
        .to_device(GPU)
        .unwrap()
}

fn timed(dev: &CudaDevice, iters: u64, mut f: impl FnMut()) -> Duration {
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
            eprintln!("SKIPPED cuda_linear benches: no GPU ({why})");
            return;
        }
    };
    let mut g = c.benchmark_group("cuda_linear");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(50))
        .measurement_time(Duration::from_millis(250));
    // (model, projection, out N, in K); projections of equal shape measured once.
    let shapes = [
        ("gemma2_9b", "q", 4096usize, 3584usize),
        ("gemma2_9b", "kv", 2048, 3584),
        ("gemma2_9b", "o", 3584, 4096),
        ("gemma2_9b", "gate_up", 14336, 3584),
        ("gemma2_9b", "down", 3584, 14336),
        ("llama31_8b", "q_o", 4096, 4096),
        ("llama31_8b", "kv", 1024, 4096),
        ("llama31_8b", "gate_up", 14336, 4096),
        ("llama31_8b", "down", 4096, 14336),
    ];
    for (seed, &(model, proj, n, k)) in shapes.iter().enumerate() {
        let w = gpu_tensor(&[n, k], seed as u32, 0.05);
        let nf4 = BaseWeight::Nf4Cuda(Arc::new(quantize_nf4(&w, false).unwrap()));
        let dense = BaseWeight::Dense(w);
        let lora = Lora {
            a: gpu_tensor(&[32, k], 100 + seed as u32, 0.02),
            b: gpu_tensor(&[n, 32], 200 + seed as u32, 0.02),
            scale: 0.5,
        };
        let layers = [
            ("nf4", Linear::new(nf4.clone(), None).unwrap()),
            ("nf4+lora32", Linear::new(nf4, Some(lora.clone())).unwrap()),
            ("bf16", Linear::new(dense.clone(), None).unwrap()),
            ("bf16+lora32", Linear::new(dense, Some(lora)).unwrap()),
        ];
        for t in [1536usize, 3072, 6144] {
            let x = gpu_tensor(&[t, k], 300 + t as u32, 1.0);
            g.throughput(Throughput::Elements((2 * t * n * k) as u64));
            for (kind, layer) in &layers {
                g.bench_function(format!("{model}/{proj}/{t}/{kind}"), |b| {
                    b.iter_custom(|iters| timed(&dev, iters, || drop(linear(&x, layer).unwrap())))
                });
            }
            // Backward with LoRA r = 32: every gradient a training step needs from this layer.
            let dy = gpu_tensor(&[t, n], 400 + t as u32, 0.01);
            for (kind, layer) in layers.iter().filter(|(kind, _)| kind.ends_with("lora32")) {
                g.bench_function(format!("{model}/{proj}/{t}/bwd/{kind}"), |b| {
                    b.iter_custom(|iters| {
                        timed(&dev, iters, || {
                            drop(linear_backward(&x, None, &dy, layer, false).unwrap())
                        })
                    })
                });
            }
        }
    }
    let (n, k) = (14336usize, 3584usize);
    let w = gpu_tensor(&[n, k], 7, 0.05);
    g.throughput(Throughput::Bytes(
        (n * k * 2 + n * k / 2 + n * k / 64 * 4) as u64,
    ));
    g.bench_function("quantize_nf4/14336x3584/bf16", |b| {
        b.iter_custom(|iters| timed(&dev, iters, || drop(quantize_nf4(&w, false).unwrap())))
    });
    g.finish();
}

criterion_group!(cuda, benches);
criterion_main!(cuda);
