//! What the process learns from its environment before any work: whether an MPI launcher
//! started it, its place on the node, the threads it may use, and the thread variables of the
//! numerical libraries. Shared by `extract` (which acts on it) and `doctor` (which reports it).

// Counts cross into C here (cfitsio's and MPI's `int`): converted with `try_from`, never `as`.
#![deny(clippy::cast_possible_truncation)]

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

/// Most worker threads per core of the node a rank may run: more only take turns on the
/// cores, and a count such as 100 000 takes minutes just to start.
pub const MAX_THREADS_PER_CORE: usize = 4;

/// Where a compute rank's thread count comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadSource {
    /// `--threads`, or `threads` under `[run]`.
    Requested,
    /// `SLURM_CPUS_PER_TASK`.
    Slurm,
    /// The cores this process may run on.
    Cores,
}

/// The threads a compute rank runs, and the count asked for when it was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadCount {
    /// Threads used.
    pub threads: usize,
    /// Where the count comes from.
    pub source: ThreadSource,
    /// The count asked for, when it was above [`MAX_THREADS_PER_CORE`] per node core and cut.
    pub asked: Option<usize>,
    /// Cores of the node, which set the limit.
    pub node_cores: usize,
}

impl ThreadCount {
    /// `requested` when > 0, else `slurm_cpus` when > 0, else `available_cores`; at most
    /// [`MAX_THREADS_PER_CORE`] × `node_cores`.
    pub fn new(
        requested: usize,
        slurm_cpus: Option<usize>,
        available_cores: usize,
        node_cores: usize,
    ) -> ThreadCount {
        let (want, source) = if requested > 0 {
            (requested, ThreadSource::Requested)
        } else if let Some(n) = slurm_cpus.filter(|&n| n > 0) {
            (n, ThreadSource::Slurm)
        } else {
            (available_cores.max(1), ThreadSource::Cores)
        };
        let limit = MAX_THREADS_PER_CORE.saturating_mul(node_cores.max(1));
        ThreadCount {
            threads: want.min(limit),
            source,
            asked: (want > limit).then_some(want),
            node_cores: node_cores.max(1),
        }
    }

    /// The warning to give when the count asked for was cut.
    pub fn warning(&self) -> Option<String> {
        let asked = self.asked?;
        let what = match self.source {
            ThreadSource::Requested => {
                format!("a thread count of {asked} (--threads, or threads under [run])")
            }
            ThreadSource::Slurm => format!("SLURM_CPUS_PER_TASK={asked}"),
            ThreadSource::Cores => format!("{asked} cores"),
        };
        Some(format!(
            "{what} is more than {MAX_THREADS_PER_CORE} threads per core of this node's {}: \
             using {} threads per compute rank",
            count_of(self.node_cores, "core"),
            self.threads
        ))
    }
}

