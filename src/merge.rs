//! `engine merge`: join the shard files of `engine infer --shard K/N` into one submission.
//!
//! ```text
//! engine merge shard0.csv shard1.csv ... --out submission.csv
//! ```
//!
//! Shard K of N holds the input rows whose 0-based index i has i mod N = K; each shard file
//! row carries its input row index, the input's row count and its `K/N` (format and reader in
//! [`crate::shard`]). Files may be given in any order. The merge proves that the files cover
//! the input exactly once before it writes anything, and refuses — naming the file(s) and
//! row(s) — when:
//! - a path is given twice, or two files are the same shard K/N;
//! - the files come from different splits (their N or their input row counts disagree);
//! - shards are missing (each listed as K/N with the number of rows it should hold);
//! - an input row index appears twice (overlap: the row index, its id and both places);
//! - input rows are absent (gap: how many, the first few indices, and for each shard that
//!   lacks rows, which file that is and how many of its rows it lacks);
//! - the same id is on two different input rows, or an id is empty;
//! - a row's probabilities are not a distribution (sum further than 1e-3 from 1).
//!
//! Rows are copied as read, so the merge of a split run is byte for byte the submission an
//! unsplit run writes; only a row whose sum is more than 1e-6 from 1 (hand-edited, or written
//! with fewer decimals) is divided by its sum, so every written row sums to 1 within 1e-6.
//!
//! The output is a normal submission (`id,winner_model_a,winner_model_b,winner_tie`) in input
//! row order, written atomically: on any error no file appears and an existing `--out` is left
//! as it was. A one-line summary goes to stderr, the output path to stdout.
//!
//! Empty shards: with fewer input rows than shards some shards hold no rows, and their files
//! are a header line only. Such a file cannot say which shard it is ([`crate::shard::read`]
//! refuses it), so the merge accepts header-only shard files as standing for shards that
//! should be empty, and does not require them: a shard that should hold no rows may be absent.
//! More header-only files than empty shards is an error (one of them must be from a failed or
//! different run). A merge in which no file has a row is refused, since nothing then says
//! what the split or the input was; an input with 0 rows has nothing to submit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::data::csv::LABEL_COLUMNS;
use crate::error::{Error, Result};
use crate::predictions;
use crate::shard::{self, SHARD_COLUMNS, Shard, ShardFile};

/// A row whose probabilities sum further than this from 1 is refused.
const ROW_SUM_REFUSE: f64 = 1e-3;
/// A row whose probabilities sum further than this from 1 is divided by its sum.
const ROW_SUM_EXACT: f64 = 1e-6;
/// How many row indices a gap error lists.
const SHOW: usize = 8;

#[derive(clap::Args, Debug)]
#[command(after_long_help = "\
The files may come in any order. Nothing is written unless they cover the input exactly once: \
same split (N and input row count), every shard K/N once, every input row once, every id once. \
Header-only files (shards of an input with fewer rows than shards) stand for empty shards.

Example:
  engine infer --model M --data test.csv --shard 0/2 --out s0.csv   # on machine 1
  engine infer --model M --data test.csv --shard 1/2 --out s1.csv   # on machine 2
  engine merge s0.csv s1.csv --out submission.csv")]
