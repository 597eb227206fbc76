//! `engine`: fine-tune and run Gemma-2 and Llama-3.1 as 3-way preference classifiers for the
//! LMSYS Chatbot Arena task, on hand-written kernels with no ML framework.
//!
//! Layers, each using only those below it:
//! - [`cli`] → [`infer`], [`train`], [`eval`], [`ensemble`], [`merge`], [`init_model`], [`demo`]
//! - [`models`] (one file per backbone) → [`lora`] (PEFT adapters)
//! - [`ops`] (one folder per op family, CPU twin beside each)
//! - [`weights`] (safetensors), [`quant`] (NF4), [`data`] (CSV → tokens → batches)
//! - [`tensor`], [`metrics`], [`predictions`], [`io`], [`error`]

pub mod autograd;
pub mod cli;
pub mod cuda;
pub mod data;
pub mod demo;
pub mod dist;
pub mod ensemble;
pub mod error;
pub mod eval;
pub mod infer;
pub mod init_model;
pub mod io;
pub mod lora;
pub mod merge;
pub mod metrics;
pub mod models;
pub mod ops;
pub mod predictions;
pub mod quant;
pub mod shard;
pub mod tensor;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
