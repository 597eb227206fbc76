//! `engine ensemble`: weighted averages of prediction files, a weight search on labelled rows,
//! and two optional post-processing rules for degenerate rows.
//!
//! ```text
//! engine ensemble --pred a.csv --pred b.csv [--weights 0.6,0.4] [--mode prob|logit] --out ens.csv
//!                 [--labels train.csv] [--data test.csv] [--rule identical] [--rule empty] [--folds 5]
//! ```
//!
//! # Inputs
//! Every `--pred` is a prediction file (`id,winner_model_a,winner_model_b,winner_tie`, read by
//! [`crate::predictions::read`]; the shard files of `engine infer --shard` work too, their extra
//! columns are ignored). Every file must hold the same set of ids (an error names the file and
//! an example missing or extra id); the output follows the first file's row order. A row whose
//! probabilities sum to within 0.01 of 1 is divided by its sum (with a note on stderr when any
//! row was more than 1e-6 off); a row further off is refused as not being probabilities.
//!
//! # Averaging
//! Weights `w_m` are finite, ≥ 0, not all zero, one per file, and are divided by their sum (a
//! note on stderr says so when they did not sum to 1). Without `--weights` and `--labels` they
//! are equal.
//! - `--mode prob` (default): `p = Σ_m w_m p_m`.
//! - `--mode logit`: `z_k = Σ_m w_m ln p_mk` with every `p_mk` first clipped to
//!   `[ε, 1 − ε]` (ε = f64 machine epsilon, as `sklearn.metrics.log_loss` clips) and the row
//!   renormalised, then `p = softmax(z)`. Per-row constants cancel in the softmax, so this is
//!   the usual logit average (a weighted geometric mean of the probabilities, renormalised).
//!
//! Each output row is divided by its sum, so it lies in [0, 1] and sums to 1; the file is
//! written atomically by [`crate::predictions::write`] (9 decimals).
//!
//! # Weight search (`--labels` without `--weights`)
//! `--labels` is a labelled arena CSV (hard or soft labels). Every labelled id must have a
//! prediction; prediction rows without a label are allowed — they are ensembled and written
//! but not scored, and stderr says how many there are. The search minimises the log loss of
//! the labelled rows over the probability simplex `{w ≥ 0, Σ w = 1}`. In both modes that loss
//! is convex in `w` (prob: `−ln` of a linear function; logit: log-sum-exp of a linear function
//! minus a linear function), so a local minimum is the global one. The method is a projected
//! (proximal) Newton method: at `w` the exact gradient `g` and Hessian `H` give a quadratic
//! model, which is minimised exactly over the simplex (a primal active-set method on the KKT
//! systems of the free coordinates); a backtracking (Armijo) line search along the step keeps
//! every iterate feasible and the loss decreasing, with a Frank–Wolfe step as fallback. Near
//! the optimum the steps are full Newton steps (quadratic convergence: typically 3–8 steps).
//! It stops when the Frank–Wolfe duality gap `gᵀw − min_m g_m`, a certified upper bound on
//! `loss(w) − min loss` for a convex function on the simplex, is at most [`SEARCH_TOL`].
//!
//! Reported on stderr: each file's own log loss, equal weights' log loss, the chosen weights
//! and their log loss, and (with `--folds K`, default 5; 0 skips) the K-fold cross-validated
//! log loss of the search — labelled row `i` (in label-file order) is in fold `i mod K`, the
//! weights are searched on the other folds and scored on it, and the pooled out-of-fold log
//! loss is compared with the in-sample one to show the overfitting gap. With `--labels` and
//! `--weights` nothing is searched; the given weights (and each file, and equal weights) are
//! scored.
//!
//! # Rules (off by default; `--rule NAME`, repeatable)
//! They look at the response texts of each row as parsed by [`crate::data::csv`]: a list of
//! turns, each `Some(text)` or `None` for a JSON `null`.
//! - `identical`: `response_a == response_b` (the turn lists are equal: same number of turns,
//!   each turn the same `null`-or-string, strings compared exactly) → `p_a` and `p_b` are both
//!   set to `(p_a + p_b) / 2`; `p_tie` is unchanged. An identical pair cannot favour a side.
//! - `empty`: exactly one response is empty — every turn is `null` or a string that is empty or
//!   only Unicode whitespace (an empty list counts as empty) — and the empty side's win
//!   probability is strictly greater than the other side's → those two probabilities are
//!   swapped (`p_tie` unchanged). An empty answer should not be favoured.
//!
//! The two conditions never hold on the same row (identical responses are both empty or both
//! not), so their order does not matter; both keep each row summing to 1. The texts come from
//! `--data` (an arena CSV with exactly the prediction ids) or, without it, from `--labels`
//! (which must then cover every prediction id); a rule without either is a usage error. With
//! `--labels`, every rule — requested or not — is measured on the labelled rows (texts from the
//! labels file) against the ensemble with the chosen weights: rows matched, rows changed, log
//! loss without and with the rule and the difference; "recommended" only when it lowers the log
//! loss. Only the requested rules are applied to the output. The weight search ignores rules.
//!
//! # Output
//! Human-readable lines go to stderr; stdout gets exactly one line of JSON for scripts:
//! `out`, `rows`, `mode`, `files`, `weights` (normalised, as used), `weights_from`
//! (`given`/`equal`/`search`), `rules_applied` (per requested rule: `matched`, `changed`) and
//! `labels` (null without `--labels`; else `file`, `rows`, `unlabelled_prediction_rows`,
//! `model_log_loss`, `equal_weights_log_loss`, `log_loss` (chosen weights, no rules),
//! `output_log_loss` (the written rows, requested rules applied), `search` (null unless
//! searched: `steps`, `optimality_gap`, `converged`, `cv_folds`, `cv_log_loss`, `cv_gap`) and
//! `rules` (per rule: `matched`, `changed`, `log_loss_without`, `log_loss_with`, `delta`,
//! `recommended`, `requested`)). Numbers that do not exist are `null`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::data::csv::{ArenaRow, Labels, read_arena_csv};
use crate::error::{Error, Result};
use crate::{metrics, predictions};

/// The search stops when the Frank–Wolfe gap (an upper bound on the distance of the log loss
/// to its minimum over the simplex) is at most this.
pub const SEARCH_TOL: f64 = 1e-10;
/// At most this many Newton steps (the usual count is 3–15).
const MAX_NEWTON_STEPS: usize = 200;
/// Clipping of probabilities, as `sklearn.metrics.log_loss`.
const EPS: f64 = f64::EPSILON;
/// Input rows further than this from summing to 1 are refused; closer ones are renormalised.
const ROW_SUM_REFUSE: f64 = 1e-2;
/// Input rows further than this from summing to 1 are counted in a note.
const ROW_SUM_NOTE: f64 = 1e-6;

