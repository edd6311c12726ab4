//! The GPU backend: the stages chained on one device, batch by batch —
//! normal equations (`normal`) → batched Cholesky, solve and covariance blocks (`solve`) →
//! decorrelation (`decorrelate`) → chi2pix and pixmask fraction (`chi2`) — with the
//! intermediate results kept on the device and only the per-bin outputs downloaded.
//!
//! What stays on the device across batches: the spots, which `evaluate_spots` computes there
//! (`spots`) and hands to the pipeline as geometry only, and the work unit's pixels, which
//! `load_pixels` copies once; each batch's layout indexes both instead of carrying copies.
//! A batch runs in chunks of about two bundles that alternate between two streams ("lanes"),
//! each with its own cuBLAS/cuSOLVER handles and page-locked result buffers: a chunk is queued
//! whole, without waiting on the host between stages (the decorrelation runs on every block,
//! and the blocks of a patch whose factorisation failed are dropped by its potrf info when
//! the results come back), and while it runs the host prepares the next chunk on the other
//! lane, whose kernels then overlap the first one's copies back.
//!
//! Patches the GPU cannot finish (a factorisation that fails, a block whose eigenvalues are not
//! positive, a non-finite output) are extracted again by the CPU backend, which retries them
//! with regularisation exactly as it would its own: the semantics stay the CPU's. So does a
//! batch that asks for the model image (not ported yet). Those patches need the spot values
//! on the host, which are then downloaded once per spot set.
//!
//! For the cuda-aware-mpi build the backend can also keep a work unit on the device at both
//! ends: pixels that arrived there by MPI are adopted instead of uploaded ([`GpuBackend::
//! adopt_pixels`], downloaded only when a CPU retry needs them), and the results go into the
//! unit's arrays there ([`GpuBackend::begin_unit`], `unit.cu`) instead of coming back per chunk.
//!
//! The same chain runs on the host through each stage's twin ([`twin_chain`]): on machines
//! without a GPU that is what the tests compare with the CPU backend, which checks how the
//! stages fit together (layouts, offsets, which blocks belong to which fibers) end to end.

use std::collections::VecDeque;
use std::ops::Range;

