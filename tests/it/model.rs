//! The model image (`extract -m`) against the noiseless image the frame was simulated from
//! (`simulate --noiseless`), over the pixels the extracted fibers dominate (issue 16): the
//! deconvolved model reproduces the pixels, gpu_specter's decorrelated one does not.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use ndarray::Array2;
use spextract::io::frame::{read_frame, read_model_image};
use spextract::io::{read_preproc, read_psf, EXTRACT_MASK_BITS};

use crate::common::{shared_data, small_psf, SMALL_GRID};

/// Pixels brighter than this in the noiseless image (electrons) are "bright".
const BRIGHT: f64 = 200.0;
/// The model's total over the pixels: within this fraction of the noiseless image's.
const TOTAL_TOL: f64 = 0.005;
/// Bright pixels: model/truth within this of 1 at the median.
const BRIGHT_TOL: f64 = 0.02;
/// Pixel chi² of the data against the model per degree of freedom: within this of 1.
const CHI2_TOL: f64 = 0.03;

/// How a model image compares with the noiseless image (every field is printed; the
/// thresholds read some).
#[derive(Debug)]
#[allow(dead_code)]
struct Figures {
    /// Pixels compared.
    npix: usize,
    /// Model total over noiseless total.
    total: f64,
    /// Bright pixels compared.
    nbright: usize,
    /// Median of model/truth over the bright pixels.
    median: f64,
    /// Its 10th percentile.
    p10: f64,
    /// Its 90th percentile.
    p90: f64,
    /// Σ (data − model)² · ivar over the pixels, per pixel.
    chi2_pix: f64,
    /// The same per degree of freedom: pixels less the fluxes the model was fitted with
    /// (the extracted fibers' bins whose trace crosses the rows compared).
    chi2_dof: f64,
    /// The same for the noiseless image, per pixel (the noise's own level).
    chi2_truth: f64,
}

/// The figures over the unmasked, lit pixels of the rows every extracted fiber's grid covers,
/// less a margin of two spot heights at either end (where bins off the grid add light the
/// model does not hold).
fn figures(
    psf_path: &Path,
    image: &Path,
    truth: &Array2<f64>,
    model: &Array2<f64>,
    specmin: usize,
    nspec: usize,
    wave: &[f64],
) -> Figures {
    let psf = read_psf(psf_path).unwrap();
    let pre = read_preproc(image, EXTRACT_MASK_BITS).unwrap();
    let y = |f: usize, w: f64| psf.ytrace.eval(f, w);
    let (w0, w1) = (wave[0], wave[wave.len() - 1]);
    let margin = 2.0 * psf.spot_ny() as f64;
    let fibers = specmin..specmin + nspec;
    let ylo = fibers.clone().map(|f| y(f, w0)).fold(f64::MIN, f64::max) + margin;
    let yhi = fibers.clone().map(|f| y(f, w1)).fold(f64::MAX, f64::min) - margin;
    let rows = ylo.ceil() as usize..yhi.floor() as usize;
    let nfit: usize = fibers
        .map(|f| {
            wave.iter()
                .filter(|&&w| (ylo..yhi).contains(&y(f, w)))
                .count()
        })
        .sum();
    let (mut npix, mut sum_m, mut sum_t, mut chi2, mut chi2_t) = (0usize, 0.0, 0.0, 0.0, 0.0);
    let mut ratios = Vec::new();
    for r in rows {
        for c in 0..truth.ncols() {
            let (t, m, iv) = (truth[[r, c]], model[[r, c]], pre.ivar[[r, c]]);
            if iv <= 0.0 || t <= 0.0 {
                continue;
            }
            let d = pre.image[[r, c]];
            npix += 1;
            sum_m += m;
            sum_t += t;
            chi2 += (d - m) * (d - m) * iv;
            chi2_t += (d - t) * (d - t) * iv;
            if t > BRIGHT {
                ratios.push(m / t);
            }
        }
    }
    ratios.sort_by(f64::total_cmp);
    let pct = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    assert!(
        npix > nfit && !ratios.is_empty(),
        "{npix} pixels, {nfit} fluxes"
    );
    Figures {
        npix,
        total: sum_m / sum_t,
        nbright: ratios.len(),
        median: pct(0.5),
        p10: pct(0.1),
        p90: pct(0.9),
        chi2_pix: chi2 / npix as f64,
        chi2_dof: chi2 / (npix - nfit) as f64,
        chi2_truth: chi2_t / npix as f64,
    }
}

