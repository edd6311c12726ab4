//! The many-frame pipeline: ranks, roles, queues and scheduling.
//!
//! Every rank runs one event loop that alone talks to MPI (MPI_THREAD_FUNNELED); the heavy
//! work of each role runs on its own thread behind crossbeam channels:
//! - the **coordinator** (world rank 0) hands frames to readers, one at a time, on request;
//! - a **reader** keeps up to `prefetch` frames read and cut into work units, and hands units to
//!   the compute ranks that ask, so that a slow frame never idles the others;
//! - a **compute** rank extracts one unit while the next is already on its way;
//! - a **writer** puts frames back together and writes each atomically.
//!
//! Ranks are grouped by node (MPI_Comm_split_type shared memory); each node has its own
//! readers, writers and compute ranks. One process without MPI plays every role, with the
//! messages moved through a local queue.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crossbeam_channel::{unbounded, Receiver, Sender};
use tracing::{error, info, warn};

use super::comm::{Comm, LocalComm, MpiComm, Msg, RankSummary};
use super::joblist::FrameJob;
use super::prepare::{check_extracted, prepare_frame, write_outputs};
use super::report::{FrameCounts, FrameFailure, RoleTimes, RunReport, REPORT_VERSION};
use super::unit::{self, Assembly, FrameTicket, UnitInput, UnitOutput};
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
    /// Backend name for the report.
    pub backend: String,
    /// Label for the report.
    pub label: Option<String>,
    /// JSON report path.
    pub report: Option<PathBuf>,
}

/// What a rank does besides coordinating (world rank 0 always hands out the frames).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles {
    /// Reads and cuts frames.
    pub reader: bool,
    /// Writes frames.
    pub writer: bool,
    /// Extracts units.
    pub compute: bool,
}

impl Roles {
    fn name(&self) -> String {
        let mut v = Vec::new();
        if self.reader {
            v.push("reader");
        }
        if self.writer {
            v.push("writer");
        }
        if self.compute {
            v.push("compute");
        }
        if v.is_empty() {
            v.push("idle");
        }
        v.join("+")
    }
}

/// Who does what: ranks grouped by node, each node split into readers, writers and computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// World ranks of each node, ascending.
    pub nodes: Vec<Vec<usize>>,
    /// Per node: reader ranks.
    pub readers: Vec<Vec<usize>>,
    /// Per node: writer ranks.
    pub writers: Vec<Vec<usize>>,
    /// Per node: compute ranks.
    pub computes: Vec<Vec<usize>>,
}

impl Layout {
    /// Splits each node's ranks: one rank plays every role; two ranks are reader+writer and
    /// compute; more get `readers` readers, `writers` writers (at least one of each) and the
    /// rest compute, keeping at least one compute rank.
    pub fn new(nodes: Vec<Vec<usize>>, readers: usize, writers: usize) -> Layout {
        let mut l = Layout {
            readers: Vec::new(),
            writers: Vec::new(),
            computes: Vec::new(),
            nodes: Vec::new(),
        };
        for ranks in nodes {
            let n = ranks.len();
            let (r, w, c) = match n {
                0 => (vec![], vec![], vec![]),
                1 => (ranks.clone(), ranks.clone(), ranks.clone()),
                2 => (vec![ranks[0]], vec![ranks[0]], vec![ranks[1]]),
                _ => {
                    let nr = readers.clamp(1, n - 2);
                    let nw = writers.clamp(1, n - 1 - nr);
                    (
                        ranks[..nr].to_vec(),
                        ranks[nr..nr + nw].to_vec(),
                        ranks[nr + nw..].to_vec(),
                    )
                }
            };
            l.readers.push(r);
            l.writers.push(w);
            l.computes.push(c);
            l.nodes.push(ranks);
        }
        l
    }

    fn node_of(&self, rank: usize) -> usize {
        self.nodes
            .iter()
            .position(|n| n.contains(&rank))
            .expect("every rank is on a node")
    }

    fn roles(&self, rank: usize) -> Roles {
        let node = self.node_of(rank);
        Roles {
            reader: self.readers[node].contains(&rank),
            writer: self.writers[node].contains(&rank),
            compute: self.computes[node].contains(&rank),
        }
    }

    /// The reader a compute rank asks for work: the node's readers in turn.
    fn reader_of(&self, compute: usize) -> usize {
        let node = self.node_of(compute);
        let i = self.computes[node]
            .iter()
            .position(|&c| c == compute)
            .expect("a compute rank");
        let readers = &self.readers[node];
        readers[i % readers.len()]
    }

    /// The compute ranks a reader serves.
    fn computes_of(&self, reader: usize) -> Vec<usize> {
        let node = self.node_of(reader);
        self.computes[node]
            .iter()
            .copied()
            .filter(|&c| self.reader_of(c) == reader)
            .collect()
    }

    /// The writer of a frame cut on `node`.
    fn writer_of(&self, node: usize, job: usize) -> usize {
        let w = &self.writers[node];
        w[job % w.len()]
    }
}