use cudarc::driver::{
    sys::CUevent_flags, CudaEvent, CudaSlice, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use ndarray::{Array2, ArrayView2};

use super::decorrelate::{
    self as decor, Block, DecorrLayout, EigenRoute, HostDecorr, Status, MAX_SWEEPS,
};
use super::device::Gpu;
use super::normal::{
    self, BatchLayout, DevicePixels, OnDevice, Resident, ResidentPixels, ResidentSpots,
};
use super::solve::{self, PatchShape, Solver};
use super::spots::{self as gspots, DeviceSpots, SpotsKernel};
use super::unit::{self, DeviceUnit, UnitShape};
use super::{chi2, GpuError};
use crate::extract::fallback::complete_on_cpu;
use crate::extract::DIAG_EPSILON;
use crate::extract::{Backend, ExtractError, ExtractOptions, PatchInfo, PatchInput, PatchResult};
use crate::psf::{Psf, SpotSet};

/// The stages, in the order the backend runs them; its measured times are keyed by these
/// names.
pub const STAGES: [&str; 7] = [
    "h2d",
    "spots",
    "normal",
    "solve",
    "decorrelate",
    "chi2",
    "d2h",
];

/// The per-patch outputs of a chain, wherever it ran.
pub(super) struct ChainOutputs {
    /// potrf's info per patch (0: factored).
    pub(super) info: Vec<i32>,
    pub(super) blocks: Vec<(usize, usize)>,
    pub(super) dec: Option<HostDecorr>,
    pub(super) c2: chi2::HostChi2,
    pub(super) dims: chi2::Chi2Layout,
    /// When the numbers went into the unit's arrays on the device: each block's decorrelation
    /// status, all that comes back (`dec` and `c2` are then empty).
    pub(super) on_device: Option<Vec<i32>>,
}

/// The decorrelation blocks of the patches whose factorisation succeeded: `(patch, core
/// fiber)` of each, and their layout over the solve stage's buffers.
pub(crate) fn blocks_of(
    batch: &[PatchInput<'_>],
    sol_info: &[i32],
    nmax: usize,
    ncore_max: usize,
    nw: usize,
    ndiag: usize,
) -> (Vec<(usize, usize)>, Vec<Block>) {
    let mut ids = Vec::new();
    let mut blocks = Vec::new();
    for (b, inp) in batch.iter().enumerate() {
        if sol_info[b] != 0 {
            continue;
        }
        let p = &inp.patch;
        for c in 0..p.nspec {
            // Block (b, c) of the solve stage: column-major nw × nw at this offset.
            let cov_off = (b * ncore_max + c) * nw * nw;
            blocks.push(Block::for_patch(p, ndiag, c, cov_off, nw, b * nmax));
            ids.push((b, c));
        }
    }
    (ids, blocks)
}

/// Per patch, the result the chain produced, or None where the CPU must take over.
pub(super) fn assemble(
    batch: &[PatchInput<'_>],
    opts: &ExtractOptions,
    out: &ChainOutputs,
) -> Vec<Option<PatchResult>> {
    let mut results: Vec<Option<PatchResult>> = batch
        .iter()
        .enumerate()
        .map(|(b, inp)| (out.info[b] == 0).then(|| PatchResult::empty(&inp.patch, opts.ndiag)))
        .collect();
    if let Some(status) = &out.on_device {
        for r in results.iter_mut().flatten() {
            *r = PatchResult::on_device(PatchInfo::default(), None);
        }
        for (k, &(b, _)) in out.blocks.iter().enumerate() {
            if status[k] != Status::Ok.code() {
                results[b] = None;
            }
        }
        return results;
    }
    let nd2 = 2 * opts.ndiag + 1;
    if let Some(dec) = &out.dec {
        for (k, &(b, c)) in out.blocks.iter().enumerate() {
            let Some(res) = results[b].as_mut() else {
                continue;
            };
            if dec.status(k) != Some(Status::Ok) {
                tracing::debug!(
                    "patch {b} fiber {c}: decorrelation status {:?}",
                    dec.status(k)
                );
                results[b] = None;
                continue;
            }
            for j in 0..batch[b].patch.nwave_keep {
                res.flux[[c, j]] = dec.flux(k, j);
                res.fluxivar[[c, j]] = dec.fluxivar(k, j);
                for d in 0..nd2 {
                    res.resolution[[c, d, j]] = dec.resolution(k, d, j);
                }
                res.chi2pix[[c, j]] = out.c2.chi2pix[out.dims.slot(b, c, j)];
                res.pixmask_fraction[[c, j]] = out.c2.pixmask[out.dims.slot(b, c, j)];
            }
        }
    }
    results
}

/// `batch` with spot values on the host for the CPU: patches whose set is the resident one
/// (values on the device) get its host copy, which the caller has downloaded.
///
/// With `pixels` (the adopted pixels' identity and their host copy), the windows are taken
/// from that copy: the batch's own views then only stand for the device's pixels.
pub(super) fn with_host_spots<'c>(
    batch: &'c [PatchInput<'_>],
    resident: Option<(&'c ResidentSpots, &'c SpotSet)>,
    pixels: Option<&'c HostPixels>,
) -> Result<Vec<PatchInput<'c>>, GpuError> {
    batch
        .iter()
        .map(|inp| {
            let spots: &'c SpotSet = if !inp.spots.values.is_empty() {
                inp.spots
            } else {
                match resident {
                    Some((key, host)) if key.holds(inp.spots) && host.grid == inp.spots.grid => {
                        host
                    }
                    _ => {
                        return Err(GpuError::Kernel(
                            "a spot set without values is not the one on the device".into(),
                        ))
                    }
                }
            };
            let (pix, ivar) = match pixels {
                Some(h) => h.window_of(inp)?,
                // PatchInput is invariant in its lifetime: rebuild it with views of this borrow.
                None => (inp.pix.view(), inp.ivar.view()),
            };
            Ok(PatchInput {
                patch: inp.patch,
                window: inp.window,
                pix,
                ivar,
                spots,
            })
        })
        .collect()
}

/// The host copy of adopted pixels, downloaded when the CPU first needs them.
pub(super) struct HostPixels {
    key: ResidentPixels,
    pix: Array2<f64>,
    ivar: Array2<f64>,
}

impl HostPixels {
    /// `inp`'s window in the copy: its views stand for the adopted pixels, at the same offset.
    fn window_of(
        &self,
        inp: &PatchInput<'_>,
    ) -> Result<(ArrayView2<'_, f64>, ArrayView2<'_, f64>), GpuError> {
        let (ny, nx) = inp.pix.dim();
        let off = self.key.offset_of(inp).ok_or_else(|| {
            GpuError::Kernel(format!(
                "patch at fiber {}, bin {}: its window is not in the pixels adopted from MPI",
                inp.patch.ispec, inp.patch.iwave
            ))
        })?;
        let (r, c) = (off / self.key.ld(), off % self.key.ld());
        let cut = ndarray::s![r..r + ny, c..c + nx];
        Ok((self.pix.slice(cut), self.ivar.slice(cut)))
    }
}

/// Device time per stage, from events recorded on a stream between the stages. A stage's
/// time is its stream's time between its mark and the previous one. With two lanes in flight
/// their stages overlap, so the sum over stages can exceed the GPU's wall time.
struct StageClock {
    totals: [f64; STAGES.len()],
}

/// Events recorded on one stream: (the stage that ends there, the event).
type Marks = Vec<(&'static str, CudaEvent)>;

impl StageClock {
    fn new() -> StageClock {
        StageClock {
            totals: [0.0; STAGES.len()],
        }
    }

    /// Records the end of `stage` (or, for "start", the beginning of a run of stages).
    fn mark(marks: &mut Marks, gpu: &Gpu, stage: &'static str) -> Result<(), GpuError> {
        let ev = gpu
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| GpuError::driver("recording an event", e))?;
        marks.push((stage, ev));
        Ok(())
    }

    /// Adds the marked intervals to the totals (waits for the last mark).
    fn settle(&mut self, marks: Marks) -> Result<(), GpuError> {
        for w in marks.windows(2) {
            let ms = w[0]
                .1
                .elapsed_ms(&w[1].1)
                .map_err(|e| GpuError::driver("reading an event", e))?;
            if let Some(i) = STAGES.iter().position(|s| *s == w[1].0) {
                self.totals[i] += f64::from(ms) / 1e3;
            }
        }
        Ok(())
    }

    fn take(&mut self) -> Vec<(&'static str, f64)> {
        let out = STAGES.iter().copied().zip(self.totals).collect();
        self.totals = [0.0; STAGES.len()];
        out
    }
}

