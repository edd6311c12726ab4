//! The GPU side of the extraction, through cudarc with dynamic loading: the binary builds and
//! runs where there is no GPU or no CUDA library, and every library is checked for before use
//! (cudarc panics on a missing one).
//!
//! What exists so far (issue 4, in progress): the kernels' NVRTC compilation with an on-disk
//! PTX cache (`ptx`), device discovery and binding (`device`). The per-patch kernels and the
//! `Backend` built on them are being ported; until they are, `--backend gpu` says so and `auto`
//! uses the CPU.

pub mod backend;
pub mod chi2;
pub mod decorrelate;
pub mod device;
pub mod normal;
pub mod ptx;
pub mod solve;
pub mod spots;

/// Why the GPU cannot be used, or what went wrong on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GpuError {
    /// A CUDA library is missing or unusable.
    #[error("{0}")]
    Library(String),
    /// No usable device.
    #[error("{0}")]
    NoDevice(String),
    /// A kernel could not be found, compiled or loaded.
    #[error("{0}")]
    Kernel(String),
    /// A CUDA call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
}
