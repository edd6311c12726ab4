//! The many-frame pipeline: ranks, roles, queues and scheduling.
//!
//! Every rank runs one event loop (`event_loop`) that alone talks to MPI
//! (MPI_THREAD_FUNNELED); the heavy work of each role runs on its own thread behind crossbeam
//! channels, and each role is a state machine of its own file that the loop hands messages
//! (`on_*`) and lets take a step (`step`):
//! - the **coordinator** (world rank 0) hands frames to readers, one at a time, on request;
//! - a **reader** keeps up to `prefetch` frames read and cut into work units, and hands units to
//!   the compute ranks that ask, so that a slow frame never idles the others;
//! - a **compute** rank extracts one unit while the next is already on its way;
//! - a **writer** puts frames back together and writes each atomically.
//!
//! Ranks are grouped by node (MPI_Comm_split_type shared memory; `layout`); each node has its
//! own readers, writers and compute ranks. One process without MPI plays every role, with the
//! messages moved through a local queue. Signals and the watchdog are in `watch`.
//!
//! Imports the rest of the pipeline (`comm`, `unit`, `prepare`, `report`, `joblist`, `env`,
//! `device_path`), `extract` (the compute engine) and `config`.

mod compute;
mod coordinator;
mod event_loop;
mod layout;
mod reader;
mod watch;
mod writer;

use std::path::PathBuf;

use tracing::error;

pub use layout::{Layout, Roles};
pub use watch::StopSignal;

use super::comm::{CommError, LocalComm, MpiComm};
use super::joblist::FrameJob;
use super::report::RunReport;
use super::unit::UnitError;
use crate::config::Config;

/// Everything a run needs, resolved from the command line and the configuration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The merged, validated configuration.
    pub cfg: Config,
    /// The frames, in order.
    pub jobs: Vec<FrameJob>,
    /// Jobs (indices) whose output is already complete: not extracted again.
    pub skipped: Vec<usize>,
    /// Replace existing outputs.
    pub overwrite: bool,
    /// Reader ranks per node.
    pub readers_per_node: usize,
    /// Writer ranks per node.
    pub writers_per_node: usize,
    /// Frames each reader holds ahead.
    pub prefetch: usize,
    /// Bundles per work unit.
    pub unit_bundles: usize,
    /// Compute ranks sharing a GPU.
    pub ranks_per_gpu: usize,
    /// Seconds without progress before the watchdog reports.
    pub watchdog_s: f64,
    /// Threads per compute rank.
    pub threads: usize,
    /// Which backend the compute ranks start.
    pub backend: crate::extract::engine::BackendKind,
    /// Label for the report.
    pub label: Option<String>,
    /// JSON report path.
    pub report: Option<PathBuf>,
    /// Rank 0 draws a progress bar (on a terminal); otherwise it logs a progress line now
    /// and then.
    pub progress_bar: bool,
}

