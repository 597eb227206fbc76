//! The command line end to end: the demo, a valid submission, eval, and bad input — each bad
//! input a clear error naming file/row/field, a non-zero exit, and no output file.

mod common;

use std::path::Path;

use common::{copy_dir, demo_csv, engine, stderr, tiny_model};

fn infer_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "infer", "--model", model, "--data", data, "--out", out, "--quiet",
    ]
}

/// Run infer expecting failure; return stderr after checking no output appeared.
fn infer_fails(model: &Path, data: &Path, out: &Path) -> String {
    let o = engine(&infer_args(
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    ));
    assert!(
        !o.status.success(),
        "infer should fail; stderr: {}",
        stderr(&o)
    );
    assert!(
        !out.exists(),
        "a failed run must not leave {}",
        out.display()
    );
    let e = stderr(&o);
    assert!(e.starts_with("error: ") || e.contains("\nerror: "), "{e}");
    e
}

#[test]
fn demo_prints_submission_and_log_loss() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d");
    let o = engine(&["demo", "--out-dir", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("submission:") && s.contains("log loss:"), "{s}");
    assert!(out.join("submission.csv").exists());
}

#[test]
fn infer_writes_a_valid_submission_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sub.csv");
    let model = tiny_model();
    let o = engine(&[
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--data",
        demo_csv().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quant",
        "nf4",
        "--double-quant",
        "--max-length",
        "200",
        "--batch-tokens",
        "1000",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&out).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("id,winner_model_a,winner_model_b,winner_tie")
    );
    let data = engine::data::csv::read_arena_csv(&demo_csv(), engine::data::csv::Labels::Required)
        .unwrap();
    let mut n = 0;
    for (line, row) in lines.zip(&data.rows) {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f[0], row.id, "rows must be in input order");
        let p: Vec<f64> = f[1..].iter().map(|x| x.parse().unwrap()).collect();
        assert!(p.iter().all(|&x| (0.0..=1.0).contains(&x)));
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{line}");
        n += 1;
    }
    assert_eq!(n, data.rows.len());

    // eval on its own output agrees with a recomputation.
    let o = engine(&[
        "eval",
        "--pred",
        out.to_str().unwrap(),
        "--labels",
        demo_csv().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("log_loss"));
}

#[test]
fn eval_rejects_id_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let pred = dir.path().join("p.csv");
    std::fs::write(
        &pred,
        "id,winner_model_a,winner_model_b,winner_tie\n999,0.2,0.3,0.5\n",
    )
    .unwrap();
    let o = engine(&[
        "eval",
        "--pred",
        pred.to_str().unwrap(),
        "--labels",
        demo_csv().to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("ids do not match") && e.contains("999") && e.contains("p.csv"),
        "{e}"
    );
}

const HEADER: &str = "id,prompt,response_a,response_b\n";

#[test]
fn bad_csv_input_is_reported_with_file_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let out = dir.path().join("out.csv");
    let cases: &[(&str, String, &[&str])] = &[
        (
            "malformed.csv",
            format!("{HEADER}1,\"[\"\"a\"\"]\",\"[\"\"b\"\"]\"\n"),
            &["malformed.csv", "row 1", "malformed CSV"],
        ),
        (
            "notlist.csv",
            format!("{HEADER}1,[\"\"],[\"b\"],[\"c\"]\n2,hello,[\"b\"],[\"c\"]\n"),
            &["row 2", "`prompt`", "not a JSON list"],
        ),
        (
            "missing.csv",
            "id,prompt,response_a\n1,[],[]\n".to_string(),
            &["missing column", "response_b"],
        ),
        (
            "dup.csv",
            format!("{HEADER}5,[],[],[]\n6,[],[],[]\n5,[],[],[]\n"),
            &["row 3", "duplicate id `5`", "row 1"],
        ),
        (
            "quote.csv",
            format!("{HEADER}1,\"[\"\"unterminated],[],[]\n"),
            &["quote.csv"],
        ),
    ];
    for (name, text, needles) in cases {
        let data = dir.path().join(name);
        std::fs::write(&data, text).unwrap();
        let e = infer_fails(&model, &data, &out);
        for n in *needles {
            assert!(e.contains(n), "{name}: expected `{n}` in: {e}");
        }
    }
}

