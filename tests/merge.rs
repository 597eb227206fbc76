//! `engine merge`: 2- and 3-way splits merged in any order give exactly the unsplit
//! submission; every refusal (different splits, a shard twice, missing shards, overlaps, gaps,
//! one id on two rows, broken files) names the file(s) and row(s), exits non-zero and leaves
//! no output (an existing output file stays as it was, and no temporary file is left).

mod common;

use std::path::{Path, PathBuf};

use common::{engine, stderr};
use engine::io::AtomicFile;
use engine::shard::{self, Shard};

/// The rows of a test input: ids (one with a comma and a quote, to exercise CSV quoting) and
/// distinct probabilities.
fn input(total: usize) -> (Vec<String>, Vec<[f64; 3]>) {
    let ids = (0..total)
        .map(|i| {
            if i == 1 {
                "a,\"1\"".to_string()
            } else {
                format!("id{i}")
            }
        })
        .collect();
    let probs = (0..total)
        .map(|i| {
            let a = 0.05 + 0.9 * ((i * 37 % 101) as f64 / 101.0);
            let b = (1.0 - a) * ((i * 13 % 7) as f64 / 7.0);
            [a, b, 1.0 - a - b]
        })
        .collect();
    (ids, probs)
}

/// Write shard `k/n` of a `total`-row input as `engine infer --shard` does.
fn write_shard(path: &Path, k: usize, n: usize, total: usize) {
    let (ids, probs) = input(total);
    let s = Shard { index: k, count: n };
    let rows = s.rows(total);
    let mut f = AtomicFile::create(path).unwrap();
    let ids: Vec<String> = rows.iter().map(|&r| ids[r].clone()).collect();
    let probs: Vec<[f64; 3]> = rows.iter().map(|&r| probs[r]).collect();
    shard::write_to(&mut f, path, s, total, &rows, &ids, &probs).unwrap();
    f.commit().unwrap();
}

/// All shards of an `n`-way split, as `s{k}.csv`.
fn split(dir: &Path, n: usize, total: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|k| {
            let p = dir.join(format!("s{k}.csv"));
            write_shard(&p, k, n, total);
            p
        })
        .collect()
}

/// The submission an unsplit run writes.
fn expected(dir: &Path, total: usize) -> Vec<u8> {
    let (ids, probs) = input(total);
    let p = dir.join("expected.csv");
    engine::predictions::write(&p, &ids, &probs).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    bytes
}

