//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

/// The bundled tiny model (the demo's).
pub fn tiny_model() -> PathBuf {
    repo().join("assets/tiny")
}

pub fn demo_csv() -> PathBuf {
    repo().join("assets/demo/train.csv")
}

/// Run the `engine` binary.
pub fn engine(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("failed to start the engine binary")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Copy a directory (one level) into `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// The first GPU, or `None` after printing why GPU tests are skipped. Poison mode is on: every
/// buffer a kernel allocates starts as NaN, so unwritten output elements fail the comparison.
pub fn gpu(test: &str) -> Option<std::sync::Arc<engine::cuda::CudaDevice>> {
    match engine::cuda::availability() {
        Ok(_) => {
            let d = engine::cuda::device(0).expect("a visible GPU must open");
            d.set_poison(true);
            Some(d)
        }
        Err(why) => {
            // Straight to the process's stderr: the test harness captures print!/eprint!
            // output of passing tests, and a skip must never pass silently.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no GPU ({why})");
            None
        }
    }
}

/// Deterministic pseudo-random f32 values in [-scale, scale) (xorshift; seeded per call).
pub fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(0x2545_f491_4f6c_dd1d)
        | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Compare `got` against `want` elementwise with |g − w| ≤ atol + rtol·|w|; print the worst
/// pairs and panic on any failure (NaN always fails).
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut bad = Vec::new();
    let mut max_err = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        // Written so that a NaN error fails too.
        let within = err <= atol + rtol * w.abs();
        if !within {
            bad.push((i, g, w));
        }
        if err.is_finite() {
            max_err = max_err.max(err);
        }
    }
    if !bad.is_empty() {
        let show: Vec<String> = bad
            .iter()
            .take(8)
            .map(|(i, g, w)| format!("[{i}] got {g} want {w}"))
            .collect();
        panic!(
            "{what}: {} of {} elements out of tolerance (max |err| {max_err:e}); first: {}",
            bad.len(),
            got.len(),
            show.join(", ")
        );
    }
}
