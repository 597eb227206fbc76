//! Weight quantisation formats.

pub mod nf4;
