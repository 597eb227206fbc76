//! A minimal reverse-mode autograd: a tape of backward closures, run in reverse.
//!
//! A [`Graph`] either records (training) or does not (inference, and the first pass of a
//! checkpointed layer); the models are written once against its op methods, which compute the
//! forward op and, when recording and some input needs a gradient, push a node holding what its
//! hand-written backward needs. Values are [`Var`]s: a tensor plus the node that made it, if any.
//!
//! Conventions:
//! - activation gradients flow between nodes and are summed where a value is used twice;
//! - parameter gradients (LoRA A/B, the trainable score head) are accumulated with `+=` into
//!   [`ParamGrads`], found by the identity of the parameter's tensor (tensors are immutable, so
//!   the trainer registers this step's parameter tensors before the forward pass);
//! - the frozen base model gets no gradient, and an op whose inputs need none records nothing,
//!   so frozen bottom layers cost a plain forward pass;
//! - gradient checkpointing ([`Graph::checkpoint`]) runs a layer without recording, keeps only
//!   its input, and recomputes it (with the same dropout masks) when the backward pass reaches
//!   it. Results are identical with and without it.

use std::collections::HashMap;
use std::rc::Rc;

use rand::{RngExt, SeedableRng};

use crate::bail;
use crate::error::Result;
use crate::ops::SeqLayout;
use crate::ops::activation::{Gate, gated, gated_backward};
use crate::ops::attention::{
    AttentionParams, attention, attention_backward_saved, attention_forward_lse,
};
use crate::ops::elementwise::{add, mul};
use crate::ops::embedding::{embed, gather_rows, gather_rows_backward};
use crate::ops::linear::{Linear, linear, linear_backward, linear_split};
use crate::ops::norm::{RmsNorm, add_rms_norm, norm_add_norm, rms_norm, rms_norm_backward};
use crate::ops::rope::{self, RopeTable};
use crate::tensor::{DType, Tensor};

/// A value of the computation: a tensor and, when it needs a gradient, its node.
#[derive(Clone, Debug)]
pub struct Var {
    t: Tensor,
    node: Option<usize>,
}

impl Var {
    pub fn tensor(&self) -> &Tensor {
        &self.t
    }

    pub fn into_tensor(self) -> Tensor {
        self.t
    }

    /// Whether gradients flow into this value.
    pub fn needs_grad(&self) -> bool {
        self.node.is_some()
    }
}

/// Gradients of the trainable parameters, indexed by parameter number (the order of the
/// parameter list given to [`Graph::training`]).
pub struct ParamGrads {
    grads: Vec<Option<Tensor>>,
}

impl ParamGrads {
    pub fn new(count: usize) -> Self {
        ParamGrads {
            grads: vec![None; count],
        }
    }

    fn accumulate(&mut self, i: usize, g: Tensor) -> Result<()> {
        self.grads[i] = Some(match self.grads[i].take() {
            None => g,
            Some(prev) => add(&prev, &g)?,
        });
        Ok(())
    }

    /// The accumulated gradients, `None` for parameters that received none.
    pub fn into_grads(self) -> Vec<Option<Tensor>> {
        self.grads
    }
}

type Backward<'a> = Box<dyn FnOnce(Tensor, &mut ParamGrads) -> Result<Vec<Option<Tensor>>> + 'a>;

struct Node<'a> {
    inputs: Vec<Option<usize>>,
    backward: Option<Backward<'a>>,
}

/// What a recording graph needs to know about training.
#[derive(Clone)]
struct TrainConfig {
    /// Parameter tensor identity → parameter number.
    params: Rc<HashMap<usize, usize>>,
    checkpointing: bool,
    lora_dropout: f32,
}

/// The tape.
pub struct Graph<'a> {
    train: Option<TrainConfig>,
    /// Whether ops push nodes (false inside the first pass of a checkpointed layer).
    record: bool,
    rng: rand_chacha::ChaCha8Rng,
    nodes: Vec<Node<'a>>,
}

impl<'a> Graph<'a> {
    /// A graph that records nothing (inference).
    pub fn inference() -> Self {
        Graph {
            train: None,
            record: false,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(0),
            nodes: Vec::new(),
        }
    }

