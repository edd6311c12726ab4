//! Decomposition of a frame into patches and their reassembly (docs/science.md §2).
//!
//! Imports only `psf`; knows nothing of files, MPI or backends.

pub mod pixels;
pub mod plan;

pub use pixels::PixelWindow;
pub use plan::{Patch, PatchOptions, Plan, WaveGrid};
