//! [`GpuError`]: why the GPU cannot be used, or what went wrong on it. A failed CUDA call keeps
//! the library's own error (cudarc's driver, cuBLAS, cuSOLVER or NVRTC error) beside what was
//! being done; running out of device memory is a variant of its own, made from the status
//! code where the call returns it, because the backend answers it (with smaller chunks) rather
//! than failing. Imports cudarc, and the tokens of what a device holds (`psf`'s spot sets,
//! `extract`'s pixel loads).
//!
//! Display prints the status code by name, never through the driver (cudarc's `Debug` of a
//! `DriverError` calls `cuGetErrorString`, which panics where there is no driver library).

use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::cublasStatus_t;
use cudarc::cusolver::result::CusolverError;
use cudarc::cusolver::sys::cusolverStatus_t;
use cudarc::driver::sys::CUresult;
use cudarc::driver::DriverError;
use cudarc::nvrtc::result::NvrtcError;

use crate::extract::LoadId;
use crate::psf::HeldSpots;

/// Why the GPU cannot be used, or what went wrong on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GpuError {
    /// A CUDA library is missing or unusable.
    #[error("{0}")]
    Library(String),
    /// No usable device.
    #[error("{0}")]
    NoDevice(String),
    /// A kernel could not be found, compiled or loaded, or cannot take a batch.
    #[error("{0}")]
    Kernel(String),
    /// The device ran out of memory: the driver's allocation, or cuBLAS's or cuSOLVER's own
    /// workspace allocation, failed. A smaller chunk may then fit.
    #[error("CUDA: {context}: {cause}")]
    OutOfMemory {
        /// What was being done.
        context: String,
        /// The call's status.
        cause: Exhausted,
    },
    /// A CUDA driver call failed.
    #[error("CUDA: {context}: {:?}", .source.0)]
    Driver {
        /// What was being done.
        context: String,
        /// cudarc's error.
        #[source]
        source: DriverError,
    },
    /// A cuBLAS call failed.
    #[error("CUDA: {context}: {:?}", .source.0)]
    Cublas {
        /// What was being done.
        context: String,
        /// cudarc's error.
        #[source]
        source: CublasError,
    },
    /// A cuSOLVER call failed.
    #[error("CUDA: {context}: {:?}", .source.0)]
    Cusolver {
        /// What was being done.
        context: String,
        /// cudarc's error.
        #[source]
        source: CusolverError,
    },
    /// NVRTC failed, `detail` being the options and the compiler's log where there is one.
    #[error("{context}: {:?}{detail}", .source.0)]
    Nvrtc {
        /// What was being done.
        context: String,
        /// cudarc's error.
        #[source]
        source: NvrtcError,
        /// Appended to the message.
        detail: String,
    },
    /// A library call succeeded but reported an argument it refused (a bug here, not a bad
    /// patch).
    #[error("CUDA: {0}")]
    Refused(String),
    /// A patch's spot values are held elsewhere: by another backend, or by an evaluation that
    /// this device has since replaced.
    #[error("{set} is not the one resident on this device ({})", here.map_or("none is".into(), |h| format!("{h} is")))]
    SpotsElsewhere {
        /// The patch's set.
        set: HeldSpots,
        /// The set the device holds.
        here: Option<HeldSpots>,
    },
    /// A patch's window lies in a pixel load that is not the one on this device: a stale load,
    /// or another backend's.
    #[error("patch at fiber {ispec}, bin {iwave}: its window is in {load}, not in the pixels on this device ({})", here.map_or("none".into(), |h| h.to_string()))]
    PixelsElsewhere {
        /// First core fiber of the patch.
        ispec: usize,
        /// First core bin.
        iwave: usize,
        /// The patch's load.
        load: LoadId,
        /// The load the device holds.
        here: Option<LoadId>,
    },
}

/// The status of a call that ran out of device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// `CUDA_ERROR_OUT_OF_MEMORY`.
    Driver(DriverError),
    /// `CUBLAS_STATUS_ALLOC_FAILED`.
    Cublas(CublasError),
    /// `CUSOLVER_STATUS_ALLOC_FAILED`.
    Cusolver(CusolverError),
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exhausted::Driver(e) => write!(f, "{:?}", e.0),
            Exhausted::Cublas(e) => write!(f, "{:?}", e.0),
            Exhausted::Cusolver(e) => write!(f, "{:?}", e.0),
        }
    }
}

impl GpuError {
    /// A failed driver call while doing `context`.
    pub fn driver(context: impl Into<String>, source: DriverError) -> GpuError {
        let context = context.into();
        if source.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            GpuError::OutOfMemory {
                context,
                cause: Exhausted::Driver(source),
            }
        } else {
            GpuError::Driver { context, source }
        }
    }

    /// A failed cuBLAS call while doing `context`.
    pub fn cublas(context: impl Into<String>, source: CublasError) -> GpuError {
        let context = context.into();
        if source.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED {
            GpuError::OutOfMemory {
                context,
                cause: Exhausted::Cublas(source),
            }
        } else {
            GpuError::Cublas { context, source }
        }
    }

    /// A failed cuSOLVER call while doing `context`.
    pub fn cusolver(context: impl Into<String>, source: CusolverError) -> GpuError {
        let context = context.into();
        if source.0 == cusolverStatus_t::CUSOLVER_STATUS_ALLOC_FAILED {
            GpuError::OutOfMemory {
                context,
                cause: Exhausted::Cusolver(source),
            }
        } else {
            GpuError::Cusolver { context, source }
        }
    }

    /// Whether the device ran out of memory ([`GpuError::OutOfMemory`]).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, GpuError::OutOfMemory { .. })
    }
}
