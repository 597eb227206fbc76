//! `engine ensemble`: averaging against hand-computed values, weight handling, id checks, the
//! weight search against a fine grid, scoring with --labels, and the post-processing rules.
//! Every output the binary writes is checked to be a valid submission (rows in [0, 1] summing
//! to 1 within 1e-6).

mod common;

use std::path::{Path, PathBuf};

use common::{engine, stderr};
use engine::data::csv::ArenaRow;
use engine::ensemble::{Mode, Rule, combine, cross_validate, is_empty_response, search_weights};
use engine::metrics::log_loss;
use serde_json::Value;

type Row = (&'static str, [f64; 3]);

/// Write a prediction file (full precision, so hand values survive).
fn write_pred(path: &Path, rows: &[(String, [f64; 3])]) {
    let mut s = String::from("id,winner_model_a,winner_model_b,winner_tie\n");
    for (id, p) in rows {
        s += &format!("{id},{},{},{}\n", p[0], p[1], p[2]);
    }
    std::fs::write(path, s).unwrap();
}

fn pred(dir: &Path, name: &str, rows: &[Row]) -> PathBuf {
    let p = dir.join(name);
    let rows: Vec<(String, [f64; 3])> = rows.iter().map(|(i, p)| (i.to_string(), *p)).collect();
    write_pred(&p, &rows);
    p
}

/// One arena row for a test CSV: id, response_a, response_b (turn lists), label.
struct Arena<'a> {
    id: &'a str,
    a: Vec<Option<&'a str>>,
    b: Vec<Option<&'a str>>,
    label: Option<[f64; 3]>,
}

fn arena(id: &str, a: Vec<Option<&'static str>>, b: Vec<Option<&'static str>>) -> Arena<'static> {
    Arena {
        id: Box::leak(id.to_string().into_boxed_str()),
        a,
        b,
        label: None,
    }
}

/// Write an arena CSV (with winner columns when every row has a label).
fn write_arena(path: &Path, rows: &[Arena]) {
    let labelled = rows.iter().all(|r| r.label.is_some());
    let mut w = csv::Writer::from_path(path).unwrap();
    let mut head = vec!["id", "prompt", "response_a", "response_b"];
    if labelled {
        head.extend(["winner_model_a", "winner_model_b", "winner_tie"]);
    }
    w.write_record(&head).unwrap();
    for r in rows {
        let turns = r.a.len().max(r.b.len()).max(1);
        let prompt = serde_json::to_string(&vec!["q"; turns]).unwrap();
        let mut rec = vec![
            r.id.to_string(),
            prompt,
            serde_json::to_string(&r.a).unwrap(),
            serde_json::to_string(&r.b).unwrap(),
        ];
        if let Some(l) = r.label {
            rec.extend(l.iter().map(|v| v.to_string()));
        }
        w.write_record(&rec).unwrap();
    }
    w.flush().unwrap();
}

/// Read an output file, asserting it is a valid submission.
fn read_valid(path: &Path) -> Vec<(String, [f64; 3])> {
    let rows = engine::predictions::read(path).unwrap();
    for (id, p) in &rows {
        assert!(p.iter().all(|v| (0.0..=1.0).contains(v)), "{id}: {p:?}");
        let s: f64 = p.iter().sum();
        assert!((s - 1.0).abs() < 1e-6, "{id}: sums to {s}");
    }
    rows
}

fn close(a: [f64; 3], b: [f64; 3], tol: f64) -> bool {
    (0..3).all(|k| (a[k] - b[k]).abs() <= tol)
}

struct Run {
    ok: bool,
    code: Option<i32>,
    err: String,
    json: Option<Value>,
}