#[test]
fn odd_but_real_rows_are_scored_with_one_warning() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("odd.csv");
    std::fs::write(
        &data,
        format!(
            "{HEADER}1,\"[\"\"q1\"\",\"\"q2\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\"\n2,[],[],[]\n3,\"[\"\"q\"\"]\",[null],[null]\n\
             4,\"[\"\"\\ud83d lone surrogate, 中文 😀\"\"]\",\"[\"\"\\ude00\"\"]\",\"[\"\"ok\"\"]\"\n"
        ),
    )
    .unwrap();
    let out = dir.path().join("out.csv");
    let model = tiny_model();
    let o = engine(&infer_args(
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(e.matches("different turn counts").count(), 1, "{e}");
    assert!(e.contains("1 row(s) have an empty list"), "{e}");
    assert!(e.contains("all null"), "{e}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 5);
}

/// Copy the tiny model and break it with `f`.
fn broken_model(dir: &Path, f: impl FnOnce(&Path)) -> std::path::PathBuf {
    let m = dir.join("model");
    copy_dir(&tiny_model(), &m);
    f(&m);
    m
}

fn rewrite_tensor(model: &Path, name: &str, new_shape: Option<Vec<usize>>) {
    use engine::weights::{Checkpoint, save_safetensors};
    let ck = Checkpoint::open_model_dir(model).unwrap();
    let mut tensors = Vec::new();
    let mut names: Vec<String> = ck.names().map(String::from).collect();
    names.sort();
    for n in names {
        let e = ck.entry(&n).unwrap().clone();
        let (bytes, dtype) = ck.bytes(&n, &e.shape).unwrap();
        let mut shape = e.shape.clone();
        let mut bytes = bytes.to_vec();
        if n == name {
            match &new_shape {
                None => continue,
                Some(s) => {
                    shape = s.clone();
                    bytes.truncate(s.iter().product::<usize>() * dtype.size_in_bytes());
                }
            }
        }
        tensors.push((n, dtype, shape, bytes));
    }
    drop(ck);
    save_safetensors(&model.join("model.safetensors"), &tensors, None).unwrap();
}

#[test]
fn bad_models_are_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = demo_csv();
    let q = "model.layers.1.self_attn.q_proj.weight";
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, Vec<&str>)> = vec![
        (
            "model_type",
            Box::new(|m: &Path| {
                let c = std::fs::read_to_string(m.join("config.json")).unwrap();
                std::fs::write(m.join("config.json"), c.replace("\"gemma2\"", "\"gpt2\"")).unwrap();
            }),
            vec!["config.json", "model_type `gpt2`", "not supported"],
        ),
        (
            "wrong shape",
            Box::new(move |m: &Path| rewrite_tensor(m, q, Some(vec![64, 64]))),
            vec![q, "[64, 64]", "[128, 64]"],
        ),
        (
            "missing",
            Box::new(move |m: &Path| rewrite_tensor(m, q, None)),
            vec!["missing tensor", q],
        ),
        (
            "truncated",
            Box::new(|m: &Path| {
                let p = m.join("model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            }),
            vec!["model.safetensors", "truncated"],
        ),
        (
            "tokenizer",
            Box::new(|m: &Path| {
                let p = m.join("tokenizer.json");
                let mut t: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                t["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
                    "id": 5000, "content": "<extra_5000>", "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true
                }));
                std::fs::write(&p, t.to_string()).unwrap();
            }),
            vec!["tokenizer.json", "token ids reach", "1024 rows"],
        ),
    ];
    for (i, (what, breaker, needles)) in cases.into_iter().enumerate() {
        let sub = dir.path().join(format!("c{i}"));
        let m = broken_model(&sub, breaker);
        let out = sub.join("out.csv");
        let e = infer_fails(&m, &data, &out);
        for n in needles {
            assert!(e.contains(n), "{what}: expected `{n}` in: {e}");
        }
    }
}

#[test]
fn adapter_that_does_not_fit_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.csv");
    // The Gemma-2 fixture adapter (hidden 64, q width 96) on the tiny model (q width 128).
    let adapter = common::fixtures().join("gemma2_adapter");
    let model = tiny_model();
    let o = engine(&[
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        demo_csv().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("gemma2_adapter") && e.contains("LoRA for `model.layers.1.self_attn.q_proj`"),
        "{e}"
    );
    assert!(!out.exists());
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn non_finite_probabilities_fail_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let m = broken_model(dir.path(), |m| {
        edit_json(&m.join("config.json"), |c| {
            c["rms_norm_eps"] = (-1.0).into()
        })
    });
    let e = infer_fails(&m, &demo_csv(), &dir.path().join("out.csv"));
    assert!(
        e.contains("non-finite probabilities") && e.contains("rms_norm_eps"),
        "{e}"
    );
}

#[test]
fn ids_are_csv_quoted_in_the_submission() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ids.csv");
    std::fs::write(
        &data,
        format!("{HEADER}\"a,b\",[\"q\"],[\"x\"],[\"y\"]\n\"q\"\"x\",[\"q\"],[\"x\"],[\"y\"]\n"),
    )
    .unwrap();
    let out = dir.path().join("out.csv");
    let model = tiny_model();
    let o = engine(&infer_args(
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let read = engine::predictions::read(&out).unwrap();
    assert_eq!(
        read.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["a,b", "q\"x"]
    );
}

#[test]
fn tokenizer_truncation_and_padding_settings_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let run = |m: &Path, name: &str| {
        let out = dir.path().join(name);
        let o = engine(&infer_args(
            m.to_str().unwrap(),
            demo_csv().to_str().unwrap(),
            out.to_str().unwrap(),
        ));
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read_to_string(out).unwrap()
    };
    let plain = run(&model, "plain.csv");
    let m = broken_model(dir.path(), |m| {
        edit_json(&m.join("tokenizer.json"), |t| {
            t["truncation"] = serde_json::json!({"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0});
            t["padding"] = serde_json::json!({"strategy": {"Fixed": 600}, "direction": "Right", "pad_to_multiple_of": null,
                                              "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"});
        })
    });
    assert_eq!(run(&m, "edited.csv"), plain);
}

#[test]
fn out_must_be_a_writable_file_and_is_checked_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let o = engine(&infer_args(
        model.to_str().unwrap(),
        demo_csv().to_str().unwrap(),
        dir.path().to_str().unwrap(),
    ));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is a directory"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no temporary file may be left behind"
    );
}

#[test]
fn init_model_replaces_a_directory_whole() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let o = engine(&[
        "init-model",
        "--preset",
        "tiny",
        "--out",
        out.to_str().unwrap(),
        "--max-shard-mib",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("model.safetensors.index.json").exists());
    let o = engine(&[
        "init-model",
        "--preset",
        "tiny",
        "--out",
        out.to_str().unwrap(),
        "--seed",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no staging directory may be left behind"
    );
}

#[test]
fn adapter_weights_outside_its_own_targets_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    copy_dir(&common::fixtures().join("gemma2_adapter"), &adapter);
    edit_json(&adapter.join("adapter_config.json"), |c| {
        c["layers_to_transform"] = serde_json::json!([1, 2])
    });
    let out = dir.path().join("out.csv");
    let model = common::fixtures().join("gemma2_bf16_sharded");
    let o = engine(&[
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        demo_csv().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("model.layers.3.") && e.contains("does not target"),
        "{e}"
    );
    assert!(!out.exists());
}
