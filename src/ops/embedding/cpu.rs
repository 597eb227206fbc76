//! CPU twin of the embedding gather.

use crate::tensor::CpuStorage;

pub(super) fn embed(table: &CpuStorage, h: usize, ids: &[u32], scale: f32) -> Vec<f32> {
    let mut y = vec![0f32; ids.len() * h];
    for (row, &id) in y.chunks_mut(h).zip(ids) {
        table.read_f32(id as usize * h, row);
        if scale != 1.0 {
            for x in row.iter_mut() {
                *x *= scale;
            }
        }
    }
    y
}

pub(super) fn gather_rows(x: &[f32], h: usize, idx: &[usize]) -> Vec<f32> {
    let mut y = Vec::with_capacity(idx.len() * h);
    for &i in idx {
        y.extend_from_slice(&x[i * h..(i + 1) * h]);
    }
    y
}
