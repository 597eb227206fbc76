use clap::Parser;

/// mimalloc keeps freed pages for reuse: the ops allocate large activation buffers every
/// layer, and with the system allocator each one is a fresh mmap whose page faults cost ~8% of
/// CPU inference time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = engine::cli::Cli::parse();
    if let Err(e) = engine::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(engine::cli::exit_code(&e));
    }
}
