//! `engine train` end to end on the bundled tiny model: it learns a synthetic signal and
//! `engine infer --adapter` reproduces the log loss training reported; a killed run resumed from
//! its checkpoint ends bit-identical to an uninterrupted one; recipes and flags resolve as
//! documented; bad input fails clearly without writing an adapter.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{demo_csv, engine, stderr, tiny_model};

const HEADER: &str =
    "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n";

/// A synthetic arena set with a learnable signal: the winning response contains "correct" and
/// the losing one "wrong"; ties have neither. Filler words are drawn from a small vocabulary.
fn synthetic(path: &Path, n: usize, seed: u64) {
    let filler = [
        "the", "a", "model", "answer", "question", "result", "value", "data", "first", "second",
        "reason", "example",
    ];
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = |m: usize| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) % m as u64) as usize
    };
    let mut text = String::from(HEADER);
    for i in 0..n {
        let class = next(3);
        let mut resp = |marker: Option<&str>| {
            let mut w: Vec<&str> = (0..8 + next(12))
                .map(|_| filler[next(filler.len())])
                .collect();
            if let Some(m) = marker {
                let at = next(w.len() + 1);
                w.insert(at, m);
            }
            format!("\"[\"\"{}\"\"]\"", w.join(" "))
        };
        let (a, b) = match class {
            0 => (Some("correct"), Some("wrong")),
            1 => (Some("wrong"), Some("correct")),
            _ => (None, None),
        };
        let (p, ra, rb) = (resp(None), resp(a), resp(b));
        let mut lab = [0; 3];
        lab[class] = 1;
        text += &format!("{i},x,y,{p},{ra},{rb},{},{},{}\n", lab[0], lab[1], lab[2]);
    }
    std::fs::write(path, text).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn learns_a_synthetic_signal_and_infer_reproduces_the_eval_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (train, val, out, log) = (
        dir.path().join("train.csv"),
        dir.path().join("val.csv"),
        dir.path().join("ad"),
        dir.path().join("log.jsonl"),
    );
    synthetic(&train, 240, 1);
    synthetic(&val, 60, 2);
    let model = tiny_model();
    let o = engine(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&train),
        "--eval-data",
        s(&val),
        "--out",
        s(&out),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "5",
        "--max-length",
        "256",
        "--log-file",
        s(&log),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 60, "2 epochs × 30 steps");
    let reported = lines.last().unwrap()["eval_log_loss"].as_f64().unwrap();
    let first = lines[0]["loss"].as_f64().unwrap();
    eprintln!("first step loss {first:.4}, final eval log loss {reported:.4}");
    assert!(
        reported < 0.5,
        "the tiny model should learn the signal (ln 3 = 1.0986); eval log loss {reported}"
    );
    let sub = dir.path().join("sub.csv");
    let o = engine(&[
        "infer",
        "--model",
        s(&model),
        "--adapter",
        s(&out),
        "--data",
        s(&val),
        "--out",
        s(&sub),
        "--max-length",
        "256",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = engine(&["eval", "--pred", s(&sub), "--labels", s(&val)]);
    let text = String::from_utf8_lossy(&e.stdout).into_owned();
    let ll: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("log_loss "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        (ll - reported).abs() < 1e-6,
        "infer gives {ll}, training reported {reported}"
    );
}

fn train_args(model: &Path, data: &Path, out: &Path) -> Vec<String> {
    [
        "train",
        s(model),
        s(data),
        s(out),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--lr",
        "2e-3",
        "--max-length",
        "200",
        "--checkpoint-every",
        "2",
        "--lora-dropout",
        "0.1",
        "--swap-augment",
        "--quiet",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect::<Vec<_>>()
    .into_iter()
    .enumerate()
    .flat_map(|(i, a)| match i {
        1 => vec!["--model".to_string(), a],
        2 => vec!["--data".to_string(), a],
        3 => vec!["--out".to_string(), a],
        _ => vec![a],
    })
    .collect()
}

#[test]
fn a_killed_run_resumes_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let data = demo_csv();
    let full = dir.path().join("full");
    let args = train_args(&model, &data, &full);
    let o = engine(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));

    let resumed = dir.path().join("resumed");
    let ckpt = PathBuf::from(format!("{}.checkpoint", resumed.display()));
    let args = train_args(&model, &data, &resumed);
    let mut child = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(&args)
        .env("RAYON_NUM_THREADS", "2")
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !ckpt.join("trainer_state.json").exists() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ckpt.join("trainer_state.json").exists(),
        "no checkpoint appeared"
    );
    let mut args = args;
    args.push("--resume".into());
    let o = engine(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("resuming from") || !ckpt.exists(), "{err}");
    let a = std::fs::read(full.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed run must end with exactly the uninterrupted run's adapter"
    );
    assert!(
        !ckpt.exists(),
        "the checkpoint is removed once the adapter is written"
    );
}