/// Command-line arguments of mixed types.
fn os(parts: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_owned()).collect()
}

/// Simulates `nspec` fibers through `psf` (with the noiseless image), extracts them with the
/// default model flux and with gpu_specter's, and returns the figures of both.
fn deconvolved_and_decorrelated(
    dir: &Path,
    psf: &Path,
    nspec: usize,
    grid: Option<&str>,
) -> (Figures, Figures) {
    let (image, truth, noiseless) = (
        dir.join("preproc.fits"),
        dir.join("truth.fits"),
        dir.join("noiseless.fits"),
    );
    let n = nspec.to_string();
    let mut args = os(&[
        &"simulate",
        &"-p",
        &psf,
        &"-i",
        &image,
        &"-t",
        &truth,
        &"--noiseless",
        &noiseless,
        &"-n",
        &n,
    ]);
    if let Some(g) = grid {
        args.extend(os(&[&"-w", &g]));
    }
    crate::common::spextract(&args).ok();
    let noiseless = read_model_image(&noiseless).unwrap();
    assert_eq!(noiseless.flux.as_deref(), Some("truth"));
    assert_eq!((noiseless.specmin, noiseless.nspec), (Some(0), Some(nspec)));

    let mut out = Vec::new();
    for (flag, name) in [
        (None, "deconvolved"),
        (Some("decorrelated"), "decorrelated"),
    ] {
        let (frame, model) = (
            dir.join(format!("frame-{name}.fits")),
            dir.join(format!("model-{name}.fits")),
        );
        let mut args = os(&[
            &"extract", &"-p", &psf, &"-i", &image, &"-o", &frame, &"-m", &model, &"-n", &n,
        ]);
        if let Some(g) = grid {
            args.extend(os(&[&"-w", &g]));
        }
        if let Some(f) = flag {
            args.extend(os(&[&"--model-flux", &f]));
        }
        crate::common::spextract(&args).ok();
        let m = read_model_image(&model).unwrap();
        assert_eq!(m.flux.as_deref(), Some(name));
        assert_eq!((m.specmin, m.nspec), (Some(0), Some(nspec)));
        let wave = read_frame(&frame).unwrap().wave;
        let fig = figures(psf, &image, &noiseless.pixels, &m.pixels, 0, nspec, &wave);
        eprintln!("{name}: {fig:?}");
        out.push(fig);
    }
    let dcv = out.remove(0);
    (dcv, out.remove(0))
}

#[track_caller]
fn assert_reproduces(f: &Figures) {
    assert!(
        (f.total - 1.0).abs() <= TOTAL_TOL,
        "model/truth total {f:?}"
    );
    assert!((f.median - 1.0).abs() <= BRIGHT_TOL, "bright median {f:?}");
    assert!((f.chi2_dof - 1.0).abs() <= CHI2_TOL, "chi2/dof {f:?}");
    // The figure the fit is judged by is the noise's own: the truth's chi² per pixel.
    assert!((f.chi2_truth - 1.0).abs() <= CHI2_TOL, "truth chi2 {f:?}");
}

#[test]
fn deconvolved_model_reproduces_the_noiseless_image_synthetic_psf() {
    let dir = tempfile::tempdir().unwrap();
    let psf = dir.path().join("psf.fits");
    spextract::io::write_psf(&psf, &small_psf()).unwrap();
    let (dcv, dec) = deconvolved_and_decorrelated(dir.path(), &psf, 25, Some(SMALL_GRID));
    assert_reproduces(&dcv);
    // gpu_specter's image is the spectra smoothed twice: its bright pixels fall short.
    assert!(dec.median < 1.0 - BRIGHT_TOL, "{dec:?}");
}

#[test]
fn deconvolved_model_reproduces_the_noiseless_image_real_psf() {
    let Some(data) = shared_data(&["psf-r0-00067784.fits"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let psf = data.join("psf-r0-00067784.fits");
    let (dcv, dec) = deconvolved_and_decorrelated(dir.path(), &psf, 50, None);
    assert_reproduces(&dcv);
    assert!(dec.median < 1.0 - BRIGHT_TOL, "{dec:?}");
    assert!(dec.chi2_dof > 1.0 + CHI2_TOL, "{dec:?}");
}