pub struct MergeArgs {
    /// Shard files written by `engine infer --shard K/N` (all N of them, in any order).
    #[arg(required = true, value_name = "SHARD")]
    pub shards: Vec<PathBuf>,
    /// Submission to write (id,winner_model_a,winner_model_b,winner_tie, input-row order),
    /// atomically.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// The merged submission.
#[derive(Clone, Debug)]
pub struct Merged {
    /// N of the split.
    pub count: usize,
    /// Rows of the input.
    pub total_rows: usize,
    /// In input-row order.
    pub ids: Vec<String>,
    pub probs: Vec<[f64; 3]>,
    /// Files with rows, with their shard.
    pub files: Vec<(PathBuf, Shard)>,
    /// Header-only files (empty shards).
    pub empty_files: Vec<PathBuf>,
    /// How many shards that should hold no rows were not given.
    pub absent_empty_shards: usize,
}

impl Merged {
    /// One line for stderr.
    pub fn summary(&self, out: &Path) -> String {
        let mut s = format!(
            "merged {} shard file(s) of split N={} ({} input rows) into {}",
            self.files.len() + self.empty_files.len(),
            self.count,
            self.total_rows,
            out.display()
        );
        let empty = self.empty_files.len() + self.absent_empty_shards;
        if empty > 0 {
            s += &format!(
                " ({empty} shard(s) hold no rows: {} header-only file(s) given, {} not given)",
                self.empty_files.len(),
                self.absent_empty_shards
            );
        }
        s
    }
}

/// Whether `path` is a shard file with a header and no rows.
fn is_header_only_shard(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(file);
    let Ok(headers) = rdr.headers().cloned() else {
        return false;
    };
    let has = |n: &str| headers.iter().any(|h| h.trim() == n);
    let complete = std::iter::once("id")
        .chain(LABEL_COLUMNS)
        .chain(SHARD_COLUMNS)
        .all(has);
    complete && rdr.records().next().is_none()
}

fn list(paths: &[&Path]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn show_rows(rows: &[usize]) -> String {
    let mut s = rows
        .iter()
        .take(SHOW)
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if rows.len() > SHOW {
        s += ", …";
    }
    s
}

/// Read and check the shard files; the merged rows in input order.
pub fn merge(paths: &[PathBuf]) -> Result<Merged> {
    if paths.is_empty() {
        return Err(Error::Usage("give the shard files to merge".into()));
    }
    // The same path twice (also through different spellings).
    let mut seen: HashMap<PathBuf, &Path> = HashMap::new();
    for p in paths {
        let key = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if let Some(prev) = seen.insert(key, p) {
            return Err(Error::Usage(format!(
                "the same file is given twice: {} and {}",
                prev.display(),
                p.display()
            )));
        }
    }

    let mut files: Vec<(&Path, ShardFile)> = Vec::new();
    let mut empty_files: Vec<&Path> = Vec::new();
    for p in paths {
        match shard::read(p) {
            Ok(f) => files.push((p, f)),
            Err(e) => {
                if is_header_only_shard(p) {
                    empty_files.push(p);
                } else {
                    return Err(e);
                }
            }
        }
    }
    let Some((ref_path, ref_file)) = files.first() else {
        return Err(Error::data(
            paths[0].as_path(),
            None,
            None,
            format!(
                "no file has any row ({}): a header-only shard file cannot say which shard of which input it is, \
                 so there is nothing to check or merge",
                list(&empty_files)
            ),
        ));
    };
    let (count, total) = (ref_file.shard.count, ref_file.total_rows);

    // One split.
    for (p, f) in &files[1..] {
        if f.shard.count != count || f.total_rows != total {
            return Err(Error::data(
                p,
                None,
                Some("shard"),
                format!(
                    "shard {} of an input of {} rows, but {} is shard {} of an input of {} rows: \
                     these files come from different splits or inputs",
                    f.shard,
                    f.total_rows,
                    ref_path.display(),
                    ref_file.shard,
                    total
                ),
            ));
        }
    }

    // Each shard once.
    let mut by_shard: HashMap<usize, &Path> = HashMap::new();
    for (p, f) in &files {
        if let Some(prev) = by_shard.insert(f.shard.index, p) {
            return Err(Error::data(
                p,
                None,
                Some("shard"),
                format!(
                    "shard {} is given twice: {} and {}",
                    f.shard,
                    prev.display(),
                    p.display()
                ),
            ));
        }
    }

    // Shard K holds the input rows K, K + N, K + 2N, … below `total`, so exactly the shards
    // K < min(N, total) hold rows. Nothing below is sized by N or `total` themselves (a
    // corrupt file may claim anything): only by the rows actually present.
    let rows_of = |k: usize| {
        if k < total {
            (total - k).div_ceil(count)
        } else {
            0
        }
    };
    let first_rows =
        |k: usize| -> Vec<usize> { (k..total).step_by(count).take(SHOW + 1).collect() };
    let nonempty = count.min(total);

    // Missing shards: those that should hold rows are an error; empty ones may be absent.
    let missing_count = nonempty.saturating_sub(files.len());
    if missing_count > 0 {
        let what: Vec<String> = (0..nonempty)
            .filter(|k| !by_shard.contains_key(k))
            .take(SHOW)
            .map(|k| {
                format!(
                    "{} (should hold {} row(s): input rows {})",
                    Shard { index: k, count },
                    rows_of(k),
                    show_rows(&first_rows(k))
                )
            })
            .collect();
        let mut msg = format!(
            "{missing_count} of the {count} shard(s) of this split ({total} input rows) are missing: {}{}",
            what.join("; "),
            if missing_count > SHOW { "; …" } else { "" }
        );
        if !empty_files.is_empty() {
            msg += &format!(
                " ({} has no rows, so it is none of them)",
                list(&empty_files)
            );
        }
        return Err(Error::data(ref_path, None, Some("shard"), msg));
    }
    let empty_shards = count - nonempty;
    if empty_files.len() > empty_shards {
        let should: Vec<String> = (nonempty..count)
            .take(SHOW)
            .map(|k| Shard { index: k, count }.to_string())
            .collect();
        return Err(Error::data(
            empty_files[0],
            None,
            None,
            format!(
                "{} header-only file(s) ({}) but only {empty_shards} shard(s) of split N={count} over {total} rows should be empty{}: \
                 a header-only file here is from a failed or different run",
                empty_files.len(),
                list(&empty_files),
                if should.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({}{})",
                        should.join(", "),
                        if empty_shards > SHOW { ", …" } else { "" }
                    )
                }
            ),
        ));
    }
    // The header-only files stand for empty shards; the others were not given.
    let absent_empty_shards = empty_shards - empty_files.len();

