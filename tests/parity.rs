//! Parity with the Hugging Face reference: token ids and class probabilities of tiny Gemma-2
//! and Llama models against fixtures written by `scripts/gen_fixtures.py` (transformers eager
//! attention in f32, PEFT, bitsandbytes NF4).
//!
//! Two references per case: transformers on the CPU in f32 with NF4 applied as bitsandbytes'
//! quantise → dequantise round trip (`cases.json`), and transformers with bitsandbytes' own
//! `Linear4bit` layers on an H200 in f32 (`cases_cuda.json`, `--cuda-ground-truth`). For
//! double quantisation only the CUDA one is the reference: bitsandbytes' CPU path picks nested
//! absmax codes by a 65,536-point grid instead of the CUDA kernels' nearest-code search, which
//! moves these tiny models' probabilities by up to 5e-4 (the CPU fixture keeps the CUDA-rule
//! variant as `probs_cuda_nested`).
//!
//! Tolerance: probabilities within 1e-4 (DESIGN.md §4 — f32 on both sides; the remaining
//! differences are summation order in matmuls and reductions, ~1e-6 here).

mod common;

use engine::data::batch::TokenBatch;
use engine::data::csv::ArenaRow;
use engine::data::format::TextFormat;
use engine::data::json_list;
use engine::models::{self, LoadOptions, Quant};
use serde_json::Value;

const PROB_TOL: f64 = 1e-4;

fn rows(cases: &Value) -> Vec<ArenaRow> {
    cases["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let cell = |k: &str| json_list::parse(r[k].as_str().unwrap()).unwrap();
            ArenaRow {
                id: r["id"].as_str().unwrap().to_string(),
                prompt: cell("prompt"),
                response_a: cell("response_a"),
                response_b: cell("response_b"),
                label: None,
            }
        })
        .collect()
}

#[test]
fn probabilities_and_ids_match_transformers() {
    let fx = common::fixtures();
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("cases.json")).unwrap()).unwrap();
    let cuda: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("cases_cuda.json")).unwrap())
            .unwrap();
    let rows = rows(&cases);
    let mut failures = Vec::new();
    println!(
        "{:<28} {:>14} {:>14} {:>16}",
        "case", "max|Δp| cpu", "max|Δlogit| cpu", "max|Δp| cuda-bnb"
    );
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let quant = match (
            case["quant"].as_str().unwrap(),
            case["double_quant"].as_bool().unwrap(),
        ) {
            ("none", _) => Quant::None,
            ("nf4", dq) => Quant::Nf4 { double_quant: dq },
            (q, _) => panic!("unknown quant {q}"),
        };
        let adapter = case["adapter"].as_str().map(|a| fx.join(a));
        let dir = fx.join(case["model"].as_str().unwrap());
        let opts = LoadOptions {
            quant,
            adapter,
            ..LoadOptions::default()
        };
        let model = models::load(&dir, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let max_length = case["max_length"].as_u64().unwrap() as usize;
        let enc = engine::infer::encoder_for(
            &models::read_header(&dir).unwrap(),
            &dir,
            None,
            TextFormat::Concat,
            max_length,
        )
        .unwrap();
        let ids = engine::infer::tokenize(&enc, &rows).unwrap();
        let want_ids: Vec<Vec<u32>> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        for (i, (got, want)) in ids.iter().zip(&want_ids).enumerate() {
            if got != want {
                failures.push(format!(
                    "{name}: row {i} token ids differ:\n  got  {got:?}\n  want {want:?}"
                ));
            }
        }
        // All rows in one packed batch: rows must not see each other.
        let refs: Vec<&[u32]> = want_ids.iter().map(Vec::as_slice).collect();
        let logits = model.forward(&TokenBatch::from_rows(&refs)).unwrap();
        let probs = models::probabilities(&logits).unwrap();
        let logits = logits.to_f32_vec().unwrap();
        let dq = case["double_quant"].as_bool().unwrap();
        let cpu_key = if dq { "probs_cuda_nested" } else { "probs" };
        let cpu_logits_key = if dq { "logits_cuda_nested" } else { "logits" };
        let want_p: Vec<[f64; 3]> = serde_json::from_value(case[cpu_key].clone()).unwrap();
        let want_l: Vec<[f64; 3]> = serde_json::from_value(case[cpu_logits_key].clone()).unwrap();
        let want_cuda: Vec<[f64; 3]> =
            serde_json::from_value(cuda["cases"][name]["probs"].clone()).unwrap();
        let max_dp = |want: &[[f64; 3]]| {
            (0..want.len())
                .flat_map(|r| (0..3).map(move |k| (r, k)))
                .map(|(r, k)| (probs[r][k] - want[r][k]).abs())
                .fold(0f64, f64::max)
        };
        let (dp, dpc) = (max_dp(&want_p), max_dp(&want_cuda));
        let dl = (0..want_l.len())
            .flat_map(|r| (0..3).map(move |k| (r, k)))
            .map(|(r, k)| (logits[r * 3 + k] as f64 - want_l[r][k]).abs())
            .fold(0f64, f64::max);
        println!("{name:<28} {dp:>14.3e} {dl:>14.3e} {dpc:>16.3e}");
        if dp > PROB_TOL || dpc > PROB_TOL {
            failures.push(format!("{name}: max |Δp| = {dp:.3e} (CPU reference), {dpc:.3e} (CUDA bitsandbytes) > {PROB_TOL:e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