    /// A recording graph for one training forward/backward pass. `params` are this step's
    /// trainable tensors (as registered in the [`ParamGrads`] the backward pass fills);
    /// `seed` drives the LoRA dropout masks.
    pub fn training(params: &[&Tensor], checkpointing: bool, lora_dropout: f32, seed: u64) -> Self {
        let map = params
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id(), i))
            .collect();
        Graph {
            train: Some(TrainConfig {
                params: Rc::new(map),
                checkpointing,
                lora_dropout,
            }),
            record: true,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            nodes: Vec::new(),
        }
    }

    fn sub_graph(train: TrainConfig, record: bool, seed: u64) -> Self {
        Graph {
            train: Some(train),
            record,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            nodes: Vec::new(),
        }
    }

    /// Number of recorded nodes (for tests and memory accounting).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A value that needs no gradient.
    pub fn constant(&self, t: Tensor) -> Var {
        Var { t, node: None }
    }

    /// A value whose gradient [`Graph::backward`] can return.
    pub fn leaf(&mut self, t: Tensor) -> Var {
        let node = self.push(Vec::new(), None);
        Var { t, node }
    }

    fn push(
        &mut self,
        inputs: Vec<Option<usize>>,
        backward: Option<Backward<'a>>,
    ) -> Option<usize> {
        self.nodes.push(Node { inputs, backward });
        Some(self.nodes.len() - 1)
    }

    fn param(&self, t: &Tensor) -> Option<usize> {
        self.train
            .as_ref()
            .and_then(|c| c.params.get(&t.id()).copied())
    }

    /// Embedding lookup (the table is frozen: no node).
    pub fn embed(&mut self, table: &Tensor, ids: &[u32], scale: f32, dtype: DType) -> Result<Var> {
        Ok(self.constant(embed(table, ids, scale, dtype)?))
    }

    /// A linear layer: frozen base, LoRA factors and a trainable dense weight get gradients
    /// when they are registered parameters. With LoRA dropout, the LoRA path sees
    /// `x ⊙ mask / (1 − p)`.
    pub fn linear(&mut self, x: &Var, layer: &'a Linear) -> Result<Var> {
        let lora_ids = layer
            .lora
            .as_ref()
            .and_then(|l| Some((self.param(&l.a)?, self.param(&l.b)?)));
        let weight_id = match &layer.weight {
            crate::ops::linear::BaseWeight::Dense(w) => self.param(w),
            _ => None,
        };
        let dropout = self.train.as_ref().map(|c| c.lora_dropout).unwrap_or(0.0);
        let x_lora = if dropout > 0.0 && layer.lora.is_some() && self.train.is_some() {
            Some(dropout_mask(&mut self.rng, x.tensor(), dropout)?)
        } else {
            None
        };
        let y = match &x_lora {
            Some((xd, _)) => linear_split(&x.t, xd, layer)?,
            None => linear(&x.t, layer)?,
        };
        if !self.record || (x.node.is_none() && lora_ids.is_none() && weight_id.is_none()) {
            return Ok(Var { t: y, node: None });
        }
        let xt = x.t.clone();
        let need_dx = x.node.is_some();
        let node = self.push(
            vec![x.node],
            Some(Box::new(move |dy, params| {
                let xl = x_lora.as_ref().map(|(xd, _)| xd);
                let g = linear_backward(&xt, xl, &dy, layer, weight_id.is_some())?;
                if let (Some((ia, ib)), Some((da, db))) = (lora_ids, g.lora) {
                    params.accumulate(ia, da)?;
                    params.accumulate(ib, db)?;
                }
                if let (Some(iw), Some(dw)) = (weight_id, g.weight) {
                    params.accumulate(iw, dw)?;
                }
                if !need_dx {
                    return Ok(vec![None]);
                }
                let dx = match (g.dx_lora, &x_lora) {
                    (Some(dxl), Some((_, mask))) => add(&g.dx, &mul(&dxl, mask)?)?,
                    _ => g.dx,
                };
                Ok(vec![Some(dx)])
            })),
        );
        Ok(Var { t: y, node })
    }

    pub fn rms_norm(&mut self, x: &Var, norm: &'a RmsNorm) -> Result<Var> {
        let y = rms_norm(&x.t, norm)?;
        if !self.record || x.node.is_none() {
            return Ok(Var { t: y, node: None });
        }
        let xt = x.t.clone();
        let node = self.push(
            vec![x.node],
            Some(Box::new(move |dy, _| {
                Ok(vec![Some(rms_norm_backward(&xt, &dy, norm)?)])
            })),
        );
        Ok(Var { t: y, node })
    }

    pub fn add(&mut self, a: &Var, b: &Var) -> Result<Var> {
        let y = add(&a.t, &b.t)?;
        if !self.record || (a.node.is_none() && b.node.is_none()) {
            return Ok(Var { t: y, node: None });
        }
        let node = self.push(
            vec![a.node, b.node],
            Some(Box::new(|dy, _| Ok(vec![Some(dy.clone()), Some(dy)]))),
        );
        Ok(Var { t: y, node })
    }

    /// `s = x + post(a)`, `y = pre(s)`: one fused op when nothing records, else its pieces.
    pub fn norm_add_norm(
        &mut self,
        x: &Var,
        a: &Var,
        post: &'a RmsNorm,
        pre: &'a RmsNorm,
    ) -> Result<(Var, Var)> {
        if !self.record {
            let (s, y) = norm_add_norm(&x.t, &a.t, post, pre)?;
            return Ok((self.constant(s), self.constant(y)));
        }
        let n = self.rms_norm(a, post)?;
        let s = self.add(x, &n)?;
        let y = self.rms_norm(&s, pre)?;
        Ok((s, y))
    }

    /// `s = x + a`, `y = norm(s)`: one fused op when nothing records, else its pieces.
    pub fn add_rms_norm(&mut self, x: &Var, a: &Var, norm: &'a RmsNorm) -> Result<(Var, Var)> {
        if !self.record {
            let (s, y) = add_rms_norm(&x.t, &a.t, norm)?;
            return Ok((self.constant(s), self.constant(y)));
        }
        let s = self.add(x, a)?;
        let y = self.rms_norm(&s, norm)?;
        Ok((s, y))
    }

    pub fn rope(&mut self, x: &Var, table: &RopeTable, head_dim: usize) -> Result<Var> {
        let y = rope::apply(&x.t, table, head_dim)?;
        if !self.record || x.node.is_none() {
            return Ok(Var { t: y, node: None });
        }
        let table = table.clone();
        let node = self.push(
            vec![x.node],
            Some(Box::new(move |dy, _| {
                Ok(vec![Some(rope::apply_backward(&dy, &table, head_dim)?)])
            })),
        );
        Ok(Var { t: y, node })
    }

    pub fn attention(
        &mut self,
        q: &Var,
        k: &Var,
        v: &Var,
        layout: &SeqLayout,
        p: &AttentionParams,
    ) -> Result<Var> {
        if !self.record || (q.node.is_none() && k.node.is_none() && v.node.is_none()) {
            let y = attention(&q.t, &k.t, &v.t, layout, p)?;
            return Ok(Var { t: y, node: None });
        }
        // The GPU forward also leaves the log-sum-exp of every row of logits, so the backward
        // needs no second forward; the output tensor is shared with the graph, not copied.
        let saved = attention_forward_lse(&q.t, &k.t, &v.t, layout, p)?;
        let y = saved.out.clone();
        let (qt, kt, vt, layout, p) = (q.t.clone(), k.t.clone(), v.t.clone(), layout.clone(), *p);
        let node = self.push(
            vec![q.node, k.node, v.node],
            Some(Box::new(move |dy, _| {
                let (dq, dk, dv) =
                    attention_backward_saved(&qt, &kt, &vt, &dy, &saved, &layout, &p)?;
                Ok(vec![Some(dq), Some(dk), Some(dv)])
            })),
        );
        Ok(Var { t: y, node })
    }

    pub fn gated(&mut self, gate: &Var, up: &Var, act: Gate) -> Result<Var> {
        let y = gated(&gate.t, &up.t, act)?;
        if !self.record || (gate.node.is_none() && up.node.is_none()) {
            return Ok(Var { t: y, node: None });
        }
        let (gt, ut) = (gate.t.clone(), up.t.clone());
        let node = self.push(
            vec![gate.node, up.node],
            Some(Box::new(move |dy, _| {
                let (dg, du) = gated_backward(&gt, &ut, &dy, act)?;
                Ok(vec![Some(dg), Some(du)])
            })),
        );
        Ok(Var { t: y, node })
    }

    pub fn gather_rows(&mut self, x: &Var, idx: &[usize]) -> Result<Var> {
        let y = gather_rows(&x.t, idx)?;
        if !self.record || x.node.is_none() {
            return Ok(Var { t: y, node: None });
        }
        let (idx, rows) = (idx.to_vec(), x.t.shape()[0]);
        let node = self.push(
            vec![x.node],
            Some(Box::new(move |dy, _| {
                Ok(vec![Some(gather_rows_backward(&dy, &idx, rows)?)])
            })),
        );
        Ok(Var { t: y, node })
    }

    /// Run `f` on `x` as one checkpointed unit when training with checkpointing: the first
    /// pass records nothing and keeps only `x`; the backward pass recomputes `f` (same dropout
    /// masks) on a sub-tape and back-propagates through it. Otherwise `f` runs on this graph.
    pub fn checkpoint(
        &mut self,
        x: &Var,
        f: impl Fn(&mut Graph<'a>, &Var) -> Result<Var> + 'a,
    ) -> Result<Var> {
        let train = match &self.train {
            Some(t) if self.record && t.checkpointing => t.clone(),
            _ => return f(self, x),
        };
        let seed: u64 = self.rng.random();
        let mut first = Graph::sub_graph(train.clone(), false, seed);
        let input = first.constant(x.t.clone());
        let y = f(&mut first, &input)?.into_tensor();
        let xt = x.t.clone();
        let node = self.push(
            vec![x.node],
            Some(Box::new(move |dy, params| {
                let mut sub = Graph::sub_graph(train, true, seed);
                let leaf = sub.leaf(xt);
                let out = f(&mut sub, &leaf)?;
                let mut g = sub.backward(&out, dy, params, &[&leaf])?;
                Ok(vec![g.pop().flatten()])
            })),
        );
        Ok(Var { t: y, node })
    }

    /// Back-propagate `grad` (the gradient of the loss with respect to `root`) through the
    /// tape, accumulating parameter gradients into `params`; returns the gradients reaching
    /// each of `wrt` (leaves of this graph).
    pub fn backward(
        &mut self,
        root: &Var,
        grad: Tensor,
        params: &mut ParamGrads,
        wrt: &[&Var],
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(r) = root.node else {
            bail!(
                Shape,
                "backward: the loss does not depend on any trainable parameter"
            );
        };
        if grad.shape() != root.t.shape() {
            bail!(
                Shape,
                "backward: gradient {:?} for a value of shape {:?}",
                grad.shape(),
                root.t.shape()
            );
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; self.nodes.len()];
        grads[r] = Some(grad);
        let mut out: Vec<Option<Tensor>> = vec![None; wrt.len()];
        for i in (0..=r).rev() {
            let Some(g) = grads[i].take() else { continue };
            for (o, w) in out.iter_mut().zip(wrt) {
                if w.node == Some(i) {
                    *o = Some(g.clone());
                }
            }
            let node = &mut self.nodes[i];
            let Some(bw) = node.backward.take() else {
                continue;
            };
            let inputs = std::mem::take(&mut node.inputs);
            let gs = bw(g, params)?;
            for (inp, gi) in inputs.into_iter().zip(gs) {
                if let (Some(j), Some(gi)) = (inp, gi) {
                    grads[j] = Some(match grads[j].take() {
                        None => gi,
                        Some(prev) => add(&prev, &gi)?,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// `(x ⊙ mask / (1 − p), mask / (1 − p))` with a fresh Bernoulli(1 − p) mask (drawn on the
/// host from the graph's seeded generator, in `x`'s dtype and on its device).
fn dropout_mask(rng: &mut rand_chacha::ChaCha8Rng, x: &Tensor, p: f32) -> Result<(Tensor, Tensor)> {
    let keep = 1.0 - p;
    let scale = 1.0 / keep;
    let m: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if rng.random::<f32>() < keep {
                scale
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_f32(m, x.shape())?
        .to_dtype(x.dtype())?
        .to_device(x.device())?;
    Ok((mul(x, &mask)?, mask))
}