/// A spot set evaluated on the device, and its values on the host once the CPU needed them.
struct ResidentSet {
    key: ResidentSpots,
    device: DeviceSpots,
    host: Option<SpotSet>,
}

/// Page-locked host memory that a lane's results are copied into: a copy into pageable memory
/// would hold the host until the stream reached it, and the host must be free to prepare the
/// next chunk meanwhile. Not write-combined: the host reads it. Grown as chunks need, and
/// reused chunk after chunk (the lane's previous chunk is collected before the next is queued).
///
/// The copy goes into the prefix the source fills, as a plain slice: cudarc copies the whole
/// destination's length (`size_of_val(dst)`), so a copy into the whole, larger buffer would read
/// past the end of the device buffer. A plain slice carries no event, so the copy is waited for
/// by synchronising the lane's stream before [`Pinned::read`] (`GpuBackend::collect`).
struct Pinned<T: DeviceRepr> {
    buf: Option<PinnedHostSlice<T>>,
}

impl<T: DeviceRepr + ValidAsZeroBits + Copy> Pinned<T> {
    fn new() -> Pinned<T> {
        Pinned { buf: None }
    }

    /// Queues the copy of `src` into the buffer on `gpu`'s stream.
    fn download(&mut self, gpu: &Gpu, src: &CudaSlice<T>) -> Result<(), GpuError> {
        let cuda = |e: cudarc::driver::DriverError| GpuError::driver("results", e);
        if self.buf.as_ref().is_none_or(|b| b.len() < src.len()) {
            // Freed first (after its last copy: the drop waits for it), then a quarter more
            // than asked, so that chunks of slightly different sizes do not reallocate.
            self.buf = None;
            let len = src.len() + src.len() / 4;
            // SAFETY: the memory is uninitialised; `read` only returns the prefix a copy into it
            // has written (the `src.len()` elements of the copy below, waited for there).
            let buf = unsafe { gpu.ctx.alloc_pinned_with_flags::<T>(len, 0) }.map_err(cuda)?;
            self.buf = Some(buf);
        }
        let buf = self.buf.as_mut().expect("allocated above");
        let dst = &mut buf.as_mut_slice().map_err(cuda)?[..src.len()];
        gpu.stream.memcpy_dtoh(src, dst).map_err(cuda)
    }

    /// The first `len` elements; the copy into them must have been waited for (the lane's
    /// stream synchronised).
    fn read(&self, len: usize) -> Result<Vec<T>, GpuError> {
        let buf = self
            .buf
            .as_ref()
            .filter(|b| b.len() >= len)
            .ok_or_else(|| GpuError::Kernel(format!("results: {len} values were not copied")))?;
        let all = buf
            .as_slice()
            .map_err(|e| GpuError::driver("waiting for results", e))?;
        Ok(all[..len].to_vec())
    }
}

/// One of the two streams that chunks of a batch alternate on, with its own cuBLAS/cuSOLVER
/// handles and the pinned buffers its results land in.
struct Lane {
    gpu: Gpu,
    solver: Solver,
    info: Pinned<i32>,
    potrs: Pinned<i32>,
    status: Pinned<i32>,
    flux: Pinned<f64>,
    fluxivar: Pinned<f64>,
    resolution: Pinned<f64>,
    chi2pix: Pinned<f64>,
    pixmask: Pinned<f64>,
}

impl Lane {
    fn new(gpu: &Gpu) -> Result<Lane, GpuError> {
        let gpu = gpu.on_new_stream()?.with_staging();
        Ok(Lane {
            solver: Solver::new(&gpu)?,
            gpu,
            info: Pinned::new(),
            potrs: Pinned::new(),
            status: Pinned::new(),
            flux: Pinned::new(),
            fluxivar: Pinned::new(),
            resolution: Pinned::new(),
            chi2pix: Pinned::new(),
            pixmask: Pinned::new(),
        })
    }
}

/// A chunk queued on a lane: where its results will be and how to read them.
struct Queued {
    lane: usize,
    range: Range<usize>,
    blocks: Vec<(usize, usize)>,
    dims: chi2::Chi2Layout,
    npatch: usize,
    nblock: usize,
    ncol: usize,
    nd2: usize,
    marks: Marks,
    /// The numbers went into the unit's arrays: only the statuses come back.
    on_device: bool,
}