/// Signals received (SIGTERM, SIGINT): 1 stops handing out frames, 2 abandons what is in
/// flight.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicUsize>);

impl StopSignal {
    /// Counts SIGTERM and SIGINT from now on.
    pub fn install() -> Result<StopSignal> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let count = Arc::new(AtomicUsize::new(0));
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
            .context("installing the SIGTERM/SIGINT handlers")?;
        let c = count.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                    if n == 1 {
                        warn!(
                            "{name}: no new frames will be started; frames in flight are \
                             finished and written (send it again to abandon them)"
                        );
                    } else {
                        warn!("{name} again: abandoning the frames in flight");
                    }
                }
            })
            .context("starting the signal thread")?;
        Ok(StopSignal(count))
    }

    fn level(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The last moment a rank made progress, and what it waits on, for the watchdog.
#[derive(Debug)]
struct Heartbeat {
    start: Instant,
    last_ms: AtomicU64,
    waiting: Mutex<String>,
}

impl Heartbeat {
    fn beat(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn waiting_on(&self, what: String) {
        if let Ok(mut w) = self.waiting.lock() {
            *w = what;
        }
    }
}

/// Reports when nothing has moved for `period`; after `abort_after` periods it ends the
/// process loudly (an MPI launcher then takes the job down) rather than hanging.
fn start_watchdog(hb: Arc<Heartbeat>, rank: usize, roles: String, period: f64, abort_after: u32) {
    if !(period > 0.0) {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut reported = 0u32;
            loop {
                std::thread::sleep(Duration::from_secs_f64((period / 4.0).max(0.05)));
                let idle = hb.start.elapsed().as_secs_f64()
                    - hb.last_ms.load(Ordering::Relaxed) as f64 / 1e3;
                let periods = (idle / period) as u32;
                if periods == 0 {
                    reported = 0;
                    continue;
                }
                if periods > reported {
                    reported = periods;
                    let what = hb.waiting.lock().map(|w| w.clone()).unwrap_or_default();
                    warn!("watchdog: rank {rank} ({roles}) has made no progress for {idle:.0} s; {what}");
                    if periods >= abort_after {
                        error!(
                            "watchdog: rank {rank} gives up after {idle:.0} s without progress; \
                             ending the job"
                        );
                        std::process::exit(3);
                    }
                }
            }
        });
}

/// Runs the frames of `opts`, under MPI when a launcher started this process, else as one
/// process playing every role. Returns the report on rank 0 (None on the others).
pub fn execute(opts: &RunOptions, stop: &StopSignal) -> Result<Option<RunReport>> {
    let launch = super::env::launch();
    if launch.under_mpi {
        let (universe, level) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .context("MPI could not be initialised (was it already?)")?;
        if level < mpi::Threading::Funneled {
            bail!("the MPI library offers no MPI_THREAD_FUNNELED; spextract needs it");
        }
        let world = universe.world();
        // The cuda-aware-mpi build hands device buffers to MPI; an MPI library that cannot
        // take them would read device addresses as host memory, so refuse before any work.
        if cfg!(feature = "cuda-aware-mpi") && super::env::mpi_is_cuda_aware() != Some(true) {
            let why = match super::env::mpi_is_cuda_aware() {
                Some(_) => "MPIX_Query_cuda_support() says it is not CUDA-aware",
                None => "it cannot say whether it is CUDA-aware (no MPIX_Query_cuda_support)",
            };
            let library = mpi::environment::library_version()
                .map(|v| v.lines().next().unwrap_or("").trim().to_string())
                .unwrap_or_else(|_| "MPI_Get_library_version failed".into());
            bail!(
                "spextract was built with --features cuda-aware-mpi but the MPI library it runs \
                 with ({library}) is not usable for it: {why}. Rebuild without the feature \
                 (host-staged transfers), or run with a CUDA-aware MPI, such as the Open MPI \
                 that scripts/build-cuda-aware-ompi.sh builds (spextract doctor reports what \
                 the MPI says)"
            );
        }
        let layout = mpi_layout(&world, opts);
        let mut comm = MpiComm::new(world);
        let rep = run_rank(&mut comm, &layout, opts, stop);
        if let Err(e) = &rep {
            error!("rank {}: {e:#}; aborting the job", comm.rank());
            use mpi::topology::Communicator;
            universe.world().abort(2);
        }
        rep
    } else {
        let layout = Layout::new(vec![vec![0]], opts.readers_per_node, opts.writers_per_node);
        run_rank(&mut LocalComm::default(), &layout, opts, stop)
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

/// What a reader thread hands back: a frame cut into units, or why it could not be.
type ReadDone = (
    usize,
    Result<(FrameTicket, Vec<UnitInput>), String>,
    Duration,
);

struct ReaderState {
    jobs_tx: Option<Sender<usize>>,
    done_rx: Receiver<ReadDone>,
    requested: bool,
    exhausted: bool,
    reading: usize,
    /// Frames cut and waiting: the ticket (None once sent) and the units not yet handed out.
    queue: VecDeque<(Option<FrameTicket>, VecDeque<UnitInput>)>,
    waiting: VecDeque<usize>,
    computes: Vec<usize>,
    finished: Vec<usize>,
    done: bool,
    /// Compute ranks that take their units' pixels as parts for device memory.
    #[cfg(feature = "cuda-aware-mpi")]
    device_ranks: std::collections::HashSet<usize>,
}

/// A unit's pixels in device memory, where the cuda-aware-mpi path delivered them there.
#[cfg(feature = "cuda-aware-mpi")]
type Landed = Option<super::device_path::LandedPixels>;
#[cfg(not(feature = "cuda-aware-mpi"))]
type Landed = ();

/// A unit's results kept in device memory, for the cuda-aware-mpi path to send from there.
#[cfg(feature = "cuda-aware-mpi")]
type Kept = Option<crate::extract::gpu::unit::DeviceUnit>;
#[cfg(not(feature = "cuda-aware-mpi"))]
type Kept = ();

/// A unit for the compute thread: the unit, its writer, its pixels if on the device.
type Delivery = (UnitInput, usize, Landed);

/// A unit the compute thread finished.
struct UnitDone {
    out: UnitOutput,
    writer: usize,
    took: Duration,
    kept: Kept,
    /// Its pixels came in device memory.
    on_device: bool,
    /// ... and the CPU needed them, so they were downloaded.
    downloaded: bool,
}

struct ComputeState {
    reader: usize,
    units_tx: Option<Sender<Delivery>>,
    done_rx: Receiver<UnitDone>,
    busy: bool,
    pending: VecDeque<Delivery>,
    /// Whether units come with their pixels in device memory: None until the compute thread
    /// has started its backend and said.
    on_device: Option<bool>,
    #[cfg(feature = "cuda-aware-mpi")]
    stream_rx: Receiver<Option<Arc<cudarc::driver::CudaStream>>>,
    requested: bool,
    no_more: bool,
    done: bool,
}

struct WriterState {
    frames_tx: Option<Sender<(FrameTicket, super::frame::FrameResult)>>,
    done_rx: Receiver<(usize, Result<(), String>, Duration)>,
    assemblies: HashMap<usize, Assembly>,
    early: HashMap<usize, Vec<UnitOutput>>,
    writing: usize,
    computes_left: usize,
    readers_left: usize,
    done: bool,
}

/// A computed unit to its frame's assembly (or kept until the frame's ticket arrives).
fn take_output(writer: Option<&mut WriterState>, out: UnitOutput) -> Result<()> {
    let w = writer.context("a unit output sent to a rank that does not write")?;
    match w.assemblies.get_mut(&out.job) {
        Some(a) => a.add(out).map_err(anyhow::Error::msg)?,
        None => w.early.entry(out.job).or_default().push(out),
    }
    Ok(())
}

/// One rank's event loop.
fn run_rank(
    comm: &mut dyn Comm,
    layout: &Layout,
    opts: &RunOptions,
    stop: &StopSignal,
) -> Result<Option<RunReport>> {
    let start = Instant::now();
    let rank = comm.rank();
    let node = layout.node_of(rank);
    let roles = layout.roles(rank);
    let hb = Arc::new(Heartbeat {
        start,
        last_ms: AtomicU64::new(0),
        waiting: Mutex::new(String::new()),
    });
    start_watchdog(hb.clone(), rank, roles.name(), opts.watchdog_s, 3);
    info!(
        "rank {rank}: {} on node {node}, pid {}",
        roles.name(),
        std::process::id()
    );
    if rank == 0 {
        let nranks: usize = layout.nodes.iter().map(Vec::len).sum();
        info!(
            "{} frames listed ({} already complete, skipped) on {} node(s), {} rank(s): \
             {} reader(s), {} writer(s), {} compute rank(s) x {} threads",
            opts.jobs.len(),
            opts.skipped.len(),
            layout.nodes.len(),
            nranks,
            layout.readers.iter().map(Vec::len).sum::<usize>(),
            layout.writers.iter().map(Vec::len).sum::<usize>(),
            layout.computes.iter().map(Vec::len).sum::<usize>(),
            opts.threads
        );
    }
    let mut times = RoleTimes {
        rank,
        node,
        role: roles.name(),
        ..Default::default()
    };
    let mut summary = RankSummary::default();

    // Coordinator: the frames still to hand out.
    let mut todo: VecDeque<usize> = (0..opts.jobs.len())
        .filter(|j| !opts.skipped.contains(j))
        .collect();
    let nranks: usize = layout.nodes.iter().map(Vec::len).sum();
    let mut summaries: Vec<RankSummary> = Vec::new();

    let mut reader = roles.reader.then(|| {
        let (jobs_tx, jobs_rx) = unbounded::<usize>();
        let (done_tx, done_rx) = unbounded::<ReadDone>();
        let o = opts.clone();
        std::thread::Builder::new()
            .name("reader".into())
            .spawn(move || {
                for job in jobs_rx {
                    let t0 = Instant::now();
                    let j = &o.jobs[job];
                    let res = prepare_frame(&o.cfg, &j.psf, &j.image, false, false)
                        .map_err(|e| format!("{e:#}"))
                        .and_then(|prep| {
                            unit::cut(&prep, job, o.unit_bundles, j.output.clone(), o.overwrite)
                        });
                    if done_tx.send((job, res, t0.elapsed())).is_err() {
                        break;
                    }
                }
            })
            .expect("starting the reader thread");
        ReaderState {
            jobs_tx: Some(jobs_tx),
            done_rx,
            requested: false,
            exhausted: false,
            reading: 0,
            queue: VecDeque::new(),
            waiting: VecDeque::new(),
            computes: layout.computes_of(rank),
            finished: Vec::new(),
            done: false,
            #[cfg(feature = "cuda-aware-mpi")]
            device_ranks: Default::default(),
        }
    });
    let mut compute = roles.compute.then(|| {
        let (units_tx, units_rx) = unbounded::<Delivery>();
        let (done_tx, done_rx) = unbounded::<UnitDone>();
        #[cfg(feature = "cuda-aware-mpi")]
        let (stream_tx, stream_rx) = crossbeam_channel::bounded(1);
        let threads = opts.threads;
        let backend_name = opts.backend.clone();
        let ranks_per_gpu = opts.ranks_per_gpu;
        let compute_index = layout.computes[node]
            .iter()
            .position(|&c| c == rank)
            .expect("a compute rank");
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || {
                let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
                    Ok(p) => p,
                    Err(e) => {
                        error!("starting {threads} compute threads: {e}");
                        return;
                    }
                };
                let mut engine = match crate::extract::gpu::device::engine_for(
                    &backend_name,
                    compute_index,
                    ranks_per_gpu,
                ) {
                    Ok(b) => b,
                    Err(e) => {
                        error!("compute rank {rank}: {e}");
                        return;
                    }
                };
                // A GPU rank of the cuda-aware-mpi build takes its units' pixels in device
                // memory, received on a stream of their own.
                #[cfg(feature = "cuda-aware-mpi")]
                {
                    use crate::extract::gpu::device::Engine;
                    let stream = match &engine {
                        Engine::Gpu(g) => match g.gpu().ctx.new_stream() {
                            Ok(s) => Some(s),
                            Err(e) => {
                                warn!(
                                    "compute rank {rank}: no stream for MPI receives ({e:?}); \
                                     units come through host memory"
                                );
                                None
                            }
                        },
                        Engine::Cpu(_) => None,
                    };
                    let _ = stream_tx.send(stream);
                }
                for (u, writer, landed) in units_rx {
                    let t0 = Instant::now();
                    #[cfg(feature = "cuda-aware-mpi")]
                    let (result, kept, on_device, downloaded) = {
                        use crate::extract::gpu::device::Engine;
                        match (landed, &mut engine) {
                            (Some(l), Engine::Gpu(g)) => {
                                let before = g.pixel_downloads();
                                let (r, kept) =
                                    pool.install(|| super::device_path::compute(&u, l, g));
                                (r, kept, true, g.pixel_downloads() > before)
                            }
                            (Some(_), Engine::Cpu(_)) => (
                                Err("pixels in device memory sent to a CPU compute rank".into()),
                                None,
                                false,
                                false,
                            ),
                            (None, e) => {
                                let r = pool.install(|| unit::compute(&u, e.backend()));
                                (r, None, false, false)
                            }
                        }
                    };
                    #[cfg(not(feature = "cuda-aware-mpi"))]
                    let (result, kept, on_device, downloaded) = {
                        let () = landed;
                        let r = pool.install(|| unit::compute(&u, engine.backend()));
                        (r, (), false, false)
                    };
                    let out = UnitOutput {
                        job: u.job,
                        unit: u.unit,
                        result,
                    };
                    let done = UnitDone {
                        out,
                        writer,
                        took: t0.elapsed(),
                        kept,
                        on_device,
                        downloaded,
                    };
                    if done_tx.send(done).is_err() {
                        break;
                    }
                }
            })
            .expect("starting the compute thread");
        ComputeState {
            reader: layout.reader_of(rank),
            units_tx: Some(units_tx),
            done_rx,
            busy: false,
            pending: VecDeque::new(),
            on_device: if cfg!(feature = "cuda-aware-mpi") {
                None
            } else {
                Some(false)
            },
            #[cfg(feature = "cuda-aware-mpi")]
            stream_rx,
            requested: false,
            no_more: false,
            done: false,
        }
    });
    let mut writer = roles.writer.then(|| {
        let (frames_tx, frames_rx) = unbounded::<(FrameTicket, super::frame::FrameResult)>();
        let (done_tx, done_rx) = unbounded::<(usize, Result<(), String>, Duration)>();
        std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || {
                for (ticket, res) in frames_rx {
                    let t0 = Instant::now();
                    let r = write_frame_file(&ticket, &res);
                    if done_tx.send((ticket.job, r, t0.elapsed())).is_err() {
                        break;
                    }
                }
            })
            .expect("starting the writer thread");
        WriterState {
            frames_tx: Some(frames_tx),
            done_rx,
            assemblies: HashMap::new(),
            early: HashMap::new(),
            writing: 0,
            computes_left: layout.computes[node].len(),
            readers_left: layout.readers[node].len(),
            done: false,
        }
    });

    let mut summary_sent = false;
    let mut idle_since: Option<Instant> = None;
    let mut written_count = 0usize;
    loop {
        let level = stop.level();
        let mut moved = false;

        // Messages.
        while let Some((from, msg)) = comm.try_recv().map_err(anyhow::Error::msg)? {
            moved = true;
            let t0 = Instant::now();
            match msg {
                Msg::ReqFrame => {
                    let next = if level > 0 { None } else { todo.pop_front() };
                    times.bytes_sent += comm
                        .send(from, Msg::Frame(next))
                        .map_err(anyhow::Error::msg)?;
                }
                Msg::Frame(job) => {
                    let r = reader
                        .as_mut()
                        .context("a frame sent to a rank that does not read")?;
                    r.requested = false;
                    match job {
                        Some(j) => {
                            r.reading += 1;
                            if let Some(tx) = &r.jobs_tx {
                                let _ = tx.send(j);
                            }
                        }
                        None => r.exhausted = true,
                    }
                }
                Msg::ReqWork => {
                    let r = reader
                        .as_mut()
                        .context("a work request sent to a rank that does not read")?;
                    r.waiting.push_back(from);
                }
                #[cfg(feature = "cuda-aware-mpi")]
                Msg::ReqWorkParts => {
                    let r = reader
                        .as_mut()
                        .context("a work request sent to a rank that does not read")?;
                    r.waiting.push_back(from);
                    r.device_ranks.insert(from);
                }
                Msg::Work(u, w) => {
                    let c = compute
                        .as_mut()
                        .context("work sent to a rank that does not compute")?;
                    c.requested = false;
                    c.pending.push_back((*u, w, Landed::default()));
                }
                #[cfg(feature = "cuda-aware-mpi")]
                Msg::WorkParts(u, w, dims, parts) => {
                    let c = compute
                        .as_mut()
                        .context("work sent to a rank that does not compute")?;
                    c.requested = false;
                    let landed = super::device_path::land(&u, dims, parts)
                        .map_err(|e| anyhow::anyhow!("from rank {from}: {e}"))?;
                    c.pending.push_back((*u, w, Some(landed)));
                }
                Msg::NoWork => {
                    let c = compute
                        .as_mut()
                        .context("no-more-work sent to a rank that does not compute")?;
                    c.requested = false;
                    c.no_more = true;
                }
                Msg::Ticket(t) => {
                    let w = writer
                        .as_mut()
                        .context("a ticket sent to a rank that does not write")?;
                    let job = t.job;
                    let mut a = Assembly::new(*t);
                    for out in w.early.remove(&job).unwrap_or_default() {
                        a.add(out).map_err(anyhow::Error::msg)?;
                    }
                    w.assemblies.insert(job, a);
                }
                Msg::FrameFailed(job, e) => {
                    warn!("frame {} failed: {e}", describe(opts, job));
                    summary.failed.push((job, e));
                }
                Msg::Output(out) => take_output(writer.as_mut(), *out)?,
                #[cfg(feature = "cuda-aware-mpi")]
                Msg::OutputParts(out, shape, parts) => {
                    let out = super::device_path::output_from_parts(*out, shape, parts, from)
                        .map_err(anyhow::Error::msg)?;
                    take_output(writer.as_mut(), out)?;
                }
                Msg::ComputeDone => {
                    let w = writer
                        .as_mut()
                        .context("compute-done sent to a rank that does not write")?;
                    w.computes_left = w.computes_left.saturating_sub(1);
                }
                Msg::ReaderDone => {
                    let w = writer
                        .as_mut()
                        .context("reader-done sent to a rank that does not write")?;
                    w.readers_left = w.readers_left.saturating_sub(1);
                }
                Msg::Summary(s) => {
                    if rank != 0 {
                        bail!("rank {from} sent its summary to rank {rank}, not rank 0");
                    }
                    summaries.push(*s);
                }
            }
            times.transfer_s += t0.elapsed().as_secs_f64();
        }

        // Reader: finished reads, frame requests, handing out units.
        if let Some(r) = reader.as_mut() {
            while let Ok((job, res, took)) = r.done_rx.try_recv() {
                moved = true;
                r.reading -= 1;
                times.read_s += took.as_secs_f64();
                match res {
                    Ok(_) if level > 0 => {
                        info!(
                            "{} read but not started: abandoned (stopping)",
                            describe(opts, job)
                        )
                    }
                    Ok((ticket, units)) => {
                        let bytes: usize = units.iter().map(UnitInput::pixel_bytes).sum();
                        summary.unit_bytes.push((job, bytes as u64));
                        info!(
                            "read {} in {:.2}s: {} units, {:.1} MB of pixels",
                            describe(opts, job),
                            took.as_secs_f64(),
                            units.len(),
                            bytes as f64 / 1e6
                        );
                        r.queue.push_back((Some(ticket), units.into()));
                    }
                    Err(e) => {
                        let w = layout.writer_of(node, job);
                        times.bytes_sent += comm
                            .send(w, Msg::FrameFailed(job, e))
                            .map_err(anyhow::Error::msg)?;
                    }
                }
            }
            if level > 0 {
                // No new frames; frames not yet begun are abandoned, begun ones finish unless
                // told twice.
                r.exhausted = true;
                r.queue.retain(|(t, _)| t.is_none());
                if level > 1 {
                    r.queue.clear();
                }
            }
            let buffered = r.queue.len() + r.reading;
            // prefetch 0, one process: the next frame only once the last one is written.
            let sequential_wait = opts.prefetch == 0
                && (compute
                    .as_ref()
                    .is_some_and(|c| c.busy || !c.pending.is_empty())
                    || writer
                        .as_ref()
                        .is_some_and(|w| w.writing > 0 || !w.assemblies.is_empty()));
            if !r.exhausted && !r.requested && buffered < opts.prefetch.max(1) && !sequential_wait {
                times.bytes_sent += comm.send(0, Msg::ReqFrame).map_err(anyhow::Error::msg)?;
                r.requested = true;
            }
            while let Some(&c) = r.waiting.front() {
                if let Some((ticket, units)) = r.queue.front_mut() {
                    let job = units.front().map(|u| u.job);
                    if let (Some(t), Some(job)) = (ticket.take(), job) {
                        let w = layout.writer_of(node, job);
                        times.bytes_sent += comm
                            .send(w, Msg::Ticket(Box::new(t)))
                            .map_err(anyhow::Error::msg)?;
                    }
                    match units.pop_front() {
                        Some(u) => {
                            let w = layout.writer_of(node, u.job);
                            let t0 = Instant::now();
                            #[cfg(feature = "cuda-aware-mpi")]
                            let msg = if r.device_ranks.contains(&c) {
                                let (bare, dims, parts) = super::device_path::strip_pixels(u);
                                Msg::WorkParts(Box::new(bare), w, dims, parts)
                            } else {
                                Msg::Work(Box::new(u), w)
                            };
                            #[cfg(not(feature = "cuda-aware-mpi"))]
                            let msg = Msg::Work(Box::new(u), w);
                            times.bytes_sent += comm.send(c, msg).map_err(anyhow::Error::msg)?;
                            times.transfer_s += t0.elapsed().as_secs_f64();
                            r.waiting.pop_front();
                            moved = true;
                        }
                        None => {
                            r.queue.pop_front();
                        }
                    }
                } else if r.exhausted && r.reading == 0 && !r.requested {
                    times.bytes_sent += comm.send(c, Msg::NoWork).map_err(anyhow::Error::msg)?;
                    r.finished.push(c);
                    r.waiting.pop_front();
                    moved = true;
                } else {
                    break;
                }
            }
            if !r.done && r.computes.iter().all(|c| r.finished.contains(c)) {
                r.done = true;
                r.jobs_tx = None;
                for &w in &layout.writers[node] {
                    times.bytes_sent +=
                        comm.send(w, Msg::ReaderDone).map_err(anyhow::Error::msg)?;
                }
            }
        }

        // Compute: results out, next unit in, one more requested ahead.
        if let Some(c) = compute.as_mut() {
            while let Ok(done) = c.done_rx.try_recv() {
                moved = true;
                c.busy = false;
                times.compute_s += done.took.as_secs_f64();
                times.units += 1;
                times.device_units += usize::from(done.on_device);
                times.pixel_downloads += usize::from(done.downloaded);
                let t0 = Instant::now();
                #[cfg(feature = "cuda-aware-mpi")]
                let msg = super::device_path::output_msg(done.out, done.kept);
                #[cfg(not(feature = "cuda-aware-mpi"))]
                let msg = {
                    let () = done.kept;
                    Msg::Output(Box::new(done.out))
                };
                times.bytes_sent += comm.send(done.writer, msg).map_err(anyhow::Error::msg)?;
                times.transfer_s += t0.elapsed().as_secs_f64();
            }
            #[cfg(feature = "cuda-aware-mpi")]
            if c.on_device.is_none() {
                match c.stream_rx.try_recv() {
                    Ok(Some(stream)) => c.on_device = Some(comm.receive_pixels_on(stream)),
                    Ok(None) | Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        c.on_device = Some(false)
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => {}
                }
                if c.on_device == Some(true) {
                    info!("rank {rank}: units' pixels and results travel in GPU memory (CUDA-aware MPI)");
                }
            }
            if !c.busy {
                if let Some(job) = c.pending.pop_front() {
                    if let Some(tx) = &c.units_tx {
                        tx.send(job)
                            .map_err(|_| anyhow::anyhow!("the compute thread has stopped"))?;
                        c.busy = true;
                    }
                }
            }
            if let (Some(on_device), false, false, true) =
                (c.on_device, c.no_more, c.requested, c.pending.is_empty())
            {
                #[cfg(feature = "cuda-aware-mpi")]
                let ask = if on_device {
                    Msg::ReqWorkParts
                } else {
                    Msg::ReqWork
                };
                #[cfg(not(feature = "cuda-aware-mpi"))]
                let ask = {
                    let _ = on_device;
                    Msg::ReqWork
                };
                times.bytes_sent += comm.send(c.reader, ask).map_err(anyhow::Error::msg)?;
                c.requested = true;
            }
            if !c.done && c.no_more && !c.busy && c.pending.is_empty() {
                c.done = true;
                c.units_tx = None;
                for &w in &layout.writers[node] {
                    times.bytes_sent +=
                        comm.send(w, Msg::ComputeDone).map_err(anyhow::Error::msg)?;
                }
            }
        }

        // Writer: complete frames to the writer thread, written ones counted.
        if let Some(w) = writer.as_mut() {
            let complete: Vec<usize> = w
                .assemblies
                .iter()
                .filter(|(_, a)| a.complete())
                .map(|(&j, _)| j)
                .collect();
            for job in complete {
                moved = true;
                let a = w.assemblies.remove(&job).expect("listed above");
                let t0 = Instant::now();
                match a.finish() {
                    Ok((ticket, res)) => {
                        if let Some(tx) = &w.frames_tx {
                            let _ = tx.send((ticket, res));
                            w.writing += 1;
                        }
                    }
                    Err(e) => {
                        warn!("frame {} failed: {e}", describe(opts, job));
                        summary.failed.push((job, e));
                    }
                }
                times.write_s += t0.elapsed().as_secs_f64();
            }
            while let Ok((job, res, took)) = w.done_rx.try_recv() {
                moved = true;
                w.writing -= 1;
                times.write_s += took.as_secs_f64();
                match res {
                    Ok(()) => {
                        written_count += 1;
                        info!(
                            "wrote {} ({written_count} written on this rank; {:.1} s since start)",
                            opts.jobs[job].output.display(),
                            start.elapsed().as_secs_f64()
                        );
                        summary.written.push(job);
                    }
                    Err(e) => {
                        warn!("frame {} failed: {e}", describe(opts, job));
                        summary.failed.push((job, e));
                    }
                }
            }
            if !w.done && w.computes_left == 0 && w.readers_left == 0 && w.writing == 0 {
                w.done = true;
                w.frames_tx = None;
                for (job, _) in w.assemblies.drain() {
                    warn!(
                        "frame {} abandoned: the run stopped before all its units came back",
                        describe(opts, job)
                    );
                }
            }
        }

        // The end: this rank's summary to rank 0 once its roles are done.
        let roles_done = reader.as_ref().is_none_or(|r| r.done)
            && compute.as_ref().is_none_or(|c| c.done)
            && writer.as_ref().is_none_or(|w| w.done);
        if roles_done && !summary_sent {
            summary_sent = true;
            let mut s = std::mem::take(&mut summary);
            times.peak_rss_mib = super::report::peak_rss_mib();
            times.received = comm.receive_times();
            s.times = times.clone();
            comm.send(0, Msg::Summary(Box::new(s)))
                .map_err(anyhow::Error::msg)?;
            moved = true;
        }
        let flushed = comm.flush();
        if summary_sent && flushed && (rank != 0 || summaries.len() == nranks) {
            break;
        }

        // Idle: nothing moved and no role's thread is working.
        let working = reader.as_ref().is_some_and(|r| r.reading > 0)
            || compute.as_ref().is_some_and(|c| c.busy)
            || writer.as_ref().is_some_and(|w| w.writing > 0);
        if moved || working {
            if let Some(t) = idle_since.take() {
                times.idle_s += t.elapsed().as_secs_f64();
            }
        } else {
            idle_since.get_or_insert_with(Instant::now);
        }
        if moved {
            hb.beat();
        } else {
            hb.waiting_on(waiting_description(
                &reader,
                &compute,
                &writer,
                rank,
                summaries.len(),
                nranks,
            ));
            if flushed {
                std::thread::sleep(Duration::from_micros(200));
            } else {
                // Sends in flight: a large one to a device buffer travels in fragments that
                // each wait for this rank's next MPI call, so keep calling (flush) instead of
                // sleeping between them.
                std::thread::yield_now();
            }
        }
    }
    if rank != 0 {
        return Ok(None);
    }
    Ok(Some(build_report(opts, layout, summaries, start.elapsed())))
}

