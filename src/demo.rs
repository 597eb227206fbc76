//! `engine demo`: the main job on the embedded default — the bundled tiny Gemma-2 model scores
//! the bundled sample arena rows on the CPU, writes a submission and evaluates it.

use std::path::Path;

use crate::data::format::TextFormat;
use crate::error::{Error, Result};
use crate::infer::{self, InferOptions};
use crate::io::write_atomic;
use crate::models::LoadOptions;

const MODEL_CONFIG: &[u8] = include_bytes!("../assets/tiny/config.json");
const MODEL_WEIGHTS: &[u8] = include_bytes!("../assets/tiny/model.safetensors");
const TOKENIZER: &[u8] = include_bytes!("../assets/tiny/tokenizer.json");
const SAMPLE_ROWS: &[u8] = include_bytes!("../assets/demo/train.csv");

pub fn run(out_dir: &Path) -> Result<()> {
    let model = out_dir.join("model");
    std::fs::create_dir_all(&model).map_err(|e| Error::io(&model, e))?;
    write_atomic(&model.join("config.json"), MODEL_CONFIG)?;
    write_atomic(&model.join("model.safetensors"), MODEL_WEIGHTS)?;
    write_atomic(&model.join("tokenizer.json"), TOKENIZER)?;
    let data = out_dir.join("train.csv");
    write_atomic(&data, SAMPLE_ROWS)?;
    let out = out_dir.join("submission.csv");
    let opts = InferOptions {
        model: model.clone(),
        data,
        out,
        load: LoadOptions::default(),
        tokenizer: None,
        format: TextFormat::Turns,
        max_length: 512,
        batch_tokens: 8192,
        batch_rows: 64,
        workers: vec![crate::tensor::Device::Cpu],
        tta: false,
        shard: None,
        sort: true,
        resume: false,
        progress: true,
    };
    let r = infer::run(&opts)?;
    println!(
        "model:      {} (bundled tiny gemma2, random weights)",
        model.display()
    );
    println!("submission: {}", r.out.display());
    println!(
        "rows:       {} ({} tokens, {:.0} tokens/s on CPU)",
        r.rows,
        r.tokens,
        r.tokens_per_second()
    );
    if let (Some(l), Some(a)) = (r.log_loss, r.accuracy) {
        println!(
            "log loss:   {l:.5} (uniform guess: {:.5}); accuracy {a:.3}",
            3f64.ln()
        );
    }
    Ok(())
}