fn merge(files: &[&Path], out: &Path) -> std::process::Output {
    let mut args = vec!["merge".to_string()];
    args.extend(files.iter().map(|p| p.to_str().unwrap().to_string()));
    args.extend(["--out".to_string(), out.to_str().unwrap().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    engine(&args)
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 1 {
        return vec![vec![0]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for pos in 0..=p.len() {
            let mut q = p.clone();
            q.insert(pos, n - 1);
            out.push(q);
        }
    }
    out
}

#[test]
fn splits_merge_in_any_order_to_the_unsplit_submission() {
    for (n, total) in [(2, 11), (3, 10), (3, 3), (1, 4)] {
        let dir = tempfile::tempdir().unwrap();
        let shards = split(dir.path(), n, total);
        let want = expected(dir.path(), total);
        let out = dir.path().join("submission.csv");
        for order in permutations(n) {
            let files: Vec<&Path> = order.iter().map(|&k| shards[k].as_path()).collect();
            let o = merge(&files, &out);
            assert!(o.status.success(), "{n}-way {order:?}: {}", stderr(&o));
            assert_eq!(std::fs::read(&out).unwrap(), want, "{n}-way {order:?}");
            let e = stderr(&o);
            assert_eq!(e.lines().count(), 1, "one summary line: {e}");
            assert!(
                e.contains(&format!(
                    "merged {n} shard file(s) of split N={n} ({total} input rows)"
                )),
                "{e}"
            );
            assert_eq!(
                String::from_utf8_lossy(&o.stdout).trim(),
                out.to_str().unwrap()
            );
            std::fs::remove_file(&out).unwrap();
        }
        // The library call gives the same rows.
        let m = engine::merge::merge(&shards).unwrap();
        assert_eq!(m.ids, input(total).0);
        assert_eq!(m.count, n);
        assert_eq!(m.total_rows, total);
    }
}

/// Run a merge that must fail: check the exit code, that the old output is untouched and that
/// no other file appeared; return stderr.
fn refused(dir: &Path, files: &[&Path], code: i32) -> String {
    let out = dir.join("submission.csv");
    std::fs::write(&out, "previous submission\n").unwrap();
    let before: Vec<_> = listing(dir);
    let o = merge(files, &out);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "{e}");
    assert!(e.starts_with("error: "), "{e}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "previous submission\n",
        "a failed merge must not touch --out"
    );
    assert_eq!(
        listing(dir),
        before,
        "a failed merge must leave no file behind"
    );
    std::fs::remove_file(&out).unwrap();
    // And with no previous output, none appears.
    let o = merge(files, &out);
    assert!(!o.status.success());
    assert!(!out.exists());
    e
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn has(e: &str, needles: &[&str]) {
    for n in needles {
        assert!(e.contains(n), "expected `{n}` in: {e}");
    }
}

#[test]
fn files_from_different_splits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = d.join("a.csv");
    let b = d.join("b.csv");
    // Different N.
    write_shard(&a, 0, 2, 10);
    write_shard(&b, 1, 3, 10);
    let e = refused(d, &[&a, &b], 1);
    has(
        &e,
        &[
            "b.csv",
            "shard 1/3 of an input of 10 rows",
            "a.csv is shard 0/2 of an input of 10 rows",
            "different splits",
        ],
    );
    // Different input lengths.
    write_shard(&b, 1, 2, 11);
    let e = refused(d, &[&a, &b], 1);
    has(
        &e,
        &[
            "b.csv",
            "shard 1/2 of an input of 11 rows",
            "a.csv",
            "of an input of 10 rows",
        ],
    );
}

#[test]
fn the_same_shard_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = split(d, 2, 6);
    let copy = d.join("copy_of_s0.csv");
    std::fs::copy(&s[0], &copy).unwrap();
    let e = refused(d, &[&s[0], &s[1], &copy], 1);
    has(
        &e,
        &["shard 0/2 is given twice", "s0.csv", "copy_of_s0.csv"],
    );
    // The very same file twice (also under another spelling) is a usage error.
    let e = refused(d, &[&s[0], &s[1], &s[0]], 2);
    has(&e, &["the same file is given twice", "s0.csv"]);
    let other = d.join(".").join("s1.csv");
    let e = refused(d, &[&s[0], &s[1], &other], 2);
    has(&e, &["the same file is given twice"]);
}

#[test]
fn missing_shards_are_listed_with_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = split(d, 3, 10);
    let e = refused(d, &[&s[1]], 1);
    has(
        &e,
        &[
            "2 of the 3 shard(s) of this split (10 input rows) are missing",
            "0/3 (should hold 4 row(s): input rows 0, 3, 6, 9)",
            "2/3 (should hold 3 row(s): input rows 2, 5, 8)",
        ],
    );
    let e = refused(d, &[&s[2], &s[0]], 1);
    has(
        &e,
        &[
            "1 of the 3 shard(s)",
            "1/3 (should hold 3 row(s): input rows 1, 4, 7)",
        ],
    );
}

/// Rewrite a file's text.
fn edit(path: &Path, f: impl FnOnce(Vec<String>) -> Vec<String>) {
    let lines: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    std::fs::write(path, f(lines).join("\n") + "\n").unwrap();
}

