//! Whether cuBLAS and cuSOLVER load and export what the stage calls, checked before any
//! call since cudarc panics on a missing library or symbol ([`check_libraries`],
//! [`syev_batched_present`]), and their status codes as [`GpuError`]s. Imports cudarc's
//! library bindings and the crate's error only.

use cudarc::cublas::sys as cublas;
use cudarc::cusolver::sys as cusolver;

use crate::extract::gpu::device::guarded;
use crate::extract::gpu::GpuError;

/// Whether cuBLAS loads (by any of its known names).
pub(in crate::extract::gpu) fn cublas_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the library by its known names.
    guarded("libcublas", || unsafe { cublas::is_culib_present() }).unwrap_or(false)
}

/// Whether cuSOLVER loads.
pub(in crate::extract::gpu) fn cusolver_present() -> bool {
    // SAFETY: as for cuBLAS.
    guarded("libcusolver", || unsafe { cusolver::is_culib_present() }).unwrap_or(false)
}

/// cuBLAS entry points this stage calls (checked up front: cudarc panics on a missing one).
const CUBLAS_SYMBOLS: [&str; 8] = [
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetPointerMode_v2",
    "cublasSetMathMode",
    "cublasDcopy_v2",
    "cublasDtrsmBatched",
    "cublasDgemmBatched",
];
/// cuSOLVER entry points this stage calls.
const CUSOLVER_SYMBOLS: [&str; 5] = [
    "cusolverDnCreate",
    "cusolverDnDestroy",
    "cusolverDnSetStream",
    "cusolverDnDpotrfBatched",
    "cusolverDnDpotrsBatched",
];

/// Whether cuBLAS and cuSOLVER load and export everything this stage calls, or what is missing.
pub fn check_libraries() -> Result<(), GpuError> {
    if !cublas_present() {
        return Err(GpuError::Library(
            "no cuBLAS library (libcublas.so): install the CUDA toolkit's math libraries".into(),
        ));
    }
    if !cusolver_present() {
        return Err(GpuError::Library(
            "no cuSOLVER library (libcusolver.so): install the CUDA toolkit's math libraries"
                .into(),
        ));
    }
    let missing = guarded("cuBLAS/cuSOLVER symbols", || {
        let mut missing = Vec::new();
        // SAFETY: culib returns the library just found present; `get` only looks a symbol up
        // (it is neither called nor kept here).
        let lib = unsafe { cublas::culib() };
        for s in CUBLAS_SYMBOLS {
            // SAFETY: a lookup by name; the pointer type is irrelevant as it is not called.
            if unsafe { lib.get::<unsafe extern "C" fn()>(s.as_bytes()) }.is_err() {
                missing.push(s);
            }
        }
        // SAFETY: as above, for cuSOLVER.
        let lib = unsafe { cusolver::culib() };
        for s in CUSOLVER_SYMBOLS {
            // SAFETY: as above.
            if unsafe { lib.get::<unsafe extern "C" fn()>(s.as_bytes()) }.is_err() {
                missing.push(s);
            }
        }
        missing
    })?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(GpuError::Library(format!(
            "the CUDA math libraries lack {} (too old a CUDA toolkit?)",
            missing.join(", ")
        )))
    }
}

pub(super) fn blas_ok(routine: &str, s: cublas::cublasStatus_t) -> Result<(), GpuError> {
    s.result().map_err(|e| GpuError::cublas(routine, e))
}

pub(crate) fn solver_ok(routine: &str, s: cusolver::cusolverStatus_t) -> Result<(), GpuError> {
    s.result().map_err(|e| GpuError::cusolver(routine, e))
}

/// The routine of the eigen route of the decorrelation; the newest of the CUDA calls here
/// (CUDA 12.6), so its absence falls back to the Jacobi kernel instead of failing the backend.
pub(super) const SYEV_BATCHED: &str = "cusolverDnXsyevBatched";

/// Whether cuSOLVER exports `cusolverDnXsyevBatched` (and its workspace query).
pub fn syev_batched_present() -> bool {
    guarded("cuSOLVER symbols", || {
        // SAFETY: culib returns the loaded library (check_libraries found it); `get` only looks
        // symbols up, without calling or keeping them.
        let lib = unsafe { cusolver::culib() };
        [
            SYEV_BATCHED,
            "cusolverDnXsyevBatched_bufferSize",
            "cusolverDnCreateParams",
        ]
        .iter()
        // SAFETY: as above.
        .all(|s| unsafe { lib.get::<unsafe extern "C" fn()>(s.as_bytes()) }.is_ok())
    })
    .unwrap_or(false)
}
