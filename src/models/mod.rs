//! The two backbones as 3-way sequence classifiers, and what they share: config parsing,
//! weight loading (quantisation and LoRA at load), the RoPE frequency spec and the score head.
//!
//! Each backbone lives in its own file with a `Config` mirroring Hugging Face's config.json
//! and small structs (`Attention`, `Mlp`, `DecoderLayer`, the model) built from a checkpoint
//! and run by `forward`. Forward passes are written once against [`crate::ops`], which
//! dispatch on the tensors' device.

pub(crate) mod blocks;
pub mod gemma2;
pub mod llama;

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::Deserialize;

use crate::autograd::{Graph, Var};
use crate::bail;
use crate::data::batch::TokenBatch;
use crate::error::{Error, Result};
use crate::lora::Adapter;
use crate::ops::linear::{BaseWeight, Linear, Lora};
use crate::ops::norm::{NormKind, RmsNorm};
use crate::quant::nf4::Nf4Tensor;
use crate::tensor::{DType, Device, Tensor};
use crate::weights::Checkpoint;

/// Number of classes of the arena task: A wins, B wins, tie.
pub const NUM_LABELS: usize = 3;

/// How base projection weights are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    /// Keep the checkpoint dtype.
    None,
    /// NF4 (bitsandbytes-compatible), optionally with double-quantised absmax.
    Nf4 { double_quant: bool },
}

/// What a model load needs besides the directory.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// Activation dtype: f32 on the CPU; on a GPU bf16 where it has bf16 tensor cores (sm_80+)
    /// and f16 otherwise, unless set.
    pub dtype: Option<DType>,
    pub quant: Quant,
    /// A PEFT LoRA adapter directory.
    pub adapter: Option<PathBuf>,
    /// Seed for a score head the checkpoint lacks.
    pub seed: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: None,
            quant: Quant::None,
            adapter: None,
            seed: 0,
        }
    }
}

/// Facts about a loaded model the rest of the pipeline needs.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// The id appended after the text (the first one if config.json lists several).
    pub eos_token_id: Option<u32>,
    /// The classifier pools at the last token whose id differs from this one.
    pub pad_token_id: Option<u32>,
    /// Bytes held by weights (after quantisation).
    pub weight_bytes: usize,
    /// Parameters of the base model (embedding and score head included).
    pub parameters: usize,
    /// Where the score head came from (checkpoint, adapter, or random).
    pub score_source: String,
}

/// A loaded classifier.
pub enum Model {
    Gemma2(gemma2::Gemma2),
    Llama(llama::Llama),
}

impl Model {
    /// Class logits `[rows, 3]` (f32) for a packed batch.
    pub fn forward(&self, batch: &TokenBatch) -> Result<Tensor> {
        let mut g = Graph::inference();
        Ok(self.forward_graph(&mut g, batch)?.into_tensor())
    }