fn count_of(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// The threads of a compute rank as [`ThreadCount::new`] gives them, from
/// `SLURM_CPUS_PER_TASK` and this machine's cores.
pub fn thread_count(requested: usize) -> ThreadCount {
    ThreadCount::new(
        requested,
        env_usize(&["SLURM_CPUS_PER_TASK"]),
        available_cores(),
        node_cores(),
    )
}

/// Threads a compute rank uses: `requested` when > 0, else `SLURM_CPUS_PER_TASK`, else the
/// cores this process may run on; never more than [`MAX_THREADS_PER_CORE`] per node core
/// ([`thread_count`] says when a count was cut).
pub fn resolve_threads(requested: usize) -> usize {
    thread_count(requested).threads
}

/// Most frames a reader holds read and cut ahead: each is about 0.3 GB (image and ivar of a
/// 4k × 4k CCD in float64), so 16 already take some 5 GB per reader.
pub const MAX_PREFETCH: usize = 16;

/// The prefetch depth used for `requested`, at most [`MAX_PREFETCH`], and the warning to give
/// when it was cut.
pub fn cap_prefetch(requested: usize) -> (usize, Option<String>) {
    if requested <= MAX_PREFETCH {
        return (requested, None);
    }
    let why = format!(
        "a prefetch of {requested} frames (--prefetch, or prefetch under [run]) is more than \
         the {MAX_PREFETCH} a reader may hold ahead (about 0.3 GB each for a 4k x 4k CCD): \
         using {MAX_PREFETCH}"
    );
    (MAX_PREFETCH, Some(why))
}

/// Cores this process may run on (its affinity mask where the OS reports one).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Cores on this node, whatever this process's affinity.
pub fn node_cores() -> usize {
    // SAFETY: sysconf has no preconditions; a negative result means "unknown".
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    match usize::try_from(n) {
        Ok(n) if n > 0 => n,
        _ => available_cores(),
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
            "{ranks_per_node} ranks per node x {} = {want} threads on {cores} cores: the node is oversubscribed; lower --threads (or \
             --cpus-per-task) or the ranks per node",
            super::progress::count(threads_per_rank, "thread")
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

/// A process's GPUs as `CUDA_VISIBLE_DEVICES` names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisibleDevices {
    /// The entries CUDA honours, in order: device indices, `GPU-…` UUIDs or `MIG-…` instances.
    pub devices: Vec<String>,
    /// The entries from the first one CUDA cannot parse on: CUDA ignores the whole tail, so
    /// `0,1,x,2` shows only devices 0 and 1, and `-1` or `NoDevFiles` hide every device.
    pub ignored: Vec<String>,
}

/// Parses the value of `CUDA_VISIBLE_DEVICES` (a comma list of indices or UUIDs). The empty
/// string hides every GPU; an unset variable (not this function's concern) shows them all.
pub fn parse_cuda_visible_devices(value: &str) -> VisibleDevices {
    let mut out = VisibleDevices {
        devices: Vec::new(),
        ignored: Vec::new(),
    };
    if value.trim().is_empty() {
        return out;
    }
    for entry in value.split(',').map(str::trim) {
        let is_device = (!entry.is_empty() && entry.bytes().all(|b| b.is_ascii_digit()))
            || entry.starts_with("GPU-")
            || entry.starts_with("MIG-");
        if is_device && out.ignored.is_empty() {
            out.devices.push(entry.to_string());
        } else {
            out.ignored.push(entry.to_string());
        }
    }
    out
}

/// The GPU a compute rank uses, as an index into the devices it sees; `None` when it gets none.
///
/// Compute ranks take the visible devices round-robin by their node-local compute index, so
/// a node only partly filled with ranks still spreads them over every GPU; each device takes
/// at most `ranks_per_gpu` ranks, and a rank past `visible_gpus × ranks_per_gpu` gets none.
/// Where Slurm binds GPUs per task each rank sees only its own devices: pass index 0 then.
pub fn gpu_binding(
    compute_local_rank: usize,
    visible_gpus: usize,
    ranks_per_gpu: usize,
) -> Option<usize> {
    let slots = visible_gpus.saturating_mul(ranks_per_gpu);
    (compute_local_rank < slots).then(|| compute_local_rank % visible_gpus)
}

/// Whether Slurm gave each task its own GPUs (`--gpus-per-task`, or a `--gpu-bind` other than
/// `none`), from `SLURM_GPUS_PER_TASK` and `SLURM_GPU_BIND`. Each rank's
/// `CUDA_VISIBLE_DEVICES` then lists only its own devices, so ranks must not index them by
/// node-local rank.
pub fn slurm_binds_gpus_per_task(gpus_per_task: Option<&str>, gpu_bind: Option<&str>) -> bool {
    let per_task = gpus_per_task.is_some_and(|v| v.trim().parse::<usize>().is_ok_and(|n| n > 0));
    // `--gpu-bind=[verbose,]<type>`: the verbose prefix changes nothing about the binding.
    let bind = gpu_bind
        .map(|v| v.trim().trim_start_matches("verbose,").trim())
        .is_some_and(|v| !v.is_empty() && v != "none");
    per_task || bind
}

/// The visible GPU a compute rank uses (`compute_index`: its place among its node's compute
/// ranks): the ranks take the visible GPUs in turn, `ranks_per_gpu` to a GPU; under Slurm's
/// per-task GPU binding each rank sees only its own GPU, device 0. Says why when there is none.
pub fn gpu_ordinal(
    compute_index: usize,
    visible: usize,
    ranks_per_gpu: usize,
) -> Result<usize, String> {
    let per_task = slurm_binds_gpus_per_task(
        std::env::var("SLURM_GPUS_PER_TASK").ok().as_deref(),
        std::env::var("SLURM_GPU_BIND").ok().as_deref(),
    );
    if per_task {
        return Ok(0);
    }
    gpu_binding(compute_index, visible, ranks_per_gpu).ok_or_else(|| {
        format!(
            "compute rank {compute_index} of its node has no GPU: {visible} visible, \
             {ranks_per_gpu} compute rank(s) per GPU (start fewer ranks per node, or raise \
             --ranks-per-gpu under MPS)"
        )
    })
}

/// `MPIX_Query_cuda_support`, looked up at run time so that the binary also links against
/// MPI libraries without it (MPICH). Open MPI documents that it may only be called after
/// MPI_Init.
pub fn mpix_query_cuda_support() -> Option<unsafe extern "C" fn() -> std::ffi::c_int> {
    // SAFETY: the name is a NUL-terminated literal; dlsym only reads it.
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"MPIX_Query_cuda_support".as_ptr()) };
    if sym.is_null() {
        return None;
    }
    // SAFETY: Open MPI's mpi-ext.h declares `int MPIX_Query_cuda_support(void)`, so the
    // symbol is a C function of exactly this type.
    Some(unsafe {
        std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn() -> std::ffi::c_int>(sym)
    })
}

