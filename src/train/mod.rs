//! `engine train`: QLoRA fine-tuning of a classifier, numerically as the Hugging Face Trainer
//! with PEFT and torch AdamW.
//!
//! One optimiser step takes `grad_accum` micro-batches of `batch_size` rows (each packed into
//! one varlen batch, no padding); the gradient is the mean of the micro-batch gradients (each
//! micro-batch's loss is the mean over its rows), clipped to `max_grad_norm` over all trainable
//! tensors, then AdamW updates the LoRA factors and the score head at the scheduled learning
//! rate. With `swap_augment` every row is also fed with A and B swapped (labels swapped) in the
//! same micro-batch. Rows are visited in a seeded per-epoch permutation (or file order), so a
//! run is reproducible and a checkpoint's data position (epoch, micro-batch) is enough to
//! resume it exactly.
//!
//! Data parallel ([`Ranks`]): every rank holds the whole model and the same plan; of a step's
//! `grad_accum` micro-batches, rank r computes those with index i ≡ r (mod world), and the
//! weighted gradient sums are added over the ranks ([`crate::dist::Collective`], NCCL on GPUs)
//! before clipping and AdamW, so every rank takes the same step. `grad_accum` therefore counts
//! micro-batches per step over all ranks: the global batch (and the result, up to summation
//! order) is the same whatever the number of GPUs. Dropout masks are seeded by the global
//! micro-batch index. Rank 0 alone logs, evaluates, checkpoints and writes the adapter; at the
//! start it broadcasts its optimiser state and data position, so a resumed run needs the
//! checkpoint only where rank 0 runs.

pub mod optim;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::autograd::{Graph, ParamGrads};
use crate::bail;
use crate::data::batch::TokenBatch;
use crate::data::csv::{Labels, read_arena_csv};
use crate::data::format::TextFormat;
use crate::dist::{Collective, Solo};
use crate::error::{Error, Result};
use crate::lora::{AdapterSpec, init_lora, write_adapter};
use crate::models::{self, LoadOptions, Model};
use crate::ops::elementwise::{axpy, cast};
use crate::ops::loss::cross_entropy;
use crate::ops::optim::{AdamW, AdamWConfig};
use crate::tensor::{DType, Tensor};
use optim::{Schedule, clip_coefficient};

/// One training example: token ids, the ids with A and B swapped (for `swap_augment`), and the
/// target distribution (A wins, B wins, tie).
#[derive(Clone, Debug)]
pub struct Example {
    pub ids: Vec<u32>,
    pub swapped: Option<Vec<u32>>,
    pub target: [f64; 3],
}

/// The hyper-parameters that shape the optimisation (and must match to resume).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    pub batch_size: usize,
    pub grad_accum: usize,
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub scheduler: Schedule,
    pub warmup_steps: usize,
    pub max_grad_norm: f64,
    pub label_smoothing: f64,
    pub shuffle: bool,
    pub seed: u64,
    pub swap_augment: bool,
    pub lora_dropout: f32,
    /// Recompute each layer in the backward pass instead of keeping its activations.
    pub checkpointing: bool,
}

/// What one optimiser step did.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub epoch: usize,
    pub lr: f64,
    /// Mean of the micro-batch losses.
    pub loss: f64,
    pub micro_losses: Vec<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    pub seconds: f64,
    /// Peak device memory during the step (GPU training only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_gpu_bytes: Option<usize>,
}

/// Where in the data the next step starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: usize,
    /// Index of the next micro-batch within the epoch.
    pub micro: usize,
    /// Optimiser steps taken.
    pub step: usize,
}

/// The model being trained, its optimiser and its place in the data.
pub struct Trainer {
    pub model: Model,
    pub hyper: Hyper,
    pub opt: AdamW,
    pub names: Vec<String>,
    pub pos: Position,
    /// The data-parallel group this trainer is one rank of ([`Solo`] when alone).
    pub comm: Arc<dyn Collective>,
}