/// Patches per chunk: two bundles at the real sizes, enough to fill an H100 in every stage
/// (normal_dense launches nmax blocks a patch, the decorrelation five), while a batch of
/// several chunks lets one lane's transfers and the host's preparation of the next chunk
/// overlap the other lane's kernels.
pub(super) const CHUNK_PATCHES: usize = 470;

/// `0..n` in nearly equal ranges of at most `size`.
pub(super) fn chunk_ranges(n: usize, size: usize) -> VecDeque<Range<usize>> {
    let k = n.div_ceil(size.max(1)).max(1);
    let per = n.div_ceil(k);
    (0..k)
        .map(|i| i * per..((i + 1) * per).min(n))
        .filter(|r| !r.is_empty())
        .collect()
}

/// The GPU backend on one device.
pub struct GpuBackend {
    /// The device on the stream of the spots and the unit's pixels.
    pub(super) gpu: Gpu,
    spots: SpotsKernel,
    normal: normal::Kernels,
    decor: decor::Kernels,
    chi2: chi2::Kernels,
    lanes: Vec<Lane>,
    /// The unit's pixels and the batch's spots, which the lanes' chunks read. Replaced only
    /// between batches, when every chunk that read them has been collected (its results
    /// waited for), so that no lane still reads them when they are freed.
    pixels: Option<DevicePixels>,
    resident: Option<ResidentSet>,
    clock: StageClock,
    /// How the decorrelation gets its eigenpairs.
    eigen: EigenRoute,
    unit_kernels: unit::Kernels,
    /// The unit whose results stay on the device ([`GpuBackend::begin_unit`]).
    unit: Option<DeviceUnit>,
    /// Whether `pixels` were adopted (their host arrays are stand-ins, never read).
    adopted: bool,
    /// Their host copy, once a CPU retry needed it.
    host_pixels: Option<HostPixels>,
    /// Adopted units whose pixels had to be downloaded.
    pixel_downloads: usize,
}

/// Device memory a batch holds per bundle for its whole duration: the bundle's spots (25
/// fibers × ~2400 padded bins × 11×17 doubles ≈ 90 MB), rounded up.
const SPOT_BYTES_PER_BUNDLE: usize = 128 << 20;
/// Device memory set aside beside the spots: the two lanes' chunks in flight (AᵀWA of 470
/// patches of 518 unknowns is 1 GB; its factor's workspace, the covariance blocks and the
/// scratch add about half that) and a unit's pixels (≤ 270 MB for a full CCD).
const WORKING_BYTES: usize = 4 << 30;

impl GpuBackend {
    /// Opens visible device `ordinal` and loads (compiling on first use) every kernel.
    pub fn new(ordinal: usize) -> Result<GpuBackend, GpuError> {
        // Streams of our own from the start, so that every buffer takes part in cudarc's
        // cross-stream ordering (see `Gpu::on_new_stream`).
        let gpu = Gpu::open(ordinal)?.on_new_stream()?;
        gpu.keep_pool_memory()?;
        solve::check_libraries()?;
        let lanes = vec![Lane::new(&gpu)?, Lane::new(&gpu)?];
        Ok(GpuBackend {
            spots: SpotsKernel::load(&gpu)?,
            normal: normal::Kernels::load(&gpu)?,
            decor: decor::Kernels::load(&gpu)?,
            chi2: chi2::Kernels::load(&gpu)?,
            unit_kernels: unit::Kernels::load(&gpu)?,
            unit: None,
            adopted: false,
            host_pixels: None,
            pixel_downloads: 0,
            lanes,
            pixels: None,
            resident: None,
            clock: StageClock::new(),
            eigen: if solve::syev_batched_present() {
                EigenRoute::PREFERRED
            } else {
                tracing::warn!(
                    "cuSOLVER lacks XsyevBatched (CUDA < 12.6?): the decorrelation takes the \
                     Jacobi kernel"
                );
                EigenRoute::Jacobi
            },
            gpu,
        })
    }

    /// The GPU this backend runs on (for buffers that others fill, such as an MPI receive).
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Takes `pixels` (filled elsewhere, e.g. received by CUDA-aware MPI) as the unit's
    /// pixels: the batches whose windows are slices of the host arrays `pixels.key` names read
    /// them there. Those host arrays only stand for the device copy and are never read; a
    /// patch the CPU must retry gets its window from a host copy downloaded once per unit.
    pub fn adopt_pixels(&mut self, pixels: DevicePixels) {
        self.settle_lanes();
        self.pixels = Some(pixels);
        self.adopted = true;
        self.host_pixels = None;
    }

    /// How many adopted units had their pixels downloaded for the CPU.
    pub fn pixel_downloads(&self) -> usize {
        self.pixel_downloads
    }

    /// From now until [`GpuBackend::take_unit`], batches write their results into zeroed unit
    /// arrays of `shape` on the device, and return results marked `on_device` without numbers.
    pub fn begin_unit(&mut self, shape: UnitShape) -> Result<(), ExtractError> {
        self.settle_lanes();
        self.unit = None;
        self.unit = Some(DeviceUnit::zeros(&self.gpu, shape).map_err(|e| self.error(e))?);
        Ok(())
    }

