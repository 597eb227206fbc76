//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, as PEFT writes them
//! for `task_type: SEQ_CLS`.
//!
//! Keys look like `base_model.model.<module>.lora_A.weight` (`[r, in]`) and
//! `base_model.model.<module>.lora_B.weight` (`[out, r]`), where `<module>` is the Hugging Face
//! module path (`model.layers.3.self_attn.q_proj`); the score head saved through
//! `modules_to_save` appears as `base_model.model.score.weight`. The LoRA scale is
//! `lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`; `rank_pattern` / `alpha_pattern`
//! override r and alpha per module. Which modules carry LoRA is read from the weights
//! themselves (they reflect `target_modules` and `layers_to_transform`); a weight for a module
//! the model does not have is an error, as is a shape that does not fit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bail;
use crate::error::{Error, Result};
use crate::models::NUM_LABELS;
use crate::ops::linear::Lora;
use crate::tensor::{DType, Tensor};
use crate::weights::Checkpoint;

/// `target_modules`: a list of names or one regular expression.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

/// `layers_to_transform`: one layer index or a list.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum LayerList {
    One(usize),
    Many(Vec<usize>),
}

impl LayerList {
    pub fn to_vec(&self) -> Vec<usize> {
        match self {
            LayerList::One(i) => vec![*i],
            LayerList::Many(v) => v.clone(),
        }
    }
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_bias() -> String {
    "none".into()
}

/// The fields of adapter_config.json that change the computation.
#[derive(Clone, Debug, Deserialize)]
pub struct AdapterConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub layers_to_transform: Option<LayerList>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Per-module rank overrides, in file order (the first matching key wins, as in PEFT).
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    /// Per-module alpha overrides, in file order.
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    /// Activated LoRA (aLoRA) changes which tokens the adapter applies to; not supported.
    #[serde(default)]
    pub alora_invocation_tokens: Option<serde_json::Value>,
}

/// A `rank_pattern` / `alpha_pattern` key compiled the way PEFT matches it:
/// `re.match(rf"(.*\.)?({key})$", module)`.
struct Pattern<T> {
    re: regex::Regex,
    value: T,
}

fn compile_patterns<T>(
    file: &Path,
    field: &str,
    map: &serde_json::Map<String, serde_json::Value>,
    value: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<Vec<Pattern<T>>> {
    map.iter()
        .map(|(key, v)| {
            let re = regex::Regex::new(&format!("^(.*\\.)?({key})$")).map_err(|e| {
                Error::Model(format!(
                    "{}: {field} key `{key}` is not a valid pattern: {e}",
                    file.display()
                ))
            })?;
            let value = value(v).ok_or_else(|| {
                Error::Model(format!(
                    "{}: {field}[`{key}`] = {v} is not a valid value",
                    file.display()
                ))
            })?;
            Ok(Pattern { re, value })
        })
        .collect()
}

fn first_match<T: Copy>(patterns: &[Pattern<T>], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|p| p.re.is_match(module))
        .map(|p| p.value)
}

/// Every LoRA weight must belong to a module the adapter's own config targets
/// (`target_modules`, matched as PEFT does: a list entry equal to the module's last name, or a
/// pattern that matches the whole path) on a layer it transforms (`layers_to_transform`).
fn check_targets<'k>(
    cfg_path: &Path,
    cfg: &AdapterConfig,
    modules: impl Iterator<Item = &'k String>,
) -> Result<()> {
    let pattern = match &cfg.target_modules {
        Some(TargetModules::Pattern(p)) => {
            Some(regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                Error::Model(format!("{}: target_modules `{p}`: {e}", cfg_path.display()))
            })?)
        }
        _ => None,
    };
    let layers = cfg.layers_to_transform.as_ref().map(LayerList::to_vec);
    for m in modules {
        let last = m.rsplit('.').next().unwrap_or(m);
        let targeted = match (&cfg.target_modules, &pattern) {
            (Some(TargetModules::List(l)), _) => {
                l.iter().any(|t| t == last || m.ends_with(&format!(".{t}")))
            }
            (_, Some(re)) => re.is_match(m),
            _ => true,
        };
        let layer = m
            .split('.')
            .skip_while(|p| *p != "layers")
            .nth(1)
            .and_then(|i| i.parse::<usize>().ok());
        let in_layers = match (&layers, layer) {
            (Some(ls), Some(l)) => ls.contains(&l),
            _ => true,
        };
        if !targeted || !in_layers {
            bail!(
                Model,
                "{}: the adapter has LoRA weights for `{m}`, which its config does not target \
                 (target_modules {:?}, layers_to_transform {:?})",
                cfg_path.display(),
                cfg.target_modules,
                layers
            );
        }
    }
    Ok(())
}

/// A loaded adapter whose pieces are handed out to the layers as the model is built.
pub struct Adapter {
    dir: PathBuf,
    pub config: AdapterConfig,
    /// module path → (A, B), removed as layers claim them.
    loras: HashMap<String, (Tensor, Tensor)>,
    score: Option<Tensor>,
    rank_pattern: Vec<Pattern<usize>>,
    alpha_pattern: Vec<Pattern<f64>>,
}