fn run(args: &[&str]) -> Run {
    let o = engine(args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    let json = if o.status.success() {
        assert_eq!(
            lines.len(),
            1,
            "stdout must be exactly one JSON line: {out}"
        );
        Some(serde_json::from_str(lines[0]).expect("stdout is JSON"))
    } else {
        None
    };
    Run {
        ok: o.status.success(),
        code: o.status.code(),
        err: stderr(&o),
        json,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn weights_of(j: &Value) -> Vec<f64> {
    j["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

const A: &[Row] = &[("r1", [0.2, 0.3, 0.5]), ("r2", [0.1, 0.1, 0.8])];
// Same ids, other order: the output must follow the first file.
const B: &[Row] = &[("r2", [0.5, 0.25, 0.25]), ("r1", [0.6, 0.1, 0.3])];

#[test]
fn prob_and_logit_averages_match_hand_values() {
    let dir = tempfile::tempdir().unwrap();
    let a = pred(dir.path(), "a.csv", A);
    let b = pred(dir.path(), "b.csv", B);
    let out = dir.path().join("ens.csv");

    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--pred",
        s(&b),
        "--weights",
        "0.75,0.25",
        "--out",
        s(&out),
    ]);
    assert!(r.ok, "{}", r.err);
    let rows = read_valid(&out);
    assert_eq!(rows[0].0, "r1");
    assert_eq!(rows[1].0, "r2");
    // 0.75·a + 0.25·b
    assert!(close(rows[0].1, [0.3, 0.25, 0.45], 1e-9), "{:?}", rows[0]);
    assert!(
        close(rows[1].1, [0.2, 0.1375, 0.6625], 1e-9),
        "{:?}",
        rows[1]
    );
    let j = r.json.unwrap();
    assert_eq!(j["mode"], "prob");
    assert_eq!(j["weights_from"], "given");
    assert_eq!(j["rows"], 2);
    assert!(j["labels"].is_null());
    assert_eq!(weights_of(&j), vec![0.75, 0.25]);
    assert!(!r.err.contains("normalised"), "{}", r.err);

    // logit: softmax(0.75·ln a + 0.25·ln b) ∝ a^0.75·b^0.25 (values from Python).
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--pred",
        s(&b),
        "--weights",
        "0.75,0.25",
        "--mode",
        "logit",
        "--out",
        s(&out),
    ]);
    assert!(r.ok, "{}", r.err);
    let rows = read_valid(&out);
    assert!(
        close(
            rows[0].1,
            [0.2826554557071694, 0.24478680516067577, 0.4725577391321549],
            2e-9
        ),
        "{:?}",
        rows[0]
    );
    assert_eq!(r.json.unwrap()["mode"], "logit");
    // Equal weights: the geometric mean, renormalised.
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--pred",
        s(&b),
        "--mode",
        "logit",
        "--out",
        s(&out),
    ]);
    assert!(r.ok, "{}", r.err);
    let rows = read_valid(&out);
    assert!(
        close(
            rows[0].1,
            [0.3819660112501051, 0.19098300562505255, 0.42705098312484224],
            2e-9
        ),
        "{:?}",
        rows[0]
    );

    // logit clips at machine epsilon like sklearn: a zero is not -inf.
    let z = pred(
        dir.path(),
        "z.csv",
        &[("r1", [0.0, 0.5, 0.5]), ("r2", [1.0, 0.0, 0.0])],
    );
    let r = run(&[
        "ensemble",
        "--pred",
        s(&z),
        "--pred",
        s(&b),
        "--mode",
        "logit",
        "--out",
        s(&out),
    ]);
    assert!(r.ok, "{}", r.err);
    let rows = read_valid(&out);
    let want = combine(
        Mode::Logit,
        &[0.5, 0.5],
        &[vec![[0.0, 0.5, 0.5]], vec![[0.6, 0.1, 0.3]]],
    )[0];
    let eps = f64::EPSILON;
    let g = [
        (eps * 0.6f64).sqrt(),
        (0.5f64 * 0.1).sqrt(),
        (0.5f64 * 0.3).sqrt(),
    ];
    let gs: f64 = g.iter().sum();
    assert!(close(want, g.map(|v| v / gs), 1e-15), "{want:?}");
    assert!(close(rows[0].1, want, 1e-9), "{:?}", rows[0]);
}

#[test]
fn weights_are_normalised_and_default_to_equal() {
    let dir = tempfile::tempdir().unwrap();
    let a = pred(dir.path(), "a.csv", A);
    let b = pred(dir.path(), "b.csv", B);
    let o1 = dir.path().join("o1.csv");
    let o2 = dir.path().join("o2.csv");
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--pred",
        s(&b),
        "--weights",
        "3, 1",
        "--out",
        s(&o1),
    ]);
    assert!(r.ok, "{}", r.err);
    assert!(
        r.err.contains("sum to 4") && r.err.contains("normalised to 0.750000,0.250000"),
        "{}",
        r.err
    );
    assert_eq!(weights_of(&r.json.unwrap()), vec![0.75, 0.25]);
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--pred",
        s(&b),
        "--weights",
        "0.75,0.25",
        "--out",
        s(&o2),
    ]);
    assert!(r.ok, "{}", r.err);
    assert_eq!(std::fs::read(&o1).unwrap(), std::fs::read(&o2).unwrap());

    // No weights, no labels: equal weights.
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--pred",
        s(&b),
        "--out",
        s(&o1),
    ]);
    assert!(r.ok, "{}", r.err);
    let j = r.json.unwrap();
    assert_eq!(j["weights_from"], "equal");
    assert_eq!(weights_of(&j), vec![0.5, 0.5]);
    let rows = read_valid(&o1);
    assert!(close(rows[0].1, [0.4, 0.2, 0.4], 1e-9), "{:?}", rows[0]);

    // A zero weight is allowed; the file is still read and checked.
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--pred",
        s(&b),
        "--weights",
        "0,2",
        "--out",
        s(&o1),
    ]);
    assert!(r.ok, "{}", r.err);
    assert!(close(read_valid(&o1)[0].1, [0.6, 0.1, 0.3], 1e-9));
}

#[test]
fn shard_files_and_slightly_off_rows_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let a = pred(dir.path(), "a.csv", A);
    let shard = dir.path().join("shard.csv");
    std::fs::write(
        &shard,
        "id,winner_model_a,winner_model_b,winner_tie,row,total_rows,shard\n\
         r2,0.5,0.25,0.25,1,2,0/1\nr1,0.6,0.1,0.3,0,2,0/1\n",
    )
    .unwrap();
    // Rows written with 6 decimals do not sum to 1 exactly: renormalised with a note.
    let c = pred(
        dir.path(),
        "c.csv",
        &[("r1", [0.33333, 0.33333, 0.33333]), ("r2", [0.2, 0.3, 0.5])],
    );
    let out = dir.path().join("ens.csv");
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--pred",
        s(&shard),
        "--pred",
        s(&c),
        "--out",
        s(&out),
    ]);
    assert!(r.ok, "{}", r.err);
    assert!(
        r.err.contains("c.csv: 1 row(s) do not sum to 1"),
        "{}",
        r.err
    );
    let rows = read_valid(&out);
    let third = 1.0 / 3.0;
    let want = [
        (0.2 + 0.6 + third) / 3.0,
        (0.3 + 0.1 + third) / 3.0,
        (0.5 + 0.3 + third) / 3.0,
    ];
    assert!(close(rows[0].1, want, 1e-9), "{:?}", rows[0]);
}

