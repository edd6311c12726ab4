//! The command line: clap derive structs (flags only, each documented) and one module per
//! subcommand. Flag names follow gpu_specter's `spex`.

pub mod bench;
pub mod compare;
pub mod extract;
pub mod simulate;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// spextract: spectroperfectionism extraction of fiber-spectrograph frames.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Extract spectra from a preproc image with a PSF and write a desispec frame.
    Extract(ExtractArgs),
    /// Simulate a preproc image and its truth spectra through a PSF.
    Simulate(simulate::SimulateArgs),
    /// Judge a frame: alone, against another frame, and/or against the truth (extraction.md §8).
    Compare(compare::CompareArgs),
    /// Time the extraction of a frame at several thread counts.
    Bench(bench::BenchArgs),
}

/// Options shared by `extract` and `bench`: what to extract and how.
#[derive(Debug, Clone, Args)]
pub struct ExtractionFlags {
    /// The PSF (DESI GaussHermite, PSFVER 3).
    #[arg(short = 'p', long)]
    pub psf: PathBuf,
    /// The preproc image (IMAGE, IVAR, MASK[, FIBERMAP]); may be gzipped.
    #[arg(short = 'i', long = "image", alias = "input")]
    pub image: PathBuf,
    /// Output grid `wmin,wmax,dw` in Ångström (default: the camera's, from CAMERA).
    #[arg(short = 'w', long, value_delimiter = ',')]
    pub wavelength: Option<Vec<f64>>,
    /// First fiber to extract.
    #[arg(short = 's', long)]
    pub specmin: Option<usize>,
    /// Number of fibers to extract (default: all from specmin).
    #[arg(short = 'n', long)]
    pub nspec: Option<usize>,
    /// Configuration file (see pipeline.toml); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Worker threads (default: SLURM_CPUS_PER_TASK, else all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Tikhonov regularisation of well-constrained unknowns.
    #[arg(short = 'r', long)]
    pub regularize: Option<f64>,
    /// PSF model error for chi2pix (default: PSF header PSFERR, else 0.01).
    #[arg(long)]
    pub psferr: Option<f64>,
    /// Fibers per bundle.
    #[arg(long)]
    pub bundlesize: Option<usize>,
    /// Subbundles per bundle.
    #[arg(long)]
    pub nsubbundles: Option<usize>,
    /// Core wavelength bins per patch.
    #[arg(long)]
    pub nwavestep: Option<usize>,
    /// Wavelength padding per side, in bins (before wavepad_frac).
    #[arg(long)]
    pub wavepad: Option<usize>,
    /// Extra wavelength padding as a fraction of wavepad.
    #[arg(long)]
    pub wavepad_frac: Option<f64>,
    /// Fraction of padding rows kept around each patch's core rows.
    #[arg(long)]
    pub pixpad_frac: Option<f64>,
    /// Never show a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// `spextract extract`.
#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// Inputs and options.
    #[command(flatten)]
    pub flags: ExtractionFlags,
    /// Output frame (desispec layout), written atomically.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Also write the model image `A·flux` here.
    #[arg(short = 'm', long)]
    pub model_image: Option<PathBuf>,
    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,
}