impl Trainer {
    pub fn new(model: Model, hyper: Hyper) -> Result<Self> {
        let params = model.trainable();
        if params.is_empty() {
            bail!(
                Usage,
                "nothing to train: the model has no LoRA layers and no score head"
            );
        }
        let values: Vec<Tensor> = params.iter().map(|(_, t)| t.clone()).collect();
        let cfg = AdamWConfig {
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            eps: hyper.eps,
            weight_decay: hyper.weight_decay,
        };
        Ok(Trainer {
            opt: AdamW::new(cfg, &values)?,
            names: params.into_iter().map(|(n, _)| n).collect(),
            model,
            hyper,
            pos: Position::default(),
            comm: Arc::new(Solo),
        })
    }

    /// Make this trainer one rank of `comm`'s group.
    pub fn with_comm(mut self, comm: Arc<dyn Collective>) -> Self {
        self.comm = comm;
        self
    }

    /// Give every rank rank 0's optimiser state (masters and moments), step count and data
    /// position, after checking that all ranks train the same tensors.
    pub fn sync_from_root(&mut self) -> Result<()> {
        let comm = self.comm.clone();
        if comm.world() == 1 {
            return Ok(());
        }
        let root = comm.rank() == 0;
        // The same trainable tensors everywhere: a 32-bit hash of names and shapes, summed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (name, t) in self.model.trainable() {
            for b in name.bytes().chain(format!("{:?}", t.shape()).bytes()) {
                h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
        let h = (h & 0xffff_ffff) as f64;
        let sums = comm.all_reduce_host(&[h, if root { h } else { 0.0 }])?;
        if sums[0] != sums[1] * comm.world() as f64 {
            bail!(
                Usage,
                "rank {}: the ranks do not train the same LoRA tensors (different --target-modules, \
                 --lora-r, --freeze-layers or --init-adapter?)",
                comm.rank()
            );
        }
        let device = self
            .model
            .trainable()
            .first()
            .map(|(_, t)| t.device())
            .unwrap_or(crate::tensor::Device::Cpu);
        let mut flat = Vec::new();
        for [p, m, v] in self.opt.export()? {
            for x in [p, m, v] {
                let n = x.len();
                flat.push(Tensor::from_f32(x, &[n])?.to_device(device)?);
            }
        }
        let flat = comm.broadcast(&flat, 0)?;
        let mut slots = Vec::with_capacity(flat.len() / 3);
        for c in flat.chunks(3) {
            slots.push([c[0].to_f32_vec()?, c[1].to_f32_vec()?, c[2].to_f32_vec()?]);
        }
        let mine = [
            self.pos.epoch as f64,
            self.pos.micro as f64,
            self.pos.step as f64,
            self.opt.step as f64,
        ];
        let pos = comm.all_reduce_host(&if root { mine } else { [0.0; 4] })?;
        self.opt.import(slots, pos[3] as u64)?;
        self.pos = Position {
            epoch: pos[0] as usize,
            micro: pos[1] as usize,
            step: pos[2] as usize,
        };
        self.refresh_model()
    }

    /// Put the optimiser's masters into the model, in each parameter's own dtype.
    fn refresh_model(&mut self) -> Result<()> {
        let dtypes: Vec<DType> = self
            .model
            .trainable()
            .iter()
            .map(|(_, t)| t.dtype())
            .collect();
        let values = self
            .opt
            .params()?
            .iter()
            .zip(dtypes)
            .map(|(p, d)| cast(p, d))
            .collect::<Result<Vec<_>>>()?;
        self.model.set_trainable(values)
    }

    /// Micro-batches per epoch and optimiser steps per epoch for `n` examples.
    pub fn plan(&self, n: usize) -> (usize, usize) {
        let micro = n.div_ceil(self.hyper.batch_size);
        (micro, micro.div_ceil(self.hyper.grad_accum))
    }

    /// Total optimiser steps of the run (what the schedule decays over).
    pub fn total_steps(&self, n: usize) -> usize {
        self.plan(n).1 * self.hyper.epochs
    }

    /// The visiting order of an epoch.
    pub fn order(&self, n: usize, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        if self.hyper.shuffle {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                self.hyper.seed.wrapping_add(epoch as u64 * 0x9e37_79b9),
            );
            order.shuffle(&mut rng);
        }
        order
    }

