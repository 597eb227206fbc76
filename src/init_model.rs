//! `engine init-model`: random-initialised model directories in Hugging Face layout, so
//! pipelines, tests and benchmarks run without downloads.
//!
//! Presets: `tiny` (a few hundred thousand parameters) and `small` (~100M), both with the
//! bundled byte-level BPE tokenizer, `gemma-2-9b` and `llama-3.1-8b` (the real shapes; bring the real tokenizer with
//! `--tokenizer` if you need text). Weights are drawn as transformers initialises them —
//! projections and embeddings N(0, initializer_range), Gemma norms 0 (gain 1 + w), Llama norms
//! 1 — from a seeded generator, chunk by chunk and in parallel, so a 9B model is written
//! shard by shard without ever being held whole in memory. The checkpoint is a
//! sequence-classification one (`score.weight` included).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde_json::json;

use crate::bail;
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::tensor::DType;
use crate::weights::save_safetensors;

/// The tokenizer shipped with the `tiny` preset (vocabulary of 1024).
pub const TINY_TOKENIZER: &[u8] = include_bytes!("../assets/tiny/tokenizer.json");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Gemma2,
    Llama,
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "gemma2" => Ok(Arch::Gemma2),
            "llama" => Ok(Arch::Llama),
            _ => Err(format!("unknown arch `{s}` (expected gemma2 or llama)")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Tiny,
    /// ~100M parameters with the tiny tokenizer: big enough for meaningful CPU throughput.
    Small,
    Gemma2_9b,
    Llama31_8b,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            "gemma-2-9b" => Ok(Preset::Gemma2_9b),
            "llama-3.1-8b" => Ok(Preset::Llama31_8b),
            _ => Err(format!(
                "unknown preset `{s}` (expected tiny, small, gemma-2-9b or llama-3.1-8b)"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct InitOptions {
    pub arch: Option<Arch>,
    pub preset: Preset,
    pub out: PathBuf,
    pub seed: u64,
    /// Storage dtype (default: f32 for tiny and small, bf16 otherwise).
    pub dtype: Option<DType>,
    /// A tokenizer.json to copy into the directory (the tiny preset brings its own).
    pub tokenizer: Option<PathBuf>,
    /// Largest shard in bytes before the checkpoint is split.
    pub max_shard_bytes: usize,
}

/// config.json for an (arch, preset) pair.
pub fn config_json(arch: Arch, preset: Preset, dtype: DType) -> Result<serde_json::Value> {
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
    };
    let labels = json!({"0": "winner_model_a", "1": "winner_model_b", "2": "winner_tie"});
    let label2id = json!({"winner_model_a": 0, "winner_model_b": 1, "winner_tie": 2});
    let v = match (arch, preset) {
        (Arch::Gemma2, Preset::Tiny | Preset::Small | Preset::Gemma2_9b) => {
            let (vocab, h, inter, layers, heads, kv, hd, window) = match preset {
                Preset::Tiny => (1024, 64, 128, 4, 4, 2, 32, 32),
                Preset::Small => (1024, 768, 3072, 12, 12, 4, 64, 256),
                _ => (256000, 3584, 14336, 42, 16, 8, 256, 4096),
            };
            json!({
                "architectures": ["Gemma2ForSequenceClassification"],
                "model_type": "gemma2",
                "vocab_size": vocab, "hidden_size": h, "intermediate_size": inter,
                "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                "head_dim": hd, "query_pre_attn_scalar": hd,
                "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "attention_bias": false, "attention_dropout": 0.0,
                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                "sliding_window": window, "initializer_range": 0.02,
                "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
                "tie_word_embeddings": true, "torch_dtype": torch_dtype,
                "id2label": labels, "label2id": label2id,
            })
        }
        (Arch::Llama, Preset::Tiny | Preset::Small | Preset::Llama31_8b) => {
            let (vocab, h, inter, layers, heads, kv, orig) = match preset {
                Preset::Tiny => (1024, 64, 176, 4, 4, 2, 64),
                Preset::Small => (1024, 768, 3072, 12, 12, 4, 256),
                _ => (128256, 4096, 14336, 32, 32, 8, 8192),
            };
            let (bos, eos, pad) = if preset != Preset::Llama31_8b {
                (json!(2), json!([1]), json!(0))
            } else {
                (
                    json!(128000),
                    json!([128001, 128008, 128009]),
                    serde_json::Value::Null,
                )
            };
            json!({
                "architectures": ["LlamaForSequenceClassification"],
                "model_type": "llama",
                "vocab_size": vocab, "hidden_size": h, "intermediate_size": inter,
                "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                "head_dim": h / heads, "hidden_act": "silu",
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                "rope_scaling": {
                    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": orig
                },
                "attention_bias": false, "attention_dropout": 0.0, "mlp_bias": false,
                "initializer_range": 0.02, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
                "tie_word_embeddings": false, "torch_dtype": torch_dtype,
                "id2label": labels, "label2id": label2id,
            })
        }
        (a, p) => bail!(Usage, "preset {p:?} is not a {a:?} model"),
    };
    Ok(v)
}

/// How a tensor is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    Normal(f32),
    Const(f32),
}

/// Names, shapes and initialisation of every tensor of the model described by `cfg`.
fn tensor_plan(arch: Arch, cfg: &serde_json::Value) -> Result<Vec<(String, Vec<usize>, Init)>> {
    let get = |k: &str| -> Result<usize> {
        cfg.get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| Error::Model(format!("config: no `{k}`")))
    };
    let (vocab, h, inter, layers) = (
        get("vocab_size")?,
        get("hidden_size")?,
        get("intermediate_size")?,
        get("num_hidden_layers")?,
    );
    let (heads, kv, hd) = (
        get("num_attention_heads")?,
        get("num_key_value_heads")?,
        get("head_dim")?,
    );
    let std = cfg
        .get("initializer_range")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.02) as f32;
    let norm_init = match arch {
        Arch::Gemma2 => Init::Const(0.0),
        Arch::Llama => Init::Const(1.0),
    };
    let n = Init::Normal(std);
    let mut plan = vec![("model.embed_tokens.weight".to_string(), vec![vocab, h], n)];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        plan.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![heads * hd, h],
            n,
        ));
        plan.push((format!("{p}.self_attn.k_proj.weight"), vec![kv * hd, h], n));
        plan.push((format!("{p}.self_attn.v_proj.weight"), vec![kv * hd, h], n));
        plan.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, heads * hd],
            n,
        ));
        plan.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, h], n));
        plan.push((format!("{p}.mlp.up_proj.weight"), vec![inter, h], n));
        plan.push((format!("{p}.mlp.down_proj.weight"), vec![h, inter], n));
        let norms: &[&str] = match arch {
            Arch::Gemma2 => &[
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ],
            Arch::Llama => &["input_layernorm", "post_attention_layernorm"],
        };
        for norm in norms {
            plan.push((format!("{p}.{norm}.weight"), vec![h], norm_init));
        }
    }
    plan.push(("model.norm.weight".to_string(), vec![h], norm_init));
    plan.push((
        "score.weight".to_string(),
        vec![crate::models::NUM_LABELS, h],
        n,
    ));
    Ok(plan)
}

