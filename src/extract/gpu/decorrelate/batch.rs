//! A batch's decorrelation outputs: [`HostDecorr`] on the host (the backend's downloads, the
//! twins' results) and [`DecorrBatch`] on the device. Imports the parent's errors, `layout`,
//! `status` and `gpu::device`.

use cudarc::driver::CudaSlice;

use super::cuda;
use super::layout::DecorrLayout;
use super::status::Status;
use crate::extract::gpu::device::Gpu;
use crate::extract::gpu::GpuError;

/// A batch's results on the host (the backend's downloads, or the twins').
#[derive(Debug, Clone)]
pub struct HostDecorr {
    /// Blocks.
    pub nblock: usize,
    /// Columns per block.
    pub ncol: usize,
    /// Resolution rows per block.
    pub nd2: usize,
    /// `[nblock·ncol]`: flux of core bin `j < nstep`, 0 beyond.
    pub flux: Vec<f64>,
    /// `[nblock·ncol]`: `s²` of core bin `j < nstep`, 0 beyond.
    pub fluxivar: Vec<f64>,
    /// `[nblock·nd2·ncol]`: `Rdiag[k, j]` for `k ≤ 2·ndiag`, `j < nkeep`, 0 elsewhere.
    pub resolution: Vec<f64>,
    /// Kernel status codes ([`Status::from_code`]).
    pub status: Vec<i32>,
    /// Jacobi sweeps performed per block.
    pub sweeps: Vec<i32>,
}

impl HostDecorr {
    /// Flux of bin `j` of block `b`.
    pub fn flux(&self, b: usize, j: usize) -> f64 {
        self.flux[b * self.ncol + j]
    }

    /// Its inverse variance.
    pub fn fluxivar(&self, b: usize, j: usize) -> f64 {
        self.fluxivar[b * self.ncol + j]
    }

    /// `Rdiag[k, j]` of block `b` (`k = 0` is the diagonal `-ndiag`, as in `PatchResult`).
    pub fn resolution(&self, b: usize, k: usize, j: usize) -> f64 {
        self.resolution[(b * self.nd2 + k) * self.ncol + j]
    }

    /// Status of block `b`.
    pub fn status(&self, b: usize) -> Option<Status> {
        Status::from_code(self.status[b])
    }
}

/// A batch's outputs on the device, in the layout of [`HostDecorr`].
pub struct DecorrBatch {
    /// Blocks.
    pub nblock: usize,
    /// Columns per block.
    pub ncol: usize,
    /// Resolution rows per block.
    pub nd2: usize,
    /// `[nblock·ncol]`.
    pub flux: CudaSlice<f64>,
    /// `[nblock·ncol]`.
    pub fluxivar: CudaSlice<f64>,
    /// `[nblock·nd2·ncol]`.
    pub resolution: CudaSlice<f64>,
    /// `[nblock]` status codes.
    pub status: CudaSlice<i32>,
    /// `[nblock]` Jacobi sweeps.
    pub sweeps: CudaSlice<i32>,
}

impl DecorrBatch {
    /// Device buffers sized for `layout` (zeroed so that they hold defined values; the kernel
    /// writes every element).
    pub fn alloc(gpu: &Gpu, layout: &DecorrLayout) -> Result<DecorrBatch, GpuError> {
        let (nb, ncol, nd2) = (layout.nblock, layout.ncol, layout.nd2);
        let st = &gpu.stream;
        Ok(DecorrBatch {
            nblock: nb,
            ncol,
            nd2,
            flux: st.alloc_zeros(nb * ncol).map_err(cuda("allocating flux"))?,
            fluxivar: st
                .alloc_zeros(nb * ncol)
                .map_err(cuda("allocating fluxivar"))?,
            resolution: st
                .alloc_zeros(nb * nd2 * ncol)
                .map_err(cuda("allocating the resolution"))?,
            status: st.alloc_zeros(nb).map_err(cuda("allocating status"))?,
            sweeps: st.alloc_zeros(nb).map_err(cuda("allocating sweeps"))?,
        })
    }

    /// Copies the batch back (waits for the kernel; `spextract bench`'s library choices and the
    /// tests).
    pub fn download(&self, gpu: &Gpu) -> Result<HostDecorr, GpuError> {
        let st = &gpu.stream;
        Ok(HostDecorr {
            nblock: self.nblock,
            ncol: self.ncol,
            nd2: self.nd2,
            flux: st
                .clone_dtoh(&self.flux)
                .map_err(cuda("downloading flux"))?,
            fluxivar: st
                .clone_dtoh(&self.fluxivar)
                .map_err(cuda("downloading fluxivar"))?,
            resolution: st
                .clone_dtoh(&self.resolution)
                .map_err(cuda("downloading the resolution"))?,
            status: st
                .clone_dtoh(&self.status)
                .map_err(cuda("downloading status"))?,
            sweeps: st
                .clone_dtoh(&self.sweeps)
                .map_err(cuda("downloading sweeps"))?,
        })
    }
}