fn describe(opts: &RunOptions, job: usize) -> String {
    opts.jobs
        .get(job)
        .map_or_else(|| format!("#{job}"), |j| j.image.display().to_string())
}

fn waiting_description(
    reader: &Option<ReaderState>,
    compute: &Option<ComputeState>,
    writer: &Option<WriterState>,
    rank: usize,
    summaries: usize,
    nranks: usize,
) -> String {
    let mut v = Vec::new();
    if let Some(r) = reader {
        if !r.done {
            v.push(format!(
                "reader: {} frame(s) being read, {} cut, {} compute rank(s) waiting for work{}",
                r.reading,
                r.queue.len(),
                r.waiting.len(),
                if r.requested {
                    ", a frame requested from rank 0"
                } else {
                    ""
                }
            ));
        }
    }
    if let Some(c) = compute {
        if !c.done {
            v.push(format!(
                "compute: {}{}",
                if c.busy { "extracting a unit" } else { "idle" },
                if c.requested {
                    format!(", waiting for work from rank {}", c.reader)
                } else {
                    String::new()
                }
            ));
        }
    }
    if let Some(w) = writer {
        if !w.done {
            v.push(format!(
                "writer: {} frame(s) assembling, {} being written, waiting on {} compute and {} \
                 reader rank(s) to finish",
                w.assemblies.len(),
                w.writing,
                w.computes_left,
                w.readers_left
            ));
        }
    }
    if rank == 0 && summaries < nranks {
        v.push(format!(
            "coordinator: {summaries} of {nranks} rank summaries in"
        ));
    }
    v.join("; ")
}

