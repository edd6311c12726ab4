//! `spextract doctor`: checks the environment a run is about to use — the MPI library, ranks,
//! threads and cores, the BLAS thread variables, Slurm, the GPUs and how ranks would bind to
//! them, and the files and folders a run reads and writes — and prints one finding per line,
//! with a fix for anything not ok.
//!
//! The findings are built by pure functions from explicit inputs, so the tests below do not
//! depend on the machine; [`run`] gathers the real inputs. Doctor normally runs as a single
//! process and then never initialises MPI; under `mpirun`/`srun` it initialises MPI, gathers
//! the ranks' hostnames, and rank 0 reports what it sees.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use crate::cli::select::{self as frames, FrameSelection};
use crate::pipeline::env;
use crate::pipeline::joblist::JobListError as FramesError;
use crate::pipeline::run::Layout;

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
    /// A folder the run will write to: checked to exist and accept new files (repeatable).
    #[arg(long = "output-dir", value_name = "DIR")]
    pub output_dirs: Vec<PathBuf>,
    /// A frame list, as `extract --frames` reads it: checks that every input is readable and
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

// ---------------------------------------------------------------------------------------------
// MPI

/// Whether the MPI library accepts device buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CudaAware {
    Yes,
    No,
    /// The library exports no `MPIX_Query_cuda_support` (not Open MPI): nothing to ask.
    NotExported,
    /// Exported, but it may only be called after MPI_Init, which a single process skips.
    NotQueried,
}

/// How the ranks of a launch sit on nodes, from their hostnames.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostLayout {
    ranks: usize,
    nodes: usize,
    min_per_node: usize,
    max_per_node: usize,
    /// Ranks on rank 0's node.
    on_first_node: usize,
}

fn layout_from_hosts(hosts: &[String]) -> HostLayout {
    let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
    for h in hosts {
        *per_host.entry(h.as_str()).or_default() += 1;
    }
    HostLayout {
        ranks: hosts.len(),
        nodes: per_host.len(),
        min_per_node: per_host.values().copied().min().unwrap_or(0),
        max_per_node: per_host.values().copied().max().unwrap_or(0),
        on_first_node: hosts.first().map_or(0, |h| per_host[h.as_str()]),
    }
}

struct MpiFacts {
    /// `MPI_Get_library_version`, or why it could not be read.
    library: Result<String, String>,
    /// `MPI_Get_version`: the MPI standard implemented.
    standard: (i32, i32),
    cuda_aware: CudaAware,
    /// The thread level MPI_Init_thread granted, when MPI was initialised.
    threading: Option<mpi::Threading>,
    /// The ranks, when a launcher started this process (MPI is then initialised).
    layout: Option<HostLayout>,
}

fn mpi_findings(facts: &MpiFacts, built_cuda_aware: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let (major, minor) = facts.standard;
    out.push(match &facts.library {
        Ok(text) => {
            // MPICH spreads its version over several lines; the first names it.
            let first = text
                .lines()
                .map(|l| l.trim_matches(|c: char| c == '\0' || c.is_whitespace()))
                .find(|l| !l.is_empty())
                .unwrap_or("unnamed library");
            Finding::ok("mpi", format!("{first} (MPI standard {major}.{minor})"))
        }
        Err(e) => Finding::warn(
            "mpi",
            format!("the MPI library's version string is unreadable: {e}"),
            "check which libmpi the binary loads (ldd target/release/spextract | grep mpi)",
        ),
    });
    out.push(match &facts.layout {
        None => Finding::ok(
            "launch",
            "single process: no mpirun/srun variables, MPI not initialised (run doctor under \
             mpirun or srun to see the ranks)",
        ),
        Some(l) => {
            let per_node = if l.min_per_node == l.max_per_node {
                format!("{} per node", l.max_per_node)
            } else {
                format!("{} to {} per node", l.min_per_node, l.max_per_node)
            };
            Finding::ok(
                "launch",
                format!(
                    "{} on {}, {per_node}",
                    count(l.ranks, "rank"),
                    count(l.nodes, "node")
                ),
            )
        }
    });
    if let Some(level) = facts.threading {
        let name = match level {
            mpi::Threading::Single => "MPI_THREAD_SINGLE",
            mpi::Threading::Funneled => "MPI_THREAD_FUNNELED",
            mpi::Threading::Serialized => "MPI_THREAD_SERIALIZED",
            mpi::Threading::Multiple => "MPI_THREAD_MULTIPLE",
        };
        out.push(if level >= mpi::Threading::Funneled {
            Finding::ok(
                "mpi",
                format!("thread level {name} (extract needs FUNNELED)"),
            )
        } else {
            Finding::fail(
                "mpi",
                format!("thread level {name} only: extract needs MPI_THREAD_FUNNELED"),
                "use an MPI library built with thread support (Open MPI and MPICH are by \
                 default)",
            )
        });
    }
    let feature = if built_cuda_aware {
        "built with the cuda-aware-mpi feature"
    } else {
        "built without the cuda-aware-mpi feature: GPU results travel through host memory"
    };
    out.push(match (facts.cuda_aware, built_cuda_aware) {
        (CudaAware::Yes, _) => Finding::ok("cuda-aware", format!("MPI is CUDA-aware; {feature}")),
        (CudaAware::No, false) => {
            Finding::ok("cuda-aware", format!("MPI is not CUDA-aware; {feature}"))
        }
        (CudaAware::No, true) => Finding::fail(
            "cuda-aware",
            format!("MPI is not CUDA-aware but spextract was {feature}"),
            "device buffers handed to this MPI crash the run: rebuild without \
             --features cuda-aware-mpi, or load a CUDA-aware MPI",
        ),
        (CudaAware::NotExported, false) => Finding::ok(
            "cuda-aware",
            format!("unknown (no MPIX_Query_cuda_support: not Open MPI); {feature}"),
        ),
        (CudaAware::NotExported, true) => Finding::warn(
            "cuda-aware",
            format!("unknown (no MPIX_Query_cuda_support: not Open MPI); spextract was {feature}"),
            "confirm in the MPI library's documentation that it takes device buffers, or \
             rebuild without --features cuda-aware-mpi",
        ),
        (CudaAware::NotQueried, false) => Finding::ok(
            "cuda-aware",
            format!("not asked: MPIX_Query_cuda_support needs MPI_Init; {feature}"),
        ),
        (CudaAware::NotQueried, true) => Finding::warn(
            "cuda-aware",
            format!("not asked (MPIX_Query_cuda_support needs MPI_Init); spextract was {feature}"),
            "run `mpirun -n 1 spextract doctor` to ask the library",
        ),
    });
    out
}

use crate::pipeline::env::mpix_query_cuda_support;

fn cuda_aware(mpi_initialised: bool) -> CudaAware {
    match mpix_query_cuda_support() {
        None => CudaAware::NotExported,
        Some(_) if !mpi_initialised => CudaAware::NotQueried,
        // SAFETY: MPI is initialised, the one precondition Open MPI documents for it.
        Some(query) => match unsafe { query() } {
            0 => CudaAware::No,
            _ => CudaAware::Yes,
        },
    }
}