/// A 64-bit FNV-1a hash, to derive one seed per tensor name.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Little-endian bytes of a freshly initialised tensor.
fn generate(name: &str, numel: usize, init: Init, dtype: DType, seed: u64) -> Vec<u8> {
    const CHUNK: usize = 1 << 16;
    let esize = dtype.size_in_bytes();
    let mut bytes = vec![0u8; numel * esize];
    let tseed = seed ^ fnv1a(name);
    bytes
        .par_chunks_mut(CHUNK * esize)
        .enumerate()
        .for_each(|(c, out)| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                tseed.wrapping_add((c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            );
            for o in out.chunks_mut(esize) {
                let v = match init {
                    Init::Normal(std) => {
                        let z: f32 = StandardNormal.sample(&mut rng);
                        z * std
                    }
                    Init::Const(c) => c,
                };
                match dtype {
                    DType::F32 => o.copy_from_slice(&v.to_le_bytes()),
                    DType::BF16 => o.copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes()),
                    DType::F16 => o.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes()),
                }
            }
        });
    bytes
}

/// Write the model directory; returns the number of parameters.
pub fn run(opts: &InitOptions) -> Result<usize> {
    // Build the directory beside its destination and move it into place at the end, so a
    // failure never leaves a mix of old and new shards that would still load.
    let parent = match opts.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = opts
        .out
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: not a directory path", opts.out.display())))?;
    let staging = parent.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let result = write_dir(opts, &staging);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
        return result;
    }
    if opts.out.exists() {
        let old = parent.join(format!(
            ".{}.old{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::rename(&opts.out, &old).map_err(|e| Error::io(&opts.out, e))?;
        std::fs::rename(&staging, &opts.out).map_err(|e| Error::io(&opts.out, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&staging, &opts.out).map_err(|e| Error::io(&opts.out, e))?;
    }
    result
}

/// Write every file of the model directory into `out`; returns the number of parameters.
fn write_dir(opts: &InitOptions, out: &Path) -> Result<usize> {
    let arch = opts.arch.unwrap_or(match opts.preset {
        Preset::Tiny | Preset::Small | Preset::Gemma2_9b => Arch::Gemma2,
        Preset::Llama31_8b => Arch::Llama,
    });
    let dtype = opts
        .dtype
        .unwrap_or(if matches!(opts.preset, Preset::Tiny | Preset::Small) {
            DType::F32
        } else {
            DType::BF16
        });
    let cfg = config_json(arch, opts.preset, dtype)?;
    let plan = tensor_plan(arch, &cfg)?;
    let params: usize = plan
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum();

    // Group tensors into shards of at most max_shard_bytes (a bigger tensor gets its own).
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0usize;
    for (i, (_, shape, _)) in plan.iter().enumerate() {
        let b = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if cur > 0 && cur + b > opts.max_shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        cur += b;
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (si, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", si + 1)
        };
        let tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)> = shard
            .iter()
            .map(|&i| {
                let (name, shape, init) = &plan[i];
                let bytes = generate(name, shape.iter().product(), *init, dtype, opts.seed);
                (name.clone(), dtype, shape.clone(), bytes)
            })
            .collect();
        for (name, ..) in &tensors {
            weight_map.insert(name.clone(), file.clone());
        }
        let meta = [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect();
        save_safetensors(&out.join(&file), &tensors, Some(meta))?;
    }
    if n > 1 {
        let total: usize = params * dtype.size_in_bytes();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_atomic(
            &out.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )?;
    }
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    let tok_dst = out.join("tokenizer.json");
    match (&opts.tokenizer, opts.preset) {
        (Some(src), _) => copy_tokenizer(src, &tok_dst)?,
        (None, Preset::Tiny | Preset::Small) => write_atomic(&tok_dst, TINY_TOKENIZER)?,
        (None, _) => eprintln!(
            "note: no tokenizer written for preset {:?}; pass --tokenizer FILE to include the real one",
            opts.preset
        ),
    }
    Ok(params)
}

fn copy_tokenizer(src: &Path, dst: &Path) -> Result<()> {
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
    write_atomic(dst, &bytes)
}