    /// Loss and trainable-parameter gradients of one micro-batch (f32 gradients in
    /// [`Model::trainable`] order on the model's device, zero where none flowed) and its tokens.
    pub fn micro_batch(
        &self,
        rows: &[(&[u32], [f64; 3])],
        dropout_seed: u64,
    ) -> Result<(f64, Vec<Tensor>, usize)> {
        let params = self.model.trainable();
        let refs: Vec<&Tensor> = params.iter().map(|(_, t)| t).collect();
        let mut g = Graph::training(
            &refs,
            self.hyper.checkpointing,
            self.hyper.lora_dropout,
            dropout_seed,
        );
        let ids: Vec<&[u32]> = rows.iter().map(|(i, _)| *i).collect();
        let targets: Vec<[f64; 3]> = rows.iter().map(|(_, t)| *t).collect();
        let batch = TokenBatch::from_rows(&ids);
        let logits = self.model.forward_graph(&mut g, &batch)?;
        let (loss, dlogits) = cross_entropy(logits.tensor(), &targets, self.hyper.label_smoothing)?;
        if !loss.is_finite() {
            bail!(
                Msg,
                "the training loss is not finite ({loss}); lower --lr or check the data"
            );
        }
        let mut pg = ParamGrads::new(refs.len());
        g.backward(&logits, dlogits, &mut pg, &[])?;
        let grads = params
            .iter()
            .zip(pg.into_grads())
            .map(|((_, t), g)| match g {
                Some(g) => cast(&g, DType::F32),
                None => Tensor::zeros(t.shape(), DType::F32, t.device()),
            })
            .collect::<Result<_>>()?;
        Ok((loss, grads, batch.tokens()))
    }

    /// One optimiser step over `micro_batches` (lists of example indices) at the scheduled
    /// learning rate.
    pub fn step(
        &mut self,
        examples: &[Example],
        micro_batches: &[Vec<usize>],
        total_steps: usize,
    ) -> Result<StepRecord> {
        let t0 = Instant::now();
        let device = match self.model.trainable().first().map(|(_, t)| t.device()) {
            Some(crate::tensor::Device::Cuda(i)) => Some(crate::cuda::device(i)?),
            _ => None,
        };
        if let Some(d) = &device {
            d.reset_peak();
        }
        let lr = self.hyper.lr
            * self
                .hyper
                .scheduler
                .factor(self.pos.step, self.hyper.warmup_steps, total_steps);
        let mut acc: Option<Vec<Tensor>> = None;
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let mut losses = vec![0.0; micro_batches.len()];
        let mut tokens = 0;
        let weight = 1.0 / micro_batches.len() as f32;
        for (i, mb) in micro_batches.iter().enumerate() {
            if i % world != rank {
                continue; // another rank's micro-batch
            }
            let mut rows: Vec<(&[u32], [f64; 3])> = Vec::new();
            for &e in mb {
                let ex = &examples[e];
                rows.push((&ex.ids, ex.target));
                if self.hyper.swap_augment {
                    let [a, b, t] = ex.target;
                    let swapped = ex
                        .swapped
                        .as_deref()
                        .ok_or_else(|| Error::Msg("swap_augment needs swapped ids".into()))?;
                    rows.push((swapped, [b, a, t]));
                }
            }
            let seed = self.hyper.seed ^ ((self.pos.step as u64) << 20) ^ i as u64;
            let (loss, grads, n) = self.micro_batch(&rows, seed)?;
            losses[i] = loss;
            tokens += n;
            // The step's gradient is the mean of the micro-batch gradients.
            acc = Some(match acc {
                None => grads
                    .iter()
                    .map(|g| {
                        axpy(
                            &Tensor::zeros(g.shape(), DType::F32, g.device())?,
                            g,
                            weight,
                        )
                    })
                    .collect::<Result<_>>()?,
                Some(acc) => acc
                    .iter()
                    .zip(&grads)
                    .map(|(a, g)| axpy(a, g, weight))
                    .collect::<Result<_>>()?,
            });
        }
        if micro_batches.is_empty() {
            bail!(Msg, "an optimiser step needs at least one micro-batch");
        }
        let grads = match acc {
            Some(g) => g,
            // This rank had no micro-batch in this (short, last) step: it adds zeros.
            None => self
                .model
                .trainable()
                .iter()
                .map(|(_, t)| Tensor::zeros(t.shape(), DType::F32, t.device()))
                .collect::<Result<_>>()?,
        };
        let grads = if world > 1 {
            let mut host = losses.clone();
            host.push(tokens as f64);
            let sums = self.comm.all_reduce_host(&host)?;
            tokens = sums[losses.len()] as usize;
            let n = losses.len();
            losses.copy_from_slice(&sums[..n]);
            self.comm.all_reduce_sum(&grads)?
        } else {
            grads
        };
        let grad_norm = self.opt.grad_norm(&grads)?;
        // Never step (or checkpoint) on gradients whose sum an abort cut short.
        self.comm.check()?;
        self.opt.update(
            &grads,
            lr,
            clip_coefficient(grad_norm, self.hyper.max_grad_norm),
        )?;
        // The model computes with the masters in each parameter's own dtype (bf16 LoRA on a GPU).
        self.refresh_model()?;
        self.pos.step += 1;
        let loss = losses.iter().sum::<f64>() / losses.len() as f64;
        Ok(StepRecord {
            step: self.pos.step,
            epoch: self.pos.epoch,
            lr,
            loss,
            micro_losses: losses,
            grad_norm,
            tokens,
            seconds: t0.elapsed().as_secs_f64(),
            peak_gpu_bytes: device.map(|d| d.peak_bytes()),
        })
    }

