//! The compute role: extracts one unit at a time on its own thread (a rayon pool of `threads`)
//! while the next is already asked for, and sends each result to the unit's writer. In the
//! cuda-aware-mpi build a GPU rank asks for its units' pixels as device parts
//! (`ReqWorkParts`) and sends its results from device memory (`OutputParts`), through
//! `device_path`; it knows which only once its thread has started the backend.
//!
//! With `--ivar-from-model` it keeps the spot sets of its first-pass units for the same units'
//! second pass (`unit::PassSpots`), which the reader hands back to it where it can.
//!
//! Imports `comm`, `unit`, `prepare` (the spot budget), `extract::gpu::device` (the engine)
//! and, in the cuda-aware-mpi build, `device_path`.

use std::collections::VecDeque;
#[cfg(feature = "cuda-aware-mpi")]
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use tracing::error;
#[cfg(feature = "cuda-aware-mpi")]
use tracing::{info, warn};

use super::event_loop::Rank;
use super::RunError;
use crate::pipeline::comm::Msg;
use crate::pipeline::env;
use crate::pipeline::prepare::SPOT_CACHE_BYTES;
use crate::pipeline::unit::{self, ModelPart, PassSpots, UnitInput, UnitOutput, UnitPass};

/// A unit's pixels in device memory, where the cuda-aware-mpi path delivered them there.
#[cfg(feature = "cuda-aware-mpi")]
type Landed = Option<crate::pipeline::device_path::LandedPixels>;
/// A unit's pixels in device memory: never, without the cuda-aware-mpi path.
#[cfg(not(feature = "cuda-aware-mpi"))]
type Landed = ();

/// A unit's results kept in device memory, for the cuda-aware-mpi path to send from there.
#[cfg(feature = "cuda-aware-mpi")]
type Kept = Option<crate::extract::gpu::unit::DeviceUnit>;
#[cfg(not(feature = "cuda-aware-mpi"))]
type Kept = ();

/// A unit for the compute thread: the unit, where its results go, its pixels if on the
/// device.
type Delivery = (UnitInput, usize, Landed);

/// What a finished unit sends.
enum Finished {
    /// Its part of the frame, to the frame's writer.
    Output(Box<UnitOutput>),
    /// Its share of the frame's model (a first pass of `--ivar-from-model`), to its reader.
    Model(Box<ModelPart>),
}

/// A unit the compute thread finished.
struct UnitDone {
    out: Finished,
    /// Where its results go: the frame's writer, or for a first pass the unit's reader.
    to: usize,
    took: Duration,
    kept: Kept,
    /// Its pixels came in device memory.
    on_device: bool,
    /// ... and the CPU needed them, so they were downloaded.
    downloaded: bool,
}

/// A compute rank's state between turns of the loop.
pub(super) struct Compute {
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
    /// No unit is left and the node's writers have been told.
    pub done: bool,
}

