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

use std::collections::{BTreeMap, HashMap};
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
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
}

/// A loaded adapter whose pieces are handed out to the layers as the model is built.
pub struct Adapter {
    dir: PathBuf,
    pub config: AdapterConfig,
    /// module path → (A, B), removed as layers claim them.
    loras: HashMap<String, (Tensor, Tensor)>,
    score: Option<Tensor>,
}

/// Whether `module` matches a pattern key the way PEFT's rank/alpha patterns are used: the
/// key is the whole module path or its dotted suffix.
fn pattern_matches(key: &str, module: &str) -> bool {
    module == key || module.ends_with(&format!(".{key}"))
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
        Ok(Adapter {
            dir: dir.to_path_buf(),
            config,
            loras,
            score,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of modules with LoRA weights not yet claimed by a layer.
    pub fn unclaimed(&self) -> usize {
        self.loras.len()
    }

    /// Claim the LoRA of `module` (a Hugging Face module path), checking it fits `[out, inp]`.
    pub fn take_lora(&mut self, module: &str, out: usize, inp: usize) -> Result<Option<Lora>> {
        let Some((a, b)) = self.loras.remove(module) else {
            return Ok(None);
        };
        let cfg = &self.config;
        let r = cfg
            .rank_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map(|(_, &r)| r)
            .unwrap_or(cfg.r);
        let alpha = cfg
            .alpha_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map(|(_, &a)| a)
            .unwrap_or(cfg.lora_alpha);
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