impl Adapter {
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: {e}", cfg_path.display())))?;
        let bad = |msg: String| Err(Error::Model(format!("{}: {msg}", cfg_path.display())));
        if config.peft_type != "LORA" {
            return bad(format!(
                "peft_type `{}` is not supported (expected LORA)",
                config.peft_type
            ));
        }
        if config.use_dora {
            return bad("DoRA adapters (use_dora) are not supported".into());
        }
        if config.bias != "none" {
            return bad(format!(
                "LoRA bias `{}` is not supported (expected none)",
                config.bias
            ));
        }
        if config
            .alora_invocation_tokens
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return bad("activated LoRA (alora_invocation_tokens) is not supported".into());
        }
        if config.fan_in_fan_out {
            return bad(
                "fan_in_fan_out adapters (GPT-2 style Conv1D) do not apply to Gemma-2 or Llama"
                    .into(),
            );
        }
        if config.r == 0 {
            return bad("r must be positive".into());
        }
        if let Some(m) = &config.modules_to_save
            && let Some(other) = m.iter().find(|m| *m != "score" && *m != "classifier")
        {
            return bad(format!(
                "modules_to_save `{other}` is not supported (only the score head)"
            ));
        }

        let weights = dir.join("adapter_model.safetensors");
        if !weights.exists() {
            bail!(
                Model,
                "{}: missing adapter_model.safetensors",
                dir.display()
            );
        }
        let ck = Checkpoint::open_files(dir, &[weights])?;
        let mut a_map: HashMap<String, Tensor> = HashMap::new();
        let mut b_map: HashMap<String, Tensor> = HashMap::new();
        let mut score = None;
        let mut names: Vec<&str> = ck.names().collect();
        names.sort_unstable();
        for name in names {
            let e = ck.entry(name)?;
            let t = ck.load_as(name, &e.shape.clone(), DType::F32)?;
            let key = name.strip_prefix("base_model.model.").unwrap_or(name);
            if let Some(m) = key.strip_suffix(".lora_A.weight") {
                a_map.insert(m.to_string(), t);
            } else if let Some(m) = key.strip_suffix(".lora_B.weight") {
                b_map.insert(m.to_string(), t);
            } else if matches!(
                key,
                "score.weight"
                    | "score.modules_to_save.weight"
                    | "score.modules_to_save.default.weight"
            ) {
                score = Some(t);
            } else {
                bail!(
                    Model,
                    "{}: tensor `{name}` is not a LoRA A/B weight or the score head; this adapter type is not supported",
                    dir.display()
                );
            }
        }
        let mut loras = HashMap::new();
        for (m, a) in a_map {
            let Some(b) = b_map.remove(&m) else {
                bail!(Model, "{}: `{m}` has lora_A but no lora_B", dir.display());
            };
            loras.insert(m, (a, b));
        }
        if let Some(m) = b_map.keys().next() {
            bail!(Model, "{}: `{m}` has lora_B but no lora_A", dir.display());
        }
        check_targets(&cfg_path, &config, loras.keys())?;
        let rank_pattern =
            compile_patterns(&cfg_path, "rank_pattern", &config.rank_pattern, |v| {
                v.as_u64().filter(|&r| r > 0).map(|r| r as usize)
            })?;
        let alpha_pattern =
            compile_patterns(&cfg_path, "alpha_pattern", &config.alpha_pattern, |v| {
                v.as_f64()
            })?;
        Ok(Adapter {
            dir: dir.to_path_buf(),
            config,
            loras,
            score,
            rank_pattern,
            alpha_pattern,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Claim the LoRA of `module` (a Hugging Face module path), checking it fits `[out, inp]`.
    pub fn take_lora(&mut self, module: &str, out: usize, inp: usize) -> Result<Option<Lora>> {
        let Some((a, b)) = self.loras.remove(module) else {
            return Ok(None);
        };
        let cfg = &self.config;
        let r = first_match(&self.rank_pattern, module).unwrap_or(cfg.r);
        let alpha = first_match(&self.alpha_pattern, module).unwrap_or(cfg.lora_alpha);
        if a.shape() != [r, inp] || b.shape() != [out, r] {
            bail!(
                Model,
                "{}: LoRA for `{module}` has A {:?} and B {:?}, but the model's layer is [{out}, {inp}] with r = {r}",
                self.dir.display(),
                a.shape(),
                b.shape()
            );
        }
        let scale = if cfg.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        Ok(Some(Lora {
            a,
            b,
            scale: scale as f32,
        }))
    }

    /// Claim the score head, checking it is `[3, hidden]`.
    pub fn take_score(&mut self, hidden: usize) -> Result<Option<Tensor>> {
        match self.score.take() {
            None => Ok(None),
            Some(t) if t.shape() == [NUM_LABELS, hidden] => Ok(Some(t)),
            Some(t) => bail!(
                Model,
                "{}: the adapter's score head is {:?}; the model needs [{NUM_LABELS}, {hidden}]",
                self.dir.display(),
                t.shape()
            ),
        }
    }

    /// Error if the adapter holds LoRA weights for modules the model never asked for.
    pub fn check_all_used(&self) -> Result<()> {
        if self.loras.is_empty() {
            return Ok(());
        }
        let mut left: Vec<&String> = self.loras.keys().collect();
        left.sort();
        let shown: Vec<&str> = left.iter().take(5).map(|s| s.as_str()).collect();
        bail!(
            Model,
            "{}: the adapter has LoRA weights for {} module(s) the model does not have, e.g. {}; \
             was it trained on another architecture or depth?",
            self.dir.display(),
            left.len(),
            shown.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_peft_in_file_order() {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"self_attn.q_proj": 100, "q_proj": 1, "layers\\.[0-9]\\.mlp\\.up_proj": 7, "k_proj|v_proj": 5, "proj": 3}"#)
                .unwrap();
        let p = compile_patterns(
            Path::new("adapter_config.json"),
            "alpha_pattern",
            &map,
            |v| v.as_f64(),
        )
        .unwrap();
        assert_eq!(
            first_match(&p, "model.layers.1.self_attn.q_proj"),
            Some(100.0)
        );
        assert_eq!(first_match(&p, "model.layers.3.mlp.up_proj"), Some(7.0));
        assert_eq!(first_match(&p, "model.layers.13.mlp.up_proj"), None);
        assert_eq!(
            first_match(&p, "model.layers.0.self_attn.v_proj"),
            Some(5.0)
        );
        // A key only matches whole dotted components: `proj` is not `o_proj`.
        assert_eq!(first_match(&p, "model.layers.0.self_attn.o_proj"), None);
    }
}

/// What an adapter written by `engine train` says about itself (PEFT's `LoraConfig` fields).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSpec {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub use_rslora: bool,
    /// Short module names (`q_proj`, …).
    pub target_modules: Vec<String>,
    /// Layers with LoRA (PEFT `layers_to_transform`); `None`: every layer.
    pub layers_to_transform: Option<Vec<usize>>,
    /// Recorded as `base_model_name_or_path`.
    pub base_model: String,
}

impl AdapterSpec {
    /// adapter_config.json as PEFT writes it for a SEQ_CLS LoRA with the score head in
    /// `modules_to_save` (PEFT fills any field it needs from its defaults).
    pub fn config_json(&self) -> serde_json::Value {
        let mut targets = self.target_modules.clone();
        targets.sort();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "SEQ_CLS",
            "base_model_name_or_path": self.base_model,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "use_rslora": self.use_rslora,
            "target_modules": targets,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": null,
            "modules_to_save": ["classifier", "score"],
            "bias": "none",
            "fan_in_fan_out": false,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null
        })
    }

    /// The LoRA scale this configuration gives every module.
    pub fn scale(&self) -> f32 {
        (if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }) as f32
    }
}

