//! The command line: parse arguments, call one function per subcommand, map errors to exit
//! codes (0 success, 1 failure, 2 bad usage).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

use crate::data::format::TextFormat;
use crate::error::{Error, Result};
use crate::infer::{self, InferOptions};
use crate::init_model::{self, Arch, InitOptions, Preset};
use crate::models::{LoadOptions, Quant};
use crate::tensor::{DType, Device};
use crate::{demo, eval};

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (backends: cpu, cuda; CUDA kernels: ",
    env!("ENGINE_CUDA_KERNELS"),
    ")"
);

#[derive(Parser, Debug)]
#[command(name = "engine", version = VERSION, about = "QLoRA classifiers for the LMSYS arena preference task (Gemma-2, Llama-3.1)")]
pub struct Cli {
    /// Worker threads for CPU compute (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fine-tune a LoRA adapter and the score head on a labelled arena CSV.
    Train(Box<TrainArgs>),
    /// Score an arena CSV and write a submission.
    Infer(InferArgs),
    /// Log loss and accuracy of a prediction file against a labelled CSV.
    Eval(EvalArgs),
    /// Weighted average of prediction files; with --labels, search the weights.
    Ensemble(crate::ensemble::EnsembleArgs),
    /// Join the shard files of `engine infer --shard K/N` into one submission.
    Merge(crate::merge::MergeArgs),
    /// Write a random-initialised model directory (Hugging Face layout).
    InitModel(InitArgs),
    /// Run the bundled tiny model on the bundled sample rows.
    Demo(DemoArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantArg {
    None,
    Nf4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

/// Options shared by everything that loads a model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Where to compute (`cuda`: the first GPU).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Activation dtype on the GPU (default bf16, or f16 where the GPU lacks bf16 tensor
    /// cores); the CPU computes in f32.
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Quantise the q/k/v/o/gate/up/down projections at load.
    #[arg(long, value_enum, default_value = "none")]
    pub quant: QuantArg,
    /// With --quant nf4: also quantise the per-block scales (bitsandbytes compress_statistics).
    #[arg(long)]
    pub double_quant: bool,
    /// tokenizer.json to use instead of the model directory's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Text format: `turns` (turn-interleaved, symmetric truncation) or `concat` (public notebook).
    #[arg(long, default_value = "turns")]
    pub format: TextFormat,
    /// Longest token sequence per row (BOS and EOS included).
    #[arg(long, default_value_t = 1536)]
    pub max_length: usize,
    /// Seed for anything random (a missing score head).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct InferArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Arena CSV to score (test or train layout).
    #[arg(long)]
    pub data: PathBuf,
    /// Submission CSV to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Token budget of one packed batch.
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    /// Most rows in one packed batch.
    #[arg(long, default_value_t = 64)]
    pub batch_rows: usize,
    /// Run on these GPUs (comma-separated ordinals, e.g. 0,1): one worker and model copy per
    /// GPU, batches handed to whichever is free next. Implies --device cuda.
    #[arg(long, value_delimiter = ',')]
    pub gpus: Option<Vec<usize>>,
    /// Test-time augmentation: also score every row with A and B swapped and average.
    #[arg(long)]
    pub tta: bool,
    /// Score only shard K of N (rows i with i mod N = K, 0 ≤ K < N) into a shard file for
    /// `engine merge`.
    #[arg(long)]
    pub shard: Option<crate::shard::Shard>,
    /// Pack rows in file order instead of longest first (to measure what sorting is worth).
    #[arg(long)]
    pub no_sort: bool,
    /// After a failed run: take the rows it finished from OUT.partial.csv and score only the
    /// rest (the partial file is removed once OUT is written).
    #[arg(long)]
    pub resume: bool,
    /// Several CPU workers, each with its own model copy (stands in for GPUs in tests).
    #[arg(long, hide = true)]
    pub cpu_workers: Option<usize>,
    /// Append one JSON line with the run's metrics (rows, tokens, seconds, rows/s, tokens/s,
    /// peak GPU memory, per-worker counts and busy time, settings) to this file.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Named starting points for the two backbones (explicit flags override them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Recipe {
    /// max length 1536, lr 8e-5, freeze 2 layers, r 32, alpha 64, dropout 0, all 7 projections.
    #[value(name = "gemma2-9b")]
    Gemma2_9b,
    /// max length 1280, lr 1.2e-4, freeze 2 layers, r 32, alpha 32, dropout 0, q/k/v/o.
    #[value(name = "llama3.1-8b")]
    Llama31_8b,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
    Auto,
}

const ALL_PROJECTIONS: &str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Base model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Labelled arena CSV (winner columns: one-hot or soft labels).
    #[arg(long)]
    pub data: PathBuf,
    /// Adapter directory to write (PEFT layout); checkpoints go to OUT.checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// Start from this recipe's settings.
    #[arg(long, value_enum)]
    pub recipe: Option<Recipe>,
    /// Labelled CSV whose log loss is reported every --eval-every steps and at the end.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Evaluate every N optimiser steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Start from a PEFT adapter (LoRA and score head) instead of a fresh LoRA.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Data-parallel training on these GPUs (comma-separated ordinals): one rank per GPU,
    /// gradients summed with NCCL. Implies --device cuda. Under torchrun (RANK, WORLD_SIZE,
    /// LOCAL_RANK, MASTER_ADDR, MASTER_PORT set) this process is one rank and uses
    /// GPU LOCAL_RANK (or the LOCAL_RANK-th of this list).
    #[arg(long, value_delimiter = ',')]
    pub gpus: Option<Vec<usize>>,
    /// Several CPU ranks in this process (stands in for GPUs in tests).
    #[arg(long, hide = true)]
    pub cpu_ranks: Option<usize>,
    /// Quantise the frozen base projections (QLoRA with nf4).
    #[arg(long, value_enum, default_value = "none")]
    pub quant: QuantArg,
    #[arg(long)]
    pub double_quant: bool,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "turns")]
    pub format: TextFormat,
    /// Longest token sequence per row [default: 1024; recipes 1536 / 1280].
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimiser step (the gradient is their mean).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Peak learning rate [default: 2e-4; recipes 8e-5 / 1.2e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, value_enum, default_value = "linear")]
    pub scheduler: crate::train::optim::Schedule,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// LoRA rank [default: 16; recipes 32].
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha [default: 32; recipes 64 / 32].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA input [default: 0.05; recipes 0].
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Projections that get LoRA, comma-separated [default: all 7; llama recipe q,k,v,o].
    #[arg(long)]
    pub target_modules: Option<String>,
    /// Leave the first N layers without LoRA (PEFT layers_to_transform) [default: 0; recipes 2].
    #[arg(long)]
    pub freeze_layers: Option<usize>,
    /// LoRA scale alpha/sqrt(r) instead of alpha/r.
    #[arg(long)]
    pub rslora: bool,
    /// Also train on every row with A and B swapped (labels swapped), in the same step.
    #[arg(long)]
    pub swap_augment: bool,
    /// Visit rows in file order instead of a seeded shuffle.
    #[arg(long)]
    pub no_shuffle: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Recompute each layer in the backward pass (less memory); auto: on for hidden ≥ 2048.
    #[arg(long, value_enum, default_value = "auto")]
    pub gradient_checkpointing: OnOff,
    /// Save a resumable checkpoint every N optimiser steps (0: never).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Continue from OUT.checkpoint if it exists.
    #[arg(long)]
    pub resume: bool,
    /// Append one JSON line of metrics per step to this file.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// Resolve recipe and defaults into training options (explicit flags win).
    pub fn options(&self) -> Result<crate::train::TrainOptions> {
        let (max_len, lr, freeze, r, alpha, dropout, targets) = match self.recipe {
            Some(Recipe::Gemma2_9b) => (1536, 8e-5, 2, 32, 64.0, 0.0, ALL_PROJECTIONS),
            Some(Recipe::Llama31_8b) => (
                1280,
                1.2e-4,
                2,
                32,
                32.0,
                0.0,
                "q_proj,k_proj,v_proj,o_proj",
            ),
            None => (1024, 2e-4, 0, 16, 32.0, 0.05, ALL_PROJECTIONS),
        };
        let targets: Vec<String> = self
            .target_modules
            .as_deref()
            .unwrap_or(targets)
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let launched = crate::dist::launch_env()?;
        let mut single_gpu = None;
        let on_gpu = self.device == DeviceArg::Cuda || self.gpus.is_some();
        let ranks = match (&self.gpus, self.cpu_ranks, launched) {
            (Some(_), Some(_), _) => {
                return Err(Error::Usage(
                    "--gpus and --cpu-ranks exclude each other".into(),
                ));
            }
            (None, Some(n), _) => crate::train::Ranks::CpuThreads(n.max(1)),
            (gpus, None, Some(env)) if on_gpu => {
                let gpu = match gpus {
                    Some(list) => *list.get(env.local_rank).ok_or_else(|| {
                        Error::Usage(format!(
                            "LOCAL_RANK={} but --gpus lists only {} GPU(s)",
                            env.local_rank,
                            list.len()
                        ))
                    })?,
                    None => env.local_rank,
                };
                crate::train::Ranks::Launched(env, gpu)
            }
            (Some(list), None, _) => {
                check_gpus(list)?;
                if list.len() == 1 {
                    single_gpu = Some(list[0]);
                    crate::train::Ranks::Single
                } else {
                    crate::train::Ranks::Gpus(list.clone())
                }
            }
            (None, None, Some(env)) if env.world > 1 => {
                return Err(Error::Usage(format!(
                    "this process is rank {} of a {}-rank launch (WORLD_SIZE is set), but data-parallel \
                     training runs on GPUs over NCCL: add --device cuda (or unset WORLD_SIZE to \
                     train alone)",
                    env.rank, env.world
                )));
            }
            (None, None, _) => crate::train::Ranks::Single,
        };
        let model_args = ModelArgs {
            model: self.model.clone(),
            adapter: self.init_adapter.clone(),
            device: if on_gpu { DeviceArg::Cuda } else { self.device },
            dtype: None,
            quant: self.quant,
            double_quant: self.double_quant,
            tokenizer: self.tokenizer.clone(),
            format: self.format,
            max_length: self.max_length.unwrap_or(max_len),
            seed: self.seed,
        };
        let hidden = crate::models::read_config(&self.model)?
            .get("hidden_size")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let checkpointing = match self.gradient_checkpointing {
            OnOff::On => true,
            OnOff::Off => false,
            OnOff::Auto => hidden >= 2048,
        };
        let lora_dropout = self.lora_dropout.unwrap_or(dropout);
        if !(0.0..1.0).contains(&lora_dropout) {
            return Err(Error::Usage(format!(
                "--lora-dropout {lora_dropout} must be in [0, 1)"
            )));
        }
        let mut load = model_args.load_options()?;
        if let Some(g) = single_gpu {
            load.device = Device::Cuda(g);
        }
        Ok(crate::train::TrainOptions {
            load,
            model: self.model.clone(),
            data: self.data.clone(),
            out: self.out.clone(),
            tokenizer: self.tokenizer.clone(),
            format: self.format,
            max_length: model_args.max_length,
            lora: crate::train::LoraOptions {
                r: self.lora_r.unwrap_or(r),
                alpha: self.lora_alpha.unwrap_or(alpha),
                dropout: lora_dropout,
                targets,
                freeze_layers: self.freeze_layers.unwrap_or(freeze),
                rslora: self.rslora,
            },
            hyper: crate::train::Hyper {
                batch_size: self.batch_size,
                grad_accum: self.grad_accum,
                epochs: self.epochs,
                lr: self.lr.unwrap_or(lr),
                weight_decay: self.weight_decay,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                scheduler: self.scheduler,
                warmup_steps: self.warmup_steps,
                max_grad_norm: self.max_grad_norm,
                label_smoothing: self.label_smoothing,
                shuffle: !self.no_shuffle,
                seed: self.seed,
                swap_augment: self.swap_augment,
                lora_dropout: lora_dropout as f32,
                checkpointing,
            },
            eval_data: self.eval_data.clone(),
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            resume: self.resume,
            log_file: self.log_file.clone(),
            progress: !self.quiet,
            ranks,
        })
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Prediction file (id,winner_model_a,winner_model_b,winner_tie).
    #[arg(long)]
    pub pred: PathBuf,
    /// Labelled arena CSV (with winner columns).
    #[arg(long)]
    pub labels: PathBuf,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Architecture (default: the preset's).
    #[arg(long)]
    pub arch: Option<Arch>,
    /// tiny, small (~100M), gemma-2-9b or llama-3.1-8b.
    #[arg(long)]
    pub preset: Preset,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage dtype (default: f32 for tiny and small, bf16 otherwise).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// tokenizer.json to copy into the directory.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Split the checkpoint into shards of at most this many MiB.
    #[arg(long, default_value_t = 4096)]
    pub max_shard_mib: usize,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where to write the demo's model, data and submission.
    #[arg(long, default_value = "engine-demo")]
    pub out_dir: PathBuf,
}

impl ModelArgs {
    pub fn load_options(&self) -> Result<LoadOptions> {
        let device = match self.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => {
                crate::cuda::availability()
                    .map_err(|why| Error::Usage(format!("--device cuda: {why}")))?;
                Device::Cuda(0)
            }
        };
        let quant = match (self.quant, self.double_quant) {
            (QuantArg::None, true) => {
                return Err(Error::Usage("--double-quant needs --quant nf4".into()));
            }
            (QuantArg::None, false) => Quant::None,
            (QuantArg::Nf4, dq) => Quant::Nf4 { double_quant: dq },
        };
        Ok(LoadOptions {
            device,
            dtype: self.dtype.map(DType::from),
            quant,
            adapter: self.adapter.clone(),
            seed: self.seed,
        })
    }
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        }
    }
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .map_err(|e| Error::Msg(format!("--threads: {e}")))?;
    }
    match cli.command {
        Command::Train(a) => {
            let opts = a.options()?;
            let r = crate::train::run(&opts)?;
            if let Some(last) = r.steps.last() {
                eprintln!(
                    "trained {} steps: last loss {:.4}, {:.0} tokens/s",
                    r.steps.len(),
                    last.loss,
                    r.tokens_per_second
                );
            }
            if let Some(l) = r.eval_log_loss {
                eprintln!("eval log loss {l:.5}");
            }
            println!("{}", r.out.display());
            Ok(())
        }
        Command::Infer(a) => {
            let load = a.model.load_options()?;
            let workers = match (&a.gpus, a.cpu_workers) {
                (Some(_), Some(_)) => {
                    return Err(Error::Usage(
                        "--gpus and --cpu-workers exclude each other".into(),
                    ));
                }
                (Some(gpus), None) => {
                    check_gpus(gpus)?;
                    gpus.iter().map(|&g| Device::Cuda(g)).collect()
                }
                (None, Some(n)) => vec![Device::Cpu; n.max(1)],
                (None, None) => vec![load.device],
            };
            let opts = InferOptions {
                load,
                workers,
                tta: a.tta,
                shard: a.shard,
                sort: !a.no_sort,
                resume: a.resume,
                model: a.model.model.clone(),
                tokenizer: a.model.tokenizer.clone(),
                format: a.model.format,
                max_length: a.model.max_length,
                data: a.data,
                out: a.out,
                batch_tokens: a.batch_tokens.max(1),
                batch_rows: a.batch_rows.max(1),
                progress: !a.quiet,
            };
            let r = infer::run(&opts)?;
            if let Some(path) = &a.log_file {
                append_infer_metrics(path, &opts, &r)?;
            }
            if r.workers.len() > 1 {
                for w in &r.workers {
                    eprintln!(
                        "  {}: {} batches, {} sequences, {} tokens, busy {:.2}s ({:.0} tokens/s), load {:.2}s",
                        w.name,
                        w.batches,
                        w.rows,
                        w.tokens,
                        w.busy_seconds,
                        w.tokens as f64 / w.busy_seconds.max(1e-9),
                        w.load_seconds
                    );
                }
            }
            eprintln!(
                "scored {} rows ({} tokens) in {:.2}s: {:.1} rows/s, {:.0} tokens/s (load {:.2}s)",
                r.rows,
                r.tokens,
                r.seconds,
                r.rows as f64 / r.seconds.max(1e-9),
                r.tokens_per_second(),
                r.load_seconds
            );
            if let Some(peak) = r.peak_gpu_bytes {
                eprintln!(
                    "peak GPU memory {:.2} GiB",
                    peak as f64 / (1u64 << 30) as f64
                );
            }
            if let (Some(l), Some(acc)) = (r.log_loss, r.accuracy) {
                eprintln!("log loss {l:.5}, accuracy {acc:.4} (the data file has labels)");
            }
            println!("{}", r.out.display());
            Ok(())
        }
        Command::Eval(a) => {
            let r = eval::run(&a.pred, &a.labels)?;
            println!(
                "log_loss {:.6}\naccuracy {:.6}\nrows {}",
                r.log_loss, r.accuracy, r.rows
            );
            Ok(())
        }
        Command::Ensemble(a) => crate::ensemble::run_cli(a),
        Command::Merge(a) => crate::merge::run_cli(a),
        Command::InitModel(a) => {
            let t = Instant::now();
            let params = init_model::run(&InitOptions {
                arch: a.arch,
                preset: a.preset,
                out: a.out.clone(),
                seed: a.seed,
                dtype: a.dtype.map(DType::from),
                tokenizer: a.tokenizer,
                max_shard_bytes: a.max_shard_mib.max(1) << 20,
            })?;
            eprintln!(
                "wrote {} ({params} parameters) in {:.1}s",
                a.out.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Demo(a) => demo::run(&a.out_dir),
    }
}

/// `--gpus`: every GPU exists here and is listed once.
fn check_gpus(list: &[usize]) -> Result<()> {
    let count =
        crate::cuda::availability().map_err(|why| Error::Usage(format!("--gpus: {why}")))?;
    for (i, &g) in list.iter().enumerate() {
        if g >= count {
            return Err(Error::Usage(format!(
                "--gpus: GPU {g} does not exist ({count} visible)"
            )));
        }
        if list[..i].contains(&g) {
            return Err(Error::Usage(format!("--gpus: GPU {g} is listed twice")));
        }
    }
    Ok(())
}

/// One JSON line describing an `engine infer` run, appended to `path`.
fn append_infer_metrics(path: &Path, opts: &InferOptions, r: &infer::InferReport) -> Result<()> {
    let workers: Vec<serde_json::Value> = r
        .workers
        .iter()
        .map(|w| {
            serde_json::json!({
                "name": w.name,
                "batches": w.batches,
                "sequences": w.rows,
                "tokens": w.tokens,
                "busy_s": w.busy_seconds,
                "load_s": w.load_seconds,
            })
        })
        .collect();
    // [worker, rows, tokens, longest, seconds] per batch, in the order they finished.
    let batches: Vec<serde_json::Value> = r
        .timings
        .iter()
        .map(|b| serde_json::json!([b.worker, b.rows, b.tokens, b.max_len, b.seconds]))
        .collect();
    let line = serde_json::json!({
        "event": "infer",
        "model": opts.model.display().to_string(),
        "data": opts.data.display().to_string(),
        "out": r.out.display().to_string(),
        "rows": r.rows,
        "tokens": r.tokens,
        "seconds": r.seconds,
        "load_s": r.load_seconds,
        "rows_per_s": r.rows as f64 / r.seconds.max(1e-9),
        "tokens_per_s": r.tokens_per_second(),
        "peak_gpu_bytes": r.peak_gpu_bytes,
        "log_loss": r.log_loss,
        "accuracy": r.accuracy,
        "sort": opts.sort,
        "tta": opts.tta,
        "shard": opts.shard.map(|s| s.to_string()),
        "max_length": opts.max_length,
        "batch_tokens": opts.batch_tokens,
        "batch_rows": opts.batch_rows,
        "workers": workers,
        "batches": batches,
    });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

/// Exit code for an error.
pub fn exit_code(e: &Error) -> i32 {
    match e.root() {
        Error::Usage(_) => 2,
        _ => 1,
    }
}
