//! The CPU backend: the reference implementation of docs/science.md §5, threaded over patches
//! with rayon while BLAS stays single-threaded.

// The stages are crate-visible so that the GPU backend's tests compare its twins with the
// CPU's own code rather than a copy.
pub(crate) mod chi2;
pub(crate) mod decorrelate;
pub mod lapack;
pub(crate) mod normal;
pub mod oracle;
mod simd;

use ndarray::Array2;
use rayon::prelude::*;

use super::{
    Backend, ExtractError, ExtractOptions, ModelFlux, PatchInfo, PatchInput, PatchResult,
    DIAG_EPSILON, RETRY_DIAG_EPSILON, RETRY_REGULARIZE,
};
use decorrelate::{DecorrWork, Layout};
use normal::SpotGeom;

/// Per-thread buffers reused from patch to patch (no allocation in the steady state).
#[derive(Default)]
pub struct Workspace {
    geom: Vec<SpotGeom>,
    pairs: Vec<(u32, u32, f64)>,
    diag: Vec<f64>,
    rhs: Vec<f64>,
    fluxweight: Vec<f64>,
    wspot: Vec<f64>,
    decorr: DecorrWork,
    r: Vec<f64>,
    s: Vec<f64>,
    model: Vec<f64>,
    chi2: Vec<f64>,
    valid: Vec<f64>,
    masked: Vec<f64>,
    flux: Vec<f64>,
}

thread_local! {
    // One workspace per worker thread for the life of the thread, so that batch after batch
    // reuses the same (multi-megabyte) buffers instead of faulting in fresh pages.
    static WORKSPACE: std::cell::RefCell<Workspace> = std::cell::RefCell::new(Workspace::default());
}

/// Extracts one patch on the calling thread. A patch whose window leaves the CCD is extracted
/// on the whole window with the pixels off the CCD masked ([`PatchInput::padded`]), and its
/// bins with too little light on the CCD are zeroed ([`PatchResult::zero_starved`]).
pub fn extract_patch(
    input: &PatchInput<'_>,
    opts: &ExtractOptions,
    ws: &mut Workspace,
) -> PatchResult {
    if !input.leaves_ccd() {
        return extract_window(input, opts, ws);
    }
    let (pix, ivar) = input.padded();
    let whole = PatchInput {
        ccd: input.window,
        pix: pix.view(),
        ivar: ivar.view(),
        loaded: None,
        ..input.clone()
    };
    let mut res = extract_window(&whole, opts, ws);
    if !res.info.failed {
        res.ccd_light = Some(input.ccd_light());
        res.zero_starved();
    }
    res
}

/// Extracts a patch whose pixel arrays cover its whole window.
fn extract_window(
    input: &PatchInput<'_>,
    opts: &ExtractOptions,
    ws: &mut Workspace,
) -> PatchResult {
    lapack::single_threaded_blas();
    match solve(input, opts, opts.regularize, DIAG_EPSILON, ws) {
        Some(mut res) => {
            res.info = PatchInfo::default();
            res
        }
        None => {
            let reg = opts.regularize.max(RETRY_REGULARIZE);
            match solve(input, opts, reg, RETRY_DIAG_EPSILON, ws) {
                Some(mut res) => {
                    res.info = PatchInfo {
                        retried: true,
                        ..PatchInfo::default()
                    };
                    res
                }
                None => {
                    let mut res = PatchResult::empty(&input.patch, opts.ndiag);
                    res.info = PatchInfo {
                        retried: true,
                        failed: true,
                        ..PatchInfo::default()
                    };
                    res
                }
            }
        }
    }
}

