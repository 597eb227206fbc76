//! CUDA kernels of the elementwise and row-wise ops against their CPU twins: RMSNorm (both
//! gains) and its two residual fusions, RoPE (table and rotation), embedding and row gathers,
//! the residual add, GeGLU/SwiGLU. Inputs are rounded to the GPU dtype on the host and the CPU
//! twin runs on those same values, so only the kernel's arithmetic differs. Outputs start
//! poisoned (NaN), so an unwritten element fails. Without a GPU every test prints SKIPPED.
//!
//! Tolerances: the kernels compute in f32 and round once to the output dtype, so the error is
//! the rounding (half an ulp: 2^-9 relative for bf16, 2^-12 for f16) plus f32 summation-order
//! noise; 1e-2 / 2e-3 relative with a small absolute floor covers it with margin.

mod common;

use engine::ops::SeqLayout;
use engine::ops::activation::{Gate, gated};
use engine::ops::elementwise::add;
use engine::ops::embedding::{embed, gather_rows};
use engine::ops::norm::{NormKind, RmsNorm, add_rms_norm, norm_add_norm, rms_norm};
use engine::ops::rope::{self, RopeTable};
use engine::tensor::{CpuStorage, DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);
const DTYPES: [DType; 2] = [DType::BF16, DType::F16];

fn tol(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::BF16 => (1e-2, 1e-2),
        DType::F16 => (2e-3, 2e-3),
        DType::F32 => (1e-5, 1e-5),
    }
}

/// A host tensor of values already rounded to `dtype` (as f32) and its GPU copy in `dtype`.
fn pair(data: Vec<f32>, shape: &[usize], dtype: DType) -> (Tensor, Tensor) {
    let stored = CpuStorage::F32(data).to_dtype(dtype);
    let cpu = Tensor::from_cpu(CpuStorage::F32(stored.to_f32_vec()), shape).unwrap();
    let gpu = Tensor::from_cpu(stored, shape)
        .unwrap()
        .to_device(GPU)
        .unwrap();
    (cpu, gpu)
}

fn check(what: &str, got: &Tensor, want: &Tensor, dtype: DType) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (atol, rtol) = tol(dtype);
    // Round the reference to the output dtype first: the kernel's single rounding is then
    // compared with the same rounding of the exact value.
    let want = CpuStorage::F32(want.to_f32_vec().unwrap())
        .to_dtype(dtype)
        .to_f32_vec();
    common::assert_close(what, &got.to_f32_vec().unwrap(), &want, atol, rtol);
}

fn norm(h: usize, kind: NormKind, seed: u64, device: Device) -> RmsNorm {
    let w = common::rand_vec(h, seed, 0.5);
    RmsNorm {
        weight: Tensor::from_f32(w, &[h])
            .unwrap()
            .to_device(device)
            .unwrap(),
        eps: 1e-6,
        kind,
    }
}

#[test]
fn rms_norm_and_fusions_match_cpu() {
    let Some(_dev) = common::gpu("rms_norm_and_fusions_match_cpu") else {
        return;
    };
    for dtype in DTYPES {
        for &(t, h) in &[(1usize, 64usize), (7, 3584), (33, 4096), (5, 1000), (3, 17)] {
            for kind in [NormKind::OnePlusWeight, NormKind::Weight] {
                let seed = (t * 31 + h) as u64;
                let (xc, xg) = pair(common::rand_vec(t * h, seed, 3.0), &[t, h], dtype);
                let (ac, ag) = pair(common::rand_vec(t * h, seed + 1, 3.0), &[t, h], dtype);
                let (n1c, n1g) = (
                    norm(h, kind, seed + 2, Device::Cpu),
                    norm(h, kind, seed + 2, GPU),
                );
                let (n2c, n2g) = (
                    norm(h, kind, seed + 3, Device::Cpu),
                    norm(h, kind, seed + 3, GPU),
                );
                let what = format!("{dtype:?} {kind:?} [{t}, {h}]");
                // The CPU twin rounds at the same points as the kernel when its inputs are
                // the GPU's (rounded) tensors: reproduce those roundings for the fusions.
                let round = |x: &Tensor| -> Tensor {
                    let v = CpuStorage::F32(x.to_f32_vec().unwrap())
                        .to_dtype(dtype)
                        .to_f32_vec();
                    Tensor::from_f32(v, x.shape()).unwrap()
                };
                check(
                    &format!("rms_norm {what}"),
                    &rms_norm(&xg, &n1g).unwrap(),
                    &rms_norm(&xc, &n1c).unwrap(),
                    dtype,
                );
                let (sg, yg) = add_rms_norm(&xg, &ag, &n1g).unwrap();
                let sc = round(&add(&xc, &ac).unwrap());
                check(&format!("add_rms_norm.s {what}"), &sg, &sc, dtype);
                check(
                    &format!("add_rms_norm.y {what}"),
                    &yg,
                    &rms_norm(&sc, &n1c).unwrap(),
                    dtype,
                );
                let (sg, yg) = norm_add_norm(&xg, &ag, &n1g, &n2g).unwrap();
                let sc = round(&add(&xc, &round(&rms_norm(&ac, &n1c).unwrap())).unwrap());
                check(&format!("norm_add_norm.s {what}"), &sg, &sc, dtype);
                check(
                    &format!("norm_add_norm.y {what}"),
                    &yg,
                    &rms_norm(&sc, &n2c).unwrap(),
                    dtype,
                );
            }
        }
    }
}