    /// The unit's arrays, complete (every stream that wrote them finished), ending unit mode.
    pub fn take_unit(&mut self) -> Result<Option<DeviceUnit>, ExtractError> {
        self.settle_lanes();
        self.gpu
            .stream
            .synchronize()
            .map_err(|e| self.error(GpuError::driver("finishing the unit", e)))?;
        Ok(self.unit.take())
    }

    /// The decorrelation's eigen route (the tests and `bench` take both).
    pub fn set_eigen_route(&mut self, route: EigenRoute) {
        self.eigen = route;
    }

    /// The device.
    pub fn device(&self) -> &super::device::DeviceInfo {
        &self.gpu.info
    }

    fn error(&self, e: GpuError) -> ExtractError {
        ExtractError::Backend {
            backend: "gpu",
            msg: format!("{} ({}): {e}", self.gpu.info.name, self.gpu.info.ordinal),
        }
    }

    /// Queues the whole chain for `chunk` (patches `range` of the batch) on lane `li`, the
    /// results copied into the lane's pinned buffers; nothing is waited for.
    fn queue(
        &mut self,
        li: usize,
        range: Range<usize>,
        chunk: &[PatchInput<'_>],
        opts: &ExtractOptions,
    ) -> Result<Queued, GpuError> {
        // Everything the host computes comes first, so that the stream runs the stages back
        // to back.
        let resident = Resident {
            pixels: self.pixels.as_ref().map(|p| p.key),
            spots: self.resident.as_ref().map(|r| &r.key),
        };
        let layout = BatchLayout::with_resident(chunk, &resident)?;
        let shapes: Vec<PatchShape> = chunk.iter().map(|i| PatchShape::of(&i.patch)).collect();
        let nmax = layout.nmax;
        let ncore_max = shapes.iter().map(|s| s.ncore).max().unwrap_or(0);
        let nw = shapes.iter().map(|s| s.nwavetot).max().unwrap_or(0);
        // Every block, whether or not its patch factors: see the module docs.
        let factored = vec![0; chunk.len()];
        let (ids, blocks) = blocks_of(chunk, &factored, nmax, ncore_max, nw, opts.ndiag);
        let dl = DecorrLayout::new(&blocks)?;
        let dims = chi2::Chi2Layout::new(chunk, &layout)?;

        let lane = &mut self.lanes[li];
        let gpu = &lane.gpu;
        // The lane's last chunk was collected: its stream is idle and its staging free.
        gpu.restage()?;
        let mut marks = Marks::new();
        StageClock::mark(&mut marks, gpu, "start")?;
        let on_device = OnDevice {
            pixels: self.pixels.as_ref(),
            spots: self.resident.as_ref().map(|r| r.device.values()),
        };
        let up = normal::UploadedLayout::upload(gpu, &layout, on_device)?;
        let buf = up.buffers();
        StageClock::mark(&mut marks, gpu, "h2d")?;
        let mut dense = normal::DenseBatch::alloc(gpu, &layout)?;
        normal::build_into(
            gpu,
            &self.normal,
            &buf,
            opts.regularize,
            DIAG_EPSILON,
            &mut dense,
        )?;
        StageClock::mark(&mut marks, gpu, "normal")?;
        let mut sol = lane.solver.solve(gpu, &mut dense, &shapes)?;
        if (sol.nmax, sol.ncore_max, sol.nw) != (nmax, ncore_max, nw) {
            return Err(GpuError::Kernel(format!(
                "the solve laid out {} × {} blocks of {}, the chain expected {nmax} × \
                 {ncore_max} of {nw}",
                sol.nmax, sol.ncore_max, sol.nw
            )));
        }
        // Freed in stream order, after the solve has read it.
        drop(dense);
        StageClock::mark(&mut marks, gpu, "solve")?;
        let d = match self.eigen {
            EigenRoute::Jacobi => {
                decor::decorrelate(gpu, &self.decor, &dl, &sol.blocks, &sol.x, MAX_SWEEPS)?
            }
            EigenRoute::Syev => decor::decorrelate_by_syev(
                gpu,
                &self.decor,
                &mut lane.solver,
                &dl,
                &mut sol.blocks,
                sol.nw,
                sol.npatch * sol.ncore_max,
                &sol.x,
            )?,
        };
        StageClock::mark(&mut marks, gpu, "decorrelate")?;
        let mut c2 = chi2::Chi2Batch::alloc(gpu, &dims)?;
        chi2::launch(gpu, &self.chi2, &buf, &dims, &sol.x, opts.psferr, &mut c2)?;
        StageClock::mark(&mut marks, gpu, "chi2")?;
        let on_device = match self.unit.as_mut() {
            Some(u) => {
                let place = unit::placement(chunk, &ids, &u.shape)?;
                let outputs = unit::ChunkOutputs {
                    info: &sol.info,
                    dec: &d,
                    chi2: &c2,
                    dims: &dims,
                };
                unit::scatter(gpu, &self.unit_kernels, &place, &outputs, u)?;
                StageClock::mark(&mut marks, gpu, "unit")?;
                true
            }
            None => false,
        };
        lane.info.download(gpu, &sol.info)?;
        lane.potrs.download(gpu, &sol.potrs_info)?;
        lane.status.download(gpu, &d.status)?;
        if !on_device {
            lane.flux.download(gpu, &d.flux)?;
            lane.fluxivar.download(gpu, &d.fluxivar)?;
            lane.resolution.download(gpu, &d.resolution)?;
            lane.chi2pix.download(gpu, &c2.chi2pix)?;
            lane.pixmask.download(gpu, &c2.pixmask)?;
        }
        StageClock::mark(&mut marks, gpu, "d2h")?;
        Ok(Queued {
            lane: li,
            range,
            blocks: ids,
            dims,
            npatch: chunk.len(),
            nblock: d.nblock,
            ncol: d.ncol,
            nd2: d.nd2,
            marks,
            on_device,
        })
        // The device buffers drop here, freed in stream order after the copies.
    }

    /// Waits for a queued chunk and reads its results.
    fn collect(&mut self, q: Queued) -> Result<(Range<usize>, ChainOutputs), GpuError> {
        let lane = &self.lanes[q.lane];
        // The copies into the pinned buffers carry no event of their own (see `Pinned`); the
        // lane holds only this chunk, queued last.
        lane.gpu
            .stream
            .synchronize()
            .map_err(|e| GpuError::driver("waiting for a chunk", e))?;
        let (nb, ncol) = (q.nblock, q.ncol);
        solve::check_potrs_info(lane.potrs.read(1)?[0])?;
        let info = lane.info.read(q.npatch)?;
        if q.on_device {
            let status = lane.status.read(nb)?;
            self.clock.settle(q.marks)?;
            return Ok((
                q.range,
                ChainOutputs {
                    info,
                    blocks: q.blocks,
                    dec: None,
                    c2: chi2::HostChi2 {
                        model: Vec::new(),
                        chi2: Vec::new(),
                        valid: Vec::new(),
                        chi2pix: Vec::new(),
                        pixmask: Vec::new(),
                    },
                    dims: q.dims,
                    on_device: Some(status),
                },
            ));
        }
        let dec = HostDecorr {
            nblock: nb,
            ncol,
            nd2: q.nd2,
            flux: lane.flux.read(nb * ncol)?,
            fluxivar: lane.fluxivar.read(nb * ncol)?,
            resolution: lane.resolution.read(nb * q.nd2 * ncol)?,
            status: lane.status.read(nb)?,
            // Not brought back: the chain does not use them.
            sweeps: Vec::new(),
        };
        let nslot = q.dims.npatch * q.dims.slots();
        let c2 = chi2::HostChi2 {
            model: Vec::new(),
            chi2: Vec::new(),
            valid: Vec::new(),
            chi2pix: lane.chi2pix.read(nslot)?,
            pixmask: lane.pixmask.read(nslot)?,
        };
        self.clock.settle(q.marks)?;
        Ok((
            q.range,
            ChainOutputs {
                info,
                blocks: q.blocks,
                dec: Some(dec),
                c2,
                dims: q.dims,
                on_device: None,
            },
        ))
    }

    /// The batch through the device in chunks that alternate between the lanes ([`schedule`]).
    /// Per patch, the chain's result, or None where the CPU must take over.
    fn device_batch(
        &mut self,
        batch: &[PatchInput<'_>],
        opts: &ExtractOptions,
    ) -> Result<Vec<Option<PatchResult>>, GpuError> {
        let lanes = self.lanes.len();
        let mut run = DeviceChunks {
            backend: self,
            batch,
            opts,
            results: vec![None; batch.len()],
        };
        let scheduled = schedule(&mut run, batch.len(), CHUNK_PATCHES, lanes);
        let results = run.results;
        if let Err(e) = scheduled {
            // A chunk still in flight on the other lane may read the resident pixels and
            // spots, which the next unit frees: let it finish first.
            self.settle_lanes();
            return Err(e);
        }
        Ok(results)
    }

    /// Waits for whatever the lanes still run (after an error left chunks uncollected).
    fn settle_lanes(&self) {
        for lane in &self.lanes {
            if let Err(e) = lane.gpu.stream.synchronize() {
                tracing::warn!("GPU stream after an error: {e:?}");
            }
        }
    }
}

/// What [`schedule`] drives: chunks of a batch queued on lanes and collected.
pub(super) trait Chunks {
    type Queued;
    /// The lane a queued chunk runs on.
    fn lane_of(q: &Self::Queued) -> usize;
    /// Queues patches `range` on `lane` without waiting.
    fn queue(&mut self, lane: usize, range: Range<usize>) -> Result<Self::Queued, GpuError>;
    /// Waits for a queued chunk and takes its results.
    fn collect(&mut self, q: Self::Queued) -> Result<(), GpuError>;
    /// Waits for whatever `lane` still runs: a queue that failed partway may have left work
    /// on it that reads buffers the retry would reuse.
    fn settle(&mut self, lane: usize) -> Result<(), GpuError>;
}

/// Runs patches `0..n` in chunks of at most `chunk`, alternating over `lanes` lanes with at
/// most one chunk in flight per lane: while one lane's chunk runs, the host prepares the next
/// on another. A lane's previous chunk is collected before it takes the next (its buffers
/// and handles are reused). Out of memory, everything in flight is collected (freeing its
/// memory) and the chunk is halved; a single patch that does not fit is an error.
pub(super) fn schedule<C: Chunks>(
    c: &mut C,
    n: usize,
    chunk: usize,
    lanes: usize,
) -> Result<(), GpuError> {
    let lanes = lanes.max(1);
    let mut pending = chunk_ranges(n, chunk);
    let mut flight: VecDeque<C::Queued> = VecDeque::new();
    let mut next = 0usize;
    while let Some(range) = pending.pop_front() {
        let lane = next % lanes;
        if let Some(k) = flight.iter().position(|q| C::lane_of(q) == lane) {
            let q = flight.remove(k).expect("found above");
            c.collect(q)?;
        }
        match c.queue(lane, range.clone()) {
            Ok(q) => {
                flight.push_back(q);
                next += 1;
            }
            Err(GpuError::OutOfMemory { .. }) if range.len() > 1 => {
                c.settle(lane)?;
                while let Some(q) = flight.pop_front() {
                    c.collect(q)?;
                }
                let mid = range.start + range.len() / 2;
                tracing::warn!(
                    "GPU out of memory for {} patches; retrying as {} and {}",
                    range.len(),
                    mid - range.start,
                    range.end - mid
                );
                pending.push_front(mid..range.end);
                pending.push_front(range.start..mid);
            }
            Err(e) => return Err(e),
        }
    }
    while let Some(q) = flight.pop_front() {
        c.collect(q)?;
    }
    Ok(())
}

/// The device's side of [`schedule`]: a batch's chunks through the chain.
struct DeviceChunks<'b, 'i> {
    backend: &'b mut GpuBackend,
    batch: &'b [PatchInput<'i>],
    opts: &'b ExtractOptions,
    results: Vec<Option<PatchResult>>,
}

impl Chunks for DeviceChunks<'_, '_> {
    type Queued = Queued;