#[test]
fn bad_weights_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = pred(dir.path(), "a.csv", A);
    let b = pred(dir.path(), "b.csv", B);
    let out = dir.path().join("ens.csv");
    for (w, needle) in [
        ("abc,1", "entry 1 `abc` is not a number"),
        ("0.5,", "entry 2 `` is not a number"),
        ("-1,2", "entry 1 is -1; weights must be finite and ≥ 0"),
        ("nan,1", "must be finite"),
        ("1,inf", "entry 2 is inf"),
        ("0,0", "all zero"),
        ("0.5", "1 value(s) but there are 2 --pred file(s)"),
        ("0.2,0.3,0.5", "3 value(s) but there are 2"),
    ] {
        let r = run(&[
            "ensemble",
            "--pred",
            s(&a),
            "--pred",
            s(&b),
            "--weights",
            w,
            "--out",
            s(&out),
        ]);
        assert_eq!(r.code, Some(2), "--weights {w}: {}", r.err);
        assert!(
            r.err.contains(needle),
            "--weights {w}: expected `{needle}` in {}",
            r.err
        );
        assert!(!out.exists());
    }
    // Usage errors come before any file is read.
    let missing = dir.path().join("nope.csv");
    let r = run(&[
        "ensemble",
        "--pred",
        s(&missing),
        "--weights",
        "1,1",
        "--out",
        s(&out),
    ]);
    assert_eq!(r.code, Some(2), "{}", r.err);
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--folds",
        "1",
        "--out",
        s(&out),
    ]);
    assert_eq!(r.code, Some(2), "{}", r.err);
}

#[test]
fn id_mismatch_and_bad_rows_name_file_row_and_id() {
    let dir = tempfile::tempdir().unwrap();
    let a = pred(
        dir.path(),
        "a.csv",
        &[
            ("x1", [0.2, 0.3, 0.5]),
            ("x2", [0.3, 0.3, 0.4]),
            ("x3", [0.1, 0.1, 0.8]),
        ],
    );
    let b = pred(
        dir.path(),
        "b.csv",
        &[
            ("x1", [0.2, 0.3, 0.5]),
            ("zz", [0.3, 0.3, 0.4]),
            ("x3", [0.1, 0.1, 0.8]),
        ],
    );
    let out = dir.path().join("ens.csv");
    std::fs::write(&out, "previous").unwrap();
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--pred",
        s(&b),
        "--out",
        s(&out),
    ]);
    assert_eq!(r.code, Some(1), "{}", r.err);
    for needle in [
        "b.csv",
        "field `id`",
        "a.csv",
        "`x2` (its row 2)",
        "`zz` (row 2)",
        "1 of its id(s) are missing here",
    ] {
        assert!(r.err.contains(needle), "expected `{needle}` in {}", r.err);
    }
    // A failed run leaves the old file alone and no temporary file behind.
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);

    // Fewer rows: only missing ids.
    let c = pred(dir.path(), "c.csv", &[("x1", [0.2, 0.3, 0.5])]);
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--pred",
        s(&c),
        "--out",
        s(&out),
    ]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.err.contains("c.csv") && r.err.contains("2 of its id(s) are missing here"),
        "{}",
        r.err
    );

    // Rows that are not distributions, values out of range, duplicate ids, empty files.
    let bad = dir.path().join("bad.csv");
    for (text, needles) in [
        (
            "id,winner_model_a,winner_model_b,winner_tie\nx1,0.5,0.5,0.5\n",
            vec!["bad.csv", "row 1", "sum to 1.5"],
        ),
        (
            "id,winner_model_a,winner_model_b,winner_tie\nx1,0.5,0.5,0\nx2,1.5,0,0\n",
            vec!["row 2", "winner_model_a", "not a probability"],
        ),
        (
            "id,winner_model_a,winner_model_b,winner_tie\nx1,0.5,0.5,0\nx1,0.5,0.5,0\n",
            vec!["row 2", "duplicate id `x1`"],
        ),
        (
            "id,winner_model_a,winner_model_b,winner_tie\n",
            vec!["bad.csv", "no prediction rows"],
        ),
        (
            "id,winner_model_a,winner_tie\nx1,0.5,0.5\n",
            vec!["missing column `winner_model_b`"],
        ),
    ] {
        std::fs::write(&bad, text).unwrap();
        let r = run(&[
            "ensemble",
            "--pred",
            s(&a),
            "--pred",
            s(&bad),
            "--out",
            s(&out),
        ]);
        assert_eq!(r.code, Some(1), "{text}: {}", r.err);
        for n in needles {
            assert!(r.err.contains(n), "{text}: expected `{n}` in {}", r.err);
        }
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous");
    }
}

