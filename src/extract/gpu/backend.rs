//! The GPU backend: the stages chained on one device, batch by batch —
//! normal equations (`normal`) → batched Cholesky, solve and covariance blocks (`solve`) →
//! decorrelation (`decorrelate`) → chi2pix and pixmask fraction (`chi2`) — with the
//! intermediate results kept on the device and only the per-bin outputs downloaded.
//!
//! What stays on the device across batches: the spots, which `evaluate_spots` computes there
//! (`spots`) and hands to the pipeline as geometry only, and the work unit's pixels, which
//! `load_pixels` copies once; each batch's layout indexes both instead of carrying copies.
//! A batch is queued whole, without waiting on the host between stages: the decorrelation
//! runs on every block, and the blocks of a patch whose factorisation failed are dropped by
//! its potrf info when the results come back.
//!
//! Patches the GPU cannot finish (a factorisation that fails, a block whose eigenvalues are not
//! positive, a non-finite output) are extracted again by the CPU backend, which retries them
//! with regularisation exactly as it would its own: the semantics stay the CPU's. So does a
//! batch that asks for the model image (not ported yet). Those patches need the spot values
//! on the host, which are then downloaded once per spot set.
//!
//! The same chain runs on the host through each stage's twin ([`twin_chain`]): on machines
//! without a GPU that is what the tests compare with the CPU backend, which checks how the
//! stages fit together (layouts, offsets, which blocks belong to which fibers) end to end.

use cudarc::driver::{sys::CUevent_flags, CudaEvent};
use ndarray::ArrayView2;

use super::cost::STAGES;
use super::decorrelate::{self as decor, Block, DecorrLayout, HostDecorr, Status, MAX_SWEEPS};
use super::device::Gpu;
use super::normal::{self, BatchLayout, DevicePixels, OnDevice, Resident, ResidentSpots};
use super::solve::{self, PatchShape, Solver};
use super::spots::{self as gspots, DeviceSpots, SpotsKernel};
use super::{chi2, GpuError};
use crate::extract::cpu::{self, CpuBackend, DIAG_EPSILON};
use crate::extract::{Backend, ExtractError, ExtractOptions, PatchInfo, PatchInput, PatchResult};
use crate::psf::{Psf, SpotSet};

/// The per-patch outputs of a chain, wherever it ran.
struct ChainOutputs {
    /// potrf's info per patch (0: factored).
    info: Vec<i32>,
    blocks: Vec<(usize, usize)>,
    dec: Option<HostDecorr>,
    c2: chi2::HostChi2,
    dims: chi2::Chi2Layout,
}

