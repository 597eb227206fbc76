//! CPU twin of the loss (f64 inside: three classes, nothing to gain from f32).

pub(super) fn cross_entropy(logits: &[f32], targets: &[[f64; 3]], eps: f64) -> (f64, Vec<f32>) {
    let rows = targets.len();
    let mut grad = vec![0f32; rows * 3];
    let mut total = 0f64;
    for (r, y) in targets.iter().enumerate() {
        let z: Vec<f64> = logits[r * 3..r * 3 + 3].iter().map(|&v| v as f64).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        for c in 0..3 {
            let target = (1.0 - eps) * y[c] + eps / 3.0;
            let logp = z[c] - lse;
            total -= target * logp;
            grad[r * 3 + c] = ((logp.exp() - target) / rows as f64) as f32;
        }
    }
    (total / rows as f64, grad)
}
