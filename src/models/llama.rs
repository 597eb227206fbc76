//! Llama-3.1 as a 3-way sequence classifier, numerically as transformers' `LlamaModel`
//! (eager attention) followed by the sequence-classification head.
//!
//! - RMSNorm with gain `w`; input norm → attention → residual; post-attention norm → SwiGLU
//!   (`silu(gate)·up → down`) → residual; final norm;
//! - attention: GQA, scale `head_dim^-0.5`, causal, no soft-capping, no window;
//! - RoPE with `rope_type = llama3` frequency scaling when the config asks for it.

use std::path::Path;

use serde::Deserialize;

use crate::autograd::{Graph, Var};
use crate::bail;
use crate::data::batch::TokenBatch;
use crate::error::Result;
use crate::lora::Adapter;
use crate::models::blocks::{self, AttentionBlock, LayerCtx, MlpBlock, layer_ctx};
use crate::models::{LoadOptions, ModelInfo, RopeSpec, TokenIds, WeightLoader, parse_config};
use crate::ops::activation::Gate;
use crate::ops::attention::AttentionParams;
use crate::ops::linear::Linear;
use crate::ops::norm::{NormKind, RmsNorm};
use crate::tensor::{DType, Tensor};
use crate::weights::Checkpoint;

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}
fn default_init() -> f64 {
    0.02
}

/// The fields of a Llama config.json the engine uses (defaults as transformers').
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// The classifier reads the last token that is not this id (transformers' pooling).
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl Config {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn validate(&self, dir: &Path) -> Result<()> {
        let where_ = dir.join("config.json");
        if self.attention_bias || self.mlp_bias {
            bail!(
                Model,
                "{}: attention_bias / mlp_bias are not supported",
                where_.display()
            );
        }
        if self.num_attention_heads == 0 {
            bail!(
                Model,
                "{}: num_attention_heads must be at least 1",
                where_.display()
            );
        }
        crate::models::validate_dims(
            &where_,
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.kv_heads(),
            self.head_dim(),
        )?;
        Ok(())
    }
}

struct DecoderLayer {
    input_norm: RmsNorm,
    attn: AttentionBlock,
    post_attn_norm: RmsNorm,
    mlp: MlpBlock,
}

impl DecoderLayer {
    /// `x → s + mlp(post_attn_norm(s))` with `s = x + attn(input_norm(x))`.
    fn forward<'a>(&'a self, g: &mut Graph<'a>, x: &Var, ctx: &LayerCtx) -> Result<Var> {
        let h = g.rms_norm(x, &self.input_norm)?;
        let a = self.attn.forward(g, &h, ctx)?;
        let (x, h) = g.add_rms_norm(x, &a, &self.post_attn_norm)?;
        let f = self.mlp.forward(g, &h)?;
        g.add(&x, &f)
    }
}

/// A loaded Llama classifier.
pub struct Llama {
    pub config: Config,
    pub info: ModelInfo,
    embed: Tensor,
    /// Activation dtype.
    dtype: DType,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    score: Linear,
    inv_freq: Vec<f32>,
}

impl Llama {
    pub(crate) fn load(
        dir: &Path,
        raw: &serde_json::Value,
        ck: &Checkpoint,
        opts: &LoadOptions,
        adapter: Option<&mut Adapter>,
    ) -> Result<Self> {
        let cfg: Config = parse_config(dir, raw)?;
        cfg.validate(dir)?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
        let eps = cfg.rms_norm_eps as f32;
        let act = Gate::from_name(&cfg.hidden_act)?;
        let inv_freq = RopeSpec::parse(raw, "full_attention", 10000.0)?.inv_freq(hd);
        let params = AttentionParams {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            scale: (hd as f64).powf(-0.5) as f32,
            softcap: None,
            window: None,
        };

        let mut w = WeightLoader::new(ck, opts, adapter)?;
        let embed = w.embedding(cfg.vocab_size, h)?;
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("layers.{i}");
            layers.push(DecoderLayer {
                input_norm: w.norm(&format!("{p}.input_layernorm"), h, eps, NormKind::Weight)?,
                attn: AttentionBlock::load(&mut w, &p, h, params, 0)?,
                post_attn_norm: w.norm(
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    eps,
                    NormKind::Weight,
                )?,
                mlp: MlpBlock::load(&mut w, &p, h, cfg.intermediate_size, act)?,
            });
        }
        let norm = w.norm("norm", h, eps, NormKind::Weight)?;
        let (score, score_source) = w.score(h, cfg.initializer_range)?;
        let info = ModelInfo {
            model_type: "llama".into(),
            vocab_size: cfg.vocab_size,
            hidden_size: h,
            num_layers: cfg.num_hidden_layers,
            eos_token_id: cfg.eos_token_id.as_ref().and_then(TokenIds::first),
            pad_token_id: cfg.pad_token_id,
            weight_bytes: w.weight_bytes,
            parameters: w.parameters,
            score_source,
        };
        let dtype = w.dtype;
        Ok(Llama {
            config: cfg,
            info,
            embed,
            dtype,
            layers,
            norm,
            score,
            inv_freq,
        })
    }

    /// The forward pass on `g` (recording when training): class logits `[rows, 3]` (f32).
    pub(crate) fn forward_graph<'a>(
        &'a self,
        g: &mut Graph<'a>,
        batch: &TokenBatch,
    ) -> Result<Var> {
        let ctx = layer_ctx(
            &batch.layout,
            std::slice::from_ref(&self.inv_freq),
            self.embed.device(),
        )?;
        let mut x = g.embed(&self.embed, &batch.ids, 1.0, self.dtype)?;
        for layer in &self.layers {
            let ctx = ctx.clone();
            x = g.checkpoint(&x, move |g, x| layer.forward(g, x, &ctx))?;
        }
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