    fn lane_of(q: &Queued) -> usize {
        q.lane
    }

    fn queue(&mut self, lane: usize, range: Range<usize>) -> Result<Queued, GpuError> {
        let chunk = &self.batch[range.clone()];
        self.backend.queue(lane, range, chunk, self.opts)
    }

    fn settle(&mut self, lane: usize) -> Result<(), GpuError> {
        self.backend.lanes[lane]
            .gpu
            .stream
            .synchronize()
            .map_err(|e| GpuError::driver(format!("waiting for lane {lane} after an error"), e))
    }

    fn collect(&mut self, q: Queued) -> Result<(), GpuError> {
        let (range, out) = self.backend.collect(q)?;
        let chunk = &self.batch[range.clone()];
        for (r, slot) in assemble(chunk, self.opts, &out).into_iter().zip(range) {
            self.results[slot] = r;
        }
        Ok(())
    }
}

impl Backend for GpuBackend {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn extract_batch(
        &mut self,
        batch: &[PatchInput<'_>],
        opts: &ExtractOptions,
    ) -> Result<Vec<PatchResult>, ExtractError> {
        for inp in batch {
            inp.check()?;
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let results = if opts.model_image {
            // The model image is not ported: the CPU computes such batches whole.
            self.cpu_batch(batch, opts, None)?
        } else {
            let done = self.device_batch(batch, opts).map_err(|e| self.error(e))?;
            self.cpu_batch(batch, opts, Some(done))?
        };
        self.keep_on_device(batch, results)
    }

    fn evaluate_spots(
        &mut self,
        psf: &Psf,
        fibermin: usize,
        nfiber: usize,
        waves: &[f64],
        set: &mut SpotSet,
    ) -> Result<(), ExtractError> {
        self.settle_lanes();
        self.resident = None;
        if nfiber == 0 || waves.is_empty() {
            // Nothing to evaluate, and CUDA refuses zero-byte buffers.
            return Ok(crate::psf::spots::evaluate_into(
                psf, fibermin, nfiber, waves, set,
            )?);
        }
        let inp = gspots::flatten(psf, fibermin, nfiber, waves)?;
        let mut run = |b: &mut GpuBackend| -> Result<ResidentSet, GpuError> {
            let mut marks = Marks::new();
            StageClock::mark(&mut marks, &b.gpu, "start")?;
            let dev = gspots::DeviceInputs::upload(&b.gpu, &inp)?;
            let mut device = DeviceSpots::zeros(&b.gpu, &dev)?;
            b.spots.launch(&b.gpu, &dev, &mut device)?;
            StageClock::mark(&mut marks, &b.gpu, "spots")?;
            *set = device.download_geometry(&b.gpu)?;
            StageClock::mark(&mut marks, &b.gpu, "d2h")?;
            b.clock.settle(marks)?;
            Ok(ResidentSet {
                key: ResidentSpots::of(set),
                device,
                host: None,
            })
        };
        let res = run(self).map_err(|e| self.error(e))?;
        self.resident = Some(res);
        Ok(())
    }

    fn load_pixels(
        &mut self,
        pix: ArrayView2<'_, f64>,
        ivar: ArrayView2<'_, f64>,
    ) -> Result<(), ExtractError> {
        // Adopted pixels stay: `pix` and `ivar` are their stand-ins.
        if self.adopted
            && self.pixels.as_ref().map(|p| p.key) == ResidentPixels::of(pix.view(), ivar.view())
        {
            return Ok(());
        }
        // The previous unit's copy is freed first: two full CCDs need not fit at once. (No lane
        // reads it any more: batches end collected, or settled after an error.)
        self.settle_lanes();
        self.pixels = None;
        self.adopted = false;
        self.host_pixels = None;
        let up = |b: &mut GpuBackend| -> Result<Option<DevicePixels>, GpuError> {
            let mut marks = Marks::new();
            StageClock::mark(&mut marks, &b.gpu, "start")?;
            let p = DevicePixels::upload(&b.gpu, pix, ivar)?;
            StageClock::mark(&mut marks, &b.gpu, "h2d")?;
            b.clock.settle(marks)?;
            Ok(p)
        };
        self.pixels = up(self).map_err(|e| self.error(e))?;
        Ok(())
    }

    fn bundles_per_batch(&self) -> usize {
        // A batch runs in chunks of CHUNK_PATCHES, two in flight, whatever its size; what
        // grows with it is the spot set, evaluated once per batch. A frame has 20 bundles.
        let free = self
            .gpu
            .ctx
            .mem_get_info()
            .map(|(free, _)| free)
            .unwrap_or(0);
        (free.saturating_sub(WORKING_BYTES) / SPOT_BYTES_PER_BUNDLE).clamp(1, 20)
    }

    fn take_stage_times(&mut self) -> Vec<(&'static str, f64)> {
        self.clock.take()
    }
}

impl GpuBackend {
    /// In unit mode, the host results (the CPU's) uploaded over their patches' cells, and every
    /// result marked as on the device; otherwise `results` as they are.
    fn keep_on_device(
        &mut self,
        batch: &[PatchInput<'_>],
        results: Vec<PatchResult>,
    ) -> Result<Vec<PatchResult>, ExtractError> {
        let Some(u) = self.unit.as_mut() else {
            return Ok(results);
        };
        let mut out = Vec::with_capacity(results.len());
        let mut failed = None;
        for (inp, r) in batch.iter().zip(results) {
            if !r.info.on_device {
                if let Err(e) = u.upload_patch(&self.gpu, &inp.patch, &r) {
                    failed = Some(e);
                    break;
                }
            }
            out.push(PatchResult::on_device(r.info, r.model));
        }
        match failed {
            Some(e) => Err(self.error(e)),
            None => Ok(out),
        }
    }

    /// The CPU's results for the patches of `batch` that `done` leaves out (all of them when
    /// `done` is None), with spot values brought to the host as the CPU needs them.
    fn cpu_batch(
        &mut self,
        batch: &[PatchInput<'_>],
        opts: &ExtractOptions,
        done: Option<Vec<Option<PatchResult>>>,
    ) -> Result<Vec<PatchResult>, ExtractError> {
        let done = done.unwrap_or_else(|| vec![None; batch.len()]);
        if done.iter().all(Option::is_some) {
            return complete_on_cpu(batch, opts, done);
        }
        let on_device = batch.iter().find(|i| i.spots.values.is_empty());
        if let (Some(res), Some(inp)) = (self.resident.as_mut(), on_device) {
            if res.host.is_none() {
                match res.device.download(&self.gpu) {
                    Ok(mut host) => {
                        // The kernel numbered fibers from the PSF's row; the pipeline
                        // renumbers its copy to frame fibers.
                        host.grid.fibermin = inp.spots.grid.fibermin;
                        res.host = Some(host);
                    }
                    Err(e) => return Err(self.error(e)),
                }
            }
        }
        let to_download = self
            .pixels
            .as_ref()
            .filter(|_| self.adopted && self.host_pixels.is_none());
        if let Some(p) = to_download {
            let (ny, nx) = (p.key.len() / p.key.ld(), p.key.ld());
            let down = |v: &CudaSlice<f64>| -> Result<Array2<f64>, GpuError> {
                let host = self.gpu.stream.clone_dtoh(v).map_err(|e| {
                    GpuError::driver("downloading the unit's pixels for the CPU", e)
                })?;
                Array2::from_shape_vec((ny, nx), host)
                    .map_err(|e| GpuError::Kernel(format!("the unit's pixels: {e}")))
            };
            let host = down(&p.pix).and_then(|pix| {
                Ok(HostPixels {
                    key: p.key,
                    pix,
                    ivar: down(&p.ivar)?,
                })
            });
            self.host_pixels = Some(host.map_err(|e| self.error(e))?);
            self.pixel_downloads += 1;
        }
        let resident = self
            .resident
            .as_ref()
            .and_then(|r| Some((&r.key, r.host.as_ref()?)));
        let pixels = self.host_pixels.as_ref().filter(|_| self.adopted);
        let hosted = with_host_spots(batch, resident, pixels).map_err(|e| self.error(e))?;
        complete_on_cpu(&hosted, opts, done)
    }
}
