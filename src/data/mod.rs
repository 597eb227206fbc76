//! The data path before the model: arena CSV rows → text format → token ids → packed batches.

pub mod batch;
pub mod csv;
pub mod format;
pub mod json_list;