    // Every input row once, every id once.
    let present: usize = files.iter().map(|(_, f)| f.rows.len()).sum();
    let mut slots: HashMap<usize, (usize, usize)> = HashMap::with_capacity(present);
    let mut ids: HashMap<&str, (usize, usize, usize)> = HashMap::with_capacity(present);
    for (fi, (p, f)) in files.iter().enumerate() {
        for (j, r) in f.rows.iter().enumerate() {
            let line = j + 1;
            if let Some((pf, pl)) = slots.insert(r.row, (fi, line)) {
                return Err(Error::data(
                    p,
                    Some(line),
                    Some("row"),
                    format!(
                        "input row {} (id `{}`) is also in {}, row {pl}: overlapping shards",
                        r.row,
                        r.id,
                        files[pf].0.display()
                    ),
                ));
            }
            if r.id.is_empty() {
                return Err(Error::data(
                    p,
                    Some(line),
                    Some("id"),
                    format!("input row {}: empty id", r.row),
                ));
            }
            if let Some((prow, pf, pl)) = ids.insert(r.id.as_str(), (r.row, fi, line)) {
                return Err(Error::data(
                    p,
                    Some(line),
                    Some("id"),
                    format!(
                        "id `{}` is on input row {} here and on input row {prow} in {}, row {pl}",
                        r.id,
                        r.row,
                        files[pf].0.display()
                    ),
                ));
            }
            let s: f64 = r.probs.iter().sum();
            if s.is_nan() || (s - 1.0).abs() > ROW_SUM_REFUSE {
                return Err(Error::data(
                    p,
                    Some(line),
                    Some("winner_model_a"),
                    format!("id {}: the three probabilities sum to {s}, not 1", r.id),
                ));
            }
        }
    }
    // Gaps: every shard is given (checked above) and holds no row twice, so a shard lacks
    // `rows_of(K) − its row count` rows; list the first few of each.
    if present < total {
        let mut per_shard: Vec<(usize, usize, Vec<usize>)> = files
            .iter()
            .filter(|(_, f)| f.rows.len() < rows_of(f.shard.index))
            .map(|(_, f)| {
                let k = f.shard.index;
                let first: Vec<usize> = (k..total)
                    .step_by(count)
                    .filter(|r| !slots.contains_key(r))
                    .take(SHOW + 1)
                    .collect();
                (k, rows_of(k) - f.rows.len(), first)
            })
            .collect();
        per_shard.sort_by_key(|(k, _, _)| *k);
        let mut first: Vec<usize> = per_shard
            .iter()
            .flat_map(|(_, _, v)| v.iter().copied())
            .collect();
        first.sort_unstable();
        first.truncate(SHOW + 1);
        let detail: Vec<String> = per_shard
            .iter()
            .map(|(k, lacking, rows)| {
                format!(
                    "{} (shard {}) lacks {lacking} of its {} rows: {}",
                    by_shard
                        .get(k)
                        .map_or_else(|| "?".into(), |p| p.display().to_string()),
                    Shard { index: *k, count },
                    rows_of(*k),
                    show_rows(rows)
                )
            })
            .collect();
        let first_file = per_shard
            .first()
            .and_then(|(k, _, _)| by_shard.get(k).copied())
            .unwrap_or(*ref_path);
        return Err(Error::data(
            first_file,
            None,
            Some("row"),
            format!(
                "{} of the {total} input rows are in no file (input rows {}): {}",
                total - present,
                show_rows(&first),
                detail.join("; ")
            ),
        ));
    }

    // Assemble in input order (present == total here, and every row in 0..total is there).
    let mut out_ids = Vec::with_capacity(total);
    let mut out_probs = Vec::with_capacity(total);
    for row in 0..total {
        let &(fi, line) = slots
            .get(&row)
            .ok_or_else(|| Error::Msg(format!("internal error: input row {row} lost in merge")))?;
        let r = &files[fi].1.rows[line - 1];
        let s: f64 = r.probs.iter().sum();
        out_ids.push(r.id.clone());
        out_probs.push(if (s - 1.0).abs() > ROW_SUM_EXACT {
            r.probs.map(|v| v / s)
        } else {
            r.probs
        });
    }
    Ok(Merged {
        count,
        total_rows: total,
        ids: out_ids,
        probs: out_probs,
        files: files
            .iter()
            .map(|(p, f)| (p.to_path_buf(), f.shard))
            .collect(),
        empty_files: empty_files.iter().map(|p| p.to_path_buf()).collect(),
        absent_empty_shards,
    })
}

/// Merge `paths` and write the submission to `out` atomically.
pub fn run(paths: &[PathBuf], out: &Path) -> Result<Merged> {
    let m = merge(paths)?;
    predictions::write(out, &m.ids, &m.probs)?;
    Ok(m)
}

/// `engine merge`.
pub fn run_cli(a: MergeArgs) -> Result<()> {
    let m = run(&a.shards, &a.out)?;
    eprintln!("{}", m.summary(&a.out));
    println!("{}", a.out.display());
    Ok(())
}
