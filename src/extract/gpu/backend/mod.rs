//! The GPU backend: the stages chained on one device, batch by batch —
//! normal equations (`normal`) → batched Cholesky, solve and covariance blocks (`solve`) →
//! decorrelation (`decorrelate`) → chi2pix and pixmask fraction (`chi2`), and when asked the
//! model image with the pixels' leverage (`model`, from the solve's covariance columns) — with
//! the intermediate results kept on the device and only the outputs downloaded.
//!
//! What stays on the device across batches: the spots, which `evaluate_spots` computes there
//! (`spots`) and hands to the pipeline as geometry under a token (`psf::HeldSpots`), and the
//! work unit's pixels, which `load_pixels` copies once under a token (`extract::PixelLoad`)
//! that each patch's `loaded` names with its window's place; each batch's layout indexes
//! both instead of carrying copies, and refuses a set or a window of another token.
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
//! batch that asks for the decorrelated flux's model image, and so are the patches whose windows
//! leave the CCD (`fallback::device_on_ccd`): the kernels index windows of the pixels on the
//! device, and the CPU masks the pixels off the CCD in a padded copy. Those patches need the spot values
//! on the host, which are then downloaded once per spot set.
//!
//! For the cuda-aware-mpi build the backend can also keep a work unit on the device at both
//! ends: pixels that arrived there by MPI are adopted instead of uploaded ([`GpuBackend::
//! adopt_pixels`], downloaded only when a CPU retry needs them), and the results go into the
//! unit's arrays there ([`GpuBackend::begin_unit`], `unit.cu`) instead of coming back per chunk.
//!
//! The same chain runs on the host through each stage's twin (`twins::backend::twin_chain`, test-only): on machines
//! without a GPU that is what the tests compare with the CPU backend, which checks how the
//! stages fit together (layouts, offsets, which blocks belong to which fibers) end to end.
//!
//! Here: [`GpuBackend`], its state and the [`Backend`] impl. The rest, one concern a file:
//! `chain` (one chunk's stages queued on a lane, and collected), `lanes` (the streams and
//! their pinned buffers), `schedule` (chunks over the lanes, halved out of memory), `clock`
//! (device time per stage), `assemble` (the chain's outputs as results), `host` (host copies
//! for the CPU's retries), `unit_mode` (the unit kept on the device). Imports the stages
//! (`spots`, `normal`, `solve`, `decorrelate`, `chi2`, `model`, `unit`), `device`, `extract`'s types
//! and fallback, and `psf`; nothing above `extract`.

// Those the tests (`twins::backend`) reach into are visible to the rest of `gpu`.
pub(super) mod assemble;
mod chain;
mod clock;
pub(super) mod host;
mod lanes;
pub(super) mod schedule;
mod unit_mode;

use ndarray::ArrayView2;

use self::clock::{Marks, StageClock};
use self::host::HostPixels;
use self::lanes::Lane;
use super::decorrelate::{self as decor, EigenRoute};
use super::device::Gpu;
use super::normal::{self, DevicePixels, ResidentSpots};
use super::solve;
use super::spots::{self as gspots, DeviceSpots, SpotsKernel};
use super::unit::{self, DeviceUnit};
use super::{chi2, GpuError};
use crate::extract::{
    fallback, Backend, ExtractError, ExtractOptions, ModelFlux, PatchInput, PatchResult, PixelLoad,
};
use crate::psf::{Psf, SpotSet};

pub(crate) use self::assemble::blocks_of;

/// The stages every batch runs, in the order the backend runs them (those `bench`'s cost
/// model counts); its measured times are keyed by these names.
pub const STAGES: [&str; 7] = [
    "h2d",
    "spots",
    "normal",
    "solve",
    "decorrelate",
    "chi2",
    "d2h",
];

/// The stages only a batch that asks for the model image runs, which the clock times after
/// [`STAGES`]: the leverage's columns of `C` after the solve, the image and the leverage after
/// chi2.
pub const MODEL_STAGES: [&str; 2] = ["columns", "model"];

/// A spot set evaluated on the device, and its values on the host once the CPU needed them.
struct ResidentSet {
    key: ResidentSpots,
    device: DeviceSpots,
    host: Option<SpotSet>,
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
    /// Whether `pixels` were adopted (the patches' host views of them are stand-ins, never
    /// read).
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

    /// Refuses a patch whose window is in another load than the one here, or, with adopted
    /// pixels, one that names no load (its views are stand-ins).
    fn check_load(&self, inp: &PatchInput<'_>) -> Result<(), GpuError> {
        let held = self.pixels.as_ref().map(|p| p.held);
        match normal::place_in(held, inp)? {
            None if self.adopted => Err(GpuError::Kernel(format!(
                "patch at fiber {}, bin {}: its window is not in the pixels adopted from MPI",
                inp.patch.ispec, inp.patch.iwave
            ))),
            _ => Ok(()),
        }
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
            self.check_load(inp).map_err(|e| self.error(e))?;
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // The device computes the deconvolved flux's model image (and the leverage), not the
        // decorrelated one's (`model`), and a unit kept on the device takes no model image.
        let on_device = match opts.model_image {
            None => true,
            Some(ModelFlux::Deconvolved) => self.unit.is_none(),
            Some(ModelFlux::Decorrelated) => false,
        };
        let results = if !on_device {
            self.cpu_batch(batch, opts, None)?
        } else {
            let done = fallback::device_on_ccd(batch, |on| self.device_batch(on, opts))
                .map_err(|e| self.error(e))?;
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
                key: ResidentSpots {
                    held: device.held(),
                    len: device.values().len(),
                },
                device,
                host: None,
            })
        };
        let res = run(self).map_err(|e| self.error(e))?;
        self.resident = Some(res);
        Ok(())
    }

    fn spots_reusable(&self) -> bool {
        // The values stay on the device, for the batches up to the next evaluation only.
        false
    }

    fn load_pixels(
        &mut self,
        pix: ArrayView2<'_, f64>,
        ivar: ArrayView2<'_, f64>,
    ) -> Result<PixelLoad, ExtractError> {
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
        Ok(self
            .pixels
            .as_ref()
            .map_or(PixelLoad::Host, |p| PixelLoad::Held(p.held)))
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
