//! The `spextract` binary: parse, run the subcommand, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use spextract::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPEXTRACT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    spextract::extract::cpu::lapack::single_threaded_blas();
    let args = Cli::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Cli) -> anyhow::Result<ExitCode> {
    match &args.command {
        Command::Extract(a) => {
            if !cli::extract::run(a)? {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Simulate(a) => cli::simulate::run(a)?,
        Command::Bench(a) => cli::bench::run(a)?,
        Command::Doctor(a) => {
            if !cli::doctor::run(a)? {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Report(a) => cli::report::run(a)?,
        Command::Compare(a) => {
            if !cli::compare::run(a)? {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
