//! spextract: spectroperfectionism extraction of fiber-spectrograph CCD frames.
//!
//! Data flows `psf → io → patch → extract → pipeline → cli`; a module imports only from those to
//! its left.

pub mod io;
pub mod patch;
pub mod psf;
pub mod simulate;
