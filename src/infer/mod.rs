//! `engine infer`: score every row of an arena CSV and write a submission.
//!
//! Rows are tokenised once (in parallel), sorted longest first and packed into batches under
//! a token budget, run through the model, and their probabilities put back in input order.
//! The submission is written atomically only after every row is scored.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::data::batch::{TokenBatch, plan_batches};
use crate::data::csv::{ArenaRow, Labels, read_arena_csv};
use crate::data::format::{Encoder, TextFormat};
use crate::error::{Error, Result};
use crate::io::AtomicFile;
use crate::metrics;
use crate::models::{self, LoadOptions, Model, ModelHeader};
use crate::predictions;

/// Everything `engine infer` needs.
#[derive(Clone, Debug)]
pub struct InferOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub load: LoadOptions,
    /// `tokenizer.json` to use instead of the model directory's.
    pub tokenizer: Option<PathBuf>,
    pub format: TextFormat,
    pub max_length: usize,
    /// Token budget of one packed batch.
    pub batch_tokens: usize,
    /// Row limit of one packed batch.
    pub batch_rows: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct InferReport {
    pub rows: usize,
    pub tokens: usize,
    pub load_seconds: f64,
    pub seconds: f64,
    /// Log loss and accuracy when the data file has winner columns.
    pub log_loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub out: PathBuf,
    /// Peak device memory of the run (GPU runs only).
    pub peak_gpu_bytes: Option<usize>,
}

impl InferReport {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Build the encoder for a model from its header (config.json), checking the tokenizer
/// against the embedding table.
pub fn encoder_for(
    header: &ModelHeader,
    model_dir: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    format: TextFormat,
    max_length: usize,
) -> Result<Encoder> {
    let eos = header.eos_token_id.ok_or_else(|| {
        Error::Model(format!(
            "{}: config.json has no eos_token_id",
            model_dir.join("config.json").display()
        ))
    })?;
    if header.pad_token_id == Some(eos) {
        eprintln!(
            "note: pad_token_id equals the EOS id ({eos}): as in transformers, the classifier reads the \
             last token that is not the pad id, i.e. the one before the appended EOS"
        );
    }
    let path = tokenizer
        .map(PathBuf::from)
        .unwrap_or_else(|| model_dir.join("tokenizer.json"));
    Encoder::from_file(&path, eos, header.vocab_size, format, max_length)
}

/// Tokenise rows in parallel.
pub fn tokenize(encoder: &Encoder, rows: &[ArenaRow]) -> Result<Vec<Vec<u32>>> {
    rows.par_iter()
        .map(|r| {
            encoder
                .encode(r)
                .map_err(|e| e.context(format!("row id {}", r.id)))
        })
        .collect()
}

/// Probabilities for already tokenised rows, in their order.
pub fn predict(
    model: &Model,
    ids: &[Vec<u32>],
    batch_tokens: usize,
    batch_rows: usize,
    bar: Option<&ProgressBar>,
) -> Result<Vec<[f64; 3]>> {
    let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    let mut out = vec![[0f64; 3]; ids.len()];
    let start = Instant::now();
    let mut done_tokens = 0usize;
    for batch_rows_idx in plan_batches(&lens, batch_tokens, batch_rows) {
        let rows: Vec<&[u32]> = batch_rows_idx.iter().map(|&i| ids[i].as_slice()).collect();
        let batch = TokenBatch::from_rows(&rows);
        let probs = models::probabilities(&model.forward(&batch)?)?;
        if let Some((&i, _)) = batch_rows_idx
            .iter()
            .zip(&probs)
            .find(|(_, p)| p.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::Msg(format!(
                "row {} (input order): the model produced non-finite probabilities; check the \
                 checkpoint for inf/NaN weights and config.json for invalid values (rms_norm_eps, rope_theta)",
                i + 1
            )));
        }
        for (&i, p) in batch_rows_idx.iter().zip(probs) {
            out[i] = p;
        }
        done_tokens += batch.tokens();
        if let Some(b) = bar {
            b.inc(batch_rows_idx.len() as u64);
            b.set_message(format!(
                "{:.0} tokens/s",
                done_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)
            ));
        }
    }
    Ok(out)
}

/// Run `engine infer`.
pub fn run(opts: &InferOptions) -> Result<InferReport> {
    let data = read_arena_csv(&opts.data, Labels::IfPresent)?;
    for w in data.warnings() {
        eprintln!("warning: {w}");
    }
    // Everything that can fail fast does so before the weights are read.
    let mut out_file = AtomicFile::create(&opts.out)?;
    let header = models::read_header(&opts.model)?;
    let encoder = encoder_for(
        &header,
        &opts.model,
        opts.tokenizer.as_deref(),
        opts.format,
        opts.max_length,
    )?;
    let t0 = Instant::now();
    let ids = tokenize(&encoder, &data.rows)?;
    let model = models::load(&opts.model, &opts.load)?;
    let info = model.info();
    eprintln!(
        "model: {} ({} layers, hidden {}, {:.1}M parameters, {:.2} GiB of weights on {}; score head: {})",
        info.model_type,
        info.num_layers,
        info.hidden_size,
        info.parameters as f64 / 1e6,
        info.weight_bytes as f64 / (1u64 << 30) as f64,
        opts.load.device,
        info.score_source
    );
    let load_seconds = t0.elapsed().as_secs_f64();
    let tokens: usize = ids.iter().map(Vec::len).sum();

    let bar = opts.progress.then(|| {
        let b = ProgressBar::with_draw_target(
            Some(data.rows.len() as u64),
            ProgressDrawTarget::stderr(),
        );
        b.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} rows  {per_sec}  {msg}  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    let t1 = Instant::now();
    let probs = predict(
        &model,
        &ids,
        opts.batch_tokens,
        opts.batch_rows,
        bar.as_ref(),
    )?;
    let seconds = t1.elapsed().as_secs_f64();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let row_ids: Vec<String> = data.rows.iter().map(|r| r.id.clone()).collect();
    predictions::write_to(&mut out_file, &opts.out, &row_ids, &probs)?;
    out_file.commit()?;

    let (log_loss, accuracy) = if data.has_labels && !data.rows.is_empty() {
        let labels: Vec<[f64; 3]> = data.rows.iter().filter_map(|r| r.label).collect();
        (
            Some(metrics::log_loss(&labels, &probs)),
            Some(metrics::accuracy(&labels, &probs)),
        )
    } else {
        (None, None)
    };
    Ok(InferReport {
        rows: data.rows.len(),
        tokens,
        load_seconds,
        seconds,
        log_loss,
        accuracy,
        out: opts.out.clone(),
        peak_gpu_bytes: match opts.load.device {
            crate::tensor::Device::Cuda(i) => Some(crate::cuda::device(i)?.peak_bytes()),
            crate::tensor::Device::Cpu => None,
        },
    })
}
