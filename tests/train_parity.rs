//! Training parity with transformers + PEFT + torch AdamW: the two cases of
//! tests/fixtures/train_parity.json (Gemma-2 LoRA with a linear warm-up schedule and active
//! clipping; Llama QLoRA on NF4 weights with rsLoRA, cosine schedule, label smoothing and soft
//! labels), each trained from the same initial adapter on the same token ids. Per-step losses
//! within 1e-4, pre-clip gradient norms within 1e-3, learning rates exact, and every trained
//! tensor's update (final − initial) within 1e-3 relative (Frobenius) of the reference's.

mod common;

use engine::models::{self, LoadOptions, Quant};
use engine::train::optim::Schedule;
use engine::train::{Example, Hyper, Trainer};
use engine::weights::Checkpoint;
use serde_json::Value;

fn tensors(dir: &std::path::Path) -> Checkpoint {
    Checkpoint::open_files(dir, &[dir.join("adapter_model.safetensors")]).unwrap()
}

fn vals(ck: &Checkpoint, name: &str) -> Vec<f32> {
    let shape = ck.entry(name).unwrap().shape.clone();
    ck.load(name, &shape).unwrap().to_f32_vec().unwrap()
}

#[test]
fn training_steps_and_final_adapters_match_the_reference() {
    let fx = common::fixtures();
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("train_parity.json")).unwrap())
            .unwrap();
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let hp = &case["hyper"];
        let quant = if case["quant"] == "nf4" {
            Quant::Nf4 {
                double_quant: false,
            }
        } else {
            Quant::None
        };
        let init = fx.join(case["init_adapter"].as_str().unwrap());
        let opts = LoadOptions {
            adapter: Some(init.clone()),
            quant,
            ..LoadOptions::default()
        };
        let model = models::load(&fx.join(case["model"].as_str().unwrap()), &opts).unwrap();
        let hyper = Hyper {
            batch_size: hp["batch_size"].as_u64().unwrap() as usize,
            grad_accum: hp["grad_accum"].as_u64().unwrap() as usize,
            epochs: hp["epochs"].as_u64().unwrap() as usize,
            lr: hp["lr"].as_f64().unwrap(),
            weight_decay: hp["weight_decay"].as_f64().unwrap(),
            beta1: hp["betas"][0].as_f64().unwrap(),
            beta2: hp["betas"][1].as_f64().unwrap(),
            eps: hp["eps"].as_f64().unwrap(),
            scheduler: match hp["scheduler"].as_str().unwrap() {
                "linear" => Schedule::Linear,
                "cosine" => Schedule::Cosine,
                _ => Schedule::Constant,
            },
            warmup_steps: hp["warmup_steps"].as_u64().unwrap() as usize,
            max_grad_norm: hp["max_grad_norm"].as_f64().unwrap(),
            label_smoothing: hp["label_smoothing"].as_f64().unwrap(),
            shuffle: hp["shuffle"].as_bool().unwrap(),
            seed: 0,
            swap_augment: false,
            lora_dropout: 0.0,
            checkpointing: name.starts_with("gemma2"),
        };
        let examples: Vec<Example> = case["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| Example {
                ids: serde_json::from_value(r["input_ids"].clone()).unwrap(),
                swapped: None,
                target: serde_json::from_value(r["label"].clone()).unwrap(),
            })
            .collect();
        let mut trainer = Trainer::new(model, hyper).unwrap();
        let steps = trainer.run(&examples, |_, _| Ok(())).unwrap();
        let want = case["steps"].as_array().unwrap();
        assert_eq!(steps.len(), want.len(), "{name}: number of steps");
        for (s, w) in steps.iter().zip(want) {
            let (wl, wn, wlr) = (
                w["loss"].as_f64().unwrap(),
                w["grad_norm"].as_f64().unwrap(),
                w["lr"].as_f64().unwrap(),
            );
            println!(
                "{name} step {}: loss {:.8} (ref {wl:.8}), grad norm {:.6} (ref {wn:.6}), lr {}",
                s.step, s.loss, s.grad_norm, s.lr
            );
            assert!(
                (s.loss - wl).abs() <= 1e-4 * wl.abs().max(1.0),
                "{name} step {}: loss {} vs {wl}",
                s.step,
                s.loss
            );
            assert!(
                (s.grad_norm - wn).abs() <= 1e-3 * wn,
                "{name} step {}: grad norm {} vs {wn}",
                s.step,
                s.grad_norm
            );
            assert!(
                (s.lr - wlr).abs() <= 1e-12,
                "{name} step {}: lr {} vs {wlr}",
                s.step,
                s.lr
            );
        }
        let (ck_init, ck_ref) = (
            tensors(&init),
            tensors(&fx.join(case["final_adapter"].as_str().unwrap())),
        );
        let mut worst = (0f64, String::new());
        for (key, t) in trainer.adapter_tensors().unwrap() {
            let (ours, init_v, want) = (
                t.to_f32_vec().unwrap(),
                vals(&ck_init, &key),
                vals(&ck_ref, &key),
            );
            let (mut diff, mut norm) = (0f64, 0f64);
            for i in 0..ours.len() {
                let du = (ours[i] - init_v[i]) as f64;
                let dw = (want[i] - init_v[i]) as f64;
                diff += (du - dw) * (du - dw);
                norm += dw * dw;
            }
            let rel = diff.sqrt() / norm.sqrt().max(1e-12);
            if rel > worst.0 {
                worst = (rel, key.clone());
            }
        }
        println!(
            "{name}: worst relative update error {:.2e} ({})",
            worst.0, worst.1
        );
        assert!(
            worst.0 < 1e-3,
            "{name}: update of {} off by {:.2e}",
            worst.1,
            worst.0
        );
    }
}
