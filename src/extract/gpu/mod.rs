//! The GPU side of the extraction, through cudarc with dynamic loading: the binary builds and
//! runs where there is no GPU or no CUDA library, and every library is checked for before use
//! (cudarc panics on a missing one).
//!
//! One module per stage (`spots`, `normal`, `solve`, `decorrelate`, `chi2`, and `model` for
//! the model image and the leverage), each with its layout and launcher; `backend` chains them
//! into [`backend::GpuBackend`]; `unit` gathers a
//! work unit's results on the device for the cuda-aware-mpi build; `launch` holds what every
//! kernel's one parameter struct shares (and their layout check against `kernels/params.cuh`);
//! `ptx` compiles the embedded kernels with NVRTC and caches their machine code; `device` finds devices (without
//! creating contexts), opens one and stages uploads through page-locked memory; `nvml` reads
//! each device's free memory through NVML, also without a context (for `doctor`); `error`
//! is [`GpuError`]. Test-only, `twins` holds each stage's host twin (plain Rust mirroring the
//! kernel, tested against the CPU backend on machines without a GPU), the emulator that runs
//! the CUDA C kernels on the CPU against them, and the stages' tests. The cost model and the
//! library-choice timings are `spextract bench`'s (`cli::bench`). Imports `extract`'s types,
//! `extract::cpu` (the fallback), `patch` and `psf`.
//! Verified on an NVIDIA H200 (BENCHMARKS.md, "Issue 9"): the device tests, and whole frames
//! against the CPU backend and gpu_specter.

// Counts cross into CUDA here (grid sizes, kernels' `int`s): `launch::int`/`launch::dim`
// (`try_from`), never `as`.
#![deny(clippy::cast_possible_truncation)]

pub mod backend;
pub mod chi2;
pub mod decorrelate;
pub mod device;
mod error;
pub mod facts;
pub mod launch;
pub mod model;
pub mod normal;
pub mod nvml;
pub mod ptx;
pub mod solve;
pub mod spots;
#[cfg(test)]
mod twins;
pub mod unit;

pub use error::{Exhausted, GpuError};