    /// The forward pass on a graph: recording it when `g` trains.
    pub fn forward_graph<'a>(&'a self, g: &mut Graph<'a>, batch: &TokenBatch) -> Result<Var> {
        match self {
            Model::Gemma2(m) => m.forward_graph(g, batch),
            Model::Llama(m) => m.forward_graph(g, batch),
        }
    }

    pub fn info(&self) -> &ModelInfo {
        match self {
            Model::Gemma2(m) => &m.info,
            Model::Llama(m) => &m.info,
        }
    }

    /// Every base projection (with its Hugging Face module path) and the score head.
    pub fn linears(&self) -> (Vec<(String, &Linear)>, &Linear) {
        match self {
            Model::Gemma2(m) => m.linears(),
            Model::Llama(m) => m.linears(),
        }
    }

    pub fn linears_mut(&mut self) -> (Vec<(String, &mut Linear)>, &mut Linear) {
        match self {
            Model::Gemma2(m) => m.linears_mut(),
            Model::Llama(m) => m.linears_mut(),
        }
    }

    /// The trainable tensors in a fixed order — every LoRA `A` then `B`, layer by layer, then
    /// the score head — under the key PEFT saves each one as.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        let (linears, score) = self.linears();
        let mut out = Vec::new();
        for (module, l) in linears {
            if let Some(lora) = &l.lora {
                out.push((
                    format!("base_model.model.{module}.lora_A.weight"),
                    lora.a.clone(),
                ));
                out.push((
                    format!("base_model.model.{module}.lora_B.weight"),
                    lora.b.clone(),
                ));
            }
        }
        if let BaseWeight::Dense(w) = &score.weight {
            out.push((SCORE_KEY.to_string(), w.clone()));
        }
        out
    }

    /// Replace the trainable tensors (same order and shapes as [`Model::trainable`]).
    pub fn set_trainable(&mut self, values: Vec<Tensor>) -> Result<()> {
        let mut values = values.into_iter();
        let mut next = |like: &Tensor, what: &str| -> Result<Tensor> {
            let v = values
                .next()
                .ok_or_else(|| Error::Shape(format!("set_trainable: no value for {what}")))?;
            if v.shape() != like.shape() {
                bail!(
                    Shape,
                    "set_trainable: {what} is {:?}, got {:?}",
                    like.shape(),
                    v.shape()
                );
            }
            Ok(v)
        };
        let (linears, score) = self.linears_mut();
        for (module, l) in linears {
            if let Some(lora) = &mut l.lora {
                lora.a = next(&lora.a, &module)?;
                lora.b = next(&lora.b, &module)?;
            }
        }
        if let BaseWeight::Dense(w) = &mut score.weight {
            *w = next(w, "score")?;
        }
        Ok(())
    }
}

/// The key of the score head in a PEFT SEQ_CLS adapter (saved through `modules_to_save`).
pub const SCORE_KEY: &str = "base_model.model.score.weight";

/// Read `dir/config.json` as JSON.
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Model(format!("{}: invalid JSON: {e}", path.display())))
}

/// Parse a config value into a backbone's `Config`, naming the file on error.
pub(crate) fn parse_config<T: for<'de> Deserialize<'de>>(
    dir: &Path,
    value: &serde_json::Value,
) -> Result<T> {
    T::deserialize(value)
        .map_err(|e| Error::Model(format!("{}: {e}", dir.join("config.json").display())))
}

/// What the data path needs to know about a model before its weights are read (so a bad
/// tokenizer or --max-length fails in a second, not after loading gigabytes).
#[derive(Clone, Debug)]
pub struct ModelHeader {
    pub model_type: String,
    pub vocab_size: usize,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// Read the header fields from `dir/config.json`.
pub fn read_header(dir: &Path) -> Result<ModelHeader> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        model_type: String,
        vocab_size: usize,
        #[serde(default)]
        eos_token_id: Option<TokenIds>,
        #[serde(default)]
        pad_token_id: Option<u32>,
    }
    let raw: Raw = parse_config(dir, &read_config(dir)?)?;
    Ok(ModelHeader {
        model_type: raw.model_type,
        vocab_size: raw.vocab_size,
        eos_token_id: raw.eos_token_id.as_ref().and_then(TokenIds::first),
        pad_token_id: raw.pad_token_id,
    })
}

/// Load the model in `dir` (`model_type` gemma2 or llama) as a classifier.
pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Model> {
    let config = read_config(dir)?;
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let ck = Checkpoint::open_model_dir(dir)?;
    let mut adapter = match &opts.adapter {
        Some(a) => Some(Adapter::load(a)?),
        None => None,
    };
    let model = match model_type {
        "gemma2" => Model::Gemma2(gemma2::Gemma2::load(
            dir,
            &config,
            &ck,
            opts,
            adapter.as_mut(),
        )?),
        "llama" => Model::Llama(llama::Llama::load(
            dir,
            &config,
            &ck,
            opts,
            adapter.as_mut(),
        )?),
        "" => bail!(
            Model,
            "{}: no `model_type`",
            dir.join("config.json").display()
        ),
        other => bail!(
            Model,
            "{}: model_type `{other}` is not supported (expected gemma2 or llama)",
            dir.join("config.json").display()
        ),
    };
    if let Some(a) = &adapter {
        a.check_all_used()?;
    }
    Ok(model)
}