/// The decorrelation blocks of the patches whose factorisation succeeded: `(patch, core
/// fiber)` of each, and their layout over the solve stage's buffers.
fn blocks_of(
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

/// The whole chain through the stages' host twins.
#[cfg(test)]
fn twin_chain(batch: &[PatchInput<'_>], opts: &ExtractOptions) -> Result<ChainOutputs, GpuError> {
    twin_chain_on(batch, opts, &BatchLayout::new(batch)?)
}

/// The chain of twins on `layout` (of `batch`), whose pixel and spot arrays hold what the
/// device would: the batch's copies, or the resident arrays it indexes.
#[cfg(test)]
fn twin_chain_on(
    batch: &[PatchInput<'_>],
    opts: &ExtractOptions,
    layout: &BatchLayout,
) -> Result<ChainOutputs, GpuError> {
    let dense = normal::twin(layout, opts.regularize, DIAG_EPSILON);
    let shapes: Vec<PatchShape> = batch.iter().map(|i| PatchShape::of(&i.patch)).collect();
    let sol = solve::twin(&dense, &shapes)?;
    // As on the device: every block, those of a patch that did not factor dropped later.
    let factored = vec![0; batch.len()];
    let (ids, blocks) = blocks_of(
        batch,
        &factored,
        sol.nmax,
        sol.ncore_max,
        sol.nw,
        opts.ndiag,
    );
    let dl = DecorrLayout::new(&blocks)?;
    let dec = decor::twin(&dl, &sol.blocks, &sol.x, MAX_SWEEPS);
    let dims = chi2::Chi2Layout::new(batch, layout)?;
    let c2 = chi2::twin(layout, &dims, &sol.x, opts.psferr);
    Ok(ChainOutputs {
        info: sol.info,
        blocks: ids,
        dec: Some(dec),
        c2,
        dims,
    })
}

/// Per patch, the result the chain produced, or None where the CPU must take over.
fn assemble(
    batch: &[PatchInput<'_>],
    opts: &ExtractOptions,
    out: &ChainOutputs,
) -> Vec<Option<PatchResult>> {
    let mut results: Vec<Option<PatchResult>> = batch
        .iter()
        .enumerate()
        .map(|(b, inp)| (out.info[b] == 0).then(|| PatchResult::empty(&inp.patch, opts.ndiag)))
        .collect();
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

/// Fills the patches the chain could not finish with the CPU backend's results.
fn finish_on_cpu(
    batch: &[PatchInput<'_>],
    opts: &ExtractOptions,
    results: Vec<Option<PatchResult>>,
) -> Vec<PatchResult> {
    let mut ws = cpu::Workspace::default();
    results
        .into_iter()
        .zip(batch)
        .map(|(r, inp)| match r {
            Some(mut r) => {
                r.info = PatchInfo::default();
                r
            }
            None => cpu::extract_patch(inp, opts, &mut ws),
        })
        .collect()
}

/// `batch` with spot values on the host for the CPU: patches whose set is the resident one
/// (values on the device) get its host copy, which the caller has downloaded.
fn with_host_spots<'c>(
    batch: &'c [PatchInput<'_>],
    resident: Option<(&'c ResidentSpots, &'c SpotSet)>,
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
            // PatchInput is invariant in its lifetime: rebuild it with views of this borrow.
            Ok(PatchInput {
                patch: inp.patch,
                window: inp.window,
                pix: inp.pix.view(),
                ivar: inp.ivar.view(),
                spots,
            })
        })
        .collect()
}

/// Device time per stage, from events recorded on the stream between the stages. A stage's
/// time is the stream's time between its mark and the previous one, so a wait for the host's
/// next launch would count too; the chain queues each batch whole to leave none.
struct StageClock {
    marks: Vec<(&'static str, CudaEvent)>,
    totals: [f64; STAGES.len()],
}

impl StageClock {
    fn new() -> StageClock {
        StageClock {
            marks: Vec::new(),
            totals: [0.0; STAGES.len()],
        }
    }

    /// Records the end of `stage` (or, for "start", the beginning of a run of stages).
    fn mark(&mut self, gpu: &Gpu, stage: &'static str) -> Result<(), GpuError> {
        let ev = gpu
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| GpuError::Cuda(format!("recording an event: {e:?}")))?;
        self.marks.push((stage, ev));
        Ok(())
    }

    /// Adds the marked intervals to the totals (waits for the last mark).
    fn settle(&mut self) -> Result<(), GpuError> {
        for w in self.marks.windows(2) {
            let ms = w[0]
                .1
                .elapsed_ms(&w[1].1)
                .map_err(|e| GpuError::Cuda(format!("reading an event: {e:?}")))?;
            if let Some(i) = STAGES.iter().position(|s| *s == w[1].0) {
                self.totals[i] += f64::from(ms) / 1e3;
            }
        }
        self.marks.clear();
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

/// The GPU backend on one device.
pub struct GpuBackend {
    gpu: Gpu,
    spots: SpotsKernel,
    normal: normal::Kernels,
    solver: Solver,
    decor: decor::Kernels,
    chi2: chi2::Kernels,
    pixels: Option<DevicePixels>,
    resident: Option<ResidentSet>,
    clock: StageClock,
}

/// Batch memory per bundle of 25 fibers at the real sizes (235 patches of 518 unknowns):
/// AᵀWA and its factor (2.1 MB a patch), the covariance blocks, the per-pixel scratch and
/// the spots, rounded up. Sizes [`GpuBackend::bundles_per_batch`]; an estimate that is too
/// small is caught by the halving on out-of-memory.
const BYTES_PER_BUNDLE: usize = 1 << 30;

impl GpuBackend {
    /// Opens visible device `ordinal` and loads (compiling on first use) every kernel.
    pub fn new(ordinal: usize) -> Result<GpuBackend, GpuError> {
        let gpu = Gpu::open(ordinal)?;
        solve::check_libraries()?;
        Ok(GpuBackend {
            spots: SpotsKernel::load(&gpu)?,
            normal: normal::Kernels::load(&gpu)?,
            solver: Solver::new(&gpu)?,
            decor: decor::Kernels::load(&gpu)?,
            chi2: chi2::Kernels::load(&gpu)?,
            pixels: None,
            resident: None,
            clock: StageClock::new(),
            gpu,
        })
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

    /// The chain on the device for one batch, queued whole; results downloaded.
    fn device_chain(
        &mut self,
        batch: &[PatchInput<'_>],
        opts: &ExtractOptions,
    ) -> Result<ChainOutputs, GpuError> {
        // Everything the host computes comes first, so that the stream runs the stages back
        // to back.
        let resident = Resident {
            pixels: self.pixels.as_ref().map(|p| p.key),
            spots: self.resident.as_ref().map(|r| &r.key),
        };
        let layout = BatchLayout::with_resident(batch, &resident)?;
        let shapes: Vec<PatchShape> = batch.iter().map(|i| PatchShape::of(&i.patch)).collect();
        let nmax = layout.nmax;
        let ncore_max = shapes.iter().map(|s| s.ncore).max().unwrap_or(0);
        let nw = shapes.iter().map(|s| s.nwavetot).max().unwrap_or(0);
        // Every block, whether or not its patch factors: see the module docs.
        let factored = vec![0; batch.len()];
        let (ids, blocks) = blocks_of(batch, &factored, nmax, ncore_max, nw, opts.ndiag);
        let dl = DecorrLayout::new(&blocks)?;
        let dims = chi2::Chi2Layout::new(batch, &layout)?;

        let gpu = &self.gpu;
        let clock = &mut self.clock;
        clock.mark(gpu, "start")?;
        let on_device = OnDevice {
            pixels: self.pixels.as_ref(),
            spots: self.resident.as_ref().map(|r| r.device.values()),
        };
        let up = normal::UploadedLayout::upload(gpu, &layout, on_device)?;
        let buf = up.buffers();
        clock.mark(gpu, "h2d")?;
        let mut dense = normal::DenseBatch::alloc(gpu, &layout)?;
        normal::build_into(
            gpu,
            &self.normal,
            &buf,
            opts.regularize,
            DIAG_EPSILON,
            &mut dense,
        )?;
        clock.mark(gpu, "normal")?;
        let sol = self.solver.solve(gpu, &mut dense, &shapes)?;
        if (sol.nmax, sol.ncore_max, sol.nw) != (nmax, ncore_max, nw) {
            return Err(GpuError::Kernel(format!(
                "the solve laid out {} × {} blocks of {}, the chain expected {nmax} × \
                 {ncore_max} of {nw}",
                sol.nmax, sol.ncore_max, sol.nw
            )));
        }
        drop(dense);
        clock.mark(gpu, "solve")?;
        let d = decor::decorrelate(gpu, &self.decor, &dl, &sol.blocks, &sol.x, MAX_SWEEPS)?;
        clock.mark(gpu, "decorrelate")?;
        let mut c2 = chi2::Chi2Batch::alloc(gpu, &dims)?;
        chi2::launch(gpu, &self.chi2, &buf, &dims, &sol.x, opts.psferr, &mut c2)?;
        clock.mark(gpu, "chi2")?;
        let info = sol.download_info(gpu)?;
        let dec = d.download(gpu)?;
        let c2 = c2.download_slots(gpu)?;
        clock.mark(gpu, "d2h")?;
        clock.settle()?;
        Ok(ChainOutputs {
            info,
            blocks: ids,
            dec: Some(dec),
            c2,
            dims,
        })
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
            cpu::check_input(inp)?;
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if opts.model_image {
            // The model image is not ported: the CPU computes such batches whole.
            return self.cpu_batch(batch, opts, None);
        }
        // Out of memory: halve the batch until it fits (one patch that does not fit is an
        // error).
        let mut results = Vec::with_capacity(batch.len());
        let mut start = 0;
        let mut size = batch.len();
        while start < batch.len() {
            let part = &batch[start..(start + size).min(batch.len())];
            match self.device_chain(part, opts) {
                Ok(out) => {
                    let done = assemble(part, opts, &out);
                    results.extend(self.cpu_batch(part, opts, Some(done))?);
                    start += part.len();
                }
                Err(GpuError::Cuda(msg)) if msg.contains("OUT_OF_MEMORY") && size > 1 => {
                    self.clock.marks.clear();
                    size = size.div_ceil(2);
                    tracing::warn!(
                        "GPU out of memory for {} patches; retrying with {size}",
                        part.len()
                    );
                }
                Err(e) => return Err(self.error(e)),
            }
        }
        Ok(results)
    }

    fn evaluate_spots(
        &mut self,
        psf: &Psf,
        fibermin: usize,
        nfiber: usize,
        waves: &[f64],
        set: &mut SpotSet,
    ) -> Result<(), ExtractError> {
        self.resident = None;
        if nfiber == 0 || waves.is_empty() {
            // Nothing to evaluate, and CUDA refuses zero-byte buffers.
            return Ok(crate::psf::spots::evaluate_into(
                psf, fibermin, nfiber, waves, set,
            )?);
        }
        let inp = gspots::flatten(psf, fibermin, nfiber, waves)?;
        let mut run = |b: &mut GpuBackend| -> Result<ResidentSet, GpuError> {
            b.clock.mark(&b.gpu, "start")?;
            let dev = gspots::DeviceInputs::upload(&b.gpu, &inp)?;
            let mut device = DeviceSpots::zeros(&b.gpu, &dev)?;
            b.spots.launch(&b.gpu, &dev, &mut device)?;
            b.clock.mark(&b.gpu, "spots")?;
            *set = device.download_geometry(&b.gpu)?;
            b.clock.mark(&b.gpu, "d2h")?;
            b.clock.settle()?;
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
        // The previous unit's copy is freed first: two full CCDs need not fit at once.
        self.pixels = None;
        let up = |b: &mut GpuBackend| -> Result<Option<DevicePixels>, GpuError> {
            b.clock.mark(&b.gpu, "start")?;
            let p = DevicePixels::upload(&b.gpu, pix, ivar)?;
            b.clock.mark(&b.gpu, "h2d")?;
            b.clock.settle()?;
            Ok(p)
        };
        self.pixels = up(self).map_err(|e| self.error(e))?;
        Ok(())
    }

    fn bundles_per_batch(&self) -> usize {
        let free = self
            .gpu
            .ctx
            .mem_get_info()
            .map(|(free, _)| free)
            .unwrap_or(0);
        // Half the free memory, leaving room for cuSOLVER's and the next unit's buffers; a
        // frame has 20 bundles.
        (free / 2 / BYTES_PER_BUNDLE).clamp(1, 20)
    }

    fn take_stage_times(&mut self) -> Vec<(&'static str, f64)> {
        self.clock.take()
    }
}

impl GpuBackend {
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
            return Ok(finish_on_cpu(batch, opts, done));
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
        let resident = self
            .resident
            .as_ref()
            .and_then(|r| Some((&r.key, r.host.as_ref()?)));
        let hosted = with_host_spots(batch, resident).map_err(|e| self.error(e))?;
        if done.iter().all(Option::is_none) && opts.model_image {
            return CpuBackend.extract_batch(&hosted, opts);
        }
        Ok(finish_on_cpu(&hosted, opts, done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::cpu::tests::toy_psf;
    use crate::patch::{pixels, Patch, PatchOptions, PixelWindow, Plan, WaveGrid};
    use crate::psf::spots;
    use ndarray::Array2;

    /// Compares a chain's results with the CPU backend's: the parity figures, max pull
    /// 1e-6 and |ΔR| 1e-9.
    fn compare(cpu: &[PatchResult], other: &[PatchResult]) -> (f64, f64) {
        let (mut pull, mut dr) = (0.0f64, 0.0f64);
        for (a, b) in cpu.iter().zip(other) {
            for ((fa, fb), iv) in a.flux.iter().zip(&b.flux).zip(&a.fluxivar) {
                pull = pull.max((fa - fb).abs() * iv.sqrt());
            }
            for (ra, rb) in a.resolution.iter().zip(&b.resolution) {
                dr = dr.max((ra - rb).abs());
            }
            for (ia, ib) in a.fluxivar.iter().zip(&b.fluxivar) {
                assert!(
                    (ia - ib).abs() <= 1e-9 * ia.abs().max(1e-300),
                    "fluxivar {ia} vs {ib}"
                );
            }
            for (ca, cb) in a.chi2pix.iter().zip(&b.chi2pix) {
                assert!(
                    (ca - cb).abs() <= 1e-8 * ca.abs().max(1.0),
                    "chi2pix {ca} vs {cb}"
                );
            }
            for (ma, mb) in a.pixmask_fraction.iter().zip(&b.pixmask_fraction) {
                assert!((ma - mb).abs() <= 1e-12, "pixmask {ma} vs {mb}");
            }
        }
        (pull, dr)
    }

    /// One bundle of the toy PSF with noise-free data and a few masked pixels: the patches the
    /// pipeline would send as one batch, cut from the whole CCD.
    struct Toy {
        set: SpotSet,
        pix: Array2<f64>,
        ivar: Array2<f64>,
        items: Vec<(Patch, PixelWindow)>,
        opts: ExtractOptions,
    }

    impl Toy {
        fn new() -> Toy {
            let psf = toy_psf(10, 3);
            let opts_p = PatchOptions {
                bundlesize: 10,
                nsubbundles: 2,
                nwavestep: 20,
                ..PatchOptions::default()
            };
            let grid = WaveGrid::new(5200.0, 5400.0, 1.0, &opts_p).unwrap();
            let plan = Plan::new(0, 10, grid.wave.len(), 10, &opts_p);
            let set = spots::evaluate(&psf, 0, 10, &grid.padded).unwrap();
            let (ny, nx) = (psf.npix_y, psf.npix_x);
            let mut pix = Array2::<f64>::zeros((ny, nx));
            let mut ivar = Array2::<f64>::from_elem((ny, nx), 1.0);
            for (i, v) in pix.iter_mut().enumerate() {
                *v = 10.0 + (i % 7) as f64;
            }
            for i in (0..ny * nx).step_by(97) {
                ivar[[i / nx, i % nx]] = 0.0;
            }
            let items: Vec<(Patch, PixelWindow)> = plan.patches[0]
                .iter()
                .map(|p| (*p, pixels::window(p, &set, opts_p.pixpad_frac)))
                .filter(|(_, w)| w.on_ccd(ny, nx))
                .collect();
            assert!(items.len() >= 4, "a batch of several patches");
            let opts = ExtractOptions {
                regularize: 0.0,
                psferr: 0.01,
                ndiag: psf.hsizey,
                model_image: false,
            };
            Toy {
                set,
                pix,
                ivar,
                items,
                opts,
            }
        }

        fn inputs<'a>(&'a self, set: &'a SpotSet) -> Vec<PatchInput<'a>> {
            self.items
                .iter()
                .map(|(p, w)| PatchInput::from_ccd(*p, *w, self.pix.view(), self.ivar.view(), set))
                .collect()
        }
    }

    /// Runs `chain` on the toy batch and checks it against the CPU backend at the issue's
    /// parity figures.
    fn toy_batch_check(chain: &dyn Fn(&[PatchInput<'_>], &ExtractOptions) -> Vec<PatchResult>) {
        let toy = Toy::new();
        let inputs = toy.inputs(&toy.set);
        let cpu = CpuBackend.extract_batch(&inputs, &toy.opts).unwrap();
        let other = chain(&inputs, &toy.opts);
        let (pull, dr) = compare(&cpu, &other);
        eprintln!(
            "{} patches: max pull {pull:.2e}, max |dR| {dr:.2e}",
            inputs.len()
        );
        assert!(pull <= 1e-6, "max pull {pull:e}");
        assert!(dr <= 1e-9, "max |dR| {dr:e}");
    }

    /// The chain as the GPU backend runs it in the pipeline: the windows index the CCD's
    /// pixels uploaded once and the spot set left on the device (the host holding its
    /// geometry only). Through the twins, with the arrays the device would hold, it gives the
    /// bit-identical results of the chain on the batch's own copies.
    #[test]
    fn the_chain_on_resident_pixels_and_spots_matches_the_chain_on_copies() {
        let toy = Toy::new();
        let mut geometry = toy.set.clone();
        geometry.values.clear();
        let key = ResidentSpots::of(&geometry);
        let inputs = toy.inputs(&geometry);
        let resident = Resident {
            pixels: normal::ResidentPixels::of(toy.pix.view(), toy.ivar.view()),
            spots: Some(&key),
        };
        let mut layout = BatchLayout::with_resident(&inputs, &resident).unwrap();
        assert!(layout.pixels_resident && layout.spots_resident);
        assert!(layout.pix.is_empty() && layout.spots.is_empty());
        assert_eq!(layout.pix_len, toy.pix.len());
        assert_eq!(layout.spots_len, toy.set.values.len());
        assert!(layout
            .patch
            .chunks(4)
            .all(|p| p[3] as usize == toy.pix.ncols()));
        // What the device holds.
        layout.pix = toy.pix.iter().copied().collect();
        layout.ivar = toy.ivar.iter().copied().collect();
        layout.spots = toy.set.values.clone();
        let on_device = twin_chain_on(&inputs, &toy.opts, &layout).unwrap();
        let copies = toy.inputs(&toy.set);
        let own = twin_chain(&copies, &toy.opts).unwrap();
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (a, b) = (on_device.dec.as_ref().unwrap(), own.dec.as_ref().unwrap());
        assert_eq!(bits(&a.flux), bits(&b.flux));
        assert_eq!(bits(&a.fluxivar), bits(&b.fluxivar));
        assert_eq!(bits(&a.resolution), bits(&b.resolution));
        assert_eq!(bits(&on_device.c2.chi2pix), bits(&own.c2.chi2pix));
        assert_eq!(bits(&on_device.c2.pixmask), bits(&own.c2.pixmask));
        assert_eq!(bits(&on_device.c2.model), bits(&own.c2.model));
        assert_eq!(on_device.info, own.info);
        // And the CPU fallback gets the values back for such a set.
        let hosted = with_host_spots(&inputs, Some((&key, &toy.set))).unwrap();
        assert!(hosted.iter().all(|i| std::ptr::eq(i.spots, &toy.set)));
        assert!(with_host_spots(&inputs, None).is_err());
    }

    /// What a layout refuses or falls back from: spots whose values are on the device but
    /// not the resident set are an error; windows not cut from the resident pixels, and spot
    /// sets other than the resident one, make the batch carry its own copies.
    #[test]
    fn resident_layouts_fall_back_or_refuse() {
        let toy = Toy::new();
        let mut geometry = toy.set.clone();
        geometry.values.clear();
        let err = BatchLayout::new(&toy.inputs(&geometry)).unwrap_err();
        assert!(err.to_string().contains("not the one resident"), "{err}");
        // Another set's geometry: moved by one column.
        let mut other = geometry.clone();
        other.xc.iter_mut().for_each(|x| *x += 1);
        let key = ResidentSpots::of(&other);
        let copy = toy.pix.clone();
        let resident = Resident {
            pixels: normal::ResidentPixels::of(copy.view(), toy.ivar.view()),
            spots: Some(&key),
        };
        let inputs = toy.inputs(&toy.set);
        let layout = BatchLayout::with_resident(&inputs, &resident).unwrap();
        assert!(!layout.pixels_resident && !layout.spots_resident);
        assert_eq!(layout.pix.len(), layout.npix);
        assert!(layout.patch.chunks(4).all(|p| p[3] == p[2]));
        assert!(BatchLayout::with_resident(&toy.inputs(&geometry), &resident).is_err());
        // A non-contiguous array cannot be resident.
        let t = toy.pix.t();
        assert!(normal::ResidentPixels::of(t, toy.ivar.t()).is_none());
    }

    /// The stages' host twins chained as the device chains them agree with the CPU backend at
    /// the parity figures: the GPU design, end to end, on a machine without a GPU.
    #[test]
    fn the_chain_of_twins_matches_the_cpu_backend() {
        toy_batch_check(&|batch, opts| {
            let out = twin_chain(batch, opts).expect("twin chain");
            let done = assemble(batch, opts, &out);
            // Every patch from the chain itself: none handed back to the CPU.
            assert!(
                done.iter().all(Option::is_some),
                "the chain left patches to the CPU"
            );
            finish_on_cpu(batch, opts, done)
        });
    }

    /// The real DESI PSF and the shared preproc (bundle 0): patches at the bundle's lower edge
    /// (6 fibers), its middle and the grid's end, as one batch through the chain of twins.
    #[test]
    fn the_chain_of_twins_matches_the_cpu_backend_on_the_real_psf() {
        let (Some(psf_path), Some(img_path)) = (
            crate::io::shared_data("psf-r0-00067784.fits"),
            crate::io::shared_data("preproc-r0-b00.fits.gz"),
        ) else {
            return;
        };
        let psf = crate::io::psf::read_psf(&psf_path).unwrap();
        let img =
            crate::io::image::read_preproc(&img_path, crate::io::image::EXTRACT_MASK_BITS).unwrap();
        let popts = PatchOptions::default();
        let grid = WaveGrid::new(5760.0, 7620.0, 0.8, &popts).unwrap();
        let plan = Plan::new(0, 25, grid.wave.len(), psf.nfiber(), &popts);
        let set = spots::evaluate(&psf, 0, 25, &grid.padded).unwrap();
        let opts = ExtractOptions {
            regularize: 0.0,
            psferr: 0.01,
            ndiag: psf.hsizey,
            model_image: false,
        };
        let inputs: Vec<PatchInput<'_>> = [0usize, 20, 46, 47 + 23, 2 * 47 + 46, 4 * 47 + 10]
            .iter()
            .map(|&k| {
                let p = plan.patches[0][k];
                let w = pixels::window(&p, &set, popts.pixpad_frac);
                PatchInput::from_ccd(p, w, img.image.view(), img.ivar.view(), &set)
            })
            .collect();
        let cpu = CpuBackend.extract_batch(&inputs, &opts).unwrap();
        let out = twin_chain(&inputs, &opts).expect("twin chain");
        let done = assemble(&inputs, &opts, &out);
        assert!(
            done.iter().all(Option::is_some),
            "the chain left patches to the CPU"
        );
        let other = finish_on_cpu(&inputs, &opts, done);
        let (pull, dr) = compare(&cpu, &other);
        eprintln!(
            "real PSF, {} patches: max pull {pull:.2e}, max |dR| {dr:.2e}",
            inputs.len()
        );
        assert!(pull <= 1e-6, "max pull {pull:e}");
        assert!(dr <= 1e-9, "max |dR| {dr:e}");
    }

    /// On a GPU: the device backend agrees with the CPU backend at the same figures.
    #[test]
    fn gpu_backend_matches_the_cpu_backend() {
        if let Err(e) = super::super::device::probe() {
            eprintln!("skipping: no GPU ({e})");
            return;
        }
        let mut backend = GpuBackend::new(0).expect("GPU backend");
        let cell = std::cell::RefCell::new(&mut backend);
        toy_batch_check(&|batch, opts| cell.borrow_mut().extract_batch(batch, opts).unwrap());
    }
}