#[test]
fn overlapping_rows_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = split(d, 2, 8);
    // Shard 0 holds rows 0, 2, 4, 6; its line for row 2 appears twice.
    edit(&s[0], |mut l| {
        let dup = l[2].clone();
        l.push(dup);
        l
    });
    let e = refused(d, &[&s[1], &s[0]], 1);
    has(
        &e,
        &[
            "s0.csv, row 5, field `row`",
            "input row 2 (id `id2`) is also in",
            "s0.csv, row 2",
            "overlapping",
        ],
    );
}

#[test]
fn gaps_are_refused_with_count_rows_and_shard() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = split(d, 3, 20);
    // Shard 1 (rows 1, 4, 7, …, 19) loses rows 4 and 10; shard 2 (rows 2, 5, …, 17) its last.
    edit(&s[1], |l| {
        l.into_iter()
            .filter(|x| !x.starts_with("id4,") && !x.starts_with("id10,"))
            .collect()
    });
    edit(&s[2], |mut l| {
        l.pop();
        l
    });
    let e = refused(d, &[&s[0], &s[1], &s[2]], 1);
    has(
        &e,
        &[
            "3 of the 20 input rows are in no file (input rows 4, 10, 17)",
            "s1.csv (shard 1/3) lacks 2 of its 7 rows: 4, 10",
            "s2.csv (shard 2/3) lacks 1 of its 6 rows: 17",
        ],
    );
    // Many missing rows: the list is cut after 8.
    edit(&s[0], |l| l.into_iter().take(2).collect());
    let e = refused(d, &[&s[0], &s[1], &s[2]], 1);
    has(
        &e,
        &[
            "9 of the 20 input rows are in no file (input rows 3, 4, 6, 9, 10, 12, 15, 17, …)",
            "s0.csv (shard 0/3) lacks 6 of its 7 rows: 3, 6, 9, 12, 15, 18;",
        ],
    );
}

#[test]
fn one_id_on_two_rows_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = split(d, 2, 6);
    // Row 3 (in shard 1) gets row 0's id.
    edit(&s[1], |l| {
        l.into_iter()
            .map(|x| x.replacen("id3,", "id0,", 1))
            .collect()
    });
    let e = refused(d, &[&s[0], &s[1]], 1);
    has(
        &e,
        &[
            "s1.csv, row 2, field `id`",
            "id `id0` is on input row 3 here and on input row 0 in",
            "s0.csv, row 1",
        ],
    );
}

#[test]
fn rows_slightly_off_are_renormalised() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = split(d, 2, 4);
    // Row 1 written with 4 decimals: its sum is 0.9999, renormalised on the way through.
    edit(&s[1], |l| {
        l.into_iter()
            .map(|x| {
                if x.starts_with("id3,") {
                    "id3,0.3333,0.3333,0.3333,3,4,1/2".into()
                } else {
                    x
                }
            })
            .collect()
    });
    let out = d.join("submission.csv");
    let o = merge(&[&s[0], &s[1]], &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = engine::predictions::read(&out).unwrap();
    assert_eq!(rows[3].0, "id3");
    for (id, p) in &rows {
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{id}: {p:?}");
    }
    assert!((rows[3].1[0] - 1.0 / 3.0).abs() < 1e-9, "{:?}", rows[3]);
}

