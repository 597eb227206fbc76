//! Causal self-attention over a packed batch, with grouped-query heads, optional logit
//! soft-capping and an optional sliding window.
//!
//! For query `i` and key `j` of the same row: `s = (q_i · k_j) · scale`; with a cap,
//! `s = cap · tanh(s / cap)`; keys with `j > i`, or `j ≤ i − window` on sliding layers, are
//! masked; `p = softmax(s)` over the visible keys; `out_i = Σ_j p_j v_j`. Query head `h` reads
//! key/value head `h / (n_heads / n_kv_heads)`. Rows never see each other.

mod cpu;
mod cuda;

use crate::bail;
use crate::error::Result;
use crate::ops::SeqLayout;
use crate::tensor::{Device, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q·k` (Gemma-2: `query_pre_attn_scalar^-0.5`; Llama: `head_dim^-0.5`).
    pub scale: f32,
    /// `cap · tanh(s / cap)` on the scaled logits.
    pub softcap: Option<f32>,
    /// A query at `i` sees keys `j` with `i − window < j ≤ i`.
    pub window: Option<usize>,
}

/// `q` is `[tokens, n_heads · head_dim]`, `k` and `v` `[tokens, n_kv_heads · head_dim]`; the
/// result has `q`'s shape.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &SeqLayout,
    p: &AttentionParams,
) -> Result<Tensor> {
    let t = layout.total_tokens();
    if p.n_kv_heads == 0 || !p.n_heads.is_multiple_of(p.n_kv_heads) {
        bail!(
            Shape,
            "attention: {} query heads cannot share {} KV heads",
            p.n_heads,
            p.n_kv_heads
        );
    }
    if q.shape() != [t, p.n_heads * p.head_dim]
        || k.shape() != [t, p.n_kv_heads * p.head_dim]
        || v.shape() != k.shape()
    {
        bail!(
            Shape,
            "attention: q {:?}, k {:?}, v {:?} do not fit {t} tokens of {}/{} heads × {}",
            q.shape(),
            k.shape(),
            v.shape(),
            p.n_heads,
            p.n_kv_heads,
            p.head_dim
        );
    }
    if p.window == Some(0) {
        bail!(Shape, "attention: a sliding window of 0 sees nothing");
    }
    match q.device() {
        Device::Cuda(_) => cuda::attention(q, k, v, layout, p),
        Device::Cpu => {
            let y = cpu::attention(
                q.as_f32_slice()?,
                k.as_f32_slice()?,
                v.as_f32_slice()?,
                layout,
                p,
            );
            Tensor::from_f32(y, q.shape())
        }
    }
}

/// (dq, dk, dv) of [`attention`] for the upstream gradient `dout` (`q`'s shape).
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    layout: &SeqLayout,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor, Tensor)> {
    if dout.shape() != q.shape() || k.shape() != v.shape() {
        bail!(
            Shape,
            "attention backward: q {:?}, k {:?}, v {:?}, dout {:?}",
            q.shape(),
            k.shape(),
            v.shape(),
            dout.shape()
        );
    }
    match q.device() {
        Device::Cuda(_) => bail!(
            Cuda,
            "the CUDA backward kernels are not part of this build: train on the CPU"
        ),
        Device::Cpu => {
            let (dq, dk, dv) = cpu::attention_backward(
                q.as_f32_slice()?,
                k.as_f32_slice()?,
                v.as_f32_slice()?,
                dout.as_f32_slice()?,
                layout,
                p,
            );
            Ok((
                Tensor::from_f32(dq, q.shape())?,
                Tensor::from_f32(dk, k.shape())?,
                Tensor::from_f32(dv, v.shape())?,
            ))
        }
    }
}
