//! CPU twin of attention: one task per (row, head), queries in blocks of [`Q_BLOCK`], each
//! block multiplying only against the keys it can see (causal and window limits), so a
//! sliding-window layer costs O(tokens × window) and no tokens × tokens matrix is ever held
//! for long rows.

use rayon::prelude::*;

use crate::ops::SeqLayout;
use crate::ops::cpu_math::{exp, multiversion, tanh};
use crate::ops::gemm::{MatRef, Threads, sgemm};

use super::AttentionParams;

const Q_BLOCK: usize = 64;

pub(super) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    layout: &SeqLayout,
    p: &AttentionParams,
) -> Vec<f32> {
    let d = p.head_dim;
    let qw = p.n_heads * d;
    let kw = p.n_kv_heads * d;
    let group = p.n_heads / p.n_kv_heads;
    let tasks: Vec<(usize, usize)> = (0..layout.rows())
        .flat_map(|r| (0..p.n_heads).map(move |h| (r, h)))
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(r, h)| {
            let range = layout.range(r);
            let (start, len) = (range.start, range.len());
            let kvh = h / group;
            let mut out = vec![0f32; len * d];
            let mut s = vec![0f32; Q_BLOCK * (Q_BLOCK + p.window.map_or(len, |w| w.min(len)))];
            let mut i0 = 0;
            while i0 < len {
                let i1 = (i0 + Q_BLOCK).min(len);
                let j0 = match p.window {
                    Some(w) => (i0 + 1).saturating_sub(w),
                    None => 0,
                };
                let (m, nk) = (i1 - i0, i1 - j0);
                let s = &mut s[..m * nk];
                // s = q_blk · k_visᵀ
                let qv = MatRef {
                    data: &q[(start + i0) * qw + h * d..],
                    rs: qw,
                    cs: 1,
                };
                let kv = MatRef {
                    data: &k[(start + j0) * kw + kvh * d..],
                    rs: 1,
                    cs: kw,
                };
                sgemm(m, nk, d, s, nk, false, qv, kv, 1.0, Threads::One);
                softmax_rows(s, nk, i0, j0, p);
                // out_blk = p · v_vis
                let vv = MatRef {
                    data: &v[(start + j0) * kw + kvh * d..],
                    rs: kw,
                    cs: 1,
                };
                sgemm(
                    m,
                    d,
                    nk,
                    &mut out[i0 * d..],
                    d,
                    false,
                    MatRef::rows(s, nk),
                    vv,
                    1.0,
                    Threads::One,
                );
                i0 = i1;
            }
            out
        })
        .collect();
    let mut y = vec![0f32; layout.total_tokens() * qw];
    for (&(r, h), out) in tasks.iter().zip(&results) {
        let start = layout.range(r).start;
        for (i, src) in out.chunks(d).enumerate() {
            let dst = (start + i) * qw + h * d;
            y[dst..dst + d].copy_from_slice(src);
        }
    }
    y
}

multiversion! {
    /// Rows of `s` (width `nk`) are the raw scores of queries `i0, i0 + 1, …` against keys
    /// `j0..j0 + nk`; turn each into probabilities.
    fn softmax_rows(s: &mut [f32], nk: usize, i0: usize, j0: usize, p: &AttentionParams) {
        for (ii, row) in s.chunks_mut(nk).enumerate() {
            softmax_row(row, i0 + ii, j0, p);
        }
    }
}

/// Turn the raw scores of query `i` against keys `j0..j0 + row.len()` into probabilities:
/// scale, soft-cap, mask (exact zeros outside the causal window), softmax.
#[inline(always)]
fn softmax_row(row: &mut [f32], i: usize, j0: usize, p: &AttentionParams) {
    let lo = match p.window {
        Some(w) => (i + 1).saturating_sub(w),
        None => 0,
    };
    // Visible keys are j0 + a .. j0 + b (a ≤ b ≤ row.len()).
    let a = lo.saturating_sub(j0).min(row.len());
    let b = (i + 1 - j0).min(row.len());
    let (head, rest) = row.split_at_mut(a);
    let (vis, tail) = rest.split_at_mut(b - a);
    head.fill(0.0);
    tail.fill(0.0);
    match p.softcap {
        Some(cap) => {
            let inv = 1.0 / cap;
            for x in vis.iter_mut() {
                *x = tanh(*x * p.scale * inv) * cap;
            }
        }
        None => {
            for x in vis.iter_mut() {
                *x *= p.scale;
            }
        }
    }
    let max = vis.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0f32;
    for x in vis.iter_mut() {
        *x = exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in vis.iter_mut() {
        *x *= inv;
    }
}

/// One backward task's gradients: dQ of each query head of the group, dK and dV of the KV head.
type TaskGrads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);

