//! The two streams ("lanes") that a batch's chunks alternate on ([`Lane`]), each with its
//! own cuBLAS/cuSOLVER handles and the page-locked buffers its results are copied into
//! ([`Pinned`]). Imports `device` and `solve` only.

use cudarc::driver::{CudaSlice, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};

use super::super::device::Gpu;
use super::super::solve::Solver;
use super::super::GpuError;

/// Page-locked host memory that a lane's results are copied into: a copy into pageable memory
/// would hold the host until the stream reached it, and the host must be free to prepare the
/// next chunk meanwhile. Not write-combined: the host reads it. Grown as chunks need, and
/// reused chunk after chunk (the lane's previous chunk is collected before the next is queued).
///
/// The copy goes into the prefix the source fills, as a plain slice: cudarc copies the whole
/// destination's length (`size_of_val(dst)`), so a copy into the whole, larger buffer would read
/// past the end of the device buffer. A plain slice carries no event, so the copy is waited for
/// by synchronising the lane's stream before [`Pinned::read`] (`GpuBackend::collect`).
pub(super) struct Pinned<T: DeviceRepr> {
    buf: Option<PinnedHostSlice<T>>,
}

impl<T: DeviceRepr + ValidAsZeroBits + Copy> Pinned<T> {
    pub(super) fn new() -> Pinned<T> {
        Pinned { buf: None }
    }

    /// Queues the copy of `src` into the buffer on `gpu`'s stream.
    pub(super) fn download(&mut self, gpu: &Gpu, src: &CudaSlice<T>) -> Result<(), GpuError> {
        let cuda = |e: cudarc::driver::DriverError| GpuError::driver("results", e);
        if self.buf.as_ref().is_none_or(|b| b.len() < src.len()) {
            // Freed first (after its last copy: the drop waits for it), then a quarter more
            // than asked, so that chunks of slightly different sizes do not reallocate.
            self.buf = None;
            let len = src.len() + src.len() / 4;
            // SAFETY: the memory is uninitialised; `read` only returns the prefix a copy into it
            // has written (the `src.len()` elements of the copy below, waited for there).
            let buf = unsafe { gpu.ctx.alloc_pinned_with_flags::<T>(len, 0) }.map_err(cuda)?;
            self.buf = Some(buf);
        }
        let buf = self.buf.as_mut().expect("allocated above");
        let dst = &mut buf.as_mut_slice().map_err(cuda)?[..src.len()];
        gpu.stream.memcpy_dtoh(src, dst).map_err(cuda)
    }

    /// The first `len` elements; the copy into them must have been waited for (the lane's
    /// stream synchronised).
    pub(super) fn read(&self, len: usize) -> Result<Vec<T>, GpuError> {
        let buf = self
            .buf
            .as_ref()
            .filter(|b| b.len() >= len)
            .ok_or_else(|| GpuError::Kernel(format!("results: {len} values were not copied")))?;
        let all = buf
            .as_slice()
            .map_err(|e| GpuError::driver("waiting for results", e))?;
        Ok(all[..len].to_vec())
    }
}

/// One of the two streams that chunks of a batch alternate on, with its own cuBLAS/cuSOLVER
/// handles and the pinned buffers its results land in.
pub(super) struct Lane {
    pub(super) gpu: Gpu,
    pub(super) solver: Solver,
    pub(super) info: Pinned<i32>,
    pub(super) potrs: Pinned<i32>,
    pub(super) status: Pinned<i32>,
    pub(super) flux: Pinned<f64>,
    pub(super) fluxivar: Pinned<f64>,
    pub(super) resolution: Pinned<f64>,
    pub(super) chi2pix: Pinned<f64>,
    pub(super) pixmask: Pinned<f64>,
    /// The model image's parts and the leverage, when a batch asks for them.
    pub(super) image: Pinned<f64>,
    pub(super) leverage: Pinned<f64>,
}

impl Lane {
    pub(super) fn new(gpu: &Gpu) -> Result<Lane, GpuError> {
        let gpu = gpu.on_new_stream()?.with_staging();
        Ok(Lane {
            solver: Solver::new(&gpu)?,
            gpu,
            info: Pinned::new(),
            potrs: Pinned::new(),
            status: Pinned::new(),
            flux: Pinned::new(),
            fluxivar: Pinned::new(),
            resolution: Pinned::new(),
            chi2pix: Pinned::new(),
            pixmask: Pinned::new(),
            image: Pinned::new(),
            leverage: Pinned::new(),
        })
    }
}