/// Every rank's hostname, in rank order (collective: every rank must call it).
fn gather_hostnames(world: &mpi::topology::SimpleCommunicator) -> Vec<String> {
    use mpi::traits::Communicator;
    use mpi::traits::CommunicatorCollectives;
    // Fixed-width records keep the gather a single collective; MPI_MAX_PROCESSOR_NAME is 256
    // in Open MPI and 128 in MPICH, so nothing is cut.
    const WIDTH: usize = 256;
    let name = mpi::environment::processor_name().unwrap_or_else(|_| "unnamed".to_string());
    let mut mine = [0u8; WIDTH];
    let n = name.len().min(WIDTH);
    mine[..n].copy_from_slice(&name.as_bytes()[..n]);
    let mut all = vec![0u8; WIDTH * world.size() as usize];
    world.all_gather_into(&mine[..], &mut all[..]);
    all.chunks(WIDTH)
        .map(|c| {
            let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
            String::from_utf8_lossy(&c[..end]).into_owned()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Threads and cores

/// Where the thread count of a compute rank comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThreadSource {
    Flag,
    Slurm,
    Affinity,
}

struct ThreadFacts {
    threads: usize,
    source: ThreadSource,
    ranks_per_node: usize,
    /// Whether `ranks_per_node` is a launch asked about (`--ranks-per-node`), not this one.
    hypothetical: bool,
    node_cores: usize,
    available_cores: usize,
}

fn thread_findings(f: &ThreadFacts) -> Vec<Finding> {
    // The ranks of a launch only described on the command line get the cores their binding
    // gives them, which this process cannot know: its own affinity says nothing about them,
    // and without --threads there is no count to add up.
    let unknown = f.hypothetical && f.source == ThreadSource::Affinity;
    let per_rank = if unknown {
        "threads per compute rank: the cores each is bound to (pass --threads to check a count)"
            .to_string()
    } else {
        let source = match f.source {
            ThreadSource::Flag => "from --threads",
            ThreadSource::Slurm => "from SLURM_CPUS_PER_TASK",
            ThreadSource::Affinity => "the cores this process may use",
        };
        format!("{} per compute rank ({source})", count(f.threads, "thread"))
    };
    let mut out = vec![Finding::ok(
        "threads",
        format!(
            "{per_rank}; {} per node; the node has {}, this process may use {}",
            count(f.ranks_per_node, "rank"),
            count(f.node_cores, "core"),
            f.available_cores
        ),
    )];
    if unknown {
        return out;
    }
    if !f.hypothetical && f.threads > f.available_cores {
        out.push(Finding::warn(
            "threads",
            format!(
                "{} per rank, but this process may run on only {} (its CPU affinity): \
                 threads will share cores",
                count(f.threads, "thread"),
                count(f.available_cores, "core")
            ),
            format!(
                "lower --threads to {}, or bind each rank to {} cores (srun --cpus-per-task={}, \
                 mpirun --map-by slot:PE={})",
                f.available_cores, f.threads, f.threads, f.threads
            ),
        ));
    }
    if let Some(msg) = env::oversubscription(f.ranks_per_node, f.threads, f.node_cores) {
        out.push(Finding::warn(
            "threads",
            msg,
            format!(
                "keep ranks per node x threads per rank at or below {} cores",
                f.node_cores
            ),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// BLAS thread variables

fn blas_findings(vars: &[(&str, Option<&str>)]) -> Vec<Finding> {
    let mut fine = Vec::new();
    let mut out = Vec::new();
    for &(name, value) in vars {
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            fine.push(format!("{name} unset"));
            continue;
        };
        // OpenMP also takes a comma list (one count per nesting level); the first level is
        // the one that multiplies with the extraction threads.
        let first = value.split(',').next().unwrap_or(value).trim();
        let fix = format!("unset {name} (spextract then sets it to 1) or export {name}=1");
        match first.parse::<usize>() {
            Ok(1) => fine.push(format!("{name}=1")),
            Ok(0) => out.push(Finding::warn(
                "blas",
                format!("{name}=0: the library picks its own thread count, usually every core"),
                fix,
            )),
            Ok(n) => out.push(Finding::warn(
                "blas",
                format!(
                    "{name}={value}: every extraction thread may start {n} BLAS threads, \
                     oversubscribing the cores"
                ),
                fix,
            )),
            Err(_) => out.push(Finding::warn(
                "blas",
                format!("{name}={value:?} is not a thread count"),
                fix,
            )),
        }
    }
    if !fine.is_empty() {
        out.insert(
            0,
            Finding::ok(
                "blas",
                format!("{} (spextract sets unset ones to 1)", fine.join(", ")),
            ),
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Slurm

/// The Slurm variables doctor reads.
const SLURM_VARS: [&str; 15] = [
    "SLURM_JOB_ID",
    "SLURM_NNODES",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "SLURM_CPUS_PER_TASK",
    "SLURM_CPUS_ON_NODE",
    "SLURM_GPUS_PER_NODE",
    "SLURM_GPUS_ON_NODE",
    "SLURM_GPUS_PER_TASK",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "SLURM_GPU_BIND",
    "SLURM_CPU_BIND",
    "SLURM_STEP_ID",
];

fn slurm_findings(vars: &[(&str, Option<&str>)]) -> Vec<Finding> {
    let Some(job) = lookup(vars, "SLURM_JOB_ID") else {
        return vec![Finding::ok("slurm", "not in a Slurm job")];
    };
    let labels = [
        ("SLURM_NNODES", "nodes"),
        ("SLURM_NTASKS", "tasks"),
        ("SLURM_NTASKS_PER_NODE", "tasks/node"),
        ("SLURM_TASKS_PER_NODE", "tasks per node"),
        ("SLURM_CPUS_PER_TASK", "cpus/task"),
        ("SLURM_CPUS_ON_NODE", "cpus on node"),
        ("SLURM_GPUS_PER_NODE", "gpus/node"),
        ("SLURM_GPUS_ON_NODE", "gpus on node"),
        ("SLURM_GPUS_PER_TASK", "gpus/task"),
        ("SLURM_JOB_GPUS", "job gpus"),
        ("SLURM_STEP_GPUS", "step gpus"),
        ("SLURM_GPU_BIND", "gpu-bind"),
        ("SLURM_CPU_BIND", "cpu-bind"),
    ];
    let parts: Vec<String> = labels
        .iter()
        .filter_map(|(var, label)| lookup(vars, var).map(|v| format!("{label} {v}")))
        .collect();
    let step = match lookup(vars, "SLURM_STEP_ID") {
        Some(s) => format!(", step {s}"),
        None => String::new(),
    };
    let details = if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join(", "))
    };
    let mut out = vec![Finding::ok("slurm", format!("job {job}{step}{details}"))];
    let tasks = lookup(vars, "SLURM_NTASKS").and_then(|v| v.parse::<usize>().ok());
    if tasks.is_some_and(|t| t > 1) && lookup(vars, "SLURM_CPUS_PER_TASK").is_none() {
        out.push(Finding::warn(
            "slurm",
            "SLURM_CPUS_PER_TASK is unset in a job of several tasks: each task then gets one \
             CPU by default, so each rank runs one thread",
            "request cores per rank with --cpus-per-task=N on sbatch and srun (srun of Slurm \
             22.05 and later does not inherit it from sbatch: export \
             SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK)",
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// GPUs

/// The CUDA API spextract's bindings are generated for (the `cuda-13000` feature of cudarc).
const BUILT_FOR_CUDA: (i32, i32) = (13, 0);

#[derive(Debug, Clone, PartialEq)]
struct GpuDevice {
    name: String,
    capability: (i32, i32),
    total: u64,
    free: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
struct CudaLib {
    name: &'static str,
    file: &'static str,
    present: bool,
    version: Option<(i32, i32)>,
    /// The file the process mapped it from: cudarc tries the unversioned name first, which
    /// can find an older toolkit's library before the one the versions above came from.
    path: Option<String>,
}

/// What loading the CUDA driver showed.
#[derive(Debug, Clone, PartialEq)]
enum GpuProbe {
    /// No libcuda could be loaded.
    NoDriver,
    /// libcuda loaded but would not start.
    DriverFailed {
        driver: Option<(i32, i32)>,
        error: String,
    },
    /// The driver runs but shows no device.
    NoDevice { driver: Option<(i32, i32)> },
    /// The devices the driver shows (after CUDA_VISIBLE_DEVICES) and the CUDA libraries.
    Devices {
        driver: Option<(i32, i32)>,
        devices: Vec<Result<GpuDevice, String>>,
        libs: Vec<CudaLib>,
    },
}

impl GpuProbe {
    fn device_count(&self) -> usize {
        match self {
            GpuProbe::Devices { devices, .. } => devices.len(),
            _ => 0,
        }
    }

    fn device_name(&self, index: usize) -> Option<&str> {
        match self {
            GpuProbe::Devices { devices, .. } => match devices.get(index) {
                Some(Ok(d)) => Some(d.name.as_str()),
                _ => None,
            },
            _ => None,
        }
    }
}

fn version_text(v: Option<(i32, i32)>) -> String {
    v.map_or_else(
        || "of unknown version".to_string(),
        |(a, b)| format!("{a}.{b}"),
    )
}

/// Findings on the GPUs. `cuda_visible` is CUDA_VISIBLE_DEVICES (None when unset) and
/// `slurm_gpus` is SLURM_GPUS_ON_NODE.
fn gpu_findings(
    probe: &GpuProbe,
    cuda_visible: Option<&str>,
    slurm_gpus: Option<&str>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let visible = cuda_visible.map(env::parse_cuda_visible_devices);
    let visible_text = match cuda_visible {
        None => "CUDA_VISIBLE_DEVICES unset".to_string(),
        Some(v) => format!("CUDA_VISIBLE_DEVICES={v:?}"),
    };
    if let Some(v) = &visible {
        if let Some(first) = v.ignored.first() {
            out.push(Finding::warn(
                "gpu",
                format!(
                    "{visible_text}: CUDA ignores {first:?} and every entry after it, leaving \
                     {} visible",
                    count(v.devices.len(), "device")
                ),
                "list devices by index or GPU-/MIG- UUID, comma-separated with no empty entries",
            ));
        }
    }
    let slurm_gpus = slurm_gpus.and_then(|v| v.trim().parse::<usize>().ok());
    let allocated = slurm_gpus.is_some_and(|n| n > 0)
        || visible.as_ref().is_some_and(|v| !v.devices.is_empty());
    match probe {
        GpuProbe::NoDriver if allocated => out.push(Finding::warn(
            "gpu",
            format!(
                "GPUs are allocated ({visible_text}{}) but no CUDA driver library (libcuda.so) \
                 loads: the CPU backend will be used",
                slurm_gpus.map_or(String::new(), |n| format!(", SLURM_GPUS_ON_NODE={n}"))
            ),
            "run on a GPU node, or add the NVIDIA driver's library folder to LD_LIBRARY_PATH",
        )),
        GpuProbe::NoDriver => out.push(Finding::ok(
            "gpu",
            "no GPU: the CPU backend will be used (no CUDA driver library libcuda.so)",
        )),
        GpuProbe::DriverFailed { driver, error } => out.push(Finding::warn(
            "gpu",
            format!(
                "the CUDA driver {} loads but does not start ({error}): the CPU backend will \
                 be used",
                version_text(*driver)
            ),
            "check `nvidia-smi` on this node, and which libcuda.so LD_LIBRARY_PATH finds \
             first; a driver updated without a reboot, or a container without the GPU \
             devices, also gives this",
        )),
        GpuProbe::NoDevice { driver } => {
            let found = format!(
                "CUDA driver {} but no GPU visible ({visible_text}): the CPU backend will be used",
                version_text(*driver)
            );
            out.push(if allocated {
                Finding::warn(
                    "gpu",
                    found,
                    "check the entries of CUDA_VISIBLE_DEVICES against `nvidia-smi -L`",
                )
            } else {
                Finding::ok("gpu", found)
            });
        }
        GpuProbe::Devices {
            driver,
            devices,
            libs,
        } => {
            out.push(Finding::ok(
                "gpu",
                format!(
                    "CUDA driver {}: {} visible ({visible_text})",
                    version_text(*driver),
                    count(devices.len(), "GPU")
                ),
            ));
            if let Some(d) = driver.filter(|&d| d < BUILT_FOR_CUDA) {
                out.push(Finding::warn(
                    "gpu",
                    format!(
                        "the driver supports CUDA {}.{}, older than the CUDA {}.{} API \
                         spextract's GPU code is built for: calls newer than the driver fail",
                        d.0, d.1, BUILT_FOR_CUDA.0, BUILT_FOR_CUDA.1
                    ),
                    "run on nodes with an NVIDIA driver for CUDA 13 (version 580 or later)",
                ));
            }
            for (i, d) in devices.iter().enumerate() {
                out.push(match d {
                    Ok(d) => {
                        let free = d
                            .free
                            .map_or(String::new(), |f| format!(", {} free", gib(f)));
                        let found = format!(
                            "GPU {i}: {}, compute capability {}.{}, {} memory{free}",
                            d.name,
                            d.capability.0,
                            d.capability.1,
                            gib(d.total)
                        );
                        // A GPU less than half free is held by another process.
                        match d.free {
                            Some(f) if f < d.total / 2 => Finding::warn(
                                "gpu",
                                found,
                                "another process holds this GPU's memory (nvidia-smi shows \
                                 which): ask for exclusive GPUs",
                            ),
                            _ => Finding::ok("gpu", found),
                        }
                    }
                    Err(e) => Finding::warn(
                        "gpu",
                        format!("GPU {i} does not open: {e}"),
                        "check `nvidia-smi`; a GPU in exclusive-process mode used by another \
                         process, or in an error state, gives this",
                    ),
                });
            }
            out.extend(cuda_lib_findings(libs, *driver));
        }
    }
    out
}

fn cuda_lib_findings(libs: &[CudaLib], driver: Option<(i32, i32)>) -> Vec<Finding> {
    let mut out = Vec::new();
    let present: Vec<String> = libs
        .iter()
        .filter(|l| l.present)
        .map(|l| {
            let v = match l.version {
                Some((a, b)) => format!("{} {a}.{b}", l.name),
                None => format!("{} (version unreadable)", l.name),
            };
            match &l.path {
                Some(p) => format!("{v} from {p}"),
                None => v,
            }
        })
        .collect();
    if !present.is_empty() {
        out.push(Finding::ok(
            "cuda-libs",
            format!("loaded: {}", present.join(", ")),
        ));
    }
    for l in libs.iter().filter(|l| !l.present) {
        out.push(Finding::warn(
            "cuda-libs",
            format!(
                "{} ({}) does not load (missing, or a library it needs is): the GPU backend \
                 cannot start",
                l.name, l.file
            ),
            "load the CUDA toolkit module, or add its lib64 folder to LD_LIBRARY_PATH",
        ));
    }
    // NVRTC writes machine code and PTX of its own CUDA version. A driver of the same major
    // version loads the machine code (minor-version compatibility); an older major loads
    // neither.
    let nvrtc = libs
        .iter()
        .find(|l| l.name == "NVRTC" && l.present)
        .and_then(|l| l.version);
    if let (Some(n), Some(d)) = (nvrtc, driver) {
        if n.0 > d.0 {
            out.push(Finding::warn(
                "cuda-libs",
                format!(
                    "NVRTC {}.{} is newer than the driver's CUDA {}.{}: the kernels it compiles \
                     will not load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION)",
                    n.0, n.1, d.0, d.1
                ),
                "put an NVRTC no newer than the driver first in LD_LIBRARY_PATH, or update the \
                 driver",
            ));
        }
    }
    out
}

/// Runs `f`, turning a panic into an error without printing it: cudarc panics when a library
/// or symbol it loads lazily is missing, and doctor reports that as a finding instead.
fn catch_quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    // Swapping the process-wide hook is safe here: doctor runs no other Rust threads.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    result.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".to_string())
    })
}

fn probe_gpus() -> GpuProbe {
    use cudarc::driver::sys;
    // SAFETY: is_culib_present dlopens (then closes) the candidate libcuda names; loading
    // runs only the library's own initialisers, which need nothing from this process.
    let present = catch_quietly(|| unsafe { sys::is_culib_present() });
    if present != Ok(true) {
        return GpuProbe::NoDriver;
    }
    catch_quietly(probe_driver).unwrap_or_else(|error| GpuProbe::DriverFailed {
        driver: None,
        error,
    })
}

fn probe_driver() -> GpuProbe {
    use cudarc::driver::{sys, CudaContext};
    let driver = crate::extract::gpu::device::driver_version();
    let count = match CudaContext::device_count() {
        Ok(n) => usize::try_from(n).unwrap_or(0),
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => {
            return GpuProbe::NoDevice { driver }
        }
        Err(e) => {
            return GpuProbe::DriverFailed {
                driver,
                error: e.to_string(),
            }
        }
    };
    if count == 0 {
        return GpuProbe::NoDevice { driver };
    }
    let devices = (0..count).map(probe_device).collect();
    GpuProbe::Devices {
        driver,
        devices,
        libs: probe_cuda_libs(),
    }
}

fn probe_device(ordinal: usize) -> Result<GpuDevice, String> {
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| e.to_string())?;
    let name = ctx.name().map_err(|e| e.to_string())?;
    let capability = ctx.compute_capability().map_err(|e| e.to_string())?;
    let total = ctx.total_mem().map_err(|e| e.to_string())? as u64;
    let free = ctx.mem_get_info().ok().map(|(free, _)| free as u64);
    Ok(GpuDevice {
        name,
        capability,
        total,
        free,
    })
}

/// The file of the mapped library whose name starts with `soname` (e.g. "libcublas.so"), as
/// this process's memory map shows it.
fn mapped_from(soname: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            std::path::Path::new(p)
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(soname))
        })
        .map(str::to_string)
}

fn probe_cuda_libs() -> Vec<CudaLib> {
    fn lib(
        name: &'static str,
        file: &'static str,
        present: fn() -> bool,
        version: fn() -> Option<(i32, i32)>,
    ) -> CudaLib {
        let present = catch_quietly(present).unwrap_or(false);
        let version = if present {
            catch_quietly(version).ok().flatten()
        } else {
            None
        };
        let path = present.then(|| mapped_from(file)).flatten();
        CudaLib {
            name,
            file,
            present,
            version,
            path,
        }
    }
    // SAFETY (the three is_culib_present calls): they dlopen and close the library's candidate
    // names, running only its own initialisers.
    vec![
        lib(
            "NVRTC",
            "libnvrtc.so",
            || unsafe { cudarc::nvrtc::sys::is_culib_present() },
            || {
                use cudarc::nvrtc::sys;
                let (mut major, mut minor) = (0, 0);
                // SAFETY: nvrtcVersion writes two ints through pointers valid for the call.
                let rc = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
                (rc == sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
            },
        ),
        lib(
            "cuBLAS",
            "libcublas.so",
            || unsafe { cudarc::cublas::sys::is_culib_present() },
            || {
                use cudarc::cublas::sys;
                let get = |property| {
                    let mut v = 0;
                    // SAFETY: cublasGetProperty writes one int through a pointer valid for
                    // the call; it needs no handle.
                    let rc = unsafe { sys::cublasGetProperty(property, &mut v) };
                    (rc == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS).then_some(v)
                };
                Some((
                    get(sys::libraryPropertyType::MAJOR_VERSION)?,
                    get(sys::libraryPropertyType::MINOR_VERSION)?,
                ))
            },
        ),
        lib(
            "cuSOLVER",
            "libcusolver.so",
            || unsafe { cudarc::cusolver::sys::is_culib_present() },
            || {
                use cudarc::cusolver::sys;
                let mut v = 0;
                // SAFETY: cusolverGetVersion writes one int through a pointer valid for the
                // call; it needs no handle.
                let rc = unsafe { sys::cusolverGetVersion(&mut v) };
                // Encoded as major * 1000 + minor * 100 + patch.
                (rc == sys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS)
                    .then_some((v / 1000, (v % 1000) / 100))
            },
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// GPU binding

/// The launch whose GPU binding is shown.
struct BindingPlan {
    /// Ranks per node; `None` for a single process, which reads, computes and writes itself.
    ranks_per_node: Option<usize>,
    /// Whether the layout is one asked about (`--ranks-per-node`) rather than this launch.
    hypothetical: bool,
    readers: usize,
    writers: usize,
    ranks_per_gpu: usize,
    /// A label for each GPU this process sees, in CUDA's device order.
    gpus: Vec<String>,
    /// Whether Slurm gives each task its own GPUs.
    per_task: bool,
}

fn range_text(first: usize, last: usize) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// The binding table of one node: roles as [`Layout::new`] assigns them to the node's ranks
/// (readers first, then writers, then compute ranks), and the device of each compute rank.
fn binding_findings(p: &BindingPlan) -> Vec<Finding> {
    let Some(ranks) = p.ranks_per_node else {
        let on = match p.gpus.first() {
            Some(g) => format!("on GPU {g}"),
            None => "on the CPU".to_string(),
        };
        return vec![Finding::ok(
            "binding",
            format!("single process: it reads, computes {on} and writes"),
        )];
    };
    let layout = Layout::new(vec![(0..ranks).collect()], p.readers, p.writers);
    let (readers, writers, computes) =
        (&layout.readers[0], &layout.writers[0], &layout.computes[0]);
    let whose = if p.hypothetical {
        "--ranks-per-node"
    } else {
        "this launch"
    };
    let gpus = if p.per_task {
        "each rank gets its own GPUs from Slurm (per-task binding)".to_string()
    } else if p.gpus.is_empty() {
        "no GPU visible".to_string()
    } else {
        format!(
            "{} visible, up to {} each",
            count(p.gpus.len(), "GPU"),
            count(p.ranks_per_gpu, "compute rank")
        )
    };
    let mut out = vec![Finding::ok(
        "binding",
        format!(
            "{whose}: {} per node: {}, {}, {}; {gpus}",
            count(ranks, "rank"),
            count(readers.len(), "reader"),
            count(writers.len(), "writer"),
            count(computes.len(), "compute rank")
        ),
    )];
    let place = |c: usize| -> Option<String> {
        if p.per_task {
            Some("device 0 of its own CUDA_VISIBLE_DEVICES".to_string())
        } else if p.gpus.is_empty() {
            Some("the CPU".to_string())
        } else {
            env::gpu_binding(c, p.gpus.len(), p.ranks_per_gpu).map(|d| format!("GPU {}", p.gpus[d]))
        }
    };
    // Rows of consecutive compute-only ranks on the same place (the CPU, or each rank's own
    // GPU) are folded into one; ranks spread over GPUs get a row each.
    struct Row {
        first: usize,
        last: usize,
        roles: String,
        compute: Option<usize>,
        placed: String,
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut unbound = Vec::new();
    for local in 0..ranks {
        let mut roles = Vec::new();
        if readers.contains(&local) {
            roles.push("reader");
        }
        if writers.contains(&local) {
            roles.push("writer");
        }
        let compute = computes.iter().position(|&r| r == local);
        if compute.is_some() {
            roles.push("compute");
        }
        let roles = roles.join("+");
        let placed = compute.map(|c| {
            place(c).unwrap_or_else(|| {
                unbound.push(local);
                "no GPU left".to_string()
            })
        });
        let placed = placed.unwrap_or_default();
        if let Some(row) = rows.last_mut() {
            if roles == "compute" && row.roles == "compute" && row.placed == placed {
                row.last = local;
                continue;
            }
        }
        rows.push(Row {
            first: local,
            last: local,
            roles,
            compute,
            placed,
        });
    }
    for Row {
        first,
        last,
        roles,
        compute,
        placed,
    } in rows
    {
        let found = match compute {
            None => format!("local rank {first}: {roles}"),
            Some(c) if first == last => format!("local rank {first}: {roles} {c} -> {placed}"),
            Some(c) => format!(
                "local ranks {}: {roles} {} -> {placed}",
                range_text(first, last),
                range_text(c, c + last - first)
            ),
        };
        out.push(Finding::ok("binding", found));
    }
    if let (Some(&first), Some(&last)) = (unbound.first(), unbound.last()) {
        let slots = p.gpus.len() * p.ranks_per_gpu;
        out.push(Finding::warn(
            "binding",
            format!(
                "{} per node but {} x {} per GPU = {slots} places: {} no GPU",
                count(computes.len(), "compute rank"),
                count(p.gpus.len(), "GPU"),
                count(p.ranks_per_gpu, "rank"),
                if first == last {
                    format!("local rank {first} gets")
                } else {
                    format!("local ranks {first}-{last} get")
                }
            ),
            format!(
                "launch {} ranks per node, or raise --ranks-per-gpu to {} if the GPU memory \
                 allows",
                ranks - unbound.len(),
                computes.len().div_ceil(p.gpus.len())
            ),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Files and folders

/// How many problems of one kind are listed before the rest are counted.
const MAX_LISTED: usize = 10;

/// Bytes free to this user on the file system holding `dir` (quotas not included).
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and outlives the call; `st` is writable memory of the
    // struct's size, which statvfs fills when it returns 0.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field widths differ between platforms; u128 holds the product on all of them.
    Some((st.f_bavail as u128 * st.f_frsize as u128).min(u64::MAX as u128) as u64)
}

/// Why `path` cannot be read as an input file, if it cannot.
fn check_readable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return Err("is a folder, not a file".to_string());
    }
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    file.read(&mut byte).map_err(|e| e.to_string())?;
    Ok(())
}

/// What writing into a folder showed.
#[derive(Debug)]
struct DirCheck {
    free: Option<u64>,
    /// The probe file could be created but not removed: its path and the error.
    leftover: Option<(PathBuf, String)>,
}

/// Checks that `dir` exists and accepts new files, by creating and removing `probe_name` in it.
fn check_writable_dir(dir: &Path, probe_name: &str) -> Result<DirCheck, String> {
    let meta = std::fs::metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_string(),
        _ => e.to_string(),
    })?;
    if !meta.is_dir() {
        return Err("is not a folder".to_string());
    }
    let probe = dir.join(probe_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .map_err(|e| format!("cannot create files in it: {e}"))?;
    // A write, not just a create: a full disk or an exhausted quota fails only here.
    let written = file.write_all(b"spextract doctor write probe\n");
    drop(file);
    let removed = std::fs::remove_file(&probe);
    written.map_err(|e| format!("cannot write files in it: {e}"))?;
    Ok(DirCheck {
        free: free_bytes(dir),
        leftover: removed.err().map(|e| (probe, e.to_string())),
    })
}

/// Below this, a folder is reported as nearly full (a frame is tens of MB).
const LOW_FREE_BYTES: u64 = 1 << 30;

fn output_dir_findings(dir: &Path, probe_name: &str) -> Vec<Finding> {
    let shown = dir.display();
    match check_writable_dir(dir, probe_name) {
        Err(e) => vec![Finding::fail(
            "output",
            format!("{shown}: {e}"),
            if e == "does not exist" {
                format!("create it (mkdir -p {shown}) or correct the path")
            } else {
                format!("choose a folder you may write to, or fix its permissions (ls -ld {shown})")
            },
        )],
        Ok(check) => {
            let mut out = Vec::new();
            let free = check
                .free
                .map_or(String::new(), |f| format!(", {} free", gib(f)));
            out.push(match check.free {
                Some(f) if f < LOW_FREE_BYTES => Finding::warn(
                    "output",
                    format!("{shown}: writable, but only {} free", gib(f)),
                    "free space or write elsewhere; check your quota too (quotas are not shown)",
                ),
                _ => Finding::ok("output", format!("{shown}: writable{free}")),
            });
            if let Some((probe, e)) = check.leftover {
                out.push(Finding::warn(
                    "output",
                    format!("{shown}: the probe file {} stays: {e}", probe.display()),
                    format!("remove it by hand (rm {})", probe.display()),
                ));
            }
            out
        }
    }
}

/// Problems of one kind, listed up to [`MAX_LISTED`] and counted after.
fn capped(mut found: Vec<Finding>, what: &str, hint: &str) -> Vec<Finding> {
    if found.len() > MAX_LISTED {
        let more = found.len() - MAX_LISTED;
        found.truncate(MAX_LISTED);
        found.push(Finding::fail(
            "frames",
            format!("... and {more} more {what}"),
            hint,
        ));
    }
    found
}

/// Checks an output folder of a frame list; true when it does not exist yet. The pipeline
/// creates missing output folders, so then the nearest folder that exists must accept new ones.
fn frame_folder_findings(folder: &Path, probe_name: &str) -> (Vec<Finding>, bool) {
    if std::fs::metadata(folder).is_ok() {
        return (output_dir_findings(folder, probe_name), false);
    }
    let base = folder
        .ancestors()
        .skip(1)
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .find(|a| std::fs::metadata(a).is_ok())
        .unwrap_or(Path::new("."));
    let found = match check_writable_dir(base, probe_name) {
        Ok(_) => Vec::new(),
        Err(e) => vec![Finding::fail(
            "frames",
            format!(
                "output folder {} does not exist and cannot be made: {} {e}",
                folder.display(),
                base.display()
            ),
            "correct the outputs in the list, or create the folder where you may write",
        )],
    };
    (found, true)
}

/// Checks a `--frames` list as `extract` reads it (through [`frames::resolve`], so relative
/// paths start from the list's folder): every input readable, every output folder writable.
fn frames_findings(list: &Path, probe_name: &str) -> Vec<Finding> {
    let shown = list.display();
    let selection = FrameSelection {
        frames: Some(list.to_path_buf()),
        ..FrameSelection::default()
    };
    let jobs = match frames::resolve(&selection, &[], None, None) {
        Ok(jobs) => jobs,
        Err(FramesError::NoFrames(_)) => {
            return vec![Finding::warn(
                "frames",
                format!("{shown} lists no frame"),
                "add one `image psf output` line per frame",
            )]
        }
        Err(e) => {
            let hint = match e {
                FramesError::ReadList { .. } => "check the path of the list",
                FramesError::ListLine { .. } => {
                    "write one frame per line: image, PSF and output paths separated by spaces"
                }
                FramesError::DuplicateOutput { .. } | FramesError::OutputIsInput { .. } => {
                    "give every frame its own output, apart from every input"
                }
                _ => "correct the list as the message says",
            };
            return vec![Finding::fail("frames", e.to_string(), hint)];
        }
    };
    let mut out = Vec::new();
    // Each input once (a PSF serves many frames), with the first frame naming it.
    let mut inputs: BTreeMap<&Path, usize> = BTreeMap::new();
    let mut folders: BTreeSet<&Path> = BTreeSet::new();
    let mut existing = 0;
    for (i, job) in jobs.iter().enumerate() {
        inputs.entry(&job.image).or_insert(i + 1);
        inputs.entry(&job.psf).or_insert(i + 1);
        folders.insert(match job.output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        });
        if job.output.exists() {
            existing += 1;
        }
    }
    let unreadable: Vec<Finding> = inputs
        .iter()
        .filter_map(|(path, frame)| {
            check_readable(path).err().map(|e| {
                Finding::fail(
                    "frames",
                    format!("{} (frame {frame} of {shown}): {e}", path.display()),
                    "correct the path in the list, or the file's permissions",
                )
            })
        })
        .collect();
    let unreadable_count = unreadable.len();
    out.extend(capped(
        unreadable,
        "unreadable inputs",
        "correct the paths in the list, or the files' permissions",
    ));
    let (mut writable, mut to_create) = (0, 0);
    for folder in &folders {
        let (found, creating) = frame_folder_findings(folder, probe_name);
        if found.iter().all(|f| f.status != Status::Fail) {
            writable += 1;
            to_create += usize::from(creating);
        }
        // A writable folder is counted in the summary; only its problems are listed.
        out.extend(found.into_iter().filter(|f| f.status != Status::Ok));
    }
    let exist = if existing > 0 {
        format!(
            "; outputs already there: {existing} (extract skips complete ones unless \
             --overwrite)"
        )
    } else {
        String::new()
    };
    let summary = format!(
        "{shown}: {}; {} of {} readable; {writable} of {} writable{}{exist}",
        count(jobs.len(), "frame"),
        inputs.len() - unreadable_count,
        count(inputs.len(), "input file"),
        count(folders.len(), "output folder"),
        if to_create > 0 {
            format!(" ({to_create} to be created by extract)")
        } else {
            String::new()
        },
    );
    out.insert(0, Finding::ok("frames", summary));
    out
}

// ---------------------------------------------------------------------------------------------
// Report

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A variable as this process started with it. `main` sets the unset BLAS thread variables
/// to 1 before any subcommand runs, and doctor reports what the user set; Linux keeps the
/// starting environment in /proc/self/environ, which setenv does not touch.
fn initial_env_var(name: &str) -> Option<String> {
    let Ok(environ) = std::fs::read("/proc/self/environ") else {
        return env_var(name);
    };
    environ.split(|&b| b == 0).find_map(|entry| {
        let value = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(value).into_owned())
    })
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
    // The thread level extract asks for, so that doctor sees what a run would get.
    let init = if launch.under_mpi {
        Some(
            mpi::initialize_with_threading(mpi::Threading::Funneled)
                .context("MPI was initialised before doctor started")?,
        )
    } else {
        None
    };
    let threading = init.as_ref().map(|(_, level)| *level);
    let universe = init.map(|(u, _)| u);
    let layout = universe.as_ref().map(|u| {
        use mpi::traits::Communicator;
        let world = u.world();
        (world.rank(), layout_from_hosts(&gather_hostnames(&world)))
    });
    if layout.as_ref().is_some_and(|(rank, _)| *rank != 0) {
        return Ok(true);
    }
    let layout = layout.map(|(_, l)| l);

    let mut findings = Vec::new();
    findings.extend(mpi_findings(
        &MpiFacts {
            library: mpi::environment::library_version().map_err(|e| e.to_string()),
            standard: mpi::environment::version(),
            cuda_aware: cuda_aware(universe.is_some()),
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
    findings.extend(thread_findings(&ThreadFacts {
        threads: env::resolve_threads(args.threads),
        source: if args.threads > 0 {
            ThreadSource::Flag
        } else if slurm_cpus.is_some_and(|n| n > 0) {
            ThreadSource::Slurm
        } else {
            ThreadSource::Affinity
        },
        ranks_per_node,
        hypothetical: args.ranks_per_node.is_some(),
        node_cores: env::node_cores(),
        available_cores: env::available_cores(),
    }));

    let blas: Vec<(&str, Option<String>)> = env::BLAS_THREAD_VARS
        .iter()
        .map(|&n| (n, initial_env_var(n)))
        .collect();
    let blas: Vec<(&str, Option<&str>)> = blas.iter().map(|(n, v)| (*n, v.as_deref())).collect();
    findings.extend(blas_findings(&blas));

    let slurm: Vec<(&str, Option<String>)> = SLURM_VARS.iter().map(|&n| (n, env_var(n))).collect();
    let slurm: Vec<(&str, Option<&str>)> = slurm.iter().map(|(n, v)| (*n, v.as_deref())).collect();
    findings.extend(slurm_findings(&slurm));

    let cuda_visible = env_var("CUDA_VISIBLE_DEVICES");
    let probe = probe_gpus();
    findings.extend(gpu_findings(
        &probe,
        cuda_visible.as_deref(),
        lookup(&slurm, "SLURM_GPUS_ON_NODE"),
    ));

    let entries = cuda_visible
        .as_deref()
        .map(|v| env::parse_cuda_visible_devices(v).devices);
    let gpus = (0..probe.device_count())
        .map(|i| {
            let mut label = i.to_string();
            if let Some(entry) = entries.as_ref().and_then(|e| e.get(i)) {
                label.push_str(&format!(" = CUDA_VISIBLE_DEVICES entry {entry}"));
            }
            if let Some(name) = probe.device_name(i) {
                label.push_str(&format!(" ({name})"));
            }
            label
        })
        .collect();
    findings.extend(binding_findings(&BindingPlan {
        ranks_per_node: (!single).then_some(ranks_per_node),
        hypothetical: args.ranks_per_node.is_some(),
        readers: args.readers_per_node,
        writers: args.writers_per_node,
        ranks_per_gpu: args.ranks_per_gpu,
        gpus,
        per_task: env::slurm_binds_gpus_per_task(
            lookup(&slurm, "SLURM_GPUS_PER_TASK"),
            lookup(&slurm, "SLURM_GPU_BIND"),
        ),
    }));

    let probe_name = format!(".spextract-doctor-probe-{}", std::process::id());
    for dir in &args.output_dirs {
        findings.extend(output_dir_findings(dir, &probe_name));
    }
    if let Some(list) = &args.frames {
        findings.extend(frames_findings(list, &probe_name));
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        print_text(&findings);
    }
    Ok(findings.iter().all(|f| f.status != Status::Fail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses(findings: &[Finding]) -> Vec<Status> {
        findings.iter().map(|f| f.status).collect()
    }

    fn with_status(findings: &[Finding], status: Status) -> Vec<&Finding> {
        findings.iter().filter(|f| f.status == status).collect()
    }

    #[test]
    fn blas_variables_unset_or_one_are_fine() {
        let f = blas_findings(&[
            ("OMP_NUM_THREADS", None),
            ("OPENBLAS_NUM_THREADS", Some("1")),
            ("MKL_NUM_THREADS", Some("  ")),
        ]);
        assert_eq!(statuses(&f), [Status::Ok]);
        assert!(
            f[0].found.contains("OMP_NUM_THREADS unset"),
            "{}",
            f[0].found
        );
        assert!(
            f[0].found.contains("OPENBLAS_NUM_THREADS=1"),
            "{}",
            f[0].found
        );
        assert!(
            f[0].found.contains("MKL_NUM_THREADS unset"),
            "{}",
            f[0].found
        );
    }

    #[test]
    fn blas_variables_above_one_zero_or_garbage_warn() {
        let f = blas_findings(&[
            ("OMP_NUM_THREADS", Some("8")),
            ("OPENBLAS_NUM_THREADS", Some("0")),
            ("MKL_NUM_THREADS", Some("four")),
        ]);
        assert_eq!(statuses(&f), [Status::Warn; 3]);
        assert!(f[0].found.contains("OMP_NUM_THREADS=8"), "{}", f[0].found);
        assert!(f[1].found.contains("picks its own"), "{}", f[1].found);
        assert!(f[2].found.contains("not a thread count"), "{}", f[2].found);
        for w in &f {
            let hint = w.hint.as_deref().expect("a warning has a fix");
            assert!(hint.starts_with("unset "), "{hint}");
        }
    }

    #[test]
    fn omp_thread_lists_are_judged_by_their_first_level() {
        let ok = blas_findings(&[("OMP_NUM_THREADS", Some("1,4"))]);
        assert_eq!(statuses(&ok), [Status::Ok]);
        let warn = blas_findings(&[("OMP_NUM_THREADS", Some("4,1"))]);
        assert_eq!(statuses(&warn), [Status::Warn]);
    }

    fn threads(threads: usize, ranks: usize, node: usize, available: usize) -> ThreadFacts {
        ThreadFacts {
            threads,
            source: ThreadSource::Flag,
            ranks_per_node: ranks,
            hypothetical: false,
            node_cores: node,
            available_cores: available,
        }
    }

    #[test]
    fn threads_within_the_cores_are_fine() {
        let f = thread_findings(&threads(8, 2, 16, 8));
        assert_eq!(statuses(&f), [Status::Ok]);
        assert!(f[0]
            .found
            .contains("8 threads per compute rank (from --threads)"));
        assert!(f[0].found.contains("2 ranks per node"), "{}", f[0].found);
    }

    #[test]
    fn oversubscribed_node_warns_with_the_count() {
        let f = thread_findings(&threads(8, 4, 16, 8));
        let warns = with_status(&f, Status::Warn);
        assert_eq!(warns.len(), 1, "{f:?}");
        assert!(
            warns[0].found.contains("32 threads on 16 cores"),
            "{}",
            warns[0].found
        );
    }

    #[test]
    fn more_threads_than_the_affinity_allows_warns() {
        let f = thread_findings(&threads(8, 1, 64, 2));
        let warns = with_status(&f, Status::Warn);
        assert_eq!(warns.len(), 1, "{f:?}");
        assert!(
            warns[0].found.contains("only 2 cores"),
            "{}",
            warns[0].found
        );
        assert!(warns[0].hint.as_deref().unwrap().contains("--threads to 2"));
    }

    #[test]
    fn hypothetical_launch_without_threads_is_not_added_up() {
        // This process may use all 16 cores, but ranks of the launch asked about would not.
        let mut facts = threads(16, 8, 16, 16);
        facts.source = ThreadSource::Affinity;
        facts.hypothetical = true;
        let f = thread_findings(&facts);
        assert_eq!(statuses(&f), [Status::Ok]);
        assert!(f[0].found.contains("pass --threads"), "{}", f[0].found);
        // With a count given, the node is added up; this process's affinity is not used.
        let mut facts = threads(4, 8, 16, 1);
        facts.hypothetical = true;
        let warns: Vec<String> = with_status(&thread_findings(&facts), Status::Warn)
            .iter()
            .map(|w| w.found.clone())
            .collect();
        assert_eq!(warns.len(), 1, "{warns:?}");
        assert!(warns[0].contains("32 threads on 16 cores"), "{}", warns[0]);
    }

    #[test]
    fn outside_slurm_is_noted() {
        let f = slurm_findings(&[("SLURM_JOB_ID", None), ("SLURM_NTASKS", Some("4"))]);
        assert_eq!(f, [Finding::ok("slurm", "not in a Slurm job")]);
    }

    #[test]
    fn slurm_job_is_summarised_and_a_missing_cpus_per_task_warns() {
        let mut vars = vec![
            ("SLURM_JOB_ID", Some("4242")),
            ("SLURM_NNODES", Some("2")),
            ("SLURM_NTASKS", Some("8")),
            ("SLURM_TASKS_PER_NODE", Some("4(x2)")),
            ("SLURM_GPUS_ON_NODE", Some("4")),
            ("SLURM_CPUS_PER_TASK", None),
        ];
        let f = slurm_findings(&vars);
        assert_eq!(statuses(&f), [Status::Ok, Status::Warn]);
        assert!(
            f[0].found.starts_with("job 4242: nodes 2, tasks 8"),
            "{}",
            f[0].found
        );
        assert!(
            f[0].found.contains("tasks per node 4(x2)"),
            "{}",
            f[0].found
        );
        assert!(f[0].found.contains("gpus on node 4"), "{}", f[0].found);
        assert!(f[1].hint.as_deref().unwrap().contains("SRUN_CPUS_PER_TASK"));
        vars[5].1 = Some("16");
        let f = slurm_findings(&vars);
        assert_eq!(statuses(&f), [Status::Ok]);
        assert!(f[0].found.contains("cpus/task 16"), "{}", f[0].found);
    }

    fn mpi(cuda_aware: CudaAware, layout: Option<HostLayout>) -> MpiFacts {
        MpiFacts {
            library: Ok("MPICH Version:\t4.1\nMPICH Release date: 2023\n".to_string()),
            standard: (4, 0),
            cuda_aware,
            threading: None,
            layout,
        }
    }

    #[test]
    fn mpi_library_is_named_by_its_first_line() {
        let f = mpi_findings(&mpi(CudaAware::NotExported, None), false);
        assert_eq!(f[0].found, "MPICH Version:\t4.1 (MPI standard 4.0)");
        assert!(f[1].found.starts_with("single process"), "{}", f[1].found);
        assert_eq!(statuses(&f), [Status::Ok; 3]);
        assert!(f[2].found.starts_with("unknown"), "{}", f[2].found);
    }

    #[test]
    fn cuda_aware_build_on_a_plain_mpi_fails() {
        let f = mpi_findings(&mpi(CudaAware::No, None), true);
        assert_eq!(f[2].status, Status::Fail);
        assert!(f[2].hint.as_deref().unwrap().contains("cuda-aware-mpi"));
        let unasked = mpi_findings(&mpi(CudaAware::NotQueried, None), true);
        assert_eq!(unasked[2].status, Status::Warn);
        assert!(unasked[2].hint.as_deref().unwrap().contains("mpirun -n 1"));
        let fine = mpi_findings(&mpi(CudaAware::Yes, None), true);
        assert_eq!(fine[2].status, Status::Ok);
    }

    #[test]
    fn mpi_without_funneled_threads_fails() {
        let mut facts = mpi(CudaAware::NotExported, None);
        facts.threading = Some(mpi::Threading::Single);
        let f = mpi_findings(&facts, false);
        let fails = with_status(&f, Status::Fail);
        assert_eq!(fails.len(), 1, "{f:?}");
        assert!(
            fails[0].found.contains("MPI_THREAD_SINGLE only"),
            "{}",
            fails[0].found
        );
        facts.threading = Some(mpi::Threading::Multiple);
        let f = mpi_findings(&facts, false);
        assert!(with_status(&f, Status::Fail).is_empty());
        assert!(f.iter().any(|x| x.found.contains("MPI_THREAD_MULTIPLE")));
    }

    #[test]
    fn layout_counts_nodes_and_ranks_per_node() {
        let hosts: Vec<String> = ["a", "a", "b", "a", "b", "c"]
            .iter()
            .map(|h| h.to_string())
            .collect();
        let l = layout_from_hosts(&hosts);
        assert_eq!(
            l,
            HostLayout {
                ranks: 6,
                nodes: 3,
                min_per_node: 1,
                max_per_node: 3,
                on_first_node: 3
            }
        );
        let f = mpi_findings(&mpi(CudaAware::Yes, Some(l)), false);
        assert_eq!(f[1].found, "6 ranks on 3 nodes, 1 to 3 per node");
    }

    fn device(free_gib: u64) -> Result<GpuDevice, String> {
        Ok(GpuDevice {
            name: "NVIDIA H100 80GB HBM3".to_string(),
            capability: (9, 0),
            total: 80 << 30,
            free: Some(free_gib << 30),
        })
    }

    fn lib(name: &'static str, present: bool, version: (i32, i32)) -> CudaLib {
        CudaLib {
            name,
            file: "libx.so",
            present,
            version: present.then_some(version),
            path: None,
        }
    }

    #[test]
    fn a_mapped_library_is_found_by_its_soname() {
        let libc = mapped_from("libc.so").expect("every Linux process maps libc");
        assert!(libc.starts_with('/') && libc.contains("libc.so"), "{libc}");
        assert_eq!(mapped_from("libspextract-no-such-library.so"), None);
    }

    #[test]
    fn no_driver_means_the_cpu_backend() {
        let f = gpu_findings(&GpuProbe::NoDriver, None, None);
        assert_eq!(statuses(&f), [Status::Ok]);
        assert!(f[0].found.contains("CPU backend"), "{}", f[0].found);
        // GPUs allocated but no driver: the run silently loses them, so say so.
        let f = gpu_findings(&GpuProbe::NoDriver, None, Some("4"));
        assert_eq!(statuses(&f), [Status::Warn]);
        assert!(
            f[0].found.contains("SLURM_GPUS_ON_NODE=4"),
            "{}",
            f[0].found
        );
    }

    #[test]
    fn cuda_visible_devices_with_a_bad_entry_warns() {
        let f = gpu_findings(
            &GpuProbe::NoDevice {
                driver: Some((13, 0)),
            },
            Some("-1"),
            None,
        );
        assert_eq!(statuses(&f), [Status::Warn, Status::Ok]);
        assert!(f[0].found.contains("ignores \"-1\""), "{}", f[0].found);
        let hidden = gpu_findings(
            &GpuProbe::NoDevice {
                driver: Some((13, 0)),
            },
            Some(""),
            None,
        );
        assert_eq!(statuses(&hidden), [Status::Ok]);
    }

    #[test]
    fn devices_are_listed_and_a_busy_gpu_warns() {
        let probe = GpuProbe::Devices {
            driver: Some((13, 0)),
            devices: vec![
                device(79),
                device(10),
                Err("CUDA_ERROR_ECC_UNCORRECTABLE".into()),
            ],
            libs: vec![
                lib("NVRTC", true, (13, 0)),
                lib("cuBLAS", true, (13, 0)),
                lib("cuSOLVER", true, (12, 0)),
            ],
        };
        let f = gpu_findings(&probe, Some("1,2,3"), None);
        assert_eq!(
            statuses(&f),
            [
                Status::Ok,
                Status::Ok,
                Status::Warn,
                Status::Warn,
                Status::Ok
            ]
        );
        assert!(f[0].found.contains("3 GPUs visible"), "{}", f[0].found);
        assert!(f[1]
            .found
            .contains("GPU 0: NVIDIA H100 80GB HBM3, compute capability 9.0"));
        assert!(
            f[1].found.contains("80.0 GiB memory, 79.0 GiB free"),
            "{}",
            f[1].found
        );
        assert!(f[2].found.contains("10.0 GiB free"), "{}", f[2].found);
        assert!(f[3].found.contains("ECC"), "{}", f[3].found);
        assert_eq!(f[4].found, "loaded: NVRTC 13.0, cuBLAS 13.0, cuSOLVER 12.0");
    }

    #[test]
    fn old_driver_missing_library_and_newer_nvrtc_warn() {
        let probe = GpuProbe::Devices {
            driver: Some((12, 4)),
            devices: vec![device(79)],
            libs: vec![
                lib("NVRTC", true, (13, 0)),
                lib("cuBLAS", true, (12, 4)),
                lib("cuSOLVER", false, (0, 0)),
            ],
        };
        let f = gpu_findings(&probe, None, None);
        let warns: Vec<&str> = with_status(&f, Status::Warn)
            .iter()
            .map(|w| w.found.as_str())
            .collect();
        assert_eq!(warns.len(), 3, "{warns:?}");
        assert!(warns[0].contains("supports CUDA 12.4"), "{}", warns[0]);
        assert!(warns[1].starts_with("cuSOLVER"), "{}", warns[1]);
        assert!(warns[2].contains("UNSUPPORTED_PTX_VERSION"), "{}", warns[2]);
    }

    fn plan(ranks: Option<usize>, gpus: usize, ranks_per_gpu: usize) -> BindingPlan {
        BindingPlan {
            ranks_per_node: ranks,
            hypothetical: true,
            readers: 1,
            writers: 1,
            ranks_per_gpu,
            gpus: (0..gpus).map(|i| format!("{i} (H100)")).collect(),
            per_task: false,
        }
    }

    fn rows(findings: &[Finding]) -> Vec<&str> {
        findings
            .iter()
            .filter(|f| f.found.starts_with("local rank"))
            .map(|f| f.found.as_str())
            .collect()
    }

    #[test]
    fn binding_table_maps_local_ranks_to_gpus() {
        let f = binding_findings(&plan(Some(6), 4, 1));
        assert_eq!(
            f[0].found,
            "--ranks-per-node: 6 ranks per node: 1 reader, 1 writer, 4 compute ranks; 4 GPUs \
             visible, up to 1 compute rank each"
        );
        assert_eq!(
            rows(&f),
            [
                "local rank 0: reader",
                "local rank 1: writer",
                "local rank 2: compute 0 -> GPU 0 (H100)",
                "local rank 3: compute 1 -> GPU 1 (H100)",
                "local rank 4: compute 2 -> GPU 2 (H100)",
                "local rank 5: compute 3 -> GPU 3 (H100)",
            ]
        );
        assert!(with_status(&f, Status::Warn).is_empty());
    }

    #[test]
    fn more_compute_ranks_than_gpu_places_warns() {
        let f = binding_findings(&plan(Some(7), 2, 2));
        assert_eq!(
            rows(&f)[2..],
            [
                "local rank 2: compute 0 -> GPU 0 (H100)",
                "local rank 3: compute 1 -> GPU 1 (H100)",
                "local rank 4: compute 2 -> GPU 0 (H100)",
                "local rank 5: compute 3 -> GPU 1 (H100)",
                "local rank 6: compute 4 -> no GPU left",
            ]
        );
        let warns = with_status(&f, Status::Warn);
        assert_eq!(warns.len(), 1, "{f:?}");
        assert_eq!(
            warns[0].found,
            "5 compute ranks per node but 2 GPUs x 2 ranks per GPU = 4 places: local rank 6 \
             gets no GPU"
        );
        let hint = warns[0].hint.as_deref().unwrap();
        assert!(hint.contains("launch 6 ranks per node"), "{hint}");
        assert!(hint.contains("--ranks-per-gpu to 3"), "{hint}");
    }

    #[test]
    fn binding_on_the_cpu_or_per_task_gpus_folds_compute_ranks() {
        let cpu = binding_findings(&plan(Some(10), 0, 1));
        assert_eq!(
            rows(&cpu),
            [
                "local rank 0: reader",
                "local rank 1: writer",
                "local ranks 2-9: compute 0-7 -> the CPU",
            ]
        );
        let mut per_task = plan(Some(4), 1, 1);
        per_task.per_task = true;
        let f = binding_findings(&per_task);
        assert_eq!(
            rows(&f)[2],
            "local ranks 2-3: compute 0-1 -> device 0 of its own CUDA_VISIBLE_DEVICES"
        );
    }

    #[test]
    fn small_launches_share_roles_as_the_pipeline_does() {
        // Two ranks: one reads and writes, the other computes; one rank does everything.
        let two = binding_findings(&plan(Some(2), 4, 1));
        assert_eq!(
            rows(&two),
            [
                "local rank 0: reader+writer",
                "local rank 1: compute 0 -> GPU 0 (H100)",
            ]
        );
        let one = binding_findings(&plan(Some(1), 0, 1));
        assert_eq!(
            rows(&one),
            ["local rank 0: reader+writer+compute 0 -> the CPU"]
        );
        assert!(with_status(&one, Status::Warn).is_empty());
        let single = binding_findings(&plan(None, 1, 1));
        assert_eq!(single.len(), 1);
        assert_eq!(
            single[0].found,
            "single process: it reads, computes on GPU 0 (H100) and writes"
        );
    }

    const PROBE: &str = ".spextract-doctor-probe-test";

    #[test]
    fn writable_folder_is_ok_and_keeps_no_probe() {
        let dir = tempfile::tempdir().unwrap();
        let f = output_dir_findings(dir.path(), PROBE);
        assert_eq!(f[0].topic, "output");
        assert_ne!(f[0].status, Status::Fail, "{f:?}");
        assert!(f[0].found.contains("writable"), "{}", f[0].found);
        assert!(!dir.path().join(PROBE).exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn missing_folder_or_a_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let f = output_dir_findings(&missing, PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(
            f[0].found.ends_with("nope: does not exist"),
            "{}",
            f[0].found
        );
        assert!(f[0].hint.as_deref().unwrap().contains("mkdir -p"));
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let f = output_dir_findings(&file, PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(f[0].found.ends_with("is not a folder"), "{}", f[0].found);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn folder_refusing_new_files_fails() {
        // /proc takes no new files even from root, so this holds whoever runs the tests.
        let f = output_dir_findings(Path::new("/proc"), PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(f[0].found.contains("cannot create files"), "{}", f[0].found);
    }

    #[test]
    fn frame_list_inputs_and_output_folders_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("image.fits"), "x").unwrap();
        std::fs::write(d.join("psf.fits"), "x").unwrap();
        std::fs::create_dir(d.join("out")).unwrap();
        std::fs::write(d.join("out/done.fits"), "x").unwrap();
        std::fs::create_dir(d.join("afolder")).unwrap();
        // Relative paths start from the list's folder, as extract reads them.
        let list = d.join("frames.txt");
        std::fs::write(
            &list,
            "# image psf output\n\
             image.fits psf.fits out/a.fits\n\
             image.fits psf.fits out/done.fits  # already done\n\
             missing.fits psf.fits out/c.fits\n\
             afolder psf.fits new/d.fits\n\
             image.fits psf.fits psf.fits/sub/e.fits\n",
        )
        .unwrap();
        let f = frames_findings(&list, PROBE);
        assert_eq!(f[0].status, Status::Ok, "{f:?}");
        assert!(
            f[0].found.contains(
                "5 frames; 2 of 4 input files readable; 2 of 3 output folders writable (1 to \
                 be created by extract); outputs already there: 1"
            ),
            "{}",
            f[0].found
        );
        let fails: Vec<&str> = with_status(&f, Status::Fail)
            .iter()
            .map(|x| x.found.as_str())
            .collect();
        assert_eq!(fails.len(), 3, "{fails:?}");
        assert!(
            fails[0].contains("afolder (frame 4 of")
                && fails[0].ends_with("is a folder, not a file")
        );
        assert!(
            fails[1].contains("missing.fits (frame 3 of"),
            "{}",
            fails[1]
        );
        assert!(
            fails[2].contains("psf.fits/sub does not exist and cannot be made")
                && fails[2].ends_with("psf.fits is not a folder"),
            "{}",
            fails[2]
        );
        // The probe left nothing behind, and the folder to create was not created.
        assert!(!d.join("new").exists());
        assert!(!d.join(PROBE).exists() && !d.join("out").join(PROBE).exists());
    }

    #[test]
    fn malformed_missing_or_empty_frame_lists_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("frames.txt");
        std::fs::write(&list, "a.fits b.fits\n").unwrap();
        let f = frames_findings(&list, PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(f[0].found.contains("frames.txt:1"), "{}", f[0].found);
        let f = frames_findings(&dir.path().join("absent.txt"), PROBE);
        assert_eq!(statuses(&f), [Status::Fail]);
        assert!(f[0].found.contains("absent.txt"), "{}", f[0].found);
        std::fs::write(&list, "# nothing yet\n\n").unwrap();
        let f = frames_findings(&list, PROBE);
        assert_eq!(statuses(&f), [Status::Warn]);
        assert!(f[0].found.ends_with("lists no frame"), "{}", f[0].found);
    }

    #[test]
    fn many_unreadable_inputs_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        let lines: String = (0..15)
            .map(|i| format!("img{i}.fits psf.fits out/f{i}.fits\n"))
            .collect();
        let list = dir.path().join("frames.txt");
        std::fs::write(&list, lines).unwrap();
        let f = frames_findings(&list, PROBE);
        let fails = with_status(&f, Status::Fail);
        assert_eq!(fails.len(), MAX_LISTED + 1);
        assert_eq!(fails[MAX_LISTED].found, "... and 6 more unreadable inputs");
    }

    #[test]
    fn panics_become_errors() {
        assert_eq!(catch_quietly(|| 7), Ok(7));
        let err = catch_quietly(|| -> i32 { panic!("no libcuda {}", 1) });
        assert_eq!(err, Err("no libcuda 1".to_string()));
    }

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
