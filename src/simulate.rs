//! Simulated preproc images with known true spectra, for tests and benchmarks.
//!
//! Spectra are electrons per bin on a regular truth grid; each (fiber, bin) adds `phot · spot` at
//! the spot's corner (the single-bin model extraction assumes, so the extraction is exact up to
//! noise), then Poisson and read noise, cosmic rays and bad pixels are added. Uses `psf` for spots
//! and `io` for files; never names fitsio. Deterministic for a seed (ChaCha8).

use std::path::Path;

use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Poisson};

use crate::io::{
    write_model_image, write_preproc, write_truth, Fibermap, IoError, ModelImage, Truth,
};
use crate::psf::spots::SpotEvaluator;
use crate::psf::{Psf, PsfError};

/// desispec ccdmask BAD.
const MASK_BAD: i16 = 1;
/// desispec ccdmask COSMIC.
const MASK_COSMIC: i16 = 16;

/// What to simulate. [`Default`] mirrors `truth-r0-b00.fits`: bundle 0 of an r camera.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// Random seed; the same seed gives the same image, bit for bit.
    pub seed: u64,
    /// First lit fiber (index into the PSF's fibers).
    pub specmin: usize,
    /// Number of lit fibers; all others stay dark.
    pub nspec: usize,
    /// Start of the extraction grid the truth is made for (Å; header W0).
    pub wmin: f64,
    /// End of that grid (Å).
    pub wmax: f64,
    /// Truth grid step (Å).
    pub dw: f64,
    /// Truth bins below `wmin` (12: gpu_specter's default padding).
    pub pad_lo: usize,
    /// Truth bins above the last grid point (12 + 50: padding plus a last partial patch).
    pub pad_hi: usize,
    /// Read noise (electrons rms).
    pub readnoise: f64,
    /// Lit fibers (PSF indices) that get no light at all.
    pub dead_fibers: Vec<usize>,
    /// Every `sky_every`-th fiber is a sky fiber: sky only (0: none).
    pub sky_every: usize,
    /// Mean object continuum (electrons per bin).
    pub continuum: f64,
    /// Fractional change of the continuum from the middle to either end of the grid.
    pub continuum_slope: f64,
    /// Sky continuum in every live fiber (electrons per bin).
    pub sky_continuum: f64,
    /// Sky lines, shared by all live fibers.
    pub n_sky_lines: usize,
    /// Brightest sky line (electrons in the line).
    pub sky_line_flux: f64,
    /// Emission lines per object fiber.
    pub n_emission_lines: usize,
    /// Brightest emission line (electrons in the line).
    pub emission_line_flux: f64,
    /// Gaussian sigma of all lines (Å).
    pub line_sigma: f64,
    /// Cosmic-ray tracks (masked COSMIC, ivar 0).
    pub n_cosmics: usize,
    /// Short bad column segments (masked BAD, ivar 0).
    pub n_bad_columns: usize,
    /// Single bad pixels (masked BAD, ivar 0).
    pub n_bad_pixels: usize,
    /// Header CAMERA.
    pub camera: String,
    /// Header EXPID.
    pub expid: i64,
    /// Header NIGHT.
    pub night: i64,
    /// Header IN_PSF: the PSF file the image was made with.
    pub in_psf: String,
    /// IVAR as DESI's preproc computes it, from the noisy pixel: `1/(readnoise² + max(pix,
    /// 0))`; otherwise from the noiseless model, `1/(readnoise² + max(model, 0))`.
    pub ivar_from_data: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 1,
            specmin: 0,
            nspec: 25,
            wmin: 5760.0,
            wmax: 7620.0,
            dw: 0.8,
            pad_lo: 12,
            pad_hi: 62,
            readnoise: 3.0,
            dead_fibers: Vec::new(),
            sky_every: 10,
            continuum: 100.0,
            continuum_slope: 0.5,
            sky_continuum: 20.0,
            n_sky_lines: 40,
            sky_line_flux: 5000.0,
            n_emission_lines: 3,
            emission_line_flux: 3000.0,
            line_sigma: 0.5,
            n_cosmics: 20,
            n_bad_columns: 2,
            n_bad_pixels: 10,
            camera: "r0".into(),
            expid: 1,
            night: 20200101,
            in_psf: String::new(),
            ivar_from_data: false,
        }
    }
}