/// How the files are averaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// Weighted mean of the probabilities.
    #[default]
    Prob,
    /// Weighted mean of the log-probabilities (clipped at machine epsilon), then softmax.
    Logit,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Prob => "prob",
            Mode::Logit => "logit",
        }
    }
}

/// A post-processing rule for degenerate rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Rule {
    /// Identical responses: p_a and p_b both become their mean.
    Identical,
    /// Exactly one response empty (all turns null/whitespace): never favour the empty side.
    Empty,
}

impl Rule {
    pub const ALL: [Rule; 2] = [Rule::Identical, Rule::Empty];

    pub fn name(self) -> &'static str {
        match self {
            Rule::Identical => "identical",
            Rule::Empty => "empty",
        }
    }

    /// Whether the rule's condition holds for this row.
    pub fn matches(self, row: &ArenaRow) -> bool {
        match self {
            Rule::Identical => row.response_a == row.response_b,
            Rule::Empty => is_empty_response(&row.response_a) != is_empty_response(&row.response_b),
        }
    }

    /// The row's probabilities after the rule (unchanged where the condition does not hold).
    pub fn apply(self, row: &ArenaRow, p: [f64; 3]) -> [f64; 3] {
        if !self.matches(row) {
            return p;
        }
        match self {
            Rule::Identical => {
                let m = 0.5 * (p[0] + p[1]);
                [m, m, p[2]]
            }
            Rule::Empty => {
                let a_empty = is_empty_response(&row.response_a);
                let (empty, other) = if a_empty { (p[0], p[1]) } else { (p[1], p[0]) };
                if empty > other { [p[1], p[0], p[2]] } else { p }
            }
        }
    }
}

/// A response is empty when every turn is `null` or only whitespace (an empty list is empty).
pub fn is_empty_response(turns: &[Option<String>]) -> bool {
    turns
        .iter()
        .all(|t| t.as_deref().is_none_or(|s| s.trim().is_empty()))
}

#[derive(clap::Args, Debug)]
#[command(after_long_help = "\
Averaging: prob = Σ w·p; logit = softmax(Σ w·ln p), p clipped to [ε, 1−ε] first (ε = f64 \
machine epsilon, as sklearn's log_loss). Every file must hold the same ids; the output follows \
the first file's order and each row sums to 1.

With --labels and no --weights, the weights minimising the labelled rows' log loss are found \
on the simplex (projected Newton, stopped at a certified optimality gap ≤ 1e-10), and a K-fold \
cross-validated log loss of that search shows the overfitting gap. stdout gets one JSON line \
(weights, log losses); the human-readable report goes to stderr.

Rules: identical — responses with equal turn lists get p_a = p_b = their mean; empty — when \
exactly one response is empty (every turn null or whitespace), its win probability is swapped \
with the other side's if it is larger. With --labels every rule is measured on the labelled \
rows; only the requested ones are applied.

Examples:
  engine ensemble --pred a.csv --pred b.csv --weights 0.6,0.4 --out ens.csv
  engine ensemble --pred oof_a.csv --pred oof_b.csv --labels val.csv --mode logit --out oof_ens.csv
  engine ensemble --pred a.csv --pred b.csv --weights 0.6,0.4 --data test.csv --rule identical --out ens.csv")]
pub struct EnsembleArgs {
    /// A prediction file (id,winner_model_a,winner_model_b,winner_tie; shard files of
    /// `engine infer --shard` work too). Repeat once per model.
    #[arg(long = "pred", required = true, value_name = "FILE")]
    pub preds: Vec<PathBuf>,
    /// One weight per --pred, comma-separated: finite, ≥ 0, not all zero; divided by their sum.
    /// Default: equal, or with --labels the weights that minimise the log loss.
    #[arg(long, value_name = "W1,W2,...", allow_hyphen_values = true)]
    pub weights: Option<String>,
    /// How to average the files.
    #[arg(long, value_enum, default_value = "prob")]
    pub mode: Mode,
    /// Submission to write (id,winner_model_a,winner_model_b,winner_tie), atomically.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Labelled arena CSV (winner columns): search the weights on it (or, with --weights, score
    /// them), and measure every rule. Every labelled id needs a prediction.
    #[arg(long, value_name = "CSV")]
    pub labels: Option<PathBuf>,
    /// Arena CSV with exactly the predictions' ids: the response texts for --rule (default:
    /// the --labels file).
    #[arg(long, value_name = "CSV")]
    pub data: Option<PathBuf>,
    /// Post-processing rule to apply to the output (repeat or comma-separate for several).
    #[arg(long = "rule", value_enum, value_name = "RULE", value_delimiter = ',')]
    pub rules: Vec<Rule>,
    /// Folds of the cross-validated log loss reported by the weight search (0: skip).
    #[arg(long, default_value_t = 5, value_name = "K")]
    pub folds: usize,
}

/// What `engine ensemble` does, as a library call.
#[derive(Clone, Debug)]
pub struct EnsembleOptions {
    pub preds: Vec<PathBuf>,
    /// Raw weights (validated and normalised by [`run`]); `None`: equal, or searched.
    pub weights: Option<Vec<f64>>,
    pub mode: Mode,
    pub out: PathBuf,
    pub labels: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub rules: Vec<Rule>,
    pub folds: usize,
}

/// Where the weights came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsFrom {
    Given,
    Equal,
    Search,
}

impl WeightsFrom {
    pub fn name(self) -> &'static str {
        match self {
            WeightsFrom::Given => "given",
            WeightsFrom::Equal => "equal",
            WeightsFrom::Search => "search",
        }
    }
}

/// How many rows a rule matched and changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleCount {
    pub rule: Rule,
    pub matched: usize,
    pub changed: usize,
}

/// A rule measured on the labelled rows.
#[derive(Clone, Debug)]
pub struct RuleMeasure {
    pub count: RuleCount,
    pub log_loss_without: f64,
    pub log_loss_with: f64,
    pub requested: bool,
}

impl RuleMeasure {
    pub fn delta(&self) -> f64 {
        self.log_loss_with - self.log_loss_without
    }
    pub fn recommended(&self) -> bool {
        self.log_loss_with < self.log_loss_without
    }
}

/// The result of a weight search.
#[derive(Clone, Debug)]
pub struct Search {
    /// On the simplex.
    pub weights: Vec<f64>,
    /// The search objective at `weights` (the log loss, inputs clipped as sklearn clips).
    pub log_loss: f64,
    /// Newton steps taken.
    pub steps: usize,
    /// Frank–Wolfe gap at `weights`: `log_loss − min ≤ gap`.
    pub gap: f64,
    /// `gap ≤ SEARCH_TOL`.
    pub converged: bool,
}

/// Cross-validated log loss of the weight search.
#[derive(Clone, Debug)]
pub struct CrossValidation {
    pub folds: usize,
    /// Pooled log loss of the out-of-fold predictions.
    pub log_loss: f64,
    /// The weights found on each fold's complement.
    pub fold_weights: Vec<Vec<f64>>,
}

