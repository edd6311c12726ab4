//! Integration tests: the real `spextract` binary on real and simulated data, plus the library's
//! comparison functions.
//!
//! - `real_data`: parity with gpu_specter and truth recovery through the real DESI PSF (skipped,
//!   with a message, when `../shared/data` is absent).
//! - `synthetic`: truth recovery through synthetic PSFs of several shapes and fiber subsets.
//! - `structure`: determinism across thread counts, ivar and NODATA, the resolution band.
//! - `format`: the frame's HDUs, dtypes and shapes, also as Python's fitsio and astropy see them.
//! - `cli`: bad inputs fail with exit code 2, a message naming the problem and no output file.
//! - `checks`: what is refused or limited before any work (cameras, endless lists and
//!   configurations, absurd counts), and causes said once.
//! - `outputs`: reruns, clashes, races, leftovers and full disks never lose or replace data.
//! - `corrupt`: corrupt FIBERMAPs, gzip streams and headers are refused before any work.
//! - `ivar_model`: `--ivar-from-model` on IVAR from the data, from a model, with a missed cosmic,
//!   and in lists (one process, mpirun, a SIGTERM between the passes).
//! - `model`: the model image against the noiseless simulated image, both flux choices.
//! - `fuzz`: seeded mutations of the inputs never panic, hang or give an unreadable frame.
//!
//! One binary (`autotests = false` in Cargo.toml) so that the suite links once.

#[macro_use]
mod common;

mod checks;
mod cli;
mod corrupt;
mod format;
mod fuzz;
mod ivar_model;
mod model;
mod outputs;
mod pipeline;
mod real_data;
mod structure;
mod synthetic;