/// Write a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) with
/// `tensors` under their PEFT keys, atomically: the files are written into a sibling
/// directory that is renamed over `dir` at the end.
pub fn write_adapter(dir: &Path, spec: &AdapterSpec, tensors: &[(String, Tensor)]) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = dir
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: not a directory path", dir.display())))?;
    let staging = parent.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let result = (|| -> Result<()> {
        let cfg = serde_json::to_string_pretty(&spec.config_json())?;
        crate::io::write_atomic(&staging.join("adapter_config.json"), cfg.as_bytes())?;
        let entries: Vec<(String, DType, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(k, t)| {
                let t = t.to_cpu()?.to_dtype(DType::F32)?;
                Ok((
                    k.clone(),
                    DType::F32,
                    t.shape().to_vec(),
                    t.cpu_storage()?.as_bytes().to_vec(),
                ))
            })
            .collect::<Result<_>>()?;
        let meta = [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect();
        crate::weights::save_safetensors(
            &staging.join("adapter_model.safetensors"),
            &entries,
            Some(meta),
        )
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if dir.exists() {
        let old = parent.join(format!(
            ".{}.old{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        std::fs::rename(&staging, dir).map_err(|e| Error::io(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&staging, dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Fresh LoRA factors as PEFT initialises them: `A` kaiming-uniform with a = √5, i.e.
/// U(−1/√in, 1/√in); `B` zero.
pub fn init_lora(
    r: usize,
    inp: usize,
    out: usize,
    scale: f32,
    rng: &mut impl rand::Rng,
) -> Result<crate::ops::linear::Lora> {
    use rand::RngExt;
    let bound = 1.0 / (inp as f32).sqrt();
    let a: Vec<f32> = (0..r * inp)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(crate::ops::linear::Lora {
        a: Tensor::from_f32(a, &[r, inp])?,
        b: Tensor::from_f32(vec![0.0; out * r], &[out, r])?,
        scale,
    })
}