/// Deterministic pseudo-random numbers in [0, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `n` labelled rows and `m` models: a hidden distribution per row, a hard label drawn from
/// it, and each model a differently noisy (and for some, over- or under-confident) copy.
fn synthetic(n: usize, m: usize, seed: u64) -> (Vec<Vec<[f64; 3]>>, Vec<[f64; 3]>) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut truth = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..n {
        let z = [rng.next() * 3.0, rng.next() * 3.0, rng.next() * 2.0];
        let e = z.map(f64::exp);
        let s: f64 = e.iter().sum();
        let t = e.map(|v| v / s);
        let u = rng.next();
        let k = if u < t[0] {
            0
        } else if u < t[0] + t[1] {
            1
        } else {
            2
        };
        let mut y = [0.0; 3];
        y[k] = 1.0;
        truth.push(t);
        labels.push(y);
    }
    let models = (0..m)
        .map(|j| {
            let noise = 0.8 + 0.2 * j as f64;
            let temp = [1.3, 0.7, 1.0, 1.6][j % 4];
            truth
                .iter()
                .map(|t| {
                    let z = t.map(|v| v.ln() * temp + noise * (rng.next() - 0.5) * 2.0);
                    let e = z.map(f64::exp);
                    let s: f64 = e.iter().sum();
                    e.map(|v| v / s)
                })
                .collect()
        })
        .collect();
    (models, labels)
}

fn loss_at(mode: Mode, w: &[f64], models: &[Vec<[f64; 3]>], y: &[[f64; 3]]) -> f64 {
    log_loss(y, &combine(mode, w, models))
}

#[test]
fn search_finds_the_grid_optimum_for_two_models() {
    let (models, y) = synthetic(400, 2, 7);
    for mode in [Mode::Prob, Mode::Logit] {
        let found = search_weights(mode, &models, &y);
        assert!(found.converged && found.gap <= 1e-10, "{mode:?}: {found:?}");
        let mut best = (f64::INFINITY, 0.0);
        for i in 0..=10_000 {
            let a = i as f64 / 10_000.0;
            let l = loss_at(mode, &[a, 1.0 - a], &models, &y);
            if l < best.0 {
                best = (l, a);
            }
        }
        let got = loss_at(mode, &found.weights, &models, &y);
        assert!(
            (got - found.log_loss).abs() < 1e-12,
            "{mode:?}: {got} vs {}",
            found.log_loss
        );
        assert!(
            got <= best.0 + 1e-12,
            "{mode:?}: search {got} > grid {}",
            best.0
        );
        // Interior optimum, found to within the grid's step.
        assert!(
            best.1 > 0.05 && best.1 < 0.95,
            "{mode:?}: grid optimum {} is not interior",
            best.1
        );
        assert!(
            (found.weights[0] - best.1).abs() <= 2e-4,
            "{mode:?}: {:?} vs grid {}",
            found.weights,
            best.1
        );
        assert!((found.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Deterministic.
        assert_eq!(search_weights(mode, &models, &y).weights, found.weights);
    }
}

#[test]
fn search_finds_the_grid_optimum_for_three_models() {
    let (models, y) = synthetic(300, 3, 11);
    let step = 200;
    for mode in [Mode::Prob, Mode::Logit] {
        let found = search_weights(mode, &models, &y);
        assert!(found.converged, "{mode:?}: {found:?}");
        let mut best = (f64::INFINITY, vec![]);
        for i in 0..=step {
            for j in 0..=step - i {
                let w = [
                    i as f64 / step as f64,
                    j as f64 / step as f64,
                    (step - i - j) as f64 / step as f64,
                ];
                let l = loss_at(mode, &w, &models, &y);
                if l < best.0 {
                    best = (l, w.to_vec());
                }
            }
        }
        let got = loss_at(mode, &found.weights, &models, &y);
        assert!(
            got <= best.0 + 1e-12,
            "{mode:?}: search {got} > grid {}",
            best.0
        );
        assert!(
            best.1.iter().all(|&w| w > 0.05),
            "{mode:?}: grid optimum {:?} is not interior",
            best.1
        );
        for k in 0..3 {
            assert!(
                (found.weights[k] - best.1[k]).abs() <= 0.02,
                "{mode:?}: {:?} vs grid {:?}",
                found.weights,
                best.1
            );
        }
    }
}

#[test]
fn search_handles_a_vertex_optimum_and_duplicate_models() {
    // Model 0 is good, model 1 is confidently wrong (0.9 on a class that did not win): the
    // best mixture gives model 1 nothing.
    let (mut models, y) = synthetic(300, 1, 3);
    models.push(
        y.iter()
            .map(|l| {
                let k = (l.iter().position(|&v| v == 1.0).unwrap() + 1) % 3;
                let mut p = [0.05; 3];
                p[k] = 0.9;
                p
            })
            .collect(),
    );
    // And the good model a second time: the optimum is then a whole edge (a singular Hessian).
    models.push(models[0].clone());
    for mode in [Mode::Prob, Mode::Logit] {
        let found = search_weights(mode, &models, &y);
        assert!(found.converged, "{mode:?}: {found:?}");
        let got = loss_at(mode, &found.weights, &models, &y);
        for i in 0..=100 {
            for j in 0..=100 - i {
                let w = [
                    i as f64 / 100.0,
                    j as f64 / 100.0,
                    (100 - i - j) as f64 / 100.0,
                ];
                assert!(
                    got <= loss_at(mode, &w, &models, &y) + 1e-12,
                    "{mode:?}: {w:?} beats {:?}",
                    found.weights
                );
            }
        }
        assert!(found.weights[1] < 1e-9, "{mode:?}: {:?}", found.weights);
        assert!(found.gap <= 1e-10, "{mode:?}: {found:?}");
    }
}

#[test]
fn cross_validation_is_deterministic_and_pooled() {
    let (models, y) = synthetic(103, 2, 5);
    let cv = cross_validate(Mode::Prob, &models, &y, 5).unwrap();
    assert_eq!(cv.folds, 5);
    assert_eq!(cv.fold_weights.len(), 5);
    // Recompute fold 2 by hand: rows i with i mod 5 == 2 scored with weights searched on the rest.
    let train: Vec<usize> = (0..103).filter(|i| i % 5 != 2).collect();
    let sub = |rows: &[usize]| -> Vec<Vec<[f64; 3]>> {
        models
            .iter()
            .map(|m| rows.iter().map(|&i| m[i]).collect())
            .collect()
    };
    let yt: Vec<[f64; 3]> = train.iter().map(|&i| y[i]).collect();
    assert_eq!(
        search_weights(Mode::Prob, &sub(&train), &yt).weights,
        cv.fold_weights[2]
    );
    let again = cross_validate(Mode::Prob, &models, &y, 5).unwrap();
    assert_eq!(again.log_loss, cv.log_loss);
    assert!(cross_validate(Mode::Prob, &models, &y[..3], 5).is_none());
}

/// Labelled CSV and prediction files for `models` on `y` (ids `t0`, `t1`, …).
fn write_labelled(dir: &Path, models: &[Vec<[f64; 3]>], y: &[[f64; 3]]) -> (PathBuf, Vec<PathBuf>) {
    let rows: Vec<Arena> = y
        .iter()
        .enumerate()
        .map(|(i, l)| Arena {
            id: Box::leak(format!("t{i}").into_boxed_str()),
            a: vec![Some("a")],
            b: vec![Some("b")],
            label: Some(*l),
        })
        .collect();
    let labels = dir.join("labels.csv");
    write_arena(&labels, &rows);
    let preds = models
        .iter()
        .enumerate()
        .map(|(j, m)| {
            let p = dir.join(format!("model{j}.csv"));
            let rows: Vec<(String, [f64; 3])> = m
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("t{i}"), *p))
                .collect();
            write_pred(&p, &rows);
            p
        })
        .collect();
    (labels, preds)
}