    /// Train from the current position to the end, calling `after` after every step.
    pub fn run(
        &mut self,
        examples: &[Example],
        mut after: impl FnMut(&mut Trainer, &StepRecord) -> Result<()>,
    ) -> Result<Vec<StepRecord>> {
        let n = examples.len();
        if n == 0 {
            bail!(Usage, "no training rows");
        }
        let total = self.total_steps(n);
        let (micro_per_epoch, _) = self.plan(n);
        let mut records = Vec::new();
        while self.pos.epoch < self.hyper.epochs {
            let order = self.order(n, self.pos.epoch);
            let micro: Vec<Vec<usize>> = order
                .chunks(self.hyper.batch_size)
                .map(|c| c.to_vec())
                .collect();
            while self.pos.micro < micro_per_epoch {
                let end = (self.pos.micro + self.hyper.grad_accum).min(micro_per_epoch);
                let rec = self.step(examples, &micro[self.pos.micro..end], total)?;
                self.pos.micro = end;
                if self.pos.micro == micro_per_epoch {
                    self.pos.epoch += 1;
                    self.pos.micro = 0;
                }
                after(self, &rec)?;
                records.push(rec);
                if self.pos.micro == 0 {
                    break;
                }
            }
        }
        Ok(records)
    }

    /// The trainable tensors (the optimiser's f32 masters) under their PEFT keys.
    pub fn adapter_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.names.iter().cloned().zip(self.opt.params()?).collect())
    }
}

/// The LoRA to train when no `--init-adapter` is given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraOptions {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
    pub freeze_layers: usize,
    pub rslora: bool,
}