/// Why a simulation failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The options do not fit the PSF or each other.
    #[error("simulation options: {0}")]
    Options(String),
    /// The PSF cannot give spots.
    #[error(transparent)]
    Psf(#[from] PsfError),
    /// Writing the files failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// A simulated exposure: the preproc planes as written, the noiseless model and the truth.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// Noisy image (electrons), `[npix_y, npix_x]`; 0 outside the columns near lit fibers.
    pub image: Array2<f32>,
    /// `1/(model + readnoise²)` from the noiseless model (or from the noisy pixel with
    /// `ivar_from_data`); 0 where masked or far from lit fibers.
    pub ivar: Array2<f32>,
    /// desispec ccdmask bits (COSMIC 16, BAD 1).
    pub mask: Array2<i16>,
    /// Noiseless model image.
    pub model: Array2<f64>,
    /// IMAGE header cards: key and FITS value text.
    pub header: Vec<(String, String)>,
    /// One row per PSF fiber.
    pub fibermap: Fibermap,
    /// The lit fibers' true spectra.
    pub truth: Truth,
}

impl Simulation {
    /// Writes the exposure as a preproc image at `path`, with its FIBERMAP when
    /// `with_fibermap`, MASK tile-compressed when `compress_mask`.
    pub fn write_preproc(
        &self,
        path: &Path,
        with_fibermap: bool,
        compress_mask: bool,
    ) -> Result<(), IoError> {
        write_preproc(
            path,
            &self.image,
            &self.ivar,
            &self.mask,
            &self.header,
            with_fibermap.then_some(&self.fibermap),
            compress_mask,
        )
    }
}

/// The truth grid: `pad_lo` bins below `wmin`, the extraction grid
/// (`numpy.arange(wmin, wmax + dw/2, dw)`), and `pad_hi` bins beyond its last point.
pub fn truth_grid(opts: &SimOptions) -> Vec<f64> {
    let ncore = ((opts.wmax + opts.dw / 2.0 - opts.wmin) / opts.dw)
        .ceil()
        .max(0.0) as usize;
    let n = opts.pad_lo + ncore + opts.pad_hi;
    (0..n)
        .map(|i| opts.wmin + (i as f64 - opts.pad_lo as f64) * opts.dw)
        .collect()
}

/// Most truth bins accepted (DESI: about 2900 per camera).
const MAX_BINS: usize = 1_000_000;

/// Checks the options against the PSF before anything is allocated from them.
fn check(psf: &Psf, opts: &SimOptions) -> Result<(), SimError> {
    let bad = |m: String| Err(SimError::Options(m));
    if opts.nspec == 0 || opts.specmin + opts.nspec > psf.nfiber() {
        return bad(format!(
            "fibers {}..{} are not inside the PSF's {} fibers",
            opts.specmin,
            opts.specmin + opts.nspec,
            psf.nfiber()
        ));
    }
    if !(opts.dw.is_finite() && opts.dw > 0.0 && opts.wmin.is_finite() && opts.wmax >= opts.wmin) {
        return bad(format!(
            "grid {}..{} step {} is empty",
            opts.wmin, opts.wmax, opts.dw
        ));
    }
    let nbins = (opts.wmax + opts.dw / 2.0 - opts.wmin) / opts.dw
        + (opts.pad_lo as f64 + opts.pad_hi as f64);
    if nbins > MAX_BINS as f64 {
        return bad(format!(
            "the truth grid would have {nbins:.0} bins (at most {MAX_BINS})"
        ));
    }
    let (lo, hi) = psf.wave_range();
    let ncore = ((opts.wmax + opts.dw / 2.0 - opts.wmin) / opts.dw).ceil();
    let first = opts.wmin - opts.pad_lo as f64 * opts.dw;
    let last = opts.wmin + (ncore - 1.0 + opts.pad_hi as f64) * opts.dw;
    if first < lo || last > hi {
        return bad(format!(
            "truth grid {first}..{last} Å leaves the PSF range {lo}..{hi} Å"
        ));
    }
    let nonneg = [
        opts.readnoise,
        opts.continuum,
        opts.sky_continuum,
        opts.sky_line_flux,
        opts.emission_line_flux,
    ];
    if nonneg.iter().any(|v| !(v.is_finite() && *v >= 0.0))
        || !(opts.line_sigma.is_finite() && opts.line_sigma > 0.0)
    {
        return bad("fluxes and read noise must be finite and ≥ 0, line_sigma > 0".into());
    }
    Ok(())
}

/// Adds a Gaussian line of `flux` electrons centred at `centre` to `spec`, bin-integrated.
fn add_line(spec: &mut [f64], wave: &[f64], dw: f64, centre: f64, flux: f64, sigma: f64) {
    let cdf = |w: f64| 0.5 * (1.0 + libm::erf((w - centre) / (sigma * std::f64::consts::SQRT_2)));
    for (s, &w) in spec.iter_mut().zip(wave) {
        if (w - centre).abs() <= 8.0 * sigma + dw {
            *s += flux * (cdf(w + 0.5 * dw) - cdf(w - 0.5 * dw));
        }
    }
}

