//! The Kaggle arena CSV: train files have
//! `id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie`,
//! test files `id,prompt,response_a,response_b`. Columns are found by header name, in any order,
//! extra columns ignored. Winner columns hold 0/1 or soft probabilities summing to 1.
//!
//! Bad input (malformed CSV, a missing column, a cell that is not a JSON list, a duplicate id,
//! an invalid label) is an error naming file, row and field. Odd but real rows — prompt and
//! responses with different turn counts, empty lists, responses that are all `null` — are
//! scored as they are (missing turns empty) and counted for one warning per kind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::data::json_list;
use crate::error::{Error, Result};

/// The label columns, in the order of the submission's probability columns.
pub const LABEL_COLUMNS: [&str; 3] = ["winner_model_a", "winner_model_b", "winner_tie"];

/// One comparison: a prompt and two responses, turn by turn.
#[derive(Clone, Debug, PartialEq)]
pub struct ArenaRow {
    pub id: String,
    pub prompt: Vec<Option<String>>,
    pub response_a: Vec<Option<String>>,
    pub response_b: Vec<Option<String>>,
    /// (A wins, B wins, tie), summing to 1, when the file has winner columns.
    pub label: Option<[f64; 3]>,
}

impl ArenaRow {
    /// The row with A and B exchanged (labels too).
    pub fn swapped(&self) -> ArenaRow {
        ArenaRow {
            id: self.id.clone(),
            prompt: self.prompt.clone(),
            response_a: self.response_b.clone(),
            response_b: self.response_a.clone(),
            label: self.label.map(|[a, b, t]| [b, a, t]),
        }
    }
}

/// Whether winner columns must be present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Labels {
    Required,
    IfPresent,
}

/// Counts of rows that are odd but valid.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowStats {
    pub turn_mismatch: usize,
    pub empty_lists: usize,
    pub all_null_response: usize,
}

/// A parsed arena file.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub path: PathBuf,
    pub rows: Vec<ArenaRow>,
    pub stats: RowStats,
    pub has_labels: bool,
}

impl Dataset {
    /// One warning line per kind of odd row (none if there are none).
    pub fn warnings(&self) -> Vec<String> {
        let s = &self.stats;
        let p = self.path.display();
        let mut w = Vec::new();
        if s.turn_mismatch > 0 {
            w.push(format!(
                "{p}: {} row(s) have different turn counts in prompt and responses; missing turns are scored as empty",
                s.turn_mismatch
            ));
        }
        if s.empty_lists > 0 {
            w.push(format!(
                "{p}: {} row(s) have an empty list in prompt or a response",
                s.empty_lists
            ));
        }
        if s.all_null_response > 0 {
            w.push(format!(
                "{p}: {} row(s) have a response that is all null",
                s.all_null_response
            ));
        }
        w
    }
}

/// The column names of a CSV file's header line, trimmed (and without a UTF-8 byte-order mark).
pub(crate) fn header_names<R: std::io::Read>(
    rdr: &mut csv::Reader<R>,
    path: &Path,
) -> Result<Vec<String>> {
    let headers = rdr.headers().map_err(|e| {
        Error::data(
            path,
            None,
            None,
            format!("cannot read the header line: {e}"),
        )
    })?;
    Ok(headers
        .iter()
        .map(|h| h.trim().trim_start_matches('\u{feff}').to_string())
        .collect())
}

/// Read an arena CSV file.
pub fn read_arena_csv(path: &Path, labels: Labels) -> Result<Dataset> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    read_arena(file, path, labels)
}