/// Finalises and writes one assembled frame; the error is one line.
fn write_frame_file(ticket: &FrameTicket, res: &super::frame::FrameResult) -> Result<(), String> {
    check_extracted(res, ticket.npatch).map_err(|e| format!("{e:#}"))?;
    if let Some(dir) = ticket.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    write_outputs(
        res,
        &ticket.grid,
        &ticket.meta,
        &ticket.output,
        None,
        ticket.overwrite,
    )
    .map_err(|e| format!("{e:#}"))
}

fn build_report(
    opts: &RunOptions,
    layout: &Layout,
    summaries: Vec<RankSummary>,
    wall: Duration,
) -> RunReport {
    let mut written = Vec::new();
    let mut failed = Vec::new();
    let mut roles = Vec::new();
    let mut unit_bytes = 0u64;
    let mut bytes_sent = 0u64;
    for s in summaries {
        written.extend(s.written);
        failed.extend(s.failed);
        unit_bytes += s.unit_bytes.iter().map(|(_, b)| b).sum::<u64>();
        bytes_sent += s.times.bytes_sent;
        roles.push(s.times);
    }
    roles.sort_by_key(|r| r.rank);
    failed.sort_by_key(|f| f.0);
    failed.dedup_by_key(|f| f.0);
    let listed = opts.jobs.len();
    let frames = FrameCounts {
        listed,
        written: written.len(),
        skipped: opts.skipped.len(),
        failed: failed.len(),
        abandoned: listed - written.len() - opts.skipped.len() - failed.len(),
    };
    let nodes = layout.nodes.len();
    let wall_s = wall.as_secs_f64();
    let per_frame = |b: u64| {
        if frames.written > 0 {
            b as f64 / frames.written as f64
        } else {
            0.0
        }
    };
    let nranks = layout.nodes.iter().map(Vec::len).sum();
    let bytes_per_frame = if nranks > 1 {
        per_frame(bytes_sent)
    } else {
        per_frame(unit_bytes)
    };
    RunReport {
        version: REPORT_VERSION,
        spextract: env!("CARGO_PKG_VERSION").to_string(),
        label: opts
            .label
            .clone()
            .unwrap_or_else(|| format!("{} x{nodes}", opts.backend)),
        backend: opts.backend.clone(),
        nodes,
        ranks: nranks,
        threads_per_rank: opts.threads,
        wall_s,
        frames,
        frames_per_node_hour: RunReport::compute_rate(frames.written, wall_s, nodes),
        bytes_per_frame,
        interrupted: frames.abandoned > 0,
        roles,
        failures: failed
            .into_iter()
            .map(|(job, error)| FrameFailure {
                image: opts.jobs[job].image.clone(),
                output: opts.jobs[job].output.clone(),
                error,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_give_every_node_each_role() {
        let l = Layout::new(vec![vec![0]], 1, 1);
        assert_eq!(
            l.roles(0),
            Roles {
                reader: true,
                writer: true,
                compute: true
            }
        );
        let l = Layout::new(vec![vec![0, 1], vec![2, 3, 4, 5, 6]], 1, 1);
        assert_eq!(l.readers, vec![vec![0], vec![2]]);
        assert_eq!(l.writers, vec![vec![0], vec![3]]);
        assert_eq!(l.computes, vec![vec![1], vec![4, 5, 6]]);
        assert_eq!(l.reader_of(5), 2);
        assert_eq!(l.computes_of(2), vec![4, 5, 6]);
        // Two readers share the compute ranks in turn; a writer request beyond the ranks is
        // clamped so that one compute rank remains.
        let l = Layout::new(vec![vec![0, 1, 2, 3, 4]], 2, 5);
        assert_eq!(l.readers[0], vec![0, 1]);
        assert_eq!(l.writers[0], vec![2, 3]);
        assert_eq!(l.computes[0], vec![4]);
        assert_eq!(l.writer_of(0, 3), 3);
    }
}
