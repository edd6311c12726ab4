//! Synthetic Gauss–Hermite PSFs shaped like a DESI r camera, for tests and simulations.
//!
//! Pure and deterministic: the same options give the same PSF, bit for bit. No file I/O here
//! (`io::psf::write_psf` writes the result).

use ndarray::Array2;

use super::tail::TAIL_PARAMS;
use super::{LegendreSet, Psf, PsfParam};

/// What a synthetic PSF looks like. [`Default`] is close to DESI's r camera (docs/science.md §3).
#[derive(Debug, Clone, PartialEq)]
pub struct SynthPsfOptions {
    /// Number of fibers.
    pub nfiber: usize,
    /// Fibers per bundle; bundles are separated by `bundle_gap`.
    pub bundle_size: usize,
    /// First fiber number (header FIBERMIN).
    pub fibermin: usize,
    /// Legendre degree of the parameter table; every degree up to it gets a nonzero term.
    pub legdeg: usize,
    /// Number of Legendre coefficients of the traces (DESI: 7).
    pub trace_ncoef: usize,
    /// Spot half width (columns).
    pub hsizex: usize,
    /// Spot half height (rows).
    pub hsizey: usize,
    /// Hermite degree along x.
    pub ghdegx: usize,
    /// Hermite degree along y.
    pub ghdegy: usize,
    /// Size of the GH-i-j terms other than GH-0-0 (which is 1).
    pub gh_amplitude: f64,
    /// GHSIGX at the middle of the wavelength range, in pixels.
    pub sigma_x: f64,
    /// GHSIGY at the middle of the wavelength range, in pixels.
    pub sigma_y: f64,
    /// Fractional change of both sigmas from the middle to either end of the range.
    pub sigma_slope: f64,
    /// Lower end of the trace wavelength range (Å).
    pub wavemin: f64,
    /// Upper end of the trace wavelength range (Å).
    pub wavemax: f64,
    /// How far the parameter table's WAVEMAX exceeds the traces' (the real r0 file: 1 Å), so
    /// that readers must use each HDU's own range.
    pub param_wavemax_extra: f64,
    /// CCD width in pixels.
    pub npix_x: usize,
    /// CCD height in pixels.
    pub npix_y: usize,
    /// Column distance between neighbouring fibers of a bundle.
    pub fiber_spacing: f64,
    /// Extra columns between the last fiber of a bundle and the first of the next.
    pub bundle_gap: f64,
    /// Column of fiber 0 at the middle of the range.
    pub first_fiber_x: f64,
    /// Mean dispersion in rows per Å; the traces are centred on the CCD rows.
    pub y_per_angstrom: f64,
    /// Rows by which the outermost fibers trail the central one (spectrograph smile).
    pub smile: f64,
    /// Columns by which the outermost fibers' traces bow over the wavelength range.
    pub bow: f64,
    /// Header PSFERR to record, if any.
    pub psferr: Option<f64>,
    /// specter's tail term at the middle of the range, in `psf::tail::TAIL_PARAMS` order
    /// (TAILAMP, TAILCORE, TAILXSCA, TAILYSCA, TAILINDE); each non-zero one varies a little
    /// with fiber and wavelength. All zero (the default, as in DESI's public PSFs): no tails.
    pub tail: [f64; 5],
}

impl Default for SynthPsfOptions {
    fn default() -> Self {
        SynthPsfOptions {
            nfiber: 500,
            bundle_size: 25,
            fibermin: 0,
            legdeg: 3,
            trace_ncoef: 7,
            hsizex: 8,
            hsizey: 5,
            ghdegx: 6,
            ghdegy: 6,
            gh_amplitude: 0.01,
            sigma_x: 1.05,
            sigma_y: 1.10,
            sigma_slope: 0.05,
            wavemin: 5550.0,
            wavemax: 7830.0,
            param_wavemax_extra: 1.0,
            npix_x: 4114,
            npix_y: 4128,
            fiber_spacing: 7.26,
            bundle_gap: 12.0,
            first_fiber_x: 121.0,
            y_per_angstrom: 1.81,
            smile: 100.0,
            bow: 3.0,
            psferr: None,
            tail: [0.0; 5],
        }
    }
}

