//! `engine infer`: score every row of an arena CSV and write a submission.
//!
//! Rows are tokenised once (in parallel), sorted longest first and packed into batches under
//! a token budget, handed to whichever worker (one per GPU, [`pool`]) is free next, and their
//! probabilities put back in input order. The submission is written atomically only after
//! every row is scored; if workers fail and rows stay unscored, the finished rows go to
//! `<out>.partial.csv` (a shard file, which `engine merge` refuses as incomplete) and the run
//! fails naming each failed device and the rows it held.
//!
//! With test-time augmentation every row is also scored with A and B swapped (the `turns`
//! format swaps their tokens exactly); the swapped run's A and B probabilities are exchanged
//! back and averaged with the plain run's. With `--shard K/N` only the rows i with
//! i mod N = K are scored, into a shard file for `engine merge`.

pub mod pool;

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::data::batch::{TokenBatch, plan_batches, plan_batches_unsorted};
use crate::data::csv::{ArenaRow, Labels, read_arena_csv};
use crate::data::format::{Encoder, TextFormat};
use crate::error::{Error, Result};
use crate::io::AtomicFile;
use crate::metrics;
use crate::models::{self, LoadOptions, Model, ModelHeader};
use crate::predictions;
use crate::shard::{self, Shard};
use crate::tensor::Device;

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
    /// One worker per device, each with its own model copy (`load.device` is ignored). Several
    /// CPU workers stand in for GPUs in tests.
    pub workers: Vec<Device>,
    /// Also score every row with A and B swapped and average.
    pub tta: bool,
    /// Score only this shard of the rows, into a shard file.
    pub shard: Option<Shard>,
    /// Sort rows by length before packing (off only to measure what sorting is worth).
    pub sort: bool,
    /// Take the rows a failed run finished from its `<out>.partial.csv` and score only the rest.
    pub resume: bool,
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
    /// Peak device memory of the run (GPU runs only; the largest over the GPUs).
    pub peak_gpu_bytes: Option<usize>,
    /// What each worker did.
    pub workers: Vec<pool::WorkerStats>,
    /// Every batch's size and time, in the order they finished.
    pub timings: Vec<pool::BatchTiming>,
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

/// A model on one device, scoring packed batches.
struct ModelScorer {
    model: Model,
    /// Batches left before an injected failure ([`FAULT_VAR`]).
    fail_in: Option<usize>,
}

impl pool::Scorer for ModelScorer {
    fn score(&mut self, rows: &[&[u32]]) -> Result<Vec<[f64; 3]>> {
        if let Some(n) = self.fail_in.as_mut() {
            if *n == 0 {
                return Err(Error::Msg(format!("injected failure ({FAULT_VAR})")));
            }
            *n -= 1;
        }
        let batch = TokenBatch::from_rows(rows);
        models::probabilities(&self.model.forward(&batch)?)
    }
}

/// Fault injection for tests of worker failure (a GPU cannot be made to fail on demand):
/// `W:N` makes worker W fail on its batch N+1 (after N good ones). Not for users.
pub const FAULT_VAR: &str = "ENGINE_INJECT_WORKER_FAULT";

/// The batches worker `w` scores before its injected failure, if [`FAULT_VAR`] names it.
fn injected_fault(w: usize) -> Result<Option<usize>> {
    let Ok(spec) = std::env::var(FAULT_VAR) else {
        return Ok(None);
    };
    let parsed = spec
        .split_once(':')
        .and_then(|(a, b)| Some((a.trim().parse::<usize>().ok()?, b.trim().parse().ok()?)));
    match parsed {
        Some((worker, after)) => Ok((worker == w).then_some(after)),
        None => Err(Error::Usage(format!(
            "{FAULT_VAR}=`{spec}`: expected WORKER:BATCHES (e.g. 1:2)"
        ))),
    }
}

/// Exchange A and B of a probability triple.
pub fn swap_ab(p: [f64; 3]) -> [f64; 3] {
    [p[1], p[0], p[2]]
}

