//! Gemma-2 as a 3-way sequence classifier, numerically as transformers' `Gemma2Model`
//! (eager attention) followed by the sequence-classification head.
//!
//! - embedding × √hidden (the constant rounded to the activation dtype);
//! - RMSNorm with gain `(1 + w)`, four per layer: input → attention → post-attention norm →
//!   residual; pre-FFN norm → GeGLU (tanh GELU) → post-FFN norm → residual; final norm;
//! - attention: GQA, scale `query_pre_attn_scalar^-0.5`, logits soft-capped with
//!   `attn_logit_softcapping`, causal; sliding layers (even-indexed unless `layer_types`
//!   says otherwise) see only the last `sliding_window` keys;
//! - `final_logit_softcapping` belongs to the LM head and is not applied to class logits.

use std::path::Path;

use serde::Deserialize;

use crate::autograd::{Graph, Var};
use crate::bail;
use crate::data::batch::TokenBatch;
use crate::error::Result;
use crate::lora::Adapter;
use crate::models::blocks::{self, AttentionBlock, LayerCtx, MlpBlock, layer_ctx};
use crate::models::{
    LoadOptions, ModelInfo, RopeSpec, TokenIds, WeightLoader, parse_config, round_to,
};
use crate::ops::activation::Gate;
use crate::ops::attention::AttentionParams;
use crate::ops::linear::Linear;
use crate::ops::norm::{NormKind, RmsNorm};
use crate::tensor::{DType, Tensor};
use crate::weights::Checkpoint;

fn default_eps() -> f64 {
    1e-6
}
fn default_attn_cap() -> Option<f32> {
    Some(50.0)
}
fn default_sliding_window() -> Option<usize> {
    Some(4096)
}
fn default_query_pre_attn_scalar() -> f64 {
    256.0
}
fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_init() -> f64 {
    0.02
}

/// The fields of a Gemma-2 config.json the engine uses (defaults as transformers').
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_query_pre_attn_scalar")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "default_attn_cap")]
    pub attn_logit_softcapping: Option<f32>,
    #[serde(default = "default_sliding_window")]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// The MLP's activation (transformers' Gemma-2 reads `hidden_activation`, not `hidden_act`).
    #[serde(default = "default_act")]
    pub hidden_activation: String,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub attention_bias: bool,
    /// The classifier reads the last token that is not this id (transformers' pooling).
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl Config {
    /// Whether layer `i` uses the sliding window.
    pub fn is_sliding(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(t) => t[i] == "sliding_attention",
            None => i.is_multiple_of(2),
        }
    }

    fn validate(&self, dir: &Path) -> Result<()> {
        let where_ = dir.join("config.json");
        if let Some(t) = &self.layer_types {
            if t.len() != self.num_hidden_layers {
                bail!(
                    Model,
                    "{}: `layer_types` lists {} layers, num_hidden_layers is {}",
                    where_.display(),
                    t.len(),
                    self.num_hidden_layers
                );
            }
            if let Some(bad) = t
                .iter()
                .find(|x| *x != "sliding_attention" && *x != "full_attention")
            {
                bail!(Model, "{}: unknown layer type `{bad}`", where_.display());
            }
        }
        crate::models::validate_dims(
            &where_,
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        )?;
        if self.attention_bias {
            bail!(
                Model,
                "{}: attention_bias is not supported",
                where_.display()
            );
        }
        if self.sliding_window == Some(0) {
            bail!(
                Model,
                "{}: sliding_window must be at least 1 (or null)",
                where_.display()
            );
        }
        Ok(())
    }
}

struct DecoderLayer {
    input_norm: RmsNorm,
    attn: AttentionBlock,
    post_attn_norm: RmsNorm,
    pre_ff_norm: RmsNorm,
    mlp: MlpBlock,
    post_ff_norm: RmsNorm,
}

impl DecoderLayer {
    /// `x → x + post_ff(mlp(pre_ff(x + post_attn(attn(input_norm(x))))))`, with the
    /// intermediate residual stream in between.
    fn forward<'a>(&'a self, g: &mut Graph<'a>, x: &Var, ctx: &LayerCtx) -> Result<Var> {
        let h = g.rms_norm(x, &self.input_norm)?;
        let a = self.attn.forward(g, &h, ctx)?;
        let (x, h) = g.norm_add_norm(x, &a, &self.post_attn_norm, &self.pre_ff_norm)?;
        let f = self.mlp.forward(g, &h)?;
        let f = g.rms_norm(&f, &self.post_ff_norm)?;
        g.add(&x, &f)
    }
}

/// A loaded Gemma-2 classifier.
pub struct Gemma2 {
    pub config: Config,
    pub info: ModelInfo,
    embed: Tensor,
    embed_scale: f32,
    /// Activation dtype.
    dtype: DType,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    score: Linear,
    /// Distinct rotary frequency tables: [full-attention layers, sliding layers].
    inv_freqs: Vec<Vec<f32>>,
}