fn solve(
    input: &PatchInput<'_>,
    opts: &ExtractOptions,
    regularize: f64,
    epsilon: f64,
    ws: &mut Workspace,
) -> Option<PatchResult> {
    let p = input.patch;
    let s = input.spots;
    let nps = s.ny * s.nx;
    normal::geometry(input, &mut ws.geom);
    let n = ws.geom.len();
    ws.rhs.resize(n, 0.0);
    ws.fluxweight.resize(n, 0.0);
    ws.wspot.resize(n * nps, 0.0);
    let kd = normal::build(
        input,
        &ws.geom,
        &mut normal::Normal {
            pairs: &mut ws.pairs,
            rhs: &mut ws.rhs[..n],
            fluxweight: &mut ws.fluxweight[..n],
            wspot: &mut ws.wspot[..n * nps],
        },
    );
    normal::regularization(&ws.fluxweight[..n], regularize, epsilon, &mut ws.diag);
    let nwt = p.nwavetot;
    let nstep = nwt - 2 * p.wavepad;
    let layout = Layout {
        nspecpad: p.nspecpad,
        nwavetot: nwt,
        core_fiber: p.core_fiber_offset(),
        ncore: p.nspec,
        row_lo: p.wavepad.saturating_sub(opts.ndiag),
        row_hi: (p.wavepad + nstep + opts.ndiag).min(nwt),
    };
    let system = decorrelate::BandSystem {
        pairs: &ws.pairs,
        diag: &ws.diag,
        rhs: &ws.rhs[..n],
        kd,
    };
    let x = ws
        .decorr
        .run(layout, &system, &mut ws.r, &mut ws.s)
        .ok()?
        .to_vec();
    let nrow = layout.row_hi - layout.row_lo;
    let ndiag = opts.ndiag;
    let nkeep = p.nwave_keep;
    let mut res = PatchResult::empty(&p, ndiag);
    // Flux of every core bin (the model image needs all nwavestep of them).
    ws.flux.clear();
    ws.flux.resize(p.nspec * nstep, 0.0);
    for c in 0..p.nspec {
        let f = layout.core_fiber + c;
        let xf = &x[f * nwt..(f + 1) * nwt];
        for j in 0..nstep {
            let ri = p.wavepad + j - layout.row_lo;
            let row = &ws.r[(c * nrow + ri) * nwt..(c * nrow + ri + 1) * nwt];
            let flux: f64 = row.iter().zip(xf).map(|(a, b)| a * b).sum();
            ws.flux[c * nstep + j] = flux;
            if j < nkeep {
                let sv = ws.s[c * nrow + ri];
                res.flux[[c, j]] = flux;
                res.fluxivar[[c, j]] = sv * sv;
                for k in 0..=2 * ndiag {
                    // Rdiag[k, j] = R[j + k - ndiag, j] in padded indices.
                    let rr = p.wavepad + j + k - ndiag - layout.row_lo;
                    res.resolution[[c, k, j]] = ws.r[(c * nrow + rr) * nwt + p.wavepad + j];
                }
            }
        }
    }
    if res.flux.iter().any(|v| !v.is_finite()) || res.fluxivar.iter().any(|v| !v.is_finite()) {
        return None;
    }
    chi2::model(input, &ws.geom, &x, &mut ws.model);
    chi2::pixel_chi2(input, &ws.model, opts.psferr, &mut ws.chi2, &mut ws.valid);
    ws.masked.clear();
    ws.masked
        .extend(input.ivar.iter().map(|&v| if v == 0.0 { 1.0 } else { 0.0 }));
    for c in 0..p.nspec {
        let f = layout.core_fiber + c;
        for j in 0..nkeep {
            let g = &ws.geom[f * nwt + p.wavepad + j];
            res.pixmask_fraction[[c, j]] = chi2::project(input, g, &ws.masked);
            let num = chi2::project(input, g, &ws.chi2);
            let den = chi2::project(input, g, &ws.valid);
            res.chi2pix[[c, j]] = if den > 0.0 { num / den } else { 0.0 };
        }
    }
    if let Some(which) = opts.model_image {
        // The unknowns of the core fibers' core bins, in the order of `ws.flux`.
        let core: Vec<usize> = (0..p.nspec)
            .flat_map(|c| {
                let f = layout.core_fiber + c;
                (0..nstep).map(move |j| f * nwt + p.wavepad + j)
            })
            .collect();
        let mut img = Array2::zeros((input.window.ny(), input.window.nx()));
        let mut coef = vec![0.0; n];
        for (k, &u) in core.iter().enumerate() {
            coef[u] = match which {
                ModelFlux::Deconvolved => x[u],
                ModelFlux::Decorrelated => ws.flux[k],
            };
        }
        let slice = img.as_slice_mut().expect("standard layout");
        let (lo, hi) = (layout.core_fiber * nwt, (layout.core_fiber + p.nspec) * nwt);
        chi2::add_spots(input, &ws.geom, &coef, lo..hi, slice);
        res.model = Some(img);
        if opts.leverage {
            res.leverage = Some(chi2::leverage(input, &ws.geom, &core, &ws.decorr));
        }
    }
    Some(res)
}

/// The CPU backend: patches in parallel on the current rayon pool (the caller chooses the
/// thread count by installing a pool), each thread with its own [`Workspace`].
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn extract_batch(
        &mut self,
        batch: &[PatchInput<'_>],
        opts: &ExtractOptions,
    ) -> Result<Vec<PatchResult>, ExtractError> {
        self.extract_batch_counted(batch, opts, &|_| {})
    }

    fn extract_batch_counted(
        &mut self,
        batch: &[PatchInput<'_>],
        opts: &ExtractOptions,
        done: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<PatchResult>, ExtractError> {
        for inp in batch {
            inp.check()?;
            inp.check_host_spots()?;
        }
        Ok(batch
            .par_iter()
            .map(|inp| {
                let r = WORKSPACE.with(|ws| extract_patch(inp, opts, &mut ws.borrow_mut()));
                done(1);
                r
            })
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests;