/// After MPI_Init: whether the MPI library accepts device buffers (None: it cannot say).
pub fn mpi_is_cuda_aware() -> Option<bool> {
    // SAFETY: called only after MPI_Init (see the callers), the precondition Open MPI states.
    mpix_query_cuda_support().map(|q| unsafe { q() } != 0)
}

// ---------------------------------------------------------------------------------------------
// Facts for `spextract doctor`: what the MPI library says of itself, MPI initialised for a
// report, the free space of a folder and the environment the process started with. Here so
// that the cli calls no MPI or libc function itself.

/// The thread levels of MPI_Init_thread, as rsmpi names them.
pub use mpi::Threading;

/// The MPI library's description of itself (`MPI_Get_library_version`, callable before
/// MPI_Init), or why it cannot be read.
pub fn mpi_library_version() -> Result<String, String> {
    mpi::environment::library_version().map_err(|e| e.to_string())
}

/// The MPI standard the library implements (`MPI_Get_version`), as (major, minor).
pub fn mpi_standard() -> (i32, i32) {
    mpi::environment::version()
}

/// MPI initialised as `extract` initialises it, so that a report sees the thread level a run
/// would get. Dropping it finalises MPI.
pub struct MpiSession {
    universe: mpi::environment::Universe,
    /// The thread level the library granted (extract asks for MPI_THREAD_FUNNELED).
    pub threading: Threading,
}

impl MpiSession {
    /// Initialises MPI asking for MPI_THREAD_FUNNELED; None when it was already initialised.
    pub fn init_funneled() -> Option<MpiSession> {
        mpi::initialize_with_threading(Threading::Funneled).map(|(universe, threading)| {
            MpiSession {
                universe,
                threading,
            }
        })
    }

    /// This process's rank in the world.
    pub fn rank(&self) -> usize {
        use mpi::traits::Communicator;
        usize::try_from(self.universe.world().rank()).unwrap_or(0)
    }

    /// Every rank's hostname, in rank order (collective: every rank must call it).
    pub fn hostnames(&self) -> Vec<String> {
        use mpi::traits::{Communicator, CommunicatorCollectives};
        // Fixed-width records keep the gather a single collective; MPI_MAX_PROCESSOR_NAME is
        // 256 in Open MPI and 128 in MPICH, so nothing is cut.
        const WIDTH: usize = 256;
        let world = self.universe.world();
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
}

/// Bytes free to this user on the file system holding `dir` (quotas not included).
pub fn free_bytes(dir: &std::path::Path) -> Option<u64> {
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
    let bytes = u128::from(st.f_bavail) * u128::from(st.f_frsize);
    Some(u64::try_from(bytes).unwrap_or(u64::MAX))
}

/// A variable as this process started with it. `main` sets the unset BLAS thread variables
/// to 1 ([`pin_blas_threads`]) before any subcommand runs, and doctor reports what the user
/// set; Linux keeps the starting environment in /proc/self/environ, which setenv does not
/// touch.
pub fn initial_var(name: &str) -> Option<String> {
    let Ok(environ) = std::fs::read("/proc/self/environ") else {
        return std::env::var(name).ok();
    };
    environ.split(|&b| b == 0).find_map(|entry| {
        let value = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(value).into_owned())
    })
}

