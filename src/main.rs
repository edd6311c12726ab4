//! The `spextract` binary: parse, run the subcommand, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use spextract::cli::{self, Cli, Command};

fn main() -> ExitCode {
    // Before any thread starts: BLAS/OpenMP threads to 1 unless the user chose otherwise,
    // since spextract threads over patches itself.
    let kept = spextract::pipeline::env::pin_blas_threads();
    let args = Cli::parse();
    let log_dir = match &args.command {
        Command::Extract(a) => a.run.log_dir.clone(),
        _ => None,
    };
    let launch = spextract::pipeline::env::launch();
    if let Err(e) = init_logging(log_dir.as_deref(), &launch) {
        eprintln!("error: {}", spextract::error_line(e.as_ref()));
        return ExitCode::from(2);
    }
    // Under MPI every line says which rank wrote it.
    let span = launch
        .under_mpi
        .then(|| tracing::info_span!("rank", r = launch.rank).entered());
    for (var, value) in kept.iter().filter(|(_, v)| v.trim() != "1") {
        tracing::warn!(
            "{var}={value} kept as set: BLAS threads inside spextract's own threads oversubscribe \
             the cores; unset it or set it to 1"
        );
    }
    spextract::extract::cpu::lapack::single_threaded_blas();
    tracing::debug!(
        "OpenBLAS threads per call: {}",
        spextract::extract::cpu::lapack::blas_threads()
    );
    let code = match run(&args) {
        Ok(code) => code,
        Err(e) => {
            // With per-rank logs the error goes through the log (stderr and the rank's file);
            // otherwise straight to stderr.
            let line = spextract::error_line(e.as_ref());
            if log_dir.is_some() {
                tracing::error!("{line}");
            } else {
                eprintln!("error: {line}");
            }
            ExitCode::from(2)
        }
    };
    drop(span);
    code
}

/// stderr gets `SPEXTRACT_LOG` (default: info on rank 0, warnings elsewhere, so that a
/// thousand ranks do not repeat each other); with `--log-dir`, each rank also writes its own
/// full log there.
fn init_logging(
    log_dir: Option<&std::path::Path>,
    launch: &spextract::pipeline::env::Launch,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let default = if launch.rank == 0 { "info" } else { "warn" };
    let filter =
        EnvFilter::try_from_env("SPEXTRACT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let file = match log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the log folder {}", dir.display()))?;
            let path = dir.join(format!("rank-{:04}.log", launch.rank));
            let f = std::fs::File::create(&path)
                .with_context(|| format!("creating the log {}", path.display()))?;
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::sync::Mutex::new(f))
                    .with_target(false)
                    .with_ansi(false)
                    .with_filter(EnvFilter::new("info")),
            )
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .init();
    Ok(())
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
        Command::Report(a) => {
            if !cli::report::run(a)? {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Compare(a) => {
            if !cli::compare::run(a)? {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