#[test]
fn labels_without_weights_search_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let (models, y) = synthetic(250, 3, 21);
    let (labels, preds) = write_labelled(dir.path(), &models, &y);
    let out = dir.path().join("ens.csv");
    for mode in [Mode::Prob, Mode::Logit] {
        let name = if mode == Mode::Prob { "prob" } else { "logit" };
        let r = run(&[
            "ensemble",
            "--pred",
            s(&preds[0]),
            "--pred",
            s(&preds[1]),
            "--pred",
            s(&preds[2]),
            "--labels",
            s(&labels),
            "--mode",
            name,
            "--out",
            s(&out),
        ]);
        assert!(r.ok, "{}", r.err);
        let j = r.json.unwrap();
        assert_eq!(j["weights_from"], "search");
        let want = search_weights(mode, &models, &y);
        // The file round trip rounds nothing away (full-precision inputs).
        for (a, b) in weights_of(&j).iter().zip(&want.weights) {
            assert!(
                (a - b).abs() < 1e-7,
                "{:?} vs {:?}",
                j["weights"],
                want.weights
            );
        }
        let l = &j["labels"];
        assert_eq!(l["rows"], 250);
        assert_eq!(l["unlabelled_prediction_rows"], 0);
        let written = read_valid(&out);
        let probs: Vec<[f64; 3]> = written.iter().map(|(_, p)| *p).collect();
        let ll = l["log_loss"].as_f64().unwrap();
        assert!((ll - log_loss(&y, &probs)).abs() < 1e-8, "{ll}");
        assert_eq!(l["output_log_loss"], l["log_loss"]);
        for (k, m) in models.iter().enumerate() {
            assert!((l["model_log_loss"][k].as_f64().unwrap() - log_loss(&y, m)).abs() < 1e-12);
            assert!(ll <= log_loss(&y, m) + 1e-12);
        }
        let eq = l["equal_weights_log_loss"].as_f64().unwrap();
        assert!((eq - loss_at(mode, &[1.0, 1.0, 1.0], &models, &y)).abs() < 1e-12);
        assert!(ll <= eq + 1e-12);
        let search = &l["search"];
        assert_eq!(search["converged"], true);
        assert!(search["optimality_gap"].as_f64().unwrap() <= 1e-10);
        assert_eq!(search["cv_folds"], 5);
        let cv = cross_validate(mode, &models, &y, 5).unwrap();
        assert!((search["cv_log_loss"].as_f64().unwrap() - cv.log_loss).abs() < 1e-9);
        assert!((search["cv_gap"].as_f64().unwrap() - (cv.log_loss - ll)).abs() < 1e-9);
        // The human-readable report names every number.
        for needle in [
            "model0.csv",
            "model1.csv",
            "model2.csv",
            "equal weights",
            "searched weights",
            "optimality gap",
            "5-fold CV of the search",
            "overfitting gap",
            "log loss on 250 labelled rows",
        ] {
            assert!(r.err.contains(needle), "expected `{needle}` in {}", r.err);
        }
    }
    // --folds 0 skips the cross-validation.
    let r = run(&[
        "ensemble",
        "--pred",
        s(&preds[0]),
        "--pred",
        s(&preds[1]),
        "--labels",
        s(&labels),
        "--folds",
        "0",
        "--out",
        s(&out),
    ]);
    assert!(r.ok, "{}", r.err);
    assert!(r.json.unwrap()["labels"]["search"]["cv_log_loss"].is_null());
    assert!(!r.err.contains("CV"), "{}", r.err);
}

