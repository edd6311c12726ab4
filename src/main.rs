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
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            let line = spextract::error_line(e.as_ref());
            if launch.under_mpi {
                // Every rank meets the same error before the run (the same arguments and
                // files): rank 0 and the first rank of each other node (whose GPU or files
                // may differ) say it on stderr, the others in their own log only.
                if launch.rank == 0 || launch.local_rank == 0 {
                    tracing::error!("{line}");
                } else {
                    tracing::info!("error: {line}");
                }
            } else if log_dir.is_some() {
                // With a log file the error goes through the log (stderr and the file).
                tracing::error!("{line}");
            } else {
                eprintln!("error: {line}");
            }
            ExitCode::from(2)
        }
    }
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
    // Under MPI every line says which rank wrote it, from whichever of its threads.
    let rank = launch.under_mpi.then_some(launch.rank);
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(|| spextract::pipeline::progress::StderrAroundBar)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .event_format(Line { rank })
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
                    .with_ansi(false)
                    .event_format(Line { rank })
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

/// A log line: time, level, the rank under MPI, the message. The rank is written into each
/// line rather than kept in a span, which would hold only on the thread that entered it and
/// only where its level passes the filter (ranks other than 0 log warnings only).
struct Line {
    rank: Option<usize>,
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Line
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing::Level;
        use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
        use tracing_subscriber::fmt::FormatFields;
        SystemTime.format_time(&mut w)?;
        let level = *event.metadata().level();
        let colour = match level {
            Level::ERROR => "31",
            Level::WARN => "33",
            Level::INFO => "32",
            Level::DEBUG => "34",
            Level::TRACE => "35",
        };
        if w.has_ansi_escapes() {
            write!(w, " \x1b[{colour}m{level:>5}\x1b[0m ")?;
        } else {
            write!(w, " {level:>5} ")?;
        }
        if let Some(r) = self.rank {
            write!(w, "rank {r}: ")?;
        }
        ctx.format_fields(w.by_ref(), event)?;
        writeln!(w)
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
