//! Prediction files (the Kaggle submission format):
//! `id,winner_model_a,winner_model_b,winner_tie`, one row per input row, in input order.

use std::collections::HashMap;
use std::path::Path;

use crate::data::csv::LABEL_COLUMNS;
use crate::error::{Error, Result};
use crate::io::AtomicFile;

/// Write a submission atomically (ids quoted by CSV rules where needed). Probabilities are
/// printed with 9 decimals, so each row sums to 1 within 2e-9.
pub fn write(path: &Path, ids: &[String], probs: &[[f64; 3]]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    write_to(&mut f, path, ids, probs)?;
    f.commit()
}

/// Write the submission rows into an open file.
pub fn write_to(f: &mut AtomicFile, path: &Path, ids: &[String], probs: &[[f64; 3]]) -> Result<()> {
    let mut w = csv::Writer::from_writer(f.writer());
    let err = |e: csv::Error| Error::Msg(format!("{}: {e}", path.display()));
    w.write_record(std::iter::once("id").chain(LABEL_COLUMNS))
        .map_err(err)?;
    for (id, p) in ids.iter().zip(probs) {
        let cells = [
            id.clone(),
            format!("{:.9}", p[0]),
            format!("{:.9}", p[1]),
            format!("{:.9}", p[2]),
        ];
        w.write_record(&cells).map_err(err)?;
    }
    w.flush().map_err(|e| Error::io(path, e))
}

/// Read a prediction file: ids in file order with their probabilities.
pub fn read(path: &Path) -> Result<Vec<(String, [f64; 3])>> {
    let names: Vec<&str> = std::iter::once("id").chain(LABEL_COLUMNS).collect();
    let (mut rdr, cols) = open_with_columns(path, &names, |_| "")?;
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for (i, rec) in rdr.records().enumerate() {
        let row = i + 1;
        let rec =
            rec.map_err(|e| Error::data(path, Some(row), None, format!("malformed CSV: {e}")))?;
        let id = rec.get(cols[0]).unwrap_or("").trim().to_string();
        if let Some(prev) = seen.insert(id.clone(), row) {
            return Err(Error::data(
                path,
                Some(row),
                Some("id"),
                format!("duplicate id `{id}` (also row {prev})"),
            ));
        }
        let mut p = [0f64; 3];
        for (k, v) in p.iter_mut().enumerate() {
            *v = probability(path, row, k, &id, rec.get(cols[k + 1]).unwrap_or(""))?;
        }
        out.push((id, p));
    }
    Ok(out)
}

/// Open a CSV file and find the columns `names` in its header (in that order). A missing
/// column is an error naming the file and the column, followed by `hint(name)`.
pub(crate) fn open_with_columns(
    path: &Path,
    names: &[&str],
    hint: impl Fn(&str) -> &'static str,
) -> Result<(csv::Reader<std::fs::File>, Vec<usize>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(file);
    let headers = crate::data::csv::header_names(&mut rdr, path)?;
    let cols = names
        .iter()
        .map(|&name| {
            headers.iter().position(|h| h == name).ok_or_else(|| {
                Error::data(
                    path,
                    None,
                    None,
                    format!("missing column `{name}`{}", hint(name)),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((rdr, cols))
}

/// The probability in column `LABEL_COLUMNS[k]` of data row `row` (1-based): a finite number
/// in [0, 1].
pub(crate) fn probability(path: &Path, row: usize, k: usize, id: &str, raw: &str) -> Result<f64> {
    let raw = raw.trim();
    raw.parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && (0.0..=1.0).contains(v))
        .ok_or_else(|| {
            Error::data(
                path,
                Some(row),
                Some(LABEL_COLUMNS[k]),
                format!("id {id}: `{raw}` is not a probability"),
            )
        })
}