#[test]
fn recipes_and_flags_resolve_into_the_adapter_config() {
    let dir = tempfile::tempdir().unwrap();
    let llama = dir.path().join("llama");
    let o = engine(&[
        "init-model",
        "--preset",
        "tiny",
        "--arch",
        "llama",
        "--out",
        s(&llama),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let data = dir.path().join("d.csv");
    synthetic(&data, 8, 3);
    let out = dir.path().join("ad");
    let o = engine(&[
        "train",
        "--recipe",
        "llama3.1-8b",
        "--model",
        s(&llama),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--lora-alpha",
        "8",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 32);
    assert_eq!(cfg["lora_alpha"], 8.0, "explicit flags override the recipe");
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["k_proj", "o_proj", "q_proj", "v_proj"])
    );
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([2, 3]));
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let o = engine(&["train", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    for default in [
        "[default: 1024; recipes 1536 / 1280]",
        "[default: 2e-4; recipes 8e-5 / 1.2e-4]",
        "[default: 4]",
    ] {
        assert!(help.contains(default), "help lacks {default}");
    }
}

#[test]
fn bad_training_input_fails_clearly_without_an_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let out = dir.path().join("ad");
    let run = |data: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            s(&model),
            "--data",
            s(data),
            "--out",
            s(&out),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let o = engine(&args);
        assert!(!o.status.success(), "should fail: {extra:?}");
        assert!(!out.exists(), "no adapter may be written");
        stderr(&o)
    };
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        format!("{HEADER}1,x,y,\"[\"\"q\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",0,0,0\n"),
    )
    .unwrap();
    let e = run(&bad, &[]);
    assert!(
        e.contains("bad.csv") && e.contains("row 1") && e.contains("sum to 0"),
        "{e}"
    );
    std::fs::write(
        &bad,
        format!("{HEADER}1,x,y,\"[\"\"q\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",0.5,0.6,0\n"),
    )
    .unwrap();
    let e = run(&bad, &[]);
    assert!(e.contains("sum to 1.1"), "{e}");
    std::fs::write(
        &bad,
        format!("{HEADER}1,x,y,\"[\"\"q\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",yes,0,0\n"),
    )
    .unwrap();
    let e = run(&bad, &[]);
    assert!(
        e.contains("winner_model_a") && e.contains("not a number"),
        "{e}"
    );
    let adapter = common::fixtures().join("gemma2_adapter");
    let e = run(&demo_csv(), &["--init-adapter", s(&adapter)]);
    assert!(
        e.contains("gemma2_adapter") && e.contains("LoRA for"),
        "{e}"
    );
    let e = run(&demo_csv(), &["--freeze-layers", "4"]);
    assert!(
        e.contains("--freeze-layers 4 leaves nothing to train"),
        "{e}"
    );
    let e = run(&demo_csv(), &["--target-modules", "query_key_value"]);
    assert!(e.contains("match no projection"), "{e}");
    // A checkpoint from another configuration is refused on --resume. (A long run, killed as
    // soon as its first checkpoint exists.)
    let long = dir.path().join("long.csv");
    synthetic(&long, 400, 5);
    let ckpt_args = [
        "--max-length",
        "128",
        "--checkpoint-every",
        "1",
        "--epochs",
        "2",
    ];
    let mut args = vec![
        "train",
        "--model",
        s(&model),
        "--data",
        s(&long),
        "--out",
        s(&out),
        "--quiet",
    ];
    args.extend_from_slice(&ckpt_args);
    let mut child = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(&args)
        .spawn()
        .unwrap();
    let ckpt = PathBuf::from(format!("{}.checkpoint", out.display()));
    let t = Instant::now();
    while !ckpt.join("trainer_state.json").exists() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !out.exists() && ckpt.exists(),
        "the run should have been killed with a checkpoint and no adapter"
    );
    let e = run(
        &long,
        &[
            "--max-length",
            "128",
            "--checkpoint-every",
            "1",
            "--epochs",
            "2",
            "--lr",
            "5e-4",
            "--resume",
        ],
    );
    assert!(
        e.contains("checkpoint was written for a different run") && e.contains("hyper-parameters"),
        "{e}"
    );
}
