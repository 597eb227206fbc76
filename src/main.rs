use clap::Parser;

fn main() {
    let cli = engine::cli::Cli::parse();
    if let Err(e) = engine::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(engine::cli::exit_code(&e));
    }
}
