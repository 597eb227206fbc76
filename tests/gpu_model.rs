//! Whole models on the GPU against the CPU reference: every parity case of
//! `tests/fixtures/cases.json` (tiny Gemma-2 and Llama, f32/bf16 checkpoints, NF4, double quant,
//! PEFT adapters) run with bf16 and f16 activations, and `engine infer --device cuda` end to
//! end. Without a GPU every test prints SKIPPED.
//!
//! Tolerance: bf16 keeps 8 mantissa bits, so every activation carries ~2^-9 relative rounding;
//! through 3–4 layers with logits up to 5 that moves probabilities by up to ~1e-2. 3e-2 (bf16)
//! and 1e-2 (f16, 11 bits) leave margin without hiding a wrong kernel (a missing softcap or
//! window moves these models' probabilities by 0.1–0.5).

mod common;

use engine::data::batch::TokenBatch;
use engine::models::{self, LoadOptions, Quant};
use engine::tensor::{DType, Device};
use serde_json::Value;

#[test]
fn fixture_models_on_gpu_match_the_cpu_reference() {
    let Some(_dev) = common::gpu("fixture_models_on_gpu_match_the_cpu_reference") else {
        return;
    };
    let fx = common::fixtures();
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("cases.json")).unwrap()).unwrap();
    let mut failures = Vec::new();
    for dtype in [DType::BF16, DType::F16] {
        let tol = if dtype == DType::BF16 { 3e-2 } else { 1e-2 };
        for case in cases["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let quant = match (
                case["quant"].as_str().unwrap(),
                case["double_quant"].as_bool().unwrap(),
            ) {
                ("none", _) => Quant::None,
                (_, dq) => Quant::Nf4 { double_quant: dq },
            };
            let opts = LoadOptions {
                device: Device::Cuda(0),
                dtype: Some(dtype),
                quant,
                adapter: case["adapter"].as_str().map(|a| fx.join(a)),
                seed: 0,
            };
            let model = models::load(&fx.join(case["model"].as_str().unwrap()), &opts)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let ids: Vec<Vec<u32>> = serde_json::from_value(case["input_ids"].clone()).unwrap();
            let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
            let probs =
                models::probabilities(&model.forward(&TokenBatch::from_rows(&rows)).unwrap())
                    .unwrap();
            let key = if case["double_quant"].as_bool().unwrap() {
                "probs_cuda_nested"
            } else {
                "probs"
            };
            let want: Vec<[f64; 3]> = serde_json::from_value(case[key].clone()).unwrap();
            let dp = probs
                .iter()
                .zip(&want)
                .flat_map(|(p, w)| (0..3).map(move |k| (p[k] - w[k]).abs()))
                .fold(0f64, f64::max);
            println!("{dtype:?} {name:<28} max|Δp| {dp:.3e}");
            eprintln!("{dtype:?} {name:<28} max|Δp| {dp:.3e}");
            if dp.is_nan() || dp > tol {
                failures.push(format!("{dtype:?} {name}: max |Δp| {dp:.3e} > {tol}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn infer_on_cuda_writes_the_same_submission_as_the_cpu() {
    let Some(dev) = common::gpu("infer_on_cuda_writes_the_same_submission_as_the_cpu") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model();
    let data = common::demo_csv();
    let run = |device: &str, quant: &str, name: &str| {
        let out = dir.path().join(name);
        let o = common::engine(&[
            "infer",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            device,
            "--quant",
            quant,
            "--quiet",
        ]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        if device == "cuda" {
            assert!(
                common::stderr(&o).contains("peak GPU memory"),
                "{}",
                common::stderr(&o)
            );
        }
        engine::predictions::read(&out).unwrap()
    };
    for quant in ["none", "nf4"] {
        let cpu = run("cpu", quant, &format!("cpu-{quant}.csv"));
        let gpu = run("cuda", quant, &format!("gpu-{quant}.csv"));
        assert_eq!(cpu.len(), gpu.len());
        let dp = cpu.iter().zip(&gpu).flat_map(|((a, p), (b, q))| {
            assert_eq!(a, b, "row order");
            (0..3).map(move |k| (p[k] - q[k]).abs())
        });
        let dp = dp.fold(0f64, f64::max);
        eprintln!("infer {quant} on {}: max |Δp| vs CPU {dp:.3e}", dev.name());
        assert!(dp < 3e-2, "{quant}: {dp}");
    }
}