/// Check a backbone's dimensions before anything is allocated: every size at least 1, query
/// heads a multiple of KV heads, and every weight's element count far from overflowing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn validate_dims(
    config: &Path,
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<()> {
    let named = [
        ("vocab_size", vocab),
        ("hidden_size", hidden),
        ("intermediate_size", intermediate),
        ("num_hidden_layers", layers),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv_heads),
        ("head_dim", head_dim),
    ];
    for (name, v) in named {
        if v == 0 || v > 1 << 24 {
            bail!(Model, "{}: {name} = {v} is out of range", config.display());
        }
    }
    if !heads.is_multiple_of(kv_heads) {
        bail!(
            Model,
            "{}: {heads} attention heads cannot share {kv_heads} KV heads",
            config.display()
        );
    }
    let biggest = [
        vocab * hidden,
        intermediate * hidden,
        heads * head_dim * hidden,
    ];
    if biggest.iter().any(|&n| n > 1 << 36) || layers > 4096 {
        bail!(
            Model,
            "{}: the dimensions describe a model too large to be real",
            config.display()
        );
    }
    Ok(())
}

/// `eos_token_id` as config.json writes it: one id or a list (the first one is used).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn first(&self) -> Option<u32> {
        match self {
            TokenIds::One(i) => Some(*i),
            TokenIds::Many(v) => v.first().copied(),
        }
    }
}

/// Rotary frequencies of a layer, from either config key style.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeSpec {
    Default {
        theta: f64,
    },
    Llama3 {
        theta: f64,
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: f32,
    },
}

impl RopeSpec {
    /// Parse from config.json: the newer `rope_parameters` object (possibly keyed by layer
    /// type), or the classic top-level `rope_theta` plus optional `rope_scaling`.
    pub fn parse(config: &serde_json::Value, layer_type: &str, default_theta: f64) -> Result<Self> {
        let mut params = config.get("rope_parameters").filter(|v| v.is_object());
        if let Some(p) = params
            && let Some(per_type) = p.get(layer_type).filter(|v| v.is_object())
        {
            params = Some(per_type);
        }
        let scaling = config.get("rope_scaling").filter(|v| v.is_object());
        let top_theta = config.get("rope_theta").and_then(|v| v.as_f64());
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .or(top_theta)
            .unwrap_or(default_theta);
        let spec = params.or(scaling);
        let kind = spec
            .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        match kind {
            "default" => Ok(RopeSpec::Default { theta }),
            "llama3" => {
                let Some(s) = spec else {
                    unreachable!("kind came from spec")
                };
                let num = |k: &str| -> Result<f32> {
                    s.get(k)
                        .and_then(|v| v.as_f64())
                        .map(|v| v as f32)
                        .ok_or_else(|| {
                            Error::Model(format!(
                                "config.json: llama3 rope scaling needs a numeric `{k}`"
                            ))
                        })
                };
                Ok(RopeSpec::Llama3 {
                    theta,
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position: num("original_max_position_embeddings")?,
                })
            }
            other => bail!(
                Model,
                "config.json: rope type `{other}` is not supported (expected default or llama3)"
            ),
        }
    }

    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        use crate::ops::rope::{default_inv_freq, llama3_inv_freq};
        match *self {
            RopeSpec::Default { theta } => default_inv_freq(head_dim, theta),
            RopeSpec::Llama3 {
                theta,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => llama3_inv_freq(
                &default_inv_freq(head_dim, theta),
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            ),
        }
    }
}

/// The activation dtype a load resolves to on its device.
pub fn activation_dtype(opts: &LoadOptions) -> Result<DType> {
    match (opts.device, opts.dtype) {
        (Device::Cpu, None | Some(DType::F32)) => Ok(DType::F32),
        (Device::Cpu, Some(d)) => bail!(Usage, "the CPU backend computes in f32, not {}", d.name()),
        (Device::Cuda(_), Some(DType::F32)) => {
            bail!(
                Usage,
                "the CUDA backend computes in bf16 or f16 (tensor cores), not f32"
            )
        }
        (Device::Cuda(i), Some(d)) => {
            if d == DType::BF16 && !crate::cuda::device(i)?.has_bf16() {
                bail!(Usage, "cuda:{i} has no bf16 tensor cores (sm_75): use f16");
            }
            Ok(d)
        }
        (Device::Cuda(i), None) => Ok(if crate::cuda::device(i)?.has_bf16() {
            DType::BF16
        } else {
            DType::F16
        }),
    }
}

