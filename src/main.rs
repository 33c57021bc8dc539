//! The `ferry` binary: parses the command line, builds the VM, and runs it on tokio.

use std::process::ExitCode;

use anyhow::Context;
use ferry::cli::{self, Action, Config};
use ferry::runtime::launch;
use tracing_subscriber::EnvFilter;

#[expect(
    clippy::print_stdout,
    reason = "-help and -version answer on stdout, as QEMU does"
)]
fn main() -> ExitCode {
    let action = match cli::parse(std::env::args().skip(1)) {
        Ok(action) => action,
        Err(error) => {
            eprintln!("ferry: {error}");
            return ExitCode::from(2);
        }
    };
    let config = match action {
        Action::Help => {
            print!("{}", cli::help_text());
            return ExitCode::SUCCESS;
        }
        Action::Version => {
            println!("ferry {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Action::Run(config) => *config,
    };
    init_tracing();
    match run(config) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("ferry: {}", one_line(&error));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, each cause once even where a message already quotes it.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("ferry=info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
}

fn run(config: Config) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ferry-control")
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(launch::launch(config))
}
