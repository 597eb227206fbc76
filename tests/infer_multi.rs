//! Multi-worker inference, test-time augmentation and sharding, end to end on the CPU: several
//! CPU workers stand in for GPUs (each with its own model copy, batches handed out
//! dynamically), and every variant must reproduce the single-worker submission.

mod common;

use std::path::{Path, PathBuf};

use common::{demo_csv, engine, stderr, tiny_model};

fn infer(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let model = tiny_model();
    let mut args = vec![
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-length",
        "160",
        "--batch-tokens",
        "600",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    engine(&args)
}

fn infer_ok(data: &Path, out: &Path, extra: &[&str]) -> String {
    let o = infer(data, out, extra);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::read_to_string(out).unwrap()
}

/// (id, probabilities) of a submission.
fn rows(text: &str) -> Vec<(String, [f64; 3])> {
    let mut r = csv::Reader::from_reader(text.as_bytes());
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            let p = |i: usize| rec[i].parse::<f64>().unwrap();
            (rec[0].to_string(), [p(1), p(2), p(3)])
        })
        .collect()
}

/// The demo CSV with A and B exchanged (models, responses and labels).
fn swapped_csv(dir: &Path) -> PathBuf {
    let mut r = csv::Reader::from_path(demo_csv()).unwrap();
    let h = r.headers().unwrap().clone();
    let col = |n: &str| h.iter().position(|x| x == n).unwrap();
    let pairs = [
        (col("model_a"), col("model_b")),
        (col("response_a"), col("response_b")),
        (col("winner_model_a"), col("winner_model_b")),
    ];
    let path = dir.join("swapped.csv");
    let mut w = csv::Writer::from_path(&path).unwrap();
    w.write_record(&h).unwrap();
    for rec in r.records() {
        let rec = rec.unwrap();
        let mut cells: Vec<String> = rec.iter().map(str::to_string).collect();
        for &(a, b) in &pairs {
            cells.swap(a, b);
        }
        w.write_record(&cells).unwrap();
    }
    w.flush().unwrap();
    path
}

