//! The command line: parse arguments, call one function per subcommand, map errors to exit
//! codes (0 success, 1 failure, 2 bad usage).

use std::path::PathBuf;
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
    /// Score an arena CSV and write a submission.
    Infer(InferArgs),
    /// Log loss and accuracy of a prediction file against a labelled CSV.
    Eval(EvalArgs),
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
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
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
        Command::Infer(a) => {
            let opts = InferOptions {
                load: a.model.load_options()?,
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

/// Exit code for an error.
pub fn exit_code(e: &Error) -> i32 {
    match e.root() {
        Error::Usage(_) => 2,
        _ => 1,
    }
}