#[test]
fn labels_with_weights_score_without_search() {
    let dir = tempfile::tempdir().unwrap();
    let (models, y) = synthetic(60, 2, 33);
    let (labels, preds) = write_labelled(dir.path(), &models, &y);
    let out = dir.path().join("ens.csv");
    let r = run(&[
        "ensemble",
        "--pred",
        s(&preds[0]),
        "--pred",
        s(&preds[1]),
        "--labels",
        s(&labels),
        "--weights",
        "0.3,0.7",
        "--mode",
        "logit",
        "--out",
        s(&out),
    ]);
    assert!(r.ok, "{}", r.err);
    let j = r.json.unwrap();
    assert_eq!(j["weights_from"], "given");
    assert_eq!(weights_of(&j), vec![0.3, 0.7]);
    let l = &j["labels"];
    assert!(l["search"].is_null());
    let want = loss_at(Mode::Logit, &[0.3, 0.7], &models, &y);
    assert!((l["log_loss"].as_f64().unwrap() - want).abs() < 1e-12);
    assert!((l["model_log_loss"][1].as_f64().unwrap() - log_loss(&y, &models[1])).abs() < 1e-12);
    assert!(
        r.err.contains("given weights") && !r.err.contains("searched") && !r.err.contains("CV"),
        "{}",
        r.err
    );
    read_valid(&out);
}

#[test]
fn labels_must_be_predicted_extra_predictions_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let (models, y) = synthetic(20, 2, 8);
    let (labels, _) = write_labelled(dir.path(), &models, &y);
    // Two more prediction rows without labels: ensembled and written, not scored.
    let mut extra = Vec::new();
    for (j, m) in models.iter().enumerate() {
        let mut rows: Vec<(String, [f64; 3])> = m
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("t{i}"), *p))
            .collect();
        rows.push(("u1".into(), [0.2, 0.2, 0.6]));
        rows.insert(0, ("u0".into(), [0.5, 0.4, 0.1]));
        let p = dir.path().join(format!("extra{j}.csv"));
        write_pred(&p, &rows);
        extra.push(p);
    }
    let out = dir.path().join("ens.csv");
    let r = run(&[
        "ensemble",
        "--pred",
        s(&extra[0]),
        "--pred",
        s(&extra[1]),
        "--labels",
        s(&labels),
        "--out",
        s(&out),
    ]);
    assert!(r.ok, "{}", r.err);
    assert!(
        r.err.contains("2 prediction row(s) have no label"),
        "{}",
        r.err
    );
    let j = r.json.unwrap();
    assert_eq!(j["labels"]["unlabelled_prediction_rows"], 2);
    assert_eq!(j["labels"]["rows"], 20);
    let want = search_weights(Mode::Prob, &models, &y);
    assert!((weights_of(&j)[0] - want.weights[0]).abs() < 1e-9);
    let rows = read_valid(&out);
    assert_eq!(rows.len(), 22);
    assert_eq!(rows[0].0, "u0");

    // A labelled id without a prediction is an error naming the labels file and the id.
    let short = dir.path().join("short.csv");
    let rows: Vec<(String, [f64; 3])> = models[0]
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, p)| (format!("t{i}"), *p))
        .collect();
    write_pred(&short, &rows);
    let r = run(&[
        "ensemble",
        "--pred",
        s(&short),
        "--labels",
        s(&labels),
        "--out",
        s(&out),
    ]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.err.contains("labels.csv")
            && r.err.contains("`t0`")
            && r.err.contains("1 labelled id(s) have no prediction"),
        "{}",
        r.err
    );
}

/// The rule fixture: ids, texts and predictions of two models (equal weights in prob mode
/// give the `want_*` rows below).
fn rule_rows() -> Vec<(Arena<'static>, [f64; 3])> {
    vec![
        // identical responses
        (
            arena("id1", vec![Some("same")], vec![Some("same")]),
            [0.5, 0.2, 0.3],
        ),
        // A empty (null), A favoured: swapped by `empty`
        (
            arena("ae", vec![None], vec![Some("answer")]),
            [0.6, 0.1, 0.3],
        ),
        // B whitespace-only, B favoured: swapped
        (
            arena("bw", vec![Some("ok")], vec![Some("  \n\t")]),
            [0.2, 0.5, 0.3],
        ),
        // A empty list, A already less likely: unchanged
        (arena("al", vec![], vec![Some("hi")]), [0.1, 0.6, 0.3]),
        // both empty, not identical (null vs ""): no rule fires
        (arena("be", vec![None], vec![Some("")]), [0.4, 0.3, 0.3]),
        // ordinary row
        (
            arena("n", vec![Some("a")], vec![Some("b")]),
            [0.7, 0.1, 0.2],
        ),
        // identical over two turns with a null turn
        (
            arena("id2", vec![Some("x"), None], vec![Some("x"), None]),
            [0.1, 0.3, 0.6],
        ),
        // nearly identical (trailing space): not identical
        (
            arena("near", vec![Some("x ")], vec![Some("x")]),
            [0.6, 0.2, 0.2],
        ),
        // identical and already symmetric: matched, not changed
        (
            arena("id3", vec![Some("y")], vec![Some("y")]),
            [0.25, 0.25, 0.5],
        ),
    ]
}