#[test]
fn cpu_workers_reproduce_the_single_worker_submission_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let one = infer_ok(&demo_csv(), &dir.path().join("one.csv"), &[]);
    let o = infer(
        &demo_csv(),
        &dir.path().join("three.csv"),
        &[
            "--cpu-workers",
            "3",
            "--log-file",
            dir.path().join("metrics.jsonl").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let three = std::fs::read_to_string(dir.path().join("three.csv")).unwrap();
    assert_eq!(
        one, three,
        "the output must not depend on which worker scored what"
    );
    // Each worker reports its share; together they scored every row.
    let e = stderr(&o);
    let shares: Vec<usize> = e
        .lines()
        .filter(|l| l.trim_start().starts_with("cpu#"))
        .map(|l| {
            let after = l.split(" batches, ").nth(1).unwrap();
            after.split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(shares.len(), 3, "{e}");
    assert_eq!(shares.iter().sum::<usize>(), rows(&one).len(), "{e}");
    // The metrics line says the same.
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "{log}");
    let m: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(m["rows"], rows(&one).len());
    assert_eq!(m["sort"], true);
    let workers = m["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "{log}");
    let seqs: u64 = workers
        .iter()
        .map(|w| w["sequences"].as_u64().unwrap())
        .sum();
    let tokens: u64 = workers.iter().map(|w| w["tokens"].as_u64().unwrap()).sum();
    assert_eq!(seqs as usize, rows(&one).len());
    assert_eq!(Some(tokens), m["tokens"].as_u64());
    assert!(m["tokens_per_s"].as_f64().unwrap() > 0.0, "{log}");
    // Per batch: [worker, rows, tokens, longest, seconds]; they add up to the run.
    let batches = m["batches"].as_array().unwrap();
    let col = |k: usize| -> u64 { batches.iter().map(|b| b[k].as_u64().unwrap()).sum() };
    assert_eq!(col(1) as usize, rows(&one).len());
    assert_eq!(Some(col(2)), m["tokens"].as_u64());
    for b in batches {
        assert!(
            b[0].as_u64().unwrap() < 3 && b[4].as_f64().unwrap() >= 0.0,
            "{b}"
        );
        assert!(b[3].as_u64().unwrap() * b[1].as_u64().unwrap() >= b[2].as_u64().unwrap());
    }
}

#[test]
fn tta_is_the_mean_of_the_plain_and_the_swapped_back_run() {
    let dir = tempfile::tempdir().unwrap();
    let plain = rows(&infer_ok(&demo_csv(), &dir.path().join("p.csv"), &[]));
    let swapped = rows(&infer_ok(
        &swapped_csv(dir.path()),
        &dir.path().join("s.csv"),
        &[],
    ));
    let tta = rows(&infer_ok(
        &demo_csv(),
        &dir.path().join("t.csv"),
        &["--tta", "--cpu-workers", "2"],
    ));
    assert_eq!(plain.len(), tta.len());
    let mut moved = 0.0f64;
    for ((p, s), t) in plain.iter().zip(&swapped).zip(&tta) {
        assert_eq!(p.0, t.0);
        assert_eq!(s.0, t.0);
        // The swapped run's A is the row's B.
        let want = [
            0.5 * (p.1[0] + s.1[1]),
            0.5 * (p.1[1] + s.1[0]),
            0.5 * (p.1[2] + s.1[2]),
        ];
        for k in 0..3 {
            assert!(
                (t.1[k] - want[k]).abs() < 3e-9,
                "id {}: tta {:?} vs {:?}",
                t.0,
                t.1,
                want
            );
        }
        moved = moved.max((t.1[0] - p.1[0]).abs());
    }
    assert!(
        moved > 1e-6,
        "TTA changed nothing: the swapped run was not used"
    );
}

#[test]
fn shards_merge_into_the_plain_submission() {
    let dir = tempfile::tempdir().unwrap();
    let plain = infer_ok(&demo_csv(), &dir.path().join("plain.csv"), &["--tta"]);
    let mut shards = Vec::new();
    for k in [2, 0, 1] {
        let p = dir.path().join(format!("shard{k}.csv"));
        let text = infer_ok(&demo_csv(), &p, &["--tta", "--shard", &format!("{k}/3")]);
        assert!(
            text.starts_with("id,winner_model_a,winner_model_b,winner_tie,row,total_rows,shard"),
            "{text}"
        );
        shards.push(p);
    }
    let out = dir.path().join("merged.csv");
    let mut args = vec!["merge"];
    args.extend(shards.iter().map(|p| p.to_str().unwrap()));
    args.extend(["--out", out.to_str().unwrap()]);
    let o = engine(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), plain);
    // Two of three shards leave a gap, and merge says which.
    let out2 = dir.path().join("gap.csv");
    let o = engine(&[
        "merge",
        shards[0].to_str().unwrap(),
        shards[1].to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("1/3"), "{}", stderr(&o));
    assert!(!out2.exists());
}

#[test]
fn bad_multi_device_arguments_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.csv");
    for (args, want) in [
        (vec!["--shard", "3/3"], "not a shard"),
        (vec!["--shard", "1"], "not a shard"),
        (vec!["--shard", "70/71"], "empty"),
        (vec!["--gpus", "0", "--cpu-workers", "2"], "exclude"),
    ] {
        let o = infer(&demo_csv(), &out, &args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        assert!(!out.exists());
    }
    // Without a GPU, --gpus says why it cannot run (with one, GPU 99 does not exist).
    let o = infer(&demo_csv(), &out, &["--gpus", "0,99"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--gpus"), "{}", stderr(&o));
}

/// `infer` with a worker fault injected (`engine::infer::FAULT_VAR`: worker W fails on its
/// batch N+1).
fn infer_failing(data: &Path, out: &Path, fault: &str, extra: &[&str]) -> std::process::Output {
    let model = tiny_model();
    let mut args = vec![
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-length",
        "160",
        "--batch-tokens",
        "600",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    std::process::Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(&args)
        .env("RAYON_NUM_THREADS", "2")
        .env(engine::infer::FAULT_VAR, fault)
        .output()
        .unwrap()
}

#[test]
fn a_failing_worker_hands_its_rows_to_the_others_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let one = infer_ok(&demo_csv(), &dir.path().join("one.csv"), &[]);
    let out = dir.path().join("two.csv");
    let o = infer_failing(&demo_csv(), &out, "1:1", &["--cpu-workers", "2"]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("cpu#1 failed holding") && e.contains("injected failure"),
        "the failed worker and the rows it held are reported: {e}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), one);
}

#[test]
fn when_every_worker_fails_the_finished_rows_go_to_a_partial_file_only() {
    let dir = tempfile::tempdir().unwrap();
    let plain = rows(&infer_ok(&demo_csv(), &dir.path().join("plain.csv"), &[]));
    let out = dir.path().join("sub.csv");
    let o = infer_failing(&demo_csv(), &out, "0:2", &[]);
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(!out.exists(), "no submission may be written: {e}");
    let partial = dir.path().join("sub.csv.partial.csv");
    assert!(
        e.contains("were not scored") && e.contains(partial.to_str().unwrap()),
        "{e}"
    );
    // The two finished batches are kept, with the values the full run gives.
    let kept = engine::shard::read(&partial).unwrap();
    assert!(
        !kept.rows.is_empty() && kept.rows.len() < plain.len(),
        "{e}"
    );
    assert_eq!(kept.total_rows, plain.len());
    for r in &kept.rows {
        let (id, p) = &plain[r.row];
        assert_eq!(&r.id, id);
        for k in 0..3 {
            assert!(
                (r.probs[k] - p[k]).abs() < 2e-9,
                "{} {:?} {:?}",
                id,
                r.probs,
                p
            );
        }
    }
    // And the partial file is not mistaken for a complete one.
    let merged = dir.path().join("merged.csv");
    let m = engine(&[
        "merge",
        partial.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(!m.status.success() && !merged.exists(), "{}", stderr(&m));

    // A run for another shard split cannot use it.
    let o = infer(&demo_csv(), &out, &["--resume", "--shard", "0/2"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    assert!(partial.exists() && !out.exists());

    // The same command with --resume scores only the rest and ends with the full run's file.
    let o = infer(&demo_csv(), &out, &["--resume"]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains(&format!(
            "resuming: {} of {} rows",
            kept.rows.len(),
            plain.len()
        )),
        "{e}"
    );
    let resumed = rows(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(resumed.len(), plain.len());
    for ((a, p), (b, q)) in plain.iter().zip(&resumed) {
        assert_eq!(a, b);
        for k in 0..3 {
            assert!((p[k] - q[k]).abs() < 2e-9, "{a}: {p:?} vs {q:?}");
        }
    }
    assert!(!partial.exists(), "the partial file is consumed");
}