/// Who passes a stop signal on to this process, which decides what a SIGTERM or SIGINT can
/// promise about the frames in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalRoute {
    /// No launcher, or Slurm's srun: the signal reaches the process and nothing ends it soon
    /// after, so the frames in flight can be finished (Slurm's `--signal` reaches the ranks of
    /// an srun step directly).
    Direct,
    /// An MPI launcher (named) that passes SIGTERM/SIGINT on and then ends the ranks itself
    /// (Open MPI's mpirun: about a second later). Open MPI's mpirun forwards SIGUSR1 and
    /// SIGUSR2 without ending anything.
    Launcher(&'static str),
}

/// The route of this process's stop signals, from the environment it started with.
pub fn signal_route() -> SignalRoute {
    signal_route_from(initial_var)
}

/// [`signal_route`] from the variables `var` gives.
///
/// Open MPI's mpirun (ORTE and PRRTE alike) sets `OMPI_COMM_WORLD_SIZE` in each rank's
/// starting environment, MPICH's Hydra `MPI_LOCALRANKID`; srun sets neither (Open MPI under
/// srun sets them only later, inside MPI_Init, which the starting environment does not see),
/// but `SLURM_STEP_ID`. PMI/PMIx variables without an srun step mean some other launcher.
pub fn signal_route_from(var: impl Fn(&str) -> Option<String>) -> SignalRoute {
    if var("OMPI_COMM_WORLD_SIZE").is_some() {
        return SignalRoute::Launcher("mpirun");
    }
    if var("MPI_LOCALRANKID").is_some() {
        return SignalRoute::Launcher("mpiexec");
    }
    let pmi = var("PMI_RANK").is_some() || var("PMIX_RANK").is_some();
    if pmi && var("SLURM_STEP_ID").is_none() {
        return SignalRoute::Launcher("the MPI launcher");
    }
    SignalRoute::Direct
}