/// What the labelled rows say.
#[derive(Clone, Debug)]
pub struct LabelReport {
    pub file: PathBuf,
    pub rows: usize,
    /// Prediction rows without a label (ensembled and written, not scored).
    pub unlabelled: usize,
    pub model_log_loss: Vec<f64>,
    pub equal_log_loss: f64,
    /// The chosen weights, no rules.
    pub log_loss: f64,
    /// The rows as written (requested rules applied).
    pub output_log_loss: f64,
    pub search: Option<Search>,
    pub cv: Option<CrossValidation>,
    /// Why no cross-validation was run, when it was wanted.
    pub cv_skipped: Option<String>,
    pub rules: Vec<RuleMeasure>,
}

/// What [`run`] did.
#[derive(Clone, Debug)]
pub struct EnsembleReport {
    pub out: PathBuf,
    pub rows: usize,
    pub mode: Mode,
    pub files: Vec<PathBuf>,
    /// Normalised, as used.
    pub weights: Vec<f64>,
    pub weights_from: WeightsFrom,
    /// Remarks for stderr (weight normalisation, renormalised input rows, …).
    pub notes: Vec<String>,
    /// Requested rules as applied to the output.
    pub applied: Vec<RuleCount>,
    pub labels: Option<LabelReport>,
}

/// Parse `--weights` (comma-separated numbers); values are checked by [`check_weights`].
pub fn parse_weights(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .enumerate()
        .map(|(i, raw)| {
            let raw = raw.trim();
            raw.parse::<f64>().map_err(|_| {
                Error::Usage(format!(
                    "--weights: entry {} `{raw}` is not a number (write e.g. --weights 0.6,0.4)",
                    i + 1
                ))
            })
        })
        .collect()
}

/// Check weights (one per file, finite, ≥ 0, not all zero) and divide them by their sum.
pub fn check_weights(w: &[f64], files: usize) -> Result<Vec<f64>> {
    if w.len() != files {
        return Err(Error::Usage(format!(
            "--weights has {} value(s) but there are {files} --pred file(s): give one weight per file",
            w.len()
        )));
    }
    for (i, &v) in w.iter().enumerate() {
        if !v.is_finite() || v < 0.0 {
            return Err(Error::Usage(format!(
                "--weights: entry {} is {v}; weights must be finite and ≥ 0",
                i + 1
            )));
        }
    }
    let sum: f64 = w.iter().sum();
    if sum <= 0.0 {
        return Err(Error::Usage(
            "--weights are all zero: at least one must be positive".into(),
        ));
    }
    Ok(w.iter().map(|v| v / sum).collect())
}

/// Clip a row at machine epsilon and renormalise it (what sklearn's log_loss does).
fn clip_row(p: &[f64; 3]) -> [f64; 3] {
    let c = p.map(|v| v.clamp(EPS, 1.0 - EPS));
    let s: f64 = c.iter().sum();
    c.map(|v| v / s)
}

/// Divide a row by its sum (for rows already known to be non-negative with a positive sum).
fn normalise_row(p: [f64; 3]) -> [f64; 3] {
    let s: f64 = p.iter().sum();
    p.map(|v| v / s)
}

/// One ensembled row: `models[m]` is file m's row, `w` normalised weights.
fn combine_row(mode: Mode, w: &[f64], rows: impl Iterator<Item = [f64; 3]>) -> [f64; 3] {
    match mode {
        Mode::Prob => {
            let mut q = [0f64; 3];
            for (wm, p) in w.iter().zip(rows) {
                for k in 0..3 {
                    q[k] += wm * p[k];
                }
            }
            normalise_row(q)
        }
        Mode::Logit => {
            let mut z = [0f64; 3];
            for (wm, p) in w.iter().zip(rows) {
                let c = clip_row(&p);
                for k in 0..3 {
                    z[k] += wm * c[k].ln();
                }
            }
            softmax(z)
        }
    }
}

fn softmax(z: [f64; 3]) -> [f64; 3] {
    let m = z[0].max(z[1]).max(z[2]);
    normalise_row(z.map(|v| (v - m).exp()))
}

/// The ensemble of `models` (each a list of rows in the same order) with weights `w` (divided
/// by their sum here). Every output row sums to 1.
pub fn combine(mode: Mode, w: &[f64], models: &[Vec<[f64; 3]>]) -> Vec<[f64; 3]> {
    let sum: f64 = w.iter().sum();
    let w: Vec<f64> = w.iter().map(|v| v / sum).collect();
    let n = models.first().map_or(0, Vec::len);
    (0..n)
        .map(|i| combine_row(mode, &w, models.iter().map(|m| m[i])))
        .collect()
}

/// The search's objective: the labelled rows' log loss as a function of the weights, with
/// exact gradient and Hessian.
struct Objective<'a> {
    mode: Mode,
    m: usize,
    /// Row-major [row][model][class]: clipped probabilities (prob) or their logs (logit).
    x: Vec<f64>,
    y: &'a [[f64; 3]],
}

impl<'a> Objective<'a> {
    fn new(mode: Mode, models: &[Vec<[f64; 3]>], labels: &'a [[f64; 3]]) -> Self {
        let m = models.len();
        let mut x = Vec::with_capacity(labels.len() * m * 3);
        for i in 0..labels.len() {
            for model in models {
                let c = clip_row(&model[i]);
                match mode {
                    Mode::Prob => x.extend(c),
                    Mode::Logit => x.extend(c.map(f64::ln)),
                }
            }
        }
        Objective {
            mode,
            m,
            x,
            y: labels,
        }
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.x[i * self.m * 3..(i + 1) * self.m * 3]
    }

    /// The mixture row: Σ_m w_m x_m (probabilities or logits).
    fn mix(&self, xi: &[f64], w: &[f64]) -> [f64; 3] {
        let mut q = [0f64; 3];
        for (wm, xm) in w.iter().zip(xi.chunks_exact(3)) {
            for k in 0..3 {
                q[k] += wm * xm[k];
            }
        }
        q
    }

    fn loss(&self, w: &[f64]) -> f64 {
        let mut total = 0.0;
        for (i, y) in self.y.iter().enumerate() {
            let q = self.mix(self.row(i), w);
            total += match self.mode {
                Mode::Prob => -(0..3)
                    .filter(|&k| y[k] != 0.0)
                    .map(|k| y[k] * q[k].max(f64::MIN_POSITIVE).ln())
                    .sum::<f64>(),
                Mode::Logit => {
                    let mx = q[0].max(q[1]).max(q[2]);
                    let lse = mx + q.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
                    lse - (0..3).map(|k| y[k] * q[k]).sum::<f64>()
                }
            };
        }
        total / self.y.len() as f64
    }