/// Gradients of attention, recomputing the probabilities: per (row, KV head) task, for each
/// query head of the group, with `u = scale·q·k`, `s = cap·tanh(u/cap)` (or `s = u`),
/// `p = softmax(s)` over the visible keys:
/// `dV += pᵀ·dO`, `dP = dO·Vᵀ`, `dS = p ⊙ (dP − rowsum(dP ⊙ p))`,
/// `dU = dS·(1 − tanh²(u/cap))`, `dQ = scale·dU·K`, `dK += scale·dUᵀ·Q`.
/// K and V gradients are summed over the query heads sharing the KV head.
pub(super) fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    layout: &SeqLayout,
    p: &AttentionParams,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = p.head_dim;
    let qw = p.n_heads * d;
    let kw = p.n_kv_heads * d;
    let group = p.n_heads / p.n_kv_heads;
    let tasks: Vec<(usize, usize)> = (0..layout.rows())
        .flat_map(|r| (0..p.n_kv_heads).map(move |h| (r, h)))
        .collect();
    // Per task: dQ of its query heads ([group][len, d]), dK and dV of its KV head ([len, d]).
    let results: Vec<TaskGrads> = tasks
        .par_iter()
        .map(|&(r, kvh)| {
            let range = layout.range(r);
            let (start, len) = (range.start, range.len());
            let mut dk = vec![0f32; len * d];
            let mut dv = vec![0f32; len * d];
            let mut dqs = Vec::with_capacity(group);
            let mut s = vec![0f32; len * len];
            let mut tanh_u = vec![0f32; len * len];
            let mut dp = vec![0f32; len * len];
            let kv_k = MatRef {
                data: &k[start * kw + kvh * d..],
                rs: kw,
                cs: 1,
            };
            let kt = MatRef {
                data: &k[start * kw + kvh * d..],
                rs: 1,
                cs: kw,
            };
            let vt = MatRef {
                data: &v[start * kw + kvh * d..],
                rs: 1,
                cs: kw,
            };
            for h in kvh * group..(kvh + 1) * group {
                let qh = MatRef {
                    data: &q[start * qw + h * d..],
                    rs: qw,
                    cs: 1,
                };
                let doh = MatRef {
                    data: &dout[start * qw + h * d..],
                    rs: qw,
                    cs: 1,
                };
                // Probabilities, keeping tanh(u/cap) for the soft-cap derivative.
                sgemm(len, len, d, &mut s, len, false, qh, kt, 1.0, Threads::One);
                for i in 0..len {
                    let lo = match p.window {
                        Some(w) => (i + 1).saturating_sub(w),
                        None => 0,
                    };
                    let row = &mut s[i * len..(i + 1) * len];
                    let trow = &mut tanh_u[i * len..(i + 1) * len];
                    let mut max = f32::NEG_INFINITY;
                    for j in 0..len {
                        if j > i || j < lo {
                            continue;
                        }
                        let u = row[j] * p.scale;
                        row[j] = match p.softcap {
                            Some(cap) => {
                                let t = (u / cap).tanh();
                                trow[j] = t;
                                cap * t
                            }
                            None => u,
                        };
                        max = max.max(row[j]);
                    }
                    let mut sum = 0f32;
                    for (j, x) in row.iter_mut().enumerate() {
                        if j > i || j < lo {
                            *x = 0.0;
                        } else {
                            *x = (*x - max).exp();
                            sum += *x;
                        }
                    }
                    for x in row.iter_mut() {
                        *x /= sum;
                    }
                }
                // dV += Pᵀ·dO
                let pt = MatRef {
                    data: &s,
                    rs: 1,
                    cs: len,
                };
                sgemm(len, d, len, &mut dv, d, true, pt, doh, 1.0, Threads::One);
                // dP = dO·Vᵀ
                sgemm(len, len, d, &mut dp, len, false, doh, vt, 1.0, Threads::One);
                // dU (in place in dp)
                for i in 0..len {
                    let prow = &s[i * len..(i + 1) * len];
                    let drow = &mut dp[i * len..(i + 1) * len];
                    let dot: f32 = prow.iter().zip(drow.iter()).map(|(a, b)| a * b).sum();
                    for j in 0..len {
                        let mut g = prow[j] * (drow[j] - dot);
                        if p.softcap.is_some() {
                            let t = tanh_u[i * len + j];
                            g *= 1.0 - t * t;
                        }
                        drow[j] = g * p.scale;
                    }
                }
                // dQ = dU·K ; dK += dUᵀ·Q
                let mut dq = vec![0f32; len * d];
                sgemm(
                    len,
                    d,
                    len,
                    &mut dq,
                    d,
                    false,
                    MatRef::rows(&dp, len),
                    kv_k,
                    1.0,
                    Threads::One,
                );
                let dut = MatRef {
                    data: &dp,
                    rs: 1,
                    cs: len,
                };
                sgemm(len, d, len, &mut dk, d, true, dut, qh, 1.0, Threads::One);
                dqs.push(dq);
            }
            (dqs, dk, dv)
        })
        .collect();
    let t = layout.total_tokens();
    let (mut dq, mut dk, mut dv) = (vec![0f32; t * qw], vec![0f32; t * kw], vec![0f32; t * kw]);
    for (&(r, kvh), (dqs, dkh, dvh)) in tasks.iter().zip(&results) {
        let start = layout.range(r).start;
        for (gi, dqh) in dqs.iter().enumerate() {
            let h = kvh * group + gi;
            for (i, src) in dqh.chunks(d).enumerate() {
                let o = (start + i) * qw + h * d;
                dq[o..o + d].copy_from_slice(src);
            }
        }
        for (i, (sk, sv)) in dkh.chunks(d).zip(dvh.chunks(d)).enumerate() {
            let o = (start + i) * kw + kvh * d;
            dk[o..o + d].copy_from_slice(sk);
            dv[o..o + d].copy_from_slice(sv);
        }
    }
    (dq, dk, dv)
}
