//! CUDA kernels of the training path that are not matmuls or attention, against their CPU
//! twins: RMSNorm backward (both gains), RoPE backward, gated-activation backward, the row
//! scatter (gather backward), elementwise mul / axpy / cast, the fused multi-tensor AdamW step
//! and the global gradient norm. Without a GPU every test prints SKIPPED.
//!
//! Tolerances: kernels compute in f32 and round once to the output dtype; see tests/gpu_ops.rs.
//! The optimiser runs in f32 on both sides with the same operation order: 1e-6 relative.

mod common;

use engine::ops::activation::{Gate, gated_backward};
use engine::ops::elementwise::{axpy, cast, mul};
use engine::ops::embedding::gather_rows_backward;
use engine::ops::norm::{NormKind, RmsNorm, rms_norm_backward};
use engine::ops::optim::{AdamW, AdamWConfig};
use engine::ops::rope::{self, RopeTable};
use engine::tensor::{CpuStorage, DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

fn pair(data: Vec<f32>, shape: &[usize], dtype: DType) -> (Tensor, Tensor) {
    let stored = CpuStorage::F32(data).to_dtype(dtype);
    let cpu = Tensor::from_cpu(CpuStorage::F32(stored.to_f32_vec()), shape).unwrap();
    (
        cpu,
        Tensor::from_cpu(stored, shape)
            .unwrap()
            .to_device(GPU)
            .unwrap(),
    )
}

fn check(what: &str, got: &Tensor, want: &Tensor, dtype: DType) {
    let (atol, rtol) = match dtype {
        DType::BF16 => (1e-2, 1e-2),
        DType::F16 => (2e-3, 2e-3),
        DType::F32 => (1e-5, 1e-5),
    };
    let want = CpuStorage::F32(want.to_f32_vec().unwrap())
        .to_dtype(dtype)
        .to_f32_vec();
    common::assert_close(what, &got.to_f32_vec().unwrap(), &want, atol, rtol);
}

#[test]
fn norm_rope_gated_and_scatter_backward_match_cpu() {
    let Some(_dev) = common::gpu("norm_rope_gated_and_scatter_backward_match_cpu") else {
        return;
    };
    for dtype in [DType::BF16, DType::F16] {
        for &(t, h) in &[(1usize, 64usize), (9, 3584), (5, 1000)] {
            let (xc, xg) = pair(common::rand_vec(t * h, 1, 2.0), &[t, h], dtype);
            let (dc, dg) = pair(common::rand_vec(t * h, 2, 1.0), &[t, h], dtype);
            for kind in [NormKind::OnePlusWeight, NormKind::Weight] {
                let w = common::rand_vec(h, 3, 0.5);
                let nc = RmsNorm {
                    weight: Tensor::from_f32(w.clone(), &[h]).unwrap(),
                    eps: 1e-6,
                    kind,
                };
                let ng = RmsNorm {
                    weight: Tensor::from_f32(w, &[h]).unwrap().to_device(GPU).unwrap(),
                    eps: 1e-6,
                    kind,
                };
                let want = rms_norm_backward(&xc, &dc, &nc).unwrap();
                check(
                    &format!("rms_norm_backward {dtype:?} {kind:?} [{t},{h}]"),
                    &rms_norm_backward(&xg, &dg, &ng).unwrap(),
                    &want,
                    dtype,
                );
            }
            let (uc, ug) = pair(common::rand_vec(t * h, 4, 3.0), &[t, h], dtype);
            for act in [Gate::GeluTanh, Gate::Silu] {
                let (a, b) = gated_backward(&xc, &uc, &dc, act).unwrap();
                let (c, d) = gated_backward(&xg, &ug, &dg, act).unwrap();
                check(&format!("d gate {act:?} {dtype:?}"), &c, &a, dtype);
                check(&format!("d up {act:?} {dtype:?}"), &d, &b, dtype);
            }
            let idx = [t - 1, 0];
            if t > 1 {
                let (sc, sg) = pair(common::rand_vec(2 * h, 5, 1.0), &[2, h], dtype);
                let want = gather_rows_backward(&sc, &idx, t).unwrap();
                check(
                    "scatter rows",
                    &gather_rows_backward(&sg, &idx, t).unwrap(),
                    &want,
                    dtype,
                );
            }
        }
        let (lens, heads, d) = (&[3usize, 40][..], 4usize, 128usize);
        let layout = engine::ops::SeqLayout::from_lens(lens);
        let t = layout.total_tokens();
        let inv = rope::default_inv_freq(d, 10000.0);
        let (tc, tg) = (
            RopeTable::new(&layout.positions(), &inv, Device::Cpu).unwrap(),
            RopeTable::new(&layout.positions(), &inv, GPU).unwrap(),
        );
        let (dc, dg) = pair(
            common::rand_vec(t * heads * d, 6, 1.0),
            &[t, heads * d],
            dtype,
        );
        let want = rope::apply_backward(&dc, &tc, d).unwrap();
        check(
            &format!("rope backward {dtype:?}"),
            &rope::apply_backward(&dg, &tg, d).unwrap(),
            &want,
            dtype,
        );
    }
}

#[test]
fn elementwise_training_helpers_match_cpu() {
    let Some(_dev) = common::gpu("elementwise_training_helpers_match_cpu") else {
        return;
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let n = 1001;
        let (ac, ag) = pair(common::rand_vec(n, 7, 2.0), &[n], dtype);
        let (bc, bg) = pair(common::rand_vec(n, 8, 2.0), &[n], dtype);
        check(
            &format!("mul {dtype:?}"),
            &mul(&ag, &bg).unwrap(),
            &mul(&ac, &bc).unwrap(),
            dtype,
        );
        check(
            &format!("axpy {dtype:?}"),
            &axpy(&ag, &bg, 0.37).unwrap(),
            &axpy(&ac, &bc, 0.37).unwrap(),
            dtype,
        );
        for to in [DType::F32, DType::BF16, DType::F16] {
            let got = cast(&ag, to).unwrap();
            assert_eq!(got.dtype(), to);
            check(&format!("cast {dtype:?}->{to:?}"), &got, &ac, to);
        }
    }
}

#[test]
fn fused_adamw_and_grad_norm_match_cpu() {
    let Some(_dev) = common::gpu("fused_adamw_and_grad_norm_match_cpu") else {
        return;
    };
    let shapes = [
        vec![4usize, 96],
        vec![96, 4],
        vec![3, 64],
        vec![1, 1],
        vec![5000, 7],
    ];
    let params: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Tensor::from_f32(common::rand_vec(s.iter().product(), 10 + i as u64, 0.5), s).unwrap()
        })
        .collect();
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut cpu = AdamW::new(cfg, &params).unwrap();
    let gpu_params: Vec<Tensor> = params.iter().map(|p| p.to_device(GPU).unwrap()).collect();
    let mut gpu = AdamW::new(cfg, &gpu_params).unwrap();
    for step in 0..3u64 {
        let grads: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Tensor::from_f32(
                    common::rand_vec(s.iter().product(), 100 * step + i as u64, 1.0),
                    s,
                )
                .unwrap()
            })
            .collect();
        let ggrads: Vec<Tensor> = grads.iter().map(|g| g.to_device(GPU).unwrap()).collect();
        let (nc, ng) = (
            cpu.grad_norm(&grads).unwrap(),
            gpu.grad_norm(&ggrads).unwrap(),
        );
        assert!((nc - ng).abs() <= 1e-6 * nc, "grad norm {nc} vs {ng}");
        let clip = (1.0 / nc).min(1.0) as f32;
        cpu.update(&grads, 1e-3 * (step + 1) as f64, clip).unwrap();
        gpu.update(&ggrads, 1e-3 * (step + 1) as f64, clip).unwrap();
    }
    for (i, (a, b)) in cpu
        .export()
        .unwrap()
        .iter()
        .zip(gpu.export().unwrap())
        .enumerate()
    {
        for k in 0..3 {
            common::assert_close(&format!("slot {i} part {k}"), &b[k], &a[k], 1e-7, 1e-6);
        }
    }
}