impl Compute {
    /// Starts the compute thread of rank `r`.
    pub fn start(r: &Rank) -> Compute {
        let (units_tx, units_rx) = unbounded::<Delivery>();
        let (done_tx, done_rx) = unbounded::<UnitDone>();
        #[cfg(feature = "cuda-aware-mpi")]
        let (stream_tx, stream_rx) = crossbeam_channel::bounded(1);
        let rank = r.rank;
        let threads = r.opts.threads;
        let backend = r.opts.backend;
        let ranks_per_gpu = r.opts.ranks_per_gpu;
        let compute_index = r.layout.computes[r.node]
            .iter()
            .position(|&c| c == rank)
            .expect("a compute rank");
        // The node's compute ranks share what one process keeps for a single frame.
        let spot_budget = SPOT_CACHE_BYTES / r.layout.computes[r.node].len().max(1);
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
                let bind = |visible| env::gpu_ordinal(compute_index, visible, ranks_per_gpu);
                let mut engine = match crate::extract::engine::start(backend, bind) {
                    Ok(b) => b,
                    Err(e) => {
                        error!("compute: {e}");
                        return;
                    }
                };
                // A GPU rank of the cuda-aware-mpi build takes its units' pixels in device
                // memory, received on a stream of their own.
                #[cfg(feature = "cuda-aware-mpi")]
                {
                    use crate::extract::engine::Engine;
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
                let mut spots = PassSpots::new(spot_budget);
                for (u, to, landed) in units_rx {
                    let t0 = Instant::now();
                    #[cfg(feature = "cuda-aware-mpi")]
                    let (result, kept, on_device, downloaded) = {
                        use crate::extract::engine::Engine;
                        match (landed, &mut engine) {
                            (Some(l), Engine::Gpu(g)) => {
                                let before = g.pixel_downloads();
                                let (r, kept) = pool
                                    .install(|| crate::pipeline::device_path::compute(&u, l, g));
                                (r, kept, true, g.pixel_downloads() > before)
                            }
                            (Some(_), Engine::Cpu(_)) => (
                                Err("pixels in device memory sent to a CPU compute rank".into()),
                                None,
                                false,
                                false,
                            ),
                            (None, e) => {
                                let cache = spots.for_unit(&u);
                                let r = pool.install(|| unit::compute(&u, e.backend(), cache));
                                (r.map_err(|e| e.to_string()), None, false, false)
                            }
                        }
                    };
                    #[cfg(not(feature = "cuda-aware-mpi"))]
                    let (result, kept, on_device, downloaded) = {
                        let () = landed;
                        let cache = spots.for_unit(&u);
                        let r = pool.install(|| unit::compute(&u, engine.backend(), cache));
                        (r.map_err(|e| e.to_string()), (), false, false)
                    };
                    spots.settle();
                    let out = match u.pass {
                        UnitPass::Final => Finished::Output(Box::new(UnitOutput {
                            job: u.job,
                            unit: u.unit,
                            result,
                        })),
                        UnitPass::Model => Finished::Model(Box::new(ModelPart::of(&u, result))),
                    };
                    let done = UnitDone {
                        out,
                        to,
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
        Compute {
            reader: r.layout.reader_of(rank),
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
    }

    /// A unit from the reader, its results for rank `to`.
    pub fn on_work(&mut self, u: UnitInput, to: usize) {
        self.requested = false;
        self.pending.push_back((u, to, Landed::default()));
    }

    /// A unit whose pixels came from rank `from` as parts in device memory.
    #[cfg(feature = "cuda-aware-mpi")]
    pub fn on_work_parts(
        &mut self,
        from: usize,
        u: UnitInput,
        to: usize,
        dims: [usize; 2],
        parts: crate::pipeline::comm::Parts,
    ) -> Result<(), RunError> {
        self.requested = false;
        let landed = crate::pipeline::device_path::land(&u, dims, parts)
            .map_err(|error| RunError::Landing { from, error })?;
        self.pending.push_back((u, to, Some(landed)));
        Ok(())
    }

    /// The reader has no more units.
    pub fn on_no_work(&mut self) {
        self.requested = false;
        self.no_more = true;
    }

    /// Whether it holds a unit, extracting or pending.
    pub fn has_units(&self) -> bool {
        self.busy || !self.pending.is_empty()
    }

    /// Whether the compute thread is extracting.
    pub fn working(&self) -> bool {
        self.busy
    }

    /// Results out, the next unit in, one more requested ahead. Returns whether anything
    /// moved.
    pub fn step(&mut self, r: &mut Rank) -> Result<bool, RunError> {
        let mut moved = false;
        while let Ok(done) = self.done_rx.try_recv() {
            moved = true;
            self.busy = false;
            r.times.compute_s += done.took.as_secs_f64();
            r.times.units += 1;
            r.times.device_units += usize::from(done.on_device);
            r.times.pixel_downloads += usize::from(done.downloaded);
            let t0 = Instant::now();
            let msg = match done.out {
                // A first pass's model is made on the host (`device_path::compute`).
                Finished::Model(part) => Msg::ModelPart(part),
                #[cfg(feature = "cuda-aware-mpi")]
                Finished::Output(out) => crate::pipeline::device_path::output_msg(*out, done.kept),
                #[cfg(not(feature = "cuda-aware-mpi"))]
                Finished::Output(out) => {
                    let () = done.kept;
                    Msg::Output(out)
                }
            };
            r.send(done.to, msg)?;
            r.times.transfer_s += t0.elapsed().as_secs_f64();
        }
        #[cfg(feature = "cuda-aware-mpi")]
        if self.on_device.is_none() {
            match self.stream_rx.try_recv() {
                Ok(Some(stream)) => self.on_device = Some(r.comm.receive_pixels_on(stream)),
                Ok(None) | Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.on_device = Some(false)
                }
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            if self.on_device == Some(true) {
                info!(
                    "rank {}: units' pixels and results travel in GPU memory (CUDA-aware MPI)",
                    r.rank
                );
            }
        }
        if !self.busy {
            if let Some(job) = self.pending.pop_front() {
                if let Some(tx) = &self.units_tx {
                    tx.send(job).map_err(|_| RunError::ComputeStopped)?;
                    self.busy = true;
                }
            }
        }
        if let (Some(on_device), false, false, true) = (
            self.on_device,
            self.no_more,
            self.requested,
            self.pending.is_empty(),
        ) {
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
            r.send(self.reader, ask)?;
            self.requested = true;
        }
        if !self.done && self.no_more && !self.busy && self.pending.is_empty() {
            self.done = true;
            self.units_tx = None;
            for &w in &r.layout.writers[r.node] {
                r.send(w, Msg::ComputeDone)?;
            }
        }
        Ok(moved)
    }

    /// What it waits on, for the watchdog; None once done.
    pub fn waiting(&self) -> Option<String> {
        (!self.done).then(|| {
            format!(
                "compute: {}{}",
                if self.busy {
                    "extracting a unit"
                } else {
                    "idle"
                },
                if self.requested {
                    format!(", waiting for work from rank {}", self.reader)
                } else {
                    String::new()
                }
            )
        })
    }
}
