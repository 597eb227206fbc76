//! Build script. The CUDA kernels in `kernels/` are compiled here once the CUDA backend lands;
//! until then the build is CPU-only and needs no nvcc.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rustc-env=ENGINE_CUDA_KERNELS=none built");
}
