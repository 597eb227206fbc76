//! Splitting one inference job across machines (`engine infer --shard K/N`) and the shard
//! files that `engine merge` joins.
//!
//! Shard K of N (0 ≤ K < N) takes the input rows whose 0-based index i has i mod N = K: a
//! strided split, so every shard gets a similar length mix whatever order the file is in.
//! A shard file is a prediction file with three more columns,
//! `id,winner_model_a,winner_model_b,winner_tie,row,total_rows,shard`: `row` is the row's
//! 0-based index in the input, `total_rows` the input's row count and `shard` the `K/N` that
//! wrote it, so a merge can prove that the shards cover the input exactly once.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::data::csv::LABEL_COLUMNS;
use crate::error::{Error, Result};
use crate::io::AtomicFile;
use crate::predictions;

/// The extra columns of a shard file, after the prediction columns.
pub const SHARD_COLUMNS: [&str; 3] = ["row", "total_rows", "shard"];

/// Shard `index` of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Whether input row `row` (0-based) belongs to this shard.
    pub fn contains(&self, row: usize) -> bool {
        row % self.count == self.index
    }

    /// The input rows of this shard, for an input of `total` rows.
    pub fn rows(&self, total: usize) -> Vec<usize> {
        (self.index..total).step_by(self.count).collect()
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}` is not a shard: write K/N with 0 ≤ K < N, e.g. 0/2 and 1/2");
        let (k, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let index: usize = k.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// One row of a shard file.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardRow {
    /// 0-based index of the row in the input file.
    pub row: usize,
    pub id: String,
    pub probs: [f64; 3],
}

/// A shard file as read back.
#[derive(Clone, Debug)]
pub struct ShardFile {
    pub shard: Shard,
    pub total_rows: usize,
    /// In file order.
    pub rows: Vec<ShardRow>,
}

/// Write a shard file into an open file: `rows[i]` is the input index of `ids[i]`/`probs[i]`.
pub fn write_to(
    f: &mut AtomicFile,
    path: &Path,
    shard: Shard,
    total_rows: usize,
    rows: &[usize],
    ids: &[String],
    probs: &[[f64; 3]],
) -> Result<()> {
    let mut w = csv::Writer::from_writer(f.writer());
    let err = |e: csv::Error| Error::Msg(format!("{}: {e}", path.display()));
    w.write_record(
        std::iter::once("id")
            .chain(LABEL_COLUMNS)
            .chain(SHARD_COLUMNS),
    )
    .map_err(err)?;
    let tag = shard.to_string();
    let total = total_rows.to_string();
    for ((row, id), p) in rows.iter().zip(ids).zip(probs) {
        let cells = [
            id.clone(),
            format!("{:.9}", p[0]),
            format!("{:.9}", p[1]),
            format!("{:.9}", p[2]),
            row.to_string(),
            total.clone(),
            tag.clone(),
        ];
        w.write_record(&cells).map_err(err)?;
    }
    w.flush().map_err(|e| Error::io(path, e))
}

/// Read a shard file, checking every cell (the error names the file, row and column).
pub fn read(path: &Path) -> Result<ShardFile> {
    let names: Vec<&str> = std::iter::once("id")
        .chain(LABEL_COLUMNS)
        .chain(SHARD_COLUMNS)
        .collect();
    let (mut rdr, cols) = predictions::open_with_columns(path, &names, |name| {
        if SHARD_COLUMNS.contains(&name) {
            " (not a shard file: write shards with `engine infer --shard K/N`)"
        } else {
            ""
        }
    })?;
    let mut shard: Option<Shard> = None;
    let mut total_rows: Option<usize> = None;
    let mut rows = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let line = i + 1;
        let rec =
            rec.map_err(|e| Error::data(path, Some(line), None, format!("malformed CSV: {e}")))?;
        let cell = |c: usize| rec.get(cols[c]).unwrap_or("").trim();
        let id = cell(0).to_string();
        let mut probs = [0f64; 3];
        for (k, p) in probs.iter_mut().enumerate() {
            *p = predictions::probability(path, line, k, &id, cell(k + 1))?;
        }
        let int = |c: usize, name: &str| -> Result<usize> {
            let raw = cell(c);
            raw.parse().map_err(|_| {
                Error::data(
                    path,
                    Some(line),
                    Some(name),
                    format!("`{raw}` is not a row count or index"),
                )
            })
        };
        let row = int(4, "row")?;
        let total = int(5, "total_rows")?;
        let this: Shard = cell(6)
            .parse()
            .map_err(|e: String| Error::data(path, Some(line), Some("shard"), e))?;
        match (shard, total_rows) {
            (None, _) | (_, None) => {
                shard = Some(this);
                total_rows = Some(total);
            }
            (Some(s), Some(t)) if s != this || t != total => {
                return Err(Error::data(
                    path,
                    Some(line),
                    Some("shard"),
                    format!(
                        "shard {this} of {total} rows, but the file's first row says shard {s} of {t} rows"
                    ),
                ));
            }
            _ => {}
        }
        if row >= total {
            return Err(Error::data(
                path,
                Some(line),
                Some("row"),
                format!("row {row} is past the input's {total} rows"),
            ));
        }
        if !this.contains(row) {
            return Err(Error::data(
                path,
                Some(line),
                Some("row"),
                format!("row {row} does not belong to shard {this}"),
            ));
        }
        rows.push(ShardRow { row, id, probs });
    }
    let shard = shard
        .ok_or_else(|| Error::data(path, None, None, "no rows: cannot tell which shard this is"))?;
    Ok(ShardFile {
        shard,
        total_rows: total_rows.unwrap_or(0),
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_rows() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        assert_eq!(s.rows(8), vec![1, 4, 7]);
        assert_eq!(s.to_string(), "1/3");
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        // Every row belongs to exactly one shard.
        for total in [0, 1, 7, 10] {
            let mut seen = vec![0; total];
            for k in 0..3 {
                for r in (Shard { index: k, count: 3 }).rows(total) {
                    seen[r] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1));
        }
    }

    #[test]
    fn write_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        let shard = Shard { index: 1, count: 2 };
        let mut f = AtomicFile::create(&path).unwrap();
        let ids = vec!["a,1".to_string(), "b".to_string()];
        let probs = vec![[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]];
        write_to(&mut f, &path, shard, 4, &[1, 3], &ids, &probs).unwrap();
        f.commit().unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.shard, shard);
        assert_eq!(back.total_rows, 4);
        assert_eq!(back.rows.len(), 2);
        assert_eq!(back.rows[0].id, "a,1");
        assert_eq!(back.rows[1].row, 3);
        assert_eq!(back.rows[1].probs, [0.1, 0.2, 0.7]);
        // A row in the wrong shard is refused with the file, line and column.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(",3,4,1/2", ",2,4,1/2");
        std::fs::write(&path, text).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(
            e.contains("s.csv") && e.contains("row 2") && e.contains("shard 1/2"),
            "{e}"
        );
    }
}