    /// Loss, gradient and Hessian (row-major m×m).
    fn derivatives(&self, w: &[f64]) -> (f64, Vec<f64>, Vec<f64>) {
        let m = self.m;
        let mut g = vec![0f64; m];
        let mut h = vec![0f64; m * m];
        let mut total = 0.0;
        for (i, y) in self.y.iter().enumerate() {
            let xi = self.row(i);
            let q = self.mix(xi, w);
            match self.mode {
                Mode::Prob => {
                    for k in 0..3 {
                        if y[k] == 0.0 {
                            continue;
                        }
                        let qk = q[k].max(f64::MIN_POSITIVE);
                        total -= y[k] * qk.ln();
                        let a = y[k] / qk;
                        let b = a / qk;
                        for r in 0..m {
                            let xr = xi[r * 3 + k];
                            g[r] -= a * xr;
                            let bx = b * xr;
                            for c in 0..=r {
                                h[r * m + c] += bx * xi[c * 3 + k];
                            }
                        }
                    }
                }
                Mode::Logit => {
                    let s = softmax(q);
                    let mx = q[0].max(q[1]).max(q[2]);
                    let lse = mx + q.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
                    total += lse - (0..3).map(|k| y[k] * q[k]).sum::<f64>();
                    // E_s[x_m] for each model.
                    let mean: Vec<f64> = (0..m)
                        .map(|r| (0..3).map(|k| s[k] * xi[r * 3 + k]).sum())
                        .collect();
                    for r in 0..m {
                        for k in 0..3 {
                            g[r] += (s[k] - y[k]) * xi[r * 3 + k];
                        }
                        for c in 0..=r {
                            let exx: f64 =
                                (0..3).map(|k| s[k] * xi[r * 3 + k] * xi[c * 3 + k]).sum();
                            h[r * m + c] += exx - mean[r] * mean[c];
                        }
                    }
                }
            }
        }
        let n = self.y.len() as f64;
        for r in 0..m {
            g[r] /= n;
            for c in 0..=r {
                let v = h[r * m + c] / n;
                h[r * m + c] = v;
                h[c * m + r] = v;
            }
        }
        (total / n, g, h)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Frank–Wolfe gap of a gradient at a point of the simplex, and the best vertex.
fn fw_gap(g: &[f64], w: &[f64]) -> (f64, usize) {
    let (best, gmin) =
        g.iter()
            .copied()
            .enumerate()
            .fold(
                (0, f64::INFINITY),
                |(bi, bv), (i, v)| if v < bv { (i, v) } else { (bi, bv) },
            );
    ((dot(g, w) - gmin).max(0.0), best)
}

/// Solve the square system `k·x = b` (row-major, n×n) by Gaussian elimination with partial
/// pivoting; `None` when it is singular to working precision.
fn solve(mut k: Vec<f64>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    let scale = k
        .iter()
        .fold(0.0f64, |a, v| a.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    for col in 0..n {
        let piv =
            (col..n).max_by(|&i, &j| k[i * n + col].abs().total_cmp(&k[j * n + col].abs()))?;
        let pivot = k[piv * n + col].abs();
        if pivot.is_nan() || pivot <= 1e-300 + scale * 1e-18 {
            return None;
        }
        if piv != col {
            for c in 0..n {
                k.swap(piv * n + c, col * n + c);
            }
            b.swap(piv, col);
        }
        for r in col + 1..n {
            let f = k[r * n + col] / k[col * n + col];
            if f != 0.0 {
                for c in col..n {
                    k[r * n + c] -= f * k[col * n + c];
                }
                b[r] -= f * b[col];
            }
        }
    }
    let mut x = vec![0f64; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|c| k[r * n + c] * x[c]).sum();
        x[r] = (b[r] - s) / k[r * n + r];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// Minimise `½ vᵀAv + cᵀv` over the simplex `{v ≥ 0, Σ v = 1}` for a symmetric positive
/// definite `A` (row-major m×m), from the feasible point `v0`: the primal active-set method
/// (Nocedal & Wright, Numerical Optimization, Algorithm 16.3). Each iteration solves the
/// equality-constrained problem on the free coordinates exactly (its KKT system), then either
/// steps to the first bound it meets (fixing that coordinate at 0) or, at the subproblem's
/// minimum, frees the fixed coordinate with the most negative multiplier; it ends when no
/// multiplier is negative, which is the exact minimum.
fn qp_simplex(a: &[f64], c: &[f64], v0: &[f64]) -> Vec<f64> {
    let m = v0.len();
    let mut v = v0.to_vec();
    let mut free: Vec<bool> = v.iter().map(|&x| x > 0.0).collect();
    for _ in 0..50 + 10 * m {
        let fidx: Vec<usize> = (0..m).filter(|&i| free[i]).collect();
        // Gradient of the quadratic at v.
        let r: Vec<f64> = (0..m)
            .map(|i| c[i] + (0..m).map(|j| a[i * m + j] * v[j]).sum::<f64>())
            .collect();
        let rscale = 1.0 + r.iter().fold(0.0f64, |x, y| x.max(y.abs()));
        // KKT on the free set F: A_FF·p_F + λ·1 = −r_F, 1ᵀ·p_F = 0.
        let k = fidx.len();
        let mut kkt = vec![0f64; (k + 1) * (k + 1)];
        let mut rhs = vec![0f64; k + 1];
        for (ri, &i) in fidx.iter().enumerate() {
            for (ci, &j) in fidx.iter().enumerate() {
                kkt[ri * (k + 1) + ci] = a[i * m + j];
            }
            kkt[ri * (k + 1) + k] = 1.0;
            kkt[k * (k + 1) + ri] = 1.0;
            rhs[ri] = -r[i];
        }
        let Some(sol) = solve(kkt, rhs) else {
            break;
        };
        let lambda = sol[k];
        let mut p = vec![0f64; m];
        for (ri, &i) in fidx.iter().enumerate() {
            p[i] = sol[ri];
        }
        if p.iter().all(|x| x.abs() <= 1e-15) {
            // At the minimum on this face: the bound multipliers are μ_i = r_i + λ.
            let worst = (0..m)
                .filter(|&i| !free[i])
                .map(|i| (i, r[i] + lambda))
                .min_by(|x, y| x.1.total_cmp(&y.1));
            match worst {
                Some((i, mu)) if mu < -1e-14 * rscale => free[i] = true,
                _ => break,
            }
            continue;
        }
        // Step along p, stopping at the first coordinate that reaches 0.
        let mut alpha = 1.0;
        let mut blocking = None;
        for &i in &fidx {
            if p[i] < 0.0 {
                let s = -v[i] / p[i];
                if s < alpha {
                    alpha = s;
                    blocking = Some(i);
                }
            }
        }
        for i in 0..m {
            v[i] = (v[i] + alpha * p[i]).max(0.0);
        }
        if let Some(b) = blocking {
            v[b] = 0.0;
            free[b] = false;
        }
    }
    let s: f64 = v.iter().sum();
    v.iter().map(|x| x / s).collect()
}

/// Search the weights on the simplex that minimise the log loss of `models` (rows aligned
/// with `labels`) in `mode`. Deterministic; see the module docs for the method.
pub fn search_weights(mode: Mode, models: &[Vec<[f64; 3]>], labels: &[[f64; 3]]) -> Search {
    let m = models.len();
    let obj = Objective::new(mode, models, labels);
    let mut w = vec![1.0 / m as f64; m];
    if m <= 1 || labels.is_empty() {
        let log_loss = if labels.is_empty() {
            f64::NAN
        } else {
            obj.loss(&w)
        };
        return Search {
            weights: w,
            log_loss,
            steps: 0,
            gap: 0.0,
            converged: true,
        };
    }
    let mut steps = 0;
    let (mut f, mut g, mut h) = obj.derivatives(&w);
    let mut gap = fw_gap(&g, &w).0;
    while gap > SEARCH_TOL && steps < MAX_NEWTON_STEPS {
        steps += 1;
        // Newton direction: the quadratic model minimised over the simplex (a tiny ridge keeps
        // it well posed when two files are (nearly) the same).
        let ridge = 1e-12 * (1.0 + (0..m).map(|r| h[r * m + r]).fold(0.0, f64::max));
        for r in 0..m {
            h[r * m + r] += ridge;
        }
        // In v: ½ vᵀHv + (g − Hw)ᵀv, the same quadratic up to a constant.
        let lin: Vec<f64> = (0..m)
            .map(|r| g[r] - (0..m).map(|c| h[r * m + c] * w[c]).sum::<f64>())
            .collect();
        let v = qp_simplex(&h, &lin, &w);
        let newton: Vec<f64> = v.iter().zip(&w).map(|(a, b)| a - b).collect();
        let (_, best) = fw_gap(&g, &w);
        let frank_wolfe: Vec<f64> = (0..m)
            .map(|r| if r == best { 1.0 } else { 0.0 } - w[r])
            .collect();
        let mut moved = false;
        for d in [newton, frank_wolfe] {
            let slope = dot(&g, &d);
            if slope.is_nan() || slope >= 0.0 {
                continue;
            }
            let mut t = 1.0;
            for _ in 0..60 {
                // A convex combination of w and a simplex point: stays on the simplex.
                let wn: Vec<f64> = w
                    .iter()
                    .zip(&d)
                    .map(|(a, b)| (a + t * b).max(0.0))
                    .collect();
                let s: f64 = wn.iter().sum();
                let wn: Vec<f64> = wn.iter().map(|v| v / s).collect();
                let fnew = obj.loss(&wn);
                // Armijo; or, for a full step whose predicted decrease is below what the loss
                // can resolve in f64, a smaller optimality gap.
                let accept = fnew <= f + 1e-4 * t * slope
                    || (t == 1.0
                        && -slope <= 1e-13 * f.abs().max(1.0)
                        && fnew <= f + 4.0 * EPS * f.abs().max(1.0)
                        && fw_gap(&obj.derivatives(&wn).1, &wn).0 < gap);
                if accept {
                    w = wn;
                    moved = true;
                    break;
                }
                t *= 0.5;
            }
            if moved {
                break;
            }
        }
        if !moved {
            // No step lowers the loss any more at double precision.
            break;
        }
        (f, g, h) = obj.derivatives(&w);
        gap = fw_gap(&g, &w).0;
    }
    Search {
        weights: w,
        log_loss: f,
        steps,
        gap,
        converged: gap <= SEARCH_TOL,
    }
}

/// K-fold cross-validated log loss of the weight search: labelled row `i` is in fold
/// `i mod folds`; each fold is scored with the weights searched on the other folds. `None`
/// when there are fewer rows than folds or fewer than 2 folds.
pub fn cross_validate(
    mode: Mode,
    models: &[Vec<[f64; 3]>],
    labels: &[[f64; 3]],
    folds: usize,
) -> Option<CrossValidation> {
    let n = labels.len();
    if folds < 2 || n < folds {
        return None;
    }
    let mut oof = vec![[0f64; 3]; n];
    let mut fold_weights = Vec::with_capacity(folds);
    for f in 0..folds {
        let train: Vec<usize> = (0..n).filter(|i| i % folds != f).collect();
        let sub = |rows: &[usize]| -> Vec<Vec<[f64; 3]>> {
            models
                .iter()
                .map(|m| rows.iter().map(|&i| m[i]).collect())
                .collect()
        };
        let y: Vec<[f64; 3]> = train.iter().map(|&i| labels[i]).collect();
        let s = search_weights(mode, &sub(&train), &y);
        let test: Vec<usize> = (f..n).step_by(folds).collect();
        for (i, p) in test.iter().zip(combine(mode, &s.weights, &sub(&test))) {
            oof[*i] = p;
        }
        fold_weights.push(s.weights);
    }
    Some(CrossValidation {
        folds,
        log_loss: metrics::log_loss(labels, &oof),
        fold_weights,
    })
}

/// Apply `rules` (in order) to `probs`, whose rows have texts `rows`; returns the new rows and
/// per-rule counts.
pub fn apply_rules(
    rules: &[Rule],
    rows: &[&ArenaRow],
    probs: &[[f64; 3]],
) -> (Vec<[f64; 3]>, Vec<RuleCount>) {
    let mut out = probs.to_vec();
    let mut counts = Vec::new();
    for &rule in rules {
        let mut c = RuleCount {
            rule,
            matched: 0,
            changed: 0,
        };
        for (row, p) in rows.iter().zip(out.iter_mut()) {
            if rule.matches(row) {
                c.matched += 1;
                let q = rule.apply(row, *p);
                if q != *p {
                    c.changed += 1;
                    *p = q;
                }
            }
        }
        counts.push(c);
    }
    (out, counts)
}

/// Read a prediction file and check/renormalise its rows.
fn read_preds(path: &Path, notes: &mut Vec<String>) -> Result<Vec<(String, [f64; 3])>> {
    let mut rows = predictions::read(path)?;
    if rows.is_empty() {
        return Err(Error::data(path, None, None, "no prediction rows"));
    }
    let mut off = 0usize;
    let mut worst = (0usize, 1.0f64);
    for (i, (id, p)) in rows.iter_mut().enumerate() {
        let s: f64 = p.iter().sum();
        let dev = (s - 1.0).abs();
        if dev.is_nan() || dev > ROW_SUM_REFUSE {
            return Err(Error::data(
                path,
                Some(i + 1),
                Some("winner_model_a"),
                format!(
                    "id {id}: the three probabilities sum to {s}, not 1 (are these probabilities?)"
                ),
            ));
        }
        if dev > ROW_SUM_NOTE {
            off += 1;
            if dev > (worst.1 - 1.0).abs() {
                worst = (i + 1, s);
            }
        }
        *p = normalise_row(*p);
    }
    if off > 0 {
        notes.push(format!(
            "{}: {off} row(s) do not sum to 1 within {ROW_SUM_NOTE:e} (worst: row {}, sum {}); divided by their sums",
            path.display(),
            worst.0,
            worst.1
        ));
    }
    Ok(rows)
}

fn show_ids<'a>(ids: impl Iterator<Item = &'a str>, n: usize) -> String {
    let v: Vec<String> = ids.take(n).map(|s| format!("`{s}`")).collect();
    v.join(", ")
}

/// Run `engine ensemble`: read, combine, measure, write `out` atomically.
pub fn run(opts: &EnsembleOptions) -> Result<EnsembleReport> {
    // Usage checks first, before any file is read.
    if opts.preds.is_empty() {
        return Err(Error::Usage("give at least one --pred file".into()));
    }
    let given = opts
        .weights
        .as_deref()
        .map(|w| check_weights(w, opts.preds.len()))
        .transpose()?;
    let mut rules: Vec<Rule> = opts.rules.clone();
    rules.sort();
    rules.dedup();
    if !rules.is_empty() && opts.data.is_none() && opts.labels.is_none() {
        let names: Vec<&str> = rules.iter().map(|r| r.name()).collect();
        return Err(Error::Usage(format!(
            "--rule {} needs the response texts: give --data test.csv (the arena CSV the predictions are for) or --labels",
            names.join(",")
        )));
    }
    if opts.folds == 1 {
        return Err(Error::Usage(
            "--folds 1 cannot cross-validate: use 0 (skip) or at least 2".into(),
        ));
    }
    let mut notes = Vec::new();
    if opts.data.is_some() && rules.is_empty() {
        notes.push("--data is only read for --rule; ignored".into());
    }
    if let (Some(raw), Some(w)) = (&opts.weights, &given) {
        let sum: f64 = raw.iter().sum();
        if (sum - 1.0).abs() > 1e-9 {
            notes.push(format!(
                "weights {} sum to {sum}; normalised to {}",
                join_f64(raw, None),
                join_f64(w, Some(6))
            ));
        }
    }

    // Predictions, aligned on the first file's ids.
    let first_path = &opts.preds[0];
    let first = read_preds(first_path, &mut notes)?;
    let ids: Vec<String> = first.iter().map(|(id, _)| id.clone()).collect();
    let index: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut models: Vec<Vec<[f64; 3]>> = vec![first.iter().map(|(_, p)| *p).collect()];
    for path in &opts.preds[1..] {
        let rows = read_preds(path, &mut notes)?;
        let mut aligned: Vec<Option<[f64; 3]>> = vec![None; ids.len()];
        let mut extra: Vec<(usize, &str)> = Vec::new();
        for (r, (id, p)) in rows.iter().enumerate() {
            match index.get(id.as_str()) {
                Some(&i) => aligned[i] = Some(*p),
                None => extra.push((r + 1, id.as_str())),
            }
        }
        let missing: Vec<usize> = (0..ids.len()).filter(|&i| aligned[i].is_none()).collect();
        if !missing.is_empty() || !extra.is_empty() {
            let mut msg = format!(
                "the ids differ from those of {} (the first --pred; every file needs the same ids):",
                first_path.display()
            );
            if !missing.is_empty() {
                let eg: Vec<String> = missing
                    .iter()
                    .take(3)
                    .map(|&i| format!("`{}` (its row {})", ids[i], i + 1))
                    .collect();
                let _ = write!(
                    msg,
                    " {} of its id(s) are missing here, e.g. {}",
                    missing.len(),
                    eg.join(", ")
                );
            }
            if !extra.is_empty() {
                let eg: Vec<String> = extra
                    .iter()
                    .take(3)
                    .map(|(r, id)| format!("`{id}` (row {r})"))
                    .collect();
                let _ = write!(
                    msg,
                    "{} {} id(s) here are not in it, e.g. {}",
                    if missing.is_empty() { "" } else { ";" },
                    extra.len(),
                    eg.join(", ")
                );
            }
            return Err(Error::data(path, None, Some("id"), msg));
        }
        models.push(aligned.into_iter().flatten().collect());
    }
    let n = ids.len();
    let m = models.len();

    // Labelled rows.
    let labelled = match &opts.labels {
        Some(path) => {
            let data = read_arena_csv(path, Labels::Required)?;
            if data.rows.is_empty() {
                return Err(Error::data(path, None, None, "no labelled rows"));
            }
            let missing: Vec<&str> = data
                .rows
                .iter()
                .map(|r| r.id.as_str())
                .filter(|id| !index.contains_key(id))
                .collect();
            if !missing.is_empty() {
                return Err(Error::data(
                    path,
                    None,
                    Some("id"),
                    format!(
                        "{} labelled id(s) have no prediction in {} (e.g. {}); every labelled row must be predicted",
                        missing.len(),
                        first_path.display(),
                        show_ids(missing.iter().copied(), 5)
                    ),
                ));
            }
            Some(data)
        }
        None => None,
    };
    let label_rows: Vec<usize> = labelled
        .as_ref()
        .map(|d| d.rows.iter().map(|r| index[r.id.as_str()]).collect())
        .unwrap_or_default();
    let y: Vec<[f64; 3]> = labelled
        .as_ref()
        .map(|d| d.rows.iter().filter_map(|r| r.label).collect())
        .unwrap_or_default();
    let sub_models: Vec<Vec<[f64; 3]>> = models
        .iter()
        .map(|mo| label_rows.iter().map(|&i| mo[i]).collect())
        .collect();

    // Texts for the rules applied to the output.
    let text_data = match (&opts.data, rules.is_empty()) {
        (Some(path), false) => Some(read_arena_csv(path, Labels::IfPresent)?),
        _ => None,
    };
    let output_texts: Option<Vec<&ArenaRow>> = if rules.is_empty() {
        None
    } else {
        let src = match (&text_data, &labelled) {
            (Some(d), _) | (None, Some(d)) => d,
            (None, None) => {
                return Err(Error::Usage(
                    "--rule needs the response texts: give --data or --labels".into(),
                ));
            }
        };
        let path = src.path.as_path();
        let by_id: HashMap<&str, &ArenaRow> = src.rows.iter().map(|r| (r.id.as_str(), r)).collect();
        let missing: Vec<&str> = ids
            .iter()
            .map(String::as_str)
            .filter(|id| !by_id.contains_key(id))
            .collect();
        if !missing.is_empty() {
            let hint = if text_data.is_none() {
                "; give --data with the texts of every prediction row"
            } else {
                ""
            };
            return Err(Error::data(
                path,
                None,
                Some("id"),
                format!(
                    "--rule needs the texts of every prediction row, but {} id(s) of {} are not here (e.g. {}){hint}",
                    missing.len(),
                    first_path.display(),
                    show_ids(missing.iter().copied(), 5)
                ),
            ));
        }
        if text_data.is_some() && src.rows.len() != n {
            let extra: Vec<&str> = src
                .rows
                .iter()
                .map(|r| r.id.as_str())
                .filter(|id| !index.contains_key(id))
                .collect();
            return Err(Error::data(
                path,
                None,
                Some("id"),
                format!(
                    "{} id(s) here have no prediction in {} (e.g. {}); --data must hold exactly the predicted ids",
                    extra.len(),
                    first_path.display(),
                    show_ids(extra.iter().copied(), 5)
                ),
            ));
        }
        Some(ids.iter().map(|id| by_id[id.as_str()]).collect())
    };

    // Weights.
    let equal = vec![1.0 / m as f64; m];
    let (weights, weights_from, search) = match (given, &labelled) {
        (Some(w), _) => (w, WeightsFrom::Given, None),
        (None, Some(_)) => {
            let s = search_weights(opts.mode, &sub_models, &y);
            if !s.converged {
                notes.push(format!(
                    "the weight search stopped after {} Newton steps at optimality gap {:.1e} (tolerance {SEARCH_TOL:.0e})",
                    s.steps, s.gap
                ));
            }
            (s.weights.clone(), WeightsFrom::Search, Some(s))
        }
        (None, None) => (equal.clone(), WeightsFrom::Equal, None),
    };
    let ensemble = combine(opts.mode, &weights, &models);

    // Requested rules on the output.
    let (output, applied) = match &output_texts {
        Some(texts) => apply_rules(&rules, texts, &ensemble),
        None => (ensemble.clone(), Vec::new()),
    };
    for (i, p) in output.iter().enumerate() {
        let s: f64 = p.iter().sum();
        if !p.iter().all(|v| (0.0..=1.0).contains(v)) || (s - 1.0).abs() > 1e-9 {
            return Err(Error::Msg(format!(
                "internal error: ensembled row {} (id {}) is {p:?}",
                i + 1,
                ids[i]
            )));
        }
    }

    // Measurements on the labelled rows.
    let label_report = match &labelled {
        Some(data) => {
            let model_log_loss = sub_models
                .iter()
                .map(|p| metrics::log_loss(&y, p))
                .collect();
            let equal_log_loss = metrics::log_loss(&y, &combine(opts.mode, &equal, &sub_models));
            let base: Vec<[f64; 3]> = label_rows.iter().map(|&i| ensemble[i]).collect();
            let log_loss = metrics::log_loss(&y, &base);
            let written: Vec<[f64; 3]> = label_rows.iter().map(|&i| output[i]).collect();
            let texts: Vec<&ArenaRow> = data.rows.iter().collect();
            let rule_measures = Rule::ALL
                .iter()
                .map(|&rule| {
                    let (with, counts) = apply_rules(&[rule], &texts, &base);
                    RuleMeasure {
                        count: counts[0],
                        log_loss_without: log_loss,
                        log_loss_with: metrics::log_loss(&y, &with),
                        requested: rules.contains(&rule),
                    }
                })
                .collect();
            let (cv, cv_skipped) = if search.is_some() && opts.folds >= 2 {
                match cross_validate(opts.mode, &sub_models, &y, opts.folds) {
                    Some(cv) => (Some(cv), None),
                    None => (
                        None,
                        Some(format!(
                            "{} labelled row(s) are too few for {}-fold cross-validation",
                            y.len(),
                            opts.folds
                        )),
                    ),
                }
            } else {
                (None, None)
            };
            Some(LabelReport {
                file: data.path.clone(),
                rows: y.len(),
                unlabelled: n - y.len(),
                model_log_loss,
                equal_log_loss,
                log_loss,
                output_log_loss: metrics::log_loss(&y, &written),
                search,
                cv,
                cv_skipped,
                rules: rule_measures,
            })
        }
        None => None,
    };

    predictions::write(&opts.out, &ids, &output)?;
    Ok(EnsembleReport {
        out: opts.out.clone(),
        rows: n,
        mode: opts.mode,
        files: opts.preds.clone(),
        weights,
        weights_from,
        notes,
        applied,
        labels: label_report,
    })
}

fn join_f64(v: &[f64], digits: Option<usize>) -> String {
    v.iter()
        .map(|x| match digits {
            Some(d) => format!("{x:.d$}"),
            None => format!("{x}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl EnsembleReport {
    /// The human-readable report (for stderr), one entry per line.
    pub fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self.notes.iter().map(|n| format!("note: {n}")).collect();
        let names: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
        out.push(format!(
            "ensemble of {} file(s), {} rows, mode {}, weights {} ({})",
            self.files.len(),
            self.rows,
            self.mode.name(),
            join_f64(&self.weights, Some(6)),
            match self.weights_from {
                WeightsFrom::Given => "given",
                WeightsFrom::Equal => "equal",
                WeightsFrom::Search => "searched",
            }
        ));
        if let Some(l) = &self.labels {
            let mut head = format!(
                "log loss on {} labelled rows of {}",
                l.rows,
                l.file.display()
            );
            if l.unlabelled > 0 {
                let _ = write!(
                    head,
                    " ({} prediction row(s) have no label: written, not scored)",
                    l.unlabelled
                );
            }
            out.push(head + ":");
            let chosen = match self.weights_from {
                WeightsFrom::Search => "searched weights",
                _ => "given weights",
            };
            let width = names
                .iter()
                .map(String::len)
                .chain([chosen.len(), "equal weights".len(), 24])
                .max()
                .unwrap_or(24);
            for (name, ll) in names.iter().zip(&l.model_log_loss) {
                out.push(format!("  {name:<width$}  {ll:.6}"));
            }
            out.push(format!(
                "  {:<width$}  {:.6}",
                "equal weights", l.equal_log_loss
            ));
            let mut line = format!(
                "  {chosen:<width$}  {:.6}  [{}]",
                l.log_loss,
                join_f64(&self.weights, Some(6))
            );
            if let Some(s) = &l.search {
                let _ = write!(
                    line,
                    " ({} Newton step(s), optimality gap {:.1e}{})",
                    s.steps,
                    s.gap,
                    if s.converged { "" } else { ", NOT converged" }
                );
            }
            out.push(line);
            if let Some(cv) = &l.cv {
                out.push(format!(
                    "  {:<width$}  {:.6}  ({:+.6} vs in-sample: the search's overfitting gap)",
                    format!("{}-fold CV of the search", cv.folds),
                    cv.log_loss,
                    cv.log_loss - l.log_loss
                ));
            }
            if let Some(why) = &l.cv_skipped {
                out.push(format!("  no cross-validation: {why}"));
            }
            for r in &l.rules {
                let verdict = if r.count.matched == 0 {
                    "no labelled row matches".to_string()
                } else if r.recommended() {
                    "recommended".to_string()
                } else {
                    "not recommended".to_string()
                };
                out.push(format!(
                    "rule {:<9} {} labelled row(s) match ({} changed): log loss {:.6} -> {:.6} ({:+.6}), {verdict}; {}",
                    r.count.rule.name(),
                    r.count.matched,
                    r.count.changed,
                    r.log_loss_without,
                    r.log_loss_with,
                    r.delta(),
                    if r.requested { "applied" } else { "not requested" }
                ));
            }
            if !self.applied.is_empty() {
                let names: Vec<&str> = self.applied.iter().map(|a| a.rule.name()).collect();
                out.push(format!(
                    "log loss of the written rows (rule {} applied): {:.6}",
                    names.join(", "),
                    l.output_log_loss
                ));
            }
        }
        for a in &self.applied {
            out.push(format!(
                "applied rule {} to the output: {} of {} row(s) match, {} changed",
                a.rule.name(),
                a.matched,
                self.rows,
                a.changed
            ));
        }
        out.push(format!("wrote {} ({} rows)", self.out.display(), self.rows));
        out
    }

    /// The machine-readable summary (one JSON object; see the module docs).
    pub fn json(&self) -> Value {
        let rules_applied: serde_json::Map<String, Value> = self
            .applied
            .iter()
            .map(|a| {
                (
                    a.rule.name().to_string(),
                    json!({"matched": a.matched, "changed": a.changed}),
                )
            })
            .collect();
        let labels = self.labels.as_ref().map(|l| {
            let rules: serde_json::Map<String, Value> = l
                .rules
                .iter()
                .map(|r| {
                    (
                        r.count.rule.name().to_string(),
                        json!({
                            "matched": r.count.matched,
                            "changed": r.count.changed,
                            "log_loss_without": r.log_loss_without,
                            "log_loss_with": r.log_loss_with,
                            "delta": r.delta(),
                            "recommended": r.recommended(),
                            "requested": r.requested,
                        }),
                    )
                })
                .collect();
            let search = l.search.as_ref().map(|s| {
                json!({
                    "steps": s.steps,
                    "optimality_gap": s.gap,
                    "converged": s.converged,
                    "cv_folds": l.cv.as_ref().map(|c| c.folds),
                    "cv_log_loss": l.cv.as_ref().map(|c| c.log_loss),
                    "cv_gap": l.cv.as_ref().map(|c| c.log_loss - l.log_loss),
                })
            });
            json!({
                "file": l.file.display().to_string(),
                "rows": l.rows,
                "unlabelled_prediction_rows": l.unlabelled,
                "model_log_loss": l.model_log_loss,
                "equal_weights_log_loss": l.equal_log_loss,
                "log_loss": l.log_loss,
                "output_log_loss": l.output_log_loss,
                "search": search,
                "rules": rules,
            })
        });
        json!({
            "out": self.out.display().to_string(),
            "rows": self.rows,
            "mode": self.mode.name(),
            "files": self.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "weights": self.weights,
            "weights_from": self.weights_from.name(),
            "rules_applied": rules_applied,
            "labels": labels,
        })
    }
}

/// `engine ensemble`: run, report on stderr, one JSON line on stdout.
pub fn run_cli(a: EnsembleArgs) -> Result<()> {
    let weights = a.weights.as_deref().map(parse_weights).transpose()?;
    let report = run(&EnsembleOptions {
        preds: a.preds,
        weights,
        mode: a.mode,
        out: a.out,
        labels: a.labels,
        data: a.data,
        rules: a.rules,
        folds: a.folds,
    })?;
    for line in report.lines() {
        eprintln!("{line}");
    }
    println!("{}", report.json());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_set_qp_is_exact() {
        // ½ vᵀAv + cᵀv on the 3-simplex, against a fine grid; interior, edge and vertex optima.
        let a = [2.0, 0.5, 0.1, 0.5, 1.0, 0.3, 0.1, 0.3, 3.0];
        for c in [
            [0.0, 0.0, 0.0],
            [-1.0, 0.5, 0.2],
            [5.0, -5.0, 0.0],
            [0.3, 0.2, -2.0],
        ] {
            let f = |v: &[f64]| -> f64 {
                let mut q = 0.0;
                for r in 0..3 {
                    q += c[r] * v[r];
                    for k in 0..3 {
                        q += 0.5 * v[r] * a[r * 3 + k] * v[k];
                    }
                }
                q
            };
            let v = qp_simplex(&a, &c, &[1.0 / 3.0; 3]);
            assert!((v.iter().sum::<f64>() - 1.0).abs() < 1e-15 && v.iter().all(|&x| x >= 0.0));
            let steps = 400;
            for i in 0..=steps {
                for j in 0..=steps - i {
                    let g = [i as f64, j as f64, (steps - i - j) as f64].map(|x| x / steps as f64);
                    assert!(f(&v) <= f(&g) + 1e-14, "c {c:?}: {v:?} loses to {g:?}");
                }
            }
            // Started from a vertex, the same answer.
            let v2 = qp_simplex(&a, &c, &[0.0, 1.0, 0.0]);
            assert!(
                (0..3).all(|k| (v[k] - v2[k]).abs() < 1e-12),
                "{v:?} vs {v2:?}"
            );
        }
    }

    #[test]
    fn derivatives_match_finite_differences() {
        let models = vec![
            vec![[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]],
            vec![[0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.25, 0.25, 0.5]],
            vec![[0.7, 0.1, 0.2], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]],
        ];
        let y = vec![[1.0, 0.0, 0.0], [0.0, 0.3, 0.7], [0.0, 1.0, 0.0]];
        for mode in [Mode::Prob, Mode::Logit] {
            let obj = Objective::new(mode, &models, &y);
            let w = [0.2, 0.5, 0.3];
            let (f, g, h) = obj.derivatives(&w);
            assert!((f - obj.loss(&w)).abs() < 1e-14);
            let ll = metrics::log_loss(&y, &combine(mode, &w, &models));
            assert!((f - ll).abs() < 1e-12, "{mode:?}: {f} vs {ll}");
            let step = 1e-6;
            for r in 0..3 {
                let mut wp = w;
                wp[r] += step;
                let mut wm = w;
                wm[r] -= step;
                let fd = (obj.loss(&wp) - obj.loss(&wm)) / (2.0 * step);
                assert!(
                    (fd - g[r]).abs() < 1e-7,
                    "{mode:?} g[{r}]: {fd} vs {}",
                    g[r]
                );
                let (_, gp, _) = obj.derivatives(&wp);
                let (_, gm, _) = obj.derivatives(&wm);
                for c in 0..3 {
                    let fd = (gp[c] - gm[c]) / (2.0 * step);
                    assert!((fd - h[c * 3 + r]).abs() < 1e-6, "{mode:?} h[{c},{r}]");
                }
            }
        }
    }
}
