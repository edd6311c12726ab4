//! spextract: spectroperfectionism extraction of fiber-spectrograph CCD frames.
//!
//! Data flows `psf → io → patch → extract → pipeline → cli`; a module imports only from those to
//! its left.

pub mod cli;
pub mod config;
pub mod extract;
pub mod io;
pub mod patch;
pub mod pipeline;
pub mod psf;
pub mod simulate;

// Links the system OpenBLAS that ndarray's `blas` feature and lapack-sys call into.
use openblas_src as _;
