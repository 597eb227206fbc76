//! Data-parallel training on the CPU: several CPU ranks (threads, summing gradients through the
//! in-process collective) stand in for GPUs over NCCL. With the same global batch the adapter
//! after N steps equals the single-rank run's within summation-order tolerance, the losses
//! logged per step agree, and a resumed data-parallel run continues from rank 0's checkpoint.

mod common;

use std::path::Path;

use common::{demo_csv, engine, stderr, tiny_model};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn train(out: &Path, log: &Path, extra: &[&str]) -> std::process::Output {
    let model = tiny_model();
    let data = demo_csv();
    let mut args = vec![
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(out),
        "--epochs",
        "1",
        "--batch-size",
        "3",
        "--grad-accum",
        "4",
        "--lr",
        "2e-3",
        "--max-length",
        "160",
        "--lora-dropout",
        "0.1",
        "--swap-augment",
        "--log-file",
        s(log),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    engine(&args)
}

/// The adapter's tensors by name (f32 values).
fn adapter(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let v = match view.dtype() {
                safetensors::Dtype::F32 => bytemuck::pod_collect_to_vec(view.data()),
                d => panic!("{name}: unexpected dtype {d:?}"),
            };
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Per-step (loss, grad_norm) from a JSON-lines log.
fn steps(log: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn cpu_ranks_match_the_single_rank_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = train(&d.join("one"), &d.join("one.jsonl"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let base = adapter(&d.join("one"));
    let base_steps = steps(&d.join("one.jsonl"));
    // 60 rows / 3 per micro-batch = 20 micro-batches = 5 steps of 4.
    assert_eq!(base_steps.len(), 5);
    for ranks in ["2", "3"] {
        let out = d.join(format!("r{ranks}"));
        let log = d.join(format!("r{ranks}.jsonl"));
        let o = train(&out, &log, &["--cpu-ranks", ranks]);
        assert!(o.status.success(), "{ranks} ranks: {}", stderr(&o));
        if ranks == "3" {
            assert!(
                stderr(&o).contains("not a multiple"),
                "4 micro-batches over 3 ranks should warn: {}",
                stderr(&o)
            );
        }
        // Rank 0 alone logs: one line per step.
        let got_steps = steps(&log);
        assert_eq!(got_steps.len(), base_steps.len(), "{ranks} ranks");
        for (i, (a, b)) in base_steps.iter().zip(&got_steps).enumerate() {
            assert!(
                (a.0 - b.0).abs() <= 1e-5 * a.0.abs().max(1.0),
                "{ranks} ranks, step {i}: loss {} vs {}",
                a.0,
                b.0
            );
            assert!(
                (a.1 - b.1).abs() <= 1e-4 * a.1.abs().max(1e-3),
                "{ranks} ranks, step {i}: grad norm {} vs {}",
                a.1,
                b.1
            );
        }
        let got = adapter(&out);
        assert_eq!(got.len(), base.len());
        let mut worst = 0f64;
        for ((na, a), (nb, b)) in base.iter().zip(&got) {
            assert_eq!(na, nb);
            let scale = a.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)).max(1e-3);
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((*x as f64 - *y as f64).abs() / scale);
            }
        }
        // Five AdamW steps at lr 2e-3 from the same start: the only difference is the order in
        // which micro-batch gradients are summed (f32), amplified by Adam's normalisation.
        assert!(
            worst < 2e-4,
            "{ranks} ranks: adapter differs by {worst:e} (relative)"
        );
        eprintln!("{ranks} CPU ranks: adapter max relative difference {worst:.2e}");
    }
}

#[test]
fn a_data_parallel_run_resumes_from_rank_0s_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = train(
        &d.join("full"),
        &d.join("full.jsonl"),
        &["--cpu-ranks", "2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // Stop after 3 of 5 steps: a run with fewer epochs is not the same run, so simulate the
    // kill by keeping the checkpoint of step 2 (--checkpoint-every 2) of an interrupted run.
    let out = d.join("resumed");
    let ckpt = d.join("resumed.checkpoint");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_engine"))
        .args([
            "train",
            "--model",
            s(&tiny_model()),
            "--data",
            s(&demo_csv()),
            "--out",
            s(&out),
            "--epochs",
            "1",
            "--batch-size",
            "3",
            "--grad-accum",
            "4",
            "--lr",
            "2e-3",
            "--max-length",
            "160",
            "--lora-dropout",
            "0.1",
            "--swap-augment",
            "--checkpoint-every",
            "2",
            "--cpu-ranks",
            "2",
            "--quiet",
        ])
        .env("RAYON_NUM_THREADS", "2")
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !ckpt.join("trainer_state.json").exists()
        && t.elapsed() < std::time::Duration::from_secs(60)
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ckpt.join("trainer_state.json").exists(),
        "no checkpoint appeared"
    );
    let o = train(
        &out,
        &d.join("resumed.jsonl"),
        &["--cpu-ranks", "2", "--resume", "--checkpoint-every", "2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let a = adapter(&d.join("full"));
    let b = adapter(&out);
    assert!(
        a == b,
        "the resumed 2-rank run must end with exactly the uninterrupted 2-rank run's adapter"
    );
}

#[test]
fn a_launched_job_without_a_gpu_device_is_refused_before_any_work() {
    // torchrun sets WORLD_SIZE for every process; training each rank alone on the CPU would
    // have every process write the same adapter. The launch variables are checked first.
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("adapter");
    let model = tiny_model();
    let data = demo_csv();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_engine"))
        .args([
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out),
        ])
        .env("WORLD_SIZE", "2")
        .env("RANK", "1")
        .env("LOCAL_RANK", "1")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "29517")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("rank 1 of a 2-rank launch") && e.contains("--device cuda"),
        "{e}"
    );
    assert!(!out.exists());
    // A malformed launch variable is named.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_engine"))
        .args([
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out),
        ])
        .env("WORLD_SIZE", "two")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("WORLD_SIZE=`two`"), "{}", stderr(&o));
}
