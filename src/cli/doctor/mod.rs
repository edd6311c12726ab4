//! `spextract doctor`: checks the environment a run is about to use — the MPI library, ranks,
//! threads and cores, the BLAS thread variables, Slurm, the GPUs and how ranks would bind to
//! them, and the files and folders a run reads and writes — and prints one finding per line,
//! with a fix for anything not ok.
//!
//! One file per concern: `mpi`, `threads` (threads, cores and the BLAS variables), `slurm`,
//! `gpu` (devices), `cuda_libs` (the CUDA libraries), `gpu_probe` (gathering the GPU facts),
//! `binding`, `files` (output folders) and `frames` (a frame list). Each builds its findings by pure functions from explicit inputs, so
//! the tests do not depend on the machine; this file holds the command, the finding type, the
//! printing and [`run`], which gathers the real inputs. The facts come from the modules that
//! own them — `pipeline::env` for the process and MPI, `extract::gpu` for the GPUs — so no
//! file here calls MPI, CUDA or libc itself. Doctor normally runs as a single process and then
//! never initialises MPI; under `mpirun`/`srun` it initialises MPI, gathers the ranks'
//! hostnames, and rank 0 reports what it sees.

mod binding;
mod cuda_libs;
mod files;
mod fits_size;
mod frames;
mod gpu;
mod gpu_probe;
mod mpi;
mod slurm;
mod threads;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use crate::pipeline::env;

/// `spextract doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Worker threads per compute rank to check, as `extract --threads` takes them
    /// (0: SLURM_CPUS_PER_TASK, else the cores this process may use).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
    /// Check a launch of N ranks per node (readers and writers included) instead of the
    /// current one.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub ranks_per_node: Option<usize>,
    /// Reader ranks per node of the launch checked, as `extract --readers-per-node`.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = at_least_one)]
    pub readers_per_node: usize,
    /// Writer ranks per node of the launch checked, as `extract --writers-per-node`.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = at_least_one)]
    pub writers_per_node: usize,
    /// Compute ranks that may share one GPU, as `extract --ranks-per-gpu` (MPS).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = at_least_one)]
    pub ranks_per_gpu: usize,
    /// A folder the run will write to: checked to accept new files, or, when it does not exist
    /// yet, to be makeable as extract makes it (repeatable).
    #[arg(long = "output-dir", value_name = "DIR")]
    pub output_dirs: Vec<PathBuf>,
    /// A frame list, as `extract --frames` reads it: checks that every input is readable (and
    /// a whole FITS file, not one cut short) and
    /// that every output folder accepts new files (or can be made, as extract makes it).
    #[arg(long, value_name = "LIST")]
    pub frames: Option<PathBuf>,
    /// Print the findings as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".to_string()),
        Err(e) => Err(format!("not a whole number ({e})")),
    }
}

/// How a finding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing to do.
    Ok,
    /// A run works, but worse than it could, or may fail in some cases.
    Warn,
    /// A run would fail.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// ok, warn or fail.
    pub status: Status,
    /// What was checked (mpi, threads, blas, slurm, gpu, binding, output, frames, ...).
    pub topic: &'static str,
    /// What was found.
    pub found: String,
    /// How to fix it; set whenever the status is not ok.
    pub hint: Option<String>,
}

impl Finding {
    fn ok(topic: &'static str, found: impl Into<String>) -> Self {
        Finding {
            status: Status::Ok,
            topic,
            found: found.into(),
            hint: None,
        }
    }

    fn warn(topic: &'static str, found: impl Into<String>, hint: impl Into<String>) -> Self {
        Finding {
            status: Status::Warn,
            topic,
            found: found.into(),
            hint: Some(hint.into()),
        }
    }

    fn fail(topic: &'static str, found: impl Into<String>, hint: impl Into<String>) -> Self {
        Finding {
            status: Status::Fail,
            topic,
            found: found.into(),
            hint: Some(hint.into()),
        }
    }
}

/// A non-empty variable from a list of `(name, value)` pairs.
fn lookup<'a>(vars: &[(&str, Option<&'a str>)], name: &str) -> Option<&'a str> {
    vars.iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| *v)
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// `n` and the noun, plural unless `n` is 1.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn print_text(findings: &[Finding]) {
    let width = findings.iter().map(|f| f.topic.len()).max().unwrap_or(5);
    for f in findings {
        println!("{:<4}  {:<width$}  {}", f.status.label(), f.topic, f.found);
        if let Some(hint) = &f.hint {
            println!("{:<4}  {:<width$}  fix: {hint}", "", "");
        }
    }
    let count = |s| findings.iter().filter(|f| f.status == s).count();
    println!(
        "\n{} ok, {} warn, {} fail",
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail)
    );
}