/// Builds the PSF the options describe.
///
/// Traces: x is the fiber's column plus a bow growing toward the CCD edges; y runs over the CCD
/// rows with dispersion increasing to the red, plus smile; both carry small terms in every trace
/// degree. Parameters: GHSIGX/Y vary with wavelength and fiber; GH-0-0 = 1 and the other GH-i-j
/// are small and smooth; TAILAMP…CONT follow (zero, except the tail's as asked and BUNDLE =
/// bundle number), in specex's row order. The result is not validated: call [`Psf::validate`]
/// on options you did not check.
pub fn synthetic_psf(opts: &SynthPsfOptions) -> Psf {
    let nf = opts.nfiber;
    let bundle = opts.bundle_size.max(1);
    let x_of = |f: usize| {
        opts.first_fiber_x + f as f64 * opts.fiber_spacing + (f / bundle) as f64 * opts.bundle_gap
    };
    let xmid = 0.5 * (x_of(0) + x_of(nf.saturating_sub(1)));
    let halfwidth = (xmid - x_of(0)).max(1.0);
    // r ∈ [-1, 1]: where the fiber sits across the slit.
    let r_of = |f: usize| (x_of(f) - xmid) / halfwidth;

    let nt = opts.trace_ncoef.max(1);
    let mut xc = Array2::zeros((nf, nt));
    let mut yc = Array2::zeros((nf, nt));
    let half_span = 0.5 * opts.y_per_angstrom * (opts.wavemax - opts.wavemin);
    let p2 = 0.025 * half_span;
    for f in 0..nf {
        let r = r_of(f);
        let smile = opts.smile * (r * r - 1.0 / 3.0);
        let mut xs = vec![x_of(f), -0.5 * opts.bow * r, opts.bow * r];
        let mut ys = vec![0.5 * opts.npix_y as f64 - p2 + smile, half_span, p2];
        for k in 3..nt {
            xs.push(0.05 * r / k as f64);
            ys.push((0.3 + 0.1 * r) / k as f64);
        }
        for k in 0..nt {
            xc[(f, k)] = xs[k];
            yc[(f, k)] = ys[k];
        }
    }
    let trace = |coeff| LegendreSet {
        wavemin: opts.wavemin,
        wavemax: opts.wavemax,
        coeff,
    };

    let nc = opts.legdeg + 1;
    let pmax = opts.wavemax + opts.param_wavemax_extra;
    let param = |name: String, value: &dyn Fn(usize, usize) -> f64| {
        let coeff = Array2::from_shape_fn((nf, nc), |(f, k)| value(f, k));
        PsfParam {
            name,
            series: LegendreSet {
                wavemin: opts.wavemin,
                wavemax: pmax,
                coeff,
            },
        }
    };
    let sigma = |s0: f64| {
        move |f: usize, k: usize| {
            let r = r_of(f);
            match k {
                0 => s0 * (1.0 + 0.02 * r * r),
                1 => s0 * opts.sigma_slope,
                _ => s0 * 0.002 * if k.is_multiple_of(2) { 1.0 } else { -1.0 } / k as f64,
            }
        }
    };
    let mut params = vec![
        param("GHSIGX".into(), &sigma(opts.sigma_x)),
        param("GHSIGY".into(), &sigma(opts.sigma_y)),
    ];
    for j in 0..=opts.ghdegy {
        for i in 0..=opts.ghdegx {
            let amp = opts.gh_amplitude;
            let gh = move |f: usize, k: usize| {
                if i == 0 && j == 0 {
                    return if k == 0 { 1.0 } else { 0.0 };
                }
                let phase = 1.3 * i as f64 + 2.1 * j as f64 + 0.5 + 0.002 * f as f64;
                let base = amp * phase.sin() / (1 + i + j) as f64;
                match k {
                    0 => base,
                    _ => 0.3 * base / k as f64,
                }
            };
            params.push(param(format!("GH-{i}-{j}"), &gh));
        }
    }
    for (name, v) in TAIL_PARAMS.into_iter().zip(opts.tail) {
        params.push(param(name.into(), &|f, k| match k {
            0 => v * (1.0 + 0.01 * r_of(f)),
            1 => 0.05 * v,
            _ => 0.0,
        }));
    }
    params.push(param("BUNDLE".into(), &|f, k| {
        if k == 0 {
            ((opts.fibermin + f) / bundle) as f64
        } else {
            0.0
        }
    }));
    for name in ["STATUS", "CONT"] {
        params.push(param(name.into(), &|_, _| 0.0));
    }

    Psf {
        npix_x: opts.npix_x,
        npix_y: opts.npix_y,
        hsizex: opts.hsizex,
        hsizey: opts.hsizey,
        ghdegx: opts.ghdegx,
        ghdegy: opts.ghdegy,
        legdeg: opts.legdeg,
        fibermin: opts.fibermin,
        fiber0: 0,
        xtrace: trace(xc),
        ytrace: trace(yc),
        params,
        psferr: opts.psferr,
        in_psf: None,
        camera: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::psf::spots::SpotEvaluator;

    #[test]
    fn default_looks_like_an_r_camera() {
        let psf = synthetic_psf(&SynthPsfOptions::default());
        psf.validate().unwrap();
        assert_eq!(psf.nfiber(), 500);
        assert_eq!(psf.params.len(), 2 + 49 + 8);
        // Traces cover the CCD rows over the range, fibers sit left to right inside the CCD.
        let y0 = psf.ytrace.eval(250, psf.ytrace.wavemin);
        let y1 = psf.ytrace.eval(250, psf.ytrace.wavemax);
        assert!(
            (-60.0..40.0).contains(&y0) && (4090.0..4200.0).contains(&y1),
            "{y0} {y1}"
        );
        let xs: Vec<f64> = (0..500).map(|f| psf.xtrace.eval(f, 6500.0)).collect();
        assert!(xs.windows(2).all(|w| w[1] - w[0] > 7.0));
        assert!(xs[0] > 100.0 && xs[499] < 4114.0 - 100.0);
        // Bundle gap between fibers 24 and 25.
        assert!(xs[25] - xs[24] > 15.0);
    }

    #[test]
    fn every_legendre_degree_is_used_and_spots_are_normalised() {
        for legdeg in [0, 1, 3, 5] {
            let psf = synthetic_psf(&SynthPsfOptions {
                legdeg,
                nfiber: 30,
                ..Default::default()
            });
            psf.validate().unwrap();
            let sig = &psf.param("GHSIGX").unwrap().series.coeff;
            assert_eq!(sig.ncols(), legdeg + 1);
            assert!(sig.row(3).iter().all(|&c| c != 0.0));
            let index = psf.gh_index().unwrap();
            let mut ev = SpotEvaluator::new(&psf, &index);
            let mut out = vec![0.0; psf.spot_nx() * psf.spot_ny()];
            for wave in [5600.0, 6700.0, 7800.0] {
                ev.spot(12, wave, &mut out);
                let sum: f64 = out.iter().sum();
                assert!((sum - 1.0).abs() < 1e-12);
                // The spot peaks near its centre pixel.
                let imax = out
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .unwrap()
                    .0;
                let (iy, ix) = (imax / psf.spot_nx(), imax % psf.spot_nx());
                assert!(iy.abs_diff(psf.hsizey) <= 1 && ix.abs_diff(psf.hsizex) <= 1);
            }
        }
    }

    #[test]
    fn deterministic() {
        let o = SynthPsfOptions::default();
        assert_eq!(synthetic_psf(&o), synthetic_psf(&o));
    }
}
