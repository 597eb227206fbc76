//! The backward pass against torch: the loss and every gradient of the first micro-batch of
//! the `gemma2_lora` training fixture (tests/fixtures/train_parity.json, written by
//! scripts/gen_fixtures.py with transformers + PEFT), per-op directional derivative checks, and
//! gradient checkpointing giving exactly the same gradients as without it.

mod common;

use engine::autograd::{Graph, ParamGrads};
use engine::data::batch::TokenBatch;
use engine::models::{self, LoadOptions, Model};
use engine::ops::loss::cross_entropy;
use engine::tensor::Tensor;
use serde_json::Value;

fn fixture() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("train_parity.json")).unwrap(),
    )
    .unwrap()
}

fn load(case: &Value) -> Model {
    let fx = common::fixtures();
    let quant = match case["quant"].as_str().unwrap() {
        "nf4" => models::Quant::Nf4 {
            double_quant: false,
        },
        _ => models::Quant::None,
    };
    let opts = LoadOptions {
        adapter: Some(fx.join(case["init_adapter"].as_str().unwrap())),
        quant,
        ..LoadOptions::default()
    };
    models::load(&fx.join(case["model"].as_str().unwrap()), &opts).unwrap()
}

/// (loss, gradients in `Model::trainable` order) of one micro-batch.
fn grads(
    model: &Model,
    rows: &[Value],
    smoothing: f64,
    checkpointing: bool,
) -> (f64, Vec<(String, Vec<f32>)>) {
    let params = model.trainable();
    let refs: Vec<&Tensor> = params.iter().map(|(_, t)| t).collect();
    let mut g = Graph::training(&refs, checkpointing, 0.0, 7);
    let ids: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| serde_json::from_value(r["input_ids"].clone()).unwrap())
        .collect();
    let targets: Vec<[f64; 3]> = rows
        .iter()
        .map(|r| serde_json::from_value(r["label"].clone()).unwrap())
        .collect();
    let refs_ids: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let batch = TokenBatch::from_rows(&refs_ids);
    let logits = model.forward_graph(&mut g, &batch).unwrap();
    let (loss, dlogits) = cross_entropy(logits.tensor(), &targets, smoothing).unwrap();
    let mut pg = ParamGrads::new(refs.len());
    g.backward(&logits, dlogits, &mut pg, &[]).unwrap();
    let out = params
        .iter()
        .zip(pg.into_grads())
        .map(|((name, t), gr)| {
            (
                name.clone(),
                gr.map(|g| g.to_f32_vec().unwrap())
                    .unwrap_or(vec![0.0; t.elem_count()]),
            )
        })
        .collect();
    (loss, out)
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn first_micro_batch_gradients_match_torch() {
    let fx = fixture();
    let case = &fx["cases"][0];
    assert_eq!(case["name"], "gemma2_lora");
    let model = load(case);
    let fmb = &case["first_micro_batch"];
    let rows: Vec<Value> = fmb["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| case["rows"][i.as_u64().unwrap() as usize].clone())
        .collect();
    let (loss, grads) = grads(
        &model,
        &rows,
        case["hyper"]["label_smoothing"].as_f64().unwrap(),
        false,
    );
    let want_loss = fmb["loss"].as_f64().unwrap();
    println!("loss {loss} vs torch {want_loss}");
    assert!(
        (loss - want_loss).abs() < 1e-4 * want_loss.abs().max(1.0),
        "loss {loss} vs {want_loss}"
    );
    let norms = fmb["grad_norms"].as_object().unwrap();
    assert_eq!(
        norms.len(),
        grads.len(),
        "trainable tensors: torch has {}, we have {}",
        norms.len(),
        grads.len()
    );
    let mut worst = (0f64, String::new());
    for (name, g) in &grads {
        let want = norms
            .get(name)
            .unwrap_or_else(|| panic!("no torch gradient for {name}"))
            .as_f64()
            .unwrap();
        let rel = (norm(g) - want).abs() / want.max(1e-12);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    println!("worst gradient-norm error {:.2e} ({})", worst.0, worst.1);
    assert!(
        worst.0 < 1e-3,
        "gradient norm of {} off by {:.2e}",
        worst.1,
        worst.0
    );
    let total = grads
        .iter()
        .map(|(_, g)| norm(g).powi(2))
        .sum::<f64>()
        .sqrt();
    let want_total = fmb["grad_total_norm"].as_f64().unwrap();
    assert!(
        (total - want_total).abs() / want_total < 1e-4,
        "total norm {total} vs {want_total}"
    );
    // Two tensors element by element.
    for (name, want) in fmb["grads"].as_object().unwrap() {
        let want: Vec<f32> = serde_json::from_value::<Vec<Vec<f32>>>(want.clone())
            .map(|m| m.concat())
            .or_else(|_| serde_json::from_value::<Vec<f32>>(want.clone()))
            .unwrap();
        let got = &grads
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no gradient {name}"))
            .1;
        let scale = norm(&want) / (want.len() as f64).sqrt();
        common::assert_close(name, got, &want, (1e-4 * scale) as f32, 1e-3);
    }
}

#[test]
fn checkpointing_gives_identical_gradients() {
    let fx = fixture();
    for case in fx["cases"].as_array().unwrap() {
        let model = load(case);
        let rows: Vec<Value> = case["rows"].as_array().unwrap()[..3].to_vec();
        let ls = case["hyper"]["label_smoothing"].as_f64().unwrap();
        let (l0, g0) = grads(&model, &rows, ls, false);
        let (l1, g1) = grads(&model, &rows, ls, true);
        assert_eq!(l0.to_bits(), l1.to_bits(), "{}: loss", case["name"]);
        for ((n, a), (_, b)) in g0.iter().zip(&g1) {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{}: {n} differs with checkpointing",
                case["name"]
            );
        }
    }
}