/// The test-time-augmented prediction: the plain one averaged with the swapped row's, whose A
/// and B are exchanged back.
pub fn tta_average(plain: [f64; 3], swapped: [f64; 3]) -> [f64; 3] {
    let s = swap_ab(swapped);
    [
        0.5 * (plain[0] + s[0]),
        0.5 * (plain[1] + s[1]),
        0.5 * (plain[2] + s[2]),
    ]
}

/// Run `engine infer`.
pub fn run(opts: &InferOptions) -> Result<InferReport> {
    let data = read_arena_csv(&opts.data, Labels::IfPresent)?;
    for w in data.warnings() {
        eprintln!("warning: {w}");
    }
    if opts.workers.is_empty() {
        return Err(Error::Usage("no device to run on".into()));
    }
    let total_rows = data.rows.len();
    // The input rows this run scores (all of them, or one shard's).
    let picked: Vec<usize> = match opts.shard {
        Some(s) => s.rows(total_rows),
        None => (0..total_rows).collect(),
    };
    if let Some(s) = opts.shard
        && picked.is_empty()
    {
        return Err(Error::Usage(format!(
            "--shard {s}: {} has only {total_rows} rows, so this shard would be empty",
            opts.data.display()
        )));
    }
    let rows: Vec<&ArenaRow> = picked.iter().map(|&i| &data.rows[i]).collect();
    let n_rows = rows.len();
    let partial = partial_path(&opts.out);
    // Rows a failed run already scored (--resume), and the rows left to score.
    let known = if opts.resume {
        resume_from(&partial, opts.shard, total_rows, &picked, &rows)?
    } else {
        vec![None; n_rows]
    };
    let todo: Vec<usize> = (0..n_rows).filter(|&r| known[r].is_none()).collect();
    let n_todo = todo.len();
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
    // Sequences: the rows, then (with TTA) the same rows with A and B swapped.
    let owned: Vec<ArenaRow> = todo.iter().map(|&r| rows[r].clone()).collect();
    let mut seqs = tokenize(&encoder, &owned)?;
    if opts.tta {
        let swapped: Vec<ArenaRow> = owned.iter().map(ArenaRow::swapped).collect();
        seqs.extend(tokenize(&encoder, &swapped)?);
    }
    let tokenize_seconds = t0.elapsed().as_secs_f64();
    let tokens: usize = seqs.iter().map(Vec::len).sum();
    let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let batches = if opts.sort {
        plan_batches(&lens, opts.batch_tokens, opts.batch_rows)
    } else {
        plan_batches_unsorted(&lens, opts.batch_tokens, opts.batch_rows)
    };

    let names: Vec<String> = opts
        .workers
        .iter()
        .enumerate()
        .map(|(w, d)| {
            if opts.workers.iter().filter(|e| *e == d).count() > 1 {
                format!("{d}#{w}")
            } else {
                d.to_string()
            }
        })
        .collect();
    eprintln!(
        "{} rows{}{} → {} sequences, {} tokens, {} batches (≤ {} tokens) on {}",
        n_todo,
        opts.shard
            .map(|s| format!(" (shard {s} of {total_rows})"))
            .unwrap_or_default(),
        if opts.tta { ", TTA" } else { "" },
        seqs.len(),
        tokens,
        batches.len(),
        opts.batch_tokens,
        names.join(", ")
    );
    let bar = opts.progress.then(|| {
        let b =
            ProgressBar::with_draw_target(Some(seqs.len() as u64), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} sequences  {per_sec}  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    let described = std::sync::atomic::AtomicBool::new(false);
    let make = |w: usize| -> Result<ModelScorer> {
        let device = opts.workers[w];
        if let Device::Cuda(i) = device {
            crate::cuda::device(i)?.bind()?;
        }
        let load = LoadOptions {
            device,
            ..opts.load.clone()
        };
        let model = models::load(&opts.model, &load)?;
        if !described.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let info = model.info();
            eprintln!(
                "model: {} ({} layers, hidden {}, {:.1}M parameters, {:.2} GiB of weights per device; score head: {})",
                info.model_type,
                info.num_layers,
                info.hidden_size,
                info.parameters as f64 / 1e6,
                info.weight_bytes as f64 / (1u64 << 30) as f64,
                info.score_source
            );
        }
        Ok(ModelScorer {
            model,
            fail_in: injected_fault(w)?,
        })
    };
    let validate = |idx: &[usize], probs: &[[f64; 3]]| -> Result<()> {
        match idx
            .iter()
            .zip(probs)
            .find(|(_, p)| p.iter().any(|v| !v.is_finite()))
        {
            Some((&i, _)) => {
                let r = todo[i % n_todo];
                Err(Error::Msg(format!(
                    "row {} (id {}{}): the model produced non-finite probabilities; check the \
                     checkpoint for inf/NaN weights and config.json for invalid values (rms_norm_eps, rope_theta)",
                    picked[r] + 1,
                    rows[r].id,
                    if i >= n_todo { ", A and B swapped" } else { "" }
                )))
            }
            None => Ok(()),
        }
    };
    let start = Instant::now();
    let mut done_tokens = 0usize;
    let result = if seqs.is_empty() {
        // Everything came from the partial file: no model to load.
        Ok(pool::PoolResult {
            probs: Vec::new(),
            workers: Vec::new(),
            failures: Vec::new(),
            timings: Vec::new(),
        })
    } else {
        pool::run(&names, make, &seqs, &batches, &validate, |n, t| {
            done_tokens += t;
            if let Some(b) = &bar {
                b.inc(n as u64);
                b.set_message(format!(
                    "{:.0} tokens/s",
                    done_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)
                ));
            }
        })
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let result = result?;
    let seconds = start.elapsed().as_secs_f64();
    let load_seconds = tokenize_seconds
        + result
            .workers
            .iter()
            .map(|w| w.load_seconds)
            .fold(0.0, f64::max);
    for f in &result.failures {
        let ids: Vec<&str> = f
            .held
            .iter()
            .map(|&i| rows[todo[i % n_todo]].id.as_str())
            .collect();
        eprintln!(
            "error: {} failed{}: {}",
            f.worker,
            if ids.is_empty() {
                String::new()
            } else {
                format!(
                    " holding {} row(s) (ids {}{})",
                    ids.len(),
                    ids.iter().take(8).copied().collect::<Vec<_>>().join(", "),
                    if ids.len() > 8 { ", …" } else { "" }
                )
            },
            f.error
        );
    }

    // A row is done when its sequence (and, with TTA, its swapped twin) is.
    let mut combined = known;
    for (k, &r) in todo.iter().enumerate() {
        combined[r] = match (result.probs[k], opts.tta) {
            (Some(p), false) => Some(p),
            (Some(p), true) => result.probs[n_todo + k].map(|s| tta_average(p, s)),
            (None, _) => None,
        };
    }
    let missing: Vec<usize> = (0..n_rows).filter(|&r| combined[r].is_none()).collect();
    if !missing.is_empty() {
        drop(out_file);
        let done: Vec<usize> = (0..n_rows).filter(|&r| combined[r].is_some()).collect();
        let mut f = AtomicFile::create(&partial)?;
        shard::write_to(
            &mut f,
            &partial,
            opts.shard.unwrap_or(Shard { index: 0, count: 1 }),
            total_rows,
            &done.iter().map(|&r| picked[r]).collect::<Vec<_>>(),
            &done.iter().map(|&r| rows[r].id.clone()).collect::<Vec<_>>(),
            &done.iter().filter_map(|&r| combined[r]).collect::<Vec<_>>(),
        )?;
        f.commit()?;
        return Err(Error::Msg(format!(
            "{} of {} rows were not scored because {} worker(s) failed (see above); the {} finished \
             rows are in {} (not a submission; the same command with --resume scores only the \
             rest); {} was not written",
            missing.len(),
            n_rows,
            result.failures.len(),
            done.len(),
            partial.display(),
            opts.out.display()
        )));
    }
    let probs: Vec<[f64; 3]> = combined.into_iter().flatten().collect();
    let row_ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    match opts.shard {
        Some(s) => shard::write_to(
            &mut out_file,
            &opts.out,
            s,
            total_rows,
            &picked,
            &row_ids,
            &probs,
        )?,
        None => predictions::write_to(&mut out_file, &opts.out, &row_ids, &probs)?,
    }
    out_file.commit()?;
    if opts.resume && partial.exists() {
        // Its rows are in the output now.
        std::fs::remove_file(&partial).map_err(|e| Error::io(&partial, e))?;
    }

    let (log_loss, accuracy) = if data.has_labels && n_rows > 0 {
        let labels: Vec<[f64; 3]> = rows.iter().filter_map(|r| r.label).collect();
        (
            Some(metrics::log_loss(&labels, &probs)),
            Some(metrics::accuracy(&labels, &probs)),
        )
    } else {
        (None, None)
    };
    let mut peak = None;
    for d in &opts.workers {
        if let Device::Cuda(i) = d {
            let p = crate::cuda::device(*i)?.peak_bytes();
            peak = Some(peak.map_or(p, |q: usize| q.max(p)));
        }
    }
    Ok(InferReport {
        rows: n_rows,
        tokens,
        load_seconds,
        seconds,
        log_loss,
        accuracy,
        out: opts.out.clone(),
        peak_gpu_bytes: peak,
        workers: result.workers,
        timings: result.timings,
    })
}

/// The probabilities of the rows in `partial` (a failed run's finished rows), by position in
/// `rows`; `None` for the rest. The file must come from a run over the same input and shard:
/// every row's id must be the input's id at that row.
fn resume_from(
    partial: &std::path::Path,
    shard: Option<Shard>,
    total_rows: usize,
    picked: &[usize],
    rows: &[&ArenaRow],
) -> Result<Vec<Option<[f64; 3]>>> {
    let mut known = vec![None; rows.len()];
    let header_only = match std::fs::read_to_string(partial) {
        Ok(text) => text.lines().filter(|l| !l.trim().is_empty()).count() <= 1,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "note: --resume: no {}, scoring every row",
                partial.display()
            );
            return Ok(known);
        }
        Err(e) => return Err(Error::io(partial, e)),
    };
    if header_only {
        return Ok(known);
    }
    let file = shard::read(partial)?;
    let want = shard.unwrap_or(Shard { index: 0, count: 1 });
    if file.shard != want || file.total_rows != total_rows {
        return Err(Error::Usage(format!(
            "--resume: {} holds shard {} of an input of {} rows, but this run is shard {want} of \
             {total_rows} rows; rerun with the --data and --shard that wrote it, or delete it",
            partial.display(),
            file.shard,
            file.total_rows
        )));
    }
    let position: std::collections::HashMap<usize, usize> =
        picked.iter().enumerate().map(|(k, &i)| (i, k)).collect();
    for r in &file.rows {
        // shard::read has checked that every row belongs to the shard.
        let Some(&k) = position.get(&r.row) else {
            continue;
        };
        if rows[k].id != r.id {
            return Err(Error::data(
                partial,
                None,
                Some("id"),
                format!(
                    "input row {} has id `{}` here but `{}` in the input: the file comes from \
                     another input; delete it to start over",
                    r.row, r.id, rows[k].id
                ),
            ));
        }
        known[k] = Some(r.probs);
    }
    eprintln!(
        "resuming: {} of {} rows from {}",
        known.iter().filter(|p| p.is_some()).count(),
        rows.len(),
        partial.display()
    );
    Ok(known)
}

/// Where the finished rows of a failed run go: `<out>.partial.csv`.
pub fn partial_path(out: &std::path::Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial.csv");
    out.with_file_name(name)
}