#[test]
fn rope_matches_cpu() {
    let Some(_dev) = common::gpu("rope_matches_cpu") else {
        return;
    };
    for dtype in DTYPES {
        for &(lens, heads, d) in &[
            (&[1usize, 5, 300][..], 4usize, 16usize),
            (&[1536][..], 32, 128),
            (&[700, 9][..], 16, 256),
            (&[3][..], 2, 24),
        ] {
            let layout = SeqLayout::from_lens(lens);
            let t = layout.total_tokens();
            let pos = layout.positions();
            let inv = engine::ops::rope::llama3_inv_freq(
                &engine::ops::rope::default_inv_freq(d, 500000.0),
                8.0,
                1.0,
                4.0,
                8192.0,
            );
            let (tc, tg) = (
                RopeTable::new(&pos, &inv, Device::Cpu).unwrap(),
                RopeTable::new(&pos, &inv, GPU).unwrap(),
            );
            // Tables are f32 on both sides; sincosf vs Rust's sin/cos differ in the last bits.
            common::assert_close(
                "rope cos",
                &tg.cos.to_f32_vec().unwrap(),
                &tc.cos.to_f32_vec().unwrap(),
                2e-6,
                2e-6,
            );
            common::assert_close(
                "rope sin",
                &tg.sin.to_f32_vec().unwrap(),
                &tc.sin.to_f32_vec().unwrap(),
                2e-6,
                2e-6,
            );
            let (xc, xg) = pair(
                common::rand_vec(t * heads * d, t as u64, 2.0),
                &[t, heads * d],
                dtype,
            );
            let want = rope::apply(&xc, &tc, d).unwrap();
            check(
                &format!("rope {dtype:?} {lens:?}x{heads}x{d}"),
                &rope::apply(&xg, &tg, d).unwrap(),
                &want,
                dtype,
            );
        }
    }
}

#[test]
fn embedding_and_gathers_match_cpu() {
    let Some(_dev) = common::gpu("embedding_and_gathers_match_cpu") else {
        return;
    };
    for table_dtype in [DType::F32, DType::BF16, DType::F16] {
        for dtype in DTYPES {
            let (vocab, h) = (1000usize, 72usize);
            let raw = CpuStorage::F32(common::rand_vec(vocab * h, 9, 1.0)).to_dtype(table_dtype);
            let table_cpu = Tensor::from_cpu(raw.clone(), &[vocab, h]).unwrap();
            let table_gpu = table_cpu.to_device(GPU).unwrap();
            let ids: Vec<u32> = (0..257u32).map(|i| (i * 37 + 5) % vocab as u32).collect();
            let scale = 8.4375; // a bf16-exact √hidden-like constant
            let want = embed(&table_cpu, &ids, scale, DType::F32).unwrap();
            let got = embed(&table_gpu, &ids, scale, dtype).unwrap();
            check(
                &format!("embed {table_dtype:?}->{dtype:?}"),
                &got,
                &want,
                dtype,
            );
            let idx = [0usize, 256, 17, 17, 3];
            let gathered = gather_rows(&got, &idx).unwrap();
            let want_rows =
                gather_rows(&got.to_cpu().unwrap().to_dtype(DType::F32).unwrap(), &idx).unwrap();
            common::assert_close(
                "gather_rows",
                &gathered.to_f32_vec().unwrap(),
                &want_rows.to_f32_vec().unwrap(),
                0.0,
                0.0,
            );
        }
    }
    let e = embed(
        &Tensor::from_f32(vec![0.0; 8], &[2, 4])
            .unwrap()
            .to_device(GPU)
            .unwrap(),
        &[2],
        1.0,
        DType::BF16,
    )
    .unwrap_err();
    assert!(e.to_string().contains("outside the table"), "{e}");
}

#[test]
fn add_and_gated_activations_match_cpu() {
    let Some(_dev) = common::gpu("add_and_gated_activations_match_cpu") else {
        return;
    };
    for dtype in DTYPES {
        for &(t, w) in &[(1usize, 1usize), (3, 7), (17, 14336), (64, 1000), (1, 9)] {
            let (ac, ag) = pair(common::rand_vec(t * w, 3, 4.0), &[t, w], dtype);
            let (bc, bg) = pair(common::rand_vec(t * w, 4, 4.0), &[t, w], dtype);
            check(
                &format!("add {dtype:?} [{t},{w}]"),
                &add(&ag, &bg).unwrap(),
                &add(&ac, &bc).unwrap(),
                dtype,
            );
            for act in [Gate::GeluTanh, Gate::Silu] {
                // The kernel rounds act(gate) to the dtype before the product (as transformers
                // holds it in a tensor): build the reference the same way.
                let ones = Tensor::from_f32(vec![1.0; t * w], &[t, w]).unwrap();
                let a = gated(&ac, &ones, act).unwrap();
                let a = Tensor::from_f32(
                    CpuStorage::F32(a.to_f32_vec().unwrap())
                        .to_dtype(dtype)
                        .to_f32_vec(),
                    &[t, w],
                )
                .unwrap();
                let want = Tensor::from_f32(
                    a.to_f32_vec()
                        .unwrap()
                        .iter()
                        .zip(bc.to_f32_vec().unwrap())
                        .map(|(x, y)| x * y)
                        .collect(),
                    &[t, w],
                )
                .unwrap();
                check(
                    &format!("{act:?} {dtype:?} [{t},{w}]"),
                    &gated(&ag, &bg, act).unwrap(),
                    &want,
                    dtype,
                );
            }
        }
    }
}

#[test]
fn no_gpu_means_a_clear_error_not_a_crash() {
    // Runs everywhere: with a GPU it opens; without one the reason is an error, not a panic.
    match engine::cuda::availability() {
        Ok(n) => assert!(n >= 1),
        Err(why) => {
            let e = engine::cuda::device(0).unwrap_err().to_string();
            assert!(e.contains(&why), "{e} should carry {why}");
        }
    }
}