#[test]
fn rule_conditions_are_exact() {
    assert!(is_empty_response(&[]));
    assert!(is_empty_response(&[None, Some(" \u{3000}\n".into())]));
    assert!(!is_empty_response(&[None, Some(".".into())]));
    let rows = rule_rows();
    let get = |id: &str| -> ArenaRow {
        let r = &rows.iter().find(|(a, _)| a.id == id).unwrap().0;
        let own = |v: &Vec<Option<&str>>| v.iter().map(|t| t.map(str::to_string)).collect();
        ArenaRow {
            id: id.into(),
            prompt: vec![],
            response_a: own(&r.a),
            response_b: own(&r.b),
            label: None,
        }
    };
    assert!(Rule::Identical.matches(&get("id2")));
    assert!(!Rule::Identical.matches(&get("near")));
    assert!(!Rule::Identical.matches(&get("be")));
    assert!(!Rule::Empty.matches(&get("be")));
    assert!(Rule::Empty.matches(&get("al")));
    assert_eq!(
        Rule::Empty.apply(&get("al"), [0.1, 0.6, 0.3]),
        [0.1, 0.6, 0.3]
    );
    assert_eq!(
        Rule::Empty.apply(&get("ae"), [0.6, 0.1, 0.3]),
        [0.1, 0.6, 0.3]
    );
    assert_eq!(
        Rule::Identical.apply(&get("id1"), [0.5, 0.2, 0.3]),
        [0.35, 0.35, 0.3]
    );
    // A tie between the sides is not swapped.
    assert_eq!(
        Rule::Empty.apply(&get("ae"), [0.4, 0.4, 0.2]),
        [0.4, 0.4, 0.2]
    );
}

#[test]
fn rules_change_exactly_the_intended_rows() {
    let dir = tempfile::tempdir().unwrap();
    let rows = rule_rows();
    let ids: Vec<&str> = rows.iter().map(|(a, _)| a.id).collect();
    let p1: Vec<(String, [f64; 3])> = rows.iter().map(|(a, p)| (a.id.to_string(), *p)).collect();
    let a_path = dir.path().join("a.csv");
    write_pred(&a_path, &p1);
    let data = dir.path().join("test.csv");
    let arena_rows: Vec<Arena> = rows.into_iter().map(|(a, _)| a).collect();
    write_arena(&data, &arena_rows);
    let out = dir.path().join("ens.csv");
    let base: Vec<[f64; 3]> = p1.iter().map(|(_, p)| *p).collect();

    let check = |rules: &[&str], changed: &[(&str, [f64; 3])]| {
        let mut args = vec![
            "ensemble",
            "--pred",
            s(&a_path),
            "--data",
            s(&data),
            "--out",
            s(&out),
        ];
        for r in rules {
            args.extend(["--rule", r]);
        }
        let r = run(&args);
        assert!(r.ok, "{}", r.err);
        let got = read_valid(&out);
        for (i, (id, p)) in got.iter().enumerate() {
            assert_eq!(id, ids[i]);
            let want = changed
                .iter()
                .find(|(c, _)| c == id)
                .map_or(base[i], |(_, w)| *w);
            assert!(
                close(*p, want, 1e-9),
                "rules {rules:?}, row {id}: {p:?}, want {want:?}"
            );
        }
        r.json.unwrap()
    };
    let identical = [("id1", [0.35, 0.35, 0.3]), ("id2", [0.2, 0.2, 0.6])];
    let empty = [("ae", [0.1, 0.6, 0.3]), ("bw", [0.5, 0.2, 0.3])];
    let j = check(&["identical"], &identical);
    assert_eq!(j["rules_applied"]["identical"]["matched"], 3);
    assert_eq!(j["rules_applied"]["identical"]["changed"], 2);
    assert!(j["rules_applied"]["empty"].is_null());
    let j = check(&["empty"], &empty);
    assert_eq!(j["rules_applied"]["empty"]["matched"], 3);
    assert_eq!(j["rules_applied"]["empty"]["changed"], 2);
    let both: Vec<(&str, [f64; 3])> = identical.iter().chain(&empty).copied().collect();
    check(&["identical", "empty"], &both);
    check(&["empty,identical"], &both);
    let j = check(&[], &[]);
    assert!(j["rules_applied"].as_object().unwrap().is_empty());
}

