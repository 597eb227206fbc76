//! The CPU matrix product every CPU twin builds on: a thin, bounds-checked wrapper over the
//! `gemm` crate (a tuned, multi-threaded f32 GEMM with AVX2/AVX-512 kernels).

use gemm::Parallelism;

/// A read-only strided matrix view: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        MatRef {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns: element (r, c) of the result is
    /// element (c, r) of `data`.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        MatRef {
            data,
            rs: 1,
            cs: cols,
        }
    }

    fn check(&self, r: usize, c: usize, what: &str) {
        if r > 0 && c > 0 {
            let last = (r - 1) * self.rs + (c - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "gemm: {what} view {r}x{c} out of bounds"
            );
        }
    }
}

/// Use all rayon threads, or one (when the caller already parallelises over tasks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    All,
    One,
}

/// `dst[m×n] = (accumulate ? dst : 0) + scale · lhs[m×k] · rhs[k×n]`, with `dst` row-major
/// with row stride `dst_rs`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    scale: f32,
    threads: Threads,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    lhs.check(m, k, "lhs");
    rhs.check(k, n, "rhs");
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "gemm: dst view {m}x{n} out of bounds"
    );
    let par = match threads {
        Threads::All if rayon::current_num_threads() > 1 && m * n * k >= 32 * 1024 => {
            Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => Parallelism::None,
    };
    // SAFETY: the three views were bounds-checked above for exactly the m×k, k×n and m×n
    // index ranges gemm reads and writes; `dst` is borrowed mutably, so nothing aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product_with_strides() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        // dst = a · wᵀ, accumulated onto ones, scaled by 0.5.
        let mut dst = vec![1f32; m * n];
        sgemm(
            m,
            n,
            k,
            &mut dst,
            n,
            true,
            MatRef::rows(&a, k),
            MatRef::transposed(&w, k),
            0.5,
            Threads::All,
        );
        for r in 0..m {
            for c in 0..n {
                let s: f32 = (0..k).map(|i| a[r * k + i] * w[c * k + i]).sum();
                assert!((dst[r * n + c] - (1.0 + 0.5 * s)).abs() < 1e-5);
            }
        }
    }
}