/// Attach fresh LoRA factors (A kaiming-uniform, B zero) to the target projections of every
/// layer from `freeze_layers` on; returns the adapter description.
pub fn attach_lora(
    model: &mut Model,
    lora: &LoraOptions,
    seed: u64,
    base: &str,
) -> Result<AdapterSpec> {
    let n_layers = model.info().num_layers;
    if lora.freeze_layers >= n_layers {
        bail!(
            Usage,
            "--freeze-layers {} leaves nothing to train in a {n_layers}-layer model",
            lora.freeze_layers
        );
    }
    if lora.r == 0 {
        bail!(Usage, "--lora-r must be at least 1");
    }
    let spec = AdapterSpec {
        r: lora.r,
        lora_alpha: lora.alpha,
        lora_dropout: lora.dropout,
        use_rslora: lora.rslora,
        target_modules: lora.targets.clone(),
        layers_to_transform: Some((lora.freeze_layers..n_layers).collect()),
        base_model: base.to_string(),
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (linears, _) = model.linears_mut();
    let mut attached = 0;
    for (module, l) in linears {
        let short = module.rsplit('.').next().unwrap_or(&module).to_string();
        let layer: usize = module
            .split('.')
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if layer < lora.freeze_layers || !lora.targets.contains(&short) {
            continue;
        }
        if l.lora.is_some() {
            bail!(Usage, "{module} already has a LoRA (from --init-adapter)");
        }
        let (out, inp) = l.weight.dims();
        l.lora = Some(init_lora(lora.r, inp, out, spec.scale(), &mut rng)?);
        attached += 1;
    }
    if attached == 0 {
        bail!(
            Usage,
            "--target-modules {:?} match no projection of this model",
            lora.targets
        );
    }
    Ok(spec)
}

/// The adapter description of a model loaded with `--init-adapter`.
pub fn spec_of_adapter(dir: &Path, base: &str) -> Result<AdapterSpec> {
    let a = crate::lora::Adapter::load(dir)?;
    let c = &a.config;
    let targets = match &c.target_modules {
        Some(crate::lora::TargetModules::List(l)) => l.clone(),
        Some(crate::lora::TargetModules::Pattern(p)) => bail!(
            Usage,
            "{}: a regular-expression target_modules (`{p}`) cannot be written back; list the modules",
            dir.display()
        ),
        None => Vec::new(),
    };
    Ok(AdapterSpec {
        r: c.r,
        lora_alpha: c.lora_alpha,
        lora_dropout: c.lora_dropout,
        use_rslora: c.use_rslora,
        target_modules: targets,
        layers_to_transform: c.layers_to_transform.as_ref().map(|l| l.to_vec()),
        base_model: base.to_string(),
    })
}

/// Everything `engine train` needs.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub load: LoadOptions,
    pub tokenizer: Option<PathBuf>,
    pub format: TextFormat,
    pub max_length: usize,
    pub lora: LoraOptions,
    pub hyper: Hyper,
    pub eval_data: Option<PathBuf>,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    pub resume: bool,
    pub log_file: Option<PathBuf>,
    pub progress: bool,
    /// One process and device, or a data-parallel group.
    pub ranks: Ranks,
}

/// How many ranks train, and where.
#[derive(Clone, Debug, Default)]
pub enum Ranks {
    /// One rank on `load.device`.
    #[default]
    Single,
    /// One rank per listed GPU, all in this process (threads), over NCCL.
    Gpus(Vec<usize>),
    /// This process is one rank of a group launched by torchrun (or by hand with the same
    /// variables), on this GPU, over NCCL.
    Launched(crate::dist::LaunchEnv, usize),
    /// Several CPU ranks in this process (threads), standing in for GPUs in tests.
    CpuThreads(usize),
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub steps: Vec<StepRecord>,
    pub eval_log_loss: Option<f64>,
    pub tokens_per_second: f64,
    pub out: PathBuf,
}

/// The state saved beside a checkpoint's adapter.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CheckpointState {
    position: Position,
    hyper: Hyper,
    lora: Option<LoraOptions>,
    /// Identifies the base model and data (config.json, parameter names, data file size).
    fingerprint: Fingerprint,
    params: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Fingerprint {
    model_config: String,
    data_rows: usize,
    format: String,
    max_length: usize,
}

fn checkpoint_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    out.with_file_name(format!("{name}.checkpoint"))
}