// End of the facts for `spextract doctor`.
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// `--ranks-per-gpu` reaches the binding: two ranks per GPU fill two GPUs with four ranks,
    /// and a fifth is refused with the way out named.
    /// mpirun and mpiexec are told apart from srun and from no launcher at all, whatever
    /// Slurm variables surround them (mpirun inside an allocation still ends its ranks).
    #[test]
    fn stop_signals_route_through_the_launcher_that_started_the_rank() {
        let route =
            |vars: &[&str]| signal_route_from(|name| vars.contains(&name).then(|| "1".to_string()));
        assert_eq!(route(&[]), SignalRoute::Direct);
        assert_eq!(route(&["SLURM_STEP_ID", "PMIX_RANK"]), SignalRoute::Direct);
        assert_eq!(route(&["SLURM_STEP_ID", "PMI_RANK"]), SignalRoute::Direct);
        assert_eq!(
            route(&["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "SLURM_STEP_ID"]),
            SignalRoute::Launcher("mpirun")
        );
        assert_eq!(
            route(&["MPI_LOCALRANKID", "PMI_RANK"]),
            SignalRoute::Launcher("mpiexec")
        );
        assert_eq!(
            route(&["PMIX_RANK"]),
            SignalRoute::Launcher("the MPI launcher")
        );
    }

    #[test]
    fn ranks_per_gpu_shares_devices_and_refuses_the_excess() {
        if std::env::var_os("SLURM_GPUS_PER_TASK").is_some()
            || std::env::var_os("SLURM_GPU_BIND").is_some()
        {
            eprintln!("skipping: Slurm binds GPUs per task here");
            return;
        }
        let got: Vec<usize> = (0..4).map(|k| gpu_ordinal(k, 2, 2).unwrap()).collect();
        assert_eq!(got, [0, 1, 0, 1]);
        let err = gpu_ordinal(4, 2, 2).unwrap_err();
        assert!(err.contains("--ranks-per-gpu"), "{err}");
        assert!(gpu_ordinal(1, 2, 1).is_ok() && gpu_ordinal(2, 2, 1).is_err());
    }

    /// Absurd thread counts, asked for or from Slurm, are cut to a few per core with a
    /// warning naming the request; sensible ones, and oversubscription up to the limit, pass.
    #[test]
    fn huge_thread_counts_are_cut_with_a_warning() {
        let t = ThreadCount::new(100_000, None, 2, 2);
        assert_eq!((t.threads, t.asked), (8, Some(100_000)));
        let w = t.warning().unwrap();
        assert_eq!(
            w,
            "a thread count of 100000 (--threads, or threads under [run]) is more than 4 \
             threads per core of this node's 2 cores: using 8 threads per compute rank"
        );
        let t = ThreadCount::new(0, Some(100_000), 2, 64);
        assert_eq!((t.threads, t.source), (256, ThreadSource::Slurm));
        assert!(t
            .warning()
            .unwrap()
            .starts_with("SLURM_CPUS_PER_TASK=100000 is more"));
        let t = ThreadCount::new(8, Some(100_000), 2, 4);
        assert_eq!((t.threads, t.asked, t.warning()), (8, None, None));
        let t = ThreadCount::new(0, Some(0), 3, 4);
        assert_eq!(
            (t.threads, t.source, t.asked),
            (3, ThreadSource::Cores, None)
        );
        let t = ThreadCount::new(0, None, 0, 0);
        assert_eq!(t.threads, 1);
    }

    #[test]
    fn huge_prefetch_is_cut_with_a_warning() {
        assert_eq!(cap_prefetch(0), (0, None));
        assert_eq!(cap_prefetch(MAX_PREFETCH), (MAX_PREFETCH, None));
        let (n, why) = cap_prefetch(10_000);
        assert_eq!(n, MAX_PREFETCH);
        assert!(why.unwrap().starts_with("a prefetch of 10000 frames"));
    }

    #[test]
    fn oversubscription_is_reported_only_past_the_cores() {
        assert!(oversubscription(2, 8, 16).is_none());
        let msg = oversubscription(4, 8, 16).expect("32 > 16");
        assert!(msg.contains("32 threads on 16 cores"), "{msg}");
    }

    #[test]
    fn cuda_visible_devices_lists_indices_and_uuids() {
        let v = parse_cuda_visible_devices("0, 2,GPU-8932f937-d72c-4106-c12f-20bd9faed9f6");
        assert_eq!(
            v.devices,
            ["0", "2", "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"]
        );
        assert!(v.ignored.is_empty());
        let mig = parse_cuda_visible_devices("MIG-4b3d8c6e-6e7e-5b1a-9d7b-0a1b2c3d4e5f");
        assert_eq!(mig.devices.len(), 1);
    }

    #[test]
    fn cuda_visible_devices_empty_or_invalid_hides_gpus() {
        let empty = parse_cuda_visible_devices("");
        assert!(empty.devices.is_empty() && empty.ignored.is_empty());
        assert!(parse_cuda_visible_devices("  ").devices.is_empty());
        let none = parse_cuda_visible_devices("-1");
        assert!(none.devices.is_empty());
        assert_eq!(none.ignored, ["-1"]);
        assert!(parse_cuda_visible_devices("NoDevFiles").devices.is_empty());
        // CUDA stops at the first entry it cannot parse and ignores the rest, valid or not.
        let tail = parse_cuda_visible_devices("0,1,x,2");
        assert_eq!(tail.devices, ["0", "1"]);
        assert_eq!(tail.ignored, ["x", "2"]);
        assert_eq!(parse_cuda_visible_devices("0,,1").devices, ["0"]);
    }

    #[test]
    fn gpu_binding_spreads_ranks_round_robin_up_to_capacity() {
        let four: Vec<_> = (0..6).map(|r| gpu_binding(r, 4, 1)).collect();
        assert_eq!(four, [Some(0), Some(1), Some(2), Some(3), None, None]);
        let shared: Vec<_> = (0..5).map(|r| gpu_binding(r, 2, 2)).collect();
        assert_eq!(shared, [Some(0), Some(1), Some(0), Some(1), None]);
        assert_eq!(gpu_binding(0, 0, 4), None, "no GPU, no binding");
        assert_eq!(gpu_binding(0, 1, 0), None, "zero ranks per GPU binds none");
    }

    #[test]
    fn slurm_per_task_binding_is_read_from_its_variables() {
        assert!(!slurm_binds_gpus_per_task(None, None));
        assert!(slurm_binds_gpus_per_task(Some("1"), None));
        assert!(!slurm_binds_gpus_per_task(Some("0"), None));
        assert!(slurm_binds_gpus_per_task(None, Some("closest")));
        assert!(slurm_binds_gpus_per_task(None, Some("verbose,map_gpu:0,1")));
        assert!(!slurm_binds_gpus_per_task(None, Some("none")));
        assert!(!slurm_binds_gpus_per_task(None, Some("verbose,none")));
    }
}