/// Builds layers from a checkpoint: finds tensors by name under the checkpoint's prefix,
/// checks shapes, quantises the base projections, attaches the adapter's LoRA and places
/// everything on the target device (projections and LoRA in the activation dtype or NF4,
/// norms and the score head in f32, the embedding table in its stored dtype).
pub(crate) struct WeightLoader<'a> {
    pub ck: &'a Checkpoint,
    /// `model.` for causal-LM and sequence-classification checkpoints, empty for bare ones.
    pub prefix: String,
    pub opts: &'a LoadOptions,
    pub dtype: DType,
    pub adapter: Option<&'a mut Adapter>,
    pub weight_bytes: usize,
    pub parameters: usize,
}

impl<'a> WeightLoader<'a> {
    pub fn new(
        ck: &'a Checkpoint,
        opts: &'a LoadOptions,
        adapter: Option<&'a mut Adapter>,
    ) -> Result<Self> {
        let prefix = if ck.contains("model.embed_tokens.weight") {
            "model.".to_string()
        } else if ck.contains("embed_tokens.weight") {
            String::new()
        } else {
            bail!(
                Model,
                "{}: missing tensor `model.embed_tokens.weight`",
                ck.dir().display()
            )
        };
        let dtype = activation_dtype(opts)?;
        Ok(WeightLoader {
            ck,
            prefix,
            opts,
            dtype,
            adapter,
            weight_bytes: 0,
            parameters: 0,
        })
    }

    fn count(&mut self, t: &Tensor) {
        self.weight_bytes += t.elem_count() * t.dtype().size_in_bytes();
        self.parameters += t.elem_count();
    }

    /// The embedding table: its stored dtype on the CPU; the activation dtype on a GPU (as
    /// transformers holds it when loaded in bf16: half the memory of an f32 table, and the
    /// same rounding before the Gemma scale).
    pub fn embedding(&mut self, vocab: usize, hidden: usize) -> Result<Tensor> {
        let name = format!("{}embed_tokens.weight", self.prefix);
        let t = self.ck.load(&name, &[vocab, hidden])?;
        let t = match self.opts.device {
            Device::Cpu => t,
            dev => t.to_dtype(self.dtype)?.to_device(dev)?,
        };
        self.count(&t);
        Ok(t)
    }

    /// An RMSNorm weight (`module` relative to the prefix, e.g. `layers.0.input_layernorm`).
    pub fn norm(
        &mut self,
        module: &str,
        hidden: usize,
        eps: f32,
        kind: NormKind,
    ) -> Result<RmsNorm> {
        let name = format!("{}{module}.weight", self.prefix);
        let weight = self
            .ck
            .load_as(&name, &[hidden], DType::F32)?
            .to_device(self.opts.device)?;
        self.count(&weight);
        Ok(RmsNorm { weight, eps, kind })
    }

