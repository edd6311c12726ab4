//! The GPU side of the extraction, through cudarc with dynamic loading: the binary builds and
//! runs where there is no GPU or no CUDA library, and every library is checked for before use
//! (cudarc panics on a missing one).
//!
//! One module per stage (`spots`, `normal`, `solve`, `decorrelate`, `chi2`), each with its
//! launcher and a host twin that mirrors the kernel so that its logic is tested against the CPU
//! backend on machines without a GPU; `backend` chains them into [`backend::GpuBackend`];
//! `cost` counts each stage's flops and bytes for the floor a card sets; `unit` gathers a work
//! unit's results on the device for the cuda-aware-mpi build; `choice` times the
//! library alternatives at the real sizes; `ptx` compiles the embedded kernels with NVRTC and
//! caches their machine code; `device` finds devices, binds compute ranks to them, stages
//! uploads through page-locked memory and resolves `--backend`. In the tests, `emu` runs the
//! CUDA C kernels on the CPU against their twins and `scene` is the stages' shared fixture.
//! Verified on an NVIDIA H200 (BENCHMARKS.md, "Issue 9"): the device tests, and whole frames
//! against the CPU backend and gpu_specter.

pub mod backend;
pub mod chi2;
pub mod choice;
pub mod cost;
pub mod decorrelate;
pub mod device;
pub mod normal;
pub mod ptx;
pub mod solve;
pub mod spots;
#[cfg(test)]
mod twins;
pub mod unit;

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

impl GpuError {
    /// Whether the device ran out of memory: the driver's allocation, or cuBLAS's or
    /// cuSOLVER's own workspace allocation, failed. A smaller chunk may then fit.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, GpuError::Cuda(m) if m.contains("OUT_OF_MEMORY") || m.contains("ALLOC_FAILED"))
    }
}