/// Runs the checks and prints the findings; false when one failed. Under an MPI launcher
/// only rank 0 prints, and the other ranks return true.
pub fn run(args: &DoctorArgs) -> anyhow::Result<bool> {
    let launch = env::launch();
    // MPI_Init only under a launcher: a singleton init would start Open MPI's runtime (or
    // fail on a login node) just to report that there is one process.
    let session = if launch.under_mpi {
        Some(
            env::MpiSession::init_funneled()
                .context("MPI was initialised before doctor started")?,
        )
    } else {
        None
    };
    let threading = session.as_ref().map(|s| s.threading);
    let layout = session
        .as_ref()
        .map(|s| (s.rank(), mpi::layout_from_hosts(&s.hostnames())));
    if layout.as_ref().is_some_and(|(rank, _)| *rank != 0) {
        return Ok(true);
    }
    let layout = layout.map(|(_, l)| l);

    let mut findings = Vec::new();
    findings.extend(mpi::mpi_findings(
        &mpi::MpiFacts {
            library: env::mpi_library_version(),
            standard: env::mpi_standard(),
            cuda_aware: mpi::cuda_aware(session.is_some()),
            threading,
            layout: layout.clone(),
        },
        cfg!(feature = "cuda-aware-mpi"),
    ));

    let single = args.ranks_per_node.is_none() && layout.as_ref().is_none_or(|l| l.ranks == 1);
    let ranks_per_node = args
        .ranks_per_node
        .or(layout.as_ref().map(|l| l.on_first_node))
        .unwrap_or(launch.local_size);
    let slurm_cpus = env_var("SLURM_CPUS_PER_TASK").and_then(|v| v.trim().parse::<usize>().ok());
    let thread_count = env::thread_count(args.threads);
    findings.extend(threads::thread_findings(&threads::ThreadFacts {
        threads: thread_count.threads,
        source: if args.threads > 0 {
            threads::ThreadSource::Flag
        } else if slurm_cpus.is_some_and(|n| n > 0) {
            threads::ThreadSource::Slurm
        } else {
            threads::ThreadSource::Affinity
        },
        ranks_per_node,
        hypothetical: args.ranks_per_node.is_some(),
        node_cores: env::node_cores(),
        available_cores: env::available_cores(),
    }));

    findings.extend(threads::thread_cut_finding(&thread_count));

    // What the user set, not what `main` pinned since (see `env::initial_var`).
    let blas: Vec<(&str, Option<String>)> = env::BLAS_THREAD_VARS
        .iter()
        .map(|&n| (n, env::initial_var(n)))
        .collect();
    let blas: Vec<(&str, Option<&str>)> = blas.iter().map(|(n, v)| (*n, v.as_deref())).collect();
    findings.extend(threads::blas_findings(&blas));

    let slurm: Vec<(&str, Option<String>)> =
        slurm::SLURM_VARS.iter().map(|&n| (n, env_var(n))).collect();
    let slurm: Vec<(&str, Option<&str>)> = slurm.iter().map(|(n, v)| (*n, v.as_deref())).collect();
    findings.extend(slurm::slurm_findings(
        &slurm,
        slurm::ProcessFacts {
            threads: thread_count.threads,
            available_cores: env::available_cores(),
            node_cores: env::node_cores(),
        },
    ));

    let cuda_visible = env_var("CUDA_VISIBLE_DEVICES");
    let probe = gpu_probe::probe_gpus();
    findings.extend(gpu::gpu_findings(
        &probe,
        cuda_visible.as_deref(),
        lookup(&slurm, "SLURM_GPUS_ON_NODE"),
    ));

    findings.extend(binding::binding_findings(&binding::BindingPlan {
        ranks_per_node: (!single).then_some(ranks_per_node),
        hypothetical: args.ranks_per_node.is_some(),
        readers: args.readers_per_node,
        writers: args.writers_per_node,
        ranks_per_gpu: args.ranks_per_gpu,
        gpus: binding::gpu_labels(&probe, cuda_visible.as_deref()),
        per_task: env::slurm_binds_gpus_per_task(
            lookup(&slurm, "SLURM_GPUS_PER_TASK"),
            lookup(&slurm, "SLURM_GPU_BIND"),
        ),
    }));

    let probe_name = format!(".spextract-doctor-probe-{}", std::process::id());
    for dir in &args.output_dirs {
        findings.extend(files::output_dir_findings(dir, &probe_name));
    }
    if let Some(list) = &args.frames {
        findings.extend(frames::frames_findings(list, &probe_name));
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        print_text(&findings);
    }
    Ok(findings.iter().all(|f| f.status != Status::Fail))
}

/// The name of the probe file the folder tests write.
#[cfg(test)]
const PROBE: &str = ".spextract-doctor-probe-test";

/// The statuses of `findings`, in order (for the tests of every concern).
#[cfg(test)]
fn statuses(findings: &[Finding]) -> Vec<Status> {
    findings.iter().map(|f| f.status).collect()
}

/// The findings of one status (for the tests of every concern).
#[cfg(test)]
fn with_status(findings: &[Finding], status: Status) -> Vec<&Finding> {
    findings.iter().filter(|f| f.status == status).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_zero_counts_are_refused() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "spextract",
            "doctor",
            "--output-dir",
            "a",
            "--output-dir",
            "b",
            "--ranks-per-node",
            "6",
            "--json",
        ])
        .unwrap();
        let crate::cli::Command::Doctor(args) = cli.command else {
            panic!("not doctor");
        };
        assert_eq!(args.output_dirs, [PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(args.ranks_per_node, Some(6));
        assert_eq!((args.ranks_per_gpu, args.threads), (1, 0));
        assert!(args.json);
        let err = crate::cli::Cli::try_parse_from(["spextract", "doctor", "--ranks-per-gpu", "0"])
            .unwrap_err();
        assert!(err.to_string().contains("must be at least 1"), "{err}");
    }

    #[test]
    fn findings_serialise_with_lowercase_status() {
        let json = serde_json::to_value(Finding::warn("blas", "x", "y")).unwrap();
        assert_eq!(json["status"], "warn");
        assert_eq!(json["hint"], "y");
    }
}