/// True spectra (electrons per bin) of the lit fibers.
fn spectra(opts: &SimOptions, wave: &[f64], rng: &mut ChaCha8Rng) -> Array2<f64> {
    let (w0, w1) = (wave[0], wave[wave.len() - 1]);
    let span = (w1 - w0).max(opts.dw);
    let mut sky = vec![opts.sky_continuum; wave.len()];
    for _ in 0..opts.n_sky_lines {
        let c = rng.gen_range(w0..=w1);
        let f = opts.sky_line_flux * 10f64.powf(rng.gen_range(-1.0..=0.0));
        add_line(&mut sky, wave, opts.dw, c, f, opts.line_sigma);
    }
    let mut phot = Array2::zeros((opts.nspec, wave.len()));
    for (i, mut row) in phot.rows_mut().into_iter().enumerate() {
        let fiber = opts.specmin + i;
        // Draw every fiber's numbers even when unused, so one fiber's options do not shift the
        // random stream of the others.
        let level = opts.continuum * rng.gen_range(0.3..1.5);
        let phase = rng.gen_range(0.0..std::f64::consts::TAU);
        let lines: Vec<(f64, f64)> = (0..opts.n_emission_lines)
            .map(|_| {
                let f = opts.emission_line_flux * rng.gen_range(0.1..=1.0);
                (rng.gen_range(w0..=w1), f)
            })
            .collect();
        if opts.dead_fibers.contains(&fiber) {
            continue;
        }
        let mut spec = sky.clone();
        let is_sky = opts.sky_every > 0 && fiber % opts.sky_every == opts.sky_every - 1;
        if !is_sky {
            for (s, &w) in spec.iter_mut().zip(wave) {
                let u = 2.0 * (w - w0) / span - 1.0;
                let shape = 1.0 + opts.continuum_slope * u + 0.1 * (w / 150.0 + phase).sin();
                *s += level * shape.max(0.0);
            }
            for (c, f) in lines {
                add_line(&mut spec, wave, opts.dw, c, f, opts.line_sigma);
            }
        }
        row.assign(&ndarray::ArrayView1::from(&spec));
    }
    phot
}

/// Projects the spectra through the PSF; returns the model and the column band it touches.
fn project(
    psf: &Psf,
    opts: &SimOptions,
    wave: &[f64],
    phot: &Array2<f64>,
) -> Result<(Array2<f64>, usize, usize), SimError> {
    let index = psf.gh_index()?;
    let mut ev = SpotEvaluator::new(psf, &index);
    let (ny, nx) = (psf.spot_ny(), psf.spot_nx());
    let (npy, npx) = (psf.npix_y as i64, psf.npix_x as i64);
    let mut model = Array2::zeros((psf.npix_y, psf.npix_x));
    let mut spot = vec![0.0; ny * nx];
    let (mut xlo, mut xhi) = (i64::MAX, i64::MIN);
    for (i, row) in phot.rows().into_iter().enumerate() {
        for (&w, &p) in wave.iter().zip(row.iter()) {
            let (_, _, xc, yc) = ev.spot(opts.specmin + i, w, &mut spot);
            xlo = xlo.min(xc);
            xhi = xhi.max(xc + nx as i64);
            if p == 0.0 {
                continue;
            }
            for iy in 0..ny {
                let y = yc + iy as i64;
                if !(0..npy).contains(&y) {
                    continue;
                }
                for ix in 0..nx {
                    let x = xc + ix as i64;
                    if (0..npx).contains(&x) {
                        model[(y as usize, x as usize)] += p * spot[iy * nx + ix];
                    }
                }
            }
        }
    }
    // A spot's width of margin keeps the pixels extraction may look at beside the outer fibers.
    let x0 = (xlo - nx as i64).clamp(0, npx) as usize;
    let x1 = (xhi + nx as i64).clamp(0, npx) as usize;
    Ok((model, x0, x1))
}

