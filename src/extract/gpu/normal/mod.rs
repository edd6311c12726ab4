//! Dense normal equations of a batch of patches on the GPU (`kernels/normal.cu`), for cuSOLVER's
//! batched Cholesky: per patch a dense, column-major, fiber-major (`u = f·nwavetot + w`)
//! `AᵀWA` with the regularisation on its diagonal, `AᵀWp` and `AᵀW1`, kept on the device.
//!
//! [`BatchLayout`] flattens a batch into the kernels' input arrays (a work unit's resident
//! pixels and spots included); [`UploadedLayout`] puts it on the device and [`build_into`]
//! launches the kernels. The host twin that mirrors them is `twins::normal`. Imports `device`
//! and the crate's `extract` and `psf` types.
//!
//! Layout of the outputs, `nmax` the largest unknown count of the batch: patch `b`'s
//! `(AᵀWA)[v, u]` is `ata[(b·nmax + u)·nmax + v]` (both triangles, exactly symmetric), and
//! `atp[b·nmax + u]`, `atw1[b·nmax + u]` its vectors. potrfBatched needs one size for the whole
//! batch, so a patch with fewer unknowns (a bundle-edge subbundle: 6 fibers instead of 7) is
//! padded with identity columns and zero right-hand sides, which decouple exactly and solve
//! to 0.
//!
//! The stage in files: `layout` ([`BatchLayout`]), `resident` (what a layout may index on
//! the device, known by its token: [`Resident`], [`ResidentSpots`], [`place_in`]),
//! `buffers` (the device side: [`DenseBatch`], [`DevicePixels`], [`OnDevice`],
//! [`LayoutBuffers`], [`UploadedLayout`]) and `launcher` (the kernels' parameter structs,
//! launch configs and [`build_into`]). This file holds what they share (the errors) and
//! re-exports their items, so that `normal::X` names each of them.

mod buffers;
mod launcher;
mod layout;
mod resident;

pub use buffers::{DenseBatch, DevicePixels, LayoutBuffers, OnDevice, UploadedLayout};
pub use launcher::{
    build_into, dense_config, regularize_config, Kernels, NormalDenseParams,
    NormalRegularizeParams, DENSE_THREADS, REG_THREADS,
};
pub use layout::BatchLayout;
pub use resident::{loadable, place_in, Resident, ResidentSpots};

use super::GpuError;

fn bad(msg: String) -> GpuError {
    GpuError::Kernel(format!("normal.cu cannot take this batch: {msg}"))
}

pub(super) fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::driver(format!("normal equations: {what}"), e)
}