#[test]
fn rules_are_measured_on_labelled_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = rule_rows();
    // Labels: identical pairs are ties or B wins, the empty side loses.
    let labels = [
        [0.0, 1.0, 0.0], // id1
        [0.0, 1.0, 0.0], // ae
        [1.0, 0.0, 0.0], // bw
        [0.0, 1.0, 0.0], // al
        [0.0, 0.0, 1.0], // be
        [1.0, 0.0, 0.0], // n
        [0.0, 0.0, 1.0], // id2
        [1.0, 0.0, 0.0], // near
        [0.0, 0.0, 1.0], // id3
    ];
    for ((a, _), l) in rows.iter_mut().zip(labels) {
        a.label = Some(l);
    }
    let p1: Vec<(String, [f64; 3])> = rows.iter().map(|(a, p)| (a.id.to_string(), *p)).collect();
    let base: Vec<[f64; 3]> = p1.iter().map(|(_, p)| *p).collect();
    let pred_path = dir.path().join("a.csv");
    write_pred(&pred_path, &p1);
    let labels_path = dir.path().join("labels.csv");
    let arena_rows: Vec<Arena> = rows.into_iter().map(|(a, _)| a).collect();
    write_arena(&labels_path, &arena_rows);
    let y = labels.to_vec();
    let out = dir.path().join("ens.csv");

    // Texts from --labels (no --data); only `identical` requested.
    let r = run(&[
        "ensemble",
        "--pred",
        s(&pred_path),
        "--labels",
        s(&labels_path),
        "--rule",
        "identical",
        "--out",
        s(&out),
    ]);
    assert!(r.ok, "{}", r.err);
    let j = r.json.unwrap();
    let ll = log_loss(&y, &base);
    let mut with_identical = base.clone();
    with_identical[0] = [0.35, 0.35, 0.3];
    with_identical[6] = [0.2, 0.2, 0.6];
    let mut with_empty = base.clone();
    with_empty[1] = [0.1, 0.6, 0.3];
    with_empty[2] = [0.5, 0.2, 0.3];
    let rules = &j["labels"]["rules"];
    for (name, with, matched, changed, requested) in [
        ("identical", &with_identical, 3, 2, true),
        ("empty", &with_empty, 3, 2, false),
    ] {
        let m = &rules[name];
        let lw = log_loss(&y, with);
        assert_eq!(m["matched"], matched, "{name}");
        assert_eq!(m["changed"], changed, "{name}");
        assert!((m["log_loss_without"].as_f64().unwrap() - ll).abs() < 1e-12);
        assert!(
            (m["log_loss_with"].as_f64().unwrap() - lw).abs() < 1e-12,
            "{name}"
        );
        assert!((m["delta"].as_f64().unwrap() - (lw - ll)).abs() < 1e-12);
        assert_eq!(m["recommended"], lw < ll, "{name}");
        assert_eq!(m["requested"], requested);
        let line = r
            .err
            .lines()
            .find(|l| l.starts_with(&format!("rule {name}")))
            .unwrap_or_else(|| panic!("no `rule {name}` line in {}", r.err));
        assert!(
            line.contains(&format!(
                "{matched} labelled row(s) match ({changed} changed)"
            )),
            "{line}"
        );
        assert!(
            line.contains(&format!("log loss {ll:.6} -> {lw:.6}")),
            "{line}"
        );
        assert!(
            line.contains(if lw < ll {
                ", recommended"
            } else {
                "not recommended"
            }),
            "{line}"
        );
        assert!(
            line.contains(if requested {
                "applied"
            } else {
                "not requested"
            }),
            "{line}"
        );
    }
    // The written file has only the requested rule; its log loss is reported.
    let written: Vec<[f64; 3]> = read_valid(&out).iter().map(|(_, p)| *p).collect();
    for (g, w) in written.iter().zip(&with_identical) {
        assert!(close(*g, *w, 1e-9));
    }
    let out_ll = j["labels"]["output_log_loss"].as_f64().unwrap();
    assert!((out_ll - log_loss(&y, &with_identical)).abs() < 1e-8);
    assert!(
        r.err.contains(&format!(
            "log loss of the written rows (rule identical applied): {out_ll:.6}"
        )),
        "{}",
        r.err
    );
}

#[test]
fn rule_texts_must_be_available() {
    let dir = tempfile::tempdir().unwrap();
    let a = pred(dir.path(), "a.csv", A);
    let out = dir.path().join("ens.csv");
    // No --data and no --labels: a usage error, before anything is read.
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--rule",
        "empty",
        "--out",
        s(&out),
    ]);
    assert_eq!(r.code, Some(2), "{}", r.err);
    assert!(
        r.err.contains("--rule empty needs the response texts") && r.err.contains("--data"),
        "{}",
        r.err
    );
    assert!(!out.exists());
    // An unknown rule is refused by the parser.
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--rule",
        "nope",
        "--out",
        s(&out),
    ]);
    assert_eq!(r.code, Some(2), "{}", r.err);

    // --data must hold exactly the predicted ids.
    let data = dir.path().join("test.csv");
    write_arena(&data, &[arena("r1", vec![Some("x")], vec![Some("x")])]);
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--data",
        s(&data),
        "--rule",
        "identical",
        "--out",
        s(&out),
    ]);
    assert_eq!(r.code, Some(1), "{}", r.err);
    assert!(
        r.err.contains("test.csv") && r.err.contains("`r2`"),
        "{}",
        r.err
    );
    write_arena(
        &data,
        &[
            arena("r1", vec![Some("x")], vec![Some("x")]),
            arena("r2", vec![Some("x")], vec![Some("y")]),
            arena("r9", vec![Some("x")], vec![Some("y")]),
        ],
    );
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--data",
        s(&data),
        "--rule",
        "identical",
        "--out",
        s(&out),
    ]);
    assert_eq!(r.code, Some(1), "{}", r.err);
    assert!(
        r.err.contains("test.csv")
            && r.err.contains("`r9`")
            && r.err.contains("exactly the predicted ids"),
        "{}",
        r.err
    );
    assert!(!out.exists());
    // A broken --data cell names file, row and field.
    std::fs::write(
        &data,
        "id,prompt,response_a,response_b\nr1,[],[],[]\nr2,[],oops,[]\n",
    )
    .unwrap();
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--data",
        s(&data),
        "--rule",
        "identical",
        "--out",
        s(&out),
    ]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.err.contains("test.csv, row 2, field `response_a`"),
        "{}",
        r.err
    );
    // Without --rule, --data is not read (and says so).
    let r = run(&[
        "ensemble",
        "--pred",
        s(&a),
        "--data",
        s(&data),
        "--out",
        s(&out),
    ]);
    assert!(r.ok, "{}", r.err);
    assert!(
        r.err.contains("--data is only read for --rule"),
        "{}",
        r.err
    );
}

#[test]
fn help_describes_the_options() {
    let o = engine(&["ensemble", "--help"]);
    assert!(o.status.success());
    let h = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "--pred",
        "--weights",
        "--mode",
        "logit",
        "--labels",
        "--data",
        "--rule",
        "identical",
        "empty",
        "--folds",
        "Examples",
    ] {
        assert!(h.contains(needle), "expected `{needle}` in --help:\n{h}");
    }
}
