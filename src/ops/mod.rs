//! The ops the two backbones are made of, one folder per op family.
//!
//! Each folder has `mod.rs` (the public op: argument checks, then a `match` on the device that
//! forwards to a backend) and `cpu.rs` (the readable f32 reference, which is also the oracle
//! the CUDA kernels of `kernels/<op>.cu` are tested against). Ops take and return [`Tensor`](crate::tensor::Tensor)s
//! and never mutate their inputs.
//!
//! Activations are packed "varlen" batches: the tokens of all rows of a batch are
//! concatenated into one `[tokens, features]` matrix, and the ops that mix tokens (attention)
//! receive the row boundaries in a [`SeqLayout`]. No padding is ever computed.

pub mod activation;
pub mod attention;
pub mod cpu_math;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod rope;

/// Row boundaries of a packed batch: row `i` owns tokens `offsets[i]..offsets[i + 1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLayout {
    offsets: Vec<usize>,
}

impl SeqLayout {
    pub fn from_lens(lens: &[usize]) -> Self {
        let mut offsets = Vec::with_capacity(lens.len() + 1);
        offsets.push(0);
        let mut acc = 0;
        for &l in lens {
            acc += l;
            offsets.push(acc);
        }
        SeqLayout { offsets }
    }

    pub fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn total_tokens(&self) -> usize {
        *self.offsets.last().unwrap_or(&0)
    }

    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Token range of row `i`.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }

    pub fn len(&self, i: usize) -> usize {
        self.offsets[i + 1] - self.offsets[i]
    }

    /// Position of every token within its row (0, 1, 2, … restarting at each row).
    pub fn positions(&self) -> Vec<u32> {
        let mut p = Vec::with_capacity(self.total_tokens());
        for i in 0..self.rows() {
            p.extend(0..self.len(i) as u32);
        }
        p
    }
}
