//! The sublayers both backbones share — grouped-query self-attention with RoPE and the gated
//! MLP — and the per-batch context a decoder layer reads. Each block loads its projections
//! through the [`WeightLoader`] (quantisation and LoRA attached there) and runs on a
//! [`Graph`], so the same code serves inference and training.

use std::rc::Rc;

use crate::autograd::{Graph, Var};
use crate::error::Result;
use crate::models::WeightLoader;
use crate::ops::SeqLayout;
use crate::ops::activation::Gate;
use crate::ops::attention::AttentionParams;
use crate::ops::linear::Linear;
use crate::ops::rope::RopeTable;

/// What every layer of one forward pass reads besides its input: the row boundaries and the
/// rotary tables (one per distinct layer type).
pub(crate) struct LayerCtx {
    pub layout: SeqLayout,
    pub ropes: Vec<RopeTable>,
}

/// `q/k/v/o` projections and the attention they feed.
pub(crate) struct AttentionBlock {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub params: AttentionParams,
    /// Index into [`LayerCtx::ropes`].
    pub rope: usize,
}

impl AttentionBlock {
    /// Load `layers.{i}.self_attn.*` (`prefix` = `layers.{i}`).
    pub fn load(
        w: &mut WeightLoader<'_>,
        prefix: &str,
        hidden: usize,
        params: AttentionParams,
        rope: usize,
    ) -> Result<Self> {
        let (nh, nkv, hd) = (params.n_heads, params.n_kv_heads, params.head_dim);
        Ok(AttentionBlock {
            q: w.projection(&format!("{prefix}.self_attn.q_proj"), nh * hd, hidden)?,
            k: w.projection(&format!("{prefix}.self_attn.k_proj"), nkv * hd, hidden)?,
            v: w.projection(&format!("{prefix}.self_attn.v_proj"), nkv * hd, hidden)?,
            o: w.projection(&format!("{prefix}.self_attn.o_proj"), hidden, nh * hd)?,
            params,
            rope,
        })
    }

    /// Attention output (before any post-norm) for the normalised input `h`.
    pub fn forward<'a>(&'a self, g: &mut Graph<'a>, h: &Var, ctx: &LayerCtx) -> Result<Var> {
        let table = &ctx.ropes[self.rope];
        let d = self.params.head_dim;
        let q = g.linear(h, &self.q)?;
        let q = g.rope(&q, table, d)?;
        let k = g.linear(h, &self.k)?;
        let k = g.rope(&k, table, d)?;
        let v = g.linear(h, &self.v)?;
        let a = g.attention(&q, &k, &v, &ctx.layout, &self.params)?;
        g.linear(&a, &self.o)
    }

    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [
            ("self_attn.q_proj", &mut self.q),
            ("self_attn.k_proj", &mut self.k),
            ("self_attn.v_proj", &mut self.v),
            ("self_attn.o_proj", &mut self.o),
        ]
    }

    pub fn linears(&self) -> [(&'static str, &Linear); 4] {
        [
            ("self_attn.q_proj", &self.q),
            ("self_attn.k_proj", &self.k),
            ("self_attn.v_proj", &self.v),
            ("self_attn.o_proj", &self.o),
        ]
    }
}

/// Append the seven projections of layer `i` with their Hugging Face module paths.
pub(crate) fn layer_linears<'a>(
    i: usize,
    attn: &'a AttentionBlock,
    mlp: &'a MlpBlock,
    out: &mut Vec<(String, &'a Linear)>,
) {
    let named = attn.linears().into_iter().chain(mlp.linears());
    out.extend(named.map(|(name, lin)| (format!("model.layers.{i}.{name}"), lin)));
}

/// [`layer_linears`], mutably.
pub(crate) fn layer_linears_mut<'a>(
    i: usize,
    attn: &'a mut AttentionBlock,
    mlp: &'a mut MlpBlock,
    out: &mut Vec<(String, &'a mut Linear)>,
) {
    let named = attn.linears_mut().into_iter().chain(mlp.linears_mut());
    out.extend(named.map(|(name, lin)| (format!("model.layers.{i}.{name}"), lin)));
}

/// The gated MLP: `down(act(gate(h)) · up(h))`.
pub(crate) struct MlpBlock {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub act: Gate,
}

impl MlpBlock {
    /// Load `layers.{i}.mlp.*` (`prefix` = `layers.{i}`).
    pub fn load(
        w: &mut WeightLoader<'_>,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
        act: Gate,
    ) -> Result<Self> {
        Ok(MlpBlock {
            gate: w.projection(&format!("{prefix}.mlp.gate_proj"), intermediate, hidden)?,
            up: w.projection(&format!("{prefix}.mlp.up_proj"), intermediate, hidden)?,
            down: w.projection(&format!("{prefix}.mlp.down_proj"), hidden, intermediate)?,
            act,
        })
    }

    pub fn forward<'a>(&'a self, g: &mut Graph<'a>, h: &Var) -> Result<Var> {
        let gate = g.linear(h, &self.gate)?;
        let up = g.linear(h, &self.up)?;
        let act = g.gated(&gate, &up, self.act)?;
        g.linear(&act, &self.down)
    }

    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 3] {
        [
            ("mlp.gate_proj", &mut self.gate),
            ("mlp.up_proj", &mut self.up),
            ("mlp.down_proj", &mut self.down),
        ]
    }

    pub fn linears(&self) -> [(&'static str, &Linear); 3] {
        [
            ("mlp.gate_proj", &self.gate),
            ("mlp.up_proj", &self.up),
            ("mlp.down_proj", &self.down),
        ]
    }
}

/// Build the per-pass context.
pub(crate) fn layer_ctx(
    layout: &SeqLayout,
    inv_freqs: &[Vec<f32>],
    device: crate::tensor::Device,
) -> Result<Rc<LayerCtx>> {
    let positions = layout.positions();
    let ropes = inv_freqs
        .iter()
        .map(|f| RopeTable::new(&positions, f, device))
        .collect::<Result<Vec<_>>>()?;
    Ok(Rc::new(LayerCtx {
        layout: layout.clone(),
        ropes,
    }))
}