/// Save adapter + optimiser (masters and moments) + position into `dir`, atomically (the
/// adapter directory is written whole, then the optimiser and state files into it).
fn save_checkpoint(
    dir: &Path,
    spec: &AdapterSpec,
    t: &Trainer,
    state: &CheckpointState,
) -> Result<()> {
    write_adapter(dir, spec, &t.adapter_tensors()?)?;
    let mut entries = Vec::new();
    for (i, [p, m, v]) in t.opt.export()?.into_iter().enumerate() {
        for (name, data) in [("p", p), ("m", m), ("v", v)] {
            entries.push((
                format!("{name}.{i}"),
                DType::F32,
                vec![data.len()],
                bytemuck::cast_slice(&data).to_vec(),
            ));
        }
    }
    let meta = [("step".to_string(), t.opt.step.to_string())]
        .into_iter()
        .collect();
    crate::weights::save_safetensors(&dir.join("optimizer.safetensors"), &entries, Some(meta))?;
    crate::io::write_atomic(
        &dir.join("trainer_state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )
}

fn load_checkpoint(dir: &Path, t: &mut Trainer) -> Result<CheckpointState> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let state: CheckpointState = serde_json::from_str(&text)
        .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
    let ck = crate::weights::Checkpoint::open_files(dir, &[dir.join("optimizer.safetensors")])?;
    let sizes: Vec<usize> = t
        .model
        .trainable()
        .iter()
        .map(|(_, p)| p.elem_count())
        .collect();
    let mut slots = Vec::with_capacity(sizes.len());
    for (i, n) in sizes.into_iter().enumerate() {
        let get = |name: &str| ck.load(&format!("{name}.{i}"), &[n])?.to_f32_vec();
        slots.push([get("p")?, get("m")?, get("v")?]);
    }
    t.opt.import(slots, state.position.step as u64)?;
    t.pos = state.position;
    // The model computes with the restored masters (exact f32, not the adapter's rounding).
    t.refresh_model()?;
    Ok(state)
}

fn read_examples(
    path: &Path,
    encoder: &crate::data::format::Encoder,
    swap: bool,
) -> Result<Vec<Example>> {
    let data = read_arena_csv(path, Labels::Required)?;
    for w in data.warnings() {
        eprintln!("warning: {w}");
    }
    data.rows
        .iter()
        .map(|r| {
            let target = r
                .label
                .ok_or_else(|| Error::data(path, None, Some("winner_model_a"), "missing label"))?;
            Ok(Example {
                ids: encoder
                    .encode(r)
                    .map_err(|e| e.context(format!("row id {}", r.id)))?,
                swapped: if swap {
                    Some(encoder.encode(&r.swapped())?)
                } else {
                    None
                },
                target,
            })
        })
        .collect()
}

/// Log loss of the model on labelled examples.
pub fn evaluate(model: &Model, examples: &[Example]) -> Result<f64> {
    let ids: Vec<Vec<u32>> = examples.iter().map(|e| e.ids.clone()).collect();
    let probs = crate::infer::predict(model, &ids, 8192, 64, None)?;
    let labels: Vec<[f64; 3]> = examples.iter().map(|e| e.target).collect();
    Ok(crate::metrics::log_loss(&labels, &probs))
}

/// Run `engine train`: one rank, or a data-parallel group ([`Ranks`]). The report is rank 0's
/// (in a launched group, this process's).
pub fn run(opts: &TrainOptions) -> Result<TrainReport> {
    let h = &opts.hyper;
    if h.batch_size == 0 || h.grad_accum == 0 || h.epochs == 0 {
        bail!(
            Usage,
            "--batch-size, --grad-accum and --epochs must be at least 1"
        );
    }
    let world = match &opts.ranks {
        Ranks::Single => 1,
        Ranks::Gpus(g) => g.len(),
        Ranks::Launched(env, _) => env.world,
        Ranks::CpuThreads(n) => *n,
    };
    if world > 1 && !h.grad_accum.is_multiple_of(world) {
        eprintln!(
            "warning: --grad-accum {} is not a multiple of the {world} ranks: some ranks idle in part of \
             every step (--grad-accum counts the micro-batches of a step over all ranks)",
            h.grad_accum
        );
    }
    let group = |comms: Vec<Arc<dyn Collective>>, devices: Vec<crate::tensor::Device>| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = comms
                .into_iter()
                .zip(devices)
                .map(|(comm, device)| {
                    scope.spawn(move || {
                        let rank = comm.rank();
                        let r = run_rank(opts, device, comm.clone());
                        if r.is_err() {
                            // Unblock the ranks waiting for this one in a collective.
                            comm.abort();
                        }
                        (rank, r)
                    })
                })
                .collect();
            let mut report = None;
            let mut first_err = None;
            for h in handles {
                match h.join() {
                    Ok((0, Ok(r))) => report = Some(r),
                    Ok((_, Ok(_))) => {}
                    Ok((rank, Err(e))) => {
                        if first_err.is_none() {
                            first_err = Some(e.context(format!("rank {rank}")));
                        }
                    }
                    Err(_) => {
                        first_err.get_or_insert(Error::Msg("a training rank panicked".into()));
                    }
                }
            }
            match (first_err, report) {
                (Some(e), _) => Err(e),
                (None, Some(r)) => Ok(r),
                (None, None) => Err(Error::Msg("rank 0 returned no report".into())),
            }
        })
    };
    match &opts.ranks {
        Ranks::Single => run_rank(opts, opts.load.device, Arc::new(Solo)),
        Ranks::CpuThreads(n) => {
            let comms: Vec<Arc<dyn Collective>> = crate::dist::thread_group((*n).max(1))
                .into_iter()
                .map(|c| Arc::new(c) as Arc<dyn Collective>)
                .collect();
            let devices = vec![crate::tensor::Device::Cpu; comms.len()];
            group(comms, devices)
        }
        Ranks::Gpus(gpus) => {
            let comms: Vec<Arc<dyn Collective>> = crate::dist::nccl_group(gpus)?
                .into_iter()
                .map(|c| Arc::new(c) as Arc<dyn Collective>)
                .collect();
            let devices = gpus
                .iter()
                .map(|&g| crate::tensor::Device::Cuda(g))
                .collect();
            group(comms, devices)
        }
        Ranks::Launched(env, gpu) => {
            let fingerprint = run_fingerprint(opts);
            let comm = Arc::new(crate::dist::nccl_from_env(env, *gpu, fingerprint)?);
            let r = run_rank(opts, crate::tensor::Device::Cuda(*gpu), comm.clone());
            if r.is_err() {
                comm.abort();
            }
            r
        }
    }
}

