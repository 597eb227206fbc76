//! The competition metric and friends.

/// Multi-class log loss as `sklearn.metrics.log_loss`: predictions clipped to
/// `[eps, 1 − eps]` (eps of f64), each row renormalised to sum to 1, then the mean over rows of
/// `−Σ_k y_k · ln p_k` (with `0 · ln p = 0`; soft labels give the cross entropy).
pub fn log_loss(labels: &[[f64; 3]], preds: &[[f64; 3]]) -> f64 {
    assert_eq!(
        labels.len(),
        preds.len(),
        "log_loss: one prediction per label"
    );
    if labels.is_empty() {
        return f64::NAN;
    }
    let eps = f64::EPSILON;
    let total: f64 = labels
        .iter()
        .zip(preds)
        .map(|(y, p)| {
            let c = p.map(|v| v.clamp(eps, 1.0 - eps));
            let s: f64 = c.iter().sum();
            -(0..3)
                .filter(|&k| y[k] != 0.0)
                .map(|k| y[k] * (c[k] / s).ln())
                .sum::<f64>()
        })
        .sum();
    total / labels.len() as f64
}

/// Fraction of rows whose most probable class is the label's most probable class.
pub fn accuracy(labels: &[[f64; 3]], preds: &[[f64; 3]]) -> f64 {
    let argmax = |v: &[f64; 3]| (0..3).fold(0, |b, k| if v[k] > v[b] { k } else { b });
    let hits = labels
        .iter()
        .zip(preds)
        .filter(|(y, p)| argmax(y) == argmax(p))
        .count();
    hits as f64 / labels.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_sklearn_values() {
        // sklearn.metrics.log_loss([0, 1, 2], [[.7,.2,.1],[.1,.8,.1],[.3,.3,.4]]) = 0.49447...
        let y = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let p = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]];
        let want = -((0.7f64).ln() + (0.8f64).ln() + (0.4f64).ln()) / 3.0;
        assert!((log_loss(&y, &p) - want).abs() < 1e-12);
        assert_eq!(accuracy(&y, &p), 1.0);
        // A zero probability is clipped, not infinite; a uniform guess costs ln 3.
        assert!(log_loss(&[[1.0, 0.0, 0.0]], &[[0.0, 0.5, 0.5]]).is_finite());
        let u = [[1.0 / 3.0; 3]];
        assert!((log_loss(&[[0.0, 0.0, 1.0]], &u) - 3f64.ln()).abs() < 1e-12);
    }
}
