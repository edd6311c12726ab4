//! The GPU backend: the stages chained on one device, batch by batch —
//! normal equations (`normal`) → batched Cholesky, solve and covariance blocks (`solve`) →
//! decorrelation (`decorrelate`) → chi2pix and pixmask fraction (`chi2`) — with the
//! intermediate results kept on the device and only the per-bin outputs downloaded.
//!
//! Patches the GPU cannot finish (a factorisation that fails, a block whose eigenvalues are not
//! positive, a non-finite output) are extracted again by the CPU backend, which retries them
//! with regularisation exactly as it would its own: the semantics stay the CPU's. So does a
//! batch that asks for the model image (not ported yet).
//!
//! The same chain runs on the host through each stage's twin ([`twin_chain`]): on machines
//! without a GPU that is what the tests compare with the CPU backend, which checks how the
//! stages fit together (layouts, offsets, which blocks belong to which fibers) end to end.

use super::decorrelate::{self as decor, Block, DecorrLayout, HostDecorr, Status, MAX_SWEEPS};
use super::device::Gpu;
use super::normal::{self, BatchLayout};
use super::solve::{self, HostSolve, PatchShape, Solver};
use super::{chi2, GpuError};
use crate::extract::cpu::{self, CpuBackend, DIAG_EPSILON};
use crate::extract::{Backend, ExtractError, ExtractOptions, PatchInfo, PatchInput, PatchResult};

/// The per-patch outputs of a chain, wherever it ran.
struct ChainOutputs {
    sol: HostSolve,
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
    let layout = BatchLayout::new(batch)?;
    let dense = normal::twin(&layout, opts.regularize, DIAG_EPSILON);
    let shapes: Vec<PatchShape> = batch.iter().map(|i| PatchShape::of(&i.patch)).collect();
    let sol = solve::twin(&dense, &shapes)?;
    let (ids, blocks) = blocks_of(
        batch,
        &sol.info,
        sol.nmax,
        sol.ncore_max,
        sol.nw,
        opts.ndiag,
    );
    let dec = if blocks.is_empty() {
        None
    } else {
        let dl = DecorrLayout::new(&blocks)?;
        Some(decor::twin(&dl, &sol.blocks, &sol.x, MAX_SWEEPS))
    };
    let dims = chi2::Chi2Layout::new(batch, &layout)?;
    let c2 = chi2::twin(&layout, &dims, &sol.x, opts.psferr);
    Ok(ChainOutputs {
        sol,
        blocks: ids,
        dec,
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
        .map(|(b, inp)| (out.sol.info[b] == 0).then(|| PatchResult::empty(&inp.patch, opts.ndiag)))
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

/// The GPU backend on one device.
pub struct GpuBackend {
    gpu: Gpu,
    normal: normal::Kernels,
    solver: Solver,
    decor: decor::Kernels,
    chi2: chi2::Kernels,
}

impl GpuBackend {
    /// Opens visible device `ordinal` and loads (compiling on first use) every kernel.
    pub fn new(ordinal: usize) -> Result<GpuBackend, GpuError> {
        let gpu = Gpu::open(ordinal)?;
        solve::check_libraries()?;
        Ok(GpuBackend {
            normal: normal::Kernels::load(&gpu)?,
            solver: Solver::new(&gpu)?,
            decor: decor::Kernels::load(&gpu)?,
            chi2: chi2::Kernels::load(&gpu)?,
            gpu,
        })
    }

    /// The device.
    pub fn device(&self) -> &super::device::DeviceInfo {
        &self.gpu.info
    }

    /// The chain on the device for one batch; results downloaded.
    fn device_chain(
        &mut self,
        batch: &[PatchInput<'_>],
        opts: &ExtractOptions,
    ) -> Result<ChainOutputs, GpuError> {
        let gpu = &self.gpu;
        let layout = BatchLayout::new(batch)?;
        let mut dense = normal::DenseBatch::alloc(gpu, &layout)?;
        normal::build_into(
            gpu,
            &self.normal,
            &layout,
            opts.regularize,
            DIAG_EPSILON,
            &mut dense,
        )?;
        let shapes: Vec<PatchShape> = batch.iter().map(|i| PatchShape::of(&i.patch)).collect();
        let sol_dev = self.solver.solve(gpu, &mut dense, &shapes)?;
        // The factorisation's per-patch info decides which blocks exist; x and the blocks stay
        // on the device for the next stages (the download also brings them for the report).
        let sol = sol_dev.download(gpu)?;
        let (ids, blocks) = blocks_of(
            batch,
            &sol.info,
            sol.nmax,
            sol.ncore_max,
            sol.nw,
            opts.ndiag,
        );
        let dec = if blocks.is_empty() {
            None
        } else {
            let dl = DecorrLayout::new(&blocks)?;
            let d = decor::decorrelate(
                gpu,
                &self.decor,
                &dl,
                &sol_dev.blocks,
                &sol_dev.x,
                MAX_SWEEPS,
            )?;
            Some(d.download(gpu)?)
        };
        let dims = chi2::Chi2Layout::new(batch, &layout)?;
        let up = chi2::UploadedLayout::upload(gpu, &layout)?;
        let mut c2 = chi2::Chi2Batch::alloc(gpu, &dims)?;
        chi2::launch(
            gpu,
            &self.chi2,
            &up.buffers(),
            &dims,
            &sol_dev.x,
            opts.psferr,
            &mut c2,
        )?;
        let c2 = c2.download(gpu)?;
        Ok(ChainOutputs {
            sol,
            blocks: ids,
            dec,
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
            return CpuBackend.extract_batch(batch, opts);
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
                    results.extend(finish_on_cpu(part, opts, assemble(part, opts, &out)));
                    start += part.len();
                }
                Err(GpuError::Cuda(msg)) if msg.contains("OUT_OF_MEMORY") && size > 1 => {
                    size = size.div_ceil(2);
                    tracing::warn!(
                        "GPU out of memory for {} patches; retrying with {size}",
                        part.len()
                    );
                }
                Err(e) => {
                    return Err(ExtractError::Backend {
                        backend: "gpu",
                        msg: format!("{} ({}): {e}", self.gpu.info.name, self.gpu.info.ordinal),
                    })
                }
            }
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::cpu::tests::toy_psf;
    use crate::patch::{pixels, PatchOptions, Plan, WaveGrid};
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

    /// One bundle of the toy PSF with noise-free data, a few masked pixels, the patches the
    /// pipeline would send as one batch.
    fn toy_batch_check(chain: &dyn Fn(&[PatchInput<'_>], &ExtractOptions) -> Vec<PatchResult>) {
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
        let opts = ExtractOptions {
            regularize: 0.0,
            psferr: 0.01,
            ndiag: psf.hsizey,
            model_image: false,
        };
        let inputs: Vec<PatchInput<'_>> = plan.patches[0]
            .iter()
            .filter_map(|p| {
                let w = pixels::window(p, &set, opts_p.pixpad_frac);
                w.on_ccd(ny, nx)
                    .then(|| PatchInput::from_ccd(*p, w, pix.view(), ivar.view(), &set))
            })
            .collect();
        assert!(inputs.len() >= 4, "a batch of several patches");
        let cpu = CpuBackend.extract_batch(&inputs, &opts).unwrap();
        let other = chain(&inputs, &opts);
        let (pull, dr) = compare(&cpu, &other);
        eprintln!(
            "{} patches: max pull {pull:.2e}, max |dR| {dr:.2e}",
            inputs.len()
        );
        assert!(pull <= 1e-6, "max pull {pull:e}");
        assert!(dr <= 1e-9, "max |dR| {dr:e}");
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