/// Simulates an exposure of the fibers `opts.specmin .. + nspec` through `psf`.
pub fn simulate(psf: &Psf, opts: &SimOptions) -> Result<Simulation, SimError> {
    check(psf, opts)?;
    let wave = truth_grid(opts);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let phot = spectra(opts, &wave, &mut rng);
    let (model, x0, x1) = project(psf, opts, &wave, &phot)?;

    let shape = model.dim();
    let mut image = Array2::<f32>::zeros(shape);
    let mut ivar = Array2::<f32>::zeros(shape);
    let mut mask = Array2::<i16>::zeros(shape);
    let rn2 = opts.readnoise * opts.readnoise;
    let read = Normal::new(0.0, opts.readnoise).map_err(|e| SimError::Options(e.to_string()))?;
    for y in 0..shape.0 {
        for x in x0..x1 {
            let m = model[(y, x)];
            let counts = match Poisson::new(m) {
                Ok(p) => p.sample(&mut rng),
                Err(_) => 0.0, // m ≤ 0: no photons
            };
            let pix = (counts + read.sample(&mut rng)) as f32;
            image[(y, x)] = pix;
            let light = if opts.ivar_from_data { pix as f64 } else { m };
            let var = light.max(0.0) + rn2;
            ivar[(y, x)] = if var > 0.0 { (1.0 / var) as f32 } else { 0.0 };
        }
    }
    if x1 > x0 {
        add_defects(opts, &mut rng, (x0, x1), &mut image, &mut ivar, &mut mask);
    }

    let fibermap = Fibermap {
        fiber: (0..psf.nfiber())
            .map(|i| (psf.fibermin + i) as i32)
            .collect(),
        targetid: (0..psf.nfiber())
            .map(|i| 1_000_000 + (psf.fibermin + i) as i64)
            .collect(),
        objtype: (0..psf.nfiber())
            .map(|i| {
                let sky = opts.sky_every > 0 && i % opts.sky_every == opts.sky_every - 1;
                if sky { "SKY" } else { "TGT" }.to_string()
            })
            .collect(),
        fiberstatus: vec![0; psf.nfiber()],
    };
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let header = vec![
        ("CAMERA", quote(&opts.camera)),
        ("EXPID", opts.expid.to_string()),
        ("NIGHT", opts.night.to_string()),
        ("FLAVOR", quote("science")),
        ("BUNIT", quote("electron")),
        ("RDNOISE", format!("{:?}", opts.readnoise)),
        ("SIMULATD", "T".to_string()),
        ("SIMSEED", opts.seed.to_string()),
        ("IN_PSF", quote(&opts.in_psf)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let truth = Truth {
        flux: &phot / opts.dw,
        phot,
        wave,
        specmin: opts.specmin,
        w0: opts.wmin,
    };
    Ok(Simulation {
        image,
        ivar,
        mask,
        model,
        header,
        fibermap,
        truth,
    })
}

/// Cosmic-ray tracks and bad pixels inside the columns `band`.
fn add_defects(
    opts: &SimOptions,
    rng: &mut ChaCha8Rng,
    band: (usize, usize),
    image: &mut Array2<f32>,
    ivar: &mut Array2<f32>,
    mask: &mut Array2<i16>,
) {
    let ny = image.nrows();
    let mut hit = |y: usize, x: usize, bits: i16, charge: f32| {
        mask[(y, x)] |= bits;
        ivar[(y, x)] = 0.0;
        image[(y, x)] += charge;
    };
    for _ in 0..opts.n_cosmics {
        let (mut y, mut x) = (
            rng.gen_range(0..ny) as f64,
            rng.gen_range(band.0..band.1) as f64,
        );
        let angle: f64 = rng.gen_range(0.0..std::f64::consts::TAU);
        let len = rng.gen_range(3..16);
        let charge = rng.gen_range(200.0..2000.0);
        for _ in 0..len {
            let (iy, ix) = (y.round() as i64, x.round() as i64);
            if iy >= 0 && (iy as usize) < ny && ix >= band.0 as i64 && (ix as usize) < band.1 {
                hit(iy as usize, ix as usize, MASK_COSMIC, charge);
            }
            y += angle.sin();
            x += angle.cos();
        }
    }
    for _ in 0..opts.n_bad_columns {
        let x = rng.gen_range(band.0..band.1);
        let len = rng.gen_range(50..300).min(ny);
        let y0 = rng.gen_range(0..=ny - len);
        for y in y0..y0 + len {
            hit(y, x, MASK_BAD, 500.0);
        }
    }
    for _ in 0..opts.n_bad_pixels {
        let (y, x) = (rng.gen_range(0..ny), rng.gen_range(band.0..band.1));
        hit(y, x, MASK_BAD, 1000.0);
    }
}

/// Simulates and writes the preproc image (MASK tile-compressed, FIBERMAP of every PSF fiber)
/// and the truth file; returns the simulation.
pub fn write_simulation(
    psf: &Psf,
    opts: &SimOptions,
    image_path: &Path,
    truth_path: &Path,
) -> Result<Simulation, SimError> {
    let sim = simulate(psf, opts)?;
    sim.write_preproc(image_path, true, true)?;
    write_truth(truth_path, &sim.truth)?;
    Ok(sim)
}

/// Writes the noiseless image of `sim` as a model image (MODFLUX 'truth', the lit fibers, the
/// truth grid), to judge an extraction's model image against.
pub fn write_noiseless(path: &Path, sim: &Simulation, overwrite: bool) -> Result<(), IoError> {
    let image = ModelImage {
        pixels: &sim.model,
        flux: "truth",
        specmin: sim.truth.specmin,
        nspec: sim.truth.phot.nrows(),
        wave: &sim.truth.wave,
    };
    write_model_image(path, &image, overwrite)
}

#[cfg(test)]
#[path = "simulate_tests.rs"]
mod tests;