    /// A quantisable projection `[out, inp]` with the adapter's LoRA, if it has one for it.
    pub fn projection(&mut self, module: &str, out: usize, inp: usize) -> Result<Linear> {
        let name = format!("{}{module}.weight", self.prefix);
        let t = self.ck.load(&name, &[out, inp])?;
        let w = match (self.opts.quant, self.opts.device) {
            (Quant::None, Device::Cpu) => BaseWeight::Dense(t),
            (Quant::None, dev) => BaseWeight::Dense(t.to_dtype(self.dtype)?.to_device(dev)?),
            (Quant::Nf4 { double_quant }, Device::Cpu) => BaseWeight::Nf4(
                Nf4Tensor::quantize(t.cpu_storage()?, &[out, inp], double_quant)
                    .map_err(|e| e.context(format!("quantising `{name}`")))?,
            ),
            // On a GPU the checkpoint tensor is uploaded in its stored dtype and quantised
            // there (bit-identical to the CPU quantiser), one tensor at a time.
            (Quant::Nf4 { double_quant }, dev) => BaseWeight::Nf4Cuda(std::sync::Arc::new(
                crate::ops::linear::quantize_nf4(&t.to_device(dev)?, double_quant)
                    .map_err(|e| e.context(format!("quantising `{name}` on {dev}")))?,
            )),
        };
        self.weight_bytes += w.nbytes();
        self.parameters += out * inp;
        // LoRA keys use the Hugging Face module path, always under `model.`.
        let lora = match self.adapter.as_deref_mut() {
            Some(a) => a.take_lora(&format!("model.{module}"), out, inp)?,
            None => None,
        };
        let lora = match lora {
            Some(l) => Some(Lora {
                a: l.a.to_dtype(self.dtype)?.to_device(self.opts.device)?,
                b: l.b.to_dtype(self.dtype)?.to_device(self.opts.device)?,
                scale: l.scale,
            }),
            None => None,
        };
        Linear::new(w, lora)
    }

    /// The `[3, hidden]` score head (f32): from the adapter (`modules_to_save`), else the
    /// checkpoint's `score.weight`, else seeded N(0, initializer_range) with a warning.
    pub fn score(&mut self, hidden: usize, initializer_range: f64) -> Result<(Linear, String)> {
        let (t, source) = self.score_weight(hidden, initializer_range)?;
        let t = t.to_device(self.opts.device)?;
        Ok((Linear::new(BaseWeight::Dense(t), None)?, source))
    }

    fn score_weight(&mut self, hidden: usize, initializer_range: f64) -> Result<(Tensor, String)> {
        let shape = [NUM_LABELS, hidden];
        if let Some(a) = self.adapter.as_deref_mut()
            && let Some(t) = a.take_score(hidden)?
        {
            self.parameters += t.elem_count();
            return Ok((t, format!("adapter {}", a.dir().display())));
        }
        if let Ok(e) = self.ck.entry("score.weight") {
            if e.shape.len() == 2 && e.shape[1] == hidden && e.shape[0] != NUM_LABELS {
                bail!(
                    Model,
                    "{}: `score.weight` has {} labels; the arena classifier needs {NUM_LABELS}",
                    self.ck.dir().display(),
                    e.shape[0]
                );
            }
            let t = self.ck.load_as("score.weight", &shape, DType::F32)?;
            self.count(&t);
            return Ok((t, "checkpoint".to_string()));
        }
        eprintln!(
            "warning: {} has no score head (`score.weight`) and no adapter supplies one; \
             initialising it from N(0, {initializer_range}) with seed {} — predictions are not meaningful until it is trained",
            self.ck.dir().display(),
            self.opts.seed
        );
        let t = random_normal(&shape, initializer_range, self.opts.seed)?;
        self.count(&t);
        Ok((t, format!("random (seed {})", self.opts.seed)))
    }
}

/// `x` as a tensor of `dtype` would hold it (the value transformers computes a scalar
/// constant in, e.g. Gemma's √hidden in bf16).
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
    }
}

/// An f32 tensor of N(0, std) values from a seeded generator.
pub fn random_normal(shape: &[usize], std: f64, seed: u64) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f64, std)
        .map_err(|e| Error::Model(format!("initializer_range {std}: {e}")))?;
    let n: usize = shape.iter().product();
    Tensor::from_f32(
        (0..n).map(|_| normal.sample(&mut rng) as f32).collect(),
        shape,
    )
}

/// Softmax of each row of `[rows, 3]` logits, in f64.
pub fn probabilities(logits: &Tensor) -> Result<Vec<[f64; NUM_LABELS]>> {
    let (rows, c) = logits.dims2()?;
    if c != NUM_LABELS {
        bail!(Shape, "expected {NUM_LABELS} logits per row, found {c}");
    }
    let l = logits.to_f32_vec()?;
    Ok((0..rows)
        .map(|r| {
            let row = &l[r * c..(r + 1) * c];
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let e: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            [e[0] / s, e[1] / s, e[2] / s]
        })
        .collect())
}