/// Why a run stopped, naming the rank or message at fault.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A message could not travel.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A message reached a rank without the role it is for.
    #[error("{what} sent to a rank that does not {role}")]
    NotMine {
        /// The message, as the error names it.
        what: &'static str,
        /// The role it needs: read, compute or write.
        role: &'static str,
    },
    /// A rank summary reached a rank other than 0.
    #[error("rank {from} sent its summary to rank {rank}, not rank 0")]
    SummaryNotToZero {
        /// The sender.
        from: usize,
        /// The receiver.
        rank: usize,
    },
    /// The compute thread ended (its backend could not start) with units still to do.
    #[error("the compute thread has stopped")]
    ComputeStopped,
    /// A unit's output does not fit its frame.
    #[error(transparent)]
    Unit(#[from] UnitError),
    /// A unit's pixels from rank `from` could not be taken into device memory.
    #[cfg(feature = "cuda-aware-mpi")]
    #[error("from rank {from}: {error}")]
    Landing {
        /// The reader that sent them.
        from: usize,
        /// Why.
        error: crate::pipeline::device_path::DevicePathError,
    },
    /// A unit's results could not be put back into its arrays.
    #[cfg(feature = "cuda-aware-mpi")]
    #[error(transparent)]
    DevicePath(#[from] crate::pipeline::device_path::DevicePathError),
    /// MPI_Init failed.
    #[error("MPI could not be initialised (was it already?)")]
    MpiInit,
    /// The event loop needs MPI_THREAD_FUNNELED.
    #[error("the MPI library offers no MPI_THREAD_FUNNELED; spextract needs it")]
    NoFunneled,
    /// The cuda-aware-mpi build under an MPI that cannot take device buffers.
    #[error(
        "spextract was built with --features cuda-aware-mpi but the MPI library it runs \
         with ({library}) is not usable for it: {why}. Rebuild without the feature \
         (host-staged transfers), or run with a CUDA-aware MPI, such as the Open MPI \
         that scripts/build-cuda-aware-ompi.sh builds (spextract doctor reports what \
         the MPI says)"
    )]
    NotCudaAware {
        /// MPI_Get_library_version's first line.
        library: String,
        /// What the library says about itself.
        why: &'static str,
    },
    /// The signal handlers could not be installed.
    #[error("installing the SIGTERM/SIGINT/SIGUSR1/SIGUSR2 handlers")]
    Signals(#[source] std::io::Error),
    /// The signal thread did not start.
    #[error("starting the signal thread")]
    SignalThread(#[source] std::io::Error),
}

/// Runs the frames of `opts`, under MPI when a launcher started this process, else as one
/// process playing every role. Returns the report on rank 0 (None on the others).
pub fn execute(opts: &RunOptions, stop: &StopSignal) -> Result<Option<RunReport>, RunError> {
    let launch = crate::pipeline::env::launch();
    if launch.under_mpi {
        let (universe, level) =
            mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or(RunError::MpiInit)?;
        if level < mpi::Threading::Funneled {
            return Err(RunError::NoFunneled);
        }
        let world = universe.world();
        // The cuda-aware-mpi build hands device buffers to MPI; an MPI library that cannot
        // take them would read device addresses as host memory, so refuse before any work.
        if cfg!(feature = "cuda-aware-mpi")
            && crate::pipeline::env::mpi_is_cuda_aware() != Some(true)
        {
            let why = match crate::pipeline::env::mpi_is_cuda_aware() {
                Some(_) => "MPIX_Query_cuda_support() says it is not CUDA-aware",
                None => "it cannot say whether it is CUDA-aware (no MPIX_Query_cuda_support)",
            };
            let library = mpi::environment::library_version()
                .map(|v| v.lines().next().unwrap_or("").trim().to_string())
                .unwrap_or_else(|_| "MPI_Get_library_version failed".into());
            return Err(RunError::NotCudaAware { library, why });
        }
        let layout = mpi_layout(&world, opts);
        let mut comm = MpiComm::new(world);
        let rep = event_loop::run_rank(&mut comm, &layout, opts, stop);
        if let Err(e) = &rep {
            // The log line names the rank.
            error!("{e:#}; aborting the job");
            use mpi::topology::Communicator;
            universe.world().abort(2);
        }
        rep
    } else {
        let layout = Layout::new(vec![vec![0]], opts.readers_per_node, opts.writers_per_node);
        event_loop::run_rank(&mut LocalComm::default(), &layout, opts, stop)
    }
}

/// Ends the whole MPI job from rank 0 when it refuses the run before the ranks meet (the
/// reason already logged): the other ranks wait for it in MPI_Init, and would wait forever
/// under a launcher that does not end a job when one rank exits.
pub fn abort_job(code: i32) -> ! {
    use mpi::topology::Communicator;
    match mpi::initialize() {
        Some(universe) => universe.world().abort(code),
        None => std::process::exit(code),
    }
}

/// Groups the world's ranks by node: each rank learns the lowest world rank of its
/// shared-memory group, and ranks sharing a leader share a node.
fn mpi_layout(world: &mpi::topology::SimpleCommunicator, opts: &RunOptions) -> Layout {
    use mpi::collective::{CommunicatorCollectives, SystemOperation};
    use mpi::topology::Communicator;
    let rank = world.rank();
    let node = world.split_shared(rank);
    let mut leader = 0i32;
    node.all_reduce_into(&rank, &mut leader, SystemOperation::min());
    let mut leaders = vec![0i32; world.size() as usize];
    world.all_gather_into(&leader, &mut leaders[..]);
    let mut ids: Vec<i32> = leaders.clone();
    ids.sort_unstable();
    ids.dedup();
    let nodes = ids
        .iter()
        .map(|&l| {
            (0..leaders.len())
                .filter(|&r| leaders[r] == l)
                .collect::<Vec<_>>()
        })
        .collect();
    Layout::new(nodes, opts.readers_per_node, opts.writers_per_node)
}
