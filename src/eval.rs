//! `engine eval`: score a prediction file against a labelled arena CSV.

use std::collections::HashMap;
use std::path::Path;

use crate::data::csv::{Labels, read_arena_csv};
use crate::error::{Error, Result};
use crate::{metrics, predictions};

pub struct EvalReport {
    pub log_loss: f64,
    pub accuracy: f64,
    pub rows: usize,
}

pub fn run(pred_path: &Path, labels_path: &Path) -> Result<EvalReport> {
    let preds = predictions::read(pred_path)?;
    let data = read_arena_csv(labels_path, Labels::Required)?;
    let by_id: HashMap<&str, [f64; 3]> = preds.iter().map(|(id, p)| (id.as_str(), *p)).collect();
    let label_ids: HashMap<&str, ()> = data.rows.iter().map(|r| (r.id.as_str(), ())).collect();
    let missing: Vec<&str> = data
        .rows
        .iter()
        .map(|r| r.id.as_str())
        .filter(|id| !by_id.contains_key(id))
        .collect();
    let extra: Vec<&str> = preds
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| !label_ids.contains_key(id))
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        let show = |v: &[&str]| v.iter().take(5).copied().collect::<Vec<_>>().join(", ");
        let mut msg = String::from("ids do not match:");
        if !missing.is_empty() {
            msg += &format!(
                " {} labelled id(s) have no prediction (e.g. {})",
                missing.len(),
                show(&missing)
            );
        }
        if !extra.is_empty() {
            msg += &format!(
                "{} {} predicted id(s) are not in {} (e.g. {})",
                if missing.is_empty() { "" } else { ";" },
                extra.len(),
                labels_path.display(),
                show(&extra)
            );
        }
        return Err(Error::data(pred_path, None, Some("id"), msg));
    }
    if data.rows.is_empty() {
        return Err(Error::data(
            labels_path,
            None,
            None,
            "no labelled rows to evaluate",
        ));
    }
    let labels: Vec<[f64; 3]> = data.rows.iter().filter_map(|r| r.label).collect();
    let probs: Vec<[f64; 3]> = data.rows.iter().map(|r| by_id[r.id.as_str()]).collect();
    Ok(EvalReport {
        log_loss: metrics::log_loss(&labels, &probs),
        accuracy: metrics::accuracy(&labels, &probs),
        rows: labels.len(),
    })
}