#[test]
fn broken_files_are_refused_with_file_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = split(d, 2, 6);
    // A plain submission is not a shard file.
    let plain = d.join("plain.csv");
    std::fs::write(
        &plain,
        "id,winner_model_a,winner_model_b,winner_tie\nx,0.2,0.3,0.5\n",
    )
    .unwrap();
    let e = refused(d, &[&s[0], &plain], 1);
    has(
        &e,
        &["plain.csv", "missing column `row`", "not a shard file"],
    );
    // Probabilities that are not a distribution.
    edit(&s[1], |l| {
        l.into_iter()
            .map(|x| {
                if x.starts_with("id3,") {
                    "id3,0.5,0.5,0.5,3,6,1/2".into()
                } else {
                    x
                }
            })
            .collect()
    });
    let e = refused(d, &[&s[0], &s[1]], 1);
    has(&e, &["s1.csv, row 2, field `winner_model_a`", "sum to 1.5"]);
    // A row in the wrong shard (the reader's own check).
    write_shard(&s[1], 1, 2, 6);
    edit(&s[1], |l| {
        l.into_iter()
            .map(|x| x.replace(",3,6,1/2", ",2,6,1/2"))
            .collect()
    });
    let e = refused(d, &[&s[0], &s[1]], 1);
    has(
        &e,
        &["s1.csv, row 2, field `row`", "does not belong to shard 1/2"],
    );
    // A missing file.
    let gone = d.join("gone.csv");
    let e = refused(d, &[&s[0], &gone], 1);
    has(&e, &["gone.csv"]);
}

#[test]
fn absurd_sizes_in_a_file_are_refused_without_allocating_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let head = "id,winner_model_a,winner_model_b,winner_tie,row,total_rows,shard\n";
    let a = d.join("a.csv");
    std::fs::write(&a, format!("{head}x,0.2,0.3,0.5,0,1000000000000000,0/1\n")).unwrap();
    let e = refused(d, &[&a], 1);
    has(
        &e,
        &[
            "999999999999999 of the 1000000000000000 input rows are in no file (input rows 1, 2, 3, 4, 5, 6, 7, 8, …)",
        ],
    );
    std::fs::write(
        &a,
        format!("{head}x,0.2,0.3,0.5,0,1000000000000000,0/1000000000000\n"),
    )
    .unwrap();
    let e = refused(d, &[&a], 1);
    has(
        &e,
        &[
            "999999999999 of the 1000000000000 shard(s)",
            "1/1000000000000 (should hold 1000 row(s): input rows 1, 1000000000001,",
        ],
    );
}

#[test]
fn empty_shards_of_short_inputs() {
    // 2 input rows over 3 shards: shard 2/3 holds nothing, its file is a header line.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = split(d, 3, 2);
    assert_eq!(std::fs::read_to_string(&s[2]).unwrap().lines().count(), 1);
    let want = expected(d, 2);
    let out = d.join("submission.csv");
    for files in [vec![&s[2], &s[0], &s[1]], vec![&s[0], &s[1]]] {
        let files: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
        let o = merge(&files, &out);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(std::fs::read(&out).unwrap(), want);
        assert!(
            stderr(&o).contains("1 shard(s) hold no rows"),
            "{}",
            stderr(&o)
        );
        std::fs::remove_file(&out).unwrap();
    }
    // More header-only files than empty shards.
    let extra = d.join("extra_empty.csv");
    std::fs::copy(&s[2], &extra).unwrap();
    let e = refused(d, &[&s[0], &s[1], &s[2], &extra], 1);
    has(
        &e,
        &[
            "2 header-only file(s)",
            "only 1 shard(s) of split N=3 over 2 rows should be empty (2/3)",
        ],
    );
    // A header-only file cannot stand in for a shard that has rows.
    let e = refused(d, &[&s[0], &s[2]], 1);
    has(
        &e,
        &[
            "1/3 (should hold 1 row(s): input rows 1)",
            "has no rows, so it is none of them",
        ],
    );
    // Only header-only files: nothing says what the split was.
    let e = refused(d, &[&s[2]], 1);
    has(&e, &["no file has any row", "s2.csv"]);
}

#[test]
fn help_describes_the_command() {
    let o = engine(&["merge", "--help"]);
    assert!(o.status.success());
    let h = String::from_utf8_lossy(&o.stdout);
    has(&h, &["SHARD", "--out", "any order", "--shard K/N"]);
    // No files at all is a usage error from the parser.
    let o = engine(&["merge", "--out", "x.csv"]);
    assert_eq!(o.status.code(), Some(2));
}
