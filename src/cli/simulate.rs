//! `spextract simulate`: a preproc image and its truth through a PSF, or a synthetic PSF file.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use tracing::info;

use super::extract::check_output;
use crate::io::camera_name;
use crate::io::psf::{read_psf, write_psf};
use crate::psf::synth::{synthetic_psf, SynthPsfOptions};
use crate::simulate::{write_noiseless, write_simulation, SimOptions};

/// `spextract simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// PSF to project through (omit with --make-psf).
    #[arg(short = 'p', long)]
    pub psf: Option<PathBuf>,
    /// Output preproc image.
    #[arg(short = 'i', long)]
    pub image: Option<PathBuf>,
    /// Output truth spectra.
    #[arg(short = 't', long)]
    pub truth: Option<PathBuf>,
    /// Write a synthetic PSF here instead of simulating an image.
    #[arg(long)]
    pub make_psf: Option<PathBuf>,
    /// Synthetic PSF: Legendre degree of the parameter table.
    #[arg(long, default_value_t = 3)]
    pub legdeg: usize,
    /// Synthetic PSF: number of fibers.
    #[arg(long, default_value_t = 500)]
    pub nfiber: usize,
    /// Synthetic PSF: spot half width and half height (HSIZEX, HSIZEY).
    #[arg(long, value_delimiter = ',')]
    pub hsize: Option<Vec<usize>>,
    /// Synthetic PSF: Gaussian sigma in x and y (pixels).
    #[arg(long, value_delimiter = ',')]
    pub sigma: Option<Vec<f64>>,
    /// Synthetic PSF: specter's tail term `amp,core,xscale,yscale,index` (TAILAMP, TAILCORE,
    /// TAILXSCA, TAILYSCA, TAILINDE at mid-range) [default: no tail, TAILAMP = 0].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub tail: Option<Vec<f64>>,
    /// Camera written as CAMERA (`r0`, `b3`, …) into the synthetic PSF or the simulated image,
    /// so that extract can check that they belong together [default: the PSF's camera, else
    /// r0].
    #[arg(long)]
    pub camera: Option<String>,
    /// Random seed; the same seed gives the same files.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// First lit fiber.
    #[arg(short = 's', long, default_value_t = 0)]
    pub specmin: usize,
    /// Number of lit fibers.
    #[arg(short = 'n', long, default_value_t = 25)]
    pub nspec: usize,
    /// Truth grid `wmin,wmax,dw` (padded like the extraction grid).
    #[arg(short = 'w', long, value_delimiter = ',')]
    pub wavelength: Option<Vec<f64>>,
    /// Also write the noiseless image (the simulated light before noise and defects, MODEL
    /// HDU with MODFLUX = 'truth'), to judge a model image against.
    #[arg(long)]
    pub noiseless: Option<PathBuf>,
    /// Compute IVAR from the noisy pixels, as DESI's preproc does (`1/(readnoise² +
    /// max(pix, 0))`), instead of from the noiseless image.
    #[arg(long)]
    pub ivar_from_data: bool,
    /// Replace existing files.
    #[arg(long)]
    pub overwrite: bool,
}

/// `spextract simulate`.
pub fn run(args: &SimulateArgs) -> Result<()> {
    for (name, v, n) in [
        ("--hsize", args.hsize.as_ref().map(Vec::len), 2),
        ("--sigma", args.sigma.as_ref().map(Vec::len), 2),
        ("--wavelength", args.wavelength.as_ref().map(Vec::len), 3),
        ("--tail", args.tail.as_ref().map(Vec::len), 5),
    ] {
        if v.is_some_and(|v| v != n) {
            bail!("{name} takes {n} comma-separated values");
        }
    }
    let camera = match args.camera.as_deref().map(camera_name) {
        Some(None) => bail!("--camera needs a camera name such as r0"),
        Some(Some(c)) => Some(c),
        None => None,
    };
    if let Some(path) = &args.make_psf {
        check_output(path, args.overwrite)?;
        let mut o = SynthPsfOptions {
            nfiber: args.nfiber,
            legdeg: args.legdeg,
            ..Default::default()
        };
        if let Some(h) = &args.hsize {
            o.hsizex = h[0];
            o.hsizey = h[1];
        }
        if let Some(s) = &args.sigma {
            o.sigma_x = s[0];
            o.sigma_y = s[1];
        }
        if let Some(t) = &args.tail {
            if t.iter().any(|v| !v.is_finite()) {
                bail!("--tail takes finite numbers, not {t:?}");
            }
            o.tail.copy_from_slice(t);
        }
        let mut psf = synthetic_psf(&o);
        psf.camera = Some(camera.unwrap_or_else(|| "r0".into()));
        psf.validate()?;
        write_psf(path, &psf)?;
        info!(
            "wrote synthetic PSF {} (camera {}, {} fibers, LEGDEG {})",
            path.display(),
            psf.camera.as_deref().unwrap_or("?"),
            psf.nfiber(),
            psf.legdeg
        );
        return Ok(());
    }
    let (Some(psf_path), Some(image), Some(truth)) = (&args.psf, &args.image, &args.truth) else {
        bail!("simulate needs --psf, --image and --truth (or --make-psf)");
    };
    check_output(image, args.overwrite)?;
    check_output(truth, args.overwrite)?;
    if let Some(path) = &args.noiseless {
        check_output(path, args.overwrite)?;
    }
    let psf = read_psf(psf_path)?;
    let mut o = SimOptions {
        seed: args.seed,
        specmin: args.specmin,
        nspec: args.nspec,
        ivar_from_data: args.ivar_from_data,
        ..Default::default()
    };
    if let Some(c) = camera.or_else(|| psf.camera.clone()) {
        o.camera = c;
    }
    if let Some(w) = &args.wavelength {
        o.wmin = w[0];
        o.wmax = w[1];
        o.dw = w[2];
    }
    let t = std::time::Instant::now();
    o.in_psf = psf_path.display().to_string();
    let sim = write_simulation(&psf, &o, image, truth)?;
    if let Some(path) = &args.noiseless {
        write_noiseless(path, &sim, args.overwrite)?;
    }
    info!(
        "simulated {} fibers into {} and {} in {:.2}s",
        o.nspec,
        image.display(),
        truth.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
