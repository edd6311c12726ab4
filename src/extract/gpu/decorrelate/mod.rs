//! Decorrelation on the GPU (`kernels/decorrelate.cu`): per core fiber of each patch, the
//! inverse square root of its covariance block `C_ff` by symmetric Jacobi, then `s`, `R = Q/s`,
//! the flux `R·x_f`, `fluxivar = s²` and the resolution diagonals, as `cpu::decorrelate`'s
//! `block_inverse_sqrt` and the readout of `cpu::solve` do with LAPACK's dsyevd.
//!
//! Two routes to each block's eigenpairs ([`EigenRoute`]). The backend takes cuSOLVER's
//! `XsyevBatched` on the solve's covariance slots, in place, followed by the readout kernel
//! `decorrelate_eigen` ([`decorrelate_by_syev`]): 1.9x faster than the alternative on an H200.
//! The alternative, for a cuSOLVER without `XsyevBatched` (`syevjBatched` stops at 32×32 and
//! the blocks are 74×74), is a kernel of our own, `decorrelate`: one thread block per `C_ff`,
//! the matrix and its eigenvectors in shared memory, a parallel cyclic Jacobi in the
//! round-robin ordering started from the DCT-II basis ([`dct_basis`]), which nearly
//! diagonalises these near-Toeplitz blocks (the algorithm, the thread mapping and the shared
//! memory are documented at the top of the kernel file). Both kernels end in the same readout.
//!
//! [`DecorrLayout::new`] flattens a batch's [`Block`]s into the kernels' parameter arrays; the
//! launchers and the host twins (`twins::decorrelate`: the Jacobi kernel's algorithm and the
//! readout, meant to be bit-identical to the kernels') take their inputs from it. Keep the
//! kernel, the layout and the twin in step. Imports `device`, `solve` and the crate's `patch`
//! types.
//!
//! The covariance blocks and the solutions are taken as [`CudaSlice`]s with per-block offsets
//! and leading dimension, so that the previous stage's output (e.g. the fiber blocks inside a
//! dense inverse, leading dimension `nmax`) feeds the kernel in place, without a copy.
//!
//! The stage in files: `status` ([`EigenRoute`], [`Status`]), `layout` ([`Block`],
//! [`DecorrLayout`]), `basis` ([`dct_basis`]), `batch` (the outputs: [`HostDecorr`] on the
//! host, [`DecorrBatch`] on the device) and `launcher` (the [`Kernels`], their parameter
//! structs, [`launch_config`] and the launchers). This file holds what they share (the
//! constants, the errors) and re-exports their items, so that `decorrelate::X` names each of
//! them.
//!
//! [`CudaSlice`]: cudarc::driver::CudaSlice

mod basis;
mod batch;
mod launcher;
mod layout;
mod status;

pub use basis::dct_basis;
pub use batch::{DecorrBatch, HostDecorr};
pub use launcher::{
    decorrelate, decorrelate_by_syev, decorrelate_eigen_into, decorrelate_into, launch_config,
    DecorrelateEigenParams, DecorrelateParams, Kernels,
};
pub use layout::{smem_bytes, Block, DecorrLayout};
pub use status::{EigenRoute, Status};

use super::GpuError;

/// Threads per block; must equal `DECORR_THREADS` in the kernel (its `__launch_bounds__`).
pub const THREADS: u32 = 256;
/// Jacobi sweeps allowed before a block is reported [`Status::NotConverged`]. A whole bundle of
/// the real PSF's blocks takes 6–9 (twin, random pixels with masked rows), the toy PSF's up
/// to 12; 20 leaves room for harder ones (each sweep past convergence squares the residual).
pub const MAX_SWEEPS: u32 = 20;
/// Parameters per block in the flattened `params` array.
pub(super) const NPARAM: usize = 8;

fn bad(msg: String) -> GpuError {
    GpuError::Kernel(format!("decorrelate.cu cannot take this batch: {msg}"))
}

pub(super) fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::driver(format!("decorrelation: {what}"), e)
}
