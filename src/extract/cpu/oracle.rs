//! The straightforward implementation of docs/science.md §5, kept as a test oracle: dense `A`,
//! dense `AᵀWA`, LU solve, and the covariance from a full eigendecomposition, as gpu_specter's
//! CPU path does. ~2e9 flops per patch; never used in production.

use ndarray::{s, Array1, Array2, Axis};
use ndarray_linalg::{Eigh, Solve, UPLO};

use crate::extract::{ExtractOptions, ModelFlux, PatchInput, PatchResult};

/// Dense projection matrix `A` `[window pixels, unknowns]`, unknowns fiber-major.
pub fn projection_matrix(input: &PatchInput<'_>) -> Array2<f64> {
    let p = input.patch;
    let s = input.spots;
    let w = input.window;
    let (nyw, nxw) = (w.ny(), w.nx());
    let f0 = p.specmin - s.grid.fibermin;
    let mut a = Array2::zeros((nyw * nxw, p.nunknown()));
    for f in 0..p.nspecpad {
        for wi in 0..p.nwavetot {
            let u = f * p.nwavetot + wi;
            let i = s.index(f0 + f, p.iwave + wi);
            let spot = s.spot(f0 + f, p.iwave + wi);
            for iy in 0..s.ny {
                let r = s.yc[i] + iy as i64 - w.ymin;
                if r < 0 || r >= nyw as i64 {
                    continue;
                }
                for ix in 0..s.nx {
                    let c = (s.xc[i] + ix as i64 - w.xmin) as usize;
                    a[[r as usize * nxw + c, u]] = spot[iy * s.nx + ix];
                }
            }
        }
    }
    a
}

/// The regularised normal equations of `input` with projection matrix `a` (dense `AᵀWA`
/// with the CPU's Tikhonov terms and ε on the diagonal, and `AᵀWp`).
pub fn normal_equations(
    input: &PatchInput<'_>,
    a: &Array2<f64>,
    opts: &ExtractOptions,
) -> (Array2<f64>, Array1<f64>) {
    let pix: Array1<f64> = input.pix.iter().copied().collect();
    let ivar: Array1<f64> = input.ivar.iter().copied().collect();
    let wa = a * &ivar.view().insert_axis(Axis(1));
    let mut icov = a.t().dot(&wa);
    let y = wa.t().dot(&pix);
    let fluxweight = wa.sum_axis(Axis(0));
    let minweight = 1e-4 * fluxweight.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    for (u, &fw) in fluxweight.iter().enumerate() {
        let l2 = if fw < minweight {
            (minweight - fw).powi(2)
        } else {
            opts.regularize.powi(2)
        };
        icov[[u, u]] += l2 + 1e-15;
    }
    (icov, y)
}

/// `icov⁻¹` from a full eigendecomposition of its symmetric part.
pub fn covariance(icov: &Array2<f64>) -> Option<Array2<f64>> {
    let sym = (icov + &icov.t()) / 2.0;
    let (lam, v) = sym.eigh(UPLO::Lower).ok()?;
    Some(
        v.dot(&Array2::from_diag(&lam.mapv(|l| 1.0 / l)))
            .dot(&v.t()),
    )
}

/// Extracts one patch the dense way; `None` if it produced NaN.
pub fn extract_patch_dense(input: &PatchInput<'_>, opts: &ExtractOptions) -> Option<PatchResult> {
    super::lapack::single_threaded_blas();
    let p = input.patch;
    let a = projection_matrix(input);
    let pix: Array1<f64> = input.pix.iter().copied().collect();
    let ivar: Array1<f64> = input.ivar.iter().copied().collect();
    let (icov, y) = normal_equations(input, &a, opts);
    let n = p.nunknown();
    let x = icov.solve(&y).ok()?;
    let cov = covariance(&icov)?;
    let nwt = p.nwavetot;
    let nstep = nwt - 2 * p.wavepad;
    let ndiag = opts.ndiag;
    let mut res = PatchResult::empty(&p, ndiag);
    let core0 = p.core_fiber_offset();
    let mut flux_all = Array2::<f64>::zeros((p.nspec, nstep));
    for c in 0..p.nspec {
        let f = core0 + c;
        let blk = cov
            .slice(s![f * nwt..(f + 1) * nwt, f * nwt..(f + 1) * nwt])
            .to_owned();
        let (bl, bv) = blk.eigh(UPLO::Lower).ok()?;
        let q = bv
            .dot(&Array2::from_diag(&bl.mapv(|l| 1.0 / l.sqrt())))
            .dot(&bv.t());
        let srow = q.sum_axis(Axis(1));
        let r = &q / &srow.view().insert_axis(Axis(1));
        let flux = r.dot(&x.slice(s![f * nwt..(f + 1) * nwt]));
        for j in 0..nstep {
            flux_all[[c, j]] = flux[p.wavepad + j];
        }
        for j in 0..p.nwave_keep {
            let jj = p.wavepad + j;
            res.flux[[c, j]] = flux[jj];
            res.fluxivar[[c, j]] = srow[jj] * srow[jj];
            for k in 0..=2 * ndiag {
                res.resolution[[c, k, j]] = r[[jj + k - ndiag, jj]];
            }
        }
    }
    if res.flux.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let model = a.dot(&x);
    let mut chi2 = Array1::zeros(model.len());
    let mut valid = Array1::zeros(model.len());
    for i in 0..model.len() {
        let modelivar = (opts.psferr * model[i] + 1e-32).powi(-2);
        let tot = if modelivar > 0.0 && ivar[i] > 0.0 {
            1.0 / (1.0 / modelivar + 1.0 / ivar[i])
        } else {
            0.0
        };
        chi2[i] = (pix[i] - model[i]).powi(2) * tot;
        valid[i] = if tot > 0.0 { 1.0 } else { 0.0 };
    }
    let masked = ivar.mapv(|v| if v == 0.0 { 1.0 } else { 0.0 });
    let num = a.t().dot(&chi2);
    let den = a.t().dot(&valid);
    let pm = a.t().dot(&masked);
    for c in 0..p.nspec {
        for j in 0..p.nwave_keep {
            let u = (core0 + c) * nwt + p.wavepad + j;
            res.pixmask_fraction[[c, j]] = pm[u];
            res.chi2pix[[c, j]] = if den[u] > 0.0 { num[u] / den[u] } else { 0.0 };
        }
    }
    if let Some(which) = opts.model_image {
        let mut coef = Array1::zeros(n);
        for c in 0..p.nspec {
            for j in 0..nstep {
                let u = (core0 + c) * nwt + p.wavepad + j;
                coef[u] = match which {
                    ModelFlux::Deconvolved => x[u],
                    ModelFlux::Decorrelated => flux_all[[c, j]],
                };
            }
        }
        let img = a.dot(&coef);
        let shape = (input.window.ny(), input.window.nx());
        res.model = Some(img.into_shape_with_order(shape).ok()?);
        if opts.leverage {
            // h_i = ivar_i · Σ_{u ∈ core} a_iu (A·C)_iu.
            let ac = a.dot(&cov);
            let h = Array1::from_shape_fn(a.nrows(), |i| {
                let mut sum = 0.0;
                for c in 0..p.nspec {
                    for j in 0..nstep {
                        let u = (core0 + c) * nwt + p.wavepad + j;
                        sum += a[[i, u]] * ac[[i, u]];
                    }
                }
                ivar[i] * sum
            });
            res.leverage = Some(h.into_shape_with_order(shape).ok()?);
        }
    }
    Some(res)
}