/// A hash of the settings every rank of a launched group must share.
fn run_fingerprint(opts: &TrainOptions) -> u64 {
    let text = format!(
        "{}|{}|{:?}|{:?}|{:?}|{}",
        opts.model.display(),
        opts.data.display(),
        opts.hyper,
        opts.lora,
        opts.format,
        opts.max_length
    );
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// One rank of `engine train` on `device`.
fn run_rank(
    opts: &TrainOptions,
    device: crate::tensor::Device,
    comm: Arc<dyn Collective>,
) -> Result<TrainReport> {
    if let crate::tensor::Device::Cuda(i) = device {
        crate::cuda::device(i)?.bind()?;
    }
    let root = comm.rank() == 0;
    let h = &opts.hyper;
    if h.batch_size == 0 || h.grad_accum == 0 || h.epochs == 0 {
        bail!(
            Usage,
            "--batch-size, --grad-accum and --epochs must be at least 1"
        );
    }
    // Fast failures first: output location, tokenizer, data.
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        bail!(Usage, "{}: directory does not exist", parent.display());
    }
    let header = models::read_header(&opts.model)?;
    let encoder = crate::infer::encoder_for(
        &header,
        &opts.model,
        opts.tokenizer.as_deref(),
        opts.format,
        opts.max_length,
    )?;
    let examples = read_examples(&opts.data, &encoder, h.swap_augment)?;
    let eval = match &opts.eval_data {
        Some(p) => Some(read_examples(p, &encoder, false)?),
        None => None,
    };
    if examples.is_empty() {
        bail!(Usage, "{}: no training rows", opts.data.display());
    }

    let ckpt = checkpoint_dir(&opts.out);
    // Only rank 0 reads the checkpoint; it hands its state to the others below.
    let resuming = root && opts.resume && ckpt.join("trainer_state.json").exists();
    if root && opts.resume && !resuming {
        eprintln!(
            "note: --resume: no checkpoint at {}, starting fresh",
            ckpt.display()
        );
    }
    let base = opts.model.to_string_lossy().into_owned();
    // The starting adapter: the checkpoint's when resuming, else --init-adapter, else fresh.
    let mut load = opts.load.clone();
    load.device = device;
    if resuming {
        load.adapter = Some(ckpt.clone());
    }
    let mut model = models::load(&opts.model, &load)?;
    let (spec, lora_opts) = match &load.adapter {
        Some(dir) => (spec_of_adapter(dir, &base)?, None),
        None => (
            attach_lora(&mut model, &opts.lora, h.seed, &base)?,
            Some(opts.lora.clone()),
        ),
    };
    let fingerprint = Fingerprint {
        model_config: std::fs::read_to_string(opts.model.join("config.json")).unwrap_or_default(),
        data_rows: examples.len(),
        format: format!("{:?}", opts.format),
        max_length: opts.max_length,
    };
    let mut trainer = Trainer::new(model, opts.hyper.clone())?.with_comm(comm.clone());
    if resuming {
        let state = load_checkpoint(&ckpt, &mut trainer)?;
        let mut diffs = Vec::new();
        if state.fingerprint.model_config != fingerprint.model_config {
            diffs.push("the base model's config.json".to_string());
        }
        if state.fingerprint.data_rows != fingerprint.data_rows {
            diffs.push(format!(
                "the data ({} rows then, {} now)",
                state.fingerprint.data_rows, fingerprint.data_rows
            ));
        }
        if (&state.fingerprint.format, state.fingerprint.max_length)
            != (&fingerprint.format, fingerprint.max_length)
        {
            diffs.push("the text format or --max-length".into());
        }
        if state.hyper != trainer.hyper {
            diffs.push(format!("the hyper-parameters (then {:?})", state.hyper));
        }
        if state.params != trainer.names {
            diffs.push("the trainable tensors".into());
        }
        if !diffs.is_empty() {
            bail!(
                Usage,
                "{}: the checkpoint was written for a different run: {} differ(s); remove it or start a new --out",
                ckpt.display(),
                diffs.join(", ")
            );
        }
        eprintln!(
            "resuming from {} at step {} (epoch {}, micro-batch {})",
            ckpt.display(),
            trainer.pos.step,
            trainer.pos.epoch,
            trainer.pos.micro
        );
    }
    trainer.sync_from_root()?;
    // Rank 0 alone reports, evaluates and writes.
    let eval = if root { eval } else { None };

    let total = trainer.total_steps(examples.len());
    let mut log = match opts.log_file.as_ref().filter(|_| root) {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::io(p, e))?,
        ),
        None => None,
    };
    let bar = (opts.progress && root).then(|| {
        let b = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_position(trainer.pos.step as u64);
        b
    });
    let t0 = Instant::now();
    let mut tokens = 0usize;
    let mut last_eval = None;
    let state_for = |t: &Trainer| CheckpointState {
        position: t.pos,
        hyper: t.hyper.clone(),
        lora: lora_opts.clone(),
        fingerprint: fingerprint.clone(),
        params: t.names.clone(),
    };
    let steps = trainer.run(&examples, |t, rec| {
        tokens += rec.tokens;
        let mut line = serde_json::to_value(rec)?;
        let done = t.pos.step == total;
        if let Some(ev) = &eval
            && ((opts.eval_every > 0 && t.pos.step % opts.eval_every == 0) || done)
        {
            let ll = evaluate(&t.model, ev)?;
            line["eval_log_loss"] = ll.into();
            last_eval = Some(ll);
        }
        let tps = tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        line["tokens_per_s"] = tps.into();
        if let Some(f) = log.as_mut() {
            writeln!(f, "{line}")
                .map_err(|e| Error::io(opts.log_file.as_deref().unwrap_or(Path::new("log")), e))?;
        }
        if let Some(b) = &bar {
            b.set_position(t.pos.step as u64);
            let ev = last_eval
                .map(|v| format!("  eval {v:.4}"))
                .unwrap_or_default();
            let mem = rec
                .peak_gpu_bytes
                .map(|b| format!("  peak {:.1} GiB", b as f64 / (1u64 << 30) as f64))
                .unwrap_or_default();
            b.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s{ev}{mem}",
                rec.loss, rec.lr, tps
            ));
        }
        if root && opts.checkpoint_every > 0 && t.pos.step % opts.checkpoint_every == 0 && !done {
            save_checkpoint(&ckpt, &spec, t, &state_for(t))?;
        }
        Ok(())
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if root {
        write_adapter(&opts.out, &spec, &trainer.adapter_tensors()?)?;
        if ckpt.exists() {
            let _ = std::fs::remove_dir_all(&ckpt);
        }
    }
    Ok(TrainReport {
        tokens_per_second: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        steps,
        eval_log_loss: last_eval,
        out: opts.out.clone(),
    })
}