/// Read arena CSV from any reader; `path` names the source in errors.
pub fn read_arena<R: std::io::Read>(reader: R, path: &Path, labels: Labels) -> Result<Dataset> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(reader);
    let headers = header_names(&mut rdr, path)?;
    let col = |name: &str| headers.iter().position(|h| h == name);
    let mut required = vec!["id", "prompt", "response_a", "response_b"];
    let label_cols: Vec<Option<usize>> = LABEL_COLUMNS.iter().map(|c| col(c)).collect();
    let has_labels = label_cols.iter().all(Option::is_some);
    if labels == Labels::Required || label_cols.iter().any(Option::is_some) {
        required.extend(LABEL_COLUMNS);
    }
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|c| col(c).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(Error::data(
            path,
            None,
            None,
            format!(
                "missing column(s) {}; the header has: {}",
                missing.join(", "),
                headers.join(", ")
            ),
        ));
    }
    let idx = |name: &str| col(name).unwrap_or(usize::MAX);
    let (c_id, c_p, c_a, c_b) = (
        idx("id"),
        idx("prompt"),
        idx("response_a"),
        idx("response_b"),
    );

    let mut rows = Vec::new();
    let mut stats = RowStats::default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, rec) in rdr.records().enumerate() {
        let row_no = i + 1;
        let rec =
            rec.map_err(|e| Error::data(path, Some(row_no), None, format!("malformed CSV: {e}")))?;
        let field = |c: usize| rec.get(c).unwrap_or("");
        let id = field(c_id).trim().to_string();
        if id.is_empty() {
            return Err(Error::data(path, Some(row_no), Some("id"), "empty id"));
        }
        if let Some(prev) = seen.insert(id.clone(), row_no) {
            return Err(Error::data(
                path,
                Some(row_no),
                Some("id"),
                format!("duplicate id `{id}` (also row {prev})"),
            ));
        }
        let list = |c: usize, name: &str| {
            json_list::parse(field(c))
                .map_err(|m| Error::data(path, Some(row_no), Some(name), format!("id {id}: {m}")))
        };
        let prompt = list(c_p, "prompt")?;
        let response_a = list(c_a, "response_a")?;
        let response_b = list(c_b, "response_b")?;
        let label = if has_labels {
            let mut l = [0f64; 3];
            for (k, (c, name)) in label_cols.iter().zip(LABEL_COLUMNS).enumerate() {
                let raw = field(c.unwrap_or(usize::MAX)).trim();
                let v: f64 = raw.parse().map_err(|_| {
                    Error::data(
                        path,
                        Some(row_no),
                        Some(name),
                        format!("id {id}: `{raw}` is not a number"),
                    )
                })?;
                if !(0.0..=1.0).contains(&v) {
                    return Err(Error::data(
                        path,
                        Some(row_no),
                        Some(name),
                        format!("id {id}: {v} is outside [0, 1]"),
                    ));
                }
                l[k] = v;
            }
            let s: f64 = l.iter().sum();
            if (s - 1.0).abs() > 1e-4 {
                return Err(Error::data(
                    path,
                    Some(row_no),
                    Some("winner_model_a"),
                    format!("id {id}: the winner columns sum to {s}, not 1"),
                ));
            }
            Some([l[0] / s, l[1] / s, l[2] / s])
        } else {
            None
        };
        if prompt.len() != response_a.len() || prompt.len() != response_b.len() {
            stats.turn_mismatch += 1;
        }
        if prompt.is_empty() || response_a.is_empty() || response_b.is_empty() {
            stats.empty_lists += 1;
        }
        let all_null = |v: &[Option<String>]| !v.is_empty() && v.iter().all(Option::is_none);
        if all_null(&response_a) || all_null(&response_b) {
            stats.all_null_response += 1;
        }
        rows.push(ArenaRow {
            id,
            prompt,
            response_a,
            response_b,
            label,
        });
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        rows,
        stats,
        has_labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, labels: Labels) -> Result<Dataset> {
        read_arena(text.as_bytes(), Path::new("t.csv"), labels)
    }

    #[test]
    fn quoted_fields_and_labels() {
        let d = read(
            "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n\
             7,x,y,\"[\"\"a, b\"\"]\",\"[\"\"line1\nline2\"\"]\",\"[null]\",0,1,0\n",
            Labels::Required,
        )
        .unwrap();
        assert_eq!(d.rows.len(), 1);
        let r = &d.rows[0];
        assert_eq!(r.prompt, vec![Some("a, b".into())]);
        assert_eq!(r.response_a, vec![Some("line1\nline2".into())]);
        assert_eq!(r.label, Some([0.0, 1.0, 0.0]));
        assert_eq!(d.stats.all_null_response, 1);
    }

    #[test]
    fn errors_name_row_and_field() {
        let e = read(
            "id,prompt,response_a,response_b\n1,[\"a\"],[\"b\"],[\"c\"]\n2,[\"a\"],nope,[\"c\"]\n",
            Labels::IfPresent,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("row 2") && e.contains("response_a") && e.contains("not a JSON list"),
            "{e}"
        );
        let e = read("id,prompt,response_a\n1,[],[]\n", Labels::IfPresent)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing column") && e.contains("response_b"),
            "{e}"
        );
        let e = read(
            "id,prompt,response_a,response_b\n1,[],[],[]\n1,[],[],[]\n",
            Labels::IfPresent,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("duplicate id `1`") && e.contains("row 2"), "{e}");
        let e = read(
            "id,prompt,response_a,response_b\n1,[],[]\n",
            Labels::IfPresent,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("row 1") && e.contains("malformed CSV"), "{e}");
        let e = read(
            "id,prompt,response_a,response_b\n1,[],[],[]\n",
            Labels::Required,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("winner_model_a"), "{e}");
    }
}
