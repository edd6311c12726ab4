//! What the process learns from its environment before any work: whether an MPI launcher
//! started it, its place on the node, the threads it may use, and the thread variables of the
//! numerical libraries. Shared by `extract` (which acts on it) and `doctor` (which reports it).

/// Where this process sits, as the launcher describes it in the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Whether an MPI launcher (mpirun/mpiexec/srun with PMI) started the process.
    pub under_mpi: bool,
    /// Rank in the job (0 without MPI).
    pub rank: usize,
    /// Ranks in the job.
    pub size: usize,
    /// Rank on this node.
    pub local_rank: usize,
    /// Ranks on this node.
    pub local_size: usize,
}

fn env_usize(names: &[&str]) -> Option<usize> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok()?.trim().parse::<usize>().ok())
}

/// Reads the launcher's variables (OpenMPI, MPICH/Hydra PMI, PMIx, Slurm's srun).
///
/// Slurm variables alone do not mean MPI: `SLURM_PROCID` is set inside any batch step, so
/// srun counts only when it started more than one task or set PMI/PMIx variables.
pub fn launch() -> Launch {
    let size = env_usize(&[
        "OMPI_COMM_WORLD_SIZE",
        "PMIX_SIZE",
        "PMI_SIZE",
        "MPI_LOCALNRANKS_WORLD",
    ]);
    let slurm_tasks = env_usize(&["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"]);
    let pmi = std::env::var_os("PMI_RANK").is_some()
        || std::env::var_os("PMIX_RANK").is_some()
        || std::env::var_os("OMPI_COMM_WORLD_RANK").is_some();
    let in_srun_step = std::env::var_os("SLURM_STEP_ID").is_some();
    let under_mpi = pmi || size.is_some() || (in_srun_step && slurm_tasks.unwrap_or(1) > 1);
    if !under_mpi {
        return Launch {
            under_mpi: false,
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
        };
    }
    let rank = env_usize(&[
        "OMPI_COMM_WORLD_RANK",
        "PMIX_RANK",
        "PMI_RANK",
        "SLURM_PROCID",
    ])
    .unwrap_or(0);
    let size = size.or(slurm_tasks).unwrap_or(1);
    let local_rank = env_usize(&[
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "PMIX_LOCAL_RANK",
    ])
    .unwrap_or(0);
    let local_size = env_usize(&[
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "PMIX_LOCAL_SIZE",
        "SLURM_TASKS_PER_NODE",
    ])
    .unwrap_or(size);
    Launch {
        under_mpi,
        rank,
        size,
        local_rank,
        local_size,
    }
}

/// Threads a compute rank uses: `requested` when > 0, else `SLURM_CPUS_PER_TASK`, else the
/// cores this process may run on.
pub fn resolve_threads(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    if let Some(n) = env_usize(&["SLURM_CPUS_PER_TASK"]).filter(|&n| n > 0) {
        return n;
    }
    available_cores()
}

/// Cores this process may run on (its affinity mask where the OS reports one).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Cores on this node, whatever this process's affinity.
pub fn node_cores() -> usize {
    // SAFETY: sysconf has no preconditions; a negative result means "unknown".
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        available_cores()
    }
}

/// The warning for `ranks_per_node × threads_per_rank` above the node's cores, if any.
pub fn oversubscription(
    ranks_per_node: usize,
    threads_per_rank: usize,
    cores: usize,
) -> Option<String> {
    let want = ranks_per_node * threads_per_rank;
    (want > cores).then(|| {
        format!(
            "{ranks_per_node} ranks per node x {threads_per_rank} threads = {want} threads on \
             {cores} cores: the node is oversubscribed; lower --threads (or \
             --cpus-per-task) or the ranks per node"
        )
    })
}

/// Thread variables of OpenMP and the BLAS libraries, which must be 1 inside threaded code.
pub const BLAS_THREAD_VARS: [&str; 3] =
    ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"];

/// Sets each unset [`BLAS_THREAD_VARS`] to 1 for this process and the libraries it loads;
/// a value the user set is kept (and returned, for the log). Call before any thread starts.
pub fn pin_blas_threads() -> Vec<(String, String)> {
    let mut kept = Vec::new();
    for var in BLAS_THREAD_VARS {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => kept.push((var.to_string(), v)),
            _ => {
                // SAFETY (set_var): called from main before any other thread exists.
                std::env::set_var(var, "1");
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversubscription_is_reported_only_past_the_cores() {
        assert!(oversubscription(2, 8, 16).is_none());
        let msg = oversubscription(4, 8, 16).expect("32 > 16");
        assert!(msg.contains("32 threads on 16 cores"), "{msg}");
    }
}
