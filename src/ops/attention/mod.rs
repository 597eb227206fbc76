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
    check_args(q, k, v, layout, p)?;
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

/// The shape checks of [`attention`].
fn check_args(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &SeqLayout,
    p: &AttentionParams,
) -> Result<()> {
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
    Ok(())
}

/// What the forward leaves for [`attention_backward_saved`].
#[derive(Clone, Debug)]
pub struct AttentionSaved {
    /// The forward's output (`q`'s shape and dtype).
    pub out: Tensor,
    /// On the GPU, the log-sum-exp of every (token, query head)'s logits, `[tokens, n_heads]`
    /// f32 (natural log): the backward recomputes the probabilities from it without a second
    /// forward. `None` on the CPU, whose backward recomputes everything.
    pub lse: Option<Tensor>,
}

/// [`attention`], keeping what [`attention_backward_saved`] reuses: the output and, on the GPU,
/// the log-sum-exp (written by the same forward kernel, at no extra cost worth measuring).
pub fn attention_forward_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &SeqLayout,
    p: &AttentionParams,
) -> Result<AttentionSaved> {
    check_args(q, k, v, layout, p)?;
    match q.device() {
        Device::Cuda(_) => {
            let (out, lse) = cuda::attention_lse(q, k, v, layout, p)?;
            Ok(AttentionSaved {
                out,
                lse: Some(lse),
            })
        }
        Device::Cpu => Ok(AttentionSaved {
            out: attention(q, k, v, layout, p)?,
            lse: None,
        }),
    }
}

/// (dq, dk, dv) of [`attention`] for the upstream gradient `dout` (`q`'s shape). On the GPU
/// this first recomputes the forward (output and log-sum-exp);
/// [`attention_backward_saved`] reuses the ones [`attention_forward_lse`] kept instead.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    layout: &SeqLayout,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward(q, k, v, dout, None, layout, p)
}

/// [`attention_backward`] reusing the forward's output and log-sum-exp (from
/// [`attention_forward_lse`] on the same inputs). The CPU ignores `saved`.
pub fn attention_backward_saved(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    saved: &AttentionSaved,
    layout: &SeqLayout,
    p: &AttentionParams,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward(q, k, v, dout, Some(saved), layout, p)
}

fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    saved: Option<&AttentionSaved>,
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
        Device::Cuda(_) => {
            check_args(q, k, v, layout, p)?;
            let saved = saved.and_then(|s| s.lse.as_ref().map(|lse| (&s.out, lse)));
            cuda::attention_backward(q, k, v, dout, saved, layout, p)
        }
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