impl Gemma2 {
    pub(crate) fn load(
        dir: &Path,
        raw: &serde_json::Value,
        ck: &Checkpoint,
        opts: &LoadOptions,
        adapter: Option<&mut Adapter>,
    ) -> Result<Self> {
        let cfg: Config = parse_config(dir, raw)?;
        cfg.validate(dir)?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let eps = cfg.rms_norm_eps as f32;
        let act = Gate::from_name(&cfg.hidden_activation)?;
        let specs = [
            RopeSpec::parse(raw, "full_attention", 10000.0)?,
            RopeSpec::parse(raw, "sliding_attention", 10000.0)?,
        ];
        let inv_freqs: Vec<Vec<f32>> = specs.iter().map(|s| s.inv_freq(hd)).collect();
        // Computed in f64 and rounded once, as Python's `query_pre_attn_scalar**-0.5` is.
        let scale = cfg.query_pre_attn_scalar.powf(-0.5) as f32;

        let mut w = WeightLoader::new(ck, opts, adapter)?;
        let embed = w.embedding(cfg.vocab_size, h)?;
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("layers.{i}");
            let sliding = cfg.is_sliding(i);
            let params = AttentionParams {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                scale,
                softcap: cfg.attn_logit_softcapping,
                window: if sliding { cfg.sliding_window } else { None },
            };
            let kind = NormKind::OnePlusWeight;
            layers.push(DecoderLayer {
                input_norm: w.norm(&format!("{p}.input_layernorm"), h, eps, kind)?,
                attn: AttentionBlock::load(&mut w, &p, h, params, sliding as usize)?,
                post_attn_norm: w.norm(&format!("{p}.post_attention_layernorm"), h, eps, kind)?,
                pre_ff_norm: w.norm(&format!("{p}.pre_feedforward_layernorm"), h, eps, kind)?,
                mlp: MlpBlock::load(&mut w, &p, h, cfg.intermediate_size, act)?,
                post_ff_norm: w.norm(&format!("{p}.post_feedforward_layernorm"), h, eps, kind)?,
            });
        }
        let norm = w.norm("norm", h, eps, NormKind::OnePlusWeight)?;
        let (score, score_source) = w.score(h, cfg.initializer_range)?;
        let info = ModelInfo {
            model_type: "gemma2".into(),
            vocab_size: cfg.vocab_size,
            hidden_size: h,
            num_layers: cfg.num_hidden_layers,
            eos_token_id: cfg.eos_token_id.as_ref().and_then(TokenIds::first),
            pad_token_id: cfg.pad_token_id,
            weight_bytes: w.weight_bytes,
            parameters: w.parameters,
            score_source,
        };
        // transformers multiplies by sqrt(hidden) cast to the activation dtype (rounded in bf16).
        let dtype = w.dtype;
        let embed_scale = round_to(dtype, (h as f64).sqrt() as f32);
        Ok(Gemma2 {
            config: cfg,
            info,
            embed,
            embed_scale,
            dtype,
            layers,
            norm,
            score,
            inv_freqs,
        })
    }

    /// The forward pass on `g` (recording when training): class logits `[rows, 3]` (f32).
    pub(crate) fn forward_graph<'a>(
        &'a self,
        g: &mut Graph<'a>,
        batch: &TokenBatch,
    ) -> Result<Var> {
        let ctx = layer_ctx(&batch.layout, &self.inv_freqs, self.embed.device())?;
        let mut x = g.embed(&self.embed, &batch.ids, self.embed_scale, self.dtype)?;
        for layer in &self.layers {
            let ctx = ctx.clone();
            x = g.checkpoint(&x, move |g, x| layer.forward(g, x, &ctx))?;
        }
        // Only the pooled token of each row reaches the head; normalising just those rows is
        // the same function as normalising all of them (RMSNorm is per row).
        let last = g.gather_rows(&x, &batch.pooled_tokens(self.info.pad_token_id))?;
        let last = g.rms_norm(&last, &self.norm)?;
        g.linear(&last, &self.score)
    }

    /// Every projection with its Hugging Face module path, and the score head.
    pub(crate) fn linears_mut(&mut self) -> (Vec<(String, &mut Linear)>, &mut Linear) {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            blocks::layer_linears_mut(i, &mut l.attn, &mut l.mlp, &mut v);
        }
        (v, &mut self.score)
    }

    pub(crate) fn linears(&self) -> (Vec<(String, &Linear)>, &Linear) {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            blocks::layer_linears(i, &l.attn, &l.mlp, &mut v);
        }
        (v, &self.score)
    }
}
