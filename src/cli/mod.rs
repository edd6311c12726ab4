//! The command line: clap derive structs (flags only, each documented) and one module per
//! subcommand. Flag names follow gpu_specter's `spex`.

pub mod bench;
pub mod compare;
pub mod doctor;
pub mod extract;
pub mod report;
pub mod select;
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
    Extract(Box<ExtractArgs>),
    /// Simulate a preproc image and its truth spectra through a PSF.
    Simulate(simulate::SimulateArgs),
    /// Judge a frame: alone, against another frame, and/or against the truth (docs/science.md §8).
    Compare(compare::CompareArgs),
    /// Time the extraction of a frame at several thread counts.
    Bench(bench::BenchArgs),
    /// Check the environment a run is about to use (MPI, threads, Slurm, GPUs, output folders).
    Doctor(doctor::DoctorArgs),
    /// Compare run reports (`extract --report`): a table and a bar chart of frames per node-hour.
    Report(report::ReportArgs),
}

/// Options shared by `extract` and `bench`: what to extract and how.
#[derive(Debug, Clone, Args)]
pub struct ExtractionFlags {
    /// The PSF (DESI GaussHermite, PSFVER 3) of a single frame.
    #[arg(short = 'p', long)]
    pub psf: Option<PathBuf>,
    /// The preproc image (IMAGE, IVAR, MASK[, FIBERMAP]) of a single frame; may be gzipped.
    #[arg(short = 'i', long = "image", alias = "input")]
    pub image: Option<PathBuf>,
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
    /// Worker threads (default: SLURM_CPUS_PER_TASK, else all cores; at most 4 per core of the
    /// node, with a warning when cut).
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
    /// Extract even when the image's CAMERA differs from the PSF's (otherwise refused).
    #[arg(long)]
    pub allow_camera_mismatch: bool,
    /// Flux the model image (-m) projects through the PSF: deconvolved (reproduces the pixels)
    /// or decorrelated (gpu_specter's image) [default: deconvolved].
    #[arg(long)]
    pub model_flux: Option<crate::extract::ModelFlux>,
    /// Extract twice, the second time with each pixel's variance from the first pass's model
    /// (read noise + max(model, 0)) instead of from the pixel: unbiased flux when IVAR was
    /// computed from the data, as DESI's preproc does. In a list, each frame goes round the
    /// pipeline twice.
    #[arg(long)]
    pub ivar_from_model: bool,
}

/// `spextract extract`.
#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// Inputs and options.
    #[command(flatten)]
    pub flags: ExtractionFlags,
    /// Output frame of a single frame (desispec layout), written atomically.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// Many frames: a list file, a desispec night/exposure/camera pattern, or `[[frames]]` in
    /// the configuration.
    #[command(flatten)]
    pub select: select::FrameSelection,
    /// Also write the model image `A·flux` here (single frame only).
    #[arg(short = 'm', long)]
    pub model_image: Option<PathBuf>,
    /// Replace existing output files. Without it a single frame refuses an existing output,
    /// and a list skips each output that is a frame of the same request (fibers, grid, options,
    /// unchanged inputs) and refuses to start if any other file is at an output.
    #[arg(long)]
    pub overwrite: bool,
    /// Pipeline layout and reporting.
    #[command(flatten)]
    pub run: RunFlags,
}

/// How a many-frame run is laid out over ranks and threads, and what it reports.
#[derive(Debug, Clone, Default, Args)]
pub struct RunFlags {
    /// Which backend computes: auto (a GPU when one works, else the CPU), cpu or gpu.
    #[arg(long)]
    pub backend: Option<crate::extract::engine::BackendKind>,
    /// Reader ranks per node (group), each prefetching and cutting frames.
    #[arg(long)]
    pub readers_per_node: Option<usize>,
    /// Writer ranks per node (group).
    #[arg(long)]
    pub writers_per_node: Option<usize>,
    /// Frames each reader holds in memory ahead of the compute ranks (at most 16, with a
    /// warning when cut).
    #[arg(long)]
    pub prefetch: Option<usize>,
    /// Bundles per work unit handed to a compute rank.
    #[arg(long)]
    pub unit_bundles: Option<usize>,
    /// Compute ranks sharing one GPU (more than 1 only under NVIDIA MPS).
    #[arg(long)]
    pub ranks_per_gpu: Option<usize>,
    /// Seconds without progress after which the watchdog reports who waits on what.
    #[arg(long)]
    pub watchdog: Option<f64>,
    /// Write the run summary as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Label of this run in reports (default `<backend> x<nodes>`).
    #[arg(long)]
    pub label: Option<String>,
    /// Write one log per rank into this folder (rank-NNNN.log).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
}
