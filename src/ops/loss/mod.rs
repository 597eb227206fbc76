//! The training loss: softmax cross-entropy of the class logits against target distributions
//! (one-hot or soft labels), with optional label smoothing, averaged over rows — as
//! `torch.nn.functional.cross_entropy(logits, probs, label_smoothing=ε)`:
//! `y' = (1 − ε)·y + ε/C`, `loss = mean_rows(−Σ_c y'_c · log softmax(z)_c)`,
//! `dz = (softmax(z) − y') / rows`.

mod cpu;

use crate::bail;
use crate::error::Result;
use crate::tensor::Tensor;

/// (mean loss, d loss / d logits) for `[rows, classes]` f32 logits and targets.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &[[f64; 3]],
    label_smoothing: f64,
) -> Result<(f64, Tensor)> {
    let (rows, c) = logits.dims2()?;
    if c != 3 || targets.len() != rows || rows == 0 {
        bail!(
            Shape,
            "cross_entropy: logits {:?} for {} targets",
            logits.shape(),
            targets.len()
        );
    }
    if !(0.0..1.0).contains(&label_smoothing) {
        bail!(Usage, "label smoothing {label_smoothing} must be in [0, 1)");
    }
    // Three numbers per row: on a GPU the logits come to the host and the gradient goes back.
    let (loss, grad) = cpu::cross_entropy(&logits.to_f32_vec()?, targets, label_smoothing);
    Ok((
        loss,
        Tensor::from_f32(grad, &[rows, c])?.to_device(logits.device())?,
    ))
}
